"""cffi declarations of DLPack and of the part of the TVM-FFI C API that fi_ffi uses (ABI mode, nothing compiled).

The declarations follow ``dlpack/dlpack.h`` (v1.3) and ``tvm/ffi/c_api.h`` / ``tvm/ffi/extra/c_env_api.h``
of apache-tvm-ffi 0.1.15.post2; ``tests/abi/test_layout.py`` compiles the real headers and checks every size
and offset declared here. Parsing the declarations costs a few milliseconds, so it happens on first use
(:func:`get_ffi`), never at ``import fi_ffi``.
"""

from __future__ import annotations

import cffi

from ..cdecl import Declarations

CDEFS = r"""
/* ---- DLPack ---- */
typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
    void* data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;
    int64_t* strides;
    uint64_t byte_offset;
} DLTensor;
typedef struct { uint32_t major; uint32_t minor; } DLPackVersion;
typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void* manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned* self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;
typedef int (*DLPackManagedTensorAllocator)(DLTensor* prototype, DLManagedTensorVersioned** out,
                                            void* error_ctx,
                                            void (*SetError)(void* error_ctx, const char* kind,
                                                             const char* message));

/* ---- TVM-FFI core ---- */
typedef struct { uint32_t major; uint32_t minor; uint32_t patch; } TVMFFIVersion;
typedef struct {
    uint64_t combined_ref_count;
    int32_t type_index;
    uint32_t __padding;
    void (*deleter)(void* self, int flags);
} TVMFFIObject;
typedef struct {
    int32_t type_index;
    uint32_t zero_padding;
    union {
        int64_t v_int64;
        double v_float64;
        void* v_ptr;
        const char* v_c_str;
        TVMFFIObject* v_obj;
        DLDataType v_dtype;
        DLDevice v_device;
        char v_bytes[8];
        uint64_t v_uint64;
    };
} TVMFFIAny;
typedef struct { const char* data; size_t size; } TVMFFIByteArray;
typedef struct { void* data; int64_t size; int64_t capacity; void (*data_deleter)(void*); } TVMFFISeqCell;
typedef struct {
    TVMFFIByteArray kind;
    TVMFFIByteArray message;
    TVMFFIByteArray backtrace;
    void (*update_backtrace)(void* self, const TVMFFIByteArray* backtrace, int32_t update_mode);
    void* cause_chain;
    void* extra_context;
} TVMFFIErrorCell;
typedef int (*TVMFFISafeCallType)(void* handle, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);

void TVMFFIGetVersion(TVMFFIVersion* out_version);
int TVMFFIObjectIncRef(void* obj);
int TVMFFIObjectDecRef(void* obj);
int TVMFFIFunctionCreate(void* self, TVMFFISafeCallType safe_call, void (*deleter)(void* self), void** out);
int TVMFFIFunctionGetGlobal(const TVMFFIByteArray* name, void** out);
int TVMFFIFunctionCall(void* func, TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);
void TVMFFIErrorMoveFromRaised(void** result);
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message);
int TVMFFITensorFromDLPackVersioned(DLManagedTensorVersioned* from, int32_t require_alignment,
                                    int32_t require_contiguous, void** out);
int TVMFFIStringFromByteArray(const TVMFFIByteArray* input, TVMFFIAny* out);
int TVMFFIDataTypeToString(const DLDataType* dtype, TVMFFIAny* out);

/* ---- TVM-FFI environment (streams, allocator) ----
   Stream handles are declared as uintptr_t rather than void*: same register, and the hot path can pass
   Python ints without building a pointer cdata per call. */
int TVMFFIEnvSetStream(int32_t device_type, int32_t device_id, uintptr_t stream, uintptr_t* opt_out_original);
uintptr_t TVMFFIEnvGetStream(int32_t device_type, int32_t device_id);
int TVMFFIEnvSetDLPackManagedTensorAllocator(DLPackManagedTensorAllocator allocator,
                                             int write_to_global_context,
                                             DLPackManagedTensorAllocator* opt_out_original);
DLPackManagedTensorAllocator TVMFFIEnvGetDLPackManagedTensorAllocator(void);
int TVMFFIEnvTensorAlloc(DLTensor* prototype, void** out);
"""

_DECLARATIONS = Declarations(CDEFS)


def get_ffi() -> cffi.FFI:
    """Return the process-wide ``cffi.FFI`` holding the declarations above (parsed once, thread-safe)."""
    return _DECLARATIONS.ffi()

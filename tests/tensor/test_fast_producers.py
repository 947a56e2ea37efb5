"""The fast producer paths: each gives the descriptor the slow path gives, and keeps nothing alive.

- ``as_tensor(torch tensor)`` remembers a layout under torch's own (shape, stride(), dtype, device) and then reads
  only those and ``data_ptr()``: compared here field by field with the full description, for every dtype fi_ffi
  knows and strided, sliced, transposed and empty views;
- a type with ``__cuda_array_interface__`` (and no DLPack) is read by the launcher from its interface alone: a
  warm call stays on the fast path, a changed layout or dtype is checked again and refused by name;
- the launcher's generated code reads ``torch.Tensor`` and ``cupy.ndarray`` arguments inline (no reader call):
  the same keys and pointers as the readers for every dtype and view, a warm call packs the frame as the slow
  path's own description does (on a GPU, with the real op), a negated view or a misaligned pointer of a warm
  layout is still refused by name, and nothing kept refers to the tensors.
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

import numpy as np
import pytest

import fi_ffi
from fi_ffi.ops import norm
from fi_ffi.tensor import intake
from fi_ffi.tensor.descriptor import Tensor

torch = pytest.importorskip("torch")

TORCH_DTYPES = ["float16", "bfloat16", "float32", "int8", "int32", "int64", "uint8", "bool"]


def fields(t: Tensor) -> tuple[Any, ...]:
    return (t.data_ptr, t.shape, t.strides, t.dtype, t.device, t.ndim, t._lid, t.owner)


def views(dtype: str) -> list[Any]:
    base = torch.zeros(6, 10, dtype=getattr(torch, dtype))
    return [base, base[1:4, 2:9], base.t(), base[:, ::3], base[2], base[0:0], base.reshape(3, 2, 10)[:, 1]]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_the_warm_torch_path_describes_as_the_full_one(dtype: str) -> None:
    for x in views(dtype):
        full = intake._describe_torch(x, "x", -1)
        first = fi_ffi.as_tensor(x)  # remembers the layout
        warm = fi_ffi.as_tensor(x)  # from the remembered layout
        assert fields(first) == fields(full) == fields(warm), x
        # another tensor of the same layout elsewhere: its own pointer and owner, the same layout
        other = x.clone() if x.is_contiguous() else None
        if other is not None:
            assert fields(fi_ffi.as_tensor(other))[1:7] == fields(full)[1:7]
            assert fi_ffi.as_tensor(other).data_ptr == other.data_ptr() and fi_ffi.as_tensor(other).owner is other


def test_a_parameter_and_a_forgotten_layout_take_the_same_paths() -> None:
    """``torch.nn.Parameter`` is described inline as ``torch.Tensor`` is; after ``fi_ffi.caches.reset()`` (the
    layouts and the torch classes forgotten) the first call describes in full again, with the same fields."""
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, 1:5]
    param = torch.nn.Parameter(x, requires_grad=False)
    full = intake._describe_torch(param, "p", -1)
    assert fields(fi_ffi.as_tensor(param)) == fields(full) == fields(fi_ffi.as_tensor(param))
    assert intake._torch_parameter is torch.nn.Parameter and intake._torch_tensor is torch.Tensor
    fi_ffi.caches.reset()
    assert intake._torch_tensor is not torch.Tensor and not intake._layouts
    again = fields(fi_ffi.as_tensor(param))
    assert again[:6] == fields(full)[:6] and again[7] is param  # (layout ids are numbered afresh after a reset)
    assert intake._torch_tensor is torch.Tensor and len(intake._layouts) == 1


def test_the_warm_torch_path_still_refuses_what_the_full_one_refuses() -> None:
    x = torch.ones(4, 8, dtype=torch.float16)
    fi_ffi.as_tensor(x)
    fi_ffi.as_tensor(x)
    with pytest.raises(ValueError, match=r"^x: the tensor is a lazily negated view"):
        fi_ffi.as_tensor(torch._neg_view(x), name="x")  # same shape, strides, dtype, device
    sparse = x.to_sparse()
    with pytest.raises((TypeError, ValueError), match=r"^s: "):
        fi_ffi.as_tensor(sparse, name="s")
    meta = torch.empty(4, 8, dtype=torch.float16, device="meta")  # get_device() is -1, as for the CPU
    with pytest.raises(ValueError, match=r"^m: torch tensors on meta are not supported"):
        fi_ffi.as_tensor(meta, name="m")


def test_nothing_the_fast_paths_remember_holds_the_tensor() -> None:
    x = torch.zeros(3, 16, dtype=torch.bfloat16)
    ref = weakref.ref(x)
    t = fi_ffi.as_tensor(x)
    t = fi_ffi.as_tensor(x)
    assert t.owner is x
    del x, t
    gc.collect()
    assert ref() is None
    assert not any(isinstance(v, torch.Tensor) for key in intake._layouts for v in key)


class TypeCAI:
    """A producer whose type has ``__cuda_array_interface__`` (and no DLPack), over aligned host memory (a CPU
    machine takes CAI pointers as cuda:0)."""

    def __init__(self, shape: tuple[int, ...], typestr: str = "<f2") -> None:
        n = int(np.prod(shape))
        self.host = np.zeros(n + 256, dtype=np.float16)
        offset = (-self.host.ctypes.data % 256) // 2
        self.ptr = self.host[offset:].ctypes.data
        self.shape, self.typestr = shape, typestr

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.typestr, "data": (self.ptr, False), "version": 3, "strides": None}


def test_a_cai_type_is_read_from_its_interface_and_stays_on_the_fast_path(kernel_modules: list[str]) -> None:
    x, w, out = TypeCAI((4, 128)), TypeCAI((128,)), TypeCAI((4, 128))
    assert intake.producer(TypeCAI).read is intake._read_cai
    key, ptr = intake.read(x, None)
    assert ptr == x.ptr and key == ((4, 128), None, "<f2", None, fi_ffi.as_tensor(x).device)
    launch = norm._rmsnorm
    for _ in range(2):
        with pytest.raises(fi_ffi.errors.KernelError):  # passed every check, stopped by the module (no GPU)
            fi_ffi.rmsnorm(x, w, out=out)
    before = launch.launcher.slow_calls
    with pytest.raises(fi_ffi.errors.KernelError):
        fi_ffi.rmsnorm(x, w, out=out)
    assert launch.launcher.slow_calls == before  # warm: read from the interfaces alone
    # another dtype in the same shape is checked again, and refused by name
    with pytest.raises(TypeError, match=r"^input: expected dtype float16, bfloat16, got float32"):
        fi_ffi.rmsnorm(TypeCAI((4, 128), "<f4"), w, out=out)
    # a misaligned pointer of the validated layout is refused by the pointer rules, not let through
    x.ptr += 2
    with pytest.raises(ValueError, match=r"^input: "):
        fi_ffi.rmsnorm(x, w, out=out)


# ---- the launcher's inline reads: torch tensors and CuPy arrays read in the generated code ------------------------

on_gpu = pytest.mark.skipif(
    os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1" or not torch.cuda.is_available(),
    reason="launches on a GPU (FI_FFI_RUN_GPU_TESTS=1)",
)


def unchecked_launch() -> Any:
    """rmsnorm's launch function without the op's check (its keys function reads as every launcher's does)."""
    from fi_ffi.launch.launcher import launcher

    return launcher(norm.RMSNORM, "norm", None)


def packed(launch: Any, frame: Any) -> tuple[Any, ...]:
    """What the frame passes: per argument slot its type and payload, a DLTensor record decoded field by field
    (data, device, ndim, dtype, shape, strides, byte offset), so frames at other addresses compare."""
    from fi_ffi.abi.cdefs import get_ffi
    from fi_ffi.abi.objects import DLTENSOR_PTR

    ffi = get_ffi()
    out: list[Any] = []
    for i in range(len(launch.launcher.decl.params)):
        kind, payload = frame.q[2 * i], frame.q[2 * i + 1]
        if kind == DLTENSOR_PTR:
            t = ffi.cast("DLTensor*", payload)
            n = t.ndim
            strides = None if t.strides == ffi.NULL else [t.strides[k] for k in range(n)]
            payload = (
                int(ffi.cast("uintptr_t", t.data)),
                (t.device.device_type, t.device.device_id),
                (n, t.dtype.code, t.dtype.bits, t.dtype.lanes),
                [t.shape[k] for k in range(n)],
                strides,
                t.byte_offset,
            )
        out.append((kind, payload))
    return tuple(out)


def warm_call_packs_as_the_slow_path(args: tuple[Any, ...]) -> None:
    """``fi_ffi.rmsnorm(input, weight, out)`` after a call that remembered the layouts stays on the fast path (read
    inline: no description, no check) and packs the frame as the slow path's own description of the same
    arguments does (prepare: describe, check, pack)."""
    x, w, out = args
    lau = norm._rmsnorm.launcher
    fi_ffi.rmsnorm(x, w, out=out)
    before = lau.slow_calls
    fi_ffi.rmsnorm(x, w, out=out)
    assert lau.slow_calls == before
    reference = lau.prepare((out, x, w, 1e-6, False))
    assert packed(norm._rmsnorm, lau.tls.frame) == packed(norm._rmsnorm, reference._frame)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_the_launchers_inline_torch_reads_key_as_the_reader(dtype: str) -> None:
    launch = unchecked_launch()
    source = launch.source
    assert "_TT and not out.is_neg()" in source and "out.data_ptr()" in source
    intake.producer(torch.Tensor)
    assert intake._torch_tensor is torch.Tensor  # the generated code reads torch tensors itself now
    assert launch.launcher.namespace["_TT"] is torch.Tensor  # copied into the launcher's namespace
    for x in views(dtype):
        other = torch.zeros_like(x)  # another tensor, another pointer
        keys, ptrs = launch.launcher.keys(x, other, x, 1e-6, False)
        key_x, key_other = intake._read_torch(x, None)[0], intake._read_torch(other, None)[0]
        assert keys[:3] == (key_x, key_other, key_x)
        assert ptrs == [x.data_ptr(), other.data_ptr(), x.data_ptr()]
    # a subclass (a parameter) and a negated view go to the reader: the first keys alike, the second is refused
    x = torch.ones(4, 8)
    assert launch.launcher.keys(torch.nn.Parameter(x), x, x, 1e-6, False)[0][0] == intake._read_torch(x, None)[0]
    with pytest.raises(ValueError, match="lazily negated"):
        launch.launcher.keys(torch._neg_view(x), x, x, 1e-6, False)


@on_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_warm_torch_call_packs_as_the_slow_path(dtype: str) -> None:
    t = getattr(torch, dtype)
    wide = torch.randn(6, 256, dtype=t, device="cuda")
    w = torch.randn(128, dtype=t, device="cuda")
    for x in (wide[:, :128].contiguous(), wide[:, :128], wide[1:4, 64:192]):  # rows strided too
        out = torch.zeros(x.shape, dtype=t, device="cuda")
        warm_call_packs_as_the_slow_path((x, w, out))
        if x.numel():
            x32 = x.float()
            expected = x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + 1e-6) * w.float()
            torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@on_gpu
def test_the_inline_torch_reads_refuse_a_negated_view_and_keep_nothing() -> None:
    x = torch.ones(4, 128, dtype=torch.float16, device="cuda")
    w = torch.ones(128, dtype=torch.float16, device="cuda")
    out = torch.zeros_like(x)
    for _ in range(2):
        fi_ffi.rmsnorm(x, w, out=out)
    # the warm layout, negated lazily: refused by name, not launched with the sign lost
    with pytest.raises(ValueError, match=r"^input: the tensor is a lazily negated view"):
        fi_ffi.rmsnorm(torch._neg_view(x), w, out=out)
    # a parameter (a subclass: through the reader) of the warm layout stays on the fast path
    lau = norm._rmsnorm.launcher
    before = lau.slow_calls
    fi_ffi.rmsnorm(torch.nn.Parameter(x.clone(), requires_grad=False), w, out=out)
    assert lau.slow_calls == before
    # a misaligned pointer of the warm layout is refused by the pointer rules, not launched
    with pytest.raises(ValueError, match=r"^input: data pointer 0x[0-9a-f]+ must be aligned"):
        fi_ffi.rmsnorm(torch.ones(4 * 128 + 1, dtype=torch.float16, device="cuda")[1:].view(4, 128), w, out=out)
    torch.cuda.synchronize()
    refs = [weakref.ref(v) for v in (x, w, out)]
    del x, w, out
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    frame = lau.tls.frame
    assert not any(isinstance(v, torch.Tensor) for key in frame.cache for part in key for v in _flat(part))


def _flat(value: Any) -> list[Any]:
    return [w for v in value for w in _flat(v)] if isinstance(value, tuple) else [value]


@on_gpu
def test_the_launchers_inline_cupy_reads_key_as_the_reader_and_pack_as_the_slow_path() -> None:
    cupy = pytest.importorskip("cupy")
    launch = unchecked_launch()
    intake.producer(cupy.ndarray)
    assert intake._cupy_ndarray is cupy.ndarray
    assert launch.launcher.namespace["_CP"] is cupy.ndarray  # copied into the launcher's namespace
    for dtype in ("float16", "float32", "int8", "int64", "bool"):
        base = cupy.zeros((6, 10), dtype=dtype)
        for x in (base, base[1:4, 2:9], base.T, base[:, ::3], base[2], base[0:0]):
            keys, ptrs = launch.launcher.keys(x, x, x, 1e-6, False)
            assert keys[:3] == (intake._read_cupy(x, None)[0],) * 3
            assert ptrs == [x.data.ptr] * 3
    # the real op: a warm call launches from the inline reads, packed as the slow path packs
    wide = cupy.random.standard_normal((6, 256)).astype(cupy.float16)
    w = cupy.ones(128, dtype=cupy.float16)
    for x in (wide[:, :128].copy(), wide[:, :128], wide[1:4, 64:192]):
        out = cupy.zeros(x.shape, dtype=cupy.float16)
        warm_call_packs_as_the_slow_path((x, w, out))
        cupy.cuda.Device().synchronize()
        x32 = x.astype(cupy.float32)
        expected = x32 / cupy.sqrt((x32 * x32).mean(-1, keepdims=True) + 1e-6)
        assert float(abs(out.astype(cupy.float32) - expected).max()) < 2e-2
    ref = weakref.ref(wide)
    del wide, x, w, out
    gc.collect()
    assert ref() is None

"""RMSNorm family on the CPU machine, against the real ``norm.so`` of the test wheel.

With no GPU, a call whose descriptors claim device ``cuda:0`` passes our checks, crosses the FFI, passes the
module's signature check, and stops at the module's first CUDA call. That proves the packing matches the
real signature. Invalid arguments must be rejected by our checks before the FFI.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.fakes import assert_reached_the_kernel, fake_cuda

import fi_ffi
from fi_ffi.errors import KernelError
from fi_ffi.launch.kernels import entry_point
from fi_ffi.tensor.descriptor import Tensor

# Descriptors here claim cuda:0 over host memory: only a machine without a GPU stops them before a launch.
pytestmark = pytest.mark.cpu_only

SIGNATURES = {
    "rmsnorm": "rmsnorm(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: float, 4: bool) -> void",
    "gemma_rmsnorm": "gemma_rmsnorm(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: float, 4: bool) -> void",
    "fused_add_rmsnorm": "fused_add_rmsnorm(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: float, 4: bool) -> void",
    "gemma_fused_add_rmsnorm": (
        "gemma_fused_add_rmsnorm(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: float, 4: bool) -> void"
    ),
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_of_real_module_matches_our_wire_layout(kernel_modules: object, name: str) -> None:
    assert SIGNATURES[name] in entry_point("norm", name).signature_text()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "call",
    [
        lambda x, w, o: fi_ffi.rmsnorm(x, w, out=o, eps=1e-5),
        lambda x, w, o: fi_ffi.gemma_rmsnorm(x, w, out=o),
        lambda x, w, o: fi_ffi.fused_add_rmsnorm(x, o, w),
        lambda x, w, o: fi_ffi.gemma_fused_add_rmsnorm(x, o, w, enable_pdl=True),
    ],
    ids=["rmsnorm", "gemma_rmsnorm", "fused_add_rmsnorm", "gemma_fused_add_rmsnorm"],
)
def test_packed_call_gets_past_the_signature_check(kernel_modules: object, call: object, dtype: str) -> None:
    x, w, o = fake_cuda((4, 128), dtype), fake_cuda((128,), dtype), fake_cuda((4, 128), dtype)
    with pytest.raises(KernelError) as info:
        call(x, w, o)  # type: ignore[operator]
    assert_reached_the_kernel(info.value)
    assert "float16[4, 128] cuda:0" in str(info.value) or "bfloat16[4, 128] cuda:0" in str(info.value)


def test_qk_rmsnorm_with_strided_heads_gets_past_the_signature_check(kernel_modules: object) -> None:
    # q slice of a fused [B, 3, H, D] QKV: strides (3*H*D, D, 1)
    x = fake_cuda((2, 4, 64), strides=(3 * 4 * 64, 64, 1))
    with pytest.raises(KernelError) as info:
        fi_ffi.qk_rmsnorm(x, fake_cuda((64,)), out=fake_cuda((2, 4, 64)), stream=0)
    assert_reached_the_kernel(info.value)


def test_rmsnorm_takes_3d_qk_input_with_strided_views_as_flashinfer_does(kernel_modules: object) -> None:
    # flashinfer's rmsnorm on [B, H, D] (QK RMSNorm): the q slice of a fused QKV row, out strided the same way
    x = fake_cuda((2, 4, 64), strides=(3 * 4 * 64, 64, 1))
    o = fake_cuda((2, 4, 64), strides=(3 * 4 * 64, 64, 1))
    with pytest.raises(KernelError) as info:
        fi_ffi.rmsnorm(x, fake_cuda((64,)), 1e-5, out=o, stream=0)  # flashinfer's order: eps third
    assert_reached_the_kernel(info.value)
    assert "float16[2, 4, 64] cuda:0" in str(info.value)
    with pytest.raises(KernelError) as info:  # in place, 2-D after 3-D: each rank keeps its own checks
        fi_ffi.rmsnorm(fake_cuda((4, 128)), fake_cuda((128,)), out=fake_cuda((4, 128)))
    assert_reached_the_kernel(info.value)


@pytest.mark.parametrize(
    ("x", "o", "pattern"),
    [
        ((2, 4, 64), (2, 64), r"^out: expected shape \(2, 4, 64\) \(\[B, H, D\]\), got \(2, 64\)"),
        ((2, 4, 4, 64), (2, 4, 4, 64), r"^input: expected a 2-D \[B, D\] or 3-D \[B, H, D\] tensor"),
        ((64,), (64,), r"^input: expected a 2-D \[B, D\] or 3-D \[B, H, D\] tensor"),
    ],
)
def test_rmsnorm_ranks_are_checked(x: tuple[int, ...], o: tuple[int, ...], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        fi_ffi.rmsnorm(fake_cuda(x), fake_cuda((64,)), out=fake_cuda(o))


def test_gemma_rmsnorm_stays_2d_as_flashinfers_kernel() -> None:
    # 0.6.3's gemma_rmsnorm entry point checks a 2-D input: refused here by name, before the FFI
    with pytest.raises(ValueError, match=r"^input: expected a 2-D tensor \[B, D\], got shape \(2, 4, 64\)"):
        fi_ffi.gemma_rmsnorm(fake_cuda((2, 4, 64)), fake_cuda((64,)), out=fake_cuda((2, 4, 64)))


def test_host_tensors_stop_at_the_modules_device_check(kernel_modules: object) -> None:
    host = [np.zeros(s, np.float16) for s in ((2, 64), (2, 64), (64,))]
    out, x, w = (Tensor.from_pointer(a.ctypes.data, a.shape, "float16", "cpu", owner=a) for a in host)
    with pytest.raises(KernelError) as info:
        entry_point("norm", "rmsnorm")(out, x, w, 1e-6, False)  # bypasses our checks on purpose
    assert info.value.kind == "InternalError"
    assert "must be a CUDA tensor" in info.value.message


# ---- our checks: each bad argument is named, and nothing crosses the FFI ----

GOOD = {"x": ((4, 128), "float16"), "w": ((128,), "float16"), "o": ((4, 128), "float16")}


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(x=((4, 2, 2, 128), "float16")), ValueError, r"input: expected a 2-D \[B, D\] or 3-D \[B, H, D\]"),
        (dict(x=((4, 2, 128), "float16")), ValueError, r"out: expected shape \(4, 2, 128\) \(\[B, H, D\]\)"),
        (dict(x=((4, 128), "float32")), TypeError, r"input: expected dtype float16, bfloat16, got float32"),
        (dict(w=((64,), "float16")), ValueError, r"weight: expected shape \(128,\)"),
        (dict(w=((128,), "bfloat16")), TypeError, r"weight: expected dtype float16 \(same as input\)"),
        (dict(o=((4, 64), "float16")), ValueError, r"out: expected shape \(4, 128\)"),
        (dict(o=((4, 128), "bfloat16")), TypeError, r"out: expected dtype float16"),
    ],
)
def test_bad_shapes_and_dtypes_are_named(change: dict, exc: type, pattern: str) -> None:
    spec = {**GOOD, **change}
    x, w, o = (fake_cuda(*spec[k]) for k in ("x", "w", "o"))
    with pytest.raises(exc, match=pattern):
        fi_ffi.rmsnorm(x, w, out=o)


def test_host_device_mismatched_device_and_null_pointer_are_named() -> None:
    x, w, o = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    with pytest.raises(ValueError, match=r"input: expected a CUDA device tensor, got one on cpu"):
        fi_ffi.rmsnorm(fake_cuda((4, 128), device="cpu"), w, out=o)
    with pytest.raises(ValueError, match=r"weight: expected a tensor on cuda:0 \(same as input\), got cuda:1"):
        fi_ffi.rmsnorm(x, fake_cuda((128,), device=1), out=o)
    with pytest.raises(ValueError, match="out: data pointer is NULL"):
        fi_ffi.rmsnorm(x, w, out=Tensor.from_pointer(0, (4, 128), "float16", 0))


def test_strides_and_alignment_are_checked() -> None:
    w, o = fake_cuda((128,)), fake_cuda((4, 128))
    with pytest.raises(ValueError, match="input: the last dimension must be contiguous"):
        fi_ffi.rmsnorm(fake_cuda((4, 128), strides=(256, 2)), w, out=o)
    with pytest.raises(ValueError, match="input: stride of dimension 0 must be a multiple of 8"):
        fi_ffi.rmsnorm(fake_cuda((4, 128), strides=(129, 1)), w, out=o)
    misaligned = fake_cuda((4, 128)).view((4, 128), offset=1)
    with pytest.raises(ValueError, match="input: data pointer .* must be aligned to 16 bytes"):
        fi_ffi.rmsnorm(misaligned, w, out=o)


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf"), "1e-6", None, True])
def test_eps_must_be_finite_and_positive(eps: object) -> None:
    with pytest.raises((ValueError, TypeError), match="eps"):
        fi_ffi.rmsnorm(fake_cuda((4, 128)), fake_cuda((128,)), out=fake_cuda((4, 128)), eps=eps)  # type: ignore[arg-type]


def test_bad_stream_and_bad_tensor_kind_are_named(kernel_modules: object) -> None:
    x, w, o = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    with pytest.raises(TypeError, match="stream"):
        fi_ffi.rmsnorm(x, w, out=o, stream="default")
    with pytest.raises(TypeError, match="weight"):
        fi_ffi.rmsnorm(x, None, out=o)


def test_validation_memo_does_not_hide_a_changed_argument(kernel_modules: object) -> None:
    x, w, o = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    with pytest.raises(KernelError):
        fi_ffi.rmsnorm(x, w, out=o)  # validated and remembered
    with pytest.raises(ValueError, match="out: expected shape"):
        fi_ffi.rmsnorm(x, w, out=fake_cuda((4, 64)))
    with pytest.raises(KernelError):
        fi_ffi.rmsnorm(x, w, out=o)


def test_prepared_call_is_checked_once_and_reaches_the_kernel(kernel_modules: object) -> None:
    x, w, o = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    call = fi_ffi.prepare(fi_ffi.rmsnorm, x, w, 1e-5, out=o)
    assert call.keep[:3] == (o, x, w)  # wire order: out, input, weight (then eps, enable_pdl)
    assert "1e-05" in repr(call) and "float16[4, 128] cuda:0" in repr(call)
    for _ in range(2):  # each call launches again with the same packed arguments
        with pytest.raises(KernelError) as info:
            call()
        assert_reached_the_kernel(info.value)
    in_place = fi_ffi.prepare(fi_ffi.fused_add_rmsnorm, x, o, w, stream=0)
    with pytest.raises(KernelError) as info:
        in_place()
    assert_reached_the_kernel(info.value)


def test_prepare_checks_arguments_and_the_function(kernel_modules: object) -> None:
    x, w, o = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    with pytest.raises(ValueError, match="weight: expected shape"):
        fi_ffi.prepare(fi_ffi.rmsnorm, x, fake_cuda((64,)), out=o)
    with pytest.raises(ValueError, match="eps"):
        fi_ffi.prepare(fi_ffi.rmsnorm, x, w, -1.0, out=o)
    with pytest.raises(TypeError, match="function: expected one of"):
        fi_ffi.prepare(print, x, w, o)
    with pytest.raises(TypeError):
        fi_ffi.prepare(fi_ffi.rmsnorm, x, w)  # missing `out`


# ---- flashinfer's call shapes: positional out, enable_pdl=None ----------------------------------------------


@pytest.mark.parametrize("name", ["rmsnorm", "gemma_rmsnorm"])
def test_flashinfer_positional_out_is_taken(kernel_modules: object, name: str) -> None:
    # flashinfer's rmsnorm(input, weight, eps, out, enable_pdl): a port that passes out by position works as is
    op = getattr(fi_ffi, name)
    with pytest.raises(KernelError) as info:
        op(fake_cuda((4, 128)), fake_cuda((128,)), 1e-6, fake_cuda((4, 128)), False)
    assert_reached_the_kernel(info.value)
    with pytest.raises(TypeError, match=rf"^out: required .*as {name}\(input, weight, eps, out\) or out=\.\.\."):
        op(fake_cuda((4, 128)), fake_cuda((128,)), 1e-6)


@pytest.mark.parametrize("name", ["rmsnorm", "gemma_rmsnorm"])
def test_out_in_eps_place_is_named_with_the_order_and_the_fix(name: str) -> None:
    # rmsnorm(x, w, out): out lands in eps's place; the error says so, not that out is missing
    op, x, w, o = getattr(fi_ffi, name), fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    order = rf"{name}'s positional order is \(input, weight, eps, out, enable_pdl\)"
    with pytest.raises(
        TypeError, match=rf"^eps: expected a float, got Tensor \(a tensor\); {order}: pass out= by keyword$"
    ):
        op(x, w, o)
    with pytest.raises(TypeError, match=rf"^eps: expected a float, got ndarray \(a tensor\); {order}$"):
        op(x, w, np.zeros((4, 128), np.float16), out=o)  # out given: no keyword to suggest


def test_a_tensor_too_many_lands_in_a_scalar_and_names_the_order() -> None:
    x, r, w = fake_cuda((4, 128)), fake_cuda((4, 128)), fake_cuda((128,))
    order = r"fused_add_rmsnorm's positional order is \(input, residual, weight, eps, enable_pdl\)$"
    with pytest.raises(TypeError, match=rf"^eps: expected a float, got Tensor \(a tensor\); {order}"):
        fi_ffi.fused_add_rmsnorm(x, r, w, fake_cuda((4, 128)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^enable_pdl: expected a bool, got Tensor \(a tensor\); rmsnorm's"):
        fi_ffi.rmsnorm(x, w, 1e-6, r, fake_cuda((4, 128)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda x, w, o: fi_ffi.rmsnorm(x, w, 1e-6, o, None),
        lambda x, w, o: fi_ffi.fused_add_rmsnorm(x, o, w, 1e-6, None),
        lambda x, w, o: fi_ffi.silu_and_mul(fake_cuda((4, 256)), o, None),
    ],
    ids=["rmsnorm", "fused_add_rmsnorm", "silu_and_mul"],
)
def test_enable_pdl_none_asks_the_device_as_flashinfer_does(kernel_modules: object, call: object) -> None:
    # flashinfer's default; refused before ("enable_pdl: expected a bool, got None"). Twice: the second call takes
    # the launcher's cached layout, None keyed with the device.
    for _ in range(2):
        x, w, o = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
        with pytest.raises(KernelError) as info:
            call(x, w, o)  # type: ignore[operator]
        assert_reached_the_kernel(info.value)


@pytest.mark.parametrize(("capability", "pdl"), [((9, 0), True), ((10, 0), True), ((8, 9), False)])
def test_enable_pdl_none_is_on_from_sm90(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], pdl: bool
) -> None:
    from fi_ffi.cuda import device
    from fi_ffi.launch.validation import describe_arguments
    from fi_ffi.ops.norm import RMSNORM

    monkeypatch.setitem(device._properties, 0, device.DeviceProperties(capability, 132, 32))
    values = [fake_cuda((4, 128)), fake_cuda((4, 128)), fake_cuda((128,)), 1e-6, None]
    assert describe_arguments(RMSNORM, values, None)[0]["enable_pdl"] is pdl
    values[-1] = False  # a bool given is kept whatever the device
    assert describe_arguments(RMSNORM, values, None)[0]["enable_pdl"] is False
    values[-1] = "yes"
    with pytest.raises(TypeError, match="enable_pdl: expected a bool, got 'yes'"):
        describe_arguments(RMSNORM, values, None)

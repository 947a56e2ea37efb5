"""GDN prefill on the CPU machine, against the real ``gdn_prefill_sm90.so`` of the test wheel, plus the device
helper.

There is no GPU here, so the public ``gdn_prefill`` stops at its compute-capability check with
UnsupportedDeviceError. The packing is proven through the internal ``_gdn_prefill(..., skip_arch_check=True)``:
the module accepts the argument list and its checks and stops in the launcher, which reads the (absent) current
device's properties and refuses them; we decode that refusal into UnsupportedDeviceError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.gdn_calls import call_unchecked
from helpers.wheels import WHEELS_HINT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fi_ffi
from fi_ffi.cuda import device
from fi_ffi.errors import KernelError, KernelNotFoundError, UnsupportedDeviceError
from fi_ffi.launch.aliasing import footprint
from fi_ffi.launch.kernels import entry_point
from fi_ffi.ops import gdn
from fi_ffi.tensor.descriptor import Tensor

# Descriptors here claim cuda:0 over host memory: only a machine without a GPU stops them before a launch.
pytestmark = pytest.mark.cpu_only

SIGNATURE = (
    "gdn_prefill(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: DLTensor*, 4: DLTensor*, 5: DLTensor*, "
    "6: Optional<DLTensor*>, 7: Optional<DLTensor*>, 8: Optional<DLTensor*>, 9: float, 10: DLTensor*) "
    "-> void"
)
D = 128
REPO = Path(__file__).resolve().parents[2]


def fake_cuda(
    shape: tuple[int, ...],
    dtype: str = "float16",
    strides: tuple[int, ...] | None = None,
    device: object = "cuda:0",
    align: int = 64,
) -> Tensor:
    """A descriptor that claims CUDA memory but points at (``align``-byte aligned) host memory it never touches."""
    # memory of its own for the whole extent: the launcher refuses outputs that overlap inputs
    extent = footprint(Tensor.from_pointer(align, shape, dtype, device, strides))[1]
    host = np.zeros(max(extent, 256) + align, dtype=np.uint8)
    ptr = (host.ctypes.data + align - 1) // align * align
    return Tensor.from_pointer(ptr, shape, dtype, device, strides, owner=host)


def gdn_args(
    s: int = 10, n: int = 2, hq: int = 2, hk: int = 2, hv: int = 4, dtype: str = "float16", **over: object
) -> dict[str, object]:
    """Keyword arguments of a valid ``gdn_prefill`` call without the optional inputs, with overrides."""
    hs = max(hq, hv)
    args: dict[str, object] = dict(
        q=fake_cuda((s, hq, D), dtype),
        k=fake_cuda((s, hk, D), dtype),
        v=fake_cuda((s, hv, D), dtype),
        cu_seqlens=fake_cuda((n + 1,), "int64"),
        output=fake_cuda((s, hs, D), dtype),
        output_state=fake_cuda((n, hs, D, D), "float32"),
        workspace=fake_cuda((132 * 128,), "uint8"),
    )
    args.update(over)
    return args


def optional(s: int = 10, n: int = 2, hs: int = 4) -> dict[str, Tensor]:
    return dict(
        initial_state=fake_cuda((n, hs, D, D), "float32"),
        g=fake_cuda((s, hs), "float32"),
        beta=fake_cuda((s, hs), "float32"),
    )


def kernel_error_of(err: BaseException) -> KernelError:
    """The KernelError the module raised (possibly decoded into UnsupportedDeviceError)."""
    if isinstance(err, UnsupportedDeviceError):
        assert isinstance(err.__cause__, KernelError), f"not decoded from the kernel: {err!r}"
        return err.__cause__
    assert isinstance(err, KernelError), repr(err)
    return err


def assert_reached_the_launcher(err: BaseException) -> KernelError:
    """The module accepted the argument list and its checks and failed on the device (there is none)."""
    kerr = kernel_error_of(err)
    assert kerr.kind != "TypeError", f"signature mismatch: {kerr}"
    assert "Mismatched" not in kerr.message and "Check failed" not in kerr.message, kerr.message
    assert "device" in kerr.message.lower() or "cuda" in kerr.message.lower(), kerr.message
    return kerr


# ---- the real module: signature and packing ----


def test_signature_of_real_module_matches_our_wire_layout(kernel_modules: object) -> None:
    assert SIGNATURE in entry_point("gdn_prefill_sm90", "gdn_prefill").signature_text()


@pytest.mark.parametrize(
    "heads",
    [(2, 2, 4), (4, 1, 1), (8, 2, 2), (16, 16, 32), (3, 3, 3)],
    ids=["gva", "gqa4", "gqa8:2", "gva16:32", "equal"],
)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("present", ["", "initial_state", "g", "beta", "initial_state,g,beta"])
def test_packed_call_reaches_the_launcher(
    kernel_modules: object, heads: tuple[int, int, int], dtype: str, present: str
) -> None:
    hq, hk, hv = heads
    hs = max(hq, hv)
    args = gdn_args(hq=hq, hk=hk, hv=hv, dtype=dtype)
    extra = {name: t for name, t in optional(hs=hs).items() if name in present.split(",")}
    with pytest.raises((KernelError, UnsupportedDeviceError)) as info:
        call_unchecked(args, **extra, scale=0.25 if extra else None, stream=0)
    kerr = assert_reached_the_launcher(info.value)
    assert kerr.arguments[0] == f"DLTensor*({dtype}[10, {hs}, 128] cuda:0)"
    assert kerr.arguments[5] == "DLTensor*(int64[3] cuda:0)"
    for slot, name in ((6, "initial_state"), (7, "g"), (8, "beta")):
        if name in extra:
            assert kerr.arguments[slot].startswith("DLTensor*(float32["), kerr.arguments
        else:
            assert kerr.arguments[slot] == "None"
    assert kerr.arguments[9] == ("0.25" if extra else "0.0")
    assert kerr.arguments[10] == "DLTensor*(uint8[16896] cuda:0)"


def test_kernel_refusal_is_decoded_into_unsupported_device_error(kernel_modules: object) -> None:
    with pytest.raises((KernelError, UnsupportedDeviceError)) as info:
        call_unchecked(gdn_args())
    if isinstance(info.value, UnsupportedDeviceError):  # the launcher read a non-9 major from the absent device
        assert "SM90" in str(info.value) and "major version" in str(info.value)
    assert_reached_the_launcher(info.value)


def test_input_state_may_alias_output_state(kernel_modules: object) -> None:
    args = gdn_args()
    with pytest.raises((KernelError, UnsupportedDeviceError)) as info:
        call_unchecked(args, initial_state=args["output_state"])
    assert_reached_the_launcher(info.value)


# ---- the public op on a machine without a GPU, and the architecture gate ----


def test_public_op_without_a_gpu_raises_unsupported_device_error() -> None:
    with pytest.raises(UnsupportedDeviceError, match="no CUDA device is available"):
        fi_ffi.ops.gdn.gdn_prefill(**gdn_args())


def test_device_helper_without_a_gpu() -> None:
    for query in (
        device.current_device,
        lambda: device.compute_capability(0),
        lambda: device.sm_count(0),
        lambda: device.make_current(0),
        lambda: device.set_device(0),
        lambda: gdn.gdn_workspace_size(0),
    ):
        with pytest.raises(UnsupportedDeviceError, match=r"no CUDA device is available .*cudaError"):
            query()
    device.restore(-1)  # nothing to restore: a no-op


@pytest.mark.parametrize("cc", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_other_architectures_are_refused_before_the_kernel(
    monkeypatch: pytest.MonkeyPatch, cc: tuple[int, int]
) -> None:
    # Pretend cuda:0 is a GPU of another architecture (the cached answer of the capability query).
    monkeypatch.setitem(device._properties, 0, device.DeviceProperties(cc, 132, 32))
    with pytest.raises(UnsupportedDeviceError, match=rf"SM90 .*cuda:0 has compute capability {cc[0]}\.{cc[1]}"):
        gdn.gdn_prefill(**gdn_args())


def test_on_sm90_the_workspace_size_is_checked_then_the_device_is_made_current(
    monkeypatch: pytest.MonkeyPatch, kernel_modules: object
) -> None:
    # Pretend cuda:0 is an H100 (cached answers); making it current then fails for want of a driver.
    monkeypatch.setitem(device._properties, 0, device.DeviceProperties((9, 0), 132, 32))
    assert gdn.gdn_workspace_size(0) == 132 * 128
    with pytest.raises(ValueError, match=r"workspace: expected at least 16896 bytes .*got 16895"):
        gdn.gdn_prefill(**gdn_args(workspace=fake_cuda((132 * 128 - 1,), "uint8")))
    with pytest.raises(UnsupportedDeviceError, match=r"no CUDA device is available \(cudaGetDevice failed"):
        gdn.gdn_prefill(**gdn_args())


# ---- our checks: every rule, each bad argument named, nothing crosses the FFI ----


def test_cu_seqlens_must_be_int64() -> None:
    for dtype in ("int32", "uint32", "int8"):
        with pytest.raises(TypeError, match=rf"cu_seqlens: expected dtype int64 .*got {dtype}"):
            call_unchecked(gdn_args(cu_seqlens=fake_cuda((3,), dtype)))


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(q=fake_cuda((10, 2, D, 1))), ValueError, r"q: expected a 3-D tensor"),
        (dict(q=fake_cuda((10, 2, D), "float32")), TypeError, r"q: expected dtype float16, bfloat16, got float32"),
        (dict(q=fake_cuda((10, 2, D), device="cpu")), ValueError, r"q: expected a CUDA device tensor"),
        (dict(q=fake_cuda((10, 2, D), strides=(4 * D, D, 1))), ValueError, r"q: expected a contiguous tensor"),
        (
            dict(q=fake_cuda((10, 2, D), align=2).view((10, 2, D), offset=1)),
            ValueError,
            r"q: data pointer .* must be aligned to 16 bytes",
        ),
        (
            dict(q=fake_cuda((10, 2, 64)), k=fake_cuda((10, 2, 64)), v=fake_cuda((10, 4, 64))),
            ValueError,
            r"q: the kernel supports head_dim 128 only",
        ),
        (
            dict(q=fake_cuda((0, 2, D)), k=fake_cuda((0, 2, D)), v=fake_cuda((0, 4, D))),
            ValueError,
            r"q: expected at least one packed token",
        ),
        (dict(k=fake_cuda((10, 2, D), "bfloat16")), TypeError, r"k: expected dtype float16 \(same as q\)"),
        (dict(k=fake_cuda((10, 2, D), device=1)), ValueError, r"k: expected a tensor on cuda:0 \(same as q\)"),
        (dict(k=fake_cuda((9, 2, D))), ValueError, r"k: expected \[10, Hk, 128\]"),
        (dict(v=fake_cuda((10, 4, D), "bfloat16")), TypeError, r"v: expected dtype float16 \(same as q\)"),
        (dict(v=fake_cuda((11, 4, D))), ValueError, r"v: expected \[10, Hv, 128\]"),
        (dict(v=fake_cuda((10, 4, D), strides=(8 * D, 2 * D, 1))), ValueError, r"v: expected a contiguous tensor"),
        (dict(cu_seqlens=fake_cuda((1,), "int64")), ValueError, r"cu_seqlens: expected \[N \+ 1\] offsets with N >= 1"),
        (dict(cu_seqlens=fake_cuda((3, 1), "int64")), ValueError, r"cu_seqlens: expected a 1-D tensor"),
        (
            dict(cu_seqlens=fake_cuda((3,), "int64", device="cpu")),
            ValueError,
            r"cu_seqlens: expected a tensor on cuda:0",
        ),
        (dict(output=fake_cuda((10, 2, D))), ValueError, r"output: expected shape \(10, 4, 128\)"),
        (dict(output=fake_cuda((10, 4, D), "bfloat16")), TypeError, r"output: expected dtype float16 \(same as q\)"),
        (
            dict(output=fake_cuda((10, 4, D), align=8).view((10, 4, D), offset=4)),
            ValueError,
            r"output: data pointer .* must be aligned to 16 bytes",
        ),
        (dict(output_state=fake_cuda((2, 4, D, D), "float16")), TypeError, r"output_state: expected dtype float32"),
        (
            dict(output_state=fake_cuda((3, 4, D, D), "float32")),
            ValueError,
            r"output_state: expected shape \(2, 4, 128, 128\)",
        ),
        (
            dict(output_state=fake_cuda((2, 4, D, D), "float32", strides=(4 * D * D, D * D, 1, D))),
            ValueError,
            r"output_state: expected a contiguous tensor",
        ),
        (dict(workspace=fake_cuda((132 * 128,), "int8")), TypeError, r"workspace: expected dtype uint8"),
        (dict(workspace=fake_cuda((132, 128), "uint8")), ValueError, r"workspace: expected a 1-D tensor"),
        (
            dict(workspace=fake_cuda((132 * 128,), "uint8").view((132 * 128,), offset=16)),
            ValueError,
            r"workspace: data pointer .* must be aligned to 64 bytes",
        ),
        (dict(workspace=fake_cuda((132 * 128,), "uint8", device=1)), ValueError, r"workspace: expected a tensor on"),
    ],
)
def test_bad_arguments_are_named(change: dict, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        call_unchecked(gdn_args(**change))
    if "data pointer" in pattern:
        # pointer rules are tested after the op's check, which asks the device (none here) for its architecture
        with pytest.raises((exc, UnsupportedDeviceError)):
            gdn.gdn_prefill(**gdn_args(**change))
        return
    with pytest.raises(exc, match=pattern):  # the public op validates layouts before anything that needs a GPU
        gdn.gdn_prefill(**gdn_args(**change))


@pytest.mark.parametrize(
    "name,bad,exc,pattern",
    [
        ("initial_state", fake_cuda((2, 4, D, D), "float16"), TypeError, r"initial_state: expected dtype float32"),
        ("initial_state", fake_cuda((2, 2, D, D), "float32"), ValueError, r"initial_state: expected shape \(2, 4, 128"),
        (
            "initial_state",
            fake_cuda((2, 4, D, D), "float32", strides=(4 * D * D, D * D, 1, D)),
            ValueError,
            r"initial_state: expected a contiguous tensor",
        ),
        (
            "initial_state",
            fake_cuda((2, 4, D, D), "float32", device="cpu"),
            ValueError,
            r"initial_state: expected a tensor on cuda:0",
        ),
        ("g", fake_cuda((10, 2), "float32"), ValueError, r"g: expected shape \(10, 4\)"),
        ("g", fake_cuda((10, 4), "float16"), TypeError, r"g: expected dtype float32"),
        ("g", fake_cuda((10, 4), "float32", strides=(1, 10)), ValueError, r"g: expected a contiguous"),
        ("beta", fake_cuda((4, 10), "float32"), ValueError, r"beta: expected shape \(10, 4\)"),
        ("beta", fake_cuda((10, 4), "bfloat16"), TypeError, r"beta: expected dtype float32"),
        ("beta", fake_cuda((10, 4), "float32", device=1), ValueError, r"beta: expected a tensor on cuda:0"),
    ],
)
def test_bad_optional_inputs_are_named(name: str, bad: Tensor, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        call_unchecked(gdn_args(), **{name: bad})


@pytest.mark.parametrize(
    "heads",
    [(4, 2, 1), (6, 4, 4), (2, 1, 4), (2, 2, 5), (3, 3, 4), (0, 1, 1)],
    ids=["gqa-hk!=hv", "gqa-not-multiple", "gva-hk!=hq", "gva-not-multiple", "gva-not-multiple-2", "no-q-heads"],
)
def test_head_layout_must_be_gqa_or_gva(heads: tuple[int, int, int]) -> None:
    hq, hk, hv = heads
    with pytest.raises(ValueError, match=r"k, v: with Hq|k, v: with Hv|q, k, v: expected at least one head"):
        call_unchecked(gdn_args(hq=hq, hk=hk, hv=hv))


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf"), "0.1", True])
def test_scale_must_be_finite_and_positive(kernel_modules: object, scale: object) -> None:
    with pytest.raises((ValueError, TypeError), match="scale"):
        call_unchecked(gdn_args(), scale=scale)


def test_bad_stream_is_named() -> None:
    with pytest.raises(TypeError, match="stream"):
        call_unchecked(gdn_args(), stream="default")


def test_validation_memo_does_not_hide_a_changed_argument(kernel_modules: object) -> None:
    args = gdn_args()
    for _ in range(2):  # validated once, then remembered
        with pytest.raises((KernelError, UnsupportedDeviceError)):
            call_unchecked(args)
    with pytest.raises(TypeError, match="cu_seqlens: expected dtype int64"):
        call_unchecked({**args, "cu_seqlens": fake_cuda((3,), "int32")})
    with pytest.raises(ValueError, match="g: expected shape"):
        call_unchecked(args, g=fake_cuda((9, 4), "float32"))
    with pytest.raises((KernelError, UnsupportedDeviceError)):
        call_unchecked(args)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    small=st.sampled_from([1, 2, 4, 8, 16]),
    ratio=st.sampled_from([1, 2, 3, 4, 8]),
    gva=st.booleans(),
    s=st.integers(1, 2000),
    n=st.integers(1, 64),
    dtype=st.sampled_from(["float16", "bfloat16"]),
    gates=st.booleans(),
)
def test_any_gqa_or_gva_layout_reaches_the_launcher(
    kernel_modules: object, small: int, ratio: int, gva: bool, s: int, n: int, dtype: str, gates: bool
) -> None:
    hq, hk, hv = (small, small, small * ratio) if gva else (small * ratio, small, small)
    hs = max(hq, hv)
    args = gdn_args(s=s, n=n, hq=hq, hk=hk, hv=hv, dtype=dtype)
    extra = optional(s=s, n=n, hs=hs) if gates else {}
    with pytest.raises((KernelError, UnsupportedDeviceError)) as info:
        call_unchecked(args, **extra)
    assert_reached_the_launcher(info.value)


@settings(max_examples=40, deadline=None)
@given(hq=st.integers(1, 12), hk=st.integers(1, 12), hv=st.integers(1, 12))
def test_head_layout_rule_matches_the_kernels(hq: int, hk: int, hv: int) -> None:
    valid = (hk == hv and hq % hv == 0) if hq >= hv else (hk == hq and hv % hq == 0)
    args = gdn_args(hq=hq, hk=hk, hv=hv, cu_seqlens=fake_cuda((3,), "int32"))  # stop just after the head rule
    with pytest.raises(
        TypeError if valid else ValueError, match="cu_seqlens: expected dtype int64" if valid else "k, v: with"
    ):
        call_unchecked(args)


# ---- the launcher: remembered by layout, any producer, pointers checked on every call ----


class HostCAI:
    """A CUDA-array-interface producer over host memory (taken as cuda:0 on a machine without a driver);
    unhashable, like CuPy arrays."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, shape: tuple[int, ...], typestr: str) -> None:
        self.host = np.zeros(int(np.prod(shape)) * 8 + 64, dtype=np.uint8)  # its own memory: outputs must not overlap
        ptr = (self.host.ctypes.data + 63) // 64 * 64
        self.__cuda_array_interface__ = dict(shape=shape, typestr=typestr, data=(ptr, False), strides=None, version=3)

    def __eq__(self, other: object) -> bool:
        return self is other


def test_unhashable_producers_reach_the_launcher(kernel_modules: object) -> None:
    args = dict(
        q=HostCAI((10, 2, D), "<f2"),
        k=HostCAI((10, 2, D), "<f2"),
        v=HostCAI((10, 4, D), "<f2"),
        cu_seqlens=HostCAI((3,), "<i8"),
        output=HostCAI((10, 4, D), "<f2"),
        output_state=HostCAI((2, 4, D, D), "<f4"),
        workspace=HostCAI((132 * 128,), "|u1"),
    )
    with pytest.raises((KernelError, UnsupportedDeviceError)) as info:
        call_unchecked(args, g=HostCAI((10, 4), "<f4"))
    kerr = assert_reached_the_launcher(info.value)
    assert kerr.arguments[7] == "DLTensor*(float32[10, 4] cuda:0)"


def test_new_buffers_of_a_seen_layout_stay_on_the_fast_path(kernel_modules: object) -> None:
    launcher = gdn._launch.launcher
    shared = gdn_args(s=37, n=3)
    with pytest.raises((KernelError, UnsupportedDeviceError)):
        call_unchecked(shared)
    before = launcher.slow_calls
    for _ in range(8):  # other outputs and states at every call, same layouts (a layer loop)
        args = {**shared, "output": fake_cuda((37, 4, D)), "output_state": fake_cuda((3, 4, D, D), "float32")}
        with pytest.raises((KernelError, UnsupportedDeviceError)) as info:
            call_unchecked(args, scale=0.5)
        assert_reached_the_launcher(info.value)
    assert launcher.slow_calls == before + 1  # only the first call with scale=0.5 (a new scalar) was validated


@pytest.mark.parametrize(
    "name,dtype,shape,offset,align",
    [
        ("cu_seqlens", "int64", (3,), 4, 8),
        ("g", "float32", (10, 4), 2, 4),
        ("beta", "float32", (10, 4), 1, 4),
        ("initial_state", "float32", (2, 4, D, D), 8, 16),
        ("output_state", "float32", (2, 4, D, D), 4, 16),
        ("workspace", "uint8", (132 * 128,), 32, 64),
    ],
)
def test_misaligned_pointers_are_refused(
    kernel_modules: object, name: str, dtype: str, shape: tuple[int, ...], offset: int, align: int
) -> None:
    good = fake_cuda(shape, dtype)
    bad = Tensor.from_pointer(good.data_ptr + offset, shape, dtype, 0, owner=good)
    args = gdn_args()

    def call(t: Tensor) -> None:
        if name in ("g", "beta", "initial_state"):
            call_unchecked(args, **{name: t})
        else:
            call_unchecked({**args, name: t})

    with pytest.raises((KernelError, UnsupportedDeviceError)):  # the aligned layout passes and is remembered
        call(good)
    with pytest.raises(
        ValueError,
        match=rf"{name}: data pointer 0x[0-9a-f]+ must be "
        rf"(aligned to {align} bytes|{align}-byte aligned)",
    ):
        call(bad)


@pytest.mark.parametrize(
    "device_id,exc",
    [(2**70, ValueError), (2**31, ValueError), (-1, ValueError), (1.0, TypeError), ("0", TypeError), (True, TypeError)],
)
def test_bad_device_ordinals_are_named(device_id: object, exc: type) -> None:
    with pytest.raises(exc, match="device_id"):
        gdn.gdn_workspace_size(device_id)  # type: ignore[arg-type]
    for query in (device.sm_count, device.compute_capability, device.set_device, device.make_current):
        with pytest.raises(exc, match="device_id"):
            query(device_id)  # type: ignore[arg-type]


def test_bad_streams_are_named_before_the_kernel() -> None:
    for stream in ("default", 1.5, -1, 2**64):
        with pytest.raises((TypeError, ValueError), match="stream"):
            call_unchecked(gdn_args(), stream=stream)
        with pytest.raises((TypeError, ValueError), match="stream"):  # before the missing device is refused
            gdn.gdn_prefill(stream=stream, **gdn_args())


def test_a_lock_without_the_gdn_module_says_which_releases_have_it(
    kernel_modules: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only FlashInfer 0.7.2 pinned: it no longer ships gdn_prefill_sm90.
    from fi_ffi import loader
    from fi_ffi.launch import kernels
    from fi_ffi.launch.launcher import compile_launcher

    found = sorted((REPO.parent / "shared" / "wheels-072").glob("flashinfer_jit_cache_072-*.whl"))
    if not found:
        pytest.skip(f"the 0.7.2 test wheel is not present (<repo>/../shared/wheels-072); {WHEELS_HINT}")
    lock = tmp_path / "072-only.lock"
    lock.write_text(loader.dump_lock([loader.lock_entry(found[0])]))
    monkeypatch.setenv("FI_FFI_LOCK", str(lock))
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(found[0].parent))
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    monkeypatch.setattr(kernels, "_bound", {})  # nothing bound under the test wheels' lock
    monkeypatch.setattr(gdn, "_launch", compile_launcher(gdn.GDN_PREFILL, gdn._URI, gdn._check))
    with pytest.raises(KernelNotFoundError) as info:
        call_unchecked(gdn_args())
    text = str(info.value)
    assert "gdn_prefill_sm90" in text
    assert "FlashInfer <= 0.6.13" in text and "pin a 0.6.x jit-cache wheel" in text


# ---- one device per process (FlashInfer 0.6.3's gdn_prefill_sm90 runs only on the first device it ran on) ----

ONE_DEVICE = r"q is on cuda:{}, but this process already ran gdn_prefill on cuda:{}; .*runs only on the first CUDA"


def on_device(ordinal: int) -> dict[str, object]:
    """A valid call's arguments with every tensor on cuda:``ordinal``."""
    return {name: fake_cuda(t.shape, t.dtype, device=ordinal) for name, t in gdn_args().items()}  # type: ignore[union-attr]


def test_another_device_than_the_bound_one_is_refused_before_anything_needs_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This process "already ran" GDN on cuda:0 (a CPU machine cannot launch it, so the binding is set here).
    monkeypatch.setattr(gdn, "_bound_device", 0)
    for call in (lambda a: gdn.gdn_prefill(**a), call_unchecked):
        with pytest.raises(UnsupportedDeviceError, match=ONE_DEVICE.format(1, 0)) as info:
            call(on_device(1))
        assert "one process per device" in str(info.value)
    # the bound device passes the rule and goes on to what needs a GPU (there is none here)
    with pytest.raises(UnsupportedDeviceError, match="no CUDA device is available"):
        gdn.gdn_prefill(**on_device(0))
    monkeypatch.setattr(gdn, "_bound_device", 3)
    with pytest.raises(UnsupportedDeviceError, match=ONE_DEVICE.format(0, 3)):
        gdn.gdn_prefill(**on_device(0))
    # a q that is not on a CUDA device is named by the argument checks, not by the rule
    with pytest.raises(ValueError, match="q: expected a CUDA device tensor"):
        call_unchecked(gdn_args(q=fake_cuda((10, 2, D), device="cpu")))
    with pytest.raises(TypeError, match="q: expected a tensor, got None"):
        gdn.gdn_prefill(**gdn_args(q=None))


def test_a_call_that_does_not_reach_the_kernel_binds_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # (Binding by a launch needs a GPU: tests/ops/test_gpu_gdn.py runs first calls on cuda:1, and on both at once.)
    monkeypatch.setattr(gdn, "_bound_device", None)
    with pytest.raises(ValueError, match="k: expected"):  # refused by our checks
        call_unchecked({**on_device(1), "k": fake_cuda((9, 2, D), device=1)})
    with pytest.raises(UnsupportedDeviceError, match="no CUDA device is available"):  # no device to make current
        gdn.gdn_prefill(**on_device(1))
    assert gdn._bound_device is None
    # so the next first call may be on any device
    with pytest.raises(UnsupportedDeviceError, match="no CUDA device is available"):
        gdn.gdn_prefill(**on_device(0))
    assert gdn._bound_device is None

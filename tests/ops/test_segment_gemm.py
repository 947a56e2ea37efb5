"""Grouped (segment) GEMM on the CPU machine: the host-computed argument arrays (uneven, empty and re-indexed
segments), their packing into the workspace layout, both declarations packed into the real ``gemm_sm90`` and
``gemm`` modules of the model-family test wheel (``gemm`` loads only with cuBLAS: the ``nvidia-cublas`` wheel),
and every bad argument refused before anything is staged or launched, naming the argument."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers.fake_driver import FakeDriver, install
from helpers.fakes import assert_reached_the_kernel, fake_cuda

import fi_ffi
from fi_ffi.errors import CudaError, KernelError, LibraryLoadError, UnsupportedDeviceError
from fi_ffi.ops import segment_gemm as G
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only


def workspace(int_bytes: int = 1 << 12) -> fi_ffi.Workspace:
    pinned = np.zeros(int_bytes, np.uint8)
    return fi_ffi.Workspace.from_buffers(
        fake_cuda((1 << 12,), "uint8"),
        fake_cuda((int_bytes,), "uint8"),
        Tensor.from_pointer(pinned.ctypes.data, (int_bytes,), "uint8", "cpu", owner=pinned),
    )


def test_arguments_of_uneven_and_empty_segments() -> None:
    indptr = np.array([0, 3, 3, 10, 11, 11], np.int32)  # segments of 3, 0, 7, 1, 0 rows
    args = G.segment_gemm_args(indptr, None, 5, 64, 128, 0x1000, 0x100000, 0x200000, 2, 2, 2, True)
    assert args.count == 3
    assert args.segments.tolist() == [0, 2, 3]
    assert args.problems.tolist() == [[3, 128, 64], [7, 128, 64], [1, 128, 64]]
    assert args.x_ptr.tolist() == [0x1000, 0x1000 + 3 * 64 * 2, 0x1000 + 10 * 64 * 2]
    assert args.w_ptr.tolist() == [0x100000 + i * 64 * 128 * 2 for i in (0, 2, 3)]
    assert args.y_ptr.tolist() == [0x200000, 0x200000 + 3 * 128 * 2, 0x200000 + 10 * 128 * 2]
    assert args.x_ld.tolist() == [64] * 3 and args.w_ld.tolist() == [64] * 3 and args.y_ld.tolist() == [128] * 3


def test_arguments_with_weight_indices_fp8_and_row_major_weights() -> None:
    indptr = np.array([0, 2, 5], np.int32)
    args = G.segment_gemm_args(indptr, np.array([3, 0], np.int32), 4, 32, 16, 0, 0, 0, 1, 1, 2, False)
    assert args.w_ptr.tolist() == [3 * 32 * 16, 0]
    assert args.x_ptr.tolist() == [0, 2 * 32]  # FP8 x: one byte per element
    assert args.y_ptr.tolist() == [0, 2 * 16 * 2]  # bfloat16 out
    assert args.w_ld.tolist() == [16, 16]  # row-major [d_in, d_out]: leading dimension d_out


def test_a_weight_index_out_of_range_is_named() -> None:
    with pytest.raises(ValueError, match=r"weight_indices: segment 1 uses weight 4, outside \[0, 4\)"):
        G.segment_gemm_args(
            np.array([0, 1, 2], np.int32), np.array([0, 4], np.int32), 4, 16, 16, 0, 0, 0, 2, 2, 2, True
        )
    with pytest.raises(ValueError, match=r"batch_size: 3 segments but weights holds 2 matrices; without weight_indi"):
        G.segment_gemm_args(np.array([0, 1, 2, 3], np.int32), None, 2, 16, 16, 0, 0, 0, 2, 2, 2, True)
    # an empty segment keeps its number: segment 2 (empty) would still be weights[2]
    with pytest.raises(ValueError, match=r"batch_size: 3 segments but weights holds 2 matrices"):
        G.segment_gemm_args(np.array([0, 1, 2, 2], np.int32), None, 2, 16, 16, 0, 0, 0, 2, 2, 2, True)


def test_packing_aligns_every_array_to_16_bytes() -> None:
    args = G.segment_gemm_args(np.array([0, 1, 3, 6], np.int32), None, 3, 64, 64, 16, 32, 48, 2, 2, 2, True)
    data, offsets = args.pack()
    assert all(o % 16 == 0 for o in offsets.values())
    assert offsets["all_problems"] == 0 and offsets["x_ptr"] == 48  # 3 x 12 bytes, padded to 48
    problems = np.frombuffer(data[:36], np.int32).reshape(3, 3)
    assert problems.tolist() == args.problems.tolist()
    assert np.frombuffer(data[offsets["y_ld"] : offsets["y_ld"] + 24], np.int64).tolist() == [64, 64, 64]


def arrays(p: int = 3) -> list[Tensor]:
    return [fake_cuda((p, 3), "int32")] + [fake_cuda((p,), "int64") for _ in range(6)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8_e4m3fn"])
def test_the_sm90_declaration_reaches_its_kernel(kernel_modules: object, models_modules: object, dtype: str) -> None:
    x, y = fake_cuda((10, 64), dtype), fake_cuda((10, 128), "bfloat16")
    with pytest.raises(KernelError) as info:
        G._sm90(fake_cuda((1 << 20,), "uint8"), fake_cuda((1 << 10,), "uint8"), *arrays(), x, y, True)
    assert_reached_the_kernel(info.value)
    assert "gemm_sm90.cutlass_segment_gemm_sm90" in str(info.value)


def test_the_generic_declaration_reaches_its_kernel(kernel_modules: object, models_modules: object) -> None:
    x = fake_cuda((10, 64), "float16")
    try:
        with pytest.raises(KernelError) as info:
            G._sm80(fake_cuda((1 << 10,), "uint8"), *arrays(), x, False)
    except LibraryLoadError as exc:  # the module lists libcublas.so.13 / libcublasLt.so.13 as NEEDED
        assert "nvidia-cublas" in str(exc)
        pytest.skip(f"the gemm module needs cuBLAS (pip install 'nvidia-cublas>=13,<14'): {exc}")
    assert_reached_the_kernel(info.value)
    assert "gemm.cutlass_segment_gemm" in str(info.value)


def call_args(**change: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "workspace": workspace(),
        "x": fake_cuda((11, 64), "bfloat16"),
        "weights": fake_cuda((4, 128, 64), "bfloat16"),
        "batch_size": 5,
        "weight_column_major": True,
        "out": fake_cuda((11, 128), "bfloat16"),
        "seg_indptr": np.array([0, 3, 3, 10, 11, 11], np.int32),
        "weight_indices": [0, 1, 2, 3, 0],
        "backend": "sm90",
    }
    args.update(change)
    return args


@pytest.mark.parametrize("backend", ["sm90", "sm80"])
def test_a_valid_call_passes_every_check_and_stops_at_the_missing_driver(backend: str) -> None:
    # making the device current for the argument copy is the first thing that needs the GPU: everything before
    # it has been checked
    with pytest.raises(UnsupportedDeviceError, match="no CUDA device"):
        fi_ffi.segment_gemm(**call_args(backend=backend))


def test_seg_lens_work_like_seg_indptr() -> None:
    args = call_args(seg_indptr=None, seg_lens=[3, 0, 7, 1, 0])
    with pytest.raises(UnsupportedDeviceError, match="no CUDA device"):
        fi_ffi.segment_gemm(**args)


def test_all_empty_segments_launch_nothing() -> None:
    args = call_args(
        x=fake_cuda((0, 64), "bfloat16"), out=fake_cuda((0, 128), "bfloat16"), seg_indptr=[0, 0, 0, 0, 0, 0]
    )
    assert fi_ffi.segment_gemm(**args) is args["out"]


@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        ({"out": None}, TypeError, "out: required"),
        ({"workspace": object()}, TypeError, "workspace: expected a fi_ffi Workspace"),
        ({"batch_size": -1}, ValueError, "batch_size: expected an int >= 0"),
        ({"batch_size": 4}, ValueError, r"seg_indptr: expected 5 entries"),
        ({"seg_indptr": None}, TypeError, "seg_indptr: one of seg_lens and seg_indptr is required"),
        ({"seg_indptr": np.array([0, 3, 2, 10, 11, 11], np.int32)}, ValueError, "seg_indptr"),
        ({"seg_indptr": np.array([0, 3, 3, 10, 11, 11], np.int64)}, TypeError, "seg_indptr"),
        ({"seg_indptr": None, "seg_lens": [3, -1, 7, 1, 1]}, ValueError, "seg_lens: expected lengths >= 0"),
        ({"seg_indptr": None, "seg_lens": [3, 7]}, ValueError, r"seg_lens: expected 5 entries \(batch_size\)"),
        ({"weight_indices": [0, 1, 2, 3]}, ValueError, r"weight_indices: expected 5 entries"),
        ({"weight_indices": [0, 1, 9, 3, 0]}, ValueError, r"weight_indices: segment 2 uses weight 9"),
        ({"weight_indices": [0.5, 1, 2, 3, 0]}, TypeError, "weight_indices"),
        ({"x": fake_cuda((12, 64), "bfloat16")}, ValueError, r"x: expected 11 rows \(seg_indptr\[-1\]\)"),
        ({"x": fake_cuda((11, 64), "float32")}, TypeError, "x: expected dtype"),
        (
            {
                "x": fake_cuda((11, 64), "float8_e4m3fn"),
                "weights": fake_cuda((4, 128, 64), "float8_e4m3fn"),
                "backend": "sm80",
            },
            TypeError,
            "x: expected dtype float16, bfloat16",
        ),
        (
            {
                "x": fake_cuda((11, 64), "float8_e4m3fn"),
                "weights": fake_cuda((4, 64, 128), "float8_e4m3fn"),
                "weight_column_major": False,
            },
            ValueError,
            "weight_column_major: FP8 inputs need column-major",
        ),
        (
            {
                "x": fake_cuda((11, 64), "float8_e4m3fn"),
                "weights": fake_cuda((4, 128, 64), "float8_e4m3fn"),
                "out": fake_cuda((11, 128), "float8_e4m3fn"),
            },
            TypeError,
            "out: expected dtype float16, bfloat16",
        ),
        ({"weights": fake_cuda((4, 128, 64), "float16")}, TypeError, r"weights: expected dtype bfloat16 \(same as x\)"),
        ({"weights": fake_cuda((4, 128, 32), "bfloat16")}, ValueError, r"weights: expected d_in = 64"),
        ({"weights": fake_cuda((0, 128, 64), "bfloat16")}, ValueError, "weights: expected at least one weight"),
        ({"weights": fake_cuda((4, 128, 64, 1), "bfloat16")}, ValueError, "weights: expected a 3-D tensor"),
        (
            {"weights": fake_cuda((4, 64, 128), "bfloat16").view((4, 128, 64), strides=(8192, 1, 128))},
            ValueError,
            "weights: expected a contiguous tensor",
        ),
        ({"out": fake_cuda((11, 64), "bfloat16")}, ValueError, r"out: expected shape \(11, 128\)"),
        ({"out": fake_cuda((11, 128), "float16")}, TypeError, r"out: expected dtype bfloat16 \(same as x\)"),
        ({"out": fake_cuda((11, 128), "bfloat16", device=1)}, ValueError, "out: expected a tensor on cuda:0"),
        (
            {"x": fake_cuda((11, 60), "bfloat16"), "weights": fake_cuda((4, 128, 60), "bfloat16")},
            ValueError,
            r"x: d_in = 60 must be a positive multiple of 8 \(16 bytes of bfloat16\)",
        ),
        (
            {"weights": fake_cuda((4, 100, 64), "bfloat16"), "out": fake_cuda((11, 100), "bfloat16")},
            ValueError,
            "out: d_out = 100 must be a positive multiple of 8",
        ),
        (
            {"x": fake_cuda((12, 64), "bfloat16").view((11, 64), offset=4)},
            ValueError,
            "x: data pointer .* must be aligned to 16 bytes",
        ),
        ({"backend": "cutlass"}, ValueError, "backend: expected one of auto, sm90, sm80"),
        ({"weight_column_major": 2}, TypeError, "weight_column_major"),
        ({"workspace": workspace(64)}, ValueError, r"workspace: the argument arrays of 3 segments need \d+ bytes"),
    ],
)
def test_bad_inputs_are_named(change: dict[str, Any], exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        fi_ffi.segment_gemm(**call_args(**change))


def test_out_in_batch_size_place_is_named_with_the_order_and_the_fix() -> None:
    # segment_gemm(x, weights, out, ...): out lands in batch_size's place; the error says so, not that out is missing
    args = call_args()
    with pytest.raises(
        TypeError,
        match=r"^batch_size: expected an int, got Tensor \(a tensor\); segment_gemm's positional order is \(x, "
        r"weights, batch_size, weight_column_major, out, seg_lens, seg_indptr, weight_indices\): pass out= by keyword$",
    ):
        fi_ffi.segment_gemm(args["x"], args["weights"], args["out"], True, workspace=args["workspace"])


@pytest.mark.parametrize("other", ["x", "weights"])
def test_out_must_not_overlap_x_or_the_weights(other: str) -> None:
    args = call_args()
    victim = args[other]
    args["out"] = Tensor.from_pointer(victim.data_ptr, (11, 128), "bfloat16", 0, owner=victim)
    with pytest.raises(ValueError, match=f"out: overlaps {other}"):
        fi_ffi.segment_gemm(**args)


# ------------------------------------------------------------------------------------------ prepared form


@pytest.mark.parametrize("segments", [1, 3, 5, 8, 128])
def test_args_bytes_is_the_packed_size(segments: int) -> None:
    indptr = np.arange(segments + 1, dtype=np.int32)
    args = G.segment_gemm_args(indptr, None, segments, 64, 64, 0, 0, 0, 2, 2, 2, True)
    assert len(args.pack()[0]) == G.segment_gemm_args_bytes(segments)


def test_prepare_checks_its_buffer_then_copies_once() -> None:
    args = call_args()
    del args["backend"]
    need = G.segment_gemm_args_bytes(3)  # 3 non-empty segments
    with pytest.raises(ValueError, match=rf"args_buffer: the argument arrays of 3 segments need {need} bytes"):
        G.prepare_segment_gemm(args_buffer=fake_cuda((need - 16,), "uint8"), backend="sm90", **args)
    with pytest.raises(TypeError, match="args_buffer: expected dtype uint8"):
        G.prepare_segment_gemm(args_buffer=fake_cuda((need,), "int32"), backend="sm90", **args)
    with pytest.raises(ValueError, match="args_buffer: data pointer .* aligned to 16"):
        G.prepare_segment_gemm(args_buffer=fake_cuda((need + 16,), "uint8").view((need,), offset=8), **args)
    x = args["x"]
    overlapping = Tensor.from_pointer(x.data_ptr, (need,), "uint8", 0, owner=x)
    with pytest.raises(ValueError, match="args_buffer: overlaps x"):
        G.prepare_segment_gemm(args_buffer=overlapping, backend="sm90", **args)
    # a valid call stops only at the copy, which needs the driver (none here)
    with pytest.raises(CudaError, match="cuMemcpyHtoD"):
        G.prepare_segment_gemm(args_buffer=fake_cuda((need,), "uint8"), backend="sm90", **args)


def test_a_prepared_call_of_empty_segments_copies_and_launches_nothing() -> None:
    args = call_args(x=fake_cuda((0, 64), "bfloat16"), out=fake_cuda((0, 128), "bfloat16"), seg_indptr=[0] * 6)
    prepared = G.prepare_segment_gemm(args_buffer=fake_cuda((16,), "uint8"), **args)
    assert prepared.count == 0
    assert prepared.problem_sizes.shape == (0, 3) and prepared.problem_sizes.dtype.name == "int32"
    assert prepared.prepared_rows.shape == (0,) and prepared.segments.shape == (0,)
    prepared()  # nothing to launch


# ----------------------------------------------------------------------------------------------------- pointers

TOP = 1 << 64


def _at(t: Tensor, address: int) -> Tensor:
    """``t``'s layout at ``address`` (never read: the call must be refused before anything is staged)."""
    return Tensor.from_pointer(address, t.shape, t.dtype.name, 0)


def _pointer_cases() -> list[Any]:
    """(argument, new address as a function of the valid tensor, the error): NULL, misaligned, a range that wraps
    past 2**64, an address at 2**63 or above whose range wraps, and out over x / the weights."""
    cases = []
    for name in ("x", "weights", "out"):
        cases.append(pytest.param(name, lambda t: 0, rf"^{name}: data pointer is NULL", id=f"{name}=NULL"))
        for shift in (2, 8):
            cases.append(
                pytest.param(
                    name,
                    lambda t, s=shift: t.data_ptr + s,
                    rf"^{name}: data pointer 0x[0-9a-f]+ must be aligned to 16",
                    id=f"{name}+{shift}",
                )
            )
        cases.append(
            pytest.param(
                name,
                lambda t: TOP - 256,
                rf"^{name}: the memory range 0x[0-9a-f]+ \+ \d+ bytes wraps past the end",
                id=f"{name} wraps past 2**64",
            )
        )
    cases.append(pytest.param("out", "x", "^out: overlaps x", id="out over x"))
    cases.append(pytest.param("out", "weights", "^out: overlaps weights", id="out over weights"))
    return cases


def _bad(args: dict[str, Any], name: str, where: Any) -> dict[str, Any]:
    t = args[name]
    address = args[where].data_ptr if isinstance(where, str) else where(t)
    return {**args, name: _at(t, address)}


@pytest.mark.parametrize(("name", "where", "error"), _pointer_cases())
@pytest.mark.parametrize("backend", ["sm90", "sm80"])
def test_warm_then_bad_pointers_are_refused_on_every_call(name: str, where: Any, error: str, backend: str) -> None:
    """A valid call, then the same layout at a bad address: refused naming the argument (the pointers go into the
    device argument arrays, where no launcher check sees them), then a valid call passes again."""
    with pytest.raises(UnsupportedDeviceError, match="no CUDA device"):
        fi_ffi.segment_gemm(**call_args(backend=backend))
    with pytest.raises(ValueError, match=error):
        fi_ffi.segment_gemm(**_bad(call_args(backend=backend), name, where))
    with pytest.raises(UnsupportedDeviceError, match="no CUDA device"):
        fi_ffi.segment_gemm(**call_args(backend=backend))


@pytest.mark.parametrize(("name", "where", "error"), _pointer_cases())
def test_prepare_refuses_bad_pointers_after_a_valid_preparation(name: str, where: Any, error: str) -> None:
    need = G.segment_gemm_args_bytes(3)
    with pytest.raises(CudaError, match="cuMemcpyHtoD"):  # valid: stops only at the copy
        G.prepare_segment_gemm(args_buffer=fake_cuda((need,), "uint8"), **call_args())
    with pytest.raises(ValueError, match=error):
        G.prepare_segment_gemm(args_buffer=fake_cuda((need,), "uint8"), **_bad(call_args(), name, where))


@pytest.mark.parametrize(
    ("address", "error"),
    [
        (0, r"^args_buffer: data pointer is NULL"),
        (TOP - 64, r"^args_buffer: the memory range 0x[0-9a-f]+ \+ \d+ bytes wraps past the end"),
    ],
)
def test_prepare_refuses_a_null_or_wrapping_args_buffer(address: int, error: str) -> None:
    need = G.segment_gemm_args_bytes(3)
    with pytest.raises(ValueError, match=error):
        G.prepare_segment_gemm(args_buffer=Tensor.from_pointer(address, (need,), "uint8", 0), **call_args())


def test_prepare_keeps_args_buffer_apart_from_the_float_workspace() -> None:
    args = call_args()
    need = G.segment_gemm_args_bytes(3)
    scratch = args["workspace"].float_buffer
    over = Tensor.from_pointer(scratch.data_ptr, (need,), "uint8", 0)
    with pytest.raises(ValueError, match="^args_buffer: overlaps workspace.float_buffer"):
        G.prepare_segment_gemm(args_buffer=over, **args)


def test_addresses_at_or_above_2_63_keep_their_bits_and_a_wrap_is_named() -> None:
    high = (1 << 63) + 0x1000
    args = G.segment_gemm_args(np.array([0, 2, 5], np.int32), None, 2, 64, 64, high, high, high, 2, 2, 2, True)
    assert args.x_ptr.dtype == np.int64
    assert [int(v) for v in args.x_ptr.view(np.uint64)] == [high, high + 2 * 64 * 2]
    with pytest.raises(ValueError, match=r"^w_ptr: 0x[0-9a-f]+ \+ 8192 bytes wraps past the end of the address"):
        G.segment_gemm_args(np.array([0, 2, 5], np.int32), None, 2, 64, 64, 16, TOP - 4096, 16, 2, 2, 2, True)
    with pytest.raises(ValueError, match=r"^y_ptr: expected a device address below 2\*\*64"):
        G.segment_gemm_args(np.array([0, 2, 5], np.int32), None, 2, 64, 64, 16, 16, TOP, 2, 2, 2, True)
    with pytest.raises(TypeError, match="^x_ptr: expected an int"):
        G.segment_gemm_args(np.array([0, 2, 5], np.int32), None, 2, 64, 64, "16", 16, 16, 2, 2, 2, True)


# ------------------------------------------------------------------------------------ problems laid out by the caller


def strided_problems(**change: Any) -> G.SegmentGEMMArgs:
    """Two problems over column slices (the LoRA expand's parts): x rows 48 apart, out rows 256 apart."""
    fields: dict[str, Any] = {
        "problems": np.array([[10, 128, 16], [10, 64, 16]], np.int32),
        "x_ptr": np.array([0x10000, 0x10000 + 32], np.int64),
        "w_ptr": np.array([0x20000, 0x20000 + 256], np.int64),
        "y_ptr": np.array([0x30000, 0x30000 + 256], np.int64),
        "x_ld": np.array([48, 48], np.int64),
        "w_ld": np.array([192, 192], np.int64),
        "y_ld": np.array([256, 256], np.int64),
        "segments": np.array([0, 1], np.int64),
    }
    fields.update(change)
    return G.SegmentGEMMArgs(**fields)


def prepare_problems(args: G.SegmentGEMMArgs, **change: Any) -> G.PreparedSegmentGEMM:
    call: dict[str, Any] = {
        "x": fake_cuda((10, 48), "bfloat16"),
        "out": fake_cuda((10, 256), "bfloat16"),
        "weight_column_major": False,
        "workspace": workspace(),
        "args_buffer": fake_cuda((G.segment_gemm_args_bytes(len(args.segments)),), "uint8"),
        "backend": "sm90",
    }
    call.update(change)
    return G.prepare_segment_gemm_problems(args, **call)


def test_caller_laid_out_problems_pass_their_checks_and_stop_at_the_copy() -> None:
    with pytest.raises(CudaError, match="cuMemcpyHtoD"):
        prepare_problems(strided_problems())


def test_caller_laid_out_problems_without_the_copy_point_into_the_callers_buffer() -> None:
    # copy_args=False: no copy (so no driver needed), the arrays' descriptors at pack()'s offsets in args_buffer
    args = strided_problems()
    data, offsets = args.pack()
    buffer = fake_cuda((len(data) + 64,), "uint8").view((len(data),), offset=32)
    prepared = prepare_problems(args, args_buffer=buffer, copy_args=False)
    assert prepared.count == 2 and prepared.prepared_rows.tolist() == [10, 10]
    assert prepared.problem_sizes.data_ptr == buffer.data_ptr + offsets["all_problems"]
    assert prepared.problem_sizes.shape == (2, 3)
    with pytest.raises(TypeError, match="copy_args: expected a bool"):
        prepare_problems(args, copy_args="no")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"x_ptr": np.array([0x10000, 0x10000 + 8], np.int64)}, r"args\.x_ptr: problem 1 .*16-byte aligned address"),
        ({"w_ptr": np.array([0, 0x20000], np.int64)}, r"args\.w_ptr: problem 0 .*not NULL"),
        ({"y_ld": np.array([256, 260], np.int64)}, r"args\.y_ld: problem 1 .*multiple of 16 bytes"),
        ({"problems": np.array([[10, 128, 16], [10, 60, 16]], np.int32)}, r"args\.problems: problem 1 .*n a multiple"),
        ({"problems": np.array([[10, 128, 12], [10, 64, 16]], np.int32)}, r"args\.problems: problem 0 .*k a multiple"),
        ({"problems": np.array([[0, 128, 16], [10, 64, 16]], np.int32)}, r"args\.problems: problem 0 .*>= 1"),
        ({"x_ld": np.array([48], np.int64)}, r"args\.x_ld: expected an int64 array of 2 entries"),
        ({"y_ld": np.array([256, -256], np.int64)}, r"args\.y_ld: problem 1 .*y_ld >= n"),
        ({"w_ld": np.array([192, 56], np.int64)}, r"args\.w_ld: problem 1 .*w_ld >= k column-major, n row-major"),
        ({"problems": [[10, 128, 16], [10, 64, 16]]}, r"args\.problems: expected an int32 \[P, 3\] array"),
        ({"x_ld": np.array([48, 8], np.int64)}, r"args\.x_ld: problem 1 .*x_ld >= k"),
        ({"y_ptr": np.array([0x30000, 0], np.int64)}, r"args\.y_ptr: problem 1 .*not NULL"),
        ({"w_ptr": np.array([0x20000, -8], np.int64)}, r"args\.w_ptr: problem 1 .*16-byte aligned address"),
    ],
    ids=[
        "x misaligned",
        "w NULL",
        "y_ld odd",
        "n odd",
        "k odd",
        "m zero",
        "x_ld short",
        "y_ld negative",
        "w_ld under n",
        "problems a list",
        "x_ld under k",
        "y NULL",
        "w past 2**63 misaligned",
    ],
)
def test_a_problem_the_kernel_cannot_take_is_named(change: dict[str, Any], pattern: str) -> None:
    with pytest.raises((TypeError, ValueError), match=pattern):
        prepare_problems(strided_problems(**change))


def test_addresses_past_2_63_pass_where_aligned() -> None:
    # (int64 arrays hold such addresses negative; their alignment is the address's)
    high = np.array([-(1 << 20), -(1 << 20) + 256], np.int64)
    args = strided_problems(w_ptr=high)
    assert prepare_problems(args, copy_args=False).count == 2


@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 17])
def test_the_packed_layout_of_a_count_is_packs_own(count: int) -> None:
    # prepare_segment_gemm_problems(copy_args=False) points the arrays' descriptors at _packed_layout's offsets
    # without packing: they must be where pack() puts the arrays, and as many bytes
    rng = np.random.default_rng(count)
    ints = lambda: rng.integers(1, 1 << 40, count, dtype=np.int64)  # noqa: E731
    args = G.SegmentGEMMArgs(rng.integers(1, 1 << 20, (count, 3), dtype=np.int32), ints(), ints(), ints(), ints(),
                             ints(), ints(), np.arange(count, dtype=np.int64))  # fmt: skip
    data, offsets = args.pack()
    assert G._packed_layout(count) == (offsets, len(data))
    assert all(at % 16 == 0 for at in offsets.values())


def test_caller_laid_out_problems_refuse_other_arguments_by_name() -> None:
    with pytest.raises(TypeError, match="args: expected SegmentGEMMArgs"):
        G.prepare_segment_gemm_problems(
            {"problems": 1}, fake_cuda((1, 8)), fake_cuda((1, 8)), True, workspace=workspace(), args_buffer=None
        )
    with pytest.raises(TypeError, match="out: .*dtype"):
        prepare_problems(strided_problems(), out=fake_cuda((10, 256), "float32"))
    with pytest.raises(ValueError, match="args_buffer: the argument arrays of 2 problems need"):
        prepare_problems(strided_problems(), args_buffer=fake_cuda((16,), "uint8"))


def test_caller_laid_out_problems_refuse_other_devices_by_name() -> None:
    # the copy stages through the workspace's pinned buffer into args_buffer on x's stream: all on x's device
    on1 = np.zeros(1 << 12, np.uint8)
    ws1 = fi_ffi.Workspace.from_buffers(
        fake_cuda((1 << 12,), "uint8", device="cuda:1"),
        fake_cuda((1 << 12,), "uint8", device="cuda:1"),
        Tensor.from_pointer(on1.ctypes.data, (1 << 12,), "uint8", "cpu", owner=on1),
    )
    cases = [
        (
            {"x": Tensor.from_pointer(0x10000, (10, 48), "bfloat16", "cpu")},
            "x: expected a CUDA device tensor, got one on cpu",
        ),
        (
            {"out": fake_cuda((10, 256), "bfloat16", device="cuda:1")},
            r"out: expected a tensor on cuda:0 \(same as x\), got cuda:1",
        ),
        ({"workspace": ws1}, r"workspace: expected a workspace on cuda:0 \(same as x\), got one on cuda:1"),
        (
            {"args_buffer": fake_cuda((512,), "uint8", device="cuda:1")},
            r"args_buffer: expected a tensor on cuda:0 \(same as x\), got cuda:1",
        ),
    ]
    for change, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            prepare_problems(strided_problems(), copy_args=False, **change)


EVENT, STREAM = 0x1234, 0x77  # the workspace's copy event and the call's stream, as handles


def copy_driver(monkeypatch: pytest.MonkeyPatch, ws: fi_ffi.Workspace, **results: int) -> FakeDriver:
    """A copy that goes through: the driver stand-in (each call answers 0 unless ``results`` say else), ``ws``'s copy
    event a stand-in handle, and no device to make current (the CPU machine has none)."""
    from fi_ffi.cuda import device

    monkeypatch.setattr(device, "make_current", lambda device_id: -1)  # -1: nothing to restore
    ws._event, ws._event_handle = object(), EVENT  # as if a plan had created it (not destroyed: see the tests)
    calls = {"cuMemcpyHtoDAsync_v2": 0, "cuEventRecord": 0, "cuEventQuery": 0, "cuStreamSynchronize": 0}
    return install(monkeypatch, FakeDriver(**{**calls, **results}))


def test_prepare_copies_from_the_pinned_buffer_on_the_call_stream_and_waits_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a synchronous copy from pageable memory (it may return before the data lands, on the legacy stream that a
    non-blocking stream does not wait for): the page-locked buffer, an asynchronous copy on the call's stream, then
    a wait for that stream; the workspace's plans stay valid (its int buffer is not written)."""
    args = call_args(stream=STREAM)
    ws = args["workspace"]
    fake = copy_driver(monkeypatch, ws)
    buf = fake_cuda((G.segment_gemm_args_bytes(3),), "uint8")
    generation = ws._generation
    prepared = G.prepare_segment_gemm(args_buffer=buf, **args)
    size = G.segment_gemm_args_bytes(3)
    assert fake.calls == [
        ("cuMemcpyHtoDAsync_v2", buf.data_ptr, ws.pinned_buffer.data_ptr, size, STREAM),
        ("cuEventRecord", EVENT, STREAM),  # the next staging of the page-locked buffer waits for this copy
        ("cuStreamSynchronize", STREAM),
    ]
    (copied,) = fake.copied  # what the page-locked buffer held when the copy was enqueued: the arrays
    assert np.frombuffer(copied[:36], np.int32).reshape(3, 3).tolist() == [[3, 128, 64], [7, 128, 64], [1, 128, 64]]
    assert prepared.count == 3 and ws._generation == generation and not ws._lock.locked()
    ws._event = None


def test_prepared_arrays_larger_than_the_pinned_buffer_are_copied_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    ws = workspace(64)  # 64 page-locked bytes; two problems' arrays take 128
    fake = copy_driver(monkeypatch, ws)
    args = strided_problems()
    buf = fake_cuda((G.segment_gemm_args_bytes(2),), "uint8")
    prepare_problems(args, workspace=ws, args_buffer=buf, stream=STREAM)
    pinned = ws.pinned_buffer.data_ptr
    assert fake.calls == [
        ("cuMemcpyHtoDAsync_v2", buf.data_ptr, pinned, 64, STREAM),
        ("cuEventRecord", EVENT, STREAM),
        ("cuEventQuery", EVENT),  # the second chunk overwrites the page-locked buffer after the first copy read it
        ("cuMemcpyHtoDAsync_v2", buf.data_ptr + 64, pinned, 64, STREAM),
        ("cuEventRecord", EVENT, STREAM),
        ("cuStreamSynchronize", STREAM),
    ]
    assert b"".join(fake.copied) == args.pack()[0]
    ws._event = None


@pytest.mark.parametrize(
    ("failing", "what", "calls"),
    [
        ("cuMemcpyHtoDAsync_v2", r"^cuMemcpyHtoDAsync failed: CUresult 700", ["cuMemcpyHtoDAsync_v2"]),
        (
            "cuStreamSynchronize",
            r"^cuStreamSynchronize\(segment GEMM argument copy\) failed: CUresult 700",
            ["cuMemcpyHtoDAsync_v2", "cuEventRecord", "cuStreamSynchronize"],
        ),
    ],
)
def test_a_failed_copy_or_wait_is_a_cuda_error(
    monkeypatch: pytest.MonkeyPatch, failing: str, what: str, calls: list[str]
) -> None:
    ws = workspace()
    fake = copy_driver(monkeypatch, ws, **{failing: 700})
    with pytest.raises(CudaError, match=what) as info:
        prepare_problems(strided_problems(), workspace=ws, stream=STREAM)
    assert info.value.code == 700 and fake.names() == [*calls, "cuGetErrorName"]  # (the error's name, for the text)
    assert not ws._lock.locked()  # and a failed copy records no event: the next staging does not wait for it
    assert ws._event_pending == (failing != "cuMemcpyHtoDAsync_v2")
    ws._event = None


def test_caller_laid_out_problems_reach_the_sm90_kernel(
    kernel_modules: object, models_modules: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = workspace()
    fake = copy_driver(monkeypatch, ws)  # the copy of the arrays into args_buffer needs a driver: the stand-in
    args = strided_problems()
    prepared = prepare_problems(args, workspace=ws)
    assert fake.copied == [args.pack()[0]] and prepared.count == 2
    assert prepared.prepared_rows.tolist() == [10, 10]
    with pytest.raises(KernelError) as info:
        prepared()
    assert_reached_the_kernel(info.value)
    assert "gemm_sm90.cutlass_segment_gemm_sm90" in str(info.value)
    ws._event = None

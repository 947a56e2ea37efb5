"""FlashInfer's communication kernels on the CPU machine, against the real modules of ../shared/wheels-comm.

- every declaration of ``trtllm_comm`` and ``vllm_comm`` binds to the module's own signature (``vllm_comm``
  needs ``libcuda.so.1``: that test runs in a child process that loads ../shared/stubs/libcuda.so.1 first, so
  the stand-in never reaches this process);
- a valid fused all-reduce call crosses the FFI and stops at the module's first CUDA call (packing proven);
- workspace sizing, and every bad argument as a typed error naming it, before the FFI; alignment requirements
  are returned by the checks (never raised from a pointer value inside them) and enforced on every call.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers.comm_args import (
    H,
    T,
    cpu_communicator,
    custom_args,
    fake_cuda,
    fusion_args,
    moe_args,
    moe_reduction_args,
)
from helpers.env import REPO, subprocess_env
from helpers.wheels import COMM_MISSING, WHEELS_HINT, comm_wheel, use_lock

from fi_ffi.abi import wire
from fi_ffi.comm import trtllm_ar, vllm_ar
from fi_ffi.comm.trtllm_ar import (
    MAX_COMM_SIZE,
    WorkspaceMetadata,
    trtllm_allreduce_fusion,
    trtllm_moe_finalize_allreduce_fusion,
    workspace_metadata,
)
from fi_ffi.errors import KernelError
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only  # descriptors claim cuda:0 over host memory

STUB = REPO.parent / "shared" / "stubs" / "libcuda.so.1"


def _signatures() -> dict[str, str]:
    wheel = comm_wheel()
    if wheel is None:
        pytest.skip(COMM_MISSING)
    found = {}
    for line in (wheel.parent / "signatures-comm.txt").read_text().splitlines():
        parsed = [wire.parse_signature(line, d.entry) for _, d in (*trtllm_ar.DECLARATIONS, *vllm_ar.DECLARATIONS)]
        for sig in parsed:
            if sig is not None:
                found[sig.name] = sig.text
    return found


@pytest.mark.parametrize(
    "decl", [d for _, d in (*trtllm_ar.DECLARATIONS, *vllm_ar.DECLARATIONS) if d.params], ids=lambda d: d.entry
)
def test_declarations_match_the_printed_signatures(decl: wire.Declaration) -> None:
    assert _signatures()[decl.entry] == decl.signature


def test_trtllm_comm_binds_every_declaration(comm_lock: Path) -> None:
    from fi_ffi.launch.kernels import entry_point
    from fi_ffi.launch.launcher import bound_entry

    for uri, decl in trtllm_ar.DECLARATIONS:
        found = wire.parse_signature(entry_point(uri, decl.entry).signature_text(), decl.entry)
        assert wire.signature_mismatch(decl, found) == "", decl.entry
        bound_entry(uri, decl)


def test_a_declaration_of_another_argument_list_is_refused_by_name(comm_lock: Path) -> None:
    from fi_ffi.errors import LoaderError
    from fi_ffi.launch.launcher import bound_entry

    wrong = wire.declare("trtllm_lamport_initialize", [("buffer_ptr", wire.INT), ("size", wire.INT)])
    expected = r"'trtllm_comm', entry point 'trtllm_lamport_initialize'.*takes 3 arguments, the declaration 2"
    with pytest.raises(LoaderError, match=expected):
        bound_entry("trtllm_comm", wrong)


VLLM_CHILD = r"""
import sys
from fi_ffi.loader import dl
dl.open_library(sys.argv[1], dl.RTLD_NOW | dl.RTLD_GLOBAL)  # the stand-in libcuda.so.1, this process only
from fi_ffi.abi import wire
from fi_ffi.comm import vllm_ar
from fi_ffi.launch import kernels
from fi_ffi.launch.kernels import entry_point
from fi_ffi.launch.launcher import bound_entry
kernels._driver_found = True  # the stand-in is no driver: pass the ops' driver check, as the test session does
for uri, decl in vllm_ar.DECLARATIONS:
    if decl.params:
        found = wire.parse_signature(entry_point(uri, decl.entry).signature_text(), decl.entry)
        assert wire.signature_mismatch(decl, found) == "", (decl.entry, found)
        bound_entry(uri, decl)
print("meta_size", vllm_ar.meta_size())
"""


def test_vllm_comm_binds_every_declaration_with_the_libcuda_stand_in(comm_lock: Path) -> None:
    if not STUB.is_file():
        pytest.skip(f"needs ../shared/stubs/libcuda.so.1; {WHEELS_HINT}")
    done = subprocess.run(
        [sys.executable, "-c", VLLM_CHILD, str(STUB)], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["meta_size", "3456"]  # sizeof(vllm::Signal): 36 x 8 flags + 2 x 36 x 8


# ---- workspace sizing --------------------------------------------------------------------------------------------


def test_workspace_sizes_follow_the_kernels_layout() -> None:
    m = workspace_metadata(4, 128, 4096, "bfloat16")
    assert m == WorkspaceMetadata(4, 128, 4096, False)
    assert m.buffer_size == 4 * 128 * 4096 * 2
    assert m.flag_size == 4 * 256 * 4
    assert m.lamport_comm_size == 4 * 128 * 4096 * 2
    assert m.lamport_buffer_size == 3 * m.lamport_comm_size
    assert m.allocation_sizes() == (4 << 20, 2 << 20, 12 << 20)  # each rounded up to 2 MiB
    f32 = workspace_metadata(2, 16, 1024, "float32")
    assert f32.use_fp32_lamport and f32.lamport_comm_size == 2 * 16 * 1024 * 4


def test_the_lamport_slice_is_capped_at_the_kernels_int32_offsets() -> None:
    m = workspace_metadata(8, 1 << 16, 8192, "float16")
    assert m.lamport_comm_size == MAX_COMM_SIZE and MAX_COMM_SIZE % (1 << 21) == 0


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((3, 128, 4096, "bfloat16"), ValueError, "world_size: the fusion kernels run on 2, 4, 8 or 16 ranks, got 3"),
        ((2, 0, 4096, "bfloat16"), ValueError, "max_token_num: expected an int >= 1, got 0"),
        ((2, 128, 4100, "bfloat16"), ValueError, r"hidden_dim: expected a multiple of 8 \(16 bytes of bfloat16\)"),
        ((2, 128, 4098, "float32"), ValueError, r"hidden_dim: expected a multiple of 4"),
        ((2, 128, 4096, "int8"), TypeError, "dtype: expected float16, bfloat16 or float32, got int8"),
        ((2, 128.0, 4096, "float16"), TypeError, "max_token_num: expected an int, got float"),
        ((True, 128, 4096, "float16"), TypeError, "world_size: expected an int, got bool"),
    ],
)
def test_bad_workspace_arguments(args: tuple[Any, ...], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        workspace_metadata(*args)


# ---- trtllm_allreduce_fusion ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [0, 1, 2, 4])
def test_a_valid_fused_call_crosses_the_ffi(comm_lock: Path, pattern: int) -> None:
    with pytest.raises(KernelError) as info:
        trtllm_allreduce_fusion(**fusion_args(pattern))
    assert info.value.kind != "TypeError", info.value  # the module accepted the argument list
    assert "cuda" in info.value.message.lower() or "device" in info.value.message.lower(), info.value.message


BAD_FUSION = [
    ({"world_size": 4}, ValueError, "world_size: the workspace was made for 2 ranks, got 4"),
    ({"world_size": 3}, ValueError, "world_size: the fusion kernels run on 2, 4, 8 or 16 ranks"),
    ({"world_rank": 2}, ValueError, r"world_rank: expected 0 <= world_rank < 2, got 2"),
    ({"token_num": 8}, ValueError, r"token_num, hidden_dim: expected allreduce_in's 4096 elements"),
    ({"allreduce_in": fake_cuda((T, H), "float32")}, TypeError, "the workspace was made for float16/bfloat16 calls"),
    ({"allreduce_in": fake_cuda((T, H), "int32")}, TypeError, "allreduce_in"),
    (
        {
            "allreduce_in": fake_cuda((256, H)),
            "token_num": 256,
            "residual_in": fake_cuda((256, H)),
            "residual_out": fake_cuda((256, H)),
            "norm_out": fake_cuda((256, H)),
        },
        ValueError,
        r"allreduce_in: 256 x 256 elements exceed the workspace \(64 tokens x 256\)",
    ),
    (
        {"use_oneshot": False, "token_num": 2, "allreduce_in": fake_cuda((2, 2048)), "hidden_dim": 2048},
        ValueError,
        r"use_oneshot: the two-shot kernel needs more tokens \(2\) than ranks \(2\)",
    ),
    (
        {"workspace_ptrs": fake_cuda((4,), "int64")},
        ValueError,
        "workspace_ptrs: expected an int64 device array of at least 7",
    ),
    ({"workspace_ptrs": fake_cuda((7,), "int32")}, ValueError, "workspace_ptrs: expected an int64"),
    ({"metadata": None}, TypeError, "metadata: a raw workspace_ptrs tensor needs its WorkspaceMetadata"),
    ({"pattern_code": 3}, ValueError, r"pattern_code: 3 \(FP4 output\) is not supported by fi_ffi"),
    ({"pattern_code": 9}, ValueError, r"pattern_code: expected one of \[0, 1, 2, 4\]"),
    ({"residual_in": None}, ValueError, "residual_in: required by pattern kARResidualRMSNorm"),
    ({"rms_gamma": None}, ValueError, "rms_gamma: required by pattern kARResidualRMSNorm"),
    ({"rms_eps": None}, ValueError, r"rms_eps: expected a finite value > 0 with RMSNorm, got None"),
    ({"rms_eps": float("nan")}, ValueError, r"rms_eps: expected a finite value"),
    ({"rms_eps": "1e-6"}, TypeError, "rms_eps: expected a float, got str"),
    (
        {"quant_out": fake_cuda((T, H), "float8_e4m3fn")},
        ValueError,
        "quant_out: not used by pattern kARResidualRMSNorm",
    ),
    ({"norm_out": fake_cuda((T, H + 8))}, ValueError, "norm_out"),
    ({"residual_out": fake_cuda((T, H), "float16")}, TypeError, "residual_out: expected dtype bfloat16"),
    ({"rms_gamma": fake_cuda((H + 8,))}, ValueError, "rms_gamma"),
    ({"layout_code": 0}, ValueError, "layout_code: only FP4 outputs use it; pass None"),
    ({"scale_factor": 1.0}, TypeError, "scale_factor: pass a float32 device tensor of one element"),
    ({"fp32_acc": 2}, TypeError, "fp32_acc: expected a bool"),
    ({"hidden_dim": "256"}, TypeError, "hidden_dim: expected an int, got str"),
    ({"allreduce_in": np.zeros((T, H), np.float16)}, ValueError, "allreduce_in"),  # host memory
]


@pytest.mark.parametrize(("over", "error", "message"), BAD_FUSION, ids=[m[:40] for _, _, m in BAD_FUSION])
def test_every_bad_fusion_argument_is_a_typed_error_before_the_ffi(
    over: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        trtllm_allreduce_fusion(**fusion_args(**over))


@pytest.mark.parametrize(
    ("pattern", "missing"),
    [(0, "allreduce_out"), (2, "quant_out"), (2, "scale_factor"), (4, "norm_out")],
)
def test_each_pattern_names_what_it_needs(pattern: int, missing: str) -> None:
    with pytest.raises(ValueError, match=f"{missing}: required by pattern"):
        trtllm_allreduce_fusion(**fusion_args(pattern, **{missing: None}))


def test_fp8_scale_factor_must_be_one_float32() -> None:
    with pytest.raises(ValueError, match="scale_factor: expected one float32 element, got 2 of float32"):
        trtllm_allreduce_fusion(**fusion_args(2, scale_factor=fake_cuda((2,), "float32")))


def _namespace(args: dict[str, Any]) -> SimpleNamespace:
    from fi_ffi.launch.pointer_rules import without_address

    ns = {k: (without_address(v) if isinstance(v, Tensor) else v) for k, v in args.items() if k != "metadata"}
    ns["hidden_size"] = ns.pop("hidden_dim")
    return SimpleNamespace(**ns, context=args["metadata"])


def test_the_check_returns_alignments_and_never_reads_pointer_values() -> None:
    args = fusion_args(0, allreduce_in=fake_cuda((T, H), offset=2), allreduce_out=fake_cuda((T, H), offset=8))
    found = trtllm_ar._check_fusion(_namespace(args))  # misaligned pointers: the check itself does not object
    assert found.alignment == {"allreduce_in": 16, "allreduce_out": 16}
    assert ("allreduce_out", "allreduce_in", False) in found.apart


@pytest.mark.parametrize("name", ["allreduce_in", "residual_in", "norm_out", "rms_gamma"])
def test_misaligned_pointers_are_refused_by_the_launcher(name: str) -> None:
    shape = (H,) if name == "rms_gamma" else (T, H)
    with pytest.raises(ValueError, match=rf"{name}: data pointer 0x[0-9a-f]+ must be aligned to 16 bytes"):
        trtllm_allreduce_fusion(**fusion_args(**{name: fake_cuda(shape, offset=2)}))


# ---- MoE finalize --------------------------------------------------------------------------------------------------


BAD_MOE = [
    ({"residual_in": fake_cuda((T, H), "float32"), "norm_out": fake_cuda((T, H), "float32")}, TypeError, "residual_in"),
    ({"allreduce_in": fake_cuda((T, H + 8))}, ValueError, r"allreduce_in: expected hidden_dim 256"),
    (
        {"expanded_idx_to_permuted_idx": fake_cuda((T, 2), "int64")},
        ValueError,
        "expanded_idx_to_permuted_idx: expected int32",
    ),
    ({"expanded_idx_to_permuted_idx": fake_cuda((T + 1, 2), "int32")}, ValueError, r"token_num=16"),
    ({"expert_scale_factor": fake_cuda((T, 3))}, ValueError, "expert_scale_factor"),
    ({"world_size": 4}, ValueError, "world_size, world_rank: the workspace is for 2 ranks"),
    ({"eps": 0.0}, ValueError, "eps: expected a finite value > 0"),
    ({"metadata": WorkspaceMetadata(2, 4, 256, False)}, ValueError, r"residual_in: 16 x 256 exceed the workspace"),
    ({"metadata": WorkspaceMetadata(2, 64, 256, True)}, TypeError, "made for float32 calls"),
]


@pytest.mark.parametrize(("over", "error", "message"), BAD_MOE, ids=[m[:40] for _, _, m in BAD_MOE])
def test_every_bad_moe_finalize_argument_is_a_typed_error(over: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        trtllm_moe_finalize_allreduce_fusion(**moe_args(**over))


# ---- vllm_comm arguments (checked before anything is bound) ---------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: vllm_ar.init_custom_ar([1, 2, 3], fake_cuda((64,), "uint8"), 0, True),
            ValueError,
            "2, 4, 6 or 8 ranks; got 3",
        ),
        (
            lambda: vllm_ar.init_custom_ar([1, 2], fake_cuda((64,), "uint8"), 2, True),
            ValueError,
            r"rank: expected 0 <= rank < 2",
        ),
        (
            lambda: vllm_ar.init_custom_ar([1, 0], fake_cuda((64,), "uint8"), 0, True),
            ValueError,
            r"ipc_tensors\[1\]: expected a non-NULL",
        ),
        (
            lambda: vllm_ar.init_custom_ar([1, 2, 3, 4], fake_cuda((64,), "uint8"), 0, False),
            ValueError,
            "full_nvlink: the kernels reduce nothing with 4 ranks",
        ),
        (
            lambda: vllm_ar.init_custom_ar([1, 2], fake_cuda((32,), "uint8"), 0, True),
            ValueError,
            "rank_data: expected at least 64 bytes",
        ),
        (
            lambda: vllm_ar.init_custom_ar([1, 2], fake_cuda((64,), "float16"), 0, True),
            ValueError,
            "rank_data: expected at least 64 bytes as uint8",
        ),
        (
            lambda: vllm_ar.init_custom_ar([1, 2], fake_cuda((64,), "uint8", offset=8), 0, True),
            ValueError,
            "rank_data: data pointer 0x[0-9a-f]+ must be aligned to 16",
        ),
        (
            lambda: vllm_ar.init_custom_ar("12", fake_cuda((64,), "uint8"), 0, True),
            TypeError,
            "ipc_tensors: expected a list of device pointers",
        ),
        (lambda: vllm_ar.register_buffer(0, [1, 2]), ValueError, "fa: the all-reduce handle is 0"),
        (lambda: vllm_ar.register_buffer(5, [1, 2.0]), TypeError, r"fake_ipc_ptrs\[1\]: expected an int, got float"),
        (lambda: vllm_ar.dispose(0), ValueError, "fa: the all-reduce handle is 0"),
        (lambda: vllm_ar.register_buffer(np.arange(2), [1, 2]), TypeError, "fa: expected an int, got ndarray"),
        (lambda: vllm_ar.register_buffer(5, [1, np.arange(2)]), TypeError, r"fake_ipc_ptrs\[1\]: expected an int"),
        (
            lambda: vllm_ar.register_graph_buffers(5, [[0] * 64], [[0], [0]]),
            ValueError,
            r"offsets: expected one list per rank \(1",
        ),
        (
            lambda: vllm_ar.register_graph_buffers(5, [[0] * 64, [0] * 63], [[0], [0]]),
            ValueError,
            "captured the same number",
        ),
    ],
)
def test_bad_vllm_setup_arguments(call: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    ("over", "error", "message"),
    [
        (
            {"inp": fake_cuda((1004,), "float16"), "out": fake_cuda((1004,), "float16")},
            ValueError,
            r"multiple of 8 \(16 bytes of float16\)",
        ),
        ({"out": fake_cuda((1024,), "float32")}, TypeError, "out: expected dtype bfloat16"),
        ({"out": fake_cuda((2048,))}, ValueError, r"out: expected 1024 elements \(as inp\)"),
        ({"num_ctas": 37}, ValueError, "num_ctas: expected 1..36, got 37"),
        ({"num_ctas": 0}, ValueError, "num_ctas: expected 1..36, got 0"),
        ({"reg_buffer_sz_bytes": 1000}, ValueError, r"inp: 2048 bytes do not fit the registered buffer \(1000 bytes\)"),
        ({"fa": 0}, ValueError, "fa: the all-reduce handle is 0"),
        ({"inp": fake_cuda((1024,), "int32"), "out": fake_cuda((1024,), "int32")}, TypeError, "inp"),
        (
            {"inp": fake_cuda((1024,), offset=4)},
            ValueError,
            "inp: data pointer 0x[0-9a-f]+ must be aligned to 16 bytes",
        ),
        (
            {"out": fake_cuda((1024,), offset=8)},
            ValueError,
            "out: data pointer 0x[0-9a-f]+ must be aligned to 16 bytes",
        ),
    ],
)
def test_bad_vllm_all_reduce_arguments(over: dict[str, Any], error: type, message: str) -> None:
    args = dict(
        fa=12345,
        inp=fake_cuda((1024,)),
        out=fake_cuda((1024,)),
        reg_buffer=4096,
        reg_buffer_sz_bytes=1 << 20,
        num_ctas=36,
    )
    args.update(over)
    with pytest.raises(error, match=message):
        vllm_ar.all_reduce(**args)


def test_setup_only_wire_types_cannot_make_a_launcher() -> None:
    from fi_ffi.launch.launcher import compile_launcher

    with pytest.raises(ValueError, match=r"\['handles', 'offsets'\] are setup-only wire types"):
        compile_launcher(vllm_ar.REGISTER_GRAPH_BUFFERS, vllm_ar.URI)


# ---- overlaps (PointerRules returned by the checks, tested on every call) -------------------------------------------


def _view(t: Tensor, shape: tuple[int, ...], rows_later: int = 0, dtype: str = "bfloat16") -> Tensor:
    """Another descriptor over ``t``'s memory, ``rows_later`` rows of H bf16 further on."""
    return Tensor.from_pointer(t.data_ptr + rows_later * H * 2, shape, dtype, "cuda:0", owner=t)


def test_an_output_over_the_input_is_refused_naming_both() -> None:
    x = fake_cuda((T, H))
    with pytest.raises(ValueError, match=r"norm_out.*allreduce_in"):
        trtllm_allreduce_fusion(**fusion_args(allreduce_in=x, norm_out=_view(x, (T, H))))
    with pytest.raises(ValueError, match=r"norm_out.*residual_out|residual_out.*norm_out"):
        out = fake_cuda((T, H))
        trtllm_allreduce_fusion(**fusion_args(residual_out=out, norm_out=_view(out, (T, H))))


def test_residual_out_may_be_residual_in_but_not_a_shifted_view_of_it(comm_lock: Path) -> None:
    r = fake_cuda((T + 1, H))
    with pytest.raises(ValueError, match="residual_out: overlaps residual_in without being the same tensor"):
        trtllm_allreduce_fusion(**fusion_args(residual_in=_view(r, (T, H)), residual_out=_view(r, (T, H), 1)))
    with pytest.raises(KernelError):  # in place: accepted, crosses the FFI, stops at the missing device
        trtllm_allreduce_fusion(
            **fusion_args(
                residual_in=r,
                residual_out=r,
                allreduce_in=fake_cuda((T + 1, H)),
                token_num=T + 1,
                norm_out=fake_cuda((T + 1, H)),
            )
        )


def test_the_overlap_rule_holds_after_a_valid_call_with_the_same_layout(comm_lock: Path) -> None:
    """The fast path (same layouts as a call that passed) still tests the addresses."""
    x = fake_cuda((T, H))
    with pytest.raises(KernelError):
        trtllm_allreduce_fusion(**fusion_args(0, allreduce_in=x, allreduce_out=fake_cuda((T, H))))
    with pytest.raises(ValueError, match=r"allreduce_out.*allreduce_in"):
        trtllm_allreduce_fusion(**fusion_args(0, allreduce_in=x, allreduce_out=_view(x, (T, H))))


def test_vllm_out_may_not_overlap_an_input_read_in_place() -> None:
    x = fake_cuda((1024,))
    args = dict(fa=12345, inp=x, out=_view(x, (1024,)), reg_buffer=0, reg_buffer_sz_bytes=0, num_ctas=36)
    with pytest.raises(ValueError, match=r"out.*inp"):
        vllm_ar.all_reduce(**args)


def test_moe_finalize_outputs_apart() -> None:
    r = fake_cuda((T, H))
    with pytest.raises(ValueError, match=r"norm_out.*residual_in"):
        trtllm_moe_finalize_allreduce_fusion(**moe_args(residual_in=r, norm_out=_view(r, (T, H))))


# ---- MoE reduction, the older custom all-reduce, Lamport set-up ------------------------------------------------------


BAD_MOE_REDUCTION = [
    ({"moe_reduction_scale_input": fake_cuda((3, T))}, TypeError, "moe_reduction_scale_input: expected float32"),
    ({"moe_reduction_device_num_experts": 2}, ValueError, "moe_reduction_active_experts_token_input"),
    ({"residual_out": None, "norm_out": None}, ValueError, "pass at least one output"),
    ({"quant_out": fake_cuda((T, H))}, ValueError, "FP4 output is not supported by fi_ffi"),
    ({"token_num": 128}, ValueError, r"token_num: 128 x 256 exceed the workspace \(64 x 256\)"),
    ({"token_num": 8}, ValueError, "moe_reduction_token_input"),
    ({"world_rank": 2}, ValueError, "world_size, world_rank: the workspace is for 2 ranks"),
    ({"rms_eps": -1.0}, ValueError, "rms_eps: expected a finite value > 0"),
]


@pytest.mark.parametrize(("over", "error", "message"), BAD_MOE_REDUCTION, ids=[m[:40] for _, _, m in BAD_MOE_REDUCTION])
def test_every_bad_moe_reduction_argument_is_a_typed_error(over: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        trtllm_ar.trtllm_moe_allreduce_fusion(**moe_reduction_args(**over))


def test_a_valid_older_custom_all_reduce_call_crosses_the_ffi(comm_lock: Path) -> None:
    with pytest.raises(KernelError) as info:
        trtllm_ar.trtllm_custom_all_reduce(**custom_args())
    assert info.value.kind != "TypeError", info.value


@pytest.mark.parametrize(
    ("over", "error", "message"),
    [
        ({"tp_size": 3}, ValueError, "tp_size, tp_rank: expected rank < size in 2, 4, 8, 16"),
        ({"token_num": 7}, ValueError, "token_num: expected a divisor of inp's 4096 elements"),
        ({"strategy_code": 0}, ValueError, r"strategy_code: expected ONESHOT \(4\) or TWOSHOT \(5\)"),
        ({"fusion_op_code": 4}, ValueError, "fusion_op_code: fi_ffi passes NONE"),
        ({"fusion_op_code": 1}, ValueError, "residual: required by RESIDUAL_RMS_NORM"),
        ({"peer_barrier_ptrs_in": fake_cuda((1,), "int64")}, ValueError, "peer_barrier_ptrs_in: expected an int64"),
        ({"lamport_peer_comm_buffer_ptrs_0": fake_cuda((2,), "int64")}, ValueError, "pass all three or none"),
        ({"out": fake_cuda((T, H), "float16")}, TypeError, "out: expected dtype bfloat16"),
    ],
)
def test_bad_older_custom_all_reduce_arguments(over: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        trtllm_ar.trtllm_custom_all_reduce(**custom_args(**over))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: trtllm_ar.trtllm_lamport_initialize(0, 16, "float16"), ValueError, "buffer_ptr: expected a non-NULL"),
        (lambda: trtllm_ar.trtllm_lamport_initialize(4096, -1, "float16"), ValueError, "size: expected an int >= 0"),
        (lambda: trtllm_ar.trtllm_lamport_initialize(4096, 16, "int8"), TypeError, "dtype: expected float16, bfloat16"),
        (lambda: trtllm_ar.trtllm_lamport_initialize(4096, 16, "nope"), TypeError, "nope"),
        (lambda: trtllm_ar.trtllm_lamport_initialize_all(4096, 0, 4096, 16, "float16"), ValueError, "buffer_1_ptr"),
    ],
)
def test_bad_lamport_arguments(call: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


# ---- the all-reduce objects' arguments -----------------------------------------------------------------------------


def past_the_checks(exc: BaseException) -> bool:
    """The object got past its argument checks: it failed at its first CUDA call or module load (no GPU here)."""
    from fi_ffi.comm.cuda import CudaError
    from fi_ffi.errors import LoaderError, UnsupportedDeviceError

    return isinstance(exc, (CudaError, LoaderError, UnsupportedDeviceError, KernelError))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"comm": None}, TypeError, r"^comm: expected a fi_ffi.comm.Communicator \(Communicator.from_env\(\)"),
        ({"comm": 5}, TypeError, r"^comm: expected a fi_ffi.comm.Communicator"),
        ({"comm": "closed"}, ValueError, r"^comm: the communicator is closed; make a CustomAllReduce over an open"),
        ({"full_nvlink": "yes"}, TypeError, r"^full_nvlink: expected a bool, got 'yes'"),
        ({"full_nvlink": 2}, TypeError, r"^full_nvlink: expected a bool, got 2"),
        ({"full_nvlink": None}, TypeError, r"^full_nvlink: expected a bool, got None"),
        ({"max_size": 2**63}, ValueError, r"^max_size: expected a multiple of 16 bytes up to 2147483632"),
        ({"max_size": 2**70}, ValueError, r"^max_size: expected a multiple of 16 bytes up to"),
        ({"max_size": 1.5}, TypeError, r"^max_size: expected an int"),
        ({"max_graph_all_reduces": 2**63}, ValueError, r"^max_graph_all_reduces: expected at most 33554430"),
        ({"max_graph_all_reduces": -1}, ValueError, r"^max_graph_all_reduces: expected an int >= 0"),
        ({"num_ctas": 37}, ValueError, r"^num_ctas: expected 1..36"),
    ],
)
def test_bad_custom_all_reduce_arguments_are_named_before_any_allocation(
    kwargs: dict[str, Any], error: type, message: str
) -> None:
    args: dict[str, Any] = {"comm": cpu_communicator(), **kwargs}
    if args["comm"] == "closed":
        args["comm"] = cpu_communicator(closed=True)
    with pytest.raises(error, match=message):
        vllm_ar.CustomAllReduce(**args)


def test_a_valid_custom_all_reduce_gets_past_its_checks(comm_lock: Path) -> None:
    with pytest.raises(Exception) as info:
        vllm_ar.CustomAllReduce(cpu_communicator(), max_size=vllm_ar.MAX_SIZE, max_graph_all_reduces=0)
    assert past_the_checks(info.value), repr(info.value)


def closed_custom_all_reduce() -> Any:
    """A CustomAllReduce as close() leaves it (its handle 0, its parts released)."""
    car = object.__new__(vllm_ar.CustomAllReduce)
    car.fa, car._parts, car.comm, car.max_size, car.num_ctas = 0, [], cpu_communicator(), 1 << 20, 36
    return car


def test_a_closed_custom_all_reduce_names_itself_and_the_fix() -> None:
    car = closed_custom_all_reduce()
    message = r"^CustomAllReduce: this object is closed .*make a new CustomAllReduce\(comm, \.\.\.\) on every rank"
    with pytest.raises(ValueError, match=message):
        car.all_reduce(fake_cuda((T, H)), fake_cuda((T, H)))
    with pytest.raises(ValueError, match=message):
        car.register_graph_buffers()


def test_registered_must_be_a_bool() -> None:
    car = closed_custom_all_reduce()
    car.fa = 1  # open as far as the argument checks go: registered is checked before anything is touched
    with pytest.raises(TypeError, match=r"^registered: expected a bool, got 'yes'"):
        car.all_reduce(fake_cuda((T, H)), fake_cuda((T, H)), registered="yes")


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((None, 16, 1024), TypeError, r"^comm: expected a fi_ffi.comm.Communicator"),
        (("closed", 16, 1024), ValueError, r"^comm: the communicator is closed; make an AllReduceFusionWorkspace"),
        (("comm", 2**63, 1024), ValueError, r"^max_token_num, hidden_dim: 9223372036854775808 x 1024 elements exceed"),
        (("comm", 16, 2**70), ValueError, r"^max_token_num, hidden_dim: 16 x 1180591620717411303424 elements exceed"),
        (("comm", 2**21, 1024), ValueError, r"^max_token_num, hidden_dim: .* \(the kernels count a call's elements"),
        (("comm", 16, 1.5), TypeError, r"^hidden_dim: expected an int"),
        (("comm", 16, 1020), ValueError, r"^hidden_dim: expected a multiple of 8"),
    ],
)
def test_bad_fusion_workspace_arguments_are_named_before_any_allocation(
    args: tuple[Any, ...], error: type, message: str
) -> None:
    comm = {"comm": cpu_communicator(), "closed": cpu_communicator(closed=True)}.get(args[0], args[0])  # type: ignore[call-overload]
    with pytest.raises(error, match=message):
        trtllm_ar.AllReduceFusionWorkspace(comm, *args[1:])


def test_a_valid_fusion_workspace_gets_past_its_checks(comm_lock: Path) -> None:
    with pytest.raises(Exception) as info:
        trtllm_ar.AllReduceFusionWorkspace(cpu_communicator(), 16, 1024)
    assert past_the_checks(info.value), repr(info.value)


def test_a_closed_fusion_workspace_names_itself_and_the_fix() -> None:
    ws = object.__new__(trtllm_ar.AllReduceFusionWorkspace)
    ws._parts, ws.comm, ws.metadata = [], cpu_communicator(), workspace_metadata(2, 16, 1024, "bfloat16")
    fix = r"make a new AllReduceFusionWorkspace\(comm, max_token_num, hidden_dim, dtype\) on every rank"
    with pytest.raises(ValueError, match=rf"^AllReduceFusionWorkspace: this workspace is closed .*{fix}"):
        ws.allreduce_fusion(fake_cuda((T, H)))
    with pytest.raises(ValueError, match=r"^workspace_ptrs: AllReduceFusionWorkspace: this workspace is closed"):
        trtllm_allreduce_fusion(**fusion_args(workspace_ptrs=ws))


@pytest.mark.parametrize("eps", [10**400, -(10**400), float("inf"), "1e-6"])
def test_an_eps_no_float64_holds_is_named(eps: Any) -> None:
    error = TypeError if isinstance(eps, str) else ValueError
    with pytest.raises(error, match=r"^rms_eps: "):
        trtllm_allreduce_fusion(**fusion_args(rms_eps=eps))
    with pytest.raises(error, match=r"^rms_eps: "):
        trtllm_ar.trtllm_moe_allreduce_fusion(**moe_reduction_args(rms_eps=eps))
    with pytest.raises(error, match=r"^eps: "):
        trtllm_moe_finalize_allreduce_fusion(**moe_args(eps=eps))
    with pytest.raises(error, match=r"^eps: "):
        trtllm_ar.trtllm_custom_all_reduce(**custom_args(eps=eps))


def test_a_bad_hidden_size_is_named_hidden_dim_as_the_caller_wrote_it() -> None:
    x = fake_cuda((T, H - 4))
    with pytest.raises(ValueError, match=r"^hidden_dim: expected a multiple of 8 .*allreduce_in.shape\[1\]"):
        trtllm_allreduce_fusion(**fusion_args(allreduce_in=x, hidden_dim=H - 4, allreduce_out=None))
    with pytest.raises(ValueError, match=r"^token_num, hidden_dim, moe_reduction_device_num_experts: "):
        trtllm_ar.trtllm_moe_allreduce_fusion(**moe_reduction_args(hidden_dim=H - 4))


# ---- the Lamport stride defect of trtllm_custom_all_reduce before FlashInfer 0.6.17 ---------------------------------


def rms_norm_custom_args(tp_size: int, **over: Any) -> dict[str, Any]:
    table = fake_cuda((tp_size,), "int64")
    return custom_args(
        tp_size=tp_size,
        fusion_op_code=trtllm_ar.AllReduceFusionOp.RESIDUAL_RMS_NORM,
        residual=fake_cuda((T, H)),
        weight=fake_cuda((H,)),
        eps=1e-6,
        intermediate_buffer=fake_cuda((T, H)),
        peer_comm_buffer_ptrs=table,
        peer_barrier_ptrs_in=fake_cuda((tp_size,), "int64"),
        peer_barrier_ptrs_out=fake_cuda((tp_size,), "int64"),
        **over,
    )


DEFECT = r"^tp_size: 2 ranks with RESIDUAL_RMS_NORM or Lamport buffers on FlashInfer 0\.6\.3: .*PR #3903 in 0\.6\.17"


def test_the_lamport_stride_defect_of_0_6_3_is_refused_below_16_ranks(comm_lock: Path) -> None:
    from fi_ffi import loader

    assert loader.module_release("trtllm_comm") == "0.6.3"
    with pytest.raises(ValueError, match=DEFECT):
        trtllm_ar.trtllm_custom_all_reduce(**rms_norm_custom_args(2))
    lamport = {f"lamport_peer_comm_buffer_ptrs_{i}": fake_cuda((2,), "int64") for i in range(3)}
    with pytest.raises(ValueError, match=DEFECT):  # Lamport pointers given: the host writes them mis-strided
        trtllm_ar.trtllm_custom_all_reduce(**custom_args(**lamport))
    # 16 ranks: the strides agree; fusion NONE without Lamport buffers never reads them: both reach the kernel
    for args in (rms_norm_custom_args(16, tp_rank=15), custom_args()):
        with pytest.raises(KernelError) as info:
            trtllm_ar.trtllm_custom_all_reduce(**args)
        assert info.value.kind != "TypeError" and "cuda" in info.value.message.lower(), info.value


def test_a_release_with_the_fix_is_not_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from fi_ffi import caches, loader

    wheel = comm_wheel()
    if wheel is None:
        pytest.skip(COMM_MISSING)
    fixed = dataclasses.replace(loader.lock_entry(wheel), release="0.6.17")  # what a lock of 0.6.17 records
    use_lock(monkeypatch, tmp_path / "fixed.lock", loader.dump_lock([fixed], header="0.6.17"), [wheel])
    try:
        assert loader.module_release("trtllm_comm") == "0.6.17"
        with pytest.raises(KernelError) as info:  # past every check: the module's first CUDA call
            trtllm_ar.trtllm_custom_all_reduce(**rms_norm_custom_args(2))
        assert info.value.kind != "TypeError" and "cuda" in info.value.message.lower(), info.value
    finally:
        caches.reset()

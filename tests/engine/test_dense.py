"""Dense's packed launches and the fused decode-step GEMVs, no GPU: the argument checks of ``FusedGemvs.linear``,
``prepared``, ``prepared_qkv_rope``, ``prepared_gate_up_silu``, ``prepared_router``, ``Dense.prepared_linear``,
``RowKernels.prepared_gather``, ``Launcher.prepared_kernel`` and the FP8 epilogue GEMVs (``QuantizedWeights.
prepared_fp8_silu``, ``prepared_fp8_qkv_rope``, over FP8 weights registered as values) -- each bad value refused by a
TypeError or ValueError naming its argument, before anything is launched -- and the packed arguments of a valid call.

The Dense and its parts are made without their constructors (which compile kernels with CuPy on a GPU): the kernels'
function handles are fake numbers, the argument arrays are packed with the real cffi declarations of
``fi_ffi.cuda.driver``, and ``cuLaunchKernel`` is replaced by a recorder. Nothing here dereferences an address; the GPU
suite (tests/engine/test_gpu_fused_decode.py) runs the same calls on real kernels.
"""

from __future__ import annotations

import dataclasses
import inspect
import struct
from typing import Any

import numpy as np
import pytest

from fi_engine.kernels import dense as D
from fi_engine.kernels import fused_args as F
from fi_engine.kernels.fp8_linear import Fp8Linears, Fp8Weight
from fi_engine.kernels.fused_gemv import WARPS, FusedGemvs, FusedKernels
from fi_engine.kernels.gemv_settings import GEMV_NAMES
from fi_engine.kernels.launch import Launcher
from fi_engine.kernels.quantized_weights import QuantizedWeights
from fi_engine.kernels.row_kernels import RowKernels, column_blocks
from fi_ffi.cuda import driver

pytestmark = pytest.mark.cpu_only

BASE = 1 << 40  # fake device addresses, 1 GiB apart, 16-byte aligned, never dereferenced
H, N = 256, 512  # hidden size (k) and output columns


def fake_dense() -> D.Dense:
    """A Dense and its parts made without their constructors' GPU work: a real Launcher over a recording
    cuLaunchKernel, fake kernel handles (the kernels of 1 to 4 rows: handle + 0x100 * (rows - 1))."""
    launches: list[tuple[Any, ...]] = []

    def launch(*args: Any) -> int:
        launches.append(args)
        return 0

    # no programmatic dependent launch (test_pdl_launches_carry_the_attribute turns it on)
    launcher = Launcher(0x77, launch, None, driver.ffi())
    by_rows = lambda fn: tuple(fn + 0x100 * r for r in range(D.GEMV_MAX_ROWS))  # noqa: E731
    fns = {(m, ab, c): by_rows(0x1000 + m) for (ab, c) in GEMV_NAMES for m in (F.NORM, F.ADD_NORM, F.SILU)}
    epilogue_modes = (F.PLAIN, F.NORM, F.ADD_NORM)
    fns |= {(m | F.ROPE, ab, ab): by_rows(0x2000 + m) for ab in (D.CUDA_R_16F, D.CUDA_R_16BF) for m in epilogue_modes}
    fns |= {
        (m | F.GATE_UP, ab, ab): by_rows(0x6000 + m) for ab in (D.CUDA_R_16F, D.CUDA_R_16BF) for m in epilogue_modes
    }
    kernels = FusedKernels(fns, (48 << 10) - 1024, 1056)
    quantized = QuantizedWeights(launcher, kernels.smem, lambda: None, lambda key, accumulate: None)
    # two FP8 weights (values, as QuantizedWeights.add_fp8_weight registers them): gate/up [N, H] with 128x128-block
    # scales, QKV [(4 + 2 * 2) * 64, H] with per-row ones; the epilogue GEMVs' handles fake numbers
    quantized.fp8_weights = {
        at(12): Fp8Weight(at(12), N, H, at(14), (128, 128)),
        at(13): Fp8Weight(at(13), 8 * 64, H, at(15), None),
    }
    quantized.fp8 = FakeFp8Linears()  # type: ignore[assignment]
    d = D.Dense.__new__(D.Dense)
    d.gemv, d.bandwidth_bound, d._choices = True, False, {}
    d.launcher, d.quantized = launcher, quantized
    d.fused = FusedGemvs(launcher, kernels, quantized)
    d.rows = RowKernels(type("Kernel", (), {"ptr": 0x4000})(), None, launcher)
    d._fp8_weights = quantized.fp8_weights  # the mirror linear reads
    d._gemv_fns = dict.fromkeys(GEMV_NAMES, by_rows(0x3000))
    d._gemv_args = {}
    d._launch, d._null, d._stream = launch, launcher.null, 0x77
    d.launches = launches  # type: ignore[attr-defined]
    return d


class FakeFp8Linears:
    """What Dense's FP8 epilogue GEMVs ask of its Fp8Linears: the kernels' handles (fake), why they are missing, and
    the real choice between the widening and the tensor-core form (``Fp8Linears.pair_launch``) on an H100's 132 SMs."""

    fused_error = ""
    tensor_core_rows = Fp8Linears.tensor_core_rows
    pair_launch = Fp8Linears.pair_launch
    _tc_threads = Fp8Linears._tc_threads
    _one_row_grid = Fp8Linears._one_row_grid
    one_row_blocks_per_sm = Fp8Linears.one_row_blocks_per_sm
    _sms = 132

    def __init__(self) -> None:
        self._pairs_tc = {
            (e, b, blk): 0x6000 + 0x100 * e + 0x10 * b + blk for e in (1, 2) for b in (0, 1) for blk in (0, 1)
        }

    def pair_fn(self, epi: int, bf16: bool, block: bool, rows: int) -> int:
        return 0x5000 + 0x100 * epi + 0x10 * bf16 + 2 * block + (rows == 1)


def test_pdl_launches_carry_the_attribute() -> None:
    """With cuLaunchKernelEx available, every prepared launch goes through it with a configuration packed once: the
    GEMV launches (which wait for their predecessor in the kernel) with one programmatic-stream-serialization
    attribute, the row gather (which does not wait) with none, each with the launch's own grid, block, shared
    memory and stream, in the real cffi structs; with Launcher.pdl off no launch carries the attribute."""
    d = fake_dense()
    seen: list[tuple[Any, ...]] = []

    def launch_ex(config: Any, fn: int, params: Any, extra: Any) -> int:
        attrs = [(config.attrs[i].id, int.from_bytes(bytes(config.attrs[i].value[0:4]), "little"))
                 for i in range(config.numAttrs)]  # fmt: skip
        seen.append((fn, config.gridDimX, config.gridDimY, config.blockDimX, config.sharedMemBytes, config.hStream,
                     attrs, params))  # fmt: skip
        return 0

    d.launcher.launch_ex = launch_ex
    d.prepared_linear(**linear_call())()
    fn, grid, grid_y, block, smem, stream, attrs, params = seen[0]
    assert (fn, grid, grid_y, block, smem, stream) == (0x3100, -(-N // D._GEMV_WARPS), 1, 32 * D._GEMV_WARPS, 0, 0x77)
    assert attrs == [(6, 1)] and params != d._null
    d.fused.prepared(**fused_call())()
    assert seen[1][0] == 0x1100 + F.ADD_NORM and seen[1][3] == 32 * WARPS and seen[1][4] > 0
    assert seen[1][6] == [(6, 1)]
    d.fused.prepared_qkv_rope(**qkv_call())()
    assert seen[2][0] == 0x2100 + F.ADD_NORM and seen[2][6] == [(6, 1)]
    d.rows.prepared_gather(**gather_call())()
    assert seen[3][0] == 0x4000 and seen[3][2] == column_blocks(H) and seen[3][6] == []  # no attribute
    assert d.launches == []  # cuLaunchKernel: never, where cuLaunchKernelEx is
    Launcher.pdl = False
    try:
        d.prepared_linear(**linear_call())()
        assert len(seen) == 5 and seen[4][6] == [] and d.launches == []
    finally:
        Launcher.pdl = True
    d.launcher.launch_ex = None  # a driver without cuLaunchKernelEx (or a GPU before Hopper): cuLaunchKernel
    d.prepared_linear(**linear_call())()
    assert len(seen) == 5 and len(d.launches) == 1


def at(i: int) -> int:
    return BASE + (i << 30)


def fused_call(mode: int = F.ADD_NORM) -> dict[str, Any]:
    return dict(
        mode=mode, rows=2, x=at(0), x_ld=2 * H if mode == F.SILU else H, w=at(1), n=N, k=H, y=at(2), y_ld=N,
        ab_type=D.CUDA_R_16BF, c_type=D.CUDA_R_16BF, h=at(3), h_ld=H, norm_weight=at(4), h_out=at(5), eps=1e-5,
    )  # fmt: skip


def rope() -> F.RopeAppend:
    return F.RopeAppend(
        hq=4, hk=2, d=64, theta=5e5, scale=8.0, llama3=True, low_freq_factor=1.0, high_freq_factor=4.0,
        old_context_len=8192.0, positions=at(6), batch_indices=at(7), kv_indptr=at(8), kv_indices=at(9),
        k_cache=at(10), v_cache=at(11), page_size=16, num_pages=8, stride_page=16 * 2 * 64, stride_n=2 * 64,
        stride_h=64,
    )  # fmt: skip


def qkv_call() -> dict[str, Any]:
    """A valid prepared_qkv_rope call: the fused call's GEMV over rope()'s (4 + 2 * 2) * 64 columns."""
    return {**fused_call(), "n": 8 * 64, "y_ld": 8 * 64, "rope": rope()}


def gate_up_call() -> dict[str, Any]:
    """A valid prepared_gate_up_silu call: 2 rows, the weight's N rows (N / 2 gate, N / 2 up) into y [2, N / 2]."""
    return {**fused_call(), "y_ld": N // 2}


def plain(call: dict[str, Any]) -> dict[str, Any]:
    """``call`` (a prepared_qkv_rope or prepared_gate_up_silu call) in the PLAIN mode as a tensor-parallel rank makes
    it: the input rows x as they are, the norm's operands 0."""
    return {**call, "mode": F.PLAIN, "h": 0, "h_ld": 0, "norm_weight": 0, "h_out": 0, "eps": 0.0}


def linear_call() -> dict[str, Any]:
    return dict(rows=2, x=at(0), x_ld=H, w=at(1), n=N, k=H, y=at(2), y_ld=N, ab_type=D.CUDA_R_16F, c_type=D.CUDA_R_32F)


def fp8_silu_call() -> dict[str, Any]:
    return dict(rows=2, x=at(0), x_ld=H, w=at(12), k=H, y=at(2), y_ld=N // 2, ab_type=D.CUDA_R_16BF)


def fp8_qkv_call() -> dict[str, Any]:
    return dict(rows=2, x=at(0), x_ld=H, w=at(13), k=H, y=at(2), y_ld=8 * 64, ab_type=D.CUDA_R_16BF, rope=rope())


def gather_call() -> dict[str, Any]:
    return dict(rows=3, src=at(0), src_ld=H, index=at(1), dst=at(2), dst_ld=H, width=H)


HUGE = 10**400
NOT_INT = (None, 1.5, float("nan"), HUGE, True, "5", (1,), [1], np.float64(2.0), np.array([1, 2]))
BAD_ADDRESS = (*NOT_INT, -16, 1 << 64, (1 << 64) + 16)
BAD_STRIDE = (*NOT_INT, -1, 1 << 40)
ADDRESSES = {"x", "w", "y", "h", "norm_weight", "h_out", "src", "index", "dst"}
STRIDES = {"x_ld", "y_ld", "h_ld", "src_ld", "dst_ld", "width"}


def bad_values(name: str) -> tuple[Any, ...]:
    if name == "eps":
        # 1e300 and -1e39 are finite floats but no float32 (the kernel's): struct.pack raised OverflowError
        return (None, float("nan"), float("inf"), HUGE, 1e300, -1e39, True, "0.5", (0.5,), np.array([0.5, 0.5]))
    if name == "mode":
        return (None, 0, 4, 1.5, True, "1", np.float64(1.0), F.NORM | F.ROPE, [1])
    if name == "rope":
        return (None, 5, "x", dataclasses.asdict(rope()))
    if name in ADDRESSES:
        return BAD_ADDRESS
    if name in STRIDES:
        return BAD_STRIDE
    return (*NOT_INT, 0, -1, 1 << 31, 1 << 64)  # rows, n, k, and the dtype codes


ENTRIES = {
    "fused_linear": (lambda d: d.fused.linear, fused_call),
    "fused_linear (SILU)": (lambda d: d.fused.linear, lambda: fused_call(F.SILU)),
    "prepared_fused": (lambda d: d.fused.prepared, fused_call),
    "prepared_qkv_rope": (lambda d: d.fused.prepared_qkv_rope, qkv_call),
    "prepared_gate_up_silu": (lambda d: d.fused.prepared_gate_up_silu, gate_up_call),
    "prepared_qkv_rope (PLAIN)": (lambda d: d.fused.prepared_qkv_rope, lambda: plain(qkv_call())),
    "prepared_gate_up_silu (PLAIN)": (lambda d: d.fused.prepared_gate_up_silu, lambda: plain(gate_up_call())),
    "prepared_linear": (lambda d: d.prepared_linear, linear_call),
    "prepared_gather": (lambda d: d.rows.prepared_gather, gather_call),
    "prepared_fp8_silu": (lambda d: d.quantized.prepared_fp8_silu, fp8_silu_call),
    "prepared_fp8_qkv_rope": (lambda d: d.quantized.prepared_fp8_qkv_rope, fp8_qkv_call),
}
PLAIN_ENTRIES = ("prepared_qkv_rope", "prepared_gate_up_silu")
CASES = [  # (prepared_linear passes dtype codes 0 and -1 on: cuBLAS refuses what it lacks)
    (entry, name, value)
    for entry, (_, build) in ENTRIES.items()
    for name in build()
    for value in bad_values(name)
    if not (name.endswith("_type") and type(value) is int and value in (0, -1) and entry == "prepared_linear")
    and not (name == "c_type" and type(value) is int and value == 0)  # CUDA_R_32F: a float32 output
    # PLAIN (0): the RoPE and SiLU epilogues' plain prologue
    and not (name == "mode" and type(value) is int and value == F.PLAIN and entry.startswith(PLAIN_ENTRIES))
]


def test_prepared_linear_takes_linears_parameters_and_leaves_an_accumulating_call_to_linear() -> None:
    """Dense.prepared_linear takes Dense.linear's parameters (accumulate too): an accumulating call packs nothing (the
    GEMV writes y; linear adds to it at each call), and an accumulate that is no bool is refused by name."""
    d = fake_dense()
    assert list(inspect.signature(d.prepared_linear).parameters) == list(inspect.signature(d.linear).parameters)
    prepared = d.prepared_linear(**linear_call(), accumulate=True)
    assert callable(prepared) and d._gemv_args == {} and d.launches == []
    d.prepared_linear(*linear_call().values(), False)()  # positionally, as linear takes them: the packed GEMV
    assert len(d._gemv_args) == 1 and len(d.launches) == 1
    with pytest.raises(TypeError, match="^accumulate: expected a bool, got int"):
        d.prepared_linear(**linear_call(), accumulate=1)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_a_valid_call_packs_and_launches(entry):
    d = fake_dense()
    method, build = ENTRIES[entry]
    result = method(d)(**build())
    if callable(result):
        result()
    assert len(d.launches) == 1


@pytest.mark.parametrize(("entry", "name", "value"), CASES, ids=[f"{e}-{n}-{v!r:.30}" for e, n, v in CASES])
def test_a_bad_value_is_refused_by_name_before_any_launch(entry, name, value):
    d = fake_dense()
    method, build = ENTRIES[entry]
    with pytest.raises((TypeError, ValueError)) as caught:
        result = method(d)(**{**build(), name: value})
        if callable(result):
            result()
    assert type(caught.value) in (TypeError, ValueError)
    assert name in str(caught.value) or (name in ("rows", "k") and str(caught.value).startswith("rows, k:"))
    assert "unhashable" not in str(caught.value)
    assert d.launches == []
    assert d.fused._args == {}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(F.RopeAppend)])
def test_a_bad_rope_field_is_refused_by_name(field):
    d = fake_dense()
    bad = "x" if field != "llama3" else 1
    with pytest.raises((TypeError, ValueError), match=rf"^rope\.{field}: "):
        d.fused.prepared_qkv_rope(**{**qkv_call(), "rope": dataclasses.replace(rope(), **{field: bad})})
    assert d.launches == []


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("theta", 1e-40, r"^rope\.theta \(its reciprocal\): expected a finite float within float32's range"),
        ("scale", 1e-300, r"^rope\.scale \(its reciprocal\): expected a finite float"),
        ("old_context_len", 1e300, r"^rope\.old_context_len / \(high_freq_factor - low_freq_factor\): expected"),
    ],
)
def test_a_rope_constant_past_float32_is_refused_by_name(field, value, match):
    # each finite and > 0 (as a float64), but its float32 constant would be an infinity in the kernel
    d = fake_dense()
    with pytest.raises(ValueError, match=match):
        d.fused.prepared_qkv_rope(**{**qkv_call(), "rope": dataclasses.replace(rope(), **{field: value})})
    assert d.launches == [] and d.fused._args == {}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(y_ld=N - 1), r"^y_ld: 511 elements between rows is less than a row's 512"),
        (dict(h_ld=H - 8), r"^h_ld: "),
        (dict(y=(1 << 64) - 1024), r"^y: 0x[0-9a-f]+ \+ \d+ bytes runs past the end of the address space"),
        (dict(w=(1 << 64) - 4096), r"^w: .* runs past the end"),
        (dict(ab_type=D.CUDA_R_32F), r"^ab_type, c_type: no fused GEMV for these types"),
    ],
)
def test_strides_shorter_than_a_row_and_ranges_past_2_64_are_refused(change, match):
    d = fake_dense()
    with pytest.raises(ValueError, match=match):
        d.fused.linear(**{**fused_call(), **change})
    assert d.launches == []


def test_one_row_takes_any_stride_and_norm_ignores_x():
    # a single row never steps by its stride; NORM reads no x (the engine passes x and x_ld anyway)
    d = fake_dense()
    d.fused.linear(**{**fused_call(F.NORM), "rows": 1, "y_ld": 0, "h_ld": 0, "x_ld": 0})
    d.fused.linear(**{**fused_call(F.NORM), "x_ld": 0})
    assert len(d.launches) == 2


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_each_launch_takes_the_kernel_compiled_for_its_row_count(rows: int):
    """The 16-bit GEMVs are compiled once per row count (GemvSettings.gemv_fixed_rows): the plain, fused, RoPE and
    router launches of ``rows`` rows take that count's kernel (the fakes' handles: base + 0x100 * (rows - 1))."""
    d = router_dense()
    d.launcher.launch_ex = lambda config, fn, params, extra: d.launches.append((fn,)) or 0
    d.bandwidth_bound = False  # an eager step: the GEMV serves every call of at most 4 rows
    offset = 0x100 * (rows - 1)
    d.prepared_linear(**{**linear_call(), "rows": rows})()
    d.fused.prepared(**{**fused_call(), "rows": rows})()
    d.fused.prepared_qkv_rope(**{**qkv_call(), "rows": rows})()
    d.fused.prepared_router(**{**router_call(), "rows": rows})()
    d.fused.prepared_gate_up_silu(**{**gate_up_call(), "rows": rows})()
    d.linear(**{**linear_call(), "rows": rows})  # the unprepared path: cuLaunchKernel, its first argument
    d.fused.linear(**{**fused_call(F.SILU), "rows": rows})
    launched = [launch[0] for launch in d.launches]
    assert launched == [base + offset for base in (0x3000, 0x1002, 0x2002, 0x5002, 0x6002, 0x3000, 0x1003)]


def test_the_gate_up_silu_call_packs_the_gemvs_arguments_and_its_half_width_output():
    """prepared_gate_up_silu: one launch of the ADD_NORM gate/up kernel over its m = N / 2 pairs (a block per 8),
    the fused GEMV's 13 arguments (n: the weight's N rows) and 17 zero slots where the RoPE kernel takes its own;
    y is m columns wide (a row stride of m is enough), an odd n, a y row stride under m, a y that overlaps x or h,
    and a weight registered as FP8 are refused by name."""
    d = fake_dense()
    call = gate_up_call()
    prepared = d.fused.prepared_gate_up_silu(
        **call
    )  # kept: a launch's argument array lives as long as its prepared call
    prepared()
    fn, grid, _, _, block, _, _, smem, stream, params, _ = d.launches[0]
    assert (fn, grid, block, smem, stream) == (0x6100 + F.ADD_NORM, N // 2 // 8, 256, 2 * H * 2, 0x77)
    slots = [d.launcher.ffi.cast("uint64_t*", params[i])[0] for i in range(30)]
    names = ("x", "w", "y", "rows", "n", "k", "x_ld", "y_ld", "h", "norm_weight", "h_out", "h_ld")
    assert slots[:12] == [call[n] for n in names] and slots[13:] == [0] * 17
    for change, match in (
        ({"n": N + 1}, "n: the gate/up weight pairs"),
        ({"y_ld": N // 2 - 1}, "y_ld: "),
        ({"y": call["x"] + 2 * 8}, "y: overlaps x"),
        ({"y": call["h"]}, "y: overlaps h"),
        ({"w": at(12)}, "w: the RoPE and SiLU epilogues read 16-bit weights"),
        ({"mode": F.SILU}, "mode: the SiLU epilogue follows a NORM or ADD_NORM prologue"),
    ):
        with pytest.raises(ValueError, match=match):
            d.fused.prepared_gate_up_silu(**{**call, **change})
    assert len(d.launches) == 1


def pairs_kernel_parameters() -> list[str]:
    """The parameter names of csrc/fused_gemv.cu's pair kernels (its ``PAIRS`` macro: the QKV + RoPE + append and
    gate/up + SiLU kernels of every prologue, whose parameter list is ``PAIRS_PARAMS``), in order, as the engine's
    source reads them."""
    from fi_engine.kernels.cuda_sources import source

    text = source("fused_gemv.cu").replace("\\\n", " ")
    macro = text[text.index("#define PAIRS(") :]
    assert macro[macro.index("name##_r##R(") :].startswith("name##_r##R(PAIRS_PARAMS) {")
    params = text[text.index("#define PAIRS_PARAMS") + len("#define PAIRS_PARAMS") :]
    params = params[: params.index("\n")]
    return [p.replace("*", " ").split()[-1] for p in params.split(",")]


@pytest.mark.parametrize("epilogue", ["qkv_rope", "gate_up_silu"])
def test_a_plain_call_packs_each_kernel_parameter_from_its_value(epilogue: str) -> None:
    """The PLAIN mode (a tensor-parallel rank's normalized rows as they are): one launch of the PLAIN kernel of the
    call's row count, each of the pair kernel's 30 parameters (read from its source) packed from the call's value:
    x, x_ld, w, y, y_ld, rows, k as given, n the weight's rows, the norm's operands (h, norm_weight, h_out, h_ld,
    eps) 0, then the RoPE epilogue's values (the SiLU kernel: zeros)."""
    d = fake_dense()
    call = plain(qkv_call() if epilogue == "qkv_rope" else gate_up_call())
    prepared = getattr(d.fused, f"prepared_{epilogue}")(**call)  # kept: its argument array lives with it
    prepared()
    fn, grid, _, _, block, _, _, smem, _, params, _ = d.launches[0]
    names = pairs_kernel_parameters()
    assert len(names) == 30 and names[:13] == ["x", "w", "y", "rows", "n", "k", "x_ld", "y_ld", "h", "nw", "h_out",
                                               "h_ld", "eps"]  # fmt: skip
    slots = dict(zip(names, (d.launcher.ffi.cast("uint64_t*", params[i])[0] for i in range(30)), strict=True))
    r = rope()
    n = (r.hq + 2 * r.hk) * r.d if epilogue == "qkv_rope" else N
    want = {"x": at(0), "w": at(1), "y": at(2), "rows": 2, "n": n, "k": H, "x_ld": H, "y_ld": call["y_ld"]}
    want |= dict.fromkeys(("h", "nw", "h_out", "h_ld", "eps"), 0)  # unused by the PLAIN prologue
    if epilogue == "qkv_rope":
        rcp_theta, rcp_scale, smooth_a, smooth_b = (
            int.from_bytes(struct.pack("<f", value), "little") for value in r.constants()
        )
        want |= {"hq": 4, "hk": 2, "d": 64, "rcp_theta": rcp_theta, "rcp_scale": rcp_scale, "smooth_a": smooth_a}
        want |= {"smooth_b": smooth_b, "page_size": 16, "stride_page": r.stride_page, "stride_n": r.stride_n}
        want |= {"stride_h": r.stride_h, "k_cache": r.k_cache, "v_cache": r.v_cache}
        want |= {name: getattr(r, name) for name in ("positions", "batch_indices", "kv_indptr", "kv_indices")}
        kernel, columns = 0x2100 + F.PLAIN, n // 2
    else:
        want |= {name: 0 for name in names[13:]}
        kernel, columns = 0x6100 + F.PLAIN, N // 2
    assert slots == want
    assert (fn, grid, block, smem) == (kernel, columns // WARPS, 256, 2 * H * 2)  # 2 rows staged: 2 * H values


@pytest.mark.parametrize(
    ("entry", "change", "match"),
    [
        ("linear", dict(mode=F.PLAIN), r"^mode: PLAIN \(the input rows as they are\) is the RoPE and SiLU epilogues'"),
        ("prepared", dict(mode=F.PLAIN), r"^mode: PLAIN .* a plain GEMV is Dense\.linear"),
        ("qkv_rope", dict(x=at(0) + 8), r"^x: 0x[0-9a-f]+ must be a non-NULL address aligned to 16 bytes"),
        ("qkv_rope", dict(x=0), r"^x: 0x0 must be a non-NULL address"),
        ("qkv_rope", dict(x_ld=H - 8), r"^x_ld: 248 elements between rows is less than a row's 256"),
        ("qkv_rope", dict(y=at(0) + 16), r"^y: overlaps x"),
        ("qkv_rope", dict(rope=dataclasses.replace(rope(), k_cache=at(0))), r"^rope\.k_cache: overlaps x"),
        ("qkv_rope", dict(rows=5), r"^rows, k: the fused GEMV does not serve 5 rows"),
        ("gate_up_silu", dict(x=at(0) + 2), r"^x: 0x[0-9a-f]+ must be a non-NULL address aligned to 16 bytes"),
        ("gate_up_silu", dict(y=at(0)), r"^y: overlaps x"),
        ("gate_up_silu", dict(w=at(12)), r"^w: the RoPE and SiLU epilogues read 16-bit weights"),
    ],
    ids=lambda value: value if isinstance(value, str) and not value.startswith("^") else "",
)
def test_a_plain_call_is_refused_by_name_where_it_reads_x(entry: str, change: dict[str, Any], match: str) -> None:
    """PLAIN reads x (16-byte aligned, rows at least a row apart) and no h: its x is checked as the SILU prologue's
    is (alignment, NULL, stride, y and the caches apart from it), and the plain GEMV without an epilogue is refused
    naming mode (Dense.linear is that GEMV)."""
    d = fake_dense()
    builds = {
        "linear": (d.fused.linear, fused_call),
        "prepared": (d.fused.prepared, fused_call),
        "qkv_rope": (d.fused.prepared_qkv_rope, lambda: plain(qkv_call())),
        "gate_up_silu": (d.fused.prepared_gate_up_silu, lambda: plain(gate_up_call())),
    }
    method, build = builds[entry]
    with pytest.raises(ValueError, match=match):
        method(**{**build(), **change})
    assert d.launches == [] and d.fused._args == {}


def test_a_plain_call_ignores_the_norms_operands_and_the_router_refuses_plain() -> None:
    """The norm's operands are unused by PLAIN: any aligned-or-not address there packs (the kernel never reads it);
    the routing epilogue has no PLAIN kernel and refuses the mode by name."""
    d = router_dense()
    d.fused.prepared_qkv_rope(**{**plain(qkv_call()), "h": at(3) + 2, "norm_weight": at(4) + 6, "h_ld": 3})()
    assert len(d.launches) == 1
    assert d.fused.has_qkv_rope(D.CUDA_R_16BF, 64, F.PLAIN) and d.fused.has_gate_up_silu(D.CUDA_R_16F, F.PLAIN)
    assert not d.fused.has_qkv_rope(D.CUDA_R_16BF, 64, F.SILU)
    with pytest.raises(ValueError, match=r"^mode: the routing epilogue follows a NORM or ADD_NORM prologue, got 0"):
        d.fused.prepared_router(**router_call(F.PLAIN))


def test_the_packed_arguments_are_the_call_values():
    d = fake_dense()
    call = fused_call()
    d.fused.linear(**call)
    fn, grid, _, _, block, _, _, smem, stream, params, _ = d.launches[0]
    assert (fn, grid, block, smem, stream) == (0x1102, N // 8, 256, 2 * H * 2, 0x77)  # ADD_NORM's 2-row kernel
    slots = [d.launcher.ffi.cast("uint64_t*", params[i])[0] for i in range(13)]
    eps_bits = int.from_bytes(struct.pack("<f", call["eps"]), "little")
    names = ("x", "w", "y", "rows", "n", "k", "x_ld", "y_ld", "h", "norm_weight", "h_out", "h_ld")
    assert slots == [call[n] for n in names] + [eps_bits]
    d.fused.linear(**call)  # the same call site: packed once, launched again with the same array
    assert d.launches[1][9] == params and len(d.fused._args) == 1


def test_after_close_the_fused_gemv_refuses_and_names_why():
    d = fake_dense()
    d.fused.close()  # what Dense.close leaves
    d.launcher.close()
    with pytest.raises(ValueError, match="no fused GEMV compiled"):
        d.fused.linear(**fused_call())
    with pytest.raises(ValueError, match="driver launch path is off"):
        d.rows.prepared_gather(**gather_call())


def test_a_llama31_rope_band_of_zero_width_is_refused_as_the_rope_op_refuses_it():
    # RopeAppend.constants divides by high / low - 1: an infinite smoothing constant in the kernel otherwise
    d = fake_dense()
    band = dataclasses.replace(rope(), high_freq_factor=1.0)
    with pytest.raises(ValueError, match=r"^rope\.high_freq_factor: expected a value > low_freq_factor \(1\.0\)"):
        d.fused.prepared_qkv_rope(**{**qkv_call(), "rope": band})
    d.fused.prepared_qkv_rope(**{**qkv_call(), "rope": dataclasses.replace(band, llama3=False)})()  # plain RoPE: unused
    assert len(d.launches) == 1


@pytest.mark.parametrize("bad", [None, 1.5, "2", True, [2]])
def test_the_predicates_refuse_what_is_no_int_by_name(bad):
    d = fake_dense()
    assert d.fused.fits(4, H) and d.fused.fits(np.int64(2), np.int32(H)) and not d.fused.fits(5, H)
    assert d.fused.has_qkv_rope(D.CUDA_R_16BF, 128) and not d.fused.has_qkv_rope(D.CUDA_R_16BF, 96)
    for call, name in (
        (lambda: d.fused.fits(bad, H), "rows"),
        (lambda: d.fused.fits(2, bad), "k"),
        (lambda: d.fused.has_qkv_rope(bad, 128), "ab_type"),
        (lambda: d.fused.has_qkv_rope(D.CUDA_R_16BF, bad), "d"),
        (lambda: d.fused.has_qkv_rope(D.CUDA_R_16BF, 128, bad), "mode"),
        (lambda: d.fused.has_gate_up_silu(D.CUDA_R_16BF, bad), "mode"),
    ):
        with pytest.raises(TypeError, match=f"^{name}: expected an int"):
            call()


def test_prepared_kernel_packs_integer_arguments_into_8_byte_slots() -> None:
    """Launcher.prepared_kernel (the MoE layer's packed launches): the grid's two dimensions, block and shared bytes
    reach cuLaunchKernel, each argument sits in its own 8-byte slot (what a 32-bit parameter reads as its low
    half), and a float, a negative or an out-of-range value is refused by the argument's name."""
    d = fake_dense()
    prepared = d.launcher.prepared_kernel(0x5000, (3, 8), 256, 4096, [at(0), 7, (1 << 40) + 5], "k")  # kept, as above
    prepared()
    fn, gx, gy, gz, block, by, bz, smem, stream, params, _ = d.launches[0]
    assert (fn, gx, gy, gz, block, by, bz, smem, stream) == (0x5000, 3, 8, 1, 256, 1, 1, 4096, 0x77)
    ffi = driver.ffi()
    slots = [int(ffi.cast("uint64_t*", params[i])[0]) for i in range(3)]
    assert slots == [at(0), 7, (1 << 40) + 5]
    for bad, match in ((1.5, r"args\[1\]"), (-1, r"args\[1\]"), (1 << 64, r"args\[1\]"), (True, r"args\[1\]")):
        with pytest.raises((TypeError, ValueError), match=match):
            d.launcher.prepared_kernel(0x5000, (1, 1), 32, 0, [0, bad], "k")
    with pytest.raises((TypeError, ValueError), match="grid"):
        d.launcher.prepared_kernel(0x5000, (0, 1), 32, 0, [], "k")
    d.launcher.close()
    with pytest.raises(ValueError, match="launch path is off"):
        d.launcher.prepared_kernel(0x5000, (1, 1), 32, 0, [], "k")


def router_call(mode: int = F.ADD_NORM) -> dict[str, Any]:
    """A valid prepared_router call: 2 rows of H over 16 experts, top-2 (addresses at(12..15) for the epilogue)."""
    call = fused_call(mode)
    route = F.RouterEpilogue(normed=at(12), normed_ld=H, top_k=2, renormalize=True, experts=at(13), weights=at(14),
                             done=at(15))  # fmt: skip
    return {**call, "n": 16, "y": at(2), "y_ld": 16, "c_type": D.CUDA_R_32F, "route": route}


def router_dense() -> D.Dense:
    d = fake_dense()
    d.fused._fns |= {
        (m | F.ROUTE, ab, D.CUDA_R_32F): tuple(0x5000 + m + 0x100 * r for r in range(4))
        for ab in (D.CUDA_R_16F, D.CUDA_R_16BF)
        for m in (1, 2)
    }
    return d


def test_a_router_call_packs_its_epilogue_after_the_fused_gemvs_arguments():
    d = router_dense()
    assert d.fused.has_router(D.CUDA_R_16BF) and not fake_dense().fused.has_router(D.CUDA_R_16BF)
    call = router_call()
    prepared = d.fused.prepared_router(**call)  # kept: a launch's argument array lives as long as its prepared call
    prepared()
    fn, grid, _, _, block, _, _, smem, stream, params, _ = d.launches[0]
    assert (fn, grid, block, smem, stream) == (0x5100 + F.ADD_NORM, 2, 256, 2 * 2 * H, 0x77)
    slots = [d.launcher.ffi.cast("uint64_t*", params[i])[0] for i in range(20)]
    r = call["route"]
    eps_bits = int.from_bytes(struct.pack("<f", call["eps"]), "little")
    want = [call[n] for n in ("x", "w", "y", "rows", "n", "k", "x_ld", "y_ld", "h", "norm_weight")]
    want += [call["h_out"], call["h_ld"], eps_bits, r.normed, r.normed_ld, 2, 1, r.experts, r.weights, r.done]
    assert slots == want


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(mode=F.SILU), ValueError, r"^mode: the routing epilogue follows a NORM or ADD_NORM prologue"),
        (dict(route=(1, 2)), TypeError, r"^route: expected a RouterEpilogue"),
        (dict(route_top_k=0), ValueError, r"^route\.top_k: "),
        (dict(route_top_k=17), ValueError, r"^route\.top_k: expected at most n \(16\)"),
        (dict(route_top_k=True), TypeError, r"^route\.top_k: "),
        (dict(route_renormalize=1), TypeError, r"^route\.renormalize: expected a bool"),
        (dict(route_normed=None), TypeError, r"^route\.normed: "),
        (dict(route_normed=at(12) + 8), ValueError, r"^route\.normed: 0x[0-9a-f]+ must be a non-NULL address aligned"),
        (dict(route_experts=0), ValueError, r"^route\.experts: 0x0 must be a non-NULL"),
        (dict(route_done=at(15) + 2), ValueError, r"^route\.done: "),
        (dict(route_normed_ld=H - 8), ValueError, r"^route\.normed_ld: "),
        (dict(route_normed=at(0)), ValueError, r"^route\.normed: overlaps x"),
        (dict(route_weights=at(13) + 8), ValueError, r"^route\.weights: overlaps route\.experts"),
        (dict(route_done=at(2)), ValueError, r"^route\.done: overlaps y"),
        (dict(route_experts=(1 << 64) - 8), ValueError, r"^route\.experts: .* runs past the end"),
        (dict(eps=1e300), ValueError, r"^eps: expected a finite float within float32's range"),
        (dict(y=at(0)), ValueError, r"^y: overlaps x"),
        (dict(c_type=D.CUDA_R_16BF), ValueError, r"^c_type: this GEMV writes its output as type 0"),
        (dict(ab_type=D.CUDA_R_32F), ValueError, r"^ab_type, c_type: no fused GEMV"),
        (dict(k=H + 4), ValueError, r"k"),
    ],
)
def test_a_bad_router_call_is_refused_by_name_before_any_launch(change, error, match):
    d = router_dense()
    call = router_call()
    fields = {k.removeprefix("route_"): v for k, v in change.items() if k.startswith("route_")}
    call |= {k: v for k, v in change.items() if not k.startswith("route_")}
    if fields:
        call["route"] = dataclasses.replace(call["route"], **fields)
    with pytest.raises(error, match=match):
        d.fused.prepared_router(**call)
    assert d.launches == []


def test_a_router_over_fp8_weights_is_refused():
    d = router_dense()
    d.quantized.fp8_weights = {at(1): object()}  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"^w: the routing epilogue reads 16-bit router weights"):
        d.fused.prepared_router(**router_call())
    assert d.launches == []


def test_the_fp8_epilogue_gemvs_pack_their_pairs_and_scales() -> None:
    """prepared_fp8_silu: one block per two output columns (pairs of gate and up rows), 4 warps, the weight's block
    scales (row stride ceil(k / 128), 128 rows a block, log2 of 8 vectors a block), no RoPE arguments;
    prepared_fp8_qkv_rope: a pair per two columns of a head, per-row scales, then the RoPE and append arguments as
    prepared_qkv_rope packs them. Kernels picked by epilogue, type, scale layout and rows (1, or up to 4); one row:
    a block per pair, at most ``Fp8Linears.one_row_blocks_per_sm`` blocks an SM (fewer: each walks several pairs), a
    bad setting refused by name."""
    d = fake_dense()
    calls = [
        d.quantized.prepared_fp8_silu(**fp8_silu_call()),
        d.quantized.prepared_fp8_qkv_rope(**{**fp8_qkv_call(), "rows": 1}),
    ]
    for call in calls:  # (kept: a launch's argument array lives as long as its prepared call)
        call()
    (fn, grid, _, _, block, _, _, smem, stream, params, _), qkv = d.launches
    assert (fn, grid, block, smem, stream) == (0x5000 + 0x100 + 0x10 + 2, N // 4, 128, 0, 0x77)
    slots = [d.launcher.ffi.cast("uint64_t*", params[i])[0] for i in range(29)]
    assert slots == [at(0), at(12), at(2), 2, N // 2, H, H, N // 2, at(14), H // 128, 128, 3] + [0] * 17
    fn, grid, block, params = qkv[0], qkv[1], qkv[4], qkv[9]
    assert (fn, grid, block) == (0x5000 + 0x200 + 0x10 + 1, 8 * 64 // 2, 128)  # one row: a block per pair
    slots = [d.launcher.ffi.cast("uint64_t*", params[i])[0] for i in range(29)]
    r = rope()
    assert slots[:12] == [at(0), at(13), at(2), 1, 8 * 64 // 2, H, H, 8 * 64, at(15), 0, 1, 0]
    assert slots[12:15] == [4, 2, 64] and slots[19:] == [
        at(6),
        at(7),
        at(8),
        at(9),
        at(10),
        at(11),
        16,
        *[r.stride_page, r.stride_n, r.stride_h],
    ]
    d.launches.clear()
    d.quantized.fp8.one_row_blocks_per_sm = 1  # 132 blocks (an H100's SMs) over 256 pairs
    d.quantized.prepared_fp8_qkv_rope(**{**fp8_qkv_call(), "rows": 1})()
    assert d.launches[0][1] == 132
    for bad in (0, 1025, 2.0, "4", None):
        d.quantized.fp8.one_row_blocks_per_sm = bad
        with pytest.raises(ValueError, match=r"^Fp8Linears.one_row_blocks_per_sm: expected an int from 1 to 1024"):
            d.quantized.prepared_fp8_qkv_rope(**{**fp8_qkv_call(), "rows": 1})
    del d.quantized.fp8.one_row_blocks_per_sm
    # from 3 rows: the tensor-core form, 8 pairs a block, the warps gemv gives the whole weight (N / 16 = 32 blocks:
    # 8 warps, as fewer than 8 warps an SM would be left)
    d.launches.clear()
    kept = d.quantized.prepared_fp8_silu(**{**fp8_silu_call(), "rows": 3})
    kept()
    fn, grid, _, _, block = d.launches[0][:5]
    assert (fn, grid, block) == (0x6000 + 0x100 + 0x10 + 1, N // 2 // 8, 256)


@pytest.mark.parametrize(
    ("entry", "change", "match"),
    [
        ("silu", dict(w=at(1)), r"^w: 0x[0-9a-f]+ is no registered FP8 weight"),
        ("silu", dict(rows=5), r"^rows: expected an int in \[1, 5\)"),
        ("silu", dict(x=at(0) + 8), r"^x: 0x[0-9a-f]+ must be a non-NULL address aligned to 16 bytes"),
        ("silu", dict(x_ld=H + 4), r"^x_ld: "),
        ("silu", dict(y_ld=N // 2 - 1), r"^y_ld: 255 elements between rows is less than a row's 256"),
        ("silu", dict(y=at(0) + 16), r"^y: overlaps x"),
        ("silu", dict(y=at(2) + 1), r"^y: 0x[0-9a-f]+ must be a non-NULL address aligned to 2 bytes"),
        ("silu", dict(k=2 * H), r"^n, k: the FP8 weight at 0x[0-9a-f]+ is \[512, 256\], the call says \[512, 512\]"),
        ("silu", dict(ab_type=D.CUDA_R_32F), r"^ab_type, c_type: FP8 weights take bfloat16 or float16"),
        ("qkv", dict(y=at(10)), r"^rope.k_cache: overlaps y"),
        ("qkv", dict(rope=dataclasses.replace(rope(), d=96)), r"^rope.d: the RoPE epilogue serves head dims"),
        ("qkv", dict(rope=dataclasses.replace(rope(), hq=2)), r"^n, k: the FP8 weight .* the call says \[384, 256\]"),
    ],
)
def test_a_bad_fp8_epilogue_call_is_refused_by_name(entry, change, match):
    d = fake_dense()
    method, call = (
        (d.quantized.prepared_fp8_silu, fp8_silu_call())
        if entry == "silu"
        else (d.quantized.prepared_fp8_qkv_rope, fp8_qkv_call())
    )
    warm = method(**call)
    warm()  # a valid call of the same layout first: the checks hold on every later call too (nothing is cached)
    with pytest.raises(ValueError, match=match):
        method(**{**call, **change})
    assert len(d.launches) == 1  # the warm call's launch only


@pytest.mark.parametrize(
    ("entry", "index", "address", "match"),
    [
        ("16-bit", "positions", at(2), r"^rope\.positions: overlaps y \(the launch writes it"),
        ("16-bit", "kv_indices", at(5), r"^rope\.kv_indices: overlaps h_out"),
        ("16-bit", "batch_indices", at(10) + 64, r"^rope\.batch_indices: overlaps rope\.k_cache"),
        ("fp8", "positions", at(2) + 4, r"^rope\.positions: overlaps y"),
        ("fp8", "kv_indptr", at(11), r"^rope\.kv_indptr: overlaps rope\.v_cache"),
        ("fp8", "batch_indices", (1 << 64) - 4, r"^rope\.batch_indices: 0x[0-9a-f]+ \+ 8 bytes runs past the end"),
    ],
)
def test_a_rope_epilogues_index_array_under_what_it_writes_is_refused_by_name(entry, index, address, match) -> None:  # type: ignore[no-untyped-def]
    """The QKV GEMVs' RoPE epilogue reads the step's index arrays while its blocks store qkv, the caches (and, 16-bit
    with ADD_NORM, the new residual): an index array under any of them is refused, after a warm valid call of the same
    layout (the check holds on every call)."""
    d = fake_dense()
    method, call = (
        (d.fused.prepared_qkv_rope, qkv_call())
        if entry == "16-bit"
        else (d.quantized.prepared_fp8_qkv_rope, fp8_qkv_call())
    )
    method(**call)
    with pytest.raises(ValueError, match=match):
        method(**{**call, "rope": dataclasses.replace(call["rope"], **{index: address})})


def test_an_odd_gate_up_weight_and_a_missing_kernel_are_refused_by_name() -> None:
    d = fake_dense()
    d.quantized.fp8_weights[at(16)] = Fp8Weight(at(16), N - 1, H, at(14), None)
    with pytest.raises(ValueError, match=r"^w: the gate/up weight has 511 rows; the SiLU pairs gate and up rows"):
        d.quantized.prepared_fp8_silu(**{**fp8_silu_call(), "w": at(16)})
    d.quantized.fp8.pair_fn = lambda *args: None  # type: ignore[method-assign]  # what a failed compile leaves
    with pytest.raises(ValueError, match=r"^w: no FP8 GEMV with the SiLU epilogue compiled"):
        d.quantized.prepared_fp8_silu(**fp8_silu_call())
    assert d.launches == []

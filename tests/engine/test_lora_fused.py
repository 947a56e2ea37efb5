"""The LoRA form of the fused decode step, no GPU: its launches packed in the order of ``csrc/lora_fused.cu``'s kernel
parameters (read from the source), the kernel of each kind, type and row count picked, each bad value refused by
name before any launch, and the slots' addresses each launch reads (``DeviceSlots.shrink_operands`` /
``expand_operands``) pointing at the numpy layout's matrices, through which the kernels' arithmetic is the merged
weights' product.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fi_engine.kernels import fused_args as F
from fi_engine.kernels.cublas import CUDA_R_16BF, CUDA_R_16F
from fi_engine.kernels.cuda_sources import read
from fi_engine.kernels.fused_gemv import WARPS, FusedGemvs, FusedKernels
from fi_engine.kernels.launch import Launcher
from fi_engine.kernels.lora_fused import (
    SHRINK_THREADS,
    LoraExpand,
    LoraFusedGemvs,
    LoraFusedKernels,
    expand_ints,
    grid_ints,
    shrink_launch,
)
from fi_engine.kernels.quantized_weights import QuantizedWeights
from fi_engine.lora.device import DeviceSlots
from fi_engine.lora.slots import Group, PackedAdapter, SlotLayout
from fi_ffi.cuda import driver

pytestmark = pytest.mark.cpu_only

BASE = 1 << 40  # fake device addresses, 1 GiB apart, 16-byte aligned, never dereferenced
H, N, R = 256, 512, 16  # hidden size (k), output columns, the slots' rank
KINDS = ("copy", "norm", "addnorm", "norm_rope", "addnorm_rope", "addnorm_gateup")


def at(i: int) -> int:
    return BASE + (i << 30)


def by_rows(fn: int) -> tuple[int, ...]:
    return tuple(fn + 0x100 * r for r in range(4))  # the kernels of 1 to 4 rows


def fake_gemvs(in_grid: bool = False) -> tuple[LoraFusedGemvs, list[tuple[Any, ...]]]:
    """LoraFusedGemvs over a real Launcher (recording cuLaunchKernel), the fused GEMVs' fake handles and the LoRA
    kernels' of the form ``in_grid`` (kind i of type ab: 0x8000 + 0x1000 * (ab == bf16) + 0x10 * i, + 0x100 per row,
    and 0x2000 more in the grid form; the launched form's shrinks 0x9000 + mode)."""
    launches: list[tuple[Any, ...]] = []
    launcher = Launcher(0x77, lambda *args: launches.append(args) or 0, None, driver.ffi())
    fns = {(m, ab, ab): by_rows(0x1000 + m) for ab in (CUDA_R_16F, CUDA_R_16BF) for m in (F.NORM, F.ADD_NORM)}
    fns |= {(m | F.ROPE, ab, ab): by_rows(0x2000 + m) for ab in (CUDA_R_16F, CUDA_R_16BF) for m in (1, 2)}
    fns |= {(m | F.GATE_UP, ab, ab): by_rows(0x6000 + m) for ab in (CUDA_R_16F, CUDA_R_16BF) for m in (1, 2)}
    kernels = FusedKernels(fns, (48 << 10) - 1024, 1056)
    quantized = QuantizedWeights(launcher, kernels.smem, lambda: None, lambda key, accumulate: None)
    quantized.fp8_weights = {at(12): object()}  # a weight registered as FP8 (refused: 16-bit only)
    fused = FusedGemvs(launcher, kernels, quantized)
    gemvs = {
        (kind, ab): by_rows(0x8000 + 0x2000 * in_grid + 0x1000 * (ab == CUDA_R_16BF) + 0x10 * i)
        for ab in (CUDA_R_16F, CUDA_R_16BF)
        for i, kind in enumerate(KINDS)
    }
    shrinks = {} if in_grid else {(m, ab): 0x9000 + m for ab in (CUDA_R_16F, CUDA_R_16BF) for m in (F.NORM, F.ADD_NORM)}
    kernels = LoraFusedKernels(gemvs, shrinks, (48 << 10) - 1024, None, in_grid)
    return LoraFusedGemvs(fused, launcher, kernels), launches


def expand(n: int = N, parts: int = 1) -> LoraExpand:
    n0, n1 = (n // parts, n // parts * 2 if parts == 3 else n) if parts > 1 else (n, n)
    return LoraExpand(
        t=at(20), t_ld=3 * R, slots=at(21), targets=at(22), bit=2, bt=at(23), b_slot=4 * R * n, rank=R, n0=n0, n1=n1
    )


def in_grid(e: LoraExpand, parts: int = 1, sync: int = 0) -> LoraExpand:
    """``e`` with the in-grid shrink's fields: A of ``parts * R`` rows of H inputs, its own counters ``sync``."""
    return dataclasses.replace(e, a=at(24), a_slot=4 * R * H, scale=at(25), width=parts * R, sync=at(26) + 16 * sync)


def params_of(launch: tuple[Any, ...], count: int) -> list[int]:
    ffi = driver.ffi()
    return [ffi.cast("uint64_t*", launch[9][i])[0] for i in range(count)]


def kernel_params(text: str) -> list[str]:
    """The parameter names of a C parameter list (the last identifier of each comma-separated part)."""
    return [re.findall(r"\w+", part)[-1] for part in text.replace("\\", " ").split(",") if part.strip()]


def macro_body(source: str, name: str) -> str:
    return re.search(rf"#define {name}\b(.*?)(?<!\\)\n", source, re.S).group(1)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------ the kernels' parameters


def test_the_expand_and_shrink_arguments_are_packed_in_the_kernels_parameter_order() -> None:
    """expand_ints' order is LORA_PARAMS' (the fields of LoraExpand), after the fused GEMV's 13 (and the RoPE
    kernel's 17); shrink_launch's is LORA_SHRINK's signature; each value is the call's (eps its float32 bits)."""
    lora_cu, fused_cu = read("lora_fused.cu"), read("fused_gemv.cu")
    fields = [f.name for f in dataclasses.fields(LoraExpand)]
    assert kernel_params(macro_body(lora_cu, "LORA_PARAMS")) == fields[:10]
    e = expand()
    assert expand_ints(e, N) == [getattr(e, f) for f in fields[:10]]
    # the in-grid shrink's kernels: LORA_PARAMS, then the rest of LoraExpand's fields, in grid_ints' order
    assert kernel_params(macro_body(lora_cu, "LORA_GRID_PARAMS")) == ["LORA_PARAMS", *fields[10:]]
    g = in_grid(e)
    assert grid_ints(g, N, H) == [getattr(g, f) for f in fields[10:]]

    # the LoRA GEMVs take their base kernel's parameters, then LORA_PARAMS (or LORA_GRID_PARAMS)
    def params(source: str, macro: str) -> list[str]:
        return kernel_params(re.search(r"name##_r##R\((.*?)\) \{", macro_body(source, macro), re.S).group(1))  # type: ignore[union-attr]

    assert params(lora_cu, "LORA_FUSED") == [*params(fused_cu, "FUSED"), "LORA_FORM_PARAMS"]
    assert params(lora_cu, "LORA_PAIRS") == [*params(fused_cu, "PAIRS"), "LORA_FORM_PARAMS"]
    # the compiled form's parameters: the in-grid shrink's first (#if LORA_SHRINK_IN_GRID), the expand's alone after
    forms = re.findall(r"#define LORA_FORM_PARAMS (\w+)", lora_cu)
    assert forms == ["LORA_GRID_PARAMS", "LORA_PARAMS"]
    shrink = re.search(r"void name\((.*?)\) \{", macro_body(lora_cu, "LORA_SHRINK"), re.S).group(1)  # type: ignore[union-attr]
    names = kernel_params(shrink)
    call = dict(
        mode=F.ADD_NORM, rows=3, h=at(0), h_ld=H, x=at(1), x_ld=H, norm_weight=at(2), eps=1e-5, k=H, slots=at(3),
        scale=at(4), targets=at(5), bit=4, a=at(6), a_slot=3 * R * H, width=3 * R, t=at(7), t_ld=3 * R,
    )  # fmt: skip
    grid, smem, ints = shrink_launch(**call)
    values = {**call, "nw": call["norm_weight"], "eps": int.from_bytes(struct.pack("<f", 1e-5), "little")}
    assert ints == [values[n] for n in names]
    assert grid == (3 * R, 3) and smem == 2 * H  # a block per (t entry, row), one staged row


# ------------------------------------------------------------------------------------ the packed launches


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_each_lora_gemv_packs_the_base_arguments_then_the_expand_and_takes_its_kernel(rows: int) -> None:
    g, launches = fake_gemvs()
    kept = []  # the prepared calls, which keep their packed arguments alive

    def launch(prepared: Any) -> None:
        kept.append(prepared)
        prepared()

    e = expand()
    y_ld = N
    copy = dict(rows=rows, x=at(0), x_ld=H, w=at(1), n=N, k=H, y=at(2), y_ld=y_ld, ab_type=CUDA_R_16BF)
    launch(g.prepared_linear(e, F.PLAIN, **copy, c_type=CUDA_R_16BF))
    fn, grid, _, _, block, _, _, smem, stream, _, _ = launches[-1]
    assert (fn, grid, block, smem, stream) == (0x9000 + 0x100 * (rows - 1), N // WARPS, 32 * WARPS, rows * H * 2, 0x77)
    got = params_of(launches[-1], 23)
    assert got[:8] == [at(0), at(1), at(2), rows, N, H, H, y_ld] and got[8:13] == [0, 0, 0, 0, 0]
    assert got[13:] == expand_ints(e, N)
    normed = dict(copy, h=at(3), h_ld=H, norm_weight=at(4), h_out=at(5), eps=1e-5)
    launch(g.prepared_linear(e, F.ADD_NORM, **normed, c_type=CUDA_R_16BF))
    assert launches[-1][0] == 0x9020 + 0x100 * (rows - 1)  # addnorm (kind 2)
    assert params_of(launches[-1], 23)[8:12] == [at(3), at(4), at(5), H]
    # the QKV GEMV with RoPE: its 30 arguments, then the expand over its (4 + 2 * 2) * 64 columns
    rope = F.RopeAppend(
        hq=4, hk=2, d=64, theta=5e5, scale=1.0, llama3=False, low_freq_factor=1.0, high_freq_factor=4.0,
        old_context_len=8192.0, positions=at(6), batch_indices=at(7), kv_indptr=at(8), kv_indices=at(9),
        k_cache=at(10), v_cache=at(11), page_size=16, num_pages=8, stride_page=16 * 2 * 64, stride_n=128, stride_h=64,
    )  # fmt: skip
    qkv = normed | {"n": 8 * 64, "y_ld": 8 * 64}
    e3 = expand(8 * 64, 3)
    launch(g.prepared_qkv_rope(e3, rope, F.NORM, **qkv, c_type=CUDA_R_16BF))
    assert launches[-1][0] == 0x9030 + 0x100 * (rows - 1) and launches[-1][1] == 8 * 64 // 2 // WARPS
    assert params_of(launches[-1], 40)[30:] == expand_ints(e3, 8 * 64)
    # gate/up + SiLU: the expand over the weight's N columns (gate, then up), y N / 2 wide
    launch(g.prepared_gate_up_silu(expand(N, 2), F.ADD_NORM, **(normed | {"y_ld": N // 2}), c_type=CUDA_R_16BF))
    assert launches[-1][0] == 0x9050 + 0x100 * (rows - 1) and launches[-1][1] == N // 2 // WARPS
    got = params_of(launches[-1], 40)
    assert got[4] == N and got[30:] == expand_ints(expand(N, 2), N)


@pytest.mark.parametrize("rows", [1, 4])
def test_the_in_grid_form_takes_its_kernel_on_width_more_blocks_with_the_shrinks_arguments(rows: int) -> None:
    """A LoraExpand with ``sync`` takes the lora_grid kernel of its kind, on the base grid and ``width`` blocks more
    (its shrink blocks), the base arguments, then expand_ints', then grid_ints'."""
    g, launches = fake_gemvs(in_grid=True)
    kept = []
    copy = dict(rows=rows, x=at(0), x_ld=H, w=at(1), n=N, k=H, y=at(2), y_ld=N, ab_type=CUDA_R_16BF)
    e = in_grid(expand())
    kept.append(g.prepared_linear(e, F.PLAIN, **copy, c_type=CUDA_R_16BF))
    kept[-1]()
    fn, grid, _, _, block, _, _, smem, _, _, _ = launches[-1]
    assert (fn, grid, block, smem) == (0xB000 + 0x100 * (rows - 1), N // WARPS + R, 32 * WARPS, rows * H * 2)
    got = params_of(launches[-1], 28)
    assert got[13:23] == expand_ints(e, N) and got[23:] == grid_ints(e, N, H)
    # gate/up + SiLU: two parts, so 2 R shrink blocks, over its own counters
    e2 = in_grid(expand(N, 2), 2, sync=1)
    normed = dict(copy, h=at(3), h_ld=H, norm_weight=at(4), h_out=at(5), eps=1e-5, y_ld=N // 2)
    kept.append(g.prepared_gate_up_silu(e2, F.ADD_NORM, **normed, c_type=CUDA_R_16BF))
    kept[-1]()
    assert launches[-1][0] == 0xB050 + 0x100 * (rows - 1) and launches[-1][1] == N // 2 // WARPS + 2 * R
    assert params_of(launches[-1], 45)[40:] == grid_ints(e2, N, H)
    # the first call site's counters packed again with its grid: taken; with another grid: refused by name
    kept.append(g.prepared_linear(e, F.PLAIN, **copy, c_type=CUDA_R_16BF))
    with pytest.raises(ValueError, match="lora.sync: .* counts the launches of another call site"):
        half = dataclasses.replace(e, n0=N // 2, n1=N // 2)  # (an expand over N / 2 columns)
        g.prepared_linear(half, F.PLAIN, **(copy | {"n": N // 2, "y_ld": N // 2}), c_type=CUDA_R_16BF)


def test_each_form_refuses_the_other_forms_calls_by_name() -> None:
    """Kernels compiled with the shrinks in their grids take only a LoraExpand with counters and launch no normed
    shrink; those compiled for shrink launches take none with counters."""
    grid_form, launches = fake_gemvs(in_grid=True)
    launch_form, _ = fake_gemvs(in_grid=False)
    copy = dict(rows=1, x=at(0), x_ld=H, w=at(1), n=N, k=H, y=at(2), y_ld=N, ab_type=CUDA_R_16BF, c_type=CUDA_R_16BF)
    with pytest.raises(ValueError, match=r"lora.sync: these LoRA GEMVs were compiled with the shrinks in their grids"):
        grid_form.prepared_linear(expand(), F.PLAIN, **copy)
    with pytest.raises(ValueError, match=r"lora.sync: .* compiled with the shrinks launched before them"):
        launch_form.prepared_linear(in_grid(expand()), F.PLAIN, **copy)
    shrink = dict(
        rows=1, h=at(0), h_ld=H, x=at(1), x_ld=H, norm_weight=at(2), eps=1e-5, k=H, slots=at(3), scale=at(4),
        targets=at(5), bit=1, a=at(6), a_slot=3 * R * H, width=3 * R, t=at(7), t_ld=3 * R,
    )  # fmt: skip
    with pytest.raises(ValueError, match="ab_type: these LoRA GEMVs compute their shrinks in their own grids"):
        grid_form.prepared_shrink(CUDA_R_16BF, F.NORM, **shrink)
    assert launches == []


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"width": 2 * R}, r"lora.width: expected the 1 parts times lora.rank \(16\), got 32"),
        ({"width": 0}, r"lora.width: expected an int in \[1, "),
        ({"a_slot": R * H - 8}, "lora.a_slot: "),
        ({"a_slot": 4 * R * H + 4}, "lora.a_slot: .* multiple of 8"),
        ({"a": at(24) + 8}, "lora.a: .* aligned to 16 bytes"),
        ({"a": 0}, "lora.a: .* non-NULL"),
        ({"scale": at(25) + 2}, "lora.scale: "),
        ({"sync": at(26) + 4}, "lora.sync: .* aligned to 8 bytes"),
        ({"sync": -8}, "lora.sync: "),
    ],
)
def test_a_bad_in_grid_field_is_refused_by_name_before_any_launch(change, match) -> None:
    g, launches = fake_gemvs(in_grid=True)
    e = dataclasses.replace(in_grid(expand()), **change)
    copy = dict(rows=1, x=at(0), x_ld=H, w=at(1), n=N, k=H, y=at(2), y_ld=N, ab_type=CUDA_R_16BF)
    with pytest.raises((TypeError, ValueError), match=match):
        g.prepared_linear(e, F.PLAIN, **copy, c_type=CUDA_R_16BF)
    assert launches == []


def test_the_lora_qkv_gemv_finds_mode_behind_rope_given_by_name() -> None:
    """The LoRA QKV form takes ``rope`` by name with the base parameters positional, as the base form does: its mode
    check reads ``mode`` (not ``rows``, one place on), and a bad mode is still refused naming it."""
    g, launches = fake_gemvs()
    rope = F.RopeAppend(
        hq=4, hk=2, d=64, theta=5e5, scale=1.0, llama3=False, low_freq_factor=1.0, high_freq_factor=4.0,
        old_context_len=8192.0, positions=at(6), batch_indices=at(7), kv_indptr=at(8), kv_indices=at(9),
        k_cache=at(10), v_cache=at(11), page_size=16, num_pages=8, stride_page=16 * 2 * 64, stride_n=128, stride_h=64,
    )  # fmt: skip
    rest = (3, at(0), H, at(1), 8 * 64, H, at(2), 8 * 64, CUDA_R_16BF, CUDA_R_16BF, at(3), H, at(4), at(5), 1e-5)
    e3 = expand(8 * 64, 3)
    prepared = g.prepared_qkv_rope(e3, F.NORM, *rest, rope=rope)
    prepared()
    assert launches[-1][0] == 0x9030 + 0x100 * 2  # norm_rope, 3 rows
    with pytest.raises(ValueError, match="mode: the lora qkv gemv \\+ rope takes NORM or ADD_NORM, got 0"):
        g.prepared_qkv_rope(e3, F.PLAIN, *rest, rope=rope)


def test_the_normed_shrink_launches_its_mode_and_types_kernel_on_its_grid() -> None:
    g, launches = fake_gemvs()
    call = dict(
        rows=2, h=at(0), h_ld=H, x=at(1), x_ld=H, norm_weight=at(2), eps=1e-5, k=H, slots=at(3), scale=at(4),
        targets=at(5), bit=1, a=at(6), a_slot=3 * R * H, width=3 * R, t=at(7), t_ld=3 * R,
    )  # fmt: skip
    prepared = g.prepared_shrink(CUDA_R_16F, F.NORM, **call)
    prepared()
    fn, gx, gy, _, block, _, _, smem, _, _, _ = launches[-1]
    assert (fn, gx, gy, block, smem) == (0x9000 + F.NORM, 3 * R, 2, SHRINK_THREADS, 2 * H)
    with pytest.raises(ValueError, match="ab_type: no LoRA shrink"):
        g.prepared_shrink(0, F.NORM, **call)
    with pytest.raises(TypeError, match="ab_type: "):
        g.prepared_shrink([CUDA_R_16F], F.NORM, **call)


def test_the_normed_shrink_is_launched_with_programmatic_dependent_launch() -> None:
    """Through cuLaunchKernelEx the normed shrink carries the programmatic-stream-serialization attribute (its blocks
    wait for the kernel before them on the GPU, lora_shrink.cuh's shrink_start, so that the GEMV after it loads its
    weights while it sums) on its own grid; with Launcher.pdl off it carries none."""
    g, _ = fake_gemvs()
    seen: list[tuple[Any, ...]] = []

    def launch_ex(config: Any, fn: int, params: Any, extra: Any) -> int:
        attrs = [(config.attrs[i].id, int.from_bytes(bytes(config.attrs[i].value[0:4]), "little"))
                 for i in range(config.numAttrs)]  # fmt: skip
        seen.append((fn, config.gridDimX, config.gridDimY, attrs))
        return 0

    g.launcher.launch_ex = launch_ex
    call = dict(
        rows=3, h=at(0), h_ld=H, x=at(1), x_ld=H, norm_weight=at(2), eps=1e-5, k=H, slots=at(3), scale=at(4),
        targets=at(5), bit=1, a=at(6), a_slot=3 * R * H, width=3 * R, t=at(7), t_ld=3 * R,
    )  # fmt: skip
    g.prepared_shrink(CUDA_R_16BF, F.ADD_NORM, **call)()
    assert seen == [(0x9000 + F.ADD_NORM, 3 * R, 3, [(6, 1)])]
    Launcher.pdl = False
    try:
        g.prepared_shrink(CUDA_R_16BF, F.ADD_NORM, **call)()
    finally:
        Launcher.pdl = True
    assert seen[1][3] == []


def test_both_shrink_kernels_wait_for_the_kernel_before_them_first() -> None:
    """The decode shrink (lora_bgmv.cu) and the normed shrink (lora_fused.cu), launched with programmatic dependent
    launch, call shrink_start (griddep_launch_dependents, then griddep_wait) before their first read and before any
    block returns: a block that returned before waiting would let its grid, and so the GEMV waiting on it, end
    before the kernel that wrote the shrink's input."""
    start = read("lora_shrink.cuh")
    body = re.search(r"void shrink_start\(\) \{(.*?)\}", start, re.S).group(1)  # type: ignore[union-attr]
    assert body.index("griddep_launch_dependents") < body.index("griddep_wait")
    for file, fn in (("lora_bgmv.cu", "shrink_rows"), ("lora_fused.cu", "shrink_normed")):
        text = read(file)
        kernel = text[text.index(f"void {fn}(") :]
        kernel = kernel[: kernel.index("\n}\n")]
        first = min(kernel.index(w) for w in ("return", "slots[", "stage<", "__ldg") if w in kernel)
        assert "shrink_start();" in kernel and kernel.index("shrink_start();") < first, f"{file}: {fn}"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rank": 0}, r"lora.rank: expected an int in \[1, 513\)"),
        ({"n0": N + 1}, "lora.n0: "),
        ({"n1": 1, "n0": 2}, "lora.n1: "),
        ({"t_ld": R - 1}, "lora.t_ld: "),
        ({"b_slot": R * N - 1}, "lora.b_slot: "),
        ({"t": at(20) + 2}, "lora.t: .* aligned to 4 bytes"),
        ({"slots": 0}, "lora.slots: .* non-NULL"),
        ({"bt": at(23) + 1}, "lora.bt: .* aligned to 2 bytes"),
        ({"targets": 1.5}, "lora.targets"),
        ({"bit": True}, "lora.bit"),
    ],
)
def test_a_bad_expand_field_is_refused_by_name_before_any_launch(change, match) -> None:
    g, launches = fake_gemvs()
    e = dataclasses.replace(expand(), **change)
    copy = dict(rows=1, x=at(0), x_ld=H, w=at(1), n=N, k=H, y=at(2), y_ld=N, ab_type=CUDA_R_16BF)
    with pytest.raises((TypeError, ValueError), match=match):
        g.prepared_linear(e, F.PLAIN, **copy, c_type=CUDA_R_16BF)
    with pytest.raises(TypeError, match="lora: expected a LoraExpand"):
        expand_ints(dataclasses.asdict(expand()), N)
    assert launches == []


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mode": F.SILU}, "mode: the lora gemv takes PLAIN or NORM or ADD_NORM"),
        ({"mode": True}, "mode: the lora gemv takes PLAIN"),
        ({"w": at(12)}, "w: the LoRA fused GEMVs read 16-bit weights"),
        ({"w": at(1) + 8}, "w: .* aligned to 16 bytes"),
        ({"rows": 5}, "rows, k: the fused GEMV does not serve 5 rows"),
        ({"k": H + 4}, "rows, k: "),
        ({"y": at(0) + 16}, "y: overlaps x"),
        ({"x_ld": H - 8, "rows": 2}, "x_ld: "),
        ({"ab_type": CUDA_R_16F + 1000, "c_type": CUDA_R_16F + 1000}, "ab_type: no LoRA fused GEMV"),
        ({"c_type": CUDA_R_16F}, "c_type: this GEMV writes its output as type 14, got 2"),
        ({"x": None}, "x: "),
    ],
)
def test_a_bad_copy_gemv_call_is_refused_by_name(change, match) -> None:
    g, launches = fake_gemvs()
    call = dict(mode=F.PLAIN, rows=1, x=at(0), x_ld=H, w=at(1), n=N, k=H, y=at(2), y_ld=N, ab_type=CUDA_R_16BF)
    call |= dict(c_type=CUDA_R_16BF)
    with pytest.raises((TypeError, ValueError), match=match):
        g.prepared_linear(expand(), **{**call, **change})
    assert launches == []


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mode": F.SILU}, "mode: a normed shrink takes NORM or ADD_NORM"),
        ({"k": H + 4}, "k: expected a multiple of 8"),
        ({"k": 1 << 15}, r"k: expected an int in \[8, "),
        ({"a": at(6) + 8}, "a: .* aligned to 16 bytes"),
        ({"a_slot": 3 * R * H + 4}, "a_slot: "),
        ({"scale": at(4) + 2}, "scale: "),
        ({"x": 0}, "x: .* non-NULL"),  # ADD_NORM reads x
        ({"h_ld": H - 8}, "h_ld: "),
        ({"t_ld": 3 * R - 1}, "t_ld: "),
        ({"width": 0}, "width: "),
        ({"eps": float("inf")}, "eps: "),
        ({"rows": 0}, "rows: "),
    ],
)
def test_a_bad_shrink_call_is_refused_by_name(change, match) -> None:
    call = dict(
        mode=F.ADD_NORM, rows=2, h=at(0), h_ld=H, x=at(1), x_ld=H, norm_weight=at(2), eps=1e-5, k=H, slots=at(3),
        scale=at(4), targets=at(5), bit=1, a=at(6), a_slot=3 * R * H, width=3 * R, t=at(7), t_ld=3 * R,
    )  # fmt: skip
    with pytest.raises((TypeError, ValueError), match=match):
        shrink_launch(**{**call, **change})
    shrink_launch(**{**call, "mode": F.NORM, "x": 0})  # NORM reads no x


# ------------------------------------------------------------------------------------ the slots' addresses


class HostArray:
    """A numpy array standing in for a CuPy one: ``data.ptr`` its host address."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.shape = a, a.shape
        self.data = SimpleNamespace(ptr=a.ctypes.data)


def host_slots(layout: SlotLayout, slots: int, rows: int, rng: np.random.Generator) -> DeviceSlots:
    """DeviceSlots made without its constructor (no GPU): the slot arrays random float16 host arrays."""
    d = DeviceSlots.__new__(DeviceSlots)
    d.layout, d.slots = layout, slots
    d.arrays = {
        g.name: (
            HostArray(rng.standard_normal((slots, *layout.a_shape(g))).astype(np.float16)),
            HostArray(rng.standard_normal((slots, *layout.bt_shape(g))).astype(np.float16)),
        )
        for g in layout.groups
    }
    d.scale = HostArray(rng.uniform(0.5, 2, slots).astype(np.float32))
    d.targets = HostArray(np.full(slots, 0b1111, np.int32))
    d.t = HostArray(np.zeros((rows, layout.t_width), np.float32))
    d.sync = HostArray(np.zeros((layout.num_layers, len(layout.groups), 2), np.uint64))
    d._groups = {g.name: g for g in layout.groups}
    return d


def read16(address: int, count: int) -> np.ndarray:
    """``count`` float16 values at host ``address``."""
    import ctypes

    return np.frombuffer((ctypes.c_uint16 * count).from_address(address), np.float16).copy()


@pytest.mark.parametrize("group", ["qkv", "o", "gate_up", "down"])
def test_the_fused_launches_read_each_rows_slot_and_layer_and_compute_the_merged_product(group: str) -> None:
    """Through the addresses the fused step's launches take (shrink_operands, expand_operands) and the kernels'
    indexing (A_s at a + s * a_slot, row j at j * k; Bt_s at bt + s * b_slot, entry (i, j) at i * n + j; column j's
    part p(j) = (j >= n0) + (j >= n1)), each row of a step of mixed slots (-1: none) gets W x + scale_s B_s A_s x: the
    merged weights' product, in float64 here."""
    rng = np.random.default_rng(3)
    groups = (
        Group("qkv", ("q_proj", "k_proj", "v_proj"), (64, 32, 32), 48, 1),
        Group("o", ("o_proj",), (48,), 64, 2),
        Group("gate_up", ("gate_proj", "up_proj"), (40, 40), 48, 4),
        Group("down", ("down_proj",), (48,), 40, 8),
    )
    layout = SlotLayout(groups, num_layers=3, rank=8)
    d = host_slots(layout, slots=3, rows=4, rng=rng)
    g = d._groups[group]
    layer, row_slots = 2, np.array([1, -1, 2, 0], np.int32)
    a_at, a_slot, width, bit = d.shrink_operands(group, layer)
    e = d.expand_operands(group, layer, row_slots.ctypes.data)
    assert width == len(g.modules) * layout.rank and bit == g.bit and e.bit == g.bit
    assert (e.n0, e.n1) == g.split and e.rank == layout.rank and e.t_ld == layout.t_width
    assert e.t == d.t.data.ptr and e.targets == d.targets.data.ptr and e.slots == row_slots.ctypes.data
    expand_ints(e, g.n)  # the kernels take them
    # the in-grid shrink reads the same A and scales as the shrink launch, over the layer and group's own counters
    eg = d.expand_operands(group, layer, row_slots.ctypes.data, in_grid=True)
    assert (eg.a, eg.a_slot, eg.width, eg.scale) == (a_at, a_slot, width, d.scale.data.ptr)
    assert dataclasses.replace(eg, a=0, a_slot=0, scale=0, width=0, sync=0) == e
    grid_ints(eg, g.n, g.k)
    counters = {d.expand_operands(n, i, 0, True).sync for n in d._groups for i in range(layout.num_layers)}
    assert len(counters) == 4 * layout.num_layers and eg.sync in counters
    base = d.sync.data.ptr
    assert all(base <= c <= base + d.sync.a.nbytes - 16 and c % 16 == 0 for c in counters)
    x = rng.standard_normal((4, g.k))
    w = rng.standard_normal((g.n, g.k))
    y = np.empty((4, g.n))
    for r, s in enumerate(row_slots):
        y[r] = w @ x[r]
        if s < 0:
            continue
        # the shrink: t[r, j] = scale[s] * A_s[j] . x[r], A_s read where the kernel reads it
        a_s = read16(a_at + 2 * int(s) * a_slot, width * g.k).reshape(width, g.k).astype(np.float64)
        t = d.scale.a[s] * (a_s @ x[r])
        # the expand: y[r, j] += t[p(j) rank : (p(j) + 1) rank] . Bt_s[:, j]
        bt_s = read16(e.bt + 2 * int(s) * e.b_slot, e.rank * g.n).reshape(e.rank, g.n).astype(np.float64)
        for j in range(g.n):
            p = (j >= e.n0) + (j >= e.n1)
            y[r, j] += t[p * e.rank : (p + 1) * e.rank] @ bt_s[:, j]
    # the merged weights: W + scale_s B_s A_s per part, from the numpy layout (A [L, P R, k], Bt [L, R, n])
    a_all, bt_all = (arr.a.astype(np.float64) for arr in d.arrays[group])
    bounds = np.concatenate([[0], np.cumsum(g.outs)])
    for r, s in enumerate(row_slots):
        merged = w.copy()
        if s >= 0:
            for p in range(len(g.modules)):
                a_p = a_all[s, layer, p * layout.rank : (p + 1) * layout.rank]
                b_p = bt_all[s, layer, :, bounds[p] : bounds[p + 1]].T
                merged[bounds[p] : bounds[p + 1]] += d.scale.a[s] * b_p @ a_p
        np.testing.assert_allclose(y[r], merged @ x[r], rtol=1e-10, atol=1e-9)


def test_a_packed_adapter_written_to_a_slot_is_what_the_addresses_read() -> None:
    """pack's arrays, as write copies them into slot s, are what shrink_operands / expand_operands point at for that
    slot and layer (the fused step's launches read no other layout than the separate ones)."""
    rng = np.random.default_rng(4)
    layout = SlotLayout((Group("o", ("o_proj",), (48,), 64, 2),), num_layers=2, rank=8)
    d = host_slots(layout, slots=2, rows=1, rng=rng)
    a = rng.standard_normal(layout.a_shape(layout.groups[0])).astype(np.float16)
    bt = rng.standard_normal(layout.bt_shape(layout.groups[0])).astype(np.float16)
    packed = PackedAdapter({"o": (a, bt)}, 1.0, 2)
    d.arrays["o"][0].a[1], d.arrays["o"][1].a[1] = packed.arrays["o"]  # write's copy into slot 1
    a_at, a_slot, width, _ = d.shrink_operands("o", 1)
    e = d.expand_operands("o", 1, 0x100)
    np.testing.assert_array_equal(read16(a_at + 2 * a_slot, width * 64).reshape(width, 64), a[1])
    np.testing.assert_array_equal(read16(e.bt + 2 * e.b_slot, 8 * 48).reshape(8, 48), bt[1])
    assert d.has("o") and not d.has("qkv")

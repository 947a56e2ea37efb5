"""The int4 QKV GEMV with RoPE and the KV append as its epilogue, on the CPU
(``QuantizedWeights.prepared_int4_qkv_rope``, ``Int4Linears.gemv``'s ``rope``; on the GPU: test_gpu_int4_linear.py and
test_gpu_int4_llama.py): the RoPE form's kernels take the plain GEMV's parameters, then ``ROPE_APPEND_PARAMS``, whose
order is ``RopeAppendArgs``'s fields and ``fused_args.rope_ints``' values; the launch packs those values on a grid of
a block per 16 columns of both halves of a head with twice the plain launch's warps; every bad call refused by name
before any launch."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fi_engine.kernels.cuda_sources import read
from fi_engine.kernels.dense import CUDA_R_16BF, CUDA_R_32F
from fi_engine.kernels.fused_args import RopeAppend, rope_ints
from fi_engine.kernels.int4_linear import Int4Linears, Int4Weight
from fi_engine.kernels.launch import Launcher
from fi_engine.kernels.quantized_weights import QuantizedWeights
from fi_ffi.cuda import driver

pytestmark = pytest.mark.cpu_only

A = 1 << 40  # fake device addresses, 1 GiB apart, never dereferenced
HQ, HK, D, K = 4, 2, 128, 2048
N = (HQ + 2 * HK) * D


def at(i: int) -> int:
    return A + (i << 30)


def kernel_params(text: str) -> list[str]:
    return [re.findall(r"\w+", part)[-1] for part in text.replace("\\", " ").split(",") if part.strip()]


def macro_body(source: str, name: str) -> str:
    return re.search(rf"#define {name}\b(.*?)(?<!\\)\n", source, re.S).group(1)  # type: ignore[union-attr]


def rope(**change: Any) -> RopeAppend:
    fields = dict(
        hq=HQ, hk=HK, d=D, theta=1e4, scale=1.0, llama3=False, low_freq_factor=1.0, high_freq_factor=4.0,
        old_context_len=8192.0, positions=at(20), batch_indices=at(21), kv_indptr=at(22), kv_indices=at(23),
        k_cache=at(24), v_cache=at(26), page_size=16, num_pages=8, stride_page=16 * HK * D, stride_n=HK * D,
        stride_h=D,
    )  # fmt: skip
    return RopeAppend(**{**fields, **change})


def test_the_rope_kernels_take_the_gemvs_parameters_then_the_ropes_in_rope_ints_order() -> None:
    int4, header = read("int4_gemv.cu"), read("rope_append.cuh")
    gemv4 = kernel_params(re.search(r"name\((.*?)\) \{", macro_body(int4, "GEMV4"), re.S).group(1))  # type: ignore[union-attr]
    gemv4r = kernel_params(re.search(r"name\((.*?)\) \{", macro_body(int4, "GEMV4R"), re.S).group(1))  # type: ignore[union-attr]
    assert gemv4r == [*gemv4, "ROPE_APPEND_PARAMS"]
    params = kernel_params(macro_body(header, "ROPE_APPEND_PARAMS"))
    struct = header.split("struct RopeAppendArgs {")[1].split("};")[0]
    fields = [name for line in struct.split(";") for name in re.findall(r"\*?\s*(\w+)\s*(?:,|$)", line.strip())]
    assert params == ["rope_" + f for f in fields]
    assert macro_body(header, "ROPE_APPEND_ARGS").split("{")[1].split("}")[0].replace("\\", " ").split() == [
        p + "," for p in params[:-1]
    ] + [params[-1]]
    # rope_ints packs the same fields in that order: the ints, the four float32 constants, the addresses, the strides
    r = rope()
    ints = rope_ints(r)
    assert len(ints) == len(params) == 17
    named = dict(zip(params, ints, strict=True))
    assert (named["rope_hq"], named["rope_hk"], named["rope_d"], named["rope_page_size"]) == (HQ, HK, D, 16)
    assert [named[f"rope_{f}"] for f in ("positions", "batch_indices", "kv_indptr", "kv_indices")] == [
        at(20), at(21), at(22), at(23)
    ]  # fmt: skip
    assert (named["rope_k_cache"], named["rope_v_cache"]) == (at(24), at(26))
    assert (named["rope_stride_page"], named["rope_stride_n"], named["rope_stride_h"]) == (16 * HK * D, HK * D, D)


def registry() -> tuple[QuantizedWeights, list[tuple[Any, ...]], Launcher]:
    """QuantizedWeights over a real Launcher recording cuLaunchKernel, its Int4Linears made without compiling (the
    RoPE form's handles fake numbers), one int4 QKV weight [N, K] in order and one interleaved gate/up weight."""
    launches: list[tuple[Any, ...]] = []
    launcher = Launcher(0x77, lambda *args: launches.append(args) or 0, None, driver.ffi())
    q = QuantizedWeights(launcher, 0, lambda: None, lambda key, accumulate: None)
    lib = Int4Linears(launcher.launch, launcher.ffi, launcher.stream)
    lib._rope = {(bf16, g64): 0x4400 + 2 * bf16 + g64 for bf16 in (False, True) for g64 in (False, True)}
    lib.weights = {at(1): Int4Weight(at(1), N, K, at(2), 128), at(3): Int4Weight(at(3), N, K, at(4), 128, N // 2)}
    q.int4, q.int4_weights = lib, lib.weights
    return q, launches, launcher


def test_the_rope_launch_packs_its_values_on_a_block_per_16_columns_of_each_half_of_a_head() -> None:
    q, launches, launcher = registry()
    assert q.has_int4_rope(at(1)) and not q.has_int4_rope(at(3)) and not q.has_int4_rope(at(9))
    x, y = at(10), at(11)
    q.prepared_int4_qkv_rope(2, x, K, at(1), K, y, N, CUDA_R_16BF, rope())()
    fn, grid, _, _, block, _, _, smem, stream, params, _ = launches[-1]
    plain = q.int4._threads(q.int4.weights[at(1)], 2, 0)  # (fake handles: no registers known)
    assert (fn, grid, block, smem, stream) == (0x4402, N // 32, 2 * plain, 0, 0x77)
    slots = [launcher.ffi.cast("uint64_t*", params[i])[0] for i in range(29)]
    assert slots[:12] == [x, at(1), y, 2, N, K, K, N, at(2), K // 128, 1, 0]  # (gshift 1: groups of 128)
    assert slots[12:] == rope_ints(rope())


def test_the_rope_form_takes_at_most_1024_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """However many warps an SM the plain launch aims at, it takes at most 16 a block: the RoPE form 32 (1024
    threads, the kernel's launch bound)."""
    monkeypatch.setattr(Int4Linears, "warps_per_sm", (1024,) * 3)
    q, launches, _ = registry()
    q.prepared_int4_qkv_rope(2, at(10), K, at(1), K, at(11), N, CUDA_R_16BF, rope())()
    assert launches[-1][4] == 1024


def test_the_warps_a_block_keep_the_most_warps_resident_by_the_registers() -> None:
    """Up to 8 rows, the warps a block the table asks for rise to the fewest that keep the most warps resident an SM
    by the kernel's registers (65,536 an SM, 256 a warp at a time); unknown registers (0) and more rows keep the
    table's: a QKV-shaped weight [6144, 4096] on 132 SMs."""
    lib = Int4Linears(lambda *a: 0, None, 0)
    qkv = Int4Weight(at(1), 6144, 4096, at(2), 128)
    assert lib._threads(qkv, 1, 0) == 32 * 11  # the table's: 32 warps an SM over 384 blocks
    assert lib._threads(qkv, 1, 60) == 32 * 16  # 11 warps of 60 registers: 22 resident; 16: 32
    assert lib._threads(qkv, 8, 64) == 32 * 16
    assert lib._threads(qkv, 9, 60) == 32 * 6  # (more rows: the table's: 16 warps an SM over 384 blocks)
    assert lib._threads(qkv, 32, 60) == 32 * 4
    gate_up = Int4Weight(at(3), 28672, 4096, at(4), 128, 14336)
    assert lib._threads(gate_up, 1, 60) == 32 * 4  # blocks of 4 warps: 8 an SM, 32 warps


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"rows": 9}, ValueError, "^rows"),
        ({"rows": 0}, ValueError, "^rows"),
        ({"w": at(3)}, ValueError, "^w: .* registered in order"),
        ({"w": at(9)}, ValueError, "^w: .* registered in order"),
        ({"x": at(10) + 8}, ValueError, "^x: .* aligned to 16 bytes"),
        ({"y": at(11) + 1}, ValueError, "^y: .* 2 bytes"),
        ({"y": at(10)}, ValueError, "^y: overlaps x"),
        ({"ab_type": CUDA_R_32F}, ValueError, "^ab_type, c_type"),
        ({"rope": rope(hq=HQ + 1)}, ValueError, "^n, k: the int4 weight"),
        ({"rope": rope(d=96)}, ValueError, "^rope.d"),
        ({"rope": rope(k_cache=at(10))}, ValueError, "^rope.k_cache: overlaps x"),
        ({"rope": rope(positions=at(11) + 8)}, ValueError, "^rope.positions: overlaps y"),
        ({"rope": rope(kv_indices=at(26) + 4)}, ValueError, "^rope.kv_indices: overlaps rope.v_cache"),
        ({"rope": None}, TypeError, "^rope: expected a RopeAppend"),
        ({"k": 1.5}, TypeError, "^k"),
    ],
)
def test_a_bad_call_is_refused_by_name(change: dict[str, Any], error: type, match: str) -> None:
    q, launches, _ = registry()
    call = dict(rows=2, x=at(10), x_ld=K, w=at(1), k=K, y=at(11), y_ld=N, ab_type=CUDA_R_16BF, rope=rope())
    q.prepared_int4_qkv_rope(**call)  # a warm, valid call of the same layout first: the checks hold after it too
    with pytest.raises(error, match=match):
        q.prepared_int4_qkv_rope(**{**call, **change})
    assert launches == []

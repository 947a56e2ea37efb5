"""FP8 (e4m3) weights split over tensor-parallel ranks, on the host: which shapes and shards keep e4m3
(``Fp8Scheme.shard_refusal`` for the dense projections, refused before any GPU work by the Llama family's check,
naming the projection; ``Fp8Scheme.experts_for`` for a mixture-of-experts model's experts, dequantized at load where
the FP8 grouped GEMV cannot read a rank's share), and what each rank's load registers: the codes and scales of its
cut of every projection, bit for bit (``Llama.load`` with a stand-in for the GPU: uploads kept on the host, the
GEMMs' registrations recorded). The GPU side is tests/engine/test_gpu_llama_tp.py and test_gpu_moe_tp.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers.fp8_checkpoints import write_fp8_copy
from helpers.host_uploads import HostArrays
from helpers.moe_checkpoints import save_random_qwen3_moe
from helpers.random_llama import save_random_llama

from fi_engine.checkpoint.config import LlamaConfig
from fi_engine.checkpoint.quantization import Fp8Scheme
from fi_engine.checkpoint.safetensors import Checkpoint
from fi_engine.models.llama import Llama, _fp8_projection_sizes, _read_fp8_experts
from fi_engine.models.weights import WeightLoader

BLOCK = Fp8Scheme("fp8", "block", "dynamic", (128, 128), stored_experts=True)
ROW = Fp8Scheme("fbgemm_fp8", "channel", "dynamic", None, stored_experts=True)


@pytest.mark.parametrize(
    ("scheme", "hidden", "intermediate", "ranks", "stored"),
    [
        (BLOCK, 512, 256, 1, True),
        (BLOCK, 512, 256, 2, True),  # 128 a rank: whole blocks of rows and of columns
        (BLOCK, 512, 256, 4, False),  # 64 a rank: each share cuts a block (Qwen3-30B-A3B's 768 at TP 8 alike)
        (BLOCK, 512, 192, 1, False),  # the intermediate rows end inside a block
        (BLOCK, 576, 256, 1, False),  # so do the hidden rows of down
        (dataclasses.replace(BLOCK, block=(16, 128)), 512, 1536, 8, False),  # 192 a rank: cuts a column block
        (dataclasses.replace(BLOCK, block=(16, 128)), 512, 1536, 4, True),
        (ROW, 512, 776, 1, False),  # per-row scales: any cut keeps them, but the GEMV reads 16 codes at a time
        (ROW, 512, 1552, 2, False),
        (ROW, 512, 1536, 8, True),
        (ROW, 520, 256, 1, False),
    ],
)
def test_experts_stay_e4m3_where_the_grouped_gemv_reads_each_ranks_share(
    scheme: Fp8Scheme, hidden: int, intermediate: int, ranks: int, stored: bool
) -> None:
    served = scheme.experts_for(hidden, intermediate, ranks)
    assert served.stored_experts is stored
    assert served.dequantized == ("" if stored else "experts")
    assert (served is scheme) is stored  # nothing else changes
    if not stored:
        assert "experts dequantized to 16-bit at load" in served.describe()
        assert "read as stored" not in served.describe()
    plain = dataclasses.replace(scheme, stored_experts=False, dequantized="experts")
    assert plain.experts_for(hidden, intermediate, ranks) is plain  # a scheme that never stores them keeps its word


# the 8B shape: q 4096 rows, k and v 1024, MLP 14336
LLAMA_8B = ([[("q", 4096), ("k", 1024), ("v", 1024)], [("gate", 14336), ("up", 14336)]], [("o", 4096), ("down", 14336)])


@pytest.mark.parametrize(
    ("scheme", "sizes", "ranks", "refusal"),
    [
        (BLOCK, LLAMA_8B, 1, None),
        (BLOCK, LLAMA_8B, 2, None),
        (BLOCK, LLAMA_8B, 8, None),  # k, v: 128 rows a rank; down: 1792 columns a rank, 14 blocks
        (BLOCK, LLAMA_8B, 16, "k: a 16-way shard of its 1024 rows (64) cuts a block of 128 rows that share one scale"),
        (BLOCK, ([[("q", 192), ("k", 64), ("v", 64)]], [("o", 192)]), 1,
         "q: its 192 rows end inside a block of 128 rows that share one scale, so it cannot be stacked"),
        (BLOCK, ([[("q", 256), ("k", 128), ("v", 64)]], [("o", 256)]), 1, None),  # v is last: a partial block is fine
        (BLOCK, ([[("q", 512), ("k", 256), ("v", 256)]], [("o", 384)]), 2,
         "o: a 2-way shard of its 384 columns (192) cuts a block of 128 columns that share one scale"),
        (ROW, ([[("q", 512), ("k", 256), ("v", 256)]], [("o", 384)]), 2, None),  # one scale a row: any cut
        (ROW, ([[("gate", 776), ("up", 776)]], [("down", 776)]), 2,
         "down: a 2-way shard of its 776 columns (388) is not a multiple of 16"),
    ],
)  # fmt: skip
def test_projection_shards_must_hold_whole_blocks_of_scales(
    scheme: Fp8Scheme, sizes: Any, ranks: int, refusal: str | None
) -> None:
    got = scheme.shard_refusal(*sizes, ranks)
    assert got == refusal if refusal is None else got is not None and got.startswith(refusal)


def _llama(tmp_path: Path, heads: tuple[int, int], inter: int, layout: str = "block") -> Path:
    (tmp_path / "bf16").mkdir()
    src = save_random_llama(tmp_path / "bf16", "bfloat16", 64, heads, 256, inter, False)
    write_fp8_copy(src, tmp_path / "fp8", layout)
    return tmp_path / "fp8"


def test_the_family_refuses_a_shard_that_cuts_a_block_before_any_gpu_work(tmp_path: Path) -> None:
    """4 query and 2 KV heads of 64: k and v have 128 rows, one block; 2 ranks would each keep half a block."""
    cfg = LlamaConfig.from_dir(_llama(tmp_path, (4, 2), 384))
    assert cfg.fp8 is not None and cfg.fp8.block == (128, 128)
    Llama().check(SimpleNamespace(tensor_parallel=1), cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as info:
        Llama().check(SimpleNamespace(tensor_parallel=2), cfg)  # type: ignore[arg-type]
    assert str(info.value) == (
        "tensor_parallel: 2: self_attn.k_proj: a 2-way shard of its 128 rows (64) cuts a block of 128 rows that share "
        "one scale; pick a tensor_parallel whose shards hold whole blocks of scales, or serve a bfloat16 copy"
    )
    assert _fp8_projection_sizes(cfg)[1] == [("self_attn.o_proj", 256), ("mlp.down_proj", 384)]


class Fp8Registry:
    """Stands in for the GPU's Dense where the load registers e4m3 weights (``dense.quantized.add_fp8_weight``)."""

    def __init__(self) -> None:
        self.weights: dict[int, tuple[int, int, int, tuple[int, int] | None]] = {}  # w -> (n, k, scales, block)
        self.quantized = self  # (the Dense's registry part: this stand-in is both)

    def add_fp8_weight(self, w: int, n: int, k: int, scales: int, block: tuple[int, int] | None) -> None:
        self.weights[w] = (n, k, scales, block)


@pytest.mark.parametrize("layout", ["block", "channel"])
@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_registers_its_cut_of_every_projection_with_its_scales(
    tmp_path: Path, layout: str, rank: int
) -> None:
    """TP 2 over 4 query and 4 KV heads of 64 and an MLP of 512: q, k, v and gate, up cut by rows (rank r keeps
    rows [r n / 2, (r + 1) n / 2) of each, stacked), o and down by columns, each with the scales of its rows or
    blocks; the codes are the checkpoint's, byte for byte."""
    path = _llama(tmp_path, (4, 4), 512, layout)
    ckpt, uploads, dense = Checkpoint(path), HostArrays(), Fp8Registry()
    eng = SimpleNamespace(
        model_config=LlamaConfig.from_dir(path), rank=rank, tensor_parallel=2, vocab_shard=None, cupy=uploads,
        device=0, int4_as_stored=True, dense=dense, fp8_experts_as_stored=True,
    )  # fmt: skip
    Llama().check(eng, eng.model_config)  # type: ignore[arg-type]
    Llama().load(eng, ckpt)  # type: ignore[arg-type]
    scale_name = "weight_scale_inv" if layout == "block" else "weight_scale"

    def cut(prefix: str, axis: int) -> tuple[np.ndarray, np.ndarray]:
        codes, scales = np.asarray(ckpt.array(prefix + ".weight")), np.asarray(ckpt.array(f"{prefix}.{scale_name}"))
        scales = scales.reshape(scales.shape[0], -1) if layout == "block" else scales.reshape(-1)
        half = codes.shape[axis] // 2
        if axis == 0:
            b = 128 if layout == "block" else 1
            return codes[rank * half : (rank + 1) * half], scales[rank * half // b : (rank + 1) * half // b]
        return codes[:, rank * half : (rank + 1) * half], (scales[:, rank * half // 128 : (rank + 1) * half // 128]
                                                           if layout == "block" else scales)  # fmt: skip

    for i in range(4):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for got, parts, axis in (
            (eng.wqkv[i], [a + "q_proj", a + "k_proj", a + "v_proj"], 0),
            (eng.wo[i], [a + "o_proj"], 1),
            (eng.wgu[i], [m + "gate_proj", m + "up_proj"], 0),
            (eng.wd[i], [m + "down_proj"], 1),
        ):
            codes, scales = zip(*(cut(p, axis) for p in parts), strict=True)
            n, k, scales_at, block = dense.weights[got]
            assert block == ((128, 128) if layout == "block" else None)
            assert np.array_equal(uploads.by_ptr[got], np.concatenate(codes)), (i, parts)
            assert (n, k) == (sum(c.shape[0] for c in codes), codes[0].shape[1])
            assert np.array_equal(uploads.by_ptr[scales_at], np.concatenate(scales).astype(np.float32)), (i, parts)


def test_a_ranks_experts_are_its_cut_of_each_experts_codes_and_scales(tmp_path: Path) -> None:
    """Qwen3-MoE (hidden 512, experts' intermediate 256) at TP 2, rank 1: each expert's gate and up rows
    [128, 256) stacked, and its down columns [128, 256), with their 128x128 block scales; at TP 4 (64 a rank) the
    family keeps them 16-bit (``experts_stored`` False, checked once for every layer)."""
    src = save_random_qwen3_moe(tmp_path / "bf16", experts=2)
    write_fp8_copy(src, tmp_path / "fp8", "block")
    cfg, ckpt = LlamaConfig.from_dir(tmp_path / "fp8"), Checkpoint(tmp_path / "fp8")
    assert cfg.fp8 is not None and cfg.moe is not None and cfg.moe.intermediate_size == 256
    ld = WeightLoader(ckpt, SimpleNamespace(asarray=lambda a: a), "bfloat16", 0, [], None, cfg.fp8)
    base = "model.layers.0.mlp."
    f = _read_fp8_experts(ckpt, ld, base, ("gate_proj", "up_proj", "down_proj"), 2, 512, 128, rank=1, ranks=2)
    assert f.shapes() == (2, 512, 128) and f.tiled
    from fi_engine.kernels.fp8_moe_gemv import tiled_layout

    for x in range(2):
        p = f"{base}experts.{x}."
        rows = [np.asarray(ckpt.array(f"{p}{q}.weight"))[128:] for q in ("gate_proj", "up_proj")]
        want = tiled_layout(np.concatenate(rows)[None])[0]
        assert np.array_equal(f.gate_up[x], want)
        s = [np.asarray(ckpt.array(f"{p}{q}.weight_scale_inv"))[1:] for q in ("gate_proj", "up_proj")]
        assert np.array_equal(f.gate_up_scales[x], np.concatenate(s))
        down = np.asarray(ckpt.array(p + "down_proj.weight"))[:, 128:]
        assert np.array_equal(f.down[x], tiled_layout(down[None])[0])
        assert np.array_equal(f.down_scales[x], np.asarray(ckpt.array(p + "down_proj.weight_scale_inv"))[:, 1:])
    assert cfg.fp8.experts_for(cfg.hidden_size, cfg.moe.intermediate_size, 2).stored_experts
    assert not cfg.fp8.experts_for(cfg.hidden_size, cfg.moe.intermediate_size, 4).stored_experts

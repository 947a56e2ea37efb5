"""Tensor parallelism of the Llama engine on CPU: the per-rank shard of a model, the weight blocks each rank
keeps, and a model whose heads a tensor-parallel size does not divide refused by name (the SmolLM2 shape: 9
query heads, 3 KV heads), by the engine and by ``fi-ffi generate --tp`` (which starts its own ranks)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers.env import subprocess_env
from helpers.hf_configs import LLAMA_SHAPE
from helpers.subprocess_run import fi_ffi_generate

from fi_engine.checkpoint.config import LlamaConfig
from fi_engine.layers.tensor_parallel import VocabShard, columns, combine_shard_argmax, expert_rows, rows, shard_config

LLAMA = {**LLAMA_SHAPE, "vocab_size": 1000, "head_dim": 64}
SMOLLM2 = {**LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}


def test_shards_divide_heads_and_mlp_columns_only() -> None:
    cfg = LlamaConfig.from_dict(LLAMA)
    for n in (1, 2, 4):
        local = shard_config(cfg, n)
        assert (local.num_qo_heads, local.num_kv_heads, local.intermediate_size) == (16 // n, 4 // n, 2816 // n)
        assert (local.hidden_size, local.head_dim, local.vocab_size) == (1024, 64, 1000)


@pytest.mark.parametrize(
    ("config", "n", "message"),
    [
        (SMOLLM2, 2, r"tensor_parallel: 2 does not divide the model's 9 query heads \(num_attention_heads\)"),
        (SMOLLM2, 4, r"tensor_parallel: 4 does not divide the model's 9 query heads"),
        (LLAMA, 8, r"tensor_parallel: 8 does not divide the model's 4 KV heads \(num_key_value_heads\)"),
        ({**LLAMA, "intermediate_size": 2818}, 4, r"4 does not divide the model's 2818 MLP columns"),
    ],
)
def test_a_size_that_does_not_divide_is_refused_by_name(config: dict, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shard_config(LlamaConfig.from_dict(config), n)


def test_smollm2_shape_divides_by_three() -> None:
    assert shard_config(LlamaConfig.from_dict(SMOLLM2), 3).num_kv_heads == 1


def test_row_and_column_blocks_tile_the_weight() -> None:
    w = np.arange(8 * 6).reshape(8, 6)
    assert np.array_equal(np.concatenate([rows(w, r, 4) for r in range(4)]), w)
    assert np.array_equal(np.concatenate([columns(w, r, 3) for r in range(3)], axis=1), w)
    assert columns(w, 1, 3).flags.c_contiguous  # uploaded as is


def _model_dir(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_engine_refuses_before_touching_a_gpu(tmp_path: Path) -> None:
    from fi_engine.models.llama import LlamaEngine

    with pytest.raises(ValueError, match="tensor_parallel: 2 does not divide the model's 9 query heads"):
        LlamaEngine(_model_dir(tmp_path, SMOLLM2), tensor_parallel=2)
    with pytest.raises(
        ValueError, match=r"tensor_parallel: expected a positive integer below 2\*\*31 \(an int32 size\), got 0"
    ):
        LlamaEngine(_model_dir(tmp_path, SMOLLM2), tensor_parallel=0)


def test_generate_tp_starts_ranks_that_report_the_error(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, SMOLLM2)
    done = subprocess.run(
        fi_ffi_generate(model, "--prompt-ids", "1,2", "--tp", "2"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    # the first rank to fail makes the launcher stop the other, which may not have printed yet
    assert done.stderr.count("tensor_parallel: 2 does not divide the model's 9 query heads") >= 1


def test_generate_tp_refuses_a_device(tmp_path: Path) -> None:
    done = subprocess.run(
        fi_ffi_generate(tmp_path, "--prompt-ids", "1", "--tp", "2", "--device", "1"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--device: each rank of --tp uses GPU LOCAL_RANK" in done.stderr


# ---- MoE and vocabulary sharding (the arithmetic the loader and the kernels follow) ----------------------------

MIXTRAL = {**LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}
QWEN3_MOE = {
    **LLAMA,
    "model_type": "qwen3_moe",
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 96,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


def test_moe_shards_divide_every_experts_columns_and_keep_the_router() -> None:
    for config, inter in ((MIXTRAL, 2816), (QWEN3_MOE, 96)):
        cfg = LlamaConfig.from_dict(config)
        for n in (1, 2, 4):
            local = shard_config(cfg, n)
            assert local.moe is not None and cfg.moe is not None
            assert local.moe.intermediate_size == inter // n
            assert (local.moe.num_experts, local.moe.top_k) == (cfg.moe.num_experts, cfg.moe.top_k)
    with pytest.raises(ValueError, match=r"8 does not divide the model's 4 KV heads"):
        shard_config(LlamaConfig.from_dict(QWEN3_MOE), 8)
    with pytest.raises(ValueError, match=r"tensor_parallel: 3 does not divide the model's 16 query heads"):
        shard_config(LlamaConfig.from_dict(QWEN3_MOE), 3)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def test_expert_shards_partial_sums_add_up_to_the_whole_expert() -> None:
    # [E, 2I, H] gate rows then up rows; each rank's block keeps its gate rows then its up rows, and its slice of
    # down's columns: the ranks' outputs are partial sums of the unsharded expert MLP (float64, so exactly)
    rng = np.random.default_rng(0)
    e, i, h, n = 3, 8, 5, 4
    gate_up = rng.standard_normal((e, 2 * i, h))
    down = rng.standard_normal((e, h, i))
    x = rng.standard_normal(h)
    for expert in range(e):
        gu = gate_up[expert] @ x
        whole = down[expert] @ (_silu(gu[:i]) * gu[i:])
        parts = []
        for r in range(n):
            block = expert_rows(gate_up, r, n)
            assert block.shape == (e, 2 * i // n, h) and block.flags.c_contiguous
            g = block[expert] @ x
            half = i // n
            parts.append(down[expert][:, r * half : (r + 1) * half] @ (_silu(g[:half]) * g[half:]))
        np.testing.assert_allclose(np.sum(parts, axis=0), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("vocab", "n"), [(1000, 1), (1000, 2), (1001, 2), (1001, 4), (10, 3), (5, 4), (128256, 8)])
def test_vocab_shards_tile_the_padded_vocabulary(vocab: int, n: int) -> None:
    shards = [VocabShard.of(vocab, r, n) for r in range(n)]
    step = -(-vocab // n)
    assert all(s.rows == step and s.start == r * step for r, s in enumerate(shards))
    assert sum(s.valid for s in shards) == vocab  # every token in exactly one shard
    ids = np.concatenate([np.arange(s.start, s.start + s.valid) for s in shards])
    assert ids.tolist() == list(range(vocab))
    table = np.arange(vocab * 3, dtype=np.float32).reshape(vocab, 3) + 1
    blocks = [s.take(table) for s in shards]
    assert all(b.shape == (step, 3) for b in blocks)
    stacked = np.concatenate(blocks)
    np.testing.assert_array_equal(stacked[:vocab], table)
    assert not stacked[vocab:].any()  # the padding rows are zeros (their logits are never read)


def test_vocab_shard_refuses_a_table_of_another_vocabulary() -> None:
    with pytest.raises(ValueError, match=r"table: expected \[10, hidden\]"):
        VocabShard.of(10, 0, 2).take(np.zeros((12, 4), np.float32))
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 1\]"):
        VocabShard.of(10, 2, 2)


def _shard_embedding(table: np.ndarray, ids: np.ndarray, s: VocabShard) -> np.ndarray:
    """What gather_rows16_shard writes: the rows this shard holds, zeros for the rest."""
    block = s.take(table)
    local = ids - s.start
    mine = (local >= 0) & (local < s.valid)
    return np.where(mine[:, None], block[np.clip(local, 0, s.rows - 1)], 0)


@pytest.mark.parametrize(("vocab", "n"), [(1001, 4), (64, 2), (7, 4)])
def test_the_sum_of_the_shards_embeddings_is_the_embedding(vocab: int, n: int) -> None:
    rng = np.random.default_rng(1)
    table = rng.standard_normal((vocab, 6)).astype(np.float32)
    ids = rng.integers(0, vocab, 50)
    total = sum(_shard_embedding(table, ids, VocabShard.of(vocab, r, n)) for r in range(n))
    np.testing.assert_array_equal(total, table[ids])  # one non-zero term per row: exact


def _shard_argmax(logits: np.ndarray, s: VocabShard) -> tuple[np.ndarray, np.ndarray]:
    """What argmax_rows_shard writes: each row's largest of the shard's real columns (NaN never wins) and its id."""
    cols = logits[:, s.start : s.start + s.valid]
    values = np.full(len(logits), -np.inf, np.float32)
    idx = np.zeros(len(logits), np.int64)
    for r, row in enumerate(cols):
        finite = np.where(np.isnan(row), -np.inf, row)
        if finite.size and finite.max() > -np.inf:
            values[r], idx[r] = finite.max(), int(np.argmax(finite))
    return values, idx + s.start


@pytest.mark.parametrize(("vocab", "n"), [(1000, 2), (1001, 4), (37, 8)])
def test_combined_shard_argmax_is_the_argmax_of_the_whole_row(vocab: int, n: int) -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((40, vocab)).astype(np.float32)
    logits[1] = 0.0  # all tied: the first id
    logits[2, [3, vocab - 1]] = 50.0  # a tie across shards: the lower id
    logits[3, :] = np.nan  # nothing wins anywhere: 0, as the single-GPU argmax
    logits[4, :] = -np.inf
    logits[5, : vocab // 2] = np.nan  # NaN never wins
    logits[6, -1] = np.inf
    shards = [VocabShard.of(vocab, r, n) for r in range(n)]
    values, indices = zip(*(_shard_argmax(logits, s) for s in shards), strict=True)
    got = combine_shard_argmax(np.stack(values), np.stack(indices))
    want = [int(np.argmax(np.where(np.isnan(r), -np.inf, r))) if (np.nan_to_num(r, nan=-np.inf) > -np.inf).any()
            else 0 for r in logits]  # fmt: skip
    assert got.tolist() == want
    assert got[1] == 0 and got[2] == 3 and got[3] == 0 and got[6] == vocab - 1


def test_gathered_shard_logits_rebuild_the_row() -> None:
    # what unshard_columns does with the all-gathered [N, rows, V'/N] logits: the columns side by side, padding off
    vocab, n, rows = 1001, 4, 3
    logits = np.arange(rows * vocab, dtype=np.float32).reshape(rows, vocab)
    shards = [VocabShard.of(vocab, r, n) for r in range(n)]
    gathered = np.stack([s.take(logits.T).T for s in shards])  # each rank's [rows, V'/N] columns
    assert gathered.shape == (n, rows, shards[0].rows)
    flat = gathered.reshape(-1)
    width = shards[0].rows
    c = np.arange(vocab)
    rebuilt = np.stack([flat[((c // width) * rows + r) * width + c % width] for r in range(rows)])
    np.testing.assert_array_equal(rebuilt, logits)


@pytest.mark.parametrize(
    ("gpu_pdl", "allowed", "after_wait", "want"),
    [
        (True, True, True, True),
        (False, True, True, False),
        (True, False, True, False),
        (True, True, False, False),  # the engine's kernels release the next at their start: not safe, not taken
    ],
)
def test_the_all_reduce_takes_pdl_only_where_the_gpu_the_switch_and_the_kernels_allow(
    monkeypatch: pytest.MonkeyPatch, gpu_pdl: bool, allowed: bool, after_wait: bool, want: bool
) -> None:
    # three ranks: no fused kernel for that count, so no workspace (and no GPU) is needed to build one
    from types import SimpleNamespace

    from fi_engine.kernels.cuda_sources import Griddep
    from fi_engine.layers.tensor_parallel import ResidualAllReduce

    assert ResidualAllReduce.launch_with_pdl and ResidualAllReduce.trigger_early  # the defaults
    monkeypatch.setattr(ResidualAllReduce, "launch_with_pdl", allowed)
    monkeypatch.setattr(Griddep, "after_wait", after_wait)
    ar = ResidualAllReduce(SimpleNamespace(env=None, world_size=3), 8, 64, "bfloat16", pdl=gpu_pdl)
    assert not ar.fused and ar.workspace is None
    assert ar.pdl is want

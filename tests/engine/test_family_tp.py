"""Tensor parallelism of the Gemma 2 and gpt-oss engines on CPU: the per-rank shard of the published checkpoints'
shapes, refusals of sizes that do not divide (ValueError naming the config key, before any GPU is touched), and
the sharding arithmetic the engines follow, in float64 numpy against the unsharded formulas:

- gpt-oss: q/k/v biases and sinks go with their heads (:func:`~fi_engine.layers.tensor_parallel.segment`); each
  rank's slice of the interleaved experts (:func:`~fi_engine.models.gpt_oss.shard_experts`) through the engine's
  dense-over-experts math gives partial sums that add up to transformers' experts when the down bias is added by
  one rank only (and not when every rank adds it); the O projection likewise with its bias;
- Gemma 2: the GeGLU column split's partial sums add up to the MLP, and the post-feed-forward norm must see their
  sum (normalizing each rank's partial output first gives another result: why the engine all-reduces before the
  norm); the scaled embedding's vocabulary shards sum to the scaled embedding; the final soft cap applied to each
  rank's logits columns equals the cap of the whole row, and leaves the argmax where it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.hf_configs import GEMMA2, GPT_OSS_BF16, hf_experts

from fi_engine.layers.tensor_parallel import VocabShard, columns, rows, segment, shard_config
from fi_engine.models.gemma2 import gemma2_config
from fi_engine.models.gpt_oss import gpt_oss_config


def test_published_shapes_shard_by_heads_and_columns() -> None:
    gemma = gemma2_config(GEMMA2)  # gemma-2-2b: 8 query heads, 4 KV heads, 9216 GeGLU columns
    for n in (1, 2, 4):
        local = shard_config(gemma, n)
        assert (local.num_qo_heads, local.num_kv_heads, local.intermediate_size) == (8 // n, 4 // n, 9216 // n)
        assert (local.head_dim, local.hidden_size, local.family) == (256, 2304, gemma.family)  # windows, caps kept
    oss = gpt_oss_config(GPT_OSS_BF16)  # gpt-oss-20b: 64 query heads, 8 KV heads, 32 experts of 2880
    for n in (1, 2, 4, 8):
        local = shard_config(oss, n)
        assert local.moe is not None and oss.moe is not None
        assert (local.num_qo_heads, local.num_kv_heads, local.moe.intermediate_size) == (64 // n, 8 // n, 2880 // n)
        assert (local.moe.num_experts, local.moe.top_k, local.family) == (32, 4, oss.family)  # router whole


@pytest.mark.parametrize(
    ("config", "engine", "n", "message"),
    [
        (GEMMA2, "models.gemma2.Gemma2Engine", 8, r"tensor_parallel: 8 does not divide the model's 4 KV heads "
         r"\(num_key_value_heads\); use a tensor-parallel size that divides"),
        (GEMMA2, "models.gemma2.Gemma2Engine", 3, r"tensor_parallel: 3 does not divide the model's 8 query heads "
         r"\(num_attention_heads\)"),
        (GPT_OSS_BF16, "models.gpt_oss.GptOssEngine", 16,
         r"tensor_parallel: 16 does not divide the model's 8 KV heads"),
        ({**GPT_OSS_BF16, "intermediate_size": 2884}, "models.gpt_oss.GptOssEngine", 8,
         r"tensor_parallel: 8 does not divide the model's 2884 MLP columns \(intermediate_size\)"),
    ],
)  # fmt: skip
def test_sizes_that_do_not_divide_are_refused_by_name(
    tmp_path: Path, config: dict, engine: str, n: int, message: str
) -> None:
    import importlib

    module, _, name = engine.rpartition(".")
    cls = getattr(importlib.import_module(f"fi_engine.{module}"), name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        cls(tmp_path, tensor_parallel=n)  # refused before CuPy or a GPU is needed


def test_segments_tile_a_vector_and_refuse_what_does_not_divide() -> None:
    v = np.arange(12.0)
    assert np.array_equal(np.concatenate([segment(v, r, 4) for r in range(4)]), v)
    assert segment(v, 1, 3).base is None  # a copy: uploaded as is
    with pytest.raises(ValueError, match=r"parts: 5 does not divide vector's length \(12\)"):
        segment(v, 0, 5)
    with pytest.raises(ValueError, match="vector: expected a 1-D array"):
        segment(v.reshape(3, 4), 0, 1)
    with pytest.raises(ValueError, match="rank"):
        segment(v, 4, 4)


def _sinks_softmax(s: np.ndarray, sink: float) -> np.ndarray:
    """Attention weights of one head with a sink logit: softmax over the scores and the sink, sink dropped."""
    e = np.exp(s - max(s.max(), sink))
    return e / (e.sum() + np.exp(sink - max(s.max(), sink)))


def test_gpt_oss_attention_shards_with_biases_and_sinks_sum_to_the_whole() -> None:
    # one token's attention over T keys, H query heads sharing K KV heads: each rank's heads (q/k/v rows, biases
    # and sinks by segment), its columns of o_proj, the o bias added by rank 0: the partial outputs sum to the whole
    rng = np.random.default_rng(3)
    hid, hq, hk, d, t, n = 16, 8, 2, 4, 5, 2
    wq, wk, wv = (rng.standard_normal((k * d, hid)) for k in (hq, hk, hk))
    bq, bk, bv = (rng.standard_normal(k * d) for k in (hq, hk, hk))
    wo, bo, sinks = rng.standard_normal((hid, hq * d)), rng.standard_normal(hid), rng.standard_normal(hq)
    x, keys = rng.standard_normal(hid), rng.standard_normal((t, hid))

    def attend(wq, bq, wk, bk, wv, bv, sinks, heads, kv_heads):  # type: ignore[no-untyped-def]
        q = (wq @ x + bq).reshape(heads, d)
        k = (keys @ wk.T + bk).reshape(t, kv_heads, d)
        v = (keys @ wv.T + bv).reshape(t, kv_heads, d)
        group = heads // kv_heads
        out = [_sinks_softmax(k[:, h // group] @ q[h], sinks[h]) @ v[:, h // group] for h in range(heads)]
        return np.concatenate(out)

    whole = wo @ attend(wq, bq, wk, bk, wv, bv, sinks, hq, hk) + bo
    parts = []
    for r in range(n):
        a = attend(
            rows(wq, r, n), segment(bq, r, n), rows(wk, r, n), segment(bk, r, n), rows(wv, r, n), segment(bv, r, n),
            segment(sinks, r, n), hq // n, hk // n,
        )  # fmt: skip
        parts.append(columns(wo, r, n) @ a + (bo if r == 0 else 0))
    np.testing.assert_allclose(np.sum(parts, axis=0), whole, rtol=1e-12, atol=1e-12)
    every_rank = np.sum(parts, axis=0) + (n - 1) * bo  # the bias on every rank: counted n times
    assert not np.allclose(every_rank, whole)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gpt_oss_expert_shards_sum_to_transformers_experts(n: int) -> None:
    from fi_engine.models.gpt_oss import expert_matrices, shard_experts

    rng = np.random.default_rng(n)
    e, h, i, t = 4, 12, 8, 7
    gate_up, gate_up_bias = 3 * rng.normal(size=(e, h, 2 * i)), rng.normal(size=(e, 2 * i))  # past the clamp (7)
    down, down_bias = rng.normal(size=(e, i, h)), rng.normal(size=(e, h))
    x = rng.normal(size=(t, h))
    weights = np.zeros((t, e))
    for r in range(t):
        chosen = rng.choice(e, 2, replace=False)
        p = np.exp(rng.normal(size=2))
        weights[r, chosen] = p / p.sum()
    want = hf_experts(x, gate_up, gate_up_bias, down, down_bias, weights)
    total = np.zeros_like(want)
    for r in range(n):
        shard = shard_experts(gate_up, gate_up_bias, down, r, n)
        assert [a.shape for a in shard] == [(e, h, 2 * i // n), (e, 2 * i // n), (e, i // n, h)]
        assert all(np.shares_memory(a, b) for a, b in zip(shard, (gate_up, gate_up_bias, down), strict=True))  # views
        w_gu, b_gu, w_down = expert_matrices(*shard)
        j = i // n  # the MoE layer's math on this rank's matrices (tests/helpers/hf_configs.py), down bias on rank 0
        assert w_gu.shape == (e, 2 * j, h) and w_down.shape == (e, h, j)
        for x_ in range(e):
            gu = x @ w_gu[x_].T + b_gu[x_]
            gate, up = np.minimum(gu[:, :j], 7.0), np.clip(gu[:, j:], -7.0, 7.0)
            act = (up + 1) * gate / (1 + np.exp(-1.702 * gate))
            total += weights[:, x_ : x_ + 1] * (act @ w_down[x_].T + (down_bias[x_] if r == 0 else 0))
    np.testing.assert_allclose(total, want, rtol=1e-10, atol=1e-10)


def test_gpt_oss_expert_shards_refuse_what_does_not_divide() -> None:
    from fi_engine.models.gpt_oss import shard_experts

    gu, b, down = np.zeros((2, 4, 12)), np.zeros((2, 12)), np.zeros((2, 6, 4))
    with pytest.raises(ValueError, match=r"parts: 4 does not divide the experts' 6 intermediate columns"):
        shard_experts(gu, b, down, 0, 4)
    with pytest.raises(ValueError, match=r"gate_up_bias, down: expected \[2, 12\] and \[2, 6, hidden\]"):
        shard_experts(gu, b, np.zeros((2, 5, 4)), 0, 2)
    with pytest.raises(TypeError, match="gate_up: expected a numpy array"):
        shard_experts([[1]], b, down, 0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        shard_experts(gu, b, down, 2, 2)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _gemma_norm(x: np.ndarray, w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + w)


def test_gemma2_geglu_shards_sum_before_the_post_feedforward_norm() -> None:
    rng = np.random.default_rng(5)
    h, inter, n = 16, 24, 4
    gate, up, down = rng.standard_normal((inter, h)), rng.standard_normal((inter, h)), rng.standard_normal((h, inter))
    post = rng.standard_normal(h)
    x = rng.standard_normal((3, h))
    whole = _gemma_norm((_gelu_tanh(x @ gate.T) * (x @ up.T)) @ down.T, post)
    partial = [(_gelu_tanh(x @ rows(gate, r, n).T) * (x @ rows(up, r, n).T)) @ columns(down, r, n).T for r in range(n)]
    np.testing.assert_allclose(_gemma_norm(np.sum(partial, axis=0), post), whole, rtol=1e-12, atol=1e-12)
    # the norm of each partial output, then summed (what the fused all-reduce + residual + RMSNorm order would
    # need): not the same
    assert not np.allclose(np.sum([_gemma_norm(p, post) for p in partial], axis=0), whole)


@pytest.mark.parametrize(("vocab", "n"), [(1001, 2), (257, 4), (10, 3)])
def test_gemma2_scaled_embedding_and_soft_capped_logits_on_vocab_shards(vocab: int, n: int) -> None:
    from fi_engine.models.gemma2 import round_to

    rng = np.random.default_rng(vocab)
    table = rng.standard_normal((vocab, 8)).astype(np.float16)
    scale = np.float16(round_to(np.sqrt(8), "float16"))
    ids = rng.integers(0, vocab, 9)
    whole = (table[ids] * scale).astype(np.float16)  # the engine rounds the product to the dtype
    total = np.zeros_like(whole, np.float32)
    for r in range(n):  # the kernel: a row of this shard scaled, zeros for an id outside it
        vs = VocabShard.of(vocab, r, n)
        block = vs.take(table)
        local = ids - vs.start
        inside = (local >= 0) & (local < vs.valid)
        got = np.zeros_like(whole)
        got[inside] = (block[local[inside]] * scale).astype(np.float16)
        total += got
    assert np.array_equal(total.astype(np.float16), whole)  # one rank's row plus zeros: exact
    cap = 3.0
    logits = 4 * rng.standard_normal((5, vocab)).astype(np.float32)
    capped = cap * np.tanh(logits / cap)
    shards = []
    for r in range(n):  # each rank caps its padded columns (zeros past the vocabulary stay 0)
        vs = VocabShard.of(vocab, r, n)
        cols = np.zeros((5, vs.rows), np.float32)
        cols[:, : vs.valid] = logits[:, vs.start : vs.start + vs.valid]
        shards.append(cap * np.tanh(cols / cap))
    gathered = np.concatenate(shards, axis=1)[:, :vocab]
    np.testing.assert_allclose(gathered, capped, rtol=1e-6)
    assert np.array_equal(gathered.argmax(1), logits.argmax(1))  # tanh is increasing: greedy tokens unchanged


def test_generate_tp_checks_the_family_checkpoint_before_starting_ranks(tmp_path: Path) -> None:
    import subprocess
    import sys

    from helpers.env import subprocess_env

    (tmp_path / "config.json").write_text(json.dumps(GEMMA2))
    cmd = [sys.executable, "-m", "fi_ffi", "generate", "--model", str(tmp_path), "--prompt-ids", "1,2", "--tp"]
    done = subprocess.run([*cmd, "8"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tensor_parallel: 8 does not divide the model's 4 KV heads (num_key_value_heads)" in done.stderr
    (tmp_path / "config.json").write_text(json.dumps(GPT_OSS_BF16))
    done = subprocess.run([*cmd, "3"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tensor_parallel: 3 does not divide the model's 64 query heads" in done.stderr

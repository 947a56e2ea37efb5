"""Random small bfloat16 mixture-of-experts checkpoints written with numpy alone (no torch, no transformers), with the
tensor names and config keys transformers saves for Qwen3-MoE and DeepSeek-V3, for the FP8 MoE tests
(tests/engine/test_fp8_moe.py, tests/engine/test_gpu_fp8_moe.py): helpers.fp8_checkpoints quantizes them as the
published FP8 checkpoints are, helpers.int4_checkpoints.write_16bit_copy writes the bfloat16 copy of what that holds.

Every size is a multiple of 128, so 128x128 scale blocks tile each projection (the stacked QKV and gate/up of the
FP8 GEMV path need whole blocks); ``kv_a_proj_with_mqa`` (512 + 64 rows) ends in a partial block, as V3's does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fi_engine.checkpoint.safetensors import write_safetensors
from helpers.random_llama import bf16_bits

VOCAB = 4096
HIDDEN = 512


def _writer(seed: int) -> Any:
    rng = np.random.default_rng(seed)

    def t(*shape: int, scale: float = 0.05, mean: float = 0.0) -> tuple[np.ndarray, str]:
        return bf16_bits((mean + scale * rng.standard_normal(shape)).astype(np.float32)), "bfloat16"

    return t


def _start(seed: int) -> tuple[Any, dict[str, Any]]:
    """The random writer of ``seed`` and the tensors every model has: embedding, final norm, an untied LM head."""
    t = _writer(seed)
    return t, {
        "model.embed_tokens.weight": t(VOCAB, HIDDEN, scale=1.0),
        "model.norm.weight": t(HIDDEN, mean=1.0, scale=0.1),
        "lm_head.weight": t(VOCAB, HIDDEN),
    }


def _common(t: Any, tensors: dict[str, Any], p: str) -> None:
    tensors[p + "input_layernorm.weight"] = t(HIDDEN, mean=1.0, scale=0.1)
    tensors[p + "post_attention_layernorm.weight"] = t(HIDDEN, mean=1.0, scale=0.1)


def _experts(t: Any, tensors: dict[str, Any], m: str, experts: int, inter: int) -> None:
    tensors[m + "gate.weight"] = t(experts, HIDDEN, scale=0.5)  # the router: logits of spread ~1
    for x in range(experts):
        tensors[f"{m}experts.{x}.gate_proj.weight"] = t(inter, HIDDEN)
        tensors[f"{m}experts.{x}.up_proj.weight"] = t(inter, HIDDEN)
        tensors[f"{m}experts.{x}.down_proj.weight"] = t(HIDDEN, inter)


def _save(folder: Path, tensors: dict[str, Any], config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def save_random_qwen3_moe(folder: Path, layers: int = 2, experts: int = 8, top_k: int = 2, seed: int = 3) -> Path:
    """A random Qwen3-MoE (hidden 512, 8 query / 2 KV heads of 128 with per-head q/k norms, ``experts`` experts of
    intermediate 256 top-``top_k``, every layer sparse, untied LM head, vocab :data:`VOCAB`) in ``folder``."""
    t, tensors = _start(seed)
    hq, hk, d, inter = 8, 2, 128, 256
    for i in range(layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        tensors[a + "q_proj.weight"] = t(hq * d, HIDDEN)
        tensors[a + "k_proj.weight"] = t(hk * d, HIDDEN)
        tensors[a + "v_proj.weight"] = t(hk * d, HIDDEN)
        tensors[a + "o_proj.weight"] = t(HIDDEN, hq * d)
        tensors[a + "q_norm.weight"] = t(d, mean=1.0, scale=0.1)
        tensors[a + "k_norm.weight"] = t(d, mean=1.0, scale=0.1)
        _experts(t, tensors, p + "mlp.", experts, inter)
        _common(t, tensors, p)
    config = dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=hq, num_key_value_heads=hk, head_dim=d,
        rope_theta=1000000.0, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu", torch_dtype="bfloat16",
    )  # fmt: skip
    return _save(folder, tensors, config)


def save_random_deepseek_v3(folder: Path, layers: int = 2, seed: int = 4, q_lora_rank: int | None = 128) -> Path:
    """A random DeepSeek-V3 (hidden 512, 16 heads: q_lora_rank 128 (None: a full ``q_proj``, as V2-Lite), kv_lora_rank
    512, nope 32 / rope 64 / v 32; the first layer a dense MLP of 1024, the rest 8 routed experts of 256 top-2 in 2
    groups (1 kept) with a shared expert, V3's sigmoid routing with a float32 ``e_score_correction_bias``; untied LM
    head, vocab :data:`VOCAB`) in ``folder``."""
    t, tensors = _start(seed)
    rng = np.random.default_rng(seed + 1)
    heads, q_rank, kv_rank, nope, rope, v, inter, moe_inter, experts = 16, q_lora_rank, 512, 32, 64, 32, 1024, 256, 8
    for i in range(layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        if q_rank is None:
            tensors[a + "q_proj.weight"] = t(heads * (nope + rope), HIDDEN)
        else:
            tensors[a + "q_a_proj.weight"] = t(q_rank, HIDDEN)
            tensors[a + "q_a_layernorm.weight"] = t(q_rank, mean=1.0, scale=0.1)
            tensors[a + "q_b_proj.weight"] = t(heads * (nope + rope), q_rank)
        tensors[a + "kv_a_proj_with_mqa.weight"] = t(kv_rank + rope, HIDDEN)
        tensors[a + "kv_a_layernorm.weight"] = t(kv_rank, mean=1.0, scale=0.1)
        tensors[a + "kv_b_proj.weight"] = t(heads * (nope + v), kv_rank)
        tensors[a + "o_proj.weight"] = t(HIDDEN, heads * v)
        m = p + "mlp."
        if i == 0:  # first_k_dense_replace 1
            tensors[m + "gate_proj.weight"] = t(inter, HIDDEN)
            tensors[m + "up_proj.weight"] = t(inter, HIDDEN)
            tensors[m + "down_proj.weight"] = t(HIDDEN, inter)
        else:
            _experts(t, tensors, m, experts, moe_inter)
            tensors[m + "gate.e_score_correction_bias"] = rng.normal(0.0, 0.05, experts).astype(np.float32)
            tensors[m + "shared_experts.gate_proj.weight"] = t(moe_inter, HIDDEN)
            tensors[m + "shared_experts.up_proj.weight"] = t(moe_inter, HIDDEN)
            tensors[m + "shared_experts.down_proj.weight"] = t(HIDDEN, moe_inter)
        _common(t, tensors, p)
    config = dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=inter, moe_intermediate_size=moe_inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, q_lora_rank=q_rank, kv_lora_rank=kv_rank, qk_nope_head_dim=nope,
        qk_rope_head_dim=rope, v_head_dim=v, n_routed_experts=experts, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, topk_method="noaux_tc",
        scoring_func="sigmoid", first_k_dense_replace=1, moe_layer_freq=1, hidden_act="silu", rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    )  # fmt: skip
    return _save(folder, tensors, config)

"""Published transformers ``config.json`` files (gemma-2-2b, gpt-oss-20b, DeepSeek-V3) and transformers' GPT-OSS
experts in float64, for the model-family config tests (``tests/engine/test_family_configs.py``,
``tests/engine/test_family_tp.py``, ``tests/engine/test_deepseek.py``, ``tests/engine/test_kv_fp8.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fi_engine.checkpoint.config import RopeConfig

# gemma-2-2b's config.json (the keys it carries)
GEMMA2: dict[str, Any] = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107],
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
    "use_cache": True, "vocab_size": 256000,
}  # fmt: skip
# gpt-oss-20b's config.json, as published (MXFP4 experts)
GPT_OSS: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088,
}  # fmt: skip
GPT_OSS_BF16 = {k: v for k, v in GPT_OSS.items() if k != "quantization_config"}


def hf_experts(x, gate_up, gate_up_bias, down, down_bias, weights, alpha=1.702, limit=7.0):
    """transformers' GptOssExperts (dense inference path), float64: every expert, weighted by ``weights [T, E]``."""
    out = np.zeros((x.shape[0], down.shape[2]))
    for e in range(gate_up.shape[0]):
        gu = x @ gate_up[e] + gate_up_bias[e]
        gate, up = np.minimum(gu[:, ::2], limit), np.clip(gu[:, 1::2], -limit, limit)
        act = (up + 1) * gate / (1 + np.exp(-alpha * gate))
        out += weights[:, e : e + 1] * (act @ down[e] + down_bias[e])
    return out


# the smallest Llama-architecture config.json fields the config tests build on (model_type and extras added per test)
SMALL_LLAMA: dict[str, Any] = {
    "vocab_size": 1000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
}


# a Llama of the 1B class's shape, 2 layers (32k vocabulary, hidden 1024, 16 query / 4 KV heads, head_dim 64)
LLAMA_SHAPE: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
}


LLAMA31_ROPE = RopeConfig(
    theta=500000.0,
    llama3=True,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192.0,
)
"""Llama 3.1's rotary settings (its config.json's ``rope_theta`` and ``rope_scaling``) as the engine reads them."""


# DeepSeek-V3's config.json (the keys of the published checkpoint)
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "attention_bias": False,
}


DEEPSEEK_RANDOM: dict[str, Any] = dict(
    hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=3, num_attention_heads=16,
    num_key_value_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
    n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, rms_norm_eps=1e-6,
    max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
"""The random small DeepSeek checkpoints' shape (transformers' DeepseekV3Config / DeepseekV2Config arguments): 3
layers (the first a dense MLP), 16 MLA heads with the kernels' latent 512 and RoPE 64, 8 routed experts top-2."""

DEEPSEEK_RANDOM_V3: dict[str, Any] = dict(
    q_lora_rank=128, n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    rope_interleave=True,
)  # fmt: skip
"""V3's part of :data:`DEEPSEEK_RANDOM`: low-rank queries, sigmoid ``noaux_tc`` routing in 2 groups, a shared expert."""

DEEPSEEK_RANDOM_V2: dict[str, Any] = dict(
    q_lora_rank=None, topk_method="greedy", n_group=None, topk_group=None, n_shared_experts=2,
    routed_scaling_factor=1.0, norm_topk_prob=False,
)  # fmt: skip
"""V2-Lite's part of :data:`DEEPSEEK_RANDOM`: a full ``q_proj``, softmax greedy routing (not renormalized), two shared
experts."""

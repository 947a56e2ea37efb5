"""A random small Llama checkpoint written with numpy alone (no torch, no transformers), for the GPU engine tests
that compare the engine with itself (fused against separate launches, the step API against ``generate``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fi_engine.checkpoint.safetensors import write_safetensors

EPS = 1e-5
VOCAB = 4096


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def save_random_llama(
    folder: Path,
    dtype: str,
    head_dim: int,
    heads: tuple[int, int],
    hidden: int,
    inter: int,
    llama3: bool,
    experts: tuple[int, int] | None = None,
    tied: bool = True,
) -> Path:
    """A random Llama (4 layers, tied embedding, vocab :data:`VOCAB`, eos id 2) saved into ``folder``; norm weights
    around 1; with ``llama3`` Llama 3.1 RoPE scaling whose original context (64) the prompts pass; with ``experts``
    ``(E, k)`` a Mixtral (every layer's MLP ``E`` experts of intermediate ``inter``, top-``k``); ``tied`` False: an
    LM head of its own (``lm_head.weight``). Seeded: the same arguments give the same weights."""
    rng = np.random.default_rng(7)
    hq, hk = heads
    cfg = dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=4,
        num_attention_heads=hq, num_key_value_heads=hk, head_dim=head_dim, tie_word_embeddings=tied,
        rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=EPS, eos_token_id=2,
    )  # fmt: skip
    if experts is not None:
        cfg.update(model_type="mixtral", num_local_experts=experts[0], num_experts_per_tok=experts[1])
        cfg["sliding_window"] = None
    if llama3:
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }  # fmt: skip

    def t(*shape: int, scale: float = 0.05, mean: float = 0.0) -> tuple[np.ndarray, str]:
        a = (mean + scale * rng.standard_normal(shape)).astype(np.float32)
        return (a.astype(np.float16), "float16") if dtype == "float16" else (bf16_bits(a), "bfloat16")

    tensors = {
        "model.embed_tokens.weight": t(VOCAB, hidden, scale=1.0),
        "model.norm.weight": t(hidden, mean=1.0, scale=0.1),
    }
    for i in range(4):
        p = f"model.layers.{i}."
        mlp = [("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)), ("mlp.down_proj", (hidden, inter))]
        if experts is not None:  # Mixtral's names: the router, then each expert's w1 (gate), w3 (up), w2 (down)
            m = "block_sparse_moe."
            mlp = [(m + "gate", (experts[0], hidden))] + [
                (f"{m}experts.{e}.{name}", shape)
                for e in range(experts[0])
                for name, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter)))
            ]
        for name, shape in (
            ("self_attn.q_proj", (hq * head_dim, hidden)),
            ("self_attn.k_proj", (hk * head_dim, hidden)),
            ("self_attn.v_proj", (hk * head_dim, hidden)),
            ("self_attn.o_proj", (hidden, hq * head_dim)),
            *mlp,
        ):
            tensors[p + name + ".weight"] = t(*shape)
        tensors[p + "input_layernorm.weight"] = t(hidden, mean=1.0, scale=0.1)
        tensors[p + "post_attention_layernorm.weight"] = t(hidden, mean=1.0, scale=0.1)
    if not tied:
        tensors["lm_head.weight"] = t(VOCAB, hidden)
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder

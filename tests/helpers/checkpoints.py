"""Random small checkpoints written with transformers' own config and model classes, for the GPU engine tests.

torch and transformers are imported when a checkpoint is built (``pytest.importorskip``: a test without them
skips), not when this module is: the multi-GPU tests import it in a process that only writes checkpoints.
Every builder seeds torch's global generator with 0 first, so a checkpoint is the same on every run.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import pytest

TOKENS = dict(max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
"""What every random test checkpoint's config shares: its context, untied embeddings, its BOS and EOS ids."""

SMALL = dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
             rms_norm_eps=1e-6, **TOKENS)  # fmt: skip
"""The small Qwen3 / Mixtral / Qwen3-MoE shape (2 layers, hidden 512, 8 query / 4 KV heads, head_dim 64), less
the vocabulary: ``dict(vocab_size=V, **SMALL)``."""

MIXTRAL_MOE = dict(intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2, sliding_window=None)
"""Mixtral's MoE block on :data:`SMALL`: 8 experts, top-2, no sliding window."""


def qwen3_moe(norm_topk_prob: bool) -> dict[str, Any]:
    """Qwen3-MoE's block on :data:`SMALL`: 16 experts of intermediate 256, top-4, every layer sparse."""
    return dict(
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def rope_kwargs(config_cls: Any, theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """The RoPE arguments of ``config_cls`` in the form its transformers takes: ``rope_parameters`` (transformers 5)
    or ``rope_scaling`` + ``rope_theta`` (4.x); ``scaling`` None is plain RoPE."""
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:  # transformers 5
        return {"rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta}}
    return {"rope_scaling": scaling, "rope_theta": theta}


def randomize_norms(model: Any, mean: float = 1.0, std: float = 0.1) -> None:
    """Draws every ``*norm.weight`` from N(mean, std), in parameter order from torch's global generator (transformers
    initializes them to one value: a skipped or misplaced norm would not show)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(mean, std)


def save_random(path: Path, config_cls: str, model_cls: str, dtype: str, kw: dict[str, Any]) -> Any:
    """Builds ``transformers.<model_cls>(transformers.<config_cls>(**kw))`` from seed 0 with random norm weights,
    converts it to ``dtype`` (``"float16"``, ``"bfloat16"``), saves it to ``path`` with ``save_pretrained`` and
    returns the model (on the CPU). Skips when this transformers has no ``config_cls``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, config_cls):
        pytest.skip(f"this transformers has no {config_cls}")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))
    randomize_norms(model)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    return model


def float32_reference(model: Any) -> Any:
    """The reference: a copy of ``model`` with exactly its saved (rounded) weights, computed in float32 on the GPU."""
    return copy.deepcopy(model).float().cuda().eval()


def without_weights(root: Path, config: dict[str, Any]) -> Path:
    """A checkpoint folder ``root`` that passes the engine's host-side checks with no weights worth loading:
    ``config`` as its config.json and one placeholder ``model.safetensors`` (the engine checks that the weights'
    files are there before it looks for a GPU). For tests that stop at the GPU check or before it."""
    import json

    import numpy as np

    from fi_engine.checkpoint.safetensors import write_safetensors

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    write_safetensors(root / "model.safetensors", {"placeholder": np.zeros(1, np.float16)})
    return root

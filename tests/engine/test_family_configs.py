"""Gemma 2 and gpt-oss on CPU: their configs (the keys the published checkpoints carry) parsed into the engine's
settings, refusals as ValueErrors naming the key, YaRN's frequencies, the gpt-oss expert weights' mapping (checked
against transformers' per-expert formula on synthetic data), the checkpoint checks on synthetic safetensors, and
the engine picked by model_type."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.hf_configs import GEMMA2, GPT_OSS, GPT_OSS_BF16, hf_experts

from fi_engine.checkpoint.config import YarnRope
from fi_engine.checkpoint.safetensors import Checkpoint, write_safetensors
from fi_engine.models.gemma2 import Gemma2Settings, gemma2_config
from fi_engine.models.gpt_oss import GptOssSettings, gpt_oss_config


def test_gemma2_config_of_the_published_checkpoint() -> None:
    c = gemma2_config(GEMMA2)
    assert (c.model_type, c.head_dim, c.num_qo_heads, c.num_kv_heads) == ("gemma2", 256, 8, 4)
    assert c.moe is None and not c.qk_norm and c.eos_token_ids == (1, 107)
    assert c.family == Gemma2Settings(256.0, 50.0, 30.0, 4096, tuple(4095 if i % 2 == 0 else -1 for i in range(26)))
    assert c.tie_word_embeddings  # Gemma2Config's default: save_pretrained leaves it out


def test_gemma2_defaults_and_layer_types() -> None:
    d = {k: v for k, v in GEMMA2.items() if k not in ("head_dim", "query_pre_attn_scalar", "sliding_window")}
    d.update(num_hidden_layers=3, layer_types=["full_attention", "sliding_attention", "full_attention"])
    d.update(attn_logit_softcapping=None, final_logit_softcapping=None)
    c = gemma2_config(d)
    assert c.head_dim == 256 and c.family.query_pre_attn_scalar == 256.0
    assert c.family.windows == (-1, 4095, -1)
    assert c.family.attn_logit_softcapping == 0.0 and c.family.final_logit_softcapping == 0.0


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"hidden_activation": "relu"}, "hidden_activation"),
        ({"attention_bias": True}, "attention_bias"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"layer_types": ["global"] * 26}, "layer_types"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"sliding_window": 1 << 31}, "sliding_window"),
        ({"query_pre_attn_scalar": -1}, "query_pre_attn_scalar"),
        ({"attn_logit_softcapping": "50"}, "attn_logit_softcapping"),
        ({"final_logit_softcapping": float("inf")}, "final_logit_softcapping"),
        ({"query_pre_attn_scalar": 10**400}, "query_pre_attn_scalar"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ],
)
def test_gemma2_refusals_name_the_key(change: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        gemma2_config({**GEMMA2, **change})


def test_gpt_oss_bf16_config() -> None:
    c = gpt_oss_config(GPT_OSS_BF16)
    assert (c.head_dim, c.num_qo_heads, c.num_kv_heads, c.rope.theta) == (64, 64, 8, 150000.0)
    assert c.moe is not None and (c.moe.num_experts, c.moe.top_k, c.moe.intermediate_size) == (32, 4, 2880)
    g = c.family
    assert isinstance(g, GptOssSettings) and g.swiglu_limit == 7.0 and g.alpha == 1.702
    assert g.windows == (127, -1) * 12
    assert g.yarn == YarnRope(32.0, 4096, 32.0, 1.0, truncate=False)


def test_gpt_oss_published_mxfp4_config_is_read_as_the_bf16_one() -> None:
    assert gpt_oss_config(GPT_OSS) == gpt_oss_config(GPT_OSS_BF16)  # MXFP4 experts: tests/engine/test_mxfp4_weights.py


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"attention_bias": False}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "yarn"}}, "factor"),
        ({"rope_scaling": {**GPT_OSS["rope_scaling"], "truncate": "no"}}, "truncate"),
        ({"swiglu_limit": 0}, "swiglu_limit"),
        ({"num_experts_per_tok": 64}, "num_experts_per_tok"),
        ({"sliding_window": None}, "sliding_window"),
        ({"layer_types": ["sliding_attention"] * 23}, "layer_types"),
    ],
)
def test_gpt_oss_refusals_name_the_key(change: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        gpt_oss_config({**GPT_OSS_BF16, **change})


def test_gpt_oss_rope_parameters_spelling_of_transformers_5() -> None:
    d = {k: v for k, v in GPT_OSS_BF16.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {**GPT_OSS["rope_scaling"], "rope_theta": 150000.0}
    c = gpt_oss_config(d)
    assert c.rope.theta == 150000.0 and c.family.yarn is not None and c.family.yarn.factor == 32.0


def yarn_reference(theta: float, dim: int, factor: float, orig: int, fast: float, slow: float, truncate: bool):
    """YaRN's frequencies and scale written out from the paper's definition, float64."""

    def dim_of(rot: float) -> float:  # the dimension whose wavelength makes `rot` turns over the original context
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_of(fast), dim_of(slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    out = []
    for j in range(dim // 2):
        base = theta ** (-2 * j / dim)
        ramp = min(max((j - lo) / (hi - lo), 0.0), 1.0)  # 0: keep the frequency, 1: divide it by factor
        out.append(base * (1 - ramp) + base / factor * ramp)
    return np.array(out), 0.1 * math.log(factor) + 1.0


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_frequencies_follow_the_definition(truncate: bool) -> None:
    y = YarnRope(32.0, 4096, 32.0, 1.0, truncate=truncate)
    want, scale = yarn_reference(150000.0, 64, 32.0, 4096, 32.0, 1.0, truncate)
    got = y.inv_freq(150000.0, 64)
    assert got.dtype == np.float32 and got.shape == (32,)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert got[0] == 1.0 and math.isclose(got[-1], want[-1], rel_tol=2e-6)  # highest kept, lowest divided by 32
    assert math.isclose(y.scale(), scale) and YarnRope(32.0, 4096, attention_factor=1.5).scale() == 1.5


def test_rope_cos_sin_cache_layout() -> None:
    from fi_engine.models.gpt_oss import rope_cos_sin_cache

    c = gpt_oss_config(GPT_OSS_BF16)
    cache = rope_cos_sin_cache(c, 300)
    inv = c.family.yarn.inv_freq(150000.0, 64).astype(np.float64)
    s = c.family.yarn.scale()
    assert cache.shape == (300, 64) and cache.dtype == np.float32
    np.testing.assert_allclose(cache[:, :32], np.cos(np.arange(300)[:, None] * inv) * s, atol=1e-4)
    np.testing.assert_allclose(cache[:, 32:], np.sin(np.arange(300)[:, None] * inv) * s, atol=1e-4)


def test_gpt_oss_expert_matrices_compute_transformers_experts() -> None:
    from fi_engine.models.gpt_oss import expert_matrices

    rng = np.random.default_rng(0)
    e, h, i, t = 4, 12, 5, 7
    gate_up, gate_up_bias = rng.normal(size=(e, h, 2 * i)), rng.normal(size=(e, 2 * i))
    down, down_bias = rng.normal(size=(e, i, h)), rng.normal(size=(e, h))
    x = rng.normal(size=(t, h))
    weights = np.zeros((t, e))
    for r in range(t):  # two experts per token, softmax weights
        chosen = rng.choice(e, 2, replace=False)
        p = np.exp(rng.normal(size=2))
        weights[r, chosen] = p / p.sum()
    w_gu, b_gu, w_down = expert_matrices(gate_up, gate_up_bias, down)
    assert w_gu.shape == (e, 2 * i, h) and b_gu.shape == (e, 2 * i) and w_down.shape == (e, h, i)
    assert all(a.flags.c_contiguous for a in (w_gu, b_gu, w_down))
    # the routed layer's math on these matrices (MoELayer with MoEBiases and ClampedSwiGLU): per chosen expert, its
    # gate/up rows plus bias, the clamped SwiGLU, its down projection plus bias, weighted
    got = np.zeros((t, h))
    for e_ in range(e):
        gu = x @ w_gu[e_].T + b_gu[e_]
        gate, up = np.minimum(gu[:, :i], 7.0), np.clip(gu[:, i:], -7.0, 7.0)
        act = (up + 1) * gate / (1 + np.exp(-1.702 * gate))
        got += weights[:, e_ : e_ + 1] * (act @ w_down[e_].T + down_bias[e_])
    want = hf_experts(x, gate_up, gate_up_bias, down, down_bias, weights)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the dense path's math on the same arrays (MoELayer.forward_dense): gate_up read as one [E * 2I, H] matrix (one
    # GEMM for every expert), the activation where the token chose the expert and 0 elsewhere, down as a batched
    # GEMM over the experts ([E, T, H]), then each token's chosen experts plus their down biases, weighted
    gu = (x @ w_gu.reshape(e * 2 * i, h).T).reshape(t, e, 2 * i) + b_gu
    gate, up = np.minimum(gu[..., :i], 7.0), np.clip(gu[..., i:], -7.0, 7.0)
    act = np.where(weights[..., None] > 0, (up + 1) * gate / (1 + np.exp(-1.702 * gate)), 0.0)  # [T, E, I]
    y = np.stack([act[:, e_] @ w_down[e_].T for e_ in range(e)])  # [E, T, H]
    dense = np.einsum("te,eth->th", weights, y + down_bias[:, None, :])
    np.testing.assert_allclose(dense, want, rtol=1e-12)


def bf16(a: np.ndarray) -> tuple[np.ndarray, str]:
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16), "bfloat16"


def test_gpt_oss_checkpoint_checks(tmp_path: Path) -> None:
    from fi_engine.models.gpt_oss import check_checkpoint

    emb = np.ones((8, 4), np.float32)
    write_safetensors(tmp_path / "model.safetensors", {"model.embed_tokens.weight": bf16(emb)})
    assert check_checkpoint(Checkpoint(tmp_path)) == "bfloat16"
    write_safetensors(tmp_path / "model.safetensors", {"model.embed_tokens.weight": emb.astype(np.float16)})
    with pytest.raises(ValueError, match="weights are float16; gpt-oss runs in bfloat16"):
        check_checkpoint(Checkpoint(tmp_path))
    blocks = np.zeros((2, 8, 16), np.uint8)  # the experts' MXFP4 tensors pass (read: test_mxfp4_weights.py)
    write_safetensors(
        tmp_path / "model.safetensors",
        {"model.embed_tokens.weight": bf16(emb), "model.layers.0.mlp.experts.gate_up_proj_blocks": blocks},
    )
    assert check_checkpoint(Checkpoint(tmp_path)) == "bfloat16"


def test_gemma_scale_is_rounded_to_the_dtype() -> None:
    from fi_engine.models.gemma2 import round_to

    assert round_to(math.sqrt(2304), "bfloat16") == 48.0
    assert round_to(math.sqrt(2048), "bfloat16") == 45.25  # 45.2548... -> 8 significant bits
    assert round_to(math.sqrt(2048), "float16") == float(np.float16(math.sqrt(2048)))


@pytest.mark.parametrize(("config", "name"), [(GEMMA2, "Gemma2Engine"), (GPT_OSS_BF16, "GptOssEngine")])
def test_engine_picked_by_model_type_and_llama_engine_refuses(tmp_path: Path, config: dict, name: str) -> None:
    from fi_engine.models.llama import LlamaEngine
    from fi_engine.models.registry import engine_class

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert engine_class(tmp_path).__name__ == name
    with pytest.raises(ValueError, match=f"fi_engine.*{name}"):
        LlamaEngine(tmp_path)  # refused before CuPy is needed
    (tmp_path / "config.json").write_text(json.dumps({**GEMMA2, "model_type": "llama", "hidden_act": "silu"}))
    assert engine_class(tmp_path) is LlamaEngine


def test_family_checks_refuse_a_config_of_another_family() -> None:
    # check() guards a config its own read_config did not read (a subclass's reader): the other family's config, or
    # its model type with the settings missing, is refused naming the engine; its own passes (before any GPU work)
    import dataclasses

    from fi_engine.models.gemma2 import Gemma2
    from fi_engine.models.gpt_oss import GptOss

    gemma, gpt = gemma2_config(GEMMA2), gpt_oss_config(GPT_OSS_BF16)
    Gemma2().check(None, gemma)
    GptOss().check(None, gpt)
    with pytest.raises(ValueError, match="model: Gemma2Engine serves gemma2 checkpoints, this one is 'gpt_oss'"):
        Gemma2().check(None, gpt)
    with pytest.raises(ValueError, match="model: GptOssEngine serves gpt_oss checkpoints, this one is 'gemma2'"):
        GptOss().check(None, gemma)
    with pytest.raises(ValueError, match="GptOssEngine serves gpt_oss checkpoints, this one is 'gpt_oss'"):
        GptOss().check(None, dataclasses.replace(gpt, family=gemma.family))


def test_family_engines_refuse_other_types(tmp_path: Path) -> None:
    from fi_engine.models.gemma2 import Gemma2Engine
    from fi_engine.models.gpt_oss import GptOssEngine

    (tmp_path / "config.json").write_text(json.dumps(GEMMA2))
    with pytest.raises(ValueError, match="GptOssEngine serves gpt_oss checkpoints, this one is 'gemma2'"):
        GptOssEngine(tmp_path)  # refused before CuPy is needed (tensor parallelism: tests/engine/test_family_tp.py)
    (tmp_path / "config.json").write_text(json.dumps(GPT_OSS_BF16))
    for bad in ("fast", None, 1):  # refused before the config is read or CuPy is needed
        with pytest.raises(ValueError, match="moe_path: expected one of 'auto', 'routed', 'dense'"):
            GptOssEngine(tmp_path, moe_path=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Gemma2Engine serves gemma2 checkpoints"):
        Gemma2Engine(tmp_path)

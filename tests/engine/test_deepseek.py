"""DeepSeek-V2/V3 on the CPU: config parsing and refusals, YaRN, the absorbed-MLA algebra against the unabsorbed
formula (numpy, float64) and the host routing against a per-token loop transcription of transformers' routers.

The config dicts carry the fields of the published checkpoints' config.json (DeepSeek-V3, DeepSeek-V2-Lite), with
the values that matter to the engine; the GPU test (tests/engine/test_gpu_deepseek.py) builds its configs with
transformers' own classes.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from helpers.checkpoints import without_weights
from helpers.fp8_checkpoints import CONFIGS as FP8_CONFIGS
from helpers.hf_configs import DEEPSEEK_V3 as V3
from helpers.mla_reference import mla_absorbed, mla_unabsorbed

from fi_engine.checkpoint.quantization import Fp8Scheme
from fi_engine.layers.deepseek_routing import grouped_topk
from fi_engine.models.deepseek_config import DeepSeekConfig, DeepSeekRouting, is_deepseek
from fi_engine.models.mla_weights import split_kv_b

V3_FP8 = {  # as DeepSeek-V3's config.json writes it
    **V3,
    "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
    },
}  # fmt: skip
V2_LITE = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "bos_token_id": 100000,
    "eos_token_id": 100001,
}


def _mscale(factor: float, m: float) -> float:
    return 0.1 * m * math.log(factor) + 1.0


# ---------------------------------------------------------------------------------------------- config


def test_v3_config_fields() -> None:
    c = DeepSeekConfig.from_dict(V3)
    assert (c.num_qo_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.v_head_dim) == (
        128,
        1536,
        512,
        128,
        128,
    )
    assert c.first_k_dense_replace == 3 and not c.is_moe_layer(2) and c.is_moe_layer(3)
    assert c.moe is not None and (c.moe.num_experts, c.moe.top_k, c.moe.intermediate_size) == (256, 8, 2048)
    assert c.moe.renormalize
    assert c.routing == DeepSeekRouting("noaux_tc", "sigmoid", 8, 4, 2.5, 1)
    assert c.shared_intermediate == 2048
    assert c.yarn is not None and c.yarn.factor == 40.0 and c.yarn.original_max_position_embeddings == 4096.0
    # the softmax scale of the unabsorbed head dim (128 + 64), times mscale(40, 1.0)^2
    assert c.softmax_scale == pytest.approx(192**-0.5 * _mscale(40, 1.0) ** 2, rel=1e-12)
    assert c.rope_interleave and c.eos_token_ids == (1,)


def test_v2_lite_config_fields() -> None:
    c = DeepSeekConfig.from_dict(V2_LITE)
    assert c.model_type == "deepseek_v2" and c.q_lora_rank is None
    assert c.routing == DeepSeekRouting("greedy", "softmax", 1, 1, 1.0, 2)
    assert c.moe is not None and not c.moe.renormalize and c.moe.top_k == 6
    assert c.shared_intermediate == 2 * 1408
    assert c.softmax_scale == pytest.approx(192**-0.5 * _mscale(40, 0.707) ** 2, rel=1e-12)


def test_transformers5_rope_parameters_spelling() -> None:
    d = {k: v for k, v in V3.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {**V3["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
    del d["rope_parameters"]["type"]
    assert DeepSeekConfig.from_dict(d) == DeepSeekConfig.from_dict(V3)
    plain = DeepSeekConfig.from_dict({**d, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}})
    assert plain.yarn is None and plain.rope_theta == 50000.0 and plain.softmax_scale == 192**-0.5


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kv_lora_rank": 256}, "kv_lora_rank"),
        ({"qk_rope_head_dim": 32}, "qk_rope_head_dim"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, r"quantization_config \(quant_method 'awq'\)"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_type \(or type\) 'linear'"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"qk_nope_head_dim": 100}, "qk_nope_head_dim"),
        ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
        ({"rope_scaling": {"type": "yarn", "factor": 40}}, "original_max_position_embeddings"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_refusals_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DeepSeekConfig.from_dict({**V3, **change}, source="cfg")


def test_v3s_fp8_config_keeps_the_routed_experts_and_dequantizes_the_rest() -> None:
    """V3's published FP8 config: the routed experts e4m3 (the FP8 grouped GEMV takes 128x128 blocks and V3's
    7168 x 2048 experts, whole and at TP 2 to 16), MLA, the dense MLPs and the shared experts dequantized; with the
    experts dequantized too (the switch, or shapes the GEMV cannot read) every projection is, as before."""
    fp8 = DeepSeekConfig.from_dict(V3_FP8).fp8
    assert fp8 == Fp8Scheme("fp8", "block", "dynamic", (128, 128), "MLA, dense-MLP and shared-expert projections",
                            stored_experts=True, dequantized_with_experts="every projection")  # fmt: skip
    assert fp8.describe() == (
        "FP8 (e4m3) weights with per-block 128x128 scales, dynamic activation scales (experts read as stored by the "
        "FP8 grouped GEMV) (MLA, dense-MLP and shared-expert projections dequantized to 16-bit at load)"
    )
    for ranks in (1, 2, 4, 8, 16):
        assert fp8.experts_for(7168, 2048, ranks) is fp8
    every = Fp8Scheme("fp8", "block", "dynamic", (128, 128), "every projection",
                      dequantized_with_experts="every projection")  # fmt: skip
    assert fp8.experts_dequantized() == every and every.experts_dequantized() is every
    assert fp8.experts_for(7168, 2048 + 64) == every  # the experts' rows end inside a block of scales
    assert every.describe() == (
        "FP8 (e4m3) weights with per-block 128x128 scales, dynamic activation scales (every projection dequantized "
        "to 16-bit at load)"
    )
    # blocks the grouped GEMV does not take (64 columns), or a model without routed experts: every projection
    narrow = {**V3_FP8, "quantization_config": {**V3_FP8["quantization_config"], "weight_block_size": [128, 64]}}
    assert DeepSeekConfig.from_dict(narrow).fp8 == dataclasses.replace(every, block=(128, 64))
    dense = {k: v for k, v in V3_FP8.items() if k != "n_routed_experts"}
    assert DeepSeekConfig.from_dict(dense).fp8 == every
    assert DeepSeekConfig.from_dict(V3).fp8 is None


@pytest.mark.parametrize("scales", ["channel", "tensor"])
def test_fp8_routed_experts_of_per_row_or_tensor_scales_are_dequantized_with_the_rest(scales: str) -> None:
    """Only DeepSeek-V3's published 128x128 blocks keep the routed experts e4m3: per-row and per-tensor scales (not a
    form DeepSeek publishes) are dequantized at load with every other projection."""
    fp8 = DeepSeekConfig.from_dict({**V3_FP8, "quantization_config": FP8_CONFIGS[scales]}).fp8
    assert fp8 is not None and fp8.scales == scales
    assert not fp8.stored_experts and fp8.dequantized == "every projection"


@pytest.mark.parametrize(
    ("q", "message"),
    [
        ({"quant_method": "awq", "bits": 4}, "FP8 (e4m3) ones; save the model in bfloat16 or float16"),
        ({"quant_method": "fp8", "weight_block_size": [128, 0]}, "quantization_config.weight_block_size: expected"),
        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
            "num_bits": 8, "type": "float", "strategy": "block"}}}}, "block strategy is not served yet; its 'fp8'"),
    ],
    ids=["awq", "bad-block", "compressed-tensors-block"],
)  # fmt: skip
def test_other_quantizations_are_refused_naming_the_key_and_the_way_out(q: dict, message: str) -> None:
    with pytest.raises(ValueError, match="cfg: quantization_config") as err:
        DeepSeekConfig.from_dict({**V3, "quantization_config": q}, source="cfg")
    assert message in str(err.value)


def test_v2_rejects_v3_routing() -> None:
    with pytest.raises(ValueError, match="DeepSeek-V2 routing"):
        DeepSeekConfig.from_dict({**V2_LITE, "topk_method": "noaux_tc"})


def test_is_deepseek_and_from_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text(json.dumps(V2_LITE))
    assert is_deepseek(tmp_path)
    assert DeepSeekConfig.from_dir(tmp_path).num_layers == 27
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_deepseek(tmp_path)
    assert not is_deepseek(tmp_path / "missing")


# a V3-style model beyond the fused kernel (512 experts) and the device routing (128 groups): no decode graph
V3_MANY_GROUPS = {**V3, "n_routed_experts": 512, "n_group": 128, "topk_group": 4}


@pytest.mark.cpu_only  # it reaches the GPU look-up, which must fail here
def test_engine_takes_a_graph_where_the_routing_runs_on_the_device(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """V3 (fused kernel) and V2-Lite (the device fallback) pass the family check with cuda_graph=True and get as far
    as looking for a GPU; a routing neither device path does is refused naming n_group."""
    from fi_engine.models import deepseek
    from fi_engine.models.deepseek import DeepSeekEngine
    from fi_ffi.errors import UnsupportedDeviceError

    for cfg in (V3, V2_LITE, {**V3, "norm_topk_prob": False}):
        without_weights(tmp_path, cfg)  # a placeholder safetensors file: the engine checks the files are there
        assert deepseek.graph_blocker(DeepSeekConfig.from_dir(tmp_path)) is None
        with pytest.raises(UnsupportedDeviceError):  # this machine has no GPU: the graph itself was not refused
            DeepSeekEngine(tmp_path, cuda_graph=True)
    (tmp_path / "config.json").write_text(json.dumps(V3_MANY_GROUPS))
    why = deepseek.graph_blocker(DeepSeekConfig.from_dir(tmp_path))
    assert why is not None and "n_group 128" in why
    with pytest.raises(ValueError, match=r"cuda_graph: n_group 128 .*pass cuda_graph=False"):
        DeepSeekEngine(tmp_path, cuda_graph=True)
    with pytest.raises(UnsupportedDeviceError):  # eager: routed on the host, accepted
        DeepSeekEngine(tmp_path)
    with pytest.raises(TypeError, match="DeepSeekConfig"):
        deepseek.graph_blocker(V3)  # type: ignore[arg-type]


def test_device_routing_refusals_name_the_field() -> None:
    from fi_engine.layers.deepseek_routing import MAX_DEVICE_GROUPS, DeviceGroupedTopk, device_routing_blocker

    many = DeepSeekConfig.from_dict(V3_MANY_GROUPS).routing
    assert many is not None and many.n_group > MAX_DEVICE_GROUPS
    why = device_routing_blocker(many)
    assert why is not None and "n_group" in why
    with pytest.raises(ValueError, match="routing: n_group"):
        DeviceGroupedTopk(many, 512, 8, True)
    ok = DeepSeekConfig.from_dict(V3).routing
    assert ok is not None and device_routing_blocker(ok) is None
    with pytest.raises(ValueError, match="top_k"):
        DeviceGroupedTopk(ok, 256, 0, True)
    with pytest.raises(ValueError, match="n_group"):
        DeviceGroupedTopk(ok, 250, 8, True)  # 8 groups do not divide 250 experts
    with pytest.raises(TypeError, match="renormalize"):
        DeviceGroupedTopk(ok, 256, 8, "yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DeepSeekRouting"):
        device_routing_blocker("noaux_tc")  # type: ignore[arg-type]


def test_device_routing_checks_topk_group_and_its_call_arguments() -> None:
    """topk_group beyond n_group is refused at construction (the kernel would pick a group -1); a call's tokens must
    be an int and its arrays device arrays of the kernel's dtypes, named before any launch. The call is made on an
    instance built without CuPy (none on a CPU machine): its checks come before the kernel, never reached here."""
    import dataclasses

    from fi_engine.layers.deepseek_routing import DeviceGroupedTopk

    ok = DeepSeekConfig.from_dict(V3).routing
    assert ok is not None
    with pytest.raises(ValueError, match="routing.topk_group"):
        DeviceGroupedTopk(dataclasses.replace(ok, topk_group=ok.n_group + 1), 256, 8, True)
    topk = object.__new__(DeviceGroupedTopk)
    topk.routing, topk.num_experts, topk.top_k, topk.renormalize = ok, 256, 8, True
    topk._fn = None  # not callable: a launch would fail the test with another error than the ones below
    host = np.zeros((2, 256), np.float32)
    topk(host, None, 0, host, host, None)  # no tokens: nothing checked or launched
    for bad, error in ((True, TypeError), ("2", TypeError), (2.0, TypeError), (-1, ValueError), (1 << 40, ValueError)):
        with pytest.raises(error, match="tokens"):
            topk(host, None, bad, host, host, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="logits: expected a float32 CuPy array, got ndarray"):
        topk(host, None, 2, host, host, None)


# ---------------------------------------------------------------------------------------------- YaRN


def test_yarn_frequencies_keep_high_and_scale_low() -> None:
    c = DeepSeekConfig.from_dict(V3)
    inv, attention = c.inv_freq()
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    assert inv.shape == (32,)
    # the fastest-rotating dims extrapolate (unchanged), the slowest interpolate (divided by the factor)
    np.testing.assert_allclose(inv[:8], base[:8], rtol=1e-12)
    np.testing.assert_allclose(inv[-4:], base[-4:] / 40, rtol=1e-12)
    assert np.all(np.diff(inv) < 0)
    assert attention == pytest.approx(1.0)  # mscale == mscale_all_dim: the ratio is 1 (DeepSeek-V3)
    one_sided = DeepSeekConfig.from_dict({**V3, "rope_scaling": {**V3["rope_scaling"], "mscale_all_dim": 0}})
    assert one_sided.inv_freq()[1] == pytest.approx(_mscale(40, 1.0))
    assert one_sided.softmax_scale == 192**-0.5  # no mscale_all_dim: the softmax scale is left alone


def test_cos_sin_cache_layout() -> None:
    c = DeepSeekConfig.from_dict({**V3, "rope_scaling": None, "rope_theta": 10000.0})
    table = c.cos_sin_cache(5)
    assert table.shape == (6, 64) and table.dtype == np.float32
    freq = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    for p in (0, 3, 5):
        np.testing.assert_allclose(table[p, :32], np.cos(p * freq), atol=1e-6)
        np.testing.assert_allclose(table[p, 32:], np.sin(p * freq), atol=1e-6)


# ---------------------------------------------------------------------------------------------- absorbed MLA


@pytest.mark.parametrize(
    ("heads", "nope", "v_dim", "rows", "tokens"), [(4, 32, 32, 1, 9), (3, 16, 24, 5, 5), (2, 128, 128, 3, 7)]
)
def test_absorbed_mla_equals_unabsorbed(heads: int, nope: int, v_dim: int, rows: int, tokens: int) -> None:
    rng = np.random.default_rng(heads * 100 + nope)
    rank, rope = 512, 64
    kv_b = rng.normal(0, 0.05, (heads * (nope + v_dim), rank))
    c = rng.normal(0, 1, (tokens, rank))
    k_pe = rng.normal(0, 1, (tokens, rope))
    q_nope = rng.normal(0, 1, (rows, heads, nope))
    q_pe = rng.normal(0, 1, (rows, heads, rope))
    scale = (nope + rope) ** -0.5
    want = mla_unabsorbed(q_nope, q_pe, c, k_pe, kv_b, heads, nope, v_dim, scale)
    got = mla_absorbed(q_nope, q_pe, c, k_pe, kv_b, heads, nope, v_dim, scale)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_split_kv_b_layout_and_refusal() -> None:
    kv_b = np.arange(2 * (3 + 2) * 4, dtype=np.float64).reshape(2 * 5, 4)
    uk_t, uv = split_kv_b(kv_b, 2, 3, 2)
    assert uk_t.shape == (2, 4, 3) and uv.shape == (2, 2, 4)
    np.testing.assert_array_equal(uk_t[1], kv_b[5:8].T)  # head 1's key rows, transposed
    np.testing.assert_array_equal(uv[1], kv_b[8:10])  # head 1's value rows
    assert uk_t.flags.c_contiguous and uv.flags.c_contiguous
    with pytest.raises(ValueError, match="kv_b_proj"):
        split_kv_b(kv_b[:9], 2, 3, 2)


# ---------------------------------------------------------------------------------------------- routing


def _route_reference(logits, bias, routing, k, renormalize):  # type: ignore[no-untyped-def]
    """One token at a time, transcribing transformers' DeepseekV3TopkRouter / DeepseekV2TopkRouter (Python
    loops and sorted lists; ties broken by the lower index)."""
    tokens, e = logits.shape
    g, per = routing.n_group, e // routing.n_group
    weights, experts = np.zeros((tokens, k)), np.zeros((tokens, k), np.int64)
    for t in range(tokens):
        row = [float(v) for v in logits[t]]
        if routing.scoring == "sigmoid":
            scores = [1 / (1 + math.exp(-v)) for v in row]
        else:
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        choice = [s + (float(bias[i]) if routing.method == "noaux_tc" else 0.0) for i, s in enumerate(scores)]
        allowed = set(range(e))
        if routing.method != "greedy":
            group_score = []
            for gi in range(g):
                members = sorted(choice[gi * per : (gi + 1) * per], reverse=True)
                group_score.append(sum(members[:2]) if routing.method == "noaux_tc" else members[0])
            best_groups = sorted(range(g), key=lambda gi: (-group_score[gi], gi))[: routing.topk_group]
            allowed = {gi * per + j for gi in best_groups for j in range(per)}
        picked = sorted(allowed, key=lambda i: (-choice[i], i))[:k]
        w = [scores[i] for i in picked]
        if renormalize:
            total = sum(w) + 1e-20
            w = [v / total for v in w]
        weights[t] = [v * routing.routed_scaling_factor for v in w]
        experts[t] = picked
    return weights, experts


@pytest.mark.parametrize(
    ("routing", "k", "renormalize"),
    [
        (DeepSeekRouting("noaux_tc", "sigmoid", 2, 1, 2.5, 1), 2, True),  # the GPU test's shape
        (DeepSeekRouting("noaux_tc", "sigmoid", 8, 4, 2.5, 1), 8, True),  # DeepSeek-V3's
        (DeepSeekRouting("noaux_tc", "sigmoid", 4, 2, 1.0, 0), 3, False),
        (DeepSeekRouting("greedy", "softmax", 1, 1, 1.0, 2), 6, False),  # DeepSeek-V2-Lite's
        (DeepSeekRouting("group_limited_greedy", "softmax", 8, 3, 16.0, 2), 6, False),  # DeepSeek-V2's
    ],
)
def test_grouped_topk_matches_a_per_token_reference(routing: DeepSeekRouting, k: int, renormalize: bool) -> None:
    e = {2: 8, 8: 64, 4: 16, 1: 64}[routing.n_group]
    rng = np.random.default_rng(e + k)
    for trial in range(5):
        logits = rng.normal(0, 2, (33, e)).astype(np.float32)
        bias = rng.normal(0, 0.5, e).astype(np.float32)
        weights, experts = grouped_topk(logits, k, routing, renormalize, bias)
        want_w, want_e = _route_reference(logits, bias, routing, k, renormalize)
        assert weights.dtype == np.float32 and experts.dtype == np.int32
        np.testing.assert_array_equal(experts, want_e, err_msg=f"trial {trial}")
        np.testing.assert_allclose(weights, want_w, rtol=2e-6, atol=1e-7)
        if routing.method != "greedy":  # every chosen expert lies in one of topk_group groups
            per = e // routing.n_group
            assert all(len(set((row // per).tolist())) <= routing.topk_group for row in experts)


def test_noaux_tc_bias_steers_choice_but_not_weights() -> None:
    routing = DeepSeekRouting("noaux_tc", "sigmoid", 1, 1, 1.0, 0)
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
    _, e0 = grouped_topk(logits, 1, routing, False, np.zeros(4, np.float32))
    w1, e1 = grouped_topk(logits, 1, routing, False, np.array([0, 0, 0, 5], np.float32))
    assert e0.tolist() == [[0]] and e1.tolist() == [[3]]
    assert w1[0, 0] == pytest.approx(1 / (1 + math.exp(1.0)), rel=1e-6)  # the unbiased sigmoid score


def test_grouped_topk_refusals() -> None:
    routing = DeepSeekRouting("noaux_tc", "sigmoid", 2, 1, 1.0, 0)
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="bias"):
        grouped_topk(x, 2, routing, True, None)
    with pytest.raises(ValueError, match="bias"):
        grouped_topk(x, 2, routing, True, np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="top_k"):
        grouped_topk(x, 9, routing, True, np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="finite"):
        grouped_topk(np.full((1, 8), np.nan, np.float32), 2, routing, True, np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        grouped_topk(np.zeros(8, np.float32), 2, routing, True, np.zeros(8, np.float32))


# ---------------------------------------------------------------------------------------------- fused routing


def test_fused_routing_applies_to_v3_only_within_the_kernel_limits() -> None:
    from fi_engine.models.deepseek import fused_routing_blocker

    assert fused_routing_blocker(DeepSeekConfig.from_dict(V3)) is None  # 256 experts, 8 groups, top-4 groups, top-8
    why = fused_routing_blocker(DeepSeekConfig.from_dict(V2_LITE))
    assert why is not None and "greedy" in why
    why = fused_routing_blocker(DeepSeekConfig.from_dict({**V3, "norm_topk_prob": False}))
    assert why is not None and "norm_topk_prob" in why
    why = fused_routing_blocker(DeepSeekConfig.from_dict({**V3, "n_routed_experts": 512}))  # Kimi-K2-like 384+
    assert why is not None and "limits" in why
    dense = DeepSeekConfig.from_dict({k: v for k, v in V3.items() if k != "n_routed_experts"})
    assert fused_routing_blocker(dense) == "the model has no MoE layers"


def test_engine_refuses_a_bad_fused_routing_value(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fi_engine.models.deepseek import DeepSeekEngine

    (tmp_path / "config.json").write_text(json.dumps(V3))
    with pytest.raises(ValueError, match="fused_routing"):
        DeepSeekEngine(tmp_path, fused_routing="yes")  # type: ignore[arg-type]

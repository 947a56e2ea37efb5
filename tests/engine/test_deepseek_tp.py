"""DeepSeek-V3 / V2 under tensor parallelism on the CPU: each rank's shape of the published V3 config, refusals by
name before any GPU work (sizes that do not divide, FP8 shards that cut a block of scales), the sharding rules in
float64 numpy against the unsharded formulas (MLA heads: each rank's heads of ``q_b_proj`` and ``kv_b_proj`` through
the absorbed form, its columns of ``o_proj``, the latents whole; the routed experts by intermediate columns under
DeepSeek's routing, replicated; the shared experts like a dense MLP: partial sums that add up to the whole layer),
and what each rank's load registers (``DeepSeek.load`` with a stand-in for the GPU whose uploads stay on the host):
the checkpoint's cut of every projection, bit for bit, from 16-bit and FP8 checkpoints alike. The GPU side is
tests/engine/test_gpu_family_tp.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers.checkpoints import without_weights
from helpers.fp8_checkpoints import write_fp8_copy
from helpers.hf_configs import DEEPSEEK_V3 as V3
from helpers.host_uploads import HostArrays, MoEArguments
from helpers.int4_checkpoints import write_16bit_copy
from helpers.mla_reference import mla_absorbed, mla_unabsorbed
from helpers.moe_checkpoints import save_random_deepseek_v3

from fi_engine.checkpoint.safetensors import Checkpoint
from fi_engine.layers.deepseek_routing import grouped_topk
from fi_engine.layers.moe_routing import group_local, local_assignments
from fi_engine.layers.tensor_parallel import VocabShard, columns, expert_rows, rows, shard_config
from fi_engine.models.deepseek import DeepSeek
from fi_engine.models.deepseek_config import DeepSeekConfig, DeepSeekRouting, fp8_shard_refusal
from fi_engine.models.mla_weights import split_kv_b

V3_FP8 = {**V3, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                        "weight_block_size": [128, 128]}}  # fmt: skip


def test_published_v3_shards_its_heads_and_columns_and_keeps_the_latents() -> None:
    v3 = DeepSeekConfig.from_dict(V3)  # 128 heads, dense MLP 18432, 256 experts of 2048 plus one shared
    assert v3.moe is not None
    for n in (1, 2, 4, 8, 16):
        local = shard_config(v3, n)
        assert local.moe is not None
        assert (local.num_qo_heads, local.intermediate_size, local.moe.intermediate_size) == (
            128 // n, 18432 // n, 2048 // n,
        )  # fmt: skip
        assert local.shared_intermediate == 2048 // n
        # the latent cache is one shared "head": its sizes, the router and the routing are every rank's
        assert (local.num_kv_heads, local.kv_lora_rank, local.q_lora_rank, local.qk_rope_head_dim) == (1, 512, 1536, 64)
        assert (local.moe.num_experts, local.moe.top_k, local.routing) == (256, 8, v3.routing)
        assert local.softmax_scale == v3.softmax_scale  # the unabsorbed head dim's, whatever a rank's heads
        assert fp8_shard_refusal(DeepSeekConfig.from_dict(V3_FP8), n) is None  # V3's FP8 blocks: whole to TP 16


@pytest.mark.parametrize(
    ("change", "n", "message"),
    [
        ({}, 3, r"tensor_parallel: 3 does not divide the model's 128 MLA heads \(num_attention_heads\); use a "
                r"tensor-parallel size that divides 128 MLA heads, 18432 dense MLP columns, 2048 expert"),
        ({"intermediate_size": 18440}, 16, r"16 does not divide the model's 18440 dense MLP columns "
                                           r"\(intermediate_size\)"),
        ({"moe_intermediate_size": 2056}, 16, r"16 does not divide the model's 2056 expert intermediate columns "
                                              r"\(moe_intermediate_size\)"),
    ],
)  # fmt: skip
def test_sizes_that_do_not_divide_are_refused_by_name_before_any_gpu_work(
    tmp_path: Path, change: dict, n: int, message: str
) -> None:
    from fi_engine.models.deepseek import DeepSeekEngine

    without_weights(tmp_path, {**V3, **change})
    with pytest.raises(ValueError, match=message):
        DeepSeekEngine(tmp_path, tensor_parallel=n)
    # a model whose every layer routes never runs intermediate_size: not a size a rank must divide
    every_layer_routed = DeepSeekConfig.from_dict({**V3, "first_k_dense_replace": 0, "intermediate_size": 18440})
    assert shard_config(every_layer_routed, 16).num_qo_heads == 8


def test_an_fp8_shard_that_cuts_a_block_of_scales_is_refused_naming_the_projection(tmp_path: Path) -> None:
    """V3 at TP 32: each rank's 576 of the dense MLP's 18432 rows end inside a 128-row block; a 16-bit copy of the
    same config splits, and so does the FP8 one at TP 16."""
    from fi_engine.models.deepseek import DeepSeekEngine

    fp8 = DeepSeekConfig.from_dict(V3_FP8)
    assert fp8_shard_refusal(fp8, 32) == (
        "mlp.gate_proj: a 32-way shard of its 18432 rows (576) cuts a block of 128 rows that share one scale"
    )
    assert fp8_shard_refusal(DeepSeekConfig.from_dict(V3), 32) is None
    without_weights(tmp_path, V3_FP8)
    with pytest.raises(ValueError) as info:
        DeepSeekEngine(tmp_path, tensor_parallel=32)
    assert str(info.value).startswith("tensor_parallel: 32: mlp.gate_proj: a 32-way shard of its 18432 rows (576)")
    assert str(info.value).endswith("pick a tensor_parallel whose shards hold whole blocks of scales, or serve a "
                                    "bfloat16 copy")  # fmt: skip
    with pytest.raises(ValueError, match="tensor_parallel: 3 does not divide the model's 128 MLA heads"):
        fp8_shard_refusal(fp8, 3)  # sizes that do not divide: named first
    with pytest.raises(TypeError, match="cfg: expected a DeepSeekConfig"):
        fp8_shard_refusal(V3, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tensor_parallel: expected an int in \[1, 65536\], got 0"):
        fp8_shard_refusal(fp8, 0)


@pytest.mark.cpu_only  # it reaches the GPU look-up, which must fail here
def test_a_split_that_holds_whole_blocks_passes_every_host_side_check(tmp_path: Path) -> None:
    from fi_engine.models.deepseek import DeepSeekEngine
    from fi_ffi.errors import UnsupportedDeviceError

    without_weights(tmp_path, V3_FP8)
    with pytest.raises(UnsupportedDeviceError):  # TP 16 (8 heads, 1152 MLP and 128 expert columns a rank): accepted
        DeepSeekEngine(tmp_path, tensor_parallel=16)


def test_cli_generate_takes_tp_for_deepseek_and_names_what_does_not_divide(tmp_path: Path, capsys: Any) -> None:
    from fi_ffi.cli import main

    (tmp_path / "config.json").write_text(json.dumps(V3))
    rc = main(["generate", "--model", str(tmp_path), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--tp", "3"])
    assert rc == 2
    assert "tensor_parallel: 3 does not divide the model's 128 MLA heads" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the rules, in numpy


def _rmsnorm(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_mla_heads_split_across_ranks_sum_to_the_whole_attention(n: int) -> None:
    """Queries through the low-rank q_a (whole) and q_b (each rank its heads' rows), the latent and RoPE key from
    kv_a (whole: every rank computes and caches the same), each rank's heads' rows of kv_b in the absorbed form,
    its heads' columns of o_proj: the ranks' outputs add up to transformers' unabsorbed attention + o_proj."""
    rng = np.random.default_rng(n)
    hid, heads, q_rank, kv_rank, nope, rope, v_dim, t = 48, 8, 24, 32, 16, 8, 12, 6
    q_a, q_b = rng.normal(0, 0.2, (q_rank, hid)), rng.normal(0, 0.2, (heads * (nope + rope), q_rank))
    kv_a, kv_b = rng.normal(0, 0.2, (kv_rank + rope, hid)), rng.normal(0, 0.2, (heads * (nope + v_dim), kv_rank))
    o = rng.normal(0, 0.2, (hid, heads * v_dim))
    x = rng.normal(0, 1, (t, hid))
    scale = (nope + rope) ** -0.5
    c, k_pe = _rmsnorm(x @ kv_a[:kv_rank].T), x @ kv_a[kv_rank:].T  # the latents: whole on every rank

    def queries(q_b_rows: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray]:
        q = (_rmsnorm(x @ q_a.T) @ q_b_rows.T).reshape(t, h, nope + rope)
        return q[..., :nope], q[..., nope:]

    whole = mla_unabsorbed(*queries(q_b, heads), c, k_pe, kv_b, heads, nope, v_dim, scale).reshape(t, -1) @ o.T
    local, parts = heads // n, []
    for r in range(n):
        out = mla_absorbed(*queries(rows(q_b, r, n), local), c, k_pe, rows(kv_b, r, n), local, nope, v_dim, scale)
        parts.append(out.reshape(t, -1) @ columns(o, r, n).T)  # a partial sum (the all-reduce adds them)
    np.testing.assert_allclose(np.sum(parts, axis=0), whole, rtol=1e-10, atol=1e-10)
    # each rank's absorbed factors are those of its heads among the whole's
    uk_t, uv = split_kv_b(kv_b, heads, nope, v_dim)
    for r in range(n):
        got = split_kv_b(rows(kv_b, r, n), local, nope, v_dim)
        assert np.array_equal(got[0], uk_t[r * local : (r + 1) * local])
        assert np.array_equal(got[1], uv[r * local : (r + 1) * local])


# V3's routing (sigmoid scores, groups, a scaling factor, renormalized) and V2-Lite's (softmax, two shared experts)
V3_AND_V2_ROUTING = pytest.mark.parametrize(
    ("routing", "renormalize", "shared"),
    [
        (DeepSeekRouting("noaux_tc", "sigmoid", 4, 2, 2.5, 1), True, 1),  # V3
        (DeepSeekRouting("greedy", "softmax", 1, 1, 1.0, 2), False, 2),  # V2-Lite: two shared experts
    ],
    ids=["v3", "v2"],
)


def _swiglu(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
    gu = x @ gate_up.T
    g, u = gu[:, : gu.shape[1] // 2], gu[:, gu.shape[1] // 2 :]
    return (g / (1 + np.exp(-g)) * u) @ down.T


@V3_AND_V2_ROUTING
@pytest.mark.parametrize("n", [2, 4])
def test_routed_and_shared_expert_columns_sum_to_the_whole_moe_layer(
    routing: DeepSeekRouting, renormalize: bool, shared: int, n: int
) -> None:
    """The router and the correction bias whole (every rank routes each token to the same experts with the same
    weights), each rank the same intermediate columns of every routed expert (``expert_rows`` of the stacked
    gate/up, columns of down) and of the shared experts (rows of gate and up, columns of down): the ranks'
    outputs add up to the layer's."""
    rng = np.random.default_rng(n + shared)
    e, k, hid, inter, t = 16, 4, 24, 16, 9
    router, bias = rng.normal(0, 1, (e, hid)), rng.normal(0, 0.1, e)
    gate_up, down = rng.normal(0, 0.3, (e, 2 * inter, hid)), rng.normal(0, 0.3, (e, hid, inter))
    s_gate_up, s_down = rng.normal(0, 0.3, (2 * shared * inter, hid)), rng.normal(0, 0.3, (hid, shared * inter))
    x = rng.normal(0, 1, (t, hid))
    logits = (x @ router.T).astype(np.float32)
    weights, experts = grouped_topk(logits, k, routing, renormalize, bias if routing.method == "noaux_tc" else None)

    def layer(gu: np.ndarray, dn: np.ndarray, s_gu: np.ndarray, s_dn: np.ndarray) -> np.ndarray:
        out = _swiglu(x, s_gu, s_dn)
        for row in range(t):
            for j in range(k):
                x_ = experts[row, j]
                out[row] += weights[row, j] * _swiglu(x[row : row + 1], gu[x_], dn[x_])[0]
        return out

    whole = layer(gate_up, down, s_gate_up, s_down)
    parts = []
    for r in range(n):
        s_gate, s_up = np.split(s_gate_up, 2)
        s_gu = np.concatenate([rows(s_gate, r, n), rows(s_up, r, n)])  # what DeepSeek.load stacks for the rank
        step = inter // n
        parts.append(layer(expert_rows(gate_up, r, n), down[:, :, r * step : (r + 1) * step], s_gu,
                           columns(s_down, r, n)))  # fmt: skip
    np.testing.assert_allclose(np.sum(parts, axis=0), whole, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- each rank's load


def _loaded(
    path: Path, rank: int, n: int, as_stored: bool = True, graph: bool = False, expert_split: str = "columns"
) -> tuple[Any, SimpleNamespace, HostArrays]:
    """``DeepSeek.load`` of rank ``rank`` of ``n`` with the uploads kept on the host; a MoE layer (which builds its
    kernels on the GPU) is the arguments the load gives it (``helpers.host_uploads.MoEArguments``, patched in by the
    caller where the model has one). ``as_stored``: ``ModelRunner.fp8_experts_as_stored``; ``graph``: a CUDA-graph
    engine (``static_moe``); ``expert_split``: ``DeepSeekEngine``'s."""
    uploads, family = HostArrays(), DeepSeek(fused_routing=False, expert_split=expert_split)
    cfg = family.read_config(path)
    eng = SimpleNamespace(
        model_config=cfg, config=shard_config(cfg, n), rank=rank, tensor_parallel=n, cupy=uploads, device=0,
        vocab_shard=VocabShard.of(cfg.vocab_size, rank, n) if n > 1 else None, static_moe=graph, cuda_graph=graph,
        moe_workspace=object(), fp8_experts_as_stored=as_stored, max_batch=4, max_prefill_tokens=64, stream=None,
        dense=None, family=family, dense_moe=lambda rows: False,
    )  # fmt: skip
    family.check(eng, cfg)
    family.load(eng, Checkpoint(path))
    return family, eng, uploads


def _dense_only(tmp_path: Path, q_lora_rank: int | None, fp8: bool) -> Path:
    """One layer (the dense one) of helpers.moe_checkpoints' random V3: 16 heads, dense MLP 1024; FP8 in 128x128
    blocks where asked (each rank's 8 heads hold whole blocks: q_b 768 rows, kv_b 512, o_proj 256 columns)."""
    src = save_random_deepseek_v3(tmp_path / "bf16", layers=1, q_lora_rank=q_lora_rank)
    if not fp8:
        return src
    write_fp8_copy(src, tmp_path / "fp8", "block")
    return tmp_path / "fp8"


@pytest.mark.parametrize(("q_lora_rank", "fp8"), [(128, False), (None, False), (128, True)],
                         ids=["v3-bf16", "q_proj-bf16", "v3-fp8"])  # fmt: skip
def test_each_rank_registers_the_checkpoints_cut_of_every_projection(
    tmp_path: Path, q_lora_rank: int | None, fp8: bool
) -> None:
    """TP 2: rank r keeps heads [8r, 8r + 8) (their 96 rows each of q_b_proj or q_proj, their absorbed factors from
    kv_b_proj's 64 rows each, their 32 columns each of o_proj), the dense MLP's gate/up rows and down columns
    [512r, 512r + 512), the latent projections, norms whole, its vocabulary rows of the embedding and LM head; each
    bit for bit what the one-GPU load holds, cut (FP8: each rank dequantizes only its blocks, the same values)."""
    path = _dense_only(tmp_path, q_lora_rank, fp8)
    one, eng1, up1 = _loaded(path, 0, 1)
    assert eng1.config.num_qo_heads == 16 and eng1.head_rows == 4096

    def whole(ptrs: list[int]) -> np.ndarray:
        return up1.by_ptr[ptrs[0]]

    w1 = one.w
    for r in range(2):
        fam, eng, up = _loaded(path, r, 2)
        w = fam.w

        def got(ptrs: list[int], up: HostArrays = up) -> np.ndarray:
            return up.by_ptr[ptrs[0]]

        assert eng.config.num_qo_heads == 8 and eng.config.intermediate_size == 512
        if q_lora_rank is None:
            assert np.array_equal(got(w.q), rows(whole(w1.q), r, 2)) and not w.qa
        else:
            assert np.array_equal(got(w.qa), whole(w1.qa))  # the query latent: whole
            assert np.array_equal(got(w.qb), rows(whole(w1.qb), r, 2))
            assert np.array_equal(up.by_ptr[w.qa_norm[0].data_ptr], up1.by_ptr[w1.qa_norm[0].data_ptr])
        for name in ("ckv", "kpe"):  # the latent KV and the RoPE key: whole on every rank
            assert np.array_equal(got(getattr(w, name)), whole(getattr(w1, name)))
        heads = slice(8 * r, 8 * r + 8)
        assert np.array_equal(got(w.uk_t), whole(w1.uk_t)[heads]) and got(w.uk_t).shape == (8, 512, 32)
        assert np.array_equal(got(w.uv), whole(w1.uv)[heads]) and got(w.uv).shape == (8, 32, 512)
        assert np.array_equal(got(w.o), columns(whole(w1.o), r, 2))
        gate, up_rows = np.split(whole(w1.gu), 2)
        assert np.array_equal(got(w.gu), np.concatenate([rows(gate, r, 2), rows(up_rows, r, 2)]))
        assert np.array_equal(got(w.d), columns(whole(w1.d), r, 2))
        for norm in ("ln1", "ln2"):
            assert np.array_equal(
                up.by_ptr[getattr(eng, norm)[0].data_ptr], up1.by_ptr[getattr(eng1, norm)[0].data_ptr]
            )
        vs = eng.vocab_shard
        assert eng.head_rows == vs.rows == 2048
        assert np.array_equal(up.by_ptr[eng.embed], vs.take(up1.by_ptr[eng1.embed]))
        assert np.array_equal(up.by_ptr[eng.lm_head], vs.take(up1.by_ptr[eng1.lm_head]))


def test_the_shared_experts_are_cut_like_a_dense_mlp(tmp_path: Path) -> None:
    """A MoE layer's shared experts (intermediate 256) at TP 2, from the FP8 copy: rank r's gate and up rows and
    down columns [128r, 128r + 128) of what one GPU reads, each rank dequantizing only its blocks."""
    from fi_engine.models.deepseek import _DeepSeekWeights

    write_fp8_copy(save_random_deepseek_v3(tmp_path / "bf16"), tmp_path / "fp8", "block")
    cfg, ckpt = DeepSeekConfig.from_dir(tmp_path / "fp8"), Checkpoint(tmp_path / "fp8")
    ld = _DeepSeekWeights(ckpt, HostArrays(), "bfloat16", 0, [], fp8=cfg.fp8)
    prefix = "model.layers.1.mlp.shared_experts."
    gate_up, down = ld.swiglu(prefix, 256, 512, 0, 1)
    assert gate_up.shape == (512, 512) and down.shape == (512, 256)
    gate, up = np.split(gate_up, 2)
    for r in range(2):
        gu, dn = ld.swiglu(prefix, 256, 512, r, 2)
        assert np.array_equal(gu, np.concatenate([rows(gate, r, 2), rows(up, r, 2)]))
        assert np.array_equal(dn, columns(down, r, 2))


# ---------------------------------------------------------------------------------------------- FP8 routed experts


@pytest.fixture
def moe_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MoE layer and its scratch (CUDA kernels and buffers) replaced by the arguments the load gives them."""
    import fi_engine.layers.moe as moe
    import fi_engine.models.llama as llama

    monkeypatch.setattr(moe, "MoEScratch", MoEArguments)
    monkeypatch.setattr(llama, "MoELayer", MoEArguments)


def _fp8_moe_model(tmp_path: Path, layout: str = "block") -> tuple[Path, Path]:
    """helpers.moe_checkpoints' random V3 (hidden 512; layer 0 dense, layer 1 8 routed experts of 256 top-2 and a
    shared expert) in FP8 ``layout``, and the bfloat16 copy of the weights it holds."""
    src = save_random_deepseek_v3(tmp_path / "bf16")
    write_16bit_copy(src, tmp_path / "copy", write_fp8_copy(src, tmp_path / "fp8", layout))
    return tmp_path / "fp8", tmp_path / "copy"


def _scales(ckpt: Checkpoint, prefix: str, lo: int, hi: int, axis: int) -> np.ndarray:
    """The float32 128x128-block scales of rows (``axis`` 0) or columns (1) ``[lo, hi)`` of projection ``prefix`` as
    the grouped GEMV reads them, from the tensors the checkpoint holds."""
    s = np.asarray(ckpt.array(prefix + ".weight_scale_inv"))
    return s[lo // 128 : hi // 128] if axis == 0 else s[:, lo // 128 : hi // 128]


@pytest.mark.parametrize("n", [1, 2])
def test_each_rank_keeps_its_cut_of_the_routed_experts_codes_and_scales(
    tmp_path: Path, moe_arguments: None, n: int
) -> None:
    """The routed experts of an FP8 checkpoint stay e4m3: rank r of n hands its MoE layer (``fp8_experts``) every
    expert's gate and up code rows [ri, ri + i) stacked and its down code columns alike (i = 256 / n), in the
    grouped GEMV's tiled order, bit for bit the checkpoint's bytes, with their scales (128x128 blocks: the blocks of
    those rows / columns); the layer's 16-bit weights are the shared copy
    buffers, its capacity the engine's max_batch (eager steps up to it take the grouped GEMV); the router stays
    whole; the shared expert is dequantized and cut like a dense MLP."""
    from fi_engine.kernels.fp8_moe_gemv import tiled_layout

    path, copy = _fp8_moe_model(tmp_path)
    ckpt, bf16 = Checkpoint(path), Checkpoint(copy)
    i, base = 256 // n, "model.layers.1.mlp."
    for r in range(n):
        fam, eng, up = _loaded(path, r, n)
        assert fam.experts_stored and eng.moe_layers[0] is None
        layer = eng.moe_layers[1]
        kw, f = layer.kwargs, layer.kwargs["fp8_experts"]
        assert (kw["capacity"], kw["top_k"], kw["renormalize"], kw["dense_rows"]) == (4, 2, True, None)
        assert f.block == (128, 128) and f.tiled
        gate_up, down = up.by_ptr[f.gate_up.data.ptr], up.by_ptr[f.down.data.ptr]
        assert gate_up.shape == (8, 2 * i, 512) and down.shape == (8, 512, i) and gate_up.dtype == np.uint8
        gu_scales, down_scales = up.by_ptr[f.gate_up_scales.data.ptr], up.by_ptr[f.down_scales.data.ptr]
        for x in range(8):
            p = f"{base}experts.{x}."
            codes = [np.asarray(ckpt.array(f"{p}{q}.weight"))[r * i : (r + 1) * i] for q in ("gate_proj", "up_proj")]
            assert np.array_equal(gate_up[x], tiled_layout(np.concatenate(codes)[None])[0]), (r, x)
            cols = np.asarray(ckpt.array(p + "down_proj.weight"))[:, r * i : (r + 1) * i]
            assert np.array_equal(down[x], tiled_layout(cols[None])[0]), (r, x)
            want = [_scales(ckpt, p + q, r * i, (r + 1) * i, 0) for q in ("gate_proj", "up_proj")]
            assert np.array_equal(gu_scales[x], np.concatenate(want)), (r, x)
            assert np.array_equal(down_scales[x], _scales(ckpt, p + "down_proj", r * i, (r + 1) * i, 1))
        weights = layer.args[0]  # MoEWeights: the 16-bit copy buffers every layer shares, written before a 16-bit path
        assert fam.moe_expert_copy == (weights.gate_up, weights.down)
        assert weights.gate_up.shape == (8, 2 * i, 512) and weights.down.shape == (8, 512, i)
        router = np.asarray(ckpt.array(base + "gate.weight"))
        assert np.array_equal(up.by_ptr[weights.router.data.ptr], router)  # whole: every rank routes alike
        shared = [np.asarray(bf16.array(f"{base}shared_experts.{q}.weight")) for q in ("gate_proj", "up_proj")]
        assert np.array_equal(up.by_ptr[fam.w.shared_gu[1]], np.concatenate([rows(s, r, n) for s in shared]))
        down16 = np.asarray(bf16.array(base + "shared_experts.down_proj.weight"))
        assert np.array_equal(up.by_ptr[fam.w.shared_d[1]], columns(down16, r, n))


@pytest.mark.parametrize(
    ("layout", "as_stored", "n"),
    [("block", False, 1), ("block", False, 2), ("channel", True, 2), ("tensor", True, 1)],
    ids=["switch-off-1", "switch-off-2", "channel-2", "tensor-1"],
)
def test_the_switch_off_dequantizes_the_routed_experts_at_load(
    tmp_path: Path, moe_arguments: None, layout: str, as_stored: bool, n: int
) -> None:
    """``ModelRunner.fp8_experts_as_stored = False``, or scales per row or tensor (not DeepSeek's published form):
    each rank's routed experts are read dequantized, bit for bit the bfloat16 copy's cut (gate rows, then up rows,
    per expert; down columns), with no e4m3 experts and no fixed-capacity path (eager DeepSeek routes on the host
    through the grouped GEMMs)."""
    path, copy = _fp8_moe_model(tmp_path, layout)
    bf16, i, base = Checkpoint(copy), 256 // n, "model.layers.1.mlp.experts."
    for r in range(n):
        fam, eng, up = _loaded(path, r, n, as_stored=as_stored)
        kw, weights = eng.moe_layers[1].kwargs, eng.moe_layers[1].args[0]
        assert not fam.experts_stored and kw["fp8_experts"] is None and kw["capacity"] is None
        assert fam.moe_expert_copy is None
        gate_up, down = up.by_ptr[weights.gate_up.data.ptr], up.by_ptr[weights.down.data.ptr]
        assert gate_up.dtype == np.uint16 and gate_up.shape == (8, 2 * i, 512) and down.shape == (8, 512, i)
        for x in range(8):
            want = [rows(np.asarray(bf16.array(f"{base}{x}.{q}.weight")), r, n) for q in ("gate_proj", "up_proj")]
            assert np.array_equal(gate_up[x], np.concatenate(want)), (r, x)
            assert np.array_equal(down[x], columns(np.asarray(bf16.array(f"{base}{x}.down_proj.weight")), r, n))


def test_routed_experts_that_cannot_stay_e4m3_are_refused_or_dequantized_by_name(
    tmp_path: Path, moe_arguments: None
) -> None:
    """TP 4 cuts each expert's 256 rows into 64, inside a 128-row block: refused before any GPU work naming the
    routed experts' gate projection; a routed expert left bfloat16 in an FP8 checkpoint is refused naming the tensor
    (the stored reader reads every expert as e4m3); with the switch off, it is read as the 16-bit tensor it is."""
    from fi_engine.checkpoint.safetensors import write_safetensors

    path, _ = _fp8_moe_model(tmp_path)
    cfg = DeepSeekConfig.from_dir(path)
    with pytest.raises(ValueError) as info:
        DeepSeek(fused_routing=False).check(SimpleNamespace(tensor_parallel=4, cuda_graph=False), cfg)
    assert str(info.value) == (
        "tensor_parallel: 4: mlp.experts.N.gate_proj: a 4-way shard of its 256 rows (64) cuts a block of 128 rows "
        "that share one scale; pick a tensor_parallel whose shards hold whole blocks of scales, or serve a bfloat16 "
        "copy"
    )
    assert cfg.fp8 is not None and not cfg.fp8.experts_for(512, 256, 4).stored_experts
    ckpt, original = Checkpoint(path), Checkpoint(tmp_path / "bf16")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    tensors: dict[str, Any] = {}
    for key, info_ in ckpt.tensors.items():
        if key != name + "_scale_inv":
            tensors[key] = (np.asarray(ckpt.array(key)), info_.dtype)
    tensors[name] = (np.asarray(original.array(name)), "bfloat16")
    mixed = tmp_path / "mixed"  # (a new folder: the checkpoint above stays mapped)
    mixed.mkdir()
    write_safetensors(mixed / "model.safetensors", tensors)
    (mixed / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=rf"model: tensor '{name}' is bfloat16; quantization_config says FP8"):
        _loaded(mixed, 0, 1)
    _, eng, up = _loaded(mixed, 0, 1, as_stored=False)
    gate_up = up.by_ptr[eng.moe_layers[1].args[0].gate_up.data.ptr]
    assert np.array_equal(gate_up[3, 256:], np.asarray(original.array(name)))


# ---------------------------------------------------------------------------------------------- split by expert


def test_the_expert_split_keeps_v3s_experts_whole_and_splits_the_shared_expert_by_columns() -> None:
    """``expert_split="experts"``: each of N ranks holds 256 / N of V3's routed experts whole (``moe`` unchanged:
    every rank routes over all 256), the MLA heads, dense MLP and shared expert split as with the column split; the
    FP8 checkpoint's routed experts are whole blocks at any N, so only the shared expert's columns bound it."""
    v3 = DeepSeekConfig.from_dict(V3)
    import dataclasses

    by_expert = dataclasses.replace(v3, expert_split="experts")
    for n in (1, 2, 4, 8, 16):
        local = shard_config(by_expert, n)
        assert local.moe == v3.moe and local.routing == v3.routing  # whole experts, the same routing everywhere
        assert (local.expert_parts, local.local_experts, local.shared_intermediate) == (n, 256 // n, 2048 // n)
        assert (local.num_qo_heads, local.intermediate_size) == (128 // n, 18432 // n)
    assert shard_config(v3, 2).local_experts == 256 and shard_config(v3, 2).expert_parts == 1  # the column split
    fp8 = dataclasses.replace(DeepSeekConfig.from_dict(V3_FP8), expert_split="experts")
    assert fp8_shard_refusal(fp8, 16) is None
    with pytest.raises(ValueError, match=r"tensor_parallel: 512 does not divide the model's 128 MLA heads"):
        shard_config(fp8, 512)


@pytest.mark.parametrize(
    ("change", "n", "message"),
    [
        ({"n_routed_experts": 96, "n_group": 8}, 64,
         r"tensor_parallel: 64 does not divide the model's 96 routed experts \(n_routed_experts\)"),
        ({"n_shared_experts": 3, "moe_intermediate_size": 1000}, 16,
         r"16 does not divide the model's 3000 shared expert columns \(moe_intermediate_size \* n_shared_experts\)"),
    ],
    ids=["experts", "shared-columns"],
)  # fmt: skip
def test_the_expert_split_refuses_by_name_what_it_cannot_split(
    tmp_path: Path, change: dict, n: int, message: str
) -> None:
    from fi_engine.models.deepseek import DeepSeekEngine

    without_weights(tmp_path, {**V3, **change})
    with pytest.raises(ValueError, match=message):
        DeepSeekEngine(tmp_path, tensor_parallel=n, expert_split="experts")


def test_the_expert_split_refuses_a_bad_value_and_a_model_without_routed_experts(tmp_path: Path) -> None:
    from fi_engine.models.deepseek import DeepSeekEngine

    without_weights(tmp_path, V3)
    for bad in ("rows", None, 2):
        with pytest.raises(ValueError, match=r"expert_split: expected one of 'columns', 'experts' \(how tensor "):
            DeepSeekEngine(tmp_path, tensor_parallel=2, expert_split=bad)  # type: ignore[arg-type]
    dense = {**V3, "first_k_dense_replace": V3["num_hidden_layers"], "n_routed_experts": None}
    cfg = DeepSeek(expert_split="experts").read_config(without_weights(tmp_path / "dense", dense))
    assert cfg.moe is None and cfg.expert_split == "experts"
    with pytest.raises(ValueError, match=r"expert_split: 'experts' splits the routed experts, and this model has none"):
        DeepSeek(expert_split="experts").check(SimpleNamespace(tensor_parallel=2, cuda_graph=False), cfg)


@V3_AND_V2_ROUTING
@pytest.mark.parametrize("n", [2, 4])
def test_each_assignment_is_served_on_exactly_one_rank_and_the_ranks_sum_to_the_layer(
    routing: DeepSeekRouting, renormalize: bool, shared: int, n: int
) -> None:
    """Every rank routes alike over all 16 experts; rank r keeps experts [4r, 4r + 4) (n = 4) whole: each (token,
    expert) assignment is on exactly one rank with its weight (renumbered from 0), the others' an id past its experts
    with weight 0, sorted after its experts' segments; its local experts plus its columns of the shared experts give
    partial outputs that add up to the whole layer, in float64."""
    rng = np.random.default_rng(10 * n + shared)
    e, k, hid, inter, t = 16, 4, 24, 16, 9
    router, bias = rng.normal(0, 1, (e, hid)), rng.normal(0, 0.1, e)
    gate_up, down = rng.normal(0, 0.3, (e, 2 * inter, hid)), rng.normal(0, 0.3, (e, hid, inter))
    s_gate_up, s_down = rng.normal(0, 0.3, (2 * shared * inter, hid)), rng.normal(0, 0.3, (hid, shared * inter))
    x = rng.normal(0, 1, (t, hid))
    logits = (x @ router.T).astype(np.float32)
    weights, experts = grouped_topk(logits, k, routing, renormalize, bias if routing.method == "noaux_tc" else None)

    def layer(ids: np.ndarray, w: np.ndarray, gu: np.ndarray, dn: np.ndarray, s_gu: np.ndarray, s_dn: np.ndarray):  # type: ignore[no-untyped-def]
        out = _swiglu(x, s_gu, s_dn)
        for row in range(t):
            for j in range(k):
                if w[row, j] != 0:  # (what the combine skips: another rank's expert)
                    out[row] += w[row, j] * _swiglu(x[row : row + 1], gu[ids[row, j]], dn[ids[row, j]])[0]
        return out

    whole = layer(experts, weights, gate_up, down, s_gate_up, s_down)
    local, served, parts = e // n, np.zeros((t, k), int), []
    for r in range(n):
        ids, w = local_assignments(experts, weights, r * local, local)
        mine = (experts >= r * local) & (experts < (r + 1) * local)
        assert np.array_equal(ids[mine] + r * local, experts[mine]) and np.array_equal(w[mine], weights[mine])
        assert (ids[~mine] == local).all() and (w[~mine] == 0).all()
        served += mine
        groups = group_local(ids, local)
        assert groups.seg_indptr.shape == (local + 1,) and groups.seg_indptr[-1] == mine.sum()
        assert np.array_equal(groups.counts, np.bincount(ids[mine], minlength=local))
        sorted_ids = ids.reshape(-1)[groups.row_token * k + groups.row_choice]
        assert (sorted_ids[: mine.sum()] < local).all() and (sorted_ids[mine.sum() :] == local).all()
        s_gate, s_up = np.split(s_gate_up, 2)
        s_gu = np.concatenate([rows(s_gate, r, n), rows(s_up, r, n)])
        own = slice(r * local, (r + 1) * local)
        parts.append(layer(ids, w, gate_up[own], down[own], s_gu, columns(s_down, r, n)))
    assert (served == 1).all()  # every (token, expert) pair on exactly one rank
    np.testing.assert_allclose(np.sum(parts, axis=0), whole, rtol=1e-10, atol=1e-10)


def test_local_assignments_refuses_bad_arguments_by_name() -> None:
    experts, weights = np.array([[0, 5]], np.int32), np.ones((1, 2), np.float32)
    with pytest.raises(TypeError, match=r"experts: expected a 2-D integer numpy array"):
        local_assignments(experts.astype(np.float32), weights, 0, 4)
    with pytest.raises(ValueError, match=r"weights: expected a numpy array of the shape of experts \(1, 2\)"):
        local_assignments(experts, weights[:, :1], 0, 4)
    with pytest.raises(ValueError, match=r"count: expected 1\.\.1048576, got 0"):
        local_assignments(experts, weights, 0, 0)
    with pytest.raises(TypeError, match=r"first: expected an int, got float"):
        local_assignments(experts, weights, 0.5, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_each_rank_registers_its_routed_experts_whole_bit_for_bit(
    tmp_path: Path, moe_arguments: None, fp8: bool
) -> None:
    """TP 2 split by expert, random V3 (8 routed experts of 256, hidden 512): rank r hands its MoE layer experts
    [4r, 4r + 4) whole -- 16-bit: gate rows then up rows of each, and down, bit for bit the checkpoint's; FP8: their
    e4m3 codes in the grouped GEMV's tiled order and every block of their scales, as stored -- with those experts'
    router rows; the family keeps the whole router (every rank routes over all 8) and the shared expert's columns
    [128r, 128r + 128) as the column split does; the MoE buffers are sized for 4 experts of 256."""
    from fi_engine.kernels.fp8_moe_gemv import tiled_layout

    if fp8:
        path, copy = _fp8_moe_model(tmp_path)
    else:
        path = copy = save_random_deepseek_v3(tmp_path / "bf16")
    ckpt, bf16, base = Checkpoint(path), Checkpoint(copy), "model.layers.1.mlp."
    router = np.asarray(ckpt.array(base + "gate.weight"))
    for r in range(2):
        fam, eng, up = _loaded(path, r, 2, expert_split="experts")
        assert eng.config.local_experts == 4 and fam.first_expert == 4 * r and fam.experts_stored == fp8
        layer = eng.moe_layers[1]
        kw, weights, own = layer.kwargs, layer.args[0], range(4 * r, 4 * r + 4)
        assert up.by_ptr[fam.w.router[1].data.ptr].shape == (8, 512)
        assert np.array_equal(up.by_ptr[fam.w.router[1].data.ptr], router)  # whole: every rank routes alike
        assert np.array_equal(up.by_ptr[weights.router.data.ptr], router[4 * r : 4 * r + 4])
        assert fam.moe_scratch.kwargs["num_experts"] == 4 and fam.moe_scratch.kwargs["intermediate"] == 256
        if fp8:
            f = kw["fp8_experts"]
            gate_up, down = up.by_ptr[f.gate_up.data.ptr], up.by_ptr[f.down.data.ptr]
            assert gate_up.shape == (4, 512, 512) and down.shape == (4, 512, 256) and gate_up.dtype == np.uint8
            gu_scales, down_scales = up.by_ptr[f.gate_up_scales.data.ptr], up.by_ptr[f.down_scales.data.ptr]
            for at, x in enumerate(own):
                p = f"{base}experts.{x}."
                codes = [np.asarray(ckpt.array(f"{p}{q}.weight")) for q in ("gate_proj", "up_proj")]
                assert np.array_equal(gate_up[at], tiled_layout(np.concatenate(codes)[None])[0]), (r, x)
                assert np.array_equal(down[at], tiled_layout(np.asarray(ckpt.array(p + "down_proj.weight"))[None])[0])
                want = [np.asarray(ckpt.array(f"{p}{q}.weight_scale_inv")) for q in ("gate_proj", "up_proj")]
                assert np.array_equal(gu_scales[at], np.concatenate(want)), (r, x)
                assert np.array_equal(down_scales[at], np.asarray(ckpt.array(p + "down_proj.weight_scale_inv")))
            assert fam.moe_expert_copy == (weights.gate_up, weights.down)
            assert weights.gate_up.shape == (4, 512, 512) and weights.down.shape == (4, 512, 256)
        else:
            assert kw["fp8_experts"] is None
            gate_up, down = up.by_ptr[weights.gate_up.data.ptr], up.by_ptr[weights.down.data.ptr]
            assert gate_up.shape == (4, 512, 512) and down.shape == (4, 512, 256)
            for at, x in enumerate(own):
                p = f"{base}experts.{x}."
                want = [np.asarray(ckpt.array(f"{p}{q}.weight")) for q in ("gate_proj", "up_proj")]
                assert np.array_equal(gate_up[at], np.concatenate(want)), (r, x)
                assert np.array_equal(down[at], np.asarray(ckpt.array(p + "down_proj.weight"))), (r, x)
        shared = [np.asarray(bf16.array(f"{base}shared_experts.{q}.weight")) for q in ("gate_proj", "up_proj")]
        assert np.array_equal(up.by_ptr[fam.w.shared_gu[1]], np.concatenate([rows(s, r, 2) for s in shared]))
        down16 = np.asarray(bf16.array(base + "shared_experts.down_proj.weight"))
        assert np.array_equal(up.by_ptr[fam.w.shared_d[1]], columns(down16, r, 2))
        assert eng.config.shared_intermediate == 128


def test_the_expert_split_lifts_the_routed_experts_block_bound_but_not_the_shared_experts(
    tmp_path: Path, moe_arguments: None
) -> None:
    """TP 4 of the random FP8 V3: by columns, each expert's 256 rows cut into 64 (inside a 128-row block, refused
    naming the routed experts); by expert, the routed experts are whole, and the refusal names the shared expert,
    whose 256 columns still split 4 ways."""
    path, _ = _fp8_moe_model(tmp_path)
    cfg = DeepSeek(expert_split="experts").read_config(path)
    with pytest.raises(
        ValueError, match=r"tensor_parallel: 4: mlp.shared_experts.gate_proj: a 4-way shard of its 256 "
    ):
        DeepSeek(expert_split="experts").check(SimpleNamespace(tensor_parallel=4, cuda_graph=False), cfg)

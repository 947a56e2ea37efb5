"""The DeepSeek engine against transformers on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy, transformers; kernels: the core
wheel, the ext wheel's bfloat16 MLA modules, rope and silu_and_mul, and the models wheel's grouped GEMM).

Random small checkpoints built with transformers' own config and model classes, saved in bfloat16:

- ``v3``: DeepseekV3Config, 3 layers (``first_k_dense_replace=1``: one dense, two MoE), 16 heads (as the MLA
  kernel tests), ``q_lora_rank`` 128, ``kv_lora_rank`` 512 and ``qk_rope_head_dim`` 64 (the MLA kernels' sizes),
  ``qk_nope_head_dim`` 32, ``v_head_dim`` 32, 8 routed experts in 2 groups (``topk_group`` 1, top-2, random
  ``e_score_correction_bias``), one shared expert, ``routed_scaling_factor`` 2.5, YaRN (factor 4, ``mscale`` 1.0,
  ``mscale_all_dim`` 0.8: the cos/sin and the softmax scale both change);
- ``v2lite``: DeepseekV2Config shaped like DeepSeek-V2-Lite (no ``q_lora_rank``, softmax ``greedy`` routing of 8
  experts, top-2, not renormalized, two shared experts), plain RoPE.

The reference is the same transformers model in float32 on the saved (rounded) weights. Router near ties: the engine
routes on bfloat16 activations, the reference on float32 ones, so a token whose k-th and (k+1)-th choice are that
close may take other experts (tests/engine/test_gpu_models.py measured it for Mixtral). So the engine records its
routing (``MoELayer.last_routing``), the test checks that the reference's own routing is what
:func:`~fi_engine.layers.deepseek_routing.grouped_topk` computes from the reference's router logits (the routing code
against transformers'), counts where the engine's choice differs (at most 10% of (layer, token) pairs), and compares the
logits with the reference run on the engine's experts (weights: the reference's own scores of them). Tolerance on the
logits: 0.08 (bfloat16, as tests/engine/test_gpu_llama.py); transformers' own bfloat16 error on the same prompts is
printed as the yardstick. The decode CUDA graph is checked against eager decode (same tokens, last-step logits within
the same tolerance), with the default routing and with the device fallback."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.gpu import engine_against_transformers

cp, torch, transformers = engine_against_transformers()

from helpers.checkpoints import float32_reference, randomize_norms  # noqa: E402
from helpers.hf_configs import DEEPSEEK_RANDOM, DEEPSEEK_RANDOM_V2, DEEPSEEK_RANDOM_V3  # noqa: E402
from helpers.yardstick import LOGIT_TOL, check_eager_matches_graph, prompts  # noqa: E402

from fi_engine.layers.deepseek_routing import grouped_topk  # noqa: E402
from fi_engine.models.deepseek import DeepSeekEngine  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = LOGIT_TOL["bfloat16"]
VOCAB = 4096
COMMON = {**DEEPSEEK_RANDOM, "vocab_size": VOCAB}
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024, beta_fast=32, beta_slow=1, mscale=1.0,
            mscale_all_dim=0.8)  # fmt: skip
FAMILIES = {
    "v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        DEEPSEEK_RANDOM_V3,
        YARN,
    ),
    "v2lite": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        DEEPSEEK_RANDOM_V2,
        None,
    ),
}
PROMPT_LENS = (1, 7, 16, 33, 50)
DECODE_LENS = (3, 16, 29)
MAX_NEW = 12


def _config(cls, extra: dict, rope: dict | None):  # type: ignore[no-untyped-def]
    kw = {**COMMON, **extra}
    theta = 10000.0
    if rope is None:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        legacy = {"rope_theta": theta, "rope_scaling": None}
    else:
        kw["rope_parameters"] = {**rope, "rope_theta": theta}
        legacy = {
            "rope_theta": theta,
            "rope_scaling": {("type" if k == "rope_type" else k): v for k, v in rope.items()},
        }
    try:
        return cls(**kw)
    except TypeError:  # transformers 4.x: rope_theta + rope_scaling
        del kw["rope_parameters"]
        return cls(**kw, **legacy)


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    config_cls, model_cls, extra, rope = FAMILIES[request.param]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"this transformers has no {config_cls}")
    request.getfixturevalue("models_modules")  # the grouped GEMM module: skips naming the wheel without it
    torch.manual_seed(0)
    config = _config(getattr(transformers, config_cls), extra, rope)
    model = getattr(transformers, model_cls)(config)
    randomize_norms(model)  # q_a, kv_a included
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a bias that matters to the choice
                buf.normal_(0.0, 0.05)
    model = model.to(torch.bfloat16)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ref = float32_reference(model)
    bf16 = model.cuda().eval()
    yield request.param, path, ref, bf16
    del ref, bf16
    torch.cuda.empty_cache()


def record_routing(engine):  # type: ignore[no-untyped-def]
    """Per MoE layer (in order), the experts ``[rows, k]`` the engine chose in each forward."""
    seen: dict[int, list[np.ndarray]] = {i: [] for i, m in enumerate(engine.runner.moe_layers) if m is not None}
    inner = engine.family._moe_forward  # the DeepSeek definition's host-routed MoE layer (fi_engine.models.deepseek)

    def wrapped(eng, i, rows, _inner=inner):  # type: ignore[no-untyped-def]
        _inner(eng, i, rows)
        seen[i].append(engine.runner.moe_layers[i].last_routing[1].copy())

    engine.family._moe_forward = wrapped
    return seen


def reference(model, tokens, cfg, forced=None):  # type: ignore[no-untyped-def]
    """The model's logits ``[T, V]`` on one prompt, with per MoE layer its router logits and chosen experts;
    ``forced``: per MoE layer, the experts ``[T, k]`` to use instead (weights: the model's own scores of them, as its
    router computes them)."""
    routing, moe = cfg.routing, cfg.moe
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    hooks = []
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    for j, gate in enumerate(gates):

        def hook(module, args, out, _j=j):  # type: ignore[no-untyped-def]
            x = args[0].reshape(-1, args[0].shape[-1])
            logits = torch.nn.functional.linear(x.float(), module.weight.float())
            if not isinstance(out, tuple) or len(out) not in (2, 3):
                pytest.skip(f"unknown router output of this transformers: {type(out).__name__}")
            idx_pos = [i for i, o in enumerate(out) if torch.is_tensor(o) and not o.is_floating_point()]
            w_pos = [
                i
                for i, o in enumerate(out)
                if torch.is_tensor(o) and o.is_floating_point() and o.shape[-1] == moe.top_k
            ]
            idx_at, w_at = idx_pos[-1], w_pos[-1]
            seen.append((logits.cpu().numpy(), out[idx_at].cpu().numpy()))
            if forced is None:
                return out
            idx = torch.as_tensor(forced[_j], device=logits.device).long()
            scores = logits.sigmoid() if routing.scoring == "sigmoid" else logits.softmax(dim=-1)
            w = scores.gather(1, idx)
            if moe.renormalize:
                w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
            w = w * routing.routed_scaling_factor
            new = list(out)
            new[idx_at], new[w_at] = idx.to(out[idx_at].dtype), w.to(out[w_at].dtype)
            return tuple(new)

        hooks.append(gate.register_forward_hook(hook))
    try:
        ids = torch.tensor([tokens], device="cuda")
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float().cpu().numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


def check_reference_routing(name, cfg, seen, bias):  # type: ignore[no-untyped-def]
    """The reference's own choice equals grouped_topk on its float32 router logits (as sets per token)."""
    for j, (logits, chosen) in enumerate(seen):
        _, ours = grouped_topk(logits, cfg.moe.top_k, cfg.routing, cfg.moe.renormalize, bias[j])
        assert [sorted(r) for r in ours.tolist()] == [sorted(r) for r in chosen.tolist()], f"{name} MoE layer {j}"


def biases(engine):  # type: ignore[no-untyped-def]
    return [b for b, m in zip(engine.family.w.bias, engine.runner.moe_layers, strict=True) if m is not None]


def flips(engine_choice, ref_choice):  # type: ignore[no-untyped-def]
    return sum(sorted(a) != sorted(b) for a, b in zip(engine_choice.tolist(), ref_choice.tolist(), strict=True))


def test_prefill_logits_match_transformers(family) -> None:  # type: ignore[no-untyped-def]
    name, path, ref, bf16 = family
    ps = prompts(PROMPT_LENS, VOCAB)
    with DeepSeekEngine(path, max_batch=4, page_size=16) as engine:
        cfg = engine.config
        assert cfg.model_type == ("deepseek_v3" if name == "v3" else "deepseek_v2")
        seen = record_routing(engine)
        got = engine.prefill_logits(ps)
        bias = biases(engine)
        fused = engine.fused_routing_used
        assert fused is (name == "v3")  # the models wheel is staged: V3 takes the fused kernel by default
    bounds = np.cumsum([0] + [len(p) for p in ps])
    routed = [np.concatenate(calls) for calls in seen.values()]
    assert all(r.shape == (bounds[-1], cfg.moe.top_k) for r in routed)
    total_flips = 0
    for i, (p, g) in enumerate(zip(ps, got, strict=True)):
        want, ref_seen = reference(ref, p, cfg)
        check_reference_routing(name, cfg, ref_seen, bias)
        chosen = [r[bounds[i] : bounds[i + 1]] for r in routed]
        n = sum(flips(c, s[1]) for c, s in zip(chosen, ref_seen, strict=True))
        total_flips += n
        if n:
            want, _ = reference(ref, p, cfg, forced=chosen)
        yard = float(np.abs(reference(bf16, p, cfg)[0] - want).max())
        err = float(np.abs(g - want).max())
        print(f"{name} prompt {i} ({len(p)} tokens): max |logit error| {err:.4f}, transformers bf16 {yard:.4f}, "
              f"router flips {n}, fused routing {fused}")  # fmt: skip
        assert g.shape == want.shape == (len(p), VOCAB)
        assert err <= TOL, f"{name} prompt {i}: max |logit error| {err:.4f} > {TOL} (bf16 transformers: {yard:.4f})"
    assert total_flips <= 0.1 * bounds[-1] * len(routed), f"{name}: {total_flips} routing differences"


def test_greedy_decode_matches_transformers(family) -> None:  # type: ignore[no-untyped-def]
    """Each prompt generated alone (its forwards then hold exactly the teacher-forced sequence's tokens in order,
    so the engine's routing can be given to the reference); every token is the reference's choice up to TOL."""
    name, path, ref, _ = family
    ps = prompts(DECODE_LENS, VOCAB, seed=2)
    exact = total = 0
    with DeepSeekEngine(path, max_batch=4, page_size=16) as engine:
        cfg = engine.config
        for p in ps:
            seen = record_routing(engine)
            r = engine.generate([p], MAX_NEW, eos_token_ids=())
            out = r.tokens[0]
            assert len(out) == MAX_NEW and r.decode_steps == MAX_NEW - 1
            routed = [np.concatenate(calls) for calls in seen.values()]
            seq = p + out[:-1]
            assert all(x.shape[0] == len(seq) for x in routed)
            logits, _ = reference(ref, seq, cfg, forced=routed)
            for t, tok in enumerate(out):
                row = logits[len(p) - 1 + t]
                assert row[tok] >= row.max() - TOL, f"{name} token {t}: engine {tok}, reference {int(row.argmax())}"
                exact += int(tok == int(row.argmax()))
                total += 1
            del engine.family._moe_forward  # the recording wrapper (an instance attribute) goes
        batched = engine.generate(ps, MAX_NEW, eos_token_ids=())
    print(f"{name} eager: {exact}/{total} tokens equal to the reference's argmax; batched {batched.tokens_per_s:.0f} "
          f"tokens/s")  # fmt: skip
    assert [len(t) for t in batched.tokens] == [MAX_NEW] * len(ps)


def test_fused_and_host_routing_agree(family) -> None:  # type: ignore[no-untyped-def]
    """V3: the models wheel's NoAuxTc kernel (the default where it applies) and the host routing choose the same
    experts on the same logits, and the logits agree; V2: the fused routing is refused when asked for."""
    name, path, _, _ = family
    if name != "v3":
        with pytest.raises(ValueError, match="fused_routing"):
            DeepSeekEngine(path, fused_routing=True)
        with DeepSeekEngine(path, max_batch=2) as engine:
            assert not engine.fused_routing_used
        return
    ps = prompts((7, 33), VOCAB, seed=3)
    results = {}
    for fused in (True, False):
        with DeepSeekEngine(path, max_batch=4, fused_routing=fused) as engine:
            assert engine.fused_routing_used is fused
            seen = record_routing(engine)
            logits = engine.prefill_logits(ps)
        results[fused] = (logits, [np.concatenate(calls) for calls in seen.values()])
    (lf, rf), (lh, rh) = results[True], results[False]
    for layer, (a, b) in enumerate(zip(rf, rh, strict=True)):
        assert [sorted(x) for x in a.tolist()] == [sorted(x) for x in b.tolist()], f"MoE layer {layer}"
    err = max(float(np.abs(a - b).max()) for a, b in zip(lf, lh, strict=True))
    print(f"v3 fused vs host routing: same experts, max |logit difference| {err:.5f}")
    assert err <= 1e-2


@pytest.mark.parametrize("fused", [None, False], ids=["default_routing", "device_fallback"])
def test_cuda_graph_decode_matches_eager(family, fused) -> None:  # type: ignore[no-untyped-def]
    """The decode step as a CUDA graph (MLA plan before each replay, MoE routed on the device: V3 by the fused kernel
    by default, V2-Lite and V3 with fused_routing=False by DeviceGroupedTopk): the greedy tokens equal eager decode's
    (3 prompts in 4 slots, one finishing early, so padding rows run) up to a first difference that is a near tie of
    the float32 reference (its logits of the two tokens within TOL: the graph's GEMMs are the launches its step was
    timed fastest with, eager's the GEMV or cuBLASLt, and their roundings differ), and where every token is equal the
    last step's logits agree within TOL."""
    name, path, ref, _ = family
    if name != "v3" and fused is False:
        pytest.skip("V2 routes with the device fallback in either case")
    ps = prompts((5, 21, 40), VOCAB, seed=4)
    limits = [MAX_NEW, 5, MAX_NEW]
    runs = {}
    for graph in (False, True):
        with DeepSeekEngine(path, max_batch=4, page_size=16, cuda_graph=graph, fused_routing=fused) as engine:
            assert (engine.runner.graph is not None) is graph
            if graph:
                assert engine.runner.static_moe and (engine.family.device_topk is None) is engine.fused_routing_used
            r = engine.generate(ps, limits, eos_token_ids=())
            # the last step: eager ran the two active requests (slots 0, 2), the graph all 4 slots
            rows = [0, 2] if graph else [0, 1]
            logits = engine.runner.buffers.logits[: max(rows) + 1].get()[rows]
            again = engine.generate(ps[:1], 4, eos_token_ids=()).tokens[0]  # the graph replays on a later call too
        runs[graph] = (r, logits, again)
    (er, el, ea), (gr, gl, ga) = runs[False], runs[True]
    assert [len(t) for t in gr.tokens] == limits
    check_eager_matches_graph(ref, ps, er.tokens, gr.tokens, TOL, f"{name}: ")
    check_eager_matches_graph(ref, ps[:1], [ea], [ga], TOL, f"{name}, a later call: ")
    same = gr.tokens == er.tokens
    err = float(np.abs(gl - el).max()) if same else 0.0  # (after a near tie the rows' last inputs differ)
    print(
        f"{name} graph ({'fused' if fused is None and name == 'v3' else 'device'} routing): tokens "
        f"{'equal to eager' if same else 'equal to eager up to a near tie'}; "
        f"last-step max |logit difference| {err:.4f}; eager {er.tokens_per_s:.0f} tokens/s, graph "
        f"{gr.tokens_per_s:.0f} tokens/s, host us/step {er.host_us_per_step:.0f} -> {gr.host_us_per_step:.0f}"
    )
    assert err <= TOL


def test_batched_linear_matches_numpy() -> None:
    """The per-head strided batched GEMM the absorption uses, on its own (float32 result, bfloat16 inputs)."""
    from fi_engine.kernels.dense import CUDA_R_16BF, CUDA_R_32F, Dense

    rng = np.random.default_rng(0)
    heads, rows, k, n, stride = 3, 5, 32, 48, 40  # x: head h's k columns start at h * stride of a [rows, 3*40] row
    x = rng.normal(size=(rows, heads * stride)).astype(np.float32)
    w = rng.normal(size=(heads, n, k)).astype(np.float32)

    def bf16(a):  # type: ignore[no-untyped-def]
        return cp.asarray((a.view(np.uint32) >> 16).astype(np.uint16))

    xb, wb = bf16(x), bf16(w)
    xr = ((x.view(np.uint32) >> 16) << 16).view(np.float32)
    wr = ((w.view(np.uint32) >> 16) << 16).view(np.float32)
    y = cp.zeros((rows, heads * n), cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    dense = Dense(stream)
    try:
        with stream:
            dense.batched_linear(heads, rows, xb.data.ptr, heads * stride, stride, wb.data.ptr, n, k, n * k,
                                 y.data.ptr, heads * n, n, CUDA_R_16BF, CUDA_R_32F)  # fmt: skip
        stream.synchronize()
    finally:
        dense.close()
    want = np.concatenate([xr[:, h * stride : h * stride + k] @ wr[h].T for h in range(heads)], axis=1)
    np.testing.assert_allclose(cp.asnumpy(y), want, rtol=1e-4, atol=1e-3)


def test_a_model_without_routed_experts_opens_and_closes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``n_routed_experts: null`` (every layer dense, no MoE workspace made): the engine serves it, eager and as a
    graph, and close() frees what exists (it once looked for the missing MoE workspace: AttributeError)."""
    import json

    if not hasattr(transformers, "DeepseekV3Config"):
        pytest.skip("this transformers has no DeepseekV3Config")
    torch.manual_seed(0)
    extra = {**FAMILIES["v3"][2], "first_k_dense_replace": COMMON["num_hidden_layers"]}  # no MoE layer in transformers
    model = transformers.DeepseekV3ForCausalLM(_config(transformers.DeepseekV3Config, extra, None)).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["n_routed_experts"] = None
    (tmp_path / "config.json").write_text(json.dumps(conf))
    tokens = {}
    for graph in (False, True):
        engine = DeepSeekEngine(tmp_path, max_batch=2, page_size=16, cuda_graph=graph)
        assert (
            engine.deepseek_config.moe is None
            and engine.runner.moe_workspace is None
            and engine.runner.moe_layers == [None] * 3
        )
        tokens[graph] = engine.generate([[5, 6, 7]], 4, eos_token_ids=()).tokens[0]
        engine.close()
        engine.close()  # idempotent
        with pytest.raises(ValueError, match="engine: closed"):
            engine.generate([[5]], 1)
    assert len(tokens[False]) == 4 and tokens[True] == tokens[False]

"""The FP8 (e4m3) KV cache on a GPU (FI_FFI_RUN_GPU_TESTS=1, SM 9.0, the FP8 test wheel staged beside the core one).

Ops: bf16 queries over an e4m3 paged cache (FA2 decode, FA2 paged and ragged prefill) and FA3 prefill with e4m3
q/k/v and scales, each against a float32 reference on the dequantized values; the engine's quantizing append against
torch's e4m3 cast (bit for bit).

Engine: a random Llama-shaped bf16 checkpoint with head_dim 128 (transformers' own classes, 2 layers, hidden 1024,
8 query / 2 KV heads... see ``build``), served with ``kv_cache_dtype="fp8_e4m3"`` against the same engine with the
bf16 cache. The bound, derived: e4m3 keeps 3 mantissa bits, so each stored K/V element is off by at most 2^-4 of
its value (round to nearest), against 2^-8 for the bf16 cache: the K/V roundings grow 16-fold while every other
rounding (weights, activations, bf16 outputs) stays. If the errors add, the FP8 engine's error against the float32
reference is at most 16 times the bf16 engine's: asserted on the mean |logit error| over every position of every
prompt, and on the maximum against 16 x the bf16 family bound (LOGIT_TOL, 0.08). Greedy tokens (eager and graph),
teacher-forced against the float32 reference: every token the reference's argmax or within that maximum bound of
its best logit, and at least 75 % exactly its argmax (the bf16 engine gets ~100 %; random logits here have a
standard deviation of ~0.6, so the top two of 32000 are often closer than the FP8 error).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.gpu import engine_against_transformers

cp, torch, transformers = engine_against_transformers()

from helpers.attention_reference import reference  # noqa: E402
from helpers.checkpoints import TOKENS, float32_reference, rope_kwargs, save_random  # noqa: E402
from helpers.paged_kv import PagedKV, indptr  # noqa: E402
from helpers.yardstick import LOGIT_TOL, check_eager_matches_graph, check_greedy, prompts  # noqa: E402

from fi_ffi.ops.attention import decode, prefill  # noqa: E402
from fi_ffi.ops.attention.workspace import Workspace  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fp8_modules")]

E4M3 = torch.float8_e4m3fn
GROWTH = 16  # 2^-4 / 2^-8: e4m3's rounding of K/V against bf16's
FP8_MAX = GROWTH * LOGIT_TOL["bfloat16"]


@pytest.fixture(scope="module")
def ws():
    w = Workspace.allocate(0)
    yield w
    w.close()


def _bf16_bound(want):
    """bf16 output rounding (2^-8 relative, with a floor for values near 0)."""
    return 2**-8 * want.abs() + 2e-3


def _assert_within(got, want, bound, what):
    err = (got.float() - want).abs()
    worst = float((err - bound).max())
    assert worst <= 0, f"{what}: max error {float(err.max()):.4g}, beyond the bound by {worst:.4g}"


# ------------------------------------------------------------------------------------------ the ops


def test_decode_bf16_q_over_an_e4m3_cache(ws):
    """Exact inputs (the cache holds e4m3 values, the reference reads the same ones): only the kernel's float32
    accumulation and the bf16 output rounding differ."""
    hq, hk, d, page = 32, 8, 128, 16
    lens = [3, 64, 200]
    k = torch.randn(sum(lens), hk, d, device="cuda").to(E4M3)
    v = torch.randn(sum(lens), hk, d, device="cuda").to(E4M3)
    kv = PagedKV(k.float(), v.float(), lens, page, "NHD")
    kc, vc = kv.k.to(E4M3), kv.v.to(E4M3)
    q = torch.randn(len(lens), hq, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    sm = d**-0.5 * 0.5  # a k_scale of 0.5 folded in, as the engine does
    plan = decode.batch_decode_plan(
        kv.indptr_h, None, kv.last_h, hq, hk, d, page, q_data_type="bfloat16", kv_data_type="float8_e4m3fn",
        sm_scale=sm, workspace=ws,
    )  # fmt: skip
    assert "dtype_q_bf16_dtype_kv_e4m3" in plan.uri
    decode.batch_decode_run(
        q, (kc, vc), kv_indptr=kv.indptr, kv_indices=kv.indices, kv_last_page_len=kv.last, out=out, plan=plan
    )
    torch.cuda.synchronize()
    start = 0
    for i, n in enumerate(lens):
        o, _ = reference(q[i : i + 1], k[start : start + n], v[start : start + n], sm_scale=sm)
        _assert_within(out[i : i + 1], o, _bf16_bound(o) + 2e-3, f"request {i}")
        start += n


@pytest.mark.parametrize("mode", ["paged", "ragged"])
def test_fa2_prefill_bf16_q_over_e4m3_kv(ws, mode):
    hq, hk, d, page = 16, 4, 128, 16
    qo, kvl = [1, 7, 33, 64], [1, 20, 33, 100]
    k = torch.randn(sum(kvl), hk, d, device="cuda").to(E4M3)
    v = torch.randn(sum(kvl), hk, d, device="cuda").to(E4M3)
    q = torch.randn(sum(qo), hq, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    qo_h, kv_h = indptr(qo), indptr(kvl)
    qo_d = torch.from_numpy(qo_h).cuda()
    common = dict(causal=True, q_data_type="bfloat16", kv_data_type="float8_e4m3fn", workspace=ws)
    if mode == "ragged":
        plan = prefill.batch_prefill_ragged_plan(qo_h, kv_h, hq, hk, d, **common)
        prefill.batch_prefill_ragged_run(
            q, k, v, qo_indptr=qo_d, kv_indptr=torch.from_numpy(kv_h).cuda(), out=out, plan=plan
        )
    else:
        kv = PagedKV(k.float(), v.float(), kvl, page, "NHD")
        plan = prefill.batch_prefill_paged_plan(qo_h, kv.indptr_h, None, kv.last_h, hq, hk, d, page, **common)
        prefill.batch_prefill_paged_run(
            q, (kv.k.to(E4M3), kv.v.to(E4M3)), qo_indptr=qo_d, kv_indptr=kv.indptr, kv_indices=kv.indices,
            kv_last_page_len=kv.last, out=out, plan=plan,
        )  # fmt: skip
    assert plan.backend == "fa2" and "dtype_q_bf16_dtype_kv_e4m3" in plan.uri
    torch.cuda.synchronize()
    for i in range(len(qo)):
        rows, keys = slice(qo_h[i], qo_h[i + 1]), slice(kv_h[i], kv_h[i + 1])
        o, _ = reference(q[rows], k[keys], v[keys], causal=True)
        _assert_within(out[rows], o, _bf16_bound(o) + 2e-3, f"request {i}")


def test_fa3_fp8_prefill_with_scales(ws):
    """e4m3 q, k, v with per-tensor scales (the kernel: logits x scale_q * scale_k * sm_scale, output x scale_v).
    The kernel also rounds the softmax probabilities P to e4m3 before P V: 2^-4 of each, so the bound per output
    element is 2^-4 * sum_j p_j |v_j| * scale_v (the reference attention of |v|) plus bf16's rounding."""
    hq, hk, d = 16, 4, 128
    qo, kvl = [7, 64, 130], [20, 64, 300]
    sq, sk, sv = 0.5, 2.0, 0.25
    q8 = torch.randn(sum(qo), hq, d, device="cuda").to(E4M3)
    k8 = torch.randn(sum(kvl), hk, d, device="cuda").to(E4M3)
    v8 = torch.randn(sum(kvl), hk, d, device="cuda").to(E4M3)
    out = torch.empty(sum(qo), hq, d, dtype=torch.bfloat16, device="cuda")
    qo_h, kv_h = indptr(qo), indptr(kvl)
    plan = prefill.batch_prefill_ragged_plan(
        qo_h, kv_h, hq, hk, d, causal=True, q_data_type="float8_e4m3fn", o_data_type="bfloat16", backend="fa3",
        workspace=ws,
    )  # fmt: skip
    assert plan.backend == "fa3" and "dtype_q_e4m3" in plan.uri
    prefill.batch_prefill_ragged_run(
        q8, k8, v8, qo_indptr=torch.from_numpy(qo_h).cuda(), kv_indptr=torch.from_numpy(kv_h).cuda(), out=out,
        plan=plan, q_scale=sq, k_scale=sk, v_scale=sv,
    )  # fmt: skip
    torch.cuda.synchronize()
    for i in range(len(qo)):
        rows, keys = slice(qo_h[i], qo_h[i + 1]), slice(kv_h[i], kv_h[i + 1])
        qf, kf, vf = q8[rows].float() * sq, k8[keys].float() * sk, v8[keys].float() * sv
        o, _ = reference(qf, kf, vf, causal=True)
        o_abs, _ = reference(qf, kf, vf.abs(), causal=True)
        _assert_within(out[rows], o, 2**-4 * o_abs + _bf16_bound(o), f"request {i}")


# ------------------------------------------------------------------------------------------ the engine

VOCAB = 32000
PROMPT_LENS = (3, 16, 29, 50)
MAX_NEW = (33, 20, 33, 9)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-fp8kv")
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        rms_norm_eps=1e-5,
        **TOKENS,
    )
    kw.update(rope_kwargs(transformers.LlamaConfig, 500000.0, None))
    model = save_random(path, "LlamaConfig", "LlamaForCausalLM", "bfloat16", kw)
    assert json.loads((path / "config.json").read_text())["head_dim"] == 128
    ref = float32_reference(model)
    yield path, ref
    del ref
    torch.cuda.empty_cache()


def _reference_logits(ref, ps):
    with torch.no_grad():
        return [ref(input_ids=torch.tensor([p], device="cuda")).logits[0].float().cpu().numpy() for p in ps]


def test_fp8_cache_takes_half_the_bytes(checkpoint):
    from fi_engine.models.llama import LlamaEngine

    path, _ = checkpoint
    with LlamaEngine(path, max_batch=4, kv_cache_dtype="fp8_e4m3") as fp8, LlamaEngine(path, max_batch=4) as bf16:
        assert fp8.runner.buffers.kv.nbytes * 2 == bf16.runner.buffers.kv.nbytes
        assert fp8.runner.kv_dtype == "float8_e4m3fn" and fp8.runner.k_cache[0].dtype.name == "float8_e4m3fn"
        assert (fp8.runner.kv_fp8.k_scale, fp8.runner.kv_fp8.v_scale) == (1.0, 1.0)  # no scales in the checkpoint


@pytest.mark.parametrize("scales", [None, (2.0, 4.0)], ids=["scale-1", "scales-2-4"])
def test_prefill_logits_within_the_fp8_bound(checkpoint, scales):
    """The bf16 engine's and the FP8 engine's prefill logits against float32 (see the module docstring)."""
    from fi_engine.models.llama import LlamaEngine

    path, ref = checkpoint
    ps = prompts(PROMPT_LENS, VOCAB)
    want = _reference_logits(ref, ps)
    with LlamaEngine(path, max_batch=4) as engine:
        bf16 = engine.prefill_logits(ps)
    with LlamaEngine(path, max_batch=4, kv_cache_dtype="fp8_e4m3", kv_cache_scales=scales) as engine:
        fp8 = engine.prefill_logits(ps)
    e16 = np.concatenate([np.abs(a - b).ravel() for a, b in zip(bf16, want, strict=True)])
    e8 = np.concatenate([np.abs(a - b).ravel() for a, b in zip(fp8, want, strict=True)])
    print(f"mean |error|: bf16 cache {e16.mean():.4g}, fp8 cache {e8.mean():.4g}; max {e16.max():.4g} / {e8.max():.4g}")
    assert e16.max() <= LOGIT_TOL["bfloat16"]
    assert e8.mean() <= GROWTH * e16.mean()
    assert e8.max() <= FP8_MAX
    assert max(float(np.abs(a - b).max()) for a, b in zip(fp8, bf16, strict=True)) > 0  # the FP8 cache is read


def test_greedy_decode_eager_and_graph_with_an_fp8_cache(checkpoint):
    from fi_engine.models.llama import LlamaEngine

    path, ref = checkpoint
    ps = prompts(PROMPT_LENS, VOCAB)
    results = {}
    for graph in (False, True):
        with LlamaEngine(path, max_batch=8, page_size=16, cuda_graph=graph, kv_cache_dtype="fp8_e4m3") as engine:
            results[graph] = r = engine.generate(ps, list(MAX_NEW), eos_token_ids=())
        assert [len(t) for t in r.tokens] == list(MAX_NEW)
        exact = check_greedy(ref, ps, r.tokens, FP8_MAX)
        print(f"{'graph' if graph else 'eager'}: {exact}/{sum(MAX_NEW)} tokens equal to the reference's argmax")
        assert exact >= 0.75 * sum(MAX_NEW)
    check_eager_matches_graph(ref, ps, results[False].tokens, results[True].tokens, FP8_MAX)


def test_fused_and_separate_decode_launches_agree(checkpoint):
    """The fused eager step (RoPE and the quantizing append as launches of their own) against the separate launches:
    the same tokens (both quantize the same bf16 K/V with the same kernel)."""
    from fi_engine.models.llama import LlamaEngine

    path, _ = checkpoint
    ps = prompts((5, 12), VOCAB)
    tokens = {}
    for fused in (True, False):
        with LlamaEngine(path, max_batch=2, kv_cache_dtype="fp8_e4m3", kv_cache_scales=(1.0, 0.5)) as engine:
            engine.fused_decode = fused
            tokens[fused] = engine.generate(ps, [12, 12], eos_token_ids=()).tokens
    assert tokens[True] == tokens[False]


def test_quantizing_append_equals_torchs_e4m3_cast(checkpoint):
    """The engine's append kernel (one eager prefill step) stores exactly ``(k / k_scale).to(e4m3)``: the cache
    bytes of the prompt's tokens against torch's cast of the bf16 K the bf16 engine stored."""
    from fi_engine.models.llama import LlamaEngine

    path, _ = checkpoint
    ps = prompts((40,), VOCAB)
    with LlamaEngine(path, max_batch=1) as engine:
        engine.prefill_logits(ps)
        k16 = torch.as_tensor(engine.runner.buffers.kv.view(np.uint16), device="cuda").view(torch.bfloat16).clone()
    with LlamaEngine(path, max_batch=1, kv_cache_dtype="fp8_e4m3", kv_cache_scales=(0.5, 2.0)) as engine:
        engine.prefill_logits(ps)
        k8 = torch.as_tensor(engine.runner.buffers.kv, device="cuda").clone()
    # layer 0 only (its K/V come from the same bf16 computation in both engines; layer 1's input already differs);
    # both engines put the one request on the same pages (after the padding page 0), 16 tokens each
    pages = slice(1, 1 + -(-40 // 16))
    n = 40 * k16.shape[-2] * k16.shape[-1]  # the prompt's tokens; the last page's tail stays zero in both
    for which, scale in ((0, 0.5), (1, 2.0)):
        want = (k16[0, which, pages].float() / scale).to(E4M3).view(torch.uint8).reshape(-1)
        got = k8[0, which, pages].reshape(-1)
        assert torch.equal(got[:n], want[:n]), f"{'kv'[which]} cache bytes differ"

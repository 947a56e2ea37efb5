"""Decode attention on FlashInfer's FA2 paged-prefill kernel (``ModelRunner.tensor_core_decode_rows`` and
``tensor_core_decode_context``, ``Llama.plan_decode``) in the engine's decode graphs, on a GPU
(FI_FFI_RUN_GPU_TESTS=1; torch and transformers for the reference).

A random Llama of 16 query and 4 KV heads (transformers' own classes, as tests/engine/test_gpu_llama.py builds it)
greedily decodes eight prompts (4 to 70 tokens, so contexts cross pages of 16 and differ in length) in CUDA graphs
with the settings at 2 rows and 68 tokens: the high slots' requests end first (6-12 new tokens, the low slots' 45-72),
so the steps replay the graphs of 8, 4 and 2 rows, which plan the prefill kernel, and at last the 1-row graph, captured
on both kernels, whose steps plan the decode kernel below 68 tokens of context and the prefill kernel from 68 (the
last request's contexts run from about 60 to 76). Checked:

- each step's plan kind is the one the settings name for its graph's rows and its longest context, and the one-row
  steps took both;
- after each step on the prefill kernel, its attention output (the last layer's, still in the step's ``attn``
  buffer) against a float32 reference computed on the host from the same step's query rows (still in ``qkv``), the
  last layer's paged cache and the step's page table: within helpers.attention_reference's tolerances (absolute and
  relative, bfloat16 3e-2, float16 5e-3: the kernel rounds probabilities to the input type before P.V); every row
  of the graph, padding rows (which attend to the padding page only) included;
- every greedy token against transformers run in float32 on the engine's own sequences (``check_greedy``: the
  reference's argmax or within ``LOGIT_TOL`` of its best logit, a near tie).

Two engines are not compared with each other: each times its GEMM launches at warm-up and may keep other ones, which
moves logits by more than the attention kernels' difference (0.09 in float16 between two engines on the decode kernel
alone, measured on an H200).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.gpu import engine_against_transformers

cp, torch, transformers = engine_against_transformers()

from helpers.attention_reference import TOL  # noqa: E402
from helpers.checkpoints import TOKENS, float32_reference, rope_kwargs, save_random  # noqa: E402
from helpers.yardstick import LOGIT_TOL, check_greedy, prompts  # noqa: E402

from fi_engine.models.llama import LlamaEngine  # noqa: E402
from fi_engine.runtime.worker.model_runner import ModelRunner  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 4096
PROMPT_LENGTHS = (4, 17, 33, 9, 70, 48, 25, 61)
NEW_TOKENS = (72, 58, 52, 45, 12, 10, 8, 6)  # slot i's request (admitted together, in order): high slots end first
FROM_ROWS = 2  # the setting: graphs of 2 rows and more take the prefill kernel, the 1-row graph chooses per step
FROM_CONTEXT = 68  # the 1-row graph's steps take the prefill kernel from this many tokens of context
VARIANTS = {"bf16-d128": ("bfloat16", 128), "f16-d64": ("float16", 64)}


def to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A host copy of an engine buffer (float16, or bfloat16 stored as uint16 bits) as float32."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, arrays: dict, rows: int, page: int) -> np.ndarray:
    """Float32 decode attention of ``q`` ``[rows, hq, d]`` over the paged cache ``k``/``v`` ``[pages, page, hk, d]``
    by the step's host page table ``arrays`` (kv_indptr, kv_indices, kv_last_page_len)."""
    indptr, indices, last = arrays["kv_indptr"], arrays["kv_indices"], arrays["kv_last_page_len"]
    hq, d = q.shape[1], q.shape[2]
    hk = k.shape[2]
    out = np.empty((rows, hq, d), np.float32)
    for r in range(rows):
        pages = indices[indptr[r] : indptr[r + 1]]
        length = (len(pages) - 1) * page + int(last[r])
        kr = k[pages].reshape(-1, hk, d)[:length].repeat(hq // hk, axis=1)  # [length, hq, d]
        vr = v[pages].reshape(-1, hk, d)[:length].repeat(hq // hk, axis=1)
        s = np.einsum("hd,lhd->hl", q[r], kr) / np.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[r] = np.einsum("hl,lhd->hd", p / p.sum(-1, keepdims=True), vr)
    return out


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request, tmp_path_factory):
    dtype, head_dim = VARIANTS[request.param]
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        **{**TOKENS, "tie_word_embeddings": False},
    )
    kw.update(rope_kwargs(transformers.LlamaConfig, 10000.0, None))
    path = tmp_path_factory.mktemp(request.param)
    model = save_random(path, "LlamaConfig", "LlamaForCausalLM", dtype, kw)
    yield path, float32_reference(model), dtype
    torch.cuda.empty_cache()


def test_prefill_kernel_decode_graphs_match_float32(variant, monkeypatch):
    path, ref, dtype = variant
    monkeypatch.setattr(ModelRunner, "tensor_core_decode_rows", FROM_ROWS)
    monkeypatch.setattr(ModelRunner, "tensor_core_decode_context", FROM_CONTEXT)
    ps = prompts(PROMPT_LENGTHS, VOCAB)
    seen: list[tuple[int, str, int]] = []  # each decode step's graph rows, plan kind and longest context
    worst = 0.0
    with LlamaEngine(path, max_batch=8, page_size=16, cuda_graph=True) as engine:
        runner = engine.runner
        c, last = runner.config, runner.config.num_layers - 1
        original = runner.run_decode

        def run_decode(rows):
            nonlocal worst
            out = original(rows)
            kind = runner.decode_plan.kind
            a = runner.decode_arrays
            pages = a["kv_indptr"][1 : rows + 1] - a["kv_indptr"][:rows]
            seen.append((rows, kind, int(((pages - 1) * runner.page_size + a["kv_last_page_len"][:rows]).max())))
            if kind == "batch_prefill":
                runner.stream.synchronize()  # the step is done; its host page table is still this step's
                b = runner.buffers
                w, hq, d = runner.qkv_width, c.num_qo_heads, c.head_dim
                q = to_float32(b.qkv[:rows].get(), dtype)[:, : hq * d].reshape(rows, hq, d)
                got = to_float32(b.attn[:rows].get(), dtype).reshape(rows, hq, d)
                assert w == (hq + 2 * c.num_kv_heads) * d
                arrays = runner.decode_arrays
                used = arrays["kv_indptr"][rows]
                pages = cp.asarray(arrays["kv_indices"][:used])  # the step's pages, in its page table's order
                kv = to_float32(b.kv[last][:, pages].get(), dtype)  # [2, used, page, hk, d]
                table = {**arrays, "kv_indices": np.arange(used)}
                want = attention_reference(q, kv[0], kv[1], table, rows, runner.page_size)
                err = np.abs(got - want)
                worst = max(worst, float(err.max()))
                bound = TOL[getattr(torch, dtype)] * (1 + np.abs(want))
                assert (err <= bound).all(), f"step {len(seen)} ({rows} rows): max |attention error| {err.max():.3g}"
            return out

        runner.run_decode = run_decode
        try:
            result = engine.generate(ps, list(NEW_TOKENS), eos_token_ids=())
        finally:
            del runner.run_decode
    assert [len(t) for t in result.tokens] == list(NEW_TOKENS)
    assert {rows for rows, _, _ in seen} == {8, 4, 2, 1}, seen  # every graph of the ladder replayed
    for rows, kind, context in seen:
        prefill = rows >= FROM_ROWS or context >= FROM_CONTEXT
        assert kind == ("batch_prefill" if prefill else "batch_decode"), (rows, kind, context)
    assert {kind for rows, kind, _ in seen if rows == 1} == {"batch_decode", "batch_prefill"}, seen
    exact = check_greedy(ref, ps, result.tokens, LOGIT_TOL[dtype])
    print(f"{dtype}: {len(seen)} steps, max |attention error| {worst:.2e}, {exact}/{sum(NEW_TOKENS)} exact tokens")


def test_a_model_of_three_query_heads_a_kv_head_keeps_the_decode_kernel(tmp_path, monkeypatch):
    from helpers.random_llama import save_random_llama

    monkeypatch.setattr(ModelRunner, "tensor_core_decode_rows", 1)
    path = save_random_llama(tmp_path, "float16", 64, (9, 3), 576, 1536, False)
    kinds = set()
    with LlamaEngine(path, max_batch=4, page_size=16, cuda_graph=True) as engine:
        runner = engine.runner
        original = runner.run_decode

        def run_decode(rows):
            out = original(rows)
            kinds.add(runner.decode_plan.kind)
            return out

        runner.run_decode = run_decode
        try:
            engine.generate([[5, 6, 7], [8, 9, 10, 11]], [6, 4], eos_token_ids=())
        finally:
            del runner.run_decode
    assert kinds == {"batch_decode"}

"""The Llama engine (fi_engine.models.llama) against transformers, on a GPU (FI_FFI_RUN_GPU_TESTS=1).

Each variant builds a small random Llama with transformers' own ``LlamaConfig`` / ``LlamaForCausalLM`` (2 layers,
hidden 1024, 16 query / 4 KV heads, vocab 32000), saves it with ``save_pretrained`` and loads it into the engine.
The reference is the same transformers model run in **float32** on the checkpoint's (rounded) weights, so all of
the difference is the engine's: float16/bfloat16 activations, FlashInfer kernels, cuBLAS.

Tolerances (logits have a standard deviation of about 0.6 here): max |engine - reference| over every position of
every prompt <= 0.02 for float16, 0.08 for bfloat16 (8-bit mantissa). Greedy tokens are checked token by token with
the reference run on the engine's own sequence (teacher forcing): each token must be the reference's argmax or
within the same tolerance of the reference's best logit (a near tie the engine's rounding may break either way).
Eager and CUDA-graph tokens must agree up to the first such near tie.

The RoPE variant sets ``original_max_position_embeddings`` to 64 so that Llama 3.1 scaling changes the rotation of
most frequencies at the short positions used here (with 8192 it would be invisible below ~1000 tokens).

Staging on the GPU machine: transformers and its pure-Python dependencies (``../shared/gpu/stage.sh transformers
huggingface-hub tokenizers safetensors regex pyyaml requests ...``); torch and CuPy are there already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers.gpu import engine_against_transformers

cp, torch, transformers = engine_against_transformers()

from helpers.checkpoints import TOKENS, float32_reference, rope_kwargs, save_random  # noqa: E402
from helpers.hf_configs import LLAMA31_ROPE  # noqa: E402
from helpers.no_torch import TORCH_SPY  # noqa: E402
from helpers.yardstick import LOGIT_TOL, check_eager_matches_graph, check_greedy, prompts, reference_logits  # noqa: E402

from fi_engine.checkpoint.config import RopeConfig  # noqa: E402
from fi_engine.kernels import flashinfer as kernels  # noqa: E402
from fi_engine.kernels.dense import CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F, Dense  # noqa: E402
from fi_engine.models.llama import LlamaEngine  # noqa: E402
from fi_engine.runtime.worker.model_runner import ModelRunner  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 32000
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "f16-d64-llama31-tied": ("float16", 64, True, True),
    "f16-d128-plain-untied": ("float16", 128, False, False),
    "bf16-d128-llama31-untied": ("bfloat16", 128, True, False),
}
PROMPT_LENS = (3, 16, 29, 50)  # uneven; 16 fills a page exactly; 50 spans 4 pages
MAX_NEW = (33, 20, 33, 9)  # 33 = the prefill's token + 32 decode steps; requests leave at different steps


def build(tmp_path, dtype: str, head_dim: int, llama31: bool, tied: bool):
    """Save a random Llama with transformers; return (directory, float32 reference model on the GPU)."""
    theta = 500000.0 if llama31 else 10000.0
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        **{**TOKENS, "tie_word_embeddings": tied},
    )
    kw.update(rope_kwargs(transformers.LlamaConfig, theta, dict(LLAMA3) if llama31 else None))
    model = save_random(tmp_path, "LlamaConfig", "LlamaForCausalLM", dtype, kw)  # random norm weights, seed 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.get("tie_word_embeddings", False) == tied
    return tmp_path, float32_reference(model)


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request, tmp_path_factory):
    dtype, head_dim, llama31, tied = VARIANTS[request.param]
    path, ref = build(tmp_path_factory.mktemp(request.param), dtype, head_dim, llama31, tied)
    yield path, ref, dtype
    del ref
    torch.cuda.empty_cache()


def test_prefill_logits_match_transformers(variant):
    path, ref, dtype = variant
    ps = prompts((1, 7, 16, 33, 50), VOCAB)  # 5 prompts, 4 slots: two prefill batches
    with LlamaEngine(path, max_batch=4, page_size=16) as engine:
        got = engine.prefill_logits(ps)
    for i, (p, g) in enumerate(zip(ps, got, strict=True)):
        want = reference_logits(ref, p)
        assert g.shape == want.shape == (len(p), 32000)
        err = float(np.abs(g - want).max())
        assert err <= LOGIT_TOL[dtype], (
            f"prompt {i} ({len(p)} tokens): max |logit error| {err:.4f} > {LOGIT_TOL[dtype]}"
        )


def test_prefill_graph_replays_match_the_eager_prefill(variant):
    """A prefill runs as the CUDA graph of its bucket (token rows padded up to 64 here) and batch size, captured at
    its first sight: its logits equal the eager pass's on every sight within the engine's tolerance (padded GEMMs
    may take other algorithms; tests/engine/test_gpu_prefill_buckets.py has the bucket cases), and the graphs are
    kept."""
    path, _, dtype = variant
    ps = prompts((1, 7, 16, 33, 50), VOCAB)  # two prefill batches of different shapes
    with LlamaEngine(path, max_batch=4, page_size=16) as engine:
        engine.prefill_graphs = False
        eager = engine.prefill_logits(ps)
        assert not engine.runner.step_graphs.prefill_cache
        engine.prefill_graphs = True
        runs = [engine.prefill_logits(ps) for _ in range(3)]  # captured + replayed, replayed, replayed
        assert [k[:2] for k in engine.runner.step_graphs.prefill_cache] == [
            (64, 4),
            (64, 1),
        ]  # 57 and 50 rows: bucket 64
    for n, got in enumerate(runs):
        for i, (g, e) in enumerate(zip(got, eager, strict=True)):
            err = float(np.abs(g - e).max())
            assert err <= LOGIT_TOL[dtype], f"run {n}, prompt {i}: graph vs eager max |logit difference| {err:.5f}"


def test_greedy_decode_eager_and_cuda_graph_match_transformers(variant):
    path, ref, dtype = variant
    ps = prompts(PROMPT_LENS, VOCAB)
    results = {}
    for graph in (False, True):
        with LlamaEngine(path, max_batch=8, page_size=16, cuda_graph=graph) as engine:  # 8 slots: padded rows
            results[graph] = r = engine.generate(ps, list(MAX_NEW), eos_token_ids=())
        assert [len(t) for t in r.tokens] == list(MAX_NEW)
        assert r.finish_reasons == ["length"] * 4
        assert r.decode_steps == max(MAX_NEW) - 1
        exact = check_greedy(ref, ps, r.tokens, LOGIT_TOL[dtype])
        print(
            f"{'graph' if graph else 'eager'}: {exact}/{sum(MAX_NEW)} tokens equal to the reference's argmax, "
            f"{r.tokens_per_s:.0f} tokens/s, host {r.host_us_per_step:.0f} us/step"
        )
    check_eager_matches_graph(ref, ps, results[False].tokens, results[True].tokens, LOGIT_TOL[dtype])


def test_decode_graphs_keep_the_launches_their_captured_step_replays_fastest(variant, monkeypatch):
    # (ModelRunner.tune_decode_graphs: the GEMM shapes whose launches timed alone came close, tried in the step)
    path, ref, dtype = variant
    ps = prompts(PROMPT_LENS, VOCAB)
    with LlamaEngine(path, max_batch=8, page_size=16, cuda_graph=True) as engine:
        graphs = engine.runner.step_graphs
        assert graphs.tuning, "no decode graph had GEMM launches close enough alone to try in the step"
        for rows, tuning in graphs.tuning.items():
            assert graphs.graphs[rows].captured and tuning.kept_ms <= tuning.start_ms, (rows, tuning)
            for shape in tuning.shapes:
                assert shape.shape[0] == rows and shape.tried, shape
                tried = dict(shape.tried)
                if shape.kept != shape.before:  # a launch tried in the step replaced the one timed alone
                    assert len(set(shape.kept)) == 1 and tried[shape.kept[0]] <= tuning.start_ms, shape
            print(f"{rows} rows: {tuning.start_ms:.3f} -> {tuning.kept_ms:.3f} ms, {len(tuning.shapes)} shapes tried")
        r = engine.generate(ps, list(MAX_NEW), eos_token_ids=())  # the kept graphs decode as the reference does
    check_greedy(ref, ps, r.tokens, LOGIT_TOL[dtype])
    monkeypatch.setattr(ModelRunner, "tune_decode_graphs", False)
    with LlamaEngine(path, max_batch=8, page_size=16, cuda_graph=True) as engine:
        assert engine.runner.step_graphs.tuning == {}


def test_eos_finishes_a_request_early_and_frees_its_slot(variant):
    path, ref, dtype = variant
    ps = prompts(PROMPT_LENS, VOCAB)
    with LlamaEngine(path, max_batch=4, page_size=16, cuda_graph=True) as engine:
        full = engine.generate(ps, 24, eos_token_ids=())
        eos = full.tokens[1][6]
        cut = engine.generate(ps, 24, eos_token_ids=[eos])
        again = engine.generate(ps, 24, eos_token_ids=())  # every page came back: the same run repeats exactly
    assert again.tokens == full.tokens
    # Until the first request stops, both runs see identical batches, so they agree exactly; after that the
    # decode schedule (and so the rounding) may change, and the reference judges the tokens.
    first = min(t.index(eos) + 1 for t in full.tokens if eos in t)
    for i, tokens in enumerate(cut.tokens):
        assert tokens[:first] == full.tokens[i][:first]
        assert eos not in tokens[:-1]
        assert cut.finish_reasons[i] == ("eos" if tokens[-1] == eos else "length")
        assert len(tokens) == 24 or tokens[-1] == eos
    stop = full.tokens[1].index(eos) + 1
    assert cut.tokens[1] == full.tokens[1][:stop] and cut.finish_reasons[1] == "eos" and stop <= 7
    check_greedy(ref, ps, cut.tokens, LOGIT_TOL[dtype])


def test_cli_generate_runs_without_torch(variant):
    """``fi-ffi generate`` end to end in a fresh interpreter that records any attempt to import torch."""
    path, _, _ = variant
    code = TORCH_SPY + textwrap.dedent(f"""
        from fi_ffi import cli
        rc = cli.main(["generate", "--model", {str(path)!r}, "--prompt-ids", "5,6,7", "--prompt-ids", "8,9",
                       "--max-new-tokens", "5", "--graph", "--eos-ids", "none"])
        assert rc == 0, rc
        assert "torch" not in sys.modules and not attempts, attempts
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("[0] ") and lines[1].startswith("[1] ") and "tokens/s" in lines[2]
    with LlamaEngine(path, max_batch=2, cuda_graph=True) as engine:
        r = engine.generate([[5, 6, 7], [8, 9]], 5, eos_token_ids=())
    assert lines[0] == f"[0] {','.join(map(str, r.tokens[0]))}  (length)"


# ---------------------------------------------------------------------------------------------- layer pieces


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture()
def dense():
    stream = cp.cuda.Stream(non_blocking=True)
    d = Dense(stream)
    with stream:
        yield d, stream
    d.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_linear_matches_float32(dense, dtype, rows):
    d, stream = dense
    rng = np.random.default_rng(rows)
    n, k = 384, 1024
    x32, w32 = rng.standard_normal((rows, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    if dtype == "float16":
        x, w, ab = x32.astype(np.float16), w32.astype(np.float16), CUDA_R_16F
        x32, w32 = x.astype(np.float32), w.astype(np.float32)
    else:
        x, w, ab = bf16_bits(x32), bf16_bits(w32), CUDA_R_16BF
        x32, w32 = from_bf16_bits(x), from_bf16_bits(w)
    xd, wd = cp.asarray(x), cp.asarray(w)
    y = cp.zeros((rows, n), np.float32)
    cp.cuda.Device().synchronize()
    d.linear(rows, xd.data.ptr, k, wd.data.ptr, n, k, y.data.ptr, n, ab, CUDA_R_32F)
    stream.synchronize()
    # float32 output of rounded inputs: only the accumulation order differs (|y| ~ 32)
    np.testing.assert_allclose(y.get(), x32 @ w32.T, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("accumulate", [False, True])
def test_linear_through_cublaslt_matches_gemm_ex(dense, accumulate):
    """The cached cuBLASLt path (the default) and cublasGemmEx compute the same product, y = x @ w.T or
    y += x @ w.T, for a decode row and a prefill block."""
    d, stream = dense
    assert d.lt  # cuBLASLt loads wherever cuBLAS does (libcublas links it)
    from fi_engine.kernels import cublas
    from fi_ffi import loader

    # one copy for the process: the engine's libcublas is the one fi_ffi's loader found (the gemm module's too)
    assert cublas.library_path() == loader.nvidia_library("cublas")
    rng = np.random.default_rng(3)
    n, k = 960, 576  # SmolLM2's fused QKV
    for rows in (1, 96):
        x, w = rng.standard_normal((rows, k)).astype(np.float16), rng.standard_normal((n, k)).astype(np.float16)
        y0 = rng.standard_normal((rows, n)).astype(np.float32)
        xd, wd = cp.asarray(x), cp.asarray(w)
        out = {}
        for lt in (True, False):
            y = cp.asarray(y0)
            cp.cuda.Device().synchronize()
            d.lt = lt
            d.linear(rows, xd.data.ptr, k, wd.data.ptr, n, k, y.data.ptr, n, CUDA_R_16F, CUDA_R_32F, accumulate)
            stream.synchronize()
            out[lt] = y.get()
        d.lt = True
        want = x.astype(np.float32) @ w.astype(np.float32).T + (y0 if accumulate else 0)
        np.testing.assert_allclose(out[True], want, atol=2e-3, rtol=1e-4)
        np.testing.assert_allclose(out[True], out[False], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("out32", [False, True], ids=["out16", "out32"])
def test_gemv_matches_float32_and_falls_back_to_cublas(dense, dtype, out32):
    """The small-row GEMV (rows <= GEMV_MAX_ROWS) gives the float32 product rounded once to the output type; where
    it does not apply (more rows, a misaligned x, y += x w^T) cuBLAS computes the same product."""
    d, stream = dense
    assert d.gemv, d.gemv_error  # the kernel compiles and the driver loads on every GPU the suite runs on
    rng = np.random.default_rng(11)
    n, k = 1001, 576  # n: a last block with idle warps
    x32, w32 = rng.standard_normal((6, k + 8)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    if dtype == "float16":
        x, w, ab, ulp = x32.astype(np.float16), w32.astype(np.float16), CUDA_R_16F, 2.0**-10
        x32, w32 = x.astype(np.float32), w.astype(np.float32)
    else:
        x, w, ab, ulp = bf16_bits(x32), bf16_bits(w32), CUDA_R_16BF, 2.0**-7
        x32, w32 = from_bf16_bits(x), from_bf16_bits(w)
    xd, wd = cp.asarray(x), cp.asarray(w)
    item = 2
    cases = [(rows, 0) for rows in (1, 2, 3, 4, 5)] + [(2, 1)]  # (rows, x offset in elements: 1 = misaligned)
    for rows, off in cases:
        y = cp.zeros((rows, n), np.float32 if out32 else np.uint16)
        cp.cuda.Device().synchronize()
        d.linear(
            rows, xd.data.ptr + item * off, k + 8, wd.data.ptr, n, k, y.data.ptr, n, ab,
            CUDA_R_32F if out32 else ab,
        )  # fmt: skip
        stream.synchronize()
        want = x32[:rows, off : off + k] @ w32.T
        got = y.get()
        if not out32:
            got = got.view(np.float16).astype(np.float32) if dtype == "float16" else from_bf16_bits(got)
            np.testing.assert_allclose(got, want, rtol=ulp, atol=1e-2, err_msg=f"rows {rows}, offset {off}")
        else:
            np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4, err_msg=f"rows {rows}, offset {off}")


def test_closed_dense_refuses_small_and_large_gemms():
    """close() turns the GEMV and cuBLASLt off with the handles: a GEMM of any row count afterwards raises
    fi_ffi's CublasError (no kernel launches on a closed Dense), ``lt = True`` cannot bring back the destroyed
    cuBLASLt handle, and a second close() is a no-op."""
    from fi_ffi.errors import CublasError, FiFFIError

    stream = cp.cuda.Stream(non_blocking=True)
    d = Dense(stream)
    x, w, y = cp.zeros((8, 64), np.float16), cp.zeros((32, 64), np.float16), cp.zeros((8, 32), np.float16)
    cp.cuda.Device().synchronize()
    d.close()
    d.close()
    assert not d.gemv and not d.lt
    d.lt = True
    assert not d.lt
    with stream:
        for rows in (1, 8):  # the GEMV's rows, then cuBLAS's
            with pytest.raises(
                CublasError, match=r"^cublas\w+ failed: CUBLAS_STATUS_NOT_INITIALIZED \(1\)\. The handle"
            ) as info:
                d.linear(rows, x.data.ptr, 64, w.data.ptr, 32, 64, y.data.ptr, 32, CUDA_R_16F, CUDA_R_16F)
            assert isinstance(info.value, FiFFIError) and info.value.status == 1


def test_linear_is_captured_in_a_cuda_graph(dense):
    """The GEMM can be captured (CuPy's cuBLAS wrappers refused: "calling cuBLAS API during stream capture is
    currently unsupported") and a replay computes from the buffers' contents at replay time."""
    from fi_engine.kernels.graph import CudaGraph

    d, stream = dense
    rng = np.random.default_rng(1)
    rows, n, k = 8, 256, 512
    x_host = rng.standard_normal((rows, k)).astype(np.float16)
    w_host = rng.standard_normal((n, k)).astype(np.float16)
    x, w, y = cp.asarray(x_host), cp.asarray(w_host), cp.zeros((rows, n), np.float32)
    cp.cuda.Device().synchronize()
    args = (rows, x.data.ptr, k, w.data.ptr, n, k, y.data.ptr, n, CUDA_R_16F, CUDA_R_32F)
    d.linear(*args)  # warm-up outside capture, as the engine does
    stream.synchronize()
    graph = CudaGraph(stream.ptr)
    with graph.capture():
        d.linear(*args)
    try:
        x_new = rng.standard_normal((rows, k)).astype(np.float16)
        x.set(x_new)  # on the current stream (the fixture's), before the replay
        y.fill(0)
        graph.launch()
        stream.synchronize()
        np.testing.assert_allclose(
            y.get(), x_new.astype(np.float32) @ w_host.astype(np.float32).T, atol=2e-3, rtol=1e-4
        )
    finally:
        graph.close()


def test_gather_rows_and_argmax(dense):
    d, stream = dense
    rng = np.random.default_rng(0)
    table = cp.asarray(rng.integers(0, 1 << 16, size=(100, 48), dtype=np.uint16))
    index = cp.asarray(np.array([5, 0, 99, 5], np.int32))
    out = cp.zeros((4, 64), np.uint16)
    x = rng.standard_normal((6, 5000)).astype(np.float32)
    x[1, [17, 4000]] = 50.0  # a tie: the first index wins, as numpy (and torch) argmax
    x[2, :] = -np.inf
    xd, ids = cp.asarray(x), cp.full(6, -1, np.int32)
    cp.cuda.Device().synchronize()
    d.rows.gather_rows(4, table.data.ptr, 48, index.data.ptr, out.data.ptr, 64, 48)
    d.rows.argmax(6, xd.data.ptr, 5000, 5000, ids.data.ptr)
    stream.synchronize()
    assert np.array_equal(out.get()[:, :48], table.get()[[5, 0, 99, 5]])
    assert not out.get()[:, 48:].any()
    want = x.argmax(axis=1)
    want[2] = 0
    assert ids.get().tolist() == want.tolist()


@pytest.mark.parametrize("n", [128_259, 32_000, 1_000])
def test_argmax_over_a_vocabulary_row_and_a_wide_gather(dense, n):
    """The argmax's 8 loads in flight per thread (and the loop over what is left past them) give numpy's first
    index: ties placed in both loops and across them, NaNs that never win, a row whose largest value sits in the last
    few elements, a row of -inf (0); the gather over a row of several column blocks (4,100 elements: 17 blocks of
    256, the last one partial) copies each row exactly and writes nothing past it, called and prepared."""
    d, stream = dense
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, n)).astype(np.float32)
    x[0, [3, n // 2, n - 2]] = 60.0  # a three-way tie: the first wins
    x[1, n - 1] = 70.0  # the largest in the remainder (the row is not a multiple of the 8 x 1024 unrolled step)
    x[2, rng.integers(0, n, 50)] = np.nan  # NaN never wins
    x[2, 7] = 80.0
    x[3, :] = -np.inf
    x[4, [0, 1]] = 90.0  # a tie in one thread's first loads
    xd, ids = cp.asarray(x), cp.full(5, -1, np.int32)
    width, ld = 4_100, 4_104
    table = cp.asarray(rng.integers(0, 1 << 16, size=(64, width), dtype=np.uint16))
    index = cp.asarray(np.array([63, 0, 17], np.int32))
    out, prepared_out = cp.zeros((3, ld), np.uint16), cp.zeros((3, ld), np.uint16)
    cp.cuda.Device().synchronize()
    d.rows.argmax(5, xd.data.ptr, n, n, ids.data.ptr)
    d.rows.gather_rows(3, table.data.ptr, width, index.data.ptr, out.data.ptr, ld, width)
    d.rows.prepared_gather(3, table.data.ptr, width, index.data.ptr, prepared_out.data.ptr, ld, width)()
    stream.synchronize()
    want = np.where(np.isnan(x), -np.inf, x).argmax(axis=1)
    want[3] = 0
    assert ids.get().tolist() == want.tolist() == [3, n - 1, 7, 0, 0]
    for got in (out.get(), prepared_out.get()):
        assert np.array_equal(got[:, :width], table.get()[[63, 0, 17]])
        assert not got[:, width:].any()


def test_the_shard_gather_over_several_column_blocks(dense):
    """A vocabulary shard's gather (tensor parallelism's embedding, run here on one GPU: the kernel needs no peer)
    over rows of 4,100 elements (17 column blocks of 256): each id the shard holds, ``[lo, lo + n)``, copies its
    row exactly; an id outside gives a row of zeros; nothing is written past ``width``."""
    d, stream = dense
    rng = np.random.default_rng(2)
    width, ld, lo, n = 4_100, 4_104, 100, 64
    shard = cp.asarray(rng.integers(1, 1 << 16, size=(n, width), dtype=np.uint16))
    ids = np.array([100, 163, 99, 164, 130], np.int32)  # first, last, below, above, inside
    index = cp.asarray(ids)
    out = cp.full((len(ids), ld), 7, np.uint16)
    cp.cuda.Device().synchronize()
    d.shards.gather_rows_shard(len(ids), shard.data.ptr, width, index.data.ptr, out.data.ptr, ld, width, lo, n)
    stream.synchronize()
    got, table = out.get(), shard.get()
    for r, i in enumerate(ids):
        want = table[i - lo] if lo <= i < lo + n else np.zeros(width, np.uint16)
        assert np.array_equal(got[r, :width], want), f"row {r} (id {i})"
        assert (got[r, width:] == 7).all()


def hf_inv_freq(d: int, rope: RopeConfig) -> np.ndarray:
    """transformers' inverse frequencies (default and llama3 types), float64."""
    inv = 1.0 / rope.theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if not rope.llama3:
        return inv
    old, lo, hi, f = (rope.original_max_position_embeddings, rope.low_freq_factor, rope.high_freq_factor, rope.factor)
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled)


def rope_reference(x: np.ndarray, pos: np.ndarray, inv: np.ndarray) -> np.ndarray:
    ang = pos[:, None, None].astype(np.float64) * inv[None, None, :]
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].astype(np.float64), x[..., h:].astype(np.float64)
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


@pytest.mark.parametrize("llama3", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_rope_settings_match_transformers_formula(llama3, d):
    """The engine's mapping of config.json's rotary settings onto FlashInfer's RoPE ops, on the fused-QKV views
    the engine uses, at positions up to 20000 where Llama 3.1 scaling matters."""
    rope = LLAMA31_ROPE if llama3 else RopeConfig(theta=10000.0)
    rng = np.random.default_rng(d)
    n, hq, hk = 40, 4, 2
    pos = np.sort(rng.integers(0, 20000, size=n)).astype(np.int32)
    qkv = rng.standard_normal((n, (hq + 2 * hk) * d)).astype(np.float16)
    buf = cp.asarray(qkv)
    w = buf.shape[1]
    q = kernels.descriptor(buf.data.ptr, (n, hq, d), "float16", 0, (w, d, 1), owner=buf)
    k = kernels.descriptor(buf.data.ptr + 2 * hq * d, (n, hk, d), "float16", 0, (w, d, 1), owner=buf)
    p = cp.asarray(pos)
    kernels.rope_inplace(q, k, kernels.descriptor(p.data.ptr, (n,), "int32", 0, owner=p), rope, 0)
    cp.cuda.Device().synchronize()
    got = buf.get().astype(np.float64)
    inv = hf_inv_freq(d, rope)
    want_q = rope_reference(qkv[:, : hq * d].reshape(n, hq, d), pos, inv).reshape(n, -1)
    want_k = rope_reference(qkv[:, hq * d : (hq + hk) * d].reshape(n, hk, d), pos, inv).reshape(n, -1)
    np.testing.assert_allclose(got[:, : hq * d], want_q, atol=2e-2)
    np.testing.assert_allclose(got[:, hq * d : (hq + hk) * d], want_k, atol=2e-2)
    assert np.array_equal(got[:, (hq + hk) * d :], qkv[:, (hq + hk) * d :])  # v untouched
    if llama3:  # the test can tell the scaled rotation from the plain one
        plain = rope_reference(qkv[:, : hq * d].reshape(n, hq, d), pos, hf_inv_freq(d, RopeConfig(theta=5e5)))
        assert np.abs(plain.reshape(n, -1) - want_q).max() > 0.5


def test_top_k_top_p_sampling_draws_from_the_filtered_distribution_and_reproduces(variant):
    """Sampled generation (softmax, then the joint top-k/top-p kernel) through fi_ffi's sampling ops: every token is
    one of the reference's top-k tokens at that position, and the same seed reproduces the same tokens."""
    from fi_engine.models.llama import SamplingParams

    path, ref, _ = variant
    ps = prompts(PROMPT_LENS, VOCAB)
    sampling = SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=1234)
    with LlamaEngine(path, max_batch=4, page_size=16) as engine:
        first = engine.generate(ps, 8, eos_token_ids=(), sampling=sampling)
        again = engine.generate(ps, 8, eos_token_ids=(), sampling=sampling)
    assert first.tokens == again.tokens
    for prompt, tokens in zip(ps, first.tokens, strict=True):
        lg = reference_logits(ref, list(prompt) + tokens[:-1])
        for t, tok in enumerate(tokens):
            row = torch.as_tensor(lg[len(prompt) - 1 + t])
            top = torch.topk(row, 8).indices.tolist()  # the top 5, plus slack for f16/bf16 rounding near ties
            assert tok in top, (t, tok, top)

"""Bucketed prefill graphs of the Llama engine on a GPU (FI_FFI_RUN_GPU_TESTS=1): prompts of several lengths in
one bucket replay one CUDA graph captured at their first sight, and give the eager prefill's logits, KV cache and
greedy tokens; a capture that fails runs the same prefill eagerly.

The model is a random 2-layer Llama written with fi_ffi's own safetensors writer (no transformers needed); the
reference is the same engine with ``prefill_graphs = False`` (eager, unpadded, a plan without
``enable_cuda_graph``). The two differ only by rounding: GEMMs of other row counts may take other cuBLASLt
algorithms, and a CUDA-graph attention schedule splits the work differently. Tolerances, on logits of standard
deviation about 0.6 and K/V entries of about 1: max |graph - eager| <= 0.02 for float16, 0.08 for bfloat16 (the
engine's tolerance against transformers in tests/engine/test_gpu_llama.py, helpers.yardstick.LOGIT_TOL); greedy tokens
(12 decode steps) equal.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.yardstick import LOGIT_TOL, prompts  # noqa: E402

from fi_engine.checkpoint.safetensors import write_safetensors  # noqa: E402
from fi_engine.models.llama import LlamaEngine  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 1000
VARIANTS = {"f16-d64": ("float16", 64), "bf16-d128": ("bfloat16", 128)}
SAME_BUCKET = (33, 47, 64, 40)  # bucket 64 (33..64 rows): one graph; 64 fills it (an empty padding request)


def save_model(folder, dtype: str, head_dim: int):
    """A random 2-layer Llama (4 query / 2 KV heads, hidden 256) in ``folder``."""
    rng = np.random.default_rng(0)
    h, inter, hq, hk = 256, 512, 4, 2
    cfg = dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=hq, num_key_value_heads=hk, head_dim=head_dim, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0, eos_token_id=2, torch_dtype=dtype,
    )  # fmt: skip

    def w(*shape: int, scale: float = 0.05):
        a = rng.standard_normal(shape, dtype=np.float32) * scale
        if dtype == "float16":
            return a.astype(np.float16)
        return ((a.view(np.uint32) + 0x8000) >> 16).astype(np.uint16), "bfloat16"  # rounded to bfloat16 bits

    def ones():
        return np.ones(h, np.float16) if dtype == "float16" else (np.full(h, 0x3F80, np.uint16), "bfloat16")

    tensors = {
        "model.embed_tokens.weight": w(VOCAB, h, scale=1.0),
        "lm_head.weight": w(VOCAB, h, scale=0.04),
        "model.norm.weight": ones(),
    }
    for n in range(2):
        p = f"model.layers.{n}."
        for name, shape in (
            ("self_attn.q_proj", (hq * head_dim, h)),
            ("self_attn.k_proj", (hk * head_dim, h)),
            ("self_attn.v_proj", (hk * head_dim, h)),
            ("self_attn.o_proj", (h, hq * head_dim)),
            ("mlp.gate_proj", (inter, h)),
            ("mlp.up_proj", (inter, h)),
            ("mlp.down_proj", (h, inter)),
        ):
            tensors[p + name + ".weight"] = w(*shape)
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[p + name + ".weight"] = ones()
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def model(request, tmp_path_factory):
    dtype, head_dim = VARIANTS[request.param]
    return save_model(tmp_path_factory.mktemp(request.param), dtype, head_dim), dtype


def engine(path, max_batch: int, graphs: bool, cuda_graph: bool = False) -> LlamaEngine:
    e = LlamaEngine(path, max_batch=max_batch, page_size=16, max_seq_len=256, cuda_graph=cuda_graph)
    e.prefill_graphs = graphs
    return e


def max_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def kv_pages(e: LlamaEngine) -> np.ndarray:
    """The KV cache of every page but the padding page (float32, on the host)."""
    kv = e.runner.buffers.kv[:, :, 1:].get()
    return kv.astype(np.float32) if kv.dtype == np.float16 else (kv.astype(np.uint32) << 16).view(np.float32)


def test_lengths_in_one_bucket_replay_one_graph_with_the_eager_logits_and_kv(model):
    path, dtype = model
    ps = prompts(SAME_BUCKET, VOCAB)
    with engine(path, 1, graphs=False) as e:  # one prompt per prefill
        eager = e.prefill_logits(ps)
        eager_kv = kv_pages(e)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: it must not here
        with engine(path, 1, graphs=True) as g:  # a fresh engine: its first prefill is a capture
            got = g.prefill_logits(ps)
            got_kv = kv_pages(g)
            keys = list(g.runner.step_graphs.prefill_cache)
            failures = dict(g.prefill_graph_failures)
    assert failures == {}
    assert [k[:2] for k in keys] == [(64, 1)], keys  # one graph for the four lengths
    assert [x.shape for x in got] == [(n, VOCAB) for n in SAME_BUCKET]
    logit_err, kv_err = max_diff(got, eager), float(np.abs(got_kv - eager_kv).max())
    std = float(np.std(eager[0]))
    print(f"{dtype}: graph vs eager max |logit diff| {logit_err:.5f} (logit std {std:.2f}), |kv diff| {kv_err:.5f}")
    assert logit_err <= LOGIT_TOL[dtype], logit_err
    assert kv_err <= LOGIT_TOL[dtype], kv_err  # the padding rows wrote only to the padding page
    assert all(int(np.argmax(a[-1])) == int(np.argmax(b[-1])) for a, b in zip(got, eager, strict=True))


def test_batched_prefill_and_decode_after_a_graph_prefill_match_eager(model):
    """Batches in one bucket (32 rows: 3 + 20 + 9 fills it, 5 + 6 + 7 is padded by 14 rows) with the decode step
    as a CUDA graph too (its padding slots share the padding page with the prefill's padding request): the same
    greedy tokens as an eager prefill, for 12 decode steps."""
    path, dtype = model
    batches = [prompts((3, 20, 9), VOCAB, seed=2), prompts((5, 6, 7), VOCAB, seed=3)]
    out = {}
    for graphs in (False, True):
        with engine(path, 4, graphs=graphs, cuda_graph=True) as e:
            out[graphs] = [e.generate(b, 13, eos_token_ids=()).tokens for b in batches]
            logits = e.prefill_logits(batches[1])
            if graphs:
                assert [k[:2] for k in e.runner.step_graphs.prefill_cache] == [(32, 3)]
                assert not e.prefill_graph_failures
            else:
                assert not e.runner.step_graphs.prefill_cache
                eager_logits = logits
    print(f"{dtype}: batched greedy tokens {out[True]}")
    assert out[True] == out[False]
    assert max_diff(logits, eager_logits) <= LOGIT_TOL[dtype]


def test_a_failed_capture_runs_the_prefill_eagerly(model):
    """A synchronization inside the capture (illegal there) makes it fail: the prefill still gives the eager
    logits, warns, records why, and the engine (stream and CUDA error state) serves the next prefills."""
    path, dtype = model
    ps = prompts((20, 25), VOCAB, seed=4)
    with engine(path, 1, graphs=False) as e:
        eager = e.prefill_logits(ps)
    with engine(path, 1, graphs=True) as g:
        forward = g.runner.forward
        calls = [0]

        def sync_in_capture(v, rows, attention, static_moe=False):
            calls[0] += 1
            if calls[0] == 1:  # the first is the capture of bucket 32
                g.stream.synchronize()
            forward(v, rows, attention, static_moe)

        g.runner.forward = sync_in_capture
        failed = r"prefill graph of 32 token rows and 1 request slots failed \(capture: "
        with pytest.warns(RuntimeWarning, match=failed):
            first = g.prefill_logits(ps[:1])
        assert list(g.prefill_graph_failures) == [(32, 1)]
        print(f"recorded: {g.prefill_graph_failures[(32, 1)][:160]}")
        second = g.prefill_logits(ps[1:])  # the same shape: eager, unpadded, no new capture
        assert not g.runner.step_graphs.prefill_cache
        again = g.prefill_logits(prompts((40,), VOCAB, seed=5))  # another bucket still captures
        assert [k[:2] for k in g.runner.step_graphs.prefill_cache] == [(64, 1)] and again[0].shape == (40, VOCAB)
    assert max_diff(first + second, eager) <= LOGIT_TOL[dtype]


def test_warm_prefill_captures_ahead_and_serving_only_replays(model):
    path, dtype = model
    ps = [prompts((40,), VOCAB, seed=6), prompts((150,), VOCAB, seed=7)]
    with engine(path, 2, graphs=False) as e:
        eager = [e.generate(p, 6, eos_token_ids=()).tokens for p in ps]
    with engine(path, 2, graphs=True) as g:
        assert g.warm_prefill([64, 200]) == [(64, 1), (256, 1)]
        capture = g.runner.step_graphs._capture_prefill
        captures = []
        g.runner.step_graphs._capture_prefill = lambda *a: captures.append(a[1:]) or capture(*a)
        got = [g.generate(p, 6, eos_token_ids=()).tokens for p in ps]
        assert captures == [] and sorted(k[:2] for k in g.runner.step_graphs.prefill_cache) == [(64, 1), (256, 1)]
    print(f"{dtype}: after warm_prefill {got}")
    assert got == eager


def test_warm_serving_captures_every_pass_the_step_api_replays(model):
    """``warm_serving`` captures every bucket of at least ``max_batch`` rows at ``max_batch`` request slots; a
    served load on the step API (overlapped, mixed passes, arrivals while others decode and into an idle engine)
    then captures nothing. (Its tokens are held to the engine's own by teacher forcing in test_gpu_step_api: a
    mixed pass's riders may differ from generate's at a near tie.)"""
    path, dtype = model
    ps = prompts((40, 150, 9, 70, 33, 120), VOCAB, seed=8)
    with engine(path, 4, graphs=True, cuda_graph=True) as g:
        held = g.warm_serving()
        want = [(b, 4) for b in g.prefill_buckets if b >= 4]
        assert sorted(held) == want, held
        capture = g.runner.step_graphs._capture_prefill
        captures = []
        g.runner.step_graphs._capture_prefill = lambda *a: captures.append(a[1:]) or capture(*a)
        g.overlap_steps, g.mixed_prefill = True, True
        rids, got = {}, {}
        queue = list(enumerate(ps))
        for _ in range(2):  # two into the idle engine, the rest as slots come free: mixed passes
            i, p = queue.pop(0)
            rids[g.add_request(p, 8, eos_token_ids=())] = i
        while g.has_unfinished or queue:
            for o in g.step():
                got.setdefault(rids[o.rid], []).extend(o.token_ids)
                if o.finish_reason is not None and queue:
                    i, p = queue.pop(0)
                    rids[g.add_request(p, 8, eos_token_ids=())] = i
    print(f"{dtype}: warm_serving held {len(held)} graphs, captured {captures} while serving")
    assert captures == []
    assert sorted(got) == list(range(len(ps))) and all(len(t) == 8 for t in got.values())

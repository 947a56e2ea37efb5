"""The Llama engine serving AWQ and GPTQ int4 checkpoints, on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy only, no torch or
transformers).

A random float16 Llama (helpers.random_llama: 4 layers, hidden 512, 8 query / 2 KV heads of 64, MLP 1536, vocab 4096)
has its seven projections per layer quantized to int4 and written the way the publishers' tools write them
(helpers.int4_checkpoints): AWQ (GEMM packing, groups of 128, untied LM head), GPTQ v1 (symmetric, groups of 64, the
zeros stored minus one, tied head) and GPTQ v2 (asymmetric, groups of 128, untied head). Each is also written as a
float16 checkpoint of exactly the weights it dequantizes to (``(q - z) * s`` in float32, rounded once to float16: the
CPU suite, tests/engine/test_int4_weights.py, proves the reader computes the same bits).

- prefill logits (``prefill_logits``, 5 prompts of 1 to 50 tokens: 107 rows), eager and with CUDA graphs:
  **bit-equal** to the dequantized checkpoint's (the tolerance is zero: a single weight read differently would show).
  A prefill of more than 32 rows dequantizes each int4 weight on the GPU into the same float16 bits and runs the same
  GEMM over them;
- greedy decoding with the projections dequantized at load (``ModelRunner.int4_as_stored`` False; 4 rows, then 1
  row, eager and as the decode CUDA graph): the same tokens as the dequantized checkpoint, step for step;
- greedy decoding served as stored (the int4 GEMV, the default): each token the dequantized checkpoint's top choice
  at that position up to a near tie (the GEMV's sums are float32 over the exact weights, so its logits are not the
  float16 copy's bits); a short prefill (the GEMV too) within 2 % of its logits;
- the int4 model is not the original: its logits differ from the unquantized float16 model's (by the 4-bit rounding,
  printed), so the comparison above is not of two copies of one checkpoint.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.int4_checkpoints import write_16bit_copy, write_int4_copy  # noqa: E402
from helpers.launch_choices import pin_launch_choices  # noqa: E402
from helpers.random_llama import VOCAB, save_random_llama  # noqa: E402
from helpers.yardstick import prompts  # noqa: E402

from fi_engine.models.llama import LlamaEngine  # noqa: E402
from fi_engine.runtime.worker.model_runner import ModelRunner  # noqa: E402

pytestmark = pytest.mark.gpu

# name: (method, group_size, GPTQ symmetric with v1 zeros (else asymmetric gptq_v2), tied LM head)
VARIANTS = {
    "awq-g128": ("awq", 128, True, False),
    "gptq-v1-sym-g64": ("gptq", 64, True, True),
    "gptq-v2-asym-g128": ("gptq", 128, False, False),
}
PROMPTS = (1, 7, 16, 33, 50)


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoints(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    """(the int4 checkpoint, the float16 one of its dequantized weights, the unquantized float16 original)."""
    method, group_size, v1, tied = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    (root / "f16").mkdir()
    src = save_random_llama(root / "f16", "float16", 64, (8, 2), 512, 1536, False, tied=tied)
    dequantized = write_int4_copy(src, root / "int4", method, group_size, sym=v1, v1=v1)
    write_16bit_copy(src, root / "dequantized", dequantized)
    return root / "int4", root / "dequantized", src


def _prefill_logits(path, graph: bool) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    with LlamaEngine(path, max_batch=4, page_size=16, cuda_graph=graph) as engine:
        return engine.prefill_logits(prompts(PROMPTS, VOCAB))


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_prefill_logits_equal_the_dequantized_float16_checkpoints(checkpoints, graph: bool) -> None:  # type: ignore[no-untyped-def]
    int4, dequantized, original = checkpoints
    with LlamaEngine(int4, max_batch=4, page_size=16, cuda_graph=graph) as engine:
        cfg = engine.runner.model_config
        assert cfg.int4 is not None and engine.runner.dtype == "float16"
        got = engine.prefill_logits(prompts(PROMPTS, VOCAB))
    want = _prefill_logits(dequantized, graph)
    for n, g, w in zip(PROMPTS, got, want, strict=True):
        assert g.shape == w.shape == (n, VOCAB)
        diff = float(np.abs(g - w).max())
        assert np.array_equal(g, w), f"{cfg.int4.describe()}: a {n}-token prompt's logits differ by up to {diff}"
    off = max(float(np.abs(g - o).max()) for g, o in zip(got, _prefill_logits(original, graph), strict=True))
    print(f"{cfg.int4.describe()}: bit-equal to the dequantized copy; {off:.3f} off the unquantized model")
    assert off > 0.0


@pytest.fixture
def dequantize_at_load():  # type: ignore[no-untyped-def]
    """The engines made inside dequantize their int4 projections at load (``ModelRunner.int4_as_stored`` False)."""
    ModelRunner.int4_as_stored = False
    try:
        yield
    finally:
        ModelRunner.int4_as_stored = True


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_dequantized_at_load_greedy_decoding_gives_the_dequantized_checkpoints_tokens(
    checkpoints, graph: bool, dequantize_at_load
) -> None:  # type: ignore[no-untyped-def]
    int4, dequantized, _ = checkpoints
    for lens, new in (((5, 16, 29, 50), [17, 12, 17, 9]), ((11,), [24])):  # 4 rows; 1 row
        ps = prompts(lens, VOCAB, seed=2)
        tokens = []
        for path in (int4, dequantized):
            with LlamaEngine(path, max_batch=len(ps), page_size=16, cuda_graph=graph) as engine:
                assert not engine.runner.dense.quantized.serves_int4
                tokens.append(engine.generate(ps, new, eos_token_ids=()).tokens)
        assert [len(t) for t in tokens[0]] == new
        assert tokens[0] == tokens[1]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_the_int4_gemv_decodes_what_the_dequantized_checkpoint_ranks_first(checkpoints, graph: bool) -> None:  # type: ignore[no-untyped-def]
    """Served as stored (the int4 GEMV, whose sums are float32 over the exact weights, where the float16 copy rounds
    each weight): every greedy token, 4 rows then 1, in the fused eager step and the decode graph, is the top token
    of the dequantized checkpoint's own logits at that position (teacher forcing; and 8 rows: the fused step's form
    past the fused GEMVs' 4 rows, its LM head the separate launches'), up to a near tie of
    ``TIE`` = 2 % of that row's largest logit magnitude; and the prefill of fewer than 33 tokens (also the GEMV)
    stays within the same 2 % of the dequantized checkpoint's logits."""
    int4, dequantized, _ = checkpoints
    runs = []
    for lens, new in (((5, 16, 29, 50), [17, 12, 17, 9]), ((11,), [24]), ((3, 8, 13, 18, 23, 28, 33, 38), [6] * 8)):
        ps = prompts(lens, VOCAB, seed=2)
        with LlamaEngine(int4, max_batch=len(ps), page_size=16, cuda_graph=graph) as engine:
            assert engine.runner.dense.quantized.serves_int4
            runs.append((ps, engine.generate(ps, new, eos_token_ids=()).tokens))
            short = engine.prefill_logits(prompts((3, 9, 14), VOCAB, seed=4))  # 26 rows: the GEMV
    worst, ties = 0.0, 0
    with LlamaEngine(dequantized, max_batch=4, page_size=16, cuda_graph=False) as ref_engine:
        for got, want in zip(short, ref_engine.prefill_logits(prompts((3, 9, 14), VOCAB, seed=4)), strict=True):
            scale = float(np.abs(want).max())
            assert float(np.abs(got - want).max()) <= 0.02 * scale
        for ps, tokens in runs:
            for p, toks in zip(ps, tokens, strict=True):
                lg = ref_engine.prefill_logits([p + toks[:-1]])[0]
                for t, tok in enumerate(toks):
                    row = lg[len(p) - 1 + t]
                    gap = float(row.max() - row[tok])
                    worst = max(worst, gap)
                    ties += gap > 0
                    assert gap <= 0.02 * float(np.abs(row).max()), (t, gap)
    print(f"int4 GEMV: {ties} tokens not the reference's first choice (largest gap {worst:.4f})")


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_rope_in_the_qkv_gemv_gives_the_logits_of_its_launches(checkpoints, graph: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The fused step's QKV GEMV with RoPE and the KV append as its epilogue (``QuantizedWeights.int4_rope``, the
    default) against the same step with them as launches of their own: the same tokens and every step's logits bit for
    bit (eagerly; a graph's tokens), 4 rows, 1, then 8 (the fused step, eagerly and in the decode graphs), with the
    epilogue's launch in the packed layers and no RoPE launch between QKV and attention."""
    from fi_engine.kernels.quantized_weights import QuantizedWeights

    # both engines take the same GEMM launches (the least label of every timed set: the format's own path), so their
    # steps cannot differ by a launch choice
    pin_launch_choices(monkeypatch)
    int4, _, _ = checkpoints
    for lens, new in (((5, 16, 29, 50), [9, 6, 9, 5]), ((11,), [12]), ((3, 8, 13, 18, 23, 28, 33, 38), [5] * 8)):
        ps = prompts(lens, VOCAB, seed=2)
        runs = []
        for in_gemv in (True, False):
            monkeypatch.setattr(QuantizedWeights, "int4_rope", in_gemv)
            with LlamaEngine(int4, max_batch=len(ps), page_size=16, cuda_graph=graph) as engine:
                runner, logits = engine.runner, []
                original = engine.sampler.pick

                def pick(v, n, sampling, runner=runner, logits=logits, original=original):  # type: ignore[no-untyped-def]
                    logits.append(runner.buffers.logits[:n].get())
                    original(v, n, sampling)

                engine.sampler.pick = pick
                try:
                    tokens = engine.generate(ps, new, eos_token_ids=()).tokens
                finally:
                    del engine.sampler.pick
                logits.append(runner.buffers.logits[: len(ps)].get())
                view = runner.io._views.get(("decode", len(ps), len(ps)))
                fused = view is not None and "fused step" in view.prepared
                before = len(view.prepared["fused step"][1][1][0]) if fused else None
                runs.append((tokens, logits, before))
        (tok_a, log_a, before_a), (tok_b, log_b, before_b) = runs
        assert tok_a == tok_b
        # eagerly every step's logits; a graph loop runs steps ahead of the host (its logits buffer holds whichever
        # step ran last), so there the tokens only
        if graph:
            log_a, log_b = [], []
        assert len(log_a) == len(log_b)
        for step, (a, b) in enumerate(zip(log_a, log_b, strict=True)):
            assert np.array_equal(a, b), f"step {step}: logits differ by {np.abs(a - b).max():.3g}"
        # every step of 1 to 8 rows is the fused step, eagerly and in the graphs: layer 1's launches before the
        # attention are the norm and the QKV GEMV (and, as launches, RoPE and the append)
        assert before_a is not None and before_b is not None
        assert before_b - before_a == 2, (before_a, before_b)

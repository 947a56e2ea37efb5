"""The RMSNorms of the quantized fused decode step folded into their GEMVs (``QuantizedWeights.norm_in_gemv``,
fi_engine.kernels.norm_fold), on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy only).

Random Llamas (helpers.random_llama: 4 layers, hidden 512, 8 query / 2 KV heads of 64, MLP 1536) quantized to AWQ
int4 (groups of 128) and to e4m3 with 128x128 block scales; greedy decoding of one row (the fused step, eager and
as the decode graph) and of 4 rows (eager), with the norms folded and as launches of their own:

- the folded step runs no norm launch between two GEMVs (the packed layers say so) and decodes the same tokens as
  the unfolded one up to a near tie: every step's logits within ``LOGIT_TOL`` of the unfolded step's (the fold moves
  one rounding of each GEMV input: ``s * nw`` rounded, then times the row's factor in float32, where FlashInfer
  rounds the product of the three), the largest difference printed;
- the folded step is deterministic: the same prompts give bit-equal logits twice, and bit-equal logits again when
  every GEMV block computes its rows' factors itself (the published count held back) instead of reading the
  factors block 0 published: the two ways give the same bits, as norm_fold.cuh says.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.fp8_checkpoints import write_fp8_copy  # noqa: E402
from helpers.int4_checkpoints import write_int4_copy  # noqa: E402
from helpers.random_llama import VOCAB, save_random_llama  # noqa: E402
from helpers.yardstick import LOGIT_TOL, prompts  # noqa: E402

from fi_engine.kernels.quantized_weights import QuantizedWeights  # noqa: E402
from fi_engine.models.llama import LlamaEngine  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["int4-awq", "fp8-block"])
def checkpoint(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp(request.param)
    (root / "src").mkdir()
    if request.param == "int4-awq":
        src = save_random_llama(root / "src", "float16", 64, (8, 2), 512, 1536, False, tied=False)
        write_int4_copy(src, root / "q", "awq", 128, sym=True, v1=True)
    else:
        src = save_random_llama(root / "src", "bfloat16", 64, (8, 2), 512, 1536, False, tied=False)
        write_fp8_copy(src, root / "q", "block")
    return root / "q", "float16" if request.param == "int4-awq" else "bfloat16"


def _decode(path, lens, new, graph, fold, hold_back=False):  # type: ignore[no-untyped-def]
    """(tokens, every eager step's logits and the last step's, the packed layers' launch counts, the fold
    counters) of greedy decoding ``lens``-token prompts with the norms folded or not; ``hold_back``: after a first
    warm generate, the published counts are zeroed so that every later launch's blocks compute the factors
    themselves."""
    default, QuantizedWeights.norm_in_gemv = QuantizedWeights.norm_in_gemv, fold
    # both steps with RoPE and the append as launches: the folded QKV GEMV (FoldIn) has no RoPE epilogue, and the
    # launch counts below compare the norms alone
    rope_default, QuantizedWeights.int4_rope = QuantizedWeights.int4_rope, False
    try:
        ps = prompts(lens, VOCAB, seed=3)
        with LlamaEngine(path, max_batch=len(ps), page_size=16, cuda_graph=graph) as engine:
            runner = engine.runner
            assert runner.fuses(len(ps))
            if hold_back:
                engine.generate(ps, [3] * len(ps), eos_token_ids=())
                runner.buffers.fold_sync[:, :, 1] = 0
                cp.cuda.runtime.deviceSynchronize()
            original, logits = engine.sampler.pick, []

            def pick(v, rows, sampling):  # type: ignore[no-untyped-def]
                logits.append(runner.buffers.logits[:rows].get())  # this step's logits, before the argmax
                original(v, rows, sampling)

            engine.sampler.pick = pick
            try:
                tokens = engine.generate(ps, new, eos_token_ids=()).tokens
            finally:
                del engine.sampler.pick
            rows = len(ps)
            logits.append(runner.buffers.logits[:rows].get())  # the last step's (a graph step's logits stay there)
            _, layers, _ = runner.fused._fp8_fused_calls(runner.io.view("decode", rows, rows), rows)
            counts = [(len(before), len(after)) for before, after in layers]
            sync = runner.buffers.fold_sync.get()
        return tokens, logits, counts, sync
    finally:
        QuantizedWeights.norm_in_gemv, QuantizedWeights.int4_rope = default, rope_default


@pytest.mark.parametrize(
    ("lens", "new", "graph"),
    [((11,), [24], False), ((11,), [24], True), ((5, 16, 29, 50), [17, 12, 17, 9], False)],
    ids=["1-row-eager", "1-row-graph", "4-rows-eager"],
)
def test_the_folded_norms_decode_the_unfolded_steps_tokens(checkpoint, lens, new, graph) -> None:  # type: ignore[no-untyped-def]
    path, dtype = checkpoint
    tok_f, log_f, counts_f, sync = _decode(path, lens, new, graph, True)
    tok_u, log_u, counts_u, _ = _decode(path, lens, new, graph, False)
    rows = len(lens)
    folds = rows == 1 or dtype == "float16"  # (the int4 checkpoint; FP8's fold forms serve one row)
    if folds:
        # layer 0 keeps its input norm (of the embedding rows); every later layer has no norm launch between GEMVs
        assert counts_f[0][0] == counts_u[0][0]
        assert all(f[0] == u[0] - 1 for f, u in zip(counts_f[1:], counts_u[1:], strict=True))
        assert all(f[1] == u[1] - 1 for f, u in zip(counts_f, counts_u, strict=True))
        assert int(sync[:, 1, 1].min()) > 0 and int(sync[1:, 0, 1].min()) > 0  # factors were published
    else:
        assert counts_f == counts_u
    worst = 0.0
    for a, b in zip(log_f, log_u, strict=True):
        worst = max(worst, float(np.abs(a - b).max()))
    print(f"{dtype} {rows} rows {'graph' if graph else 'eager'}: max |logit difference| {worst:.3e}")
    assert worst <= LOGIT_TOL[dtype]
    assert tok_f == tok_u


def test_the_folded_step_gives_the_same_bits_whoever_computes_the_factors(checkpoint) -> None:  # type: ignore[no-untyped-def]
    path, _ = checkpoint
    first = _decode(path, (11,), [16], False, True)
    again = _decode(path, (11,), [16], False, True)
    held = _decode(path, (11,), [16], False, True, hold_back=True)  # every block computes the factors itself
    assert len(first[1]) >= 16  # the prefill's and the decode steps' (eager), the last step's again
    for other in (again, held):
        assert other[0] == first[0]
        for step, (a, b) in enumerate(zip(first[1], other[1], strict=True)):
            assert np.array_equal(a, b), f"step {step}: max |logit difference| {float(np.abs(a - b).max())}"

"""Decode attention on FlashInfer's FA2 paged-prefill kernel (``ModelRunner.tensor_core_decode_rows``,
``Llama.plan_decode``) against the decode kernel, on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy only).

Greedy decoding of eight prompts (4 to 70 tokens, so their contexts cross pages of 16 and differ in length) by two
engines of one random checkpoint, one made with the setting at 8 rows and one with it off (0: the decode kernel), in
CUDA graphs: the high slots' requests end first (6-12 new tokens, the low slots' 45-60), so the first steps replay
the graph of 8 rows, which plans the prefill kernel, and the later ones the graphs of 4, 2 and 1 rows, which plan the
decode kernel. Each decode step's logits are read right after it (``ModelRunner.run_decode``: the graph writes them
before its argmax) and compared over the rows of requests still decoding (the others are padding rows, which attend
to the padding page only): within the engine tests' tolerance (``helpers.yardstick.LOGIT_TOL``: float16 0.02,
bfloat16 0.08: two kernels summing the same attention in another order), up to the first step whose greedy token
differs, which must be a near tie (the top two logits within twice that tolerance); the steps' plan kinds are the
ones the setting names. A model with 3 query heads a KV head (below the 4 the setting asks for) plans the decode
kernel either way; eager steps keep the decode kernel.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.random_llama import save_random_llama as make_checkpoint
from helpers.yardstick import LOGIT_TOL

from fi_engine.models.llama import LlamaEngine
from fi_engine.runtime.worker.model_runner import ModelRunner

pytestmark = pytest.mark.gpu

MODELS = {  # (dtype, head_dim, (q heads, kv heads), hidden, intermediate, Llama 3.1 RoPE[, (experts, top-k)])
    "bf16-d128-gqa4": ("bfloat16", 128, (8, 2), 1024, 2816, True),
    "bf16-mixtral-like": ("bfloat16", 128, (8, 2), 1024, 1024, False, (8, 2)),
    "f16-gqa3": ("float16", 64, (9, 3), 576, 1536, False),
}
PROMPT_LENGTHS = (4, 17, 33, 9, 70, 48, 25, 61)
NEW_TOKENS = [60, 58, 52, 45, 12, 10, 8, 6]  # slot i's request (admitted together, in order): high slots end first


def decode_logits(
    path, rows_setting: int, graph: bool, monkeypatch
) -> tuple[list[list[int]], list[np.ndarray], list[str]]:
    """The tokens, each decode step's logits of the rows still decoding (step s: the requests that take more than
    s + 2 tokens; the first comes from the prefill) and each step's plan kind, of an engine made with
    ``tensor_core_decode_rows = rows_setting``."""
    monkeypatch.setattr(ModelRunner, "tensor_core_decode_rows", rows_setting)
    prompts = [[(7 * j + 5 * i) % 4000 + 3 for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]
    logits: list[np.ndarray] = []
    kinds: list[str] = []
    with LlamaEngine(path, max_batch=8, page_size=16, cuda_graph=graph) as engine:
        runner = engine.runner
        original = runner.run_decode

        def run_decode(rows):
            out = original(rows)
            runner.stream.synchronize()
            step = len(logits)
            live = [i for i in range(rows) if NEW_TOKENS[i] > step + 2]
            logits.append(runner.buffers.logits[:rows].get(stream=runner.stream)[live])
            kinds.append(runner.decode_plan.kind)
            return out

        runner.run_decode = run_decode
        try:
            result = engine.generate(prompts, NEW_TOKENS, eos_token_ids=())
        finally:
            del runner.run_decode
    return result.tokens, logits, kinds


@pytest.mark.parametrize(
    ("model", "graph"),
    [("bf16-d128-gqa4", True), ("bf16-d128-gqa4", False), ("bf16-mixtral-like", True), ("f16-gqa3", True)],
    ids=["gqa4-graph", "gqa4-eager", "mixtral-graph", "gqa3-graph"],
)
def test_prefill_kernel_decode_matches_the_decode_kernel(tmp_path, monkeypatch, model, graph):
    dtype, _, (hq, hk), *_ = MODELS[model]
    path = make_checkpoint(tmp_path, *MODELS[model])
    tok_tc, log_tc, kinds_tc = decode_logits(path, 8, graph, monkeypatch)
    tok_d, log_d, kinds_d = decode_logits(path, 0, graph, monkeypatch)
    assert set(kinds_d) == {"batch_decode"}
    if hq >= 4 * hk and graph:  # the 8-row graph's steps the prefill kernel, the smaller graphs' the decode kernel
        assert kinds_tc[0] == "batch_prefill" and set(kinds_tc) == {"batch_prefill", "batch_decode"}, kinds_tc
    else:
        assert set(kinds_tc) == {"batch_decode"}, (model, graph, kinds_tc)
    assert len(log_tc) == len(log_d) and log_tc
    tol = LOGIT_TOL[dtype]
    worst = 0.0
    for step, (a, b) in enumerate(zip(log_tc, log_d, strict=True)):
        assert a.shape == b.shape
        worst = max(worst, float(np.abs(a - b).max()))
        assert worst <= tol, f"{model}: step {step}: logits differ by {worst:.3g} (> {tol})"
        if not np.array_equal(a.argmax(-1), b.argmax(-1)):  # a near tie: the sequences part from here on
            for row in np.nonzero(a.argmax(-1) != b.argmax(-1))[0]:
                top2 = np.sort(b[row])[-2:]
                assert top2[1] - top2[0] <= 2 * tol, f"{model}: step {step} row {row}: not a near tie"
            break
    else:
        assert tok_tc == tok_d
    print(f"{model} {'graph' if graph else 'eager'}: {len(log_tc)} steps, max |logit difference| {worst:.2e}")

"""Decode attention on FlashInfer's FA2 paged-prefill kernel (``ModelRunner.tensor_core_decode_rows``,
``Llama.plan_decode``) against the decode kernel, on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy only).

Greedy decoding of eight prompts (4 to 70 tokens, so their contexts cross pages of 16 and differ in length; up to 60
new tokens, so requests leave and later steps run fewer rows) by two engines of one random checkpoint, one made with
the setting at 8 rows and one with it off (0: the decode kernel), in CUDA graphs: the graph of 8 rows (its empty slots
padded) plans the prefill kernel, the smaller ones the last steps replay the decode kernel. The logits of every step
agree within the engine tests' tolerance (``helpers.yardstick.LOGIT_TOL``: float16 0.02, bfloat16 0.08: two kernels
summing the same attention in another order) up to the first step whose greedy token differs, which must be a near
tie (the top two logits within twice that tolerance); the steps' plan kinds are the ones the setting names. A model
with 3 query heads a KV head (below the 4 the setting asks for) plans the decode kernel either way; eager steps
keep the decode kernel.
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
NEW_TOKENS = [60, 40, 52, 12, 45, 60, 30, 58]


def decode_logits(
    path, rows_setting: int, graph: bool, monkeypatch
) -> tuple[list[list[int]], list[np.ndarray], set[str]]:
    """The tokens, each decode step's logits and the plan kinds of its steps, of an engine made with
    ``tensor_core_decode_rows = rows_setting``."""
    monkeypatch.setattr(ModelRunner, "tensor_core_decode_rows", rows_setting)
    prompts = [[(7 * j + 5 * i) % 4000 + 3 for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]
    logits: list[np.ndarray] = []
    kinds: set[str] = set()
    with LlamaEngine(path, max_batch=8, page_size=16, cuda_graph=graph) as engine:
        original = engine.sampler.pick

        def pick(v, rows, sampling):
            logits.append(engine.runner.buffers.logits[:rows].get())
            if v.kind == "decode":  # (a prefill pass picks its first tokens too)
                kinds.add(engine.runner.decode_plan.kind)
            original(v, rows, sampling)

        engine.sampler.pick = pick
        try:
            result = engine.generate(prompts, NEW_TOKENS, eos_token_ids=())
        finally:
            del engine.sampler.pick
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
    assert kinds_d == {"batch_decode"}
    if hq >= 4 * hk and graph:  # the 8-row graph's steps the prefill kernel (the smaller graphs' steps not)
        assert "batch_prefill" in kinds_tc, (model, kinds_tc)
    else:
        assert kinds_tc == {"batch_decode"}, (model, graph, kinds_tc)
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

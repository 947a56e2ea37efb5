"""MoE models and vocabulary-parallel heads under tensor parallelism 2 (and 4 where there are GPUs) against one GPU
(FI_FFI_RUN_GPU_TESTS=1; CuPy, torch + transformers to write the checkpoints, the comm and model-family wheels).

Random small Mixtral (bfloat16, 8 experts, top-2) and Qwen3-MoE (float16, 16 experts, top-4, ``norm_topk_prob``)
checkpoints are built with transformers' own classes and ``save_pretrained``, with a vocabulary of 4099 tokens
(no tensor-parallel size divides it: the last rank's shard is padded). tests/helpers/llama_tp_worker.py runs greedy
generation and prefill logits on one GPU, then as N ranks under ``fi-ffi launch``: eager, CUDA graph (the MoE
layers' fixed-capacity device path), and graph with the whole vocabulary on every rank (``--whole-vocab``).

Yardstick: the ranks sum their experts' partial outputs in a different order than one GPU's GEMM, so the hidden
states differ by float16/bfloat16 rounding, and where a router's k-th and (k+1)-th scores are that close a token
may pick another expert (tests/engine/test_gpu_models.py measured 0.18-0.64 of logit change for one swapped expert in
bfloat16), after which TP N's greedy tokens may leave one GPU's for the rest of the prompt while both stay right (seen:
Mixtral at TP 4 equal to one GPU's for 2 of 4 prompts, its logits within 0.015 of one GPU's). So: the prefill logits
of at least 95% of the positions within the engine-vs-float32 tolerance of tests/engine/test_gpu_llama.py (0.02
float16, 0.08 bfloat16: ``helpers.yardstick.LOGIT_TOL``) of one GPU's, the median position's error within a quarter
of it; every greedy token of TP N the choice of transformers in float32 on the saved weights (the float32 reference)
under teacher forcing up to that same tolerance (``helpers.yardstick.check_greedy``, the bound
tests/engine/test_gpu_models.py holds these checkpoints' one-GPU tokens to); and the sampled ``top_k=1`` tokens (the
gathered-logits path) equal to the same run's greedy tokens everywhere. A token past the tolerance also passes, once
a prompt, where a flipped expert choice explains it (``helpers.routing_ties``, Mixtral's and Qwen3-MoE's softmax
routers): for each router decision of the float32 reference at that position within twice transformers' own 16-bit
error of the router scores (the k-th expert against the k+1-th), the reference is rerun with that one decision
flipped at that one position and layer, and the token must be within the tolerance of that flipped reference's best
logit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers.checkpoints import MIXTRAL_MOE, SMALL, float32_reference, qwen3_moe, save_random
from helpers.llama_tp_worker import prompts
from helpers.routing_ties import RoutingTies
from helpers.subprocess_run import gpu_count, multicast_off
from helpers.tp_runs import VOCAB, _check_logits, _env, _run
from helpers.yardstick import LOGIT_TOL, check_greedy

multicast_off()

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

pytestmark = pytest.mark.gpu

COMMON = dict(vocab_size=VOCAB, **SMALL)
FAMILIES = {
    "mixtral-bf16": ("MixtralConfig", "MixtralForCausalLM", "bfloat16", MIXTRAL_MOE),
    "qwen3moe-f16": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "float16", qwen3_moe(norm_topk_prob=True)),
}


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    pytest.importorskip("cupy", reason="the engine needs CuPy")
    config_cls, model_cls, dtype, extra = FAMILIES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    env = _env(tmp)
    model = tmp / "model"
    hf16 = save_random(model, config_cls, model_cls, dtype, {**COMMON, **extra})
    ref32 = float32_reference(hf16)
    routing = RoutingTies(ref32, hf16.cuda().eval(), prompts(VOCAB))  # the router's 16-bit error on these prompts
    one = _run(env, model, tmp / "tp1.npz", 1)
    return request.param, model, env, dtype, (one, ref32, routing)


@pytest.mark.parametrize("layout", ["block", "channel"])
def test_fp8_moe_tensor_parallel_matches_one_gpu(tmp_path: Path, layout: str) -> None:
    """A Qwen3-MoE FP8 checkpoint (helpers.moe_checkpoints: 8 experts of 256, top-2; 128x128 blocks or one scale
    per row) at TP 2, eager and as the decode graph, against one GPU (W8A16: the weights exact): every MoE layer keeps
    its experts' shard e4m3 (each rank 128 of every expert's 256 intermediate rows and columns, whole blocks) and the
    attention's shards too. Yardstick: the bfloat16 copy of the same weights run the same way (TP 2 against TP 1)
    sets the noise of this model's reduction order (its logits are larger than the transformers-written models'
    above: a median of 0.034 measured); the FP8 model's deviation may be at most 1.5 times the copy's (plus 0.01),
    and its greedy tokens equal one GPU's for at most one prompt fewer than the copy's do."""
    if gpu_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {gpu_count()}")
    from helpers.fp8_checkpoints import write_fp8_copy
    from helpers.int4_checkpoints import write_16bit_copy
    from helpers.moe_checkpoints import save_random_qwen3_moe

    env = _env(tmp_path)
    written = write_fp8_copy(save_random_qwen3_moe(tmp_path / "bf16"), tmp_path / "fp8", layout)
    write_16bit_copy(tmp_path / "bf16", tmp_path / "copy", written)

    def deviations(model: Path, mode: str, stored: tuple[int, int]) -> tuple[np.ndarray, list[bool]]:
        flags = ["--w8a16", *(["--graph"] if mode == "graph" else [])]
        ref = _run(env, model, tmp_path / f"{model.name}-tp1-{mode}.npz", 1, *flags)
        got = _run(env, model, tmp_path / f"{model.name}-tp2-{mode}.npz", 2, *flags)
        for run in (ref, got):  # MoE layers with e4m3 experts; e4m3 qkv and o projections
            assert (int(run["fp8_experts"]), int(run["fp8_weights"])) == stored
        errs = np.concatenate([np.abs(got[k] - ref[k]).max(axis=1) for k in ("logits0", "logits1")])
        same = [a == b for a, b in zip(got["tokens"].tolist(), ref["tokens"].tolist(), strict=True)]
        return errs, same

    for mode in ("eager", "graph"):
        control, control_same = deviations(tmp_path / "copy", mode, (0, 0))
        errs, same = deviations(tmp_path / "fp8", mode, (2, 4))
        print(f"fp8 {layout} tp 2 {mode}: max {errs.max():.4f}, median {np.median(errs):.4f}, tokens equal {same}; "
              f"the bfloat16 copy's: max {control.max():.4f}, median {np.median(control):.4f}, tokens equal "
              f"{control_same}")  # fmt: skip
        assert errs.max() <= 1.5 * control.max() + 0.01 and np.median(errs) <= 1.5 * np.median(control) + 0.01
        assert sum(same) >= sum(control_same) - 1, (
            f"fp8 {layout} tp 2 {mode}: tokens equal {same}, copy's {control_same}"
        )


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("mode", ["eager", "graph", "graph-whole-vocab"])
def test_moe_tensor_parallel_matches_one_gpu(family: tuple, tmp_path: Path, n: int, mode: str) -> None:
    if gpu_count() < n:
        pytest.skip(f"needs {n} GPUs, found {gpu_count()}")
    name, model, env, dtype, (one, ref32, routing) = family
    flags = {"eager": ["--topk1"], "graph": ["--graph", "--topk1"], "graph-whole-vocab": ["--graph", "--whole-vocab"]}
    got = _run(env, model, tmp_path / "out.npz", n, *flags[mode])
    assert int(got["tp"]) == n and bool(got["vocab_shard"]) == (mode != "graph-whole-vocab")
    what = f"{name} tp {n} {mode}"
    _check_logits(got, one, LOGIT_TOL[dtype], what)
    exact = check_greedy(ref32, prompts(VOCAB), got["tokens"].tolist(), LOGIT_TOL[dtype], routing)
    same = [a == b for a, b in zip(got["tokens"].tolist(), one["tokens"].tolist(), strict=True)]
    print(f"{what}: {exact} greedy tokens the float32 argmax (router score error {routing.error:.4f}), prompts "
          f"equal to one GPU's {same}")  # fmt: skip
    assert got["tokens_topk1"].tolist() == got["tokens"].tolist()  # top_k=1 sampling over gathered logits

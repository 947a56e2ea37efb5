"""FP8 (e4m3) mixture-of-experts checkpoints served on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy and the model-family
kernel wheel; no torch or transformers).

Random bfloat16 models written with numpy (helpers.moe_checkpoints; 2 layers, hidden 512): a Qwen3-MoE (8 experts of
256, top-2, per-head q/k norms) and a DeepSeek-V3 (MLA, a dense first layer, 8 routed experts in 2 groups with a shared
expert). Each is quantized to e4m3 in the three published scale layouts (helpers.fp8_checkpoints: 128x128 blocks, per
channel, per tensor), and each FP8 checkpoint is also written as a bfloat16 checkpoint of exactly the weights it
dequantizes to (the CPU suite, tests/engine/test_fp8_moe.py, proves the host reader produces those bits). The engine
given the FP8 checkpoint is compared with the same engine given that bfloat16 copy:

- DeepSeek-V3 loaded dequantizing (``ModelRunner.fp8_experts_as_stored = False``): every projection is dequantized at
  load, so both load the same bits and run the same kernels: prefill logits **bit-equal** (tolerance 0), and greedy
  decoding (4 rows, eager, and as the decode CUDA graph with its device routing) gives the same tokens step for step;
- DeepSeek-V3 as served by default: its routed experts stay e4m3 (MLA, the dense MLP and the shared expert are
  dequantized), compared with the dequantizing load of the same checkpoint. Prefills of more than ``max_batch`` rows
  read the experts' 16-bit copy (the same bits) through the same grouped GEMMs: logits **bit-equal**. A prefill of at
  most ``max_batch`` rows and every decode step take the FP8 grouped GEMV after the same routing (eager: the host's;
  graph: the device's): each logit within ``LOGIT_TOL["bfloat16"]`` (0.08) of the dequantizing load's, and greedy
  tokens (4 rows, eager and as the decode CUDA graph) each within that tolerance of the best logit of the
  dequantizing load's prefill over the same sequence (teacher forcing, as for Qwen3-MoE: a near tie, in the logits
  or in the routing's scores, either may break);
- Qwen3-MoE: the experts stay e4m3, read as stored by the FP8 grouped GEMV at decode (steps of up to ``max_batch`` rows)
  and through their 16-bit copy (the same bits as the copy checkpoint's) for prefill; the attention projections stay
  e4m3 and run the FP8 path (``QuantizedWeights.fp8_w8a8`` off here: W8A16, the weights exact). The scales are written
  as powers of two, so every dequantized weight is exact in bfloat16 and the two models hold the same weight values;
  what differs is only the arithmetic's order (the FP8 GEMVs against the 16-bit GEMVs or cuBLAS for up to 8 rows; the
  FP8 weight dequantized into a scratch matrix for the 16-bit GEMM above). Tolerance: every prefill logit within
  ``LOGIT_TOL["bfloat16"]`` (0.08, bfloat16 arithmetic's own error against float32 on logits of this spread) of the
  copy's, the bitwise share printed; greedy tokens (4 rows, eager and as the decode CUDA graph) each within that
  tolerance of the best logit of the copy's prefill over the same sequence (teacher forcing: a near tie either may
  break);
- neither comparison is of two copies of one model: the FP8 model's logits differ from the unquantized original's by
  more than that tolerance (printed).

Run on the GPU machine: ``FI_FFI_RUN_GPU_TESTS=1 python -m pytest -q -s tests/engine/test_gpu_fp8_moe.py`` (the
model-family kernel wheel staged beside the core one).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.fp8_checkpoints import write_fp8_copy  # noqa: E402
from helpers.int4_checkpoints import write_16bit_copy  # noqa: E402
from helpers.launch_choices import pin_launch_choices  # noqa: E402
from helpers.moe_checkpoints import VOCAB, save_random_deepseek_v3, save_random_qwen3_moe  # noqa: E402
from helpers.yardstick import LOGIT_TOL, prompts  # noqa: E402

from fi_engine.models.deepseek import DeepSeekEngine  # noqa: E402
from fi_engine.models.llama import LlamaEngine  # noqa: E402
from fi_engine.runtime.worker.model_runner import ModelRunner  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = LOGIT_TOL["bfloat16"]
LAYOUTS = ("block", "channel", "tensor")
PROMPTS = (1, 7, 16, 33, 50)
DECODE = ((5, 16, 29, 50), [17, 12, 17, 9])  # prompt lengths, new tokens (4 rows)
SHORT = (1, 3)  # prefills of at most 4 rows (max_batch): DeepSeek's stored experts take the FP8 grouped GEMV
LONG = PROMPTS[1:]  # prompts of more than 4 rows, however they are batched: the grouped GEMMs over the 16-bit copy


@pytest.fixture(autouse=True)
def _models(models_modules: list[str]) -> None:
    """Skips (naming the wheel) when the model-family modules (the grouped GEMMs) are not pinned."""


@pytest.fixture(autouse=True)
def _w8a16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FP8 projections with 16-bit activations (the weights exact; W8A8 would round every activation to e4m3)."""
    from fi_engine.kernels.quantized_weights import QuantizedWeights

    monkeypatch.setattr(QuantizedWeights, "fp8_w8a8", False)
    monkeypatch.setattr(QuantizedWeights, "fp8_w8a8_blocks", False)


def _checkpoints(root, save, layout):  # type: ignore[no-untyped-def]
    """(the FP8 checkpoint, the bfloat16 copy of what it holds, the unquantized original)."""
    src = save(root / "original")
    write_16bit_copy(src, root / "copy", write_fp8_copy(src, root / "fp8", layout, pow2=True))
    return root / "fp8", root / "copy", src


@pytest.fixture(scope="module", params=LAYOUTS)
def qwen3_moe(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    return _checkpoints(tmp_path_factory.mktemp(f"qwen3-moe-{request.param}"), save_random_qwen3_moe, request.param)


@pytest.fixture(scope="module", params=LAYOUTS)
def deepseek_v3(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    return _checkpoints(tmp_path_factory.mktemp(f"deepseek-v3-{request.param}"), save_random_deepseek_v3, request.param)


@pytest.fixture(scope="module")
def deepseek_v3_blocks(tmp_path_factory):  # type: ignore[no-untyped-def]
    """DeepSeek-V3 in its published FP8 form (128x128 blocks): the layout whose routed experts stay e4m3 (per-row and
    per-tensor scales are dequantized at load, ``deepseek_config.deepseek_fp8_scheme``)."""
    return _checkpoints(tmp_path_factory.mktemp("deepseek-v3-stored"), save_random_deepseek_v3, "block")


@pytest.fixture
def dequantizing_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engines made under it dequantize a mixture-of-experts model's e4m3 experts at load (the switch off)."""
    monkeypatch.setattr(ModelRunner, "fp8_experts_as_stored", False)


def _near_ties(ps, tokens, forced) -> int:  # type: ignore[no-untyped-def]
    """Every generated token within TOL of the best of ``forced`` (another engine's prefill logits over each prompt
    ``ps[i]`` followed by its ``tokens[i]``: teacher forcing); returns how many are exactly its argmax."""
    exact = 0
    for i, (p, t, lg) in enumerate(zip(ps, tokens, forced, strict=True)):
        for j, tok in enumerate(t):
            row = lg[len(p) - 1 + j]
            assert row[tok] >= row.max() - TOL, f"request {i} token {j}: {tok} ({row[tok]:.4f}), best {row.max():.4f}"
            exact += int(tok == int(row.argmax()))
    return exact


def _prefill(engine_class, path):  # type: ignore[no-untyped-def]
    with engine_class(path, max_batch=4, page_size=16) as engine:
        return engine.prefill_logits(prompts(PROMPTS, VOCAB))


def _off_the_original(engine_class, got, original) -> float:  # type: ignore[no-untyped-def]
    off = max(float(np.abs(g - o).max()) for g, o in zip(got, _prefill(engine_class, original), strict=True))
    assert off > TOL, f"the FP8 model's logits are within {off} of the unquantized model's"
    return off


def test_qwen3_moe_prefill_logits_match_the_dequantized_copy(qwen3_moe) -> None:  # type: ignore[no-untyped-def]
    fp8, copy, original = qwen3_moe
    with LlamaEngine(fp8, max_batch=4, page_size=16) as engine:
        scheme = engine.runner.model_config.fp8
        assert scheme is not None and scheme.stored_experts and not scheme.dequantized
        assert engine.runner.dense.quantized.serves_fp8  # the attention projections stay e4m3
        assert all(layer.fp8_experts is not None for layer in engine.runner.moe_layers)  # and the experts
        got = engine.prefill_logits(prompts(PROMPTS, VOCAB))
    want = _prefill(LlamaEngine, copy)
    worst, equal = 0.0, 0
    for n, g, w in zip(PROMPTS, got, want, strict=True):
        assert g.shape == w.shape == (n, VOCAB)
        diff = float(np.abs(g - w).max())
        assert diff <= TOL, f"{scheme.describe()}: a {n}-token prompt's logits differ from the copy's by {diff}"
        worst, equal = max(worst, diff), equal + int((g == w).sum())
    off = _off_the_original(LlamaEngine, got, original)
    share = equal / sum(g.size for g in got)
    print(f"{scheme.describe()}: max |FP8 - copy| {worst:.4f} ({share:.1%} bit-equal); {off:.3f} off the original")


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_qwen3_moe_greedy_tokens_are_the_copys_up_to_near_ties(qwen3_moe, graph) -> None:  # type: ignore[no-untyped-def]
    fp8, copy, _ = qwen3_moe
    ps = prompts(DECODE[0], VOCAB)
    with LlamaEngine(fp8, max_batch=4, page_size=16, cuda_graph=graph) as engine:
        tokens = engine.generate(ps, DECODE[1], eos_token_ids=()).tokens
    assert [len(t) for t in tokens] == DECODE[1]
    with LlamaEngine(copy, max_batch=4, page_size=16) as engine:  # the copy's logits over the FP8 model's sequences
        forced = engine.prefill_logits([p + t[:-1] for p, t in zip(ps, tokens, strict=True)])
    exact = _near_ties(ps, tokens, forced)
    print(f"{'graph' if graph else 'eager'}: {exact}/{sum(DECODE[1])} tokens the copy's argmax")


def test_deepseek_v3_prefill_logits_equal_the_dequantized_copys(deepseek_v3, dequantizing_load) -> None:  # type: ignore[no-untyped-def]
    fp8, copy, original = deepseek_v3
    with DeepSeekEngine(fp8, max_batch=4, page_size=16) as engine:
        scheme = engine.deepseek_config.fp8
        assert scheme is not None and scheme.experts_dequantized().dequantized == "every projection"
        assert not engine.family.experts_stored
        assert all(layer.fp8_experts is None for layer in engine.runner.moe_layers if layer is not None)
        assert not engine.runner.dense.quantized.serves_fp8  # every projection was dequantized at load
        got = engine.prefill_logits(prompts(PROMPTS, VOCAB))
    want = _prefill(DeepSeekEngine, copy)
    for n, g, w in zip(PROMPTS, got, want, strict=True):
        assert g.shape == w.shape == (n, VOCAB)
        assert np.array_equal(g, w), f"{scheme.describe()}: a {n}-token prompt differs by {np.abs(g - w).max()}"
    off = _off_the_original(DeepSeekEngine, got, original)
    print(f"{scheme.describe()}: bit-equal to the dequantized copy; {off:.3f} off the unquantized model")


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_deepseek_v3_greedy_tokens_equal_the_dequantized_copys(  # type: ignore[no-untyped-def]
    deepseek_v3, dequantizing_load, graph, monkeypatch
) -> None:
    # the same weights' bits in both engines (every projection dequantized at load), and the same GEMM launches (each
    # engine's timed picks would differ from run to run and flip a near tie: seen in a graph, one token in 17)
    pin_launch_choices(monkeypatch)
    fp8, copy, _ = deepseek_v3
    ps = prompts(DECODE[0], VOCAB)
    runs = []
    for path in (fp8, copy):
        with DeepSeekEngine(path, max_batch=4, page_size=16, cuda_graph=graph) as engine:
            runs.append(engine.generate(ps, DECODE[1], eos_token_ids=()).tokens)
    assert [len(t) for t in runs[0]] == DECODE[1]
    assert runs[0] == runs[1]


def _deepseek_runs(path, monkeypatch, stored: bool, run):  # type: ignore[no-untyped-def]
    """``run(engine)`` on a DeepSeekEngine of ``path`` (max_batch 4) with the routed experts kept e4m3 (``stored``)
    or dequantized at load, after checking the engine holds them so."""
    monkeypatch.setattr(ModelRunner, "fp8_experts_as_stored", stored)
    with DeepSeekEngine(path, max_batch=4, page_size=16) as engine:
        layers = [layer for layer in engine.runner.moe_layers if layer is not None]
        assert layers and engine.family.experts_stored is stored
        for layer in layers:
            assert (layer.fp8_experts is not None) is stored
            if stored:  # every step of up to max_batch rows: the FP8 grouped GEMV
                assert layer.capacity == 4 and layer._gemv_serves(4)
        assert not engine.runner.dense.quantized.serves_fp8  # MLA, the dense MLP, the shared expert: dequantized
        return run(engine)


def test_deepseek_v3_stored_experts_prefill_logits_match_the_dequantizing_load(deepseek_v3_blocks, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fp8, _, _ = deepseek_v3_blocks

    def both(engine):  # type: ignore[no-untyped-def]
        return engine.prefill_logits(prompts(LONG, VOCAB)), engine.prefill_logits(prompts(SHORT, VOCAB, seed=2))

    (long_got, short_got), (long_want, short_want) = (
        _deepseek_runs(fp8, monkeypatch, stored, both) for stored in (True, False)
    )
    for n, g, w in zip(LONG, long_got, long_want, strict=True):  # through the 16-bit copy: the same bits
        assert g.shape == w.shape == (n, VOCAB)
        assert np.array_equal(g, w), f"a {n}-token prompt in a long prefill differs by {np.abs(g - w).max()}"
    worst, equal = 0.0, 0
    for n, g, w in zip(SHORT, short_got, short_want, strict=True):  # the FP8 grouped GEMV
        assert g.shape == w.shape == (n, VOCAB)
        diff = float(np.abs(g - w).max())
        assert diff <= TOL, f"a {n}-token prompt in a {sum(SHORT)}-row prefill differs by {diff}"
        worst, equal = max(worst, diff), equal + int((g == w).sum())
    share = equal / sum(g.size for g in short_got)
    print(f"DeepSeek-V3 stored experts: long prefills bit-equal; {sum(SHORT)}-row prefill max |GEMV - dequantized| "
          f"{worst:.4f} ({share:.1%} bit-equal)")  # fmt: skip


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_deepseek_v3_stored_experts_greedy_tokens_are_the_dequantizing_loads_up_to_near_ties(  # type: ignore[no-untyped-def]
    deepseek_v3_blocks, monkeypatch, graph
) -> None:
    fp8, _, _ = deepseek_v3_blocks
    ps = prompts(DECODE[0], VOCAB)
    monkeypatch.setattr(ModelRunner, "fp8_experts_as_stored", True)
    with DeepSeekEngine(fp8, max_batch=4, page_size=16, cuda_graph=graph) as engine:
        assert engine.family.experts_stored
        tokens = engine.generate(ps, DECODE[1], eos_token_ids=()).tokens
    assert [len(t) for t in tokens] == DECODE[1]
    # the dequantizing load's logits over the stored engine's sequences (prefills of more than 4 rows)
    forced = _deepseek_runs(
        fp8, monkeypatch, False, lambda e: e.prefill_logits([p + t[:-1] for p, t in zip(ps, tokens, strict=True)])
    )
    exact = _near_ties(ps, tokens, forced)
    print(
        f"DeepSeek-V3 stored experts, {'graph' if graph else 'eager'}: {exact}/{sum(DECODE[1])} tokens the "
        f"dequantizing load's argmax"
    )

"""gpt-oss served from an MXFP4 checkpoint (fi_engine.models.gpt_oss, fi_engine.checkpoint.mxfp4_weights), on a GPU
(FI_FFI_RUN_GPU_TESTS=1; CuPy and the model-family kernel wheel; the transformers check also needs torch and
transformers).

A random small gpt-oss (tests/helpers/mxfp4_checkpoints.py: 4 layers, sliding and full alternating, 16-token
windows, hidden 512, 8 query / 2 KV heads of 64, 8 experts of intermediate 256 top-2, YaRN, random biases and sinks,
gate/up values past the SwiGLU clamp) is written twice with numpy: its experts in MXFP4, packed as the published
checkpoints store them (``*_blocks`` / ``*_scales``, ``quantization_config`` ``mxfp4``), and the same weights as a
bfloat16 checkpoint (the MXFP4 values, exact in bfloat16, in transformers' bfloat16 layout). The engine dequantizes
the first while reading it where its experts are not kept as stored (``GptOss.mxfp4_as_stored = False``), so both
put the same bfloat16 weights in the same layout on the GPU, and the same kernels, plans and routing run on them.
Hence tolerance 0:

- prefill logits of every prompt position bitwise equal (two prefill batches, routed experts), and with the dense
  path over the experts forced (``moe_path="dense"``, every prompt row in one step);
- greedy decode, eager and as CUDA graphs: the same tokens for every prompt (decode steps take the dense path from
  4 rows, the routed one below);
- transformers reads the two directories as one model: ``from_pretrained`` of the MXFP4 one with
  ``Mxfp4Config(dequantize=True)`` (its own dequantization) and of the bfloat16 one give equal parameters, every one
  (so the files are packed as transformers reads the published ones, and the bfloat16 copy is what it makes of them).

Kept as stored (the default: MXFP4 codes and scales on the GPU, the MXFP4 grouped GEMV at decode, a bfloat16 copy of
a layer's experts for long prefills):

- the experts take 0.53 bytes a weight on the GPU, and long prefills (the host path over the copy) give the bfloat16
  checkpoint's logits bit for bit;
- steps of at most ``max_batch`` rows (the GEMV) give logits within 0.16 of the bfloat16 engine's (twice the
  bfloat16 model tests' tolerance against float32, ``helpers.yardstick.LOGIT_TOL``: both engines err by up to that)
  at 3 in 4 positions and more, the others where a routing near tie picked another expert (the test's docstring);
- greedy decode, eager and as CUDA graphs: each token the bfloat16 engine's best choice on the same sequence, up to
  a near tie of 0.16 (teacher forcing).

Run on the GPU machine: ``bash tools/gpu_run.sh python3 -m pytest -q -s tests/engine/test_gpu_mxfp4.py`` (the
model-family kernel wheel staged in ``.gpu/kernels`` beside the core one).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy (python -m pip install '.[engine]')")

from helpers.gpu import TORCH_MISSING  # noqa: E402
from helpers.mxfp4_checkpoints import GptOssShape, write_gpt_oss_pair  # noqa: E402
from helpers.yardstick import prompts  # noqa: E402

from fi_engine.models.gpt_oss import GptOss  # noqa: E402
from fi_engine.models.registry import open_engine  # noqa: E402

pytestmark = pytest.mark.gpu

SHAPE = GptOssShape()
PROMPT_LENS = (3, 16, 29, 50)
MAX_NEW = (33, 20, 33, 9)
KINDS = ("mxfp4", "bf16")


NEAR = 0.16  # two engines' bfloat16 errors (helpers.yardstick.LOGIT_TOL["bfloat16"] each)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, models_modules):  # type: ignore[no-untyped-def]
    return dict(zip(KINDS, write_gpt_oss_pair(tmp_path_factory.mktemp("gpt_oss_mxfp4"), SHAPE, seed=0), strict=True))


@pytest.fixture
def dequantized():  # type: ignore[no-untyped-def]
    """The MXFP4 experts dequantized to bfloat16 at load, as the fallback serves them."""
    stored, GptOss.mxfp4_as_stored = GptOss.mxfp4_as_stored, False
    yield
    GptOss.mxfp4_as_stored = stored


@pytest.mark.parametrize(("moe_path", "max_batch"), [("auto", 4), ("dense", 128)])
def test_prefill_logits_are_the_bf16_checkpoints_bit_for_bit(pair, moe_path, max_batch, dequantized) -> None:  # type: ignore[no-untyped-def]
    ps = prompts((1, 7, 16, 33, 50), SHAPE.vocab)
    got = {}
    for kind in KINDS:
        start = time.perf_counter()
        with open_engine(pair[kind], max_batch=max_batch, page_size=16, moe_path=moe_path) as engine:
            assert type(engine).__name__ == "GptOssEngine"
            loaded = time.perf_counter() - start
            got[kind] = engine.prefill_logits(ps)
        print(f"{kind}: engine made in {loaded:.1f} s")
    for p, a, b in zip(ps, got["mxfp4"], got["bf16"], strict=True):
        assert a.shape == b.shape == (len(p), SHAPE.vocab)
        assert np.isfinite(a).all() and float(a.std()) > 0.1  # a model whose logits say something
        diff = float(np.abs(a - b).max())
        assert np.array_equal(a, b), f"prompt of {len(p)}: MXFP4 and bfloat16 logits differ by up to {diff:.3g}"
    argmax = np.concatenate([g.argmax(1) for g in got["bf16"]])
    print(f"moe_path={moe_path}: {argmax.size} positions equal, {len(set(argmax.tolist()))} distinct argmax tokens")


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_greedy_decode_gives_the_bf16_checkpoints_tokens(pair, graph, dequantized) -> None:  # type: ignore[no-untyped-def]
    ps = prompts(PROMPT_LENS, SHAPE.vocab)
    tokens = {}
    for kind in KINDS:
        with open_engine(pair[kind], max_batch=8, page_size=16, cuda_graph=graph) as engine:  # 8 slots: padded rows
            r = engine.generate(ps, list(MAX_NEW), eos_token_ids=())
        assert [len(t) for t in r.tokens] == list(MAX_NEW)
        assert r.decode_steps == max(MAX_NEW) - 1
        tokens[kind] = r.tokens
        print(f"{kind} {'graph' if graph else 'eager'}: {r.tokens_per_s:.0f} tokens/s")
    assert tokens["mxfp4"] == tokens["bf16"]
    assert len({t for seq in tokens["bf16"] for t in seq}) > 10  # not one token repeated


def test_transformers_reads_the_mxfp4_files_as_the_bf16_ones(pair) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch", reason=TORCH_MISSING)
    transformers = pytest.importorskip("transformers", reason="the check needs transformers (fi-ffi[gpu-tests])")
    if not hasattr(transformers, "Mxfp4Config") or not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Mxfp4Config / GptOssForCausalLM")
    dequantize = transformers.Mxfp4Config(dequantize=True)
    mx = transformers.GptOssForCausalLM.from_pretrained(
        pair["mxfp4"], torch_dtype=torch.bfloat16, quantization_config=dequantize
    ).state_dict()
    bf = transformers.GptOssForCausalLM.from_pretrained(pair["bf16"], torch_dtype=torch.bfloat16).state_dict()
    assert mx.keys() == bf.keys()
    experts = [k for k in bf if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 2 * SHAPE.layers, sorted(bf)
    for k in bf:
        a, b = mx[k].detach().cpu().double(), bf[k].detach().cpu().double()
        assert a.shape == b.shape and torch.equal(a, b), f"{k}: transformers' dequantization differs"
    print(f"transformers {transformers.__version__}: {len(bf)} parameters equal, {len(experts)} of them experts")


def test_stored_experts_take_mxfp4_bytes_and_long_prefills_are_bit_for_bit(pair) -> None:  # type: ignore[no-untyped-def]
    ps = prompts((7, 16, 33, 50), SHAPE.vocab)  # 106 rows in a step: the host path, over the bfloat16 copy
    with open_engine(pair["mxfp4"], max_batch=4, page_size=16) as engine:
        assert engine.family.experts_stored
        layers = engine.runner.moe_layers
        mx = [layer.mxfp4_experts for layer in layers]
        assert all(m is not None for m in mx)
        weights = SHAPE.layers * SHAPE.experts * 3 * SHAPE.hidden * SHAPE.intermediate
        per_weight = sum(m.nbytes() for m in mx) / weights
        assert per_weight < 0.6, per_weight  # 0.5 a code, 1/64 the scales, the padding of k to 128
        got = engine.prefill_logits(ps)
    with open_engine(pair["bf16"], max_batch=4, page_size=16) as engine:
        want = engine.prefill_logits(ps)
    for p, a, b in zip(ps, got, want, strict=True):
        assert np.array_equal(a, b), f"prompt of {len(p)}: differs by up to {float(np.abs(a - b).max()):.3g}"
    print(f"MXFP4 experts as stored: {per_weight:.3f} bytes a weight")


def test_stored_experts_short_steps_are_the_bf16_engines_up_to_routing_ties(pair) -> None:  # type: ignore[no-untyped-def]
    """Steps of 1-4 rows (the grouped GEMV) against the bfloat16 engine's (its host or dense path): the two differ by
    bfloat16 rounding, and where a token's router logits nearly tie, that rounding can pick another expert in one
    layer, which moves the position's logits by about 1 (measured on an H100: 1.03 at one of 10 positions). So: the
    median position within 0.05, at least 3 in 4 within NEAR, and at those the argmax the bfloat16 engine's best up to
    NEAR (at the flipped one the argmax moved too: 0.62 below the best, on an H100)."""
    ps = prompts((1, 2, 3, 4), SHAPE.vocab, seed=3)
    got, want = [], []
    for kind, out in (("mxfp4", got), ("bf16", want)):
        with open_engine(pair[kind], max_batch=4, page_size=16) as engine:
            for p in ps:  # one prompt a step: at most 4 rows, the grouped GEMV's (the device path)
                out.append(engine.prefill_logits([p])[0])
    worst = np.concatenate([np.abs(a - b).max(axis=1) for a, b in zip(got, want, strict=True)])  # per position
    close = worst <= NEAR
    assert np.median(worst) <= 0.05 and close.mean() >= 0.75, worst
    a, b = np.concatenate(got), np.concatenate(want)  # where no expert flipped: the argmax the bfloat16 one's best
    assert (b.max(axis=1) - b[np.arange(len(b)), a.argmax(axis=1)] <= NEAR)[close].all()
    assert all(float(b.std()) > 0.1 for b in want)
    print(f"MXFP4 GEMV steps: |logit - bfloat16 engine's| per position, median {np.median(worst):.4f}, max "
          f"{worst.max():.4f}")  # fmt: skip


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_stored_experts_greedy_decode_is_the_bf16_engines_choice(pair, graph) -> None:  # type: ignore[no-untyped-def]
    ps = prompts(PROMPT_LENS, SHAPE.vocab)
    with open_engine(pair["mxfp4"], max_batch=8, page_size=16, cuda_graph=graph) as engine:
        r = engine.generate(ps, list(MAX_NEW), eos_token_ids=())
    assert [len(t) for t in r.tokens] == list(MAX_NEW)
    exact = total = 0
    with open_engine(pair["bf16"], max_batch=8, page_size=16) as engine:
        for p, t in zip(ps, r.tokens, strict=True):
            lg = engine.prefill_logits([p + t[:-1]])[0][len(p) - 1 :]
            best = lg.max(axis=1)
            chosen = lg[np.arange(len(t)), t]
            assert (best - chosen <= NEAR).all(), (len(p), float((best - chosen).max()))
            exact += int((lg.argmax(1) == np.asarray(t)).sum())
            total += len(t)
    assert len({x for seq in r.tokens for x in seq}) > 10
    print(f"MXFP4 as stored, {'graph' if graph else 'eager'}: {exact}/{total} tokens the bfloat16 engine's argmax, "
          f"{r.tokens_per_s:.0f} tokens/s")  # fmt: skip

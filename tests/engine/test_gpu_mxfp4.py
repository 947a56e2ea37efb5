"""gpt-oss served from an MXFP4 checkpoint (fi_engine.models.gpt_oss, fi_engine.checkpoint.mxfp4_weights), on a GPU
(FI_FFI_RUN_GPU_TESTS=1; CuPy and the model-family kernel wheel; the transformers check also needs torch and
transformers).

A random small gpt-oss (tests/helpers/mxfp4_checkpoints.py: 4 layers, sliding and full alternating, 16-token
windows, hidden 512, 8 query / 2 KV heads of 64, 8 experts of intermediate 256 top-2, YaRN, random biases and sinks,
gate/up values past the SwiGLU clamp) is written twice with numpy: its experts in MXFP4, packed as the published
checkpoints store them (``*_blocks`` / ``*_scales``, ``quantization_config`` ``mxfp4``), and the same weights as a
bfloat16 checkpoint (the MXFP4 values, exact in bfloat16, in transformers' bfloat16 layout). The engine dequantizes
the first while reading it, so both put the same bfloat16 weights in the same layout on the GPU, and the same kernels,
plans and routing run on them. Hence tolerance 0:

- prefill logits of every prompt position bitwise equal (two prefill batches, routed experts), and with the dense
  path over the experts forced (``moe_path="dense"``, every prompt row in one step);
- greedy decode, eager and as CUDA graphs: the same tokens for every prompt (decode steps take the dense path from
  4 rows, the routed one below);
- transformers reads the two directories as one model: ``from_pretrained`` of the MXFP4 one with
  ``Mxfp4Config(dequantize=True)`` (its own dequantization) and of the bfloat16 one give equal parameters, every one
  (so the files are packed as transformers reads the published ones, and the bfloat16 copy is what it makes of them).

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

from fi_engine.models.registry import open_engine  # noqa: E402

pytestmark = pytest.mark.gpu

SHAPE = GptOssShape()
PROMPT_LENS = (3, 16, 29, 50)
MAX_NEW = (33, 20, 33, 9)
KINDS = ("mxfp4", "bf16")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, models_modules):  # type: ignore[no-untyped-def]
    return dict(zip(KINDS, write_gpt_oss_pair(tmp_path_factory.mktemp("gpt_oss_mxfp4"), SHAPE, seed=0), strict=True))


@pytest.mark.parametrize(("moe_path", "max_batch"), [("auto", 4), ("dense", 128)])
def test_prefill_logits_are_the_bf16_checkpoints_bit_for_bit(pair, moe_path, max_batch) -> None:  # type: ignore[no-untyped-def]
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
def test_greedy_decode_gives_the_bf16_checkpoints_tokens(pair, graph) -> None:  # type: ignore[no-untyped-def]
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

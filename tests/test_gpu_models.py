"""The engine on today's model families against transformers, on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy,
transformers; the MoE models also need the model-family kernel wheel staged beside the core one).

Random small Qwen3 (dense, q/k RMSNorm), Mixtral (8 experts, top-2) and Qwen3-MoE (16 experts, top-4,
``norm_topk_prob`` off and on) checkpoints are built with transformers' own config and model classes (2 layers,
hidden 512, 8 query / 4 KV heads, head_dim 64, vocab 4096), saved with ``save_pretrained`` and loaded into the
engine; the reference is the same transformers model in float32 on the saved (rounded) weights, as in
tests/test_gpu_llama.py, whose helpers and tolerances this reuses: prefill logits of every position within 0.02
(float16) / 0.08 (bfloat16); greedy decode (32 steps) token by token against the reference (teacher forcing,
near ties allowed), eager and as a CUDA graph (MoE models: host routing eagerly, the fixed-capacity device path
in the graph).

A near tie in the router (two experts' logits within the rounding of float16/bfloat16) may send a token to the
other expert in one of the two computations; with random weights and these sizes it does not happen in practice,
and the logit tolerances would show it if it did.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy (pip install 'fi-ffi[llama]')")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the reference needs transformers (fi-ffi[gpu-tests])")

from test_gpu_llama import TOL, check_greedy, reference_logits  # noqa: E402

from fi_ffi.models.llama import LlamaEngine  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 4096
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "qwen3-bf16": ("Qwen3Config", "Qwen3ForCausalLM", "bfloat16", dict(intermediate_size=1024)),
    "qwen3-f16-tied": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        "float16",
        dict(intermediate_size=1024, tie_word_embeddings=True),
    ),
    "mixtral-bf16": (
        "MixtralConfig",
        "MixtralForCausalLM",
        "bfloat16",
        dict(intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
    ),
    "qwen3moe-f16-norm": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        "float16",
        dict(
            intermediate_size=1024,
            moe_intermediate_size=256,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    "qwen3moe-bf16": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        "bfloat16",
        dict(
            intermediate_size=1024,
            moe_intermediate_size=256,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
}
PROMPT_LENS = (3, 16, 29, 50)
MAX_NEW = (33, 20, 33, 9)


def build(tmp_path, config_cls: str, model_cls: str, dtype: str, extra: dict):  # type: ignore[no-untyped-def]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"this transformers has no {config_cls}")
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # random norm weights (q_norm / k_norm included): a skipped one shows
                p.normal_(1.0, 0.1)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(tmp_path)
    ref = copy.deepcopy(model).float().cuda().eval()
    return tmp_path, ref


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    config_cls, model_cls, dtype, extra = FAMILIES[request.param]
    if "moe" in request.param or "mixtral" in request.param:
        request.getfixturevalue("models_modules")  # the grouped GEMM module: skips naming the wheel without it
    path, ref = build(tmp_path_factory.mktemp(request.param), config_cls, model_cls, dtype, extra)
    yield request.param, path, ref, dtype
    del ref
    torch.cuda.empty_cache()


def prompts(lens, seed=1):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in lens]


def test_prefill_logits_match_transformers(family) -> None:  # type: ignore[no-untyped-def]
    name, path, ref, dtype = family
    ps = prompts((1, 7, 16, 33, 50))
    with LlamaEngine(path, max_batch=4, page_size=16) as engine:
        assert engine.config.model_type == name.split("-")[0].replace("qwen3moe", "qwen3_moe")
        got = engine.prefill_logits(ps)
    for i, (p, g) in enumerate(zip(ps, got, strict=True)):
        want = reference_logits(ref, p)
        assert g.shape == want.shape == (len(p), VOCAB)
        err = float(np.abs(g - want).max())
        assert err <= TOL[dtype], f"{name} prompt {i} ({len(p)} tokens): max |logit error| {err:.4f} > {TOL[dtype]}"


def test_greedy_decode_matches_transformers(family) -> None:  # type: ignore[no-untyped-def]
    name, path, ref, dtype = family
    ps = prompts(PROMPT_LENS)
    for graph in (False, True):
        with LlamaEngine(path, max_batch=8, page_size=16, cuda_graph=graph) as engine:
            r = engine.generate(ps, list(MAX_NEW), eos_token_ids=())
        assert [len(t) for t in r.tokens] == list(MAX_NEW)
        exact = check_greedy(ref, ps, r.tokens, TOL[dtype])
        print(f"{name} {'graph' if graph else 'eager'}: {exact}/{sum(MAX_NEW)} equal to the reference's argmax, "
              f"{r.tokens_per_s:.0f} tokens/s")  # fmt: skip

"""Gemma 2, gpt-oss and DeepSeek-V3 / V2 under tensor parallelism 2 (and 4 where there are GPUs) against one GPU
(FI_FFI_RUN_GPU_TESTS=1; CuPy, torch + transformers to write the checkpoints, the comm and model-family wheels;
DeepSeek also the ext wheel's bfloat16 MLA modules).

Random small checkpoints built with transformers' own classes and ``save_pretrained`` in bfloat16, with a vocabulary
of 4099 tokens (no tensor-parallel size divides it: the last rank's shard is padded):

- Gemma 2: 2 layers (sliding, global), hidden 512, 4 query / 2 KV heads of 256, a 16-token window (the prompts run
  past it), attention soft cap 5 and a final soft cap of 5 (logits of a few units: the cap bends them, so a cap
  applied to the wrong values or not at all on the vocabulary shards shows), random Gemma norm weights, tied
  embeddings (the scaled embedding and the LM head both vocabulary-parallel);
- gpt-oss: 2 layers (sliding, full), hidden 512, 8 query / 2 KV heads of 64, 4 experts top-2 (intermediate 192,
  96 per rank at TP 2), random attention and expert biases and sinks (so a bias added on every rank, or a sink on
  the wrong head, shows), gate/up values past the SwiGLU clamp for some tokens, a router whose logits are spread
  wide enough that rounding rarely swaps an expert;
- DeepSeek-V3 and V2 (tests/helpers/hf_configs.py ``DEEPSEEK_RANDOM``): 3 layers (one dense MLP of 1024, two MoE
  layers of 8 experts of 256, top-2), 16 MLA heads (8 a rank at TP 2, 4 at TP 4; nope 32, rope 64, v 32, latent
  512), V3 with ``q_lora_rank`` 128, sigmoid ``noaux_tc`` routing in 2 groups with a random correction bias and one
  shared expert; V2 V2-Lite-shaped (a full ``q_proj``, softmax greedy routing, not renormalized, two shared
  experts); random norms (the latents' too) and a router spread wide.

tests/helpers/llama_tp_worker.py runs greedy generation and prefill logits on one GPU, then as N ranks under ``fi-ffi
launch``: eager with top-k 1 sampling (the gathered, soft-capped logits), CUDA graph with the fused all-reduce, and CUDA
graph with NCCL's all-reduce (Gemma 2's plain all-reduce in place). The yardstick is transformers' own bfloat16 error:
these fixtures' logits are several units wide (soft caps of 5, gpt-oss's biases and wide embeddings), past the 0.08 that
fits the Llama tests' logits of about 0.6, so each family is held to the float32 reference of transformers on the saved
weights instead (``helpers.tp_runs.check_against_float32``): TP N's prefill logits at most 1.25x as far from it as one
GPU's or as transformers in bfloat16 (the larger), at the worst position and at the median one; every greedy token of TP
N the float32 reference's choice under teacher forcing up to twice that bound (a near tie either may break: the chosen
token's error and the best one's; ``helpers.yardstick.check_greedy``); and the ``top_k=1`` tokens equal to the same
run's greedy tokens. For DeepSeek a token past that bound also passes, once a prompt, where a flipped expert choice
explains it (``helpers.routing_ties``): for each MoE decision of the float32 reference at that position within twice
transformers' own bfloat16 error of the router scores (the group kept, or the k-th expert against the k+1-th), the
reference is rerun with that one decision flipped at that one position and layer, and the token must be within the same
tolerance of that flipped reference's best logit. A flipped group or expert moves the logits by a step no logit bound
covers (a V3 position whose two groups scored 0.0038 apart gave a token 0.12 below the best in a TP 2 run of the experts
split by expert; with that group flipped the reference's best is that token). transformers runs its eager attention (its
SDPA path drops Gemma 2's attention soft cap). DeepSeek runs twice: its routed experts split by intermediate columns
(the default) and by expert (``expert_split="experts"``: 4 whole experts a rank at TP 2, 2 at TP 4), held to the same
bounds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.checkpoints import float32_reference, randomize_norms, rope_kwargs
from helpers.hf_configs import DEEPSEEK_RANDOM, DEEPSEEK_RANDOM_V2, DEEPSEEK_RANDOM_V3
from helpers.llama_tp_worker import prompts
from helpers.routing_ties import RoutingTies
from helpers.subprocess_run import gpu_count, multicast_off
from helpers.tp_runs import VOCAB, _env, _run, check_against_float32, logit_errors
from helpers.yardstick import check_greedy, reference_logits

multicast_off()

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

pytestmark = pytest.mark.gpu


def _gemma2(transformers, torch):  # type: ignore[no-untyped-def]
    kw = dict(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=256, query_pre_attn_scalar=128, sliding_window=16,
        attn_logit_softcapping=5.0, final_logit_softcapping=5.0, max_position_embeddings=4096,
        initializer_range=0.05, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    kw.update(rope_kwargs(transformers.Gemma2Config, 10000.0, None))
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's (1 + w)
                p.normal_(0.0, 0.3)
    return model


def _gpt_oss(transformers, torch):  # type: ignore[no-untyped-def]
    yarn = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 64}  # fmt: skip
    kw = dict(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, swiglu_limit=7.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    kw.update(rope_kwargs(transformers.GptOssConfig, 150000.0, yarn))
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith(("bias", "sinks")):  # transformers initializes some to 0: make each one count
                p.normal_(0.0, 0.5)
            elif name.endswith("gate_up_proj"):  # gate/up values beyond the clamp (7) for some tokens
                p.normal_(0.0, 0.15)
            elif name.endswith("router.weight"):  # wide router logits: few near-ties between experts
                p.normal_(0.0, 0.2)
            elif name.endswith("down_proj") or "self_attn" in name:
                p.normal_(0.0, 0.03)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.normal_(0.0, 0.1)
    return model


def _deepseek(config_cls: str, model_cls: str, extra: dict):  # type: ignore[no-untyped-def]
    """A maker of a random DeepSeek checkpoint of ``transformers.<config_cls>`` (module docstring)."""

    def make(transformers, torch):  # type: ignore[no-untyped-def]
        cls = getattr(transformers, config_cls)
        kw = {**DEEPSEEK_RANDOM, "vocab_size": VOCAB, **extra, **rope_kwargs(cls, 10000.0, None)}
        model = getattr(transformers, model_cls)(cls(**kw))
        randomize_norms(model)  # q_a, kv_a included
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):  # a bias that matters to the choice
                    buf.normal_(0.0, 0.05)
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):  # wide router logits: few near-ties between experts
                    p.normal_(0.0, 0.2)
        return model

    return make


FAMILIES = {
    "gemma2": ("Gemma2Config", _gemma2),
    "gpt_oss": ("GptOssConfig", _gpt_oss),
    "deepseek_v3": ("DeepseekV3Config", _deepseek("DeepseekV3Config", "DeepseekV3ForCausalLM", DEEPSEEK_RANDOM_V3)),
    "deepseek_v2": ("DeepseekV2Config", _deepseek("DeepseekV2Config", "DeepseekV2ForCausalLM", DEEPSEEK_RANDOM_V2)),
}


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    pytest.importorskip("cupy", reason="the engine needs CuPy")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, make = FAMILIES[request.param]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"this transformers has no {config_cls}")
    tmp = tmp_path_factory.mktemp(request.param)
    env = _env(tmp)
    torch.manual_seed(0)
    model = tmp / "model"
    hf16 = make(transformers, torch).to(torch.bfloat16)
    hf16.save_pretrained(model)
    ref32 = float32_reference(hf16)
    ps = prompts(VOCAB)
    refs = [reference_logits(ref32, p) for p in ps[:2]]  # the worker's prefill logits are of its first two prompts
    hf16 = hf16.cuda().eval()
    yardstick = logit_errors([reference_logits(hf16, p) for p in ps[:2]], refs)  # transformers' own bf16 error
    routing = RoutingTies(ref32, hf16, ps) if request.param.startswith("deepseek") else None
    one = _run(env, model, tmp / "tp1.npz", 1)
    return request.param, model, env, (one, ref32, refs, yardstick, routing)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("mode", ["eager", "graph", "graph-nccl"])
def test_family_tensor_parallel_matches_one_gpu(family: tuple, tmp_path: Path, n: int, mode: str) -> None:
    _check_tensor_parallel(family, tmp_path, n, mode)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("mode", ["eager", "graph", "graph-nccl"])
def test_deepseek_split_by_expert_matches_one_gpu(family: tuple, tmp_path: Path, n: int, mode: str) -> None:
    if not family[0].startswith("deepseek"):
        pytest.skip("the expert split is DeepSeek's (expert_split)")
    _check_tensor_parallel(family, tmp_path, n, mode, by_expert=True)


def _check_tensor_parallel(family: tuple, tmp_path: Path, n: int, mode: str, by_expert: bool = False) -> None:
    """TP ``n`` in ``mode`` against the float32 reference, one GPU and transformers' bfloat16 (module docstring)."""
    if gpu_count() < n:
        pytest.skip(f"needs {n} GPUs, found {gpu_count()}")
    name, model, env, (one, ref32, refs, yardstick, routing) = family
    flags = {"eager": ["--topk1"], "graph": ["--graph", "--topk1"], "graph-nccl": ["--graph", "--nccl"]}
    got = _run(env, model, tmp_path / "out.npz", n, *flags[mode], *(["--expert-split"] if by_expert else []))
    assert int(got["tp"]) == n and bool(got["vocab_shard"])
    assert bool(got["fused"]) == (mode != "graph-nccl")
    assert int(got["expert_parts"]) == (n if by_expert else 1)
    what = f"{name} tp {n} {mode}{' by expert' if by_expert else ''}"
    bound = check_against_float32(got, one, refs, yardstick, what)
    # a token is the float32 reference's choice up to two errors within the bound (the chosen logit's and the best's)
    exact = check_greedy(ref32, prompts(VOCAB), got["tokens"].tolist(), 2 * bound, routing)
    same = [a == b for a, b in zip(got["tokens"].tolist(), one["tokens"].tolist(), strict=True)]
    print(f"{what}: {exact} greedy tokens the float32 argmax, prompts equal to one GPU's {same}")
    assert got["tokens_topk1"].tolist() == got["tokens"].tolist()  # top_k=1 sampling over gathered logits

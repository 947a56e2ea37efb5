"""The Llama engine serving FP8 (e4m3) checkpoints, on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy, torch, transformers).

A random bfloat16 Llama (transformers' own classes: 2 layers, hidden 1024, 16 query / 4 KV heads of 128, MLP
2816, vocab 32000) has its seven projections per layer quantized to e4m3 in each published layout
(tests/helpers/fp8_checkpoints.py: per tensor, per channel, per 128x128 block). The reference is transformers in
**float32** on exactly the dequantized weights the checkpoint stands for; transformers in bfloat16 on the same
weights (rounded to bfloat16) gives the yardstick of bfloat16 arithmetic's own error:

- prefill logits, W8A16 (``QuantizedWeights.fp8_w8a8`` off: 16-bit activations, weights exact in float32): max |engine -
  reference| <= 1.5 x transformers-bfloat16's max |error| on the same prompts;
- prefill logits, W8A8 (the default for steps of more than 8 rows: activations rounded to e4m3 per row or per 128
  columns before cuBLASLt's FP8 GEMM): <= 16 x transformers-bfloat16's error -- e4m3 keeps 3 mantissa bits where
  bfloat16 keeps 7, so each GEMM input is rounded 16x coarser (the bound the FP8 KV cache's check uses too);
- greedy decoding, eager and as a CUDA graph, 4 rows and 1 (prefill of more rows: W8A8 unless said), with the fused
  decode step over FP8 weights as the engine runs it (``QuantizedWeights.fp8_epilogues``: SiLU and RoPE with the KV
  append in the GEMVs' epilogues), as separate launches, and with the norms as the GEMVs' prologues
  (``QuantizedWeights.fp8_fused``), W8A16 throughout, and W8A8 throughout (``QuantizedWeights.fp8_gemv_max_rows`` 0: the
  decode steps through the FP8 GEMM too): every token the reference's argmax or within ``LOGIT_TOL["bfloat16"]`` of it
  (x 16 where W8A8 served, as above) under teacher forcing, and eager and graph agree up to the first near tie;
- one row, the epilogue step (its norms as launches of their own: ``QuantizedWeights.norm_in_gemv`` off; folded,
  tests/engine/test_gpu_norm_fold.py) against the separate launches: the same tokens, and every step's logits within
  1e-3 of their largest magnitude (the epilogues repeat the separate kernels' arithmetic on the same GEMV sums; only
  the LM head's sums may run in another order), the bitwise share printed; also with an e4m3 KV cache and for a Qwen3
  (per-head norms), where RoPE and the append stay separate launches.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.gpu import engine_against_transformers

cp, torch, transformers = engine_against_transformers()

from helpers.checkpoints import float32_reference, rope_kwargs, save_random  # noqa: E402
from helpers.fp8_checkpoints import write_fp8_copy  # noqa: E402
from helpers.yardstick import LOGIT_TOL, check_eager_matches_graph, check_greedy, prompts, reference_logits  # noqa: E402

from fi_engine.models.llama import LlamaEngine  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 32000
TOL = LOGIT_TOL["bfloat16"]
SHAPE = dict(  # the random checkpoints' shapes (a Llama's, a Qwen3's)
    vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
    num_key_value_heads=4, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("bf16")
    kw = {**SHAPE, "rms_norm_eps": 1e-5, **rope_kwargs(transformers.LlamaConfig, 500000.0, None)}
    return path, save_random(path, "LlamaConfig", "LlamaForCausalLM", "bfloat16", kw)


@pytest.fixture(scope="module", params=["tensor", "channel", "block"])
def fp8_variant(request, bf16_model, tmp_path_factory):  # type: ignore[no-untyped-def]
    src, model = bf16_model
    dst = tmp_path_factory.mktemp(f"fp8-{request.param}")
    dequantized = write_fp8_copy(src, dst, request.param)
    ref = float32_reference(model)
    with torch.no_grad():
        for name, w in dequantized.items():
            ref.get_parameter(name).copy_(torch.from_numpy(w))
    bf16 = float32_reference(ref).to(torch.bfloat16)  # the same weights, rounded, computed in bfloat16
    yield dst, ref, bf16
    del ref, bf16
    torch.cuda.empty_cache()


@pytest.mark.parametrize("w8a8", [False, True], ids=["w8a16", "w8a8"])
def test_prefill_logits_within_transformers_bfloat16s_own_error(fp8_variant, w8a8, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from fi_engine.kernels.quantized_weights import QuantizedWeights

    monkeypatch.setattr(QuantizedWeights, "fp8_w8a8", w8a8)
    monkeypatch.setattr(QuantizedWeights, "fp8_w8a8_blocks", w8a8)  # block scales too
    factor = 16.0 if w8a8 else 1.5
    path, ref, bf16 = fp8_variant
    ps = prompts((1, 7, 16, 33, 50), VOCAB)
    with LlamaEngine(path, max_batch=4, page_size=16) as engine:
        assert engine.runner.dense.quantized.serves_fp8
        got = engine.prefill_logits(ps)
    ours = theirs = 0.0
    for p, g in zip(ps, got, strict=True):
        want = reference_logits(ref, p)
        ours = max(ours, float(np.abs(g - want).max()))
        theirs = max(theirs, float(np.abs(reference_logits(bf16, p) - want).max()))
    print(f"max |logit error| ({'W8A8' if w8a8 else 'W8A16'}): engine {ours:.4f}, transformers bfloat16 {theirs:.4f}")
    assert ours <= factor * theirs, f"engine {ours:.4f} > {factor} x transformers-bfloat16's {theirs:.4f}"


@pytest.mark.parametrize(
    ("step", "w8a8"),
    [("epilogues", False), ("separate", False), ("prologues", False), ("epilogues", True)],
    ids=["epilogues", "separate", "prologues", "w8a8"],
)
def test_greedy_decode_eager_and_graph_match_the_reference(fp8_variant, step, w8a8, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from fi_engine.kernels.quantized_weights import QuantizedWeights

    monkeypatch.setattr(QuantizedWeights, "fp8_fused", step == "prologues")
    monkeypatch.setattr(QuantizedWeights, "fp8_epilogues", step == "epilogues")
    fused = step != "separate"
    monkeypatch.setattr(QuantizedWeights, "fp8_w8a8", w8a8)
    monkeypatch.setattr(QuantizedWeights, "fp8_w8a8_blocks", w8a8)
    if w8a8:  # the decode steps of 4 rows and 1 row through the FP8 GEMM too (eager and captured)
        monkeypatch.setattr(QuantizedWeights, "fp8_gemv_max_rows", 0)
    tol = TOL * (16 if w8a8 else 1)
    path, ref, _ = fp8_variant
    for lens, new in (((5, 16, 29, 50), [17, 12, 17, 9]), ((11,), [24])):  # 4 rows; 1 row (the fused graph step)
        ps = prompts(lens, VOCAB)
        results = {}
        for graph in (False, True):
            with LlamaEngine(path, max_batch=len(ps), page_size=16, cuda_graph=graph) as engine:
                assert engine.runner.fuses(len(ps)) == fused
                results[graph] = r = engine.generate(ps, new, eos_token_ids=())
            assert [len(t) for t in r.tokens] == new
            exact = check_greedy(ref, ps, r.tokens, tol)
            print(f"{len(ps)} rows, {'graph' if graph else 'eager'}: {exact}/{sum(new)} tokens the reference's argmax")
        check_eager_matches_graph(ref, ps, results[False].tokens, results[True].tokens, tol)


def compare_epilogue_step(path, monkeypatch, lens=(11,), **engine_kw) -> None:  # type: ignore[no-untyped-def]
    """Greedy decode (prompts of ``lens`` tokens) with the FP8 epilogue step and with the separate launches: the same
    tokens, and every step's logits within 1e-3 of their largest magnitude (only the LM head may sum in another
    order: the fused GEMV against the separate path's GEMV or cuBLASLt); the bitwise share printed."""
    from fi_engine.kernels.quantized_weights import QuantizedWeights

    ps = prompts(lens, VOCAB)
    runs = {}
    monkeypatch.setattr(QuantizedWeights, "norm_in_gemv", False)  # (folded, they round elsewhere: test_gpu_norm_fold)
    for epilogues in (True, False):
        monkeypatch.setattr(QuantizedWeights, "fp8_epilogues", epilogues)
        with LlamaEngine(path, max_batch=len(ps), page_size=16, **engine_kw) as engine:
            assert engine.runner.fuses(len(ps)) == epilogues
            original, logits = engine.sampler.pick, []

            def pick(v, rows, sampling, logits=logits, original=original, engine=engine):  # type: ignore[no-untyped-def]
                logits.append(engine.runner.buffers.logits[:rows].get())  # this step's logits, before the argmax
                original(v, rows, sampling)

            engine.sampler.pick = pick
            runs[epilogues] = (engine.generate(ps, [20] * len(ps), eos_token_ids=()).tokens, logits)
    assert runs[True][0] == runs[False][0]
    assert len(runs[True][1]) == len(runs[False][1]) >= 20  # the prefill's and the decode steps'
    equal = 0
    for step, (a, b) in enumerate(zip(runs[True][1], runs[False][1], strict=True)):
        worst = float(np.abs(a - b).max())
        assert worst <= 1e-3 * max(1.0, float(np.abs(b).max())), f"step {step}: max |logit difference| {worst}"
        equal += int((a == b).sum())
    print(f"epilogues vs separate: {equal / sum(a.size for a in runs[True][1]):.2%} of the logits bitwise equal")


def test_the_epilogue_step_gives_the_separate_launches_logits(fp8_variant, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    compare_epilogue_step(fp8_variant[0], monkeypatch)


def test_the_epilogue_step_with_an_fp8_kv_cache(bf16_model, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An e4m3 KV cache: the QKV GEMV's RoPE and append stay separate launches (the quantizing append), its SiLU
    epilogue is still on."""
    write_fp8_copy(bf16_model[0], tmp_path, "block")
    compare_epilogue_step(tmp_path, monkeypatch, kv_cache_dtype="fp8_e4m3")


def test_the_epilogue_step_of_qwen3(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Qwen3's per-head q/k norms come between the QKV GEMV and RoPE, so those stay separate launches in the epilogue
    step (128x128-block FP8 weights of a random Qwen3)."""
    kw = {**SHAPE, "rms_norm_eps": 1e-6, **rope_kwargs(transformers.Qwen3Config, 1000000.0, None)}
    save_random(tmp_path / "bf16", "Qwen3Config", "Qwen3ForCausalLM", "bfloat16", kw)
    write_fp8_copy(tmp_path / "bf16", tmp_path / "fp8", "block")
    compare_epilogue_step(tmp_path / "fp8", monkeypatch)

"""The OpenAI-compatible server over the real engine, on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy, torch,
transformers, and a real SmolLM2-135M-Instruct checkpoint in safetensors with its tokenizer, named by
``FI_FFI_SMOLLM2_DIR``):

- greedy chat requests served over HTTP give the text of transformers' ``generate`` + decode on the same
  checkpoint (float32 reference; the first tokens where the two agree within near ties, as the yardstick allows:
  the texts are compared over the tokens before any near tie);
- 64 concurrent streaming clients each get the tokens the engine's own ``generate`` gives their prompt;
- a client that hangs up mid-stream frees its slot: with one slot, the next request is served.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from helpers.gpu import engine_against_transformers

cp, torch, transformers = engine_against_transformers()
openai = pytest.importorskip("openai", reason="the client is the dev extra's openai package")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette", reason="the server needs the serve extra")

from helpers.serve import running  # noqa: E402

from fi_engine.models.registry import engine_class  # noqa: E402
from fi_engine.runtime.stepping import StepEngine  # noqa: E402
from fi_engine.runtime.worker.model_runner import ModelRunner  # noqa: E402
from fi_engine.serve.openai_server import build_app  # noqa: E402
from fi_engine.serve.service import GenerationService  # noqa: E402
from fi_engine.text.codec import TextCodec  # noqa: E402

pytestmark = pytest.mark.gpu

MODEL_DIR = os.environ.get("FI_FFI_SMOLLM2_DIR", "")
if not MODEL_DIR or not (Path(MODEL_DIR) / "tokenizer.json").is_file():
    pytest.skip(
        "set FI_FFI_SMOLLM2_DIR to a SmolLM2-135M-Instruct checkpoint (safetensors + tokenizer.json)",
        allow_module_level=True,
    )

NEAR_TIE = 0.25  # logits: a reference step whose two best are closer may go either way in bfloat16
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a GPU is in one sentence.",
]


def open_engine(max_batch: int, graph: bool = True, one_graph: bool = False):  # type: ignore[no-untyped-def]
    """The served engine, as ``fi-engine serve`` opens it. ``one_graph``: a single decode graph of ``max_batch`` rows
    (``decode_graph_ladder`` off), so every step runs the same GEMM shapes and a request's tokens do not depend on
    which others share its steps (with the ladder a smaller graph's GEMMs may round differently and a near tie go
    either way; test_gpu_step_api checks the ladder's tokens by teacher forcing)."""
    cls = engine_class(MODEL_DIR)
    ModelRunner.decode_graph_ladder = not one_graph  # read when the graphs are captured, in the constructor
    try:
        engine = cls(MODEL_DIR, max_batch=max_batch, cuda_graph=graph)
    finally:
        ModelRunner.decode_graph_ladder = True
    if not isinstance(engine, StepEngine):
        engine.close()
        pytest.skip(f"{type(engine).__name__} does not implement fi_engine.runtime.stepping.StepEngine yet")
    engine.overlap_steps = True  # as `fi-engine serve` steps it: each decode step left running between calls
    return engine


def test_greedy_chat_over_http_matches_transformers() -> None:
    """Each answer equals transformers' greedy text (float32) up to the reference's first near tie: a step whose
    two best logits are within NEAR_TIE (0.25), where bfloat16 arithmetic may pick either; with no near tie in
    the 32 tokens, the whole text. How many answers agree in full is printed."""
    codec = TextCodec.from_dir(MODEL_DIR)
    ref = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, torch_dtype=torch.float32).cuda().eval()
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    engine = open_engine(8)
    whole = 0
    with engine, GenerationService(engine, codec) as service, running(build_app(service, "m")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=120)
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question}]
            served = client.chat.completions.create(model="m", messages=messages, max_tokens=32, temperature=0)
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert ids[0].tolist() == codec.encode_chat(messages)  # the same prompt
            with torch.no_grad():
                out = ref.generate(
                    ids.cuda(), max_new_tokens=32, do_sample=False, output_scores=True, return_dict_in_generate=True
                )
            new = out.sequences[0, ids.shape[1] :].tolist()
            tie = len(new)
            for t, scores in enumerate(out.scores):
                top = torch.topk(scores[0].float(), 2).values
                if float(top[0] - top[1]) < NEAR_TIE:
                    tie = t
                    break
            want = tok.decode(new, skip_special_tokens=True)
            sure = tok.decode(new[:tie], skip_special_tokens=True)  # the text before the first near tie
            got = served.choices[0].message.content
            whole += got == want
            print(f"{question!r}: {'equal' if got == want else f'first near tie at token {tie}'}: {got!r}")
            assert got.startswith(sure) or (tie == len(new) and got == want), (question, got, want, tie)
    print(f"{whole}/{len(QUESTIONS)} answers equal transformers' in full")


def test_64_streaming_clients_get_the_engines_own_tokens() -> None:
    codec = TextCodec.from_dir(MODEL_DIR)
    prompts = [codec.encode_chat([{"role": "user", "content": f"Count to {i + 3}."}]) for i in range(64)]
    engine = open_engine(64, one_graph=True)  # exact equality: the same GEMM shapes at every step
    with engine:
        own = engine.generate(prompts, 24, eos_token_ids=codec.eos_token_ids).tokens
        with GenerationService(engine, codec) as service, running(build_app(service, "m")) as server:

            async def main() -> list[str]:
                client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=120)

                async def one(i: int) -> str:
                    chunks = await client.completions.create(
                        model="m", prompt=prompts[i], max_tokens=24, temperature=0, stream=True
                    )
                    return "".join([c.choices[0].text async for c in chunks])

                try:
                    return await asyncio.gather(*(one(i) for i in range(64)))
                finally:
                    await client.close()

            texts = asyncio.run(main())
    assert texts == [codec.decode(t) for t in own]


def test_a_client_killed_mid_stream_frees_its_slot() -> None:
    codec = TextCodec.from_dir(MODEL_DIR)
    engine = open_engine(1)
    with engine, GenerationService(engine, codec) as service, running(build_app(service, "m")) as server:
        body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=60)
        out = client.completions.create(
            model="m", prompt="Hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.usage.completion_tokens == 8
        assert service.metrics.finished.get("abort") == 1

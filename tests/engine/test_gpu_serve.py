"""The OpenAI-compatible server over the real engine, on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy, torch,
transformers, and a real SmolLM2-135M-Instruct checkpoint in safetensors with its tokenizer, named by
``FI_FFI_SMOLLM2_DIR``):

- greedy chat requests served over HTTP give the text of transformers' ``generate`` + decode on the same
  checkpoint (float32 reference; the first tokens where the two agree within near ties, as the yardstick allows:
  the texts are compared over the tokens before any near tie);
- 64 concurrent streaming clients each get the tokens the engine's own ``generate`` gives their prompt;
- a client that hangs up mid-stream frees its slot: with one slot, the next request is served;
- a chat's logprobs (and top 5) are the log-softmax of the engine's own logits (``prefill_logits`` of the prompt
  and the tokens answered);
- tool calls for a model whose template has no call format (SmolLM2's): a named function and ``tool_choice``
  "required" give a call whose arguments parse and validate against its schema, whole and streamed, as does a
  ``json_schema`` response_format's answer.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers.gpu import engine_against_transformers

cp, torch, transformers = engine_against_transformers()
openai = pytest.importorskip("openai", reason="the client is the dev extra's openai package")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette", reason="the server needs the serve extra")

from helpers.json_schemas import PERSON, check_person, check_schema, json_schema  # noqa: E402
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


def test_chat_logprobs_are_the_log_softmax_of_the_engines_own_logits() -> None:
    """Each answered token's logprob and its top 5 (served over HTTP, greedy) against the engine's own prefill
    logits of the prompt and the tokens before it: the answered token within test_gpu_step_api.py's 0.1 (decode
    and prefill kernels differ by a few hundredths), the five within 0.25 (the real checkpoint's 30 bfloat16 layers
    take its less likely tokens further apart: on an H100 a log-probability of -4.8 came 0.16 apart), and the five
    the likeliest tokens but for near ties (each within 0.2 of the fifth's log-probability)."""
    codec = TextCodec.from_dir(MODEL_DIR)
    tokenizer = codec.tokenizer
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    engine = open_engine(4)
    with engine:
        with GenerationService(engine, codec) as service, running(build_app(service, "m")) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=120)
            out = client.chat.completions.create(
                model="m", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
            )
        entries = out.choices[0].logprobs.content
        assert len(entries) == out.usage.completion_tokens > 0
        by_bytes = {tokenizer.token_piece(i)[1]: i for i in range(tokenizer.vocab_size)}
        ids = [by_bytes[bytes(e.bytes)] for e in entries]
        prompt = codec.encode_chat(messages)
        logits = engine.prefill_logits([prompt + ids[:-1]])[0]
    for t, (token, entry) in enumerate(zip(ids, entries, strict=True)):
        row = logits[len(prompt) - 1 + t].astype(np.float64)
        ref = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
        assert entry.logprob == pytest.approx(ref[token], abs=0.1), t
        top = [by_bytes[bytes(e.bytes)] for e in entry.top_logprobs]
        fifth = np.sort(ref)[::-1][4]
        assert len(set(top)) == 5 and all(ref[i] >= fifth - 0.2 for i in top), t  # the 5 likeliest, but near ties
        for i, e in zip(top, entry.top_logprobs, strict=True):  # each one its own token's
            assert e.logprob == pytest.approx(ref[i], abs=0.25), (t, i)


# tools whose arguments are bounded (the grammar ends them), as a user would describe them
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 40}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def test_forced_tool_choices_give_calls_valid_against_their_schemas() -> None:
    """SmolLM2's template has no tool-call format: a named function and "required" are served in the neutral
    format under the tools' grammar. Each reply is calls of the tools offered (the named one), whose arguments
    parse and validate, whole and streamed; finish "stop" for a named function, "tool_calls" for "required". A
    json_schema response_format's answer parses and validates too."""
    pytest.importorskip("llguidance", reason="grammars need the serve extra's llguidance")
    codec = TextCodec.from_dir(MODEL_DIR)
    asks = ["What is the weather in Paris?", "What time is it in Tokyo, and how warm is it there?"]
    engine = open_engine(4)
    with engine, GenerationService(engine, codec) as service, running(build_app(service, "m")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=120)
        for ask in asks:
            messages = [{"role": "user", "content": ask}]
            for choice, parallel, stream in [
                ({"type": "function", "function": {"name": "get_weather"}}, True, False),  # (one call: it is named)
                ({"type": "function", "function": {"name": "get_weather"}}, True, True),
                ("required", False, False),
                ("required", False, True),  # (parallel calls: the CPU tests; a small model may not stop adding them)
            ]:
                kw = {"model": "m", "messages": messages, "tools": TOOLS, "tool_choice": choice, "max_tokens": 300}
                kw |= {"temperature": 0, "parallel_tool_calls": parallel}
                if stream:
                    with client.chat.completions.stream(**kw) as events:
                        answer = events.get_final_completion().choices[0]
                else:
                    answer = client.chat.completions.create(**kw).choices[0]
                calls = answer.message.tool_calls or []
                made = [(c.function.name, c.function.arguments) for c in calls]
                print(f"{ask!r} {choice} parallel={parallel}: {made}")
                assert answer.finish_reason == ("tool_calls" if choice == "required" else "stop"), answer
                assert len(calls) == 1 and not answer.message.content
                for call in calls:
                    assert choice == "required" or call.function.name == "get_weather"
                    check_schema(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        out = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Describe a club member as JSON."}],
            response_format=json_schema(PERSON),
            max_tokens=300,
            temperature=0,
        ).choices[0]
        assert out.finish_reason == "stop"
        check_person(json.loads(out.message.content))

"""Structured output (``SamplingParams.grammar``, the OpenAI ``response_format``) served by the GPU engine
(FI_FFI_RUN_GPU_TESTS=1; CuPy, tokenizers and llguidance; no torch).

50 requests, each with the grammar of a ``json_schema`` format (helpers.json_schemas.SCHEMAS in turn: objects of
bounded strings, integers, booleans, enums, arrays and a nested object), go through the step API at once, greedy
and sampled (seeded and unseeded), a third of them with ``ignore_eos`` (no EOS ids of their own): every one ends
with an end-of-sequence id its grammar allowed (``"stop"``), no token lies past the tokenizer's vocabulary, and the
text parses with ``json.loads`` and follows its schema (jsonschema where installed, else helpers.json_schemas'
checks). Greedy tokens are the engine's own choice among the tokens the grammar allowed at each position (teacher
forcing with ``prefill_logits`` and a matcher replayed beside it: the best allowed, or within ``TOL`` of it at a
near tie), so the mask is applied at the right step. ``generate`` gives each of its prompts a matcher of its own.

Checkpoints: a random SmolLM2-like float16 Llama (helpers.random_llama, vocabulary 4096) with the tests' trained
byte-level tokenizer (330 ids, helpers.text_checkpoints) written beside it, so the logits are wider than the
tokenizer; and a real SmolLM2-135M-Instruct named by ``FI_FFI_SMOLLM2_DIR`` (skipped without), asked in a chat
prompt. Each served eagerly and as ``fi-engine serve`` opens it (decode graphs prepared ahead, ``overlap_steps``,
``mixed_prefill``, ``prefix_caching``: ``models.registry.open_engine``).

Run: ``FI_FFI_RUN_GPU_TESTS=1 [FI_FFI_SMOLLM2_DIR=/path/to/SmolLM2-135M-Instruct] python -m pytest -q
tests/engine/test_gpu_grammar.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

cp = pytest.importorskip("cupy", reason="the engine needs CuPy (pip install 'fi-ffi[engine]')")
pytest.importorskip("tokenizers", reason="the engine's tokenizer needs the engine extra")
pytest.importorskip("llguidance", reason="grammars need the serve extra's llguidance")

from helpers.json_schemas import SCHEMAS, check_schema, json_schema  # noqa: E402
from helpers.random_llama import save_random_llama  # noqa: E402
from helpers.step_api import drain  # noqa: E402
from helpers.text_checkpoints import write_text_checkpoint  # noqa: E402

from fi_engine.models.registry import open_engine  # noqa: E402
from fi_engine.runtime.sampling_params import SamplingParams  # noqa: E402
from fi_engine.text.codec import TextCodec  # noqa: E402
from fi_engine.text.grammar import response_format_grammar  # noqa: E402

pytestmark = pytest.mark.gpu

REQUESTS = 50
MAX_NEW = 900  # every SCHEMAS output is bounded well below (whitespace at most 20 characters a gap)
MAX_SEQ = 1280  # a chat prompt of the real checkpoint (about 140 tokens) and MAX_NEW
# Teacher forcing recomputes a decode step's logits with the prefill's kernels, which may differ by a few
# hundredths (the random model's logits have a standard deviation of ~24; SmolLM2's bfloat16 ones ~0.1 apart at
# worst): a near tie within TOL may go either way (tests/engine/test_gpu_step_api.py's bound).
TOL = 0.25
SMOLLM2_DIR = os.environ.get("FI_FFI_SMOLLM2_DIR", "")


@pytest.fixture(scope="module", params=["random", "smollm2"])
def checkpoint(request, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    if request.param == "smollm2":
        if not SMOLLM2_DIR or not (Path(SMOLLM2_DIR) / "tokenizer.json").is_file():
            pytest.skip("set FI_FFI_SMOLLM2_DIR to a SmolLM2-135M-Instruct checkpoint (safetensors + tokenizer.json)")
        return Path(SMOLLM2_DIR)
    root = save_random_llama(tmp_path_factory.mktemp("smollm2-like"), "float16", 64, (9, 3), 576, 1536, False)
    return write_text_checkpoint(root)  # its tokenizer beside the weights: what the engine matches grammars with


@pytest.fixture(scope="module")
def codec(checkpoint: Path) -> TextCodec:
    return TextCodec.from_dir(checkpoint)


@pytest.fixture(scope="module", params=["eager", "served"])
def engine(request, checkpoint):  # type: ignore[no-untyped-def]
    served = request.param == "served"
    settings = dict(overlap_steps=True, mixed_prefill=True, prefix_caching=True) if served else {}
    with open_engine(checkpoint, max_batch=8, max_seq_len=MAX_SEQ, cuda_graph=served, **settings) as e:
        yield e
        assert not e.has_unfinished  # every test leaves the engine idle


def prompt_of(codec: TextCodec, checkpoint: Path, i: int, schema: dict) -> list[int]:
    """Request ``i``'s prompt: a chat question for the real model; a few plain tokens for random weights."""
    if checkpoint == Path(SMOLLM2_DIR):
        ask = f"Reply with a JSON object following this schema: {json.dumps(schema)}. Example {i}."
        return codec.encode_chat([{"role": "user", "content": ask}])
    rng = np.random.default_rng(i)
    return [int(t) for t in rng.integers(3, codec.tokenizer.vocab_size, size=4 + i % 9)]


def check_answer(codec: TextCodec, tokens: list[int], schema: dict) -> None:
    """``tokens`` end with an EOS id the grammar allowed, hold no id past the tokenizer's, and the text before the
    EOS parses as JSON following ``schema``."""
    assert tokens and tokens[-1] in codec.eos_token_ids, tokens[-8:]
    assert max(tokens) < codec.tokenizer.vocab_size  # the model's padded rows are never allowed
    text = codec.decode(tokens[:-1])
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        pytest.fail(f"{exc}: {text!r:.400} (tokens {tokens[-12:]})")
    check_schema(value, schema)


def check_constrained_greedy(engine, grammar: str, prompt: list[int], out: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Each token of ``out`` is allowed by ``grammar`` after the tokens before it and is the engine's best allowed
    token there (teacher forcing with ``prefill_logits``), up to a near tie within ``TOL``."""
    logits = engine.prefill_logits([prompt + out[:-1]])[0]
    matcher = engine.grammar_tokenizer.matcher(grammar)
    for t, token in enumerate(out):
        row = logits[len(prompt) - 1 + t]
        allowed = matcher.allowed_mask(row.size)
        assert allowed[token], (t, token)
        best = float(row[allowed].max())
        assert row[token] >= best - TOL, (t, token, int(np.flatnonzero(allowed)[np.argmax(row[allowed])]))
        matcher.consume(token)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_fifty_json_schema_requests_parse_and_follow_their_schema(engine, codec, checkpoint, greedy) -> None:  # type: ignore[no-untyped-def]
    asked = {}
    for i in range(REQUESTS):
        schema = SCHEMAS[i % len(SCHEMAS)]
        grammar = response_format_grammar(json_schema(schema))
        if greedy:
            sp = SamplingParams(grammar=grammar)
        else:  # seeded and unseeded, with top-p and min_p beside the mask
            sp = SamplingParams(0.8, 0, 0.95, seed=i if i % 2 else None, min_p=0.02 * (i % 3), grammar=grammar)
        prompt = prompt_of(codec, checkpoint, i, schema)
        eos = () if i % 3 == 0 else None  # ignore_eos: the grammar's end still ends it
        asked[engine.add_request(prompt, MAX_NEW, sampling=sp, eos_token_ids=eos)] = (prompt, schema, grammar)
    outs = drain(engine, limit=100_000)
    assert set(outs) == set(asked)
    for rid, (prompt, schema, grammar) in asked.items():
        tokens = [t for o in outs[rid] for t in o.token_ids]
        assert outs[rid][-1].finish_reason == "stop", (rid, len(tokens))
        check_answer(codec, tokens, schema)
        if greedy and rid % 8 == 0:  # a few by teacher forcing (each a prefill of its whole output)
            check_constrained_greedy(engine, grammar, prompt, tokens)


def test_generate_gives_each_prompt_its_own_matcher(engine, codec, checkpoint) -> None:  # type: ignore[no-untyped-def]
    schema = SCHEMAS[3]
    grammar = response_format_grammar(json_schema(schema))
    prompts = [prompt_of(codec, checkpoint, 100 + i, schema) for i in range(4)]
    result = engine.generate(prompts, MAX_NEW, sampling=SamplingParams(grammar=grammar), eos_token_ids=())
    assert result.finish_reasons == ["eos"] * 4
    for prompt, tokens in zip(prompts, result.tokens, strict=True):
        check_answer(codec, tokens, schema)
        check_constrained_greedy(engine, grammar, prompt, tokens)

"""An OpenAI-compatible HTTP server over a :class:`~fi_engine.serve.service.GenerationService`: Starlette + uvicorn
(the ``serve`` extra), imported on first use.

Endpoints: ``GET /v1/models``; ``POST /v1/completions`` and ``POST /v1/chat/completions``, whole or streamed
(``"stream": true``: server-sent events ``data: {...}``, closed by ``data: [DONE]``); ``GET /health`` (200, or
503 once the engine failed or the server is closing); ``GET /metrics`` (Prometheus text,
:class:`~fi_engine.serve.metrics.ServingMetrics`).

Every client's requests go to the one service, whose engine thread batches them all (continuous batching across
HTTP requests; with ``fi-engine serve --api-servers N`` each of N processes runs this app over a service of its
own, all over one engine process: :mod:`fi_engine.serve.api_servers`); the event loop only checks small bodies and
relays deltas: reading a large body's JSON, rendering the chat template, tokenizing and compiling a grammar run in
worker threads (the tokenizer and the grammar compiler release the interpreter lock), so that one heavy request
does not stall the other clients' streams. A full queue is 429 (with ``Retry-After``); a client that disconnects
cancels its requests (their slots and pages are freed at the engine's next turn; one INFO line says so); a bad
body, an unknown model or an out-of-range value is 400 with OpenAI's error object naming the field
(:mod:`fi_engine.serve.openai_protocol`; no server file path in any message); nothing a client sends is answered
500: a 500 is a fault of the server's own (``code`` null, logged once with its traceback).

Limits against hostile clients: a body larger than ``max_request_bytes`` is 413 (from its ``Content-Length`` before
it is read, or once a chunked body passes it); a body whose parts stop coming for :data:`BODY_TIMEOUT_S` is 408; a
connection that does not send a request's line and headers within :data:`HEADER_TIMEOUT_S` is closed (uvicorn has
no such timeout: :func:`uvicorn_config` adds it); a prompt certain to exceed the context from its length in bytes
is refused before it is tokenized (:attr:`~fi_engine.text.tokenizer.Tokenizer.max_token_bytes`); a grammar is
compiled with a time limit (:data:`GRAMMAR_TIMEOUT_S`). On shutdown uvicorn stops accepting, waits for open
responses up to the grace period, and the service then cancels what is left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import importlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..runtime.sampling_params import SamplingParams
from ..runtime.stepping import TokenLogprobs
from ..text.args import arg_token_ids
from ..text.grammar import GrammarTokenizer, _llguidance, _said, response_format_grammar, response_format_schema
from ..text.harmony import MARKERS
from ..text.tool_calls import NEUTRAL, ToolCall, ToolCallParser, call_format, opener
from ..text.tool_grammar import tool_call_grammar
from ..values import show
from .lora_api import ServedAdapters, check_runtime_lora_updating
from .openai_protocol import (
    CHAT_CHUNK,
    COMPLETION_CHUNK,
    COMPLETION_DEFAULT_MAX_TOKENS,
    APIError,
    Choice,
    ParsedRequest,
    chat_body,
    chat_logprobs,
    choice_chunk,
    completion_body,
    completion_logprobs,
    error_body,
    new_id,
    parse_body,
    parse_chat,
    parse_completion,
    tool_call_body,
    unknown_model,
    usage_body,
)
from .service import GenerationService, QueueFullError, RequestStream, ServiceClosedError, ServiceError

__all__ = ["MAX_REQUEST_BYTES", "build_app", "http_protocols", "serve", "uvicorn_config"]

log = logging.getLogger("fi_engine.server")
SERVE_HINT = "python -m pip install '.[serve]' in the fi_ffi checkout"
# The interpreter's thread switch interval in a server process (CPython's default: 5 ms). Its event loop, relaying
# thousands of token events a second, rarely waits, so the service's thread (which hands requests to the engine
# and takes its tokens) got the interpreter back only when the loop was made to drop it, once per interval: a
# request reached the engine process 4-20 ms after it arrived (H100, SmolLM2 shapes, 64 streaming clients over 4
# API servers, 2026-11-24: benchmarks/RESULTS.md), where a decode step takes 1.2 ms. Set by serve() and by each API
# server process, which are the server's own; a program that embeds the service keeps its own setting.
SWITCH_INTERVAL_S = 0.0005
# The largest request body, in bytes, by default (fi-engine serve --max-request-bytes): the longest prompts served
# (a context of a million tokens, about 4 MB of text or 7 MB as token ids in JSON) fit several times over, while
# what one request can make the server hold and parse stays bounded (reading 32 MiB of token ids takes about a
# second of one core).
MAX_REQUEST_BYTES = 32 * 1024 * 1024
# A request's line and headers must arrive within this many seconds of the connection's start (or of the previous
# response): a client on a working network sends them in milliseconds, and a connection that trickles them
# would otherwise stay open for ever (nginx's client_header_timeout is 60 s; 10 s frees a slot sooner).
HEADER_TIMEOUT_S = 10.0
# The most seconds between two parts of a request's body (nginx's client_body_timeout, which is 60 s, counts the
# same way); a body still coming this long after its answer was sent (a 413's) is not waited for either.
BODY_TIMEOUT_S = 10.0
# A grammar (response_format, guided_*) not compiled and checked within this many seconds is refused; the request
# sizes llguidance gets (openai_protocol.MAX_GRAMMAR_BYTES) compile in about a second.
GRAMMAR_TIMEOUT_S = 10.0
# Bodies larger than this are read (their JSON parsed and the request's fields checked) in a worker thread
OFF_LOOP_BYTES = 64 * 1024


def _require(module: str) -> Any:
    """Import ``module`` of the ``serve`` extra, or ModuleNotFoundError naming the install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"the OpenAI-compatible server needs the {module.partition('.')[0]!r} package, which is not installed "
            f"({exc}); install the server's dependencies with: {SERVE_HINT}",
            name=exc.name,
        ) from exc


@dataclass
class _Choice:
    """One choice of a response as it is shaped: what leads it (``echo``: the prompt's text, and its ids for the
    prompt's logprobs), whether its generated tokens count (not with ``max_tokens`` 0), and the tokens whose
    logprobs wait for the next chunk with text (a stream holds text back while a character or a stop string is
    pending) with the text offset reached."""

    echo: str
    prompt_ids: list[int]
    generates: bool
    started: bool = False
    ids: list[int] = field(default_factory=list)
    entries: list[TokenLogprobs | None] = field(default_factory=list)
    offset: int = 0
    reader: ToolCallParser | None = None  # reads the reply (a chat with tools, or any harmony chat)
    reads_calls: bool = True  # False: calls the reply makes are dropped (harmony with tool_choice "none")
    reasoning: bool = True  # False: the reply's reasoning is dropped (include_reasoning)
    parallel: bool = True  # False: the first call only (parallel_tool_calls)
    called: int = 0  # calls sent so far
    calls_finish: str = "tool_calls"  # the finish of a reply that called tools and stopped ("stop": a named function)

    def read(self, text: str, end: bool, cut_short: bool = False) -> tuple[str, str, list[ToolCall]]:
        """The content, the reasoning and the tool calls of the reply's next ``text`` (``end``: the reply ended;
        ``cut_short``: at its length limit)."""
        assert self.reader is not None
        content, calls = self.reader.feed(text)
        if end:
            rest, late = self.reader.finish(cut_short)
            content, calls = content + rest, calls + late
        reasoning = self.reader.take_reasoning()
        if not self.reads_calls:
            calls = []
        if not self.parallel:
            calls = calls[: max(0, 1 - self.called)]
        self.called += len(calls)
        return content, (reasoning if self.reasoning else ""), calls


@dataclass
class _Submitted:
    """A request's engine requests: their streams and choices (one each, choice ``i`` of the answer is stream
    ``i``) and the prompt tokens it counts."""

    streams: list[RequestStream]
    choices: list[_Choice]
    prompt_tokens: int


class _Handlers:
    """The endpoints, bound to one service and the model names it answers to."""

    def __init__(
        self,
        service: GenerationService,
        models: Sequence[str],
        max_model_len: int | None,
        quantization: str | None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        body_timeout_s: float = BODY_TIMEOUT_S,
        grammar_timeout_s: float = GRAMMAR_TIMEOUT_S,
        adapters: ServedAdapters | None = None,
    ) -> None:
        self.service = service
        self.models = list(models)
        self.adapters = adapters if adapters is not None else ServedAdapters(None, self.models, False)
        self.max_model_len = max_model_len
        self.quantization = quantization
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.grammar_timeout_s = grammar_timeout_s
        self.started = int(time.time())
        self.grammars: GrammarTokenizer | None = None  # the served tokenizer for response_format, made on first use
        self.grammars_built = asyncio.Lock()
        # grammars compile in threads of their own: a compile past its time limit runs on (a thread cannot be
        # stopped), and two threads bound how many can at once
        self.compiler = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="fi-engine-grammar")
        # large bodies are read one at a time: the JSON parser holds the interpreter lock for the whole of a long
        # text (about 2 ms a MB), and several at once would keep the event loop waiting for it the longer
        self.reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fi-engine-json")
        self.hidden = _server_paths(service)
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

        self.ClientDisconnect = ClientDisconnect

        self.JSONResponse, self.PlainTextResponse = JSONResponse, PlainTextResponse
        self.Response, self.StreamingResponse = Response, StreamingResponse

    # -- plumbing ----------------------------------------------------------------------------------------------

    def error(self, error: APIError) -> Any:
        """The response of ``error``, the server's own file paths taken out of its message (a client learns
        nothing of the machine from it)."""
        self.service.metrics.response(error.status)
        headers = {"Retry-After": "1"} if error.status == 429 else None
        if error.status == 408:  # the client stalled: free the connection
            headers = {"Connection": "close"}
        message = error.message
        for path, said in self.hidden:
            message = message.replace(path, said)
        if message != error.message:
            error = APIError(message, error.param, status=error.status, type=error.type, code=error.code)
        return self.JSONResponse(error_body(error), status_code=error.status, headers=headers)

    async def parsed(self, request: Any, chat: bool) -> ParsedRequest:
        """The request's body read (:meth:`body_bytes`) and checked (:func:`parse_body`, then :func:`parse_chat` or
        :func:`parse_completion`), in the reader's thread when it is large."""

        def parse(raw: bytes) -> ParsedRequest:
            body = parse_body(raw)
            models = self.adapters.models
            return parse_chat(body, models) if chat else parse_completion(body, models)

        async def parse_here(raw: bytes) -> ParsedRequest:
            if len(raw) <= OFF_LOOP_BYTES:
                return parse(raw)
            return await asyncio.get_running_loop().run_in_executor(self.reader, parse, raw)

        raw = await self.body_bytes(request)
        try:
            return await parse_here(raw)
        except APIError as exc:  # a model this server does not know: another may have loaded it (shared engine)
            if exc.code != "model_not_found" or not await self._learn_adapters():
                raise
        return await parse_here(raw)

    async def _learn_adapters(self) -> bool:
        """Where other API servers share the engine (``ServedAdapters.shared``) and may load or unload adapters
        (``runtime``): the adapters' names kept here replaced by the engine's (one round trip to it), so that what
        another server loaded or unloaded is seen here; False (nothing asked) otherwise. 503 once the service is
        closed or the engine process is gone."""
        adapters = self.adapters
        if not (adapters.shared and adapters.enabled and adapters.runtime):  # (else the names never change)
            return False
        adapters.update(await self._engine_call(lambda engine: engine.lora_names))
        return True

    async def _engine_call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(engine)`` run in the engine thread (:meth:`GenerationService.call`): its result, or its ValueError /
        TypeError (the engine's refusal) raised; 503 once the service is closed or the engine process is gone."""
        try:
            return await asyncio.wrap_future(self.service.call(fn))
        except RuntimeError as exc:  # ServiceClosedError, or the engine process's end (EngineClient names it)
            raise _unavailable(exc) from None

    async def body_bytes(self, request: Any) -> bytes:
        """The request's body: 413 once it passes ``max_request_bytes`` (at once from a ``Content-Length`` that says
        so), 408 when its next part does not come within ``body_timeout_s`` (:data:`BODY_TIMEOUT_S`)."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdecimal() and (len(declared) > 20 or int(declared) > limit):
            raise _too_large(limit, f"{declared} bytes")
        parts: list[bytes] = []
        size = 0
        chunks = aiter(request.stream())
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks, b""), self.body_timeout_s)
            except TimeoutError:
                raise APIError(
                    f"the request body stopped coming: no part of it for {self.body_timeout_s:g} s; send it without "
                    "pauses",
                    None,
                    status=408,
                    code="request_timeout",
                ) from None
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise _too_large(limit, f"more than {limit} bytes")
            parts.append(chunk)

    # -- endpoints ---------------------------------------------------------------------------------------------

    async def health(self, request: Any) -> Any:
        if self.service.healthy:
            return self.Response(status_code=200)
        reason = "closing" if self.service.error is None else f"engine failed: {self.service.error!r}"
        return self.PlainTextResponse(reason, status_code=503)

    async def metrics(self, request: Any) -> Any:
        return self.PlainTextResponse(
            self.service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    def _model(self, name: str) -> dict[str, Any]:
        """OpenAI's model object of a served name, with vLLM's ``root`` and ``max_model_len`` (and the weights'
        ``quantization`` where they are quantized)."""
        return (
            {"id": name, "object": "model", "created": self.started, "owned_by": "fi_engine", "root": name}
            | ({"max_model_len": self.max_model_len} if self.max_model_len else {})
            | ({"quantization": self.quantization} if self.quantization else {})
        )

    async def list_models(self, request: Any) -> Any:
        try:
            await self._learn_adapters()
        except APIError as exc:
            return self.error(exc)
        data = [self._model(m) for m in self.models] + self.adapters.entries(self._model(self.models[0]))
        return self.JSONResponse({"object": "list", "data": data})

    async def retrieve_model(self, request: Any) -> Any:
        name = request.path_params["model"]
        if name in self.models:
            return self.JSONResponse(self._model(name))
        try:
            await self._learn_adapters()
        except APIError as exc:
            return self.error(exc)
        listed = [m for m in self.adapters.entries(self._model(self.models[0])) if m["id"] == name]
        if not listed:
            return self.error(unknown_model(name, self.adapters.models))
        return self.JSONResponse(listed[0])

    async def load_lora_adapter(self, request: Any) -> Any:
        """vLLM's ``POST /v1/load_lora_adapter``: the adapter of ``lora_path`` served as ``lora_name`` once the
        engine has read and checked it (400 naming what does not fit; :mod:`fi_engine.serve.lora_api`)."""
        path = ""
        try:
            body = parse_body(await self.body_bytes(request))
            await self._learn_adapters()  # (another API server may have loaded this name)
            name, path = self.adapters.load_body(body)
            await self._engine_call(lambda engine: engine.load_lora(name, path))
        except APIError as exc:
            return self.error(exc)
        except (ValueError, TypeError) as exc:  # the engine's refusal (its key named)
            # (a name taken meanwhile, by a load at the same time here or through another API server: lora_name)
            field = "lora_name" if str(exc).startswith("lora_name:") else "lora_path"
            return self.error(APIError(str(exc).replace(path, "lora_path") if path else str(exc), field))
        if name not in self.adapters.names:
            self.adapters.names.append(name)
        log.info("LoRA adapter %r loaded", name)
        return self.PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: Any) -> Any:
        """vLLM's ``POST /v1/unload_lora_adapter``: adapter ``lora_name`` no longer served (400 while requests use
        it; 404 for a name not loaded)."""
        name = ""
        try:
            body = parse_body(await self.body_bytes(request))
            await self._learn_adapters()  # (another API server may have loaded or unloaded it)
            name = self.adapters.unload_body(body)
            await self._engine_call(lambda engine: engine.unload_lora(name))
        except APIError as exc:
            return self.error(exc)
        except (ValueError, TypeError) as exc:
            try:  # unloaded meanwhile through another API server: the 404 of a name not loaded
                if await self._learn_adapters() and name not in self.adapters.names:
                    return self.error(self.adapters.not_loaded(name))
            except APIError as closed:
                return self.error(closed)
            return self.error(APIError(str(exc), "lora_name"))
        if name in self.adapters.names:
            self.adapters.names.remove(name)
        log.info("LoRA adapter %r unloaded", name)
        return self.PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def completions(self, request: Any) -> Any:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Any) -> Any:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Any, chat: bool) -> Any:
        try:
            parsed = await self.parsed(request, chat)
            grammar = await self._grammar(parsed)
            reading = self._reading(parsed)
            prompts = await asyncio.to_thread(self._prompts, parsed, reading[1])
            submitted = await self._accepted(parsed, grammar, reading, prompts, chat)
        except APIError as exc:
            return self.error(exc)
        except self.ClientDisconnect:
            log.info("%s %s: the client hung up while sending its request", request.method, request.url.path)
            return self.Response(status_code=499)  # nobody reads it
        rid = new_id("chatcmpl" if chat else "cmpl")
        if parsed.stream:
            self.service.metrics.response(200)
            events = self._events(parsed, submitted, rid, chat)
            return self.StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._whole(request, parsed, submitted, rid, chat)

    async def _accepted(
        self,
        parsed: ParsedRequest,
        grammar: str | None,
        reading: tuple[str | None, str, bool],
        prompts: tuple[list[list[int]], list[str]],
        chat: bool,
    ) -> _Submitted:
        """The request submitted (:meth:`_submit`) once the engine accepted every choice; its refusal as an
        :class:`APIError`. A forced call in the template's own format whose grammar the engine cannot apply (a
        vocabulary split over tensor-parallel ranks) is submitted again without it: the server's opener alone then
        makes the reply a call, its arguments unconstrained."""
        submitted = self._submit(parsed, grammar, reading, prompts)
        streams = submitted.streams
        try:
            await asyncio.gather(*(s.aaccepted() for s in streams))
        except (ValueError, TypeError) as exc:  # the engine refused a prompt (too long for it, ...)
            for s in streams:
                s.cancel()
            forced = parsed.tool_choice in ("required", "named") and reading[0] not in (None, NEUTRAL)
            if grammar is not None and forced and str(exc).startswith("grammar:"):
                return await self._accepted(parsed, None, reading, prompts, chat)
            # an adapter unloaded through another API server since this one learned its name: the 404 of a model
            # not served, as where this server unloaded it
            gone = str(exc).startswith("lora:") and await self._learn_adapters()
            if gone and parsed.model not in self.adapters.models:
                raise unknown_model(parsed.model, self.adapters.models) from None
            raise _refusal(exc, chat, parsed.grammar_field) from None
        except ServiceError as exc:
            raise _engine_failed(exc) from None
        except asyncio.CancelledError:
            for s in streams:
                s.cancel()
            raise
        return submitted

    def _prompts(self, parsed: ParsedRequest, lead: str) -> tuple[list[list[int]], list[str]]:
        """The request's prompts as token ids (a chat's rendered by the template, then ``lead``: a forced call's
        start) and, with ``echo``, as the text each choice begins with. Run in a worker thread: the template and
        the tokenizer take time in proportion to the prompt. A prompt certain to exceed the context from its length
        in bytes is refused before it is tokenized (:meth:`_fits`); token ids are checked against the vocabulary
        before they are decoded for ``echo``."""
        codec = self.service.codec
        if codec is None:
            raise APIError("this server has no tokenizer: it serves token-id prompts only", "prompt")
        tokenizer = codec.tokenizer
        try:
            if parsed.messages is not None:  # the template renders the tools; a forced call's start follows
                text = codec.render_chat(
                    parsed.messages, parsed.add_generation_prompt, parsed.tools, **parsed.template_kwargs
                )
                if parsed.continue_final_message:
                    text = _continued(text, parsed.messages[-1]["content"])
                self._fits(parsed, text + lead, "messages")
                return [tokenizer.encode(text + lead, add_special_tokens=False)], []
            assert parsed.prompts is not None
            ids = []
            for i, prompt in enumerate(parsed.prompts):
                name = "prompt" if len(parsed.prompts) == 1 else f"prompt[{i}]"
                if isinstance(prompt, str):
                    self._fits(parsed, prompt, name)
                    ids.append(codec.encode(prompt))
                else:
                    ids.append(arg_token_ids(name, prompt, tokenizer.vocab_size))
            if not all(ids):
                raise APIError("prompt: the text encodes to no token; give a non-empty prompt", "prompt")
            skip = parsed.skip_special_tokens
            echoes = [  # the prompt as given; token ids as their text
                given if isinstance(given, str) else codec.decode(prompt_ids, skip)
                for given, prompt_ids in zip(parsed.prompts, ids, strict=True)
                if parsed.echo
            ]
            return ids, echoes
        except (ValueError, TypeError) as exc:  # a template that refuses the messages, ...
            raise _named(exc, "messages" if parsed.messages is not None else "prompt") from None

    def _fits(self, parsed: ParsedRequest, text: str, where: str) -> None:
        """400 ``context_length_exceeded`` where ``text`` (a prompt about to be tokenized, ``where`` in the
        request) cannot fit the context, as its length in bytes proves: it encodes to at least one token per
        ``max_token_bytes`` bytes (None: a tokenizer that proves no such bound). A prompt that might fit is
        tokenized, and :meth:`_budget` then says exactly how many tokens it has."""
        codec, context = self.service.codec, self.max_model_len
        bound = codec.tokenizer.max_token_bytes if codec is not None else None
        if bound is None or context is None:
            return
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))  # (isascii: O(1))
        least = -(-size // bound)
        if least < context:
            return
        raise APIError(
            f"This model's maximum context length is {context} tokens. However, your {where} is {size} bytes long, "
            f"which is at least {least} tokens (a token of this model's tokenizer stands for {bound} bytes at most). "
            f"Please reduce the length of the {where}.",
            where.split("[", 1)[0],
            code="context_length_exceeded",
        )

    def _submit(
        self,
        parsed: ParsedRequest,
        grammar: str | None,
        reading: tuple[str | None, str, bool],
        encoded: tuple[list[list[int]], list[str]],
    ) -> _Submitted:
        """Queue ``n`` requests per prompt (``grammar``: theirs, :meth:`_grammar`; ``reading``: how their replies are
        read, :meth:`_reading`; ``encoded``: the prompts' ids and echoes, :meth:`_prompts`), all or none; their
        choices (one per request) and the prompt token count."""
        service = self.service
        codec = service.codec
        assert codec is not None  # _prompts refused the request otherwise
        fmt, lead, reads_calls = reading
        function = parsed.tool_name if fmt == NEUTRAL else None  # the neutral format's reply is its arguments
        ids, echoes = encoded
        gen = codec.generation
        temperature = parsed.temperature
        if temperature is None:  # the checkpoint's default (generation_config.json), else OpenAI's 1.0
            temperature = gen.temperature if gen.temperature is not None else 1.0
        top_p = parsed.top_p if parsed.top_p is not None else (gen.top_p if gen.top_p is not None else 1.0)
        top_k = parsed.top_k if parsed.top_k is not None else (gen.top_k if gen.top_k is not None else 0)
        vocab = codec.tokenizer.vocab_size
        for token in parsed.logit_bias:
            if token >= vocab:
                raise APIError(f"logit_bias: token id {token} is outside the vocabulary [0, {vocab})", "logit_bias")
        eos_token_ids = self._end_ids(parsed)
        controls = SamplingParams(  # the request's own controls (each default changes nothing)
            min_p=parsed.min_p,
            presence_penalty=parsed.presence_penalty,
            frequency_penalty=parsed.frequency_penalty,
            repetition_penalty=parsed.repetition_penalty,
            min_tokens=parsed.min_tokens,
            logit_bias=tuple(parsed.logit_bias.items()),
            logprobs=parsed.logprobs,
            prompt_logprobs=parsed.logprobs if parsed.echo else None,
            grammar=grammar,
            speculative_decoding=parsed.speculative_decoding,
            lora=self.adapters.lora_of(parsed.model),
        )
        prompts, limits, samplings, choices = [], [], [], []
        for i, prompt in enumerate(ids):
            limit = self._budget(parsed, len(prompt))
            if parsed.min_tokens > limit:
                raise APIError(f"min_tokens: {parsed.min_tokens} exceeds the {limit} tokens left", "min_tokens")
            echo = echoes[i] if echoes else ""
            for seed in parsed.seeds():
                prompts.append(prompt)
                limits.append(max(limit, 1))  # max_tokens 0 (echo): one token generated, left out of the answer
                samplings.append(replace(controls, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
                choices.append(
                    _Choice(
                        echo,
                        prompt,
                        generates=limit > 0,
                        reader=None if fmt is None else ToolCallParser(fmt, lead, function),
                        reads_calls=reads_calls,
                        reasoning=parsed.include_reasoning,
                        parallel=parsed.parallel_tool_calls,
                        calls_finish="stop" if parsed.tool_choice == "named" else "tool_calls",
                    )
                )
        try:
            streams = service.submit_many(
                prompts,
                limits,
                samplings,
                stop=parsed.stop,
                eos_token_ids=eos_token_ids,
                skip_special_tokens=parsed.skip_special_tokens,
                keep_special_tokens=MARKERS if fmt == "harmony" else (),  # the reader needs them; none reach the answer
            )
        except QueueFullError as exc:
            raise APIError(str(exc), None, status=429, type="rate_limit_error", code="rate_limit_exceeded") from None
        except ServiceClosedError as exc:
            raise _unavailable(exc) from None
        except (ValueError, TypeError) as exc:  # ids outside the vocabulary, a text that encodes to nothing
            raise _named(exc, "messages" if parsed.messages is not None else "prompt") from None
        return _Submitted(streams, choices, sum(len(p) for p in ids))

    def _budget(self, parsed: ParsedRequest, prompt_tokens: int) -> int:
        """The completion tokens a prompt of ``prompt_tokens`` gets: ``max_tokens``, or where the request did not
        send it the default (16 for completions, OpenAI's; for a chat all the context leaves), cut to what the
        context leaves. 400 ``context_length_exceeded`` where the prompt, or the prompt and ``max_tokens``, do not
        fit the engine's ``max_model_len``, in OpenAI's words (which clients look for to trim and retry)."""
        context, asked = self.max_model_len, parsed.max_tokens
        chat = parsed.messages is not None
        where = "messages" if chat else "prompt"
        if context is None:  # the engine's limit is unknown here: it refuses what does not fit
            if asked is not None:
                return asked
            gen = self.service.codec.generation if self.service.codec is not None else None
            return COMPLETION_DEFAULT_MAX_TOKENS if not chat else ((gen and gen.max_new_tokens) or 1024)
        head = f"This model's maximum context length is {context} tokens. However, "
        if asked is None:
            room = context - prompt_tokens
            if room < 1:
                full = ", which leaves no room for the completion" if room == 0 else ""
                raise APIError(
                    f"{head}your {where} resulted in {prompt_tokens} tokens{full}. Please reduce the length of the "
                    f"{where}.",
                    where,
                    code="context_length_exceeded",
                )
            return room if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
        generated = max(asked, 1)  # max_tokens 0 (echo) generates one token all the same
        if prompt_tokens + generated > context:
            raise APIError(
                f"{head}you requested {prompt_tokens + generated} tokens ({prompt_tokens} in the {where}, {generated} "
                f"in the completion). Please reduce the length of the {where} or completion.",
                where if prompt_tokens >= context else "max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def _end_ids(self, parsed: ParsedRequest) -> tuple[int, ...] | None:
        """The ids that end the request's choices: the checkpoint's EOS ids (None: the engine's) unless
        ``ignore_eos``, and its ``stop_token_ids``. 400 naming ``stop_token_ids`` for an id outside the vocabulary,
        or one whose text would end the output while ``include_stop_str_in_output`` is false (a stop token's text
        is left out, as vLLM does: special tokens are, unless ``skip_special_tokens`` is false)."""
        codec = self.service.codec
        assert codec is not None  # _submit refused the request otherwise
        stop_ids = parsed.stop_token_ids
        if not stop_ids:
            return () if parsed.ignore_eos else None
        tokenizer = codec.tokenizer
        special = tokenizer.special_ids()
        for t in stop_ids:
            if t >= tokenizer.vocab_size:
                raise APIError(
                    f"stop_token_ids: token id {t} is outside the vocabulary [0, {tokenizer.vocab_size})",
                    "stop_token_ids",
                )
            if parsed.include_stop_str_in_output:
                continue
            text = tokenizer.token_piece(t)[0]
            if t not in special:
                why = f"token {t} ({text!r}) is not a special token, so its text would end the output"
            elif not parsed.skip_special_tokens:
                why = f"with skip_special_tokens false the text of token {t} ({text!r}) would end the output"
            else:
                continue
            raise APIError(
                f"stop_token_ids: {why}; send include_stop_str_in_output: true to keep it there, or give its text as a "
                "stop string",
                "stop_token_ids",
                code="unsupported_value",
            )
        # in addition to every id that would end it without them: the checkpoint's (generation config, tokenizer)
        # and the engine's own (its config.json's; an engine in another process: not known here)
        engine_eos = getattr(self.service.engine, "eos_token_ids", ())
        eos = () if parsed.ignore_eos else (*codec.eos_token_ids, *engine_eos)
        return tuple(dict.fromkeys((*eos, *stop_ids)))

    async def _grammar(self, parsed: ParsedRequest) -> str | None:
        """The grammar of the request's ``response_format`` or of the tool call its ``tool_choice`` forces (None: free
        text), compiled once for the request and checked against the served tokenizer, off the event loop (the
        tokenizer's index is built on the first such request: up to seconds for a large vocabulary); 400 naming
        the field at fault when it cannot be (a schema llguidance refuses, the ``llguidance`` package missing, a
        compile past ``grammar_timeout_s``)."""
        fmt = self._reading(parsed)[0]
        forced = parsed.tool_choice in ("required", "named") and fmt is not None
        if not forced and parsed.response_format is None and parsed.guide is None:
            return None
        loop = asyncio.get_running_loop()
        async with self.grammars_built:
            if self.grammars is None:
                self.grammars = await loop.run_in_executor(self.compiler, self._grammar_tokenizer, parsed.grammar_field)
        compiled = loop.run_in_executor(self.compiler, self._compile, self.grammars, parsed, fmt)
        try:
            return await asyncio.wait_for(compiled, self.grammar_timeout_s)
        except TimeoutError:
            field = parsed.grammar_field
            raise APIError(
                f"{field}: the grammar did not compile within {self.grammar_timeout_s:g} s; simplify it",
                field,
                code="unsupported_value",
            ) from None

    def _grammar_tokenizer(self, field: str) -> GrammarTokenizer:
        """The served tokenizer's :class:`GrammarTokenizer`, handed to an engine in this process that matches
        grammars with one of its own (its ``grammar_tokenizer``, while None): the index is built once."""
        codec = self.service.codec
        if codec is None:
            raise APIError("this server has no tokenizer: it serves token-id prompts only", "prompt")
        with _response_format_errors(field):
            grammars = GrammarTokenizer(codec.tokenizer, codec.eos_token_ids)
        engine: Any = self.service.engine
        if getattr(engine, "grammar_tokenizer", False) is None:
            # (an engine that refuses it, a vocabulary wider than its logits, makes and refuses its own per request)
            with suppress(ValueError, TypeError):
                engine.grammar_tokenizer = grammars
        return grammars

    @staticmethod
    def _compile(grammars: GrammarTokenizer, parsed: ParsedRequest, fmt: str | None) -> str:
        """The request's grammar, checked against the served tokenizer: where its tools may be called in ``fmt``
        (the format the reply is read in) and ``tool_choice`` forces a call, or is "auto" beside a JSON format, the
        grammar of the calls (or that JSON: :func:`~fi_engine.text.tool_grammar.tool_call_grammar`); else its JSON
        format's, or its other guide's as llguidance's ``grammar_from`` makes it."""
        forced = parsed.tool_choice in ("required", "named")
        answers = parsed.tool_choice == "auto" and parsed.response_format is not None
        if fmt is not None and parsed.tools and (forced or answers):
            response = None if forced else response_format_schema(parsed.response_format)
            with _tool_grammar_errors(parsed.grammar_field):
                return tool_call_grammar(
                    grammars,
                    fmt,
                    parsed.tools,
                    function=parsed.tool_name,
                    parallel=parsed.parallel_tool_calls,
                    response=response,
                )
        with _response_format_errors(parsed.grammar_field):
            grammar: str | None
            if parsed.guide is not None:
                grammar = str(_llguidance().grammar_from(*parsed.guide))
            else:
                grammar = response_format_grammar(parsed.response_format)
            assert grammar is not None  # a text format is None in ParsedRequest
            grammars.check(grammar)
        return grammar

    def _reading(self, parsed: ParsedRequest) -> tuple[str | None, str, bool]:
        """How a chat's reply is read: its format (None: the reply is its content, as it comes), the text that
        starts it (a call's start when ``tool_choice`` forces one) and whether calls are taken from it. A reply in
        harmony (gpt-oss) is always read, for its channels; another format only when tools may be called. Where
        the chat template shows no format the server reads, a forced call is in the neutral one (its grammar makes
        the reply a call), and ``tool_choice`` "auto" is a 400 naming it (the model's own calls could not be
        told from its text)."""
        codec = self.service.codec
        template = codec.chat_template if codec is not None and parsed.messages is not None else None
        if template is None:
            return None, "", False
        fmt = call_format(template.templates[template.pick(has_tools=parsed.tools is not None)])
        reads_calls = parsed.tool_choice != "none"
        if fmt != "harmony" and not reads_calls:
            return None, "", False
        if fmt is None and parsed.tool_choice == "auto":
            raise APIError(
                f'tool_choice: "auto" (the default with tools) needs a tool-call format in the chat template, and the '
                f"template of {template.source} shows none this server reads (Hermes-style <tool_call> blocks, "
                f'Llama 3.1 JSON, harmony); send tool_choice: "required" or a named function (the reply is then a '
                f'call, constrained to the tools\' schemas), or "none"',
                "tool_choice",
                code="unsupported_value",
            )
        if fmt is None:
            return NEUTRAL, "", True
        if parsed.tool_choice in ("none", "auto"):
            return fmt, "", reads_calls
        return fmt, opener(fmt, parsed.tool_name), True

    def _shape(
        self, parsed: ParsedRequest, choice: _Choice, part: Any, chat: bool, stop_string: str | None = None
    ) -> tuple[str, dict[str, Any] | None]:
        """The text of ``part`` (a :class:`~fi_engine.serve.service.StreamDelta` or a whole
        :class:`~fi_engine.serve.service.RequestResult`) as ``choice`` answers it, with the echoed prompt first,
        and the logprobs object of its tokens and of those held from before (None when not asked). A stream
        sends it only when the text is not empty or the choice ends; otherwise its logprobs wait for the next.
        ``stop_string``: the one that ended the choice, which its text then ends with where the request asked
        (``include_stop_str_in_output``)."""
        text = ""
        if not choice.started:
            choice.started = True
            text = choice.echo
            if parsed.echo and part.prompt_logprobs is not None:
                choice.ids += choice.prompt_ids
                choice.entries += part.prompt_logprobs
        if choice.generates:
            text += part.text
            if stop_string is not None and part.finish_reason is not None and parsed.include_stop_str_in_output:
                text += stop_string
            if part.logprobs is not None:
                choice.ids += part.token_ids
                choice.entries += part.logprobs
        if parsed.logprobs is None or (not text and part.finish_reason is None):
            return text, None
        ids, entries = choice.ids, choice.entries
        choice.ids, choice.entries = [], []
        codec = self.service.codec
        assert codec is not None  # _submit refused the request otherwise
        piece = codec.tokenizer.token_piece
        if chat:
            return text, chat_logprobs(ids, entries, piece)  # type: ignore[arg-type]  # no prompt entries in a chat
        shaped, choice.offset = completion_logprobs(ids, entries, piece, choice.offset)
        return text, shaped

    async def _whole(self, request: Any, parsed: ParsedRequest, submitted: _Submitted, rid: str, chat: bool) -> Any:
        """Wait for every choice, or cancel them all when the client goes away first."""
        streams, choices = submitted.streams, submitted.choices
        results: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(s.aresult() for s in streams)))
        gone: asyncio.Future[Any] = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not results.done():
                for s in streams:
                    s.cancel()
            gone.cancel()
        if not results.done():
            results.cancel()
            results.add_done_callback(_taken)
            log.info(
                "%s %s: the client hung up before its answer; its %d requests were cancelled",
                request.method,
                request.url.path,
                len(streams),
            )
            return self.Response(status_code=499)  # nobody reads it
        try:
            done = results.result()
        except ServiceError as exc:
            return self.error(_engine_failed(exc))
        except (ValueError, TypeError) as exc:  # the engine ended a request it had taken (its adapter unreadable)
            return self.error(_refusal(exc, chat))
        generated = sum(r.completion_tokens for r, c in zip(done, choices, strict=True) if c.generates)
        usage = usage_body(submitted.prompt_tokens, generated, _cached([r.num_cached_tokens for r in done], parsed.n))
        answers: list[Choice] = []
        tool_calls: list[list[dict[str, Any]] | None] = []
        reasoning: list[str] = []
        for r, choice in zip(done, choices, strict=True):
            text, logprobs = self._shape(parsed, choice, r, chat, r.stop_string)
            finish = r.finish_reason if choice.generates else "length"
            calls, thought = None, ""
            if choice.reader is not None:  # the reply's content is what the reader leaves of it
                text, thought, found = choice.read(text, end=True, cut_short=finish == "length")
                if found:
                    text, calls = text.strip(), [tool_call_body(c) for c in found]
                    finish = choice.calls_finish if finish == "stop" else finish
            answers.append((text, finish, logprobs))
            tool_calls.append(calls)
            reasoning.append(thought)
        if chat:
            body = chat_body(rid, parsed.model, answers, usage, tool_calls, reasoning)
        else:
            body = completion_body(rid, parsed.model, answers, usage)
        self.service.metrics.response(200)
        return self.JSONResponse(body)

    async def _events(self, parsed: ParsedRequest, submitted: _Submitted, rid: str, chat: bool) -> AsyncIterator[bytes]:
        """The server-sent events of a streamed request; cancels its requests however it ends (a disconnect
        cancels this generator)."""
        streams, choices = submitted.streams, submitted.choices
        created = int(time.time())
        completion_tokens = [0] * len(streams)
        cached: list[int | None] = [None] * len(streams)  # each request's prefix-cache hit, once its engine said

        def sse(event: dict[str, Any]) -> bytes:  # with include_usage every chunk has a usage: null but the last
            return _sse(event | {"usage": event.get("usage")} if parsed.include_usage else event)

        # the role first: a forced call's reply has no content (OpenAI's null), a text reply "" so far
        first = {"role": "assistant", "content": None if parsed.tool_choice in ("required", "named") else ""}
        try:
            if chat:
                for i in range(len(streams)):
                    yield sse(choice_chunk(CHAT_CHUNK, rid, parsed.model, created, i, {"delta": first}, None, None))
            async for index, delta in _merged(streams):
                choice = choices[index]
                if choice.generates:
                    completion_tokens[index] = delta.completion_tokens
                if delta.num_cached_tokens is not None:
                    cached[index] = delta.num_cached_tokens
                text, logprobs = self._shape(parsed, choice, delta, chat, streams[index].stop_string)
                finish = delta.finish_reason if choice.generates or delta.finish_reason is None else "length"
                if choice.reader is not None:
                    for event in _read_chunks(rid, parsed.model, created, index, choice, text, finish, logprobs):
                        yield sse(event)
                    continue
                if not text and finish is None:
                    continue  # tokens that settle no text yet (a split character, a possible stop string)
                if chat:
                    content = {"content": text} if text or finish is None else {}
                    event = choice_chunk(
                        CHAT_CHUNK, rid, parsed.model, created, index, {"delta": content}, finish, None, logprobs
                    )
                else:
                    event = choice_chunk(
                        COMPLETION_CHUNK, rid, parsed.model, created, index, {"text": text}, finish, None, logprobs
                    )
                yield sse(event)
            if parsed.include_usage:
                usage = usage_body(submitted.prompt_tokens, sum(completion_tokens), _cached(cached, parsed.n))
                if chat:
                    yield _sse(choice_chunk(CHAT_CHUNK, rid, parsed.model, created, None, {}, None, usage))
                else:
                    yield _sse(choice_chunk(COMPLETION_CHUNK, rid, parsed.model, created, None, {}, None, usage))
        except ServiceError as exc:
            yield _sse(error_body(_engine_failed(exc)))
        except (ValueError, TypeError) as exc:  # the engine ended a request it had taken (its adapter unreadable)
            yield _sse(error_body(_refusal(exc, chat)))
        except (GeneratorExit, asyncio.CancelledError):  # the client hung up
            log.info("a client hung up during its stream %s; its %d requests were cancelled", rid, len(streams))
            raise
        finally:
            for s in streams:
                s.cancel()
        yield b"data: [DONE]\n\n"


def _read_chunks(
    rid: str,
    model: str,
    created: int,
    index: int,
    choice: _Choice,
    text: str,
    finish: str | None,
    logprobs: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """The chunks of a streamed reply that is read (for tool calls, or for its harmony channels), for its next
    ``text``: the reasoning and the content settled (with the logprobs), then each call completed as OpenAI streams
    one (its id, type and name, then its arguments), then the finish (``"tool_calls"`` when the reply called tools
    and stopped, ``"stop"`` for a named function's call, as OpenAI's)."""
    content, reasoning, calls = choice.read(text, end=finish is not None, cut_short=finish == "length")
    events = []
    if content or reasoning or logprobs is not None:
        delta = ({"reasoning_content": reasoning} if reasoning else {}) | ({"content": content} if content else {})
        events.append(choice_chunk(CHAT_CHUNK, rid, model, created, index, {"delta": delta}, None, None, logprobs))
    for k, call in enumerate(calls, start=choice.called - len(calls)):
        head = {"index": k, **tool_call_body(call, arguments="")}
        events.append(
            choice_chunk(CHAT_CHUNK, rid, model, created, index, {"delta": {"tool_calls": [head]}}, None, None)
        )
        tail = {"index": k, "function": {"arguments": call.arguments}}
        events.append(
            choice_chunk(CHAT_CHUNK, rid, model, created, index, {"delta": {"tool_calls": [tail]}}, None, None)
        )
    if finish is not None:
        why = choice.calls_finish if choice.called and finish == "stop" else finish
        events.append(choice_chunk(CHAT_CHUNK, rid, model, created, index, {"delta": {}}, why, None))
    return events


def _cached(hits: Sequence[int | None], n: int) -> int | None:
    """The usage's ``cached_tokens`` of a response's requests (``hits``: each one's prefix-cache hit, None where
    its engine did not say; ``n`` consecutive requests per prompt): counted once per prompt, as ``prompt_tokens``
    is (its first choice's that says), summed over the prompts; None where no engine said (the usage then leaves the
    field out)."""
    said = [next((h for h in hits[i : i + n] if h is not None), None) for i in range(0, len(hits), n)]
    return sum(h for h in said if h is not None) if any(h is not None for h in said) else None


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, delta) of several streams as they come; one stream is read directly."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                await queue.put((i, delta))
        except BaseException as exc:
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _disconnected(request: Any) -> None:
    """Return when the client hangs up (the body was read: the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@contextmanager
def _response_format_errors(field: str = "response_format") -> Iterator[None]:
    """The text layer's refusals of a grammar (and a missing llguidance) as a 400 naming ``field``, the request
    field that asked for it (the text layer's messages name ``response_format``)."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise APIError(f"{field}: {exc}", field, code="unsupported_value") from None
    except (ValueError, TypeError) as exc:
        text = _said(str(exc), 600)  # llguidance's own refusals (grammar_from's) as well as the text layer's
        if not text.startswith("response_format"):
            text = f"response_format: {text}"
        raise APIError(field + text.removeprefix("response_format"), field) from None


@contextmanager
def _tool_grammar_errors(grammar_field: str) -> Iterator[None]:
    """The text layer's refusals of a tool-call grammar as a 400 naming the field at fault: ``tools`` (a function's
    ``parameters``), the response's grammar field (``response_format``, ``guided_json``), else ``tool_choice``."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        text = str(exc)
        head = text.split(":", 1)[0].split("[", 1)[0]
        if head == "response_format":
            raise APIError(grammar_field + text.removeprefix("response_format"), grammar_field) from None
        raise APIError(text, "tools" if head == "tools" else "tool_choice") from None


def _continued(rendered: str, content: str) -> str:
    """``rendered`` (a chat rendered without the generation prompt) cut right after the last message's text, so
    that the model continues that message (``continue_final_message``, as transformers' and vLLM's: its text as
    given, else stripped, where the template stripped it). 400 when the template does not show the text."""
    for text in (content, content.strip()):
        at = rendered.rfind(text)
        if at >= 0:
            return rendered[: at + len(text)]
    raise APIError(
        "continue_final_message: the chat template does not show the last message's text as given, so it cannot "
        "be continued; send add_generation_prompt: true without continue_final_message",
        "continue_final_message",
    )


def _too_large(limit: int, size: str) -> APIError:
    """The 413 of a body over ``limit`` bytes (``size``: what it was found to be)."""
    return APIError(
        f"the request body is {size}, over this server's limit of {limit} bytes (fi-engine serve --max-request-bytes)",
        None,
        status=413,
        code="request_too_large",
    )


def _engine_failed(exc: BaseException) -> APIError:
    """The 500 of an engine that failed: a fault of the server's, no ``code`` (as OpenAI's 500s)."""
    return APIError(str(exc), status=500, type="server_error", code=None)


def _taken(future: asyncio.Future[Any]) -> None:
    """Take a cancelled gathering's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _server_paths(service: GenerationService) -> list[tuple[str, str]]:
    """The server's own file paths that messages of the text layer may hold (the checkpoint's folder, as given and
    resolved), each with what a client is told instead: ``.../chat_template.jinja`` becomes ``chat_template.jinja``,
    the folder itself ``the checkpoint``. Longest first, so that one inside another is replaced whole."""
    codec = service.codec
    if codec is None:
        return []
    folders = {str(codec.tokenizer.source.parent), str(codec.tokenizer.source.parent.resolve())}
    pairs = [(f"{f}/", "") for f in folders] + [(f, "the checkpoint") for f in folders]
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _named(exc: BaseException, default: str) -> APIError:
    """A ValueError/TypeError of the text layer or the service as a 400: its leading ``name:`` as the param."""
    text = str(exc)
    head = text.split(":", 1)[0].split("[", 1)[0]
    param = head if head in ("prompt", "prompts", "messages", "stop", "max_new_tokens") else default
    return APIError(text, {"prompts": "prompt", "max_new_tokens": "max_tokens"}.get(param, param))


# the request field of each SamplingParams field an engine may refuse (``"logprobs: not supported by this engine"``)
_SAMPLING_FIELDS = {f.name: f.name for f in fields(SamplingParams)} | {
    "prompt_logprobs": "echo",
    "grammar": "response_format",
    "response_format": "response_format",  # an engine's matcher refusing the grammar (fi_engine.text.grammar)
    "lora": "model",  # the request's adapter (its model): unloaded meanwhile, or its folder unreadable
}


def _unavailable(exc: RuntimeError) -> APIError:
    """The 503 of a request that came once the service closed (or its engine process ended)."""
    return APIError(str(exc), None, status=503, type="service_unavailable", code="unavailable")


def _refusal(exc: BaseException, chat: bool, grammar_field: str = "response_format") -> APIError:
    """The engine's refusal of a request as a 400: a prompt longer than it serves, or a sampling field it cannot
    honour (named by the message's head; a grammar by ``grammar_field``, the request field that asked for it)."""
    text = str(exc)
    head = text.split(":", 1)[0]
    if head in _SAMPLING_FIELDS:
        param = "logprobs" if chat and head == "logprobs" else _SAMPLING_FIELDS[head]
        param = grammar_field if param == "response_format" else param
        return APIError(f"the engine cannot serve this request: {text}", param, code="unsupported_value")
    param = "max_tokens" if text.startswith("max_new_tokens") else "messages" if chat else "prompt"
    return APIError(f"the engine cannot serve this request: {text}", param, code="context_length_exceeded")


def check_quantization(quantization: Any) -> str | None:
    """``quantization`` (a ``quant_method`` name, or None) as given; TypeError naming it otherwise."""
    if quantization is not None and (not isinstance(quantization, str) or not quantization):
        raise TypeError(f"quantization: expected a quant_method name such as 'awq', or None, got {quantization!r:.80}")
    return quantization


def check_api_key(api_key: Any) -> str | None:
    """``api_key`` (None: no key asked) as given; TypeError/ValueError naming it unless it is printable ASCII without
    blanks (what an ``Authorization`` header carries)."""
    if api_key is None:
        return None
    if not isinstance(api_key, str):
        raise TypeError(f"api_key: expected a str or None, got {type(api_key).__name__}")
    if not api_key or not all("!" <= c <= "~" for c in api_key):
        raise ValueError("api_key: expected a non-empty key of printable ASCII characters without blanks")
    return api_key


def check_origins(allowed_origins: Any) -> tuple[str, ...]:
    """``allowed_origins`` (CORS: ``["*"]``, or origins such as ``"https://app.example"``; empty: no CORS headers)
    as a tuple; TypeError/ValueError naming it otherwise."""
    if isinstance(allowed_origins, (str, bytes)) or not isinstance(allowed_origins, Sequence):
        raise TypeError(f"allowed_origins: expected a list of origins such as ['*'], got {allowed_origins!r:.80}")
    for i, origin in enumerate(allowed_origins):
        if not isinstance(origin, str) or not origin.strip():
            raise ValueError(f"allowed_origins[{i}]: expected an origin such as 'https://app.example' or '*'")
    return tuple(o.strip() for o in allowed_origins)


_OPEN_PATHS = ("/health", "/metrics")  # what --api-key leaves open, as vLLM's does


class _Faults:
    """ASGI middleware around the routes: an exception that escapes them is a fault of the server's own, logged
    once with its traceback and answered 500 in OpenAI's shape (``code`` null) where the response has not started;
    a response already started (a stream) is ended where it is. (Starlette's own handler of exceptions logs them
    and then raises them again, for uvicorn to log a second time.)"""

    def __init__(self, app: Any, answer: Callable[[], Any]) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = False

        async def watched(message: Any) -> None:
            nonlocal started, ended
            started = started or message["type"] == "http.response.start"
            ended = ended or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:
                await self.answer()(scope, receive, send)
            elif not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})


class _KeyCheck:
    """ASGI middleware: every request but a CORS preflight (``OPTIONS``) and ``/health`` and ``/metrics`` (open, as
    vLLM's ``--api-key`` leaves them) must carry ``Authorization: Bearer <key>`` (compared in constant time), else
    401 in OpenAI's shape (``code: invalid_api_key``)."""

    def __init__(self, app: Any, key: str, deny: Callable[[bool], Any]) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()
        self.deny = deny

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # the path the router matches: without a root path the server runs under (uvicorn --root-path puts it in
        # front of scope["path"]), so that no prefix carries a request past the check; every path but the two open
        # ones is checked, those without a route too
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and path not in _OPEN_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            if given is None or not hmac.compare_digest(given, self.expected):
                await self.deny(given is None)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _seconds(name: str, value: Any) -> float:
    """``value`` as seconds > 0 (finite); TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected seconds (a number), got {value!r:.80}")
    if not 0 < value < 1e6:
        raise ValueError(f"{name}: expected seconds > 0, got {value!r}")
    return float(value)


def check_max_request_bytes(max_request_bytes: Any) -> int:
    """``max_request_bytes`` (an int >= 1024: a request's body can be no smaller) as given; TypeError/ValueError
    naming it otherwise."""
    if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int):
        raise TypeError(f"max_request_bytes: expected an int (bytes), got {max_request_bytes!r:.80}")
    if max_request_bytes < 1024:
        raise ValueError(f"max_request_bytes: expected at least 1024 bytes, got {max_request_bytes}")
    return max_request_bytes


def build_app(
    service: GenerationService,
    model_names: str | Sequence[str],
    *,
    max_model_len: int | None = None,
    close_timeout: float = 30.0,
    quantization: str | None = None,
    api_key: str | None = None,
    allowed_origins: Sequence[str] = ("*",),
    max_request_bytes: int = MAX_REQUEST_BYTES,
    body_timeout_s: float = BODY_TIMEOUT_S,
    grammar_timeout_s: float = GRAMMAR_TIMEOUT_S,
    lora_modules: Sequence[str] | None = None,
    allow_runtime_lora_updating: bool | None = None,
    shared_engine: bool = False,
) -> Any:
    """The server's Starlette application.

    Args:
        service: the :class:`~fi_engine.serve.service.GenerationService` every request goes to (it needs a codec).
        model_names: the name(s) the model answers to (``model`` of a request; the first is the default).
        max_model_len: the engine's longest request in tokens (``/v1/models`` reports it; a chat without
            ``max_tokens`` may generate up to it); None: unknown.
        close_timeout: seconds the service gets, once the server stops, to finish what uvicorn's own grace left.
        quantization: the ``quant_method`` of the weights served (``"awq"``, ``"gptq"``, ``"fp8"``, ...; the names of
            vLLM's ``--quantization``), which ``/v1/models`` reports; None: 16-bit weights (not reported).
        api_key: where given, every ``/v1`` request must send ``Authorization: Bearer <api_key>`` (the openai
            client's ``api_key``), else 401 (``code: invalid_api_key``); ``/health`` and ``/metrics`` stay open.
            None: no key is checked.
        allowed_origins: the origins browsers may call from (CORS, Starlette's ``CORSMiddleware``: any method and
            header, no credentials); default ``("*")``: any, as vLLM's; empty: no CORS headers.
        max_request_bytes: the largest request body taken; a larger one is answered 413 (default
            :data:`MAX_REQUEST_BYTES`, 32 MiB).
        body_timeout_s: the most seconds between two parts of a request's body, else 408 (:data:`BODY_TIMEOUT_S`).
        grammar_timeout_s: the most seconds a request's grammar may take to compile, else 400
            (:data:`GRAMMAR_TIMEOUT_S`).
        lora_modules: the names of the LoRA adapters the engine serves from the start (``[]``: none yet); a
            request whose ``model`` is one is served with it, and ``/v1/models`` lists them with the base model as
            ``parent`` (:mod:`fi_engine.serve.lora_api`). None (default): the engine serves no adapters.
        allow_runtime_lora_updating: open ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (the
            engine's ``load_lora`` / ``unload_lora``); None (default): where ``FI_ENGINE_ALLOW_RUNTIME_LORA_UPDATING``
            is ``1`` or ``true``. Closed, they answer 404 naming the variable.
        shared_engine: other API servers serve the same engine (``--api-servers N``,
            :mod:`fi_engine.serve.api_servers`): the adapters they load or unload are learned from the engine, asked
            for its adapters' names (one round trip) where a request's ``model`` is no name this server knows, where
            the engine refuses a request's adapter, for ``/v1/models`` and before a load or unload; a request naming
            an adapter already known costs no round trip, and none is asked where run-time loading is off (the
            adapters cannot change). False (default): this server is the engine's only one.
    """
    applications = _require("starlette.applications")
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    names = [model_names] if isinstance(model_names, str) else list(model_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"model_names: expected a non-empty name or list of names, got {model_names!r:.80}")
    if not isinstance(service, GenerationService):
        raise TypeError(f"service: expected a fi_engine.serve.service.GenerationService, got {type(service).__name__}")
    runtime = check_runtime_lora_updating(allow_runtime_lora_updating)
    if not isinstance(shared_engine, bool):
        raise TypeError(f"shared_engine: expected True or False, got {show(shared_engine)}")
    h = _Handlers(
        service,
        names,
        max_model_len,
        check_quantization(quantization),
        check_max_request_bytes(max_request_bytes),
        _seconds("body_timeout_s", body_timeout_s),
        _seconds("grammar_timeout_s", grammar_timeout_s),
        ServedAdapters(lora_modules, names, runtime, shared_engine),
    )
    key, origins = check_api_key(api_key), check_origins(allowed_origins)

    async def http_error(request: Any, exc: Any) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        what = f"{request.method} {request.url.path}: {exc.detail}"
        return h.error(APIError(what, None, status=exc.status_code, code=code))

    def fault() -> Any:  # a bug of ours (_Faults logged it): answered as JSON, without the details
        return h.error(APIError("internal server error", status=500, type="server_error", code=None))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        h.compiler.shutdown(wait=False, cancel_futures=True)
        h.reader.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, service.close, close_timeout)

    routes = [
        Route("/health", h.health, methods=["GET"]),
        Route("/metrics", h.metrics, methods=["GET"]),
        Route("/v1/models", h.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", h.retrieve_model, methods=["GET"]),
        Route("/v1/completions", h.completions, methods=["POST"]),
        Route("/v1/chat/completions", h.chat_completions, methods=["POST"]),
        Route("/v1/load_lora_adapter", h.load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", h.unload_lora_adapter, methods=["POST"]),
    ]
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    def deny(missing: bool) -> Any:
        what = (
            "no API key was sent: send it in an Authorization header (Authorization: Bearer YOUR_KEY; the openai "
            "client's api_key)"
            if missing
            else "incorrect API key provided: send the key the server was started with (--api-key)"
        )
        return h.error(APIError(what, None, status=401, code="invalid_api_key"))

    middleware = []  # the outermost first: CORS answers preflights and marks every answer, a 401 and a 500 included
    if origins:
        middleware.append(
            Middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["*"], allow_headers=["*"])
        )
    middleware.append(Middleware(_Faults, answer=fault))
    if key is not None:
        middleware.append(Middleware(_KeyCheck, key=key, deny=deny))
    return applications.Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error}, lifespan=lifespan
    )


class _Deadline:
    """One connection's deadline for what it waits for: a request's line and headers, or the rest of a body already
    answered (a 413). Armed once for a wait, so bytes that trickle in do not move it; ``expire`` closes the
    transport where the wait is still on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: Any, client: Any) -> None:
        self.loop, self.transport, self.client = loop, transport, client
        self.handle: asyncio.TimerHandle | None = None
        self.waiting: str | None = None  # "head", "body" or None (a request being served)

    def wait(self, what: str | None, seconds: float) -> None:
        if what != self.waiting:
            self.cancel()
            self.waiting = what
            if what is not None:
                self.handle = self.loop.call_later(seconds, self.expire)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def expire(self) -> None:
        self.handle = None
        if self.waiting is not None and not self.transport.is_closing():
            log.debug("closing a connection from %s: its request did not come in time", self.client)
            self.transport.close()


def _timed_protocol(http: str, header_timeout_s: float, body_timeout_s: float) -> type:
    """uvicorn's HTTP/1.1 protocol ``http`` (``"h11"``, or ``"httptools"``: uvicorn's C parser, about a fifth less
    of a streaming server's time a token event) with the timeouts it lacks: a connection is closed when a request's
    line and headers are not in within ``header_timeout_s`` of the wait for them (from the connection's start, or
    the previous response; uvicorn's keep-alive timeout is cancelled by any byte that comes), or when the rest of a
    body already answered (a 413) is still coming ``body_timeout_s`` after the answer."""
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        class TimedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc]  # uvicorn's classes are untyped here
            deadline: _Deadline
            body_done = True  # the last request's body is all in

            def connection_made(self, transport: Any) -> None:
                super().connection_made(transport)
                self.deadline = _Deadline(self.loop, transport, self.client)
                self.deadline.wait("head", header_timeout_s)

            def on_headers_complete(self) -> None:
                self.body_done = False
                self.deadline.wait(None, 0.0)
                super().on_headers_complete()

            def on_message_complete(self) -> None:
                self.body_done = True
                super().on_message_complete()
                if self.cycle is not None and self.cycle.response_complete and self.deadline.waiting == "body":
                    self.deadline.wait("head", header_timeout_s)  # the answered body's end: the next request's wait

            def on_response_complete(self) -> None:
                super().on_response_complete()  # (starts a pipelined request, whose head is in, if one waits)
                if self.cycle is not None and not self.cycle.response_complete:
                    self.deadline.wait(None, 0.0)  # a pipelined request is being served
                else:
                    what = "head" if self.body_done else "body"
                    self.deadline.wait(what, header_timeout_s if self.body_done else body_timeout_s)

            def connection_lost(self, exc: Exception | None) -> None:
                self.deadline.wait(None, 0.0)
                super().connection_lost(exc)

        return TimedHttpToolsProtocol

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):  # type: ignore[misc]  # uvicorn's classes are untyped here
        deadline: _Deadline

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.deadline = _Deadline(self.loop, transport, self.client)
            self.watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self.deadline.wait(None, 0.0)
            super().connection_lost(exc)

        def watch(self) -> None:
            """The wait the connection is in, from h11's states: for a request's head, or for the end of a body
            already answered; none while a request is being served."""
            if self.conn.their_state is h11.IDLE:
                self.deadline.wait("head", header_timeout_s)
            elif self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE:
                self.deadline.wait("body", body_timeout_s)
            else:
                self.deadline.wait(None, 0.0)

    return TimedH11Protocol


def http_protocols() -> tuple[str, ...]:
    """The HTTP/1.1 protocols :func:`uvicorn_config` can run here: ``"httptools"`` where uvicorn's C parser is
    installed (the ``serve`` extra's), and ``"h11"``."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return ("h11",)
    return ("httptools", "h11")


def uvicorn_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    graceful_s: float = 30.0,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
    http: str = "auto",
) -> Any:
    """uvicorn's ``Config`` for :func:`build_app`'s ``app`` as the server runs it: its lifespan on, ``graceful_s``
    seconds for open responses at shutdown, HTTP/1.1 through ``http`` (``"auto"``: httptools where it is installed,
    else h11, as uvicorn picks; :func:`http_protocols`) with the header and body timeouts uvicorn lacks
    (``header_timeout_s``, ``body_timeout_s``: :data:`HEADER_TIMEOUT_S`, :data:`BODY_TIMEOUT_S`), and its
    keep-alive timeout (5 s: an idle connection closes). ValueError naming ``http`` where it is none of those."""
    protocols = http_protocols()
    if http == "auto":
        http = protocols[0]
    elif http not in protocols:
        raise ValueError(f"http: expected 'auto' or one of {protocols} (installed here), got {http!r:.40}")
    uvicorn = _require("uvicorn")
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_s,
        lifespan="on",
        http=_timed_protocol(
            http, _seconds("header_timeout_s", header_timeout_s), _seconds("body_timeout_s", body_timeout_s)
        ),
        timeout_keep_alive=5,
    )


def serve(
    service: GenerationService,
    model_names: str | Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_model_len: int | None = None,
    graceful_s: float = 30.0,
    log_level: str = "info",
    quantization: str | None = None,
    api_key: str | None = None,
    allowed_origins: Sequence[str] = ("*",),
    max_request_bytes: int = MAX_REQUEST_BYTES,
    lora_modules: Sequence[str] | None = None,
    allow_runtime_lora_updating: bool | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM: uvicorn on ``host:port`` (:func:`uvicorn_config`) with :func:`build_app`
    (``api_key``, ``allowed_origins``, ``max_request_bytes``, ``lora_modules``, ``allow_runtime_lora_updating``: its
    arguments); on the signal, stop taking connections, give open responses ``graceful_s`` seconds, then close the
    service (cancelling what is left)."""
    app = build_app(
        service,
        model_names,
        max_model_len=max_model_len,
        close_timeout=graceful_s,
        quantization=quantization,
        api_key=api_key,
        allowed_origins=allowed_origins,
        max_request_bytes=max_request_bytes,
        lora_modules=lora_modules,
        allow_runtime_lora_updating=allow_runtime_lora_updating,
    )
    uvicorn = _require("uvicorn")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    config = uvicorn_config(app, host=host, port=port, log_level=log_level, graceful_s=graceful_s)
    uvicorn.Server(config).run()

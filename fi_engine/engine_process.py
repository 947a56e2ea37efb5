"""A :class:`~fi_engine.stepping.StepEngine` whose engine runs in a process of its own: :class:`EngineProcess`.

Why: a server is two loops in one interpreter -- the engine's (launch a step, wait for the GPU, hand out its tokens)
and the HTTP event loop's (a JSON event per stream per token) -- and Python runs one thread at a time. Measured on
an H100 with the SmolLM2-135M checkpoint at 64 streams, a decode step that takes the engine 1.3 ms alone took
5.3 ms inside the server: after each GPU wait the engine thread queued for the interpreter behind the event loop.
In a child process the engine steps at its own pace, back to back, and sends each step's tokens in one message; the
server process only turns them into text and HTTP events (as vLLM splits its engine core from its API server).

The child is started with ``spawn`` (a fresh interpreter: CUDA state is never forked) and builds the engine itself
from ``factory`` (``"module:callable"``) and its arguments. It runs a step whenever it has work, handling the
parent's messages between steps; ``add_requests`` is a round trip (each request's id, or the engine's refusal as
its ``ValueError`` / ``TypeError``), ``abort_request`` is not (its slot is freed before the child's next step).
:meth:`EngineProcess.step` returns every output the child sent since the last call, waiting for one when there is
none yet. An error in the child (or the child's death) is raised by the next call, naming it.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import sys
from collections.abc import Sequence
from typing import Any

from .sampling_params import SamplingParams
from .stepping import StepOutput

__all__ = ["EngineProcess"]

# what the engine raises for a bad argument or checkpoint, raised again as itself in the parent (its message names
# the argument); anything else from the child is a RuntimeError naming its type
_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "ImportError": ImportError,
    "ModuleNotFoundError": ModuleNotFoundError,
}


def _child(conn: Any, factory: str, args: tuple[Any, ...], kwargs: dict[str, Any], path: list[str]) -> None:
    """The child's loop: build the engine, then step while there is work and serve the parent's messages."""
    sys.path[:] = path
    try:
        module, _, name = factory.partition(":")
        engine = getattr(importlib.import_module(module), name)(*args, **kwargs)
        max_batch = int(engine.max_batch)
        max_seq_len = getattr(engine, "max_seq_len", None)
    except BaseException as exc:  # the parent raises it from its constructor
        from fi_ffi.errors import FiFFIError

        # fi_ffi's errors (no GPU, a driver too old, ...) are worded for the user: passed on as they are
        conn.send(("error", "FiFFIError" if isinstance(exc, FiFFIError) else type(exc).__name__, str(exc)))
        return
    conn.send(("ready", max_batch, max_seq_len if isinstance(max_seq_len, int) else None))
    try:
        while True:
            aborted = False  # an abort's output comes from the next step, which runs even with nothing left
            while conn.poll(0) or not (engine.has_unfinished or aborted):  # idle: block for the next message
                msg = conn.recv()
                if msg[0] == "close":
                    return
                if msg[0] == "abort":
                    engine.abort_request(msg[1])
                    aborted = True
                elif msg[0] == "add":
                    replies: list[tuple[Any, str | None, str]] = []
                    for prompt, max_new, sampling, eos in msg[1]:
                        try:
                            rid = engine.add_request(prompt, max_new, sampling=sampling, eos_token_ids=eos)
                            replies.append((rid, None, ""))
                        except (ValueError, TypeError) as exc:
                            replies.append((None, type(exc).__name__, str(exc)))
                    conn.send(("added", replies))
            outs = engine.step()
            if outs:
                conn.send(("out", [(o.rid, tuple(o.token_ids), o.finish_reason) for o in outs]))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent went away or was interrupted
        return
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, str(exc)))
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()


class EngineProcess:
    """The engine ``factory(*args, **kwargs)`` (``factory`` a ``"module:callable"`` string, e.g.
    ``"fi_engine.engines:open_engine"``) built and stepped in a child process; serve it like the engine itself
    (``GenerationService(EngineProcess(...), codec)``). ``start_timeout``: seconds the child may take to build
    the engine (loading a checkpoint onto the GPU). Close it (or use it as a context manager) to end the child.

    Raises the engine's ValueError / TypeError / ImportError when it refuses its arguments or checkpoint, and
    RuntimeError naming the child's error otherwise. As with any ``spawn``-started process, a script that makes
    one must do it under ``if __name__ == "__main__":`` (the child imports the script's main module).
    """

    def __init__(self, factory: str, *args: Any, start_timeout: float = 900.0, **kwargs: Any) -> None:
        if not isinstance(factory, str) or ":" not in factory:
            raise TypeError(f"factory: expected 'module:callable', got {factory!r:.60}")
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child, factory, args, kwargs, list(sys.path)), daemon=True)
        self._proc.start()
        child.close()
        self._live: set[int] = set()
        self._outputs: list[StepOutput] = []
        self._closed = False
        try:
            msg = self._receive(start_timeout, building=True)
        except BaseException:
            self.close()
            raise
        self.max_batch: int = msg[1]
        self.max_seq_len: int | None = msg[2]  # the engine's, where it has one (a server's max_model_len)

    def _receive(self, timeout: float | None, building: bool = False) -> Any:
        if not self._conn.poll(timeout):
            raise RuntimeError(f"engine process: no answer within {timeout} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"engine process: the child exited (status {self._proc.exitcode})") from None
        if msg[0] == "error":
            kind, text = msg[1], msg[2]
            if building and kind in _ERRORS:  # a bad argument or checkpoint: the engine's own words
                raise _ERRORS[kind](text)
            if building and kind == "FiFFIError":  # no GPU, a driver too old, ...: fi_ffi's own words
                raise RuntimeError(text)
            raise RuntimeError(f"engine process: {kind}: {text}")
        return msg

    def _take_outputs(self, msg: Any) -> None:
        for rid, tokens, finish in msg[1]:
            self._outputs.append(StepOutput(rid, tokens, finish))
            if finish is not None:
                self._live.discard(rid)

    def add_requests(self, requests: Sequence[tuple[Sequence[int], int, SamplingParams | None, Any]]) -> list[Any]:
        """Queue several ``(prompt, max_new_tokens, sampling, eos_token_ids)`` at once (one round trip); each
        one's request id, or the ``ValueError`` / ``TypeError`` the engine refused it with."""
        self._check_open()
        self._conn.send(("add", [(list(p), m, s, None if e is None else list(e)) for p, m, s, e in requests]))
        while True:  # outputs sent before the reply are kept for step()
            msg = self._receive(None)
            if msg[0] == "out":
                self._take_outputs(msg)
                continue
            results: list[Any] = []
            for rid, kind, text in msg[1]:
                if rid is None:
                    results.append(_ERRORS.get(kind, ValueError)(text))
                else:
                    self._live.add(rid)
                    results.append(rid)
            return results

    def add_request(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: SamplingParams | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> int:
        """One request (see :meth:`add_requests`): its id, or the engine's ValueError / TypeError raised."""
        (result,) = self.add_requests([(prompt, max_new_tokens, sampling, eos_token_ids)])
        if isinstance(result, Exception):
            raise result
        return int(result)

    def abort_request(self, rid: int) -> None:
        """End request ``rid`` (the child aborts it before its next step; its ``"abort"`` output follows)."""
        self._check_open()
        self._conn.send(("abort", rid))

    @property
    def has_unfinished(self) -> bool:
        """Whether a request added here has not yet reported its end."""
        return bool(self._live)

    def step(self) -> list[StepOutput]:
        """The outputs of every step the child ran since the last call (waiting for the next one when none has
        come yet and a request is unfinished)."""
        self._check_open()
        if not self._outputs and self._live:
            self._take_outputs(self._expect_outputs())
        while self._conn.poll(0):
            self._take_outputs(self._expect_outputs())
        outs, self._outputs = self._outputs, []
        return outs

    def _expect_outputs(self) -> Any:
        msg = self._receive(None)
        if msg[0] != "out":
            raise RuntimeError(f"engine process: unexpected message {msg[0]!r}")
        return msg

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("engine: closed")

    def close(self) -> None:
        """Stop the child (its engine closed there) and wait for it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(BrokenPipeError, OSError):  # a child already gone
            self._conn.send(("close",))
        self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
        self._conn.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

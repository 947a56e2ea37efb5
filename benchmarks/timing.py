"""Shared timing helpers of the benchmark scripts: host time per call over many back-to-back calls."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any


def per_call_us(
    fn: Callable[[], Any], n: int = 20_000, warm: int = 500, sync: Callable[[], Any] | None = None, repeats: int = 3
) -> float:
    """Best of ``repeats`` runs of the mean host time of one call of ``fn``, in microseconds.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each timed loop so queued GPU work from the warm-up
    does not stall the host inside the loop; the loop itself never synchronizes.
    """
    for _ in range(warm):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if sync is not None:
            sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


class Report:
    """Rows of (name, us/call) printed as a table with ratios against named baselines.

    :meth:`measure` only registers a contender; the first :meth:`print` or :meth:`dump` times them all in
    interleaved rounds (round r times every contender once, in turn) and keeps each one's best round, so
    that drift on a shared machine affects every contender alike and the ratios of one run stay fair.
    """

    def __init__(self, title: str, rounds: int = 5) -> None:
        self.title = title
        self.rounds = rounds
        self.rows: dict[str, float | None] = {}
        self._pending: list[tuple[str, Callable[[], Any], dict[str, Any]]] = []

    def measure(self, name: str, fn: Callable[[], Any], **kw: Any) -> None:
        """Register ``fn`` under ``name``; ``kw``: ``n`` calls per round, ``warm`` calls, ``sync`` callable."""
        self.rows[name] = None
        self._pending.append((name, fn, kw))

    def run(self) -> None:
        """Time every registered contender (see the class docstring); a failing one is reported as unavailable."""
        live = []
        for name, fn, kw in self._pending:
            try:
                per_call_us(fn, n=1, warm=kw.get("warm", 500), repeats=1)
                live.append((name, fn, kw))
            except Exception as exc:  # a peer that is missing or broken is reported, not fatal
                print(f"  {name}: unavailable ({type(exc).__name__}: {exc})")
        self._pending.clear()
        best = {name: float("inf") for name, _, _ in live}
        for _ in range(self.rounds):
            for name, fn, kw in live:
                value = per_call_us(fn, n=kw.get("n", 20_000), warm=0, sync=kw.get("sync"), repeats=1)
                best[name] = min(best[name], value)
        self.rows.update(best)

    def ratio(self, ours: str, peer: str) -> float | None:
        a, b = self.rows.get(ours), self.rows.get(peer)
        return None if a is None or b is None else a / b

    def print(self, ratios: list[tuple[str, str]]) -> None:
        self.run()
        print(f"\n{self.title}")
        for name, value in self.rows.items():
            shown = "unavailable" if value is None else f"{value:8.3f} us/call"
            print(f"  {name:62s} {shown}")
        for ours, peer in ratios:
            r = self.ratio(ours, peer)
            print(f"  ratio {ours} / {peer}: {'n/a' if r is None else f'{r:.2f}x'}")

    def dump(self, path: str, ratios: list[tuple[str, str]]) -> None:
        self.run()
        data = {
            "title": self.title,
            "us_per_call": self.rows,
            "ratios": {f"{a} / {b}": self.ratio(a, b) for a, b in ratios},
        }
        with open(path, "w") as fh:
            json.dump(data, fh, indent=2)


def decode_plan(fi_ffi: Any, ws: Any, indptr_h: Any, last_h: Any, *dims: int, **kw: Any) -> Any:
    """``fi_ffi.batch_decode_plan`` of ``dims`` (query heads, KV heads, head dim, page size) in the spelling of the
    fi_ffi given: flashinfer's order (``indptr, indices, last_page_len, ..., workspace=``) or, for a tree from before
    the port (``--before``), the old one (``workspace, kv_indptr, ..., kv_last_page_len=``)."""
    plan = fi_ffi.batch_decode_plan
    if _takes_workspace_first(plan):
        return plan(ws, indptr_h, *dims, kv_last_page_len=last_h, **kw)
    return plan(indptr_h, None, last_h, *dims, workspace=ws, **kw)


@functools.cache
def _takes_workspace_first(plan: Any) -> bool:
    """Whether ``plan`` is the old spelling (``workspace`` first); read once per function (``inspect.signature``
    costs about 100 us, more than the plan call being timed)."""
    import inspect

    return next(iter(inspect.signature(plan).parameters)) == "workspace"


@functools.cache
def _flashinfer_order(function: Any) -> bool:
    """Whether ``function`` (an op of the fi_ffi given) takes flashinfer's ``paged_kv_cache`` (a tree from after the
    port) rather than ``k_cache, v_cache`` (one from before it: ``--before``)."""
    import inspect

    return "paged_kv_cache" in inspect.signature(function).parameters


def append_args(fi_ffi: Any, nk: Any, nv: Any, bi: Any, pos: Any, k: Any, v: Any, *pages: Any) -> tuple[Any, ...]:
    """``append_paged_kv_cache``'s positional arguments in the given fi_ffi's spelling (``pages``: indices, indptr,
    last page lengths)."""
    if _flashinfer_order(fi_ffi.append_paged_kv_cache):
        return (nk, nv, bi, pos, (k, v), *pages)
    return (nk, nv, bi, pos, k, v, *pages)


def decode_run_call(fi_ffi: Any, q: Any, k: Any, v: Any, indptr: Any, indices: Any, last: Any, out: Any) -> Any:
    """``run(plan)``: ``batch_decode_run`` of one layer in the given fi_ffi's spelling."""
    run = fi_ffi.batch_decode_run
    if _flashinfer_order(run):
        pair = (k, v)
        return lambda plan: run(
            q, pair, plan=plan, kv_indptr=indptr, kv_indices=indices, kv_last_page_len=last, out=out
        )
    return lambda plan: run(plan, q, k, v, indptr, indices, last, out)


def prepare_decode(
    fi_ffi: Any, q: Any, k: Any, v: Any, indptr: Any, indices: Any, last: Any, out: Any, plan: Any
) -> Any:
    """``prepare_decode_run`` of one layer in the given fi_ffi's spelling."""
    if _flashinfer_order(fi_ffi.prepare_decode_run):
        return fi_ffi.prepare_decode_run(
            q, (k, v), kv_indptr=indptr, kv_indices=indices, kv_last_page_len=last, out=out, plan=plan
        )
    return fi_ffi.prepare_decode_run(q, k, v, indptr, indices, last, out, plan=plan)

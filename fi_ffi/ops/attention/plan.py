"""The Plan object: a module's schedule for one batch, and what its runs must agree with.

A :class:`Plan` owns the ``Array<int>`` a module's ``plan`` entry point returned (the schedule's offsets into
the int workspace) and refers to its :class:`~.plan_settings.PlanSettings` (module, heads, head dims,
page size, KV layout, dtypes, mask mode, window, soft cap, scales), its workspace, and its per-batch sizes. A
run with tensors that disagree is a ValueError/TypeError raised before the kernel is called, never a wrong
answer.

Ownership: the Array is released exactly once, by :meth:`Plan.release` (idempotent; a context manager exit
calls it) or when the Plan is garbage-collected. A released plan cannot be run. A plan can be reused for any
number of runs (every layer of a step), until the next plan on the same workspace overwrites the schedule in
the int workspace: from then on it is stale and running it is a ValueError.

The tensors a plan was given for its runs (a custom mask and its offsets, ALiBi slopes) are referenced by the
plan, as the caller gave them, until it is released; each run passes them to the kernel as TVM-FFI Tensor
objects made for that call and released right after it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

from ... import caches
from ...abi.objects import ARRAY, Array
from ...launch.registry import op
from .plan_settings import PlanSettings

__all__ = ["PlanSettings", "Schedule"]  # public here, not ops of fi_ffi; the ops: @op below

_NO_INPUTS = (None, None, None)


class RunContext(int):
    """The launchers' ``context`` of a plan's runs: what their tensors are checked against, (settings, batch size).

    An int (a token) standing for that pair of values: :func:`run_context` gives every equal pair the same token
    and never gives a token to two pairs (tokens are not reused, also after its table is emptied), so a token
    in a launcher's key is as good as the pair, and hashing and comparing it costs what an int costs (the pair's
    hash would call ``PlanSettings.__hash__``, a Python function, on every run). ``settings`` and ``batch`` are
    the pair; unpacking gives them (``s, b = context``), as the runs' checks read it.
    """

    settings: PlanSettings
    batch: int

    def __iter__(self) -> Iterator[Any]:
        return iter((self.settings, self.batch))

    def __repr__(self) -> str:
        return f"RunContext({int(self)}: batch {self.batch}, {self.settings!r})"


_contexts: dict[tuple[PlanSettings, int], RunContext] = {}
_tokens = itertools.count(1)
_contexts_lock = threading.Lock()
_MAX_CONTEXTS = 4096


def run_context(settings: PlanSettings, batch_size: int) -> RunContext:
    """The :class:`RunContext` of (``settings``, ``batch_size``): one token per pair of values."""
    key = (settings, batch_size)
    found = _contexts.get(key)
    if found is None:
        with _contexts_lock:
            found = _contexts.get(key)
            if found is None:
                if len(_contexts) >= _MAX_CONTEXTS:
                    _contexts.clear()  # the next pairs get new tokens: an old token is never given again
                found = RunContext(next(_tokens))
                found.settings = settings
                found.batch = batch_size
                _contexts[key] = found
    return found


caches.register("attention run contexts (settings and batch size, by value)", _contexts.clear)


class Schedule:
    """What every plan object shares: it owns a module's schedule (the ``Array<int>`` a plan call returned) made
    on a workspace at one generation, and reads its settings through ``_s``.

    The Array is released exactly once, by :meth:`release` (idempotent; a ``with`` exit calls it) or when the
    object is garbage-collected. The schedule is reusable until the next plan on the same workspace overwrites
    it: from then on the object is :attr:`stale`.
    """

    __slots__ = (
        "__weakref__",
        "_context",
        "_generation",
        "_info",
        "_s",
        "batch_size",
        "kv_extent",
        "num_rows",
        "workspace",
    )

    _info: Array
    _s: Any
    workspace: Any
    _generation: int
    batch_size: int
    num_rows: int
    kv_extent: int
    _context: Any  # what the launchers check a run's tensors against (values only)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._s, name)

    @property
    def released(self) -> bool:
        """True once the schedule has been released."""
        return not self._info.handle

    @property
    def stale(self) -> bool:
        """True if a later plan on the same workspace (or closing it) has overwritten this schedule."""
        ws = self.workspace
        return ws is not None and ws._generation != self._generation

    @property
    def info(self) -> list[int]:
        """The schedule vector as plain ints (diagnostics)."""
        return self._info.to_list()

    def release(self) -> None:
        """Release the schedule now (idempotent). Runs already enqueued are unaffected."""
        self._info.release()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def refuse(self) -> None:
        """Raise the ValueError of a plan that cannot run: released, or stale."""
        if not self._info.handle:
            raise ValueError("plan: has been released")
        raise ValueError(
            "plan: is stale: another plan was made on its workspace since (or the workspace was "
            "closed), which overwrote its schedule; plan again"
        )


@op()
class Plan(Schedule):
    """The result of a ``plan`` call: the module's schedule plus what runs must match.

    Per plan: ``workspace``, ``batch_size``, ``num_rows`` (query rows, ``qo_indptr[-1]``; the batch size for
    decode), ``kv_extent`` (``kv_indptr[-1]``: pages, or tokens for ragged). Shared with every plan of the same
    settings (:class:`~fi_ffi.ops.attention.plan_settings.PlanSettings`, read through the plan): ``kind``
    (``"batch_decode"`` / ``"batch_prefill"``), ``mode`` (``"paged"`` / ``"ragged"``), ``variant``, ``uri``,
    ``backend``, ``device_id``, ``num_qo_heads``, ``num_kv_heads``, ``head_dim_qk``, ``head_dim_vo``,
    ``page_size``, ``kv_layout``, ``dtype_q``, ``dtype_kv``, ``dtype_o``, ``mask_mode``, ``window_left``,
    ``logits_soft_cap``, ``sm_scale``, ``rope_scale``, ``rope_theta``, ``enable_cuda_graph``.

    Raises:
        ValueError: a run given this plan after :meth:`release`, or with tensors that do not match what it was
            planned for (batch size, rows, heads, page size, module), each named by the run.
    """

    __slots__ = ("_inputs",)

    _s: PlanSettings

    def __init__(
        self,
        info: Array,
        workspace: Any = None,
        *,
        batch_size: int = 0,
        num_rows: int = 0,
        kv_extent: int = 0,
        **settings: Any,
    ) -> None:
        """Take ownership of ``info`` (an Array a plan call returned). Ops use :meth:`make`; tests may use this."""
        if not isinstance(info, Array) or info.type_index != ARRAY:
            raise TypeError(f"info: expected an owned Array, got {type(info).__name__}")
        if workspace is not None:
            settings.setdefault("device_id", workspace.device.device_id)
        generation = workspace._generation if workspace is not None else 0
        self.make(info, workspace, generation, PlanSettings(**settings), batch_size, num_rows, kv_extent, into=self)

    @classmethod
    def make(
        cls,
        info: Array,
        workspace: Any,
        generation: int,
        settings: PlanSettings,
        batch_size: int,
        num_rows: int,
        kv_extent: int,
        inputs: tuple[Any, Any, Any] = _NO_INPUTS,
        *,
        into: Plan | None = None,
    ) -> Plan:
        """The plan of a schedule ``info`` returned by a plan call on ``workspace`` at ``generation``.

        ``inputs``: (custom_mask, mask_indptr, alibi_slopes) as the caller gave them (or None), passed to runs.
        ``into``: the plan to fill (``Plan(...)`` fills itself here, after its checks); None: a new one, made
        without ``__init__``'s checks (the ops' arguments are already checked).
        """
        plan = object.__new__(cls) if into is None else into
        plan._info = info
        plan.workspace = workspace
        plan._generation = generation
        plan._s = settings
        plan.batch_size = batch_size
        plan.num_rows = num_rows
        plan.kv_extent = kv_extent
        plan._inputs = inputs
        # The launchers' context for runs of this plan: what their tensors were checked against (values only).
        plan._context = run_context(settings, batch_size)
        return plan

    @property
    def refcount(self) -> int:
        """Strong reference count of the owned Array (0 once released); diagnostics and tests."""
        return self._info.refcount

    def release(self) -> None:
        """Release the schedule now (idempotent), and drop the run inputs. Runs already enqueued are unaffected."""
        self._info.release()
        self._inputs = _NO_INPUTS

    def __repr__(self) -> str:
        s = self._s
        state = "released" if self.released else ("stale" if self.stale else "live")
        return (
            f"<Plan {s.kind}/{s.mode} {s.backend} batch={self.batch_size} heads={s.num_qo_heads}/"
            f"{s.num_kv_heads} head_dim={s.head_dim_qk} page={s.page_size} {s.kv_layout} {state}>"
        )

    def check_runnable(self, kind: str, mode: str) -> None:
        """Raise unless this plan is live, current on its workspace, and of ``kind``/``mode``."""
        s = self._s
        if s.kind != kind or s.mode != mode:
            raise ValueError(f"plan: expected a {kind} plan for {mode} KV, got a {s.kind} plan for {s.mode} KV")
        if not self._info.handle or self.workspace is None or self.workspace._generation != self._generation:
            self.refuse()

"""The engine's constructor arguments as one value: :class:`EngineSettings`, every argument checked once when it is
made (a TypeError or ValueError naming the argument, what it takes and the fix), before the checkpoint is read or
any GPU work; :meth:`EngineSettings.sizes` resolves the sizes left to their defaults against the model's config.

Every engine class takes these as keywords (``LlamaEngine(model_dir, max_batch=8, cuda_graph=True)``) and keeps the
value it made as ``engine.settings``; a family engine with arguments of its own declares only those
(:func:`with_settings`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..lora.settings import LoraSettings
from .sched.pages import pages_for

__all__ = ["EngineSettings", "EngineSizes"]


def _positive(name: str, value: Any) -> int:
    """A size the engine allocates by (tokens, pages, rows): an int in ``[1, 2**31)`` (the kernels' int32)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 1 << 31:
        # an int is shown as its value (1000000000000); only one too long to print is shown by its size
        huge = isinstance(value, int) and value.bit_length() > 192
        shown = f"an integer of {value.bit_length()} bits" if huge else value if isinstance(value, int) else repr(value)
        raise ValueError(f"{name}: expected a positive integer below 2**31 (an int32 size), got {shown!s:.60}")
    return value


@dataclass(frozen=True)
class EngineSizes:
    """The sizes an engine allocates by, resolved against its model (:meth:`EngineSettings.sizes`)."""

    max_batch: int
    """Batch slots: requests decoded together."""
    page_size: int
    """Tokens per KV-cache page."""
    max_seq_len: int
    """The most tokens (prompt + generated) per request."""
    num_pages: int
    """KV-cache pages, page 0 (the padding page) included."""
    max_prefill_tokens: int
    """The most prompt tokens prefilled together (the activation buffers' rows)."""


@dataclass(frozen=True)
class EngineSettings:
    """An engine's constructor arguments (:class:`~fi_engine.runtime.engine.Engine` documents each), checked when
    made: a TypeError or ValueError naming the first bad one. ``kv_cache_dtype`` is kept normalized (``"auto"`` or
    ``"fp8_e4m3"``), ``kv_cache_scales`` as a pair of floats, ``lora`` as
    :class:`~fi_engine.lora.settings.LoraSettings` (or None); the sizes left None take their defaults from the model
    (:meth:`sizes`)."""

    max_batch: int = 32
    page_size: int = 16
    max_seq_len: int | None = None
    num_pages: int | None = None
    max_prefill_tokens: int | None = None
    cuda_graph: bool = False
    device: int | None = None
    tensor_parallel: int = 1
    comm: Any = None
    fused_allreduce: bool = True
    vocab_parallel: bool = True
    kv_cache_dtype: str | None = "auto"
    kv_cache_scales: tuple[float, float] | None = None
    lora: LoraSettings | dict[str, Any] | None = None  # kept as a LoraSettings (or None)

    def __post_init__(self) -> None:
        from ..layers import kv_fp8

        # the flags before anything reads them: a truthy string would otherwise switch a path on
        for name in ("cuda_graph", "fused_allreduce", "vocab_parallel"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected True or False, got {value!r:.40}")
        device = self.device
        ordinal = isinstance(device, int) and not isinstance(device, bool) and 0 <= device < 1 << 16
        if device is not None and not ordinal:
            raise ValueError(f"device: expected None or a CUDA device ordinal (an int >= 0), got {str(device)[:40]}")
        comm = self.comm
        if comm is not None and not all(hasattr(comm, a) for a in ("world_size", "rank", "device")):
            raise TypeError(
                f"comm: expected None or a communicator (fi_ffi.comm.Communicator), got {type(comm).__name__}"
            )
        _positive("tensor_parallel", self.tensor_parallel)
        # frozen: the normalized values are written past __setattr__, once, here
        object.__setattr__(self, "kv_cache_dtype", kv_fp8.parse_kv_cache_dtype(self.kv_cache_dtype))
        object.__setattr__(self, "kv_cache_scales", kv_fp8.parse_scales(self.kv_cache_scales))
        if self.kv_cache_dtype != "fp8_e4m3" and self.kv_cache_scales is not None:
            raise ValueError("kv_cache_scales: only an FP8 KV cache has scales; pass kv_cache_dtype='fp8_e4m3'")
        object.__setattr__(self, "lora", LoraSettings.of(self.lora))
        if self.lora is not None and self.tensor_parallel > 1:
            raise ValueError(
                f"lora: adapters are served on one GPU; tensor_parallel is {self.tensor_parallel} (adapters sharded "
                f"over the ranks are a next step): serve them with tensor_parallel=1"
            )
        _positive("max_batch", self.max_batch)
        _positive("page_size", self.page_size)
        for name in ("max_seq_len", "num_pages", "max_prefill_tokens"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))

    def sizes(self, config: Any) -> EngineSizes:
        """The sizes for a model of ``config`` (this rank's: ``max_position_embeddings``), the defaults filled in:
        ``max_seq_len`` ``min(max_position_embeddings, 4096)``, ``num_pages`` enough for ``max_batch`` requests of
        ``max_seq_len`` tokens plus the padding page, ``max_prefill_tokens`` ``max(max_seq_len, max_batch)``. A
        default that is no int32 size is refused naming its argument (pass it explicitly)."""
        max_seq_len = _positive(
            "max_seq_len",
            self.max_seq_len if self.max_seq_len is not None else min(config.max_position_embeddings, 4096),
        )
        per_request = pages_for(max_seq_len, self.page_size)
        num_pages = _positive(
            "num_pages", self.num_pages if self.num_pages is not None else self.max_batch * per_request + 1
        )
        max_prefill_tokens = _positive(
            "max_prefill_tokens",
            self.max_prefill_tokens if self.max_prefill_tokens is not None else max(max_seq_len, self.max_batch),
        )
        return EngineSizes(self.max_batch, self.page_size, max_seq_len, num_pages, max_prefill_tokens)


_Init = TypeVar("_Init", bound=Callable[..., None])


def with_settings(init: _Init) -> _Init:
    """Show ``init`` (a family engine's ``__init__(self, model_dir, *, its own keywords, **settings)``, which passes
    ``**settings`` on to :class:`~fi_engine.runtime.engine.Engine`) with :class:`EngineSettings`' keywords in place
    of ``**settings``: ``inspect.signature`` and ``help`` then list every argument the constructor takes, as
    :class:`~fi_engine.runtime.engine.Engine`'s own signature does, without the class restating them."""
    own = inspect.signature(init)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in dataclasses.fields(EngineSettings)
        if f.name not in names
    ]
    init.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    return init

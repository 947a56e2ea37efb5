"""An engine's LoRA settings (:class:`LoraSettings`): how many adapters the GPU holds at once, how many the host keeps
read, the largest rank, and the adapters to load when the engine opens. Checked when made; :meth:`LoraSettings.of`
takes the engine's ``lora`` argument (None, a dict of these keys, or a LoraSettings)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ..values import show

__all__ = ["MAX_LORAS", "MAX_LORA_RANK", "LoraSettings", "adapter_name"]

MAX_LORA_RANK = 512
"""The largest ``max_lora_rank`` (the kernels' limit: :mod:`fi_engine.kernels.lora_bgmv`)."""

MAX_LORAS = 1024
"""The most GPU slots (``max_loras``)."""


def adapter_name(lora_name: object, field: str = "lora_name") -> str:
    """``lora_name`` if it can name an adapter: a str of 1 to 128 printable characters, no whitespace (it is a
    request's ``model`` too); else TypeError/ValueError naming ``field`` (the argument or body field it came in)."""
    if not isinstance(field, str):
        raise TypeError(f"field: expected the name of the field the adapter's name came in (a str), got {show(field)}")
    if not isinstance(lora_name, str):
        raise TypeError(f"{field}: expected an adapter's name (a str), got {type(lora_name).__name__}")
    if not 0 < len(lora_name) <= 128 or not lora_name.isprintable() or any(c.isspace() for c in lora_name):
        raise ValueError(f"{field}: expected 1 to 128 printable characters without spaces, got {show(lora_name)}")
    return lora_name


def _count(field: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"lora: {field}: expected an int in [{lo}, {hi}], got {show(value)}")
    return value


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters served per request (:mod:`fi_engine.lora`).

    Args:
        max_loras: GPU slots: the most adapters the requests of one batch may use (default 1, vLLM's). A request
            whose adapter finds every slot in use by other adapters' requests waits for one.
        max_cpu_loras: adapters kept read on the host, packed for a slot (default ``max_loras``; at least that):
            one not kept is read from its folder again when a request needs it.
        max_lora_rank: the largest adapter rank served (default 16, vLLM's; at most :data:`MAX_LORA_RANK`); every
            slot is this rank, so a smaller one costs as much GPU memory and reading as this.
        modules: the adapters loaded when the engine opens, ``(name, path)`` pairs (a mapping of name to path is
            accepted).
    """

    max_loras: int = 1
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    modules: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _count("max_loras", self.max_loras, 1, MAX_LORAS)
        _count("max_lora_rank", self.max_lora_rank, 1, MAX_LORA_RANK)
        cpu = self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras
        _count("max_cpu_loras", cpu, self.max_loras, 1 << 16)
        object.__setattr__(self, "max_cpu_loras", cpu)
        modules = self.modules
        items = list(modules.items()) if isinstance(modules, Mapping) else modules
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
            raise TypeError(f"lora: modules: expected (name, path) pairs or a mapping, got {type(modules).__name__}")
        pairs: list[tuple[str, str]] = []
        for i, item in enumerate(items):
            if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[1], str):
                raise TypeError(f"lora: modules[{i}]: expected a (name, path) pair of str, got {show(item)}")
            name = adapter_name(item[0], f"lora: modules[{i}]")
            if any(name == n for n, _ in pairs):
                raise ValueError(f"lora: modules[{i}]: the name {name!r} is given twice")
            pairs.append((name, item[1]))
        object.__setattr__(self, "modules", tuple(pairs))

    @classmethod
    def of(cls, lora: object) -> LoraSettings | None:
        """The engine's ``lora`` argument as settings: None (no adapters), a LoraSettings, or a dict of its
        fields (``{}``: the defaults); TypeError/ValueError naming ``lora`` or the field otherwise."""
        if lora is None or isinstance(lora, LoraSettings):
            return lora
        if not isinstance(lora, Mapping):
            raise TypeError(f"lora: expected None, a dict of LoRA settings or LoraSettings, got {type(lora).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k)[:40] for k in lora if k not in known)
        if unknown:
            raise ValueError(f"lora: unknown setting(s) {show(unknown)}; the settings are {', '.join(sorted(known))}")
        return cls(**dict(lora))

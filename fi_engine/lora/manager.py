"""The adapters an engine serves (:class:`LoraManager`): their names and folders, the packed adapters kept on the
host (least recently used dropped past ``max_cpu_loras``, read again from their folder when needed), and the GPU
slots (:class:`~fi_engine.lora.slots.SlotTable`) a request's adapter is copied into when it is admitted. The
scheduler asks it for a slot per request (:meth:`LoraManager.acquire`, :meth:`LoraManager.release`); nothing here
launches a kernel, so it is tested on CPU with a stand-in for the device's copy."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .adapter import BaseShapes, read_adapter
from .settings import LoraSettings, adapter_name
from .slots import PackedAdapter, SlotLayout, SlotTable, pack

__all__ = ["LoraManager", "LoraStats"]


@dataclass
class LoraStats:
    """Counters since the engine opened: adapters copied into a GPU slot (``swap_ins``) and the seconds those took
    on the host (reading, packing and queueing the copies: ``swap_in_s``), adapters read from their folder
    (``reads``)."""

    swap_ins: int = 0
    swap_in_s: float = 0.0
    reads: int = 0


@dataclass(frozen=True)
class _Loaded:
    path: str
    key: tuple[str, int]  # ("lora", the load's serial): a reload under the same name is another adapter


class LoraManager:
    """The adapters of an engine whose base model has ``base`` shapes, under ``settings``; ``write(slot, packed)``
    copies a packed adapter into a GPU slot (:meth:`DeviceSlots.write <fi_engine.lora.device.DeviceSlots.write>`),
    ``clear(slot)`` empties one."""

    def __init__(
        self,
        settings: LoraSettings,
        base: BaseShapes,
        write: Callable[[int, PackedAdapter], None],
        clear: Callable[[int], None] = lambda slot: None,
    ) -> None:
        self.settings = settings
        self.base = base
        self.layout = SlotLayout.of(base, settings.max_lora_rank)
        self.table = SlotTable(settings.max_loras)
        self.stats = LoraStats()
        self._write, self._clear = write, clear
        self._loaded: dict[str, _Loaded] = {}
        self._host: OrderedDict[tuple[str, int], PackedAdapter] = OrderedDict()  # least recently used first
        self._serial = 0
        for i, (name, path) in enumerate(settings.modules):
            try:
                self.load(name, path)
            except ValueError as exc:  # which of the adapters given it is
                raise ValueError(f"lora: modules[{i}] ({name!r}): {exc}") from None

    @property
    def names(self) -> list[str]:
        """The adapters' names, in the order they were loaded."""
        return list(self._loaded)

    def path(self, name: str) -> str:
        """The folder ``name`` was loaded from."""
        return self._entry(name).path

    def load(self, name: str, path: str) -> None:
        """Read and check the adapter of folder ``path`` (:func:`~fi_engine.lora.adapter.read_adapter`) and serve it
        as ``name``; kept on the host (it is copied to a GPU slot when a request needs it). ValueError where the
        name is taken or the adapter does not fit the base model (naming the key)."""
        name = adapter_name(name)
        if name in self._loaded:
            raise ValueError(f"lora_name: an adapter named {name!r} is loaded already; unload it first")
        packed = self._read(path)
        self._serial += 1
        entry = self._loaded[name] = _Loaded(str(path), ("lora", self._serial))
        self._keep(entry.key, packed)

    def unload(self, name: str) -> None:
        """Stop serving ``name``: dropped from the host and its GPU slot. ValueError for an unknown name, or one a
        request still uses (the caller checks its queue first)."""
        entry = self._entry(name)
        slot = self.table.slot_of(entry.key)
        if slot is not None and self.table.pins[slot]:
            raise ValueError(f"lora_name: {name!r} is in use by {self.table.pins[slot]} request(s); unload it once "
                             f"they finish")  # fmt: skip
        if slot is not None:
            self.table.drop(entry.key)
            self._clear(slot)
        self._host.pop(entry.key, None)
        del self._loaded[name]

    def key(self, name: object) -> tuple[str, int]:
        """The key of adapter ``name``: what a request holds, the slot table's key and the prefix cache's
        ``extra_key`` (a cached prefix of one adapter never serves another, nor the base). ValueError naming
        ``lora`` for a name not loaded."""
        if not isinstance(name, str):
            raise TypeError(f"lora: expected an adapter's name (a str) or None, got {type(name).__name__}")
        return self._entry(name, "lora").key

    def acquire(self, key: tuple[str, int]) -> int | None:
        """A GPU slot holding adapter ``key`` for one more request (copied in where it was not there: read from its
        folder again if the host dropped it), or None where every slot is in use by other adapters' requests.
        ValueError naming ``lora`` and the adapter where its folder can no longer be read (moved, deleted or changed
        since it was loaded): the request is refused, the adapter stays loaded (unload it, or load it again)."""
        got = self.table.acquire(key)
        if got is None:
            return None
        slot, new = got
        if new:
            start = time.perf_counter()
            try:
                try:
                    packed = self._packed(key)
                except (ValueError, OSError) as exc:  # (an OSError's text names the path: its kind only)
                    why = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__} reading it"
                    name = next((n for n, e in self._loaded.items() if e.key == key), "?")
                    raise ValueError(f"lora: the adapter {name!r} could not be read again from its folder (it had "
                                     f"left the host's {self.settings.max_cpu_loras} kept adapters): {why}; load it "
                                     f"again") from None  # fmt: skip
                self._write(slot, packed)
            except BaseException:
                self.table.release(slot)
                self.table.drop(key)
                raise
            self.stats.swap_ins += 1
            self.stats.swap_in_s += time.perf_counter() - start
        return slot

    def release(self, slot: int) -> None:
        """A request using ``slot`` left."""
        self.table.release(slot)

    def in_use(self, name: str) -> int:
        """Active requests using adapter ``name`` (0 for one in no slot)."""
        slot = self.table.slot_of(self._entry(name).key)
        return 0 if slot is None else self.table.pins[slot]

    def _entry(self, name: str, field: str = "lora_name") -> _Loaded:
        entry = self._loaded.get(name)
        if entry is None:
            known = ", ".join(repr(n) for n in self._loaded) or "none"
            raise ValueError(f"{field}: no adapter named {name!r:.140} is loaded (loaded: {known:.400})")
        return entry

    def _read(self, path: str) -> PackedAdapter:
        packed = pack(read_adapter(path, self.base, self.settings.max_lora_rank), self.layout)
        self.stats.reads += 1
        return packed

    def _keep(self, key: tuple[str, int], packed: PackedAdapter) -> None:
        self._host[key] = packed
        self._host.move_to_end(key)
        while len(self._host) > (self.settings.max_cpu_loras or 1):
            self._host.popitem(last=False)

    def _packed(self, key: tuple[str, int]) -> PackedAdapter:
        """Adapter ``key`` packed: the host's copy, else read from its folder again (and kept)."""
        packed = self._host.get(key)
        if packed is None:
            path = next(e.path for e in self._loaded.values() if e.key == key)
            packed = self._read(path)
            self._keep(key, packed)
        else:
            self._host.move_to_end(key)
        return packed

    def describe(self) -> dict[str, Any]:
        """The adapters and slots as plain values (names, which slot each is in, the slots' pins) for reports."""
        slots = {self.table.keys.index(e.key): n for n, e in self._loaded.items() if e.key in self.table.keys}
        return {"adapters": self.names, "slots": slots, "pins": list(self.table.pins)}

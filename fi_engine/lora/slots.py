"""Where adapters live while served: ``max_loras`` GPU slots, each holding one adapter's matrices in the layout the
kernels read (:func:`pack`, :class:`SlotLayout`), and the slot table (:class:`SlotTable`): which adapter is in which
slot, how many active requests use each, and which unused slot a new adapter takes (least recently used first).
Host-only: the device arrays are :mod:`fi_engine.lora.device`'s, which copies a packed adapter into a slot.

The layout, per projection group (:data:`GROUPS`: q/k/v stacked, o, gate/up stacked, down) with ``P`` parts of
output sizes ``n_p`` (``n = sum n_p``), input size ``k``, ``L`` layers and the engine's ``max_lora_rank`` ``R``:

- ``A [L, P * R, k]``: part ``p``'s ``A [rank, k]`` in rows ``[p R, p R + rank)``, zeros past the adapter's rank
  and for a part it does not adapt;
- ``Bt [L, R, n]``: ``B`` transposed, output column ``j`` of part ``p`` in column ``j``: ``Bt[:, off_p + c] =
  B_p[c, :]``, zeros likewise. The kernels' column split ``n0 = n_0``, ``n1 = n_0 + n_1`` names each column's part.

The scale (``lora_alpha / r``, or ``/ sqrt(r)``) is not folded into B: it is a float32 per slot, applied to the
shrink's float32 sums (so B keeps the adapter's own rounding).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..values import arg_int
from .adapter import BaseShapes, LoraAdapter
from .settings import MAX_LORAS

__all__ = ["GROUPS", "Group", "PackedAdapter", "SlotLayout", "SlotTable", "pack"]

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("o", ("o_proj",)),
    ("gate_up", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)
"""The projections the forward pass runs as one GEMM each (the stacked weights), by name, with their parts."""


@dataclass(frozen=True)
class Group:
    """One projection group of a base model: its name, its parts (modules) and their output sizes ``outs``, its
    input size ``k``, and ``bit``, its flag in a slot's targets (``1 << index`` in :data:`GROUPS`)."""

    name: str
    modules: tuple[str, ...]
    outs: tuple[int, ...]
    k: int
    bit: int

    @property
    def n(self) -> int:
        """Output columns of the stacked projection."""
        return sum(self.outs)

    @property
    def split(self) -> tuple[int, int]:
        """The expand kernel's ``(n0, n1)``: where the second and third parts' columns begin (``n``: no such part)."""
        bounds = np.cumsum(self.outs).tolist()
        return bounds[0], bounds[1] if len(bounds) > 2 else self.n


@dataclass(frozen=True)
class SlotLayout:
    """The slot arrays' shapes for a base model: its groups (those its forward adapts: :class:`BaseShapes`),
    layers and ``rank`` (the engine's ``max_lora_rank``)."""

    groups: tuple[Group, ...]
    num_layers: int
    rank: int

    @classmethod
    def of(cls, base: BaseShapes, rank: int) -> SlotLayout:
        """The layout of ``base``'s projection groups (those it has every part of, in :data:`GROUPS`' order) at slot
        rank ``rank``."""
        groups = []
        for i, (name, modules) in enumerate(GROUPS):
            if all(m in base.shapes for m in modules):
                k = base.shapes[modules[0]][1]
                groups.append(Group(name, modules, tuple(base.shapes[m][0] for m in modules), k, 1 << i))
        return cls(tuple(groups), base.num_layers, rank)

    def group(self, name: str) -> Group:
        """The group named ``name`` (``"qkv"``, ``"o"``, ``"gate_up"``, ``"down"``); ValueError naming ``name`` for
        one the base model lacks."""
        found = [g for g in self.groups if g.name == name]
        if not found:
            raise ValueError(
                f"name: {name!r:.40} is no projection group of this base ({[g.name for g in self.groups]})"
            )
        return found[0]

    def a_shape(self, g: Group) -> tuple[int, int, int]:
        """One slot's ``A`` of group ``g``: ``[layers, parts * rank, k]``."""
        return self.num_layers, len(g.modules) * self.rank, g.k

    def bt_shape(self, g: Group) -> tuple[int, int, int]:
        """One slot's ``Bt`` of group ``g``: ``[layers, rank, n]``."""
        return self.num_layers, self.rank, g.n

    @property
    def t_width(self) -> int:
        """The shrink's float32 entries per row at the most (the widest group's parts times the rank)."""
        return max(len(g.modules) for g in self.groups) * self.rank

    def slot_bytes(self, itemsize: int = 2) -> int:
        """Bytes of one slot's matrices."""
        return itemsize * sum(int(np.prod(self.a_shape(g))) + int(np.prod(self.bt_shape(g))) for g in self.groups)


@dataclass
class PackedAdapter:
    """An adapter in the slot layout (:func:`pack`): ``arrays[group] = (A, Bt)``, its float32 ``scale`` and
    ``targets`` (the bits of the groups it changes)."""

    arrays: dict[str, tuple[np.ndarray, np.ndarray]]
    scale: float
    targets: int

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.arrays.values())


def pack(adapter: LoraAdapter, layout: SlotLayout) -> PackedAdapter:
    """``adapter`` (read for this base: :func:`~fi_engine.lora.adapter.read_adapter`) in ``layout``'s arrays (the
    module docstring), in the adapter's 16-bit storage; a group the adapter leaves alone gets no arrays and no bit
    (the kernels skip it for this adapter's rows). TypeError/ValueError naming the argument for anything else."""
    if not isinstance(adapter, LoraAdapter):
        raise TypeError(f"adapter: expected a LoraAdapter (read_adapter's), got {type(adapter).__name__}")
    if not isinstance(layout, SlotLayout):
        raise TypeError(f"layout: expected the slots' SlotLayout, got {type(layout).__name__}")
    if not adapter.weights:
        raise ValueError("adapter: holds no A and B matrices (read_adapter refuses such a file)")
    if adapter.rank > layout.rank:  # (read_adapter refuses it first, naming the key)
        raise ValueError(f"adapter: rank {adapter.rank} exceeds the slots' rank {layout.rank}")
    r, big = adapter.rank, layout.rank
    storage = next(iter(adapter.weights.values()))[0].dtype
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    targets = 0
    for g in layout.groups:
        if not any(m in adapter.modules for m in g.modules):
            continue
        a = np.zeros(layout.a_shape(g), storage)
        bt = np.zeros(layout.bt_shape(g), storage)
        offsets = np.concatenate([[0], np.cumsum(g.outs)]).tolist()
        for (layer, module), (wa, wb) in adapter.weights.items():
            if module in g.modules:
                p = g.modules.index(module)
                a[layer, p * big : p * big + r] = wa
                bt[layer, :r, offsets[p] : offsets[p + 1]] = wb.T
        arrays[g.name] = (a, bt)
        targets |= g.bit
    return PackedAdapter(arrays, float(np.float32(adapter.scale)), targets)


class SlotTable:
    """Which adapter each of ``slots`` GPU slots holds (by key, any hashable; None: empty), how many active requests
    use each (pins), and the order they were last used in.

    :meth:`acquire` gives a request its adapter's slot: the one holding it already, else an empty slot, else the
    least recently used slot no request uses (its adapter leaves the GPU), else None (every slot is in use: the
    request waits for one, as vLLM's ``max_loras`` bounds the adapters of one batch). The caller copies the adapter
    in where :meth:`acquire` says it is new there; :meth:`release` unpins when the request leaves."""

    def __init__(self, slots: int) -> None:
        slots = arg_int("slots", slots, 1, MAX_LORAS)
        self.keys: list[object | None] = [None] * slots
        self.pins = [0] * slots
        self._recent: OrderedDict[int, None] = OrderedDict((i, None) for i in range(slots))  # least recent first

    def slot_of(self, key: object) -> int | None:
        """The slot holding ``key``'s adapter, or None."""
        try:
            return self.keys.index(key)
        except ValueError:
            return None

    def acquire(self, key: object) -> tuple[int, bool] | None:
        """Pin a slot for ``key``'s adapter: ``(slot, new)`` (``new``: the caller must copy the adapter in), or None
        where every slot is pinned by other adapters' requests."""
        slot = self.slot_of(key)
        new = slot is None
        if slot is None:
            free = [i for i in self._recent if self.pins[i] == 0]  # least recently used first
            empty = [i for i in free if self.keys[i] is None]
            if not free:
                return None
            slot = (empty or free)[0]
            self.keys[slot] = key
        self.pins[slot] += 1
        self._recent.move_to_end(slot)
        return slot, new

    def release(self, slot: int) -> None:
        """A request of ``slot``'s adapter left; TypeError/ValueError naming ``slot`` where it is no slot a request
        holds."""
        slot = arg_int("slot", slot, 0, len(self.pins) - 1)
        if self.pins[slot] == 0:
            raise ValueError(f"slot: {slot} is not held by any request")
        self.pins[slot] -= 1

    def drop(self, key: object) -> bool:
        """Forget ``key``'s adapter (unloaded): its slot becomes empty. False where no slot holds it; ValueError
        where requests still use it."""
        slot = self.slot_of(key)
        if slot is None:
            return False
        if self.pins[slot]:
            raise ValueError(f"slot: {slot} is in use by {self.pins[slot]} request(s)")
        self.keys[slot] = None
        return True

    def held(self) -> Iterable[object]:
        """The keys of the adapters in a slot."""
        return [k for k in self.keys if k is not None]

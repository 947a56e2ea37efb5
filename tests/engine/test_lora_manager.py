"""The adapters an engine serves, on CPU (:class:`fi_engine.lora.manager.LoraManager` with a recorder standing in
for the device's copy), and the scheduler over them: a request waits while every GPU slot is held by other
adapters' requests, a prefix cached for one adapter serves neither another nor the base model, and a request whose
adapter's folder is gone when it must be read again is aborted alone, with the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers.lora_adapters import llama_shapes, write_adapter

from fi_engine.lora.adapter import BaseShapes
from fi_engine.lora.manager import LoraManager
from fi_engine.lora.settings import LoraSettings
from fi_engine.lora.slots import PackedAdapter
from fi_engine.runtime.sched.kv_cache import KVCacheManager
from fi_engine.runtime.sched.scheduler import Scheduler

SHAPES = llama_shapes(64, 96, 4, 2, 16)
BASE = BaseShapes(2, "bfloat16", SHAPES)
PS = 16


class Device:
    """The GPU slots stood in for: what was copied into each slot, and the slots emptied."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, PackedAdapter]] = []
        self.cleared: list[int] = []

    def write(self, slot: int, packed: PackedAdapter) -> None:
        self.writes.append((slot, packed))

    def clear(self, slot: int) -> None:
        self.cleared.append(slot)


def adapters(tmp_path: Path, names: str = "abc") -> dict[str, str]:
    out = {}
    for i, n in enumerate(names):
        write_adapter(tmp_path / n, SHAPES, 2, 4, modules=("q_proj", "o_proj"), seed=i)
        out[n] = str(tmp_path / n)
    return out


def manager(tmp_path: Path, max_loras: int = 2, max_cpu_loras: int | None = None, names: str = "abc"):
    device = Device()
    paths = adapters(tmp_path, names)
    settings = LoraSettings(max_loras, max_cpu_loras, 8, tuple(paths.items()))
    return LoraManager(settings, BASE, device.write, device.clear), device, paths


def test_adapters_are_read_at_load_and_copied_in_when_a_request_needs_one(tmp_path: Path) -> None:
    m, device, paths = manager(tmp_path, max_loras=2, max_cpu_loras=3)
    assert m.names == ["a", "b", "c"] and m.stats.reads == 3 and device.writes == []
    a, b, c = (m.key(n) for n in "abc")
    assert len({a, b, c}) == 3
    assert m.acquire(a) == 0 and m.acquire(a) == 0  # the second request of a: no copy
    assert [s for s, _ in device.writes] == [0] and m.in_use("a") == 2
    assert m.acquire(b) == 1 and m.acquire(c) is None  # both slots held: c waits
    m.release(1)
    assert m.acquire(c) == 1  # b's slot, unpinned, least recently used
    assert [s for s, _ in device.writes] == [0, 1, 1] and m.stats.swap_ins == 3 and m.stats.reads == 3
    assert m.describe() == {"adapters": ["a", "b", "c"], "slots": {0: "a", 1: "c"}, "pins": [2, 1]}
    assert m.path("b") == paths["b"]


def test_an_adapter_the_host_dropped_is_read_again(tmp_path: Path) -> None:
    m, device, _ = manager(tmp_path, max_loras=1, max_cpu_loras=1)  # the host keeps one: c, the last loaded
    assert m.stats.reads == 3
    m.release(m.acquire(m.key("c")))  # kept: no read
    assert m.stats.reads == 3
    m.release(m.acquire(m.key("a")))  # dropped: read again (and kept, c dropped now)
    assert m.stats.reads == 4 and m.stats.swap_ins == 2 and [s for s, _ in device.writes] == [0, 0]
    m.release(m.acquire(m.key("c")))
    assert m.stats.reads == 5


def test_names_are_checked_and_a_reload_is_another_adapter(tmp_path: Path) -> None:
    m, device, paths = manager(tmp_path)
    with pytest.raises(ValueError, match=r"^lora_name: an adapter named 'a' is loaded already; unload it first"):
        m.load("a", paths["b"])
    with pytest.raises(ValueError, match=r"^lora: no adapter named 'zz' is loaded \(loaded: 'a', 'b', 'c'\)"):
        m.key("zz")
    with pytest.raises(TypeError, match=r"^lora: expected an adapter's name"):
        m.key(5)
    old = m.key("a")
    slot = m.acquire(old)
    with pytest.raises(ValueError, match=r"^lora_name: 'a' is in use by 1 request\(s\)"):
        m.unload("a")
    m.release(slot)
    m.unload("a")
    assert m.names == ["b", "c"] and device.cleared == [slot] and m.table.slot_of(old) is None
    m.load("a", paths["b"])
    assert m.key("a") != old  # a prefix cached under the old "a" serves the new one no more
    with pytest.raises(ValueError, match=r"^lora_name: no adapter named 'zz'"):
        m.unload("zz")
    with pytest.raises(ValueError, match=r"r: rank 4 exceeds the engine's max_lora_rank 2") as e:
        LoraManager(LoraSettings(1, None, 2, (("a", paths["a"]),)), BASE, Device().write)
    assert str(tmp_path) not in str(e.value)


# ------------------------------------------------------------------------------------------------- the scheduler


def scheduler(m: LoraManager, max_batch: int = 4, caching: bool = False) -> Scheduler:
    kv = KVCacheManager(64, PS)
    s = Scheduler(kv, PS, max_batch, 256, 512, 1000, ())
    s.adapters = m
    s.prefix_caching = caching
    return s


def test_a_request_waits_while_every_slot_is_held_by_other_adapters(tmp_path: Path) -> None:
    m, _, _ = manager(tmp_path, max_loras=2)
    s = scheduler(m)
    ra, rb, base, rc, ra2 = (s.submit([i + 1] * 5, 4, lora=n) for i, n in enumerate(["a", "b", None, "c", "a"]))
    assert s.admit() == [ra, rb, base]  # c finds both slots held: it waits, and a's second request behind it
    assert (ra.lora_slot, rb.lora_slot, base.lora_slot, rc.lora_slot) == (0, 1, -1, -1)
    assert list(s.pending) == [rc, ra2]
    s.record([ra, rb, base], [7, 7, 7], prefill=True)
    assert s.admit() == []  # still held
    s.abort(rb)  # b's only request leaves: its slot is unpinned
    assert s.admit() == [rc, ra2]
    assert (rc.lora_slot, ra2.lora_slot) == (1, 0) and m.table.pins == [2, 1]
    with pytest.raises(ValueError, match=r"^lora: 'x', but this engine serves no LoRA adapters"):
        Scheduler(KVCacheManager(64, PS), PS, 4, 256, 512, 1000, ()).submit([1, 2], 4, lora="x")
    with pytest.raises(ValueError, match=r"^lora: no adapter named 'x' is loaded"):
        s.submit([1, 2], 4, lora="x")
    assert s.submit([1, 2], 4, lora="a").speculative is False  # (drafts come from the base model)


def test_a_prefix_cached_for_one_adapter_serves_neither_another_nor_the_base(tmp_path: Path) -> None:
    m, _, _ = manager(tmp_path, max_loras=2)
    s = scheduler(m, caching=True)
    prompt = list(range(1, 3 * PS + 2))  # three full pages

    def served(lora: str | None) -> int:
        r = s.submit(prompt, 2, lora=lora)
        (admitted,) = s.admit()
        assert admitted is r
        s.record([r], [5], prefill=True)
        s.abort(r)  # leaves: its pages stay cached under its adapter
        return r.hit

    assert served("a") == 0
    assert served("a") == 3 * PS  # a's own prefix
    assert served("b") == 0 and served(None) == 0
    assert served("b") == 3 * PS and served(None) == 3 * PS


def test_an_adapter_whose_folder_is_gone_aborts_only_its_request(tmp_path: Path) -> None:
    m, _, paths = manager(tmp_path, max_loras=1, max_cpu_loras=1)  # a and b were dropped from the host at load
    shutil.rmtree(paths["a"])
    s = scheduler(m, max_batch=4)
    ra, rb, base, ra2 = (s.submit([i + 1] * 5, 4, lora=n) for i, n in enumerate(["a", "b", None, "a"]))
    # a cannot be read: aborted alone; b is read again and takes the one slot; the base request beside it; a's
    # second request finds the slot held by b's: it waits
    admitted = s.admit()
    assert admitted == [rb, base] and list(s.pending) == [ra2]
    assert ra.finish_reason == "abort" and s.refused == [ra]
    assert isinstance(ra.error, ValueError) and ra.slot == -1 and ra.pages == [] and ra.lora_slot == -1
    message = str(ra.error)
    assert message.startswith("lora: the adapter 'a' could not be read again from its folder")
    assert "lora_path: no such folder" in message and str(tmp_path) not in message
    assert m.table.keys == [m.key("b")] and m.table.pins == [1]  # a took no slot
    assert m.names == ["a", "b", "c"]  # still loaded: a request of it fails the same way until it is reloaded
    s.record(admitted, [7, 7], prefill=True)
    assert s.decode_rows(padded=False) == [rb, base]  # the others go on
    s.abort(rb)
    assert s.admit() == [] and ra2.finish_reason == "abort" and s.refused == [ra, ra2]  # its turn: the same end
    assert s.decode_rows(padded=False) == [base]
    s.refused.clear()
    m.unload("a")
    write_adapter(Path(paths["a"]), SHAPES, 2, 4, modules=("q_proj",))
    m.load("a", paths["a"])
    r = s.submit([9] * 5, 4, lora="a")
    assert s.admit() == [r] and r.lora_slot == 0 and s.refused == []

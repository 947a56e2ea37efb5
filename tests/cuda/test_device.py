"""fi_ffi.cuda.device: each device's properties read once, into the one cache every op asks.

This CPU machine has cuda-bindings but no driver, so the real runtime answers "no device": the unknown path is
tested with the real library (no mocks); the answers a GPU would give are placed in the cache by hand (on a GPU
machine the no-device checks are skipped; tests/cuda/test_gpu_device.py reads a real device).
"""

from __future__ import annotations

import pytest

from fi_ffi import caches
from fi_ffi.cuda import device
from fi_ffi.errors import UnsupportedDeviceError
from fi_ffi.ops.attention import variants, workspace

rt = pytest.importorskip("cuda.bindings.runtime")
needs_no_gpu = pytest.mark.skipif(
    int(rt.cudaGetDeviceCount()[0]) == 0, reason="a usable GPU is present: the runtime answers"
)
H100 = device.DeviceProperties((9, 0), 132, 32)


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an empty cache and leaves the process's as it was."""
    monkeypatch.setattr(device, "_properties", {})
    monkeypatch.setitem(caches._registry, "CUDA device properties (per ordinal)", device._properties.clear)


def test_the_cache_is_registered_and_emptied_by_caches_reset() -> None:
    assert "CUDA device properties (per ordinal)" in caches.names()
    device._properties[0] = H100
    caches.reset()
    assert device._properties == {}


def test_every_reader_takes_its_answer_from_the_one_cache() -> None:
    device._properties[0] = H100  # what a first read of an H100 leaves
    assert device.properties(0) is H100 and device.known_properties(0) is H100
    assert device.compute_capability(0) == (9, 0) and device.sm_count(0) == 132
    assert H100.max_resident_blocks == 132 * 32
    # the attention backend choice and the split-KV scratch bound read the same entry (no second cache)
    assert variants.sm_major(0) == 9
    assert workspace.tmp_bytes_needed(0, 4096, 1, 32, 8, 128, 2, prefill=False) == 16 * 32 * 260
    device._properties[0] = device.DeviceProperties((8, 0), 108, 32)
    assert variants.sm_major(0) == 8 and device.sm_count(0) == 108


@needs_no_gpu
def test_without_a_gpu_the_unknown_answer_is_remembered_and_the_raising_readers_say_why() -> None:
    assert device.known_properties(0) is None and variants.sm_major(0) is None
    assert device._properties == {0: None}  # asked once: the next plan does not ask the runtime again
    assert workspace.tmp_bytes_needed(0, 4096, 1, 32, 8, 128, 2, prefill=False) is None
    for read in (device.properties, device.compute_capability, device.sm_count):
        with pytest.raises(UnsupportedDeviceError, match=r"no CUDA device is available \(cudaDeviceGetAttribute"):
            read(0)


@pytest.mark.parametrize("bad", [-1, 2**31, 2**64, True, "0", 0.0, None])
def test_a_value_that_is_no_ordinal_is_unknown_and_not_remembered(bad: object) -> None:
    assert device.known_properties(bad) is None  # type: ignore[arg-type]
    assert device._properties == {}


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (-1, ValueError, r"device_id: expected a CUDA device ordinal in \[0, 2\*\*31\), got -1"),
        (2**31, ValueError, r"device_id: expected a CUDA device ordinal"),
        (True, TypeError, r"device_id: expected an int, got bool"),
        ("0", TypeError, r"device_id: expected an int, got str"),
    ],
)
def test_the_raising_readers_name_a_bad_ordinal(bad: object, error: type[Exception], message: str) -> None:
    for read in (device.properties, device.compute_capability, device.sm_count):
        with pytest.raises(error, match=message):
            read(bad)  # type: ignore[arg-type]

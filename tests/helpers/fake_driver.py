"""A stand-in for libcuda (absent on the CPU machine) for the few driver calls fi_ffi makes itself
(:mod:`fi_ffi.cuda.driver`): it records every call and answers each with the ``CUresult`` it was given.

Install it with :func:`install` (the driver module's loaded state, restored by ``monkeypatch`` after the test)."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest


class FakeDriver:
    """Records ``(name, *args)`` of every call; answers ``results[name]`` (a name it was not given is a KeyError:
    a call the test did not expect fails it). ``cuGetErrorName`` answers 1 (unknown: messages give the number).

    ``copied`` holds the bytes each ``cuMemcpyHtoDAsync_v2`` read from its host address at the time of the call
    (what the page-locked buffer held when the copy was enqueued)."""

    def __init__(self, **results: int) -> None:
        self.results = results
        self.calls: list[tuple[Any, ...]] = []
        self.copied: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> int:
            self.calls.append((name, *args))
            if name == "cuGetErrorName":
                return 1
            if name == "cuMemcpyHtoDAsync_v2":
                self.copied.append(ctypes.string_at(args[1], args[2]))
            return self.results[name]

        return call

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def install(monkeypatch: pytest.MonkeyPatch, fake: FakeDriver) -> FakeDriver:
    """Make :func:`fi_ffi.cuda.driver.load` answer ``fake`` for the rest of the test."""
    from fi_ffi.cuda import driver

    monkeypatch.setattr(driver, "_state", (driver.ffi(), fake, driver.probe()))
    return fake

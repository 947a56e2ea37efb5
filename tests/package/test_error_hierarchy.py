"""The exception hierarchy the README ("Errors, in brief") and ``fi_ffi.errors`` document, held on real calls.

- A bad argument is a ``ValueError`` or ``TypeError`` naming it, so ``except (ValueError, TypeError)`` (what code
  ported from flashinfer-python catches) catches every one: a wrong shape, a wrong dtype, a scalar of the wrong type
  or out of range.
- A wrong shape or dtype is a plain ``ValueError`` / ``TypeError``; a refused scalar is ``fi_ffi.ArgumentTypeError``
  / ``fi_ffi.ArgumentRangeError`` (exported), also a ``fi_ffi.FiFFIError``. The README says so; when that changes,
  these tests fail until the README and ``fi_ffi.errors`` say what is true.
- Every other exported exception is a ``FiFFIError`` and no ``ValueError`` / ``TypeError``.

The calls are rmsnorm's with descriptors claiming cuda:0 at addresses nothing maps: each is refused before the
kernel (the valid call, which would reach it, is never made).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

import fi_ffi
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only

_BASE = 1 << 44  # fake device addresses 4 GiB apart, never dereferenced: every call here is refused first
_slots = itertools.count(1)


def dev(shape: tuple[int, ...], dtype: str = "float16") -> Tensor:
    return Tensor.from_pointer(_BASE + next(_slots) * (1 << 32), shape, dtype, 0)


def rmsnorm(**bad: Any) -> Callable[[], object]:
    """rmsnorm over [4, 64] float16 with ``bad`` replacing one argument."""

    def call() -> object:
        args: dict[str, Any] = dict(input=dev((4, 64)), weight=dev((64,)), eps=1e-6, out=dev((4, 64)))
        args.update(bad)
        return fi_ffi.rmsnorm(**args)

    return call


# case -> (call, the class it raises exactly, the argument its text names)
CASES: dict[str, tuple[Callable[[], object], type[Exception], str]] = {
    "wrong shape": (rmsnorm(weight=dev((32,))), ValueError, "weight"),
    "wrong dtype": (rmsnorm(weight=dev((64,), "bfloat16")), TypeError, "weight"),
    "scalar of the wrong type": (rmsnorm(eps="x"), fi_ffi.ArgumentTypeError, "eps"),
    "scalar out of range": (rmsnorm(eps=10**400), fi_ffi.ArgumentRangeError, "eps"),
}


def caught(call: Callable[[], object]) -> Exception:
    """What ``except (ValueError, TypeError)``, the documented clause for argument errors, catches."""
    try:
        call()
    except (ValueError, TypeError) as exc:
        return exc
    pytest.fail("the bad call was not refused with a ValueError or TypeError")


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_argument_is_caught_by_except_value_error_or_type_error(case: str, kernel_modules: list[str]) -> None:
    call, cls, name = CASES[case]
    exc = caught(call)
    assert type(exc) is cls and str(exc).startswith(f"{name}: ")
    assert exc.__cause__ is None  # raised on its own, not chained to an internal error


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_a_refused_scalar_is_also_a_fi_ffi_error(case: str, kernel_modules: list[str]) -> None:
    """As the README says: ``except fi_ffi.FiFFIError`` catches the scalar packer's errors only."""
    call, cls, _ = CASES[case]
    scalar = case.startswith("scalar")
    assert isinstance(caught(call), fi_ffi.FiFFIError) is scalar
    if scalar:  # each caught by its exported class and by the flashinfer-python clause of its kind
        with pytest.raises(cls):
            call()
        with pytest.raises(TypeError if cls is fi_ffi.ArgumentTypeError else ValueError):
            call()


def test_the_argument_error_classes_are_exported() -> None:
    from fi_ffi import errors

    assert fi_ffi.ArgumentTypeError is errors.ArgumentTypeError  # was: AttributeError
    assert fi_ffi.ArgumentRangeError is errors.ArgumentRangeError
    assert {"ArgumentTypeError", "ArgumentRangeError"} <= set(fi_ffi.__all__)


def test_every_exported_error_is_a_fi_ffi_error_and_only_the_scalar_ones_are_argument_errors() -> None:
    exported = {
        name: obj
        for name in fi_ffi.__all__
        if isinstance(obj := getattr(fi_ffi, name), type) and issubclass(obj, BaseException)
    }
    assert all(issubclass(cls, fi_ffi.FiFFIError) for cls in exported.values()), exported
    arguments = {name for name, cls in exported.items() if issubclass(cls, (ValueError, TypeError))}
    assert arguments == {"ArgumentTypeError", "ArgumentRangeError"}
    assert issubclass(fi_ffi.ArgumentTypeError, TypeError) and issubclass(fi_ffi.ArgumentRangeError, ValueError)

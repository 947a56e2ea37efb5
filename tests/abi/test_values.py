"""The one packer of Python values (fi_ffi.abi.values): one rule per wire type, the same error on every path.

An int past int64, a bool or a float where an int goes, a non-number where a float goes: the launcher's slow path
(a keyed scalar and a per-call scalar, whose common case the generated code inlines), the generic call
(``pack_value``) and the setup calls (``comm.control.pack``) refuse it with the same fi_ffi exception, naming the
argument. Nothing here reaches a kernel: every refusal happens before the module is bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fi_ffi.abi import objects, values, wire
from fi_ffi.comm import control
from fi_ffi.errors import ArgumentRangeError, ArgumentTypeError, FiFFIError
from fi_ffi.launch.launcher import compile_launcher

pytestmark = pytest.mark.cpu_only

# a declaration of a module that does not exist: the slow path refuses the values before anything is bound
KEYED = wire.declare("nothing", [("count", wire.INT)])
PER_CALL = wire.declare("nothing", [wire.scalar("count", wire.INT, per_call=True)])


def paths() -> dict[str, Callable[[Any], Any]]:
    """Every way an int reaches the wire, each naming its argument ``count`` (or an item of it)."""
    keyed = compile_launcher(KEYED, "no-such-module")
    per_call = compile_launcher(PER_CALL, "no-such-module")
    return {
        "to_int": lambda v: values.to_int("count", v),
        "to_scalar": lambda v: values.to_scalar("count", wire.INT, v),
        "launcher, keyed scalar": lambda v: keyed(v),
        "launcher, per-call scalar": lambda v: per_call(v),
        "pack_value": lambda v: values.pack_value(v, [], "count", 0),
        "control.pack": lambda v: control.pack(KEYED, [v], []),
        "control.pack, an int list": lambda v: control._ints("count", [v]),
    }


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**40])
@pytest.mark.parametrize("path", list(paths()))
def test_an_int_out_of_range_is_the_same_error_on_every_path(path: str, value: int) -> None:
    with pytest.raises(ArgumentRangeError) as info:
        paths()[path](value)
    text = str(info.value)
    assert text.startswith(("count: ", "count[0]: ", "count argument 0: ")), text  # names the argument
    assert f"{value} does not fit in int64 (-2**63 <= value < 2**63); pass a value in that range" in text
    assert isinstance(info.value, ValueError) and isinstance(info.value, FiFFIError)
    assert not isinstance(info.value, OverflowError)


@pytest.mark.parametrize("value", [1.5, "3", [1]])
@pytest.mark.parametrize("path", [p for p in paths() if p != "pack_value"])  # pack_value passes floats and str
def test_a_non_integer_is_the_same_type_error_on_every_path(path: str, value: Any) -> None:
    with pytest.raises(ArgumentTypeError, match=r"^count(\[0\])?: expected an int, got ") as info:
        paths()[path](value)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("path", [p for p in paths() if p != "pack_value"])  # pack_value passes a bool as a Bool
def test_a_bool_is_not_an_int(path: str) -> None:
    with pytest.raises(ArgumentTypeError, match=r"expected an int, got bool"):
        paths()[path](True)


def test_the_bounds_and_integer_likes_are_accepted() -> None:
    for v in (2**63 - 1, -(2**63), np.int64(-5), np.uint8(7)):
        assert values.to_int("count", v) == int(v)
        assert control._ints("count", [v]) == [int(v)]
    assert values.pack_value(2**63 - 1, [], "count", 0) == (objects.INT, 2**63 - 1)


def test_the_generated_fast_path_inlines_only_the_common_case() -> None:
    # the per-call int's range test is inline; any other value leaves for the slow path, whose converter decides
    source = compile_launcher(PER_CALL, "no-such-module").source  # type: ignore[attr-defined]
    assert "if count.__class__ is not int or not -9223372036854775808 <= count < 9223372036854775808: raise _Slow" in (
        source
    )
    assert "count = _scalar('count', 'int', count)" in source


@pytest.mark.parametrize(
    ("kind", "value", "exc", "text"),
    [
        (wire.FLOAT, 10**400, ArgumentRangeError, r"^x: 1000+ does not fit in a float64$"),
        (wire.FLOAT, "1", ArgumentTypeError, r"^x: expected a float, got str$"),
        (wire.FLOAT, True, ArgumentTypeError, r"^x: expected a float, got bool$"),
        (wire.BOOL, 2, ArgumentTypeError, r"^x: expected a bool, got 2$"),
        (wire.STRING, b"a", ArgumentTypeError, r"^x: expected a str, got bytes$"),
        (wire.STRING, "a\0b", ArgumentRangeError, r"^x: text must not contain NUL characters$"),
        (wire.OPT_INT, 2**64, ArgumentRangeError, r"^x: 18446744073709551616 does not fit in int64"),
    ],
)
def test_each_wire_type_has_one_rule(kind: str, value: Any, exc: type, text: str) -> None:
    with pytest.raises(exc, match=text):
        values.to_scalar("x", kind, value)


def test_each_wire_type_converts() -> None:
    assert values.to_scalar("x", wire.FLOAT, 3) == 3.0 and type(values.to_scalar("x", wire.FLOAT, 3)) is float
    assert values.to_scalar("x", wire.FLOAT, float("inf")) == float("inf")  # given as infinite: kept
    assert values.to_scalar("x", wire.BOOL, 1) is True
    assert values.to_scalar("x", wire.OPT_INT, None) is None
    assert values.to_scalar("x", wire.OPT_FLOAT, None) is None
    assert values.to_scalar("x", wire.STRING, "ab") == "ab"

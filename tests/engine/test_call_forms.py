"""A method built from another's parameters (``fi_engine.kernels.call_forms``): it receives the call's values in the
declared order with the defaults filled in, whether called positionally or with keywords, refuses a call the declared
signature refuses, and shows the declared parameters."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from fi_engine.kernels.call_forms import forwarded_signature, same_parameters, value_then_parameters

pytestmark = pytest.mark.cpu_only


class Gemv:
    def launch(self, mode: int, rows: int, x: int, eps: float = 0.0, h: int = 0) -> None:
        """The declared parameters (the per-step form)."""

    @same_parameters(launch)
    def packed(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """The packed-once form."""
        return (self, values)

    @value_then_parameters(launch)
    def with_epilogue(self, rope: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """A form with an epilogue's value first."""
        return (rope, values)


@pytest.mark.parametrize(
    ("args", "kwargs", "values"),
    [
        ((1, 2, 3), {}, (1, 2, 3, 0.0, 0)),
        ((1, 2, 3, 1e-5), {}, (1, 2, 3, 1e-5, 0)),
        ((1, 2, 3, 1e-5, 7), {}, (1, 2, 3, 1e-5, 7)),
        ((1,), {"x": 3, "rows": 2, "h": 7}, (1, 2, 3, 0.0, 7)),
        ((), {"mode": 1, "rows": 2, "x": 3}, (1, 2, 3, 0.0, 0)),
    ],
)
def test_the_built_method_receives_the_values_in_the_declared_order_with_defaults(args, kwargs, values) -> None:
    g = Gemv()
    assert g.packed(*args, **kwargs) == (g, values)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((1, 2), {}, "missing a required argument: 'x'"),
        ((1, 2, 3, 0.0, 0, 9), {}, "too many positional arguments"),
        ((1, 2, 3), {"y": 4}, "unexpected keyword argument 'y'"),
        ((1, 2, 3), {"mode": 1}, "multiple values for argument 'mode'"),
    ],
)
def test_a_call_the_declared_signature_refuses_is_refused_alike(args, kwargs, match) -> None:
    with pytest.raises(TypeError, match=match):
        Gemv().packed(*args, **kwargs)


def test_the_built_method_shows_the_declared_parameters_and_its_own_docstring() -> None:
    shown = inspect.signature(Gemv().packed)
    assert list(shown.parameters) == ["mode", "rows", "x", "eps", "h"]
    assert shown.return_annotation == "tuple[Any, ...]"
    assert Gemv.packed.__doc__ == "The packed-once form."
    with_lora = forwarded_signature(Gemv.launch, "None", ("lora", "LoraExpand"))
    assert list(with_lora.parameters) == ["self", "lora", "mode", "rows", "x", "eps", "h"]
    assert with_lora.parameters["lora"].annotation == "LoraExpand" and with_lora.return_annotation == "None"


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [(("r", 1, 2, 3), {}), ((1, 2, 3), {"rope": "r"}), ((), {"rope": "r", "mode": 1, "rows": 2, "x": 3})],
)
def test_a_leading_value_is_taken_by_position_or_by_its_name_before_the_declared_parameters(args, kwargs) -> None:
    g = Gemv()
    assert g.with_epilogue(*args, **kwargs) == ("r", (1, 2, 3, 0.0, 0))
    assert list(inspect.signature(g.with_epilogue).parameters) == ["rope", "mode", "rows", "x", "eps", "h"]


def test_a_missing_leading_value_is_refused_as_python_refuses_a_missing_argument() -> None:
    with pytest.raises(TypeError, match="missing a required argument: 'rope'"):
        Gemv().with_epilogue()
    with pytest.raises(TypeError, match="missing a required argument: 'x'"):
        Gemv().with_epilogue("r", 1, 2)

"""A kernel entry point's parameters declared once. The engine's GEMV and GEMM methods come in several forms over one
call -- launched now, packed once, checked into the parts another kernel's launch reuses -- and each form after the
first is built from the first's signature (:func:`same_parameters`) instead of repeating its parameter list, as
fi_ffi's ops declare their parameters once and build the call from them. The first form, the one called per step,
keeps its own plain signature (no binding on its path)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

__all__ = ["forwarded_signature", "same_parameters", "value_then_parameters"]

P = ParamSpec("P")
S = TypeVar("S")
E = TypeVar("E")
T = TypeVar("T")


def _values(
    signature: inspect.Signature, owner: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """A call's values in the order of ``signature`` (a method's: ``owner`` binds its ``self``, left out of the
    result), its defaults filled in; TypeError as Python's for a missing, extra or unknown argument. (Bound in full
    at every call: the built forms pack a launch once, so no step pays for it.)"""
    bound = signature.bind(owner, *args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())[1:]


def same_parameters(
    declared: Callable[Concatenate[Any, P], object],
) -> Callable[[Callable[[S, tuple[Any, ...]], T]], Callable[Concatenate[S, P], T]]:
    """A decorator making ``body(self, values)`` a method that takes ``declared``'s parameters (a method's, ``self``
    first): ``values`` is the call's arguments in ``declared``'s order with its defaults filled in (bound as Python
    binds a call: TypeError as Python's for a missing, extra or unknown argument). The method shows ``declared``'s
    parameters (``help``, ``inspect.signature``) and ``body``'s docstring."""
    signature = inspect.signature(declared)

    def build(body: Callable[[S, tuple[Any, ...]], T]) -> Callable[Concatenate[S, P], T]:
        @functools.wraps(body)
        def method(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
            return body(self, _values(signature, self, args, kwargs))

        method.__signature__ = forwarded_signature(declared, inspect.signature(body).return_annotation)  # type: ignore[attr-defined]
        return method

    return build


def value_then_parameters(
    declared: Callable[Concatenate[Any, P], object],
) -> Callable[[Callable[[S, E, tuple[Any, ...]], T]], Callable[Concatenate[S, E, P], T]]:
    """:func:`same_parameters` for ``body(self, value, values)``: the method takes one value of its own first (an
    epilogue's, named as ``body`` names it, by position or keyword), then ``declared``'s parameters."""
    signature = inspect.signature(declared)

    def build(body: Callable[[S, E, tuple[Any, ...]], T]) -> Callable[Concatenate[S, E, P], T]:
        shown = inspect.signature(body)
        name, first = list(shown.parameters.items())[1]

        @functools.wraps(body)
        def method(self: S, *args: Any, **kwargs: Any) -> T:
            if name in kwargs:
                value = kwargs.pop(name)
            elif args:
                value, args = args[0], args[1:]
            else:
                raise TypeError(f"missing a required argument: '{name}'")
            return body(self, value, _values(signature, self, args, kwargs))

        returns = shown.return_annotation
        method.__signature__ = forwarded_signature(declared, returns, (name, first.annotation))  # type: ignore[attr-defined]
        return method

    return build


def forwarded_signature(declared: Callable[..., object], returns: Any, *first: tuple[str, Any]) -> inspect.Signature:
    """What a method that forwards its call to ``declared`` (a method: ``self`` first) shows as its parameters
    (``help``, ``inspect.signature``, the API reference): ``declared``'s, with ``first`` (``(name, annotation)``
    each) between ``self`` and them, and the return annotation ``returns``."""
    signature = inspect.signature(declared)
    self_, *params = signature.parameters.values()
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    ahead = [inspect.Parameter(name, kind, annotation=annotation) for name, annotation in first]
    return signature.replace(parameters=[self_, *ahead, *params], return_annotation=returns)

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

__all__ = ["forwarded_signature", "same_parameters"]

P = ParamSpec("P")
S = TypeVar("S")
T = TypeVar("T")


def same_parameters(
    declared: Callable[Concatenate[Any, P], object],
) -> Callable[[Callable[[S, tuple[Any, ...]], T]], Callable[Concatenate[S, P], T]]:
    """A decorator making ``body(self, values)`` a method that takes ``declared``'s parameters (a method's, ``self``
    first): ``values`` is the call's arguments in ``declared``'s order with its defaults filled in. A positional call
    takes its arguments and the defaults' tail as they are; one with keywords is bound by the signature (TypeError as
    Python's for a missing or unknown argument). The method shows ``declared``'s parameters (``help``,
    ``inspect.signature``) and ``body``'s docstring."""
    signature = inspect.signature(declared)
    params = list(signature.parameters.values())[1:]  # (without self)
    defaults = tuple(p.default for p in params)
    required = sum(p.default is inspect.Parameter.empty for p in params)  # (the defaults trail)

    def build(body: Callable[[S, tuple[Any, ...]], T]) -> Callable[Concatenate[S, P], T]:
        @functools.wraps(body)
        def method(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
            if kwargs or not required <= len(args) <= len(params):
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                return body(self, tuple(bound.arguments.values())[1:])
            return body(self, args + defaults[len(args) :])

        method.__signature__ = forwarded_signature(declared, inspect.signature(body).return_annotation)  # type: ignore[attr-defined]
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

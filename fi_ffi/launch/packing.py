"""``fi_ffi.prepare``: one op call checked and packed once, for the ops declared packable.

An op declares itself packable on its def, ``@op(launch=_rmsnorm, packable=_out_first)``
(:func:`fi_ffi.launch.registry.op`), which registers it here with its :class:`Packable` when its family is imported
(:func:`register`: the launch layer stands below the ops, so it learns of them from them; an op a caller holds is
one whose module is imported). ``wire`` (the ``packable=`` function) is the one mapping from the op's arguments to
its launch function's values: the op itself calls it with its launch function (so the op and its packed form cannot
drift apart); :func:`prepare` calls it with a packer that checks and packs those values into a frame of their own
instead (:meth:`~fi_ffi.launch.launcher.Launcher.prepare`). Every check and message is therefore the op's: a bad
argument is refused by ``prepare`` as the op refuses it, naming the argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple

from . import checks
from .launcher import PreparedCall

__all__ = ["Packable", "packable", "prepare", "register"]


class Packable(NamedTuple):
    """How one op is packed.

    Attributes:
        launch: the op's launch function (a :func:`~fi_ffi.launch.launcher.launcher` result).
        wire: ``wire(launch, **arguments)``: the op's arguments (its own parameter names, ``stream`` included)
            handed to ``launch`` as its wire values; the op calls it with ``launch`` itself, returning what
            ``launch`` returns.
        nonempty: the tensor argument whose leading extent is the launch's size, where the op launches nothing
            for an empty one (a kernel cannot launch an empty grid): ``prepare`` refuses such a call, naming it.
    """

    launch: Callable[..., Any]
    wire: Callable[..., Any]
    nonempty: str | None = None


_PACKABLE: dict[Callable[..., Any], Packable] = {}


def register(packable: dict[Callable[..., Any], Packable]) -> None:
    """Add packable ops (``@op(packable=...)`` registers each at its family's import)."""
    _PACKABLE.update(packable)


def packable() -> dict[Callable[..., Any], Packable]:
    """The packable ops registered so far (every family imported)."""
    return dict(_PACKABLE)


@cache
def _signature(function: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(function)


def prepare(function: Callable[..., Any], *args: Any, **kwargs: Any) -> PreparedCall:
    """Check and pack one op call once; the returned :class:`~fi_ffi.launch.launcher.PreparedCall` launches it.

    ``function`` is one of the ops fi_ffi packs: the RMSNorm family (``rmsnorm``, ``qk_rmsnorm``,
    ``gemma_rmsnorm``, ``fused_add_rmsnorm``, ``gemma_fused_add_rmsnorm``), in-place RoPE with position ids
    (``apply_rope_pos_ids_inplace``, ``apply_llama31_rope_pos_ids_inplace``), ``append_paged_kv_cache`` and the
    gated activations (``silu_and_mul``, ``gelu_and_mul``, ``gelu_tanh_and_mul``);
    ``args``/``kwargs`` exactly what it takes, checked as it checks them (the same errors, naming the argument).
    Calling the result launches the kernel again with the same arguments (same buffers, scalars, stream) and costs
    about one FFI call: the per-step path of a runtime whose buffers do not move::

        step_norm = fi_ffi.prepare(fi_ffi.rmsnorm, x, w, 1e-6, out=out)
        for _ in range(steps):
            ...
            step_norm()

    Index arrays (positions, page tables) are passed by address: the kernel reads their values at each launch,
    so a runtime writes the step's values into the same buffers. The prepared call keeps its arguments
    referenced until it is dropped.

    Raises:
        TypeError: ``function`` is not one of those ops, or the arguments do not fit its signature.
        ValueError: ``append_paged_kv_cache`` with no token (the op launches nothing then; a prepared call must
            launch), naming ``append_key``.
    """
    found = _PACKABLE.get(function)
    if found is None:
        names = ", ".join(sorted(f.__name__ for f in _PACKABLE)) or "none: no op family imported yet"
        raise TypeError(f"function: expected one of the ops fi_ffi.prepare packs ({names}), got {function!r}")
    try:
        bound = _signature(function).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{function.__name__}: {exc}") from None
    bound.apply_defaults()
    arguments = bound.arguments
    launcher = found.launch.launcher  # type: ignore[attr-defined]

    def pack(*values: Any, stream: Any = None) -> PreparedCall:
        prepared: PreparedCall = launcher.prepare(values, stream)
        return prepared

    prepared: PreparedCall = found.wire(pack, **arguments)
    if found.nonempty is not None:
        shape = checks.tensor(found.nonempty, arguments[found.nonempty]).shape
        if not shape[0]:
            raise ValueError(
                f"{found.nonempty}: no tokens (shape {shape}); {function.__name__} launches nothing for them, and a "
                f"prepared call launches the kernel, whose grid cannot be empty"
            )
    return prepared

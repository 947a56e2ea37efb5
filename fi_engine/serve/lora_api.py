"""The LoRA adapters an OpenAI-compatible server serves (``fi-engine serve --enable-lora``): a request's ``model``
names the base model (no adapter) or an adapter (:meth:`ServedAdapters.lora_of`); ``GET /v1/models`` lists each
adapter with the base model's id as its ``parent``; vLLM's ``POST /v1/load_lora_adapter`` (``{"lora_name",
"lora_path"}``) and ``POST /v1/unload_lora_adapter`` (``{"lora_name"}``) change them at run time where the server was
started with ``FI_ENGINE_ALLOW_RUNTIME_LORA_UPDATING=1`` (vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), and are
refused (404 naming the variable) otherwise. The bodies are checked here (:class:`APIError` naming the field); the
engine reads and checks the adapter itself (:mod:`fi_engine.lora`), in its own thread
(:meth:`GenerationService.call <fi_engine.serve.service.GenerationService.call>`).

With several API servers over one engine process (``--api-servers N``), the engine is the one truth about which
adapters exist: each front end keeps the names it has seen (:attr:`ServedAdapters.names`, so that a request naming
one costs no round trip) and replaces them with the engine's (:meth:`ServedAdapters.update`) where they may be stale:
a ``model`` it does not know, ``/v1/models``, a load or an unload, an engine that refused a request's adapter
(``shared``; :mod:`fi_engine.serve.openai_server` asks). Where run-time loading is off, the names never change and
nothing is asked."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..lora.settings import adapter_name
from ..values import show
from .openai_protocol import APIError

__all__ = ["RUNTIME_LORA_ENV", "ServedAdapters", "check_runtime_lora_updating", "runtime_lora_allowed"]

RUNTIME_LORA_ENV = "FI_ENGINE_ALLOW_RUNTIME_LORA_UPDATING"
"""The environment variable that opens the load and unload endpoints (``1`` or ``true``)."""


def runtime_lora_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :data:`RUNTIME_LORA_ENV` is set to ``1`` or ``true`` (any case) in ``environ`` (None:
    ``os.environ``)."""
    value = (os.environ if environ is None else environ).get(RUNTIME_LORA_ENV, "")
    return value.strip().lower() in ("1", "true")


def check_runtime_lora_updating(value: object) -> bool:
    """``allow_runtime_lora_updating`` as a bool: ``True`` / ``False`` as given, None the environment's
    (:func:`runtime_lora_allowed`); TypeError naming it for anything else."""
    if value is None:
        return runtime_lora_allowed()
    if not isinstance(value, bool):
        what = show(value)
        raise TypeError(f"allow_runtime_lora_updating: expected True, False or None (the environment's), got {what}")
    return value


class ServedAdapters:
    """The adapters a server answers to: ``names`` (those loaded when it started; None: the engine serves no
    adapters), beside the base model's ``base_names``; ``runtime``: the load and unload endpoints are open;
    ``shared``: other API servers serve the same engine and load or unload adapters too (the names kept here may be
    stale: :meth:`update` them from the engine's). TypeError/ValueError naming ``lora_modules`` for a name that
    cannot be a request's ``model`` or that is one of the base model's."""

    def __init__(
        self, names: Sequence[str] | None, base_names: Sequence[str], runtime: bool, shared: bool = False
    ) -> None:
        self.enabled = names is not None
        self.base_names = list(base_names)
        self.runtime = runtime
        self.shared = shared
        self.names: list[str] = []
        if isinstance(names, str) or (names is not None and not isinstance(names, Sequence)):
            raise TypeError(f"lora_modules: expected the adapters' names (a list of str) or None, got {show(names)}")
        for i, name in enumerate(names or ()):
            self.names.append(self._new(adapter_name(name, f"lora_modules[{i}]"), f"lora_modules[{i}]"))

    def _new(self, name: str, field: str) -> str:
        """``name`` if no model or adapter of this server has it, else ValueError naming ``field``."""
        if name in self.base_names or name in self.names:
            what = "the base model's name" if name in self.base_names else "an adapter's name already"
            raise ValueError(f"{field}: {name!r} is {what}; give the adapter another name")
        return name

    def update(self, names: Sequence[str]) -> None:
        """The engine's adapter names (``engine.lora_names``, in their order of loading) in place of those kept."""
        self.names = [name for name in names if name not in self.base_names]  # (a new list: readers hold the old)

    @property
    def models(self) -> list[str]:
        """Every name a request's ``model`` may give: the base model's, then the adapters'."""
        return self.base_names + self.names

    def lora_of(self, model: str) -> str | None:
        """The adapter a request of ``model`` (a name :attr:`models` holds) is served with; None: the base model."""
        return model if model in self.names else None

    def entries(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        """The adapters' ``/v1/models`` objects, made from the base model's ``base`` (its first name's): each its own
        ``id`` and ``root``, ``parent`` the base model's id (as vLLM lists them; no server path is shown)."""
        return [base | {"id": name, "root": name, "parent": base["id"]} for name in self.names]

    def _open(self, endpoint: str) -> None:
        if not self.runtime:
            raise APIError(
                f"POST {endpoint}: loading and unloading LoRA adapters at run time is off; start the server with "
                f"{RUNTIME_LORA_ENV}=1 to allow it",
                None,
                status=404,
                code="runtime_lora_updating_disabled",
            )
        if not self.enabled:
            raise APIError(
                f"POST {endpoint}: this server serves no LoRA adapters; start it with --enable-lora",
                None,
                code="lora_not_enabled",
            )

    def load_body(self, body: Any) -> tuple[str, str]:
        """``(lora_name, lora_path)`` of a ``/v1/load_lora_adapter`` body (other keys, such as vLLM's
        ``load_inplace``, are ignored), or an :class:`APIError` naming the field."""
        self._open("/v1/load_lora_adapter")
        name = self._name(body)
        if name in self.names:  # (vLLM's answer: 400, the adapter loaded already)
            raise APIError(f"lora_name: the adapter {name!r} is loaded already; unload it first", "lora_name")
        try:
            self._new(name, "lora_name")
        except ValueError as exc:
            raise APIError(str(exc), "lora_name") from None
        path = body.get("lora_path")
        if not isinstance(path, str) or not path or "\0" in path:
            raise APIError(f"lora_path: expected the path of a PEFT adapter folder on the server, got {show(path)}",
                           "lora_path")  # fmt: skip
        return name, path

    def unload_body(self, body: Any) -> str:
        """The ``lora_name`` of a ``/v1/unload_lora_adapter`` body (404 ``model_not_found`` for one not loaded), or
        an :class:`APIError` naming the field."""
        self._open("/v1/unload_lora_adapter")
        name = self._name(body)
        if name not in self.names:
            raise self.not_loaded(name)
        return name

    def not_loaded(self, name: str) -> APIError:
        """The 404 ``model_not_found`` of unloading ``name``, an adapter not loaded."""
        served = ", ".join(map(repr, self.names)) or "none"
        return APIError(f"lora_name: no adapter named {name!r} is loaded (loaded: {served})", "lora_name",
                        status=404, code="model_not_found")  # fmt: skip

    @staticmethod
    def _name(body: Any) -> str:
        if not isinstance(body, dict):
            raise APIError(f"expected a JSON object with lora_name, got {type(body).__name__}", None)
        try:
            return adapter_name(body.get("lora_name"), "lora_name")
        except (TypeError, ValueError) as exc:
            raise APIError(str(exc), "lora_name") from None

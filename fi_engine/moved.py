"""The engine's old module paths, importable under their old names for one release, with a DeprecationWarning.

The engine was one flat folder of modules; it is now a package of subpackages, one concern each (see
docs/engine.md). ``import fi_engine.llama`` gives the very module ``fi_engine.models.llama`` (one module object
under two names, so classes compare equal), through the binding's moved-module finder
(:class:`fi_ffi.moved.MovedModuleFinder`) given the table below. Three old modules share their name with a new
subpackage (``fi_engine.checkpoint``, ``fi_engine.kernels``, ``fi_engine.text``): that package's face hands the
old module's names on instead (:func:`old_name`), with the same warning. A module whose names went to several
modules (:data:`SPLIT`: ``fi_engine.runtime.paging``, whose scheduler, requests, pages and step arrays are rooms of
their own now) imports as a module of its own at the old path that hands each name on from its new module
(:class:`SplitModuleFinder`), warning once, at the import. A name that left a module that stayed (:data:`NAMES`: a
family's quantization scheme, now beside the family's config reader; the fused GEMV's modes and epilogue values, which
left ``fi_engine.kernels.dense`` for ``fi_engine.kernels.fused_args``) is handed on by that module's ``__getattr__``
(:func:`old_name`), warning. ``import fi_engine`` installs both finders.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

from fi_ffi.moved import install as _install

__all__: list[str] = []  # the tables and the finder are the package's own business

# old module path -> new module path (a module at the old path imports nothing until it is asked for)
MOVED: dict[str, str] = {
    "fi_engine.config": "fi_engine.checkpoint.config",
    "fi_engine.quantization": "fi_engine.checkpoint.quantization",
    "fi_engine.fp8_weights": "fi_engine.checkpoint.fp8_weights",
    "fi_engine.family_configs": "fi_engine.checkpoint.family_configs",
    "fi_engine.deepseek_config": "fi_engine.models.deepseek_config",
    "fi_engine.tokenizer": "fi_engine.text.tokenizer",
    "fi_engine.chat": "fi_engine.text.chat",
    "fi_engine.detokenize": "fi_engine.text.detokenize",
    "fi_engine.generation_config": "fi_engine.text.generation_config",
    "fi_engine.text_args": "fi_engine.text.args",
    "fi_engine.optional": "fi_engine.text.optional",
    "fi_engine.model_files": "fi_engine.text.model_files",
    "fi_engine.cublas": "fi_engine.kernels.cublas",
    "fi_engine.cublas_lt": "fi_engine.kernels.cublas_lt",
    "fi_engine.dense": "fi_engine.kernels.dense",
    "fi_engine.moe_gemv": "fi_engine.kernels.moe_gemv",
    "fi_engine.fp8_linear": "fi_engine.kernels.fp8_linear",
    "fi_engine.graph": "fi_engine.kernels.graph",
    "fi_engine.cuda_sources": "fi_engine.kernels.cuda_sources",
    "fi_engine.moe": "fi_engine.layers.moe",
    "fi_engine.moe_routing": "fi_engine.layers.moe_routing",
    "fi_engine.tensor_parallel": "fi_engine.layers.tensor_parallel",
    "fi_engine.kv_fp8": "fi_engine.layers.kv_fp8",
    "fi_engine.deepseek_routing": "fi_engine.layers.deepseek_routing",
    "fi_engine.engine": "fi_engine.runtime.engine",
    "fi_engine.state": "fi_engine.runtime.worker.state",
    "fi_engine.storage": "fi_engine.runtime.worker.step_io",
    "fi_engine.serving": "fi_engine.runtime.serving",
    "fi_engine.step_graphs": "fi_engine.runtime.worker.step_graphs",
    "fi_engine.fused_decode": "fi_engine.runtime.worker.fused_decode",
    "fi_engine.sampling": "fi_engine.runtime.sample.sampler",
    "fi_engine.sampling_params": "fi_engine.runtime.sampling_params",
    "fi_engine.paging": "fi_engine.runtime.paging",
    "fi_engine.stepping": "fi_engine.runtime.stepping",
    "fi_engine.moe_paths": "fi_engine.models.moe_paths",
    "fi_engine.family": "fi_engine.runtime.family",
    "fi_engine.llama": "fi_engine.models.llama",
    "fi_engine.gemma2": "fi_engine.models.gemma2",
    "fi_engine.gpt_oss": "fi_engine.models.gpt_oss",
    "fi_engine.deepseek": "fi_engine.models.deepseek",
    "fi_engine.mla_weights": "fi_engine.models.mla_weights",
    "fi_engine.weights": "fi_engine.models.weights",
    "fi_engine.engines": "fi_engine.models.registry",
    "fi_engine.service": "fi_engine.serve.service",
    "fi_engine.engine_process": "fi_engine.serve.engine_process",
    "fi_engine.engine_client": "fi_engine.serve.engine_client",
    "fi_engine.api_servers": "fi_engine.serve.api_servers",
    "fi_engine.shared_queue": "fi_engine.serve.shared_queue",
    "fi_engine.metrics": "fi_engine.serve.metrics",
    "fi_engine.openai_protocol": "fi_engine.serve.openai_protocol",
    "fi_engine.openai_server": "fi_engine.serve.openai_server",
    # the runtime's rooms (docs/engine.md): a module that moved whole into one
    "fi_engine.runtime.kv_cache": "fi_engine.runtime.sched.kv_cache",
    "fi_engine.runtime.sampling": "fi_engine.runtime.sample.sampler",
    "fi_engine.runtime.logits_processing": "fi_engine.runtime.sample.logits_processing",
    "fi_engine.runtime.speculation": "fi_engine.runtime.sample.speculation",
    "fi_engine.runtime.model_runner": "fi_engine.runtime.worker.model_runner",
    "fi_engine.runtime.state": "fi_engine.runtime.worker.state",
    "fi_engine.runtime.storage": "fi_engine.runtime.worker.step_io",
    "fi_engine.runtime.step_graphs": "fi_engine.runtime.worker.step_graphs",
    "fi_engine.runtime.fused_decode": "fi_engine.runtime.worker.fused_decode",
    "fi_engine.runtime.moe_paths": "fi_engine.models.moe_paths",  # a family definition's option, not the runtime's
    # a family's config reader lives with the family
    "fi_engine.checkpoint.deepseek_config": "fi_engine.models.deepseek_config",
}

# old module whose name is now a subpackage -> the module its names went to
FACES: dict[str, str] = {
    "fi_engine.checkpoint": "fi_engine.checkpoint.safetensors",
    "fi_engine.kernels": "fi_engine.kernels.flashinfer",
    "fi_engine.text": "fi_engine.text.codec",
}


# old module whose names went to several modules -> those modules (a name is looked up in each, in order)
SPLIT: dict[str, tuple[str, ...]] = {
    "fi_engine.runtime.paging": (
        "fi_engine.runtime.sched.scheduler",
        "fi_engine.runtime.sched.request",
        "fi_engine.runtime.sched.pages",
        "fi_engine.runtime.sched.step_arrays",
        "fi_engine.runtime.worker.graph_shapes",
    ),
}


class _SplitModule(ModuleType):
    """The module at an old path of :data:`SPLIT`: each name read from the first of its new modules that has it."""

    __homes: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("__"):
            for home in self.__homes:
                module = importlib.import_module(home)
                if hasattr(module, name):
                    return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        names = {n for home in self.__homes for n in dir(importlib.import_module(home)) if not n.startswith("__")}
        return sorted(names | set(super().__dir__()))


class _SplitLoader(importlib.abc.Loader):
    def __init__(self, homes: tuple[str, ...]) -> None:
        self.homes = homes

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} was split into {', '.join(self.homes)}: import each name from its module there (the old "
            f"path goes in 0.2)",
            DeprecationWarning,
            stacklevel=2,
        )
        module = _SplitModule(spec.name)
        module._SplitModule__homes = self.homes  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: ModuleType) -> None:  # nothing runs at the old path: its names are looked up
        pass


class SplitModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of :data:`SPLIT` and makes the module that hands their names on."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        homes = SPLIT.get(fullname)
        return None if homes is None else importlib.machinery.ModuleSpec(fullname, _SplitLoader(homes))


# (module that stayed, a name that left it) -> the module the name went to (the module's __getattr__ hands it on)
NAMES: dict[tuple[str, str], str] = {
    ("fi_engine.checkpoint.quantization", "deepseek_fp8_scheme"): "fi_engine.models.deepseek_config",
    # the fused GEMVs' call values left the GEMM routing for a module of their own
    **{("fi_engine.kernels.dense", n): "fi_engine.kernels.fused_args" for n in ("ADD_NORM", "NORM", "SILU")},
    **{("fi_engine.kernels.dense", n): "fi_engine.kernels.fused_args" for n in ("RopeAppend", "RouterEpilogue")},
}


def install() -> None:
    """Put the finders of :data:`MOVED` and :data:`SPLIT` first on :data:`sys.meta_path`, once (``import fi_engine``
    calls it)."""
    _install(MOVED)
    if not any(isinstance(f, SplitModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, SplitModuleFinder())


def old_name(package: str, name: str) -> Any:
    """Name ``name`` of the old module ``package`` (a package of :data:`FACES` now, or a module one of whose names
    left for another: :data:`NAMES`), with a DeprecationWarning; AttributeError where the old module had no such
    name (the module's ``__getattr__`` calls this)."""
    target = NAMES.get((package, name)) or FACES.get(package)
    module = None if target is None else importlib.import_module(target)
    if module is None or name.startswith("_") or not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warnings.warn(
        f"{package}.{name} moved to {target}.{name}: import it from there (the old path goes in 0.2)",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(module, name)

"""Which family serves a checkpoint, by its ``config.json`` ``model_type``: one row per family.

A row (:class:`Family`) names the family, the model types it serves, the module that defines it and the engine
class in that module; :data:`FAMILIES` holds the built-in rows. Everything that depends on the set of families
follows from the rows: :func:`engine_class` and :func:`open_engine` (the engine that serves a checkpoint),
:func:`read_config` (its config, read by its family), :func:`model_types` (what is served, as the refusal of an
unknown model type and the command line's help list it), and the model type a family's own config reader accepts
(:func:`family_config_json`). A family module is imported only when a checkpoint of its family is met (importing
this module imports none of them). :func:`register` adds a row at run time (a family outside this package).

The engines share the constructor arguments and the serving API (``generate``, ``prefill_logits``, ``close``).
docs/ADDING_A_MODEL.md says how to add a family: its module and its row.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..checkpoint.config import LlamaConfig, read_config_json
from ..values import MAX_SIZE, arg_int, show

__all__ = [
    "FAMILIES",
    "Family",
    "SettingsFamily",
    "engine_class",
    "families",
    "family_config_json",
    "family_of",
    "model_types",
    "open_engine",
    "read_config",
    "register",
]


@dataclass(frozen=True)
class Family:
    """One registry row: a model family the engine serves.

    Attributes:
        label: how messages name the family (``"Gemma 2"``).
        model_types: the ``config.json`` ``model_type`` values it serves (each served by one family only).
        module: the module defining it, imported when first needed (``"fi_engine.models.gemma2"``).
        engine: the name of its engine class in ``module`` (an :class:`~fi_engine.runtime.engine.Engine` whose
            ``definition`` is the family's :class:`~fi_engine.runtime.family.ModelFamily`).
        tensor_parallel: whether its engine splits a model over GPUs (``tensor_parallel=N``, ``--tp N``).
    """

    label: str
    model_types: tuple[str, ...]
    module: str
    engine: str
    tensor_parallel: bool = True

    def __post_init__(self) -> None:
        for field in ("label", "module", "engine"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise TypeError(f"{field}: expected a non-empty str, got {show(value)}")
        types = self.model_types
        if not isinstance(types, tuple) or not types or not all(isinstance(t, str) and t for t in types):
            raise TypeError(f"model_types: expected a non-empty tuple of non-empty str, got {show(types)}")
        if not isinstance(self.tensor_parallel, bool):
            raise TypeError(f"tensor_parallel: expected True or False, got {show(self.tensor_parallel)}")

    def engine_class(self) -> Any:
        """The engine class (imports :attr:`module`)."""
        return getattr(importlib.import_module(self.module), self.engine)

    @property
    def path(self) -> str:
        """``module.engine``: where the engine class is (as messages name it)."""
        return f"{self.module}.{self.engine}"


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama", "qwen3", "mixtral", "qwen3_moe"), "fi_engine.models.llama", "LlamaEngine"),
    Family("Gemma 2", ("gemma2",), "fi_engine.models.gemma2", "Gemma2Engine"),
    Family("gpt-oss", ("gpt_oss",), "fi_engine.models.gpt_oss", "GptOssEngine"),
    Family("DeepSeek", ("deepseek_v2", "deepseek_v3"), "fi_engine.models.deepseek", "DeepSeekEngine"),
)

# model_type -> its row: the built-in rows, then those register() added
_BY_TYPE: dict[str, Family] = {t: row for row in FAMILIES for t in row.model_types}


def register(family: Family) -> Family:
    """Add ``family``'s row (a family defined outside this package; the built-in ones are :data:`FAMILIES`) and
    return it; ValueError if one of its model types is served already, naming the family that serves it."""
    if not isinstance(family, Family):
        raise TypeError(f"family: expected a registry row (fi_engine.models.registry.Family), got {show(family)}")
    for t in family.model_types:
        if t in _BY_TYPE:
            raise ValueError(f"family: model_type {t!r} is served by {_BY_TYPE[t].label} ({_BY_TYPE[t].path}) already")
    _BY_TYPE.update(dict.fromkeys(family.model_types, family))
    return family


def families() -> tuple[Family, ...]:
    """Every row, built-in first, in the order they were added."""
    return tuple(dict.fromkeys(_BY_TYPE.values()))


def model_types() -> tuple[str, ...]:
    """Every ``model_type`` served, row by row."""
    return tuple(_BY_TYPE)


def _row(model_type: Any, source: str) -> Family:
    row = _BY_TYPE.get(model_type) if isinstance(model_type, str) else None
    if row is None:
        raise ValueError(
            f"{source}: model_type {show(model_type)} is not supported; this engine runs "
            f"{', '.join(repr(t) for t in _BY_TYPE)} checkpoints"
        )
    return row


def _model_type(d: dict[str, Any]) -> Any:
    return d.get("model_type", "llama")  # transformers' LlamaConfig is the one without it in older checkpoints


def family_of(model_dir: str | Path) -> Family:
    """The row of the family serving the checkpoint in ``model_dir`` (its ``config.json`` ``model_type``; ValueError
    naming the served ones if none serves it, or naming ``model_dir`` if there is no readable config.json)."""
    d, path = read_config_json(model_dir)
    return _row(_model_type(d), str(path))


def engine_class(model_dir: str | Path) -> Any:
    """The engine class for the checkpoint in ``model_dir`` (reads its ``config.json`` with the family's reader;
    ValueError if refused)."""
    cls = family_of(model_dir).engine_class()
    cls.definition().read_config(model_dir)  # a bad config.json is named now, before any engine is made
    return cls


def read_config(model_dir: str | Path) -> Any:
    """The config of the checkpoint in ``model_dir`` as its family reads it (``ModelFamily.read_config``: a
    :class:`~fi_engine.checkpoint.config.LlamaConfig` for the Llama-architecture families); ValueError if refused."""
    return family_of(model_dir).engine_class().definition().read_config(model_dir)


def family_config_json(model_dir: str | Path, definition: type) -> tuple[dict[str, Any], str]:
    """``model_dir/config.json`` (a dict) and its path, for the ``read_config`` of family ``definition`` (a
    ``ModelFamily`` class): the model type must be one its row lists (the row of its module, or of the nearest base
    class's with one), else ValueError naming the engine that serves it (or the served ones)."""
    if not isinstance(definition, type):
        raise TypeError(f"definition: expected a ModelFamily class, got {show(definition)}")
    d, path = read_config_json(model_dir)
    source, model_type = str(path), _model_type(d)
    mine = next((r for c in definition.__mro__ for r in families() if r.module == c.__module__), None)
    if mine is None:
        raise ValueError(
            f"definition: {definition.__name__} ({definition.__module__}) is no registered family's, nor a subclass "
            f"of one; add its row to fi_engine.models.registry (docs/ADDING_A_MODEL.md)"
        )
    if model_type not in mine.model_types:
        theirs = _row(model_type, source)
        raise ValueError(
            f"model: {mine.engine} serves {' / '.join(mine.model_types)} checkpoints, this one is {model_type!r}; "
            f"load it with {theirs.path} (or fi_engine.models.registry.open_engine, which picks the engine from "
            f"config.json)"
        )
    return d, source


class SettingsFamily:
    """A family definition's ``read_config`` and ``check`` where its config is a
    :class:`~fi_engine.checkpoint.config.LlamaConfig` with settings of its own in ``LlamaConfig.family`` (Gemma 2,
    gpt-oss); a base before :class:`~fi_engine.runtime.family.ModelFamily` in the definition's bases, which sets
    the three class attributes and ``parse_config``."""

    model_type: ClassVar[str]  # the config.json model_type the family serves ("gemma2")
    settings: ClassVar[type]  # the type of its settings in LlamaConfig.family
    engine: ClassVar[str]  # the name of the engine class serving it, for the refusal

    def parse_config(self, d: Any, source: str) -> LlamaConfig:
        """The family's config from ``config.json``'s dict ``d`` (``source``: its path, for the errors)."""
        raise NotImplementedError

    def read_config(self, model_dir: str | Path) -> LlamaConfig:
        """The checkpoint's ``config.json`` read by :meth:`parse_config` (another family's model type: refused,
        naming its engine: :func:`family_config_json`)."""
        return self.parse_config(*family_config_json(model_dir, type(self)))

    def check(self, eng: Any, cfg: LlamaConfig) -> None:
        """Refuse a config that is not of :attr:`model_type` with its :attr:`settings` (one a subclass's
        ``read_config`` read otherwise), naming :attr:`engine`."""
        if cfg.model_type != self.model_type or not isinstance(cfg.family, self.settings):
            raise ValueError(
                f"model: {self.engine} serves {self.model_type} checkpoints, this one is {cfg.model_type!r}"
            )


def open_engine(
    model_dir: str | Path,
    *,
    overlap_steps: bool = False,
    scheduler_delay_factor: float = 0.0,
    mixed_prefill: bool = False,
    warm_serving: bool = False,
    prefix_caching: bool = False,
    chunked_prefill: bool = False,
    max_num_batched_tokens: int | None = None,
    speculative_config: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``engine_class(model_dir)(model_dir, **kwargs)`` with the step API's serving settings, which a server
    stepping the engine in a loop wants and ``generate`` ignores: ``overlap_steps`` (a decode step's tokens come
    with the next ``step()``, the step left running on the GPU meanwhile), ``scheduler_delay_factor`` (queued
    requests wait while others decode, up to that many times the last prefill's time, to be prefilled together;
    0 to 100), ``mixed_prefill`` (a prefill pass decodes the active requests too) and ``warm_serving`` (the prefill
    graphs the step API replays captured now, not while serving: ``Engine.warm_serving``, where the engine has
    it; about 1 s for SmolLM2-135M on an H100) and ``prefix_caching`` (a prompt reuses the KV pages an earlier
    request computed for its beginning: ``Engine.prefix_caching``, on where the engine serves it, left off
    elsewhere; ``engine.prefix_caching`` says which), ``chunked_prefill`` (a long prompt is prefilled in chunks of
    ``max_num_batched_tokens`` token rows a pass, the running requests riding in each: ``Engine.chunked_prefill``,
    on where the engine serves it; None: 512, at most the engine's ``max_prefill_tokens``) and
    ``speculative_config`` (vLLM's: ``{"method": "ngram", "num_speculative_tokens": k}``, speculative decoding by
    prompt lookup, or ``{"model": DIR, "num_speculative_tokens": k}``, by the drafts of a smaller model of the same
    tokenizer, whose engine is opened here: on the same device, with the same ``cuda_graph``, ``max_batch`` up to
    ``ServingLoop.speculation_max_rows``, room for the longest text and its draft, its prefix cache on; it is closed
    with the engine. ``Engine.speculative_config``; an engine that cannot serve it refuses it by name)."""
    from ..runtime.serving import delay_factor_arg, mixed_prefill_arg, overlap_steps_arg

    overlap_steps = overlap_steps_arg(overlap_steps)  # checked before the checkpoint is read
    scheduler_delay_factor = delay_factor_arg(scheduler_delay_factor)
    mixed_prefill = mixed_prefill_arg(mixed_prefill)
    for name, value in (
        ("warm_serving", warm_serving),
        ("prefix_caching", prefix_caching),
        ("chunked_prefill", chunked_prefill),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {type(value).__name__}")
    from ..runtime.sample.speculation import speculative_config_arg

    # (checked before the checkpoint is read; the engine says whether it applies)
    speculation = speculative_config_arg(speculative_config)
    if speculation is not None and speculation.method == "draft_model" and speculation.model is None:
        raise ValueError("speculative_config['model']: required for the 'draft_model' method (the draft checkpoint)")
    if max_num_batched_tokens is not None:  # (its upper bound, the engine's max_prefill_tokens, checked by the engine)
        max_num_batched_tokens = arg_int("max_num_batched_tokens", max_num_batched_tokens, 1, MAX_SIZE)
    engine = engine_class(model_dir)(model_dir, **kwargs)
    engine.overlap_steps = overlap_steps
    engine.scheduler_delay_factor = scheduler_delay_factor
    engine.mixed_prefill = mixed_prefill
    blocker = getattr(engine, "prefix_caching_blocker", None)  # (chunked prefill stands on the same ground)
    if blocker is not None and blocker() is None:
        engine.prefix_caching = prefix_caching
        if chunked_prefill:
            top = engine.scheduler.max_prefill_tokens
            engine.max_num_batched_tokens = min(top, 512) if max_num_batched_tokens is None else max_num_batched_tokens
            engine.chunked_prefill = True
    if speculation is not None:
        try:
            if speculation.model is not None:
                engine.draft_model = open_engine(
                    speculation.model,
                    max_batch=min(engine.max_batch, engine.speculation_max_rows),
                    max_seq_len=engine.max_seq_len + speculation.k,
                    cuda_graph=engine.cuda_graph,
                    device=engine.device,
                    prefix_caching=True,
                )
            engine.speculative_config = speculative_config
        except BaseException:
            engine.close()
            raise
    warm = getattr(engine, "warm_serving", None)
    if warm_serving and warm is not None:
        try:
            warm()
        except BaseException:
            engine.close()
            raise
    return engine

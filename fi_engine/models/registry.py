"""Which engine class serves a checkpoint, by its ``config.json`` ``model_type``.

``llama``, ``qwen3``, ``mixtral``, ``qwen3_moe``: :class:`~fi_engine.models.llama.LlamaEngine`; ``gemma2``:
:class:`~fi_engine.models.gemma2.Gemma2Engine`; ``gpt_oss``: :class:`~fi_engine.models.gpt_oss.GptOssEngine`;
``deepseek_v2``, ``deepseek_v3``: :class:`~fi_engine.models.deepseek.DeepSeekEngine`. The
engines share the constructor arguments and the serving API (``generate``, ``prefill_logits``, ``close``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..checkpoint.config import FAMILY_ENGINES, LlamaConfig
from ..checkpoint.deepseek_config import is_deepseek

__all__ = ["ENGINES", "engine_class", "open_engine"]

# model_type -> "module.Class" under fi_engine; model types not listed are LlamaEngine's
ENGINES = FAMILY_ENGINES


def engine_class(model_dir: str | Path) -> Any:
    """The engine class for the checkpoint in ``model_dir`` (reads its ``config.json``; ValueError if refused)."""
    if is_deepseek(model_dir):  # its config is not a LlamaConfig (MLA, DeepSeek routing): read by the engine
        from .deepseek import DeepSeekEngine

        return DeepSeekEngine
    cfg = LlamaConfig.from_dir(model_dir)
    module, _, name = ENGINES.get(cfg.model_type, "llama.LlamaEngine").partition(".")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def open_engine(
    model_dir: str | Path,
    *,
    overlap_steps: bool = False,
    scheduler_delay_factor: float = 0.0,
    mixed_prefill: bool = False,
    warm_serving: bool = False,
    **kwargs: Any,
) -> Any:
    """``engine_class(model_dir)(model_dir, **kwargs)`` with the step API's serving settings, which a server
    stepping the engine in a loop wants and ``generate`` ignores: ``overlap_steps`` (a decode step's tokens come
    with the next ``step()``, the step left running on the GPU meanwhile), ``scheduler_delay_factor`` (queued
    requests wait while others decode, up to that many times the last prefill's time, to be prefilled together;
    0 to 100), ``mixed_prefill`` (a prefill pass decodes the active requests too) and ``warm_serving`` (the prefill
    graphs the step API replays captured now, not while serving: ``ServingLoop.warm_serving``, where the engine has
    it; about 1 s for SmolLM2-135M on an H100)."""
    from ..runtime.serving import delay_factor_arg, mixed_prefill_arg, overlap_steps_arg

    overlap_steps = overlap_steps_arg(overlap_steps)  # checked before the checkpoint is read
    scheduler_delay_factor = delay_factor_arg(scheduler_delay_factor)
    mixed_prefill = mixed_prefill_arg(mixed_prefill)
    if not isinstance(warm_serving, bool):
        raise TypeError(f"warm_serving: expected True or False, got {type(warm_serving).__name__}")
    engine = engine_class(model_dir)(model_dir, **kwargs)
    engine.overlap_steps = overlap_steps
    engine.scheduler_delay_factor = scheduler_delay_factor
    engine.mixed_prefill = mixed_prefill
    warm = getattr(engine, "warm_serving", None)
    if warm_serving and warm is not None:
        try:
            warm()
        except BaseException:
            engine.close()
            raise
    return engine

"""The engines' constructor arguments as one value (fi_engine.runtime.settings): the engines' signatures list exactly
its fields, each argument is checked when it is made, and the sizes left to their defaults resolve against the
model's config."""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest

from fi_engine.models.deepseek import DeepSeekEngine
from fi_engine.models.gemma2 import Gemma2Engine
from fi_engine.runtime.engine import Engine
from fi_engine.runtime.settings import EngineSettings, EngineSizes


def _keywords(cls: type) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY}


def test_the_engine_signature_is_the_settings_fields() -> None:
    fields = {f.name: (f.default, f.type) for f in dataclasses.fields(EngineSettings)}
    keywords = {n: (p.default, p.annotation) for n, p in _keywords(Engine).items()}
    assert keywords.pop("family") == (None, "ModelFamily | None")  # the definition to serve with (a family engine's)
    assert keywords == fields  # Engine.__init__ and EngineSettings name the same arguments, defaults and types
    assert _keywords(Gemma2Engine) == _keywords(Engine)


def test_deepseek_shows_the_settings_and_its_own_arguments() -> None:
    ds = _keywords(DeepSeekEngine)
    assert ds.pop("fused_routing").default is None
    assert ds.pop("expert_split").default == "columns"  # how tensor parallelism splits the routed experts
    assert ds == {n: p for n, p in _keywords(Engine).items() if n != "family"}  # it makes its own definition
    assert next(iter(inspect.signature(DeepSeekEngine).parameters)) == "model_dir"


def test_settings_are_checked_and_normalized_when_made() -> None:
    s = EngineSettings(kv_cache_dtype="fp8", kv_cache_scales=[2, 0.5])
    assert (s.kv_cache_dtype, s.kv_cache_scales) == ("fp8_e4m3", (2.0, 0.5))
    assert EngineSettings(kv_cache_dtype=None).kv_cache_dtype == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_batch = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"max_seq_len: expected a positive integer below 2\*\*31"):
        EngineSettings(max_seq_len=0)
    with pytest.raises(TypeError, match="cuda_graph: expected True or False, got 'yes'"):
        EngineSettings(cuda_graph="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kv_cache_scales: only an FP8 KV cache has scales"):
        EngineSettings(kv_cache_scales=(1.0, 1.0))


def test_sizes_take_their_defaults_from_the_config() -> None:
    config = SimpleNamespace(max_position_embeddings=131072)
    assert EngineSettings(max_batch=8).sizes(config) == EngineSizes(8, 16, 4096, 8 * 256 + 1, 4096)
    short = SimpleNamespace(max_position_embeddings=100)
    assert EngineSettings(max_batch=200, page_size=32).sizes(short) == EngineSizes(200, 32, 100, 200 * 4 + 1, 200)
    given = EngineSettings(max_seq_len=64, num_pages=10, max_prefill_tokens=128)
    assert given.sizes(config) == EngineSizes(32, 16, 64, 10, 128)
    with pytest.raises(ValueError, match="num_pages: expected a positive integer below 2"):
        EngineSettings(max_batch=1 << 30, page_size=1).sizes(config)  # the default overflows an int32


def test_a_size_too_large_is_shown_as_its_value() -> None:
    # "got an integer of 40 bits" told the user less than the value they typed
    with pytest.raises(ValueError, match=r"max_batch: expected a positive integer below 2\*\*31 .*got 1000000000000$"):
        EngineSettings(max_batch=10**12)
    with pytest.raises(ValueError, match=r"max_seq_len: .*got 2147483648$"):
        EngineSettings(max_seq_len=2**31)
    with pytest.raises(ValueError, match=r"page_size: .*got an integer of 1329 bits$"):  # too long to print
        EngineSettings(page_size=10**400)
    with pytest.raises(ValueError, match=r"max_batch: .*got '8'$"):
        EngineSettings(max_batch="8")  # type: ignore[arg-type]

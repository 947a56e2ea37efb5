"""The engine's configs of today's model families (fi_engine.checkpoint.config): Qwen3 (q/k norm), Mixtral and Qwen3-MoE
(MoE MLPs) parsed from the keys transformers writes, and what the engine does not implement refused by name."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers.hf_configs import SMALL_LLAMA

from fi_engine.checkpoint.config import LlamaConfig, MoEConfig

BASE: dict[str, Any] = dict(SMALL_LLAMA)
QWEN3 = {**BASE, "model_type": "qwen3", "head_dim": 64, "attention_bias": False, "use_sliding_window": False,
         "sliding_window": None, "rope_theta": 1000000.0}  # fmt: skip
MIXTRAL = {**BASE, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None}
QWEN3_MOE = {
    **QWEN3,
    "model_type": "qwen3_moe",
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 128,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


def test_llama_has_neither_qk_norm_nor_experts() -> None:
    c = LlamaConfig.from_dict({**BASE, "model_type": "llama"})
    assert c.model_type == "llama" and not c.qk_norm and c.moe is None


def test_qwen3_dense() -> None:
    c = LlamaConfig.from_dict(QWEN3)
    assert c.model_type == "qwen3" and c.qk_norm and c.moe is None
    assert c.head_dim == 64 and c.rope.theta == 1000000.0 and not c.rope.llama3


def test_mixtral() -> None:
    c = LlamaConfig.from_dict(MIXTRAL)
    assert not c.qk_norm
    assert c.moe == MoEConfig(num_experts=8, top_k=2, intermediate_size=512, renormalize=True)


@pytest.mark.parametrize("renorm", [True, False])
def test_qwen3_moe(renorm: bool) -> None:
    c = LlamaConfig.from_dict({**QWEN3_MOE, "norm_topk_prob": renorm})
    assert c.qk_norm
    assert c.moe == MoEConfig(num_experts=16, top_k=4, intermediate_size=128, renormalize=renorm)


def test_qwen3_moe_from_transformers_5_names_its_experts_num_local_experts() -> None:
    # transformers 5's Qwen3MoeConfig maps num_experts to the attribute num_local_experts and writes that key.
    d = {k: v for k, v in QWEN3_MOE.items() if k != "num_experts"}
    moe = LlamaConfig.from_dict({**d, "num_local_experts": 12}).moe
    assert moe is not None and moe.num_experts == 12
    both = LlamaConfig.from_dict({**QWEN3_MOE, "num_local_experts": 16}).moe
    assert both is not None and both.num_experts == 16


def test_mixtral_accepts_num_experts_too() -> None:
    d = {k: v for k, v in MIXTRAL.items() if k != "num_local_experts"}
    moe = LlamaConfig.from_dict({**d, "num_experts": 4}).moe
    assert moe is not None and moe.num_experts == 4
    default = LlamaConfig.from_dict(d).moe  # transformers' Mixtral default
    assert default is not None and default.num_experts == 8


def test_qwen3_moe_norm_topk_prob_defaults_to_false() -> None:
    d = dict(QWEN3_MOE)
    del d["norm_topk_prob"]
    moe = LlamaConfig.from_dict(d).moe
    assert moe is not None and not moe.renormalize


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({**QWEN3, "use_sliding_window": True}, "sliding-window attention .* is not supported"),
        ({**MIXTRAL, "sliding_window": 4096}, "sliding-window attention"),
        ({**QWEN3, "attention_bias": True}, "attention_bias=true is not supported"),
        ({**MIXTRAL, "num_experts_per_tok": 9}, r"num_experts_per_tok \(9\) exceeds the 8 experts"),
        ({**MIXTRAL, "num_experts_per_tok": None}, "missing 'num_experts_per_tok'"),
        ({**QWEN3_MOE, "num_experts": None}, "missing 'num_local_experts' or 'num_experts'"),
        ({**QWEN3_MOE, "num_local_experts": 8}, r"num_local_experts \(8\) and num_experts \(16\) disagree"),
        ({**QWEN3_MOE, "num_local_experts": 0}, "num_local_experts must be a positive integer"),
        ({**QWEN3_MOE, "decoder_sparse_step": 2}, "dense MLP layers between the MoE layers"),
        ({**QWEN3_MOE, "mlp_only_layers": [0]}, "dense MLP layers between the MoE layers"),
        ({**QWEN3_MOE, "moe_intermediate_size": 0}, "moe_intermediate_size must be a positive integer"),
        ({**QWEN3_MOE, "norm_topk_prob": "yes"}, "norm_topk_prob must be true or false"),
        ({**QWEN3_MOE, "shared_expert_intermediate_size": 64}, "shared experts are not supported"),
        ({**BASE, "model_type": "qwen2_moe"}, "model_type 'qwen2_moe' is not a Llama-family type.*'qwen3_moe'"),
    ],
)
def test_what_the_engine_does_not_implement_is_refused(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_dict(config)


def test_tensor_parallel_moe_whose_expert_columns_do_not_divide_is_refused_before_loading(tmp_path: Any) -> None:
    import json

    from fi_engine.models.llama import LlamaEngine

    # Qwen3-MoE: 8 heads, 4 KV heads and 512 dense columns divide by 4, the experts' 130 columns do not
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_MOE, "moe_intermediate_size": 130}))
    with pytest.raises(ValueError, match=r"4 does not divide the model's 130 expert intermediate columns "
                       r"\(moe_intermediate_size\)"):  # fmt: skip
        LlamaEngine(tmp_path, tensor_parallel=4)


def test_moe_path_is_checked_before_the_checkpoint_and_refused_without_experts(tmp_path: Any) -> None:
    from fi_engine.models.llama import LlamaEngine

    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "llama"}))
    for bad in ("fast", None, 1, "Dense"):  # refused before the config is read
        with pytest.raises(ValueError, match="moe_path: expected one of 'auto', 'routed', 'dense'"):
            LlamaEngine(tmp_path / "absent", moe_path=bad)  # type: ignore[arg-type]
    for path in ("routed", "dense"):  # a dense model: refused by name before CuPy is needed
        with pytest.raises(ValueError, match=f"moe_path: '{path}' needs MoE layers; this model has none"):
            LlamaEngine(tmp_path, moe_path=path)


def _moe_paths_of(config: dict[str, Any], moe_path: str, max_batch: int) -> list[str]:
    """The Llama family's ``moe_path_for`` of 1..max_batch + 1 rows, for a runner's sizes (no GPU: a stand-in)."""
    from types import SimpleNamespace

    from fi_engine.models.llama import Llama

    runner = SimpleNamespace(max_batch=max_batch, model_config=LlamaConfig.from_dict(config))
    return [Llama(moe_path).moe_path_for(runner, rows) for rows in range(1, max_batch + 2)]


def test_moe_path_auto_keeps_the_grouped_gemv_then_goes_dense_where_the_assignments_cover_the_experts() -> None:
    from fi_engine.layers.moe import MoELayer

    assert MoELayer.gemv_tokens == 8
    # Mixtral, 8 experts top-2: choose_path says dense from 4 rows, the grouped GEMV keeps steps of at most 16
    # assignments (GEMV_DENSE_FILL * 8 experts) and 8 rows (gemv_tokens): dense from 9 rows
    assert _moe_paths_of(MIXTRAL, "auto", 32) == ["routed"] * 8 + ["dense"] * 24 + ["routed"]  # 33: past max_batch
    # Qwen3-MoE-like, 16 experts top-4: the GEMV to 32 assignments (8 rows), dense from there
    assert _moe_paths_of(QWEN3_MOE, "auto", 16) == ["routed"] * 8 + ["dense"] * 8 + ["routed"]
    # 128 experts top-8 (Qwen3-30B-A3B): the GEMV to 8 rows, the grouped GEMM at 9-15, dense from 16 rows
    wide = {**QWEN3_MOE, "num_experts": 128, "num_experts_per_tok": 8}
    assert _moe_paths_of(wide, "auto", 32) == ["routed"] * 15 + ["dense"] * 17 + ["routed"]
    for forced in ("routed", "dense"):  # forced up to max_batch; longer steps (prefills) always routed
        assert _moe_paths_of(MIXTRAL, forced, 8) == [forced] * 8 + ["routed"]
    assert _moe_paths_of({**BASE, "model_type": "llama"}, "auto", 4) == ["routed"] * 5  # no experts: never dense


# ---- bad input: bounds, non-finite numbers, JSON no config holds, bad from_dir arguments ---------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"vocab_size": 2**70}, r"vocab_size must be a positive integer no larger than 2147483647 .* 71 bits"),
        ({"hidden_size": 2**31}, r"hidden_size must be a positive integer no larger than 2147483647"),
        ({"head_dim": 2**70}, r"head_dim must be a positive integer no larger than"),
        ({"num_hidden_layers": 10**5000}, r"num_hidden_layers must be a positive integer .* 16610 bits"),
        ({"max_position_embeddings": 2**63}, r"max_position_embeddings must be a positive integer no larger"),
        ({"eos_token_id": 2**70}, r"eos_token_id must be a token id in \[0, vocab_size=1000\)"),
        ({"eos_token_id": [1, 1000]}, r"eos_token_id must be a token id in \[0, vocab_size=1000\)"),
        ({"rms_norm_eps": float("inf")}, r"rms_norm_eps must be a finite number > 0, got inf"),
        ({"rms_norm_eps": float("nan")}, r"rms_norm_eps must be a finite number > 0, got nan"),
        ({"rms_norm_eps": 10**400}, r"rms_norm_eps must be a finite number > 0, got an integer of 1329 bits"),
        ({"rms_norm_eps": "1e-6"}, r"rms_norm_eps must be a finite number > 0, got '1e-6'"),
        ({"rope_theta": float("inf")}, r"rope_theta must be a finite number > 0, got inf"),  # not "rope rope_theta"
    ],
)
def test_sizes_past_int32_and_non_finite_numbers_are_refused_by_field(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=rf"^config\.json: {match}"):
        LlamaConfig.from_dict({**BASE, **change}, source="config.json")


def test_experts_past_int32_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^c: num_local_experts must be a positive integer no larger than"):
        LlamaConfig.from_dict({**MIXTRAL, "num_local_experts": 2**70}, source="c")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[" * 100_000 + "]" * 100_000, r"nests its JSON too deeply to parse"),
        ('{"vocab_size": ' + "9" * 5000 + "}", r"is not valid JSON or holds a number no config needs"),
        (json.dumps({**BASE, "rms_norm_eps": float("inf")}), r"rms_norm_eps must be a finite number > 0, got inf"),
    ],
    ids=["nested", "5000 digits", "Infinity"],
)
def test_json_no_config_holds_is_named_with_its_file(tmp_path: Any, text: str, match: str) -> None:
    (tmp_path / "config.json").write_text(text)
    assert "Infinity" in text or "rms_norm_eps" not in text  # json writes float("inf") as Infinity
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'config.json'))}.*{match}"):
        LlamaConfig.from_dir(tmp_path)


@pytest.mark.parametrize(
    ("model_dir", "error", "match"),
    [
        (None, TypeError, r"^model_dir: expected a path \(str or os.PathLike\).*got NoneType"),
        (5, TypeError, r"^model_dir: expected a path .*got int"),
        (b"/tmp", TypeError, r"^model_dir: expected a path .*got bytes"),
        ("/tmp/a\x00b", ValueError, r"^model_dir: contains a NUL byte"),
    ],
)
def test_bad_from_dir_arguments_are_named(model_dir: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LlamaConfig.from_dir(model_dir)


def test_an_unknown_model_type_is_refused_naming_every_served_one(tmp_path: Path) -> None:
    from fi_engine.checkpoint.config import LlamaConfig
    from fi_engine.models.registry import model_types, read_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError) as info:
        read_config(tmp_path)
    text = str(info.value)
    assert "model_type 'bert' is not supported" in text and "'deepseek_v2', 'deepseek_v3'" in text
    assert all(repr(t) in text for t in model_types())
    # the Llama family's own reader does not pass its four types off as all the engine runs
    with pytest.raises(ValueError) as info:
        LlamaConfig.from_dict({"model_type": "bert"})
    text = str(info.value)
    assert "is not a Llama-family type (LlamaConfig reads 'llama', 'qwen3', 'mixtral', 'qwen3_moe')" in text
    assert "this engine runs" not in text and "fi_engine.models.registry.read_config" in text

"""Tensor parallelism of the Llama engine on CPU: the per-rank shard of a model, the weight blocks each rank
keeps, and a model whose heads a tensor-parallel size does not divide refused by name (the SmolLM2 shape: 9
query heads, 3 KV heads), by the engine and by ``fi-ffi generate --tp`` (which starts its own ranks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env

from fi_ffi.models.config import LlamaConfig
from fi_ffi.models.tensor_parallel import columns, rows, shard_config

LLAMA = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
SMOLLM2 = {**LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}


def test_shards_divide_heads_and_mlp_columns_only() -> None:
    cfg = LlamaConfig.from_dict(LLAMA)
    for n in (1, 2, 4):
        local = shard_config(cfg, n)
        assert (local.num_qo_heads, local.num_kv_heads, local.intermediate_size) == (16 // n, 4 // n, 2816 // n)
        assert (local.hidden_size, local.head_dim, local.vocab_size) == (1024, 64, 1000)


@pytest.mark.parametrize(
    ("config", "n", "message"),
    [
        (SMOLLM2, 2, r"tensor_parallel: 2 does not divide the model's 9 query heads \(num_attention_heads\)"),
        (SMOLLM2, 4, r"tensor_parallel: 4 does not divide the model's 9 query heads"),
        (LLAMA, 8, r"tensor_parallel: 8 does not divide the model's 4 KV heads \(num_key_value_heads\)"),
        ({**LLAMA, "intermediate_size": 2818}, 4, r"4 does not divide the model's 2818 MLP columns"),
    ],
)
def test_a_size_that_does_not_divide_is_refused_by_name(config: dict, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shard_config(LlamaConfig.from_dict(config), n)


def test_smollm2_shape_divides_by_three() -> None:
    assert shard_config(LlamaConfig.from_dict(SMOLLM2), 3).num_kv_heads == 1


def test_row_and_column_blocks_tile_the_weight() -> None:
    w = np.arange(8 * 6).reshape(8, 6)
    assert np.array_equal(np.concatenate([rows(w, r, 4) for r in range(4)]), w)
    assert np.array_equal(np.concatenate([columns(w, r, 3) for r in range(3)], axis=1), w)
    assert columns(w, 1, 3).flags.c_contiguous  # uploaded as is


def _model_dir(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_engine_refuses_before_touching_a_gpu(tmp_path: Path) -> None:
    from fi_ffi.models.llama import LlamaEngine

    with pytest.raises(ValueError, match="tensor_parallel: 2 does not divide the model's 9 query heads"):
        LlamaEngine(_model_dir(tmp_path, SMOLLM2), tensor_parallel=2)
    with pytest.raises(ValueError, match="tensor_parallel: expected a positive integer, got 0"):
        LlamaEngine(_model_dir(tmp_path, SMOLLM2), tensor_parallel=0)


def test_generate_tp_starts_ranks_that_report_the_error(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, SMOLLM2)
    done = subprocess.run(
        [sys.executable, "-m", "fi_ffi", "generate", "--model", str(model), "--prompt-ids", "1,2", "--tp", "2"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    # the first rank to fail makes the launcher stop the other, which may not have printed yet
    assert done.stderr.count("tensor_parallel: 2 does not divide the model's 9 query heads") >= 1


def test_generate_tp_refuses_a_device(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fi_ffi",
            "generate",
            "--model",
            str(tmp_path),
            "--prompt-ids",
            "1",
            "--tp",
            "2",
            "--device",
            "1",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--device: each rank of --tp uses GPU LOCAL_RANK" in done.stderr

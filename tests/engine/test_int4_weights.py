"""AWQ and GPTQ int4 checkpoints on the host (fi_engine.checkpoint.int4_weights, .quantization): random int4 layers
written the way AutoAWQ (``WQLinear_GEMM``) and AutoGPTQ / GPTQModel write them, with this suite's own packers
(tests/helpers/int4_checkpoints.py, checked against an element-at-a-time packing and hand-written words), read back
and dequantized **exactly** as a plain numpy ``(q - z) * s`` per group computes them (float32; float16 and bfloat16
rounded once, to nearest even) -- group sizes 128, 64 and -1 (one group), GPTQ's v1 zeros (stored minus one) and
v2 ones, a short last group; every malformed tensor refused naming it; the ``quantization_config`` keys as the tools
write them, read to a scheme, and each unserved setting refused naming its key and the way out; and the Llama
family's load path (``Llama.load`` over host arrays standing in for CuPy) putting the dequantized projections where
a 16-bit checkpoint's go, with tied and untied heads, a GPTQ-quantized head, and modules left 16-bit; the GPU test's
checkpoints loading the very bytes of their dequantized float16 copies. No GPU: the engine's logits against those
copies are tests/engine/test_gpu_int4_llama.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers.host_uploads import HostArrays
from helpers.int4_checkpoints import (
    int4_tensors,
    pack_awq,
    pack_columns,
    pack_one_by_one,
    pack_rows,
    quantization_config,
    reference,
    write_16bit_copy,
    write_int4_copy,
)
from helpers.random_llama import bf16_bits, save_random_llama

from fi_engine.checkpoint.config import LlamaConfig
from fi_engine.checkpoint.int4_weights import AWQ_ORDER, Int4Matrix, decode_gemv_layout, read_int4_linear
from fi_engine.checkpoint.quantization import Int4Scheme, int4_scheme
from fi_engine.checkpoint.safetensors import Checkpoint, write_safetensors

BASE = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
}  # fmt: skip
# quantization_config as the tools write it (keys and values, not copied files)
AUTOAWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
           "modules_to_not_convert": None}  # fmt: skip
AUTOGPTQ = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
            "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
            "quant_method": "gptq"}  # fmt: skip
GPTQMODEL_V2 = {"bits": 4, "dynamic": None, "group_size": 64, "desc_act": False, "sym": False, "lm_head": False,
                "quant_method": "gptq", "checkpoint_format": "gptq_v2", "format": "gptq_v2", "pack_dtype": "int32",
                "meta": {"quantizer": ["gptqmodel:2.0.0"]}}  # fmt: skip


def _write(path: Path, tensors: dict[str, Any]) -> Checkpoint:
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", tensors)
    return Checkpoint(path)


def _scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(1e-3, 3e-2, shape).astype(np.float16)


# ---- the test's packers are the formats -----------------------------------------------------------------------


def test_the_packers_write_the_publishers_words() -> None:
    eight = np.arange(8, dtype=np.uint8)[None, :]
    # AWQ: nibble j holds column AWQ_ORDER[j]: from the lowest nibble the columns read 0 2 4 6 1 3 5 7
    assert int(pack_awq(eight).view(np.uint32)[0, 0]) == 0x75316420
    assert int(pack_columns(eight).view(np.uint32)[0, 0]) == 0x76543210  # GPTQ's zeros: in order
    assert int(pack_rows(eight.T).view(np.uint32)[0, 0]) == 0x76543210  # GPTQ's weight: eight inputs in order
    assert int(pack_columns(np.full((1, 8), 7, np.uint8))[0, 0]) == 0x77777777  # symmetric GPTQ v1: zero 8 stored as 7
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    rng = np.random.default_rng(1)
    values = rng.integers(0, 16, (16, 24)).astype(np.uint8)
    assert np.array_equal(pack_awq(values), pack_one_by_one(values, False, AWQ_ORDER))
    assert np.array_equal(pack_columns(values), pack_one_by_one(values, False))
    assert np.array_equal(pack_rows(values), pack_one_by_one(values, True))


# ---- one layer against numpy ----------------------------------------------------------------------------------


def _check_dequantized(m: Int4Matrix, want: np.ndarray) -> None:
    """``m`` dequantizes to ``want`` (float32 ``[n, k]``) exactly, and to its float16 / bfloat16 roundings bitwise."""
    got = m.dequantized()
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)
    assert np.array_equal(m.dequantized("float16").view(np.uint16), want.astype(np.float16).view(np.uint16))
    assert np.array_equal(m.dequantized("bfloat16"), bf16_bits(want))


@pytest.mark.parametrize(("group_size", "k"), [(128, 256), (64, 256), (-1, 192)])
def test_an_awq_layer_reads_as_numpy_dequantizes_it(tmp_path: Path, group_size: int, k: int) -> None:
    rng = np.random.default_rng(group_size + 2)
    n, groups = 48, (1 if group_size == -1 else k // group_size)
    q = rng.integers(0, 16, (k, n)).astype(np.uint8)
    z = rng.integers(0, 16, (groups, n)).astype(np.uint8)
    s = _scales(rng, (groups, n))
    ckpt = _write(tmp_path, int4_tensors("p", q, z, s, "awq", group_size))
    assert ckpt.info("p.qweight").shape == (k, n // 8) and ckpt.info("p.qzeros").shape == (groups, n // 8)
    m = read_int4_linear(ckpt, Int4Scheme("awq", group_size), "p", (n, k))
    assert np.array_equal(m.codes, q.T) and np.array_equal(m.zeros, z) and np.array_equal(m.scales, s)
    _check_dequantized(m, reference(q, z, s, group_size))


@pytest.mark.parametrize(
    ("group_size", "k", "v1"),
    [(128, 256, True), (64, 256, True), (128, 256, False), (-1, 192, True), (128, 320, False)],
    ids=["g128-v1", "g64-v1", "g128-v2", "one-group-v1", "short-last-group-v2"],
)
def test_a_gptq_layer_reads_as_numpy_dequantizes_it(tmp_path: Path, group_size: int, k: int, v1: bool) -> None:
    rng = np.random.default_rng(k + group_size)
    n = 40
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = rng.integers(0, 16, (k, n)).astype(np.uint8)
    stored = rng.integers(0, 16, (groups, n)).astype(np.uint8)
    z = stored + 1 if v1 else stored  # v1 stores every zero minus one: 15 stands for 16
    s = _scales(rng, (groups, n))
    ckpt = _write(tmp_path, int4_tensors("p", q, z, s, "gptq", group_size, v1))
    assert ckpt.info("p.qweight").shape == (k // 8, n) and ckpt.info("p.g_idx").shape == (k,)
    m = read_int4_linear(ckpt, Int4Scheme("gptq", group_size, 1 if v1 else 0), "p", (n, k))
    assert np.array_equal(m.codes, q.T) and np.array_equal(m.zeros, z)
    _check_dequantized(m, reference(q, z, s, group_size))


def test_symmetric_gptq_v1_zeros_of_7_are_8(tmp_path: Path) -> None:
    q = np.full((128, 8), 9, np.uint8)  # 9 - 8 = 1: w is the scale
    ckpt = _write(tmp_path, {
        "p.qweight": pack_rows(q), "p.qzeros": np.full((1, 1), 0x77777777, np.int32),
        "p.scales": np.full((1, 8), 0.5, np.float16),
    })  # fmt: skip
    m = read_int4_linear(ckpt, Int4Scheme("gptq", 128, 1), "p", (8, 128))
    assert (m.zeros == 8).all() and (m.dequantized() == 0.5).all()


def test_bfloat16_and_float32_scales_are_read(tmp_path: Path) -> None:
    q = np.full((64, 8), 3, np.uint8)
    z = np.full((1, 8), 1, np.uint8)
    bits = bf16_bits(np.full((1, 8), 0.25, np.float32))
    ckpt = _write(tmp_path, {
        **{k: v for k, v in int4_tensors("a", q, z, np.ones((1, 8), np.float16), "awq", 64).items()
           if not k.endswith("scales")},
        "a.scales": (bits, "bfloat16"),
        **{k: v for k, v in int4_tensors("b", q, z, np.ones((1, 8), np.float16), "awq", 64).items()
           if not k.endswith("scales")},
        "b.scales": np.full((1, 8), 0.75, np.float32),
    })  # fmt: skip
    assert (read_int4_linear(ckpt, Int4Scheme("awq", 64), "a", (8, 64)).dequantized() == 0.5).all()
    assert (read_int4_linear(ckpt, Int4Scheme("awq", 64), "b", (8, 64)).dequantized() == 1.5).all()


def _layer(method: str = "awq", **replace: Any) -> dict[str, Any]:
    q = np.zeros((128, 16), np.uint8)
    z = np.zeros((1, 16), np.uint8)
    tensors = int4_tensors("a", q, z, np.ones((1, 16), np.float16), method, 128, v1=False)
    tensors.update(replace)
    return {k: v for k, v in tensors.items() if v is not None}


@pytest.mark.parametrize(
    ("method", "tensors", "shape", "message"),
    [
        ("awq", _layer(**{"a.qzeros": None}), (16, 128), "has no 'a.qzeros' (packed zeros)"),
        ("awq", _layer(**{"a.qweight": np.zeros((128, 2), np.float16)}), (16, 128),
         "'a.qweight' is float16; expected int32 (AWQ-packed weights)"),
        ("awq", _layer(), (16, 256), "'a.qweight' has shape [128, 2], expected [256, 2] (AWQ-packed weights)"),
        ("gptq", _layer("gptq"), (16, 256), "'a.qweight' has shape [16, 16], expected [32, 16] (GPTQ-packed weights)"),
        ("awq", _layer(**{"a.scales": np.ones((2, 16), np.float16)}), (16, 128),
         "'a.scales' has shape [2, 16], expected [1, 16] (one scale per group and output)"),
        ("awq", _layer(**{"a.scales": np.ones((1, 16), np.int32)}), (16, 128), "'a.scales' is int32; expected float16"),
        ("awq", _layer(**{"a.scales": np.full((1, 16), np.inf, np.float16)}), (16, 128),
         "'a.scales' holds a scale that is not finite"),
        ("gptq", _layer("gptq", **{"a.g_idx": np.ones(128, np.int32)}), (16, 128),
         "'a.g_idx' does not give input i the group i // 128 (act-order groups"),
        ("gptq", _layer("gptq", **{"a.g_idx": (np.arange(128, dtype=np.int32) % 2)}), (16, 128),
         "(act-order groups, which this engine does not serve)"),
        ("awq", _layer(), (12, 128), "has 12 outputs and 128 inputs; int4 packs eight outputs to an int32"),
        ("gptq", _layer("gptq"), (16, 124), "int4 packs eight inputs to an int32"),
    ],
)  # fmt: skip
def test_a_malformed_int4_tensor_is_refused_by_name(
    tmp_path: Path, method: str, tensors: dict[str, Any], shape: tuple[int, int], message: str
) -> None:
    ckpt = _write(tmp_path, tensors)
    with pytest.raises(ValueError) as info:
        read_int4_linear(ckpt, Int4Scheme(method, 128), "a", shape)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_a_scale_too_large_for_the_16_bit_type_is_refused() -> None:
    m = Int4Matrix(np.full((8, 8), 15, np.uint8), np.zeros((1, 8), np.uint8), np.full((1, 8), 6e4, np.float32), 8)
    unused = Int4Matrix(np.ones((8, 8), np.uint8), np.zeros((1, 8), np.uint8), np.full((1, 8), 6e4, np.float32), 8)
    assert (unused.dequantized("float16") == 6e4).all()  # code 15 would overflow, but no weight holds it
    assert np.isfinite(m.dequantized()).all()  # 9e5 is a float32
    with pytest.raises(ValueError, match="not finite in float16"):
        m.dequantized("float16")
    assert np.isfinite(m.dequantized("bfloat16").view(np.uint16).astype(np.uint32) << 16).all()  # bf16 reaches 3e38
    with pytest.raises(ValueError, match="dtype: expected 'float32', 'float16' or 'bfloat16', got 'int8'"):
        m.dequantized("int8")


# ---- quantization_config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "want"),
    [
        (AUTOAWQ, Int4Scheme("awq", 128, 0, ())),
        ({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM",
          "modules_to_not_convert": ["visual"]}, Int4Scheme("awq", 64, 0, ("visual",))),
        ({"quant_method": "awq", "bits": 4, "group_size": 128}, Int4Scheme("awq", 128)),  # transformers' defaults
        (AUTOGPTQ, Int4Scheme("gptq", 128, 1)),  # no checkpoint_format: v1, the zeros stored minus one
        ({**AUTOGPTQ, "checkpoint_format": "gptq", "group_size": -1}, Int4Scheme("gptq", -1, 1)),
        (GPTQMODEL_V2, Int4Scheme("gptq", 64, 0)),
        ({**AUTOGPTQ, "lm_head": True}, Int4Scheme("gptq", 128, 1)),
        ({**AUTOGPTQ, "desc_act": True, "static_groups": True}, Int4Scheme("gptq", 128, 1)),  # g_idx is i // 128
        ({"quant_method": "fp8"}, None),
    ],
)  # fmt: skip
def test_published_int4_configs_are_read_by_name(q: dict[str, Any], want: Int4Scheme | None) -> None:
    assert int4_scheme(q, "config.json") == want


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("q", [AUTOAWQ, AUTOGPTQ, GPTQMODEL_V2])
def test_a_dense_int4_checkpoint_is_served(model_type: str, q: dict[str, Any]) -> None:
    c = LlamaConfig.from_dict({**BASE, "model_type": model_type, "quantization_config": q})
    assert c.int4 == int4_scheme(q, "config") and c.fp8 is None
    assert "read as stored by the int4 GEMV" in c.int4.describe()


def test_the_description_names_the_layout() -> None:
    assert Int4Scheme("awq", 128).describe() == "AWQ int4 weights (groups of 128), read as stored by the int4 GEMV"
    assert Int4Scheme("gptq", 64, 1).describe().startswith("GPTQ int4 weights (groups of 64)")
    assert Int4Scheme("gptq", -1, 0).describe().startswith("GPTQ v2 int4 weights (one group per column)")


@pytest.mark.parametrize(
    ("q", "message"),
    [
        ({**AUTOAWQ, "bits": 8}, "quantization_config.bits: 8; this engine serves AWQ checkpoints of 4-bit weights"),
        ({**AUTOGPTQ, "bits": 3}, "quantization_config.bits: 3; this engine serves GPTQ checkpoints of 4-bit"),
        ({**AUTOGPTQ, "bits": "4"}, "quantization_config.bits: '4'"),
        ({"quant_method": "awq", "w_bit": 8, "q_group_size": 128}, "quantization_config.w_bit: 8"),
        ({**AUTOAWQ, "version": "gemv"}, "quantization_config.version: 'gemv'; this engine reads AWQ's GEMM packing"),
        ({**AUTOAWQ, "version": "gemv_fast"}, "version: 'gemv_fast'"),
        ({**AUTOAWQ, "version": "exllama"}, "version: 'exllama'"),
        ({**AUTOAWQ, "version": "marlin"}, "version: 'marlin'"),
        ({**AUTOAWQ, "zero_point": False}, "quantization_config.zero_point: False; AWQ's GEMM layout has a zero"),
        ({**AUTOAWQ, "modules_to_not_convert": "lm_head"}, "modules_to_not_convert: expected null or a list"),
        ({**AUTOAWQ, "group_size": 0}, "quantization_config.group_size: expected a positive int (e.g. 128) or -1"),
        ({**AUTOGPTQ, "group_size": "128"}, "quantization_config.group_size: expected a positive int"),
        ({**AUTOGPTQ, "group_size": None}, "quantization_config.group_size: expected"),
        ({**AUTOGPTQ, "desc_act": True}, "quantization_config.desc_act: true (without static_groups); act-order"),
        ({**AUTOGPTQ, "desc_act": 1}, "quantization_config.desc_act: expected true or false, got 1"),
        ({**AUTOGPTQ, "static_groups": None}, "quantization_config.static_groups: expected true or false"),
        ({**AUTOGPTQ, "checkpoint_format": "marlin"}, "quantization_config.checkpoint_format: 'marlin'; this engine "
         "reads the 'gptq' and 'gptq_v2' layouts"),
        ({**AUTOGPTQ, "format": "bitblas"}, "quantization_config.format: 'bitblas'"),
        ({**AUTOGPTQ, "checkpoint_format": ["gptq"]}, "quantization_config.checkpoint_format: ['gptq']"),
        ({**AUTOGPTQ, "is_marlin_format": True}, "quantization_config.is_marlin_format: true; Marlin-packed"),
        ({**AUTOGPTQ, "dynamic": {"-:.*down_proj": {}}}, "quantization_config.dynamic: {'-:.*down_proj': {}}; "
         "per-module overrides"),
        ({**AUTOGPTQ, "pack_dtype": "int64"}, "quantization_config.pack_dtype: 'int64'"),
        ({**AUTOGPTQ, "sym": "yes"}, "quantization_config.sym: expected true or false"),
    ],
)  # fmt: skip
def test_an_unserved_int4_setting_is_refused_naming_its_key(q: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        LlamaConfig.from_dict({**BASE, "quantization_config": q}, source="config.json")
    text = str(info.value)
    assert text.startswith("config.json: ") and message in text, text
    if "expected" not in message:  # a refusal (not a malformed value) says the way out
        assert "bfloat16" in text


@pytest.mark.parametrize(
    "extra",
    [{"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2},
     {"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768}],
)  # fmt: skip
@pytest.mark.parametrize("q", [AUTOAWQ, AUTOGPTQ])
def test_an_int4_moe_checkpoint_is_refused(extra: dict[str, Any], q: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        LlamaConfig.from_dict({**BASE, **extra, "quantization_config": q}, source="config.json")
    assert "in a mixture-of-experts model; this engine serves int4 weights for dense models only" in str(info.value)
    assert "bfloat16 copy" in str(info.value)


def test_another_quantization_is_refused_by_its_method() -> None:
    q = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ValueError, match=r"quant_method 'bitsandbytes'\) is not supported: .* AWQ/GPTQ int4 ones"):
        LlamaConfig.from_dict({**BASE, "quantization_config": q}, source="config.json")


def test_the_helper_writes_the_tools_configs(tmp_path: Path) -> None:
    assert quantization_config("awq", 128) == AUTOAWQ
    src = save_random_llama(_dir(tmp_path, "f16"), "float16", 64, (4, 2), 256, 384, False)
    write_int4_copy(src, tmp_path / "gptq", "gptq", 64, v1=False)
    written = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert LlamaConfig.from_dir(tmp_path / "gptq").int4 == int4_scheme(written, "config") == Int4Scheme("gptq", 64, 0)


# ---- the Llama family's load path, over host arrays -------------------------------------------------------------


def _dir(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


class Int4Registry:
    """Stands in for the GPU's Dense where the load registers int4 weights (``dense.quantized.add_int4_weight``):
    keeps each registration's values by weight address."""

    def __init__(self) -> None:
        self.quantized = self  # (the Dense's registry part: this stand-in is both)
        self.weights: dict[int, tuple[int, int, int, int]] = {}  # w -> (n, k, records, group_size)
        self.interleaved: set[int] = set()  # the weights registered with gate and up interleaved by 8 rows

    def add_int4_weight(self, w: int, n: int, k: int, records: int, group_size: int, interleaved: bool = False) -> None:
        self.weights[w] = (n, k, records, group_size)
        if interleaved:
            self.interleaved.add(w)


def _interleaved8(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``[gate; up]`` rows interleaved by 8, written out row by row: 8 of gate, the same 8 of up, ..."""
    rows = []
    for b in range(0, gate.shape[0], 8):
        rows += [gate[b : b + 8], up[b : b + 8]]
    return np.concatenate(rows)


def _load(
    path: Path, rank: int = 0, tensor_parallel: int = 1, dense: Int4Registry | None = None
) -> tuple[SimpleNamespace, HostArrays]:
    """``Llama.load`` of ``path`` into a stand-in engine (``rank`` of ``tensor_parallel``; the LM head whole); with
    ``dense`` the engine serves int4 as stored (``int4_as_stored``) and registers those weights there, else it
    dequantizes them at load."""
    from fi_engine.models.llama import Llama

    host = HostArrays()
    eng = SimpleNamespace(
        model_config=LlamaConfig.from_dir(path), rank=rank, tensor_parallel=tensor_parallel, vocab_shard=None,
        cupy=host, device=0, int4_as_stored=dense is not None, dense=dense,
    )  # fmt: skip
    Llama().load(eng, Checkpoint(path))  # type: ignore[arg-type]
    return eng, host


def _as16(w: np.ndarray, dtype: str) -> np.ndarray:
    return w.astype(np.float16) if dtype == "float16" else bf16_bits(w)


@pytest.mark.parametrize(
    ("method", "group_size", "dtype", "tied", "v1"),
    [("awq", 128, "float16", False, True), ("awq", 64, "float16", True, True), ("gptq", 64, "float16", True, True),
     ("gptq", 128, "bfloat16", False, False), ("gptq", -1, "float16", False, True)],
    ids=["awq-g128-untied", "awq-g64-tied", "gptq-g64-tied", "gptq-v2-g128-bf16-untied", "gptq-one-group-untied"],
)  # fmt: skip
def test_the_llama_load_places_the_dequantized_projections(
    tmp_path: Path, method: str, group_size: int, dtype: str, tied: bool, v1: bool
) -> None:
    src = save_random_llama(_dir(tmp_path, "src"), dtype, 64, (4, 2), 256, 384, False, tied=tied)
    deq = write_int4_copy(src, tmp_path / "int4", method, group_size, sym=v1, v1=v1)
    eng, host = _load(tmp_path / "int4")
    ckpt = Checkpoint(tmp_path / "int4")
    assert eng.dtype == dtype and eng.model_config.int4 is not None
    for i in range(4):

        def w(name: str, p: str = f"model.layers.{i}.") -> np.ndarray:
            return _as16(deq[p + name + ".weight"], dtype)

        qkv = np.concatenate([w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")])
        assert np.array_equal(host.by_ptr[eng.wqkv[i]], qkv)
        assert np.array_equal(host.by_ptr[eng.wo[i]], w("self_attn.o_proj"))
        assert np.array_equal(host.by_ptr[eng.wgu[i]], np.concatenate([w("mlp.gate_proj"), w("mlp.up_proj")]))
        assert np.array_equal(host.by_ptr[eng.wd[i]], w("mlp.down_proj"))
    assert np.array_equal(host.by_ptr[eng.embed], np.asarray(ckpt.array("model.embed_tokens.weight")))
    if tied:
        assert eng.lm_head == eng.embed and "lm_head.weight" not in ckpt
    else:  # the head stays 16-bit, as AutoAWQ and GPTQ (lm_head: false) leave it
        assert eng.lm_head != eng.embed
        assert np.array_equal(host.by_ptr[eng.lm_head], np.asarray(ckpt.array("lm_head.weight")))


def test_a_quantized_gptq_head_and_a_16_bit_module_are_read(tmp_path: Path) -> None:
    src = save_random_llama(_dir(tmp_path, "src"), "float16", 64, (4, 2), 256, 384, False, tied=False)
    deq = write_int4_copy(src, tmp_path / "int4", "gptq", 128)
    ckpt = Checkpoint(tmp_path / "int4")
    # copies, not memory maps: the file is rewritten below
    tensors: dict[str, Any] = {name: np.array(ckpt.array(name)) for name in ckpt.tensors}
    rng = np.random.default_rng(5)
    head_q = rng.integers(0, 16, (256, 4096)).astype(np.uint8)  # GPTQModel's lm_head: true: the head is int4 too
    head_z, head_s = rng.integers(1, 16, (2, 4096)).astype(np.uint8), _scales(rng, (2, 4096))
    del tensors["lm_head.weight"]
    tensors.update(int4_tensors("lm_head", head_q, head_z, head_s, "gptq", 128))
    down = "model.layers.2.mlp.down_proj"  # a module left 16-bit (AWQ's modules_to_not_convert, GPTQModel's dynamic)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        del tensors[f"{down}.{key}"]
    tensors[down + ".weight"] = np.random.default_rng(6).standard_normal((256, 384)).astype(np.float16)
    write_safetensors(tmp_path / "int4" / "model.safetensors", tensors)
    eng, host = _load(tmp_path / "int4")
    assert np.array_equal(host.by_ptr[eng.lm_head], reference(head_q, head_z, head_s, 128).astype(np.float16))
    assert np.array_equal(host.by_ptr[eng.wd[2]], tensors[down + ".weight"])
    assert np.array_equal(host.by_ptr[eng.wd[1]], deq["model.layers.1.mlp.down_proj.weight"].astype(np.float16))


def test_a_missing_projection_names_both_forms(tmp_path: Path) -> None:
    src = save_random_llama(_dir(tmp_path, "src"), "float16", 64, (4, 2), 256, 384, False)
    write_int4_copy(src, tmp_path / "int4", "awq", 128)
    ckpt = Checkpoint(tmp_path / "int4")
    tensors = {name: np.array(ckpt.array(name)) for name in ckpt.tensors if ".layers.3.self_attn.o_proj." not in name}
    write_safetensors(tmp_path / "int4" / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"has neither 'model.layers.3.self_attn.o_proj.qweight' \(int4\) nor"):
        _load(tmp_path / "int4")


def test_a_scale_overflowing_float16_is_refused_naming_the_projection(tmp_path: Path) -> None:
    src = save_random_llama(_dir(tmp_path, "src"), "float16", 64, (4, 2), 256, 384, False)
    write_int4_copy(src, tmp_path / "int4", "awq", 128)
    ckpt = Checkpoint(tmp_path / "int4")
    tensors = {name: np.array(ckpt.array(name)) for name in ckpt.tensors}
    tensors["model.layers.0.mlp.up_proj.scales"] = np.full((2, 384), 60000, np.float16)
    write_safetensors(tmp_path / "int4" / "model.safetensors", tensors)
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj': the dequantized weight has values that are "):
        _load(tmp_path / "int4")


@pytest.mark.parametrize(
    ("method", "group_size", "v1", "tied", "rank"),
    [("awq", 128, True, False, None), ("gptq", 64, True, True, None), ("gptq", 128, False, False, None),
     ("awq", 128, True, False, 1)],
    ids=["awq-g128", "gptq-v1-sym-g64", "gptq-v2-asym-g128", "awq-g128-rank-1-of-2"],
)  # fmt: skip
def test_an_int4_checkpoint_loads_the_bytes_of_its_dequantized_float16_copy(
    tmp_path: Path, method: str, group_size: int, v1: bool, tied: bool, rank: int | None
) -> None:
    """What the GPU test (test_gpu_int4_llama.py) rests on: the engine given the int4 checkpoint uploads exactly the
    bytes it uploads given the float16 checkpoint of the dequantized weights (helpers' write_16bit_copy); with
    tensor parallelism (``rank`` of 2), its shard of them."""
    src = save_random_llama(_dir(tmp_path, "src"), "float16", 64, (8, 2), 512, 1536, False, tied=tied)
    write_16bit_copy(src, tmp_path / "f16", write_int4_copy(src, tmp_path / "int4", method, group_size, sym=v1, v1=v1))
    tp = (0, 1) if rank is None else (rank, 2)
    (a, host_a), (b, host_b) = _load(tmp_path / "int4", *tp), _load(tmp_path / "f16", *tp)
    if rank is not None:  # this rank's half of the q, k and v rows (384 of 768) and of o's columns
        assert host_a.by_ptr[a.wqkv[0]].shape == (384, 512) and host_a.by_ptr[a.wo[0]].shape == (512, 256)
    assert a.model_config.int4 is not None and b.model_config.int4 is None
    for name in ("wqkv", "wo", "wgu", "wd"):
        for pa, pb in zip(getattr(a, name), getattr(b, name), strict=True):
            assert np.array_equal(host_a.by_ptr[pa].view(np.uint16), host_b.by_ptr[pb].view(np.uint16))
    assert np.array_equal(host_a.by_ptr[a.lm_head], host_b.by_ptr[b.lm_head]) and (a.lm_head == a.embed) == tied
    o, host_o = _load(src, *tp)
    assert not np.array_equal(host_a.by_ptr[a.wqkv[0]], host_o.by_ptr[o.wqkv[0]])  # int4 is not the original


# ---- what fi-engine serve reports ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "words", "method"),
    [(AUTOAWQ, ", AWQ int4 weights (groups of 128), read as stored by the int4 GEMV)", "awq"),
     (GPTQMODEL_V2, ", GPTQ v2 int4 weights (groups of 64), read as stored by the int4 GEMV)", "gptq"),
     (None, ", chunked prefill off)", None)],
    ids=["awq", "gptq", "16-bit"],
)  # fmt: skip
def test_serve_names_the_weights_in_its_start_up_line_and_models(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], q, words, method
) -> None:
    """``fi-engine serve`` (its engine stood in for by helpers.fake_engine, which needs no GPU) ends its start-up
    line with the quantized weights' description and hands their ``quant_method`` to the server's ``/v1/models``."""
    for module in ("tokenizers", "jinja2", "starlette", "uvicorn"):
        pytest.importorskip(module)
    from helpers.fake_engine import open_fake_engine
    from helpers.text_checkpoints import write_text_checkpoint

    from fi_engine import cli
    from fi_engine.models import registry
    from fi_engine.serve import openai_server

    root = write_text_checkpoint(tmp_path / "m")
    config = {**BASE, "vocab_size": 330, "num_hidden_layers": 1} | ({"quantization_config": q} if q else {})
    (root / "config.json").write_text(json.dumps(config))
    handed: dict[str, Any] = {}
    monkeypatch.setattr(registry, "open_engine", open_fake_engine)
    monkeypatch.setattr(openai_server, "serve", lambda *a, **k: handed.update(k))
    assert cli.main(["serve", str(root), "--port", "0", "--in-process"]) == 0
    line = capsys.readouterr().err.strip()
    assert line.startswith("fi-engine serve: serving ") and line.endswith(words), line
    assert handed["quantization"] == method


# ---- int4 kept as stored: the int4 GEMV's layout ------------------------------------------------------------------


def _where_the_kernel_reads(c: int) -> tuple[int, int]:
    """(byte of the row, nibble 0 low / 1 high) where csrc/int4_gemv.cu reads the code of input ``c``, written out
    from that file's layout comment: 128-input tiles of 64 bytes; lane t's 16 bytes at 16 t, words 2 h and 2 h + 1
    its inputs 64 h + 16 t + 4 q + e of half h; word 2 h + v holds steps 2 v and 2 v + 1, fields 0, 4, 1, 5 step
    2 v's e = 0..3 and 2, 6, 3, 7 step 2 v + 1's."""
    tile, r = divmod(c, 128)
    half, r = divmod(r, 64)
    t, r = divmod(r, 16)
    q, e = divmod(r, 4)
    v, odd = divmod(q, 2)
    field = [0, 4, 1, 5][e] + 2 * odd
    return 64 * tile + 16 * t + 4 * (2 * half + v) + field // 2, field % 2


def test_the_gemv_layout_puts_each_code_where_the_kernel_reads_it() -> None:
    rng = np.random.default_rng(11)
    n, k = 3, 384
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    zeros = rng.integers(0, 17, (3, n)).astype(np.uint8)
    scales = _scales(rng, (3, n))
    weights, records = Int4Matrix(codes, zeros, scales, 128).gemv_layout()
    # tile-major: one strip of 16 rows (rows 3-15 zero), 3 tiles of a kilobyte, row j's 64 bytes of a tile at 64 j
    assert weights.shape == (1, k // 128, 1024) and weights.dtype == np.uint8 and records.shape == (n, 3)
    for j in range(n):
        for c in range(k):
            byte, high = _where_the_kernel_reads(c)
            tile, at = divmod(byte, 64)
            assert (weights[0, tile, 64 * j + at] >> (4 * high)) & 0xF == codes[j, c], (j, c)
    assert not weights[:, :, 64 * n :].any()
    # a record: the float32 scale's bits with the zero in the low byte (float16 scales leave those bits clear)
    bits = scales.T.astype(np.float32).view(np.uint32)
    assert not (bits & 0xFF).any() and np.array_equal(records, bits | zeros.T)


def test_a_float32_scale_keeps_16_significant_bits_rounded_to_nearest() -> None:
    s = np.array([[1 + 2**-20, 1 + 2**-15 + 2**-17, 1 - 2**-16]], np.float32)  # 1 group, 3 rows
    m = Int4Matrix(np.full((3, 128), 9, np.uint8), np.array([[8, 8, 8]], np.uint8), s, 128)
    w = decode_gemv_layout(*m.gemv_layout(), 128)
    assert w[:, 0].tolist() == [1.0, 1 + 2**-15, 1 - 2**-16]  # (the last one is exact in 16 significant bits)


@pytest.mark.parametrize(
    ("k", "group_size"),
    [(64, 64), (192, 64), (256, 32), (384, 96), (256, 384)],
    ids=["k64", "k192", "g32", "g96", "g>k"],
)
def test_shapes_the_gemv_does_not_take_are_refused_by_the_layout(k: int, group_size: int) -> None:
    groups = max(1, -(-k // group_size))
    m = Int4Matrix(np.zeros((8, k), np.uint8), np.zeros((groups, 8), np.uint8), np.ones((groups, 8), np.float32),
                   group_size)  # fmt: skip
    with pytest.raises(ValueError, match="the int4 GEMV takes k a multiple of 128"):
        m.gemv_layout()


@pytest.mark.parametrize(
    ("method", "group_size", "dtype", "v1"),
    [("awq", 128, "float16", True), ("awq", 64, "bfloat16", True), ("gptq", 128, "float16", True),
     ("gptq", 64, "bfloat16", False), ("gptq", -1, "float16", True)],
    ids=["awq-g128", "awq-g64-bf16", "gptq-g128", "gptq-v2-g64-bf16", "gptq-one-group"],
)  # fmt: skip
def test_the_llama_load_keeps_int4_projections_in_the_gemv_layout(
    tmp_path: Path, method: str, group_size: int, dtype: str, v1: bool
) -> None:
    """``int4_as_stored``: every projection is uploaded in the int4 GEMV's layout and registered with the Dense
    (its shape and group size), q/k/v stacked by rows and gate/up interleaved by 8 rows (registered so, for the
    GEMV's SiLU form), and the layout stands for exactly the float32 weights the checkpoint dequantizes to; the
    embedding and head stay 16-bit."""
    src = save_random_llama(_dir(tmp_path, "src"), dtype, 64, (4, 2), 256, 384, False, tied=False)
    deq = write_int4_copy(src, tmp_path / "int4", method, group_size, sym=v1, v1=v1)
    dense = Int4Registry()
    eng, host = _load(tmp_path / "int4", dense=dense)
    g = 256 if group_size == -1 else group_size
    for i in range(4):

        def w(*names: str, p: str = f"model.layers.{i}.") -> np.ndarray:
            return np.concatenate([deq[p + name + ".weight"] for name in names])

        for ptr, want, k, group in (
            (eng.wqkv[i], w("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 256, g),
            (eng.wo[i], w("self_attn.o_proj"), 256, g),
            (eng.wgu[i], _interleaved8(w("mlp.gate_proj"), w("mlp.up_proj")), 256, g),
            (eng.wd[i], w("mlp.down_proj"), 384, 384 if group_size == -1 else g),
        ):
            n, k_, records, group_size_ = dense.weights[ptr]
            assert (n, k_, group_size_) == (want.shape[0], k, group)
            assert host.by_ptr[ptr].shape == (-(-n // 16), k // 128, 1024)
            assert host.by_ptr[records].shape == (n, k // group)
            assert np.array_equal(decode_gemv_layout(host.by_ptr[ptr], host.by_ptr[records], k), want)
    assert len(dense.weights) == 16 and eng.lm_head not in dense.weights
    assert dense.interleaved == set(eng.wgu)
    assert np.array_equal(host.by_ptr[eng.lm_head], np.asarray(Checkpoint(tmp_path / "int4").array("lm_head.weight")))


def test_a_tensor_parallel_shard_that_cuts_a_group_is_dequantized(tmp_path: Path) -> None:
    """Rank 1 of 2 with groups of 128: q/k/v and gate/up split by rows and o's 256 inputs in two whole groups stay
    int4; down's 384 inputs split at 192, inside a group, so that projection is dequantized (16-bit) instead."""
    src = save_random_llama(_dir(tmp_path, "src"), "float16", 64, (4, 2), 256, 384, False)
    deq = write_int4_copy(src, tmp_path / "int4", "awq", 128)
    dense = Int4Registry()
    eng, host = _load(tmp_path / "int4", rank=1, tensor_parallel=2, dense=dense)
    for i in range(4):
        p = f"model.layers.{i}."
        assert eng.wqkv[i] in dense.weights and eng.wo[i] in dense.weights and eng.wgu[i] in dense.weights
        o = deq[p + "self_attn.o_proj.weight"][:, 128:]
        n, k, records, _ = dense.weights[eng.wo[i]]
        assert (n, k) == (256, 128)
        assert np.array_equal(decode_gemv_layout(host.by_ptr[eng.wo[i]], host.by_ptr[records], k), o)
        assert eng.wd[i] not in dense.weights
        down = deq[p + "mlp.down_proj.weight"][:, 192:].astype(np.float16)
        assert np.array_equal(host.by_ptr[eng.wd[i]], down)


def test_the_layout_decoder_refuses_what_does_not_fit() -> None:
    w, r = Int4Matrix(
        np.zeros((8, 256), np.uint8), np.zeros((2, 8), np.uint8), np.ones((2, 8), np.float32), 128
    ).gemv_layout()
    for args, match in (
        ((w, r, 200), "k: expected a positive multiple of 128"),
        ((w, r, "256"), "k: expected a positive multiple of 128"),
        ((w.astype(np.int32), r, 256), r"weights: expected a uint8 array \[1, 2, 1024\]"),
        ((w[:, :1], r, 256), r"weights: expected a uint8 array \[1, 2, 1024\]"),
        ((w.reshape(2, 1024), r, 256), r"weights: expected a uint8 array \[1, 2, 1024\]"),
        ((w, np.zeros((17, 2), np.uint32), 256), r"weights: expected a uint8 array \[2, 2, 1024\] .* for 17 rows"),
        ((w, r.astype(np.int64), 256), r"records: expected a uint32 array \[n, G\]"),
        ((w, r[:0], 256), r"records: expected a uint32 array \[n, G\]"),
        ((w, np.zeros((8, 3), np.uint32), 256), r"records: expected a uint32 array \[n, G\] with G dividing 256"),
        ((w, [1, 2], 256), "records: expected a uint32 array"),
        (([1, 2], r, 256), "weights: expected a uint8 array"),
    ):
        with pytest.raises(ValueError, match=match):
            decode_gemv_layout(*args)  # type: ignore[arg-type]


def test_matrices_that_cannot_be_interleaved_by_8_rows_are_refused() -> None:
    def m(n: int, k: int, g: int) -> Int4Matrix:
        return Int4Matrix(
            np.zeros((n, k), np.uint8), np.zeros((k // g, n), np.uint8), np.ones((k // g, n), np.float32), g
        )

    for a, b in (
        (m(16, 256, 128), m(8, 256, 128)),
        (m(16, 256, 128), m(16, 256, 64)),
        (m(12, 256, 128), m(12, 256, 128)),
    ):
        with pytest.raises(ValueError, match="cannot be interleaved by 8 rows"):
            Int4Matrix.interleaved(a, b)
    both = Int4Matrix.interleaved(m(16, 256, 128), m(16, 256, 128))
    assert both.codes.shape == (32, 256) and both.zeros.shape == both.scales.shape == (2, 32)


def test_the_int4_registry_refuses_misaligned_records_and_outputs_before_any_gpu_work() -> None:
    """``Int4Linears`` checks its addresses on the host, before compiling or launching anything: records of groups of
    64 (read two at a time) need 8-byte alignment; an output row must hold aligned elements (float32: 4 bytes)."""
    from fi_engine.kernels.int4_linear import Int4Linears, Int4Weight

    registry = Int4Linears(None, None, 0)
    with pytest.raises(ValueError, match="records: groups of 64 are read two at a time: expected 8-byte alignment"):
        registry.add(1 << 20, 64, 256, (1 << 21) + 4, 64)
    assert registry.weights == {}
    wt = Int4Weight(1 << 20, 64, 256, 1 << 21, 128)
    with pytest.raises(ValueError, match="y: 0x[0-9a-f]+ must be aligned to 4 bytes .its float32 elements"):
        registry.gemv(1, 1 << 22, 256, wt, (1 << 23) + 2, 64, True, True)
    with pytest.raises(ValueError, match="y: 0x[0-9a-f]+ must be aligned to 2 bytes .its 16-bit elements"):
        registry.gemv(1, 1 << 22, 256, wt, (1 << 23) + 1, 64, True, False)


def test_the_int4_gemv_compiles_with_its_switches(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``Int4Linears.options``: the default (one tile ahead, the plain loop) names no lean loop, so the kernels compile
    as they did before it existed; ``lean_loop`` adds ``-DI4_LEAN_LOOP=1``; a value that is not a bool, tiles ahead
    past 1-4, or the lean loop with more than one tile ahead, is refused naming the setting, before NVRTC is asked."""
    from fi_engine.kernels.int4_linear import Int4Linears

    assert Int4Linears.lean_loop is False and Int4Linears.options() == ("-DI4_TILES_AHEAD=1",)
    monkeypatch.setattr(Int4Linears, "lean_loop", True)
    assert Int4Linears.options() == ("-DI4_TILES_AHEAD=1", "-DI4_LEAN_LOOP=1")
    monkeypatch.setattr(Int4Linears, "tiles_ahead", 2)  # (the lean loop loads one tile at a time)
    with pytest.raises(ValueError, match="the lean loop loads one tile at a time; tiles_ahead is 2"):
        Int4Linears.options()
    monkeypatch.setattr(Int4Linears, "tiles_ahead", 1)
    monkeypatch.setattr(Int4Linears, "lean_loop", 1)
    with pytest.raises(ValueError, match="Int4Linears.lean_loop: expected True or False, got 1"):
        Int4Linears.options()
    monkeypatch.setattr(Int4Linears, "lean_loop", False)
    monkeypatch.setattr(Int4Linears, "tiles_ahead", 5)
    with pytest.raises(ValueError, match="Int4Linears.tiles_ahead: expected an int from 1 to 4, got 5"):
        Int4Linears.options()

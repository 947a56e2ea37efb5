"""FP8 weights on the host (fi_engine.checkpoint.fp8_weights): the e4m3 table against the format's definition, rounding
to e4m3 (nearest, ties to the even code, saturating), and reading projections from real safetensors files written in
each published layout -- per tensor (``weight_scale`` scalar), per channel (``weight_scale [n, 1]``), per 128x128 block
(``weight_scale_inv``) -- stacked as the engine stacks them, with every malformed file refused naming the tensor. No
GPU: the GPU side is tests/engine/test_gpu_fp8_linear.py and test_gpu_fp8_llama.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.fp8_checkpoints import write_fp8_copy
from helpers.random_llama import save_random_llama

from fi_engine.checkpoint.config import LlamaConfig
from fi_engine.checkpoint.fp8_weights import E4M3, Fp8Matrix, dequantize_e4m3, quantize_e4m3, read_fp8_linear
from fi_engine.checkpoint.quantization import Fp8Scheme
from fi_engine.checkpoint.safetensors import Checkpoint, write_safetensors

TENSOR = Fp8Scheme("fp8", "tensor", "dynamic")
CHANNEL = Fp8Scheme("fbgemm_fp8", "channel", "dynamic")
BLOCK = Fp8Scheme("fp8", "block", "dynamic", (128, 128))
ONES22 = np.ones((2, 2), np.float32)


def test_the_e4m3_table_is_the_formats_definition() -> None:
    assert E4M3[0x38] == 1.0 and E4M3[0xB8] == -1.0  # exponent 7 = bias
    assert E4M3[0x7E] == 448.0 and E4M3[0xFE] == -448.0  # the largest finite
    assert E4M3[0x01] == 2.0**-9 and E4M3[0x08] == 2.0**-6  # the smallest subnormal and normal
    assert E4M3[0x07] == 7 * 2.0**-9  # the largest subnormal
    assert np.isnan(E4M3[0x7F]) and np.isnan(E4M3[0xFF]) and np.isnan(E4M3).sum() == 2  # no infinity
    assert E4M3[0x00] == 0.0 and np.signbit(E4M3[0x80])
    assert np.array_equal(dequantize_e4m3(np.array([[0x38, 0x40]], np.uint8)), [[1.0, 2.0]])


def test_quantizing_rounds_to_the_nearest_code() -> None:
    finite = np.array([c for c in range(256) if c not in (0x7F, 0xFF, 0x80)], np.uint8)
    assert np.array_equal(quantize_e4m3(E4M3[finite]), finite)  # every finite value is its own code (+0 for -0)
    # halfway between 1.0 (0x38, even) and 1.125 (0x39): to the even code; a hair above: up
    assert quantize_e4m3(np.array([1.0625, 1.0626, 1.1875]))[:3].tolist() == [0x38, 0x39, 0x3A]
    assert quantize_e4m3(np.array([1e6, -1e6, 464.0])).tolist() == [0x7E, 0xFE, 0x7E]  # saturating
    assert quantize_e4m3(np.array([2.0**-11, 2.0**-10 * 1.01, np.nan, -(2.0**-12)])).tolist() == [0, 1, 0x7F, 0]


def test_the_array_helpers_refuse_what_is_no_array() -> None:
    for bad in ([1, 2], "x", np.zeros(3, np.int8), None):
        with pytest.raises(TypeError, match="^bits: expected a numpy uint8 array"):
            dequantize_e4m3(bad)  # type: ignore[arg-type]
    for bad in ([1.0], "x", np.array(["a"]), None):
        with pytest.raises(TypeError, match="^values: expected a numpy array of numbers"):
            quantize_e4m3(bad)  # type: ignore[arg-type]


def _write(path: Path, tensors: dict[str, object]) -> Checkpoint:
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", tensors)  # type: ignore[arg-type]
    return Checkpoint(path)


@pytest.mark.parametrize("layout", ["tensor", "channel", "block"])
def test_a_written_fp8_checkpoint_reads_back_stacked(tmp_path: Path, layout: str) -> None:
    (tmp_path / "bf16").mkdir()
    src = save_random_llama(tmp_path / "bf16", "bfloat16", 64, (4, 2), 256, 384, False)
    deq = write_fp8_copy(src, tmp_path / "fp8", layout)
    cfg = LlamaConfig.from_dir(tmp_path / "fp8")
    assert cfg.fp8 is not None and cfg.fp8.scales == layout
    ckpt = Checkpoint(tmp_path / "fp8")
    a = "model.layers.1.self_attn."
    parts = [(a + "q_proj", (256, 256)), (a + "k_proj", (128, 256)), (a + "v_proj", (128, 256))]
    qkv = Fp8Matrix.stacked([read_fp8_linear(ckpt, cfg.fp8, prefix, shape) for prefix, shape in parts])
    assert qkv.weight.shape == (512, 256) and qkv.weight.dtype == np.uint8
    assert qkv.scales.shape == ((4, 2) if layout == "block" else (512,))
    want = np.concatenate([deq[a + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")])
    assert np.array_equal(qkv.dequantized(), want)  # exactly what the checkpoint stands for
    original = (np.asarray(Checkpoint(src).array(a + "q_proj.weight")).astype(np.uint32) << 16).view(np.float32)
    rel = np.abs(want[:256] - original).max() / np.abs(original).max()
    assert rel <= 2.0**-4, f"{layout}: e4m3 (3 mantissa bits) off the bf16 weights by {rel:.3g} of their range"


def test_a_per_tensor_scale_becomes_one_per_row(tmp_path: Path) -> None:
    codes = np.full((32, 16), 0x38, np.uint8)
    ckpt = _write(tmp_path, {
        "a.weight": (codes, "float8_e4m3fn"), "a.weight_scale": np.array(0.5, np.float32),
        "b.weight": (codes, "float8_e4m3fn"), "b.weight_scale": np.array([2.0], np.float32),
    })  # fmt: skip
    m = Fp8Matrix.stacked([read_fp8_linear(ckpt, TENSOR, name, (32, 16)) for name in ("a", "b")])
    assert m.scales.tolist() == [0.5] * 32 + [2.0] * 32 and m.block is None
    assert np.array_equal(m.dequantized()[:, 0], np.array([0.5] * 32 + [2.0] * 32, np.float32))


def test_bfloat16_scales_are_read_as_float32(tmp_path: Path) -> None:
    bits = (np.full((8, 1), 0.25, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    ckpt = _write(
        tmp_path, {"a.weight": (np.zeros((8, 16), np.uint8), "float8_e4m3fn"), "a.weight_scale": (bits, "bfloat16")}
    )
    assert read_fp8_linear(ckpt, CHANNEL, "a", (8, 16)).scales.tolist() == [0.25] * 8


@pytest.mark.parametrize(
    ("tensors", "scheme", "shape", "message"),
    [
        ({"a.weight": np.zeros((8, 16), np.float16), "a.weight_scale": np.ones((8, 1), np.float32)}, CHANNEL,
         (8, 16), "'a.weight' is float16; quantization_config says FP8"),
        ({"a.weight": (np.zeros((8, 16), np.uint8), "float8_e4m3fn")}, CHANNEL, (8, 16),
         "has no 'a.weight_scale' (one scale per output channel)"),
        ({"a.weight": (np.zeros((8, 16), np.uint8), "float8_e4m3fn"), "a.weight_scale": np.ones((4, 1), np.float32)},
         CHANNEL, (8, 16), "'a.weight_scale' has shape [4, 1], expected [8, 1] or [8]"),
        ({"a.weight": (np.zeros((8, 16), np.uint8), "float8_e4m3fn"), "a.weight_scale": np.zeros((8, 1), np.float32)},
         CHANNEL, (8, 16), "not a finite positive number"),
        ({"a.weight": (np.zeros((8, 16), np.uint8), "float8_e4m3fn"), "a.weight_scale": np.ones((8,), np.int32)},
         CHANNEL, (8, 16), "is int32; scales are float32"),
        ({"a.weight": (np.zeros((8, 24), np.uint8), "float8_e4m3fn"), "a.weight_scale": np.ones((8,), np.float32)},
         CHANNEL, (8, 24), "needs a multiple of 16"),
        ({"a.weight": (np.zeros((8, 16), np.uint8), "float8_e4m3fn"), "a.weight_scale_inv": ONES22},
         BLOCK, (8, 16), "'a.weight_scale_inv' has shape [2, 2], expected [1, 1]"),
        ({"a.weight": (np.zeros((8, 16), np.uint8), "float8_e4m3fn"), "a.weight_scale": np.ones((8,), np.float32)},
         TENSOR, (8, 16), "expected [] or [1] (one scale per tensor)"),
    ],
)  # fmt: skip
def test_a_malformed_fp8_tensor_is_refused_by_name(
    tmp_path: Path, tensors: dict[str, object], scheme: Fp8Scheme, shape: tuple[int, int], message: str
) -> None:
    ckpt = _write(tmp_path, tensors)
    with pytest.raises(ValueError) as info:
        read_fp8_linear(ckpt, scheme, "a", shape)
    assert message in str(info.value)


def test_block_parts_stack_only_on_whole_blocks(tmp_path: Path) -> None:
    t = {}
    for name, n in (("a", 128), ("b", 64)):
        t[name + ".weight"] = (np.zeros((n, 128), np.uint8), "float8_e4m3fn")
        t[name + ".weight_scale_inv"] = np.ones((1, 1), np.float32)
    ckpt = _write(tmp_path, t)
    a, b = (read_fp8_linear(ckpt, BLOCK, name, (n, 128)) for name, n in (("a", 128), ("b", 64)))
    assert b.scales.shape == (1, 1)  # alone: a partial block is fine
    assert Fp8Matrix.stacked([a, b]).scales.shape == (2, 1)  # last: so is a partial block
    with pytest.raises(ValueError, match="a part's rows do not fill whole blocks of 128 rows"):
        Fp8Matrix.stacked([b, a])


def test_the_matrix_dequantizes_per_block() -> None:
    m = Fp8Matrix(np.full((130, 16), 0x38, np.uint8), np.array([[2.0], [3.0]], np.float32), (128, 128))
    d = m.dequantized()
    assert d.shape == (130, 16) and d[127, 0] == 2.0 and d[128, 0] == 3.0


def test_the_config_names_fp8_as_written(tmp_path: Path) -> None:
    (tmp_path / "bf16").mkdir()
    src = save_random_llama(tmp_path / "bf16", "bfloat16", 64, (4, 2), 256, 384, False)
    write_fp8_copy(src, tmp_path / "fp8", "block")
    written = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert written == {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


@pytest.mark.parametrize("block", [(128, 128), None], ids=["block", "row"])
def test_fp8_shards_are_the_matrix_cut_with_its_scales(block: tuple[int, int] | None) -> None:
    """Tensor parallelism's cuts (``Fp8Matrix.rows`` / ``columns``, and ``stacked`` for q, k, v or gate, up):
    each shard dequantizes to the same cut of the whole matrix's dequantization, bit for bit; a cut inside a block
    of scales is refused naming the bounds."""
    rng = np.random.default_rng(4)
    n, k = 512, 384
    codes = quantize_e4m3(rng.standard_normal((n, k)).astype(np.float32))
    scales = rng.uniform(0.5, 2.0, (4, 3) if block else (n,)).astype(np.float32)
    m = Fp8Matrix(codes, scales, block)
    whole = m.dequantized("bfloat16")
    for lo, hi in ((0, 256), (256, 512), (128, 384)):
        assert np.array_equal(m.rows(lo, hi).dequantized("bfloat16"), whole[lo:hi])
    for lo, hi in ((0, 128), (128, 384)):
        assert np.array_equal(m.columns(lo, hi).dequantized("bfloat16"), whole[:, lo:hi])
    both = Fp8Matrix.stacked([m.rows(0, 128), m.rows(384, 512)])
    assert np.array_equal(both.dequantized("bfloat16"), np.concatenate([whole[:128], whole[384:]]))
    if block is not None:
        with pytest.raises(ValueError, match=r"rows \[0, 200\) cut a block of 128 rows"):
            m.rows(0, 200)
        with pytest.raises(ValueError, match=r"columns \[64, 384\) cut a block of 128 columns"):
            m.columns(64, 384)
        with pytest.raises(ValueError, match="a part's rows do not fill whole blocks of 128 rows"):
            Fp8Matrix.stacked([m.rows(0, 512).rows(0, 512), Fp8Matrix(codes[:100], scales[:1], block), m])
    else:
        assert np.array_equal(m.rows(3, 200).dequantized("bfloat16"), whole[3:200])  # any cut: one scale a row
    with pytest.raises(ValueError, match=r"rows: expected 0 <= lo < hi <= 512, got \[0, 600\)"):
        m.rows(0, 600)


def test_the_fp8_gemv_compiles_with_its_lean_switch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``Fp8Linears.lean_loop``: off, the GEMV modules get no option of it (they compile as before it existed); on,
    ``-DFP8_LEAN_LOOP=1``; a value that is not a bool is refused naming the setting, before NVRTC is asked."""
    from fi_engine.kernels.fp8_linear import Fp8Linears

    assert Fp8Linears.lean_loop is False and Fp8Linears._lean() == ()
    monkeypatch.setattr(Fp8Linears, "lean_loop", True)
    assert Fp8Linears._lean() == ("-DFP8_LEAN_LOOP=1",)
    monkeypatch.setattr(Fp8Linears, "lean_loop", "yes")
    with pytest.raises(ValueError, match="Fp8Linears.lean_loop: expected True or False, got 'yes'"):
        Fp8Linears._lean()

"""FP8 (e4m3) mixture-of-experts checkpoints on the CPU: Qwen3-MoE, Mixtral and DeepSeek-V3, written small and random
the way the publishers' tools write them (helpers.moe_checkpoints, helpers.fp8_checkpoints: per 128x128 block
``weight_scale_inv``, per channel ``weight_scale [n, 1]``, per tensor ``weight_scale``), read by the engine's host
reader (:meth:`fi_engine.models.weights.WeightLoader.linear`, which ``load_moe_layer`` and ``DeepSeek.load`` read
every expert, shared expert and DeepSeek projection through):

- every dequantized projection is **bit-equal** to a numpy float32 dequantization written here (each code's e4m3
  value times its scale, in float32, rounded once to nearest even in bfloat16 / float16), and to the bfloat16 copy of
  the checkpoint the GPU test (tests/engine/test_gpu_fp8_moe.py) serves beside it;
- routers (and DeepSeek's correction bias) are left as published, 16-bit;
- the configs are detected (``LlamaConfig.fp8`` / ``DeepSeekConfig.fp8``, named by ``fi-engine serve``);
- what the reader does not serve is refused naming the tensor and the way out.

Loading a whole model needs a GPU (the MoE layers' buffers), so the reader is called as the loaders call it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.fp8_checkpoints import write_fp8_copy
from helpers.int4_checkpoints import write_16bit_copy
from helpers.moe_checkpoints import save_random_deepseek_v3, save_random_qwen3_moe
from helpers.random_llama import bf16_bits, save_random_llama

from fi_engine.checkpoint.config import LlamaConfig
from fi_engine.checkpoint.fp8_weights import Fp8Matrix, read_fp8_linear
from fi_engine.checkpoint.quantization import Fp8Scheme
from fi_engine.checkpoint.safetensors import Checkpoint, write_safetensors
from fi_engine.models.deepseek import _DeepSeekWeights
from fi_engine.models.deepseek_config import DeepSeekConfig
from fi_engine.models.weights import WeightLoader

LAYOUTS = ("block", "channel", "tensor")


def _e4m3_value(code: int) -> float:
    """The value of e4m3fn ``code`` from the format's definition: sign, 4 exponent bits (bias 7; 0: subnormal), 3
    mantissa bits; 0x7f / 0xff NaN."""
    if code & 0x7F == 0x7F:
        return float("nan")
    sign, exp, man = -1.0 if code & 0x80 else 1.0, (code >> 3) & 15, code & 7
    return sign * (man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))


E4M3_VALUES = np.array([_e4m3_value(c) for c in range(256)], np.float64)


def reference(codes: np.ndarray, scales: np.ndarray, layout: str, dtype: str) -> np.ndarray:
    """``codes [n, k]`` with their ``scales`` as written in ``layout``, dequantized block by block in float32 and
    rounded to ``dtype`` (float16, or bfloat16 bits)."""
    values = E4M3_VALUES[codes].astype(np.float32)
    out = np.empty_like(values)
    n, k = codes.shape
    if layout == "block":
        for i in range(0, n, 128):
            for j in range(0, k, 128):
                out[i : i + 128, j : j + 128] = values[i : i + 128, j : j + 128] * scales[i // 128, j // 128]
    elif layout == "channel":
        out[:] = values * scales.reshape(n, 1)
    else:
        out[:] = values * scales.reshape(())
    return out.astype(np.float16) if dtype == "float16" else bf16_bits(out)


class HostArrays:
    """Stands in for CuPy's ``asarray`` (the loader's uploads are not read here)."""

    def asarray(self, arr: np.ndarray) -> Any:
        return arr


def loader(path: Path, scheme: Fp8Scheme | None, cls: type[WeightLoader] = WeightLoader) -> WeightLoader:
    return cls(Checkpoint(path), HostArrays(), "bfloat16", 0, [], None, scheme)


def e4m3_projections(ckpt: Checkpoint) -> list[tuple[str, tuple[int, int]]]:
    """Every e4m3 projection of ``ckpt``: its prefix and shape."""
    out = []
    for name, info in ckpt.tensors.items():
        if info.dtype == "float8_e4m3fn":
            assert name.endswith(".weight") and len(info.shape) == 2
            out.append((name[: -len(".weight")], (info.shape[0], info.shape[1])))
    return out


def check_dequantized(path: Path, copy: Path, scheme: Fp8Scheme, layout: str, cls: type[WeightLoader]) -> int:
    """Every e4m3 projection of the FP8 checkpoint ``path`` read by the loader: bit-equal to :func:`reference` and to
    the bfloat16 ``copy``; returns how many were compared."""
    ckpt, bf16 = Checkpoint(path), Checkpoint(copy)
    ld = loader(path, scheme, cls)
    parts = e4m3_projections(ckpt)
    for prefix, shape in parts:
        got = ld.linear(prefix, shape)
        assert got.dtype == np.uint16 and got.shape == shape
        scale_name = prefix + (".weight_scale_inv" if layout == "block" else ".weight_scale")
        want = reference(
            np.asarray(ckpt.array(prefix + ".weight")), np.asarray(ckpt.array(scale_name)), layout, "bfloat16"
        )
        assert np.array_equal(got, want), prefix
        assert np.array_equal(got, np.asarray(bf16.array(prefix + ".weight"))), prefix
    return len(parts)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random bfloat16 Qwen3-MoE and, per layout, its FP8 copy and the bfloat16 copy of what that holds."""
    root = tmp_path_factory.mktemp("qwen3_moe")
    src = save_random_qwen3_moe(root / "bf16", experts=4)
    out = {"bf16": src}
    for layout in LAYOUTS:
        write_16bit_copy(src, root / f"{layout}-copy", write_fp8_copy(src, root / layout, layout))
        out[layout], out[f"{layout}-copy"] = root / layout, root / f"{layout}-copy"
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_moe_experts_dequantize_as_numpy_does(qwen3_moe: dict[str, Path], layout: str) -> None:
    config = LlamaConfig.from_dir(qwen3_moe[layout])
    assert config.moe is not None and config.fp8 is not None and config.fp8.stored_experts
    compared = check_dequantized(qwen3_moe[layout], qwen3_moe[f"{layout}-copy"], config.fp8, layout, WeightLoader)
    assert compared == 2 * (4 + 4 * 3)  # per layer: q, k, v, o and 4 experts' gate, up, down
    ld, ckpt = loader(qwen3_moe[layout], config.fp8), Checkpoint(qwen3_moe["bf16"])
    router = "model.layers.1.mlp.gate"  # left bfloat16, as the publishers leave it
    assert ld.ckpt.info(router + ".weight").dtype == "bfloat16"
    assert np.array_equal(ld.linear(router, (4, 512)), np.asarray(ckpt.array(router + ".weight")))


def untiled(codes: np.ndarray) -> np.ndarray:
    """``tiled_layout``'s codes back in row-major order, element by element from the layout's definition (its
    docstring): row ``16 T + g + 8 (q // 2)``, column ``128 C + 64 (q % 2) + 16 t + b`` of expert ``e`` sits at byte
    ``b`` of lane ``4 g + t`` of run ``q`` of chunk ``C`` of tile ``T``."""
    e, n, k = codes.shape
    flat = codes.reshape(e, -1)
    out = np.empty_like(codes)
    tiles, chunks = n // 16, k // 128
    for tile in range(tiles):
        for chunk in range(chunks):
            for q in range(4):
                for g in range(8):
                    for t in range(4):
                        at = (((tile * chunks + chunk) * 4 + q) * 32 + 4 * g + t) * 16
                        row, col = 16 * tile + g + 8 * (q // 2), 128 * chunk + 64 * (q % 2) + 16 * t
                        out[:, row, col : col + 16] = flat[:, at : at + 16]
    return out


def test_the_tiled_layout_is_its_definition() -> None:
    from fi_engine.kernels.fp8_moe_gemv import tiled_layout

    codes = np.random.default_rng(3).integers(0, 256, (2, 48, 384), dtype=np.uint8)
    tiled = tiled_layout(codes)
    assert tiled.shape == codes.shape and tiled.dtype == np.uint8 and not np.array_equal(tiled, codes)
    assert np.array_equal(untiled(tiled), codes)
    for shape in ((2, 40, 384), (2, 48, 320), (48, 384)):
        with pytest.raises(ValueError, match=r"codes: expected \[experts, n, k\] with n a multiple of 16 and k of 128"):
            tiled_layout(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_moe_experts_read_as_stored_stack_each_experts_codes_and_scales(
    qwen3_moe: dict[str, Path], layout: str
) -> None:
    """``load_moe_layer``'s stored reader (``_read_fp8_experts``): ``gate_up [E, 2I, H]`` and ``down [E, H, I]``
    hold each expert's codes as published (gate rows, then up rows), the scales stack alike (per-tensor ones
    repeated per row), and each expert dequantized as the FP8 grouped GEMV reads it is bit-equal to the bfloat16
    copy of the checkpoint."""
    from fi_engine.models.llama import _read_fp8_experts

    config = LlamaConfig.from_dir(qwen3_moe[layout])
    assert config.fp8 is not None
    ld, ckpt, copy = (
        loader(qwen3_moe[layout], config.fp8),
        Checkpoint(qwen3_moe[layout]),
        Checkpoint(qwen3_moe[f"{layout}-copy"]),
    )
    base = "model.layers.1.mlp."
    f = _read_fp8_experts(ckpt, ld, base, ("gate_proj", "up_proj", "down_proj"), 4, 512, 256)
    assert f is not None and f.shapes() == (4, 512, 256) and f.block == config.fp8.block
    assert f.gate_up.dtype == np.uint8 and f.gate_up_scales.dtype == np.float32
    assert f.tiled  # hidden 512 and intermediate 256: whole 128-column chunks, so the codes are tiled
    gate_up, down = untiled(f.gate_up), untiled(f.down)
    for x in range(4):
        names = [f"{base}experts.{x}.{p}" for p in ("gate_proj", "up_proj")]
        codes = np.concatenate([np.asarray(ckpt.array(n + ".weight")) for n in names])
        assert np.array_equal(gate_up[x], codes)
        assert np.array_equal(down[x], np.asarray(ckpt.array(f"{base}experts.{x}.down_proj.weight")))
        for q, scales, name, shape in (
            (gate_up[x], f.gate_up_scales[x], names, (512, 512)),
            (down[x], f.down_scales[x], [f"{base}experts.{x}.down_proj"], (512, 256)),
        ):
            want = np.concatenate([np.asarray(copy.array(n + ".weight")) for n in name])
            got = reference(q, scales, "block" if layout == "block" else "channel", "bfloat16")
            assert got.shape == shape and np.array_equal(got, want), (x, name)


def test_experts_whose_rows_cut_a_scale_block_are_not_read_as_stored(tmp_path: Path) -> None:
    """An intermediate size that is not a multiple of the blocks' rows: the scheme the family serves dequantizes
    those experts at load (``experts_for``; tests/engine/test_fp8_shards.py has its other cases), and a block the
    GEMV cannot take is not ``stored_experts``."""
    import dataclasses

    src = save_random_qwen3_moe(tmp_path / "bf16", experts=2)
    write_fp8_copy(src, tmp_path / "fp8", "block")
    cfg = LlamaConfig.from_dir(tmp_path / "fp8")
    scheme = cfg.fp8
    assert scheme is not None and scheme.grouped_gemv_takes() and scheme.stored_experts
    assert cfg.moe is not None and scheme.experts_for(cfg.hidden_size, cfg.moe.intermediate_size).stored_experts
    odd = dataclasses.replace(scheme, block=(96, 128))  # 256 rows of intermediate size: not whole 96-row blocks
    served = odd.experts_for(cfg.hidden_size, cfg.moe.intermediate_size)
    assert not served.stored_experts and served.dequantized == "experts"
    assert not dataclasses.replace(scheme, block=(128, 64)).grouped_gemv_takes()
    assert not dataclasses.replace(scheme, block=(8, 128)).grouped_gemv_takes()
    assert dataclasses.replace(scheme, block=None).grouped_gemv_takes()


def test_the_dequantized_experts_differ_from_the_unquantized_ones(qwen3_moe: dict[str, Path]) -> None:
    """The FP8 copy is not the original: e4m3 keeps 3 mantissa bits (so the bit-equality above is not vacuous)."""
    name = "model.layers.0.mlp.experts.1.down_proj"
    got = loader(qwen3_moe["block"], LlamaConfig.from_dir(qwen3_moe["block"]).fp8).linear(name, (512, 256))
    original = np.asarray(Checkpoint(qwen3_moe["bf16"]).array(name + ".weight"))
    assert (got != original).mean() > 0.5


@pytest.mark.parametrize("layout", ["block", "channel"])
def test_mixtral_experts_dequantize_as_numpy_does(tmp_path: Path, layout: str) -> None:
    """Mixtral's names (``block_sparse_moe.experts.N.w1`` / ``w3`` / ``w2``, router ``block_sparse_moe.gate``)."""
    (tmp_path / "bf16").mkdir()
    src = save_random_llama(tmp_path / "bf16", "bfloat16", 64, (4, 2), 256, 384, False, experts=(4, 2))
    write_16bit_copy(src, tmp_path / "copy", write_fp8_copy(src, tmp_path / "fp8", layout))
    config = LlamaConfig.from_dir(tmp_path / "fp8")
    assert config.model_type == "mixtral" and config.fp8 is not None and config.fp8.stored_experts
    compared = check_dequantized(tmp_path / "fp8", tmp_path / "copy", config.fp8, layout, WeightLoader)
    assert compared == 4 * (4 + 4 * 3)
    assert Checkpoint(tmp_path / "fp8").info("model.layers.0.block_sparse_moe.gate.weight").dtype == "bfloat16"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_deepseek_v3_projection_dequantizes_as_numpy_does(tmp_path: Path, layout: str) -> None:
    """MLA's projections, the dense MLP, the routed and the shared experts (the routed ones as the dequantizing
    load reads them: ``ModelRunner.fp8_experts_as_stored`` off); the router and its correction bias stay as
    published."""
    src = save_random_deepseek_v3(tmp_path / "bf16")
    write_16bit_copy(src, tmp_path / "copy", write_fp8_copy(src, tmp_path / "fp8", layout))
    config = DeepSeekConfig.from_dir(tmp_path / "fp8")
    assert config.fp8 is not None and config.fp8.stored_experts == (layout == "block")  # DeepSeek's published blocks
    assert config.fp8.dequantized == ("MLA, dense-MLP and shared-expert projections" if layout == "block" else "every "
                                      "projection")  # fmt: skip
    compared = check_dequantized(tmp_path / "fp8", tmp_path / "copy", config.fp8, layout, _DeepSeekWeights)
    assert compared == 2 * 5 + 3 + (8 + 1) * 3  # MLA's five per layer, the dense MLP, 8 routed and 1 shared expert
    ckpt = Checkpoint(tmp_path / "fp8")
    assert ckpt.info("model.layers.1.mlp.gate.weight").dtype == "bfloat16"
    assert ckpt.info("model.layers.1.mlp.gate.e_score_correction_bias").dtype == "float32"


def test_float16_models_round_to_float16(tmp_path: Path) -> None:
    (tmp_path / "f16").mkdir()
    src = save_random_llama(tmp_path / "f16", "float16", 64, (4, 2), 256, 384, False, experts=(2, 1))
    write_fp8_copy(src, tmp_path / "fp8", "channel")
    scheme = LlamaConfig.from_dir(tmp_path / "fp8").fp8
    ckpt = Checkpoint(tmp_path / "fp8")
    ld = WeightLoader(ckpt, HostArrays(), "float16", 0, [], None, scheme)
    p = "model.layers.2.block_sparse_moe.experts.1.w2"
    got = ld.linear(p, (256, 384))
    want = reference(np.asarray(ckpt.array(p + ".weight")), np.asarray(ckpt.array(p + ".weight_scale")), "channel",
                     "float16")  # fmt: skip
    assert got.dtype == np.float16 and np.array_equal(got, want)


# ---- refusals ------------------------------------------------------------------------------------------------------


def _one_expert(tmp_path: Path, tensors: dict[str, Any]) -> Checkpoint:
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    return Checkpoint(tmp_path)


BLOCK = Fp8Scheme("fp8", "block", "dynamic", (128, 128), "experts")
P = "model.layers.0.mlp.experts.0.down_proj"


def test_a_scale_too_large_for_float16_is_refused_naming_the_projection(tmp_path: Path) -> None:
    codes = np.full((128, 128), 0x7E, np.uint8)  # 448
    scale = np.full((1, 1), 1e3, np.float32)
    ckpt = _one_expert(tmp_path, {P + ".weight": (codes, "float8_e4m3fn"), P + ".weight_scale_inv": scale})
    ld = WeightLoader(ckpt, HostArrays(), "float16", 0, [], None, BLOCK)
    with pytest.raises(ValueError, match=f"model: '{P}': the dequantized weight has values that are not finite in "
                       "float16.*serve a bfloat16 copy"):  # fmt: skip
        ld.linear(P, (128, 128))
    # a bfloat16 model reads the same tensor
    bf = WeightLoader(ckpt, HostArrays(), "bfloat16", 0, [], None, BLOCK).linear(P, (128, 128))
    assert np.array_equal(bf, bf16_bits(np.full((128, 128), 448e3, np.float32)))


def test_a_missing_or_misshapen_scale_is_refused_by_name(tmp_path: Path) -> None:
    codes = np.zeros((256, 128), np.uint8)
    _one_expert(tmp_path / "a", {P + ".weight": (codes, "float8_e4m3fn")})
    with pytest.raises(ValueError, match=r"has no 'model.layers.0.mlp.experts.0.down_proj.weight_scale_inv' \(128x128"):
        loader(tmp_path / "a", BLOCK).linear(P, (256, 128))
    one = np.ones((1, 1), np.float32)
    ckpt = _one_expert(tmp_path / "b", {P + ".weight": (codes, "float8_e4m3fn"), P + ".weight_scale_inv": one})
    with pytest.raises(ValueError, match=r"weight_scale_inv' has shape \[1, 1\], expected \[2, 1\]"):
        WeightLoader(ckpt, HostArrays(), "bfloat16", 0, [], None, BLOCK).linear(P, (256, 128))


def test_fused_e4m3_experts_are_refused_naming_the_tensor_and_the_way_out(tmp_path: Path) -> None:
    """transformers 5's fused ``experts.gate_up_proj [E, 2I, H]`` in e4m3: no published scale layout, refused."""
    name = "model.layers.0.mlp.experts.gate_up_proj"
    _one_expert(tmp_path, {name: (np.zeros((2, 256, 128), np.uint8), "float8_e4m3fn")})
    with pytest.raises(ValueError, match=f"'{name}' is float8_e4m3fn, the embedding is bfloat16; this engine "
                       "dequantizes e4m3 projections stored one tensor per expert.*serve a bfloat16 copy"):  # fmt: skip
        loader(tmp_path, BLOCK).get(name, (2, 256, 128))


def test_deepseek_e4m3_weights_without_a_quantization_config_are_refused(tmp_path: Path) -> None:
    codes = np.zeros((128, 128), np.uint8)
    _one_expert(tmp_path, {P + ".weight": (codes, "float8_e4m3fn")})
    with pytest.raises(ValueError, match="config.json declares no quantization_config, so this checkpoint's FP8 "):
        loader(tmp_path, None, _DeepSeekWeights).linear(P, (128, 128))


def test_k_need_not_be_a_multiple_of_16_where_the_weight_is_dequantized(tmp_path: Path) -> None:
    """The FP8 GEMV reads 16 codes at a time; a weight dequantized at load has no such limit."""
    codes = np.full((8, 24), 0x38, np.uint8)  # 1.0
    half = np.full((8, 1), 0.5, np.float32)
    _one_expert(tmp_path, {P + ".weight": (codes, "float8_e4m3fn"), P + ".weight_scale": half})
    scheme = Fp8Scheme("compressed-tensors", "channel", "dynamic")
    ckpt = Checkpoint(tmp_path)
    with pytest.raises(ValueError, match="24 columns; the FP8 GEMV needs a multiple of 16"):
        read_fp8_linear(ckpt, scheme, P, (8, 24))
    matrix = read_fp8_linear(ckpt, scheme, P, (8, 24), gemv=False)
    assert np.array_equal(matrix.dequantized("bfloat16"), bf16_bits(np.full((8, 24), 0.5, np.float32)))


def test_the_matrix_refuses_an_unknown_dtype_and_nan_codes() -> None:
    m = Fp8Matrix(np.array([[0x7F, 0x38]], np.uint8), np.ones(1, np.float32), None)
    with pytest.raises(ValueError, match="dtype: expected 'float32', 'float16' or 'bfloat16', got 'int8'"):
        m.dequantized("int8")
    with pytest.raises(ValueError, match="not finite in bfloat16"):
        m.dequantized("bfloat16")
    assert np.isnan(m.dequantized()[0, 0]) and m.dequantized()[0, 1] == 1.0


# ---- what fi-engine serve reports ----------------------------------------------------------------------------------


def test_serve_names_the_dequantized_experts(qwen3_moe: dict[str, Path], tmp_path: Path) -> None:
    """``fi-engine serve``'s start-up line (``describe()``) and ``/v1/models`` (``method``) name the weights served
    (``cli._quantized_weights``, as for int4 and MXFP4)."""
    from fi_engine import cli

    scheme = cli._quantized_weights(str(qwen3_moe["block"]))
    assert scheme.method == "fp8"
    assert scheme.describe() == (
        "FP8 (e4m3) weights with per-block 128x128 scales, dynamic activation scales (experts read as stored by "
        "the FP8 grouped GEMV)"
    )
    assert cli._quantized_weights(str(qwen3_moe["block-copy"])) is None
    # blocks of 96 rows: the experts' 256 intermediate rows end inside one, so they are dequantized at load
    (tmp_path / "odd").mkdir()
    config = json.loads((qwen3_moe["block"] / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [96, 128]
    (tmp_path / "odd" / "config.json").write_text(json.dumps(config))
    odd = cli._quantized_weights(str(tmp_path / "odd"))
    assert odd.block == (96, 128) and odd.describe().endswith("scales (experts dequantized to 16-bit at load)")
    src = save_random_deepseek_v3(tmp_path / "bf16", layers=1)
    write_fp8_copy(src, tmp_path / "fp8", "block")
    scheme = cli._quantized_weights(str(tmp_path / "fp8"))
    assert scheme.method == "fp8" and scheme.describe() == (
        "FP8 (e4m3) weights with per-block 128x128 scales, dynamic activation scales (experts read as stored by "
        "the FP8 grouped GEMV) (MLA, dense-MLP and shared-expert projections dequantized to 16-bit at load)"
    )


def test_serve_names_the_dequantizing_load_where_the_switch_is_off(
    qwen3_moe: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ModelRunner.fp8_experts_as_stored = False`` (read by both families' loads): the start-up line says the
    experts are dequantized at load -- Qwen3-MoE's experts, every projection of DeepSeek-V3."""
    from fi_engine import cli
    from fi_engine.runtime.worker.model_runner import ModelRunner

    src = save_random_deepseek_v3(tmp_path / "bf16", layers=1)
    write_fp8_copy(src, tmp_path / "fp8", "block")
    monkeypatch.setattr(ModelRunner, "fp8_experts_as_stored", False)
    qwen3 = cli._quantized_weights(str(qwen3_moe["block"]))
    assert not qwen3.stored_experts and qwen3.describe() == (
        "FP8 (e4m3) weights with per-block 128x128 scales, dynamic activation scales (experts dequantized to 16-bit "
        "at load)"
    )
    deepseek = cli._quantized_weights(str(tmp_path / "fp8"))
    assert not deepseek.stored_experts and deepseek.describe() == (
        "FP8 (e4m3) weights with per-block 128x128 scales, dynamic activation scales (every projection dequantized "
        "to 16-bit at load)"
    )

"""gpt-oss (``model_type`` ``gpt_oss``) on the Llama engine's serving loop, without torch (needs CuPy and the
model-family kernel wheel: its attention-sink modules, bfloat16, head_dim 64, window on and off).

::

    from fi_engine.models.gpt_oss import GptOssEngine

    with GptOssEngine("/path/to/gpt-oss-20b", max_batch=8, cuda_graph=True) as engine:  # as published (MXFP4)
        result = engine.generate([[200006, 17360, 200008]], max_new_tokens=32)

What differs from Llama (transformers' ``GptOssForCausalLM``):

- attention: q/k/v/o projections with biases; YaRN RoPE (rotary ``cos``/``sin`` precomputed once on the host, times
  YaRN's attention factor, in a float32 cache read by ``apply_rope_with_cos_sin_cache_inplace``); a learned sink
  logit per head (``self_attn.sinks``) in the softmax; even layers within a sliding window of ``sliding_window``
  (128) tokens, odd layers over the whole context (``layer_types`` when the config lists them). Prefill runs the
  sink prefill modules (FA3 on Hopper); **decode runs the same sink prefill modules (FA2) with one query row per
  request** (``qo_indptr = 0, 1, ..., B``): the kernel wheel has no decode-with-sinks module, and this needs no new
  kernel and keeps the sink math identical between prefill and decode;
- the MLP is a mixture of experts in every layer: router with bias; top-k of the router logits, softmax over the k
  chosen logits; each expert ``down(clamp_swiglu(gate_up(x) + b_gu)) + b_down`` where transformers' gpt-oss
  activation is ``(clamp(up, -L, L) + 1) * g * sigmoid(alpha * g)``, ``g = clamp(gate, max=L)`` (``L`` =
  ``swiglu_limit``, 7; ``alpha`` 1.702). The checkpoint stores ``experts.gate_up_proj [E, H, 2I]`` with gate and up
  interleaved (even and odd columns), ``gate_up_proj_bias [E, 2I]``, ``down_proj [E, I, H]``, ``down_proj_bias
  [E, H]``.

The MoE layer is :class:`~fi_engine.layers.moe.MoELayer`, the layer of Mixtral and Qwen3-MoE, with gpt-oss's extras
(:class:`~fi_engine.layers.moe.MoEBiases`, :class:`~fi_engine.layers.moe.ClampedSwiGLU`): the router bias added to the
float32 router logits (then top-k and softmax over the k chosen, which is the softmax over every expert renormalized
over the chosen: the layer's routing with ``renormalize``), the gate/up bias and the clamped SwiGLU in one kernel
between the expert GEMMs, the down bias weighted in the combine. The experts are held once, in the routed layout
(``gate_up [E, 2I, H]``, ``down [E, H, I]``), and **each step picks one of two paths over them** (``moe_path``):

- **routed**: only the chosen experts' weights are read (grouped GEMM over the ``T * k`` assignments). Prefill and
  eager decode route on the host (one synchronization per layer, as Mixtral); the decode CUDA graph takes the
  layer's fixed-capacity path, routed on the device;
- **dense over the experts** (:meth:`~fi_engine.layers.moe.MoELayer.forward_dense`): every token through every expert
  (``gate_up`` read as one ``[E * 2I, H]`` GEMM, ``down`` as a strided-batched GEMM over the experts), the routing
  weights picking each token's k; no host step, so eager decode and the graph run it alike.

The rule (``moe_path="auto"``, :func:`~fi_engine.layers.moe.choose_path`): dense when a step's ``rows * k`` assignments
reach the number of experts (gpt-oss-20b, 32 experts top-4: from 8 rows), routed below, where few experts are touched
and reading only theirs wins; steps of more than ``max_batch`` rows (long prefills, compute-bound, where routing's ``k /
E`` of the FLOPs counts) are always routed. Each decode CUDA graph (one per batch size of the ladder,
:func:`~fi_engine.runtime.worker.graph_shapes.decode_batches`) picks once, at its capture. Measured on an H100
(benchmarks/RESULTS.md: gpt-oss; ``benchmarks/bench_gpt_oss.py``, gpt-oss-20b-shaped, 2 layers, graph): routed 998 /
2565 / 3879 / 11886 tokens/s at batch 1 / 4 / 8 / 32, dense 605 / 2289 / 4617 / 16573: the crossover lies between 4 and
8 rows, where the rule puts it.

Tensor parallelism (``tensor_parallel=N``, :mod:`fi_engine.layers.tensor_parallel`): each rank keeps its heads (q/k/v
rows with their biases, its heads' sinks, its KV heads' cache), its columns of the O projection, the whole router
(every rank routes every token alike, so every rank takes the same path), and the same slice
``[r * I / N, (r + 1) * I / N)`` of every expert's intermediate columns (:func:`shard_experts`: in the checkpoint's
interleaved gate/up layout that is one contiguous block of ``2I / N`` columns, with its biases; the clamped SwiGLU
is elementwise per column pair, so it runs on the slice as on the whole); the embedding and LM head by vocabulary
rows. The O and expert-down outputs are partial sums, summed by the fused all-reduce + residual + RMSNorm as
Llama's; their biases (``o_proj.bias``, the routing-weighted ``down_proj_bias``) are added on rank 0 only (the other
ranks' MoE layers get a zero down bias), so the sum has each once.

Checkpoints: bfloat16 (the sink modules are bfloat16), or the published MXFP4 ones (``quantization_config``
``{"quant_method": "mxfp4", ...}``: each expert's ``gate_up_proj`` / ``down_proj`` as ``*_blocks`` and ``*_scales``,
everything else bfloat16). An MXFP4 checkpoint's experts stay MXFP4 on the GPU (:attr:`GptOss.mxfp4_as_stored`, on
by default: 0.53 bytes a weight, gpt-oss-20b's experts 10.4 GB), read at decode by the MXFP4 grouped GEMV
(:mod:`~fi_engine.kernels.mxfp4_moe_gemv`: each expert's biases and the clamped SwiGLU in its launches; long prefills
read a bfloat16 copy of one layer's experts at a time). Where the GEMV cannot take the shapes, on GPUs below SM 8.0,
or with ``mxfp4_as_stored`` off, the experts are dequantized to bfloat16 on the host while the checkpoint is read
(:mod:`~fi_engine.checkpoint.mxfp4_weights`, numpy, one expert at a time: exact, the values a bfloat16 conversion of
the checkpoint holds, in its layout) and served as that bfloat16 checkpoint is (:func:`read_experts`): then
gpt-oss-20b's experts take 38 GB and gpt-oss-120b's 229 GB, more than one GPU holds. Other quantizations are refused
naming ``quantization_config``, and MXFP4 tensors other than the experts' naming the tensor.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..checkpoint.config import LlamaConfig, MoEConfig, RopeConfig, YarnRope
from ..checkpoint.family_configs import (
    check_dict,
    flag,
    layer_windows,
    number,
    positive_int,
    refuse_quantized,
    rope_settings,
)
from ..checkpoint.mxfp4_weights import Mxfp4Scheme, declares_mxfp4, read_mxfp4_blocks, read_mxfp4_experts
from ..checkpoint.safetensors import Checkpoint
from ..kernels import flashinfer as kernels
from ..runtime.engine import Engine
from ..runtime.family import ModelFamily
from ..runtime.settings import with_settings
from ..values import arg_array, arg_int, show
from .decode_queries import DecodeQueryOffsets
from .moe_paths import MoEPaths
from .registry import SettingsFamily
from .weights import WeightLoader
from .windows import WindowPlans

__all__ = [
    "GptOss",
    "GptOssEngine",
    "GptOssSettings",
    "check_checkpoint",
    "expert_matrices",
    "gpt_oss_config",
    "gpt_oss_settings",
    "read_experts",
    "rope_cos_sin_cache",
    "shard_experts",
]

# ---------------------------------------------------------------------------------------------- config

QUANTIZED_HELP = (
    "this engine serves gpt-oss in bfloat16, or with MXFP4 experts (quant_method 'mxfp4', the published "
    "checkpoints); serve a bfloat16 copy: load the model with transformers, save_pretrained it in bfloat16 and drop "
    "quantization_config"
)


def check_quantization(d: dict[str, Any], source: str) -> None:
    """Refuse a ``quantization_config`` other than MXFP4's (ValueError naming the key and the way out)."""
    check_dict(d, source)
    if not declares_mxfp4(d.get("quantization_config")):
        refuse_quantized(d, source, QUANTIZED_HELP)


@dataclass(frozen=True)
class GptOssSettings:
    """gpt-oss: ``windows[i]`` as in :class:`Gemma2Settings`; ``yarn``: the rotary scaling (None: plain RoPE);
    ``swiglu_limit``: the clamp of the experts' gate and up values; ``alpha``: the gate's sigmoid slope (1.702,
    fixed in transformers)."""

    sliding_window: int
    windows: tuple[int, ...]
    yarn: YarnRope | None
    swiglu_limit: float
    alpha: float = 1.702


def gpt_oss_config(d: Any, source: str = "config") -> LlamaConfig:
    """A ``gpt_oss`` config dict (``source`` names it in errors): the fields shared with Llama
    (:meth:`~fi_engine.checkpoint.config.LlamaConfig.shared`, with ``GptOssConfig``'s defaults for those left out),
    the experts (128 by default, renormalized), the rotary base alone (the YaRN scaling is
    :attr:`GptOssSettings.yarn`, applied through a cos/sin cache) and :class:`GptOssSettings` in ``family``.
    Refused by name (ValueError): a ``quantization_config`` other than MXFP4's (``quant_method: "mxfp4"``, served:
    :func:`read_experts`), no attention biases, rotary types other than ``default``/``yarn``, bad windows or limits."""
    check_dict(d, source)
    if d.get("model_type") != "gpt_oss":  # another family's config (fi_engine.models.registry.read_config picks it)
        raise ValueError(
            f"{source}: model_type {show(d.get('model_type'))} is not gpt_oss; read it with its family's reader"
        )
    check_quantization(d, source)
    d = {"head_dim": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, **d}  # GptOssConfig's defaults
    moe = MoEConfig.from_dict(d, source, default_experts=128)
    rope = RopeConfig(theta=number(rope_settings(d), "rope_theta", source, 150000.0))
    cfg = LlamaConfig.shared(d, source, moe=moe, rope=rope)
    return dataclasses.replace(cfg, family=gpt_oss_settings(d, cfg.num_layers, source))


def gpt_oss_settings(d: dict[str, Any], num_layers: int, source: str) -> GptOssSettings:
    """gpt-oss's settings (defaults: ``GptOssConfig``'s)."""
    check_dict(d, source)
    check_quantization(d, source)
    if not flag(d, "attention_bias", source, True):
        raise ValueError(f"{source}: attention_bias=false is not supported (gpt-oss projections carry biases)")
    window = positive_int(d, "sliding_window", source, 128)
    return GptOssSettings(
        sliding_window=window,
        windows=layer_windows(d, num_layers, window, source),
        yarn=yarn(d, source),
        swiglu_limit=number(d, "swiglu_limit", source, 7.0),
    )


def yarn(d: dict[str, Any], source: str) -> YarnRope | None:
    """The YaRN settings of a gpt-oss config; None for plain RoPE."""
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"{source}: {key} must be an object or null, got {show(d[key])}")
    r = rope_settings(d)
    kind = r.get("rope_type", r.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(
            f"{source}: rope_type (or type) {show(kind)} is not supported for gpt_oss; supported: 'default', 'yarn'"
        )
    optional = {k: number(r, k, source, None) for k in ("attention_factor", "mscale", "mscale_all_dim") if r.get(k)}
    truncate = r.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"{source}: rope truncate must be true or false, got {show(truncate)}")
    original = r.get("original_max_position_embeddings")
    if original is None:
        original = d.get("max_position_embeddings", 4096)
    return YarnRope(
        factor=number(r, "factor", source, None),
        original_max_position_embeddings=positive_int(
            {"original_max_position_embeddings": original}, "original_max_position_embeddings", source, 4096
        ),
        beta_fast=number(r, "beta_fast", source, 32.0),
        beta_slow=number(r, "beta_slow", source, 1.0),
        truncate=truncate,
        **optional,
    )


# rows of the cos/sin table: p * f is a float32 product (exact positions up to 2**24, as transformers computes it)
MAX_ROPE_POSITIONS = 1 << 24


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bits (uint16)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def rope_cos_sin_cache(cfg: LlamaConfig, positions: int) -> np.ndarray:
    """float32 ``[positions, head_dim]``: ``cos(p * f_j) * s`` for ``j < head_dim / 2``, then ``sin(p * f_j) * s``,
    with gpt-oss's frequencies ``f`` and scale ``s`` (YaRN's, or plain RoPE's with ``s = 1``); as transformers,
    ``p * f`` is a float32 product."""
    if not isinstance(cfg, LlamaConfig) or not isinstance(cfg.family, GptOssSettings):
        raise TypeError(f"cfg: expected a gpt-oss LlamaConfig (LlamaConfig.from_dir), got {type(cfg).__name__}")
    positions = arg_int("positions", positions, 0, MAX_ROPE_POSITIONS)
    g: GptOssSettings = cfg.family
    d, theta = cfg.head_dim, cfg.rope.theta
    if g.yarn is None:
        inv, scale = (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))).astype(np.float32), 1.0
    else:
        inv, scale = g.yarn.inv_freq(theta, d), g.yarn.scale()
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv[None, :]  # float32, as transformers
    return (np.concatenate([np.cos(angles), np.sin(angles)], axis=1) * np.float32(scale)).astype(np.float32)


# the tensors an MXFP4 gpt-oss checkpoint may hold in MXFP4: its experts' weights (modules_to_not_convert: the rest)
MXFP4_TENSOR = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)")


def check_checkpoint(ckpt: Checkpoint) -> str:
    """The checkpoint's dtype, which must be bfloat16, with the experts' weights in bfloat16 or MXFP4 (ValueError
    naming the tensor otherwise: another tensor in MXFP4, a float16 or float32 checkpoint)."""
    mxfp4 = (n for n in ckpt.tensors if n.endswith(("_blocks", "_scales")) and not MXFP4_TENSOR.fullmatch(n))
    quantized = next(mxfp4, None)
    if quantized is not None:
        raise ValueError(
            f"model: tensor {quantized!r} looks MXFP4-quantized; only the experts' gate_up_proj and down_proj are "
            f"served in MXFP4 (the published layout: attention, router, embedding and LM head stay bfloat16). "
            f"{QUANTIZED_HELP}"
        )
    dtype = ckpt.info("model.embed_tokens.weight").dtype
    if dtype != "bfloat16":
        raise ValueError(
            f"model: weights are {dtype}; gpt-oss runs in bfloat16 here (the attention-sink kernels are "
            f"bfloat16): save the model with torch_dtype=torch.bfloat16"
        )
    return dtype


def expert_matrices(gate_up: np.ndarray, gate_up_bias: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, ...]:
    """One layer's experts in :class:`~fi_engine.layers.moe.MoEWeights`' layouts (nn.Linear weights per expert).

    Args:
        gate_up: ``[E, H, 2I]`` (the checkpoint's ``experts.gate_up_proj``: ``x @ gate_up[e]``, gate on the even
            and up on the odd columns).
        gate_up_bias: ``[E, 2I]``, interleaved the same way.
        down: ``[E, I, H]`` (``act @ down[e]``).

    Returns:
        ``(w_gu [E, 2I, H], b_gu [E, 2I], w_down [E, H, I])``: ``w_gu[e]`` expert ``e``'s gate rows, then its up
        rows (``x @ w_gu[e].T`` gives ``[gate, up]``); ``b_gu`` likewise (gate, then up); ``w_down[e]`` its down
        projection (``act @ w_down[e].T``).
    """
    arg_array("gate_up", gate_up, 3, "[num_experts, hidden, 2 * intermediate]")
    e, h, two_i = gate_up.shape
    if two_i % 2:
        raise ValueError(f"gate_up: expected an even last dimension (gate and up interleaved), got {gate_up.shape}")
    arg_array("gate_up_bias", gate_up_bias, 2, f"[{e}, {two_i}]")
    if gate_up_bias.shape != (e, two_i):
        raise ValueError(
            f"gate_up_bias: expected shape ({e}, {two_i}) (gate_up's experts and columns), got {gate_up_bias.shape}"
        )
    arg_array("down", down, 3, f"[{e}, {two_i // 2}, {h}]")
    if down.shape != (e, two_i // 2, h):
        raise ValueError(
            f"down: expected shape ({e}, {two_i // 2}, {h}) (gate_up's experts, intermediate and "
            f"hidden), got {down.shape}"
        )
    t = gate_up.transpose(0, 2, 1)  # [E, 2I, H]
    w_gu = np.concatenate([t[:, 0::2], t[:, 1::2]], axis=1)
    b_gu = np.concatenate([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], axis=1)
    w_down = down.transpose(0, 2, 1)
    return np.ascontiguousarray(w_gu), np.ascontiguousarray(b_gu), np.ascontiguousarray(w_down)


def shard_experts(
    gate_up: np.ndarray, gate_up_bias: np.ndarray, down: np.ndarray, rank: int, parts: int
) -> tuple[np.ndarray, ...]:
    """Rank ``rank``'s slice of every expert's intermediate columns, in the checkpoint's layout (what
    :func:`expert_matrices` takes).

    Args:
        gate_up: ``[E, H, 2I]``, gate and up interleaved (even and odd columns: intermediate column ``j`` is the
            pair ``2j, 2j + 1``).
        gate_up_bias: ``[E, 2I]``, interleaved the same way.
        down: ``[E, I, H]``.
        rank, parts: this rank of ``parts``; ``parts`` must divide ``I``.

    Returns ``(gate_up [E, H, 2I/N], gate_up_bias [E, 2I/N], down [E, I/N, H])``: intermediate columns
    ``[r * I/N, (r + 1) * I/N)``, i.e. interleaved columns ``[2r * I/N, 2(r + 1) * I/N)``, as slices of the
    arguments (views, no copy: :func:`expert_matrices` makes the contiguous matrices from them, reading the
    checkpoint's memory-mapped or dequantized weights once). Every rank's experts give a partial sum of each expert's
    down projection (without its bias, which one rank adds).
    """
    from ..layers.tensor_parallel import MAX_PARTS

    arg_array("gate_up", gate_up, 3, "[num_experts, hidden, 2 * intermediate]")
    e, _, two_i = gate_up.shape
    arg_array("gate_up_bias", gate_up_bias, 2, f"[{e}, {two_i}]")
    arg_array("down", down, 3, f"[{e}, {two_i // 2}, hidden]")
    if gate_up_bias.shape != (e, two_i) or down.shape[:2] != (e, two_i // 2) or two_i % 2:
        raise ValueError(
            f"gate_up_bias, down: expected [{e}, {two_i}] and [{e}, {two_i // 2}, hidden] (gate_up {gate_up.shape}: "
            f"an even number of interleaved columns), got {gate_up_bias.shape} and {down.shape}"
        )
    parts = arg_int("parts", parts, 1, MAX_PARTS)
    rank = arg_int("rank", rank, 0, parts - 1)
    i = two_i // 2
    if i % parts:
        raise ValueError(f"parts: {parts} does not divide the experts' {i} intermediate columns")
    step = i // parts
    lo, hi = rank * step, (rank + 1) * step
    return gate_up[:, :, 2 * lo : 2 * hi], gate_up_bias[:, 2 * lo : 2 * hi], down[:, lo:hi]


def host_f32(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor ``name`` (bfloat16 or float32; shape checked) as float32: biases and sinks."""
    info = ckpt.info(name)
    arr = ckpt.array(name, shape)
    if info.dtype not in ("bfloat16", "float32"):
        raise ValueError(f"model: tensor {name!r} is {info.dtype}, expected bfloat16 or float32")
    return bf16_to_f32(arr) if info.dtype == "bfloat16" else np.asarray(arr, np.float32)


def expert_weight(ckpt: Checkpoint, name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Expert weight ``name`` (``experts.gate_up_proj`` or ``experts.down_proj``) of ``shape`` as bfloat16 bits:
    the tensor itself in a bfloat16 checkpoint, dequantized from ``name + "_blocks"`` / ``"_scales"`` in an MXFP4
    one (:func:`~fi_engine.checkpoint.mxfp4_weights.read_mxfp4_experts`: the same values in the same layout)."""
    if name in ckpt:
        if name + "_blocks" in ckpt:
            raise ValueError(f"model: the checkpoint holds {name!r} both in bfloat16 and in MXFP4 ({name}_blocks)")
        dtype = ckpt.info(name).dtype
        if dtype != "bfloat16":
            raise ValueError(f"model: tensor {name!r} is {dtype}, the embedding is bfloat16; gpt-oss's experts are "
                             f"bfloat16 or MXFP4")  # fmt: skip
        return ckpt.array(name, shape)
    if name + "_blocks" in ckpt:
        return read_mxfp4_experts(ckpt, name, shape)
    raise ValueError(f"model: the checkpoint has no tensor {name!r} (bfloat16) nor {name + '_blocks'!r} (MXFP4)")


def read_experts(
    ckpt: Checkpoint, layer: int, num_experts: int, hidden: int, intermediate: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer ``layer``'s experts in the bfloat16 checkpoint's layout (what :func:`shard_experts` and
    :func:`expert_matrices` take), from a bfloat16 checkpoint or an MXFP4 one alike.

    Returns ``(gate_up [E, H, 2I], gate_up_bias [E, 2I], down [E, I, H])``: the weights as bfloat16 bits (uint16; an
    MXFP4 checkpoint's dequantized exactly, as transposed views: see
    :func:`~fi_engine.checkpoint.mxfp4_weights.read_mxfp4_experts`), the bias as float32 (stored bfloat16 or float32).
    ValueError naming the tensor: missing, misshapen, another dtype, malformed MXFP4.
    """
    e, h, i = num_experts, hidden, intermediate
    m = f"model.layers.{layer}.mlp.experts."
    return (
        expert_weight(ckpt, m + "gate_up_proj", (e, h, 2 * i)),
        host_f32(ckpt, m + "gate_up_proj_bias", (e, 2 * i)),
        expert_weight(ckpt, m + "down_proj", (e, i, h)),
    )


def stored_experts(
    ckpt: Checkpoint, layer: int, num_experts: int, hidden: int, intermediate: int, rank: int, parts: int, xp: Any
) -> tuple[tuple[Any, Any], tuple[Any, Any], np.ndarray]:
    """Layer ``layer``'s MXFP4 experts as stored, rank ``rank``'s slice of ``parts`` (its intermediate columns, as
    :func:`shard_experts` cuts them), in the MXFP4 grouped GEMV's layout
    (:func:`~fi_engine.kernels.mxfp4_moe_gemv.tiled_mxfp4`, made with array module ``xp``: CuPy lays them out on the
    GPU, numpy on the host).

    Returns ``((gate_up codes, scales), (down codes, scales), gate_up_bias)``: gate/up ``[E, 2I/N, ...]`` each
    expert's gate rows then its up rows (the checkpoint interleaves them), down ``[E, H, ...]`` its intermediate
    blocks ``[r I/N, (r + 1) I/N)``; the bias float32 ``[E, 2I/N]``, gate then up, like the weights. ValueError
    naming the tensor: missing, misshapen, not uint8, scales past ``2 ** 113``."""
    from ..kernels.mxfp4_moe_gemv import tiled_mxfp4

    e, h, i = num_experts, hidden, intermediate
    m = f"model.layers.{layer}.mlp.experts."
    share = i // parts
    lo, hi = rank * share, (rank + 1) * share
    gb, gs = read_mxfp4_blocks(ckpt, m + "gate_up_proj", (e, h, 2 * i))  # [E, 2I, H/32, 16]: rows 2j gate, 2j+1 up
    gate_up_blocks = np.concatenate([gb[:, 2 * lo : 2 * hi : 2], gb[:, 2 * lo + 1 : 2 * hi : 2]], axis=1)
    gate_up_scales = np.concatenate([gs[:, 2 * lo : 2 * hi : 2], gs[:, 2 * lo + 1 : 2 * hi : 2]], axis=1)
    db, ds = read_mxfp4_blocks(ckpt, m + "down_proj", (e, i, h))  # [E, H, I/32, 16]
    down_blocks, down_scales = db[:, :, lo // 32 : hi // 32], ds[:, :, lo // 32 : hi // 32]
    bias = host_f32(ckpt, m + "gate_up_proj_bias", (e, 2 * i))[:, 2 * lo : 2 * hi]
    try:
        gate_up = tiled_mxfp4(xp.asarray(np.ascontiguousarray(gate_up_blocks)), xp.asarray(gate_up_scales))
        down = tiled_mxfp4(xp.asarray(np.ascontiguousarray(down_blocks)), xp.asarray(down_scales))
    except ValueError as exc:
        raise ValueError(f"model: the MXFP4 experts of layer {layer}: {exc}") from None
    return gate_up, down, np.ascontiguousarray(np.concatenate([bias[:, 0::2], bias[:, 1::2]], axis=1))


def _tensor_cores(cp: Any) -> bool:
    """Whether CuPy module ``cp``'s current device has the tensor cores the MXFP4 grouped GEMV needs (SM 8.0+); False
    for anything else (a loader's stand-in)."""
    try:
        return int(cp.cuda.Device().compute_capability) >= 80
    except Exception:  # not CuPy, or no device: the dequantizing path serves
        return False


class GptOss(MoEPaths, SettingsFamily, ModelFamily):
    """The gpt-oss family's definition (module docstring): its config check, bfloat16 weights (biased attention,
    sinks, the experts in the routed layout with their biases, the YaRN cos/sin table), layer body with its two MoE
    paths (``moe_path``: :class:`~fi_engine.models.moe_paths.MoEPaths`), and an attention-sink plan per distinct
    window (decode on the sink prefill modules)."""

    fp8_kv_refusal = "gpt-oss's attention sinks"

    mxfp4_as_stored = True
    """An MXFP4 checkpoint's experts stay MXFP4 on the GPU (0.53 bytes a weight), read at decode by the MXFP4 grouped
    GEMV (:mod:`~fi_engine.kernels.mxfp4_moe_gemv`: biases and the clamped SwiGLU in its launches), with a bfloat16
    copy of one layer's experts written for the steps it does not serve (long prefills); False: dequantized to
    bfloat16 at load. Shapes the GEMV cannot take (:meth:`Mxfp4Scheme.experts_for
    <fi_engine.checkpoint.mxfp4_weights.Mxfp4Scheme.experts_for>`) and GPUs below SM 8.0 are dequantized either
    way. Read at load (set it on the class, before the engine is made, to compare)."""

    model_type, settings, engine = "gpt_oss", GptOssSettings, "GptOssEngine"

    @classmethod
    def experts_scheme(cls, scheme: Mxfp4Scheme, hidden: int, intermediate: int, ranks: int = 1) -> Mxfp4Scheme:
        """``scheme`` (a checkpoint's MXFP4 layout) as this engine serves experts of ``hidden`` by ``intermediate``
        cut over ``ranks``: kept as stored where :attr:`mxfp4_as_stored` is on and the grouped GEMV takes the shapes,
        else dequantized at load. What the start-up line names and what the load decides by (which also needs a GPU
        of SM 8.0 or newer)."""
        return scheme.experts_for(hidden, intermediate, ranks) if cls.mxfp4_as_stored else scheme

    def parse_config(self, d: Any, source: str) -> LlamaConfig:
        return gpt_oss_config(d, source)

    def _moe_experts_stored(self) -> bool:
        return self.experts_stored

    def check(self, eng: Any, cfg: LlamaConfig) -> None:
        """Refuse as :class:`~fi_engine.models.registry.SettingsFamily`'s ``check`` does, and a config without
        experts or with more than 64 per token (the biased MoE combine kernel's limit)."""
        super().check(eng, cfg)
        if cfg.moe is None or cfg.moe.top_k > 64:
            raise ValueError("num_experts_per_tok: above 64 is not supported by the biased MoE combine kernel")

    # ------------------------------------------------------------------------------------------ loading

    def load(self, eng: Any, ckpt: Checkpoint) -> None:
        from ..layers.tensor_parallel import columns, rows, segment

        c = eng.model_config  # the checkpoint's shapes; this rank keeps its shard (rank r of n)
        r, n = eng.rank, eng.tensor_parallel
        assert c.moe is not None
        hq, hk, d, h = c.num_qo_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        e, i_size = c.moe.num_experts, c.moe.intermediate_size
        dtype = check_checkpoint(ckpt)
        w = WeightLoader.for_engine(eng, ckpt, dtype)  # every upload kept alive by eng.device_arrays
        eng.moe_layers = []

        def f32(name: str, shape: tuple[int, ...]) -> Any:  # on the device
            return w.upload(host_f32(ckpt, name, shape))

        w.embedding_and_head(eng, c)
        self.with_bias = r == 0  # the row-parallel outputs' biases: once in the ranks' sum
        eng.wqkv, self.bqkv, eng.wo, self.bo, eng.ln1, eng.ln2 = [], [], [], [], [], []
        self.sinks = []
        from ..kernels.mxfp4_moe_gemv import Mxfp4Experts
        from ..layers.moe import ClampedSwiGLU, MoEBiases, MoELayer, MoEScratch, MoEWeights

        g: GptOssSettings = c.family
        eng.moe_workspace = kernels.workspace(eng.device)  # the grouped GEMMs' own
        max_tokens = max(eng.max_prefill_tokens, eng.max_batch)
        # buffers for the paths this engine can take: the fixed-capacity routed path where a decode graph (one per
        # batch size of the ladder) routes, the dense path where some step of up to max_batch rows goes dense
        # MXFP4 experts kept as stored: every step of up to max_batch rows takes the device path (the grouped GEMV)
        mxfp4 = "model.layers.0.mlp.experts.gate_up_proj_blocks" in ckpt
        self.experts_stored = (
            mxfp4 and type(self).experts_scheme(Mxfp4Scheme(), h, i_size, n).stored and _tensor_cores(w.cp)
        )
        graph_paths = {self.moe_path_for(eng, b) for b in eng.decode_graph_batches} if eng.static_moe else set()
        capacity = eng.max_batch if "routed" in graph_paths or self.experts_stored else None
        dense_rows = eng.max_batch if eng.dense_moe(eng.max_batch) else None  # forced, or auto from some row count up
        self.moe_scratch = MoEScratch(
            num_experts=e, hidden=h, intermediate=i_size // n, top_k=c.moe.top_k, max_tokens=max_tokens, dtype=dtype,
            capacity=capacity, dense_rows=dense_rows,
        )  # fmt: skip
        activation = ClampedSwiGLU(float(g.alpha), float(g.swiglu_limit))
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            shapes = (("q_proj", hq * d), ("k_proj", hk * d), ("v_proj", hk * d))
            # this rank's heads: q/k/v rows with their biases, its heads' sinks; the O projection's columns
            eng.wqkv.append(w.ptr(np.concatenate([rows(w.get(f"{a}{x}.weight", (k, h)), r, n) for x, k in shapes])))
            self.bqkv.append(w.ptr(np.concatenate([segment(w.get(f"{a}{x}.bias", (k,)), r, n) for x, k in shapes])))
            eng.wo.append(w.ptr(columns(w.get(a + "o_proj.weight", (h, hq * d)), r, n)))
            self.bo.append(w.ptr(w.get(a + "o_proj.bias", (h,))))  # added by rank 0 only
            sinks = w.upload(segment(host_f32(ckpt, a + "sinks", (hq,)), r, n))
            self.sinks.append(kernels.descriptor(sinks.data.ptr, sinks.shape, "float32", eng.device, owner=sinks))
            eng.ln1.append(w.vector(w.get(p + "input_layernorm.weight", (h,))))
            eng.ln2.append(w.vector(w.get(p + "post_attention_layernorm.weight", (h,))))
            m = p + "mlp."
            mxfp4_experts = None
            if self.experts_stored:  # the MXFP4 codes and scales as the GEMV reads them; a shared bfloat16 copy
                (gu_c, gu_s), (dn_c, dn_s), b_gu = stored_experts(ckpt, i, e, h, i_size, r, n, w.cp)
                mxfp4_experts = Mxfp4Experts(w.upload(gu_c), w.upload(gu_s), w.upload(dn_c), w.upload(dn_s), h,
                                             i_size // n)  # fmt: skip
                if self.moe_expert_copy is None:
                    self.moe_expert_copy = (w.cp.empty((e, 2 * (i_size // n), h), w.cp.uint16),
                                            w.cp.empty((e, h, i_size // n), w.cp.uint16))  # fmt: skip
                w_gu_dev, w_down_dev = self.moe_expert_copy
            else:  # this rank's slice of every expert's intermediate columns, from bfloat16 or MXFP4 weights alike
                experts = shard_experts(*read_experts(ckpt, i, e, h, i_size), r, n)
                w_gu, b_gu, w_down = expert_matrices(*experts)
                w_gu_dev, w_down_dev = w.upload(w_gu), w.upload(w_down)
            weights = MoEWeights(w.upload(w.get(m + "router.weight", (e, h))), w_gu_dev, w_down_dev)
            b_down = host_f32(ckpt, m + "experts.down_proj_bias", (e, h))
            b_down = b_down if self.with_bias else np.zeros_like(b_down)  # rank 0's partial sum carries it
            biases = MoEBiases(f32(m + "router.bias", (e,)), w.upload(b_gu), w.upload(b_down))
            eng.moe_layers.append(
                MoELayer(
                    weights, dtype=dtype, top_k=c.moe.top_k, renormalize=True, max_tokens=max_tokens,
                    stream=eng.stream, dense=eng.dense, workspace=eng.moe_workspace, capacity=capacity,
                    scratch=self.moe_scratch, biases=biases, activation=activation, dense_rows=dense_rows,
                    mxfp4_experts=mxfp4_experts,
                )
            )  # fmt: skip
        eng.final_norm = w.vector(w.get("model.norm.weight", (h,)))
        eng.q_norm = []
        eng.k_norm = []
        cache = w.upload(rope_cos_sin_cache(c, eng.max_seq_len))
        self.cos_sin = kernels.descriptor(cache.data.ptr, cache.shape, "float32", eng.device, owner=cache)
        from ..kernels.cuda_sources import source

        module = eng.cupy.RawModule(code=source("gpt_oss.cu"))
        self.k_bias = module.get_function("add_bias")
        self.windows = list(g.windows)

    def allocate(self, eng: Any) -> None:
        eng.allocate_layers()
        # decode: one query row per request (the sink prefill kernels serve decode)
        self.decode_queries = DecodeQueryOffsets(eng)
        self.window_plans = WindowPlans(self.windows, eng.device)

    # ------------------------------------------------------------------------------------------ attention

    def _sink_plans(self, eng: Any, decode: bool, arrays: tuple[Any, ...], backend: str, graph: bool) -> dict[int, Any]:
        """The attention-sink plans by window over the step's index ``arrays`` (qo indptr, kv indptr, None, last
        page lengths)."""
        return self.window_plans.plan(
            eng,
            decode,
            kernels.batch_attention_sink_plan,
            arrays,
            causal=True,
            sm_scale=eng.config.head_dim**-0.5,
            backend=backend,
            enable_cuda_graph=graph,
        )

    def plan_prefill(self, eng: Any, batch: int) -> None:
        ph = eng.prefill_arrays
        arrays = (ph["qo_indptr"][: batch + 1], ph["kv_indptr"][: batch + 1], None, ph["kv_last_page_len"][:batch])
        self.prefill_plans = self._sink_plans(eng, False, arrays, "auto", False)

    def plan_decode(self, eng: Any, rows: int, cuda_graph: bool, kind: str | None = None) -> None:
        dh = eng.decode_arrays
        arrays = (self.decode_queries.host(rows), dh["kv_indptr"][: rows + 1], None, dh["kv_last_page_len"][:rows])
        # FA2: a decode row is one query; FA2's small query tiles suit it, and its CUDA-graph schedule is fixed
        self.decode_plans = self._sink_plans(eng, True, arrays, "fa2", cuda_graph)

    def prefill_attention(self, eng: Any, i: int, v: SimpleNamespace) -> None:
        self._attention(eng, i, v, v.qo_indptr, self.prefill_plans)

    def decode_attention(self, eng: Any, i: int, v: SimpleNamespace) -> None:
        self._attention(eng, i, v, self.decode_queries.view(v.kv_last_page_len.shape[0]), self.decode_plans)

    def _attention(self, eng: Any, i: int, v: SimpleNamespace, qo_indptr: Any, plans: dict[int, Any]) -> None:
        """Layer ``i``'s attention with sinks over the paged cache: ``v``'s rows (``qo_indptr``: their offsets per
        request) under the plan of the layer's window in ``plans`` (the prefill's or the decode's)."""
        kernels.batch_attention_sink_run(
            v.q,
            (eng.k_cache[i], eng.v_cache[i]),
            qo_indptr=qo_indptr,
            kv_indptr=v.kv_indptr,
            kv_indices=v.kv_indices,
            kv_last_page_len=v.kv_last_page_len,
            out=v.attn,
            sinks=self.sinks[i],
            stream=eng.stream_ptr,
            plan=plans[self.windows[i]],
        )

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, eng: Any, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False) -> None:
        """Embedding to the final RMSNorm for ``rows`` token rows; the normalized rows end in ``x2`` (``x``
        itself unless the fused all-reduce writes them), the residual stream in ``h``."""
        c, b, dense, s = eng.config, eng.buffers, eng.dense, eng.stream_ptr
        h, ab = c.hidden_size, eng.gemm_type
        x, qkv, attn = b.x.data.ptr, b.qkv.data.ptr, b.attn.data.ptr
        normed = eng.normed.data.ptr
        w, hqd, last = eng.qkv_width, c.num_qo_heads * c.head_dim, c.num_layers - 1
        path = self.moe_path_for(eng, rows)
        eng.embed_and_norm(v, rows)
        for i in range(c.num_layers):
            dense.linear(rows, normed, h, eng.wqkv[i], w, h, qkv, w, ab, ab)
            self.k_bias((rows,), (256,), (qkv, self.bqkv[i], w, w))
            kernels.apply_rope_with_cos_sin_cache_inplace(
                v.positions, v.q, v.k, c.head_dim, self.cos_sin, is_neox=True, stream=s
            )
            eng.append_kv(v, i)
            attention(i, v)
            dense.linear(rows, attn, hqd, eng.wo[i], h, hqd, x, h, ab, ab)  # a partial sum with TP
            if self.with_bias:
                self.k_bias((rows,), (256,), (x, self.bo[i], h, h))
            eng.add_norm(v, eng.ln2[i])
            xin = eng.normed  # x, or x2 with the fused all-reduce; the MoE's (partial) output goes to x
            if path == "dense":  # every expert, no host step (capturable)
                eng.moe_layers[i].forward_dense(xin, b.x, rows)
            elif static_moe or (self.experts_stored and rows <= eng.max_batch):  # routed on the device (capturable);
                # MXFP4 experts as stored: the grouped GEMV reads them, eager or in a graph
                eng.moe_layers[i].forward_static(xin, b.x, rows)
            else:  # routed on the host: only the chosen experts' weights are read
                eng.moe_layers[i].forward(xin, b.x, rows)
            eng.add_norm(v, eng.ln1[i + 1] if i < last else eng.final_norm)

    def close(self, eng: Any) -> None:
        self.window_plans.close()


class GptOssEngine(Engine):
    """A gpt-oss checkpoint (bfloat16, or with MXFP4 experts: dequantized to bfloat16 while read) on one GPU or
    ``tensor_parallel`` GPUs; arguments and serving API as
    :class:`~fi_engine.models.llama.LlamaEngine`, plus:

    Args:
        moe_path: how the MoE layers run a step of up to ``max_batch`` token rows (module docstring;
            :class:`~fi_engine.models.moe_paths.MoEPaths`): ``"auto"`` (default) picks per step by
            :func:`~fi_engine.layers.moe.choose_path` (dense over the experts from ``num_experts / top_k`` rows, routed
            below; each decode CUDA graph picks once, at its capture); ``"routed"`` or ``"dense"`` force one path.
            Steps of more rows (long prefills) are always routed.
    """

    definition = GptOss

    @with_settings
    def __init__(self, model_dir: str | Path, *, moe_path: str = "auto", **settings: Any) -> None:
        super().__init__(model_dir, family=self.definition(moe_path), **settings)

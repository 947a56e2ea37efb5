"""The memory roofline of a decode step: the bytes the step must read (the numerator) over the device's memory
bandwidth (the denominator). A decode step of a few rows is bound by memory: at the roofline it takes ``bytes /
bandwidth`` seconds, and ``(bytes / bandwidth) / step_time`` is the share of the roofline a benchmark reaches.

**The denominator** is the device's peak bandwidth from its memory clock and bus width, ``2 * clock_Hz *
bus_bits / 8`` bytes/s (HBM and GDDR move data on both clock edges): an H100 SXM's 2619 MHz x 5120 bits is 3.35
TB/s, an H200's 3201 MHz x 6144 bits 4.92 TB/s (its data sheet says 4.8). :func:`peak_bandwidth` reads the two
figures through the CUDA driver (``cuDeviceGetAttribute``, through cuda-bindings) and, where that cannot answer,
through NVML (ctypes over ``libnvidia-ml.so.1``). It is the default denominator because the hardware fixes it:
the same on every run, so rows of different runs and machines compare. :func:`measured_copy_bandwidth` (a
device-to-device copy timed with CUDA events, through CuPy) is printed beside it as what a plain copy reaches,
below the peak and varying from run to run. :func:`roofline_denominator` gives both in one line to print with
every table, and the denominator: an explicit ``--hbm-tbs`` figure, else the peak, else (where neither source
can read the peak) the measured copy.

**The numerator** is :func:`decode_step_bytes`: what one decode step of ``batch`` rows reads on one rank of
``tp``, for a decoder of :class:`DecoderShape` (read from a ``config.json`` by :func:`shape_from_config`):

- every layer's attention projections (q, k, v, o) and MLP (gate, up, down) in the checkpoint's format: 16-bit
  (2 bytes a weight), or FP8 (1 byte a weight, e4m3, plus float32 scales: one per output row, or one per
  128x128 block; :func:`linear_bytes`);
- for a mixture-of-experts layer, the router (16-bit, whole on every rank) and the experts the step's rows
  choose: a step reads each chosen expert once, however many of its rows chose it. Under uniform routing (each
  row's top-``k`` of ``E`` experts a uniformly random set, rows independent) the expected number of distinct
  experts is ``E * (1 - (1 - k / E) ** batch)`` (:func:`expected_distinct_experts`; an expert is missed by one
  row with probability ``1 - k / E``). Random weights route about so; a trained model's skew reads fewer. The
  count observed in a run (:func:`count_distinct_experts` of a layer's routing) may be passed instead;
- the norms (16-bit, whole on every rank), the LM head (16-bit; its vocabulary rows split over the ranks unless
  ``vocab_parallel`` is off), and each row's KV cache of ``context`` tokens (``min(context, window)`` on
  sliding-window layers);
- DeepSeek-V2 / V3 (:class:`LatentAttention`): MLA's projections (``q_a_proj`` and ``kv_a_proj_with_mqa`` with
  their norms whole on every rank; ``q_b_proj`` or ``q_proj``, ``kv_b_proj`` and ``o_proj`` split by heads), its
  cache of one latent and one RoPE key per token and layer (whole on every rank), the first
  ``first_k_dense_replace`` layers' dense MLP, and every MoE layer's shared experts besides the chosen routed ones.
  An FP8 checkpoint as the engine serves it: the routed experts e4m3 (read as stored), every other projection
  16-bit (dequantized at load); ``dequantized``: the routed experts 16-bit too
  (``ModelRunner.fp8_experts_as_stored = False``);
- tensor parallelism as the engine splits a layer: q/k/v and gate/up by output rows, o and down by input
  columns, each expert's intermediate columns likewise.

Left out: the activations a step reads and writes (under 0.1 % of the 8B shape's step at batch 1, about 1 % at
batch 32) and, each under 0.1 %, the embedding rows a step gathers, biases (gpt-oss's), per-head q/k norms
(Qwen3's), attention sinks. The engine's ``dense`` MoE path reads every expert, more than this minimum: its
percent of the roofline is then below its bandwidth use.

Run as a script to print the bandwidth line (and what each source reads)::

    python benchmarks/roofline.py [--device N] [--no-copy] [--hbm-tbs TB/s]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from fi_engine.values import MAX_SIZE, arg_int, show

WEIGHT_FORMATS = ("16-bit", "fp8-row", "fp8-block", "int4", "mxfp4")

# ---------------------------------------------------------------------------------------------------------------
# the numerator: bytes one decode step reads


def linear_bytes(n: int, k: int, weights: str = "16-bit", block: tuple[int, int] = (128, 128)) -> int:
    """The bytes of one linear layer's weight ``[n, k]`` (``n`` output rows, ``k`` input columns) in format
    ``weights``: ``"16-bit"`` (bfloat16/float16, ``2 n k``), ``"fp8-row"`` (e4m3 and one float32 scale per output
    row, ``n k + 4 n``; per-tensor scales count so too: the engine keeps them as one per row) or ``"fp8-block"``
    (e4m3 and one float32 scale per ``block`` of rows x columns, ``n k + 4 ceil(n / bn) ceil(k / bk)``) or ``"int4"``
    (AWQ / GPTQ as the engine's int4 GEMV reads them: half a byte per weight and a 4-byte record, scale and zero, per
    row and group of ``bk`` inputs, ``n k / 2 + 4 n ceil(k / bk)``; a group of the whole row: ``bk`` >= ``k``) or
    ``"mxfp4"`` (as the MXFP4 grouped GEMV reads experts: half a byte per weight and a byte of scale per 32, each
    row's ``k`` padded to a multiple of 128, ``n kp / 2 + n kp / 32``)."""
    n = arg_int("n", n, 1, MAX_SIZE)
    k = arg_int("k", k, 1, MAX_SIZE)
    if weights == "16-bit":
        return 2 * n * k
    if weights == "fp8-row":
        return n * k + 4 * n
    if weights == "fp8-block":
        if not isinstance(block, tuple) or len(block) != 2:
            raise TypeError(f"block: expected a (rows, columns) tuple of two ints, e.g. (128, 128), got {show(block)}")
        bn, bk = (arg_int("block", b, 1, MAX_SIZE) for b in block)
        return n * k + 4 * -(-n // bn) * -(-k // bk)
    if weights == "int4":
        bk = arg_int("block", block[1] if isinstance(block, tuple) and len(block) == 2 else block, 1, MAX_SIZE)
        return n * k // 2 + 4 * n * -(-k // bk)
    if weights == "mxfp4":
        kp = -(-k // 128) * 128
        return n * kp // 2 + n * kp // 32
    raise ValueError(f"weights: expected one of {', '.join(WEIGHT_FORMATS)}, got {show(weights)}")


def expected_distinct_experts(experts: int, top_k: int, batch: int) -> float:
    """The expected number of distinct experts that ``batch`` rows choose, each its ``top_k`` of ``experts``
    uniformly at random and independently of the others: ``E * (1 - (1 - k / E) ** batch)`` (each expert is left
    out by one row with probability ``1 - k / E``). Batch 1 reads ``k``; a large batch approaches ``E``."""
    e = arg_int("experts", experts, 1, MAX_SIZE)
    k = arg_int("top_k", top_k, 1, e)
    b = arg_int("batch", batch, 0, MAX_SIZE)
    return e * (1 - (1 - k / e) ** b)


def count_distinct_experts(expert_ids: Any) -> int:
    """The distinct experts one layer's routing of a step chose: ``expert_ids`` the chosen expert ids of every row
    (e.g. ``[rows, top_k]`` ints, as ``MoELayer.last_routing[1]``). Pass one count per layer to
    :func:`decode_step_bytes` (``experts_read``) to count a step by its observed routing."""
    ids = np.asarray(expert_ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"expert_ids: expected integer expert ids, got an array of {ids.dtype}")
    return len(np.unique(ids))


@dataclass(frozen=True)
class DecoderShape:
    """A decoder-only transformer's shape, as the bytes model reads it.

    Attributes:
        hidden: hidden size (``hidden_size``).
        intermediate: the MLP's intermediate size; for a mixture of experts, each expert's.
        layers: decoder layers.
        heads, kv_heads, head_dim: query heads, KV heads and their size.
        vocab: vocabulary rows of the LM head.
        experts: routed experts per layer (0: a dense MLP); ``top_k`` of them per row.
        weights: the projections' format (:data:`WEIGHT_FORMATS`, see :func:`linear_bytes`); the router, norms and
            LM head are 16-bit in every format (FP8 checkpoints leave them so).
        block: the ``fp8-block`` scales' block, (rows, columns); for ``int4``, (1, the inputs of a group).
        expert_weights: the routed experts' format where it is not ``weights`` (gpt-oss's MXFP4 experts beside its
            16-bit attention: ``"mxfp4"``); ``""``: ``weights``.
        window, window_layers: ``window_layers`` of the layers attend to the last ``window`` tokens only.
        mla: DeepSeek's latent attention (then ``kv_heads`` and ``head_dim`` are unread); None: q, k, v, o.
        shared_intermediate: the shared experts' intermediate size (every MoE layer's, read on every step in
            ``weights``); 0: none.
        dense_layers, dense_intermediate: the first ``dense_layers`` layers of a MoE model have a dense MLP of
            ``dense_intermediate`` columns instead of experts (DeepSeek's ``first_k_dense_replace``).
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int = 0
    top_k: int = 0
    weights: str = "16-bit"
    block: tuple[int, int] = (128, 128)
    window: int = 0
    window_layers: int = 0
    expert_weights: str = ""
    mla: LatentAttention | None = None
    shared_intermediate: int = 0
    dense_layers: int = 0
    dense_intermediate: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            arg_int(name, getattr(self, name), 1, MAX_SIZE)
        arg_int("experts", self.experts, 0, MAX_SIZE)
        arg_int("top_k", self.top_k, 1 if self.experts else 0, self.experts)
        arg_int("window", self.window, 0, MAX_SIZE)
        arg_int("window_layers", self.window_layers, 0, self.layers if self.window else 0)
        linear_bytes(1, 1, self.weights, self.block)  # the format and block checked
        if self.expert_weights:
            linear_bytes(1, 1, self.expert_weights, self.block)
        if self.mla is not None and not isinstance(self.mla, LatentAttention):
            raise TypeError(f"mla: expected None or a LatentAttention, got {type(self.mla).__name__}")
        arg_int("shared_intermediate", self.shared_intermediate, 0, MAX_SIZE if self.experts else 0)
        arg_int("dense_layers", self.dense_layers, 0, self.layers if self.experts else 0)
        arg_int("dense_intermediate", self.dense_intermediate, 1 if self.dense_layers else 0, MAX_SIZE)


class LatentAttention(NamedTuple):
    """DeepSeek's multi-head latent attention, as the bytes model reads it: ``q_lora_rank`` (0: a full ``q_proj``),
    ``kv_lora_rank`` (the latent), ``qk_nope`` / ``qk_rope`` / ``v_head`` the per-head sizes."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int


DEEPSEEK_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")

EXPERTS_AS_STORED = {"mxfp4": "mxfp4"}
"""The ``quant_method`` values of checkpoints whose routed experts alone are quantized (gpt-oss's MXFP4), and the
format the engine reads them in (as stored: the MXFP4 grouped GEMV); every other weight is 16-bit."""


def shape_from_config(cfg: Any, dequantized: bool = False) -> DecoderShape:
    """The :class:`DecoderShape` of a Hugging Face ``config.json`` dict: ``hidden_size``, ``intermediate_size``
    (``moe_intermediate_size`` where a MoE config has it), ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads`` (default: the heads), ``head_dim`` (default: hidden / heads), ``vocab_size``; experts
    from ``num_local_experts`` or ``num_experts`` with ``num_experts_per_tok``; FP8 weights from an FP8
    ``quantization_config`` (per-row scales for per-tensor and per-channel ones, per-block with
    ``weight_block_size``); sliding windows from ``layer_types`` (``sliding_attention``) and ``sliding_window`` (a
    ``sliding_window`` without ``layer_types`` counts as full attention: the KV bytes of a long context are then
    over-counted).
    AWQ / GPTQ checkpoints count as ``int4`` in groups of their ``group_size`` (the engine's int4 GEMV reads them as
    stored); MXFP4 ones (:data:`EXPERTS_AS_STORED`) as 16-bit with ``mxfp4`` experts (``dequantized=True``: 16-bit
    experts, the engine's fallback, ``GptOss.mxfp4_as_stored = False``; FP8 experts alike,
    ``ModelRunner.fp8_experts_as_stored = False``).
    DeepSeek-V2 / V3 (``model_type`` ``deepseek_v2`` / ``deepseek_v3``): :func:`deepseek_shape`.
    ValueError naming the key for what it cannot model (a missing size, another quantization, Qwen2-MoE's shared
    experts, latent attention of another model type)."""
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg: expected a config.json dict, got {type(cfg).__name__}")
    if cfg.get("model_type") in DEEPSEEK_MODEL_TYPES:
        return deepseek_shape(cfg, dequantized)
    for key in ("kv_lora_rank", "n_routed_experts", "shared_expert_intermediate_size"):
        if cfg.get(key):
            raise ValueError(f"config: {key!r}: latent attention and shared experts are modelled for DeepSeek-V2/V3 "
                             f"(model_type deepseek_v2 / deepseek_v3) only")  # fmt: skip
    size = _sizes(cfg)

    hidden, heads = size("hidden_size"), size("num_attention_heads")
    experts_key = "num_local_experts" if cfg.get("num_local_experts") is not None else "num_experts"
    experts = cfg.get(experts_key) or 0
    moe_size = "moe_intermediate_size" if experts and cfg.get("moe_intermediate_size") else "intermediate_size"
    weights, block = "16-bit", (128, 128)
    quantization = cfg.get("quantization_config")
    expert_weights = ""
    if isinstance(quantization, dict) and quantization.get("quant_method") in EXPERTS_AS_STORED:
        expert_weights = "" if dequantized else EXPERTS_AS_STORED[quantization["quant_method"]]
        quantization = None  # (the other weights stay 16-bit)
    if isinstance(quantization, dict) and quantization.get("quant_method") in ("awq", "gptq"):
        group = quantization.get("group_size", 128)
        weights, block = "int4", (1, MAX_SIZE if group == -1 else arg_int("config 'group_size'", group, 1, MAX_SIZE))
        quantization = None
    if quantization is not None:
        weights, block = _fp8_format(quantization)
        if experts and dequantized:  # the engine's dequantizing load: e4m3 attention, 16-bit experts
            expert_weights = "16-bit"
    layer_types = cfg.get("layer_types") or []
    windowed = sum(t == "sliding_attention" for t in layer_types) if isinstance(layer_types, list) else 0
    return DecoderShape(
        hidden=hidden,
        intermediate=size(moe_size),
        layers=size("num_hidden_layers"),
        heads=heads,
        kv_heads=size("num_key_value_heads", heads),
        head_dim=size("head_dim", hidden // heads),
        vocab=size("vocab_size"),
        experts=arg_int(f"config {experts_key!r}", experts, 0, MAX_SIZE),
        top_k=size("num_experts_per_tok") if experts else 0,
        weights=weights,
        block=block,
        window=size("sliding_window") if windowed else 0,
        window_layers=windowed,
        expert_weights=expert_weights,
    )


def _sizes(cfg: dict[str, Any]) -> Callable[..., int]:
    """``size(key, default=None)``: config ``cfg``'s positive integer ``key``; ValueError naming a missing one."""

    def size(key: str, default: int | None = None) -> int:
        value = cfg.get(key, default)
        if value is None:
            raise ValueError(f"config: missing {key!r} (a positive integer)")
        return arg_int(f"config {key!r}", value, 1, MAX_SIZE)

    return size


def _fp8_format(quantization: Any) -> tuple[str, tuple[int, int]]:
    """The :data:`WEIGHT_FORMATS` entry and block of an FP8 ``quantization_config`` (ValueError for another)."""
    from fi_engine.checkpoint.quantization import fp8_scheme

    scheme = fp8_scheme(quantization, "config")
    if scheme is None:
        raise ValueError("config: 'quantization_config' is not FP8: only 16-bit and FP8 weights are modelled")
    if scheme.scales != "block":
        return "fp8-row", (128, 128)
    if scheme.block is None:
        raise ValueError("config: 'quantization_config': FP8 blocks of no stated size")
    return "fp8-block", scheme.block


def deepseek_shape(cfg: dict[str, Any], dequantized: bool = False) -> DecoderShape:
    """The :class:`DecoderShape` of a DeepSeek-V2 / V3 ``config.json`` dict as the engine serves it: MLA
    (:class:`LatentAttention` from ``q_lora_rank``, ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``,
    ``v_head_dim``), ``n_routed_experts`` of ``moe_intermediate_size`` (``num_experts_per_tok`` a row) besides
    ``n_shared_experts`` shared ones, the first ``first_k_dense_replace`` layers (V3's default 3, V2's 0) a dense MLP
    of ``intermediate_size``. Every projection 16-bit but, in an FP8 checkpoint, the routed experts: e4m3 as stored
    (``fp8-block`` / ``fp8-row``), or 16-bit with ``dequantized`` (``ModelRunner.fp8_experts_as_stored = False``);
    the engine dequantizes MLA's, the dense MLPs' and the shared experts' e4m3 weights at load."""
    size = _sizes(cfg)
    layers, heads = size("num_hidden_layers"), size("num_attention_heads")
    q_rank = cfg.get("q_lora_rank")
    mla = LatentAttention(
        0 if q_rank is None else size("q_lora_rank"), size("kv_lora_rank"), size("qk_nope_head_dim"),
        size("qk_rope_head_dim"), size("v_head_dim"),
    )  # fmt: skip
    routed = cfg.get("n_routed_experts")
    experts = 0 if routed is None else size("n_routed_experts")
    block, expert_weights = (128, 128), ""
    quantization = cfg.get("quantization_config")
    if quantization is not None:
        fp8, block = _fp8_format(quantization)
        expert_weights = fp8 if experts and not dequantized else ""
    first = cfg.get("first_k_dense_replace", 3 if cfg.get("model_type") == "deepseek_v3" else 0)
    dense_layers = min(arg_int("config 'first_k_dense_replace'", first, 0, MAX_SIZE), layers) if experts else 0
    shared = cfg.get("n_shared_experts") or 0
    return DecoderShape(
        hidden=size("hidden_size"),
        intermediate=size("moe_intermediate_size") if experts else size("intermediate_size"),
        layers=layers,
        heads=heads,
        kv_heads=1,  # (unread: the latent cache is one shared "head")
        head_dim=mla.qk_rope,
        vocab=size("vocab_size"),
        experts=experts,
        top_k=size("num_experts_per_tok") if experts else 0,
        block=block,
        expert_weights=expert_weights,
        mla=mla,
        shared_intermediate=size("moe_intermediate_size") * arg_int("config 'n_shared_experts'", shared, 0, MAX_SIZE)
        if experts
        else 0,
        dense_layers=dense_layers,
        dense_intermediate=size("intermediate_size") if dense_layers else 0,
    )


def _split(name: str, value: int, tp: int) -> int:
    """``value / tp``: the part of each rank; ValueError where the engine could not split it so."""
    if value % tp:
        raise ValueError(f"tp: {tp} does not divide the {name} ({value}); the engine splits them evenly")
    return value // tp


def decode_step_bytes(
    shape: DecoderShape,
    *,
    batch: int,
    context: int,
    tp: int = 1,
    vocab_parallel: bool = True,
    experts_read: Sequence[float] | None = None,
    kv_bytes: int = 2,
) -> float:
    """The bytes one decode step of ``batch`` rows reads on one rank of ``tp`` (the module docstring lists what
    counts): each layer's projections, router, experts and norms, the final norm, the LM head (its rows split over
    the ranks, ``ceil(vocab / tp)`` each, where ``vocab_parallel``), and the KV cache of ``context`` tokens per row
    at ``kv_bytes`` per element (2: 16-bit; 1: an FP8 cache). ``experts_read``: for a MoE shape, the distinct
    experts the step reads in each layer (one number per MoE layer, e.g. :func:`count_distinct_experts` of a run's
    routing, or its mean over steps); None: the expected count under uniform routing
    (:func:`expected_distinct_experts`). A float: the expected count need not be whole."""
    s = shape
    if not isinstance(s, DecoderShape):
        raise TypeError(f"shape: expected a DecoderShape, got {type(s).__name__}")
    batch = arg_int("batch", batch, 1, MAX_SIZE)
    context = arg_int("context", context, 0, MAX_SIZE)
    tp = arg_int("tp", tp, 1, MAX_SIZE)
    kv_bytes = arg_int("kv_bytes", kv_bytes, 1, 8)
    if not isinstance(vocab_parallel, bool):
        raise TypeError(f"vocab_parallel: expected True or False, got {type(vocab_parallel).__name__}")
    w, blk = s.weights, s.block
    if s.mla is None:
        q_rows = _split("query heads", s.heads, tp) * s.head_dim
        kv_rows = _split("KV heads", s.kv_heads, tp) * s.head_dim
        attention = linear_bytes(q_rows, s.hidden, w, blk) + 2 * linear_bytes(kv_rows, s.hidden, w, blk)
        attention += linear_bytes(s.hidden, q_rows, w, blk)
        kv_per_token = 2 * kv_rows  # K and V
    else:
        attention, kv_per_token = _latent_attention_bytes(s, _split("query heads", s.heads, tp))
    cols = _split("intermediate columns", s.intermediate, tp)
    mlp = _swiglu_bytes(s.hidden, cols, w, blk)
    if s.experts and s.expert_weights:
        ew = s.expert_weights
        mlp = linear_bytes(2 * cols, s.hidden, ew, blk) + linear_bytes(s.hidden, cols, ew, blk)
    norms = 2 * 2 * s.hidden  # before attention and before the MLP, 16-bit
    if s.experts:
        moe_layers = s.layers - s.dense_layers
        if experts_read is None:
            read = [expected_distinct_experts(s.experts, s.top_k, batch)] * moe_layers
        else:
            read = _experts_read(experts_read, s, batch)
        shared = s.shared_intermediate and _swiglu_bytes(
            s.hidden, _split("shared expert columns", s.shared_intermediate, tp), w, blk
        )
        dense = s.dense_layers and _swiglu_bytes(
            s.hidden, _split("dense MLP columns", s.dense_intermediate, tp), w, blk
        )
        weights = s.layers * (attention + norms) + moe_layers * (2 * s.experts * s.hidden + shared)
        weights += s.dense_layers * dense + sum(read) * mlp
    else:
        if experts_read is not None:
            raise ValueError("experts_read: this shape has no experts (experts=0); pass None")
        weights = s.layers * (attention + mlp + norms)
    head_rows = -(-s.vocab // tp) if vocab_parallel else s.vocab
    head = 2 * s.hidden + 2 * head_rows * s.hidden  # the final norm and the LM head, 16-bit
    windowed = min(context, s.window) if s.window else context
    tokens = (s.layers - s.window_layers) * context + s.window_layers * windowed  # over the layers, per row
    kv = batch * tokens * kv_per_token * kv_bytes
    return float(weights + head + kv)


def _swiglu_bytes(hidden: int, cols: int, w: str, blk: tuple[int, int]) -> int:
    """One SwiGLU MLP's weights (gate and up ``[cols, hidden]``, down ``[hidden, cols]``) in format ``w``."""
    return 2 * linear_bytes(cols, hidden, w, blk) + linear_bytes(hidden, cols, w, blk)


def _latent_attention_bytes(s: DecoderShape, heads: int) -> tuple[int, int]:
    """One layer's MLA weights on a rank of ``heads`` heads and its cache elements per token: the query latent
    ``q_a_proj`` and its norm (or a full ``q_proj``), ``kv_a_proj_with_mqa`` and its norm (whole on every rank),
    ``q_b_proj``, ``kv_b_proj`` and ``o_proj`` (the rank's heads); the cache holds one latent and one RoPE key a token
    (whole on every rank)."""
    m, w, blk, h = s.mla, s.weights, s.block, s.hidden
    assert m is not None
    qk = m.qk_nope + m.qk_rope
    if m.q_lora_rank:
        q = linear_bytes(m.q_lora_rank, h, w, blk) + 2 * m.q_lora_rank + linear_bytes(heads * qk, m.q_lora_rank, w, blk)
    else:
        q = linear_bytes(heads * qk, h, w, blk)
    kv = linear_bytes(m.kv_lora_rank + m.qk_rope, h, w, blk) + 2 * m.kv_lora_rank
    kv += linear_bytes(heads * (m.qk_nope + m.v_head), m.kv_lora_rank, w, blk)
    return q + kv + linear_bytes(h, heads * m.v_head, w, blk), m.kv_lora_rank + m.qk_rope


def _experts_read(experts_read: Sequence[float], s: DecoderShape, batch: int) -> list[float]:
    """``experts_read`` checked: one finite number per layer, each in ``[0, min(experts, batch * top_k)]``."""
    if isinstance(experts_read, (str, bytes)) or not isinstance(experts_read, Sequence):
        raise TypeError(f"experts_read: expected a sequence of numbers (one per layer), got {show(experts_read)}")
    if len(experts_read) != s.layers - s.dense_layers:
        raise ValueError(f"experts_read: expected one count per MoE layer ({s.layers - s.dense_layers}), got "
                         f"{len(experts_read)}")  # fmt: skip
    most = min(s.experts, batch * s.top_k)
    for n in experts_read:
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not 0 <= n <= most:
            raise ValueError(
                f"experts_read: expected each count in [0, {most}] (the experts, or batch x top_k if fewer), "
                f"got {show(n)}"
            )
    return [float(n) for n in experts_read]


# ---------------------------------------------------------------------------------------------------------------
# the denominator: the device's memory bandwidth


class BandwidthUnavailable(RuntimeError):
    """The memory bandwidth could not be read or measured; the text says why and how to pass it instead."""


@dataclass(frozen=True)
class MemorySpec:
    """What a source reads of a device's memory: ``name`` of the device, ``clock_khz`` the peak memory clock
    (kHz), ``bus_bits`` the memory bus width (bits), ``source`` which source read them."""

    name: str
    clock_khz: int
    bus_bits: int
    source: str

    @property
    def peak(self) -> float:
        """Peak bandwidth, bytes/s: two transfers per clock (double data rate) of ``bus_bits / 8`` bytes."""
        return 2 * self.clock_khz * 1e3 * self.bus_bits / 8


Reader = Callable[[int], MemorySpec]  # a CUDA device ordinal -> its MemorySpec, or BandwidthUnavailable


def _device(device: Any) -> int:
    """``device`` as a CUDA device ordinal, else TypeError/ValueError naming it."""
    return arg_int("device", device, 0, MAX_SIZE)


def read_driver(device: int) -> MemorySpec:
    """The memory clock and bus width of CUDA device ``device`` from the CUDA driver (cuda-bindings'
    ``cuDeviceGetAttribute`` with ``CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE``, kHz, and
    ``CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH``, bits). BandwidthUnavailable where cuda-bindings is missing,
    the driver library does not load, or a call fails (no device, a bad ordinal)."""
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise BandwidthUnavailable(f"CUDA driver: cuda-bindings cannot be imported ({exc})") from exc
    attr = driver.CUdevice_attribute
    clock_attr = getattr(attr, "CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE", None)
    bus_attr = getattr(attr, "CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH", None)
    if clock_attr is None or bus_attr is None:
        raise BandwidthUnavailable("CUDA driver: this cuda-bindings lacks the memory clock or bus width attribute")

    def call(result: Any, what: str) -> Any:
        """The value of a cuda-bindings result ``(CUresult, value...)``; BandwidthUnavailable naming the error."""
        err = result[0]
        if int(err) != 0:
            named = driver.cuGetErrorName(err)
            name = named[1].decode() if int(named[0]) == 0 else str(int(err))
            raise BandwidthUnavailable(f"CUDA driver: {what} failed with {name}")
        return result[1] if len(result) > 1 else None

    try:  # cuda-bindings raises RuntimeError (its DynamicLibNotFoundError) where libcuda.so.1 does not load
        call(driver.cuInit(0), "cuInit")
        dev = call(driver.cuDeviceGet(device), f"cuDeviceGet({device})")
        clock = call(driver.cuDeviceGetAttribute(clock_attr, dev), "cuDeviceGetAttribute(MEMORY_CLOCK_RATE)")
        bus = call(driver.cuDeviceGetAttribute(bus_attr, dev), "cuDeviceGetAttribute(GLOBAL_MEMORY_BUS_WIDTH)")
        raw = call(driver.cuDeviceGetName(256, dev), "cuDeviceGetName")
    except BandwidthUnavailable:
        raise
    except (RuntimeError, OSError) as exc:
        raise BandwidthUnavailable(f"CUDA driver: {exc}") from exc
    return MemorySpec(raw.split(b"\0", 1)[0].decode(errors="replace"), int(clock), int(bus), "CUDA driver")


NVML_CLOCK_MEM = 2  # nvmlClockType_t: NVML_CLOCK_GRAPHICS 0, NVML_CLOCK_SM 1, NVML_CLOCK_MEM 2


def read_nvml(device: int) -> MemorySpec:
    """The memory clock and bus width of CUDA device ``device`` from NVML (``nvmlDeviceGetMaxClockInfo`` of
    ``NVML_CLOCK_MEM``, MHz, and ``nvmlDeviceGetMemoryBusWidth``, bits), through ctypes. NVML numbers the GPUs in
    PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``: the ordinal is mapped through that variable (its indices or
    UUIDs), and otherwise taken as NVML's index (CUDA's default order puts the fastest GPU first; on a machine of
    identical GPUs the figure is the same). BandwidthUnavailable where the library does not load or a call fails."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as exc:
        raise BandwidthUnavailable(f"NVML: libnvidia-ml.so.1 does not load ({exc})") from exc

    def call(name: str, *args: Any) -> None:
        """``lib.<name>(*args)``; BandwidthUnavailable naming the call and NVML's error text."""
        try:
            fn = getattr(lib, name)
        except AttributeError as exc:  # an NVML older than the call
            raise BandwidthUnavailable(f"NVML: this libnvidia-ml.so.1 has no {name}") from exc
        ret = fn(*args)
        if ret != 0:
            describe = getattr(lib, "nvmlErrorString", None)
            if describe is not None:
                describe.restype = ctypes.c_char_p
            text = (describe(ret) or b"").decode(errors="replace") if describe is not None else "an error"
            raise BandwidthUnavailable(f"NVML: {name} failed with {text} ({ret})")

    call("nvmlInit_v2")
    try:
        handle = ctypes.c_void_p()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        entry = str(device)
        if visible:
            if device >= len(visible):
                raise BandwidthUnavailable(f"NVML: CUDA device {device} is not in CUDA_VISIBLE_DEVICES={visible}")
            entry = visible[device]
        if entry.isdigit():
            call("nvmlDeviceGetHandleByIndex_v2", ctypes.c_uint(int(entry)), ctypes.byref(handle))
        else:
            call("nvmlDeviceGetHandleByUUID", entry.encode(), ctypes.byref(handle))
        clock_mhz, bus = ctypes.c_uint(), ctypes.c_uint()
        call("nvmlDeviceGetMaxClockInfo", handle, ctypes.c_int(NVML_CLOCK_MEM), ctypes.byref(clock_mhz))
        call("nvmlDeviceGetMemoryBusWidth", handle, ctypes.byref(bus))
        name = ctypes.create_string_buffer(96)
        call("nvmlDeviceGetName", handle, name, ctypes.c_uint(len(name)))
    finally:
        lib.nvmlShutdown()
    return MemorySpec(name.value.decode(errors="replace"), clock_mhz.value * 1000, bus.value, "NVML")


READERS: tuple[Reader, ...] = (read_driver, read_nvml)  # tried in this order


def read_memory_spec(device: int = 0, readers: Sequence[Reader] = READERS) -> MemorySpec:
    """The first :class:`MemorySpec` one of ``readers`` (in order; by default the CUDA driver, then NVML) gives for
    CUDA device ``device``. A reader that raises BandwidthUnavailable, or answers no positive clock and bus width,
    gives way to the next; BandwidthUnavailable naming every reader's reason where none answers (anything else a
    reader raises is a fault of the reader, and propagates)."""
    device = _device(device)
    reasons = []
    for reader in readers:
        try:
            spec = reader(device)
        except BandwidthUnavailable as exc:
            reasons.append(str(exc))
            continue
        if not isinstance(spec, MemorySpec):
            reasons.append(f"{getattr(reader, '__name__', show(reader))}: answered {show(spec)}, not a MemorySpec")
        elif not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (spec.clock_khz, spec.bus_bits)):
            reasons.append(f"{spec.source}: no memory clock or bus width ({spec.clock_khz} kHz, {spec.bus_bits} bits)")
        else:
            return spec
    raise BandwidthUnavailable(
        f"the memory clock and bus width of cuda:{device} cannot be read ({'; '.join(reasons) or 'no readers'}); "
        f"pass the bandwidth instead (--hbm-tbs, TB/s)"
    )


def peak_bandwidth(device: int = 0, readers: Sequence[Reader] = READERS) -> float:
    """The peak memory bandwidth of CUDA device ``device``, bytes/s: ``2 * clock_Hz * bus_bits / 8`` from the first
    of ``readers`` that answers (:func:`read_memory_spec`; BandwidthUnavailable where none does)."""
    return read_memory_spec(device, readers).peak


def measured_copy_bandwidth(device: int = 0, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """The bandwidth a device-to-device copy of ``nbytes`` reaches on CUDA device ``device``, bytes/s: bytes read
    plus bytes written (``2 * nbytes``) over the copy's time between two CUDA events, the best of ``reps`` copies
    after one warm-up. The buffers are allocated outside CuPy's memory pool and freed on return, so an engine
    sized from the free memory afterwards sees it all. Needs CuPy (imported here); BandwidthUnavailable where
    CuPy is missing or a CUDA call fails (no device, out of memory)."""
    device = _device(device)
    nbytes = arg_int("nbytes", nbytes, 1, 1 << 40)
    reps = arg_int("reps", reps, 1, 1000)
    try:
        import cupy as cp
    except ImportError as exc:
        raise BandwidthUnavailable(f"copy: CuPy cannot be imported ({exc})") from exc
    try:  # CuPy's CUDA errors are RuntimeErrors, its out-of-memory error a MemoryError
        with cp.cuda.Device(device):
            src = cp.cuda.MemoryPointer(cp.cuda.Memory(nbytes), 0)
            dst = cp.cuda.MemoryPointer(cp.cuda.Memory(nbytes), 0)
            stream = cp.cuda.Stream(non_blocking=True)
            src.memset_async(0, nbytes, stream)
            dst.copy_from_device_async(src, nbytes, stream)  # warm-up
            start, end = cp.cuda.Event(), cp.cuda.Event()
            best_ms = math.inf
            for _ in range(reps):
                start.record(stream)
                dst.copy_from_device_async(src, nbytes, stream)
                end.record(stream)
                end.synchronize()
                best_ms = min(best_ms, cp.cuda.get_elapsed_time(start, end))
            del src, dst  # freed now (cudaFree), not left in a pool
    except (RuntimeError, MemoryError) as exc:
        raise BandwidthUnavailable(f"copy: {type(exc).__name__}: {exc}") from exc
    return 2 * nbytes / (best_ms / 1e3)


class Denominator(NamedTuple):
    """The roofline's denominator: ``line`` the one-line description to print with a table (device, peak from
    clock x bus, measured copy, which figure is the denominator), ``bytes_per_s`` the figure."""

    line: str
    bytes_per_s: float


def report_decode_row(rows: list[dict[str, Any]], name: str, row: dict[str, Any], step_bytes: float, bytes_per_s: float,
                      width: int) -> None:  # fmt: skip
    """A model benchmark's decode row: ``step_bytes`` (the bytes a step reads) and its share of the roofline at
    ``bytes_per_s`` (:func:`roofline_denominator`'s) added to ``row`` (which has ``ms_per_step``,
    ``tokens_per_s`` and ``host_us_per_step``), the row kept in ``rows`` and printed (``name`` padded to ``width``)."""
    row["bytes_per_step"] = step_bytes
    row["roofline"] = step_bytes / bytes_per_s / (row["ms_per_step"] / 1e3)
    rows.append(row)
    print(f"{name:{width}s} batch {row['batch']:3d}: {row['tokens_per_s']:9.1f} tokens/s, host "
          f"{row['host_us_per_step']:7.1f} us/step, {row['ms_per_step']:.3f} ms/step; "
          f"{step_bytes / 1e9:.2f} GB/step expected, {100 * row['roofline']:.0f} % of the roofline",
          flush=True)  # fmt: skip


def roofline_denominator(
    device: int = 0,
    *,
    hbm_tbs: float | None = None,
    measure: bool = True,
    readers: Sequence[Reader] = READERS,
    copy: Callable[[int], float] = measured_copy_bandwidth,
) -> Denominator:
    """The denominator of CUDA device ``device`` and the line describing it. The denominator is ``hbm_tbs``
    (TB/s) where given (a benchmark's ``--hbm-tbs``), else the peak from the memory clock x bus width
    (:func:`read_memory_spec` over ``readers``), else -- where neither source answers -- the measured copy. The
    copy (``copy(device)``, :func:`measured_copy_bandwidth` by default) is measured when ``measure`` is on, and
    printed for comparison. Where no figure is left the denominator is NaN (every percent of the roofline then
    prints as ``nan``) and the line says why and names ``--hbm-tbs``: a benchmark's measured rows still print."""
    device = _device(device)
    if hbm_tbs is not None and (
        isinstance(hbm_tbs, bool) or not isinstance(hbm_tbs, (int, float)) or not 0 < hbm_tbs < math.inf
    ):
        raise ValueError(f"hbm_tbs (--hbm-tbs): expected a positive bandwidth in TB/s, e.g. 3.35, got {show(hbm_tbs)}")
    parts = []
    peak: float | None = None
    try:
        spec = read_memory_spec(device, readers)
    except BandwidthUnavailable as exc:
        parts.append(f"cuda:{device}: peak unknown ({exc})")
    else:
        peak = spec.peak
        parts.append(
            f"{spec.name} (cuda:{device}): peak {peak / 1e12:.2f} TB/s "
            f"({spec.clock_khz / 1e3:.0f} MHz x {spec.bus_bits}-bit bus, double data rate; {spec.source})"
        )
    measured: float | None = None
    copy_reason = "measure is off"
    if measure:
        try:
            measured = copy(device)
        except BandwidthUnavailable as exc:
            copy_reason = str(exc)
            parts.append(f"measured copy unavailable ({exc})")
        else:
            share = f", {100 * measured / peak:.0f} % of peak" if peak else ""
            parts.append(f"measured copy {measured / 1e12:.2f} TB/s{share}")
    if hbm_tbs is not None:
        figure, basis = hbm_tbs * 1e12, "--hbm-tbs"
    elif peak is not None:
        figure, basis = peak, "peak"
    elif measured is not None:
        figure, basis = measured, "measured copy (no peak)"
    else:
        parts.append(f"roofline denominator: none (no copy measured: {copy_reason}; pass --hbm-tbs TB/s)")
        return Denominator("bandwidth: " + "; ".join(parts), math.nan)
    parts.append(f"roofline denominator: {basis} {figure / 1e12:.2f} TB/s")
    return Denominator("bandwidth: " + "; ".join(parts), figure)


def add_hbm_tbs_argument(parser: argparse.ArgumentParser) -> None:
    """``--hbm-tbs TB/s`` on a benchmark's ``parser``: the roofline's denominator instead of the device's peak
    (None where not given; pass it to :func:`roofline_denominator` as ``hbm_tbs``)."""
    parser.add_argument(
        "--hbm-tbs",
        type=float,
        help="the roofline's memory bandwidth in TB/s (default: the device's peak, from memory clock x bus width)",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default 0)")
    ap.add_argument("--no-copy", action="store_true", help="do not measure the copy bandwidth")
    add_hbm_tbs_argument(ap)
    args = ap.parse_args(argv)
    for reader in READERS:  # each source on its own: on a GPU machine the two should agree
        try:
            spec = reader(args.device)
            print(f"{spec.source}: {spec.name}, {spec.clock_khz} kHz x {spec.bus_bits} bits = {spec.peak:.4g} B/s")
        except BandwidthUnavailable as exc:
            print(exc)
    line, figure = roofline_denominator(args.device, hbm_tbs=args.hbm_tbs, measure=not args.no_copy)
    print(line)
    return 1 if math.isnan(figure) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The parts of a DeepSeek-V2 / DeepSeek-V3 ``config.json`` the engine needs, parsed and checked.

The architecture (``model_type`` ``deepseek_v3``; ``deepseek_v2`` where the same code serves, e.g. DeepSeek-V2-Lite;
Moonlight is ``deepseek_v3``): multi-head latent attention (MLA) with low-rank queries (``q_lora_rank``, or a full
``q_proj`` when it is null, as in V2-Lite) and a low-rank compressed KV (``kv_lora_rank``) shared by all heads, a
decoupled RoPE part of ``qk_rope_head_dim`` per head, dense MLP layers first (``first_k_dense_replace``), then
mixture-of-experts layers with shared experts and group-limited routing:

- V3 (``topk_method`` ``noaux_tc``): sigmoid scores; groups ranked by the sum of their two best biased scores
  (``e_score_correction_bias``), the ``topk_group`` best groups kept, the ``top_k`` best biased scores among their
  experts chosen; weights are the unbiased scores, renormalized when ``norm_topk_prob``, times
  ``routed_scaling_factor``;
- V2 (``greedy`` or ``group_limited_greedy``): softmax scores; with groups, a group ranks by its best score; the
  ``top_k`` best chosen; weights renormalized when ``norm_topk_prob`` (V2-Lite: false), times
  ``routed_scaling_factor``.

The engine's MLA kernels fix ``kv_lora_rank`` at 512 and ``qk_rope_head_dim`` at 64 (every published V2/V3 model);
other sizes are refused by name. FP8 checkpoints (``quantization_config``, DeepSeek-V3's published e4m3 weights with
128x128 block scales; :func:`deepseek_fp8_scheme`) are served with the routed experts kept e4m3 and every other e4m3
projection dequantized to the 16-bit type at load (``fp8``); other quantizations are refused by name, and so is
everything else the engine does not implement (attention or MLP biases, other activations, MoE layers every other
layer).

Rotary settings: plain RoPE or YaRN (``rope_scaling`` of transformers 4.x or ``rope_parameters`` of 5.x, type
``yarn``; ``factor``, ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``mscale``,
``mscale_all_dim``, ``attention_factor``, ``truncate``). YaRN changes the frequencies, scales cos/sin by the
attention factor, and with ``mscale_all_dim`` multiplies the softmax scale by ``mscale(factor, mscale_all_dim)^2``
(what transformers and DeepSeek's reference code do). :meth:`DeepSeekConfig.cos_sin_cache` builds the table the
RoPE kernel reads.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint.config import MoEConfig, YarnRope, read_config_json, yarn_mscale, yarn_ramp
from ..checkpoint.family_configs import eos_ids, rope_settings, silu_without_biases, size
from ..checkpoint.quantization import Fp8Scheme, served_fp8_scheme
from ..layers.deepseek_routing import DeepSeekRouting
from ..layers.tensor_parallel import MAX_PARTS, refuse_undivided
from ..values import MAX_SIZE, arg_int, show

__all__ = [
    "DEEPSEEK_MODEL_TYPES",
    "DEQUANTIZED_BESIDE_EXPERTS",
    "EXPERT_SPLITS",
    "DeepSeekConfig",
    "DeepSeekRouting",
    "deepseek_fp8_scheme",
    "fp8_shard_refusal",
    "is_deepseek",
]

DEEPSEEK_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
KV_LORA_RANK = 512  # head_dim_ckv of the MLA kernels
ROPE_HEAD_DIM = 64  # head_dim_kpe of the MLA kernels
EXPERT_SPLITS = ("columns", "experts")
"""How tensor parallelism may split DeepSeek's routed experts (:attr:`DeepSeekConfig.expert_split`): ``"columns"``,
each rank a slice of every expert's intermediate columns; ``"experts"``, each rank whole experts."""


@dataclass(frozen=True)
class DeepSeekConfig:
    """A DeepSeek-V2/V3 decoder's shape and settings. ``num_qo_heads``, ``num_kv_heads`` (1: the latent KV is shared
    by every head), ``head_dim`` (the RoPE part) and ``intermediate_size`` (the dense layers') keep the names the
    Llama engine's machinery reads."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_qo_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    rope_theta: float
    yarn: YarnRope | None
    rope_interleave: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    first_k_dense_replace: int
    moe: MoEConfig | None
    routing: DeepSeekRouting | None
    num_kv_heads: int = 1
    head_dim: int = ROPE_HEAD_DIM
    qk_norm: bool = False
    fp8: Any = None  # the FP8 layout (fi_engine.checkpoint.quantization.Fp8Scheme): deepseek_fp8_scheme; None: 16-bit
    # how tensor parallelism splits the routed experts (EXPERT_SPLITS): "columns", a slice of every expert's
    # intermediate columns on each rank; "experts", whole experts [r E/N, (r + 1) E/N) on rank r of N
    expert_split: str = "columns"
    # in the per-rank config of the "experts" split, the N ranks the routed experts are divided among (each holds
    # local_experts of them whole, and 1/N of the shared experts' columns); 1 otherwise
    expert_parts: int = 1

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def shared_intermediate(self) -> int:
        """The shared experts' intermediate size (``moe_intermediate_size * n_shared_experts``; 0 without); in the
        per-rank config of the ``"experts"`` split, this rank's columns of it (divided by ``expert_parts``: the
        routed experts are whole there, the shared ones still split by columns)."""
        if self.moe is None or self.routing is None:
            return 0
        return self.moe.intermediate_size * self.routing.n_shared_experts // self.expert_parts

    @property
    def local_experts(self) -> int:
        """The routed experts one rank holds: every one (one GPU, or the ``"columns"`` split, a slice of each), or
        ``num_experts / expert_parts`` whole ones (the ``"experts"`` split); 0 without routed experts."""
        return 0 if self.moe is None else self.moe.num_experts // self.expert_parts

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` (from 0) has routed experts: a MoE model's layers from ``first_k_dense_replace``."""
        return self.moe is not None and i >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """``1 / sqrt(qk_nope + qk_rope)``, times ``mscale(factor, mscale_all_dim)^2`` with YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            m = yarn_mscale(self.yarn.factor, self.yarn.mscale_all_dim)
            scale *= m * m
        return scale

    def inv_freq(self) -> tuple[np.ndarray, float]:
        """float64 inverse frequencies ``[qk_rope_head_dim / 2]`` and the factor cos/sin are scaled by."""
        dim = self.qk_rope_head_dim
        base = self.rope_theta
        pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        y = self.yarn
        if y is None:
            return 1.0 / pos_freqs, 1.0
        attention = y.scale()
        low, high = yarn_ramp(dim, base, y.original_max_position_embeddings, y.beta_fast, y.beta_slow, y.truncate)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv = (1.0 / (y.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv, float(attention)

    def cos_sin_cache(self, positions: int) -> np.ndarray:
        """float32 ``[positions + 1, qk_rope_head_dim]``: ``attention * cos(p * inv_freq)`` then
        ``attention * sin(...)`` per row (the layout ``apply_rope_with_cos_sin_cache`` reads); one spare row, since
        the interleaved kernel reads a little past the last row."""
        inv, attention = self.inv_freq()
        # float32 products, as transformers computes them (positions beyond 2^24 would lose integer precision)
        freqs = np.arange(positions + 1, dtype=np.float32)[:, None] * inv.astype(np.float32)[None, :]
        table = np.concatenate([np.cos(freqs), np.sin(freqs)], axis=1) * np.float32(attention)
        return np.ascontiguousarray(table, dtype=np.float32)

    def tensor_parallel_shard(self, tensor_parallel: int) -> DeepSeekConfig:
        """The per-rank shape of this model split ``tensor_parallel`` ways (what
        :func:`~fi_engine.layers.tensor_parallel.shard_config` returns for it): the MLA heads divided (each rank
        keeps its heads' rows of ``q_b_proj`` / ``q_proj`` and ``kv_b_proj`` and their columns of ``o_proj``; the
        latent projections, their norms and the latent cache are whole on every rank, so ``num_kv_heads`` stays 1),
        the dense layers' MLP columns and the shared experts' intermediate columns divided (the router whole), and
        the routed experts by ``expert_split``: every expert's intermediate columns divided (``"columns"``), or the
        experts themselves (``"experts"``: ``moe`` unchanged, the routing over every expert, ``expert_parts`` set to
        ``tensor_parallel``, each rank holding :attr:`local_experts` whole). ``tensor_parallel`` is an int >= 1
        (the caller checks it).

        Raises:
            ValueError: naming ``tensor_parallel``, the config key and the sizes it must divide.
        """
        n = tensor_parallel
        checked = [("MLA heads", "num_attention_heads", self.num_qo_heads)]
        if self.first_k_dense_replace:  # dense MLP layers (every layer of a model without routed experts)
            checked.append(("dense MLP columns", "intermediate_size", self.intermediate_size))
        by_expert = self.expert_split == "experts" and self.moe is not None
        if by_expert:
            assert self.moe is not None
            checked.append(("routed experts", "n_routed_experts", self.moe.num_experts))
            checked.append(
                ("shared expert columns", "moe_intermediate_size * n_shared_experts", self.shared_intermediate)
            )
        elif self.moe is not None:  # the shared experts' columns are n_shared_experts times these
            checked.append(("expert intermediate columns", "moe_intermediate_size", self.moe.intermediate_size))
        refuse_undivided(n, checked)
        moe, parts = self.moe, n if by_expert else 1
        if moe is not None and not by_expert:
            moe = dataclasses.replace(moe, intermediate_size=moe.intermediate_size // n)
        # a model whose every layer routes never runs intermediate_size: rounded up, it only sizes a buffer
        return dataclasses.replace(
            self, num_qo_heads=self.num_qo_heads // n, intermediate_size=-(-self.intermediate_size // n), moe=moe,
            expert_parts=parts,
        )  # fmt: skip

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> DeepSeekConfig:
        """Read ``model_dir/config.json`` (errors name the file)."""
        return cls.from_dict(_read(model_dir), source=str(Path(model_dir) / "config.json"))

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> DeepSeekConfig:
        """Parse a DeepSeek-V2/V3 config dict; ``source`` names it in errors (ValueError)."""
        if not isinstance(source, str):
            raise TypeError(f"source: expected a str naming where the config came from, got {type(source).__name__}")
        if not isinstance(d, dict):
            raise ValueError(f"d: expected a JSON object (a dict) from {source}, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in DEEPSEEK_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {show(model_type)} is not a DeepSeek-V2/V3 checkpoint")
        fp8 = deepseek_fp8_scheme(d, source)
        silu_without_biases(d, source, "DeepSeek")
        kv_rank = size(d, "kv_lora_rank", source)
        rope_dim = size(d, "qk_rope_head_dim", source)
        if kv_rank != KV_LORA_RANK or rope_dim != ROPE_HEAD_DIM:
            raise ValueError(
                f"{source}: kv_lora_rank {kv_rank} / qk_rope_head_dim {rope_dim}: the MLA kernels serve "
                f"kv_lora_rank {KV_LORA_RANK} and qk_rope_head_dim {ROPE_HEAD_DIM} (every DeepSeek-V2/V3 model)"
            )
        q_rank = d.get("q_lora_rank")
        if q_rank is not None:
            q_rank = size(d, "q_lora_rank", source)
        nope = size(d, "qk_nope_head_dim", source)
        v_dim = size(d, "v_head_dim", source)
        for name, value in (("qk_nope_head_dim", nope), ("v_head_dim", v_dim)):
            if value % 8:
                raise ValueError(f"{source}: {name} ({value}) must be a multiple of 8 (16-byte aligned head rows)")
        eps = d.get("rms_norm_eps", 1e-6)
        if not _finite(eps) or not eps > 0:
            raise ValueError(f"{source}: rms_norm_eps must be a finite number > 0, got {show(eps)}")
        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ValueError(f"{source}: tie_word_embeddings must be true or false, got {show(tie)}")
        interleave = d.get("rope_interleave", True) if model_type == "deepseek_v3" else True
        if not isinstance(interleave, bool):
            raise ValueError(f"{source}: rope_interleave must be true or false, got {show(interleave)}")
        layers = size(d, "num_hidden_layers", source)
        theta, yarn = _rope(d, source)
        moe, routing, first_dense = _moe(d, model_type, layers, source)
        heads = size(d, "num_attention_heads", source)
        return cls(
            model_type=model_type,
            vocab_size=size(d, "vocab_size", source),
            hidden_size=size(d, "hidden_size", source),
            intermediate_size=size(d, "intermediate_size", source),
            num_layers=layers,
            num_qo_heads=heads,
            q_lora_rank=q_rank,
            kv_lora_rank=kv_rank,
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope_dim,
            v_head_dim=v_dim,
            rms_norm_eps=float(eps),
            rope_theta=theta,
            yarn=yarn,
            rope_interleave=interleave,
            tie_word_embeddings=tie,
            max_position_embeddings=size(d, "max_position_embeddings", source, 4096),
            eos_token_ids=eos_ids(d.get("eos_token_id"), size(d, "vocab_size", source), source),
            first_k_dense_replace=first_dense,
            moe=moe,
            routing=routing,
            fp8=fp8,
        )


def is_deepseek(model_dir: str | Path) -> bool:
    """True when ``model_dir/config.json`` names a DeepSeek-V2/V3 model type (False when unreadable: the Llama
    engine's parser then reports the problem)."""
    if not isinstance(model_dir, (str, os.PathLike)):  # a wrong argument is an error, not "not DeepSeek"
        read_config_json(model_dir)
    try:
        d = _read(model_dir)
    except ValueError:
        return False
    return isinstance(d, dict) and d.get("model_type") in DEEPSEEK_MODEL_TYPES


def _read(model_dir: str | Path) -> Any:
    return read_config_json(model_dir)[0]


def _finite(value: Any) -> bool:
    """A JSON number a float64 holds finitely (no bool, no NaN or infinity, no integer past 2**1023)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 1 << 1000 if isinstance(value, int) else math.isfinite(value)


def _number(params: dict[str, Any], key: str, source: str, default: float | None = None, zero: bool = False) -> float:
    value = params.get(key, default)
    if value is None and default is None:
        raise ValueError(f"{source}: rope {key} is missing (a number > 0)")
    if value is None or not _finite(value) or not (value >= 0 if zero else value > 0):
        raise ValueError(f"{source}: rope {key} must be a finite number {'>= 0' if zero else '> 0'}, got {show(value)}")
    return float(value)


def _rope(d: dict[str, Any], source: str) -> tuple[float, YarnRope | None]:
    params, scaling = d.get("rope_parameters"), d.get("rope_scaling")
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{source}: {name} must be an object or null, got {show(value)}")
    merged = rope_settings(d)  # both checked above: objects or null
    kind = merged.get("rope_type", merged.get("type", "default"))
    theta = _number(merged, "rope_theta", source, 10000.0)
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ValueError(
            f"{source}: rope_type (or type) {show(kind)} is not supported for DeepSeek; supported: 'default' and 'yarn'"
        )
    original = merged.get("original_max_position_embeddings")
    factor = merged.get("factor")
    if factor is None and original is not None:  # transformers: the ratio of the context lengths
        original = size(merged, "original_max_position_embeddings", source)
        factor = size(d, "max_position_embeddings", source) / original
    attention = merged.get("attention_factor")
    truncate = merged.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"{source}: rope truncate must be true or false, got {show(truncate)}")
    return theta, YarnRope(
        factor=_number({"factor": factor}, "factor", source),
        original_max_position_embeddings=size(merged, "original_max_position_embeddings", source),
        beta_fast=_number(merged, "beta_fast", source, 32.0) if merged.get("beta_fast") is not None else 32.0,
        beta_slow=_number(merged, "beta_slow", source, 1.0) if merged.get("beta_slow") is not None else 1.0,
        mscale=_number(merged, "mscale", source, 0.0, zero=True) if merged.get("mscale") is not None else 0.0,
        mscale_all_dim=(
            _number(merged, "mscale_all_dim", source, 0.0, zero=True)
            if merged.get("mscale_all_dim") is not None
            else 0.0
        ),
        attention_factor=None if attention is None else _number(merged, "attention_factor", source),
        truncate=truncate,
    )


def _moe(
    d: dict[str, Any], model_type: str, layers: int, source: str
) -> tuple[MoEConfig | None, DeepSeekRouting | None, int]:
    experts = d.get("n_routed_experts")
    first = d.get("first_k_dense_replace", 0 if model_type == "deepseek_v2" else 3)
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= MAX_SIZE:
        raise ValueError(f"{source}: first_k_dense_replace must be an integer in [0, {MAX_SIZE}], got {show(first)}")
    if experts is None:
        return None, None, layers  # every layer dense
    experts = size(d, "n_routed_experts", source)
    if size(d, "moe_layer_freq", source, 1) != 1:
        raise ValueError(f"{source}: moe_layer_freq > 1 (MoE every other layer) is not supported; expected 1")
    k = size(d, "num_experts_per_tok", source)
    if k > experts:
        raise ValueError(f"{source}: num_experts_per_tok ({k}) exceeds the {experts} routed experts")
    default_method = "noaux_tc" if model_type == "deepseek_v3" else "greedy"
    method = d.get("topk_method", default_method)
    scoring = d.get("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax")
    if model_type == "deepseek_v3" and (method, scoring) != ("noaux_tc", "sigmoid"):
        raise ValueError(
            f"{source}: topk_method {show(method)} with scoring_func {show(scoring)}: DeepSeek-V3 routing is "
            f"'noaux_tc' "
            f"with 'sigmoid' scores"
        )
    if model_type == "deepseek_v2" and (method not in ("greedy", "group_limited_greedy") or scoring != "softmax"):
        raise ValueError(
            f"{source}: topk_method {show(method)} with scoring_func {show(scoring)}: DeepSeek-V2 routing is "
            f"'greedy' or "
            f"'group_limited_greedy' with 'softmax' scores"
        )
    grouped = method != "greedy"
    n_group = size(d, "n_group", source, 1) if grouped else 1
    topk_group = size(d, "topk_group", source, n_group) if grouped else 1
    if experts % n_group or topk_group > n_group:
        raise ValueError(
            f"{source}: n_group ({n_group}) must divide n_routed_experts ({experts}) and topk_group ({topk_group}) "
            f"must not exceed it"
        )
    if grouped and k > topk_group * (experts // n_group):
        raise ValueError(f"{source}: num_experts_per_tok ({k}) exceeds the experts of topk_group ({topk_group}) groups")
    if method == "noaux_tc" and experts // n_group < 2:
        raise ValueError(f"{source}: noaux_tc ranks a group by its two best experts; groups need >= 2 experts")
    renorm = d.get("norm_topk_prob", model_type == "deepseek_v3")
    if not isinstance(renorm, bool):
        raise ValueError(f"{source}: norm_topk_prob must be true or false, got {show(renorm)}")
    scale = d.get("routed_scaling_factor", 2.5 if model_type == "deepseek_v3" else 1.0)
    if not _finite(scale) or not scale > 0:
        raise ValueError(f"{source}: routed_scaling_factor must be a finite number > 0, got {show(scale)}")
    shared = d.get("n_shared_experts")
    shared = 0 if shared is None else shared
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared <= MAX_SIZE:
        raise ValueError(f"{source}: n_shared_experts must be an integer in [0, {MAX_SIZE}], got {show(shared)}")
    moe = MoEConfig(experts, k, size(d, "moe_intermediate_size", source), renorm)
    routing = DeepSeekRouting(method, scoring, n_group, topk_group, float(scale), shared)
    return moe, routing, min(first, layers)


DEQUANTIZED_BESIDE_EXPERTS = "MLA, dense-MLP and shared-expert projections"
"""What an FP8 DeepSeek checkpoint has dequantized to the 16-bit type at load where its routed experts stay e4m3
(``Fp8Scheme.dequantized``)."""


def deepseek_fp8_scheme(d: dict[str, Any], source: str) -> Fp8Scheme | None:
    """The FP8 layout a DeepSeek-V3 / V2 config ``d`` (from ``source``) declares (DeepSeek-V3's published form:
    ``quant_method: "fp8"``, 128x128 blocks, every linear e4m3 but the routers, norms, embedding and LM head), or
    None without a ``quantization_config``. The routed experts stay e4m3 where their scales are blocks the FP8 grouped
    GEMV takes (``stored_experts``; DeepSeek-V3's 128x128 blocks; the engine checks their shapes and shares at load,
    :meth:`~fi_engine.checkpoint.quantization.Fp8Scheme.experts_for`); every other e4m3 projection is dequantized to
    the 16-bit type as it is read (``dequantized`` :data:`DEQUANTIZED_BESIDE_EXPERTS`): MLA's ``kv_b_proj`` is split
    per head into the absorbed factors, ``kv_a_proj_with_mqa`` into the latent and RoPE parts, and the dense MLPs and
    shared experts run the 16-bit GEMMs. Experts of other scales are dequantized too (``dequantized`` ``"every
    projection"``, also ``dequantized_with_experts``): per-row and per-tensor scales, which DeepSeek does not publish,
    gave greedy tokens off the dequantizing load's on the GPU where blocks matched it. ValueError naming the key and
    the way out: another quantization, compressed-tensors' block strategy."""
    scheme = served_fp8_scheme(d, source, "bfloat16 or float16 weights and FP8 (e4m3) ones")
    if scheme is None:
        return None
    every = dataclasses.replace(scheme, dequantized="every projection", dequantized_with_experts="every projection")
    if d.get("n_routed_experts") and scheme.scales == "block" and scheme.grouped_gemv_takes():
        return dataclasses.replace(every, dequantized=DEQUANTIZED_BESIDE_EXPERTS, stored_experts=True)
    return every


def fp8_shard_refusal(cfg: DeepSeekConfig, tensor_parallel: int) -> str | None:
    """Why ``tensor_parallel`` ranks cannot split this FP8 checkpoint's e4m3 projections, naming the first one whose
    rank's share would cut a block of scales (each rank reads and dequantizes only its own blocks), or None where
    they can (one GPU, a 16-bit checkpoint, per-row or per-tensor scales, which any cut keeps). The shares: the MLA
    heads' rows of ``q_b_proj`` (``q_proj``) and ``kv_b_proj`` and their columns of ``o_proj``; the dense MLPs',
    the shared experts' and the routed experts' intermediate rows of gate/up and columns of down. ValueError first
    (:meth:`DeepSeekConfig.tensor_parallel_shard`) where ``tensor_parallel`` does not divide those sizes."""
    if not isinstance(cfg, DeepSeekConfig):
        raise TypeError(f"cfg: expected a DeepSeekConfig (DeepSeekConfig.from_dir), got {type(cfg).__name__}")
    tensor_parallel = arg_int("tensor_parallel", tensor_parallel, 1, MAX_PARTS)
    if tensor_parallel == 1 or cfg.fp8 is None or cfg.fp8.block is None:
        return None
    cfg.tensor_parallel_shard(tensor_parallel)  # sizes that do not divide: refused first, naming the key
    heads, a = cfg.num_qo_heads, "self_attn."
    q = "q_proj" if cfg.q_lora_rank is None else "q_b_proj"
    stacks = [(a + q, heads * cfg.qk_head_dim), (a + "kv_b_proj", heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))]
    row_parallel = [(a + "o_proj", heads * cfg.v_head_dim)]
    mlps = [("mlp.", cfg.intermediate_size)] if cfg.first_k_dense_replace else []
    if cfg.moe is not None:
        if cfg.expert_split == "columns":  # (split by expert, each rank reads whole experts: every block whole)
            mlps.append(("mlp.experts.N.", cfg.moe.intermediate_size))
        if cfg.shared_intermediate:
            mlps.append(("mlp.shared_experts.", cfg.shared_intermediate))
    for prefix, inter in mlps:
        stacks += [(prefix + "gate_proj", inter), (prefix + "up_proj", inter)]
        row_parallel.append((prefix + "down_proj", inter))
    # each projection is its own stack: a rank's cut of each is whole blocks (the engine stacks a routed expert's gate
    # and up codes, or the other projections' dequantized values, after cutting them)
    return cfg.fp8.shard_refusal([[part] for part in stacks], row_parallel, tensor_parallel)

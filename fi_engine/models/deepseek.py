"""A DeepSeek-V3 / DeepSeek-V2 serving engine without torch: :class:`~fi_engine.models.llama.LlamaEngine`'s serving
loop, buffers of the step index arrays, embedding, norms, LM head and sampling, with the DeepSeek layer body.

::

    from fi_engine.models.deepseek import DeepSeekEngine

    with DeepSeekEngine("/path/to/DeepSeek-V2-Lite", max_batch=8) as engine:
        result = engine.generate([[100000, 791, 6864]], max_new_tokens=32)

Per layer, for ``T`` token rows, ``H`` heads, ``dn``/``dr``/``dv`` the no-RoPE, RoPE and value head dims and
``R = 512`` the latent (``kv_lora_rank``) (:mod:`fi_engine.models.deepseek_config`):

1. queries: ``q = q_b_proj(rmsnorm(q_a_proj(x)))`` (or ``q_proj(x)`` without ``q_lora_rank``) ``[T, H, dn + dr]``;
2. latent KV: ``c = rmsnorm(kv_a_proj(x)[:, :R])`` ``[T, R]`` and ``k_pe = kv_a_proj(x)[:, R:]`` ``[T, dr]``;
3. RoPE (plain or YaRN, from a float32 cos/sin table; interleaved pairs as DeepSeek lays them out) on each
   head's ``q_pe`` and on ``k_pe``; ``(c, k_pe)`` appended to the paged MLA cache (one shared "head");
4. absorption (:mod:`fi_engine.models.mla_weights`): ``q_abs[h] = q_nope[h] @ W_k[h]`` ``[T, H, R]`` (one strided
   batched GEMM over the heads);
5. MLA attention over the cached latents (``batch_mla_run``: scores ``q_abs . c + q_pe . k_pe`` times the
   softmax scale of the *unabsorbed* head dim, ``(dn + dr)^-1/2`` with YaRN's ``mscale_all_dim`` factor; output
   the weighted latents ``o [T, H, R]``);
6. values: ``attn[h] = o[h] @ W_v[h]^T`` (a second batched GEMM), then ``o_proj``;
7. MLP: the first ``first_k_dense_replace`` layers a dense SwiGLU; the rest routed experts
   (:class:`~fi_engine.layers.moe.MoELayer`'s grouped GEMMs, routed on the host by
   :func:`~fi_engine.layers.deepseek_routing.grouped_topk`) plus the shared experts (a SwiGLU added into the same
   output by the down projection's GEMM).

Prefill takes the same absorbed path as decode (the MLA kernel with a causal mask over each request's rows): one
code path and one cache format (only the latents are ever stored), at the cost of more attention FLOPs per prompt
token than expanding K and V to ``H`` heads would need (``R + dr = 576`` against ``dn + dr = 192`` per head for
V3); docs/engine.md says so.

CUDA graph (``cuda_graph=True``): the decode step is captured at each batch size of the ladder up to ``max_batch`` rows
(:func:`~fi_engine.runtime.worker.graph_shapes.decode_batches`), as the Llama engine's. The MLA plan is made on the host
before every replay into the decode workspace (its schedule layout is fixed for a fixed batch of one-row requests: the
engine checks it), the step's index arrays go into the graph's fixed buffers, and the MoE layers take
:meth:`~fi_engine.layers.moe.MoELayer.forward_static_routed`'s fixed-capacity path, routed on the device: the models
wheel's fused ``NoAuxTc`` kernel where it applies (:func:`fused_routing_blocker`), else
:class:`~fi_engine.layers.deepseek_routing.DeviceGroupedTopk` (V2's softmax routing included). Prefill stays eager.

Tensor parallelism (``tensor_parallel=N``, :mod:`fi_engine.layers.tensor_parallel`;
:meth:`~fi_engine.models.deepseek_config.DeepSeekConfig.tensor_parallel_shard` the per-rank shape): each rank keeps
``H / N`` of the MLA heads -- their rows of ``q_b_proj`` (``q_proj``) and of ``kv_b_proj`` (so their absorbed
factors), their columns of ``o_proj`` -- and plans and runs the MLA kernels over those heads; ``q_a_proj``,
``kv_a_proj_with_mqa``, their norms and the latent cache are whole on every rank (each computes and caches the same
latents: the cache is one shared "head", which no split would shrink). The dense layers' SwiGLU and every shared
and routed expert split by intermediate columns (gate/up rows, down columns; the routed experts through the Llama
family's MoE loader), the router and its correction bias whole, so every rank routes every token alike
(group-limited routing unchanged) and each expert's output is a partial sum. The O and down projections' partial
sums are summed by the all-reduce that adds the residual and applies the next RMSNorm, as Llama's; the embedding and
LM head split by vocabulary rows. FP8 checkpoints: each rank reads only its share (its cut of the routed experts'
codes and scales, kept e4m3; the other projections' dequantized), so a share must hold whole 128x128 blocks of scales
(refused by name otherwise: :func:`~fi_engine.models.deepseek_config.fp8_shard_refusal`).
``expert_split="experts"`` splits the routed experts by expert instead: rank ``r`` of ``N`` holds experts
``[r E/N, (r + 1) E/N)`` whole (FP8: their codes and scales as stored), routes every token over all ``E`` as every rank
does, and serves only its own assignments (the others renumbered past its experts with weight 0:
:func:`~fi_engine.layers.moe_routing.local_assignments` on the host,
:meth:`~fi_engine.layers.moe.MoELayer.keep_local_experts` on the device in the graph); the shared experts still split
by columns, and the same all-reduce sums the ranks' outputs (docs/tensor-parallel.md).

Refused with a message naming the field (:meth:`DeepSeek.check`, the hook every family definition refuses
through): a tensor-parallel size that does not divide the heads or the MLP columns or that cuts an FP8 block, a CUDA
graph for a routing the device kernel cannot do (``n_group`` above
:data:`~fi_engine.layers.deepseek_routing.MAX_DEVICE_GROUPS`).

FP8 checkpoints (DeepSeek-V3's published form: e4m3 projections with 128x128 block scales ``weight_scale_inv``; the
routers, norms, embedding and LM head 16-bit; :attr:`DeepSeekConfig.fp8
<fi_engine.models.deepseek_config.DeepSeekConfig.fp8>`): the routed experts -- nearly all of V3's weights -- stay
e4m3 on the GPU, each rank's cut of every expert's codes and scales as stored (the Llama family's reader,
:func:`~fi_engine.models.llama.load_moe_layer`), and the MoE layers (``MoELayer(fp8_experts=...)``) read them with
the FP8 grouped GEMV (:class:`~fi_engine.kernels.fp8_moe_gemv.Fp8GroupedGemv`: one byte a weight) for every step of at
most ``max_batch`` rows, eager (the host routing written into the layer's fixed-capacity buffers) and in the decode
graph (the device routing) alike; longer prefills route on the host through the grouped GEMMs over a 16-bit copy of
the layer's experts, written before each layer into one buffer every layer shares (one layer's experts: 22.5 GB
for V3 on one GPU, 2.8 GB a rank at TP 8). The routing -- grouped top-k, the correction bias, the renormalized
weights times ``routed_scaling_factor`` -- is the 16-bit experts' (:mod:`~fi_engine.layers.deepseek_routing`); the
combine sums the same weights. Every other e4m3 projection -- MLA's, the dense MLPs', the shared experts' -- is
dequantized to the embedding's 16-bit type as it is read (:meth:`~fi_engine.models.weights.WeightLoader.linear`):
MLA's ``kv_b_proj`` must be 16-bit for the absorbed per-head GEMMs, and the rest follow so one load path serves both
forms (they are a few percent of V3's weights). With
:attr:`~fi_engine.runtime.worker.model_runner.ModelRunner.fp8_experts_as_stored` off (or shapes the grouped GEMV
cannot read, :meth:`~fi_engine.checkpoint.quantization.Fp8Scheme.experts_for`) the routed experts are dequantized as
well, and the GPU holds and runs what a bfloat16 conversion of the checkpoint (DeepSeek's ``fp8_cast_bf16.py``) would
give it. ``fi-engine serve``'s start-up line names which (:meth:`Fp8Scheme.describe
<fi_engine.checkpoint.quantization.Fp8Scheme.describe>`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..checkpoint.safetensors import Checkpoint
from ..kernels import flashinfer as kernels
from ..layers.deepseek_routing import DeviceGroupedTopk, device_routing_blocker, grouped_topk
from ..layers.moe_routing import group_by_expert, group_local, local_assignments
from ..layers.tensor_parallel import allocate_rank_buffers, columns, rows
from ..runtime.engine import Engine
from ..runtime.family import ModelFamily
from ..runtime.sched.step_arrays import kv_lengths
from ..runtime.settings import with_settings
from .decode_queries import DecodeQueryOffsets
from .deepseek_config import EXPERT_SPLITS, DeepSeekConfig, fp8_shard_refusal
from .llama import load_moe_layer
from .mla_weights import split_kv_b
from .registry import family_config_json
from .weights import WeightLoader

__all__ = ["DeepSeek", "DeepSeekEngine", "fused_routing_blocker", "graph_blocker"]

FUSED_ROUTING_MODULE = "dsv3_fused_routing"  # the models wheel's NoAuxTc kernel


def fused_routing_blocker(c: DeepSeekConfig) -> str | None:
    """Why the models wheel's fused routing kernel (``NoAuxTc``, :func:`fi_ffi.fused_topk_deepseek`)
    cannot route this model's experts, or None when it can (its availability in the kernel lock aside): it computes
    V3's ``noaux_tc`` with renormalized weights, within its size limits
    (:func:`fi_ffi.routing_limits`)."""

    if not isinstance(c, DeepSeekConfig):
        raise TypeError(f"c: expected a DeepSeekConfig (DeepSeekConfig.from_dir), got {type(c).__name__}")
    if c.moe is None or c.routing is None:
        return "the model has no MoE layers"
    if c.routing.method != "noaux_tc":
        return f"topk_method {c.routing.method!r} (DeepSeek-V2's softmax routing) is not the kernel's noaux_tc"
    if not c.moe.renormalize:
        return "the kernel always renormalizes the chosen weights, and norm_topk_prob is false"
    try:
        kernels.routing_limits(c.moe.num_experts, c.routing.n_group, c.routing.topk_group, c.moe.top_k)
    except ValueError as exc:
        return f"beyond the kernel's limits ({exc})"
    return None


def graph_blocker(c: DeepSeekConfig) -> str | None:
    """Why the decode step of this model cannot be captured as a CUDA graph (the config field named), or None: its
    MoE layers must route on the device, by the fused kernel or, where that does not apply,
    :class:`~fi_engine.layers.deepseek_routing.DeviceGroupedTopk`."""
    if not isinstance(c, DeepSeekConfig):
        raise TypeError(f"c: expected a DeepSeekConfig (DeepSeekConfig.from_dir), got {type(c).__name__}")
    if c.routing is None or c.moe is None or fused_routing_blocker(c) is None:
        return None
    return device_routing_blocker(c.routing)


class _DeepSeekWeights(WeightLoader):
    """The loader of DeepSeek checkpoints: an e4m3 tensor where config.json declares no FP8 layout is refused saying
    what is missing."""

    def cut(self, prefix: str, shape: tuple[int, int], rank: int, ranks: int, axis: int) -> np.ndarray:
        """Projection ``prefix``'s weight ``shape`` ``(n, k)`` in the loader's 16-bit type, cut to rank ``rank``'s
        block of ``ranks``: ``axis`` 0 its output rows (column-parallel), 1 its input columns (row-parallel);
        ``ranks`` 1 keeps it whole. An e4m3 weight is cut in its codes and scales, then only this rank's blocks are
        dequantized (the same values as the dequantized whole's cut: dequantization is per element); the family's
        check has refused a ``ranks`` whose cut would split a block of scales
        (:func:`~fi_engine.models.deepseek_config.fp8_shard_refusal`)."""
        name = prefix + ".weight"
        if ranks > 1 and self.fp8 is not None and name in self.ckpt and self.ckpt.info(name).dtype == "float8_e4m3fn":
            from ..checkpoint.fp8_weights import read_fp8_linear

            m = read_fp8_linear(self.ckpt, self.fp8, prefix, shape, gemv=False)
            lo, hi = rank * shape[axis] // ranks, (rank + 1) * shape[axis] // ranks
            return self._dequantized(prefix, m.rows(lo, hi) if axis == 0 else m.columns(lo, hi))
        whole = self.linear(prefix, shape)
        return whole if ranks == 1 else (rows if axis == 0 else columns)(whole, rank, ranks)

    def swiglu(self, prefix: str, inter: int, hidden: int, rank: int, ranks: int) -> tuple[np.ndarray, np.ndarray]:
        """A SwiGLU MLP's (``prefix`` + ``gate_proj``, ``up_proj``, ``down_proj``; ``inter`` its whole
        intermediate size) weights on rank ``rank`` of ``ranks``: ``gate_up [2 * inter / ranks, hidden]`` (its
        gate rows, then its up rows: what ``silu_and_mul`` pairs) and ``down [hidden, inter / ranks]`` (its
        columns: a partial sum of the output)."""
        gate_up = [self.cut(prefix + x, (inter, hidden), rank, ranks, 0) for x in ("gate_proj", "up_proj")]
        return np.concatenate(gate_up), self.cut(prefix + "down_proj", (hidden, inter), rank, ranks, 1)

    def mismatch_hint(self, got: str) -> str:
        if "8" in got and self.fp8 is None:
            return "; config.json declares no quantization_config, so this checkpoint's FP8 scales are not read"
        return super().mismatch_hint(got) if "8" in got else ""


class DeepSeek(ModelFamily):
    """The DeepSeek-V3 / V2 family's definition (module docstring): its config and refusals, weights (MLA with the
    absorbed ``kv_b_proj``, dense and routed MLP layers with shared experts, the routing's correction bias), the MLA
    + MoE layer body with its host, fused-kernel and device routings, and the MLA plans."""

    fp8_kv_refusal = "MLA (DeepSeek's compressed KV cache)"
    fused_routing_used = False  # whether the MoE layers route with the fused kernel (decided by load)
    first_expert = 0  # the first routed expert this rank holds whole (the "experts" split; decided by load)

    def __init__(self, fused_routing: bool | None = None, expert_split: str = "columns") -> None:
        """``fused_routing``, ``expert_split``: :class:`DeepSeekEngine`'s arguments of those names."""
        if fused_routing is not None and not isinstance(fused_routing, bool):
            raise ValueError(
                f"fused_routing: expected None (where it applies), True or False, got {fused_routing!r:.40}"
            )
        if not isinstance(expert_split, str) or expert_split not in EXPERT_SPLITS:
            raise ValueError(
                f"expert_split: expected one of {', '.join(map(repr, EXPERT_SPLITS))} (how tensor parallelism "
                f"splits the routed experts), got {expert_split!r:.40}"
            )
        self.fused_routing_request = fused_routing
        self.expert_split = expert_split

    def check(self, eng: Any, cfg: Any) -> None:
        """Refuse what this engine cannot serve, before any GPU work (the Llama engine calls this hook with
        ``tensor_parallel`` and ``cuda_graph`` set): a config that is not a DeepSeekConfig, an FP8 checkpoint whose
        ``tensor_parallel`` shards would cut a block of scales (naming the projection; sizes that do not divide are
        refused next, by :meth:`DeepSeekConfig.tensor_parallel_shard
        <fi_engine.models.deepseek_config.DeepSeekConfig.tensor_parallel_shard>`), a CUDA graph whose MoE routing has
        no device path."""
        if not isinstance(cfg, DeepSeekConfig):
            raise ValueError(
                f"model: DeepSeekEngine serves deepseek_v2 / deepseek_v3 checkpoints, got a {type(cfg).__name__}"
            )
        n = eng.tensor_parallel
        if cfg.expert_split == "experts" and cfg.moe is None:
            raise ValueError("expert_split: 'experts' splits the routed experts, and this model has none (every "
                             "layer a dense MLP); pass expert_split='columns'")  # fmt: skip
        why = fp8_shard_refusal(cfg, n)
        if why is not None:
            raise ValueError(f"tensor_parallel: {n}: {why}; pick a tensor_parallel whose shards hold whole blocks of "
                             f"scales, or serve a bfloat16 copy")  # fmt: skip
        why = graph_blocker(cfg)
        if eng.cuda_graph and why is not None:
            raise ValueError(f"cuda_graph: {why}; pass cuda_graph=False (eager decode routes on the host)")

    def read_config(self, model_dir: str | Path) -> Any:
        """The checkpoint's ``config.json`` read by :meth:`DeepSeekConfig.from_dict
        <fi_engine.models.deepseek_config.DeepSeekConfig.from_dict>` (another family's model type: refused,
        naming its engine)."""
        cfg = DeepSeekConfig.from_dict(*family_config_json(model_dir, type(self)))
        return dataclasses.replace(cfg, expert_split=self.expert_split)

    # ------------------------------------------------------------------------------------------ loading

    def load(self, eng: Any, ckpt: Checkpoint) -> None:
        """The weights of this rank (``eng.rank`` of ``eng.tensor_parallel``; the whole model on one GPU): the
        embedding and LM head (whole, or this rank's vocabulary rows), per layer MLA (the latent projections
        ``q_a_proj`` / ``kv_a_proj_with_mqa`` and their norms whole; this rank's heads' rows of ``q_b_proj`` /
        ``q_proj`` and of ``kv_b_proj``, split into the absorbed factors of those heads; their columns of
        ``o_proj``), the dense MLP or the MoE layer (router and correction bias whole; every routed and shared
        expert's share of intermediate columns, or with the ``"experts"`` split this rank's routed experts whole)
        and the norms."""
        full, c = eng.model_config, eng.config  # the checkpoint's shapes; this rank's (heads, MLP columns)
        r, n = eng.rank, eng.tensor_parallel
        h, heads, dn, dr, dv, kv_rank = (
            full.hidden_size, full.num_qo_heads, full.qk_nope_head_dim, full.qk_rope_head_dim, full.v_head_dim,
            full.kv_lora_rank,
        )  # fmt: skip
        dtype = ckpt.info("model.embed_tokens.weight").dtype
        if dtype not in ("float16", "bfloat16"):  # FP8 checkpoints keep it 16-bit
            raise ValueError(f"model: weights are {dtype}; this engine serves float16 or bfloat16 checkpoints")
        # every upload kept alive by eng.device_arrays; an FP8 checkpoint's projections dequantized to dtype as read
        ld = _DeepSeekWeights.for_engine(eng, ckpt, dtype, fp8=full.fp8)
        ld.embedding_and_head(eng, full)  # whole, or this rank's vocabulary rows
        w = self.w = SimpleNamespace(
            q=[], qa=[], qa_norm=[], qb=[], ckv=[], kpe=[], kv_norm=[], uk_t=[], uv=[], o=[], gu=[], d=[],
            shared_gu=[], shared_d=[], bias=[], bias_arr=[], bias_dev=[], router=[],
        )  # fmt: skip
        eng.ln1, eng.ln2 = [], []
        eng.moe_layers = []
        self.fused_routing_used = self._choose_routing(eng)
        # the "experts" split: rank r holds routed experts [r E/N, (r + 1) E/N) whole, the others none of them
        local = c.local_experts
        self.first_expert = r * local if c.expert_parts > 1 else 0
        own = range(self.first_expert, self.first_expert + local) if c.expert_parts > 1 else None
        # decided once for every layer: routed experts the FP8 grouped GEMV reads (each rank's share) stay e4m3
        if own is None:
            self.experts_stored = c.moe is not None and ld.keeps_fp8_experts(eng, h, full.moe.intermediate_size)
        else:  # whole experts: no column share to fit (the fp8_experts_as_stored switch as keeps_fp8_experts reads it)
            scheme = ld.fp8.experts_for(h, full.moe.intermediate_size) if ld.fp8 is not None else None
            self.experts_stored = bool(scheme is not None and scheme.stored_experts and eng.fp8_experts_as_stored)
        # the decode graph's routing where the fused kernel does not serve (DeepSeek.check refused what neither does)
        self.device_topk = None
        if c.moe is not None and eng.static_moe and not self.fused_routing_used:
            assert c.routing is not None
            self.device_topk = DeviceGroupedTopk(c.routing, c.moe.num_experts, c.moe.top_k, c.moe.renormalize)
        qk = dn + dr
        for i in range(full.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            if full.q_lora_rank is None:
                w.q.append(ld.ptr(ld.cut(a + "q_proj", (heads * qk, h), r, n, 0)))  # this rank's heads
            else:
                q_rank = full.q_lora_rank
                w.qa.append(ld.ptr(ld.linear(a + "q_a_proj", (q_rank, h))))  # the query latent: whole
                w.qa_norm.append(ld.vector(ld.get(a + "q_a_layernorm.weight", (q_rank,))))
                w.qb.append(ld.ptr(ld.cut(a + "q_b_proj", (heads * qk, q_rank), r, n, 0)))
            kv_a = ld.linear(a + "kv_a_proj_with_mqa", (kv_rank + dr, h))  # the latent KV: whole on every rank
            # two GEMMs rather than one: the latent then goes through RMSNorm, the RoPE part into the cache,
            # each contiguous
            w.ckv.append(ld.ptr(kv_a[:kv_rank]))
            w.kpe.append(ld.ptr(kv_a[kv_rank:]))
            w.kv_norm.append(ld.vector(ld.get(a + "kv_a_layernorm.weight", (kv_rank,))))
            # this rank's heads' rows of kv_b (dn + dv rows a head, heads in order), split into their absorbed factors
            kv_b = ld.cut(a + "kv_b_proj", (heads * (dn + dv), kv_rank), r, n, 0)
            uk_t, uv = split_kv_b(kv_b, c.num_qo_heads, dn, dv)
            w.uk_t.append(ld.ptr(uk_t))
            w.uv.append(ld.ptr(uv))
            w.o.append(ld.ptr(ld.cut(a + "o_proj", (h, heads * dv), r, n, 1)))  # its heads' columns: a partial sum
            if full.is_moe_layer(i):
                if eng.moe_workspace is None:  # the grouped GEMMs' own (argument arrays, scratch)
                    eng.moe_workspace = kernels.workspace(eng.device)
                # router and experts as the Qwen3-MoE names them (mlp.gate, mlp.experts.N.{gate,up,down}_proj, or
                # transformers 5's fused mlp.experts.gate_up_proj / down_proj): the Llama engine's loader, which
                # keeps the whole router and this rank's share of every expert's intermediate columns (e4m3 codes
                # and scales where experts_stored)
                layer = load_moe_layer(eng, ckpt, p, ld, own)
                if own is None:
                    w.router.append(layer.weights.router)
                else:  # the layer holds its experts' router rows; every rank routes over the whole router
                    w.router.append(ld.upload(ld.linear(p + "mlp.gate", (full.moe.num_experts, h))))
                # 16-bit experts: DeepSeek's eager decode routes on the host through the grouped GEMM; its graph
                # keeps the same GEMM (not the 16-bit grouped GEMV), so the two give the same tokens. (e4m3 experts
                # take the FP8 grouped GEMV for every step of at most max_batch rows, eager and graph alike.)
                layer.gemv_tokens = 0
                eng.moe_layers.append(layer)
                bias = self._correction_bias(eng, ckpt, p + "mlp.gate.e_score_correction_bias")
                w.bias.append(bias)
                if bias is not None:  # the device routing (fused kernel, or the graph's fallback) reads it (float32)
                    dev = ld.upload(bias)
                    w.bias_arr.append(dev)
                    w.bias_dev.append(kernels.descriptor(dev.data.ptr, bias.shape, "float32", eng.device, owner=dev))
                else:
                    w.bias_arr.append(None)
                    w.bias_dev.append(None)
                si = full.shared_intermediate
                if si:  # split like a dense MLP: its down projection adds a partial sum into the routed output
                    gate_up, down = ld.swiglu(p + "mlp.shared_experts.", si, h, r, n)
                    w.shared_gu.append(ld.ptr(gate_up))
                    w.shared_d.append(ld.ptr(down))
                else:
                    w.shared_gu.append(0)
                    w.shared_d.append(0)
                w.gu.append(0)
                w.d.append(0)
            else:
                eng.moe_layers.append(None)
                w.router.append(None)
                w.bias.append(None)
                w.bias_arr.append(None)
                w.bias_dev.append(None)
                w.shared_gu.append(0)
                w.shared_d.append(0)
                gate_up, down = ld.swiglu(p + "mlp.", full.intermediate_size, h, r, n)
                w.gu.append(ld.ptr(gate_up))
                w.d.append(ld.ptr(down))
            eng.ln1.append(ld.vector(ld.get(p + "input_layernorm.weight", (h,))))
            eng.ln2.append(ld.vector(ld.get(p + "post_attention_layernorm.weight", (h,))))
        eng.final_norm = ld.vector(ld.get("model.norm.weight", (h,)))

    def _choose_routing(self, eng: Any) -> bool:
        """Whether the MoE layers route with the fused kernel (``fused_routing``, see the class docstring)."""
        request = self.fused_routing_request
        if request is False or eng.config.moe is None:
            if request:
                raise ValueError("fused_routing: the model has no MoE layers")
            return False
        why = fused_routing_blocker(eng.config)
        if why is None:
            from ..kernels.system import FiFFIError, module_source

            try:
                module_source(FUSED_ROUTING_MODULE)
            except FiFFIError as exc:
                why = f"the kernel lock has no {FUSED_ROUTING_MODULE} module (the models wheel): {exc}"
        if why is not None and request:
            raise ValueError(f"fused_routing: cannot use the fused routing kernel: {why}")
        return why is None

    def _correction_bias(self, eng: Any, ckpt: Checkpoint, name: str) -> np.ndarray | None:
        """V3's ``e_score_correction_bias`` as float32 on the host (transformers keeps it in float32; a bfloat16
        copy is widened), None for V2 routing."""
        c = eng.config
        assert c.routing is not None and c.moe is not None
        if c.routing.method != "noaux_tc":
            return None
        info = ckpt.info(name)
        arr = np.asarray(ckpt.array(name, (c.moe.num_experts,)))
        if info.dtype == "float32":
            return arr.astype(np.float32)
        if info.dtype == "bfloat16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        if info.dtype == "float16":
            return arr.astype(np.float32)
        raise ValueError(f"model: tensor {name!r} is {info.dtype}; expected float32 or bfloat16")

    def allocate(self, eng: Any) -> None:
        cp, c = eng.cupy, eng.config
        storage = np.float16 if eng.dtype == "float16" else np.uint16
        rows = max(eng.max_prefill_tokens, eng.max_batch)
        h, heads, dn, dr, dv, r = (
            c.hidden_size, c.num_qo_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank,
        )  # fmt: skip
        # widths: the Llama views (step_views) also describe qkv/attn/gu/act as [rows, (H + 2) * 64] etc.; the
        # buffers hold both shapes (those views are never used by this engine's forward)
        self.qw = max(heads * (dn + dr), (heads + 2) * dr)
        inter = max(c.intermediate_size, c.shared_intermediate)
        b = eng.buffers = SimpleNamespace(
            h=cp.empty((rows, h), storage),
            x=cp.empty((rows, h), storage),
            qkv=cp.empty((rows, self.qw), storage),
            qa=cp.empty((rows, c.q_lora_rank or 1), storage),
            qa_n=cp.empty((rows, c.q_lora_rank or 1), storage),
            ckv=cp.empty((rows, r), storage),
            ckv_n=cp.empty((rows, r), storage),
            kpe=cp.empty((rows, dr), storage),
            q_abs=cp.empty((rows, heads, r), storage),
            o_lat=cp.empty((rows, heads, r), storage),
            attn=cp.empty((rows, heads * max(dv, dr)), storage),
            gu=cp.empty((rows, 2 * inter), storage),
            act=cp.empty((rows, inter), storage),
            last=cp.empty((eng.max_batch, h), storage),
            logits=cp.empty((eng.max_batch, c.vocab_size), np.float32),
            ids=cp.empty(eng.max_batch, np.int32),
            ckv_cache=cp.zeros((c.num_layers, eng.num_pages, eng.page_size, r), storage),
            kpe_cache=cp.zeros((c.num_layers, eng.num_pages, eng.page_size, dr), storage),
        )
        # the router's float32 logits over every routed expert: the MoE layers' scratch, which has a column per
        # expert the layer holds, or with the "experts" split a buffer of their own
        self.router_logits: Any = None
        if c.moe is not None:
            by_expert = c.expert_parts > 1
            self.router_logits = (
                cp.empty((rows, c.moe.num_experts), np.float32) if by_expert else self.moe_scratch.logits
            )
        if self.fused_routing_used:  # the fused routing kernel's outputs
            assert c.moe is not None
            b.topk_w = cp.empty((rows, c.moe.top_k), np.float32)
            b.topk_i = cp.empty((rows, c.moe.top_k), np.int32)
        # the vocabulary shard's logits columns and argmaxes; the normalized rows in x, or x2 with the fused all-reduce
        eng.normed = allocate_rank_buffers(eng, b, rows, storage)
        positions = eng.max_seq_len  # rows 0..max_seq_len, one spare row for the interleaved kernel's read-ahead
        table = c.cos_sin_cache(positions + 1)
        self.cos_sin_dev = cp.asarray(table)
        self.cos_sin = kernels.descriptor(
            self.cos_sin_dev.data.ptr, (positions + 1, dr), "float32", eng.device, owner=self.cos_sin_dev
        )

        def per_layer(cache: Any, width: int) -> list[Any]:  # a descriptor of each layer's [pages, page, width]
            shape = (eng.num_pages, eng.page_size, width)
            return [
                kernels.descriptor(cache[i].data.ptr, shape, eng.dtype, eng.device, owner=cache)
                for i in range(c.num_layers)
            ]

        self.ckv_cache = per_layer(b.ckv_cache, r)
        self.kpe_cache = per_layer(b.kpe_cache, dr)
        self.kv_lens = np.zeros(eng.max_batch, np.int32)
        self.decode_queries = DecodeQueryOffsets(eng, device=False)  # (the MLA plan reads the host copy only)
        self.mla: dict[int, SimpleNamespace] = {}
        eng.allocate_steps()

    def _mla_views(self, eng: Any, rows: int) -> SimpleNamespace:
        """Descriptors of the MLA operands for ``rows`` token rows (made once per row count)."""
        m = self.mla.get(rows)
        if m is not None:
            return m
        if len(self.mla) > 256:
            self.mla.clear()
        c, b, dt, dev = eng.config, eng.buffers, eng.dtype, eng.device
        heads, dn, dr, r = c.num_qo_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank

        def t(arr: Any, shape: tuple[int, ...], offset: int = 0, strides: tuple[int, ...] | None = None) -> Any:
            return kernels.descriptor(arr.data.ptr + 2 * offset, shape, dt, dev, strides, owner=arr)

        q_rank = c.q_lora_rank or 1
        inter, si = c.intermediate_size, max(c.shared_intermediate, 1)
        m = self.mla[rows] = SimpleNamespace(
            qa=t(b.qa, (rows, q_rank)),
            qa_n=t(b.qa_n, (rows, q_rank)),
            ckv=t(b.ckv, (rows, r)),
            ckv_n=t(b.ckv_n, (rows, r)),
            kpe=t(b.kpe, (rows, dr)),
            kpe3=t(b.kpe, (rows, 1, dr)),
            q_pe=t(b.qkv, (rows, heads, dr), dn, (self.qw, dn + dr, 1)),
            q_abs=t(b.q_abs, (rows, heads, r)),
            o_lat=t(b.o_lat, (rows, heads, r)),
            gu=t(b.gu, (rows, 2 * inter)),
            act=t(b.act, (rows, inter)),
            shared_gu=t(b.gu, (rows, 2 * si)),
            shared_act=t(b.act, (rows, si)),
        )
        if self.fused_routing_used:
            assert c.moe is not None
            k, logits = c.moe.top_k, self.router_logits
            m.logits = kernels.descriptor(logits.data.ptr, (rows, c.moe.num_experts), "float32", dev, owner=logits)
            m.topk_w = kernels.descriptor(b.topk_w.data.ptr, (rows, k), "float32", dev, owner=b.topk_w)
            m.topk_i = kernels.descriptor(b.topk_i.data.ptr, (rows, k), "int32", dev, owner=b.topk_i)
        if eng.static_moe and self.fused_routing_used and rows <= eng.max_batch:
            # the fixed-capacity path's routing buffers, which the fused kernel writes in the decode graph
            assert c.moe is not None
            sc, k = self.moe_scratch, c.moe.top_k
            m.s_topk_w = kernels.descriptor(sc.s_weights.data.ptr, (rows, k), "float32", dev, owner=sc.s_weights)
            m.s_topk_i = kernels.descriptor(sc.s_experts.data.ptr, (rows, k), "int32", dev, owner=sc.s_experts)
        return m

    # ------------------------------------------------------------------------------------------ plans

    def _mla_plan(
        self, eng: Any, ws: Any, qo_indptr: np.ndarray, kv_indptr: np.ndarray, last: np.ndarray, batch: int
    ) -> Any:
        lens = kv_lengths(kv_indptr, last, batch, eng.page_size, self.kv_lens)
        c = eng.config
        return kernels.batch_mla_plan(
            qo_indptr[: batch + 1],
            kv_indptr[: batch + 1],
            None,
            lens,
            c.num_qo_heads,
            c.kv_lora_rank,
            c.qk_rope_head_dim,
            eng.page_size,
            True,
            c.softmax_scale,
            eng.dtype,
            stream=eng.stream_ptr,
            workspace=ws,
        )

    def plan_prefill(self, eng: Any, batch: int) -> None:
        ph = eng.prefill_arrays
        eng.prefill_plan = self._mla_plan(
            eng, eng.prefill_workspace, ph["qo_indptr"], ph["kv_indptr"], ph["kv_last_page_len"], batch
        )

    def plan_decode(self, eng: Any, rows: int, cuda_graph: bool, kind: str | None = None) -> None:
        dh = eng.decode_arrays
        eng.decode_plan = self._mla_plan(
            eng, eng.decode_workspace, self.decode_queries.host(rows), dh["kv_indptr"], dh["kv_last_page_len"], rows
        )

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, eng: Any, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False) -> None:
        """Embedding to the final RMSNorm for ``rows`` token rows (module docstring); normalized rows left in x."""
        c, b, w, dense, s = eng.config, eng.buffers, self.w, eng.dense, eng.stream_ptr
        h, eps, ab = c.hidden_size, c.rms_norm_eps, eng.gemm_type
        heads, dn, dr, dv, r = c.num_qo_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        qk, qw = dn + dr, self.qw
        x, normed, q = b.x.data.ptr, eng.normed.data.ptr, b.qkv.data.ptr
        m = self.mv = self._mla_views(eng, rows)
        last = c.num_layers - 1
        eng.embed_and_norm(v, rows)  # with a vocabulary shard: each rank's rows, summed by the all-reduce
        for i in range(c.num_layers):
            if c.q_lora_rank is None:
                dense.linear(rows, normed, h, w.q[i], heads * qk, h, q, qw, ab, ab)
            else:
                qr = c.q_lora_rank
                dense.linear(rows, normed, h, w.qa[i], qr, h, b.qa.data.ptr, qr, ab, ab)
                kernels.rmsnorm(m.qa, w.qa_norm[i], m.qa_n, eps, s)
                dense.linear(rows, b.qa_n.data.ptr, qr, w.qb[i], heads * qk, qr, q, qw, ab, ab)
            dense.linear(rows, normed, h, w.ckv[i], r, h, b.ckv.data.ptr, r, ab, ab)
            dense.linear(rows, normed, h, w.kpe[i], dr, h, b.kpe.data.ptr, dr, ab, ab)
            kernels.rmsnorm(m.ckv, w.kv_norm[i], m.ckv_n, eps, s)
            kernels.apply_rope_with_cos_sin_cache_inplace(
                v.positions, m.q_pe, m.kpe3, dr, self.cos_sin, not c.rope_interleave, stream=s
            )
            kernels.append_paged_mla_kv_cache(
                m.ckv_n, m.kpe, v.batch_indices, v.positions, self.ckv_cache[i], self.kpe_cache[i],
                v.kv_indices, v.kv_indptr, v.kv_last_page_len, stream=s,
            )  # fmt: skip
            # q_abs[:, n] = q_nope[:, n] @ W_k[n], per head n: q_nope is the first dn columns of head n's q
            dense.batched_linear(
                heads, rows, q, qw, qk, w.uk_t[i], r, dn, r * dn, b.q_abs.data.ptr, heads * r, r, ab, ab
            )
            attention(i, v)
            # attn[:, n] = o[:, n] @ W_v[n]^T
            dense.batched_linear(
                heads, rows, b.o_lat.data.ptr, heads * r, r, w.uv[i], dv, r, dv * r, b.attn.data.ptr, heads * dv,
                dv, ab, ab,
            )  # fmt: skip
            dense.linear(rows, b.attn.data.ptr, heads * dv, w.o[i], h, heads * dv, x, h, ab, ab)
            eng.add_norm(v, eng.ln2[i])
            if eng.moe_layers[i] is None:
                inter = c.intermediate_size
                dense.linear(rows, normed, h, w.gu[i], 2 * inter, h, b.gu.data.ptr, 2 * inter, ab, ab)
                kernels.silu_and_mul(m.gu, m.act, s)
                dense.linear(rows, b.act.data.ptr, inter, w.d[i], h, inter, x, h, ab, ab)
            elif static_moe:  # the decode graph: routed on the device, fixed capacity
                self._moe_forward_static(eng, i, rows)
            else:
                self._moe_forward(eng, i, rows)
            eng.add_norm(v, eng.ln1[i + 1] if i < last else eng.final_norm)

    def _moe_forward(self, eng: Any, i: int, rows: int) -> None:
        """``x = routed experts(normed) + shared experts(normed)`` (with TP this rank's partial sum); ``normed`` may
        be ``x`` itself (no fused all-reduce), so the shared experts' gate/up runs first, the routed output then
        overwrites x, and the shared down projection adds into it."""
        c, b, w, dense, s, ab = eng.config, eng.buffers, self.w, eng.dense, eng.stream_ptr, eng.gemm_type
        h, m, layer = c.hidden_size, self.mv, eng.moe_layers[i]
        assert c.moe is not None and c.routing is not None
        si, normed = c.shared_intermediate, eng.normed.data.ptr
        if si:
            dense.linear(rows, normed, h, w.shared_gu[i], 2 * si, h, b.gu.data.ptr, 2 * si, ab, ab)
            kernels.silu_and_mul(m.shared_gu, m.shared_act, s)
        e, logits = c.moe.num_experts, self.router_logits
        # router logits in float32 (as transformers: a float32 GEMM of the bfloat16 rows), then routing on the host
        dense.linear(rows, normed, h, w.router[i].data.ptr, e, h, logits.data.ptr, e, ab, eng.gemm_f32)
        if self.fused_routing_used:  # the models wheel's NoAuxTc on the device; only [rows, k] come back
            r = c.routing
            kernels.fused_topk_deepseek(
                m.logits, w.bias_dev[i], r.n_group, r.topk_group, c.moe.top_k, r.routed_scaling_factor, m.topk_w,
                m.topk_i, stream=s,
            )  # fmt: skip
            weights = eng.cupy.asnumpy(b.topk_w[:rows], stream=eng.stream)
            experts = eng.cupy.asnumpy(b.topk_i[:rows], stream=eng.stream)
            eng.stream.synchronize()
        else:  # host routing from the float32 logits
            host_logits = eng.cupy.asnumpy(logits[:rows], stream=eng.stream)
            eng.stream.synchronize()
            weights, experts = grouped_topk(host_logits, c.moe.top_k, c.routing, c.moe.renormalize, w.bias[i])
        if c.expert_parts > 1:  # this rank's experts renumbered from 0; the other ranks' weighted 0, computed nowhere
            local = c.local_experts
            routed = weights, experts
            experts, weights = local_assignments(experts, weights, self.first_expert, local)  # (ids, weights)
            groups = group_local(experts, local)
        else:
            routed, groups = (weights, experts), group_by_expert(experts, e)
        layer.last_routing = (*routed, groups)  # the routing over every expert, the groups the layer ran (tests)
        if layer.fp8_experts is not None and rows <= layer.capacity:
            # e4m3 experts: this routing into the fixed-capacity path's buffers, then the FP8 grouped GEMV over it
            # (the same combine of the same weights, routed_scaling_factor included, as forward_routed's)
            k, stream = c.moe.top_k, eng.stream
            layer.s_experts[: rows * k].set(np.ascontiguousarray(experts, np.int32).reshape(-1), stream=stream)
            layer.s_weights[: rows * k].set(np.ascontiguousarray(weights, np.float32).reshape(-1), stream=stream)
            layer.forward_static_routed(eng.normed, b.x, rows)
        else:  # the grouped GEMMs (over the 16-bit copy of e4m3 experts, written first)
            layer.forward_routed(eng.normed, b.x, weights, groups, rows)
        if si:
            dense.linear(rows, b.act.data.ptr, si, w.shared_d[i], h, si, b.x.data.ptr, h, ab, ab, accumulate=True)

    def _moe_forward_static(self, eng: Any, i: int, rows: int) -> None:
        """:meth:`_moe_forward` without a host step (what the decode graph captures): the router GEMM, the routing on
        the device into the layer's fixed-capacity buffers (the fused kernel, or :class:`DeviceGroupedTopk`), the
        experts over their fixed rows, the shared experts added by their down projection."""
        c, b, w, dense, ab = eng.config, eng.buffers, self.w, eng.dense, eng.gemm_type
        h, m, layer = c.hidden_size, self.mv, eng.moe_layers[i]
        assert c.moe is not None and c.routing is not None
        si, normed, e, logits = c.shared_intermediate, eng.normed.data.ptr, c.moe.num_experts, self.router_logits
        if si:
            dense.linear(rows, normed, h, w.shared_gu[i], 2 * si, h, b.gu.data.ptr, 2 * si, ab, ab)
            kernels.silu_and_mul(m.shared_gu, m.shared_act, eng.stream_ptr)
        dense.linear(rows, normed, h, w.router[i].data.ptr, e, h, logits.data.ptr, e, ab, eng.gemm_f32)
        if self.fused_routing_used:
            r = c.routing
            kernels.fused_topk_deepseek(
                m.logits, w.bias_dev[i], r.n_group, r.topk_group, c.moe.top_k, r.routed_scaling_factor, m.s_topk_w,
                m.s_topk_i, False, stream=eng.stream_ptr,
            )  # fmt: skip
        else:
            assert self.device_topk is not None
            self.device_topk(logits, w.bias_arr[i], rows, layer.s_experts, layer.s_weights, eng.stream)
        if c.expert_parts > 1:  # global ids to this rank's (the others' weighted 0), on the device
            layer.keep_local_experts(self.first_expert, rows)
        layer.forward_static_routed(eng.normed, b.x, rows)
        if si:
            dense.linear(rows, b.act.data.ptr, si, w.shared_d[i], h, si, b.x.data.ptr, h, ab, ab, accumulate=True)

    def _mla_run(self, eng: Any, plan: Any, i: int) -> None:
        m = self.mv
        kernels.batch_mla_run(
            m.q_abs,
            m.q_pe,
            self.ckv_cache[i],
            self.kpe_cache[i],
            out=m.o_lat,
            kv_indices=self.kv_indices_view,
            stream=eng.stream_ptr,
            plan=plan,
        )

    def decode_attention(self, eng: Any, i: int, v: SimpleNamespace) -> None:
        self.kv_indices_view = v.kv_indices
        self._mla_run(eng, eng.decode_plan, i)

    def prefill_attention(self, eng: Any, i: int, v: SimpleNamespace) -> None:
        self.kv_indices_view = v.kv_indices
        self._mla_run(eng, eng.prefill_plan, i)


class DeepSeekEngine(Engine):
    """Loads a DeepSeek-V3 / V2 checkpoint (bfloat16 or float16, or FP8: routed experts kept e4m3, the rest
    dequantized at load: module docstring) onto one GPU or ``tensor_parallel`` GPUs (MLA heads and expert columns
    split: module docstring) and serves batches of token-id prompts.

    Arguments as :class:`~fi_engine.models.llama.LlamaEngine`'s; ``cuda_graph=True`` captures the decode step (module
    docstring), plus:

    Args:
        fused_routing: route V3 experts with the models wheel's fused ``NoAuxTc`` kernel on the device (then only
            the chosen experts and weights come back to the host for grouping, not the router logits). None
            (default): where it applies (:func:`fused_routing_blocker`) and the kernel lock has the module; True:
            required (ValueError saying why not); False: the host routing
            (:func:`~fi_engine.layers.deepseek_routing.grouped_topk`). ``fused_routing_used`` says which ran.
        expert_split: how ``tensor_parallel`` splits the routed experts: ``"columns"`` (default), each rank a slice
            of every expert's intermediate columns; ``"experts"``, rank ``r`` of ``N`` the experts
            ``[r E/N, (r + 1) E/N)`` whole (their e4m3 codes and scales as stored in an FP8 checkpoint), every rank
            routing every token alike and serving only its own experts' assignments, the ranks' outputs summed by
            the same all-reduce. Refused by name where ``N`` does not divide the routed experts or the shared
            experts' columns, or the model has no routed experts (module docstring).
    """

    definition = DeepSeek

    @with_settings
    def __init__(
        self,
        model_dir: str | Path,
        *,
        fused_routing: bool | None = None,
        expert_split: str = "columns",
        **settings: Any,
    ) -> None:
        # kv_cache_dtype is refused unless "auto" (MLA: DeepSeek.fp8_kv_refusal)
        super().__init__(model_dir, family=self.definition(fused_routing, expert_split), **settings)

    @property
    def deepseek_config(self) -> DeepSeekConfig:
        """``config``, typed as what :meth:`DeepSeek.read_config` made it."""
        return self.config  # type: ignore[no-any-return]

    @property
    def fused_routing_used(self) -> bool:
        """Whether the MoE layers route with the fused kernel (``fused_routing``; decided when the weights load)."""
        return self.family.fused_routing_used  # type: ignore[attr-defined,no-any-return]

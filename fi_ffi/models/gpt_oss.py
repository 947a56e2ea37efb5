"""gpt-oss (``model_type`` ``gpt_oss``) on the Llama engine's serving loop, without torch (needs CuPy and the
model-family kernel wheel: its attention-sink modules, bfloat16, head_dim 64, window on and off).

::

    from fi_ffi.models.gpt_oss import GptOssEngine

    with GptOssEngine("/path/to/gpt-oss-20b-bf16", max_batch=8, cuda_graph=True) as engine:
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

The MoE layer here is **dense over the experts**, as transformers' own inference path: one GEMM gives every
expert's gate/up for every token (``[T, E * 2I]``), a kernel adds the biases, applies the clamped SwiGLU and
multiplies by the token's routing weight (0 for an expert it did not choose), one GEMM against the experts' down
projections side by side (``[H, E * I]``) sums the experts, and a last kernel adds the weighted down biases. No host
step and no synchronization, so prefill, eager decode and the CUDA-graph decode run the same code; the price is that
every expert's weights are read and multiplied on every step (``E / k`` times the routed work: 32 / 4 = 8x for
gpt-oss-20b). The routed grouped-GEMM layer of :mod:`fi_ffi.models.moe`, given the router bias, the expert biases
and the clamped SwiGLU (branch ``h20b-gptoss``: it passes tests/test_gpu_families.py), was measured against this
on an H100 (``benchmarks/bench_gpt_oss.py``, gpt-oss-20b-shaped, 2 layers, CUDA graph): 1093 against 574 tokens/s
at batch 1, but 11158 against 15591 at batch 32, where 32 tokens x top-4 touch nearly every expert anyway and one
dense GEMM reads the weights faster than 32 small grouped-GEMM problems. So this stays dense; what would win at
both ends is a per-step choice over one weight layout (routed below about ``E / k`` rows, dense above).

Only bfloat16 checkpoints (the sink modules are bfloat16); MXFP4 checkpoints (the published ones) are refused with
the recipe for a bfloat16 copy (README: gpt-oss). One GPU (``tensor_parallel=1``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

import fi_ffi

from . import kernels
from .checkpoint import Checkpoint
from .config import LlamaConfig
from .family_configs import MXFP4_HELP, GptOssSettings
from .llama import LlamaEngine
from .values import arg_array, arg_int
from .weights import WeightLoader

__all__ = ["GptOssEngine", "check_checkpoint", "expert_matrices", "rope_cos_sin_cache"]

# rows of the cos/sin table: p * f is a float32 product (exact positions up to 2**24, as transformers computes it)
MAX_ROPE_POSITIONS = 1 << 24

_SOURCE = r"""
__device__ __forceinline__ float bf(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ unsigned short to_bf(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// x[t, c] = round(x[t, c] + b[c]) for t < rows, c < width (bfloat16; row stride ld).
extern "C" __global__ void add_bias(unsigned short* __restrict__ x, const unsigned short* __restrict__ b,
                                    long long width, long long ld) {
    unsigned short* row = x + (long long)blockIdx.x * ld;
    for (long long c = threadIdx.x; c < width; c += blockDim.x) row[c] = to_bf(bf(row[c]) + bf(b[c]));
}
// Routing, one thread per token t < T: logits + bias, the k <= 16 largest (ties: the lower expert), softmax over
// those k; w[t, e] = that weight for a chosen expert, 0 otherwise (float32 [T, E]).
extern "C" __global__ void route(const float* __restrict__ logits, const float* __restrict__ bias, int E, int k,
                                 int T, float* __restrict__ w) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float* l = logits + (long long)t * E;
    float* out = w + (long long)t * E;
    int chosen[16];
    float value[16];
    for (int j = 0; j < k; ++j) {
        int best = -1;
        float bv = 0.f;
        for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int i = 0; i < j; ++i) taken |= chosen[i] == e;
            const float v = l[e] + bias[e];
            if (!taken && (best < 0 || v > bv)) { best = e; bv = v; }
        }
        chosen[j] = best;
        value[j] = bv;
    }
    float total = 0.f;
    for (int j = 0; j < k; ++j) total += expf(value[j] - value[0]);
    for (int e = 0; e < E; ++e) out[e] = 0.f;
    for (int j = 0; j < k; ++j) out[chosen[j]] = expf(value[j] - value[0]) / total;
}
// act[t, e*I + j] = w[t, e] * (clamp(u, -L, L) + 1) * g * sigmoid(alpha * g), g = min(gate + bg, L), u = up + bu,
// gate = gu[t, e*2I + j], up = gu[t, e*2I + I + j]; one block per (token, expert).
extern "C" __global__ void swiglu(const unsigned short* __restrict__ gu, const float* __restrict__ b_gu,
                                  const float* __restrict__ w, int E, int I, float alpha, float limit,
                                  unsigned short* __restrict__ act) {
    const long long t = blockIdx.x / E;
    const int e = blockIdx.x % E;
    const float we = w[t * E + e];
    const unsigned short* g = gu + (t * E + e) * 2LL * I;
    const float* b = b_gu + (long long)e * 2 * I;
    unsigned short* a = act + (t * E + e) * (long long)I;
    for (int j = threadIdx.x; j < I; j += blockDim.x) {
        if (we == 0.f) { a[j] = 0; continue; }
        const float gate = fminf(bf(g[j]) + b[j], limit);
        const float up = fminf(fmaxf(bf(g[I + j]) + b[I + j], -limit), limit);
        a[j] = to_bf(we * (up + 1.f) * gate / (1.f + expf(-alpha * gate)));
    }
}
// out[t, c] = round(y[t, c] + sum_e w[t, e] * b_down[e, c]); one block per token.
extern "C" __global__ void finish(const float* __restrict__ y, const float* __restrict__ w,
                                  const float* __restrict__ b_down, int E, long long H,
                                  unsigned short* __restrict__ out, long long out_ld) {
    const long long t = blockIdx.x;
    for (long long c = threadIdx.x; c < H; c += blockDim.x) {
        float acc = y[t * H + c];
        for (int e = 0; e < E; ++e) {
            const float we = w[t * E + e];
            if (we != 0.f) acc += we * b_down[e * H + c];
        }
        out[t * out_ld + c] = to_bf(acc);
    }
}
"""


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


def check_checkpoint(ckpt: Checkpoint) -> str:
    """The checkpoint's dtype, which must be bfloat16 and unquantized (ValueError naming the tensor otherwise)."""
    quantized = next((n for n in ckpt.tensors if n.endswith(("_blocks", "_scales"))), None)
    if quantized is not None:
        raise ValueError(f"model: tensor {quantized!r} is MXFP4-quantized; {MXFP4_HELP}")
    dtype = ckpt.info("model.embed_tokens.weight").dtype
    if dtype != "bfloat16":
        raise ValueError(
            f"model: weights are {dtype}; gpt-oss runs in bfloat16 here (the attention-sink kernels are "
            f"bfloat16): save the model with torch_dtype=torch.bfloat16"
        )
    return dtype


def expert_matrices(gate_up: np.ndarray, gate_up_bias: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, ...]:
    """One layer's experts as the dense-over-experts MoE multiplies them.

    Args:
        gate_up: ``[E, H, 2I]`` (the checkpoint's ``experts.gate_up_proj``: ``x @ gate_up[e]``, gate on the even
            and up on the odd columns).
        gate_up_bias: ``[E, 2I]``, interleaved the same way.
        down: ``[E, I, H]`` (``act @ down[e]``).

    Returns:
        ``(w_gu [E * 2I, H], b_gu [E, 2I], w_down [H, E * I])``: ``w_gu`` an nn.Linear weight whose rows are expert
        0's gate rows, its up rows, expert 1's gate rows, ...; ``b_gu`` likewise (gate, then up, per expert);
        ``w_down`` the experts' down projections side by side as one nn.Linear weight (``x @ w_down.T`` sums
        ``act_e @ down[e]`` over the experts when ``x`` holds every expert's activations ``[T, E * I]``).
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
    w_gu = np.concatenate([t[:, 0::2], t[:, 1::2]], axis=1).reshape(e * two_i, h)
    b_gu = np.concatenate([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], axis=1)
    w_down = down.transpose(2, 0, 1).reshape(h, e * down.shape[1])
    return np.ascontiguousarray(w_gu), np.ascontiguousarray(b_gu), np.ascontiguousarray(w_down)


class GptOssEngine(LlamaEngine):
    """A bfloat16 gpt-oss checkpoint on one GPU; arguments and serving API as
    :class:`~fi_ffi.models.llama.LlamaEngine`."""

    def _check_family(self, cfg: LlamaConfig) -> None:
        if cfg.model_type != "gpt_oss" or not isinstance(cfg.family, GptOssSettings):
            raise ValueError(f"model: GptOssEngine serves gpt_oss checkpoints, this one is {cfg.model_type!r}")
        if self.tensor_parallel != 1:
            raise ValueError("tensor_parallel: gpt_oss checkpoints run on one GPU here; pass tensor_parallel=1")
        if cfg.moe is None or cfg.moe.top_k > 16:
            raise ValueError("model: num_experts_per_tok above 16 is not supported by the gpt-oss routing kernel")

    # ------------------------------------------------------------------------------------------ loading

    def _load(self, ckpt: Checkpoint) -> None:
        from .dense import data_type

        c = self.model_config
        assert c.moe is not None
        hq, hk, d, h = c.num_qo_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        e, i_size = c.moe.num_experts, c.moe.intermediate_size
        dtype = check_checkpoint(ckpt)
        self.dtype, self._ab, self._f32 = dtype, data_type(dtype), data_type("float32")
        self._weights: list[Any] = []
        self._moe: list[Any] = []
        self._moe_scratch = None
        w = WeightLoader(ckpt, self._cp, dtype, self.device, self._weights)

        def f32(name: str, shape: tuple[int, ...]) -> Any:  # biases and sinks, float32 on the device
            info = ckpt.info(name)
            arr = ckpt.array(name, shape)
            if info.dtype not in ("bfloat16", "float32"):
                raise ValueError(f"model: tensor {name!r} is {info.dtype}, expected bfloat16 or float32")
            return w.upload(bf16_to_f32(arr) if info.dtype == "bfloat16" else np.asarray(arr, np.float32))

        self._embed = w.ptr(w.get("model.embed_tokens.weight", (c.vocab_size, h)))
        tied = c.tie_word_embeddings or "lm_head.weight" not in ckpt
        self._lm_head = self._embed if tied else w.ptr(w.get("lm_head.weight", (c.vocab_size, h)))
        self._head_rows = c.vocab_size  # one GPU: the LM head keeps every row (no vocabulary shard)
        self._wqkv, self._bqkv, self._wo, self._bo, self._ln1, self._ln2 = [], [], [], [], [], []
        self._sinks: list[Any] = []
        self._router, self._router_bias, self._w_gu, self._b_gu, self._w_down, self._b_down = [], [], [], [], [], []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            shapes = (("q_proj", hq * d), ("k_proj", hk * d), ("v_proj", hk * d))
            self._wqkv.append(w.ptr(np.concatenate([w.get(f"{a}{n}.weight", (r, h)) for n, r in shapes])))
            self._bqkv.append(w.ptr(np.concatenate([w.get(f"{a}{n}.bias", (r,)) for n, r in shapes])))
            self._wo.append(w.ptr(w.get(a + "o_proj.weight", (h, hq * d))))
            self._bo.append(w.ptr(w.get(a + "o_proj.bias", (h,))))
            sinks = f32(a + "sinks", (hq,))
            self._sinks.append(kernels.descriptor(sinks.data.ptr, (hq,), "float32", self.device, owner=sinks))
            self._ln1.append(w.vector(w.get(p + "input_layernorm.weight", (h,))))
            self._ln2.append(w.vector(w.get(p + "post_attention_layernorm.weight", (h,))))
            m = p + "mlp."
            self._router.append(w.ptr(w.get(m + "router.weight", (e, h))))
            self._router_bias.append(f32(m + "router.bias", (e,)))
            w_gu, b_gu, w_down = expert_matrices(
                w.get(m + "experts.gate_up_proj", (e, h, 2 * i_size)),
                bf16_to_f32(w.get(m + "experts.gate_up_proj_bias", (e, 2 * i_size))),
                w.get(m + "experts.down_proj", (e, i_size, h)),
            )
            self._w_gu.append(w.ptr(w_gu))
            self._b_gu.append(w.upload(b_gu))
            self._w_down.append(w.ptr(w_down))
            self._b_down.append(f32(m + "experts.down_proj_bias", (e, h)))
        self._norm = w.vector(w.get("model.norm.weight", (h,)))
        self._q_norm: list[Any] = []
        self._k_norm: list[Any] = []
        cache = w.upload(rope_cos_sin_cache(c, self.max_seq_len))
        self._cos_sin = kernels.descriptor(cache.data.ptr, cache.shape, "float32", self.device, owner=cache)
        module = self._cp.RawModule(code=_SOURCE)
        self._k_bias, self._k_route, self._k_swiglu, self._k_finish = (
            module.get_function(n) for n in ("add_bias", "route", "swiglu", "finish")
        )
        g: GptOssSettings = c.family
        self._alpha, self._limit = np.float32(g.alpha), np.float32(g.swiglu_limit)
        self._windows = list(g.windows)

    def _allocate(self) -> None:
        super()._allocate()
        cp, c = self._cp, self.config
        assert c.moe is not None
        e, i_size = c.moe.num_experts, c.moe.intermediate_size
        rows = max(self.max_prefill_tokens, self.max_batch)
        self._moe_buf = SimpleNamespace(
            logits=cp.empty((rows, e), np.float32),
            weights=cp.empty((rows, e), np.float32),
            gu=cp.empty((rows, e * 2 * i_size), np.uint16),
            act=cp.empty((rows, e * i_size), np.uint16),
            y=cp.empty((rows, c.hidden_size), np.float32),
        )
        # decode: one query row per request (the sink prefill kernels serve decode)
        self._qo_host = np.arange(self.max_batch + 1, dtype=np.int32)
        self._qo_dev = cp.asarray(self._qo_host)
        self._qo_views: dict[int, Any] = {}
        self._plan_windows = sorted(set(self._windows))
        self._extra_ws = [kernels.workspace(self.device) for _ in range(2 * (len(self._plan_windows) - 1))]

    def _workspaces(self, decode: bool) -> list[Any]:
        first = self._ws_decode if decode else self._ws_prefill
        n = len(self._plan_windows) - 1
        return [first, *(self._extra_ws[n:] if decode else self._extra_ws[:n])]

    # ------------------------------------------------------------------------------------------ attention

    def _sink_plan(self, ws: Any, qo: Any, kv: Any, last: Any, window: int, backend: str, graph: bool) -> Any:
        c = self.config
        return fi_ffi.batch_attention_sink_plan(
            ws, qo, kv, last, c.num_qo_heads, c.num_kv_heads, c.head_dim, self.page_size, q_dtype=self.dtype,
            causal=True, window_left=window, sm_scale=c.head_dim**-0.5, backend=backend, enable_cuda_graph=graph,
            stream=self._s,
        )  # fmt: skip

    def _plan_prefill(self, batch: int) -> None:
        ph = self._ph
        qo, kv, last = ph["qo_indptr"][: batch + 1], ph["kv_indptr"][: batch + 1], ph["kv_last_page_len"][:batch]
        self._prefill_plans = {
            window: self._sink_plan(ws, qo, kv, last, window, "auto", False)
            for window, ws in zip(self._plan_windows, self._workspaces(False), strict=True)
        }

    def _plan_decode(self, rows: int, cuda_graph: bool) -> None:
        dh = self._dh
        qo, kv, last = self._qo_host[: rows + 1], dh["kv_indptr"][: rows + 1], dh["kv_last_page_len"][:rows]
        # FA2: a decode row is one query; FA2's small query tiles suit it, and its CUDA-graph schedule is fixed
        self._decode_plans = {
            window: self._sink_plan(ws, qo, kv, last, window, "fa2", cuda_graph)
            for window, ws in zip(self._plan_windows, self._workspaces(True), strict=True)
        }
        self._decode_plan = self._decode_plans[self._plan_windows[0]]  # the one the graph's layout check watches

    def _qo_view(self, rows: int) -> Any:
        t = self._qo_views.get(rows)
        if t is None:
            t = self._qo_views[rows] = kernels.descriptor(
                self._qo_dev.data.ptr, (rows + 1,), "int32", self.device, owner=self._qo_dev
            )
        return t

    def _prefill_attention(self, i: int, v: SimpleNamespace) -> None:
        fi_ffi.batch_attention_sink_run(
            self._prefill_plans[self._windows[i]], v.q, self._k_cache[i], self._v_cache[i], v.qo_indptr, v.kv_indptr,
            v.kv_indices, v.kv_last_page_len, v.attn, self._sinks[i], stream=self._s,
        )  # fmt: skip

    def _decode_attention(self, i: int, v: SimpleNamespace) -> None:
        fi_ffi.batch_attention_sink_run(
            self._decode_plans[self._windows[i]], v.q, self._k_cache[i], self._v_cache[i],
            self._qo_view(v.kv_last_page_len.shape[0]), v.kv_indptr, v.kv_indices, v.kv_last_page_len, v.attn,
            self._sinks[i], stream=self._s,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ forward

    def _forward(self, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False) -> None:
        """Embedding to the final RMSNorm for ``rows`` token rows; the normalized rows end in ``x``."""
        c, b, dense, s = self.config, self._buf, self.dense, self._s
        h, eps, ab, f32 = c.hidden_size, c.rms_norm_eps, self._ab, self._f32
        x, qkv, attn = b.x.data.ptr, b.qkv.data.ptr, b.attn.data.ptr
        w, hqd, last = self._qkv_width, c.num_qo_heads * c.head_dim, c.num_layers - 1
        dense.gather_rows(rows, self._embed, h, v.token_ids, b.h.data.ptr, h, h)
        kernels.rmsnorm(v.h, self._ln1[0], v.x, eps, s)
        for i in range(c.num_layers):
            dense.linear(rows, x, h, self._wqkv[i], w, h, qkv, w, ab, ab)
            self._k_bias((rows,), (256,), (qkv, self._bqkv[i], w, w))
            fi_ffi.apply_rope_with_cos_sin_cache_inplace(
                v.positions, v.q, v.k, c.head_dim, self._cos_sin, is_neox=True, stream=s
            )
            kernels.append_kv(
                v.k, v.v, v.batch_indices, v.positions, self._k_cache[i], self._v_cache[i], v.kv_indices, v.kv_indptr,
                v.kv_last_page_len, s,
            )  # fmt: skip
            attention(i, v)
            dense.linear(rows, attn, hqd, self._wo[i], h, hqd, x, h, ab, ab)
            self._k_bias((rows,), (256,), (x, self._bo[i], h, h))
            self._add_norm(v, self._ln2[i])
            self._moe_forward(i, rows, x, f32)
            self._add_norm(v, self._ln1[i + 1] if i < last else self._norm)

    def _moe_forward(self, i: int, rows: int, x: int, f32: int) -> None:
        """``x[:rows] = MoE_i(x[:rows])``, dense over the experts (module docstring)."""
        c, m, dense, ab = self.config, self._moe_buf, self.dense, self._ab
        assert c.moe is not None
        e, k, i_size, h = c.moe.num_experts, c.moe.top_k, c.moe.intermediate_size, c.hidden_size
        dense.linear(rows, x, h, self._router[i], e, h, m.logits.data.ptr, e, ab, f32)
        self._k_route(((rows + 127) // 128,), (128,), (m.logits, self._router_bias[i], np.int32(e), np.int32(k),
                                                       np.int32(rows), m.weights))  # fmt: skip
        dense.linear(rows, x, h, self._w_gu[i], e * 2 * i_size, h, m.gu.data.ptr, e * 2 * i_size, ab, ab)
        threads = min(256, -(-i_size // 32) * 32)
        self._k_swiglu((rows * e,), (threads,), (m.gu, self._b_gu[i], m.weights, np.int32(e), np.int32(i_size),
                                                 self._alpha, self._limit, m.act))  # fmt: skip
        dense.linear(rows, m.act.data.ptr, e * i_size, self._w_down[i], h, e * i_size, m.y.data.ptr, h, ab, f32)
        self._k_finish((rows,), (256,), (m.y, m.weights, self._b_down[i], np.int32(e), np.int64(h), x, np.int64(h)))

    def close(self) -> None:
        was_open = not self._closed
        super().close()
        if was_open:
            for ws in self._extra_ws:
                ws.close()

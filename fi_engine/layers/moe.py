"""A mixture-of-experts MLP layer (Mixtral, Qwen3-MoE) from fi_ffi's ops, without torch (needs CuPy).

Per forward of ``T`` tokens ``x [T, H]`` with ``E`` experts, ``k`` chosen per token, intermediate size ``I``:

1. router logits ``[T, E] = x @ router.T`` (cuBLAS, float32 out);
2. routing on the host (:mod:`fi_engine.layers.moe_routing`): softmax + top-k (renormalized for Mixtral, and for
   Qwen3-MoE when ``norm_topk_prob``), then the ``T * k`` assignments grouped by expert. This copies the logits
   to the host and waits for them: one synchronization per layer and forward, and the reason this layer is not
   captured in a CUDA graph (the grouped GEMM's segment offsets are host values);
3. permute: ``xs[r] = x[row_token[r]]`` (the engine's row-gather kernel);
4. ``gu = segment_gemm(xs, gate_up)`` ``[T*k, 2I]`` (expert ``e``'s rows against its ``[2I, H]`` gate/up weight);
5. ``act = silu_and_mul(gu)`` ``[T*k, I]``;
6. ``y = segment_gemm(act, down)`` ``[T*k, H]``;
7. combine: ``out[t] = sum_j weight[t, j] * y[row_of[t, j]]`` (a small CuPy kernel, float32 sums, one rounding).

With ``capacity=C`` the layer also has a fixed-capacity path (:meth:`MoELayer.forward_static`) with no host step:
routing on the device, every expert owning ``C`` rows of the expert GEMMs (their argument arrays prepared once),
so a CUDA graph can capture it (the engine's decode graph does). A small device kernel writes each expert's token
count into the prepared GEMMs' problem sizes before they run, so an expert no token chose computes nothing and its
weights are not read: a step reads what the host path reads, without waiting for the host.

Under tensor parallelism split by expert (DeepSeek's ``expert_split="experts"``) a layer holds some of the model's
experts whole and is handed a routing over all of them: :meth:`MoELayer.keep_local_experts` renumbers its own and sets
the others past its experts with weight 0, which the grouped GEMV and the fixed-capacity rows never compute and the
combine skips (a choice of weight 0 adds nothing and its row is not read).

With ``dense_rows=D`` the layer also has a dense-over-experts path (:meth:`MoELayer.forward_dense`, no host step
either, capturable): every token through every expert's gate/up in one GEMM (``gate_up`` read as one
``[E * 2I, H]`` matrix), the activation where the token chose the expert, the down projections as one strided-batched
GEMM over the experts, then the combine over each token's chosen experts. It reads every expert's weights on every
step, and still wins once a step's ``T * k`` assignments cover most experts (:func:`choose_path`). All paths share
one weight layout, so a model holds its experts once and picks a path per step.

With ``fp8_experts`` (:class:`~fi_engine.kernels.fp8_moe_gemv.Fp8Experts`) the experts are e4m3 codes and scales as
an FP8 checkpoint stores them: the grouped GEMV of :meth:`MoELayer.forward_static` reads them as stored
(:class:`~fi_engine.kernels.fp8_moe_gemv.Fp8GroupedGemv`) for every step it fits, and every other path first writes
their 16-bit copy into ``weights.gate_up`` / ``weights.down`` (a buffer of one layer's experts that the engine
shares between its layers) and reads that. ``mxfp4_experts`` (:class:`~fi_engine.kernels.mxfp4_moe_gemv.Mxfp4Experts`:
e2m1 values with a scale per 32, gpt-oss's) are served the same way by
:class:`~fi_engine.kernels.mxfp4_moe_gemv.Mxfp4GroupedGemv`, biases and the clamped SwiGLU included: the gate/up
GEMV adds its bias as it writes, the down GEMV makes the activation as it stages its rows and adds its bias, and
the plain combine sums the rows.

Weights are the checkpoint's, stacked per expert: ``router [E, H]``, ``gate_up [E, 2I, H]`` (Mixtral's ``w1``
rows, then ``w3``; Qwen3-MoE's ``gate_proj`` then ``up_proj``) and ``down [E, H, I]`` (``w2`` / ``down_proj``),
all nn.Linear layouts (``weight_column_major=True`` for the grouped GEMM). float16 arrays, or uint16 arrays
holding bfloat16 bits (``dtype="bfloat16"``), as the engine stores them. Every buffer is allocated once, for
``max_tokens``; nothing is allocated per forward except the host routing arrays. The activation buffers
(:class:`MoEScratch`) can be shared by all MoE layers of a model, which run one after another on one stream: the
engine allocates one set, not one per layer (for Mixtral-8x7B at 4096 prefill tokens that is 0.8 GB instead of
27 GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..kernels import flashinfer as kernels
from ..kernels.cuda_sources import functions
from ..kernels.dense import CUDA_R_32F, Dense, data_type
from ..kernels.row_kernels import column_blocks
from ..values import MAX_SIZE, arg_int, float32_bits, integer
from .moe_routing import ExpertGroups, group_by_expert, softmax_topk

if TYPE_CHECKING:
    from ..kernels.fp8_moe_gemv import Fp8Experts
    from ..kernels.mxfp4_moe_gemv import Mxfp4Experts

__all__ = ["DENSE_MIN_FILL", "ClampedSwiGLU", "MoEBiases", "MoELayer", "MoEScratch", "MoEWeights", "choose_path"]

DENSE_MIN_FILL = 1
""":func:`choose_path`'s crossover: a step goes dense when its ``rows * top_k`` expert assignments are at least this
many times the number of experts (measured on an H100, benchmarks/RESULTS.md: gpt-oss)."""

_MAX_SCRATCH_BYTES = 1 << 46  # 64 TiB: far above any GPU's memory, far below int64 overflow


def choose_path(rows: int, num_experts: int, top_k: int) -> str:
    """``"dense"`` or ``"routed"``: the faster MoE path for a step of ``rows`` tokens by the rule the gpt-oss engine
    follows: dense over the experts (:meth:`MoELayer.forward_dense`) when ``rows * top_k >= DENSE_MIN_FILL *
    num_experts`` (the step's assignments cover most experts anyway, and reading every expert's weights through one
    GEMM and one batched GEMM is faster than the grouped GEMM's per-expert problems), routed otherwise (only the
    chosen experts' weights are read). For gpt-oss-20b (32 experts, top-4): dense from 8 rows."""
    rows = arg_int("rows", rows, 0, MAX_SIZE)
    num_experts = arg_int("num_experts", num_experts, 1, MAX_SIZE)
    top_k = arg_int("top_k", top_k, 1, num_experts)
    return "dense" if rows * top_k >= DENSE_MIN_FILL * num_experts else "routed"


@dataclass(frozen=True)
class MoEWeights:
    """One layer's expert weights (CuPy arrays, see the module docstring for layouts and dtypes)."""

    router: Any
    gate_up: Any
    down: Any

    def shapes(self) -> tuple[int, int, int]:
        """``(num_experts, hidden, intermediate)``, checked across the three arrays."""
        for name, ndim in (("router", 2), ("gate_up", 3), ("down", 3)):
            shape = getattr(getattr(self, name), "shape", None)
            if not isinstance(shape, tuple) or len(shape) != ndim:
                raise ValueError(
                    f"weights.{name}: expected a {ndim}-D CuPy array, got {type(getattr(self, name)).__name__}"
                )
        e, h = self.router.shape
        if self.gate_up.shape[0] != e or self.gate_up.shape[2] != h or self.gate_up.shape[1] % 2:
            raise ValueError(f"gate_up: expected [{e}, 2 * intermediate, {h}], got {tuple(self.gate_up.shape)}")
        i = self.gate_up.shape[1] // 2
        if tuple(self.down.shape) != (e, h, i):
            raise ValueError(f"down: expected [{e}, {h}, {i}] (experts, hidden, intermediate), got {self.down.shape}")
        return e, h, i


@dataclass(frozen=True)
class MoEBiases:
    """Biases of one layer's router and experts (gpt-oss), float32 CuPy arrays: ``router [E]`` (added to the router
    logits before the routing), ``gate_up [E, 2I]`` (gate columns, then up, as ``gate_up``'s rows) and ``down [E, H]``
    (each expert's output bias, weighted by the routing weight like the expert's output)."""

    router: Any
    gate_up: Any
    down: Any


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``,
    ``g = min(gate, limit)`` (transformers' ``GptOssExperts``: alpha 1.702, limit ``swiglu_limit`` 7)."""

    alpha: float
    limit: float

    def __post_init__(self) -> None:  # refused here, at load, not at a forward's launch: the kernels take float32
        float32_bits("alpha", self.alpha)
        float32_bits("swiglu_limit", self.limit)


class MoEScratch:
    """The activation buffers of MoE layers of one shape, shareable by layers that run one after another on one
    stream (each forward writes before it reads and is done with them when the next layer starts). Device arrays,
    ``R = max_tokens * top_k`` rows for the host path and ``E * capacity`` for the fixed-capacity path:

    - ``logits [max_tokens, E]`` float32; ``xs [R, H]``, ``gate_up_out [R, 2I]``, ``act [R, I]``, ``y [R, H]`` in
      the storage dtype; ``row_token``, ``row_of`` int32 ``[R]``, ``route_weights`` float32 ``[R]``;
    - with ``capacity``: ``s_xs [E*C, H]``, ``s_gu [E*C, 2I]``, ``s_act [E*C, I]``, ``s_y [E*C, H]`` (zeroed
      once), ``s_experts``, ``s_row_of`` int32 ``[C*k]``, ``s_weights`` float32 ``[C*k]``;
    - with ``dense_rows=D`` (the dense-over-experts path, :meth:`MoELayer.forward_dense`): ``d_gu [D, E*2I]``,
      ``d_act [D, E*I]`` in the storage dtype, ``d_y`` float32 ``[E, D, H]``, ``d_experts`` int32 and ``d_weights``
      float32 ``[D*k]``.

    ``key`` is what a layer must match to use it: ``(E, H, I, k, max_tokens, capacity or 0, dtype, dense_rows or 0)``.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        hidden: int,
        intermediate: int,
        top_k: int,
        max_tokens: int,
        dtype: str,
        capacity: int | None = None,
        dense_rows: int | None = None,
    ) -> None:
        # checked before CuPy is imported: bad arguments are named the same with or without a GPU
        e = integer("num_experts", num_experts, 1)
        h = integer("hidden", hidden, 1)
        i = integer("intermediate", intermediate, 1)
        k = integer("top_k", top_k, 1)
        if k > e:
            raise ValueError(f"top_k: expected 1..num_experts ({e}), got {k}")
        max_tokens = integer("max_tokens", max_tokens, 1)
        if capacity is not None:
            capacity = integer("capacity", capacity, 1)
            if capacity > max_tokens:
                raise ValueError(f"capacity: expected 1..max_tokens ({max_tokens}), got {capacity}")
        if dense_rows is not None:
            dense_rows = integer("dense_rows", dense_rows, 1)
            if dense_rows > max_tokens:
                raise ValueError(f"dense_rows: expected 1..max_tokens ({max_tokens}), got {dense_rows}")
        if dtype not in ("float16", "bfloat16"):
            raise ValueError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r}")
        self.key = (e, h, i, k, max_tokens, capacity or 0, dtype, dense_rows or 0)
        need = self.bytes_needed(e, h, i, k, max_tokens, capacity, dense_rows)
        if need > _MAX_SCRATCH_BYTES:  # no device holds this: refuse before CuPy overflows or rounds it
            raise ValueError(
                f"MoEScratch: num_experts={e}, max_tokens={max_tokens}, top_k={k}, hidden={h}, intermediate={i}, "
                f"capacity={capacity}, dense_rows={dense_rows} "
                f"need {need} bytes of activation buffers, more than any device has; expected sizes of a real model"
            )
        import cupy

        try:
            self._allocate(cupy, e, h, i, k, max_tokens, capacity, dtype, dense_rows)
        except cupy.cuda.memory.OutOfMemoryError as exc:
            raise MemoryError(
                f"MoEScratch: the activation buffers for max_tokens={max_tokens} x top_k={k} rows (hidden {h}, "
                f"intermediate {i}), capacity={capacity} and dense_rows={dense_rows} do not fit in the device's free "
                f"memory ({exc}); lower max_tokens (the engine's max_prefill_tokens) or capacity and dense_rows (its "
                f"max_batch)"
            ) from None

    def _allocate(
        self,
        cupy: Any,
        e: int,
        h: int,
        i: int,
        k: int,
        max_tokens: int,
        capacity: int | None,
        dtype: str,
        dense_rows: int | None,
    ) -> None:
        storage = cupy.float16 if dtype == "float16" else cupy.uint16
        rows = max_tokens * k
        self.logits = cupy.empty((max_tokens, e), cupy.float32)
        self.xs = cupy.empty((rows, h), storage)
        self.gate_up_out = cupy.empty((rows, 2 * i), storage)
        self.act = cupy.empty((rows, i), storage)
        self.y = cupy.empty((rows, h), storage)
        self.row_token = cupy.empty(rows, cupy.int32)
        self.row_of = cupy.empty(rows, cupy.int32)
        self.route_weights = cupy.empty(rows, cupy.float32)
        if capacity:
            c = capacity
            # zeroed once: rows past an expert's count are never computed or read, but stay finite
            self.s_xs = cupy.zeros((e * c, h), storage)
            self.s_gu = cupy.zeros((e * c, 2 * i), storage)
            self.s_act = cupy.zeros((e * c, i), storage)
            self.s_y = cupy.zeros((e * c, h), storage)
            self.s_experts = cupy.zeros(c * k, cupy.int32)
            self.s_row_of = cupy.zeros(c * k, cupy.int32)
            self.s_weights = cupy.zeros(c * k, cupy.float32)
        if dense_rows:
            d = dense_rows
            self.d_gu = cupy.empty((d, e * 2 * i), storage)
            self.d_act = cupy.empty((d, e * i), storage)
            self.d_y = cupy.empty((e, d, h), cupy.float32)
            self.d_experts = cupy.zeros(d * k, cupy.int32)
            self.d_weights = cupy.zeros(d * k, cupy.float32)

    @staticmethod
    def bytes_needed(
        e: int, h: int, i: int, k: int, max_tokens: int, capacity: int | None, dense_rows: int | None = None
    ) -> int:
        """Device bytes of the buffers of a scratch of these sizes (16-bit activations)."""
        rows, static = max_tokens * k, e * (capacity or 0)
        per_row = 2 * (2 * h + 3 * i)  # xs, y; gate_up_out (2I), act (I)
        routing = 4 * max_tokens * e + 12 * rows + (12 * (capacity or 0) * k)
        d = dense_rows or 0
        dense = d * e * (2 * 3 * i + 4 * h) + 8 * d * k  # d_gu, d_act (16-bit), d_y (float32); d_experts, d_weights
        return (rows + static) * per_row + routing + dense

    @property
    def nbytes(self) -> int:
        """Device bytes held."""
        return sum(int(getattr(a, "nbytes", 0)) for a in vars(self).values())


class MoELayer:
    """The MoE MLP of one layer (see the module docstring).

    Args:
        weights: the layer's :class:`MoEWeights`.
        dtype: ``"float16"`` or ``"bfloat16"`` (activations and weights).
        top_k: experts per token.
        renormalize: renormalize the chosen probabilities to sum to 1.
        max_tokens: the most tokens one forward takes (buffers are sized for it).
        stream: the ``cupy.cuda.Stream`` everything runs on (made current by the caller, as the engine does).
        dense: a :class:`~fi_engine.kernels.dense.Dense` bound to ``stream`` (the engine's); None: one of its own.
        workspace: an fi_ffi ``Workspace`` for the grouped GEMMs, used by nothing else (their argument arrays
            go through its int buffer and make other plans on it stale); None: one of its own.
        backend: the grouped GEMM's ``backend`` (``"auto"``: the SM90 module on Hopper).
        capacity: also build the fixed-capacity path (:meth:`forward_static`) for up to ``capacity`` tokens.
        scratch: a :class:`MoEScratch` of this layer's shape (its ``key``), shared with the other layers that run
            on ``stream``; None: one of its own.
        biases: the router's and experts' :class:`MoEBiases` (gpt-oss); None: no biases.
        activation: None: SiLU-and-mul; a :class:`ClampedSwiGLU`: gpt-oss's clamped SwiGLU.
        dense_rows: also build the dense-over-experts path (:meth:`forward_dense`) for up to ``dense_rows`` tokens.
        fp8_experts: the experts as e4m3 codes and scales (see the module docstring; a plain layer only: no biases,
            SiLU); ``weights.gate_up`` and ``weights.down`` are then the 16-bit buffers their copy is written into.
        mxfp4_experts: the experts as MXFP4 codes and scales (see the module docstring; with or without biases and
            the clamped SwiGLU); ``weights.gate_up`` and ``weights.down`` as with ``fp8_experts``.
    """

    def __init__(
        self,
        weights: MoEWeights,
        *,
        dtype: str,
        top_k: int,
        renormalize: bool = True,
        max_tokens: int,
        stream: Any,
        dense: Dense | None = None,
        workspace: Any = None,
        backend: Literal["auto", "sm90", "sm80"] = "auto",
        capacity: int | None = None,
        scratch: MoEScratch | None = None,
        biases: MoEBiases | None = None,
        activation: ClampedSwiGLU | None = None,
        dense_rows: int | None = None,
        fp8_experts: Fp8Experts | None = None,
        mxfp4_experts: Mxfp4Experts | None = None,
    ) -> None:
        # checked before CuPy is imported (as MoEScratch): bad arguments are named the same with or without a GPU
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights: expected a MoEWeights, got {type(weights).__name__}")
        self.num_experts, self.hidden, self.intermediate = weights.shapes()
        top_k = integer("top_k", top_k, 1)
        if top_k > self.num_experts:
            raise ValueError(f"top_k: expected 1..num_experts ({self.num_experts}), got {top_k}")
        max_tokens = integer("max_tokens", max_tokens, 1)
        capacity = None if capacity is None else integer("capacity", capacity, 1)
        dense_rows = None if dense_rows is None else integer("dense_rows", dense_rows, 1)
        if dtype not in ("float16", "bfloat16"):
            raise ValueError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r:.40}")
        _check_fp8_experts(fp8_experts, (self.num_experts, self.hidden, self.intermediate), biases, activation)
        _check_mxfp4_experts(mxfp4_experts, fp8_experts, (self.num_experts, self.hidden, self.intermediate), biases,
                             activation)  # fmt: skip
        import cupy

        self.fp8_experts, self.mxfp4_experts = fp8_experts, mxfp4_experts
        self.weights, self.dtype, self.top_k, self.renormalize = weights, dtype, top_k, renormalize
        self._check_extras(biases, activation, top_k, cupy)
        self.biases, self.activation = biases, activation
        self.max_tokens, self.stream, self.backend = max_tokens, stream, backend
        self._ab = data_type(dtype)
        self._bf16 = 1 if dtype == "bfloat16" else 0
        storage = cupy.float16 if dtype == "float16" else cupy.uint16
        for name in ("router", "gate_up", "down"):
            arr = getattr(weights, name)
            if arr.dtype != storage or not arr.flags.c_contiguous:
                raise ValueError(f"weights.{name}: expected a contiguous {np.dtype(storage).name} array ({dtype})")
        # the buffers before the cuBLAS handle and workspace: a refused or unallocatable scratch leaves nothing open
        # (MoEScratch checks capacity against max_tokens; a given one must have been built for this layer)
        e, h, i = self.num_experts, self.hidden, self.intermediate
        key = (e, h, i, top_k, max_tokens, capacity or 0, dtype, dense_rows or 0)
        if scratch is None:
            scratch = MoEScratch(
                num_experts=e, hidden=h, intermediate=i, top_k=top_k, max_tokens=max_tokens, dtype=dtype,
                capacity=capacity, dense_rows=dense_rows,
            )  # fmt: skip
        elif not isinstance(scratch, MoEScratch) or scratch.key != key:
            got = scratch.key if isinstance(scratch, MoEScratch) else type(scratch).__name__
            raise ValueError(
                f"scratch: expected a MoEScratch of key (experts, hidden, intermediate, top_k, max_tokens, capacity, "
                f"dtype, dense_rows) = {key}, got {got}; build it with this layer's arguments"
            )
        self.scratch = scratch
        self.device_id = int(cupy.cuda.Device().id)
        self._own_dense = self._own_ws = False  # until made: close() releases only what exists
        self.dense = Dense(stream) if dense is None else dense
        self._own_dense = dense is None
        try:
            self._own_ws = workspace is None
            self.workspace = (
                kernels.Workspace.allocate(self.device_id, float_bytes=32 << 20, int_bytes=1 << 20)
                if workspace is None
                else workspace
            )
            self._build(cupy, biases, activation, capacity, dense_rows)
        except BaseException:  # the cuBLAS handles have no finalizer: nothing the layer made outlives the failure
            self._own_ws = self._own_ws and hasattr(self, "workspace")
            self.close()
            raise

    def _build(self, cupy: Any, biases: Any, activation: Any, capacity: int | None, dense_rows: int | None) -> None:
        """The kernels, the scratch views and (with ``capacity``) the fixed-capacity path of :meth:`__init__`."""
        sc = self.scratch
        self.logits, self.xs, self.gate_up_out, self.act, self.y = sc.logits, sc.xs, sc.gate_up_out, sc.act, sc.y
        self.row_token, self.row_of, self.route_weights = sc.row_token, sc.row_of, sc.route_weights
        names = (
            *("moe_combine", "moe_route", "moe_slots", "moe_scatter", "moe_bias_act", "moe_combine_bias"),
            *("moe_router_bias", "moe_dense_act", "moe_dense_combine", "moe_localize"),
        )
        (
            self._combine,
            self._route_fn,
            self._slots_fn,
            self._scatter_fn,
            self._act_fn,
            self._combine_bias_fn,
            self._router_bias_fn,
            self._dense_act_fn,
            self._dense_combine_fn,
            self._localize_fn,
        ) = functions(cupy, "moe.cu", names)
        self.dense_rows = dense_rows or 0
        # where each expert's rows start in the host path's grouped buffers (written per forward; biased layers)
        self._seg = cupy.zeros(self.num_experts + 1, cupy.int32)
        self._plain = biases is None and activation is None  # fi_ffi.silu_and_mul and moe_combine serve
        self.last_routing: tuple[np.ndarray, np.ndarray, ExpertGroups] | None = None
        self.capacity = 0
        self._grouped: Any = None  # the grouped GEMV, made with the fixed-capacity path
        # the weights the grouped GEMV reads: the 16-bit experts, or the e4m3 ones as stored
        self._gemv_w = (self.weights.gate_up, self.weights.down)
        # the kernels of experts kept as stored (e4m3 or MXFP4: their grouped GEMV and 16-bit copy)
        self._fp8: Any = None
        e, h, i = self.num_experts, self.hidden, self.intermediate
        if self.fp8_experts is not None:
            from ..kernels.fp8_moe_gemv import Fp8GroupedGemv

            f = self.fp8_experts
            self._fp8 = Fp8GroupedGemv(self.dtype, self.stream)
            self._fp8.add(int(f.gate_up.data.ptr), int(f.gate_up_scales.data.ptr), e, 2 * i, h, f.block, f.tiled)
            self._fp8.add(int(f.down.data.ptr), int(f.down_scales.data.ptr), e, h, i, f.block, f.tiled)
            self._gemv_w = (f.gate_up, f.down)
        elif self.mxfp4_experts is not None:
            from ..kernels.mxfp4_moe_gemv import Mxfp4GroupedGemv

            m = self.mxfp4_experts
            self._fp8 = Mxfp4GroupedGemv(self.dtype, self.stream)
            self._fp8.add(int(m.gate_up.data.ptr), int(m.gate_up_scales.data.ptr), e, 2 * i, h)
            self._fp8.add(int(m.down.data.ptr), int(m.down_scales.data.ptr), e, h, i)
            self._gemv_w = (m.gate_up, m.down)
        # the launches of a GEMV or dense step packed per call site (_run_packed)
        self._packed_steps: dict[tuple[Any, ...], list[Any]] = {}
        if capacity is not None:
            self._build_static(capacity)

    def _check_extras(self, biases: Any, activation: Any, top_k: int, cupy: Any) -> None:
        if activation is not None and not isinstance(activation, ClampedSwiGLU):
            raise TypeError(
                f"activation: expected None (SiLU-and-mul) or a ClampedSwiGLU, got {type(activation).__name__}"
            )
        if biases is None:
            if activation is not None:
                raise ValueError("activation: a ClampedSwiGLU layer needs its biases (biases=MoEBiases(...), gpt-oss)")
            return
        if not isinstance(biases, MoEBiases):
            raise TypeError(f"biases: expected None or a MoEBiases, got {type(biases).__name__}")
        e, h, i = self.num_experts, self.hidden, self.intermediate
        for name, shape in (("router", (e,)), ("gate_up", (e, 2 * i)), ("down", (e, h))):
            arr = getattr(biases, name)
            if (
                not isinstance(arr, cupy.ndarray)
                or arr.shape != shape
                or arr.dtype != cupy.float32
                or not arr.flags.c_contiguous
            ):
                raise ValueError(f"biases.{name}: expected a contiguous float32 CuPy array of shape {shape}")
        if top_k > 64:
            raise ValueError(f"top_k: expected at most 64 with biases (the biased combine's limit), got {top_k}")

    def _router_logits(self, x: Any, t: int) -> None:
        """``logits[:t] = x[:t] @ router.T`` (float32), plus the router bias when the layer has one."""
        e, h = self.num_experts, self.hidden
        x_ld = x.strides[0] // x.itemsize
        self.dense.linear(
            t, int(x.data.ptr), x_ld, int(self.weights.router.data.ptr), e, h, int(self.logits.data.ptr), e,
            self._ab, CUDA_R_32F,
        )  # fmt: skip
        if self.biases is not None:
            self._router_bias_fn((t,), (128,), (self.logits, self.biases.router, np.int32(e)), stream=self.stream)

    def _activate(self, gu: Any, act: Any, rows: int, seg: Any) -> None:
        """``act[:rows] = activation(gu[:rows] + gate/up bias)``; ``seg``: the experts' first rows (device)."""
        i = self.intermediate
        if self._plain:
            kernels.silu_and_mul(self._t(gu, (rows, 2 * i)), self._t(act, (rows, i)), stream=self.stream.ptr)
            return
        a, b = self.activation, self.biases
        assert b is not None  # _plain otherwise
        alpha, limit = (a.alpha, a.limit) if a is not None else (0.0, 0.0)
        args = (gu, b.gate_up, seg, np.int32(self.num_experts), np.int64(i), np.int32(a is not None),
                np.float32(alpha), np.float32(limit), np.int32(self._bf16), act)  # fmt: skip
        self._act_fn((rows,), (min(256, -(-i // 32) * 32),), args, stream=self.stream)

    def _combine_grid(self, t: int) -> tuple[int, int]:
        """The combine kernels' grid for ``t`` tokens: one block of 256 threads per 256 columns of each token (as
        the row copies of :class:`~fi_engine.kernels.row_kernels.RowKernels` spread theirs)."""
        return t, column_blocks(self.hidden)

    def _combine_rows(
        self, y: Any, row_of: Any, weights: Any, out: Any, t: int, seg: Any, down_bias: bool = True
    ) -> None:
        """``out[t] = sum_j w[t, j] * (y[row_of[t, j]] (+ the expert's down bias))``; ``down_bias`` False: the rows
        ``y`` hold it already (the MXFP4 down GEMV adds it as it writes)."""
        k, h = self.top_k, self.hidden
        ld = out.strides[0] // out.itemsize
        if self.biases is None or not down_bias:
            args = (y, row_of, weights, out, np.int32(k), np.int64(h), np.int64(ld), np.int32(self._bf16))
            self._combine(self._combine_grid(t), (256,), args, stream=self.stream)
        else:
            args = (y, row_of, weights, self.biases.down, seg, np.int32(self.num_experts), out, np.int32(k),  # type: ignore[assignment]
                    np.int64(h), np.int64(ld), np.int32(self._bf16))  # fmt: skip
            self._combine_bias_fn(self._combine_grid(t), (256,), args, stream=self.stream)

    def _build_static(self, capacity: int) -> None:
        """Buffers and prepared grouped GEMMs of the fixed-capacity path: expert ``e`` owns rows
        ``[e * capacity, (e + 1) * capacity)`` of every activation buffer, the tokens that chose it the first of
        them, so the GEMMs' argument arrays are copied once; only each expert's row count (the ``m`` of its
        problem) changes per step, written on the device by ``moe_slots``."""
        import cupy

        self.capacity = c = capacity
        e, h, i = self.num_experts, self.hidden, self.intermediate
        rows = e * c
        sc = self.scratch
        self.s_xs, self.s_gu, self.s_act, self.s_y = sc.s_xs, sc.s_gu, sc.s_act, sc.s_y
        self.s_experts, self.s_row_of, self.s_weights = sc.s_experts, sc.s_row_of, sc.s_weights
        nbytes = kernels.segment_gemm_args_bytes(e)
        self._s_args = cupy.zeros(2 * nbytes, cupy.uint8)
        seg = (np.arange(e + 1) * c).astype(np.int32)
        self._s_seg = cupy.asarray(seg)  # expert e owns rows [e * c, (e + 1) * c): the biased kernels' row -> expert
        ptr = int(self._s_args.data.ptr)
        args_gu = kernels.Tensor(ptr, (nbytes,), "uint8", self.device_id)
        args_down = kernels.Tensor(ptr + nbytes, (nbytes,), "uint8", self.device_id)

        def prepare(x: Any, w: Any, out: Any, n: int, k: int, args: Any) -> Any:
            """The grouped GEMM ``out[rows, n] = x[rows, k] @ w[e]^T`` (``w``: ``[e, n, k]``) over the experts' row
            segments ``seg``, its argument arrays copied into ``args``."""
            x_t, w_t, out_t = self._t(x, (rows, k)), self._t(w, (e, n, k)), self._t(out, (rows, n))
            return kernels.prepare_segment_gemm(
                x_t, w_t, e, True, out_t, workspace=self.workspace, args_buffer=args, seg_indptr=seg,
                backend=self.backend, stream=self.stream.ptr,
            )  # fmt: skip

        cupy.cuda.Device().synchronize()  # the zero fills (legacy stream) before the synchronous argument copies
        self._gemm_gu = prepare(self.s_xs, self.weights.gate_up, self.s_gu, 2 * i, h, args_gu)
        self._gemm_down = prepare(self.s_act, self.weights.down, self.s_y, h, i, args_down)
        # the problem sizes, (m, n, k) int32 per expert, inside our argument buffer: moe_slots writes each m
        for gemm in (self._gemm_gu, self._gemm_down):
            if gemm.count != e or list(gemm.segments) != list(range(e)):
                raise AssertionError(f"the fixed-capacity GEMM has {gemm.count} problems, expected one per expert")
        base = int(self._s_args.data.ptr)
        self._s_problems = [
            self._s_args[off : off + 12 * e].view(cupy.int32)
            for off in (g.problem_sizes.data_ptr - base for g in (self._gemm_gu, self._gemm_down))
        ]
        self._slots_threads = min(1024, -(-e // 32) * 32)
        self._s_gu_t = self._t(self.s_gu, (rows, 2 * i))
        self._s_act_t = self._t(self.s_act, (rows, i))
        # the grouped GEMV (fi_engine.kernels.moe_gemv) for steps of at most gemv_tokens tokens of a plain layer (SiLU,
        # no
        # biases): each chosen expert's weights streamed once for its few rows, with no padding to GEMM tiles
        if self._plain or self.mxfp4_experts is not None:  # (the MXFP4 GEMV adds biases, makes the clamped SwiGLU)
            from ..kernels.moe_gemv import GroupedGemv

            try:  # e4m3 experts: their own GEMV (made with the layer), which reads them as stored
                self._grouped = self._fp8 or GroupedGemv(self.dtype, self.stream)
            except Exception:  # NVRTC or the device refusing: the grouped GEMM serves every step
                self._grouped = None
            self._g_rows = cupy.arange(c * self.top_k, dtype=cupy.int32)  # assignment a's output is row a
            # the router GEMV's count of finished blocks (FusedGemvs.prepared_router; 0 between its launches)
            self._route_done = cupy.zeros(1, cupy.uint32)

    gemv_fused_silu = True
    """The grouped GEMV step's down projection makes SiLU-and-mul itself as it stages its input rows (one launch
    fewer per layer and step, and no activation buffer written and read back); False: FlashInfer's
    ``silu_and_mul`` as a launch of its own before it (the same arithmetic). Read when a step is packed; set it on
    the class to compare (``benchmarks/bench_mixtral.py --variants no-fused-silu``)."""

    gemv_tokens = 8
    """Steps of at most this many tokens take the grouped GEMV in :meth:`forward_static` (where the layer has it);
    longer ones the fixed-capacity grouped GEMM (benchmarks/RESULTS.md: where each is faster on an H100). A layer
    of e4m3 experts takes it for every step it fits: the GEMM would read their 16-bit copy, written first."""

    def _gemv_serves(self, t: int) -> bool:
        g = self._grouped
        k, h, i = self.top_k, self.hidden, self.intermediate
        short = t <= self.gemv_tokens or self._fp8 is not None
        return g is not None and short and g.fits(t, k, 2 * i, h) and g.fits(t, k, h, i)

    def _copy_launches(self) -> list[tuple[int, tuple[int, int], int, int, list[int]]]:
        """The launches writing the e4m3 experts' 16-bit copy into ``weights.gate_up`` / ``weights.down`` (none
        for 16-bit experts), each as :meth:`Fp8GroupedGemv.launch
        <fi_engine.kernels.fp8_moe_gemv.Fp8GroupedGemv.launch>` gives it."""
        f = self.fp8_experts or self.mxfp4_experts
        if f is None:
            return []
        return [
            self._fp8.dequantize_launch(int(q.data.ptr), int(out.data.ptr))
            for q, out in ((f.gate_up, self.weights.gate_up), (f.down, self.weights.down))
        ]

    def _write_copy(self) -> None:
        """Write the e4m3 experts' 16-bit copy on the layer's stream before a path that reads 16-bit weights (the
        copy is shared with the other layers: written before each use)."""
        f = self.fp8_experts or self.mxfp4_experts
        if f is not None:
            self._fp8.dequantize(f.gate_up, self.weights.gate_up)
            self._fp8.dequantize(f.down, self.weights.down)

    def _gemv_step(self, x: Any, out: Any, t: int) -> Any:
        """:meth:`forward_static` over the grouped GEMV as five launches packed once per ``(x, out, t)``: the router
        GEMM, the device routing, the gate/up GEMV, the down GEMV (SiLU-and-mul made as it stages its rows; a
        launch of its own before it where :attr:`gemv_fused_silu` is off) and the combine."""
        return self._run_packed(self._pack_gemv_step, x, out, t)

    def _run_packed(self, pack: Any, x: Any, out: Any, t: int) -> Any:
        """Run a step's launches packed once per call site (:meth:`_packed`)."""
        for call in self._packed(pack, x, out, t):
            call()
        return out

    def _packed(self, pack: Any, x: Any, out: Any, t: int, *extra: Any) -> list[Any]:
        """A step's launches packed once per call site ``(pack, x, out, t, *extra)`` by ``pack(x, out, t, x_ld,
        out_ld, *extra)`` (a decode step calls the same buffers every time: an eager step then pays about one FFI
        call per launch instead of a CuPy kernel call's argument handling). ``extra``: values (addresses, floats).
        At most 64 call sites are kept, then the cache starts again."""
        x_ld, out_ld = x.strides[0] // x.itemsize, out.strides[0] // out.itemsize
        key = (pack.__name__, int(x.data.ptr), x_ld, int(out.data.ptr), out_ld, t, *extra)
        calls = self._packed_steps.get(key)
        if calls is None:
            if len(self._packed_steps) >= 64:
                self._packed_steps.clear()
            calls = self._packed_steps[key] = pack(x, out, t, x_ld, out_ld, *extra)
        return calls

    def prepared_step(self, x: Any, out: Any, tokens: int, dense: bool) -> list[Any] | None:
        """The launches of one ``out[:tokens] = MoE(x[:tokens])`` step, packed once per call site, for a caller that
        issues them itself among its own packed launches (the engine's fused decode step): :meth:`forward_dense`'s
        (``dense``) or :meth:`forward_static`'s over the grouped GEMV; None where that path has no packed form here
        (the driver launch path off, no such path built, or the grouped GEMV not serving ``tokens``). Each call
        launches on the layer's stream; ``x`` and ``out`` as :meth:`forward_static` takes them."""
        self._check_static(x, out)
        t = _token_count(tokens, x)
        if not self.packs_step(t, dense) or t > min(x.shape[0], out.shape[0]):
            return None
        return self._packed(self._pack_dense_step if dense else self._pack_gemv_step, x, out, t)

    fold_norm_into_router = True
    """Whether :meth:`prepared_normed_step` serves (the fused decode step then folds the post-attention norm and
    the routing into the router GEMV's launch); False: None, and the engine keeps the separate norm, router GEMV
    and routing launches. Read when a step is packed; set it on the class to compare
    (``benchmarks/bench_layer_host.py --unfolded``)."""

    def prepared_normed_step(
        self, x: Any, out: Any, tokens: int, residual: int, residual_out: int, norm_weight: int, eps: float
    ) -> list[Any] | None:
        """:meth:`prepared_step`'s grouped-GEMV step with the post-attention ``fused_add_rmsnorm`` folded into the
        router's launch: ``residual_out[:t] = residual[:t] + x[:t]``, the rows ``rmsnorm(residual_out) *
        norm_weight`` into the layer's scratch ``xs`` (the experts read them there), the router GEMV with the
        routing as its epilogue (``FusedGemvs.prepared_router``), then the experts and the combine into ``out`` as
        :meth:`prepared_step` makes them: four launches where a norm and :meth:`prepared_step` make six.
        ``residual`` and ``residual_out`` (different buffers: every block reads one while the first writes the
        other) are addresses of 16-bit rows of ``hidden`` elements, row stride ``hidden``; ``norm_weight`` of
        ``hidden`` 16-bit values; ``x`` and ``out`` as :meth:`forward_static` takes them (``x`` is read, not
        changed). None where this form does not serve: more tokens than the fused GEMV's prologue takes
        (``FusedGemvs.fits``), no router kernel compiled, no grouped-GEMV step (:meth:`packs_step`), or
        :attr:`fold_norm_into_router` off."""
        self._check_static(x, out)
        t = _token_count(tokens, x)
        for name, value in (("residual", residual), ("residual_out", residual_out), ("norm_weight", norm_weight)):
            arg_int(name, value, 0, (1 << 64) - 1)  # (values that key the packed launches: never a list)
        float32_bits("eps", eps)
        d = self.dense
        if (
            not self.fold_norm_into_router
            or self.biases is not None  # (the router epilogue adds no bias)
            or not self.packs_step(t, False)
            or not d.fused.has_router(self._ab)
            or not d.fused.fits(t, self.hidden)
            or t > min(x.shape[0], out.shape[0], self.xs.shape[0])
        ):
            return None
        return self._packed(self._pack_normed_step, x, out, t, residual, residual_out, norm_weight, eps)

    def packs_step(self, tokens: int, dense: bool) -> bool:
        """Whether :meth:`prepared_step` has packed launches for a step of ``tokens`` tokens (a few comparisons)."""
        if not self.dense.gemv or tokens < 1:
            return False
        if dense:
            return tokens <= self.dense_rows
        return tokens <= self.capacity and self._gemv_serves(tokens)

    def _pack_gemv_step(self, x: Any, out: Any, t: int, x_ld: int, out_ld: int) -> list[Any]:
        from ..kernels.cuda_sources import function_ptr

        d = self.dense
        e, h, k = self.num_experts, self.hidden, self.top_k
        xp = int(x.data.ptr)
        logits, experts, weights = (int(a.data.ptr) for a in (self.logits, self.s_experts, self.s_weights))
        router_w = int(self.weights.router.data.ptr)
        router = d.prepared_linear(t, xp, x_ld, router_w, e, h, logits, e, self._ab, CUDA_R_32F)
        bias = []
        if self.biases is not None:  # the router's bias added to its logits before the routing
            bias_args = [logits, int(self.biases.router.data.ptr), e]
            bias = [
                d.launcher.prepared_kernel(
                    function_ptr(self._router_bias_fn), (t, 1), 128, 0, bias_args, "moe_router_bias"
                )
            ]
        route_args = [logits, e, k, 1 if self.renormalize else 0, t, experts, weights]
        route = d.launcher.prepared_kernel(
            function_ptr(self._route_fn), ((t + 127) // 128, 1), 128, 0, route_args, "moe_route"
        )
        return [router, *bias, route, *self._pack_gemv_experts(xp, x_ld, int(out.data.ptr), out_ld, t)]

    def _pack_normed_step(
        self,
        x: Any,
        out: Any,
        t: int,
        x_ld: int,
        out_ld: int,
        residual: int,
        residual_out: int,
        norm_weight: int,
        eps: float,
    ) -> list[Any]:
        from ..kernels.fused_args import ADD_NORM, RouterEpilogue

        e, h, k = self.num_experts, self.hidden, self.top_k
        logits, experts, weights = (int(a.data.ptr) for a in (self.logits, self.s_experts, self.s_weights))
        normed = int(self.xs.data.ptr)
        route = RouterEpilogue(normed, h, k, bool(self.renormalize), experts, weights, int(self._route_done.data.ptr))
        router = self.dense.fused.prepared_router(route, ADD_NORM, t, int(x.data.ptr), x_ld,
                                                  int(self.weights.router.data.ptr), e, h, logits, e, self._ab,
                                                  CUDA_R_32F, residual, h, norm_weight, residual_out, eps)  # fmt: skip
        return [router, *self._pack_gemv_experts(normed, h, int(out.data.ptr), out_ld, t)]

    def _pack_gemv_experts(self, xp: int, x_ld: int, op: int, out_ld: int, t: int) -> list[Any]:
        """The grouped-GEMV step's launches after the routing (gate/up, SiLU-and-mul where it is its own launch,
        down, combine), packed: the input rows at address ``xp`` (row stride ``x_ld``), the output's at ``op``."""
        from ..kernels.cuda_sources import function_ptr

        d, g = self.dense, self._grouped
        e, h, i, k = self.num_experts, self.hidden, self.intermediate, self.top_k
        experts, weights = (int(a.data.ptr) for a in (self.s_experts, self.s_weights))
        gu, act, y = (int(a.data.ptr) for a in (self.gate_up_out, self.act, self.y))
        rows = t * k
        w_gate_up, w_down = (int(a.data.ptr) for a in self._gemv_w)
        up_kw, down_kw = self._biased_gemv()
        fn, grid, block, smem, args = g.launch(xp, x_ld, k, experts, t, k, w_gate_up, e, 2 * i, h, gu, 2 * i, **up_kw)
        gate_up = d.launcher.prepared_kernel(fn, grid, block, smem, args, "grouped gemv (gate/up)")
        if self.gemv_fused_silu or down_kw:  # the down GEMV stages the activation itself: five launches
            fn, grid, block, smem, args = g.launch(gu, 2 * i, 1, experts, t, k, w_down, e, h, i, y, h, True, **down_kw)
            activation = []
        else:
            gu_t, act_t = self._t(self.gate_up_out, (rows, 2 * i)), self._t(self.act, (rows, i))
            # packed once as the other launches are: one FFI call per step instead of the op call's checks
            activation = [kernels.prepared_silu_and_mul(gu_t, act_t, self.stream.ptr)]
            fn, grid, block, smem, args = g.launch(act, i, 1, experts, t, k, w_down, e, h, i, y, h)
        down = d.launcher.prepared_kernel(fn, grid, block, smem, args, "grouped gemv (down)")
        combine_args = [y, int(self._g_rows.data.ptr), weights, op, k, h, out_ld, self._bf16]
        combine = d.launcher.prepared_kernel(
            function_ptr(self._combine), self._combine_grid(t), 256, 0, combine_args, "moe_combine"
        )
        return [gate_up, *activation, down, combine]

    def _biased_gemv(self, arrays: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """The extra arguments of the gate/up and down GEMVs of a biased layer (MXFP4 experts only, always with the
        clamped SwiGLU: ``_check_mxfp4_experts``; its kernels add the experts' biases as they write, the down one
        making the activation as it stages); empty for a plain layer. ``arrays``: the biases as CuPy arrays (the
        GEMV's ``__call__``), else addresses (its ``launch``)."""
        b, a = self.biases, self.activation
        if b is None:
            return {}, {}
        assert a is not None  # (biases without the clamped SwiGLU take no GEMV: the layer's check refused them)

        def ref(arr: Any) -> Any:
            return arr if arrays else int(arr.data.ptr)

        down = {"bias": ref(b.down), "act": "swiglu", "alpha": a.alpha, "limit": a.limit}
        return {"bias": ref(b.gate_up), "act": "none"}, down

    def _gemv_experts(self, x: Any, out: Any, t: int) -> Any:
        """The experts of :meth:`forward_static` as two grouped GEMVs over the ``t * k`` assignments: gate/up
        (input rows: the tokens) into ``gate_up_out``, down (input rows: the assignments' activations, SiLU-and-mul
        of their ``gate_up_out`` rows, made by the down GEMV as it stages them or, :attr:`gemv_fused_silu` off, into
        ``act`` before it) into ``y``, then the combine over each token's rows ``t * k + j``."""
        e, h, i, k = self.num_experts, self.hidden, self.intermediate, self.top_k
        g, (w_gate_up, w_down) = self._grouped, self._gemv_w
        up_kw, down_kw = self._biased_gemv(arrays=True)
        g(x, k, self.s_experts, t, k, w_gate_up, e, 2 * i, h, self.gate_up_out, **up_kw)
        if down_kw:  # the biased MXFP4 GEMVs: the bias added, the activation made by the down GEMV; a plain combine
            g(self.gate_up_out, 1, self.s_experts, t, k, w_down, e, h, i, self.y, True, **down_kw)
            self._combine_rows(self.y, self._g_rows, self.s_weights, out, t, self._s_seg, down_bias=False)
            return out
        if self.gemv_fused_silu:  # SiLU-and-mul made as the down GEMV stages its rows
            g(self.gate_up_out, 1, self.s_experts, t, k, w_down, e, h, i, self.y, gated=True)
        else:
            self._activate(self.gate_up_out, self.act, t * k, self._s_seg)
            g(self.act, 1, self.s_experts, t, k, w_down, e, h, i, self.y)
        self._combine_rows(self.y, self._g_rows, self.s_weights, out, t, self._s_seg)
        return out

    def forward_static(self, x: Any, out: Any, tokens: int | None = None) -> Any:
        """``out[:T] = MoE(x[:T])`` with no host synchronization and no host routing: router GEMM, routing on the
        device (softmax + top-k, as :func:`~fi_engine.layers.moe_routing.softmax_topk`), a scatter into each chosen
        expert's fixed rows, the two grouped GEMMs over every expert's ``capacity`` rows (prepared once), the
        combine. Everything is a launch on the layer's stream, so a CUDA graph can capture it. Each expert's token
        count becomes its GEMM rows on the device, so only the chosen experts' weights are read, as in
        :meth:`forward`. Needs ``capacity`` at construction; ``T <= capacity``."""
        if not self.capacity:
            raise ValueError("forward_static: build the layer with capacity= (the most tokens of a static step)")
        self._check_static(x, out)
        t = _token_count(tokens, x)
        if not 0 <= t <= min(self.capacity, x.shape[0], out.shape[0]):
            raise ValueError(f"tokens: expected 0..capacity ({self.capacity}) within the rows of x and out, got {t}")
        if t == 0:
            return out
        if self.dense.gemv and self._gemv_serves(t):
            return self._gemv_step(x, out, t)
        e, k = self.num_experts, self.top_k
        s = self.stream
        with s:
            self._router_logits(x, t)
            route = (self.logits, np.int32(e), np.int32(k), np.int32(1 if self.renormalize else 0), np.int32(t),
                     self.s_experts, self.s_weights)  # fmt: skip
            self._route_fn(((t + 127) // 128,), (128,), route, stream=s)
            if self._gemv_serves(t):
                return self._gemv_experts(x, out, t)
        return self._static_experts(x, out, t)

    def forward_static_routed(self, x: Any, out: Any, tokens: int) -> Any:
        """:meth:`forward_static` after its routing, for a routing made on the device by the caller (DeepSeek's
        grouped top-k): the first ``tokens * top_k`` entries of ``s_experts`` (int32 expert ids, ``[tokens, k]``
        row-major, distinct per token) and ``s_weights`` (float32, the combine's weights, scaling included) are
        already written on the layer's stream. Capturable as :meth:`forward_static` is."""
        if not self.capacity:
            raise ValueError("forward_static_routed: build the layer with capacity= (the most tokens of a static step)")
        self._check_static(x, out)
        tokens = _token_count(tokens, x)
        if not 0 <= tokens <= self.capacity:
            raise ValueError(f"tokens: expected 0..capacity ({self.capacity}), got {tokens}")
        if tokens > min(x.shape[0], out.shape[0]):
            raise ValueError(f"tokens: {tokens} exceeds the rows of x ({x.shape[0]}) or out ({out.shape[0]})")
        if tokens and self._gemv_serves(tokens):
            with self.stream:
                return self._gemv_experts(x, out, tokens)
        return self._static_experts(x, out, tokens) if tokens else out

    def keep_local_experts(self, first: int, tokens: int) -> None:
        """Make the routing in ``s_experts`` / ``s_weights`` (``tokens * top_k`` entries, written on the layer's
        stream by a routing over every rank's experts: global ids) this layer's, for tensor parallelism split by
        expert, where the layer holds experts ``[first, first + num_experts)`` whole: one launch, in place, on the
        layer's stream (capturable; nothing allocated): an assignment to one of them renumbered from 0, any other
        set to ``num_experts`` with weight 0, which :meth:`forward_static_routed` computes nowhere and adds nothing
        for (:func:`~fi_engine.layers.moe_routing.local_assignments` is the rule on the host). Then the ranks'
        outputs, summed, are the whole layer's, each assignment served by exactly one rank. A layer with expert
        biases or ``dense_rows`` is refused (their combines read every assignment's row)."""
        if not self.capacity:
            raise ValueError("keep_local_experts: build the layer with capacity= (the fixed-capacity routing buffers)")
        if self.biases is not None or self.dense_rows:
            # (the biased combine and the dense-over-experts combine read every assignment's row; only the plain
            # combine skips the weight-0 entries this leaves)
            raise ValueError(
                "keep_local_experts: a layer with expert biases or dense_rows cannot keep only its experts "
                "(split such a model by columns)"
            )
        first = arg_int("first", first, 0, (1 << 31) - 1 - self.num_experts)
        tokens = arg_int("tokens", tokens, 0, self.capacity)
        a = tokens * self.top_k
        if a:
            args = (self.s_experts, self.s_weights, np.int32(a), np.int32(first), np.int32(self.num_experts))
            self._localize_fn(((a + 127) // 128,), (128,), args, stream=self.stream)

    def _check_static(self, x: Any, out: Any) -> None:
        for name, a in (("x", x), ("out", out)):
            if a.ndim != 2 or a.shape[1] != self.hidden or a.strides[1] != a.itemsize:
                raise ValueError(f"{name}: expected [tokens, {self.hidden}] with contiguous rows, got {a.shape}")

    def _static_experts(self, x: Any, out: Any, t: int) -> Any:
        """Slots, scatter, the two prepared grouped GEMMs and the combine of ``t >= 1`` tokens routed into
        ``s_experts`` / ``s_weights``."""
        e, h, k = self.num_experts, self.hidden, self.top_k
        s = self.stream
        with s:
            self._write_copy()
            x_ld = x.strides[0] // x.itemsize
            slots = (self.s_experts, np.int32(e), np.int32(k), np.int32(t), np.int32(self.capacity), self.s_row_of,
                     *self._s_problems)  # fmt: skip
            self._slots_fn((1,), (self._slots_threads,), slots, stream=s)
            self._scatter_fn((t * k,), (256,), (x, np.int64(x_ld), self.s_row_of, np.int32(k), self.s_xs, np.int64(h)),
                             stream=s)  # fmt: skip
            sm80 = self.backend == "sm80" or (self.backend == "auto" and not _is_sm90(self.device_id))
            if sm80:  # the generic grouped GEMM adds into its output
                self.s_gu.fill(0)
                self.s_y.fill(0)
            self._gemm_gu(s.ptr)
            self._activate(self.s_gu, self.s_act, e * self.capacity, self._s_seg)
            self._gemm_down(s.ptr)
            self._combine_rows(self.s_y, self.s_row_of, self.s_weights, out, t, self._s_seg)
        return out

    def forward_dense(self, x: Any, out: Any, tokens: int | None = None) -> Any:
        """``out[:T] = MoE(x[:T])`` computed **dense over the experts**, with no host step (capturable, as
        :meth:`forward_static`): router GEMM and device routing (as :meth:`forward_static`); one GEMM of every
        token against every expert's gate/up rows (``gate_up`` read as one ``[E * 2I, H]`` matrix: ``[T, E * 2I]``);
        bias and activation where the token chose the expert (zeros elsewhere); one strided-batched GEMM, expert
        ``e``'s ``[T, I]`` activations against its ``down[e]`` (float32 ``[E, T, H]``); the combine sums each
        token's ``k`` chosen experts (plus their down biases) with the routing weights. Every expert's weights are
        read once per call, whatever the routing: it pays when ``T * k`` spreads over most experts anyway (one
        large GEMM and one batched GEMM stream the weights faster than ``E`` small grouped-GEMM problems), see
        :func:`choose_path`. Same weights and layouts as the routed paths. Needs ``dense_rows`` at construction;
        ``T <= dense_rows``."""
        if not self.dense_rows:
            raise ValueError("forward_dense: build the layer with dense_rows= (the most tokens of a dense step)")
        self._check_static(x, out)
        t = _token_count(tokens, x)
        if not 0 <= t <= min(self.dense_rows, x.shape[0], out.shape[0]):
            raise ValueError(
                f"tokens: expected 0..dense_rows ({self.dense_rows}) within the rows of x and out, got {t}"
            )
        if t == 0:
            return out
        if self.dense.gemv:  # the driver launch path: its launches packed once per call site
            return self._run_packed(self._pack_dense_step, x, out, t)
        e, h, i, k = self.num_experts, self.hidden, self.intermediate, self.top_k
        sc, s, d = self.scratch, self.stream, self.dense_rows
        with s:
            self._write_copy()
            self._router_logits(x, t)
            route = (self.logits, np.int32(e), np.int32(k), np.int32(1 if self.renormalize else 0), np.int32(t),
                     sc.d_experts, sc.d_weights)  # fmt: skip
            self._route_fn(((t + 127) // 128,), (128,), route, stream=s)
            x_ld = x.strides[0] // x.itemsize
            self.dense.linear(
                t, int(x.data.ptr), x_ld, int(self.weights.gate_up.data.ptr), e * 2 * i, h, int(sc.d_gu.data.ptr),
                e * 2 * i, self._ab, self._ab,
            )  # fmt: skip
            a, b = self.activation, self.biases
            alpha, limit = (a.alpha, a.limit) if a is not None else (0.0, 0.0)
            b_gu = b.gate_up if b is not None else self.logits  # unread without biases
            flags = (np.int32(a is not None), np.float32(alpha), np.float32(limit), np.int32(self._bf16))
            act = (sc.d_gu, b_gu, np.int32(b is not None), sc.d_experts, np.int32(e), np.int32(k), np.int64(i),
                   *flags, sc.d_act)  # fmt: skip
            self._dense_act_fn((t * e,), (min(256, -(-i // 32) * 32),), act, stream=s)
            self.dense.batched_linear(
                e, t, int(sc.d_act.data.ptr), e * i, i, int(self.weights.down.data.ptr), h, i, h * i,
                int(sc.d_y.data.ptr), h, d * h, self._ab, CUDA_R_32F,
            )  # fmt: skip
            b_down = b.down if b is not None else self.logits  # unread without biases
            ld = out.strides[0] // out.itemsize
            combine = (sc.d_y, np.int64(d), sc.d_experts, sc.d_weights, np.int32(k), b_down, np.int32(b is not None),
                       out, np.int64(h), np.int64(ld), np.int32(self._bf16))  # fmt: skip
            self._dense_combine_fn(self._combine_grid(t), (256,), combine, stream=s)
        return out

    def _pack_dense_step(self, x: Any, out: Any, t: int, x_ld: int, out_ld: int) -> list[Any]:
        """:meth:`forward_dense`'s launches (six, seven with a router bias) with their arguments packed once: the
        router GEMM (and bias), the device routing, the gate/up GEMM over every expert, the activation, the batched
        down GEMMs and the combine (the GEMMs of more than a few rows stay calls of :meth:`Dense.linear` /
        :meth:`Dense.batched_linear`)."""
        from ..kernels.cuda_sources import function_ptr

        d, sc = self.dense, self.scratch
        e, h, i, k, rows = self.num_experts, self.hidden, self.intermediate, self.top_k, self.dense_rows
        xp, op = int(x.data.ptr), int(out.data.ptr)
        logits, experts, weights = (int(a.data.ptr) for a in (self.logits, sc.d_experts, sc.d_weights))
        gu, act, y = (int(a.data.ptr) for a in (sc.d_gu, sc.d_act, sc.d_y))
        a, b = self.activation, self.biases
        calls = [
            d.prepared_linear(t, xp, x_ld, int(self.weights.router.data.ptr), e, h, logits, e, self._ab, CUDA_R_32F)
        ]
        if b is not None:  # the router bias (gpt-oss), as _router_logits adds it
            bias_args = [logits, int(b.router.data.ptr), e]
            calls.append(
                d.launcher.prepared_kernel(
                    function_ptr(self._router_bias_fn), (t, 1), 128, 0, bias_args, "moe_router_bias"
                )
            )
        route_args = [logits, e, k, 1 if self.renormalize else 0, t, experts, weights]
        route = d.launcher.prepared_kernel(
            function_ptr(self._route_fn), ((t + 127) // 128, 1), 128, 0, route_args, "moe_route"
        )
        gate_up = d.prepared_linear(t, xp, x_ld, int(self.weights.gate_up.data.ptr), e * 2 * i, h, gu, e * 2 * i,
                                    self._ab, self._ab)  # fmt: skip
        alpha, limit = (a.alpha, a.limit) if a is not None else (0.0, 0.0)
        b_gu = int((b.gate_up if b is not None else self.logits).data.ptr)  # unread without biases
        # float parameters pass as their float32 bits (an 8-byte slot whose low 4 bytes the kernel reads)
        act_args = [gu, b_gu, int(b is not None), experts, e, k, i, int(a is not None), float32_bits("alpha", alpha),
                    float32_bits("limit", limit), self._bf16, act]  # fmt: skip
        activate = d.launcher.prepared_kernel(
            function_ptr(self._dense_act_fn), (t * e, 1), min(256, -(-i // 32) * 32), 0, act_args, "moe_dense_act"
        )

        def down() -> None:
            d.batched_linear(e, t, act, e * i, i, int(self.weights.down.data.ptr), h, i, h * i, y, h, rows * h,
                             self._ab, CUDA_R_32F)  # fmt: skip

        b_down = int((b.down if b is not None else self.logits).data.ptr)  # unread without biases
        combine_args = [y, rows, experts, weights, k, b_down, int(b is not None), op, h, out_ld, self._bf16]
        combine = d.launcher.prepared_kernel(
            function_ptr(self._dense_combine_fn), self._combine_grid(t), 256, 0, combine_args, "moe_dense_combine"
        )
        copy = [d.launcher.prepared_kernel(*launch, "e4m3 experts' 16-bit copy") for launch in self._copy_launches()]
        return [*copy, *calls, route, gate_up, activate, down, combine]

    def _t(self, arr: Any, shape: tuple[int, ...], dtype: str | None = None) -> kernels.Tensor:
        return kernels.Tensor(int(arr.data.ptr), shape, dtype or self.dtype, self.device_id)

    def route(self, x: Any, tokens: int) -> tuple[np.ndarray, np.ndarray, ExpertGroups]:
        """Router logits on the GPU, then softmax + top-k and grouping on the host (synchronizes the stream)."""
        import cupy

        e = self.num_experts
        self._router_logits(x, tokens)
        logits = cupy.asnumpy(self.logits[:tokens], stream=self.stream)
        self.stream.synchronize()
        weights, experts = softmax_topk(logits, self.top_k, self.renormalize)
        return weights, experts, group_by_expert(experts, e)

    def forward(self, x: Any, out: Any, tokens: int | None = None) -> Any:
        """``out[:T] = MoE(x[:T])`` for CuPy arrays ``x``, ``out`` ``[>= T, hidden]`` of the layer's storage dtype,
        rows contiguous (row strides may be larger); ``T`` defaults to ``x.shape[0]``. Returns ``out``."""
        for name, a in (("x", x), ("out", out)):
            if a.ndim != 2 or a.shape[1] != self.hidden or a.strides[1] != a.itemsize:
                raise ValueError(f"{name}: expected [tokens, {self.hidden}] with contiguous rows, got {a.shape}")
        t = _token_count(tokens, x)
        if t > x.shape[0] or t > out.shape[0]:
            raise ValueError(f"tokens: {t} exceeds the rows of x ({x.shape[0]}) or out ({out.shape[0]})")
        if not 0 <= t <= self.max_tokens:
            raise ValueError(f"tokens: expected 0..max_tokens ({self.max_tokens}), got {t}")
        if t == 0:
            return out
        with self.stream:  # the gather and combine kernels launch on CuPy's current stream
            weights, experts, groups = self.route(x, t)
            self.last_routing = (weights, experts, groups)
            return self.forward_routed(x, out, weights, groups, t)

    def forward_routed(self, x: Any, out: Any, weights: np.ndarray, groups: ExpertGroups, tokens: int) -> Any:
        """Steps 3-7 for a routing decided elsewhere (``weights [T, k]`` float32, ``groups`` of its experts); with
        the layer's stream current (``forward`` makes it so). The experts compute the first ``seg_indptr[-1]``
        sorted rows: every assignment, or fewer where ``groups`` leaves some out
        (:func:`~fi_engine.layers.moe_routing.group_local`: another rank's, weight 0, which the combine skips)."""
        t = tokens
        rows = t * self.top_k
        s = self.stream
        self._write_copy()
        self.row_token[:rows].set(groups.row_token, stream=s)
        self.row_of[:rows].set(groups.row_of.reshape(-1), stream=s)
        self.route_weights[:rows].set(weights.reshape(-1).astype(np.float32), stream=s)
        seg = groups.seg_indptr
        grouped = int(seg[-1])  # the rows the experts compute (the grouped GEMM takes exactly these)
        if grouped:
            self._experts_routed(x, grouped, seg)
        self._combine_rows(self.y, self.row_of, self.route_weights, out, t, self._seg)
        return out

    def _experts_routed(self, x: Any, rows: int, seg: np.ndarray) -> None:
        """:meth:`forward_routed`'s gather of ``rows >= 1`` sorted rows and the experts' grouped GEMMs over them."""
        h, i, s = self.hidden, self.intermediate, self.stream
        x_ld = x.strides[0] // x.itemsize
        self.dense.rows.gather_rows(
            rows, int(x.data.ptr), x_ld, int(self.row_token.data.ptr), int(self.xs.data.ptr), h, h
        )
        sm80 = self.backend == "sm80" or (self.backend == "auto" and not _is_sm90(self.device_id))
        if sm80:  # the generic grouped GEMM adds into its output
            self.gate_up_out[:rows].fill(0)
            self.y[:rows].fill(0)
        handle = s.ptr
        kernels.segment_gemm(
            self._t(self.xs, (rows, h)),
            self._t(self.weights.gate_up, (self.num_experts, 2 * i, h)),
            self.num_experts,
            True,
            self._t(self.gate_up_out, (rows, 2 * i)),
            workspace=self.workspace,
            seg_indptr=seg,
            backend=self.backend,
            stream=handle,
        )  # fmt: skip
        if not self._plain:
            self._seg.set(np.asarray(seg, np.int32), stream=s)
        self._activate(self.gate_up_out, self.act, rows, self._seg)
        kernels.segment_gemm(
            self._t(self.act, (rows, i)),
            self._t(self.weights.down, (self.num_experts, h, i)),
            self.num_experts,
            True,
            self._t(self.y, (rows, h)),
            workspace=self.workspace,
            seg_indptr=seg,
            backend=self.backend,
            stream=handle,
        )  # fmt: skip

    def close(self) -> None:
        """Free what the layer made for itself (its workspace, its cuBLAS handle). Idempotent."""
        if self._own_ws:
            self.workspace.close()
        if self._own_dense:
            self.dense.close()


def _check_fp8_experts(fp8: Any, shapes: tuple[int, int, int], biases: Any, activation: Any) -> None:
    """Refuse ``fp8_experts`` that are no :class:`~fi_engine.kernels.fp8_moe_gemv.Fp8Experts` of the layer's
    ``(experts, hidden, intermediate)`` or come with biases or another activation (ValueError/TypeError naming
    it)."""
    if fp8 is None:
        return
    from ..kernels.fp8_moe_gemv import Fp8Experts

    if not isinstance(fp8, Fp8Experts):
        raise TypeError(f"fp8_experts: expected None or an Fp8Experts, got {type(fp8).__name__}")
    if fp8.shapes() != shapes:
        raise ValueError(f"fp8_experts: experts of (experts, hidden, intermediate) {fp8.shapes()}, the layer's are "
                         f"{shapes}")  # fmt: skip
    if biases is not None or activation is not None:
        raise ValueError("fp8_experts: e4m3 experts are served for SiLU experts without biases; pass biases=None "
                         "and activation=None, or 16-bit experts")  # fmt: skip


def _token_count(tokens: Any, x: Any) -> int:
    """A forward's ``tokens`` (None: the rows of ``x``) as an int; TypeError naming it otherwise (a bool or a float
    is no count). The range is the caller's to check."""
    t = x.shape[0] if tokens is None else tokens
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise TypeError(f"tokens: expected an int (a count of token rows) or None, got {type(t).__name__}")
    return int(t)


def _is_sm90(device_id: int) -> bool:
    """Whether CUDA device ``device_id`` is SM 9.x (False where it cannot be asked: no GPU or driver)."""
    from ..kernels.system import FiFFIError, compute_capability

    try:
        return compute_capability(device_id)[0] == 9
    except FiFFIError:
        return False


def _check_mxfp4_experts(mxfp4: Any, fp8: Any, shapes: tuple[int, int, int], biases: Any, activation: Any) -> None:
    """Refuse ``mxfp4_experts`` that are no :class:`~fi_engine.kernels.mxfp4_moe_gemv.Mxfp4Experts` of the layer's
    ``(experts, hidden, intermediate)``, that come with ``fp8_experts``, or with biases but SiLU (the MXFP4 GEMVs
    serve plain SiLU experts and gpt-oss's biased clamped SwiGLU ones) (ValueError/TypeError naming it)."""
    if mxfp4 is None:
        return
    from ..kernels.mxfp4_moe_gemv import Mxfp4Experts

    if not isinstance(mxfp4, Mxfp4Experts):
        raise TypeError(f"mxfp4_experts: expected None or an Mxfp4Experts, got {type(mxfp4).__name__}")
    if fp8 is not None:
        raise ValueError("mxfp4_experts: a layer's experts are e4m3 (fp8_experts) or MXFP4, not both")
    if mxfp4.shapes() != shapes:
        raise ValueError(f"mxfp4_experts: experts of (experts, hidden, intermediate) {mxfp4.shapes()}, the layer's "
                         f"are {shapes}")  # fmt: skip
    if biases is not None and activation is None:
        raise ValueError(
            "mxfp4_experts: MXFP4 experts with biases are served with the clamped SwiGLU (gpt-oss's: "
            "activation=ClampedSwiGLU(...)); pass biases=None for SiLU experts, or 16-bit experts"
        )

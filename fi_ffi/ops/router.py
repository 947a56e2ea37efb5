"""Mixture-of-experts routing kernels of DeepSeek-V3 (and Mistral Large 3): the router GEMM and the fused top-k.

- :func:`mm_M1_16_K7168_N256` (``dsv3_router_gemm`` module, entry ``dsv3_router_gemm_op``): DeepSeek-V3's router
  logits ``out[t, e] = sum_k mat_a[t, k] * mat_b[k, e]`` for 1..16 tokens, hidden 7168, 256 experts, bfloat16 in,
  float32 out. :func:`mm_M1_16_K7168_N128` (``ml3_router_gemm_op``): the same for Mistral Large 3's 128 experts,
  bfloat16 out. The kernels are compiled for exactly these sizes (anything else is refused before the call).
- :func:`fused_topk_deepseek` (``dsv3_fused_routing`` module, entry ``NoAuxTc``): DeepSeek-V3's grouped top-k
  with a correction bias ("noaux_tc"), per token ``t``:

  1. ``s[e] = sigmoid(scores[t, e])``, ``b[e] = s[e] + bias[e]`` (the bias only steers the choice);
  2. with ``n_group > 1``: the experts form ``n_group`` consecutive groups; a group's score is the sum of its two
     largest ``b``; the ``topk_group`` best groups are kept (the others are out of the race);
  3. the ``topk`` experts of largest ``b`` among the kept ones are chosen (``topk_indices``, int32, in
     decreasing ``b``);
  4. ``topk_values[t, i] = s[e_i] / sum_j s[e_j] * routed_scaling_factor`` (computed in float32, stored in
     ``scores``' dtype).

All calls are asynchronous on ``stream`` and never synchronize. Outputs must not overlap the inputs (the
kernels read the inputs while other blocks write outputs): ``out`` vs ``mat_a``/``mat_b``; ``topk_values`` and
``topk_indices`` vs ``scores``/``bias`` and each other.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ..abi.wire import BOOL, FLOAT, INT, Param, declare, tensor, tensors
from ..dtypes import bfloat16, float16, float32, int32
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.protocols import StreamLike, TensorLike, TensorT

_ROUTER_PARAMS: list[Param | tuple[str, str]] = [
    *tensors("mat_a", "mat_b"),
    tensor("out", output=True),
    ("launch_with_pdl", BOOL),
]
DSV3_ROUTER_GEMM = declare("dsv3_router_gemm_op", _ROUTER_PARAMS)
ML3_ROUTER_GEMM = declare("ml3_router_gemm_op", _ROUTER_PARAMS)
NOAUX_TC = declare(
    "NoAuxTc",
    [
        *tensors("scores", "bias"),
        ("n_group", INT),
        ("topk_group", INT),
        ("topk", INT),
        ("routed_scaling_factor", FLOAT),
        *tensors("topk_values", "topk_indices", output=True),
        ("launch_with_pdl", BOOL),
    ],
)
DECLARATIONS = (
    ("dsv3_router_gemm", DSV3_ROUTER_GEMM),
    ("dsv3_router_gemm", ML3_ROUTER_GEMM),
    ("dsv3_fused_routing", NOAUX_TC),
)

HIDDEN = 7168  # the router GEMM kernels are compiled for this hidden size only
MAX_TOKENS = 16  # ... and for 1..16 tokens
_VECTOR = 16  # bytes per vector load of the router GEMM

# the fused routing kernel's limits (noAuxTcKernels.cu): experts per launch, groups, chosen experts and groups
MAX_EXPERTS_ONE_GROUP = 384
MAX_EXPERTS_GROUPED = 256
MAX_EXPERTS_PER_GROUP = 32  # one warp per group
MAX_CANDIDATES = 128  # experts of the kept groups
MAX_TOPK = 8
MAX_TOPK_GROUP = 4
_SCORE_DTYPES = (float32, float16, bfloat16)


def _router_check(experts: int, out_dtype: Any) -> Any:
    def check(a: SimpleNamespace) -> PointerRules:
        x, w, o = a.mat_a, a.mat_b, a.out
        checks.ndim("mat_a", x, 2, "[num_tokens, 7168]")
        checks.dtype_in("mat_a", x, (bfloat16,))
        checks.cuda("mat_a", x)
        tokens = x.shape[0]
        if not 1 <= tokens <= MAX_TOKENS or x.shape[1] != HIDDEN:
            raise ValueError(
                f"mat_a: expected shape [num_tokens, {HIDDEN}] with 1 <= num_tokens <= {MAX_TOKENS} (the kernel is "
                f"compiled for these sizes only), got {x.shape}"
            )
        checks.contiguous("mat_a", x)
        checks.ndim("mat_b", w, 2, f"[{HIDDEN}, {experts}]")
        checks.shape("mat_b", w, (HIDDEN, experts), "[hidden, num_experts]")
        checks.same_dtype("mat_b", w, "mat_a", x)
        checks.same_device("mat_b", w, "mat_a", x)
        checks.cuda("mat_b", w)
        if w.strides != (1, HIDDEN):
            raise ValueError(
                f"mat_b: expected a column-major [{HIDDEN}, {experts}] tensor (strides (1, {HIDDEN}): the transpose "
                f"of a contiguous [{experts}, {HIDDEN}] weight), got strides {w.strides}"
            )
        checks.shape("out", o, (tokens, experts), "[num_tokens, num_experts]")
        checks.dtype_in("out", o, (out_dtype,))
        checks.same_device("out", o, "mat_a", x)
        checks.cuda("out", o)
        checks.contiguous("out", o)
        # the kernel's blocks read all of mat_a while others write their out columns
        return PointerRules({"mat_a": _VECTOR, "mat_b": _VECTOR}).outputs_apart(["out"], ["mat_a", "mat_b"])

    check.__qualname__ = f"check_router_gemm_n{experts}"
    return check


_dsv3_router_gemm = launcher(DSV3_ROUTER_GEMM, "dsv3_router_gemm", _router_check(256, float32))
_ml3_router_gemm = launcher(ML3_ROUTER_GEMM, "dsv3_router_gemm", _router_check(128, bfloat16))


@op(launch=_dsv3_router_gemm, flashinfer="flashinfer.gemm.routergemm_dsv3.mm_M1_16_K7168_N256")
def mm_M1_16_K7168_N256(
    mat_a: TensorLike, mat_b: TensorLike, out: TensorT, launch_with_pdl: bool = False, *, stream: StreamLike = None
) -> TensorT:
    """DeepSeek-V3 router logits: ``out = mat_a @ mat_b`` (float32 accumulation).

    Args:
        mat_a: bfloat16 ``[num_tokens, 7168]``, contiguous, 1 <= num_tokens <= 16.
        mat_b: bfloat16 ``[7168, 256]`` column-major (``weight.T`` of a contiguous ``[256, 7168]`` router weight).
        out: float32 ``[num_tokens, 256]``, contiguous; written.
        launch_with_pdl: programmatic dependent launch (SM90+).

    Returns:
        ``out``.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed.
        ValueError: a shape other than the kernel's (hidden size 7168, 256 / 128 experts, 1 to 16 tokens; DeepSeek's
            routing groups), a tensor not contiguous or not on the first argument's CUDA device, misaligned data, an
            integer setting out of range.
    """
    _dsv3_router_gemm(mat_a, mat_b, out, launch_with_pdl, stream=stream)
    return out


@op(launch=_ml3_router_gemm, flashinfer="flashinfer.gemm.routergemm_dsv3.mm_M1_16_K7168_N128")
def mm_M1_16_K7168_N128(
    mat_a: TensorLike, mat_b: TensorLike, out: TensorT, launch_with_pdl: bool = False, *, stream: StreamLike = None
) -> TensorT:
    """Mistral Large 3 router logits: as :func:`mm_M1_16_K7168_N256` with 128 experts and a bfloat16 ``out``.

    Raises:
        TypeError, ValueError: as :func:`mm_M1_16_K7168_N256`.
    """
    _ml3_router_gemm(mat_a, mat_b, out, launch_with_pdl, stream=stream)
    return out


def _check_routing(a: SimpleNamespace) -> PointerRules:
    s, b, vals, idx = a.scores, a.bias, a.topk_values, a.topk_indices
    checks.device_tensor("scores", s, 2, "[num_tokens, num_experts]", _SCORE_DTYPES)
    tokens, experts = s.shape
    checks.ndim("bias", b, 1, "[num_experts]")
    checks.shape("bias", b, (experts,), "[num_experts]")
    checks.dtype_in("bias", b, _SCORE_DTYPES)
    checks.same_device("bias", b, "scores", s)
    checks.cuda("bias", b)
    checks.contiguous("bias", b)
    n_group, topk_group, topk = a.n_group, a.topk_group, a.topk
    _routing_limits(experts, n_group, topk_group, topk)
    checks.finite("routed_scaling_factor", a.routed_scaling_factor)
    checks.shape("topk_values", vals, (tokens, topk), "[num_tokens, topk]")
    checks.same_dtype("topk_values", vals, "scores", s)
    checks.same_device("topk_values", vals, "scores", s)
    checks.cuda("topk_values", vals)
    checks.contiguous("topk_values", vals)
    checks.shape("topk_indices", idx, (tokens, topk), "[num_tokens, topk]")
    checks.dtype_in("topk_indices", idx, (int32,))
    checks.same_device("topk_indices", idx, "scores", s)
    checks.cuda("topk_indices", idx)
    checks.contiguous("topk_indices", idx)
    return PointerRules().outputs_apart(["topk_values", "topk_indices"], ["scores", "bias"])


@op()
def routing_limits(num_experts: int, n_group: int, topk_group: int, topk: int) -> None:
    """Refuse a routing configuration :func:`fused_topk_deepseek` cannot run (it would stop the process's CUDA
    context or return garbage), naming the argument: what a caller checks once, before it allocates anything (the
    engine, reading a DeepSeek checkpoint's config), that the op checks on every call.

    Args:
        num_experts: routed experts (the columns of ``scores``), >= 1.
        n_group: expert groups, a divisor of ``num_experts`` in [1, 32].
        topk_group: groups kept per token, in [1, ``n_group``].
        topk: experts chosen per token, within the kernel's limit and the kept groups' experts.

    Raises:
        TypeError: an argument is not an int.
        ValueError: with the limit that was exceeded.
    """
    values = (("num_experts", num_experts), ("n_group", n_group), ("topk_group", topk_group), ("topk", topk))
    _routing_limits(*(checks.integer(name, value) for name, value in values))


def _routing_limits(num_experts: int, n_group: int, topk_group: int, topk: int) -> None:
    # the op's own check (its arguments are ints already): routing_limits without the type checks
    if num_experts < 1:
        raise ValueError(f"scores: expected at least one expert (column), got {num_experts}")
    if not 1 <= n_group <= 32 or num_experts % n_group:
        raise ValueError(f"n_group: expected a divisor of num_experts ({num_experts}) in [1, 32], got {n_group}")
    per_group = num_experts // n_group
    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk: expected 1..{MAX_TOPK} (the kernel's limit), got {topk}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group: expected 1..n_group ({n_group}), got {topk_group}")
    if topk_group * per_group < topk:
        raise ValueError(
            f"topk: the {topk_group} kept groups of {per_group} experts hold fewer than topk = {topk} experts"
        )
    if n_group == 1:
        if num_experts > MAX_EXPERTS_ONE_GROUP:
            raise ValueError(
                f"scores: with n_group = 1 the kernel routes at most {MAX_EXPERTS_ONE_GROUP} experts, got {num_experts}"
            )
        return
    if num_experts > MAX_EXPERTS_GROUPED:
        raise ValueError(
            f"scores: with n_group > 1 the kernel routes at most {MAX_EXPERTS_GROUPED} experts, got {num_experts}"
        )
    if per_group > MAX_EXPERTS_PER_GROUP:
        raise ValueError(
            f"n_group: {num_experts} experts in {n_group} groups make {per_group} per group; the kernel allows "
            f"at most {MAX_EXPERTS_PER_GROUP} (one warp per group)"
        )
    if topk_group > MAX_TOPK_GROUP:
        raise ValueError(
            f"topk_group: expected at most {MAX_TOPK_GROUP} with n_group > 1 (the kernel's limit), got {topk_group}"
        )
    if per_group * topk_group > MAX_CANDIDATES:
        raise ValueError(
            f"topk_group: {topk_group} groups of {per_group} experts exceed the kernel's {MAX_CANDIDATES} candidates"
        )


_noaux_tc = launcher(NOAUX_TC, "dsv3_fused_routing", _check_routing)


@op(launch=_noaux_tc, flashinfer="flashinfer.fused_moe.fused_routing_dsv3.fused_topk_deepseek")
def fused_topk_deepseek(
    scores: TensorLike,
    bias: TensorLike,
    n_group: int,
    topk_group: int,
    topk: int,
    routed_scaling_factor: float,
    topk_values: TensorT,
    topk_indices: TensorT,
    launch_with_pdl: bool = True,
    *,
    stream: StreamLike = None,
) -> tuple[TensorT, TensorT]:
    """DeepSeek-V3 routing (sigmoid, bias-corrected grouped top-k, normalized weights; see the module docstring).

    Args:
        scores: router logits ``[num_tokens, num_experts]``, float32/float16/bfloat16, contiguous.
        bias: ``[num_experts]`` correction bias (any of the three float dtypes), contiguous.
        n_group: expert groups (divides num_experts, <= 32); 1: no grouping (<= 384 experts).
        topk_group: groups kept (<= n_group; <= 4 when n_group > 1).
        topk: experts per token (1..8).
        routed_scaling_factor: multiplies the normalized weights.
        topk_values: ``[num_tokens, topk]`` of ``scores``' dtype, contiguous; written.
        topk_indices: int32 ``[num_tokens, topk]``, contiguous; written.
        launch_with_pdl: programmatic dependent launch (SM90+), flashinfer-python's default.

    Returns:
        ``(topk_values, topk_indices)``. ``num_tokens == 0`` checks every argument and launches nothing.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed.
        ValueError: a shape other than the kernel's (hidden size 7168, 256 / 128 experts, 1 to 16 tokens; DeepSeek's
            routing groups), a tensor not contiguous or not on the first argument's CUDA device, misaligned data, an
            integer setting out of range.
    """
    args = (scores, bias, n_group, topk_group, topk, routed_scaling_factor, topk_values, topk_indices, launch_with_pdl)
    if _rows(scores) == 0:  # the kernel cannot launch an empty grid
        _noaux_tc.launcher.slow(args, stream, None, remember=False)  # type: ignore[attr-defined]
    else:
        _noaux_tc(*args, stream=stream)
    return topk_values, topk_indices


def _rows(scores: Any) -> int:
    shape = getattr(scores, "shape", None)
    try:
        return int(shape[0]) if shape is not None and len(shape) else -1
    except (TypeError, ValueError, IndexError):
        return -1  # the launcher describes it and says what is wrong

"""What the attention ops share, stated once: variant URIs, layout keys, extents, the position-encoding modes and
the checks every attention op makes the same way (workspace, module dtype, ALiBi slopes, the ``tmp`` scratch, and
a batch run's arguments against its plan: live and current, enough query rows, KV tokens and pages).

Decode, prefill, sinks and MLA are siblings: each imports this module, none imports another's private names.
"""

from __future__ import annotations

import functools
from typing import Any

from ...dtypes import DType
from ...launch import checks
from ...tensor.descriptor import Tensor
from ...tensor.intake import producer, producers
from . import attention_checks as AC
from . import plan_settings as S
from .plan import Plan
from .variants import POS_ENCODINGS, Variant, resolve
from .workspace import Workspace, tmp_bytes_needed

# The position-encoding modes the kernels take (``pos_encoding_mode``), by name.
POS_NONE = POS_ENCODINGS["NONE"]
POS_ROPE_LLAMA = POS_ENCODINGS["ROPE_LLAMA"]
POS_ALIBI = POS_ENCODINGS["ALIBI"]

_ATTENTION_DTYPES = frozenset(("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"))


@functools.lru_cache(maxsize=256)
def variant_uri(
    kind: str,
    q: DType,
    kv: DType,
    o: DType,
    idx: DType | None,
    head_dim_qk: int,
    head_dim_vo: int,
    pos: int,
    swa: bool,
    cap: bool,
    fp16_qk: bool = False,
    backend: str = "fa2",
) -> tuple[Variant, str]:
    """(variant, URI) of the module for these settings; KernelNotFoundError if the wheels lack it."""
    v = Variant(kind, q, kv, o, head_dim_qk, head_dim_vo, idx, pos, swa, cap, fp16_qk, backend)
    return v, resolve(v)


@functools.lru_cache(maxsize=64)
def empty(dt: DType, device: Any) -> Tensor:
    """A ``[0]``-shaped descriptor with no data (for parameters that only carry a dtype, or disable scratch)."""
    return Tensor(0, (0,), dt, device)


def kv_pair(paged_kv_cache: Any) -> tuple[Any, Any]:
    """``(k_cache, v_cache)`` of a run's ``paged_kv_cache`` as flashinfer-python passes it: a pair of tensors.

    flashinfer also takes one ``[pages, 2, ...]`` tensor; fi_ffi makes no views of a caller's tensor (a view per
    layer would be an object per call), so such a tensor is refused naming its two halves."""
    if (paged_kv_cache.__class__ is tuple or paged_kv_cache.__class__ is list) and len(paged_kv_cache) == 2:
        return paged_kv_cache[0], paged_kv_cache[1]
    raise TypeError(
        f"paged_kv_cache: expected a pair (k_cache, v_cache) of tensors, got {type(paged_kv_cache).__name__}; "
        f"for one [pages, 2, ...] tensor pass its two halves (kv[:, 0], kv[:, 1])"
    )


def layout_key(name: str, value: Any, stream: Any = None) -> Any:
    """The launcher's layout key of a tensor argument (a value), read as the launcher reads it; a producer that
    cannot be read is described by :func:`fi_ffi.as_tensor` instead, which raises the error naming ``name``."""
    try:
        return (producers.get(value.__class__) or producer(value.__class__)).read(value, stream)[0]
    except Exception:
        return checks.tensor(name, value)._lid


def extent(name: str, value: Any, dim: int = 0) -> int:
    """``value.shape[dim]`` (read without describing the tensor where the producer has a ``shape``)."""
    try:
        n = value.shape[dim]
        if n.__class__ is int:
            return n  # type: ignore[no-any-return]
    except Exception:
        pass
    t = checks.tensor(name, value)
    if t.ndim <= dim:
        raise ValueError(f"{name}: expected at least {dim + 1} dimensions, got shape {t.shape}")
    return t.shape[dim]


def runnable(plan: Any, kind: str, mode: str, who: str) -> Workspace:
    """The workspace of ``plan`` if it is a live :class:`~.plan.Plan` of ``kind`` for ``mode`` KV, current on that
    workspace; else a TypeError naming ``who`` (the function that makes such plans), or the plan's own refusal."""
    if plan.__class__ is not Plan:
        raise TypeError(f"plan: expected a Plan from {who}, got {type(plan).__name__}")
    s = plan._s
    ws: Workspace | None = plan.workspace
    if s.kind != kind or s.mode != mode or not plan._info.handle or ws is None or ws._generation != plan._generation:
        plan.check_runnable(kind, mode)
    assert ws is not None  # check_runnable refuses a plan without a workspace
    return ws


def check_rows(plan: Plan, q: Any) -> None:
    """``q`` has at least the rows the plan's ``qo_indptr`` ends at."""
    rows = extent("q", q)
    if rows < plan.num_rows:
        raise ValueError(f"q: the plan's qo_indptr ends at {plan.num_rows} rows, but q has {rows}")


def check_kv_tokens(plan: Plan, k: Any) -> None:
    """Ragged ``k`` has at least the tokens the plan's ``kv_indptr`` ends at (dim 0 for NHD, 1 for HND)."""
    nnz_kv = extent("k", k, 0 if plan._s.kv_layout == "NHD" else 1)
    if nnz_kv < plan.kv_extent:
        raise ValueError(f"k: the plan's kv_indptr ends at {plan.kv_extent} tokens, but k has {nnz_kv}")


def check_pages(plan: Plan, kv_indices: Any) -> None:
    """``kv_indices`` has at least the pages the plan's ``kv_indptr`` ends at (a descriptor's length read inline)."""
    pages = (
        kv_indices.shape[0] if kv_indices.__class__ is Tensor and kv_indices.ndim else extent("kv_indices", kv_indices)
    )
    if pages < plan.kv_extent:
        raise pages_error(plan, pages)


def pages_error(plan: Plan, pages: int) -> ValueError:
    """The error of a ``kv_indices`` of ``pages`` entries, fewer than the pages ``plan``'s kv_indptr ends at."""
    return ValueError(
        f"kv_indices: the plan's kv_indptr ends at {plan.kv_extent} pages, but kv_indices has {pages} entries"
    )


def check_workspace(value: Any) -> Workspace:
    """``value`` itself if it is a :class:`~.workspace.Workspace`, else a TypeError naming ``workspace``."""
    if not isinstance(value, Workspace):
        raise TypeError(
            f"workspace: expected a fi_ffi.Workspace (Workspace.allocate() or "
            f"Workspace.from_buffers()), got {type(value).__name__}"
        )
    return value


def alibi_error(pos: int) -> ValueError:
    """The ALiBi rule broken under position-encoding code ``pos``: slopes missing with ALIBI, or passed without.

    The rule itself, ``(pos == POS_ALIBI) != (alibi_slopes is not None)``, stays inline where an op tests it on its
    fast path; the message is stated here once."""
    if pos == POS_ALIBI:
        return ValueError("alibi_slopes: required with pos_encoding_mode ALIBI (float32 [num_qo_heads])")
    return ValueError("alibi_slopes: only used with pos_encoding_mode ALIBI")


def alibi_required(pos_encoding: Any, alibi_slopes: Any) -> None:
    """ALiBi slopes are passed exactly with pos_encoding_mode ALIBI (checked before the module is looked up)."""
    if alibi_slopes is None and pos_encoding.__class__ is str and pos_encoding == "NONE":
        return
    pos = S.pos_encoding(pos_encoding)
    if (pos == POS_ALIBI) != (alibi_slopes is not None):
        raise alibi_error(pos)


def check_alibi(s: S.PlanSettings, alibi_slopes: Any, device: Any) -> None:
    """A plan's ALiBi slopes, where given or required: passed exactly with pos_encoding ALIBI, float32
    ``[num_qo_heads]`` on ``device``."""
    if (s.pos_encoding == POS_ALIBI) != (alibi_slopes is not None):
        raise alibi_error(s.pos_encoding)
    AC.vector("alibi_slopes", checks.tensor("alibi_slopes", alibi_slopes), "float32", s.num_qo_heads, device)


def early_alibi(num_qo_heads: Any, alibi_slopes: Any, device: Any) -> None:
    """Given ALiBi slopes checked before the plan's settings exist (before the module lookup): float32
    ``[num_qo_heads]`` on ``device``; :func:`check_alibi` then states the rule against the settings."""
    slopes = checks.tensor("alibi_slopes", alibi_slopes)
    AC.vector("alibi_slopes", slopes, "float32", S.count("num_qo_heads", num_qo_heads), device)


def check_module_dtype(name: str, t: Tensor) -> None:
    """Attention modules exist for these element types only: a clear error instead of a missing variant."""
    if t.dtype.name not in _ATTENTION_DTYPES:
        raise TypeError(
            f"{name}: no attention module exists for dtype {t.dtype.name} (float16, bfloat16; FP8 for the KV cache)"
        )


def check_tmp(
    tmp: Tensor, dev: Any, kv_len: int, qo_len: int, hq: int, hk: int, d_vo: int, o_itemsize: int, prefill: bool
) -> None:
    """``tmp``: empty (no split) or a contiguous 1-D device buffer large enough for the kernel's split."""
    if tmp.shape == (0,):
        return
    if tmp.ndim != 1 or not tmp.is_contiguous():
        raise ValueError(f"tmp: expected a contiguous 1-D scratch buffer, got shape {tmp.shape}")
    if tmp.device != dev:
        raise ValueError(f"tmp: expected a device buffer on {dev}, got one on {tmp.device}")
    if kv_len > 256:
        need = tmp_bytes_needed(dev.device_id, kv_len, qo_len, hq, hk, d_vo, o_itemsize, prefill=prefill)
        have = tmp.shape[0] * tmp.dtype.itemsize
        if need and have < need:
            raise ValueError(
                f"tmp: the kernel may need up to {need} bytes of scratch for kv_len {kv_len}, got "
                f"{have}; pass a larger buffer (upstream uses 32 MiB) or None"
            )

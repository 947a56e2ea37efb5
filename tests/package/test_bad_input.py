"""A generated bad-input campaign over the public ops' scalar, shape and tensor arguments (CPU, deterministic).

For every op, one valid call is written out by hand (descriptors claiming cuda:0 at distinct, aligned fake
addresses, host index arrays, synthetic plans); it must reach the kernel module (which then fails for want of a
GPU) or, for host helpers, return. Then every argument in turn is replaced by values from a catalogue chosen by
the argument's kind (wrong types, None, NaN and infinities, ``10**400``, ``-1``, ``2**31``, ``2**63``, numpy
scalars, bools, 0-d and other-rank tensors, ...), the others kept valid. Each bad call must either

- raise ``TypeError``/``ValueError`` (exactly those classes) or an ``fi_ffi.errors`` type whose message names the
  argument (never ``AttributeError``, ``OverflowError``, ``IndexError``, ``KeyError``, ``struct.error``,
  ``ZeroDivisionError``, "unhashable type", numpy's errors, or a ``KernelError`` from the module's own checks), or
- for values that may be valid for that argument (``-1``, ``2**31``, other ranks, ...), reach the kernel like the
  valid call does.

Values that are never valid for the argument's kind (a str for an int, None for a required tensor, NaN for a
float, ...) must be refused. Pointer values (alignment, NULL, overlap, address ranges) are not varied for these
ops here (tests/launch/test_pointer_rules.py does, warm then bad). After its cases each op's valid call is made again
and must still reach the kernel. About 9,000 calls.

The second part covers every public entry point of fi_ffi.comm and fi_engine and the prepared segment GEMM
the same way (valid calls get past the checks to where this machine ends: no GPU, no NCCL, no libcuda), varies
the entries of mapping arguments (launcher variables, config.json keys) one at a time, and adds warm-then-bad
pointers (NULL, misaligned, a range past 2**64) for every tensor argument. An entry point added to an
``__all__`` later fails the coverage test until it has a case generator or a stated exemption.
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from helpers.attention_plans import decode_plan, prefill_plan
from helpers.attention_plans import workspace as attention_workspace
from helpers.checkpoints import without_weights
from helpers.hf_configs import SMALL_LLAMA
from helpers.lora_adapters import llama_shapes, write_adapter
from helpers.mla_plans import fake_plan as mla_fake_plan

import fi_ffi
from fi_ffi.errors import CudaError, FiFFIError, KernelError, KernelNotFoundError, UnsupportedDeviceError
from fi_ffi.ops import gdn
from fi_ffi.tensor.descriptor import Tensor

# Descriptors here claim cuda:0 over addresses nothing maps: only a machine without a GPU stops them.
pytestmark = pytest.mark.cpu_only

_BASE = 1 << 44  # fake device addresses 4 GiB apart: distinct, aligned for any rule, never dereferenced
_SPAN = 1 << 32
_slots = itertools.count(1)


def dev(shape: tuple[int, ...], dtype: str = "float16") -> Tensor:
    """A descriptor claiming cuda:0 at a fresh fake address (valid tensors here span far less than 4 GiB)."""
    return Tensor.from_pointer(_BASE + next(_slots) * _SPAN, shape, dtype, 0)


def host(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


class _Opaque:
    """An object of no kind any op takes."""

    def __repr__(self) -> str:
        return "<opaque>"


HUGE = 10**400
NAN, INF = float("nan"), float("inf")
COMMON_INVALID: tuple[Any, ...] = ("x", {}, {1, 2}, _Opaque(), b"\x00", 1 + 2j)

# kind -> (never valid: must be refused by name, may be valid: refused by name or reaching the kernel)
SCALARS: dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]] = {
    "int": (
        (None, 1.5, NAN, INF, HUGE, -HUGE, True, False, "5", (1,), [1], np.float64(2.0), np.array([1, 2])),
        (-1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, np.int64(5), np.int32(-1)),
    ),
    "float": (
        (None, NAN, -NAN, HUGE, -HUGE, True, False, "0.5", (0.5,), [0.5], np.array([0.5, 0.5]), np.float64(NAN)),
        (-1.0, 0, 0.0, -0.0, INF, -INF, 1, 2**31, 2**63, 1e-300, 1e300, np.float32(0.5), np.float64(2.0), np.int64(3)),
    ),
    "bool": (
        (None, 2, -1, 1.5, NAN, "True", HUGE, (True,), np.array([True, False])),
        (0, 1, np.bool_(True), np.int64(1)),
    ),
    "str": (
        (None, 5, 1.5, True, "nonsense", b"NHD", ("NHD",), HUGE),
        ("nhd", "HND", "auto", "little", "fa2", "fa3", "NONE"),
    ),
    "enum": ((None, "nonsense", 1.5, True, HUGE, -1, 99), (0, 1, 2, "ROPE_LLAMA", "ALIBI", "rope_llama")),
    "dtype": ((5, 1.5, "nonsense", HUGE, (2, 64, 1)), (None, "float32", "int8", "bfloat16", np.float16, "f16")),
    "stream": (("x", 1.5, -1, 2**64, HUGE, NAN), (None, 0)),
    "generator": (("x", 5, 1.5), (None,)),
    "seed": (("x", 1.5, -1, 2**64, HUGE, NAN), (None, 0, 2**64 - 1, np.int64(5))),
    "object": ((None, "x", 5, 1.5), ()),
    # a paged run's (k_cache, v_cache)
    "kv_pair": ((None, "x", 5, 1.5, (), (None,), [dev((4,), "float16")] * 3, dev((4, 16, 8, 128))), ()),
    "masks": (  # pack_custom_mask's list of [qo_len, kv_len] boolean masks
        (None, 5, 1.5, [None], ["ab"], [{}], [np.ones((3, 5), np.float32)], [np.array([[1, 2]])], [[[0.5]]]),
        ([], [np.ones(3, bool)], [np.ones((2, 2, 2), bool)], [np.ones((0, 4), bool)], [[[True, False]]]),
    ),
}
SCALARS["opt_int"] = (tuple(v for v in SCALARS["int"][0] if v is not None), (None, *SCALARS["int"][1]))
SCALARS["opt_float"] = (tuple(v for v in SCALARS["float"][0] if v is not None), (None, *SCALARS["float"][1]))
SCALARS["opt_bool"] = (tuple(v for v in SCALARS["bool"][0] if v is not None), (None, *SCALARS["bool"][1]))

# kinds of the parameters whose valid value does not tell (None defaults, Any-typed numbers)
KIND_OF_NAME = {
    **dict.fromkeys(
        ["rotary_dim", "head_dim_vo", "max_total_num_rows", "fixed_split_size", "uniform_q_len", "nnz"], "opt_int"
    ),
    **dict.fromkeys(["sm_scale", "scale", "ckv_scale", "kpe_scale"], "opt_float"),
    **dict.fromkeys(["q_dtype", "kv_dtype", "o_dtype", "q_data_type", "kv_data_type", "o_data_type"], "dtype"),
    "enable_pdl": "opt_bool",  # None is "off" for the activations; other ops may refuse it
    "cublas_handle": "opt_int",  # bmm_fp8: None makes fi_ffi's own handle
    "dtype": "dtype",  # bmm_fp8's out dtype (None: out's)
    "pos_encoding": "enum",
    "pos_encoding_mode": "enum",
    "paged_kv_cache": "kv_pair",
    "masks": "masks",
    "stream": "stream",
    "generator": "generator",
    "seed": "seed",
    "offset": "seed",
}
# which other names an error about a parameter may name instead (the two halves of one random state)
PARTNERS = {
    "seed": ("seed", "offset", "generator"),
    "offset": ("seed", "offset", "generator"),
    "paged_kv_cache": ("paged_kv_cache", "k_cache", "v_cache"),  # the pair's halves are named as the kernel does
}
# host index lists a plan checks when given and skips when None (flashinfer's plans take them; the runs read the
# device copies): required positionally, so their signature states no None default
NONE_CHECKS_NOTHING = {
    ("batch_decode_plan", "indices"),
    ("batch_decode_plan", "last_page_len"),
    ("batch_prefill_paged_plan", "paged_kv_indices"),
    ("batch_attention_sink_plan", "paged_kv_indices"),
    ("batch_mla_plan", "kv_indices"),
}
# kinds of one op's parameters where the op differs from others of that name: the attention ops take None for
# flashinfer-python's defaults (soft cap off, RoPE scale 1, theta 1e4)
OP_KINDS = {
    (op, name): "opt_float"
    for op in ("batch_decode_plan", "batch_prefill_ragged_plan", "batch_prefill_paged_plan", "single_decode",
               "single_prefill")
    for name in ("logits_soft_cap", "rope_scale", "rope_theta")
}  # fmt: skip
# per-row parameters that take a number or a [R] tensor (ops.sampling._split)
PER_ROW = {"top_p": "float", "min_p": "float", "top_k": "int", "temperature": "opt_float"}


def tensor_values(t: Tensor | None) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(never valid, may be valid) replacements of a tensor argument whose valid value is ``t``."""
    never: tuple[Any, ...] = (*COMMON_INVALID, 5, 1.5, NAN, True, HUGE, [1.5])
    if t is None:  # optional: other ranks and dtypes may happen to fit
        return never, (None, dev((), "float32"), dev((3,), "float32"), dev((2, 3), "int32"), dev((1,), "bool"))
    other = "int32" if t.dtype.name != "int32" else "float32"
    maybe: list[Any] = [
        dev((), t.dtype.name),
        dev((*t.shape, 1), t.dtype.name),
        dev(t.shape, other),
        dev(tuple(s + 1 for s in t.shape), t.dtype.name),
        np.zeros(t.shape, np.float32),  # host memory
    ]
    if t.ndim:  # a size past the kernels' int32, first and last
        maybe += [dev((2**31, *t.shape[1:]), t.dtype.name), dev((*t.shape[:-1], 2**31), t.dtype.name)]
    if t.ndim > 1:
        maybe.append(dev(t.shape[1:], t.dtype.name))
    if t.ndim == 1:
        maybe.append(dev((t.shape[0], 2), t.dtype.name))
    return (None, *never), tuple(maybe)


def host_array_values(a: np.ndarray, optional: bool) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(never valid, may be valid) replacements of a host index array (``optional``: None is its default)."""
    never = (
        *COMMON_INVALID,
        *(() if optional else (None,)),
        5,
        1.5,
        NAN,
        [0.0, 1.5],
        ["0", "1"],
        [True, False],
        [0, HUGE],
        np.array(["0", "1"]),
        a.astype(np.float32),
    )
    maybe = (
        [int(v) for v in a],
        a.astype(np.int64),
        np.array(int(a[0]), np.int32),
        a.reshape(1, -1),
        host([0, 2**31 - 1]),
        host([-1, 2]),
        host([0]),
        host([]),
    )
    return never, maybe


@dataclass(frozen=True)
class Case:
    op: str
    arg: str
    value: Any
    must_refuse: bool


def _kind(name: str, value: Any, default: Any) -> str:
    if name in PER_ROW and not isinstance(value, Tensor):
        return PER_ROW[name]
    if name in KIND_OF_NAME:
        return KIND_OF_NAME[name]
    if isinstance(value, bool) or isinstance(default, bool):
        return "opt_bool" if value is None or default is None else "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "object"


def cases_of(op: str, valid: dict[str, Any], fn: Callable[..., Any] | None = None) -> list[Case]:
    """Every (argument, replacement) of ``op`` (``fi_ffi.<op>`` unless ``fn`` is given): the arguments of its valid
    call and its other parameters."""
    fn = getattr(fi_ffi, op) if fn is None else fn
    out = []
    for name, p in inspect.signature(fn).parameters.items():
        value = valid.get(name, p.default)
        if value is inspect.Parameter.empty:
            continue
        if isinstance(value, Tensor) or (value is None and name not in KIND_OF_NAME and name not in PER_ROW):
            never, maybe = tensor_values(value)
        elif isinstance(value, np.ndarray):
            never, maybe = host_array_values(value, p.default is None or (op, name) in NONE_CHECKS_NOTHING)
        else:
            never, maybe = SCALARS[OP_KINDS.get((op, name)) or _kind(name, value, p.default)]
            if name in PER_ROW and not isinstance(value, Tensor):
                maybe = (*maybe, dev((), "float32"), dev((2, 2), "float32"))
        out += [Case(op, name, v, True) for v in never if not _same(v, value)]
        out += [Case(op, name, v, False) for v in maybe if not _same(v, value)]
    return out


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str)) and a == b)


# ---- the valid calls ----------------------------------------------------------------------------------------------

R, V = 4, 64
MIB = 1 << 20


def _rope(op: str) -> dict[str, Any]:
    q, k = dev((5, 4, 128)), dev((5, 2, 128))
    args: dict[str, Any] = {"q": q, "k": k}
    if "pos_ids" in op:
        args["pos_ids"] = dev((5,), "int32")
    else:
        args["indptr"], args["offsets"] = dev((3,), "int32"), dev((2,), "int32")
    if not op.endswith("_inplace"):
        args["q_rope"], args["k_rope"] = dev((5, 4, 128)), dev((5, 2, 128))
    return args


def _cos_sin(op: str) -> dict[str, Any]:
    args: dict[str, Any] = {
        "positions": dev((5,), "int32"),
        "query": dev((5, 4, 128)),
        "key": dev((5, 2, 128)),
        "head_size": 128,
        "cos_sin_cache": dev((64, 128), "float32"),
    }
    if not op.endswith("_inplace"):
        args["query_out"], args["key_out"] = dev((5, 4, 128)), dev((5, 2, 128))
    return args


def _probs(**more: Any) -> dict[str, Any]:
    return {"probs": dev((R, V), "float32"), "out": dev((R,), "int32"), "seed": 1, "offset": 8, **more}


def strided(shape: tuple[int, ...], strides: tuple[int, ...], dtype: str) -> Tensor:
    """Like :func:`dev`, with strides (in elements)."""
    return Tensor.from_pointer(_BASE + next(_slots) * _SPAN, shape, dtype, 0, strides)


def _sink_run(make_array: Any, mode: str) -> dict[str, Any]:
    from helpers.sink_plans import fake_plan as sink_fake_plan

    args: dict[str, Any] = {"plan": sink_fake_plan(make_array, mode), "q": dev((4, 8, 64), "bfloat16")}
    if mode == "paged":
        args["paged_kv_cache"] = (dev((4, 16, 2, 64), "bfloat16"), dev((4, 16, 2, 64), "bfloat16"))
        args.update(qo_indptr=dev((3,), "int32"), kv_indptr=dev((3,), "int32"), kv_indices=dev((3,), "int32"))
        args["kv_last_page_len"] = dev((2,), "int32")
    else:
        args.update(k=dev((9, 2, 64), "bfloat16"), v=dev((9, 2, 64), "bfloat16"))
        args.update(qo_indptr=dev((3,), "int32"), kv_indptr=dev((3,), "int32"))
    return {**args, "out": dev((4, 8, 64), "bfloat16"), "sinks": dev((8,), "float32")}


def _models_plans(make_array: Any) -> dict[str, Callable[[], dict[str, Any]]]:
    """Valid calls of the model-family ops that take a plan or a workspace."""
    return {
        "batch_attention_sink_plan": lambda: dict(
            workspace=attention_workspace(),
            qo_indptr=host([0, 3, 4]),
            paged_kv_indptr=host([0, 1, 3]),
            paged_kv_indices=host([0, 1, 2]),
            paged_kv_last_page_len=host([5, 4]),
            num_qo_heads=8,
            num_kv_heads=2,
            head_dim_qk=64,
            page_size=16,
            backend="fa2",
        ),
        "batch_attention_sink_ragged_plan": lambda: dict(
            workspace=attention_workspace(),
            qo_indptr=host([0, 3, 4]),
            kv_indptr=host([0, 5, 9]),
            num_qo_heads=8,
            num_kv_heads=2,
            head_dim_qk=64,
            backend="fa2",
        ),
        "batch_attention_sink_run": lambda: _sink_run(make_array, "paged"),
        "batch_attention_sink_ragged_run": lambda: _sink_run(make_array, "ragged"),
        "segment_gemm": lambda: dict(
            workspace=attention_workspace(),
            x=dev((11, 64), "bfloat16"),
            weights=dev((4, 128, 64), "bfloat16"),
            batch_size=5,
            weight_column_major=True,
            out=dev((11, 128), "bfloat16"),
            seg_indptr=host([0, 3, 3, 10, 11, 11]),
            weight_indices=host([0, 1, 2, 3, 0]),
            backend="sm90",
        ),
    }


def _models_simple() -> dict[str, Callable[[], dict[str, Any]]]:
    """Valid calls of the model-family ops without a plan (modules of the model-family test wheel)."""
    h = 7168
    b, heads, dim, dstate = 2, 4, 64, 128
    return {
        "mm_M1_16_K7168_N256": lambda: dict(
            mat_a=dev((2, h), "bfloat16"), mat_b=strided((h, 256), (1, h), "bfloat16"), out=dev((2, 256), "float32")
        ),
        "mm_M1_16_K7168_N128": lambda: dict(
            mat_a=dev((2, h), "bfloat16"), mat_b=strided((h, 128), (1, h), "bfloat16"), out=dev((2, 128), "bfloat16")
        ),
        "fused_topk_deepseek": lambda: dict(
            scores=dev((3, 256), "float32"),
            bias=dev((256,), "float32"),
            n_group=8,
            topk_group=4,
            topk=8,
            routed_scaling_factor=2.5,
            topk_values=dev((3, 8), "float32"),
            topk_indices=dev((3, 8), "int32"),
        ),
        "selective_state_update": lambda: dict(
            state=dev((6, heads, dim, dstate), "float32"),
            x=dev((b, heads, dim), "bfloat16"),
            dt=strided((b, heads, dim), (heads, 1, 0), "float32"),
            A=strided((heads, dim, dstate), (1, 0, 0), "float32"),
            B=dev((b, 2, dstate), "bfloat16"),
            C=dev((b, 2, dstate), "bfloat16"),
            D=strided((heads, dim), (1, 0), "float32"),
            out=dev((b, heads, dim), "bfloat16"),
            backend="simple",
        ),
        "bmm_fp8": lambda: dict(
            A=dev((2, 48, 64), "float8_e4m3fn"),
            B=strided((2, 64, 80), (5120, 1, 64), "float8_e4m3fn"),
            A_scale=dev((1,), "float32"),
            B_scale=dev((1,), "float32"),
            dtype="bfloat16",
            out=dev((2, 48, 80), "bfloat16"),
            workspace_buffer=dev((1 << 16,), "uint8"),
            cublas_handle=0x1000,
        ),
    }


def _plans(make_array: Any) -> dict[str, Callable[[], dict[str, Any]]]:
    """Valid calls of the ops that take a plan or a workspace (built per op: plans go stale)."""
    d = 128
    return {
        **_models_plans(make_array),
        "batch_decode_plan": lambda: dict(
            workspace=attention_workspace(),
            indptr=host([0, 2, 3]),
            indices=host([0, 1, 2]),
            last_page_len=host([5, 16]),
            num_qo_heads=32,
            num_kv_heads=8,
            head_dim=d,
            page_size=16,
        ),
        "batch_decode_run": lambda: dict(
            plan=decode_plan(make_array),
            q=dev((2, 32, d)),
            paged_kv_cache=(dev((4, 16, 8, d)), dev((4, 16, 8, d))),
            kv_indptr=dev((3,), "int32"),
            kv_indices=dev((4,), "int32"),
            kv_last_page_len=dev((2,), "int32"),
            out=dev((2, 32, d)),
        ),
        # packs the run (valid: returns the prepared run); its per-plan refusals:
        # tests/ops/attention/test_prepared_decode_run.py
        "prepare_decode_run": lambda: dict(
            q=dev((2, 32, d)),
            paged_kv_cache=(dev((4, 16, 8, d)), dev((4, 16, 8, d))),
            kv_indptr=dev((3,), "int32"),
            kv_indices=dev((4,), "int32"),
            kv_last_page_len=dev((2,), "int32"),
            out=dev((2, 32, d)),
            plan=decode_plan(make_array),
            enable_pdl=False,
            stream=0,
        ),
        "batch_prefill_ragged_plan": lambda: dict(
            workspace=attention_workspace(),
            qo_indptr=host([0, 3, 4]),
            kv_indptr=host([0, 5, 9]),
            num_qo_heads=32,
            num_kv_heads=8,
            head_dim_qk=d,
            causal=True,
            backend="fa2",
        ),
        "batch_prefill_paged_plan": lambda: dict(
            workspace=attention_workspace(),
            qo_indptr=host([0, 3, 4]),
            paged_kv_indptr=host([0, 1, 3]),
            paged_kv_indices=host([0, 1, 2]),
            paged_kv_last_page_len=host([5, 4]),
            num_qo_heads=32,
            num_kv_heads=8,
            head_dim_qk=d,
            page_size=16,
            backend="fa2",
        ),
        "batch_prefill_ragged_run": lambda: dict(
            plan=prefill_plan(make_array, "ragged", "fa2", causal=True),
            q=dev((4, 32, d)),
            k=dev((9, 8, d)),
            v=dev((9, 8, d)),
            qo_indptr=dev((3,), "int32"),
            kv_indptr=dev((3,), "int32"),
            out=dev((4, 32, d)),
        ),
        "batch_prefill_paged_run": lambda: dict(
            plan=prefill_plan(make_array, "paged", "fa2"),
            q=dev((4, 32, d)),
            paged_kv_cache=(dev((4, 16, 8, d)), dev((4, 16, 8, d))),
            qo_indptr=dev((3,), "int32"),
            kv_indptr=dev((3,), "int32"),
            kv_indices=dev((3,), "int32"),
            kv_last_page_len=dev((2,), "int32"),
            out=dev((4, 32, d)),
        ),
        "batch_mla_plan": lambda: dict(
            workspace=attention_workspace(),
            qo_indptr=host([0, 1, 2]),
            kv_indptr=host([0, 2, 3]),
            kv_indices=host([0, 1, 2]),
            kv_len_arr=host([20, 16]),
            num_heads=16,
            head_dim_ckv=512,
            head_dim_kpe=64,
            page_size=16,
            causal=False,
            sm_scale=192**-0.5,
            backend="fa2",
        ),
        "batch_mla_run": lambda: dict(
            plan=mla_fake_plan(make_array),
            q_nope=dev((2, 16, 512)),
            q_pe=dev((2, 16, 64)),
            ckv_cache=dev((4, 16, 512)),
            kpe_cache=dev((4, 16, 64)),
            kv_indices=dev((4,), "int32"),
            out=dev((2, 16, 512)),
        ),
    }


def _simple() -> dict[str, Callable[[], dict[str, Any]]]:
    calls: dict[str, Callable[[], dict[str, Any]]] = {
        **_models_simple(),
        "rmsnorm": lambda: dict(input=dev((4, 128)), weight=dev((128,)), out=dev((4, 128))),
        "gemma_rmsnorm": lambda: dict(input=dev((4, 128)), weight=dev((128,)), out=dev((4, 128))),
        "qk_rmsnorm": lambda: dict(input=dev((4, 2, 128)), weight=dev((128,)), out=dev((4, 2, 128))),
        "fused_add_rmsnorm": lambda: dict(input=dev((4, 128)), residual=dev((4, 128)), weight=dev((128,))),
        "gemma_fused_add_rmsnorm": lambda: dict(input=dev((4, 128)), residual=dev((4, 128)), weight=dev((128,))),
        "append_paged_kv_cache": lambda: dict(
            append_key=dev((5, 8, 128)),
            append_value=dev((5, 8, 128)),
            batch_indices=dev((5,), "int32"),
            positions=dev((5,), "int32"),
            paged_kv_cache=(dev((6, 16, 8, 128)), dev((6, 16, 8, 128))),
            kv_indices=dev((6,), "int32"),
            kv_indptr=dev((3,), "int32"),
            kv_last_page_len=dev((2,), "int32"),
        ),
        "append_paged_mla_kv_cache": lambda: dict(
            append_ckv=dev((5, 512), "bfloat16"),
            append_kpe=dev((5, 64), "bfloat16"),
            batch_indices=dev((5,), "int32"),
            positions=dev((5,), "int32"),
            ckv_cache=dev((6, 16, 512), "bfloat16"),
            kpe_cache=dev((6, 16, 64), "bfloat16"),
            kv_indices=dev((6,), "int32"),
            kv_indptr=dev((3,), "int32"),
            kv_last_page_len=dev((2,), "int32"),
        ),
        "get_batch_indices_positions": lambda: dict(append_indptr=host([0, 2, 5]), seq_lens=host([4, 7])),
        "gdn_prefill": lambda: dict(
            q=dev((10, 2, 128)),
            k=dev((10, 2, 128)),
            v=dev((10, 4, 128)),
            cu_seqlens=dev((3,), "int64"),
            output=dev((10, 4, 128)),
            output_state=dev((2, 4, 128, 128), "float32"),
            workspace=dev((132 * 128,), "uint8"),
        ),
        "gdn_workspace_size": lambda: dict(device_id=0),
        "single_decode": lambda: dict(q=dev((32, 128)), k=dev((100, 8, 128)), v=dev((100, 8, 128)), out=dev((32, 128))),
        "single_prefill": lambda: dict(
            q=dev((4, 32, 128)), k=dev((9, 8, 128)), v=dev((9, 8, 128)), out=dev((4, 32, 128)), causal=True
        ),
        "pack_custom_mask": lambda: dict(masks=[np.ones((3, 5), bool), np.tril(np.ones((1, 4), bool))]),
        "merge_state": lambda: dict(
            v_a=dev((6, 4, 128)),
            s_a=dev((6, 4), "float32"),
            v_b=dev((6, 4, 128)),
            s_b=dev((6, 4), "float32"),
            v_merged=dev((6, 4, 128)),
            s_merged=dev((6, 4), "float32"),
        ),
        "merge_state_in_place": lambda: dict(
            v=dev((6, 4, 128)), s=dev((6, 4), "float32"), v_other=dev((6, 4, 128)), s_other=dev((6, 4), "float32")
        ),
        "merge_states": lambda: dict(
            v=dev((6, 3, 4, 128)),
            s=dev((6, 3, 4), "float32"),
            v_merged=dev((6, 4, 128)),
            s_merged=dev((6, 4), "float32"),
        ),
        "packbits": lambda: dict(x=dev((20,), "bool"), out=dev((3,), "uint8")),
        "segment_packbits": lambda: dict(
            x=dev((11,), "bool"), indptr=dev((4,), "int32"), output_indptr=dev((4,), "int32"), out=dev((3,), "uint8")
        ),
        "segment_packbits_indptr": lambda: dict(indptr=host([0, 5, 11, 11])),
        "pack_custom_mask_device": lambda: dict(
            mask=dev((11,), "bool"), indptr=dev((4,), "int32"), out=dev((3,), "uint8"), output_indptr=dev((4,), "int32")
        ),
        "softmax": lambda: dict(
            logits=dev((R, V), "float32"), out=dev((R, V), "float32"), workspace=dev((MIB,), "uint8"), temperature=0.7
        ),
        "softmax_workspace_size": lambda: dict(batch_size=R, vocab_size=V),
        "sampling_from_probs": lambda: _probs(),
        "sampling_from_logits": lambda: dict(logits=dev((R, V), "float32"), out=dev((R,), "int32"), seed=1, offset=8),
        "top_p_sampling_from_probs": lambda: _probs(top_p=0.9),
        "top_k_sampling_from_probs": lambda: _probs(top_k=5),
        "min_p_sampling_from_probs": lambda: _probs(min_p=0.05),
        "top_k_top_p_sampling_from_probs": lambda: _probs(top_k=20, top_p=0.9),
        "top_p_renorm_probs": lambda: dict(probs=dev((R, V), "float32"), top_p=0.9, out=dev((R, V), "float32")),
        "top_p_renorm_workspace_size": lambda: dict(batch_size=R, vocab_size=V),
        "top_k_renorm_probs": lambda: dict(
            probs=dev((R, V), "float32"), top_k=8, out=dev((R, V), "float32"), row_states_buffer=dev((MIB,), "uint8")
        ),
        "top_k_mask_logits": lambda: dict(
            logits=dev((R, V), "float32"), top_k=8, out=dev((R, V), "float32"), row_states_buffer=dev((MIB,), "uint8")
        ),
        "chain_speculative_sampling": lambda: dict(
            draft_probs=dev((2, 3, V), "float32"),
            draft_token_ids=dev((2, 3), "int32"),
            target_probs=dev((2, 4, V), "float32"),
            out=dev((2, 4), "int32"),
            maybe_output_accepted_token_num=dev((2,), "int32"),
            maybe_output_emitted_draft_token_num=dev((2,), "int32"),
            seed=1,
            offset=8,
        ),
        "top_k": lambda: dict(
            input=dev((R, 256), "float32"),
            k=8,
            values=dev((R, 8), "float32"),
            indices=dev((R, 8), "int32"),
            row_states_buffer=dev((MIB,), "uint8"),
        ),
        "top_k_page_table_transform": lambda: dict(
            input=dev((R, 256), "float32"),
            src_page_table=dev((R, 256), "int32"),
            lengths=dev((R,), "int32"),
            k=8,
            out=dev((R, 8), "int32"),
            row_states_buffer=dev((MIB,), "uint8"),
        ),
        "top_k_ragged_transform": lambda: dict(
            input=dev((R, 256), "float32"),
            offsets=dev((R,), "int32"),
            lengths=dev((R,), "int32"),
            k=8,
            out=dev((R, 8), "int32"),
            row_states_buffer=dev((MIB,), "uint8"),
        ),
    }
    for act in ("silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"):
        calls[act] = lambda: dict(input=dev((4, 256)), out=dev((4, 128)))
    for rope in (
        "apply_rope",
        "apply_rope_inplace",
        "apply_rope_pos_ids",
        "apply_rope_pos_ids_inplace",
        "apply_llama31_rope",
        "apply_llama31_rope_inplace",
        "apply_llama31_rope_pos_ids",
        "apply_llama31_rope_pos_ids_inplace",
    ):
        calls[rope] = lambda rope=rope: _rope(rope)
    for cs in ("apply_rope_with_cos_sin_cache", "apply_rope_with_cos_sin_cache_inplace"):
        calls[cs] = lambda cs=cs: _cos_sin(cs)
    return calls


OPS = sorted([*_simple(), *_plans(None)])


# ---- the oracle -----------------------------------------------------------------------------------------------------


def _reached(exc: BaseException | None) -> bool:
    """The call passed every check and stopped at the missing GPU (or, for host helpers, returned)."""
    if exc is None:
        return True
    if isinstance(exc, (UnsupportedDeviceError, KernelNotFoundError)):  # no GPU; a variant the wheels lack
        return True
    if isinstance(exc, CudaError):  # our own CUDA call (workspace event, staging copy) found no usable GPU
        from fi_ffi.cuda import runtime as cuda_runtime

        return cuda_runtime.no_device(exc)
    if type(exc) is KernelError:  # the module's own argument checks say "Mismatched ..." / "Expected ..."
        text = exc.message.lower()
        about_arguments = "mismatched" in text or "expected" in text or "fromvector" in text
        return not about_arguments and any(word in text for word in ("cuda", "driver", "device", "initialize"))
    return False


def _names(exc: BaseException, names: tuple[str, ...]) -> bool:
    text = str(exc)
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", text) for n in names)


def _verdict(
    case: Case,
    exc: BaseException | None,
    params: tuple[str, ...],
    reached: Callable[[BaseException | None], bool] | None = None,
) -> str:
    """'' when the outcome is allowed, else what is wrong. A value that is never valid must be refused naming its
    argument; one that may be valid may instead be refused by another argument it disagrees with (``params``:
    the op's parameters), e.g. a longer ``input`` by ``out``'s expected shape."""
    passed = _reached if reached is None else reached
    typed = exc is not None and (type(exc) in (TypeError, ValueError) or isinstance(exc, FiFFIError))
    if typed and not passed(exc):
        assert exc is not None
        if type(exc) is KernelError:
            return f"the kernel module's own check caught it: {exc.message[:200]}"
        if "unhashable type" in str(exc):
            return f"untyped: {exc!r}"
        names = PARTNERS.get(case.arg, (case.arg,)) if case.must_refuse else params
        return "" if _names(exc, names) else f"does not name {case.arg!r}: {type(exc).__name__}: {exc}"
    if passed(exc):
        return "accepted (reached the kernel)" if case.must_refuse else ""
    return f"untyped: {type(exc).__name__}: {exc}"


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # a deeply nested list; an int past the digit limit
        return f"<{type(value).__name__} too deep or too long to print>"
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def run_op(op: str, build: Callable[[], dict[str, Any]]) -> tuple[int, list[str]]:
    fn = getattr(fi_ffi, op)

    def call(kwargs: dict[str, Any]) -> BaseException | None:
        try:
            fn(**kwargs)
        except Exception as exc:  # the verdict decides
            return exc
        return None

    valid = build()
    first = call(valid)
    assert _reached(first), f"{op}: the valid call did not reach the kernel: {first!r}"
    problems = []
    params = tuple(inspect.signature(fn).parameters)
    cases = cases_of(op, valid)
    for case in cases:
        kwargs = build() if "plan" in valid or "workspace" in valid else dict(valid)
        kwargs[case.arg] = case.value
        why = _verdict(case, call(kwargs), params)
        if why:
            problems.append(f"{op}({case.arg}={_short(case.value)}): {why.splitlines()[0][:300]}")
    again = call(build())
    assert _reached(again), f"{op}: the valid call no longer reaches the kernel after the campaign: {again!r}"
    return len(cases), problems


@pytest.fixture(scope="module")
def builders(kernel_modules: object) -> dict[str, Callable[[], dict[str, Any]]]:
    from fi_ffi.abi.call import Function

    return {**_simple(), **_plans(Function.global_function("ffi.Array"))}


@pytest.fixture(autouse=True)
def _no_gdn_device_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gdn, "_bound_device", None)  # gdn_prefill's one-device rule is tested in ops/test_gdn.py


MODEL_FAMILY_OPS = {*_models_simple(), *_models_plans(None)}


@pytest.mark.parametrize("op", OPS)
def test_bad_arguments_are_refused_by_name(
    builders: dict[str, Callable[[], dict[str, Any]]], op: str, request: pytest.FixtureRequest
) -> None:
    if op in MODEL_FAMILY_OPS:
        request.getfixturevalue("models_modules")  # skips, naming the wheel, without the model-family test wheel
    if op == "bmm_fp8":
        from fi_ffi.errors import LibraryLoadError
        from fi_ffi.loader import libraries

        try:
            libraries.ensure_module_libraries("gemm")
        except LibraryLoadError as exc:
            pytest.skip(f"bmm_fp8's module needs cuBLAS: python -m pip install '.[gemm]' ({exc})")
    count, problems = run_op(op, builders[op])
    assert count >= 10
    assert not problems, f"{len(problems)} of {count} bad calls of {op}:\n" + "\n".join(problems)


def test_the_campaign_covers_every_public_op() -> None:
    skip = {"as_tensor", "current_stream", "list_variants", "prepare", "stream_scope"}  # not ops / covered elsewhere
    # the engine's helpers: prepare_segment_gemm packs segment_gemm's checked call (its checks are segment_gemm's);
    # the others call no kernel (their bad input: tests/engine/test_public_helpers.py)
    skip |= {"prepare_segment_gemm", "routing_limits", "sampling_release", "segment_gemm_args_bytes"}
    public = {n for n in fi_ffi.__all__ if callable(getattr(fi_ffi, n)) and not isinstance(getattr(fi_ffi, n), type)}
    assert public - skip <= set(OPS), sorted(public - skip - set(OPS))


# ---- fi_ffi.comm, fi_engine and the prepared segment GEMM: every public entry point, by construction ----------
#
# Every callable in the ``__all__`` of a module of fi_ffi.comm and fi_engine is either given valid calls below
# (``ENTRY_POINTS``: the same catalogue of bad values per argument, plus "warm, then bad" pointers for each tensor
# argument: NULL, one byte off its dtype's alignment, and a range that wraps past 2**64, each after a valid call and
# followed by one) or exempted with the reason (``EXEMPT``). A name added to an ``__all__`` later fails
# test_every_public_entry_point_has_a_case_generator until it is given one or the other.

from helpers.comm_args import (  # noqa: E402 - the comm builders (the fixture pinning the comm wheel: conftest)
    cpu_communicator,
    custom_args,
    fusion_args,
    moe_args,
    moe_reduction_args,
)

from fi_engine.checkpoint import config as model_config  # noqa: E402
from fi_engine.checkpoint import family_configs, mxfp4_weights  # noqa: E402
from fi_engine.kernels import cuda_sources, lora_bgmv, lora_fused, norm_fold  # noqa: E402
from fi_engine.layers import deepseek_routing, moe, moe_routing, tensor_parallel  # noqa: E402
from fi_engine.lora import adapter as lora_adapter  # noqa: E402
from fi_engine.lora import batch as lora_batch  # noqa: E402
from fi_engine.lora import settings as lora_settings  # noqa: E402
from fi_engine.lora import slots as lora_slots  # noqa: E402
from fi_engine.models import deepseek, deepseek_config, gemma2, gpt_oss, llama, mla_weights, moe_paths  # noqa: E402
from fi_engine.models import registry as engines  # noqa: E402
from fi_engine.runtime import serving  # noqa: E402
from fi_engine.runtime import settings as engine_settings  # noqa: E402
from fi_engine.runtime.sample import speculation  # noqa: E402
from fi_engine.runtime.sched import kv_cache, pages, step_arrays  # noqa: E402
from fi_engine.runtime.worker import graph_shapes  # noqa: E402
from fi_engine.text import (  # noqa: E402
    chat,
    detokenize,
    generation_config,
    grammar,
    harmony,
    model_files,
    tokenizer,
    tool_calls,
    tool_grammar,
)
from fi_engine.text import codec as text  # noqa: E402
from fi_ffi.comm import env as comm_env  # noqa: E402
from fi_ffi.comm import launch as comm_launch  # noqa: E402
from fi_ffi.comm import (  # noqa: E402
    nccl,
    trtllm_ar,
    vllm_ar,
    watchdog,
)
from fi_ffi.ops import segment_gemm as seg  # noqa: E402

_TOP = 1 << 64


def _past_the_checks(exc: BaseException | None) -> bool:
    """A comm or model entry point got past its argument checks: it returned, or failed where this machine ends
    (no GPU, no NCCL, no libcuda for the module) exactly as its valid call does."""
    from fi_ffi.comm.cuda import CudaError
    from fi_ffi.errors import LoaderError

    return _reached(exc) or isinstance(exc, (CudaError, LoaderError, nccl.NcclUnavailableError))


@dataclass(frozen=True)
class Entry:
    """Valid calls of one public entry point. ``build`` makes fresh valid keyword arguments; ``fields`` names a
    mapping argument whose entries are varied one at a time too (``fields`` -> (never valid, may be valid) values per
    key, refused naming the key); ``comm``: the comm wheel must be pinned."""

    fn: Callable[..., Any]
    build: Callable[[], dict[str, Any]]
    comm: bool = False
    fields: tuple[str, Callable[[str, Any], tuple[tuple[Any, ...], tuple[Any, ...]]]] | None = None
    kinds: dict[str, str] | None = None  # argument -> catalogue kind where the valid value does not tell


ENV_NUMBER = (
    ("x", "", " ", "1.5", "-1", "1e3", "0x10", "٣", "\0", "1\x002", "9" * 5000, str(2**64), 5, 1.5, b"1", [1]),
    ("0", "1", "2", "3", "16", str(2**31 - 1), str(2**31), " 3 ", None),
)
ENV_ADDR = (("", " ", "a b", "h\0", "h\x07", "h" * 300, 5, None, b"h", ["h"]), ("localhost", "::1", "h" * 253))
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
SLURM = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x2)"}
ADDR = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def _env_values(key: str, value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return ENV_ADDR if key == "MASTER_ADDR" else ENV_NUMBER


CONFIG = {
    **SMALL_LLAMA,
    "head_dim": 32,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "model_type": "llama",
    "eos_token_id": 2,
}
CFG_INT = (
    (1.5, NAN, INF, HUGE, -HUGE, True, False, "5", (1,), [1], {}, 0, -1, 2**31, 2**63, 2**64, 10**5000, np.float64(2)),
    (None, 1, 2, 64, 2**31 - 1),
)
CFG_FLOAT = ((NAN, INF, -INF, HUGE, -HUGE, 0, 0.0, -1.0, True, "1e-6", [1e-6], {}), (None, 1e-300, 1, 1e300))


def _config_values(key: str, value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    if key == "eos_token_id":
        return (-1, 2**70, 1000, 1.5, "2", True, [1.5], [-1], [1000], {}), (None, 0, [0, 1], [])
    if key == "model_type":
        return (None, 5, "gpt2", ["llama"], {}, b"llama"), ("llama", "qwen3")
    if key == "tie_word_embeddings":
        return (None, 1, 0, "true", 1.5, [True]), (True, False)
    return CFG_FLOAT if isinstance(value, float) else CFG_INT


_config_dir: list[Any] = []


def _model_dir() -> str:
    """A checkpoint directory holding CONFIG as config.json and a placeholder weights file (made once per
    session)."""
    import tempfile
    from pathlib import Path

    if not _config_dir:
        _config_dir.append(tempfile.TemporaryDirectory(prefix="fi_ffi_campaign_"))
        without_weights(Path(_config_dir[0].name), CONFIG)
    return str(_config_dir[0].name)


def _segment_gemm_call() -> dict[str, Any]:
    return dict(
        workspace=attention_workspace(),
        x=dev((11, 64), "bfloat16"),
        weights=dev((4, 128, 64), "bfloat16"),
        batch_size=5,
        weight_column_major=True,
        out=dev((11, 128), "bfloat16"),
        seg_indptr=host([0, 3, 3, 10, 11, 11]),
        weight_indices=host([0, 1, 2, 3, 0]),
        backend="sm90",
    )


# a small DeepSeek-V3 config (MoE with grouped noaux_tc routing, YaRN): every key varied one at a time
DEEPSEEK = {
    "model_type": "deepseek_v3",
    "vocab_size": 1000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 32,
    "qk_nope_head_dim": 32,
    "topk_method": "noaux_tc",
    "n_group": 2,
    "topk_group": 1,
    "num_experts_per_tok": 2,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}
YARN = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
# gemma-2 and gpt-oss keys their settings read (the rest of config.json is LlamaConfig's, above)
GEMMA2 = {
    "query_pre_attn_scalar": 256.0,  # a float setting (published as 256 or 224; any number > 0 is a scale)
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh",
    "attention_bias": False,
}
GPT_OSS = {"sliding_window": 128, "swiglu_limit": 7.0, "attention_bias": True}  # rope_theta: LlamaConfig's
GPT_OSS_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "truncate": False}
NESTED: Any = 0
for _ in range(100_000):  # deeper than any recursion limit
    NESTED = [NESTED]


def _family_values(key: str, value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """config.json values of the DeepSeek / Gemma 2 / gpt-oss keys, by the kind of the valid one."""
    if key == "eos_token_id":
        return _config_values(key, value)
    if key in ("mscale", "mscale_all_dim", "attn_logit_softcapping", "final_logit_softcapping"):  # 0: off
        return tuple(v for v in _family_values("", value)[0] if not _same(v, 0.0)), (0.0, 0, 1.0, None)
    if key in ("n_shared_experts", "first_k_dense_replace"):  # 0: none
        return tuple(v for v in (*CFG_INT[0], NESTED) if not _same(v, 0)), (0, *CFG_INT[1])
    if isinstance(value, bool):
        return (None, 1, 0, "true", 1.5, [True], {}), (True, False)
    if isinstance(value, str):
        return (None, 5, "nonsense", [value], {}, b"x", "x\0"), (value,)
    if isinstance(value, float):
        return (NAN, INF, -INF, HUGE, -HUGE, 0.0, -1.0, True, "1.0", [1.0], {}, NESTED), (1, 1e-300, 1e300, None)
    return (*CFG_INT[0], NESTED), (None, *CFG_INT[1])


def _shared_values(key: str, value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """LlamaConfig.shared's config.json values: _config_values, any model_type string being valid (a family's)."""
    if key == "model_type":
        return (None, 5, ["llama"], {}, b"llama"), ("llama", "gpt2", "")
    return _config_values(key, value)


def _family_config_values(model_type: str) -> Callable[[str, Any], tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """config.json values of a family's whole config (its reader, e.g. gemma2_config): its own keys as
    _family_values, the shared ones as _config_values, and ``model_type`` its own only."""

    def values(key: str, value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        if key == "model_type":
            return (None, 5, "gpt2", "llama", [model_type], {}, b"x"), (model_type,)
        return _config_values(key, value) if key in CONFIG else _family_values(key, value)

    return values


def _deepseek_yarn(rope_scaling: dict[str, Any]) -> Any:
    """DeepSeekConfig.from_dict of DEEPSEEK with ``rope_scaling`` (its YaRN keys varied one at a time)."""
    return deepseek_config.DeepSeekConfig.from_dict({**DEEPSEEK, "rope_scaling": rope_scaling})


def _gpt_oss_yarn(rope_scaling: dict[str, Any]) -> Any:
    """gpt_oss_settings of GPT_OSS with ``rope_scaling`` (its YaRN keys varied one at a time)."""
    return gpt_oss.gpt_oss_settings({**GPT_OSS, "rope_scaling": rope_scaling}, 2, "config.json")


from pathlib import Path  # noqa: E402


def _padded_prefill_call() -> dict[str, Any]:
    """pad_prefill's valid call: 2 requests of 300 token rows on 19 pages (as fill_prefill wrote them) padded to the
    320-row bucket, in the views of an engine's padded prefill layout (512 rows, 4 requests, 40 pages)."""
    layout = step_arrays.prefill_layout(512, 4, 40, padded=True)
    v = layout.views(np.zeros(layout.total, np.int32))
    v["qo_indptr"][:3] = [0, 100, 300]
    v["kv_indptr"][:3] = [0, 7, 19]
    return dict(v=v, nnz=300, bucket=320, batch=2, pages=19, page_size=16)


def _prefill_view_values(key: str, value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(never valid, may be valid) replacements of one of pad_prefill's views (a 1-D int32 array); none for
    ``last_rows`` and ``rider_slots``, which it neither reads nor writes (the real requests' rows keep their
    values)."""
    if key in ("last_rows", "rider_slots"):
        return (), ()
    never = (None, 5, 1.5, "x", [0] * len(value), value.astype(np.int64), value.astype(np.float32), value[None])
    return never, (value[:1], value[:0], value.copy())


def _bad_config_dirs() -> tuple[str, ...]:
    """Directories whose config.json is broken: deeply nested JSON, a 5000-digit number, a NUL byte, not UTF-8,
    a top level that is no object, empty (made once per session; each must be refused naming model_dir), and a
    million-entry list under a DeepSeek model_type (last: a parser refuses it by key, a dispatcher may pass it)."""
    texts: dict[str, bytes] = {
        "nested": b"[" * 200_000 + b"]" * 200_000,
        "nested_obj": b'{"model_type": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
        "digits": b'{"model_type": "deepseek_v3", "vocab_size": ' + b"9" * 5000 + b"}",
        "nul": b'{"model_type": "deepseek_v3\x00"}',
        "latin1": b'{"model_type": "\xff"}',
        "list": b"[1, 2, 3]",
        "empty": b"",
        "huge_list": b'{"model_type": "deepseek_v3", "layer_types": [' + b"1," * 1_000_000 + b"1]}",
    }
    if "bad" not in _family_dirs:
        import tempfile

        _family_dirs["bad"] = tempfile.TemporaryDirectory(prefix="fi_ffi_campaign_bad_")
        for name, text in texts.items():
            d = Path(_family_dirs["bad"].name) / name
            d.mkdir()
            (d / "config.json").write_bytes(text)
    return tuple(str(Path(_family_dirs["bad"].name) / name) for name in texts)


_family_dirs: dict[str, Any] = {}


def _family_dir(name: str, config: dict[str, Any]) -> str:
    """A checkpoint directory holding ``config`` as config.json and a placeholder weights file (made once per
    session)."""
    import tempfile
    from pathlib import Path

    if name not in _family_dirs:
        _family_dirs[name] = tempfile.TemporaryDirectory(prefix=f"fi_ffi_campaign_{name}_")
        without_weights(Path(_family_dirs[name].name), config)
    return str(_family_dirs[name].name)


def _ds_routing() -> Any:
    return deepseek_config.DeepSeekConfig.from_dict(dict(DEEPSEEK)).routing


engine_modules = {"gemma2": gemma2, "gpt_oss": gpt_oss, "deepseek": deepseek, "llama": llama}
ENGINE_KINDS = {
    "model_dir": "path",
    "max_seq_len": "opt_int",
    "num_pages": "opt_int",
    "max_prefill_tokens": "opt_int",
    "device": "opt_int",
    "comm": "opt_object",
    "fused_routing": "opt_bool",
    "kv_cache_dtype": "kv_cache_dtype",
    "kv_cache_scales": "kv_cache_scales",
    "lora": "lora",
}


def _text_dir() -> str:
    """A checkpoint directory for the text layer (tokenizer, chat template, generation config; made once per
    session); skips without the engine extra's tokenizers and jinja2."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    if "text" not in _family_dirs:
        import tempfile

        from helpers.text_checkpoints import write_text_checkpoint

        _family_dirs["text"] = tempfile.TemporaryDirectory(prefix="fi_ffi_campaign_text_")
        write_text_checkpoint(Path(_family_dirs["text"].name))
    return str(_family_dirs["text"].name)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 😀"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
GENERATION = {
    "eos_token_id": [1, 2],
    "bos_token_id": 1,
    "pad_token_id": 0,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,
    "max_new_tokens": 64,
    "repetition_penalty": 1.1,
}
_TOKEN_ID = (("1", 1.5, -1, True, 2**31, HUGE, NAN, [1.5], [-1], [1, "2"], {}), (None, 0, 5, [], [5], 2**31 - 1))
_SAMPLING: dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]] = {
    "do_sample": (("true", 1, 0, 1.5, [True]), (None, False)),
    "temperature": (("0.7", -0.1, NAN, INF, -INF, HUGE, True, 1e5, [0.7]), (None, 0, 0.0, 2, 1e-9)),
    "top_p": ((0, 0.0, -0.5, 1.5, NAN, "0.9", True, HUGE), (None, 1, 1.0, 1e-6)),
    "top_k": ((-1, 2.5, "50", True, 2**31, HUGE, NAN), (None, 0, 1)),
    "max_new_tokens": ((0, -1, 1.5, "64", True, 2**31, HUGE), (None, 1, 2**31 - 1)),
    "repetition_penalty": ((0, -1.0, NAN, INF, "1.1", True, HUGE), (None, 1, 0.5)),
}


def _generation_values(key: str, value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return _SAMPLING.get(key, _TOKEN_ID)


def _text_entries() -> dict[str, list[tuple[str, Entry]]]:
    """The text layer's rows (tokenizer, chat template, detokenizer, generation defaults, the codec)."""
    codec = text.TextCodec.from_dir(_text_dir())
    tok = codec.tokenizer
    template = chat.ChatTemplate({"default": "{{ messages[0].content }}", "tool_use": "T"}, "campaign template")
    path = {"model_dir": "path"}
    directory = {"model_dir": "directory"}  # readers that do not read config.json
    with_tools = {"tools": "opt_records", "documents": "opt_records"}
    labels = {"fmt": "label", "prefix": "label"}
    return {
        "text.tokenizer.Tokenizer": [
            ("Tokenizer.from_dir", Entry(tokenizer.Tokenizer.from_dir, lambda: {"model_dir": _text_dir()}, kinds=path)),
            (
                "Tokenizer.encode",
                Entry(tok.encode, lambda: {"text": "hé 😀", "add_special_tokens": True}, kinds={"text": "label"}),
            ),
            ("Tokenizer.decode", Entry(tok.decode, lambda: {"ids": [1, 40, 41], "skip_special_tokens": True})),
            ("Tokenizer.token_id", Entry(tok.token_id, lambda: {"token": "<|im_end|>"}, kinds={"token": "label"})),
            ("Tokenizer.token_piece", Entry(tok.token_piece, lambda: {"token_id": 40})),
            (
                "Tokenizer.special_token_id",
                Entry(tok.special_token_id, lambda: {"token_name": "eos_token"}, kinds={"token_name": "label"}),
            ),
        ],
        "text.tool_calls.ToolCallParser": [
            (
                "ToolCallParser",
                Entry(tool_calls.ToolCallParser, lambda: {"fmt": "hermes", "prefix": ""}, kinds=labels),
            ),
            (
                "ToolCallParser.feed",
                Entry(tool_calls.ToolCallParser("hermes").feed, lambda: {"text": "ab"}, kinds={"text": "label"}),
            ),
            (
                "ToolCallParser (harmony)",
                Entry(tool_calls.ToolCallParser, lambda: {"fmt": "harmony", "prefix": "<|channel|>"}, kinds=labels),
            ),
            (
                "ToolCallParser.feed (harmony)",
                Entry(tool_calls.ToolCallParser("harmony").feed, lambda: {"text": "<|end|>"}, kinds={"text": "label"}),
            ),
            (
                "ToolCallParser (neutral)",
                Entry(
                    tool_calls.ToolCallParser,
                    lambda: {"fmt": "json", "function": "f"},
                    kinds={**labels, "function": "opt_label"},
                ),
            ),
        ],
        "text.harmony.HarmonyReader": [
            ("HarmonyReader", Entry(harmony.HarmonyReader, lambda: {})),
            (
                "HarmonyReader.feed",
                Entry(harmony.HarmonyReader().feed, lambda: {"text": "<|message|>ab"}, kinds={"text": "label"}),
            ),
        ],
        **_grammar_entries(tok, codec.eos_token_ids),
        "text.tool_calls.call_format": [
            ("call_format", Entry(tool_calls.call_format, lambda: {"template": "x"}, kinds={"template": "label"}))
        ],
        "text.tool_calls.opener": [
            (
                "opener",
                Entry(
                    tool_calls.opener,
                    lambda: {"fmt": "hermes", "function": "f"},
                    kinds={"fmt": "label", "function": "opt_label"},
                ),
            ),
            (
                "opener (harmony)",
                Entry(
                    tool_calls.opener,
                    lambda: {"fmt": "harmony", "function": "f"},
                    kinds={"fmt": "label", "function": "opt_label"},
                ),
            ),
        ],
        "text.chat.ChatTemplate": [
            (
                "ChatTemplate",
                Entry(
                    chat.ChatTemplate, lambda: {"templates": {"default": "x"}, "source": "t"}, kinds={"source": "label"}
                ),
            ),
            (
                "ChatTemplate.find",
                Entry(
                    chat.ChatTemplate.find,
                    lambda: {"model_dir": _text_dir(), "tokenizer_config": None},
                    kinds={**directory, "tokenizer_config": "opt_mapping"},
                ),
            ),
            (
                "ChatTemplate.render",
                Entry(
                    template.render,
                    lambda: dict(
                        messages=CHAT,
                        add_generation_prompt=True,
                        tools=[TOOL],
                        documents=None,
                        special_tokens={"bos_token": "<s>"},
                        template=None,
                    ),
                    kinds={**with_tools, "special_tokens": "opt_mapping", "template": "opt_str"},
                ),
            ),
        ],
        "text.detokenize.IncrementalDetokenizer": [
            (
                "IncrementalDetokenizer",
                Entry(
                    detokenize.IncrementalDetokenizer,
                    lambda: dict(
                        tokenizer=tok,
                        prompt_ids=[1, 40],
                        skip_special_tokens=True,
                        stop=["\n\n"],
                        keep_special_tokens=["<|im_end|>"],
                    ),
                    kinds={"tokenizer": "object", "stop": "stop_strings", "keep_special_tokens": "token_texts"},
                ),
            ),
            (
                "IncrementalDetokenizer.push",
                Entry(detokenize.IncrementalDetokenizer(tok).push, lambda: {"token_id": 40}),
            ),
        ],
        "text.detokenize.StopStrings": [
            ("StopStrings", Entry(detokenize.StopStrings, lambda: {"stop": ["END"]}, kinds={"stop": "stop_strings"})),
            (
                "StopStrings.feed",
                Entry(detokenize.StopStrings(["END"]).feed, lambda: {"text": "ab"}, kinds={"text": "label"}),
            ),
        ],
        "text.generation_config.GenerationDefaults": [
            (
                "GenerationDefaults.from_dict",
                Entry(
                    generation_config.GenerationDefaults.from_dict,
                    lambda: dict(d=dict(GENERATION), source="generation_config.json", tokenizer_eos_ids=[2]),
                    fields=("d", _generation_values),
                    kinds={"source": "label"},
                ),
            ),
            (
                "GenerationDefaults.from_dir",
                Entry(
                    generation_config.GenerationDefaults.from_dir,
                    lambda: {"model_dir": _text_dir(), "tokenizer_eos_ids": [2]},
                    kinds=path,
                ),
            ),
        ],
        "text.model_files.checkpoint_dir": [
            ("checkpoint_dir", Entry(model_files.checkpoint_dir, lambda: {"model_dir": _text_dir()}, kinds=directory))
        ],
        "text.codec.TextCodec": [
            ("TextCodec.from_dir", Entry(text.TextCodec.from_dir, lambda: {"model_dir": _text_dir()}, kinds=path)),
            (
                "TextCodec",
                Entry(
                    text.TextCodec,
                    lambda: dict(tokenizer=tok, chat_template=codec.chat_template, generation=codec.generation),
                    kinds={"tokenizer": "object", "chat_template": "opt_object", "generation": "object"},
                ),
            ),
            (
                "TextCodec.encode",
                Entry(codec.encode, lambda: {"text": "hi", "add_special_tokens": True}, kinds={"text": "label"}),
            ),
            ("TextCodec.decode", Entry(codec.decode, lambda: {"ids": [40, 41], "skip_special_tokens": False})),
            *(
                (
                    f"TextCodec.{method.__name__}",
                    Entry(
                        method, lambda: dict(messages=CHAT, add_generation_prompt=False, tools=None), kinds=with_tools
                    ),
                )
                for method in (codec.render_chat, codec.encode_chat)
            ),
            (
                "TextCodec.detokenizer",
                Entry(
                    codec.detokenizer,
                    lambda: dict(prompt_ids=[40], stop="END", skip_special_tokens=True, keep_special_tokens=()),
                    kinds={"stop": "stop_strings", "keep_special_tokens": "token_texts"},
                ),
            ),
        ],
    }


JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}
TOOL_SPEC = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _grammar_entries(tok: Any, eos: Any) -> dict[str, list[tuple[str, Entry]]]:
    """response_format's grammars (llguidance: skipped without it)."""
    pytest.importorskip("llguidance")
    grammars = grammar.GrammarTokenizer(tok, eos)
    compiled = grammar.response_format_grammar({"type": "json_object"})
    (brace,) = tok.encode("{")

    def consume(token: int) -> None:  # a fresh matcher each call: a valid token at its start
        grammars.matcher(compiled).consume(token)

    matcher = grammars.matcher(compiled)
    return {
        "text.grammar.response_format_schema": [
            (
                "response_format_schema",
                Entry(grammar.response_format_schema, lambda: {"response_format": JSON_SCHEMA_FORMAT}),
            )
        ],
        "text.grammar.response_format_grammar": [
            (
                "response_format_grammar",
                Entry(grammar.response_format_grammar, lambda: {"response_format": JSON_SCHEMA_FORMAT}),
            )
        ],
        "text.grammar.GrammarTokenizer": [
            (
                "GrammarTokenizer",
                Entry(
                    grammar.GrammarTokenizer,
                    lambda: {"tokenizer": tok, "eos_token_ids": list(eos)},
                    kinds={"tokenizer": "object"},
                ),
            ),
            (
                "GrammarTokenizer.check",
                Entry(grammars.check, lambda: {"grammar": compiled}, kinds={"grammar": "label"}),
            ),
            (
                "GrammarTokenizer.matcher",
                Entry(grammars.matcher, lambda: {"grammar": compiled}, kinds={"grammar": "label"}),
            ),
            (
                "GrammarTokenizer.lark_text",
                Entry(
                    grammars.lark_text,
                    lambda: {"text": "<|im_end|>x", "markers": ["<|im_end|>"]},
                    kinds={"text": "label"},
                ),
            ),
        ],
        "text.grammar.lark_json": [
            (
                "lark_json",
                Entry(
                    grammar.lark_json, lambda: {"schema": {"type": "object"}, "where": "w"}, kinds={"where": "label"}
                ),
            )
        ],
        "text.tool_grammar.tool_call_grammar": [
            (
                "tool_call_grammar",
                Entry(
                    tool_grammar.tool_call_grammar,
                    lambda: {
                        "grammars": grammars,
                        "fmt": "hermes",
                        "tools": [TOOL_SPEC],
                        "function": None,
                        "parallel": True,
                        "response": {"type": "object"},
                    },
                    kinds={"grammars": "object", "fmt": "label", "function": "opt_label", "response": "opt_mapping"},
                ),
            )
        ],
        "text.grammar.GrammarMatcher": [
            ("GrammarMatcher.allowed_mask", Entry(matcher.allowed_mask, lambda: {"vocab_size": tok.vocab_size + 6})),
            ("GrammarMatcher.bitmask", Entry(matcher.bitmask, lambda: {"vocab_size": tok.vocab_size})),
            ("GrammarMatcher.consume", Entry(consume, lambda: {"token": brace})),
        ],
    }


_TEXT_NAMES = (
    "text.tokenizer.Tokenizer",
    "text.chat.ChatTemplate",
    "text.detokenize.IncrementalDetokenizer",
    "text.detokenize.StopStrings",
    "text.generation_config.GenerationDefaults",
    "text.model_files.checkpoint_dir",
    "text.codec.TextCodec",
    "text.tool_calls.ToolCallParser",
    "text.harmony.HarmonyReader",
    "text.tool_calls.call_format",
    "text.tool_calls.opener",
    "text.grammar.response_format_schema",
    "text.grammar.response_format_grammar",
    "text.grammar.GrammarTokenizer",
    "text.grammar.GrammarMatcher",
    "text.grammar.lark_json",
    "text.tool_grammar.tool_call_grammar",
)


# LoRA (fi_engine.lora): a rank-4 adapter of q and v over 2 layers of a small Llama, read for that base
LORA_BASE = lora_adapter.BaseShapes(2, "bfloat16", llama_shapes(64, 128, 4, 2, 16))
_lora_dir: list[Any] = []


def _adapter_dir() -> str:
    """A PEFT adapter folder for LORA_BASE (written once per session)."""
    import tempfile
    from pathlib import Path

    if not _lora_dir:
        _lora_dir.append(tempfile.TemporaryDirectory(prefix="fi_ffi_campaign_lora_"))
        write_adapter(Path(_lora_dir[0].name), LORA_BASE.shapes, 2, 4, modules=("q_proj", "v_proj"))
    return str(_lora_dir[0].name)


def _lora_settings_values(key: str, value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """LoraSettings' fields as the entries of the engine's ``lora`` dict."""
    kind = {"modules": "lora_modules", "max_cpu_loras": "opt_int"}.get(key, "int")
    return ENTRY_KINDS[kind] if kind in ENTRY_KINDS else SCALARS[kind]


def _release_one(slot: int) -> None:
    """SlotTable.release on a table of 4 slots whose slots 0 and 1 a request each holds."""
    table = lora_slots.SlotTable(4)
    table.acquire("a"), table.acquire("b")
    table.release(slot)


_ADDRESS = 1 << 40  # fake device addresses, aligned for every kernel argument
LORA_LAUNCHES = {
    "shrink_args": dict(rows=3, x=_ADDRESS, x_ld=64, slots=2 * _ADDRESS, scale=3 * _ADDRESS, targets=4 * _ADDRESS,
                        bit=1, a=5 * _ADDRESS, a_slot=2 * 48 * 64, width=48, k=64, t=6 * _ADDRESS, t_ld=48),
    "expand_args": dict(rows=3, t=_ADDRESS, t_ld=48, tw=48, slots=2 * _ADDRESS, targets=3 * _ADDRESS, bit=1,
                        bt=4 * _ADDRESS, b_slot=2 * 16 * 96, rank=16, n=96, n0=64, n1=80, y=5 * _ADDRESS, y_ld=96),
}  # fmt: skip
LORA_FUSED_SHRINK = dict(
    mode=2, rows=3, h=_ADDRESS, h_ld=64, x=2 * _ADDRESS, x_ld=64, norm_weight=3 * _ADDRESS, eps=1e-5, k=64,
    slots=4 * _ADDRESS, scale=5 * _ADDRESS, targets=6 * _ADDRESS, bit=1, a=7 * _ADDRESS, a_slot=48 * 64, width=48,
    t=8 * _ADDRESS, t_ld=48,
)  # fmt: skip
LORA_FUSED_EXPAND = dict(
    t=_ADDRESS, t_ld=48, slots=2 * _ADDRESS, targets=3 * _ADDRESS, bit=1, bt=4 * _ADDRESS, b_slot=16 * 96, rank=16,
    n0=64, n1=80,
)  # fmt: skip
# the in-grid shrink's fields of that expand (3 parts of rank 16 over k = 64)
LORA_FUSED_GRID = dict(a=9 * _ADDRESS, a_slot=48 * 64, scale=10 * _ADDRESS, width=48, sync=11 * _ADDRESS)
LORA_ENTRIES: dict[str, Callable[[], list[tuple[str, Entry]]]] = {
    "lora.adapter.read_adapter": lambda: [
        (
            "read_adapter",
            Entry(
                lora_adapter.read_adapter,
                lambda: dict(lora_path=_adapter_dir(), base=LORA_BASE, max_lora_rank=8),
                kinds={"lora_path": "adapter_path", "base": "object"},
            ),
        )
    ],
    "lora.slots.pack": lambda: [
        (
            "pack",
            Entry(
                lora_slots.pack,
                lambda: dict(
                    adapter=lora_adapter.read_adapter(_adapter_dir(), LORA_BASE, 8),
                    layout=lora_slots.SlotLayout.of(LORA_BASE, 8),
                ),
                kinds={"adapter": "object", "layout": "object"},
            ),
        )
    ],
    "lora.slots.SlotTable": lambda: [
        ("SlotTable", Entry(lora_slots.SlotTable, lambda: dict(slots=4))),
        ("SlotTable.release", Entry(_release_one, lambda: dict(slot=1))),
    ],
    "lora.batch.row_slots": lambda: [
        (
            "row_slots",
            Entry(
                lora_batch.row_slots,
                lambda: dict(request_slots=host([0, -1, 2]), rows_per_request=host([2, 0, 3]), out=host([0] * 8)),
                kinds={"rows_per_request": "row_counts"},
            ),
        )
    ],
    "lora.batch.segments": lambda: [("segments", Entry(lora_batch.segments, lambda: dict(slots=host([0, 0, -1, 2]))))],
    "lora.batch.takes_adapters": lambda: [
        ("takes_adapters", Entry(lora_batch.takes_adapters, lambda: dict(slots=host([-1, 0, -1]))))
    ],
    "lora.settings.adapter_name": lambda: [
        (
            "adapter_name",
            Entry(
                lora_settings.adapter_name,
                lambda: dict(lora_name="my-adapter", field="lora_name"),
                kinds={"lora_name": "adapter_name", "field": "label"},
            ),
        )
    ],
    "lora.settings.LoraSettings": lambda: [
        (
            "LoraSettings",
            Entry(
                lora_settings.LoraSettings,
                lambda: dict(max_loras=2, max_cpu_loras=4, max_lora_rank=8, modules=(("a", "/a"),)),
                kinds={"max_cpu_loras": "opt_int", "modules": "lora_modules"},
            ),
        ),
        (
            "LoraSettings.of",
            Entry(
                lora_settings.LoraSettings.of,
                lambda: dict(lora=dict(max_loras=2, max_cpu_loras=4, max_lora_rank=8, modules={"a": "/a"})),
                fields=("lora", _lora_settings_values),
            ),
        ),
    ],
    # the kernels' argument packers: one valid launch each, over fake aligned addresses
    "kernels.lora_fused.shrink_launch": lambda: [
        ("shrink_launch", Entry(lora_fused.shrink_launch, lambda: dict(LORA_FUSED_SHRINK)))
    ],
    "kernels.lora_fused.expand_ints": lambda: [
        (
            "expand_ints",
            Entry(
                lora_fused.expand_ints,
                lambda: dict(lora=lora_fused.LoraExpand(**LORA_FUSED_EXPAND), n=96),
                kinds={"lora": "object"},
            ),
        )
    ],
    "kernels.lora_fused.grid_ints": lambda: [
        (
            "grid_ints",
            Entry(
                lora_fused.grid_ints,
                lambda: dict(lora=lora_fused.LoraExpand(**LORA_FUSED_EXPAND, **LORA_FUSED_GRID), n=96, k=64),
                kinds={"lora": "object"},
            ),
        )
    ],
    "kernels.norm_fold.fold_ints": lambda: [
        (
            "fold_ints",
            Entry(
                norm_fold.fold_ints,
                lambda: dict(
                    fold=norm_fold.FoldIn(h=_ADDRESS, y=2 * _ADDRESS, sync=3 * _ADDRESS, rs=4 * _ADDRESS, eps=1e-5)
                ),
                kinds={"fold": "object"},
            ),
        )
    ],
    **{
        f"kernels.lora_bgmv.{name}": lambda name=name: [
            (name, Entry(getattr(lora_bgmv, name), lambda: dict(LORA_LAUNCHES[name])))
        ]
        for name in ("shrink_args", "expand_args")
    },
}

ENTRY_POINTS: dict[str, Callable[[], list[tuple[str, Entry]]]] = {
    **LORA_ENTRIES,
    # the engine's text layer (each row builds every text entry point, then keeps its own)
    **{name: lambda name=name: _text_entries()[name] for name in _TEXT_NAMES},
    # fi_ffi.comm
    "env.read_env": lambda: [
        (
            "read_env (torchrun)",
            Entry(comm_env.read_env, lambda: {"env": {**TORCHRUN, **ADDR}}, fields=("env", _env_values)),
        ),
        ("read_env (slurm)", Entry(comm_env.read_env, lambda: {"env": {**SLURM, **ADDR}}, fields=("env", _env_values))),
    ],
    "nccl.Communicator": lambda: [
        (
            "Communicator.from_env",
            Entry(
                nccl.Communicator.from_env,
                lambda: {"env": comm_env.read_env({**TORCHRUN, **ADDR}), "device": 0, "timeout": 5.0},
                kinds={"backend": "opt_str", "env": "env_object", "device": "opt_int", "timeout": "opt_float"},
            ),
        ),
        (
            "Communicator",
            Entry(
                nccl.Communicator,
                lambda: {"rank": 0, "world_size": 2, "unique_id": bytes(nccl.UNIQUE_ID_BYTES), "device": 0},
                kinds={"backend": "opt_str", "env": "opt_object", "unique_id": "bytes"},
            ),
        ),
    ],
    "nccl.load_backend": lambda: [("load_backend", Entry(nccl.load_backend, dict, kinds={"name": "opt_str"}))],
    "vllm_ar.CustomAllReduce": lambda: [
        ("CustomAllReduce", Entry(vllm_ar.CustomAllReduce, lambda: {"comm": cpu_communicator()}, comm=True))
    ],
    "trtllm_ar.AllReduceFusionWorkspace": lambda: [
        (
            "AllReduceFusionWorkspace",
            Entry(
                trtllm_ar.AllReduceFusionWorkspace,
                lambda: {"comm": cpu_communicator(), "max_token_num": 16, "hidden_dim": 1024},
                comm=True,
            ),
        )
    ],
    "trtllm_ar.workspace_metadata": lambda: [
        (
            "workspace_metadata",
            Entry(
                trtllm_ar.workspace_metadata,
                lambda: dict(world_size=2, max_token_num=16, hidden_dim=1024, dtype="float16"),
            ),
        )
    ],
    "trtllm_ar.trtllm_allreduce_fusion": lambda: [
        (
            f"trtllm_allreduce_fusion (pattern {p})",
            Entry(
                trtllm_ar.trtllm_allreduce_fusion,
                lambda p=p: fusion_args(p),
                comm=True,
                kinds={"use_oneshot": "opt_bool", "rms_eps": "opt_float" if p == 0 else "float"},
            ),
        )
        for p in (0, 1, 2)
    ],
    "trtllm_ar.trtllm_moe_allreduce_fusion": lambda: [
        (
            "trtllm_moe_allreduce_fusion",
            Entry(
                trtllm_ar.trtllm_moe_allreduce_fusion,
                moe_reduction_args,
                comm=True,
                kinds={"residual_out": "opt_tensor", "norm_out": "opt_tensor", "moe_allreduce_out": "opt_tensor"},
            ),
        )
    ],
    "trtllm_ar.trtllm_moe_finalize_allreduce_fusion": lambda: [
        (
            "trtllm_moe_finalize_allreduce_fusion",
            Entry(trtllm_ar.trtllm_moe_finalize_allreduce_fusion, moe_args, comm=True),
        )
    ],
    "trtllm_ar.trtllm_custom_all_reduce": lambda: [
        (
            "trtllm_custom_all_reduce",
            Entry(trtllm_ar.trtllm_custom_all_reduce, custom_args, comm=True, kinds={"eps": "opt_float"}),
        )
    ],
    "trtllm_ar.trtllm_lamport_initialize": lambda: [
        (
            "trtllm_lamport_initialize",
            Entry(
                trtllm_ar.trtllm_lamport_initialize,
                lambda: dict(buffer_ptr=1 << 40, size=64, dtype="float16"),
                comm=True,
            ),
        )
    ],
    "trtllm_ar.trtllm_lamport_initialize_all": lambda: [
        (
            "trtllm_lamport_initialize_all",
            Entry(
                trtllm_ar.trtllm_lamport_initialize_all,
                lambda: dict(
                    buffer_0_ptr=1 << 40, buffer_1_ptr=2 << 40, buffer_2_ptr=3 << 40, size=64, dtype="float16"
                ),
                comm=True,
            ),
        )
    ],
    "vllm_ar.all_reduce": lambda: [
        (
            "vllm all_reduce",
            Entry(
                vllm_ar.all_reduce,
                lambda: dict(
                    fa=1, inp=dev((4, 256)), out=dev((4, 256)), reg_buffer=0, reg_buffer_sz_bytes=0, num_ctas=36
                ),
                comm=True,
            ),
        )
    ],
    "vllm_ar.init_custom_ar": lambda: [
        (
            "init_custom_ar",
            Entry(
                vllm_ar.init_custom_ar,
                lambda: dict(
                    ipc_tensors=[1 << 40, 2 << 40], rank_data=dev((1 << 12,), "uint8"), rank=0, full_nvlink=True
                ),
                comm=True,
                kinds={"ipc_tensors": "pointers"},
            ),
        )
    ],
    "vllm_ar.register_buffer": lambda: [
        (
            "register_buffer",
            Entry(
                vllm_ar.register_buffer,
                lambda: dict(fa=1, fake_ipc_ptrs=[1 << 40, 2 << 40]),
                comm=True,
                kinds={"fake_ipc_ptrs": "pointers"},
            ),
        )
    ],
    "vllm_ar.dispose": lambda: [("dispose", Entry(vllm_ar.dispose, lambda: dict(fa=1), comm=True))],
    "vllm_ar.get_graph_buffer_ipc_meta": lambda: [
        ("get_graph_buffer_ipc_meta", Entry(vllm_ar.get_graph_buffer_ipc_meta, lambda: dict(fa=1), comm=True))
    ],
    "vllm_ar.meta_size": lambda: [("meta_size", Entry(vllm_ar.meta_size, dict, comm=True))],
    # fi_engine
    # the engine's CUDA files by name (no GPU: reading and expanding text)
    "kernels.cuda_sources.files": lambda: [("files", Entry(cuda_sources.files, dict))],
    "kernels.cuda_sources.read": lambda: [("read", Entry(cuda_sources.read, lambda: {"file": "griddep.cuh"}))],
    "kernels.cuda_sources.source": lambda: [("source", Entry(cuda_sources.source, lambda: {"file": "gemv.cu"}))],
    "checkpoint.config.LlamaConfig": lambda: [
        (
            "LlamaConfig.from_dict",
            Entry(
                model_config.LlamaConfig.from_dict,
                lambda: {"d": dict(CONFIG), "source": "config.json"},
                fields=("d", _config_values),
                kinds={"source": "label"},
            ),
        ),
        (
            "LlamaConfig.shared",
            Entry(
                model_config.LlamaConfig.shared,
                lambda: {"d": dict(CONFIG), "source": "config.json"},
                fields=("d", _shared_values),
                kinds={"source": "label", "moe": "opt_object", "rope": "opt_object"},
            ),
        ),
        (
            "LlamaConfig.from_dir",
            Entry(model_config.LlamaConfig.from_dir, lambda: {"model_dir": _model_dir()}, kinds={"model_dir": "path"}),
        ),
    ],
    "layers.moe_routing.softmax_topk": lambda: [
        ("softmax_topk", Entry(moe_routing.softmax_topk, lambda: dict(logits=np.zeros((3, 8), np.float32), k=2)))
    ],
    "layers.moe_routing.local_assignments": lambda: [
        (
            "local_assignments",
            Entry(
                moe_routing.local_assignments,
                lambda: dict(
                    experts=np.array([[0, 5], [2, 7]], np.int32), weights=np.ones((2, 2), np.float32), first=4, count=4
                ),
            ),
        )
    ],
    "layers.moe_routing.group_local": lambda: [
        (
            "group_local",
            Entry(moe_routing.group_local, lambda: dict(local=np.array([[0, 4], [2, 1]], np.int32), count=4)),
        )
    ],
    "layers.moe_routing.group_by_expert": lambda: [
        (
            "group_by_expert",
            Entry(
                moe_routing.group_by_expert, lambda: dict(experts=np.array([[0, 1], [2, 1]], np.int32), num_experts=4)
            ),
        )
    ],
    "layers.moe.MoEScratch": lambda: [
        (
            "MoEScratch",
            Entry(
                moe.MoEScratch,
                lambda: dict(num_experts=8, hidden=256, intermediate=512, top_k=2, max_tokens=16, dtype="bfloat16"),
                kinds={"capacity": "opt_int", "dense_rows": "opt_int"},
            ),
        )
    ],
    "layers.moe.choose_path": lambda: [
        ("choose_path", Entry(moe.choose_path, lambda: dict(rows=4, num_experts=32, top_k=4)))
    ],
    # the engines' arguments as one value: each checked when it is made (the engines below build it first)
    "runtime.settings.EngineSettings": lambda: [
        ("EngineSettings", Entry(engine_settings.EngineSettings, lambda: {}, kinds=ENGINE_KINDS))
    ],
    "runtime.sched.pages.pages_for": lambda: [
        ("pages_for", Entry(pages.pages_for, lambda: dict(tokens=33, page_size=16)))
    ],
    "runtime.sched.pages.PageAllocator": lambda: [
        ("PageAllocator", Entry(pages.PageAllocator, lambda: dict(num_pages=8)))
    ],
    "runtime.sample.speculation.NgramProposer": lambda: [
        ("NgramProposer", Entry(speculation.NgramProposer, lambda: dict(k=4, prompt_lookup_max=4, prompt_lookup_min=1)))
    ],
    "runtime.sample.speculation.DraftPolicy": lambda: [
        ("DraftPolicy", Entry(speculation.DraftPolicy, lambda: dict(prior=0.5, explore=16)))
    ],
    "runtime.sample.speculation.speculative_config_arg": lambda: [
        (
            "speculative_config_arg",
            Entry(
                speculation.speculative_config_arg,
                lambda: dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2}),
                kinds={"speculative_config": "opt_mapping"},
            ),
        )
    ],
    "runtime.sample.speculation.accepted_tokens": lambda: [
        ("accepted_tokens", Entry(speculation.accepted_tokens, lambda: dict(draft=[4, 5], choices=[4, 5, 6])))
    ],
    "runtime.sched.kv_cache.KVCacheManager": lambda: [
        ("KVCacheManager", Entry(kv_cache.KVCacheManager, lambda: dict(num_pages=8, page_size=16)))
    ],
    "runtime.sched.kv_cache.page_hashes": lambda: [
        (
            "page_hashes",
            Entry(
                kv_cache.page_hashes,
                lambda: dict(token_ids=[1, 2, 3, 4, 5], page_size=2),
                kinds={"extra_key": "extra_key"},
            ),
        )
    ],
    "runtime.worker.graph_shapes.prefill_buckets": lambda: [
        ("prefill_buckets", Entry(graph_shapes.prefill_buckets, lambda: dict(max_tokens=2048)))
    ],
    "runtime.worker.graph_shapes.bucket_for": lambda: [
        (
            "bucket_for",
            Entry(
                graph_shapes.bucket_for,
                lambda: dict(rows=300, buckets=graph_shapes.prefill_buckets(2048)),
                kinds={"buckets": "ladder"},
            ),
        )
    ],
    "runtime.sched.step_arrays.pad_prefill": lambda: [
        (
            "pad_prefill",
            Entry(
                step_arrays.pad_prefill,
                _padded_prefill_call,
                fields=("v", _prefill_view_values),
                kinds={"v": "object", "requests": "opt_int"},
            ),
        )
    ],
    "runtime.worker.graph_shapes.decode_batches": lambda: [
        ("decode_batches", Entry(graph_shapes.decode_batches, lambda: dict(max_batch=48)))
    ],
    "runtime.worker.graph_shapes.prefill_slots": lambda: [
        ("prefill_slots", Entry(graph_shapes.prefill_slots, lambda: dict(batch=3, max_batch=64)))
    ],
    "runtime.serving.delay_factor_arg": lambda: [
        ("delay_factor_arg", Entry(serving.delay_factor_arg, lambda: dict(scheduler_delay_factor=3.0)))
    ],
    "runtime.serving.overlap_steps_arg": lambda: [
        ("overlap_steps_arg", Entry(serving.overlap_steps_arg, lambda: dict(overlap_steps=True)))
    ],
    "runtime.serving.mixed_prefill_arg": lambda: [
        ("mixed_prefill_arg", Entry(serving.mixed_prefill_arg, lambda: dict(mixed_prefill=True)))
    ],
    "models.moe_paths.MoEPaths": lambda: [("MoEPaths", Entry(moe_paths.MoEPaths, lambda: dict(moe_path="dense")))],
    "layers.tensor_parallel.rows": lambda: [
        ("rows", Entry(tensor_parallel.rows, lambda: dict(weight=np.zeros((8, 4), np.float32), rank=1, parts=2)))
    ],
    "layers.tensor_parallel.columns": lambda: [
        ("columns", Entry(tensor_parallel.columns, lambda: dict(weight=np.zeros((8, 4), np.float32), rank=1, parts=2)))
    ],
    "layers.tensor_parallel.segment": lambda: [
        ("segment", Entry(tensor_parallel.segment, lambda: dict(vector=np.zeros(8, np.float32), rank=1, parts=2)))
    ],
    "layers.tensor_parallel.shard_config": lambda: [
        (
            "shard_config",
            Entry(
                tensor_parallel.shard_config,
                lambda: dict(cfg=model_config.LlamaConfig.from_dict(dict(CONFIG)), tensor_parallel=2),
            ),
        )
    ],
    "models.deepseek_config.fp8_shard_refusal": lambda: [
        (
            "fp8_shard_refusal",
            Entry(
                deepseek_config.fp8_shard_refusal,
                lambda: dict(cfg=deepseek_config.DeepSeekConfig.from_dict(dict(DEEPSEEK)), tensor_parallel=2),
            ),
        )
    ],
    "models.deepseek_config.DeepSeekConfig": lambda: [
        (
            "DeepSeekConfig.from_dict",
            Entry(
                deepseek_config.DeepSeekConfig.from_dict,
                lambda: {"d": dict(DEEPSEEK), "source": "config.json"},
                fields=("d", _family_values),
                kinds={"source": "label"},
            ),
        ),
        (
            "DeepSeekConfig YaRN",
            Entry(_deepseek_yarn, lambda: {"rope_scaling": dict(YARN)}, fields=("rope_scaling", _family_values)),
        ),
        (
            "DeepSeekConfig.from_dir",
            Entry(
                deepseek_config.DeepSeekConfig.from_dir,
                lambda: {"model_dir": _family_dir("deepseek", DEEPSEEK)},
                kinds={"model_dir": "path"},
            ),
        ),
    ],
    "models.deepseek_config.is_deepseek": lambda: [
        (
            "is_deepseek",
            Entry(
                deepseek_config.is_deepseek,
                lambda: {"model_dir": _family_dir("deepseek", DEEPSEEK)},
                kinds={"model_dir": "path_or_false"},
            ),
        )
    ],
    "layers.deepseek_routing.grouped_topk": lambda: [
        (
            "grouped_topk",
            Entry(
                deepseek_routing.grouped_topk,
                lambda: dict(
                    logits=np.zeros((3, 8), np.float32),
                    top_k=2,
                    routing=_ds_routing(),
                    renormalize=True,
                    bias=np.zeros(8, np.float32),
                ),
                kinds={"routing": "object", "bias": "opt_array"},
            ),
        )
    ],
    "models.deepseek.graph_blocker": lambda: [
        (
            "graph_blocker",
            Entry(
                deepseek.graph_blocker,
                lambda: {"c": deepseek_config.DeepSeekConfig.from_dict(dict(DEEPSEEK))},
                kinds={"c": "object"},
            ),
        )
    ],
    "layers.deepseek_routing.device_routing_blocker": lambda: [
        (
            "device_routing_blocker",
            Entry(
                deepseek_routing.device_routing_blocker, lambda: {"routing": _ds_routing()}, kinds={"routing": "object"}
            ),
        )
    ],
    "models.deepseek.fused_routing_blocker": lambda: [
        (
            "fused_routing_blocker",
            Entry(
                deepseek.fused_routing_blocker,
                lambda: {"c": deepseek_config.DeepSeekConfig.from_dict(dict(DEEPSEEK))},
                kinds={"c": "object"},
            ),
        )
    ],
    "models.mla_weights.split_kv_b": lambda: [
        (
            "split_kv_b",
            Entry(
                mla_weights.split_kv_b,
                lambda: dict(kv_b=np.zeros((2 * (32 + 16), 64), np.float32), heads=2, nope=32, v_dim=16),
            ),
        )
    ],
    "models.gemma2.gemma2_settings": lambda: [
        (
            "gemma2_settings",
            Entry(
                gemma2.gemma2_settings,
                lambda: dict(d=dict(GEMMA2), num_layers=2, source="config.json"),
                fields=("d", _family_values),
                kinds={"source": "label"},
            ),
        )
    ],
    "models.gpt_oss.gpt_oss_settings": lambda: [
        (
            "gpt_oss_settings",
            Entry(
                gpt_oss.gpt_oss_settings,
                lambda: dict(d=dict(GPT_OSS), num_layers=2, source="config.json"),
                fields=("d", _family_values),
                kinds={"source": "label"},
            ),
        ),
        (
            "gpt_oss_settings YaRN",
            Entry(_gpt_oss_yarn, lambda: {"rope_scaling": dict(GPT_OSS_YARN)}, fields=("rope_scaling", _family_values)),
        ),
    ],
    "checkpoint.family_configs.layer_windows": lambda: [
        (
            "layer_windows",
            Entry(
                family_configs.layer_windows,
                lambda: dict(
                    d={"layer_types": ["sliding_attention", "full_attention"]},
                    num_layers=2,
                    sliding_window=128,
                    source="config.json",
                ),
                kinds={"source": "label", "d": "object"},
            ),
        )
    ],
    "models.gemma2.gemma2_config": lambda: [
        (
            "gemma2_config",
            Entry(
                gemma2.gemma2_config,
                lambda: {"d": {**CONFIG, **GEMMA2, "model_type": "gemma2"}, "source": "config.json"},
                fields=("d", _family_config_values("gemma2")),
                kinds={"source": "label"},
            ),
        )
    ],
    "models.gpt_oss.gpt_oss_config": lambda: [
        (
            "gpt_oss_config",
            Entry(
                gpt_oss.gpt_oss_config,
                lambda: {"d": {**CONFIG, **GPT_OSS, **GPT_OSS_MOE, "model_type": "gpt_oss"}, "source": "config.json"},
                fields=("d", _family_config_values("gpt_oss")),  # its YaRN keys: gpt_oss_settings YaRN, above
                kinds={"source": "label"},
            ),
        )
    ],
    "checkpoint.config.MoEConfig": lambda: [
        (
            "MoEConfig.from_dict",
            Entry(
                model_config.MoEConfig.from_dict,
                lambda: {"d": dict(GPT_OSS_MOE, intermediate_size=64), "source": "config.json"},
                fields=("d", _config_values),
                kinds={"source": "label", "size_key": "str", "default_experts": "opt_int"},
            ),
        )
    ],
    "models.registry.Family": lambda: [
        (
            "Family",
            Entry(
                engines.Family,
                lambda: dict(label="Toy", model_types=("toy",), module="toy_family", engine="ToyEngine"),
                kinds={"label": "label", "module": "label", "engine": "label"},
            ),
        )
    ],
    "models.registry.families": lambda: [("families", Entry(engines.families, dict))],
    "models.registry.model_types": lambda: [("model_types", Entry(engines.model_types, dict))],
    "models.registry.family_config_json": lambda: [
        (
            "family_config_json",
            Entry(
                engines.family_config_json,
                lambda: {"model_dir": _model_dir(), "definition": llama.Llama},
                kinds={"model_dir": "path", "definition": "object"},
            ),
        )
    ],
    **{
        f"models.registry.{fn.__name__}": lambda fn=fn: [
            (
                f"{fn.__name__} ({name})",
                Entry(fn, lambda c=c, name=name: {"model_dir": _family_dir(name, c)}, kinds={"model_dir": "path"}),
            )
            for name, c in (
                ("llama", CONFIG),
                ("deepseek", DEEPSEEK),
                ("gemma2", {**CONFIG, **GEMMA2, "model_type": "gemma2"}),
            )
        ]
        for fn in (engines.family_of, engines.read_config)
    },
    "models.registry.engine_class": lambda: [
        (
            f"engine_class ({name})",
            Entry(
                engines.engine_class,
                lambda c=c, name=name: {"model_dir": _family_dir(name, c)},
                kinds={"model_dir": "path"},
            ),
        )
        for name, c in (
            ("llama", CONFIG),
            ("deepseek", DEEPSEEK),
            ("gemma2", {**CONFIG, **GEMMA2, "model_type": "gemma2"}),
        )
    ],
    "models.registry.open_engine": lambda: [
        (
            "open_engine",
            Entry(
                engines.open_engine,
                lambda: {"model_dir": _model_dir()},
                kinds={"model_dir": "path", "max_num_batched_tokens": "opt_int", "speculative_config": "opt_mapping"},
            ),
        )
    ],
    "models.gpt_oss.expert_matrices": lambda: [
        (
            "expert_matrices",
            Entry(
                gpt_oss.expert_matrices,
                lambda: dict(
                    gate_up=np.zeros((2, 8, 12), np.float32),
                    gate_up_bias=np.zeros((2, 12), np.float32),
                    down=np.zeros((2, 6, 8), np.float32),
                ),
            ),
        )
    ],
    "checkpoint.mxfp4_weights.dequantize_mxfp4": lambda: [
        (
            "dequantize_mxfp4",
            Entry(
                mxfp4_weights.dequantize_mxfp4,
                lambda: dict(blocks=np.zeros((2, 3, 16), np.uint8), scales=np.full((2, 3), 127, np.uint8)),
            ),
        )
    ],
    "models.gpt_oss.shard_experts": lambda: [
        (
            "shard_experts",
            Entry(
                gpt_oss.shard_experts,
                lambda: dict(
                    gate_up=np.zeros((2, 8, 12), np.float32),
                    gate_up_bias=np.zeros((2, 12), np.float32),
                    down=np.zeros((2, 6, 8), np.float32),
                    rank=1,
                    parts=2,
                ),
            ),
        )
    ],
    "models.gpt_oss.rope_cos_sin_cache": lambda: [
        (
            "rope_cos_sin_cache",
            Entry(
                gpt_oss.rope_cos_sin_cache,
                lambda: dict(
                    cfg=gpt_oss.gpt_oss_config(
                        {
                            **CONFIG,
                            **GPT_OSS,
                            "model_type": "gpt_oss",
                            "rope_scaling": dict(GPT_OSS_YARN),
                            **GPT_OSS_MOE,
                        }
                    ),
                    positions=16,
                ),
                kinds={"cfg": "object", "positions": "size"},
            ),
        )
    ],
    "layers.tensor_parallel.VocabShard": lambda: [
        ("VocabShard.of", Entry(tensor_parallel.VocabShard.of, lambda: dict(vocab=1000, rank=1, parts=3))),
        (
            "VocabShard.take",
            Entry(
                lambda table: tensor_parallel.VocabShard.of(10, 1, 3).take(table),
                lambda: dict(table=np.zeros((10, 4), np.float32)),
            ),
        ),
    ],
    "layers.tensor_parallel.combine_shard_argmax": lambda: [
        (
            "combine_shard_argmax",
            Entry(
                tensor_parallel.combine_shard_argmax,
                lambda: dict(values=np.zeros((2, 3), np.float32), indices=np.array([[0, 1, 2], [5, 6, 7]], np.int32)),
            ),
        )
    ],
    "layers.tensor_parallel.expert_rows": lambda: [
        (
            "expert_rows",
            Entry(tensor_parallel.expert_rows, lambda: dict(weight=np.zeros((2, 8, 4), np.float32), rank=1, parts=2)),
        )
    ],
    "launch.describe_exit": lambda: [("describe_exit", Entry(comm_launch.describe_exit, lambda: dict(code=-9)))],
    "watchdog.Watchdog": lambda: [
        (
            "Watchdog",
            Entry(
                watchdog.Watchdog,
                lambda: dict(env=comm_env.read_env({**TORCHRUN, **ADDR}), on_lost=print),
                kinds={"env": "object", "on_lost": "opt_callable"},
            ),
        )
    ],
    # the engines: their argument and config checks run before the device is opened (here: no GPU, the end)
    **{
        f"models.{module}.{cls}": lambda module=module, cls=cls, config=config: [
            (
                cls,
                Entry(
                    getattr(engine_modules[module], cls),
                    lambda: {"model_dir": _family_dir(module, config())},
                    kinds=ENGINE_KINDS,
                ),
            )
        ]
        for module, cls, config in (
            ("gemma2", "Gemma2Engine", lambda: {**CONFIG, **GEMMA2, "model_type": "gemma2"}),
            (
                "gpt_oss",
                "GptOssEngine",
                lambda: {**CONFIG, **GPT_OSS, **GPT_OSS_MOE, "model_type": "gpt_oss", "rope_scaling": GPT_OSS_YARN},
            ),
            ("deepseek", "DeepSeekEngine", lambda: DEEPSEEK),
            ("llama", "LlamaEngine", lambda: CONFIG),
        )
    },
    # the prepared segment GEMM (fi_ffi.ops; not exported by fi_ffi: the MoE layer's fixed-capacity path)
    "ops.segment_gemm.prepare_segment_gemm": lambda: [
        (
            "prepare_segment_gemm",
            Entry(seg.prepare_segment_gemm, lambda: {**_segment_gemm_call(), "args_buffer": dev((256,), "uint8")}),
        ),
        ("segment_gemm", Entry(seg.segment_gemm, _segment_gemm_call)),
    ],
}

# name -> why no generator here (and where it is covered): each a reason a reviewer can check
_RECORD = "a frozen record of values fi_ffi made or checked (its constructor takes them as given)"
_CONSTANTS = "a namespace of integer codes, not a callable entry point"
_GPU = "needs a GPU stack (CuPy, cuBLAS or cuda-python on a device): covered by the GPU suites (tests/**/test_gpu_*.py)"
_ADAPTER = "the engine's adapter over fi_ffi ops already in the op campaign above (same checks, same arguments)"
_PACKING = "packs a declaration's values for the comm set-up calls, reached only through the entry points above"
_PLUMBING = "internal plumbing over the CUDA runtime (raw addresses fi_ffi itself allocated); comm/test_gpu_comm.py"
EXEMPT: dict[str, str] = {
    # LoRA (fi_engine.lora): the records and parts its generators above (read_adapter, pack, SlotTable, ...) reach
    "lora.adapter.BaseShapes": "the engine's record of its checked config's projection shapes (BaseShapes.of); "
    "adapters that do not fit it are refused by key in engine/test_lora_adapter.py",
    "lora.adapter.LoraAdapter": "the record read_adapter makes of a checked adapter folder (its generator above)",
    "lora.slots.PackedAdapter": "the record pack makes of a checked LoraAdapter (its generator above)",
    "lora.slots.Group": "one projection group of a SlotLayout, made by SlotLayout.of from a BaseShapes",
    "lora.slots.SlotLayout": "the slots' shapes, made by SlotLayout.of from the engine's BaseShapes and checked "
    "max_lora_rank: engine/test_lora_slots.py",
    "lora.manager.LoraManager": "the engine's own part, made by Engine from checked LoraSettings; its load, key and "
    "unload refusals (a name taken, unknown or in use) in engine/test_lora_manager.py",
    "lora.manager.LoraStats": "the counters a LoraManager keeps and counts up; no argument to check",
    "lora.device.DeviceSlots": _GPU,
    "lora.segment_form.SegmentForm": _GPU,
    **{
        f"lora.segment_form.{name}": "the segment form's host arithmetic, called only by DeviceSlots (GPU) with the "
        "engine's own row slots and addresses; checked against numpy in engine/test_lora_segment_form.py"
        for name in ("served_segments", "shrink_problems", "expand_problems", "pack_args")
    },
    "lora.segment_form.ArgsArena": _GPU,
    "lora.segment_form.PreparedGemms": "SegmentForm's part (GPU), made over its own workspace and asked only by "
    "DeviceSlots with the engine's own problems; its preparation per layer checked on the CPU in "
    "engine/test_lora_segment_form.py",
    "kernels.lora_bgmv.LoraLaunch": "the record shrink_args and expand_args return after their checks (their "
    "generators above); a launch takes only what they made",
    "serve.lora_api.ServedAdapters": "made by build_app from its checked lora_modules and model names (the server's "
    "own part); its refusals and the endpoints' bodies in engine/test_openai_lora.py",
    "serve.lora_api.runtime_lora_allowed": "reads one environment variable (its mapping argument is the tests'); its "
    "values in engine/test_openai_lora.py",
    "serve.lora_api.check_runtime_lora_updating": "build_app's and serve_api_servers' check of their "
    "allow_runtime_lora_updating (refused by that name in engine/test_openai_lora.py)",
    # compiles its kernels with CuPy in the constructor; its dtype check runs before that (engine/test_lora_slots.py)
    "kernels.lora_bgmv.LoraBgmv": _GPU,
    **dict.fromkeys(
        [
            "env.DistEnv",
            "trtllm_ar.WorkspaceMetadata",
            "checkpoint.safetensors.TensorInfo",
            "runtime.settings.EngineSizes",
        ],
        _RECORD,
    ),
    # compiles its kernel with CuPy in the constructor; its argument checks run before that (engine/test_deepseek.py)
    "layers.deepseek_routing.DeviceGroupedTopk": _GPU,
    # compiles its kernels with CuPy in the constructor; its dtype check runs before that (engine/test_moe_gemv.py)
    "kernels.moe_gemv.GroupedGemv": _GPU,
    # the same for e4m3 experts; its dtype check, and Fp8Experts' shape checks (a record of device arrays the
    # loader makes), in engine/test_moe_gemv.py
    "kernels.fp8_moe_gemv.Fp8GroupedGemv": _GPU,
    "kernels.fp8_moe_gemv.Fp8Experts": _RECORD,
    # the same for MXFP4 experts; Mxfp4Experts' checks and the layout's refusals in engine/test_mxfp4_moe_gemv.py
    "kernels.mxfp4_moe_gemv.Mxfp4GroupedGemv": _GPU,
    # the grouped GEMVs' shared parts: bases made only as the classes above (their checks run there), and the
    # launch's operands, a record their launch builds from arguments it was given
    **dict.fromkeys(["kernels.moe_gemv.GroupedGemvs", "kernels.moe_gemv.QuantizedGroupedGemv"], _GPU),
    "kernels.moe_gemv.ExpertCall": _RECORD,
    # the base of Fp8Linears and Int4Linears (made by QuantizedWeights on a GPU; their checks where theirs are)
    "kernels.quantized_linears.QuantizedLinears": _GPU,
    "kernels.mxfp4_moe_gemv.Mxfp4Experts": _RECORD,
    "kernels.mxfp4_moe_gemv.tiled_mxfp4": "array in, array out: anything but uint8 blocks and scales of whole tiles, "
    "or scales past 2**113, is refused naming the argument (engine/test_mxfp4_moe_gemv.py)",
    "kernels.mxfp4_moe_gemv.tiled_values": "the numpy reading of tiled_mxfp4's output: anything else is refused "
    "naming codes, scales or k (engine/test_mxfp4_moe_gemv.py)",
    "kernels.mxfp4_moe_gemv.padded": "one int, checked by values.arg_int (named k; its cases are the values module's)",
    # made by Dense on a GPU; which calls it plans is a pure check (skinny_gemm.takes: engine/test_skinny_gemm.py),
    # its launches are engine/test_gpu_skinny_gemm.py's
    "kernels.skinny_gemm.SkinnyGemm": _GPU,
    "serve.openai_server.http_protocols": "takes no argument: says which of uvicorn's HTTP protocols are installed",
    "kernels.skinny_gemm.SkinnyPlan": _RECORD,
    "kernels.skinny_gemm.Geometry": _RECORD,
    "kernels.fp8_moe_gemv.tiled_layout": "array in, array out: anything but a 3-D array of whole tiles is refused "
    "naming codes (engine/test_fp8_moe.py::test_the_tiled_layout_is_its_definition)",
    **dict.fromkeys(
        [
            "checkpoint.config.RopeConfig",
            "layers.moe_routing.ExpertGroups",
            "models.llama.GenerationResult",
            "layers.moe.ClampedSwiGLU",
            "layers.moe.MoEBiases",
        ],
        _RECORD,
    ),
    **dict.fromkeys(
        [
            "trtllm_ar.AllReduceFusionOp",
            "trtllm_ar.AllReduceFusionPattern",
            "trtllm_ar.AllReduceStrategyConfig",
            "trtllm_ar.AllReduceStrategyType",
            "trtllm_ar.QuantizationSFLayout",
        ],
        _CONSTANTS,
    ),
    **{
        f"cuda.{n}": _PLUMBING
        for n in (
            "DeviceBuffer",
            "copy_to_device",
            "copy_to_host",
            "destroy_stream",
            "device_count",
            "ipc_close",
            "ipc_handle",
            "ipc_open",
            "memset",
            "new_stream",
            "set_device",
            "synchronize",
        )
    },
    "ipc.IpcBuffer": _PLUMBING,
    "control.call": _PACKING,
    "control.pack": _PACKING,
    "launch.launch": "spawns processes (fi-ffi launch): tests/comm/test_launch.py",
    "launch.main": "the CLI of fi-ffi launch (argparse checks its arguments): tests/comm/test_launch.py",
    "launch.rank_env": "the child environment fi-ffi launch writes, read by read_env (above): comm/test_launch.py",
    "launch.free_port": "binds sockets; its TypeError/ValueError naming addr: tests/comm/test_launch.py",
    "rendezvous.exchange": "opens sockets to rank 0 (its DistEnv comes from read_env): tests/comm/test_rendezvous.py",
    "rendezvous.default_timeout": "reads FI_FFI_RENDEZVOUS_TIMEOUT: tests/comm/test_rendezvous.py",
    "vllm_ar.register_graph_buffers": "takes get_graph_buffer_ipc_meta of each rank: comm/test_allreduce_kernels.py",
    "runtime.sched.kv_cache.PrefixCacheStats": "the counters a KVCacheManager keeps and counts up; no argument to "
    "check",
    "runtime.sample.speculation.SpeculationStats": "the counters the serving loop keeps and counts up; no argument to "
    "check",
    "runtime.sample.speculation.SpeculativeConfig": "the checked values speculative_config_arg (above) returns",
    "runtime.sample.speculation.DraftModelProposer": "wraps an engine that Engine.draft_model checks",
    "runtime.sample.speculation.same_directory": "compares the engines' model_dir paths: "
    "tests/engine/test_speculation.py",
    "runtime.sample.speculation.tokenizer_difference": "reads two engines' tokenizer.json: "
    "tests/engine/test_speculation.py",
    "checkpoint.safetensors.Checkpoint": "reads safetensors files: tests/engine/test_serving_host.py",
    "checkpoint.safetensors.read_header": "reads a safetensors header: tests/engine/test_serving_host.py",
    "checkpoint.safetensors.write_safetensors": "a test helper writing checkpoints: tests/engine/test_serving_host.py",
    **{f"kernels.cublas.{n}": _GPU for n in ("Handle", "get_ffi", "library", "library_path", "status_name")},
    "kernels.dense.Dense": "compiles its kernels with CuPy on a GPU; its packed GEMV's checks run on CPU over a Dense "
    "made without its constructor: tests/engine/test_dense.py",
    "kernels.fused_gemv.FusedGemvs": "made by Dense on a GPU; its argument checks run on CPU over fake kernels: "
    "tests/engine/test_dense.py",
    "kernels.fused_gemv.FusedKernels": "compiles fused_gemv.cu with CuPy on a GPU; its names and options: "
    "package/test_kernel_fingerprints.py",
    "kernels.quantized_weights.QuantizedWeights": "made by Dense on a GPU; its epilogue GEMVs' checks run on CPU over "
    "fake registries: tests/engine/test_dense.py",
    "kernels.launch.Launcher": "holds the CUDA driver's launch entry points; prepared_kernel's checks: "
    "tests/engine/test_dense.py",
    **{
        f"kernels.launch.{n}": "a shared value check every packer reaches on each bad case: tests/engine/test_dense.py"
        for n in ("int_arg", "overlap")
    },
    "kernels.launch.address_arg": "a shared address check (NULL, alignment) the release-row and gather packers reach "
    "on each bad address: tests/engine/test_release_rows.py",
    "kernels.row_kernels.RowKernels": "CuPy kernels compiled by Dense on a GPU; prepared_gather's checks: "
    "tests/engine/test_dense.py",
    "kernels.row_kernels.column_blocks": "a block count of a width the engine's own buffers give",
    "kernels.release_rows.ReleasingRows": "CuPy kernels compiled on a GPU; its prepared launches' checks, every bad "
    "argument named: tests/engine/test_release_rows.py",
    "kernels.release_rows.norm_threads": "a block size of a width the engine's own buffers give",
    "kernels.shard_kernels.ShardKernels": _GPU,
    "kernels.gemv_settings.GemvSettings": "class-level compile settings, checked when the options are made: "
    "package/test_kernel_fingerprints.py",
    "kernels.cuda_sources.Griddep": "a class-level compile switch (a bool read when a program is made), no call: "
    "tests/engine/test_cuda_sources.py",
    "kernels.launch_timing.LaunchTimer": _GPU,
    "kernels.launch_timing.close_choices": "reads the timings a Dense recorded itself (LaunchTimer.times): "
    "tests/engine/test_step_tuning.py",
    "runtime.worker.step_tuning.PairTrial": _RECORD,
    "runtime.worker.step_tuning.ShapeTrial": _RECORD,
    "runtime.worker.step_tuning.StepTuning": _RECORD,
    "runtime.worker.step_tuning.step_ms": _GPU,
    "runtime.worker.step_tuning.tuned_step": "takes the runner's own Dense and graphs at capture: "
    "tests/engine/test_step_tuning.py",
    "kernels.skinny_gemm.SkinnyLaunches": _GPU,
    "kernels.copies.host_address": "a numpy array's own address (its array interface): the engine's staging buffers",
    "kernels.dense.data_type": _GPU,
    "kernels.fused_gemv.load_row_kernels": "loads a CuPy module's kernels on a GPU (FusedKernels.compile's)",
    "kernels.fused_gemv.EpilogueCall": "a record of a call the fused GEMVs checked (their parts methods make it): "
    "tests/engine/test_lora_fused.py",
    **{
        f"kernels.call_forms.{n}": "builds a method from another's signature at import (no call values): "
        "tests/engine/test_call_forms.py"
        for n in ("forwarded_signature", "same_parameters", "value_then_parameters")
    },
    "kernels.lora_fused.LoraFusedKernels": "compiles lora_fused.cu with CuPy on a GPU; its kernels' fingerprints: "
    "tools/kernel_fingerprints.py",
    "kernels.lora_fused.LoraFusedGemvs": "made by the model runner on a GPU; its argument checks run on CPU over fake "
    "kernels: tests/engine/test_lora_fused.py",
    "kernels.norm_fold.FoldIn": "a value fold_ints checks field by field: tests/engine/test_norm_fold.py",
    "kernels.norm_fold.FoldOut": "a value fold_ints checks field by field: tests/engine/test_norm_fold.py",
    "kernels.norm_fold.FoldCounters": "a registry of ints the quantized weights keep; its refusal by name is tested in "
    "tests/engine/test_norm_fold.py",
    "kernels.lora_fused.LoraExpand": "a value expand_ints checks field by field: tests/engine/test_lora_fused.py",
    "kernels.fused_args.RopeAppend": "addresses FusedGemvs.prepared_qkv_rope checks field by field: "
    "tests/engine/test_dense.py",
    "kernels.fused_args.RouterEpilogue": "a value FusedGemvs.prepared_router checks field by field: "
    "tests/engine/test_dense.py",
    **{f"kernels.cublas_lt.{n}": _GPU for n in ("LtMatmuls", "library")},
    "kernels.graph.CudaGraph": _GPU,
    **{
        f"values.{n}": "a shared value check that the config and host-helper generators above reach on every bad case"
        for n in ("arg_array", "arg_flag", "arg_int", "show")
    },
    **{
        f"values.{n}": "a value check with fi_ffi's messages: every bad kind in tests/engine/test_public_helpers.py"
        for n in ("flag", "integer")
    },
    "values.model_dir_fspath": "the shared model_dir path check of read_config_json and checkpoint_dir: every bad "
    "model_dir case of the config and text rows above reaches it",
    "values.float32_bits": "a kernel argument's float32 bits: every bad kind in tests/engine/test_public_helpers.py, "
    "and each caller's argument in test_dense.py, test_kv_fp8.py, test_moe_scratch.py",
    **{
        f"cli.{n}": "the fi-engine command: every bad value in a subprocess, tests/engine/test_generate_command.py"
        for n in ("build_parser", "main")
    },
    **{
        f"kernels.flashinfer.{n}": _ADAPTER
        for n in (
            "append_kv",
            "decode_plan",
            "decode_run",
            "descriptor",
            "fused_add_rmsnorm",
            "generator",
            "prepared_append_kv",
            "prepared_decode_run",
            "prepared_fused_add_rmsnorm",
            "prepared_qk_rmsnorm",
            "prepared_rmsnorm",
            "prepared_silu_and_mul",
            "prepared_rope_inplace",
            "prefill_plan",
            "prefill_run",
            "qk_rmsnorm",
            "rmsnorm",
            "rope_inplace",
            "sample_rows",
            "sample_top_k_top_p",
            "silu_and_mul",
            "softmax",
            "workspace",
        )
    },
    **{
        f"text.args.{n}": "a shared value check of the text layer that its generators above reach on every bad case"
        for n in ("arg_mapping", "arg_records", "arg_text", "arg_token_ids")
    },
    **dict.fromkeys(
        ["text.model_files.read_json", "text.model_files.read_text"],
        "reads a file of a directory checkpoint_dir (above) checked: every model_dir case of the text rows above "
        "(broken config.json included) goes through it",
    ),
    "text.optional.require": "imports one of the text layer's own package names; engine/test_text_files.py checks the "
    "message of a missing package",
    "models.llama.SamplingParams": "checked by LlamaEngine.generate on a GPU: tests/engine/test_serving_host.py",
    "layers.kv_fp8.KvFp8": _GPU,
    "layers.kv_fp8.parse_kv_cache_dtype": "the engines' kv_cache_dtype check (the engine rows above pass it every "
    "bad value)",
    "layers.kv_fp8.check_supported": "the engines' FP8 refusals on their own parsed config: engine/test_kv_fp8.py",
    "layers.kv_fp8.read_scales": "reads a Checkpoint the engine opened (its tensors checked by name): "
    "engine/test_kv_fp8.py",
    "models.llama.step_views": "the engine's own views of its step buffers (fi_ffi's values): "
    "engine/test_serving_host.py",
    # the same three in their own modules (fi_engine.models.llama re-exports them)
    "runtime.sampling_params.SamplingParams": "checked by LlamaEngine.generate on a GPU: "
    "tests/engine/test_serving_host.py",
    "runtime.sample.sampler.SamplingParams": "re-exported from sampling_params (its checks: the line above)",
    "runtime.sampling_params.sampling_arg": "the type check of add_request's and generate's sampling=: its bad kinds "
    "in "
    "tests/engine/test_step_api_host.py",
    "runtime.sample.sampler.Sampler": "the engine's own part, made by Engine from its checked buffers (Sampler.of): "
    "tests/engine/test_step_api_host.py and the GPU suites",
    "kernels.cuda_sources.functions": "compiles with NVRTC through CuPy (a GPU machine's); its file argument is "
    "source()'s, whose generator above checks it, and the engine passes literal names: the GPU suites",
    "kernels.cuda_sources.function_ptr": "reads the handle of a kernel CuPy compiled (a GPU machine's); the engine "
    "passes only the kernels it compiled itself: the GPU suites",
    "runtime.sample.logits_processing.LogitsProcessor": "the engine's own part, made by Engine over the runner's "
    "logits; "
    "its requests' fields are SamplingParams' (checked by its generator): tests/engine/test_logits_processing.py",
    "runtime.sample.logits_processing.PendingLogprobs": "a record the processor makes of a step's device arrays: "
    "tests/engine/test_logits_processing.py",
    "runtime.sample.logits_processing.PendingPromptLogprobs": "a record the processor makes of a pass's device arrays: "
    "tests/engine/test_logits_processing.py",
    "runtime.sample.logits_processing.logprobs_of_rows": "the processor's array math over the runner's own logits (an "
    "array module and a float32 array it made): tests/engine/test_logits_processing.py",
    "runtime.sample.logits_processing.mask_disallowed": "the processor's array math over the runner's own logits and "
    "the "
    "bitmasks its requests' matchers made (GrammarMatcher.bitmask, checked there): "
    "tests/engine/test_logits_processing.py",
    "runtime.worker.model_runner.ModelRunner": "the engine's own part, made by Engine from its checked settings and "
    "family "
    "(EngineSettings' generator above; it needs a GPU): tests/engine/test_prefill_buckets.py and the GPU suites",
    "runtime.sample.sampler.Draws": "the engine's own record of a Philox stream (a fi_ffi.Generator of a checked "
    "seed): "
    "tests/engine/test_step_api_host.py",
    "runtime.stepping.StepOutput": _RECORD,
    "runtime.stepping.TokenLogprobs": _RECORD,
    "text.tool_calls.ToolCall": _RECORD,
    "text.harmony.HarmonyParts": _RECORD,
    "checkpoint.quantization.Fp8Scheme": _RECORD,
    "checkpoint.quantization.fp8_scheme": "reads a config dict: its malformed values refused by key in "
    "tests/engine/test_quantization_config.py",
    "checkpoint.quantization.llama_fp8_scheme": "reads a config dict: FP8 layouts served or refused by name in "
    "tests/engine/test_quantization_config.py",
    "models.deepseek_config.deepseek_fp8_scheme": "reads a config dict: FP8 layouts served or refused by name in "
    "tests/engine/test_deepseek.py (test_other_quantizations_are_refused_naming_the_key_and_the_way_out)",
    "checkpoint.quantization.grouped_gemv_block": "a predicate of any value (True or False, never an error); odd "
    "values (floats, bools, lists, negatives, one-element tuples) answered False in "
    "tests/engine/test_moe_gemv.py::test_the_blocks_the_grouped_gemv_takes",
    "checkpoint.quantization.Int4Scheme": _RECORD,
    "checkpoint.quantization.int4_scheme": "reads a config dict: its malformed and unserved values refused by key in "
    "tests/engine/test_int4_weights.py (test_an_unserved_int4_setting_is_refused_naming_its_key)",
    "checkpoint.quantization.llama_int4_scheme": "reads a config dict: int4 layouts served or refused by name in "
    "tests/engine/test_int4_weights.py",
    # int4 weights: host-side arrays read from a checkpoint (every malformed tensor refused by name in
    # engine/test_int4_weights.py); Int4Matrix.dequantized's dtype is checked there too
    "checkpoint.int4_weights.read_int4_linear": "reads a Checkpoint: test_a_malformed_int4_tensor_is_refused_by_name "
    "(engine/)",
    "checkpoint.int4_weights.Int4Matrix": _RECORD,
    "checkpoint.int4_weights.decode_gemv_layout": "arrays in, array out: what does not fit the layout refused by name "
    "in engine/test_int4_weights.py (test_the_layout_decoder_refuses_what_does_not_fit)",
    "kernels.int4_linear.Int4Weight": _RECORD,
    "kernels.int4_linear.Int4Linears": "made by QuantizedWeights.add_int4_weight on a GPU; its checks in "
    "engine/test_gpu_int4_linear.py (test_bad_calls_name_the_argument)",
    # FP8 weights: host-side arrays read from a checkpoint (every malformed tensor refused by name in
    # engine/test_fp8_weights.py); the GPU registry's arguments are checked in engine/test_gpu_fp8_linear.py
    "checkpoint.fp8_weights.read_fp8_linear": "reads a Checkpoint: test_a_malformed_fp8_tensor_is_refused_by_name "
    "(engine/)",
    **dict.fromkeys(["checkpoint.fp8_weights.Fp8Matrix", "kernels.fp8_linear.Fp8Weight"], _RECORD),
    **dict.fromkeys(
        ["checkpoint.fp8_weights.quantize_e4m3", "checkpoint.fp8_weights.dequantize_e4m3"],
        "numpy array in, array out (non-numeric or wrong-typed input: TypeError naming it, "
        "engine/test_fp8_weights.py::test_the_array_helpers_refuse_what_is_no_array)",
    ),
    "serve.engine_process.EngineProcess": "starts a child process per instance: its factory, arguments and the child's "
    "errors in engine/test_engine_process.py (test_a_child_that_cannot_build_its_engine_is_named), clients= and "
    "client() in engine/test_engine_process_clients.py (test_clients_are_named_and_handed_over_before_use)",
    "serve.engine_client.EngineClient": "made by EngineProcess.client only (a connection to a running child): "
    "engine/test_engine_process_clients.py",
    "kernels.fp8_linear.Fp8Linears": "made by QuantizedWeights.add_fp8_weight on a GPU; its checks in "
    "engine/test_gpu_fp8_linear.py "
    "(test_bad_fp8_calls_name_the_argument)",
    "runtime.stepping.StepEngine": "a typing.Protocol the engines implement (their methods' signatures against it: "
    "tests/engine/test_step_api_host.py)",
    "runtime.stepping.StepEngineBase": "a base class, never built itself: its add_request is the GPU engine's, an "
    "engine process's and its clients' (their bad arguments in tests/engine/test_step_api_host.py and "
    "engine/test_engine_process.py)",
    "runtime.stepping.FinishReason": "a typing.Literal of the three reasons a request ends, not an entry point",
    "runtime.sample.sampler.draw_groups": "plans the rows of the engine's own scheduler (its Requests): "
    "tests/engine/test_step_api_host.py",
    "runtime.serving.GenerationResult": _RECORD,
    "runtime.worker.step_io.step_views": "the engine's own views of its step buffers (fi_ffi's values): "
    "engine/test_serving_host.py",
    **dict.fromkeys(
        ["models.llama.Llama", "models.gemma2.Gemma2", "models.gpt_oss.GptOss", "models.deepseek.DeepSeek"],
        "a model family's definition, made by its engine class (takes no argument; the engines' rows above check "
        "theirs)",
    ),
    "models.registry.SettingsFamily": "a base of family definitions (Gemma 2's, gpt-oss's), never built itself: "
    "its read_config and check refuse another family's config in engine/test_family_configs.py "
    "(test_family_engines_refuse_other_types)",
    "layers.moe.MoELayer": _GPU,
    "layers.moe.MoEWeights": _GPU,
    "runtime.sched.step_arrays.Layout": "the engine's own buffer layout (fi_ffi's values): "
    "tests/engine/test_serving_host.py",
    "runtime.sched.request.Request": "a record the Scheduler makes: tests/engine/test_serving_host.py",
    "runtime.sched.scheduler.Scheduler": "the engine's scheduler, made from a checked LlamaConfig: "
    "tests/engine/test_serving_host.py",
    "runtime.sched.step_arrays.fill_decode": "fills the engine's own arrays from its scheduler's requests: "
    "engine/test_serving_host.py",
    "runtime.sched.step_arrays.fill_prefill": "fills the engine's own arrays from its scheduler's requests: "
    "engine/test_serving_host.py",
    "runtime.sched.step_arrays.kv_lengths": "reads the page table fill_decode wrote into a buffer the family keeps "
    "(the Llama and DeepSeek plans): engine/test_serving_host.py",
    **dict.fromkeys(
        [
            "layers.deepseek_routing.DeepSeekRouting",
            "models.deepseek_config.DeepSeekRouting",  # (re-exported from layers.deepseek_routing)
            "checkpoint.config.YarnRope",
            "models.gemma2.Gemma2Settings",
            "models.gpt_oss.GptOssSettings",
        ],
        _RECORD,
    ),
    "models.registry.register": "adds a row to the process's registry (a second valid call is refused: its model "
    "type is served then); its refusals in package/test_adding_a_model.py",
    "models.gpt_oss.check_checkpoint": "reads a safetensors checkpoint (Checkpoint, above): "
    "engine/test_family_configs.py",
    **dict.fromkeys(
        [
            "models.gpt_oss.read_experts",
            "checkpoint.mxfp4_weights.read_mxfp4_experts",
            "checkpoint.mxfp4_weights.read_mxfp4_blocks",
        ],
        "reads a Checkpoint: every malformed or missing MXFP4 tensor refused by name in "
        "engine/test_mxfp4_weights.py (test_malformed_mxfp4_experts_are_refused_naming_the_tensor)",
    ),
    "checkpoint.mxfp4_weights.mxfp4_scheme": "takes any value and answers a scheme or None, never raising, as "
    "declares_mxfp4 (below): engine/test_mxfp4_weights.py::test_serve_names_mxfp4_experts_in_its_start_up_line",
    "checkpoint.mxfp4_weights.Mxfp4Scheme": "a record of one constant field (the quant_method the server reports)",
    "checkpoint.mxfp4_weights.declares_mxfp4": "takes any value (a config's quantization_config, whatever its type) "
    "and answers a bool, never raising: engine/test_mxfp4_weights.py::test_other_quantizations_are_refused_by_name",
    "models.weights.WeightLoader": "uploads through the caller's CuPy module onto a GPU: the GPU model suites",
    "watchdog.bootstrap": "opens sockets to rank 0 (its DistEnv comes from read_env, above): comm/test_watchdog.py",
    "layers.tensor_parallel.ResidualAllReduce": "over AllReduceFusionWorkspace, Communicator: "
    "engine/test_tensor_parallel.py",
    # streaming and serving: each starts a thread or a server; their bad input has tables of its own
    "serve.service.GenerationService": "starts an engine thread per instance: its argument checks (and submit's) are "
    "the tables of engine/test_service.py (test_bad_*_are_refused_by_name)",
    "serve.service.RequestStream": "made by GenerationService.submit only (engine/test_service.py)",
    **dict.fromkeys(["serve.service.StreamDelta", "serve.service.RequestResult"], _RECORD),
    "serve.metrics.ServingMetrics": "takes no argument (ServingMetrics.shared(n) refuses n by name); the service and "
    "server feed it (engine/test_openai_server.py and engine/test_service.py parse its text with prometheus_client)",
    "serve.shared_queue.SharedQueue": "made by SharedQueue.create (its count refused by name) for GenerationService's "
    "shared_queue: engine/test_service.py (test_a_shared_queue_holds_the_limit_over_several_services)",
    "serve.metrics.Histogram": "the metrics' own buckets (constants of fi_engine.serve.metrics), checked in its "
    "constructor",
    "serve.openai_protocol.ParsedRequest": "made by parse_completion / parse_chat from a checked body",
    **dict.fromkeys(
        [
            "serve.openai_protocol.parse_completion",
            "serve.openai_protocol.parse_chat",
            "serve.openai_protocol.error_body",
        ],
        "an HTTP body's fields, answered 400 naming the field: the BAD / BAD_CHAT tables of "
        "engine/test_openai_server.py",
    ),
    **dict.fromkeys(
        ["serve.client_json.read_json", "serve.client_json.place", "serve.openai_protocol.parse_body"],
        "a client's JSON text (and the path of a value in it), refused by name: the REFUSED table and the type "
        "checks of engine/test_client_json.py",
    ),
    "serve.openai_server.uvicorn_config": "uvicorn's Config for build_app's app (its timeouts refused by name as "
    "build_app's are): engine/test_openai_hostile.py (test_a_stalled_body_is_408_and_trickled_headers_are_cut_off)",
    "serve.api_servers.serve_api_servers": "starts API-server processes over an EngineProcess until a signal: "
    "engine/test_api_servers.py (its front ends' failures named; the address refused by name as port/host)",
    **dict.fromkeys(
        ["serve.openai_server.build_app", "serve.openai_server.serve"],
        "builds (and serve runs) the Starlette app over a GenerationService: engine/test_openai_server.py",
    ),
}

# catalogue kinds of the arguments whose valid value does not tell (Entry.kinds)
ENTRY_KINDS: dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]] = {
    "opt_str": ((5, 1.5, True, b"cupy", ["cupy"], {}, "nonsense"), (None, "cupy", "nccl4py")),
    "object": SCALARS["object"],
    "opt_object": (("x", 5, 1.5, {}), (None,)),
    # the engines' FP8 KV cache: None means "auto"; a supported pair of scales is refused without an FP8 cache
    "kv_cache_dtype": ((5, 1.5, True, b"fp8", "nonsense", "fp8_e5m2", "FP8", HUGE), (None, "auto", "fp8", "fp8_e4m3")),
    "kv_cache_scales": (
        (1.0, "x", (1.0,), (0.0, 1.0), (NAN, 1.0), (1.0, INF), (True, 1.0), ("1", 1.0), (1.0, 1.0, 1.0), HUGE),
        (None, (1.0, 1.0), [0.5, 2]),
    ),
    "env_object": (("x", 5, 1.5, {}, {"RANK": "0"}), ()),  # None reads os.environ: valid, but not this machine's
    "opt_tensor": ((*COMMON_INVALID, 5, 1.5, NAN, True, HUGE, [1.5]), (None,)),
    "label": ((None, 5, 1.5, True, b"x", ("x",), HUGE), ("nonsense", "")),
    "opt_label": ((5, 1.5, True, b"x", ("x",), HUGE), (None, "nonsense", "")),
    "bytes": ((None, "x", 5, b"short", bytearray(3), [0] * 128), ()),
    "pointers": (
        (None, 5, "x", b"12", [0, 1 << 40], [-1, 1 << 40], [1.5, 2.0], [1 << 64, 1 << 40], [HUGE, 1], [None, 1]),
        ([1 << 40] * 4, [1 << 40]),
    ),
    # (the last broken directory is refused by its key, not by model_dir: is_deepseek's maybe-valid values only)
    "path": ((None, 5, 1.5, b"/tmp", "/tmp/a\0b", "/nonexistent/fi_ffi", ["x"], {}, *_bad_config_dirs()[:-1]), ()),
    # is_deepseek: a directory without a readable DeepSeek config.json is "not DeepSeek" (False), not an error
    "path_or_false": ((None, 5, 1.5, b"/tmp", ["x"], {}), ("/nonexistent/fi_ffi", "/tmp/a\0b", *_bad_config_dirs())),
    "opt_array": ((*COMMON_INVALID, 5, 1.5, NAN, True, [1.5], np.zeros(3, np.float32), np.array(["a"] * 8)), ()),
    "opt_callable": (("x", 5, 1.5, {}), (None,)),
    # LoRA: an adapter folder's path; a request's adapter name; the engine's lora settings and their modules
    "adapter_path": ((None, 5, 1.5, b"/tmp", ["x"], {}, "/nonexistent/fi_ffi", "/tmp/a\0b", ""), ()),
    "adapter_name": (
        (None, 5, 1.5, True, b"x", ("a",), HUGE, "", "a b", "a\n", "a\0", "x" * 129, ["a"]),
        ("nonsense", "org/adapter-v1.2", "x" * 128),
    ),
    "lora": (
        ("x", 5, 1.5, True, [1.5], HUGE, NAN, b"x", {1, 2}, ("a",), {"max_loras": 0}, {"nonsense": 1}, {"modules": 5}),
        (None, {}, {"max_loras": 2, "max_lora_rank": 64}),
    ),
    "lora_modules": (
        (
            None,
            "x",
            5,
            1.5,
            b"x",
            {1, 2},
            [("a",)],
            [("a", 5)],
            [(5, "/p")],
            [("a b", "/p")],
            [("a", "/p")] * 2,
            {"a": 5},
            {5: "/p"},
            [None],
        ),
        ((), [], {}, [("a", "/nonexistent")], {"a": "/p", "b": "/q"}),
    ),
    "row_counts": (  # a host index array's refusals, and a negative count; None: one row each
        (*host_array_values(host([2, 0, 3]), True)[0], [1, -1, 1]),
        (None, [2, 0, 3], np.zeros(3, np.int64), host([1, 1]), host([2**31 - 1, 0, 0]), host([2, 0, 3]).reshape(1, 3)),
    ),
    # a checkpoint directory for readers that do not read config.json (a broken one is no concern of theirs)
    "directory": ((None, 5, 1.5, b"/tmp", "/tmp/a\0b", "/nonexistent/fi_ffi", ["x"], {}), _bad_config_dirs()),
    # the text layer: an optional dict with str keys; a list of dicts (tools, documents); OpenAI's `stop`
    "opt_mapping": (("x", 5, 1.5, [1], b"x", {1: "a"}, {"a"}), (None, {})),
    "opt_records": (("x", 5, 1.5, {}, b"x", [1.5], ["x"], [None], {"a": 1}), (None, [], ())),
    # special tokens named by their texts (a detokenizer's keep_special_tokens: texts outside the vocabulary are
    # ignored)
    "token_texts": ((None, 5, 1.5, "<|im_end|>", b"x", [5], [None], {"a": 1}, {"a"}), ((), [], ["x"], ["<|im_end|>"])),
    "stop_strings": ((None, 5, 1.5, b"x", [5], [""], "", {"a": 1}, {"a"}, ["a", None]), ("x", ["a", "b"], (), ("a",))),
    # bucket_for's ladder: a non-empty, strictly ascending sequence of ints (prefill_buckets' tuple, or a list)
    "ladder": (
        (None, 5, 1.5, "x", b"16", (), [], (32, 16), (16, 16), (0, 16), (16, 2**31), (16.0, 32), (True, 32), {16: 1}),
        ([16, 32, 512], (np.int64(16), 512), (512,), (300,), (16, 2**31 - 1)),
    ),
    # a prefix cache's extra key: None, or an int, str or bytes, or a tuple of them
    "extra_key": (
        (1.5, NAN, INF, [1], {"a": 1}, {1, 2}, (1, [2]), _Opaque(), 1 + 2j, np.int64(1), np.array([1])),
        (None, 0, -1, True, "lora", "", b"x", (), ("lora", 7), (None, (1, b"a"))),
    ),
    # a count of rows a host table gets (bounded: 2**31 rows would allocate gigabytes)
    "size": ((None, 1.5, NAN, INF, HUGE, True, "5", [1], np.float64(2.0), -1, 2**31, 2**63, 2**70), (0, 1, 4096)),
}
# arguments another name of which an error may use instead (load_backend's ``name`` is the caller's ``backend``)
ENTRY_PARTNERS = {"name": ("name", "backend")}


def _entry_reached(exc: BaseException | None) -> bool:
    return _past_the_checks(exc) or (isinstance(exc, ImportError) and "cupy" in str(exc))


def entry_cases(
    label: str, e: Entry, valid: dict[str, Any]
) -> list[tuple[Case, Callable[[dict[str, Any]], dict[str, Any]]]]:
    """Every (argument or mapping key, replacement) of an entry point, with how to apply it to valid arguments."""
    out: list[tuple[Case, Callable[[dict[str, Any]], dict[str, Any]]]] = []

    def put(name: str, values: tuple[Any, ...], must: bool, valid_value: Any) -> None:
        for v in values:
            if not _same(v, valid_value):
                out.append((Case(label, name, v, must), lambda kw, name=name, v=v: {**kw, name: v}))

    for name, p in inspect.signature(e.fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = valid.get(name, p.default)
        if value is inspect.Parameter.empty:
            continue
        if e.fields and name == e.fields[0]:
            for key, v in value.items():
                never, maybe = e.fields[1](key, v)
                for bad, must in [*((x, True) for x in never), *((x, False) for x in maybe)]:
                    if not _same(bad, v):

                        def apply(
                            kw: dict[str, Any], name: str = name, key: str = key, bad: Any = bad
                        ) -> dict[str, Any]:
                            return {**kw, name: {**kw[name], key: bad}}

                        out.append((Case(label, key, bad, must), apply))
            put(name, (5, 1.5, "RANK=0", b"x", [("RANK", "0")], {1, 2}), True, value)  # no mapping at all
            continue
        kind = (e.kinds or {}).get(name)
        if kind is not None:
            never, maybe = ENTRY_KINDS[kind] if kind in ENTRY_KINDS else SCALARS[kind]
        elif isinstance(value, Tensor) or (value is None and name not in KIND_OF_NAME):
            never, maybe = tensor_values(value)
        elif isinstance(value, np.ndarray) and value.ndim != 1:  # a host matrix (router logits, weights)
            never = (*COMMON_INVALID, None, 5, 1.5, NAN, [1.5], np.array(["a", "b"]), value.astype(object))
            maybe = (value.astype(np.float64), value.astype(np.int64), value[:1], value.reshape(-1), value.T)
            maybe += (np.zeros((0, *value.shape[1:]), value.dtype), value[..., None], np.full_like(value, 7))
        elif isinstance(value, np.ndarray):
            never, maybe = host_array_values(value, p.default is None)
            never = tuple(v for v in never if not (isinstance(v, np.ndarray) and v.dtype == np.float32))
        else:
            never, maybe = SCALARS[_kind(name, value, p.default)]
        put(name, never, True, value)
        put(name, maybe, False, value)
    return out


def pointer_cases(label: str, valid: dict[str, Any]) -> list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]]:
    """Warm-then-bad pointers of every non-empty tensor argument: NULL, one byte off its dtype's alignment, and a
    range that wraps past 2**64 (each must be refused naming the argument)."""
    from fi_ffi.launch.aliasing import footprint

    out = []
    for name, t in valid.items():
        if not isinstance(t, Tensor) or not t.numel:
            continue
        span = footprint(t)[1]
        addresses = {"NULL": lambda t: 0}
        if t.dtype.itemsize > 1:
            addresses["+1 byte"] = lambda t: t.data_ptr + 1
        wrap = ((_TOP - span) // 256 + 1) * 256
        if wrap < _TOP:
            addresses["wraps past 2**64"] = lambda t, wrap=wrap: wrap
        for what, where in addresses.items():
            out.append(
                (f"{name} {what}", lambda kw, name=name, where=where: {**kw, name: kw[name].rebind(where(kw[name]))})
            )
    return out


def run_entry(label: str, e: Entry) -> tuple[int, list[str]]:
    def call(kwargs: dict[str, Any]) -> BaseException | None:
        try:
            e.fn(**kwargs)
        except Exception as exc:  # the verdict decides
            return exc
        return None

    valid = e.build()
    first = call(valid)
    assert _entry_reached(first), f"{label}: the valid call did not get past the checks: {first!r}"
    params = tuple(inspect.signature(e.fn).parameters)
    if e.fields:
        params += tuple(valid[e.fields[0]])
    problems = []
    cases = entry_cases(label, e, valid)
    for case, apply in cases:
        names = ENTRY_PARTNERS.get(case.arg, (case.arg,))
        case = Case(case.op, case.arg, case.value, case.must_refuse)
        exc = call(apply(e.build()))
        why = (
            _verdict(case, exc, params, _entry_reached)
            if case.arg not in ENTRY_PARTNERS
            else _partner_verdict(case, exc, names, params)
        )
        if why:
            problems.append(f"{label}({case.arg}={_short(case.value)}): {why.splitlines()[0][:300]}")
    pointers = pointer_cases(label, valid)
    for what, apply in pointers:  # warm (a valid call), bad, then valid again
        assert _entry_reached(call(e.build())), f"{label}: a valid call before {what} did not get past the checks"
        exc = call(apply(e.build()))
        arg = what.split()[0]
        typed = exc is not None and (type(exc) in (TypeError, ValueError) or isinstance(exc, FiFFIError))
        if not typed or _entry_reached(exc) or not _names(exc, (arg,)):
            problems.append(f"{label}: warm, then {what}: {'accepted' if _entry_reached(exc) else repr(exc)[:300]}")
        again = call(e.build())
        assert _entry_reached(again), f"{label}: the valid call after {what} did not get past the checks: {again!r}"
    again = call(e.build())
    assert _entry_reached(again), (
        f"{label}: the valid call no longer gets past the checks after the campaign: {again!r}"
    )
    return len(cases) + len(pointers), problems


def _partner_verdict(case: Case, exc: BaseException | None, names: tuple[str, ...], params: tuple[str, ...]) -> str:
    renamed = Case(case.op, names[-1], case.value, case.must_refuse)
    return _verdict(renamed, exc, (*params, *names), _entry_reached)


def public_entry_points() -> set[str]:
    """``module.name`` of every callable in the ``__all__`` of the modules of fi_ffi.comm and fi_engine
    (exception classes are not entry points)."""
    import importlib
    import pkgutil

    import fi_engine
    import fi_ffi.comm

    names = set()
    for pkg in (fi_ffi.comm, fi_engine):
        for info in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."):
            module = importlib.import_module(info.name)
            for name in getattr(module, "__all__", ()):
                obj = getattr(module, name)
                if callable(obj) and not (isinstance(obj, type) and issubclass(obj, BaseException)):
                    names.add(f"{info.name.removeprefix(pkg.__name__ + '.')}.{name}")
    return names


def test_every_public_entry_point_has_a_case_generator() -> None:
    """A public callable of fi_ffi.comm or fi_engine without valid calls here (or a stated exemption) fails,
    and so does a generator or exemption whose name is gone."""
    public = public_entry_points()
    covered = {n for n in ENTRY_POINTS if not n.startswith("ops.")} | set(EXEMPT)
    assert not public - covered, f"no case generator and no exemption: {sorted(public - covered)}"
    assert not covered - public, f"generators or exemptions of names no longer public: {sorted(covered - public)}"
    assert not set(ENTRY_POINTS) & set(EXEMPT)
    assert all(len(why) > 20 for why in EXEMPT.values())


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_comm_models_and_prepared_gemm_entry_points_refuse_bad_input_by_name(
    name: str, request: pytest.FixtureRequest
) -> None:
    entries = ENTRY_POINTS[name]()
    if any(e.comm for _, e in entries):
        request.getfixturevalue("comm_lock")
    if name.startswith("nccl."):
        try:
            nccl.load_backend()
        except nccl.NcclUnavailableError:
            pass
        else:  # a valid call would then go on to the rendezvous
            pytest.skip("NCCL loads on this machine: the communicator's valid calls would wait for peers")
    total, problems = 0, []
    for label, e in entries:
        count, found = run_entry(label, e)
        total += count
        problems += found
    assert not problems, f"{len(problems)} of {total} bad calls of {name}:\n" + "\n".join(problems)

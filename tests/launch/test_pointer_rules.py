"""Pointer requirements hold on every call: "warm, then bad" for every op that has them, on CPU.

The launcher remembers a validated call by its layout (shapes, strides, dtypes, devices, scalars); what an op
requires of the data pointers themselves (alignment, non-NULL, no forbidden overlap) is returned by its check as
:class:`~fi_ffi.launch.pointer_rules.PointerRules` and tested on every call, the fast path included. Each scenario
below is one op call with valid fake ``cuda:0`` descriptors (host memory of their own, never read: with no GPU a
valid call passes every fi_ffi check, crosses the FFI and stops at the module's first CUDA call) and the rules
it states. For each rule the test

1. makes a valid call (it reaches the kernel), then one more with new buffers of the same layout, which must stay
   on the fast path (the layout is remembered);
2. breaks the rule with the same layout: a pointer misaligned by 1, 2, 4, ... bytes (less than the required
   alignment), a NULL pointer, or an output placed over another argument's memory. The call raises a
   ``ValueError`` naming the argument, and ``slow_calls`` went up by exactly 1: the fast path sent it to the
   slow path, which refused it (a remembered layout did not let it through);
3. makes the next valid call, which still reaches the kernel, on the fast path.

Another test runs 50 valid calls with new buffers (and every pointer at an address aligned to exactly what the
table states, and the in-place forms the rules allow): 0 slow-path entries.

To add an op: one :class:`Scenario` in ``SCENARIOS`` (its tensors, the call, the alignments stricter than each
dtype's size, the overlaps it forbids, the in-place forms it allows). Below the scenarios, unit tests of the
mechanism: a check that reads a data pointer fails loudly, a rule naming an unknown parameter is refused, and the
compiled overlap test agrees with :func:`fi_ffi.launch.aliasing.overlaps` on random views of one buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from helpers.attention_plans import decode_plan, paged, prefill_plan
from helpers.attention_plans import workspace as attention_workspace
from helpers.gdn_calls import call_unchecked
from helpers.mla_plans import fake_plan as mla_plan
from hypothesis import given, settings
from hypothesis import strategies as st

import fi_ffi
from fi_ffi.dtypes import dtype as as_dtype
from fi_ffi.errors import KernelError, UnsupportedDeviceError
from fi_ffi.launch import aliasing
from fi_ffi.launch import launcher as launcher_module
from fi_ffi.launch.launcher import compile_launcher
from fi_ffi.launch.pointer_rules import PointerRules, apart_ok, apart_test, compile_apart
from fi_ffi.ops import norm
from fi_ffi.ops.attention import decode, prefill
from fi_ffi.ops.sampling import ROW_STATES_BYTES
from fi_ffi.tensor.descriptor import Tensor

# Descriptors here claim cuda:0 over host memory: only a machine without a GPU stops them before a launch.
pytestmark = pytest.mark.cpu_only

LOOP = 50  # valid calls with new buffers that must all stay on the fast path


# ---- the table -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """A tensor that is a view of the scenario's buffer ``base`` (a name starting with ``_``): ``shape`` and
    ``strides`` in elements, starting ``offset`` elements in."""

    base: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0


# A tensor: (shape, dtype), (shape, dtype, strides) or a View.
Spec = tuple[Any, ...] | View
# A forbidden overlap: (moved, onto) places ``moved`` (its own layout) at ``onto``'s address; the error must name
# both. (moved, onto, first, second): the error names ``first`` and ``second`` instead (in-place ops, whose
# outputs are their inputs under the declaration's names).
Apart = tuple[str, ...]


@dataclass(frozen=True)
class Scenario:
    """One op call and the pointer rules it states.

    Attributes:
        op: the test id.
        tensors: argument name -> Spec; names starting with ``_`` are buffers that views share (not arguments).
        call: makes the call from the tensors (plans included).
        align: bytes each pointer must be a multiple of, where stricter than its dtype's size.
        apart: the overlaps it forbids (see ``Apart``).
        in_place: ``(output, input)`` pairs where the output may be the input itself (same address and layout),
            and no other overlap.
        returns: the launcher's name (``uri.entry``) where the module returns instead of failing on the missing
            driver (it ignores the launch status); otherwise the name comes from the KernelError.
        release: "0.7.2": run under a lock pinning the FlashInfer 0.7.2 test wheel (fixture ``release_072``).
    """

    op: str
    tensors: Mapping[str, Spec]
    call: Callable[[dict[str, Tensor]], Any]
    align: Mapping[str, int] = field(default_factory=dict)
    apart: tuple[Apart, ...] = ()
    in_place: tuple[tuple[str, str], ...] = ()
    returns: str = ""
    release: str = ""

    def arguments(self) -> list[str]:
        return [n for n in self.tensors if not n.startswith("_")]

    def alignment(self, name: str) -> int:
        spec = self.tensors[name]
        dt = self.tensors[spec.base][1] if isinstance(spec, View) else spec[1]
        return max(self.align.get(name, 1), as_dtype(dt).itemsize)


def outputs_apart(outputs: tuple[str, ...], inputs: tuple[str, ...]) -> tuple[Apart, ...]:
    """Every output over every input and over every later output."""
    pairs = []
    for k, out in enumerate(outputs):
        pairs += [(out, other) for other in (*inputs, *outputs[k + 1 :])]
    return tuple(pairs)


def every(nbytes: int, *names: str) -> dict[str, int]:
    return dict.fromkeys(names, nbytes)


@functools.cache
def make_array() -> Any:
    from fi_ffi.abi.call import Function

    return Function.global_function("ffi.Array")


@functools.cache
def plan_workspace() -> Any:
    """One workspace for every test plan (fake plans never advance its generation, so none goes stale)."""
    return attention_workspace()


# norms: [4, 128] float16 rows; the kernels load 8 elements (16 bytes) at a time
ROWS = {"input": ((4, 128), "float16"), "weight": ((128,), "float16")}
NORMS = [
    Scenario(
        name,
        {**ROWS, "out": ((4, 128), "float16")},
        lambda t, f=f: f(t["input"], t["weight"], out=t["out"]),
        every(16, "input", "weight", "out"),
        apart=(("out", "weight"),),  # input and weight are both only read: they may overlap
        in_place=(("out", "input"),),
    )
    for name, f in (("rmsnorm", fi_ffi.rmsnorm), ("gemma_rmsnorm", fi_ffi.gemma_rmsnorm))
]
NORMS += [
    Scenario(
        name,
        {**ROWS, "residual": ((4, 128), "float16")},
        lambda t, f=f: f(t["input"], t["residual"], t["weight"]),
        every(16, "input", "weight", "residual"),
        apart=(("residual", "input"), ("residual", "weight"), ("input", "weight")),
    )
    for name, f in (
        ("fused_add_rmsnorm", fi_ffi.fused_add_rmsnorm),
        ("gemma_fused_add_rmsnorm", fi_ffi.gemma_fused_add_rmsnorm),
    )
]
NORMS.append(
    Scenario(
        "qk_rmsnorm (q slice of a fused [B, 3, H, D])",
        {"input": ((2, 4, 64), "float16", (768, 64, 1)), "weight": ((64,), "float16"), "out": ((2, 4, 64), "float16")},
        lambda t: fi_ffi.qk_rmsnorm(t["input"], t["weight"], out=t["out"]),
        every(16, "input", "weight", "out"),
        apart=(("out", "weight"),),  # input and weight are both only read: they may overlap
        in_place=(("out", "input"),),
    )
)

# RoPE: 5 tokens, 4 q heads, 2 k heads, head_dim 128, float16; 16-byte vectors
NNZ, HQ, HK, D = 5, 4, 2, 128
QK = {
    "q": ((NNZ, HQ, D), "float16"),
    "k": ((NNZ, HK, D), "float16"),
    "q_rope": ((NNZ, HQ, D), "float16"),
    "k_rope": ((NNZ, HK, D), "float16"),
}
QK_IN_PLACE = {"q": QK["q"], "k": QK["k"]}
POS = {"pos_ids": ((NNZ,), "int32")}
RAGGED = {"indptr": ((3,), "int32"), "offsets": ((2,), "int32")}
ROPE_ALIGN = every(16, "q", "k", "q_rope", "k_rope")
ROPE_APART = (("q_rope", "k"), ("k_rope", "q"), ("q_rope", "k_rope"))
ROPE_IN_PLACE = (("q_rope", "q"), ("k_rope", "k"))


def rope_out(f: Callable[..., Any], index: tuple[str, ...]) -> Callable[[dict[str, Tensor]], Any]:
    return lambda t: f(t["q"], t["k"], *(t[n] for n in index), q_rope=t["q_rope"], k_rope=t["k_rope"])


def rope_in_place(f: Callable[..., Any], index: tuple[str, ...]) -> Callable[[dict[str, Tensor]], Any]:
    return lambda t: f(t["q"], t["k"], *(t[n] for n in index))


def rope_in_place_apart(index: tuple[str, ...]) -> tuple[Apart, ...]:
    """In place, q_rope is q and k_rope is k: the errors name the outputs."""
    pairs: list[Apart] = [("k", "q", "q_rope", "k")]
    for name in index:
        pairs += [(name, "q", "q_rope", name), (name, "k", "k_rope", name)]
    return tuple(pairs)


ROPE = []
for name, f, f_in_place, index in (
    ("apply_rope", fi_ffi.apply_rope, fi_ffi.apply_rope_inplace, RAGGED),
    ("apply_rope_pos_ids", fi_ffi.apply_rope_pos_ids, fi_ffi.apply_rope_pos_ids_inplace, POS),
    ("apply_llama31_rope", fi_ffi.apply_llama31_rope, fi_ffi.apply_llama31_rope_inplace, RAGGED),
    (
        "apply_llama31_rope_pos_ids",
        fi_ffi.apply_llama31_rope_pos_ids,
        fi_ffi.apply_llama31_rope_pos_ids_inplace,
        POS,
    ),
):
    names = tuple(index)
    ROPE.append(
        Scenario(
            name,
            {**QK, **index},
            rope_out(f, names),
            ROPE_ALIGN,
            apart=(*ROPE_APART, *((out, n) for out in ("q_rope", "k_rope") for n in names)),
            in_place=ROPE_IN_PLACE,
        )
    )
    ROPE.append(
        Scenario(
            name + "_inplace",
            {**QK_IN_PLACE, **index},
            rope_in_place(f_in_place, names),
            every(16, "q", "k"),
            apart=rope_in_place_apart(names),
        )
    )
COS_SIN = {
    "positions": ((NNZ,), "int64"),
    "query": QK["q"],
    "key": QK["k"],
    "cos_sin_cache": ((64, D), "float32"),
}
ROPE.append(
    Scenario(
        "apply_rope_with_cos_sin_cache",
        {**COS_SIN, "query_out": QK["q"], "key_out": QK["k"]},
        lambda t: fi_ffi.apply_rope_with_cos_sin_cache(
            t["positions"], t["query"], t["key"], D, t["cos_sin_cache"], query_out=t["query_out"], key_out=t["key_out"]
        ),
        every(16, "query", "key", "query_out", "key_out", "cos_sin_cache"),
        apart=(
            ("query_out", "key"),
            ("key_out", "query"),
            ("query_out", "key_out"),
            *((out, n) for out in ("query_out", "key_out") for n in ("cos_sin_cache", "positions")),
        ),
        in_place=(("query_out", "query"), ("key_out", "key")),
    )
)
ROPE.append(
    Scenario(
        "apply_rope_with_cos_sin_cache_inplace",
        COS_SIN,
        lambda t: fi_ffi.apply_rope_with_cos_sin_cache_inplace(
            t["positions"], t["query"], t["key"], D, t["cos_sin_cache"]
        ),
        every(16, "query", "key", "cos_sin_cache"),
        apart=(
            ("key", "query", "query_out", "key"),
            ("cos_sin_cache", "query", "query_out", "cos_sin_cache"),
            ("positions", "key", "key_out", "positions"),
        ),
    )
)
# q and k as row-interleaved views of one fused [nnz, (HQ + 2 HK) * D] QKV buffer, rotated in place
WIDTH = (HQ + 2 * HK) * D
ROPE.append(
    Scenario(
        "apply_rope_pos_ids_inplace (fused QKV)",
        {
            "_qkv": ((NNZ, WIDTH), "float16"),
            "q": View("_qkv", (NNZ, HQ, D), (WIDTH, D, 1)),
            "k": View("_qkv", (NNZ, HK, D), (WIDTH, D, 1), HQ * D),
            **POS,
        },
        rope_in_place(fi_ffi.apply_rope_pos_ids_inplace, ("pos_ids",)),
        every(16, "q", "k"),
        apart=(("pos_ids", "q", "q_rope", "pos_ids"),),
    )
)

ACTIVATIONS = [
    Scenario(
        f.__name__,
        {"input": ((4, 256), "float16"), "out": ((4, 128), "float16")},
        lambda t, f=f: f(t["input"], t["out"]),
        every(16, "input", "out"),
        apart=(("out", "input"),),
    )
    for f in (fi_ffi.silu_and_mul, fi_ffi.gelu_and_mul, fi_ffi.gelu_tanh_and_mul)
]

# cascade: 3 rows, 2 heads, head_dim 64, float16 values and float32 base-2 LSE
V3, S2 = ((3, 2, 64), "float16"), ((3, 2), "float32")
CASCADE = [
    Scenario(
        "merge_state",
        {"v_a": V3, "s_a": S2, "v_b": V3, "s_b": S2, "v_merged": V3, "s_merged": S2},
        lambda t: fi_ffi.merge_state(
            t["v_a"], t["s_a"], t["v_b"], t["s_b"], v_merged=t["v_merged"], s_merged=t["s_merged"]
        ),
        every(16, "v_a", "v_b", "v_merged"),
        apart=outputs_apart(("v_merged", "s_merged"), ("v_a", "s_a", "v_b", "s_b")),
    ),
    Scenario(
        "merge_state_in_place",
        {"v": V3, "s": S2, "v_other": V3, "s_other": S2, "mask": ((3,), "bool")},
        lambda t: fi_ffi.merge_state_in_place(t["v"], t["s"], t["v_other"], t["s_other"], t["mask"]),
        every(16, "v", "v_other"),
        apart=outputs_apart(("v", "s"), ("v_other", "s_other", "mask")),
    ),
    Scenario(
        "merge_states",
        {"v": ((3, 2, 2, 64), "float16"), "s": ((3, 2, 2), "float32"), "v_merged": V3, "s_merged": S2},
        lambda t: fi_ffi.merge_states(t["v"], t["s"], v_merged=t["v_merged"], s_merged=t["s_merged"]),
        every(16, "v", "v_merged"),
        apart=outputs_apart(("v_merged", "s_merged"), ("v", "s")),
    ),
]

PACKBITS = [
    Scenario(
        "packbits",
        {"x": ((20,), "bool"), "out": ((3,), "uint8")},
        lambda t: fi_ffi.packbits(t["x"], "big", out=t["out"]),
        apart=(("out", "x"),),
    ),
    Scenario(
        "segment_packbits",
        {"x": ((11,), "bool"), "indptr": ((4,), "int32"), "output_indptr": ((4,), "int32"), "out": ((3,), "uint8")},
        lambda t: fi_ffi.segment_packbits(
            t["x"], t["indptr"], "little", output_indptr=t["output_indptr"], out=t["out"]
        ),
        apart=(("out", "x"), ("out", "indptr"), ("out", "output_indptr")),
        returns="quantization.segment_packbits",  # FlashInfer's binding ignores the launch status
    ),
]

# sampling: 4 rows of a 64-token vocabulary; rows are loaded in 16-byte vectors
R, VOCAB = 4, 64
PROBS = {"probs": ((R, VOCAB), "float32"), "out": ((R,), "int32")}
SAMPLING = [
    Scenario(
        "sampling_from_probs (indices)",
        {**PROBS, "indices": ((R,), "int32")},
        lambda t: fi_ffi.sampling_from_probs(t["probs"], out=t["out"], indices=t["indices"]),
        every(16, "probs"),
        apart=(("out", "probs"), ("out", "indices")),
    ),
    Scenario(
        "sampling_from_logits",
        {"logits": ((R, VOCAB), "float32"), "out": ((R,), "int32")},
        lambda t: fi_ffi.sampling_from_logits(t["logits"], out=t["out"], seed=1, offset=4),
        every(16, "logits"),
        apart=(("out", "logits"),),
    ),
    Scenario(
        "top_p_sampling_from_probs",
        {**PROBS, "top_p": ((R,), "float32")},
        lambda t: fi_ffi.top_p_sampling_from_probs(t["probs"], t["top_p"], out=t["out"]),
        every(16, "probs"),
        apart=(("out", "probs"), ("out", "top_p")),
    ),
    Scenario(
        "top_k_sampling_from_probs",
        {**PROBS, "top_k": ((R,), "int32")},
        lambda t: fi_ffi.top_k_sampling_from_probs(t["probs"], t["top_k"], out=t["out"]),
        every(16, "probs"),
        apart=(("out", "probs"), ("out", "top_k")),
    ),
    Scenario(
        "min_p_sampling_from_probs",
        {**PROBS, "min_p": ((R,), "float32")},
        lambda t: fi_ffi.min_p_sampling_from_probs(t["probs"], t["min_p"], out=t["out"]),
        every(16, "probs"),
        apart=(("out", "probs"), ("out", "min_p")),
    ),
    Scenario(
        "top_k_top_p_sampling_from_probs",
        {
            "probs": PROBS["probs"],
            "top_k": ((R,), "int64"),
            "top_p": ((R,), "float32"),
            "out": ((R,), "int64"),
            "indices": ((R,), "int64"),
        },
        lambda t: fi_ffi.top_k_top_p_sampling_from_probs(
            t["probs"],
            t["top_k"],
            t["top_p"],
            out=t["out"],
            indices=t["indices"],
        ),
        every(16, "probs"),
        apart=(("out", "probs"), ("out", "indices"), ("out", "top_k"), ("out", "top_p")),
    ),
    Scenario(
        "softmax",
        {
            "logits": ((R, VOCAB), "float32"),
            "out": ((R, VOCAB), "float32"),
            "workspace": ((4096,), "uint8"),
            "temperature": ((R,), "float32"),
        },
        lambda t: fi_ffi.softmax(t["logits"], out=t["out"], workspace=t["workspace"], temperature=t["temperature"]),
        {**every(16, "logits", "out"), "workspace": 8},
        apart=outputs_apart(("out", "workspace"), ("logits", "temperature")),
    ),
    Scenario(
        "top_p_renorm_probs",
        {"probs": ((R, VOCAB), "float32"), "top_p": ((R,), "float32"), "out": ((R, VOCAB), "float32")},
        lambda t: fi_ffi.top_p_renorm_probs(t["probs"], t["top_p"], out=t["out"]),
        every(16, "probs", "out"),
        apart=(("out", "probs"), ("out", "top_p")),
    ),
    Scenario(
        "top_k_renorm_probs",
        {
            "probs": ((R, VOCAB), "float16"),
            "top_k": ((R,), "int32"),
            "out": ((R, VOCAB), "float16"),
            "row_states_buffer": ((ROW_STATES_BYTES,), "uint8"),
        },
        lambda t: fi_ffi.top_k_renorm_probs(
            t["probs"], t["top_k"], out=t["out"], row_states_buffer=t["row_states_buffer"]
        ),
        {**every(16, "probs", "out"), "row_states_buffer": 4},
        apart=outputs_apart(("out", "row_states_buffer"), ("probs", "top_k")),
    ),
    Scenario(
        "top_k_mask_logits",
        {
            "logits": ((R, VOCAB), "bfloat16"),
            "top_k": ((R,), "int32"),
            "out": ((R, VOCAB), "bfloat16"),
            "row_states_buffer": ((ROW_STATES_BYTES,), "uint8"),
        },
        lambda t: fi_ffi.top_k_mask_logits(
            t["logits"], t["top_k"], out=t["out"], row_states_buffer=t["row_states_buffer"]
        ),
        {**every(16, "logits", "out"), "row_states_buffer": 4},
        apart=outputs_apart(("out", "row_states_buffer"), ("logits", "top_k")),
    ),
    Scenario(
        "chain_speculative_sampling",
        {
            "draft_probs": ((2, 3, VOCAB), "float32"),
            "draft_token_ids": ((2, 3), "int32"),
            "target_probs": ((2, 4, VOCAB), "float32"),
            "out": ((2, 4), "int32"),
            "maybe_output_accepted_token_num": ((2,), "int32"),
            "maybe_output_emitted_draft_token_num": ((2,), "int32"),
        },
        lambda t: fi_ffi.chain_speculative_sampling(
            t["draft_probs"],
            t["draft_token_ids"],
            t["target_probs"],
            out=t["out"],
            maybe_output_accepted_token_num=t["maybe_output_accepted_token_num"],
            maybe_output_emitted_draft_token_num=t["maybe_output_emitted_draft_token_num"],
        ),
        every(16, "draft_probs", "target_probs"),
        apart=outputs_apart(
            ("out", "maybe_output_accepted_token_num", "maybe_output_emitted_draft_token_num"),
            ("draft_probs", "draft_token_ids", "target_probs"),
        ),
    ),
    Scenario(
        "sampling_from_probs (0.7.2: valid, seed and offset tensors)",
        {**PROBS, "valid": ((R,), "bool"), "seed": ((1,), "int64"), "offset": ((1,), "int64")},
        lambda t: fi_ffi.sampling_from_probs(
            t["probs"],
            out=t["out"],
            valid=t["valid"],
            seed=t["seed"],
            offset=t["offset"],
        ),
        every(16, "probs"),
        apart=outputs_apart(("out", "valid"), ("probs", "seed", "offset")),
        release="0.7.2",
    ),
]

# radix top-k: 4 rows of 256 scores, k = 8; 4-byte fields in the row states
TOPK_ROWS = {"input": ((R, 256), "float32"), "row_states_buffer": ((ROW_STATES_BYTES,), "uint8")}
TOPK_ALIGN = {"input": 16, "row_states_buffer": 4}
TOPK = [
    Scenario(
        "top_k",
        {**TOPK_ROWS, "values": ((R, 8), "float32"), "indices": ((R, 8), "int32")},
        lambda t: fi_ffi.top_k(
            t["input"], 8, values=t["values"], indices=t["indices"], row_states_buffer=t["row_states_buffer"]
        ),
        TOPK_ALIGN,
        apart=outputs_apart(("indices", "values", "row_states_buffer"), ("input",)),
    ),
    Scenario(
        "top_k_page_table_transform",
        {
            **TOPK_ROWS,
            "src_page_table": ((2, 256), "int32"),
            "lengths": ((R,), "int32"),
            "out": ((R, 8), "int32"),
            "row_to_batch": ((R,), "int32"),
        },
        lambda t: fi_ffi.top_k_page_table_transform(
            t["input"],
            t["src_page_table"],
            t["lengths"],
            8,
            out=t["out"],
            row_states_buffer=t["row_states_buffer"],
            row_to_batch=t["row_to_batch"],
        ),
        TOPK_ALIGN,
        apart=outputs_apart(("out", "row_states_buffer"), ("input", "src_page_table", "row_to_batch", "lengths")),
    ),
    Scenario(
        "top_k_ragged_transform",
        {
            "input": ((R, 256), "float16"),
            "row_states_buffer": TOPK_ROWS["row_states_buffer"],
            "offsets": ((R,), "int32"),
            "lengths": ((R,), "int32"),
            "out": ((R, 8), "int32"),
        },
        lambda t: fi_ffi.top_k_ragged_transform(
            t["input"],
            t["offsets"],
            t["lengths"],
            8,
            out=t["out"],
            row_states_buffer=t["row_states_buffer"],
        ),
        TOPK_ALIGN,
        apart=outputs_apart(("out", "row_states_buffer"), ("input", "offsets", "lengths")),
    ),
]

# paged KV append: 5 new tokens, 8 heads of 128 (float16: 16-byte pieces), 6 pages of 16, 2 requests
INDICES = {
    "batch_indices": ((5,), "int32"),
    "positions": ((5,), "int32"),
    "kv_indices": ((6,), "int32"),
    "kv_indptr": ((3,), "int32"),
    "kv_last_page_len": ((2,), "int32"),
}
INDEX_ORDER = ("batch_indices", "positions")
PAGE = [
    Scenario(
        "append_paged_kv_cache",
        {
            "append_key": ((5, 8, 128), "float16"),
            "append_value": ((5, 8, 128), "float16"),
            "k_cache": ((6, 16, 8, 128), "float16"),
            "v_cache": ((6, 16, 8, 128), "float16"),
            **INDICES,
        },
        lambda t: fi_ffi.append_paged_kv_cache(
            t["append_key"],
            t["append_value"],
            *(t[n] for n in INDEX_ORDER),
            (t["k_cache"], t["v_cache"]),
            t["kv_indices"],
            t["kv_indptr"],
            t["kv_last_page_len"],
        ),
        every(16, "append_key", "append_value", "k_cache", "v_cache"),
    ),
    Scenario(
        "append_paged_mla_kv_cache",
        {
            "append_ckv": ((5, 512), "bfloat16"),
            "append_kpe": ((5, 64), "bfloat16"),
            "ckv_cache": ((6, 16, 512), "bfloat16"),
            "kpe_cache": ((6, 16, 64), "bfloat16"),
            **INDICES,
        },
        lambda t: fi_ffi.append_paged_mla_kv_cache(
            t["append_ckv"],
            t["append_kpe"],
            *(t[n] for n in INDEX_ORDER),
            t["ckv_cache"],
            t["kpe_cache"],
            t["kv_indices"],
            t["kv_indptr"],
            t["kv_last_page_len"],
        ),
        every(4, "append_ckv", "append_kpe", "ckv_cache", "kpe_cache"),  # two elements per thread
    ),
]

# GDN prefill: 10 tokens of 2 sequences, 2 q/k heads, 4 v heads of 128; TMA needs 16-byte bases, its
# descriptors in the workspace (written by the kernel) 64-byte ones
GDN_INPUTS = ("q", "k", "v", "g", "beta", "cu_seqlens")
GDN = [
    Scenario(
        "gdn_prefill",
        {
            "q": ((10, 2, 128), "float16"),
            "k": ((10, 2, 128), "float16"),
            "v": ((10, 4, 128), "float16"),
            "cu_seqlens": ((3,), "int64"),
            "output": ((10, 4, 128), "float16"),
            "output_state": ((2, 4, 128, 128), "float32"),
            "workspace": ((132 * 128,), "uint8"),
            "initial_state": ((2, 4, 128, 128), "float32"),
            "g": ((10, 4), "float32"),
            "beta": ((10, 4), "float32"),
        },
        lambda t: call_unchecked(t, initial_state=t["initial_state"], g=t["g"], beta=t["beta"]),
        {**every(16, "q", "k", "v", "output", "output_state", "initial_state"), "workspace": 64},
        apart=(
            *outputs_apart(("output", "output_state", "workspace"), GDN_INPUTS),
            ("output", "initial_state"),
            ("workspace", "initial_state"),
        ),
        in_place=(("output_state", "initial_state"),),
    )
]

# attention: float16, head_dim 128, 32 q heads over 8 kv heads
ATTENTION_OUT = (("out", "q"), ("lse", "out"), ("lse", "q"))
BATCH_DECODE = {
    "q": ((2, 32, 128), "float16"),
    "k_cache": ((4, 16, 8, 128), "float16"),
    "v_cache": ((4, 16, 8, 128), "float16"),
    "kv_indptr": ((3,), "int32"),
    "kv_indices": ((4,), "int32"),
    "kv_last_page_len": ((2,), "int32"),
    "out": ((2, 32, 128), "float16"),
    "lse": ((2, 32), "float32"),
}
PAGED_PREFILL = {
    "q": ((4, 32, 128), "float16"),
    "k_cache": ((4, 16, 8, 128), "float16"),
    "v_cache": ((4, 16, 8, 128), "float16"),
    "qo_indptr": ((3,), "int32"),
    "kv_indptr": ((3,), "int32"),
    "kv_indices": ((3,), "int32"),
    "kv_last_page_len": ((2,), "int32"),
    "out": ((4, 32, 128), "float16"),
    "lse": ((4, 32), "float32"),
}
PAGED_RUN = ("q", "k_cache", "v_cache", "qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len", "out")


def paged_prefill_run(t: dict[str, Tensor], **plan: Any) -> Any:
    p = prefill_plan(make_array(), "paged", "fa2", ws=plan_workspace(), **plan)
    return prefill.batch_prefill_paged_run(**paged({n: t[n] for n in PAGED_RUN}), lse=t["lse"], plan=p)


ATTENTION = [
    Scenario(
        "single_decode",
        {
            "q": ((32, 128), "float16"),
            "k": ((100, 8, 128), "float16"),
            "v": ((100, 8, 128), "float16"),
            "out": ((32, 128), "float16"),
            "lse": ((32,), "float32"),
            "tmp": ((4096,), "uint8"),
        },
        lambda t: decode.single_decode(t["q"], t["k"], t["v"], out=t["out"], lse=t["lse"], tmp=t["tmp"]),
        every(16, "q", "k", "v", "out", "tmp"),
        apart=(*ATTENTION_OUT, ("tmp", "q"), ("tmp", "out"), ("tmp", "lse")),
    ),
    Scenario(
        "single_prefill",
        {
            "q": ((4, 32, 128), "float16"),
            "k": ((9, 8, 128), "float16"),
            "v": ((9, 8, 128), "float16"),
            "out": ((4, 32, 128), "float16"),
            "lse": ((4, 32), "float32"),
            "tmp": ((4096,), "uint8"),
        },
        lambda t: prefill.single_prefill(t["q"], t["k"], t["v"], out=t["out"], lse=t["lse"], tmp=t["tmp"], causal=True),
        every(16, "q", "k", "v", "out", "tmp"),
        apart=(*ATTENTION_OUT, ("tmp", "q"), ("tmp", "out"), ("tmp", "lse")),
    ),
    Scenario(
        "single_prefill (custom_mask)",
        {
            "q": ((4, 32, 128), "float16"),
            "k": ((9, 8, 128), "float16"),
            "v": ((9, 8, 128), "float16"),
            "out": ((4, 32, 128), "float16"),
            "custom_mask": ((5,), "uint8"),
        },
        lambda t: prefill.single_prefill(t["q"], t["k"], t["v"], out=t["out"], packed_custom_mask=t["custom_mask"]),
        every(16, "q", "k", "v", "out"),
        apart=(("out", "q"), ("out", "custom_mask")),
    ),
    Scenario(
        "batch_decode_run",
        BATCH_DECODE,
        lambda t: decode.batch_decode_run(
            **paged({n: t[n] for n in tuple(BATCH_DECODE)[:7]}),
            lse=t["lse"],
            plan=decode_plan(make_array(), ws=plan_workspace()),
        ),
        every(16, "q", "k_cache", "v_cache", "out"),
        apart=ATTENTION_OUT,
    ),
    Scenario(
        "batch_prefill_ragged_run",
        {
            "q": ((4, 32, 128), "float16"),
            "k": ((9, 8, 128), "float16"),
            "v": ((9, 8, 128), "float16"),
            "qo_indptr": ((3,), "int32"),
            "kv_indptr": ((3,), "int32"),
            "out": ((4, 32, 128), "float16"),
            "lse": ((4, 32), "float32"),
        },
        lambda t: prefill.batch_prefill_ragged_run(
            **{n: t[n] for n in ("q", "k", "v", "qo_indptr", "kv_indptr", "out")},
            lse=t["lse"],
            plan=prefill_plan(make_array(), "ragged", "fa2", ws=plan_workspace()),
        ),
        every(16, "q", "k", "v", "out"),
        apart=ATTENTION_OUT,
    ),
    Scenario(
        "batch_prefill_paged_run",
        PAGED_PREFILL,
        paged_prefill_run,
        every(16, "q", "k_cache", "v_cache", "out"),
        apart=ATTENTION_OUT,
    ),
    Scenario(
        "batch_prefill_paged_run (custom_mask)",
        {**PAGED_PREFILL, "custom_mask": ((16,), "uint8"), "mask_indptr": ((3,), "int32")},
        lambda t: paged_prefill_run(t, custom_mask=t["custom_mask"], mask_indptr=t["mask_indptr"]),
        every(16, "q", "k_cache", "v_cache", "out"),
        apart=(*ATTENTION_OUT, ("out", "custom_mask"), ("out", "mask_indptr")),
    ),
    Scenario(
        "batch_mla_run",
        {
            "q_nope": ((2, 16, 512), "float16"),
            "q_pe": ((2, 16, 64), "float16"),
            "ckv_cache": ((4, 16, 512), "float16"),
            "kpe_cache": ((4, 16, 64), "float16"),
            "kv_indices": ((4,), "int32"),
            "out": ((2, 16, 512), "float16"),
            "lse": ((2, 16), "float32"),
        },
        lambda t: fi_ffi.batch_mla_run(**t, plan=mla_plan(make_array(), plan_workspace())),
        every(16, "q_nope", "q_pe", "ckv_cache", "kpe_cache", "out"),
        apart=(*outputs_apart(("out", "lse"), ("q_nope", "q_pe", "ckv_cache", "kpe_cache", "kv_indices")),),
    ),
]

SCENARIOS = [*NORMS, *ROPE, *ACTIVATIONS, *CASCADE, *PACKBITS, *SAMPLING, *TOPK, *PAGE, *GDN, *ATTENTION]


# ---- making tensors and calls -------------------------------------------------------------------------------


def make(s: Scenario) -> dict[str, Tensor]:
    """Fresh valid tensors of ``s``: each buffer host memory of its own, 256-byte aligned, large enough for any
    tensor of the scenario (so one placed over another's memory never reaches a third's)."""
    layouts = {}
    for name, spec in s.tensors.items():
        if not isinstance(spec, View):
            layouts[name] = Tensor.from_pointer(256, *spec[:2], "cuda:0", spec[2] if len(spec) > 2 else None)
    room = max(aliasing.footprint(t)[1] for t in layouts.values()) + 512
    made: dict[str, Tensor] = {}
    for name, layout in layouts.items():
        host = np.zeros(room, np.uint8)
        made[name] = layout.rebind((host.ctypes.data + 255) // 256 * 256, owner=host)
    for name, spec in s.tensors.items():
        if isinstance(spec, View):
            made[name] = made[spec.base].view(spec.shape, spec.strides, spec.offset)
    return {name: t for name, t in made.items() if not name.startswith("_")}


def reach(s: Scenario, tensors: dict[str, Tensor]) -> str:
    """Make the call; it must get past every fi_ffi check and stop at the module's CUDA call. Returns the name of
    the entry point's launcher."""
    if s.returns:
        s.call(tensors)
        return s.returns
    with pytest.raises((KernelError, UnsupportedDeviceError)) as info:
        s.call(tensors)
    err = info.value
    if isinstance(err, UnsupportedDeviceError):  # GDN: the module read the (absent) device's properties
        err = err.__cause__
    assert isinstance(err, KernelError), repr(info.value)
    assert err.kind != "TypeError" and "Mismatched" not in err.message, f"signature mismatch: {err}"
    assert "cuda" in err.message.lower() or "device" in err.message.lower(), err.message
    return err.function


Counts = dict[Any, int]


def slow_calls() -> Counts:
    """Slow-path entries of every launcher so far (the launchers are kept alive with the counts)."""
    return {x: x.slow_calls for x in list(launcher_module._all_launchers)}


def entered(before: Counts, name: str) -> tuple[int, int]:
    """Slow-path entries since ``before``: of the launchers named ``name``, and of every launcher."""
    launchers = {*before, *launcher_module._all_launchers}
    deltas = [(x.name, x.slow_calls - before.get(x, 0)) for x in launchers]
    return sum(d for n, d in deltas if n == name), sum(d for _, d in deltas)


def warm(s: Scenario) -> str:
    """A valid call, then another with new buffers of the same layout, on the fast path; returns the launcher's
    name."""
    name = reach(s, make(s))
    before = slow_calls()
    assert reach(s, make(s)) == name
    assert entered(before, name) == (0, 0), "a valid call of a layout already seen took the slow path"
    return name


# ---- the cases each scenario gives -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One broken rule: ``name`` rebound to ``onto``'s address (or its own) plus ``shift`` bytes (``shift`` None:
    NULL); the error must match ``error``."""

    name: str
    shift: int | None
    error: str
    onto: str = ""

    def apply(self, t: dict[str, Tensor]) -> dict[str, Tensor]:
        base = t[self.onto or self.name].data_ptr
        moved = t[self.name].rebind(0 if self.shift is None else base + self.shift)
        return {**t, self.name: moved}


def overlap_error(a: str, b: str) -> str:
    return rf"^({a}: overlaps {b}|{b}: overlaps {a})\b"


def bad_cases(s: Scenario) -> list[tuple[str, Bad]]:
    cases = []
    for name in s.arguments():
        need = s.alignment(name)
        for shift in (1, 2, 4, 8, 16, 32):
            if shift < need:
                error = rf"^{name}: data pointer 0x[0-9a-f]+ must be aligned to {need} bytes"
                cases.append((f"{name}+{shift}", Bad(name, shift, error)))
        cases.append((f"{name}=NULL", Bad(name, None, rf"^{name}: data pointer is NULL")))
    for pair in s.apart:
        moved, onto = pair[:2]
        named = pair[2:] or pair[:2]
        cases.append((f"{moved} over {onto}", Bad(moved, 0, overlap_error(*named), onto)))
    for out, inp in s.in_place:
        # in place means the same address: one vector further into the input is an overlap
        shift = max(s.alignment(out), s.alignment(inp), 16)
        cases.append((f"{out} {shift} bytes into {inp}", Bad(out, shift, overlap_error(out, inp), inp)))
    return cases


BAD = [pytest.param(s, bad, id=f"{s.op}: {case}") for s in SCENARIOS for case, bad in bad_cases(s)]


# ---- the tests -------------------------------------------------------------------------------------------------


def use_release(request: pytest.FixtureRequest, s: Scenario) -> None:
    if s.release:
        assert s.release == "0.7.2"
        request.getfixturevalue("release_072")


@pytest.mark.parametrize(("scenario", "bad"), BAD)
def test_warm_then_bad(kernel_modules: object, request: pytest.FixtureRequest, scenario: Scenario, bad: Bad) -> None:
    use_release(request, scenario)
    name = warm(scenario)
    tensors = make(scenario)
    if bad.onto and bad.shift:
        assert bad.shift < aliasing.footprint(tensors[bad.onto])[1], "the shifted tensor must still overlap"
    before = slow_calls()
    with pytest.raises(ValueError, match=bad.error):
        scenario.call(bad.apply(tensors))
    assert entered(before, name) == (1, 1), "the bad call did not take the slow path"
    # the next valid call still reaches the kernel, on the fast path (the bad call left the cache as it was)
    assert reach(scenario, make(scenario)) == name
    assert entered(before, name) == (1, 1)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.op for s in SCENARIOS])
def test_valid_calls_stay_on_the_fast_path(
    kernel_modules: object, request: pytest.FixtureRequest, scenario: Scenario
) -> None:
    use_release(request, scenario)
    name = warm(scenario)
    before = slow_calls()
    for _ in range(LOOP):
        assert reach(scenario, make(scenario)) == name
    # each pointer at an address aligned to exactly what the table states (not twice that) is enough
    for arg in scenario.arguments():
        if isinstance(scenario.tensors[arg], View):
            continue  # moving a view of a shared buffer would move it over its neighbours
        tensors = make(scenario)
        need = scenario.alignment(arg)
        reach(scenario, {**tensors, arg: tensors[arg].rebind(tensors[arg].data_ptr // 256 * 256 + 256 + need)})
    # the in-place forms the rules allow: the output is the input itself
    for out, inp in scenario.in_place:
        tensors = make(scenario)
        a, b = tensors[out], tensors[inp]
        if (a.shape, a.strides, a.dtype) == (b.shape, b.strides, b.dtype):
            reach(scenario, {**tensors, out: b})
    assert entered(before, name) == (0, 0)


def test_every_scenario_states_distinct_cases() -> None:
    """The parametrization names each case once (a typo in the table would collapse two)."""
    ids = [p.id for p in BAD]
    assert len(ids) == len(set(ids))
    assert len({s.op for s in SCENARIOS}) == len(SCENARIOS)


# ---- the mechanism -------------------------------------------------------------------------------------------


def rmsnorm_call(launch: Callable[..., Any]) -> None:
    t = make(NORMS[0])
    launch(t["out"], t["input"], t["weight"], 1e-6, False)


@pytest.mark.parametrize(
    "use",
    [
        lambda p: p % 16,
        lambda p: p & 15,
        lambda p: p == 0,
        lambda p: not p,
        lambda p: int(p),
        lambda p: p + 64 > 0,
        lambda p: hash(p),
    ],
    ids=["mod", "and", "eq", "not", "int", "add-compare", "hash"],
)
def test_a_check_that_reads_a_data_pointer_fails_loudly(kernel_modules: object, use: Callable[[Any], Any]) -> None:
    """The verdict of a check is remembered per layout: a check that reads an address (here the alignment rule
    written the old way) is a programming error, refused on its first call instead of holding for one pointer."""

    def check(a: Any) -> None:
        if use(a.input.data_ptr):
            raise ValueError("input: misaligned")

    launch = compile_launcher(norm.RMSNORM, "norm", check)
    with pytest.raises(RuntimeError, match=r"read a data pointer.*PointerRules"):
        rmsnorm_call(launch)


def test_a_check_may_print_the_hidden_address(kernel_modules: object) -> None:
    def check(a: Any) -> None:
        raise ValueError(f"input: at {a.input.data_ptr:x}, {a.input!r}")

    with pytest.raises(ValueError, match="input: at <address not known to the check>"):
        rmsnorm_call(compile_launcher(norm.RMSNORM, "norm", check))


@pytest.mark.parametrize(
    "rules",
    [
        PointerRules({"inptu": 16}),
        PointerRules().align("eps", 8),
        {"weights": 16},
        PointerRules().disjoint("out", "residual"),
        PointerRules().same_or_disjoint("output", "input"),
    ],
    ids=["misspelt alignment", "a scalar", "mapping", "disjoint", "same_or_disjoint"],
)
def test_a_rule_naming_an_unknown_parameter_is_refused(kernel_modules: object, rules: Any) -> None:
    """A misspelt name would silently test nothing: the launcher refuses it, naming the entry point and name."""
    launch = compile_launcher(norm.RMSNORM, "norm", lambda a: rules)
    with pytest.raises(
        TypeError, match=r"^norm\.rmsnorm: the op's check states a pointer rule for '\w+', not a tensor"
    ):
        rmsnorm_call(launch)


# compiled overlap rules against aliasing.overlaps, on views of one buffer


def at(ptr: int, shape: tuple[int, ...], dtype: str, strides: tuple[int, ...]) -> Tensor:
    return Tensor.from_pointer(ptr, shape, dtype, "cuda:0", strides)


def byte_set(t: Tensor) -> set[int]:
    """Every byte ``t`` touches (brute force)."""
    size = t.dtype.itemsize
    found = set()
    for index in np.ndindex(*t.shape):
        first = t.data_ptr + size * sum(i * s for i, s in zip(index, t.strides, strict=True))
        found.update(range(first, first + size))
    return found


def row_intervals_overlap(a: Tensor, b: Tensor, rows: tuple[int, int, int, int, int]) -> bool:
    """Whether the row footprints (one interval per row, as aliasing.row_geometry describes them) intersect."""
    stride, na, wa, nb, wb = rows
    a0, b0 = aliasing.byte_range(a)[0], aliasing.byte_range(b)[0]
    return any(
        a0 + i * stride < b0 + j * stride + wb and b0 + j * stride < a0 + i * stride + wa
        for i in range(na)
        for j in range(nb)
    )


BASE = 1 << 20


@st.composite
def view_pairs(draw: Any) -> tuple[Tensor, Tensor]:
    """Two views of one buffer: any shapes and strides (zero included), or rows of one common byte stride
    (slices of a fused tensor), at offsets that often make them overlap."""
    dtypes = ["uint8", "float16", "float32"]
    fused = draw(st.booleans())
    row_bytes = draw(st.sampled_from([32, 48, 64]))
    views = []
    for _ in range(2):
        dt = draw(st.sampled_from(dtypes))
        size = np.dtype(dt).itemsize
        ndim = draw(st.integers(1, 3))
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
        if fused and ndim >= 2:
            inner = tuple(draw(st.integers(1, 3)) for _ in range(ndim - 1))
            strides = (row_bytes // size, *inner)
        else:
            strides = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
        views.append(at(BASE + size * draw(st.integers(0, 64)), shape, dt, strides))
    return views[0], views[1]


@settings(max_examples=400, deadline=None)
@given(pair=view_pairs(), moves=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1, max_size=4))
def test_compiled_overlap_rules_agree_with_aliasing(pair: tuple[Tensor, Tensor], moves: list[tuple[int, int]]) -> None:
    """compile_apart sees the layouts once; apart_ok then answers for any pointers as aliasing.overlaps does for
    the tensors at those pointers. Never a false "apart" (brute force over the bytes), and exact at the
    granularity of rows for rows of one stride (fused QKV slices)."""
    a, b = pair
    index = {"a": 0, "b": 1}
    disjoint = compile_apart(PointerRules().disjoint("a", "b"), {"a": a, "b": b}, index)
    in_place = compile_apart(PointerRules().same_or_disjoint("a", "b"), {"a": a, "b": b}, index)
    assert disjoint is not None and in_place is not None
    rows = aliasing.row_geometry(a, b)
    same_layout = (a.shape, a.strides, a.dtype) == (b.shape, b.strides, b.dtype)
    for da, db in [(0, 0), *moves]:
        pa, pb = a.data_ptr + da, b.data_ptr + db
        ma, mb = a.rebind(pa), b.rebind(pb)
        overlap = aliasing.overlaps(ma, mb)
        assert apart_ok(disjoint, (pa, pb)) is (not overlap)
        assert apart_ok(in_place, (pa, pb)) is ((same_layout and pa == pb) or not overlap)
        # the generated test the launcher runs on every call answers exactly as the reference
        assert apart_test(disjoint, 2)(pa, pb) is (not overlap)
        assert apart_test(in_place, 2)(pa, pb) is ((same_layout and pa == pb) or not overlap)
        if byte_set(ma) & byte_set(mb):
            assert overlap, "a shared byte was not seen"
        if rows is not None:
            assert overlap is row_intervals_overlap(ma, mb, rows)


def test_fused_qkv_slices_are_apart_and_a_shifted_one_is_not() -> None:
    """q, k, v: row-interleaved views of one [5, (4 + 2 + 2) * 128] float16 buffer (row stride 2 KiB). Their byte
    ranges interleave but no row meets another: apart. Compiled once for the layouts, the test holds for other
    pointers: k one element to the left reaches into q's rows; the in-place form is q_rope == q exactly."""
    width = (HQ + 2 * HK) * D
    q = at(BASE, (NNZ, HQ, D), "float16", (width, D, 1))
    k = q.view((NNZ, HK, D), (width, D, 1), HQ * D)
    v = q.view((NNZ, HK, D), (width, D, 1), (HQ + HK) * D)
    index = {"q": 0, "k": 1, "v": 2}
    rules = PointerRules().outputs_apart(("q", "k"), ("v",))
    compiled = compile_apart(rules, {"q": q, "k": k, "v": v}, index)
    assert compiled is not None and all(rule[-1] is not None for rule in compiled)  # row geometry for each pair
    assert apart_ok(compiled, (q.data_ptr, k.data_ptr, v.data_ptr))
    assert not any(aliasing.overlaps(x, y) for x, y in ((q, k), (q, v), (k, v)))
    left = k.data_ptr - 2
    assert not apart_ok(compiled, (q.data_ptr, left, v.data_ptr))
    assert aliasing.overlaps(q, k.rebind(left))
    # the next buffer along: k of the following row block is still apart from q
    assert apart_ok(compiled, (q.data_ptr, k.data_ptr + NNZ * width * 2, v.data_ptr))
    test = apart_test(compiled, 3)  # the launcher's generated form of the same rules
    assert test(q.data_ptr, k.data_ptr, v.data_ptr) and not test(q.data_ptr, left, v.data_ptr)
    assert test(q.data_ptr, k.data_ptr + NNZ * width * 2, v.data_ptr)
    # in place: the output is q itself (same address and layout), anything else over q is refused
    q_rope = at(BASE, (NNZ, HQ, D), "float16", (HQ * D, D, 1))  # contiguous: another layout
    same = compile_apart(PointerRules().same_or_disjoint("q_rope", "q"), {"q_rope": q, "q": q}, {"q_rope": 0, "q": 1})
    other = compile_apart(
        PointerRules().same_or_disjoint("q_rope", "q"), {"q_rope": q_rope, "q": q}, {"q_rope": 0, "q": 1}
    )
    assert same is not None and other is not None
    assert apart_ok(same, (q.data_ptr, q.data_ptr))
    assert not apart_ok(same, (q.data_ptr + 16, q.data_ptr))
    assert not apart_ok(other, (q.data_ptr, q.data_ptr))  # same address, other strides: not in place
    assert apart_ok(other, (q.data_ptr + NNZ * width * 2, q.data_ptr))


def test_rules_of_absent_or_empty_tensors_are_dropped() -> None:
    t = at(BASE, (4, 8), "float16", (8, 1))
    empty = at(BASE, (0, 8), "float16", (8, 1))
    index = {"a": 0, "b": 1}
    assert compile_apart(PointerRules().disjoint("a", "b"), {"a": t, "b": None}, index) is None
    assert compile_apart(PointerRules().disjoint("a", "b"), {"a": t, "b": empty}, index) is None

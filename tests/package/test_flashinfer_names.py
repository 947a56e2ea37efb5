"""Code ports from flashinfer-python: each op that names its flashinfer counterpart takes its arguments as it does.

The facts are ``tests/package/flashinfer_signatures.json`` (``tools/flashinfer_signatures.py`` reads them with
:mod:`ast` from the flashinfer-python 0.6.3 wheel): for each public function and wrapper method, its parameters in
order as ``[name, kind, has_default]``. An op states what it ports with ``@op(flashinfer="flashinfer.norm.rmsnorm")``
(:func:`fi_ffi.launch.registry.flashinfer_of`). The rule, for such an op ``f`` ported from flashinfer's ``g``:

1. **the name exists**: ``g`` is in the facts.
2. **positional order**: ``f``'s positional-or-keyword parameters are, in order, a prefix of ``g``'s
   positional-or-keyword parameters, with the same names; ``f`` has no positional-only parameters, no ``*args``
   and no ``**kwargs``. So every call ``g(a, b, c)`` that ``f`` can take positionally means the same to ``f``, and
   a positional argument ``f`` cannot take yet fails loudly (too many positional arguments) instead of landing in
   another parameter.
3. **defaults**: a parameter of that positional prefix that ``g`` lets the caller leave out (has a default) has a
   default in ``f`` too, so ``g(x, w)`` does not fail in ``f`` for a missing positional argument.
4. **keywords are flashinfer's**: each keyword-only parameter of ``f`` is a parameter of ``g`` (any kind: ``g``'s
   later positional parameters may be keyword-only in ``f``, e.g. ``out`` after a defaulted ``eps``), or one that
   fi_ffi must add: :data:`ADDED` (every op: ``stream``; ``out`` where flashinfer allocates the result) or the op's
   own row of :data:`ADDED_FOR` (a scratch buffer flashinfer allocates, a result flashinfer returns), each with the
   reason. What fi_ffi adds is never positional (rule 2), so it cannot shift flashinfer's order.
5. **nothing dropped silently**: each parameter of ``g`` that ``f`` lacks is in the op's row of
   :data:`NOT_SUPPORTED`, with the reason. A renamed keyword thus fails twice: the new name is not flashinfer's
   (4) and flashinfer's name is missing (5). There is no list of allowed renames.
6. **the lists are true**: every :data:`NOT_SUPPORTED` entry names a parameter ``g`` has and ``f`` lacks, every
   :data:`ADDED_FOR` entry a keyword-only parameter ``f`` has and ``g`` lacks (a stale entry fails).

And every op states whether it has a counterpart: ``flashinfer_of(op)`` is set, or the op is in
:data:`NO_COUNTERPART` with the reason, and no op so listed has the name of a flashinfer-python function.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import fi_ffi.ops
from fi_ffi.launch.registry import flashinfer_of, ops

FACTS_FILE = Path(__file__).resolve().parent / "flashinfer_signatures.json"
FACTS: dict[str, list[list[Any]]] = json.loads(FACTS_FILE.read_text(encoding="utf-8"))["functions"]

# Keyword-only parameters any op may add (rule 4).
ADDED: dict[str, str] = {
    "stream": "fi_ffi takes the CUDA stream per call (flashinfer reads torch's current stream)",
    "out": "fi_ffi never allocates the result of a descriptor call: the caller passes it (flashinfer allocates)",
}


def _why(reason: str, *names: str) -> dict[str, str]:
    """``reason`` for each of ``names``: the entries of a reason several parameters share."""
    return dict.fromkeys(names, reason)


# Reasons several entries of NOT_SUPPORTED share.
_HOST_SYNC = "a host synchronization per call (fi_ffi never synchronizes)"
_FP8 = "FP8 dequantization scales: the FP8 modules fi_ffi pins fold none"
_TRTLLM = "the trtllm-gen / cuDNN backends: fi_ffi pins the FA2/FA3 modules only"
_LSE = "fi_ffi returns the LSE in place: pass lse="
_PLAN_WINDOW = "fixed by the plan's module (window_left is a plan setting)"
_SINKS = "attention sinks: batch_attention_sink_run"
_HOST_ONLY = "fi_ffi copies nothing host to device (the plan reads host arrays only)"
_PACKED_MASK = "fi_ffi takes the mask packed (packed_custom_mask, from pack_custom_mask), never unpacked"
_QKV_SCALES = _why(_FP8, "q_scale", "k_scale", "v_scale")
# what both batch prefill plans lack (each lacks one or two trtllm-gen arguments more)
_PREFILL_PLAN = {
    "custom_mask": _PACKED_MASK,
    "non_blocking": _HOST_ONLY,
    **_why(
        "multi-item scoring: not in the modules fi_ffi pins",
        "prefix_len_ptr",
        "token_pos_in_items_ptr",
        "token_pos_in_items_len",
        "max_item_len_ptr",
    ),
    **_why(_TRTLLM, "seq_lens", "seq_lens_q", "max_token_per_sequence", "max_sequence_kv"),
}
# what both sink plans lack: a batch prefill plan's, and the settings the sink modules fix
_SINK_PLAN = {
    "head_dim_vo": "the sink modules have equal qk and vo head dims",
    "packed_custom_mask": "the sink modules have no custom mask",
    "pos_encoding_mode": "the sink modules have no position encoding",
    "use_fp16_qk_reduction": "the sink modules have no fp16 QK reduction",
    "logits_soft_cap": "the sink modules have no soft cap",
    **_why("the sink modules have no RoPE", "rope_scale", "rope_theta"),
    **_why("the sink modules have one dtype for q, kv and o (q_data_type)", "kv_data_type", "o_data_type"),
    **_why("the sink plans always split as the planner chooses", "fixed_split_size", "disable_split_kv"),
    **_PREFILL_PLAN,
}

# Reasons the attention entries of ADDED_FOR share.
_WORKSPACE = "the plan's buffers (fi_ffi.Workspace): flashinfer's wrapper holds them from __init__"
_WRAPPER_INIT = "flashinfer's wrapper takes it in __init__ (plan/run are functions here)"
_GRAPH_INIT = "flashinfer's wrapper takes use_cuda_graph in __init__ (plan/run are functions here)"
_ALIBI = "the ALiBi slopes of a pos_encoding_mode='ALIBI' module: flashinfer computes them itself"
_PLAN = "the plan (a value): flashinfer's wrapper holds its schedule as self"
_DEVICE_COPY = "the device copy flashinfer's wrapper makes at plan time: fi_ffi copies nothing"
_SINGLE_OUTPUTS = {
    "tmp": "the split-KV scratch buffer: flashinfer allocates it",
    "lse": "the LSE output: flashinfer allocates and returns it (return_lse=True)",
    "alibi_slopes": _ALIBI,
}
_SINK_PLAN_ADDS = {
    "workspace": _WORKSPACE,
    "kv_layout": _WRAPPER_INIT,
    "backend": _WRAPPER_INIT,
    "enable_cuda_graph": _GRAPH_INIT,
}
_PREFILL_PLAN_ADDS = {
    **_SINK_PLAN_ADDS,
    "mask_indptr": "the packed mask's per-request byte offsets: flashinfer computes them on the device",
    "alibi_slopes": _ALIBI,
    "max_total_num_rows": "the row bound of a CUDA-graph plan: flashinfer sizes it from its __init__ buffers",
    "uniform_q_len": "FlashInfer 0.7's uniform query length promise for CUDA-graph plans",
}
_RAGGED_RUN_ADDS = {"plan": _PLAN, **_why(_DEVICE_COPY, "qo_indptr", "kv_indptr")}
_PAGED_RUN_ADDS = {**_RAGGED_RUN_ADDS, **_why(_DEVICE_COPY, "kv_indices", "kv_last_page_len")}

# Keyword-only parameters one op adds (rule 4), by fi_ffi op name.
ADDED_FOR: dict[str, dict[str, str]] = {
    # ---- non-attention families (branch h-port)
    "apply_rope_pos_ids": {"q_rope": "the rotated q: flashinfer allocates it", "k_rope": "the rotated k, likewise"},
    "apply_llama31_rope_pos_ids": {"q_rope": "the rotated q", "k_rope": "the rotated k"},
    "apply_rope": {"q_rope": "the rotated q", "k_rope": "the rotated k"},
    "apply_llama31_rope": {"q_rope": "the rotated q", "k_rope": "the rotated k"},
    "apply_rope_with_cos_sin_cache": {"query_out": "the rotated query", "key_out": "the rotated key"},
    "segment_packbits": {"output_indptr": "the output's segment offsets: flashinfer computes them on the device"},
    "softmax": {"workspace": "the kernel's scratch buffer (softmax_workspace_size): flashinfer allocates it"},
    "sampling_from_probs": {"valid": "FlashInfer 0.7's per-row success flags (the 0.7 module requires it)"},
    **{
        op: {"valid": "FlashInfer 0.7's per-row success flags"}
        for op in (
            "top_p_sampling_from_probs",
            "top_k_sampling_from_probs",
            "min_p_sampling_from_probs",
            "top_k_top_p_sampling_from_probs",
        )
    },
    "top_p_renorm_probs": {
        "workspace": "FlashInfer 0.7's scratch buffer (top_p_renorm_workspace_size)",
        "is_deterministic": "FlashInfer 0.7's deterministic renormalization",
    },
    "top_k_renorm_probs": {
        "row_states_buffer": "the kernel's per-row scratch: flashinfer allocates and caches it",
        "is_deterministic": "FlashInfer 0.7's deterministic renormalization",
    },
    "top_k_mask_logits": {"row_states_buffer": "the kernel's per-row scratch: flashinfer allocates it"},
    "top_k": {
        "values": "the top-k values: flashinfer returns them",
        "indices": "the top-k indices: flashinfer returns them",
        "row_states_buffer": "the kernel's per-row scratch: flashinfer allocates it",
    },
    **{
        op: {"row_states_buffer": "the kernel's per-row scratch: flashinfer allocates it"}
        for op in ("top_k_page_table_transform", "top_k_ragged_transform")
    },
    "segment_gemm": {
        "workspace": "the plan's buffers (fi_ffi.Workspace): flashinfer's wrapper holds them from __init__",
        "backend": "the kernel family: flashinfer's wrapper takes it in __init__ (plan/run are functions here)",
    },
    "bmm_fp8": {
        "workspace_buffer": "cuBLASLt's workspace: flashinfer allocates it",
        "cublas_handle": "a cuBLASLt handle to reuse: flashinfer keeps torch's",
    },
    "gdn_prefill": {"workspace": "the kernel's scratch (gdn_workspace_size): flashinfer allocates it"},
    "selective_state_update": {"backend": "the kernel family (sm90 / base): flashinfer picks it from the device"},
    # ---- attention (branch h-portattn fills this section)
    "batch_decode_plan": {
        "workspace": _WORKSPACE,
        "kv_layout": _WRAPPER_INIT,
        "enable_cuda_graph": _GRAPH_INIT,
        "alibi_slopes": _ALIBI,
    },
    "batch_decode_run": {"plan": _PLAN, **_why(_DEVICE_COPY, "kv_indptr", "kv_indices", "kv_last_page_len")},
    "single_decode": _SINGLE_OUTPUTS,
    "single_prefill": _SINGLE_OUTPUTS,
    "batch_prefill_ragged_plan": _PREFILL_PLAN_ADDS,
    "batch_prefill_paged_plan": _PREFILL_PLAN_ADDS,
    "batch_prefill_ragged_run": _RAGGED_RUN_ADDS,
    "batch_prefill_paged_run": _PAGED_RUN_ADDS,
    "batch_attention_sink_plan": _SINK_PLAN_ADDS,
    "batch_attention_sink_ragged_plan": _SINK_PLAN_ADDS,
    "batch_attention_sink_run": _PAGED_RUN_ADDS,
    "batch_attention_sink_ragged_run": {
        **_RAGGED_RUN_ADDS,
        "sinks": "each head's sink logit (flashinfer's ragged prefill run has no sinks; its sink wrapper's do)",
    },
    "batch_mla_plan": {"workspace": _WORKSPACE, "backend": _WRAPPER_INIT},
    "batch_mla_run": {
        "plan": _PLAN,
        "kv_indices": _DEVICE_COPY,
        "ckv_scale": "FlashInfer 0.7's FP8 dequantization factor of the ckv cache",
        "kpe_scale": "FlashInfer 0.7's FP8 dequantization factor of the kpe cache",
        "ckv_scale_arr": "FlashInfer 0.7's per-tensor FP8 factors on the device",
    },
    "merge_state": {"v_merged": "the merged values: flashinfer allocates them", "s_merged": "the merged LSE, likewise"},
    "merge_states": {
        "v_merged": "the merged values: flashinfer allocates them",
        "s_merged": "the merged LSE, likewise",
    },
}


# flashinfer parameters an op does not take (rule 5), by fi_ffi op name: parameter -> why.
NOT_SUPPORTED: dict[str, dict[str, str]] = {
    # ---- non-attention families (branch h-port)
    **{
        op: {"check_nan": _HOST_SYNC}
        for op in (
            "sampling_from_probs",
            "sampling_from_logits",
            "top_p_sampling_from_probs",
            "top_k_sampling_from_probs",
            "min_p_sampling_from_probs",
        )
    },
    "top_k_top_p_sampling_from_probs": {
        "check_nan": _HOST_SYNC,
        "filter_apply_order": "fi_ffi runs the fused joint kernel only (flashinfer's 'joint'; 'top_k_first' is"
        " two torch calls)",
    },
    "top_k": {"sorted": "a torch sort after the kernel in flashinfer; fi_ffi calls the kernel only"},
    "bmm_fp8": {"backend": "fi_ffi calls the cuBLASLt kernel only (no cuDNN / CUTLASS module is pinned)"},
    "gdn_prefill": {
        "output_final_state": "fi_ffi always writes the final state (output_state is required)",
        "use_qk_l2norm_in_kernel": "flashinfer 0.6.3 passes it to no kernel (the SM90 kernel has no fused L2 norm)",
    },
    # ---- attention (branch h-portattn fills this section)
    "batch_decode_plan": {
        "data_type": "flashinfer's deprecated alias of q_data_type/kv_data_type",
        "non_blocking": _HOST_ONLY,
        **_why(_TRTLLM, "block_tables", "seq_lens"),
        **_why(
            "FlashInfer 0.6.3's batch decode plan entry point has no split-KV controls",
            "fixed_split_size",
            "disable_split_kv",
        ),
    },
    "batch_decode_run": {
        **_QKV_SCALES,
        "return_lse": _LSE,
        "window_left": _PLAN_WINDOW,
        "sinks": _SINKS,
        "q_len_per_req": _TRTLLM,
    },
    "single_decode": {
        "use_tensor_cores": "the prefill kernels for decode: single_prefill",
        **_QKV_SCALES,
        "return_lse": _LSE,
    },
    "single_prefill": {
        **_why(_FP8, "scale_q", "scale_k", "scale_v"),
        "o_dtype": "out's dtype selects the module (fi_ffi never allocates out)",
        "custom_mask": _PACKED_MASK,
        "backend": "the single prefill modules are FA2 only",
        "return_lse": _LSE,
    },
    "batch_prefill_ragged_plan": {**_PREFILL_PLAN, **_why(_TRTLLM, "v_indptr", "o_indptr")},
    "batch_prefill_paged_plan": {**_PREFILL_PLAN, "block_tables": _TRTLLM},
    "batch_prefill_ragged_run": {"o_scale": _FP8, "return_lse": _LSE},
    "batch_prefill_paged_run": {"return_lse": _LSE, "window_left": _PLAN_WINDOW, "sinks": _SINKS},
    "batch_attention_sink_plan": {**_SINK_PLAN, "block_tables": _TRTLLM},
    "batch_attention_sink_ragged_plan": {**_SINK_PLAN, **_why(_TRTLLM, "v_indptr", "o_indptr")},
    "batch_attention_sink_run": {**_QKV_SCALES, "return_lse": _LSE, "window_left": _PLAN_WINDOW},
    "batch_attention_sink_ragged_run": {**_QKV_SCALES, "o_scale": _FP8, "return_lse": _LSE},
    "batch_mla_plan": {"use_profiler": "the profiler modules are not pinned"},
    "batch_mla_run": {
        "return_lse": _LSE,
        "profiler_buffer": "the profiler modules are not pinned",
        "kv_len": "the cutlass MLA backend: not pinned",
        "page_table": "the cutlass MLA backend: not pinned",
    },
}

# Ops with no flashinfer-python counterpart, and why.
NO_COUNTERPART: dict[str, str] = {
    # ---- non-attention families (branch h-port)
    "qk_rmsnorm": "fi_ffi-only: rmsnorm restricted to 3-D input (flashinfer's rmsnorm takes both ranks)",
    "softmax_workspace_size": "fi_ffi-only: the size of the scratch buffer flashinfer allocates itself",
    "top_p_renorm_workspace_size": "fi_ffi-only: the size of the scratch buffer flashinfer allocates itself",
    "segment_packbits_indptr": "fi_ffi-only: the output offsets flashinfer computes with torch on the device",
    "gdn_workspace_size": "fi_ffi-only: the size of the scratch buffer flashinfer allocates itself",
    "routing_limits": "fi_ffi-only: the limits fused_topk_deepseek checks, for a caller to test a config first",
    "sampling_release": "fi_ffi-only: which release's argument lists the pinned sampling module has",
    "prepare_segment_gemm": "fi_ffi-only: segment_gemm checked and its arguments copied once, for a CUDA graph",
    "segment_gemm_args_bytes": "fi_ffi-only: the size of the argument buffer prepare_segment_gemm fills",
    # ---- attention (branch h-portattn fills this section)
    "prepare_decode_run": "fi_ffi-only: a batch decode run checked and packed once (its run(plan) per layer)",
    "pack_custom_mask": "fi_ffi-only: packs host masks for packed_custom_mask (flashinfer packs inside plan)",
    "pack_custom_mask_device": "fi_ffi-only: packs a device mask (flashinfer's segment_packbits inside plan)",
    "list_variants": "fi_ffi-only: the attention modules the pinned wheels hold",
    "Plan": "fi_ffi-only: a batch attention schedule as a value (flashinfer's wrapper holds it)",
    "MLAPlan": "fi_ffi-only: an MLA schedule as a value (flashinfer's wrapper holds it)",
    "Workspace": "fi_ffi-only: the plans' buffers (flashinfer's wrappers take raw tensors in __init__)",
}

# Attention ops not yet held to the rule: branch h-portattn declares their counterparts and empties this set.
PENDING_ATTENTION: frozenset[str] = frozenset()


def _all_ops() -> list[Callable[..., Any]]:
    """Every op of every family (each family imported first: ``@op`` records at import)."""
    for module in pkgutil.walk_packages(fi_ffi.ops.__path__, "fi_ffi.ops."):
        importlib.import_module(module.name)
    return ops()


def disagreements(
    function: Callable[..., Any],
    dotted: str,
    facts: dict[str, list[list[Any]]],
    added_for: dict[str, str],
    not_supported: dict[str, str],
) -> list[str]:
    """Where ``function`` breaks the rule of this module against flashinfer's ``dotted`` (empty: it agrees)."""
    name = function.__name__
    if dotted not in facts:
        return [f"{name}: {dotted} is not a function or wrapper method of flashinfer-python (facts file)"]
    theirs = facts[dotted]
    their_names = {p[0] for p in theirs if p[1] not in ("*args", "**kwargs")}
    their_positional = [(p[0], p[2]) for p in theirs if p[1] in ("posonly", "positional")]
    problems: list[str] = []
    mine = list(inspect.signature(function).parameters.values())
    positional = [p for p in mine if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    for p in mine:
        if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD):
            problems.append(f"{name}: {p.name} is {p.kind.description} (flashinfer calls pass names and positions)")
    expected = [n for n, _ in their_positional[: len(positional)]]
    got = [p.name for p in positional]
    if got != expected:
        problems.append(
            f"{name}: positional parameters {got} are not a prefix of {dotted}'s "
            f"{[n for n, _ in their_positional]} (same names, same order)"
        )
    else:
        for p, (_, has_default) in zip(positional, their_positional, strict=False):
            if has_default and p.default is inspect.Parameter.empty:
                problems.append(f"{name}: {p.name} has a default in {dotted}, so it needs one here")
    keyword_only = [p.name for p in mine if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for k in keyword_only:
        if k not in their_names and k not in ADDED and k not in added_for:
            problems.append(
                f"{name}: keyword {k!r} is not {dotted}'s (its parameters: {sorted(their_names)}); use "
                "flashinfer's name, or list what fi_ffi adds in ADDED_FOR with the reason"
            )
    mine_names = {p.name for p in mine}
    for theirs_name in sorted(their_names - mine_names):
        if theirs_name not in not_supported:
            problems.append(
                f"{name}: lacks {dotted}'s parameter {theirs_name!r}; take it, or list it in NOT_SUPPORTED with why"
            )
    for stale in sorted(set(not_supported) - (their_names - mine_names)):
        problems.append(f"{name}: NOT_SUPPORTED lists {stale!r}, which is not a parameter {dotted} has and it lacks")
    for stale in sorted(set(added_for) - (set(keyword_only) - their_names)):
        problems.append(f"{name}: ADDED_FOR lists {stale!r}, which is not a keyword-only parameter only it has")
    return problems


def _ported() -> list[Callable[..., Any]]:
    return [f for f in _all_ops() if flashinfer_of(f) is not None]


@pytest.mark.parametrize("function", _ported(), ids=lambda f: f.__name__)
def test_ported_op_takes_flashinfers_names_order_and_keywords(function: Callable[..., Any]) -> None:
    name = function.__name__
    dotted = flashinfer_of(function)
    assert dotted is not None
    assert disagreements(function, dotted, FACTS, ADDED_FOR.get(name, {}), NOT_SUPPORTED.get(name, {})) == []


def test_every_op_states_its_counterpart_or_why_it_has_none() -> None:
    flashinfer_names = {dotted.rsplit(".", 1)[-1] for dotted in FACTS}
    names = {f.__name__ for f in _all_ops()}
    for f in _all_ops():
        name = f.__name__
        if name in PENDING_ATTENTION:
            continue
        declared = flashinfer_of(f) is not None
        assert declared != (name in NO_COUNTERPART), (
            f"{name}: declare @op(flashinfer=...) or list it in NO_COUNTERPART with the reason, not both"
            if declared
            else f"{name}: declare @op(flashinfer=...) or list it in NO_COUNTERPART with the reason"
        )
        if name in NO_COUNTERPART:
            assert name not in flashinfer_names, f"{name}: flashinfer-python has a function of that name: port it"
    assert set(NO_COUNTERPART) <= names, f"stale NO_COUNTERPART entries: {sorted(set(NO_COUNTERPART) - names)}"
    for pending in (PENDING_ATTENTION,):
        assert pending <= names, f"stale pending entries: {sorted(pending - names)}"
    for table in (ADDED_FOR, NOT_SUPPORTED):
        assert set(table) <= names, f"entries for no op: {sorted(set(table) - names)}"
        for name, entries in table.items():
            assert all(entries.values()), f"{name}: every entry states its reason"


def test_every_op_documents_what_it_raises() -> None:
    """The API reference shows a Raises section for every public op (the bad input each error means)."""
    missing = [
        f.__name__
        for f in _all_ops()
        if f.__name__ not in PENDING_ATTENTION and not re.search(r"^Raises:$", inspect.getdoc(f) or "", re.M)
    ]
    assert missing == [], f"ops without a Raises: section in their docstring: {missing}"


# ---- the rule itself, on synthetic ops against a synthetic fact (each must be refused for its one fault)

_FACT = {
    "flashinfer.norm.rmsnorm": [
        ["input", "positional", False],
        ["weight", "positional", False],
        ["eps", "positional", True],
        ["out", "positional", True],
        ["enable_pdl", "positional", True],
    ]
}
_R = "flashinfer.norm.rmsnorm"


def _check(function: Callable[..., Any], added: dict[str, str] | None = None, lacks: dict[str, str] | None = None):
    return disagreements(function, _R, _FACT, added or {}, lacks or {})


def test_rule_accepts_flashinfers_order_with_what_fi_ffi_adds_keyword_only() -> None:
    def rmsnorm(input, weight, eps=1e-6, *, out, enable_pdl=False, stream=None):  # type: ignore[no-untyped-def]
        pass

    assert _check(rmsnorm) == []


def test_rule_refuses_an_unknown_flashinfer_name() -> None:
    def rmsnorm(input, weight, eps=1e-6, *, out, enable_pdl=False, stream=None):  # type: ignore[no-untyped-def]
        pass

    assert "not a function or wrapper method" in disagreements(rmsnorm, "flashinfer.norm.rms", _FACT, {}, {})[0]


def test_rule_refuses_another_positional_order() -> None:
    def rmsnorm(input, weight, out, *, eps=1e-6, enable_pdl=False, stream=None):  # type: ignore[no-untyped-def]
        pass

    (problem,) = _check(rmsnorm)
    assert "not a prefix" in problem


def test_rule_refuses_a_required_positional_flashinfer_defaults() -> None:
    def rmsnorm(input, weight, eps, *, out, enable_pdl=False, stream=None):  # type: ignore[no-untyped-def]
        pass

    (problem,) = _check(rmsnorm)
    assert "eps has a default" in problem


def test_rule_refuses_a_renamed_keyword_twice() -> None:
    def rmsnorm(input, weight, eps=1e-6, *, out, pdl=False, stream=None):  # type: ignore[no-untyped-def]
        pass

    problems = _check(rmsnorm)
    assert len(problems) == 2
    assert "keyword 'pdl'" in problems[0] and "lacks" in problems[1] and "'enable_pdl'" in problems[1]


def test_rule_refuses_an_added_parameter_that_is_positional() -> None:
    def rmsnorm(input, weight, workspace, eps=1e-6, *, out, enable_pdl=False):  # type: ignore[no-untyped-def]
        pass

    problems = _check(rmsnorm, added={"workspace": "scratch"})
    assert "not a prefix" in problems[0]


def test_rule_accepts_a_listed_addition_and_a_listed_unsupported_parameter() -> None:
    def rmsnorm(input, weight, eps=1e-6, *, out, workspace, stream=None):  # type: ignore[no-untyped-def]
        pass

    assert _check(rmsnorm, added={"workspace": "scratch"}, lacks={"enable_pdl": "no PDL"}) == []
    assert "keyword 'workspace'" in _check(rmsnorm, lacks={"enable_pdl": "no PDL"})[0]


def test_rule_refuses_stale_lists_and_varargs() -> None:
    def rmsnorm(input, weight, eps=1e-6, *, out, enable_pdl=False, **extra):  # type: ignore[no-untyped-def]
        pass

    problems = _check(rmsnorm, added={"stream": "x"}, lacks={"eps": "y"})
    assert any("variadic keyword" in p for p in problems)
    assert any("NOT_SUPPORTED lists 'eps'" in p for p in problems)
    assert any("ADDED_FOR lists 'stream'" in p for p in problems)

"""Every op family checks its arguments before it asks the loader for a module.

Online, a module lookup may download a 1-2 GB kernel wheel; a bad argument must be named before that. Each test
here runs with an empty cache folder, no lock pinning a wheel that is present, and ``FI_FFI_OFFLINE=1``: a call that
reached the loader would raise a :class:`~fi_ffi.errors.LoaderError` ("FI_FFI_OFFLINE forbids downloading it").
The control test proves that environment holds no module (a good call does reach the loader); every other case
passes one bad argument and asserts the error is an argument error naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.attention_plans import workspace
from helpers.fakes import fake_cuda

import fi_ffi
from fi_ffi import caches
from fi_ffi.errors import LoaderError
from fi_ffi.ops.attention import variants


@pytest.fixture
def no_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache, the package's own lock (its upstream wheel absent), offline: any module lookup fails."""
    monkeypatch.setenv("FI_FFI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FI_FFI_OFFLINE", "1")
    monkeypatch.setenv("FI_FFI_USE_INSTALLED", "0")
    for name in ("FI_FFI_LOCK", "FI_FFI_WHEELHOUSE"):
        monkeypatch.delenv(name, raising=False)
    caches.reset()
    variants._refresh()
    yield tmp_path / "cache"
    monkeypatch.undo()
    caches.reset()
    variants._refresh()


def _ws() -> fi_ffi.Workspace:
    return workspace()


def h16(*shape: int) -> Any:
    return fake_cuda(shape, "float16")


def i32(*shape: int) -> Any:
    return fake_cuda(shape, "int32")


def f32(*shape: int) -> Any:
    return fake_cuda(shape, "float32")


def test_control_a_good_call_reaches_the_loader(no_modules: Path) -> None:
    """Without this, the cases below could pass for a reason other than the order of the checks."""
    with pytest.raises(LoaderError, match="FI_FFI_OFFLINE"):
        fi_ffi.batch_decode_plan([0, 1], [0], [1], 8, 8, 128, 16, workspace=_ws())
    with pytest.raises(LoaderError, match="FI_FFI_OFFLINE"):
        fi_ffi.single_decode(h16(8, 128), h16(64, 8, 128), h16(64, 8, 128), out=h16(8, 128))


# (case id, the call, the argument its error must name): one bad argument each, the others valid
ATTENTION: list[tuple[str, Callable[[], Any], str]] = [
    (
        "decode plan: float in indptr",
        lambda: fi_ffi.batch_decode_plan([0, 1.5], None, None, 8, 8, 128, 16, workspace=_ws()),
        "indptr",
    ),
    (
        "decode plan: int64 indptr",
        lambda: fi_ffi.batch_decode_plan(np.array([0, 1], np.int64), None, None, 8, 8, 128, 16, workspace=_ws()),
        "indptr",
    ),
    (
        "decode plan: decreasing indptr",
        lambda: fi_ffi.batch_decode_plan([0, 3, 1], None, None, 8, 8, 128, 16, workspace=_ws()),
        "indptr",
    ),
    (
        "decode plan: fewer indices than pages",
        lambda: fi_ffi.batch_decode_plan([0, 3], [0, 1], None, 8, 8, 128, 16, workspace=_ws()),
        "indices",
    ),
    (
        "decode plan: a negative page id",
        lambda: fi_ffi.batch_decode_plan([0, 2], [0, -1], None, 8, 8, 128, 16, workspace=_ws()),
        "indices",
    ),
    (
        "decode plan: last page longer than a page",
        lambda: fi_ffi.batch_decode_plan([0, 1], None, [17], 8, 8, 128, 16, workspace=_ws()),
        "last_page_len",
    ),
    (
        "decode plan: ALiBi slopes of another length",
        lambda: fi_ffi.batch_decode_plan(
            [0, 1], None, None, 8, 8, 128, 16, pos_encoding_mode="ALIBI", alibi_slopes=f32(4), workspace=_ws()
        ),
        "alibi_slopes",
    ),
    (
        "prefill paged plan: qo_indptr not from 0",
        lambda: fi_ffi.batch_prefill_paged_plan([1, 2], [0, 1], None, [1], 8, 8, 128, 16, workspace=_ws()),
        "qo_indptr",
    ),
    (
        "prefill paged plan: kv_indptr of another batch",
        lambda: fi_ffi.batch_prefill_paged_plan([0, 1], [0, 1, 2], None, [1], 8, 8, 128, 16, workspace=_ws()),
        "paged_kv_indptr",
    ),
    (
        "prefill paged plan: fewer page ids than pages",
        lambda: fi_ffi.batch_prefill_paged_plan([0, 1], [0, 2], [0], [1], 8, 8, 128, 16, workspace=_ws()),
        "paged_kv_indices",
    ),
    (
        "prefill paged plan: last page 0 with pages",
        lambda: fi_ffi.batch_prefill_paged_plan([0, 1], [0, 1], None, [0], 8, 8, 128, 16, workspace=_ws()),
        "paged_kv_last_page_len",
    ),
    (
        "prefill ragged plan: int64 kv_indptr",
        lambda: fi_ffi.batch_prefill_ragged_plan([0, 1], np.array([0, 4], np.int64), 8, 8, 128, workspace=_ws()),
        "kv_indptr",
    ),
    (
        "prefill ragged plan: mask too small",
        lambda: fi_ffi.batch_prefill_ragged_plan(
            [0, 4], [0, 4], 8, 8, 128, packed_custom_mask=fake_cuda((1,), "uint8"), mask_indptr=i32(2), workspace=_ws()
        ),
        "packed_custom_mask",
    ),
    (
        "prefill ragged plan: uniform_q_len broken",
        lambda: fi_ffi.batch_prefill_ragged_plan([0, 1, 3], [0, 4, 8], 8, 8, 128, uniform_q_len=1, workspace=_ws()),
        "uniform_q_len",
    ),
    (
        "prefill ragged plan: max_total_num_rows without CUDA graphs",
        lambda: fi_ffi.batch_prefill_ragged_plan([0, 1], [0, 4], 8, 8, 128, max_total_num_rows=4, workspace=_ws()),
        "max_total_num_rows",
    ),
    (
        "sink plan: decreasing qo_indptr",
        lambda: fi_ffi.batch_attention_sink_plan([0, 2, 1], [0, 1, 2], None, [1, 1], 8, 8, 64, 16, workspace=_ws()),
        "qo_indptr",
    ),
    (
        "sink ragged plan: kv_indptr not from 0",
        lambda: fi_ffi.batch_attention_sink_ragged_plan([0, 1], [1, 4], 8, 8, 64, workspace=_ws()),
        "kv_indptr",
    ),
    (
        "mla plan: kv_len_arr over its pages",
        lambda: fi_ffi.batch_mla_plan([0, 1], [0, 1], None, [65], 16, 512, 64, 64, False, 0.1, workspace=_ws()),
        "kv_len_arr",
    ),
    (
        "mla plan: float kv_indptr",
        lambda: fi_ffi.batch_mla_plan([0, 1], [0, 0.5], None, [1], 16, 512, 64, 64, False, 0.1, workspace=_ws()),
        "kv_indptr",
    ),
    (
        "mla plan: fewer page ids than pages",
        lambda: fi_ffi.batch_mla_plan([0, 1], [0, 2], [0], [65], 16, 512, 64, 64, False, 0.1, workspace=_ws()),
        "kv_indices",
    ),
    (
        "single decode: v of another shape",
        lambda: fi_ffi.single_decode(h16(8, 128), h16(64, 8, 128), h16(64, 8, 64), out=h16(8, 128)),
        "v",
    ),
    (
        "single decode: rope_theta 0",
        lambda: fi_ffi.single_decode(h16(8, 128), h16(64, 8, 128), h16(64, 8, 128), out=h16(8, 128), rope_theta=0.0),
        "rope_theta",
    ),
    (
        "single decode: lse of another shape",
        lambda: fi_ffi.single_decode(h16(8, 128), h16(64, 8, 128), h16(64, 8, 128), out=h16(8, 128), lse=f32(4)),
        "lse",
    ),
    (
        "single prefill: mask too small",
        lambda: fi_ffi.single_prefill(
            h16(16, 8, 128),
            h16(64, 8, 128),
            h16(64, 8, 128),
            out=h16(16, 8, 128),
            packed_custom_mask=fake_cuda((1,), "uint8"),
        ),
        "packed_custom_mask",
    ),
    (
        "single prefill: lse of another shape",
        lambda: fi_ffi.single_prefill(
            h16(16, 8, 128), h16(64, 8, 128), h16(64, 8, 128), out=h16(16, 8, 128), lse=f32(3)
        ),
        "lse",
    ),
    (
        "merge_state: s_a of another shape",
        lambda: fi_ffi.merge_state(
            h16(4, 8, 128), f32(4, 7), h16(4, 8, 128), f32(4, 8), v_merged=h16(4, 8, 128), s_merged=f32(4, 8)
        ),
        "s_a",
    ),
]


@pytest.mark.parametrize(("call", "name"), [case[1:] for case in ATTENTION], ids=[case[0] for case in ATTENTION])
def test_attention_checks_before_the_lookup(no_modules: Path, call: Callable[[], Any], name: str) -> None:
    with pytest.raises((TypeError, ValueError)) as caught:
        call()
    assert not isinstance(caught.value, LoaderError), caught.value
    assert str(caught.value).startswith(f"{name}:"), caught.value


# ---- the other op families ------------------------------------------------------------------------------------------
# Each op's valid call is the bad-input campaign's (tests/package/test_bad_input.py, kept by the families' owners in
# step with their signatures); its first tensor argument is replaced by one of a rank no op takes.

# The sampling ops declare several FlashInfer releases' argument lists of one entry point: their launcher is deferred
# (fi_ffi/launch/launcher.py: Deferred), checking the arguments against every declaration before it binds the module.
SAMPLING_TWO_RELEASES = {
    "chain_speculative_sampling",
    "min_p_sampling_from_probs",
    "sampling_from_logits",
    "sampling_from_probs",
    "top_k_renorm_probs",
    "top_k_sampling_from_probs",
    "top_k_top_p_sampling_from_probs",
    "top_p_renorm_probs",
    "top_p_sampling_from_probs",
}


def _family_calls() -> dict[str, Callable[[], dict[str, Any]]]:
    from package import test_bad_input as campaign

    return {op: build for op, build in campaign._simple().items() if op not in _ATTENTION_OPS}


_ATTENTION_OPS = {"single_decode", "single_prefill", "merge_state", "merge_state_in_place", "merge_states"}
FAMILY_OPS = sorted(_family_calls())


@pytest.mark.parametrize("op", FAMILY_OPS)
def test_every_family_checks_before_the_lookup(no_modules: Path, op: str) -> None:
    import inspect

    from fi_ffi.tensor.descriptor import Tensor

    kwargs = _family_calls()[op]()
    first = next((name for name, value in kwargs.items() if isinstance(value, Tensor)), None)
    if first is None:
        pytest.skip(f"{op}: a host helper (no tensor argument, no module)")
    kwargs[first] = fake_cuda((3, 3, 3, 3, 3), kwargs[first].dtype.name)
    fn = getattr(fi_ffi, op)
    params = inspect.signature(fn).parameters
    with pytest.raises((TypeError, ValueError)) as caught:
        fn(**kwargs)
    assert not isinstance(caught.value, LoaderError), caught.value
    named = str(caught.value).split(":")[0]
    assert named in params, f"{op}: the error names no argument: {caught.value}"


def test_the_two_release_sampling_ops_are_all_covered() -> None:
    assert set(FAMILY_OPS) >= SAMPLING_TWO_RELEASES


@pytest.mark.parametrize("op", sorted(SAMPLING_TWO_RELEASES))
def test_a_good_sampling_call_still_reaches_the_loader(no_modules: Path, op: str) -> None:
    """The deferred launcher lets a valid call through to the lookup (here: the offline refusal), so the cases
    above fail for their bad argument, not because the check refuses everything."""
    kwargs = _family_calls()[op]()
    with pytest.raises(LoaderError, match="FI_FFI_OFFLINE"):
        getattr(fi_ffi, op)(**kwargs)


def test_an_argument_only_one_release_takes_is_left_to_the_bound_module(no_modules: Path) -> None:
    """``valid`` exists in FlashInfer 0.7's argument list only: which release the module is is not known before the
    lookup, so a good ``valid`` passes the early check (the bound module's launcher accepts or refuses it by name)."""
    kwargs = _family_calls()["sampling_from_probs"]()
    rows = kwargs["out"].shape[0]
    with pytest.raises(LoaderError, match="FI_FFI_OFFLINE"):
        fi_ffi.sampling_from_probs(**kwargs, valid=fake_cuda((rows,), "bool"))
    with pytest.raises(ValueError) as caught:  # but a bad one is named before the lookup
        fi_ffi.sampling_from_probs(**kwargs, valid=fake_cuda((rows, 2), "bool"))
    assert str(caught.value).startswith("valid:"), caught.value

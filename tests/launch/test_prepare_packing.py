"""``fi_ffi.prepare`` of the KV append, the in-place RoPE ops and the gated activations, proven on the CPU against
the op calls.

The launchers' entry points are bound to a probe (tests/helpers/frame_probe.py: a TVM-FFI Function called through
the real libtvm_ffi) that records every slot of the frame it is handed, each ``DLTensor`` a slot points at, the
result slot and TVM-FFI's current stream. The op call and the prepared call of the same arguments must hand over
the same record, for several shapes and layouts, defaults and explicit settings, on a default and an explicit
stream; a prepared call hands the same record at every call. Bad input is refused by ``prepare`` with the op's own
error (same type, same message: the op and its packed form share one wire mapping, fi_ffi.launch.packing). The norms'
frames are compared too; their prepared calls reach the real module in tests/ops/test_norm.py and
tests/launch/test_launcher.py.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import numpy as np
import pytest
from helpers.fakes import fake_cuda
from helpers.frame_probe import FrameProbe

import fi_ffi
from fi_ffi.launch import packing
from fi_ffi.ops import activation, norm, page, rope

pytestmark = pytest.mark.usefixtures("kernel_modules")

LAUNCHES = (
    page._append,
    rope._apply_rope_pos_ids,
    rope._apply_llama31_rope_pos_ids,
    norm._rmsnorm,
    norm._qk_rmsnorm,
    norm._gemma_rmsnorm,
    norm._fused_add_rmsnorm,
    norm._gemma_fused_add_rmsnorm,
    activation._silu_and_mul,
    activation._gelu_and_mul,
    activation._gelu_tanh_and_mul,
)


@pytest.fixture
def probe():
    """The append, RoPE and rmsnorm launchers bound to one frame probe (restored after)."""
    p = FrameProbe()
    saved = [each.launcher.entry for each in LAUNCHES]
    for each in LAUNCHES:
        each.launcher.forget()
        each.launcher.entry = p.entry
    yield p
    for each, entry in zip(LAUNCHES, saved, strict=True):
        each.launcher.forget()
        each.launcher.entry = entry


def _same_frame(probe: FrameProbe, op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The op's frame and the prepared call's are equal (twice: the packed frame does not change when called)."""
    op(*args, **kwargs)
    ordinary = probe.last()
    prepared = fi_ffi.prepare(op, *args, **kwargs)
    for _ in range(2):
        prepared()
        packed = probe.last()
        assert packed == ordinary, _differences(packed, ordinary)
    op(*args, **kwargs)  # the op again, now on its fast path (the layout seen): still the same frame
    assert probe.last() == ordinary


def _differences(a: tuple[Any, ...], b: tuple[Any, ...]) -> str:
    """Which parts of two probe records differ (slot numbers), for the failure message."""
    slots = [i for i, (x, y) in enumerate(zip(a[1], b[1], strict=True)) if x != y]
    return f"slots {slots} differ: {[(a[1][i], b[1][i]) for i in slots]}; streams {a[2]} vs {b[2]}"


def _qkv(nnz: int, hq: int, hk: int, d: int, dtype: str = "float16") -> tuple[Any, Any, Any]:
    """Strided q, k, v views of one fused QKV buffer ``[nnz, (hq + 2 hk) * d]`` (as an engine's)."""
    row = (hq + 2 * hk) * d
    fused = fake_cuda((nnz, row), dtype)
    q = fused.view((nnz, hq, d), (row, d, 1))
    k = fused.view((nnz, hk, d), (row, d, 1), offset=hq * d)
    v = fused.view((nnz, hk, d), (row, d, 1), offset=(hq + hk) * d)
    return q, k, v


def _append_args(nnz: int, hk: int, d: int, layout: str, dtype: str = "float16", combined: bool = False) -> tuple:
    pages, ps, batch = 6, 16, 2
    _, k, v = _qkv(nnz, 4, hk, d, dtype)
    inner = (ps, hk, d) if layout == "NHD" else (hk, ps, d)
    if combined:  # k and v caches as kv[:, 0] and kv[:, 1] of one [pages, 2, ...] buffer
        kv = fake_cuda((pages, 2, *inner), dtype)
        stride = (2 * ps * hk * d, *kv.strides[2:])
        kc = kv.view((pages, *inner), stride)
        vc = kv.view((pages, *inner), stride, offset=ps * hk * d)
    else:
        kc, vc = fake_cuda((pages, *inner), dtype), fake_cuda((pages, *inner), dtype)
    ints = [fake_cuda((n,), "int32") for n in (nnz, nnz, pages, batch + 1, batch)]
    return (k, v, ints[0], ints[1], (kc, vc), ints[2], ints[3], ints[4])


@pytest.mark.parametrize(
    ("nnz", "hk", "d", "layout", "dtype", "combined"),
    [
        (1, 8, 128, "NHD", "float16", False),
        (5, 4, 64, "HND", "bfloat16", False),
        (3, 2, 256, "NHD", "float16", True),
        (7, 1, 512, "HND", "float8_e4m3fn", True),
    ],
)
def test_a_prepared_append_hands_over_the_op_calls_frame(probe, nnz, hk, d, layout, dtype, combined) -> None:
    args = _append_args(nnz, hk, d, layout, dtype, combined)
    _same_frame(probe, fi_ffi.append_paged_kv_cache, args, {"kv_layout": layout})
    _same_frame(probe, fi_ffi.append_paged_kv_cache, args, {"kv_layout": layout, "stream": 12345})


ROPE_CASES = [
    (fi_ffi.apply_rope_pos_ids_inplace, (1, 32, 8, 128), {}),
    (fi_ffi.apply_rope_pos_ids_inplace, (4, 16, 4, 64), {"rotary_dim": 32, "interleave": True, "rope_theta": 5e5}),
    (fi_ffi.apply_rope_pos_ids_inplace, (2, 8, 8, 256), {"rope_scale": 2, "rope_theta": 10000}),  # ints: as floats
    (fi_ffi.apply_llama31_rope_pos_ids_inplace, (1, 32, 8, 128), {}),
    (
        fi_ffi.apply_llama31_rope_pos_ids_inplace,
        (3, 8, 2, 128),
        {"rotary_dim": 64, "rope_scale": 32.0, "rope_theta": 1e6, "low_freq_factor": 2.0},
    ),
    (
        fi_ffi.apply_llama31_rope_pos_ids_inplace,
        (2, 4, 4, 512),
        {"high_freq_factor": 8, "old_context_len": 4096, "interleave": True},
    ),
]


@pytest.mark.parametrize(("op", "shape", "kwargs"), ROPE_CASES)
def test_a_prepared_rope_hands_over_the_op_calls_frame(probe, op, shape, kwargs) -> None:
    nnz, hq, hk, d = shape
    q, k, _ = _qkv(nnz, hq, hk, d)
    for pos in (fake_cuda((nnz,), "int32"), fake_cuda((nnz,), "int64")):
        _same_frame(probe, op, (q, k, pos), kwargs)
        _same_frame(probe, op, (q, k), {"pos_ids": pos, **kwargs, "stream": 777})
    # contiguous q and k of their own, positional settings
    q, k, pos = fake_cuda((nnz, hq, d)), fake_cuda((nnz, hk, d)), fake_cuda((nnz,), "int32")
    _same_frame(probe, op, (q, k, pos, None, False), {})


@pytest.mark.parametrize(
    "op",
    [fi_ffi.rmsnorm, fi_ffi.gemma_rmsnorm, fi_ffi.qk_rmsnorm, fi_ffi.fused_add_rmsnorm, fi_ffi.gemma_fused_add_rmsnorm],
)
def test_a_prepared_norm_hands_over_the_op_calls_frame(probe, op) -> None:
    shape = (3, 4, 128) if op is fi_ffi.qk_rmsnorm else (3, 512)
    x, other, w = fake_cuda(shape), fake_cuda(shape), fake_cuda(shape[-1:])
    if "fused_add" in op.__name__:
        args, outputs = (x, other, w), {}
    else:
        args, outputs = (x, w), {"out": other}
    _same_frame(probe, op, args, outputs)
    _same_frame(probe, op, args, {**outputs, "eps": 1e-5, "enable_pdl": True, "stream": 99})
    _same_frame(probe, op, (*args, 1e-5), {**outputs, "stream": 99})  # eps positional, as flashinfer's


@pytest.mark.parametrize("op", [fi_ffi.silu_and_mul, fi_ffi.gelu_and_mul, fi_ffi.gelu_tanh_and_mul])
def test_a_prepared_gated_activation_hands_over_the_op_calls_frame(probe, op) -> None:
    for shape, dtype in (((3, 2 * 512), "float16"), ((2, 5, 2 * 128), "bfloat16")):
        x, out = fake_cuda(shape, dtype), fake_cuda((*shape[:-1], shape[-1] // 2), dtype)
        _same_frame(probe, op, (x, out), {})
        _same_frame(probe, op, (x,), {"out": out, "enable_pdl": True, "stream": 99})
    # the op's own refusals, named as it names them
    x = fake_cuda((3, 2 * 512))
    for args, kwargs, name in (((x,), {}, "out"), ((x, fake_cuda((3, 512), "bfloat16")), {}, "out"),
                               ((x, fake_cuda((3, 511))), {}, "out"), ((x, fake_cuda((3, 512))), {"enable_pdl": "yes"},
                                                                       "enable_pdl")):  # fmt: skip
        want = _error(lambda a=args, k=kwargs: op(*a, **k))
        assert want[1].startswith(f"{name}: "), want
        assert _error(lambda a=args, k=kwargs: fi_ffi.prepare(op, *a, **k)) == want


def _error(call) -> tuple[type, str]:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


def _bad_rope() -> list[tuple[Any, tuple[Any, ...], dict[str, Any], str]]:
    q, k, _ = _qkv(2, 8, 2, 128)
    pos = fake_cuda((2,), "int32")
    rp, l31 = fi_ffi.apply_rope_pos_ids_inplace, fi_ffi.apply_llama31_rope_pos_ids_inplace
    return [
        (rp, (fake_cuda((2, 8, 128), "float32"), k, pos), {}, "q"),
        (rp, (q, fake_cuda((3, 2, 128)), pos), {}, "k"),
        (rp, (q, k, fake_cuda((2,), "float16")), {}, "pos_ids"),
        (rp, (q, k, fake_cuda((3,), "int32")), {}, "pos_ids"),
        (rp, (q, k, pos), {"rotary_dim": 36}, "rotary_dim"),
        (rp, (q, k, pos), {"rotary_dim": "all"}, "rotary_dim"),
        (rp, (q, k, pos), {"rope_scale": -1.0}, "rope_scale"),
        (rp, (q, k, pos), {"rope_theta": "x"}, "rope_theta"),
        (rp, (q, k, pos), {"interleave": 2}, "interleave"),
        (rp, (q, k, pos), {"stream": "default"}, "stream"),
        (rp, (None, k, pos), {}, "q"),
        (l31, (q, k, pos), {"high_freq_factor": 0.5}, "high_freq_factor"),
        (l31, (q, k, pos), {"old_context_len": float("nan")}, "old_context_len"),
        (l31, (q, k, pos), {"low_freq_factor": 10**400}, "low_freq_factor"),
    ]


def _bad_append() -> list[tuple[Any, tuple[Any, ...], dict[str, Any], str]]:
    ap = fi_ffi.append_paged_kv_cache
    good = _append_args(3, 2, 128, "NHD")

    def with_(i: int, value: Any) -> tuple[Any, ...]:
        return (*good[:i], value, *good[i + 1 :])

    hnd = _append_args(3, 2, 128, "HND")
    return [
        (ap, good, {"kv_layout": "XYZ"}, "kv_layout"),
        (ap, good, {"kv_layout": 0}, "kv_layout"),
        (ap, with_(0, fake_cuda((3, 2, 128), "float32")), {}, "append_key"),
        (ap, with_(1, fake_cuda((3, 2, 64))), {}, "append_value"),
        (ap, with_(2, fake_cuda((3,), "int64")), {}, "batch_indices"),
        (ap, with_(3, fake_cuda((4,), "int32")), {}, "positions"),
        (ap, with_(4, (good[4][0], fake_cuda((6, 16, 2, 128), strides=(8192, 256, 128, 1)))), {}, "v_cache"),
        (ap, with_(6, fake_cuda((5,), "int32")), {}, "kv_indptr"),
        (ap, hnd, {"kv_layout": "NHD"}, "kv_layout"),  # HND caches described as NHD: the layout is named
        (ap, with_(4, (None, good[4][1])), {}, "k_cache"),
        (ap, with_(4, None), {}, "paged_kv_cache"),
        (ap, with_(4, (good[4][0],)), {}, "paged_kv_cache"),
        (ap, with_(4, fake_cuda((6, 3, 16, 2, 128))), {}, "paged_kv_cache"),
        (ap, good, {"stream": 1.5}, "stream"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_rope()) + len(_bad_append())))
def test_prepare_refuses_bad_input_with_the_ops_own_error(probe, case) -> None:
    op, args, kwargs, name = (_bad_rope() + _bad_append())[case]
    from_op = _error(lambda: op(*args, **kwargs))
    from_prepare = _error(lambda: fi_ffi.prepare(op, *args, **kwargs))
    assert from_prepare == from_op
    assert from_op[1].startswith(f"{name}:"), from_op
    assert probe.seen == []  # nothing launched


def test_prepare_refuses_what_it_cannot_pack_naming_it(probe) -> None:
    q, k, _ = _qkv(2, 8, 2, 128)
    pos = fake_cuda((2,), "int32")
    with pytest.raises(TypeError, match=r"apply_rope_pos_ids_inplace: missing a required argument: 'pos_ids'"):
        fi_ffi.prepare(fi_ffi.apply_rope_pos_ids_inplace, q, k)
    with pytest.raises(TypeError, match="apply_rope_pos_ids_inplace: got an unexpected keyword argument 'q_rope'"):
        fi_ffi.prepare(fi_ffi.apply_rope_pos_ids_inplace, q, k, pos, q_rope=q)
    with pytest.raises(
        TypeError,
        match=r"function: expected one of the ops fi_ffi.prepare packs \(.*append_paged_kv_cache.*silu_and_mul\)",
    ):
        fi_ffi.prepare(fi_ffi.apply_rope_with_cos_sin_cache_inplace, q, k, pos)
    # an empty append: the op checks everything and launches nothing; a prepared call would launch an empty grid
    empty = _append_args(0, 2, 128, "NHD")
    fi_ffi.append_paged_kv_cache(*empty)
    assert probe.seen == []
    with pytest.raises(ValueError, match=r"^append_key: no tokens \(shape \(0, 2, 128\)\)"):
        fi_ffi.prepare(fi_ffi.append_paged_kv_cache, *empty)
    assert probe.seen == []


def test_a_prepared_call_holds_its_arguments_while_alive_and_releases_them_when_dropped(probe) -> None:
    args = list(_append_args(2, 2, 128, "HND"))
    q, k, _ = _qkv(2, 8, 2, 128)
    pos = fake_cuda((2,), "int32")
    calls = [
        fi_ffi.prepare(fi_ffi.append_paged_kv_cache, *args, kv_layout="HND"),
        fi_ffi.prepare(fi_ffi.apply_llama31_rope_pos_ids_inplace, q, k, pos, stream=5),
    ]
    refs = [weakref.ref(t) for t in (*args[:4], *args[4], *args[5:], q, k, pos)]
    owners = [weakref.ref(t.owner) for t in (*args[:4], *args[4], *args[5:], pos) if t.owner is not None]
    del args, q, k, pos
    gc.collect()
    assert all(r() is not None for r in refs + owners)  # the prepared calls keep their buffers valid
    calls[0]()  # and launch with them
    calls[1]()
    assert len(probe.seen) == 2
    del calls
    gc.collect()
    assert [r() is None for r in refs + owners] == [True] * len(refs + owners)


def test_every_packable_op_shares_its_wire_mapping_with_the_op() -> None:
    """The wire mapping takes exactly the op's parameters (after the launch function), so ``prepare`` can hand it
    the op's bound arguments; and every op of the families' PACKABLE is public."""
    import inspect

    for op, packable in packing.packable().items():
        wire = list(inspect.signature(packable.wire).parameters)
        assert wire[1:] == list(inspect.signature(op).parameters), op.__name__
        assert getattr(fi_ffi, op.__name__) is op


class HostCAI:
    """A CUDA-array-interface producer over host memory of its own (taken as cuda:0 on a machine without a driver);
    unhashable, like CuPy arrays: packing describes it once, as the op call describes it each time."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, shape: tuple[int, ...], typestr: str = "<f2") -> None:
        n = 1
        for s in shape:
            n *= s
        self.host = np.zeros(n * 4 + 64, dtype=np.uint8)
        ptr = (self.host.ctypes.data + 63) // 64 * 64
        self.__cuda_array_interface__ = dict(shape=shape, typestr=typestr, data=(ptr, False), strides=None, version=3)

    def __eq__(self, other: object) -> bool:
        return self is other


def test_producers_are_packed_as_the_op_call_describes_them(probe) -> None:
    nnz, hk, d, pages = 2, 4, 128, 5
    ints = [HostCAI((n,), "<i4") for n in (nnz, nnz, pages, 3, 2)]
    kc, vc = HostCAI((pages, 16, hk, d)), HostCAI((pages, 16, hk, d))
    append = (HostCAI((nnz, hk, d)), HostCAI((nnz, hk, d)), ints[0], ints[1], (kc, vc), ints[2], ints[3], ints[4])
    _same_frame(probe, fi_ffi.append_paged_kv_cache, append, {})
    q, k = HostCAI((nnz, 16, d)), HostCAI((nnz, hk, d))
    _same_frame(probe, fi_ffi.apply_llama31_rope_pos_ids_inplace, (q, k, ints[0]), {"rotary_dim": 64})
    prepared = fi_ffi.prepare(fi_ffi.append_paged_kv_cache, *append)
    flat = [*append[:4], kc, vc, *append[5:]]
    refs = [weakref.ref(o) for o in (*flat, *(t.host for t in flat))]
    del append, flat, ints, kc, vc
    gc.collect()
    assert all(r() is not None for r in refs)  # the producers (and so their memory) stay referenced
    del prepared
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)

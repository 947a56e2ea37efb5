"""The Llama engine's operands reach the real kernel modules (CPU machine, shared test wheel).

:func:`fi_engine.models.llama.step_views` builds the descriptors the engine passes to every fi_ffi op (strided q/k/v
views of the fused QKV rows, index arrays as regions of one buffer). Here they claim ``cuda:0`` but point at host
memory: each call through :mod:`fi_engine.kernels.flashinfer` must pass fi_ffi's checks and the module's signature check
and stop at the module's first CUDA call. That proves, without a GPU, that the engine's shapes, strides, dtypes
and keyword arguments are ones the ops accept, for both head dims and both dtypes the engine serves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers.hf_configs import LLAMA_SHAPE

import fi_ffi
from fi_engine.checkpoint.config import LlamaConfig, RopeConfig
from fi_engine.kernels import flashinfer as kernels
from fi_engine.models.llama import step_views
from fi_engine.runtime.sched.step_arrays import decode_layout, prefill_layout
from fi_ffi.errors import KernelError
from fi_ffi.ops.attention import decode, prefill
from fi_ffi.ops.attention.plan import Plan
from fi_ffi.ops.attention.workspace import Workspace
from fi_ffi.tensor.descriptor import Tensor

pytestmark = [pytest.mark.usefixtures("kernel_modules"), pytest.mark.cpu_only]

_BLOCK = np.zeros(256, np.uint8)
FAKE = (_BLOCK.ctypes.data + 127) // 128 * 128  # one aligned host address every fake descriptor points at
PAGES, PS, ROWS, BATCH = 9, 16, 5, 3


def config(head_dim: int) -> LlamaConfig:
    return LlamaConfig.from_dict({**LLAMA_SHAPE, "head_dim": head_dim})


def views(c: LlamaConfig, dtype: str, kind: str):
    layout = decode_layout(BATCH, PAGES) if kind == "decode" else prefill_layout(ROWS, BATCH, PAGES)
    # each region at its own (never dereferenced: no GPU) address, 1 GiB apart, so no two regions overlap
    names = ("h", "x", "qkv", "attn", "gu", "act", "logits", "ids", "meta")
    base = {name: FAKE + (i << 30) for i, name in enumerate(names)}
    return step_views(c, dtype, 0, base, layout, kind, ROWS if kind == "prefill" else BATCH, BATCH)


def cache(c: LlamaConfig, dtype: str) -> Tensor:
    return kernels.descriptor(FAKE, (PAGES, PS, c.num_kv_heads, c.head_dim), dtype, 0)


def workspace() -> Workspace:
    pinned = np.zeros(1 << 12, np.uint8)
    return Workspace.from_buffers(  # float and int buffers apart: Workspace refuses overlapping ones
        kernels.descriptor(FAKE, (1 << 16,), "uint8", 0),
        kernels.descriptor(FAKE + (1 << 16), (1 << 12,), "uint8", 0),
        Tensor.from_pointer(pinned.ctypes.data, pinned.shape, "uint8", "cpu", owner=pinned),
    )


def reached(call) -> KernelError:
    """``call()`` got through fi_ffi's checks and the module's signature check, and failed on the missing GPU."""
    with pytest.raises(KernelError) as info:
        call()
    err = info.value
    assert err.kind != "TypeError", f"signature mismatch: {err}"
    assert "Mismatched" not in err.message and "Expected" not in err.message, err.message
    assert "cuda" in err.message.lower(), err.message
    return err


@pytest.fixture(scope="module")
def make_array():
    from fi_ffi.abi.call import Function

    return Function.global_function("ffi.Array")


VARIANTS = [("float16", 64), ("float16", 128), ("bfloat16", 64), ("bfloat16", 128)]


@pytest.mark.parametrize(("dtype", "head_dim"), VARIANTS)
def test_norms_and_kv_append_accept_the_engine_views(dtype, head_dim):
    c = config(head_dim)
    weight = kernels.descriptor(FAKE + (16 << 30), (c.hidden_size,), dtype, 0)  # apart from the views
    for kind in ("decode", "prefill"):
        v = views(c, dtype, kind)
        reached(lambda v=v: kernels.rmsnorm(v.h, weight, v.x, 1e-5, 0))
        reached(lambda v=v: kernels.fused_add_rmsnorm(v.x, v.h, weight, 1e-5, 0))
        reached(
            lambda v=v: kernels.append_kv(
                v.k,
                v.v,
                v.batch_indices,
                v.positions,
                cache(c, dtype),
                cache(c, dtype),
                v.kv_indices,
                v.kv_indptr,
                v.kv_last_page_len,
                0,
            )
        )


@pytest.mark.parametrize(("dtype", "head_dim"), VARIANTS)
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_decode_plan_and_run_accept_the_engine_views(make_array, dtype, head_dim, cuda_graph):
    c = config(head_dim)
    ws = workspace()
    indptr = np.array([0, 2, 3, 4], np.int32)
    err = reached(
        lambda: kernels.decode_plan(ws, indptr, c.num_qo_heads, c.num_kv_heads, c.head_dim, PS, dtype, cuda_graph, 0)
    )
    assert err.function.endswith(".plan") and f"head_dim_qk_{head_dim}" in err.function
    # a plan as batch_decode_plan builds it, around a synthetic schedule (no GPU to compute one)
    st = decode._settings(
        ws.device.device_id,
        (
            c.num_qo_heads,
            c.num_kv_heads,
            c.head_dim,
            PS,
            dtype,
            None,
            None,
            "NHD",
            "NONE",
            -1,
            0.0,
            None,
            1.0,
            1e4,
            cuda_graph,
        ),
    )
    plan = Plan.make(make_array(*([0] * 10)), ws, ws._generation, st, BATCH, BATCH, 4)
    v = views(c, dtype, "decode")
    reached(
        lambda: kernels.decode_run(
            plan, v.q, cache(c, dtype), cache(c, dtype), v.kv_indptr, v.kv_indices, v.kv_last_page_len, v.attn, 0
        )
    )


@pytest.mark.parametrize(("dtype", "head_dim"), VARIANTS)
def test_prefill_plan_and_runs_accept_the_engine_views(make_array, dtype, head_dim):
    c = config(head_dim)
    ws = workspace()
    qo, kv, last = (np.array(a, np.int32) for a in ([0, 2, 4, 5], [0, 1, 2, 3], [2, 2, 1]))
    reached(lambda: kernels.prefill_plan(ws, qo, kv, last, c.num_qo_heads, c.num_kv_heads, c.head_dim, PS, dtype, 0))
    v = views(c, dtype, "prefill")
    for backend in ("fa2", "fa3") if head_dim == 128 else ("fa2",):  # the wheel has FA3 modules for d128 only
        st = prefill._settings(
            "paged",
            ws.device.device_id,
            (
                c.num_qo_heads,
                c.num_kv_heads,
                c.head_dim,
                PS,
                None,
                dtype,
                None,
                None,
                "NHD",
                True,
                False,
                "NONE",
                -1,
                0.0,
                None,
                1.0,
                1e4,
                False,
                backend,
                False,
                None,
                False,
            ),
        )
        plan = Plan.make(make_array(*([0] * (9 if backend == "fa3" else 15))), ws, ws._generation, st, BATCH, ROWS, 3)
        err = reached(
            lambda plan=plan: kernels.prefill_run(
                plan,
                v.q,
                cache(c, dtype),
                cache(c, dtype),
                v.qo_indptr,
                v.kv_indptr,
                v.kv_indices,
                v.kv_last_page_len,
                v.attn,
                0,
            )
        )
        assert ("_sm90" in err.function) == (backend == "fa3")


@pytest.mark.parametrize(("dtype", "head_dim"), VARIANTS)
def test_decode_steps_reach_the_fa2_prefill_kernel_as_decode(make_array, monkeypatch, dtype, head_dim):
    """``ModelRunner.tensor_core_decode_rows``: a decode graph's step of enough rows plans FlashInfer's FA2 paged
    prefill with one query a request (``Llama.plan_decode``: the plan reaches the FA2 module's plan; a graph size keeps
    the kernel its first plan chose), and the layer's
    attention (``Llama.decode_attention``, given such a plan) hands the decode views to the FA2 module's run, with
    ``0, 1, ..., rows`` as the query offsets (launched with PDL only with ``ModelRunner.prefill_kernel_pdl`` where the
    GEMVs launch so); an eager step, fewer rows, the setting off, or fewer than 4 query heads a
    KV head keep the decode kernel (``Llama.tensor_core_decode``)."""
    from types import SimpleNamespace

    from fi_engine.models.llama import Llama

    c = config(head_dim)
    ws = workspace()
    family = Llama()
    # the query offsets' device copy (DecodeQueryOffsets): an address never dereferenced here (no GPU), as the views'
    device_copy = SimpleNamespace(asarray=lambda host: SimpleNamespace(data=SimpleNamespace(ptr=FAKE)))
    arrays = {"kv_indptr": np.array([0, 2, 3, 4, 4], np.int32), "kv_last_page_len": np.array([3, 1, 16, 1], np.int32)}
    eng = SimpleNamespace(
        config=c, tensor_core_decode_rows=BATCH, decode_workspace=ws, page_size=PS, dtype=dtype, stream_ptr=0,
        kv_dtype=None, kv_sm_scale=None, device=0, max_batch=BATCH + 1, decode_plan=None, decode_arrays=arrays,
        k_cache=[cache(c, dtype)], v_cache=[cache(c, dtype)], prefill_kernel_pdl=False, cupy=device_copy,
        tensor_core_decode_context=0,
        dense=SimpleNamespace(launcher=SimpleNamespace(launches_with_pdl=True)),
    )  # fmt: skip
    assert family.tensor_core_decode(eng, BATCH) == (c.num_qo_heads >= 4 * c.num_kv_heads)
    if not family.tensor_core_decode(eng, BATCH):
        pytest.skip(f"{c.num_qo_heads} query heads over {c.num_kv_heads}: the decode kernel serves")
    assert not family.tensor_core_decode(eng, BATCH - 1)
    assert not family.tensor_core_decode(SimpleNamespace(**{**vars(eng), "tensor_core_decode_rows": 0}), BATCH)
    few = SimpleNamespace(**{**vars(eng), "config": SimpleNamespace(num_qo_heads=9, num_kv_heads=3)})
    assert not family.tensor_core_decode(few, BATCH)
    err = reached(lambda: family.plan_decode(eng, BATCH, cuda_graph=True))  # type: ignore[arg-type]
    assert err.function.endswith(".plan") and "batch_prefill" in err.function and "_sm90" not in err.function
    err = reached(lambda: family.plan_decode(eng, BATCH, cuda_graph=False))  # type: ignore[arg-type]
    assert "batch_decode" in err.function  # eager: the decode kernel
    # a graph size keeps the kernel its first plan (its capture's) chose, whatever the setting says later
    eng.tensor_core_decode_rows = 0
    err = reached(lambda: family.plan_decode(eng, BATCH, cuda_graph=True))  # type: ignore[arg-type]
    assert "batch_prefill" in err.function
    err = reached(lambda: family.plan_decode(eng, BATCH - 1, cuda_graph=True))  # type: ignore[arg-type]
    assert "batch_decode" in err.function  # (a size first planned now: the setting, off)
    eng.tensor_core_decode_rows = 1
    err = reached(lambda: family.plan_decode(eng, BATCH - 1, cuda_graph=True))  # type: ignore[arg-type]
    assert "batch_decode" in err.function
    eng.tensor_core_decode_rows = BATCH
    # the prefill's own plan, through the same call (FlashInfer's choice of backend: FA3 on Hopper where it can)
    eng.prefill_workspace = ws
    eng.prefill_arrays = {"qo_indptr": np.array([0, 2, 4, 5], np.int32), **arrays}
    err = reached(lambda: family.plan_prefill(eng, BATCH))  # type: ignore[arg-type]
    assert err.function.endswith(".plan") and "batch_prefill" in err.function
    # the layer's attention with an FA2 prefill plan of the step's rows (a synthetic schedule: no GPU to compute one)
    settings = (c.num_qo_heads, c.num_kv_heads, c.head_dim, PS, None, dtype, None, None, "NHD", True, False, "NONE",
                -1, 0.0, None, 1.0, 1e4, False, "fa2", True, None, False)  # fmt: skip
    st = prefill._settings("paged", ws.device.device_id, settings)
    eng.decode_plan = Plan.make(make_array(*([0] * 15)), ws, ws._generation, st, BATCH, BATCH, 3)
    v = views(c, dtype, "decode")
    run, pdl = fi_ffi.batch_prefill_paged_run, []

    def spy(*args, **kwargs):  # the real run, its enable_pdl noted
        pdl.append(kwargs["enable_pdl"])
        return run(*args, **kwargs)

    monkeypatch.setattr(fi_ffi, "batch_prefill_paged_run", spy)
    err = reached(lambda: family.decode_attention(eng, 0, v))  # type: ignore[arg-type]
    assert "batch_prefill" in err.function and "_sm90" not in err.function
    eng.prefill_kernel_pdl = True  # (ModelRunner.prefill_kernel_pdl: where the GEMVs launch with PDL)
    reached(lambda: family.decode_attention(eng, 0, v))  # type: ignore[arg-type]
    eng.dense.launcher.launches_with_pdl = False
    reached(lambda: family.decode_attention(eng, 0, v))  # type: ignore[arg-type]
    assert pdl == [False, True, False]
    view = family._decode_queries(eng).view(BATCH)  # type: ignore[arg-type]
    assert view.shape == (BATCH + 1,) and view.data_ptr == FAKE


def needs(name: str) -> None:
    if not hasattr(fi_ffi, name):
        pytest.skip(f"fi_ffi.{name} is not on this branch yet (another op family's change)")


@pytest.mark.parametrize(("dtype", "head_dim"), VARIANTS)
@pytest.mark.parametrize("llama3", [False, True])
def test_rope_accepts_the_fused_qkv_views(dtype, head_dim, llama3):
    needs("apply_llama31_rope_pos_ids_inplace" if llama3 else "apply_rope_pos_ids_inplace")
    c = config(head_dim)
    rope = RopeConfig(theta=5e5, llama3=True, factor=8.0) if llama3 else RopeConfig()
    for kind in ("decode", "prefill"):
        v = views(c, dtype, kind)
        reached(lambda v=v: kernels.rope_inplace(v.q, v.k, v.positions, rope, 0))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_silu_and_mul_accepts_the_engine_views(dtype):
    needs("silu_and_mul")
    v = views(config(64), dtype, "prefill")
    reached(lambda: kernels.silu_and_mul(v.gu, v.act, 0))


@pytest.mark.parametrize(("dtype", "head_dim"), [("float16", 128), ("bfloat16", 64)])
def test_the_fused_step_hands_the_packed_attention_runs_the_same_frames(monkeypatch, dtype, head_dim):
    """``ModelRunner.packed_attention``: the fused step's attention run per layer, packed once per view, hands the
    module the frame ``batch_decode_run`` does (every slot and DLTensor, recorded by a probe bound as the run's entry
    point), step after step with a new plan each, between the same packed launches in the same order. The engine is
    a bare object with the attributes the fused step reads; the other packed launches are recording stand-ins."""
    from types import SimpleNamespace

    from helpers.frame_probe import FrameProbe

    from fi_engine.models.llama import Llama
    from fi_engine.runtime.worker.fused_decode import FusedDecode
    from fi_engine.runtime.worker.model_runner import ModelRunner
    from fi_ffi.abi.call import Function

    c = config(head_dim)
    ws = workspace()
    probe, array = FrameProbe(), Function.global_function("ffi.Array")
    args = (c.num_qo_heads, c.num_kv_heads, c.head_dim, PS, dtype, None, None, "NHD", "NONE", -1, 0.0, None, 1.0, 1e4)
    s = decode._settings(0, (*args, False))
    run_l, plan_l = s.run.launcher, s.plan.launcher
    saved = run_l.entry, plan_l.entry
    for each in (run_l, plan_l):
        each.forget()
    run_l.entry = probe.entry
    plan_l.entry = SimpleNamespace(safe_call=array.safe_call, this=array.this)
    monkeypatch.setattr(Workspace, "_record_plan_copy", lambda self, stream: None)  # a CUDA event: no GPU here
    try:
        eng = object.__new__(ModelRunner)
        eng.family = Llama()  # the layer body's attention (the engine's constructor makes it)
        eng.config, eng.stream_ptr, eng.head_rows = c, 0, 0
        eng.dense = SimpleNamespace(launcher=SimpleNamespace(launches_with_pdl=False))  # as batch_decode_run (no PDL)
        shape = (PAGES, PS, c.num_kv_heads, c.head_dim)
        eng.k_cache = [kernels.descriptor(FAKE + ((16 + 2 * i) << 30), shape, dtype, 0) for i in range(c.num_layers)]
        eng.v_cache = [kernels.descriptor(FAKE + ((17 + 2 * i) << 30), shape, dtype, 0) for i in range(c.num_layers)]
        eng.buffers = SimpleNamespace(logits=SimpleNamespace(data=SimpleNamespace(ptr=0)))
        order: list[tuple[str, int]] = []
        eng.finish_logits = lambda *_: order.append(("finish", len(probe.seen)))
        v = views(c, dtype, "decode")

        def mark(tag: str):
            return lambda: order.append((tag, len(probe.seen)))

        layers = [([mark(f"qkv{i}")], [mark(f"o{i}"), mark(f"gu{i}"), mark(f"down{i}")]) for i in range(c.num_layers)]
        v.prepared["fused step"] = (mark("embed"), layers, mark("head"))
        seen: dict[bool, list[object]] = {}
        packed_runs = []
        for step, indptr in enumerate(([0, 2, 3, 4], [0, 1, 3, 5], [0, 3, 4, 7])):
            eng.decode_plan = kernels.decode_plan(ws, np.array(indptr, np.int32), *args[:4], dtype, False, 0)
            for packed in (False, True):
                eng.packed_attention = packed
                order.clear()
                FusedDecode(eng).step(v, BATCH)
                seen[packed] = [probe.seen.pop(0) for _ in range(c.num_layers)]
                assert probe.seen == []
                # each layer's run between its QKV launch and its o launch; the head after the last
                want = [("embed", 0)]
                for i in range(c.num_layers):
                    want += [(f"qkv{i}", i), (f"o{i}", i + 1), (f"gu{i}", i + 1), (f"down{i}", i + 1)]
                assert order == [*want, ("head", c.num_layers), ("finish", c.num_layers)]
            assert seen[True] == seen[False], f"step {step}: the packed runs' frames differ"
            packed_runs.append(v.prepared["attention runs"])
            assert packed_runs[-1][0] == eng.decode_plan._context
        assert packed_runs[0] is packed_runs[1] is packed_runs[2]  # packed once for the context, reused by each step
        # the caches of each layer reached its own run
        k_slot = [p.name for p in decode.RUN.params].index("k_cache")
        assert len({frame[1][k_slot] for frame in seen[True]}) == c.num_layers
    finally:
        for each in (run_l, plan_l):
            each.forget()
        run_l.entry, plan_l.entry = saved


def _bare_step_engine(c: LlamaConfig, dtype: str, weights: str) -> Any:
    """A bare ModelRunner with the attributes the fused step's packing (``FusedDecode._fused_calls``) reads, over
    ``weights`` ("16-bit", "fp8" or "int4"): descriptors at fake addresses, the GEMV launches stand-ins returning
    "gemv", the fused GEMVs serving up to 4 rows."""
    from types import SimpleNamespace

    from fi_engine.runtime.worker.model_runner import ModelRunner

    fp8 = weights == "fp8"
    eng = object.__new__(ModelRunner)
    eng.config, eng.stream_ptr, eng.gemm_type, eng.gemm_f32, eng.head_rows = c, 0, 1, 2, 0
    buffer = SimpleNamespace(data=SimpleNamespace(ptr=FAKE))
    eng.buffers = SimpleNamespace(
        x=buffer, qkv=buffer, attn=buffer, gu=buffer, act=buffer, h=buffer, h_alt=buffer, xn=buffer, logits=buffer
    )
    eng.qkv_width, eng.embed, eng.lm_head = 0, 0, 0
    weight = kernels.descriptor(FAKE + (40 << 30), (c.hidden_size,), dtype, 0)  # (the FP8 step packs its norms)
    eng.final_norm, eng.ln1, eng.ln2 = weight, [weight] * c.num_layers, [weight] * c.num_layers
    eng.wqkv = eng.wo = eng.wgu = eng.wd = [0] * c.num_layers
    eng.moe_layers = []  # a dense model
    head_w = [kernels.descriptor(FAKE + ((30 + i) << 30), (c.head_dim,), dtype, 0) for i in range(2 * c.num_layers)]
    eng.q_norm, eng.k_norm = head_w[: c.num_layers], head_w[c.num_layers :]
    shape = (PAGES, PS, c.num_kv_heads, c.head_dim)
    eng.k_cache = [kernels.descriptor(FAKE + ((16 + 2 * i) << 30), shape, dtype, 0) for i in range(c.num_layers)]
    eng.v_cache = [kernels.descriptor(FAKE + ((17 + 2 * i) << 30), shape, dtype, 0) for i in range(c.num_layers)]
    stand_in = lambda *_, **__: "gemv"  # noqa: E731
    eng.dense = SimpleNamespace(
        prepared_linear=stand_in,
        rows=SimpleNamespace(prepared_gather=stand_in),
        fused=SimpleNamespace(
            prepared=stand_in,
            fits=lambda rows, k: rows <= 4,  # (the LM head's fused GEMV: the quantized steps' head up to 4 rows)
            has_qkv_rope=lambda *_: False,
            has_gate_up_silu=lambda *_: True,  # the gate/up GEMV's SiLU epilogue, then the down GEMV over its output
            prepared_gate_up_silu=stand_in,
        ),
        # the frames compared with batch_decode_run's (which launches without it)
        launcher=SimpleNamespace(launches_with_pdl=False),
        quantized=SimpleNamespace(
            serves_fp8=fp8,  # FP8 weights: the epilogue step (its norms packed launches of their own)
            serves_int4=weights == "int4",
            fp8_fused=False,
            has_fp8_weight=lambda _: fp8,
            prepared_fp8_silu=stand_in,
            has_int4_silu=lambda _: weights == "int4",
            prepared_int4_silu=stand_in,
            has_int4_rope=lambda _: False,  # RoPE and the append as launches (their epilogue form: the GPU files)
            fold_rows=lambda _: 0,  # the norms as launches of their own (their folded form: test_norm_fold.py)
            int4_weights={},
        ),
    )
    if fp8:
        eng.kv_fp8 = None
    return eng


@pytest.mark.parametrize(
    ("dtype", "head_dim", "qk_norm", "llama3", "weights"),
    [("float16", 128, False, True, "16-bit"), ("bfloat16", 64, True, False, "16-bit"),
     ("bfloat16", 128, True, True, "fp8"), ("float16", 128, False, False, "int4")],
)  # fmt: skip
def test_the_fused_steps_fallback_packs_rope_and_the_append_as_the_op_calls(dtype, head_dim, qk_norm, llama3, weights):
    """The fused step's fallback (Qwen3's per-head norms, or a head dim the QKV epilogue lacks; ``fp8``: the FP8
    epilogue step, ``_fp8_fused_calls``, whose QKV GEMV keeps them separate for Qwen3; ``int4``: the same step, SiLU
    the gate/up GEMV's epilogue and RoPE with the append launches of their own): ``_fused_calls``
    packs RoPE and the KV append with ``fi_ffi.prepare`` (``kernels.prepared_rope_inplace`` / ``prepared_append_kv``),
    and each packed launch hands the module the frame the op call ``_forward`` makes does (``kernels.rope_inplace``
    / ``append_kv``; the norms' ``qk_rmsnorm``), every slot and DLTensor recorded by a probe bound as the entry point
    of each launcher, in the order ``_forward`` issues them. The engine is a bare object with the attributes
    ``_fused_calls`` reads; its GEMV launches are recording stand-ins. Then the packed calls reach the real module."""
    from dataclasses import replace

    from helpers.frame_probe import FrameProbe

    from fi_engine.runtime.worker.fused_decode import FusedDecode
    from fi_ffi.ops import norm, page, rope

    fp8 = weights == "fp8"
    c = replace(config(head_dim), qk_norm=qk_norm)
    if llama3:
        c = replace(c, rope=RopeConfig(theta=5e5, llama3=True, factor=8.0))
    v = views(c, dtype, "decode")
    eng = _bare_step_engine(c, dtype, weights)
    if fp8:
        eng.kv_fp8 = None
    op = "_apply_llama31_rope_pos_ids" if llama3 else "_apply_rope_pos_ids"
    launches = (getattr(rope, op), page._append, norm._qk_rmsnorm)
    probe = FrameProbe()
    saved = [each.launcher.entry for each in launches]
    for each in launches:
        each.launcher.forget()
        each.launcher.entry = probe.entry
    try:
        _, layers, _ = FusedDecode(eng)._fused_calls(v, BATCH)
        for i, (before, after) in enumerate(layers):
            if weights != "16-bit":  # the norm, the QKV GEMV, ...; after: O, the norm, gate/up + SiLU, down
                assert callable(before[0]) and before[1] == "gemv" and after[::2] == after[2:] == ["gemv"] * 2
                before = before[1:]
            else:
                assert before[0] == "gemv" and after == ["gemv"] * 3
            packed = before[1:]
            assert len(packed) == (4 if qk_norm else 2)
            for call in packed:
                call()
            packed_frames = [probe.seen.pop(0) for _ in packed]
            if qk_norm:  # as _forward calls them
                kernels.qk_rmsnorm(v.q, eng.q_norm[i], c.rms_norm_eps, 0)
                kernels.qk_rmsnorm(v.k, eng.k_norm[i], c.rms_norm_eps, 0)
            kernels.rope_inplace(v.q, v.k, v.positions, c.rope, 0)
            index = (v.kv_indices, v.kv_indptr, v.kv_last_page_len)
            kernels.append_kv(v.k, v.v, v.batch_indices, v.positions, eng.k_cache[i], eng.v_cache[i], *index, 0)
            assert packed_frames == [probe.seen.pop(0) for _ in packed], f"layer {i}"
            assert probe.seen == []
    finally:
        for each, entry in zip(launches, saved, strict=True):
            each.launcher.forget()
            each.launcher.entry = entry
    # packed again with the real modules bound: each packed call passes the module's signature check
    _, layers, _ = FusedDecode(eng)._fused_calls(v, BATCH)
    for call in layers[0][0][1 if weights == "16-bit" else 2 :]:
        reached(call)


def test_the_int4_steps_lm_head_past_the_fused_gemvs_rows_is_the_final_norm_then_the_gemm(monkeypatch):
    """Over int4 weights the fused step serves more rows than the fused GEMVs (``FusedDecode.fits_int4_wide``): there
    its LM head is ``fused_add_rmsnorm`` of the residual with the final norm's weight into ``x``, then the 16-bit
    GEMM of ``x`` into the float32 logits, as the separate launches' head; where the fused GEMV serves the rows, its
    one launch. Here the fused GEMVs serve 2 rows and the step has 3; the packed norm then reaches the real module."""
    from types import SimpleNamespace

    from fi_engine.runtime.worker import fused_decode
    from fi_engine.runtime.worker.fused_decode import FusedDecode

    c = config(128)
    v = views(c, "bfloat16", "decode")
    eng = _bare_step_engine(c, "bfloat16", "int4")
    eng.head_rows, eng.lm_head, eng.norm_pdl = 128256, FAKE + (50 << 30), False
    eng.buffers.logits = SimpleNamespace(data=SimpleNamespace(ptr=FAKE + (51 << 30)))
    _, _, head = FusedDecode(eng)._fused_calls(v, BATCH)
    assert head == "gemv"  # (3 rows: the fused GEMV with the norm as its prologue)
    eng.dense.fused.fits = lambda rows, k: rows <= 2
    reached(FusedDecode(eng)._fused_calls(v, BATCH)[2])  # the norm, packed by fi_ffi, reaches the module
    log: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        fused_decode.kernels,
        "prepared_fused_add_rmsnorm",
        lambda *args: lambda: log.append(("norm", *args)),
    )
    eng.dense.prepared_linear = lambda *args: lambda: log.append(("gemm", *args))
    _, _, head = FusedDecode(eng)._fused_calls(v, BATCH)
    head()
    x = eng.buffers.x.data.ptr
    assert log == [
        ("norm", v.x, v.h, eng.final_norm, c.rms_norm_eps, 0, False),  # h += x; x = norm(h): the residual is h
        ("gemm", BATCH, x, c.hidden_size, eng.lm_head, 128256, c.hidden_size, FAKE + (51 << 30), 128256, 1, 2),
    ]


@pytest.mark.parametrize("rows", [1, 5])
def test_per_row_sampling_calls_reach_the_sampling_module(rows):
    """A mixed step's sampling (fi_engine.runtime.sample.sampler.Sampler._sample_mixed): softmax with a per-row
    temperature array, then the joint top-k/top-p sampler with per-row int32 top_k / float32 top_p arrays read at
    ``indices`` (a stream's rows, fewer than the rows) into an int32 ``out`` of its own length, as the engine describes
    them; and the uniform step's scalar call."""
    vocab = 32000
    at = iter(FAKE + (i << 30) for i in range(16))  # each operand at its own address, 1 GiB apart

    def d(shape, dtype):
        return kernels.descriptor(next(at), shape, dtype, 0)

    logits, probs = d((rows, vocab), "float32"), d((rows, vocab), "float32")
    workspace = d((kernels.softmax_workspace_bytes(8, vocab),), "uint8")
    temperature, top_k, top_p = d((rows,), "float32"), d((rows,), "int32"), d((rows,), "float32")
    m = max(1, rows - 2)
    indices, out = d((m,), "int32"), d((m,), "int32")
    valid = d((m,), "bool") if kernels.sampling_needs_valid() else None
    gen = kernels.generator(7)
    reached(lambda: kernels.softmax(logits, probs, workspace, temperature, 0))
    reached(lambda: kernels.sample_rows(probs, out, top_k, top_p, indices, gen, 0, valid))
    assert gen.get_state() == (7, 0)  # a call that did not launch draws nothing
    ids = d((rows,), "int32")
    valid_all = d((rows,), "bool") if kernels.sampling_needs_valid() else None
    reached(lambda: kernels.sample_top_k_top_p(logits, probs, workspace, ids, 50, 0.9, 0.7, gen, 0, valid_all))


def test_the_softmax_scratch_serves_every_batch_up_to_max_batch():
    """The softmax kernel needs scratch only for batches of at most 128 rows: an engine of more slots sizes it
    for 128, not for its max_batch (which would need none and fail a step of fewer rows)."""
    vocab = 128256
    assert kernels.softmax_workspace_bytes(256, vocab) == fi_ffi.softmax_workspace_size(128, vocab) > 8
    for rows in (1, 64, 128):
        assert kernels.softmax_workspace_bytes(256, vocab) >= fi_ffi.softmax_workspace_size(rows, vocab)
    assert kernels.softmax_workspace_bytes(4, 1000) == 8


def test_a_small_graph_size_takes_the_prefill_kernel_by_its_steps_longest_context(monkeypatch) -> None:
    """``ModelRunner.tensor_core_decode_context``: a decode graph of fewer rows than ``tensor_core_decode_rows``,
    first planned (captured) on the decode kernel, names both kernels (``Llama.decode_graph_kernels``); a plan asked
    for a kind (its second capture) reaches that module's plan; each later step's plan (kind None) reaches the FA2
    prefill plan where its longest context has that many tokens or more (the setting as that capture saw it), else the
    decode plan. A size at or above ``tensor_core_decode_rows`` keeps one kernel; the setting at 0 keeps one; an FA2
    plan refused at the second capture (no such module) leaves the size on the decode kernel."""
    from types import SimpleNamespace

    from fi_engine.kernels import flashinfer as kernels
    from fi_engine.models.llama import Llama

    c = config(128)
    family = Llama()
    # contexts: (2 - 1) * 16 + 3 = 19 tokens, then 1 and 16: the longest of 1, 2 or 3 rows is 19
    arrays = {"kv_indptr": np.array([0, 2, 3, 4, 4], np.int32), "kv_last_page_len": np.array([3, 1, 16, 1], np.int32)}
    eng = SimpleNamespace(
        config=c, tensor_core_decode_rows=BATCH, tensor_core_decode_context=19, decode_workspace=workspace(),
        page_size=PS, dtype="bfloat16", stream_ptr=0, kv_dtype=None, kv_sm_scale=None, device=0, max_batch=BATCH + 1,
        decode_plan=None, decode_arrays=arrays, cupy=SimpleNamespace(asarray=lambda host: host),
    )  # fmt: skip
    rows = BATCH - 1

    def planned(n: int, kind: str | None = None) -> str:  # the module function a graph step's plan reached
        return reached(lambda: family.plan_decode(eng, n, True, kind)).function  # type: ignore[arg-type]

    assert family.decode_graph_kernels(eng, rows) == ()  # type: ignore[arg-type]  # (not captured yet)
    assert "batch_decode" in planned(rows)  # the capture's first plan
    assert family.decode_graph_kernels(eng, rows) == ("batch_decode", "batch_prefill")  # type: ignore[arg-type]
    assert "batch_prefill" in planned(rows, "batch_prefill") and "_sm90" not in planned(rows, "batch_prefill")
    assert "batch_decode" in planned(rows, "batch_decode")
    assert "batch_prefill" in planned(rows)  # a step: 19 tokens, the setting 19
    eng.tensor_core_decode_context = 0  # (after the capture: the size keeps the 19 it was captured with)
    assert "batch_prefill" in planned(rows)
    arrays["kv_last_page_len"][0] = 2  # the longest context now 18
    assert family.step_kernel(eng, rows) == "batch_decode"  # type: ignore[arg-type]
    assert "batch_decode" in planned(rows)
    arrays["kv_last_page_len"][0] = 3
    eng.tensor_core_decode_context = 1
    assert "batch_prefill" in planned(BATCH)  # a size at tensor_core_decode_rows: the prefill kernel alone
    assert family.decode_graph_kernels(eng, BATCH) == ()  # type: ignore[arg-type]
    eng.tensor_core_decode_context = 0  # (off: a size captured from now on keeps the decode kernel alone)
    assert "batch_decode" in planned(1)
    assert family.decode_graph_kernels(eng, 1) == ()  # type: ignore[arg-type]

    # the wheels without the FA2 module (its plan refused as fi_ffi refuses a missing module): the second capture's
    # plan falls back to the decode plan, and the size's steps stay on the decode kernel at any context
    def refused(*args: object) -> None:
        raise kernels.KernelNotFoundError("no batch_prefill module of these settings in the pinned wheels")

    family = Llama()  # (a model of its own: no size captured yet)
    eng.tensor_core_decode_context = 1
    monkeypatch.setattr(family, "_paged_prefill_plan", refused)
    assert "batch_decode" in planned(rows)  # (the size's first capture: the decode kernel)
    assert family.decode_graph_kernels(eng, rows) == ("batch_decode", "batch_prefill")  # type: ignore[arg-type]
    assert "batch_decode" in planned(rows, "batch_prefill")  # refused: the decode plan
    assert family.tensor_core_decode_refused.startswith("KernelNotFoundError")
    assert family.decode_graph_kernels(eng, rows) == ()  # type: ignore[arg-type]
    assert family.step_kernel(eng, rows) == "batch_decode"  # type: ignore[arg-type]
    assert "batch_decode" in planned(BATCH)  # (a larger size captured after: the decode kernel too)

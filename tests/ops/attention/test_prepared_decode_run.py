"""The packed batch decode run (``prepare_decode_run``), proven on the CPU against ``batch_decode_run``.

With no GPU the packed run cannot be compared by its output, so it is compared by its input: the run launcher's
entry point is bound to a probe (a TVM-FFI Function written in Python, called through the real libtvm_ffi's
safe-call convention) that records, at the moment it is called, every ``TVMFFIAny`` slot of the frame it is
handed (type index, padding word, payload word; the result slot too), each ``DLTensor`` a slot points at (its
header bytes, shape, strides: the record's own address differs between two frames, its contents must not) and
TVM-FFI's current stream. The plans are real ``batch_decode_plan`` calls whose plan entry point is bound to the
runtime's ``ffi.Array`` (each plan owns an Array of its own, as a module's schedule), so every plan's info handle
differs and a packed run that wrote a stale one would be seen. ``batch_decode_run`` and the packed run of the
same arguments must hand over the same record for every plan in a row, after every refusal too. The real
module of the shared test wheel is bound in the last test: the packed frame passes its signature check and
stops at its first CUDA call, as the ordinary run does (tests/ops/attention/test_attention_calls.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers.attention_plans import assert_reached_the_kernel, decode_run_args, host, paged, prefill_plan, workspace
from helpers.fakes import fake_cuda
from helpers.frame_probe import FrameProbe

import fi_ffi
from fi_ffi.abi.call import Function
from fi_ffi.errors import KernelError
from fi_ffi.ops.attention import decode
from fi_ffi.ops.attention.workspace import Workspace

pytestmark = pytest.mark.usefixtures("kernel_modules", "fake_device_only")

HQ, HK, D, PAGE = 32, 8, 128, 16


@pytest.fixture
def probe(monkeypatch):
    """The decode run launcher bound to a frame probe, the plan launcher to ``ffi.Array`` (restored after)."""
    p = FrameProbe()
    array = Function.global_function("ffi.Array")
    s = decode._settings(0, (HQ, HK, D, PAGE, "float16", None, None, "NHD", "NONE", -1, 0.0, None, 1.0, 1e4, False))
    run_l, plan_l = s.run.launcher, s.plan.launcher
    saved = run_l.entry, plan_l.entry
    run_l.forget()
    plan_l.forget()
    run_l.entry = p.entry
    plan_l.entry = SimpleNamespace(safe_call=array.safe_call, this=array.this)
    monkeypatch.setattr(Workspace, "_record_plan_copy", lambda self, stream: None)  # a CUDA event: no GPU here
    yield p
    run_l.forget()
    plan_l.forget()
    run_l.entry, plan_l.entry = saved


def _plan(ws, indptr, last, **kw):
    return fi_ffi.batch_decode_plan(host(indptr), None, host(last), HQ, HK, D, PAGE, **kw, workspace=ws)


def _both(probe, prepared, plan, args, **kw):
    """The record of ``batch_decode_run`` and of the packed run, for one plan."""
    decode.batch_decode_run(**paged(args), **kw, plan=plan)
    ordinary = probe.last()
    prepared.run(plan)
    packed = probe.last()
    return ordinary, packed


def _info_handle(record) -> int:
    return record[1][2][2]  # slot 2 (plan_info_vec): its payload


@pytest.mark.parametrize("stream", [None, 0x5150])
@pytest.mark.parametrize("with_lse", [False, True])
def test_the_packed_run_hands_over_the_ordinary_runs_frame_plan_after_plan(probe, stream, with_lse):
    ws = workspace()
    args = decode_run_args(batch=2, pages=8)
    kw = dict(lse=fake_cuda((2, HQ), "float32") if with_lse else None, enable_pdl=with_lse, stream=stream)
    plan1 = _plan(ws, [0, 2, 3], [5, 16])
    prepared = decode.prepare_decode_run(**paged(args), plan=plan1, **kw)
    assert probe.seen == []  # preparing launches nothing
    ordinary, packed = _both(probe, prepared, plan1, args, **kw)
    assert packed == ordinary
    assert _info_handle(packed) == plan1._info.handle
    assert ordinary[0] == len(decode.RUN.params) and ordinary[2] == (stream or 0)
    # a re-plan with other lengths (same batch size): the same packed run takes the new schedule
    plan2 = _plan(ws, [0, 3, 7], [1, 9])
    assert plan2._info.handle != plan1._info.handle and plan2._context is plan1._context
    ordinary, packed = _both(probe, prepared, plan2, args, **kw)
    assert packed == ordinary and _info_handle(packed) == plan2._info.handle
    for _ in range(3):  # every layer of a step: the same plan again
        assert _both(probe, prepared, plan2, args, **kw)[1] == ordinary
    with pytest.raises(ValueError, match="^plan: is stale") as stale:
        prepared.run(plan1)
    with pytest.raises(ValueError) as ordinary_stale:
        decode.batch_decode_run(**paged(args), **kw, plan=plan1)
    assert str(stale.value) == str(ordinary_stale.value)
    assert probe.seen == []
    plan3 = _plan(ws, [0, 1, 2], [16, 16])
    ordinary, packed = _both(probe, prepared, plan3, args, **kw)
    assert packed == ordinary and _info_handle(packed) == plan3._info.handle


def test_a_plan_of_another_batch_size_is_refused_naming_plan(probe):
    ws = workspace()
    args = decode_run_args(batch=2, pages=8)
    prepared = decode.prepare_decode_run(**paged(args), plan=_plan(ws, [0, 2, 3], [5, 16]))
    plan = _plan(ws, [0, 1, 2, 3], [4, 4, 4])  # batch 3: the packed q / out / indptr are for batch 2
    with pytest.raises(ValueError, match=r"^plan: made for RunContext\(.*batch 3.*prepared for .*batch 2"):
        prepared.run(plan)
    # other settings (another head count) on the same workspace: refused the same way
    other = fi_ffi.batch_decode_plan(host([0, 2, 3]), None, None, 16, 8, D, PAGE, workspace=ws)
    with pytest.raises(ValueError, match=r"^plan: made for RunContext\("):
        prepared.run(other)
    assert probe.seen == []
    good = _plan(ws, [0, 2, 4], [3, 3])
    ordinary, packed = _both(probe, prepared, good, args)
    assert packed == ordinary and _info_handle(packed) == good._info.handle


def test_every_refusal_names_the_argument_with_batch_decode_runs_words(probe, make_array):
    ws = workspace()
    args = decode_run_args(batch=2, pages=4)
    prepared = decode.prepare_decode_run(**paged(args), plan=_plan(ws, [0, 2, 3], [5, 16]))

    def same_refusal(plan, error, pattern):
        with pytest.raises(error, match=pattern) as packed:
            prepared.run(plan)
        with pytest.raises(error) as ordinary:
            decode.batch_decode_run(**paged(args), plan=plan)
        assert str(packed.value) == str(ordinary.value)

    same_refusal(None, TypeError, "^plan: expected a Plan from batch_decode_plan, got NoneType")
    same_refusal(prefill_plan(make_array, ws=workspace()), ValueError, "^plan: expected a batch_decode plan")
    same_refusal(prefill_plan(make_array, ws=ws), ValueError, "^plan: expected a batch_decode plan")  # current on ws
    released = _plan(ws, [0, 2, 3], [5, 16])
    released.release()
    same_refusal(released, ValueError, "^plan: has been released")
    long = _plan(ws, [0, 2, 5], [5, 16])  # 5 pages, kv_indices holds 4
    same_refusal(long, ValueError, "^kv_indices: the plan's kv_indptr ends at 5 pages, but kv_indices has 4 entries")
    stale = _plan(ws, [0, 1, 2], [5, 16])
    _plan(ws, [0, 1, 2], [5, 16])
    same_refusal(stale, ValueError, "^plan: is stale")
    # what the packing fixed: the workspace, the settings and batch size, no ALiBi slopes
    with pytest.raises(ValueError, match="^plan: made on another workspace than the run was prepared with"):
        prepared.run(_plan(workspace(), [0, 2, 3], [5, 16]))
    current = _plan(ws, [0, 2, 3], [5, 16])
    with_alibi = decode.Plan.make(
        make_array(0), ws, ws._generation, current._s, 2, 2, 3, (None, None, fake_cuda((HQ,), "float32"))
    )
    with pytest.raises(ValueError, match="^plan: has ALiBi slopes"):
        prepared.run(with_alibi)
    assert probe.seen == []
    # after every refusal the next good call hands over the ordinary run's frame
    good = _plan(ws, [0, 1, 3], [7, 8])
    ordinary, packed = _both(probe, prepared, good, args)
    assert packed == ordinary and _info_handle(packed) == good._info.handle


def test_preparing_checks_as_the_run_does(probe):
    ws = workspace()
    plan = _plan(ws, [0, 2, 3], [5, 16])
    args = decode_run_args(batch=2, pages=4)

    def same_refusal(error, pattern, **over):
        bad = {**args, **over}
        with pytest.raises(error, match=pattern) as packed:
            decode.prepare_decode_run(**paged(bad), plan=plan)
        with pytest.raises(error) as ordinary:
            decode.batch_decode_run(**paged(bad), plan=plan)
        assert str(packed.value) == str(ordinary.value)

    same_refusal(ValueError, "^q: ", q=fake_cuda((3, HQ, D)))
    same_refusal(TypeError, "^out: ", out=fake_cuda((2, HQ, D), "float32"))
    same_refusal(ValueError, "^kv_indices: the plan's kv_indptr ends at 3 pages", kv_indices=fake_cuda((2,), "int32"))
    same_refusal(ValueError, "^out: ", out=args["q"])  # out over q
    with pytest.raises(TypeError, match="^plan: expected a Plan from batch_decode_plan"):
        decode.prepare_decode_run(**paged(args), plan=None)
    with pytest.raises(TypeError, match="^stream: "):
        decode.prepare_decode_run(**paged(args), plan=plan, stream="no stream")
    plan.release()
    with pytest.raises(ValueError, match="^plan: has been released"):
        decode.prepare_decode_run(**paged(args), plan=plan)
    assert probe.seen == []


def test_the_packed_run_keeps_no_plan(probe):
    import gc
    import weakref

    ws = workspace()
    args = decode_run_args(batch=2, pages=4)
    plan = _plan(ws, [0, 2, 3], [5, 16])
    info = weakref.ref(plan._info)
    prepared = decode.prepare_decode_run(**paged(args), plan=plan)
    prepared.run(plan)
    del plan
    gc.collect()
    assert info() is None  # the plan's schedule was released with the plan
    assert prepared.run is not None


def test_the_packed_run_reaches_the_real_module():
    """The packed frame passes the real module's signature check and stops at its first CUDA call."""
    array = Function.global_function("ffi.Array")
    from helpers.attention_plans import decode_plan

    plan = decode_plan(array)  # a schedule of the real length, on the real module's settings
    args = decode_run_args()
    prepared = decode.prepare_decode_run(**paged(args), plan=plan, lse=fake_cuda((2, HQ), "float32"), enable_pdl=True)
    with pytest.raises(KernelError) as packed:
        prepared.run(plan)
    assert_reached_the_kernel(packed.value)
    assert packed.value.arguments[2] == "Array" and packed.value.arguments[13] == "True"
    with pytest.raises(KernelError) as ordinary:
        decode.batch_decode_run(**paged(args), lse=fake_cuda((2, HQ), "float32"), enable_pdl=True, plan=plan)
    assert packed.value.message == ordinary.value.message
    assert packed.value.arguments == ordinary.value.arguments


def test_public_name():
    assert fi_ffi.prepare_decode_run is decode.prepare_decode_run


def test_the_launchers_prepared_run_refuses_by_name(probe, make_array):
    """Launcher.prepare_run / PreparedRun on their own: what they pack and what each call must give."""
    ws = workspace()
    plan = _plan(ws, [0, 2, 3], [5, 16])
    args = decode_run_args(batch=2, pages=4)
    s = plan._s
    values = [ws.float_buffer, ws.int_buffer, plan._info, *args.values(), None, False]
    with pytest.raises(TypeError, match=r"\.plan: only calls with one plan info"):
        s.plan.launcher.prepare_run(values, None, plan._context)  # the plan entry point has no plan info
    with pytest.raises(TypeError, match=r"\.run: expected 13 arguments, got 12"):
        s.run.launcher.prepare_run(values, None, plan._context)  # the 6 bound scalars left out, alibi_slopes missing
    with pytest.raises(ValueError, match="^alibi_slopes: a prepared run takes no ffi.Tensor"):
        s.run.launcher.prepare_run([*values, fake_cuda((HQ,), "float32")], None, plan._context)
    with pytest.raises(TypeError, match="^plan_info_vec: expected the plan info"):
        s.run.launcher.prepare_run([*values[:2], None, *values[3:], None], None, plan._context)
    call = s.run.launcher.prepare_run([*values, None], None, plan._context)
    assert call.keep[2] is None  # the plan info is not kept
    with pytest.raises(TypeError, match="^plan: expected the plan info"):
        call.run(None, plan._context)
    with pytest.raises(TypeError, match="^plan: expected the plan info"):
        call.run(5, plan._context)
    released = make_array(0)
    released.release()
    with pytest.raises(ValueError, match="^plan: the plan has been released"):
        call.run(released, plan._context)
    with pytest.raises(ValueError, match=r"^plan: made for 7, but the run was prepared for RunContext\("):
        call.run(plan._info, 7)
    assert probe.seen == []
    call.run(plan._info, plan._context)
    decode.batch_decode_run(**paged(args), plan=plan)
    assert probe.last() == probe.last()

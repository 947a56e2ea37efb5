"""GDN prefill on a real SM90 GPU against a float32 reference of the gated delta rule (gated by
FI_FFI_RUN_GPU_TESTS=1).

The reference (:func:`helpers.gdn_reference.reference`) runs the recurrence token by token in float32 (torch,
TF32 off)::

    S = alpha_t * S;  S = S + beta_t * outer(v_t - S k_t, k_t);  o_t = scale * S q_t

with S of shape [V, K] (k-last), per state head, and the GQA/GVA head mapping of the kernel's tile scheduler.
Inputs follow GDN practice: q and k L2-normalized, alpha in [0.8, 1), beta in (0.1, 0.9).

Tolerance: the kernel runs a chunked (64-token) form with float16/bfloat16 tensor-core matmuls, so errors are
measured relative to the largest reference magnitude: ``max|got - ref| <= tol * max|ref|`` with tol 1e-2 for
float16 and 3e-2 for bfloat16 (outputs are also rounded to the input dtype), for outputs and final states.
Measured on an H100: about 8e-4 (float16) and 6e-3 (bfloat16). Getting the semantics wrong costs far more: an
exponentiated gate gives NaN, the decay applied after the update or beta applied to v only ~0.1-0.2, a
modulo head mapping or a transposed (k-first) state ~1.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading

import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from fi_ffi.cuda import device
from fi_ffi.errors import UnsupportedDeviceError
from fi_ffi.ops import gdn

torch = require_torch()

pytestmark = pytest.mark.gpu

if torch.cuda.get_device_capability(0)[0] != 9:
    pytest.skip("gdn_prefill runs on SM90 (Hopper) only", allow_module_level=True)

from helpers.gdn_reference import D, Problem, assert_close, make_problem, reference, run, workspace  # noqa: E402

# (hq, hk, hv): GQA and GVA
LAYOUTS = {"gqa4:2": (4, 2, 2), "gva2:4": (2, 2, 4), "equal2": (2, 2, 2)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("options", ["none", "input_state", "alpha", "beta", "all"])
def test_gdn_matches_reference(layout: str, options: str) -> None:
    hq, hk, hv = LAYOUTS[layout]
    on = {"input_state", "alpha", "beta"} if options == "all" else {options}
    p = make_problem(
        [5, 64, 70],
        hq,
        hk,
        hv,
        seed=len(options),
        alpha="alpha" in on,
        beta="beta" in on,
        input_state="input_state" in on,
    )
    out, state = run(p, workspace())
    torch.cuda.synchronize()
    ref_out, ref_state = reference(p)
    assert_close("output", out, ref_out, torch.float16)
    assert_close("output_state", state, ref_state, torch.float16)


@pytest.mark.parametrize("layout", ["gqa4:2", "gva2:4"])
def test_gdn_bfloat16_with_explicit_scale(layout: str) -> None:
    hq, hk, hv = LAYOUTS[layout]
    p = make_problem([33, 100], hq, hk, hv, torch.bfloat16, seed=5)
    out, state = run(p, workspace(), scale=0.3)
    torch.cuda.synchronize()
    ref_out, ref_state = reference(p, scale=0.3)
    assert_close("output", out, ref_out, torch.bfloat16)
    assert_close("output_state", state, ref_state, torch.bfloat16)


def test_default_scale_is_one_over_sqrt_head_dim() -> None:
    p = make_problem([20], 2, 2, 2, seed=9)
    ws = workspace()
    default, _ = run(p, ws)
    explicit, _ = run(p, ws, scale=1.0 / math.sqrt(D))
    doubled, _ = run(p, ws, scale=2.0 / math.sqrt(D))
    torch.cuda.synchronize()
    assert torch.equal(default, explicit)
    assert_close("doubled scale", doubled, 2 * default.float(), torch.float16)


def test_gates_are_applied_as_given_not_exponentiated() -> None:
    # alpha = 0 wipes the state at every token: then o_t = scale * beta_t * v_t (k_t . q_t), exactly what the
    # reference says; an exp'd gate (exp(0) = 1) would keep the state instead.
    p = make_problem([40, 24], 2, 2, 4, seed=3)
    assert p.alpha is not None
    p.alpha.zero_()
    out, _ = run(p, workspace())
    torch.cuda.synchronize()
    assert_close("output", out, reference(p)[0], torch.float16)
    p.alpha.fill_(1.0)  # and alpha = 1 is "no decay", the same as passing no alpha
    with_ones, _ = run(p, workspace())
    p.alpha = None
    without, _ = run(p, workspace())
    torch.cuda.synchronize()
    assert_close("alpha=1 vs None", with_ones, without.float(), torch.float16)


@pytest.mark.parametrize("layout", ["gqa4:2", "gva2:4"])
def test_state_chaining_across_two_calls_equals_one_call(layout: str) -> None:
    # Split every sequence in two; the second call starts from the first call's output_state.
    hq, hk, hv = LAYOUTS[layout]
    first_lens, second_lens = [30, 64, 1], [50, 7, 80]
    whole = make_problem([a + b for a, b in zip(first_lens, second_lens, strict=True)], hq, hk, hv, seed=4)
    firsts, seconds = [], []
    start = 0
    for a, b in zip(first_lens, second_lens, strict=True):
        firsts.append(torch.arange(start, start + a))
        seconds.append(torch.arange(start + a, start + a + b))
        start += a + b
    ia, ib = torch.cat(firsts).cuda(), torch.cat(seconds).cuda()

    def part(idx: torch.Tensor, lens: list[int], init: torch.Tensor | None) -> Problem:
        assert whole.alpha is not None and whole.beta is not None
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64, device="cuda")
        return Problem(
            whole.q[idx].contiguous(),
            whole.k[idx].contiguous(),
            whole.v[idx].contiguous(),
            cu,
            whole.alpha[idx].contiguous(),
            whole.beta[idx].contiguous(),
            init,
            lens,
        )

    ws = workspace()
    one_out, one_state = run(whole, ws)
    a = part(ia, first_lens, whole.input_state)
    a_out, a_state = run(a, ws)
    b = part(ib, second_lens, a_state)
    b_out, b_state = run(b, ws)
    torch.cuda.synchronize()
    ref_out, ref_state = reference(whole)
    assert_close("one call", one_out, ref_out, torch.float16)
    assert_close("chained final state", b_state, one_state.float(), torch.float16)
    assert_close("chained final state vs reference", b_state, ref_state, torch.float16)
    assert_close("chained outputs, first half", a_out, one_out[ia].float(), torch.float16)
    assert_close("chained outputs, second half", b_out, one_out[ib].float(), torch.float16)


def test_input_state_may_be_output_state() -> None:
    p = make_problem([17, 90], 2, 2, 4, seed=6)
    assert p.input_state is not None
    ref_out, ref_state = reference(p)
    out = torch.empty(sum(p.lens), 4, D, dtype=p.q.dtype, device="cuda")
    state = p.input_state.clone()
    gdn.gdn_prefill(
        p.q,
        p.k,
        p.v,
        cu_seqlens=p.cu_seqlens,
        output=out,
        output_state=state,
        workspace=workspace(),
        initial_state=state,
        g=p.alpha,
        beta=p.beta,
    )
    torch.cuda.synchronize()
    assert_close("output", out, ref_out, torch.float16)
    assert_close("state updated in place", state, ref_state, torch.float16)


def test_writes_stay_inside_output() -> None:
    # output is a prefix view of a larger buffer; tail tiles (70 = 64 + 6 tokens) must not spill past it.
    p = make_problem([70], 2, 2, 2, seed=8, input_state=False)
    big = torch.zeros(71 * 2 * D + 4096, dtype=p.q.dtype, device="cuda")
    out = big[: 70 * 2 * D].view(70, 2, D)
    state = torch.empty(1, 2, D, D, device="cuda")
    gdn.gdn_prefill(
        p.q,
        p.k,
        p.v,
        cu_seqlens=p.cu_seqlens,
        output=out,
        output_state=state,
        workspace=workspace(),
        g=p.alpha,
        beta=p.beta,
    )
    torch.cuda.synchronize()
    assert torch.count_nonzero(big[70 * 2 * D :]) == 0
    assert_close("output", out, reference(p)[0], torch.float16)


def test_workspace_size_is_sm_count_times_128() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert gdn.gdn_workspace_size(0) == sms * 128
    assert device.sm_count(0) == sms
    assert device.compute_capability(0) == torch.cuda.get_device_capability(0)
    too_small = torch.empty(sms * 128 - 1, dtype=torch.uint8, device="cuda")
    p = make_problem([4], 2, 2, 2)
    out, state = p.outputs()
    with pytest.raises(ValueError, match="workspace: expected at least"):
        gdn.gdn_prefill(p.q, p.k, p.v, cu_seqlens=p.cu_seqlens, output=out, output_state=state, workspace=too_small)


def test_the_current_device_is_left_as_it_was() -> None:
    before = device.current_device()
    p = make_problem([8], 2, 2, 2)
    run(p, workspace())
    torch.cuda.synchronize()
    assert device.current_device() == before


TWO_SM90 = pytest.mark.skipif(
    torch.cuda.device_count() < 2 or torch.cuda.get_device_capability(1)[0] != 9, reason="needs two SM90 GPUs"
)
ONE_DEVICE = r"q is on cuda:{}, but this process already ran gdn_prefill on cuda:{}; .*runs only on the first CUDA"


def in_child(function: str) -> None:
    """Run ``test_gpu_gdn.<function>()`` in a fresh Python process (its first GDN call is the process's first)."""
    here = os.path.dirname(os.path.abspath(__file__))
    tests = os.path.dirname(here)  # helpers/ and conftest.py
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, tests, os.environ.get("PYTHONPATH")]))}
    code = f"import test_gpu_gdn as t; t.{function}(); print('child ok')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "child ok" in done.stdout, f"child failed:\n{done.stdout}\n{done.stderr}"


def problem_on_cuda1() -> tuple[Problem, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.cuda.device(1):
        p = make_problem([12, 3], 2, 2, 4, seed=2)
        out, state = p.outputs()
        return p, workspace(1), out, state


def child_first_call_on_cuda1_while_cuda0_is_current() -> None:
    """The process's first GDN call has its tensors on cuda:1 while cuda:0 is current: it runs there (cuda:1
    made current for the call, cuda:0 restored) and binds the process to cuda:1, so cuda:0 is then refused."""
    device.set_device(0)
    p, ws, out, state = problem_on_cuda1()
    gdn.gdn_prefill(
        p.q,
        p.k,
        p.v,
        cu_seqlens=p.cu_seqlens,
        output=out,
        output_state=state,
        workspace=ws,
        initial_state=p.input_state,
        g=p.alpha,
        beta=p.beta,
    )
    assert device.current_device() == 0
    torch.cuda.synchronize(1)
    with torch.cuda.device(1):
        ref_out, ref_state = reference(p)
    assert_close("output", out, ref_out, torch.float16)
    assert_close("output_state", state, ref_state, torch.float16)
    p0 = make_problem([8], 2, 2, 2)  # on cuda:0
    out0, state0 = p0.outputs()
    with pytest.raises(UnsupportedDeviceError, match=ONE_DEVICE.format(0, 1)):
        gdn.gdn_prefill(
            p0.q, p0.k, p0.v, cu_seqlens=p0.cu_seqlens, output=out0, output_state=state0, workspace=workspace(0)
        )
    torch.cuda.synchronize(0)
    assert torch.isnan(out0).all() and torch.isnan(state0).all()  # refused before any launch
    assert device.current_device() == 0


def child_concurrent_first_calls_bind_one_device() -> None:
    """Two threads make the process's first GDN calls at once, on cuda:0 and cuda:1: exactly one runs (and
    binds its device); the other is refused by name, before a launch."""
    p1, ws1, out1, state1 = problem_on_cuda1()
    p0 = make_problem([12, 3], 2, 2, 4, seed=2)
    ws0 = workspace(0)
    out0, state0 = p0.outputs()
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    cases = {0: (p0, ws0, out0, state0), 1: (p1, ws1, out1, state1)}
    outcome: dict[int, BaseException | None] = {}
    barrier = threading.Barrier(2)

    def call(ordinal: int) -> None:
        p, ws, out, state = cases[ordinal]
        barrier.wait()
        try:
            gdn.gdn_prefill(
                p.q,
                p.k,
                p.v,
                cu_seqlens=p.cu_seqlens,
                output=out,
                output_state=state,
                workspace=ws,
                initial_state=p.input_state,
                g=p.alpha,
                beta=p.beta,
            )
            outcome[ordinal] = None
        except BaseException as exc:
            outcome[ordinal] = exc

    threads = [threading.Thread(target=call, args=(ordinal,)) for ordinal in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    winners = [ordinal for ordinal, exc in outcome.items() if exc is None]
    assert len(outcome) == 2 and len(winners) == 1, outcome
    won, lost = winners[0], 1 - winners[0]
    assert gdn._bound_device == won
    assert isinstance(outcome[lost], UnsupportedDeviceError), repr(outcome[lost])
    assert re.search(ONE_DEVICE.format(lost, won), str(outcome[lost])), str(outcome[lost])
    p, ws, out, state = cases[won]
    torch.cuda.synchronize(won)
    with torch.cuda.device(won):
        ref_out, ref_state = reference(p)
        again_out, again_state = p.outputs()
    # the same call again from the main thread, for the failure message: tells a wrong first call from a wrong device
    gdn.gdn_prefill(
        p.q,
        p.k,
        p.v,
        cu_seqlens=p.cu_seqlens,
        output=again_out,
        output_state=again_state,
        workspace=ws,
        initial_state=p.input_state,
        g=p.alpha,
        beta=p.beta,
    )
    torch.cuda.synchronize(won)
    errors = {
        name: (got.float() - ref).abs().max().item()
        for name, got, ref in (("first", out, ref_out), ("again", again_out, ref_out))
    }
    print(f"winner cuda:{won}, max |output - reference|: {errors}, max |reference| {ref_out.abs().max().item():.3e}")
    assert_close("output", out, ref_out, torch.float16)
    assert_close("output_state", state, ref_state, torch.float16)
    torch.cuda.synchronize(lost)
    assert torch.isnan(cases[lost][2]).all()


@TWO_SM90
def test_q_on_another_device_is_made_current_for_the_call_and_restored() -> None:
    in_child("child_first_call_on_cuda1_while_cuda0_is_current")


@TWO_SM90
def test_concurrent_first_calls_on_two_devices_bind_exactly_one() -> None:
    in_child("child_concurrent_first_calls_bind_one_device")


@TWO_SM90
def test_a_second_device_is_refused_by_name_before_the_launch() -> None:
    """FlashInfer 0.6.3's kernel runs only on the first device it ran on in a process: after cuda:0 (this
    process's first GDN device, as the tests above ran there), cuda:1 is refused, naming both, and nothing runs."""
    p0 = make_problem([8], 2, 2, 2)
    ref0 = reference(p0)
    run(p0, workspace())
    assert gdn._bound_device == 0
    device.set_device(0)
    p, ws, out, state = problem_on_cuda1()
    with pytest.raises(UnsupportedDeviceError, match=ONE_DEVICE.format(1, 0)):
        gdn.gdn_prefill(
            p.q,
            p.k,
            p.v,
            cu_seqlens=p.cu_seqlens,
            output=out,
            output_state=state,
            workspace=ws,
            initial_state=p.input_state,
        )
    torch.cuda.synchronize(1)
    assert torch.isnan(out).all() and torch.isnan(state).all()
    assert device.current_device() == 0
    out0, state0 = run(p0, workspace())  # cuda:0 still runs
    torch.cuda.synchronize()
    assert_close("output", out0, ref0[0], torch.float16)
    assert_close("output_state", state0, ref0[1], torch.float16)


def test_a_non_sm90_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same check that guards real non-Hopper GPUs, fed a cached capability of 8.0. The launcher remembers
    # validated layouts (the device is part of them), so this uses a layout no other test runs.
    monkeypatch.setitem(device._properties, 0, device.properties(0)._replace(compute_capability=(8, 0)))
    p = make_problem([3, 1], 6, 3, 3, input_state=False)
    out, state = p.outputs()
    with pytest.raises(UnsupportedDeviceError, match=r"cuda:0 has compute capability 8\.0"):
        gdn.gdn_prefill(p.q, p.k, p.v, cu_seqlens=p.cu_seqlens, output=out, output_state=state, workspace=workspace())

"""GDN prefill stress suite (the cases flashinfer-rs runs for this kernel), gated by FI_FFI_RUN_GPU_TESTS=1.

Every case runs in a worker thread under a 60 s watchdog: a case that does not finish fails with
"HANG DETECTED: <case>" instead of blocking the run (the worker is a daemon thread; a truly hung GPU still
needs the process to be killed). Each case synchronizes inside the worker and checks its results against the
float32 reference of ``helpers.gdn_reference`` (the tolerances of ``test_gpu_gdn``), or, where several launches
compute the same thing, also checks that they agree with a single-stream run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from fi_ffi.ops import gdn

torch = require_torch()

if torch.cuda.get_device_capability(0)[0] != 9:
    pytest.skip("gdn_prefill runs on SM90 (Hopper) only", allow_module_level=True)

from helpers.gdn_reference import Problem, assert_close, make_problem, reference, run, workspace  # noqa: E402

pytestmark = pytest.mark.gpu

WATCHDOG_S = 60.0


def watchdog(case: str, body: Callable[[], None], timeout: float = WATCHDOG_S) -> None:
    """Run ``body`` in a worker thread; fail with HANG DETECTED if it has not finished after ``timeout`` s."""
    outcome: list[BaseException] = []

    def worker() -> None:
        try:
            torch.cuda.set_device(0)
            body()
            torch.cuda.synchronize()
        except BaseException as exc:  # re-raised in the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=worker, name=f"gdn-stress-{case}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"HANG DETECTED: {case} (no result after {timeout:.0f} s)")
    if outcome:
        raise outcome[0]


def check(p: Problem, out: torch.Tensor, state: torch.Tensor, *, scale: float | None = None, what: str = "") -> None:
    ref_out, ref_state = reference(p, scale=scale)
    assert_close(f"{what} output", out, ref_out, p.q.dtype)
    assert_close(f"{what} output_state", state, ref_state, p.q.dtype)


def test_mixed_lengths_around_the_64_token_tile() -> None:
    def body() -> None:
        for i, (hq, hk, hv) in enumerate([(4, 2, 2), (2, 2, 4)]):
            p = make_problem([1, 63, 64, 65, 127, 128, 129, 2, 192], hq, hk, hv, seed=100 + i)
            out, state = run(p, workspace())
            torch.cuda.synchronize()
            check(p, out, state, what=f"heads {hq}/{hk}/{hv}")

    watchdog("mixed sequence lengths around the 64-token tile", body)


def test_many_single_token_sequences() -> None:
    def body() -> None:
        p = make_problem([1] * 256, 2, 2, 4, seed=101)
        out, state = run(p, workspace())
        torch.cuda.synchronize()
        check(p, out, state)

    watchdog("256 single-token sequences", body)


def test_fifty_back_to_back_async_launches_without_sync() -> None:
    def body() -> None:
        problems = [make_problem([37, 64, 5, 100], 2, 2, 4, seed=200 + i, input_state=False) for i in range(5)]
        ws = workspace()
        torch.cuda.synchronize()
        results = [run(problems[i % 5], ws) for i in range(50)]  # no sync in between
        torch.cuda.synchronize()
        for i, p in enumerate(problems):
            check(p, *results[i], what=f"launch {i}")
        for i in range(5, 50):  # every repeat of a problem computed exactly the same thing
            assert torch.equal(results[i][0], results[i % 5][0]), f"launch {i} output differs from launch {i % 5}"
            assert torch.equal(results[i][1], results[i % 5][1]), f"launch {i} state differs from launch {i % 5}"

    watchdog("50 back-to-back async launches (GVA, alpha and beta)", body)


@pytest.mark.parametrize("layout", [(8, 2, 2), (2, 2, 8)], ids=["gqa", "gva"])
def test_all_options(layout: tuple[int, int, int]) -> None:
    def body() -> None:
        p = make_problem([10, 64, 77], *layout, seed=300)
        out, state = run(p, workspace(), scale=0.05)
        torch.cuda.synchronize()
        check(p, out, state, scale=0.05)

    watchdog(f"all options, heads {layout}", body)


def chain(
    problems: list[Problem],
    ws: torch.Tensor,
    stream: torch.cuda.Stream | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``problems`` in order, each starting from the previous one's output_state (no sync)."""
    results = []
    state = problems[0].input_state
    for p in problems:
        out, new_state = p.outputs()
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())  # the NaN fill above runs on the current stream
        gdn.gdn_prefill(
            p.q,
            p.k,
            p.v,
            cu_seqlens=p.cu_seqlens,
            output=out,
            output_state=new_state,
            workspace=ws,
            initial_state=state,
            g=p.alpha,
            beta=p.beta,
            stream=stream,
        )
        results.append((out, new_state))
        state = new_state
    return results


def check_chain(problems: list[Problem], results: list[tuple[torch.Tensor, torch.Tensor]], what: str) -> None:
    state = problems[0].input_state
    for i, (p, (out, new_state)) in enumerate(zip(problems, results, strict=True)):
        ref_out, ref_state = reference(p, input_state=state, use_input_state=state is not None)
        assert_close(f"{what} step {i} output", out, ref_out, p.q.dtype)
        assert_close(f"{what} step {i} state", new_state, ref_state, p.q.dtype)
        state = ref_state  # the reference carries its own state, so errors would accumulate visibly


def test_twenty_step_state_chain_with_gates() -> None:
    def body() -> None:
        problems = [make_problem([8, 3], 16, 16, 32, seed=400 + i, input_state=(i == 0)) for i in range(20)]
        results = chain(problems, workspace())
        torch.cuda.synchronize()
        check_chain(problems, results, "chain")

    watchdog("20-step state chain with gates (q=k=16, v=32)", body)


def test_four_concurrent_streams_mixed_gqa_and_gva() -> None:
    def body() -> None:
        layouts = [(4, 2, 2), (2, 2, 4), (8, 4, 4), (4, 4, 8)]
        problems = [make_problem([40, 70, 9], *layout, seed=500 + i) for i, layout in enumerate(layouts)]
        streams = [torch.cuda.Stream() for _ in layouts]
        spaces = [workspace() for _ in layouts]  # concurrent launches need distinct workspaces
        torch.cuda.synchronize()
        results: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layouts]
        for _ in range(5):
            for i, p in enumerate(problems):
                results[i].append(run(p, spaces[i], stream=streams[i]))
        torch.cuda.synchronize()
        for i, p in enumerate(problems):
            check(p, *results[i][0], what=f"stream {i}")
            for j in range(1, 5):
                assert torch.equal(results[i][j][0], results[i][0][0]), f"stream {i} launch {j} differs"
                assert torch.equal(results[i][j][1], results[i][0][1]), f"stream {i} launch {j} state differs"

    watchdog("4 concurrent streams, mixed GQA/GVA", body)


@pytest.mark.parametrize("ratio", [(4, 1), (6, 2), (8, 2), (8, 4), (16, 4)], ids=lambda r: f"{r[0]}:{r[1]}")
def test_gqa_head_ratios(ratio: tuple[int, int]) -> None:
    hq, hkv = ratio

    def body() -> None:
        p = make_problem([20, 65], hq, hkv, hkv, seed=600 + hq + hkv)
        out, state = run(p, workspace())
        torch.cuda.synchronize()
        check(p, out, state)

    watchdog(f"GQA {hq}:{hkv}", body)


@pytest.mark.parametrize("ratio", [(1, 2), (2, 4), (4, 8), (16, 32)], ids=lambda r: f"{r[0]}:{r[1]}")
def test_gva_head_ratios(ratio: tuple[int, int]) -> None:
    hqk, hv = ratio

    def body() -> None:
        p = make_problem([20, 65], hqk, hqk, hv, seed=700 + hv)
        out, state = run(p, workspace())
        torch.cuda.synchronize()
        check(p, out, state)

    watchdog(f"GVA {hqk}:{hv}", body)


def test_single_token_sequences_plus_one_long_sequence() -> None:
    def body() -> None:
        p = make_problem([1] * 32 + [1024] + [1] * 32, 2, 2, 4, seed=800)
        out, state = run(p, workspace())
        torch.cuda.synchronize()
        check(p, out, state)

    watchdog("64 single-token sequences plus one of 1024 tokens", body)


def test_bfloat16_gva_all_options() -> None:
    def body() -> None:
        p = make_problem([3, 64, 129], 4, 4, 8, torch.bfloat16, seed=900)
        out, state = run(p, workspace(), scale=0.1)
        torch.cuda.synchronize()
        check(p, out, state, scale=0.1)

    watchdog("bfloat16 GVA, all options", body)


def test_production_configuration() -> None:
    # Qwen3-Next style: GVA q=k=16, v=32 heads, alpha and beta, state chained over prefill chunks, four
    # independent request batches on four concurrent streams (each with its own workspace). Every stream's
    # chain is checked against the reference and against the same chain run alone on the default stream.
    def body() -> None:
        chains = [
            [make_problem([48, 80, 1], 16, 16, 32, seed=1000 + 10 * s + i, input_state=(i == 0)) for i in range(4)]
            for s in range(4)
        ]
        streams = [torch.cuda.Stream() for _ in chains]
        spaces = [workspace() for _ in chains]
        torch.cuda.synchronize()
        concurrent = [chain(problems, spaces[s], streams[s]) for s, problems in enumerate(chains)]
        torch.cuda.synchronize()
        for s, problems in enumerate(chains):
            alone = chain(problems, spaces[s])
            torch.cuda.synchronize()
            for i, ((out, state), (out1, state1)) in enumerate(zip(concurrent[s], alone, strict=True)):
                assert torch.equal(out, out1), f"stream {s} step {i}: output differs from the single-stream run"
                assert torch.equal(state, state1), f"stream {s} step {i}: state differs from the single-stream run"
            check_chain(problems, concurrent[s], f"stream {s}")

    watchdog("production: GVA 16/16/32, gates, state chain, 4 concurrent streams", body)

"""Grouped (segment) GEMM on a real GPU against float32 torch (gated by FI_FFI_RUN_GPU_TESTS=1; the model-family
test wheel staged beside the core wheel; the generic ``gemm`` module also needs the ``nvidia-cublas`` wheel).

Reference: per segment ``x[rows].float() @ W.float().T`` (column-major weights) or ``@ W.float()`` (row-major), on
the dtype-rounded inputs (FP8 inputs: their float8 values). Outputs have magnitude ~1 (weights scaled by
``1/sqrt(d_in)``); tolerances absolute and relative: float16 1e-2, bfloat16 3e-2 (one rounding of the result,
float32 accumulation in a different order). Rows of empty segments do not exist; rows of other segments must
all be written (``out`` starts as NaN for the SM90 module, zero for the generic one, which adds into ``out``).
"""

from __future__ import annotations

import os

import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import numpy as np

import fi_ffi
from fi_ffi.errors import LibraryLoadError
from fi_ffi.ops.segment_gemm import prepare_segment_gemm, segment_gemm_args_bytes

torch = require_torch()

# models_modules skips naming the model-family wheel when its modules are not pinned
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("models_modules")]
TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def ws():  # type: ignore[no-untyped-def]
    with fi_ffi.Workspace.allocate(0) as w:
        yield w


def reference(x: torch.Tensor, w: torch.Tensor, indptr: list[int], widx: list[int], column_major: bool) -> torch.Tensor:
    d_out = w.shape[1] if column_major else w.shape[2]
    out = torch.zeros(x.shape[0], d_out, dtype=torch.float32, device=x.device)
    for i in range(len(indptr) - 1):
        a, b = indptr[i], indptr[i + 1]
        if a == b:
            continue
        W = w[widx[i]].float()
        out[a:b] = x[a:b].float() @ (W.T if column_major else W)
    return out


def backend_or_skip(backend: str) -> None:
    if backend == "sm90" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the gemm_sm90 module runs on SM 9.x only")


SEGMENTS = {
    "uneven_and_empty": [5, 0, 17, 1, 0, 64, 3],
    "one": [40],
    "many_small": [1] * 12 + [0] * 4 + [2] * 6,
}


@pytest.mark.parametrize("backend", ["sm90", "sm80"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("column_major", [True, False])
@pytest.mark.parametrize("segments", sorted(SEGMENTS))
@pytest.mark.parametrize("indexed", [False, True])
def test_segment_gemm_matches_float32(
    ws: fi_ffi.Workspace, backend: str, dtype: torch.dtype, column_major: bool, segments: str, indexed: bool
) -> None:
    backend_or_skip(backend)
    lens = SEGMENTS[segments]
    torch.manual_seed(len(lens))
    # without weight_indices segment i uses weights[i] (upstream's rule, empty segments keeping their number):
    # one matrix per segment; with them, 5 matrices shared by the segments
    d_in, d_out, num_w = 256, 384, 5 if indexed else len(lens)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    rows = int(indptr[-1])
    x = torch.randn(rows, d_in, device="cuda").to(dtype)
    shape = (num_w, d_out, d_in) if column_major else (num_w, d_in, d_out)
    w = (torch.randn(shape, device="cuda") / d_in**0.5).to(dtype)
    widx = [int(v) for v in np.random.default_rng(1).integers(0, num_w, len(lens))] if indexed else None
    fill = 0.0 if backend == "sm80" else float("nan")  # the generic module adds into out
    out = torch.full((rows, d_out), fill, dtype=dtype, device="cuda")
    try:
        got = fi_ffi.segment_gemm(
            x,
            w,
            len(lens),
            column_major,
            out,
            workspace=ws,
            seg_indptr=indptr,
            weight_indices=widx,
            backend=backend,
        )
    except LibraryLoadError as exc:
        pytest.skip(f"the generic gemm module needs cuBLAS: {exc}")
    assert got is out
    torch.cuda.synchronize()
    want = reference(x, w, indptr.tolist(), widx or list(range(len(lens))), column_major)
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_fp8_inputs_with_a_bfloat16_out(ws: fi_ffi.Workspace) -> None:
    backend_or_skip("sm90")
    lens = [7, 0, 33, 128]
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    rows, d_in, d_out = int(indptr[-1]), 256, 256
    x = torch.randn(rows, d_in, device="cuda").to(torch.float8_e4m3fn)
    w = (torch.randn(4, d_out, d_in, device="cuda") / d_in**0.5).to(torch.float8_e4m3fn)
    out = torch.full((rows, d_out), float("nan"), dtype=torch.bfloat16, device="cuda")
    fi_ffi.segment_gemm(x, w, 4, True, out, workspace=ws, seg_lens=lens, backend="sm90")
    torch.cuda.synchronize()
    want = reference(x, w, indptr.tolist(), [0, 1, 2, 3], True)
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


def test_back_to_back_calls_on_one_workspace_and_cupy_arrays(ws: fi_ffi.Workspace) -> None:
    """Each call restages the argument arrays (the pinned buffer is reused only after the last copy read it)."""
    cp = pytest.importorskip("cupy")
    backend_or_skip("sm90")
    rng = np.random.default_rng(0)
    d = 128
    results = []
    wants = []
    for _ in range(6):
        lens = rng.integers(0, 20, 8).tolist()
        indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        x = cp.asarray(rng.standard_normal((int(indptr[-1]), d)).astype(np.float16))
        w = cp.asarray((rng.standard_normal((8, d, d)) / d**0.5).astype(np.float16))
        out = cp.empty((int(indptr[-1]), d), cp.float16)
        fi_ffi.segment_gemm(x, w, 8, True, out, workspace=ws, seg_indptr=indptr, backend="sm90")
        results.append(out)
        xs, ws_ = cp.asnumpy(x).astype(np.float32), cp.asnumpy(w).astype(np.float32)
        want = np.zeros((int(indptr[-1]), d), np.float32)
        for i in range(8):
            want[indptr[i] : indptr[i + 1]] = xs[indptr[i] : indptr[i + 1]] @ ws_[i].T
        wants.append(want)
    cp.cuda.Device().synchronize()
    for got, want in zip(results, wants, strict=True):
        np.testing.assert_allclose(cp.asnumpy(got).astype(np.float32), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", ["sm90", "sm80"])
def test_a_prepared_gemm_computes_the_rows_written_into_its_problem_sizes(ws: fi_ffi.Workspace, backend: str) -> None:
    """Lowering each problem's m on the device (0 included) between launches: the first m rows of each segment are
    the product, the segment's other rows of out keep what they held (a sentinel), in direct launches and in a
    CUDA graph replayed after the sizes changed."""
    backend_or_skip(backend)
    segs, cap, d_in, d_out = 6, 16, 128, 256
    torch.manual_seed(3)
    x = torch.randn(segs * cap, d_in, device="cuda").to(torch.float16)
    w = (torch.randn(segs, d_out, d_in, device="cuda") / d_in**0.5).to(torch.float16)
    sentinel = -7.0
    out = torch.full((segs * cap, d_out), sentinel, dtype=torch.float16, device="cuda")
    args = torch.zeros(segment_gemm_args_bytes(segs), dtype=torch.uint8, device="cuda")
    try:
        gemm = prepare_segment_gemm(
            x, w, segs, True, out, workspace=ws, args_buffer=args, seg_lens=[cap] * segs, backend=backend
        )
    except LibraryLoadError as exc:
        pytest.skip(f"the generic gemm module needs cuBLAS: {exc}")
    assert gemm.count == segs and gemm.prepared_rows.tolist() == [cap] * segs
    off = gemm.problem_sizes.data_ptr - args.data_ptr()
    problems = args[off : off + 12 * segs].view(torch.int32).view(segs, 3)
    assert problems.tolist() == [[cap, d_out, d_in]] * segs
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        gemm(stream.cuda_stream)  # warm-up outside the capture
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            gemm(stream.cuda_stream)
    full = (x.float().view(segs, cap, d_in) @ w.float().transpose(1, 2)).view(segs * cap, d_out)
    for rows_each, replay in (([3, 0, cap, 1, 0, 9], False), ([0, 5, 0, 0, cap, 2], True)):
        out.fill_(sentinel if backend == "sm90" else 0.0)  # the generic module adds into out
        problems[:, 0] = torch.tensor(rows_each, dtype=torch.int32, device="cuda")
        torch.cuda.synchronize()
        if replay:
            graph.replay()
        else:
            gemm(stream.cuda_stream)
        torch.cuda.synchronize()
        for s, m in enumerate(rows_each):
            seg = out[s * cap : (s + 1) * cap].float()
            torch.testing.assert_close(seg[:m], full[s * cap : s * cap + m], atol=1e-2, rtol=1e-2)
            untouched = sentinel if backend == "sm90" else 0.0
            assert bool((seg[m:] == untouched).all()), f"segment {s}: rows past m={m} were written"


# ---- bad pointers after a warm call: refused before anything is staged, the context alive ------------------------

# The child: a valid call (warm), then the same layout with x at NULL or 2 bytes off its 16-byte alignment (the
# pointers go into the device argument arrays, where no launcher check sees them: a launch would read address 0 or
# misaligned rows and kill the context), then a valid call again, compared with a float32 reference after a device
# synchronize. It prints one JSON line.
POINTER_CHILD = r"""
import json, sys
import numpy as np
import torch
import fi_ffi

case = sys.argv[1]
torch.manual_seed(0)
lens = [5, 0, 17, 3]
indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
rows, d_in, d_out = int(indptr[-1]), 128, 256
raw = torch.zeros(rows * d_in + 64, dtype=torch.bfloat16, device="cuda")  # room for x 2 bytes further in
x = raw[:rows * d_in].view(rows, d_in)
x.copy_(torch.randn(rows, d_in, device="cuda").to(torch.bfloat16))
w = (torch.randn(4, d_out, d_in, device="cuda") / d_in**0.5).to(torch.bfloat16)
out = torch.zeros(rows, d_out, dtype=torch.bfloat16, device="cuda")  # zero: the generic module adds into out
result = {"error": None}
with fi_ffi.Workspace.allocate(0) as ws:
    def call(x_arg):
        out.zero_()
        return fi_ffi.segment_gemm(x_arg, w, 4, True, out, seg_indptr=indptr, workspace=ws)
    call(x)  # warm
    torch.cuda.synchronize()
    if case == "null":
        bad = fi_ffi.Tensor.from_pointer(0, (rows, d_in), "bfloat16", 0)
    else:
        bad = fi_ffi.Tensor.from_pointer(x.data_ptr() + 2, (rows, d_in), "bfloat16", 0, owner=raw)
    try:
        call(bad)
    except ValueError as err:
        result["error"] = str(err)
    call(x)
    torch.cuda.synchronize()
    want = torch.zeros(rows, d_out, dtype=torch.float32, device="cuda")
    for i in range(len(lens)):
        a, b = int(indptr[i]), int(indptr[i + 1])
        if a < b:
            want[a:b] = x[a:b].float() @ w[i].float().T
    result["max_abs_error_after"] = float((out.float() - want).abs().max())
    result["max_abs_want"] = float(want.abs().max())
print(json.dumps(result))
"""


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("null", r"^x: data pointer is NULL"),
        ("misaligned", r"^x: data pointer 0x[0-9a-f]+ must be aligned to 16 bytes"),
    ],
)
def test_a_bad_pointer_after_a_warm_segment_gemm_is_refused_and_the_context_lives(case: str, message: str) -> None:
    """Tolerance of the valid call after the bad one: 3e-2 absolute on outputs of magnitude ~1 (bfloat16 output,
    float32 accumulation), as test_segment_gemm_matches_float32."""
    import json
    import re
    import subprocess
    import sys

    from helpers.env import subprocess_env

    done = subprocess.run(
        [sys.executable, "-c", POINTER_CHILD, case], capture_output=True, text=True, timeout=300, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and re.search(message, result["error"]), result
    assert result["max_abs_want"] > 0.1, result  # the reference is not trivially zero
    assert result["max_abs_error_after"] < 3e-2, result

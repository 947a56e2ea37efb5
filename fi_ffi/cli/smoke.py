"""``fi-ffi smoke``: run each available op once on small inputs, on the GPU, against a numpy reference.

Written with cuda-python only (no torch), as a runtime would use fi_ffi: device memory from ``cudaMalloc``,
descriptors from raw pointers, one non-blocking stream. Each check prints pass/fail, the largest error and the
host time per call (mean over repeated asynchronous calls, measured after a warm-up).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..tensor.descriptor import Tensor


@dataclass
class SmokeResult:
    """Outcome of one check: ``max_error`` against the reference, ``host_us`` per call (host time)."""

    name: str
    passed: bool
    max_error: float
    host_us: float
    detail: str = ""


class Device:
    """Device memory and one stream on GPU ``ordinal``, freed on :meth:`close` (cuda.bindings runtime)."""

    def __init__(self, ordinal: int = 0) -> None:
        from ..cuda import runtime as cuda_runtime

        rt = cuda_runtime.runtime()
        self.rt = rt
        self.ordinal = ordinal
        self._check(rt.cudaSetDevice(ordinal), f"cudaSetDevice({ordinal})")
        self.stream = self._check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self.stream_handle = int(self.stream)
        self._allocations: list[int] = []

    @staticmethod
    def _check(result: Any, what: str) -> Any:
        """:func:`fi_ffi.cuda.runtime.check`: the value(s), or :class:`~fi_ffi.errors.CudaError` naming ``what``."""
        from ..cuda import runtime as cuda_runtime

        return cuda_runtime.check(result, what)

    def upload(self, host: np.ndarray, dtype: str | None = None) -> Tensor:
        """Copy ``host`` to new device memory; returns a contiguous descriptor (dtype defaults to host's)."""
        host = np.ascontiguousarray(host)
        ptr = self._check(self.rt.cudaMalloc(max(host.nbytes, 1)), f"cudaMalloc({max(host.nbytes, 1)})")
        self._allocations.append(int(ptr))
        self._check(
            self.rt.cudaMemcpy(
                int(ptr),
                host.__array_interface__["data"][0],
                host.nbytes,
                self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
            ),
            "cudaMemcpy H2D",
        )
        return Tensor.from_pointer(int(ptr), host.shape, dtype or host.dtype.name, self.ordinal)

    def download(self, t: Tensor, np_dtype: Any) -> np.ndarray:
        """Copy a contiguous device tensor back to a new numpy array (after synchronizing the stream)."""
        self.sync()
        out = np.empty(t.shape, dtype=np_dtype)
        self._check(
            self.rt.cudaMemcpy(
                out.__array_interface__["data"][0],
                t.data_ptr,
                out.nbytes,
                self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
            ),
            "cudaMemcpy D2H",
        )
        return out

    def sync(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for ptr in self._allocations:
            self.rt.cudaFree(ptr)
        self._allocations.clear()
        self.rt.cudaStreamDestroy(self.stream)


def host_time_us(fn: Callable[[], Any], calls: int = 2000) -> float:
    """Mean host time of one call of ``fn`` in microseconds, after 50 warm-up calls."""
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _rms_reference(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    return x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps) * w32


def check_rmsnorm(dev: Device) -> SmokeResult:
    from ..ops.norm import rmsnorm

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 512)).astype(np.float16), rng.standard_normal(512).astype(np.float16)
    xd, wd, od = dev.upload(x), dev.upload(w), dev.upload(np.zeros_like(x))
    rmsnorm(xd, wd, out=od, eps=1e-6, stream=dev.stream_handle)
    err = float(np.max(np.abs(dev.download(od, np.float16).astype(np.float32) - _rms_reference(x, w, 1e-6))))
    us = host_time_us(lambda: rmsnorm(xd, wd, out=od, eps=1e-6, stream=dev.stream_handle))
    return SmokeResult("rmsnorm f16 [8, 512]", err < 1e-2, err, us)


def check_fused_add_rmsnorm(dev: Device) -> SmokeResult:
    from ..ops.norm import fused_add_rmsnorm

    rng = np.random.default_rng(1)
    x, r = rng.standard_normal((4, 256)).astype(np.float16), rng.standard_normal((4, 256)).astype(np.float16)
    w = rng.standard_normal(256).astype(np.float16)
    xd, rd, wd = dev.upload(x), dev.upload(r), dev.upload(w)
    fused_add_rmsnorm(xd, rd, wd, stream=dev.stream_handle)
    expected = _rms_reference((x.astype(np.float32) + r.astype(np.float32)).astype(np.float16), w, 1e-6)
    err = float(np.max(np.abs(dev.download(xd, np.float16).astype(np.float32) - expected)))
    # Host time on copies so the verified buffers stay as checked.
    xc, rc = dev.upload(x), dev.upload(r)
    us = host_time_us(lambda: fused_add_rmsnorm(xc, rc, wd, stream=dev.stream_handle))
    return SmokeResult("fused_add_rmsnorm f16 [4, 256]", err < 2e-2, err, us)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    """float32 reference: q ``[n_q, Hq, d]`` over k/v ``[n_kv, Hkv, d]`` (GQA by head repetition)."""
    group = q.shape[1] // k.shape[1]
    kf = np.repeat(k.astype(np.float32), group, axis=1)
    vf = np.repeat(v.astype(np.float32), group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q.astype(np.float32), kf) / np.sqrt(q.shape[2])
    if causal:  # bottom-right aligned: query i sees keys up to n_kv - n_q + i
        n_q, n_kv = q.shape[0], k.shape[0]
        visible = np.arange(n_kv)[None, :] <= (np.arange(n_q)[:, None] + n_kv - n_q)
        scores = np.where(visible[None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, vf)


def check_append_paged_kv_cache(dev: Device) -> SmokeResult:
    from ..ops.page import append_paged_kv_cache

    pages, page, heads, d = 4, 16, 8, 128
    rng = np.random.default_rng(2)
    k_new = rng.standard_normal((3, heads, d)).astype(np.float16)
    v_new = rng.standard_normal((3, heads, d)).astype(np.float16)
    # request 0 has 15 tokens in page 2 and gets 2 more (crossing into page 0); request 1 gets its first token.
    batch_idx, positions = np.array([0, 0, 1], np.int32), np.array([15, 16, 0], np.int32)
    indices, indptr, last = np.array([2, 0, 3], np.int32), np.array([0, 2, 3], np.int32), np.array([1, 1], np.int32)
    kc, vc = (
        dev.upload(np.zeros((pages, page, heads, d), np.float16)),
        dev.upload(np.zeros((pages, page, heads, d), np.float16)),
    )
    kd, vd, bd, pd, ind, ptr, lst = (dev.upload(a) for a in (k_new, v_new, batch_idx, positions, indices, indptr, last))

    def append() -> None:
        append_paged_kv_cache(kd, vd, bd, pd, (kc, vc), ind, ptr, lst, "NHD", stream=dev.stream_handle)

    append()
    want = np.zeros((pages, page, heads, d), np.float16)
    for (page_id, slot), token in zip(((2, 15), (0, 0), (3, 0)), range(3), strict=True):
        want[page_id, slot] = k_new[token]
    got = dev.download(kc, np.float16)
    err = float(np.max(np.abs(got.astype(np.float32) - want.astype(np.float32))))
    us = host_time_us(append)
    return SmokeResult("append_paged_kv_cache f16 3 tokens", err == 0.0, err, us)


def check_batch_decode(dev: Device) -> SmokeResult:
    from ..ops.attention.decode import batch_decode_plan, batch_decode_run
    from ..ops.attention.workspace import Workspace

    hq, hk, d, page, lens = 32, 8, 128, 16, [5, 20]
    rng = np.random.default_rng(3)
    k_all = [rng.standard_normal((n, hk, d)).astype(np.float16) for n in lens]
    v_all = [rng.standard_normal((n, hk, d)).astype(np.float16) for n in lens]
    num_pages = [-(-n // page) for n in lens]
    k_cache = np.zeros((sum(num_pages), page, hk, d), np.float16)
    v_cache = np.zeros_like(k_cache)
    first = 0
    for n, pages_used, k, v in zip(lens, num_pages, k_all, v_all, strict=True):
        k_cache.reshape(-1, hk, d)[first * page : first * page + n] = k
        v_cache.reshape(-1, hk, d)[first * page : first * page + n] = v
        first += pages_used
    indptr = np.concatenate([[0], np.cumsum(num_pages)]).astype(np.int32)
    last = np.array([n - (p - 1) * page for n, p in zip(lens, num_pages, strict=True)], np.int32)
    q = rng.standard_normal((len(lens), hq, d)).astype(np.float16)
    qd, kd, vd, od = dev.upload(q), dev.upload(k_cache), dev.upload(v_cache), dev.upload(np.zeros_like(q))
    indptr_d, indices_d = dev.upload(indptr), dev.upload(np.arange(indptr[-1], dtype=np.int32))
    last_d = dev.upload(last)
    with Workspace.allocate(dev.ordinal, float_bytes=16 << 20) as ws:
        plan = batch_decode_plan(indptr, None, last, hq, hk, d, page, stream=dev.stream_handle, workspace=ws)

        def run() -> None:
            batch_decode_run(
                qd,
                (kd, vd),
                kv_indptr=indptr_d,
                kv_indices=indices_d,
                kv_last_page_len=last_d,
                out=od,
                stream=dev.stream_handle,
                plan=plan,
            )

        run()
        got = dev.download(od, np.float16).astype(np.float32)
        want = np.stack([_attention(q[b : b + 1], k_all[b], v_all[b], False)[0] for b in range(len(lens))])
        err = float(np.max(np.abs(got - want)))
        us = host_time_us(run)
        plan.release()
    return SmokeResult("batch_decode run f16 32/8 heads d128", err < 5e-3, err, us)


def check_single_prefill(dev: Device) -> SmokeResult:
    from ..ops.attention.prefill import single_prefill

    n_q, n_kv, hq, hk, d = 7, 20, 8, 8, 128
    rng = np.random.default_rng(4)
    q = rng.standard_normal((n_q, hq, d)).astype(np.float16)
    k = rng.standard_normal((n_kv, hk, d)).astype(np.float16)
    v = rng.standard_normal((n_kv, hk, d)).astype(np.float16)
    qd, kd, vd, od = dev.upload(q), dev.upload(k), dev.upload(v), dev.upload(np.zeros_like(q))
    single_prefill(qd, kd, vd, out=od, causal=True, stream=dev.stream_handle)
    err = float(np.max(np.abs(dev.download(od, np.float16).astype(np.float32) - _attention(q, k, v, True))))
    us = host_time_us(lambda: single_prefill(qd, kd, vd, out=od, causal=True, stream=dev.stream_handle))
    return SmokeResult("single_prefill causal f16 d128", err < 5e-3, err, us)


def check_gdn_prefill(dev: Device) -> SmokeResult:
    from ..cuda.device import compute_capability
    from ..ops.gdn import gdn_prefill, gdn_workspace_size

    if compute_capability(dev.ordinal)[0] != 9:
        return SmokeResult("gdn_prefill (SM90 only)", True, 0.0, float("nan"), "skipped: not an SM90 GPU")
    n, heads, d = 6, 2, 128
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((n, heads, d)).astype(np.float16) * 0.1 for _ in range(3))
    k32 = k.astype(np.float32)
    k32 /= np.linalg.norm(k32, axis=-1, keepdims=True)  # unit keys keep the delta rule well conditioned
    k = k32.astype(np.float16)
    qd, kd, vd, cu_seqlens = dev.upload(q), dev.upload(k), dev.upload(v), dev.upload(np.array([0, n], np.int64))
    out, state = dev.upload(np.zeros((n, heads, d), np.float16)), dev.upload(np.zeros((1, heads, d, d), np.float32))
    ws = dev.upload(np.zeros(gdn_workspace_size(dev.ordinal), np.uint8))
    gdn_prefill(
        qd, kd, vd, cu_seqlens=cu_seqlens, output=out, output_state=state, workspace=ws, stream=dev.stream_handle
    )
    s = np.zeros((heads, d, d), np.float32)  # state [H, V, K]
    want = np.empty((n, heads, d), np.float32)
    for t in range(n):
        kt, vt, qt = k[t].astype(np.float32), v[t].astype(np.float32), q[t].astype(np.float32)
        s = s + np.einsum("hv,hk->hvk", vt - np.einsum("hvk,hk->hv", s, kt), kt)
        want[t] = np.einsum("hvk,hk->hv", s, qt) / np.sqrt(d)
    err = float(np.max(np.abs(dev.download(out, np.float16).astype(np.float32) - want)))
    us = host_time_us(
        lambda: gdn_prefill(
            qd, kd, vd, cu_seqlens=cu_seqlens, output=out, output_state=state, workspace=ws, stream=dev.stream_handle
        ),
        calls=200,
    )
    return SmokeResult("gdn_prefill f16 6 tokens 2 heads", err < 5e-3, err, us)


CHECKS: list[Callable[[Device], SmokeResult]] = [
    check_rmsnorm,
    check_fused_add_rmsnorm,
    check_append_paged_kv_cache,
    check_batch_decode,
    check_single_prefill,
    check_gdn_prefill,
]


def check_ordinal(ordinal: int, gpus: Sequence[Any]) -> None:
    """``ValueError`` unless ``ordinal`` names one of ``gpus`` (:func:`fi_ffi.cuda.system.gpus`' list)."""
    if isinstance(ordinal, bool) or not isinstance(ordinal, int):
        raise ValueError(f"--device: expected a CUDA device ordinal (an int), got {ordinal!r}")
    ordinals = [g.ordinal for g in gpus]
    if ordinal not in ordinals:
        have = f"ordinals {ordinals[0]} to {ordinals[-1]}" if ordinals else "none"
        raise ValueError(
            f"--device {ordinal}: no such CUDA device; this machine has {len(ordinals)} visible ({have}; "
            f"CUDA_VISIBLE_DEVICES narrows them). `fi-ffi doctor` lists them"
        )


def run(ordinal: int = 0) -> list[SmokeResult]:
    """Run every check on GPU ``ordinal``; a check that raises is reported as failed with the error text.

    ``ordinal`` is checked against the visible GPUs first (:func:`check_ordinal`: ``ValueError``).
    """
    from ..cuda import system

    check_ordinal(ordinal, system.gpus()[0])
    dev = Device(ordinal)
    results = []
    try:
        for check in CHECKS:
            try:
                results.append(check(dev))
            except Exception as exc:
                name = check.__name__.removeprefix("check_")
                results.append(SmokeResult(name, False, float("nan"), float("nan"), f"{type(exc).__name__}: {exc}"))
    finally:
        dev.close()
    return results

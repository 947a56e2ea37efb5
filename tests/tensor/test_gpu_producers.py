"""Every producer on the GPU: the default stream follows the caller's framework, JAX arrays work, and nothing
fi_ffi keeps holds a caller's GPU memory after the caller drops it."""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest
from helpers.gpu import require_torch

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX must not take the GPU's memory up front
torch = require_torch()

import fi_ffi  # noqa: E402

pytestmark = pytest.mark.gpu
B, D = 4, 256


def reference(x: np.ndarray, w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    x32 = x.astype(np.float32)
    return x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + eps) * w.astype(np.float32)


def test_stream_none_runs_on_torchs_current_stream() -> None:
    # Captured in a torch CUDA graph: a kernel launched on any other stream would break the capture.
    x = torch.randn(B, D, dtype=torch.float16, device="cuda")
    w = torch.randn(D, dtype=torch.float16, device="cuda")
    out = torch.zeros_like(x)
    fi_ffi.rmsnorm(x, w, out=out)  # validate and remember the layout outside the capture
    out.zero_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fi_ffi.rmsnorm(x, w, out=out)  # stream=None: torch's current stream, the capturing one
    torch.cuda.synchronize()
    assert not out.any()  # captured, not run
    graph.replay()
    torch.cuda.synchronize()
    expected = reference(x.cpu().numpy(), w.cpu().numpy())
    np.testing.assert_allclose(out.float().cpu().numpy(), expected, atol=2e-2, rtol=2e-2)


def test_stream_none_runs_on_cupys_current_stream() -> None:
    cp = pytest.importorskip("cupy")
    x = cp.random.standard_normal((B, D)).astype(cp.float16)
    w = cp.random.standard_normal(D).astype(cp.float16)
    out = cp.zeros_like(x)
    fi_ffi.rmsnorm(x, w, out=out)
    cp.cuda.Device().synchronize()
    out[...] = 0
    s = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    with s:
        s.begin_capture()
        fi_ffi.rmsnorm(x, w, out=out)  # stream=None: CuPy's current stream, the capturing one
        graph = s.end_capture()
    cp.cuda.Device().synchronize()
    assert not bool(out.any())
    graph.launch(s)
    s.synchronize()
    np.testing.assert_allclose(
        cp.asnumpy(out).astype(np.float32), reference(cp.asnumpy(x), cp.asnumpy(w)), atol=2e-2, rtol=2e-2
    )


def test_jax_arrays_as_inputs() -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError as exc:
        pytest.skip(f"JAX has no GPU here: {exc}")
    rng = np.random.default_rng(0)
    xh = rng.standard_normal((B, D)).astype(np.float16)
    wh = rng.standard_normal(D).astype(np.float16)
    x, w = jax.device_put(jnp.asarray(xh), gpu), jax.device_put(jnp.asarray(wh), gpu)
    out = torch.zeros(B, D, dtype=torch.float16, device="cuda")  # JAX arrays are immutable: outputs elsewhere
    for _ in range(3):  # the first call takes the slow path, the others the fast one
        fi_ffi.rmsnorm(x, w, out=out)
    torch.cuda.synchronize()
    np.testing.assert_allclose(out.float().cpu().numpy(), reference(xh, wh), atol=2e-2, rtol=2e-2)
    gate_up = jax.device_put(jnp.asarray(rng.standard_normal((B, 2 * D)).astype(np.float16)), gpu)
    act = torch.zeros(B, D, dtype=torch.float16, device="cuda")
    fi_ffi.silu_and_mul(gate_up, out=act)
    torch.cuda.synchronize()
    g = np.asarray(gate_up).astype(np.float32)
    expected = g[:, :D] / (1 + np.exp(-g[:, :D])) * g[:, D:]
    np.testing.assert_allclose(act.float().cpu().numpy(), expected, atol=2e-2, rtol=2e-2)


def test_cupy_memory_is_freed_after_the_caller_drops_it() -> None:
    cp = pytest.importorskip("cupy")
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    # earlier tests' garbage (an engine in a reference cycle, say) is freed now, not by the collect below, which
    # would bring the pool under this base and fail the test for memory that was never the caller's
    gc.collect()
    pool.free_all_blocks()
    base = pool.used_bytes()
    big = cp.zeros((256 << 20) // 2, dtype=cp.float16)  # 256 MiB
    x = big[: B * D].reshape(B, D)
    w = cp.ones(D, dtype=cp.float16)
    out = big[B * D : 2 * B * D].reshape(B, D)
    fi_ffi.rmsnorm(x, w, out=out)
    fi_ffi.rmsnorm(fi_ffi.as_tensor(x), fi_ffi.as_tensor(w), out=fi_ffi.as_tensor(out))
    cp.cuda.Device().synchronize()
    assert pool.used_bytes() >= base + (256 << 20)
    del big, x, w, out
    gc.collect()
    assert pool.used_bytes() == base


def test_torch_memory_is_freed_after_the_caller_drops_it() -> None:
    torch.cuda.synchronize()
    gc.collect()  # earlier tests' garbage goes now, not under the measurement (see the CuPy test)
    base = torch.cuda.memory_allocated()
    big = torch.zeros((256 << 20) // 2, dtype=torch.float16, device="cuda")
    x, out = big[: B * D].view(B, D), big[B * D : 2 * B * D].view(B, D)
    w = torch.ones(D, dtype=torch.float16, device="cuda")
    fi_ffi.rmsnorm(x, w, out=out)
    fi_ffi.rmsnorm(fi_ffi.as_tensor(x), fi_ffi.as_tensor(w), out=fi_ffi.as_tensor(out))
    torch.cuda.synchronize()
    del big, x, w, out
    gc.collect()
    assert torch.cuda.memory_allocated() == base


def cupy_fields(t: fi_ffi.Tensor) -> tuple[object, ...]:
    return (t.data_ptr, t.shape, t.strides, t.dtype, t.device, t.ndim, t._lid, t.owner)


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8", "int32", "int64", "uint8"])
def test_the_warm_cupy_path_describes_as_dlpack(dtype: str) -> None:
    # a CuPy layout seen before is described from data.ptr and the remembered layout, no capsule;
    # every field equals DLPack's description, for strided, sliced, transposed and empty views
    cp = pytest.importorskip("cupy")
    from fi_ffi.tensor import intake

    base = cp.zeros((6, 10), dtype=dtype)
    for x in (base, base[1:4, 2:9], base.T, base[:, ::3], base[2], base[0:0], base.reshape(3, 2, 10)[:, 1]):
        full = intake._from_dlpack(x, "x", -1)
        first, warm = fi_ffi.as_tensor(x), fi_ffi.as_tensor(x)
        assert cupy_fields(first) == cupy_fields(full) == cupy_fields(warm), x
    # the remembered layouts hold values, never the arrays
    assert not any(isinstance(v, cp.ndarray) for key in intake._layouts for v in key)


# ---- JAX's fast path: a ready, single-device, row-major array without a DLPack capsule ------------------------------


def _jax_gpu():  # type: ignore[no-untyped-def]
    jax = pytest.importorskip("jax")
    try:
        return jax, jax.devices("gpu")[0]
    except RuntimeError as exc:
        pytest.skip(f"JAX has no GPU here: {exc}")


def _column_major(jax, x):  # type: ignore[no-untyped-def]
    """``x`` with JAX's non-default layout (column-major), which JAX allows on GPUs; skips where it does not."""
    try:
        from jax.experimental.layout import Format, Layout
    except ImportError:
        pytest.skip("this JAX has no jax.experimental.layout")
    try:
        y = jax.device_put(x, Format(Layout(major_to_minor=(1, 0)), x.sharding))
        y.block_until_ready()
    except Exception as exc:
        pytest.skip(f"JAX cannot place a column-major array here: {exc}")
    return y


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int32", "uint8"])
def test_the_warm_jax_path_describes_as_dlpack(dtype: str) -> None:
    """Every field of the fast description (JAX's shape, dtype, sharding and the array interface's pointer, the
    layout remembered from the first, DLPack, description) equals DLPack's, for 0-d to 3-d and empty arrays; the
    launcher's reader keys a ready row-major array by JAX's values and its pointer is DLPack's."""
    jax, gpu = _jax_gpu()
    import jax.numpy as jnp

    from fi_ffi.tensor import intake

    for shape in ((4, 256), (1, 128), (3,), (2, 3, 4), (0, 8), ()):
        x = jax.device_put(jnp.ones(shape, dtype=dtype), gpu)
        x.block_until_ready()
        full = intake._from_dlpack(x, "x", None)
        first, warm = fi_ffi.as_tensor(x), fi_ffi.as_tensor(x)
        assert cupy_fields(first) == cupy_fields(full) == cupy_fields(warm), shape
        if x.size:  # (an empty array's two pointers may differ: then it is simply not remembered)
            assert (x.shape, x.dtype, x.sharding) in intake._layouts, shape
            key, ptr = intake.read(x, None)
            assert key == (x.shape, x.dtype, x.sharding) and ptr == full.data_ptr, shape
    assert intake.producer(type(x)).read is intake._read_jax
    # JAX gives no array interface for bfloat16 (its order is then asked through format), and one for the others
    assert ((x.dtype, x.sharding) in intake._jax_without_interface) == (dtype == "bfloat16")
    # the remembered layouts hold values (shapes, dtypes, shardings), never the arrays
    assert not any(isinstance(v, jax.Array) for key in intake._layouts for v in key)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])  # bfloat16: JAX gives no array interface for it
def test_a_column_major_jax_array_is_never_taken_for_a_row_major_one(dtype: str) -> None:
    """JAX places arrays in other layouts on GPUs too: one with the same shape, dtype and sharding as a row-major
    array whose layout was remembered is still described by DLPack (its own strides), never keyed as the
    row-major one, and an op that needs a contiguous last dimension refuses it by name after a warm call.
    Tolerance as the other rmsnorm checks here: 2e-2 (float16), 5e-2 absolute (bfloat16's 8-bit mantissa)."""
    jax, gpu = _jax_gpu()
    import jax.numpy as jnp

    from fi_ffi.tensor import intake

    rng = np.random.default_rng(1)
    x = jax.device_put(jnp.asarray(rng.standard_normal((B, D)).astype(np.float32)).astype(dtype), gpu)
    xh = np.asarray(x).astype(np.float32)
    y = _column_major(jax, x)
    fi_ffi.as_tensor(x)
    assert fi_ffi.as_tensor(x).strides == (D, 1)
    ty = fi_ffi.as_tensor(y)
    assert ty.strides == (1, B) and ty.shape == (B, D)  # DLPack's description of the column-major layout
    key, _ = intake.read(y, None)
    assert key != (x.shape, x.dtype, x.sharding)  # read through DLPack: a layout id, not JAX's values
    w = jax.device_put(jnp.ones(D, dtype=dtype), gpu)
    out = torch.zeros(B, D, dtype=getattr(torch, dtype), device="cuda")
    for _ in range(2):
        fi_ffi.rmsnorm(x, w, out=out)  # warm: x's layout is keyed by JAX's values
    assert intake.read(x, None)[0] == (x.shape, x.dtype, x.sharding)
    torch.cuda.synchronize()
    tol = 2e-2 if dtype == "float16" else 5e-2
    np.testing.assert_allclose(out.float().cpu().numpy(), reference(xh, np.ones(D)), atol=tol, rtol=2e-2)
    with pytest.raises(ValueError, match=r"^input: "):
        fi_ffi.rmsnorm(y, w, out=out)
    assert (y.shape, y.dtype, y.sharding) == (x.shape, x.dtype, x.sharding)
    assert intake._layouts[(x.shape, x.dtype, x.sharding)][1] == (D, 1)


def test_a_pending_jax_array_is_ordered_before_the_kernel() -> None:
    """An array whose computation JAX has not finished is read through DLPack with the call's stream (JAX makes it
    wait for the result, without blocking the host): the kernel reads the finished values."""
    jax, gpu = _jax_gpu()
    import jax.numpy as jnp

    @jax.jit
    def slow(a):  # type: ignore[no-untyped-def]
        for _ in range(24):  # a few ms of matmuls, then the (B, D) rows
            a = jnp.tanh(a @ a) * 0.5 + a
        return a[:B, :D].astype(jnp.float16)

    a = jax.device_put(jnp.eye(4096, dtype=jnp.float32) * 0.01, gpu)
    slow(a).block_until_ready()  # compiled
    w = jax.device_put(jnp.ones(D, dtype=jnp.float16), gpu)
    out = torch.zeros(B, D, dtype=torch.float16, device="cuda")
    fi_ffi.rmsnorm(slow(a).block_until_ready(), w, out=out)  # this layout warm, on the fast path
    x = slow(a)
    pending = not x.is_ready()
    fi_ffi.rmsnorm(x, w, out=out)
    torch.cuda.synchronize()
    if not pending:
        pytest.skip("the computation finished before the call (nothing was pending to order)")
    xh = np.asarray(x)
    np.testing.assert_allclose(out.float().cpu().numpy(), reference(xh, np.ones(D)), atol=2e-2, rtol=2e-2)


def test_nothing_kept_holds_a_jax_array() -> None:
    """After fast and DLPack descriptions and launches, dropping the arrays frees their GPU memory."""
    jax, gpu = _jax_gpu()
    import jax.numpy as jnp

    stats = gpu.memory_stats
    if stats() is None:
        pytest.skip("this JAX backend reports no memory statistics")
    gc.collect()
    base = stats()["bytes_in_use"]
    big = jax.device_put(jnp.ones((64 << 20) // 2, dtype=jnp.float16), gpu)  # 64 MiB
    x = jax.device_put(jnp.ones((B, D), dtype=jnp.float16), gpu)
    w = jax.device_put(jnp.ones(D, dtype=jnp.float16), gpu)
    out = torch.zeros(B, D, dtype=torch.float16, device="cuda")
    for _ in range(3):
        fi_ffi.rmsnorm(x, w, out=out)
        fi_ffi.as_tensor(big)
    torch.cuda.synchronize()
    assert stats()["bytes_in_use"] >= base + (64 << 20)
    del big, x, w
    gc.collect()
    for _ in range(100):  # JAX may free a buffer once its last use on the GPU is done
        if stats()["bytes_in_use"] == base:
            break
        time.sleep(0.01)
    assert stats()["bytes_in_use"] == base

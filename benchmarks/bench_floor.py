"""Where a warm ``rmsnorm`` 1x128 float16 call spends its host time: the floor against each layer on top of it.

    python benchmarks/bench_floor.py [--json PATH] [-n N]

Two tables, each timed in interleaved rounds (best round kept, see timing.Report):

1. **Layers** (host us per call, a launch each): the floor, ``norm.so``'s ``rmsnorm`` called through cffi with
   a frame packed once (three pointer words written, one call, the error test: no op-layer work); the same
   call through ctypes with the GIL kept; ``PreparedCall``; the generated launcher called directly with
   descriptors, torch tensors, CuPy arrays; ``fi_ffi.rmsnorm`` with each producer (and torch tensors with an
   explicit stream, which skips the stream lookup); tvm_ffi's Cython call with torch tensors, CuPy arrays and
   its own ``tvm_ffi.Tensor`` objects converted once (its floor); flashinfer-python.
2. **Pieces** (us per call, no launch): each attribute read of a torch tensor and a CuPy array that a reader
   does, the readers themselves, the layout key's hash and lookup, the stream lookups, torch's DLPack C
   exchange API (``dltensor_from_py_object_no_sync`` and ``current_work_stream`` through ctypes, GIL kept),
   ``as_tensor`` and ``Tensor.from_pointer``.

Subtracting rows of one run gives each layer's cost; only ratios and differences of one run mean anything.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from timing import Report  # noqa: E402


def _exchange_api(torch: Any) -> tuple[str, Any] | None:
    """torch's DLPack C exchange API table (attribute name, ctypes address), if this torch has one."""
    for attr in ("__dlpack_c_exchange_api__", "__c_dlpack_exchange_api__"):
        capsule = getattr(torch.Tensor, attr, None)
        if capsule is None:
            continue
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        for name in (b"dlpack_exchange_api", None):
            try:
                return attr, get(capsule, name)
            except Exception:  # a capsule of another name: try the next
                continue
    return None


def layers(n: int, rounds: int, long_n: int) -> dict[str, float | None]:
    import torch

    import fi_ffi
    from fi_ffi.abi.cdefs import get_ffi
    from fi_ffi.ops import norm

    sync = torch.cuda.synchronize
    x = torch.randn(1, 128, dtype=torch.float16, device="cuda")
    w = torch.randn(128, dtype=torch.float16, device="cuda")
    out = torch.empty_like(x)
    xd, wd, od = (fi_ffi.as_tensor(t) for t in (x, w, out))
    launch = norm._rmsnorm
    prepared = launch.launcher.prepare((od, xd, wd, 1e-6, False))
    f = prepared._frame
    call, this, args, nargs, res, q = f.call, f.this, f.args, f.nargs, f.result, f.q
    p0, p1, p2 = od.data_ptr, xd.data_ptr, wd.data_ptr

    def floor() -> None:  # what any launch must do: the pointers into the packed frame, the call, the error test
        q[12] = p0
        q[50] = p1
        q[88] = p2
        q[10] = 0
        if call(this, args, nargs, res):
            raise RuntimeError("rmsnorm failed")

    def floor_call_only() -> None:
        if call(this, args, nargs, res):
            raise RuntimeError("rmsnorm failed")

    ffi = get_ffi()
    kept = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)(
        int(ffi.cast("uintptr_t", call))
    )
    this_i, args_i, res_i = (int(ffi.cast("uintptr_t", v)) for v in (this, args, res))

    def floor_gil_kept() -> None:
        if kept(this_i, args_i, nargs, res_i):
            raise RuntimeError("rmsnorm failed")

    # short loops (n launches, fewer than the GPU's queue of pending launches holds) from an idle GPU: the host never
    # waits for the queue, so the loop's time is the host's; best of many rounds
    report = Report(f"rmsnorm 1x128 float16, layers: host us per call ({rounds} rounds of {n} calls)", rounds=rounds)
    report.measure("floor: frame packed once, 3 pointer writes + cffi call", floor, n=n, sync=sync)
    report.measure("floor: cffi call only", floor_call_only, n=n, sync=sync)
    report.measure("floor: ctypes call, GIL kept", floor_gil_kept, n=n, sync=sync)
    report.measure("PreparedCall()", prepared, n=n, sync=sync)
    report.measure("launcher, descriptors", lambda: launch(od, xd, wd, 1e-6, False), n=n, sync=sync)
    report.measure("fi_ffi.rmsnorm, descriptors", lambda: fi_ffi.rmsnorm(xd, wd, out=od), n=n, sync=sync)
    report.measure("launcher, torch tensors", lambda: launch(out, x, w, 1e-6, False), n=n, sync=sync)
    report.measure("fi_ffi.rmsnorm, torch tensors", lambda: fi_ffi.rmsnorm(x, w, out=out), n=n, sync=sync)
    current = torch.cuda.current_stream().cuda_stream
    report.measure(
        "fi_ffi.rmsnorm, torch tensors, stream given",
        lambda: fi_ffi.rmsnorm(x, w, out=out, stream=current),
        n=n,
        sync=sync,
    )
    xc = wc = oc = None
    try:
        import cupy

        xc, wc = cupy.asarray(x), cupy.asarray(w)
        oc = cupy.empty_like(xc)
        report.measure("launcher, CuPy arrays", lambda: launch(oc, xc, wc, 1e-6, False), n=n, sync=sync)
        report.measure("fi_ffi.rmsnorm, CuPy arrays", lambda: fi_ffi.rmsnorm(xc, wc, out=oc), n=n, sync=sync)
    except Exception as exc:
        print(f"CuPy unavailable: {exc}")
    try:
        import tvm_ffi

        from fi_ffi import loader

        fn = tvm_ffi.load_module(str(loader.module_path("norm"))).rmsnorm
        report.measure("tvm_ffi, torch tensors", lambda: fn(out, x, w, 1e-6, False), n=n, sync=sync)
        if xc is not None:
            report.measure("tvm_ffi, CuPy arrays", lambda: fn(oc, xc, wc, 1e-6, False), n=n, sync=sync)
        xt, wt, ot = (tvm_ffi.from_dlpack(t) for t in (x, w, out))
        report.measure("tvm_ffi, its own Tensors (converted once)", lambda: fn(ot, xt, wt, 1e-6, False), n=n, sync=sync)
    except Exception as exc:
        print(f"tvm_ffi unavailable: {exc}")
    try:
        import flashinfer.norm as fnorm

        report.measure("flashinfer-python", lambda: fnorm.rmsnorm(x, w, 1e-6, out=out), n=n, sync=sync)
    except Exception as exc:
        print(f"flashinfer-python unavailable: {exc}")
    report.print([])
    sync()
    rows = dict(report.rows)
    if long_n:
        # the same two calls in loops long enough to fill the launch queue: the loop then waits for the GPU, and
        # the figure is the GPU's rate of tiny kernels rather than the host's cost
        long = Report(f"long loops ({long_n} calls, 3 rounds): queue-bound", rounds=3)
        long.measure("floor (long loop)", floor, n=long_n, sync=sync)
        if "tvm_ffi, torch tensors" in rows and rows["tvm_ffi, torch tensors"] is not None:
            long.measure("tvm_ffi, torch tensors (long loop)", lambda: fn(out, x, w, 1e-6, False), n=long_n, sync=sync)
        long.print([])
        sync()
        rows.update(long.rows)
    return rows


def pieces(n: int) -> dict[str, float | None]:
    import torch

    import fi_ffi
    from fi_ffi.abi.runtime import api
    from fi_ffi.tensor import intake

    x = torch.randn(1, 128, dtype=torch.float16, device="cuda")
    key = (x.shape, x.stride(), x.dtype, x.device)
    table = {key: 1}
    report = Report(f"pieces of a call, us per call (n={n})")
    report.measure("(empty lambda: the loop's own cost)", lambda: None, n=n)
    report.measure("torch: t.shape", lambda: x.shape, n=n)
    report.measure("torch: t.stride()", lambda: x.stride(), n=n)
    report.measure("torch: t.dtype", lambda: x.dtype, n=n)
    report.measure("torch: t.device", lambda: x.device, n=n)
    report.measure("torch: t.get_device()", lambda: x.get_device(), n=n)
    report.measure("torch: t.data_ptr()", lambda: x.data_ptr(), n=n)
    report.measure("torch: t.is_neg()", lambda: x.is_neg(), n=n)
    report.measure("torch: t.layout", lambda: x.layout, n=n)
    report.measure("torch: t.storage_offset()", lambda: x.storage_offset(), n=n)
    report.measure("torch: (shape, stride(), dtype, device)", lambda: (x.shape, x.stride(), x.dtype, x.device), n=n)
    report.measure("torch: the same + dict lookup", lambda: table[(x.shape, x.stride(), x.dtype, x.device)], n=n)
    report.measure("torch: hash(t.device)", lambda: hash(x.device), n=n)
    report.measure("torch: t.is_cuda", lambda: x.is_cuda, n=n)
    table2 = {(x.shape, x.stride(), x.dtype, x.get_device()): 1}
    report.measure(
        "torch: (shape, stride(), dtype, get_device()) + lookup",
        lambda: table2[(x.shape, x.stride(), x.dtype, x.get_device())],
        n=n,
    )
    report.measure("torch: intake reader", lambda: intake._read_torch(x, None), n=n)
    from fi_ffi.ops import norm

    w = torch.randn(128, dtype=torch.float16, device="cuda")
    o = torch.empty_like(x)
    fi_ffi.rmsnorm(x, w, out=o)  # remembered: the generated code now reads torch tensors as it does on a warm call
    keys = norm._rmsnorm.launcher.keys
    report.measure("launcher: keys and pointers of 3 torch tensors", lambda: keys(o, x, w, 1e-6, False), n=n)
    source = intake.stream_source(x)
    get = api().TVMFFIEnvGetStream
    if source is not None:
        report.measure("launcher: torch's stream == TVM-FFI's current", lambda: source(0) == get(2, 0), n=n)
    report.measure("torch: current raw stream", lambda: torch._C._cuda_getCurrentRawStream(0), n=n)
    report.measure("fi_ffi: TVMFFIEnvGetStream (cffi)", lambda: api().TVMFFIEnvGetStream(2, 0), n=n)
    get_stream = api().TVMFFIEnvGetStream
    report.measure("fi_ffi: TVMFFIEnvGetStream (cffi, bound)", lambda: get_stream(2, 0), n=n)
    import cffi

    from fi_ffi.abi import runtime

    libc_ffi = cffi.FFI()
    libc_ffi.cdef("int abs(int);")
    libc_abs = libc_ffi.dlopen(None).abs
    report.measure("cffi: libc abs(1) (a trivial C call)", lambda: libc_abs(1), n=n)
    tvm_lib = ctypes.CDLL(runtime.library_path())
    for kind, proto in (("GIL kept", ctypes.PYFUNCTYPE), ("GIL released", ctypes.CFUNCTYPE)):
        getter = proto(ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32)(("TVMFFIEnvGetStream", tvm_lib))
        report.measure(f"ctypes: TVMFFIEnvGetStream, {kind}", lambda g=getter: g(2, 0), n=n)
    found = _exchange_api(torch)
    if found is None:
        print("torch has no DLPack C exchange API")
    else:
        attr, table_ptr = found
        print(f"torch's DLPack C exchange API: torch.Tensor.{attr} at 0x{table_ptr:x}")
        words = (ctypes.c_void_p * 7).from_address(table_ptr)
        to_dl = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_void_p)(words[5])
        work_stream = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int32, ctypes.c_void_p)(words[6])
        record = ctypes.create_string_buffer(64)
        out = ctypes.c_void_p()
        rec_addr, out_addr = ctypes.addressof(record), ctypes.addressof(out)
        report.measure("torch C API: dltensor_from_py_object_no_sync", lambda: to_dl(x, rec_addr), n=n)
        report.measure("torch C API: current_work_stream", lambda: work_stream(2, 0, out_addr), n=n)
    report.measure("as_tensor(torch)", lambda: fi_ffi.as_tensor(x), n=n)
    try:
        import cupy

        xc = cupy.asarray(x)
        report.measure("CuPy: a.data", lambda: xc.data, n=n)
        report.measure("CuPy: a.data.ptr", lambda: xc.data.ptr, n=n)
        report.measure("CuPy: a.data.device_id", lambda: xc.data.device_id, n=n)
        report.measure("CuPy: a.shape", lambda: xc.shape, n=n)
        report.measure("CuPy: a.strides", lambda: xc.strides, n=n)
        report.measure("CuPy: a.dtype", lambda: xc.dtype, n=n)
        report.measure("CuPy: a.__dlpack_device__()", xc.__dlpack_device__, n=n)
        report.measure("CuPy: a.__cuda_array_interface__", lambda: xc.__cuda_array_interface__, n=n)
        report.measure("CuPy: intake reader", lambda: intake._read_cupy(xc, None), n=n)
        wc, oc = cupy.asarray(w), cupy.empty_like(xc)
        fi_ffi.rmsnorm(xc, wc, out=oc)
        report.measure("launcher: keys and pointers of 3 CuPy arrays", lambda: keys(oc, xc, wc, 1e-6, False), n=n)
        report.measure("CuPy: current stream ptr", lambda: cupy.cuda.get_current_stream(0).ptr, n=n)
        report.measure("as_tensor(CuPy)", lambda: fi_ffi.as_tensor(xc), n=n)
        _cai_pieces(report, fi_ffi, xc, n)
    except Exception as exc:
        print(f"CuPy unavailable: {exc}")
    try:
        _jax_pieces(report, fi_ffi, torch, x, n)
    except Exception as exc:
        print(f"JAX unavailable: {exc}")
    ptr = x.data_ptr()
    report.measure("Tensor.from_pointer", lambda: fi_ffi.Tensor.from_pointer(ptr, (1, 128), "float16", 0), n=n)
    report.print([])
    return report.rows


def _cai_pieces(report: Any, fi_ffi: Any, xc: Any, n: int) -> None:
    """A producer with only ``__cuda_array_interface__``: the interface, the pointer's device, the reader."""
    from other_producers import CAIObject

    from fi_ffi.tensor import intake

    xa = CAIObject(xc)
    ptr = xc.data.ptr
    report.measure("CAI: obj.__cuda_array_interface__", lambda: xa.__cuda_array_interface__, n=n)
    report.measure("CAI: the pointer's device (driver query)", lambda: intake.pointer_device(ptr, "x"), n=n)
    report.measure("CAI: intake reader", lambda: intake._read_cai(xa, None), n=n)
    report.measure("as_tensor(CAI object)", lambda: fi_ffi.as_tensor(xa), n=n)


def _jax_pieces(report: Any, fi_ffi: Any, torch: Any, x: Any, n: int) -> None:
    """A ready JAX array: DLPack with no stream (what tvm_ffi asks), with a stream (what a launch asks: JAX orders
    its work before it), its attributes, and fi_ffi's descriptions of it."""
    from other_producers import jax_arrays

    (xj,) = jax_arrays(x)
    m = max(n // 10, 100)
    handle = torch.cuda.current_stream().cuda_stream
    import jax

    print(f"JAX {jax.__version__}, stream for the DLPack rows: 0x{handle:x}")
    report.measure("JAX: a.__dlpack_device__()", xj.__dlpack_device__, n=m)
    report.measure("JAX: a.__dlpack__() (no stream: tvm_ffi's)", lambda: xj.__dlpack__(), n=m)
    report.measure("JAX: a.__dlpack__(max_version=(1, 1))", lambda: xj.__dlpack__(max_version=(1, 1)), n=m)
    report.measure(
        "JAX: a.__dlpack__(stream=s, max_version=(1, 1))", lambda: xj.__dlpack__(stream=handle, max_version=(1, 1)), n=m
    )
    report.measure("JAX: a.shape", lambda: xj.shape, n=m)
    report.measure("JAX: a.dtype", lambda: xj.dtype, n=m)
    for attr in ("is_ready", "unsafe_buffer_pointer", "is_fully_addressable", "committed"):
        value = getattr(xj, attr, None)
        if callable(value):
            report.measure(f"JAX: a.{attr}()", value, n=m)
        elif value is not None:
            report.measure(f"JAX: a.{attr}", lambda attr=attr: getattr(xj, attr), n=m)
    report.measure("JAX: a.format.layout", lambda: xj.format.layout, n=m)
    from fi_ffi.tensor import intake

    (xb,) = jax_arrays(x.to(torch.bfloat16))
    report.measure(
        "fi_ffi: jax_row_major_pointer (float16: the interface)", lambda: intake.jax_row_major_pointer(xj), n=m
    )
    report.measure("fi_ffi: jax_row_major_pointer (bfloat16: format)", lambda: intake.jax_row_major_pointer(xb), n=m)
    report.measure("as_tensor(JAX) (no stream)", lambda: fi_ffi.as_tensor(xj), n=m)
    report.measure("as_tensor(JAX, stream=s)", lambda: fi_ffi.as_tensor(xj, stream=handle), n=m)
    report.measure("as_tensor(JAX bfloat16)", lambda: fi_ffi.as_tensor(xb), n=m)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("-n", type=int, default=256, help="launches per timed loop (fewer than the launch queue holds)")
    ap.add_argument("--rounds", type=int, default=100, help="interleaved rounds of the layers table")
    ap.add_argument("--long", type=int, default=20_000, help="launches per loop of the queue-bound table (0: skip)")
    ap.add_argument("--pieces-n", type=int, default=20_000, help="calls per timed loop of the pieces table")
    args = ap.parse_args(argv)
    result = {"layers": layers(args.n, args.rounds, args.long), "pieces": pieces(args.pieces_n)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host time per call of ``fi_ffi.rmsnorm`` on a 1x128 float16 input, against the tvm_ffi Cython call of the
same ``norm.so`` function and ``flashinfer.norm.rmsnorm``, measured in one run on a GPU machine.

    python benchmarks/bench_norm.py [--json out.json]

Peers as in ../shared/gpu/peer_baseline.py: tvm_ffi loads the very module file fi_ffi loaded (same handle);
flashinfer-python uses its installed flashinfer_jit_cache package. Tiny problem, so the host is the bottleneck.
"""

from __future__ import annotations

import argparse

from timing import Report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("-n", type=int, default=20_000, help="calls per timed loop")
    args = parser.parse_args()

    import torch

    import fi_ffi
    from fi_ffi import loader

    sync = torch.cuda.synchronize
    x = torch.randn(1, 128, dtype=torch.float16, device="cuda")
    w = torch.randn(128, dtype=torch.float16, device="cuda")
    out = torch.empty_like(x)
    xd, wd, od = (fi_ffi.as_tensor(t) for t in (x, w, out))  # descriptors made once, as a runtime would
    rmsnorm = fi_ffi.rmsnorm
    stream = torch.cuda.current_stream().cuda_stream

    report = Report(f"rmsnorm 1x128 float16, host time per call (n={args.n})")
    report.measure("torch x.add_(0) (framework floor)", lambda: x.add_(0), n=args.n, sync=sync)
    report.measure("fi_ffi.rmsnorm, prepared descriptors", lambda: rmsnorm(xd, wd, out=od), n=args.n, sync=sync)
    report.measure(
        "fi_ffi.rmsnorm, prepared descriptors, explicit stream",
        lambda: rmsnorm(xd, wd, out=od, stream=stream),
        n=args.n,
        sync=sync,
    )
    report.measure("fi_ffi.rmsnorm, torch tensors", lambda: rmsnorm(x, w, out=out), n=args.n, sync=sync)
    report.measure(
        "fi_ffi.prepare(fi_ffi.rmsnorm, ...)()", fi_ffi.prepare(rmsnorm, xd, wd, out=od), n=args.n, sync=sync
    )
    ptr = x.data_ptr()
    report.measure(
        "fi_ffi.Tensor.from_pointer(ptr, (1, 128), 'float16', 0)",
        lambda: fi_ffi.Tensor.from_pointer(ptr, (1, 128), "float16", 0),
        n=args.n,
    )
    report.measure("descriptor.rebind(ptr)", lambda: xd.rebind(ptr), n=args.n)
    report.measure("fi_ffi.as_tensor(torch tensor)", lambda: fi_ffi.as_tensor(x), n=args.n)
    try:
        import cupy

        xc, wc = cupy.asarray(x), cupy.asarray(w)
        oc = cupy.empty_like(xc)
        report.measure("fi_ffi.rmsnorm, CuPy arrays", lambda: rmsnorm(xc, wc, out=oc), n=args.n, sync=sync)
        report.measure("fi_ffi.as_tensor(CuPy array)", lambda: fi_ffi.as_tensor(xc), n=args.n)
    except Exception as exc:
        xc = None
        print(f"CuPy unavailable: {exc}")
    try:
        import tvm_ffi

        f = tvm_ffi.load_module(str(loader.module_path("norm"))).rmsnorm
        report.measure(
            "tvm_ffi Cython module.rmsnorm(out, x, w, eps, pdl)", lambda: f(out, x, w, 1e-6, False), n=args.n, sync=sync
        )
        if xc is not None:
            report.measure(
                "tvm_ffi Cython module.rmsnorm, CuPy arrays", lambda: f(oc, xc, wc, 1e-6, False), n=args.n, sync=sync
            )
    except Exception as exc:
        print(f"tvm_ffi peer unavailable: {exc}")
    try:
        import flashinfer.norm as fnorm

        report.measure(
            "flashinfer.norm.rmsnorm(x, w, eps, out=out)",
            lambda: fnorm.rmsnorm(x, w, 1e-6, out=out),
            n=args.n,
            sync=sync,
        )
    except Exception as exc:
        print(f"flashinfer peer unavailable: {exc}")
    sync()
    ratios = [
        ("fi_ffi.rmsnorm, prepared descriptors", "tvm_ffi Cython module.rmsnorm(out, x, w, eps, pdl)"),
        ("fi_ffi.rmsnorm, prepared descriptors, explicit stream", "tvm_ffi Cython module.rmsnorm(out, x, w, eps, pdl)"),
        ("fi_ffi.rmsnorm, torch tensors", "tvm_ffi Cython module.rmsnorm(out, x, w, eps, pdl)"),
        ("fi_ffi.prepare(fi_ffi.rmsnorm, ...)()", "tvm_ffi Cython module.rmsnorm(out, x, w, eps, pdl)"),
        ("fi_ffi.rmsnorm, prepared descriptors", "flashinfer.norm.rmsnorm(x, w, eps, out=out)"),
        ("fi_ffi.rmsnorm, CuPy arrays", "tvm_ffi Cython module.rmsnorm, CuPy arrays"),
    ]
    report.print(ratios)
    if args.json:
        report.dump(args.json, ratios)


if __name__ == "__main__":
    main()

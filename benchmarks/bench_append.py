"""Host time per call of ``fi_ffi.ops.page.append_paged_kv_cache`` (1 token, 8 kv heads, head_dim 128, page
size 16, float16, NHD), against the tvm_ffi Cython call of the same ``page.so`` function and
``flashinfer.page.append_paged_kv_cache``, measured in one run on a GPU machine.

    python benchmarks/bench_append.py [--json out.json] [-n CALLS]

Peers as in ../shared/gpu/peer_baseline.py: tvm_ffi loads the very module file fi_ffi loaded (same handle);
flashinfer-python uses its installed flashinfer_jit_cache package (see that file for how flashinfer is made
importable). A peer that cannot be imported is reported as unavailable. Tiny problem, so the host is the
bottleneck; compare only ratios measured in one run.
"""

from __future__ import annotations

import argparse

from timing import Report

OURS = "fi_ffi append_paged_kv_cache, prepared descriptors"
OURS_STREAM = "fi_ffi append_paged_kv_cache, prepared descriptors, explicit stream"
OURS_TORCH = "fi_ffi append_paged_kv_cache, torch tensors"
TVM = "tvm_ffi Cython module.append_paged_kv_cache(..., 0)"
FLASHINFER = "flashinfer.page.append_paged_kv_cache"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("-n", type=int, default=20_000, help="calls per timed loop")
    args = parser.parse_args()

    import torch

    import fi_ffi
    from fi_ffi import loader
    from fi_ffi.ops import page

    sync = torch.cuda.synchronize
    heads, dim, page_size, num_pages = 8, 128, 16, 64
    k = torch.randn(1, heads, dim, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    kc = torch.zeros(num_pages, page_size, heads, dim, dtype=torch.float16, device="cuda")
    vc = torch.zeros_like(kc)
    bi = torch.zeros(1, dtype=torch.int32, device="cuda")
    pos = torch.zeros(1, dtype=torch.int32, device="cuda")
    ind = torch.arange(num_pages, dtype=torch.int32, device="cuda")
    indptr = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    last = torch.ones(1, dtype=torch.int32, device="cuda")
    tensors = (k, v, bi, pos, kc, vc, ind, indptr, last)
    desc = tuple(fi_ffi.as_tensor(t) for t in tensors)  # descriptors made once, as a runtime would
    append = page.append_paged_kv_cache
    stream = torch.cuda.current_stream().cuda_stream

    report = Report(
        f"append_paged_kv_cache, 1 token, {heads} kv heads, d {dim}, page {page_size}, float16, "
        f"host time per call (n={args.n})"
    )
    report.measure("torch x.add_(0) (framework floor)", lambda: k.add_(0), n=args.n, sync=sync)
    report.measure(OURS, lambda: append(*desc), n=args.n, sync=sync)
    report.measure(OURS_STREAM, lambda: append(*desc, stream=stream), n=args.n, sync=sync)
    report.measure(OURS_TORCH, lambda: append(*tensors), n=args.n, sync=sync)
    try:
        import tvm_ffi

        f = tvm_ffi.load_module(str(loader.module_path("page"))).append_paged_kv_cache
        report.measure(TVM, lambda: f(k, v, bi, pos, kc, vc, ind, indptr, last, 0), n=args.n, sync=sync)
    except Exception as exc:
        report.rows[TVM] = None
        print(f"tvm_ffi peer unavailable: {type(exc).__name__}: {exc}")
    try:
        import flashinfer.page as fpage

        report.measure(
            FLASHINFER,
            lambda: fpage.append_paged_kv_cache(k, v, bi, pos, (kc, vc), ind, indptr, last),
            n=args.n,
            sync=sync,
        )
    except Exception as exc:
        report.rows[FLASHINFER] = None
        print(f"flashinfer peer unavailable: {type(exc).__name__}: {exc}")
    sync()
    ratios = [(OURS, TVM), (OURS_STREAM, TVM), (OURS_TORCH, TVM), (OURS, FLASHINFER), (OURS_TORCH, FLASHINFER)]
    report.print(ratios)
    if args.json:
        report.dump(args.json, ratios)


if __name__ == "__main__":
    main()

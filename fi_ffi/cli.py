"""The ``fi-ffi`` command (also ``python -m fi_ffi``).

- ``doctor [--json]``: driver, CUDA runtime, GPUs, glibc, the lock entry that would be used and whether it is
  cached, the TVM-FFI runtime, the cache path. Exit 0 on any machine.
- ``fetch [--wheel PATH ...] [--all]``: fill the cache from the lock (wheelhouse, download) or from local wheels.
- ``cache {path,list,verify [--full],clear}``: inspect and repair the cache.
- ``lock WHEEL... [--kind kernel|runtime]``: print a lock pinning local wheels (for ``FI_FFI_LOCK``).
- ``list [--kind K] [--dtype D] [--head-dim N]``: the attention variants the active lock provides.
- ``smoke [--device N]``: run each op once on the GPU against a reference; without a GPU, say so, print the
  doctor summary and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__


def _lock_status() -> dict[str, Any]:
    from . import loader
    from .loader import cache

    status: dict[str, Any] = {"path": None, "error": ""}
    try:
        chosen = loader.selection()
    except Exception as exc:
        status["error"] = str(exc)
        return status
    status["path"] = str(chosen.lock_path)
    status["cuda"] = chosen.cuda
    status["cuda_source"] = chosen.cuda_source
    status["reason"] = chosen.reason
    pins = list(chosen.kernels)
    if chosen.runtime is not None and _runtime_status()["source"] == "lock":
        pins.append(chosen.runtime)
    status["entries"] = [{"filename": pin.filename, "sha256": pin.sha256, "cached": _is_cached(pin, cache)}
                         for pin in pins]
    return status


def _is_cached(pin: Any, cache: Any) -> bool:
    """True if the wheel is in the cache with a verification stamp, or stamped in place in a wheelhouse."""
    from pathlib import Path

    from .loader import settings

    for path in [cache.wheel_path(pin), *(Path(p) / pin.filename for p in settings.wheelhouses())]:
        if path.is_file() and cache.stamped(path, pin.sha256):
            return True
    return False


def _runtime_status() -> dict[str, str]:
    from .loader import libraries

    try:
        source, detail = libraries.runtime_plan()
        return {"source": source, "detail": detail}
    except Exception as exc:
        return {"source": "error", "detail": str(exc)}


def doctor_data() -> dict[str, Any]:
    """Everything ``fi-ffi doctor`` reports, as a JSON-able dict."""
    from . import loader, system

    facts = system.report()
    return {
        "fi_ffi": __version__,
        "system": facts.as_dict(),
        "lock": _lock_status(),
        "tvm_ffi_runtime": _runtime_status(),
        "cache": str(loader.cache_root()),
    }


def _print_doctor(data: dict[str, Any]) -> None:
    s = data["system"]
    print(f"fi_ffi {data['fi_ffi']}  Python {s['python']}  {s['arch']}  {s['glibc'] or 'libc: unknown'}")
    print(f"NVIDIA driver:  {s['driver_version'] or 'not available: ' + s['driver_error']}")
    runtime = f"{s['runtime_version']} ({s['runtime_path']})" if s["runtime_version"] else s["runtime_error"]
    print(f"CUDA runtime:   {runtime}")
    if s["gpus"]:
        for g in s["gpus"]:
            major, minor = g["capability"]
            print(f"GPU {g['ordinal']}:          {g['name']}, compute capability {major}.{minor}, "
                  f"{g['memory_bytes'] / 2**30:.0f} GiB")
    else:
        print(f"GPUs:           none ({s['gpu_error']})")
    lock = data["lock"]
    if lock.get("error"):
        print(f"Lock:           {lock['error']}")
    else:
        print(f"Lock:           {lock['path']}")
        print(f"  selection:    {lock['reason']}")
        for e in lock["entries"]:
            print(f"  {'cached ' if e['cached'] else 'missing'}       {e['filename']}")
    rt = data["tvm_ffi_runtime"]
    print(f"TVM-FFI:        {rt['source']}: {rt['detail']}")
    print(f"Cache:          {data['cache']}")


def cmd_doctor(args: argparse.Namespace) -> int:
    data = doctor_data()
    if args.json:
        json.dump(data, sys.stdout, indent=2, default=str)
        print()
    else:
        _print_doctor(data)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from . import loader

    paths = []
    if args.wheel:
        for wheel in args.wheel:
            paths += loader.fetch(wheel)
    else:
        paths = loader.fetch(all_entries=args.all)
    for path in paths:
        print(path)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from . import loader

    if args.action == "path":
        print(loader.cache_root())
    elif args.action == "list":
        for entry in loader.list_cache():
            print(f"{entry.kind:9s} {entry.size / 2**20:9.1f} MiB  {entry.path}  {entry.detail}")
    elif args.action == "verify":
        try:
            report = loader.verify_cache(full=args.full)
        except OSError as exc:  # verify reports what it finds; this is the cache root itself failing
            print(f"fi-ffi cache verify: cannot read the cache {loader.cache_root()}: {exc}", file=sys.stderr)
            return 2
        kept = dict(report.kept)
        for path, problem in report.bad:
            print(f"{'kept' if path in kept else 'removed'} {path}: {problem}")
        for path, why in report.kept:
            print(f"  left in place: {path}: {why}")
        action = "found, nothing changed: the cache is read-only" if report.read_only else (
            "removed; fetched or extracted again on next use")
        print(f"checked {report.checked} files, {len(report.bad)} bad ({action}), {report.removed_tmp} "
              f"temporary files of dead processes removed")
        return 0 if report.ok else 1
    elif args.action == "clear":
        cleared = loader.clear_cache()
        for path, size in cleared.removed:
            print(f"removed {path} ({size / 2**20:.1f} MiB)")
        for path, why in cleared.kept:
            print(f"kept    {path}: {why}")
        print(f"freed {cleared.freed / 2**20:.1f} MiB in {loader.cache_root()}; removed {len(cleared.removed)} "
              f"entries fi_ffi created, kept {len(cleared.kept)}")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    from . import loader

    pins = [loader.lock_entry(w, kind=args.kind, url=args.url or "") for w in args.wheels]
    sys.stdout.write(loader.dump_lock(pins, header="generated by fi-ffi lock"))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .ops import variants

    rows = variants.list_variants(kind=args.kind, dtype=args.dtype, head_dim=args.head_dim)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    for row in rows if not args.json else ():
        dtypes = "/".join(dict.fromkeys((row["dtype_q"], row["dtype_kv"], row["dtype_o"])))
        heads = f"{row['head_dim_qk']}" if row["head_dim_qk"] == row["head_dim_vo"] else \
            f"{row['head_dim_qk']}/{row['head_dim_vo']}"
        print(f"{row['kind']:15s} {row['backend']:4s} {dtypes:9s} head_dim {heads:8s} {row['uri']}")
    if not rows:
        print("no variant matches", file=sys.stderr)
        return 1
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from . import smoke, system

    gpus, why = system.gpus()
    if not gpus:
        print(f"fi-ffi smoke needs a CUDA GPU: {why}\n")
        _print_doctor(doctor_data())
        return 1
    results = smoke.run(args.device)
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        extra = f"  {r.detail}" if r.detail else ""
        print(f"{verdict}  {r.name:40s} max|err| {r.max_error:9.2e}  host {r.host_us:7.2f} us/call{extra}")
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fi-ffi", description="FlashInfer kernels over TVM-FFI, from Python.")
    parser.add_argument("--version", action="version", version=f"fi-ffi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="report driver, CUDA, GPUs, lock selection and cache")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("fetch", help="fill the cache from the lock, the wheelhouse or local wheels")
    p.add_argument("--wheel", action="append", help="a local wheel pinned by the lock (repeatable)")
    p.add_argument("--all", action="store_true", help="every wheel in the lock, all architectures")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("cache", help="path, list, verify or clear the cache")
    p.add_argument("action", choices=["path", "list", "verify", "clear"])
    p.add_argument("--full", action="store_true", help="verify: re-hash every file")
    p.set_defaults(func=cmd_cache)
    p = sub.add_parser("lock", help="print a lock pinning local wheels (use with FI_FFI_LOCK)")
    p.add_argument("wheels", nargs="+")
    p.add_argument("--kind", choices=["kernel", "runtime"], default=None)
    p.add_argument("--url", help="where the wheel can be downloaded from")
    p.set_defaults(func=cmd_lock)
    p = sub.add_parser("list", help="attention variants the active lock provides")
    p.add_argument("--kind", help="single_prefill, batch_prefill, single_decode or batch_decode")
    p.add_argument("--dtype", help="q/kv dtype, e.g. f16 or bf16")
    p.add_argument("--head-dim", type=int, help="head dimension")
    p.add_argument("--json", action="store_true", help="one object per variant, with every field")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("smoke", help="run each op once on the GPU against a reference")
    p.add_argument("--device", type=int, default=0, help="CUDA ordinal")
    p.set_defaults(func=cmd_smoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import FiFFIError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FiFFIError as exc:
        print(f"fi-ffi {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

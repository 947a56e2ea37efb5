"""The ``fi-ffi`` command (also ``python -m fi_ffi``).

- ``doctor [--json]``: driver, CUDA runtime, GPUs, glibc, the lock entry that would be used and whether it is
  cached, the TVM-FFI runtime, the cache path. Exit 0 on any machine.
- ``fetch [--wheel PATH ...] [--all]``: fill the cache from the lock (wheelhouse, download) or from local wheels.
- ``cache {path,list,verify [--full],clear}``: inspect and repair the cache.
- ``lock WHEEL... [--kind kernel|runtime]``: print a lock pinning local wheels (for ``FI_FFI_LOCK``).
- ``list [--kind K] [--dtype D] [--head-dim N]``: the attention variants the active lock provides, with the
  FlashInfer release each comes from.
- ``smoke [--device N]``: run each op once on the GPU against a reference; without a GPU, say so, print the
  doctor summary and exit 1.
- ``generate --model DIR --prompt-ids 1,2,3 [--prompt-ids ...] --max-new-tokens N [--graph]``: serve token-id
  prompts with a local Llama checkpoint (:mod:`fi_ffi.models.llama`, the ``llama`` extra); prints the tokens,
  tokens/s and host time per decode step.
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
    status["entries"] = [{"filename": pin.filename, "sha256": pin.sha256, "cached": _is_cached(pin, cache),
                          "kind": pin.kind, "release": pin.release} for pin in pins]
    return status


def _is_cached(pin: Any, cache: Any) -> bool:
    """True if the wheel is in the cache with a verification stamp, or stamped in place in a wheelhouse."""
    from pathlib import Path

    from .loader import settings

    for folder in [cache.wheels_dir(), *(Path(p) for p in settings.wheelhouses())]:
        path = folder / pin.filename
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
            release = f"FlashInfer {e['release'] or '(release not recorded)'}: " if e["kind"] == "kernel" else ""
            print(f"  {'cached ' if e['cached'] else 'missing'}       {release}{e['filename']}")
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
        report = loader.verify_cache(full=args.full)
        for path, problem in report.bad:
            print(f"removed {path}: {problem}")
        print(f"checked {report.checked} files, {len(report.bad)} bad (removed; fetched or extracted again on "
              f"next use), {report.removed_tmp} stale temporary files removed")
        return 0 if report.ok else 1
    elif args.action == "clear":
        print(f"freed {loader.clear_cache() / 2**20:.1f} MiB")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    from . import loader

    pins, notes = loader.lock_entries(args.wheels, kind=args.kind, url=args.url or "")
    for note in notes:  # e.g. the 0.7.x flashinfer-jit-cache metadata wheel: its modules are in provider wheels
        print(f"fi-ffi lock: {note}", file=sys.stderr)
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
        print(f"{row['kind']:15s} {row['backend']:4s} {dtypes:9s} head_dim {heads:8s} {row['release'] or '-':11s} "
              f"{row['uri']}")
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


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids (e.g. 1,2,3), got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _eos_ids(text: str) -> list[int]:
    return [] if text == "none" else _token_ids(text)


def cmd_generate(args: argparse.Namespace) -> int:
    from .models.llama import LlamaEngine, SamplingParams

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    try:
        with LlamaEngine(args.model, max_batch=args.max_batch or len(args.prompt_ids), cuda_graph=args.graph,
                         device=args.device) as engine:
            result = engine.generate(args.prompt_ids, args.max_new_tokens, eos_token_ids=args.eos_ids,
                                     sampling=sampling)
    except (ValueError, ImportError) as exc:  # a bad checkpoint or argument; CuPy missing (the llama extra)
        print(f"fi-ffi generate: {exc}", file=sys.stderr)
        return 2
    for i, (tokens, why) in enumerate(zip(result.tokens, result.finish_reasons, strict=True)):
        print(f"[{i}] {','.join(map(str, tokens))}  ({why})")
    mode = "CUDA graph" if args.graph else "eager"
    print(f"prefill: {result.prefill_s * 1e3:.1f} ms; decode ({mode}): {result.decode_steps} steps, "
          f"{result.decode_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, host time per step "
          f"{result.host_us_per_step:.1f} us (median)")
    return 0


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
    p.add_argument("--kind", help="single_prefill, batch_prefill, single_decode, batch_decode, batch_mla (or "
                   "prefill, decode, mla)")
    p.add_argument("--dtype", help="q/kv dtype, e.g. f16 or bf16")
    p.add_argument("--head-dim", type=int, help="head dimension")
    p.add_argument("--json", action="store_true", help="one object per variant, with every field")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("smoke", help="run each op once on the GPU against a reference")
    p.add_argument("--device", type=int, default=0, help="CUDA ordinal")
    p.set_defaults(func=cmd_smoke)
    p = sub.add_parser("generate", help="serve token-id prompts with a local Llama checkpoint (needs fi-ffi[llama])")
    p.add_argument("--model", required=True, help="checkpoint directory: config.json + *.safetensors (f16/bf16)")
    p.add_argument("--prompt-ids", type=_token_ids, action="append", required=True,
                   help="one prompt as comma-separated token ids (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--graph", action="store_true", help="replay the decode step as a CUDA graph")
    p.add_argument("--max-batch", type=int, default=0, help="batch slots (default: the number of prompts)")
    p.add_argument("--eos-ids", type=_eos_ids,
                   help="comma-separated end-of-sequence ids, or 'none' (default: the checkpoint's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", type=int, default=0, help="CUDA ordinal")
    p.set_defaults(func=cmd_generate)
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

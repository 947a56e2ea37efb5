"""``fi-ffi smoke [--device N] [--json]``: run each op once on the GPU against a reference (the checks are
:mod:`fi_ffi.cli.smoke`); without a GPU, say so, print the doctor report and exit 1."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import doctor
from .arguments import Argument, Subcommand, ordinal
from .output import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, write_json


def run(args: argparse.Namespace) -> int:
    from ..cuda import system
    from . import smoke

    gpus, why = system.gpus()
    if not gpus and args.json:
        write_json({"error": f"needs a CUDA GPU: {why}", "doctor": doctor.doctor_data()})
        return EXIT_CHECK_FAILED
    if not gpus:
        first = f"fi-ffi smoke needs a CUDA GPU: {why}"
        print(f"{first}\n")
        doctor.print_report(doctor.doctor_data(), above=first)
        return EXIT_CHECK_FAILED
    try:
        smoke.check_ordinal(args.device, gpus)
    except ValueError as exc:
        print(f"fi-ffi smoke: {exc}", file=sys.stderr)
        return EXIT_USAGE
    results = smoke.run(args.device)
    if args.json:
        write_json([dataclasses.asdict(r) for r in results])
        return EXIT_CHECK_FAILED if any(not r.passed for r in results) else EXIT_OK
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        extra = f"  {r.detail}" if r.detail else ""
        print(f"{verdict}  {r.name:40s} max|err| {r.max_error:9.2e}  host {r.host_us:7.2f} us/call{extra}")
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return EXIT_CHECK_FAILED if failed else EXIT_OK


COMMAND = Subcommand(
    name="smoke",
    summary="run each op once on the GPU against a reference",
    description="Run rmsnorm, fused_add_rmsnorm, append_paged_kv_cache, batch decode, single prefill and (SM90) GDN "
    "prefill once against a numpy reference; print pass/fail and host time per call. Exit 1 on a failure, or "
    "without a GPU (then the doctor summary is printed).",
    examples="fi-ffi smoke\nfi-ffi smoke --device 1 --json",
    arguments=(
        Argument("--device", type=ordinal, default=0, help="CUDA ordinal (0 to the GPU count - 1)"),
        Argument("--json", action="store_true", help="one object per check"),
    ),
    run=run,
)


__all__ = ["COMMAND", "run"]

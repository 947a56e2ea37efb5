"""``fi-ffi doctor [--json]``: what this machine offers and what fi_ffi would use.

The driver, the CUDA runtime (and a ``FI_FFI_CUDA_VERSION`` override), the GPUs and whether the selected kernel
wheels cover each one's architecture, glibc, the ``FI_FFI_*`` variables set, the lock (which file each section came
from) and where each selected wheel would come from, the TVM-FFI runtime, the cache path, and the kernel modules
on disk that reference symbols nothing provides. Exit 0 on any machine: a problem is reported, not raised.
``fi-ffi smoke`` prints the same report where there is no GPU; ``fi-ffi list --json`` reuses the symbol check.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .arguments import Argument, Subcommand
from .output import EXIT_OK, write_json


def active_settings() -> list[dict[str, str]]:
    """Every ``FI_FFI_*`` environment variable that is set: name, value and a note (``""``, or what is wrong).

    Read against the one table of variables (:data:`fi_ffi.variables.VARIABLES`, which the readers use too): a
    value fi_ffi would refuse is flagged with the reader's own text, and a name that is not a row (a typo such as
    ``FI_FFI_OFLINE``, which silently does nothing otherwise) as not a variable fi_ffi reads.
    """
    import os

    from ..loader import settings

    problems = settings.problems()
    rows = []
    for name in sorted(n for n in os.environ if n.startswith("FI_FFI_")):
        rows.append({"name": name, "value": os.environ[name], "note": problems.get(name, "")})
    return rows


def _lock_status() -> dict[str, Any]:
    from .. import loader

    status: dict[str, Any] = {"path": None, "error": ""}
    try:
        lock = loader.active_lock()
        chosen = loader.selection()
    except Exception as exc:
        status["error"] = str(exc)
        return status
    status["path"] = str(chosen.lock_path)
    # FI_FFI_LOCK replaces the packaged lock section by section: say which file each section came from.
    status["sections"] = {kind: str(path) for kind, path in lock.sources.items()}
    status["cuda"] = chosen.cuda
    status["cuda_source"] = chosen.cuda_source
    status["reason"] = chosen.reason
    pins = list(chosen.kernels)
    if chosen.runtime is not None and _runtime_status()["source"] == "lock":
        pins.append(chosen.runtime)
    status["entries"] = [
        {"filename": pin.filename, "sha256": pin.sha256, "kind": pin.kind, "release": pin.release, **wheel_status(pin)}
        for pin in pins
    ]
    status["kernel_sm"] = sorted({sm for pin in chosen.kernels for sm in wheel_sm(pin)})
    status["kernel_cuda"] = sorted({pin.cuda for pin in chosen.kernels})
    return status


def cuda_builds(system: dict[str, Any], lock: dict[str, Any]) -> dict[str, Any]:
    """Which CUDA builds the driver runs, which the lock selects, and what cuda-bindings links, with every mismatch.

    ``driver``: the newest CUDA the driver runs (``"12.8"``, ``""``: no driver); ``kernels``: the CUDA versions of the
    selected kernel wheels; ``major`` / ``major_reason``: the CUDA major whose ``libcudart`` the loader loads and why;
    ``bindings`` / ``bindings_runtime``: cuda-bindings' release and its runtime's CUDA version; ``problems``: one
    sentence per build the driver cannot run (from :mod:`fi_ffi.cuda.requirements`, with the way out).
    """
    from ..cuda import requirements
    from ..loader import libraries

    try:
        major, why = libraries.cuda_major()
    except Exception as exc:  # a bad FI_FFI_CUDA_VERSION: the settings rows flag it too
        major, why = None, str(exc)
    kernels = list(lock.get("kernel_cuda", []))
    needs = [(cuda, f"the selected CUDA {cuda} kernel wheels") for cuda in kernels]
    if not kernels and major is not None:
        needs.append((f"{major}.0", f"the lock's CUDA {major} kernel wheels"))
    if system.get("bindings_runtime"):
        bindings = f"cuda-bindings {system.get('bindings_version') or ''}".rstrip()
        needs.append((system["bindings_runtime"], f"{bindings} (its CUDA {system['bindings_runtime']} runtime)"))
    problems: list[str] = []
    if system.get("driver_version") or system.get("driver_error"):
        for cuda, what in needs:
            # where the lock already selects CUDA 12 kernels, only cuda-bindings is left to change
            way_out = requirements.BINDINGS12_STEP if what.startswith("cuda-bindings") and major == 12 else ""
            found = requirements.problem(cuda, what, way_out=way_out)
            if found and found not in problems:
                problems.append(found)
    return {
        "driver": system.get("driver_version", ""),
        "kernels": kernels,
        "major": major,
        "major_reason": why,
        "bindings": system.get("bindings_version", ""),
        "bindings_runtime": system.get("bindings_runtime", ""),
        "problems": problems,
    }


def _cached_wheel_path(pin: Any) -> Path:
    from ..loader import cache

    return Path(cache.wheel_path(pin))  # keyed by digest: two builds with one file name coexist


def wheel_status(pin: Any) -> dict[str, Any]:
    """Where the loader would take ``pin``'s wheel from, in its own order, without hashing or fetching anything.

    ``status``: ``"cached"`` (in the cache), ``"wheelhouse"`` or ``"path"`` (a local copy used in place),
    ``"download"`` (fetched on first use from ``source``) or ``"missing"`` (no way to get it: ``source`` says
    why). ``verified``: the local copy's sha256 was already checked (a stamp matches); an unverified copy is
    hashed on first use. ``cached`` is kept for older readers of ``doctor --json``.
    """
    import os

    from ..loader import cache, settings

    def found(status: str, path: Path, source: str) -> dict[str, Any]:
        verified = cache.stamped(path, pin.sha256)
        return {
            "status": status,
            "path": str(path),
            "source": source,
            "verified": verified,
            "cached": status == "cached" and verified,
        }

    cached = _cached_wheel_path(pin)
    if cached.is_file():
        return found("cached", cached, "the fi_ffi cache")
    missing: dict[str, Any] = {"status": "missing", "path": "", "verified": False, "cached": False}
    try:
        folders, offline = settings.wheelhouses(), settings.offline()
    except Exception as exc:  # a bad FI_FFI_* value: the loader would refuse it the same way
        return {**missing, "source": str(exc)}
    for folder in folders:
        candidate = Path(os.path.expanduser(folder)) / pin.filename
        if candidate.is_file():
            return found("wheelhouse", candidate, f"the wheelhouse {folder} (FI_FFI_WHEELHOUSE)")
    local = pin.local_path
    if local is not None and local.is_file():
        return found("path", local, f"the lock's 'path' ({pin.lock_path})")
    if offline:
        return {**missing, "source": "FI_FFI_OFFLINE is set and no local copy exists"}
    if pin.url:
        return {**missing, "status": "download", "source": pin.url}
    if pin.pip:
        return {**missing, "status": "download", "source": f"pip download {pin.pip}"}
    return {**missing, "source": f"no local copy, and the lock {pin.lock_path} gives no url or pip requirement"}


def _status_text(entry: dict[str, Any]) -> str:
    status = entry.get("status", "cached" if entry.get("cached") else "missing")
    checked = "verified" if entry.get("verified") else "sha256 checked on first use"
    if status == "cached":
        return f"cached ({checked})"
    if status in ("wheelhouse", "path"):
        return f"available ({status}: {entry['path']}; {checked})"
    if status == "download":
        return f"not here yet: downloaded on first use from {entry['source']}"
    return f"missing: {entry.get('source', '')}"


def wheel_sm(pin: Any) -> tuple[str, ...]:
    """The GPU archs ``pin``'s wheel has code for: its ``sm`` list, else the ``smXY`` tags of its version label;
    ``()`` when neither says (the upstream wheels name none)."""
    from ..loader import lockfile

    if pin.sm:
        return tuple(pin.sm)
    try:
        return lockfile.sm_from_label(lockfile.parse_wheel_filename(pin.filename).local)
    except Exception:  # a lock entry whose file name is not a wheel name: the lock parser already refused it
        return ()


def _sm_runs_on(sm: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``sm`` (``"90a"``, ``"100f"``, ``"80"``) runs on a GPU of ``capability``.

    Arch-specific targets (``a``) run on exactly that compute capability; family (``f``) and plain targets on
    the same major version at the same or a higher minor (CUDA's binary compatibility).
    """
    digits = sm.rstrip("abcdefghijklmnopqrstuvwxyz")
    if not digits.isdigit() or len(digits) < 2:
        return False
    major, minor = int(digits[:-1]), int(digits[-1])
    if sm.endswith("a"):
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


def gpu_coverage(gpus: Sequence[Any], kernels: Sequence[Any]) -> list[dict[str, Any]]:
    """For each GPU (``ordinal``, ``name``, ``capability``), whether the selected kernel wheels have code for it.

    ``covered``: ``True`` / ``False``, or ``None`` when a wheel names no GPU archs (then only running a kernel
    tells). ``wheels``: the file names that cover it; ``detail``: a sentence for the report.
    """
    rows = []
    for gpu in gpus:
        major, minor = gpu.capability
        cc = f"{major}.{minor}"
        by_wheel = {pin.filename: wheel_sm(pin) for pin in kernels}
        covering = [name for name, sms in by_wheel.items() if any(_sm_runs_on(s, (major, minor)) for s in sms)]
        unlabelled = [name for name, sms in by_wheel.items() if not sms]
        if covering:
            covered: bool | None = True
            detail = f"covered by {', '.join(covering)}"
        elif unlabelled:
            covered = None
            detail = (
                f"not known: {', '.join(unlabelled)} names no GPU archs (no sm list in the lock, no smXY "
                f"tag in the file name); `fi-ffi smoke` tells"
            )
        else:
            covered = False
            offered = sorted({s for sms in by_wheel.values() for s in sms}) or ["none"]
            detail = (
                f"NOT covered: the selected wheels have code for sm {', '.join(offered)} only; pin a wheel "
                f"built for sm {major}{minor} (`fi-ffi lock WHEEL`, then FI_FFI_LOCK)"
            )
        rows.append(
            {
                "ordinal": gpu.ordinal,
                "name": gpu.name,
                "capability": cc,
                "covered": covered,
                "wheels": covering,
                "detail": detail,
            }
        )
    return rows


def _runtime_status() -> dict[str, str]:
    import os

    from ..loader import libraries, settings

    try:
        source, detail = libraries.runtime_plan()
    except Exception as exc:
        return {"source": "error", "detail": str(exc), "problem": str(exc)}
    problem = ""
    if source == "env":
        path = os.path.abspath(os.path.expanduser(detail))
        if not os.path.isfile(path):
            problem = (
                f"{settings.RUNTIME}={detail} is not auto, package or lock, and no file exists at {path}; "
                f"set it to the path of a libtvm_ffi.so, or unset it"
            )
    return {"source": source, "detail": detail, "problem": problem}


def module_symbols() -> dict[str, Any]:
    """The symbol check of every kernel module loaded here or already on disk (:func:`fi_ffi.loader.symbol_checks`;
    fetches and extracts nothing): ``modules`` maps each URI checked to its result, ``error`` says why nothing
    could be checked (``""`` if it could)."""
    from .. import loader

    try:
        checks = loader.symbol_checks()
    except Exception as exc:  # no lock, no runtime: doctor still reports everything else
        return {"error": str(exc), "modules": {}}
    return {"error": "", "modules": {uri: check.as_dict() for uri, check in checks.items()}}


def doctor_data() -> dict[str, Any]:
    """Everything ``fi-ffi doctor`` reports, as a JSON-able dict."""
    from .. import loader
    from ..cuda import system

    facts = system.report()
    lock = _lock_status()
    kernels = []
    if not lock.get("error"):
        try:
            kernels = list(loader.selection().kernels)
        except Exception:  # reported in lock["error"] already
            kernels = []
    system_facts = facts.as_dict()
    return {
        "fi_ffi": __version__,
        "system": system_facts,
        "settings": active_settings(),
        "lock": lock,
        "cuda_builds": cuda_builds(system_facts, lock),
        "gpu_coverage": gpu_coverage(facts.gpus, kernels) if kernels else [],
        "tvm_ffi_runtime": _runtime_status(),
        "cache": str(loader.cache_root()),
        "cache_problem": cache_problem(loader.cache_root()),
        "module_symbols": module_symbols(),
    }


def cache_problem(root: Path) -> str:
    """Why the cache folder ``root`` cannot be used (``""``: it is a writable folder, or can be made in a writable
    one: :func:`fi_ffi.loader.settings.cache_dir_problem`, which tries)."""
    from ..loader import settings

    why = settings.cache_dir_problem(str(root))
    return f"{why}; set FI_FFI_CACHE_DIR to a folder this user can write" if why else ""


def print_report(data: dict[str, Any], *, above: str = "") -> None:
    """The report of :func:`doctor_data` as text; the no-driver message (its cause and fix, ~400 characters) in full
    once, later lines pointing at it (``above``: what the caller printed first, e.g. ``smoke``'s line)."""
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        _print_report(data)
    print(say_once(text.getvalue(), above), end="")


def say_once(text: str, above: str = "") -> str:
    """``text`` with each no-driver message after the first one in ``above`` + ``text`` cut to a pointer to it."""
    from ..cuda import requirements

    full = f"{requirements.no_driver_cause()}. {requirements.NO_DRIVER_FIX}"
    if full in above:
        start = 0
    elif full in text:
        start = text.index(full) + len(full)
    else:
        return text
    return text[:start] + text[start:].replace(full, "no NVIDIA driver found (the fix: above)")


def _print_report(data: dict[str, Any]) -> None:
    s = data["system"]
    print(f"fi_ffi {data['fi_ffi']}  Python {s['python']}  {s['arch']}  {s['glibc'] or 'libc: unknown'}")
    print(f"NVIDIA driver:  {s.get('driver_summary') or s['driver_version'] or s['driver_error']}")
    runtime = f"{s['runtime_version']} ({s['runtime_path']})" if s["runtime_version"] else s["runtime_error"]
    print(f"CUDA runtime:   {runtime}")
    builds = data.get("cuda_builds")
    if builds:
        runs = f"the driver runs CUDA <= {builds['driver']}" if builds["driver"] else "no driver to run them"
        kernels = ", ".join(builds["kernels"]) or (f"{builds['major']}.x" if builds["major"] else "none")
        major = f"libcudart.so.{builds['major']}: " if builds["major"] else ""
        print(f"CUDA builds:    {runs}; the lock selects CUDA {kernels} kernels ({major}{builds['major_reason']})")
        if builds["bindings"]:
            print(
                f"  cuda-bindings: {builds['bindings']}, its own runtime calls link CUDA {builds['bindings_runtime']}"
            )
        for problem in builds["problems"]:
            print(f"  PROBLEM:      {problem}")
    if s.get("cuda_version_override"):
        print(
            f"  override:     FI_FFI_CUDA_VERSION={s['cuda_version_override']} (wheels are selected for this "
            f"version, not for the library above)"
        )
    coverage = {row["ordinal"]: row for row in data.get("gpu_coverage", [])}
    if s["gpus"]:
        for g in s["gpus"]:
            major, minor = g["capability"]
            print(
                f"GPU {g['ordinal']}:          {g['name']}, compute capability {major}.{minor}, "
                f"{g['memory_bytes'] / 2**30:.0f} GiB"
            )
            if g["ordinal"] in coverage:
                print(f"  kernels:      {coverage[g['ordinal']]['detail']}")
    else:
        print(f"GPUs:           none ({s['gpu_error']})")
    settings_rows = data.get("settings", [])
    print("Settings:" if settings_rows else "Settings:       no FI_FFI_* variable is set (defaults)")
    for row in settings_rows:
        note = f"   <- {row['note']}" if row["note"] else ""
        print(f"  {row['name']}={row['value']}{note}")
    lock = data["lock"]
    if lock.get("error"):
        print(f"Lock:           {lock['error']}")
    else:
        print(f"Lock:           {lock['path']}")
        for kind, path in sorted(lock.get("sections", {}).items()):
            origin = "" if path == lock["path"] else " (the packaged lock: the file above has no such entries)"
            print(f"  {'[[' + kind + ']]:':14s}{path}{origin}")
        print(f"  selection:    {lock['reason']}")
        for e in lock["entries"]:
            release = f"FlashInfer {e['release'] or '(release not recorded)'}: " if e["kind"] == "kernel" else ""
            print(f"  {release}{e['filename']}: {_status_text(e)}")
    rt = data["tvm_ffi_runtime"]
    print(f"TVM-FFI:        {rt['source']}: {rt['detail']}")
    if rt.get("problem"):
        print(f"  PROBLEM:      {rt['problem']}")
    print(f"Cache:          {data['cache']}")
    if data.get("cache_problem"):
        print(f"  PROBLEM:      {data['cache_problem']}")
    symbols = data["module_symbols"]
    modules = symbols["modules"]
    bad = {uri: m for uri, m in modules.items() if m["unresolved"] or m["missing_libraries"] or m["error"]}
    if symbols["error"]:
        print(f"Module symbols: not checked: {symbols['error']}")
    elif not modules:
        print("Module symbols: no kernel module loaded or on disk yet (checked when one is)")
    else:
        state = f"{len(bad)} of them reference symbols nothing provides" if bad else "all their symbols are provided"
        print(f"Module symbols: {len(modules)} kernel modules checked (loaded or on disk): {state}")
    for uri, m in bad.items():
        print(f"  {uri}:")
        if m["error"]:
            print(f"    not checked: {m['error']}")
        if m["unresolved"]:
            print(
                f"    {len(m['unresolved'])} undefined symbols nothing provides (it loads; code that calls one "
                "aborts the process):"
            )
            for name in m["unresolved"]:
                print(f"      {name}")
        if m["missing_libraries"]:
            print(f"    needed libraries not found: {', '.join(m['missing_libraries'])}")


def run(args: argparse.Namespace) -> int:
    data = doctor_data()
    if args.json:
        write_json(data)
    else:
        print_report(data)
    return EXIT_OK


COMMAND = Subcommand(
    name="doctor",
    summary="report driver, CUDA, GPUs, lock selection and cache",
    description="Report what this machine offers and what fi_ffi would use: the NVIDIA driver, the CUDA runtime, "
    "the GPUs and whether the selected kernel wheels cover them, the FI_FFI_* variables (flagging bad values and "
    "typos), the lock and where each wheel would come from, the TVM-FFI runtime and the cache. Exits 0.",
    examples="fi-ffi doctor\nfi-ffi doctor --json",
    arguments=(Argument("--json", action="store_true", help="machine-readable output"),),
    run=run,
)


__all__ = [
    "COMMAND",
    "active_settings",
    "cache_problem",
    "cuda_builds",
    "doctor_data",
    "gpu_coverage",
    "module_symbols",
    "print_report",
    "run",
    "wheel_sm",
    "wheel_status",
]

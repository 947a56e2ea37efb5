"""The ``fi-ffi`` command (also ``python -m fi_ffi``).

- ``doctor [--json]``: driver, CUDA runtime (and a ``FI_FFI_CUDA_VERSION`` override), GPUs and whether the
  selected kernel wheels cover each one's architecture, glibc, the ``FI_FFI_*`` variables set, the lock (which
  file each section came from) and where each selected wheel would come from, the TVM-FFI runtime, the cache
  path, and the kernel modules on disk that reference symbols nothing provides. Exit 0 on any machine.
- ``fetch [--wheel PATH ...] [--all]``: fill the cache from the lock (wheelhouse, download) or from local wheels.
- ``cache {path,list,verify [--full],clear}``: inspect and repair the cache.
- ``lock WHEEL... [--kind kernel|runtime]``: print a lock pinning local wheels (for ``FI_FFI_LOCK``).
- ``list [--kind K] [--dtype D] [--head-dim N]``: the attention variants the active lock provides, with the
  FlashInfer release each comes from (``--json``: also the symbols each module on disk references that
  nothing provides).
- ``smoke [--device N]``: run each op once on the GPU against a reference; without a GPU, say so, print the
  doctor summary and exit 1.
- ``generate --model DIR --prompt-ids 1,2,3 [--prompt-ids ...] --max-new-tokens N [--graph] [--tp N]``: serve token-id
  prompts with a local checkpoint, on the engine its ``model_type`` needs (:func:`fi_engine.engines.engine_class`:
  Llama/Qwen3/Mixtral/Qwen3-MoE, Gemma 2, gpt-oss, DeepSeek; the ``llama`` extra); prints the tokens, tokens/s and
  host time per decode step.
- ``launch --nproc N [--master-addr A] [--master-port P] -- cmd ...``: start N ranks of ``cmd`` on this host
  with the torchrun variables and NVLink multicast off (:mod:`fi_ffi.comm.launch`); exits with the worst rank's
  status.

Exit status: 0 success; 1 a check failed (``smoke``, ``cache verify``, ``list`` matching nothing); 2 a usage
error or an fi_ffi error (message on stderr, no traceback); 130 interrupted; 141 the output's reader closed
the pipe (``fi-ffi list | head``).

"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__

# Variables the test suite reads (tests/conftest.py); doctor lists them as known, not as typos.
TEST_VARIABLES = (
    "FI_FFI_RUN_GPU_TESTS",
    "FI_FFI_TEST_WHEELS",
    "FI_FFI_TEST_ALLOW_NETWORK",
    "FI_FFI_TEST_WHEELS_COMM",
    "FI_FFI_TEST_WHEELS_072",
    "FI_FFI_TEST_WHEELS_MODELS",
    "FI_FFI_TEST_RELEASE",
)
# Variables fi_ffi.comm reads (tensor parallelism)
COMM_VARIABLES = ("FI_FFI_NCCL_BACKEND", "FI_FFI_RENDEZVOUS_TIMEOUT")


def active_settings() -> list[dict[str, str]]:
    """Every ``FI_FFI_*`` environment variable that is set: name, value and a note (``""``, or what is wrong).

    A name fi_ffi does not read is flagged (a typo such as ``FI_FFI_OFLINE`` silently does nothing otherwise).
    """
    import os

    from ..loader import settings

    known = set(settings.ALL) | set(TEST_VARIABLES) | set(COMM_VARIABLES)
    problems = settings.problems()
    rows = []
    for name in sorted(n for n in os.environ if n.startswith("FI_FFI_")):
        note = problems.get(name, "") if name in known else "not a variable fi_ffi reads (a typo?)"
        rows.append({"name": name, "value": os.environ[name], "note": note})
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
    return status


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
    return {
        "fi_ffi": __version__,
        "system": facts.as_dict(),
        "settings": active_settings(),
        "lock": lock,
        "gpu_coverage": gpu_coverage(facts.gpus, kernels) if kernels else [],
        "tvm_ffi_runtime": _runtime_status(),
        "cache": str(loader.cache_root()),
        "cache_problem": cache_problem(loader.cache_root()),
        "module_symbols": module_symbols(),
    }


def cache_problem(root: Path) -> str:
    """Why the cache folder ``root`` cannot be used (``""``: it is a writable folder, or can be made in a writable
    one)."""
    import os

    if root.exists():
        if not root.is_dir():
            return f"{root} is a file, not a folder; set FI_FFI_CACHE_DIR to a folder"
        if not os.access(root, os.W_OK | os.X_OK):
            return f"{root} is not writable by this user; set FI_FFI_CACHE_DIR to a folder it can write"
        return ""
    parent = root.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{root} does not exist and cannot be made in {parent}; set FI_FFI_CACHE_DIR to a writable folder"
    return ""


def _print_doctor(data: dict[str, Any]) -> None:
    s = data["system"]
    print(f"fi_ffi {data['fi_ffi']}  Python {s['python']}  {s['arch']}  {s['glibc'] or 'libc: unknown'}")
    print(f"NVIDIA driver:  {s['driver_version'] or 'not available: ' + s['driver_error']}")
    runtime = f"{s['runtime_version']} ({s['runtime_path']})" if s["runtime_version"] else s["runtime_error"]
    print(f"CUDA runtime:   {runtime}")
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


def cmd_doctor(args: argparse.Namespace) -> int:
    data = doctor_data()
    if args.json:
        json.dump(data, sys.stdout, indent=2, default=str)
        print()
    else:
        _print_doctor(data)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from .. import loader

    paths = []
    if args.wheel:
        for wheel in args.wheel:
            paths += loader.fetch(wheel)
    else:
        paths = loader.fetch(all_entries=args.all)
    if args.json:
        json.dump([str(p) for p in paths], sys.stdout, indent=2)
        print()
        return 0
    for path in paths:
        print(path)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .. import loader

    if args.action == "path":
        _emit(args, {"path": str(loader.cache_root())}, lambda: print(loader.cache_root()))
    elif args.action == "list":
        entries = loader.list_cache()
        rows = [{"kind": e.kind, "path": str(e.path), "size": e.size, "detail": e.detail} for e in entries]

        def table() -> None:
            if not entries:
                print(f"the cache {loader.cache_root()} is empty")
                return
            print(f"{'KIND':9s} {'SIZE':>10s}  PATH  DETAIL")
            for entry in entries:
                print(f"{entry.kind:9s} {_size_text(entry.size):>10s}  {entry.path}  {entry.detail}")

        _emit(args, rows, table)
    elif args.action == "verify":
        try:
            report = loader.verify_cache(full=args.full)
        except OSError as exc:  # verify reports what it finds; this is the cache root itself failing
            print(f"fi-ffi cache verify: cannot read the cache {loader.cache_root()}: {exc}", file=sys.stderr)
            return 2
        kept = dict(report.kept)
        if args.json:
            _emit(
                args,
                {
                    "checked": report.checked,
                    "bad": [{"path": str(p), "problem": why, "removed": p not in kept} for p, why in report.bad],
                    "kept": [{"path": str(p), "why": why} for p, why in report.kept],
                    "removed_tmp": report.removed_tmp,
                    "read_only": report.read_only,
                },
                lambda: None,
            )
            return 0 if report.ok else 1
        for path, problem in report.bad:
            print(f"{'kept' if path in kept else 'removed'} {path}: {problem}")
        for path, why in report.kept:
            print(f"  left in place: {path}: {why}")
        left = sum(path in kept for path, _ in report.bad)
        if report.read_only:
            action = "found, nothing changed: the cache is read-only"
        elif left:
            action = f"{len(report.bad) - left} removed (fetched or extracted again on next use), {left} left in place"
        else:
            action = "removed; fetched or extracted again on next use"
        print(
            f"checked {report.checked} files, {len(report.bad)} bad ({action}), {report.removed_tmp} "
            f"temporary files of dead processes removed"
        )
        return 0 if report.ok else 1
    elif args.action == "clear":
        cleared = loader.clear_cache()
        if args.json:
            _emit(
                args,
                {
                    "removed": [{"path": str(p), "size": n} for p, n in cleared.removed],
                    "kept": [{"path": str(p), "why": why} for p, why in cleared.kept],
                    "failed": [{"path": str(p), "why": why} for p, why in cleared.failed],
                    "freed": cleared.freed,
                },
                lambda: None,
            )
            return 1 if cleared.failed else 0
        for path, size in cleared.removed:
            print(f"removed {path} ({size / 2**20:.1f} MiB)")
        for path, why in cleared.kept:
            print(f"kept    {path}: {why}")
        if cleared.removed:
            summary = (
                f"freed {cleared.freed / 2**20:.1f} MiB in {loader.cache_root()}; removed {len(cleared.removed)} "
                f"entries fi_ffi created"
            )
        else:
            summary = f"nothing removed from {loader.cache_root()}"
        print(f"{summary}, kept {len(cleared.kept)}")
        if cleared.failed:
            print(
                f"fi-ffi cache clear: could not remove {len(cleared.failed)} of fi_ffi's files (listed above as "
                f"'could not remove it'); is the cache read-only, or another user's?",
                file=sys.stderr,
            )
            return 1
    return 0


def _lock_arguments(wheels: Sequence[str], url: str | None) -> str:
    """What is wrong with ``fi-ffi lock``'s arguments before any wheel is opened (``""``: nothing)."""
    import os
    import urllib.parse

    for text in wheels:
        path = Path(os.path.expanduser(text))
        if path.is_dir():
            return f"{text} is a folder; name its wheels (fi-ffi lock {os.path.join(text, '*.whl')})"
        if not path.exists():
            if any(c in text for c in "*?["):
                return f"{text} matched no file (the shell passes a pattern that matches nothing as it is)"
            return f"{text}: no such file"
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.netloc):
            return f"--url: expected an http(s):// or file:// address of the wheel, got {url!r}"
        if len(wheels) > 1:
            return "--url: names one wheel's address; lock one wheel per --url (or edit the lock's url fields)"
    return ""


def _size_text(n: int) -> str:
    """``n`` bytes for a reader: ``812 B``, ``4.0 KiB``, ``1.2 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _emit(args: argparse.Namespace, data: Any, table: Any) -> None:
    """``--json``: ``data`` as JSON on stdout; else ``table()`` prints the human form."""
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, default=str)
        print()
    else:
        table()


def cmd_lock(args: argparse.Namespace) -> int:
    from .. import loader

    problem = _lock_arguments(args.wheels, args.url)
    if problem:
        print(f"fi-ffi lock: {problem}", file=sys.stderr)
        return 2
    pins, notes = loader.lock_entries(args.wheels, kind=args.kind, url=args.url or "")
    for note in notes:  # e.g. the 0.7.x flashinfer-jit-cache metadata wheel: its modules are in provider wheels
        print(f"fi-ffi lock: {note}", file=sys.stderr)
    sys.stdout.write(loader.dump_lock(pins, header="generated by fi-ffi lock"))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .. import loader
    from ..ops.attention import variants

    try:
        with loader.listing_without_download():  # a wheel not here: its central directory, not 1-2 GB
            rows = variants.list_variants(kind=args.kind, dtype=args.dtype, head_dim=args.head_dim)
    except (ValueError, TypeError) as exc:  # an argument the parser let through; the text names it
        print(f"fi-ffi list: {exc}", file=sys.stderr)
        return 2
    if args.json:
        symbols = module_symbols()
        if symbols["error"]:
            print(f"fi-ffi list: module symbols not checked: {symbols['error']}", file=sys.stderr)
        for row in rows:  # a list of names (empty: all provided), or null: the module is not on disk yet
            checked = symbols["modules"].get(row["uri"])
            row["unresolved_symbols"] = checked["unresolved"] if checked is not None else None
        json.dump(rows, sys.stdout, indent=2)
        print()
    if rows and not args.json:
        table = [("KIND", "BACKEND", "DTYPES", "HEAD_DIM", "RELEASE", "MODULE")]
        for row in rows:
            dtypes = "/".join(dict.fromkeys((row["dtype_q"], row["dtype_kv"], row["dtype_o"])))
            heads = (
                f"{row['head_dim_qk']}"
                if row["head_dim_qk"] == row["head_dim_vo"]
                else f"{row['head_dim_qk']}/{row['head_dim_vo']}"
            )
            table.append((row["kind"], row["backend"], dtypes, heads, row["release"] or "-", row["uri"]))
        widths = [max(len(r[i]) for r in table) for i in range(5)]
        for r in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    if not rows:
        print("no variant matches", file=sys.stderr)
        return 1
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from ..cuda import system
    from . import smoke

    gpus, why = system.gpus()
    if not gpus and args.json:
        json.dump({"error": f"needs a CUDA GPU: {why}", "doctor": doctor_data()}, sys.stdout, indent=2, default=str)
        print()
        return 1
    if not gpus:
        print(f"fi-ffi smoke needs a CUDA GPU: {why}\n")
        _print_doctor(doctor_data())
        return 1
    try:
        smoke.check_ordinal(args.device, gpus)
    except ValueError as exc:
        print(f"fi-ffi smoke: {exc}", file=sys.stderr)
        return 2
    results = smoke.run(args.device)
    if args.json:
        json.dump([dataclasses.asdict(r) for r in results], sys.stdout, indent=2, default=str)
        print()
        return 1 if any(not r.passed for r in results) else 0
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        extra = f"  {r.detail}" if r.detail else ""
        print(f"{verdict}  {r.name:40s} max|err| {r.max_error:9.2e}  host {r.host_us:7.2f} us/call{extra}")
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


# `fi-ffi list --kind`: the variant kinds (ops.attention.variants.KINDS; a test keeps the two equal) and families.
LIST_KINDS = (
    "single_prefill",
    "batch_prefill",
    "single_decode",
    "batch_decode",
    "batch_mla",
    "prefill",
    "decode",
    "mla",
)

# Spellings of `--dtype` beyond fi_ffi.dtypes' names: the "fp" forms common in other tools' flags.
_DTYPE_ALIASES = {"fp16": "float16", "fp32": "float32", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def _q_dtype(text: str) -> str:
    """argparse type of ``--dtype``: any name :func:`fi_ffi.dtypes.dtype` accepts, or an ``fp`` alias; returns
    the canonical name. A bad name is a usage error (exit 2) listing what is accepted."""
    from .. import dtypes

    name = _DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    try:
        return dtypes.dtype(name).name
    except TypeError:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}: use float16 (f16, fp16), bfloat16 (bf16), float8_e4m3fn (e4m3) or "
            f"float8_e5m2 (e5m2)"
        ) from None


def _int_at_least(text: str, lowest: int, what: str) -> int:
    """``text`` as an int >= ``lowest`` for argparse; ``what`` describes it in the error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _count(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _seed(text: str) -> int:
    value = _count(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {value}")
    return value


def _temperature(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: greedy), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0: greedy), got {text}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text}")
    return value


def _ordinal(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a CUDA device ordinal (0, 1, ...), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a CUDA device ordinal (0, 1, ...), got {value}")
    return value


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
    import os

    from ..errors import FiFFIError

    rank = os.environ.get("RANK")
    # Under --tp every rank runs this command: what is the same on every rank (the checkpoint's config, whether
    # --tp divides it, whether there are GPUs enough) is checked once by the driver before any rank starts, and a
    # rank prefixes what it reports with its number (its own GPU or communicator may differ from the others').
    where = "fi-ffi generate" if args.tp == 1 or rank is None else f"fi-ffi generate [rank {rank}]"
    try:
        from fi_engine.deepseek_config import is_deepseek
        from fi_engine.engines import engine_class
        from fi_engine.llama import SamplingParams

        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        if is_deepseek(args.model) and args.tp > 1:  # model_type deepseek_v2 / deepseek_v3 (the engine refuses too)
            raise ValueError(f"--tp {args.tp}: DeepSeek checkpoints run on one GPU here; leave out --tp")
        if args.tp > 1 and rank is None:  # the driver: start the ranks, each runs this same command
            if args.device is not None:
                raise ValueError("--device: each rank of --tp uses GPU LOCAL_RANK; leave --device out")
            _check_tp(args.model, args.tp)
            from ..comm import launch

            return launch.main(args.tp, [sys.executable, "-m", "fi_ffi", *args.argv], "127.0.0.1", None, 10.0)
        engine_type = engine_class(args.model)  # LlamaEngine, Gemma2Engine, GptOssEngine or DeepSeekEngine
        with engine_type(
            args.model,
            max_batch=args.max_batch or len(args.prompt_ids),
            cuda_graph=args.graph,
            device=args.device,
            tensor_parallel=args.tp,
        ) as engine:
            result = engine.generate(
                args.prompt_ids, args.max_new_tokens, eos_token_ids=args.eos_ids, sampling=sampling
            )
    except (ValueError, TypeError, ImportError, FiFFIError) as exc:  # a bad checkpoint or argument; no GPU; no CuPy
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    if engine.rank != 0:  # with --tp, only rank 0 prints
        return 0
    for i, (tokens, why) in enumerate(zip(result.tokens, result.finish_reasons, strict=True)):
        print(f"[{i}] {','.join(map(str, tokens))}  ({why})")
    mode = "CUDA graph" if args.graph else "eager"
    print(
        f"prefill: {result.prefill_s * 1e3:.1f} ms; decode ({mode}): {result.decode_steps} steps, "
        f"{result.decode_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, host time per step "
        f"{result.host_us_per_step:.1f} us (median)"
    )
    return 0


def _check_tp(model: str, tp: int) -> None:
    """What every rank of ``generate --tp`` would find the same, checked once before they start: the checkpoint's
    config, that ``tp`` divides it, and that this host has ``tp`` GPUs."""
    from fi_engine.config import LlamaConfig
    from fi_engine.tensor_parallel import shard_config

    from ..cuda import system
    from ..errors import UnsupportedDeviceError

    shard_config(LlamaConfig.from_dir(model), tp)  # every LlamaConfig model type (Gemma 2 and gpt-oss too)
    found, why = system.gpus()
    if len(found) < tp:
        raise UnsupportedDeviceError(
            f"--tp {tp}: needs {tp} GPUs on this host (one per rank), found {len(found)}"
            f"{f' ({why})' if why else ''}; use --tp {max(len(found), 1)} or a machine with more GPUs"
        )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # -q/-v before or after the subcommand
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or progress lines"
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log what the loader does to stderr (-vv: debug detail)",
    )
    parser = argparse.ArgumentParser(
        prog="fi-ffi",
        description="FlashInfer kernels over TVM-FFI, from Python: set up, inspect and check them.",
        epilog="Run `fi-ffi COMMAND --help` for a command's options and examples. Exit status: 0 success, 1 a check "
        "failed, 2 a usage or fi_ffi error.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"fi-ffi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, 100),
            epilog="examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )

    p = command(
        "doctor",
        "report driver, CUDA, GPUs, lock selection and cache",
        "Report what this machine offers and what fi_ffi would use: the NVIDIA driver, the CUDA runtime, the GPUs "
        "and whether the selected kernel wheels cover them, the FI_FFI_* variables (flagging bad values and "
        "typos), the lock and where each wheel would come from, the TVM-FFI runtime and the cache. Exits 0.",
        "fi-ffi doctor\nfi-ffi doctor --json",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
    p = command(
        "fetch",
        "fill the cache from the lock, the wheelhouse or local wheels",
        "Put the wheels the lock selects for this machine into the cache (from FI_FFI_WHEELHOUSE, the lock's "
        "path, or a download), sha256-verified; or copy local wheels the lock pins (--wheel). Prints each path.",
        "fi-ffi fetch\nfi-ffi fetch --all\nfi-ffi fetch --wheel ./flashinfer_jit_cache-0.6.3+cu130-cp39-abi3-"
        "manylinux_2_28_x86_64.whl",
    )
    p.add_argument("--wheel", action="append", help="a local wheel pinned by the lock (repeatable)")
    p.add_argument("--all", action="store_true", help="every wheel in the lock, all architectures")
    p.add_argument("--json", action="store_true", help="the paths as a JSON list")
    p.set_defaults(func=cmd_fetch)
    p = command(
        "cache",
        "path, list, verify or clear the cache",
        "path: print the cache folder. list: what it holds. verify: check every file (--full: re-hash all, and "
        "the wheels the lock pins outside the cache); damaged files of fi_ffi's are removed, others reported; exit "
        "1 if any is bad. clear: remove what fi_ffi created; exit 1 if some of it could not be removed.",
        "fi-ffi cache path\nfi-ffi cache list --json\nfi-ffi cache verify --full\nfi-ffi cache clear",
    )
    p.add_argument("action", choices=["path", "list", "verify", "clear"], help="what to do")
    p.add_argument("--full", action="store_true", help="verify: re-hash every file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cache)
    p = command(
        "lock",
        "print a lock pinning local wheels (use with FI_FFI_LOCK)",
        "Print a lock file (TOML) pinning the given wheels by sha256, with their CUDA version, arch, GPU archs and "
        "FlashInfer release read from the files. Save it and point FI_FFI_LOCK at it to use self-built or "
        "mirrored wheels; put the wheels in a folder named by FI_FFI_WHEELHOUSE.",
        "fi-ffi lock ../wheels/*.whl > my.lock && export FI_FFI_LOCK=$PWD/my.lock\n"
        "fi-ffi lock --url https://mirror.example/w/x.whl x.whl",
    )
    p.add_argument("wheels", nargs="+", metavar="WHEEL", help="wheel files (.whl) to pin; a folder is refused")
    p.add_argument(
        "--kind",
        choices=["kernel", "runtime"],
        default=None,
        help="what the wheels hold (default: read from their members)",
    )
    p.add_argument("--url", help="http(s):// or file:// address the (one) wheel can be downloaded from")
    p.set_defaults(func=cmd_lock)
    p = command(
        "list",
        "attention variants the active lock provides",
        "List the attention variants (kind, backend, dtypes, head dims, FlashInfer release, module) of the wheels "
        "the lock selects. A wheel that is not here is read from its URL's zip central directory, not downloaded. "
        "Exit 1 when nothing matches.",
        "fi-ffi list\nfi-ffi list --kind decode --dtype bf16 --head-dim 128\nfi-ffi list --json",
    )
    p.add_argument(
        "--kind",
        choices=LIST_KINDS,
        metavar="KIND",
        help=f"one of {', '.join(LIST_KINDS)} ('prefill'/'decode': single and batch)",
    )
    p.add_argument(
        "--dtype",
        type=_q_dtype,
        metavar="DTYPE",
        help="q dtype: float16 (f16, fp16), bfloat16 (bf16), float8_e4m3fn (e4m3), float8_e5m2 (e5m2)",
    )
    p.add_argument("--head-dim", type=_positive_int, metavar="N", help="head dimension (qk or vo)")
    p.add_argument("--json", action="store_true", help="one object per variant, with every field")
    p.set_defaults(func=cmd_list)
    p = command(
        "smoke",
        "run each op once on the GPU against a reference",
        "Run rmsnorm, fused_add_rmsnorm, append_paged_kv_cache, batch decode, single prefill and (SM90) GDN "
        "prefill once against a numpy reference; print pass/fail and host time per call. Exit 1 on a failure, or "
        "without a GPU (then the doctor summary is printed).",
        "fi-ffi smoke\nfi-ffi smoke --device 1 --json",
    )
    p.add_argument("--device", type=_ordinal, default=0, help="CUDA ordinal (0 to the GPU count - 1)")
    p.add_argument("--json", action="store_true", help="one object per check")
    p.set_defaults(func=cmd_smoke)
    p = command(
        "generate",
        "serve token-id prompts with a local checkpoint (needs CuPy and a GPU)",
        "Load a Hugging Face checkpoint (Llama, Qwen3, Mixtral, Qwen3-MoE, Gemma 2, gpt-oss, DeepSeek; f16/bf16) "
        "onto the GPU and generate from token-id prompts; prints the tokens, tokens/s and host time per decode "
        "step. Needs CuPy (python -m pip install cupy-cuda13x). Every value is checked before the GPU is touched.",
        "fi-ffi generate --model ./SmolLM2-135M --prompt-ids 1,2,3 --max-new-tokens 16\n"
        "fi-ffi generate --model ./m --prompt-ids 1,2 --prompt-ids 4,5 --temperature 0.7 --top-p 0.9 --graph\n"
        "fi-ffi generate --model ./m --prompt-ids 1,2,3 --tp 2",
    )
    p.add_argument("--model", required=True, help="checkpoint directory: config.json + *.safetensors (f16/bf16)")
    p.add_argument(
        "--prompt-ids",
        type=_token_ids,
        action="append",
        required=True,
        help="one prompt as comma-separated token ids (repeat for a batch)",
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate per prompt (>= 1)")
    p.add_argument("--graph", action="store_true", help="replay the decode step as a CUDA graph")
    p.add_argument("--max-batch", type=_positive_int, default=None, help="batch slots (default: the number of prompts)")
    p.add_argument(
        "--eos-ids", type=_eos_ids, help="comma-separated end-of-sequence ids, or 'none' (default: the checkpoint's)"
    )
    p.add_argument("--temperature", type=_temperature, default=0.0, help="a finite value >= 0; 0 (default): greedy")
    p.add_argument("--top-k", type=_count, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=_probability, default=1.0, help="sample within this probability mass, in (0, 1]")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed, in [0, 2**64)")
    p.add_argument("--device", type=_ordinal, default=None, help="CUDA ordinal (default 0)")
    p.add_argument(
        "--tp", type=_positive_int, default=1, help="tensor-parallel ranks on this host (one GPU each; default 1)"
    )
    p.set_defaults(func=cmd_generate)
    p = command(
        "launch",
        "start N ranks of a command on this host (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set)",
        "Start N ranks of a command on this host, one per GPU, with the variables torchrun sets and NVLink "
        "multicast off. When a rank fails the others are stopped; the failing rank is named and its status "
        "returned.",
        "fi-ffi launch --nproc 2 -- python my_tp_app.py\nfi-ffi launch --nproc 4 --master-port 29500 -- fi-ffi "
        "generate --model ./m --prompt-ids 1,2 --tp 4",
    )
    p.add_argument("--nproc", type=_positive_int, required=True, help="number of ranks (one per GPU)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address (default 127.0.0.1)")
    p.add_argument("--master-port", type=_port, default=None, help="rendezvous port (default: a free one)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each rank runs")
    p.set_defaults(func=cmd_launch)
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1..65535), got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1..65535), got {value}")
    return value


def cmd_launch(args: argparse.Namespace) -> int:
    from ..comm import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print(
            "fi-ffi launch: expected a command after `--` (fi-ffi launch --nproc 2 -- python app.py)", file=sys.stderr
        )
        return 2
    return launch.main(args.nproc, command, args.master_addr, args.master_port, args.grace)


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit status (0 ok, 1 check failed, 2 usage or fi_ffi error).

    Output piped into a reader that stops early (``fi-ffi list | head``) ends the command quietly with status
    141, as for other Unix tools; Ctrl-C ends it with 130, without a traceback.
    """
    from ..errors import FiFFIError

    command = "fi-ffi"
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version, usage errors: argparse printed and asked to exit
            sys.stdout.flush()
            return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
        command = f"fi-ffi {args.command}"
        _apply_verbosity(getattr(args, "quiet", False), getattr(args, "verbose", 0))
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what `generate --tp N` restarts as its ranks
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return status
    except FiFFIError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a pipe of our own (a download, pip): a real error, not the reader of our output leaving
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def _apply_verbosity(quiet: bool, verbose: int) -> None:
    """``-q``: no progress bars or ``fi_ffi:`` progress lines (``FI_FFI_QUIET=1`` for this process and the ranks
    or children it starts); ``-v``/``-vv``: the loader's log at INFO/DEBUG on stderr."""
    import logging
    import os

    if quiet:
        os.environ["FI_FFI_QUIET"] = "1"
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fi_ffi: %(message)s"))
        logger = logging.getLogger("fi_ffi")
        logger.addHandler(handler)  # a handler of our own: announce() then prints nothing twice
        logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reading end is closed."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor to ask: stdout is the pipe we write to
        return True


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())

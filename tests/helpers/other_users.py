"""Loader faults that need root, for the loader tests (``tests/loader/test_faults.py``,
``tests/loader/test_cache_repair.py``): a mounted file system (a full disk, a read-only one), a cache, lock and
wheelhouse that user ``nobody`` can reach, a child interpreter run as ``nobody``, and a tree handed to another
owner."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.env import subprocess_env

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, or setpriv to another user)")


@contextlib.contextmanager
def mounted(*args: str) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="fi_ffi-mnt-"))
    done = subprocess.run(["mount", *args, str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount here ({done.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


# A child running as `nobody`, for whom file modes count. It prints one line per result.
AS_NOBODY = """
import os, sys
from fi_ffi import loader
from fi_ffi.errors import LoaderError
what = sys.argv[1]
try:
    if what == "verify":
        report = loader.verify_cache(full=True)
        print("BAD", [(str(p), why) for p, why in report.bad])
    print("PATH", loader.module_path(sys.argv[2]))
    print("BYTES", len(open(loader.module_path(sys.argv[2]), "rb").read()))
except LoaderError as exc:
    print("LOADERERROR", exc)
"""


@contextlib.contextmanager
def nobody_world(synthetic: Path) -> Iterator[dict[str, str]]:
    """A cache, lock and wheelhouse that `nobody` can reach (pytest's tmp folders are root-only)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed: cannot run a child as another user")
    top = Path(tempfile.mkdtemp(prefix="fi_ffi-nobody-"))
    try:
        os.chmod(top, 0o755)
        shutil.copytree(synthetic.parent, top / "house")
        shutil.copy(os.environ["FI_FFI_LOCK"], top / "tiny.lock")
        env = {
            "FI_FFI_CACHE_DIR": str(top / "cache"),
            "FI_FFI_LOCK": str(top / "tiny.lock"),
            "FI_FFI_WHEELHOUSE": str(top / "house"),
            "HOME": str(top),
        }
        yield env
    finally:
        shutil.rmtree(top, ignore_errors=True)


SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def as_nobody(env: dict[str, str], *args: str) -> str:
    # everything the child imports: a virtual environment in a root-only folder (CI's) is unreadable for nobody
    probe_code = "import fi_ffi.loader, filelock, platformdirs, cffi, numpy"
    probe = subprocess.run([*SETPRIV, sys.executable, "-c", probe_code], capture_output=True, text=True,
                           env=subprocess_env(**env))  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot import fi_ffi with this Python: {probe.stderr.strip()[-200:]}")
    done = subprocess.run(
        [*SETPRIV, sys.executable, "-c", AS_NOBODY, *args],
        capture_output=True,
        text=True,
        env=subprocess_env(**env),
        timeout=120,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done.stdout


def chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for p in path.rglob("*"):
        os.chown(p, uid, gid, follow_symlinks=False)

"""What a new user meets first: set-up, the test suite outside the team's machines, the first call's errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO, subprocess_env

LOADER_VARIABLES = ("FI_FFI_LOCK", "FI_FFI_WHEELHOUSE", "FI_FFI_TEST_WHEELS", "FI_FFI_CACHE_DIR", "FI_FFI_RUNTIME",
                    "FI_FFI_CUDA_VERSION", "FI_FFI_SM")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def copy_checkout(dest: Path) -> Path:
    """The tests, package and lock copied to ``dest/repo``; ``dest/shared`` does not exist."""
    repo = dest / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis")
    for folder in ("tests", "fi_ffi"):
        shutil.copytree(REPO / folder, repo / folder, ignore=ignore, symlinks=True)
    for name in ("pyproject.toml", "wheels.lock"):
        shutil.copy(REPO / name, repo / name)
    return repo


def test_suite_without_the_shared_wheel_skips_and_says_why(tmp_path: Path) -> None:
    # A checkout with no ../shared/wheels and no FI_FFI_TEST_WHEELS: the tests that load kernel modules must skip
    # with a message, not fail on the offline download of the upstream wheel (8 failed this way).
    repo = copy_checkout(tmp_path)
    assert not (repo.parent / "shared").exists()
    env = {k: v for k, v in subprocess_env().items() if k not in LOADER_VARIABLES}
    env["PYTHONPATH"] = str(repo)  # the copy, not the checkout, so that <repo>/../shared is the missing folder
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--ignore=tests/test_first_use.py",
         "tests/test_norm.py", "tests/test_page.py", "tests/test_gdn.py", "tests/test_cli.py", "tests/test_plan.py"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " failed" not in done.stdout
    assert "needs the shared test kernel wheel" in done.stdout and "FI_FFI_TEST_WHEELS" in done.stdout


def test_no_test_names_a_folder_outside_the_checkout_as_a_fallback() -> None:
    for path in (REPO / "tests").glob("*.py"):
        if path.name == Path(__file__).name:  # this file names the pattern it looks for
            continue
        assert "/work/" not in path.read_text(), f"{path.name} hard-codes a folder outside the checkout"

"""After the README's editable install, a type checker finds fi_ffi from code outside the checkout.

setuptools installs a flat-layout project editable through an import hook (a ``__editable__`` finder), which mypy
cannot follow: user code outside the checkout then reads ``Cannot find implementation or library stub for module
named "fi_ffi"``, and the package's stubs and ``Literal`` types help nobody. ``package-dir = {"" = "."}`` in
pyproject.toml makes the editable install a static ``.pth`` entry naming the checkout instead.

The test builds a fresh virtual environment, installs a copy of the checkout's package files into it with
``pip install -e`` (the README's command; ``--no-deps``: the extras' packages do not change how fi_ffi is found, and
leaving them out keeps the test near 20 s, the build backend coming from pip's cache), then runs this environment's
mypy with ``--python-executable`` pointing at that venv on a user file in another folder that passes a wrong
``Literal`` value: mypy must find fi_ffi (no import error) and report the argument.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from helpers.env import REPO

pytestmark = pytest.mark.slow

USER_CODE = """\
import fi_ffi


def decode(t: fi_ffi.Tensor) -> None:
    fi_ffi.single_decode(t, t, t, kv_layout="XYZ", out=t)
"""
# What a pip install -e of the project reads: the build configuration and the packages (a copy, so that the
# build's egg-info lands in tmp_path, not in the checkout).
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "wheels.lock", "fi_ffi", "fi_engine")


def test_mypy_finds_fi_ffi_from_user_code_after_an_editable_install(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="needs mypy (the dev extra)")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.is_file():
            shutil.copy2(source, checkout / name)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(checkout)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if install.returncode != 0 and "No matching distribution found for setuptools" in install.stderr:
        pytest.skip(f"pip cannot fetch the build backend (setuptools>=77) here: {install.stderr.strip()[-300:]}")
    assert install.returncode == 0, install.stdout + install.stderr
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    pth = "".join(p.read_text() for p in site.glob("__editable__*.pth"))
    assert str(checkout) in pth and "import " not in pth, pth  # a path entry, not an import hook

    user = tmp_path / "user"
    user.mkdir()
    (user / "app.py").write_text(USER_CODE)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--python-executable", str(python), "app.py"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=user,
    )
    out = done.stdout + done.stderr
    assert "import-not-found" not in out and "Cannot find implementation" not in out, out
    assert done.returncode == 1, out
    assert 'Argument "kv_layout" to "single_decode" has incompatible type "Literal[\'XYZ\']"' in out, out
    assert "expected \"Literal['NHD', 'HND']\"" in out, out

"""What a new user meets first: set-up, the test suite on a plain clone, the first call's errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers.env import REPO, subprocess_env

LOADER_VARIABLES = (
    "FI_FFI_LOCK",
    "FI_FFI_WHEELHOUSE",
    "FI_FFI_TEST_WHEELS",
    "FI_FFI_CACHE_DIR",
    "FI_FFI_RUNTIME",
    "FI_FFI_CUDA_VERSION",
    "FI_FFI_SM",
)


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
    # the copy, not the checkout, so that <repo>/../shared is the missing folder; other entries (a --target site of
    # the dependencies, as on the GPU machine) stay
    others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *others])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            "--ignore=tests/package/test_first_use.py",
            "tests/ops/test_norm.py",
            "tests/ops/test_page.py",
            "tests/ops/test_gdn.py",
            "tests/cli/test_cli.py",
            "tests/ops/attention/test_plan.py",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " failed" not in done.stdout
    assert "needs the shared test kernel wheel" in done.stdout and "FI_FFI_TEST_WHEELS" in done.stdout


def test_no_test_names_a_folder_outside_the_checkout_as_a_fallback() -> None:
    for path in (REPO / "tests").glob("*.py"):
        if path.name == Path(__file__).name:  # this file names the pattern it looks for
            continue
        assert "/work/" not in path.read_text(), f"{path.name} hard-codes a folder outside the checkout"


# ---- set-up: libcudart without a system CUDA, commands that work from a checkout ---------------------------


def test_the_plain_install_brings_libcudart_on_linux() -> None:
    # `python -m pip install .` (the README's set-up) must give a loadable libcudart.so.13 on a machine without
    # a CUDA toolkit: the CUDA runtime wheel is a default dependency on Linux, not an extra.
    deps = pyproject()["project"]["dependencies"]
    runtime = [d for d in deps if d.replace(" ", "").startswith("nvidia-cuda-runtime")]
    assert runtime, deps
    assert ">=13.0,<14" in runtime[0].replace(" ", "") and "sys_platform=='linux'" in runtime[0].replace(" ", "")


def test_every_install_hint_names_an_extra_that_exists() -> None:
    # A hint such as `pip install fi-ffi[cudart]` names a package on no index: nothing a checkout can run.
    import re

    extras = set(pyproject()["project"]["optional-dependencies"])
    docs = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(docs) > 5  # the README, CONTRIBUTING and the docs by reader
    texts = {p: p.read_text() for p in [*docs, *sorted((REPO / "fi_ffi").rglob("*.py"))]}
    for path, text in texts.items():
        assert "fi-ffi[" not in text, f"{path} names an extra of the fi-ffi distribution, not installable here"
        for group in re.findall(r"pip install (?:-e )?'?\.\[([\w,-]+)\]", text):
            for extra in group.split(","):
                assert extra in extras, f"{path}: extra {extra!r} is not declared in pyproject.toml"


def test_the_old_llama_extra_installs_what_engine_does() -> None:
    # docs/engine.md: "the old extra name `llama` installs the same"; it once lacked the text layer's packages
    extras = pyproject()["project"]["optional-dependencies"]
    assert any(d.startswith("tokenizers") for d in extras["engine"])
    assert extras["llama"] == extras["engine"]


def test_no_engine_install_hint_names_one_of_its_packages_alone() -> None:
    # `pip install cupy-cuda13x` leaves out cuBLAS, tokenizers and jinja2: a hint for the engine names its extra
    import re

    sources = sorted((REPO / "fi_engine").rglob("*.py"))
    assert len(sources) > 20
    hints = [
        f"{p.relative_to(REPO)}: {m}" for p in sources for m in re.findall(r"pip install '?cupy\S*", p.read_text())
    ]
    assert hints == []


def test_gpu_test_dependencies_are_an_extra() -> None:
    extras = pyproject()["project"]["optional-dependencies"]
    assert any(d.startswith("torch") for d in extras["gpu-tests"])
    imports_torch = [p.name for p in (REPO / "tests").rglob("test_gpu_*.py") if "import torch" in p.read_text()]
    assert imports_torch  # the extra is there for these


# ---- packaging ------------------------------------------------------------------------------------------------


def test_license_is_the_declared_apache_2_0() -> None:
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table form
    assert project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190  # the full text
    build = pyproject()["build-system"]["requires"]
    assert any(
        r.replace(" ", "").startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77 for r in build
    ), "license expressions need setuptools >= 77"
    assert "Operating System :: POSIX :: Linux" in project["classifiers"]


def test_every_folder_of_the_packages_is_a_listed_package() -> None:
    # Python imports any folder as a (namespace) package, so setuptools warns "Package would be ignored" about a
    # folder under a package that `packages` does not list (fi_engine/kernels/csrc, the CUDA C, once; its files
    # are that package's data: tests/engine/test_cuda_sources.py)
    packages = pyproject()["tool"]["setuptools"]["packages"]
    folders = [d for name in ("fi_ffi", "fi_engine") for d in [REPO / name, *(REPO / name).rglob("*")] if d.is_dir()]
    dotted = sorted(str(d.relative_to(REPO)).replace("/", ".") for d in folders if d.name != "__pycache__")
    assert len(dotted) > 15 and "fi_engine.kernels.csrc" in dotted
    assert dotted == sorted(packages)


def test_the_sdist_manifest_carries_what_the_tests_need() -> None:
    # Without MANIFEST.in the sdist lacked tests/conftest.py (and the examples, benchmarks, tools, LICENSE).
    filelist = pytest.importorskip("setuptools._distutils.filelist", reason="reads MANIFEST.in as setuptools does")
    FileList = filelist.FileList

    files = FileList()
    files.allfiles = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    for line in (REPO / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            files.process_template_line(line)
    shipped = set(files.files)
    try:  # in a git checkout, every tracked file of those folders; in an unpacked sdist, what is there
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    except OSError:
        tracked = []
    # a copy of a checkout may carry a stale .git (the GPU machine's): only tracked files that are here count
    tracked = [f for f in tracked if (REPO / f).is_file()] or files.allfiles
    needed = {"LICENSE", "README.md", "CONTRIBUTING.md", "wheels.lock", "tests/conftest.py"}
    needed |= {"tests/helpers/attention_reference.py"}
    needed |= {f for f in tracked if f.split("/")[0] in ("tests", "examples", "benchmarks", "tools", "docs")}
    assert needed <= shipped, sorted(needed - shipped)


# ---- the first op call when the loader cannot provide the module ---------------------------------------------

FIRST_CALL = """
import numpy as np, fi_ffi
from fi_ffi.launch import kernels
kernels._driver_found = True  # as on a GPU machine: the loader is what fails here
host = np.zeros(4096, np.uint8)
ptr = (host.ctypes.data + 255) // 256 * 256
x = fi_ffi.Tensor.from_pointer(ptr, (4, 128), "float16", 0)
w = fi_ffi.Tensor.from_pointer(ptr + 2048, (128,), "float16", 0)
fi_ffi.rmsnorm(x, w, out=x)
"""


def test_a_loader_error_on_the_first_op_is_shown_alone(tmp_path: Path) -> None:
    # Offline, an empty cache and no wheelhouse: the first rmsnorm cannot get its module. The traceback must show
    # the LoaderError only, not an AttributeError about a thread-local 'bound' slot chained before it.
    env = {k: v for k, v in subprocess_env().items() if k not in LOADER_VARIABLES}
    env.update(FI_FFI_OFFLINE="1", FI_FFI_CACHE_DIR=str(tmp_path / "cache"), FI_FFI_QUIET="1")
    done = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "fi_ffi.errors.LoaderError" in done.stderr and "FI_FFI_OFFLINE" in done.stderr, done.stderr
    assert "AttributeError" not in done.stderr, done.stderr


# ---- contributing without ../shared -----------------------------------------------------------------------------


def test_build_test_wheels_names_what_it_lacks_instead_of_tracing_back(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("flashinfer") is not None:
        pytest.skip("flashinfer-python is installed here: the build would start")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "build_test_wheels.py"),
            "build",
            "core",
            "--out",
            str(tmp_path),
            "--modules",
            "norm",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "the build needs flashinfer-python==0.6.3" in done.stderr
    assert "pip install flashinfer-python==0.6.3 torch ninja" in done.stderr and "python -m venv" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing started


def test_contributing_without_shared_names_no_shared_path() -> None:
    # the section for a contributor outside the team pointed at ../shared/stubs and ../shared/wheels files
    text = (REPO / "CONTRIBUTING.md").read_text()
    section = text.split("### Without `../shared`", 1)[1].split("\n### ", 1)[0]
    assert "build_test_wheels.py build" in section and "FI_FFI_TEST_WHEELS=" in section
    assert "../shared" not in section.split("\n", 1)[1]


def test_the_readmes_two_commands_are_two() -> None:
    # the section showed a third (serving), which has a section of its own, with the way to a checkpoint first
    text = (REPO / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    assert section.count("```bash") == 2 and "fi-ffi smoke" in section and "pytest" in section
    serving = text.split("## Serving a checkpoint", 1)[1].split("\n## ", 1)[0]
    assert serving.index("hf download HuggingFaceTB/SmolLM2-135M-Instruct") < serving.index("fi-engine serve")
    for needed in ("config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert needed in serving, needed

"""The ``FI_FFI_*`` variables come from one table (fi_ffi/variables.py) that the readers use, ``fi-ffi doctor`` checks
against and the docs list: no read of an ``FI_FFI_*`` variable outside it, no name the table lacks, no row the docs
lack, and doctor flags each bad value and unknown name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from helpers.env import REPO, subprocess_env

from fi_ffi import variables

SOURCES = [p for root in ("fi_ffi", "fi_engine") for p in sorted((REPO / root).rglob("*.py"))]
TABLE = REPO / "fi_ffi" / "variables.py"
# Names that appear in the package as examples, not reads: doctor's docstring names a typo it catches.
EXAMPLES = {"FI_FFI_OFLINE"}


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "FI_FFI_..."`` constants."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _is_environ(node: ast.AST) -> bool:
    """``os.environ`` or a bare ``environ``."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def environ_reads(source: str) -> list[tuple[int, str]]:
    """Every read of the environment whose key is an ``FI_FFI_*`` name (a literal, or a module constant holding
    one): ``os.environ.get(K)``, ``os.environ[K]`` (not as an assignment target), ``os.getenv(K)``, ``K in
    os.environ``. (line, name) pairs."""
    tree = ast.parse(source)
    constants = _constants(tree)

    def name_of(key: ast.AST) -> str | None:
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            value = key.value
        elif isinstance(key, ast.Name):
            value = constants.get(key.id, "")
        else:
            return None
        return value if value.startswith("FI_FFI_") else None

    found = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr in ("get", "pop", "setdefault")
                and _is_environ(func.value)
            ):
                key = node.args[0] if func.attr == "get" else None
            elif isinstance(func, ast.Attribute) and func.attr == "getenv":
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and _is_environ(node.value) and isinstance(node.ctx, ast.Load):
            key = node.slice
        elif (
            isinstance(node, ast.Compare)
            and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
            and any(_is_environ(c) for c in node.comparators)
        ):
            key = node.left
        name = name_of(key) if key is not None else None
        if name is not None:
            found.append((node.lineno, name))
    return found


def test_no_fi_ffi_variable_is_read_outside_the_table() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in SOURCES
        if path != TABLE
        for line, name in environ_reads(path.read_text())
    ]
    assert bad == [], "read it with fi_ffi.variables (raw, flag, seconds, choice) instead:\n" + "\n".join(bad)


def test_the_read_check_finds_each_way_of_reading() -> None:  # the check above could fail
    source = (
        "import os\nfrom os import environ\nNAME = 'FI_FFI_X'\n"
        "a = os.environ.get('FI_FFI_A')\nb = os.environ[NAME]\nc = os.getenv('FI_FFI_C')\n"
        "d = 'FI_FFI_D' in os.environ\ne = environ.get('FI_FFI_E', '')\n"
        "os.environ['FI_FFI_QUIET'] = '1'\nf = os.environ.get('HOME')\n"
    )
    assert [name for _, name in environ_reads(source)] == ["FI_FFI_A", "FI_FFI_X", "FI_FFI_C", "FI_FFI_D", "FI_FFI_E"]


def test_every_fi_ffi_name_in_the_package_is_a_row() -> None:
    named = {m for path in SOURCES for m in re.findall(r"FI_FFI_[A-Z0-9_]*[A-Z0-9]", path.read_text())}
    assert named - set(variables.VARIABLES) - EXAMPLES == set()


def test_every_row_is_documented() -> None:
    docs = (REPO / "docs" / "operations.md").read_text() + (REPO / "CONTRIBUTING.md").read_text()
    missing = [name for name in variables.VARIABLES if f"`{name}" not in docs]
    assert missing == []


def test_a_reader_of_a_name_without_a_row_is_refused() -> None:
    with pytest.raises(KeyError, match="FI_FFI_NOT_A_ROW is not in fi_ffi.variables.VARIABLES"):
        variables.raw("FI_FFI_NOT_A_ROW")


def test_the_nccl_backend_choices_are_the_backends() -> None:
    from fi_ffi.comm import nccl

    assert variables.VARIABLES["FI_FFI_NCCL_BACKEND"].choices == tuple(nccl._BACKENDS)


@pytest.mark.parametrize(
    ("name", "value", "note"),
    [
        ("FI_FFI_NCCL_BACKEND", "mpi", "FI_FFI_NCCL_BACKEND='mpi': expected one of nccl4py, cupy"),
        ("FI_FFI_RENDEZVOUS_TIMEOUT", "-1", "FI_FFI_RENDEZVOUS_TIMEOUT='-1': expected a number of seconds > 0"),
        ("FI_FFI_RUN_GPU_TESTS", "maybe", "FI_FFI_RUN_GPU_TESTS='maybe': expected 1 (or true/yes/on)"),
        ("FI_FFI_TEST_RELEASE", "0.8", "FI_FFI_TEST_RELEASE='0.8': expected one of 0.6.3, 0.7.2"),
        ("FI_FFI_LOCK_TIMEOUT", "inf", "FI_FFI_LOCK_TIMEOUT='inf': expected a number of seconds >= 0"),
        ("FI_FFI_CACHE_DIRR", "/tmp", "not a variable fi_ffi reads, a typo? (did you mean FI_FFI_CACHE_DIR?)"),
        ("FI_FFI_WHATEVER", "1", "FI_FFI_WHATEVER: not a variable fi_ffi reads, a typo?"),
    ],
)
def test_doctor_flags_the_value(monkeypatch: pytest.MonkeyPatch, name: str, value: str, note: str) -> None:
    from fi_ffi.cli import doctor

    monkeypatch.setenv(name, value)
    rows = {row["name"]: row for row in doctor.active_settings()}
    assert rows[name]["value"] == value and note in rows[name]["note"], rows[name]


def test_doctor_prints_each_flag_and_exits_zero() -> None:
    env = {"FI_FFI_NCCL_BACKEND": "mpi", "FI_FFI_RENDEZVOUS_TIMEOUT": "-1", "FI_FFI_RUN_GPU_TESTS": "maybe"}
    done = subprocess.run(
        [sys.executable, "-m", "fi_ffi", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(**env),
    )
    assert done.returncode == 0, done.stderr
    for name, value in env.items():
        assert f"  {name}={value}   <- {name}={value!r}: expected " in done.stdout, done.stdout


def test_good_values_are_not_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "FI_FFI_NCCL_BACKEND": "cupy",
        "FI_FFI_RENDEZVOUS_TIMEOUT": "2.5",
        "FI_FFI_RUN_GPU_TESTS": "yes",
        "FI_FFI_LOCK_TIMEOUT": "0",
    }.items():
        monkeypatch.setenv(name, value)
        assert variables.problem(name) == "", name
    assert variables.seconds("FI_FFI_RENDEZVOUS_TIMEOUT") == 2.5 and variables.choice("FI_FFI_NCCL_BACKEND") == "cupy"

"""fi_engine.kernels.cuda_sources on the CPU: the engine's CUDA C is files of ``fi_engine/kernels/csrc``, each used.

- Every ``.cu`` and ``.cuh`` file is reached from a program the engine reads (a ``source("...")`` or ``read("...")``
  call in fi_engine, then the includes), and every ``.cu`` program the engine compiles is fingerprinted by
  ``tools/kernel_fingerprints.py``.
- No Python string of fi_engine holds CUDA C (``__global__``, ``__device__``): the sources are read from
  the files, and the module constants kept for their old names are those programs.
- A program is its file with each include expanded between ``#line`` directives: without them, the files' text
  concatenated as written; an include cycle is refused by name.
- The files are package data: :func:`~fi_engine.kernels.cuda_sources.files` lists them through
  :mod:`importlib.resources`, pyproject.toml's package data for ``fi_engine.kernels`` matches each and MANIFEST.in
  takes them into the sdist.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import tomllib

import pytest
from helpers.env import REPO
from helpers.tools import load_tool

from fi_engine.kernels import cuda_sources
from fi_engine.kernels.cuda_sources import files, read, source

ENGINE = REPO / "fi_engine"
INCLUDE = re.compile(r'^#include "([^"]+)"', re.MULTILINE)


def loader_calls() -> dict[str, set[str]]:
    """``{"source" or "read": the file names fi_engine passes them as literals}``, read from the code with ast
    (``functions(cupy, file, names)`` compiles ``source(file)``: counted as a source)."""
    found: dict[str, set[str]] = {"source": set(), "read": set()}
    where = {"source": ("source", 0), "read": ("read", 0), "functions": ("source", 1)}  # call -> (kind, argument)
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in where):
                continue
            kind, i = where[node.func.id]
            if len(node.args) > i and isinstance(node.args[i], ast.Constant) and isinstance(node.args[i].value, str):
                found[kind].add(node.args[i].value)
    return found


def reached(roots: set[str]) -> set[str]:
    """``roots`` and every file they include, through any chain of includes."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(INCLUDE.findall(read(name)))
    return seen


def test_every_cuda_file_is_used_and_every_program_fingerprinted() -> None:
    on_disk = {p.name for p in (ENGINE / "kernels" / "csrc").iterdir()}
    assert files() == sorted(on_disk), "csrc holds a file that is not CUDA C (.cu, .cuh)"
    calls = loader_calls()
    programs = calls["source"]
    assert programs and all(name.endswith(".cu") for name in programs), programs
    assert reached(programs | calls["read"]) == set(files()), "a CUDA file that no program uses"
    fingerprinted = {file for _, file, _ in load_tool("kernel_fingerprints").SOURCES}
    assert programs <= fingerprinted, f"compiled by the engine, not fingerprinted: {sorted(programs - fingerprinted)}"


def test_no_module_holds_cuda_c_in_a_string() -> None:
    holders = set()
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
            if "__global__" in text or "__device__ __forceinline__" in text:
                holders.add(path.relative_to(ENGINE).as_posix())
    assert not holders, f"CUDA C in a Python string: {sorted(holders)}"


def test_each_file_is_read_once_a_process() -> None:
    assert read("gemv.cu") is read("gemv.cu") and source("gemv.cu") is source("gemv.cu")
    assert "#line" not in read("route.cuh") and source("rows.cu").startswith('#line 1 "rows.cu"')


@pytest.mark.parametrize("name", [f for f in files() if f.endswith(".cu")])
def test_a_program_is_its_files_between_line_directives(name: str) -> None:
    """Without its ``#line`` lines, a program is the files' text with each include line replaced by the included
    file's (the text NVRTC compiled when the sources were strings); every line of the program's own text is
    preceded by a ``#line`` that numbers it as its file does."""

    def expanded(file: str) -> str:
        lines = read(file).splitlines(keepends=True)
        return "".join(expanded(m[1]) if (m := INCLUDE.match(line)) else line for line in lines)

    program = source(name)
    assert program.startswith(f'#line 1 "{name}"\n')
    assert "".join(line for line in program.splitlines(keepends=True) if not line.startswith("#line ")) == expanded(
        name
    )
    at: tuple[str, int] = ("", 0)  # the file and line number the compiler gives the next line
    for line in program.splitlines(keepends=True):
        directive = re.match(r'#line (\d+) "([^"]+)"\n', line)
        if directive:
            at = (directive[2], int(directive[1]))
            continue
        file, number = at
        assert read(file).splitlines(keepends=True)[number - 1] == line, (file, number)
        at = (file, number + 1)


def test_an_include_cycle_is_refused_by_name(monkeypatch) -> None:
    texts = {"a.cu": '#include "b.cuh"\n', "b.cuh": 'x\n#include "a.cu"\n'}
    monkeypatch.setattr(cuda_sources, "read", texts.__getitem__)
    monkeypatch.setattr(cuda_sources, "_names", lambda: frozenset(texts))
    with pytest.raises(ValueError, match=r"^a\.cu -> b\.cuh -> a\.cu: a CUDA file includes itself"):
        source("a.cu")  # (a refusal is not cached)


@pytest.mark.parametrize("name", ["nope.cu", "../cuda_sources.py", "csrc/gemv.cu", "", 5, None])
def test_a_name_that_is_no_cuda_file_is_refused(name: object) -> None:
    for fn in (read, source):
        with pytest.raises((TypeError, ValueError), match=r"^file: "):
            fn(name)  # type: ignore[arg-type]


def test_the_cuda_files_are_package_data_of_the_wheel_and_the_sdist() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    # csrc/ is a package of its own (setuptools warns about a folder under a package that is not one) with the
    # CUDA files as its data
    assert "fi_engine.kernels.csrc" in config["packages"]
    patterns = config["package-data"]["fi_engine.kernels.csrc"]
    unmatched = [f for f in files() if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not unmatched, f"not package data (pyproject.toml): {unmatched}"
    manifest = (REPO / "MANIFEST.in").read_text().splitlines()
    assert "recursive-include fi_engine/kernels/csrc *.cu *.cuh" in manifest


def test_the_after_wait_switch_defines_its_macro_in_the_programs_that_launch_dependents(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fi_engine.kernels.cuda_sources import Griddep

    with_pdl = [f for f in files() if f.endswith(".cu") and "griddep_launch_dependents" in source(f)]
    without = [f for f in files() if f.endswith(".cu") and f not in with_pdl]
    assert "skinny_gemm.cu" in with_pdl and "gemv.cu" in with_pdl and "rows.cu" in without
    off = {f: source(f) for f in files()}
    assert not any("#define GRIDDEP_AFTER_WAIT" in text for text in off.values())  # off: the programs as stored
    monkeypatch.setattr(Griddep, "after_wait", True)
    for f in with_pdl:  # on: the macro, then the program unchanged (it opens with its own #line 1: the same lines)
        assert off[f].startswith(f'#line 1 "{f}"\n'), f
        assert source(f) == "#define GRIDDEP_AFTER_WAIT\n" + off[f], f
    assert all(source(f) == off[f] for f in without)

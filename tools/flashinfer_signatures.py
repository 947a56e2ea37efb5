"""The parameter lists of flashinfer-python's public functions and wrapper methods, as facts for the porting test.

    python tools/flashinfer_signatures.py [--version 0.6.3] [--check]

Downloads ``flashinfer-python==<version>`` with pip (``--no-deps``, into a temporary folder; nothing is imported
or run), reads the modules of :data:`MODULES` with :mod:`ast`, and writes ``tests/package/flashinfer_signatures.json``:
for each module-level function and each public method of a module-level class, by dotted name
(``flashinfer.norm.rmsnorm``, ``flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.plan``), its parameters in
order as ``[name, kind, has_default]`` (kind: ``positional`` for positional-or-keyword, ``keyword`` for
keyword-only, ``posonly``, ``*args``, ``**kwargs``; ``self`` left out). Only names, order, kinds and whether a
default exists are kept: facts about the interface, no code. ``tests/package/test_flashinfer_names.py`` holds every
op that names its flashinfer counterpart (``@op(flashinfer=...)``) to these lists. ``--check`` fails if the file
differs from what the download gives (CI does not run it: it needs the network).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "package" / "flashinfer_signatures.json"
# the modules whose ops fi_ffi ports (a prefix keeps its submodules: flashinfer.gemm.*)
MODULES = (
    "flashinfer.activation", "flashinfer.cascade", "flashinfer.decode", "flashinfer.prefill", "flashinfer.mla",
    "flashinfer.attention", "flashinfer.norm", "flashinfer.page", "flashinfer.rope", "flashinfer.sampling",
    "flashinfer.topk", "flashinfer.quantization", "flashinfer.gemm", "flashinfer.gdn_prefill", "flashinfer.mamba",
    "flashinfer.dsv3_ops", "flashinfer.comm", "flashinfer.fused_moe.fused_routing_dsv3",
)  # fmt: skip


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> list[list[object]]:
    """``[name, kind, has_default]`` for each parameter of ``node`` in order (``self``/``cls`` of a method left
    out)."""
    a = node.args
    out: list[list[object]] = []
    positional = [*a.posonlyargs, *a.args]
    defaults_from = len(positional) - len(a.defaults)
    for i, arg in enumerate(positional):
        if is_method and i == 0:
            continue
        kind = "posonly" if i < len(a.posonlyargs) else "positional"
        out.append([arg.arg, kind, i >= defaults_from])
    if a.vararg:
        out.append([a.vararg.arg, "*args", False])
    for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        out.append([arg.arg, "keyword", default is not None])
    if a.kwarg:
        out.append([a.kwarg.arg, "**kwargs", False])
    return out


def read_package(root: Path) -> dict[str, list[list[object]]]:
    """Dotted name -> parameters, for every public function and public class method of the package at ``root``."""
    found: dict[str, list[list[object]]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts[1:]):
            continue
        module = ".".join(parts)
        if not any(module == m or module.startswith(m + ".") for m in MODULES):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                found[f"{module}.{node.name}"] = parameters(node, False)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not item.name.startswith("_") or item.name == "__init__"
                    ):
                        static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in item.decorator_list)
                        found[f"{module}.{node.name}.{item.name}"] = parameters(item, not static)
    return found


def download(version: str, into: Path) -> Path:
    """The flashinfer-python wheel of ``version``, downloaded with pip into ``into``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(into),
         f"flashinfer-python=={version}"],
        check=True,
    )  # fmt: skip
    return next(into.glob("flashinfer_python-*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="0.6.3")
    parser.add_argument("--wheel", help="a flashinfer-python wheel already downloaded (skips pip)")
    parser.add_argument("--check", action="store_true", help="fail if the committed file is not what this writes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(args.wheel) if args.wheel else download(args.version, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(
                tmp, [n for n in archive.namelist() if n.startswith("flashinfer/") and n.endswith(".py")]
            )
        table = {"version": args.version, "functions": read_package(Path(tmp) / "flashinfer")}
    # one function a line: a diff after a release bump reads as the functions that changed
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(table["functions"].items()))
    text = f'{{"version": {json.dumps(args.version)}, "functions": {{\n{rows}\n}}}}\n'
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT.name} is {'up to date' if same else 'stale: run python tools/flashinfer_signatures.py'}")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(table['functions'])} functions and methods of flashinfer-python {args.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

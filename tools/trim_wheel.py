"""Copy a FlashInfer kernel wheel keeping only some of its modules (a GPU run's carry is limited to 64 MiB; the core,
ext and models test wheels together exceed it, while a test needs a few modules of each).

    python tools/trim_wheel.py IN.whl OUT_DIR MODULE_REGEX [MODULE_REGEX ...]

Keeps every ``jit_cache/<module>/`` member whose module name fully matches one of the regexes, and every member
outside ``jit_cache/`` (package ``__init__``, dist-info); the RECORD lists exactly the kept files (their original
hash lines). The output has the input's file name, in OUT_DIR; ``fi-ffi lock`` then pins it like any wheel.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path


def module_of(name: str) -> str | None:
    parts = name.split("/")
    return parts[2] if len(parts) > 3 and parts[1] == "jit_cache" else None


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, out_dir, patterns = Path(argv[0]), Path(argv[1]), [re.compile(p) for p in argv[2:]]
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    if dst.resolve() == src.resolve():
        print("trim_wheel: OUT_DIR must differ from the input's folder", file=sys.stderr)
        return 2
    kept: set[str] = set()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        names = zin.namelist()
        for name in names:
            module = module_of(name)
            if module is None or any(p.fullmatch(module) for p in patterns):
                kept.add(name)
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for name in names:
            if name not in kept or name == record:
                continue
            zout.writestr(zin.getinfo(name), zin.read(name))
        lines = zin.read(record).decode().splitlines()
        zout.writestr(record, "".join(line + "\n" for line in lines if line.split(",")[0] in kept))
    modules = sorted({m for n in kept if (m := module_of(n))})
    print(f"{dst}: {len(modules)} modules: {', '.join(modules)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

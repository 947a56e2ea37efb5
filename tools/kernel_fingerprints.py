"""The machine code of the engine's CUDA sources, one fingerprint per kernel, compiled on the CPU with NVRTC (no GPU
needed): a change to a kernel's text that leaves every fingerprint as it was compiles to the same instructions, so it
needs no new GPU proof (a refactor of device functions, a comment, a name). Where a fingerprint moves, the change is a
new kernel: run its GPU tests (and, for a hot kernel, its benchmark).

    python -m pip install nvidia-cuda-nvrtc                     # NVRTC's library, found by cuda-pathfinder
    python tools/kernel_fingerprints.py --json /tmp/before.json  # on the commit before the change
    python tools/kernel_fingerprints.py --compare /tmp/before.json   # after it: exit 1 where any kernel differs

Each program (a ``.cu`` file of ``fi_engine/kernels/csrc`` with its includes expanded, as the engine reads it) is
compiled with the options the engine compiles it with (:data:`SOURCES`) for ``--arch`` (sm_90, the H100's, by
default); a kernel's fingerprint is a hash of its ``.text`` section in the cubin. Exit 2 with a message where NVRTC
is not installed or a source does not compile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (label, the program's file in fi_engine/kernels/csrc, NVRTC options as the engine passes them: a tuple, or
# "module:Class.method" naming the engine's own function that makes them); each program is the engine's
# (fi_engine.kernels.cuda_sources.source), compiled under its file's name
SOURCES: list[tuple[str, str, tuple[str, ...] | str]] = [
    ("rows", "rows.cu", ()),  # RowKernels, ShardKernels (Dense compiles them)
    ("gemv", "gemv.cu", "fi_engine.kernels.gemv_settings:GemvSettings.gemv_options"),
    ("fused", "fused_gemv.cu", "fi_engine.kernels.fused_gemv:FusedKernels.options"),
    ("fp8", "fp8_gemv.cu", ()),  # Fp8Linears._compile
    ("fp8_fused", "fp8_fused.cu", ("--use_fast_math",)),
    ("fp8_quant", "fp8_quant.cu", ()),
    ("int4", "int4_gemv.cu", "fi_engine.kernels.int4_linear:Int4Linears.options"),
    ("grouped_gemv", "grouped_gemv.cu", ("--use_fast_math",)),  # GroupedGemv
    ("grouped_gemv8", "grouped_gemv8.cu", "fi_engine.kernels.fp8_moe_gemv:Fp8GroupedGemv.options"),
    ("grouped_gemv4", "grouped_gemv4.cu", "fi_engine.kernels.mxfp4_moe_gemv:Mxfp4GroupedGemv.options"),
    ("skinny", "skinny_gemm.cu", ()),  # SkinnyGemm (each Dense compiles the instances it needs)
    ("kv_fp8", "append_e4m3.cu", ()),  # KvFp8
    ("moe", "moe.cu", ()),  # MoELayer._build
    ("ds_routing", "ds_routing.cu", ()),  # DeviceGroupedTopk
    ("gemma2", "gemma2.cu", ()),  # Gemma2.load
    ("gpt_oss", "gpt_oss.cu", ()),  # GptOss.load
    ("lora_bgmv", "lora_bgmv.cu", ()),  # LoraBgmv
    ("lora_fused", "lora_fused.cu", "fi_engine.kernels.lora_fused:LoraFusedKernels.options"),  # LoraFusedKernels
    ("lora_fused_launch", "lora_fused.cu", "fi_engine.kernels.lora_fused:LoraFusedKernels.launch_options"),
    ("release_rows", "release_rows.cu", ("--use_fast_math",)),  # ReleasingRows
]


def text_sections(cubin: bytes) -> dict[str, bytes]:
    """``{kernel: its .text section's bytes}`` of a 64-bit little-endian ELF (a cubin), read with the standard
    library: the section headers (``e_shoff``, ``e_shentsize``, ``e_shnum``, ``e_shstrndx``), their names in the
    section-name table, and each ``.text.<kernel>`` section's contents."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("cubin: expected a 64-bit little-endian ELF")
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)

    def header(i: int) -> tuple[int, int, int]:  # (name offset, file offset, size)
        base = shoff + i * shentsize
        (name,) = struct.unpack_from("<I", cubin, base)
        offset, size = struct.unpack_from("<QQ", cubin, base + 0x18)
        return name, offset, size

    _, names_at, _ = header(shstrndx)
    sections = {}
    for i in range(shnum):
        name_off, offset, size = header(i)
        end = cubin.index(b"\0", names_at + name_off)
        name = cubin[names_at + name_off : end].decode()
        if name.startswith(".text."):
            sections[name[len(".text.") :]] = cubin[offset : offset + size]
    return sections


class CompileError(RuntimeError):
    """NVRTC refused a source (its log in the message)."""


def compile_cubin(source: str, options: tuple[str, ...], arch: str, name: str = "source.cu") -> bytes:
    """``source`` compiled by NVRTC (through cuda.bindings) for ``arch`` as the program ``name`` (the name NVRTC's
    messages give lines without a ``#line`` of their own); CompileError with NVRTC's log."""
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"nvrtcCreateProgram: {err}")
    try:
        opts = [f"-arch={arch}".encode(), b"-std=c++17", *(o.encode() for o in options)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise CompileError(f"{err}:\n{log.decode(errors='replace')[:4000]}")
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def source_options(options: tuple[str, ...] | str) -> tuple[str, ...]:
    """A :data:`SOURCES` row's NVRTC options: the tuple, or what the named ``module:Class.method`` returns."""
    if not isinstance(options, str):
        return options
    import importlib

    module, path = options.split(":")
    made: Any = importlib.import_module(module)
    for part in path.split("."):
        made = getattr(made, part)
    return tuple(made())


def fingerprints(arch: str) -> dict[str, str]:
    """``{"label:kernel": sha256 of its machine code, 16 hex digits}`` over every source of :data:`SOURCES`."""
    from fi_engine.kernels.cuda_sources import source

    found = {}
    for label, file, options in SOURCES:
        cubin = compile_cubin(source(file), source_options(options), arch, file)
        for kernel, code in text_sections(cubin).items():
            found[f"{label}:{kernel}"] = hashlib.sha256(code).hexdigest()[:16]
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90", help="the GPU architecture to compile for (default sm_90)")
    ap.add_argument("--json", type=Path, help="write the fingerprints here")
    ap.add_argument("--compare", type=Path, help="a --json file of an earlier commit: exit 1 where any differs")
    ap.add_argument(
        "--griddep-after-wait",
        action="store_true",
        help="compile with cuda_sources.Griddep.after_wait on (the next kernel starts after each kernel's wait)",
    )
    args = ap.parse_args(argv)
    if args.griddep_after_wait:
        from fi_engine.kernels.cuda_sources import Griddep

        Griddep.after_wait = True
    try:
        now = fingerprints(args.arch)
    except CompileError as exc:
        print(f"kernel_fingerprints: NVRTC refused a source: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # no cuda.bindings, or no NVRTC library for it to load
        print(
            f"kernel_fingerprints: NVRTC is not usable here ({type(exc).__name__}: {exc}); "
            "python -m pip install nvidia-cuda-nvrtc",
            file=sys.stderr,
        )
        return 2
    if args.json:
        args.json.write_text(json.dumps(now, indent=0, sort_keys=True) + "\n")
    print(f"{len(now)} kernels")
    if not args.compare:
        return 0
    try:
        before = json.loads(args.compare.read_text())
    except (OSError, ValueError) as exc:
        print(f"--compare: cannot read {args.compare}: {exc}", file=sys.stderr)
        return 2
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
    for title, names in (
        ("changed", changed),
        ("new", sorted(now.keys() - before.keys())),
        ("gone", sorted(before.keys() - now.keys())),
    ):
        if names:
            print(f"{title} ({len(names)}): {', '.join(names)}")
    same = not changed and now.keys() == before.keys()
    print("every kernel's machine code as before" if same else "machine code differs: run the GPU tests")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

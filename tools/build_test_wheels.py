"""Build the test kernel wheels the suite uses, from flashinfer-python's own JIT generators, with a CUDA nvcc.

The suite's kernel tests (``tests/ops``, ``tests/loader``, ...) need FlashInfer kernel modules; the shared copies live
in ``../shared`` (see CONTRIBUTING.md). Anyone else builds them with this script, or points the suite at FlashInfer's
own prebuilt ``flashinfer-jit-cache`` wheel (``FI_FFI_TEST_WHEELS``: it holds every module of the core and extension
sets).

Two steps, in two environments:

1. ``build`` runs in a virtual environment that has the generators: ``flashinfer-python==0.6.3`` (0.7.2 for the
   ``072`` set), ``torch`` (the CPU build is enough: the generators import it for dtypes), ``ninja``, and
   ``nvidia-cublas`` / ``nvidia-curand`` (headers a bare CUDA toolkit may lack), with CUDA 13's ``nvcc`` on the PATH
   (12.x for the ``cu12`` set) and a ``libcuda.so`` to link against (a toolkit's ``lib64/stubs``, a driver, or
   ``--libcuda``)::

       python -m venv /tmp/fibuild && . /tmp/fibuild/bin/activate
       pip install flashinfer-python==0.6.3 torch ninja 'nvidia-cublas>=13,<14' 'nvidia-curand>=10,<11'
       python tools/build_test_wheels.py build core --out wheels/ [--modules norm page] [--arch 9.0a]

   Each module is what FlashInfer's generator for its name builds (the generator's own module name is checked
   against the name asked for), packed into a wheel with upstream's layout: ``<dist>/jit_cache/<name>/<name>.so``,
   a local version label (``0.6.3+cu130.sm90a``) so it never passes for the release wheel.

2. ``compare`` runs in the project's dev environment (fi_ffi installed): it pins the built wheel in a lock of its own,
   loads each module on this machine (no GPU needed), asks each entry point for its signature (a zero-argument call
   answers with it) and compares them with a reference: a signatures file (one ``signatures`` printed; the shared
   wheels' are ``../shared/wheels*/signatures-*.txt``) or another wheel (a shared one, or FlashInfer's
   ``flashinfer-jit-cache`` release)::

       python tools/build_test_wheels.py compare wheels/flashinfer_jit_cache-*.whl \\
           ../shared/wheels/flashinfer_jit_cache-0.6.3+cu130.sm90a-cp39-abi3-linux_x86_64.whl

   (``signatures WHEEL`` prints one wheel's listing in the same format.)

Time and disk (2 cores, nvcc 13.0, sm_90a): ``norm`` ~6 min, an attention module 10-30 min; the ``core`` set about 6
hours, ``ext`` about 4; the work folder keeps object files (~0.5 GB per attention module; ``--keep`` to reuse them).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_F16_128 = "dtype_q_{d}_dtype_kv_{d}_dtype_o_{d}"
_FA2 = "posenc_0_use_swa_False_use_logits_cap_False"


def _attention_names(d: str, hd: int) -> list[str]:
    dims = f"head_dim_qk_{hd}_head_dim_vo_{hd}"
    types = _F16_128.format(d=d)
    return [
        f"single_decode_with_kv_cache_{types}_{dims}_{_FA2}",
        f"batch_decode_with_kv_cache_{types}_dtype_idx_i32_{dims}_{_FA2}",
        f"single_prefill_with_kv_cache_{types}_{dims}_{_FA2}_f16qk_False",
        f"batch_prefill_with_kv_cache_{types}_dtype_idx_i32_{dims}_{_FA2}_f16qk_False",
    ]


@dataclasses.dataclass(frozen=True)
class WheelSet:
    """One test wheel: its distribution name (the members' top folder), the FlashInfer release whose generators build
    it, and its modules."""

    dist: str
    release: str
    modules: tuple[str, ...]


def _core() -> tuple[str, ...]:
    names = ["norm", "page", "gdn_prefill_sm90"]
    for d in ("f16", "bf16"):
        for hd in (64, 128):
            names += _attention_names(d, hd)
        dims = "head_dim_qk_128_head_dim_vo_128"
        names.append(f"batch_prefill_with_kv_cache_{_F16_128.format(d=d)}_dtype_idx_i32_{dims}_{_FA2}_f16qk_False_sm90")
    return tuple(names)


def _ext() -> tuple[str, ...]:
    names = ["rope", "silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul", "sampling", "topk", "cascade", "quantization"]
    for d in ("f16", "bf16"):
        mla = (
            f"batch_mla_attention_{_F16_128.format(d=d)}_dtype_idx_i32_head_dim_ckv_512_head_dim_kpe_64_profiler_False"
        )
        names += [mla, mla + "_sm90"]
    dims = "head_dim_qk_128_head_dim_vo_128"
    f16 = _F16_128.format(d="f16")
    capped = "posenc_0_use_swa_True_use_logits_cap_True"
    fp8 = "dtype_q_f16_dtype_kv_e4m3_dtype_o_f16"
    names += [
        f"batch_decode_with_kv_cache_{f16}_dtype_idx_i32_{dims}_{capped}",
        f"batch_prefill_with_kv_cache_{f16}_dtype_idx_i32_{dims}_{capped}_f16qk_False",
        f"batch_decode_with_kv_cache_{fp8}_dtype_idx_i32_{dims}_{_FA2}",
        f"batch_prefill_with_kv_cache_{fp8}_dtype_idx_i32_{dims}_{_FA2}_f16qk_False",
    ]
    return tuple(names)


# The sets the suite uses (the modules of the shared wheels in ../shared, by name).
SETS: dict[str, WheelSet] = {
    "core": WheelSet("flashinfer_jit_cache", "0.6.3", _core()),
    "ext": WheelSet("flashinfer_jit_cache_ext", "0.6.3", _ext()),
    "comm": WheelSet("flashinfer_jit_cache_comm", "0.6.3", ("trtllm_comm", "vllm_comm")),
    "cu12": WheelSet(
        "flashinfer_jit_cache",
        "0.6.3",
        ("norm", "page", *[n for n in _attention_names("f16", 128)]),
    ),
}

_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32", "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}
_IDX = {"i32": "int32", "i64": "int64"}
_BOOL = {"True": True, "False": False}

# name pattern -> (generator module, generator function, how the match's groups become its arguments)
_TYPES = r"dtype_q_(?P<q>\w+?)_dtype_kv_(?P<kv>\w+?)_dtype_o_(?P<o>\w+?)"
_DIMS = r"head_dim_qk_(?P<qk>\d+)_head_dim_vo_(?P<vo>\d+)"
_VARIANT = r"posenc_(?P<pe>\d)_use_swa_(?P<swa>True|False)_use_logits_cap_(?P<cap>True|False)"
_ATTENTION: list[tuple[re.Pattern[str], str, Callable[[dict[str, Any], Any], tuple[Any, ...]]]] = [
    (
        re.compile(rf"single_decode_with_kv_cache_{_TYPES}_{_DIMS}_{_VARIANT}"),
        "gen_single_decode_module",
        lambda g, t: (t(g["q"]), t(g["kv"]), t(g["o"]), int(g["qk"]), int(g["vo"]), int(g["pe"]), g["swa"], g["cap"]),
    ),
    (
        re.compile(rf"batch_decode_with_kv_cache_{_TYPES}_dtype_idx_(?P<idx>i\d+)_{_DIMS}_{_VARIANT}"),
        "gen_batch_decode_module",
        lambda g, t: (
            t(g["q"]), t(g["kv"]), t(g["o"]), t(g["idx"]), int(g["qk"]), int(g["vo"]), int(g["pe"]), g["swa"], g["cap"]
        ),
    ),
    (
        re.compile(rf"single_prefill_with_kv_cache_{_TYPES}_{_DIMS}_{_VARIANT}_f16qk_(?P<f16qk>True|False)(?P<sm90>_sm90)?"),
        "gen_single_prefill_module",
        lambda g, t: (
            "fa3" if g["sm90"] else "fa2",
            t(g["q"]), t(g["kv"]), t(g["o"]), int(g["qk"]), int(g["vo"]), int(g["pe"]), g["swa"], g["cap"], g["f16qk"],
        ),
    ),
    (
        re.compile(
            rf"batch_prefill_with_kv_cache_{_TYPES}_dtype_idx_(?P<idx>i\d+)_{_DIMS}_{_VARIANT}"
            r"_f16qk_(?P<f16qk>True|False)(?P<sm90>_sm90)?"
        ),
        "gen_batch_prefill_module",
        lambda g, t: (
            "fa3" if g["sm90"] else "fa2",
            t(g["q"]), t(g["kv"]), t(g["o"]), t(g["idx"]), int(g["qk"]), int(g["vo"]), int(g["pe"]),
            g["swa"], g["cap"], g["f16qk"],
        ),
    ),
    (
        re.compile(
            rf"batch_mla_attention_{_TYPES}_dtype_idx_(?P<idx>i\d+)_head_dim_ckv_(?P<ckv>\d+)_head_dim_kpe_(?P<kpe>\d+)"
            r"_profiler_(?P<prof>True|False)(?P<sm90>_sm90)?"
        ),
        "gen_batch_mla_module",
        lambda g, t: (
            "fa3" if g["sm90"] else "fa2",
            t(g["q"]), t(g["kv"]), t(g["o"]), t(g["idx"]), int(g["ckv"]), int(g["kpe"]), g["prof"],
        ),
    ),
]  # fmt: skip

# Modules of one generator without arguments: name -> (flashinfer.jit module, function[, positional arguments])
_FIXED: dict[str, tuple[Any, ...]] = {
    "norm": ("flashinfer.jit.norm", "gen_norm_module"),
    "page": ("flashinfer.jit.page", "gen_page_module"),
    "rope": ("flashinfer.jit.rope", "gen_rope_module"),
    "sampling": ("flashinfer.jit.sampling", "gen_sampling_module"),
    "topk": ("flashinfer.jit.topk", "gen_topk_module"),
    "cascade": ("flashinfer.jit.cascade", "gen_cascade_module"),
    "quantization": ("flashinfer.jit.quantization", "gen_quantization_module"),
    "gdn_prefill_sm90": ("flashinfer.jit.gdn", "gen_gdn_prefill_sm90_module"),
    "silu_and_mul": ("flashinfer.jit.activation", "gen_act_and_mul_module", "silu"),
    "gelu_and_mul": ("flashinfer.jit.activation", "gen_act_and_mul_module", "gelu"),
    "gelu_tanh_and_mul": ("flashinfer.jit.activation", "gen_act_and_mul_module", "gelu_tanh"),
    "trtllm_comm": ("flashinfer.jit.comm", "gen_trtllm_comm_module"),
    "vllm_comm": ("flashinfer.jit.comm", "gen_vllm_comm_module"),
    "gemm": ("flashinfer.jit.gemm.core", "gen_gemm_module"),
    "gemm_sm90": ("flashinfer.jit.gemm.core", "gen_gemm_sm90_module"),
    "dsv3_router_gemm": ("flashinfer.jit.dsv3_optimizations", "gen_dsv3_router_gemm_module"),
    "dsv3_fused_routing": ("flashinfer.jit.dsv3_optimizations", "gen_dsv3_fused_routing_module"),
    "mamba_selective_state_update": (
        "flashinfer.jit.mamba.selective_state_update",
        "gen_selective_state_update_module",
    ),
    "mamba_selective_state_update_sm90": (
        "flashinfer.jit.mamba.selective_state_update",
        "gen_selective_state_update_sm90_module",
    ),
    "fp8_blockscale_gemm_90": ("flashinfer.jit.gemm.fp8_blockscale", "gen_fp8_blockscale_gemm_sm90_module"),
}


class RecipeError(ValueError):
    """No generator builds a module of this name (or the generator named it otherwise)."""


def spec_for(name: str) -> Any:
    """FlashInfer's JitSpec for module ``name``, from its own generator; its name is checked against ``name``."""
    if name in _FIXED:
        module, function, *args = _FIXED[name]
        spec = getattr(importlib.import_module(module), function)(*args)
    else:
        import torch

        def dtype(code: str) -> Any:
            return getattr(torch, _DTYPES.get(code) or _IDX[code])

        for pattern, function, arguments in _ATTENTION:
            found = pattern.fullmatch(name)
            if found:
                groups = {k: _BOOL.get(v, v) if v is not None else None for k, v in found.groupdict().items()}
                modules = importlib.import_module("flashinfer.jit.attention.modules")
                spec = getattr(modules, function)(*arguments(groups, dtype))
                break
        else:
            raise RecipeError(f"{name}: no generator known for this module name (see _FIXED and _ATTENTION)")
    if spec.name != name:
        raise RecipeError(f"{name}: the generator built {spec.name!r} instead")
    return spec


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def pack_wheel(out_dir: Path, dist: str, version: str, tag: str, modules: dict[str, Path]) -> Path:
    """A wheel of upstream's layout holding ``modules`` (name -> built .so); returns its path."""
    members: dict[str, bytes] = {
        f"{dist}/jit_cache/{name}/{name}.so": path.read_bytes() for name, path in sorted(modules.items())
    }
    members[f"{dist}/__init__.py"] = (
        f'__version__ = "{version}"\n\n\ndef get_jit_cache_dir():\n'
        '    import os\n\n    return os.path.join(os.path.dirname(__file__), "jit_cache")\n'
    ).encode()
    info = f"{dist}-{version}.dist-info"
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    members[f"{info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: fi_ffi tools/build_test_wheels.py\nRoot-Is-Purelib: false\nTag: {tag}\n"
    ).encode()
    record = [f"{n},{_record_hash(d)},{len(d)}" for n, d in members.items()] + [f"{info}/RECORD,,"]
    members[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    return path


def _cuda_version() -> str:
    text = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", text)
    if not found:
        raise SystemExit(f"nvcc --version: no 'release X.Y' in {text!r}")
    return found.group(1) + found.group(2)


def _nvidia_include_dirs() -> list[str]:
    """Header folders of the pip-installed CUDA libraries (nvidia-cublas, nvidia-curand): a bare toolkit lacks them."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted({str(p.parent) for root in nvidia.__path__ for p in Path(root).glob("*/include/cublasLt.h")})


def missing_requirements(release: str) -> str:
    """What ``build`` needs that this environment lacks, with the commands that provide it (``""``: nothing). The
    generators are flashinfer-python's (which imports torch) and run ninja and nvcc: none of them is in the dev
    environment, so the build runs in a virtual environment of its own (the module docstring, step 1)."""
    import importlib.util

    packages = [("flashinfer", f"flashinfer-python=={release}"), ("torch", "torch"), ("ninja", "ninja")]
    lacking = [pip for module, pip in packages if importlib.util.find_spec(module) is None]
    text = []
    if lacking:
        text.append(
            f"the build needs {', '.join(lacking)} (FlashInfer's JIT generators and what they import), which this "
            f"environment lacks; build in a virtual environment of its own: python -m venv /tmp/fibuild && "
            f". /tmp/fibuild/bin/activate && pip install flashinfer-python=={release} torch ninja "
            f"'nvidia-cublas>=13,<14' 'nvidia-curand>=10,<11' (CONTRIBUTING.md, \"Without ../shared\")"
        )
    if shutil.which("nvcc") is None:
        text.append("the build needs CUDA's nvcc on the PATH (CUDA 13; 12.x for the cu12 set)")
    return "; ".join(text)


def build(args: argparse.Namespace) -> int:
    wheel_set = SETS[args.set]
    names = args.modules or list(wheel_set.modules)
    unknown = sorted(set(names) - set(wheel_set.modules))
    if unknown:
        print(f"--modules: not in the {args.set} set: {', '.join(unknown)}", file=sys.stderr)
        return 2
    missing = missing_requirements(wheel_set.release)
    if missing:
        print(f"build_test_wheels.py build: {missing}", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="fi_ffi_build_"))
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", str(work))
    os.environ["FLASHINFER_CUDA_ARCH_LIST"] = args.arch
    os.environ.setdefault("MAX_JOBS", str(args.jobs))
    if "CUDA_HOME" not in os.environ and shutil.which("nvcc"):
        nvcc = Path(shutil.which("nvcc") or "").resolve()
        os.environ["CUDA_HOME"] = str(nvcc.parent.parent)
    includes = _nvidia_include_dirs()
    if includes:
        os.environ["CPATH"] = os.pathsep.join([*includes, *filter(None, [os.environ.get("CPATH")])])
    if args.libcuda:
        stubs = work / "libcuda-stub"
        stubs.mkdir(parents=True, exist_ok=True)
        link = stubs / "libcuda.so"
        if not link.exists():
            link.symlink_to(Path(args.libcuda).resolve())
        os.environ["LIBRARY_PATH"] = os.pathsep.join([str(stubs), *filter(None, [os.environ.get("LIBRARY_PATH")])])
    import flashinfer  # after the settings above: it reads the architecture list at import

    if flashinfer.__version__ != wheel_set.release:
        print(f"the {args.set} set is built with flashinfer-python=={wheel_set.release}, "
              f"this environment has {flashinfer.__version__}", file=sys.stderr)  # fmt: skip
        return 2
    built: dict[str, Path] = {}
    for name in names:
        spec = spec_for(name)
        print(f"building {name} ...", flush=True)
        spec.build(verbose=args.verbose)
        built[name] = Path(spec.get_library_path())
    arch = args.arch.replace(".", "")
    version = f"{wheel_set.release}+cu{_cuda_version()}.sm{arch}"
    machine = os.uname().machine
    path = pack_wheel(Path(args.out), wheel_set.dist, version, f"cp39-abi3-linux_{machine}", built)
    print(f"wrote {path} ({len(built)} modules)")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


_SIGNATURE = re.compile(r"`?(\w+\(.*?\) -> [\w<>*.]+)`?")


def parse_signatures(text: str) -> dict[str, dict[str, str]]:
    """A signatures listing (``## <module>`` headers, ``  <entry>: <signature>`` lines, as ``signatures`` prints and
    ``../shared/wheels*/signatures-*.txt`` hold) as module -> entry -> signature."""
    out: dict[str, dict[str, str]] = {}
    module = ""
    for line in text.splitlines():
        if line.startswith("## "):
            module = line[3:].split()[0]
            out[module] = {}
        elif line.startswith("  ") and ": " in line and module:
            entry, _, signature = line.strip().partition(": ")
            out[module][entry] = signature
    return out


def signatures(args: argparse.Namespace) -> int:
    """Print each module's entry points with the signature it answers a zero-argument call with (fi_ffi loads the
    modules through a lock of their own: no GPU needed)."""
    wheel = Path(args.wheel).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        lock = Path(tmp) / "wheels.lock"
        text = subprocess.run(
            [sys.executable, "-m", "fi_ffi", "lock", str(wheel)], capture_output=True, text=True, check=True
        ).stdout
        lock.write_text(text, encoding="utf-8")
        os.environ.update(FI_FFI_LOCK=str(lock), FI_FFI_WHEELHOUSE=str(wheel.parent), FI_FFI_OFFLINE="1")
        os.environ["FI_FFI_CACHE_DIR"] = str(Path(tmp) / "cache")
        from fi_ffi.abi.call import EntryPoint
        from fi_ffi.loader import elf, load_module, module_path

        with zipfile.ZipFile(wheel) as archive:
            names = sorted({m.split("/")[2] for m in archive.namelist() if m.endswith(".so")})
        for name in names:
            handle = load_module(name)
            exported = elf.read(module_path(name), exports=True).exported
            print(f"## {name}")
            for entry in sorted(s[len("__tvm_ffi_") :] for s in exported if s.startswith("__tvm_ffi_")):
                found = _SIGNATURE.search(EntryPoint(handle, entry, name).signature_text())
                print(f"  {entry}: {found.group(1) if found else '?'}")
    return 0


def _listing(path: str) -> dict[str, dict[str, str]]:
    if not path.endswith(".whl"):
        return parse_signatures(Path(path).read_text(encoding="utf-8"))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "signatures", path], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"signatures of {path} failed:\n{done.stderr}")
    return parse_signatures(done.stdout)


def compare(args: argparse.Namespace) -> int:
    """The built wheel's modules against a reference (a signatures file or a wheel), entry point by entry point.
    Modules the reference lacks are reported, not failed (a signatures file may list one wheel of several)."""
    built, reference = _listing(args.wheel), _listing(args.reference)
    same = differ = one_side = 0
    for name, entries in sorted(built.items()):
        if name not in reference:
            print(f"{name}: not in the reference")
            continue
        for entry in sorted(set(entries) | set(reference[name])):
            got, want = entries.get(entry), reference[name].get(entry)
            if got == want:
                same += 1
            elif got is None or want is None:
                one_side += 1
                print(f"{name}.{entry}: only in the {'reference' if got is None else 'built wheel'}")
            else:
                differ += 1
                print(f"{name}.{entry}: DIFFERS\n  built:     {got}\n  reference: {want}")
    print(f"{len(built)} modules built: {same} entry points equal, {differ} differ, {one_side} on one side only")
    return 0 if differ == one_side == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a set's modules with FlashInfer's generators and pack them as a wheel")
    b.add_argument("set", choices=sorted(SETS))
    b.add_argument("--out", default="wheels", help="folder of the wheel written (default: wheels)")
    b.add_argument("--modules", nargs="+", metavar="NAME", help="only these modules of the set")
    b.add_argument("--arch", default="9.0a", help="CUDA architecture (FLASHINFER_CUDA_ARCH_LIST; default 9.0a)")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs (MAX_JOBS)")
    b.add_argument("--work", help="work folder (object files; kept); default: a temporary one, removed")
    b.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    b.add_argument("--libcuda", help="a libcuda.so (a driver stub) to link against, if the toolkit has no stubs")
    b.add_argument("--verbose", action="store_true")
    s = sub.add_parser("signatures", help="print a wheel's modules, entry points and signatures (needs fi_ffi)")
    s.add_argument("wheel")
    c = sub.add_parser("compare", help="compare a built wheel's signatures with a signatures file or another wheel")
    c.add_argument("wheel")
    c.add_argument("reference", help="a signatures file (../shared/wheels/signatures-ext.txt) or a wheel")
    args = parser.parse_args(argv)
    return {"build": build, "signatures": signatures, "compare": compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

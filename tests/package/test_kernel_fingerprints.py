"""``tools/kernel_fingerprints.py``: the machine code of the engine's CUDA sources, one fingerprint per kernel.

- Its ELF reader, on a cubin-shaped ELF built here: every ``.text.<kernel>`` section's bytes by kernel name, other
  sections left out; a file that is no 64-bit little-endian ELF refused.
- Its comparison: the same fingerprints exit 0, a changed, new or gone kernel exits 1 naming it, an unreadable
  ``--compare`` file exits 2 (over fingerprints handed in, as NVRTC would give them).
- With NVRTC installed (``nvidia-cuda-nvrtc``; skipped, saying so, without it): every source of ``SOURCES``
  compiles, a kernel's fingerprint is stable across compiles and moves when its arithmetic does, and NVRTC's
  message about an error in an included header names the header's file and line, one after the include the
  including file's.
"""

from __future__ import annotations

import json
import struct

import pytest
from helpers.tools import load_tool

tool = load_tool("kernel_fingerprints")


def elf(sections: dict[str, bytes]) -> bytes:
    """A 64-bit little-endian ELF holding ``sections`` (a null section first and the name table last), laid out as
    a cubin is: header, contents, section headers."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in sections) + b".shstrtab\0"
    body, offsets, at = b"", [], 64
    for data in sections.values():
        offsets.append(at + len(body))
        body += data
    names_at = at + len(body)
    body += names
    shoff = at + len(body)
    headers = bytes(64)  # section 0: null
    name_off = 1
    for (name, data), offset in zip(sections.items(), offsets, strict=True):
        headers += struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, offset, len(data), 0, 0, 1, 0)
        name_off += len(name) + 1
    headers += struct.pack("<IIQQQQIIQQ", name_off, 3, 0, 0, names_at, len(names), 0, 0, 1, 0)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    count = len(sections) + 2
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 190, 1, 0, 0, shoff, 0, 64, 0, 0, 64, count, count - 1)
    return header + body + headers


def test_the_elf_reader_gives_each_kernels_text_section() -> None:
    cubin = elf({".text.k_one": b"\x01\x02\x03", ".nv.info": b"info", ".text.k_two": b"\x09" * 16})
    assert tool.text_sections(cubin) == {"k_one": b"\x01\x02\x03", "k_two": b"\x09" * 16}
    with pytest.raises(ValueError, match="^cubin: expected a 64-bit little-endian ELF"):
        tool.text_sections(b"\x7fELF" + bytes([1, 1]) + cubin[6:])


@pytest.mark.parametrize(
    ("now", "code", "said"),
    [
        ({"a:k": "1", "a:j": "2"}, 0, "every kernel's machine code as before"),
        ({"a:k": "1", "a:j": "3"}, 1, "changed (1): a:j"),
        ({"a:k": "1", "a:j": "2", "b:n": "4"}, 1, "new (1): b:n"),
        ({"a:k": "1"}, 1, "gone (1): a:j"),
    ],
)
def test_compare_exits_1_naming_each_kernel_that_moved(tmp_path, monkeypatch, capsys, now, code, said) -> None:
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"a:k": "1", "a:j": "2"}))
    monkeypatch.setattr(tool, "fingerprints", lambda arch: now)
    assert tool.main(["--compare", str(before)]) == code
    assert said in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{")
    assert tool.main(["--compare", str(tmp_path / "bad.json")]) == 2
    assert tool.main(["--compare", str(tmp_path / "missing.json")]) == 2
    assert "--compare: cannot read" in capsys.readouterr().err


def _nvrtc_usable() -> bool:
    try:
        tool.compile_cubin('extern "C" __global__ void k(float* x) { x[0] = 1.f; }', (), "sm_90")
    except Exception:
        return False
    return True


NVRTC = _nvrtc_usable()


@pytest.mark.skipif(not NVRTC, reason="NVRTC is not installed (python -m pip install nvidia-cuda-nvrtc)")
def test_fingerprints_are_stable_and_move_with_the_arithmetic() -> None:
    source = 'extern "C" __global__ void k(float* x) {{ x[threadIdx.x] = x[threadIdx.x] * {} + 1.f; }}'
    first, again, other = (tool.text_sections(tool.compile_cubin(source.format(c), (), "sm_90")) for c in "223")
    assert set(first) == {"k"} and first == again and first != other
    prints = tool.fingerprints("sm_90")
    labels = {key.split(":")[0] for key in prints}
    assert labels == {label for label, *_ in tool.SOURCES}, "a source compiled no kernel"
    assert "fp8:gemv8_bf16_bf16_block_1" in prints


def test_without_nvrtc_the_tool_says_how_to_install_it(monkeypatch, capsys) -> None:
    def missing(arch: str) -> dict[str, str]:
        raise RuntimeError("Failure finding libnvrtc.so")

    monkeypatch.setattr(tool, "fingerprints", missing)
    assert tool.main([]) == 2
    assert "pip install nvidia-cuda-nvrtc" in capsys.readouterr().err


@pytest.mark.skipif(not NVRTC, reason="NVRTC is not installed (python -m pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("fixed_rows", [True, False], ids=["a-kernel-per-row-count", "any-rows"])
def test_every_kernel_dense_loads_is_in_its_module(monkeypatch, fixed_rows: bool) -> None:
    """Dense compiles gemv.cu and fused_gemv.cu with its own options (GemvSettings.gemv_options, FusedKernels.options:
    what the tool compiles too) and looks its kernels up by name, 1 to 4 rows each; a name the source does not define
    would leave the GEMV or the fused step off on the GPU (Dense.gemv_error), so each must be in the cubin. The same
    for lora_fused.cu, which the runner compiles with the fused GEMVs' options and one form (LoraFusedKernels.options:
    the shrinks in the GEMVs' grids, or launched, with their normed shrink kernels)."""
    from fi_engine.kernels.cuda_sources import source
    from fi_engine.kernels.fused_gemv import FusedKernels
    from fi_engine.kernels.gemv_settings import GEMV_NAMES, GemvSettings
    from fi_engine.kernels.lora_fused import LoraFusedKernels

    monkeypatch.setattr(GemvSettings, "gemv_fixed_rows", fixed_rows)
    for file, options, bases in (
        ("gemv.cu", GemvSettings.gemv_options(), list(GEMV_NAMES.values())),
        ("fused_gemv.cu", FusedKernels.options(), list(FusedKernels.kernel_names().values())),
        *(
            ("lora_fused.cu", LoraFusedKernels.options(in_grid), list(LoraFusedKernels.kernel_names(in_grid).values()))
            for in_grid in (True, False)
        ),
    ):
        compiled = set(tool.text_sections(tool.compile_cubin(source(file), tuple(options), "sm_90", file)))
        wanted = {name for base in bases for name in GemvSettings.row_kernel_names(base)}
        if file == "lora_fused.cu":  # (and the launched form's shrinks, one kernel each: LoraFusedKernels.compile's)
            in_grid = "-DLORA_SHRINK_IN_GRID=1" in options
            wanted |= set(LoraFusedKernels.shrink_names(in_grid).values())
            assert wanted <= compiled, sorted(wanted - compiled)[:5]
            assert len(wanted) == 12 * (4 if fixed_rows else 1) + (0 if in_grid else 4)
            other = "lora_gemv_" if in_grid else "lora_grid_"  # (one form a module: the other is not compiled)
            assert not any(name.startswith((other, "lora_shrink_" if in_grid else "-")) for name in compiled)
            continue
        assert wanted <= compiled, sorted(wanted - compiled)[:5]
        assert len(wanted) == len(bases) * (4 if fixed_rows else 1)


@pytest.mark.skipif(not NVRTC, reason="NVRTC is not installed (python -m pip install nvidia-cuda-nvrtc)")
def test_compiler_messages_name_the_cuda_file_and_line() -> None:
    """The programs carry #line directives around each expanded include: an error inside griddep.cuh is reported
    at griddep.cuh's line, one in gemv.cu's own text after the include at gemv.cu's line (not the expanded text's)."""
    from fi_engine.kernels.cuda_sources import read, source

    def line_of(file: str, text: str) -> int:
        return next(n for n, line in enumerate(read(file).splitlines(), 1) if text in line)

    program = source("gemv.cu")
    after_includes = "const unsigned short* av = reinterpret_cast<const unsigned short*>(&a);"  # gemv_vec's body
    for file, anchor in (("griddep.cuh", "void griddep_wait() {"), ("gemv.cu", after_includes)):
        broken = program.replace(anchor, anchor + " not_declared_anywhere;", 1)
        with pytest.raises(tool.CompileError) as refused:
            tool.compile_cubin(broken, (), "sm_90", "gemv.cu")
        assert f"{file}({line_of(file, anchor)}): error" in str(refused.value), str(refused.value)[:400]

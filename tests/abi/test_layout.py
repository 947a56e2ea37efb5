"""Every size and offset declared in fi_ffi/abi/cdefs.py equals the C compiler's reading of the real headers.

The headers come from the installed apache-tvm-ffi wheel (``tvm_ffi/include``): a small C program is compiled
against them and prints ``sizeof``/``offsetof``; cffi's view of our declarations must agree field by field.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest

from fi_ffi.abi.cdefs import get_ffi

FIELDS = {
    "DLDevice": ["device_type", "device_id"],
    "DLDataType": ["code", "bits", "lanes"],
    "DLTensor": ["data", "device", "ndim", "dtype", "shape", "strides", "byte_offset"],
    "DLManagedTensorVersioned": ["version", "manager_ctx", "deleter", "flags", "dl_tensor"],
    "TVMFFIObject": ["combined_ref_count", "type_index", "deleter"],
    "TVMFFIAny": [
        "type_index",
        "zero_padding",
        "v_int64",
        "v_float64",
        "v_ptr",
        "v_obj",
        "v_dtype",
        "v_device",
        "v_bytes",
    ],
    "TVMFFIByteArray": ["data", "size"],
    "TVMFFISeqCell": ["data", "size", "capacity", "data_deleter"],
    "TVMFFIErrorCell": ["kind", "message", "backtrace", "update_backtrace", "cause_chain", "extra_context"],
    "TVMFFIVersion": ["major", "minor", "patch"],
}


def _include_dir() -> str | None:
    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "include")
    return path if os.path.isfile(os.path.join(path, "tvm", "ffi", "c_api.h")) else None


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    include = _include_dir()
    compiler = shutil.which("cc") or shutil.which("gcc")
    if include is None or compiler is None:
        pytest.skip("needs the apache-tvm-ffi headers and a C compiler")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <tvm/ffi/c_api.h>",
        "#include <tvm/ffi/extra/c_env_api.h>",
        "int main(void) {",
    ]
    for struct_name, fields in FIELDS.items():
        lines.append(f'printf("{struct_name} %zu\\n", sizeof({struct_name}));')
        for field in fields:
            lines.append(f'printf("{struct_name}.{field} %zu\\n", offsetof({struct_name}, {field}));')
    lines += ["return 0; }"]
    workdir = tmp_path_factory.mktemp("layout")
    source = workdir / "layout.c"
    source.write_text("\n".join(lines))
    exe = workdir / "layout"
    subprocess.run([compiler, "-std=c11", "-I", include, str(source), "-o", str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("struct_name", sorted(FIELDS))
def test_struct_size_matches_headers(c_layout: dict[str, int], struct_name: str) -> None:
    assert get_ffi().sizeof(struct_name) == c_layout[struct_name]


@pytest.mark.parametrize("struct_name,field", [(s, f) for s, fs in sorted(FIELDS.items()) for f in fs])
def test_field_offset_matches_headers(c_layout: dict[str, int], struct_name: str, field: str) -> None:
    assert get_ffi().offsetof(struct_name, field) == c_layout[f"{struct_name}.{field}"]


def test_known_sizes_from_abi_sheet() -> None:
    # ABI.md A.1, A.4, A.6: independent of any compiler, so this runs even where the headers are missing.
    ffi = get_ffi()
    assert ffi.sizeof("TVMFFIAny") == 16
    assert ffi.sizeof("DLTensor") == 48
    assert ffi.sizeof("DLManagedTensorVersioned") == 80
    assert ffi.offsetof("DLManagedTensorVersioned", "dl_tensor") == 32
    assert ffi.sizeof("TVMFFIErrorCell") == 72
    assert ffi.sizeof("TVMFFIObject") == 24

"""A user's code type-checked against fi_ffi's public signatures (:mod:`fi_ffi.tensor.protocols`), as mypy sees it from
outside the checkout: descriptors, numpy arrays and objects of the interchange protocols are accepted as tensors,
an op returns the caller's own tensor type, and a string passed as a tensor or a stream is flagged. The names
come through the generated stubs (``fi_ffi/__init__.pyi``, ``fi_ffi/loader/__init__.pyi``): a name the exports
table lacks is an error, not a silent ``Any`` from the lazy ``__getattr__``.

One mypy run (``--strict``) over a small snippet; every line marked ``# error`` must be reported, and nothing else.
The snippet also passes with the lowest declared versions (mypy 1.10, numpy 1.26: no bare ``np.ndarray``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is in the dev extra: python -m pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]

SNIPPET = """
from typing import Any

import numpy as np
import numpy.typing as npt

import fi_ffi
from fi_ffi import loader
from fi_ffi.tensor.protocols import IndexLike, StreamLike, TensorLike


class CaiArray:  # a numba-like device array: only __cuda_array_interface__
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (4, 8), "typestr": "<f2", "data": (0, False), "version": 3}


class DLPackArray:  # a producer fi_ffi has never heard of
    def __dlpack__(self, *, stream: int | None = None) -> object:
        return object()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)


class TorchLikeStream:
    cuda_stream: int = 0


d = fi_ffi.Tensor.from_pointer(0x1000, (4, 8), fi_ffi.float16, "cuda:0")
w = fi_ffi.Tensor.from_pointer(0x2000, (8,), fi_ffi.float16, "cuda:0")
host = np.zeros((4, 8), np.float16)
out_np: npt.NDArray[np.float16] = np.empty((4, 8), np.float16)

same: fi_ffi.Tensor = fi_ffi.rmsnorm(d, w, out=d)
mine: npt.NDArray[np.float16] = fi_ffi.rmsnorm(host, w, out=out_np, stream=0)
cai = fi_ffi.rmsnorm(CaiArray(), w, out=CaiArray(), stream=TorchLikeStream())
dl = fi_ffi.silu_and_mul(DLPackArray(), DLPackArray())
q, k = fi_ffi.apply_rope_pos_ids(d, d, d, q_rope=out_np, k_rope=out_np)
q_np: npt.NDArray[np.float16] = q
fi_ffi.fused_add_rmsnorm(host, d, w, stream=None)
t: fi_ffi.Tensor = fi_ffi.as_tensor(host, name="x")
lists: IndexLike = [0, 3, 7]
s: StreamLike = 7
anything: TensorLike = CaiArray()

fi_ffi.rmsnorm("not a tensor", w, out=d)  # error
fi_ffi.rmsnorm(d, w, out=d, stream="0")  # error
fi_ffi.as_tensor([1.0, 2.0])  # error
bad: npt.NDArray[np.float16] = fi_ffi.rmsnorm(d, w, out=d)  # error
err: type[fi_ffi.FiFFIError] = fi_ffi.CudaError
paths: dict[str, str] = loader.loaded_modules()
fi_ffi.no_such_op(d)  # error
loader.load_module(3)  # error
"""


def test_mypy_accepts_tensors_and_streams_and_flags_wrong_types(tmp_path: Path) -> None:
    source = tmp_path / "user_code.py"
    source.write_text(textwrap.dedent(SNIPPET), encoding="utf-8")
    expected = {i for i, line in enumerate(SNIPPET.splitlines(), 1) if line.endswith("# error")}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MYPYPATH": str(ROOT)}
    options = ["--strict", "--no-color-output", "--hide-error-context", "--no-error-summary", "--follow-imports=silent"]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), *options, str(source)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = result.stdout + result.stderr
    flagged = {int(m.group(1)) for m in re.finditer(r"^.*user_code\.py:(\d+): error", report, re.M)}
    assert flagged == expected, f"mypy flagged lines {sorted(flagged)}, expected {sorted(expected)}:\n{report}"
    assert 'Argument 1 to "rmsnorm" has incompatible type "str"' in report, report  # names the wrong type
    assert result.returncode == 1, report

"""Reading (and, for tests and benchmarks, writing) ``*.safetensors`` files with numpy alone.

Why not the ``safetensors`` package: its numpy loader cannot return bfloat16 tensors (numpy has no bfloat16),
and the format is simple enough to read safely here. A file is an 8-byte little-endian header length ``N``,
``N`` bytes of UTF-8 JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the end of the header; an optional ``"__metadata__"`` entry holds strings), then the data.

Tensors are memory-mapped, not read: a bfloat16 tensor comes back as a ``uint16`` array holding the raw bits
(its dtype name says ``"bfloat16"``), which is exactly what the GPU upload needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Checkpoint", "TensorInfo", "read_header", "write_safetensors"]

# safetensors dtype -> (fi_ffi dtype name, numpy storage dtype)
DTYPES: dict[str, tuple[str, Any]] = {
    "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16),
    "F32": ("float32", np.float32),
    "F64": ("float64", np.float64),
    "I64": ("int64", np.int64),
    "I32": ("int32", np.int32),
    "I16": ("int16", np.int16),
    "I8": ("int8", np.int8),
    "U8": ("uint8", np.uint8),
    "BOOL": ("bool", np.bool_),
    "F8_E4M3": ("float8_e4m3fn", np.uint8),  # FP8 checkpoints' weights: the bytes, decoded on the GPU
}
_NAMES = {name: code for code, (name, _) in DTYPES.items()}
_BY_NUMPY = {  # bit-pattern types (bfloat16, e4m3) are written only when named
    np.dtype(storage): name for name, storage in DTYPES.values() if name not in ("bfloat16", "float8_e4m3fn")
}
MAX_HEADER = 100 << 20  # the reference implementation's limit


def _float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A checkpoint array of ``dtype`` (bfloat16 as uint16 bits, as :meth:`Checkpoint.array` returns it) as float32."""
    raw = raw if hasattr(raw, "astype") else np.asarray(raw)  # (a CuPy array stays one: the int4 loader's on the GPU)
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def _to_16bit(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` rounded to nearest even: a float16 array, or bfloat16 bits (uint16) for ``"bfloat16"`` (the
    layout :meth:`Checkpoint.array` reads and the engine uploads). Past float16's 65504: inf (callers refuse it)."""
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16)
    bits = values.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # finite values: no carry into NaN


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: its dtype (fi_ffi name, e.g. ``"bfloat16"``), shape and byte range in ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute, in bytes from the start of the file
    nbytes: int


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of one ``.safetensors`` file, checked against the file's size. ValueError names the file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{p}: not a safetensors file ({size} bytes; expected an 8-byte header length)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError(
                    f"{p}: header length {n} does not fit the file ({size} bytes); the file is "
                    f"truncated or not a safetensors file"
                )
            raw = f.read(n)
    except OSError as exc:
        raise ValueError(f"{p}: cannot read: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: the header is not UTF-8 JSON ({exc}); the file is damaged") from None
    if not isinstance(header, dict):
        raise ValueError(f"{p}: the header must be a JSON object, got {type(header).__name__}")
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        out[name] = _entry(p, name, entry, data_start, size)
    return out


def _entry(p: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    where = f"{p}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with dtype, shape and data_offsets")
    code = entry.get("dtype")
    if code not in DTYPES:
        raise ValueError(f"{where}: unsupported dtype {code!r} (known: {', '.join(DTYPES)})")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise ValueError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    itemsize = np.dtype(DTYPES[code][1]).itemsize
    nbytes = math.prod(shape) * itemsize
    if begin < 0 or end - begin != nbytes or data_start + end > size:
        raise ValueError(
            f"{where}: data_offsets {offsets} do not hold {shape} x {itemsize} bytes inside the "
            f"file's {size - data_start} data bytes; the file is damaged"
        )
    return TensorInfo(name, DTYPES[code][0], tuple(shape), p, data_start + begin, nbytes)


INDEX = "model.safetensors.index.json"  # a sharded checkpoint's map of tensor names to its files


class Checkpoint:
    """The tensors of every ``*.safetensors`` file in a directory, by name (read lazily, memory-mapped)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files(model_dir):
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise ValueError(f"model: tensor {name!r} is in both {self.tensors[name].path.name} and {f.name}")
                self.tensors[name] = info

    @staticmethod
    def files(model_dir: str | Path) -> list[Path]:
        """The ``*.safetensors`` files of ``model_dir``, sorted, checked to be all there without reading them (cheap:
        the engine calls it before any GPU work).

        Raises:
            ValueError: naming the folder and what is missing: no ``*.safetensors`` file, or files that its
                ``model.safetensors.index.json`` names (an interrupted download), or an index that is no JSON
                object with a ``weight_map`` of tensor names to file names.
        """
        root = Path(model_dir)
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ValueError(
                f"model: no *.safetensors file in {root}; pass a Hugging Face checkpoint directory "
                f"saved with safetensors (save_pretrained's default)"
            )
        index = root / INDEX
        if not index.is_file():
            return files
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            named = {str(file) for file in weight_map.values()}
        except (OSError, ValueError, RecursionError, LookupError, TypeError, AttributeError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise ValueError(
                f"model: {index} is not a readable index ({problem:.200}); expected a JSON object with a "
                f'"weight_map" of tensor names to file names; download it again'
            ) from None
        missing = sorted(named - {f.name for f in files})
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ValueError(
                f"model: {root} lacks {len(missing)} of the {len(named)} files its {INDEX} names ({shown}); "
                f"download them (an interrupted download leaves some out)"
            )
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        """Where tensor ``name`` lies (file, byte range), its dtype and shape; a missing name is a ValueError."""
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"model: the checkpoint has no tensor {name!r}") from None

    def array(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array (bfloat16 as uint16 bits, float8_e4m3fn as uint8).

        ``shape``: the expected shape (ValueError naming the tensor otherwise).
        """
        t = self.info(name)
        if shape is not None and t.shape != tuple(shape):
            raise ValueError(
                f"model: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)} from config.json"
            )
        storage = DTYPES[_NAMES[t.dtype]][1]
        if not t.nbytes:
            return np.zeros(t.shape, storage)
        return np.memmap(t.path, dtype=storage, mode="r", offset=t.offset, shape=t.shape)


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, np.ndarray | tuple[np.ndarray, str]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> array, or (array, dtype name) to store e.g. uint16 bits as ``"bfloat16"``).

    Used by tests and benchmarks to make checkpoints without torch. The header is padded to 8 bytes.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs = []
    offset = 0
    for name, value in tensors.items():
        arr, dtype_name = value if isinstance(value, tuple) else (value, None)
        arr = np.ascontiguousarray(arr)
        if dtype_name is None:
            dtype_name = _BY_NUMPY.get(arr.dtype)
            if dtype_name is None:
                raise TypeError(f"tensors[{name!r}]: numpy dtype {arr.dtype} has no safetensors code")
        code = _NAMES.get(dtype_name)
        if code is None or np.dtype(DTYPES[code][1]).itemsize != arr.dtype.itemsize:
            raise TypeError(f"tensors[{name!r}]: cannot store a {arr.dtype} array as {dtype_name!r}")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr)
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with Path(path).open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in blobs:
            f.write(arr.tobytes())

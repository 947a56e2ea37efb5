"""The FP8 (e4m3) KV cache: ``kv_cache_dtype="fp8_e4m3"`` of the engine's constructor.

What is stored: each K and V element divided by its per-tensor scale and rounded to float8 e4m3 (round to nearest
even, saturated at +-448: PTX ``cvt.rn.satfinite.e4m3x2.f32``), one byte instead of two, so the same cache memory
holds twice the tokens. What reads it: FlashInfer's attention modules built for bfloat16 queries over an e4m3 paged
cache (FA2 batch decode and FA2 paged prefill, head_dim 128: the FP8 test wheel's), which take no scales; so, as
flashinfer-python's ``k_scale``/``v_scale`` arguments do, ``k_scale`` is folded into the plans' ``sm_scale`` and the
attention output is multiplied by ``v_scale`` (one small launch per layer, only where ``v_scale != 1``).

The scales (decided as vLLM's ``--kv-cache-dtype fp8`` does): the checkpoint's per-layer ``self_attn.k_scale`` /
``self_attn.v_scale`` tensors where it has them (quantized checkpoints carry them), else 1.0 (vLLM's default without
``calculate_kv_scales``: bf16 activations of K and V stay well inside e4m3's +-448). One k and one v scale serve
every layer (a plan's ``sm_scale`` is one value for all layers): the largest of the layers' scales, which keeps
every layer inside e4m3's range at the cost of a little resolution in the layers whose own scale is smaller.
``kv_cache_scales=(k, v)`` overrides both.

How it is written: the engine's own kernel (``fi_engine/kernels/csrc/append_e4m3.cu``) quantizes this step's K and V
rows (strided views of the QKV GEMM's output) and stores them at their pages, in place of FlashInfer's
``append_paged_kv_cache``, which copies elements of the cache's dtype without converting them. The fused decode
step's QKV GEMV keeps its RoPE epilogue off with an FP8 cache (that epilogue stores 16-bit K/V): RoPE and this
append run as two launches.

Refused at construction, before any GPU work (:func:`check_supported`): families and settings without an FP8 module
(head_dim other than 128, float16 models, MLA/DeepSeek, Gemma 2's soft caps and windows, gpt-oss's sinks).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..kernels.cuda_sources import source
from ..values import FLOAT32_MAX, float32_bits

__all__ = ["KV_CACHE_DTYPES", "KvFp8", "check_supported", "parse_kv_cache_dtype", "read_scales"]

E4M3 = "float8_e4m3fn"
E4M3_MAX = 448.0  # the largest finite e4m3 value

KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8")
"""The accepted ``kv_cache_dtype`` spellings (vLLM's): ``"auto"`` (or None) = the model's dtype; ``"fp8_e4m3"``
(``"fp8"``) = float8 e4m3 with a per-tensor scale."""

SUPPORTED = "bfloat16 Llama-family models (llama, qwen3, mixtral, qwen3_moe) with head_dim 128"


def parse_kv_cache_dtype(value: Any) -> str:
    """``"auto"`` or ``"fp8_e4m3"`` from a constructor's ``kv_cache_dtype`` (None means ``"auto"``); a TypeError or
    ValueError naming the argument otherwise (``fp8_e5m2``: no module reads an e5m2 cache here)."""
    if value is None:
        return "auto"
    if not isinstance(value, str):
        raise TypeError(f"kv_cache_dtype: expected None or one of {', '.join(KV_CACHE_DTYPES)}, got {value!r:.40}")
    if value in ("fp8", "fp8_e4m3"):
        return "fp8_e4m3"
    if value == "auto":
        return value
    hint = " (no attention module of the pinned wheels reads an e5m2 cache; use fp8_e4m3)" if "e5m2" in value else ""
    raise ValueError(f"kv_cache_dtype: expected None or one of {', '.join(KV_CACHE_DTYPES)}, got {value!r:.40}{hint}")


_SCALE_MAX = FLOAT32_MAX
_SCALE_MIN = 1.0 / _SCALE_MAX  # its reciprocal is float32's largest


def _usable_scale(x: float) -> bool:
    """Whether a KV scale and its reciprocal are finite float32 values (the append kernel takes 1/scale, the
    output scaling the scale, each as a float32)."""
    return _SCALE_MIN <= x <= _SCALE_MAX


def parse_scales(value: Any) -> tuple[float, float] | None:
    """``kv_cache_scales``: None (the checkpoint's, else 1.0) or a pair ``(k_scale, v_scale)`` of floats > 0, each
    and its reciprocal a finite float32."""
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    pair: list[float] = []
    if ok:
        for x in value:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not _usable_scale(float(x)):
                ok = False
                break
            pair.append(float(x))
    if not ok:
        raise ValueError(
            f"kv_cache_scales: expected None or a pair (k_scale, v_scale) of floats from {_SCALE_MIN:.3g} to "
            f"{_SCALE_MAX:.3g} (each and its reciprocal a float32: the kernels take them so), got {value!r:.60}"
        )
    return pair[0], pair[1]


def check_supported(family: Any, cfg: Any, model_dir: str | Path) -> None:
    """Refuse an FP8 KV cache where no pinned attention module reads one: a ValueError naming ``kv_cache_dtype``,
    what is missing and what is supported. Reads only ``config.json`` (no GPU work)."""
    why = getattr(family, "fp8_kv_refusal", "this model family's attention")
    if why:
        raise ValueError(
            f"kv_cache_dtype: fp8_e4m3 has no attention kernel for {why}; it serves {SUPPORTED}; "
            f"use kv_cache_dtype='auto'"
        )
    if cfg.head_dim != 128:
        raise ValueError(
            f"kv_cache_dtype: fp8_e4m3 has no attention kernel for head_dim {cfg.head_dim} (the FP8 modules are "
            f"head_dim 128); it serves {SUPPORTED}; use kv_cache_dtype='auto'"
        )
    dtype = _config_dtype(model_dir)
    if dtype not in (None, "bfloat16"):
        raise ValueError(
            f"kv_cache_dtype: fp8_e4m3 has no attention kernel for {dtype} queries (the FP8 modules take bfloat16 "
            f"q and output); it serves {SUPPORTED}; use kv_cache_dtype='auto'"
        )


def check_model_dtype(dtype: str) -> None:
    """The checkpoint's dtype, read from its weights (config.json may not say): bfloat16 only."""
    if dtype != "bfloat16":
        raise ValueError(
            f"kv_cache_dtype: fp8_e4m3 has no attention kernel for {dtype} queries (the FP8 modules take bfloat16 "
            f"q and output); it serves {SUPPORTED}; use kv_cache_dtype='auto'"
        )


def _config_dtype(model_dir: str | Path) -> str | None:
    """``torch_dtype`` (transformers 4) or ``dtype`` (5) of ``config.json`` where it is a string, else None."""
    try:
        d = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the config reader has already named what is wrong with it
    value = (d.get("torch_dtype") or d.get("dtype")) if isinstance(d, dict) else None
    return value if isinstance(value, str) else None


def read_scales(ckpt: Any, num_layers: int) -> tuple[float, float]:
    """``(k_scale, v_scale)`` from the checkpoint's per-layer ``model.layers.N.self_attn.k_scale`` / ``v_scale``
    tensors (one element each; an absent one counts as 1.0): the largest over the layers (see the module
    docstring); ``(1.0, 1.0)`` when it has none. A scale that is not a finite value > 0 is a ValueError naming it."""
    import numpy as np

    found = {"k_scale": [1.0], "v_scale": [1.0]}
    seen = False
    for i in range(num_layers):
        for name in found:
            key = f"model.layers.{i}.self_attn.{name}"
            if key not in ckpt:
                continue
            seen = True
            info = ckpt.info(key)
            raw = np.asarray(ckpt.array(key, tuple(info.shape))).reshape(-1)
            bf16 = info.dtype == "bfloat16"  # read as its uint16 bits: the top half of a float32
            arr = (raw.astype(np.uint32) << 16).view(np.float32) if bf16 else raw.astype(np.float32)
            if arr.size != 1 or not _usable_scale(float(arr[0])):
                raise ValueError(
                    f"model: tensor {key!r} must hold one finite scale > 0 (per-tensor FP8 KV scale) from "
                    f"{_SCALE_MIN:.3g} to {_SCALE_MAX:.3g} (each and its reciprocal a float32), got "
                    f"{arr.size} values, first {float(arr[0]) if arr.size else None}"
                )
            found[name].append(float(arr[0]))
    if not seen:
        return 1.0, 1.0
    return max(found["k_scale"]), max(found["v_scale"])


def open_fp8_cache(eng: Any, ckpt: Any, scales: tuple[float, float] | None) -> KvFp8:
    """The engine's :class:`KvFp8` once its weights are loaded (``eng.dtype`` known): the model's dtype and the GPU
    checked, the scales read (:func:`read_scales`) unless given."""
    check_model_dtype(eng.dtype)
    cc = int(eng.cupy.cuda.Device(eng.device).compute_capability)  # CuPy's "90" for SM 9.0
    if cc < 89:
        raise ValueError(
            f"kv_cache_dtype: fp8_e4m3 needs an SM 8.9+ GPU (its append converts with cvt.e4m3x2; the FP8 attention "
            f"modules are built for SM 9.0); cuda:{eng.device} is SM {cc // 10}.{cc % 10}; use kv_cache_dtype='auto'"
        )
    return KvFp8(eng, scales if scales is not None else read_scales(ckpt, eng.config.num_layers))


class KvFp8:
    """An engine's FP8 KV cache state: the scales and the compiled kernels, and the launches of each step view.

    ``k_scale`` / ``v_scale``: the per-tensor scales (stored = value / scale); ``sm_scale``: the plans' softmax
    scale with ``k_scale`` folded in."""

    def __init__(self, eng: Any, scales: tuple[float, float]) -> None:
        self.k_scale, self.v_scale = scales
        self.sm_scale = eng.config.head_dim**-0.5 * self.k_scale
        self._eng = eng
        module = eng.cupy.RawModule(code=source("append_e4m3.cu"))
        self._module = module  # keeps the functions' module loaded
        self._append = module.get_function("append_kv_e4m3")
        self._scale = module.get_function("scale_bf16")

    def _launch(self, fn: Any, grid: int, block: int, args: list[int], widths: str, name: str) -> Any:
        """A launch of ``fn`` packed once on the engine's stream (Dense's driver path where it is on: a tenth of a
        CuPy kernel call's host time), else a CuPy call on that stream. ``widths``: per argument ``"Q"`` (a pointer
        or 64-bit integer) or ``"I"`` (a 32-bit one), as the kernel declares them (CuPy packs by the value's type)."""
        eng = self._eng
        if eng.dense.gemv:
            from ..kernels.cuda_sources import function_ptr

            return eng.dense.launcher.prepared_kernel(function_ptr(fn), (grid, 1), block, 0, args, name)
        import numpy as np

        stream = eng.stream
        values = tuple(np.uint64(a) if w == "Q" else np.uint32(a) for a, w in zip(args, widths, strict=True))

        def call() -> None:
            with stream:
                fn((grid,), (block,), values)

        return call

    def append(self, v: SimpleNamespace, rows: int, i: int) -> None:
        """Quantize and append the ``rows`` K/V rows of step view ``v`` into layer ``i``'s caches."""
        key = ("fp8 append", i)
        call = v.prepared.get(key)
        if call is None:
            call = v.prepared[key] = self.prepared_append(v, rows, i)
        call()

    def prepared_append(self, v: SimpleNamespace, rows: int, i: int) -> Any:
        """:meth:`append` packed once (the view's buffers never move; the step writes its index arrays)."""
        eng, c = self._eng, self._eng.config
        hk, d = c.num_kv_heads, c.head_dim
        k, val = v.k, v.v
        if k.strides[1:] != (d, 1) or val.strides != k.strides or k.shape[1:] != (hk, d):
            raise ValueError(f"the FP8 append needs K/V rows of contiguous heads, got k {k.shape} strides {k.strides}")
        kc, vc = eng.k_cache[i], eng.v_cache[i]
        args = [
            k.data_ptr,
            val.data_ptr,
            k.strides[0],
            v.batch_indices.data_ptr,
            v.positions.data_ptr,
            v.kv_indices.data_ptr,
            v.kv_indptr.data_ptr,
            kc.data_ptr,
            vc.data_ptr,
            eng.page_size,
            hk * d,
            float32_bits("kv_cache_scales (1 / k_scale)", 1.0 / self.k_scale),
            float32_bits("kv_cache_scales (1 / v_scale)", 1.0 / self.v_scale),
        ]
        return self._launch(self._append, rows, 128, args, "QQQQQQQQQIIII", "append_kv_e4m3")

    def scale_output(self, v: SimpleNamespace, rows: int) -> None:
        """``attn *= v_scale`` for the ``rows`` attention output rows of view ``v`` (nothing where it is 1)."""
        if self.v_scale == 1.0:
            return
        key = "fp8 v_scale"
        call = v.prepared.get(key)
        if call is None:
            call = v.prepared[key] = self.prepared_scale(v, rows)
        call()

    def prepared_scale(self, v: SimpleNamespace, rows: int) -> Any:
        """:meth:`scale_output` packed once; None where ``v_scale`` is 1 (no launch)."""
        if self.v_scale == 1.0:
            return None
        c = self._eng.config
        n = rows * c.num_qo_heads * c.head_dim
        grid = min(1024, -(-n // 256))
        args = [v.attn.data_ptr, n, float32_bits("kv_cache_scales (v_scale)", self.v_scale)]
        return self._launch(self._scale, grid, 256, args, "QQI", "scale_bf16")

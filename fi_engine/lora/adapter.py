"""A LoRA adapter in PEFT's layout, read and checked against the base model it is to serve (:func:`read_adapter`).

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. The config keys read: ``r`` (the
rank), ``lora_alpha``, ``use_rslora`` (the scale is ``lora_alpha / sqrt(r)`` with it, else ``lora_alpha / r``),
``target_modules`` (a list of module names, or PEFT's regular expression: the tensors present say which modules the
adapter changes either way), and, each refused where set (named in the message): ``peft_type`` other than ``LORA``,
``modules_to_save`` (whole modules trained beside the adapter), ``use_dora``, ``bias`` other than ``"none"``,
``fan_in_fan_out``, ``rank_pattern`` / ``alpha_pattern`` (a rank or scale per module; one per adapter here).

The tensors: ``base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`` and
``...mlp.{gate,up,down}_proj.lora_{A,B}.weight`` (an adapter name between ``lora_A`` and ``weight``, as some
writers leave it, is accepted), ``A [r, in]`` and ``B [out, r]`` of the base projection ``W [out, in]``; float16 or
bfloat16, or float32 (rounded to the base model's 16-bit type as read, to nearest even). Anything else (an
embedding's or the LM head's adapter, a module outside those seven, an MLP adapter of a base whose MLP is a mixture
of experts, a layer the base lacks, a shape that does not fit the base, a rank above the engine's
``max_lora_rank``) is refused naming the tensor or the key and the fix.

Messages never name the folder (a server reports them to its clients): they name the files by their own names.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint.safetensors import read_header
from ..values import arg_int, show
from .settings import MAX_LORA_RANK

__all__ = [
    "ATTENTION_MODULES",
    "CONFIG_FILE",
    "MLP_MODULES",
    "WEIGHTS_FILE",
    "BaseShapes",
    "LoraAdapter",
    "read_adapter",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")

# a PEFT tensor name: an optional prefix (base_model.model.), the layer, the block, the module, A or B, an optional
# adapter name, .weight
_TENSOR = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight"
)


@dataclass(frozen=True)
class BaseShapes:
    """What a base model offers adapters: its layers, its 16-bit type (``"float16"``/``"bfloat16"``) and the shape
    ``(out, in)`` of each projection its forward pass adds an adapter to (``shapes``: attention's always, the
    MLP's where it is dense); ``moe``: the MLP is a mixture of experts (whose adapters are not served)."""

    num_layers: int
    dtype: str
    shapes: dict[str, tuple[int, int]]
    moe: bool = False

    @classmethod
    def of(cls, config: Any, dtype: str) -> BaseShapes:
        """The shapes of a Llama-family config (``num_layers``, heads, ``head_dim``, ``hidden_size``,
        ``intermediate_size``, ``moe``) served in ``dtype``."""
        c = config
        q, kv, h = c.num_qo_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size
        shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
        if c.moe is None:
            i = c.intermediate_size
            shapes.update(gate_proj=(i, h), up_proj=(i, h), down_proj=(h, i))
        return cls(c.num_layers, dtype, shapes, c.moe is not None)


@dataclass
class LoraAdapter:
    """One adapter as read (:func:`read_adapter`): its rank, ``lora_alpha``, the scale its product is multiplied by,
    and ``weights``: ``(layer, module) -> (A [rank, in], B [out, rank])`` in the base model's 16-bit storage
    (float16, or bfloat16 bits as uint16)."""

    rank: int
    alpha: float
    scale: float
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def modules(self) -> frozenset[str]:
        """The projections the adapter changes (in any layer)."""
        return frozenset(m for _, m in self.weights)

    @property
    def nbytes(self) -> int:
        """Bytes of its A and B matrices."""
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def read_adapter(lora_path: Any, base: BaseShapes, max_lora_rank: int) -> LoraAdapter:
    """The adapter of PEFT folder ``lora_path`` (a str or Path) for a model of ``base`` shapes, of rank at most
    ``max_lora_rank``. ValueError naming the file and the key or tensor that does not fit (see the module docstring),
    TypeError/ValueError naming the argument for a ``lora_path`` that is no path, a ``base`` that is no
    :class:`BaseShapes`, a ``max_lora_rank`` outside ``[1, 512]``."""
    if not isinstance(lora_path, (str, Path)):
        raise TypeError(f"lora_path: expected the path of a PEFT adapter folder (str), got {type(lora_path).__name__}")
    if lora_path == "":  # (Path("") is the working directory)
        raise ValueError("lora_path: expected the path of a PEFT adapter folder, got ''")
    if not isinstance(base, BaseShapes):
        raise TypeError(f"base: expected the base model's BaseShapes, got {type(base).__name__}")
    max_rank = arg_int("max_lora_rank", max_lora_rank, 1, MAX_LORA_RANK)
    folder = Path(lora_path)
    if not folder.is_dir():
        raise ValueError("lora_path: no such folder; expected a PEFT adapter folder (adapter_config.json and "
                         "adapter_model.safetensors)")  # fmt: skip
    rank, alpha, scale = _read_config(folder / CONFIG_FILE, max_rank)
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        hint = " (adapter_model.bin, pickled, is not read: save it with safe_serialization=True)" if pickled else ""
        raise ValueError(f"{WEIGHTS_FILE}: missing from the adapter folder{hint}")
    adapter = LoraAdapter(rank, alpha, scale)
    halves: dict[tuple[int, str], dict[str, tuple[np.ndarray, str]]] = {}
    for name, (tensor, dtype) in _tensors(weights_file).items():
        layer, module, half = _place(name, base)
        out, inp = base.shapes[module]
        want = (rank, inp) if half == "A" else (out, rank)
        if tensor.shape != want:
            raise ValueError(f"{WEIGHTS_FILE}: {name}: shape {list(tensor.shape)}, expected {list(want)} (rank "
                             f"{rank} of the base model's {module} [{out}, {inp}]); was it trained on this base "
                             f"model?")  # fmt: skip
        halves.setdefault((layer, module), {})[half] = (tensor, dtype)
    if not halves:
        raise ValueError(f"{WEIGHTS_FILE}: holds no lora_A / lora_B tensor of the base model's projections")
    for (layer, module), pair in sorted(halves.items()):
        if len(pair) != 2:
            lacking = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"{WEIGHTS_FILE}: layer {layer}'s {module} has no {lacking} tensor; the file is "
                             f"incomplete")  # fmt: skip
        adapter.weights[layer, module] = (_to_storage(*pair["A"], base.dtype), _to_storage(*pair["B"], base.dtype))
    return adapter


def _read_config(file: Path, max_rank: int) -> tuple[int, float, float]:
    """``(r, lora_alpha, scale)`` of an ``adapter_config.json``, every refused key named."""
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{CONFIG_FILE}: missing from the adapter folder") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{CONFIG_FILE}: not readable JSON ({type(exc).__name__}); save the adapter again") from None
    if not isinstance(d, dict):
        raise ValueError(f"{CONFIG_FILE}: expected a JSON object, got {type(d).__name__}")

    def key(name: str) -> str:
        return f"{CONFIG_FILE}: {name}"

    peft_type = d.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{key('peft_type')}: {show(peft_type)} is not served (LoRA adapters only)")
    if d.get("modules_to_save"):
        raise ValueError(f"{key('modules_to_save')}: {show(d['modules_to_save'])}: whole modules trained beside the "
                         f"adapter are not served; merge them into the base model instead")  # fmt: skip
    if d.get("use_dora"):
        raise ValueError(f"{key('use_dora')}: DoRA adapters are not served (plain LoRA only)")
    if d.get("bias", "none") not in ("none", None):
        raise ValueError(f"{key('bias')}: {show(d['bias'])}: trained biases are not served; train with bias='none'")
    if d.get("fan_in_fan_out"):
        raise ValueError(f"{key('fan_in_fan_out')}: transposed (Conv1D) weights are not served")
    for name in ("rank_pattern", "alpha_pattern"):
        if d.get(name):
            raise ValueError(f"{key(name)}: a rank or alpha per module is not served (one r and lora_alpha per "
                             f"adapter)")  # fmt: skip
    r = d.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{key('r')}: expected the rank, an int >= 1, got {show(r)}")
    if r > max_rank:
        raise ValueError(f"{key('r')}: rank {r} exceeds the engine's max_lora_rank {max_rank}; raise max_lora_rank")
    alpha = d.get("lora_alpha", 8)  # (PEFT's default)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{key('lora_alpha')}: expected a finite number, got {show(alpha)}")
    rslora = d.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValueError(f"{key('use_rslora')}: expected true or false, got {show(rslora)}")
    targets = d.get("target_modules")
    if isinstance(targets, list):
        outside = [t for t in targets if t not in ATTENTION_MODULES + MLP_MODULES]
        if outside:
            raise ValueError(f"{key('target_modules')}: {show(outside)} not served (the projections "
                             f"{', '.join(ATTENTION_MODULES + MLP_MODULES)} are)")  # fmt: skip
    elif targets is not None and not isinstance(targets, str):  # (a str: PEFT's regular expression)
        raise ValueError(f"{key('target_modules')}: expected a list of module names, got {show(targets)}")
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    return r, float(alpha), float(scale)


def _tensors(file: Path) -> dict[str, tuple[np.ndarray, str]]:
    """Every tensor of the adapter's safetensors file, read, with its dtype (bfloat16 as uint16 bits); ValueError
    naming the file (not its folder)."""
    try:
        infos = read_header(file)
    except ValueError as exc:
        raise ValueError(str(exc).replace(str(file), WEIGHTS_FILE)) from None
    out = {}
    for name, info in infos.items():
        if info.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"{WEIGHTS_FILE}: {name}: dtype {info.dtype}; adapters are read in float16, bfloat16 "
                             f"or float32")  # fmt: skip
        storage = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[info.dtype]
        with file.open("rb") as f:
            f.seek(info.offset)
            raw = f.read(info.nbytes)
        out[name] = (np.frombuffer(raw, storage).reshape(info.shape), info.dtype)
    return out


def _place(name: str, base: BaseShapes) -> tuple[int, str, str]:
    """``(layer, module, "A" or "B")`` of tensor ``name``, or ValueError naming it where the base takes none."""
    m = _TENSOR.fullmatch(name)
    if m is None:
        raise ValueError(f"{WEIGHTS_FILE}: {name}: not an adapter of a served projection (the layers' "
                         f"{', '.join(ATTENTION_MODULES + MLP_MODULES)})")  # fmt: skip
    layer, block, module, half = int(m[1]), m[2], m[3], m[4]
    known = ATTENTION_MODULES if block == "self_attn" else MLP_MODULES
    if module not in known:
        raise ValueError(f"{WEIGHTS_FILE}: {name}: {block}.{module} is not served (the projections "
                         f"{', '.join(known)} of {block} are)")  # fmt: skip
    if module not in base.shapes:
        why = "the base model's MLP is a mixture of experts, whose adapters are not served" if base.moe else (
            "the base model has no such projection")  # fmt: skip
        raise ValueError(f"{WEIGHTS_FILE}: {name}: {why}; use an adapter of the attention projections")
    if layer >= base.num_layers:
        raise ValueError(f"{WEIGHTS_FILE}: {name}: layer {layer}, but the base model has {base.num_layers}; was it "
                         f"trained on this base model?")  # fmt: skip
    return layer, module, half


def _to_storage(a: np.ndarray, stored: str, dtype: str) -> np.ndarray:
    """Tensor ``a`` of type ``stored`` (float16, bfloat16 as uint16 bits, or float32) in ``dtype``'s storage,
    contiguous; converted through float32 where the types differ (rounded to nearest even)."""
    if stored == dtype:
        return np.ascontiguousarray(a)
    values = (a.astype(np.uint32) << 16).view(np.float32) if stored == "bfloat16" else a.astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"{WEIGHTS_FILE}: holds a NaN or an infinity; the adapter is damaged")
    if dtype == "float16":
        with np.errstate(over="ignore"):
            out = values.astype(np.float16)
        if not np.isfinite(out).all():
            raise ValueError(f"{WEIGHTS_FILE}: a value exceeds float16's range (65504); serve a bfloat16 base")
        return out
    bits32 = np.ascontiguousarray(values).view(np.uint32)
    return ((bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16).astype(np.uint16)

"""The fused decode step's GEMVs with LoRA adapters (``csrc/lora_fused.cu``): the fused GEMVs of
:mod:`~fi_engine.kernels.fused_gemv` with each row's adapter expand as an epilogue, and the shrinks that normalize
their own input, so that a step whose rows take adapters keeps the fused step's launches (the norms, RoPE with the KV
append and SiLU inside the GEMVs) and adds one shrink launch per projection group, or none where the shrink runs in
the GEMV's own grid (a :class:`LoraExpand` with ``sync``).

For a projection ``y = in @ W^T`` of a row whose adapter sits in GPU slot ``s`` (:mod:`fi_engine.lora.slots`' layout):

- the shrink: ``t[r, :width] = scale[s] * A_s @ in[r]`` (float32), ``in`` the GEMV's input rows as its prologue makes
  them: :meth:`LoraFusedGemvs.prepared_shrink` computes the RMS norm (NORM) or the residual add and norm (ADD_NORM)
  itself, as the fused GEMV's prologue does (the same 16-bit values); over rows made before (the attention's output,
  ``silu(gate) * up``) it is :mod:`~fi_engine.kernels.lora_bgmv`'s shrink;
- the expand, in the GEMV's epilogue (:class:`LoraExpand`): ``y[r, j] = round(sum_c in[r, c] W[j, c] + t[r, p(j)
  rank:] . Bt_s[:, j])``, before RoPE (QKV), SiLU-and-mul (gate/up) and the rounding of the o and down outputs. One
  rounding where the separate launches round twice (the GEMV's output, then the expand's sum), so the logits differ
  from theirs by 16-bit rounding, not more (the GPU tests bound both against the merged weights' float32 logits);
- or both in one launch (``LoraExpand.sync`` set: the ``lora_grid_*`` kernels): the GEMV's grid gets ``width`` more
  blocks, the first to start, which stage the input rows as the GEMV blocks do and compute ``t`` (the normed shrink's
  sums, in its order); the GEMV blocks wait for them on the GPU before their first expand, while they stream their
  weights meanwhile. A launch fewer a projection group, and the shrink's sums off the step's critical path.

A separate module (compiled only by an engine serving adapters with the runner's ``lora_fused``), so the fused
GEMVs' own kernels are unchanged (``tools/kernel_fingerprints.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec

from ..values import float32_bits
from .call_forms import forwarded_signature
from .cublas import CUDA_R_16BF, CUDA_R_16F
from .cuda_sources import function_ptr, source
from .fused_args import ADD_NORM, GATE_UP, NORM, PLAIN, ROPE, check_fused_values
from .fused_gemv import EpilogueCall, FusedGemvs, FusedKernels, load_row_kernels
from .launch import MAX_LD, U64, int_arg
from .lora_bgmv import MAX_T_WIDTH

__all__ = ["LoraExpand", "LoraFusedGemvs", "LoraFusedKernels", "expand_ints", "grid_ints", "shrink_launch"]

SHRINK_THREADS = 256  # a normed shrink block: lora_bgmv.cu's shrink's threads, so its sums are in the same order
_SHRINK_SMEM = (48 << 10) - 1024  # one staged row of k 16-bit values, no opt-in (k up to 24064)
# the LoRA GEMVs' kinds by the fused GEMV's mode and epilogue flag (PLAIN: the o and down projections' rows as they are)
_KINDS = {PLAIN: "copy", NORM: "norm", ADD_NORM: "addnorm"}
_KINDS |= {NORM | ROPE: "norm_rope", ADD_NORM | ROPE: "addnorm_rope", ADD_NORM | GATE_UP: "addnorm_gateup"}
_MODE_NAMES = {PLAIN: "PLAIN", NORM: "NORM", ADD_NORM: "ADD_NORM"}
P = ParamSpec("P")


@dataclass(frozen=True)
class LoraExpand:
    """What the expand epilogue of one projection reads, addresses as ints: ``t`` the shrink's float32 rows (row
    stride ``t_ld`` elements), ``slots`` the step's int32 slot per row, ``targets`` the int32 groups' bits per slot
    (``bit``: this projection's), ``bt`` slot 0's ``Bt [rank, n]`` of this layer (16-bit, ``b_slot`` elements between
    slots), ``rank`` the slots' rank and ``(n0, n1)`` where the second and third parts' columns begin
    (:attr:`~fi_engine.lora.slots.Group.split`). A value: the step's launches are packed with it once.

    With ``sync`` (not 0) the GEMV's own grid computes ``t`` first (the shrink in the grid, :func:`grid_ints`):
    ``a`` slot 0's ``A [width, k]`` of this layer (16-bit, ``a_slot`` elements between slots), ``scale`` the slots'
    float32 scales, ``width`` the shrink's entries (the parts times ``rank``), ``sync`` two uint64 counters of zeros
    that every launch of this one call site, and no other, uses (the kernels take a launch's place from them, and
    need its grid the same each launch)."""

    t: int
    t_ld: int
    slots: int
    targets: int
    bit: int
    bt: int
    b_slot: int
    rank: int
    n0: int
    n1: int
    a: int = 0
    a_slot: int = 0
    scale: int = 0
    width: int = 0
    sync: int = 0


def expand_ints(lora: object, n: int) -> list[int]:
    """The expand's 10 kernel arguments (after the GEMV's and, for the QKV GEMV, RoPE's), checked against the GEMV's
    ``n`` output columns (``Bt``'s row length): TypeError naming ``lora`` that is no :class:`LoraExpand`, ValueError
    naming its field (``lora.<field>``) of the wrong range, alignment (``t``, ``slots``, ``targets``: 4 bytes;
    ``bt``: 2) or a NULL address, ``n0 <= n1 <= n`` broken, ``t_ld`` short of the parts' ranks, ``b_slot`` short of
    a slot's ``rank * n``."""
    if not isinstance(lora, LoraExpand):
        raise TypeError(f"lora: expected a LoraExpand, got {type(lora).__name__}")
    e = lora
    n = int_arg("n", n, 1, 1 << 31)
    rank = int_arg("lora.rank", e.rank, 1, 513)
    n0 = int_arg("lora.n0", e.n0, 1, n + 1)
    n1 = int_arg("lora.n1", e.n1, n0, n + 1)
    parts = 1 + (n0 < n) + (n1 < n)
    t_ld = int_arg("lora.t_ld", e.t_ld, parts * rank, MAX_LD)
    bit = int_arg("lora.bit", e.bit, 1, (1 << 30) + 1)
    b_slot = int_arg("lora.b_slot", e.b_slot, rank * n, MAX_LD)
    for name, align in (("t", 4), ("slots", 4), ("targets", 4), ("bt", 2)):
        value = int_arg(f"lora.{name}", getattr(e, name), 0, U64)
        if not value or value % align:
            raise ValueError(f"lora.{name}: 0x{value:x} must be a non-NULL address aligned to {align} bytes")
    return [e.t, t_ld, e.slots, e.targets, bit, e.bt, b_slot, rank, n0, n1]


def grid_ints(lora: object, n: int, k: int) -> list[int]:
    """The in-grid shrink's 5 kernel arguments (after :func:`expand_ints`', which checks the expand's fields),
    checked against the GEMV's ``n`` output columns and ``k`` inputs: TypeError naming ``lora`` that is no
    :class:`LoraExpand`, ValueError/TypeError naming ``n``, ``k`` or the field (``lora.<field>``) of the wrong type
    or range, a ``width`` other than the expand's parts times its rank, ``a_slot`` short of ``width * k`` or no
    multiple of 8, a misaligned (``a`` 16 bytes, ``scale`` 4, ``sync`` 8) or NULL address."""
    if not isinstance(lora, LoraExpand):
        raise TypeError(f"lora: expected a LoraExpand, got {type(lora).__name__}")
    e = lora
    n = int_arg("n", n, 1, 1 << 31)
    k = int_arg("k", k, 8, 1 << 31)
    parts = 1 + (e.n0 < n) + (e.n1 < n)
    width = int_arg("lora.width", e.width, 1, MAX_T_WIDTH + 1)
    if width != parts * e.rank:
        raise ValueError(f"lora.width: expected the {parts} parts times lora.rank ({parts * e.rank}), got {width}")
    a_slot = int_arg("lora.a_slot", e.a_slot, width * k, MAX_LD)
    if a_slot % 8:
        raise ValueError(f"lora.a_slot: {a_slot} elements between slots must be a multiple of 8 (16-byte rows)")
    for name, align in (("a", 16), ("scale", 4), ("sync", 8)):
        value = int_arg(f"lora.{name}", getattr(e, name), 0, U64)
        if not value or value % align:
            raise ValueError(f"lora.{name}: 0x{value:x} must be a non-NULL address aligned to {align} bytes")
    return [e.a, a_slot, e.scale, width, e.sync]


def shrink_launch(
    mode: int,
    rows: int,
    h: int,
    h_ld: int,
    x: int,
    x_ld: int,
    norm_weight: int,
    eps: float,
    k: int,
    slots: int,
    scale: int,
    targets: int,
    bit: int,
    a: int,
    a_slot: int,
    width: int,
    t: int,
    t_ld: int,
) -> tuple[tuple[int, int], int, list[int]]:
    """The grid, dynamic shared bytes and kernel arguments of a normed shrink (:meth:`LoraFusedGemvs.prepared_shrink`):
    ValueError/TypeError naming the argument that is no int (``eps``: no float32), out of range, misaligned (``h``,
    ``x``, ``norm_weight``, ``a`` and the row strides: 16 bytes; ``slots``, ``scale``, ``targets``, ``t``: 4) or
    NULL, ``k`` not a multiple of 8 or past one block's 47 KiB of staged input, ``t_ld`` below ``width``."""
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in (NORM, ADD_NORM):
        raise ValueError(f"mode: a normed shrink takes NORM or ADD_NORM, got {mode!r:.40}")
    # the norm's own values as the fused GEMV checks them (eps a float32; the addresses and strides ints)
    check_fused_values((mode, rows, x, x_ld, 16, 1, k, 16, 1, 0, 0, h, h_ld, norm_weight, 0, eps))
    rows = int_arg("rows", rows, 1, 1 << 31)
    k = int_arg("k", k, 8, _SHRINK_SMEM // 2 + 1)
    if k % 8:
        raise ValueError(f"k: expected a multiple of 8 (the kernel reads 16-byte vectors), got {k}")
    width = int_arg("width", width, 1, MAX_T_WIDTH + 1)
    t_ld = int_arg("t_ld", t_ld, width, MAX_LD)
    a_slot = int_arg("a_slot", a_slot, 0, MAX_LD)
    bit = int_arg("bit", bit, 1, (1 << 30) + 1)
    if rows > 1:
        for name, value in (("h_ld", h_ld), *([("x_ld", x_ld)] if mode == ADD_NORM else [])):
            if value < k:
                raise ValueError(f"{name}: {value} elements between rows is less than a row's {k}")
    aligned = [("h", h, 16), ("h_ld", 2 * h_ld, 16), ("norm_weight", norm_weight, 16), ("a", a, 16)]
    aligned += [("a_slot", 2 * a_slot, 16), ("slots", slots, 4), ("scale", scale, 4), ("targets", targets, 4)]
    aligned += [("t", t, 4)] + ([("x", x, 16), ("x_ld", 2 * x_ld, 16)] if mode == ADD_NORM else [])
    for name, value, align in aligned:
        value = int_arg(name, value, 0, U64)
        if value % align or (value == 0 and not name.endswith(("_ld", "_slot"))):
            raise ValueError(f"{name}: 0x{value:x} must be a non-NULL address aligned to {align} bytes")
    ints = [h, x, h_ld, x_ld, norm_weight, float32_bits("eps", float(eps))]
    ints += [k, slots, scale, targets, bit, a, a_slot, width, t, t_ld]
    return (width, rows), 2 * k, ints


@dataclass
class LoraFusedKernels:
    """The compiled LoRA fused GEMVs (:meth:`compile`) of one form: ``in_grid`` (each shrink in its GEMV's grid) or
    not (a shrink launched before each GEMV); ``gemvs`` ``(kind, ab_type) -> CUfunction per row count`` (kinds
    ``"copy"``, ``"norm"``, ``"addnorm"``, ``"norm_rope"``, ``"addnorm_rope"``, ``"addnorm_gateup"``), ``shrinks``
    ``(mode, ab_type) -> CUfunction`` (NORM, ADD_NORM; the launched form's only), ``smem`` the most dynamic shared
    memory a GEMV launch may take, ``module`` the CuPy module that owns them."""

    gemvs: dict[tuple[str, int], tuple[int, ...]]
    shrinks: dict[tuple[int, int], int]
    smem: int
    module: Any
    in_grid: bool = True

    @staticmethod
    def options(in_grid: bool = True) -> list[str]:
        """NVRTC's options for ``csrc/lora_fused.cu``: the fused GEMVs' (:meth:`FusedKernels.options`: the same
        prologue arithmetic) and the form its kernels take (one form a module: the two compile in twice the time)."""
        return [*FusedKernels.options(), f"-DLORA_SHRINK_IN_GRID={int(bool(in_grid))}"]

    @staticmethod
    def launch_options() -> list[str]:
        """:meth:`options` of the form with shrink launches (``tools/kernel_fingerprints.py`` compiles both)."""
        return LoraFusedKernels.options(False)

    @staticmethod
    def kernel_names(in_grid: bool = True) -> dict[tuple[str, int], str]:
        """The GEMVs :meth:`compile` loads, ``(kind, ab_type) -> kernel name`` without the ``_r<rows>`` suffix."""
        names = {}
        prefix = "lora_grid" if in_grid else "lora_gemv"
        for ab, tag in ((CUDA_R_16F, "f16"), (CUDA_R_16BF, "bf16")):
            for kind in ("copy", "norm", "addnorm", "norm_rope", "addnorm_rope", "addnorm_gateup"):
                names[(kind, ab)] = f"{prefix}_{tag}_{kind}"
        return names

    @staticmethod
    def shrink_names(in_grid: bool = True) -> dict[tuple[int, int], str]:
        """The normed shrinks :meth:`compile` loads (the launched form's; none in the grid form), ``(mode, ab_type)
        -> kernel name``."""
        if in_grid:
            return {}
        tags = ((CUDA_R_16F, "f16"), (CUDA_R_16BF, "bf16"))
        return {
            (m, ab): f"lora_shrink_{tag}_{kind}"
            for ab, tag in tags
            for m, kind in ((NORM, "norm"), (ADD_NORM, "addnorm"))
        }

    @classmethod
    def compile(cls, cupy: Any, in_grid: bool = True) -> LoraFusedKernels:
        """Compile ``csrc/lora_fused.cu`` in the form ``in_grid`` says (:meth:`options`) on CuPy's current device;
        raises what NVRTC or the driver raise."""
        module = cupy.RawModule(code=source("lora_fused.cu"), options=tuple(cls.options(in_grid)))
        gemvs, smem = load_row_kernels(cupy, module, cls.kernel_names(in_grid))
        names = cls.shrink_names(in_grid)
        shrinks = {key: function_ptr(module.get_function(name)) for key, name in names.items()}
        return cls(gemvs, shrinks, smem, module, bool(in_grid))


def _lora_form(
    parts: Callable[Concatenate[FusedGemvs, P], EpilogueCall], modes: tuple[int, ...], name: str, doc: str
) -> Callable[Concatenate[LoraFusedGemvs, LoraExpand, P], Callable[[], None]]:
    """The LoRA form of the fused GEMV that ``parts`` checks: the expand ``lora`` first, then ``parts``'
    parameters (``mode`` first, one of ``modes``: ValueError naming it otherwise, before any other check)."""
    names = " or ".join(_MODE_NAMES[m] for m in modes)  # (the modes its kernels follow)
    params = list(inspect.signature(parts).parameters)[1:]  # (without self)
    ahead = params[: params.index("mode")]  # an epilogue's value before mode (value_then_parameters), or none

    def prepared(self: LoraFusedGemvs, lora: LoraExpand, *args: P.args, **kwargs: P.kwargs) -> Callable[[], None]:
        # mode's place among the positional arguments: behind the epilogue's value unless that came by name, as
        # value_then_parameters takes it (rope=... with the rest positional: args[0] is mode)
        at = sum(name not in kwargs for name in ahead)
        mode = args[at] if len(args) > at else kwargs.get("mode")
        if isinstance(mode, bool) or not isinstance(mode, int) or mode not in modes:
            raise ValueError(f"mode: the {name} takes {names}, got {mode!r:.40}")
        return self._prepared(parts(self.fused, *args, **kwargs), lora, name)

    prepared.__doc__ = doc
    prepared.__signature__ = forwarded_signature(parts, "Callable[[], None]", ("lora", "LoraExpand"))  # type: ignore[attr-defined]
    return prepared


def _shrink_form(
    launch: Callable[P, tuple[tuple[int, int], int, list[int]]], doc: str
) -> Callable[Concatenate[LoraFusedGemvs, int, P], Callable[[], None]]:
    """The packed-once form of the normed shrink whose launch ``launch`` checks: ``ab_type`` first, then its
    parameters."""

    def prepared(self: LoraFusedGemvs, ab_type: int, *args: P.args, **kwargs: P.kwargs) -> Callable[[], None]:
        grid, smem, ints = launch(*args, **kwargs)
        int_arg("ab_type", ab_type, -(1 << 63), 1 << 63)
        mode: Any = args[0] if args else kwargs["mode"]  # (checked by launch: NORM or ADD_NORM)
        if self.kernels.in_grid:
            raise ValueError("ab_type: these LoRA GEMVs compute their shrinks in their own grids (no shrink launch)")
        fn = self.kernels.shrinks.get((mode, ab_type))
        if fn is None:
            raise ValueError(f"ab_type: no LoRA shrink for {ab_type} (16-bit types only)")
        return self.launcher.prepared_kernel(fn, grid, SHRINK_THREADS, smem, ints, "lora shrink (normed)", pdl=True)

    prepared.__doc__ = doc
    prepared.__signature__ = forwarded_signature(launch, "Callable[[], None]", ("ab_type", "int"))  # type: ignore[attr-defined]
    return prepared


class LoraFusedGemvs:
    """The LoRA forms of ``fused``'s (a Dense's :class:`~fi_engine.kernels.fused_gemv.FusedGemvs`) prepared GEMVs,
    ``kernels`` (:class:`LoraFusedKernels`) launched through the Dense's ``launcher``: each takes the GEMV's
    arguments as the base method does (checked by it) and a :class:`LoraExpand`. 16-bit weights only (a weight
    registered as FP8 or int4 is refused by name)."""

    def __init__(self, fused: FusedGemvs, launcher: Any, kernels: LoraFusedKernels) -> None:
        self.fused, self.launcher, self.kernels = fused, launcher, kernels
        self._sync_grids: dict[int, tuple[int, int]] = {}  # an in-grid shrink's counters -> (grid, width) packed

    def fits(self, rows: int, k: int) -> bool:
        """Whether the LoRA GEMVs serve ``rows`` input rows of ``k`` (the fused GEMVs' :meth:`FusedGemvs.fits` and
        their staged rows within this module's shared memory) and the normed shrink a row of ``k``."""
        return self.fused.fits(rows, k) and rows * k * 2 <= self.kernels.smem and 2 * k <= _SHRINK_SMEM

    def _function(self, kind: str, ab_type: int, rows: int) -> int:
        fns = self.kernels.gemvs.get((kind, ab_type))
        if fns is None:
            raise ValueError(f"ab_type: no LoRA fused GEMV for {ab_type} (16-bit types only)")
        return fns[rows - 1]

    def _sixteen_bit(self, w: int) -> None:
        q = self.fused._quantized  # (the Dense's registry of quantized weights)
        if (q.fp8_weights and w in q.fp8_weights) or (q.int4_weights and w in q.int4_weights):
            raise ValueError("w: the LoRA fused GEMVs read 16-bit weights; this one is registered as FP8 or int4")

    def _prepared(self, call: EpilogueCall, lora: LoraExpand, name: str) -> Callable[[], None]:
        """The LoRA form of the fused GEMV ``call`` (checked by its base method), its expand ``lora`` after the
        base arguments, packed once through the base's launch (the same grid and programmatic dependent launch)."""
        mode, rows, _, _, w, _, k, _, _, ab_type, *_ = call.key
        if not self.fits(rows, k):
            raise ValueError(f"rows, k: the LoRA fused GEMV does not serve {rows} rows of {k} (see fits)")
        self._sixteen_bit(w)
        ints = [*call.ints, *expand_ints(lora, call.weight_rows)]
        if bool(lora.sync) != self.kernels.in_grid:
            form = "in their grids (give lora.sync)" if self.kernels.in_grid else "launched before them (no lora.sync)"
            raise ValueError(f"lora.sync: these LoRA GEMVs were compiled with the shrinks {form}")
        fn = self._function(_KINDS[mode], ab_type, rows)
        if not lora.sync:
            return self.fused._prepared_epilogue(fn, call.smem, ints, call.columns, name)
        # the shrink in the grid: its width more blocks; the counters' launches must all take the same grid
        ints += grid_ints(lora, call.weight_rows, k)
        grid = (self.fused.epilogue_grid(call.columns) + lora.width, lora.width)
        if self._sync_grids.setdefault(lora.sync, grid) != grid:
            raise ValueError(
                f"lora.sync: 0x{lora.sync:x} counts the launches of another call site (grid and width "
                f"{self._sync_grids[lora.sync]}, here {grid}); give each call site its own counters"
            )
        return self.fused._prepared_epilogue(fn, call.smem, ints, call.columns, name, extra_blocks=lora.width)

    prepared_linear = _lora_form(
        FusedGemvs.linear_parts,
        (PLAIN, NORM, ADD_NORM),
        "lora gemv",
        """``FusedGemvs.prepared``'s GEMV (16-bit ``y``: ``c_type`` is ``ab_type``) with the expand ``lora`` as its
        epilogue, packed once: ``lora`` first, then ``FusedGemvs.linear``'s parameters, ``mode``
        :data:`~fi_engine.kernels.fused_args.PLAIN` (``in = x [rows, k]`` as it is: the o and down projections;
        ``h``, ``norm_weight``, ``h_out``, ``eps`` unused), NORM or ADD_NORM (as ``FusedGemvs.linear``: the QKV GEMV
        where RoPE is no epilogue). Raises TypeError/ValueError naming the argument as that method does, and
        :func:`expand_ints`'.""",
    )
    prepared_qkv_rope = _lora_form(
        FusedGemvs.qkv_rope_parts,
        (NORM, ADD_NORM),
        "lora qkv gemv + rope",
        """``FusedGemvs.prepared_qkv_rope`` with the expand ``lora`` (first, then that method's parameters) before
        RoPE and the KV append (its checks, then :func:`expand_ints`'); ``mode`` NORM or ADD_NORM only (ValueError
        naming it otherwise).""",
    )
    prepared_gate_up_silu = _lora_form(
        FusedGemvs.gate_up_silu_parts,
        (ADD_NORM,),
        "lora gate/up gemv + silu",
        """``FusedGemvs.prepared_gate_up_silu`` (ADD_NORM) with the expand ``lora`` (first, then that method's
        parameters) before SiLU-and-mul (its checks, then :func:`expand_ints`' over the ``n`` gate and up
        columns).""",
    )

    prepared_shrink = _shrink_form(
        shrink_launch,
        """The shrink of the rows the fused GEMV after it normalizes, packed once (``ab_type`` first, then
        :func:`shrink_launch`'s parameters): ``t[r, :width] = scale[s] * A_s @ in[r]`` for each of ``rows`` rows
        of slot ``s = slots[r] >= 0`` whose ``targets[s]`` has ``bit``, ``in = rmsnorm(h[r]) * norm_weight`` (NORM)
        or of ``h[r] + x[r]`` (ADD_NORM; the residual is not written: the GEMV writes it), rounded to the 16-bit
        type as the GEMV's prologue rounds it; ``A_s`` at ``a + s * a_slot`` elements (``[width, k]``). Launched
        with programmatic dependent launch (its blocks wait on the GPU for the kernel before them; the GEMV after
        them loads its weights while they sum). Raises what :func:`shrink_launch` raises, and TypeError/ValueError
        naming ``ab_type`` for no 16-bit type.""",
    )

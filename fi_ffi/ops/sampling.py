"""Sampling ops of ``sampling.so``: softmax, categorical sampling (plain, top-p, top-k, min-p, top-k + top-p),
renormalization / masking by top-p and top-k, and chain speculative sampling.

Every call is asynchronous on ``stream`` (see :mod:`fi_ffi.tensor.streams`) and never synchronizes. **fi_ffi never
allocates device memory**: outputs (``out``, ``valid``, the speculative outputs) and scratch buffers
(``workspace``, ``row_states_buffer``) are passed in by the caller, with the sizes stated below. Tensors are
:class:`~fi_ffi.tensor.Tensor` descriptors or DLPack / CUDA-array-interface producers (torch, CuPy, ...), all
contiguous and on one CUDA device.

Shapes: ``probs`` / ``logits`` are ``[R, V]`` float32 (``R`` distributions over ``V`` tokens); ``out`` is
``[B]`` int32 or int64, one sample per output row. Without ``indices``, ``B == R`` and row ``b`` samples
from ``probs[b]``; with ``indices`` (``[B]``, ``out``'s dtype) row ``b`` samples from ``probs[indices[b]]``.

Per-row parameters: ``top_p``, ``top_k``, ``min_p`` and ``temperature`` are a Python number (one value for
all rows) or a ``[R]`` tensor (``top_p``/``min_p``/``temperature`` float32; ``top_k`` int32, or ``out``'s
dtype for the sampling ops, which read it with the output's index type).

Randomness (see :mod:`fi_ffi.generator`): each sampling op takes ``generator=`` (a :class:`Generator`,
advanced as flashinfer-python advances its ``torch.Generator``) or explicit ``seed=`` and ``offset=``
(both ints, used as given; or, with FlashInfer >= 0.7 modules, both int64 CUDA tensors of one value or one
per output row, read by the kernel at run time, which is what lets a captured CUDA graph advance them). With
neither, the process-wide :func:`~fi_ffi.generator.default_generator` is used.

Releases: FlashInfer 0.7 changed the sampling entry points (seed/offset tensors; a ``valid`` output on the
``*_from_probs`` ops; ``is_deterministic`` and a ``workspace`` on the renorm ops). fi_ffi declares both
argument lists and picks the one the pinned module states (:func:`release` says which). The calls are the
same; arguments only 0.7 has are refused by name on a 0.6.3 module (``valid``, ``workspace``, tensor seeds,
``is_deterministic=True``), and 0.7's required ``valid`` / ``workspace`` must be passed there.
The two-release ops launch through a deferred launcher (``launcher(..., defer=True)``): a call's arguments are
checked against both argument lists before the module is looked up, so a bad argument is named before a kernel
wheel could be downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from ..abi.wire import BOOL, FLOAT, INT, Declaration, declare, optional_tensor, scalar, tensor, tensors
from ..dtypes import DType, bfloat16, bool_, float16, float32, int32, int64
from ..generator import Generator, default_generator, draw
from ..launch import checks
from ..launch.launcher import launcher
from ..launch.pointer_rules import PointerRules
from ..launch.registry import op
from ..tensor.protocols import StreamLike, TensorLike, TensorT

_URI = "sampling"
_U64 = 1 << 64
_I64 = 1 << 63
ROW_STATES_BYTES = 1 << 20
ROW_STATE_ALIGNMENT = 4  # bytes: the radix kernels' row states are 4-byte fields
"""Size (bytes) of the ``row_states_buffer`` of the radix top-k kernels: what flashinfer-python allocates (one
state per CTA group, at most one group per SM; the deterministic 0.7 kernels add scratch after them). It must
be zero-filled once before its first use (the kernels leave it zeroed) and not be shared by calls that may
run concurrently (different streams)."""

# ---- declarations ---------------------------------------------------------------------------------------------
# Names: the public argument where one maps 1:1 (errors name it): ``top_p`` is the per-row tensor and
# ``top_p_val`` the scalar, ``seed``/``offset`` the 0.7 device tensors and ``seed_val``/``offset_val`` the ints.


def _rng_063() -> list[Any]:
    return [scalar("seed_val", INT, per_call=True), scalar("offset_val", INT, per_call=True)]


def _rng_072() -> list[Any]:
    return [
        optional_tensor("seed", default=None),
        scalar("seed_val", INT, per_call=True),
        optional_tensor("offset", default=None),
        scalar("offset_val", INT, per_call=True),
    ]


def _pair(entry: str, head: list[Any], head_072: list[Any], middle: list[Any]) -> tuple[Declaration, Declaration]:
    """The 0.6.3 and 0.7.2 declarations of a sampling entry point: ``head`` (0.7.2: ``head_072``), ``middle``,
    ``deterministic``, then the random state."""
    tail = [("deterministic", BOOL)]
    return (
        declare(entry, [*head, *middle, *tail, *_rng_063()], release="0.6.3"),
        declare(entry, [*head_072, *middle, *tail, *_rng_072()], release="0.7.2"),
    )


_OUT = tensor("out", output=True)
_VALID = tensor("valid", output=True)
_INDICES = optional_tensor("indices", default=None)


def _from_probs(entry: str, middle: list[Any]) -> tuple[Declaration, Declaration]:
    return _pair(entry, [tensor("probs"), _OUT], [tensor("probs"), _OUT, _VALID], [_INDICES, *middle])


SOFTMAX = declare(
    "softmax",
    [
        tensor("workspace", output=True),
        tensor("logits"),
        _OUT,
        optional_tensor("temperature", default=None),
        ("temperature_val", FLOAT),
        ("enable_pdl", BOOL),
    ],
    release="0.6.3, 0.7.2",
)
SAMPLING_FROM_PROBS = _from_probs("sampling_from_probs", [])
SAMPLING_FROM_LOGITS = _pair("sampling_from_logits", [tensor("logits"), _OUT], [tensor("logits"), _OUT], [_INDICES])
TOP_P_SAMPLING = _from_probs(
    "top_p_sampling_from_probs", [optional_tensor("top_p", default=None), ("top_p_val", FLOAT)]
)
TOP_K_SAMPLING = _from_probs("top_k_sampling_from_probs", [optional_tensor("top_k", default=None), ("top_k_val", INT)])
MIN_P_SAMPLING = _from_probs(
    "min_p_sampling_from_probs", [optional_tensor("min_p", default=None), ("min_p_val", FLOAT)]
)
# the kernel's top_k_val is a double on the wire (it is converted to the index type on the device)
TOP_K_TOP_P_SAMPLING = _from_probs(
    "top_k_top_p_sampling_from_probs",
    [
        optional_tensor("top_k", default=None),
        ("top_k_val", FLOAT),
        optional_tensor("top_p", default=None),
        ("top_p_val", FLOAT),
    ],
)
_RENORM_HEAD = [tensor("probs"), _OUT]
TOP_P_RENORM = (
    declare(
        "top_p_renorm_probs",
        [*_RENORM_HEAD, optional_tensor("top_p", default=None), ("top_p_val", FLOAT)],
        release="0.6.3",
    ),
    declare(
        "top_p_renorm_probs",
        [
            *_RENORM_HEAD,
            optional_tensor("top_p", default=None),
            ("top_p_val", FLOAT),
            scalar("is_deterministic", BOOL, False),
            tensor("workspace", output=True),
        ],
        release="0.7.2",
    ),
)
TOP_K_RENORM = (
    declare(
        "top_k_renorm_probs",
        [
            *_RENORM_HEAD,
            optional_tensor("top_k", default=None),
            ("top_k_val", INT),
            tensor("row_states_buffer", output=True),
        ],
        release="0.6.3",
    ),
    declare(
        "top_k_renorm_probs",
        [
            *_RENORM_HEAD,
            optional_tensor("top_k", default=None),
            ("top_k_val", INT),
            scalar("is_deterministic", BOOL, False),
            tensor("row_states_buffer", output=True),
        ],
        release="0.7.2",
    ),
)
TOP_K_MASK_LOGITS = declare(
    "top_k_mask_logits",
    [
        tensor("logits"),
        _OUT,
        optional_tensor("top_k", default=None),
        ("top_k_val", INT),
        tensor("row_states_buffer", output=True),
    ],
    release="0.6.3, 0.7.2",
)
_SPEC = [
    *tensors("draft_probs", "draft_token_ids", "target_probs"),
    *tensors("out", "maybe_output_accepted_token_num", "maybe_output_emitted_draft_token_num", output=True),
]
CHAIN_SPECULATIVE_SAMPLING = _pair("chain_speculative_sampling", _SPEC, _SPEC, [])

_PAIRS = (
    SAMPLING_FROM_PROBS,
    SAMPLING_FROM_LOGITS,
    TOP_P_SAMPLING,
    TOP_K_SAMPLING,
    MIN_P_SAMPLING,
    TOP_K_TOP_P_SAMPLING,
    TOP_P_RENORM,
    TOP_K_RENORM,
    CHAIN_SPECULATIVE_SAMPLING,
)
# (module URI pattern, declaration) of both releases; tests/launch/test_declarations.py checks each declaration against
# the sampling module of every release its ``release`` names.
DECLARATIONS = tuple((_URI, d) for d in (SOFTMAX, TOP_K_MASK_LOGITS, *(d for p in _PAIRS for d in p)))

__all__ = ["ROW_STATES_BYTES"]  # public here, not an op of fi_ffi; the ops (and sampling_release): @op below


# ---- sizes of the caller's buffers ------------------------------------------------------------------------------


@op()
def softmax_workspace_size(batch_size: int, vocab_size: int) -> int:
    """Bytes of ``workspace`` :func:`softmax` needs: ``8 * batch_size * ceil(vocab_size / 8192)`` when
    ``batch_size <= 128`` and ``vocab_size >= 24576`` (the vocabulary-split path keeps a (max, denominator)
    float pair per 8192-token slice), else 0. flashinfer-python passes 1 MiB, enough for every shape.

    Raises:
        TypeError: an argument not an int.
        ValueError: ``batch_size`` or ``vocab_size`` negative.
    """
    batch_size, vocab_size = _size("batch_size", batch_size), _size("vocab_size", vocab_size)
    if batch_size <= 128 and vocab_size >= 24576:
        return 8 * batch_size * -(-vocab_size // 8192)
    return 0


def _size(name: str, value: Any) -> int:
    """A row or vocabulary count: an int in ``[0, 2**31)`` (the kernels take them as int32)."""
    value = checks.integer(name, value, 0)
    if value >= 1 << 31:
        raise ValueError(f"{name}: expected an int in [0, 2**31) (the kernels' int32 sizes), got {value}")
    return value


@op()
def top_p_renorm_workspace_size(batch_size: int, vocab_size: int, is_deterministic: bool = False) -> int:
    """Bytes of ``workspace`` :func:`top_p_renorm_probs` needs on FlashInfer 0.7 modules (its radix top-p
    pass; 0.6.3 takes none): five 256-byte aligned regions per the kernel's ``GetAirTopPRenormWorkspaceSize``:
    384-byte counters, a 2048-bin histogram (8 bytes per bin when deterministic, else 4), a 2048-bin count
    histogram and two buffers of ``max(align256(vocab_size // 32), 256)`` floats, each per row.

    Raises:
        TypeError: an argument not an int (``is_deterministic``: a bool).
        ValueError: ``batch_size`` or ``vocab_size`` negative.
    """
    batch_size, vocab_size = _size("batch_size", batch_size), _size("vocab_size", vocab_size)

    def align(x: int) -> int:
        return (x + 255) // 256 * 256

    buf_len = max(align(vocab_size // 32), 256)
    hist = 8 if checks.flag("is_deterministic", is_deterministic) else 4
    return (
        align(384 * batch_size)
        + align(hist * 2048 * batch_size)
        + align(4 * 2048 * batch_size)
        + 2 * align(4 * buf_len * batch_size)
    )


@op()
def sampling_release() -> str:
    """The FlashInfer release whose sampling argument lists the pinned ``sampling`` module has (``"0.6.3"`` or
    ``"0.7.2"``): on ``"0.7.2"`` the ``*_from_probs`` ops need ``valid`` and :func:`top_p_renorm_probs` needs
    ``workspace``. Binds the module (loads it) on first use.

    Raises:
        LoaderError: the pinned wheels hold no ``sampling`` module (or it cannot be loaded).
    """
    launch: Any = launcher(SAMPLING_FROM_PROBS, _URI, _check_from_probs)
    return launch.launcher.decl.release  # type: ignore[no-any-return]


# ---- contracts --------------------------------------------------------------------------------------------------


def _matrix(name: str, t: Any, dtypes: tuple[DType, ...]) -> tuple[int, int]:
    checks.device_tensor(name, t, 2, "[R, V]", dtypes)
    return t.shape  # type: ignore[no-any-return]


def _like(name: str, t: Any, ref_name: str, ref: Any, dtypes: tuple[DType, ...] | None = None) -> None:
    """``t`` is a contiguous CUDA tensor on ``ref``'s device (and of ``ref``'s dtype unless ``dtypes``)."""
    if dtypes is None:
        checks.same_dtype(name, t, ref_name, ref)
    else:
        checks.dtype_in(name, t, dtypes)
    checks.cuda(name, t)
    checks.same_device(name, t, ref_name, ref)
    checks.contiguous(name, t)


def _vector(
    name: str, t: Any, n: int, what: str, ref_name: str, ref: Any, dtypes: tuple[DType, ...] | None = None
) -> None:
    checks.ndim(name, t, 1, f"[{what}]")
    checks.shape(name, t, (n,), what)
    _like(name, t, ref_name, ref, dtypes)


def _scratch(name: str, t: Any, ref_name: str, ref: Any, nbytes: int, formula: str) -> None:
    checks.ndim(name, t, 1, "[bytes]")
    checks.cuda(name, t)
    checks.same_device(name, t, ref_name, ref)
    checks.contiguous(name, t)
    if t.nbytes < nbytes:
        raise ValueError(f"{name}: needs at least {nbytes} bytes ({formula}), got {t.nbytes}")


def _check_rng(a: SimpleNamespace, batch: int, ref_name: str, ref: Any) -> None:
    """0.7 seed/offset tensors: both or neither, int64 ``[1]`` or ``[B]``, on the reference's device."""
    seed, offset = getattr(a, "seed", None), getattr(a, "offset", None)
    if (seed is None) != (offset is None):
        raise TypeError("seed, offset: pass both as device tensors or both as ints")
    for name, t in (("seed", seed), ("offset", offset)):
        if t is None:
            continue
        checks.ndim(name, t, 1, "[1] or [B]")
        if t.shape[0] not in (1, batch):
            raise ValueError(
                f"{name}: expected shape (1,) or ({batch},) (one value, or one per output row), got {t.shape}"
            )
        _like(name, t, ref_name, ref, (int64,))


def _param_array(
    a: SimpleNamespace, name: str, rows: int, batch: int, ref_name: str, ref: Any, dtype: DType, by_output_row: bool
) -> None:
    t = getattr(a, name)
    if t is None:
        return
    _vector(name, t, rows, "R", ref_name, ref, (dtype,))
    if by_output_row and a.indices is not None and batch != rows:
        # 0.6.3's top-k and min-p kernels read the array at the output row, not at indices[b]
        raise ValueError(
            f"{name}: a per-row {name} with indices needs as many output rows as {ref_name} rows "
            f"(got {batch} and {rows}); expand {name} to the output rows and drop indices"
        )


_RNG = ("seed", "offset")  # 0.7 device seed/offset tensors (absent from 0.6.3 declarations: no rule applies)


def _sampling_check(
    source: str, arrays: tuple[tuple[str, str, bool], ...] = ()
) -> Callable[[SimpleNamespace], PointerRules]:
    """The contract of a sampling op reading ``source`` (``probs``/``logits``), with per-row ``arrays``
    ``(name, "float32" | "out", indexed by output row)``."""

    def check(a: SimpleNamespace) -> PointerRules:
        src = getattr(a, source)
        rows, _ = _matrix(source, src, (float32,))
        out = a.out
        checks.ndim("out", out, 1, "[B]")
        _like("out", out, source, src, (int32, int64))
        batch = out.shape[0]
        if a.indices is None:
            if batch != rows:
                raise ValueError(
                    f"out: expected shape ({rows},) (one sample per {source} row; pass indices to "
                    f"sample other rows), got {out.shape}"
                )
        else:
            _vector("indices", a.indices, batch, "B", "out", out)
        if getattr(a, "valid", None) is not None:
            _vector("valid", a.valid, batch, "B", source, src, (bool_,))
        for name, kind, by_row in arrays:
            _param_array(a, name, rows, batch, source, src, float32 if kind == "float32" else out.dtype, by_row)
        _check_rng(a, batch, source, src)
        # 0.7's `valid` is written (one flag per output row), like `out`
        inputs = _present(a, (source, "indices", *(name for name, _, _ in arrays), *_RNG))
        return PointerRules({source: checks.row_vector_bytes(src)}).outputs_apart(_present(a, ("out", "valid")), inputs)

    check.__qualname__ = f"check_sampling_{source}_{'_'.join(n for n, _, _ in arrays)}"
    return check


_check_from_probs = _sampling_check("probs")
_check_from_logits = _sampling_check("logits")
_check_top_p = _sampling_check("probs", (("top_p", "float32", False),))
_check_top_k = _sampling_check("probs", (("top_k", "out", True),))
_check_min_p = _sampling_check("probs", (("min_p", "float32", True),))
_check_top_k_top_p = _sampling_check("probs", (("top_k", "out", False), ("top_p", "float32", False)))


def _present(a: SimpleNamespace, names: tuple[str, ...]) -> tuple[str, ...]:
    """The parameters among ``names`` that the bound declaration has (0.6.3 and 0.7 declarations differ)."""
    return tuple(name for name in names if hasattr(a, name))


def _check_softmax(a: SimpleNamespace) -> PointerRules:
    rows, vocab = _matrix("logits", a.logits, (float32,))
    checks.shape("out", a.out, a.logits.shape, "[R, V]")
    _like("out", a.out, "logits", a.logits)
    if a.temperature is not None:
        _vector("temperature", a.temperature, rows, "R", "logits", a.logits, (float32,))
    need = softmax_workspace_size(rows, vocab)
    _scratch("workspace", a.workspace, "logits", a.logits, need, f"softmax_workspace_size({rows}, {vocab})")
    rules = PointerRules({"logits": checks.row_vector_bytes(a.logits), "out": checks.row_vector_bytes(a.out)})
    # the workspace holds 8-byte per-row partial results; the kernel reads logits in several passes
    return rules.align("workspace", 8).outputs_apart(("out", "workspace"), ("logits", "temperature"))


def _renorm_check(source: str, dtypes: tuple[DType, ...], param: str) -> Callable[[SimpleNamespace], PointerRules]:
    def check(a: SimpleNamespace) -> PointerRules:
        src = getattr(a, source)
        rows, vocab = _matrix(source, src, dtypes)
        checks.shape("out", a.out, src.shape, "[R, V]")
        _like("out", a.out, source, src)
        arr = getattr(a, param)
        if arr is not None:
            _vector(param, arr, rows, "R", source, src, (float32,) if param == "top_p" else (int32,))
        if getattr(a, "workspace", None) is not None:
            need = top_p_renorm_workspace_size(rows, vocab, a.is_deterministic)
            _scratch(
                "workspace",
                a.workspace,
                source,
                src,
                need,
                f"top_p_renorm_workspace_size({rows}, {vocab}, is_deterministic={a.is_deterministic})",
            )
        rules = PointerRules({source: checks.row_vector_bytes(src), "out": checks.row_vector_bytes(a.out)})
        if hasattr(a, "row_states_buffer"):
            _scratch("row_states_buffer", a.row_states_buffer, source, src, ROW_STATES_BYTES, "ROW_STATES_BYTES")
            rules.align("row_states_buffer", ROW_STATE_ALIGNMENT)
        # the kernels read the row in several passes before they write it: the outputs and scratch are apart
        scratch = _present(a, ("workspace", "row_states_buffer"))
        return rules.outputs_apart(("out", *scratch), (source, param))

    check.__qualname__ = f"check_renorm_{source}_{param}"
    return check


_check_top_p_renorm = _renorm_check("probs", (float32,), "top_p")
_check_top_k_renorm = _renorm_check("probs", (float32, float16, bfloat16), "top_k")
_check_top_k_mask = _renorm_check("logits", (float32, float16, bfloat16), "top_k")


def _check_speculative(a: SimpleNamespace) -> PointerRules:
    draft, target = a.draft_probs, a.target_probs
    checks.device_tensor("draft_probs", draft, 3, "[B, N, V]", (float32,))
    b, n, v = draft.shape
    checks.ndim("draft_token_ids", a.draft_token_ids, 2, "[B, N]")
    checks.shape("draft_token_ids", a.draft_token_ids, (b, n), "[B, N]")
    _like("draft_token_ids", a.draft_token_ids, "draft_probs", draft, (int32,))
    checks.ndim("target_probs", target, 3, "[B, N + 1, V]")
    checks.shape("target_probs", target, (b, n + 1, v), "[B, N + 1, V]")
    _like("target_probs", target, "draft_probs", draft)
    checks.ndim("out", a.out, 2, "[B, N + 1]")
    checks.shape("out", a.out, (b, n + 1), "[B, N + 1]")
    _like("out", a.out, "draft_probs", draft, (int32,))
    for name in ("maybe_output_accepted_token_num", "maybe_output_emitted_draft_token_num"):
        _vector(name, getattr(a, name), b, "B", "draft_probs", draft, (int32,))
    _check_rng(a, b, "draft_probs", draft)
    rules = PointerRules(
        {"draft_probs": checks.row_vector_bytes(draft), "target_probs": checks.row_vector_bytes(target)}
    )
    outputs = ("out", "maybe_output_accepted_token_num", "maybe_output_emitted_draft_token_num")
    return rules.outputs_apart(outputs, ("draft_probs", "draft_token_ids", "target_probs", *_present(a, _RNG)))


# ---- argument mapping -------------------------------------------------------------------------------------------


def _split(name: str, value: Any, kind: type) -> tuple[Any, Any]:
    """A per-row parameter: ``(tensor, 0)`` for a tensor, ``(None, number)`` for a Python number."""
    if isinstance(value, bool) or value is None:
        article = "an" if kind is int else "a"
        raise TypeError(f"{name}: expected {article} {kind.__name__} or a tensor, got {type(value).__name__}")
    if isinstance(value, (int, float)):
        if kind is int and not isinstance(value, int):
            raise TypeError(f"{name}: expected an int or a tensor, got float")
        return None, value
    return value, kind(0)


def _unit(name: str, value: float, low_open: bool) -> float:
    """``value`` in ``(0, 1]`` (``low_open``) or ``[0, 1]``."""
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name}: expected a value in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return float(value)


def _top_k(value: int) -> int:
    if not 1 <= value < _I64 >> 32:
        raise ValueError(f"top_k: expected an int in [1, 2**31), got {value}")
    return value


def _rows(name: str, value: Any, dim: int = 0) -> int:
    """Extent ``dim`` of ``value`` (0 when it has none: the launcher's checks then name the problem)."""
    try:
        return int(value.shape[dim])
    except Exception:
        try:
            from ..tensor.intake import as_tensor

            return int(as_tensor(value, name=name).shape[dim])
        except Exception:
            return 0


def _signed(value: int) -> int:
    return value - _U64 if value >= _I64 else value


def _u64(name: str, value: Any) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(
            f"{name}: expected an int (or, on FlashInfer >= 0.7, an int64 CUDA tensor), got {type(value).__name__}"
        )
    out = int(value.__index__())
    if not 0 <= out < _U64:
        raise ValueError(f"{name}: expected an int in [0, 2**64), got {out}")
    return out


def _sample(
    launch: Callable[..., Any],
    increment: Callable[[], int],
    generator: Generator | None,
    seed: Any,
    offset: Any,
    kwargs: dict[str, Any],
) -> None:
    """Launch with the random state: ``seed``/``offset`` as given, else drawn from ``generator`` (or the
    default one), whose offset advances only once the call was launched (a refused call draws nothing)."""
    if seed is None and offset is None:
        gen = default_generator() if generator is None else generator
        if not isinstance(gen, Generator):
            raise TypeError(f"generator: expected a fi_ffi.Generator, got {type(gen).__name__}")
        draw(gen, increment(), lambda s, o: launch(**kwargs, seed_val=_signed(s), offset_val=_signed(o)))
        return
    if generator is not None:
        raise TypeError("generator: pass either generator= or seed= and offset=, not both")
    if seed is None or offset is None:
        raise TypeError(
            f"{'seed' if seed is None else 'offset'}: seed and offset go together; pass both (or a generator)"
        )
    seed_int = isinstance(seed, int) and not isinstance(seed, bool)
    if seed_int != (isinstance(offset, int) and not isinstance(offset, bool)):
        raise TypeError("seed, offset: pass both as ints or both as int64 CUDA tensors")
    if seed_int:
        launch(**kwargs, seed_val=_signed(_u64("seed", seed)), offset_val=_signed(_u64("offset", offset)))
    else:
        launch(**kwargs, seed=seed, offset=offset, seed_val=0, offset_val=0)


# ---- ops ------------------------------------------------------------------------------------------------------------


@op(flashinfer="flashinfer.sampling.softmax")
def softmax(
    logits: TensorLike,
    temperature: float | TensorLike | None = None,
    enable_pdl: bool | None = False,
    *,
    out: TensorT,
    workspace: TensorLike,
    stream: StreamLike = None,
) -> TensorT:
    """Softmax of each row with temperature: ``out[r] = softmax(logits[r] / temperature[r])`` (online, fp32).

    Args:
        logits: ``[R, V]`` float32, contiguous, CUDA.
        out: ``[R, V]`` float32, written (the caller allocates it).
        workspace: a 1-D CUDA buffer of at least :func:`softmax_workspace_size` ``(R, V)`` bytes (8-byte
            aligned); 1 MiB fits every shape. Scratch, overwritten.
        temperature: None (1.0), a number > 0, or a ``[R]`` float32 tensor.
        enable_pdl: launch with programmatic dependent launch (SM90+); None: where the device supports it.

    Returns:
        ``out``.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed
            (``logits`` / ``out`` float32, ``workspace`` uint8); ``temperature`` neither a number nor a tensor;
            ``enable_pdl`` not a bool.
        ValueError: a shape that does not fit ``[R, V]``, a ``workspace`` smaller than :func:`softmax_workspace_size` or
            not 1-D, a ``temperature`` not finite and > 0, a tensor not contiguous or not on ``logits``'s CUDA device,
            ``out`` overlapping an input.
    """
    if temperature is None:
        temperature = 1.0
    arr, val = _split("temperature", temperature, float)
    if arr is None:
        val = checks.positive_finite("temperature", val)
    launcher(SOFTMAX, _URI, _check_softmax)(
        workspace=workspace,
        logits=logits,
        out=out,
        temperature=arr,
        temperature_val=float(val),
        enable_pdl=enable_pdl,
        stream=stream,
    )
    return out


@op(flashinfer="flashinfer.sampling.sampling_from_probs")
def sampling_from_probs(
    probs: TensorLike,
    indices: TensorLike | None = None,
    deterministic: bool = True,
    generator: Generator | None = None,
    *,
    out: TensorT,
    valid: TensorLike | None = None,
    seed: int | TensorLike | None = None,
    offset: int | TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Draw ``out[b] ~ Categorical(probs[indices[b]])`` (``probs`` need not be normalized: it samples in
    proportion). Generator advance: ``B``.

    Args:
        probs: ``[R, V]`` float32.
        out: ``[B]`` int32/int64, written.
        indices: optional ``[B]`` row map, ``out``'s dtype.
        valid: ``[B]`` bool, written: False where no token had positive probability. FlashInfer >= 0.7
            modules require it; 0.6.3 modules have none (pass None).
        deterministic: deterministic block scan.
        generator, seed, offset: the random state (module docstring).

    Returns:
        ``out``.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            parameter neither a number nor a tensor; ``generator`` not a :class:`~fi_ffi.Generator`, or passed with
            ``seed`` / ``offset``, or only one of those two; an argument FlashInfer 0.7 alone has on a 0.6.3 module.
        ValueError: a shape that does not fit the others, a parameter out of range (``top_p`` in (0, 1], ``top_k`` >= 1,
            ``min_p`` in [0, 1]), a tensor not contiguous or not on the first argument's CUDA device, a scratch buffer
            too small, an output overlapping an input.
    """
    launch = launcher(SAMPLING_FROM_PROBS, _URI, _check_from_probs, defer=True)
    _sample(
        launch,
        lambda: _rows("out", out),
        generator,
        seed,
        offset,
        dict(probs=probs, out=out, valid=valid, indices=indices, deterministic=deterministic, stream=stream),
    )
    return out


@op(flashinfer="flashinfer.sampling.sampling_from_logits")
def sampling_from_logits(
    logits: TensorLike,
    indices: TensorLike | None = None,
    deterministic: bool = True,
    generator: Generator | None = None,
    *,
    out: TensorT,
    seed: int | TensorLike | None = None,
    offset: int | TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Draw ``out[b] ~ Categorical(softmax(logits[indices[b]]))`` (Gumbel-max, no softmax pass). Generator
    advance: ``B * V``. Shapes as :func:`sampling_from_probs` with ``logits`` ``[R, V]`` float32.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            parameter neither a number nor a tensor; ``generator`` not a :class:`~fi_ffi.Generator`, or passed with
            ``seed`` / ``offset``, or only one of those two; an argument FlashInfer 0.7 alone has on a 0.6.3 module.
        ValueError: a shape that does not fit the others, a parameter out of range (``top_p`` in (0, 1], ``top_k`` >= 1,
            ``min_p`` in [0, 1]), a tensor not contiguous or not on the first argument's CUDA device, a scratch buffer
            too small, an output overlapping an input.
    """
    launch = launcher(SAMPLING_FROM_LOGITS, _URI, _check_from_logits, defer=True)
    _sample(
        launch,
        lambda: _rows("out", out) * _rows("logits", logits, 1),
        generator,
        seed,
        offset,
        dict(logits=logits, out=out, indices=indices, deterministic=deterministic, stream=stream),
    )
    return out


@op(flashinfer="flashinfer.sampling.top_p_sampling_from_probs")
def top_p_sampling_from_probs(
    probs: TensorLike,
    top_p: float | TensorLike,
    indices: TensorLike | None = None,
    deterministic: bool = True,
    generator: Generator | None = None,
    *,
    out: TensorT,
    valid: TensorLike | None = None,
    seed: int | TensorLike | None = None,
    offset: int | TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose mass reaches ``top_p``,
    renormalized. ``top_p``: a number in ``(0, 1]`` or a ``[R]`` float32 tensor. Generator advance: ``B * 32``.
    Other arguments as :func:`sampling_from_probs`.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            parameter neither a number nor a tensor; ``generator`` not a :class:`~fi_ffi.Generator`, or passed with
            ``seed`` / ``offset``, or only one of those two; an argument FlashInfer 0.7 alone has on a 0.6.3 module.
        ValueError: a shape that does not fit the others, a parameter out of range (``top_p`` in (0, 1], ``top_k`` >= 1,
            ``min_p`` in [0, 1]), a tensor not contiguous or not on the first argument's CUDA device, a scratch buffer
            too small, an output overlapping an input.
    """
    arr, val = _split("top_p", top_p, float)
    if arr is None:
        val = _unit("top_p", val, True)
    launch = launcher(TOP_P_SAMPLING, _URI, _check_top_p, defer=True)
    _sample(
        launch,
        lambda: _rows("out", out) * 32,
        generator,
        seed,
        offset,
        dict(
            probs=probs,
            out=out,
            valid=valid,
            indices=indices,
            top_p=arr,
            top_p_val=float(val),
            deterministic=deterministic,
            stream=stream,
        ),
    )
    return out


@op(flashinfer="flashinfer.sampling.top_k_sampling_from_probs")
def top_k_sampling_from_probs(
    probs: TensorLike,
    top_k: int | TensorLike,
    indices: TensorLike | None = None,
    deterministic: bool = True,
    generator: Generator | None = None,
    *,
    out: TensorT,
    valid: TensorLike | None = None,
    seed: int | TensorLike | None = None,
    offset: int | TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Top-k sampling: draw from the ``top_k`` most likely tokens, renormalized. ``top_k``: an int >= 1 or a
    ``[R]`` tensor of ``out``'s dtype (with ``indices``, 0.6.3 reads it per output row: then ``B == R``).
    Generator advance: ``B * 32``. Other arguments as :func:`sampling_from_probs`.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            parameter neither a number nor a tensor; ``generator`` not a :class:`~fi_ffi.Generator`, or passed with
            ``seed`` / ``offset``, or only one of those two; an argument FlashInfer 0.7 alone has on a 0.6.3 module.
        ValueError: a shape that does not fit the others, a parameter out of range (``top_p`` in (0, 1], ``top_k`` >= 1,
            ``min_p`` in [0, 1]), a tensor not contiguous or not on the first argument's CUDA device, a scratch buffer
            too small, an output overlapping an input.
    """
    arr, val = _split("top_k", top_k, int)
    if arr is None:
        val = _top_k(val)
    launch = launcher(TOP_K_SAMPLING, _URI, _check_top_k, defer=True)
    _sample(
        launch,
        lambda: _rows("out", out) * 32,
        generator,
        seed,
        offset,
        dict(
            probs=probs,
            out=out,
            valid=valid,
            indices=indices,
            top_k=arr,
            top_k_val=val,
            deterministic=deterministic,
            stream=stream,
        ),
    )
    return out


@op(flashinfer="flashinfer.sampling.min_p_sampling_from_probs")
def min_p_sampling_from_probs(
    probs: TensorLike,
    min_p: float | TensorLike,
    indices: TensorLike | None = None,
    deterministic: bool = True,
    generator: Generator | None = None,
    *,
    out: TensorT,
    valid: TensorLike | None = None,
    seed: int | TensorLike | None = None,
    offset: int | TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Min-p sampling: draw from the tokens with ``p >= min_p * max(p)``, renormalized. ``min_p``: a number in
    ``[0, 1]`` or a ``[R]`` float32 tensor (with ``indices``, 0.6.3 reads it per output row: then ``B == R``).
    Generator advance: ``B``. Other arguments as :func:`sampling_from_probs`.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            parameter neither a number nor a tensor; ``generator`` not a :class:`~fi_ffi.Generator`, or passed with
            ``seed`` / ``offset``, or only one of those two; an argument FlashInfer 0.7 alone has on a 0.6.3 module.
        ValueError: a shape that does not fit the others, a parameter out of range (``top_p`` in (0, 1], ``top_k`` >= 1,
            ``min_p`` in [0, 1]), a tensor not contiguous or not on the first argument's CUDA device, a scratch buffer
            too small, an output overlapping an input.
    """
    arr, val = _split("min_p", min_p, float)
    if arr is None:
        val = _unit("min_p", val, False)
    launch = launcher(MIN_P_SAMPLING, _URI, _check_min_p, defer=True)
    _sample(
        launch,
        lambda: _rows("out", out),
        generator,
        seed,
        offset,
        dict(
            probs=probs,
            out=out,
            valid=valid,
            indices=indices,
            min_p=arr,
            min_p_val=float(val),
            deterministic=deterministic,
            stream=stream,
        ),
    )
    return out


@op(flashinfer="flashinfer.sampling.top_k_top_p_sampling_from_probs")
def top_k_top_p_sampling_from_probs(
    probs: TensorLike,
    top_k: int | TensorLike,
    top_p: float | TensorLike,
    indices: TensorLike | None = None,
    *,
    out: TensorT,
    valid: TensorLike | None = None,
    deterministic: bool = True,
    generator: Generator | None = None,
    seed: int | TensorLike | None = None,
    offset: int | TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Top-k and top-p jointly, in one kernel (flashinfer-python's ``filter_apply_order="joint"``): draw from
    the tokens in both the top ``top_k`` and the ``top_p`` nucleus. For flashinfer-python's default
    ``"top_k_first"``, call :func:`top_k_renorm_probs` then :func:`top_p_sampling_from_probs`. ``top_k``: int
    or ``[R]`` tensor of ``out``'s dtype; ``top_p``: number in ``(0, 1]`` or ``[R]`` float32. Generator advance:
    ``B * 32``. Other arguments as :func:`sampling_from_probs`.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            parameter neither a number nor a tensor; ``generator`` not a :class:`~fi_ffi.Generator`, or passed with
            ``seed`` / ``offset``, or only one of those two; an argument FlashInfer 0.7 alone has on a 0.6.3 module.
        ValueError: a shape that does not fit the others, a parameter out of range (``top_p`` in (0, 1], ``top_k`` >= 1,
            ``min_p`` in [0, 1]), a tensor not contiguous or not on the first argument's CUDA device, a scratch buffer
            too small, an output overlapping an input.
    """
    k_arr, k_val = _split("top_k", top_k, int)
    if k_arr is None:
        k_val = _top_k(k_val)
    p_arr, p_val = _split("top_p", top_p, float)
    if p_arr is None:
        p_val = _unit("top_p", p_val, True)
    launch = launcher(TOP_K_TOP_P_SAMPLING, _URI, _check_top_k_top_p, defer=True)
    _sample(
        launch,
        lambda: _rows("out", out) * 32,
        generator,
        seed,
        offset,
        dict(
            probs=probs,
            out=out,
            valid=valid,
            indices=indices,
            top_k=k_arr,
            top_k_val=float(k_val),
            top_p=p_arr,
            top_p_val=float(p_val),
            deterministic=deterministic,
            stream=stream,
        ),
    )
    return out


@op(flashinfer="flashinfer.sampling.top_p_renorm_probs")
def top_p_renorm_probs(
    probs: TensorLike,
    top_p: float | TensorLike,
    *,
    out: TensorT,
    is_deterministic: bool = False,
    workspace: TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Keep the top-p nucleus of each row and renormalize it to sum 1; other entries become 0.

    Args:
        probs: ``[R, V]`` float32.
        top_p: a number in ``(0, 1]`` or a ``[R]`` float32 tensor.
        out: ``[R, V]`` float32, written.
        is_deterministic: reproducible accumulation (FlashInfer >= 0.7 only; 0.6.3 accepts False).
        workspace: FlashInfer >= 0.7 only, and required there: a 1-D CUDA buffer of at least
            :func:`top_p_renorm_workspace_size` bytes. 0.6.3 takes none (pass None).

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            parameter neither a number nor a tensor; ``generator`` not a :class:`~fi_ffi.Generator`, or passed with
            ``seed`` / ``offset``, or only one of those two; an argument FlashInfer 0.7 alone has on a 0.6.3 module.
        ValueError: a shape that does not fit the others, a parameter out of range (``top_p`` in (0, 1], ``top_k`` >= 1,
            ``min_p`` in [0, 1]), a tensor not contiguous or not on the first argument's CUDA device, a scratch buffer
            too small, an output overlapping an input.
    """
    arr, val = _split("top_p", top_p, float)
    if arr is None:
        val = _unit("top_p", val, True)
    if is_deterministic is not False and is_deterministic is not True:  # None is not "off": a bool or 0/1
        is_deterministic = checks.flag("is_deterministic", is_deterministic)
    launcher(TOP_P_RENORM, _URI, _check_top_p_renorm, defer=True)(
        probs=probs,
        out=out,
        top_p=arr,
        top_p_val=float(val),
        is_deterministic=is_deterministic,
        workspace=workspace,
        stream=stream,
    )
    return out


@op(flashinfer="flashinfer.sampling.top_k_renorm_probs")
def top_k_renorm_probs(
    probs: TensorLike,
    top_k: int | TensorLike,
    *,
    out: TensorT,
    row_states_buffer: TensorLike,
    is_deterministic: bool = False,
    stream: StreamLike = None,
) -> TensorT:
    """Keep the ``top_k`` largest entries of each row and renormalize them to sum 1; others become 0.

    Args:
        probs: ``[R, V]`` float32, float16 or bfloat16.
        top_k: an int >= 1 or a ``[R]`` int32 tensor.
        out: ``[R, V]``, ``probs``'s dtype, written.
        row_states_buffer: a 1-D CUDA buffer of at least :data:`ROW_STATES_BYTES` bytes, zero-filled before its
            first use (the kernel leaves it zeroed); one per stream.
        is_deterministic: reproducible accumulation (FlashInfer >= 0.7 only; 0.6.3 accepts False).

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            parameter neither a number nor a tensor; ``generator`` not a :class:`~fi_ffi.Generator`, or passed with
            ``seed`` / ``offset``, or only one of those two; an argument FlashInfer 0.7 alone has on a 0.6.3 module.
        ValueError: a shape that does not fit the others, a parameter out of range (``top_p`` in (0, 1], ``top_k`` >= 1,
            ``min_p`` in [0, 1]), a tensor not contiguous or not on the first argument's CUDA device, a scratch buffer
            too small, an output overlapping an input.
    """
    arr, val = _split("top_k", top_k, int)
    if arr is None:
        val = _top_k(val)
    if is_deterministic is not False and is_deterministic is not True:  # None is not "off": a bool or 0/1
        is_deterministic = checks.flag("is_deterministic", is_deterministic)
    launcher(TOP_K_RENORM, _URI, _check_top_k_renorm, defer=True)(
        probs=probs,
        out=out,
        top_k=arr,
        top_k_val=val,
        is_deterministic=is_deterministic,
        row_states_buffer=row_states_buffer,
        stream=stream,
    )
    return out


@op(flashinfer="flashinfer.sampling.top_k_mask_logits")
def top_k_mask_logits(
    logits: TensorLike,
    top_k: int | TensorLike,
    *,
    out: TensorT,
    row_states_buffer: TensorLike,
    stream: StreamLike = None,
) -> TensorT:
    """Keep the ``top_k`` largest logits of each row, set the others to ``-inf``. ``logits``/``out``:
    ``[R, V]`` float32/float16/bfloat16; ``top_k`` and ``row_states_buffer`` as :func:`top_k_renorm_probs`.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            parameter neither a number nor a tensor; ``generator`` not a :class:`~fi_ffi.Generator`, or passed with
            ``seed`` / ``offset``, or only one of those two; an argument FlashInfer 0.7 alone has on a 0.6.3 module.
        ValueError: a shape that does not fit the others, a parameter out of range (``top_p`` in (0, 1], ``top_k`` >= 1,
            ``min_p`` in [0, 1]), a tensor not contiguous or not on the first argument's CUDA device, a scratch buffer
            too small, an output overlapping an input.
    """
    arr, val = _split("top_k", top_k, int)
    if arr is None:
        val = _top_k(val)
    launcher(TOP_K_MASK_LOGITS, _URI, _check_top_k_mask)(
        logits=logits, out=out, top_k=arr, top_k_val=val, row_states_buffer=row_states_buffer, stream=stream
    )
    return out


@op(flashinfer="flashinfer.sampling.chain_speculative_sampling")
def chain_speculative_sampling(
    draft_probs: TensorLike,
    draft_token_ids: TensorLike,
    target_probs: TensorLike,
    *,
    out: TensorT,
    maybe_output_accepted_token_num: TensorLike,
    maybe_output_emitted_draft_token_num: TensorLike,
    deterministic: bool = True,
    generator: Generator | None = None,
    seed: int | TensorLike | None = None,
    offset: int | TensorLike | None = None,
    stream: StreamLike = None,
) -> TensorT:
    """Speculative sampling along a chain of ``N`` draft tokens (Leviathan et al.), per request ``b``:

    draft token ``i`` (``t = draft_token_ids[b, i]``) is accepted when ``u * draft_probs[b, i, t] <
    target_probs[b, i, t]`` (``u`` uniform in (0, 1]); at the first rejection ``j`` the token is resampled from
    ``relu(target_probs[b, j] - draft_probs[b, j])``, and if all ``N`` are accepted a bonus token is drawn
    from ``target_probs[b, N]``. ``out[b]`` gets the accepted tokens, then that token, then -1.

    Args:
        draft_probs: ``[B, N, V]`` float32.
        draft_token_ids: ``[B, N]`` int32.
        target_probs: ``[B, N + 1, V]`` float32.
        out: ``[B, N + 1]`` int32, written (flashinfer's returned ``output_token_ids``).
        maybe_output_accepted_token_num: ``[B]`` int32, **incremented** by the number of draft tokens the target
            accepts (each judged alone); zero it to count one call. Required (flashinfer allocates it if None).
        maybe_output_emitted_draft_token_num: ``[B]`` int32, **incremented** by the number of draft tokens
            emitted (the accepted prefix). Required, likewise.
        generator, seed, offset: the random state (module docstring). Generator advance: ``B * (N + 1)``.

    Returns:
        ``out``.

    Raises:
        TypeError: a tensor argument not a tensor (or None where required), or of a dtype other than those listed; a
            parameter neither a number nor a tensor; ``generator`` not a :class:`~fi_ffi.Generator`, or passed with
            ``seed`` / ``offset``, or only one of those two; an argument FlashInfer 0.7 alone has on a 0.6.3 module.
        ValueError: a shape that does not fit the others, a parameter out of range (``top_p`` in (0, 1], ``top_k`` >= 1,
            ``min_p`` in [0, 1]), a tensor not contiguous or not on the first argument's CUDA device, a scratch buffer
            too small, an output overlapping an input.
    """
    launch = launcher(CHAIN_SPECULATIVE_SAMPLING, _URI, _check_speculative, defer=True)
    _sample(
        launch,
        lambda: _rows("draft_probs", draft_probs) * (_rows("draft_probs", draft_probs, 1) + 1),
        generator,
        seed,
        offset,
        dict(
            draft_probs=draft_probs,
            draft_token_ids=draft_token_ids,
            target_probs=target_probs,
            out=out,
            maybe_output_accepted_token_num=maybe_output_accepted_token_num,
            maybe_output_emitted_draft_token_num=maybe_output_emitted_draft_token_num,
            deterministic=deterministic,
            stream=stream,
        ),
    )
    return out

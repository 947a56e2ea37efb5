"""The slow path's checks: every argument of one call described and checked, with messages naming it.

A launch function takes this path for anything its fast path does not know (a layout not seen, an unhashable
argument, a pointer that fails a rule, an unknown producer). :func:`validate` describes each tensor argument
(:func:`fi_ffi.tensor.intake.describe`), converts each scalar (:func:`fi_ffi.abi.values.to_scalar`, the one packer
of Python values), runs the op's own check on the arguments without their addresses (its verdict is remembered per
layout, so what it requires of addresses it returns as :class:`~fi_ffi.launch.pointer_rules.PointerRules`), then
the generic checks below, and returns what the layout cache keeps of the call.

Generic checks done for every tensor argument: a supported producer and dtype (as_tensor), a non-NULL pointer for
a non-empty tensor, natural alignment of the pointer (itemsize), sizes that fit the kernels' int32, a byte extent
below 2**63 that does not wrap the address space, all CUDA tensors on one device, and outputs whose elements do not
overlap (no stride-0 or interleaved rows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, NamedTuple

from ..abi import wire
from ..abi.objects import ARRAY, ObjectRef
from ..abi.values import INT64_END, to_scalar
from ..tensor import intake
from ..tensor.descriptor import Tensor
from ..tensor.streams import stream_handle
from .images import ABSENT, HIGH, INT32_END, PTR_END
from .pointer_rules import HIDDEN_ADDRESS, ApartTest, PointerRules, apart_test, compile_apart, enforce, without_address

# An op's contract: given the call's arguments without their addresses (and ``context``), raise on a bad layout or
# scalar, and return what the data pointers must satisfy (a mapping is alignments in bytes by parameter name).
Check = Callable[[SimpleNamespace], PointerRules | Mapping[str, int] | None]


class Validated(NamedTuple):
    """What the slow path learnt of one call that passed every check."""

    checked: dict[str, Any]  # parameter name -> Tensor (None: absent) or converted scalar / plan info
    ptrs: list[int]  # per DLTensor record: the data pointer as an int64 word (ABSENT for an absent tensor)
    masks: tuple[int, ...]  # per tensor parameter: alignment - 1 | high bits (0 for an absent tensor)
    union: int  # the union of ``masks``
    empty_ok: tuple[bool, ...]  # per tensor parameter: validated empty, so its pointer may be NULL
    device_id: int  # the CUDA ordinal of the call's tensors (0 when none is on a CUDA device)
    stream_source: intake.StreamSource | None  # the default stream's source (None: TVM-FFI's current one)
    apart: ApartTest | None  # the overlap test of the pointers (None: no rule to test)


def validate(
    name: str,
    decl: wire.Declaration,
    check: Check | None,
    pointer_position: Mapping[str, int],
    values: Sequence[Any],
    stream: Any,
    context: Any,
) -> Validated:
    """Describe and check every argument of one call of ``decl`` (``values`` in wire order) on ``stream``.

    ``name``: the launcher's name for messages; ``check``: the op's contract; ``pointer_position``: tensor
    parameter name -> its position among the pointers each call tests.

    Raises:
        TypeError / ValueError (fi_ffi's own subclasses for scalars): naming the argument and the fix.
    """
    if len(values) != len(decl.params):
        raise TypeError(f"{name}: expected {len(decl.params)} arguments, got {len(values)}")
    checked, ptrs, first_cuda = describe_arguments(decl, values, stream)
    tensors = {n: t for n, t in checked.items() if isinstance(t, Tensor)}
    rules = PointerRules({n: t.dtype.itemsize for n, t in tensors.items()})
    if check is not None:  # the op's contract first: it names arguments in the op's own order
        rules.update(check(check_view(decl, checked, context)))
        known_rules(name, rules, pointer_position)
    devices = one_device(decl, checked)
    enforce(rules, tensors)
    if stream is not None:
        stream_of(stream)  # a bad stream is refused before anything is bound or launched
    pointer_names = [n for n, _ in sorted(pointer_position.items(), key=lambda item: item[1])]
    masks = tuple(0 if checked[n] is None else (rules.alignment.get(n, 1) - 1) | HIGH for n in pointer_names)
    # the fast path first tests every pointer against the union of the masks (one test for the common case:
    # all pointers aligned for the strictest tensor); only when that fails are the per-tensor masks asked
    union = 0
    for mask in masks:
        union |= mask
    # per pointer: may it be NULL on the fast path (an empty tensor: the kernel reads nothing)
    empty_ok = tuple(checked[n] is not None and checked[n].numel == 0 for n in pointer_names)
    # the overlap rules of this layout combination, as integers the fast path tests (None: nothing to test)
    compiled = compile_apart(rules, tensors, pointer_position)
    apart = None if compiled is None else apart_test(compiled, len(pointer_position))
    source = None if first_cuda is None else intake.stream_source(first_cuda)
    return Validated(checked, ptrs, masks, union, empty_ok, devices[0] if devices else 0, source, apart)


def describe_arguments(
    decl: wire.Declaration, values: Sequence[Any], stream: Any
) -> tuple[dict[str, Any], list[int], Any]:
    """Each argument described (tensors) or converted (scalars): ``(checked, ptrs, first_cuda)``, where ``ptrs``
    holds the DLTensor records' data pointers and ``first_cuda`` is the argument whose framework's current stream
    is the call's default one (None: TVM-FFI's current stream)."""
    checked: dict[str, Any] = {}
    ptrs: list[int] = []
    first_cuda = None
    for p, value in zip(decl.params, values, strict=True):
        name, kind = p.name, p.wire
        if kind in wire.TENSOR_TYPES or kind in wire.OBJECT_TENSOR_TYPES:
            if value is None:
                if kind not in wire.OPTIONAL_TYPES:
                    raise TypeError(f"{name}: expected a tensor, got None")
                checked[name] = None
                if kind in wire.TENSOR_TYPES:
                    ptrs.append(ABSENT)
                continue
            t = intake.describe(value, name, stream)
            check_tensor(name, t, output=p.output)
            checked[name] = t
            if kind in wire.TENSOR_TYPES:
                ptr = t.data_ptr
                ptrs.append(ptr if ptr < INT64_END else ptr - PTR_END)  # int64 words: two's complement
            # the default stream follows the first CUDA tensor that comes from a framework with a current
            # stream (torch, CuPy): for a batch run that is q, not the workspace's descriptors
            if (
                first_cuda is None
                and t.device.is_cuda
                and kind in wire.TENSOR_TYPES
                and intake.stream_source(value) is not None
            ):
                first_cuda = value
        elif kind == wire.ARRAY:
            checked[name] = plan_info(name, value)
        elif value is None and name == PDL and kind == wire.BOOL:
            checked[name] = None  # flashinfer's "ask the device": resolved below, once the tensors' device is known
        else:
            checked[name] = to_scalar(name, kind, value)
    if checked.get(PDL, False) is None:
        checked[PDL] = pdl_default(checked)
    return checked, ptrs, first_cuda


PDL = "enable_pdl"
"""flashinfer's name of the programmatic-dependent-launch flag; ``None`` there means "ask the device"."""


def pdl_default(checked: Mapping[str, Any]) -> bool:
    """flashinfer's ``enable_pdl=None``: programmatic dependent launch where the device of the call's first CUDA
    tensor supports it (SM 9.0 and later: Hopper, Blackwell). Read once per device (:mod:`fi_ffi.cuda.device`),
    and once per layout at all: the launchers key ``None`` with the tensors' devices. A device that cannot be asked
    (no GPU: the kernel then stops at its own device check) gets False."""
    from ..cuda import device
    from ..errors import CudaError, UnsupportedDeviceError

    cuda = next((t.device.device_id for t in checked.values() if isinstance(t, Tensor) and t.device.is_cuda), None)
    if cuda is None:
        return False
    try:
        return device.compute_capability(cuda)[0] >= 9
    except (UnsupportedDeviceError, CudaError):
        return False


def check_view(decl: wire.Declaration, checked: Mapping[str, Any], context: Any) -> SimpleNamespace:
    """The arguments as the op's check sees them: what the layout key covers, nothing else (tensors without
    their addresses, per-call scalars and plan infos hidden), so the check's verdict may be cached."""
    view = {}
    for p in decl.params:
        value = checked[p.name]
        if isinstance(value, Tensor):
            value = without_address(value)
        elif p.per_call or p.wire == wire.ARRAY:
            value = HIDDEN_ADDRESS
        view[p.name] = value
    return SimpleNamespace(**view, context=context)


def known_rules(name: str, rules: PointerRules, pointer_position: Mapping[str, int]) -> None:
    """Every name in ``rules`` is a tensor parameter (a misspelt name would silently test nothing)."""
    names = [*rules.alignment, *(n for pair in rules.apart for n in pair[:2])]
    for each in names:
        if each not in pointer_position:
            raise TypeError(f"{name}: the op's check states a pointer rule for {each!r}, not a tensor parameter")


def plan_info(name: str, value: Any) -> Any:
    """``value`` if it is a live plan info (an ``Array`` a plan call returned), else the error naming ``name``."""
    if not isinstance(value, ObjectRef) or value.type_index != ARRAY:
        raise TypeError(f"{name}: expected the plan info (an Array from a plan call), got {type(value).__name__}")
    if not value.handle:
        raise ValueError(f"{name}: the plan has been released")
    return value


def stream_of(stream: Any) -> int:
    """The handle of a stream argument (not None), or the error naming ``stream``."""
    handle = stream_handle(stream)
    assert handle is not None
    return handle


# ---- checks shared by every op -------------------------------------------------------------------------------


def check_tensor(name: str, t: Tensor, *, output: bool = False) -> None:
    """The generic contract of a tensor argument (see the module docstring)."""
    numel = 1
    extent = 1  # elements spanned, first to last, plus one
    for size, stride in zip(t.shape, t.strides, strict=True):
        if size >= INT32_END:
            raise ValueError(f"{name}: size {size} in shape {t.shape} does not fit the kernels' int32 sizes")
        numel *= size
        if size:
            extent += (size - 1) * stride
    if not numel:
        return
    if not t.data_ptr:
        raise ValueError(f"{name}: data pointer is NULL")
    span = extent * t.dtype.itemsize
    if span >= INT64_END:
        raise ValueError(
            f"{name}: the tensor spans {span} bytes (shape {t.shape}, strides {t.strides}); at most "
            f"2**63 - 1 are supported"
        )
    if t.data_ptr + span > PTR_END:
        raise ValueError(
            f"{name}: the memory range 0x{t.data_ptr:x} + {span} bytes wraps past the end of the address space"
        )
    if output and not no_overlap(t.shape, t.strides):
        raise ValueError(
            f"{name}: an output's elements must not overlap (shape {t.shape}, strides {t.strides}: "
            f"stride-0 or interleaved rows would be written by several threads)"
        )


def no_overlap(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """A sufficient test that distinct indices map to distinct elements: sorted by stride, each stride is at
    least the extent of the dimensions inside it."""
    dims = sorted((stride, size) for size, stride in zip(shape, strides, strict=True) if size > 1)
    inner = 1
    for stride, size in dims:
        if stride < inner:
            return False
        inner = stride * (size - 1) + inner
    return True


def one_device(decl: wire.Declaration, checked: Mapping[str, Any]) -> list[int]:
    """CUDA ordinals of the tensor arguments: all equal, else a ValueError naming the odd one.

    The reference is the first CUDA *input* (outputs follow their inputs), so the message names the tensor
    that disagrees with what the kernel reads.
    """
    tensors = [
        (p.name, checked[p.name], p.output)
        for p in decl.params
        if isinstance(checked.get(p.name), Tensor) and checked[p.name].device.is_cuda
    ]
    if not tensors:
        return []
    ref_name, ref, _ = next((t for t in tensors if not t[2]), tensors[0])
    for pname, t, _ in tensors:
        if t.device.device_id != ref.device.device_id:
            raise ValueError(
                f"{pname}: expected a tensor on cuda:{ref.device.device_id} (same as {ref_name}), got one on {t.device}"
            )
    return [ref.device.device_id]


__all__ = [
    "Check",
    "Validated",
    "check_tensor",
    "check_view",
    "describe_arguments",
    "known_rules",
    "no_overlap",
    "one_device",
    "plan_info",
    "stream_of",
    "validate",
]

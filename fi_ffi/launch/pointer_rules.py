"""What an op requires of its data pointers: stated as data by its check, tested by the launcher on every call.

The launcher remembers an op's verdict under the call's *layout* key (shapes, strides, dtypes, devices,
scalars), so an op's check may only decide what that key covers. Its tensors reach it without their addresses
(reading ``data_ptr`` there is a programming error, raised as such). What depends on an address is returned
instead, as a :class:`PointerRules`:

- ``align(name, nbytes)``: the data pointer is a multiple of ``nbytes`` (every tensor is at least naturally
  aligned for its dtype; vector loads ask for more, TMA loads for 16 bytes);
- ``disjoint(out, other)``: ``out`` shares no byte with ``other`` (the kernel reads ``other`` while it writes
  ``out``);
- ``same_or_disjoint(out, inp)``: ``out`` *is* ``inp`` (the in-place form: same address, shape and strides) or
  shares no byte with it.

NULL for a non-empty tensor, and an address range that wraps, are refused for every tensor without a rule.

The launcher compiles the rules of each layout once (:func:`compile_apart`: byte offsets of each tensor's
footprint, and the row geometry that makes views of one buffer exact) and tests the pointers of every call
against them; a call that fails the test goes to the slow path, which raises the error naming the arguments
(:func:`enforce`). The test of one layout combination is a small function generated from its compiled rules
(:func:`apart_test`: the offsets are constants in its code, so a warm call pays one call and one or two
comparisons per rule); :func:`apart_ok` is the same test read from the compiled tuple (the reference the generated
one is tested against).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..tensor.descriptor import Tensor, relocated
from . import aliasing

__all__ = [
    "HIDDEN_ADDRESS",
    "CompiledApart",
    "PointerRules",
    "apart_ok",
    "apart_test",
    "compile_apart",
    "enforce",
    "without_address",
]

# One compiled overlap rule: (index of out, index of other) in the call's pointer tuple, the byte offsets of their
# footprints relative to their pointers (first, end), whether the in-place form is allowed (both layouts equal),
# and the row geometry for the exact test of two views of one buffer (aliasing.row_geometry) or None.
CompiledApart = tuple[tuple[int, int, int, int, int, int, bool, Any], ...]


class PointerRules:
    """Requirements on a call's data pointers (see the module docstring). Methods return ``self`` to chain.

    Attributes:
        alignment: parameter name -> required alignment of its data pointer, in bytes.
        apart: ``(output, other, in_place_allowed)`` pairs that must not overlap.
    """

    __slots__ = ("alignment", "apart")

    def __init__(self, alignment: Mapping[str, int] | None = None) -> None:
        self.alignment: dict[str, int] = {}
        self.apart: list[tuple[str, str, bool]] = []
        for name, nbytes in (alignment or {}).items():
            self.align(name, nbytes)

    def align(self, name: str, nbytes: int) -> PointerRules:
        """``name``'s data pointer must be a multiple of ``nbytes`` (a power of two)."""
        if nbytes > self.alignment.get(name, 1):
            self.alignment[name] = nbytes
        return self

    def disjoint(self, out: str, other: str) -> PointerRules:
        """``out`` must share no byte with ``other``."""
        if (out, other, False) not in self.apart and (other, out, False) not in self.apart:
            self.apart.append((out, other, False))
        return self

    def same_or_disjoint(self, out: str, inp: str) -> PointerRules:
        """``out`` must be ``inp`` itself (in place) or share no byte with it."""
        if (out, inp, True) not in self.apart:
            self.apart.append((out, inp, True))
        return self

    def outputs_apart(self, outputs: Sequence[str], inputs: Sequence[str]) -> PointerRules:
        """Every one of ``outputs`` shares no byte with any of ``inputs``, nor with another output."""
        for k, out in enumerate(outputs):
            for other in (*inputs, *outputs[k + 1 :]):
                self.disjoint(out, other)
        return self

    def update(self, other: PointerRules | Mapping[str, int] | None) -> PointerRules:
        """Add ``other``'s rules (a mapping is alignments only)."""
        if isinstance(other, PointerRules):
            for name, nbytes in other.alignment.items():
                self.align(name, nbytes)
            self.apart.extend(other.apart)
        elif other is not None:
            for name, nbytes in other.items():
                self.align(name, int(nbytes))
        return self

    def __repr__(self) -> str:
        return f"PointerRules(alignment={self.alignment}, apart={self.apart})"


def enforce(rules: PointerRules, tensors: Mapping[str, Tensor | None]) -> None:
    """Test ``rules`` against the call's real tensors; raise the error naming the argument that breaks one.

    Raises:
        ValueError: a misaligned data pointer, or a forbidden overlap (naming both tensors).
    """
    for name, nbytes in rules.alignment.items():
        t = tensors.get(name)
        if t is not None and t.data_ptr % nbytes:
            vector = "" if nbytes == t.dtype.itemsize else ", vector loads"
            raise ValueError(
                f"{name}: data pointer 0x{t.data_ptr:x} must be aligned to {nbytes} bytes ({t.dtype.name}{vector}); "
                f"pass a tensor that starts at such an address (a fresh allocation does)"
            )
    for out, other, in_place in rules.apart:
        a, b = tensors.get(out), tensors.get(other)
        if a is None or b is None:
            continue
        if in_place:
            aliasing.same_or_disjoint(out, a, other, b)
        else:
            aliasing.disjoint(out, a, other, b)


def compile_apart(
    rules: PointerRules, tensors: Mapping[str, Tensor | None], index: Mapping[str, int]
) -> CompiledApart | None:
    """The overlap rules of one layout combination as integers (None when there are none to test).

    ``index`` maps a parameter name to its position in the pointer tuple the launcher tests. Rules naming an
    absent or empty tensor are dropped: such a tensor has no bytes to share.
    """
    compiled = []
    for out, other, in_place in rules.apart:
        a, b = tensors.get(out), tensors.get(other)
        if a is None or b is None or not a.numel or not b.numel:
            continue
        lo_a, hi_a = aliasing.footprint(a)
        lo_b, hi_b = aliasing.footprint(b)
        same = in_place and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
        compiled.append((index[out], index[other], lo_a, hi_a, lo_b, hi_b, same, aliasing.row_geometry(a, b)))
    return tuple(compiled) or None


def apart_ok(compiled: CompiledApart, ptrs: Sequence[int]) -> bool:
    """True if the pointers of this call meet every compiled overlap rule (the fast path's test)."""
    for i, j, lo_a, hi_a, lo_b, hi_b, same, rows in compiled:
        a0 = ptrs[i] + lo_a
        b0 = ptrs[j] + lo_b
        if a0 < ptrs[j] + hi_b and b0 < ptrs[i] + hi_a:
            if same and ptrs[i] == ptrs[j]:
                continue  # the in-place form
            if rows is None or aliasing.rows_overlap(rows, b0 - a0):
                return False
    return True


ApartTest = Callable[..., bool]
_apart_tests: dict[tuple[int, CompiledApart], ApartTest] = {}  # generated tests by (pointer count, rules)
_MAX_APART_TESTS = 1024


def apart_test(compiled: CompiledApart, npointers: int) -> ApartTest:
    """A function ``test(p0, ..., p{npointers-1}) -> bool`` answering as :func:`apart_ok` for ``compiled``.

    Generated once per compiled rule set (remembered by value): per rule ``(i, j)``, with ``d = p_j - p_i``, the
    footprints meet iff ``lo_a - hi_b < d < hi_a - lo_b`` (both bounds constants here); the in-place form
    allows ``d == 0``; rows of one stride are then asked exactly (:func:`aliasing.rows_overlap`).
    """
    key = (npointers, compiled)
    found = _apart_tests.get(key)
    if found is not None:
        return found
    lines = [f"def test({', '.join(f'p{k}' for k in range(npointers))}):"]
    namespace: dict[str, Any] = {"_rows_overlap": aliasing.rows_overlap}
    for r, (i, j, lo_a, hi_a, lo_b, hi_b, same, rows) in enumerate(compiled):
        lines.append(f"    d = p{j} - p{i}")
        test = f"{lo_a - hi_b} < d < {hi_a - lo_b}"
        if same:
            test += " and d != 0"
        if rows is not None:
            namespace[f"_rows{r}"] = rows
            test += f" and _rows_overlap(_rows{r}, d + {lo_b - lo_a})"
        lines.append(f"    if {test}: return False")
    lines.append("    return True")
    exec(compile("\n".join(lines) + "\n", "<fi_ffi pointer rules>", "exec"), namespace)
    found = namespace["test"]
    if len(_apart_tests) >= _MAX_APART_TESTS:
        _apart_tests.clear()
    _apart_tests[key] = found
    return found  # type: ignore[no-any-return]


class _HiddenAddress:
    """The ``data_ptr`` of a tensor as an op's check sees it: the check's verdict is remembered per layout, so it
    must not depend on an address. Any use other than printing it is a programming error of the check."""

    __slots__ = ()

    def _refuse(self, *args: Any) -> Any:
        raise RuntimeError(
            "an op's check read a data pointer; its verdict is cached per layout, so address requirements must be "
            "returned as PointerRules (fi_ffi.launch.pointer_rules) and are then tested on every call"
        )

    __bool__ = __int__ = __index__ = __hash__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mod__ = __rmod__ = __and__ = __rand__ = __or__ = __ror__ = _refuse

    def __format__(self, spec: str) -> str:
        return "<address not known to the check>"

    def __repr__(self) -> str:
        return "<address not known to the check>"


HIDDEN_ADDRESS: Any = _HiddenAddress()


def without_address(t: Tensor) -> Tensor:
    """A copy of descriptor ``t`` whose ``data_ptr`` cannot be used (what an op's check is given)."""
    return relocated(t, HIDDEN_ADDRESS)

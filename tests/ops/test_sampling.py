"""Sampling ops on the CPU machine, against the real ``sampling.so`` of both FlashInfer releases' test wheels.

With no GPU, a call whose descriptors claim ``cuda:0`` passes our checks, crosses the FFI, passes the module's
signature check and stops at the module's first CUDA call: the packing matches the real signature. Every bad
argument is refused by our checks, naming it, before the kernel is called. The 0.7.2 tests lock the 0.7.2 test
wheel (``../shared/wheels-072``) alone and skip when it is absent.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import fakes
from helpers.fakes import reached
from helpers.wheels import needs_shared_wheel

import fi_ffi
from fi_ffi.errors import LoaderError
from fi_ffi.generator import Generator, round_up4
from fi_ffi.launch.launcher import bound_entry
from fi_ffi.ops import sampling as S
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only  # fake cuda:0 descriptors over host memory

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def fake_cuda(
    shape: tuple[int, ...], dtype: str = "float32", strides: tuple[int, ...] | None = None, device: object = "cuda:0"
) -> Tensor:
    """:func:`helpers.fakes.fake_cuda` with float32 as the default dtype (these ops' scores and probabilities)."""
    return fakes.fake_cuda(shape, dtype, strides, device)


R, V = 4, 64


class Args:
    """Valid arguments for every op (fresh descriptors per test)."""

    def __init__(self) -> None:
        self.probs = fake_cuda((R, V))
        self.out = fake_cuda((R,), "int32")
        self.valid = fake_cuda((R,), "bool")
        self.dense = fake_cuda((R, V))
        self.states = fake_cuda((MIB,), "uint8")
        self.ws = fake_cuda((MIB,), "uint8")
        self.draft = fake_cuda((2, 3, V))
        self.draft_ids = fake_cuda((2, 3), "int32")
        self.target = fake_cuda((2, 4, V))
        self.spec_out = fake_cuda((2, 4), "int32")
        self.accepted = fake_cuda((2,), "int32")
        self.emitted = fake_cuda((2,), "int32")

    def speculative(self, **kwargs: Any) -> Any:
        """``chain_speculative_sampling`` of these drafts and targets into these outputs, plus ``kwargs``."""
        return fi_ffi.chain_speculative_sampling(
            self.draft,
            self.draft_ids,
            self.target,
            out=self.spec_out,
            maybe_output_accepted_token_num=self.accepted,
            maybe_output_emitted_draft_token_num=self.emitted,
            **kwargs,
        )


def calls(a: Args, extra: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """One call per sampling entry point; ``extra`` (e.g. ``valid=`` on 0.7.2) goes to the ``*_from_probs`` ops."""
    g = Generator(5)
    return {
        "softmax": lambda: fi_ffi.softmax(a.probs, out=a.dense, workspace=a.ws, temperature=0.7),
        "softmax_per_row": lambda: fi_ffi.softmax(a.probs, out=a.dense, workspace=a.ws, temperature=fake_cuda((R,))),
        "sampling_from_probs": lambda: fi_ffi.sampling_from_probs(a.probs, out=a.out, generator=g, **extra),
        "sampling_from_logits": lambda: fi_ffi.sampling_from_logits(a.probs, out=a.out, generator=g),
        "top_p_sampling_from_probs": lambda: fi_ffi.top_p_sampling_from_probs(
            a.probs,
            0.9,
            out=a.out,
            generator=g,
            **extra,
        ),
        "top_k_sampling_from_probs": lambda: fi_ffi.top_k_sampling_from_probs(
            a.probs,
            fake_cuda((R,), "int32"),
            out=a.out,
            generator=g,
            **extra,
        ),
        "min_p_sampling_from_probs": lambda: fi_ffi.min_p_sampling_from_probs(
            a.probs,
            0.05,
            out=a.out,
            seed=1,
            offset=8,
            **extra,
        ),
        "top_k_top_p_sampling_from_probs": lambda: fi_ffi.top_k_top_p_sampling_from_probs(
            a.probs,
            20,
            fake_cuda((R,)),
            out=fake_cuda((R,), "int64"),
            indices=fake_cuda((R,), "int64"),
            deterministic=False,
            generator=g,
            **extra,
        ),
        "top_p_renorm_probs": lambda: fi_ffi.top_p_renorm_probs(
            a.probs,
            fake_cuda((R,)),
            out=a.dense,
            workspace=a.ws if extra else None,
        ),
        "top_k_renorm_probs": lambda: fi_ffi.top_k_renorm_probs(
            fake_cuda((R, V), "float16"),
            8,
            out=fake_cuda((R, V), "float16"),
            row_states_buffer=a.states,
        ),
        "top_k_mask_logits": lambda: fi_ffi.top_k_mask_logits(
            fake_cuda((R, V), "bfloat16"),
            fake_cuda((R,), "int32"),
            out=fake_cuda((R, V), "bfloat16"),
            row_states_buffer=a.states,
        ),
        "chain_speculative_sampling": lambda: a.speculative(generator=g),
    }


CALLS = sorted(calls(Args(), {}))


# ---- FlashInfer 0.6.3 (the session lock pins both 0.6.3 test wheels) ------------------------------------------


@pytest.mark.parametrize("name", CALLS)
def test_063_every_entry_point_reaches_the_device_check(kernel_modules: list[str], name: str) -> None:
    text = reached(calls(Args(), {})[name])
    assert f"sampling.{name.removesuffix('_per_row')}(" in text


def test_063_is_the_release_of_the_pinned_module(kernel_modules: list[str]) -> None:
    assert S.sampling_release() == "0.6.3"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"valid": "tensor"}, "valid"),
        ({"seed": "tensor", "offset": "tensor"}, "seed"),
    ],
)
def test_063_refuses_what_only_072_has_by_name(kernel_modules: list[str], kwargs: dict[str, str], name: str) -> None:
    a = Args()
    values: dict[str, Any] = {k: fake_cuda((1,), "int64") if k != "valid" else a.valid for k in kwargs}
    with pytest.raises(
        ValueError,
        match=rf"^{name}: not supported by the bound module's entry point "
        r"sampling.sampling_from_probs \(FlashInfer 0.6.3\)",
    ):
        fi_ffi.sampling_from_probs(a.probs, out=a.out, **values)


def test_063_refuses_072_renorm_options(kernel_modules: list[str]) -> None:
    a = Args()
    with pytest.raises(ValueError, match=r"^workspace: not supported .* \(FlashInfer 0.6.3\)"):
        fi_ffi.top_p_renorm_probs(a.probs, 0.9, out=a.dense, workspace=a.ws)
    with pytest.raises(ValueError, match=r"^is_deterministic: not supported .* \(FlashInfer 0.6.3\)"):
        fi_ffi.top_k_renorm_probs(a.probs, 3, out=a.dense, row_states_buffer=a.states, is_deterministic=True)
    reached(
        lambda: fi_ffi.top_k_renorm_probs(a.probs, 3, out=a.dense, row_states_buffer=a.states, is_deterministic=False)
    )


def test_a_072_declaration_is_refused_by_the_063_module(kernel_modules: list[str]) -> None:
    with pytest.raises(
        LoaderError,
        match=r"module 'sampling', entry point 'sampling_from_probs'.*declared for "
        r"FlashInfer 0.7.2.*takes 6 arguments, the declaration 9",
    ):
        bound_entry("sampling", S.SAMPLING_FROM_PROBS[1])


# ---- FlashInfer 0.7.2 ---------------------------------------------------------------------------------------------

# The release_072 fixture (tests/conftest.py) pins the 0.7.2 test wheel alone for one test.


@pytest.mark.parametrize("name", CALLS)
def test_072_every_entry_point_reaches_the_device_check(release_072: list[str], name: str) -> None:
    text = reached(calls(Args(), {"valid": Args().valid})[name])
    assert f"sampling.{name.removesuffix('_per_row')}(" in text


def test_072_is_the_release_of_the_pinned_module(release_072: list[str]) -> None:
    assert S.sampling_release() == "0.7.2"


def test_072_seed_and_offset_tensors_are_passed_as_tensors(release_072: list[str]) -> None:
    a = Args()
    text = reached(
        lambda: fi_ffi.sampling_from_probs(
            a.probs,
            out=a.out,
            valid=a.valid,
            seed=fake_cuda((1,), "int64"),
            offset=fake_cuda((R,), "int64"),
        )
    )
    assert "DLTensor*(int64[1] cuda:0), 0, DLTensor*(int64[4] cuda:0), 0)" in text
    text = reached(lambda: a.speculative(seed=fake_cuda((2,), "int64"), offset=fake_cuda((1,), "int64")))
    assert "DLTensor*(int64[2] cuda:0), 0, DLTensor*(int64[1] cuda:0), 0)" in text


def test_072_generator_ints_go_with_absent_tensors(release_072: list[str]) -> None:
    a = Args()
    text = reached(lambda: fi_ffi.sampling_from_probs(a.probs, out=a.out, valid=a.valid, generator=Generator(3, 10)))
    assert text.endswith("True, None, 3, None, 14)")


def test_072_required_outputs_are_named(release_072: list[str]) -> None:
    a = Args()
    with pytest.raises(TypeError, match="^valid: expected a tensor, got None"):
        fi_ffi.sampling_from_probs(a.probs, out=a.out, generator=Generator(1))
    with pytest.raises(TypeError, match="^workspace: expected a tensor, got None"):
        fi_ffi.top_p_renorm_probs(a.probs, 0.5, out=a.dense)
    with pytest.raises(ValueError, match=r"^workspace: needs at least 75264 bytes \(top_p_renorm_workspace_size"):
        fi_ffi.top_p_renorm_probs(a.probs, 0.5, out=a.dense, workspace=fake_cuda((1024,), "uint8"))


@pytest.mark.parametrize(
    ("seed", "offset", "exc", "pattern"),
    [
        ((2,), (R,), ValueError, r"^seed: expected shape \(1,\) or \(4,\)"),
        ((1,), (3,), ValueError, r"^offset: expected shape \(1,\) or \(4,\)"),
        ((1, 1), (1,), ValueError, r"^seed: expected a 1-D tensor"),
        ("int32", (1,), TypeError, r"^seed: expected dtype int64"),
    ],
)
def test_072_bad_seed_tensors_are_named(
    release_072: list[str], seed: Any, offset: Any, exc: type, pattern: str
) -> None:
    a = Args()
    s = fake_cuda((1,), "int32") if seed == "int32" else fake_cuda(seed, "int64")
    with pytest.raises(exc, match=pattern):
        fi_ffi.sampling_from_probs(a.probs, out=a.out, valid=a.valid, seed=s, offset=fake_cuda(offset, "int64"))
    with pytest.raises(ValueError, match=r"^seed: expected a tensor on cuda:0 \(same as probs\), got cuda:1"):
        fi_ffi.sampling_from_probs(
            a.probs,
            out=a.out,
            valid=a.valid,
            seed=fake_cuda((1,), "int64", device=1),
            offset=fake_cuda((1,), "int64"),
        )


def test_072_bad_valid_is_named(release_072: list[str]) -> None:
    a = Args()
    with pytest.raises(TypeError, match=r"^valid: expected dtype bool, got int32"):
        fi_ffi.sampling_from_probs(a.probs, out=a.out, valid=fake_cuda((R,), "int32"), seed=1, offset=0)
    with pytest.raises(ValueError, match=r"^valid: expected shape \(4,\)"):
        fi_ffi.sampling_from_probs(a.probs, out=a.out, valid=fake_cuda((R + 1,), "bool"), seed=1, offset=0)


# ---- the generator ----------------------------------------------------------------------------------------------


def test_generator_advances_by_the_rounded_increment_and_reproduces() -> None:
    g = Generator(42, 8)
    assert g.advance(5) == (42, 16)  # 5 -> 8
    assert g.advance(4) == (42, 20)
    assert g.advance(0) == (42, 20)
    assert [round_up4(n) for n in (0, 1, 3, 4, 5, 128)] == [0, 4, 4, 4, 8, 128]
    h = Generator(42, 8)
    assert [h.advance(n) for n in (5, 4, 0)] == [(42, 16), (42, 20), (42, 20)]
    h.set_state(42, 8)
    assert h.get_state() == (42, 8)
    assert Generator(1, 2**64 - 4).advance(5) == (1, 4)  # wraps like uint64


@pytest.mark.parametrize(
    ("args", "exc", "pattern"),
    [
        ((-1,), ValueError, r"^seed: expected an int in \[0, 2\*\*64\)"),
        ((2**64,), ValueError, r"^seed: expected an int in \[0, 2\*\*64\)"),
        ((1, -4), ValueError, r"^offset: expected an int in \[0, 2\*\*64\)"),
        (("7",), TypeError, r"^seed: expected an int, got str"),
        ((1.0,), TypeError, r"^seed: expected an int, got float"),
        ((True,), TypeError, r"^seed: expected an int, got bool"),
    ],
)
def test_generator_refuses_bad_state(args: tuple[Any, ...], exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        Generator(*args)


@pytest.mark.parametrize(
    "increment,exc,pattern",
    [
        ("5", TypeError, r"^increment: expected an int, got str"),
        (None, TypeError, r"^increment: expected an int, got NoneType"),
        (1.5, TypeError, r"^increment: expected an int, got float"),
        (float("nan"), TypeError, r"^increment: expected an int, got float"),
        (True, TypeError, r"^increment: expected an int, got bool"),
        (np.array([1, 2]), TypeError, r"^increment: expected an int, got ndarray"),
        (-4, ValueError, r"^increment: expected an int in \[0, 2\*\*64\)"),
        (2**64, ValueError, r"^increment: expected an int in \[0, 2\*\*64\)"),
    ],
)
def test_generator_advance_refuses_what_is_not_a_count(increment: Any, exc: type, pattern: str) -> None:
    g = Generator(7, 8)
    with pytest.raises(exc, match=pattern):
        g.advance(increment)
    assert g.get_state() == (7, 8)  # a refused advance draws nothing


def test_generator_takes_numpy_integers() -> None:
    g = Generator(np.uint64(7), np.int32(8))
    assert g.advance(np.int64(5)) == (7, 16)
    assert all(type(v) is int for v in g.get_state())  # Python ints: no numpy overflow on later advances
    g.set_state(np.uint64(2**64 - 1), np.uint64(2**64 - 4))
    assert g.advance(np.int64(4)) == (2**64 - 1, 0)  # wraps like cuRAND's unsigned 64-bit offset
    with pytest.raises(TypeError, match=r"^seed: expected an int, got ndarray"):
        Generator(np.array([1, 2]))
    with pytest.raises(TypeError, match=r"^offset: expected an int, got ndarray"):
        g.set_state(1, np.array([1, 2]))


def test_generator_advance_is_atomic_across_threads() -> None:
    g = Generator(0)
    threads = [threading.Thread(target=lambda: [g.advance(4) for _ in range(500)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert g.offset == 4 * 500 * 4


@pytest.mark.parametrize(
    ("name", "increment"),
    [
        ("sampling_from_probs", R),
        ("sampling_from_logits", R * V),
        ("top_p_sampling_from_probs", R * 32),
        ("top_k_sampling_from_probs", R * 32),
        ("min_p_sampling_from_probs", R),
        ("top_k_top_p_sampling_from_probs", R * 32),
        ("chain_speculative_sampling", 2 * 4),
    ],
)
def test_ops_pass_the_advanced_offset_and_a_refused_call_draws_nothing(
    kernel_modules: list[str], name: str, increment: int
) -> None:
    a = Args()
    g = Generator(77, 1000)
    op = getattr(fi_ffi, name)
    outputs: dict[str, Any] = {"out": a.out}
    if name == "chain_speculative_sampling":
        args: tuple[Any, ...] = (a.draft, a.draft_ids, a.target)
        outputs = dict(
            out=a.spec_out, maybe_output_accepted_token_num=a.accepted, maybe_output_emitted_draft_token_num=a.emitted
        )
    elif name == "top_k_top_p_sampling_from_probs":
        args = (a.probs, 5, 0.9)
    elif name in ("sampling_from_probs", "sampling_from_logits"):
        args = (a.probs,)
    else:
        args = (a.probs, 0.5 if "_p_" in name else 3)
    text = reached(lambda: op(*args, **outputs, generator=g))
    # flashinfer-python's order: advance by the rounded increment, then pass the new offset
    assert text.endswith(f", 77, {1000 + round_up4(increment)})"), text
    assert g.get_state() == (77, 1000)  # the kernel did not run (no GPU): nothing was drawn
    bad = fake_cuda((R + 1,), "int32") if name != "chain_speculative_sampling" else fake_cuda((3, 4), "int32")
    with pytest.raises(ValueError):
        op(*args, **{**outputs, "out": bad}, generator=g)
    assert g.get_state() == (77, 1000)


def test_seeds_are_unsigned_64_bit_on_the_wire(kernel_modules: list[str]) -> None:
    a = Args()
    text = reached(lambda: fi_ffi.sampling_from_probs(a.probs, out=a.out, seed=2**64 - 1, offset=2**63))
    assert text.endswith(f", -1, {-(2**63)})")  # the same 64 bits as uint64 2**64 - 1 and 2**63
    text = reached(lambda: fi_ffi.sampling_from_probs(a.probs, out=a.out, seed=12, offset=34))
    assert text.endswith(", 12, 34)")


def test_successive_launches_advance_the_generator() -> None:
    # The kernels cannot run here; the op's random-state step is driven with a recording launch instead.
    seen: list[tuple[int, int]] = []
    g = Generator(9, 0)
    for _ in range(3):
        S._sample(lambda **kw: seen.append((kw["seed_val"], kw["offset_val"])), lambda: 10, g, None, None, {})
    assert seen == [(9, 12), (9, 24), (9, 36)]
    assert g.offset == 36
    again: list[tuple[int, int]] = []
    g2 = Generator(9, 0)
    for _ in range(3):
        S._sample(lambda **kw: again.append((kw["seed_val"], kw["offset_val"])), lambda: 10, g2, None, None, {})
    assert again == seen


def test_default_generator_is_used_without_generator_or_seed(kernel_modules: list[str]) -> None:
    from fi_ffi.generator import default_generator

    a = Args()
    seed, offset = default_generator().get_state()
    text = reached(lambda: fi_ffi.sampling_from_probs(a.probs, out=a.out))
    assert text.endswith(f", {seed}, {offset + 4})")


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"seed": 1}, TypeError, r"^offset: seed and offset go together"),
        ({"offset": 1}, TypeError, r"^seed: seed and offset go together"),
        (
            {"seed": 1, "offset": 2, "generator": Generator(1)},
            TypeError,
            r"^generator: pass either generator= or seed=",
        ),
        ({"generator": object()}, TypeError, r"^generator: expected a fi_ffi.Generator, got object"),
        ({"seed": -1, "offset": 0}, ValueError, r"^seed: expected an int in \[0, 2\*\*64\)"),
        ({"seed": 0, "offset": 2**64}, ValueError, r"^offset: expected an int in \[0, 2\*\*64\)"),
        ({"seed": 1.5, "offset": 0}, TypeError, r"^seed, offset: pass both as ints or both as int64 CUDA tensors"),
    ],
)
def test_bad_random_state_is_named(shared_wheel: Path, kwargs: dict[str, Any], exc: type, pattern: str) -> None:
    # the random state's form depends on the pinned module's release (0.6.3 or >= 0.7): the wheel is needed
    a = Args()
    with pytest.raises(exc, match=pattern):
        fi_ffi.sampling_from_probs(a.probs, out=a.out, **kwargs)


# ---- bad inputs, every op -------------------------------------------------------------------------------------------


def _probs_op(op: str, **kw: Any) -> Callable[[Args], Any]:
    fn = getattr(fi_ffi, op)
    scalar = {
        "top_p_sampling_from_probs": (0.9,),
        "top_k_sampling_from_probs": (5,),
        "min_p_sampling_from_probs": (0.1,),
        "top_k_top_p_sampling_from_probs": (5, 0.9),
    }.get(op, ())
    return lambda a: fn(
        kw.pop("probs", a.probs), *kw.pop("params", scalar), out=kw.pop("out", a.out), seed=1, offset=0, **kw
    )


SAMPLERS = [
    "sampling_from_probs",
    "top_p_sampling_from_probs",
    "top_k_sampling_from_probs",
    "min_p_sampling_from_probs",
    "top_k_top_p_sampling_from_probs",
]


@pytest.mark.parametrize("op", SAMPLERS)
@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        ({"probs": ("shape", (R, V), "float16")}, TypeError, r"^probs: expected dtype float32, got float16"),
        ({"probs": ("shape", (R, 2, V), "float32")}, ValueError, r"^probs: expected a 2-D tensor"),
        ({"probs": ("strided",)}, ValueError, r"^probs: expected a contiguous tensor"),
        ({"probs": ("device", "cpu")}, ValueError, r"^probs: expected a CUDA device tensor, got one on cpu"),
        ({"probs": ("null",)}, ValueError, r"^probs: data pointer is NULL"),
        ({"out": ("shape", (R,), "float32")}, TypeError, r"^out: expected dtype int32, int64, got float32"),
        ({"out": ("shape", (R + 1,), "int32")}, ValueError, r"^out: expected shape \(4,\) \(one sample per probs row"),
        ({"out": ("device", 1)}, ValueError, r"^out: expected a tensor on cuda:0 \(same as probs\), got cuda:1"),
        ({"indices": ("shape", (R,), "int64")}, TypeError, r"^indices: expected dtype int32 \(same as out\)"),
        ({"indices": ("shape", (R + 1,), "int32")}, ValueError, r"^indices: expected shape \(4,\)"),
    ],
)
def test_bad_sampling_tensors_are_named(
    kernel_modules: list[str], op: str, change: dict[str, Any], exc: type, pattern: str
) -> None:
    a = Args()
    kw = {}
    for key, spec in change.items():
        if spec[0] == "shape":
            kw[key] = fake_cuda(spec[1], spec[2])
        elif spec[0] == "strided":
            kw[key] = fake_cuda((R, V), strides=(2 * V, 1))
        elif spec[0] == "device":
            kw[key] = fake_cuda(
                (R, V) if key == "probs" else (R,), "float32" if key == "probs" else "int32", device=spec[1]
            )
        else:
            kw[key] = Tensor.from_pointer(0, (R, V), "float32", "cuda:0")
    with pytest.raises(exc, match=pattern):
        _probs_op(op, **kw)(a)


@pytest.mark.parametrize(
    ("op", "params", "exc", "pattern"),
    [
        ("top_p_sampling_from_probs", (0.0,), ValueError, r"^top_p: expected a value in \(0, 1\], got 0.0"),
        ("top_p_sampling_from_probs", (1.5,), ValueError, r"^top_p: expected a value in \(0, 1\]"),
        ("top_p_sampling_from_probs", (float("nan"),), ValueError, r"^top_p: expected a value in \(0, 1\]"),
        ("top_p_sampling_from_probs", (True,), TypeError, r"^top_p: expected a float or a tensor, got bool"),
        pytest.param("top_p_sampling_from_probs", ("0.5",), TypeError, r"^top_p: ", marks=needs_shared_wheel),
        ("top_k_sampling_from_probs", (0,), ValueError, r"^top_k: expected an int in \[1, 2\*\*31\), got 0"),
        ("top_k_sampling_from_probs", (2**31,), ValueError, r"^top_k: expected an int in \[1, 2\*\*31\)"),
        ("top_k_sampling_from_probs", (2.0,), TypeError, r"^top_k: expected an int or a tensor, got float"),
        ("min_p_sampling_from_probs", (-0.1,), ValueError, r"^min_p: expected a value in \[0, 1\]"),
        ("min_p_sampling_from_probs", (None,), TypeError, r"^min_p: expected a float or a tensor, got NoneType"),
        ("top_p_sampling_from_probs", (None,), TypeError, r"^top_p: expected a float or a tensor, got NoneType"),
        ("top_k_sampling_from_probs", (None,), TypeError, r"^top_k: expected an int or a tensor, got NoneType"),
        ("top_k_top_p_sampling_from_probs", (3, None), TypeError, r"^top_p: expected a float or a tensor, got None"),
        ("top_k_top_p_sampling_from_probs", (0, 0.5), ValueError, r"^top_k: expected an int in \[1, 2\*\*31\)"),
        ("top_k_top_p_sampling_from_probs", (3, 2.0), ValueError, r"^top_p: expected a value in \(0, 1\]"),
    ],
)
def test_out_of_range_parameters_are_named(op: str, params: tuple[Any, ...], exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        _probs_op(op, params=params)(Args())


@pytest.mark.parametrize(
    ("op", "params", "exc", "pattern"),
    [
        ("top_p_sampling_from_probs", (("f32", R + 1),), ValueError, r"^top_p: expected shape \(4,\)"),
        ("top_p_sampling_from_probs", (("f16", R),), TypeError, r"^top_p: expected dtype float32, got float16"),
        ("top_k_sampling_from_probs", (("i64", R),), TypeError, r"^top_k: expected dtype int32, got int64"),
        ("min_p_sampling_from_probs", (("i32", R),), TypeError, r"^min_p: expected dtype float32, got int32"),
        ("top_k_top_p_sampling_from_probs", (("f32", R), 0.5), TypeError, r"^top_k: expected dtype int32, got float32"),
        ("top_k_top_p_sampling_from_probs", (3, ("f32", 2)), ValueError, r"^top_p: expected shape \(4,\)"),
    ],
)
def test_bad_per_row_parameters_are_named(
    kernel_modules: list[str], op: str, params: tuple[Any, ...], exc: type, pattern: str
) -> None:
    names = {"f32": "float32", "f16": "float16", "i32": "int32", "i64": "int64"}
    built = tuple(fake_cuda((p[1],), names[p[0]]) if isinstance(p, tuple) else p for p in params)
    with pytest.raises(exc, match=pattern):
        _probs_op(op, params=built)(Args())


def test_per_row_top_k_with_indices_over_other_rows_is_refused(kernel_modules: list[str]) -> None:
    a = Args()
    with pytest.raises(ValueError, match=r"^top_k: a per-row top_k with indices needs as many output rows"):
        fi_ffi.top_k_sampling_from_probs(
            a.probs,
            fake_cuda((R,), "int32"),
            out=fake_cuda((2 * R,), "int32"),
            indices=fake_cuda((2 * R,), "int32"),
            seed=1,
            offset=0,
        )
    # top-p reads its array at indices[b]: any number of output rows
    reached(
        lambda: fi_ffi.top_p_sampling_from_probs(
            a.probs,
            fake_cuda((R,)),
            out=fake_cuda((2 * R,), "int32"),
            indices=fake_cuda((2 * R,), "int32"),
            seed=1,
            offset=0,
        )
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"temperature": 0.0}, ValueError, r"^temperature: expected a finite value > 0"),
        ({"temperature": float("inf")}, ValueError, r"^temperature: expected a finite value > 0"),
        ({"temperature": "hot"}, TypeError, r"^temperature: "),
        ({"temperature": ("f32", R + 1)}, ValueError, r"^temperature: expected shape \(4,\)"),
        ({"temperature": ("f16", R)}, TypeError, r"^temperature: expected dtype float32"),
        ({"out": ("f16", (R, V))}, TypeError, r"^out: expected dtype float32 \(same as logits\)"),
        ({"out": ("f32", (R, V + 1))}, ValueError, r"^out: expected shape \(4, 64\)"),
        ({"logits": ("f16", (R, V))}, TypeError, r"^logits: expected dtype float32"),
        (
            {"shape": (2, 24576), "workspace": ("u8", (16,))},
            ValueError,
            r"^workspace: needs at least 48 bytes \(softmax_workspace_size\(2, 24576\)\), got 16",
        ),
        ({"workspace": ("u8", (4, 4))}, ValueError, r"^workspace: expected a 1-D tensor"),
        ({"enable_pdl": 2}, TypeError, r"^enable_pdl: expected a bool"),
    ],
)
def test_bad_softmax_arguments_are_named(
    kernel_modules: list[str], kwargs: dict[str, Any], exc: type, pattern: str
) -> None:
    names = {"f32": "float32", "f16": "float16", "u8": "uint8"}
    shape = kwargs.pop("shape", (R, V))
    args = {"logits": fake_cuda(shape), "out": fake_cuda(shape), "workspace": fake_cuda((MIB,), "uint8")}
    for key, value in list(kwargs.items()):
        if isinstance(value, tuple):
            kwargs[key] = fake_cuda(value[1] if isinstance(value[1], tuple) else (value[1],), names[value[0]])
    args.update({k: v for k, v in kwargs.items() if k in args})
    rest = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises(exc, match=pattern):
        fi_ffi.softmax(args["logits"], out=args["out"], workspace=args["workspace"], **rest)


def test_softmax_workspace_size_follows_the_kernels_split_rule() -> None:
    assert S.softmax_workspace_size(128, 24576) == 8 * 128 * 3
    assert S.softmax_workspace_size(129, 24576) == 0  # large batches: one block per row, no workspace
    assert S.softmax_workspace_size(1, 24575) == 0
    assert S.softmax_workspace_size(32, 128256) == 8 * 32 * 16  # ceil(128256 / 8192) = 16 slices
    assert S.softmax_workspace_size(128, 1 << 22) <= MIB  # flashinfer-python's 1 MiB covers every shape
    with pytest.raises(ValueError, match="^batch_size: expected an int >= 0"):
        S.softmax_workspace_size(-1, 10)


def test_top_p_renorm_workspace_size_follows_the_kernels_layout() -> None:
    # counters 384*B, histogram 4*2048*B (8 when deterministic), count histogram 4*2048*B, two buffers
    assert S.top_p_renorm_workspace_size(1, 64) == 512 + 8192 + 8192 + 2 * 1024
    assert S.top_p_renorm_workspace_size(1, 64, True) == 512 + 16384 + 8192 + 2 * 1024
    assert S.top_p_renorm_workspace_size(2, 128000) == 768 + 16384 + 16384 + 2 * (4 * 4096 * 2)


@pytest.mark.parametrize("op", ["top_p_renorm_probs", "top_k_renorm_probs", "top_k_mask_logits"])
@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        ({"src": ("int32", (R, V))}, TypeError, r"^(probs|logits): expected dtype float32"),
        ({"src": ("float32", (R,))}, ValueError, r"^(probs|logits): expected a 2-D tensor"),
        ({"out": ("float32", (R, V - 1))}, ValueError, r"^out: expected shape \(4, 64\)"),
        ({"out": ("float16", (R, V))}, TypeError, r"^out: expected dtype float32 \(same as (probs|logits)\)"),
        ({"param": ("float32", (R + 1,))}, ValueError, r"^top_[pk]: expected shape \(4,\)"),
        ({"param": ("float16", (R,))}, TypeError, r"^top_[pk]: expected dtype (float32|int32), got float16"),
    ],
)
def test_bad_renorm_and_mask_arguments_are_named(
    kernel_modules: list[str], op: str, change: dict[str, Any], exc: type, pattern: str
) -> None:
    a = Args()
    src = fake_cuda(*reversed(change["src"])) if "src" in change else a.probs
    out = fake_cuda(*reversed(change["out"])) if "out" in change else a.dense
    param: Any = (
        fake_cuda(*reversed(change["param"])) if "param" in change else (0.5 if op == "top_p_renorm_probs" else 3)
    )
    fn = getattr(fi_ffi, op)
    with pytest.raises(exc, match=pattern):
        if op == "top_p_renorm_probs":
            fn(src, param, out=out)
        else:
            fn(src, param, out=out, row_states_buffer=a.states)


@pytest.mark.parametrize("op", ["top_k_renorm_probs", "top_k_mask_logits"])
def test_row_states_buffer_is_checked(kernel_modules: list[str], op: str) -> None:
    a = Args()
    fn = getattr(fi_ffi, op)
    with pytest.raises(ValueError, match=rf"^row_states_buffer: needs at least {MIB} bytes \(ROW_STATES_BYTES\)"):
        fn(a.probs, 3, out=a.dense, row_states_buffer=fake_cuda((MIB - 1,), "uint8"))
    with pytest.raises(ValueError, match=r"^row_states_buffer: expected a CUDA device tensor, got one on cpu"):
        fn(a.probs, 3, out=a.dense, row_states_buffer=fake_cuda((MIB,), "uint8", device="cpu"))
    with pytest.raises(TypeError, match=r"^row_states_buffer: expected a tensor, got None"):
        fn(a.probs, 3, out=a.dense, row_states_buffer=None)
    with pytest.raises(ValueError, match=r"^top_k: expected an int in \[1, 2\*\*31\)"):
        fn(a.probs, -3, out=a.dense, row_states_buffer=a.states)


@pytest.mark.parametrize(
    ("which", "value", "exc", "pattern"),
    [
        ("draft", ((2, 3, V), "float16"), TypeError, r"^draft_probs: expected dtype float32"),
        ("draft", ((2, V), "float32"), ValueError, r"^draft_probs: expected a 3-D tensor"),
        ("draft_ids", ((2, 4), "int32"), ValueError, r"^draft_token_ids: expected shape \(2, 3\)"),
        ("draft_ids", ((2, 3), "int64"), TypeError, r"^draft_token_ids: expected dtype int32"),
        ("target", ((2, 3, V), "float32"), ValueError, r"^target_probs: expected shape \(2, 4, 64\)"),
        ("target", ((2, 4, V + 1), "float32"), ValueError, r"^target_probs: expected shape \(2, 4, 64\)"),
        ("spec_out", ((2, 3), "int32"), ValueError, r"^out: expected shape \(2, 4\)"),
        ("accepted", ((3,), "int32"), ValueError, r"^maybe_output_accepted_token_num: expected shape \(2,\)"),
        ("emitted", ((2,), "int64"), TypeError, r"^maybe_output_emitted_draft_token_num: expected dtype int32"),
    ],
)
def test_bad_speculative_arguments_are_named(
    kernel_modules: list[str], which: str, value: Any, exc: type, pattern: str
) -> None:
    a = Args()
    setattr(a, which, fake_cuda(*value))
    with pytest.raises(exc, match=pattern):
        a.speculative(seed=3, offset=4)


def test_the_speculative_outputs_must_not_overlap(kernel_modules: list[str]) -> None:
    a = Args()
    with pytest.raises(ValueError, match=r"^out: an output's elements must not overlap"):
        fi_ffi.chain_speculative_sampling(
            a.draft,
            a.draft_ids,
            a.target,
            out=fake_cuda((2, 4), "int32", strides=(0, 1)),
            maybe_output_accepted_token_num=a.accepted,
            maybe_output_emitted_draft_token_num=a.emitted,
            seed=3,
            offset=4,
        )


def test_every_public_sampling_op_is_exported() -> None:
    for name in [*S.__all__, "Generator"]:
        if name != "release" and not name.isupper():
            assert getattr(fi_ffi, name) is not None, name
    assert re.match(r"^\w+$", fi_ffi.sampling_from_probs.__name__)

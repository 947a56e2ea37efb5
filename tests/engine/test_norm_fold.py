"""The folded norm's arguments on the CPU (fi_engine.kernels.norm_fold; its kernels on the GPU:
tests/engine/test_gpu_norm_fold.py): the 7 arguments each side packs, in the order of ``NORM_FOLD_PARAMS`` and of
``NormFold``'s fields in csrc/norm_fold.cuh; each fold kernel's parameters, its GEMV's and then those; every bad field
refused by name; one counter pair refused for a second grid."""

from __future__ import annotations

import re
import struct

import pytest

from fi_engine.kernels.cuda_sources import read
from fi_engine.kernels.norm_fold import FoldCounters, FoldIn, FoldOut, fold_ints

A = 1 << 32  # a fake, aligned device address


def kernel_params(text: str) -> list[str]:
    """The parameter names of a C parameter list (the last identifier of each comma-separated part)."""
    return [re.findall(r"\w+", part)[-1] for part in text.replace("\\", " ").split(",") if part.strip()]


def macro_body(source: str, name: str) -> str:
    return re.search(rf"#define {name}\b(.*?)(?<!\\)\n", source, re.S).group(1)  # type: ignore[union-attr]


def test_both_sides_pack_the_kernels_fold_parameters_in_order() -> None:
    header = read("norm_fold.cuh")
    params = kernel_params(macro_body(header, "NORM_FOLD_PARAMS"))
    assert params == ["fold_h", "fold_v", "fold_h_out", "fold_xn", "fold_sync", "fold_rs", "fold_eps"]
    struct_fields = re.findall(r"^\s+[\w\s\*]+?\*?(\w+);", header.split("struct NormFold {")[1].split("};")[0], re.M)
    assert struct_fields == [p.removeprefix("fold_") for p in params]
    assert macro_body(header, "NORM_FOLD_ARGS").strip() == "NormFold{" + ", ".join(params) + "}"
    assert fold_ints(FoldOut(h=A, nw=A + 64, h_out=A + 128, xn=A + 256)) == [A, A + 64, A + 128, A + 256, 0, 0, 0]
    eps_bits = int.from_bytes(struct.pack("<f", 1e-5), "little")
    assert fold_ints(FoldIn(h=A, y=A + 64, sync=A + 128, rs=A + 256, eps=1e-5)) == [
        A, A + 64, 0, 0, A + 128, A + 256, eps_bits
    ]  # fmt: skip


def test_each_fold_kernel_takes_its_gemvs_parameters_then_the_folds() -> None:
    int4 = read("int4_gemv.cu")
    gemv4 = kernel_params(re.search(r"name\((.*?)\) \{", macro_body(int4, "GEMV4"), re.S).group(1))  # type: ignore[union-attr]
    gemv4f = kernel_params(re.search(r"name\((.*?)\) \{", macro_body(int4, "GEMV4F"), re.S).group(1))  # type: ignore[union-attr]
    assert gemv4f == [*gemv4, "NORM_FOLD_PARAMS"]
    fp8 = read("fp8_gemv.cu")
    one = kernel_params(re.search(r"name\((.*?)\) \{", macro_body(fp8, "GEMV8ONE"), re.S).group(1))  # type: ignore[union-attr]
    one_fold = kernel_params(re.search(r"fold_out\((.*?)\) \{", macro_body(fp8, "GEMV8ONE_FOLD"), re.S).group(1))  # type: ignore[union-attr]
    assert one_fold == [*one, "NORM_FOLD_PARAMS"]
    fused = read("fp8_fused.cu")
    pair = kernel_params(re.search(r"name\((.*?)\) \{", macro_body(fused, "PAIRS8ONE_FOLD"), re.S).group(1))  # type: ignore[union-attr]
    assert pair == ["PAIRS8_PARAMS", "NORM_FOLD_PARAMS"]


@pytest.mark.parametrize(
    ("fold", "error", "match"),
    [
        (FoldOut(h=0, nw=A, h_out=A + 64, xn=A + 128), ValueError, "^fold.h: 0x0 must be a non-NULL"),
        (FoldOut(h=A, nw=A + 1, h_out=A + 64, xn=A + 128), ValueError, "^fold.nw: .* aligned to 2 bytes"),
        (FoldOut(h=A, nw=A, h_out=A, xn=A + 128), ValueError, "^fold.h_out: the new residual must go to another"),
        (FoldOut(h=A, nw=A, h_out=A + 64, xn=-2), ValueError, "^fold.xn: "),
        (FoldOut(h=A, nw="a", h_out=A + 64, xn=A), TypeError, "^fold.nw: "),  # type: ignore[arg-type]
        (FoldIn(h=A + 8, y=A, sync=A, rs=A, eps=1e-5), ValueError, "^fold.h: .* aligned to 16 bytes"),
        (FoldIn(h=A, y=A, sync=A + 4, rs=A, eps=1e-5), ValueError, "^fold.sync: .* aligned to 8 bytes"),
        (FoldIn(h=A, y=A, sync=A, rs=A + 2, eps=1e-5), ValueError, "^fold.rs: .* aligned to 4 bytes"),
        (FoldIn(h=A, y=A, sync=A, rs=A, eps=float("nan")), ValueError, "^fold.eps: expected a finite float"),
        (FoldIn(h=A, y=A, sync=A, rs=A, eps=1e39), ValueError, "^fold.eps: expected a finite float"),
        (FoldIn(h=A, y=A, sync=A, rs=A, eps=10**400), ValueError, "^fold.eps: expected a finite float"),
        (FoldIn(h=A, y=A, sync=A, rs=A, eps=True), TypeError, "^fold.eps: expected a float"),
        (FoldIn(h=A, y=A, sync=A, rs=A, eps="1e-5"), TypeError, "^fold.eps: expected a float"),  # type: ignore[arg-type]
        ((A, A, A, A), TypeError, "^fold: expected a FoldOut or a FoldIn, got tuple"),
    ],
)
def test_a_bad_fold_field_is_refused_by_name(fold: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        fold_ints(fold)


def test_one_counter_pair_serves_one_grid() -> None:
    counters = FoldCounters()
    counters.check(A, 257)
    counters.check(A, 257)  # the same call site packed again
    counters.check(A + 16, 1057)  # another site's pair
    with pytest.raises(ValueError, match="^fold.sync: 0x100000000 counts the launches of a 257-block grid; this call"):
        counters.check(A, 1057)


def test_the_int4_registry_packs_each_fold_form_on_its_grid() -> None:
    """The int4 GEMV's fold forms: FoldOut on the GEMV's grid, FoldIn on one block more (its factors' block), the
    fold's 7 arguments after the GEMV's 12; more than 8 rows, float32 y or a SiLU FoldOut get no fold form."""
    from fi_engine.kernels.int4_linear import Int4Linears, Int4Weight
    from fi_ffi.cuda import driver

    registry = Int4Linears(None, driver.ffi(), 0)
    registry._sms = 132
    registry._fold = {(True, form, False): 100 + i for i, form in enumerate(("out", "in", "silu_in"))}
    wt = Int4Weight(A, 1024, 512, 2 * A, 128)
    out = FoldOut(h=3 * A, nw=4 * A, h_out=5 * A, xn=6 * A)
    fin = FoldIn(h=3 * A, y=7 * A, sync=8 * A, rs=9 * A, eps=1e-6)
    for fold, fn, grid, silu in ((out, 100, 64, False), (fin, 101, 65, False), (fin, 102, 65, True)):
        packed = registry.gemv(4, 10 * A, 512, wt, 11 * A, 1024, True, False, silu=silu, fold=fold)
        f, g, threads, _, values = packed
        assert (f, g) == (fn, grid) and threads % 32 == 0
        assert [values[i] for i in range(19)][12:] == fold_ints(fold)
    assert registry.gemv(9, 10 * A, 512, wt, 11 * A, 1024, True, False, fold=fin) == ()
    assert registry.gemv(1, 10 * A, 512, wt, 11 * A, 1024, True, True, fold=fin) == ()
    assert registry.gemv(1, 10 * A, 512, wt, 11 * A, 1024, True, False, silu=True, fold=out) == ()
    with pytest.raises(ValueError, match="^fold.rs: "):
        registry.gemv(1, 10 * A, 512, wt, 11 * A, 1024, True, False, fold=FoldIn(3 * A, 7 * A, 8 * A, 0, 1e-6))

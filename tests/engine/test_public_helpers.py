"""The binding's names the engine takes beyond the ops (public since the engine uses fi_ffi's public API only):
bad input is fi_ffi's own error naming the argument, as for an op."""

from __future__ import annotations

import numpy as np
import pytest

import fi_ffi
from fi_engine import values


@pytest.mark.parametrize(
    ("args", "exc", "pattern"),
    [
        (("256", 8, 4, 8), TypeError, r"^num_experts: expected an int, got str$"),
        ((256, 8.0, 4, 8), TypeError, r"^n_group: expected an int, got float$"),
        ((256, 8, True, 8), TypeError, r"^topk_group: expected an int, got bool$"),
        ((256, 8, 4, None), TypeError, r"^topk: expected an int, got NoneType$"),
        ((256, 7, 4, 8), ValueError, r"^n_group: expected a divisor of num_experts \(256\) in \[1, 32\], got 7$"),
    ],
)
def test_routing_limits_names_the_argument(args: tuple, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        fi_ffi.routing_limits(*args)


def test_routing_limits_accepts_deepseek_v3() -> None:
    assert fi_ffi.routing_limits(256, 8, 4, 8) is None


def test_segment_gemm_args_bytes() -> None:
    assert fi_ffi.segment_gemm_args_bytes(0) == 0
    assert fi_ffi.segment_gemm_args_bytes(8) > fi_ffi.segment_gemm_args_bytes(1) > 0
    with pytest.raises(TypeError, match=r"^batch_size: expected an int, got str$"):
        fi_ffi.segment_gemm_args_bytes("8")
    with pytest.raises(ValueError, match=r"^batch_size: expected an int >= 0, got -1$"):
        fi_ffi.segment_gemm_args_bytes(-1)


def test_the_engines_own_value_checks_keep_fi_ffis_messages() -> None:
    assert values.integer("n", np.int64(3), 1) == 3
    with pytest.raises(TypeError, match=r"^n: expected an int, got bool$"):
        values.integer("n", True)
    with pytest.raises(TypeError, match=r"^n: expected an int, got ndarray$"):
        values.integer("n", np.arange(2))
    with pytest.raises(ValueError, match=r"^n: expected an int >= 1, got 0$"):
        values.integer("n", 0, 1)
    assert values.flag("on", 1) is True and values.flag("on", False) is False
    with pytest.raises(TypeError, match=r"^on: expected a bool, got 'yes'$"):
        values.flag("on", "yes")
    with pytest.raises(TypeError, match=r"^on: expected a bool, got 2$"):
        values.flag("on", 2)


def test_float32_bits_packs_a_float32_and_refuses_by_name_what_is_none() -> None:
    # the kernels' float arguments (eps, RoPE constants, KV scales, gpt-oss's clamp) go through it
    assert values.float32_bits("eps", 1.0) == 0x3F800000
    assert values.float32_bits("eps", 0.25) == 0x3E800000
    assert values.float32_bits("eps", -2.5) == 0xC0200000
    assert values.float32_bits("eps", 1e-6) == int(np.float32(1e-6).view(np.uint32))
    assert values.float32_bits("eps", 3.4028234663852886e38) == 0x7F7FFFFF  # float32's largest
    for bad in (1e39, -1e300, float("nan"), float("inf"), 10**400, True, None, "1.0"):
        with pytest.raises(ValueError, match=r"^eps: expected a finite float within float32's range"):
            values.float32_bits("eps", bad)

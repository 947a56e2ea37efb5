"""fi_ffi.cuda.device on a real GPU (gated by FI_FFI_RUN_GPU_TESTS=1): the properties read once match what torch
reads of the same device, and a second ask is answered from the cache."""

from __future__ import annotations

import os

import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from helpers.gpu import require_torch

from fi_ffi import caches
from fi_ffi.cuda import device
from fi_ffi.ops.attention import variants

torch = require_torch()

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("ordinal", range(torch.cuda.device_count()))
def test_each_devices_properties_match_torch_and_are_read_once(ordinal: int) -> None:
    caches.reset()
    found = device.properties(ordinal)
    torch_props = torch.cuda.get_device_properties(ordinal)
    assert found.compute_capability == (torch_props.major, torch_props.minor)
    assert found.sm_count == torch_props.multi_processor_count
    assert 16 <= found.max_blocks_per_sm <= 64  # 32 on Ampere and Hopper, 16 to 32 elsewhere
    # every reader answers from that one entry: the same object, no second query
    assert device.properties(ordinal) is found and device.known_properties(ordinal) is found
    assert device.compute_capability(ordinal) == found.compute_capability
    assert device.sm_count(ordinal) == found.sm_count
    assert variants.sm_major(ordinal) == found.compute_capability[0]
    assert device._properties[ordinal] is found


def test_an_ordinal_past_the_last_device_is_unknown() -> None:
    assert device.known_properties(torch.cuda.device_count()) is None

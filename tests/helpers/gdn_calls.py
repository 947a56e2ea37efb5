"""The GDN prefill op's body without its device checks, for the CPU tests (``tests/ops/test_gdn.py``, the pointer
rules): descriptors that claim ``cuda:0`` reach the launcher on a machine with no CUDA driver."""

from __future__ import annotations

from fi_ffi.ops import gdn


def call_unchecked(
    args: dict[str, object],
    initial_state: object = None,
    g: object = None,
    beta: object = None,
    scale: object = None,
    stream: object = None,
) -> None:
    """The public op's body without the device checks that need a CUDA driver (internal test hatch)."""
    gdn._gdn_prefill(
        args["q"],
        args["k"],
        args["v"],
        args["cu_seqlens"],
        args["output"],
        args["output_state"],
        args["workspace"],
        initial_state,
        g,
        beta,
        scale,
        stream,
        True,
    )

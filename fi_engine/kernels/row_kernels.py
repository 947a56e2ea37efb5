"""The sampler's and the embedding's row kernels (``csrc/rows.cu``): a gather of 16-bit rows by int32 index (the
embedding lookup, the last rows of a prefill, the sampled ids) and the greedy argmax of float32 logits rows. CuPy
``RawKernel`` calls on CuPy's current stream (the engine keeps it equal to its own), or a gather packed once and
launched through the driver (:meth:`RowKernels.prepared_gather`: the fused decode step's embedding).
"""

from __future__ import annotations

from typing import Any

from .cuda_sources import function_ptr
from .launch import MAX_LD, Launcher, address_arg, int_arg

__all__ = ["ROW_KERNELS", "RowKernels", "column_blocks"]

ROW_KERNELS = ("gather_rows16", "argmax_rows")  # rows.cu's kernels RowKernels takes, in its constructor's order


def column_blocks(width: int) -> int:
    """Blocks of 256 threads per row of the row copies (``gather_rows16``), one column each (at least one)."""
    return max(1, -(-int(width) // 256))


class RowKernels:
    """The row gather and argmax: ``gather_fn`` and ``argmax_fn``, the compiled :data:`ROW_KERNELS` of ``rows.cu``
    (CuPy functions); ``launcher`` packs :meth:`prepared_gather`."""

    def __init__(self, gather_fn: Any, argmax_fn: Any, launcher: Launcher) -> None:
        self.gather_fn, self._argmax_fn, self._launcher = gather_fn, argmax_fn, launcher

    def gather_rows(self, rows: int, src: int, src_ld: int, index: int, dst: int, dst_ld: int, width: int) -> None:
        """``dst[r, :width] = src[index[r], :width]`` for ``r < rows`` (16-bit elements; ``index`` int32)."""
        self.gather_fn((rows, column_blocks(width)), (256,), (src, index, dst, width, src_ld, dst_ld))

    def gather_ids(self, rows: int, src: int, index: int, dst: int) -> None:
        """``dst[r] = src[index[r]]`` for ``r < rows`` (int32 token ids: the row gather over two 16-bit halves)."""
        self.gather_rows(rows, src, 2, index, dst, 2, 2)

    def argmax(self, rows: int, x: int, n: int, ld: int, out: int) -> None:
        """``out[r] = argmax(x[r, :n])`` (float32 ``x``, int32 ``out``; ties: the first index)."""
        self._argmax_fn((rows,), (1024,), (x, n, ld, out))

    def prepared_gather(self, rows: int, src: int, src_ld: int, index: int, dst: int, dst_ld: int, width: int) -> Any:
        """:meth:`gather_rows` packed once and launched with ``cuLaunchKernel`` on the launcher's stream (a CuPy
        ``RawKernel`` launch costs about 4 us more host time); needs the driver launch path (the Dense's ``gemv``
        True). Raises ValueError when it is off, and TypeError/ValueError naming an argument that is no int, out of
        range (``rows`` in ``[1, 2**31)``: one block each; strides and ``width`` in elements, ``[0, 2**40)``), NULL
        or misaligned (``src``, ``dst``: 2 bytes, their 16-bit elements; ``index``: 4, int32)."""
        launcher = self._launcher
        launcher.check_open()
        int_arg("rows", rows, 1, 1 << 31)
        for name, value in (("src_ld", src_ld), ("dst_ld", dst_ld), ("width", width)):
            int_arg(name, value, 0, MAX_LD)
        for name, value, align in (("src", src, 2), ("index", index, 4), ("dst", dst, 2)):
            address_arg(name, value, align)
        params, values = launcher.slots([src, index, dst, width, src_ld, dst_ld])
        fn = function_ptr(self.gather_fn)
        return launcher.prepared(fn, rows, 256, 0, params, values, "gather_rows16", grid_y=column_blocks(width))

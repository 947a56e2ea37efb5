"""The row kernels of a vocabulary split over tensor-parallel ranks (``csrc/rows.cu``): each rank's gather of the
embedding rows it holds, its shard's argmax as (value, global id) pairs, the all-gathered pairs' combination into
one token per row, and the all-gathered logits shards' reassembly into whole rows. CuPy ``RawKernel`` calls on
CuPy's current stream (the engine keeps it equal to its own).
"""

from __future__ import annotations

from typing import Any

from .row_kernels import column_blocks

__all__ = ["SHARD_KERNELS", "ShardKernels"]

# rows.cu's kernels ShardKernels takes, in its constructor's order
SHARD_KERNELS = ("gather_rows16_shard", "argmax_rows_shard", "combine_argmax", "unshard_columns")


class ShardKernels:
    """The vocabulary shards' row kernels: the compiled :data:`SHARD_KERNELS` of ``rows.cu`` (CuPy functions)."""

    def __init__(self, gather_fn: Any, argmax_fn: Any, combine_fn: Any, unshard_fn: Any) -> None:
        self._gather_fn, self._argmax_fn, self._combine_fn, self._unshard_fn = (
            gather_fn,
            argmax_fn,
            combine_fn,
            unshard_fn,
        )

    def gather_rows_shard(
        self, rows: int, src: int, src_ld: int, index: int, dst: int, dst_ld: int, width: int, lo: int, n: int
    ) -> None:
        """``dst[r] = src[index[r] - lo]`` where ``lo <= index[r] < lo + n``, else a row of zeros (16-bit)."""
        import numpy as np

        args = (src, index, dst, width, src_ld, dst_ld, np.int32(lo), np.int32(n))
        self._gather_fn((rows, column_blocks(width)), (256,), args)

    def argmax_shard(self, rows: int, x: int, n: int, ld: int, offset: int, pairs: int) -> None:
        """``pairs[r] = (max(x[r, :n]) as float32 bits, first argmax + offset)`` (int32 ``[rows, 2]``)."""
        import numpy as np

        self._argmax_fn((rows,), (1024,), (x, n, ld, np.int32(offset), pairs))

    def combine_argmax(self, rows: int, pairs: int, parts: int, out: int) -> None:
        """``out[r]`` = the winning index of the all-gathered ``pairs [parts, rows, 2]`` (see the kernel)."""
        import numpy as np

        self._combine_fn(((rows + 127) // 128,), (128,), (pairs, np.int32(parts), np.int32(rows), out))

    def unshard_columns(self, rows: int, src: int, width: int, n: int, dst: int, dst_ld: int) -> None:
        """``dst[r, :n]`` = the columns of the all-gathered float32 shards ``src [parts, rows, width]``."""
        import numpy as np

        self._unshard_fn((rows,), (256,), (src, np.int32(rows), width, n, dst, dst_ld))

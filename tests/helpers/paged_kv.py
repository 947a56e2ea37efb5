"""The paged K/V cache and the ragged batch shared by tests/ops/attention/test_gpu_prefill.py and
tests/ops/attention/test_gpu_sink.py
(imports torch: import it only from GPU-gated test modules)."""

from __future__ import annotations

import numpy as np

from helpers.gpu import require_torch

torch = require_torch()  # imported by GPU test modules only: a skip naming the extra without it

QO_LENS = [1, 7, 33, 64, 2]
KV_LENS = [1, 20, 33, 100, 50]  # >= qo lengths, so that causal rows are never empty


def indptr(lengths):
    """The offsets ``[0, l0, l0 + l1, ...]`` of consecutive segments of the given lengths, int32."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


class PagedKV:
    """Requests' keys/values (contiguous, for the reference) scattered over shuffled pages of a paged cache."""

    def __init__(self, k, v, kv_lens, page_size, layout, spare_pages=2):
        hk, d = k.shape[1:]
        pages = [-(-n // page_size) for n in kv_lens]
        total = sum(pages) + spare_pages
        perm = torch.randperm(total).tolist()
        shape = (total, page_size, hk, d)
        kc = torch.zeros(shape, dtype=k.dtype, device="cuda")
        vc = torch.zeros_like(kc)
        table, start = [], 0
        for n, p in zip(kv_lens, pages, strict=True):
            ids = perm[len(table) : len(table) + p]
            for j, pid in enumerate(ids):
                rows = slice(start + j * page_size, min(start + (j + 1) * page_size, start + n))
                cnt = rows.stop - rows.start
                kc[pid, :cnt] = k[rows]
                vc[pid, :cnt] = v[rows]
            table += ids
            start += n
        if layout == "HND":
            kc, vc = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
        self.k, self.v = kc, vc
        self.indptr_h = indptr(pages)
        self.last_h = np.array(
            [n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages, strict=True)], np.int32
        )
        self.indices = torch.tensor(table, dtype=torch.int32, device="cuda")
        self.indptr = torch.from_numpy(self.indptr_h).cuda()
        self.last = torch.from_numpy(self.last_h).cuda()

"""What a stand-in :class:`~fi_engine.runtime.worker.model_runner.ModelRunner` (made without its constructor, no GPU)
launches, logged instead: the CPU tests of the decode step's choice of launches read the log."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

from fi_engine.runtime.sched.step_arrays import decode_layout


def log_runner_launches(r: Any, log: Callable[[str], None], max_batch: int, norm: str = "norm") -> None:
    """Runner ``r``'s own device work logged by name to ``log`` (the embedding, the KV append, the residual add +
    norm as ``norm``, the attention, the LM head, the argmax), and its host decode arrays for ``max_batch`` rows."""
    r.embed_and_norm = lambda v, rows: log("embed")
    r.append_kv = lambda v, i: log("append")
    r.add_norm = lambda v, weight: log(norm)
    r.decode_attention = lambda i, v: log("attention")
    r.head = lambda rows, x: log("head")
    r.sampler = SimpleNamespace(argmax=lambda rows: log("argmax"))
    layout = decode_layout(max_batch, 64)
    r.decode_arrays = layout.views(np.zeros(layout.total, np.int32))

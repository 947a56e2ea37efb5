"""One GEMM launch choice for every engine of a GPU test that compares two engines' tokens or logits bit for bit.

Each engine times its GEMM launches at warm-up (``Dense._choice``, ``LaunchTimer.times``) and its decode graphs try
the launches that came close in the captured step (``ModelRunner.tune_decode_graphs``). Two engines may so pick
different launches of near-equal times, whose roundings differ and flip a near tie of a random model's logits: a
test that holds two engines to the same tokens would fail from one run to the next, with nothing wrong.
"""

from __future__ import annotations

import pytest


def pin_launch_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timed set of launches times its least label (the format's own path, cuBLASLt for 16-bit weights) at 0 and
    the others at 1 s: every engine picks that launch, and no other comes close enough for a decode graph to try it in
    the step."""
    from fi_engine.kernels.launch_timing import LaunchTimer

    monkeypatch.setattr(LaunchTimer, "times", lambda self, runs: {k: 0.0 if k == min(runs) else 1.0 for k in runs})

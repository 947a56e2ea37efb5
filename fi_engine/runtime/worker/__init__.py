"""The model on the GPU, run step by step: the model runner and the parts it holds.

- :mod:`~fi_engine.runtime.worker.model_runner`: ``ModelRunner``, one GPU's (or one tensor-parallel rank's) model:
  weights, buffers, the KV cache's tensors; stages, runs and copies out one step at a time. It implements
  :mod:`~fi_engine.runtime.worker.state`'s ``RunnerState``, the interface a model family and the parts reach it by.
- Its parts, each given the runner: :mod:`~fi_engine.runtime.worker.step_io` (``StepIO``: the index arrays in, the
  tokens out, the step views), :mod:`~fi_engine.runtime.worker.step_graphs` (``StepGraphs``: the decode and padded
  prefill CUDA graphs), :mod:`~fi_engine.runtime.worker.fused_decode` (``FusedDecode``: the fused eager decode step);
  and the sampler (:mod:`fi_engine.runtime.sample`).
- :mod:`~fi_engine.runtime.worker.graph_shapes`: the shapes its CUDA graphs are captured at (the decode batch ladder,
  the prefill token buckets and request slots).
"""

__all__: list[str] = []

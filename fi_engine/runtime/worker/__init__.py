"""The model on the GPU, run step by step: the model runner and the parts it holds.

- :mod:`~fi_engine.runtime.worker.graph_shapes`: the shapes its CUDA graphs are captured at (the decode batch ladder,
  the prefill token buckets and request slots).
"""

__all__: list[str] = []

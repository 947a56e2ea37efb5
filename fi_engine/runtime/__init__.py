"""The engine that runs a model: sizes and buffers made once, the scheduler and pages of the paged KV cache, each
step's plan, launch (eager or a CUDA graph) and sampling, and the step API the servers drive.

- :mod:`~fi_engine.runtime.engine`: ``Engine``, assembled from the parts below (scheduler, model runner, sampler,
  family) around :mod:`~fi_engine.runtime.serving`'s loop (``generate``, the step API): schedule -> run -> sample ->
  record; :mod:`~fi_engine.runtime.family`: the interface a model family implements (its config, weights, layer
  body and attention plans).
- :mod:`~fi_engine.runtime.sched`: the host side of serving (requests, the scheduler, the page allocator and the
  prefix cache, the index arrays the attention plans take).
- :mod:`~fi_engine.runtime.model_runner`: ``ModelRunner``, the model on the GPU, made of
  :mod:`~fi_engine.runtime.storage` (the device buffers, KV cache and step views),
  :mod:`~fi_engine.runtime.step_graphs` (the decode and padded prefill CUDA graphs) and
  :mod:`~fi_engine.runtime.fused_decode` (the fused eager decode step) over :mod:`~fi_engine.runtime.state` (what
  they share, and the family interface); :mod:`~fi_engine.runtime.moe_paths`: which MoE path a step takes;
  :mod:`~fi_engine.runtime.sample.sampler`: the ``Sampler`` (greedy, top-k / top-p).
- :mod:`~fi_engine.runtime.sampling_params`: a request's sampling settings; :mod:`~fi_engine.runtime.settings`: the
  engine's settings, checked once; :mod:`~fi_engine.runtime.stepping`: the step protocol (``StepEngine``,
  ``StepOutput``) between an engine and what drives it.
"""

__all__: list[str] = []

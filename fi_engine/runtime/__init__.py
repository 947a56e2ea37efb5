"""The engine that runs a model, for every family: rooms by concern (docs/engine.md draws them), from the ground up.

- :mod:`~fi_engine.runtime.sampling_params`: a request's sampling settings (a value);
  :mod:`~fi_engine.runtime.stepping`: the step protocol (``StepEngine``, ``StepOutput``) between an engine and what
  drives it; :mod:`~fi_engine.runtime.family`: the interface a model family implements (its config, weights, layer
  body and attention plans); :mod:`~fi_engine.runtime.settings`: the engine's settings, checked once.
- :mod:`~fi_engine.runtime.sched`: requests in, batches out, on the host: the request, the scheduler, the KV cache's
  pages and prefix cache, a step's index arrays.
- :mod:`~fi_engine.runtime.sample`: from logits to tokens: the sampler, the logits processing, speculative decoding.
- :mod:`~fi_engine.runtime.worker`: the model on the GPU: the model runner and its parts (the step's host-device
  traffic, the CUDA graphs, the fused decode step).
- :mod:`~fi_engine.runtime.serving`: ``ServingLoop``, the loop over those rooms (``generate``, the step API), each
  step one way: schedule -> run -> sample -> record; :mod:`~fi_engine.runtime.engine`: ``Engine``, the parts
  assembled around the loop.
"""

__all__: list[str] = []

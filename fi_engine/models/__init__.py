"""The model families, one module each, and the registry that picks one by ``model_type``.

- :mod:`~fi_engine.models.llama`: Llama, Qwen3, Mixtral, Qwen3-MoE (the Llama pass);
  :mod:`~fi_engine.models.gemma2`, :mod:`~fi_engine.models.gpt_oss`, :mod:`~fi_engine.models.deepseek`
  (DeepSeek-V2/V3, with :mod:`~fi_engine.models.mla_weights`: MLA weight absorption).
- :mod:`~fi_engine.models.weights`: checkpoint tensors onto the GPU.
- :mod:`~fi_engine.models.registry`: one row per family (its model types, module and engine class): which engine
  serves a checkpoint, and ``open_engine``. docs/ADDING_A_MODEL.md: adding a family.
"""

__all__: list[str] = []

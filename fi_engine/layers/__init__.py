"""The model's building blocks above the kernels: the mixture-of-experts layer and its routing, tensor parallelism,
the FP8 KV cache.

- :mod:`~fi_engine.layers.moe`: the MoE MLP layer (grouped GEMMs, a host-routed and a fixed-capacity device path)
  and the activation buffers its layers share; :mod:`~fi_engine.layers.moe_routing`: softmax + top-k and grouping
  by expert (numpy); :mod:`~fi_engine.layers.deepseek_routing`: DeepSeek's group-limited routing.
- :mod:`~fi_engine.layers.tensor_parallel`: what each rank of a tensor-parallel engine holds, and its all-reduce.
- :mod:`~fi_engine.layers.kv_fp8`: the float8 e4m3 KV cache (its scales and append kernel).
"""

__all__: list[str] = []

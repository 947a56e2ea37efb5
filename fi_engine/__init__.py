"""fi_engine: a small serving engine for Llama-architecture models (Llama, Qwen3, Mixtral, Qwen3-MoE), Gemma 2,
gpt-oss and DeepSeek-V3/V2, built on fi_ffi, without torch.

It loads a Hugging Face checkpoint (safetensors, float16/bfloat16, FP8) onto one GPU or a tensor-parallel group, and
serves token-id prompts: paged KV cache, batched prefill and decode, CUDA graphs, sampling; over HTTP with an
OpenAI-compatible server. Its command is ``fi-engine`` (``generate``, ``serve``; ``python -m fi_engine``). Needs
CuPy and cuBLAS 13 (the ``engine`` extra: ``python -m pip install '.[engine]'`` in the checkout).

A package of its own beside the binding, in the same distribution: it uses fi_ffi's public API only, through
:mod:`fi_engine.kernels` (and :mod:`~fi_engine.moved`, which gives fi_ffi's moved-module finder the engine's old
paths), and fi_ffi never imports it (both checked by tests/package/test_structure.py). Its
subpackages, one concern each, from the ground up (each imports only those below it; docs/engine.md draws them):

- :mod:`~fi_engine.values`: checks of single argument values that every floor shares.
- :mod:`fi_engine.checkpoint`: ``config.json`` per family, quantization configs, safetensors (host only);
  :mod:`fi_engine.text`: tokenizer, chat template, generation config, detokenization (host only).
- :mod:`fi_engine.kernels`: what runs on the GPU: the adapter over fi_ffi, cuBLAS/cuBLASLt, the engine's own CUDA
  kernels, CUDA graphs.
- :mod:`fi_engine.layers`: mixture-of-experts and routing, tensor parallelism, the FP8 KV cache.
- :mod:`fi_engine.runtime`: the engine: scheduler and pages, buffers, the serving loop, graphs, sampling, the
  step API, and the interface a model family implements.
- :mod:`fi_engine.models`: the families (one module each) and their registry;
  :mod:`fi_engine.serve`: the streaming service, the OpenAI server, the engine process and its front ends.
- :mod:`~fi_engine.cli`: the ``fi-engine`` command.

The flat module paths of earlier releases (``fi_engine.llama``, ``fi_engine.paging``, ...) still import, with a
DeprecationWarning, for one release (:mod:`~fi_engine.moved`).
"""

from . import moved

moved.install()

"""fi_engine: a small serving engine for Llama-architecture models (Llama, Qwen3, Mixtral, Qwen3-MoE), Gemma 2,
gpt-oss and DeepSeek-V3/V2, built on fi_ffi, without torch.

It loads a Hugging Face checkpoint (safetensors, float16/bfloat16) onto one GPU or a tensor-parallel group, and
serves token-id prompts: paged KV cache, batched prefill and decode, CUDA graphs, sampling. Its command is
``fi-engine generate`` (``python -m fi_engine``; ``fi-ffi generate`` runs it). Needs CuPy and cuBLAS 13 (the
``engine`` extra: ``python -m pip install '.[engine]'`` in the checkout).

A package of its own beside the binding, in the same distribution: it uses fi_ffi through fi_ffi's public API only
(``fi_ffi.__all__`` and the ``__all__`` of ``fi_ffi.errors``, ``fi_ffi.dtypes``, ``fi_ffi.loader``, ``fi_ffi.comm``,
``fi_ffi.cuda``, ``fi_ffi.cdecl``), and fi_ffi never imports it (both checked by tests/package/test_structure.py).
What it owns beyond fi_ffi's ops: its cuBLAS/cuBLASLt bindings (the libraries found by
:func:`fi_ffi.loader.nvidia_library`, the one finder for the repository; failures are
:class:`fi_ffi.errors.CublasError`), its CUDA sources, graph capture, serving and ``generate``. Modules, one concept
each:

- :mod:`~fi_engine.config`: ``config.json`` of a Hugging Face Llama checkpoint, parsed and checked.
- :mod:`~fi_engine.checkpoint`: ``*.safetensors`` read (and written, for tests) with numpy only.
- :mod:`~fi_engine.paging`: the host side of serving: page allocator, requests, batching, padding and the
  index arrays the attention plans take. Pure Python + numpy; no GPU.
- :mod:`~fi_engine.kernels`: every fi_ffi op the engine calls, in one adapter.
- :mod:`~fi_engine.cublas`: cuBLAS (libcublas) through cffi in ABI mode: a handle, its stream and workspace,
  ``cublasGemmEx`` (and its strided batched form). Loaded on first use; :mod:`~fi_engine.cublas_lt`: cuBLASLt
  matmuls with the algorithm chosen once per shape.
- :mod:`~fi_engine.dense`: the dense GEMMs (on that handle), the engine's own GEMV (plain, or fused with
  the decode step's norms, SiLU, RoPE and KV append) and small kernels (row gather, argmax), checked and launched;
  :mod:`~fi_engine.cuda_sources`: their CUDA C.
- :mod:`~fi_engine.graph`: CUDA graph capture and replay with cuda-python.
- :mod:`~fi_engine.moe_routing`: mixture-of-experts softmax + top-k and grouping by expert, in numpy.
- :mod:`~fi_engine.moe`: the MoE MLP layer (grouped GEMMs, a host-routed and a fixed-capacity device path) and
  the activation buffers its layers share.
- :mod:`~fi_engine.tensor_parallel`: what each rank of a tensor-parallel engine holds, and its all-reduce.
- :mod:`~fi_engine.engine`: the engine of every family, the union of its parts: :mod:`~fi_engine.storage`
  (buffers, KV cache, step arrays and views), :mod:`~fi_engine.serving` (the serving loop and scheduler),
  :mod:`~fi_engine.step_graphs` (decode and padded prefill CUDA graphs), :mod:`~fi_engine.fused_decode` (the fused
  eager decode step), :mod:`~fi_engine.sampling` (greedy, top-k / top-p); :mod:`~fi_engine.state` declares what
  they share.
- :mod:`~fi_engine.family`: a model family as a definition the engine holds (config checks, weights, layer body,
  attention plans); :mod:`~fi_engine.llama`: the Llama family's (Llama, Qwen3, Mixtral, Qwen3-MoE) and
  ``LlamaEngine``.
- :mod:`~fi_engine.deepseek_config`, :mod:`~fi_engine.deepseek_routing`, :mod:`~fi_engine.mla_weights`:
  DeepSeek-V2/V3's config, group-limited expert routing (numpy) and MLA weight absorption (numpy);
  :mod:`~fi_engine.deepseek`: its definition (an MLA + MoE layer body) and engine.
- :mod:`~fi_engine.family_configs`: Gemma 2's and gpt-oss's own settings (windows, soft caps, YaRN, refusals).
- :mod:`~fi_engine.weights`: checkpoint tensors onto the GPU for the family engines.
- :mod:`~fi_engine.gemma2`, :mod:`~fi_engine.gpt_oss`: those families' definitions (their weights, forward and
  attention plans) and engines.
- :mod:`~fi_engine.engines`: which engine serves a checkpoint, by ``model_type``.
- :mod:`~fi_engine.quantization`: a checkpoint's ``quantization_config`` read by name (the FP8 layouts served,
  the rest refused); :mod:`~fi_engine.fp8_weights`: e4m3 codes and a projection's e4m3 weight and scales read
  from a checkpoint (host side); :mod:`~fi_engine.fp8_linear`: those weights in ``Dense``'s GEMMs (the W8A16 GEMV,
  dequantization for many rows).
- :mod:`~fi_engine.moe_gemv`: the MoE decode step's grouped GEMV (CUDA C and its launcher);
  :mod:`~fi_engine.moe_paths`: which path (routed or dense over the experts) an engine's MoE layers take per step.
- :mod:`~fi_engine.stepping`: the step-by-step serving interface (``StepEngine``, ``StepOutput``) between an
  engine and the streaming service / HTTP server that drive it.
- Serving many callers (docs/engine-text.md): :mod:`~fi_engine.service` (``GenerationService``: one engine
  thread, streams of tokens and text, cancellation, the queue limit), :mod:`~fi_engine.metrics` (counters and
  latency histograms in Prometheus text), :mod:`~fi_engine.openai_protocol` (OpenAI request bodies checked,
  responses built) and :mod:`~fi_engine.openai_server` (the Starlette app and ``fi-engine serve``'s uvicorn run;
  the ``serve`` extra, imported on first use); :mod:`~fi_engine.engine_process` (the engine stepped in a child
  process, so the server's event loop and the engine do not share one interpreter). Several API-server processes
  in front of that one engine (``--api-servers N``): :mod:`~fi_engine.engine_client` (a front end's connection to
  the engine process), :mod:`~fi_engine.shared_queue` (the queue limit over all of them; the metrics are summed
  over them too) and :mod:`~fi_engine.api_servers` (the processes started, watched and stopped).
- :mod:`~fi_engine.values`: checks of single argument values (ints, flags, arrays) the modules share.
- :mod:`~fi_engine.cli`: the ``fi-engine`` command (``generate``, ``serve``).
- Text in and out (docs/engine-text.md): :mod:`~fi_engine.text` (``TextCodec``, the facade), :mod:`~fi_engine.tokenizer`
  (``tokenizer.json`` and the special tokens), :mod:`~fi_engine.chat` (the chat template, rendered as transformers
  renders it), :mod:`~fi_engine.generation_config` (EOS ids, sampling defaults), :mod:`~fi_engine.detokenize`
  (incremental detokenization, stop strings); :mod:`~fi_engine.model_files` (the checkpoint's small files read with
  clear errors), :mod:`~fi_engine.optional` (``tokenizers`` / ``jinja2`` imported on first use),
  :mod:`~fi_engine.text_args` (their argument checks).
"""

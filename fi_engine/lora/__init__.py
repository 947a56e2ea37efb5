"""LoRA adapters chosen per request: many fine-tunes of one base model served in one batch.

- :mod:`~fi_engine.lora.settings`: :class:`~fi_engine.lora.settings.LoraSettings` (``max_loras``, ``max_cpu_loras``,
  ``max_lora_rank``, the adapters loaded at start), the engine's ``lora`` argument.
- :mod:`~fi_engine.lora.adapter`: a PEFT adapter folder read and checked against the base model (every refusal
  names its key or tensor).
- :mod:`~fi_engine.lora.slots`: the GPU slots' layout (A and B of every projection group and layer, padded to
  ``max_lora_rank``), an adapter packed into it, and the slot table (which adapter where, least recently used out).
- :mod:`~fi_engine.lora.manager`: the adapters an engine serves: names, the host's packed copies, swap-in.
- :mod:`~fi_engine.lora.batch`: a step's row-to-slot array and segments, on the host.
- :mod:`~fi_engine.lora.device`: the slots on the GPU and the per-projection launches
  (:mod:`fi_engine.kernels.lora_bgmv`).
- :mod:`~fi_engine.lora.segment_form`: a prefill's shrink and expand as FlashInfer's segment GEMMs (tensor cores),
  the choice :attr:`~fi_engine.lora.device.DeviceSlots.prefill_segment_gemm`.
"""

__all__: list[str] = []

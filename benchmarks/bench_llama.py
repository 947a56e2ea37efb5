"""Llama decode throughput: fi_ffi's engine (no torch: fi_ffi ops, cuBLAS via CuPy) against the same model written
with flashinfer-python 0.6.3 + torch (same weights, same FlashInfer kernels, torch GEMMs), eager and CUDA graph,
batch 1 and 32.

Both implementations share the host-side serving logic (:mod:`fi_engine.runtime.sched`: pages, slots, padding, the
index arrays) and the same loop: per step, one packed host-to-device copy of the index arrays, one decode plan,
the forward pass (or one graph replay), greedy argmax, one device-to-host copy of the tokens and a stream
synchronization. So the difference is the binding layer and the GEMM library.

Columns: tokens/s (generated tokens per second of decode wall time), host us/step (median host time per step,
GPU waits excluded), GPU us/step (one captured decode step replayed back to back, timed with CUDA events; the
eager rows run the same kernels). Prompts: ``--prompt-len`` random tokens each; ``--new-tokens`` per request.

Model: ``--model DIR`` (a Llama checkpoint), or a random checkpoint of ``--preset`` (``1b``: Llama-3.2-1B's shape,
16 layers, hidden 2048, 32/8 heads, head_dim 64, vocab 128256, tied, Llama 3.1 RoPE; ``small``: the GPU test's).

flashinfer-python finds prebuilt modules only in the ``flashinfer_jit_cache`` package; the extension wheel's
modules (rope, activation) are made visible by pointing ``flashinfer_jit_cache.get_jit_cache_dir`` at a folder
of links to both wheels' modules (nothing is compiled). A contender that cannot run prints "unavailable".

Run on the GPU machine from the project root (staged as in benchmarks/README.md, plus flashinfer-python)::

    bash tools/gpu_run.sh python3 benchmarks/bench_llama.py [--preset 1b] [--json PATH]

Goals: eager host time per step <= 0.6x flashinfer + torch at batch 1; graph tokens/s within 3 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

PRESETS = {
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "small": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
}


def make_checkpoint(preset: str, folder: Path) -> Path:
    """A random float16 Llama checkpoint (config.json + model.safetensors) written with numpy."""
    from fi_engine.checkpoint.safetensors import write_safetensors

    cfg = {
        "model_type": "llama",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "eos_token_id": 2,
        **PRESETS[preset],
    }
    rng = np.random.default_rng(0)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    hq, hk = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(cfg["vocab_size"], h), "model.norm.weight": np.ones(h, np.float16)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": w(hq * d, h),
                p + "self_attn.k_proj.weight": w(hk * d, h),
                p + "self_attn.v_proj.weight": w(hk * d, h),
                p + "self_attn.o_proj.weight": w(h, hq * d),
                p + "mlp.gate_proj.weight": w(i, h),
                p + "mlp.up_proj.weight": w(i, h),
                p + "mlp.down_proj.weight": w(h, i),
                p + "input_layernorm.weight": np.ones(h, np.float16),
                p + "post_attention_layernorm.weight": np.ones(h, np.float16),
            }
        )
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ---------------------------------------------------------------------------------------------- fi_ffi


def run_fi_ffi(model: Path, prompts: list[list[int]], new: int, graph: bool, seq: int) -> dict[str, Any]:
    import cupy as cp

    from fi_engine.models.llama import LlamaEngine

    with LlamaEngine(model, max_batch=len(prompts), cuda_graph=graph, max_seq_len=seq) as engine:
        engine.generate(prompts, 8, eos_token_ids=())  # warm-up: modules, kernels, GEMM heuristics
        r = engine.generate(prompts, new, eos_token_ids=())
        out = {"tokens_per_s": r.tokens_per_s, "host_us": r.host_us_per_step, "tokens": r.tokens}
        if graph:  # GPU time of one step: the graph the last step's plan replays, back to back
            with cp.cuda.Device(engine.device), engine.stream:
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                step_graph = engine.runner.step_graphs.planned_graph(len(prompts))  # (by its attention kernel)
                step_graph.launch()
                e0.record(engine.stream)
                for _ in range(50):
                    step_graph.launch()
                e1.record(engine.stream)
                e1.synchronize()
                out["gpu_us"] = cp.cuda.get_elapsed_time(e0, e1) * 1e3 / 50
    return out


# ---------------------------------------------------------------------------------------------- flashinfer + torch


def expose_extension_modules() -> None:
    """Make flashinfer-python see the extension wheel's prebuilt modules next to the core wheel's."""
    import flashinfer_jit_cache

    roots = [Path(flashinfer_jit_cache.get_jit_cache_dir())]
    try:
        import flashinfer_jit_cache_ext

        roots.append(Path(flashinfer_jit_cache_ext.__file__).parent / "jit_cache")
    except ImportError:
        return
    merged = Path(tempfile.mkdtemp(prefix="fi_jit_cache_"))
    for root in roots:
        for module in root.iterdir():
            if not (merged / module.name).exists():
                (merged / module.name).symlink_to(module)
    flashinfer_jit_cache.get_jit_cache_dir = lambda: str(merged)


class TorchLlama:
    """The same Llama with torch tensors, torch GEMMs and flashinfer-python's ops and wrappers."""

    def __init__(self, model: Path, max_batch: int, graph: bool, seq: int) -> None:
        import torch
        from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper
        from flashinfer.prefill import BatchPrefillWithPagedKVCacheWrapper

        from fi_engine.checkpoint.config import LlamaConfig
        from fi_engine.checkpoint.safetensors import Checkpoint
        from fi_engine.runtime.sched.pages import pages_for
        from fi_engine.runtime.sched.step_arrays import decode_layout, prefill_layout

        self.torch = torch
        c = self.c = LlamaConfig.from_dir(model)
        ck = Checkpoint(model)
        dev = self.dev = torch.device("cuda")

        def get(name: str) -> Any:
            t = torch.from_numpy(np.array(ck.array(name))).to(dev)
            return t.view(torch.bfloat16) if ck.info(name).dtype == "bfloat16" else t  # stored as uint16 bits

        self.embed = get("model.embed_tokens.weight")
        self.lm_head = self.embed if c.tie_word_embeddings else get("lm_head.weight")
        self.layers = []
        for n in range(c.num_layers):
            p = f"model.layers.{n}."
            self.layers.append(
                dict(
                    qkv=torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
                    o=get(p + "self_attn.o_proj.weight"),
                    gu=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
                    down=get(p + "mlp.down_proj.weight"),
                    ln1=get(p + "input_layernorm.weight"),
                    ln2=get(p + "post_attention_layernorm.weight"),
                )
            )
        self.norm = get("model.norm.weight")
        self.page_size, self.max_batch, self.graph = 16, max_batch, graph
        self.num_pages = max_batch * pages_for(seq, 16) + 1
        self.seq = seq
        self.kv = torch.zeros(
            c.num_layers, 2, self.num_pages, 16, c.num_kv_heads, c.head_dim, dtype=self.embed.dtype, device=dev
        )
        max_pages = self.num_pages + max_batch
        self.dl, self.pl = decode_layout(max_batch, max_pages), prefill_layout(seq, max_batch, max_pages)
        self.dhost = torch.zeros(self.dl.total, dtype=torch.int32, pin_memory=True)
        self.phost = torch.zeros(self.pl.total, dtype=torch.int32, pin_memory=True)
        self.ddev = torch.zeros(self.dl.total, dtype=torch.int32, device=dev)
        self.pdev = torch.zeros(self.pl.total, dtype=torch.int32, device=dev)
        self.dv, self.pv = self.dl.views(self.dhost.numpy()), self.pl.views(self.phost.numpy())
        self.ids_host = torch.zeros(max_batch, dtype=torch.int32, pin_memory=True)

        def region(t: Any, layout: Any, name: str, n: int) -> Any:
            return t[layout.offsets[name] : layout.offsets[name] + n]

        self.region = region
        b = max_batch
        self.d_indptr = region(self.ddev, self.dl, "kv_indptr", b + 1)
        self.d_indices = region(self.ddev, self.dl, "kv_indices", max_pages)
        self.d_last = region(self.ddev, self.dl, "kv_last_page_len", b)
        ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
        self.decode = BatchDecodeWithPagedKVCacheWrapper(
            ws,
            "NHD",
            use_cuda_graph=graph,
            paged_kv_indptr_buffer=self.d_indptr if graph else None,
            paged_kv_indices_buffer=self.d_indices if graph else None,
            paged_kv_last_page_len_buffer=self.d_last if graph else None,
        )
        self.prefill = BatchPrefillWithPagedKVCacheWrapper(
            torch.zeros(128 << 20, dtype=torch.uint8, device=dev), "NHD", backend="fa3" if c.head_dim == 128 else "fa2"
        )
        self.stream = torch.cuda.Stream()
        self.cuda_graph = None

    def forward(self, ids: Any, pos: Any, bidx: Any, indices: Any, indptr: Any, last: Any, attend: Any) -> Any:
        import flashinfer.activation as fact
        import flashinfer.norm as fnorm
        import flashinfer.page as fpage
        import flashinfer.rope as frope

        torch, c = self.torch, self.c
        hq, hk, d = c.num_qo_heads, c.num_kv_heads, c.head_dim
        h = self.embed[ids.long()]
        x = fnorm.rmsnorm(h, self.layers[0]["ln1"], c.rms_norm_eps, enable_pdl=False)
        for n, w in enumerate(self.layers):
            qkv = torch.matmul(x, w["qkv"].t())
            q = qkv[:, : hq * d].view(-1, hq, d)
            k = qkv[:, hq * d : (hq + hk) * d].view(-1, hk, d)
            v = qkv[:, (hq + hk) * d :].view(-1, hk, d)
            r = c.rope
            if r.llama3:
                frope.apply_llama31_rope_pos_ids_inplace(
                    q,
                    k,
                    pos,
                    rope_scale=r.factor,
                    rope_theta=r.theta,
                    low_freq_factor=r.low_freq_factor,
                    high_freq_factor=r.high_freq_factor,
                    old_context_len=int(r.original_max_position_embeddings),
                )
            else:
                frope.apply_rope_pos_ids_inplace(q, k, pos, rope_theta=r.theta)
            cache = (self.kv[n, 0], self.kv[n, 1])
            fpage.append_paged_kv_cache(k, v, bidx, pos, cache, indices, indptr, last, kv_layout="NHD")
            o = attend(q, cache)
            x = torch.matmul(o.view(-1, hq * d), w["o"].t())
            fnorm.fused_add_rmsnorm(x, h, w["ln2"], c.rms_norm_eps, enable_pdl=False)
            act = fact.silu_and_mul(torch.matmul(x, w["gu"].t()), enable_pdl=False)
            x = torch.matmul(act, w["down"].t())
            nxt = self.layers[n + 1]["ln1"] if n + 1 < c.num_layers else self.norm
            fnorm.fused_add_rmsnorm(x, h, nxt, c.rms_norm_eps, enable_pdl=False)
        return x

    def decode_body(self, rows: int) -> Any:
        torch, dl, dd = self.torch, self.dl, self.ddev
        ids = self.region(dd, dl, "token_ids", rows)
        pos = self.region(dd, dl, "positions", rows)
        bidx = self.region(dd, dl, "batch_indices", rows)
        x = self.forward(
            ids,
            pos,
            bidx,
            self.d_indices,
            self.region(dd, dl, "kv_indptr", rows + 1),
            self.region(dd, dl, "kv_last_page_len", rows),
            lambda q, cache: self.decode.run(q, cache, enable_pdl=False),
        )
        return torch.argmax(torch.matmul(x, self.lm_head.t()).float(), dim=-1).to(torch.int32)

    def plan_decode(self, rows: int, n_pages: int) -> None:
        c, dl = self.c, self.dl
        end = dl.end("kv_indices", n_pages)
        self.ddev[:end].copy_(self.dhost[:end], non_blocking=True)
        self.decode.plan(
            self.region(self.dhost, dl, "kv_indptr", rows + 1),
            self.region(self.dhost, dl, "kv_indices", n_pages),
            self.region(self.dhost, dl, "kv_last_page_len", rows),
            c.num_qo_heads,
            c.num_kv_heads,
            c.head_dim,
            self.page_size,
            q_data_type=self.embed.dtype,
        )

    def capture(self) -> None:
        from fi_engine.runtime.sched.step_arrays import fill_decode

        torch = self.torch
        with torch.cuda.stream(self.stream):
            n = fill_decode([None] * self.max_batch, self.page_size, self.dv)
            self.plan_decode(self.max_batch, n)
            self.decode_body(self.max_batch)
            torch.cuda.synchronize()
            self.cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.cuda_graph, stream=self.stream):
                self.graph_out = self.decode_body(self.max_batch)

    def generate(self, prompts: list[list[int]], new: int) -> dict[str, Any]:
        from fi_engine.runtime.sched.pages import PageAllocator
        from fi_engine.runtime.sched.scheduler import Scheduler
        from fi_engine.runtime.sched.step_arrays import fill_decode, fill_prefill

        torch, c = self.torch, self.c
        s = Scheduler(PageAllocator(self.num_pages), 16, self.max_batch, self.seq, self.seq, c.vocab_size, ())
        reqs = [s.submit(p, new) for p in prompts]
        host_us, decode_s = [], 0.0
        with torch.cuda.stream(self.stream):
            while s.has_work:
                admitted = s.admit()
                if admitted:
                    nnz, n_pages = fill_prefill(admitted, 16, self.pv)
                    b, pl, pd, ph = len(admitted), self.pl, self.pdev, self.phost
                    end = pl.end("kv_indices", n_pages)
                    pd[:end].copy_(ph[:end], non_blocking=True)
                    self.prefill.plan(
                        self.region(ph, pl, "qo_indptr", b + 1),
                        self.region(ph, pl, "kv_indptr", b + 1),
                        self.region(ph, pl, "kv_indices", n_pages),
                        self.region(ph, pl, "kv_last_page_len", b),
                        c.num_qo_heads,
                        c.num_kv_heads,
                        c.head_dim,
                        16,
                        causal=True,
                        q_data_type=self.embed.dtype,
                    )
                    x = self.forward(
                        self.region(pd, pl, "token_ids", nnz),
                        self.region(pd, pl, "positions", nnz),
                        self.region(pd, pl, "batch_indices", nnz),
                        self.region(pd, pl, "kv_indices", n_pages),
                        self.region(pd, pl, "kv_indptr", b + 1),
                        self.region(pd, pl, "kv_last_page_len", b),
                        lambda q, cache: self.prefill.run(q, cache, enable_pdl=False),
                    )
                    last = self.region(pd, pl, "last_rows", b).long()
                    tok = torch.argmax(torch.matmul(x[last], self.lm_head.t()).float(), dim=-1)
                    s.record(admitted, tok.cpu().tolist(), prefill=True)
                if not s.active:
                    continue
                t0 = time.perf_counter()
                rows = s.decode_rows(padded=self.cuda_graph is not None)
                n = len(rows)
                self.plan_decode(n, fill_decode(rows, 16, self.dv))
                if self.cuda_graph is not None:
                    self.cuda_graph.replay()
                    out = self.graph_out
                else:
                    out = self.decode_body(n)
                self.ids_host[:n].copy_(out[:n], non_blocking=True)
                t1 = time.perf_counter()
                self.stream.synchronize()
                t2 = time.perf_counter()
                s.record(rows, self.ids_host[:n].tolist())
                t3 = time.perf_counter()
                host_us.append((t1 - t0 + t3 - t2) * 1e6)
                decode_s += t3 - t0
        tokens = sum(len(r.output) - 1 for r in reqs)
        return {
            "tokens_per_s": tokens / decode_s,
            "host_us": float(np.median(host_us)),
            "tokens": [r.output for r in reqs],
        }

    def gpu_us(self) -> float:
        torch = self.torch
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            self.cuda_graph.replay()
            e0.record()
            for _ in range(50):
                self.cuda_graph.replay()
            e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) * 1e3 / 50


def run_torch(model: Path, prompts: list[list[int]], new: int, graph: bool, seq: int) -> dict[str, Any]:
    m = TorchLlama(model, len(prompts), graph, seq)
    if graph:
        m.capture()
    m.generate(prompts, 8)
    out = m.generate(prompts, new)
    if graph:
        out["gpu_us"] = m.gpu_us()
    return out


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a Llama checkpoint directory (default: a random --preset one)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_llama_")
        t = time.perf_counter()
        model = make_checkpoint(args.preset, Path(tmp.name))
        print(f"random {args.preset} checkpoint written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    try:
        expose_extension_modules()
    except Exception as exc:  # the peer is optional
        print(f"flashinfer_jit_cache unavailable: {exc}", file=sys.stderr)
    seq = args.prompt_len + args.new_tokens + 16
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [rng.integers(3, 32000, size=args.prompt_len).tolist() for _ in range(batch)]
        for graph in (False, True):
            for name, fn in (("fi_ffi (CuPy/cuBLAS)", run_fi_ffi), ("flashinfer + torch", run_torch)):
                row: dict[str, Any] = {"impl": name, "batch": batch, "mode": "graph" if graph else "eager"}
                try:
                    row.update(fn(model, prompts, args.new_tokens, graph, seq))
                except Exception:  # report it and go on with the other contenders
                    traceback.print_exc(limit=4)
                    row["error"] = "unavailable"
                rows.append(row)
    print("| batch | mode | implementation | tokens/s | host us/step | GPU us/step | ratio vs flashinfer+torch |")
    print("|---:|---|---|---:|---:|---:|---|")
    for r in rows:
        peer = next(
            (
                p
                for p in rows
                if p["impl"] == "flashinfer + torch"
                and p["batch"] == r["batch"]
                and p["mode"] == r["mode"]
                and "error" not in p
            ),
            None,
        )
        if "error" in r:
            print(f"| {r['batch']} | {r['mode']} | {r['impl']} | unavailable | | | |")
            continue
        ratio = ""
        if peer is not None and peer is not r:
            ratio = (
                f"host {r['host_us'] / peer['host_us']:.2f}x, tokens/s {r['tokens_per_s'] / peer['tokens_per_s']:.3f}x"
            )
            r["same_tokens_as_peer"] = r["tokens"] == peer["tokens"]
        gpu = f"{r['gpu_us']:.1f}" if "gpu_us" in r else "(as graph)"
        print(
            f"| {r['batch']} | {r['mode']} | {r['impl']} | {r['tokens_per_s']:.0f} | {r['host_us']:.0f} | {gpu} | "
            f"{ratio} |"
        )
    same = [r.get("same_tokens_as_peer") for r in rows if "same_tokens_as_peer" in r]
    print(
        f"\nidentical greedy tokens to flashinfer + torch in {sum(map(bool, same))}/{len(same)} configurations "
        f"(near ties may differ: GEMM libraries round differently)"
    )
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "tokens"} for r in rows], indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The binding's per-call goal table in one run: per-call host cost for every producer against the Cython binding and
flashinfer-python, descriptor costs, a decode step, and the engine's eager step and long prefill.

    python benchmarks/bench_goals.py [--before DIR] [--json PATH] [--profile N]

Rows (contenders of one table are timed in interleaved rounds, best round kept; see timing.Report):

1. ``rmsnorm`` 1x128 float16, host us per call: fi_ffi with descriptors / torch tensors / CuPy arrays, tvm_ffi's
   Cython call of the same ``norm.so`` with torch tensors / CuPy arrays, ``flashinfer.norm.rmsnorm``; ratios
   against tvm_ffi with torch tensors;
   the other producers too: a ``__cuda_array_interface__``-only object, JAX arrays as inputs (against tvm_ffi's
   call with the same JAX arrays);
2. ``as_tensor(torch)``, ``as_tensor(CuPy)``, ``Tensor.from_pointer``, us per call (and ``as_tensor`` of a CAI
   object and of a JAX array);
3. a decode step at batch 1 (one plan, then 32 x (append + run); bench_step.py's problem): host us per step for
   descriptors / torch / CuPy against flashinfer-python, as op calls and as a serving loop packs them (``packed``:
   appends and runs packed once, ``fi_ffi.prepare`` / ``prepare_decode_run``, a plan per step);
4. the engine (``fi_engine.LlamaEngine``) on a random SmolLM2-135M-shaped checkpoint (30 layers, 576 wide),
   eager, batch 1: median host us per decode step, and a profile of the eager steps (``--profile N``: the N
   functions of most own time);
5. the same engine prefilling one 2048-token prompt: host share of the wall time (time to issue every kernel,
   up to the one synchronization, over the wall time of the prefill): eagerly; as a bucket's CUDA graph met the
   first time (the capture's cost); a prompt length met the first time in a bucket already captured (1793 to
   2047 tokens: bucket 2048, replayed with padding rows); and the same 2048-token prompt again (a replay).

``--before DIR``: also run this script against the fi_ffi package found in DIR (an older commit's
``git archive <rev> fi_ffi wheels.lock | tar -x -C DIR``: ``fi_ffi/wheels.lock`` links to the top-level file)
in a subprocess, before and after this process's own rounds (``--before-runs 1``: after only), and print both
tables side by side (per metric, the better run of the old package).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from other_producers import CAIObject, jax_arrays  # noqa: E402
from timing import Report  # noqa: E402

SMOLLM2 = dict(  # SmolLM2-135M's shape (random weights)
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)


def load_package(folder: str, name: str = "fi_ffi_before") -> Any:
    """The fi_ffi package found in ``folder`` imported under another name, beside this tree's (its ops import
    each other relatively), so both are timed in one process, interleaved."""
    import importlib.util

    root = Path(folder).resolve() / "fi_ffi"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def rmsnorm_rows(n: int, rounds: int, old: Any = None) -> dict[str, float | None]:
    """``n`` launches per timed loop from an idle GPU (sync before each loop): fewer than the launch queue holds,
    so the loop never waits for the GPU and its time is the host's (with loops of 20,000 launches the queue fills
    and every contender measures the GPU's rate of tiny kernels, about 4.6 us on the H100: bench_floor.py)."""
    import torch

    import fi_ffi
    from fi_ffi import loader
    from fi_ffi.ops import norm

    sync = torch.cuda.synchronize
    x = torch.randn(1, 128, dtype=torch.float16, device="cuda")
    w = torch.randn(128, dtype=torch.float16, device="cuda")
    out = torch.empty_like(x)
    xd, wd, od = (fi_ffi.as_tensor(t) for t in (x, w, out))
    rmsnorm = fi_ffi.rmsnorm
    report = Report(f"rmsnorm 1x128 float16, host us per call ({rounds} rounds of {n} launches)", rounds=rounds)
    # the floor: the module's function called with a frame packed once (no op-layer work at all)
    floor = norm._rmsnorm.launcher.prepare((od, xd, wd, 1e-6, False))
    report.measure("floor: frame packed once", floor, n=n, sync=sync)
    report.measure("fi_ffi, descriptors", lambda: rmsnorm(xd, wd, out=od), n=n, sync=sync)
    report.measure("fi_ffi, torch tensors", lambda: rmsnorm(x, w, out=out), n=n, sync=sync)
    if old is not None:  # the old package, interleaved with this tree's
        xo, wo, oo = (old.as_tensor(t) for t in (x, w, out))
        report.measure("before: fi_ffi, descriptors", lambda: old.rmsnorm(xo, wo, out=oo), n=n, sync=sync)
        report.measure("before: fi_ffi, torch tensors", lambda: old.rmsnorm(x, w, out=out), n=n, sync=sync)
    xc = wc = oc = None
    try:
        import cupy

        xc, wc = cupy.asarray(x), cupy.asarray(w)
        oc = cupy.empty_like(xc)
        report.measure("fi_ffi, CuPy arrays", lambda: rmsnorm(xc, wc, out=oc), n=n, sync=sync)
        if old is not None:
            report.measure("before: fi_ffi, CuPy arrays", lambda: old.rmsnorm(xc, wc, out=oc), n=n, sync=sync)
    except Exception as exc:
        print(f"CuPy unavailable: {exc}")
    if xc is not None:  # CAI: the launcher reads the interface's dict (no descriptor), the driver names the device
        xa, wa, oa = CAIObject(xc), CAIObject(wc), CAIObject(oc)
        report.measure("fi_ffi, CAI objects", lambda: rmsnorm(xa, wa, out=oa), n=n, sync=sync)
    jx = jw = None
    try:  # JAX: inputs only (its arrays are immutable), the output a descriptor; DLPack per call, as tvm_ffi
        jx, jw = jax_arrays(x, w)
        report.measure("fi_ffi, JAX inputs", lambda: rmsnorm(jx, jw, out=od), n=n, sync=sync)
    except Exception as exc:
        print(f"JAX unavailable: {exc}")
    try:
        import tvm_ffi

        f = tvm_ffi.load_module(str(loader.module_path("norm"))).rmsnorm
        report.measure("tvm_ffi, torch tensors", lambda: f(out, x, w, 1e-6, False), n=n, sync=sync)
        if xc is not None:
            report.measure("tvm_ffi, CuPy arrays", lambda: f(oc, xc, wc, 1e-6, False), n=n, sync=sync)
        xt, wt, ot = (tvm_ffi.from_dlpack(t) for t in (x, w, out))
        report.measure("tvm_ffi, its Tensors converted once", lambda: f(ot, xt, wt, 1e-6, False), n=n, sync=sync)
        if jx is not None:
            report.measure("tvm_ffi, JAX inputs", lambda: f(ot, jx, jw, 1e-6, False), n=n, sync=sync)
    except Exception as exc:
        print(f"tvm_ffi unavailable: {exc}")
    try:
        import flashinfer.norm as fnorm

        report.measure("flashinfer-python", lambda: fnorm.rmsnorm(x, w, 1e-6, out=out), n=n, sync=sync)
    except Exception as exc:
        print(f"flashinfer-python unavailable: {exc}")
    report.run()
    sync()
    return report.rows


def as_tensor_rows(n: int, old: Any = None) -> dict[str, float | None]:
    import torch

    import fi_ffi

    x = torch.randn(1, 128, dtype=torch.float16, device="cuda")
    ptr = x.data_ptr()
    report = Report(f"describing one tensor, us per call (n={n})")
    report.measure("as_tensor(torch)", lambda: fi_ffi.as_tensor(x), n=n)
    if old is not None:
        report.measure("before: as_tensor(torch)", lambda: old.as_tensor(x), n=n)
    try:
        import cupy

        xc = cupy.asarray(x)
        report.measure("as_tensor(CuPy)", lambda: fi_ffi.as_tensor(xc), n=n)
        if old is not None:
            report.measure("before: as_tensor(CuPy)", lambda: old.as_tensor(xc), n=n)
        report.measure("  of which CuPy's __dlpack_device__()", xc.__dlpack_device__, n=n)
        xa = CAIObject(xc)
        report.measure("as_tensor(CAI object)", lambda: fi_ffi.as_tensor(xa), n=n)
    except Exception as exc:
        print(f"CuPy unavailable: {exc}")
    try:
        (jx,) = jax_arrays(x)
        report.measure("as_tensor(JAX), ready array", lambda: fi_ffi.as_tensor(jx), n=n // 10)
    except Exception as exc:
        print(f"JAX unavailable: {exc}")
    report.measure("Tensor.from_pointer", lambda: fi_ffi.Tensor.from_pointer(ptr, (1, 128), "float16", 0), n=n)
    if old is not None:
        report.measure("before: Tensor.from_pointer", lambda: old.Tensor.from_pointer(ptr, (1, 128), "float16", 0), n=n)
    report.run()
    return report.rows


def decode_step_rows(steps: int, rounds: int, old: Any = None) -> dict[str, float]:
    import torch
    from bench_step import fi_ffi_step, flashinfer_step, measure, packed_step, problem

    import fi_ffi

    p = problem(torch, 1, [16], 32)
    ws = fi_ffi.Workspace.allocate(0)
    contenders = {"descriptors": fi_ffi_step(fi_ffi, p, ws, fi_ffi.as_tensor)}
    contenders["torch"] = fi_ffi_step(fi_ffi, p, ws, lambda t: t)
    old_ws = None
    if old is not None:
        old_ws = old.Workspace.allocate(0)
        contenders["before: descriptors"] = fi_ffi_step(old, p, old_ws, old.as_tensor)
        contenders["before: torch"] = fi_ffi_step(old, p, old_ws, lambda t: t)
    try:
        import cupy

        contenders["CuPy"] = fi_ffi_step(fi_ffi, p, ws, cupy.asarray)
        if old is not None:
            contenders["before: CuPy"] = fi_ffi_step(old, p, old_ws, cupy.asarray)
    except Exception as exc:
        print(f"CuPy unavailable: {exc}")
    # the serving loop's form: appends and runs packed once (fi_ffi.prepare, prepare_decode_run), a plan per step
    if hasattr(fi_ffi, "prepare_decode_run"):
        contenders["packed descriptors"] = packed_step(fi_ffi, p, ws, fi_ffi.as_tensor)
        contenders["packed torch"] = packed_step(fi_ffi, p, ws, lambda t: t)
        if "CuPy" in contenders:
            contenders["packed CuPy"] = packed_step(fi_ffi, p, ws, cupy.asarray)
    try:
        contenders["flashinfer-python"] = flashinfer_step(torch, p)
    except Exception as exc:
        print(f"flashinfer-python unavailable: {exc}")
    times = measure(contenders, steps, rounds, torch.cuda.synchronize, wall=False)
    ws.close()
    if old_ws is not None:
        old_ws.close()
    return times


def make_checkpoint(folder: Path, shape: dict[str, Any]) -> Path:
    import numpy as np

    from fi_engine.checkpoint.safetensors import write_safetensors

    cfg = {"model_type": "llama", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "eos_token_id": 2, **shape}
    rng = np.random.default_rng(0)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    hq, hk = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def w(*shape: int) -> Any:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(cfg["vocab_size"], h), "model.norm.weight": np.ones(h, np.float16)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, shape in (
            ("self_attn.q_proj", (hq * d, h)),
            ("self_attn.k_proj", (hk * d, h)),
            ("self_attn.v_proj", (hk * d, h)),
            ("self_attn.o_proj", (h, hq * d)),
            ("mlp.gate_proj", (i, h)),
            ("mlp.up_proj", (i, h)),
            ("mlp.down_proj", (h, i)),
        ):
            tensors[p + name + ".weight"] = w(*shape)
        tensors[p + "input_layernorm.weight"] = np.ones(h, np.float16)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(h, np.float16)
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def engine_rows(folder: Path, profile: int, label: list[str]) -> dict[str, Any]:
    import cProfile
    import io
    import pstats

    from fi_engine.models.llama import LlamaEngine

    out: dict[str, Any] = {}
    prompt = [[(7 * k) % 40000 + 3 for k in range(16)]]
    with LlamaEngine(folder, max_batch=1, cuda_graph=False, max_seq_len=4096, max_prefill_tokens=2048) as engine:
        engine.generate(prompt, 8, eos_token_ids=())  # warm-up: modules, kernels, GEMM heuristics
        # the GEMMs through cuBLASLt (algorithms cached per shape) and through cublasGemmEx, interleaved rounds
        dense = engine.runner.dense
        lt, gemv = dense.lt, dense.gemv
        if not gemv:
            print(f"GEMV unavailable: {dense.gemv_error}")
        # "GEMV": norms and SiLU inside the GEMVs where the engine fuses them (fused_decode; an older package
        # has no such switch and runs its separate launches in both GEMV rows)
        # "packed attention runs": the fused step with its attention runs packed too (packed_attention, on by
        # default; an older package has no such switch)
        contenders = {
            "GEMV": (lt, True, True, False),
            "GEMV, packed attention runs": (lt, True, True, True),
            "GEMV, separate norm/SiLU launches": (lt, True, False, False),
            "cuBLASLt": (True, False, False, False),
            "cublasGemmEx": (False, False, False, False),
        }
        contenders = {k: v for k, v in contenders.items() if (lt or not v[0]) and (gemv or not v[1])}
        if not hasattr(type(engine), "packed_attention"):
            del contenders["GEMV, packed attention runs"]
        fused = getattr(engine, "fused_decode", False)
        packed = getattr(engine, "packed_attention", False)
        best: dict[str, float] = {}
        for _ in range(3):
            for name, (use_lt, use_gemv, use_fused, use_packed) in contenders.items():
                dense.lt, dense.gemv, engine.fused_decode = use_lt, use_gemv, use_fused
                engine.packed_attention = use_packed
                us = engine.generate(prompt, 64, eos_token_ids=()).host_us_per_step
                best[name] = min(us, best.get(name, us))
        dense.lt, dense.gemv, engine.fused_decode = lt, gemv, fused
        engine.packed_attention = packed
        # the headline is the engine as configured: the packed attention runs count once they are on by default
        configured = [us for k, us in best.items() if packed or not contenders[k][3]]
        out["engine eager host us per decode step"] = min(configured)
        for name, us in best.items():
            out[f"engine eager host us per decode step, GEMMs by {name}"] = us
        out.update(part_rows(engine))
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            r = engine.generate(prompt, 32, eos_token_ids=())
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(profile)
            out["profile"] = text.getvalue()
            out["profile steps"] = r.decode_steps + 1
        # prefill of 2048 tokens (timed by engine_share around the loop's Passes.prefill): eagerly, then as the CUDA
        # graph of bucket 2048 (captured at its first sight: dropped before each "capture" run), then lengths met
        # the first time in that bucket (padded), then the same 2048 tokens again
        long_prompt = [[(13 * k) % 40000 + 3 for k in range(2048)]]
        engine.prefill_graphs = False
        for _ in range(3):
            label[0] = "eager"
            engine.generate(long_prompt, 1, eos_token_ids=())
        if profile:  # where an eager 2048-token prefill's host time goes
            prof = cProfile.Profile()
            prof.enable()
            engine.generate(long_prompt, 1, eos_token_ids=())
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(profile)
            out["prefill profile"] = text.getvalue()
        engine.prefill_graphs = True
        for _ in range(3):
            drop_prefill_graphs(engine)
            label[0] = "capture"
            engine.generate(long_prompt, 1, eos_token_ids=())
        for n in (2047, 2040, 2001, 1900, 1800):  # each length once: bucket 2048 (1793..2048 rows)
            label[0] = "new length"
            engine.generate([long_prompt[0][:n]], 1, eos_token_ids=())
        for _ in range(3):
            label[0] = "graph"
            engine.generate(long_prompt, 1, eos_token_ids=())
        label[0] = ""
        out["prefill graphs"] = [key[:2] for key in engine.runner.step_graphs.prefill_cache]
        out["prefill graph failures"] = {str(k): why for k, why in engine.prefill_graph_failures.items()}
    return out


def drop_prefill_graphs(engine: Any) -> None:
    """Close the engine's prefill graphs (after the stream's work), so the next prefill captures its bucket again."""
    engine.stream.synchronize()
    for graph in engine.runner.step_graphs.prefill_cache.values():
        graph.close()
    engine.runner.step_graphs.prefill_cache.clear()


def part_rows(engine: Any, n: int = 200) -> dict[str, float]:
    """Host us per call of each launch of the eager decode step at one row (the engine's own buffers, views and
    plan, inside the engine's stream scope as generate runs them): the four GEMMs through cuBLASLt and through
    cublasGemmEx, the FlashInfer launches, and a CuPy RawKernel launch (the embedding gather) for scale.
    ``n`` calls per round stay below the launch queue's depth, so a round times the host alone."""
    from fi_engine.kernels import flashinfer as kernels
    from fi_ffi import stream_scope

    c, b, d, s = engine.config, engine.runner.buffers, engine.runner.dense, engine.runner.stream_ptr
    h, inter, w = c.hidden_size, c.intermediate_size, engine.runner.qkv_width
    hqd = c.num_qo_heads * c.head_dim
    ab = engine.runner.gemm_type
    v = engine.runner.view("decode", 1, 1)
    shapes = {
        "qkv": (b.x.data.ptr, h, engine.runner.wqkv[0], w, h, b.qkv.data.ptr, w),
        "o": (b.attn.data.ptr, hqd, engine.runner.wo[0], h, hqd, b.x.data.ptr, h),
        "gate_up": (b.x.data.ptr, h, engine.runner.wgu[0], 2 * inter, h, b.gu.data.ptr, 2 * inter),
        "down": (b.act.data.ptr, inter, engine.runner.wd[0], h, inter, b.x.data.ptr, h),
    }
    report = Report(f"eager decode step parts at 1 row, host us per call (n={n})")
    sync = engine.stream.synchronize

    def gemm(lt: bool, args: tuple[int, ...], gemv: bool = False) -> Any:
        def run() -> None:
            d.lt, d.gemv = lt, gemv
            d.linear(1, *args, ab, ab)

        return run

    gemv = d.gemv

    eps = c.rms_norm_eps
    norm = kernels.prepared_fused_add_rmsnorm(v.x, v.h, engine.runner.ln2[0], eps, s)
    parts = {
        "fused_add_rmsnorm (prepared)": norm,
        "fused_add_rmsnorm (op)": lambda: kernels.fused_add_rmsnorm(v.x, v.h, engine.runner.ln2[0], eps, s),
        "rope": lambda: kernels.rope_inplace(v.q, v.k, v.positions, c.rope, s),
        "append_paged_kv_cache": lambda: kernels.append_kv(
            v.k,
            v.v,
            v.batch_indices,
            v.positions,
            engine.runner.k_cache[0],
            engine.runner.v_cache[0],
            v.kv_indices,
            v.kv_indptr,
            v.kv_last_page_len,
            s,
        ),
        "batch_decode_run": lambda: engine.runner.decode_attention(0, v),
        "silu_and_mul": lambda: kernels.silu_and_mul(v.gu, v.act, s),
        "CuPy RawKernel (row gather)": lambda: d.rows.gather_rows(
            1, engine.runner.embed, h, v.token_ids, b.h.data.ptr, h, h
        ),
    }
    if gemv and d.fused.fits(1, h) and d.fused.fits(1, inter):
        from fi_engine.kernels.fused_args import ADD_NORM, SILU
        from fi_engine.runtime.worker.fused_decode import rope_append

        nw, f32, vocab = engine.runner.ln1[1].data_ptr, engine.runner.gemm_f32, c.vocab_size
        fused_calls = {  # the fused step's GEMVs (engine.runner.fused.step), the first layer's weights
            "GEMM qkv + add-norm": (ADD_NORM, b.x.data.ptr, h, engine.runner.wqkv[0], w, h, b.qkv.data.ptr, w, ab),
            "GEMM gate_up + add-norm": (
                ADD_NORM,
                b.x.data.ptr,
                h,
                engine.runner.wgu[0],
                2 * inter,
                h,
                b.gu.data.ptr,
                2 * inter,
                ab,
            ),
            "GEMM down + SiLU": (SILU, b.gu.data.ptr, 2 * inter, engine.runner.wd[0], h, inter, b.x.data.ptr, h, ab),
            "LM head + add-norm": (
                ADD_NORM,
                b.x.data.ptr,
                h,
                engine.runner.lm_head,
                vocab,
                h,
                b.logits.data.ptr,
                vocab,
                f32,
            ),
        }
        for name, (mode, x, x_ld, wt, n_out, k_in, y, y_ld, out) in fused_calls.items():
            # packed once, as the fused step packs them; the cuBLAS rows above turn the GEMV off between rounds
            call = d.fused.prepared(
                mode, 1, x, x_ld, wt, n_out, k_in, y, y_ld, ab, out, b.h.data.ptr, h, nw, b.h_alt.data.ptr, eps
            )

            def fused_gemv(call: Any = call) -> None:
                d.lt, d.gemv = True, True
                call()

            parts[f"{name} (fused GEMV, prepared)"] = fused_gemv
        if d.fused.has_qkv_rope(ab, c.head_dim):  # RoPE + KV append as its epilogue
            call = d.fused.prepared_qkv_rope(
                rope_append(engine.runner, 0, v), ADD_NORM, 1, b.x.data.ptr, h, engine.runner.wqkv[0], w, h,
                b.qkv.data.ptr, w, ab, ab, b.h.data.ptr, h, nw, b.h_alt.data.ptr, eps,
            )  # fmt: skip

            def qkv_rope(call: Any = call) -> None:
                d.lt, d.gemv = True, True
                call()

            parts["GEMM qkv + add-norm + RoPE + KV append (fused GEMV, prepared)"] = qkv_rope
    if hasattr(kernels, "prepared_decode_run"):  # packed once per view, as the fused step's packed_attention runs
        plan = engine.runner.decode_plan
        run = kernels.prepared_decode_run(
            plan,
            v.q,
            engine.runner.k_cache[0],
            engine.runner.v_cache[0],
            v.kv_indptr,
            v.kv_indices,
            v.kv_last_page_len,
            v.attn,
            s,
        )
        parts["batch_decode_run (prepared, this step's plan)"] = lambda: run.run(plan)
    raw = raw_launch(d, engine.runner.embed, v.token_ids, b.h.data.ptr, h, s)
    if raw is not None:
        parts["raw cuLaunchKernel through cffi (row gather)"] = raw
    with engine.stream, stream_scope(s, engine.device):
        for name, args in shapes.items():
            if gemv:
                report.measure(f"GEMM {name}: GEMV", gemm(True, args, True), n=n, sync=sync)
            if d._lt is not None:
                report.measure(f"GEMM {name}: cuBLASLt", gemm(True, args), n=n, sync=sync)
            report.measure(f"GEMM {name}: cublasGemmEx", gemm(False, args), n=n, sync=sync)
        for name, fn in parts.items():
            report.measure(name, fn, n=n, sync=sync)
        report.run()
        sync()
    d.lt, d.gemv = d._lt is not None, gemv
    return {f"part {k}": v for k, v in report.rows.items() if v is not None}


def raw_launch(dense: Any, src: int, index: int, dst: int, width: int, stream: int) -> Any:
    """The floor of one launch on this host: the row-gather kernel through ``cuLaunchKernel`` (libcuda, cffi,
    argument array packed once); None where it cannot be set up."""
    try:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(
            "int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, "
            "unsigned bz, unsigned smem, uintptr_t stream, void** params, void** extra);"
        )
        lib = ffi.dlopen("libcuda.so.1")
        fn = ffi.cast("void*", getattr(dense.rows.gather_fn, "kernel", dense.rows.gather_fn).ptr)
        values = ffi.new("uint64_t[6]", [src, index, dst, width, width, width])
        params = ffi.new("void*[6]", [values + i for i in range(6)])
        call, null = lib.cuLaunchKernel, ffi.NULL
    except Exception as exc:
        print(f"raw cuLaunchKernel: unavailable ({type(exc).__name__}: {exc})")
        return None

    def launch() -> None:
        if call(fn, 1, 1, 1, 256, 1, 1, 0, stream, params, null):
            raise RuntimeError("cuLaunchKernel failed")

    launch.keep = (values, params)  # type: ignore[attr-defined]
    return launch


def own(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    parts = {"engine"} if args.engine_only else set(args.parts.split(","))
    old = load_package(args.before_inline) if args.before_inline else None
    for part, fn in (
        ("rmsnorm", lambda: rmsnorm_rows(args.launches, args.launch_rounds, old)),
        ("as_tensor", lambda: as_tensor_rows(args.n, old)),
        ("decode step b1", lambda: decode_step_rows(args.steps, args.rounds, old)),
    ):
        result[part] = {}
        if part.split()[0] not in parts:
            continue
        try:
            result[part] = fn()
        except Exception as exc:  # one part failing still leaves the others' figures
            print(f"{part}: unavailable ({type(exc).__name__}: {exc})")
    result["engine"] = {}
    if "engine" not in parts:
        return result
    # SmolLM2-135M's shape; should its 9/3 heads find no kernel in the installed wheels, a 30-layer model of
    # 8/2 heads (512 wide) stands in, and the table says so
    for shape in (SMOLLM2, {**SMOLLM2, "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2}):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                make_checkpoint(Path(tmp), shape)
                result["engine"] = engine_share(Path(tmp), args.profile)
                result["engine"]["shape"] = f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads"
            break
        except Exception as exc:
            print(f"engine on {shape}: unavailable ({type(exc).__name__}: {exc})")
    return result


# the prefill runs timed (label in engine_rows) and the suffix of their rows
PREFILL_MODES = (
    ("eager", " (eager)"),
    ("capture", " (new bucket: capture)"),
    ("new length", " (new length, bucket captured)"),
    ("graph", ""),
)


def engine_share(folder: Path, profile: int) -> dict[str, Any]:
    """engine_rows, with the prefill's host share computed from the wall time of generate(prompt, 1)."""
    from fi_engine.runtime.passes import Passes

    out: dict[str, Any] = {}
    original = Passes.prefill
    spans: list[tuple[str, float, float]] = []
    label = [""]

    def timed_prefill(self: Any, sched: Any, reqs: Any, all_logits: bool = False, riders: Any = ()) -> Any:
        begin = time.perf_counter()
        finish = self.prefill_finish
        issued: list[float] = []

        def timed_finish(*args: Any, **kwargs: Any) -> Any:
            issued.append(time.perf_counter())  # the pass is issued: the host waits for it from here
            return finish(*args, **kwargs)

        self.prefill_finish = timed_finish
        try:
            return original(self, sched, reqs, all_logits, riders)
        finally:
            del self.prefill_finish
            end = time.perf_counter()
            if issued and label[0]:
                spans.append((label[0], issued[0] - begin, end - begin))

    Passes.prefill = timed_prefill  # type: ignore[method-assign]
    try:
        out.update(engine_rows(folder, profile, label))
    finally:
        Passes.prefill = original  # type: ignore[method-assign]
    for mode, suffix in PREFILL_MODES:
        long = [(h, w) for m, h, w in spans if m == mode and w > 0]
        if long:
            host, wall = min(long, key=lambda s: s[1])
            out[f"prefill 2048 host ms{suffix}"] = host * 1e3
            out[f"prefill 2048 wall ms{suffix}"] = wall * 1e3
            out[f"prefill host share{suffix}"] = host / wall
    return out


def table(runs: dict[str, dict[str, Any]]) -> str:
    """The goal table: one column per run (this tree, and the old package with --before)."""
    names = list(runs)
    lines = [f"{'metric':72s}" + "".join(f"{n:>16s}" for n in names)]

    def row(label: str, values: list[Any], fmt: str = "{:.2f}") -> None:
        shown = ["-" if v is None else fmt.format(v) for v in values]
        lines.append(f"{label:72s}" + "".join(f"{s:>16s}" for s in shown))

    first = runs[names[0]]
    for key in first["rmsnorm"]:
        row(f"rmsnorm 1x128 us/call: {key}", [r["rmsnorm"].get(key) for r in runs.values()])
    ours = ("fi_ffi, descriptors", "fi_ffi, torch tensors", "fi_ffi, CuPy arrays")
    for key in (*ours, *(f"before: {k}" for k in ours)):
        if key not in first["rmsnorm"]:
            continue
        vals = []
        for r in runs.values():
            a, b = r["rmsnorm"].get(key), r["rmsnorm"].get("tvm_ffi, torch tensors")
            vals.append(None if a is None or not b else a / b)
        row(f"rmsnorm {key} / tvm_ffi(torch)", vals, "{:.2f}x")
    for key, against in (
        ("fi_ffi, JAX inputs", "tvm_ffi, JAX inputs"),
        ("fi_ffi, CAI objects", "tvm_ffi, CuPy arrays"),
    ):
        if key in first["rmsnorm"]:
            vals = []
            for r in runs.values():
                a, b = r["rmsnorm"].get(key), r["rmsnorm"].get(against)
                vals.append(None if a is None or not b else a / b)
            row(f"rmsnorm {key} / {against}", vals, "{:.2f}x")
    for key in (*ours, *(f"before: {k}" for k in ours), "tvm_ffi, torch tensors", "tvm_ffi, CuPy arrays"):
        if key not in first["rmsnorm"]:
            continue
        vals = []
        for r in runs.values():
            a, b = r["rmsnorm"].get(key), r["rmsnorm"].get("floor: frame packed once")
            vals.append(None if a is None or b is None else a - b)
        row(f"rmsnorm {key}: us above the floor", vals)
    for key in first["as_tensor"]:
        row(f"{key} us", [r["as_tensor"].get(key) for r in runs.values()])
    for key in first["decode step b1"]:
        row(f"decode step b1 host us/step: {key}", [r["decode step b1"].get(key) for r in runs.values()], "{:.1f}")
    for key in (
        "descriptors",
        "torch",
        "CuPy",
        "packed descriptors",
        "packed torch",
        "packed CuPy",
        "before: descriptors",
        "before: torch",
        "before: CuPy",
    ):
        if key not in first["decode step b1"]:
            continue
        vals = []
        for r in runs.values():
            a, b = r["decode step b1"].get(key), r["decode step b1"].get("flashinfer-python")
            vals.append(None if a is None or not b else a / b)
        row(f"decode step b1 {key} / flashinfer-python", vals, "{:.2f}x")
    lines.append(f"SmolLM2-shaped engine: {', '.join(str(r['engine'].get('shape')) for r in runs.values())}")
    for key, fmt in (
        ("engine eager host us per decode step", "{:.0f}"),
        ("engine eager host us per decode step, GEMMs by GEMV", "{:.0f}"),
        ("engine eager host us per decode step, GEMMs by GEMV, packed attention runs", "{:.0f}"),
        ("engine eager host us per decode step, GEMMs by GEMV, separate norm/SiLU launches", "{:.0f}"),
        ("engine eager host us per decode step, GEMMs by cuBLASLt", "{:.0f}"),
        ("engine eager host us per decode step, GEMMs by cublasGemmEx", "{:.0f}"),
        *(
            (f"prefill {metric}{suffix}", fmt)
            for _, suffix in PREFILL_MODES
            for metric, fmt in (("2048 host ms", "{:.2f}"), ("2048 wall ms", "{:.2f}"), ("host share", "{:.0%}"))
        ),
    ):
        row(f"engine, 30 layers: {key}", [r["engine"].get(key) for r in runs.values()], fmt)
    for key in first["engine"]:
        if key.startswith("part "):
            row(f"{key} us", [r["engine"].get(key) for r in runs.values()])
    return "\n".join(lines)


def before(args: argparse.Namespace) -> dict[str, Any] | None:
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        # the old package first; the rest of the path as it is (the staged peers: tvm_ffi, flashinfer-python)
        path = [str(Path(args.before).resolve()), str(HERE), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        cmd = [sys.executable, __file__, "--json", fh.name, "-n", str(args.n), "--steps", str(args.steps)]
        cmd += ["--rounds", str(args.rounds), "--profile", "0", "--parts", args.parts]
        cmd += ["--launches", str(args.launches), "--launch-rounds", str(args.launch_rounds)]
        done = subprocess.run(cmd, env=env, cwd=str(HERE), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode:
            print(f"the old package's run failed ({done.returncode}):\n{done.stdout[-3000:]}")
            return None
        for line in done.stdout.splitlines():  # its contenders that could not run, and why
            if "unavailable" in line:
                print(f"before: {line[:300]}")
        return json.loads(Path(fh.name).read_text())  # type: ignore[no-any-return]


def best_of(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per metric, the better of two runs of the same package (the lower time; the higher share is worse)."""
    if a is None or b is None:
        return a or b
    merged: dict[str, Any] = {}
    for part in a:
        merged[part] = {}
        for key, va in a[part].items():
            vb = b[part].get(key)
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                merged[part][key] = min(va, vb)
            else:
                merged[part][key] = va
    return merged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="a folder holding an older fi_ffi package to compare with (in a subprocess)")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("-n", type=int, default=20_000, help="calls per timed loop (as_tensor)")
    ap.add_argument("--launches", type=int, default=256, help="launches per timed loop (rmsnorm)")
    ap.add_argument("--launch-rounds", type=int, default=100, help="interleaved rounds (rmsnorm)")
    ap.add_argument("--parts", default="rmsnorm,as_tensor,decode,engine", help="which parts to run (comma-separated)")
    ap.add_argument(
        "--before-inline",
        help="a folder holding an older fi_ffi package, imported as fi_ffi_before and timed in this process, "
        "interleaved with this tree (rows 'before: ...'; not for the engine)",
    )
    ap.add_argument("--floor", action="store_true", help="also print bench_floor.py's breakdown (this tree only)")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", type=int, default=25, help="functions shown in the engine's eager-step profile")
    ap.add_argument(
        "--engine-only", action="store_true", help="only the engine's rows (decode step, prefill): --parts engine"
    )
    ap.add_argument(
        "--before-runs", type=int, choices=(1, 2), default=2, help="runs of the old package: after ours, or around it"
    )
    args = ap.parse_args()
    import fi_ffi

    if args.floor:
        import bench_floor

        bench_floor.main([])
    old_first = before(args) if args.before and args.before_runs == 2 else None
    mine = own(args)
    old_second = before(args) if args.before else None
    runs = {"this tree": mine}
    old = best_of(old_first, old_second)
    if old is not None:
        runs["before"] = old
    print(f"\nfi_ffi from {Path(fi_ffi.__file__).parent}")
    print(table(runs))
    if mine["engine"].get("profile"):
        steps = mine["engine"]["profile steps"]
        print(f"\nprofile of the engine's eager generate (prefill + {steps - 1} decode steps), by own time:")
        print(mine["engine"]["profile"])
    if "prefill graphs" in mine["engine"]:
        print(f"\nprefill graphs kept (bucket, requests): {mine['engine']['prefill graphs']}")
        print(f"prefill captures failed: {mine['engine']['prefill graph failures'] or 'none'}")
    if mine["engine"].get("prefill profile"):
        print("\nprofile of one eager 2048-token prefill (generate(prompt, 1)), by own time:")
        print(mine["engine"]["prefill profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(runs if args.before else mine, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The goal table of issue 21 in one run: per-call host cost for every producer against the Cython binding and
flashinfer-python, descriptor costs, a decode step, and the engine's eager step and long prefill.

    python benchmarks/bench_goals.py [--before DIR] [--json PATH] [--profile N]

Rows (contenders of one table are timed in interleaved rounds, best round kept; see timing.Report):

1. ``rmsnorm`` 1x128 float16, host us per call: fi_ffi with descriptors / torch tensors / CuPy arrays, tvm_ffi's
   Cython call of the same ``norm.so`` with torch tensors / CuPy arrays, ``flashinfer.norm.rmsnorm``; ratios
   against tvm_ffi with torch tensors;
2. ``as_tensor(torch)``, ``as_tensor(CuPy)``, ``Tensor.from_pointer``, us per call;
3. a decode step at batch 1 (one plan, then 32 x (append + run); bench_step.py's problem): host us per step for
   descriptors / torch / CuPy against flashinfer-python;
4. the engine (``fi_ffi.models.LlamaEngine``) on a random SmolLM2-135M-shaped checkpoint (30 layers, 576 wide),
   eager, batch 1: median host us per decode step, and a profile of the eager steps (``--profile N``: the N
   functions of most own time);
5. the same engine prefilling one 2048-token prompt: host share of the wall time (time to issue every kernel,
   up to the one synchronization, over the wall time of the prefill).

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


def rmsnorm_rows(n: int) -> dict[str, float | None]:
    import torch

    import fi_ffi
    from fi_ffi import loader

    sync = torch.cuda.synchronize
    x = torch.randn(1, 128, dtype=torch.float16, device="cuda")
    w = torch.randn(128, dtype=torch.float16, device="cuda")
    out = torch.empty_like(x)
    xd, wd, od = (fi_ffi.as_tensor(t) for t in (x, w, out))
    rmsnorm = fi_ffi.rmsnorm
    report = Report(f"rmsnorm 1x128 float16, host us per call (n={n})")
    report.measure("fi_ffi, descriptors", lambda: rmsnorm(xd, wd, od), n=n, sync=sync)
    report.measure("fi_ffi, torch tensors", lambda: rmsnorm(x, w, out), n=n, sync=sync)
    xc = wc = oc = None
    try:
        import cupy

        xc, wc = cupy.asarray(x), cupy.asarray(w)
        oc = cupy.empty_like(xc)
        report.measure("fi_ffi, CuPy arrays", lambda: rmsnorm(xc, wc, oc), n=n, sync=sync)
    except Exception as exc:
        print(f"CuPy unavailable: {exc}")
    try:
        import tvm_ffi

        f = tvm_ffi.load_module(str(loader.module_path("norm"))).rmsnorm
        report.measure("tvm_ffi, torch tensors", lambda: f(out, x, w, 1e-6, False), n=n, sync=sync)
        if xc is not None:
            report.measure("tvm_ffi, CuPy arrays", lambda: f(oc, xc, wc, 1e-6, False), n=n, sync=sync)
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


def as_tensor_rows(n: int) -> dict[str, float | None]:
    import torch

    import fi_ffi

    x = torch.randn(1, 128, dtype=torch.float16, device="cuda")
    ptr = x.data_ptr()
    report = Report(f"describing one tensor, us per call (n={n})")
    report.measure("as_tensor(torch)", lambda: fi_ffi.as_tensor(x), n=n)
    try:
        import cupy

        xc = cupy.asarray(x)
        report.measure("as_tensor(CuPy)", lambda: fi_ffi.as_tensor(xc), n=n)
        report.measure("  of which CuPy's __dlpack_device__()", xc.__dlpack_device__, n=n)
    except Exception as exc:
        print(f"CuPy unavailable: {exc}")
    report.measure("Tensor.from_pointer", lambda: fi_ffi.Tensor.from_pointer(ptr, (1, 128), "float16", 0), n=n)
    report.run()
    return report.rows


def decode_step_rows(steps: int, rounds: int) -> dict[str, float]:
    import torch
    from bench_step import fi_ffi_step, flashinfer_step, measure, problem

    import fi_ffi

    p = problem(torch, 1, [16], 32)
    ws = fi_ffi.Workspace.allocate(0)
    contenders = {"descriptors": fi_ffi_step(fi_ffi, p, ws, fi_ffi.as_tensor)}
    contenders["torch"] = fi_ffi_step(fi_ffi, p, ws, lambda t: t)
    try:
        import cupy

        contenders["CuPy"] = fi_ffi_step(fi_ffi, p, ws, cupy.asarray)
    except Exception as exc:
        print(f"CuPy unavailable: {exc}")
    try:
        contenders["flashinfer-python"] = flashinfer_step(torch, p)
    except Exception as exc:
        print(f"flashinfer-python unavailable: {exc}")
    times = measure(contenders, steps, rounds, torch.cuda.synchronize, wall=False)
    ws.close()
    return times


def make_checkpoint(folder: Path, shape: dict[str, Any]) -> Path:
    import numpy as np

    from fi_ffi.models.checkpoint import write_safetensors

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


def engine_rows(folder: Path, profile: int) -> dict[str, Any]:
    import cProfile
    import io
    import pstats

    from fi_ffi.models.llama import LlamaEngine

    out: dict[str, Any] = {}
    prompt = [[(7 * k) % 40000 + 3 for k in range(16)]]
    with LlamaEngine(folder, max_batch=1, cuda_graph=False, max_seq_len=4096, max_prefill_tokens=2048) as engine:
        engine.generate(prompt, 8, eos_token_ids=())  # warm-up: modules, kernels, GEMM heuristics
        best = min(engine.generate(prompt, 64, eos_token_ids=()).host_us_per_step for _ in range(3))
        out["engine eager host us per decode step"] = best
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            r = engine.generate(prompt, 32, eos_token_ids=())
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(profile)
            out["profile"] = text.getvalue()
            out["profile steps"] = r.decode_steps + 1
        # prefill of 2048 tokens (timed by engine_share around the engine's _prefill)
        long_prompt = [[(13 * k) % 40000 + 3 for k in range(2048)]]
        for _ in range(4):
            engine.generate(long_prompt, 1, eos_token_ids=())
    return out


def own(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for part, fn in (
        ("rmsnorm", lambda: rmsnorm_rows(args.n)),
        ("as_tensor", lambda: as_tensor_rows(args.n)),
        ("decode step b1", lambda: decode_step_rows(args.steps, args.rounds)),
    ):
        try:
            result[part] = fn()
        except Exception as exc:  # one part failing still leaves the others' figures
            print(f"{part}: unavailable ({type(exc).__name__}: {exc})")
            result[part] = {}
    result["engine"] = {}
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


def engine_share(folder: Path, profile: int) -> dict[str, Any]:
    """engine_rows, with the prefill's host share computed from the wall time of generate(prompt, 1)."""
    import fi_ffi.models.llama as llama

    out: dict[str, Any] = {}
    original = llama.LlamaEngine._prefill
    spans: list[tuple[float, float]] = []

    def timed_prefill(self: Any, sched: Any, reqs: Any, sampling: Any, all_logits: bool = False) -> Any:
        begin = time.perf_counter()
        fetch = self._fetch_ids
        issued: list[float] = []

        def timed_fetch(rows: int, sampling: Any) -> Any:
            issued.append(time.perf_counter())
            return fetch(rows, sampling)

        self._fetch_ids = timed_fetch
        try:
            return original(self, sched, reqs, sampling, all_logits)
        finally:
            del self._fetch_ids
            end = time.perf_counter()
            if issued:
                spans.append((issued[0] - begin, end - begin))

    llama.LlamaEngine._prefill = timed_prefill  # type: ignore[method-assign]
    try:
        out.update(engine_rows(folder, profile))
    finally:
        llama.LlamaEngine._prefill = original  # type: ignore[method-assign]
    long = [s for s in spans if s[1] > 0][-4:]  # the 2048-token prefills
    if long:
        host, wall = min(long, key=lambda s: s[1])
        out["prefill 2048 host ms"] = host * 1e3
        out["prefill 2048 wall ms"] = wall * 1e3
        out["prefill host share"] = host / wall
    return out


def table(runs: dict[str, dict[str, Any]]) -> str:
    """The goal table: one column per run (this tree, and the old package with --before)."""
    names = list(runs)
    lines = [f"{'metric':58s}" + "".join(f"{n:>16s}" for n in names)]

    def row(label: str, values: list[Any], fmt: str = "{:.2f}") -> None:
        shown = ["-" if v is None else fmt.format(v) for v in values]
        lines.append(f"{label:58s}" + "".join(f"{s:>16s}" for s in shown))

    first = runs[names[0]]
    for key in first["rmsnorm"]:
        row(f"rmsnorm 1x128 us/call: {key}", [r["rmsnorm"].get(key) for r in runs.values()])
    for key in ("fi_ffi, descriptors", "fi_ffi, torch tensors", "fi_ffi, CuPy arrays"):
        vals = []
        for r in runs.values():
            a, b = r["rmsnorm"].get(key), r["rmsnorm"].get("tvm_ffi, torch tensors")
            vals.append(None if a is None or not b else a / b)
        row(f"rmsnorm {key} / tvm_ffi(torch)", vals, "{:.2f}x")
    for key in first["as_tensor"]:
        row(f"{key} us", [r["as_tensor"].get(key) for r in runs.values()])
    for key in first["decode step b1"]:
        row(f"decode step b1 host us/step: {key}", [r["decode step b1"].get(key) for r in runs.values()], "{:.1f}")
    for key in ("descriptors", "torch", "CuPy"):
        vals = []
        for r in runs.values():
            a, b = r["decode step b1"].get(key), r["decode step b1"].get("flashinfer-python")
            vals.append(None if a is None or not b else a / b)
        row(f"decode step b1 {key} / flashinfer-python", vals, "{:.2f}x")
    lines.append(f"SmolLM2-shaped engine: {', '.join(str(r['engine'].get('shape')) for r in runs.values())}")
    for key, fmt in (
        ("engine eager host us per decode step", "{:.0f}"),
        ("prefill 2048 host ms", "{:.2f}"),
        ("prefill 2048 wall ms", "{:.2f}"),
        ("prefill host share", "{:.0%}"),
    ):
        row(f"engine, 30 layers: {key}", [r["engine"].get(key) for r in runs.values()], fmt)
    return "\n".join(lines)


def before(args: argparse.Namespace) -> dict[str, Any] | None:
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        # the old package first; the rest of the path as it is (the staged peers: tvm_ffi, flashinfer-python)
        path = [str(Path(args.before).resolve()), str(HERE), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        cmd = [sys.executable, __file__, "--json", fh.name, "-n", str(args.n), "--steps", str(args.steps)]
        cmd += ["--rounds", str(args.rounds), "--profile", "0"]
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
    ap.add_argument("-n", type=int, default=20_000, help="calls per timed loop (rmsnorm, as_tensor)")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", type=int, default=25, help="functions shown in the engine's eager-step profile")
    ap.add_argument(
        "--before-runs", type=int, choices=(1, 2), default=2, help="runs of the old package: after ours, or around it"
    )
    args = ap.parse_args()
    import fi_ffi

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
    if args.json:
        Path(args.json).write_text(json.dumps(runs if args.before else mine, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

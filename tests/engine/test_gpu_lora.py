"""LoRA adapters chosen per request (fi_engine.lora) against transformers, on a GPU (FI_FFI_RUN_GPU_TESTS=1; CuPy,
torch, transformers).

Each base is a random small checkpoint built with transformers' own classes (Llama; Qwen3, whose q/k norms follow
the adapted projection; Mixtral, whose attention takes adapters and whose experts take none), saved in bfloat16,
with three random adapters in PEFT's layout (tests/helpers/lora_adapters.py): rank 8 over q and v, rank 16 over
every projection, rank 64 over every projection with rsLoRA's scale (alpha / sqrt(r)); Mixtral's over attention
only. A and B are both random (PEFT starts B at zero), so each adapter moves the logits far more than the
tolerance: a row served without its adapter, or with another's, fails.

The reference of an adapter is the transformers model in **float32** with the adapter merged into its weights
(``W + scale * B @ A``, of the stored, rounded values); the yardstick is transformers' own error, the merged model
in bfloat16 against that reference (``hf_err`` per adapter, max |logit error| over every prompt position). Checks:
prefill logits of a batch mixing the three adapters and base rows, each row within ``1.5 * hf_err`` of its own
adapter's reference, eager and with CUDA graphs; greedy decode of such a batch (eager and CUDA graph) token by token
against each row's reference (teacher forcing, as tests/engine/test_gpu_families.py); a row's greedy tokens are the
same bit for bit whatever adapters its neighbours take (the kernels read each row's slot alone); fewer GPU slots than
adapters (``max_loras`` 2) swaps them in least recently used and serves every row right; and the prefix cache keeps a
prompt computed with one adapter from serving another.

A step where no row takes an adapter runs the base engine's path: an engine serving adapters decodes a batch of base
rows (and one base row alone) with no step on the adapters' path, the same fused steps, and the same greedy tokens
bit for bit as an engine opened without adapters, eager and with CUDA graphs; a mixed batch whose adapter rows end
first takes the adapters' path while they are there and the base path after, every row matching its reference; and
the second set of decode graphs' cost at open is printed (capture seconds, device memory held, switch on and off).

The LoRA form of the fused decode step (``ModelRunner.lora_fused``: 1 to 4 rows, the adapters' expand in the fused
GEMVs' epilogues): each eager step of one adapter row, and of four rows of three adapters and a base row, runs it, and
every row's logits at every step are within 1.5x transformers-bf16's error of its adapter's merged reference; its tokens
are the separate launches' (the switch off) up to a near tie; the adapters' one-row CUDA graph captures it and its
tokens match the reference and the eager step's. Its two forms (``ModelRunner.lora_shrink_in_grid``: each shrink in
its GEMV's grid, or a launch of its own before it) give every fused step's logits bit for bit alike, eager (1 and 4
rows) and in the one-row graph (its tokens).

Both forms of a prefill's adapters, whatever ``DeviceSlots.prefill_segment_gemm``'s default (the ``prefill_form``
fixture sets it): ``cuda-cores`` (the CUDA-core kernels' long shrink, in the padded prefill graph with CUDA graphs on)
and ``segment`` (the shrink and expand as FlashInfer's segment GEMMs, SM 9.x: such a pass runs eagerly). Every test
whose passes exceed ``segment_min_rows`` rows with adapters (the mixed batch's 192-row prefill: its logits, greedy
decode, tokens against the neighbours', fewer slots, adapter rows ending first) runs in both and checks that its
prefills took that form.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from helpers.gpu import engine_against_transformers

cp, torch, transformers = engine_against_transformers()

from helpers.checkpoints import MIXTRAL_MOE, SMALL, float32_reference, save_random  # noqa: E402
from helpers.launch_choices import pin_launch_choices  # noqa: E402
from helpers.lora_adapters import ALL_MODULES, llama_shapes, write_adapter  # noqa: E402
from helpers.yardstick import (  # noqa: E402
    bf16_yardstick,
    check_eager_matches_graph,
    check_greedy,
    prompts,
    reference_logits,
)

from fi_engine.models.registry import open_engine  # noqa: E402
from fi_engine.runtime.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 4096
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# name -> (rank, lora_alpha, modules (None: the base's all), rsLoRA)
ADAPTERS = {"r8": (8, 16.0, ("q_proj", "v_proj"), False), "r16": (16, 32.0, None, False), "r64": (64, 16.0, None, True)}
BASES = {  # name -> (config class, model class, its config's keys beyond SMALL, the modules an adapter may take)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=1024), ALL_MODULES),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=1024), ALL_MODULES),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MIXTRAL_MOE), ATTENTION),
}
LORAS = [None, "r8", "r16", "r64", "r8", None, "r64", "r16"]  # one batch: every adapter twice, two base rows
LENS = (5, 16, 29, 40, 7, 33, 50, 12)
MAX_NEW = 17


def merged(model, deltas):  # type: ignore[no-untyped-def]
    """A float32 copy of ``model`` with every ``(layer, module) -> delta`` added to that projection's weight."""
    m = copy.deepcopy(model).float()
    with torch.no_grad():
        for (layer, module), delta in deltas.items():
            block = m.model.layers[layer].self_attn if module in ATTENTION else m.model.layers[layer].mlp
            getattr(block, module).weight += torch.from_numpy(delta)
    return m


PREFILL_FORMS = {"cuda-cores": False, "segment": True}  # name -> DeviceSlots.prefill_segment_gemm


@pytest.fixture(params=list(PREFILL_FORMS))
def prefill_form(request, monkeypatch):  # type: ignore[no-untyped-def]
    """``DeviceSlots.prefill_segment_gemm`` set for the test, whatever its default: False (``cuda-cores``) or True
    (``segment``); the test passes its engine to :func:`check_prefill_form` once it has prefilled."""
    from fi_engine.lora.device import DeviceSlots

    monkeypatch.setattr(DeviceSlots, "prefill_segment_gemm", PREFILL_FORMS[request.param])
    return PREFILL_FORMS[request.param]


def skip_without_segment_form(engine, segment):  # type: ignore[no-untyped-def]
    """Skip the segment form's variant where the GPU does not run it (FlashInfer's SM90 segment GEMM: SM 9.x)."""
    if segment and engine.runner.lora.segment_form() is None:
        pytest.skip("the segment form needs an SM 9.x GPU (FlashInfer's SM90 segment GEMM)")


def check_prefill_form(engine, segment):  # type: ignore[no-untyped-def]
    """The engine's passes of more than ``segment_min_rows`` rows with adapters took the form asked for: the segment
    form prepared GEMMs, or the CUDA-core launches were prepared for such a pass (and the segment form none)."""
    lora = engine.runner.lora
    form = lora.segment_form() if segment else None
    if segment:
        assert form is not None and form.prepared_count > 0, "no pass took the segment form"
    else:
        long = [key for key in lora._launches if key[2] > lora.segment_min_rows]  # (group, layer, rows, ...)
        assert long, "no pass of more than segment_min_rows rows took the CUDA-core launches"


@pytest.fixture(scope="module", params=list(BASES), ids=list(BASES))
def base(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    config_cls, model_cls, extra, allowed = BASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    kw = dict(vocab_size=VOCAB, **SMALL, **extra)
    model = save_random(root / "base", config_cls, model_cls, "bfloat16", kw)
    shapes = llama_shapes(kw["hidden_size"], kw["intermediate_size"], kw["num_attention_heads"],
                          kw["num_key_value_heads"], kw["head_dim"])  # fmt: skip
    ps = prompts(LENS, VOCAB)
    refs, errs, modules = {}, {}, {}
    for seed, (name, (rank, alpha, mods, rslora)) in enumerate([(None, (0, 0.0, (), False)), *ADAPTERS.items()]):
        if name is None:
            ref, hf16 = float32_reference(model), copy.deepcopy(model).cuda().eval()
        else:
            mods = tuple(m for m in (mods or allowed) if m in allowed)
            modules[name] = mods
            deltas = write_adapter(root / name, shapes, kw["num_hidden_layers"], rank, alpha, mods, rslora=rslora,
                                   seed=seed)  # fmt: skip
            f32 = merged(model, deltas)
            ref = f32.cuda().eval()
            hf16 = copy.deepcopy(f32).to(torch.bfloat16).cuda().eval()
        refs[name] = ref
        errs[name], _ = bf16_yardstick(hf16, [reference_logits(ref, p) for p in ps], ps)
        del hf16
    # every adapter moves the logits well past the tolerance: a row served without it fails (3x: a Mixtral base's
    # attention-only adapters moved its logits 1.89 where transformers-bf16's error was 0.449, on an H100)
    for name in ADAPTERS:
        moved = max(float(np.abs(reference_logits(refs[name], p) - reference_logits(refs[None], p)).max()) for p in ps)
        print(f"{request.param} {name} ({modules[name]}): moves the logits by {moved:.3f}; transformers-bf16's error "
              f"{errs[name]:.4f}")  # fmt: skip
        assert moved > 3 * errs[name]
    settings = {"max_loras": 3, "max_lora_rank": 64, "modules": {n: str(root / n) for n in ADAPTERS}}
    yield request.param, root / "base", refs, errs, ps, settings
    refs.clear()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
def test_mixed_batch_prefill_logits_within_transformers_bfloat16_error(base, graph, prefill_form) -> None:  # type: ignore[no-untyped-def]
    # 192 rows (past segment_min_rows) in either form of the adapters; with CUDA graphs on, the CUDA-core form runs
    # in the padded prefill graph and the segment form eagerly
    name, path, refs, errs, ps, settings = base
    with open_engine(path, max_batch=8, page_size=16, cuda_graph=graph, lora=settings) as engine:
        assert engine.lora_names == list(ADAPTERS)
        skip_without_segment_form(engine, prefill_form)
        got = engine.prefill_logits(ps, lora=LORAS)
        check_prefill_form(engine, prefill_form)
    for i, (p, g, lora) in enumerate(zip(ps, got, LORAS, strict=True)):
        want = reference_logits(refs[lora], p)
        err = float(np.abs(g - want).max())
        print(f"{name} row {i} ({lora}): engine {err:.4f}, transformers-bf16 {errs[lora]:.4f}")
        assert err <= 1.5 * errs[lora], f"{name} row {i} ({lora}): {err:.4f} > 1.5 x {errs[lora]:.4f}"


def test_mixed_batch_greedy_decode_eager_and_cuda_graph(base, prefill_form) -> None:  # type: ignore[no-untyped-def]
    name, path, refs, errs, ps, settings = base
    tol = 1.5 * max(errs.values())
    tokens = {}
    for graph in (False, True):
        with open_engine(path, max_batch=8, page_size=16, cuda_graph=graph, lora=settings) as engine:
            skip_without_segment_form(engine, prefill_form)
            r = engine.generate(ps, MAX_NEW, eos_token_ids=(), lora=LORAS)
            check_prefill_form(engine, prefill_form)
        assert [len(t) for t in r.tokens] == [MAX_NEW] * len(ps)
        tokens[graph] = r.tokens
        exact = 0
        for lora in (None, *ADAPTERS):
            rows = [i for i, x in enumerate(LORAS) if x == lora]
            exact += check_greedy(refs[lora], [ps[i] for i in rows], [r.tokens[i] for i in rows], tol)
        print(f"{name} {'graph' if graph else 'eager'}: {exact}/{MAX_NEW * len(ps)} tokens the reference's argmax")
    for lora in (None, *ADAPTERS):
        rows = [i for i, x in enumerate(LORAS) if x == lora]
        check_eager_matches_graph(refs[lora], [ps[i] for i in rows], [tokens[False][i] for i in rows],
                                  [tokens[True][i] for i in rows], tol, f"{name} {lora}: ")  # fmt: skip


def test_a_rows_tokens_do_not_depend_on_its_neighbours_adapters(base, prefill_form) -> None:  # type: ignore[no-untyped-def]
    """The same prompts and lengths (so the same GEMM shapes, step by step) with the neighbours' adapters changed:
    every row whose own adapter is the same gets the same tokens, bit for bit (in the segment form too, where a
    row's run, and so its GEMM problem, changes with its neighbours' adapters)."""
    name, path, _, _, ps, settings = base
    # the third shares rows 1, 3, 5, 7 with LORAS and rows 2, 5 with the second; every row's neighbours change
    others = [LORAS, [None] * len(ps), ["r64", "r8", None, "r64", "r16", None, "r8", "r16"]]
    with open_engine(path, max_batch=8, page_size=16, cuda_graph=True, lora=settings) as engine:
        skip_without_segment_form(engine, prefill_form)
        runs = [engine.generate(ps, MAX_NEW, eos_token_ids=(), lora=lo).tokens for lo in others]
        mixed = [engine.generate(ps, MAX_NEW, eos_token_ids=(), lora=[lo] * len(ps)).tokens for lo in ADAPTERS]
        check_prefill_form(engine, prefill_form)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        same = [i for i in range(len(ps)) if others[a][i] == others[b][i]]
        assert same, "the runs share rows"
        for i in same:
            assert runs[a][i] == runs[b][i], f"{name} row {i} ({others[a][i]}): tokens depend on the neighbours"
    for k, lora in enumerate(ADAPTERS):  # a batch of one adapter against the mixed batch's rows of that adapter
        for i in (i for i, x in enumerate(LORAS) if x == lora):
            assert mixed[k][i] == runs[0][i], f"{name} row {i} ({lora}): alone and mixed differ"


def test_fewer_slots_than_adapters_swap_in_least_recently_used(base, prefill_form) -> None:  # type: ignore[no-untyped-def]
    # (the second admission, 130 rows of r64, r8 and base rows, is a pass past segment_min_rows)
    name, path, refs, errs, ps, settings = base
    tol = 1.5 * max(errs.values())
    with open_engine(path, max_batch=8, page_size=16, cuda_graph=True, lora={**settings, "max_loras": 2}) as engine:
        skip_without_segment_form(engine, prefill_form)
        r = engine.generate(ps, MAX_NEW, eos_token_ids=(), lora=LORAS)
        check_prefill_form(engine, prefill_form)
        stats = engine.lora.stats
        print(f"{name}: {stats.swap_ins} swap-ins, {1e3 * stats.swap_in_s / max(stats.swap_ins, 1):.2f} ms each")
        assert stats.swap_ins >= 3  # three adapters through two slots
        assert max(engine.lora.table.pins) == 0  # every request left its slot
    for lora in (None, *ADAPTERS):
        rows = [i for i, x in enumerate(LORAS) if x == lora]
        check_greedy(refs[lora], [ps[i] for i in rows], [r.tokens[i] for i in rows], tol)


def test_the_prefix_cache_is_keyed_by_adapter(base) -> None:  # type: ignore[no-untyped-def]
    name, path, _, _, ps, settings = base
    p = ps[6]  # 50 tokens: three full pages
    with open_engine(path, max_batch=8, page_size=16, cuda_graph=True, lora=settings) as engine:
        fresh = {lo: engine.generate([p], MAX_NEW, eos_token_ids=(), lora=lo).tokens[0] for lo in ("r16", None)}
        engine.prefix_caching = True
        stats = engine.prefix_cache_stats
        base_run = engine.generate([p], MAX_NEW, eos_token_ids=()).tokens[0]  # fills the cache, base model's
        hits = stats.hits
        got = engine.generate([p], MAX_NEW, eos_token_ids=(), sampling=SamplingParams(lora="r16")).tokens[0]
        assert stats.hits == hits, f"{name}: the adapter's request was served the base model's prefix"
        engine.generate([p], MAX_NEW, eos_token_ids=(), lora="r16")
        assert stats.hits > hits, f"{name}: the adapter's own prefix was not found again"
    assert base_run == fresh[None]
    assert got == fresh["r16"]  # (no hit: computed as without the cache)


def _watch(engine):  # type: ignore[no-untyped-def]
    """Record, per decode step of ``engine``, whether it took the adapters' path (the runner's ``step_lora``), the
    graph set each replay chose, and the rows of each eager fused step: ``(steps, replays, fused)``."""
    runner = engine.runner
    steps: list[bool] = []
    replays: list[bool] = []
    fused: list[int] = []
    run_decode, replay, fused_step = runner.run_decode, runner.step_graphs.replay_decode, runner.fused.step

    def run(rows):  # type: ignore[no-untyped-def]
        out = run_decode(rows)
        steps.append(runner.step_lora is not None)
        return out

    def replay_decode(rows, adapters=False):  # type: ignore[no-untyped-def]
        replays.append(adapters)
        graphs = runner.step_graphs.lora_graphs if adapters else runner.step_graphs.graphs
        assert graphs[rows].captured
        replay(rows, adapters)

    runner.run_decode = run
    runner.step_graphs.replay_decode = replay_decode
    runner.fused.step = lambda v, rows: fused.append(rows) or fused_step(v, rows)
    return steps, replays, fused


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
def test_base_rows_decode_as_an_engine_without_adapters(base, graph, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An engine serving adapters decodes a batch of base rows only (and one base row alone) on the base engine's
    path: no step takes the adapters' launches, the same fused steps and graphs as an engine opened without adapters,
    and the same greedy tokens bit for bit (same prompts, so the same shapes step by step). Each engine times its
    GEMM launches at warm-up (``Dense._choice``) and two engines may pick different launches of near-equal times,
    whose roundings differ and flip a near tie of the random model's logits (seen: one token of 17 in a row of the
    batch, in graph mode): both engines here take the same pick, cuBLASLt (``LaunchTimer.times`` pinned: no other
    launch comes close, so neither engine's decode graphs try another in the step either)."""
    pin_launch_choices(monkeypatch)  # (cuBLASLt's _LT, -2, the least label: in every set of runs)
    name, path, _, _, ps, settings = base
    runs = {}
    for lora in (None, settings):
        with open_engine(path, max_batch=8, page_size=16, cuda_graph=graph, lora=lora) as engine:
            steps, replays, fused = _watch(engine)
            batch = engine.generate(ps, MAX_NEW, eos_token_ids=()).tokens
            alone = engine.generate(ps[:1], MAX_NEW, eos_token_ids=()).tokens
            fuses = engine.runner.fuses(1)
        assert steps and not any(steps) and not any(replays), f"{name}: a step of base rows took the adapters' path"
        assert len(replays) == (len(steps) if graph else 0)
        runs[lora is not None] = (batch, alone, fused, fuses)
        print(f"{name} {'graph' if graph else 'eager'} lora={lora is not None}: {len(steps)} steps, fused at {fused}")
    assert runs[True][0] == runs[False][0], f"{name}: base rows' tokens differ with adapters served"
    assert runs[True][1] == runs[False][1], f"{name}: a base row's tokens differ with adapters served"
    assert runs[True][2:] == runs[False][2:]  # the same fused steps (eager), where the step fits at all
    if not graph and runs[False][3]:
        assert runs[True][2], f"{name}: the one-row steps did not run fused"


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
def test_a_mixed_batch_whose_adapter_rows_end_first_goes_on_without_them(base, graph, prefill_form) -> None:  # type: ignore[no-untyped-def]
    """The mixed batch with every adapter row ending after 5 tokens: its steps take the adapters' path while one is
    there, the base path after (the base rows go on), and every row still matches its own reference."""
    name, path, refs, errs, ps, settings = base
    tol = 1.5 * max(errs.values())
    limits = [MAX_NEW if lo is None else 5 for lo in LORAS]
    with open_engine(path, max_batch=8, page_size=16, cuda_graph=graph, lora=settings) as engine:
        skip_without_segment_form(engine, prefill_form)
        steps, replays, _ = _watch(engine)
        r = engine.generate(ps, limits, eos_token_ids=(), lora=LORAS)
        check_prefill_form(engine, prefill_form)
    assert [len(t) for t in r.tokens] == limits
    first_base = steps.index(False)
    assert first_base > 0 and all(steps[:first_base]) and not any(steps[first_base:]), f"{name}: {steps}"
    if graph:
        assert replays == steps
    for lora in (None, *ADAPTERS):
        rows = [i for i, x in enumerate(LORAS) if x == lora]
        check_greedy(refs[lora], [ps[i] for i in rows], [r.tokens[i] for i in rows], tol)


def test_what_the_decode_graphs_without_the_adapters_cost_at_open(base, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The second set of decode graphs (``ModelRunner.lora_base_graphs``): each set's warm-up and capture seconds and
    the device memory an engine holds after opening, with the switch on and off (printed: the figures the runner's
    docstring states); the base set's graphs are there only with it on."""
    from fi_engine.runtime.worker.model_runner import ModelRunner

    name, path, _, _, _, settings = base
    pool = cp.get_default_memory_pool()
    for on in (True, False):
        monkeypatch.setattr(ModelRunner, "lora_base_graphs", on)
        pool.free_all_blocks()
        free0 = cp.cuda.runtime.memGetInfo()[0]
        with open_engine(path, max_batch=8, page_size=16, cuda_graph=True, lora=settings) as engine:
            g = engine.runner.step_graphs
            held = free0 - cp.cuda.runtime.memGetInfo()[0]
            print(f"{name} lora_base_graphs={on}: capture s {g.capture_s}, {len(g.graphs)} + "
                  f"{len(g.lora_graphs) if g.lora_graphs is not g.graphs else 0} graphs, device memory held "
                  f"{held / 2**20:.1f} MiB")  # fmt: skip
            assert set(g.capture_s) == ({False, True} if on else {True})
            assert (g.graphs is g.lora_graphs) is not on
        pool.free_all_blocks()


# ---------------------------------------------------------------------------------------------- the LoRA fused step

FUSED_ROWS = {1: ["r16"], 4: ["r8", None, "r64", "r16"]}  # a decode batch the LoRA fused step serves (1 to 4 rows)


def _fused_lora_run(path, settings, ps, loras, graph, on, monkeypatch, in_grid=True):  # type: ignore[no-untyped-def]
    """Greedy tokens of ``ps`` (their adapters ``loras``) with ``ModelRunner.lora_fused`` ``on`` (and
    ``lora_shrink_in_grid`` ``in_grid``), per eager fused step with adapters (the runner's ``step_lora`` set) its
    rows' logits (on the host), whether the LoRA form fits ``len(ps)`` rows, and with ``graph`` whether the adapters'
    one-row graph holds it."""
    from fi_engine.runtime.worker.model_runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "lora_fused", on)
    monkeypatch.setattr(ModelRunner, "lora_shrink_in_grid", in_grid)
    logits: list[np.ndarray] = []
    with open_engine(path, max_batch=4, page_size=16, cuda_graph=graph, lora=settings) as engine:
        runner = engine.runner
        assert (runner.lora_gemvs is not None) == on, "the LoRA fused GEMVs did not compile"
        step = runner.fused.step

        def fused_step(v, rows):  # type: ignore[no-untyped-def]
            step(v, rows)
            if runner.step_lora is not None:
                logits.append(runner.buffers.logits[:rows].get())  # finished, before the argmax

        runner.fused.step = fused_step
        r = engine.generate(ps, MAX_NEW, eos_token_ids=(), lora=loras)
        fuses = runner.fused.fits_lora(len(ps))
        # the one-row graph of the adapters' set captured the LoRA fused step (packed into its view at capture)
        graph_fused = graph and "fused lora step" in runner.view("decode", 1, 1).prepared
    return r.tokens, logits, fuses, graph_fused


@pytest.mark.parametrize("rows", list(FUSED_ROWS), ids=[f"{n}-rows" for n in FUSED_ROWS])
def test_the_lora_fused_steps_logits_are_within_the_references_error(base, rows, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Eager decode of 1 (an adapter) and 4 rows (three adapters and a base row): every decode step runs the LoRA
    form of the fused step, and each row's logits at each step are within 1.5x transformers-bf16's error of its own
    adapter's merged float32 reference (teacher forcing on the engine's tokens); the tokens are those of the separate
    launches (lora_fused off) up to a near tie of the reference."""
    name, path, refs, errs, ps, settings = base
    ps = [p for p, _ in zip(ps, FUSED_ROWS[rows], strict=False)]
    loras = FUSED_ROWS[rows]
    tokens, logits, fuses, _ = _fused_lora_run(path, settings, ps, loras, False, True, monkeypatch)
    assert fuses and len(logits) >= MAX_NEW - 1, f"{name}: {len(logits)} fused LoRA steps"  # (the first: prefill)
    worst = 0.0
    for i, (p, out, lora) in enumerate(zip(ps, tokens, loras, strict=True)):
        want = reference_logits(refs[lora], p + out[:-1])
        for t in range(1, MAX_NEW):  # decode step t - 1 chose out[t] from position len(p) - 1 + t
            err = float(np.abs(logits[t - 1][i] - want[len(p) - 1 + t]).max())
            worst = max(worst, err)
            assert err <= 1.5 * errs[lora], f"{name} row {i} ({lora}) step {t}: {err:.4f} > 1.5 x {errs[lora]:.4f}"
    print(f"{name} {rows} rows: fused LoRA logits' max error {worst:.4f}")
    separate, none, _, _ = _fused_lora_run(path, settings, ps, loras, False, False, monkeypatch)
    assert none == []  # lora_fused off: no step fused with adapters
    tol = 1.5 * max(errs.values())
    for lora in set(loras):
        idx = [i for i, x in enumerate(loras) if x == lora]
        check_eager_matches_graph(refs[lora], [ps[i] for i in idx], [tokens[i] for i in idx],
                                  [separate[i] for i in idx], tol, f"{name} {lora} fused/separate: ")  # fmt: skip
    same = sum(a == b for a, b in zip(tokens, separate, strict=True))
    print(f"{name} {rows} rows: {same}/{rows} rows' tokens equal to the separate launches'")


def test_the_adapters_one_row_graph_is_the_lora_fused_step(base, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With CUDA graphs, one row with an adapter replays the adapters' one-row graph, captured as the LoRA fused
    step: its tokens match the reference (teacher forcing) and the eager fused step's up to a near tie."""
    name, path, refs, errs, ps, settings = base
    tol = 1.5 * max(errs.values())
    graph_tokens, _, fuses, captured = _fused_lora_run(path, settings, ps[:1], ["r64"], True, True, monkeypatch)
    assert fuses and captured
    eager_tokens, logits, _, _ = _fused_lora_run(path, settings, ps[:1], ["r64"], False, True, monkeypatch)
    assert logits, f"{name}: the eager steps did not fuse"
    check_greedy(refs["r64"], ps[:1], graph_tokens, tol)
    check_eager_matches_graph(refs["r64"], ps[:1], eager_tokens, graph_tokens, tol, f"{name}: ")


@pytest.mark.parametrize("rows", list(FUSED_ROWS), ids=[f"{n}-rows" for n in FUSED_ROWS])
def test_the_shrinks_in_the_gemvs_grids_give_the_shrink_launches_logits_bit_for_bit(base, rows, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The LoRA fused step with each shrink in its GEMV's grid (``lora_shrink_in_grid``, the default) and with a
    shrink launch before each GEMV: the same staged input, the same sums in the same order, so every fused step's
    logits and every token are equal bit for bit, eager, over 16 steps of the same counters (1 and 4 rows)."""
    name, path, _, _, ps, settings = base
    ps = [p for p, _ in zip(ps, FUSED_ROWS[rows], strict=False)]
    loras = FUSED_ROWS[rows]
    grid_tokens, grid_logits, fuses, _ = _fused_lora_run(path, settings, ps, loras, False, True, monkeypatch)
    tokens, logits, _, _ = _fused_lora_run(path, settings, ps, loras, False, True, monkeypatch, in_grid=False)
    assert fuses and len(grid_logits) == len(logits) >= MAX_NEW - 1, f"{name}: {len(grid_logits)} fused LoRA steps"
    assert grid_tokens == tokens
    for t, (a, b) in enumerate(zip(grid_logits, logits, strict=True)):
        assert np.array_equal(a, b), f"{name} step {t}: max |difference| {float(np.abs(a - b).max()):.3g}"


def test_the_in_grid_one_row_graph_replays_the_shrink_launches_tokens(base, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The adapters' one-row CUDA graph with the shrinks in the GEMVs' grids (its counters used by the eager warm-up
    steps, then by every replay) decodes the tokens of the graph with shrink launches, bit for bit."""
    name, path, _, _, ps, settings = base
    grid_tokens, _, fuses, captured = _fused_lora_run(path, settings, ps[:1], ["r16"], True, True, monkeypatch)
    tokens, _, _, _ = _fused_lora_run(path, settings, ps[:1], ["r16"], True, True, monkeypatch, in_grid=False)
    assert fuses and captured
    assert grid_tokens == tokens, f"{name}: {grid_tokens} against {tokens}"

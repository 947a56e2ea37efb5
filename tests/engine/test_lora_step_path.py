"""An engine serving LoRA adapters runs a decode step none of whose rows takes an adapter as an engine without adapters
does, no GPU: the choice per step (no adapter row: the base path; any: the adapters' path), pinned by what is launched
eagerly and by what the replayed CUDA graph holds.

The runner is a :class:`~fi_engine.runtime.worker.model_runner.ModelRunner` made without its constructor (which needs
a GPU), over which the step's own code runs as it is: ``stage_decode`` / ``stage_decode_ahead`` (the rows' slots
written by ``fill_decode``), ``run_decode``, the Llama family's ``forward``, ``FusedDecode.fits``, and ``StepGraphs``
capturing and replaying through :class:`~fi_engine.kernels.graph.CudaGraph` over a stand-in CUDA runtime
(:class:`helpers.fake_cuda_graphs.FakeRuntime`). What touches the device is a recorder: each GEMM, attention, norm,
the adapters' launch pair of a projection group (``lora <group>``), the fused step, the LM head and the argmax,
logged eagerly or into the graph being captured.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.fake_cuda_graphs import FakeRuntime

import fi_engine.kernels.graph as graph_module
from fi_engine.models import llama
from fi_engine.models.llama import Llama
from fi_engine.runtime.sched.request import Request
from fi_engine.runtime.sched.step_arrays import decode_layout
from fi_engine.runtime.worker.fused_decode import FusedDecode
from fi_engine.runtime.worker.model_runner import ModelRunner
from fi_engine.runtime.worker.step_graphs import StepGraphs

PS = 16
LAYERS = 2
MAX_BATCH = 8  # decode graphs of 1, 2, 4 and 8 rows; the fused step serves up to 4


class Launches:
    """The device work of the steps, by where it went: run eagerly (``eager``), or into the graph being captured
    (``captured[exec]``, by the name the stand-in runtime gives that graph's executable when it is instantiated)."""

    def __init__(self, rt: FakeRuntime | None) -> None:
        self.rt = rt
        self.eager: list[str] = []
        self.captured: dict[str, list[str]] = defaultdict(list)

    def __call__(self, name: str) -> None:
        rt = self.rt
        if rt is not None and rt.capturing:
            self.captured[f"exec-graph{rt.serial + 1}"].append(name)
        else:
            self.eager.append(name)

    def replayed(self) -> list[str]:
        """What the graph launched last holds."""
        assert self.rt is not None and self.rt.launched
        return self.captured[self.rt.launched[-1]]


class AdapterSlots:
    """Stands in for :class:`~fi_engine.lora.device.DeviceSlots`: its ``apply`` (the shrink and expand pair after a
    projection group's GEMM) is logged."""

    def __init__(self, log: Launches) -> None:
        self.log = log

    def apply(self, group: str, layer: int, rows: int, x: int, x_ld: int, y: int, y_ld: int, slots: int) -> None:
        assert slots == 0x5107  # the step view's lora_slots: each row's slot, on the device
        self.log(f"lora {group}")

    def has(self, group: str) -> bool:  # the slots hold every group of the dense model
        return True


def bare_runner(
    rt: FakeRuntime | None, adapters: bool, cuda_graph: bool, lora_gemvs: bool = False
) -> tuple[ModelRunner, Launches]:
    """A runner of a 2-layer dense Llama serving adapters (or not), its decode graphs captured where ``cuda_graph``
    (over ``rt``): the host state the decode step reads, the recorders for the device work. ``lora_gemvs``: the
    LoRA fused step's GEMVs compiled (a stand-in serving up to 4 rows; the fused step logs its LoRA form)."""
    log = Launches(rt)
    r = ModelRunner.__new__(ModelRunner)
    r.family = Llama()
    r.config = SimpleNamespace(
        hidden_size=64, intermediate_size=128, num_layers=LAYERS, num_qo_heads=2, head_dim=32, qk_norm=False,
        rms_norm_eps=1e-5, rope=None,
    )  # fmt: skip
    r.max_batch, r.page_size, r.static_moe = MAX_BATCH, PS, False
    r.moe_layers, r.allreduce, r.vocab_shard, r.kv_fp8, r.comm = [], None, None, None, None
    r.fused_decode = True
    r.lora = AdapterSlots(log) if adapters else None
    r.step_lora = None
    r._decode_adapters = False
    r.step_graphs = StepGraphs(r)
    r.fused = FusedDecode(r)
    r.fused.step = lambda v, rows: log("fused step" if r.step_lora is None else "fused lora step")  # type: ignore[method-assign]
    r.lora_gemvs = SimpleNamespace(fits=lambda rows, k: rows <= 4) if lora_gemvs else None
    r.lora_fused = lora_gemvs  # (a runner compiles its LoRA GEMVs only where ModelRunner.lora_fused is on)
    r.silu_in_gate_up = True
    r.stream_ptr = 1234
    r.stream = SimpleNamespace(synchronize=lambda: None)
    r.cupy = SimpleNamespace(cuda=SimpleNamespace(using_allocator=lambda allocator: contextlib.nullcontext()))
    # the weights and buffers the pass reads by address (stand-ins: the pass only hands them to the launches)
    ptr = SimpleNamespace(data=SimpleNamespace(ptr=0x1000))
    r.buffers = SimpleNamespace(x=ptr, qkv=ptr, attn=ptr, gu=ptr, act=ptr)
    r.normed, r.qkv_width, r.gemm_type = ptr, 128, 0
    r.wqkv = r.wo = r.wgu = r.wd = r.ln1 = r.ln2 = [0] * LAYERS
    r.final_norm = 0
    r.dense = SimpleNamespace(
        linear=lambda *args: log("gemm"),
        gate_up_silu=lambda *args: (log("gemm"), args[-1]()),  # (eagerly: the GEMM, then the packed SiLU)
        bandwidth_bound=False,
        launcher=SimpleNamespace(open=True),
        quantized=SimpleNamespace(fuses_fp8=True, serves_fp8=False, serves_int4=False),
        # the engine's GEMV serves up to 4 rows
        fused=SimpleNamespace(fits=lambda rows, k: rows <= 4, has_gate_up_silu=lambda ab: True),
        close_choices=lambda rows, within, most: [],  # (no GEMM launch timed: the step's tuning tries none)
    )
    r.embed_and_norm = lambda v, rows: log("embed")
    r.append_kv = lambda v, i: log("append")
    r.add_norm = lambda v, weight: log("norm")
    # the step's SiLU, whichever kernel serves it (ModelRunner.release_rows), logged as the Llama pass's FlashInfer one
    r.releasing_silu_and_mul = lambda v: None
    r.decode_attention = lambda i, v: log("attention")
    r.head = lambda rows, x: log("head")
    r.sampler = SimpleNamespace(argmax=lambda rows: log("argmax"))
    layout = decode_layout(MAX_BATCH, 64)
    r.decode_arrays = layout.views(np.zeros(layout.total, np.int32))

    def upload(rows: int, n_pages: int, cuda_graph: bool) -> None:  # the copy and the plan (a layout per batch size)
        r.decode_plan = SimpleNamespace(info=(rows, cuda_graph), kind="batch_decode")

    r.upload_decode = upload  # type: ignore[method-assign]
    r.io = SimpleNamespace(staged=SimpleNamespace(synchronize=lambda: None))  # (stage_decode_ahead waits on it)
    views: dict[tuple[str, int], SimpleNamespace] = {}

    def view(kind: str, rows: int, batch: int) -> SimpleNamespace:  # made once per shape, as StepIO's
        # (q and gu: the log, which the stand-in RoPE and SiLU launches write to: logged_kernels)
        made = SimpleNamespace(
            kind=kind, rows=rows, prepared={}, lora_slots=0x5107, q=log, k=0, positions=0, gu=log, act=0
        )
        return views.setdefault((kind, rows), made)

    r.view = view  # type: ignore[method-assign]
    if cuda_graph:
        r.step_graphs.capture()
    return r, log


def decoding(slots: list[int]) -> list[Request]:
    """Decoding requests, one per entry of ``slots`` (each its adapter's GPU slot, -1: the base model)."""
    return [
        Request(rid=i, prompt=(5, 6, 7), max_new_tokens=8, budget_pages=1, output=[9], pages=[i + 1], lora_slot=s)
        for i, s in enumerate(slots)
    ]


def eager_step(r: ModelRunner, log: Launches, slots: list[int]) -> list[str]:
    log.eager.clear()
    r.stage_decode(decoding(slots))
    r.run_decode(len(slots))
    return list(log.eager)


def unfused(lora: bool) -> list[str]:
    """The launches of the separate step (forward, LM head), with the adapters' pair after each group's GEMM."""
    pair = (lambda g: [f"lora {g}"]) if lora else (lambda g: [])
    layer = [
        "gemm", *pair("qkv"), "rope", "append", "attention", "gemm", *pair("o"), "norm",
        "gemm", *pair("gate_up"), "silu", "gemm", *pair("down"), "norm",
    ]  # fmt: skip
    return ["embed", *layer * LAYERS, "head"]


@pytest.fixture(autouse=True)
def logged_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Llama pass's own launches of fi_ffi's ops, logged to the step view's log (its ``q`` and ``gu``)."""
    monkeypatch.setattr(
        llama,
        "kernels",
        SimpleNamespace(
            rope_inplace=lambda q, *a: q("rope"),
            silu_and_mul=lambda gu, *a: gu("silu"),
            prepared_silu_and_mul=lambda gu, *a: lambda: gu("silu"),
        ),
    )


@pytest.fixture
def fake_rt(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    rt = FakeRuntime()
    monkeypatch.setattr(graph_module, "_rt", lambda: rt)
    return rt


# ---------------------------------------------------------------------------------------------- eager steps


@pytest.mark.parametrize(
    ("slots", "want"),
    [
        ([-1], ["fused step"]),  # base rows: the fused step, as an engine without adapters
        ([-1, -1, -1, -1], ["fused step"]),
        ([-1] * 6, unfused(False)),  # past the fused GEMV's rows: the separate launches, no adapters' pair
        ([0], unfused(True)),  # a row takes an adapter: the separate launches with the pair after each group
        ([-1, -1, 2], unfused(True)),
        ([1, -1, 0, -1, -1, -1], unfused(True)),
    ],
    ids=["1-base", "4-base", "6-base", "1-adapter", "3-one-adapter", "6-two-adapters"],
)
def test_an_eager_step_takes_the_adapters_path_only_where_a_row_takes_an_adapter(slots, want) -> None:
    r, log = bare_runner(None, adapters=True, cuda_graph=False)
    assert eager_step(r, log, slots) == want
    assert (r.step_lora is r.lora) == any(s >= 0 for s in slots)


def test_a_step_of_base_rows_launches_what_an_engine_without_adapters_does() -> None:
    with_adapters, log_a = bare_runner(None, adapters=True, cuda_graph=False)
    without, log_b = bare_runner(None, adapters=False, cuda_graph=False)
    for rows in (1, 3, 6):
        assert eager_step(with_adapters, log_a, [-1] * rows) == eager_step(without, log_b, [-1] * rows)


def test_the_choice_follows_each_step_its_rows_as_they_change() -> None:
    # a batch whose adapter row ends: the steps after it are the base path; a new adapter row: the adapters' again
    r, log = bare_runner(None, adapters=True, cuda_graph=False)
    runs = [eager_step(r, log, s) for s in ([-1, 0], [-1, -1], [-1], [3, -1])]
    assert runs == [unfused(True), ["fused step"], ["fused step"], unfused(True)]


# ---------------------------------------------------------------------------------------------- CUDA graphs


def test_an_engine_serving_adapters_captures_each_decode_graph_with_and_without_them(fake_rt) -> None:
    r, log = bare_runner(fake_rt, adapters=True, cuda_graph=True)
    g = r.step_graphs
    assert g.sets() == (False, True)
    assert sorted(g.graphs) == sorted(g.lora_graphs) == [1, 2, 4, 8] and r.graph is g.graphs[8]
    assert not {id(x) for x in g.graphs.values()} & {id(x) for x in g.lora_graphs.values()}
    assert set(g.capture_s) == {False, True}
    # the base set is an engine without adapters' graphs, launch for launch (the fused step at one row); the other
    # has the adapters' pair after each group's GEMM
    plain, plain_log = bare_runner(fake_rt, adapters=False, cuda_graph=True)
    for rows in (1, 2, 4, 8):
        base = log.captured[g.graphs[rows]._exec]
        assert base == (["fused step", "argmax"] if rows == 1 else [*unfused(False), "argmax"])
        assert base == plain_log.captured[plain.step_graphs.graphs[rows]._exec]
        assert log.captured[g.lora_graphs[rows]._exec] == [*unfused(True), "argmax"]
    assert r.step_lora is None  # (each step sets its own)


@pytest.mark.parametrize(
    "weights, most",
    [("int4", 8), ("int4 at one row", 1), ("int4, launch path closed", 4), ("fp8 epilogues", 1), ("fp8 fused", 1),
     ("16-bit", 1)],
)  # fmt: skip
def test_decode_graphs_over_int4_weights_capture_the_fused_step_up_to_8_rows(
    fake_rt, monkeypatch: pytest.MonkeyPatch, weights: str, most: int
) -> None:
    # over int4 weights the graphs of 2-8 rows capture the fused step too (its GEMVs are the separate launches'
    # kernels; past 4 rows its LM head the separate launches' norm and GEMM); over FP8 (either form of its step) and
    # 16-bit weights, only the one-row graph does
    r, log = bare_runner(fake_rt, adapters=False, cuda_graph=False)
    q = r.dense.quantized
    q.fp8_fused = weights == "fp8 fused"
    q.serves_int4 = weights.startswith("int4")
    q.serves_fp8 = weights.startswith("fp8")
    if weights == "int4 at one row":
        monkeypatch.setattr(ModelRunner, "graph_fused_int4_rows", 1)
    if weights == "int4, launch path closed":  # (no wide form: the rows the fused GEMVs' own fits serves, 4 here)
        r.dense.launcher.open = False
    assert r.fused.quantized == weights.startswith(("int4", "fp8 epilogues"))
    r.step_graphs.capture()
    assert r.fused.fits_int4_wide(8) == (weights in ("int4", "int4 at one row")) and not r.fused.fits_int4_wide(9)
    for rows in (1, 2, 4, 8):
        fused = ["fused step", "argmax"] if rows <= most else [*unfused(False), "argmax"]
        assert log.captured[r.step_graphs.graphs[rows]._exec] == fused, rows


def _replay(r: ModelRunner, slots: list[int], ahead: bool = False) -> None:
    if ahead:
        r.stage_decode_ahead(decoding(slots), ahead=1)
    else:
        r.stage_decode(decoding(slots))
    _, argmax_done = r.run_decode(len(slots))
    assert argmax_done


@pytest.mark.parametrize("ahead", [False, True], ids=["staged", "staged-ahead"])
def test_each_step_replays_the_graph_of_its_rows_adapters(fake_rt, ahead) -> None:
    r, log = bare_runner(fake_rt, adapters=True, cuda_graph=True)
    g = r.step_graphs
    steps = [([-1], False), ([0], True), ([-1, -1], False), ([-1, 1], True), ([-1] * 4, False), ([2, -1, -1, 0], True)]
    for slots, adapters in steps:
        log.eager.clear()
        _replay(r, slots, ahead)
        graph = (g.lora_graphs if adapters else g.graphs)[len(slots)]
        assert fake_rt.launched[-1] == graph._exec, slots
        assert ("lora qkv" in log.replayed()) == adapters
        assert ("fused step" in log.replayed()) == (len(slots) == 1 and not adapters)
        assert log.eager == []  # nothing launched outside the graph
    assert len(fake_rt.launched) == len(steps)


def test_an_engine_without_adapters_captures_one_set(fake_rt) -> None:
    r, log = bare_runner(fake_rt, adapters=False, cuda_graph=True)
    g = r.step_graphs
    assert g.sets() == (False,) and sorted(g.graphs) == [1, 2, 4, 8] and g.lora_graphs == {}
    _replay(r, [-1, -1])
    assert fake_rt.launched == [g.graphs[2]._exec] and "lora qkv" not in log.replayed()


def test_with_lora_base_graphs_off_every_step_replays_the_adapters_graphs(fake_rt, monkeypatch) -> None:
    monkeypatch.setattr(ModelRunner, "lora_base_graphs", False)
    r, log = bare_runner(fake_rt, adapters=True, cuda_graph=True)
    g = r.step_graphs
    assert g.sets() == (True,) and g.graphs is g.lora_graphs and sorted(g.graphs) == [1, 2, 4, 8]
    assert set(g.capture_s) == {True}
    for slots in ([-1], [0], [-1, -1, -1, -1]):
        _replay(r, slots)
        assert log.replayed() == [*unfused(True), "argmax"]
    assert len(fake_rt.live) == 2 * 4  # one graph and one executable per batch size
    g.close()
    assert not fake_rt.live and not g.graphs  # each closed once (the one set is both)


def test_closing_frees_both_sets(fake_rt) -> None:
    r, _ = bare_runner(fake_rt, adapters=True, cuda_graph=True)
    assert len(fake_rt.live) == 2 * 2 * 4  # two sets of 4 batch sizes, a graph and an executable each
    r.step_graphs.close()
    assert not fake_rt.live and not r.step_graphs.graphs and not r.step_graphs.lora_graphs and r.graph is None


# ---------------------------------------------------------------------------------------------- the LoRA fused step


@pytest.mark.parametrize(
    ("slots", "want"),
    [
        ([0], ["fused lora step"]),  # a row takes an adapter: the fused step's LoRA form
        ([-1, -1, 2], ["fused lora step"]),
        ([3, 1, 0, 2], ["fused lora step"]),
        ([1, -1, 0, -1, -1, -1], unfused(True)),  # past the fused GEMVs' 4 rows: the separate launches
        ([-1], ["fused step"]),  # base rows: the base fused step
    ],
    ids=["1-adapter", "3-one-adapter", "4-four-adapters", "6-two-adapters", "1-base"],
)
def test_with_the_lora_gemvs_an_adapter_step_of_up_to_4_rows_is_fused(slots, want) -> None:
    r, log = bare_runner(None, adapters=True, cuda_graph=False, lora_gemvs=True)
    assert eager_step(r, log, slots) == want


def test_with_lora_fused_off_or_no_lora_gemvs_an_adapter_step_takes_the_separate_launches(monkeypatch) -> None:
    r, log = bare_runner(None, adapters=True, cuda_graph=False, lora_gemvs=False)  # (not compiled)
    assert eager_step(r, log, [0]) == unfused(True)
    r, log = bare_runner(None, adapters=True, cuda_graph=False, lora_gemvs=True)
    r.lora_fused = False  # (compiled, the switch then turned off)
    assert eager_step(r, log, [0]) == unfused(True)
    assert eager_step(r, log, [-1]) == ["fused step"]  # (base rows: unchanged)


@pytest.mark.parametrize(
    "change",
    ["fp8 weights", "int4 weights", "silu prologue", "no gate/up silu kernels", "intermediate too wide", "moe mlp"],
)
def test_the_lora_form_refuses_what_its_kernels_do_not_serve(change) -> None:
    r, _ = bare_runner(None, adapters=True, cuda_graph=False, lora_gemvs=True)
    r.step_lora = r.lora
    assert r.fused.fits_lora(1) and r.fuses(1)
    if change == "fp8 weights":
        r.dense.quantized.serves_fp8 = True
    elif change == "int4 weights":
        r.dense.quantized.serves_int4 = True
    elif change == "silu prologue":
        r.silu_in_gate_up = False
    elif change == "no gate/up silu kernels":
        r.dense.fused.has_gate_up_silu = lambda ab: False
    elif change == "intermediate too wide":
        r.lora_gemvs.fits = lambda rows, k: k < r.config.intermediate_size
    else:  # a MoE model whose adapters change its MLP groups (its experts take none)
        r.moe_layers = [SimpleNamespace(packs_step=lambda rows, dense: True)] * LAYERS
        r.dense_moe = lambda rows: False  # type: ignore[method-assign]
    assert not r.fused.fits_lora(1) and not r.fuses(1)
    r.step_lora = None
    assert r.fuses(1)  # a step of base rows: the base step's own conditions only


def test_the_adapters_one_row_graph_captures_the_lora_fused_step(fake_rt) -> None:
    r, log = bare_runner(fake_rt, adapters=True, cuda_graph=True, lora_gemvs=True)
    g = r.step_graphs
    for rows in (1, 2, 4, 8):  # graph_fused_decode: the fused step at one row only, in both sets
        want = ["fused lora step", "argmax"] if rows == 1 else [*unfused(True), "argmax"]
        assert log.captured[g.lora_graphs[rows]._exec] == want
        base = ["fused step", "argmax"] if rows == 1 else [*unfused(False), "argmax"]
        assert log.captured[g.graphs[rows]._exec] == base
    _replay(r, [0])
    assert log.replayed() == ["fused lora step", "argmax"]
    _replay(r, [-1])
    assert log.replayed() == ["fused step", "argmax"]


def test_a_decode_graph_refuses_a_step_planned_for_another_kernel(fake_rt) -> None:
    # a graph holds the attention kernel of the plan it was captured with (Llama.plan_decode: the decode kernel or
    # FlashInfer's prefill kernel); a step whose plan is of the other kernel (its workspace laid out for that one) is
    # refused at every replay, not only the first, and nothing is launched
    r, _ = bare_runner(fake_rt, adapters=False, cuda_graph=True)
    _replay(r, [-1, -1])
    launched = len(fake_rt.launched)
    upload = r.upload_decode

    def planned_for_the_prefill_kernel(rows: int, n_pages: int, cuda_graph: bool) -> None:
        upload(rows, n_pages, cuda_graph)
        r.decode_plan.kind = "batch_prefill"

    r.upload_decode = planned_for_the_prefill_kernel  # type: ignore[method-assign]
    for _ in range(2):
        with pytest.raises(
            RuntimeError, match="captured with a batch_decode plan; this step's plan is a batch_prefill"
        ):
            _replay(r, [-1, -1])
    assert len(fake_rt.launched) == launched
    r.upload_decode = upload  # type: ignore[method-assign]
    _replay(r, [-1, -1])
    assert len(fake_rt.launched) == launched + 1


def test_a_graph_size_captured_on_two_kernels_replays_the_one_of_each_steps_plan(fake_rt) -> None:
    # ModelRunner.tensor_core_decode_context: the one-row decode graph is captured on the decode kernel and again on
    # FlashInfer's prefill kernel (Llama.decode_graph_kernels), with and without the adapters' launches, and each step
    # replays the graph of its own plan's kind (Llama.step_kernel: by the step's longest context); the other sizes
    # keep one graph, their capture's kernel (here the prefill kernel, tensor_core_decode_rows 2)
    r, log = bare_runner(fake_rt, adapters=True, cuda_graph=False)
    r.config = SimpleNamespace(**{**vars(r.config), "num_qo_heads": 8, "num_kv_heads": 2})
    r.tensor_core_decode_rows, r.tensor_core_decode_context = 2, 40

    def plan(rows: int, cuda_graph: bool, kind: str | None = None) -> None:  # the family's choice, a stand-in plan
        kind = kind or (r.family.step_kernel(r, rows) if cuda_graph else "batch_decode")
        r.decode_plan = SimpleNamespace(info=(rows, kind), kind=kind)

    r.plan_decode = plan  # type: ignore[method-assign]
    r.upload_decode = lambda rows, n_pages, cuda_graph: plan(rows, cuda_graph)  # type: ignore[method-assign]
    g = r.step_graphs
    g.capture()
    assert g._plan_kinds == {1: "batch_decode", 2: "batch_prefill", 4: "batch_prefill", 8: "batch_prefill"}
    assert set(g.second_graphs) == set(g.second_lora_graphs) == {1}
    assert len({id(x) for x in (g.graphs[1], g.lora_graphs[1], g.second_graphs[1], g.second_lora_graphs[1])}) == 4
    assert log.captured[g.second_graphs[1]._exec] == ["fused step", "argmax"]

    def request(context: int, slot: int) -> Request:  # a request whose next step attends to `context` tokens
        pages = list(range(1, -(-context // PS) + 1))
        return Request(rid=0, prompt=(5,) * (context - 1), max_new_tokens=8, budget_pages=len(pages), output=[9],
                       pages=pages, lora_slot=slot)  # fmt: skip

    for context, slot, want in [
        (39, -1, g.graphs[1]),
        (40, -1, g.second_graphs[1]),
        (200, 0, g.second_lora_graphs[1]),
        (3, 0, g.lora_graphs[1]),
        (41, -1, g.second_graphs[1]),
    ]:
        r.stage_decode([request(context, slot)])
        assert g.planned_graph(1, adapters=slot >= 0) is want  # (what a benchmark replaying the step itself times)
        r.run_decode(1)
        assert fake_rt.launched[-1] == want._exec, (context, slot)
    r.stage_decode([request(500, -1), request(3, -1)])  # two rows: the prefill kernel's one graph at any context
    r.run_decode(2)
    assert fake_rt.launched[-1] == g.graphs[2]._exec
    # a plan of a kernel the size was not captured on is refused
    r.decode_plan = SimpleNamespace(info=(2, "batch_decode"), kind="batch_decode")
    with pytest.raises(RuntimeError, match="captured with a batch_prefill plan; this step's plan is a batch_decode"):
        g.replay_decode(2)
    with pytest.raises(RuntimeError, match="captured with a batch_prefill plan"):
        g.planned_graph(2)
    r.decode_plan = SimpleNamespace(info=(1, "other"), kind="other")
    with pytest.raises(RuntimeError, match="captured with a batch_decode and batch_prefill plan"):
        g.replay_decode(1)
    g.close()
    assert not (g.graphs or g.lora_graphs or g.second_graphs or g.second_lora_graphs)


@pytest.mark.parametrize(("context", "heads"), [(0, 8), (40, 2)], ids=["setting-off", "few-query-heads"])
def test_without_the_setting_or_the_heads_each_graph_size_keeps_one_kernel(fake_rt, context, heads) -> None:
    r, _ = bare_runner(fake_rt, adapters=False, cuda_graph=False)
    r.config = SimpleNamespace(**{**vars(r.config), "num_qo_heads": heads, "num_kv_heads": 2})
    r.tensor_core_decode_rows, r.tensor_core_decode_context = 2, context

    def plan(rows: int, cuda_graph: bool, kind: str | None = None) -> None:
        kind = kind or r.family.step_kernel(r, rows)
        r.decode_plan = SimpleNamespace(info=(rows, kind), kind=kind)

    r.upload_decode = lambda rows, n_pages, cuda_graph: plan(rows, cuda_graph)  # type: ignore[method-assign]
    r.step_graphs.capture()
    assert not r.step_graphs.second_graphs
    prefill = heads >= 8
    assert r.step_graphs._plan_kinds[1] == "batch_decode"
    assert r.step_graphs._plan_kinds[2] == ("batch_prefill" if prefill else "batch_decode")


def test_with_lora_base_graphs_off_every_step_replays_the_adapters_graph_of_its_kernel(fake_rt) -> None:
    # one set of decode graphs serves every step (lora_base_graphs off): the second graphs are that set's too, so a
    # one-row step without an adapter row at a long context replays the adapters' graph on the prefill kernel
    r, log = bare_runner(fake_rt, adapters=True, cuda_graph=False)
    r.lora_base_graphs = False
    r.config = SimpleNamespace(**{**vars(r.config), "num_qo_heads": 8, "num_kv_heads": 2})
    r.tensor_core_decode_rows, r.tensor_core_decode_context = 2, 40

    def plan(rows: int, cuda_graph: bool, kind: str | None = None) -> None:
        kind = kind or r.family.step_kernel(r, rows)
        r.decode_plan = SimpleNamespace(info=(rows, kind), kind=kind)

    r.plan_decode = plan  # type: ignore[method-assign]
    r.upload_decode = lambda rows, n_pages, cuda_graph: plan(rows, cuda_graph)  # type: ignore[method-assign]
    g = r.step_graphs
    g.capture()
    assert g.second_graphs is g.second_lora_graphs and set(g.second_graphs) == {1}
    assert log.captured[g.second_graphs[1]._exec] == [*unfused(True), "argmax"]  # (the adapters' step)
    pages = [1, 2, 3, 4]
    for slot in (-1, 0):
        r.stage_decode([Request(rid=0, prompt=(5,) * 49, max_new_tokens=8, budget_pages=4, output=[9], pages=pages,
                                lora_slot=slot)])  # fmt: skip
        r.run_decode(1)
        assert fake_rt.launched[-1] == g.second_graphs[1]._exec, slot

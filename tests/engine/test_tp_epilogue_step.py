"""A tensor-parallel rank's decode step of 1-4 rows runs RoPE + the KV append and SiLU-and-mul as the QKV and gate/up
GEMVs' epilogues (``TpEpilogueStep``, the runner's ``tp_fused``), no GPU: which launches a step makes with the
runner's ``tp_fused_epilogues`` on and off, eagerly and in the captured decode graphs; the two GEMVs packed once per
step view in the PLAIN mode over the all-reduce's normalized rows; every condition that keeps the separate launches
refused by its name.

The runner is a :class:`~fi_engine.runtime.worker.model_runner.ModelRunner` made without its constructor (which needs
GPUs), over which the step's own code runs as it is: ``stage_decode``, ``run_decode``, ``decode_pass``, the Llama
family's ``forward``, ``TpEpilogueStep`` and ``StepGraphs`` capturing through
:class:`~fi_engine.kernels.graph.CudaGraph` over a stand-in CUDA runtime
(:class:`helpers.fake_cuda_graphs.FakeRuntime`).
What touches the device is a recorder: each GEMM, the two epilogue GEMVs, RoPE, the append, SiLU, the attention,
the all-reduce + norm, the embedding, the LM head and the argmax, logged eagerly or into the graph being captured.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from helpers.fake_cuda_graphs import FakeRuntime, install_fake_runtime, log_llama_pass_kernels
from helpers.runner_stand_in import log_runner_launches

from fi_engine.checkpoint.config import RopeConfig
from fi_engine.kernels.fused_args import PLAIN, RopeAppend
from fi_engine.kernels.fused_gemv import FusedGemvs
from fi_engine.models.llama import Llama
from fi_engine.runtime.sched.request import Request
from fi_engine.runtime.worker.fused_decode import FusedDecode
from fi_engine.runtime.worker.model_runner import ModelRunner
from fi_engine.runtime.worker.step_graphs import StepGraphs
from fi_engine.runtime.worker.tp_epilogues import TpEpilogueStep

pytestmark = pytest.mark.cpu_only

LAYERS, H, INTER, MAX_BATCH = 2, 64, 96, 8  # decode graphs of 1, 2, 4 and 8 rows; the fused GEMVs serve up to 4
NORMED, QKV, ACT = 0x2000, 0x3000, 0x4000  # the rank's buffers (x2: the all-reduce's normalized rows)


class Recorder:
    """The device work of the steps by where it went: eagerly (``eager``) or into the graph being captured
    (``captured[exec]``, the name the stand-in runtime gives its executable); ``packed``: each epilogue GEMV packed,
    with its arguments."""

    def __init__(self, rt: FakeRuntime | None) -> None:
        self.rt = rt
        self.eager: list[str] = []
        self.captured: dict[str, list[str]] = defaultdict(list)
        self.packed: list[tuple[str, tuple[Any, ...]]] = []

    def __call__(self, name: str) -> None:
        if self.rt is not None and self.rt.capturing:
            self.captured[f"exec-graph{self.rt.serial + 1}"].append(name)
        else:
            self.eager.append(name)

    def packer(self, name: str) -> Any:
        """A stand-in ``FusedGemvs.prepared_*``: records the call, returns the launch (which logs ``name``)."""

        def pack(*args: Any) -> Any:
            self.packed.append((name, args))
            return lambda: self(name)

        return pack


def rank_runner(rt: FakeRuntime | None = None, **conditions: Any) -> tuple[ModelRunner, Recorder]:
    """Rank 0 of 2 of a dense 2-layer Llama (16-bit weights, the fused all-reduce), its decode graphs captured where
    ``rt`` is given; ``conditions`` overrides one runner attribute (``qk_norm`` the config's)."""
    log = Recorder(rt)
    r = ModelRunner.__new__(ModelRunner)
    r.family = Llama()
    r.config = SimpleNamespace(
        hidden_size=H, intermediate_size=INTER, num_layers=LAYERS, num_qo_heads=2, num_kv_heads=1, head_dim=32,
        qk_norm=conditions.pop("qk_norm", False), rms_norm_eps=1e-5, rope=RopeConfig(),
    )  # fmt: skip
    r.max_batch, r.page_size, r.static_moe, r.tensor_parallel = MAX_BATCH, 16, False, 2
    r.moe_layers, r.vocab_shard, r.kv_fp8, r.comm, r.lora, r.step_lora = [], None, None, object(), None, None
    r.allreduce = SimpleNamespace(fused=True)
    r.fused_decode, r._decode_adapters = True, False
    r.step_graphs, r.fused, r.tp_fused = StepGraphs(r), FusedDecode(r), TpEpilogueStep(r)
    r.stream_ptr, r.stream = 1234, SimpleNamespace(synchronize=lambda: None)
    r.cupy = SimpleNamespace(cuda=SimpleNamespace(using_allocator=lambda allocator: contextlib.nullcontext()))
    at = lambda ptr: SimpleNamespace(data=SimpleNamespace(ptr=ptr))  # noqa: E731
    r.buffers = SimpleNamespace(x=at(0x1000), qkv=at(QKV), attn=at(0x5000), gu=at(0x6000), act=at(ACT))
    r.normed, r.qkv_width, r.gemm_type = at(NORMED), 128, 2
    r.wqkv, r.wgu = [0x10, 0x11], [0x20, 0x21]
    r.wo = r.wd = r.ln1 = r.ln2 = [0] * LAYERS
    r.final_norm = 0
    cache = SimpleNamespace(data_ptr=0x9000, shape=(8, 16, 1, 32), strides=(512, 32, 32, 1))
    r.k_cache = r.v_cache = [cache] * LAYERS
    r.dense = SimpleNamespace(
        linear=lambda *args: log("gemm"),
        gate_up_silu=lambda *args: (log("gemm"), args[-1]()),  # (eagerly: the GEMM, then the packed SiLU)
        bandwidth_bound=False,
        quantized=SimpleNamespace(fuses_fp8=True, serves_fp8=False, serves_int4=False),
        fused=SimpleNamespace(
            fits=lambda rows, k: rows <= 4,
            has_qkv_rope=lambda ab, d, mode: mode == PLAIN and ab == 2 and d == 32,  # (the kernels of type 2 only)
            has_gate_up_silu=lambda ab, mode: mode == PLAIN and ab == 2,
            prepared_qkv_rope=log.packer("qkv gemv + rope + append"),
            prepared_gate_up_silu=log.packer("gate/up gemv + silu"),
        ),
    )
    log_runner_launches(r, log, MAX_BATCH, norm="all-reduce + norm")
    r.upload_decode = lambda rows, n_pages, cuda_graph: setattr(r, "decode_plan", SimpleNamespace(info=rows))
    index = lambda ptr: SimpleNamespace(data_ptr=ptr)  # noqa: E731
    views: dict[int, SimpleNamespace] = {}

    def view(kind: str, rows: int, batch: int) -> SimpleNamespace:  # made once per shape, as StepIO's
        # (q and gu: the log, which the stand-in RoPE and SiLU launches write to: logged_kernels)
        made = SimpleNamespace(
            kind=kind, rows=rows, prepared={}, q=log, k=0, gu=log, act=0, positions=index(0x7000),
            batch_indices=index(0x7100), kv_indptr=index(0x7200), kv_indices=index(0x7300),
        )  # fmt: skip
        return views.setdefault(rows, made)

    r.view = view  # type: ignore[method-assign]
    for name, value in conditions.items():
        setattr(r, name, value)
    if rt is not None:
        r.step_graphs.capture()
    return r, log


@pytest.fixture(autouse=True)
def logged_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    log_llama_pass_kernels(monkeypatch)


@pytest.fixture
def fake_rt(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    return install_fake_runtime(monkeypatch)


def separate() -> list[str]:
    """The launches of the separate step (the family's forward and the LM head): 10 a layer with the attention."""
    layer = ["gemm", "rope", "append", "attention", "gemm", "all-reduce + norm", "gemm", "silu", "gemm",
             "all-reduce + norm"]  # fmt: skip
    return ["embed", *layer * LAYERS, "head"]


def epilogues() -> list[str]:
    """The launches of the epilogue step: RoPE + append and SiLU inside the two GEMVs, 7 a layer."""
    layer = ["qkv gemv + rope + append", "attention", "gemm", "all-reduce + norm", "gate/up gemv + silu", "gemm",
             "all-reduce + norm"]  # fmt: skip
    return ["embed", *layer * LAYERS, "head"]


def eager_step(r: ModelRunner, log: Recorder, rows: int) -> list[str]:
    log.eager.clear()
    r.stage_decode([Request(rid=i, prompt=(5, 6), max_new_tokens=4, budget_pages=1, output=[9], pages=[i + 1])
                    for i in range(rows)])  # fmt: skip
    r.run_decode(rows)
    return list(log.eager)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("on", [True, False], ids=["switch-on", "switch-off"])
def test_an_eager_step_of_1_to_4_rows_takes_the_epilogues_where_the_switch_is_on(monkeypatch, rows, on) -> None:
    monkeypatch.setattr(ModelRunner, "tp_fused_epilogues", on)
    r, log = rank_runner()
    assert eager_step(r, log, rows) == (epilogues() if on and rows <= 4 else separate())
    assert len(epilogues()) == len(separate()) - 3 * LAYERS  # RoPE, append and SiLU: 3 launches a layer fewer


def test_the_epilogue_gemvs_are_packed_once_per_view_in_the_plain_mode_over_the_normalized_rows() -> None:
    r, log = rank_runner()
    for _ in range(3):
        assert eager_step(r, log, 2) == epilogues()
    assert [name for name, _ in log.packed] == ["qkv gemv + rope + append", "gate/up gemv + silu"] * LAYERS
    # the norm's operands (h, h_ld, norm_weight, h_out, eps) left at FusedGemvs.linear's defaults: unused by PLAIN
    defaults = [p.default for p in inspect.signature(FusedGemvs.linear).parameters.values()][-5:]
    assert defaults == [0, 0, 0, 0, 0.0]
    for i in range(LAYERS):
        (_, qkv), (_, gate_up) = log.packed[2 * i : 2 * i + 2]
        # (rope, mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type)
        assert qkv[1:] == (PLAIN, 2, NORMED, H, r.wqkv[i], 128, H, QKV, 128, 2, 2)
        rope = qkv[0]
        assert isinstance(rope, RopeAppend) and (rope.hq, rope.hk, rope.d, rope.positions) == (2, 1, 32, 0x7000)
        # (mode, rows, x, x_ld, w, n, k, y, y_ld, ab_type, c_type)
        assert gate_up == (PLAIN, 2, NORMED, H, r.wgu[i], 2 * INTER, H, ACT, INTER, 2, 2)
    eager_step(r, log, 3)  # another view: packed again, for its rows
    assert len(log.packed) == 4 * LAYERS and log.packed[-1][1][1] == 3


@pytest.mark.parametrize("on", [True, False], ids=["switch-on", "switch-off"])
def test_the_decode_graphs_of_1_to_4_rows_capture_the_epilogues(monkeypatch, fake_rt, on) -> None:
    monkeypatch.setattr(ModelRunner, "tp_fused_epilogues", on)
    r, log = rank_runner(fake_rt)
    g = r.step_graphs
    assert sorted(g.graphs) == [1, 2, 4, 8]
    for rows in (1, 2, 4, 8):
        want = epilogues() if on and rows <= 4 else separate()
        assert log.captured[g.graphs[rows]._exec] == [*want, "argmax"], rows
    log.eager.clear()
    row = Request(rid=0, prompt=(5,), max_new_tokens=4, budget_pages=1, output=[9], pages=[1])
    r.stage_decode([row, row, row, None])  # 3 rows padded to the 4-row graph (as the serving loop pads them)
    r.run_decode(4)
    assert fake_rt.launched[-1] == g.graphs[4]._exec and log.eager == []


@pytest.mark.parametrize(
    ("condition", "value", "name"),
    [
        ("tp_fused_epilogues", False, "tp_fused_epilogues"),
        ("allreduce", None, "allreduce"),
        ("family", SimpleNamespace(llama_pass=False), "llama_pass"),
        ("step_lora", object(), "step_lora"),
        ("moe_layers", [object()] * LAYERS, "moe_layers"),
        ("qk_norm", True, "qk_norm"),
        ("kv_fp8", object(), "kv_fp8"),
        ("gemm_type", 3, "epilogue kernels"),
    ],
)
def test_each_condition_that_keeps_the_separate_launches_is_refused_by_its_name(condition, value, name) -> None:
    r, _ = rank_runner(**{condition: value})
    assert r.tp_fused.refusal(2) == name and not r.tp_fused.fits(2)
    assert rank_runner()[0].tp_fused.refusal(2) is None


@pytest.mark.parametrize(
    ("quantized", "fits", "name"),
    [
        (dict(serves_fp8=True), None, "quantized weights"),
        (dict(serves_int4=True), None, "quantized weights"),
        ({}, lambda rows, k: False, "rows"),
        ({}, lambda rows, k: k == H, None),  # (the gate/up GEMV's input is the hidden rows too: k = H, not INTER)
    ],
)
def test_quantized_weights_and_rows_past_the_fused_gemvs_are_refused_by_name(quantized, fits, name) -> None:
    r, _ = rank_runner()
    r.dense.quantized.__dict__.update(quantized)
    if fits is not None:
        r.dense.fused.fits = fits
    assert r.tp_fused.refusal(1) == name


def test_a_step_with_a_refusal_launches_the_separate_step() -> None:
    # Qwen3's per-head norms would come between the QKV GEMV and RoPE: the family's forward (which launches them;
    # the stand-in config has no q_norm weights, so the kv_fp8 refusal stands in for every such condition)
    r, log = rank_runner(kv_fp8=SimpleNamespace(append=lambda v, rows, i: log("append"), scale_output=lambda v, r: 0))
    assert eager_step(r, log, 1) == separate()

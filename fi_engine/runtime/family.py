"""A model family as a definition the engine holds, not a subclass overriding the engine: what differs between
Llama (and Qwen3, Mixtral, Qwen3-MoE), Gemma 2, gpt-oss and DeepSeek-V3/V2 is their config, their weights, their
layer body (embedding to the final norm) and their attention plans; the serving loop, scheduler, buffers of the step
index arrays, graphs, LM head and sampling are the engine's parts (:class:`~fi_engine.runtime.engine.Engine`).

A definition is made once per engine (``Engine.definition()``, with the engine class's family options) and keeps its
own state on itself (Gemma 2's extra norms, gpt-oss's sinks, DeepSeek's MLA caches). Each of its methods takes the
model runner ``eng`` (:class:`~fi_engine.runtime.worker.model_runner.ModelRunner`) and reaches it only through the
family interface (declared and documented in :class:`~fi_engine.runtime.worker.state.RunnerState`): the device context
(``eng.cupy``, ``eng.stream_ptr``, ``eng.dense``), the weights its ``load`` sets (``eng.wqkv``, ``eng.ln1``, ...),
the buffers its ``allocate`` sets or asks for (``eng.allocate_layers()``, ``eng.buffers``, ``eng.k_cache``), the
plans its ``plan_*`` set (``eng.decode_plan``), and the public methods ``embed_and_norm``, ``add_norm``,
``append_kv``, ``dense_moe``; never a private (``_name``) attribute, which tests/package/test_structure.py checks.

The runner calls, in its constructor, ``read_config``, ``check`` (before any GPU work, with ``tensor_parallel`` and
``cuda_graph`` set), ``load``, ``allocate``; per step ``plan_prefill`` / ``plan_decode``, ``forward`` with
``prefill_attention`` / ``decode_attention``, ``finish_logits``; ``close`` after its own teardown.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..checkpoint.safetensors import Checkpoint

__all__: list[str] = []


class ModelFamily:
    """The definition of one model family (the methods a family provides; the defaults say what is optional)."""

    llama_pass: bool = False
    """The family's forward is the engine's Llama pass (:class:`~fi_engine.models.llama.Llama`): the fused decode step
    (:mod:`~fi_engine.runtime.worker.fused_decode`) and the padded prefill graphs
    (:mod:`~fi_engine.runtime.worker.step_graphs`) serve it. False
    for a layer body with host work between launches, which a graph would not repeat, or other launches."""

    fp8_kv_refusal: str = "this model family's attention"
    """What has no FP8 KV-cache kernel in this family (``kv_cache_dtype="fp8_e4m3"`` is refused naming it, see
    :mod:`~fi_engine.layers.kv_fp8`); ``""`` where its attention reads an e4m3 cache (the Llama pass)."""

    serves_lora: bool = False
    """The family's forward adds LoRA adapters to its projections (``eng.step_lora.apply`` after each GEMM, where
    ``eng.step_lora`` is set: a row of the step takes an adapter, :mod:`fi_engine.lora`); an engine opened with ``lora``
    settings refuses a family without it."""

    moe_scratch: Any = None
    """The activation buffers every MoE layer of the model shares (:class:`~fi_engine.layers.moe.MoEScratch`; they
    run in turn), made by the first MoE layer's load; None for a model without routed experts."""

    experts_stored: bool = False
    """Whether the MoE layers hold e4m3 experts as stored (``MoELayer(fp8_experts=...)``), set by the family's load
    before its first layer (the Llama family's, for FP8 Mixtral and Qwen3-MoE checkpoints; DeepSeek's, for its FP8
    routed experts)."""

    moe_expert_copy: Any = None
    """``(gate_up, down)``: the 16-bit buffers of one layer's experts that every MoE layer with e4m3 experts
    writes its copy into before a path that reads 16-bit weights (``MoELayer(fp8_experts=...)``), made by the first
    such layer's load; None otherwise."""

    def read_config(self, model_dir: str | Path) -> Any:
        """The checkpoint's config (``config.json``), parsed and checked (ValueError naming the key): by default a
        :class:`~fi_engine.checkpoint.config.LlamaConfig` of the Llama family's model types. A family reads its own:
        the fields it shares with Llama (``LlamaConfig.shared``) plus its settings (in ``LlamaConfig.family``), or
        a config type of its own (DeepSeek's), taking ``config.json`` from
        ``fi_engine.models.registry.family_config_json``, which refuses the model types its registry row does not
        list (docs/ADDING_A_MODEL.md)."""
        from ..checkpoint.config import LlamaConfig

        return LlamaConfig.from_dir(model_dir)

    def check(self, eng: Any, cfg: Any) -> None:
        """Refuse what this family cannot serve (ValueError naming the field and the fix), before any GPU work."""

    def load(self, eng: Any, ckpt: Checkpoint) -> None:
        """The weights onto the GPU (``eng.dtype``, ``eng.embed``, ``eng.lm_head``, ``eng.head_rows``, the
        layers')."""
        raise NotImplementedError

    def allocate(self, eng: Any) -> None:
        """The engine's buffers: by default the Llama pass's (``Storage.allocate_layers``)."""
        eng.allocate_layers()

    def plan_prefill(self, eng: Any, batch: int) -> None:
        """Plan the prefill attention of ``batch`` requests from the host index arrays ``eng.prefill_arrays``."""
        raise NotImplementedError

    def plan_prefill_padded(self, eng: Any, batch: int) -> None:
        """Plan a padded prefill for its CUDA graph (only where :attr:`llama_pass`)."""
        raise NotImplementedError

    def plans_ahead(self) -> bool:
        """Whether the graph loop may plan the next decode step while the GPU runs this one
        (``ModelRunner.prepare_ahead``): only where :meth:`plan_decode` orders its copies on the runner's stream (the
        Llama family's)."""
        return False

    def plan_decode(self, eng: Any, rows: int, cuda_graph: bool, kind: str | None = None) -> None:
        """Plan a decode step of ``rows`` rows whose index arrays are in ``eng.decode_arrays``; sets
        ``eng.decode_plan`` (the plan whose schedule layout and kind the decode graph checks). ``kind``: the plan kind
        the graph being captured asks for, one of those :meth:`decode_graph_kernels` names (a family that names none
        is never asked, and plans its one kernel); None: the family's choice."""
        raise NotImplementedError

    def decode_graph_kernels(self, eng: Any, rows: int) -> tuple[str, ...]:
        """The plan kinds (``eng.decode_plan.kind``) of the attention kernels a decode graph of ``rows`` rows is
        captured on, one graph each, where the family's steps of that many rows choose their kernel per step (each
        replaying the graph of its plan's kind); ``()`` (the default): one graph, of the kernel :meth:`plan_decode`
        plans at its capture. Asked once per graph size, after its first capture (the one of the default plan)."""
        return ()

    def prefill_attention(self, eng: Any, i: int, v: SimpleNamespace) -> None:
        """Layer ``i``'s prefill attention over step views ``v``."""
        raise NotImplementedError

    def decode_attention(self, eng: Any, i: int, v: SimpleNamespace) -> None:
        """Layer ``i``'s decode attention over step views ``v``."""
        raise NotImplementedError

    def forward(self, eng: Any, v: SimpleNamespace, rows: int, attention: Any, static_moe: bool = False) -> None:
        """Embedding to the final norm for ``rows`` token rows; the normalized rows end in ``eng.normed``.
        ``attention(i, v)``: the prefill or decode attention; ``static_moe``: the decode graph's MoE path."""
        raise NotImplementedError

    def finish_logits(self, eng: Any, logits: int, rows: int, columns: int) -> None:
        """Post-process float32 logits ``[rows, columns]`` at ``logits`` in place (elementwise: the whole vocabulary
        or this rank's columns of it); by default nothing."""

    def moe_path_for(self, eng: Any, rows: int) -> str:
        """``"routed"`` or ``"dense"``: the path the MoE layers of runner ``eng`` take for a step of ``rows`` token
        rows; ``"routed"`` for a family without that choice (:class:`~fi_engine.models.moe_paths.MoEPaths` gives
        the Llama family and gpt-oss theirs)."""
        return "routed"

    def close(self, eng: Any) -> None:
        """Free what ``load`` / ``allocate`` made beyond the engine's own (called once, after the engine's teardown)."""

"""The tensor-parallel decode step with the fused GEMVs' epilogues, a part of the model runner
(:class:`~fi_engine.runtime.worker.model_runner.ModelRunner` holds one, ``runner.tp_fused``): on a tensor-parallel
rank, a decode step of at most 4 rows of a dense Llama-pass model makes the launches of the family's forward and LM
head, except that RoPE and the KV append run as the QKV GEMV's epilogue (``FusedGemvs.prepared_qkv_rope``) and
SiLU-and-mul as the gate/up GEMV's (``FusedGemvs.prepared_gate_up_silu``): 7 launches a layer where the separate step
makes 10. Both GEMVs read the rank's rows as they are (the PLAIN prologue): the all-reduce + residual + RMSNorm
kernel (``ResidualAllReduce``) has normalized them already, so no norm moves into a GEMV. Those two launches are
packed once per step view; the rest (attention, the o and down GEMVs, the all-reduces, the embedding and the LM head)
is called as the family's forward calls it, so the step's only change is the three launches a layer it leaves out.
Eager and in the decode graphs; the runner's switch ``tp_fused_epilogues`` turns it off. One GPU runs the fused step
(:mod:`~fi_engine.runtime.worker.fused_decode`) instead, which also moves the norms into the GEMVs.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ...kernels.fused_args import PLAIN
from .fused_decode import rope_append
from .state import RunnerState

__all__: list[str] = []


class TpEpilogueStep:
    """The epilogue step of ``runner`` (a tensor-parallel rank): :meth:`refusal` / :meth:`fits` (whether a decode
    step runs it) and :meth:`step` (run it)."""

    def __init__(self, runner: RunnerState) -> None:
        self.runner = runner

    def refusal(self, rows: int) -> str | None:
        """Why a decode step of ``rows`` rows does not run as :meth:`step`, by the name of what refuses it (None: it
        does): ``tp_fused_epilogues`` (the runner's switch off), ``allreduce`` (one GPU: no all-reduce kernel
        normalizes the rows; the fused step serves it), ``llama_pass`` (a family with a forward of its own),
        ``step_lora`` (a row takes a LoRA adapter: its launches go after each projection's GEMM), ``moe_layers``
        (MoE layers keep their path), ``qk_norm`` (Qwen3's per-head norms come between the QKV GEMV and RoPE),
        ``kv_fp8`` (the epilogue stores 16-bit K/V), ``quantized weights`` (FP8 or int4: the epilogues read 16-bit
        weights), ``rows`` (more than the fused GEMVs serve, see ``FusedGemvs.fits``) and ``epilogue kernels`` (none
        compiled for this type and head dim)."""
        r = self.runner
        c, dense = r.config, r.dense
        if not r.tp_fused_epilogues:
            return "tp_fused_epilogues"
        if r.allreduce is None:
            return "allreduce"
        if not r.family.llama_pass:
            return "llama_pass"
        if r.step_lora is not None:
            return "step_lora"
        if r.moe_layers:
            return "moe_layers"
        if c.qk_norm:
            return "qk_norm"
        if r.kv_fp8 is not None:
            return "kv_fp8"
        if dense.quantized.serves_fp8 or dense.quantized.serves_int4:
            return "quantized weights"
        if not dense.fused.fits(rows, c.hidden_size):
            return "rows"
        ab = r.gemm_type
        if not (dense.fused.has_qkv_rope(ab, c.head_dim, PLAIN) and dense.fused.has_gate_up_silu(ab, PLAIN)):
            return "epilogue kernels"
        return None

    def fits(self, rows: int) -> bool:
        """Whether a decode step of ``rows`` rows runs as :meth:`step` (:meth:`refusal` is None)."""
        return self.refusal(rows) is None

    def step(self, v: SimpleNamespace, rows: int) -> None:
        """The runner's ``forward`` and ``head`` of a decode step over views ``v`` (``rows`` rows; :meth:`fits`
        holds), RoPE + append and SiLU-and-mul in the two GEMVs' epilogues: per layer the QKV GEMV (q rotated in
        place, k and v into the layer's cache), the attention, the o GEMV (this rank's partial sum into ``x``), the
        all-reduce + residual + norm (``add_norm``), the gate/up GEMV (``silu(gate) * up`` into ``act``), the down
        GEMV and the next all-reduce + norm; then the LM head. Leaves the logits where ``head`` does."""
        r = self.runner
        calls = v.prepared.get("tp epilogues")
        if calls is None:
            calls = v.prepared["tp epilogues"] = self._epilogue_calls(v, rows)
        c, b, dense = r.config, r.buffers, r.dense
        h, inter, ab, hqd = c.hidden_size, c.intermediate_size, r.gemm_type, c.num_qo_heads * c.head_dim
        x, attn, act, last = b.x.data.ptr, b.attn.data.ptr, b.act.data.ptr, c.num_layers - 1
        r.embed_and_norm(v, rows)
        for i, (qkv_rope, gate_up_silu) in enumerate(calls):
            qkv_rope()
            r.decode_attention(i, v)
            dense.linear(rows, attn, hqd, r.wo[i], h, hqd, x, h, ab, ab)  # a partial sum
            r.add_norm(v, r.ln2[i])
            gate_up_silu()
            dense.linear(rows, act, inter, r.wd[i], h, inter, x, h, ab, ab)
            r.add_norm(v, r.ln1[i + 1] if i < last else r.final_norm)
        r.head(rows, r.normed.data.ptr)

    def _epilogue_calls(self, v: SimpleNamespace, rows: int) -> list[tuple[Any, Any]]:
        """Each layer's QKV + RoPE + append and gate/up + SiLU GEMVs over view ``v`` packed once (checked when
        packed), both reading the normalized rows (``normed``: the all-reduce's output) in the PLAIN mode; every
        operand is a runner buffer, weight or the view's index array, which never move."""
        r = self.runner
        c, b, fused = r.config, r.buffers, r.dense.fused
        h, inter, ab, w = c.hidden_size, c.intermediate_size, r.gemm_type, r.qkv_width
        normed, qkv, act = r.normed.data.ptr, b.qkv.data.ptr, b.act.data.ptr
        calls = []
        for i in range(c.num_layers):
            rope = rope_append(r, i, v)
            # (h, h_ld, norm_weight, h_out and eps left at their zeros: unused by the PLAIN prologue)
            qkv_rope = fused.prepared_qkv_rope(rope, PLAIN, rows, normed, h, r.wqkv[i], w, h, qkv, w, ab, ab)
            gate_up_silu = fused.prepared_gate_up_silu(
                PLAIN, rows, normed, h, r.wgu[i], 2 * inter, h, act, inter, ab, ab
            )
            calls.append((qkv_rope, gate_up_silu))
        return calls

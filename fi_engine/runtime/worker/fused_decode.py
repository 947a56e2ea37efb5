"""The fused eager decode step of the Llama pass, a part of the model runner
(:class:`~fi_engine.runtime.worker.model_runner.ModelRunner` holds one, ``runner.fused``): a step of at most 4 rows on
one GPU runs its RMSNorms, residual adds and SiLU inside the engine's GEMV launches, and RoPE with the KV append as the
QKV GEMV's epilogue where it serves the head dim (5 launches per layer instead of 10), every launch but the attention
run packed once per step view; the same logits as the separate launches (tests/engine/test_gpu_fused_decode.py). MoE
layers (Mixtral, Qwen3-MoE) keep their residual add and norm as one packed kernel and issue their step's packed
launches (the grouped GEMV's, or the dense path's) in place of the MLP's two GEMVs. It reads the runner's weights,
buffers and switches (``fused_decode``, ``packed_attention``, ``attention_pdl``, ``silu_in_gate_up``, ``norm_pdl``:
set on the runner) through the runner's interface (:class:`~fi_engine.runtime.worker.state.RunnerState`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ...kernels import flashinfer as kernels
from ...kernels.int4_linear import ROPE_ROWS
from .state import RunnerState

__all__: list[str] = []


class FusedDecode:
    """The fused decode step of ``runner``: :meth:`fits` (whether a step runs it), :meth:`step` (run it) and what it
    packs."""

    def __init__(self, runner: RunnerState) -> None:
        self.runner = runner

    def fits(self, rows: int) -> bool:
        """Whether an eager decode step of ``rows`` rows runs as :meth:`step`: the runner's ``fused_decode`` on, the
        family runs the engine's Llama pass (``ModelFamily.llama_pass``), one GPU (no all-reduce, no vocabulary shard),
        FP8 weights only where their fused kernels compiled (QuantizedWeights.fuses_fp8), the engine's GEMV serving the
        rows (at most 4; see FusedGemvs.fits), and MoE layers only where their step's launches pack
        (``MoELayer.packs_step``: the grouped GEMV, or the dense path). A step where a row takes a LoRA adapter (the
        runner's ``step_lora`` set) fuses only where :meth:`fits_lora` holds too (its LoRA form); else it takes the
        separate launches. A step of an engine serving adapters where no row takes one fuses as any other engine's."""
        r = self.runner
        c = r.config
        return (
            r.fused_decode
            and (r.step_lora is None or self.fits_lora(rows))  # a row takes a LoRA adapter: its form (see above)
            and r.family.llama_pass
            and r.allreduce is None
            and r.vocab_shard is None
            and r.dense.quantized.fuses_fp8
            and not (
                r.moe_layers and r.dense.quantized.serves_fp8 and not r.dense.quantized.fp8_fused
            )  # (dense layers only)
            and (
                (
                    r.dense.fused.fits(rows, c.hidden_size)
                    and (
                        r.moe_layers[0].packs_step(rows, r.dense_moe(rows))  # every MoE layer alike: its first says
                        if r.moe_layers
                        else r.dense.fused.fits(rows, c.intermediate_size)
                    )
                )
                or self.fits_int4_wide(rows)
            )
        )

    def fits_int4_wide(self, rows: int) -> bool:
        """Whether the int4 step serves ``rows`` rows past the fused GEMVs' 4: the engine's launch path open (as the
        fused GEMVs' ``fits`` asks), dense layers over int4 weights, up to
        :data:`~fi_engine.kernels.int4_linear.ROPE_ROWS` (8, its QKV GEMV's RoPE form); the LM head then takes the
        final norm as a launch of its own and the 16-bit GEMM, as the separate launches do (the rest of :meth:`fits`
        holding too)."""
        r = self.runner
        return r.dense.launcher.open and r.dense.quantized.serves_int4 and not r.moe_layers and 0 < rows <= ROPE_ROWS

    @property
    def quantized(self) -> bool:
        """Whether the step runs over FP8 weights in its epilogue form (``QuantizedWeights.fp8_fused`` off) or over
        int4 weights (:meth:`_fp8_fused_calls`): GEMVs of the separate launches' kernels, the norms launches of their
        own, SiLU, RoPE and the KV append in the GEMVs' epilogues."""
        q = self.runner.dense.quantized
        return bool((q.serves_fp8 and not q.fp8_fused) or q.serves_int4)

    def fits_lora(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows where a row takes a LoRA adapter runs the LoRA form of the fused step (the
        rest of :meth:`fits` holding too): the runner's ``lora_fused`` on and its LoRA GEMVs compiled
        (``lora_gemvs``), 16-bit weights (no FP8 or int4 GEMV has the expand epilogue), the gate/up GEMV with SiLU as
        its epilogue (``silu_in_gate_up``; MoE layers: no MLP adapters) and the LoRA GEMVs serving the rows of each
        projection's input (:meth:`~fi_engine.kernels.lora_fused.LoraFusedGemvs.fits`)."""
        r = self.runner
        c, gemvs, q = r.config, r.lora_gemvs, r.dense.quantized
        if not r.lora_fused or gemvs is None or r.lora is None or q.serves_fp8 or q.serves_int4:
            return False
        if r.moe_layers:
            mlp = not (r.lora.has("gate_up") or r.lora.has("down"))  # (a MoE layer's experts take no adapter)
        else:
            mlp = r.silu_in_gate_up and r.dense.fused.has_gate_up_silu(r.gemm_type)
            mlp = mlp and gemvs.fits(rows, c.intermediate_size)
        hqd = c.num_qo_heads * c.head_dim
        return bool(mlp and gemvs.fits(rows, c.hidden_size) and gemvs.fits(rows, hqd))

    def step(self, v: SimpleNamespace, rows: int) -> None:
        """The runner's ``forward`` and ``head`` of a decode step in 5 launches per layer instead of 10: the RMSNorms
        and the residual adds run in the prologue of the GEMV that reads their output (``FusedGemvs.linear``,
        modes NORM / ADD_NORM), ``silu_and_mul`` in the down GEMV's (SILU), and RoPE with the KV append as the QKV
        GEMV's epilogue (``FusedGemvs.prepared_qkv_rope``; where it does not serve the head dim, or Qwen3's per-head
        norms come between, those stay separate launches: 7 per layer, 9 with the norms; a MoE layer's grouped-GEMV
        step takes the post-attention norm and the routing into its router GEMV's launch,
        ``MoELayer.prepared_normed_step``: 7 per layer with the attention). Same rounding points as the
        separate launches: the o and down GEMVs write their rounded output into ``x`` as before; the next GEMV
        forms ``s = h + x`` in float32, normalizes ``s`` (not its rounding, as ``fused_add_rmsnorm`` does) and
        stores ``round(s)`` as the new residual. That store goes to the other of two residual buffers (``h``,
        ``h_alt``), since every block of the launch still reads the old one; the final norm is the LM head's
        prologue. Leaves the float32 logits in ``logits``, finished (the runner's ``finish_logits``).

        Every launch but the attention run is packed once per step view (:meth:`_fused_calls`): a step calls
        them in turn, with the attention run (this step's plan) between each layer's two halves. With
        the runner's ``packed_attention`` the attention runs are packed once per view too (:meth:`_attention_runs`) and
        each call takes only the step's plan."""
        r = self.runner
        name = "fused step" if r.step_lora is None else "fused lora step"  # (its LoRA form: _fused_calls)
        calls = v.prepared.get(name)
        if calls is None:
            calls = v.prepared[name] = self._fused_calls(v, rows)
        embed, layers, head = calls
        embed()
        if r.packed_attention and r.decode_plan.kind == "batch_decode":  # (not the prefill kernel's plan)
            plan = r.decode_plan
            for (before, after), run in zip(layers, self._attention_runs(v, plan), strict=True):
                for call in before:
                    call()
                run.run(plan)
                for call in after:
                    call()
        else:
            attention = r.decode_attention
            for i, (before, after) in enumerate(layers):
                for call in before:
                    call()
                attention(i, v)
                for call in after:
                    call()
        head()
        r.finish_logits(r.buffers.logits.data.ptr, rows, r.head_rows)

    def _attention_runs(self, v: SimpleNamespace, plan: Any) -> list[Any]:
        """Each layer's decode attention run over view ``v`` packed once (``kernels.prepared_decode_run``), for plans
        of ``plan``'s settings and batch size (its run context, a value): kept in the view's ``prepared`` with that
        context, and packed again only when a plan of another context comes (one entry per view: bounded)."""
        r = self.runner
        found = v.prepared.get("attention runs")
        if found is None or found[0] != plan._context:
            index = (v.kv_indptr, v.kv_indices, v.kv_last_page_len)
            pdl = r.attention_pdl and r.dense.launcher.launches_with_pdl
            runs = [
                kernels.prepared_decode_run(plan, v.q, kc, vc, *index, v.attn, r.stream_ptr, enable_pdl=pdl)
                for kc, vc in zip(r.k_cache, r.v_cache, strict=True)
            ]
            found = v.prepared["attention runs"] = (plan._context, runs)
        runs_: list[Any] = found[1]
        return runs_

    def _fused_calls(self, v: SimpleNamespace, rows: int) -> tuple[Any, list[tuple[list[Any], list[Any]]], Any]:
        """The packed launches of :meth:`step` over view ``v`` (``rows`` rows): the embedding gather, per
        layer (the launches before the attention run, those after it), and the LM head. Each is checked when
        packed (pointer rules, alignment); every operand is an engine buffer or weight, which never moves, and the
        result is kept in the view's ``prepared`` (keyed by a value: the view is made once per step shape).

        Where a row of the step takes a LoRA adapter (the runner's ``step_lora``; :meth:`fits_lora`), each adapted
        projection takes its LoRA form (:mod:`~fi_engine.kernels.lora_fused`): the group's shrink first (for the QKV
        and gate/up GEMVs one that normalizes its input as the GEMV's prologue does; for o and down the plain shrink
        of the attention's output and of ``silu(gate) * up``), then the GEMV with the expand in its epilogue, before
        RoPE, SiLU and its output's rounding: 9 launches a layer with the attention, where the separate launches with
        the adapters' are 18. With the runner's ``lora_shrink_in_grid`` (the LoRA GEMVs compiled in that form) each
        shrink runs in its GEMV's own grid instead (``LoraExpand.sync``): 5 launches a layer, as without adapters."""
        from ...kernels.fused_args import ADD_NORM, NORM, PLAIN, SILU

        r = self.runner
        if self.quantized:
            return self._fp8_fused_calls(v, rows)  # (int4 weights: no fused GEMV reads them)
        c, b, dense, s = r.config, r.buffers, r.dense, r.stream_ptr
        h, inter, eps, ab = c.hidden_size, c.intermediate_size, c.rms_norm_eps, r.gemm_type
        x, qkv, attn, gu, act = b.x.data.ptr, b.qkv.data.ptr, b.attn.data.ptr, b.gu.data.ptr, b.act.data.ptr
        w, hqd = r.qkv_width, c.num_qo_heads * c.head_dim
        fused = dense.fused.prepared
        cur, other = b.h.data.ptr, b.h_alt.data.ptr  # the residual stream, and where its next value goes
        embed = dense.rows.prepared_gather(rows, r.embed, h, v.token_ids, cur, h, h)
        # RoPE and the KV append as the QKV GEMV's epilogue, unless Qwen3's per-head norms come between,
        # or an FP8 cache comes (that epilogue stores 16-bit K/V: RoPE and the quantizing append run on their own)
        fp8 = r.kv_fp8
        # (and not over FP8 weights: the epilogue's kernel reads 16-bit ones)
        in_gemv = (
            not c.qk_norm
            and fp8 is None
            and dense.fused.has_qkv_rope(ab, c.head_dim)
            and not dense.quantized.serves_fp8
        )
        # SiLU-and-mul as the gate/up GEMV's epilogue (its input to the down GEMV made once, not in each block)
        silu_in_gate_up = r.silu_in_gate_up and dense.fused.has_gate_up_silu(ab) and not dense.quantized.serves_fp8
        # the LoRA form (a row of the step takes an adapter): the slots' shrinks and the GEMVs with the expand
        lora: Any = r.lora if r.step_lora is not None else None  # (lora.device.DeviceSlots)
        gemvs: Any = r.lora_gemvs if lora is not None else None  # (kernels.lora_fused.LoraFusedGemvs)
        slots = v.lora_slots if lora is not None else 0
        # each shrink in its GEMV's grid, not a launch before it (the form the LoRA GEMVs were compiled in)
        in_grid = gemvs is not None and gemvs.kernels.in_grid

        def adapted(group: str, i: int) -> Any:
            """Layer ``i``'s expand epilogue of ``group`` (None: no adapter of the step changes it)."""
            return lora.expand_operands(group, i, slots, in_grid) if lora is not None and lora.has(group) else None

        def linear(i: int, group: str, rows: int, inp: int, k: int, weight: int, out: int) -> list[Any]:
            """A GEMV over rows made before (o, down): with its group's shrink and expand where adapted."""
            e = adapted(group, i)
            if e is None:
                return [dense.prepared_linear(rows, inp, k, weight, h, k, out, h, ab, ab)]
            gemv = gemvs.prepared_linear(e, PLAIN, rows, inp, k, weight, h, k, out, h, ab, ab)
            return [gemv] if in_grid else [lora.prepared_shrink(dense.launcher, group, i, rows, inp, k, slots), gemv]

        layers = []
        for i in range(c.num_layers):
            # i == 0: input_layernorm of the embedding rows (rmsnorm); then h += the previous layer's down output
            # and input_layernorm (fused_add_rmsnorm), the new residual into `other`
            mode, ln, h_out = (NORM, r.ln1[0].data_ptr, 0) if i == 0 else (ADD_NORM, r.ln1[i].data_ptr, other)
            before = []
            e = adapted("qkv", i)
            if e is not None and not in_grid:  # the shrink of the rows the QKV GEMV normalizes, made as it makes them
                before.append(
                    gemvs.prepared_shrink(
                        ab, mode, rows, cur, h, x, h, ln, eps, **lora.normed_shrink_operands("qkv", i, rows, slots)
                    )
                )
            if in_gemv:
                epilogue = rope_append(self.runner, i, v)
                args = (epilogue, mode, rows, x, h, r.wqkv[i], w, h, qkv, w, ab, ab, cur, h, ln, h_out, eps)
                qkv_call = dense.fused.prepared_qkv_rope(*args) if e is None else gemvs.prepared_qkv_rope(e, *args)
            elif e is None:
                qkv_call = fused(mode, rows, x, h, r.wqkv[i], w, h, qkv, w, ab, ab, cur, h, ln, h_out, eps)
            else:
                qkv_args = (e, mode, rows, x, h, r.wqkv[i], w, h, qkv, w, ab, ab, cur, h, ln, h_out, eps)
                qkv_call = gemvs.prepared_linear(*qkv_args)
            before.append(qkv_call)
            if i:
                cur, other = other, cur
            if not in_gemv:
                before += self._separate_rope_append(v, rows, i)
            scale = fp8.prepared_scale(v, rows) if fp8 is not None else None  # attn *= v_scale (None where 1)
            after = [] if scale is None else [scale]
            after += linear(i, "o", rows, attn, hqd, r.wo[i], x)
            if r.moe_layers:
                # the grouped-GEMV step: h += o's output and post_attention_layernorm as the router GEMV's
                # prologue (the new residual into `other`, as the dense layers' gate/up GEMV writes it), the
                # routing as its epilogue, then the experts; their output into x (the next GEMV's prologue adds it)
                layer = r.moe_layers[i]
                dense_moe = r.dense_moe(rows)
                ln = r.ln2[i].data_ptr
                moe = None if dense_moe else layer.prepared_normed_step(b.x, b.x, rows, cur, other, ln, eps)
                if moe is not None:
                    cur, other = other, cur
                    after.extend(moe)
                    layers.append((before, after))
                    continue
                # else h += o's output and post_attention_layernorm into x, in place on the residual (one kernel:
                # the experts' GEMVs read the normalized rows whole), then the MoE step's launches packed by the
                # layer, its output into x
                after.append(kernels.prepared_fused_add_rmsnorm(v.x, self._residual(v, cur, rows), r.ln2[i], eps, s))
                moe = layer.prepared_step(r.normed, b.x, rows, dense_moe)
                if moe is None:
                    raise AssertionError(f"layer {i}: its MoE step of {rows} rows has no packed launches")
                after.extend(moe)
                layers.append((before, after))
                continue
            # h += o's output; post_attention_layernorm; gate/up; then down of silu(gate) * up
            ln = r.ln2[i].data_ptr
            if silu_in_gate_up:
                gu_args = (ADD_NORM, rows, x, h, r.wgu[i], 2 * inter, h, act, inter, ab, ab, cur, h, ln, other, eps)
                e = adapted("gate_up", i)
                if e is None:
                    after.append(dense.fused.prepared_gate_up_silu(*gu_args))
                else:  # the shrink of the rows the gate/up GEMV normalizes, then the GEMV with the expand
                    if not in_grid:
                        operands = lora.normed_shrink_operands("gate_up", i, rows, slots)
                        after.append(gemvs.prepared_shrink(ab, ADD_NORM, rows, cur, h, x, h, ln, eps, **operands))
                    after.append(gemvs.prepared_gate_up_silu(e, *gu_args))
                after += linear(i, "down", rows, act, inter, r.wd[i], x)
            else:
                after.append(
                    fused(ADD_NORM, rows, x, h, r.wgu[i], 2 * inter, h, gu, 2 * inter, ab, ab, cur, h, ln, other, eps)
                )
                after.append(fused(SILU, rows, gu, 2 * inter, r.wd[i], h, inter, x, h, ab, ab))
            cur, other = other, cur
            layers.append((before, after))
        # h += the last down output; the final norm; the LM head (the new residual is not needed: no h_out)
        n, logits, ln = r.head_rows, b.logits.data.ptr, r.final_norm.data_ptr
        mode = ADD_NORM if c.num_layers else NORM
        head = fused(mode, rows, x, h, r.lm_head, n, h, logits, n, ab, r.gemm_f32, cur, h, ln, 0, eps)
        return embed, layers, head

    def _fp8_fused_calls(self, v: SimpleNamespace, rows: int) -> tuple[Any, list[tuple[list[Any], list[Any]]], Any]:
        """:meth:`_fused_calls` over FP8 weights (``QuantizedWeights.fp8_epilogues``; dense layers), and over int4
        weights (every GEMV the int4 GEMV, SiLU its gate/up GEMV's epilogue, RoPE and the KV append its QKV GEMV's:
        ``QuantizedWeights.int4_rope``): per layer the input norm (``fused_add_rmsnorm`` in place, ``h += x`` and
        ``x`` its norm; the first layer's ``rmsnorm`` of the embedding rows), the QKV GEMV with RoPE and the KV append
        as its epilogue (``QuantizedWeights.prepared_fp8_qkv_rope``, ``prepared_int4_qkv_rope``), the attention, the O
        GEMV, the post-attention norm, the gate/up GEMV with SiLU as its epilogue (``prepared_fp8_silu``,
        ``prepared_int4_silu``) and the down GEMV: 7 launches a layer with the attention's, where the separate
        launches are 10. Where Qwen3's per-head norms come between, the KV cache is FP8 or a weight is 16-bit, that
        part runs as separate launches. The LM head takes the last norm as its prologue. The FP8 GEMVs over
        normalized rows read them whole, so each norm runs once, not once per block as a prologue would (the FP8
        weights' shorter GEMVs pay that more than 16-bit ones: ``QuantizedWeights.fp8_fused``).

        Each norm between two GEMVs is folded into them where their fold forms serve the rows
        (``QuantizedWeights.norm_in_gemv``, :mod:`~fi_engine.kernels.norm_fold`): the O (down) GEMV stores the new
        residual into the other residual buffer and ``xn``, and the gate/up (next QKV) GEMV reads ``xn`` and
        multiplies by the rows' factors, which a block of its grid computes: 5 launches a layer."""
        from ...kernels.fused_args import ADD_NORM, NORM
        from ...kernels.norm_fold import FoldIn, FoldOut

        r = self.runner
        c, b, dense, s = r.config, r.buffers, r.dense, r.stream_ptr
        h, inter, eps, ab = c.hidden_size, c.intermediate_size, c.rms_norm_eps, r.gemm_type
        x, qkv, attn, gu, act = b.x.data.ptr, b.qkv.data.ptr, b.attn.data.ptr, b.gu.data.ptr, b.act.data.ptr
        xn = b.xn.data.ptr
        w, hqd = r.qkv_width, c.num_qo_heads * c.head_dim
        fp8, q = r.kv_fp8, dense.quantized
        embed = dense.rows.prepared_gather(rows, r.embed, h, v.token_ids, b.h.data.ptr, h, h)
        rope_in_gemv = not c.qk_norm and fp8 is None and c.head_dim in (64, 128, 256, 512)
        pdl = r.norm_pdl and dense.launcher.launches_with_pdl
        cur, other = b.h.data.ptr, b.h_alt.data.ptr  # the residual, and where a folded norm writes its next value

        def folds(*weights: int) -> bool:
            """Whether the fold forms serve these weights at the step's rows."""
            return all(rows <= q.fold_rows(wt) for wt in weights)

        def qkv_fold(i: int) -> bool:
            """Whether layer ``i``'s QKV GEMV takes its input norm folded (its form: FP8 with the RoPE epilogue, or
            int4)."""
            wq = r.wqkv[i]
            rope_form = rope_in_gemv and q.has_fp8_weight(wq)
            return i > 0 and folds(r.wd[i - 1], wq) and (rope_form or wq in q.int4_weights)

        def gate_up_fold(i: int) -> bool:
            """Whether layer ``i``'s gate/up GEMV takes the post-attention norm folded (its SiLU form)."""
            wg = r.wgu[i]
            silu_form = q.has_fp8_weight(wg) or q.has_int4_silu(wg)
            return folds(r.wo[i], wg) and silu_form

        def fold_in(i: int, site: int, h_before: int) -> FoldIn:
            """The second GEMV's side of layer ``i``'s norm ``site`` (0 input, 1 post-attention)."""
            sync, rs = b.fold_sync[i, site].data.ptr, b.fold_rs[i, site].data.ptr
            return FoldIn(h=h_before, y=x, sync=sync, rs=rs, eps=eps)

        layers = []
        for i in range(c.num_layers):
            folded_in = qkv_fold(i)
            if folded_in:  # the previous down GEMV wrote xn and the new residual (into `other`)
                fold, src = fold_in(i, 0, cur), xn
                cur, other = other, cur
                before: list[Any] = []
            else:
                fold, src = None, x
                if i == 0:  # input_layernorm of the embedding rows into x
                    before = [kernels.prepared_rmsnorm(v.h, r.ln1[0], v.x, eps, s, pdl)]
                else:  # h += the previous layer's down output; x = input_layernorm(h)
                    resid = self._residual(v, cur, rows)
                    before = [kernels.prepared_fused_add_rmsnorm(v.x, resid, r.ln1[i], eps, s, pdl)]
            if rope_in_gemv and q.has_fp8_weight(r.wqkv[i]):
                rope = rope_append(self.runner, i, v)
                before.append(q.prepared_fp8_qkv_rope(rows, src, h, r.wqkv[i], h, qkv, w, ab, rope, fold=fold))
            elif fold is not None:
                before.append(q.prepared_folded_gemv(rows, src, h, r.wqkv[i], w, h, qkv, w, ab, fold))
                before += self._separate_rope_append(v, rows, i)
            elif rope_in_gemv and q.has_int4_rope(r.wqkv[i]):  # int4: RoPE and the append as the epilogue too
                rope = rope_append(self.runner, i, v)
                before.append(q.prepared_int4_qkv_rope(rows, x, h, r.wqkv[i], h, qkv, w, ab, rope))
            else:
                before.append(dense.prepared_linear(rows, x, h, r.wqkv[i], w, h, qkv, w, ab, ab))
                before += self._separate_rope_append(v, rows, i)
            scale = fp8.prepared_scale(v, rows) if fp8 is not None else None  # attn *= v_scale (None where 1)
            after = [] if scale is None else [scale]
            if gate_up_fold(i):  # the O GEMV stores the new residual and xn; gate/up reads xn times the factors
                o = FoldOut(cur, r.ln2[i].data_ptr, other, xn)
                after.append(q.prepared_folded_gemv(rows, attn, hqd, r.wo[i], h, hqd, x, h, ab, o))
                fold, src = fold_in(i, 1, cur), xn
                cur, other = other, cur
            else:
                after.append(dense.prepared_linear(rows, attn, hqd, r.wo[i], h, hqd, x, h, ab, ab))
                resid = self._residual(v, cur, rows)
                after.append(kernels.prepared_fused_add_rmsnorm(v.x, resid, r.ln2[i], eps, s, pdl))
                fold, src = None, x
            if q.has_fp8_weight(r.wgu[i]):  # silu(gate) * up straight into act
                after.append(q.prepared_fp8_silu(rows, src, h, r.wgu[i], h, act, inter, ab, fold=fold))
            elif q.has_int4_silu(r.wgu[i]):  # (int4: gate and up interleaved by 8 rows at load)
                after.append(q.prepared_int4_silu(rows, src, h, r.wgu[i], h, act, inter, ab, fold=fold))
            else:
                after.append(dense.prepared_linear(rows, x, h, r.wgu[i], 2 * inter, h, gu, 2 * inter, ab, ab))
                after.append(kernels.prepared_silu_and_mul(v.gu, v.act, s))
            if i + 1 < c.num_layers and qkv_fold(i + 1):  # the next layer's input norm folded
                down = FoldOut(cur, r.ln1[i + 1].data_ptr, other, xn)
                after.append(q.prepared_folded_gemv(rows, act, inter, r.wd[i], h, inter, x, h, ab, down))
            else:
                after.append(dense.prepared_linear(rows, act, inter, r.wd[i], h, inter, x, h, ab, ab))
            layers.append((before, after))
        # h += the last down output; the final norm; the LM head
        n, logits, ln = r.head_rows, b.logits.data.ptr, r.final_norm.data_ptr
        mode = ADD_NORM if c.num_layers else NORM
        if not dense.fused.fits(rows, h):  # (int4, 5-8 rows: fits_int4_wide) the norm, then the 16-bit GEMM
            resid = self._residual(v, cur, rows)
            if c.num_layers:
                norm = kernels.prepared_fused_add_rmsnorm(v.x, resid, r.final_norm, eps, s, pdl)
            else:
                norm = kernels.prepared_rmsnorm(resid, r.final_norm, v.x, eps, s, pdl)
            gemm = dense.prepared_linear(rows, x, h, r.lm_head, n, h, logits, n, ab, r.gemm_f32)

            def head() -> None:
                norm()
                gemm()

            return embed, layers, head
        head = dense.fused.prepared(mode, rows, x, h, r.lm_head, n, h, logits, n, ab, r.gemm_f32, cur, h, ln, 0, eps)
        return embed, layers, head

    def _residual(self, v: SimpleNamespace, cur: int, rows: int) -> Any:
        """The view of the residual buffer at ``cur`` (the runner's ``h``, or ``h_alt`` where a launch before wrote
        the residual there) that a norm launch updates in place: the step view's own ``h``, else a descriptor."""
        r = self.runner
        if cur == r.buffers.h.data.ptr:
            return v.h
        return kernels.descriptor(cur, (rows, r.config.hidden_size), r.dtype, r.device)

    def _separate_rope_append(self, v: SimpleNamespace, rows: int, i: int) -> list[Any]:
        """Layer ``i``'s launches between its QKV GEMV and the attention where no epilogue takes them, packed once as
        ``_forward`` calls them (``fi_ffi.prepare``: the step writes its positions and page table into the view's
        index arrays, which the kernels read at each launch): Qwen3's per-head q and k norms, RoPE, and the KV
        append (the quantizing one into an FP8 cache)."""
        r = self.runner
        c, s, eps, fp8 = r.config, r.stream_ptr, r.config.rms_norm_eps, r.kv_fp8
        calls = []
        if c.qk_norm:  # Qwen3: each q and k head normalized before RoPE
            calls.append(kernels.prepared_qk_rmsnorm(v.q, r.q_norm[i], eps, s))
            calls.append(kernels.prepared_qk_rmsnorm(v.k, r.k_norm[i], eps, s))
        calls.append(kernels.prepared_rope_inplace(v.q, v.k, v.positions, c.rope, s))
        if fp8 is not None:
            calls.append(fp8.prepared_append(v, rows, i))
        else:
            append = (v.k, v.v, v.batch_indices, v.positions, r.k_cache[i], r.v_cache[i])
            index = (v.kv_indices, v.kv_indptr, v.kv_last_page_len)
            calls.append(kernels.prepared_append_kv(*append, *index, s))
        return calls


def rope_append(runner: RunnerState, i: int, v: SimpleNamespace) -> Any:
    """The RoPE settings, the index arrays of step view ``v`` and layer ``i``'s caches of ``runner`` as the QKV
    GEMV's epilogue takes them (``FusedGemvs.prepared_qkv_rope``): the values ``kernels.rope_inplace`` and
    ``append_kv`` pass (this rank's heads, with tensor parallelism: the runner's ``config``)."""
    from ...kernels.fused_args import RopeAppend

    c, rope = runner.config, runner.config.rope
    kc, vc = runner.k_cache[i], runner.v_cache[i]
    return RopeAppend(
        hq=c.num_qo_heads,
        hk=c.num_kv_heads,
        d=c.head_dim,
        theta=rope.theta,
        scale=rope.factor if rope.llama3 else 1.0,
        llama3=rope.llama3,
        low_freq_factor=rope.low_freq_factor,
        high_freq_factor=rope.high_freq_factor,
        old_context_len=rope.original_max_position_embeddings,
        positions=v.positions.data_ptr,
        batch_indices=v.batch_indices.data_ptr,
        kv_indptr=v.kv_indptr.data_ptr,
        kv_indices=v.kv_indices.data_ptr,
        k_cache=kc.data_ptr,
        v_cache=vc.data_ptr,
        page_size=kc.shape[1],
        num_pages=kc.shape[0],
        stride_page=kc.strides[0],
        stride_n=kc.strides[1],
        stride_h=kc.strides[2],
    )

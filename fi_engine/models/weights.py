"""Checkpoint tensors onto the GPU for the family engines (Llama, Gemma 2, gpt-oss, DeepSeek): dtype-checked reads
(a projection's AWQ/GPTQ int4 weight kept int4 for the engine's int4 GEMV, or an int4 or FP8 weight dequantized to
the 16-bit type), uploads kept alive by the engine, and fi_ffi descriptors of weight vectors."""

from __future__ import annotations

from typing import Any, Self

import numpy as np

from ..checkpoint.quantization import Fp8Scheme, Int4Scheme
from ..checkpoint.safetensors import Checkpoint
from ..kernels import flashinfer as kernels

__all__ = ["WeightLoader"]


class WeightLoader:
    """Reads tensors of ``ckpt`` that must all be ``dtype`` (the embedding's) and uploads them with CuPy ``cp`` to
    ``device``; every upload is appended to ``keep`` (the engine's list that keeps its weights alive). ``int4``: the
    checkpoint's AWQ/GPTQ layout (:class:`~fi_engine.checkpoint.quantization.Int4Scheme`), whose projections
    :meth:`linear` dequantizes; ``fp8``: the checkpoint's FP8 layout
    (:class:`~fi_engine.checkpoint.quantization.Fp8Scheme`), whose e4m3 projections :meth:`linear` dequantizes (the
    family passes it for the weights it serves 16-bit: a MoE model's experts, DeepSeek's projections); None:
    16-bit projections only."""

    def __init__(
        self,
        ckpt: Checkpoint,
        cp: Any,
        dtype: str,
        device: int,
        keep: list[Any],
        int4: Int4Scheme | None = None,
        fp8: Fp8Scheme | None = None,
    ) -> None:
        self.ckpt, self.cp, self.dtype, self.device, self.keep = ckpt, cp, dtype, device, keep
        self.int4, self.fp8 = int4, fp8

    @classmethod
    def for_engine(
        cls, eng: Any, ckpt: Checkpoint, dtype: str, int4: Int4Scheme | None = None, fp8: Fp8Scheme | None = None
    ) -> Self:
        """A loader of ``ckpt`` onto engine ``eng``'s device in ``dtype`` (the embedding's, which the family has
        checked), reading int4 projections in layout ``int4`` and e4m3 ones in layout ``fp8``: sets ``eng.dtype``,
        the cuBLAS data types ``eng.gemm_type`` (``dtype``) and ``eng.gemm_f32``, and a new ``eng.device_arrays``,
        the list that keeps the uploads alive."""
        from ..kernels.dense import data_type

        eng.dtype = dtype
        eng.gemm_type = data_type(dtype)
        eng.gemm_f32 = data_type("float32")
        eng.device_arrays = []
        return cls(ckpt, eng.cupy, dtype, eng.device, eng.device_arrays, int4, fp8)

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``name`` (shape checked), in the checkpoint's dtype (bfloat16 as uint16 bits)."""
        got = self.ckpt.info(name).dtype
        if got != self.dtype:
            raise ValueError(f"model: tensor {name!r} is {got}, the embedding is {self.dtype}{self.mismatch_hint(got)}")
        return self.ckpt.array(name, shape)

    def linear(self, prefix: str, shape: tuple[int, int]) -> np.ndarray:
        """Projection ``prefix``'s weight ``shape`` ``(n, k)`` in the loader's dtype (bfloat16 as uint16 bits): its
        int4 weight dequantized where the loader has an int4 layout and the checkpoint holds ``<prefix>.qweight``
        (:func:`~fi_engine.checkpoint.int4_weights.read_int4_linear`); its e4m3 ``<prefix>.weight`` dequantized with
        its scales where the loader has an FP8 layout (:func:`~fi_engine.checkpoint.fp8_weights.read_fp8_linear`,
        ``Fp8Matrix.dequantized``); else ``<prefix>.weight`` (:meth:`get`), as for the modules a quantized
        checkpoint leaves 16-bit (AWQ's ``modules_to_not_convert``, an FP8 config's ``ignore`` list: routers)."""
        name = prefix + ".weight"
        if self.fp8 is not None and name in self.ckpt and self.ckpt.info(name).dtype == "float8_e4m3fn":
            from ..checkpoint.fp8_weights import read_fp8_linear

            return self._dequantized(prefix, read_fp8_linear(self.ckpt, self.fp8, prefix, shape, gemv=False))
        if self.int4 is None or prefix + ".qweight" not in self.ckpt:
            if self.int4 is not None and name not in self.ckpt:
                raise ValueError(
                    f"model: the checkpoint has neither {prefix + '.qweight'!r} (int4) nor {prefix + '.weight'!r} "
                    f"(16-bit); is it the whole checkpoint?"
                )
            return self.get(name, shape)
        from ..checkpoint.int4_weights import read_int4_linear

        return self._dequantized(prefix, read_int4_linear(self.ckpt, self.int4, prefix, shape))

    def _dequantized(self, prefix: str, matrix: Any) -> np.ndarray:
        """``matrix`` (an ``Int4Matrix`` or ``Fp8Matrix`` read from projection ``prefix``) in the loader's dtype;
        ValueError naming the projection where a value is not finite in it."""
        try:
            return np.asarray(matrix.dequantized(self.dtype))
        except ValueError as exc:
            raise ValueError(f"model: {prefix!r}: {exc}; serve a bfloat16 copy of this checkpoint") from None

    def projection(
        self,
        dense: Any,
        parts: list[tuple[str, tuple[int, int]]],
        rank: int,
        ranks: int,
        axis: int,
        interleave: bool = False,
    ) -> int:
        """The device address of the projections ``parts`` (``(prefix, (n, k))`` each: q, k and v; gate and up) stacked
        by output rows, each cut to this rank's shard: ``axis`` 0 its block of output rows (column-parallel), 1 its
        block of inputs (row-parallel); ``ranks`` 1 keeps them whole. Where ``dense`` is given (the engine serves
        quantized weights as stored), e4m3 projections stay e4m3 with their scales, registered with ``dense``
        (:meth:`_fp8_projection`; the family has refused shards that cut a block of scales), and int4 ones stay int4 in
        the int4 GEMV's layout (:meth:`~fi_engine.kernels.quantized_weights.QuantizedWeights.add_int4_weight`) where
        every part is int4 and the GEMV takes the stack's shape and its GPU; otherwise each part is read as
        :meth:`linear` reads it (dequantized) and the stack uploaded in the 16-bit type. ``interleave``: two int4 parts
        (gate and up) stored interleaved by 8 rows where their rows allow, for the GEMV's SiLU form
        (``QuantizedWeights.prepared_int4_silu``)."""
        from ..layers.tensor_parallel import columns, rows

        stored = None
        if dense is not None:
            stored = self._fp8_projection(dense, parts, rank, ranks, axis)
            if stored is None:
                stored = self._int4_projection(dense, parts, rank, ranks, axis, interleave)
        if stored is not None:
            return stored
        cut = rows if axis == 0 else columns
        shards = [cut(self.linear(prefix, shape), rank, ranks) for prefix, shape in parts]
        return self.ptr(shards[0] if len(shards) == 1 else np.concatenate(shards))

    def _fp8_projection(
        self, dense: Any, parts: list[tuple[str, tuple[int, int]]], rank: int, ranks: int, axis: int
    ) -> int | None:
        """:meth:`projection` kept e4m3 (its device address: the codes with their scales, each part's cut to this
        rank's shard, stacked), or None where the loader has no FP8 layout or no part is e4m3 (a module the
        checkpoint left 16-bit). ValueError naming the tensor for a part that is not e4m3 beside one that is, and
        (:class:`~fi_engine.checkpoint.fp8_weights.Fp8Matrix`) for a shard that cuts a block of scales, which the
        family's check refuses first (:meth:`~fi_engine.checkpoint.quantization.Fp8Scheme.shard_refusal`)."""
        e4m3 = [prefix + ".weight" in self.ckpt and self.ckpt.info(prefix + ".weight").dtype == "float8_e4m3fn"
                 for prefix, _ in parts]  # fmt: skip
        if self.fp8 is None or not any(e4m3):
            return None
        from ..checkpoint.fp8_weights import Fp8Matrix, read_fp8_linear, upload_fp8_linear

        shards = []
        for prefix, shape in parts:
            m = read_fp8_linear(self.ckpt, self.fp8, prefix, shape)
            lo, hi = rank * shape[axis] // ranks, (rank + 1) * shape[axis] // ranks
            shards.append(m if ranks == 1 else m.rows(lo, hi) if axis == 0 else m.columns(lo, hi))
        matrix = Fp8Matrix.stacked(shards) if len(shards) > 1 else shards[0]
        return upload_fp8_linear(dense, matrix, self.upload)

    def _int4_projection(
        self, dense: Any, parts: list[tuple[str, tuple[int, int]]], rank: int, ranks: int, axis: int, interleave: bool
    ) -> int | None:
        """:meth:`projection` kept int4 (its device address), or None where it cannot be (the caller dequantizes)."""
        if self.int4 is None or any(prefix + ".qweight" not in self.ckpt for prefix, _ in parts):
            return None
        from ..checkpoint.int4_weights import Int4Matrix, read_int4_linear

        # unpacked and laid out on the GPU where the loader uploads with CuPy (an 8B model: seconds, not minutes of
        # numpy); the host tests' stand-in uploads are numpy's
        xp = self.cp if hasattr(self.cp, "concatenate") else np
        shards = []
        for prefix, shape in parts:
            m = read_int4_linear(self.ckpt, self.int4, prefix, shape, xp)
            size = shape[axis]
            if size % ranks:
                return None  # (the 16-bit path's cut names the shape)
            lo, hi = rank * size // ranks, (rank + 1) * size // ranks
            try:
                shards.append(m.rows(lo, hi) if axis == 0 else m.columns(lo, hi))
            except ValueError:  # a shard that cuts a group
                return None
        pairs = interleave and len(shards) == 2 and shards[0].codes.shape == shards[1].codes.shape
        pairs = pairs and shards[0].codes.shape[0] % 8 == 0
        if pairs:
            matrix = Int4Matrix.interleaved(shards[0], shards[1])
        else:
            matrix = Int4Matrix.stacked(shards) if len(shards) > 1 else shards[0]
        try:
            weights, records = matrix.gemv_layout()
        except ValueError:  # a shape the GEMV does not take
            return None
        w, r = self.upload(weights), self.upload(records)
        n, k = matrix.codes.shape
        try:
            dense.quantized.add_int4_weight(
                int(w.data.ptr), n, k, int(r.data.ptr), matrix.group_size, interleaved=pairs
            )
        except RuntimeError:  # a GPU the GEMV cannot run on
            self.keep.remove(w)
            self.keep.remove(r)
            return None
        return int(w.data.ptr)

    def keeps_fp8_experts(self, eng: Any, hidden: int, intermediate: int) -> bool:
        """Whether engine ``eng`` keeps a mixture-of-experts model's e4m3 experts (the whole model's ``hidden`` by
        ``intermediate``, split ``eng.tensor_parallel`` ways) as stored, read by the FP8 grouped GEMV
        (``MoELayer(fp8_experts=...)``), rather than dequantized by :meth:`linear`: the loader's FP8 layout keeps
        them (``stored_experts``), the GEMV reads each rank's share
        (:meth:`~fi_engine.checkpoint.quantization.Fp8Scheme.experts_for`) and the engine's switch
        :attr:`~fi_engine.runtime.worker.model_runner.ModelRunner.fp8_experts_as_stored` is on. The MoE families
        decide it once, before their first layer (``ModelFamily.experts_stored``)."""
        fp8 = self.fp8
        fits = fp8 is not None and fp8.experts_for(hidden, intermediate, eng.tensor_parallel).stored_experts
        return bool(fits and eng.fp8_experts_as_stored)

    def mismatch_hint(self, got: str) -> str:
        """What :meth:`get`'s refusal of a tensor of dtype ``got`` adds after naming it (a subclass may say more)."""
        if got == "float8_e4m3fn" and self.fp8 is not None:
            return (
                "; this engine dequantizes e4m3 projections stored one tensor per expert or projection (<p>.weight "
                "with its scales), not this one; serve a bfloat16 copy of this checkpoint"
            )
        return "; mixed-precision checkpoints are not supported"

    def embedding_and_head(self, eng: Any, c: Any) -> None:
        """Upload the token embedding and the LM head (the embedding itself where tied, or where the checkpoint has
        no ``lm_head.weight``) for engine ``eng`` of checkpoint config ``c``: the whole ``[V, H]`` tables, or this
        rank's rows of them (its ``vocab_shard``). Sets ``eng.embed``, ``eng.lm_head`` and ``eng.head_rows`` (the
        LM head's output columns on this rank)."""
        vs = eng.vocab_shard

        def table(name: str) -> np.ndarray:  # the whole [V, H] table, or this rank's rows of it
            whole = self.get(name, (c.vocab_size, c.hidden_size))
            return whole if vs is None else vs.take(whole)

        eng.embed = self.ptr(table("model.embed_tokens.weight"))
        tied = c.tie_word_embeddings or "lm_head.weight" not in self.ckpt
        eng.lm_head = eng.embed if tied else self.ptr(table("lm_head.weight"))
        eng.head_rows = c.vocab_size if vs is None else vs.rows

    def upload(self, arr: Any) -> Any:
        """A device copy of ``arr`` (kept alive with the engine; a device array already: itself, kept)."""
        dev = self.cp.asarray(np.ascontiguousarray(arr) if isinstance(arr, np.ndarray) else arr)
        self.keep.append(dev)
        return dev

    def ptr(self, arr: np.ndarray) -> int:
        """The device address of an uploaded copy of ``arr``."""
        return int(self.upload(arr).data.ptr)

    def vector(self, arr: np.ndarray, dtype: str | None = None) -> Any:
        """A descriptor of an uploaded 1-D copy of ``arr``."""
        dev = self.upload(arr)
        return kernels.descriptor(dev.data.ptr, (arr.shape[0],), dtype or self.dtype, self.device, owner=dev)

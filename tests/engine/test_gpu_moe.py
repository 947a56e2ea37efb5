"""The MoE layer (fi_engine.layers.moe) on a real GPU against a float32 numpy reference (gated by
FI_FFI_RUN_GPU_TESTS=1; needs CuPy and the model-family test wheel; bfloat16 cases convert through torch).

Reference, per token: softmax over the router logits (float32, from the dtype-rounded x and router weight), top-k,
renormalized (Mixtral) or not (Qwen3-MoE without ``norm_topk_prob``); then
``sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))`` in float32 on the dtype-rounded weights, with the intermediate
activation rounded to the dtype as the kernels store it. The layer's chosen experts must equal the reference's
for every token whose k-th and (k+1)-th logits are more than 1e-3 apart (near-ties may differ: both computations
round differently); outputs are compared under the layer's own routing, tolerance 2e-2 (float16) / 5e-2
(bfloat16) absolute and relative on outputs of magnitude ~1. Token counts include 1 (six of eight experts
empty), and batches where some experts get no token at all.

gpt-oss's layer (router bias, gate/up and down biases, clamped SwiGLU) is checked the same way against its float32
formula, and the dense-over-experts path (``forward_dense``) against the routed ones, eager and replayed in a graph.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

if os.environ.get("FI_FFI_RUN_GPU_TESTS") != "1":
    pytest.skip("GPU tests run only with FI_FFI_RUN_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

import numpy as np

cupy = pytest.importorskip("cupy")

from fi_engine.layers.moe import ClampedSwiGLU, MoEBiases, MoELayer, MoEWeights  # noqa: E402

pytestmark = pytest.mark.gpu
TOL = {"float16": 2e-2, "bfloat16": 5e-2}


@pytest.fixture(autouse=True)
def _models(models_modules: list[str]) -> None:
    """Skips (naming the wheel) when the model-family modules are not pinned."""


def to_device(a: np.ndarray, dtype: str) -> tuple[object, np.ndarray]:
    """(device array in the layer's storage, the float32 values it holds)."""
    if dtype == "float16":
        h = a.astype(np.float16)
        return cupy.asarray(h), h.astype(np.float32)
    torch = pytest.importorskip("torch")
    b = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return cupy.asarray(b.view(torch.int16).numpy().view(np.uint16)), b.float().numpy()


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    import torch

    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).float().numpy()


def from_device(a: object, dtype: str) -> np.ndarray:
    host = cupy.asnumpy(a)
    if dtype == "float16":
        return host.astype(np.float32)
    import torch

    return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16).float().numpy()


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def random_weights(rng: np.random.Generator, experts: int, h: int, i: int, dtype: str) -> MoEWeights:
    """Router, gate/up and down weights on the device, entries ~N(0, 1/fan_in) (outputs of magnitude ~1)."""
    router_d, _ = to_device(rng.standard_normal((experts, h)) / h**0.5, dtype)
    gu_d, _ = to_device(rng.standard_normal((experts, 2 * i, h)) / h**0.5, dtype)
    down_d, _ = to_device(rng.standard_normal((experts, h, i)) / i**0.5, dtype)
    return MoEWeights(router_d, gu_d, down_d)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
@pytest.mark.parametrize(("experts", "top_k", "renormalize"), [(8, 2, True), (16, 4, False)], ids=["mixtral", "qwen3"])
def test_moe_layer_matches_float32(dtype: str, tokens: int, experts: int, top_k: int, renormalize: bool) -> None:
    rng = np.random.default_rng(tokens + experts)
    h, i = 256, 512
    x_d, x = to_device(rng.standard_normal((tokens, h)), dtype)
    router_d, router = to_device(rng.standard_normal((experts, h)) / h**0.5, dtype)
    gu_d, gu = to_device(rng.standard_normal((experts, 2 * i, h)) / h**0.5, dtype)
    down_d, down = to_device(rng.standard_normal((experts, h, i)) / i**0.5, dtype)
    stream = cupy.cuda.Stream(non_blocking=True)
    layer = MoELayer(
        MoEWeights(router_d, gu_d, down_d), dtype=dtype, top_k=top_k, renormalize=renormalize, max_tokens=512,
        stream=stream,
    )  # fmt: skip
    try:
        out = cupy.zeros_like(x_d)
        assert layer.forward(x_d, out) is out
        stream.synchronize()
        weights, chosen, groups = layer.last_routing  # type: ignore[misc]
        logits = x @ router.T
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        want_experts = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
        srt = np.sort(logits, axis=1)[:, ::-1]
        clear = (srt[:, top_k - 1] - srt[:, top_k]) > 1e-3 if top_k < experts else np.ones(tokens, bool)
        assert (np.sort(chosen[clear], 1) == np.sort(want_experts[clear], 1)).all()
        if tokens == 1:
            assert (groups.counts == 0).sum() == experts - top_k  # the empty experts' segments
        want = np.zeros((tokens, h), np.float32)
        for t in range(tokens):
            for j in range(top_k):
                e = chosen[t, j]
                g = gu[e] @ x[t]
                act = round_to(silu(round_to(g[:i], dtype)) * round_to(g[i:], dtype), dtype)
                want[t] += weights[t, j] * round_to(down[e] @ act, dtype)
        got = from_device(out, dtype)
        np.testing.assert_allclose(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    finally:
        layer.close()


def test_moe_layer_reuses_its_buffers_across_batch_sizes() -> None:
    rng = np.random.default_rng(0)
    h, i, experts = 128, 256, 8
    stream = cupy.cuda.Stream(non_blocking=True)
    weights = random_weights(rng, experts, h, i, "float16")
    layer = MoELayer(weights, dtype="float16", top_k=2, max_tokens=64, stream=stream)
    try:
        x_d, _ = to_device(rng.standard_normal((64, h)), "float16")
        full = cupy.zeros_like(x_d)
        layer.forward(x_d, full)
        for n in (1, 17, 64):  # a prefix of the batch gives the prefix of the result
            part = cupy.zeros_like(x_d)
            layer.forward(x_d[:n], part)
            stream.synchronize()
            np.testing.assert_allclose(cupy.asnumpy(part[:n]), cupy.asnumpy(full[:n]), atol=1e-3, rtol=1e-3)
        with pytest.raises(ValueError, match="tokens: 65 exceeds the rows of x"):
            layer.forward(x_d, full, tokens=65)
    finally:
        layer.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(("experts", "top_k", "renormalize"), [(8, 2, True), (16, 4, False)], ids=["mixtral", "qwen3"])
def test_the_fixed_capacity_path_matches_the_host_path_and_replays_in_a_graph(
    dtype: str, experts: int, top_k: int, renormalize: bool
) -> None:
    """forward_static (device routing, every expert C rows, prepared GEMMs) gives forward's result, and a CUDA graph
    captured around it gives the result of each new input it is replayed on."""
    rng = np.random.default_rng(experts)
    h, i, cap = 256, 512, 32
    stream = cupy.cuda.Stream(non_blocking=True)
    layer = MoELayer(
        random_weights(rng, experts, h, i, dtype), dtype=dtype, top_k=top_k, renormalize=renormalize, max_tokens=64,
        stream=stream, capacity=cap,
    )  # fmt: skip
    try:
        for tokens in (1, 7, cap):
            x_d, _ = to_device(rng.standard_normal((tokens, h)), dtype)
            host_out, dev_out = cupy.zeros_like(x_d), cupy.zeros_like(x_d)
            layer.forward(x_d, host_out)
            layer.forward_static(x_d, dev_out)
            stream.synchronize()
            np.testing.assert_allclose(
                from_device(dev_out, dtype), from_device(host_out, dtype), atol=TOL[dtype], rtol=TOL[dtype]
            )
        # capture one static step at the full capacity, then replay it on new inputs written into the same buffer
        x_buf, _ = to_device(rng.standard_normal((cap, h)), dtype)
        out_buf = cupy.zeros_like(x_buf)
        layer.forward_static(x_buf, out_buf)  # warm-up outside the capture (modules, cuBLAS algorithms)
        stream.synchronize()
        stream.begin_capture()
        layer.forward_static(x_buf, out_buf)
        graph = stream.end_capture()
        for _ in range(2):
            new, _ = to_device(rng.standard_normal((cap, h)), dtype)
            x_buf[...] = new
            cupy.cuda.Device().synchronize()
            graph.launch(stream)
            want = cupy.zeros_like(x_buf)
            layer.forward(x_buf, want)
            stream.synchronize()
            np.testing.assert_allclose(
                from_device(out_buf, dtype), from_device(want, dtype), atol=TOL[dtype], rtol=TOL[dtype]
            )
    finally:
        layer.close()


def test_the_fixed_capacity_path_computes_only_the_chosen_experts_rows() -> None:
    """moe_slots writes each expert's token count into both grouped GEMMs' problem sizes: the counts equal the
    routing's, and the output rows of experts no token chose (and rows past each count) keep a sentinel, so their
    weights were not multiplied; the result still equals the host path's."""
    rng = np.random.default_rng(11)
    experts, top_k, h, i, cap, dtype = 8, 2, 256, 512, 32, "float16"
    stream = cupy.cuda.Stream(non_blocking=True)
    layer = MoELayer(
        random_weights(rng, experts, h, i, dtype), dtype=dtype, top_k=top_k, max_tokens=cap, stream=stream, capacity=cap
    )
    layer.gemv_tokens = 0  # every step through the grouped GEMM, whose rows this test watches
    sentinel = np.float16(-7.0)
    try:
        for tokens in (1, 3, cap):
            x_d, _ = to_device(rng.standard_normal((tokens, h)), dtype)
            layer.s_y.fill(sentinel)
            cupy.cuda.Device().synchronize()  # the fill ran on the legacy stream, the layer's is non-blocking
            dev_out, host_out = cupy.zeros_like(x_d), cupy.zeros_like(x_d)
            layer.forward_static(x_d, dev_out)
            stream.synchronize()
            chosen = cupy.asnumpy(layer.s_experts[: tokens * top_k])
            counts = np.bincount(chosen, minlength=experts)
            for problems in layer._s_problems:
                assert cupy.asnumpy(problems.reshape(experts, 3)[:, 0]).tolist() == counts.tolist()
            y = cupy.asnumpy(layer.s_y).reshape(experts, cap, h)
            for e in range(experts):
                assert not (y[e, : counts[e]] == sentinel).all(axis=1).any(), f"expert {e}: a chosen row unwritten"
                assert (y[e, counts[e] :] == sentinel).all(), f"expert {e}: rows past its {counts[e]} written"
            if tokens == 1:
                assert (counts == 0).sum() == experts - top_k
            layer.forward(x_d, host_out)
            stream.synchronize()
            np.testing.assert_allclose(
                from_device(dev_out, dtype), from_device(host_out, dtype), atol=TOL[dtype], rtol=TOL[dtype]
            )
    finally:
        layer.close()


def gemv_layer(rng: np.random.Generator, dtype: str) -> tuple[int, int, int, Any, MoEWeights, MoELayer]:
    """A layer of 8 experts, top-2, hidden 256, intermediate 512 whose grouped GEMV serves steps of up to 8 tokens:
    ``(hidden, top_k, capacity, stream, weights, layer)``."""
    experts, top_k, h, i, cap = 8, 2, 256, 512, 8
    stream = cupy.cuda.Stream(non_blocking=True)
    weights = random_weights(rng, experts, h, i, dtype)
    layer = MoELayer(weights, dtype=dtype, top_k=top_k, max_tokens=32, stream=stream, capacity=cap)
    assert layer._grouped is not None and layer._gemv_serves(cap)
    return h, top_k, cap, stream, weights, layer


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_grouped_gemv_matches_float32_and_the_grouped_gemm_and_replays_in_a_graph(dtype: str) -> None:
    """Steps of at most ``gemv_tokens`` tokens take the grouped GEMV (fi_engine.kernels.moe_gemv): the same result as
    the host path and as the fixed-capacity grouped GEMM (tolerance as above), every assignment's gate/up row equal to a
    float32 reference of its expert within the dtype's rounding (rel 1e-2 of the row's scale), at 1-8 tokens (1: six of
    eight experts unread); captured in a CUDA graph, a replay on new inputs gives the new result."""
    rng = np.random.default_rng(5)
    h, top_k, cap, stream, weights, layer = gemv_layer(rng, dtype)
    try:
        gate_up = from_device(weights.gate_up, dtype)
        for tokens in (1, 2, 3, 5, 8):
            x_d, x_f = to_device(rng.standard_normal((tokens, h)), dtype)
            gemv_out, gemm_out, host_out = (cupy.zeros_like(x_d) for _ in range(3))
            layer.forward_static(x_d, gemv_out)
            stream.synchronize()
            chosen = cupy.asnumpy(layer.s_experts[: tokens * top_k])
            gu = from_device(layer.gate_up_out[: tokens * top_k], dtype)
            for a, e in enumerate(chosen):
                want = gate_up[e] @ x_f[a // top_k]
                np.testing.assert_allclose(gu[a], want, atol=1e-2 * float(np.abs(want).max()) + 1e-3, rtol=1e-2)
            layer.gemv_tokens = 0
            layer.forward_static(x_d, gemm_out)
            layer.gemv_tokens = 8
            layer.forward(x_d, host_out)
            stream.synchronize()
            for other in (gemm_out, host_out):
                np.testing.assert_allclose(
                    from_device(gemv_out, dtype), from_device(other, dtype), atol=TOL[dtype], rtol=TOL[dtype]
                )
        x_buf, _ = to_device(rng.standard_normal((cap, h)), dtype)
        out_buf = cupy.zeros_like(x_buf)
        layer.forward_static(x_buf, out_buf)
        stream.synchronize()
        stream.begin_capture()
        layer.forward_static(x_buf, out_buf)
        graph = stream.end_capture()
        new, _ = to_device(rng.standard_normal((cap, h)), dtype)
        x_buf[...] = new
        cupy.cuda.Device().synchronize()
        graph.launch(stream)
        want = cupy.zeros_like(x_buf)
        layer.forward(x_buf, want)
        stream.synchronize()
        np.testing.assert_allclose(
            from_device(out_buf, dtype), from_device(want, dtype), atol=TOL[dtype], rtol=TOL[dtype]
        )
    finally:
        layer.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_grouped_gemv_makes_silu_and_mul_as_the_launch_before_it_does(dtype: str) -> None:
    """The grouped GEMV step's down projection making SiLU-and-mul as it stages its rows (``gemv_fused_silu``,
    the default) gives bit for bit what FlashInfer's ``silu_and_mul`` as a launch of its own before the plain
    down GEMV gives (the same rounding of each activation, the same sums), at 1-8 tokens, packed and not."""
    rng = np.random.default_rng(11)
    h, top_k, _, stream, _, layer = gemv_layer(rng, dtype)
    experts = layer.num_experts
    try:
        for tokens in (1, 2, 3, 5, 8):
            x_d, _ = to_device(rng.standard_normal((tokens, h)), dtype)
            outs = {}
            for fused in (True, False):
                layer.gemv_fused_silu = fused
                packed, plain = cupy.zeros_like(x_d), cupy.zeros_like(x_d)  # new buffers: packed anew
                layer.forward_static(x_d, packed)
                with stream:
                    layer._router_logits(x_d, tokens)
                    route = (layer.logits, np.int32(experts), np.int32(top_k), np.int32(layer.renormalize),
                             np.int32(tokens), layer.s_experts, layer.s_weights)  # fmt: skip
                    layer._route_fn(((tokens + 127) // 128,), (128,), route, stream=stream)
                    layer._gemv_experts(x_d, plain, tokens)
                stream.synchronize()
                outs[fused] = (cupy.asnumpy(packed), cupy.asnumpy(plain))
            for got, want in zip(outs[True], outs[False], strict=True):
                assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), f"{tokens} tokens"
            assert np.abs(outs[True][0].astype(np.float32)).max() > 0  # a product was made
    finally:
        layer.gemv_fused_silu = MoELayer.gemv_fused_silu
        layer.close()


def test_layers_sharing_one_scratch_give_their_own_results() -> None:
    """Two layers on one MoEScratch (as the engine's layers are), run in turn on both paths, give what each gives
    with buffers of its own; a scratch of another shape is refused naming it."""
    from fi_engine.layers.moe import MoEScratch

    rng = np.random.default_rng(5)
    experts, top_k, h, i, cap, dtype = 8, 2, 256, 512, 16, "bfloat16"
    stream = cupy.cuda.Stream(non_blocking=True)
    shared = MoEScratch(
        num_experts=experts, hidden=h, intermediate=i, top_k=top_k, max_tokens=64, dtype=dtype, capacity=cap
    )
    pairs = []
    for _ in range(2):
        w = random_weights(rng, experts, h, i, dtype)
        kw = dict(dtype=dtype, top_k=top_k, max_tokens=64, stream=stream, capacity=cap)
        pairs.append((MoELayer(w, scratch=shared, **kw), MoELayer(w, **kw)))  # type: ignore[arg-type]
    assert pairs[0][0].xs is pairs[1][0].xs and pairs[0][0].s_y is pairs[1][0].s_y
    assert shared.nbytes == MoEScratch.bytes_needed(experts, h, i, top_k, 64, cap)
    assert pairs[0][1].xs is not pairs[1][1].xs
    try:
        for tokens, static in ((40, False), (cap, True), (3, True), (1, False)):
            x_d = to_device(rng.standard_normal((tokens, h)), dtype)[0]
            outs = []
            for layer in (pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]):  # the shared ones back to back
                out = cupy.zeros_like(x_d)
                (layer.forward_static if static else layer.forward)(x_d, out)
                outs.append(out)
            stream.synchronize()
            for a, b in ((outs[0], outs[2]), (outs[1], outs[3])):
                assert (cupy.asnumpy(a) == cupy.asnumpy(b)).all(), f"{tokens} tokens, static={static}"
        w0 = pairs[0][0].weights
        with pytest.raises(ValueError, match="scratch: expected a MoEScratch"):
            MoELayer(w0, dtype=dtype, top_k=top_k, max_tokens=32, stream=stream, capacity=cap, scratch=shared)
    finally:
        for shared_layer, own in pairs:
            shared_layer.close()
            own.close()


def biases_of(rng: np.random.Generator, experts: int, h: int, i: int) -> MoEBiases:
    """gpt-oss-like biases (float32 on the device, ~N(0, 0.5): each one moves the result)."""

    def f32(*shape: int) -> object:
        return cupy.asarray(rng.normal(0.0, 0.5, size=shape).astype(np.float32))

    return MoEBiases(f32(experts), f32(experts, 2 * i), f32(experts, h))


def biased_reference(layer: MoELayer, x: np.ndarray, dtype: str) -> np.ndarray:
    """gpt-oss's experts in float32 (transformers' GptOssExperts with the gate/up columns already split) under the
    layer's own last routing, rounding where the kernels store 16-bit values."""
    weights, chosen, _ = layer.last_routing  # type: ignore[misc]
    gu, down = from_device(layer.weights.gate_up, dtype), from_device(layer.weights.down, dtype)
    b = layer.biases
    assert b is not None and layer.activation is not None
    b_gu, b_down = cupy.asnumpy(b.gate_up), cupy.asnumpy(b.down)
    alpha, limit = layer.activation.alpha, layer.activation.limit
    i = layer.intermediate
    want = np.zeros((x.shape[0], layer.hidden), np.float32)
    for t in range(x.shape[0]):
        for j in range(layer.top_k):
            e = chosen[t, j]
            g = round_to(gu[e] @ x[t], dtype) + b_gu[e]
            gate, up = np.minimum(g[:i], limit), np.clip(g[i:], -limit, limit)
            act = round_to((up + 1) * gate / (1 + np.exp(-alpha * gate)), dtype)
            want[t] += weights[t, j] * (round_to(down[e] @ act, dtype) + b_down[e])
    return want


@pytest.mark.parametrize("kind", ["plain", "gpt_oss"])
def test_the_dense_path_matches_the_routed_paths_and_replays_in_a_graph(kind: str) -> None:
    """forward_dense (every expert's gate/up in one GEMM, down as a batched GEMM, the combine over the chosen) gives
    forward's result (and forward_static's) on one set of weights, with SiLU (Mixtral-like, 8 experts top-2) and
    with gpt-oss's biases and clamped SwiGLU (16 experts top-4, checked against the float32 formula too); a graph
    captured around it gives the result of each new input it is replayed on; it refuses more tokens than dense_rows."""
    rng = np.random.default_rng(3)
    dtype, h, i, cap = "bfloat16", 256, 512, 16
    experts, top_k = (8, 2) if kind == "plain" else (16, 4)
    extras: dict = {} if kind == "plain" else {
        "biases": biases_of(rng, experts, h, i), "activation": ClampedSwiGLU(1.702, 7.0)}  # fmt: skip
    stream = cupy.cuda.Stream(non_blocking=True)
    weights = random_weights(rng, experts, h, i, dtype)
    if kind == "gpt_oss":  # gate/up values past the clamp (7) for some rows
        weights = MoEWeights(weights.router, to_device(from_device(weights.gate_up, dtype) * 6.0, dtype)[0],
                             weights.down)  # fmt: skip
    layer = MoELayer(
        weights, dtype=dtype, top_k=top_k, max_tokens=64, stream=stream, capacity=cap, dense_rows=cap, **extras
    )
    tol = TOL[dtype] * (1 if kind == "plain" else 2)  # the biases and the clamp make outputs of magnitude ~5
    try:
        with pytest.raises(ValueError, match=r"tokens: expected 0..dense_rows \(16\)"):
            x_d = to_device(rng.standard_normal((cap + 1, h)), dtype)[0]
            layer.forward_dense(x_d, cupy.zeros_like(x_d))
        for tokens in (1, 5, cap):
            x_d, x = to_device(rng.standard_normal((tokens, h)), dtype)
            outs = {name: cupy.zeros_like(x_d) for name in ("host", "static", "dense")}
            layer.forward(x_d, outs["host"])
            layer.forward_static(x_d, outs["static"])
            layer.forward_dense(x_d, outs["dense"])
            stream.synchronize()
            got = {name: from_device(o, dtype) for name, o in outs.items()}
            if kind == "gpt_oss":
                want = biased_reference(layer, x, dtype)
                assert np.abs(want).max() > 3.0  # the biases count
                np.testing.assert_allclose(got["host"], want, atol=tol, rtol=tol)
            np.testing.assert_allclose(got["dense"], got["host"], atol=tol, rtol=tol)
            np.testing.assert_allclose(got["static"], got["host"], atol=tol, rtol=tol)
        x_buf = to_device(rng.standard_normal((cap, h)), dtype)[0]
        out_buf = cupy.zeros_like(x_buf)
        layer.forward_dense(x_buf, out_buf)  # warm-up outside the capture
        stream.synchronize()
        stream.begin_capture()
        layer.forward_dense(x_buf, out_buf)
        graph = stream.end_capture()
        for _ in range(2):
            x_buf[...] = to_device(rng.standard_normal((cap, h)), dtype)[0]
            cupy.cuda.Device().synchronize()
            graph.launch(stream)
            want_d = cupy.zeros_like(x_buf)
            layer.forward(x_buf, want_d)
            stream.synchronize()
            np.testing.assert_allclose(from_device(out_buf, dtype), from_device(want_d, dtype), atol=tol, rtol=tol)
    finally:
        layer.close()
    plain = MoELayer(random_weights(rng, 8, h, i, dtype), dtype=dtype, top_k=2, max_tokens=8, stream=stream)
    try:
        with pytest.raises(ValueError, match="forward_dense: build the layer with dense_rows="):
            plain.forward_dense(x_buf[:2], out_buf[:2])
    finally:
        plain.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_router_gemv_makes_the_norm_and_the_routing_of_the_step(dtype: str) -> None:
    """``prepared_normed_step`` (the post-attention ``fused_add_rmsnorm`` as the router GEMV's prologue and the
    routing as its epilogue: one launch for three) against FlashInfer's ``fused_add_rmsnorm`` followed by
    ``prepared_step``, at 1-4 tokens: the new residual, the normalized rows, the logits and the chosen experts bit
    for bit; the routing weights within 1e-6 relative (this launch's fast-math ``expf`` and division against
    ``moe_route``'s, each a few float32 ulps); the output within one 16-bit ulp of the separate launches' (2**-10 /
    2**-7 relative: the same products, combined with those weights). Three launches in a row give the same result
    (the block counter sets itself back to 0), and a CUDA graph of the step replays it on new inputs."""
    import fi_ffi

    rng = np.random.default_rng(13)
    h, top_k, _, stream, _, layer = gemv_layer(rng, dtype)
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    eps = 1e-5
    try:
        assert layer.dense.fused.has_router(layer._ab)
        nw, _ = to_device(1.0 + 0.1 * rng.standard_normal(h), dtype)
        for tokens in (1, 2, 3, 4):
            x, _ = to_device(rng.standard_normal((tokens, h)), dtype)
            resid, _ = to_device(rng.standard_normal((tokens, h)), dtype)
            # the separate launches: x <- rmsnorm(resid + x) * nw, resid <- resid + x, in place; then the step
            x_ref, resid_ref, out_ref = x.copy(), resid.copy(), cupy.zeros_like(x)
            stream.synchronize()
            fi_ffi.fused_add_rmsnorm(layer._t(x_ref, (tokens, h)), layer._t(resid_ref, (tokens, h)),
                                     layer._t(nw, (h,)), eps, stream=stream.ptr)  # fmt: skip
            for call in layer.prepared_step(x_ref, out_ref, tokens, False):
                call()
            stream.synchronize()
            want = {name: cupy.asnumpy(a[: tokens * top_k]) for name, a in (("experts", layer.s_experts),
                    ("weights", layer.s_weights))}  # fmt: skip
            want_logits = cupy.asnumpy(layer.logits[:tokens])
            for _ in range(3):
                resid_out, out = cupy.zeros_like(resid), cupy.zeros_like(x)
                calls = layer.prepared_normed_step(
                    x, out, tokens, int(resid.data.ptr), int(resid_out.data.ptr), int(nw.data.ptr), eps
                )
                assert calls is not None and len(calls) == 4  # router (+ norm + routing), gate/up, down, combine
                for call in calls:
                    call()
                stream.synchronize()
                assert int(layer._route_done.get()[0]) == 0
                assert np.array_equal(cupy.asnumpy(resid_out).view(np.uint16), cupy.asnumpy(resid_ref).view(np.uint16))
                normed = cupy.asnumpy(layer.xs[:tokens]).view(np.uint16)
                assert np.array_equal(normed, cupy.asnumpy(x_ref).view(np.uint16))
                assert np.array_equal(cupy.asnumpy(layer.logits[:tokens]).view(np.uint32), want_logits.view(np.uint32))
                assert np.array_equal(cupy.asnumpy(layer.s_experts[: tokens * top_k]), want["experts"])
                got_w = cupy.asnumpy(layer.s_weights[: tokens * top_k])
                np.testing.assert_allclose(got_w, want["weights"], rtol=1e-6, atol=0)
                got, ref = from_device(out, dtype), from_device(out_ref, dtype)
                np.testing.assert_allclose(got, ref, rtol=ulp, atol=ulp * float(np.abs(ref).max()) * 2**-4)
                assert np.abs(ref).max() > 0
        # a graph of the step (4 tokens), replayed on new inputs, against the same step run eagerly
        tokens = 4
        x, _ = to_device(rng.standard_normal((tokens, h)), dtype)
        resid, _ = to_device(rng.standard_normal((tokens, h)), dtype)
        resid_out, out = cupy.zeros_like(resid), cupy.zeros_like(x)
        calls = layer.prepared_normed_step(x, out, tokens, int(resid.data.ptr), int(resid_out.data.ptr),
                                           int(nw.data.ptr), eps)  # fmt: skip
        assert calls is not None
        stream.begin_capture()
        for call in calls:
            call()
        graph = stream.end_capture()
        for seed in (1, 2):
            new = np.random.default_rng(seed)
            x[...], _ = to_device(new.standard_normal((tokens, h)), dtype)
            resid[...], _ = to_device(new.standard_normal((tokens, h)), dtype)
            cupy.cuda.Device().synchronize()
            graph.launch(stream)
            stream.synchronize()
            replayed = cupy.asnumpy(out).view(np.uint16).copy(), cupy.asnumpy(resid_out).view(np.uint16).copy()
            out[...] = 0
            for call in calls:
                call()
            stream.synchronize()
            assert np.array_equal(replayed[0], cupy.asnumpy(out).view(np.uint16))
            assert np.array_equal(replayed[1], cupy.asnumpy(resid_out).view(np.uint16))
        assert int(layer._route_done.get()[0]) == 0
        # bad values are refused by name before anything is packed or launched
        good = dict(residual=int(resid.data.ptr), residual_out=int(resid_out.data.ptr), norm_weight=int(nw.data.ptr))
        for change, error, match in [
            ({"residual": [1]}, TypeError, r"^residual: expected an int"),
            ({"residual_out": -16}, ValueError, r"^residual_out: expected an int in"),
            ({"norm_weight": 1.5}, TypeError, r"^norm_weight: expected an int"),
            ({"eps": 1e300}, ValueError, r"^eps: expected a finite float within float32's range"),
            ({"residual_out": int(resid.data.ptr)}, ValueError, r"^h_out: overlaps h"),
            ({"norm_weight": int(nw.data.ptr) + 8}, ValueError, r"^norm_weight: "),
        ]:
            args = {**good, "eps": eps, **change}
            with pytest.raises(error, match=match):
                layer.prepared_normed_step(x, out, tokens, **args)
    finally:
        layer.close()

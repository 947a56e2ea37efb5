"""The RoPE, activation and cascade declarations also bind FlashInfer 0.7.2's modules (CPU).

The 0.7.2 wheel (``../shared/wheels-072``) ships ``rope``, ``silu_and_mul`` and ``cascade`` with the argument
lists of 0.6.3. Here a lock pinning only that wheel is made active; each declaration is checked against the
0.7.2 module's own signature, and a launcher compiled for it packs a call that reaches the module's device
check. Skips when the wheel is absent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_norm import assert_reached_the_kernel, fake_cuda

from fi_ffi import caches, loader
from fi_ffi.abi import wire
from fi_ffi.abi.call import EntryPoint
from fi_ffi.errors import KernelError, LibraryLoadError
from fi_ffi.ops import activation, cascade, kernels, rope
from fi_ffi.ops.launcher import compile_launcher

pytestmark = pytest.mark.cpu_only

REPO = Path(__file__).resolve().parent.parent
URIS_072 = ("rope", "silu_and_mul", "cascade")


def _wheels_072() -> list[Path]:
    return sorted((REPO.parent / "shared" / "wheels-072").glob("flashinfer_jit_cache_072-*.whl"))


def _forget_bindings() -> None:
    """Start binding from the active lock: compiled launchers, bound entry points (keyed by URI only)."""
    caches.reset()
    kernels._bound.clear()


@pytest.fixture
def lock_072(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    wheels = _wheels_072()
    if not wheels:
        pytest.skip("the 0.7.2 test wheel is not present (<repo>/../shared/wheels-072)")
    if os.environ.get("FI_FFI_RUN_GPU_TESTS") == "1":
        pytest.skip("CPU-only signature proof: fake cuda:0 descriptors would really launch on a GPU")
    lock = tmp_path / "072.lock"
    lock.write_text(loader.dump_lock([loader.lock_entry(w) for w in wheels], header="0.7.2 only"))
    monkeypatch.setenv("FI_FFI_LOCK", str(lock))
    monkeypatch.setenv("FI_FFI_WHEELHOUSE", str(wheels[0].parent))
    monkeypatch.setenv("FI_FFI_CUDA_VERSION", "13.0")
    monkeypatch.delenv("FI_FFI_SM", raising=False)
    _forget_bindings()  # the selection itself is keyed by these variables
    loader.runtime_library()
    try:
        loader.ensure_cudart()
    except LibraryLoadError as exc:
        pytest.skip(f"libcudart is not available: {exc}")
    yield lock
    _forget_bindings()  # later tests bind the session's 0.6.3 modules again


DECLS_072 = [(uri, d) for module in (rope, activation, cascade) for pattern, d in module.DECLARATIONS
             for uri in URIS_072 if re.fullmatch(pattern, uri)]


@pytest.mark.parametrize(("uri", "decl"), DECLS_072, ids=[f"{u}:{d.entry}" for u, d in DECLS_072])
def test_declaration_matches_the_072_module(lock_072: Path, uri: str, decl: wire.Declaration) -> None:
    assert loader.module_source(uri).release.startswith("0.7.2")
    text = EntryPoint(loader.load_module(uri), decl.entry, uri).signature_text()
    found = wire.parse_signature(text, decl.entry)
    assert wire.signature_mismatch(decl, found) == "", text


def test_every_072_module_is_covered() -> None:
    assert {u for u, _ in DECLS_072} == set(URIS_072)
    assert len(DECLS_072) == 5 + 1 + 3  # rope's five entry points, silu_and_mul, cascade's three


def test_packed_calls_reach_the_072_modules(lock_072: Path) -> None:
    q, k = fake_cuda((3, 4, 128)), fake_cuda((3, 2, 128))
    launch = compile_launcher(rope.APPLY_ROPE_POS_IDS, "rope", rope._rope_check(ragged=False, llama31=False))
    with pytest.raises(KernelError) as info:
        launch(q, k, q, k, fake_cuda((3,), "int32"), 64, False, 1.0, 1e4)
    assert_reached_the_kernel(info.value)
    assert launch.launcher.entry is not None and "0.7.2" in loader.module_source("rope").release

    launch = compile_launcher(activation.SILU_AND_MUL, "silu_and_mul", activation._check)
    with pytest.raises(KernelError) as info:
        launch(fake_cuda((2, 64)), fake_cuda((2, 128)), False)
    assert_reached_the_kernel(info.value)

    launch = compile_launcher(cascade.MERGE_STATE_IN_PLACE, "cascade", cascade._check_in_place)
    with pytest.raises(KernelError) as info:
        launch(fake_cuda((2, 4, 128)), fake_cuda((2, 4), "float32"), fake_cuda((2, 4, 128)),
               fake_cuda((2, 4), "float32"), mask=None)
    assert_reached_the_kernel(info.value)

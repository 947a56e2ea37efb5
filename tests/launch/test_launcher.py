"""The calling mechanism itself (fi_ffi.launch.launcher), on CPU against the real norm module.

Descriptors and CUDA-array-interface objects here claim cuda:0 over host memory: a valid call passes every
check, crosses the FFI and stops at the module's device check (no GPU), which proves the packing; nothing
fi_ffi keeps may hold the caller's buffers afterwards.
"""

from __future__ import annotations

import gc
import linecache
import re
import resource
import traceback
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fi_ffi
from fi_ffi import caches
from fi_ffi.abi import objects
from fi_ffi.errors import KernelError, LoaderError
from fi_ffi.ops import norm
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only
OPS = Path(fi_ffi.__file__).parent / "ops"


class HostCAI:
    """A CUDA-array-interface producer over host memory (a CPU machine takes CAI pointers as cuda:0)."""

    __hash__ = None  # type: ignore[assignment]  # unhashable, like CuPy/numpy arrays

    def __init__(self, shape: tuple[int, ...], dtype: str = "<f2") -> None:
        self.host = np.zeros(int(np.prod(shape)) + 256, dtype=np.float16)
        offset = (-self.host.ctypes.data % 256) // 2
        self.view = self.host[offset : offset + int(np.prod(shape))].reshape(shape)
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": dtype,
            "data": (self.view.ctypes.data, False),
            "version": 3,
            "strides": None,
        }

    def __eq__(self, other: object) -> bool:
        return self is other


def fake_cuda(shape: tuple[int, ...]) -> Tensor:
    host = np.zeros(int(np.prod(shape)) * 2 + 256, dtype=np.uint8)
    ptr = (host.ctypes.data + 255) // 256 * 256
    return Tensor.from_pointer(ptr, shape, "float16", 0, owner=host)


def reached_the_kernel(call: Any) -> None:
    with pytest.raises(KernelError) as info:
        call()
    assert info.value.kind != "TypeError", info.value  # not a signature mismatch


def test_op_modules_pack_through_declarations_only() -> None:
    # no byte offsets, word indices or hand-packed frames outside the launcher
    forbidden = re.compile(r"\.pack_into\(|\bframe\.q\[|\bq\[\d+\]|\bbuf\[\d+:\d+\]|call_packed|Signature\(")
    for path in sorted(OPS.glob("*.py")):
        if path.name == "launcher.py":
            continue
        hits = [line for line in path.read_text().splitlines() if forbidden.search(line)]
        assert not hits, f"{path.name} packs by hand: {hits[:3]}"


def test_unhashable_producers_reach_the_kernel(kernel_modules: list[str]) -> None:
    x, w, out = HostCAI((4, 128)), HostCAI((128,)), HostCAI((4, 128))
    with pytest.raises(TypeError):
        hash(x)
    reached_the_kernel(lambda: fi_ffi.rmsnorm(x, w, out=out))
    reached_the_kernel(lambda: fi_ffi.fused_add_rmsnorm(x, out, w))


def test_nothing_fi_ffi_keeps_holds_the_callers_buffers(kernel_modules: list[str]) -> None:
    x, w, out = HostCAI((4, 128)), HostCAI((128,)), HostCAI((4, 128))
    d = fake_cuda((4, 128))
    with pytest.raises(KernelError):
        fi_ffi.rmsnorm(x, w, out=out)
    with pytest.raises(KernelError):
        fi_ffi.rmsnorm(d, w, out=d)
    with pytest.raises(ValueError):
        fi_ffi.rmsnorm(x, HostCAI((64,)), out=out)  # a failing call must not keep anything either
    prepared = fi_ffi.prepare(fi_ffi.rmsnorm, d, w, out=d)
    refs = [weakref.ref(o) for o in (x.host, w.host, out.host, d.owner, d)]
    del x, w, out, d
    del prepared  # a prepared call keeps its arguments until it is dropped, by design
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


def test_a_32_layer_loop_with_a_weight_per_layer_stays_on_the_fast_path(kernel_modules: list[str]) -> None:
    launch = norm._fused_add_rmsnorm.launcher
    weights = [fake_cuda((4096,)) for _ in range(32)]
    hidden, residual = fake_cuda((1, 4096)), fake_cuda((1, 4096))
    caches.reset()
    before = launch.slow_calls
    for _step in range(3):
        for w in weights:
            with pytest.raises(KernelError):
                fi_ffi.fused_add_rmsnorm(hidden, residual, w)
        hidden = hidden.rebind(hidden.data_ptr)  # new descriptors every step, same layout
    assert launch.slow_calls - before == 1


def test_a_changed_layout_or_misaligned_pointer_is_checked_again(kernel_modules: list[str]) -> None:
    x, w, out = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    launch = norm._rmsnorm.launcher
    reached_the_kernel(lambda: fi_ffi.rmsnorm(x, w, out=out))
    before = launch.slow_calls
    reached_the_kernel(lambda: fi_ffi.rmsnorm(x.rebind(x.data_ptr + 256), w, out=out))
    assert launch.slow_calls == before  # same layout, aligned: fast path
    with pytest.raises(ValueError, match=r"^input: data pointer 0x[0-9a-f]+ must be aligned to 16 bytes"):
        fi_ffi.rmsnorm(x.rebind(x.data_ptr + 2), w, out=out)
    with pytest.raises(ValueError, match=r"^weight: expected shape \(128,\)"):
        fi_ffi.rmsnorm(x, fake_cuda((64,)), out=out)
    with pytest.raises(ValueError, match=r"^input: data pointer is NULL"):
        fi_ffi.rmsnorm(x.rebind(0), w, out=out)


@pytest.mark.parametrize(
    ("stream", "exc", "text"),
    [
        (-1, ValueError, r"stream: expected a cudaStream_t handle in \[0, 2\*\*64\)"),
        (2**64, ValueError, r"stream: expected a cudaStream_t handle"),
        (True, TypeError, r"stream: expected a CUDA stream"),
        ("s", TypeError, r"stream: expected None, an int"),
        (type("S", (), {"__cuda_stream__": lambda self: (0,)})(), TypeError, r"stream: .*__cuda_stream__ must give"),
        (type("S", (), {"__cuda_stream__": lambda self: 1 / 0})(), TypeError, r"stream: .*__cuda_stream__\(\) failed"),
    ],
)
def test_bad_streams_are_named_before_anything_is_bound(stream: Any, exc: type, text: str) -> None:
    x, w, out = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    with pytest.raises(exc, match=text):
        fi_ffi.rmsnorm(x, w, out=out, stream=stream)
    with pytest.raises(exc, match=text):
        fi_ffi.prepare(fi_ffi.rmsnorm, x, w, out=out, stream=stream)


@pytest.mark.parametrize(
    ("eps", "exc", "text"),
    [
        (10**400, ValueError, r"^eps: .* does not fit in a float64"),
        ("1e-6", TypeError, r"^eps: expected a float, got str"),
        (float("nan"), ValueError, r"^eps: expected a finite value > 0"),
        ([1e-6], TypeError, r"^eps: expected a float, got list"),
    ],
)
def test_bad_scalars_are_named(eps: Any, exc: type, text: str) -> None:
    x, w, out = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    with pytest.raises(exc, match=text):
        fi_ffi.rmsnorm(x, w, out=out, eps=eps)


def test_outputs_must_not_overlap_themselves() -> None:
    x, w = fake_cuda((4, 128)), fake_cuda((128,))
    rows_alias = Tensor.from_pointer(x.data_ptr, (4, 128), "float16", 0, strides=(0, 1))
    with pytest.raises(ValueError, match=r"^out: an output's elements must not overlap"):
        fi_ffi.rmsnorm(x, w, out=rows_alias)


def test_sizes_beyond_int32_and_wrapping_ranges_are_refused() -> None:
    w = fake_cuda((128,))
    big = Tensor.from_pointer(1 << 40, (1 << 31, 128), "float16", 0)
    with pytest.raises(ValueError, match=r"^input: size 2147483648 in shape .* does not fit the kernels' int32"):
        fi_ffi.rmsnorm(big, w, out=fake_cuda((4, 128)))
    wraps = Tensor.from_pointer((1 << 64) - 256, (4, 128), "float16", 0)
    with pytest.raises(ValueError, match=r"^input: the memory range .* wraps past the end of the address space"):
        fi_ffi.rmsnorm(wraps, w, out=fake_cuda((4, 128)))


def test_ffi_tensor_objects_are_released_and_keep_nothing(kernel_modules: list[str]) -> None:
    # 10**5 objects made and released as the launcher does for ffi.Tensor parameters: no growth, nothing kept
    host = np.zeros((4, 8), np.float32)
    t = Tensor.from_pointer(host.ctypes.data, (4, 8), "float32", "cpu", owner=host)
    for _ in range(1000):
        objects.tensor_object(t).release()
    gc.collect()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    count = len(gc.get_objects())
    alive = len(objects._managed.alive)  # other tests' objects may still wait for their collection
    for _ in range(100_000):
        objects.tensor_object(t).release()
    gc.collect()
    assert len(objects._managed.alive) <= alive
    assert len(gc.get_objects()) - count < 1000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 16 * 1024  # KiB


def test_caches_reset_forgets_what_was_validated(kernel_modules: list[str]) -> None:
    x, w, out = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    launch = norm._rmsnorm.launcher
    reached_the_kernel(lambda: fi_ffi.rmsnorm(x, w, out=out))
    before = launch.slow_calls
    reached_the_kernel(lambda: fi_ffi.rmsnorm(x, w, out=out))
    assert launch.slow_calls == before
    assert "launchers (compiled per declaration, with their frames and images)" in caches.names()
    caches.reset()
    reached_the_kernel(lambda: fi_ffi.rmsnorm(x, w, out=out))
    assert launch.slow_calls == before + 1


def test_the_generated_source_reads_like_the_declaration() -> None:
    source = norm._rmsnorm.source
    assert source.startswith("def launch(out, input, weight, eps, enable_pdl, *, stream=None, context=None):")
    assert "_absent" not in source  # one release: no catch-all for other releases' arguments


def test_a_module_with_another_argument_list_is_a_loader_error(kernel_modules: list[str]) -> None:
    from fi_ffi.abi import wire
    from fi_ffi.launch.launcher import launcher

    newer = wire.declare(
        "rmsnorm", [*norm.RMSNORM.params[:3], ("maybe_scale", wire.OPT_TENSOR), *norm.RMSNORM.params[3:]], release="9.9"
    )
    launch = launcher(newer, "norm", None)
    x, w, out = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    with pytest.raises(LoaderError, match=r"module 'norm', entry point 'rmsnorm': its signature does not match"):
        launch(out, x, w, None, 1e-6, False)


def test_a_given_stream_that_is_current_already_is_called_on_directly(kernel_modules: list[str]) -> None:
    # inside stream_scope(s), a call given stream=s finds s current and calls straight from the generated
    # code; a call given another stream still sets it for the call and restores s afterwards, also on error
    x, w, out = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    with fi_ffi.stream_scope(0x40):
        for _ in range(2):
            reached_the_kernel(lambda: fi_ffi.rmsnorm(x, w, out=out, stream=0x40))
            assert fi_ffi.current_stream(0) == 0x40
        reached_the_kernel(lambda: fi_ffi.rmsnorm(x, w, out=out, stream=0x50))
        assert fi_ffi.current_stream(0) == 0x40
    assert "_get_stream(2, _e.device_id)" in norm._rmsnorm.source  # type: ignore[attr-defined]


def test_launchers_follow_the_producer_classes_they_read_inline() -> None:
    # the generated code tests each tensor argument's class against torch's / CuPy's with one global
    # read; the intake, which wrote those reads (read_source), keeps every launcher's copy of the classes in step
    from fi_ffi.tensor import intake

    namespace = norm._rmsnorm.launcher.namespace  # type: ignore[attr-defined]
    assert "__class__ is _TT and not out.is_neg()" in norm._rmsnorm.source  # type: ignore[attr-defined]
    source = norm._rmsnorm.source  # type: ignore[attr-defined]
    assert all(f"        {line}\n" in source for line in intake.read_source("out", "_k0", "_p0"))

    class Seen:
        pass

    saved = intake._torch_tensor, intake._cupy_ndarray
    try:
        intake._torch_tensor, intake._cupy_ndarray = Seen, saved[1]
        intake._classes_changed()
        assert namespace["_TT"] is Seen and namespace["_CP"] is saved[1]
    finally:
        intake._torch_tensor, intake._cupy_ndarray = saved
        intake._classes_changed()
    assert namespace["_TT"] is saved[0]
    intake._forget()  # forgets both: the launchers test against a class no object has
    assert namespace["_TT"] is intake._NotSeen and namespace["_CP"] is intake._NotSeen


def generated_lines(err: BaseException, filename: str) -> list[str]:
    """The source lines a formatted traceback of ``err`` shows under the frames of ``filename``."""
    text = "".join(traceback.format_exception(err))
    lines = text.splitlines()
    return [lines[i + 1].strip() for i, line in enumerate(lines[:-1]) if f'File "{filename}"' in line]


def test_a_traceback_through_the_generated_code_shows_its_lines(kernel_modules: list[str]) -> None:
    # the generated source is registered with linecache under its pseudo-filename: a traceback (and a debugger)
    # shows the line of the launch function that raised, not just "<fi_ffi launcher norm.rmsnorm>"
    launcher_ = norm._rmsnorm.launcher
    assert launcher_.filename == "<fi_ffi launcher norm.rmsnorm>"
    x, w, out = fake_cuda((4, 128)), fake_cuda((128,)), fake_cuda((4, 128))
    with pytest.raises(TypeError) as bad:  # a bad argument: the fast path leaves, the slow path names it
        norm._rmsnorm(out, x, w, "1e-6", False)
    assert generated_lines(bad.value, launcher_.filename) == [
        "_f, _e, (_p0, _p1, _p2, ) = _slow((out, input, weight, eps, enable_pdl, ), stream, context)"
    ]
    for _ in range(2):  # the kernel's own error, raised from the slow path's call and then from the fast path's
        with pytest.raises(KernelError) as failed:
            norm._rmsnorm(out, x, w, 1e-6, False)
        assert generated_lines(failed.value, launcher_.filename) == ["if _f.call(*_f.cargs): _fail(_name, _f)"]
    linecache.checkcache()  # an entry without a file stays (checkcache drops only entries whose file changed)
    assert linecache.getline(launcher_.filename, 1).startswith("def launch(out, input, weight, eps, enable_pdl")
    assert "".join(linecache.getlines(launcher_.filename)) == launcher_.source


def test_a_second_source_under_one_name_gets_a_filename_of_its_own() -> None:
    from fi_ffi.launch.launcher import Bound, compile_launcher

    plain = compile_launcher(norm.RMSNORM, "norm-twin", None)
    again = compile_launcher(norm.RMSNORM, "norm-twin", None)  # the same source: the same entry serves both
    bound = compile_launcher(norm.RMSNORM, "norm-twin", None, bound=Bound(("eps",), lambda c: (1e-6,)))
    names = [f.launcher.filename for f in (plain, again, bound)]  # type: ignore[attr-defined]
    assert names[0] == names[1] == "<fi_ffi launcher norm-twin.rmsnorm>"
    assert names[2].startswith("<fi_ffi launcher norm-twin.rmsnorm #")
    assert "".join(linecache.getlines(names[2])) == bound.source != plain.source  # type: ignore[attr-defined]

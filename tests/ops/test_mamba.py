"""Mamba selective state update on the CPU machine, against the real ``mamba_selective_state_update`` modules of
the model-family test wheel: packed calls reach the module (which stops at the missing device), the SM90 module
too (it needs ``libcuda.so.1``: a stub built from ``../shared/stubs`` is loaded ``RTLD_GLOBAL`` first, in a child
process of that test only), and every bad argument is refused before the FFI, naming the argument."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers.env import REPO, subprocess_env
from helpers.fakes import assert_reached_the_kernel, fake_cuda
from helpers.mamba_args import ssu_args

import fi_ffi
from fi_ffi.errors import KernelError
from fi_ffi.tensor.descriptor import Tensor

pytestmark = pytest.mark.cpu_only

STUB = REPO.parent / "shared" / "stubs" / "libcuda.so.1"


@pytest.mark.parametrize(
    ("state_dtype", "weight_dtype"), [("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float32")]
)
@pytest.mark.parametrize(("dim", "dstate"), [(64, 128), (256, 64)])
def test_selective_state_update_reaches_the_simple_kernel(
    kernel_modules: object, models_modules: object, state_dtype: str, weight_dtype: str, dim: int, dstate: int
) -> None:
    args = ssu_args(dim=dim, dstate=dstate, state_dtype=state_dtype, weight_dtype=weight_dtype)
    with pytest.raises(KernelError) as info:
        fi_ffi.selective_state_update(**args, dt_softplus=True, pad_slot_id=-1, backend="simple")
    assert_reached_the_kernel(info.value)
    assert "mamba_selective_state_update.selective_state_update" in str(info.value)
    assert f"{state_dtype}[6, 4, {dim}, {dstate}] cuda:0" in str(info.value)


def test_optional_inputs_may_be_left_out(kernel_modules: object, models_modules: object) -> None:
    args = ssu_args()
    for name in ("z", "dt_bias", "state_batch_indices"):
        args[name] = None
    with pytest.raises(KernelError) as info:
        fi_ffi.selective_state_update(**args)  # auto: no GPU here, so the simple module
    assert_reached_the_kernel(info.value)
    assert "mamba_selective_state_update.selective_state_update" in str(info.value)


def driver_stub(folder: Path) -> Path:
    """A ``libcuda.so.1`` stand-in for the SM90 module: the shared stub's functions (all answer "no device") plus
    ``cuTensorMapEncodeTiled``, which the module imports and the shared stub lacks; built with the C compiler."""
    source = STUB.with_name("libcuda_stub.c")
    if not source.is_file():
        pytest.skip(f"needs the driver stub's source {source} (../shared/stubs)")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip(
            "the SM90 module needs cuTensorMapEncodeTiled, which ../shared/stubs/libcuda.so.1 lacks, and no C "
            "compiler is here to build a stub that has it"
        )
    extra = "\nCUresult cuTensorMapEncodeTiled(void *map, int type, unsigned rank, void *addr, const void *dims,\n"
    extra += "    const void *strides, const void *box, const void *elem, int a, int b, int c, int d) { return 100; }\n"
    (folder / "stub.c").write_text(source.read_text() + extra)
    lib = folder / "libcuda.so.1"
    subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib), str(folder / "stub.c")],
        check=True,
        capture_output=True,
    )
    return lib


def test_the_sm90_module_reaches_its_kernel_with_a_driver_stub(
    kernel_modules: object, models_modules: object, tmp_path: Path
) -> None:
    stub = driver_stub(tmp_path)
    # A child process: the stub must never be the libcuda of this test session (other tests query the driver).
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})  # tests/: helpers
        from fi_ffi.loader import libraries
        libraries.load_library({str(stub)!r}, global_symbols=True)  # before the module that lists it as NEEDED
        import fi_ffi
        from fi_ffi.launch import kernels
        kernels._driver_found = True  # the stub is no driver: pass the ops' driver check, as the test session does
        from fi_ffi.errors import KernelError
        from helpers.mamba_args import ssu_args
        args = ssu_args(dim=128, dstate=128)
        try:
            fi_ffi.selective_state_update(**args, backend="sm90")
        except KernelError as exc:
            print("KernelError", exc.kind, exc)
        else:
            print("returned")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("KernelError") and "TypeError" not in first, done.stdout  # no signature mismatch
    assert "mamba_selective_state_update_sm90.selective_state_update" in done.stdout, done.stdout


@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        (
            {"state": fake_cuda((6, 4, 64, 96))},
            ValueError,
            r"state: dstate = 96 is not one the kernels are compiled for",
        ),
        ({"state": fake_cuda((6, 4, 32, 128))}, ValueError, r"state: dim = 32"),
        ({"state": fake_cuda((6, 4, 64, 128), "int32")}, TypeError, "state: expected dtype bfloat16, float16, float32"),
        (
            {"state": fake_cuda((6, 64, 4, 128)).view((6, 4, 64, 128), strides=(32768, 128, 512, 1))},
            ValueError,
            r"state: each row \[nheads, dim, dstate\] must be contiguous",
        ),
        (
            {"state": fake_cuda((4, 4, 64, 128)).view((2, 4, 64, 128), strides=(32770, 8192, 128, 1))},
            ValueError,
            "state: the batch stride",
        ),
        ({"state": fake_cuda((1, 4, 64, 128))}, ValueError, r"x: batch 2 exceeds the state's 1 rows"),
        ({"x": fake_cuda((2, 4, 64), "float16")}, TypeError, "x: expected dtype bfloat16"),
        ({"x": fake_cuda((2, 4, 32), "bfloat16")}, ValueError, r"x: expected shape \(2, 4, 64\)"),
        (
            {"x": fake_cuda((2, 64, 4), "bfloat16").view((2, 4, 64), strides=(256, 1, 4))},
            ValueError,
            r"x: each row \[nheads, dim\] must be contiguous",
        ),
        ({"dt": fake_cuda((2, 4, 64), "float32")}, ValueError, r"dt: expected one value per \(request, head\)"),
        (
            {"A": fake_cuda((4, 64, 128), "float32")},
            ValueError,
            "A: expected one value per head broadcast with strides",
        ),
        (
            {"A": fake_cuda((4,), "bfloat16").view((4, 64, 128), strides=(1, 0, 0))},
            TypeError,
            "A: expected dtype float32",
        ),
        ({"D": fake_cuda((4,), "bfloat16").view((4, 64), strides=(1, 0))}, TypeError, "D: expected dtype float32"),
        ({"D": fake_cuda((4, 64), "float32")}, ValueError, "D: expected one value per head"),
        (
            {"dt_bias": fake_cuda((5,), "float32").view((5, 64), strides=(1, 0))},
            ValueError,
            r"dt_bias: expected shape \(4, 64\)",
        ),
        (
            {"B": fake_cuda((2, 3, 128), "bfloat16")},
            ValueError,
            r"B: ngroups = 3 \(dimension 1\) must divide nheads = 4",
        ),
        ({"C": fake_cuda((2, 2, 64), "bfloat16")}, ValueError, r"C: expected shape \(2, 2, 128\)"),
        ({"C": fake_cuda((2, 2, 128), "float16")}, TypeError, r"C: expected dtype bfloat16 \(same as x\)"),
        (
            {"B": fake_cuda((2, 2, 132), "bfloat16").view((2, 2, 128), strides=(260, 128, 1))},
            ValueError,
            "B: the batch stride",
        ),
        ({"z": fake_cuda((2, 4, 64), "float32")}, TypeError, "z: expected dtype bfloat16"),
        ({"out": fake_cuda((2, 4, 64), "float32")}, TypeError, "out: expected dtype bfloat16"),
        (
            {"out": fake_cuda((2, 4, 128), "bfloat16").view((2, 4, 64), strides=(512, 128, 1))},
            ValueError,
            "out: expected a contiguous tensor",
        ),
        (
            {"state_batch_indices": fake_cuda((2,), "float32")},
            TypeError,
            "state_batch_indices: expected dtype int32, int64",
        ),
        ({"state_batch_indices": fake_cuda((3,), "int32")}, ValueError, r"state_batch_indices: expected shape \(2,\)"),
        ({"pad_slot_id": 1 << 40}, ValueError, "pad_slot_id: expected an int32 value"),
        ({"pad_slot_id": 1.5}, TypeError, "pad_slot_id"),
        ({"dt_softplus": "yes"}, TypeError, "dt_softplus"),
        ({"cache_steps": 2}, ValueError, "cache_steps: the multi-token .* form is not bound"),
        (
            {"intermediate_states_buffer": fake_cuda((2, 2, 4, 64, 128))},
            ValueError,
            "intermediate_states_buffer: the multi-token",
        ),
        (
            {"x": fake_cuda((2, 4, 64), "bfloat16").view((2, 4, 64), offset=4)},
            ValueError,
            "x: data pointer .* aligned to 16",
        ),
        ({"out": fake_cuda((2, 4, 64), "bfloat16", device=1)}, ValueError, "out: expected a tensor on cuda:0"),
        ({"x": fake_cuda((2, 4, 64), "bfloat16", device="cpu")}, ValueError, "x: expected a CUDA device tensor"),
        ({"backend": "fa3"}, ValueError, "backend: expected one of auto, sm90, simple"),
        ({"out": None}, TypeError, "out: required"),
    ],
)
def test_bad_inputs_are_named(change: dict[str, Any], exc: type, pattern: str) -> None:
    args = ssu_args()
    args.update(change)
    backend = args.pop("backend", "simple")
    with pytest.raises(exc, match=pattern):
        fi_ffi.selective_state_update(**args, backend=backend)


def test_the_sm90_module_wants_a_128_byte_aligned_state() -> None:
    args = ssu_args()
    st = args["state"]
    args["state"] = Tensor.from_pointer(
        st.data_ptr + 16 if st.data_ptr % 128 == 0 else st.data_ptr + 16 - st.data_ptr % 16,
        st.shape,
        "float32",
        0,
        owner=st,
    )
    with pytest.raises(ValueError, match="state: data pointer .* aligned to 128 bytes"):
        fi_ffi.selective_state_update(**args, backend="sm90")


@pytest.mark.parametrize("dstate", [64, 256])
def test_the_sm90_module_refuses_dim_256_by_name(dstate: int) -> None:
    # FlashInfer 0.6.3's SM90 kernel stores out from 4 warps x 32 lanes: rows 128.. of each head stay unwritten
    args = ssu_args(dim=256, dstate=dstate)
    with pytest.raises(ValueError, match=r"state: dim = 256 is not supported by the SM90 module .* backend='simple'"):
        fi_ffi.selective_state_update(**args, backend="sm90")


def test_auto_picks_the_sm90_module_on_hopper_up_to_dim_128() -> None:
    from fi_ffi.ops.mamba import module_for

    sm90, simple = "mamba_selective_state_update_sm90", "mamba_selective_state_update"
    assert [module_for("auto", 9, d) for d in (64, 128, 256)] == [sm90, sm90, simple]
    assert [module_for("auto", sm, 64) for sm in (8, 10, None)] == [simple] * 3
    assert module_for("sm90", None, 64) == sm90 and module_for("simple", 9, 64) == simple


def test_auto_runs_dim_256_on_the_simple_module(kernel_modules: object, models_modules: object) -> None:
    with pytest.raises(KernelError) as info:
        fi_ffi.selective_state_update(**ssu_args(dim=256, dstate=256))
    assert_reached_the_kernel(info.value)
    assert "mamba_selective_state_update.selective_state_update" in str(info.value)


@pytest.mark.parametrize("other", ["x", "B", "state"])
def test_out_and_state_must_not_overlap_the_inputs(other: str) -> None:
    args = ssu_args()
    victim = args[other]
    args["out"] = Tensor.from_pointer(victim.data_ptr, (2, 4, 64), "bfloat16", 0, owner=victim)
    pattern = "state: overlaps out" if other == "state" else f"out: overlaps {other}"  # both are outputs
    with pytest.raises(ValueError, match=pattern):
        fi_ffi.selective_state_update(**args, backend="simple")
    args = ssu_args()
    args["state"] = Tensor.from_pointer(args["x"].data_ptr, (6, 4, 64, 128), "float32", 0, owner=args["x"])
    with pytest.raises(ValueError, match="state: overlaps x"):
        fi_ffi.selective_state_update(**args, backend="simple")

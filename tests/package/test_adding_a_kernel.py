"""docs/ADDING_A_KERNEL.md is true: its op module, run as written, binds the real ``norm`` module of the test wheel,
passes the module's signature check, refuses bad input by name, and refuses a positional ``stream``; and that module,
saved as ``fi_ffi/ops/my_norm.py`` in a copy of the package, is all it takes (with the guide's one command) for
``fi_ffi.my_rmsnorm`` to be exported, its launcher bound and ``fi_ffi.prepare`` to pack it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from helpers.fakes import assert_reached_the_kernel, fake_cuda

from fi_ffi.errors import KernelError
from fi_ffi.launch import packing, registry

pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ADDING_A_KERNEL.md"


def example_source() -> str:
    """The first Python block of the guide."""
    block = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert block is not None, "the guide lost its example"
    return block.group(1)


@pytest.fixture
def example_module() -> Iterator[types.ModuleType]:
    """The guide's module, executed; the op it registers (with fi_ffi.prepare too) is forgotten afterwards."""
    before_ops, before_packable = dict(registry._launch), dict(packing._PACKABLE)
    module = types.ModuleType("adding_a_kernel_example")
    exec(compile(example_source(), str(DOC), "exec"), module.__dict__)
    yield module
    registry._launch.clear()
    registry._launch.update(before_ops)
    packing._PACKABLE.clear()
    packing._PACKABLE.update(before_packable)


def test_the_example_reaches_the_real_kernel(kernel_modules: object, example_module: types.ModuleType) -> None:
    m = example_module
    x, w, out = fake_cuda((4, 64)), fake_cuda((64,)), fake_cuda((4, 64))
    with pytest.raises(KernelError) as err:  # no GPU here: the module accepted the arguments, then found no device
        m.my_rmsnorm(x, w, out, eps=1e-5, stream=0)
    assert_reached_the_kernel(err.value)


def test_the_example_refuses_bad_input_by_name(kernel_modules: object, example_module: types.ModuleType) -> None:
    m = example_module
    x, out = fake_cuda((4, 64)), fake_cuda((4, 64))
    with pytest.raises(ValueError, match=r"^weight: "):
        m.my_rmsnorm(x, fake_cuda((32,)), out)
    with pytest.raises(ValueError, match=r"^eps: "):
        m.my_rmsnorm(x, fake_cuda((64,)), out, eps=0.0)


def test_the_example_launcher_takes_stream_by_keyword_only(
    kernel_modules: object, example_module: types.ModuleType
) -> None:
    m = example_module
    x, w, out = fake_cuda((4, 64)), fake_cuda((64,)), fake_cuda((4, 64))
    with pytest.raises(TypeError):
        m._my_rmsnorm(out, x, w, 1e-5, False, 0)  # the guide's earlier example did this


def test_the_example_declaration_is_the_one_the_declaration_test_binds(example_module: types.ModuleType) -> None:
    from fi_ffi.ops import norm

    assert example_module.DECLARATIONS == (("norm", norm.RMSNORM),)  # tests/launch/test_declarations.py binds it


def test_the_decorator_declares_the_op_in_place(example_module: types.ModuleType) -> None:
    # at the module's execution: its __all__, the op's launch function, its packed form; the def is returned as is
    m = example_module
    assert m.__all__ == ["my_rmsnorm"]
    assert registry.launch_of(m.my_rmsnorm) is m._my_rmsnorm
    assert packing.packable()[m.my_rmsnorm] == packing.Packable(m._my_rmsnorm, m._wire, None)
    assert m.my_rmsnorm.__code__.co_filename == str(DOC) and not hasattr(m.my_rmsnorm, "__wrapped__")


def test_the_regenerate_step_names_the_tool() -> None:
    text = DOC.read_text(encoding="utf-8")
    step = text[text.index("## 2. Regenerate") : text.index("## 3.")]
    assert "python tools/gen_init_stub.py" in step and "python tools/api_reference.py" in step
    assert "`@op`" in step and "fi_ffi/launch/exports.py" in step


# Run in a child process on the copy of the package: fi_ffi.my_rmsnorm is public, resolves to the new module's def,
# and fi_ffi.prepare packs it, which binds the launcher's entry point in the real norm module (its signature checked).
CHILD = """
import json, sys
import fi_ffi
from fi_ffi.launch import kernels
from helpers.fakes import fake_cuda

kernels._driver_found = True  # as the test session: calls reach the real module on a machine without a driver

found = {"public": "my_rmsnorm" in fi_ffi.__all__ and "my_rmsnorm" in dir(fi_ffi)}
op = fi_ffi.my_rmsnorm
found["module"] = op.__module__
from fi_ffi.ops import my_norm
found["all"] = my_norm.__all__
x, w, out = fake_cuda((4, 64)), fake_cuda((64,)), fake_cuda((4, 64))
prepared = fi_ffi.prepare(op, x, w, out, eps=1e-5, stream=0)
found["prepared"] = type(prepared).__name__
found["bound"] = my_norm._my_rmsnorm.launcher.entry is not None
try:
    prepared()
except fi_ffi.KernelError as exc:  # no GPU here: the packed call reached the module, which found no device
    found["called"] = type(exc).__name__
try:
    fi_ffi.prepare(op, x, fake_cuda((32,)), out)
except ValueError as exc:
    found["refused"] = str(exc).split(":")[0]
print(json.dumps(found))
"""


def test_one_decorated_def_is_all_it_takes(kernel_modules: object, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "fi_ffi", copy / "fi_ffi", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tools", copy / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "fi_ffi" / "ops" / "my_norm.py").write_text(example_source(), encoding="utf-8")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{copy}:{ROOT / 'tests'}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=300)

    stale = run("tools/gen_init_stub.py", "--check")
    assert stale.returncode == 1 and "fi_ffi/launch/exports.py" in stale.stderr  # the new op is not a row yet
    assert run("tools/gen_init_stub.py").returncode == 0  # the guide's step 2
    assert '    "my_rmsnorm": "ops.my_norm",\n' in (copy / "fi_ffi" / "launch" / "exports.py").read_text("utf-8")
    assert "from .ops.my_norm import my_rmsnorm as my_rmsnorm" in (copy / "fi_ffi" / "__init__.pyi").read_text("utf-8")
    child = run("-c", CHILD)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout.strip().splitlines()[-1]) == {
        "public": True,
        "module": "fi_ffi.ops.my_norm",
        "all": ["my_rmsnorm"],
        "prepared": "PreparedCall",
        "bound": True,
        "called": "KernelError",
        "refused": "weight",
    }

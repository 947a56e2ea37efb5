"""docs/ADDING_A_KERNEL.md is true: its op module, run as written, binds the real ``norm`` module of the test wheel,
passes the module's signature check, refuses bad input by name, and refuses a positional ``stream``."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from helpers.fakes import assert_reached_the_kernel, fake_cuda

from fi_ffi.errors import KernelError

pytestmark = pytest.mark.cpu_only

DOC = Path(__file__).resolve().parents[2] / "docs" / "ADDING_A_KERNEL.md"


def example_module() -> types.ModuleType:
    """The first Python block of the guide, executed as a module."""
    block = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert block is not None, "the guide lost its example"
    module = types.ModuleType("adding_a_kernel_example")
    exec(compile(block.group(1), str(DOC), "exec"), module.__dict__)
    return module


def test_the_example_reaches_the_real_kernel(kernel_modules: object) -> None:
    m = example_module()
    x, w, out = fake_cuda((4, 64)), fake_cuda((64,)), fake_cuda((4, 64))
    with pytest.raises(KernelError) as err:  # no GPU here: the module accepted the arguments, then found no device
        m.my_rmsnorm(x, w, out, eps=1e-5, stream=0)
    assert_reached_the_kernel(err.value)


def test_the_example_refuses_bad_input_by_name(kernel_modules: object) -> None:
    m = example_module()
    x, out = fake_cuda((4, 64)), fake_cuda((4, 64))
    with pytest.raises(ValueError, match=r"^weight: "):
        m.my_rmsnorm(x, fake_cuda((32,)), out)
    with pytest.raises(ValueError, match=r"^eps: "):
        m.my_rmsnorm(x, fake_cuda((64,)), out, eps=0.0)


def test_the_example_launcher_takes_stream_by_keyword_only(kernel_modules: object) -> None:
    m = example_module()
    x, w, out = fake_cuda((4, 64)), fake_cuda((64,)), fake_cuda((4, 64))
    with pytest.raises(TypeError):
        m._rmsnorm(out, x, w, 1e-5, False, 0)  # the guide's earlier example did this


def test_the_example_declaration_is_the_one_the_declaration_test_binds() -> None:
    from fi_ffi.ops import norm

    m = example_module()
    assert m.DECLARATIONS == (("norm", norm.RMSNORM),)  # tests/launch/test_declarations.py binds norm.RMSNORM


def test_the_export_step_is_one_row_of_the_table_then_the_stub() -> None:
    import importlib

    import fi_ffi

    text = DOC.read_text(encoding="utf-8")
    step = text[text.index("## 2. Export it") : text.index("## 3.")]
    assert "`_EXPORTS`" in step and "python tools/gen_init_stub.py" in step and "python tools/api_reference.py" in step
    row = re.search(r'^\s*"(\w+)": "([\w.]+)",$', step, re.M)
    assert row is not None, "the guide lost its example row"
    # the row is spelled as the table's rows are: a module relative to fi_ffi that exists, as an existing row has it
    table: dict[str, str] = fi_ffi._EXPORTS  # type: ignore[attr-defined]
    assert row.group(2) in table.values()
    importlib.import_module(f"fi_ffi.{row.group(2)}")
    assert (DOC.parent.parent / "tools" / "gen_init_stub.py").is_file()

"""Module paths that moved in the two-package layout (:mod:`fi_ffi.moved`): the old path still imports, warns once
with a DeprecationWarning naming the new path, and gives the very module of the new path (one module object)."""

from __future__ import annotations

import subprocess
import sys

from helpers.env import subprocess_env


def run(code: str) -> subprocess.CompletedProcess[str]:
    # a fresh interpreter: the test session has imported the new paths already, and warnings fire at first import
    return subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )


def test_the_engine_path_warns_and_is_the_engine() -> None:
    done = run(
        "import warnings, fi_ffi\n"
        "try:\n"
        "    import fi_ffi.models.config\n"
        "except DeprecationWarning as w:\n"
        "    print('warned:', w)\n"
        "warnings.simplefilter('ignore')\n"
        "import fi_ffi.models.config as old, fi_engine.checkpoint.config as new, fi_ffi.models as pkg, fi_engine\n"
        "print(old is new, pkg is fi_engine, old.LlamaConfig is new.LlamaConfig)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "warned: fi_ffi.models moved to fi_engine: import fi_engine instead" in done.stdout
    assert done.stdout.splitlines()[-1] == "True True True"


def test_the_typing_path_is_the_protocols_module() -> None:
    done = run(
        "import warnings, fi_ffi\n"
        "warnings.simplefilter('ignore')\n"
        "from fi_ffi.typing import TensorLike\n"
        "import fi_ffi.tensor.protocols as new\n"
        "print(TensorLike is new.TensorLike)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_paths_that_did_not_move_are_not_answered() -> None:
    from fi_ffi import moved

    assert moved.new_name("fi_ffi.models.llama") == "fi_engine.llama"
    assert moved.new_name("fi_ffi.modelsX") is None  # a prefix of a name is not its package
    assert moved.new_name("fi_ffi.ops.norm") is None
    assert moved.MovedModuleFinder().find_spec("fi_ffi.ops.norm") is None
    done = run("import fi_ffi\nimport fi_ffi.no_such_module\n")
    assert done.returncode == 1 and "ModuleNotFoundError: No module named 'fi_ffi.no_such_module'" in done.stderr


def test_every_flat_engine_path_imports_its_new_module_with_a_warning() -> None:
    # the engine's flat modules of the previous release (fi_engine.moved.MOVED): each old path warns, naming the new
    # one, and is the new module itself; the new module exists (a table entry pointing nowhere fails here)
    from fi_engine.moved import MOVED

    assert len(MOVED) > 40 and MOVED["fi_engine.llama"] == "fi_engine.models.llama"
    done = run(
        "import importlib, warnings, fi_engine\n"
        "from fi_engine.moved import MOVED\n"
        "bad = []\n"
        "for old, new in MOVED.items():\n"
        "    with warnings.catch_warnings(record=True) as seen:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module(old)\n"
        "    if module is not importlib.import_module(new) or not any(new in str(w.message) for w in seen):\n"
        "        bad.append(old)\n"
        "print('bad:', bad)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "bad: []" in done.stdout


def test_old_modules_that_are_packages_now_hand_their_names_on_with_a_warning() -> None:
    done = run(
        "import fi_engine.kernels, fi_engine.checkpoint, fi_engine.text\n"
        "for package, name in (('kernels', 'descriptor'), ('checkpoint', 'Checkpoint'), ('text', 'TextCodec')):\n"
        "    try:\n"
        "        getattr(getattr(fi_engine, package), name)\n"
        "    except DeprecationWarning as w:\n"
        "        print('warned:', w)\n"
        "import warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from fi_engine.text import TextCodec\n"
        "from fi_engine.text.codec import TextCodec as new\n"
        "print(TextCodec is new)\n"
        "try:\n"
        "    fi_engine.kernels.no_such_name\n"
        "except AttributeError as e:\n"
        "    print('missing:', e)\n"
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "warned: fi_engine.kernels.descriptor moved to fi_engine.kernels.flashinfer.descriptor" in out
    assert "warned: fi_engine.checkpoint.Checkpoint moved to fi_engine.checkpoint.safetensors.Checkpoint" in out
    assert "warned: fi_engine.text.TextCodec moved to fi_engine.text.codec.TextCodec" in out
    assert "True" in out and "missing: module 'fi_engine.kernels' has no attribute 'no_such_name'" in out


def handed_on(setup: str, old: str, then: str, missing: str) -> str:
    """A child's code: ``setup``, then ``old`` (reading an old path: its warning printed as ``warned: ...``), with
    warnings off ``then``, and ``missing`` (a name the old path never had: its AttributeError printed as
    ``missing: ...``)."""
    caught = "except {}:\n    print('{}:', e)\n"
    return (
        f"{setup}\ntry:\n    {old}\n{caught.format('DeprecationWarning as e', 'warned')}"
        f"import warnings\nwarnings.simplefilter('ignore')\n{then}\n"
        f"try:\n    {missing}\n{caught.format('AttributeError as e', 'missing')}"
    )


def test_a_split_module_hands_each_name_on_from_its_new_module() -> None:
    # fi_engine.moved.SPLIT: a module whose names went to several rooms imports at its old path, warns naming them,
    # and gives each name from its new module (the flat path before it is that module too); every home exists
    from fi_engine.moved import SPLIT

    assert SPLIT["fi_engine.runtime.paging"][0] == "fi_engine.runtime.sched.scheduler"
    setup = "import importlib, fi_engine\nfrom fi_engine.moved import SPLIT\n"
    setup += "for home in [h for homes in SPLIT.values() for h in homes]:\n    importlib.import_module(home)"
    then = (
        "import fi_engine.runtime.paging as old, fi_engine.paging as flat\n"
        "from fi_engine.runtime.sched import scheduler, step_arrays\n"
        "from fi_engine.runtime.worker import graph_shapes\n"
        "print(old is flat, old.Scheduler is scheduler.Scheduler, old.fill_decode is step_arrays.fill_decode,\n"
        "      old.prefill_buckets is graph_shapes.prefill_buckets, 'Request' in dir(old))"
    )
    done = run(handed_on(setup, "import fi_engine.runtime.paging", then, "old.no_such_name"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "warned: fi_engine.runtime.paging was split into fi_engine.runtime.sched.scheduler, " in out
    assert "True True True True True" in out
    assert "missing: module 'fi_engine.runtime.paging' has no attribute 'no_such_name'" in out


def test_a_name_that_left_a_module_is_handed_on_with_a_warning() -> None:
    # fi_engine.moved.NAMES: DeepSeek's FP8 scheme left checkpoint.quantization for the family's config reader
    then = (
        "from fi_engine.checkpoint.quantization import deepseek_fp8_scheme\n"
        "from fi_engine.models.deepseek_config import deepseek_fp8_scheme as new\n"
        "print(deepseek_fp8_scheme is new)"
    )
    setup = "import fi_engine.checkpoint.quantization as q"
    done = run(handed_on(setup, "q.deepseek_fp8_scheme", then, "q.no_such_name"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert (
        "warned: fi_engine.checkpoint.quantization.deepseek_fp8_scheme moved to "
        "fi_engine.models.deepseek_config.deepseek_fp8_scheme" in out
    )
    assert "True" in out
    assert "missing: module 'fi_engine.checkpoint.quantization' has no attribute 'no_such_name'" in out

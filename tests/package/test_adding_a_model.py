"""docs/ADDING_A_MODEL.md is true: its family module, run as written and registered at run time, is the family the
registry picks for a ``config.json`` with its model type, reads that config (refusing a bad value by name) and
builds its engine through its own hooks; and that module, saved as ``fi_engine/models/toy.py`` in a copy of the
package beside the guide's one registry row, is all it takes for the registry, the served model types and the
command line's help to know it. All on the CPU: the engine is stopped by its family's check, before any GPU work."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.env import subprocess_env
from helpers.hf_configs import SMALL_LLAMA

from fi_engine.models import registry

pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ADDING_A_MODEL.md"
MODULE = "adding_a_model_example"  # the module name the guide's code runs under here

TOY = {"model_type": "toy", **SMALL_LLAMA, "embedding_multiplier": 2.5}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def example_source() -> str:
    """The guide's family module (its first Python block)."""
    blocks = python_blocks()
    assert blocks, "the guide lost its example"
    return blocks[0]


def example_row() -> str:
    """The guide's registry row (its second Python block): one line."""
    row = python_blocks()[1].strip()
    assert row.startswith("Family(") and "\n" not in row
    return row


def checkpoint(path: Path, **change: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**TOY, **change}), encoding="utf-8")
    return path


@pytest.fixture
def toy() -> Iterator[types.ModuleType]:
    """The guide's module, executed as module ``MODULE`` and registered with the guide's row (its module path
    changed to this one's); the registry and ``sys.modules`` are restored afterwards."""
    before = dict(registry._BY_TYPE)
    module = types.ModuleType(MODULE)
    sys.modules[MODULE] = module
    try:
        exec(compile(example_source(), str(DOC), "exec"), module.__dict__)
        row = eval(example_row(), {"Family": registry.Family})
        registry.register(registry.Family(row.label, row.model_types, MODULE, row.engine, row.tensor_parallel))
        yield module
    finally:
        registry._BY_TYPE.clear()
        registry._BY_TYPE.update(before)
        del sys.modules[MODULE]


def test_the_registry_resolves_the_checkpoint_to_the_family(toy: types.ModuleType, tmp_path: Path) -> None:
    d = checkpoint(tmp_path / "toy")
    assert "toy" in registry.model_types() and registry.family_of(d).label == "Toy"
    assert registry.engine_class(d) is toy.ToyEngine and toy.ToyEngine.definition is toy.Toy


def test_the_family_reads_its_config(toy: types.ModuleType, tmp_path: Path) -> None:
    cfg = registry.read_config(checkpoint(tmp_path / "toy"))
    assert (cfg.model_type, cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim) == ("toy", 256, 4, 32)
    assert cfg.family == toy.ToySettings(2.5) and cfg.moe is None and not cfg.qk_norm
    default = {k: v for k, v in TOY.items() if k != "embedding_multiplier"}
    assert toy.toy_config(default).family == toy.ToySettings(1.0)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"embedding_multiplier": 0}, "embedding_multiplier"),
        ({"embedding_multiplier": "2"}, "embedding_multiplier"),
        ({"embedding_multiplier": float("inf")}, "embedding_multiplier"),
        ({"embedding_multiplier": True}, "embedding_multiplier"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),  # the shared fields: LlamaConfig.shared's checks
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_a_bad_value_is_refused_by_name(toy: types.ModuleType, tmp_path: Path, change: dict, key: str) -> None:
    d = checkpoint(tmp_path / "toy", **change)
    with pytest.raises(ValueError, match=rf"config\.json: .*{key}"):
        registry.engine_class(d)  # read by the family's reader before the engine class is handed out
    with pytest.raises(ValueError, match=key):
        toy.toy_config({**TOY, **change})


def test_the_engine_runs_the_family_hooks_before_any_gpu_work(toy: types.ModuleType, tmp_path: Path) -> None:
    d = checkpoint(tmp_path / "toy", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tensor_parallel: Toy shards an untied LM head only"):
        toy.ToyEngine(d, tensor_parallel=2)  # read_config, then check: both the family's


def test_each_engine_refuses_the_other_family_naming_the_right_engine(toy: types.ModuleType, tmp_path: Path) -> None:
    from fi_engine.models.llama import LlamaEngine

    with pytest.raises(ValueError, match=rf"LlamaEngine serves .* this one is 'toy'; load it with {MODULE}\.ToyEngine"):
        LlamaEngine(checkpoint(tmp_path / "toy"))
    with pytest.raises(ValueError, match=r"ToyEngine serves toy checkpoints.*fi_engine\.models\.llama\.LlamaEngine"):
        toy.ToyEngine(checkpoint(tmp_path / "llama", model_type="llama"))
    with pytest.raises(ValueError, match=r"model_type 'toy2' is not supported; this engine runs .*'toy'"):
        registry.engine_class(checkpoint(tmp_path / "toy2", model_type="toy2"))


def test_register_refuses_a_served_model_type_and_what_is_no_row(toy: types.ModuleType) -> None:
    with pytest.raises(ValueError, match=r"family: model_type 'toy' is served by Toy"):
        registry.register(registry.Family("Toy again", ("toy",), MODULE, "ToyEngine"))
    with pytest.raises(TypeError, match="family: expected a registry row"):
        registry.register(("Toy", ("toy",), MODULE, "ToyEngine"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model_types: expected a non-empty tuple"):
        registry.Family("Toy", "toy", MODULE, "ToyEngine")  # type: ignore[arg-type]


def test_importing_the_registry_imports_no_family() -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import sys, fi_engine.models.registry as r; print(sorted(sys.modules))"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    loaded = child.stdout
    assert all(f"'fi_engine.models.{m}'" not in loaded for m in ("llama", "gemma2", "gpt_oss", "deepseek"))


# Run in a child process on the copy of the package: the module and the row are all the registry, the served model
# types and the command line need; the family module is imported only once a toy checkpoint is met.
CHILD = """
import json, sys
from fi_engine.models import registry
from fi_engine.cli import build_parser

found = {"types": list(registry.model_types()), "imported": "fi_engine.models.toy" in sys.modules}
cls = registry.engine_class(sys.argv[1])
found["engine"] = f"{cls.__module__}.{cls.__name__}"
found["family"] = type(registry.read_config(sys.argv[1]).family).__name__
found["help"] = "Toy: model_type toy" in " ".join(build_parser()._subparsers._group_actions[0].choices["generate"]
                                                  .format_help().split())
print(json.dumps(found))
"""


def test_one_module_and_one_row_are_all_it_takes(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "fi_engine", copy / "fi_engine", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "fi_engine" / "models" / "toy.py").write_text(example_source(), encoding="utf-8")
    table = copy / "fi_engine" / "models" / "registry.py"
    text = table.read_text(encoding="utf-8")
    end = text.index("\n)\n", text.index("FAMILIES: tuple[Family, ...] = ("))  # the rows' closing parenthesis
    table.write_text(f"{text[:end]}\n    {example_row()},{text[end:]}", encoding="utf-8")  # the guide's step 2
    env = subprocess_env()
    env["PYTHONPATH"] = f"{copy}:{ROOT}"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(checkpoint(tmp_path / "toy"))],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout.strip().splitlines()[-1]) == {
        "types": [*registry.model_types(), "toy"],
        "imported": False,
        "engine": "fi_engine.models.toy.ToyEngine",
        "family": "ToySettings",
        "help": True,
    }


def test_every_path_the_guide_names_exists() -> None:
    # the guide is followed step by step: each file it points to (fi_engine/..., tests/...) and each module of a
    # dotted name it gives (fi_engine.x.y) is where it says, so a moved module fails here, not in a reader's hands
    import importlib

    text = DOC.read_text(encoding="utf-8").replace(example_source(), "")  # (the example's own module: step 1 makes it)
    paths = set(re.findall(r"`((?:fi_engine|tests|docs|tools)/[\w/.<>]+)`", text))
    made = {"fi_engine/models/toy.py"}  # the guide's example, which its step 1 writes
    missing = [p for p in sorted(paths - made) if "<" not in p and not (ROOT / p).exists()]
    dotted = set(re.findall(r"`(fi_engine(?:\.\w+)+)`", text))
    short = {
        "registry.": "fi_engine.models.registry.",
        "runtime.": "fi_engine.runtime.",
        "checkpoint.": "fi_engine.checkpoint.",
    }
    for name in re.findall(r"`((?:registry|runtime|checkpoint)(?:\.\w+)+)`", text):
        dotted.add(next(full + name[len(prefix) :] for prefix, full in short.items() if name.startswith(prefix)))
    unknown = []
    for name in sorted(dotted):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                found: Any = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                found = getattr(found, attr, None)
            if found is None:
                unknown.append(name)
            break
    assert len(paths) > 8 and len(dotted) > 4
    assert missing == [] and unknown == [], (missing, unknown)

"""``fi-engine generate`` (``python -m fi_engine generate``, which ``fi-ffi generate`` runs) as a new user meets it on
a machine without a GPU: every bad value and the missing GPU end in one message and exit status 2, never a
traceback, before any GPU is touched (the real CLI in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.checkpoints import without_weights
from helpers.env import subprocess_env
from helpers.hf_configs import LLAMA_SHAPE

from fi_ffi.cuda import system

CONFIG = LLAMA_SHAPE
NO_GPU = pytest.mark.skipif(bool(system.gpus()[0]), reason="needs a machine without a GPU (CI has none)")


def generate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fi_engine", "generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(**env),
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A checkpoint folder whose config.json is valid (no weights: every case here stops before they are read)."""
    return without_weights(tmp_path, CONFIG)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--temperature", "-1", "expected a finite number >= 0"),
        ("--temperature", "nan", "expected a finite number >= 0"),
        ("--temperature", "inf", "expected a finite number >= 0"),
        ("--temperature", "hot", "expected a number >= 0"),
        ("--top-p", "0", r"expected a probability in (0, 1], got 0"),
        ("--top-p", "2", r"expected a probability in (0, 1], got 2"),
        ("--top-p", "nan", "expected a probability in (0, 1]"),
        ("--top-k", "-1", "expected an integer >= 0, got -1"),
        ("--max-new-tokens", "-5", "expected a positive integer below 2**31, got -5"),
        ("--max-batch", "0", "expected a positive integer below 2**31, got 0"),
        ("--seed", "-3", "expected an integer >= 0"),
        ("--device", "-1", "expected a CUDA device ordinal"),
        ("--tp", "0", "expected a positive integer, got 0"),
    ],
)
def test_bad_values_are_usage_errors_before_the_gpu(model: Path, flag: str, value: str, message: str) -> None:
    done = generate("--model", str(model), "--prompt-ids", "1,2,3", f"{flag}={value}")
    assert done.returncode == 2
    assert f"argument {flag}: {message}" in done.stderr
    assert "Traceback" not in done.stderr


@NO_GPU
def test_no_gpu_is_named_with_its_fix(model: Path) -> None:
    done = generate("--model", str(model), "--prompt-ids", "1,2,3")
    assert done.returncode == 2
    assert done.stderr.startswith("fi-engine generate: the engine needs an NVIDIA GPU and its driver")
    assert "fi-ffi doctor" in done.stderr and "Traceback" not in done.stderr
    from fi_ffi.cuda import driver

    if not driver.probe().found:  # no driver at all: said so (fi_ffi.cuda.requirements), not "version insufficient"
        assert "no NVIDIA driver found (libcuda.so.1" in done.stderr and "Install the NVIDIA driver" in done.stderr
    # short lines, `fi-ffi doctor` said once (it was one line of 530 characters that said it twice)
    assert all(len(line) <= 100 for line in done.stderr.splitlines()), done.stderr
    assert done.stderr.count("fi-ffi doctor") == 1, done.stderr


@NO_GPU
def test_the_engine_raises_our_error_without_a_gpu(model: Path) -> None:
    from fi_engine.models.llama import LlamaEngine
    from fi_ffi.errors import UnsupportedDeviceError

    with pytest.raises(UnsupportedDeviceError, match="needs an NVIDIA GPU"):
        LlamaEngine(model)


def test_a_bad_checkpoint_is_named_before_the_gpu(tmp_path: Path) -> None:
    done = generate("--model", str(tmp_path / "nothing"), "--prompt-ids", "1")
    assert done.returncode == 2 and "config.json does not exist" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("prompt", [["--prompt-ids", "1,2"], ["--prompt", "Hi"], ["--chat", "Hi"]])
def test_an_invalid_config_is_named_before_a_missing_tokenizer(tmp_path: Path, prompt: list[str]) -> None:
    # the config says whether the folder is a checkpoint at all: with --prompt the missing tokenizer.json came first
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "model_type": "bogus"}))
    done = generate(str(tmp_path), *prompt)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"fi-engine generate: {tmp_path / 'config.json'}: model_type 'bogus' is not"), (
        done.stderr
    )
    assert "tokenizer.json" not in done.stderr


def test_no_prompt_is_named_before_the_checkpoint_is_read(tmp_path: Path) -> None:
    done = generate(str(tmp_path / "nothing"))
    assert done.returncode == 2
    assert done.stderr == (
        "fi-engine generate: give at least one prompt: --prompt-ids 1,2,3, --prompt TEXT or --chat MESSAGE\n"
    )


def test_an_unknown_option_shows_generates_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from fi_engine.cli import main

    assert main(["generate", "./m", "--prompt-ids", "1", "--bogus-flag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fi-engine generate "), err  # not the top-level usage, which names no option
    assert "fi-engine generate: error: unrecognized arguments: --bogus-flag" in err


def test_the_help_gives_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    # `generate --help` showed no default for --max-new-tokens; each option whose default is a value says it
    import argparse

    from fi_engine.cli import build_parser

    for command in ("generate", "serve"):
        parser = build_parser().parse_args([command, "./m"]).subparser
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in (action.help or ""), (command, action.option_strings, action.help)
    from fi_engine.cli import main

    assert main(["generate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "tokens to generate per prompt (>= 1; default 32)" in help_text


def test_a_checkpoint_without_its_weights_is_named_before_the_gpu(tmp_path: Path) -> None:
    # config.json alone (a download of the small files only): the folder and what it lacks, not the missing GPU
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    done = generate(str(tmp_path), "--prompt-ids", "1,2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == (
        f"fi-engine generate: model: no *.safetensors file in {tmp_path}; pass a Hugging Face checkpoint directory "
        "saved with safetensors (save_pretrained's default)\n"
    )
    # a sharded checkpoint whose index names a shard that is not there (an interrupted download)
    without_weights(tmp_path, CONFIG)
    index = {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    done = generate(str(tmp_path), "--prompt-ids", "1,2")
    assert done.returncode == 2 and "NVIDIA GPU" not in done.stderr
    assert f"model: {tmp_path} lacks 1 of the 2 files its model.safetensors.index.json names " in done.stderr
    assert "(model-00002-of-00002.safetensors); download them" in done.stderr


@NO_GPU
def test_tp_checks_run_once_before_any_rank_starts(model: Path) -> None:
    done = generate("--model", str(model), "--prompt-ids", "1,2", "--tp", "2")
    assert done.returncode == 2
    assert done.stderr.count("fi-engine generate") == 1  # printed once: by the driver, no rank was started
    assert "--tp 2: needs 2 GPUs on this host (one per rank), found 0" in done.stderr
    done = generate("--model", str(model), "--prompt-ids", "1,2", "--tp", "3")  # 3 divides neither 16 nor 4 heads
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "tensor_parallel: 3 does not divide the model's 16 query heads" in done.stderr


@NO_GPU
def test_a_rank_names_itself_in_what_it_reports(model: Path) -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    done = generate("--model", str(model), "--prompt-ids", "1,2", "--tp", "2", **env)
    assert done.returncode == 2
    assert done.stderr.startswith("fi-engine generate [rank 1]: the engine needs an NVIDIA GPU")


def test_the_engines_command_and_its_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fi_engine", "generate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: fi-engine generate")
    assert "fi-engine generate --model ./m --prompt-ids 1,2,3 --tp 2" in done.stdout
    # the whole extra (CuPy, cuBLAS, tokenizers, jinja2), worded as serve --help words its own
    assert "Needs the engine extra: python -m pip install '.[engine]' in the checkout." in " ".join(done.stdout.split())
    done = subprocess.run(
        [sys.executable, "-m", "fi_engine"], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert done.returncode == 2 and "the following arguments are required: COMMAND" in done.stderr
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["fi-engine"] == "fi_engine.cli:main"


@pytest.mark.cpu_only  # two ranks: a machine with one GPU refuses them (fi-ffi launch bounds --nproc by the GPUs)
def test_tp_ranks_start_through_the_binding_launcher(capfd: pytest.CaptureFixture[str]) -> None:
    # what `generate --tp N` does once its checks pass: N ranks of the same command, with the launcher's variables
    from fi_engine import cli

    # one write(2) of one short line per rank: the two ranks share the pipe, and print() may split its line
    code = "import os; os.write(1, f\"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}\\n\".encode())"
    assert cli._launch_ranks(2, [sys.executable, "-c", code]) == 0
    out = capfd.readouterr().out
    assert "rank 0 of 2" in out and "rank 1 of 2" in out
    assert cli._launch_ranks(2, [sys.executable, "-c", "raise SystemExit(3)"]) == 3


# What generate prints, written by a stand-in for the GPU step (the real one needs a GPU): the engine's CLI, its
# parser and its output path are the real ones; only cmd_generate's engine run is replaced by two printed lines.
STAND_IN = """
import sys
from fi_engine import cli

def printed(args):
    print("[0] 1,2,3  (length)")
    print("prefill: 1.0 ms; decode (eager): 2 steps")
    return 0

cli.cmd_generate = printed
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["generate", "--help"],
        ["generate", "--model", "M", "--prompt-ids", "1,2", "--max-new-tokens", "2"],
    ],
    ids=["help", "generate-help", "generate-output"],
)
def test_output_that_cannot_be_written_is_one_line_and_exit_2(args: list[str], model: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    args = [str(model) if a == "M" else a for a in args]
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-c", STAND_IN, *args], stdout=full, stderr=subprocess.PIPE, text=True,
            env=subprocess_env(), timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    command = "fi-engine generate" if args[-1] != "--help" else "fi-engine"
    assert done.stderr.splitlines() == [
        f"{command}: cannot write the output to stdout: No space left on device; send it to a file or device with "
        "room (is the disk full?)"
    ], done.stderr


def test_the_stand_in_prints_when_stdout_has_room(model: Path) -> None:  # the case above could fail
    args = ["generate", "--model", str(model), "--prompt-ids", "1,2", "--max-new-tokens", "2"]
    done = subprocess.run(
        [sys.executable, "-c", STAND_IN, *args], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("[0] 1,2,3"), done.stderr


def test_a_text_prompt_needs_the_checkpoints_tokenizer_and_says_so(model: Path) -> None:
    """--prompt / --chat read tokenizer.json before the GPU: a checkpoint without one is named in one line."""
    for flag in ("--prompt", "--chat"):
        done = generate("--model", str(model), flag, "hello")
        assert done.returncode == 2, done.stderr
        assert "tokenizer.json" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give at least one prompt: --prompt-ids 1,2,3, --prompt TEXT or --chat MESSAGE"),
        (("--prompt", "  "), "--prompt: expected a non-empty text"),
        (("--chat", ""), "--chat: expected a non-empty text"),
    ],
)
def test_a_missing_or_empty_prompt_is_one_line(model: Path, args: tuple[str, ...], message: str) -> None:
    done = generate("--model", str(model), *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


@NO_GPU
def test_text_prompts_are_encoded_before_the_engine_needs_the_gpu(tmp_path: Path) -> None:
    """With a real tokenizer and chat template the text prompts encode, and the run goes on to the engine, which
    then names the missing GPU (the same line as for token ids)."""
    from helpers.text_checkpoints import write_text_checkpoint

    root = without_weights(write_text_checkpoint(tmp_path / "m"), CONFIG)
    done = generate("--model", str(root), "--prompt", "hello world", "--chat", "What is a GPU?")
    assert done.returncode == 2
    assert done.stderr.startswith("fi-engine generate: the engine needs an NVIDIA GPU"), done.stderr


# ---- one CLI shape for both commands: MODEL_DIR or --model (as vLLM's `vllm serve MODEL` and `--model`) -------


def engine_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fi_engine", *args], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_both_commands_take_model_dir_or_dash_dash_model(model: Path, command: str) -> None:
    extra = ["--prompt-ids", "1,2"] if command == "generate" else []
    # serve reads the tokenizer first (this checkpoint has none), generate stops at the GPU: either way the
    # checkpoint given was read, whichever spelling named it
    reached = "tokenizer.json does not exist" if command == "serve" else "needs an NVIDIA GPU"
    for spelling in ([str(model)], ["--model", str(model)], [str(model), "--model", str(model)]):
        done = engine_cli(command, *spelling, *extra)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "unrecognized arguments" not in done.stderr and "usage:" not in done.stderr, done.stderr
        if command == "serve" or not system.gpus()[0]:
            assert reached in done.stderr, (spelling, done.stderr)
    done = engine_cli(command, str(model), "--model", "/elsewhere", *extra)
    assert done.returncode == 2 and "usage:" in done.stderr
    assert f"MODEL_DIR '{model}' and --model '/elsewhere' name different checkpoints" in done.stderr
    done = engine_cli(command, *extra)
    assert done.returncode == 2
    assert "the checkpoint is missing: give MODEL_DIR (e.g. ./SmolLM2-135M-Instruct) or --model DIR" in done.stderr


def test_fi_engine_version_is_printed_as_fi_ffi_prints_its_own() -> None:
    import fi_ffi

    done = engine_cli("--version")
    assert done.returncode == 0 and done.stdout == f"fi-engine {fi_ffi.__version__}\n", done.stdout + done.stderr


# ---- every value checked against the checkpoint's config.json before the GPU --------------------------------

SMALL = {**CONFIG, "vocab_size": 64, "max_position_embeddings": 256}


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A checkpoint whose config.json has a vocabulary of 64 tokens and 256 positions (no weights)."""
    return without_weights(tmp_path, SMALL)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "99999"], "--prompt-ids: token id 99999 is outside the checkpoint's vocabulary"),
        (["--prompt-ids", "1,-1"], "--prompt-ids: token id -1 is outside the checkpoint's vocabulary"),
        (["--prompt-ids", "1", "--eos-ids", "-5"], "--eos-ids: token id -5 is outside"),
        (["--prompt-ids", "1", "--eos-ids", "99999999999"], "--eos-ids: token id 99999999999 is outside"),
        (["--prompt-ids", "1,2", "--max-new-tokens", "300"], "--max-new-tokens 300: the longest prompt (2 tokens)"),
        (["--prompt-ids", ",".join(["1"] * 256)], "a prompt of 256 tokens leaves no room for a new token"),
        (["--prompt-ids", "1", "--top-k", str(10**20)], f"--top-k {10**20}: expected 0 (every token) up to"),
        (["--prompt-ids", "1", "--top-k", "65"], "--top-k 65: expected 0 (every token) up to the vocabulary size 64"),
    ],
)
def test_values_the_config_bounds_are_refused_before_the_gpu(small: Path, args: list[str], message: str) -> None:
    # --device 99 too: the value checks come before any question to the GPU (or its absence)
    done = generate(str(small), *args, "--device", "99")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"fi-engine generate: {message}"), done.stderr
    assert "NVIDIA GPU" not in done.stderr
    if "token id" in message:
        assert "(vocab_size 64 in config.json); use ids from 0 to 63" in done.stderr
    if "--max-new-tokens" in message:
        assert "max_seq_len 256 (max_position_embeddings 256 in config.json" in done.stderr
        assert "use --max-new-tokens 254 or less" in done.stderr


@pytest.mark.parametrize("value", [str(2**31), str(10**20)])
@pytest.mark.parametrize("flag", ["--max-new-tokens", "--max-batch"])
def test_sizes_beyond_int32_are_usage_errors_showing_the_value(small: Path, flag: str, value: str) -> None:
    done = generate(str(small), "--prompt-ids", "1", flag, value)
    assert done.returncode == 2
    assert f"argument {flag}: expected a positive integer below 2**31, got {value}" in done.stderr
    assert "bits" not in done.stderr


def test_a_device_ordinal_beyond_the_gpus_present_is_named() -> None:
    from fi_engine.cli import device_problem

    assert device_problem(1, 2) == "" and device_problem(0, 1) == ""
    assert device_problem(99, 2) == "--device 99: this host has 2 GPUs (ordinals 0 to 1); use one of them " + (
        "(`nvidia-smi` lists them)"
    )
    assert device_problem(1, 1).startswith("--device 1: this host has 1 GPU (ordinals 0 to 0)")
    assert device_problem(5, 0) == ""  # no GPU at all: the engine's "needs an NVIDIA GPU" and its fix say why


@NO_GPU
def test_valid_values_reach_the_gpu_check(small: Path) -> None:
    done = generate(str(small), "--prompt-ids", "0,63", "--eos-ids", "63", "--max-new-tokens", "254", "--top-k", "64")
    assert done.returncode == 2 and "needs an NVIDIA GPU" in done.stderr, done.stderr

"""``fi-engine serve`` on a machine without a GPU: what a CPU can check (the tokenizer, the chat template, the
values, the server's packages) is checked first, and every failure,
the missing GPU included, is one line and exit status 2 (the real CLI in a subprocess)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.checkpoints import without_weights
from helpers.env import subprocess_env
from helpers.text_checkpoints import write_text_checkpoint

from fi_ffi.cuda import system

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

CONFIG = {
    "model_type": "llama",
    "vocab_size": 330,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
}
NO_GPU = pytest.mark.skipif(bool(system.gpus()[0]), reason="needs a machine without a GPU (CI has none)")


def engine_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fi_engine", *args], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder with a config, a tokenizer and a chat template (no weights: every case stops first)."""
    return without_weights(write_text_checkpoint(tmp_path_factory.mktemp("serve") / "m"), CONFIG)


def test_serve_needs_the_checkpoints_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    done = engine_cli("serve", str(tmp_path))
    assert done.returncode == 2 and "tokenizer.json" in done.stderr and "Traceback" not in done.stderr


def test_serve_refuses_an_unknown_option_with_its_own_usage() -> None:
    # `fi-engine serve DIR --bogus-flag` printed the top-level usage, which names none of serve's options
    done = engine_cli("serve", "./m", "--bogus-flag")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("usage: fi-engine serve "), done.stderr
    assert "--max-batch MAX_BATCH" in done.stderr
    assert done.stderr.endswith("fi-engine serve: error: unrecognized arguments: --bogus-flag\n"), done.stderr


@NO_GPU
def test_serve_checks_the_text_side_then_stops_at_the_missing_gpu(model: Path) -> None:
    done = engine_cli("serve", str(model), "--port", "0", "--max-batch", "4")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("fi-engine serve: the engine needs an NVIDIA GPU")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--port", "70000", "expected a TCP port in [0, 65535], got 70000"),
        ("--port", "http", "expected a TCP port"),
        ("--max-batch", "0", "expected a positive integer below 2**31, got 0"),
        ("--max-queue", "-1", "expected an integer >= 0, got -1"),
        ("--grace", "-2", "expected a finite number of seconds >= 0"),
        ("--grace", "nan", "expected a finite number of seconds >= 0"),
        ("--log-level", "loud", "invalid choice"),
        ("--api-servers", "0", "expected an integer in [1, 64], got 0"),
        ("--api-servers", "65", "expected an integer in [1, 64], got 65"),
        ("--scheduler-delay-factor", "-1", "expected a number in [0, 100], got -1"),
        ("--scheduler-delay-factor", "nan", "expected a number in [0, 100], got nan"),
        ("--scheduler-delay-factor", "soon", "expected a number in [0, 100], got 'soon'"),
        ("--max-num-batched-tokens", "0", "expected a positive integer"),
        ("--speculative-config", "{nope", 'expected a JSON object such as {"method": "ngram", ...}'),
        ("--speculative-config", "[4]", "expected a JSON object, got list"),
        ("--api-key", "two words", "printable ASCII characters without blanks"),
        ("--allowed-origins", '["ok", 5]', "expected a JSON list of origins"),
        ("--allowed-origins", "[nope", "expected a JSON list of origins"),
        ("--max-request-bytes", "100", "expected a number of bytes >= 1024, got 100"),
        ("--max-request-bytes", "32MiB", "expected a number of bytes >= 1024, got '32MiB'"),
        ("--lora-modules", "sql", "expected NAME=PATH (an adapter's name and its PEFT folder), got 'sql'"),
        ("--lora-modules", "a b=/x", "NAME: expected 1 to 128 printable characters without spaces"),
        ("--max-loras", "0", "expected a positive integer, got 0"),
        ("--max-lora-rank", "r16", "expected a positive integer, got 'r16'"),
    ],
)
def test_serve_bad_values_are_usage_errors(model: Path, flag: str, value: str, message: str) -> None:
    done = engine_cli("serve", str(model), f"{flag}={value}")
    assert done.returncode == 2 and f"argument {flag}: " in done.stderr and message in done.stderr


@NO_GPU
@pytest.mark.parametrize("lora", [[], ["--enable-lora", "--lora-modules", "sql=/adapters/sql"]], ids=["base", "lora"])
def test_serve_with_api_servers_stops_at_the_missing_gpu_too(model: Path, lora: list[str]) -> None:
    done = engine_cli("serve", str(model), "--port", "0", "--api-servers", "2", *lora)  # (adapters: every front end)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("fi-engine serve: the engine needs an NVIDIA GPU")


def test_serve_reads_a_bad_api_key_from_the_environment_as_a_usage_error(model: Path) -> None:
    env = subprocess_env() | {"FI_ENGINE_API_KEY": "has space"}
    done = subprocess.run(
        [sys.executable, "-m", "fi_engine", "serve", str(model)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 2 and "argument --api-key: " in done.stderr and "FI_ENGINE_API_KEY" in done.stderr
    assert "has space" not in done.stderr


def test_serve_api_servers_need_the_engine_process(model: Path) -> None:
    done = engine_cli("serve", str(model), "--api-servers", "2", "--in-process")
    assert done.returncode == 2
    assert done.stderr == "fi-engine serve: --api-servers 2 serves one engine process; drop --in-process\n"


def test_serve_help_shows_a_query() -> None:
    done = engine_cli("serve", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: fi-engine serve")
    assert "curl localhost:8000/v1/chat/completions" in done.stdout
    assert "--api-servers N" in done.stdout
    from fi_engine.serve.openai_server import MAX_REQUEST_BYTES

    assert f"(default {MAX_REQUEST_BYTES}: 32 MiB" in " ".join(done.stdout.split())  # the help says the default


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-seq-len", "5000"], "--max-seq-len 5000: the checkpoint's max_position_embeddings is 4096"),
        (["--host", "bad host"], "--host 'bad host': cannot be resolved to an address to listen on"),
        (["--host", "nowhere.invalid"], "--host 'nowhere.invalid': cannot be resolved"),
        (["--served-model-name", ""], "--served-model-name: expected a non-empty name, got ''"),
        (["--served-model-name", "a", "--served-model-name", " "], "--served-model-name: expected a non-empty"),
        (["--max-loras", "2"], "--max-loras: serves LoRA adapters; add --enable-lora"),
        (["--lora-modules", "a=/x"], "--lora-modules: serves LoRA adapters; add --enable-lora"),
        (["--enable-lora", "--max-lora-rank", "1024"], "--max-lora-rank: expected an int in [1, 512], got 1024"),
        (["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "--max-cpu-loras: expected an int in [4, "),
        (["--enable-lora", "--lora-modules", "a=/x", "a=/y"], "--lora-modules[1]: the name 'a' is given twice"),
        (
            ["--enable-lora", "--served-model-name", "m", "--lora-modules", "m=/x"],
            "--lora-modules m=...: 'm' is the base model's served name; rename the adapter",
        ),
    ],
)
def test_serve_values_are_refused_before_the_gpu(model: Path, args: list[str], message: str) -> None:
    done = engine_cli("serve", str(model), "--device", "99", *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"fi-engine serve: {message}"), done.stderr
    assert "NVIDIA GPU" not in done.stderr


def test_serve_sizes_beyond_int32_show_the_value(model: Path) -> None:
    done = engine_cli("serve", str(model), "--max-batch", "1000000000000")
    assert done.returncode == 2
    assert "argument --max-batch: expected a positive integer below 2**31, got 1000000000000" in done.stderr


@NO_GPU
def test_serve_with_adapters_stops_at_the_missing_gpu(model: Path, tmp_path: Path) -> None:
    done = engine_cli("serve", str(model), "--port", "0", "--enable-lora", "--lora-modules", f"sql={tmp_path}",
                      "--max-loras", "2", "--max-lora-rank", "64", "--max-cpu-loras", "4")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("fi-engine serve: the engine needs an NVIDIA GPU"), done.stderr


@NO_GPU
def test_serve_accepts_a_resolvable_host_and_the_full_length(model: Path) -> None:
    done = engine_cli("serve", str(model), "--host", "localhost", "--max-seq-len", "4096", "--port", "0")
    assert done.returncode == 2 and "needs an NVIDIA GPU" in done.stderr, done.stderr


@pytest.mark.parametrize("flags", [[], ["--max-request-bytes", "4096", "--api-key", "k"]], ids=["defaults", "given"])
def test_serve_options_are_what_both_server_forms_take(model: Path, flags: list[str]) -> None:
    """The server options ``serve`` takes from its flags (past the GPU, which CI lacks) bind to one process's
    ``serve`` and to ``serve_api_servers`` alike; the body limit is left to the server's default where no flag
    gives one."""
    from fi_engine import cli
    from fi_engine.serve.api_servers import serve_api_servers
    from fi_engine.serve.openai_server import serve

    args = cli.build_parser().parse_args(["serve", str(model), "--port", "0", *flags])
    options = cli._server_options(args, SimpleNamespace(max_seq_len=4096), "fp8", None)
    inspect.signature(serve).bind(object(), ["m"], **options)
    inspect.signature(serve_api_servers).bind(object(), str(model), ["m"], max_queue=1, ready=None, **options)
    assert (options["port"], options["max_model_len"], options["quantization"]) == (0, 4096, "fp8")
    assert options.get("max_request_bytes") == (4096 if flags else None) and options["lora_modules"] is None

"""``fi-engine serve --api-servers N`` over the tests' stand-in engine, as a process of its own (the tests send it
signals): ``python -m helpers.api_servers_main CONFIG_JSON`` with ``tests/`` on ``PYTHONPATH``.

CONFIG_JSON: ``model_dir`` (a text checkpoint: the front ends' tokenizer), ``api_servers``, ``engine`` (keyword
arguments of :class:`helpers.fake_engine.FakeStepEngine`, ``vocab_size`` among them), ``max_queue``,
``graceful_s``, optionally ``lora_modules`` (the adapters' names; the engine's ``adapters``) and
``allow_runtime_lora_updating``; the API key, where the environment has ``FI_ENGINE_API_KEY`` (as ``fi-engine serve``
reads it).
Prints ``READY port pid,pid,... engine_pid`` on stdout once every front end listens; exit status
0 after a stop, 1 when a front end failed (its message on stderr), as ``fi-engine serve`` does.
"""

from __future__ import annotations

import json
import os
import sys

from fi_engine.serve.api_servers import serve_api_servers
from fi_engine.serve.engine_process import EngineProcess


def main(config: dict) -> int:  # type: ignore[type-arg]
    engine_kw = dict(config["engine"])
    vocab = engine_kw.pop("vocab_size")
    with EngineProcess(
        "helpers.fake_engine:FakeStepEngine", vocab, clients=config["api_servers"], **engine_kw
    ) as engine:

        def ready(port: int, pids: list[int]) -> None:
            print(f"READY {port} {','.join(map(str, pids))} {engine._proc.pid}", flush=True)

        try:
            serve_api_servers(
                engine,
                config["model_dir"],
                "fake-model",
                host="127.0.0.1",
                port=0,
                max_queue=config["max_queue"],
                max_model_len=engine.max_seq_len,
                graceful_s=config["graceful_s"],
                log_level="warning",
                ready=ready,
                api_key=os.environ.get("FI_ENGINE_API_KEY"),
                lora_modules=config.get("lora_modules"),
                allow_runtime_lora_updating=config.get("allow_runtime_lora_updating", False),
            )
        except RuntimeError as exc:
            print(f"api servers: {exc}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))

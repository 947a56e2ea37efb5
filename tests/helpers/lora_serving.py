"""LoRA adapters over the OpenAI-compatible server, for the tests that serve them with one API server
(tests/engine/test_openai_lora.py) and with several (tests/engine/test_api_servers.py): an adapter folder the
stand-in engine accepts, vLLM's load and unload endpoints posted, and the bodies they refuse by field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers.serve import MODEL, WAIT

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


def post(url: str, path: str, body: Any) -> Any:
    """``body`` as JSON posted to ``url + path`` on a connection of its own (several API servers: either answers)."""
    import httpx

    return httpx.post(f"{url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=WAIT)  # fmt: skip


def adapter_folder(path: Path) -> str:
    """A folder the stand-in engine loads as an adapter (it reads nothing but that ``adapter_config.json`` is
    there)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text("{}")
    return str(path)


# the load and unload bodies refused, over a server that serves adapter 'sql' first: (endpoint, body, status, param,
# the message's start); "{folder}" stands for an adapter's folder, "{missing}" for a path that does not exist
REFUSED = [
    ("load", {"lora_name": "sql", "lora_path": "{folder}"}, 400, "lora_name", "lora_name: the adapter 'sql' is loaded"),
    ("load", {"lora_name": MODEL, "lora_path": "{folder}"}, 400, "lora_name", f"lora_name: '{MODEL}' is the base"),
    ("load", {"lora_name": 5, "lora_path": "{folder}"}, 400, "lora_name", "lora_name: expected an adapter's name"),
    ("load", {"lora_name": "a b", "lora_path": "{folder}"}, 400, "lora_name", "lora_name: expected 1 to 128"),
    ("load", {"lora_path": "{folder}"}, 400, "lora_name", "lora_name: expected an adapter's name (a str), got None"),
    ("load", {"lora_name": "x"}, 400, "lora_path", "lora_path: expected the path of a PEFT adapter folder"),
    ("load", {"lora_name": "x", "lora_path": ["a"]}, 400, "lora_path", "lora_path: expected the path"),
    ("load", {"lora_name": "x", "lora_path": "{missing}"}, 400, "lora_path", "adapter_config.json: missing"),
    ("load", ["lora_name"], 400, None, "expected a JSON object with lora_name, got list"),
    ("unload", {"lora_name": "nope"}, 404, "lora_name", "lora_name: no adapter named 'nope' is loaded (loaded: 'sql'"),
    ("unload", {}, 400, "lora_name", "lora_name: expected an adapter's name"),
]


def assert_refused(url: str, tmp_path: Path, endpoint: str, body: Any, status: int, param: Any, start: str) -> None:
    """Post one :data:`REFUSED` case to the server at ``url`` (its folders under ``tmp_path``) and check the answer:
    its status, the field named, the message's start, and no server path in it."""
    folder, missing = adapter_folder(tmp_path / "ok"), str(tmp_path / "gone")
    filled = json.loads(json.dumps(body).replace("{folder}", folder).replace("{missing}", missing))
    done = post(url, LOAD if endpoint == "load" else UNLOAD, filled)
    error = done.json()["error"]
    assert (done.status_code, error["param"]) == (status, param) and error["message"].startswith(start), error
    assert str(tmp_path) not in done.text


def load_at_once(urls: list[str], name: str, folder: str) -> list[Any]:
    """Adapter ``name`` of ``folder`` loaded through each of ``urls`` at the same moment (a thread each, released
    together); the answers, in the order of ``urls``."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    start = threading.Barrier(len(urls))

    def load(url: str) -> Any:
        start.wait(WAIT)
        return post(url, LOAD, {"lora_name": name, "lora_path": folder})

    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(load, urls))


def assert_loaded_once(answers: list[Any], name: str) -> None:
    """Of loads of one name at once (:func:`load_at_once`): one taken, every other refused as a name loaded already
    (by the server, or by the engine where both came before either was loaded), naming ``lora_name``."""
    assert sorted(r.status_code for r in answers) == [200] + [400] * (len(answers) - 1), [r.text for r in answers]
    for refused in (r.json()["error"] for r in answers if r.status_code == 400):
        assert refused["param"] == "lora_name" and f"'{name}' is loaded already" in refused["message"], refused

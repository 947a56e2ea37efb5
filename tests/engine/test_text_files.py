"""Reading a checkpoint's text files: tokenizer.json and its special tokens, generation_config.json's EOS ids and
sampling defaults, clear errors for missing or malformed files, and the optional packages imported on first use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fi_engine.text.generation_config import GenerationDefaults

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_importing_the_engine_and_its_text_modules_imports_neither_tokenizers_nor_jinja2() -> None:
    code = (
        "import sys, fi_engine, fi_engine.text.codec, fi_engine.text.chat, fi_engine.text.tokenizer, "
        "fi_engine.text.detokenize\n"
        "print(sorted(m for m in ('tokenizers', 'jinja2') if m in sys.modules))"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_missing_package_names_the_extra(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    # sys.modules[name] = None is how Python marks a module as not importable
    code = (
        "import sys; sys.modules['tokenizers'] = None; sys.modules['jinja2'] = None\n"
        "from fi_engine.text.tokenizer import Tokenizer\nfrom fi_engine.text.chat import ChatTemplate\n"
        f"for f in (lambda: Tokenizer.from_dir({str(tmp_path)!r}),\n"
        "          lambda: ChatTemplate({'default': 'x'}, 't').render([{'role': 'user', 'content': 'x'}])):\n"
        "    try: f()\n    except ModuleNotFoundError as e: print(e)\n"
    )
    done = run_python(code)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert "reading tokenizer.json needs the 'tokenizers' package" in lines[0]
    assert "rendering a chat template needs the 'jinja2' package" in lines[1]
    assert all("pip install '.[engine]'" in line for line in lines)


def test_generation_config_eos_ids_merge_with_the_tokenizers(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000, "do_sample": True,
                    "temperature": 0.6, "top_p": 0.9})
    )  # fmt: skip
    got = GenerationDefaults.from_dir(tmp_path, tokenizer_eos_ids=[128009, 7])
    assert got.eos_token_ids == (128001, 128008, 128009, 7)
    assert (got.bos_token_id, got.do_sample, got.temperature, got.top_p, got.top_k) == (128000, True, 0.6, 0.9, None)
    assert got.source.endswith("generation_config.json")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 2}')
    assert GenerationDefaults.from_dir(tmp_path, [2]).eos_token_ids == (2,)


def test_without_generation_config_the_model_configs_ids_serve(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"eos_token_id": 5, "temperature": 1.0, "model_type": "llama"}')
    got = GenerationDefaults.from_dir(tmp_path, [9])
    assert got.eos_token_ids == (5, 9) and got.temperature is None and got.source.endswith("config.json")
    (tmp_path / "empty").mkdir()
    assert GenerationDefaults.from_dir(tmp_path / "empty").eos_token_ids == ()  # neither file: nothing set


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"eos_token_id": "2"}, "eos_token_id must be a token id"),
        ({"eos_token_id": [1, -2]}, "eos_token_id must be a token id"),
        ({"eos_token_id": 2**31}, "eos_token_id must be a token id"),
        ({"temperature": -1}, r"temperature must lie in \[0.0, 10000.0\]"),
        ({"temperature": 10**400}, r"temperature must lie in .* got an integer of 1329 bits"),
        ({"top_p": 0}, r"top_p must lie in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must lie in \[0.0, 1.0\]"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"do_sample": "yes"}, "do_sample must be true or false"),
        ({"max_new_tokens": 0}, r"max_new_tokens must lie in \[1, "),
    ],
)
def test_bad_generation_config_values_are_named(tmp_path: Path, fields: dict, message: str) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"model_dir: .*generation_config\.json: " + message):
        GenerationDefaults.from_dir(tmp_path)


def test_malformed_json_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json: not valid JSON .* fix or remove it"):
        GenerationDefaults.from_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"generation_config\.json: holds a JSON list, expected an object"):
        GenerationDefaults.from_dir(tmp_path)
    with pytest.raises(ValueError, match="model_dir: .* is not a directory"):
        GenerationDefaults.from_dir(tmp_path / "absent")
    with pytest.raises(TypeError, match="model_dir: expected a path"):
        GenerationDefaults.from_dir(3)


def test_tokenizer_files(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    from helpers.text_checkpoints import byte_level_tokenizer

    from fi_engine.text.codec import TextCodec
    from fi_engine.text.tokenizer import Tokenizer

    with pytest.raises(ValueError, match=r"model_dir: .*tokenizer\.json does not exist; .*save_pretrained"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a tokenizer the 'tokenizers' library can read"):
        Tokenizer.from_dir(tmp_path)
    byte_level_tokenizer(["<s>", "</s>", "<pad>"]).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "</s>"}, "pad_token": null}')
    (tmp_path / "special_tokens_map.json").write_text('{"bos_token": "<s>", "eos_token": "<pad>"}')
    tok = Tokenizer.from_dir(tmp_path)
    # the config's eos wins; the legacy map fills bos
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, None)
    assert tok.decode(tok.encode("hi 😀")) == "hi 😀"
    assert tok.decode([0, *tok.encode("a"), 1]) == "a"
    assert tok.decode([0, 1], skip_special_tokens=False) == "<s></s>"
    codec = TextCodec.from_dir(tmp_path)
    assert codec.eos_token_ids == (1,) and codec.chat_template is None
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": 5}')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token must be a string, an object"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TypeError, match="text: expected a str, got bytes"):
        tok.encode(b"x")  # type: ignore[arg-type]


def test_the_docs_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # docs/engine-text.md's quick start, on a checkpoint of our own, with "generated" ids standing in for the engine's
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from helpers.text_checkpoints import write_text_checkpoint

    doc = (ROOT / "docs" / "engine-text.md").read_text(encoding="utf-8")
    code = doc[doc.index("```python\n") + 10 : doc.index("```", doc.index("```python\n") + 10)]
    root = write_text_checkpoint(tmp_path / "m")
    assert '"SmolLM2-135M-Instruct"' in code
    code = code.replace('"SmolLM2-135M-Instruct"', repr(str(root)))
    from fi_engine.text.codec import TextCodec

    generated = TextCodec.from_dir(root).encode("Hi 😀 there.\n\nUser: more", add_special_tokens=False)
    exec(compile(code, "docs/engine-text.md", "exec"), {"generated_ids": generated})
    assert capsys.readouterr().out == "Hi 😀 there.\n"  # cut at the stop string, then finish()'s newline


def test_token_pieces_give_each_tokens_text_and_exact_bytes(tmp_path: Path) -> None:
    """A token's text alone (special tokens shown) and its own bytes, which join into the text even where a
    character spans tokens: a byte-level BPE's (its alphabet's characters mapped back to bytes) and a byte-fallback
    vocabulary's (``<0xNN>``)."""
    tokenizers = pytest.importorskip("tokenizers")
    from helpers.text_checkpoints import byte_level_tokenizer

    from fi_engine.text.tokenizer import Tokenizer

    byte_level_tokenizer(["<|im_end|>"]).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    text = "Hé, 😀 x\n\tdone"
    ids = tok.encode(text)
    pieces = [tok.token_piece(i) for i in ids]
    assert b"".join(raw for _, raw in pieces).decode() == text
    assert any(t == "\ufffd" and len(raw) == 1 for t, raw in pieces)  # é and 😀 are split over byte tokens here
    assert all(t == raw.decode() for t, raw in pieces if "\ufffd" not in t)
    assert tok.token_piece(0) == ("<|im_end|>", b"<|im_end|>") and tok.token_piece(ids[0]) is tok.token_piece(ids[0])
    for bad, error, match in [(tok.vocab_size, ValueError, "outside the vocabulary"), (-1, ValueError, "-1"),
                              (True, TypeError, "bool"), (1.0, TypeError, "float")]:  # fmt: skip
        with pytest.raises(error, match=f"^token_id: .*{match}"):
            tok.token_piece(bad)

    fallback = tokenizers.Tokenizer(
        tokenizers.models.BPE({"<0xC3>": 0, "<0xA9>": 1, "a": 2, "▁": 3}, [], byte_fallback=True)
    )
    fallback.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
    root = tmp_path / "fallback"
    root.mkdir()
    fallback.save(str(root / "tokenizer.json"))
    tok = Tokenizer.from_dir(root)
    assert [tok.token_piece(i) for i in (2, 0, 1)] == [("a", b"a"), ("\ufffd", b"\xc3"), ("\ufffd", b"\xa9")]

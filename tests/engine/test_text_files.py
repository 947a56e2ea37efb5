"""Reading a checkpoint's text files: tokenizer.json and its special tokens, generation_config.json's EOS ids and
sampling defaults, clear errors for missing or malformed files, and the optional packages imported on first use."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

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


def longest_pause(call: Any) -> tuple[float, float]:
    """The seconds ``call()`` takes, and the longest pause meanwhile of another thread that ticks every millisecond
    (as long as the call where the call holds the interpreter lock throughout)."""
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.02)
    start = time.perf_counter()
    call()
    end = time.perf_counter()
    stop.set()
    ticker.join()
    moments = [start, *(t for t in ticks if start < t < end), end]
    return end - start, max(b - a for a, b in itertools.pairwise(moments))


def test_encoding_and_decoding_leave_the_interpreter_to_other_threads(tmp_path: Path) -> None:
    """The server tokenizes in worker threads: a long text's encoding must not hold the interpreter lock (the
    ``tokenizers`` library's single-text calls do), or the event loop stalls for as long."""
    pytest.importorskip("tokenizers")
    from helpers.text_checkpoints import byte_level_tokenizer

    from fi_engine.text.tokenizer import Tokenizer

    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    text = "the quick brown fox, 1234 jumps! " * 15_000  # 500 kB: about half a second on one core
    ids = tok.encode(text)
    for call in (lambda: tok.encode(text), lambda: tok.decode(ids)):
        took, pause = longest_pause(call)
        assert took > 0.05 and pause < took / 3, (took, pause)


def test_max_token_bytes_bounds_the_bytes_a_token_stands_for(tmp_path: Path) -> None:
    """Where a tokenizer's parts make it provable, a text of b bytes encodes to at least b / max_token_bytes tokens
    (checked on texts that favour long tokens: runs of one character, and the vocabulary's longest entries); where a
    part may shorten the text or drop characters (NFC, a whitespace splitter, truncation, an added token that
    swallows blanks, a model that maps a long word to one unknown token), there is no bound."""
    pytest.importorskip("tokenizers")
    import random

    from helpers.text_checkpoints import byte_level_tokenizer, sentencepiece_style_tokenizer
    from tokenizers import AddedToken, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from fi_engine.text.tokenizer import Tokenizer

    def wrap(backend: Backend) -> Tokenizer:
        return Tokenizer(backend, {}, {}, tmp_path / "tokenizer.json")

    rng = random.Random(0)
    for backend in (byte_level_tokenizer(["<|im_start|>"]), sentencepiece_style_tokenizer()):
        tok = wrap(backend)
        bound = tok.max_token_bytes
        vocab = list(backend.get_vocab())
        assert bound is not None and bound == max(len(t.encode()) for t in vocab)
        texts = ["a" * 4000, " " * 4000, "\n" * 999, "😀" * 500, "<|im_start|>" * 50, "".join(vocab) * 3]
        texts += ["".join(rng.choice(vocab).replace("Ġ", " ").replace("▁", " ") for _ in range(300)) for _ in range(20)]
        for text in texts:
            assert len(tok.encode(text, add_special_tokens=False)) * bound >= len(text.encode()), text[:40]

    def changed(change: Any) -> int | None:
        backend = byte_level_tokenizer()
        change(backend)
        return wrap(backend).max_token_bytes

    assert changed(lambda b: None) is not None
    assert changed(lambda b: setattr(b, "normalizer", normalizers.NFC())) is None
    assert changed(lambda b: setattr(b, "normalizer", normalizers.Sequence([normalizers.Prepend("▁")]))) is not None
    assert changed(lambda b: setattr(b, "normalizer", normalizers.Replace("ab", "x"))) is None  # shortens
    assert changed(lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.Whitespace())) is None  # drops blanks
    assert changed(lambda b: b.enable_truncation(16)) is None
    assert changed(lambda b: b.add_tokens([AddedToken("<x>", rstrip=True)])) is None
    word_piece = Backend(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert wrap(word_piece).max_token_bytes is None  # a long unknown word is one [UNK]

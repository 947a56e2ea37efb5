"""Incremental detokenization on real byte-level BPE tokenizers (trained here; see helpers.text_checkpoints):
multi-byte characters split across tokens are held back until complete, the deltas add up to the full decode, no
delta holds a U+FFFD the full decode lacks; stop strings spanning tokens end the text and are never emitted."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.text_checkpoints import byte_level_tokenizer, sentencepiece_style_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from fi_engine.text.detokenize import IncrementalDetokenizer, StopStrings
from fi_engine.text.tokenizer import Tokenizer

pytest.importorskip("tokenizers")

SAMPLES = [
    "héllo wörld",
    "emoji 😀 and a family 👨‍👩‍👧 done",
    "世界你好, 日本語テキスト",
    "mixed: naïve café — “quotes” ✓ 🇫🇷 end",
    "😀😀😀",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("bpe")
    byte_level_tokenizer(["<|endoftext|>", "<|im_end|>"]).save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    return Tokenizer.from_dir(root)


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("sentencepiece")
    sentencepiece_style_tokenizer().save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    return Tokenizer.from_dir(root)


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] = (), **kw: object) -> tuple[list[str], str]:  # type: ignore[assignment]
    detok = IncrementalDetokenizer(tok, prompt, **kw)  # type: ignore[arg-type]
    deltas = [detok.push(t) for t in ids]
    return deltas, detok.finish()


@pytest.mark.parametrize("text", SAMPLES)
def test_split_characters_are_held_back_and_the_deltas_add_up(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    # the edge case is real: some token alone decodes to a broken UTF-8 sequence
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas) and tail == ""
    assert "" in deltas  # some token settled nothing: its character was incomplete


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("group", [2, 3, 7])
def test_tokens_pushed_together_give_the_same_text(tokenizer: Tokenizer, text: str, group: int) -> None:
    """push_many (a server's delivery of several steps' tokens at once): the joined text equals one token at a time,
    and no piece holds a broken character."""
    ids = tokenizer.encode(text)
    one, tail = stream(tokenizer, ids)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push_many(ids[i : i + group]) for i in range(0, len(ids), group)]
    assert "".join(pieces) + detok.finish() == "".join(one) + tail == text
    assert all("\ufffd" not in p for p in pieces) and detok.generated == ids
    with pytest.raises(ValueError, match=r"token_ids\[1\]: .* outside the vocabulary"):
        detok.push_many([ids[0], tokenizer.vocab_size])


def test_an_emoji_byte_by_byte_appears_whole_on_its_last_byte(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("😀")  # one token per byte: this tokenizer has no merges for them
    assert len(ids) == 4 and tokenizer.decode(ids[:3]).endswith("\ufffd")
    deltas, tail = stream(tokenizer, ids)
    assert deltas == ["", "", "", "😀"] and tail == ""


def test_a_generation_ending_mid_character_gives_the_full_decode(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 😀")[:-2]  # the emoji's last two bytes never come
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) == "ok " and tail == tokenizer.decode(ids)[3:] and "\ufffd" in tail


def test_the_prompt_gives_context_and_a_character_split_across_it_completes(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("say 😀 now")
    at = next(i for i in range(len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    prompt, generated = ids[:at], ids[at:]  # the prompt ends inside the emoji
    deltas, tail = stream(tokenizer, generated, prompt)
    text = "".join(deltas) + tail
    assert tokenizer.decode(prompt).rstrip("\ufffd") + text == "say 😀 now"
    assert all("\ufffd" not in d for d in deltas)


def test_byte_fallback_tokens_and_the_first_generated_space(byte_fallback: Tokenizer) -> None:
    # SentencePiece-style: "<0xF0>" byte tokens, and a decoder that strips the text's first space, so a token
    # decoded alone loses the space it has after the prompt
    ids = byte_fallback.encode("hello 😀 world 世界")
    assert byte_fallback.decode(ids) == "hello 😀 world 世界"
    prompt, generated = ids[:1], ids[1:]
    expected = " 😀 world 世界"
    assert "".join(byte_fallback.decode([t]) for t in generated) != expected  # the edge case is real
    deltas, tail = stream(byte_fallback, generated, prompt)
    assert "".join(deltas) + tail == expected
    assert all("\ufffd" not in d for d in deltas) and "" in deltas
    # with no prompt the text reads as the full decode does (its first space stripped)
    deltas, tail = stream(byte_fallback, ids)
    assert "".join(deltas) + tail == "hello 😀 world 世界"


def test_special_tokens_are_skipped_or_kept(tokenizer: Tokenizer) -> None:
    eos = tokenizer.eos_token_id
    assert eos is not None
    ids = [*tokenizer.encode("done"), eos]
    assert "".join(stream(tokenizer, ids)[0]) == "done"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)[0]) == "done<|im_end|>"


def test_chosen_special_tokens_are_kept_and_the_others_skipped(tokenizer: Tokenizer) -> None:
    """keep_special_tokens (a harmony reply's markers, for its reader): the kept ones stay in the text, every other
    special token is left out, whether the tokens come one by one or together; unknown texts are ignored."""
    eos, pad = tokenizer.eos_token_id, tokenizer.token_id("<|endoftext|>")
    assert eos is not None and pad is not None and tokenizer.special_ids() == {eos, pad}
    ids = [*tokenizer.encode("héllo"), eos, *tokenizer.encode(" 😀"), pad]
    keep = ["<|im_end|>", "<|not a token|>"]
    deltas, tail = stream(tokenizer, ids, keep_special_tokens=keep)
    assert "".join(deltas) + tail == "héllo<|im_end|> 😀"
    together = IncrementalDetokenizer(tokenizer, keep_special_tokens=keep)
    assert together.push_many(ids) + together.finish() == "héllo<|im_end|> 😀"
    assert "".join(stream(tokenizer, ids, keep_special_tokens=["<|endoftext|>"])[0]) == "héllo 😀<|endoftext|>"
    # with skip_special_tokens false every special token stays, kept or not
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False, keep_special_tokens=keep)[0]) == tokenizer.decode(
        ids, skip_special_tokens=False
    )


def test_bad_kept_special_tokens_are_named(tokenizer: Tokenizer) -> None:
    with pytest.raises(TypeError, match="keep_special_tokens: expected a list of token texts, got str"):
        IncrementalDetokenizer(tokenizer, keep_special_tokens="<|im_end|>")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"keep_special_tokens\[1\]: expected a str, got int"):
        IncrementalDetokenizer(tokenizer, keep_special_tokens=["<|im_end|>", 5])  # type: ignore[list-item]

    class Plain:  # decodes, but cannot say which tokens are special
        vocab_size = tokenizer.vocab_size

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return tokenizer.decode(ids, skip_special_tokens)

    with pytest.raises(TypeError, match=r"tokenizer: keeping special tokens needs .*special_ids\(\)\), got Plain"):
        IncrementalDetokenizer(Plain(), keep_special_tokens=["<|im_end|>"])
    assert IncrementalDetokenizer(Plain(), keep_special_tokens=[]).push(40) == tokenizer.decode([40])


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40))
def test_any_text_streams_back_exactly(tokenizer: Tokenizer, text: str) -> None:
    assert_streams_back(tokenizer, text)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40))
def test_any_text_streams_back_exactly_through_byte_fallback(byte_fallback: Tokenizer, text: str) -> None:
    assert_streams_back(byte_fallback, text)


def assert_streams_back(tokenizer: Tokenizer, text: str) -> None:
    """``text``'s tokens streamed give back its decoding exactly, and no delta shows a replacement character the
    whole decoding lacks (a character split over tokens is held back, not emitted broken)."""
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == full
    assert all("\ufffd" not in d or "\ufffd" in full for d in deltas)


def test_a_stop_string_spanning_tokens_ends_the_text_unemitted(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The answer is 42.\n\nUser: more")
    detok = IncrementalDetokenizer(tokenizer, stop=["\n\nUser:"])
    out = []
    for t in ids:
        out.append(detok.push(t))
        if detok.stopped:
            break
    assert "".join(out) + detok.finish() == "The answer is 42."
    assert detok.stopped == "\n\nUser:"
    assert detok.push(ids[-1]) == ""  # nothing after the stop


@pytest.mark.parametrize("pushed", ["one by one", "together"])
def test_min_tokens_hold_back_the_stop_strings(tokenizer: Tokenizer, pushed: str) -> None:
    """A stop string in the text of the first ``min_tokens`` tokens does not stop it (vLLM's rule); one that
    later tokens write does."""
    first, rest = tokenizer.encode("ab END cd"), tokenizer.encode(" ef END gh")
    for least, want in [(0, "ab "), (len(first), "ab END cd ef ")]:
        detok = IncrementalDetokenizer(tokenizer, stop=["END"], min_tokens=least)
        if pushed == "together":
            text = detok.push_many(first) + detok.push_many(rest)
        else:
            text = "".join(detok.push(t) for t in [*first, *rest] if not detok.stopped)
        assert text + detok.finish() == want and detok.stopped == "END"
    with pytest.raises(ValueError, match=r"^min_tokens: expected an int in \[0, \d+\], got -1"):
        IncrementalDetokenizer(tokenizer, min_tokens=-1)


def test_text_that_might_start_a_stop_string_waits_then_is_released(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    deltas = [detok.push(t) for t in tokenizer.encode("a STO")]
    assert "".join(deltas) == "a "  # "STO" may still become "STOP"
    assert detok.finish() == "STO" and detok.stopped is None


def test_stop_strings_rules() -> None:
    stops = StopStrings(["bc", "abcd"])
    assert stops.feed("za") == "z"  # "a" may start "abcd"
    assert stops.feed("bcd") == "" and stops.stopped == "abcd"  # it starts before "bc" does
    assert stops.feed("more") == "" and stops.finish() == ""
    earliest = StopStrings(["cd", "bcde"])
    assert earliest.feed("abcdef") == "a" and earliest.stopped == "bcde"
    same_start = StopStrings(["ab", "abc"])
    assert same_start.feed("xabc") == "x" and same_start.stopped == "abc"  # at one position the longer one wins
    assert StopStrings([]).feed("anything") == "anything"
    assert StopStrings("end").stops == ("end",)
    with pytest.raises(ValueError, match=r"stop\[1\]: an empty stop string"):
        StopStrings(["a", ""])
    with pytest.raises(TypeError, match=r"stop\[0\]: expected a str, got int"):
        StopStrings([3])  # type: ignore[list-item]


def test_bad_token_ids_are_named(tokenizer: Tokenizer, tmp_path: Path) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    with pytest.raises(ValueError, match=r"token_id: 100000 is outside the vocabulary \[0, "):
        detok.push(100000)
    with pytest.raises(TypeError, match="token_id: expected an int, got str"):
        detok.push("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]: token id -1 is outside"):
        IncrementalDetokenizer(tokenizer, [1, -1])
    with pytest.raises(TypeError, match=r"ids: expected a sequence of token ids"):
        tokenizer.decode("abc")  # type: ignore[arg-type]

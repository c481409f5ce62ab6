"""Incremental detokenization with the default model's tokenizer, and stop-string search."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from conserve.model.tokenizer import Tokenizer
from conserve.sampling.detokenizer import IncrementalDetokenizer, find_stop

PROMPT = "The river town woke slowly."
ASCII_TEXT = " Fishermen pulled their boats onto the gravel; the baker's 42 loaves were warm."
MULTIBYTE_TEXT = " Café naïve 😀 日本語のテキスト 🎉 中文字符 ✓ Ünïcödé 🚀🚀 done."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from conserve.model.loader import resolve_model

    return Tokenizer.load(resolve_model("default"))


def stream(
    tok: Tokenizer, prompt_ids: Sequence[int], output_ids: Sequence[int], step: int = 1
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed the generated tokens `step` at a time, as the engine does; return the deltas."""
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.update(output_ids[:n]) for n in range(step, len(output_ids) + step, step)]
    return detok, deltas


def test_one_token_at_a_time_reproduces_decode(tok: Tokenizer) -> None:
    prompt = tok.encode(PROMPT)
    out = tok.encode(ASCII_TEXT, add_special_tokens=False)
    assert len(out) > 10
    detok, deltas = stream(tok, prompt, out)
    assert "".join(deltas) == detok.text == tok.decode(out) == ASCII_TEXT
    assert deltas[0] == tok.decode(out[:1])  # the first token keeps its leading space
    assert deltas[0].startswith(" ")
    assert detok.num_consumed == len(out)


def test_split_multibyte_characters_are_held_back_until_complete(tok: Tokenizer) -> None:
    prompt = tok.encode(PROMPT)
    out = tok.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    # precondition: some tokens carry only part of a character's UTF-8 bytes
    assert any("\ufffd" in tok.decode([t]) for t in out)
    detok, deltas = stream(tok, prompt, out)
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # something was held back
    assert "".join(deltas) == detok.text == MULTIBYTE_TEXT


def test_every_prefix_of_the_stream_is_valid_text(tok: Tokenizer) -> None:
    out = tok.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT))
    held_back = 0
    for n in range(1, len(out) + 1):
        detok.update(out[:n])
        full = tok.decode(out[:n])
        assert "\ufffd" not in detok.text
        if full.endswith("\ufffd"):  # a character is incomplete: only text before it is out
            held_back += 1
            assert full.rstrip("\ufffd").startswith(detok.text)
        else:  # complete text: the stream has caught up exactly
            assert detok.text == full
    assert held_back > 0


@pytest.mark.parametrize("step", [2, 3, 7])
def test_several_tokens_per_update_give_the_same_text(tok: Tokenizer, step: int) -> None:
    out = tok.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    detok, deltas = stream(tok, tok.encode(PROMPT), out, step)
    assert all("\ufffd" not in d for d in deltas)
    assert detok.text == MULTIBYTE_TEXT


@pytest.mark.parametrize("prompt_text", ["Sushi und 日本語のテキスト", "Grüße 🚀🚀", "Café 😀🎉🎉"])
def test_prompt_context_starting_inside_a_character(tok: Tokenizer, prompt_text: str) -> None:
    prompt = tok.encode(prompt_text)
    # precondition: the few prompt tokens used as context begin inside a character
    assert tok.decode(prompt[-5:]).startswith("\ufffd")
    out = tok.encode(" 日本語 ok", add_special_tokens=False)
    detok, deltas = stream(tok, prompt, out)
    assert all("\ufffd" not in d for d in deltas)
    assert detok.text == " 日本語 ok"


def test_special_tokens_are_skipped_or_kept(tok: Tokenizer) -> None:
    eos = min(tok.eos_token_ids)
    out = tok.encode(" Hello there", add_special_tokens=False) + [eos]
    skipped, _ = stream(tok, tok.encode(PROMPT), out)
    assert skipped.text == " Hello there"
    kept = IncrementalDetokenizer(tok, tok.encode(PROMPT), skip_special_tokens=False)
    for n in range(1, len(out) + 1):
        kept.update(out[:n])
    assert kept.text == " Hello there" + tok.decode([eos], skip_special_tokens=False)
    assert kept.text.endswith("<|im_end|>")


def test_update_without_new_tokens_returns_nothing(tok: Tokenizer) -> None:
    out = tok.encode(" abc def", add_special_tokens=False)
    detok, _ = stream(tok, tok.encode(PROMPT), out)
    assert detok.update(out) == ""
    assert detok.text == " abc def"


def test_find_stop_returns_none_when_absent() -> None:
    assert find_stop("hello world", 5, ["STOP", "xyz"]) is None
    assert find_stop("hello world", 5, []) is None
    assert find_stop("hello world", 0, ["world"]) is None


def test_find_stop_in_the_new_text() -> None:
    assert find_stop("hello world", 5, ["world"]) == (6, "world")
    assert find_stop("hello world", 5, ["or"]) == (7, "or")


def test_find_stop_returns_the_earliest_of_several() -> None:
    text = "aa END bb STOP cc"
    assert find_stop(text, len(text), ["STOP", "END"]) == (3, "END")
    assert find_stop(text, len(text), ["bb", "END", "STOP"]) == (3, "END")
    # a longer stop string that starts earlier wins over a shorter one inside it
    assert find_stop("hello world", 11, ["rld", "world"]) == (6, "world")


def test_find_stop_spanning_two_deltas() -> None:
    text = "abc ST"
    assert find_stop(text, 3, ["STOP"]) is None
    text += "OP def"  # the stop string started in the previous delta
    assert find_stop(text, 6, ["STOP"]) == (4, "STOP")


def test_find_stop_ignores_matches_that_ended_before_the_new_text() -> None:
    # the old "STOP" was already handled; only the one ending in the new text counts
    assert find_stop("STOP abc", 3, ["STOP"]) is None
    assert find_stop("STOP abc STOP", 5, ["STOP"]) == (9, "STOP")
    # a match ending exactly at the first new character counts
    assert find_stop("xxSTOP", 1, ["STOP"]) == (2, "STOP")


def test_find_stop_with_multibyte_text() -> None:
    text = "答えは 日本語 です"
    assert find_stop(text, 4, ["です", "日本"]) == (8, "です")
    assert find_stop(text, len(text), ["です", "日本"]) == (4, "日本")

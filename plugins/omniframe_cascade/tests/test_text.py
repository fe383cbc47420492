"""Sentence splitting, clean-up and chunk text for the TTS stages (pure Python)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from omniframe_cascade.text import (
    SentenceSplitter,
    clean_for_speech,
    distribute_text,
    word_error_rate,
)


def feed(splitter: SentenceSplitter, deltas: list[str]) -> list[str]:
    out: list[str] = []
    for d in deltas:
        out.extend(splitter.push(d))
    return out


def test_sentences_come_out_as_soon_as_they_end() -> None:
    sp = SentenceSplitter(max_words=None)
    assert sp.push("The capital of France") == []
    assert sp.push(" is Paris.") == []  # the period might be "Paris.com": wait for a space
    assert sp.push(" It is") == ["The capital of France is Paris. "]
    assert sp.push(" big!\n") == ["It is big!\n"]
    assert sp.flush() == ""


def test_decimals_abbreviations_and_initials_do_not_end_sentences() -> None:
    sp = SentenceSplitter(max_words=None)
    text = "Dr. Smith paid 3.5 dollars, e.g. for J. R. R. Tolkien. Then he left. "
    assert feed(sp, list(text)) == [
        "Dr. Smith paid 3.5 dollars, e.g. for J. R. R. Tolkien. ", "Then he left. "]


def test_word_limit_cuts_long_runs_at_a_comma_or_a_word() -> None:
    sp = SentenceSplitter(max_words=5)
    assert sp.push("one two three, four five six seven") == ["one two three, "]
    assert sp.push(" eight nine ten") == ["four five six seven eight "]
    assert sp.flush() == "nine ten"


def test_a_comma_closes_a_long_enough_clause() -> None:
    sp = SentenceSplitter(max_words=None, comma_words=4)
    assert sp.push("Yes, the capital of France is Paris, a big city") == [
        "Yes, the capital of France is Paris, "]


def test_too_short_sentences_wait_for_more() -> None:
    sp = SentenceSplitter(max_words=None)
    assert sp.push("1. ") == []
    assert sp.push("Go home. ") == ["1. Go home. "]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_words"):
        SentenceSplitter(max_words=0)
    with pytest.raises(ValueError, match="comma_words"):
        SentenceSplitter(comma_words=0)


@given(
    text=st.text(alphabet=st.sampled_from(list("ab .,!?\n3e")), max_size=80),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=10),
    max_words=st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
    comma_words=st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
    first=st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
)
def test_splitting_loses_nothing_and_never_cuts_inside_a_word(
        text: str, cuts: list[int], max_words: int | None, comma_words: int | None,
        first: int | None) -> None:
    points = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    deltas = [text[a:b] for a, b in zip(points, points[1:], strict=False)]
    sp = SentenceSplitter(max_words=max_words, comma_words=comma_words, first_max_words=first)
    pieces = feed(sp, deltas)
    rest = sp.flush()
    assert "".join(pieces) + rest == text
    for i, p in enumerate(pieces):
        assert p and p[-1].isspace()  # every piece ends at whitespace: words stay whole
        limit = first if i == 0 and first is not None else max_words
        if limit is not None:
            # a piece closed by the word limit has at most that many words
            assert len(p.split()) <= limit or any(c in p for c in ".!?;:,\n")


@given(text=st.text(alphabet=st.sampled_from(list("abc  .")), max_size=60),
       weights=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=8))
def test_distribute_text_keeps_all_text_in_order(text: str, weights: list[float]) -> None:
    parts = distribute_text(text, weights)
    assert len(parts) == len(weights)
    assert "".join(parts) == text


def test_distribute_text_is_proportional() -> None:
    parts = distribute_text("one two three four", [1.0, 1.0])
    assert parts == ["one two ", "three four"]
    assert distribute_text("hello", []) == []


def test_clean_for_speech_drops_markdown_and_urls() -> None:
    assert clean_for_speech("**Paris** is `big` & old: https://x.y/z #1") == \
        "Paris is big and old: link 1"


def test_word_error_rate() -> None:
    assert word_error_rate("What is the capital of France?", "what is the capital of france") == 0
    assert word_error_rate("a b c d", "a x c") == 0.5
    assert word_error_rate("", "") == 0.0


def test_the_first_piece_can_be_shorter() -> None:
    sp = SentenceSplitter(max_words=8, first_max_words=3)
    assert sp.push("The sky on a clear day is blue and bright and wide ") == [
        "The sky on ", "a clear day is blue and bright and "]
    sp.reset()
    assert sp.push("one two three four ") == ["one two three "]
    with pytest.raises(ValueError, match="first_max_words"):
        SentenceSplitter(first_max_words=0)

"""Metrics on known inputs: WER of known strings, containment, percentiles, latency
breakdown from synthetic timestamps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from omniframe_eval.scoring import (
    BREAKDOWN,
    basic_normalize,
    contains_answer,
    corpus_wer,
    get_normalizer,
    latency_breakdown,
    percentile,
    summarize,
    word_errors,
)


def test_wer_of_known_strings() -> None:
    # one substitution (two→too), one deletion (four), one insertion (eight) over 7 words
    we = word_errors("one two three four five six seven", "one too three five six seven eight",
                     basic_normalize)
    assert (we.substitutions, we.deletions, we.insertions, we.ref_words) == (1, 1, 1, 7)
    assert we.wer == pytest.approx(3 / 7)
    assert word_errors("hello world", "hello world").wer == 0.0
    assert word_errors("hello world", "").wer == 1.0
    assert word_errors("a b c d", "a b").to_dict() == {"s": 0, "d": 2, "i": 0, "n": 4}


def test_wer_normalizes_case_punctuation_numbers_and_spelling() -> None:
    # Whisper's English normalizer: case, punctuation, numbers, British spellings
    assert word_errors("What is the colour of the sky?", "what is the color of the sky").wer \
        == 0.0
    assert word_errors("There are twenty four hours.", "there are 24 hours").wer == 0.0
    assert word_errors("Mr. Smith isn't here", "mister smith is not here").wer == 0.0


def test_empty_reference() -> None:
    assert word_errors("", "").wer == 0.0
    assert math.isinf(word_errors("", "words here").wer)
    assert word_errors("?!", "").ref_words == 0


def test_corpus_wer_sums_before_dividing() -> None:
    # 1 error in 1 word, 0 errors in 9 words: corpus WER 0.1, not the mean 0.5
    pairs = [("yes", "no"), ("one two three four five six seven eight nine",
                             "one two three four five six seven eight nine")]
    assert corpus_wer(pairs, basic_normalize) == pytest.approx(0.1)
    assert corpus_wer([], basic_normalize) is None


def test_normalizers() -> None:
    assert basic_normalize("Héllo,  WORLD!") == "hello world"
    assert get_normalizer("none")("  a   b ") == "a b"
    with pytest.raises(ValueError, match="unknown text normalizer 'fancy'"):
        get_normalizer("fancy")


def test_contains_answer_whole_words_after_normalization() -> None:
    assert contains_answer("The capital of France is Paris.", ["paris"]) is True
    assert contains_answer("It is Parisian food.", ["paris"]) is False
    assert contains_answer("A spider has 8 legs", ["eight"]) is True
    assert contains_answer("I think it is Leonardo.", ["da Vinci", "Leonardo"]) is True
    assert contains_answer("anything", []) is None
    assert contains_answer("anything", ["", "  "]) is None


def test_latency_breakdown_from_synthetic_timestamps() -> None:
    b = latency_breakdown(speech_end=10.0, vad_end=10.5, transcript=10.7, first_text=11.0,
                          first_audio=11.4)
    assert b["vad_wait"] == pytest.approx(0.5)
    assert b["asr"] == pytest.approx(0.2)
    assert b["first_text"] == pytest.approx(0.3)
    assert b["first_audio"] == pytest.approx(0.4)
    assert b["voice_to_voice"] == pytest.approx(1.4)
    assert b["response"] == pytest.approx(0.9)
    assert b["to_first_text"] == pytest.approx(1.0)
    assert sum(b[k] for k in BREAKDOWN) == pytest.approx(b["voice_to_voice"])


def test_latency_breakdown_end_to_end_model_without_transcript() -> None:
    b = latency_breakdown(speech_end=1.0, vad_end=1.25, transcript=None, first_text=2.0,
                          first_audio=2.5)
    assert b["asr"] is None
    assert b["first_text"] == pytest.approx(0.75)  # from the VAD decision
    assert sum(b[k] or 0.0 for k in BREAKDOWN) == pytest.approx(b["voice_to_voice"])
    # no audio at all: no voice-to-voice
    b = latency_breakdown(speech_end=1.0, vad_end=1.2, transcript=None, first_text=None,
                          first_audio=None)
    assert b["voice_to_voice"] is None and b["first_audio"] is None


def test_percentiles_known_values() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 5.0
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert percentile([], 50) is None
    assert percentile([2.0], 95) == 2.0
    with pytest.raises(ValueError, match="within 0..100"):
        percentile(xs, 101)
    s = summarize([0.5, None, 1.5, float("nan")])
    assert s["n"] == 2 and s["mean"] == 1.0 and s["p50"] == 1.0
    assert summarize([])["p50"] is None


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1,
                max_size=50),
       st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy(xs: list[float], q: float) -> None:
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-9, abs=1e-6)


def test_device_label_names_the_device() -> None:
    from omniframe_eval.device import describe_device, device_label

    info = describe_device("cpu")
    assert info["cpus"] >= 1 and info["cpu"]
    assert device_label(info).endswith("CPU only (cpu)")
    gpu = {**info, "torch_device": "cuda:0", "accelerator": "NVIDIA H100 80GB HBM3"}
    assert device_label(gpu) == f"{info['cpu']}, {info['cpus']} CPUs, NVIDIA H100 80GB HBM3 " \
                                f"(cuda:0)"
    assert "no CUDA device was found" in device_label(
        {**info, "torch_device": "cuda", "accelerator_missing": True})

"""The turn-taking evaluation: scripted pauses, what each end-of-turn method decides, and the
summary's figures."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from omniframe_audio.smart_turn import smart_turn_available
from omniframe_eval.turn_taking import (
    Clip,
    Decision,
    Method,
    Pause,
    main,
    make_clips,
    pause_after,
    run_method,
    summarise,
    summarise_human,
)

from omniframe.resources import Resources

pytestmark = pytest.mark.anyio

Q = "What is the capital of France?"


@given(st.lists(st.sampled_from(["what", "is", "the", "of", "France?", "cat", "blue", "a"]),
                min_size=3, max_size=12))
def test_the_pause_is_inside_the_question(words: list[str]) -> None:
    k = pause_after(words)
    assert 0 <= k < len(words) - 1  # some words before it and after it


def test_the_pause_follows_a_word_that_cannot_end_the_question() -> None:
    words = Q.split()
    assert words[pause_after(words)] in ("the", "of", "is")


@pytest.fixture(scope="module")
def clips() -> list[Clip]:
    return make_clips([Q], voices=["en-us"], pauses_ms=[600], barge_in=True)


def test_scripted_clips_have_the_pause_where_it_was_asked_for(clips) -> None:
    import numpy as np

    plain, paused = [c for c in clips if c.kind == "question"]
    assert (plain.pause_ms, paused.pause_ms) == (0, 600)
    # the paused clip is longer by about the pause, and holds a silent stretch that long
    extra = (paused.speech_end - paused.speech_start) - (plain.speech_end - plain.speech_start)
    assert 0.5 < extra < 0.75
    x = paused.samples
    loud = np.flatnonzero(np.abs(x[int(paused.speech_start * 16000):
                                   int(paused.speech_end * 16000)]) > 0.02)
    assert np.diff(loud).max() / 16000 > 0.55
    assert {c.kind for c in clips} == {"question", "barge_in", "backchannel", "noise"}


async def test_a_short_hangover_cuts_the_pause_and_a_long_one_waits(clips) -> None:
    res = Resources()
    short, long_ = Method("silence-300", {"hangover_ms": 300}), Method(
        "silence-1000", {"hangover_ms": 1000})
    qs = [c for c in clips if c.kind == "question"]
    decisions = [await run_method(m, c, res) for m in (short, long_) for c in clips]
    rows = {r["method"]: r for r in summarise(clips, decisions)}
    assert rows["silence-300"]["false_cutoff_rate"] == 1.0
    assert rows["silence-1000"]["false_cutoff_rate"] == 0.0
    assert rows["silence-300"]["false_cutoff_by_pause_ms"] == {"600": 1.0}
    # latency: the hangover, a little more (Silero's tail, 20 ms frames), never less
    assert 300 <= rows["silence-300"]["eot_latency_ms_p50"] < 500
    assert 1000 <= rows["silence-1000"]["eot_latency_ms_p50"] < 1200
    assert rows["silence-1000"]["questions"] == len(qs)
    assert rows["silence-1000"]["missed_ends"] == 0
    # barge-in: the real interruptions are heard, after about min_speech_ms
    assert rows["silence-300"]["barge_in_missed"] == 0
    assert 50 < rows["silence-300"]["barge_in_latency_ms_p50"] < 400


def test_summary_counts_a_missed_end_and_a_false_barge_in() -> None:
    clips = [Clip("q", "question", Q, "en-us", 600, None, 0.5, 2.0),
             Clip("n", "noise", "noise", "-", 0, None, 0.5, 0.7)]
    decisions = [Decision("q", "m", [2.0], [float("inf")], []),  # only the stream end closed it
                 Decision("n", "m", [], [], [0.64])]
    (row,) = summarise(clips, decisions)
    assert row["missed_ends"] == 1 and row["eot_latency_ms_p50"] is None
    assert row["false_cutoff_rate"] == 0.0 and row["false_barge_in_rate"] == 1.0


def test_cli_refuses_bad_arguments(capsys) -> None:
    for bad in (["--pauses", "x"], ["--pauses", "10"], ["--questions", "0"], ["--voices", ","]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--pauses" in err and "--questions" in err and "--voices" in err


def test_cli_writes_the_report(tmp_path, capsys) -> None:
    out = tmp_path / "tt"
    assert main(["--questions", "1", "--voices", "en-us", "--pauses", "900", "--no-human",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in results["methods"]}
    have_model = smart_turn_available()
    smart = {"smart_turn-high", "smart_turn", "smart_turn-low"}
    assert methods == {"silence-300", "silence-500", "silence-800", "silence-1200"} | (
        smart if have_model else set())
    assert {s["method"] for s in results["meta"]["skipped"]} == (set() if have_model
                                                                 else smart)
    assert "| silence-500 |" in (out / "report.md").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "false_cutoff_rate" in json.loads(last)["methods"]["silence-500"]


def test_human_pauses_are_scored_per_method() -> None:
    """A silence hangover cuts off every pause longer than itself; Smart Turn those it
    calls finished (asked 200 ms in, so never a shorter pause)."""
    pauses = [Pause("r", 1.0, 0.4, "times,", False, 0.1),
              Pause("r", 2.0, 0.9, "wisdom,", False, 0.8),
              Pause("r", 3.0, 0.15, "hope,", False, 0.9),  # too short to be asked
              Pause("r", 4.0, 0.6, "way.", True, 0.95),
              Pause("r", 5.0, 0.3, "me?", True, 0.2)]
    methods = [Method("silence-500", {"hangover_ms": 500}),
               Method("st", {"end_of_turn": "smart_turn", "hangover_ms": 2000})]
    rows = {r["method"]: r for r in summarise_human(pauses, methods)}
    assert rows["silence-500"]["false_cutoff_rate"] == pytest.approx(1 / 3)
    assert rows["silence-500"]["ended_in_pause_rate"] == 0.5
    assert rows["st"]["false_cutoff_rate"] == pytest.approx(1 / 3)
    assert rows["st"]["ended_in_pause_rate"] == 0.5
    assert rows["st"]["mid_sentence_pauses"] == 3 and rows["st"]["finished_sentences"] == 2


def test_smart_turn_methods_are_semantic_vads_eagerness_settings() -> None:
    from omniframe_eval.turn_taking import DEFAULT_METHODS

    from omniframe.serve.protocol import SEMANTIC_EAGERNESS

    by_name = {m.name: m.options for m in DEFAULT_METHODS}
    for name, eagerness in (("smart_turn-high", "high"), ("smart_turn", "auto"),
                            ("smart_turn-low", "low")):
        threshold, wait_ms = SEMANTIC_EAGERNESS[eagerness]
        assert by_name[name]["end_of_turn_threshold"] == threshold
        assert by_name[name]["hangover_ms"] == wait_ms

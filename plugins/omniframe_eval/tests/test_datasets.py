"""The dataset plugins: spoken QA (espeak-ng), LibriSpeech layout, JSONL manifest, HF hub."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omniframe_eval.datasets import (
    DEFAULT_QA_TEXT,
    DatasetError,
    hf_dataset,
    librispeech,
    load_qa_text,
    manifest,
    spoken_qa,
)

from omniframe.plugins import get_registry


def test_datasets_are_registered_plugins() -> None:
    assert {"spoken_qa", "librispeech", "manifest", "hf"} <= set(get_registry().datasets)


def test_the_repository_question_file() -> None:
    qa = load_qa_text(DEFAULT_QA_TEXT)
    assert len(qa) >= 50
    assert all(q.endswith("?") and answers for q, answers in qa)
    assert len({q for q, _ in qa}) == len(qa), "duplicate questions"
    # short reference answers
    assert max(len(a.split()) for _, answers in qa for a in answers) <= 4


def test_spoken_qa_speaks_with_several_voices_and_rates(tmp_path: Path) -> None:
    items = list(itertools.islice(spoken_qa(cache_dir=str(tmp_path)), 4))
    assert [it.id for it in items] == ["qa-001", "qa-002", "qa-003", "qa-004"]
    assert len({it.meta["voice"] for it in items}) == 4
    assert len({it.meta["rate"] for it in items}) == 3
    assert items[0].transcript == "What is the capital of France?"
    assert items[0].answers == ("Paris",)
    x, sr = sf.read(items[0].audio, dtype="float32")
    assert sr == 16000 and 1.0 < len(x) / sr < 5.0 and np.abs(x).max() > 0.05
    # only the items asked for were synthesized (lazy), and a second pass reuses them
    assert len(list(tmp_path.glob("*.wav"))) == 4
    before = Path(items[0].audio).stat().st_mtime_ns
    again = next(iter(spoken_qa(cache_dir=str(tmp_path))))
    assert Path(again.audio).stat().st_mtime_ns == before


def test_spoken_qa_bad_text_file(tmp_path: Path) -> None:
    bad = tmp_path / "qa.txt"
    bad.write_text("What is this? | thing\nno answer here\n")
    with pytest.raises(DatasetError, match=r"qa.txt:2: expected 'question \| answer"):
        list(spoken_qa(text=str(bad), cache_dir=str(tmp_path)))
    with pytest.raises(DatasetError, match="does not exist"):
        list(spoken_qa(text=str(tmp_path / "missing.txt")))


def test_spoken_qa_unknown_voice_is_refused(tmp_path: Path) -> None:
    # espeak-ng itself would quietly speak with its default voice
    with pytest.raises(DatasetError, match="espeak-ng has no voice 'no-such-voice-xx'"):
        list(spoken_qa(voices=["no-such-voice-xx"], cache_dir=str(tmp_path)))
    with pytest.raises(DatasetError, match="no voice 'en-us\\+nosuchvariant'"):
        list(spoken_qa(voices=["en-us+nosuchvariant"], cache_dir=str(tmp_path)))


def _flac(path: Path, seconds: float = 0.5) -> None:
    sf.write(str(path), np.zeros(int(16000 * seconds), np.float32), 16000, format="FLAC")


def test_librispeech_layout(tmp_path: Path) -> None:
    root = tmp_path / "test-clean"
    chap = root / "1089" / "134686"
    chap.mkdir(parents=True)
    (chap / "1089-134686.trans.txt").write_text(
        "1089-134686-0000 HE HOPED THERE WOULD BE STEW FOR DINNER\n"
        "1089-134686-0001 STUFF IT INTO YOU\n")
    _flac(chap / "1089-134686-0000.flac")  # 0001's audio is missing
    items = list(librispeech(str(root)))
    assert [it.id for it in items] == ["1089-134686-0000", "1089-134686-0001"]
    assert items[0].task == "asr" and items[0].problem is None
    assert items[0].transcript == "HE HOPED THERE WOULD BE STEW FOR DINNER"
    assert items[1].problem and "is missing" in items[1].problem
    with pytest.raises(DatasetError, match="is not a folder"):
        list(librispeech(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no \*.trans.txt"):
        list(librispeech(str(tmp_path / "empty")))


def test_manifest_entries_and_bad_lines(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    m.write_text(
        '{"id": "a", "audio": "a.wav", "transcript": "hi", "answers": ["x", "y"]}\n'
        '{"audio": "b.wav", "answer": "z", "speaker": "s1"}\n'
        "not json\n"
        '{"id": "c"}\n'
        '["a list"]\n'
        '{"id": "a", "audio": "d.wav", "task": "translate"}\n')
    items = list(manifest(str(m)))
    assert [it.id for it in items] == ["a", "line-2", "line-3", "c", "line-5", "a@6"]
    a, b, bad_json, no_audio, not_obj, bad_task = items
    assert a.audio == str(tmp_path / "a.wav") and a.answers == ("x", "y") and a.problem is None
    assert b.answers == ("z",) and b.meta == {"speaker": "s1"} and b.transcript is None
    assert "m.jsonl:3 is not valid JSON" in bad_json.problem
    assert "no 'audio' path" in no_audio.problem
    assert "expected a JSON object" in not_obj.problem
    assert "task must be 'qa' or 'asr'" in bad_task.problem
    with pytest.raises(DatasetError, match="does not exist"):
        list(manifest(str(tmp_path / "missing.jsonl")))


def test_hf_dataset_offline_gives_a_clear_message() -> None:
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DatasetError, match="needs the 'datasets' package: pip install "
                                               "datasets"):
            list(hf_dataset("librispeech"))
    else:  # installed but offline here: the hub cannot be reached
        with pytest.raises(DatasetError, match="Are you offline"):
            list(hf_dataset("librispeech"))


def test_hf_dataset_maps_voiceassistant_fields(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The field mapping and audio caching, with a stand-in for the `datasets` library
    (the hub cannot be reached here)."""
    import types

    calls: list[tuple] = []
    rows = [
        {"index": 7, "question": "what is two plus two", "answer": "four",
         "question_audio": {"array": np.zeros(1600, np.float32), "sampling_rate": 16000}},
        {"index": 8, "question": "no audio here", "answer": "x", "question_audio": None},
    ]

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets",
                        types.SimpleNamespace(load_dataset=load_dataset))
    items = list(hf_dataset("voiceassistant", cache_dir=str(tmp_path)))
    assert calls == [("gpt-omni/VoiceAssistant-400K", None, "train", True)]
    good, bad = items
    assert (good.id, good.transcript, good.answers, good.task) == (
        "7", "what is two plus two", ("four",), "qa")
    assert sf.info(good.audio).frames == 1600 and good.problem is None
    assert "no decoded audio in field 'question_audio'" in bad.problem

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'openslr/librispeech_asr' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DatasetError, match=r"could not load 'openslr/librispeech_asr'.*"
                                           r"Are you offline\?.*'librispeech' dataset"):
        list(hf_dataset("librispeech"))


def test_spoken_qa_covers_every_voice_and_rate_pair(tmp_path: Path) -> None:
    qa = tmp_path / "qa.txt"
    qa.write_text("".join(f"Question number {n}? | {n}\n" for n in range(15)))
    for voices, rates in ((["en-us", "en-gb", "en-us+f3"], [150, 200]),
                          (["en-us", "en-gb"], [150, 200])):
        items = list(itertools.islice(spoken_qa(text=str(qa), voices=voices, rates=rates,
                                                cache_dir=str(tmp_path / "a")),
                                      len(voices) * len(rates)))
        pairs = {(it.meta["voice"], it.meta["rate"]) for it in items}
        assert len(pairs) == len(voices) * len(rates)

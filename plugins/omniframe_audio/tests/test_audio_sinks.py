"""Sinks: incremental WAV (also when killed), pacing and barge-in truncation, text, null,
speaker errors; the plugin's registration and a config-built pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import numpy as np
import pytest
import soundfile as sf
from omniframe_audio.devices import AudioDeviceError
from omniframe_audio.sinks import (
    NullSink,
    PlaybackStoppedFrame,
    SpeakerSink,
    TextSink,
    WavSink,
    heard_prefix,
)
from omniframe_audio.wavfile import WavWriter

from omniframe.audio import AudioError, resample
from omniframe.frames import (
    EndOfStreamFrame,
    EndOfTurnFrame,
    ErrorFrame,
    Frame,
    InterruptFrame,
    OutputAudioFrame,
    SpeechStartFrame,
    TextDeltaFrame,
    TranscriptFrame,
)
from omniframe.pipeline import Pipeline, StageError
from omniframe.session import Session
from omniframe.stage import Stage, StageContext
from omniframe.testing import make_stage, run_frames, run_stage, tone

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[3]


def chunk(seconds: float, turn: int = 1, rate: int = 24000, text: str | None = None,
          freq: float = 300.0) -> OutputAudioFrame:
    return OutputAudioFrame(samples=tone(seconds, freq, rate), sample_rate=rate, turn=turn,
                            text=text)


class Script(Stage):
    """A test source: yields frames, sleeping where the script has a number."""

    kind = "source"
    name = "script"
    produces = (Frame,)

    def __init__(self, steps: list[Frame | float], session: Session) -> None:
        super().__init__({}, StageContext(name="script", session=session))
        self.steps = steps

    async def generate(self) -> AsyncIterator[Frame]:
        for step in self.steps:
            if isinstance(step, float):
                await anyio.sleep(step)
            else:
                yield step


async def play(steps: list[Frame | float], *sinks: Stage, timeout: float = 20.0):
    session = sinks[0].context.session
    with anyio.fail_after(timeout):
        return await Pipeline([Script(steps, session), *sinks]).run()


# ------------------------------------------------------------------------ wav writer


def test_wav_writer_round_trip_and_truncate(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "w.wav"
    x = tone(0.5, 440, 16000)
    with WavWriter(path, 16000) as w:
        w.write(x[:3000])
        assert sf.info(str(path)).frames == 3000  # readable between writes
        w.write(x[3000:])
        w.write(np.full(10, 3.0, np.float32))  # clipped, not wrapped
        w.truncate(len(x) + 5)
    y, rate = sf.read(str(path), dtype="float32")
    assert rate == 16000 and len(y) == len(x) + 5
    assert np.abs(y[:len(x)] - x).max() < 1.0 / 32767 + 1e-6
    assert np.allclose(y[len(x):], 1.0, atol=1e-4)
    with pytest.raises(AudioError, match="is a folder"):
        WavWriter(tmp_path, 16000)


def test_wav_is_valid_when_the_writer_is_killed(tmp_path: Path) -> None:
    """Run the wav sink in a subprocess, SIGKILL it mid-run, read the file."""
    out = tmp_path / "killed.wav"
    script = textwrap.dedent(f"""
        import anyio, sys
        from omniframe.frames import OutputAudioFrame
        from omniframe.testing import make_stage, run_frames, tone
        from omniframe_audio.sinks import WavSink

        frames = [OutputAudioFrame(samples=tone(0.02, 200 + i, 16000), sample_rate=16000,
                                   turn=1) for i in range(100000)]

        async def main():
            sink = make_stage(WavSink, path={str(out)!r})
            await run_frames([sink], frames, interval=0.002, timeout=600)

        anyio.run(main)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if out.exists() and out.stat().st_size > 44 + 20 * 640:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
        else:
            pytest.fail("the subprocess wrote nothing")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    data, rate = sf.read(str(out), dtype="float32")
    assert rate == 16000 and len(data) >= 20 * 320
    assert len(data) % 320 == 0  # whole chunks only
    assert os.path.getsize(out) >= 44 + 2 * len(data)


# --------------------------------------------------------------------------- wav sink


async def test_wav_sink_writes_chunks_and_passes_them_on(tmp_path: Path) -> None:
    frames = [chunk(0.1, text="a"), chunk(0.1, text="b"), EndOfTurnFrame(turn=1)]
    sink = make_stage(WavSink, path=tmp_path / "a.wav")
    out = await run_stage(sink, frames)
    assert [type(f).__name__ for f in out] == ["OutputAudioFrame", "OutputAudioFrame",
                                               "EndOfTurnFrame"]
    y, rate = sf.read(str(tmp_path / "a.wav"), dtype="float32")
    assert rate == 24000
    ref = np.concatenate([frames[0].samples, frames[1].samples])
    assert np.abs(y - ref).max() < 1e-4


async def test_wav_sink_resamples_and_separates_turns(tmp_path: Path) -> None:
    a = [chunk(0.1, turn=1, freq=300), chunk(0.1, turn=1, freq=300)]
    b = [chunk(0.2, turn=2, rate=16000)]  # another rate: resampled to the file's
    sink = make_stage(WavSink, path=tmp_path / "b.wav", sample_rate=8000, gap_s=0.25)
    await run_stage(sink, [*a, EndOfTurnFrame(turn=1), *b, EndOfTurnFrame(turn=2)])
    y, rate = sf.read(str(tmp_path / "b.wav"), dtype="float32")
    assert rate == 8000 and len(y) == 1600 + 2000 + 1600
    assert not y[1600:3600].any()  # the gap
    ref = resample(np.concatenate([f.samples for f in a]), 24000, 8000)
    assert np.abs(y[:1600] - ref).max() < 2e-3  # no clicks at chunk edges


async def test_wav_sink_needs_a_path(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"set options.path or pass --output"):
        await run_stage(make_stage(WavSink), [chunk(0.1)])
    with pytest.raises(StageError, match="is a folder"):
        await run_stage(make_stage(WavSink, path=tmp_path), [chunk(0.1)])


async def test_wav_sink_without_audio_leaves_a_valid_empty_file(tmp_path: Path) -> None:
    await run_stage(make_stage(WavSink, path=tmp_path / "e.wav"), [TextDeltaFrame(text="x")])
    assert sf.info(str(tmp_path / "e.wav")).frames == 0


async def test_realtime_wav_sink_plays_at_speech_speed(tmp_path: Path) -> None:
    sink = make_stage(WavSink, path=tmp_path / "r.wav", realtime=True)
    t0 = time.monotonic()
    result = await play([chunk(0.1), chunk(0.1), chunk(0.1), EndOfTurnFrame(turn=1)], sink)
    assert time.monotonic() - t0 >= 0.29
    # metrics count the first chunk as heard when it starts playing, not after it
    assert result.turns[0].first_audio_ts - t0 < 0.09


async def test_barge_in_cuts_playback_and_records_what_was_heard(tmp_path: Path) -> None:
    session = Session()
    session.add("assistant", "one two three four five six", turn=1)
    sink = make_stage(WavSink, path=tmp_path / "cut.wav", realtime=True, session=session)
    steps: list[Frame | float] = [
        chunk(0.2, text="one two "), chunk(0.2, text="three four "), chunk(0.2, text="five six"),
        0.3,  # the user speaks while the second chunk plays
        SpeechStartFrame(turn=2), InterruptFrame(turn=2),
    ]
    t0 = time.monotonic()
    result = await play(steps, sink)
    assert time.monotonic() - t0 < 0.55  # the third chunk was never played
    msg = session.last("assistant", 1)
    assert msg is not None and msg.interrupted
    assert msg.heard is not None and msg.heard.startswith("one two")
    assert "five" not in msg.heard and msg.effective_text == msg.heard
    y, rate = sf.read(str(tmp_path / "cut.wav"), dtype="float32")
    assert 0.2 <= len(y) / rate < 0.45  # the file holds what was played
    played = [f for f in result.frames if isinstance(f, OutputAudioFrame)]
    assert len(played) == 2
    # the turn reports what was played, not the 0.6 s the answer had
    stopped = [f for f in result.frames if isinstance(f, PlaybackStoppedFrame)]
    assert len(stopped) == 1 and stopped[0].turn == 1
    assert stopped[0].played_s == pytest.approx(len(y) / rate, abs=1e-3)
    turn = result.turns[0]
    assert turn.audio_out_s == pytest.approx(len(y) / rate, abs=1e-3)
    assert turn.audio_produced_s == pytest.approx(0.6, abs=1e-3)
    assert f"audio out {turn.audio_out_s:.2f}s of 0.60s" in turn.line()


async def test_no_truncation_when_the_answer_was_heard_whole(tmp_path: Path) -> None:
    session = Session()
    session.add("assistant", "hi", turn=1)
    sink = make_stage(WavSink, path=tmp_path / "w.wav", realtime=True, session=session)
    await play([chunk(0.05, text="hi"), EndOfTurnFrame(turn=1), 0.15, InterruptFrame(turn=2)],
               sink)
    msg = session.last("assistant", 1)
    assert msg is not None and not msg.interrupted and msg.heard is None


async def test_without_realtime_everything_written_was_heard(tmp_path: Path) -> None:
    session = Session()
    session.add("assistant", "one two three", turn=1)
    sink = make_stage(WavSink, path=tmp_path / "n.wav", session=session)
    await play([chunk(0.05, text="one "), chunk(0.05, text="two"), 0.1, InterruptFrame(turn=2)],
               sink)
    msg = session.last("assistant", 1)
    assert msg is not None and msg.interrupted and msg.heard == "one two"


async def test_audio_out_counts_what_the_sink_wrote_before_a_barge_in(tmp_path: Path) -> None:
    """Without realtime the sink writes chunks as they come: after an interrupt, chunks of
    the old turn still queued upstream are dropped, and audio out is what was written."""
    sink = make_stage(WavSink, path=tmp_path / "q.wav")
    result = await play([chunk(0.1, text="a"), chunk(0.1, text="b"), 0.05,
                         InterruptFrame(turn=2), chunk(0.3, text="late")], sink)
    y, rate = sf.read(str(tmp_path / "q.wav"), dtype="float32")
    turn = result.turns[0]
    assert len(y) / rate == pytest.approx(0.2, abs=1e-3)
    assert turn.audio_out_s == pytest.approx(0.2, abs=1e-3)
    assert turn.audio_produced_s == pytest.approx(0.5, abs=1e-3)


async def test_audio_out_is_all_the_audio_when_nothing_was_cut(tmp_path: Path) -> None:
    sink = make_stage(WavSink, path=tmp_path / "all.wav")
    result = await play([chunk(0.1), chunk(0.2), EndOfTurnFrame(turn=1)], sink)
    turn = result.turns[0]
    assert turn.audio_out_s == pytest.approx(0.3) == turn.audio_produced_s
    assert not any(isinstance(f, PlaybackStoppedFrame) for f in result.frames)
    assert "audio out 0.30s," in turn.line()


def test_heard_prefix() -> None:
    assert heard_prefix("three four five", 0.7) == "three four"
    assert heard_prefix(" and so", 0.5) == " and"
    assert heard_prefix("word", 0.9) == ""
    assert heard_prefix("word", 1.0) == "word"


# --------------------------------------------------------------------------- text sink


def conversation() -> list[Frame]:
    return [
        SpeechStartFrame(turn=1, pts=0.5),
        TranscriptFrame(turn=1, text="what time", final=False),
        TranscriptFrame(turn=1, text=" what time is it?"),
        TextDeltaFrame(turn=1, text=" It is"),
        TextDeltaFrame(turn=1, text=" noon."),
        EndOfTurnFrame(turn=1, text="It is noon."),
        TranscriptFrame(turn=2, text="thanks"),
        TextDeltaFrame(turn=2, text="You're"),
        EndOfTurnFrame(turn=2, reason="max_tokens"),
    ]


async def test_text_sink_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    out = await run_stage(make_stage(TextSink), conversation())
    assert len(out) == len(conversation())  # passed on
    assert capsys.readouterr().out == (
        "user: what time is it?\nagent: It is noon.\nuser: thanks\nagent: You're [max_tokens]\n"
    )


@pytest.mark.parametrize("pause", [0.05, None])
async def test_text_sink_marks_interruptions(capsys: pytest.CaptureFixture[str],
                                             pause: float | None) -> None:
    steps: list[Frame | float] = [TextDeltaFrame(turn=1, text="Let me"), 0.05,
                                  InterruptFrame(turn=2), TranscriptFrame(turn=2, text="stop")]
    if pause is not None:  # else the transcript may overtake the interrupt: same output
        steps.insert(3, pause)
    await play(steps, make_stage(TextSink))
    assert capsys.readouterr().out == "agent: Let me [interrupted]\nuser: stop\n"


async def test_text_sink_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    sink = make_stage(TextSink, path=path)
    await play([*conversation()[:6], 0.02, InterruptFrame(turn=2)], sink)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events == ["speech_start", "transcript", "text_delta", "text_delta", "end_of_turn",
                      "interrupt"]
    assert all(isinstance(r["ts"], float) and r["turn"] in (1, 2) for r in records)
    assert records[1] == {**records[1], "text": " what time is it?", "final": True}
    assert records[4]["reason"] == "completed" and records[4]["text"] == "It is noon."
    ts = [r["ts"] for r in records]
    assert ts == sorted(ts)


async def test_text_sink_formats_errors(tmp_path: Path, capsys) -> None:
    """ErrorFrames are urgent; the sink formats them when they are handed to it."""
    err = ErrorFrame(turn=1, stage="lm", message="out of memory; lower max_tokens")
    sink = make_stage(TextSink)
    await sink.setup()
    async for _ in sink.process(err):
        pass
    assert capsys.readouterr().out == "error in lm: out of memory; lower max_tokens\n"
    jsonl = make_stage(TextSink, path=tmp_path / "e.jsonl")
    await jsonl.setup()
    async for _ in jsonl.process(err):
        pass
    await jsonl.teardown()
    rec = json.loads((tmp_path / "e.jsonl").read_text())
    assert rec["event"] == "error" and rec["stage"] == "lm" and "max_tokens" in rec["message"]


async def test_text_sink_bad_path(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="is a folder"):
        await run_stage(make_stage(TextSink, path=tmp_path), conversation())
    with pytest.raises(Exception, match="Input should be 'auto', 'text' or 'jsonl'"):
        make_stage(TextSink, format="xml")


# ----------------------------------------------------------------- null and speaker


async def test_null_sink_keeps_nothing_and_passes_everything() -> None:
    frames = [*conversation(), chunk(0.05)]
    out = await run_stage(make_stage(NullSink), frames)
    assert [id(f) for f in out] == [id(f) for f in frames]


async def test_speaker_without_device_says_what_to_do() -> None:
    try:
        await run_stage(make_stage(SpeakerSink), [chunk(0.05)])
    except StageError as err:
        cause = err.cause
    else:
        return  # a machine with speakers played it
    assert isinstance(cause, AudioDeviceError)
    assert ("PortAudio" in str(cause) and "libportaudio2" in str(cause)) \
        or "no audio output device" in str(cause) or "sounddevice" in str(cause)
    assert "wav sink" in str(cause) or "plugin: wav" in str(cause)


# ------------------------------------------------------------ plugin and config


def test_registered_stage_names() -> None:
    from omniframe.plugins import get_registry

    reg = get_registry()
    mine = sorted(k for k, plugin in reg.stage_plugin.items() if plugin == "omniframe_audio")
    assert mine == [("sink", "null"), ("sink", "speaker"), ("sink", "text"), ("sink", "wav"),
                    ("source", "file"), ("source", "mic"), ("source", "synth"),
                    ("source", "text"), ("vad", "energy"), ("vad", "silero"), ("vad", "webrtc")]
    assert reg.stage("source", "file").input_option == "path"
    assert reg.stage("sink", "wav").output_suffixes == (".wav",)


def test_modules_do_not_import_torch() -> None:
    code = ("import sys, omniframe_audio.plugin, omniframe_audio.sources, omniframe_audio.vad, "
            "omniframe_audio.sinks; assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


async def test_config_file_vad_jsonl(tmp_path: Path) -> None:
    from omniframe.config import build_pipeline, parse_config
    from omniframe.testing import speech_like

    wav = tmp_path / "in.wav"
    sf.write(str(wav), speech_like([("silence", 0.3), ("speech", 0.6), ("silence", 0.8),
                                    ("speech", 0.5)], sample_rate=22050), 22050)
    cfg = parse_config({"pipeline": [
        {"kind": "source", "plugin": "file", "options": {"path": str(wav), "tail_silence_s": 0.6}},
        {"kind": "vad", "plugin": "energy", "options": {"hangover_ms": 300}},
        {"kind": "sink", "plugin": "text", "options": {"path": str(tmp_path / "e.jsonl")}},
        {"kind": "sink", "plugin": "null", "name": "end"},
    ]})
    with anyio.fail_after(20):
        result = await build_pipeline(cfg).run()
    events = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [(e["event"], e["turn"]) for e in events if e["event"] != "interrupt"] == [
        ("speech_start", 1), ("speech_end", 1), ("speech_start", 2), ("speech_end", 2)]
    assert [t.turn for t in result.turns] == [1, 2]
    assert result.turns[0].vad_wait_s is not None
    assert abs(result.input_audio_s - 2.8) < 0.01
    assert isinstance(result.frames[-1], EndOfStreamFrame)


async def test_run_frames_smoke_with_two_sinks(tmp_path: Path) -> None:
    """A wav sink then a text sink: both see what they need."""
    frames = [TextDeltaFrame(turn=1, text="hi"), chunk(0.05, text="hi"), EndOfTurnFrame(turn=1)]
    result = await run_frames([make_stage(WavSink, name="wav", path=tmp_path / "x.wav"),
                               make_stage(TextSink, name="text",
                                          path=tmp_path / "x.jsonl")], frames)
    assert sf.info(str(tmp_path / "x.wav")).frames == 1200
    assert "text_delta" in (tmp_path / "x.jsonl").read_text()
    assert result.turns[0].first_audio_ts is not None


async def test_text_sink_prints_an_interrupted_answer_once(capsys) -> None:
    from omniframe_audio.sinks import TextSink

    from omniframe.frames import EndOfTurnFrame, InterruptFrame, TextDeltaFrame
    from omniframe.testing import make_stage, run_frames

    frames = [TextDeltaFrame(text="The capital", turn=1), InterruptFrame(turn=2),
              EndOfTurnFrame(turn=1, reason="interrupted", text="The capital")]
    await run_frames([make_stage(TextSink)], frames)
    out = capsys.readouterr().out
    assert out.count("The capital") == 1
    assert "[interrupted]" in out

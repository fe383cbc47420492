"""Metrics as frames: one collector, a MetricsFrame per turn to stages and observers, the
observers: config key and the register_observers hook."""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from omniframe import hookimpl
from omniframe.config import ConfigError, build_pipeline, parse_config
from omniframe.frames import (
    EndOfTurnFrame,
    Frame,
    MetricsFrame,
    OutputAudioFrame,
    SpeechEndFrame,
    TextDeltaFrame,
)
from omniframe.metrics import RunResult
from omniframe.plugins import register_plugin, unregister_plugin
from omniframe.stage import Stage
from omniframe.testing import make_stage, run_frames

DEMO = Path(__file__).resolve().parents[1] / "omniframe" / "configs" / "demo.yaml"


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Frame]] = []
        self.ended: list[RunResult] = []

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
        self.seen.append((stage, frame))

    def on_run_end(self, result: RunResult) -> None:
        self.ended.append(result)


class Speaker(Stage):
    """Makes answer audio from text (a codec)."""

    kind = "codec"
    name = "speaker"
    consumes = (TextDeltaFrame,)
    produces = (OutputAudioFrame,)
    forward_consumed = True

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        yield OutputAudioFrame(samples=np.zeros(2400, np.float32), sample_rate=24000)


class SlowSink(Stage):
    """Plays audio 50 ms late, and keeps the MetricsFrames it is given."""

    kind = "sink"
    name = "slow"
    consumes = (OutputAudioFrame,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics: list[MetricsFrame] = []

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        await anyio.sleep(0.05)
        return
        yield  # pragma: no cover

    def on_metrics(self, frame: MetricsFrame) -> None:
        self.metrics.append(frame)


def answer(turn: int) -> list[Frame]:
    return [SpeechEndFrame(turn=turn, speech_end_ts=0.0), TextDeltaFrame(text="hi", turn=turn),
            TextDeltaFrame(text=" there", turn=turn), EndOfTurnFrame(turn=turn)]


@pytest.mark.anyio
async def test_one_metrics_frame_per_turn_after_its_end_left_the_last_stage() -> None:
    sink, rec = make_stage(SlowSink), Recorder()
    result = await run_frames([make_stage(Speaker), sink], [*answer(1), *answer(2)],
                              observers=[rec])
    metrics = [(s, f) for s, f in rec.seen if isinstance(f, MetricsFrame)]
    assert [f.turn for _, f in metrics] == [1, 2] and {s for s, _ in metrics} == {"pipeline"}
    for stage, m in metrics:  # after the turn's end of turn left the sink, before the next
        i = rec.seen.index((stage, m))
        ends = [j for j, (s, f) in enumerate(rec.seen)
                if s == "sink" and isinstance(f, EndOfTurnFrame) and f.turn == m.turn]
        assert ends and ends[0] < i
    assert [m.turn for m in sink.metrics] == [1, 2]  # stages get it through on_metrics
    m = sink.metrics[0]
    assert m.text == "hi there" and m.end_reason == "completed"
    # first audio is stamped twice: out of the codec, and out of the sink 50 ms later
    assert m.first_audio_codec_s is not None and m.first_audio_sink_s is not None
    assert m.first_audio_sink_s - m.first_audio_codec_s >= 0.045
    assert m.voice_to_voice_s == m.first_audio_sink_s
    busy = dict(m.stage_busy_s)
    assert list(busy) == ["source", "codec", "sink"] and busy["sink"] >= 0.09  # 2 chunks
    assert m.summary()["stage_busy_s"]["sink"] == round(busy["sink"], 4)
    assert result.turns[0].first_audio_codec_s == m.first_audio_codec_s
    assert rec.ended == [result]  # on_run_end, once, with the run's result


@pytest.mark.anyio
async def test_a_turn_that_never_ends_gets_its_metrics_when_the_run_ends() -> None:
    rec = Recorder()
    await run_frames([make_stage(Speaker)], [TextDeltaFrame(text="cut", turn=1)],
                     observers=[rec])
    (m,) = [f for _, f in rec.seen if isinstance(f, MetricsFrame)]
    assert m.turn == 1 and m.end_reason is None and m.text == "cut"


@pytest.mark.anyio
async def test_a_failing_on_metrics_does_not_stop_the_run() -> None:
    class Broken(SlowSink):
        def on_metrics(self, frame: MetricsFrame) -> None:
            raise RuntimeError("bug")

    result = await run_frames([make_stage(Speaker), make_stage(Broken)], answer(1))
    assert result.turns[0].text == "hi there"


def test_the_cli_runs_one_collector(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from omniframe import metrics
    from omniframe.cli import cli

    made: list[object] = []
    init = metrics.MetricsCollector.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(metrics.MetricsCollector, "__init__", counting)
    res = CliRunner().invoke(cli, ["run", "-o", str(tmp_path / "a.wav")])
    assert res.exit_code == 0, res.output
    assert len(made) == 1
    assert "turn 1: voice-to-voice" in res.stderr and "turn 2: voice-to-voice" in res.stderr


def demo_with_observers(observers: object) -> dict[str, Any]:
    data = yaml.safe_load(DEMO.read_text())
    data["observers"] = observers
    return data


def test_latency_csv_observer_from_config(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "latency.csv"
    data = demo_with_observers([{"plugin": "latency-csv", "options": {"path": str(out)}}])
    data["pipeline"][-1]["options"]["path"] = str(tmp_path / "a.wav")
    pipeline = build_pipeline(parse_config(data))
    assert not out.exists()  # built, not run: no file yet
    result = anyio.run(pipeline.run)
    rows = list(csv.DictReader(out.open()))
    assert [r["turn"] for r in rows] == ["1", "2"] == [str(t.turn) for t in result.turns]
    assert float(rows[0]["voice_to_voice_ms"]) >= float(rows[0]["first_audio_codec_ms"]) > 0
    assert {"busy_ms.lm", "busy_ms.codec", "busy_ms.sink"} <= set(rows[0])


def test_observer_config_errors_name_the_yaml_path() -> None:
    with pytest.raises(ConfigError) as info:
        build_pipeline(parse_config(demo_with_observers(
            ["latency-cvs", {"plugin": "latency-csv", "options": {"pth": "x.csv"}}])))
    problems = dict(info.value.problems)
    assert "no observer named 'latency-cvs'. Did you mean 'latency-csv'?" in problems[
        "observers[0].plugin"]
    assert "unknown key 'pth'; did you mean 'path'?" in problems["observers[1].options.pth"]
    with pytest.raises(ConfigError, match="observers"):
        parse_config(demo_with_observers([{"options": {}}]))


def test_a_plugin_registers_an_observer(tmp_path: Path) -> None:
    class Count:
        turns: list[int] = []

        def __init__(self, every: int = 1) -> None:
            self.every = every

        def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
            if isinstance(frame, MetricsFrame):
                Count.turns.append(frame.turn)

    register_plugin(SimpleNamespace(register_observers=hookimpl(
        lambda register: register("count", Count))), "counter")
    try:
        data = demo_with_observers([{"plugin": "count", "options": {"every": 2}}])
        data["pipeline"][-1]["options"]["path"] = str(tmp_path / "a.wav")
        pipeline = build_pipeline(parse_config(data))
        assert [o.every for o in pipeline.observers if isinstance(o, Count)] == [2]
        anyio.run(pipeline.run)
        assert Count.turns == [1, 2]
        with pytest.raises(ConfigError, match="TypeError"):  # no Options model: keywords
            build_pipeline(parse_config(demo_with_observers([{"plugin": "count",
                                                             "options": {"x": 1}}])))
    finally:
        unregister_plugin("counter")


def test_metrics_frame_summary_matches_turn_summary() -> None:
    from omniframe.metrics import TurnMetrics

    t = TurnMetrics(turn=3, speech_end_ts=1.0, vad_end_ts=1.2, first_audio_ts=1.5,
                    first_audio_codec_ts=1.4, end_ts=2.0, audio_produced_s=1.0,
                    audio_out_s=1.0, text="x", stage_busy_s={"lm": 0.25})
    assert t.to_frame().summary() == t.summary()
    assert "voice-to-voice 500ms" in t.line()

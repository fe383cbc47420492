"""Mini-Omni with a preemptive VAD (``tentative_ms``): the same answer, token for token and
sample for sample, as without preemption, for a question that ends normally and for one with
a mid-sentence pause; the retracted turn leaves no engine request, task or message behind."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from omniframe_audio.vad import EnergyVAD

from omniframe.frames import (
    EndOfTurnFrame,
    Frame,
    OutputAudioFrame,
    TextDeltaFrame,
)
from omniframe.resources import Resources
from omniframe.session import Session
from omniframe.stage import Stage, StageContext
from omniframe.testing import audio_frames, run_frames, speech_like

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("_one_thread")]

torch = pytest.importorskip("torch")
pytest.importorskip("whisper")
pytest.importorskip("snac")

from omniframe_mini_omni.lm_stage import MiniOmniLM  # noqa: E402
from omniframe_mini_omni.snac_stage import SnacCodec  # noqa: E402
from omniframe_mini_omni.whisper_stage import WhisperEncoderStage  # noqa: E402

SR = 16000
PLAIN = [("silence", 0.4), ("speech", 1.0), ("silence", 0.9)]
PAUSED = [("silence", 0.4), ("speech", 0.8), ("silence", 0.3), ("speech", 0.5),
          ("silence", 0.9)]


class Probe(Stage):
    kind = "sink"
    name = "probe"
    consumes = (Frame,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Frame] = []
        self.early = 0

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if frame.turn and self.context.session.is_tentative(frame.turn):
            self.early += 1
        self.seen.append(frame)
        return
        yield  # pragma: no cover


@pytest.fixture(scope="module")
def resources() -> Resources:
    return Resources()


async def _run(resources: Resources, pattern, tentative_ms: float | None, trace,
               engine: bool = True, interval: float = 0.0):
    session = Session()

    def ctx(name: str) -> StageContext:
        return StageContext(name=name, session=session, resources=resources)

    stages = [
        EnergyVAD({"hangover_ms": 500, "min_speech_ms": 60, "interrupt": False,
                   "tentative_ms": tentative_ms}, ctx("vad")),
        WhisperEncoderStage({"model": "random://test-768", "trim": True}, ctx("encoder")),
        MiniOmniLM({"model": "random://tiny", "max_new_tokens": 14, "engine": engine,
                    "trace": str(trace)}, ctx("lm")),
        SnacCodec({"model": "random://snac_24khz", "deterministic": True}, ctx("codec")),
        Probe({}, ctx("sink")),
    ]
    frames = audio_frames(speech_like(pattern, seed=3), SR, 20.0, live=False)
    result = await run_frames(stages, frames, interval=interval, timeout=120)
    return result, stages, session


def _answer(probe: Probe) -> list[tuple]:
    out = []
    for f in probe.seen:
        if isinstance(f, TextDeltaFrame):
            out.append(("text", f.text))
        elif isinstance(f, OutputAudioFrame):
            out.append(("audio", np.asarray(f.samples).tobytes()))
        elif isinstance(f, EndOfTurnFrame):
            out.append(("end", f.reason, f.text))
    return out


def _tokens(trace) -> list[tuple]:
    return [(tuple(x["audio"]), x["text"]) for x in map(json.loads, trace.read_text().splitlines())]


@pytest.mark.parametrize("pattern", [PLAIN, PAUSED], ids=["plain", "mid-sentence-pause"])
@pytest.mark.parametrize("engine", [True, False], ids=["engine", "solo"])
async def test_same_answer_with_and_without_preemption(resources, tmp_path, pattern, engine):
    _, off_stages, off_session = await _run(resources, pattern, None, tmp_path / "off.jsonl",
                                            engine)
    # paced, so that the tentative turn's work is in flight when speech resumes
    on, stages, on_session = await _run(resources, pattern, 150, tmp_path / "on.jsonl", engine,
                                        interval=0.01)
    probe_on = stages[-1]
    assert _answer(probe_on) and probe_on.early == 0
    assert _answer(probe_on) == _answer(off_stages[-1])
    # the trace of the answered turn: the same tokens as without preemption
    on_turns = [x for x in map(json.loads, (tmp_path / "on.jsonl").read_text().splitlines())]
    answered = max(x["turn"] for x in on_turns)
    assert [(tuple(x["audio"]), x["text"]) for x in on_turns if x["turn"] == answered] == \
        _tokens(tmp_path / "off.jsonl")
    assert [(m.role, m.text) for m in on_session.messages] == \
        [(m.role, m.text) for m in off_session.messages]
    if pattern is PAUSED:
        assert [r["turn"] for r in on.retracted] == [1] and [t.turn for t in on.turns] == [2]
    lm = stages[2]
    if engine:
        eng = lm.lm.engine("cpu")
        assert eng.active == 0 and eng.queued == 0  # the retracted request was released
    assert not lm.lm.lock.locked()

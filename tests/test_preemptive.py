"""Preemptive end of speech (the VADs' ``tentative_ms``): the answer starts during the
hangover, is held at the last stage until the end is confirmed, and is dropped without a
trace when the user goes on speaking. What the sink gets is, in every case, what it gets
without preemption."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from omniframe_audio.vad import EnergyVAD, SileroVAD, WebRTCVAD
from omniframe_echo.stages import EchoCodec, EchoLM
from pydantic import ValidationError

from omniframe.frames import (
    EndConfirmedFrame,
    EndRetractedFrame,
    Frame,
    SpeechEndFrame,
    SpeechStartFrame,
    SystemFrame,
    UserTurnFrame,
)
from omniframe.session import Session
from omniframe.stage import Stage
from omniframe.testing import audio_frames, make_stage, run_frames, speech_like

pytestmark = pytest.mark.anyio

SR = 16000
# a question that ends normally, and one with a 300 ms pause in the middle
PLAIN = [("silence", 0.5), ("speech", 1.2), ("silence", 1.0)]
PAUSED = [("silence", 0.5), ("speech", 1.0), ("silence", 0.3), ("speech", 0.6),
          ("silence", 1.0)]
VAD = {"hangover_ms": 500, "post_roll_ms": 100, "min_speech_ms": 60, "interrupt": False}


class Probe(Stage):
    """A sink that records what reaches it, and whether its turn was still tentative."""

    kind = "sink"
    name = "probe"
    consumes = (Frame,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Frame] = []
        self.early: list[Frame] = []  # processed while the turn was tentative: a bug

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if frame.turn and self.context.session.is_tentative(frame.turn):
            self.early.append(frame)
        self.seen.append(frame)
        return
        yield  # pragma: no cover

    async def retract(self, frame: EndRetractedFrame) -> AsyncIterator[Frame]:
        self.seen.append(frame)
        return
        yield  # pragma: no cover


def _key(f: Frame) -> tuple:
    """A frame without its turn number and creation time."""
    samples = getattr(f, "samples", None)
    return (type(f).__name__, getattr(f, "text", None), getattr(f, "pts", None),
            getattr(f, "tentative", None), getattr(f, "reason", None),
            None if samples is None else np.asarray(samples).tobytes())


class Emitted:
    """An observer: every frame each stage emitted."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, Frame]] = []

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
        self.frames.append((stage, frame))

    def of(self, stage: str, cls: type) -> list[Any]:
        return [f for s, f in self.frames if s == stage and isinstance(f, cls)]


async def _run(pattern, tentative_ms: float | None, vad_cls=EnergyVAD, **vad_options):
    session = Session()
    emitted = Emitted()
    vad = make_stage(vad_cls, session=session, tentative_ms=tentative_ms,
                     **{**VAD, **vad_options})
    lm = make_stage(EchoLM, session=session)
    codec = make_stage(EchoCodec, session=session)
    probe = make_stage(Probe, session=session)
    result = await run_frames([vad, lm, codec, probe],
                              audio_frames(speech_like(pattern), SR, 20.0, live=False),
                              timeout=30, observers=[emitted])
    probe.emitted = emitted  # type: ignore[attr-defined]
    return result, vad, probe, session


def _sunk(probe: Probe) -> list[tuple]:
    return [_key(f) for f in probe.seen if not isinstance(f, SystemFrame)]


async def test_the_vad_sends_a_tentative_end_then_confirms_it() -> None:
    session = Session()
    vad = make_stage(EnergyVAD, session=session, tentative_ms=150, **VAD)
    frames = (await run_frames([vad], audio_frames(speech_like(PLAIN), SR, 20.0))).frames
    kinds = [type(f).__name__ for f in frames if type(f).__name__ != "AudioFrame"]
    assert kinds[:4] == ["SpeechStartFrame", "SpeechEndFrame", "UserTurnFrame",
                         "EndConfirmedFrame"], kinds
    end = next(f for f in frames if isinstance(f, SpeechEndFrame))
    assert end.tentative and abs(end.pts - 1.7) < 0.03
    assert vad.tentatives == 1 and vad.retractions == 0
    assert not session.is_tentative(1) and not session.is_retracted(1)


async def test_speech_after_a_tentative_end_retracts_it() -> None:
    on = await _run(PAUSED, 150)
    off = await _run(PAUSED, None)
    vad_on = on[1]
    assert vad_on.tentatives == 2 and vad_on.retractions == 1
    retracted = [f for f in on[2].seen if isinstance(f, EndRetractedFrame)]
    assert [(f.turn, f.resumed_as) for f in retracted] == [(1, 2)]
    # the utterance that was answered is the whole question, as without preemption
    turns_on = on[2].emitted.of("vad", UserTurnFrame)
    turns_off = off[2].emitted.of("vad", UserTurnFrame)
    assert [f.turn for f in turns_on] == [1, 2] and [f.turn for f in turns_off] == [1]
    assert np.array_equal(turns_on[-1].samples, turns_off[0].samples)
    assert len(turns_on[0].samples) < len(turns_off[0].samples)  # the retracted part


@pytest.mark.parametrize("pattern", [PLAIN, PAUSED], ids=["plain", "mid-sentence-pause"])
async def test_the_sink_gets_exactly_what_it_gets_without_preemption(pattern) -> None:
    on_result, _, on_probe, on_session = await _run(pattern, 150)
    off_result, _, off_probe, off_session = await _run(pattern, None)
    assert _sunk(on_probe) == _sunk(off_probe)
    assert not on_probe.early  # nothing of a tentative turn reached the sink
    # the conversation has the same messages: the retracted turn left none
    assert [(m.role, m.text) for m in on_session.messages] == \
        [(m.role, m.text) for m in off_session.messages]
    assert len(on_result.turns) == len(off_result.turns) == 1
    assert on_result.turns[0].text == off_result.turns[0].text


async def test_the_answer_starts_before_the_end_is_confirmed() -> None:
    result, _, probe, _ = await _run(PLAIN, 150)
    t = result.turns[0]
    # the LM answered while the hangover ran; the sink got it only after the confirmation
    assert t.tentative_ts is not None and t.first_text_ts is not None
    assert t.first_text_ts < t.vad_end_ts <= t.first_audio_ts
    assert any(isinstance(f, EndConfirmedFrame) for f in probe.seen)
    assert result.retracted == []


async def test_a_retraction_is_reported_with_its_cost() -> None:
    result, *_ = await _run(PAUSED, 150)
    assert [r["turn"] for r in result.retracted] == [1]
    entry = result.retracted[0]
    assert entry["resumed_as"] == 2 and entry["speculative_s"] >= 0
    assert entry["busy_s"] is not None and entry["busy_s"] >= 0
    assert [t.turn for t in result.turns] == [2]  # the retracted turn has no figures
    assert result.turns[0].speech_start_pts is not None
    assert result.to_dict()["retracted"] == result.retracted


async def test_retracted_work_in_flight_is_cancelled() -> None:
    """A slow LM is still answering the tentative turn when speech resumes: its call is
    cancelled, and the answer the sink gets is the one to the whole question."""
    session = Session()
    vad = make_stage(EnergyVAD, session=session, tentative_ms=150, **VAD)
    lm = make_stage(EchoLM, session=session, token_delay_s=0.05)
    codec = make_stage(EchoCodec, session=session)
    probe = make_stage(Probe, session=session)
    frames = audio_frames(speech_like(PAUSED), SR, 20.0, live=False)
    result = await run_frames([vad, lm, codec, probe], frames, interval=0.005, timeout=30)
    assert result.stages["lm"].interrupted == 0  # counted apart from barge-ins
    texts = [f.text for f in probe.seen if type(f).__name__ == "TextDeltaFrame"]
    assert "".join(texts) == "I heard 2.3 seconds of speech."
    assert {f.turn for f in probe.seen
            if not isinstance(f, SystemFrame | SpeechStartFrame) and f.turn} == {2}
    assert [(m.role, m.turn) for m in session.messages] == [("user", 2), ("assistant", 2)]


@pytest.mark.parametrize("cls", [EnergyVAD, WebRTCVAD])
async def test_every_vad_backend_has_the_tentative_end(cls) -> None:
    on = await _run(PAUSED, 150, vad_cls=cls)
    off = await _run(PAUSED, None, vad_cls=cls)
    assert on[1].tentatives >= 1
    assert _sunk(on[2]) == _sunk(off[2])


def test_tentative_must_come_before_the_hangover() -> None:
    with pytest.raises(ValidationError, match="shorter than hangover_ms"):
        make_stage(EnergyVAD, tentative_ms=600, hangover_ms=500)
    with pytest.raises(ValidationError, match="shorter than hangover_ms"):
        make_stage(EnergyVAD, tentative_ms=100, post_roll_ms=500, hangover_ms=500)
    make_stage(SileroVAD, tentative_ms=150, hangover_ms=500)  # options only, no model


async def test_speech_start_keeps_its_turn_number() -> None:
    _, _, probe, _ = await _run(PAUSED, 150)
    assert [f.turn for f in probe.seen if isinstance(f, SpeechStartFrame)] == [1]


async def test_the_first_of_two_sinks_holds() -> None:
    """A wav sink before a text sink: the first sink is where the answer is heard, so it
    holds; it never sees a frame of a tentative turn."""
    session = Session()
    vad = make_stage(EnergyVAD, session=session, tentative_ms=150, **VAD)
    lm = make_stage(EchoLM, session=session)
    codec = make_stage(EchoCodec, session=session)
    first = make_stage(Probe, name="first", session=session)
    second = make_stage(Probe, name="second", session=session)
    await run_frames([vad, lm, codec, first, second],
                     audio_frames(speech_like(PLAIN), SR, 20.0, live=False), timeout=30)
    assert vad.tentatives == 1
    assert not first.early and not second.early
    assert [_key(f) for f in first.seen if not isinstance(f, SystemFrame)] == \
        [_key(f) for f in second.seen if not isinstance(f, SystemFrame)]

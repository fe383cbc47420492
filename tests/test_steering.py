"""Steering a running pipeline from outside, frames upstream, live option updates (issue 10).

A live source that never ends stands in for a server's connection; the test drives the
pipeline through its public API (``say``, ``interrupt``, ``respond``, ``commit``, ``update``,
``truncate``) and reads what reaches a collecting sink.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import numpy as np
import pytest
from omniframe_audio.sinks import WavSink
from omniframe_audio.vad import EnergyVAD
from omniframe_echo.stages import EchoCodec, EchoLM

from omniframe.frames import (
    AudioFrame,
    ControlFrame,
    EndOfTurnFrame,
    Frame,
    OutputAudioFrame,
    TextDeltaFrame,
    UserTurnFrame,
)
from omniframe.pipeline import Pipeline, PipelineCancelled, PipelineError
from omniframe.session import Session
from omniframe.stage import Stage, StageContext

pytestmark = pytest.mark.anyio


class Idle(Stage):
    """A live source with nothing to say: everything comes from the steering API."""

    kind = "source"
    name = "idle"
    produces = (Frame,)

    async def generate(self) -> AsyncIterator[Frame]:
        await anyio.sleep_forever()
        yield  # pragma: no cover


class Collect(Stage):
    kind = "sink"
    name = "collect"
    consumes = (Frame,)
    requires = ()

    def __init__(self, context: StageContext) -> None:
        super().__init__(None, context)
        self.frames: list[Frame] = []
        self.changed = anyio.Event()

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        self.frames.append(frame)
        self.changed.set()
        self.changed = anyio.Event()
        return
        yield  # pragma: no cover

    def text(self, turn: int) -> str:
        return "".join(f.text for f in self.frames
                       if isinstance(f, TextDeltaFrame) and f.turn == turn)

    async def until(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            while not pred():
                await self.changed.wait()


def _ctx(name: str, session: Session) -> StageContext:
    return StageContext(name=name, session=session)


async def _eventually(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():  # noqa: ASYNC110 - polls state that other tasks change
            await anyio.sleep(0.005)


async def _running(stages: list[Stage], body: Callable[[Pipeline], object]) -> Pipeline:
    """Run the pipeline, call ``body(pipeline)`` once it runs, then cancel it."""
    p = Pipeline(stages)

    async def steer() -> None:
        await _eventually(lambda: p._lanes is not None)
        try:
            await body(p)  # type: ignore[misc]
        finally:
            p.cancel("done")

    async with anyio.create_task_group() as tg:
        tg.start_soon(steer)
        with pytest.raises(PipelineCancelled):
            await p.run()
    return p


async def test_say_interrupt_and_respond():
    s = Session()
    lm = EchoLM({"token_delay_s": 0.05}, _ctx("lm", s))
    sink = Collect(_ctx("sink", s))

    async def body(p: Pipeline) -> None:
        t1 = await p.say("hello there")
        await sink.until(lambda: any(isinstance(f, EndOfTurnFrame) and f.turn == t1
                                     for f in sink.frames))
        assert sink.text(t1) == "You said: hello there"
        t2 = await p.say("one two three four five six seven eight nine ten")
        await sink.until(lambda: len(sink.text(t2)) > 0)
        cut = await p.interrupt()  # cancels the answer in flight
        assert cut > t2
        before = sink.text(t2)
        await anyio.sleep(0.5)  # the rest of the answer would take 0.5 s more
        assert sink.text(t2) == before  # nothing more came after the interrupt
        assert 0 < len(before) < len("You said: one two three four five six")
        t3 = await p.respond(instructions="answer now")
        await sink.until(lambda: sink.text(t3) == "You said: answer now")
        assert t1 < t2 < cut < t3

    await _running([Idle(None, _ctx("source", s)), lm, sink], body)
    assert [m.text for m in s.messages if m.role == "user"][:2] == [
        "hello there", "one two three four five six seven eight nine ten"]


async def test_live_option_updates_and_refusals():
    s = Session()
    lm = EchoLM(None, _ctx("lm", s))
    sink = Collect(_ctx("sink", s))

    async def body(p: Pipeline) -> None:
        await p.update("lm", prefix="Heard: ")
        t = await p.say("hi")
        await sink.until(lambda: sink.text(t) == "Heard: hi")
        with pytest.raises(PipelineError, match="no stage named 'llm'"):
            await p.update("llm", prefix="x")
        with pytest.raises(PipelineError, match="cannot change 'nope'"):
            await p.update("lm", nope=1)
        with pytest.raises(PipelineError, match="token_delay_s"):
            await p.update("lm", token_delay_s="slow")
        with pytest.raises(PipelineError, match="cannot change"):
            await p.update("sink", anything=1)
        assert lm.options.prefix == "Heard: "

    await _running([Idle(None, _ctx("source", s)), lm, sink], body)


async def test_push_is_refused_when_not_running_or_into_the_source():
    s = Session()
    p = Pipeline([Idle(None, _ctx("source", s)), EchoLM(None, _ctx("lm", s))])
    with pytest.raises(PipelineError, match="not running"):
        await p.say("hi")

    async def body(p: Pipeline) -> None:
        with pytest.raises(PipelineError, match="into the source"):
            await p.push(TextDeltaFrame(text="x"), to="source")

    await _running([Idle(None, _ctx("source", s)), EchoLM(None, _ctx("lm", s)),
                    Collect(_ctx("sink", s))], body)


async def test_commit_closes_the_vad_turn_before_the_silence_would():
    s = Session()
    vad = EnergyVAD({"hangover_ms": 60_000}, _ctx("vad", s))  # silence alone never ends it
    sink = Collect(_ctx("sink", s))
    rng = np.random.default_rng(0)

    async def body(p: Pipeline) -> None:
        for i in range(40):  # 0.8 s of loud noise, then silence
            x = (rng.standard_normal(320) * (0.3 if i < 30 else 0.0)).astype(np.float32)
            await p.push(AudioFrame(samples=x, sample_rate=16000, pts=i * 0.02))
        await anyio.sleep(0.2)
        assert not any(isinstance(f, UserTurnFrame) for f in sink.frames)
        await p.commit()
        await sink.until(lambda: any(isinstance(f, UserTurnFrame) for f in sink.frames))
        await p.update("vad", hangover_ms=100)  # live: later turns end after 0.1 s
        await _eventually(lambda: vad._hangover_n == 1600)  # from the next frame it takes
        await p.push(AudioFrame(samples=np.zeros(320, np.float32), sample_rate=16000))

    await _running([Idle(None, _ctx("source", s)), vad, sink], body)
    turn = next(f for f in sink.frames if isinstance(f, UserTurnFrame))
    assert turn.turn == 1 and turn.duration > 0.5


class Reporter(Stage):
    """A sink that reports upstream what it played (the shape of a real playback report)."""

    kind = "sink"
    name = "reporter"
    consumes = (TextDeltaFrame,)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        await self.push_upstream(Played(turn=frame.turn, text=frame.text))
        return
        yield  # pragma: no cover


@dataclass(frozen=True, slots=True, kw_only=True)
class Played(ControlFrame):
    text: str


class Heard(Stage):
    """Between source and sink: records what the sink reports, passes frames down."""

    kind = "processor"
    name = "heard"
    consumes = (TextDeltaFrame,)
    forward_consumed = True
    consumes_upstream = (Played,)

    def __init__(self, context: StageContext) -> None:
        super().__init__(None, context)
        self.reports: list[str] = []

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        return
        yield  # pragma: no cover

    async def process_upstream(self, frame: Frame) -> AsyncIterator[Frame]:
        self.reports.append(frame.text)  # type: ignore[attr-defined]
        return  # consumed here: the source never sees it
        yield  # pragma: no cover


async def test_frames_travel_upstream_to_the_stage_that_wants_them():
    s = Session()
    heard = Heard(_ctx("heard", s))
    sink = Reporter(None, _ctx("sink", s))

    async def body(p: Pipeline) -> None:
        for w in ("a", "b", "c"):
            await p.push(TextDeltaFrame(text=w, turn=1))
        await _eventually(lambda: len(heard.reports) == 3)

    await _running([Idle(None, _ctx("source", s)), heard, sink], body)
    assert heard.reports == ["a", "b", "c"]


async def test_push_upstream_outside_a_pipeline_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not running in a pipeline"):
        await Reporter(None, StageContext(name="r", session=Session())).push_upstream(
            TextDeltaFrame(text="x"))


async def test_truncate_keeps_what_was_heard(tmp_path):
    s = Session()
    lm = EchoLM(None, _ctx("lm", s))
    codec = EchoCodec(None, _ctx("codec", s))
    wav = WavSink({"path": str(tmp_path / "a.wav")}, _ctx("wav", s))
    sink = Collect(_ctx("sink", s))

    async def body(p: Pipeline) -> None:
        t = await p.say("one two three four")
        await sink.until(lambda: any(isinstance(f, EndOfTurnFrame) and f.turn == t
                                     for f in sink.frames))
        chunks = [f for f in sink.frames if isinstance(f, OutputAudioFrame) and f.turn == t]
        first = len(chunks[0].samples) / chunks[0].sample_rate
        await p.truncate(t, first + 1e-4)  # only the first word's tone was heard
        await _eventually(lambda: s.last("assistant", t).heard is not None)  # type: ignore

    await _running([Idle(None, _ctx("source", s)), lm, codec, wav, sink], body)
    msg = s.last("assistant")
    assert msg is not None and msg.interrupted and msg.heard == "You"

"""omniframe.testing: scripted input (data, wait, interrupt) and output grouped per input, so an
interruption test fails when the stage ignores the interrupt (issue 10)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from omniframe.frames import (
    EndOfStreamFrame,
    EndOfTurnFrame,
    Frame,
    InterruptFrame,
    TextDeltaFrame,
    TranscriptFrame,
)
from omniframe.stage import Stage, StageOptions
from omniframe.testing import Sleep, StageRun, WaitFor, WaitTimeout, make_stage, run_stage

pytestmark = pytest.mark.anyio

STORY = " ".join(f"w{i}" for i in range(20))


class Talker(Stage):
    """Answers a transcript word by word, one word per 20 ms; stops when interrupted."""

    kind = "lm"
    name = "talker"
    consumes = (TranscriptFrame,)
    produces = (TextDeltaFrame, EndOfTurnFrame)

    class Options(StageOptions):
        delay_s: float = 0.02

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.answering = 0  # the turn being answered

    async def speak(self, frame: TranscriptFrame) -> AsyncIterator[Frame]:
        self.answering = frame.turn
        for word in frame.text.split():
            await anyio.sleep(self.options.delay_s)
            yield TextDeltaFrame(text=word)
        self.answering = 0
        yield EndOfTurnFrame(text=frame.text)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, TranscriptFrame)
        async for out in self.speak(frame):
            yield out

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        if self.answering:
            yield EndOfTurnFrame(turn=self.answering, reason="interrupted")
            self.answering = 0


class DeafTalker(Talker):
    """Deliberately broken: ignores interruptions (shields its answer, forgets nothing)."""

    name = "deaf-talker"

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, TranscriptFrame)
        with anyio.CancelScope(shield=True):
            async for out in self.speak(frame):
                yield out

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        return
        yield  # pragma: no cover


async def barge_in(stage: Stage) -> StageRun:
    """The user talks over the answer once it has started, then asks again."""
    return await run_stage(stage, [
        TranscriptFrame(text=STORY, turn=1),
        WaitFor(TextDeltaFrame, count=2),   # the answer is under way ...
        InterruptFrame(turn=2),             # ... when the user barges in
        WaitFor(),                          # the stage has handled both
        TranscriptFrame(text="again", turn=2),
    ], timeout=20)


def assert_stops_on_interrupt(run: StageRun) -> None:
    """The interruption test: the first answer stops early and is ended as interrupted; the
    next answer is clean."""
    story, interrupt, again = run.by_input  # type: ignore[misc]
    words = [f.text for f in story if isinstance(f, TextDeltaFrame)]
    assert 2 <= len(words) < 20, f"kept talking after the interrupt: {len(words)} words"
    assert not [f for f in story if isinstance(f, EndOfTurnFrame)], "finished its answer"
    assert interrupt[0] is run.inputs[1]  # the interrupt went on downstream, first
    ends = [(f.turn, f.reason) for f in interrupt if isinstance(f, EndOfTurnFrame)]
    assert ends == [(1, "interrupted")], "did not end the interrupted turn"
    assert [(type(f).__name__, f.turn) for f in again] == [("TextDeltaFrame", 2),
                                                           ("EndOfTurnFrame", 2)]


async def test_stage_that_stops_on_interrupt_passes() -> None:
    run = await barge_in(make_stage(Talker))
    assert_stops_on_interrupt(run)
    assert run.frames == [*run.by_input[0], *run.by_input[1], *run.by_input[2]]


async def test_stage_that_ignores_interrupts_fails_the_same_test() -> None:
    run = await barge_in(make_stage(DeafTalker))
    with pytest.raises(AssertionError, match="kept talking"):
        assert_stops_on_interrupt(run)
    story = run.by_input[0]  # type: ignore[index]
    assert len([f for f in story if isinstance(f, TextDeltaFrame)]) == 20
    assert isinstance(story[-1], EndOfTurnFrame) and story[-1].reason == "completed"


async def test_interrupt_is_sent_only_when_the_script_reaches_it() -> None:
    """No frame overtakes a WaitFor: the interrupt arrives after the answer started."""
    seen: list[str] = []

    class Spy(Talker):
        name = "spy"

        async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
            seen.append(f"interrupt while answering turn {self.answering}")
            async for out in super().interrupt(frame):
                yield out

    await barge_in(make_stage(Spy))
    assert seen == ["interrupt while answering turn 1"]


async def test_plain_list_still_works_and_groups() -> None:
    a, b = TranscriptFrame(text="x y", turn=1), TextDeltaFrame(text="passes", turn=1)
    out = await run_stage(make_stage(Talker, delay_s=0.0), [a, b])
    assert [type(f).__name__ for f in out] == ["TextDeltaFrame", "TextDeltaFrame",
                                               "EndOfTurnFrame", "TextDeltaFrame"]
    assert out[0].text == "x" and len(out) == 4 and not out.at_end
    assert out.output_of(a) == out[:3] and out.output_of(b) == [b]  # not consumed: passed on
    assert not [f for f in out if isinstance(f, EndOfStreamFrame)]


async def test_flush_at_end_of_stream_is_at_end() -> None:
    class Buffer(Stage):
        kind = "codec"
        name = "buffer"
        consumes = (TextDeltaFrame,)
        produces = (TextDeltaFrame,)

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.held: list[str] = []

        async def process(self, frame: Frame) -> AsyncIterator[Frame]:
            assert isinstance(frame, TextDeltaFrame)
            self.held.append(frame.text)
            return
            yield  # pragma: no cover

        async def end_of_stream(self, frame: EndOfStreamFrame) -> AsyncIterator[Frame]:
            yield TextDeltaFrame(text="".join(self.held))

    out = await run_stage(make_stage(Buffer), [TextDeltaFrame(text="a"), Sleep(0.01),
                                               TextDeltaFrame(text="b")])
    assert out.by_input == [[], []]
    assert [f.text for f in out.at_end] == ["ab"] and out.frames == out.at_end


async def test_wait_for_that_never_comes_times_out_with_what_was_seen() -> None:
    with pytest.raises(WaitTimeout, match=r"WaitFor\(InterruptFrame.*TextDeltaFrame"):
        await run_stage(make_stage(Talker, delay_s=0.0),
                        [TranscriptFrame(text="hi", turn=1), WaitFor(InterruptFrame, timeout=0.3)])


async def test_wait_for_a_predicate() -> None:
    run = await run_stage(make_stage(Talker, delay_s=0.01), [
        TranscriptFrame(text="a b c d", turn=1),
        WaitFor(lambda f: isinstance(f, TextDeltaFrame) and f.text == "c"),
        InterruptFrame(turn=2), WaitFor(),
    ])
    assert [f.text for f in run.by_input[0] if isinstance(f, TextDeltaFrame)][:3] == ["a", "b", "c"]


async def test_stage_that_consumes_every_frame_has_no_grouping() -> None:
    class Everything(Stage):
        kind = "sink"
        name = "everything"
        consumes = (Frame,)

        async def process(self, frame: Frame) -> AsyncIterator[Frame]:
            return
            yield  # pragma: no cover

    out = await run_stage(make_stage(Everything), [TextDeltaFrame(text="a")])
    assert out.by_input is None and [f.text for f in out] == ["a"]  # sinks forward
    with pytest.raises(ValueError, match="every frame type"):
        await run_stage(make_stage(Everything), [TextDeltaFrame(text="a"), WaitFor()])


class Splitter(Stage):
    """Emits each character of a text delta as its own delta (none for an empty text)."""

    kind = "codec"
    name = "splitter"
    consumes = (TextDeltaFrame,)
    produces = (TextDeltaFrame,)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, TextDeltaFrame)
        for ch in frame.text:
            await anyio.lowlevel.checkpoint()
            yield TextDeltaFrame(text=ch)


data_frames = st.lists(
    st.one_of(st.builds(TextDeltaFrame, text=st.text(alphabet="abc", max_size=4)),
              st.builds(TranscriptFrame, text=st.text(alphabet="xyz", max_size=3))),
    max_size=12,
)


@given(frames=data_frames, waits=st.lists(st.booleans(), min_size=12, max_size=12))
def test_by_input_concatenates_to_frames_in_order(frames: list[Frame], waits: list[bool]) -> None:
    script: list = []
    for f, wait in zip(frames, waits, strict=False):
        script.append(f)
        if wait:
            script.append(WaitFor())
    out = anyio.run(run_stage, make_stage(Splitter), script)
    assert out.by_input is not None and len(out.by_input) == len(frames)
    assert [f for group in out.by_input for f in group] == out.frames
    for f, group in zip(frames, out.by_input, strict=True):
        if isinstance(f, TextDeltaFrame):
            assert [g.text for g in group] == list(f.text)  # its own characters, in order
        else:
            assert group == [f]  # passed on untouched
    assert not out.at_end

"""The bus: order, backpressure, drain, urgent lane, interruption, errors, observers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from omniframe import (
    DataFrame,
    EndOfStreamFrame,
    EndOfTurnFrame,
    ErrorFrame,
    Frame,
    InterruptFrame,
    Pipeline,
    Stage,
    StageContext,
    StageError,
    StageOptions,
    TextDeltaFrame,
    TranscriptFrame,
)
from omniframe.testing import ListSource, make_stage, run_frames

pytestmark = pytest.mark.anyio


class Relay(Stage):
    """Consumes text deltas and re-emits them, optionally after a delay."""

    kind = "encoder"
    name = "relay"
    consumes = (TextDeltaFrame,)
    produces = (TextDeltaFrame,)

    class Options(StageOptions):
        delay: float = 0.0
        tag: str = ""

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, TextDeltaFrame)
        if self.options.delay:
            await anyio.sleep(self.options.delay)
        yield TextDeltaFrame(text=frame.text + self.options.tag)


class SlowSink(Stage):
    kind = "sink"
    name = "slow"
    consumes = (TextDeltaFrame,)

    class Options(StageOptions):
        delay: float = 0.0

    def __init__(self, *a: object, **k: object) -> None:
        super().__init__(*a, **k)  # type: ignore[arg-type]
        self.seen: list[str] = []

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, TextDeltaFrame)
        if self.options.delay:
            await anyio.sleep(self.options.delay)
        self.seen.append(frame.text)
        return
        yield


def texts(frames: list[Frame] | None) -> list[str]:
    return [f.text for f in frames or [] if isinstance(f, TextDeltaFrame)]


async def test_order_and_passthrough() -> None:
    frames = [TextDeltaFrame(text=str(i)) for i in range(50)]
    frames.insert(10, TranscriptFrame(text="not consumed"))
    result = await run_frames([make_stage(Relay, tag="!"), make_stage(Relay, name="r2", tag="?")],
                              frames)
    assert texts(result.frames) == [f"{i}!?" for i in range(50)]
    # the transcript passed through both relays, in its place
    kinds = [type(f).__name__ for f in result.frames or []]
    assert kinds[10] == "TranscriptFrame"
    assert isinstance(result.frames[-1], EndOfStreamFrame)  # type: ignore[index]


async def test_outputs_inherit_turn() -> None:
    result = await run_frames([make_stage(Relay)], [TextDeltaFrame(text="a", turn=3)])
    assert [f.turn for f in result.frames or [] if isinstance(f, TextDeltaFrame)] == [3]


@given(
    n=st.integers(0, 60),
    buffer=st.integers(1, 4),
    delays=st.lists(st.sampled_from([0.0, 0.0, 0.0005]), min_size=3, max_size=3),
)
def test_no_loss_no_duplication_under_backpressure(n: int, buffer: int,
                                                   delays: list[float]) -> None:
    """Random stage speeds and tiny buffers: every frame arrives once, in order."""

    async def main() -> None:
        sink = make_stage(SlowSink, delay=delays[2])
        stages = [make_stage(Relay, name="a", delay=delays[0]),
                  make_stage(Relay, name="b", delay=delays[1]), sink]
        with anyio.fail_after(20):
            result = await run_frames(stages, [TextDeltaFrame(text=str(i)) for i in range(n)],
                                      buffer=buffer)
        assert sink.seen == [str(i) for i in range(n)]
        assert texts(result.frames) == [str(i) for i in range(n)]
        assert result.stages["a"].frames_out == n + 1  # + end of stream

    anyio.run(main)


@given(st.lists(st.sampled_from(["data", "urgent"]), max_size=40), st.integers(1, 3))
def test_frame_order_under_random_interleavings(kinds: list[str], buffer: int) -> None:
    """Data frames keep their order whatever urgent frames are mixed in; nothing is lost."""

    async def main() -> None:
        frames: list[Frame] = []
        for i, k in enumerate(kinds):
            frames.append(TextDeltaFrame(text=str(i)) if k == "data"
                          else ErrorFrame(stage="src", message=str(i)))
        with anyio.fail_after(20):
            result = await run_frames([make_stage(Relay)], frames, buffer=buffer)
        got = result.frames or []
        assert texts(got) == [str(i) for i, k in enumerate(kinds) if k == "data"]
        errors = sorted(int(f.message) for f in got if isinstance(f, ErrorFrame))
        assert errors == [i for i, k in enumerate(kinds) if k == "urgent"]

    anyio.run(main)


async def test_drain_nothing_lost_at_shutdown() -> None:
    """The source ends long before a slow sink is done: the pipeline waits for it."""
    sink = make_stage(SlowSink, delay=0.005)
    result = await run_frames([make_stage(Relay), sink], [TextDeltaFrame(text=str(i))
                                                          for i in range(30)], buffer=2)
    assert sink.seen == [str(i) for i in range(30)]
    assert isinstance((result.frames or [])[-1], EndOfStreamFrame)


class Boom(Stage):
    kind = "lm"
    name = "boom"
    consumes = (TextDeltaFrame,)
    produces = (TextDeltaFrame,)

    class Options(StageOptions):
        at: int = 3
        in_setup: bool = False

    async def setup(self) -> None:
        if self.options.in_setup:
            raise RuntimeError("weights are missing")

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, TextDeltaFrame)
        if frame.text == str(self.options.at):
            raise ValueError("bad token")
        yield frame


async def test_stage_error_names_the_stage_and_stops_everything() -> None:
    src_frames = [TextDeltaFrame(text=str(i)) for i in range(1000)]
    before = asyncio.all_tasks()
    with pytest.raises(StageError) as info:
        await run_frames([make_stage(Relay), make_stage(Boom, name="brain")], src_frames)
    assert info.value.stage == "brain"
    assert "stage 'brain' (lm) failed during process: ValueError: bad token" in str(info.value)
    await anyio.lowlevel.checkpoint()
    assert asyncio.all_tasks() - before == set()


async def test_setup_error_names_the_stage() -> None:
    with pytest.raises(StageError, match="stage 'lm' \\(lm\\) failed during setup: "
                                         "RuntimeError: weights are missing"):
        await run_frames([make_stage(Boom, in_setup=True)], [])


class Teardown(Stage):
    kind = "sink"
    name = "teardown"
    consumes = (TextDeltaFrame,)
    closed = 0

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        return
        yield

    async def teardown(self) -> None:
        type(self).closed += 1


async def test_teardown_runs_after_a_failure() -> None:
    Teardown.closed = 0
    with pytest.raises(StageError):
        await run_frames([make_stage(Boom), make_stage(Teardown)],
                         [TextDeltaFrame(text="3")])
    assert Teardown.closed == 1


class SlowLM(Stage):
    """Answers each transcript with ten words, 20 ms apart; records what got cancelled."""

    kind = "lm"
    name = "slowlm"
    consumes = (TranscriptFrame,)
    produces = (TextDeltaFrame, EndOfTurnFrame)

    def __init__(self, *a: object, **k: object) -> None:
        super().__init__(*a, **k)  # type: ignore[arg-type]
        self.cancelled: list[int] = []
        self.interrupts: list[int] = []

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        try:
            for i in range(10):
                await anyio.sleep(0.02)
                yield TextDeltaFrame(text=f"t{frame.turn}w{i} ")
            yield EndOfTurnFrame()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(frame.turn)
            raise

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        self.interrupts.append(frame.turn)
        yield EndOfTurnFrame(turn=frame.turn - 1, reason="interrupted")


async def test_interrupt_cancels_answer_in_flight_and_serves_new_turn() -> None:
    lm = make_stage(SlowLM)
    sink = make_stage(SlowSink)
    frames: list[Frame] = [TranscriptFrame(text="first", turn=1)]

    class Script(ListSource):
        async def generate(self) -> AsyncIterator[Frame]:
            yield TranscriptFrame(text="first", turn=1)
            await anyio.sleep(0.07)  # the answer to turn 1 is half way
            yield InterruptFrame(turn=2)
            yield TranscriptFrame(text="second", turn=2)

    src = Script(frames, context=StageContext(name="source", session=lm.context.session))
    with anyio.fail_after(10):
        result = await Pipeline([src, lm, sink]).run()
    assert lm.cancelled == [1]
    assert lm.interrupts == [2]
    t1 = [t for t in sink.seen if t.startswith("t1")]
    t2 = [t for t in sink.seen if t.startswith("t2")]
    assert 0 < len(t1) < 10
    assert len(t2) == 10
    ends = [(f.turn, f.reason) for f in result.frames or [] if isinstance(f, EndOfTurnFrame)]
    assert ends == [(1, "interrupted"), (2, "completed")]
    assert result.turns[0].interrupted and not result.turns[1].interrupted


class Gate(Stage):
    """Holds data until released, so frames pile up in the next stage's queue."""

    kind = "encoder"
    name = "gate"
    consumes = (TextDeltaFrame,)
    produces = (TextDeltaFrame,)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        yield frame


class Blocked(Stage):
    kind = "sink"
    name = "blocked"
    consumes = (TextDeltaFrame, EndOfTurnFrame)

    def __init__(self, *a: object, **k: object) -> None:
        super().__init__(*a, **k)  # type: ignore[arg-type]
        self.release = anyio.Event()
        self.seen: list[str] = []

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        await self.release.wait()
        if isinstance(frame, TextDeltaFrame):
            self.seen.append(frame.text)
        return
        yield


async def test_interrupt_overtakes_and_drops_queued_old_turn_data() -> None:
    sink = make_stage(Blocked)
    gate = make_stage(Gate)

    class Script(ListSource):
        async def generate(self) -> AsyncIterator[Frame]:
            for i in range(6):
                yield TextDeltaFrame(text=f"old{i}", turn=1)
            await anyio.sleep(0.05)  # old frames are queued at the blocked sink
            yield InterruptFrame(turn=2)
            await anyio.sleep(0.05)
            sink.release.set()
            yield TextDeltaFrame(text="new", turn=2)
            yield TextDeltaFrame(text="raw", turn=0)  # not part of any turn: kept

    with anyio.fail_after(10):
        ctx = StageContext(name="source", session=sink.context.session)
        result = await Pipeline([Script([], context=ctx), gate, sink], buffer=16).run()
    # the frame the sink was holding when the interrupt came is cancelled; the queued ones
    # are dropped; the new turn and turn-less data pass
    assert sink.seen == ["new", "raw"]
    assert result.stages["sink"].dropped >= 4
    assert result.stages["sink"].interrupted == 1


class Counter:
    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
        self.seen[stage] = self.seen.get(stage, 0) + 1


async def test_observers_see_every_frame() -> None:
    obs = Counter()
    await run_frames([make_stage(Relay), make_stage(SlowSink)],
                     [TextDeltaFrame(text=str(i)) for i in range(20)], observers=[obs])
    # 20 data frames + end of stream, at every stage
    assert obs.seen == {"source": 21, "encoder": 21, "sink": 21}


class Leaky(Stage):
    kind = "lm"
    name = "leaky"
    consumes = (TextDeltaFrame,)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        await anyio.sleep(10)
        yield frame


async def test_cancellation_leaves_no_task_running() -> None:
    before = asyncio.all_tasks()
    with anyio.move_on_after(0.1) as scope:
        await run_frames([make_stage(Leaky)], [TextDeltaFrame(text="x")])
    assert scope.cancelled_caught
    await anyio.lowlevel.checkpoint()
    assert asyncio.all_tasks() - before == set()


async def test_custom_data_frame_passes_through() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Note(DataFrame):
        body: str

    result = await run_frames([make_stage(Relay)], [Note(body="hi")])
    assert [f.body for f in result.frames or [] if isinstance(f, Note)] == ["hi"]


class Journal(Stage):
    """Records the order in which it sees interrupts and data."""

    kind = "codec"
    name = "journal"
    consumes = (TextDeltaFrame,)
    produces = (TextDeltaFrame,)

    def __init__(self, *a: object, **k: object) -> None:
        super().__init__(*a, **k)  # type: ignore[arg-type]
        self.events: list[str] = []

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        self.events.append(f"data{frame.turn}")
        yield frame

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        await anyio.sleep(0.001)  # a slow reset must still finish before new-turn data
        self.events.append(f"interrupt{frame.turn}")
        return
        yield


@given(st.integers(1, 5), st.integers(0, 5))
def test_interrupt_takes_effect_before_the_data_sent_after_it(before: int, after: int) -> None:
    async def main() -> None:
        frames: list[Frame] = [TextDeltaFrame(text="x", turn=1) for _ in range(before)]
        frames += [InterruptFrame(turn=2)]
        frames += [TextDeltaFrame(text="y", turn=2) for _ in range(after)]
        j1, j2 = make_stage(Journal, name="j1"), make_stage(Journal, name="j2")
        with anyio.fail_after(10):
            await run_frames([j1, j2], frames)
        for j in (j1, j2):
            i = j.events.index("interrupt2")
            assert all(e != "data2" for e in j.events[:i])
            assert j.events[i + 1:].count("data2") == after

    anyio.run(main)


class ErrorSink(Stage):
    kind = "sink"
    name = "errors"
    consumes = (ErrorFrame,)

    def __init__(self, *a: object, **k: object) -> None:
        super().__init__(*a, **k)  # type: ignore[arg-type]
        self.errors: list[str] = []

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, ErrorFrame)
        self.errors.append(frame.message)
        return
        yield


async def test_urgent_frames_reach_a_stage_that_consumes_them() -> None:
    sink = make_stage(ErrorSink)
    result = await run_frames([make_stage(Relay), sink],
                              [ErrorFrame(stage="x", message="disk full")])
    assert sink.errors == ["disk full"]
    assert any(isinstance(f, ErrorFrame) for f in result.frames or [])  # passed on


async def test_run_compute_serialises_cpu_work_on_one_thread() -> None:
    """CPU compute of several stages runs on one thread, never two calls at once; other
    devices run in ordinary worker threads."""
    import threading
    import time

    a = make_stage(Relay, "a")
    b = make_stage(Relay, "b")
    threads: set[int] = set()
    busy = 0
    overlap = False
    guard = threading.Lock()

    def work(x: int) -> int:
        nonlocal busy, overlap
        with guard:
            busy += 1
            overlap |= busy > 1
            threads.add(threading.get_ident())
        time.sleep(0.01)
        with guard:
            busy -= 1
        return x * 2

    results: list[int] = []

    async def many(stage: Stage, start: int) -> None:
        for i in range(start, start + 5):
            results.append(await stage.run_compute(work, i))

    async with anyio.create_task_group() as tg:
        tg.start_soon(many, a, 0)
        tg.start_soon(many, b, 100)
    assert sorted(results) == sorted([2 * i for i in range(5)] + [2 * i for i in range(100, 105)])
    assert not overlap and len(threads) == 1 and threading.get_ident() not in threads

    (compute_thread,) = threads
    from omniframe.session import Session

    gpu = Relay({}, StageContext(name="g", session=Session(), device="cuda:0"))
    threads.clear()
    assert await gpu.run_compute(work, 7) == 14
    assert threads and compute_thread not in threads  # an ordinary worker thread


async def test_shared_model_loads_once_on_the_compute_thread() -> None:
    import threading

    from omniframe.resources import Resources
    from omniframe.session import Session

    resources = Resources()
    loads: list[int] = []

    def loader() -> object:
        loads.append(threading.get_ident())
        return object()

    a = Relay({}, StageContext(name="a", session=Session(), resources=resources))
    b = Relay({}, StageContext(name="b", session=Session(), resources=resources))
    m1 = await a.shared_model(("model", 1), loader)
    m2 = await b.shared_model(("model", 1), loader)
    compute = await a.run_compute(threading.get_ident)
    assert m1 is m2 and loads == [compute]

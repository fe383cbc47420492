"""The watchdog and the run's error rules (issue 11, defects 1, 4 and 6's failing teardown).

Every hang here would have run until killed before the watchdog: each test runs under a
deadline well below what a hang would take, and checks the error names the stage, the phase
and how long it was silent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator

import anyio
import pytest

from omniframe import stage as stage_module
from omniframe.frames import EndOfTurnFrame, Frame, TextDeltaFrame, TranscriptFrame
from omniframe.pipeline import Pipeline, PipelineCancelled, StageError
from omniframe.session import Session
from omniframe.stage import Stage, StageContext
from omniframe.testing import ListSource
from omniframe.watchdog import StageStuck, WatchdogLimits, merge_limits

pytestmark = pytest.mark.anyio

FAST = WatchdogLimits(setup=1.0, process=0.6, interrupt=0.6, end_of_stream=0.6, teardown=0.6)


class Quiet(Stage):
    """An LM whose ``how`` option picks the way it misbehaves."""

    kind = "lm"
    name = "quiet"
    consumes = (TranscriptFrame,)
    produces = (TextDeltaFrame, EndOfTurnFrame)

    def __init__(self, how: str, name: str = "lm") -> None:
        super().__init__(None, StageContext(name=name, session=Session()))
        self.how = how
        self.release = threading.Event()

    async def setup(self) -> None:
        if self.how == "setup-await":
            await anyio.sleep_forever()

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if self.how == "await":
            await anyio.sleep_forever()
        elif self.how == "thread":
            await self.run_sync(self.release.wait, 30)
        elif self.how == "busy-loop":
            end = time.monotonic() + 30
            while time.monotonic() < end:  # blocks the event loop in Python code
                pass
        elif self.how == "slow-but-talking":
            for i in range(8):
                await anyio.sleep(0.2)
                yield TextDeltaFrame(text=str(i))
        elif self.how == "exit":
            raise SystemExit(3)
        elif self.how == "error":
            raise RuntimeError("the model file is corrupt")
        yield EndOfTurnFrame()

    async def teardown(self) -> None:
        self.release.set()
        if self.how == "teardown-await":
            await anyio.sleep_forever()
        if self.how == "teardown-error":
            raise OSError("could not close the device")


class Sink(Stage):
    kind = "sink"
    name = "collect"
    consumes = (TextDeltaFrame, EndOfTurnFrame)

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(None, StageContext(name="sink", session=Session()))
        self.delay = delay

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if self.delay:
            await anyio.sleep(self.delay)
        return
        yield


def _pipeline(lm: Stage, sink: Stage | None = None, **kwargs: object) -> Pipeline:
    src = ListSource([TranscriptFrame(text="hi", final=True, turn=1)])
    kwargs.setdefault("watchdog", FAST)
    return Pipeline([src, lm, sink or Sink()], **kwargs)  # type: ignore[arg-type]


async def _fails(p: Pipeline, deadline: float = 8.0) -> StageError:
    t0 = time.monotonic()
    with anyio.fail_after(deadline), pytest.raises(StageError) as info:
        await p.run()
    info.value.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
    return info.value


@pytest.mark.parametrize(("how", "phase"), [("await", "process"), ("setup-await", "setup"),
                                            ("teardown-await", "teardown")])
async def test_a_stage_that_awaits_forever_is_named(how, phase):
    err = await _fails(_pipeline(Quiet(how)))
    assert (err.stage, err.phase) == ("lm", phase)
    assert isinstance(err.cause, StageStuck)
    assert "no progress for" in str(err) and f"watchdog.{phase}" in str(err)


async def test_a_stage_blocked_in_its_worker_thread_is_named(monkeypatch):
    monkeypatch.setattr(stage_module, "ABANDON_AFTER_S", 0.5)
    lm = Quiet("thread")
    err = await _fails(_pipeline(lm))
    assert (err.stage, err.phase) == ("lm", "process")
    assert err.elapsed < 5  # type: ignore[attr-defined]


async def test_a_stage_that_blocks_the_event_loop_is_named():
    err = await _fails(_pipeline(Quiet("busy-loop")))
    assert (err.stage, err.phase) == ("lm", "process")
    assert "blocks the event loop" in str(err)
    assert err.elapsed < 6  # type: ignore[attr-defined]


async def test_a_slow_stage_that_keeps_emitting_is_not_stuck():
    p = _pipeline(Quiet("slow-but-talking"))  # 1.6 s in all, 0.2 s between outputs
    with anyio.fail_after(10):
        result = await p.run()
    assert result.text() == "01234567"


async def test_waiting_for_a_slow_downstream_stage_is_not_silence():
    # the LM waits on a full queue for ~8 x 0.3 s; the sink is the slow one, and it talks
    limits = FAST.model_copy(update={"process": 1.0})
    src = ListSource([TranscriptFrame(text="hi", final=True, turn=1)])
    p = Pipeline([src, Quiet("slow-but-talking"), Sink(delay=0.3)], buffer=1, watchdog=limits)
    with anyio.fail_after(15):
        await p.run()


async def test_limits_per_stage_override_the_global_ones():
    p = _pipeline(Quiet("await"), watchdog=FAST.model_copy(update={"process": None}),
                  stage_watchdog={"lm": {"process": 0.5}})
    err = await _fails(p)
    assert err.stage == "lm" and "limit 0.5 s" in str(err)
    assert merge_limits(FAST, {"process": None}).process is None
    assert merge_limits(None, {"setup": 5}).process == WatchdogLimits().process


async def test_system_exit_in_a_stage_names_that_stage_with_its_message():
    err = await _fails(_pipeline(Quiet("exit")))
    assert err.stage == "lm" and "SystemExit" in str(err) and "3" in str(err)


async def test_the_stage_that_failed_first_is_named():
    err = await _fails(_pipeline(Quiet("error")))
    assert err.stage == "lm" and "the model file is corrupt" in str(err)


async def test_a_failing_teardown_fails_the_run():
    err = await _fails(_pipeline(Quiet("teardown-error")))
    assert (err.stage, err.phase) == ("lm", "teardown")
    assert "could not close the device" in str(err)


async def test_cancel_from_outside_ends_the_run_cleanly():
    lm = Quiet("await")
    p = _pipeline(lm, watchdog=WatchdogLimits(process=None))
    async with anyio.create_task_group() as tg:
        async def cancel_soon() -> None:
            await anyio.sleep(0.3)
            p.cancel("interrupted")

        tg.start_soon(cancel_soon)
        with anyio.fail_after(5), pytest.raises(PipelineCancelled) as info:
            await p.run()
    assert info.value.reason == "interrupted"
    assert lm.release.is_set()  # torn down


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        WatchdogLimits(process=0)
    with pytest.raises(ValueError):
        WatchdogLimits.model_validate({"proces": 3})

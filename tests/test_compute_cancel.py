"""``Stage.run_compute`` is safe to cancel: a job runs to its end or never starts (issue 11)."""

from __future__ import annotations

import threading

import anyio
import pytest

from omniframe.stage import Stage

pytestmark = pytest.mark.anyio


class _S(Stage):
    kind = "lm"
    name = "s"


async def _wait_for(flag: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(flag.wait, 10)


async def test_the_job_in_flight_ends_before_the_cancelled_caller_cleans_up():
    stage = _S()
    events: list[str] = []
    started, gate = threading.Event(), threading.Event()

    def job() -> None:
        events.append("start")
        started.set()
        gate.wait(10)
        events.append("end")

    async def caller() -> None:
        try:
            await stage.run_compute(job)
        finally:
            events.append("cleanup")

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await _wait_for(started)
        tg.cancel_scope.cancel()
        threading.Timer(0.2, gate.set).start()
    assert events == ["start", "end", "cleanup"]


async def test_a_job_cancelled_before_it_starts_never_runs():
    stage = _S()
    ran: list[str] = []
    started, gate = threading.Event(), threading.Event()

    def blocker() -> None:
        started.set()
        gate.wait(10)

    async def queued() -> None:
        await stage.run_compute(ran.append, "queued")

    async with anyio.create_task_group() as tg:
        tg.start_soon(stage.run_compute, blocker)
        await _wait_for(started)
        async with anyio.create_task_group() as inner:
            inner.start_soon(queued)  # waits behind the blocker on the one compute thread
            await anyio.sleep(0.05)
            inner.cancel_scope.cancel()
        gate.set()
    with anyio.CancelScope() as scope:  # already cancelled when called
        scope.cancel()
        await stage.run_compute(ran.append, "late")
    await stage.run_compute(lambda: None)  # the compute thread is idle again
    assert ran == []

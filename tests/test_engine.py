"""The generic engine (omniframe/engine.py) with a pure-Python fake model: admission, budget,
routing without cross-talk, and the slot freed in every path (end, error, cancellation at every
point, consumer gone, engine closed)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from omniframe.engine import Engine, EngineClosed, StepResult

pytestmark = pytest.mark.anyio


class Fake:
    """Each request (name, n, cost) emits name:0..name:n-1, one per step (the first at prefill).
    ``fail_at`` = (name, i) raises for that request at its i-th item; ``boom`` raises the step."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.released: list[int] = []
        self.live: set[int] = set()
        self.fail_at: tuple[str, int] | None = None
        self.boom = False
        self.steps: list[tuple[list[str], list[str]]] = []
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None

    def prefill_cost(self, payload):
        return payload[2]

    def step(self, prefill, decode):
        assert not self.lock.locked(), "two steps at once"
        with self.lock:
            if self.gate is not None:
                self.gate.wait(5)
            if self.delay:
                time.sleep(self.delay)
            self.steps.append(([w.payload[0] for w in prefill], [w.payload[0] for w in decode]))
            if self.boom:
                raise RuntimeError("boom")
            out = {}
            for w in prefill:
                assert w.id not in self.live
                self.live.add(w.id)
                w.state = 0
            for w in (*prefill, *decode):
                name, n, _ = w.payload
                i = w.state
                if self.fail_at == (name, i):
                    out[w.id] = StepResult(error=ValueError(f"{name} failed"))
                    continue
                w.state = i + 1
                out[w.id] = StepResult(items=[f"{name}:{i}"], done=i + 1 >= n,
                                       info="end" if i + 1 >= n else None, hold=i == 0)
            return out

    def release(self, work):
        assert work.id in self.live or work.state is None
        self.live.discard(work.id)
        self.released.append(work.id)


async def collect(engine, payload, start=0.0):
    await asyncio.sleep(start)
    async with engine.submit(payload) as req:
        return [x async for x in req], req


@pytest.fixture
def fake():
    return Fake()


async def test_sessions_get_exactly_their_items(fake):
    fake.delay = 0.005  # steps take time, so that the requests overlap
    engine = Engine(fake, capacity=8, device="cpu")
    try:
        runs = await asyncio.gather(*(collect(engine, (f"r{i}", 3 + i, 10), start=0.003 * i)
                                      for i in range(5)))
        for i, (items, req) in enumerate(runs):
            assert items == [f"r{i}:{k}" for k in range(3 + i)]
            assert req.info == "end" and req.finished
        assert engine.active == 0 and not fake.live
        assert sorted(fake.released) == sorted(req.id for _, req in runs)
        # batched: some step decoded several requests together
        assert max(len(d) for _, d in fake.steps) >= 2
    finally:
        engine.close()


async def test_capacity_fifo_and_prefill_budget(fake):
    fake.gate = threading.Event()  # hold the first step so that all five queue
    engine = Engine(fake, capacity=2, prefill_budget=15, device="cpu")
    try:
        tasks = [asyncio.create_task(collect(engine, (f"r{i}", 4, 10))) for i in range(5)]
        await asyncio.sleep(0.05)
        fake.gate.set()
        fake.gate = None
        await asyncio.gather(*tasks)
        order = [name for pre, _ in fake.steps for name in pre]
        assert order == [f"r{i}" for i in range(5)]  # FIFO admission
        assert all(len(pre) <= 1 for pre, _ in fake.steps)  # 10 + 10 > budget 15
        assert all(len(pre) + len(dec) <= 2 for pre, dec in fake.steps)  # capacity
    finally:
        engine.close()


async def test_one_oversized_prompt_is_still_admitted(fake):
    engine = Engine(fake, capacity=4, prefill_budget=5, device="cpu")
    try:
        items, _ = await collect(engine, ("big", 2, 100))
        assert items == ["big:0", "big:1"]
    finally:
        engine.close()


@pytest.mark.parametrize("after", [0, 1, 2, 5])
async def test_cancel_at_every_point_frees_the_slot(after):
    fake = Fake(delay=0.01)
    engine = Engine(fake, capacity=1, device="cpu")
    try:
        other = asyncio.create_task(collect(engine, ("other", 12, 1)))
        await asyncio.sleep(0)

        async def consumer():
            async with engine.submit(("victim", 50, 1)) as req:
                got = []
                async for x in req:
                    got.append(x)
                    if len(got) >= after:
                        await asyncio.sleep(10)  # cancelled here
                return got

        task = asyncio.create_task(consumer())
        await asyncio.sleep(0.005 + 0.012 * after)  # queued (after=0) or running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        items, _ = await other  # the other request is untouched
        assert items == [f"other:{k}" for k in range(12)]
        await asyncio.sleep(0.05)
        assert engine.active == 0 and engine.queued == 0 and not fake.live
    finally:
        engine.close()


async def test_break_and_error_and_step_failure_free_slots(fake):
    engine = Engine(fake, capacity=3, device="cpu")
    try:
        async with engine.submit(("brk", 100, 1)) as req:
            async for x in req:
                if x == "brk:2":
                    break
        assert req.finished and engine.active == 0

        fake.fail_at = ("bad", 2)
        good = asyncio.create_task(collect(engine, ("good", 6, 1)))
        with pytest.raises(ValueError, match="bad failed"):
            await collect(engine, ("bad", 6, 1))
        items, _ = await good
        assert items == [f"good:{k}" for k in range(6)]
        assert engine.active == 0 and not fake.live

        fake.boom = True
        with pytest.raises(RuntimeError, match="boom"):
            await collect(engine, ("x", 3, 1))
        assert engine.active == 0 and not fake.live
        fake.boom = False
        items, _ = await collect(engine, ("after", 2, 1))  # the engine keeps serving
        assert items == ["after:0", "after:1"]
    finally:
        engine.close()


async def test_consumer_exception_inside_block_frees_slot(fake):
    engine = Engine(fake, capacity=1, device="cpu")
    try:
        with pytest.raises(KeyError):
            async with engine.submit(("k", 100, 1)) as req:
                async for _ in req:
                    raise KeyError("consumer bug")
        assert req.finished and engine.active == 0 and not fake.live
    finally:
        engine.close()


async def test_consumer_on_another_loop_thread(fake):
    engine = Engine(fake, capacity=4, device="cpu")
    try:
        box = {}

        def other_loop():
            box["items"] = asyncio.run(collect(engine, ("far", 5, 1)))[0]

        thread = threading.Thread(target=other_loop)
        thread.start()
        near, _ = await collect(engine, ("near", 5, 1))
        await asyncio.to_thread(thread.join, 5)
        assert near == [f"near:{k}" for k in range(5)]
        assert box["items"] == [f"far:{k}" for k in range(5)]
    finally:
        engine.close()


async def test_close_ends_queued_and_running(fake):
    fake.delay = 0.01
    engine = Engine(fake, capacity=1, device="cpu")
    running = asyncio.create_task(collect(engine, ("run", 1000, 1)))
    queued = asyncio.create_task(collect(engine, ("wait", 3, 1)))
    await asyncio.sleep(0.05)
    await asyncio.to_thread(engine.close)
    for t in (running, queued):
        with pytest.raises(EngineClosed):
            await t
    assert not fake.live
    with pytest.raises(EngineClosed):
        await collect(engine, ("late", 1, 1))


async def test_a_held_step_waits_for_resume(fake):
    engine = Engine(fake, capacity=2, device="cpu")
    try:
        async with engine.submit(("h", 4, 1), holds=True) as req:
            got = [await req.__anext__()]
            steps = len(fake.steps)
            await asyncio.sleep(0.02)  # < HOLD_MAX_S: the loop waits for us
            assert len(fake.steps) == steps
            req.resume()
            got += [x async for x in req]
        assert got == ["h:0", "h:1", "h:2", "h:3"]
        # without holds=True the hold flag is ignored: the loop runs on while we wait
        async with engine.submit(("n", 3, 1)) as req:
            got = [await req.__anext__()]
            for _ in range(100):
                if fake.steps[-1][1] or len(fake.steps) > steps + 2:
                    break
                await asyncio.sleep(0.01)
            got += [x async for x in req]
        assert got == ["n:0", "n:1", "n:2"] and not req.holds
    finally:
        engine.close()


async def test_a_stalled_consumer_pauses_only_its_request(fake):
    """Backpressure: a request whose consumer stops taking items is paused after max_backlog
    untaken items (bounded memory) while the others go on; it resumes when the consumer
    catches up, with every item in order; with only stalled requests the loop sleeps."""
    engine = Engine(fake, capacity=4, device="cpu", max_backlog=3)
    try:
        async with engine.submit(("slow", 20, 1)) as slow:
            first = await slow.__anext__()  # the consumer takes one item, then stalls
            fast = await collect(engine, ("fast", 12, 1))
            assert fast[0] == [f"fast:{i}" for i in range(12)]
            # while "fast" ran 12 steps, "slow" was decoded only up to its backlog
            made = [name for _, decode in fake.steps for name in decode if name == "slow"]
            assert len(made) <= 3, fake.steps
            assert slow.backlog == 3
            steps = engine.steps
            await asyncio.sleep(0.2)
            assert engine.steps == steps  # nothing runnable: no busy loop
            rest = [x async for x in slow]
        assert [first, *rest] == [f"slow:{i}" for i in range(20)]
        assert sorted(fake.released) == [1, 2] and not fake.live
    finally:
        engine.close()


async def test_backlog_option_is_checked(fake):
    with pytest.raises(ValueError, match="max_backlog"):
        Engine(fake, max_backlog=0)
    engine = Engine(fake, max_backlog=None, device="cpu")  # unbounded: never paused
    try:
        async with engine.submit(("a", 30, 1)) as req:
            assert await req.wait_released(5)  # ran to its end without a consumer
            assert req.backlog == 30
            assert [x async for x in req] == [f"a:{i}" for i in range(30)]
    finally:
        engine.close()


async def test_a_stalled_request_cancelled_frees_its_slot(fake):
    """A consumer that stops taking items (its request paused by backpressure) and then leaves
    (a client gone): the request is released and its slot freed, nothing hangs."""
    engine = Engine(fake, capacity=1, device="cpu", max_backlog=2)
    try:
        async with engine.submit(("gone", 50, 1)) as req:
            while req.backlog < 2:  # noqa: ASYNC110 (the backlog is the engine's counter)
                await asyncio.sleep(0.005)
            steps = engine.steps
            await asyncio.sleep(0.05)
            assert engine.steps == steps  # paused, not decoding
        assert req.finished and engine.active == 0 and fake.released == [req.id]
        # the freed slot serves the next request in full
        items, _ = await collect(engine, ("next", 3, 1))
        assert items == ["next:0", "next:1", "next:2"]
    finally:
        engine.close()

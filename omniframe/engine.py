"""A step-loop inference engine: many requests (sessions' turns) on one loaded model.

Model-agnostic: it knows slots, a FIFO queue, a step loop and cancellation; what a step
computes is the :class:`EngineModel`'s business (Mini-Omni's is
``omniframe_mini_omni.engine``). Torch is never imported here.

How it runs::

    engine = Engine(model, capacity=8, prefill_budget=512, device="cpu")
    async with engine.submit(payload) as request:   # queued, then admitted to a slot
        async for item in request:                   # what the model emitted for it, step by step
            ...
    # leaving the block (end, error, cancellation, break) frees the slot

* **Slots.** At most ``capacity`` requests are admitted at once; the others wait in FIFO order.
* **Step loop.** One driver thread per engine repeats: release what was cancelled, admit queued
  requests (FIFO) within the **prefill budget** (the sum of their :meth:`EngineModel.prefill_cost`
  may not pass ``prefill_budget``, except that one request is always admitted when none else is,
  so a long prompt is never starved), then one step job that prefills the admitted requests and
  decodes every running one (``EngineModel.step``). Each running request therefore advances one
  step per engine step whatever joins: a new prompt costs the others at most one step's delay of
  ``prefill_budget`` positions. Whole prompts, not chunks: a model may need to see a prompt at
  once (Mini-Omni splices Whisper frames into it, and its tokens stay those of a solo run only
  when the prefill has the solo run's shapes).
* **Compute thread.** On a CPU device the step job runs on the process's one compute thread
  (:meth:`omniframe.stage.Stage.run_compute`'s), with the jobs of every other stage; elsewhere
  on the driver thread.
* **Routing.** What a step emits for a request goes to that request's asyncio queue on the
  consumer's own event loop (sessions may run on different loops/threads).
* **Backpressure.** A request whose consumer has not taken ``max_backlog`` of its items yet
  (its pipeline is blocked downstream: a slow network client, a paused sink) is skipped by the
  decode steps until the consumer catches up; the others go on. Memory per request stays
  bounded, and a stalled session's share of each step goes to the running ones. When only
  stalled requests are left, the loop sleeps until a consumer takes an item.
* **Holds.** A request submitted with ``holds=True`` may have a step's result hold the loop
  (:attr:`StepResult.hold`) until its consumer calls :meth:`Request.resume`, at most
  :data:`HOLD_MAX_S`: the consumer's work on those items (Mini-Omni: the first audio chunk's
  SNAC decode) then reaches the compute thread before the next step.
* **Cancellation.** A request may be cancelled at any point (consumer cancelled, ``break``, an
  exception, the consumer's loop closed): queued, it leaves the queue; admitted, it is dropped at
  the next step boundary, ``EngineModel.release`` runs on the compute thread, and the slot is
  free. Leaving ``async with`` waits (shielded, bounded) until that happened, so a cancelled
  consumer never continues while a step still computes for it. A step that raises for one
  request ends that request only (:class:`StepResult.error`); a step job that raises ends the
  requests of that step with the error; every path releases and frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

log = logging.getLogger(__name__)

RELEASE_WAIT_S = 30.0
"""How long leaving a request waits for the engine to confirm that its slot is free."""


MAX_BACKLOG = 64
"""Default :attr:`Engine.max_backlog`: items a consumer may leave untaken before its request is
paused (Mini-Omni: 64 steps = 5.5 s of speech ahead of the consumer)."""

HOLD_MAX_S = 0.05
"""Longest wait of the step loop for a held request's consumer (:attr:`StepResult.hold`)."""


class EngineClosed(RuntimeError):
    """The engine was closed while the request was queued or running."""


@dataclass
class StepResult:
    """What a step produced for one request.

    Attributes:
        items: zero or more items for the consumer, in order.
        done: the request is finished (after ``items``); its slot is released.
        error: the request failed; the consumer's iteration raises it.
        info: a final value kept on :attr:`Request.info` (e.g. a stop reason).
        hold: for a request submitted with ``holds=True``: the next step waits (at most
            :data:`HOLD_MAX_S`) until the consumer calls :meth:`Request.resume`, so that what
            the consumer queues on the compute thread for these items (the first audio chunk)
            runs before that step.
    """

    items: list[Any] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    info: Any = None
    hold: bool = False


class EngineModel(Protocol):
    """The model-specific part. All methods run on the compute thread, one at a time."""

    def prefill_cost(self, payload: Any) -> int:
        """Positions (tokens x rows) the prefill of ``payload`` computes, for the budget.
        Called on the consumer's thread at submit time: keep it cheap and pure."""
        ...

    def step(self, prefill: Sequence[Work], decode: Sequence[Work]) -> dict[int, StepResult]:
        """Prefill ``prefill`` (set ``work.state``), then decode one step of ``decode``.
        Return a result per request id that has something to report (a request missing from
        the dict got nothing this step and keeps running)."""
        ...

    def release(self, work: Work) -> None:
        """Free what the request holds (caches...). Called once per admitted request."""
        ...


@dataclass(eq=False)
class Work:
    """A request as the model sees it: its payload and the state the model keeps for it."""

    id: int
    payload: Any
    state: Any = None


_END = object()


class Request:
    """One request's handle: an async iterator of the items the engine produces for it."""

    def __init__(self, engine: Engine, work: Work, cost: int, holds: bool = False) -> None:
        self._engine = engine
        self.holds = holds
        self._resume = threading.Event()
        self.work = work
        self.cost = cost
        self.info: Any = None
        self.admitted = False
        self.finished = False  # done, failed or cancelled, and its slot (if any) released
        self._cancelled = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._released = asyncio.Event()
        self.backlog = 0  # items posted, not yet taken by the consumer (engine's lock)

    @property
    def id(self) -> int:
        return self.work.id

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def __aiter__(self) -> Request:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stays ended
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            self._queue.put_nowait(item)
            raise item.error
        self._engine._taken(self)
        return item

    def resume(self) -> None:
        """The consumer has queued its work for a held step's items: the loop may go on."""
        self._resume.set()

    def cancel(self) -> None:
        """Ask the engine to drop this request (thread-safe, idempotent)."""
        self._engine._cancel(self)

    async def wait_released(self, timeout: float = RELEASE_WAIT_S) -> bool:
        """Wait (shielded from cancellation) until the engine has freed this request's slot."""
        # a shielded scope: anyio re-delivers a cancellation at every await of a cancelled
        # scope, so asyncio.shield alone would not wait
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            await self._released.wait()
        return self._released.is_set()

    # ---------------------------------------------------------------- engine side (any thread)
    def _post(self, item: Any) -> bool:
        counted = item is not _END and not isinstance(item, _Failure)
        if counted:
            with self._engine._cond:
                self.backlog += 1
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: the consumer is gone
            if counted:
                with self._engine._cond:
                    self.backlog -= 1
            return False
        return True

    def _mark_released(self) -> None:
        self.finished = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._released.set)


class _ExecutorGone(Exception):
    """The compute thread's executor no longer takes jobs (the interpreter is exiting)."""


@dataclass
class _Failure:
    error: BaseException


class Engine:
    """Slots, a FIFO queue and a step loop around one :class:`EngineModel` (see the module
    docstring).

    Args:
        model: the model-specific part.
        capacity: requests admitted (decoding) at once; the rest queue.
        prefill_budget: prefill positions admitted per step (at least one request per step).
        device: ``cpu...`` runs step jobs on the process's compute thread.
        name: for the driver thread's name and the log.
        gate: a lock the driver thread holds around each step job (never the compute thread:
            a holder may need the compute thread to finish), e.g. a model lock shared with
            code that runs the model outside the engine.
        max_backlog: untaken items after which a request is paused (backpressure); None: never.
    """

    def __init__(self, model: EngineModel, *, capacity: int = 8, prefill_budget: int = 512,
                 device: str = "cpu", name: str = "engine",
                 gate: threading.Lock | None = None,
                 max_backlog: int | None = MAX_BACKLOG) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if prefill_budget < 1:
            raise ValueError(f"prefill_budget must be >= 1, got {prefill_budget}")
        if max_backlog is not None and max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1 or None, got {max_backlog}")
        self.max_backlog = max_backlog
        self.model = model
        self.capacity = capacity
        self.prefill_budget = prefill_budget
        self.device = str(device)
        self.name = name
        self.gate = gate
        self._cond = threading.Condition()
        self._queue: deque[Request] = deque()
        self._active: dict[int, Request] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # engine steps run (for tests and metrics)
        self.step_log: list[tuple[int, int, float]] | None = None
        """Set to a list to record (prefills, decodes, seconds) per step (tests, benchmarks)."""

    # ------------------------------------------------------------------ public
    @property
    def active(self) -> int:
        """Requests holding a slot."""
        with self._cond:
            return len(self._active)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    @contextlib.asynccontextmanager
    async def submit(self, payload: Any, *, holds: bool = False) -> AsyncIterator[Request]:
        """Queue a request; yields its :class:`Request`. Leaving the block cancels it if it is
        still running and waits until its slot is free. ``holds``: honour the model's
        :attr:`StepResult.hold` for it (the consumer calls :meth:`Request.resume`)."""
        request = self._enqueue(payload, holds)
        try:
            yield request
        finally:
            if not request.finished:
                request.cancel()
                await request.wait_released()

    def close(self) -> None:
        """Stop the step loop; queued and running requests end with :class:`EngineClosed`
        (their slots are released by the driver before it exits)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=RELEASE_WAIT_S)

    # ------------------------------------------------------------------ internals
    def _enqueue(self, payload: Any, holds: bool = False) -> Request:
        cost = max(1, int(self.model.prefill_cost(payload)))
        with self._cond:
            if self._closed:
                raise EngineClosed(f"{self.name} is closed")
            request = Request(self, Work(next(self._ids), payload), cost, holds)
            self._queue.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drive, name=f"omniframe-{self.name}",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return request

    def _cancel(self, request: Request) -> None:
        with self._cond:
            if request.finished or request._cancelled:
                return
            request._cancelled = True
            if not request.admitted:
                with contextlib.suppress(ValueError):
                    self._queue.remove(request)
                request._post(_END)
                request._mark_released()
                return
            self._cond.notify_all()  # the driver releases it at the next step boundary

    def _drive(self) -> None:
        try:
            while True:
                with self._cond:
                    while True:
                        if self._closed:
                            break
                        prefill = self._admit()
                        decode = [r for r in self._active.values()
                                  if r not in prefill and not r._cancelled and not self._stalled(r)]
                        cancelled = [r for r in self._active.values() if r._cancelled]
                        if prefill or decode or cancelled:
                            break
                        self._cond.wait()  # nothing queued, or every request is stalled
                    if self._closed:
                        break
                self._run_step(prefill, decode, cancelled)
        except BaseException:  # a bug of the loop itself: fail everyone, never hang them
            log.exception("%s: step loop failed", self.name)
            with self._cond:
                self._closed = True
            raise
        finally:
            self._shutdown()

    def _stalled(self, request: Request) -> bool:
        """Backpressure (lock held): its consumer has too many items untaken."""
        return self.max_backlog is not None and request.backlog >= self.max_backlog

    def _taken(self, request: Request) -> None:
        """The consumer took an item (its loop's thread)."""
        with self._cond:
            request.backlog -= 1
            if self.max_backlog is not None and request.backlog == self.max_backlog - 1:
                self._cond.notify_all()  # it was stalled: it may decode again

    def _admit(self) -> list[Request]:
        """FIFO admission within free slots and the prefill budget (lock held)."""
        admitted: list[Request] = []
        used = 0
        while self._queue and len(self._active) < self.capacity:
            nxt = self._queue[0]
            if admitted and used + nxt.cost > self.prefill_budget:
                break
            self._queue.popleft()
            nxt.admitted = True
            self._active[nxt.id] = nxt
            admitted.append(nxt)
            used += nxt.cost
        return admitted

    def _run_step(self, prefill: list[Request], decode: list[Request],
                  cancelled: list[Request]) -> None:
        def job() -> tuple[dict[int, StepResult] | None, BaseException | None, list[Request]]:
            released = [r for r in cancelled]
            for r in cancelled:
                self._release(r)
            results: dict[int, StepResult] | None = None
            error: BaseException | None = None
            if prefill or decode:
                try:
                    results = self.model.step([r.work for r in prefill], [r.work for r in decode])
                except Exception as exc:  # noqa: BLE001 (reported to the requests of this step)
                    error = exc
                for r in (*prefill, *decode):
                    res = results.get(r.id) if results is not None else None
                    if error is not None or (res is not None and (res.done or res.error)):
                        self._release(r)
                        released.append(r)
            return results, error, released

        t0 = time.perf_counter()
        with self.gate if self.gate is not None else contextlib.nullcontext():
            try:
                results, error, released = self._on_compute(job)
            except _ExecutorGone:
                with self._cond:
                    self._closed = True
                return
        self.steps += 1
        if self.step_log is not None:
            self.step_log.append((len(prefill), len(decode), time.perf_counter() - t0))

        held: list[Request] = []
        for r in (*prefill, *decode):
            if error is not None:
                r._post(_Failure(error))
                continue
            res = (results or {}).get(r.id)
            if res is None:
                continue
            if res.hold and r.holds and not (res.done or res.error):
                r._resume.clear()  # before the items go out: their consumer resumes
                held.append(r)
            for item in res.items:
                if not r._post(item):
                    r.cancel()
                    break
            if res.info is not None:
                r.info = res.info
            if res.error is not None:
                r._post(_Failure(res.error))
            elif res.done:
                r._post(_END)
        with self._cond:
            for r in released:
                self._active.pop(r.id, None)
                if r._cancelled:
                    r._post(_END)
                r._mark_released()
        for r in held:
            if not r._cancelled:
                r._resume.wait(HOLD_MAX_S)

    def _on_compute(self, fn: Any) -> Any:
        """Run ``fn()`` on the compute thread (CPU) or here; _ExecutorGone at interpreter exit."""
        if not self.device.startswith("cpu"):
            return fn()
        from omniframe.stage import _compute_executor

        try:
            future = _compute_executor().submit(fn)
        except RuntimeError as exc:  # "cannot schedule new futures after (interpreter) shutdown"
            raise _ExecutorGone from exc
        return future.result()

    def _release(self, request: Request) -> None:
        try:
            self.model.release(request.work)
        except Exception:  # noqa: BLE001 (the slot is freed whatever release did)
            log.exception("%s: release of request %d failed", self.name, request.id)

    def _shutdown(self) -> None:
        with self._cond:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            active = list(self._active.values())
        for r in queued:
            r._post(_Failure(EngineClosed(f"{self.name} closed")))
            r._mark_released()
        if active:
            def release_all() -> None:
                for r in active:
                    self._release(r)

            try:
                try:
                    self._on_compute(release_all)
                except _ExecutorGone:  # interpreter exit: release here
                    release_all()
            finally:
                with self._cond:
                    for r in active:
                        self._active.pop(r.id, None)
                        r._post(_Failure(EngineClosed(f"{self.name} closed")))
                        r._mark_released()

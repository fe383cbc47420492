"""The pipeline: stages in a chain, connected by bounded anyio memory object streams.

Each edge between two stages has two lanes:

* the data lane, a bounded stream (``buffer`` frames): backpressure, strict order;
* the urgent lane, for :class:`~omniframe.frames.SystemFrame` (interrupt, error), which
  overtakes whatever data is queued.

One task group runs every stage. A stage that raises cancels the rest and the pipeline raises
a :class:`StageError` naming it. End of input travels as an ordered
:class:`~omniframe.frames.EndOfStreamFrame` followed by closing the streams, so everything
produced before it is delivered: the pipeline drains.

An :class:`~omniframe.frames.InterruptFrame` for turn ``n`` (barge-in) makes every stage
downstream of the one that sent it cancel the ``process`` call in flight if it works on an
older turn, drop queued data frames of older turns as they come up, and call
``Stage.interrupt``.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from omniframe.frames import (
    AudioFrame,
    CommitInputFrame,
    DataFrame,
    EndOfStreamFrame,
    EndRetractedFrame,
    ErrorFrame,
    Frame,
    InterruptFrame,
    RespondFrame,
    SpeechEndFrame,
    SpeechStartFrame,
    TranscriptFrame,
    TruncateFrame,
    UpdateOptionsFrame,
)
from omniframe.metrics import MetricsCollector, RunResult, StageMetrics
from omniframe.session import Session
from omniframe.stage import Stage
from omniframe.watchdog import Activity, LoopMonitor, StageStuck, WatchdogLimits, merge_limits

if TYPE_CHECKING:
    from omniframe.config import PipelineConfig

__all__ = [
    "Observer",
    "Pipeline",
    "PipelineCancelled",
    "PipelineError",
    "StageError",
    "StageStuck",
    "build_pipeline",
    "run_pipeline",
]

log = structlog.get_logger("omniframe.pipeline")

HANG_GRACE_S = 2.0
"""After the watchdog fires, how long the run may take to end before ``on_hang`` is called."""


class PipelineError(Exception):
    """A pipeline could not be built or run; the message says why and what to do."""


class StageError(PipelineError):
    """A stage failed while the pipeline ran.

    Attributes:
        stage: the stage's name in the pipeline.
        kind: its kind.
        cause: the original exception (also ``__cause__``).
    """

    def __init__(self, stage: str, kind: str, cause: BaseException, phase: str = "run") -> None:
        self.stage = stage
        self.kind = kind
        self.cause = cause
        self.phase = phase
        self.secondary = False  # True when caused by another stage's failure
        super().__init__(
            f"stage {stage!r} ({kind}) failed during {phase}: "
            f"{type(cause).__name__}: {_message(cause)}"
        )


class PipelineCancelled(PipelineError):
    """The run was cancelled from outside (:meth:`Pipeline.cancel`, Ctrl-C in the CLI).

    Attributes:
        result: the metrics of what ran before the cancellation.
    """

    def __init__(self, result: RunResult, reason: str = "cancelled") -> None:
        self.result = result
        self.reason = reason
        super().__init__(f"the run was {reason}")


def _message(exc: BaseException, limit: int = 2000) -> str:
    """An exception's message for one error line: never empty, never huge."""
    text = str(exc)
    if not text:
        text = repr(exc) if isinstance(exc, SystemExit) else "(no message)"
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    return text


class Observer(Protocol):
    """Sees every frame a stage emits. Called inline, so it must be cheap (O(1), no I/O);
    an observer that writes files should buffer and write from its own task or thread."""

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None: ...


@dataclass
class _Lanes:
    data_tx: ObjectSendStream[Frame]
    data_rx: ObjectReceiveStream[Frame]
    urgent_tx: ObjectSendStream[Frame]
    urgent_rx: ObjectReceiveStream[Frame]
    up_tx: ObjectSendStream[Frame]  # frames sent toward the source, by the receiving stage
    up_rx: ObjectReceiveStream[Frame]
    urgent_sent: int = 0  # urgent frames sent so far; lets the receiver order the lanes


def _lanes(buffer: int) -> _Lanes:
    data_tx, data_rx = anyio.create_memory_object_stream[Frame](buffer)
    urgent_tx, urgent_rx = anyio.create_memory_object_stream[Frame](math.inf)
    # unbounded: a bounded lane each way could deadlock two stages waiting on each other
    up_tx, up_rx = anyio.create_memory_object_stream[Frame](math.inf)
    return _Lanes(data_tx, data_rx, urgent_tx, urgent_rx, up_tx, up_rx)


def update_problem(stage: Stage, options: Mapping[str, Any]) -> str | None:
    """Why ``options`` cannot be applied to the running ``stage`` now, or None."""
    from pydantic import ValidationError

    live = type(stage).live_options
    fixed = sorted(set(options) - set(live))
    if fixed:
        can = ", ".join(sorted(live)) or "none"
        return (f"stage {stage.context.name!r} cannot change {', '.join(map(repr, fixed))} "
                f"while it runs (live options: {can}); change it in the config and restart")
    try:
        type(stage.options).model_validate({**stage.options.model_dump(), **options})
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return f"stage {stage.context.name!r}: invalid options: {errs[:1000]}"
    return None


_USER_SIDE = (AudioFrame, SpeechStartFrame)
"""Frames about the user's input, not the answer: never held for a tentative turn."""


class _Runner:
    """Runs one stage: pulls from its inbox lanes, calls the stage, pushes to its outbox."""

    def __init__(self, stage: Stage, inbox: _Lanes | None, outbox: _Lanes,
                 observers: Sequence[Observer], metrics: StageMetrics,
                 activity: Activity, urgent_activity: Activity,
                 failed: Callable[[StageError], None]) -> None:
        self.stage = stage
        self.activity = activity  # the data loop (or a source's generate)
        self.urgent_activity = urgent_activity  # interrupts
        self.failed = failed
        self.name = stage.context.name
        self.kind = stage.kind
        self.inbox = inbox
        self.outbox = outbox
        self.observers = tuple(observers)
        self.metrics = metrics
        self.min_turn = 0  # data frames of turns 0 < t < min_turn are stale
        self.retracted: dict[int, int] = {}  # preemptive turns retracted: resumed as
        self.gate: Session | None = None  # the first sink holds tentative turns' frames
        self._scope: anyio.CancelScope | None = None
        self._scope_turn = 0
        self._consumed: dict[type, bool] = {}
        self._blocked = 0.0  # time spent waiting on a full outbox while busy
        self.last_phase: str | None = None  # of the last stage call, for errors
        self._urgent_done = 0  # urgent frames fully handled
        self._urgent_progress = anyio.Event()

    def consumes(self, frame: Frame) -> bool:
        cls = type(frame)
        hit = self._consumed.get(cls)
        if hit is None:
            wanted = self.stage.consumes
            hit = self._consumed[cls] = bool(wanted) and issubclass(cls, wanted)
        return hit

    async def emit(self, frame: Frame) -> None:
        if frame.urgent:
            self.outbox.urgent_sent += 1
            self.outbox.urgent_tx.send_nowait(frame)  # unbounded lane: never waits
        else:
            try:
                self.outbox.data_tx.send_nowait(frame)
            except anyio.WouldBlock:
                t0 = time.perf_counter()
                act = self.activity
                act.waiting = True  # the slow one is downstream: not this stage's silence
                try:
                    await self.outbox.data_tx.send(frame)
                finally:
                    act.waiting = False
                self._blocked += time.perf_counter() - t0
        self.activity.ticks += 1  # progress, for the watchdog (and the urgent loop's)
        self.metrics.frames_out += 1
        if self.observers:
            now = time.monotonic()
            for obs in self.observers:
                obs.on_frame(self.name, self.kind, frame, now)

    async def _drive(self, gen: AsyncIterator[Frame], cause: Frame | None, phase: str,
                     activity: Activity | None = None) -> None:
        """Emit everything ``gen`` yields; frames without a turn inherit the cause's."""
        turn = cause.turn if cause is not None else 0
        t0 = time.perf_counter()
        blocked0 = self._blocked
        act = activity or self.activity
        act.phase = phase  # inline Activity.enter: this runs for every frame
        act.ticks += 1
        try:
            async for out in gen:
                if turn and not out.turn:
                    out = dataclasses.replace(out, turn=turn)
                await self.emit(out)
        except BaseException:
            self.last_phase = phase  # for the error: the phase of the call that failed
            # a generator left at a yield (cancelled while its frame was sent) runs its
            # finally blocks now, not whenever it is garbage-collected
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()
            raise
        finally:
            act.phase = None
            self.metrics.busy_s += (time.perf_counter() - t0) - (self._blocked - blocked0)

    async def run(self) -> None:
        self.stage.__dict__["_send_upstream"] = self.send_upstream
        try:
            async with (self.inbox.up_tx if self.inbox is not None else nullcontext()), \
                    anyio.create_task_group() as outer:
                # frames from later stages toward the source, until the next stage is done
                outer.start_soon(self._upstream_loop)
                async with self.outbox.data_tx, self.outbox.urgent_tx:
                    if self.inbox is None:
                        await self._drive(self.stage.generate(), None, "generate")
                        await self.emit(EndOfStreamFrame())
                    else:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._urgent_loop)
                            await self._data_loop()
        except StageError:
            raise
        except (anyio.get_cancelled_exc_class(), KeyboardInterrupt):
            raise
        except BaseException as exc:  # SystemExit and GeneratorExit from a stage are bugs too
            cause = _root_cause(exc)
            if isinstance(cause, StageError):
                raise cause from None
            if isinstance(cause, KeyboardInterrupt | anyio.get_cancelled_exc_class()):
                raise
            phase = self.last_phase or "run"
            err = StageError(self.name, self.kind, cause, phase=phase)
            # the next stage is gone: a consequence of its failure, which it reports
            err.secondary = isinstance(cause, (anyio.BrokenResourceError,
                                               anyio.ClosedResourceError))
            self.failed(err)
            raise err from cause

    async def _data_loop(self) -> None:
        assert self.inbox is not None
        rx = self.inbox.data_rx
        forward = self.stage.forward_consumed  # sinks: True (Stage.__init_subclass__)
        async with rx:
            while True:
                try:
                    frame = rx.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        frame = await rx.receive()
                    except anyio.EndOfStream:
                        break
                except anyio.EndOfStream:
                    break
                self.metrics.frames_in += 1
                # urgent frames sent before this one must take effect first (an interrupt
                # for turn n is handled before the first data frame of turn n)
                target = self.inbox.urgent_sent
                while self._urgent_done < target:
                    await self._urgent_progress.wait()
                turn = frame.turn
                if 0 < turn < self.min_turn and isinstance(frame, DataFrame):
                    self.metrics.dropped += 1
                    continue
                if turn and (self.retracted or self.gate is not None):
                    frame = await self._settled(frame)
                    if frame is None:
                        self.metrics.dropped += 1
                        continue
                if isinstance(frame, EndOfStreamFrame):
                    await self._drive(self.stage.end_of_stream(frame), frame, "end_of_stream")
                    await self.emit(frame)
                elif frame.__class__ is UpdateOptionsFrame and frame.stage == self.name:
                    problem = self.apply_update(frame)  # type: ignore[arg-type]
                    if problem is not None:
                        await self.emit(ErrorFrame(stage=self.name, turn=frame.turn,
                                                   message=problem))
                elif self.consumes(frame):
                    with anyio.CancelScope() as scope:
                        self._scope, self._scope_turn = scope, turn
                        try:
                            await self._drive(self.stage.process(frame), frame, "process")
                        finally:
                            self._scope = None
                    if forward and not scope.cancel_called:
                        await self.emit(frame)
                else:
                    await self.emit(frame)

    async def _settled(self, frame: Frame) -> Frame | None:
        """Preemptive turns: None for a frame of a retracted turn; at the first sink, a frame
        of a tentative turn waits until the VAD confirms (the frame) or retracts it (None).
        The user's side (input audio, the speech start) is never held or dropped: a speech
        start of a retracted turn goes on with the number the speech continued under."""
        turn = frame.turn
        if isinstance(frame, _USER_SIDE):
            while turn in self.retracted:
                turn = self.retracted[turn]
            return frame if turn == frame.turn else dataclasses.replace(frame, turn=turn)
        if turn in self.retracted:
            return None
        gate = self.gate
        if gate is None:
            return frame
        if gate.is_tentative(turn) and not await gate.wait_settled(turn):
            return None
        if gate.is_retracted(turn):
            return None
        if frame.__class__ is SpeechEndFrame and frame.tentative:  # type: ignore[attr-defined]
            frame = dataclasses.replace(frame, tentative=False)  # as without preemption
        return frame

    async def send_upstream(self, frame: Frame) -> None:
        """Send ``frame`` to the stage before this one (the source drops what reaches it)."""
        if self.inbox is None:
            log.debug("upstream frame reached the source", frame=type(frame).__name__)
            return
        # the stages before this one may have ended: then nobody is left to tell
        with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.inbox.up_tx.send_nowait(frame)  # unbounded: never waits

    async def _upstream_loop(self) -> None:
        wanted = self.stage.consumes_upstream
        async with self.outbox.up_rx:
            async for frame in self.outbox.up_rx:
                if wanted and isinstance(frame, wanted):
                    async for out in self.stage.process_upstream(frame):
                        await self.send_upstream(out)
                else:
                    await self.send_upstream(frame)

    def apply_update(self, frame: UpdateOptionsFrame) -> str | None:
        """Change the stage's live options; the problem, if refused."""
        problem = update_problem(self.stage, frame.options)
        if problem is not None:
            return problem
        old = self.stage.options
        self.stage.options = type(old).model_validate({**old.model_dump(), **frame.options})
        self.stage.options_changed(old)
        log.info("options updated", stage=self.name, options=sorted(frame.options))
        return None

    async def _urgent_loop(self) -> None:
        assert self.inbox is not None
        async with self.inbox.urgent_rx:
            async for frame in self.inbox.urgent_rx:
                self.metrics.frames_in += 1
                try:
                    if isinstance(frame, InterruptFrame):
                        if frame.turn > self.min_turn:
                            self.min_turn = frame.turn
                        scope = self._scope
                        if scope is not None and 0 < self._scope_turn < frame.turn:
                            scope.cancel()
                            self.metrics.interrupted += 1
                        await self.emit(frame)  # downstream stops as early as possible
                        await self._drive(self.stage.interrupt(frame), frame, "interrupt",
                                          self.urgent_activity)
                    elif isinstance(frame, EndRetractedFrame):
                        self.retracted[frame.turn] = frame.resumed_as  # type: ignore[attr-defined]
                        scope = self._scope
                        if scope is not None and self._scope_turn == frame.turn:
                            scope.cancel()
                        await self.emit(frame)
                        await self._drive(self.stage.retract(frame), frame, "interrupt",
                                          self.urgent_activity)
                    elif self.consumes(frame):  # e.g. a sink that shows errors
                        await self._drive(self.stage.process(frame), frame, "process",
                                          self.urgent_activity)
                        if self.stage.forward_consumed:
                            await self.emit(frame)
                    else:
                        await self.emit(frame)
                finally:
                    self._urgent_done += 1
                    progress, self._urgent_progress = self._urgent_progress, anyio.Event()
                    progress.set()


@dataclass
class Pipeline:
    """A chain of stage instances, run on one bounded bus.

    Parameters:
        stages: the stages, source first.
        buffer: frames each data lane holds before the sender waits (backpressure).
        observers: extra observers (a :class:`MetricsCollector` is always added; it sends them
            each turn's :class:`~omniframe.frames.MetricsFrame`).
        collect: keep every frame that leaves the last stage in ``RunResult.frames``.
        watchdog: limits for every stage (:class:`~omniframe.watchdog.WatchdogLimits`);
            ``None`` keeps the defaults.
        stage_watchdog: per stage name, the limits it changes (``{"lm": {"process": 300}}``).
        on_hang: called (from a thread) with the error when the watchdog fired but the run
            did not end within :data:`HANG_GRACE_S` (a stage blocks the event loop or a thread
            in code that cannot be interrupted); the CLI prints it and exits. Default: the
            error is logged, and the run ends when the stuck call returns.
        session: the conversation shared by the stages (taken from the stages' context).
    """

    stages: list[Stage]
    buffer: int = 8
    observers: list[Observer] = field(default_factory=list)
    collect: bool = True
    watchdog: WatchdogLimits | None = None
    stage_watchdog: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    on_hang: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if not self.stages:
            raise PipelineError("a pipeline needs at least one stage (a source)")
        if self.buffer < 1:
            raise PipelineError(f"buffer must be at least 1 frame, got {self.buffer}")
        first = self.stages[0]
        if first.kind != "source":
            raise PipelineError(
                f"the first stage must be a source, got {first.context.name!r} ({first.kind})"
            )
        for st in self.stages[1:]:
            if st.kind == "source":
                raise PipelineError(
                    f"only the first stage may be a source; {st.context.name!r} is one too"
                )
        names = [s.context.name for s in self.stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise PipelineError(f"stage names must be unique; repeated: {sorted(dup)}")
        unknown = set(self.stage_watchdog) - set(names)
        if unknown:
            raise PipelineError(f"watchdog limits for stages not in the pipeline: "
                                f"{sorted(unknown)}; stages: {names}")
        from omniframe.chain import check_chain

        check_chain(self.stages)
        self._scope: anyio.CancelScope | None = None
        self._cancel_reason: str | None = None
        self._first_error: StageError | None = None
        self._activities: list[Activity] = []
        self._running = False
        self._lanes: list[_Lanes] | None = None
        self._runners: list[_Runner] | None = None

    @property
    def session(self) -> Session:
        return self.stages[0].context.session

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the run from outside (call it in the run's event loop): stages are cancelled,
        torn down, and :meth:`run` raises :class:`PipelineCancelled`. Safe to call before the
        run starts, or after it ended."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    # ------------------------------------------------------------------ steering
    # Call these from the event loop that runs the pipeline, while it runs (from another
    # thread: anyio.from_thread.run(pipeline.say, "hi", token=...)).

    def _index(self, stage: str | None) -> int:
        if self._lanes is None:
            raise PipelineError("the pipeline is not running: start run() first")
        if stage is None:
            return 1 if len(self.stages) > 1 else 0
        names = [s.context.name for s in self.stages]
        if stage not in names:
            raise PipelineError(f"no stage named {stage!r} in this pipeline; stages: {names}")
        return names.index(stage)

    async def push(self, frame: Frame, *, to: str | None = None) -> None:
        """Send ``frame`` into the running pipeline, to the stage named ``to`` (default: the
        one after the source), as if the stage before it had emitted it: ordered with that
        stage's input (urgent frames overtake it), with backpressure."""
        k = self._index(to)
        if k == 0:
            raise PipelineError("frames cannot be pushed into the source; push to a later "
                                "stage")
        assert self._lanes is not None
        lanes = self._lanes[k - 1]
        try:
            if frame.urgent:
                lanes.urgent_sent += 1
                lanes.urgent_tx.send_nowait(frame)
            else:
                await lanes.data_tx.send(frame)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise PipelineError(f"the pipeline's input to {self.stages[k].context.name!r} "
                                f"has ended (the source finished): nothing more can be "
                                f"pushed") from None

    async def say(self, text: str) -> int:
        """User text input (typed, or a client's text item): a new turn, answered by an LM
        that reads transcripts. Returns the turn's number."""
        turn = self.session.next_turn()
        await self.push(TranscriptFrame(text=text, final=True, turn=turn,
                                        speech_end_ts=time.monotonic()))
        return turn

    async def interrupt(self) -> int:
        """Cancel the answer in flight in every stage (as a barge-in does) and drop what is
        queued of it. Returns the new turn number that the cancellation opened."""
        turn = self.session.next_turn()
        await self.push(InterruptFrame(turn=turn))
        return turn

    async def commit(self) -> None:
        """The user's input is complete: a VAD closes its open turn now (it is answered)."""
        await self.push(CommitInputFrame(turn=self.session.turn))

    async def respond(self, instructions: str | None = None) -> int:
        """Answer now from the conversation so far (LMs with a history), optionally with
        extra ``instructions`` for this answer. Returns the answer's turn."""
        turn = self.session.next_turn()
        await self.push(RespondFrame(turn=turn, instructions=instructions))
        return turn

    async def truncate(self, turn: int, audio_end_s: float) -> None:
        """Only the first ``audio_end_s`` seconds of the answer to ``turn`` were heard: the
        conversation keeps what was heard (the playback sink works out the text)."""
        if audio_end_s < 0:
            raise PipelineError(f"audio_end_s must be >= 0, got {audio_end_s}")
        await self.push(TruncateFrame(turn=turn, audio_end_s=audio_end_s))

    async def update(self, stage: str, **options: Any) -> None:
        """Change live options of a running stage (from the next frame it takes). Refused
        up front, with the reason, when a field cannot change live or a value is invalid."""
        k = self._index(stage)
        problem = update_problem(self.stages[k], options)
        if problem is not None:
            raise PipelineError(problem)
        frame = UpdateOptionsFrame(stage=stage, options=dict(options))
        if k == 0:  # a source has no inbox: apply between two of its frames' awaits
            assert self._runners is not None
            self._runners[0].apply_update(frame)
            return
        await self.push(frame, to=stage)

    def busy(self) -> str:
        """What the stages are doing now, for a message: ``"lm (process, 3.2 s)"``."""
        now = time.monotonic()
        parts = [f"{a.name} ({a.phase}, silent {now - a.since:.1f} s)"
                 for a in self._activities if a.phase is not None and a.phase != "generate"]
        return ", ".join(parts) or "nothing"

    def _failed(self, err: StageError) -> None:
        """Remember the first real failure: the one to report."""
        if self._first_error is None and not err.secondary and self._cancel_reason is None:
            self._first_error = err

    def _limits(self, st: Stage) -> WatchdogLimits:
        return merge_limits(self.watchdog, getattr(st, "watchdog_limits", None),
                            self.stage_watchdog.get(st.context.name))

    async def run(self) -> RunResult:
        """Set up every stage, move frames until the input ends, tear down, return metrics."""
        stage_metrics = {s.context.name: StageMetrics(name=s.context.name, kind=s.kind)
                         for s in self.stages}
        # the one collector; it sends each turn's MetricsFrame to the stages' on_metrics and
        # to the other observers when the turn's end of turn has left the last stage. Last in
        # the list, so the others see that end of turn before the MetricsFrame.
        collector = MetricsCollector(self.stages, stage_metrics=stage_metrics,
                                     observers=self.observers)
        observers: list[Observer] = [*self.observers, collector]
        frames: list[Frame] = []
        acts = {s.context.name: Activity(s.context.name, s.kind, self._limits(s))
                for s in self.stages}
        urgent = {name: Activity(a.name, a.kind, a.limits, source=a) for name, a in acts.items()}
        self._activities = [*acts.values(), *urgent.values()]
        self._first_error = None
        monitor = LoopMonitor(acts, self.stages, self._loop_blocked, self.on_hang,
                              grace=HANG_GRACE_S)
        self._running = True
        t_start = time.monotonic()
        t_run = t_start
        set_up: list[Stage] = []
        teardown_errors: list[StageError] = []
        error: BaseException | None = None
        try:
            monitor.start()
            async with anyio.create_task_group() as outer:
                self._scope = outer.cancel_scope
                if self._cancel_reason is not None:
                    outer.cancel_scope.cancel()
                outer.start_soon(self._watch, monitor, name="watchdog")
                try:
                    for st in self.stages:
                        act = acts[st.context.name]
                        act.enter("setup")
                        try:
                            t0 = time.perf_counter()
                            await st.setup()
                            stage_metrics[st.context.name].setup_s = time.perf_counter() - t0
                        except Exception as exc:
                            err = StageError(st.context.name, st.kind, exc, phase="setup")
                            self._failed(err)
                            raise err from exc
                        finally:
                            act.leave()
                            set_up.append(st)
                    t_run = time.monotonic()
                    lanes = [_lanes(self.buffer) for _ in self.stages]
                    runners = [
                        _Runner(st, lanes[i - 1] if i else None, lanes[i], observers,
                                stage_metrics[st.context.name], acts[st.context.name],
                                urgent[st.context.name], self._failed)
                        for i, st in enumerate(self.stages)
                    ]
                    if len(runners) > 1:  # the first sink holds frames of tentative turns
                        held = next((r for r in runners[1:] if r.kind == "sink"), runners[-1])
                        held.gate = held.stage.context.session
                    self._lanes, self._runners = lanes, runners
                    try:
                        async with anyio.create_task_group() as tg:
                            for r in runners:
                                tg.start_soon(r.run, name=f"stage:{r.name}")
                            tg.start_soon(self._collect, lanes[-1], frames)
                    except BaseExceptionGroup as group:
                        raise _first_stage_error(group) from None
                finally:
                    with anyio.CancelScope(shield=True):
                        teardown_errors = await self._teardown(set_up, acts)
                    outer.cancel_scope.cancel()  # the watchdog's work is done
        except BaseExceptionGroup as group:
            error = _first_stage_error(group)
        except BaseException as exc:
            error = exc
        finally:
            monitor.stop()
            self._scope = None
            self._running = False
            self._lanes, self._runners = None, None
        if self._first_error is not None and (error is None or isinstance(error, StageError)):
            error = self._first_error  # the stage that failed first, not a consequence
        t_end = time.monotonic()
        result = collector.result(
            stages=stage_metrics, wall_s=t_end - t_run, setup_s=t_run - t_start,
            frames=frames if self.collect else None,
        )
        if error is None and teardown_errors:
            error = teardown_errors[0]
        else:
            for err in teardown_errors:
                log.error("teardown failed", stage=err.stage, error=_message(err.cause, 500))
        real = error is not None and (error is self._first_error
                                      or isinstance(error, KeyboardInterrupt | SystemExit))
        if self._cancel_reason is not None and not real:
            # what failed after the cancel is a consequence of it
            raise PipelineCancelled(result, self._cancel_reason) from error
        if error is not None:
            raise error
        return result

    async def _teardown(self, set_up: list[Stage], acts: dict[str, Activity]) -> list[StageError]:
        """Tear down in reverse order, each within its limit; return what failed."""
        errors: list[StageError] = []
        for st in reversed(set_up):
            act = acts[st.context.name]
            limit = act.limits.teardown
            act.enter("teardown")
            t0 = time.monotonic()
            try:
                with anyio.move_on_after(limit if limit is not None else math.inf) as scope:
                    await st.teardown()
                if scope.cancelled_caught:
                    errors.append(StageError(st.context.name, st.kind, act.error(
                        "teardown", time.monotonic() - t0, limit or 0.0), phase="teardown"))
            except Exception as exc:
                errors.append(StageError(st.context.name, st.kind, exc, phase="teardown"))
            finally:
                act.leave()
        return errors

    async def _watch(self, monitor: LoopMonitor) -> None:
        """The in-loop watchdog: beats for the loop monitor, fails the run on a silent stage."""
        while True:
            await anyio.sleep(0.25)
            monitor.beat()
            now = time.monotonic()
            for act in self._activities:
                over = act.overdue(now)
                if over is None:
                    continue
                phase, silent, limit = over
                err = StageError(act.name, act.kind, act.error(phase, silent, limit), phase)
                self._failed(err)
                log.error("stage stuck", stage=act.name, phase=phase, silent_s=round(silent, 1))
                if self.on_hang is not None:  # a stage stuck in a thread may never return
                    timer = threading.Timer(HANG_GRACE_S, self._still_running, (str(err),))
                    timer.daemon = True
                    timer.start()
                raise err

    def _still_running(self, message: str) -> None:
        if self._running and self.on_hang is not None:
            self.on_hang(message)

    def _loop_blocked(self, stage: str, phase: str, err: StageStuck) -> None:
        """From the loop monitor's thread: a stage blocks the event loop past its limit."""
        act = next(a for a in self._activities if a.name == stage)
        self._failed(StageError(stage, act.kind, err, phase))
        log.error("stage blocks the event loop", stage=stage, phase=phase)

    async def _collect(self, lanes: _Lanes, frames: list[Frame]) -> None:
        await lanes.up_tx.aclose()  # nothing comes back from past the last stage
        async def urgent() -> None:
            async with lanes.urgent_rx:
                async for f in lanes.urgent_rx:
                    if self.collect:
                        frames.append(f)
                    if isinstance(f, ErrorFrame):
                        log.warning("stage reported an error", stage=f.stage, message=f.message)

        async with anyio.create_task_group() as tg:
            tg.start_soon(urgent)
            async with lanes.data_rx:
                async for f in lanes.data_rx:
                    if self.collect:
                        frames.append(f)


def _root_cause(exc: BaseException) -> BaseException:
    """Unwrap task-group exception groups to the first non-cancellation leaf."""
    while isinstance(exc, BaseExceptionGroup):
        real = [e for e in exc.exceptions
                if not isinstance(e, anyio.get_cancelled_exc_class())]
        exc = real[0] if real else exc.exceptions[0]
    return exc


def _first_stage_error(group: BaseExceptionGroup) -> BaseException:
    """The error to show the user: the first StageError, else the first real exception."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for e in exc.exceptions:
                walk(e)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if isinstance(exc, StageError) and not exc.secondary:
            return exc
    for exc in leaves:
        if isinstance(exc, StageError):
            return exc
    for exc in leaves:
        if not isinstance(exc, anyio.get_cancelled_exc_class()):
            return exc
    return group


def config_toolbox(cfg: PipelineConfig, source: str | None = None) -> Any:
    """The :class:`~omniframe.tools.Toolbox` of the tools a config lists (None: it lists
    none); a tool that is not registered or is declared wrong is a ConfigError."""
    if not cfg.tools:
        return None
    from omniframe.config import ConfigError
    from omniframe.plugins import get_registry
    from omniframe.tools import build_toolbox

    try:
        return build_toolbox(cfg.tools, get_registry().tools)
    except ValueError as exc:
        raise ConfigError([(f"tools[{i}]", m) for i, m in exc.args[0]], source) from None


def build_pipeline(cfg: PipelineConfig, *, source: str | None = None, session: Any = None,
                   observers: list[Any] | None = None, collect: bool = True,
                   resources: Any = None, on_hang: Callable[[str], None] | None = None
                   ) -> Pipeline:
    """A ready :class:`Pipeline` from a config (:mod:`omniframe.config`): phase 2 of the
    validation (each stage's options, observers, tools), the stages made with one session and
    the process-wide model cache, and the chain check. Problems are a
    :class:`~omniframe.config.ConfigError` naming the YAML path; ``source`` labels it."""
    from omniframe.chain import IncompatibleStages
    from omniframe.config import ConfigError, build_observers, resolve_stages
    from omniframe.frames import ToolResultFrame
    from omniframe.resources import default_resources
    from omniframe.stage import StageContext

    resolved = resolve_stages(cfg, source)
    observers = [*(observers or []), *build_observers(cfg, source)]
    toolbox = config_toolbox(cfg, source)
    session = session or Session()
    resources = resources if resources is not None else default_resources()
    stages = []
    for r in resolved:
        ctx = StageContext(name=r.name, session=session, resources=resources, device=cfg.device,
                           tools=toolbox)
        stages.append(r.cls(r.options, ctx))
    # a stage that names ToolResultFrame (not through a base such as Frame) calls tools
    if toolbox is not None and not any(ToolResultFrame in s.consumes for s in stages):
        raise ConfigError([("tools", "the config lists tools, but no stage of this pipeline "
                                     "calls tools (an LM that consumes ToolResultFrame, such "
                                     "as lm: transformers); remove tools: or use such an LM")],
                          source)
    try:
        limits = {n: spec.watchdog for n, spec in zip(cfg.stage_names(), cfg.pipeline,
                                                       strict=True) if spec.watchdog}
        return Pipeline(stages, buffer=cfg.buffer, observers=observers, collect=collect,
                        watchdog=cfg.watchdog, stage_watchdog=limits, on_hang=on_hang)
    except (IncompatibleStages, PipelineError) as exc:
        raise ConfigError([("pipeline", str(exc))], source) from None


async def run_pipeline(stages: Iterable[Stage], **kwargs: Any) -> RunResult:
    """Shorthand: ``await run_pipeline([source, vad, ...])``."""
    return await Pipeline(list(stages), **kwargs).run()


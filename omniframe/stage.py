"""The Stage base class: what a plugin writes.

A stage is a class with a kind, a name, a pydantic ``Options`` model, the frame types it
``consumes`` and ``produces``, and one async generator::

    class Shout(Stage):
        kind = "lm"
        name = "shout"
        consumes = (TranscriptFrame,)
        produces = (TextDeltaFrame, EndOfTurnFrame)

        class Options(StageOptions):
            suffix: str = "!"

        async def process(self, frame):
            yield TextDeltaFrame(text=frame.text.upper() + self.options.suffix)
            yield EndOfTurnFrame()

The runner calls :meth:`Stage.process` for each frame whose type is in ``consumes``; frames it
does not consume pass through unchanged, in order. Frames a stage yields inherit the turn of
the frame being processed unless they set one. Sources implement :meth:`Stage.generate`
instead. An :class:`~omniframe.frames.InterruptFrame` cancels the ``process`` call in flight
(when it belongs to an older turn) and then calls :meth:`Stage.interrupt`.

Blocking work goes through :meth:`Stage.run_sync` (a worker thread, so the event loop keeps
moving frames); CPU-heavy model calls through :meth:`Stage.run_compute` (the process's one
compute thread on CPU devices). Both are safe to cancel: a job either never starts or runs to
its end before the cancelled caller goes on (so its ``finally`` never overlaps the job).
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import anyio.lowlevel
import anyio.to_thread
import structlog
from pydantic import BaseModel, ConfigDict

from omniframe.frames import (
    EndOfStreamFrame,
    EndRetractedFrame,
    Frame,
    InterruptFrame,
    MetricsFrame,
)

if TYPE_CHECKING:
    from omniframe.session import Session
    from omniframe.tools import Toolbox

__all__ = ["KINDS", "Stage", "StageContext", "StageKind", "StageOptions", "is_kind"]

StageKind = str
"""A stage's kind: a label (an identifier) for listings, default names and docs. Kinds are
open: a plugin may define stages of any kind it needs; what a stage consumes and produces, not
its kind, decides where it may stand (the chain check)."""
KINDS: tuple[str, ...] = ("source", "vad", "encoder", "lm", "processor", "codec", "sink")
"""The well-known kinds, in chain order. ``processor``: a stage that transforms frames mid-chain
(a text filter, a guardrail, a translator). The first stage must be a ``source``."""

_KIND_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_kind(kind: object) -> bool:
    """Whether ``kind`` may be a stage kind: an ASCII identifier (``lm``, ``my_filter``)."""
    return isinstance(kind, str) and _KIND_RE.fullmatch(kind) is not None

T = TypeVar("T")

log = structlog.get_logger("omniframe.stage")

ABANDON_AFTER_S = 10.0
"""How long a cancelled caller waits for its job still in flight before giving up on it."""

_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_io_executor: ThreadPoolExecutor | None = None


def _compute_executor() -> ThreadPoolExecutor:
    """The process-wide single compute thread of :meth:`Stage.run_compute` (made on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omniframe-compute")
        return _executor


def _blocking_executor() -> ThreadPoolExecutor:
    """Worker threads of :meth:`Stage.run_sync` (file I/O, model calls off the CPU)."""
    global _io_executor
    with _executor_lock:
        if _io_executor is None:
            _io_executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="omniframe-io")
        return _io_executor


async def _done(future: Future[Any]) -> None:
    """Wait until ``future`` is done, cancellably, without cancelling it."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another backend (trio): a worker thread waits for us
        await anyio.to_thread.run_sync(wait, [future], abandon_on_cancel=True)
        return
    if not future.done():
        # shield() keeps our cancellation from reaching the job (handled by the caller)
        await asyncio.shield(asyncio.wrap_future(future, loop=loop))


async def _await_job(future: Future[T]) -> T:
    """Wait for a job running in a thread pool; safe to cancel by construction.

    A caller cancelled before its job started cancels the job: it never runs. A caller
    cancelled while its job runs waits, shielded, for the job to end and only then sees the
    cancellation, so its clean-up (``finally``) never overlaps the job. A job still running
    after :data:`ABANDON_AFTER_S` is abandoned with an error in the log: a stuck thread cannot
    be stopped (the pipeline's watchdog names the stage).
    """
    try:
        await _done(future)
    except anyio.get_cancelled_exc_class():
        if not future.cancel():
            with anyio.CancelScope(shield=True), anyio.move_on_after(ABANDON_AFTER_S):
                await _done(future)
            if not future.done():
                log.error("a cancelled job is still running in its thread; abandoned",
                          after_s=ABANDON_AFTER_S)
        raise
    return future.result()


class StageOptions(BaseModel):
    """Base of every stage's options: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StageContext:
    """What a running stage may use besides its options.

    Parameters:
        name: the stage's name in its pipeline (for logs and errors).
        session: the conversation shared by the stages of one pipeline run.
        resources: a process-wide cache, so that many sessions share one loaded model.
        device: the torch device string the user asked for (``"cpu"``, ``"cuda"``, ...).
        tools: the tools the pipeline's config lists (function calling), or None when it
            lists none; an LM that can call tools reads it.
    """

    name: str
    session: Session
    resources: Any = None
    device: str = "cpu"
    tools: Toolbox | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Stage:
    """Base class of every stage. Subclasses set the class attributes and override methods.

    Class attributes:
        kind: a label: one of :data:`KINDS` (``source, vad, encoder, lm, processor, codec,
            sink``) or any identifier a plugin needs. It names the stage by default in configs
            and groups it in listings; it does not change how the bus treats the stage.
        name: the name configs use to pick it (``plugin:`` in YAML), unique within its kind.
        Options: a :class:`StageOptions` subclass.
        consumes: frame types :meth:`process` handles.
        requires: the consumed types that are its main input: the chain check wants at least
            one of them produced upstream. ``None`` (default): ``consumes`` without control and
            system frames (end of turn, end of stream, interrupt, ...) and generic bases;
            ``()``: needs nothing. :meth:`required_inputs` refines it per instance.
        produces: frame types it may emit.
        input_option / output_option: the option that ``--input`` / ``--output`` set.
        output_suffixes: file suffixes this sink writes, to route ``--output``.
        forward_consumed: also pass on each consumed frame after what ``process`` yields
            (a TTS does it so text reaches the sink). Defaults to True for ``kind = "sink"``
            classes (set when the class is defined), so several sinks can chain and the frames
            leave the pipeline; a sink may set it to False. The bus reads only this attribute.
        live_options: the ``Options`` fields that may change while the stage runs
            (:class:`~omniframe.frames.UpdateOptionsFrame`): instructions, voice,
            temperature, thresholds. :meth:`options_changed` is called after a change.
        consumes_upstream: frame types sent toward the source (:meth:`push_upstream`) that
            :meth:`process_upstream` handles; others pass up unchanged.
        watchdog_limits: watchdog limits this stage needs other than the defaults, by phase
            (``{"process": 600}`` for a stage that may think for minutes between outputs);
            see :mod:`omniframe.watchdog`. The config overrides them.
    """

    kind: ClassVar[StageKind]
    name: ClassVar[str]
    Options: ClassVar[type[StageOptions]] = StageOptions
    consumes: ClassVar[tuple[type[Frame], ...]] = ()
    requires: ClassVar[tuple[type[Frame], ...] | None] = None
    produces: ClassVar[tuple[type[Frame], ...]] = ()
    forward_consumed: ClassVar[bool] = False
    input_option: ClassVar[str | None] = None
    output_option: ClassVar[str | None] = None
    output_suffixes: ClassVar[tuple[str, ...]] = ()
    watchdog_limits: ClassVar[Mapping[str, float | None]] = {}
    live_options: ClassVar[frozenset[str]] = frozenset()
    consumes_upstream: ClassVar[tuple[type[Frame], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # sinks re-emit what they consume unless a class of theirs says otherwise
        if getattr(cls, "kind", None) == "sink" and not any(
                "forward_consumed" in vars(c) for c in cls.__mro__ if c is not Stage):
            cls.forward_consumed = True

    def __init__(self, options: StageOptions | dict[str, Any] | None = None,
                 context: StageContext | None = None) -> None:
        if options is None:
            options = {}
        if isinstance(options, dict):
            options = self.Options.model_validate(options)
        elif not isinstance(options, self.Options):
            raise TypeError(
                f"stage {self.name!r} expects {self.Options.__name__}, got "
                f"{type(options).__name__}"
            )
        self.options = options
        if context is None:
            from omniframe.session import Session

            context = StageContext(name=self.name, session=Session())
        self.context = context
        self.log = structlog.get_logger(f"omniframe.{self.kind}").bind(stage=context.name)

    def required_inputs(self) -> tuple[type[Frame], ...]:
        """The frame types of which at least one must reach this stage, for its options (the
        chain check's question). Default: ``requires``, or else ``consumes`` without control,
        system and generic frame types. Override when the options decide, e.g. a model whose
        task reads text or audio."""
        if self.requires is not None:
            return self.requires
        from omniframe.frames import ControlFrame, DataFrame, SystemFrame

        generic = (Frame, DataFrame, ControlFrame, SystemFrame)
        return tuple(t for t in self.consumes
                     if t not in generic and not issubclass(t, (ControlFrame, SystemFrame)))

    # ------------------------------------------------------------------ lifecycle (override)

    async def setup(self) -> None:
        """Load models and open devices. Runs before any frame moves; errors stop the run."""

    async def generate(self) -> AsyncIterator[Frame]:
        """Sources only: yield frames until the input ends (end of stream is added for you)."""
        raise NotImplementedError(f"{type(self).__name__} is a source but has no generate()")
        yield  # pragma: no cover - makes this an async generator

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        """Handle one consumed frame; yield what it produces, as soon as it is ready.

        Data and control frames arrive one at a time, in order. Urgent frames a stage consumes
        (e.g. a sink that shows ``ErrorFrame``) come from the urgent lane and may arrive while
        a data frame is being processed (at one of its awaits)."""
        raise NotImplementedError(f"{type(self).__name__} consumes frames but has no process()")
        yield  # pragma: no cover

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        """Barge-in: forget the answer in flight (buffers, partial state). May yield frames,
        which are sent after the interrupt itself (for example an end of turn)."""
        return
        yield  # pragma: no cover

    async def retract(self, frame: EndRetractedFrame) -> AsyncIterator[Frame]:
        """Preemptive mode: turn ``frame.turn`` was begun early and the user went on speaking.
        The pipeline has already cancelled this stage's work on it and drops its frames;
        forget what is kept for it (the session forgets its messages by itself). Frames
        yielded go on after the retraction."""
        return
        yield  # pragma: no cover

    async def end_of_stream(self, frame: EndOfStreamFrame) -> AsyncIterator[Frame]:
        """The input ended: yield what is still buffered. The end of stream follows."""
        return
        yield  # pragma: no cover

    async def teardown(self) -> None:
        """Release devices and files. Called once, also after errors and cancellation."""

    def on_metrics(self, frame: MetricsFrame) -> None:
        """A turn's metrics, once its end has left the last stage (docs/frames.md). Called
        directly, not through :meth:`process`: keep it cheap, and yield nothing from it."""

    def options_changed(self, old: StageOptions) -> None:
        """Live options changed (``self.options`` is already the new model): recompute what
        setup derived from them. Called between frames, never during :meth:`process`."""

    async def process_upstream(self, frame: Frame) -> AsyncIterator[Frame]:
        """Handle a frame a later stage sent toward the source (a type in
        ``consumes_upstream``); yield what goes on upstream (the frame itself, to pass it on).
        Runs beside :meth:`process`, like the handling of urgent frames."""
        yield frame

    async def push_upstream(self, frame: Frame) -> None:
        """Send ``frame`` toward the source: the stages before this one see it in
        :meth:`process_upstream` (e.g. a sink reporting what was played). Unbounded and
        unordered with respect to the data: keep such frames few and small."""
        send = self.__dict__.get("_send_upstream")
        if send is None:
            raise RuntimeError(f"stage {self.context.name!r} is not running in a pipeline: "
                               f"push_upstream needs one")
        await send(frame)

    # ------------------------------------------------------------------ helpers for stages

    @staticmethod
    async def run_sync(fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn(*args)`` in a worker thread (model calls, file I/O)."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        ctx = contextvars.copy_context()  # as anyio.to_thread does
        return await _await_job(_blocking_executor().submit(ctx.run, fn, *args))

    async def run_compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy ``fn(*args)`` (a model call) on the process's compute thread.

        On a CPU device, the compute of every stage runs on one dedicated thread, one call at
        a time: each torch op already spreads over all cores, and calls from several threads
        give each its own OpenMP pool, whose idle workers spin on the cores the others need
        (an LM step beside a codec chunk ran ~1.8x slower on the 2-core dev machine, and kept
        running slower between chunks). A short job (the first audio chunk) then waits for at
        most the one call in flight. Other devices: as :meth:`run_sync`.
        """
        if not str(self.context.device).startswith("cpu"):
            return await self.run_sync(fn, *args)
        await anyio.lowlevel.checkpoint_if_cancelled()
        return await _await_job(_compute_executor().submit(fn, *args))

    async def shared_model(self, key: Any, loader: Callable[[], T]) -> T:
        """``loader()``'s result from the process-wide model cache (``context.resources``),
        loaded on the compute thread (:meth:`run_compute`) the first time ``key`` is asked
        for, so that loading and warm-up run on the same thread as inference."""
        resources = self.context.resources
        if resources is None:
            from omniframe.resources import default_resources

            resources = default_resources()
        return await self.run_compute(resources.get, key, loader)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """A JSON-ready description: kind, name, consumes, produces, options schema."""
        return {
            "kind": cls.kind,
            "name": cls.name,
            "consumes": [t.__name__ for t in cls.consumes],
            "produces": [t.__name__ for t in cls.produces],
            "doc": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind}:{self.name} as {self.context.name!r}>"

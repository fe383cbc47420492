"""A test kit for stage authors (core and third-party alike).

* :func:`run_stage`: feed frames through one stage, get what it emits, grouped per input
  frame (:class:`StageRun`). The input may be a script: frames, :class:`WaitFor` (until the
  stage has emitted something, or has finished what it was sent) and :class:`Sleep`, so that
  an interruption comes when the data before it is being processed, as in a live session.
* :func:`run_frames`: feed frames through a chain of stages, get the :class:`RunResult`.
* :class:`ListSource`: a source that yields given frames (optionally paced).
* :func:`speech_like`, :func:`tone`: deterministic test signals without any model;
  :func:`espeak`: real speech with a known transcript (needs espeak-ng).

An interruption test with a script::

    run = await run_stage(stage, [
        TranscriptFrame(text="tell me a story", turn=1),
        WaitFor(TextDeltaFrame),        # the answer has started ...
        InterruptFrame(turn=2),         # ... when the user talks over it
        WaitFor(),                      # both handled
    ])
    answer, interrupt = run.by_input
    assert not any(isinstance(f, EndOfTurnFrame) and f.reason == "completed" for f in answer)

Without the ``WaitFor`` before it, the interrupt (an urgent frame) would overtake the
transcript on its way in, and the stage would drop the transcript unanswered: nothing tested.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import anyio

from omniframe.frames import AudioFrame, ControlFrame, EndOfStreamFrame, Frame, SystemFrame
from omniframe.metrics import RunResult
from omniframe.pipeline import Pipeline, StageError
from omniframe.session import Session
from omniframe.stage import Stage, StageContext, StageOptions

__all__ = [
    "ListSource",
    "Sleep",
    "StageRun",
    "Step",
    "WaitFor",
    "WaitTimeout",
    "audio_frames",
    "espeak",
    "interrupt_when",
    "make_stage",
    "run_frames",
    "run_stage",
    "speech_like",
    "tone",
]


class ListSource(Stage):
    """Yields the frames it was given, optionally ``interval`` seconds apart."""

    kind = "source"
    name = "list"
    produces = (Frame,)

    class Options(StageOptions):
        interval: float = 0.0

    def __init__(self, frames: Sequence[Frame], interval: float = 0.0,
                 context: StageContext | None = None) -> None:
        super().__init__({"interval": interval}, context or StageContext(name="source",
                                                                          session=Session()))
        self._frames = list(frames)

    async def generate(self) -> AsyncIterator[Frame]:
        for f in self._frames:
            if self.options.interval:
                await anyio.sleep(self.options.interval)
            yield f


def make_stage(cls: type[Stage], name: str | None = None, session: Session | None = None,
               **options: Any) -> Stage:
    """Instantiate a stage class with validated options and a fresh context."""
    ctx = StageContext(name=name or cls.kind, session=session or Session())
    return cls(options, ctx)


async def run_frames(stages: Sequence[Stage], frames: Sequence[Frame], *,
                     interval: float = 0.0, buffer: int = 8, timeout: float = 60.0,
                     observers: list[Any] | None = None) -> RunResult:
    """Run ``frames`` through ``stages`` (no source needed); fail instead of hanging."""
    session = stages[0].context.session if stages else Session()
    src = ListSource(frames, interval, StageContext(name="source", session=session))
    with anyio.fail_after(timeout):
        return await Pipeline([src, *stages], buffer=buffer, observers=observers or []).run()


# --------------------------------------------------------------------------- scripted input


@dataclass(frozen=True)
class WaitFor:
    """A script step: hold the next input back until the stage under test has emitted
    ``count`` frames matching ``match`` since the last input was sent. ``match`` is a frame
    type, a tuple of types, or a predicate on a frame. Without ``match``: until the stage has
    finished processing every input sent so far (its ``process``/``interrupt`` calls returned).
    Raises :class:`WaitTimeout` after ``timeout`` seconds."""

    match: type[Frame] | tuple[type[Frame], ...] | Callable[[Frame], bool] | None = None
    count: int = 1
    timeout: float = 30.0

    def matches(self, frame: Frame) -> bool:
        m = self.match
        if m is None:
            return True
        if isinstance(m, type | tuple):
            return isinstance(frame, m)
        return bool(m(frame))

    def describe(self) -> str:
        m = self.match
        if m is None:
            return "WaitFor(): the stage to finish processing its input"
        what = (m.__name__ if isinstance(m, type) else
                " or ".join(t.__name__ for t in m) if isinstance(m, tuple) else
                getattr(m, "__name__", repr(m)))
        return f"WaitFor({what}, count={self.count})"


@dataclass(frozen=True)
class Sleep:
    """A script step: wait ``seconds`` before sending the next input."""

    seconds: float


Step: TypeAlias = Frame | WaitFor | Sleep
"""One item of a :func:`run_stage` script."""


class WaitTimeout(TimeoutError):
    """A :class:`WaitFor` step was not satisfied in time; the message says what the stage had
    emitted since the last input."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _DataMark(ControlFrame):
    """Sent after each ordered input: it comes out of the stage once that input is done."""

    n: int


@dataclass(frozen=True, slots=True, kw_only=True)
class _UrgentMark(SystemFrame):
    """Sent after each urgent input (on the urgent lane), for the same purpose."""

    n: int


_MARKS = (_DataMark, _UrgentMark)


class StageRun(list[Frame]):
    """What :func:`run_stage` returns: a list of every frame the stage emitted, in order,
    without markers and the final end of stream (so old ``out[0]``, ``len(out)`` code works),
    plus:

    Attributes:
        frames: the same frames, as a plain list.
        inputs: the frames the script sent, in order.
        by_input: for each input, what the stage emitted while handling it (``process`` for
            ordered frames, ``interrupt`` and the frame itself for urgent ones); for ordered
            input only, ``by_input`` concatenated is ``frames``. ``None`` for a stage that
            consumes every frame type (the kit's markers cannot pass it).
        at_end: what it emitted after the last input, at the end of the stream (flushes).
        result: the pipeline's :class:`RunResult` (metrics).
    """

    def __init__(self, frames: Sequence[Frame], *, inputs: Sequence[Frame],
                 by_input: list[list[Frame]] | None, at_end: Sequence[Frame],
                 result: RunResult) -> None:
        super().__init__(frames)
        self.inputs = list(inputs)
        self.by_input = by_input
        self.at_end = list(at_end)
        self.result = result

    @property
    def frames(self) -> list[Frame]:
        return list(self)

    def output_of(self, frame: Frame) -> list[Frame]:
        """What the stage emitted for the input ``frame`` (the same object the script sent)."""
        if self.by_input is None:
            raise ValueError("this stage consumes every frame type: no per-input grouping")
        for f, out in zip(self.inputs, self.by_input, strict=True):
            if f is frame:
                return out
        raise KeyError(f"{frame!r} was not an input of this run")


class _Recorder:
    """Observes the stage under test: what it emits, from which of its tasks, and when an input
    is done (its marker came out)."""

    def __init__(self, stage_name: str) -> None:
        self.stage_name = stage_name
        self.log: list[tuple[Frame, int]] = []  # (frame, id of the emitting task)
        self.inputs: list[Frame] = []
        self.marks_sent = 0
        self.marks_seen = 0
        self.sent_at = 0  # len(log) when the last input was sent
        self._changed = anyio.Event()

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
        if stage != self.stage_name:
            return
        self.log.append((frame, anyio.get_current_task().id))
        if isinstance(frame, _MARKS):
            self.marks_seen += 1
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def since_sent(self) -> list[Frame]:
        return [f for f, _ in self.log[self.sent_at:] if not isinstance(f, _MARKS)]

    def done(self, step: WaitFor) -> bool:
        if step.match is None:
            return self.marks_seen >= self.marks_sent
        return sum(1 for f in self.since_sent() if step.matches(f)) >= step.count

    async def wait(self, step: WaitFor) -> None:
        try:
            with anyio.fail_after(step.timeout):
                while not self.done(step):
                    await self._changed.wait()
        except TimeoutError:
            got = ", ".join(type(f).__name__ for f in self.since_sent()) or "nothing"
            raise WaitTimeout(
                f"{step.describe()} timed out after {step.timeout:g} s; since the last input "
                f"({type(self.inputs[-1]).__name__ if self.inputs else 'none'}) stage "
                f"{self.stage_name!r} emitted: {got}"
            ) from None

    def group(self) -> tuple[list[Frame], list[list[Frame]], list[Frame]]:
        """(frames, by_input, at_end) from the log; see :class:`StageRun`."""
        tasks = {type(f): t for f, t in reversed(self.log) if isinstance(f, _MARKS)}
        data_task, urgent_task = tasks.get(_DataMark), tasks.get(_UrgentMark)
        data_in = [k for k, f in enumerate(self.inputs) if not f.urgent]
        urgent_in = [k for k, f in enumerate(self.inputs) if f.urgent]
        groups: list[list[Frame]] = [[] for _ in self.inputs]
        frames: list[Frame] = []
        at_end: list[Frame] = []
        d = u = 0
        for f, task in self.log:
            if isinstance(f, _DataMark):
                d += 1
                continue
            if isinstance(f, _UrgentMark):
                u += 1
                continue
            if isinstance(f, EndOfStreamFrame):
                continue
            frames.append(f)
            urgent = (task == urgent_task if urgent_task is not None
                      else data_task is not None and task != data_task)
            lane, i = (urgent_in, u) if urgent else (data_in, d)
            (groups[lane[i]] if i < len(lane) else at_end).append(f)
        return frames, groups, at_end


class _ScriptSource(Stage):
    """Sends a script's frames, waits and sleeps; a marker after each frame when ``marks``."""

    kind = "source"
    name = "script"
    produces = (Frame,)

    def __init__(self, steps: Sequence[Step], recorder: _Recorder, marks: bool,
                 context: StageContext) -> None:
        super().__init__({}, context)
        self.steps = list(steps)
        self.recorder = recorder
        self.marks = marks

    async def generate(self) -> AsyncIterator[Frame]:
        rec = self.recorder
        for step in self.steps:
            if isinstance(step, Sleep):
                await anyio.sleep(step.seconds)
            elif isinstance(step, WaitFor):
                await rec.wait(step)
            else:
                rec.inputs.append(step)
                rec.sent_at = len(rec.log)
                yield step
                if self.marks:
                    rec.marks_sent += 1
                    n = len(rec.inputs)
                    yield _UrgentMark(n=n) if step.urgent else _DataMark(n=n)


async def run_stage(stage: Stage, script: Sequence[Step], *,
                    timeout: float = 60.0) -> StageRun:
    """Run one stage over a script: frames, sent in order, and :class:`WaitFor` /
    :class:`Sleep` steps between them. A plain list of frames works as before (everything is
    sent at once; urgent frames then overtake the data). Returns a :class:`StageRun`: the list
    of every frame the stage emitted (without the final end of stream), grouped per input in
    ``by_input``. A :class:`WaitFor` that times out raises :class:`WaitTimeout`; the whole run
    fails after ``timeout`` seconds."""
    steps = list(script)
    for step in steps:
        if not isinstance(step, Frame | WaitFor | Sleep):
            raise TypeError(f"a script holds frames, WaitFor and Sleep, not {step!r}")
    wanted = stage.consumes
    marks = not any(issubclass(m, wanted) for m in _MARKS) if wanted else True
    if not marks and any(isinstance(s, WaitFor) and s.match is None for s in steps):
        raise ValueError(f"stage {stage.context.name!r} consumes every frame type, so WaitFor() "
                         f"cannot tell when it is done; wait for a frame type instead")
    session = stage.context.session
    recorder = _Recorder(stage.context.name)
    src = _ScriptSource(steps, recorder, marks, StageContext(name="source", session=session))
    try:
        with anyio.fail_after(timeout):
            result = await Pipeline([src, stage], observers=[recorder], collect=False).run()
    except StageError as exc:
        if isinstance(exc.cause, WaitTimeout):
            raise exc.cause from None
        raise
    frames, groups, at_end = recorder.group()
    return StageRun(frames, inputs=recorder.inputs, by_input=groups if marks else None,
                    at_end=at_end if marks else [], result=result)


# ------------------------------------------------------------------------------- signals


def tone(seconds: float, freq: float = 220.0, sample_rate: int = 16000,
         amplitude: float = 0.3) -> Any:
    """A sine tone, float32."""
    import numpy as np

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def speech_like(pattern: Sequence[tuple[str, float]], sample_rate: int = 16000,
                seed: int = 0) -> Any:
    """Concatenate ``("speech"|"silence", seconds)`` parts: speech is an amplitude-modulated
    harmonic tone with a little noise, silence is very low noise. Deterministic."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts = []
    for what, seconds in pattern:
        n = int(seconds * sample_rate)
        if what == "speech":
            t = np.arange(n) / sample_rate
            f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            voice = sum(np.sin(k * phase) / k for k in range(1, 6))
            env = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2
            x = 0.25 * env * voice + 0.01 * rng.standard_normal(n)
        elif what == "silence":
            x = 0.0005 * rng.standard_normal(n)
        else:
            raise ValueError(f"pattern part must be 'speech' or 'silence', got {what!r}")
        parts.append(x.astype(np.float32))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def audio_frames(samples: Any, sample_rate: int = 16000, frame_ms: float = 20.0,
                 live: bool = False) -> list[AudioFrame]:
    """Cut samples into AudioFrames of ``frame_ms`` (the last one may be shorter).
    ``live`` marks them as arriving at the speed of speech (barge-in applies)."""
    n = max(1, int(sample_rate * frame_ms / 1000))
    return [
        AudioFrame(samples=samples[i:i + n], sample_rate=sample_rate, pts=i / sample_rate,
                   live=live)
        for i in range(0, len(samples), n)
    ]


def espeak(text: str, voice: str = "en-us", rate: int = 160, sample_rate: int = 16000,
           pitch: int = 50) -> Any:
    """Speak ``text`` with espeak-ng; float32 mono at ``sample_rate``. Raises RuntimeError
    with an install hint if espeak-ng is missing."""
    import numpy as np
    import soundfile as sf

    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(out), text],
                       check=True, capture_output=True)
        data, sr = sf.read(out, dtype="float32", always_2d=False)
    if data.ndim > 1:
        data = data.mean(axis=1)
    if sr != sample_rate:
        from omniframe.audio import resample

        data = resample(data, sr, sample_rate)
    return np.ascontiguousarray(data, dtype=np.float32)


@dataclass
class Interrupted:
    """What :func:`interrupt_when` saw: the exit status, the seconds from the signal to the
    exit, and everything the process printed (stdout and stderr together)."""

    code: int
    elapsed: float
    output: str


def interrupt_when(cmd: Sequence[str], ready: str | Callable[[str], bool], *,
                   delay: float = 0.0, sig: int = signal.SIGINT, cwd: str | Path | None = None,
                   env: dict[str, str] | None = None, ready_timeout: float = 120.0,
                   exit_timeout: float = 30.0) -> Interrupted:
    """Start ``cmd``, send ``sig`` (Ctrl-C) ``delay`` seconds after its output shows
    ``ready`` (a substring, or a predicate on all the output so far), and time its exit.
    Fails (AssertionError, with the output) if it never gets ready or ends before the signal;
    the process is killed whatever happens."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=cwd, env=env)
    assert proc.stdout is not None
    chunks: list[str] = []
    seen = threading.Event()
    is_ready = ready if callable(ready) else (lambda out: ready in out)

    def read() -> None:  # raw reads: a marker need not end a line ("agent: ..." streams)
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        while data := os.read(fd, 4096):
            chunks.append(data.decode(errors="replace"))
            if not seen.is_set() and is_ready("".join(chunks)):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + ready_timeout
        while not seen.wait(0.1):
            if is_ready("".join(chunks)):  # a predicate on the world, not the output
                break
            assert proc.poll() is None, f"ended before it was ready:\n{''.join(chunks)[-3000:]}"
            assert time.monotonic() < deadline, f"never ready:\n{''.join(chunks)[-3000:]}"
        time.sleep(delay)
        assert proc.poll() is None, f"ended before the signal:\n{''.join(chunks)[-3000:]}"
        t0 = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(exit_timeout)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    reader.join(5)
    return Interrupted(code, elapsed, "".join(chunks))

"""A test kit for stage authors (core and third-party alike).

* :func:`run_stage`: feed frames through one stage, get what it emits.
* :func:`run_frames`: feed frames through a chain of stages, get the :class:`RunResult`.
* :class:`ListSource`: a source that yields given frames (optionally paced).
* :func:`speech_like`, :func:`tone`: deterministic test signals without any model;
  :func:`espeak`: real speech with a known transcript (needs espeak-ng).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio

from omniframe.frames import AudioFrame, EndOfStreamFrame, Frame
from omniframe.metrics import RunResult
from omniframe.pipeline import Pipeline
from omniframe.session import Session
from omniframe.stage import Stage, StageContext, StageOptions

__all__ = [
    "ListSource",
    "audio_frames",
    "espeak",
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


async def run_stage(stage: Stage, frames: Sequence[Frame], *, timeout: float = 60.0) -> list[Frame]:
    """Run one stage over ``frames``; return every frame that came out of it (without the
    final end-of-stream frame)."""
    result = await run_frames([stage], frames, timeout=timeout)
    assert result.frames is not None
    return [f for f in result.frames if not isinstance(f, EndOfStreamFrame)]


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

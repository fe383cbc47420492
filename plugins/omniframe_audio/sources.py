"""Audio sources: a wav/flac file (or several in a row), a synthetic demo signal, a microphone.

All three produce :class:`~omniframe.frames.AudioFrame` of ``frame_ms`` each (the last one may
be shorter), float32 mono at ``sample_rate``, with ``pts`` counting seconds from the start of
the stream (silence the source adds included).
"""

from __future__ import annotations

import queue
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
import numpy as np
from pydantic import Field, field_validator, model_validator

from omniframe.audio import AudioError, read_audio, to_mono
from omniframe.frames import AudioFrame
from omniframe.stage import Stage, StageOptions
from omniframe_audio.devices import AudioDeviceError, import_sounddevice, pick_device

__all__ = ["FileSource", "MicSource", "SynthSource", "frame_length"]

Rate = Annotated[int, Field(ge=1000, le=384_000, description="samples per second")]
FrameMs = Annotated[float, Field(gt=0, le=10_000, description="frame length in milliseconds")]


def frame_length(sample_rate: int, frame_ms: float) -> int:
    """Samples per frame; an :class:`AudioError` if ``frame_ms`` is shorter than a sample."""
    n = int(round(sample_rate * frame_ms / 1000.0))
    if n < 1:
        raise AudioError(
            f"frame_ms={frame_ms} is shorter than one sample at {sample_rate} Hz; "
            f"use frame_ms >= {1000.0 / sample_rate:.3f}"
        )
    return n


def _check_frame(sample_rate: int | None, frame_ms: float) -> None:
    if sample_rate is not None:
        frame_length(sample_rate, frame_ms)


class _ArraySource(Stage):
    """Shared by the file and synth sources: cut one array into paced frames."""

    kind = "source"
    produces = (AudioFrame,)

    _samples: Any = None
    _rate: int = 16000

    async def generate(self) -> AsyncIterator[AudioFrame]:
        samples, rate = self._samples, self._rate
        n = frame_length(rate, self.options.frame_ms)  # type: ignore[attr-defined]
        realtime = bool(self.options.realtime)  # type: ignore[attr-defined]
        t0: float | None = None
        for start in range(0, len(samples), n):
            end = min(start + n, len(samples))
            if realtime:
                # A live microphone delivers a frame when its last sample is captured:
                # schedule against the start so sleeps that overshoot do not add up.
                if t0 is None:
                    t0 = time.monotonic()
                delay = t0 + end / rate - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
            yield AudioFrame(samples=samples[start:end], sample_rate=rate, pts=start / rate,
                             live=realtime)


class FileSource(_ArraySource):
    """Audio from wav/flac/ogg files, resampled and downmixed to mono ``sample_rate``.

    ``path`` may be a list: the files play one after another with ``gap_s`` of silence
    between them (multi-turn and barge-in tests). ``start_silence_s`` of silence comes first
    and ``tail_silence_s`` last, so a VAD can close the final turn. ``realtime`` paces the
    frames at the speed of speech, standing in for a live microphone.
    """

    name = "file"
    input_option = "path"

    class Options(StageOptions):
        path: Path | list[Path] | None = Field(
            None, description="a wav/flac/ogg file, or a list of files played in a row")
        sample_rate: Rate | None = Field(
            16000, description="output rate; null keeps the first file's rate")
        frame_ms: FrameMs = 20.0
        realtime: bool = Field(False, description="pace frames at wall-clock speed")
        tail_silence_s: float = Field(1.0, ge=0, le=3600)
        start_silence_s: float = Field(0.0, ge=0, le=3600)
        gap_s: float = Field(1.0, ge=0, le=3600, description="silence between listed files")

        @field_validator("path")
        @classmethod
        def _nonempty(cls, v: Path | list[Path] | None) -> Path | list[Path] | None:
            if isinstance(v, list) and not v:
                raise ValueError("path is an empty list; give at least one audio file")
            return v

        @model_validator(mode="after")
        def _frame(self) -> FileSource.Options:
            _check_frame(self.sample_rate, self.frame_ms)
            return self

    @property
    def paths(self) -> list[Path]:
        p = self.options.path  # type: ignore[attr-defined]
        return [] if p is None else list(p) if isinstance(p, list) else [p]

    async def setup(self) -> None:
        opts = self.options
        paths = self.paths
        if not paths:
            raise AudioError(
                "the file source has no input: set options.path (a wav/flac file, or a list "
                "of files) or pass --input FILE"
            )
        rate: int | None = opts.sample_rate  # type: ignore[attr-defined]
        clips = []
        for p in paths:
            clip, rate = await self.run_sync(read_audio, p, rate)
            clips.append(clip)
        assert rate is not None
        frame_length(rate, opts.frame_ms)  # type: ignore[attr-defined]

        def silence(seconds: float) -> Any:
            return np.zeros(int(round(seconds * rate)), dtype=np.float32)

        parts = [silence(opts.start_silence_s)]  # type: ignore[attr-defined]
        for i, clip in enumerate(clips):
            if i:
                parts.append(silence(opts.gap_s))  # type: ignore[attr-defined]
            parts.append(clip)
        parts.append(silence(opts.tail_silence_s))  # type: ignore[attr-defined]
        samples = np.concatenate(parts).astype(np.float32, copy=False)
        samples.setflags(write=False)  # frames are views: keep them immutable
        self._samples, self._rate = samples, int(rate)
        self.log.debug("input_loaded", files=[str(p) for p in paths], sample_rate=rate,
                       seconds=round(len(samples) / rate, 3))


PatternPart = tuple[Literal["speech", "silence"], Annotated[float, Field(gt=0, le=3600)]]


class SynthSource(_ArraySource):
    """A deterministic speech-like demo signal (no model, no file, no torch).

    ``pattern`` lists ``[speech|silence, seconds]`` parts (see
    :func:`omniframe.testing.speech_like`)."""

    name = "synth"

    class Options(StageOptions):
        pattern: list[PatternPart] = Field(
            default_factory=lambda: [("silence", 0.5), ("speech", 1.5), ("silence", 1.0)],
            min_length=1,
        )
        sample_rate: Rate = 16000
        frame_ms: FrameMs = 20.0
        realtime: bool = False
        seed: int = 0

        @model_validator(mode="after")
        def _frame(self) -> SynthSource.Options:
            _check_frame(self.sample_rate, self.frame_ms)
            return self

    async def setup(self) -> None:
        from omniframe.testing import speech_like

        opts = self.options
        samples = speech_like(opts.pattern, sample_rate=opts.sample_rate,  # type: ignore[attr-defined]
                              seed=opts.seed)  # type: ignore[attr-defined]
        if not len(samples):
            raise AudioError("the synth pattern is shorter than one sample; lengthen its parts")
        samples.setflags(write=False)
        self._samples, self._rate = samples, int(opts.sample_rate)  # type: ignore[attr-defined]


class MicSource(Stage):
    """A live microphone through sounddevice (``pip install 'omniframe[mic]'``).

    ``device`` is an index or part of a name (default: the system's default input).
    ``max_seconds`` stops after that much audio (otherwise it runs until cancelled)."""

    kind = "source"
    name = "mic"
    produces = (AudioFrame,)

    class Options(StageOptions):
        device: int | str | None = None
        sample_rate: Rate = 16000
        frame_ms: FrameMs = 20.0
        channels: int = Field(1, ge=1, le=64, description="channels to record (downmixed)")
        max_seconds: float | None = Field(None, gt=0)

        @model_validator(mode="after")
        def _frame(self) -> MicSource.Options:
            _check_frame(self.sample_rate, self.frame_ms)
            return self

    _sd: Any = None
    _device: int = 0
    _device_rate: int = 16000

    async def setup(self) -> None:
        opts = self.options
        sd = import_sounddevice("the mic source")
        try:
            devices = list(sd.query_devices())
            try:
                default = int(sd.default.device[0])
            except (TypeError, ValueError, IndexError):
                default = None
        except Exception as exc:  # PortAudio errors
            raise AudioDeviceError(f"cannot list audio devices: {exc}") from None
        self._device = pick_device(devices, opts.device, "input", default)  # type: ignore[attr-defined]
        rate = int(opts.sample_rate)  # type: ignore[attr-defined]
        try:
            sd.check_input_settings(device=self._device, channels=opts.channels,  # type: ignore[attr-defined]
                                    samplerate=rate, dtype="float32")
        except Exception:
            # The device cannot record at this rate: record at its own and resample.
            rate = int(devices[self._device].get("default_samplerate") or 48000)
            try:
                sd.check_input_settings(device=self._device, channels=opts.channels,  # type: ignore[attr-defined]
                                        samplerate=rate, dtype="float32")
            except Exception as exc:
                name = devices[self._device].get("name", "?")
                raise AudioDeviceError(
                    f"input device {self._device} ({name}) cannot record "
                    f"{opts.channels} channel(s) at {opts.sample_rate} or {rate} Hz: {exc}"  # type: ignore[attr-defined]
                ) from None
        self._sd, self._device_rate = sd, rate
        self.log.info("mic_opened", device=self._device,
                      name=devices[self._device].get("name"), device_rate=rate)

    async def generate(self) -> AsyncIterator[AudioFrame]:
        from omniframe_audio.resampling import StreamResampler

        opts = self.options
        out_rate = int(opts.sample_rate)  # type: ignore[attr-defined]
        n_out = frame_length(out_rate, opts.frame_ms)  # type: ignore[attr-defined]
        block = frame_length(self._device_rate, opts.frame_ms)  # type: ignore[attr-defined]
        rs = StreamResampler(self._device_rate, out_rate)
        q: queue.Queue[tuple[Any, float]] = queue.Queue(maxsize=500)
        log = self.log

        def callback(indata: Any, frames: int, t: Any, status: Any) -> None:
            if status:
                log.warning("mic_status", status=str(status))
            try:
                q.put_nowait((indata.copy(), time.monotonic()))
            except queue.Full:
                log.warning("mic_overflow", detail="the pipeline is not keeping up")

        def get() -> tuple[Any, float] | None:
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                return None

        pending = np.zeros(0, dtype=np.float32)
        produced = 0
        limit = None if opts.max_seconds is None else int(opts.max_seconds * out_rate)  # type: ignore[attr-defined]
        stream = self._sd.InputStream(device=self._device, channels=opts.channels,  # type: ignore[attr-defined]
                                      samplerate=self._device_rate, blocksize=block,
                                      dtype="float32", callback=callback)
        with stream:
            while limit is None or produced < limit:
                item = await anyio.to_thread.run_sync(get, abandon_on_cancel=True)
                if item is None:
                    continue
                data, ts = item
                pending = np.concatenate([pending, rs.push(to_mono(data))])
                while len(pending) >= n_out and (limit is None or produced < limit):
                    chunk, pending = pending[:n_out], pending[n_out:]
                    yield AudioFrame(samples=chunk, sample_rate=out_rate,
                                     pts=produced / out_rate, ts=ts, live=True)
                    produced += n_out


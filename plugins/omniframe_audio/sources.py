"""Audio sources: a wav/flac file (or several in a row), a synthetic demo signal, a microphone.

All three produce :class:`~omniframe.frames.AudioFrame` of ``frame_ms`` each (the last one may
be shorter), float32 mono at ``sample_rate``, with ``pts`` counting seconds from the start of
the stream (silence the source adds included).

One rule for broken samples, applied where audio enters, once: a source refuses NaN or
infinite samples with an :class:`~omniframe.audio.AudioError` naming the file (or device) and
the time of the first bad sample. The file source checks in ``setup``, before any later stage
loads its model; later stages can rely on finite audio and do not check again.

Files are read and resampled in blocks (:data:`BLOCK_S` of input at a time, through
:class:`~omniframe_audio.resampling.StreamResampler`), so memory does not grow with the file:
a two-hour recording plays with a few MB, not the GB its decoded samples would take.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
import numpy as np
from pydantic import Field, field_validator, model_validator

from omniframe.audio import AudioError, to_mono
from omniframe.frames import AudioFrame
from omniframe.stage import Stage, StageOptions
from omniframe_audio.devices import AudioDeviceError, import_sounddevice, pick_device

__all__ = ["AudioInput", "FileSource", "MicSource", "SynthSource", "frame_length",
           "open_input", "read_blocks"]

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


BLOCK_S = 2.0
"""Seconds of input the file source reads (and resamples) at a time."""
MIN_INPUT_RATE = 1000
MAX_INPUT_RATE = 768_000
_FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")  # the only encodings that can hold NaN or Inf


@dataclass(frozen=True)
class AudioInput:
    """An audio file's header, checked (see :func:`open_input`)."""

    path: Path
    rate: int
    frames: int
    channels: int
    subtype: str

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


def _where(path: Path) -> str:
    return repr(str(path))


def open_input(path: str | Path) -> AudioInput:
    """Check that ``path`` is an audio file this source can play, from its header only.

    :class:`AudioError` names the file and the problem: missing, a folder, empty, not audio
    (or a format libsndfile does not read), no samples, or a sample rate no recording has
    (a broken header)."""
    import soundfile as sf

    p = Path(path)
    if not p.exists():
        raise AudioError(f"audio file {_where(p)} does not exist")
    if p.is_dir():
        raise AudioError(f"{_where(p)} is a folder, not an audio file")
    if not p.is_file():  # a FIFO would block the header read forever
        raise AudioError(f"{_where(p)} is not a regular file (a device, pipe or socket); the "
                         f"file source reads it twice (checks, then playback): save the audio "
                         f"to a file first")
    if p.stat().st_size == 0:
        raise AudioError(f"audio file {_where(p)} is empty (0 bytes)")
    try:
        info = sf.info(str(p))
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError
        raise AudioError(
            f"cannot decode {_where(p)}: {str(exc).rstrip('. ')}. Supported: wav, flac, ogg, "
            f"mp3 (libsndfile); convert other formats with ffmpeg -i in.m4a -ar 16000 out.wav"
        ) from None
    rate, frames, channels = int(info.samplerate), int(info.frames), int(info.channels)
    if not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
        raise AudioError(
            f"{_where(p)} says its sample rate is {rate} Hz, which no recording has (expected "
            f"{MIN_INPUT_RATE}..{MAX_INPUT_RATE} Hz): its header is broken. Re-export it, e.g. "
            f"ffmpeg -i in.wav -ar 16000 out.wav")
    if channels < 1:
        raise AudioError(f"{_where(p)} has {channels} channels; re-export it")
    if frames <= 0:
        raise AudioError(f"audio file {_where(p)} has no samples")
    return AudioInput(p, rate, frames, channels, str(info.subtype))


_BLOCK_SAMPLES = 1 << 21  # at most this many samples (8 MB as float32) read at a time


def _block_frames(src: AudioInput, block_s: float) -> int:
    """Frames per read: ``block_s`` of audio, fewer for files with very many channels."""
    return max(1024, min(int(block_s * src.rate), _BLOCK_SAMPLES // src.channels))


def _blocks(src: AudioInput, block_frames: int) -> Iterator[Any]:
    """The file's samples as mono float32 blocks of ``block_frames`` (the last shorter)."""
    import soundfile as sf

    try:
        with sf.SoundFile(str(src.path)) as f:
            while True:
                data = f.read(block_frames, dtype="float32", always_2d=True)
                if not len(data):
                    return
                yield to_mono(data)
    except AudioError:
        raise
    except Exception as exc:  # a read error in the middle of the file
        raise AudioError(f"cannot decode {_where(src.path)}: {str(exc).rstrip('. ')}; the "
                         f"file is damaged. Re-export it") from None


def check_finite(src: AudioInput) -> None:
    """Refuse NaN/Inf samples, naming the time of the first (float encodings only: integer
    PCM cannot hold them). Reads the file once in blocks, without keeping it."""
    if src.subtype not in _FLOAT_SUBTYPES:
        return
    block = _block_frames(src, BLOCK_S)
    done = 0
    for x in _blocks(src, block):
        bad = ~np.isfinite(x)
        if bad.any():
            i = done + int(np.argmax(bad))
            what = "NaN" if np.isnan(x[i - done]) else "infinite"
            raise AudioError(
                f"{_where(src.path)} has {what} samples, the first at {i / src.rate:.3f} s "
                f"(sample {i}): the file is damaged or was written from a failed computation. "
                f"Fix or re-export it")
        done += len(x)


def read_blocks(src: AudioInput, rate: int, block_s: float = BLOCK_S) -> Iterator[Any]:
    """The file as mono float32 at ``rate``, in blocks: read ``block_s`` of input at a time
    and resample it with :class:`StreamResampler`, whose output over the whole file equals
    resampling the whole file at once (:func:`omniframe.audio.resample`)."""
    from omniframe_audio.resampling import StreamResampler

    block = _block_frames(src, block_s)
    rs = None if src.rate == rate else StreamResampler(src.rate, rate)
    for x in _blocks(src, block):
        y = x if rs is None else rs.push(x)
        if len(y):
            yield y
    if rs is not None:
        tail = rs.flush()
        if len(tail):
            yield tail


class _ArraySource(Stage):
    """Shared by the file and synth sources: cut a stream of sample pieces into paced frames."""

    kind = "source"
    produces = (AudioFrame,)

    _samples: Any = None
    _rate: int = 16000
    _blocking = False  # True: pieces() blocks (reads files), so it runs in a worker thread

    def pieces(self) -> Iterator[Any]:
        """The stream, as float32 mono pieces of any length (default: one array)."""
        yield self._samples

    async def generate(self) -> AsyncIterator[AudioFrame]:
        rate = self._rate
        n = frame_length(rate, self.options.frame_ms)  # type: ignore[attr-defined]
        realtime = bool(self.options.realtime)  # type: ignore[attr-defined]
        it = self.pieces()
        try:
            async for frame in self._frames(it, n, rate, realtime):
                yield frame
        finally:
            close = getattr(it, "close", None)  # a generator: closes the file being read
            if close is not None:
                with contextlib.suppress(ValueError):  # a read abandoned in its thread
                    close()

    async def _frames(self, it: Iterator[Any], n: int, rate: int,
                      realtime: bool) -> AsyncIterator[AudioFrame]:
        t0: float | None = None
        pending = np.zeros(0, dtype=np.float32)
        start = 0  # index of pending[0] in the stream
        done = object()
        while True:
            piece = await self.run_sync(next, it, done) if self._blocking else next(it, done)
            last = piece is done
            if not last:
                pending = np.concatenate([pending, piece]) if len(pending) else piece
            while len(pending) >= n or (last and len(pending)):
                chunk = pending[:n].copy()
                chunk.setflags(write=False)  # frames are immutable
                pending = pending[n:]
                end = start + len(chunk)
                if realtime:
                    # A live microphone delivers a frame when its last sample is captured:
                    # schedule against the start so sleeps that overshoot do not add up.
                    if t0 is None:
                        t0 = time.monotonic()
                    delay = t0 + end / rate - time.monotonic()
                    if delay > 0:
                        await anyio.sleep(delay)
                yield AudioFrame(samples=chunk, sample_rate=rate, pts=start / rate,
                                 live=realtime)
                start = end
            if last:
                return


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

    _blocking = True
    _inputs: tuple[AudioInput, ...] = ()

    async def setup(self) -> None:
        opts = self.options
        paths = self.paths
        if not paths:
            raise AudioError(
                "the file source has no input: set options.path (a wav/flac file, or a list "
                "of files) or pass --input FILE"
            )
        inputs = []
        for p in paths:  # every file is checked before anything plays or any model loads
            src = await self.run_sync(open_input, p)
            await self.run_sync(check_finite, src)
            inputs.append(src)
        rate = int(opts.sample_rate or inputs[0].rate)  # type: ignore[attr-defined]
        frame_length(rate, opts.frame_ms)  # type: ignore[attr-defined]
        self._inputs, self._rate = tuple(inputs), rate
        o = opts
        seconds = (o.start_silence_s + sum(i.seconds for i in inputs)  # type: ignore[attr-defined]
                   + o.gap_s * (len(inputs) - 1) + o.tail_silence_s)  # type: ignore[attr-defined]
        self.log.debug("input_opened", files=[str(p) for p in paths], sample_rate=rate,
                       seconds=round(seconds, 3))

    def pieces(self) -> Iterator[Any]:
        opts = self.options
        rate = self._rate

        def silence(seconds: float) -> Iterator[Any]:  # in blocks: up to an hour is allowed
            n, block = int(round(seconds * rate)), int(BLOCK_S * rate)
            for start in range(0, n, block):
                yield np.zeros(min(block, n - start), dtype=np.float32)

        yield from silence(opts.start_silence_s)  # type: ignore[attr-defined]
        for i, src in enumerate(self._inputs):
            if i:
                yield from silence(opts.gap_s)  # type: ignore[attr-defined]
            got = 0
            for block in read_blocks(src, rate):
                got += len(block)
                yield block
            want = int(round(src.frames * rate / src.rate))
            if got < want:
                self.log.warning("input_shorter_than_header", path=str(src.path),
                                 seconds=round(got / rate, 3),
                                 header_seconds=round(src.seconds, 3))
        yield from silence(opts.tail_silence_s)  # type: ignore[attr-defined]


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
                mono = to_mono(data)
                if not np.isfinite(mono).all():  # the sources' one rule (module docstring)
                    i = int(np.argmax(~np.isfinite(mono)))
                    raise AudioError(
                        f"input device {self._device} delivered NaN or infinite samples at "
                        f"{(rs.samples_in + i) / self._device_rate:.3f} s: the device or its "
                        f"driver is broken; pick another with options.device")
                pending = np.concatenate([pending, rs.push(mono)])
                while len(pending) >= n_out and (limit is None or produced < limit):
                    chunk, pending = pending[:n_out], pending[n_out:]
                    yield AudioFrame(samples=chunk, sample_rate=out_rate,
                                     pts=produced / out_rate, ts=ts, live=True)
                    produced += n_out


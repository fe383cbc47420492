"""Sinks: a WAV file (written incrementally), a speaker, text to stdout or JSONL, and null.

The audio sinks (wav, speaker) track what has been played. ``realtime`` (always on for the
speaker) plays like a loudspeaker: a chunk starts when the previous one has finished, and it
leaves the sink (the moment metrics count as "heard") when it starts. On a barge-in
(:class:`~omniframe.frames.InterruptFrame` of a newer turn) playback stops at once: the part of
the answer that was not played yet is cut (from the file too), and
``session.truncate(turn, heard)`` records the text of the chunks fully or partly played
(:attr:`OutputAudioFrame.text`; a partly played chunk contributes the same share of its words).
Without ``realtime`` everything written counts as heard. Either way the sink then sends a
:class:`PlaybackStoppedFrame` with the seconds of that answer it played (written), which the
metrics report as the turn's ``audio out`` instead of all the audio the answer produced.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TextIO

import anyio
import numpy as np
from pydantic import Field

from omniframe.audio import AudioError
from omniframe.frames import (
    ControlFrame,
    EndOfStreamFrame,
    EndOfTurnFrame,
    ErrorFrame,
    Frame,
    InterruptFrame,
    OutputAudioFrame,
    SpeechEndFrame,
    SpeechStartFrame,
    TextDeltaFrame,
    TranscriptFrame,
    TruncateFrame,
)
from omniframe.stage import Stage, StageOptions
from omniframe_audio.devices import import_sounddevice, pick_device
from omniframe_audio.resampling import StreamResampler
from omniframe_audio.wavfile import WavWriter

__all__ = ["NullSink", "PlaybackStoppedFrame", "SpeakerSink", "TextSink", "WavSink",
           "heard_prefix"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaybackStoppedFrame(ControlFrame):
    """An audio sink stopped playing the answer to ``turn`` at a barge-in.

    Parameters:
        played_s: seconds of that answer the sink played (wrote) before it stopped; the
            metrics' ``audio out`` of the turn (:class:`omniframe.metrics.TurnMetrics`).
        heard: the text of what was played, where the chunks carried text.
    """

    played_s: float
    heard: str | None = None

def heard_prefix(text: str, fraction: float) -> str:
    """The first ``fraction`` of ``text``'s words (whole words only, leading spaces kept)."""
    if fraction >= 1.0:
        return text
    tokens = re.findall(r"\s*\S+", text)
    k = int(max(0.0, fraction) * len(tokens))
    return "".join(tokens[:k])


@dataclass
class _Chunk:
    start: float  # monotonic time its playback began
    end: float
    text: str | None
    offset: int  # index of its first sample in the output
    n: int


class _PlaybackSink(Stage):
    """Shared by the wav and speaker sinks: resampling, pacing, barge-in bookkeeping."""

    kind = "sink"
    consumes = (OutputAudioFrame, EndOfTurnFrame, TruncateFrame)
    requires = (OutputAudioFrame,)  # an end of turn alone plays nothing
    lead_s: ClassVar[float] = 0.0  # write this long before the previous chunk ends

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rate: int | None = self.options.sample_rate  # type: ignore[attr-defined]
        self._rs: StreamResampler | None = None
        self._answer_turn = 0
        self._chunks: list[_Chunk] = []
        self._past: dict[int, list[_Chunk]] = {}  # the last answers' chunks, by turn
        self._ended: set[int] = set()
        self._play_end = 0.0
        self._written = 0

    # ------------------------------------------------------------ output (override)

    @property
    def realtime(self) -> bool:
        return True

    def _open(self, rate: int) -> None:
        """Open the output at ``rate`` (called once, before the first write)."""

    def _write(self, samples: Any) -> None:
        """Output samples now (quick: must not block the event loop for long)."""
        raise NotImplementedError

    def _cut(self, keep: int) -> None:
        """Playback stopped: drop output after the first ``keep`` samples."""

    # ------------------------------------------------------------------- helpers

    def _convert(self, frame: OutputAudioFrame) -> Any:
        x = np.asarray(frame.samples, dtype=np.float32)
        if x.ndim != 1:
            raise AudioError(f"OutputAudioFrame samples must be mono (n,), got {x.shape}")
        if self._rate is None:
            self._rate = int(frame.sample_rate)
        if self._written == 0 and not self._chunks:
            self._open(self._rate)
        if frame.sample_rate == self._rate:
            if self._rs is not None:  # the rate changed back: finish the old stream first
                x = np.concatenate([self._rs.flush(), x])
                self._rs = None
            return x
        if self._rs is None or self._rs.src_rate != frame.sample_rate:
            head = self._rs.flush() if self._rs is not None else np.zeros(0, np.float32)
            self._rs = StreamResampler(int(frame.sample_rate), self._rate)
            return np.concatenate([head, self._rs.push(x)])
        return self._rs.push(x)

    def _emit(self, samples: Any, text: str | None, now: float) -> None:
        assert self._rate is not None
        dur = len(samples) / self._rate
        start = max(now, self._play_end) if self.realtime else now
        self._chunks.append(_Chunk(start, start + dur, text, self._written, len(samples)))
        if len(samples):
            self._write(samples)
        self._written += len(samples)
        self._play_end = start + dur if self.realtime else now

    def _flush_resampler(self) -> None:
        if self._rs is not None:
            tail = self._rs.flush()
            self._rs = None
            if len(tail):
                self._write(tail)
                self._written += len(tail)
                if self._chunks:
                    c = self._chunks[-1]
                    c.n += len(tail)
                    c.end += len(tail) / (self._rate or 1)
                    self._play_end = max(self._play_end, c.end)

    async def _new_answer(self, turn: int) -> None:
        self._flush_resampler()
        gap = float(getattr(self.options, "gap_s", 0.0) or 0.0)
        if gap and self._written and self._rate:
            silence = np.zeros(int(round(gap * self._rate)), dtype=np.float32)
            self._write(silence)
            self._written += len(silence)
        if self._answer_turn and self._chunks:  # kept for a later truncate of that answer
            self._past[self._answer_turn] = self._chunks
            while len(self._past) > 8:
                self._past.pop(next(iter(self._past)))
        self._answer_turn = turn
        self._chunks = []

    # ------------------------------------------------------------------ stage API

    def _truncate(self, frame: TruncateFrame) -> None:
        """The user heard the first ``audio_end_s`` of that answer: keep that text."""
        chunks = self._chunks if frame.turn == self._answer_turn else self._past.get(frame.turn)
        if not chunks or self._rate is None:
            self.log.warning("truncate: no audio of that answer here", turn=frame.turn)
            return
        end = chunks[0].offset + frame.audio_end_s * self._rate
        heard: list[str] = []
        for c in chunks:
            if c.offset + c.n <= end:
                heard.append(c.text or "")
            elif c.offset < end:
                heard.append(heard_prefix(c.text or "", (end - c.offset) / c.n))
        if any(c.text is not None for c in chunks):
            self.context.session.truncate(frame.turn, "".join(heard))

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if isinstance(frame, TruncateFrame):
            self._truncate(frame)
            return
        if isinstance(frame, EndOfTurnFrame):
            self._ended.add(frame.turn)
            if frame.turn == self._answer_turn:
                self._flush_resampler()
            return
        assert isinstance(frame, OutputAudioFrame)
        if frame.turn != self._answer_turn:
            await self._new_answer(frame.turn)
        samples = self._convert(frame)
        if self.realtime:
            wait = self._play_end - self.lead_s - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)  # an interrupt cancels this: the chunk is never played
        # No await between here and the write: an interrupt sees the chunk or not at all.
        self._emit(samples, frame.text, time.monotonic())
        return
        yield  # pragma: no cover - makes this an async generator

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        m = self._answer_turn
        if not m or m >= frame.turn:
            return
        now = time.monotonic()
        self._answer_turn = 0
        chunks, self._chunks = self._chunks, []
        if self._rs is not None:
            self._rs.reset()
            self._rs = None
        if m in self._ended and (not self.realtime or self._play_end <= now):
            return  # the whole answer was played before the user spoke
        heard: list[str] = []
        cut: int | None = None
        for c in chunks:
            if not self.realtime or c.end <= now:
                heard.append(c.text or "")
            elif c.start <= now:
                frac = (now - c.start) / (c.end - c.start) if c.end > c.start else 1.0
                heard.append(heard_prefix(c.text or "", frac))
                cut = c.offset + int(frac * c.n)
            else:
                cut = c.offset if cut is None else cut
                break
        if cut is not None:
            self._cut(cut)
            self._written = cut
        self._play_end = now
        played_s = (self._written - chunks[0].offset) / (self._rate or 1) if chunks else 0.0
        text_known = any(c.text is not None for c in chunks)
        if text_known:
            self.context.session.truncate(m, "".join(heard))
        self.log.info("playback_interrupted", turn=m, by_turn=frame.turn,
                      played_s=round(played_s, 3),
                      heard="".join(heard) if text_known else None)
        yield PlaybackStoppedFrame(turn=m, played_s=played_s,
                                   heard="".join(heard) if text_known else None)

    async def end_of_stream(self, frame: EndOfStreamFrame) -> AsyncIterator[Frame]:
        self._flush_resampler()
        if self.realtime:
            wait = self._play_end - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)  # let the last chunk finish playing
        return
        yield  # pragma: no cover


class WavSink(_PlaybackSink):
    """Writes the agent's speech to a 16-bit WAV file, readable at every moment of the run.

    ``sample_rate`` (default: the first chunk's) resamples everything to one rate. ``gap_s``
    of silence separates answers to different turns. ``realtime`` simulates a loudspeaker
    (see the module docstring), so that barge-in has something to cut."""

    name = "wav"
    output_option = "path"
    output_suffixes = (".wav",)

    class Options(StageOptions):
        path: Path | None = Field(None, description="the WAV file to write")
        sample_rate: int | None = Field(None, ge=1000, le=384_000,
                                        description="null: the first chunk's rate")
        realtime: bool = Field(False, description="play at wall-clock speed, like a speaker")
        gap_s: float = Field(0.0, ge=0, le=60, description="silence between turns' answers")
        fsync: bool = Field(False, description="persist every write to disk (power loss)")

    _writer: WavWriter | None = None

    @property
    def realtime(self) -> bool:
        return bool(self.options.realtime)  # type: ignore[attr-defined]

    @property
    def path(self) -> Path:
        p = self.options.path  # type: ignore[attr-defined]
        if p is None:
            raise AudioError("the wav sink has no output file: set options.path or pass "
                             "--output FILE.wav")
        return Path(p)

    async def setup(self) -> None:
        path = self.path
        if path.is_dir():
            raise AudioError(f"the wav sink's path {str(path)!r} is a folder; give a file name "
                             f"such as {str(path / 'answer.wav')!r}")
        if self._rate is not None:
            self._open(self._rate)

    def _open(self, rate: int) -> None:
        if self._writer is None:
            self._writer = WavWriter(self.path, rate,
                                     fsync=bool(self.options.fsync))  # type: ignore[attr-defined]
            self.log.debug("wav_opened", path=str(self.path), sample_rate=rate)

    def _write(self, samples: Any) -> None:
        assert self._writer is not None
        self._writer.write(samples)

    def _cut(self, keep: int) -> None:
        if self._writer is not None:
            self._writer.truncate(keep)

    async def teardown(self) -> None:
        if self._writer is None:
            try:  # leave a valid (empty) file, so later steps find one
                self._open(self._rate or 16000)
                self.log.warning("wav_empty", path=str(self.path),
                                 detail="no audio reached the wav sink")
            except AudioError as exc:
                self.log.warning("wav_not_written", error=str(exc))
        if self._writer is not None:
            self._writer.close()
            self.log.debug("wav_closed", path=str(self.path),
                           seconds=round(self._writer.duration, 3))


class SpeakerSink(_PlaybackSink):
    """Plays the agent's speech through sounddevice (``pip install 'omniframe[mic]'``)."""

    name = "speaker"
    lead_s = 0.05  # keep the device fed: write slightly before the previous chunk ends

    class Options(StageOptions):
        device: int | str | None = None
        sample_rate: int | None = Field(None, ge=1000, le=384_000,
                                        description="null: the first chunk's rate")

    _sd: Any = None
    _stream: Any = None
    _device: int = 0

    async def setup(self) -> None:
        sd = import_sounddevice("the speaker sink")
        try:
            devices = list(sd.query_devices())
            try:
                default = int(sd.default.device[1])
            except (TypeError, ValueError, IndexError):
                default = None
        except Exception as exc:
            from omniframe_audio.devices import AudioDeviceError

            raise AudioDeviceError(f"cannot list audio devices: {exc}") from None
        self._device = pick_device(devices, self.options.device, "output", default)  # type: ignore[attr-defined]
        self._sd = sd

    def _open(self, rate: int) -> None:
        if self._stream is None:
            self._stream = self._sd.OutputStream(device=self._device, samplerate=rate,
                                                 channels=1, dtype="float32")
            self._stream.start()

    def _write(self, samples: Any) -> None:
        self._stream.write(np.ascontiguousarray(samples, dtype=np.float32).reshape(-1, 1))

    def _cut(self, keep: int) -> None:
        if self._stream is not None:  # drop what the device still buffers
            self._stream.abort()
            self._stream.start()

    async def teardown(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None


def _open_text(path: Path) -> TextIO:
    if path.is_dir():
        raise AudioError(f"the text sink's path {str(path)!r} is a folder; give a file "
                         f"name such as {str(path / 'events.jsonl')!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in teardown
    except OSError as exc:
        raise AudioError(f"cannot write {str(path)!r}: {exc.strerror or exc}; choose a "
                         f"writable path") from None


class TextSink(Stage):
    """Prints the conversation as it happens, on stdout or into a JSONL file.

    On stdout: ``user: ...`` / ``agent: ...`` lines, the answer streamed as it is decoded.
    With a ``.jsonl`` path: one JSON record per event, with ``event``, ``turn``, ``ts``
    (monotonic), ``t`` (seconds since the sink started) and the event's fields. A ``.txt``
    path gets the stdout format."""

    kind = "sink"
    name = "text"
    consumes = (TranscriptFrame, TextDeltaFrame, EndOfTurnFrame, ErrorFrame,
                SpeechStartFrame, SpeechEndFrame)
    # the conversation, or the VAD's events; ends of turn or errors alone print nothing
    requires = (TranscriptFrame, TextDeltaFrame, SpeechStartFrame, SpeechEndFrame)
    output_option = "path"
    output_suffixes = (".jsonl", ".txt")

    class Options(StageOptions):
        path: Path | None = Field(None, description="null: stdout")
        format: Literal["auto", "text", "jsonl"] = Field(
            "auto", description="auto: jsonl for .jsonl files, else text")
        partial: bool = Field(False, description="also show partial transcripts")

    _out: TextIO | None = None
    _own: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._agent_open = 0  # turn whose "agent: " line is open
        self._agent_shown = 0  # the last turn whose "agent: " line was closed
        self._t0 = time.monotonic()

    @property
    def jsonl(self) -> bool:
        fmt = self.options.format  # type: ignore[attr-defined]
        if fmt != "auto":
            return fmt == "jsonl"
        p = self.options.path  # type: ignore[attr-defined]
        return p is not None and Path(p).suffix.lower() == ".jsonl"

    async def setup(self) -> None:
        p = self.options.path  # type: ignore[attr-defined]
        self._t0 = time.monotonic()
        if p is None:
            self._out, self._own = sys.stdout, False
            return
        self._out, self._own = await self.run_sync(_open_text, Path(p)), True

    def _w(self, s: str) -> None:
        out = self._out or sys.stdout
        out.write(s)
        out.flush()

    def _record(self, event: str, frame: Frame, **fields: Any) -> None:
        rec = {"event": event, "turn": frame.turn, "ts": round(frame.ts, 6),
               "t": round(frame.ts - self._t0, 6), **fields}
        self._w(json.dumps(rec, ensure_ascii=False) + "\n")

    def _close_agent(self, note: str = "") -> None:
        if self._agent_open:
            self._w(f"{note}\n")
            self._agent_shown = self._agent_open  # its end of turn must not print it again
            self._agent_open = 0

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if self.jsonl:
            self._jsonl(frame)
        else:
            self._text(frame)
        return
        yield  # pragma: no cover

    def _jsonl(self, f: Frame) -> None:
        if isinstance(f, TranscriptFrame):
            if f.final or self.options.partial:  # type: ignore[attr-defined]
                self._record("transcript", f, text=f.text, final=f.final)
        elif isinstance(f, TextDeltaFrame):
            self._record("text_delta", f, text=f.text)
        elif isinstance(f, EndOfTurnFrame):
            self._record("end_of_turn", f, reason=f.reason, text=f.text)
        elif isinstance(f, ErrorFrame):
            self._record("error", f, stage=f.stage, message=f.message)
        elif isinstance(f, SpeechStartFrame):
            self._record("speech_start", f, pts=round(f.pts, 4))
        elif isinstance(f, SpeechEndFrame):
            self._record("speech_end", f, pts=round(f.pts, 4),
                         speech_end_ts=round(f.speech_end_ts, 6))

    def _close_older(self, turn: int) -> None:
        """A frame of a newer turn arrived while an answer line is open: that answer was
        cut (its end of turn never came), even if the interrupt has not reached us yet."""
        if self._agent_open:
            older = 0 < self._agent_open < turn
            self._close_agent(" [interrupted]" if older else "")

    def _text(self, f: Frame) -> None:
        if isinstance(f, TranscriptFrame):
            if f.final:
                self._close_older(f.turn)
                self._w(f"user: {f.text.strip()}\n")
            elif self.options.partial:  # type: ignore[attr-defined]
                self._close_older(f.turn)
                self._w(f"user (partial): {f.text.strip()}\n")
        elif isinstance(f, TextDeltaFrame):
            if self._agent_open != f.turn:
                self._close_older(f.turn)
                self._w("agent: ")
                self._agent_open = f.turn or -1
                self._w(f.text.lstrip())
            else:
                self._w(f.text)
        elif isinstance(f, EndOfTurnFrame):
            note = "" if f.reason == "completed" else f" [{f.reason}]"
            if self._agent_open:
                self._close_agent(note)
            elif f.turn and f.turn == self._agent_shown:
                pass  # already shown, closed early by an interrupt
            elif f.text:
                self._w(f"agent: {f.text.strip()}{note}\n")
            elif note:
                self._w(f"agent:{note}\n")
        elif isinstance(f, ErrorFrame):
            self._close_agent()
            self._w(f"error in {f.stage}: {f.message}\n")

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        if self.jsonl:
            self._record("interrupt", frame)
        elif self._agent_open and self._agent_open < frame.turn:
            self._close_agent(" [interrupted]")
        return
        yield  # pragma: no cover

    async def teardown(self) -> None:
        if self._out is not None and not self.jsonl:
            self._close_agent()
        if self._own and self._out is not None:
            self._out.close()
        self._out = None


class NullSink(Stage):
    """Consumes every frame and keeps nothing (benchmarks, tests, metrics-only runs)."""

    kind = "sink"
    name = "null"
    consumes = (Frame,)
    requires = ()  # anything, or nothing at all

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        return
        yield  # pragma: no cover

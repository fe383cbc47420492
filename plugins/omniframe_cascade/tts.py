"""Text-to-speech codec stages: speak the answer sentence by sentence while the LM writes.

* codec ``espeak``: espeak-ng (Debian package ``espeak-ng``): voice, rate, pitch, volume.
* codec ``flite``: CMU Flite (Debian package ``flite``): a second offline voice.

Both consume the LM's :class:`~omniframe.frames.TextDeltaFrame` stream and its
:class:`~omniframe.frames.EndOfTurnFrame`. Text is cut into sentences (or after
``max_words`` words when no punctuation comes) by :class:`~omniframe_cascade.text.SentenceSplitter`;
each piece is synthesized as soon as it is complete, so the first audio leaves before the LM
has finished writing. The text deltas themselves are passed on at once (for text sinks).
Audio is resampled to ``sample_rate`` and sent in chunks of
``chunk_s`` seconds; each chunk's ``text`` is its share of the sentence, so that a sink cut
off by a barge-in can tell what was heard. The end of turn is forwarded after the audio.
On a barge-in the unspoken rest is dropped, and the session is told that at most the text
synthesized so far can have been heard (the sink narrows it to what it played).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
from pydantic import Field

from omniframe.frames import (
    EndOfStreamFrame,
    EndOfTurnFrame,
    Frame,
    InterruptFrame,
    OutputAudioFrame,
    TextDeltaFrame,
)
from omniframe.stage import Stage, StageOptions
from omniframe_cascade.text import SentenceSplitter, clean_for_speech, distribute_text, speakable

__all__ = ["EspeakTTS", "FliteTTS", "SentenceTTS", "TTSError", "parse_wav"]


class TTSError(RuntimeError):
    """The synthesizer is missing or failed; the message says what to do."""


def parse_wav(data: bytes) -> tuple[Any, int]:
    """Decode a 16-bit PCM wav (as espeak-ng writes to stdout, with unknown sizes in its
    header) to float32 mono samples and the sample rate."""
    import numpy as np

    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise TTSError(f"the synthesizer did not write a wav file (got {len(data)} bytes)")
    pos = 12
    rate = channels = bits = 0
    while pos + 8 <= len(data):
        cid = data[pos:pos + 4]
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if cid == b"fmt ":
            channels = int.from_bytes(data[body + 2:body + 4], "little")
            rate = int.from_bytes(data[body + 4:body + 8], "little")
            bits = int.from_bytes(data[body + 14:body + 16], "little")
        elif cid == b"data":
            if bits != 16 or not rate or not channels:
                raise TTSError(f"unsupported wav from the synthesizer: {bits}-bit, {rate} Hz")
            raw = data[body:]
            if 0 < size <= len(raw):  # espeak's streaming header says ~2 GiB: ignore that
                raw = raw[:size]
            raw = raw[: len(raw) - len(raw) % (2 * channels)]
            x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
            if channels > 1:
                x = x.reshape(-1, channels).mean(axis=1)
            return np.ascontiguousarray(x, dtype=np.float32), rate
        pos = body + size + (size & 1)
    raise TTSError("the synthesizer's wav has no data chunk")


class SentenceTTS(Stage):
    """Base of the sentence-by-sentence TTS stages: subclasses implement :meth:`synthesize`.

    Per turn, text deltas are buffered and cut into sentences; each sentence is synthesized,
    resampled and sent as :class:`OutputAudioFrame` chunks. An interrupted end of turn (or a
    barge-in) drops the buffer unspoken."""

    kind = "codec"
    consumes = (TextDeltaFrame, EndOfTurnFrame)
    requires = (TextDeltaFrame,)  # an end of turn alone says nothing
    produces = (OutputAudioFrame, TextDeltaFrame, EndOfTurnFrame)
    install_hint: ClassVar[str] = ""

    class Options(StageOptions):
        sample_rate: int | None = Field(
            24000, ge=8000, le=192000,
            description="output rate (the sink's); None keeps the synthesizer's own")
        chunk_s: float = Field(0.25, gt=0, le=10,
                               description="seconds of audio per output frame")
        max_words: int | None = Field(
            12, ge=1, description="speak after this many words even without punctuation")
        comma_words: int | None = Field(
            6, ge=1, description="speak up to a comma once this many words are waiting "
                                 "(None: only at sentence ends and max_words)")
        first_max_words: int | None = Field(
            None, ge=1, description="max_words for the answer's first piece only: a smaller "
                                    "value starts the speech sooner (None: max_words)")
        executable: str | None = Field(
            None, description="path of the synthesizer program; default: found on PATH")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        o = self.options
        self._splitter = SentenceSplitter(
            max_words=o.max_words, comma_words=o.comma_words,  # type: ignore[attr-defined]
            first_max_words=o.first_max_words)  # type: ignore[attr-defined]
        self._turn = 0
        self._exe = ""
        self._spoken = ""  # text of this turn's audio sent so far
        self._open = False  # this turn's answer has text and has not ended yet

    # ------------------------------------------------------------------ to implement

    program: ClassVar[tuple[str, ...]] = ()

    async def synthesize(self, text: str) -> tuple[Any, int]:
        """Speak ``text``: float32 mono samples and their rate."""
        raise NotImplementedError

    async def check(self) -> None:
        """Check the voice settings at set-up (raise :class:`TTSError` with a hint)."""

    # ------------------------------------------------------------------ stage

    def _find_executable(self) -> str:
        opt = self.options.executable  # type: ignore[attr-defined]
        candidates = (opt,) if opt else self.program
        for name in candidates:
            found = shutil.which(name)
            if found:
                return found
        what = opt or " or ".join(self.program)
        raise TTSError(f"{what} is not installed (or not on PATH), so the {self.name!r} TTS "
                       f"stage cannot speak. {self.install_hint}")

    async def setup(self) -> None:
        self._exe = self._find_executable()
        await self.check()

    def _reset(self, turn: int) -> None:
        self._splitter.reset()
        self._turn = turn
        self._spoken = ""
        self._open = False

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if frame.turn < self._turn:  # an older answer's end (e.g. interrupted): pass it on
            yield frame
            return
        if frame.turn != self._turn:
            if self._splitter.buffer:
                self.log.debug("dropping unspoken text of an older turn", turn=self._turn)
            self._reset(frame.turn)
        if isinstance(frame, TextDeltaFrame):
            self._open = True
            yield frame  # the text goes on at once (text sinks, printers), audio follows
            for piece in self._splitter.push(frame.text):
                async for out in self._speak(piece):
                    yield out
            return
        assert isinstance(frame, EndOfTurnFrame)
        if frame.reason == "interrupted":
            self._splitter.reset()
        else:
            async for out in self._speak(self._splitter.flush()):
                yield out
        self._open = False
        yield frame

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        if self._turn < frame.turn:
            if self._open and self._turn:
                # Nothing after what was synthesized can have been heard. The sink, further
                # down, narrows this to what it actually played (if it started this answer).
                self.context.session.truncate(self._turn, self._spoken)
                self.log.info("speech interrupted", turn=self._turn, spoken=self._spoken)
            self._reset(frame.turn)
        return
        yield  # pragma: no cover

    async def end_of_stream(self, frame: EndOfStreamFrame) -> AsyncIterator[Frame]:
        # an answer whose end of turn never came: speak what is left
        async for out in self._speak(self._splitter.flush()):
            yield out

    async def _speak(self, piece: str) -> AsyncIterator[Frame]:
        words = clean_for_speech(piece)
        if not speakable(words):
            return
        samples, rate = await self.synthesize(words)
        want = self.options.sample_rate  # type: ignore[attr-defined]
        if want and want != rate:
            from omniframe.audio import resample

            samples = resample(samples, rate, want)
            rate = want
        if len(samples) == 0:
            return
        step = max(1, int(self.options.chunk_s * rate))  # type: ignore[attr-defined]
        chunks = [samples[i:i + step] for i in range(0, len(samples), step)]
        texts = distribute_text(piece, [len(c) for c in chunks])
        for chunk, text in zip(chunks, texts, strict=True):
            yield OutputAudioFrame(samples=chunk, sample_rate=rate, text=text)
            self._spoken += text


class EspeakTTS(SentenceTTS):
    """espeak-ng: fast, robotic, many languages; speaks each sentence as soon as it ends."""

    name = "espeak"
    program = ("espeak-ng", "espeak")
    install_hint = ("Install it: apt-get install -y espeak-ng (Debian/Ubuntu), "
                    "brew install espeak-ng (macOS), or give its path as options.executable.")

    live_options = frozenset({"voice", "rate", "pitch", "volume", "word_gap"})

    class Options(SentenceTTS.Options):
        voice: str = Field("en-us", description="espeak-ng voice (espeak-ng --voices)")
        rate: int = Field(175, ge=80, le=500, description="words per minute")
        pitch: int = Field(50, ge=0, le=99)
        volume: int = Field(100, ge=0, le=200, description="amplitude, 100 is normal")
        word_gap: int = Field(0, ge=0, le=100, description="extra pause between words, 10 ms")

    def _args(self) -> list[str]:
        o = self.options
        return [self._exe, "--stdout", "-v", o.voice, "-s", str(o.rate), "-p", str(o.pitch),
                "-a", str(o.volume), "-g", str(o.word_gap)]

    async def check(self) -> None:
        try:
            await self.synthesize("ok")
        except TTSError as exc:
            raise TTSError(f"{exc} (voice {self.options.voice!r}; list voices with "
                           f"`{self._exe} --voices`)") from None

    async def synthesize(self, text: str) -> tuple[Any, int]:
        # text goes on stdin, so a leading "-" is never taken for an option
        result = await anyio.run_process(self._args(), input=text.encode(), check=False)
        if result.returncode != 0 or not result.stdout:
            err = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
            raise TTSError(f"espeak-ng failed: {err}")
        return parse_wav(result.stdout)


class FliteTTS(SentenceTTS):
    """CMU Flite: a second offline synthesizer (voices kal, kal16, awb, rms, slt or a
    .flitevox file), 16 kHz."""

    name = "flite"
    program = ("flite",)
    install_hint = ("Install it: apt-get install -y flite (Debian/Ubuntu), "
                    "or give its path as options.executable.")

    live_options = frozenset({"voice", "speed"})

    class Options(SentenceTTS.Options):
        voice: str = Field("slt", description="flite voice name (flite -lv) or .flitevox path")
        speed: float = Field(1.0, gt=0.2, le=5.0,
                             description="speaking speed factor (>1 is faster)")

    async def check(self) -> None:
        voice = self.options.voice
        if voice.endswith(".flitevox") or "/" in voice:
            if not await anyio.Path(voice).exists():
                raise TTSError(f"flite voice file {voice!r} does not exist")
            return
        result = await anyio.run_process([self._exe, "-lv"], check=False)
        listed = result.stdout.decode(errors="replace").split(":", 1)[-1].split()
        if voice not in listed:
            raise TTSError(f"flite has no voice {voice!r}; installed voices: "
                           f"{', '.join(listed) or 'none'}")

    async def synthesize(self, text: str) -> tuple[Any, int]:
        with tempfile.TemporaryDirectory(prefix="omniframe-flite-") as tmp:
            txt = Path(tmp) / "in.txt"
            wav = Path(tmp) / "out.wav"
            txt.write_text(text)
            args = [self._exe, "-voice", self.options.voice,
                    "--setf", f"duration_stretch={1.0 / self.options.speed:.3f}",
                    "-f", str(txt), "-o", str(wav)]
            result = await anyio.run_process(args, check=False)
            if result.returncode != 0 or not wav.exists():
                err = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
                raise TTSError(f"flite failed: {err}")
            return parse_wav(wav.read_bytes())

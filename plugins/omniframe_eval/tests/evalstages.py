"""Small, deterministic stages for the harness tests, registered as an in-process plugin.

They follow the conventions the harness relies on (a file source with ``input_option`` and a
``realtime`` option, a wav sink with ``output_option``), without depending on the other
plugins' progress:

* source ``evaltest-file``: reads a file, 20 ms frames, optionally paced, tail silence;
* vad ``evaltest-energy``: an energy gate with a hangover; one turn per utterance;
* encoder ``evaltest-oracle``: "transcribes" by reading ``<audio>.txt`` beside the audio file
  (the source tells it the path through the session); ``drop_last`` words make known errors,
  ``delay_if`` slows (or hangs) chosen items, and it counts how many run at once (``PEAK``);
* lm ``evaltest-echo-text`` answers with the transcript (the real ``echo`` LM of
  omniframe_echo is used where a prefix is wanted); lm ``evaltest-crash`` raises on a word;
* sink ``evaltest-wav``: writes the answer audio to a wav file.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from omniframe import hookimpl
from omniframe.frames import (
    AudioFrame,
    EndOfStreamFrame,
    EndOfTurnFrame,
    Frame,
    OutputAudioFrame,
    SpeechEndFrame,
    SpeechStartFrame,
    TextDeltaFrame,
    TranscriptFrame,
    UserTurnFrame,
)
from omniframe.stage import Stage, StageOptions

PLUGIN_NAME = "omniframe_eval_teststages"


class FileSource(Stage):
    kind = "source"
    name = "evaltest-file"
    produces = (AudioFrame,)
    input_option = "path"

    class Options(StageOptions):
        path: str = ""
        realtime: bool = False
        tail_silence_s: float = 0.0
        frame_ms: float = 20.0

    async def generate(self) -> AsyncIterator[Frame]:
        import numpy as np

        from omniframe.audio import read_audio

        samples, sr = read_audio(self.options.path, 16000)
        self.context.session.add("system", f"evaltest-audio:{self.options.path}")
        tail = np.zeros(int(self.options.tail_silence_s * sr), np.float32)
        x = np.concatenate([samples, tail])
        n = int(sr * self.options.frame_ms / 1000)
        t0 = time.monotonic()
        for i in range(0, len(x), n):
            if self.options.realtime:
                due = t0 + i / sr
                delay = due - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
            yield AudioFrame(samples=x[i:i + n], sample_rate=sr, pts=i / sr)


class ToneSource(Stage):
    """A source that makes its own audio (no input file): the harness cannot use it."""

    kind = "source"
    name = "evaltest-tone"
    produces = (AudioFrame,)

    async def generate(self) -> AsyncIterator[Frame]:
        from omniframe.testing import tone

        yield AudioFrame(samples=tone(0.5), sample_rate=16000)


class EnergyVad(Stage):
    kind = "vad"
    name = "evaltest-energy"
    consumes = (AudioFrame,)
    produces = (SpeechStartFrame, SpeechEndFrame, UserTurnFrame)

    class Options(StageOptions):
        threshold: float = 0.01
        hangover_s: float = 0.3

    async def setup(self) -> None:
        self.turn = 0
        self.buf: list = []
        self.in_speech = False
        self.silence = 0.0
        self.last_voiced_ts = 0.0
        self.start_pts = 0.0
        self.end_pts = 0.0

    def _close(self, now_pts: float) -> list[Frame]:
        import numpy as np

        self.in_speech = False
        samples = np.concatenate(self.buf) if self.buf else np.zeros(0, np.float32)
        self.buf = []
        return [
            SpeechEndFrame(turn=self.turn, pts=self.end_pts, speech_end_ts=self.last_voiced_ts),
            UserTurnFrame(turn=self.turn, samples=samples, sample_rate=16000,
                          start_pts=self.start_pts, end_pts=self.end_pts,
                          speech_end_ts=self.last_voiced_ts),
        ]

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        import numpy as np

        assert isinstance(frame, AudioFrame)
        rms = float(np.sqrt(np.mean(frame.samples ** 2))) if len(frame.samples) else 0.0
        voiced = rms > self.options.threshold
        if voiced:
            if not self.in_speech:
                self.turn += 1
                self.in_speech = True
                self.start_pts = frame.pts
                yield SpeechStartFrame(turn=self.turn, pts=frame.pts)
            self.silence = 0.0
            self.last_voiced_ts = time.monotonic()
            self.end_pts = frame.pts + frame.duration
            self.buf.append(frame.samples)
        elif self.in_speech:
            self.buf.append(frame.samples)
            self.silence += frame.duration
            if self.silence >= self.options.hangover_s:
                for f in self._close(frame.pts):
                    yield f

    async def end_of_stream(self, frame: EndOfStreamFrame) -> AsyncIterator[Frame]:
        if self.in_speech:
            for f in self._close(self.end_pts):
                yield f


def _sidecar(audio: str) -> str:
    side = Path(audio + ".txt")
    return side.read_text().strip() if side.exists() else ""


#: how many OracleAsr turns are being transcribed right now, and the most at once so far
IN_FLIGHT = 0
PEAK = 0


class OracleAsr(Stage):
    kind = "encoder"
    name = "evaltest-oracle"
    consumes = (UserTurnFrame,)
    produces = (TranscriptFrame,)

    class Options(StageOptions):
        drop_last: int = 0
        delay_s: float = 0.0
        delay_if: dict[str, float] = {}  # a word of the transcript → extra seconds

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        global IN_FLIGHT, PEAK
        msg = self.context.session.last("system")
        assert msg is not None and msg.text.startswith("evaltest-audio:")
        IN_FLIGHT += 1
        PEAK = max(PEAK, IN_FLIGHT)
        try:
            text = await self.run_sync(_sidecar, msg.text.split(":", 1)[1])
            delay = self.options.delay_s + sum(
                s for w, s in self.options.delay_if.items() if w in text.split())
            if delay:
                await anyio.sleep(delay)
        finally:
            IN_FLIGHT -= 1
        if self.options.drop_last:
            text = " ".join(text.split()[: -self.options.drop_last])
        yield TranscriptFrame(text=text, speech_end_ts=getattr(frame, "speech_end_ts", 0.0))


class EchoText(Stage):
    kind = "lm"
    name = "evaltest-echo-text"
    consumes = (TranscriptFrame,)
    produces = (TextDeltaFrame, EndOfTurnFrame)

    class Options(StageOptions):
        answer: str | None = None

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, TranscriptFrame)
        text = self.options.answer if self.options.answer is not None else frame.text
        for i, w in enumerate(text.split()):
            yield TextDeltaFrame(text=w if i == 0 else " " + w)
        yield EndOfTurnFrame(text=text)


class CrashLm(Stage):
    kind = "lm"
    name = "evaltest-crash"
    consumes = (TranscriptFrame,)
    produces = (TextDeltaFrame, EndOfTurnFrame)

    class Options(StageOptions):
        on_word: str = "boom"

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, TranscriptFrame)
        if self.options.on_word in frame.text.lower().split():
            raise RuntimeError(f"the test LM refuses the word {self.options.on_word!r}")
        yield TextDeltaFrame(text=frame.text)
        yield EndOfTurnFrame(text=frame.text)


class ModelLm(Stage):
    """Needs a model URI; a missing one fails setup with ModelNotAvailable (fallback test)."""

    kind = "lm"
    name = "evaltest-model"
    consumes = (TranscriptFrame,)
    produces = (TextDeltaFrame, EndOfTurnFrame)

    class Options(StageOptions):
        model: str = "/nonexistent/model"

    async def setup(self) -> None:
        from omniframe.model_uris import resolve_model

        self.ref = resolve_model(self.options.model)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        import numpy as np

        words = ["noise"] * 3 if self.ref.is_random else ["real"]
        words.append(str(int(np.random.randint(0, 1000))))  # seeded by the harness
        for i, w in enumerate(words):
            yield TextDeltaFrame(text=w if i == 0 else " " + w)
        yield EndOfTurnFrame(text=" ".join(words))


class WavSink(Stage):
    kind = "sink"
    name = "evaltest-wav"
    consumes = (OutputAudioFrame,)
    output_option = "path"
    output_suffixes = (".wav",)

    class Options(StageOptions):
        path: str = "answer.wav"
        realtime: bool = True

    async def setup(self) -> None:
        self.chunks: list = []
        self.rate = 24000

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, OutputAudioFrame)
        self.chunks.append(frame.samples)
        self.rate = frame.sample_rate
        return
        yield

    async def teardown(self) -> None:
        import numpy as np
        import soundfile as sf

        if self.chunks:
            sf.write(self.options.path, np.concatenate(self.chunks), self.rate)


STAGES = (FileSource, ToneSource, EnergyVad, OracleAsr, EchoText, CrashLm, ModelLm, WavSink)


@hookimpl
def register_stages(register) -> None:  # type: ignore[no-untyped-def]
    for cls in STAGES:
        register(cls)

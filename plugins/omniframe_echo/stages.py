"""Echo LM and echo codec: deterministic, instant, no model.

* lm ``echo``: answers a transcript with ``"<prefix><transcript>"``, or an audio turn with
  ``"I heard N.N seconds of speech."``, one word per text delta.
* codec ``echo``: speaks each text delta as a short tone (one per word), so the sink gets
  real audio whose length follows the text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from omniframe.frames import (
    EndOfTurnFrame,
    Frame,
    OutputAudioFrame,
    RespondFrame,
    TextDeltaFrame,
    TranscriptFrame,
    UserTurnFrame,
)
from omniframe.stage import Stage, StageOptions


class EchoLM(Stage):
    """Repeats what it heard, word by word."""

    kind = "lm"
    name = "echo"
    consumes = (TranscriptFrame, UserTurnFrame, RespondFrame)
    requires = (TranscriptFrame, UserTurnFrame)  # text, or a whole audio turn
    produces = (TextDeltaFrame, EndOfTurnFrame)

    live_options = frozenset({"prefix", "token_delay_s"})

    class Options(StageOptions):
        prefix: str = "You said: "
        token_delay_s: float = 0.0
        """Pause between words, to imitate a model that takes time per token."""

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if isinstance(frame, TranscriptFrame):
            if not frame.final:
                return
            heard = frame.text.strip()
            if not heard:
                yield EndOfTurnFrame(reason="empty")
                return
            answer = f"{self.options.prefix}{heard}"
            self.context.session.add("user", heard, frame.turn)
        elif isinstance(frame, RespondFrame):  # answer now: repeat the last thing heard
            last = self.context.session.last("user")
            said = frame.instructions or (last.text if last is not None else "")
            if not said:
                yield EndOfTurnFrame(reason="empty")
                return
            answer = f"{self.options.prefix}{said}"
        else:
            assert isinstance(frame, UserTurnFrame)
            answer = f"I heard {frame.duration:.1f} seconds of speech."
            self.context.session.add("user", f"<{frame.duration:.1f} s of audio>", frame.turn)
        self.context.session.add("assistant", answer, frame.turn)
        words = answer.split(" ")
        for i, word in enumerate(words):
            if self.options.token_delay_s:
                await anyio.sleep(self.options.token_delay_s)
            yield TextDeltaFrame(text=word if i == 0 else " " + word)
        yield EndOfTurnFrame(text=answer)


class EchoCodec(Stage):
    """Turns each text delta into a tone: 80 ms per character, pitch by word length."""

    kind = "codec"
    name = "echo"
    consumes = (TextDeltaFrame,)
    requires = (TextDeltaFrame,)
    produces = (OutputAudioFrame, TextDeltaFrame)
    forward_consumed = True  # the text goes on to the sinks

    class Options(StageOptions):
        sample_rate: int = 24000
        seconds_per_char: float = 0.02

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        import numpy as np

        assert isinstance(frame, TextDeltaFrame)
        text = frame.text
        if not text.strip():
            return
        sr = self.options.sample_rate
        n = max(1, int(len(text) * self.options.seconds_per_char * sr))
        t = np.arange(n) / sr
        freq = 200.0 + 40.0 * (len(text.strip()) % 8)
        env = np.minimum(1.0, np.minimum(t, t[-1] - t) * 200)  # 5 ms fades: no clicks
        samples = (0.2 * env * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        yield OutputAudioFrame(samples=samples, sample_rate=sr, text=text)

"""A text source: typed questions instead of speech, for text-input models (Mini-Omni T1A2 and
T1T2, the cascade LM, the echo LM) without a VAD and an ASR in front.

Each question is one user turn: a final :class:`~omniframe.frames.TranscriptFrame` (what an
ASR would have produced), turns numbered from 1; the end of the stream follows the last one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field, field_validator

from omniframe.frames import TranscriptFrame
from omniframe.stage import Stage, StageOptions

__all__ = ["TextSource"]


class TextSource(Stage):
    """Typed user turns: each ``text`` item (or each line of the ``path`` file) is one turn,
    sent as a final TranscriptFrame."""

    kind = "source"
    name = "text"
    produces = (TranscriptFrame,)
    input_option = "path"

    class Options(StageOptions):
        text: str | list[str] | None = Field(
            None, description="the user's text; a list gives one turn per item")
        path: Path | None = Field(
            None, description="a UTF-8 text file, one turn per non-empty line (replaces text)")

        @field_validator("text")
        @classmethod
        def _not_blank(cls, v: str | list[str] | None) -> str | list[str] | None:
            items = [v] if isinstance(v, str) else v or []
            if isinstance(v, list) and not v:
                raise ValueError("text is an empty list; give at least one question")
            if any(not item.strip() for item in items):
                raise ValueError("text is empty; give the words of the user's turn")
            return v

    def turns(self) -> list[str]:
        """The user turns, in order (reads ``path`` when set)."""
        o = self.options
        if o.path is not None:
            try:
                lines = Path(o.path).expanduser().read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise ValueError(f"{o.path} is not a UTF-8 text file; the text source reads "
                                 f"one question per line") from None
            texts = [line.strip() for line in lines if line.strip()]
            if not texts:
                raise ValueError(f"{o.path} holds no text: write one question per line")
            return texts
        if o.text is None:
            raise ValueError(
                "the text source has nothing to say: set options.text (e.g. --set "
                "source.options.text='What is the capital of France?') or options.path (a "
                "text file, one question per line)")
        return [o.text] if isinstance(o.text, str) else list(o.text)

    async def setup(self) -> None:
        self._turns = await self.run_sync(self.turns)

    async def generate(self) -> AsyncIterator[TranscriptFrame]:
        for text in self._turns:
            turn = self.context.session.next_turn()
            yield TranscriptFrame(text=text.strip(), final=True, turn=turn,
                                  speech_end_ts=time.monotonic())

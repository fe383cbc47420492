"""omniframe-shout: a complete third-party plugin in one module.

Install it (``pip install ./examples/omniframe-shout``) and use it from any config::

    - kind: lm
      plugin: shout
      options: {suffix: "!!"}
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from omniframe import (
    EndOfTurnFrame,
    Frame,
    Stage,
    StageOptions,
    TextDeltaFrame,
    TranscriptFrame,
    UserTurnFrame,
    hookimpl,
)


class Shout(Stage):
    """Answers by shouting back what it heard."""

    kind = "lm"
    name = "shout"
    consumes = (TranscriptFrame, UserTurnFrame)
    produces = (TextDeltaFrame, EndOfTurnFrame)

    class Options(StageOptions):
        suffix: str = "!"

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if isinstance(frame, TranscriptFrame):
            heard = frame.text
        else:
            assert isinstance(frame, UserTurnFrame)
            heard = f"I heard {frame.duration:.1f} seconds of speech"
        answer = heard.upper() + self.options.suffix
        yield TextDeltaFrame(text=answer)
        yield EndOfTurnFrame(text=answer)


@hookimpl
def register_stages(register: Callable[[type[Stage]], None]) -> None:
    register(Shout)

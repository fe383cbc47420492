"""The conversation that the stages of one pipeline run share.

Stages only talk through frames, except for one thing that flows backwards: what the user
actually heard. The LM writes the answer it generated; the sink, which knows how much audio was
played before an interruption, records what was heard; the LM builds its next prompt from the
history, which therefore keeps only what the user heard (OpenAI Realtime's "truncate").
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Message", "Session"]

_ids = itertools.count(1)


@dataclass
class Message:
    """One message of the conversation.

    Parameters:
        role: ``user``, ``assistant`` or ``system``.
        text: the full text (for the assistant: everything generated).
        turn: the user turn it belongs to.
        heard: for assistant messages cut by an interruption, the part the user heard;
            None when it was heard whole (or never played).
        interrupted: True when the answer was cut.
    """

    role: Literal["user", "assistant", "system"]
    text: str
    turn: int = 0
    heard: str | None = None
    interrupted: bool = False

    @property
    def effective_text(self) -> str:
        """What the model should remember: the heard part where the answer was cut."""
        return self.heard if self.heard is not None else self.text


@dataclass
class Session:
    """State shared by the stages of one pipeline run (one conversation).

    Thread-safe for appends, since stages may call it from worker threads.
    """

    id: str = field(default_factory=lambda: f"s{next(_ids)}")
    messages: list[Message] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, role: Literal["user", "assistant", "system"], text: str,
            turn: int = 0) -> Message:
        """Append a message and return it."""
        msg = Message(role=role, text=text, turn=turn)
        with self._lock:
            self.messages.append(msg)
        return msg

    def last(self, role: str, turn: int | None = None) -> Message | None:
        """The newest message of ``role`` (and ``turn``, if given)."""
        with self._lock:
            for msg in reversed(self.messages):
                if msg.role == role and (turn is None or msg.turn == turn):
                    return msg
        return None

    def truncate(self, turn: int, heard: str) -> None:
        """Record that only ``heard`` of the assistant's answer to ``turn`` reached the user."""
        msg = self.last("assistant", turn)
        if msg is not None:
            msg.heard = heard
            msg.interrupted = True

    def history(self) -> list[dict[str, str]]:
        """Chat-template style history, assistant messages cut to what was heard."""
        with self._lock:
            return [
                {"role": m.role, "content": m.effective_text}
                for m in self.messages
                if m.effective_text or m.role != "assistant"
            ]

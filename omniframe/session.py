"""The conversation that the stages of one pipeline run share.

Stages only talk through frames, except for one thing that flows backwards: what the user
actually heard. The LM writes the answer it generated; the sink, which knows how much audio was
played before an interruption, records what was heard; the LM builds its next prompt from the
history, which therefore keeps only what the user heard (OpenAI Realtime's "truncate").

Function calls are conversation items too: the tool calls an answer made are on its assistant
message (:attr:`Message.tool_calls`), each result is a ``tool`` message that names the call it
answers. OpenAI Realtime has the same items under other names: an assistant message with text
is a ``message`` item and each of its calls a ``function_call`` item; a ``tool`` message is a
``function_call_output`` item.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Message", "Session", "ToolCallItem"]

_ids = itertools.count(1)

Role = Literal["user", "assistant", "system", "tool"]


@dataclass(frozen=True)
class ToolCallItem:
    """One tool call of an assistant message: ``arguments`` is a JSON object as text."""

    call_id: str
    name: str
    arguments: str = "{}"


@dataclass
class Message:
    """One message of the conversation.

    Parameters:
        role: ``user``, ``assistant``, ``system`` or ``tool`` (a tool's result).
        text: the full text (for the assistant: everything generated; for a tool: its
            output, normally JSON).
        turn: the user turn it belongs to.
        heard: for assistant messages cut by an interruption, the part the user heard;
            None when it was heard whole (or never played).
        interrupted: True when the answer was cut.
        tool_calls: for an assistant message, the tool calls it made (after its text).
        call_id, name, is_error: for a ``tool`` message, the call it answers, the tool's
            name, and whether the call failed.
    """

    role: Role
    text: str
    turn: int = 0
    heard: str | None = None
    interrupted: bool = False
    tool_calls: list[ToolCallItem] = field(default_factory=list)
    call_id: str | None = None
    name: str | None = None
    is_error: bool = False

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
    _turn: int = field(default=0, repr=False)
    _tentative: dict[int, Any] = field(default_factory=dict, repr=False)
    _retracted: set[int] = field(default_factory=set, repr=False)

    def next_turn(self) -> int:
        """A new user turn's number: one counter for everything that starts turns in this
        conversation (the VAD, typed text, a steering client), so that they never collide."""
        with self._lock:
            self._turn += 1
            return self._turn

    @property
    def turn(self) -> int:
        """The newest turn started so far (0: none)."""
        return self._turn

    # ------------------------------------------------ preemptive turns (VAD ``tentative_ms``)
    def mark_tentative(self, turn: int) -> None:
        """The VAD sent a tentative end of ``turn``: its answer is being prepared, not yet
        released (call on the pipeline's event loop)."""
        import anyio

        with self._lock:
            self._tentative[turn] = anyio.Event()

    def is_tentative(self, turn: int) -> bool:
        return turn in self._tentative

    def is_retracted(self, turn: int) -> bool:
        return turn in self._retracted

    def settle(self, turn: int, *, confirmed: bool) -> None:
        """The tentative end of ``turn`` was confirmed, or retracted: a retracted turn's
        messages are removed, and later ones are not recorded (:meth:`add` ignores them)."""
        with self._lock:
            event = self._tentative.pop(turn, None)
            if not confirmed:
                self._retracted.add(turn)
                self.messages[:] = [m for m in self.messages if m.turn != turn]
        if event is not None:
            event.set()

    async def wait_settled(self, turn: int) -> bool:
        """Wait until ``turn`` is not tentative; True unless it was retracted."""
        event = self._tentative.get(turn)
        if event is not None:
            await event.wait()
        return turn not in self._retracted

    def add(self, role: Role, text: str, turn: int = 0) -> Message:
        """Append a message and return it (a retracted turn's is returned, not kept)."""
        msg = Message(role=role, text=text, turn=turn)
        with self._lock:
            if turn in self._retracted:
                return msg
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
        """Record that only ``heard`` of the assistant's answer to ``turn`` reached the user.

        An answer that called tools is several assistant messages (the text before each
        round of calls, then the answer): ``heard`` covers them in order, so each keeps the
        part of it that was heard (compared without regard to whitespace)."""
        with self._lock:
            said = [m for m in self.messages
                    if m.role == "assistant" and m.turn == turn and m.text.strip()]
        if len(said) > 1:
            rest = " ".join(heard.split())
            for m in said:
                text = " ".join(m.text.split())
                if rest.startswith(text):
                    rest = rest[len(text):].lstrip()
                    continue
                m.heard, m.interrupted, rest = rest, True, ""
            return
        msg = self.last("assistant", turn)
        if msg is not None:
            msg.heard = heard
            msg.interrupted = True

    def history(self, tools: bool = False) -> list[dict[str, Any]]:
        """Chat-template style history, assistant messages cut to what was heard.

        Without ``tools`` (the default): only text, ``{"role", "content"}``; tool calls and
        results are left out. With ``tools``: in the form transformers chat templates take,
        assistant messages with ``tool_calls`` (``[{"id", "type": "function", "function":
        {"name", "arguments": {...}}}]``) and ``{"role": "tool", "content", "tool_call_id",
        "name"}`` results."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for m in self.messages:
                if m.role == "tool":
                    if tools:
                        out.append({"role": "tool", "content": m.text,
                                    "tool_call_id": m.call_id, "name": m.name})
                    continue
                calls = m.tool_calls if tools else []
                if not (m.effective_text or m.role != "assistant" or calls):
                    continue
                item: dict[str, Any] = {"role": m.role, "content": m.effective_text}
                if calls:
                    item["tool_calls"] = [
                        {"id": c.call_id, "type": "function",
                         "function": {"name": c.name, "arguments": _decoded(c.arguments)}}
                        for c in calls]
                out.append(item)
        return out

    def add_tool_call(self, call_id: str, name: str, arguments: str, turn: int = 0,
                      message: Message | None = None) -> Message:
        """Record a tool call on ``message`` (the assistant message that made it), or on a
        new, empty assistant message; returns that message."""
        with self._lock:
            if message is None:
                message = Message(role="assistant", text="", turn=turn)
                if turn not in self._retracted:
                    self.messages.append(message)
            message.tool_calls.append(ToolCallItem(call_id, name, arguments))
        return message

    def add_tool_result(self, call_id: str, name: str, output: str, turn: int = 0,
                        is_error: bool = False) -> Message:
        """Record the result of the call ``call_id`` as a ``tool`` message."""
        msg = Message(role="tool", text=output, turn=turn, call_id=call_id, name=name,
                      is_error=is_error)
        with self._lock:
            if turn not in self._retracted:
                self.messages.append(msg)
        return msg

    def tool_call(self, call_id: str) -> tuple[ToolCallItem, Message] | None:
        """The call ``call_id`` and the assistant message that made it, or None."""
        with self._lock:
            for m in reversed(self.messages):
                for c in m.tool_calls:
                    if c.call_id == call_id:
                        return c, m
        return None

    def pending_tool_calls(self, turn: int | None = None) -> list[tuple[ToolCallItem, int]]:
        """Calls that have no result yet (of ``turn``, if given), oldest first, with the
        turn of each."""
        with self._lock:
            answered = {m.call_id for m in self.messages if m.role == "tool"}
            return [(c, m.turn) for m in self.messages for c in m.tool_calls
                    if c.call_id not in answered and (turn is None or m.turn == turn)]


def _decoded(arguments: str) -> Any:
    """Tool-call arguments as chat templates want them: an object, not JSON text (the text
    itself where it does not parse)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments

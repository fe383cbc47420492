"""Check server events against the openai SDK's own GA types and the response lifecycle.

:class:`ContractChecker` validates each event with the SDK's pydantic models
(``openai.types.realtime.RealtimeServerEvent``, validated, not constructed), refuses fields a
model does not have at the top level, beta-only names, and events out of order: a delta
before its ``response.output_item.added`` / ``content_part.added``, anything of a response
after its ``response.done``, a second ``response.done``, repeated event ids, audio deltas
that are not whole PCM16 samples. Needs the ``openai`` package (the ``serve`` extra).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

__all__ = ["ContractChecker", "ContractViolation"]

# in the SDK's union for old clients, but GA servers emit added + done (Pipecat refuses it)
FORBIDDEN = frozenset({"conversation.item.created"})
# What Pipecat's OpenAIRealtimeLLMService parses (pipecat-ai/pipecat:
# src/pipecat/services/openai/realtime/events.py, _server_event_types); older versions end
# their receive loop on any other type, and on a listed type that fails their model
PIPECAT_SERVER_EVENTS = frozenset({
    "error", "session.created", "session.updated", "conversation.created",
    "input_audio_buffer.committed", "input_audio_buffer.cleared",
    "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
    "conversation.item.added", "conversation.item.done",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.completed",
    "conversation.item.input_audio_transcription.failed", "conversation.item.truncated",
    "conversation.item.deleted", "conversation.item.retrieved", "response.created",
    "response.done", "response.output_item.added", "response.output_item.done",
    "response.content_part.added", "response.content_part.done",
    "response.output_text.delta", "response.output_text.done",
    "response.output_audio_transcript.delta", "response.output_audio_transcript.done",
    "response.output_audio.delta", "response.output_audio.done",
    "response.function_call_arguments.delta", "response.function_call_arguments.done",
    "rate_limits.updated"})
_PART_DELTAS = frozenset({
    "response.output_audio.delta", "response.output_audio_transcript.delta",
    "response.output_text.delta", "response.output_audio.done",
    "response.output_audio_transcript.done", "response.output_text.done",
    "response.content_part.done"})


class ContractViolation(AssertionError):
    """A server event that a GA client may reject."""


class ContractChecker:
    def __init__(self, allow_extensions: bool = False) -> None:
        from typing import get_args

        from openai.types.realtime import RealtimeServerEvent
        from pydantic import TypeAdapter

        self._adapter: Any = TypeAdapter(RealtimeServerEvent)
        union = get_args(RealtimeServerEvent)[0]
        self._models = {m.model_fields["type"].annotation.__args__[0]: m
                        for m in get_args(union)}
        self.allow_extensions = allow_extensions
        self.event_ids: set[str] = set()
        self.open: dict[str, set[str]] = {}  # response id -> its output items added
        self.parts: set[tuple[str, int]] = set()  # (item id, content index) added
        self.done: set[str] = set()
        self.count = 0

    def problem(self, event: Any) -> str | None:
        """Why ``event`` breaks the contract, or None (and it is recorded)."""
        try:
            self.feed(event)
        except ContractViolation as exc:
            return str(exc)
        return None

    def check_all(self, events: Iterable[Any]) -> int:
        for e in events:
            self.feed(e)
        return self.count

    def feed(self, event: Any) -> None:
        from pydantic import ValidationError

        if not isinstance(event, dict):
            raise ContractViolation(f"an event must be a JSON object, got {type(event)}")
        kind = event.get("type")
        if self.allow_extensions and isinstance(kind, str) and kind.startswith("omniframe."):
            self.count += 1
            return
        if kind in FORBIDDEN:
            raise ContractViolation(f"{kind!r} is not emitted by GA servers")
        model = self._models.get(kind)  # type: ignore[arg-type]
        if model is None:
            raise ContractViolation(f"unknown server event type {kind!r}")
        if kind not in PIPECAT_SERVER_EVENTS:
            raise ContractViolation(f"{kind!r} is not among the types Pipecat parses")
        try:
            self._adapter.validate_python(event)
        except ValidationError as exc:
            raise ContractViolation(f"{kind}: {exc.errors()[:3]}") from None
        extra = set(event) - set(model.model_fields)
        if extra:
            raise ContractViolation(f"{kind}: fields the SDK type does not have: "
                                    f"{sorted(extra)}")
        eid = event["event_id"]
        if eid in self.event_ids:
            raise ContractViolation(f"{kind}: event_id {eid!r} repeated")
        self.event_ids.add(eid)
        self._lifecycle(kind, event)
        self.count += 1

    def _lifecycle(self, kind: str, e: dict[str, Any]) -> None:
        rid = e.get("response_id")
        if kind in ("response.created", "response.done") and "status_details" not in e[
                "response"]:  # Pipecat's Response model requires it (None is fine)
            raise ContractViolation(f"{kind}: the response has no status_details")
        if kind == "response.created":
            rid = e["response"]["id"]
            if rid in self.open or rid in self.done:
                raise ContractViolation(f"response {rid!r} created twice")
            self.open[rid] = set()
            return
        if kind == "response.done":
            rid = e["response"]["id"]
            if rid not in self.open:
                raise ContractViolation(f"response.done for {rid!r}, which is not in progress")
            del self.open[rid]
            self.done.add(rid)
            return
        if rid is None:
            return
        if rid not in self.open:
            raise ContractViolation(f"{kind} for response {rid!r}, which is not in progress")
        items = self.open[rid]
        if kind == "response.output_item.added":
            items.add(e["item"]["id"])
            return
        item_id = e.get("item_id") or (e.get("item") or {}).get("id")
        if item_id not in items:
            raise ContractViolation(f"{kind} for item {item_id!r} before its "
                                    f"response.output_item.added")
        if kind == "response.content_part.added":
            self.parts.add((item_id, e["content_index"]))
        elif kind in _PART_DELTAS and (item_id, e["content_index"]) not in self.parts:
            raise ContractViolation(f"{kind} before response.content_part.added")
        if kind == "response.output_audio.delta":
            try:
                raw = base64.b64decode(e["delta"], validate=True)
            except (binascii.Error, ValueError):
                raise ContractViolation("output_audio.delta is not base64") from None
            if len(raw) % 2 or not raw:
                raise ContractViolation(f"output_audio.delta holds {len(raw)} bytes: not "
                                        f"whole PCM16 samples")

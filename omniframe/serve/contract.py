"""Check server events against the openai SDK's own GA types and the response lifecycle.

:class:`ContractChecker` validates each event with the SDK's pydantic models
(``openai.types.realtime.RealtimeServerEvent``, validated, not constructed), refuses fields a
model does not have at the top level, beta-only names, types Pipecat does not parse, repeated
event ids, and breaks of the lifecycle:

* **one response id per response**: a response is created once and done once; every event
  of it names that id, and an item belongs to one response only;
* **dense output indexes**: a response's ``output_item.added`` come with ``output_index``
  0, 1, 2, ...; every later event of the item repeats its index;
* **content parts in order**: an item's ``content_part.added`` come with ``content_index``
  0, 1, ...; deltas and ``*.done`` only for an added, not yet done part, each stream's
  ``*.done`` once, ``content_part.done`` once and before ``output_item.done``;
* **each item closed once**: ``response.output_item.done`` once per item, after its parts
  are done, nothing of the item after it; ``conversation.item.done`` once, after
  ``conversation.item.added`` (an item may be added again after ``conversation.item.deleted``),
  whose ``previous_item_id`` names an item still in the conversation;
  ``response.done`` only when all its items are closed; a stream that had a delta has its
  ``*.done`` before its part's ``content_part.done`` (or the call's ``output_item.done``);
  :meth:`ContractChecker.finish` finds responses and items left open at the end;
* **statuses that agree**: ``response.created`` is ``in_progress``, ``response.done`` is
  final, its ``status_details.type`` (when given) is its status; its ``output`` lists the
  items in order with the status their ``output_item.done`` gave; a ``completed`` response
  has only ``completed`` items; an item is ``in_progress`` when added and final when done;
* audio deltas are whole PCM16 samples, in base64.

Needs the ``openai`` package (the ``serve`` extra).
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
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
    "response.output_text.delta"})
_PART_DONES = frozenset({
    "response.output_audio.done", "response.output_audio_transcript.done",
    "response.output_text.done"})
_CALL_EVENTS = frozenset({
    "response.function_call_arguments.delta", "response.function_call_arguments.done"})
_FINAL_RESPONSE = frozenset({"completed", "cancelled", "incomplete", "failed"})
_FINAL_ITEM = frozenset({"completed", "incomplete"})


class ContractViolation(AssertionError):
    """A server event that a GA client may reject."""


@dataclass
class _Item:
    output_index: int
    parts: list[bool] = field(default_factory=list)  # per content index: done?
    streams_open: set[tuple[int, str]] = field(default_factory=set)  # had a delta
    streams_done: set[tuple[int, str]] = field(default_factory=set)
    done_status: str | None = None  # set by response.output_item.done


@dataclass
class _Resp:
    items: dict[str, _Item] = field(default_factory=dict)  # in output order


@functools.cache
def _sdk_types() -> tuple[Any, dict[str, Any]]:
    """The SDK's server-event union as a pydantic adapter, and its models by type (built
    once: ~0.1 s)."""
    from typing import get_args

    from openai.types.realtime import RealtimeServerEvent
    from pydantic import TypeAdapter

    union = get_args(RealtimeServerEvent)[0]
    models = {m.model_fields["type"].annotation.__args__[0]: m for m in get_args(union)}
    return TypeAdapter(RealtimeServerEvent), models


class ContractChecker:
    """Feed it every event a session emits, in order; :meth:`feed` raises on the first that
    breaks the contract (see the module docstring), :meth:`problem` returns why."""

    def __init__(self, allow_extensions: bool = False) -> None:
        self._adapter, self._models = _sdk_types()
        self.allow_extensions = allow_extensions
        self.event_ids: set[str] = set()
        self.open: dict[str, _Resp] = {}  # response id -> its output items so far
        self.done: set[str] = set()  # finished response ids
        self.item_owner: dict[str, str] = {}  # output item id -> its response id
        self.conv_added: set[str] = set()
        self.conv_done: set[str] = set()
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
        if kind.startswith("conversation.item."):
            self._conversation(kind, event)
        else:
            self._lifecycle(kind, event)
        self.event_ids.add(eid)
        self.count += 1

    def finish(self) -> None:
        """At the end of a session that ended cleanly: nothing may be left open."""
        if self.open:
            raise ContractViolation(f"responses {sorted(self.open)} never got response.done")
        unclosed = sorted(self.conv_added - self.conv_done)
        if unclosed:
            raise ContractViolation(f"items {unclosed} never got conversation.item.done")

    # ------------------------------------------------------------------ conversation

    def _conversation(self, kind: str, e: dict[str, Any]) -> None:
        if kind == "conversation.item.added":
            iid = e["item"].get("id")
            if iid in self.conv_added:
                raise ContractViolation(f"{kind}: item {iid!r} added twice")
            prev = e.get("previous_item_id")
            if prev is not None and prev not in self.conv_added:
                raise ContractViolation(f"{kind}: previous_item_id {prev!r} is not an item of "
                                        f"the conversation (deleted, or never added)")
            self.conv_added.add(iid)
        elif kind == "conversation.item.done":
            iid = e["item"].get("id")
            if iid not in self.conv_added:
                raise ContractViolation(f"{kind}: item {iid!r} before its "
                                        f"conversation.item.added")
            if iid in self.conv_done:
                raise ContractViolation(f"{kind}: item {iid!r} closed twice")
            owner = self.item_owner.get(iid)
            if owner is not None and owner in self.open and (
                    self.open[owner].items[iid].done_status is None):
                raise ContractViolation(f"{kind}: item {iid!r} before its "
                                        f"response.output_item.done")
            self.conv_done.add(iid)
        elif kind == "conversation.item.deleted":
            self.conv_added.discard(e["item_id"])
            self.conv_done.discard(e["item_id"])

    # ---------------------------------------------------------------------- response

    def _lifecycle(self, kind: str, e: dict[str, Any]) -> None:
        if kind == "response.created":
            self._created(e["response"])
            return
        if kind == "response.done":
            self._response_done(e["response"])
            return
        rid = e.get("response_id")
        if rid is None:
            return
        if rid not in self.open:
            raise ContractViolation(f"{kind} for response {rid!r}, which is not in progress")
        resp = self.open[rid]
        if kind == "response.output_item.added":
            self._item_added(rid, resp, e)
            return
        item_id = e.get("item_id") or (e.get("item") or {}).get("id")
        item = resp.items.get(item_id)  # type: ignore[arg-type]
        if item is None:
            owner = self.item_owner.get(item_id)  # type: ignore[arg-type]
            where = f" (it belongs to response {owner!r})" if owner else ""
            raise ContractViolation(f"{kind} for item {item_id!r} before its "
                                    f"response.output_item.added{where}")
        if e.get("output_index") != item.output_index:
            raise ContractViolation(f"{kind}: output_index {e.get('output_index')} for item "
                                    f"{item_id!r}, which was added at {item.output_index}")
        if item.done_status is not None:
            raise ContractViolation(f"{kind} for item {item_id!r} after its "
                                    f"response.output_item.done")
        if kind == "response.output_item.done":
            self._item_done(item_id, item, e["item"])  # type: ignore[arg-type]
        elif kind == "response.content_part.added":
            if e["content_index"] != len(item.parts):
                raise ContractViolation(
                    f"{kind}: content_index {e['content_index']} for item {item_id!r}, "
                    f"expected {len(item.parts)} (parts in order, no gaps)")
            item.parts.append(False)
        elif kind in _PART_DELTAS or kind in _PART_DONES or kind == (
                "response.content_part.done"):
            self._part_event(kind, item_id, item, e)  # type: ignore[arg-type]
        elif kind in _CALL_EVENTS:
            stream = (-1, "response.function_call_arguments")
            if stream in item.streams_done:
                raise ContractViolation(f"{kind} for item {item_id!r} after its "
                                        f"response.function_call_arguments.done")
            (item.streams_done if kind.endswith(".done") else item.streams_open).add(stream)

    def _created(self, r: dict[str, Any]) -> None:
        if "status_details" not in r:  # Pipecat's Response model requires it (None is fine)
            raise ContractViolation("response.created: the response has no status_details")
        rid = r["id"]
        if rid in self.open or rid in self.done:
            raise ContractViolation(f"response {rid!r} created twice")
        if r.get("status") != "in_progress":
            raise ContractViolation(f"response.created: status {r.get('status')!r}, "
                                    f"expected 'in_progress'")
        if r.get("output"):
            raise ContractViolation("response.created: output must be empty")
        self.open[rid] = _Resp()

    def _item_added(self, rid: str, resp: _Resp, e: dict[str, Any]) -> None:
        iid = e["item"].get("id")
        if iid in self.item_owner:
            raise ContractViolation(f"response.output_item.added: item {iid!r} added twice "
                                    f"(first in response {self.item_owner[iid]!r})")
        if e["output_index"] != len(resp.items):
            raise ContractViolation(
                f"response.output_item.added: output_index {e['output_index']} in response "
                f"{rid!r}, expected {len(resp.items)} (dense, in order)")
        status = e["item"].get("status")
        if status not in (None, "in_progress"):
            raise ContractViolation(f"response.output_item.added: item status {status!r}, "
                                    f"expected 'in_progress'")
        resp.items[iid] = _Item(e["output_index"])
        self.item_owner[iid] = rid

    def _part_event(self, kind: str, item_id: str, item: _Item, e: dict[str, Any]) -> None:
        ci = e["content_index"]
        if not 0 <= ci < len(item.parts):
            raise ContractViolation(f"{kind} for item {item_id!r} part {ci} before its "
                                    f"response.content_part.added")
        if item.parts[ci]:
            raise ContractViolation(f"{kind} for item {item_id!r} part {ci} after its "
                                    f"response.content_part.done")
        if kind == "response.content_part.done":
            unfinished = sorted(s for c, s in item.streams_open - item.streams_done if c == ci)
            if unfinished:
                raise ContractViolation(f"{kind} for item {item_id!r} part {ci} before "
                                        f"{', '.join(u + '.done' for u in unfinished)}")
            item.parts[ci] = True
            return
        stream = kind.removesuffix(".done").removesuffix(".delta")
        if (ci, stream) in item.streams_done:
            what = "a second" if kind.endswith(".done") else "a delta after"
            raise ContractViolation(f"{kind}: {what} {stream}.done for item {item_id!r} "
                                    f"part {ci}")
        if kind in _PART_DONES:
            item.streams_done.add((ci, stream))
            return
        item.streams_open.add((ci, stream))
        if kind == "response.output_audio.delta":
            try:
                raw = base64.b64decode(e["delta"], validate=True)
            except (binascii.Error, ValueError):
                raise ContractViolation("output_audio.delta is not base64") from None
            if len(raw) % 2 or not raw:
                raise ContractViolation(f"output_audio.delta holds {len(raw)} bytes: not "
                                        f"whole PCM16 samples")

    def _item_done(self, item_id: str, item: _Item, body: dict[str, Any]) -> None:
        if not all(item.parts):
            open_parts = [i for i, d in enumerate(item.parts) if not d]
            raise ContractViolation(f"response.output_item.done for item {item_id!r} with "
                                    f"parts {open_parts} not done")
        if (-1, "response.function_call_arguments") in item.streams_open - item.streams_done:
            raise ContractViolation(f"response.output_item.done for item {item_id!r} before "
                                    f"its response.function_call_arguments.done")
        status = body.get("status")
        if status not in _FINAL_ITEM:
            raise ContractViolation(f"response.output_item.done: item {item_id!r} status "
                                    f"{status!r}, expected completed or incomplete")
        item.done_status = status

    def _response_done(self, r: dict[str, Any]) -> None:
        if "status_details" not in r:
            raise ContractViolation("response.done: the response has no status_details")
        rid = r["id"]
        if rid not in self.open:
            raise ContractViolation(f"response.done for {rid!r}, which is not in progress")
        resp = self.open[rid]
        status = r.get("status")
        if status not in _FINAL_RESPONSE:
            raise ContractViolation(f"response.done: status {status!r} is not final")
        details = r.get("status_details")
        if details is not None and details.get("type") not in (None, status):
            raise ContractViolation(f"response.done: status {status!r} but status_details "
                                    f"type {details.get('type')!r}")
        unclosed = [i for i, it in resp.items.items() if it.done_status is None]
        if unclosed:
            raise ContractViolation(f"response.done with items {unclosed} not closed by "
                                    f"response.output_item.done")
        output = r.get("output") or []
        ids = [o.get("id") for o in output]
        if ids != list(resp.items):
            raise ContractViolation(f"response.done: output {ids} is not the items added, "
                                    f"in order: {list(resp.items)}")
        for o in output:
            want = resp.items[o["id"]].done_status
            if o.get("status") != want:
                raise ContractViolation(f"response.done: item {o['id']!r} status "
                                        f"{o.get('status')!r}, its output_item.done said "
                                        f"{want!r}")
            if status == "completed" and want != "completed":
                raise ContractViolation(f"response.done: completed, but item {o['id']!r} is "
                                        f"{want!r}")
        del self.open[rid]
        self.done.add(rid)

"""The OpenAI Realtime protocol (GA shape) as omniframe speaks it: lenient in, strict out.

* Client events are parsed with :func:`parse_client_event` (JSON object with a known ``type``)
  and their fields read with small helpers that raise :class:`ProtocolError` (an ``error``
  event with a code, never a closed socket). Unknown fields are ignored; beta-shaped
  ``session.update`` fields are accepted too.
* Server events are built by :func:`server_event` and the item builders below, GA names only;
  :mod:`omniframe.serve.contract` checks them against the openai SDK's types in tests.
* :class:`SessionConfig` is a session's effective configuration (what ``session.created`` /
  ``session.updated`` report).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CLIENT_EVENTS",
    "INPUT_RATE",
    "OUTPUT_RATE",
    "ProtocolError",
    "SessionConfig",
    "decode_audio",
    "encode_audio",
    "new_id",
    "parse_client_event",
    "server_event",
]

INPUT_RATE = 24000
"""``audio/pcm`` input: 16-bit mono little-endian at 24 kHz (the only rate the API has)."""
OUTPUT_RATE = 24000

CLIENT_EVENTS = frozenset({
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.truncate",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
})


class ProtocolError(Exception):
    """A client event that cannot be honoured: becomes an ``error`` event.

    ``close`` (a WebSocket close code) ends the session after the error event is sent (limits).
    """

    def __init__(self, code: str, message: str, *, param: str | None = None,
                 type_: str = "invalid_request_error", close: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.type = type_
        self.close = close


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: ``event_...``, ``item_...``, ``resp_...``."""
    return f"{prefix}_{secrets.token_hex(10)}"


def server_event(type_: str, **fields: Any) -> dict[str, Any]:
    """A server event: ``{"type", "event_id", **fields}``."""
    return {"type": type_, "event_id": new_id("event"), **fields}


def error_event(exc: ProtocolError, client_event_id: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"type": exc.type, "code": exc.code, "message": exc.message}
    if exc.param is not None:
        err["param"] = exc.param
    if client_event_id is not None:
        err["event_id"] = client_event_id
    return server_event("error", error=err)


def parse_client_event(text: str | bytes) -> dict[str, Any]:
    """A client event as a dict with a known ``type``; :class:`ProtocolError` otherwise."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("invalid_json", f"the message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_event", "a client event must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError("invalid_event", "the event has no 'type' (a string)", param="type")
    if kind not in CLIENT_EVENTS:
        shown = kind if len(kind) <= 80 else kind[:80] + "..."
        raise ProtocolError("unknown_event_type", f"unknown client event type {shown!r}",
                            param="type")
    return data


def field_of(data: dict[str, Any], name: str, kind: type | tuple[type, ...], *,
             required: bool = False, default: Any = None) -> Any:
    """``data[name]`` checked to be of ``kind`` (None/absent gives ``default``)."""
    value = data.get(name)
    if value is None:
        if required:
            raise ProtocolError("missing_required_parameter", f"missing '{name}'", param=name)
        return default
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ProtocolError("invalid_type", f"'{name}' must be a number", param=name)
    if not isinstance(value, kind):
        raise ProtocolError("invalid_type", f"'{name}' has the wrong type "
                            f"({type(value).__name__})", param=name)
    return value


def decode_audio(b64: Any, max_bytes: int) -> np.ndarray:
    """Base64 PCM16 little-endian mono to float32 in -1..1 (a :class:`ProtocolError` for bad
    base64, an odd byte count, or more than ``max_bytes`` of audio)."""
    if not isinstance(b64, str):
        raise ProtocolError("invalid_type", "'audio' must be a base64 string", param="audio")
    if len(b64) > (max_bytes * 4) // 3 + 4:
        raise ProtocolError("audio_too_large", f"an append may carry at most {max_bytes} bytes "
                            f"of audio", param="audio")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_audio", "'audio' is not valid base64", param="audio"
                            ) from None
    if len(raw) % 2:
        raise ProtocolError("invalid_audio", f"'audio' decodes to {len(raw)} bytes, not a whole "
                            f"number of 16-bit samples (audio/pcm is PCM16 mono)", param="audio")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def encode_audio(samples: Any) -> str:
    """float32 -1..1 to base64 PCM16 little-endian."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return base64.b64encode((x * 32767.0).round().astype("<i2").tobytes()).decode("ascii")


# ---------------------------------------------------------------------- items


def _item(item_id: str, type_: str, status: str, **fields: Any) -> dict[str, Any]:
    return {"id": item_id, "object": "realtime.item", "type": type_, "status": status, **fields}


def user_audio_item(item_id: str, transcript: str | None = None) -> dict[str, Any]:
    return _item(item_id, "message", "completed", role="user",
                 content=[{"type": "input_audio", "transcript": transcript}])


def user_text_item(item_id: str, text: str) -> dict[str, Any]:
    return _item(item_id, "message", "completed", role="user",
                 content=[{"type": "input_text", "text": text}])


def assistant_item(item_id: str, status: str, audio: bool, text: str | None) -> dict[str, Any]:
    if text is None:
        content: list[dict[str, Any]] = []
    elif audio:
        content = [{"type": "output_audio", "transcript": text}]
    else:
        content = [{"type": "output_text", "text": text}]
    return _item(item_id, "message", status, role="assistant", content=content)


def function_call_item(item_id: str, status: str, call_id: str, name: str,
                       arguments: str) -> dict[str, Any]:
    return _item(item_id, "function_call", status, call_id=call_id, name=name,
                 arguments=arguments)


def function_output_item(item_id: str, call_id: str, output: str) -> dict[str, Any]:
    return _item(item_id, "function_call_output", "completed", call_id=call_id, output=output)


def system_item(item_id: str, text: str) -> dict[str, Any]:
    return _item(item_id, "message", "completed", role="system",
                 content=[{"type": "input_text", "text": text}])


def content_text(item: dict[str, Any]) -> str:
    """The text of a client message item's content parts (input_text / text / output_text)."""
    parts = item.get("content")
    if not isinstance(parts, list):
        raise ProtocolError("invalid_value", "'item.content' must be a list of parts",
                            param="item.content")
    out = []
    for part in parts:
        if not isinstance(part, dict):
            raise ProtocolError("invalid_value", "each content part must be an object",
                                param="item.content")
        text = part.get("text", part.get("transcript"))
        if isinstance(text, str):
            out.append(text)
    return "".join(out)


# -------------------------------------------------------------------- session


def _num(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ProtocolError("invalid_value", f"'{name}' must be a number in [{lo}, {hi}]",
                            param=name)
    return float(value)


DEFAULT_TURN_DETECTION: dict[str, Any] = {
    "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
    "silence_duration_ms": 500, "create_response": True, "interrupt_response": True,
}
DEFAULT_SEMANTIC_VAD: dict[str, Any] = {
    "type": "semantic_vad", "eagerness": "auto", "create_response": True,
    "interrupt_response": True,
}
#: semantic_vad's eagerness -> (Smart Turn's probability that ends a turn, the longest wait in
#: ms when it says the user is not done). OpenAI's own waits are 8 s (low), 4 s (medium,
#: auto) and 2 s (high); ours are shorter because Smart Turn is asked after 200 ms already.
SEMANTIC_EAGERNESS: dict[str, tuple[float, int]] = {
    "low": (0.7, 4000), "medium": (0.5, 2000), "auto": (0.5, 2000), "high": (0.3, 1000),
}


@dataclass
class SessionConfig:
    """A session's effective configuration, in the GA shape it is reported in."""

    model: str
    instructions: str = ""
    voice: str = "alloy"
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    turn_detection: dict[str, Any] | None = field(
        default_factory=lambda: dict(DEFAULT_TURN_DETECTION))
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "auto"
    max_output_tokens: int | str = "inf"
    temperature: float | None = None
    transcription: dict[str, Any] | None = None  # report the user's transcript when set

    def to_dict(self) -> dict[str, Any]:
        fmt = {"type": "audio/pcm", "rate": INPUT_RATE}
        return {
            "type": "realtime",
            "model": self.model,
            "output_modalities": list(self.output_modalities),
            "instructions": self.instructions,
            "audio": {
                "input": {"format": dict(fmt), "turn_detection": (
                    dict(self.turn_detection) if self.turn_detection is not None else None),
                          "transcription": self.transcription},
                "output": {"format": dict(fmt), "voice": self.voice},
            },
            "tools": list(self.tools),
            "tool_choice": self.tool_choice,
            "max_output_tokens": self.max_output_tokens,
        }

    def parse_update(self, session: Any) -> dict[str, Any]:
        """The changes a ``session.update``'s ``session`` asks for, checked (GA or beta shape;
        unknown fields ignored). Keys: instructions, voice, output_modalities, turn_detection
        (a dict, or None for off), tools, tool_choice, max_output_tokens, temperature."""
        if not isinstance(session, dict):
            raise ProtocolError("invalid_value", "'session' must be an object", param="session")
        out: dict[str, Any] = {}
        if "instructions" in session and session["instructions"] is not None:
            out["instructions"] = field_of(session, "instructions", str)
        audio = session.get("audio") if isinstance(session.get("audio"), dict) else {}
        a_in = audio.get("input") if isinstance(audio.get("input"), dict) else {}
        a_out = audio.get("output") if isinstance(audio.get("output"), dict) else {}
        voice = a_out.get("voice", session.get("voice"))
        if voice is not None:
            if not isinstance(voice, str | dict):
                raise ProtocolError("invalid_type", "'voice' must be a string", param="voice")
            out["voice"] = voice if isinstance(voice, str) else str(voice.get("id", self.voice))
        mods = session.get("output_modalities", session.get("modalities"))
        if mods is not None:
            if not isinstance(mods, list) or not mods or not set(mods) <= {"text", "audio"}:
                raise ProtocolError("invalid_value", "'output_modalities' must be a list of "
                                    "'text' or 'audio'", param="output_modalities")
            out["output_modalities"] = ["audio"] if "audio" in mods else ["text"]
        for fmt in (a_in.get("format"), a_out.get("format"),
                    session.get("input_audio_format"), session.get("output_audio_format")):
            _check_format(fmt)
        if "turn_detection" in a_in or "turn_detection" in session:
            td = a_in["turn_detection"] if "turn_detection" in a_in else session["turn_detection"]
            out["turn_detection"] = self._turn_detection(td)
        if "transcription" in a_in or "input_audio_transcription" in session:
            tr = a_in.get("transcription", session.get("input_audio_transcription"))
            if tr is not None and not isinstance(tr, dict):
                raise ProtocolError("invalid_value", "'transcription' must be an object or "
                                    "null", param="audio.input.transcription")
            out["transcription"] = tr
        if "tools" in session and session["tools"] is not None:
            tools = session["tools"]
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise ProtocolError("invalid_value", "'tools' must be a list of objects",
                                    param="tools")
            out["tools"] = tools
        if isinstance(session.get("tool_choice"), str):
            out["tool_choice"] = session["tool_choice"]
        mot = session.get("max_output_tokens", session.get("max_response_output_tokens"))
        if mot is not None:
            if mot != "inf":
                mot = int(_num(mot, "max_output_tokens", 1, 4096))
            out["max_output_tokens"] = mot
        if session.get("temperature") is not None:
            out["temperature"] = _num(session["temperature"], "temperature", 0.0, 2.0)
        return out

    def _turn_detection(self, td: Any) -> dict[str, Any] | None:
        if td is None:
            return None
        if not isinstance(td, dict):
            raise ProtocolError("invalid_value", "'turn_detection' must be an object or null",
                                param="turn_detection")
        kind = td.get("type", "server_vad")
        if kind not in ("server_vad", "semantic_vad"):
            raise ProtocolError("invalid_value", f"unknown turn_detection type {kind!r}",
                                param="turn_detection.type")
        prev = self.turn_detection if (self.turn_detection or {}).get("type") == kind else None
        base = dict(prev or (DEFAULT_TURN_DETECTION if kind == "server_vad"
                             else DEFAULT_SEMANTIC_VAD))
        if kind == "semantic_vad":  # the VAD plus Smart Turn (end_of_turn: smart_turn)
            eagerness = td.get("eagerness")
            if eagerness is not None:
                if not isinstance(eagerness, str) or eagerness not in SEMANTIC_EAGERNESS:
                    raise ProtocolError(
                        "invalid_value", f"turn_detection.eagerness must be one of "
                        f"{', '.join(SEMANTIC_EAGERNESS)}, got {eagerness!r}",
                        param="turn_detection.eagerness")
                base["eagerness"] = eagerness
        else:
            if td.get("threshold") is not None:
                base["threshold"] = _num(td["threshold"], "turn_detection.threshold", 0.0, 1.0)
            for k in ("prefix_padding_ms", "silence_duration_ms"):
                if td.get(k) is not None:
                    base[k] = int(_num(td[k], f"turn_detection.{k}", 0, 60_000))
        for k in ("create_response", "interrupt_response"):
            if td.get(k) is not None:
                if not isinstance(td[k], bool):
                    raise ProtocolError("invalid_type", f"'turn_detection.{k}' must be a "
                                        f"boolean", param=f"turn_detection.{k}")
                base[k] = td[k]
        return base

    def apply(self, changes: dict[str, Any]) -> None:
        for k, v in changes.items():
            setattr(self, k, v)


def _check_format(fmt: Any) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    rate = fmt.get("rate", INPUT_RATE) if isinstance(fmt, dict) else INPUT_RATE
    if kind not in ("audio/pcm", "pcm16") or rate != INPUT_RATE:
        raise ProtocolError("unsupported_audio_format",
                            f"only audio/pcm (PCM16) at 24000 Hz is supported, got {fmt!r}",
                            param="audio.format")

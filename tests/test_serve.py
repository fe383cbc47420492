"""``omniframe serve`` against real clients: a server process on an ephemeral loopback port,
the openai SDK's realtime client and a raw ``websockets`` client, the model-free echo pipeline
(configs/serve_echo.yaml). Every event the clients receive is checked against the SDK's own
GA types and the response lifecycle (:class:`ContractChecker`); the server runs with
``--check-events`` too, so a bad event would arrive as a ``server_contract_violation`` error.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")

from omniframe.serve.contract import ContractChecker, ContractViolation  # noqa: E402
from omniframe.serve.protocol import encode_audio  # noqa: E402
from omniframe.testing import speech_like  # noqa: E402

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"


class Server:
    def __init__(self, *args: str, config: str = "configs/serve_echo.yaml",
                 key: str | None = KEY) -> None:
        cmd = [sys.executable, "-m", "omniframe", "serve", config, "--port", "0",
               "--check-events", *args]
        if key is not None:
            cmd += ["--api-key", key]
        env = {k: v for k, v in os.environ.items() if k != "OMNIFRAME_API_KEY"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.port = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.port:
            for line in list(self.lines):
                m = re.search(r"ws://127\.0\.0\.1:(\d+)/v1/realtime", line)
                if m:
                    self.port = int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if not self.port:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # a little time per word, so that an answer can be cancelled half-way
    s = Server("--set", "lm.options.token_delay_s=0.05", "--max-message-bytes", "300000")
    yield s
    s.stop()
    log = "".join(s.lines)
    assert "breaks the contract" not in log, log
    assert "Traceback" not in log, log


class Client:
    """Sends client events, receives server events (each checked against the contract)."""

    def __init__(self, send: Any, recv: Any) -> None:
        self._send, self._recv = send, recv
        self.checker = ContractChecker()
        self.events: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self._send(event)

    async def recv(self) -> dict[str, Any]:
        e = json.loads(await self._recv())
        self.checker.feed(e)
        assert not (e["type"] == "error" and e["error"]["code"] == "server_contract_violation"), e
        self.events.append(e)
        return e

    async def until(self, type_: str, timeout: float = 15.0, **match: Any) -> list[dict]:
        """Events up to and including the first of ``type_`` (whose fields match)."""
        got = []
        with anyio.fail_after(timeout):
            while True:
                e = await self.recv()
                got.append(e)
                if e["type"] == type_ and all(e.get(k) == v for k, v in match.items()):
                    return got

    async def say(self, text: str) -> None:
        await self.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": text}]}})

    async def append(self, x: Any, chunk: int = 4800) -> None:
        for i in range(0, len(x), chunk):
            await self.send({"type": "input_audio_buffer.append",
                             "audio": encode_audio(x[i:i + chunk])})


@contextlib.asynccontextmanager
async def sdk_client(server: Server, model: str = "echo"):
    client = openai.AsyncOpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{server.port}/v1")
    async with client.realtime.connect(model=model) as conn:
        c = Client(conn.send, conn.recv_bytes)
        first = await c.recv()
        assert first["type"] == "session.created"
        yield c


@contextlib.asynccontextmanager
async def raw_client(server: Server, **kwargs: Any):
    headers = kwargs.pop("additional_headers", {"Authorization": f"Bearer {KEY}"})
    async with websockets.connect(server.url + "?model=echo", additional_headers=headers,
                                  **kwargs) as ws:
        async def send(e: Any) -> None:
            await ws.send(e if isinstance(e, str) else json.dumps(e))
        c = Client(send, ws.recv)
        c.ws = ws  # type: ignore[attr-defined]
        yield c


def pcm_samples(events: list[dict], response_id: str) -> int:
    n = 0
    for e in events:
        if e["type"] == "response.output_audio.delta" and e["response_id"] == response_id:
            raw = base64.b64decode(e["delta"])
            assert len(raw) % 2 == 0 and len(raw) <= 2 * 2400  # <= 100 ms per delta
            n += len(raw) // 2
    return n


def echo_samples(answer: str) -> int:
    """What the echo codec speaks for ``answer`` (0.02 s per character of each word delta)."""
    words = answer.split(" ")
    deltas = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return sum(max(1, int(len(d) * 0.02 * 24000)) for d in deltas)


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


# ------------------------------------------------------------------------- SDK client


async def test_text_turn_golden_sequence(server: Server) -> None:
    """SDK client: user text item + response.create -> the full GA sequence, ids consistent,
    audio and transcript deltas, the audio's length what the echo codec made."""
    async with sdk_client(server) as c:
        await c.say("hello there")
        await c.send({"type": "response.create"})
        evs = await c.until("response.done")
    user_added = evs[0]
    assert types(evs[:2]) == ["conversation.item.added", "conversation.item.done"]
    assert user_added["item"]["content"][0] == {"type": "input_text", "text": "hello there"}
    created = evs[2]
    assert created["type"] == "response.created"
    rid = created["response"]["id"]
    assert types(evs[3:6]) == ["response.output_item.added", "conversation.item.added",
                               "response.content_part.added"]
    item_id = evs[3]["item"]["id"]
    assert evs[4]["previous_item_id"] == user_added["item"]["id"]
    assert types(evs[-6:]) == [
        "response.output_audio.done", "response.output_audio_transcript.done",
        "response.content_part.done", "response.output_item.done", "conversation.item.done",
        "response.done"]
    deltas = [e for e in evs if e["type"].endswith(".delta")]
    assert deltas and all(e["response_id"] == rid and e["item_id"] == item_id
                          and e["output_index"] == 0 and e["content_index"] == 0
                          for e in deltas)
    transcript = "".join(e["delta"] for e in evs
                         if e["type"] == "response.output_audio_transcript.delta")
    assert transcript == "You said: hello there"
    done = evs[-1]["response"]
    assert done["status"] == "completed" and done["id"] == rid
    assert done["output"][0]["content"][0]["transcript"] == transcript
    assert pcm_samples(evs, rid) == echo_samples(transcript)
    assert not any(e["type"] == "error" for e in evs)


async def test_audio_turn_server_vad(server: Server) -> None:
    """Speech-like audio at 24 kHz: speech_started/stopped at the right times, committed, the
    user item, then an automatic response with audio and transcript."""
    x = speech_like([("silence", 0.5), ("speech", 1.2), ("silence", 1.0)], sample_rate=24000)
    async with sdk_client(server) as c:
        await c.append(x)
        evs = await c.until("response.done")
    t = types(evs)
    assert t[:5] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.added",
                     "conversation.item.done"]
    started, stopped, committed = evs[0], evs[1], evs[2]
    assert abs(started["audio_start_ms"] - 500) <= 100
    assert abs(stopped["audio_end_ms"] - 1700) <= 100
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert evs[3]["item"]["content"][0]["type"] == "input_audio"
    rid = evs[-1]["response"]["id"]
    transcript = "".join(e["delta"] for e in evs
                         if e["type"] == "response.output_audio_transcript.delta")
    assert re.fullmatch(r"I heard \d\.\d seconds of speech\.", transcript), transcript
    assert pcm_samples(evs, rid) == echo_samples(transcript)


async def test_text_only_response_with_instructions(server: Server) -> None:
    """output_modalities text: output_text deltas, no audio; response.create's own
    instructions reach the pipeline (RespondFrame), and its metadata is echoed."""
    async with sdk_client(server) as c:
        await c.send({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"], "instructions": "Be brief."}})
        upd = (await c.until("session.updated"))[-1]
        assert upd["session"]["output_modalities"] == ["text"]
        assert upd["session"]["instructions"] == "Be brief."
        await c.send({"type": "response.create", "response": {
            "instructions": "the sky is blue", "metadata": {"client_event_id": "r1"}}})
        evs = await c.until("response.done")
    assert evs[0]["type"] == "response.created"
    assert evs[0]["response"]["metadata"] == {"client_event_id": "r1"}
    assert not any(e["type"].startswith("response.output_audio") for e in evs)
    text = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
    assert text == "You said: the sky is blue"
    assert [e["text"] for e in evs if e["type"] == "response.output_text.done"] == [text]
    assert evs[-1]["response"]["output_modalities"] == ["text"]


async def test_response_cancel_mid_answer(server: Server) -> None:
    """response.cancel after the first audio: response.done cancelled (client_cancelled),
    nothing of that response after it; the session goes on; a cancel with nothing in
    progress is the error Pipecat tolerates."""
    long = " ".join(f"word{i}" for i in range(30))  # 30+ words at 50 ms: 1.6 s
    async with sdk_client(server) as c:
        await c.say(long)
        await c.send({"type": "response.create"})
        evs = await c.until("response.output_audio.delta")
        rid = evs[-1]["response_id"]
        t0 = time.monotonic()
        await c.send({"type": "response.cancel"})
        evs = await c.until("response.done")
        assert time.monotonic() - t0 < 1.0
        done = evs[-1]["response"]
        assert done["id"] == rid and done["status"] == "cancelled"
        assert done["status_details"]["reason"] == "client_cancelled"
        assert done["output"][0]["status"] == "incomplete"
        heard = "".join(e["delta"] for e in c.events
                        if e["type"] == "response.output_audio_transcript.delta")
        assert len(heard.split()) < 20
        await c.send({"type": "response.cancel"})
        err = (await c.until("error"))[-1]
        assert err["error"]["code"] == "response_cancel_not_active"
        await c.say("again")  # still usable; nothing of the cancelled answer comes back
        await c.send({"type": "response.create"})
        evs = await c.until("response.done")
        assert evs[-1]["response"]["status"] == "completed"
        idx = next(i for i, e in enumerate(c.events)
                   if e["type"] == "response.done" and e["response"]["id"] == rid)
        after = c.events[idx + 1:]
        assert not any(e.get("response_id") == rid for e in after)


async def test_barge_in_cancels_the_answer(server: Server) -> None:
    """User speech during an answer (server VAD, interrupt_response): the answer ends with
    response.done cancelled / turn_detected, nothing of it follows, the speech is answered."""
    long = " ".join(f"word{i}" for i in range(30))
    x = speech_like([("speech", 0.8), ("silence", 0.8)], sample_rate=24000)
    async with sdk_client(server) as c:
        await c.say(long)
        await c.send({"type": "response.create"})
        rid = (await c.until("response.output_audio.delta"))[-1]["response_id"]
        await c.append(x)
        evs = await c.until("response.done")
        t = types(evs)  # speech_started first, then the answer's closing events
        start = t.index("input_audio_buffer.speech_started")
        assert start < t.index("response.output_audio.done")
        assert not any(e["type"].endswith(".delta") for e in evs[start:])
        done = evs[-1]["response"]
        assert done["id"] == rid and done["status"] == "cancelled"
        assert done["status_details"]["reason"] == "turn_detected"
        evs = await c.until("response.done")  # the answer to the interrupting speech
        assert "input_audio_buffer.speech_started" in types(c.events)
        assert evs[-1]["response"]["status"] == "completed"
        idx = next(i for i, e in enumerate(c.events)
                   if e["type"] == "response.done" and e["response"]["id"] == rid)
        assert not any(e.get("response_id") == rid for e in c.events[idx + 1:])
        transcript = evs[-1]["response"]["output"][0]["content"][0]["transcript"]
        assert transcript.startswith("I heard")


async def test_truncate_cuts_history(server: Server) -> None:
    """conversation.item.truncate of a finished answer at half its audio: truncated event,
    and the conversation keeps only the heard words (conversation.item.retrieve); bad
    truncates are errors with codes and the session stays usable."""
    async with sdk_client(server) as c:
        await c.say("one two three four five six")
        await c.send({"type": "response.create"})
        evs = await c.until("response.done")
        item = evs[-1]["response"]["output"][0]
        full = item["content"][0]["transcript"]
        total_ms = pcm_samples(evs, evs[-1]["response"]["id"]) * 1000 // 24000
        await c.send({"type": "conversation.item.truncate", "item_id": item["id"],
                      "content_index": 0, "audio_end_ms": total_ms + 500})
        err = (await c.until("error"))[-1]["error"]
        assert err["code"] == "invalid_value" and err["param"] == "audio_end_ms"
        await c.send({"type": "conversation.item.truncate", "item_id": "item_nope",
                      "content_index": 0, "audio_end_ms": 0})
        assert (await c.until("error"))[-1]["error"]["code"] == "item_truncate_invalid_item_id"
        half = total_ms // 2
        await c.send({"type": "conversation.item.truncate", "item_id": item["id"],
                      "content_index": 0, "audio_end_ms": half})
        tr = (await c.until("conversation.item.truncated"))[-1]
        assert tr["item_id"] == item["id"] and tr["audio_end_ms"] == half
        await c.send({"type": "conversation.item.retrieve", "item_id": item["id"]})
        got = (await c.until("conversation.item.retrieved"))[-1]["item"]
        heard = got["content"][0]["transcript"]
        assert heard and full.startswith(heard) and len(heard) < len(full)
        # the full length is valid (Pipecat truncates finished items at their length)
        await c.send({"type": "conversation.item.truncate", "item_id": item["id"],
                      "content_index": 0, "audio_end_ms": total_ms})
        await c.until("conversation.item.truncated", audio_end_ms=total_ms)


async def test_session_update_vad_threshold(server: Server) -> None:
    """turn_detection.threshold maps onto the VAD's live threshold: at 0.95 the speech is
    not detected, at 0.5 it is; session.updated reports the effective config."""
    x = speech_like([("silence", 0.3), ("speech", 0.8), ("silence", 0.8)], sample_rate=24000)
    async with sdk_client(server) as c:
        await c.send({"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"turn_detection": {"type": "server_vad", "threshold": 0.95,
                                         "silence_duration_ms": 300}}}}})
        upd = (await c.until("session.updated"))[-1]["session"]
        td = upd["audio"]["input"]["turn_detection"]
        assert td["threshold"] == 0.95 and td["silence_duration_ms"] == 300
        await c.append(x)
        await c.say("marker")  # ordered after the audio in time: its answer ends the wait
        await c.send({"type": "response.create"})
        evs = await c.until("response.done")
        assert "input_audio_buffer.speech_started" not in types(evs)
        await c.send({"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"turn_detection": {"type": "server_vad", "threshold": 0.5}}}}})
        await c.until("session.updated")
        await c.append(x)
        evs = await c.until("response.done")
        assert "input_audio_buffer.speech_started" in types(evs)


def smart_turn_available() -> bool:
    from omniframe_audio.smart_turn import smart_turn_available as available

    return available()


@pytest.mark.skipif(not smart_turn_available(),
                    reason="the Smart Turn model ships in pipecat-ai (scripts/setup.sh)")
async def test_semantic_vad_ends_a_finished_question_without_the_long_silence(
        server: Server) -> None:
    """semantic_vad switches the VAD to Smart Turn: a finished question followed by 700 ms of
    silence ends the turn, where server_vad with 1500 ms of silence_duration does not."""
    from omniframe.testing import espeak

    speech = espeak("Tell me about the weather in Paris.", sample_rate=24000)
    x = np.concatenate([np.zeros(7200, np.float32), speech, np.zeros(16800, np.float32)])
    async with sdk_client(server) as c:
        await c.send({"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"turn_detection": {"type": "server_vad",
                                         "silence_duration_ms": 1500}}}}})
        await c.until("session.updated")
        await c.append(x)
        await c.say("marker")
        await c.send({"type": "response.create"})
        evs = await c.until("response.done", timeout=30)
        assert "input_audio_buffer.speech_stopped" not in types(evs)
    async with sdk_client(server) as c:  # a new session: no turn left open
        await c.send({"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"turn_detection": {"type": "semantic_vad", "eagerness": "low"}}}}})
        td = (await c.until("session.updated"))[-1]["session"]["audio"]["input"][
            "turn_detection"]
        assert td == {"type": "semantic_vad", "eagerness": "low", "create_response": True,
                      "interrupt_response": True}
        await c.append(x)
        evs = await c.until("input_audio_buffer.speech_stopped", timeout=30)
        stopped = evs[-1]["audio_end_ms"]
        await c.until("response.done", timeout=30)

        await c.send({"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"turn_detection": {"type": "semantic_vad", "eagerness": "sometimes"}}}}})
        err = (await c.until("error"))[-1]["error"]
        assert err["param"] == "turn_detection.eagerness" and "low" in err["message"]
        # back to silence: 300 ms now ends a turn (the end-of-turn model is off again)
        await c.send({"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
        td = (await c.until("session.updated"))[-1]["session"]["audio"]["input"][
            "turn_detection"]
        assert td["type"] == "server_vad" and td["silence_duration_ms"] == 300
    speech_end_ms = 1000 * (7200 + np.flatnonzero(np.abs(speech) > 0.02)[-1]) / 24000
    assert abs(stopped - speech_end_ms) < 100  # where the question ended


async def test_no_turn_detection_commit_and_clear(server: Server) -> None:
    """turn_detection null: audio waits in the buffer; commit makes the user item and the
    answer (response.create adopts it); clear empties the buffer; an empty commit errors."""
    x = speech_like([("speech", 1.0)], sample_rate=24000)
    async with sdk_client(server) as c:
        await c.send({"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"turn_detection": None}}}})
        upd = (await c.until("session.updated"))[-1]["session"]
        assert upd["audio"]["input"]["turn_detection"] is None
        await c.send({"type": "input_audio_buffer.commit"})
        assert (await c.until("error"))[-1]["error"]["code"] == "input_audio_buffer_commit_empty"
        await c.append(x)
        await c.send({"type": "input_audio_buffer.clear"})
        await c.until("input_audio_buffer.cleared")
        await c.send({"type": "input_audio_buffer.commit"})
        assert (await c.until("error"))[-1]["error"]["code"] == "input_audio_buffer_commit_empty"
        await c.append(x)
        await c.send({"type": "input_audio_buffer.commit"})
        await c.send({"type": "response.create"})
        evs = await c.until("response.done")
        assert "input_audio_buffer.speech_started" not in types(evs)
        assert types(evs)[:3] == ["input_audio_buffer.committed", "conversation.item.added",
                                  "conversation.item.done"]
        transcript = "".join(e["delta"] for e in evs
                             if e["type"] == "response.output_audio_transcript.delta")
        assert transcript == "I heard 1.0 seconds of speech."
        assert types(evs).count("response.created") == 1


async def test_answers_wait_for_response_create(server: Server) -> None:
    """A user text item, and a VAD turn with create_response false, are not answered until
    response.create (the pipeline's answer is held, then released in order)."""
    x = speech_like([("speech", 0.8), ("silence", 0.8)], sample_rate=24000)
    async with sdk_client(server) as c:
        await c.say("not yet")
        await anyio.sleep(0.6)  # the echo answer (4 words, 50 ms each) is made meanwhile
        await c.send({"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"turn_detection": {"type": "server_vad", "create_response": False}}}}})
        evs = await c.until("session.updated")
        assert not any(e["type"].startswith("response.") for e in evs)
        await c.send({"type": "response.create"})
        evs = await c.until("response.done")
        assert evs[0]["type"] == "response.created"
        assert evs[-1]["response"]["output"][0]["content"][0]["transcript"] == (
            "You said: not yet")
        await c.append(x)
        evs = await c.until("conversation.item.done")
        assert "input_audio_buffer.committed" in types(evs)
        await anyio.sleep(0.8)
        await c.send({"type": "input_audio_buffer.clear"})
        evs = await c.until("input_audio_buffer.cleared")
        assert not any(e["type"].startswith("response.") for e in evs)
        await c.send({"type": "response.create"})
        evs = await c.until("response.done")
        transcript = evs[-1]["response"]["output"][0]["content"][0]["transcript"]
        assert transcript.startswith("I heard")
        assert pcm_samples(evs, evs[-1]["response"]["id"]) == echo_samples(transcript)


async def test_beta_shaped_session_update_is_accepted(server: Server) -> None:
    """Lenient in: a beta-shaped session.update (flat fields, pcm16) is understood, and the
    answer is reported in the GA shape."""
    async with sdk_client(server) as c:
        await c.send({"type": "session.update", "session": {
            "modalities": ["text"], "input_audio_format": "pcm16",
            "output_audio_format": "pcm16", "voice": "alloy",
            "turn_detection": {"type": "server_vad", "threshold": 0.6,
                               "silence_duration_ms": 450},
            "input_audio_transcription": {"model": "whisper-1"}}})
        s = (await c.until("session.updated"))[-1]["session"]
    assert s["type"] == "realtime" and s["output_modalities"] == ["text"]
    assert s["audio"]["input"]["turn_detection"]["threshold"] == 0.6
    assert s["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 450
    assert s["audio"]["input"]["transcription"] == {"model": "whisper-1"}
    assert s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}


# ------------------------------------------------------------------- raw client, errors


async def test_bad_client_events_are_errors_with_codes(server: Server) -> None:
    """Each bad client event gets an error event with a code and the session stays open;
    a too-large message gets its error, then a close with 1009."""
    async with raw_client(server) as c:
        assert (await c.recv())["type"] == "session.created"
        cases = [
            ("{not json", "invalid_json"),
            (json.dumps([1, 2]), "invalid_event"),
            (json.dumps({"no": "type"}), "invalid_event"),
            (json.dumps({"type": "response.audio.delta"}), "unknown_event_type"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}),
             "invalid_audio"),
            (json.dumps({"type": "input_audio_buffer.append",
                         "audio": base64.b64encode(b"\x01\x02\x03").decode()}),
             "invalid_audio"),
            (json.dumps({"type": "conversation.item.create"}), "missing_required_parameter"),
            (json.dumps({"type": "session.update", "session": {"audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 16000}}}}}),
             "unsupported_audio_format"),
            (json.dumps({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": "nope", "output": "{}"}}),
             "invalid_call_id"),
        ]
        for text, code in cases:
            await c.send(text)
            err = (await c.until("error"))[-1]["error"]
            assert err["code"] == code, (text, err)
            assert err["message"]
        await c.send({"type": "session.update", "event_id": "ev1",
                      "session": {"type": "realtime", "unknown_field": 1}})
        await c.until("session.updated")  # unknown fields: ignored, no error
        await c.send({"type": "response.cancel", "event_id": "ev2"})
        err = (await c.until("error"))[-1]["error"]
        assert err["event_id"] == "ev2"
        await c.send("x" * 300_001)
        err = (await c.until("error"))[-1]["error"]
        assert err["code"] == "message_too_large"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            with anyio.fail_after(5):
                await c.recv()
        assert closed.value.rcvd.code == 1009


async def test_auth_and_unknown_model(server: Server) -> None:
    """No key or a wrong key: refused with HTTP 401 before the socket opens; the browser
    subprotocol key works (the 'realtime' subprotocol is echoed); an unknown model is an
    error event, then close 1008."""
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(websockets.InvalidStatus) as exc:
            async with websockets.connect(server.url, additional_headers=headers):
                pass
        assert exc.value.response.status_code == 401
    async with websockets.connect(
            server.url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await ws.recv())["type"] == "session.created"
    async with websockets.connect(server.url + "?model=nope",
                                  additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        err = json.loads(await ws.recv())
        assert err["type"] == "error" and err["error"]["code"] == "model_not_found"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1008
    with pytest.raises(websockets.InvalidStatus) as exc:
        async with websockets.connect(server.url, additional_headers={
                "Authorization": f"Bearer {KEY}", "Origin": "http://evil.example"}):
            pass
    assert exc.value.response.status_code == 403


async def test_session_cap_and_idle_timeout() -> None:
    """--max-sessions 1: a second session gets session_limit_reached and close 1013, and
    the slot is free again once the first leaves; --idle-seconds: error, then close 1001."""
    s = Server("--max-sessions", "1", "--idle-seconds", "1.5", key=None)
    try:
        async with websockets.connect(s.url) as first:
            assert json.loads(await first.recv())["type"] == "session.created"
            async with websockets.connect(s.url) as second:
                err = json.loads(await second.recv())
                assert err["error"]["code"] == "session_limit_reached"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await second.recv()
                assert closed.value.rcvd.code == 1013
        with anyio.fail_after(10):
            while True:  # the server notices the first one left
                async with websockets.connect(s.url) as again:
                    e = json.loads(await again.recv())
                    if e["type"] == "session.created":
                        err = json.loads(await again.recv())  # nothing sent: idle timeout
                        assert err["error"]["code"] == "session_idle_timeout"
                        with pytest.raises(websockets.ConnectionClosed) as closed:
                            await again.recv()
                        assert closed.value.rcvd.code == 1001
                        break
                await anyio.sleep(0.1)
    finally:
        s.stop()


async def test_sessions_are_isolated(server: Server) -> None:
    """Two sessions at once, different inputs: each gets its own answer only."""
    async def one(text: str) -> str:
        async with sdk_client(server) as c:
            await c.say(text)
            await c.send({"type": "response.create"})
            evs = await c.until("response.done")
            return evs[-1]["response"]["output"][0]["content"][0]["transcript"]

    results: dict[str, str] = {}
    async with anyio.create_task_group() as tg:
        for word in ("alpha beta", "gamma delta"):
            async def run(w: str = word) -> None:
                results[w] = await one(w)
            tg.start_soon(run)
    assert results == {"alpha beta": "You said: alpha beta",
                       "gamma delta": "You said: gamma delta"}


async def test_metrics_extension_only_when_asked(server: Server) -> None:
    """?omniframe_metrics=1 adds an omniframe.metrics event per turn (the pipeline's
    MetricsFrame); without it no extension event is sent (the other tests' checkers would
    refuse its type)."""
    url = server.url + "?model=echo&omniframe_metrics=1"
    async with websockets.connect(url, additional_headers={
            "Authorization": f"Bearer {KEY}"}) as ws:
        c = Client(lambda e: ws.send(json.dumps(e)), ws.recv)
        c.checker = ContractChecker(allow_extensions=True)
        await c.recv()
        await c.say("metrics please")
        await c.send({"type": "response.create"})
        m = (await c.until("omniframe.metrics"))[-1]
    assert m["end_reason"] == "completed" and m["turn"] >= 1
    assert m["audio_out_s"] > 0, m


# ------------------------------------------------------------------ contract checker


def _good_stream() -> list[dict]:
    def ev(t: str, **f: Any) -> dict:
        ev.n += 1  # type: ignore[attr-defined]
        return {"type": t, "event_id": f"event_{ev.n}", **f}  # type: ignore[attr-defined]
    ev.n = 0  # type: ignore[attr-defined]
    ids = {"response_id": "r1", "item_id": "i1", "output_index": 0, "content_index": 0}
    item = {"id": "i1", "type": "message", "role": "assistant", "content": []}
    return [
        ev("response.created", response={"id": "r1", "status": "in_progress", "output": [],
                                         "status_details": None}),
        ev("response.output_item.added", response_id="r1", output_index=0, item=item),
        ev("response.content_part.added", part={"type": "audio", "transcript": ""}, **ids),
        ev("response.output_audio.delta", delta=base64.b64encode(b"\0\0").decode(), **ids),
        ev("response.output_audio_transcript.delta", delta="hi", **ids),
        ev("response.output_audio.done", **ids),
        ev("response.output_audio_transcript.done", transcript="hi", **ids),
        ev("response.content_part.done", part={"type": "audio", "transcript": "hi"}, **ids),
        ev("response.output_item.done", response_id="r1", output_index=0,
           item=dict(item, status="completed")),
        ev("response.done", response={"id": "r1", "status": "completed",
                                      "output": [dict(item, status="completed")],
                                      "status_details": {"type": "completed"}}),
    ]


def test_contract_checker_accepts_a_good_stream() -> None:
    assert ContractChecker().check_all(_good_stream()) == 10


@pytest.mark.parametrize("breakage", [
    "delta_before_item", "missing_field", "beta_name", "item_created", "odd_audio",
    "after_done", "extra_field", "wrong_type", "repeated_id", "webrtc_only",
    "no_status_details"])
def test_contract_checker_catches_a_broken_stream(breakage: str) -> None:
    """The negative test: each way of breaking the stream is caught."""
    s = _good_stream()
    if breakage == "delta_before_item":
        s.insert(1, s.pop(3))
    elif breakage == "missing_field":
        del s[3]["item_id"]
    elif breakage == "beta_name":
        s[3]["type"] = "response.audio.delta"
    elif breakage == "item_created":
        s.insert(1, {"type": "conversation.item.created", "event_id": "x",
                     "item": {"id": "i9", "type": "message", "role": "user", "content": []}})
    elif breakage == "odd_audio":
        s[3]["delta"] = base64.b64encode(b"\0\0\0").decode()
    elif breakage == "after_done":
        s.append(dict(s[4], event_id="late"))
    elif breakage == "extra_field":
        s[4]["omniframe_latency"] = 1.0
    elif breakage == "wrong_type":
        s[3]["output_index"] = "zero"
    elif breakage == "repeated_id":
        s[4]["event_id"] = s[3]["event_id"]
    elif breakage == "webrtc_only":  # a valid SDK type, but not for a WebSocket client
        s.insert(1, {"type": "output_audio_buffer.started", "event_id": "x",
                     "response_id": "r1"})
    elif breakage == "no_status_details":
        del s[0]["response"]["status_details"]
    with pytest.raises(ContractViolation):
        ContractChecker().check_all(s)


async def test_graceful_shutdown_closes_sessions() -> None:
    """SIGTERM with a session open: the client sees a close with a code, the server ends
    within seconds, without a traceback."""
    s = Server(key=None)
    try:
        async with websockets.connect(s.url) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            s.proc.terminate()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                with anyio.fail_after(10):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code in (1001, 1012)
        # uvicorn re-raises the signal once it has shut down: the exit is "by SIGTERM"
        assert s.proc.wait(10) in (0, -15)
        assert "Traceback" not in "".join(s.lines)
    finally:
        s.stop()


def test_serve_core_import_stays_light() -> None:
    """import omniframe (and its CLI, which lists serve) pulls no starlette/uvicorn/torch."""
    code = ("import sys, omniframe, omniframe.cli; "
            "print([m for m in ('starlette', 'uvicorn', 'torch', 'openai') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_serve_refuses_open_bind_without_key() -> None:
    out = subprocess.run([sys.executable, "-m", "omniframe", "serve",
                          "configs/serve_echo.yaml", "--host", "0.0.0.0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "--api-key" in out.stderr


def test_audio_helpers_round_trip() -> None:
    from omniframe.serve.protocol import decode_audio

    x = np.sin(np.linspace(0, 20, 2400)).astype(np.float32) * 0.5
    y = decode_audio(encode_audio(x), 1 << 20)
    assert np.max(np.abs(x - y)) < 1e-4


async def test_input_is_resampled_to_the_pipeline_rate() -> None:
    """24 kHz PCM16 in, the pipeline's 16 kHz out of the live source: same length (2/3 of
    the samples), the tone at the same frequency, no clicks at the 20 ms append edges."""
    from omniframe.serve.bridge import Limits, RealtimeSession, load_served

    served = load_served([str(ROOT / "configs" / "serve_echo.yaml")])["echo"]

    async def nothing(*args: Any) -> None:
        return None

    bridge = RealtimeSession(served, Limits(), nothing, nothing)
    bridge.ready.set()  # the pipeline is not run: the source's queue is read directly
    t = np.arange(24000) / 24000
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for i in range(0, len(x), 480):  # 20 ms appends
        await bridge.handle({"type": "input_audio_buffer.append",
                             "audio": encode_audio(x[i:i + 480])})
    rx = bridge.pipeline.stages[0].rx
    got = []
    while True:
        try:
            got.append(rx.receive_nowait())
        except anyio.WouldBlock:
            break
    y = np.concatenate(got)
    assert abs(len(y) - 16000) <= 20  # the resampler holds back < 1 ms of look-ahead
    spectrum = np.abs(np.fft.rfft(y[1000:15000] * np.hanning(14000)))
    peak_hz = np.argmax(spectrum) * 16000 / 14000
    assert abs(peak_hz - 440) < 2
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(y)) / 16000)
    assert np.max(np.abs(y[200:-200] - ref[200:-200])) < 0.01

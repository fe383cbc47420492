"""``omniframe serve`` limits, each against a real server process on loopback (the echo
pipeline): every limit is an ``error`` event with a code, then a close with a code (or, for a
client that does not read, a drop that frees its slot). The session cap and the idle
timeout, the message size and graceful shutdown without a response in flight are in
tests/test_serve.py. About 25 s in all (five short-lived servers).
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
websockets = pytest.importorskip("websockets")

from omniframe.serve.protocol import encode_audio  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import Server  # noqa: E402  (its server process helper)

pytestmark = pytest.mark.anyio


async def _open(url: str, **kwargs: Any) -> Any:
    ws = await websockets.connect(url, **kwargs)
    first = json.loads(await ws.recv())
    assert first["type"] == "session.created", first
    return ws


async def _send(ws: Any, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


async def _until(ws: Any, type_: str, timeout: float = 10.0) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            e = json.loads(await ws.recv())
            if e["type"] == type_:
                return e


async def _closed(ws: Any, timeout: float = 10.0) -> tuple[list[dict], Any]:
    """Events until the server closes; the close frame it sent."""
    events = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        with anyio.fail_after(timeout):
            while True:
                events.append(json.loads(await ws.recv()))
    return events, closed.value.rcvd


def _error_then_close(events: list[dict], rcvd: Any, code: str, close: int) -> None:
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert errors and errors[-1]["code"] == code and errors[-1]["message"], events[-3:]
    assert rcvd is not None and rcvd.code == close, rcvd


def _health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


async def test_items_buffer_and_audio_rate() -> None:
    """--max-items: the item past the limit is conversation_too_long, close 1008;
    --max-buffer-seconds (turn_detection null): input_audio_buffer_too_large, close 1009;
    --max-audio-rate / --audio-burst-seconds: audio faster than allowed is
    input_audio_rate_exceeded, close 1008, while audio within the burst is taken."""
    s = Server("--max-items", "3", "--max-buffer-seconds", "1", "--max-audio-rate", "1",
               "--audio-burst-seconds", "2", key=None)
    try:
        ws = await _open(s.url)
        for i in range(3):
            await _send(ws, {"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": f"item {i}"}]}})
            await _until(ws, "conversation.item.done")
        await _send(ws, {"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text",
                                                            "text": "one too many"}]}})
        _error_then_close(*await _closed(ws), "conversation_too_long", 1008)

        ws = await _open(s.url)
        await _send(ws, {"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"turn_detection": None}}}})
        await _until(ws, "session.updated")
        chunk = np.zeros(4800, dtype=np.float32)  # 200 ms
        for _ in range(6):  # 1.2 s > 1 s
            await _send(ws, {"type": "input_audio_buffer.append", "audio": encode_audio(chunk)})
        _error_then_close(*await _closed(ws), "input_audio_buffer_too_large", 1009)

        ws = await _open(s.url)
        quiet = np.zeros(24000 * 3 // 2, dtype=np.float32)  # 1.5 s at once: within the burst
        await _send(ws, {"type": "input_audio_buffer.append", "audio": encode_audio(quiet)})
        await _send(ws, {"type": "input_audio_buffer.clear"})
        await _until(ws, "input_audio_buffer.cleared")  # no error came before it
        await _send(ws, {"type": "input_audio_buffer.append", "audio": encode_audio(quiet)})
        _error_then_close(*await _closed(ws), "input_audio_rate_exceeded", 1008)
    finally:
        s.stop()
    assert "Traceback" not in "".join(s.lines)


async def test_per_client_cap_and_session_length() -> None:
    """--max-sessions-per-client 1: a second session from the same address is refused
    (client_session_limit_reached, 1013) while the first is open; --max-session-seconds:
    a busy session still ends (session_expired, 1001), and its address may open another;
    so it may after a session that ended by a TCP reset."""
    s = Server("--max-sessions-per-client", "1", "--max-session-seconds", "1.5", key=None)
    try:
        first = await _open(s.url)
        second = await websockets.connect(s.url)
        _error_then_close(*await _closed(second), "client_session_limit_reached", 1013)

        async def busy() -> None:  # never idle: a clear every 200 ms
            while True:
                await _send(first, {"type": "input_audio_buffer.clear"})
                await anyio.sleep(0.2)

        async with anyio.create_task_group() as tg:
            tg.start_soon(busy)
            events, rcvd = await _closed(first)
            tg.cancel_scope.cancel()
        _error_then_close(events, rcvd, "session_expired", 1001)  # not idle: it was busy

        async def no_sessions() -> None:  # the server has noticed the last one left
            with anyio.fail_after(10):
                while _health(s.port)["sessions"]:  # noqa: ASYNC110
                    await anyio.sleep(0.05)

        await no_sessions()
        # an abrupt drop (TCP reset, no close frame) frees the slot too
        sock = socket.socket()
        sock.connect(("127.0.0.1", s.port))
        dropped = await _open(s.url, sock=sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        dropped.transport.abort()
        await no_sessions()
        again = await _open(s.url)  # the address may open a session again
        await again.close()
    finally:
        s.stop()
    assert "Traceback" not in "".join(s.lines)


async def test_a_client_that_does_not_read_is_dropped() -> None:
    """A client that stops reading while a long answer streams: the server's queue for it
    stays bounded, and once it has been full for --send-timeout-seconds the session is
    dropped (its slot freed, a log line says why); another session is served meanwhile."""
    s = Server("--send-timeout-seconds", "1", key=None)
    try:
        # websockets stops reading the socket once max_queue messages wait, and a small
        # receive buffer (no autotuning) makes TCP back up soon
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", s.port))
        slow = await _open(s.url, max_queue=1, sock=sock, compression=None)  # tones deflate
        text = " ".join(["word"] * 2000)  # 200 s of echo audio: ~13 MB of events
        await _send(slow, {"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text",
                                                            "text": text}]}})
        await _send(slow, {"type": "response.create"})
        fine = await _open(s.url)
        await _send(fine, {"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text",
                                                            "text": "hello"}]}})
        await _send(fine, {"type": "response.create"})
        done = await _until(fine, "response.done", timeout=20)
        assert done["response"]["status"] == "completed"
        with anyio.fail_after(30):
            while _health(s.port)["sessions"] > 1:  # noqa: ASYNC110 (the slow one goes)
                await anyio.sleep(0.2)
        await fine.close()
        with pytest.raises(websockets.ConnectionClosed):  # it ends once read
            with anyio.fail_after(30):
                while True:
                    await slow.recv()
    finally:
        s.stop()
    log = "".join(s.lines)
    assert "client does not read" in log, log[-2000:]
    assert "Traceback" not in log


async def test_shutdown_finishes_the_answer_in_flight() -> None:
    """SIGTERM while an answer streams: the answer completes, then server_shutting_down and
    close 1001; new connections are refused meanwhile; the process ends without a trace."""
    s = Server("--set", "lm.options.token_delay_s=0.1", key=None)
    try:
        ws = await _open(s.url)
        await _send(ws, {"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "one two three four five six"}]}})
        await _send(ws, {"type": "response.create"})
        await _until(ws, "response.output_audio.delta")
        s.proc.send_signal(signal.SIGTERM)
        events, rcvd = await _closed(ws, timeout=15)
        done = [e for e in events if e["type"] == "response.done"]
        assert done and done[0]["response"]["status"] == "completed", [e["type"] for e in events]
        assert events.index(done[0]) < len(events) - 1
        _error_then_close(events, rcvd, "server_shutting_down", 1001)
        with pytest.raises(OSError):
            await websockets.connect(s.url, open_timeout=3)
        assert s.proc.wait(15) in (0, -15)
    finally:
        s.stop()
    assert "Traceback" not in "".join(s.lines)


async def test_workers_serve_sessions_in_several_processes() -> None:
    """--workers 2: both worker processes answer (each /health names its pid), sessions get
    their answers, SIGTERM ends them all."""
    s = Server("--workers", "2", key=None)
    try:
        pids = set()
        with anyio.fail_after(60):
            while len(pids) < 2:
                pids.add(_health(s.port)["pid"])
                await anyio.sleep(0.05)
        assert s.proc.pid not in pids

        async def ask(word: str) -> str:
            ws = await _open(s.url)
            await _send(ws, {"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": word}]}})
            await _send(ws, {"type": "response.create"})
            e = await _until(ws, "response.done")
            await ws.close()
            return e["response"]["output"][0]["content"][0]["transcript"]

        for word in ("alpha", "beta", "gamma"):
            assert await ask(word) == f"You said: {word}"
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(20) in (0, -15)
    finally:
        s.stop()
    assert "Traceback" not in "".join(s.lines)

"""LiveKit Agents' ``openai.realtime.RealtimeModel`` against an omniframe server, no room.

Runs inside ``.venv-clients`` (scripts/setup_clients.sh). The model's ``RealtimeSession`` is
driven directly, the way ``AgentSession`` drives it, but without a LiveKit server or room:
LiveKit opens its own aiohttp session when no job context exists. One turn per run:

* ``text``: ``update_chat_ctx`` with a user message (LiveKit waits for each item's
  ``conversation.item.added``), then ``generate_reply`` (LiveKit sends
  ``metadata.client_event_id`` and fails after 10 s unless ``response.created`` echoes it);
* ``audio``: a 16 kHz mono wav goes in through ``push_audio`` (LiveKit resamples to 24 kHz),
  then silence; the server's VAD starts the generation;
* ``interrupt``: a text turn; at the answer's first audio frame ``interrupt()`` (a
  ``response.cancel``), then ``truncate`` of the message at 40 ms, then at 0 ms (LiveKit
  sends ``conversation.item.delete`` for that), then a second text turn;
* ``tool``: a ``get_weather`` function tool; its call comes out of the generation's
  ``function_stream``; its output goes back through ``update_chat_ctx`` and a second
  ``generate_reply``, as ``AgentSession`` does.

Strict: an ``error`` event, an event type the openai SDK does not know, a LiveKit
``error`` emission, or an error LiveKit logs (its per-event handlers log and skip failures,
e.g. a delta for an item without ``response.output_item.added``) make ``ok`` false. The last
line on stdout is one JSON object; the exit status is 0 when ok.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import wave
from typing import Any


def read_wav(path: str) -> tuple[bytes, int]:
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise SystemExit(f"{path}: need 16-bit mono PCM")
        return w.readframes(w.getnframes()), w.getframerate()


class _Log(logging.Handler):
    """LiveKit's errors are problems; its warnings are reported."""

    def __init__(self, problems: list[str], warnings: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.problems, self.warnings = problems, warnings

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()[:300]
        if record.levelno >= logging.ERROR:
            self.problems.append(f"LiveKit logged: {message}")
        else:
            self.warnings.append(message)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from typing import get_args

    from livekit import rtc
    from livekit.agents import llm
    from livekit.plugins.openai.realtime import RealtimeModel
    from openai.types.realtime import RealtimeServerEvent

    known = {m.model_fields["type"].annotation.__args__[0]
             for m in get_args(get_args(RealtimeServerEvent)[0])}
    problems: list[str] = []
    warnings: list[str] = []
    logging.getLogger("livekit").addHandler(_Log(problems, warnings))
    raw: list[dict[str, Any]] = []
    ready = asyncio.Event()
    progress = asyncio.Event()  # set when a turn's streams end
    arrived = asyncio.Event()  # set at each server event
    turns: list[dict[str, Any]] = []
    consumers: list[asyncio.Task[None]] = []

    model = RealtimeModel(model=args.model, base_url=args.base_url, api_key=args.api_key)
    session = model.session()

    def on_event(e: dict[str, Any]) -> None:
        kind = e.get("type")
        raw.append({k: v for k, v in e.items() if not (
            k == "delta" and kind == "response.output_audio.delta")})
        if kind not in known:
            problems.append(f"unknown server event type {kind!r}")
        if kind == "error":
            problems.append(f"error event: {e.get('error')}")
        if kind == "session.updated":
            ready.set()
        arrived.set()
        if not str(kind).endswith(".delta"):
            timeline.append(f"{time.monotonic() - t_start:7.3f} < {kind}")

    def on_error(err: Any) -> None:
        problems.append(f"LiveKit error: {getattr(err, 'error', err)}")

    async def consume(gen: Any) -> None:
        turn: dict[str, Any] = {"response_id": gen.response_id, "text": "", "audio_bytes": 0,
                                "messages": 0, "function_calls": []}
        turns.append(turn)

        async def message(msg: Any) -> None:
            turn["messages"] += 1
            turn.setdefault("message_ids", []).append(msg.message_id)

            async def text() -> None:
                async for t in msg.text_stream:
                    turn["text"] += str(t)

            async def audio() -> None:
                async for f in msg.audio_stream:
                    turn["audio_bytes"] += len(bytes(f.data.cast("B")))
                    turn["sample_rate"] = f.sample_rate
                    if args.mode == "interrupt" and len(turns) == 1 and not turn.get(
                            "interrupted"):
                        turn["interrupted"] = True
                        session.interrupt()

            await asyncio.gather(text(), audio())

        async def messages() -> None:
            tasks = []
            async for m in gen.message_stream:  # each message read as it streams
                tasks.append(asyncio.ensure_future(message(m)))
            await asyncio.gather(*tasks)

        async def functions() -> None:
            async for fc in gen.function_stream:
                turn["function_calls"].append(fc)

        await asyncio.gather(messages(), functions())
        turn["done"] = True
        progress.set()

    def on_generation(gen: Any) -> None:
        consumers.append(asyncio.ensure_future(consume(gen)))

    t_start = time.monotonic()
    timeline: list[str] = []  # both directions, deltas and appends left out
    sent: list[str] = []

    def on_sent(e: Any) -> None:
        kind = e.get("type") if isinstance(e, dict) else getattr(e, "type", None)
        sent.append(str(kind))
        if kind != "input_audio_buffer.append":
            timeline.append(f"{time.monotonic() - t_start:7.3f} > {kind}")

    session.on("openai_client_event_queued", on_sent)
    session.on("openai_server_event_received", on_event)
    session.on("error", on_error)
    session.on("generation_created", on_generation)

    async def seen(kind: str) -> None:
        while not any(r["type"] == kind for r in raw):
            arrived.clear()
            await arrived.wait()

    async def text_turn(text: str) -> None:
        ctx = session.chat_ctx.copy()
        ctx.add_message(role="user", content=text)
        await session.update_chat_ctx(ctx)
        await session.generate_reply()

    async def finished(n: int) -> None:
        while len(turns) < n or not all(t.get("done") for t in turns[:n]):
            progress.clear()
            await progress.wait()

    calls: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(args.timeout):
            await ready.wait()  # LiveKit sends session.update as soon as it connects
            if args.mode == "audio":
                pcm, rate = read_wav(args.wav)
                pcm += bytes(2 * rate)  # 1 s of silence ends the turn
                step = 2 * rate // 10
                for i in range(0, len(pcm), step):
                    chunk = pcm[i:i + step]
                    session.push_audio(rtc.AudioFrame(
                        data=chunk, sample_rate=rate, num_channels=1,
                        samples_per_channel=len(chunk) // 2))
                await finished(1)
            else:
                if args.mode == "tool":
                    @llm.function_tool
                    async def get_weather(city: str) -> dict[str, str]:
                        """The weather in a city."""
                        return {"sky": "sunny"}

                    await session.update_tools([get_weather])
                await text_turn(args.text)
                await finished(1)
                if args.mode == "interrupt":
                    message_id = turns[0]["message_ids"][0]
                    session.truncate(message_id=message_id, modalities=["audio"],
                                     audio_end_ms=40)
                    await seen("conversation.item.truncated")
                    session.truncate(message_id=message_id, modalities=["audio"],
                                     audio_end_ms=0)
                    await seen("conversation.item.deleted")
                    await text_turn("again")
                    await finished(2)
                if args.mode == "tool":
                    fcs = turns[0]["function_calls"]
                    if not fcs:
                        problems.append("no function call came out of the first response")
                    else:
                        fc = fcs[0]
                        calls.append({"name": fc.name, "arguments": json.loads(fc.arguments)})
                        ctx = session.chat_ctx.copy()
                        ctx.items.append(llm.FunctionCallOutput(
                            call_id=fc.call_id, name=fc.name,
                            output=json.dumps({"sky": "sunny"}), is_error=False))
                        await session.update_chat_ctx(ctx)
                        await session.generate_reply()
                        await finished(2)
    except TimeoutError:
        problems.append(f"timed out after {args.timeout:.0f} s ({len(raw)} server events)")
    finally:
        for c in consumers:
            c.cancel()
        await session.aclose()
        await model.aclose()
    dones = [r["response"] for r in raw if r["type"] == "response.done"]
    return {
        "ok": not problems,
        "problems": problems,
        "event_types": [r["type"] for r in raw],
        "responses": [{"id": d["id"], "status": d["status"],
                       "metadata": d.get("metadata"),
                       "output": [o.get("type") for o in d.get("output") or []]}
                      for d in dones],
        "created_metadata": [r["response"].get("metadata") for r in raw
                             if r["type"] == "response.created"],
        "turns": [{k: v for k, v in t.items() if k != "function_calls"} for t in turns],
        "function_calls": calls,
        "sent_types": sent,
        "warnings": warnings,
        "timeline": timeline,
        "audio_seconds": round(sum(t["audio_bytes"] for t in turns) / 2 / 24000, 3),
        "seconds": round(time.monotonic() - t0, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", required=True, help="http://HOST:PORT/v1")
    p.add_argument("--model", default="echo")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--mode", choices=("text", "audio", "interrupt", "tool"), default="text")
    p.add_argument("--text", default="hello there")
    p.add_argument("--wav")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()
    if args.mode == "audio" and not args.wav:
        p.error("--mode audio needs --wav")
    try:
        result = asyncio.run(run(args))
    except Exception as exc:
        result = {"ok": False, "problems": [f"{type(exc).__name__}: {exc}"]}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

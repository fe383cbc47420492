"""Pipecat's ``OpenAIRealtimeLLMService`` against an omniframe server, in a small pipeline.

Runs inside ``.venv-clients`` (scripts/setup_clients.sh), not the main environment: it
imports pipecat, never omniframe. One turn per run, chosen by ``--mode``:

* ``text``: the context holds one user message; an ``LLMRunFrame`` makes Pipecat send it as
  a ``conversation.item.create`` and ask for a response (audio and its transcript);
* ``audio``: a 16 kHz mono wav (an espeak-ng question) goes in as ``InputAudioRawFrame``
  chunks (Pipecat resamples them to 24 kHz), then silence; the server's VAD ends the turn;
* ``manual``: the audio with ``turn_detection`` off (Pipecat sends null): after it, a
  ``UserStoppedSpeakingFrame`` (what a local VAD would push) makes Pipecat send
  ``input_audio_buffer.commit`` and ``response.create``;
* ``bargein``: a text turn as above; at the answer's first audio delta the wav goes in:
  the server's VAD cancels the answer, Pipecat truncates it, the speech is answered;
* ``tool``: the context also declares a ``get_weather`` tool that Pipecat answers with
  ``{"sky": "sunny"}``; the run waits for the answer after the tool's result.

Strict on purpose: every raw server event is recorded; a type Pipecat has no model for,
an event its model refuses, and any ``error`` event or ``ErrorFrame`` make ``ok`` false.
The last line on stdout is one JSON object (see ``main``); the exit status is 0 when ok.

    .venv-clients/bin/python tests/clients/pipecat_client.py \\
        --url ws://127.0.0.1:8000/v1/realtime --model echo --mode text --text "hello there"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import wave
from typing import Any


def read_wav(path: str) -> tuple[bytes, int]:
    """16-bit mono PCM and its rate (the wav that scripts/make_question.py writes)."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise SystemExit(f"{path}: need 16-bit mono PCM, got {w.getsampwidth() * 8}-bit "
                             f"x {w.getnchannels()} channels")
        return w.readframes(w.getnframes()), w.getframerate()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loguru import logger

    warnings: list[str] = []  # what Pipecat logs at WARNING and above
    logger.remove()  # Pipecat logs through loguru; keep stdout for the JSON line
    logger.add(sys.stderr, level="WARNING")
    logger.add(lambda m: warnings.append(m.record["message"][:300]), level="WARNING",
               # advice on local VAD for turn_detection off: about the app, not the server;
               # Pipecat's runner listing its own tasks still running when it is cancelled at
               # the end (its user aggregator's realtime_handoff_flush, seen once in five full
               # runs under load): Pipecat's shutdown, not an event the server sent
               filter=lambda r: not any(s in r["message"] for s in (
                   "is not emitting turn frames", "dangling tasks detected")))

    from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
    from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
    from pipecat.frames.frames import (
        ErrorFrame,
        Frame,
        InputAudioRawFrame,
        LLMRunFrame,
        LLMTextFrame,
        TranscriptionFrame,
        TTSAudioRawFrame,
        TTSTextFrame,
        UserStartedSpeakingFrame,
        UserStoppedSpeakingFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.services.openai.realtime import events
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
    from pipecat.workers.runner import WorkerRunner

    known = set(events._server_event_types)
    t_start = time.monotonic()
    timeline: list[str] = []  # both directions, deltas and appends left out
    raw: list[dict[str, Any]] = []
    problems: list[str] = []
    tolerated: list[dict[str, Any]] = []
    retrieved: dict[str, Any] = {}
    session_ready = asyncio.Event()
    finished = asyncio.Event()
    progress = asyncio.Event()  # set at each response.done
    want_done = {"tool": 2, "bargein": 2, "audio": args.turns}.get(args.mode, 1)
    first_audio = asyncio.Event()
    parse = events.parse_server_event

    def strict_parse(message: str) -> Any:
        e = json.loads(message)
        kind = e.get("type")
        raw.append({k: v for k, v in e.items() if k != "delta" or kind != (
            "response.output_audio.delta")})
        if not kind.endswith(".delta"):
            timeline.append(f"{time.monotonic() - t_start:7.3f} < {kind}")
        if kind not in known:
            problems.append(f"unknown server event type {kind!r} (Pipecat ignores it)")
        if kind == "error":
            if args.retrieve and e["error"].get("code") == "item_retrieve_invalid_item_id":
                tolerated.append(e["error"])  # Pipecat fails that retrieve, goes on
            else:
                problems.append(f"error event: {e.get('error')}")
        try:
            evt = parse(message)
        except Exception as exc:  # Pipecat's receive loop would end here
            problems.append(f"Pipecat could not parse {kind!r}: {str(exc)[:300]}")
            finished.set()
            raise
        if kind == "session.updated":
            session_ready.set()
        if kind == "response.output_audio.delta":
            first_audio.set()
        if kind == "response.done":
            progress.set()
            if n_done() >= want_done:
                finished.set()
        return evt

    def n_done() -> int:
        return sum(r["type"] == "response.done" for r in raw)

    events.parse_server_event = strict_parse  # llm.py calls events.parse_server_event

    audio = bytearray()
    transcript: list[str] = []
    heard: list[str] = []  # input audio transcription
    text: list[str] = []  # LLMTextFrame: the text modality's answer (and, for audio, a copy)
    calls: list[dict[str, Any]] = []

    class Collect(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame):
                audio.extend(frame.audio)
            elif isinstance(frame, TTSTextFrame):
                transcript.append(frame.text)
            elif isinstance(frame, LLMTextFrame):
                text.append(frame.text)
            elif isinstance(frame, ErrorFrame):
                problems.append(f"ErrorFrame: {frame.error}")
                finished.set()
            await self.push_frame(frame, direction)

    class CatchUpstream(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, ErrorFrame):
                problems.append(f"ErrorFrame: {frame.error}")
                finished.set()
            await self.push_frame(frame, direction)

    class Heard(FrameProcessor):  # between the user aggregator and the service
        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TranscriptionFrame):  # the user's speech, upstream
                heard.append(frame.text)
            await self.push_frame(frame, direction)

    tools = None
    if args.mode == "tool":
        tools = ToolsSchema(standard_tools=[FunctionSchema(
            name="get_weather", description="The weather in a city",
            properties={"city": {"type": "string"}}, required=["city"])])
    messages = [] if args.mode == "audio" else [{"role": "user", "content": args.text}]
    context = (LLMContext(messages=messages, tools=tools) if tools  # type: ignore[arg-type]
               else LLMContext(messages=messages))  # type: ignore[arg-type]
    llm = OpenAIRealtimeLLMService(
        api_key=args.api_key, base_url=args.url,
        settings=OpenAIRealtimeLLMService.Settings(
            model=args.model, session_properties=events.SessionProperties(
                output_modalities=[args.modality], instructions=args.instructions,
                audio=events.AudioConfiguration(input=events.AudioInput(
                    transcription=events.InputAudioTranscription() if args.transcribe
                    else None,
                    turn_detection=False if args.mode == "manual" else None)))))

    async def get_weather(params: Any) -> None:
        calls.append({"name": params.function_name, "arguments": params.arguments})
        await params.result_callback({"sky": "sunny"})

    llm.register_function("get_weather", get_weather)
    sent: list[dict[str, Any]] = []
    ws_send = llm._ws_send

    async def record_send(message: dict[str, Any]) -> None:
        sent.append({k: v for k, v in message.items() if k != "audio"})
        if message.get("type") != "input_audio_buffer.append":
            timeline.append(f"{time.monotonic() - t_start:7.3f} > {message.get('type')}")
        await ws_send(message)

    llm._ws_send = record_send  # type: ignore[method-assign]
    pair = LLMContextAggregatorPair(context)
    pipeline = Pipeline([CatchUpstream(), pair.user(), Heard(), llm, Collect(),
                         pair.assistant()])
    worker = PipelineWorker(pipeline, params=PipelineParams(), idle_timeout_secs=None,
                            enable_rtvi=False)
    runner = WorkerRunner(handle_sigint=False)

    async def drive() -> None:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(session_ready.wait(), args.timeout)
            if args.mode == "bargein":
                await worker.queue_frame(LLMRunFrame())
                await asyncio.wait_for(first_audio.wait(), args.timeout)
            if args.mode == "manual":
                await worker.queue_frame(UserStartedSpeakingFrame())
            if args.mode in ("audio", "bargein", "manual"):
                pcm, rate = read_wav(args.wav)
                pcm += bytes(2 * rate)  # 1 s of silence: the server's VAD ends the turn
                step = 2 * rate // 10  # 100 ms frames
                for turn in range(args.turns):
                    while n_done() < turn:  # the next question after the last answer
                        progress.clear()
                        await progress.wait()
                    for i in range(0, len(pcm), step):
                        await worker.queue_frame(InputAudioRawFrame(
                            audio=pcm[i:i + step], sample_rate=rate, num_channels=1))
                if args.mode == "manual":
                    await worker.queue_frame(UserStoppedSpeakingFrame())
            else:
                await worker.queue_frame(LLMRunFrame())
            await asyncio.wait_for(finished.wait(), max(1.0, args.timeout - (
                time.monotonic() - t0)))
            await asyncio.sleep(0.3)  # let the last frames reach the collector
            if args.retrieve:  # conversation.item.retrieve, by Pipecat's own method
                item_id = [r["item"]["id"] for r in raw if r["type"] == (
                    "conversation.item.added") and r["item"].get("role") == "assistant"][-1]
                item = await asyncio.wait_for(llm.retrieve_conversation_item(item_id), 5)
                retrieved["item"] = item.model_dump(exclude_none=True)
                try:
                    await asyncio.wait_for(llm.retrieve_conversation_item("item_nope"), 5)
                except TimeoutError:
                    retrieved["missing"] = "timed out"
                except Exception as exc:
                    retrieved["missing"] = f"{type(exc).__name__}: {exc}"
        except TimeoutError:
            problems.append(f"timed out after {args.timeout:.0f} s "
                            f"({len(raw)} server events received)")
        finally:
            await worker.cancel()

    t0 = time.monotonic()
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), drive())
    dones = [r["response"] for r in raw if r["type"] == "response.done"]
    return {
        "ok": not problems,
        "problems": problems,
        "event_types": [r["type"] for r in raw],
        "sent_types": [m.get("type") for m in sent],
        "sent_item_ids": [m["item"]["id"] for m in sent
                          if m.get("type") == "conversation.item.create" and "id" in m["item"]],
        "added_item_ids": [r["item"]["id"] for r in raw
                           if r["type"] == "conversation.item.added"],
        "responses": [{"id": d["id"], "status": d["status"],
                       "output": [o.get("type") for o in d.get("output") or []]}
                      for d in dones],
        "audio_bytes": len(audio),
        "audio_seconds": round(len(audio) / 2 / 24000, 3),
        "audio_rms": _rms(bytes(audio)),
        "transcript": "".join(transcript),
        "text": "".join(text),
        "heard": heard,
        "retrieved": retrieved,
        "tolerated_errors": tolerated,
        "warnings": warnings,
        "function_calls": calls,
        "timeline": timeline,
        "seconds": round(time.monotonic() - t0, 3),
    }


def _rms(pcm: bytes) -> float:
    import array

    a = array.array("h", pcm[: len(pcm) // 2 * 2])
    return round((sum(v * v for v in a) / len(a)) ** 0.5 / 32768, 4) if a else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="ws://HOST:PORT/v1/realtime")
    p.add_argument("--model", default="echo", help="a served config's name")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--mode", choices=("text", "audio", "manual", "bargein", "tool"),
                   default="text")
    p.add_argument("--text", default="hello there", help="the user message (text, tool)")
    p.add_argument("--modality", choices=("audio", "text"), default="audio",
                   help="the session's output_modalities")
    p.add_argument("--wav", help="16 kHz mono 16-bit question (audio)")
    p.add_argument("--transcribe", action="store_true",
                   help="ask for input audio transcription (TranscriptionFrames)")
    p.add_argument("--instructions", help="the session's instructions")
    p.add_argument("--retrieve", action="store_true",
                   help="after the answer, retrieve its item and a missing one")
    p.add_argument("--turns", type=int, default=1,
                   help="audio: ask the question this many times, each after the last answer")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()
    if args.mode in ("audio", "manual", "bargein") and not args.wav:
        p.error(f"--mode {args.mode} needs --wav")
    try:
        result = asyncio.run(run(args))
    except Exception as exc:  # report, never a bare traceback without the JSON line
        result = {"ok": False, "problems": [f"{type(exc).__name__}: {exc}"]}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""One OpenAI Realtime session = one running pipeline.

The served config's source is replaced by :class:`LiveSource` (fed from the socket's
``input_audio_buffer.append``, resampled from 24 kHz to the rate the config's source had), its
sinks are replaced by :class:`RealtimeSink` (frames to server events). Everything else of the
config runs as is, steered through the public :class:`~omniframe.pipeline.Pipeline` API:

==============================  ==========================================================
client event                    pipeline
==============================  ==========================================================
``session.update``              ``Pipeline.update`` of the stages' live options (VAD
                                threshold / silence / prefix padding / interrupt, LM
                                ``system_prompt`` / ``temperature`` / ``max_new_tokens``,
                                TTS ``voice``); ``turn_detection: null`` buffers audio in
                                the session until ``commit``
``input_audio_buffer.append``   audio into the live source (server VAD) or the buffer
``input_audio_buffer.commit``   ``Pipeline.commit`` (server VAD), else a ``UserTurnFrame``
                                pushed to the stage after the VAD
``conversation.item.create``    user text: ``Pipeline.say``; ``function_call_output``: a
                                ``ToolResultFrame`` pushed in
``response.create``             releases the oldest answer the pipeline made by itself and
                                the server held (to a user text item, a commit without
                                server VAD, a tool output, a VAD turn with
                                ``create_response: false``); else
                                ``Pipeline.respond(instructions)``
``response.cancel``             ``Pipeline.interrupt``
``conversation.item.truncate``  ``Pipeline.truncate`` (this sink cuts the history's text)
==============================  ==========================================================

Deviations, by design of the pipeline model: an item's answer is computed as soon as the item
exists (it is only *sent* on ``response.create``), so a held answer ignores that
``response.create``'s own instructions; client-declared ``tools`` are reported but the
pipeline calls only the tools its config lists; ``conversation.item.delete`` forgets the item
for the protocol, not the pipeline's history.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import structlog

from omniframe.frames import (
    AudioFrame,
    EndOfTurnFrame,
    EndRetractedFrame,
    ErrorFrame,
    Frame,
    InterruptFrame,
    MetricsFrame,
    OutputAudioFrame,
    RespondFrame,
    SpeechEndFrame,
    SpeechStartFrame,
    TextDeltaFrame,
    ToolCallFrame,
    ToolResultFrame,
    TranscriptFrame,
    TruncateFrame,
    UserTurnFrame,
)
from omniframe.serve import protocol as P
from omniframe.serve.protocol import ProtocolError, server_event
from omniframe.stage import Stage, StageContext, StageOptions

__all__ = ["Limits", "LiveSource", "RealtimeSession", "RealtimeSink", "ServedModel",
           "load_served"]

log = structlog.get_logger("omniframe.serve")

MAX_HELD_FRAMES = 20_000
"""Frames of one answer that may wait for ``response.create``."""
_ANSWER_FRAMES = (TextDeltaFrame, OutputAudioFrame, ToolCallFrame, ToolResultFrame,
                  EndOfTurnFrame)

DELTA_SAMPLES = 2400
"""Output audio per ``response.output_audio.delta``: 100 ms at 24 kHz (clients' default
message cap is 1 MiB)."""


@dataclass
class Limits:
    """Per-session limits (the app's settings)."""

    max_message_bytes: int = 4 * 1024 * 1024
    max_buffer_s: float = 120.0  # audio held for a commit (turn_detection: null)
    max_items: int = 1000
    idle_s: float = 600.0
    max_session_s: float = 3600.0
    audio_queue: int = 256  # input chunks waiting for the source
    event_queue: int = 512  # server events waiting for the socket
    send_timeout_s: float = 10.0  # the event queue full this long: the client is dropped
    max_audio_rate: float = 4.0  # input audio, times real time, once the burst is spent
    audio_burst_s: float = 120.0  # input audio that may arrive at once


# ------------------------------------------------------------------------ served configs


@dataclass
class ServedModel:
    """A config served under ``name`` (the ``model`` query parameter picks it)."""

    name: str
    cfg: Any  # PipelineConfig
    label: str
    input_rate: int


def load_served(paths: list[str], overrides: list[str] | None = None) -> dict[str, ServedModel]:
    """Load and check the configs to serve, named by their ``name:`` (else the file stem)."""
    from omniframe.cli import prepare_config
    from omniframe.config import ConfigError, resolve_stages

    out: dict[str, ServedModel] = {}
    for path in paths:
        cfg, label = prepare_config(path, list(overrides or []))
        name = cfg.name if cfg.name != "pipeline" else Path(path).stem
        if name in out:
            raise ConfigError([("name", f"two served configs are named {name!r}; give each "
                                        f"its own name:")], label)
        resolved = resolve_stages(cfg, label)
        src = resolved[0]
        rate = src.spec.options.get("sample_rate")
        if rate is None:
            f = src.cls.Options.model_fields.get("sample_rate")
            rate = f.default if f is not None and isinstance(f.default, int) else 16000
        model = ServedModel(name=name, cfg=cfg, label=label, input_rate=int(rate))
        assemble(model)  # the chain check, with the server's source and sink
        out[name] = model
    return out


async def warm_up(served: ServedModel) -> float:
    """Set up (then tear down) the stages of ``served`` once, so that its models are in the
    process-wide cache before the first session: that session's first answer does not wait for
    them. Returns the seconds it took; a stage that cannot set up raises its error."""
    pipeline = assemble(served)
    done: list[Stage] = []
    t0 = time.perf_counter()
    try:
        for stage in pipeline.stages[1:-1]:  # not the socket's source and sink
            await stage.setup()
            done.append(stage)
    finally:
        for stage in reversed(done):
            try:
                await stage.teardown()
            except Exception as exc:  # noqa: BLE001 (the models stay loaded; say what failed)
                log.warning("warm-up teardown failed", stage=stage.context.name,
                            error=str(exc)[:300])
    return time.perf_counter() - t0


def assemble(served: ServedModel) -> Any:
    """A session's pipeline: :class:`LiveSource`, the config's stages other than its source
    and sinks, :class:`RealtimeSink`; a new conversation, models from the process cache.
    The config's observers are left out (they would write one file from every session)."""
    from omniframe.chain import IncompatibleStages
    from omniframe.config import ConfigError, resolve_stages
    from omniframe.pipeline import Pipeline, PipelineError, config_toolbox
    from omniframe.resources import default_resources
    from omniframe.session import Session

    cfg, label = served.cfg, served.label
    resolved = resolve_stages(cfg, label)
    toolbox = config_toolbox(cfg, label)
    session = Session()
    resources = default_resources()

    def ctx(name: str) -> StageContext:
        return StageContext(name=name, session=session, resources=resources,
                            device=cfg.device, tools=toolbox)

    names = cfg.stage_names()
    keep = [(n, r, spec) for n, r, spec in zip(names, resolved, cfg.pipeline, strict=True)
            if spec.kind != "sink"][1:]
    src = LiveSource({"sample_rate": served.input_rate}, ctx(names[0]))
    middle = [r.cls(r.options, ctx(n)) for n, r, _ in keep]
    sink_name = "realtime" if "realtime" not in names else "realtime-out"
    sink = RealtimeSink({}, ctx(sink_name))
    limits = {n: spec.watchdog for n, _, spec in keep if spec.watchdog}
    try:
        return Pipeline([src, *middle, sink], buffer=cfg.buffer, collect=False,
                        watchdog=cfg.watchdog, stage_watchdog=limits)
    except (IncompatibleStages, PipelineError) as exc:
        raise ConfigError([("pipeline", f"served with the client's audio and text as its "
                                        f"source: {exc}")], label) from None


# ------------------------------------------------------------------------------ stages


class LiveSource(Stage):
    """Audio from the client's socket, already at the pipeline's rate."""

    kind = "source"
    name = "realtime-live"
    produces = (AudioFrame, TranscriptFrame)  # transcripts: Pipeline.say, for text chains

    class Options(StageOptions):
        sample_rate: int = 16000

    rx: Any = None
    ready: anyio.Event | None = None

    async def generate(self) -> AsyncIterator[Frame]:
        assert self.rx is not None and self.ready is not None
        self.ready.set()
        rate = self.options.sample_rate  # type: ignore[attr-defined]
        pos = 0
        async with self.rx:
            async for samples in self.rx:
                yield AudioFrame(samples=samples, sample_rate=rate, pts=pos / rate, live=True)
                pos += len(samples)


class RealtimeSink(Stage):
    """The last stage: turns frames into server events (through its session)."""

    kind = "sink"
    name = "realtime"
    forward_consumed = True  # frames leave the pipeline: each turn's MetricsFrame is made
    consumes = (OutputAudioFrame, TextDeltaFrame, EndOfTurnFrame, ToolCallFrame,
                ToolResultFrame, SpeechStartFrame, SpeechEndFrame, TruncateFrame, ErrorFrame)
    requires = ()

    bridge: RealtimeSession | None = None

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert self.bridge is not None
        await self.bridge.on_frame(frame)
        return
        yield  # pragma: no cover

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        assert self.bridge is not None
        await self.bridge.on_interrupt(frame)
        return
        yield  # pragma: no cover

    async def retract(self, frame: EndRetractedFrame) -> AsyncIterator[Frame]:
        assert self.bridge is not None
        self.bridge.on_retract(frame)
        return
        yield  # pragma: no cover

    def on_metrics(self, frame: MetricsFrame) -> None:
        if self.bridge is not None:
            self.bridge.on_metrics(frame)


# ------------------------------------------------------------------------- the session


@dataclass
class _Item:
    id: str
    kind: str  # user_audio, user_text, assistant, function_call, function_call_output, ...
    turn: int
    item: dict[str, Any]
    audio_samples: int = 0  # assistant audio sent, at 24 kHz
    chunks: list[tuple[int, int, str | None]] = field(default_factory=list)


@dataclass
class _Message:
    item: _Item
    output_index: int
    text: str = ""
    resampler: Any = None
    rate: int = P.OUTPUT_RATE


@dataclass
class _Response:
    id: str
    turn: int
    audio: bool
    metadata: dict[str, str] | None
    output: list[dict[str, Any]] = field(default_factory=list)
    message: _Message | None = None


class RealtimeSession:
    """The protocol state of one connection, and its pipeline.

    ``send(event)`` queues a server event for the socket (bounded: awaits when the client
    does not read); ``close(code, reason)`` asks the connection to end after what is queued.
    """

    def __init__(self, served: ServedModel, limits: Limits,
                 send: Callable[[dict[str, Any]], Awaitable[None]],
                 close: Callable[[int, str], Awaitable[None]],
                 metrics_events: bool = False) -> None:
        self.served = served
        self.limits = limits
        self.send = send
        self.close = close
        self.metrics_events = metrics_events
        self.config = P.SessionConfig(model=served.name)
        self.id = P.new_id("sess")
        self.items: dict[str, _Item] = {}
        self.last_item_id: str | None = None
        self.responses: dict[int, _Response] = {}  # active, by turn
        self.cancelled_turns: set[int] = set()
        self.response_opts: dict[int, dict[str, Any]] = {}
        # answers the pipeline makes by itself (to a user text item, a commit without server
        # VAD, a tool output, a VAD turn with create_response false) wait here, by turn,
        # until response.create releases them: the protocol's items do not answer themselves
        self.held: dict[int, list[Frame]] = {}
        self.barge: dict[int, list[_Response]] = {}  # new turn -> answers it interrupts
        self.user_items: dict[int, str] = {}  # VAD turn -> its user item id
        self.spoken: dict[int, tuple[str, float]] = {}  # turn -> (user audio item, seconds)
        self.speech_start: dict[int, float] = {}
        self.calls: dict[str, int] = {}  # call_id -> turn
        self.vad_turn: int | None = None  # a VAD turn is open
        self.buffer: list[np.ndarray] = []  # 24 kHz input held for commit (no server VAD)
        self.buffered = 0
        self._cancel_requested = False
        self._truncating: dict[int, tuple[str, int]] = {}  # turn -> (item id, audio_end_ms)
        self.send_nowait: Callable[[dict[str, Any]], None] | None = None
        self._audio_credit = limits.audio_burst_s  # seconds of input audio allowed now
        self._audio_t = time.monotonic()
        self._build()

    # ---------------------------------------------------------------- pipeline

    def _build(self) -> None:
        from omniframe_audio.resampling import StreamResampler

        self.pipeline = assemble(self.served)
        src, sink = self.pipeline.stages[0], self.pipeline.stages[-1]
        assert isinstance(src, LiveSource) and isinstance(sink, RealtimeSink)
        self.rate = self.served.input_rate
        self.audio_tx, src.rx = anyio.create_memory_object_stream[np.ndarray](
            self.limits.audio_queue)
        self.ready = src.ready = anyio.Event()
        sink.bridge = self
        self.session = src.context.session
        stages = self.pipeline.stages
        self.vads = [s for s in stages if s.kind == "vad"]
        self.after_vad = None
        if self.vads:
            k = stages.index(self.vads[0])
            self.after_vad = stages[k + 1].context.name if k + 1 < len(stages) else None
        self.can_respond = any(RespondFrame in s.consumes for s in stages)
        self.resampler = (None if self.rate == P.INPUT_RATE
                          else StreamResampler(P.INPUT_RATE, self.rate))

    async def run_pipeline(self) -> None:
        """Run the pipeline until the session ends; a failure ends the session with 1011."""
        from omniframe.pipeline import PipelineCancelled

        try:
            await self.pipeline.run()
        except PipelineCancelled:
            return
        except Exception as exc:
            log.error("session pipeline failed", session=self.id, error=str(exc)[:500])
            with anyio.move_on_after(2):  # a client that does not read gets only the close
                await self.send(P.error_event(ProtocolError(
                    "server_error", f"the pipeline failed: {str(exc)[:300]}",
                    type_="server_error")))
            await self.close(1011, "pipeline failed")

    def stop(self) -> None:
        self.pipeline.cancel("session ended")

    # ------------------------------------------------------------------ events out

    async def start(self) -> None:
        await self.send(server_event("session.created", session=self._session_dict()))

    def _session_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d["id"] = self.id
        d["object"] = "realtime.session"
        return d

    def _register(self, it: _Item) -> str | None:
        self._check_room()
        prev = self.last_item_id
        self.items[it.id] = it
        self.last_item_id = it.id
        return prev

    def _check_room(self) -> None:
        if len(self.items) >= self.limits.max_items:
            raise ProtocolError("conversation_too_long", f"the conversation has "
                                f"{self.limits.max_items} items, the most a session may hold",
                                close=1008)

    async def _item_added_done(self, it: _Item) -> None:
        prev = self._register(it)
        await self.send(server_event("conversation.item.added", previous_item_id=prev,
                                     item=it.item))
        await self.send(server_event("conversation.item.done", previous_item_id=prev,
                                     item=it.item))

    # ------------------------------------------------------------------ client events

    async def handle(self, event: dict[str, Any]) -> None:
        """One parsed client event (raises :class:`ProtocolError` for a bad one)."""
        kind = event["type"]
        with anyio.move_on_after(900):
            await self.ready.wait()  # the stages are set up (models loaded)
        if not self.ready.is_set():
            raise ProtocolError("server_not_ready", "the pipeline did not start in 900 s",
                                type_="server_error", close=1011)
        handler = getattr(self, "_on_" + kind.replace(".", "_"))
        await handler(event)

    async def _on_session_update(self, event: dict[str, Any]) -> None:
        changes = self.config.parse_update(event.get("session", {}))
        applied = await self._apply_to_stages(changes)
        self.config.apply(applied)
        await self.send(server_event("session.updated", session=self._session_dict()))

    async def _apply_to_stages(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Push the changes into the stages' live options; returns those in effect."""
        from omniframe.pipeline import update_problem

        applied = dict(changes)
        per_stage: dict[str, dict[str, Any]] = {}

        def want(option: str, value: Any, kinds: tuple[str, ...] | None = None) -> bool:
            hit = False
            for st in self.pipeline.stages:
                if option in type(st).live_options and (kinds is None or st.kind in kinds):
                    if update_problem(st, {option: value}) is None:
                        per_stage.setdefault(st.context.name, {})[option] = value
                        hit = True
                    else:
                        log.info("session.update: option refused by the stage",
                                 stage=st.context.name, option=option)
            return hit

        if changes.get("instructions"):
            want("system_prompt", changes["instructions"])
        if "temperature" in changes:
            want("temperature", changes["temperature"])
        if isinstance(changes.get("max_output_tokens"), int):
            want("max_new_tokens", changes["max_output_tokens"])
        if "voice" in changes and not want("voice", changes["voice"]):
            applied.pop("voice")  # no stage speaks with that voice: keep reporting the old one
        if "turn_detection" in changes:
            td = changes["turn_detection"]
            if td is not None:
                if td["type"] == "semantic_vad":
                    await self._smart_turn_ready()
                for vad in self.vads:
                    opts: dict[str, Any] = {"interrupt": bool(td["interrupt_response"])}
                    if td["type"] == "semantic_vad":
                        threshold, wait_ms = P.SEMANTIC_EAGERNESS[td["eagerness"]]
                        opts.update(end_of_turn="smart_turn", end_of_turn_threshold=threshold,
                                    hangover_ms=float(wait_ms))
                    else:
                        opts.update(threshold=_vad_threshold(vad, td["threshold"]),
                                    hangover_ms=float(td["silence_duration_ms"]),
                                    pre_roll_ms=float(td["prefix_padding_ms"]),
                                    end_of_turn="silence")
                    live = {k: v for k, v in opts.items() if k in type(vad).live_options}
                    if update_problem(vad, live) is None:  # together: they depend on each other
                        ok = live
                    else:
                        ok = {k: v for k, v in live.items() if update_problem(vad, {k: v}) is None}
                    if ok:
                        per_stage.setdefault(vad.context.name, {}).update(ok)
            else:
                self.vad_turn = None
            self.buffer, self.buffered = [], 0
        for name, opts in per_stage.items():
            await self.pipeline.update(name, **opts)
        return applied

    async def _smart_turn_ready(self) -> None:
        """semantic_vad runs Smart Turn in the VADs: load it now (once per process), or refuse
        the update with the reason, leaving the session as it was."""
        from omniframe.audio import AudioError

        for vad in self.vads:
            load = getattr(vad, "setup_end_of_turn", None)
            if load is None or "end_of_turn" not in type(vad).live_options:
                raise ProtocolError("invalid_value", f"the VAD {vad.context.name!r} has no "
                                    f"end-of-turn model to switch to; use server_vad",
                                    param="turn_detection.type")
            try:
                await load()
            except AudioError as exc:
                raise ProtocolError("invalid_value", f"semantic_vad needs the Smart Turn "
                                    f"model, which this server cannot load: {exc}",
                                    param="turn_detection.type") from None

    @property
    def server_vad(self) -> bool:
        return self.config.turn_detection is not None

    async def _on_input_audio_buffer_append(self, event: dict[str, Any]) -> None:
        x = P.decode_audio(event.get("audio"), self.limits.max_message_bytes)
        if not len(x):
            return
        self._audio_rate(len(x))
        if not self.server_vad:
            if (self.buffered + len(x)) / P.INPUT_RATE > self.limits.max_buffer_s:
                raise ProtocolError("input_audio_buffer_too_large", f"the input audio buffer "
                                    f"holds at most {self.limits.max_buffer_s:g} s; commit "
                                    f"or clear it", close=1009)
            self.buffer.append(x)
            self.buffered += len(x)
            return
        if not self.vads:
            raise ProtocolError("audio_not_supported", f"the pipeline {self.served.name!r} "
                                f"has no VAD: it takes text (conversation.item.create)")
        y = self.resampler.push(x) if self.resampler is not None else x
        if len(y):
            y.setflags(write=False)
            await self.audio_tx.send(y)

    def _audio_rate(self, n: int) -> None:
        """A token bucket over input audio: ``audio_burst_s`` at once, then
        ``max_audio_rate`` times real time."""
        lim, now = self.limits, time.monotonic()
        self._audio_credit = min(lim.audio_burst_s, self._audio_credit
                                 + (now - self._audio_t) * lim.max_audio_rate)
        self._audio_t = now
        self._audio_credit -= n / P.INPUT_RATE
        if self._audio_credit < 0:
            raise ProtocolError("input_audio_rate_exceeded", f"input audio may arrive at most "
                                f"{lim.max_audio_rate:g} times faster than real time (after "
                                f"{lim.audio_burst_s:g} s at once): send it as it is recorded",
                                close=1008)

    async def _on_input_audio_buffer_commit(self, event: dict[str, Any]) -> None:
        if self.server_vad:
            if self.vad_turn is None:
                raise ProtocolError("input_audio_buffer_commit_empty",
                                    "no speech is in the input audio buffer")
            await self.pipeline.commit()
            return
        if self.buffered < P.INPUT_RATE // 10 or self.after_vad is None:
            raise ProtocolError("input_audio_buffer_commit_empty",
                                "the input audio buffer holds less than 100 ms of audio"
                                if self.after_vad is not None else
                                "this pipeline has no VAD to take committed audio")
        x = np.concatenate(self.buffer)
        self.buffer, self.buffered = [], 0
        from omniframe.audio import resample

        y = x if self.rate == P.INPUT_RATE else resample(x, P.INPUT_RATE, self.rate)
        y = np.asarray(y, dtype=np.float32)
        turn = self.session.next_turn()
        item = _Item(P.new_id("item"), "user_audio", turn, P.user_audio_item(""))
        item.item["id"] = item.id
        prev = self._register(item)
        await self.send(server_event("input_audio_buffer.committed", item_id=item.id,
                                     previous_item_id=prev))
        await self.send(server_event("conversation.item.added", previous_item_id=prev,
                                     item=item.item))
        await self.send(server_event("conversation.item.done", previous_item_id=prev,
                                     item=item.item))
        self._hold(turn)
        self._spoken(turn, item.id, len(y) / self.rate)
        await self.pipeline.push(UserTurnFrame(turn=turn, samples=y, sample_rate=self.rate,
                                               end_pts=len(y) / self.rate,
                                               speech_end_ts=time.monotonic()),
                                 to=self.after_vad)

    async def _on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        self.buffer, self.buffered = [], 0
        await self.send(server_event("input_audio_buffer.cleared"))

    async def _on_output_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        return  # WebRTC/SIP only: over a WebSocket the client owns playback

    async def _on_conversation_item_create(self, event: dict[str, Any]) -> None:
        item = P.field_of(event, "item", dict, required=True)
        kind = item.get("type", "message")
        item_id = item.get("id") if isinstance(item.get("id"), str) else P.new_id("item")
        if item_id in self.items:
            # LiveKit's code for it: its update_chat_ctx takes it as "already there"
            raise ProtocolError("item_create_duplicate_item_id",
                                f"an item {item_id!r} exists already",
                                param="item.id")
        if kind == "message":
            role = item.get("role", "user")
            text = P.content_text(item)
            if role == "user":
                if not text.strip():
                    raise ProtocolError("invalid_value", "the user message has no text "
                                        "(input_text parts)", param="item.content")
                it = _Item(item_id, "user_text", 0, P.user_text_item(item_id, text))
                self._check_room()  # the limit before the pipeline moves
                expected = self.session.turn + 1
                self._hold(expected)  # before the answer can reach the sink
                turn = await self.pipeline.say(text)  # takes the next turn before any await
                if turn != expected:  # pragma: no cover - the turn counter is ours alone
                    self.held[turn] = self.held.pop(expected)
                it.turn = turn
                await self._item_added_done(it)
                return
            if role in ("system", "assistant"):
                self.session.add(role, text, self.session.turn)
                it = _Item(item_id, role, self.session.turn, P.system_item(item_id, text)
                           if role == "system" else P.assistant_item(item_id, "completed",
                                                                     False, text))
                await self._item_added_done(it)
                return
            raise ProtocolError("invalid_value", f"unknown role {role!r}", param="item.role")
        if kind == "function_call_output":
            call_id = P.field_of(item, "call_id", str, required=True)
            output = P.field_of(item, "output", str, default="")
            turn = self.calls.get(call_id)
            if turn is None:
                raise ProtocolError("invalid_call_id", f"no function call {call_id!r} in "
                                    f"this conversation", param="item.call_id")
            it = _Item(item_id, "function_call_output", turn,
                       P.function_output_item(item_id, call_id, output))
            await self._item_added_done(it)
            self._hold(turn)
            await self.pipeline.push(ToolResultFrame(call_id=call_id, output=output, turn=turn))
            return
        raise ProtocolError("invalid_value", f"items of type {kind!r} cannot be created here",
                            param="item.type")

    async def _on_conversation_item_retrieve(self, event: dict[str, Any]) -> None:
        it = self.items.get(event.get("item_id"))  # type: ignore[arg-type]
        if it is None:
            raise ProtocolError("item_retrieve_invalid_item_id", "no such item",
                                param="item_id")
        item = dict(it.item)
        if it.kind == "assistant":  # what the conversation keeps (cut by a truncate)
            msg = self.session.last("assistant", it.turn)
            if msg is not None and item.get("content"):
                part = dict(item["content"][0])
                part["transcript" if "transcript" in part else "text"] = msg.effective_text
                item["content"] = [part]
        await self.send(server_event("conversation.item.retrieved", item=item))

    async def _on_conversation_item_delete(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        if not isinstance(item_id, str) or item_id not in self.items:
            raise ProtocolError("item_delete_invalid_item_id", "no such item", param="item_id")
        del self.items[item_id]
        if self.last_item_id == item_id:  # the next item follows the last one still there
            self.last_item_id = next(reversed(self.items), None)
        await self.send(server_event("conversation.item.deleted", item_id=item_id))

    async def _on_conversation_item_truncate(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        it = self.items.get(item_id) if isinstance(item_id, str) else None
        if it is None or it.kind != "assistant":
            raise ProtocolError("item_truncate_invalid_item_id",
                                "no assistant message item with that id", param="item_id")
        end_ms = P.field_of(event, "audio_end_ms", int, required=True)
        duration_ms = it.audio_samples * 1000 / P.OUTPUT_RATE
        if end_ms < 0 or end_ms > duration_ms + 1:
            raise ProtocolError("invalid_value", f"audio_end_ms {end_ms} is outside the "
                                f"item's audio (0..{int(duration_ms)} ms)",
                                param="audio_end_ms")
        self._truncating[it.turn] = (it.id, end_ms)
        await self.pipeline.truncate(it.turn, end_ms / 1000.0)

    async def _on_response_create(self, event: dict[str, Any]) -> None:
        resp = event.get("response") if isinstance(event.get("response"), dict) else {}
        opts: dict[str, Any] = {}
        mods = resp.get("output_modalities", resp.get("modalities"))
        if isinstance(mods, list) and mods:
            opts["audio"] = "audio" in mods
        if isinstance(resp.get("metadata"), dict):
            opts["metadata"] = {str(k): str(v) for k, v in resp["metadata"].items()}
        if self.responses:
            raise ProtocolError("conversation_already_has_active_response",
                                "a response is in progress; cancel it first")
        if self.held:  # the answer to the item created last is on its way, or made
            await self._release(next(iter(self.held)), opts)
            return
        if not self.can_respond:
            raise ProtocolError("response_create_unsupported", f"the pipeline "
                                f"{self.served.name!r} answers only new input (speech or "
                                f"text items), not response.create on its own")
        instructions = resp.get("instructions")
        turn = self.session.next_turn()
        self.response_opts[turn] = opts
        await self._open_response(turn)
        await self.pipeline.push(RespondFrame(
            turn=turn, instructions=instructions if isinstance(instructions, str) else None))

    async def _on_response_cancel(self, event: dict[str, Any]) -> None:
        if not self.responses:
            raise ProtocolError("response_cancel_not_active", "no response is in progress")
        self._cancel_requested = True
        await self.pipeline.interrupt()

    def _hold(self, turn: int) -> None:
        self.held.setdefault(turn, [])

    async def _release(self, turn: int, opts: dict[str, Any]) -> None:
        """response.create for a held answer: the response starts, what the pipeline made
        of it so far follows in order, and the rest flows as it comes."""
        frames = self.held[turn]
        self.response_opts[turn] = opts
        await self._open_response(turn)
        while frames:  # the sink appends to this list meanwhile: order is kept
            await self._handle_frame(frames.pop(0))
        del self.held[turn]

    # ------------------------------------------------------------------ frames in

    async def on_frame(self, frame: Frame) -> None:
        try:
            await self._on_frame(frame)
        except ProtocolError as exc:  # a limit reached by the pipeline's output
            await self.send(P.error_event(exc))
            if exc.close is not None:
                await self.close(exc.close, exc.code)

    async def _on_frame(self, frame: Frame) -> None:
        held = self.held.get(frame.turn)
        if held is not None and isinstance(frame, _ANSWER_FRAMES):
            if len(held) >= MAX_HELD_FRAMES:
                raise ProtocolError("held_response_too_large", "an answer waiting for "
                                    "response.create grew too large", close=1008)
            held.append(frame)
            return
        if self.barge:
            if isinstance(frame, SpeechStartFrame) and frame.turn in self.barge:
                await self._handle_frame(frame)  # speech_started, then the cancellation
                await self._flush_barge(frame.turn)
                return
            await self._flush_barge(frame.turn)  # no speech start came: close them anyway
        await self._handle_frame(frame)

    async def _handle_frame(self, frame: Frame) -> None:
        if isinstance(frame, SpeechStartFrame):
            item_id = P.new_id("item")
            self.user_items[frame.turn] = item_id
            self.speech_start[frame.turn] = frame.pts
            self.vad_turn = frame.turn
            if self.server_vad:
                await self.send(server_event("input_audio_buffer.speech_started",
                                             audio_start_ms=int(frame.pts * 1000),
                                             item_id=item_id))
        elif isinstance(frame, SpeechEndFrame):
            self.vad_turn = None
            item_id = self.user_items.pop(frame.turn, None) or P.new_id("item")
            start = self.speech_start.pop(frame.turn, frame.pts)
            if not self.server_vad:
                return
            self._spoken(frame.turn, item_id, frame.pts - start)
            assert self.config.turn_detection is not None
            if not self.config.turn_detection.get("create_response", True):
                self._hold(frame.turn)
            await self.send(server_event("input_audio_buffer.speech_stopped",
                                         audio_end_ms=int(frame.pts * 1000), item_id=item_id))
            it = _Item(item_id, "user_audio", frame.turn, P.user_audio_item(item_id))
            prev = self._register(it)
            await self.send(server_event("input_audio_buffer.committed", item_id=item_id,
                                         previous_item_id=prev))
            await self.send(server_event("conversation.item.added", previous_item_id=prev,
                                         item=it.item))
            await self.send(server_event("conversation.item.done", previous_item_id=prev,
                                         item=it.item))
        elif isinstance(frame, TextDeltaFrame):
            r = await self._response_for(frame.turn)
            if r is None:
                return
            m = await self._open_message(r)
            m.text += frame.text
            name = ("response.output_audio_transcript.delta" if r.audio
                    else "response.output_text.delta")
            await self.send(server_event(name, response_id=r.id, item_id=m.item.id,
                                         output_index=m.output_index, content_index=0,
                                         delta=frame.text))
        elif isinstance(frame, OutputAudioFrame):
            r = await self._response_for(frame.turn)
            if r is None or not r.audio:
                return
            m = await self._open_message(r)
            await self._audio_out(r, m, frame)
        elif isinstance(frame, ToolCallFrame):
            r = await self._response_for(frame.turn)
            if r is None:
                return
            await self._close_message(r, "completed")
            await self._function_call(r, frame)
        elif isinstance(frame, EndOfTurnFrame):
            if frame.turn in self.cancelled_turns:
                return
            if frame.reason == "interrupted":
                r = self.responses.get(frame.turn)
                if r is not None:
                    await self._close_response(r, "cancelled", "turn_detected")
                return
            r = await self._response_for(frame.turn)
            if r is None:
                return
            status, reason = {"max_tokens": ("incomplete", "max_output_tokens"),
                              "error": ("failed", None)}.get(frame.reason, ("completed", None))
            await self._close_response(r, status, reason)
        elif isinstance(frame, TruncateFrame):
            await self._truncated(frame)
        elif isinstance(frame, ErrorFrame):
            log.warning("stage reported an error", session=self.id, stage=frame.stage,
                        message=frame.message[:300])

    def on_retract(self, frame: EndRetractedFrame) -> None:
        """Preemptive VAD: the tentative end of ``frame.turn`` was retracted and the speech
        goes on as turn ``resumed_as``. Nothing of the tentative turn reached this sink; the
        client's open input item (its speech_started) now belongs to the new number."""
        old, new = frame.turn, frame.resumed_as
        if old in self.user_items:
            self.user_items[new] = self.user_items.pop(old)
        if old in self.speech_start:
            self.speech_start[new] = self.speech_start.pop(old)
        if self.vad_turn == old:
            self.vad_turn = new

    async def on_interrupt(self, frame: InterruptFrame) -> None:
        reason = "client_cancelled" if self._cancel_requested else "turn_detected"
        self._cancel_requested = False
        for turn in [t for t in self.held if t < frame.turn]:
            del self.held[turn]  # never released: nothing of it was sent
        older = [r for turn, r in self.responses.items() if turn < frame.turn]
        if reason == "turn_detected" and self.server_vad and older:
            # barge-in: the VAD's speech start follows on the data lane; clients expect
            # speech_started first, then the cancelled response.done (none of the answer
            # is sent in between: its turn counts as cancelled from now on)
            for r in older:
                self.responses.pop(r.turn, None)
                self.cancelled_turns.add(r.turn)
            self.barge.setdefault(frame.turn, []).extend(older)
            return
        for r in older:
            await self._close_response(r, "cancelled", reason)

    async def _flush_barge(self, upto: int) -> None:
        for turn in [t for t in self.barge if t <= upto]:
            for r in self.barge.pop(turn):
                await self._close_response(r, "cancelled", "turn_detected")

    def on_metrics(self, frame: MetricsFrame) -> None:
        if not self.metrics_events:
            return
        fields = {k: getattr(frame, k) for k in (
            "voice_to_voice_s", "vad_wait_s", "first_text_s", "first_audio_codec_s",
            "first_audio_sink_s", "audio_out_s", "interrupted", "end_reason")}
        event = server_event("omniframe.metrics", turn=frame.turn, **fields)
        if self.send_nowait is not None:
            with contextlib.suppress(Exception):  # a full queue: metrics are best effort
                self.send_nowait(event)

    # ------------------------------------------------------------- response pieces

    def _spoken(self, turn: int, item_id: str, seconds: float) -> None:
        self.spoken[turn] = (item_id, max(0.0, seconds))
        while len(self.spoken) > 16:  # turns never answered
            self.spoken.pop(next(iter(self.spoken)))

    async def _response_for(self, turn: int) -> _Response | None:
        if turn in self.cancelled_turns or turn <= 0:
            return None
        r = self.responses.get(turn)
        if r is not None:
            return r
        spoken = self.spoken.pop(turn, None)
        if spoken is not None and self.config.transcription is not None:
            msg = self.session.last("user", turn)  # what the pipeline understood
            if msg is not None:
                await self.send(server_event(
                    "conversation.item.input_audio_transcription.completed",
                    item_id=spoken[0], content_index=0, transcript=msg.text,
                    usage={"type": "duration", "seconds": round(spoken[1], 3)}))
        return await self._open_response(turn)

    async def _open_response(self, turn: int) -> _Response:
        opts = self.response_opts.pop(turn, {})
        audio = opts.get("audio", "audio" in self.config.output_modalities)
        r = _Response(P.new_id("resp"), turn, audio, opts.get("metadata"))
        self.responses[turn] = r
        await self.send(server_event("response.created", response=self._response_dict(
            r, "in_progress")))
        return r

    def _response_dict(self, r: _Response, status: str,
                       reason: str | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": r.id, "object": "realtime.response", "status": status,
            "status_details": None, "output": list(r.output),
            "output_modalities": ["audio" if r.audio else "text"],
            "conversation_id": self.id,
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": P.OUTPUT_RATE},
                                 "voice": self.config.voice}},
        }
        if r.metadata is not None:
            d["metadata"] = r.metadata
        if status != "in_progress":
            details: dict[str, Any] = {"type": status}
            if reason is not None:
                details["reason"] = reason
            d["status_details"] = details
        return d

    async def _open_message(self, r: _Response) -> _Message:
        if r.message is not None:
            return r.message
        item_id = P.new_id("item")
        it = _Item(item_id, "assistant", r.turn, P.assistant_item(item_id, "in_progress",
                                                                  r.audio, None))
        m = _Message(it, len(r.output))
        r.message = m
        prev = self._register(it)
        await self.send(server_event("response.output_item.added", response_id=r.id,
                                     output_index=m.output_index, item=it.item))
        await self.send(server_event("conversation.item.added", previous_item_id=prev,
                                     item=it.item))
        part = {"type": "audio", "transcript": ""} if r.audio else {"type": "text", "text": ""}
        await self.send(server_event("response.content_part.added", response_id=r.id,
                                     item_id=item_id, output_index=m.output_index,
                                     content_index=0, part=part))
        return m

    async def _audio_out(self, r: _Response, m: _Message, frame: OutputAudioFrame) -> None:
        x = np.asarray(frame.samples, dtype=np.float32)
        if frame.sample_rate != P.OUTPUT_RATE:
            from omniframe_audio.resampling import StreamResampler

            if m.resampler is None or m.resampler.src_rate != frame.sample_rate:
                m.resampler = StreamResampler(int(frame.sample_rate), P.OUTPUT_RATE)
            x = m.resampler.push(x)
        await self._audio_delta(r, m, x, frame.text)

    async def _audio_delta(self, r: _Response, m: _Message, x: Any, text: str | None) -> None:
        if not len(x):
            if text:
                m.item.chunks.append((m.item.audio_samples, 0, text))
            return
        m.item.chunks.append((m.item.audio_samples, len(x), text))
        for i in range(0, len(x), DELTA_SAMPLES):
            piece = x[i:i + DELTA_SAMPLES]
            await self.send(server_event("response.output_audio.delta", response_id=r.id,
                                         item_id=m.item.id, output_index=m.output_index,
                                         content_index=0, delta=P.encode_audio(piece)))
            m.item.audio_samples += len(piece)

    async def _close_message(self, r: _Response, status: str) -> None:
        m = r.message
        if m is None:
            return
        r.message = None
        ids = {"response_id": r.id, "item_id": m.item.id, "output_index": m.output_index,
               "content_index": 0}
        if r.audio:
            if m.resampler is not None and status == "completed":
                await self._audio_delta(r, m, m.resampler.flush(), None)
            await self.send(server_event("response.output_audio.done", **ids))
            await self.send(server_event("response.output_audio_transcript.done",
                                         transcript=m.text, **ids))
            part = {"type": "audio", "transcript": m.text}
        else:
            await self.send(server_event("response.output_text.done", text=m.text, **ids))
            part = {"type": "text", "text": m.text}
        await self.send(server_event("response.content_part.done", part=part, **ids))
        item = P.assistant_item(m.item.id, "completed" if status == "completed"
                                else "incomplete", r.audio, m.text)
        m.item.item = item
        r.output.append(item)
        await self.send(server_event("response.output_item.done", response_id=r.id,
                                     output_index=m.output_index, item=item))
        await self.send(server_event("conversation.item.done", item=item))

    async def _function_call(self, r: _Response, frame: ToolCallFrame) -> None:
        item_id = P.new_id("item")
        index = len(r.output)
        it = _Item(item_id, "function_call", r.turn, P.function_call_item(
            item_id, "in_progress", frame.call_id, frame.name, ""))
        prev = self._register(it)
        self.calls[frame.call_id] = r.turn
        await self.send(server_event("response.output_item.added", response_id=r.id,
                                     output_index=index, item=it.item))
        await self.send(server_event("conversation.item.added", previous_item_id=prev,
                                     item=it.item))
        ids = {"response_id": r.id, "item_id": item_id, "output_index": index,
               "call_id": frame.call_id}
        await self.send(server_event("response.function_call_arguments.delta",
                                     delta=frame.arguments, **ids))
        await self.send(server_event("response.function_call_arguments.done",
                                     arguments=frame.arguments, name=frame.name, **ids))
        done = P.function_call_item(item_id, "completed", frame.call_id, frame.name,
                                    frame.arguments)
        it.item = done
        r.output.append(done)
        await self.send(server_event("response.output_item.done", response_id=r.id,
                                     output_index=index, item=done))
        await self.send(server_event("conversation.item.done", item=done))

    async def _close_response(self, r: _Response, status: str, reason: str | None) -> None:
        await self._close_message(r, status)
        self.responses.pop(r.turn, None)
        if status == "cancelled":
            self.cancelled_turns.add(r.turn)
            if len(self.cancelled_turns) > 64:  # older turns cannot come back
                self.cancelled_turns.discard(min(self.cancelled_turns))
        await self.send(server_event("response.done",
                                     response=self._response_dict(r, status, reason)))

    async def _truncated(self, frame: TruncateFrame) -> None:
        from omniframe_audio.sinks import heard_prefix

        item_id, end_ms = self._truncating.pop(frame.turn, (None, 0))
        it = self.items.get(item_id) if item_id else None
        if it is None:
            return
        end = frame.audio_end_s * P.OUTPUT_RATE
        heard: list[str] = []
        for offset, n, text in it.chunks:
            if offset + n <= end:
                heard.append(text or "")
            elif offset < end and n:
                heard.append(heard_prefix(text or "", (end - offset) / n))
        if any(text is not None for _, _, text in it.chunks):
            self.session.truncate(frame.turn, "".join(heard))
        await self.send(server_event("conversation.item.truncated", item_id=it.id,
                                     content_index=0, audio_end_ms=end_ms))


def _vad_threshold(vad: Stage, threshold: float) -> float:
    """OpenAI's 0..1 VAD threshold in the VAD's own unit: the energy VAD's dBFS
    (0.5 -> -40 dBFS, its default; 0 -> -80, 1 -> 0), else the probability itself."""
    if vad.name == "energy":
        return round(-80.0 + 80.0 * threshold, 2)
    return min(0.99, max(0.01, threshold))

"""Metrics: per turn (latencies) and per stage (busy time, frames), collected by one observer.

The pipeline runs one :class:`MetricsCollector`. It sees every frame as a stage emits it and
attributes it to that stage, never to a kind: the stage that makes the answer audio is the
first seen emitting an :class:`~omniframe.frames.OutputAudioFrame` of a turn, and so on.
When a turn's :class:`~omniframe.frames.EndOfTurnFrame` leaves the last stage, the collector
sends a :class:`~omniframe.frames.MetricsFrame` with the turn's figures to every stage that
has an ``on_metrics(frame)`` method (in chain order) and to the pipeline's other observers, as
``on_frame("pipeline", "metrics", frame, now)``: from the pipeline, not from a stage. Turns
that never ended get theirs when the run ends, to the observers only. ``RunResult.turns``
holds the same figures.

Where each time is stamped (all monotonic seconds):

* ``speech_end_ts``: the user stopped speaking: the VAD's ``speech_end_ts`` (when the last
  voiced audio arrived), carried by :class:`~omniframe.frames.SpeechEndFrame` /
  :class:`~omniframe.frames.UserTurnFrame`.
* ``vad_end_ts``: the VAD decided so: ``ts`` (creation time) of that frame.
* ``transcript_ts``: ``ts`` of the turn's first final transcript.
* ``first_text_ts``: ``ts`` of the turn's first :class:`~omniframe.frames.TextDeltaFrame`,
  whichever stage made it (the LM's first token).
* ``first_codes_ts``: ``ts`` of the first audio codes.
* ``first_audio_codec_ts``: when the first answer audio chunk left the stage that made it
  (the codec or TTS): the time of that emit, not the chunk's ``ts``.
* ``first_audio_ts``: when that chunk left the sink that plays it: the first stage after the
  maker that consumes ``OutputAudioFrame`` and passes on what it consumes
  (``forward_consumed``, as sinks do); the last stage if none does. A real-time sink lets a
  chunk go when it starts playing, so this is when the user starts hearing the answer.
* ``end_ts``: ``ts`` of the turn's first end of turn.
* preemptive mode (a VAD's ``tentative_ms``): ``tentative_ts`` is when the VAD sent the
  tentative end; ``vad_end_ts`` is then when it confirmed it (the
  :class:`~omniframe.frames.EndConfirmedFrame`), so ``vad_wait_s`` stays the hangover and
  ``response_s`` may be negative (the answer was ready before the confirmation). A retracted
  turn has no figures of its own: :attr:`RunResult.retracted` lists each (its speculative
  seconds, and the stages' busy seconds from the tentative end until the next end of the
  speech it continued in: the compute spent on it, a bound since other work may overlap).

Derived figures (seconds):

* ``voice_to_voice_s``: user stopped speaking → first answer audio out of the sink
  (``first_audio_ts``); includes the VAD's end-of-speech wait. Also ``first_audio_sink_s``.
* ``first_audio_codec_s``: user stopped speaking → first answer audio out of the codec.
* ``vad_wait_s``: user stopped speaking → the VAD deciding so (hangover).
* ``response_s``: the VAD's decision → first answer audio out of the sink (model side).
* ``first_text_s``: user stopped speaking → first answer text.
* ``asr_s``: the VAD's decision → the final transcript.
* ``rtf``: answer compute time (VAD decision to end of turn) / answer audio duration.
* ``audio_out_s``: seconds of answer audio; after a barge-in, what a sink reports it played
  before it stopped (a frame with a float ``played_s``, e.g. omniframe_audio's
  ``PlaybackStoppedFrame``), not all that was made (``audio_produced_s``).
* ``stage_busy_s``: per stage, the seconds it spent in its own calls (process, generate, ...;
  not waiting on a full outbox) since the previous MetricsFrame: the turn's share when turns
  do not overlap.

The turn's ``text`` is the answer text that went furthest down the chain: the text deltas
emitted by the last stage that emitted any for the turn. That is what reached the codec and
the sinks: a text filter (a ``processor``) between the LM and the codec changes it; a stage
that only passes text on does not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from omniframe.frames import (
    AudioCodesFrame,
    AudioFrame,
    EndConfirmedFrame,
    EndOfTurnFrame,
    EndRetractedFrame,
    Frame,
    InterruptFrame,
    MetricsFrame,
    OutputAudioFrame,
    SpeechEndFrame,
    SpeechStartFrame,
    TextDeltaFrame,
    TranscriptFrame,
    UserTurnFrame,
)

__all__ = ["METRICS_STAGE", "MetricsCollector", "RunResult", "StageMetrics", "TurnMetrics",
           "percentile", "turn_line"]

log = structlog.get_logger("omniframe.metrics")

METRICS_STAGE = "pipeline"
"""The stage name observers see with a MetricsFrame (kind ``metrics``): the pipeline itself,
not one of its stages (no stage of a config may be called ``pipeline``)."""


@dataclass
class StageMetrics:
    """Counters of one stage over a run."""

    name: str
    kind: str
    frames_in: int = 0
    frames_out: int = 0
    busy_s: float = 0.0
    setup_s: float = 0.0
    dropped: int = 0
    interrupted: int = 0


@dataclass
class TurnMetrics:
    """Timestamps (monotonic seconds) and derived latencies of one user turn."""

    turn: int
    speech_start_pts: float | None = None
    speech_end_pts: float | None = None
    speech_end_ts: float | None = None  # user actually stopped
    vad_end_ts: float | None = None  # VAD decided
    tentative_ts: float | None = None  # preemptive mode: the VAD's tentative end
    transcript_ts: float | None = None
    first_text_ts: float | None = None
    first_codes_ts: float | None = None
    first_audio_codec_ts: float | None = None  # left the stage that made it
    first_audio_ts: float | None = None  # left the sink that plays it
    end_ts: float | None = None
    interrupted: bool = False
    end_reason: str | None = None
    transcript: str = ""
    text: str = ""
    audio_out_s: float = 0.0  # played; all produced unless a sink reported a cut
    audio_produced_s: float = 0.0
    user_audio_s: float = 0.0
    stage_busy_s: dict[str, float] = field(default_factory=dict)
    text_stage: int = -1  # chain index of the stage whose text ``text`` is

    def _since(self, a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    @property
    def voice_to_voice_s(self) -> float | None:
        return self._since(self.speech_end_ts, self.first_audio_ts)

    @property
    def first_audio_sink_s(self) -> float | None:
        return self.voice_to_voice_s

    @property
    def first_audio_codec_s(self) -> float | None:
        return self._since(self.speech_end_ts, self.first_audio_codec_ts)

    @property
    def vad_wait_s(self) -> float | None:
        return self._since(self.speech_end_ts, self.vad_end_ts)

    @property
    def response_s(self) -> float | None:
        return self._since(self.vad_end_ts, self.first_audio_ts)

    @property
    def first_text_s(self) -> float | None:
        return self._since(self.speech_end_ts, self.first_text_ts)

    @property
    def asr_s(self) -> float | None:
        return self._since(self.vad_end_ts, self.transcript_ts)

    @property
    def rtf(self) -> float | None:
        if self.end_ts is None or self.vad_end_ts is None or not self.audio_produced_s:
            return None
        return (self.end_ts - self.vad_end_ts) / self.audio_produced_s

    def summary(self) -> dict[str, Any]:
        """Derived figures, rounded, JSON-ready."""
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return {
            "turn": self.turn,
            "voice_to_voice_s": r(self.voice_to_voice_s),
            "vad_wait_s": r(self.vad_wait_s),
            "response_s": r(self.response_s),
            "first_text_s": r(self.first_text_s),
            "asr_s": r(self.asr_s),
            "tentative_wait_s": r(self._since(self.speech_end_ts, self.tentative_ts)),
            "first_audio_codec_s": r(self.first_audio_codec_s),
            "first_audio_sink_s": r(self.first_audio_sink_s),
            "rtf": r(self.rtf),
            "audio_out_s": r(self.audio_out_s),
            "audio_produced_s": r(self.audio_produced_s),
            "interrupted": self.interrupted,
            "end_reason": self.end_reason,
            "transcript": self.transcript,
            "text": self.text,
            "stage_busy_s": {k: round(v, 4) for k, v in self.stage_busy_s.items()},
        }

    def to_frame(self) -> MetricsFrame:
        """These figures as a :class:`~omniframe.frames.MetricsFrame` (unrounded)."""
        return MetricsFrame(
            turn=self.turn, voice_to_voice_s=self.voice_to_voice_s,
            vad_wait_s=self.vad_wait_s, response_s=self.response_s,
            first_text_s=self.first_text_s, asr_s=self.asr_s,
            tentative_wait_s=self._since(self.speech_end_ts, self.tentative_ts),
            first_audio_codec_s=self.first_audio_codec_s,
            first_audio_sink_s=self.first_audio_sink_s, rtf=self.rtf,
            audio_out_s=self.audio_out_s, audio_produced_s=self.audio_produced_s,
            interrupted=self.interrupted, end_reason=self.end_reason,
            transcript=self.transcript, text=self.text,
            stage_busy_s=tuple(self.stage_busy_s.items()),
        )

    def line(self) -> str:
        """One human line for the CLI."""
        return turn_line(self.summary())


def turn_line(s: Mapping[str, Any]) -> str:
    """One human line from a turn's summary (:meth:`TurnMetrics.summary`,
    :meth:`MetricsFrame.summary`)."""
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f}ms"

    rtf = "-" if s["rtf"] is None else f"{s['rtf']:.2f}"
    state = " interrupted" if s["interrupted"] else ""
    made, out = s["audio_produced_s"] or 0.0, s["audio_out_s"] or 0.0
    of = f" of {made:.2f}s" if abs(made - out) >= 0.005 else ""
    return (
        f"turn {s['turn']}{state}: voice-to-voice {ms(s['voice_to_voice_s'])} "
        f"(vad wait {ms(s['vad_wait_s'])}, response {ms(s['response_s'])}), "
        f"first text {ms(s['first_text_s'])}, audio out {out:.2f}s{of}, rtf {rtf}"
    )


@dataclass
class RunResult:
    """What a pipeline run returns: metrics for code (the evaluation harness) and the CLI."""

    turns: list[TurnMetrics]
    stages: dict[str, StageMetrics]
    wall_s: float
    setup_s: float = 0.0
    input_audio_s: float = 0.0
    frames: list[Frame] | None = None
    retracted: list[dict[str, Any]] = field(default_factory=list)
    """Preemptive mode: each retracted tentative turn (see the module doc)."""

    @property
    def rtf(self) -> float | None:
        """Wall time of the run divided by the input audio duration."""
        return self.wall_s / self.input_audio_s if self.input_audio_s else None

    def text(self, turn: int | None = None) -> str:
        """The answer text, of one turn or of all."""
        return "".join(t.text for t in self.turns if turn is None or t.turn == turn)

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 4),
            "setup_s": round(self.setup_s, 4),
            "input_audio_s": round(self.input_audio_s, 4),
            "rtf": None if self.rtf is None else round(self.rtf, 4),
            "turns": [t.summary() for t in self.turns],
            "stages": {k: asdict(v) for k, v in self.stages.items()},
            "retracted": self.retracted,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class MetricsCollector:
    """The pipeline's observer that turns frames into :class:`TurnMetrics` and sends each
    turn's :class:`~omniframe.frames.MetricsFrame`. O(1) per frame.

    Parameters:
        stages: the pipeline's stages, source first (their chain order and classes say which
            stage plays the audio and whose text went furthest). Without them (a collector fed
            by hand) the order in which stages are first seen stands in for the chain, the
            first other stage that passes the answer audio on is taken for the sink, and no
            MetricsFrame is sent (the last stage is unknown).
        stage_metrics: the pipeline's per-stage counters, for ``stage_busy_s``.
        observers: the observers that get each MetricsFrame (the pipeline's others).
    """

    def __init__(self, stages: Sequence[Any] = (), *,
                 stage_metrics: Mapping[str, StageMetrics] | None = None,
                 observers: Sequence[Any] = ()) -> None:
        self.turns: dict[int, TurnMetrics] = {}
        self.input_audio_s = 0.0
        names = [s.context.name for s in stages]
        self._index: dict[str, int] = {n: i for i, n in enumerate(names)}
        self._stages = list(stages)
        self._source: str | None = names[0] if names else None  # whose AudioFrames count
        self._last: str | None = names[-1] if names else None
        self._audio_maker: str | None = None  # the stage that makes the answer audio
        self._sink: str | None = None  # the stage whose emit of it is "heard"
        self._player: str | None = None  # the sink whose played_s reports count
        self._played: set[int] = set()  # turns whose played audio a sink reported
        self._sent: set[int] = set()  # turns whose MetricsFrame was sent
        self._stage_metrics = stage_metrics or {}
        self._busy_before: dict[str, float] = {}
        self.retracted: list[dict[str, Any]] = []
        self._speculating: dict[int, tuple[float, float]] = {}  # turn: (tentative ts, busy)
        self._waste: dict[int, dict[str, Any]] = {}  # resumed turn: its retraction's entry
        self._gone: set[int] = set()  # retracted turns: their late frames are ignored
        self._observers = tuple(observers)
        # only stages that override Stage.on_metrics (the base one does nothing)
        self._on_metrics = [(n, fn) for n, s in zip(names, stages, strict=True)
                            if callable(fn := getattr(s, "on_metrics", None))
                            and getattr(type(s), "on_metrics", None) is not _base_on_metrics()]

    def _turn(self, n: int) -> TurnMetrics:
        t = self.turns.get(n)
        if t is None:
            t = self.turns[n] = TurnMetrics(turn=n)
        return t

    def _pick_sink(self, maker: str) -> str | None:
        """The stage after ``maker`` that plays its audio (see the module doc)."""
        if not self._stages:
            return None  # learnt from the frames
        after = self._stages[self._index[maker] + 1:] if maker in self._index else []
        for st in after:
            if st.forward_consumed and any(issubclass(OutputAudioFrame, c) for c in st.consumes):
                return str(st.context.name)
        return self._last

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
        cls = type(frame)
        if cls is AudioFrame:
            if self._source is None:
                self._source = stage  # the first stage seen emitting input audio made it
            if stage == self._source:
                self.input_audio_s += frame.duration  # type: ignore[attr-defined]
            return
        n = frame.turn
        if not n or n in self._gone:
            return
        t = self._turn(n)
        if cls is TextDeltaFrame:
            if t.first_text_ts is None:
                t.first_text_ts = frame.ts
            i = self._index.get(stage)
            if i is None:
                i = self._index[stage] = len(self._index)
            if i > t.text_stage:  # a stage further down: its text is what went on
                t.text_stage = i
                t.text = frame.text  # type: ignore[attr-defined]
            elif i == t.text_stage:
                t.text += frame.text  # type: ignore[attr-defined]
        elif cls is OutputAudioFrame:
            # each chunk is counted once, at the stage that makes it: the first stage seen
            # emitting answer audio (later stages only pass it on)
            if self._audio_maker is None:
                self._audio_maker = stage
                self._sink = self._pick_sink(stage)
            if stage == self._audio_maker:
                t.audio_produced_s += frame.duration  # type: ignore[attr-defined]
                if n not in self._played:
                    t.audio_out_s += frame.duration  # type: ignore[attr-defined]
                if t.first_audio_codec_ts is None:
                    t.first_audio_codec_ts = now
            elif self._sink is None:
                self._sink = stage  # by hand: the first other stage that passes it on
            if stage == self._sink and t.first_audio_ts is None:
                t.first_audio_ts = now  # left the sink: the user hears it
        elif cls is AudioCodesFrame:
            if t.first_codes_ts is None:
                t.first_codes_ts = frame.ts
        elif cls is SpeechStartFrame:
            t.speech_start_pts = frame.pts  # type: ignore[attr-defined]
        elif cls is SpeechEndFrame:
            self._speech_ended(n)
            if frame.tentative and t.tentative_ts is None:  # type: ignore[attr-defined]
                t.tentative_ts = frame.ts
                self._speculating[n] = (frame.ts, self._busy())
            if t.vad_end_ts is None and t.speech_end_ts is None:
                if t.tentative_ts is None:
                    t.vad_end_ts = frame.ts
                t.speech_end_ts = frame.speech_end_ts or frame.ts  # type: ignore[attr-defined]
                t.speech_end_pts = frame.pts  # type: ignore[attr-defined]
        elif cls is EndConfirmedFrame:
            if t.vad_end_ts is None:
                t.vad_end_ts = frame.ts
            self._speculating.pop(n, None)
        elif cls is EndRetractedFrame:
            self._retracted(t, frame, now)  # type: ignore[arg-type]
        elif cls is UserTurnFrame:
            t.user_audio_s = frame.duration  # type: ignore[attr-defined]
            if t.vad_end_ts is None and t.tentative_ts is None:
                t.vad_end_ts = frame.ts
            if t.speech_end_ts is None:
                t.speech_end_ts = frame.speech_end_ts or frame.ts  # type: ignore[attr-defined]
        elif cls is TranscriptFrame:
            if frame.final and t.transcript_ts is None:  # type: ignore[attr-defined]
                t.transcript_ts = frame.ts
                t.transcript = frame.text  # type: ignore[attr-defined]
        elif cls is EndOfTurnFrame:
            if t.end_ts is None:
                t.end_ts = frame.ts
                t.end_reason = frame.reason  # type: ignore[attr-defined]
                if frame.reason == "interrupted":  # type: ignore[attr-defined]
                    t.interrupted = True
            if (stage == self._last and n not in self._sent
                    and frame.reason != "tool_call"):  # type: ignore[attr-defined]
                self._send(t, now, to_stages=True)  # the turn has left the pipeline
        elif cls is InterruptFrame:
            prev = self.turns.get(n - 1)
            if prev is not None and prev.end_ts is None:
                prev.interrupted = True
        elif isinstance(getattr(frame, "played_s", None), float):
            # a sink stopped playing this answer (omniframe_audio's PlaybackStoppedFrame):
            # it knows what was played; the first stage seen reporting is the one counted
            if self._player is None:
                self._player = stage
            if stage == self._player:
                t.audio_out_s = frame.played_s  # type: ignore[attr-defined]
                self._played.add(n)

    def _busy(self) -> float:
        return sum(m.busy_s for m in self._stage_metrics.values())

    def _retracted(self, t: TurnMetrics, frame: EndRetractedFrame, now: float) -> None:
        """A tentative turn was dropped: its figures go; the speech goes on as another turn."""
        self._gone.add(frame.turn)
        if frame.turn in self._sent or self.turns.pop(frame.turn, None) is None:
            return
        new = self._turn(frame.resumed_as)
        new.speech_start_pts = t.speech_start_pts
        since, busy = self._speculating.pop(frame.turn, (t.tentative_ts or now, self._busy()))
        entry = {"turn": frame.turn, "resumed_as": frame.resumed_as,
                 "speculative_s": round(now - since, 4), "busy_s": None}
        self.retracted.append(entry)
        self._waste[frame.resumed_as] = {"entry": entry, "busy": busy}

    def _speech_ended(self, n: int) -> None:
        """The speech a retraction continued in ended: the compute the retracted turn took is
        the stages' busy time since its tentative end (cancelled calls have returned by now)."""
        w = self._waste.pop(n, None)
        if w is not None:
            w["entry"]["busy_s"] = round(self._busy() - w["busy"], 4)

    def _send(self, t: TurnMetrics, now: float, to_stages: bool) -> None:
        """Finish ``t``'s figures and send its MetricsFrame."""
        self._sent.add(t.turn)
        for name, m in self._stage_metrics.items():
            t.stage_busy_s[name] = m.busy_s - self._busy_before.get(name, 0.0)
            self._busy_before[name] = m.busy_s
        frame = t.to_frame()
        if to_stages:
            for name, on_metrics in self._on_metrics:
                try:
                    on_metrics(frame)
                except Exception as exc:  # metrics are a side channel: never stop the run
                    log.error("on_metrics failed", stage=name,
                              error=f"{type(exc).__name__}: {exc}")
        for obs in self._observers:
            obs.on_frame(METRICS_STAGE, "metrics", frame, now)

    def result(self, *, stages: dict[str, StageMetrics], wall_s: float, setup_s: float,
               frames: list[Frame] | None) -> RunResult:
        """The run's metrics. Called once when the run ends: turns that never left the last
        stage get their MetricsFrame now (observers only), then observers with an
        ``on_run_end(result)`` method are called."""
        now = time.monotonic()
        if self._last is not None:
            for n in sorted(self.turns):
                if n not in self._sent:
                    self._send(self.turns[n], now, to_stages=False)
        result = RunResult(
            turns=[self.turns[k] for k in sorted(self.turns)],
            stages=stages, wall_s=wall_s, setup_s=setup_s,
            input_audio_s=self.input_audio_s, frames=frames, retracted=self.retracted,
        )
        for obs in self._observers:
            end = getattr(obs, "on_run_end", None)
            if callable(end):
                try:
                    end(result)
                except Exception as exc:  # after the run: report, do not mask its outcome
                    log.error("observer on_run_end failed", observer=type(obs).__name__,
                              error=f"{type(exc).__name__}: {exc}")
        return result


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)



def _base_on_metrics() -> Any:
    from omniframe.stage import Stage

    return Stage.on_metrics

"""Metrics: per turn (latencies) and per stage (busy time, frames), collected by an observer.

Latency definitions (all from monotonic timestamps):

* ``voice_to_voice_s``: the user stopped speaking (last voiced audio, by the VAD) to the first
  sample of the answer's audio leaving the codec; includes the VAD's end-of-speech wait.
* ``vad_wait_s``: the user stopped speaking to the VAD deciding so (hangover).
* ``response_s``: the VAD's decision to first answer audio (model-side latency).
* ``first_text_s``: the user stopped speaking to the first answer text.
* ``rtf``: answer compute time divided by answer audio duration, per turn.
* ``audio_out_s``: seconds of answer audio; after a barge-in, what the audio sink reports it
  played before it stopped (a frame with ``played_s`` from a sink), not all that was made
  (``audio_produced_s``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from omniframe.frames import (
    AudioCodesFrame,
    AudioFrame,
    EndOfTurnFrame,
    Frame,
    InterruptFrame,
    OutputAudioFrame,
    SpeechEndFrame,
    SpeechStartFrame,
    TextDeltaFrame,
    TranscriptFrame,
    UserTurnFrame,
)

__all__ = ["MetricsCollector", "RunResult", "StageMetrics", "TurnMetrics", "percentile"]


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
    transcript_ts: float | None = None
    first_text_ts: float | None = None
    first_codes_ts: float | None = None
    first_audio_ts: float | None = None
    end_ts: float | None = None
    interrupted: bool = False
    end_reason: str | None = None
    transcript: str = ""
    text: str = ""
    audio_out_s: float = 0.0  # played; all produced unless a sink reported a cut
    audio_produced_s: float = 0.0
    user_audio_s: float = 0.0

    def _since(self, a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    @property
    def voice_to_voice_s(self) -> float | None:
        return self._since(self.speech_end_ts, self.first_audio_ts)

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
            "rtf": r(self.rtf),
            "audio_out_s": r(self.audio_out_s),
            "audio_produced_s": r(self.audio_produced_s),
            "interrupted": self.interrupted,
            "end_reason": self.end_reason,
            "transcript": self.transcript,
            "text": self.text,
        }

    def line(self) -> str:
        """One human line for the CLI."""
        def ms(x: float | None) -> str:
            return "-" if x is None else f"{x * 1000:.0f}ms"

        rtf = "-" if self.rtf is None else f"{self.rtf:.2f}"
        state = " interrupted" if self.interrupted else ""
        made = self.audio_produced_s
        of = f" of {made:.2f}s" if abs(made - self.audio_out_s) >= 0.005 else ""
        return (
            f"turn {self.turn}{state}: voice-to-voice {ms(self.voice_to_voice_s)} "
            f"(vad wait {ms(self.vad_wait_s)}, response {ms(self.response_s)}), "
            f"first text {ms(self.first_text_s)}, audio out {self.audio_out_s:.2f}s{of}, "
            f"rtf {rtf}"
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
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class MetricsCollector:
    """The built-in observer: turns frames into :class:`TurnMetrics`. O(1) per frame."""

    def __init__(self) -> None:
        self.turns: dict[int, TurnMetrics] = {}
        self.input_audio_s = 0.0
        self._audio_maker: str | None = None  # the stage that makes the answer audio
        self._player: str | None = None  # the sink whose played_s reports count
        self._played: set[int] = set()  # turns whose played audio a sink reported

    def _turn(self, n: int) -> TurnMetrics:
        t = self.turns.get(n)
        if t is None:
            t = self.turns[n] = TurnMetrics(turn=n)
        return t

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
        cls = type(frame)
        if cls is AudioFrame:
            if kind == "source":
                self.input_audio_s += frame.duration  # type: ignore[attr-defined]
            return
        n = frame.turn
        if not n:
            return
        t = self._turn(n)
        if cls is TextDeltaFrame:
            if t.first_text_ts is None:
                t.first_text_ts = frame.ts
            if kind == "lm":
                t.text += frame.text  # type: ignore[attr-defined]
        elif cls is OutputAudioFrame:
            # each chunk is counted once, at the stage that makes it: the first stage seen
            # emitting answer audio (later stages only pass it on)
            if self._audio_maker is None:
                self._audio_maker = stage
            if stage == self._audio_maker:
                t.audio_produced_s += frame.duration  # type: ignore[attr-defined]
                if n not in self._played:
                    t.audio_out_s += frame.duration  # type: ignore[attr-defined]
            if kind == "sink" and t.first_audio_ts is None:
                t.first_audio_ts = now  # left the first sink: the user hears it
        elif cls is AudioCodesFrame:
            if t.first_codes_ts is None:
                t.first_codes_ts = frame.ts
        elif cls is SpeechStartFrame:
            t.speech_start_pts = frame.pts  # type: ignore[attr-defined]
        elif cls is SpeechEndFrame:
            if t.vad_end_ts is None:
                t.vad_end_ts = frame.ts
                t.speech_end_ts = frame.speech_end_ts or frame.ts  # type: ignore[attr-defined]
                t.speech_end_pts = frame.pts  # type: ignore[attr-defined]
        elif cls is UserTurnFrame:
            t.user_audio_s = frame.duration  # type: ignore[attr-defined]
            if t.vad_end_ts is None:
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
        elif cls is InterruptFrame:
            prev = self.turns.get(n - 1)
            if prev is not None and prev.end_ts is None:
                prev.interrupted = True
        elif kind == "sink" and isinstance(getattr(frame, "played_s", None), float):
            # a sink stopped playing this answer (omniframe_audio's PlaybackStoppedFrame):
            # it knows what was played; the first sink that reports is the one counted
            if self._player is None:
                self._player = stage
            if stage == self._player:
                t.audio_out_s = frame.played_s  # type: ignore[attr-defined]
                self._played.add(n)

    def result(self, *, stages: dict[str, StageMetrics], wall_s: float, setup_s: float,
               frames: list[Frame] | None) -> RunResult:
        return RunResult(
            turns=[self.turns[k] for k in sorted(self.turns)],
            stages=stages, wall_s=wall_s, setup_s=setup_s,
            input_audio_s=self.input_audio_s, frames=frames,
        )


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


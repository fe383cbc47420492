"""Frames: the small immutable messages that travel between stages.

Every frame is a frozen dataclass with a monotonic creation timestamp ``ts`` (seconds, from
:func:`time.monotonic`) and the number of the user ``turn`` it belongs to (0: no turn yet, or
not part of any turn, such as raw input audio).

Three families decide how the bus treats a frame:

* :class:`DataFrame` (audio, features, text, codes): ordered, and dropped by an interruption
  when they belong to an older turn than the one that interrupted.
* :class:`ControlFrame` (end of turn, end of stream, speech start/end): ordered with the data,
  never dropped by an interruption. End of stream waits for queued data: the pipeline drains.
* :class:`SystemFrame` (interrupt, error): urgent. They overtake queued data on every edge.

Audio payloads are numpy arrays (float32, mono, -1..1) annotated loosely so that importing
this module does not import numpy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "AudioCodesFrame",
    "AudioFrame",
    "CommitInputFrame",
    "ControlFrame",
    "DataFrame",
    "EndConfirmedFrame",
    "EndOfStreamFrame",
    "EndOfTurnFrame",
    "EndRetractedFrame",
    "ErrorFrame",
    "FeaturesFrame",
    "Frame",
    "InterruptFrame",
    "MetricsFrame",
    "OutputAudioFrame",
    "RespondFrame",
    "SpeechEndFrame",
    "SpeechStartFrame",
    "SystemFrame",
    "TextDeltaFrame",
    "ToolCallFrame",
    "ToolResultFrame",
    "TranscriptFrame",
    "TruncateFrame",
    "UpdateOptionsFrame",
    "UserTurnFrame",
    "frame_types",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """Base of every frame.

    Parameters:
        turn: the user turn this frame belongs to; 0 when it belongs to none.
        ts: monotonic creation time in seconds.
    """

    urgent: ClassVar[bool] = False
    """Urgent frames overtake queued data (see :class:`SystemFrame`)."""

    turn: int = 0
    ts: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True, kw_only=True)
class DataFrame(Frame):
    """Ordered payload; dropped by an interruption if it belongs to an older turn."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlFrame(Frame):
    """Ordered with the data; never dropped."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemFrame(Frame):
    """Urgent: travels on a separate lane that overtakes queued data."""

    urgent: ClassVar[bool] = True


# --------------------------------------------------------------------------------- audio in


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioFrame(DataFrame):
    """A piece of input audio (the user's side).

    Parameters:
        samples: float32 mono samples in -1..1, shape (n,).
        sample_rate: samples per second.
        pts: position of the first sample in the input stream, in seconds.
        live: True when the audio arrives at the speed of speech (a microphone, a paced
            file): only then can the user talk over an answer (barge-in). Offline input runs
            faster than real time, and a later turn must not cut an earlier answer.
    """

    samples: np.ndarray
    sample_rate: int
    pts: float = 0.0
    live: bool = False

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechStartFrame(ControlFrame):
    """The VAD heard the user start speaking; opens turn ``turn``.

    Parameters:
        pts: stream position (seconds) where speech started.
    """

    pts: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechEndFrame(ControlFrame):
    """The VAD decided the user stopped speaking (after its hangover).

    Parameters:
        pts: stream position (seconds) where speech ended.
        speech_end_ts: monotonic time at which the last voiced audio arrived, i.e. the moment
            the user actually stopped; ``ts`` of this frame minus this is the VAD's wait.
        tentative: preemptive mode (a VAD's ``tentative_ms``): sent after a short pause,
            before the hangover ran out, with the turn's :class:`UserTurnFrame` right after it,
            so that the stages start on the answer early. The VAD later confirms the end
            (:class:`EndConfirmedFrame`) or retracts it (:class:`EndRetractedFrame`). Until
            then the pipeline's first sink (its last stage if it has no sink) holds every
            frame of the turn (this one included);
            on confirmation they go on, this one with ``tentative=False``: the sink sees what
            it sees without preemption.
    """

    pts: float = 0.0
    speech_end_ts: float = 0.0
    tentative: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class UserTurnFrame(DataFrame):
    """A finished user utterance: all its audio at once.

    Parameters:
        samples: float32 mono samples of the utterance.
        sample_rate: samples per second.
        start_pts, end_pts: where the utterance lies in the input stream (seconds).
        speech_end_ts: monotonic time the user stopped speaking (see :class:`SpeechEndFrame`).
    """

    samples: np.ndarray
    sample_rate: int
    start_pts: float = 0.0
    end_pts: float = 0.0
    speech_end_ts: float = 0.0

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


# ---------------------------------------------------------------------------- understanding


@dataclass(frozen=True, slots=True, kw_only=True)
class FeaturesFrame(DataFrame):
    """Encoder features of a user turn (for example Whisper encoder states).

    Parameters:
        features: an array or tensor, (frames, dim); the producing plugin documents its type.
        frame_rate: feature frames per second.
        encoder: name of the encoder that made them (consumers check compatibility).
        speech_end_ts: carried over from the user turn, for latency metrics.
    """

    features: Any
    frame_rate: float
    encoder: str = ""
    speech_end_ts: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptFrame(DataFrame):
    """What the user said, as text (from ASR).

    Parameters:
        text: the transcript.
        final: False for partial hypotheses.
        words: optional word timings, ``(word, start_s, end_s)``.
        speech_end_ts: carried over from the user turn, for latency metrics.
    """

    text: str
    final: bool = True
    words: tuple[tuple[str, float, float], ...] = ()
    speech_end_ts: float = 0.0


# ----------------------------------------------------------------------------------- answer


@dataclass(frozen=True, slots=True, kw_only=True)
class TextDeltaFrame(DataFrame):
    """A piece of the agent's text answer, as soon as it is decoded."""

    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioCodesFrame(DataFrame):
    """Discrete audio codes of the answer: one codec frame (e.g. 7 SNAC codes per 85.3 ms).

    Parameters:
        codes: the codes of one frame, in the codec's own order.
        codec: codec name, e.g. ``"snac_24khz"``.
        index: frame number within the turn, from 0.
    """

    codes: tuple[int, ...]
    codec: str = "snac_24khz"
    index: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputAudioFrame(DataFrame):
    """A chunk of the agent's speech.

    Parameters:
        samples: float32 mono samples in -1..1.
        sample_rate: samples per second.
        text: the text this chunk speaks, where the producer knows it (for truncation).
    """

    samples: np.ndarray
    sample_rate: int
    text: str | None = None

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfTurnFrame(ControlFrame):
    """The agent finished (or abandoned) its answer to ``turn``.

    Parameters:
        reason: ``completed``, ``interrupted``, ``max_tokens``, ``empty``, ``error``, or
            ``tool_call``: the answer waits for the result of a client-side tool (see
            :class:`ToolCallFrame`); a :class:`ToolResultFrame` makes the LM go on.
        text: the whole text answer, where the producer knows it.
    """

    reason: Literal["completed", "interrupted", "max_tokens", "empty", "error",
                    "tool_call"] = "completed"
    text: str | None = None


# ---------------------------------------------------------------------------- function calls


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallFrame(DataFrame):
    """The LM calls a tool (function calling), as part of its answer to ``turn``.

    A server-side tool (one with a Python function, see :mod:`omniframe.tools`) is run by the
    LM itself, which emits this frame and then the :class:`ToolResultFrame`, and goes on
    answering. For a client-side tool the LM emits this frame and ends the turn with
    ``EndOfTurnFrame(reason="tool_call")``; whoever answers it (an OpenAI Realtime client's
    ``function_call_output``) sends a :class:`ToolResultFrame` with the same ``call_id``
    into the pipeline, upstream of the LM. Not spoken: a TTS lets it pass.

    Parameters:
        call_id: unique id of this call (``call_`` + hex); the result carries it back.
        name: the tool's name.
        arguments: the arguments, a JSON object as text (OpenAI's ``function_call`` item
            carries it the same way).
    """

    call_id: str
    name: str
    arguments: str = "{}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolResultFrame(DataFrame):
    """The result of a tool call. Emitted by the LM after running a server-side tool;
    sent into the pipeline (upstream of the LM) with a client-side tool's result, which
    makes the LM continue its answer to ``turn`` (the turn of the call; 0 lets the LM take it
    from the pending call).

    Parameters:
        call_id: the ``call_id`` of the :class:`ToolCallFrame` it answers.
        name: the tool's name; may be empty when the sender does not know it (OpenAI's
            ``function_call_output`` item has only the ``call_id``): the LM takes it from
            the call.
        output: the result as text the model reads, normally JSON.
        is_error: True when the call failed (bad arguments, an exception, a timeout) and
            ``output`` says why, e.g. ``{"error": "..."}``.
    """

    call_id: str
    name: str = ""
    output: str
    is_error: bool = False


# ---------------------------------------------------------------------------------- control


@dataclass(frozen=True, slots=True, kw_only=True)
class InterruptFrame(SystemFrame):
    """Barge-in: the user started turn ``turn``; drop everything of older turns downstream."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EndConfirmedFrame(SystemFrame):
    """Preemptive mode: the tentative end of ``turn`` (a ``SpeechEndFrame(tentative=True)``)
    held: the hangover ran out without more speech. What the pipeline's first sink held for
    the turn goes on at once. Urgent, so that it is not queued behind the answer it releases.
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class EndRetractedFrame(SystemFrame):
    """Preemptive mode: the user went on speaking after the tentative end of ``turn``. Every
    stage drops the turn's frames and cancels its work on it (:meth:`Stage.retract`); the
    session forgets its messages; nothing of it reached the sink. The speech goes on as turn
    ``resumed_as`` (a new number, so that its frames are not dropped), whose end comes as
    usual.

    Parameters:
        resumed_as: the number of the turn the speech continues in.
    """

    resumed_as: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorFrame(SystemFrame):
    """A recoverable problem a stage reports without stopping the pipeline.

    Parameters:
        stage: name of the stage that reports it.
        message: what went wrong and what to do.
    """

    stage: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfStreamFrame(ControlFrame):
    """The input has ended. Ordered: it arrives after every frame produced before it."""



# --------------------------------------------------------------------------- steering


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitInputFrame(ControlFrame):
    """The user's input is complete now (a push-to-talk release, a client's "commit"): a VAD
    closes its open turn as if the silence had lasted, and the turn is answered. Without an
    open turn it does nothing. Sent by :meth:`omniframe.pipeline.Pipeline.commit`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RespondFrame(ControlFrame):
    """Answer now, from the conversation so far, without new user input (a client's
    ``response.create``). LMs that keep a history answer it as turn ``turn``; others pass it on.

    Parameters:
        instructions: extra instructions for this answer only (None: the stage's own).
    """

    instructions: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateOptionsFrame(ControlFrame):
    """Change options of the running stage named ``stage`` (ordered: from the next frame it
    takes). Only the fields its class lists in ``live_options`` may change; the runner checks
    them against the stage's ``Options`` model. Sent by
    :meth:`omniframe.pipeline.Pipeline.update`, which refuses bad updates up front.

    Parameters:
        stage: the stage's name in the pipeline.
        options: the fields to change and their new values.
    """

    stage: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TruncateFrame(ControlFrame):
    """The user heard only the first ``audio_end_s`` seconds of the answer to ``turn`` (a
    client's ``conversation.item.truncate``): the conversation keeps what was heard. Playback
    sinks consume it (they know which text went with which audio).

    Parameters:
        audio_end_s: seconds of that answer's audio that were played.
    """

    audio_end_s: float

# ---------------------------------------------------------------------------------- metrics


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsFrame(ControlFrame):
    """The measurements of one answered turn (``turn``), made by the pipeline's metrics
    collector when the turn's :class:`EndOfTurnFrame` has left the last stage (see
    :mod:`omniframe.metrics` for where each time is stamped). It does not travel on the bus:
    stages get it through an ``on_metrics(frame)`` method, observers in ``on_frame`` with
    stage ``"pipeline"`` and kind ``"metrics"``. Durations in seconds; None where a time is
    missing (no audio, no VAD).

    Parameters:
        voice_to_voice_s: the user stopped speaking → first answer audio out of the sink
            (the same as ``first_audio_sink_s``).
        vad_wait_s: the user stopped speaking → the VAD decided so.
        response_s: the VAD's decision → first answer audio out of the sink.
        first_text_s: the user stopped speaking → first answer text (any stage's).
        asr_s: the VAD's decision → the final transcript.
        tentative_wait_s: preemptive mode: the user stopped speaking → the VAD's tentative
            end (when the answer started); None without preemption.
        first_audio_codec_s: the user stopped speaking → first answer audio out of the
            stage that made it (the codec or TTS).
        first_audio_sink_s: the user stopped speaking → first answer audio out of the sink
            that plays it.
        rtf: answer compute time / answer audio duration.
        audio_out_s: answer audio played (all produced unless a sink reported a cut).
        audio_produced_s: answer audio made.
        interrupted: the answer was cut by a barge-in.
        end_reason: the end of turn's ``reason``; None when the turn never ended.
        transcript: what the user said (final transcript), where known.
        text: the answer text that reached the end of the chain (after any text filter).
        stage_busy_s: ``(stage name, seconds)`` pairs, in chain order: each stage's time in
            its own calls since the previous MetricsFrame.
    """

    voice_to_voice_s: float | None = None
    vad_wait_s: float | None = None
    response_s: float | None = None
    first_text_s: float | None = None
    asr_s: float | None = None
    tentative_wait_s: float | None = None
    first_audio_codec_s: float | None = None
    first_audio_sink_s: float | None = None
    rtf: float | None = None
    audio_out_s: float = 0.0
    audio_produced_s: float = 0.0
    interrupted: bool = False
    end_reason: str | None = None
    transcript: str = ""
    text: str = ""
    stage_busy_s: tuple[tuple[str, float], ...] = ()

    def summary(self) -> dict[str, Any]:
        """JSON-ready, rounded: the keys of :meth:`omniframe.metrics.TurnMetrics.summary`."""
        from dataclasses import fields

        out: dict[str, Any] = {"turn": self.turn}
        for f in fields(self):
            if f.name in ("turn", "ts"):
                continue
            v = getattr(self, f.name)
            out[f.name] = round(v, 4) if isinstance(v, float) else v
        out["stage_busy_s"] = {k: round(v, 4) for k, v in self.stage_busy_s}
        return out


def frame_types() -> dict[str, type[Frame]]:
    """Every frame class defined here, by name (for configs, docs and listings)."""
    return {
        name: obj
        for name, obj in globals().items()
        if isinstance(obj, type) and issubclass(obj, Frame)
    }

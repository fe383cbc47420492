"""Voice activity detection: three backends (energy, Silero, WebRTC) over one turn logic.

:class:`VADStage` implements the turns once; a backend only scores fixed-size chunks of
audio at its own sample rate. Per chunk:

* not in a turn: a run of voiced chunks at least ``min_speech_ms`` long opens turn ``n``
  (numbered from 1): :class:`SpeechStartFrame` (``pts`` = where the run began), then, with
  ``interrupt``, an :class:`InterruptFrame` so that an answer still in flight downstream is
  cancelled (barge-in). The turn's audio starts ``pre_roll_ms`` before the run.
* in a turn: ``hangover_ms`` of unvoiced chunks after the last voiced one closes it:
  :class:`SpeechEndFrame` (``pts`` = end of the last voiced chunk, ``speech_end_ts`` = the
  ``ts`` of the input frame holding that moment, i.e. when the user actually stopped), then
  :class:`UserTurnFrame` with the whole utterance (pre-roll + speech + ``post_roll_ms``) at the
  input's sample rate. A turn longer than ``max_turn_s`` is closed there and the speech goes on
  in a new turn (logged as ``turn_split``).
* end of stream closes an open turn.
* preemptive mode (``tentative_ms``): in a turn, that much unvoiced audio (at least
  ``post_roll_ms``) sends a tentative end: ``SpeechEndFrame(tentative=True)`` and the turn's
  :class:`UserTurnFrame`, the same audio as the real end would send, so that the stages start
  on the answer while the hangover runs (the pipeline's first sink holds the turn's frames).
  If the hangover then runs out, :class:`EndConfirmedFrame` releases them (nothing is sent
  again); if speech resumes first, :class:`EndRetractedFrame` makes every stage drop the turn
  and the speech goes on as a new turn number, whose end is decided as usual. So the answer
  that reaches the sink is, in every case, the one to the audio a run without preemption sends.
* end-of-turn model (``end_of_turn: smart_turn``): after ``end_of_turn_after_ms`` of unvoiced
  audio in a turn, :mod:`~omniframe_audio.smart_turn` reads the turn's audio; if it says the
  user has finished (probability >= ``end_of_turn_threshold``) the turn ends there, else the
  VAD waits for more speech or for ``hangover_ms``, which is then the longest wait (set it
  long: 1-3 s). The model is asked once per pause; a pause whose speech resumes is asked again
  at its own end. ``SpeechEndFrame.pts`` is the end of speech either way, so the time the
  decision took is ``ts`` of the frame minus ``speech_end_ts``.

Input at another rate than the backend needs is resampled on the fly
(:class:`~omniframe_audio.resampling.StreamResampler`); the turn audio keeps the input rate.
Input audio is assumed contiguous: times come from the first frame's ``pts`` plus the sample
count.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from omniframe.audio import AudioError
from omniframe.frames import (
    AudioFrame,
    CommitInputFrame,
    EndConfirmedFrame,
    EndOfStreamFrame,
    EndRetractedFrame,
    Frame,
    InterruptFrame,
    SpeechEndFrame,
    SpeechStartFrame,
    UserTurnFrame,
)
from omniframe.stage import Stage, StageOptions
from omniframe_audio.resampling import StreamResampler

__all__ = ["EnergyVAD", "SileroVAD", "VADOptions", "VADStage", "WebRTCVAD", "turn_bounds"]


class VADOptions(StageOptions):
    """Turn logic shared by every VAD."""

    min_speech_ms: float = Field(
        100.0, ge=0, le=10_000, description="voiced audio needed to open a turn")
    hangover_ms: float = Field(
        500.0, ge=0, le=60_000, description="unvoiced audio after speech that closes a turn")
    pre_roll_ms: float = Field(
        300.0, ge=0, le=10_000, description="audio kept before the detected start")
    post_roll_ms: float = Field(
        100.0, ge=0, le=10_000,
        description="audio kept after the last voiced chunk (at most hangover_ms is there)")
    max_turn_s: float = Field(30.0, gt=0, le=3600, description="longer turns are split")
    interrupt: bool | Literal["auto"] = Field(
        "auto", description="send an InterruptFrame when a turn opens (barge-in); auto: only "
        "for live input (microphone, real-time pacing), where the user can talk over an answer")
    forward_audio: bool = Field(False, description="pass the input AudioFrames on too")
    tentative_ms: float | None = Field(
        None, ge=0, le=60_000,
        description="preemptive mode: after this much unvoiced audio in a turn (at least "
        "post_roll_ms), send a tentative end so that the answer starts during the hangover; "
        "held until the hangover confirms it, dropped if speech resumes. None: off")

    end_of_turn: Literal["silence", "smart_turn"] = Field(
        "silence", description="what ends a turn: silence (hangover_ms of it), or smart_turn: "
        "the Smart Turn v3 model, asked after end_of_turn_after_ms of silence, with hangover_ms "
        "as the longest wait when it says the user is not done")
    end_of_turn_after_ms: float = Field(
        200.0, ge=0, le=10_000, description="unvoiced audio before the end-of-turn model is asked")
    end_of_turn_threshold: float = Field(
        0.5, gt=0, lt=1, description="the model's probability of a finished turn that ends it")
    end_of_turn_model: str = Field(
        "pkg://pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
        description="the Smart Turn v3 ONNX model (a model URI or path)")

    @model_validator(mode="after")
    def _end_of_turn_before_hangover(self) -> VADOptions:
        if self.end_of_turn != "silence" and self.end_of_turn_after_ms >= self.hangover_ms:
            raise ValueError(
                f"end_of_turn_after_ms ({self.end_of_turn_after_ms:g}) must be shorter than "
                f"hangover_ms ({self.hangover_ms:g}): with end_of_turn: {self.end_of_turn}, "
                f"hangover_ms is the longest wait after the model says the user is not done "
                f"(1000-3000 is usual)")
        return self

    @model_validator(mode="after")
    def _tentative_before_hangover(self) -> VADOptions:
        t = self.tentative_ms
        if t is not None and max(t, self.post_roll_ms) >= self.hangover_ms:
            raise ValueError(
                f"tentative_ms ({t:g}) and post_roll_ms ({self.post_roll_ms:g}) must both be "
                f"shorter than hangover_ms ({self.hangover_ms:g}): the tentative end comes "
                f"before the hangover ends the turn; lower them or set tentative_ms: null")
        return self


class VADStage(Stage):
    """Base of the VADs: the turn logic. Subclasses implement the backend hooks
    (:meth:`backend_rate`, :meth:`chunk_samples`, :meth:`score`, optionally
    :meth:`is_speech`, :meth:`min_input_rate`)."""

    kind = "vad"
    consumes = (AudioFrame, CommitInputFrame)
    requires = (AudioFrame,)
    produces = (SpeechStartFrame, InterruptFrame, SpeechEndFrame, UserTurnFrame, AudioFrame,
                EndConfirmedFrame, EndRetractedFrame)
    Options = VADOptions

    blocking: bool = False
    """True when :meth:`score` is heavy enough to run in a worker thread."""
    # a client's turn_detection update (OpenAI Realtime server_vad) changes these live
    live_options = frozenset({"threshold", "min_speech_ms", "hangover_ms", "pre_roll_ms",
                              "post_roll_ms", "max_turn_s", "interrupt", "tentative_ms",
                              "end_of_turn", "end_of_turn_after_ms",
                              "end_of_turn_threshold"})

    # ------------------------------------------------------------------- backend hooks

    def min_input_rate(self) -> int:
        """The lowest input sample rate this backend can use (resampling included)."""
        return 1

    def backend_rate(self, input_rate: int) -> int:
        """The sample rate the backend scores at, given the input's."""
        return input_rate

    def chunk_samples(self, rate: int) -> int:
        """Samples per scored chunk at ``rate``."""
        raise NotImplementedError

    def score(self, chunks: Any) -> list[float]:
        """Score chunks of shape (k, chunk_samples), in order (backends keep state)."""
        raise NotImplementedError

    def is_speech(self, score: float, active: bool) -> bool:
        """Whether a chunk with ``score`` is speech; ``active``: a turn or run is open."""
        return score >= self.options.threshold  # type: ignore[attr-defined]

    # ----------------------------------------------------------------------- state

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_rate: int | None = None
        self._turn = 0
        self._live = False  # the input arrives at the speed of speech
        self._in_turn = False
        self._tentative_sent = False  # the open turn's tentative end went out
        self.tentatives = 0  # tentative ends sent, and of those retracted (preemptive mode)
        self.retractions = 0
        self._eot_model: Any = None  # end_of_turn: smart_turn (loaded in setup)
        self._eot_asked = False  # the model was asked about the current pause
        self._eot_unloadable: str | None = None  # why a model switched on live did not load
        self.eot_calls = 0  # model calls, of those that ended the turn, and their seconds
        self.eot_ends = 0
        self.eot_seconds = 0.0

    async def setup(self) -> None:
        """Load the end-of-turn model when ``end_of_turn`` names one (shared by every
        pipeline in the process). Backends with their own setup call this first."""
        if self.options.end_of_turn == "smart_turn":  # type: ignore[attr-defined]
            await self.setup_end_of_turn()

    async def setup_end_of_turn(self) -> None:
        """Load the Smart Turn model (once per process and URI); AudioError if it cannot."""
        from omniframe.resources import default_resources
        from omniframe_audio.smart_turn import load_smart_turn

        uri = self.options.end_of_turn_model  # type: ignore[attr-defined]
        resources = self.context.resources or default_resources()
        self._eot_model = await resources.aget(("smart_turn", uri),
                                               lambda: load_smart_turn(uri))

    def _init_stream(self, frame: AudioFrame) -> None:
        rate = int(frame.sample_rate)
        low = self.min_input_rate()
        if rate < low:
            raise AudioError(
                f"the {self.name} VAD needs audio sampled at {low} Hz or more, got {rate} Hz; "
                f"set the source's sample_rate to 16000"
            )
        self._in_rate = rate
        self._be_rate = self.backend_rate(rate)
        self._chunk = self.chunk_samples(self._be_rate)
        if self._chunk < 1:
            raise AudioError(f"the {self.name} VAD's chunk is shorter than one sample at "
                             f"{self._be_rate} Hz; lengthen it")
        self._rs = None if self._be_rate == rate else StreamResampler(rate, self._be_rate)
        self._derive_lengths()
        self._t0 = float(frame.pts)
        self._in_total = 0
        self._audio: deque[Any] = deque()
        self._audio_start = 0
        self._ts: deque[tuple[int, float]] = deque()  # (end input index, frame ts)
        self._be_buf = np.zeros(0, dtype=np.float32)
        self._be_pos = 0
        self._run_start: int | None = None
        self._last_voiced_end = 0
        self._turn_start = 0
        self._turn_audio_start = 0
        self.log.debug("vad_stream_started", input_rate=rate, backend_rate=self._be_rate,
                       chunk=self._chunk)

    def _derive_lengths(self) -> None:
        """The options' durations in input samples."""
        o, rate = self.options, self._in_rate or 0
        ms = rate / 1000.0
        self._min_speech_n = int(round(o.min_speech_ms * ms))  # type: ignore[attr-defined]
        self._hangover_n = int(round(o.hangover_ms * ms))  # type: ignore[attr-defined]
        self._pre_roll_n = int(round(o.pre_roll_ms * ms))  # type: ignore[attr-defined]
        self._post_roll_n = int(round(o.post_roll_ms * ms))  # type: ignore[attr-defined]
        self._max_turn_n = int(round(o.max_turn_s * rate))  # type: ignore[attr-defined]
        t = o.tentative_ms  # type: ignore[attr-defined]
        self._tentative_n = (None if t is None
                             else max(int(round(t * ms)), self._post_roll_n))
        self._eot_after_n = int(round(o.end_of_turn_after_ms * ms))  # type: ignore[attr-defined]

    def options_changed(self, old: StageOptions) -> None:
        self._eot_unloadable = None  # a new setting may load: try again
        if self._in_rate is not None:  # the stream has started: new lengths from now on
            self._derive_lengths()

    def _t(self, idx: int) -> float:
        assert self._in_rate is not None
        return self._t0 + idx / self._in_rate

    def _to_in(self, be_idx: int) -> int:
        assert self._in_rate is not None
        return min(int(round(be_idx * self._in_rate / self._be_rate)), self._in_total)

    def _ts_at(self, idx: int) -> float:
        """The ts of the input frame that holds sample ``idx - 1``."""
        best = None
        for end, ts in reversed(self._ts):
            if end >= idx:
                best = ts
            else:
                break
        if best is None:
            return self._ts[-1][1] if self._ts else 0.0
        return best

    def _slice(self, a: int, b: int) -> Any:
        if b <= a:
            return np.zeros(0, dtype=np.float32)
        whole = np.concatenate(list(self._audio)) if len(self._audio) > 1 else (
            self._audio[0] if self._audio else np.zeros(0, dtype=np.float32))
        lo = max(0, a - self._audio_start)
        return np.array(whole[lo:b - self._audio_start], dtype=np.float32)

    def _trim(self) -> None:
        """Outside a turn, drop audio older than any future turn's pre-roll can reach."""
        if self._in_turn:
            return
        nxt = self._to_in(self._be_pos)
        if self._run_start is not None:
            nxt = min(nxt, self._run_start)
        keep_from = nxt - self._pre_roll_n - 1
        while self._audio and self._audio_start + len(self._audio[0]) <= keep_from:
            self._audio_start += len(self._audio.popleft())
        while len(self._ts) > 1 and self._ts[0][0] <= keep_from:
            self._ts.popleft()

    # ----------------------------------------------------------------- turn events

    def _start(self, at: int, pre_roll: bool) -> list[Frame]:
        self._turn = self.context.session.next_turn()  # shared with typed input and steering
        self._in_turn = True
        self._run_start = None
        self._turn_start = at
        self._turn_audio_start = max(self._audio_start, at - self._pre_roll_n) if pre_roll else at
        self._eot_asked = False
        n = self._turn
        self.log.debug("speech_started", turn=n, pts=round(self._t(at), 3))
        out: list[Frame] = [SpeechStartFrame(turn=n, pts=self._t(at))]
        interrupt = self.options.interrupt  # type: ignore[attr-defined]
        if interrupt is True or (interrupt == "auto" and self._live):
            out.append(InterruptFrame(turn=n))
        return out

    def _end(self, post_roll: bool = True) -> list[Frame]:
        n = self._turn
        self._in_turn = False
        if self._tentative_sent:  # its audio went out already: confirm it
            self._tentative_sent = False
            self.context.session.settle(n, confirmed=True)
            self.log.debug("speech_end_confirmed", turn=n)
            return [EndConfirmedFrame(turn=n)]
        return self._end_frames(post_roll)

    def _end_frames(self, post_roll: bool, tentative: bool = False) -> list[Frame]:
        """The end of the open turn: where speech ended, then the utterance."""
        n = self._turn
        lve = self._last_voiced_end
        end = min(lve + self._post_roll_n, self._in_total) if post_roll else lve
        samples = self._slice(self._turn_audio_start, end)
        speech_end_ts = self._ts_at(lve)
        assert self._in_rate is not None
        self.log.debug("speech_ended", turn=n, pts=round(self._t(lve), 3),
                       seconds=round(len(samples) / self._in_rate, 3), tentative=tentative)
        return [
            SpeechEndFrame(turn=n, pts=self._t(lve), speech_end_ts=speech_end_ts,
                           tentative=tentative),
            UserTurnFrame(turn=n, samples=samples, sample_rate=self._in_rate,
                          start_pts=self._t(self._turn_audio_start), end_pts=self._t(end),
                          speech_end_ts=speech_end_ts),
        ]

    def _tentative(self) -> list[Frame]:
        """Preemptive mode: a short pause; send the end it would be (held downstream)."""
        self._tentative_sent = True
        self.tentatives += 1
        self.context.session.mark_tentative(self._turn)
        return self._end_frames(post_roll=True, tentative=True)

    def _retract(self) -> list[Frame]:
        """Speech resumed after a tentative end: drop that turn; go on under a new number."""
        old = self._turn
        self._turn = self.context.session.next_turn()
        self._tentative_sent = False
        self.retractions += 1
        self.context.session.settle(old, confirmed=False)
        self.log.debug("speech_end_retracted", turn=old, resumed_as=self._turn)
        return [EndRetractedFrame(turn=old, resumed_as=self._turn)]

    def _decide(self, voiced: bool, s: int, e: int) -> list[Frame]:
        out: list[Frame] = []
        if not self._in_turn:
            if voiced:
                if self._run_start is None:
                    self._run_start = s
                self._last_voiced_end = e
                if e - self._run_start >= self._min_speech_n:
                    out += self._start(self._run_start, pre_roll=True)
            else:
                self._run_start = None
        elif voiced:
            if self._tentative_sent:
                out += self._retract()
            self._last_voiced_end = e
            self._eot_asked = False  # a new pause will be asked about at its own end
            if e - self._turn_start >= self._max_turn_n:
                self.log.info("turn_split", turn=self._turn,
                              max_turn_s=self.options.max_turn_s)  # type: ignore[attr-defined]
                out += self._end(post_roll=False)
                out += self._start(e, pre_roll=False)
        elif e - self._last_voiced_end >= self._hangover_n:
            out += self._end()
        elif (self._tentative_n is not None and not self._tentative_sent
              and e - self._last_voiced_end >= self._tentative_n):
            out += self._tentative()
        return out

    def _eot_due(self, voiced: bool, e: int) -> bool:
        """Whether the end-of-turn model is to be asked about the pause that reaches ``e``."""
        return (self.options.end_of_turn != "silence"  # type: ignore[attr-defined]
                and self._in_turn and not voiced
                and not self._eot_asked and e - self._last_voiced_end >= self._eot_after_n
                and e - self._last_voiced_end < self._hangover_n)

    async def _eot_says_done(self, e: int) -> bool:
        """Ask the model about the turn's audio up to ``e``; a failing model is logged and
        counts as "not done" (the hangover still ends the turn: nothing is lost)."""
        import time

        self._eot_asked = True
        if self._eot_model is None:  # switched on while running (a client's semantic_vad)
            if self._eot_unloadable is not None:
                return False  # said once; the hangover decides
            try:
                await self.setup_end_of_turn()
            except Exception as exc:
                self._eot_unloadable = str(exc)
                self.log.warning("end_of_turn_model_unavailable", error=str(exc))
                return False
        audio = self._slice(self._turn_audio_start, e)
        t0 = time.perf_counter()
        try:
            p = await self.run_sync(self._eot_model.probability, audio, self._in_rate)
        except Exception as exc:  # the model is an aid: the hangover still decides
            self.log.warning("end_of_turn_model_failed", turn=self._turn, error=str(exc))
            return False
        finally:
            self.eot_seconds += time.perf_counter() - t0
            self.eot_calls += 1
        done = p >= self.options.end_of_turn_threshold  # type: ignore[attr-defined]
        self.eot_ends += int(done)
        self.log.debug("end_of_turn_model", turn=self._turn, probability=round(p, 3),
                       silence_ms=round(1000 * (e - self._last_voiced_end) / self._in_rate),
                       done=done)
        return done

    async def _score_and_decide(self, final: bool = False) -> list[Frame]:
        c = self._chunk
        buf = self._be_buf
        k = len(buf) // c
        if final and len(buf) % c >= max(1, c // 2):  # a last partial chunk worth scoring
            buf = np.pad(buf, (0, c - len(buf) % c))
            k += 1
        if not k:
            return []
        chunks = buf[:k * c].reshape(k, c)
        scores = await self.run_sync(self.score, chunks) if self.blocking else self.score(chunks)
        out: list[Frame] = []
        for i, sc in enumerate(scores):
            b0 = self._be_pos + i * c
            active = self._in_turn or self._run_start is not None
            voiced = self.is_speech(float(sc), active)
            s, e = self._to_in(b0), self._to_in(b0 + c)
            if self._eot_due(voiced, e) and await self._eot_says_done(e):
                out += self._end()
                continue
            out += self._decide(voiced, s, e)
        self._be_buf = buf[k * c:] if not final else np.zeros(0, dtype=np.float32)
        self._be_pos += k * c
        return out

    # ------------------------------------------------------------------ stage API

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if isinstance(frame, CommitInputFrame):  # the input is complete: close the turn now
            if self._in_turn:
                for out in self._end():
                    yield out
            return
        assert isinstance(frame, AudioFrame)
        self._live = frame.live
        if self._in_rate is None:
            self._init_stream(frame)
        elif frame.sample_rate != self._in_rate:
            raise AudioError(
                f"input sample rate changed from {self._in_rate} to {frame.sample_rate} Hz "
                f"mid-stream; the {self.name} VAD needs one rate per stream (resample in the "
                f"source)"
            )
        x = np.asarray(frame.samples, dtype=np.float32)
        if x.ndim != 1:
            raise AudioError(f"AudioFrame samples must be mono (n,), got shape {x.shape}")
        if self.options.forward_audio:  # type: ignore[attr-defined]
            yield dataclasses.replace(frame, turn=self._turn if self._in_turn else frame.turn)
        if not len(x):
            return
        self._audio.append(x)
        self._in_total += len(x)
        self._ts.append((self._in_total, frame.ts))
        be = self._rs.push(x) if self._rs is not None else x
        if len(be):
            self._be_buf = np.concatenate([self._be_buf, be]) if len(self._be_buf) else be
        for out in await self._score_and_decide():
            yield out
        self._trim()

    async def end_of_stream(self, frame: EndOfStreamFrame) -> AsyncIterator[Frame]:
        if self._in_rate is None:
            return
        if self._rs is not None:
            tail = self._rs.flush()
            if len(tail):
                self._be_buf = np.concatenate([self._be_buf, tail])
        for out in await self._score_and_decide(final=True):
            yield out
        if self._in_turn:
            for out in self._end():
                yield out


# ------------------------------------------------------------------------- backends


class EnergyVAD(VADStage):
    """Energy VAD: RMS level in dBFS against ``threshold``; no model.

    With ``adaptive``, a chunk is speech only if it is also ``margin_db`` above a running
    noise floor (which falls fast and rises over about ``adapt_s``), so steady background
    noise louder than ``threshold`` does not count as speech."""

    name = "energy"

    class Options(VADOptions):
        threshold: float = Field(-40.0, ge=-120, le=0, description="speech level, dBFS")
        window_ms: float = Field(20.0, ge=1, le=1000, description="scored chunk length")
        adaptive: bool = False
        margin_db: float = Field(12.0, ge=0, le=60)
        adapt_s: float = Field(3.0, gt=0, le=600)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._floor: float | None = None
        self._last_db = -120.0

    def chunk_samples(self, rate: int) -> int:
        return int(round(rate * self.options.window_ms / 1000.0))  # type: ignore[attr-defined]

    def score(self, chunks: Any) -> list[float]:
        rms = np.sqrt(np.mean(np.square(chunks, dtype=np.float64), axis=1))
        return list(20.0 * np.log10(np.maximum(rms, 1e-6)))

    def is_speech(self, score: float, active: bool) -> bool:
        o = self.options
        loud = score >= o.threshold  # type: ignore[attr-defined]
        if not o.adaptive:  # type: ignore[attr-defined]
            return loud
        if self._floor is None:
            self._floor = score
        voiced = loud and score >= self._floor + o.margin_db  # type: ignore[attr-defined]
        step = (o.window_ms / 1000.0) / o.adapt_s  # type: ignore[attr-defined]
        if score < self._floor:
            self._floor += 0.5 * (score - self._floor)  # falls fast
        else:
            # rises slowly; ten times slower during speech, so speech is not learnt as noise
            self._floor += (step / 10 if voiced else step) * (score - self._floor)
        return voiced


class SileroVAD(VADStage):
    """Silero VAD, the model shipped inside the ``silero-vad`` package (ONNX by default).

    Runs on 512-sample chunks at 16 kHz (256 at 8 kHz) and keeps the model's recurrent state
    across chunks. Speech opens at ``threshold`` and, once open, stays while the probability
    is above ``neg_threshold`` (hysteresis; default ``threshold - 0.15``). One ONNX session is
    shared by every pipeline in the process; each stage keeps its own state."""

    name = "silero"
    blocking = True

    class Options(VADOptions):
        threshold: float = Field(0.5, gt=0, lt=1, description="speech probability")
        neg_threshold: float | None = Field(None, gt=0, lt=1)
        sample_rate: Literal[8000, 16000] = 16000
        onnx: bool = Field(True, description="onnxruntime (fast) instead of TorchScript")

        @model_validator(mode="after")
        def _hysteresis(self) -> SileroVAD.Options:
            if self.neg_threshold is not None and self.neg_threshold > self.threshold:
                raise ValueError(
                    f"neg_threshold ({self.neg_threshold}) must not exceed threshold "
                    f"({self.threshold}): it is the lower level at which speech stops"
                )
            return self

    _session: Any = None
    _jit: Any = None

    def min_input_rate(self) -> int:
        return 8000

    def backend_rate(self, input_rate: int) -> int:
        return int(self.options.sample_rate)  # type: ignore[attr-defined]

    def chunk_samples(self, rate: int) -> int:
        return 512 if rate == 16000 else 256

    async def setup(self) -> None:
        from omniframe.resources import default_resources

        await super().setup()
        resources = self.context.resources or default_resources()
        if self.options.onnx:  # type: ignore[attr-defined]
            wrapper = await resources.aget(("silero_vad", "onnx"), lambda: _load_silero(True))
            self._session = wrapper.session
        else:  # TorchScript keeps its state inside the module: one copy per stage
            self._jit = await self.run_sync(_load_silero, False)
        sr = int(self.options.sample_rate)  # type: ignore[attr-defined]
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._ctx = np.zeros(64 if sr == 16000 else 32, dtype=np.float32)
        self._sr = np.array(sr, dtype=np.int64)

    def score(self, chunks: Any) -> list[float]:
        if self._session is None and self._jit is None:
            raise RuntimeError("SileroVAD.setup() was not called")
        out: list[float] = []
        if self._jit is not None:
            import torch

            with torch.no_grad():
                for ch in chunks:
                    out.append(float(self._jit(torch.from_numpy(np.ascontiguousarray(ch)),
                                               int(self._sr)).item()))
            return out
        n_ctx = len(self._ctx)
        for ch in chunks:
            x = np.concatenate([self._ctx, ch])[None, :]
            prob, self._state = self._session.run(
                None, {"input": x, "state": self._state, "sr": self._sr})
            self._ctx = x[0, -n_ctx:]
            out.append(float(prob[0, 0]))
        return out

    def is_speech(self, score: float, active: bool) -> bool:
        o = self.options
        if active:
            neg = o.neg_threshold  # type: ignore[attr-defined]
            if neg is None:
                neg = max(o.threshold - 0.15, 0.01)  # type: ignore[attr-defined]
            return score >= neg
        return score >= o.threshold  # type: ignore[attr-defined]


def _load_silero(onnx: bool) -> Any:
    """Load the packaged Silero model; restores torch's thread count, which importing
    ``silero_vad`` sets to 1 for the whole process."""
    try:
        import torch
    except ImportError:
        raise AudioError(
            "the silero VAD needs torch (silero-vad loads its model through it): "
            "pip install 'omniframe[torch,vad]'"
        ) from None
    threads = torch.get_num_threads()
    try:
        try:
            from silero_vad import load_silero_vad
        except ImportError:
            raise AudioError(
                "the silero VAD needs the silero-vad package: pip install 'omniframe[vad]'"
            ) from None
        try:
            with warnings.catch_warnings():  # silero-vad's importlib/jit deprecations
                warnings.simplefilter("ignore", DeprecationWarning)
                return load_silero_vad(onnx=onnx)
        except ImportError as exc:
            raise AudioError(
                f"the silero VAD's ONNX model needs onnxruntime ({exc}): pip install "
                f"onnxruntime, or set onnx: false to use the TorchScript model"
            ) from None
    finally:
        torch.set_num_threads(threads)


class WebRTCVAD(VADStage):
    """WebRTC VAD (``webrtcvad-wheels``): a speech/non-speech decision per 10, 20 or 30 ms.

    ``aggressiveness`` (0-3) is its threshold: higher rejects more non-speech. It runs at 8,
    16, 32 or 48 kHz: the input's rate if it is one of these, else ``sample_rate`` (16 kHz)."""

    name = "webrtc"

    class Options(VADOptions):
        aggressiveness: int = Field(2, ge=0, le=3, description="0 (least) to 3 (most strict)")
        frame_ms: Literal[10, 20, 30] = 30
        sample_rate: Literal[8000, 16000, 32000, 48000] | None = Field(
            None, description="rate to run at; null: the input's, if supported, else 16000")

    _vad: Any = None

    def min_input_rate(self) -> int:
        return 8000

    def backend_rate(self, input_rate: int) -> int:
        want = self.options.sample_rate  # type: ignore[attr-defined]
        if want is not None:
            return int(want)
        return input_rate if input_rate in (8000, 16000, 32000, 48000) else 16000

    def chunk_samples(self, rate: int) -> int:
        return rate * int(self.options.frame_ms) // 1000  # type: ignore[attr-defined]

    async def setup(self) -> None:
        await super().setup()
        try:
            import webrtcvad
        except ImportError:
            raise AudioError(
                "the webrtc VAD needs the webrtcvad module: pip install webrtcvad-wheels "
                "(or pip install 'omniframe[vad]')"
            ) from None
        self._vad = webrtcvad.Vad(int(self.options.aggressiveness))  # type: ignore[attr-defined]

    def score(self, chunks: Any) -> list[float]:
        if self._vad is None:
            raise RuntimeError("WebRTCVAD.setup() was not called")
        rate = self._be_rate
        pcm = np.round(np.clip(chunks, -1.0, 1.0) * 32767.0).astype("<i2")
        return [1.0 if self._vad.is_speech(row.tobytes(), rate) else 0.0 for row in pcm]

    def is_speech(self, score: float, active: bool) -> bool:
        return score >= 0.5


def turn_bounds(frames: Sequence[Frame]) -> list[tuple[int, float, float]]:
    """``(turn, start_pts, end_pts)`` of each closed turn in ``frames`` (for tests, tools)."""
    starts = {f.turn: f.pts for f in frames if isinstance(f, SpeechStartFrame)}
    return [(f.turn, starts.get(f.turn, math.nan), f.pts)
            for f in frames if isinstance(f, SpeechEndFrame)]

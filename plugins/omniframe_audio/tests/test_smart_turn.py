"""Smart Turn v3: its features against the reference extractor, the real model on real
(espeak-ng) speech, and the VAD's end-of-turn logic around it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omniframe_audio.smart_turn import (
    SMART_TURN_URI,
    last_window,
    load_smart_turn,
    smart_turn_available,
    whisper_log_mel,
)
from omniframe_audio.vad import EnergyVAD
from pydantic import ValidationError

from omniframe.audio import AudioError
from omniframe.frames import EndConfirmedFrame, EndOfStreamFrame, SpeechEndFrame, UserTurnFrame
from omniframe.resources import Resources
from omniframe.session import Session
from omniframe.stage import StageContext
from omniframe.testing import audio_frames, espeak, speech_like

pytestmark = pytest.mark.anyio

SR = 16000
HAVE_MODEL = smart_turn_available()
needs_model = pytest.mark.skipif(
    not HAVE_MODEL, reason="the Smart Turn model ships in pipecat-ai: pip install --no-deps "
    "pipecat-ai==1.14.0 (scripts/setup.sh does)")


# ------------------------------------------------------------------------------ features


@pytest.mark.parametrize("kind", ["noise", "speech", "short"])
def test_features_match_the_whisper_feature_extractor(kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(1)
    if kind == "noise":
        x = (rng.standard_normal(8 * SR) * 0.1).astype(np.float32)
    else:
        x = espeak("What is the capital of France?", sample_rate=SR)
        if kind == "short":
            x = x[: SR // 2]
    x = last_window(x, SR)
    fe = transformers.WhisperFeatureExtractor(chunk_length=8)
    ref = fe(x, sampling_rate=SR, return_tensors="np", padding="max_length",
             max_length=8 * SR, truncation=True, do_normalize=True).input_features[0]
    ours = whisper_log_mel(x)
    assert ours.shape == ref.shape == (80, 800)
    assert np.abs(ours - ref).max() < 1e-4


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 10 * SR), seed=st.integers(0, 2**16))
def test_last_window_is_eight_seconds_left_padded(n: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    w = last_window(x, SR)
    assert w.shape == (8 * SR,) and w.dtype == np.float32
    keep = min(n, 8 * SR)
    assert np.array_equal(w[8 * SR - keep:], x[n - keep:])  # the newest audio, in order
    assert not w[: 8 * SR - keep].any()  # zeros before it


def test_other_rates_are_resampled_to_16k() -> None:
    x = np.sin(2 * np.pi * 440 * np.arange(44100) / 44100).astype(np.float32)
    w = last_window(x, 44100)
    tail = w[-SR:]
    assert abs(np.sqrt(np.mean(tail[1000:-1000] ** 2)) - np.sqrt(0.5)) < 0.02
    assert not w[: 7 * SR - 100].any()


def test_features_refuse_unusable_audio() -> None:
    with pytest.raises(AudioError, match="mono audio of at least 400 samples"):
        whisper_log_mel(np.zeros(100, np.float32))
    with pytest.raises(AudioError, match="mono"):
        whisper_log_mel(np.zeros((2, 16000), np.float32))


# ------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def model():
    if not HAVE_MODEL:
        pytest.skip("pipecat-ai (the Smart Turn model) is not installed")
    return load_smart_turn()


@needs_model
def test_the_model_hears_a_finished_and_an_unfinished_turn(model) -> None:
    pad = np.zeros(SR // 5, np.float32)  # asked after 200 ms of silence, as the VAD does
    done = model.probability(np.concatenate(
        [espeak("Tell me about the weather in Paris.", sample_rate=SR), pad]), SR)
    hesitating = model.probability(np.concatenate(
        [espeak("Can you tell me, um,", sample_rate=SR), pad]), SR)
    assert 0.0 <= hesitating < 0.5 < done <= 1.0


def test_missing_or_broken_models_are_clear_errors(tmp_path) -> None:
    with pytest.raises(AudioError, match="not available"):
        load_smart_turn("pkg://no_such_package_here/model.onnx")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(AudioError, match="could not load the Smart Turn model"):
        load_smart_turn(str(bad))


# ------------------------------------------------------------------ the VAD around it


class Scripted:
    """An end-of-turn model that answers from a list (what the VAD does with the answers is
    under test here, not the model)."""

    def __init__(self, *answers: float | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[float] = []  # seconds of audio it was given

    def probability(self, audio, rate: int) -> float:
        self.calls.append(len(audio) / rate)
        a = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(a, Exception):
            raise a
        return a


async def decide(samples, model=None, **options):
    """Feed ``samples`` as live 20 ms frames; (audio time at each final end, the ends,
    all frames out, the stage)."""
    res = Resources()
    if model is not None:
        uri = options.setdefault("end_of_turn_model", "scripted://eot")
        res.get(("smart_turn", uri), lambda: model)
    stage = EnergyVAD(options, StageContext(name="vad", session=Session(), resources=res))
    await stage.setup()
    at, ends, frames, pos = [], [], [], 0
    for f in audio_frames(samples, SR, 20.0, live=True):
        pos += len(f.samples)
        async for o in stage.process(f):
            frames.append(o)
            if (isinstance(o, SpeechEndFrame) and not o.tentative) or isinstance(
                    o, EndConfirmedFrame):
                at.append(pos / SR)
                ends.append(o)
    async for o in stage.end_of_stream(EndOfStreamFrame()):
        frames.append(o)
    return at, ends, frames, stage


SMART = {"end_of_turn": "smart_turn", "end_of_turn_after_ms": 200, "hangover_ms": 2000}
ONE_TURN = [("silence", 0.5), ("speech", 1.0), ("silence", 3.0)]


async def test_a_finished_turn_ends_after_the_short_wait() -> None:
    model = Scripted(0.9)
    at, ends, frames, stage = await decide(speech_like(ONE_TURN), model, **SMART)
    assert len(ends) == 1 and abs(ends[0].pts - 1.5) < 0.03  # pts: where speech ended
    assert 1.7 <= at[0] <= 1.76  # decided 200 ms (+ one 20 ms frame) after it
    assert len(model.calls) == 1 and stage.eot_calls == 1 and stage.eot_ends == 1
    assert abs(model.calls[0] - 1.5) < 0.05  # the turn's audio: pre-roll + speech + 200 ms
    (turn,) = [f for f in frames if isinstance(f, UserTurnFrame)]
    assert turn.end_pts == pytest.approx(1.6, abs=0.03)  # the same post-roll as always


async def test_an_unfinished_turn_waits_for_the_hangover_and_asks_once() -> None:
    model = Scripted(0.1)
    at, ends, _, _ = await decide(speech_like(ONE_TURN), model, **SMART)
    assert len(ends) == 1 and 3.49 <= at[0] <= 3.56  # 2 s hangover: the longest wait
    assert len(model.calls) == 1


async def test_speech_after_an_unfinished_verdict_is_asked_about_again() -> None:
    model = Scripted(0.1, 0.9)  # the pause: not done; the real end: done
    x = speech_like([("silence", 0.5), ("speech", 0.8), ("silence", 0.7), ("speech", 0.6),
                     ("silence", 3.0)])
    at, ends, frames, _ = await decide(x, model, **SMART)
    assert len(ends) == 1 and abs(ends[0].pts - 2.6) < 0.03  # one turn across the pause
    assert 2.8 <= at[0] <= 2.86
    assert len(model.calls) == 2
    assert len([f for f in frames if isinstance(f, UserTurnFrame)]) == 1


async def test_a_failing_model_leaves_the_decision_to_the_hangover() -> None:
    model = Scripted(RuntimeError("onnxruntime fell over"))
    at, ends, _, stage = await decide(speech_like(ONE_TURN), model, **SMART)
    assert len(ends) == 1 and 3.49 <= at[0] <= 3.56
    assert stage.eot_calls == 1 and stage.eot_ends == 0


async def test_with_a_tentative_end_the_model_confirms_it_early() -> None:
    model = Scripted(0.9)
    at, ends, frames, stage = await decide(speech_like(ONE_TURN), model, tentative_ms=100,
                                           **SMART)
    assert [type(e) for e in ends] == [EndConfirmedFrame]
    assert 1.7 <= at[0] <= 1.76
    assert stage.context.session.is_tentative(1) is False
    assert len([f for f in frames if isinstance(f, UserTurnFrame)]) == 1  # sent once


def test_end_of_turn_options_are_validated() -> None:
    with pytest.raises(ValidationError, match="end_of_turn_after_ms .* shorter than "
                       "hangover_ms"):
        EnergyVAD.Options(end_of_turn="smart_turn", end_of_turn_after_ms=500, hangover_ms=500)
    with pytest.raises(ValidationError, match="end_of_turn"):
        EnergyVAD.Options(end_of_turn="magic")
    EnergyVAD.Options(end_of_turn_after_ms=900, hangover_ms=500)  # silence: not used


async def test_a_missing_model_fails_at_setup_with_the_install_hint() -> None:
    stage = EnergyVAD({**SMART, "end_of_turn_model": "pkg://no_such_package_here/m.onnx"},
                      StageContext(name="vad", session=Session(), resources=Resources()))
    with pytest.raises(AudioError, match="not available"):
        await stage.setup()


@needs_model
async def test_real_model_ends_a_finished_question_without_the_hangover() -> None:
    lead, tail = np.zeros(SR // 2, np.float32), np.zeros(3 * SR, np.float32)
    speech = espeak("Tell me about the weather in Paris.", sample_rate=SR)
    at, ends, _, stage = await decide(np.concatenate([lead, speech, tail]),
                                      end_of_turn_model=SMART_TURN_URI, **SMART)
    assert len(ends) == 1 and stage.eot_ends == 1
    assert at[0] - ends[0].pts < 0.5  # far sooner than the 2 s hangover


async def test_switched_on_live_without_a_model_falls_back_to_the_hangover_once() -> None:
    """end_of_turn switched on while running, with a model that cannot load: the hangover
    ends each turn, and the load is not retried at every pause."""
    stage = EnergyVAD({"hangover_ms": 2000, "end_of_turn_model": "pkg://no_such_pkg/m.onnx"},
                      StageContext(name="vad", session=Session(), resources=Resources()))
    await stage.setup()  # silence: nothing to load
    stage.options = stage.options.model_copy(update={"end_of_turn": "smart_turn"})
    x = speech_like([("silence", 0.5), ("speech", 0.6), ("silence", 0.5), ("speech", 0.6),
                     ("silence", 2.5)])
    at, n = [], 0
    for f in audio_frames(x, SR, 20.0, live=True):
        n += len(f.samples)
        async for o in stage.process(f):
            if isinstance(o, SpeechEndFrame):
                at.append(n / SR)
    assert len(at) == 1 and 4.19 <= at[0] <= 4.26  # 2 s after the second stretch of speech
    assert stage._eot_unloadable is not None and "not available" in stage._eot_unloadable
    assert stage.eot_calls == 0


async def test_cancelled_while_the_model_runs_the_vad_stays_usable() -> None:
    """A pipeline cancelled during the model's call (barge-in, disconnect) returns within
    the call's time, and the stage still ends turns afterwards."""
    import time as _time

    import anyio

    class Slow(Scripted):
        def probability(self, audio, rate: int) -> float:
            _time.sleep(1.0)
            return super().probability(audio, rate)

    model = Slow(0.1)  # "not done": only the hangover can end the turn afterwards
    res = Resources()
    res.get(("smart_turn", "scripted://slow"), lambda: model)
    stage = EnergyVAD({**SMART, "end_of_turn_model": "scripted://slow"},
                      StageContext(name="vad", session=Session(), resources=res))
    await stage.setup()
    frames = audio_frames(speech_like(ONE_TURN), SR, 20.0, live=True)
    t0 = _time.perf_counter()
    with anyio.move_on_after(0.5) as scope:  # the model is asked at 1.7 s of audio
        for f in frames[:100]:
            async for _ in stage.process(f):
                pass
    assert scope.cancelled_caught  # cancelled inside the model's call
    assert _time.perf_counter() - t0 < 2.0  # waited for the call (1 s) at most, no hang
    assert len(model.calls) == 1
    ended = [o for f in frames[100:] async for o in stage.process(f)
             if isinstance(o, SpeechEndFrame)]
    assert len(ended) == 1 and abs(ended[0].pts - 1.5) < 0.03  # the hangover still ends it

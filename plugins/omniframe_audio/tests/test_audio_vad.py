"""VADs: turn logic on speech-like signals (energy, webrtc) and on real speech (espeak-ng:
energy, webrtc, silero), options, rates and errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
from omniframe_audio.vad import EnergyVAD, SileroVAD, WebRTCVAD, turn_bounds
from pydantic import ValidationError

from omniframe.frames import (
    AudioFrame,
    InterruptFrame,
    SpeechEndFrame,
    SpeechStartFrame,
    UserTurnFrame,
)
from omniframe.pipeline import StageError
from omniframe.testing import audio_frames, make_stage, run_frames, speech_like

pytestmark = pytest.mark.anyio

SR = 16000
TWO_TURNS = [("silence", 0.5), ("speech", 1.0), ("silence", 1.0), ("speech", 0.8),
             ("silence", 1.0)]


async def run_vad(stage, samples, rate: int = SR, frame_ms: float = 20.0, frames=None,
                  live: bool = True):
    result = await run_frames([stage], frames or audio_frames(samples, rate, frame_ms, live),
                              timeout=30)
    return result.frames


def of(frames, cls):
    return [f for f in frames if isinstance(f, cls)]


# --------------------------------------------------------------- turn logic (energy)


@pytest.mark.parametrize(("cls", "tol"), [(EnergyVAD, 0.03), (WebRTCVAD, 0.2)])
async def test_speech_silence_speech_gives_two_turns(cls, tol: float) -> None:
    frames = await run_vad(make_stage(cls), speech_like(TWO_TURNS))
    bounds = turn_bounds(frames)
    assert [b[0] for b in bounds] == [1, 2]
    expected = [(0.5, 1.5), (2.5, 3.3)]
    for (_, start, end), (want_start, want_end) in zip(bounds, expected, strict=True):
        assert abs(start - want_start) <= tol and abs(end - want_end) <= tol
    starts, ends, turns = of(frames, SpeechStartFrame), of(frames, SpeechEndFrame), \
        of(frames, UserTurnFrame)
    assert [f.turn for f in starts] == [f.turn for f in ends] == [f.turn for f in turns] == [1, 2]
    # barge-in: each turn that opens interrupts whatever is in flight downstream
    assert sorted(f.turn for f in of(frames, InterruptFrame)) == [1, 2]


async def test_turn_audio_has_pre_and_post_roll() -> None:
    x = speech_like(TWO_TURNS)
    vad = make_stage(EnergyVAD, pre_roll_ms=200, post_roll_ms=100, hangover_ms=400)
    turns = of(await run_vad(vad, x), UserTurnFrame)
    t1 = turns[0]
    assert t1.sample_rate == SR
    assert abs(t1.start_pts - 0.3) < 1e-6 and abs(t1.end_pts - 1.6) < 1e-6
    # the samples are exactly the input between start_pts and end_pts
    assert np.array_equal(t1.samples, x[round(t1.start_pts * SR):round(t1.end_pts * SR)])
    assert abs(t1.duration - 1.3) < 1e-6


async def test_hangover_bridges_short_pauses() -> None:
    x = speech_like([("silence", 0.3), ("speech", 0.6), ("silence", 0.3), ("speech", 0.6),
                     ("silence", 1.0)])
    long = turn_bounds(await run_vad(make_stage(EnergyVAD, hangover_ms=500), x))
    assert len(long) == 1 and abs(long[0][2] - 1.8) < 0.03
    short = turn_bounds(await run_vad(make_stage(EnergyVAD, hangover_ms=200), x))
    assert len(short) == 2


async def test_end_is_decided_only_after_the_hangover() -> None:
    """With forward_audio, the frames show when each decision was made in the stream."""
    vad = make_stage(EnergyVAD, hangover_ms=300, forward_audio=True, min_speech_ms=100)
    frames = await run_vad(vad, speech_like(TWO_TURNS))
    data = [f for f in frames if not isinstance(f, InterruptFrame)]
    seen = 0.0  # stream time the VAD had received when it emitted each event
    for f in data:
        if isinstance(f, AudioFrame):
            seen = f.pts + f.duration
        elif isinstance(f, SpeechEndFrame):
            assert seen >= f.pts + 0.3 - 1e-6 and seen <= f.pts + 0.3 + 0.021
        elif isinstance(f, SpeechStartFrame):
            assert f.pts + 0.1 - 1e-6 <= seen <= f.pts + 0.1 + 0.021
    audio = of(frames, AudioFrame)
    assert len(audio) == len(audio_frames(speech_like(TWO_TURNS)))
    # forwarded audio inside a turn carries the turn number
    assert {f.turn for f in audio if 0.7 < f.pts < 1.4} == {1}


async def test_speech_end_ts_is_when_the_user_stopped() -> None:
    """The input frames were captured 10 s ago: ``speech_end_ts`` is their time, not the
    VAD's. (Stamped relative to now, not at a fixed 1000 s: that failed when the monotonic
    clock was younger, on a freshly booted machine.)"""
    x = speech_like(TWO_TURNS)
    t0 = time.monotonic() - 10.0  # may be negative on a fresh boot: still a valid origin
    frames = [AudioFrame(samples=f.samples, sample_rate=SR, pts=f.pts, ts=t0 + f.pts)
              for f in audio_frames(x)]
    out = await run_vad(make_stage(EnergyVAD), None, frames=frames)
    end = of(out, SpeechEndFrame)[0]
    turn = of(out, UserTurnFrame)[0]
    # the last voiced frame is the one ending at 1.5 s: it started at 1.48 s
    assert end.speech_end_ts == pytest.approx(t0 + 1.48)
    assert turn.speech_end_ts == end.speech_end_ts
    assert end.ts > end.speech_end_ts  # decided later (real clock vs the captured one)


@pytest.mark.parametrize("t0", [0.0, 1e-6, -3.0, 5.0, 1e7, None])
async def test_speech_end_ts_for_any_clock_origin(t0: float | None) -> None:
    """Timestamps from a clock that starts at 0 (a replay, a fresh boot), or all 0.0
    (``None``): a ts of 0.0 is a time like any other, never "unset"."""
    x = speech_like(TWO_TURNS)
    frames = [AudioFrame(samples=f.samples, sample_rate=SR, pts=f.pts,
                         ts=0.0 if t0 is None else t0 + f.pts)
              for f in audio_frames(x)]
    out = await run_vad(make_stage(EnergyVAD), None, frames=frames)
    ends = [f.speech_end_ts for f in of(out, SpeechEndFrame)]
    want = [0.0, 0.0] if t0 is None else [t0 + 1.48, t0 + 3.28]
    assert ends == pytest.approx(want, abs=1e-6)
    assert [f.speech_end_ts for f in of(out, UserTurnFrame)] == ends


async def test_short_blips_do_not_open_a_turn() -> None:
    x = speech_like([("silence", 0.3), ("speech", 0.06), ("silence", 0.5)])
    assert turn_bounds(await run_vad(make_stage(EnergyVAD, min_speech_ms=100), x)) == []
    assert len(turn_bounds(await run_vad(make_stage(EnergyVAD, min_speech_ms=40), x))) == 1


async def test_long_turns_are_split_and_the_stream_end_closes_a_turn() -> None:
    x = speech_like([("silence", 0.2), ("speech", 2.5)])  # no silence at the end
    vad = make_stage(EnergyVAD, max_turn_s=1.0)
    frames = await run_vad(vad, x)
    turns = of(frames, UserTurnFrame)
    assert [t.turn for t in turns] == [1, 2, 3]
    assert [round(t.end_pts - t.start_pts, 2) for t in turns[1:]] == [1.0, 0.5]
    for a, b in zip(turns, turns[1:], strict=False):  # contiguous, no audio twice
        assert a.end_pts == pytest.approx(b.start_pts)
    assert turns[-1].end_pts == pytest.approx(2.7)
    assert sum(len(t.samples) for t in turns) == round((2.7 - turns[0].start_pts) * SR)


async def test_offline_input_does_not_barge_in() -> None:
    """Audio faster than real time: a later turn must not cut an earlier answer."""
    frames = await run_vad(make_stage(EnergyVAD), speech_like(TWO_TURNS), live=False)
    assert not of(frames, InterruptFrame) and len(of(frames, UserTurnFrame)) == 2
    frames = await run_vad(make_stage(EnergyVAD, interrupt=True), speech_like(TWO_TURNS),
                           live=False)
    assert len(of(frames, InterruptFrame)) == 2


async def test_interrupt_can_be_turned_off() -> None:
    frames = await run_vad(make_stage(EnergyVAD, interrupt=False), speech_like(TWO_TURNS))
    assert not of(frames, InterruptFrame) and len(of(frames, UserTurnFrame)) == 2
    assert not of(frames, AudioFrame)  # audio is not forwarded by default


async def test_adaptive_noise_floor_ignores_steady_noise() -> None:
    rng = np.random.default_rng(0)
    x = speech_like([("silence", 1.0), ("speech", 0.8), ("silence", 1.0), ("speech", 0.8),
                     ("silence", 1.0)])
    noisy = (x + 0.02 * rng.standard_normal(len(x))).astype(np.float32)  # about -34 dBFS
    plain = turn_bounds(await run_vad(make_stage(EnergyVAD), noisy))
    assert len(plain) == 1 and plain[0][1] < 0.1  # the noise itself is "speech"
    adaptive = turn_bounds(await run_vad(make_stage(EnergyVAD, adaptive=True), noisy))
    assert [round(s, 1) for _, s, _ in adaptive] == [1.0, 2.8]


async def test_frame_size_does_not_matter() -> None:
    x = speech_like(TWO_TURNS)
    ref = turn_bounds(await run_vad(make_stage(EnergyVAD), x, frame_ms=20))
    for frame_ms in (7, 64, 250):
        got = turn_bounds(await run_vad(make_stage(EnergyVAD), x, frame_ms=frame_ms))
        assert got == pytest.approx(ref)


# ------------------------------------------------------------------------ rates


async def test_webrtc_resamples_unsupported_rates() -> None:
    x = speech_like(TWO_TURNS, sample_rate=22050)
    frames = await run_vad(make_stage(WebRTCVAD), x, rate=22050)
    bounds = turn_bounds(frames)
    assert len(bounds) == 2 and abs(bounds[1][1] - 2.5) < 0.2
    turn = of(frames, UserTurnFrame)[0]
    assert turn.sample_rate == 22050  # the turn keeps the input's rate
    with pytest.raises(ValidationError, match="8000, 16000, 32000 or 48000"):
        make_stage(WebRTCVAD, sample_rate=22050)


@pytest.mark.parametrize("cls", [WebRTCVAD, SileroVAD])
async def test_impossible_rates_are_clear_errors(cls) -> None:
    x = speech_like([("speech", 0.3)], sample_rate=4000)
    with pytest.raises(StageError, match=r"needs audio sampled at 8000 Hz or more, got 4000"):
        await run_vad(make_stage(cls), x, rate=4000)


async def test_rate_change_mid_stream_is_an_error() -> None:
    frames = audio_frames(speech_like([("speech", 0.2)]), SR) + \
        audio_frames(speech_like([("speech", 0.2)], sample_rate=8000), 8000)
    with pytest.raises(StageError, match="sample rate changed from 16000 to 8000"):
        await run_vad(make_stage(EnergyVAD), None, frames=frames)


def test_options_are_validated_with_clear_messages() -> None:
    with pytest.raises(ValidationError, match="less than or equal to 0"):
        make_stage(EnergyVAD, threshold=10)
    with pytest.raises(ValidationError, match="10, 20 or 30"):
        make_stage(WebRTCVAD, frame_ms=25)
    with pytest.raises(ValidationError, match="less than or equal to 3"):
        make_stage(WebRTCVAD, aggressiveness=5)
    with pytest.raises(ValidationError, match="neg_threshold .* must not exceed threshold"):
        make_stage(SileroVAD, threshold=0.4, neg_threshold=0.6)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        make_stage(EnergyVAD, hangover=300)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        make_stage(SileroVAD, hangover_ms=-1)


# -------------------------------------------------------------------- real speech


@pytest.mark.parametrize(("cls", "options"), [
    (EnergyVAD, {}),
    (WebRTCVAD, {"aggressiveness": 3}),
    (SileroVAD, {}),
])
async def test_real_speech_two_sentences(dialogue, cls, options) -> None:
    frames = await run_vad(make_stage(cls, **options), dialogue.samples)
    bounds = turn_bounds(frames)
    assert [b[0] for b in bounds] == [1, 2], bounds
    for (_, start, end), (first, last) in zip(bounds, dialogue.spans, strict=True):
        assert abs(start - first) < 0.15, (start, first)
        assert abs(end - last) < 0.25, (end, last)
    assert sorted(f.turn for f in of(frames, InterruptFrame)) == [1, 2]


async def test_silero_resamples_44k_input(dialogue) -> None:
    from omniframe.audio import resample

    x = resample(dialogue.samples, SR, 44100)
    frames = await run_vad(make_stage(SileroVAD), x, rate=44100)
    bounds = turn_bounds(frames)
    assert len(bounds) == 2
    assert abs(bounds[1][1] - dialogue.spans[1][0]) < 0.15
    assert of(frames, UserTurnFrame)[0].sample_rate == 44100


async def test_silero_model_shared_but_state_per_stage(dialogue) -> None:
    from omniframe.resources import Resources
    from omniframe.session import Session
    from omniframe.stage import StageContext

    res = Resources()
    a = SileroVAD({}, StageContext(name="a", session=Session(), resources=res))
    b = SileroVAD({}, StageContext(name="b", session=Session(), resources=res))
    await a.setup()
    await b.setup()
    assert a._session is b._session and ("silero_vad", "onnx") in res
    chunk = np.ascontiguousarray(dialogue.samples[8000:8000 + 512 * 4].reshape(4, 512))
    first = a.score(chunk)
    assert b.score(chunk) == first  # b's state is untouched by a's
    assert a.score(chunk) != first  # a carries its own state forward


async def test_silero_torchscript_agrees_with_onnx(dialogue) -> None:
    import torch

    before = torch.get_num_threads()
    jit, onnx = make_stage(SileroVAD, onnx=False), make_stage(SileroVAD)
    await jit.setup()
    await onnx.setup()
    assert torch.get_num_threads() == before  # importing silero_vad sets it to 1; restored
    chunks = np.ascontiguousarray(dialogue.samples[8000:8000 + 512 * 12].reshape(12, 512))
    a, b = jit.score(chunks), onnx.score(chunks)
    assert max(a) > 0.5 and np.allclose(a, b, atol=0.05)


async def test_realtime_source_vad_wait_is_the_hangover(tmp_path) -> None:
    """Live-like input: the VAD decides ``hangover_ms`` after the user stopped."""
    import anyio
    import soundfile as sf
    from omniframe_audio.sources import FileSource

    from omniframe.pipeline import Pipeline

    path = tmp_path / "q.wav"
    sf.write(str(path), speech_like([("silence", 0.2), ("speech", 0.4)]), SR)
    src = make_stage(FileSource, path=path, realtime=True, tail_silence_s=0.5)
    vad = make_stage(EnergyVAD, hangover_ms=300)
    with anyio.fail_after(10):
        result = await Pipeline([src, vad]).run()
    (turn,) = result.turns
    assert turn.speech_start_pts == pytest.approx(0.2) and turn.speech_end_pts == pytest.approx(0.6)
    assert 0.28 <= turn.vad_wait_s < 0.4
    assert turn.user_audio_s == pytest.approx(0.2 + 0.4 + 0.1)  # pre-roll: all there is

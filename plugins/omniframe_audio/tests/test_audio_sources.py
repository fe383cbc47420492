"""Sources: file (single, list, silences, pacing, errors), synth, mic (errors only here)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
import soundfile as sf
from hypothesis import given
from hypothesis import strategies as st
from omniframe_audio.devices import AudioDeviceError, pick_device
from omniframe_audio.sources import FileSource, MicSource, SynthSource
from pydantic import ValidationError

from omniframe.audio import AudioError
from omniframe.frames import AudioFrame
from omniframe.pipeline import Pipeline, StageError
from omniframe.testing import make_stage, speech_like, tone

pytestmark = pytest.mark.anyio


async def frames_of(stage, timeout: float = 20.0) -> list[AudioFrame]:
    with anyio.fail_after(timeout):
        result = await Pipeline([stage]).run()
    return [f for f in result.frames if isinstance(f, AudioFrame)]


def concat(frames: list[AudioFrame]) -> np.ndarray:
    return np.concatenate([f.samples for f in frames])


def write(path: Path, samples: np.ndarray, rate: int, subtype: str = "FLOAT") -> Path:
    sf.write(str(path), samples, rate, subtype=subtype)
    return path


# ------------------------------------------------------------------------- file source


@given(
    n=st.integers(1, 4000),
    rate=st.integers(8000, 48000),
    frame_ms=st.floats(0.5, 120.0),
)
def test_file_chunking_concatenates_back_exactly(n: int, rate: int, frame_ms: float) -> None:
    x = np.random.default_rng(n).uniform(-0.9, 0.9, n).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "x.wav", x, rate)
        src = make_stage(FileSource, path=str(path), sample_rate=None, frame_ms=frame_ms,
                         tail_silence_s=0.0)
        frames = anyio.run(frames_of, src)
    size = int(round(rate * frame_ms / 1000))
    assert np.array_equal(concat(frames), x)
    assert all(f.sample_rate == rate and f.samples.dtype == np.float32 for f in frames)
    assert all(len(f.samples) == size for f in frames[:-1])
    assert 1 <= len(frames[-1].samples) <= size
    pts = [f.pts for f in frames]
    assert pts[0] == 0.0 and all(b > a for a, b in zip(pts, pts[1:], strict=False))
    expected = np.cumsum([0] + [len(f.samples) for f in frames[:-1]]) / rate
    assert np.allclose(pts, expected)


async def test_file_resamples_and_downmixes(tmp_path: Path) -> None:
    left = tone(0.5, 300, 44100)
    right = tone(0.5, 500, 44100, amplitude=0.1)
    path = write(tmp_path / "stereo.flac", np.stack([left, right], axis=1), 44100, "PCM_24")
    frames = await frames_of(make_stage(FileSource, path=path, tail_silence_s=0.0))
    out = concat(frames)
    assert all(f.sample_rate == 16000 for f in frames)
    assert len(out) == round(len(left) * 16000 / 44100)
    from omniframe.audio import resample

    ref = resample((left + right) / 2, 44100, 16000)
    assert np.abs(out - ref).max() < 1e-3


async def test_many_channels_are_downmixed(tmp_path: Path) -> None:
    x = np.tile(np.linspace(-0.5, 0.5, 1600, dtype=np.float32)[:, None], (1, 6))
    x[:, 5] = 0.0
    path = write(tmp_path / "six.wav", x, 16000)
    out = concat(await frames_of(make_stage(FileSource, path=path, tail_silence_s=0)))
    assert np.allclose(out, x.mean(axis=1), atol=1e-6)


async def test_file_list_with_gaps_and_silences(tmp_path: Path) -> None:
    a = write(tmp_path / "a.wav", tone(0.25, 200, 16000), 16000)
    b = write(tmp_path / "b.wav", tone(0.5, 200, 8000), 8000)  # resampled to 16 kHz
    src = make_stage(FileSource, path=[str(a), str(b)], gap_s=0.3, start_silence_s=0.1,
                     tail_silence_s=0.2, frame_ms=10)
    out = concat(await frames_of(src))
    sizes = [1600, 4000, 4800, 8000, 3200]  # start, a, gap, b, tail
    assert len(out) == sum(sizes)
    edges = np.cumsum([0, *sizes])
    for i in (0, 2, 4):  # the silences are exact zeros
        assert not out[edges[i]:edges[i + 1]].any()
    assert np.abs(out[edges[1]:edges[2]]).max() > 0.25
    assert np.abs(out[edges[3]:edges[4]]).max() > 0.25


async def test_realtime_paces_at_speech_speed(tmp_path: Path) -> None:
    path = write(tmp_path / "x.wav", tone(0.3, 200, 16000), 16000)
    src = make_stage(FileSource, path=path, realtime=True, tail_silence_s=0.0)
    t0 = time.monotonic()
    frames = await frames_of(src)
    wall = time.monotonic() - t0
    assert 0.28 <= wall < 1.5
    # each frame arrives when its last sample would have been spoken, without drift
    lag = [(f.ts - frames[0].ts) - (f.pts - frames[0].pts) for f in frames]
    assert max(abs(v) for v in lag) < 0.15
    assert abs(lag[-1]) < 0.08


async def test_missing_empty_corrupt_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(200)))
    zero = write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    cases = [
        (tmp_path / "missing.wav", "does not exist"),
        (empty, "is empty"),
        (corrupt, "cannot decode"),
        (zero, "no samples"),
        (tmp_path, "is a folder"),
    ]
    for path, message in cases:
        with pytest.raises(StageError, match=message) as err:
            await frames_of(make_stage(FileSource, path=path))
        assert err.value.phase == "setup" and str(path) in str(err.value)
        assert isinstance(err.value.cause, AudioError)
    # a bad file anywhere in a list fails before anything plays
    good = write(tmp_path / "good.wav", tone(0.1), 16000)
    with pytest.raises(StageError, match="missing.wav"):
        await frames_of(make_stage(FileSource, path=[good, tmp_path / "missing.wav"]))


async def test_no_path_and_bad_options() -> None:
    with pytest.raises(StageError, match=r"set options.path .* or pass --input"):
        await frames_of(make_stage(FileSource))
    with pytest.raises(ValidationError, match="empty list"):
        make_stage(FileSource, path=[])
    with pytest.raises(ValidationError, match="shorter than one sample"):
        make_stage(FileSource, path="x.wav", sample_rate=8000, frame_ms=0.05)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        make_stage(FileSource, path="x.wav", frame_size=20)
    with pytest.raises(ValidationError, match="greater than 0"):
        make_stage(FileSource, path="x.wav", frame_ms=0)


# ------------------------------------------------------------------------ synth source


async def test_synth_source_is_the_speech_like_signal() -> None:
    pattern = [("silence", 0.2), ("speech", 0.5), ("silence", 0.3)]
    frames = await frames_of(make_stage(SynthSource, pattern=pattern, seed=3, frame_ms=30))
    assert np.array_equal(concat(frames), speech_like(pattern, seed=3))
    assert len(frames[0].samples) == 480
    with pytest.raises(ValidationError, match="'speech' or 'silence'"):
        make_stage(SynthSource, pattern=[("noise", 1.0)])
    with pytest.raises(ValidationError, match="greater than 0"):
        make_stage(SynthSource, pattern=[("speech", -1.0)])


async def test_synth_realtime() -> None:
    t0 = time.monotonic()
    await frames_of(make_stage(SynthSource, pattern=[("speech", 0.2)], realtime=True))
    assert time.monotonic() - t0 >= 0.19


# -------------------------------------------------------------------------- microphone


async def test_mic_without_device_or_portaudio_says_what_to_do() -> None:
    """Without a sound card (CI) the error must say what is missing and what to do."""
    try:
        frames = await frames_of(make_stage(MicSource, max_seconds=0.1), timeout=10)
    except StageError as err:
        cause = err.cause
    else:  # a machine with a working microphone: it recorded
        assert sum(f.duration for f in frames) == pytest.approx(0.1, abs=0.021)
        return
    assert isinstance(cause, AudioDeviceError), cause
    msg = str(cause)
    assert ("PortAudio" in msg and "libportaudio2" in msg) or "no audio input device" in msg \
        or "sounddevice" in msg
    assert "plugin: file" in msg or "options.path" in msg


def test_pick_device() -> None:
    devices = [
        {"name": "HDMI out", "max_input_channels": 0, "max_output_channels": 2},
        {"name": "USB Microphone", "max_input_channels": 1, "max_output_channels": 0},
        {"name": "Headset", "max_input_channels": 1, "max_output_channels": 2},
    ]
    assert pick_device(devices, None, "input", default=2) == 2
    assert pick_device(devices, None, "input", default=0) == 1  # default has no input
    assert pick_device(devices, "usb", "input") == 1
    assert pick_device(devices, 2, "output") == 2
    with pytest.raises(AudioDeviceError, match=r"device 0 is not an input device.*1: USB"):
        pick_device(devices, 0, "input")
    with pytest.raises(AudioDeviceError, match="no input device name contains 'webcam'"):
        pick_device(devices, "webcam", "input")
    with pytest.raises(AudioDeviceError, match="no audio input device found.*plugin: file"):
        pick_device([devices[0]], None, "input")
    with pytest.raises(AudioDeviceError, match="no audio output device found"):
        pick_device([], None, "output")

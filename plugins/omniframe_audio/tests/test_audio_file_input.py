"""The file source against hostile and large inputs: block-wise reading equals the whole-file
path, memory stays bounded, NaN/Inf is refused once at setup, broken headers say so."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import anyio
import numpy as np
import pytest
import soundfile as sf
from omniframe_audio.sources import FileSource, open_input, read_blocks

from omniframe.audio import AudioError, read_audio
from omniframe.frames import AudioFrame
from omniframe.pipeline import Pipeline, StageError
from omniframe.testing import make_stage, tone

pytestmark = pytest.mark.anyio


async def play(path: Path | list[Path], **options: object) -> np.ndarray:
    src = make_stage(FileSource, path=path, tail_silence_s=0.0, **options)
    with anyio.fail_after(60):
        result = await Pipeline([src]).run()
    frames = [f for f in result.frames if isinstance(f, AudioFrame)]
    return np.concatenate([f.samples for f in frames])


def noise(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, (int(seconds * rate), channels)).astype(np.float32)


# --------------------------------------------------------------------- blocks and memory


@pytest.mark.parametrize(("rate", "out"), [(44100, 16000), (8000, 16000), (16000, 16000)])
def test_block_reading_equals_the_whole_file_path(tmp_path: Path, rate: int, out: int) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, noise(40.0, rate, 2), rate, subtype="PCM_16")
    blocks = list(read_blocks(open_input(path), out, block_s=0.37))  # many block edges
    assert len(blocks) > 50
    streamed = np.concatenate(blocks)
    whole, _ = read_audio(path, out)
    assert len(streamed) == len(whole)
    assert np.abs(streamed - whole).max() < 1e-5


async def test_the_source_plays_the_same_samples_as_the_whole_file_path(tmp_path: Path) -> None:
    path = tmp_path / "x.flac"
    sf.write(path, noise(7.3, 44100, 2, seed=1), 44100, subtype="PCM_24")
    played = await play(path, frame_ms=30)
    whole, _ = read_audio(path, 16000)
    assert len(played) == len(whole) and np.abs(played - whole).max() < 1e-5


def test_memory_stays_bounded_for_a_ten_minute_stereo_file(tmp_path: Path) -> None:
    rate, seconds = 44100, 600
    path = tmp_path / "ten_minutes.wav"
    with sf.SoundFile(path, "w", rate, 2, subtype="PCM_16") as f:
        block = noise(10.0, rate, 2)
        for _ in range(seconds // 10):
            f.write(block)
    decoded = seconds * rate * 2 * 4  # what sf.read(dtype=float32) would hold: 212 MB
    import scipy.signal  # noqa: F401 - its first import allocates ~35 MB of module objects

    tracemalloc.start()
    try:
        n = 0
        for b in read_blocks(open_input(path), 16000):
            n += len(b)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == seconds * 16000
    assert peak < decoded / 20, f"peak {peak / 1e6:.1f} MB"


# --------------------------------------------------------------------- NaN and Inf: one rule


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (np.inf, "infinite"),
                                             (-np.inf, "infinite")])
async def test_non_finite_samples_are_refused_at_setup_naming_file_and_time(
        tmp_path: Path, value: float, word: str) -> None:
    x = tone(3.0, 200, 16000)
    x[int(2.5 * 16000) + 7] = value
    path = tmp_path / "bad.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(StageError, match=rf"bad.wav' has {word} samples, the first at 2.500 s "
                                         rf"\(sample 40007\).*re-export") as err:
        await play(path)
    assert err.value.phase == "setup"  # before any later stage loads a model
    assert isinstance(err.value.cause, AudioError)


async def test_a_bad_file_later_in_a_list_fails_before_anything_plays(tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    sf.write(good, tone(0.5, 200, 16000), 16000)
    bad = tmp_path / "bad.wav"  # float encodings are the ones that can hold NaN
    x = tone(0.5, 200, 16000)
    x[0] = np.nan
    sf.write(bad, x, 16000, subtype="DOUBLE")
    with pytest.raises(StageError, match=r"bad.wav' has NaN samples, the first at 0.000 s"):
        await play([good, bad])


# --------------------------------------------------------------------- hostile files


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
async def test_every_wav_encoding_plays(tmp_path: Path, subtype: str) -> None:
    x = tone(0.5, 300, 16000, amplitude=0.5)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, x, 16000, subtype=subtype)
    out = await play(path)
    assert len(out) == len(x)
    assert np.abs(out - x).max() < (0.01 if subtype == "PCM_U8" else 1e-4)


async def test_six_channels_and_odd_rates_play(tmp_path: Path) -> None:
    x = noise(1.0, 11025, 6)
    path = tmp_path / "six.wav"
    sf.write(path, x, 11025, subtype="FLOAT")
    out = await play(path)
    assert len(out) == 16000
    assert np.isfinite(out).all()


def _wav_with_rate(path: Path, rate: int) -> Path:
    sf.write(path, tone(0.2, 200, 16000), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", (rate * 2) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("rate", [1, 999, 2_000_000])
def test_a_header_with_an_impossible_sample_rate_is_refused(tmp_path: Path, rate: int) -> None:
    path = _wav_with_rate(tmp_path / "odd.wav", rate)
    with pytest.raises(AudioError, match=rf"odd.wav' says its sample rate is {rate} Hz, which "
                                         rf"no recording has.*header is broken"):
        open_input(path)


def test_a_sample_rate_header_beyond_32_bits_signed_is_refused(tmp_path: Path) -> None:
    path = _wav_with_rate(tmp_path / "huge.wav", 0xFFFFFFFF)
    with pytest.raises(AudioError, match="huge.wav"):
        open_input(path)


@pytest.mark.parametrize(("name", "content"), [
    ("header.wav", b"RIFF\x24\x00\x00\x00WAVEfmt "),  # cut inside the header
    ("notes.wav", b"these are my notes, not a recording\n" * 20),
    ("image.wav", b"\x89PNG\r\n\x1a\n" + bytes(300)),
])
def test_files_that_are_not_audio_say_so(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AudioError, match=rf"cannot decode '.*{name}'.*Supported: wav, flac"):
        open_input(path)


async def test_a_wav_cut_short_plays_what_it_has(tmp_path: Path) -> None:
    path = tmp_path / "cut.wav"
    x = tone(1.0, 200, 16000)
    sf.write(path, x, 16000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: 44 + 2 * 8000])  # the header still says 16000 samples
    out = await play(path)
    assert 0 < len(out) <= 16000
    assert np.abs(out[:8000] - x[:8000]).max() < 1e-3


def test_zero_samples_and_an_empty_file(tmp_path: Path) -> None:
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="zero.wav' has no samples"):
        open_input(zero)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty.wav' is empty \(0 bytes\)"):
        open_input(empty)


async def test_a_microphone_delivering_nan_is_refused_by_the_same_rule(monkeypatch) -> None:
    import threading
    import types

    from omniframe_audio import sources

    class Stream:
        def __init__(self, callback, blocksize, **kwargs) -> None:
            self.callback, self.n = callback, blocksize

        def __enter__(self) -> Stream:
            def feed() -> None:
                for i in range(5):
                    x = np.full((self.n, 1), 0.1, np.float32)
                    if i == 3:
                        x[7, 0] = np.nan
                    self.callback(x, self.n, None, None)
            threading.Thread(target=feed, daemon=True).start()
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    sd = types.SimpleNamespace(
        query_devices=lambda: [{"name": "fake mic", "max_input_channels": 1,
                                "max_output_channels": 0, "default_samplerate": 16000}],
        default=types.SimpleNamespace(device=(0, 0)),
        check_input_settings=lambda **kw: None, InputStream=Stream)
    monkeypatch.setattr(sources, "import_sounddevice", lambda purpose: sd)
    src = make_stage(sources.MicSource, max_seconds=1.0)
    with pytest.raises(StageError, match=r"input device 0 delivered NaN or infinite samples at "
                                         r"0.060 s.*options.device"):
        with anyio.fail_after(20):
            await Pipeline([src]).run()


def test_a_pipe_or_device_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    with pytest.raises(AudioError, match="pipe.wav' is not a regular file"):
        open_input(fifo)
    with pytest.raises(AudioError, match="'/dev/zero' is not a regular file"):
        open_input("/dev/zero")


async def test_an_hour_of_added_silence_comes_in_blocks(tmp_path: Path) -> None:
    from omniframe_audio.sources import BLOCK_S

    path = tmp_path / "x.wav"
    sf.write(path, tone(0.5, 200, 16000), 16000)
    src = make_stage(FileSource, path=path, start_silence_s=3600, tail_silence_s=3600)
    await src.setup()
    total = biggest = 0
    for piece in src.pieces():
        total += len(piece)
        biggest = max(biggest, len(piece))
    assert total == (7200 + 0.5) * 16000
    assert biggest <= BLOCK_S * 16000


def test_a_file_with_hundreds_of_channels_is_read_in_small_blocks(tmp_path: Path) -> None:
    from omniframe_audio import sources

    path = tmp_path / "many.wav"
    sf.write(path, noise(0.5, 48000, 256), 48000, subtype="PCM_16")
    src = open_input(path)
    assert src.channels == 256
    assert sources._block_frames(src, 2.0) * 256 <= sources._BLOCK_SAMPLES
    out = np.concatenate(list(read_blocks(src, 16000)))
    whole, _ = read_audio(path, 16000)
    assert len(out) == len(whole) == 8000 and np.abs(out - whole).max() < 1e-5

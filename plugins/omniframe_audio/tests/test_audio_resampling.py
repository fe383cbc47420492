"""Streaming resampling and downmixing: properties over any rates 8-48 kHz."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omniframe_audio.resampling import StreamResampler

from omniframe.audio import AudioError, resample, to_mono

rates = st.integers(8000, 48000)


@given(src=rates, dst=rates, n=st.integers(0, 4000), seed=st.integers(0, 2**16),
       max_chunk=st.integers(40, 1000))
@settings(max_examples=25)
def test_stream_equals_whole_signal(src: int, dst: int, n: int, seed: int,
                                    max_chunk: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n).astype(np.float32)
    rs = StreamResampler(src, dst)
    out, i = [], 0
    while i < n:
        k = int(rng.integers(max(1, max_chunk // 4), max_chunk + 1))
        out.append(rs.push(x[i:i + k]))
        i += k
    out.append(rs.flush())
    y = np.concatenate(out)
    ref = resample(x, src, dst)
    assert len(y) == len(ref) == round(n * dst / src)
    assert y.dtype == np.float32
    assert np.allclose(y, ref, atol=1e-5)


@given(src=rates, dst=rates, n=st.integers(1, 5000))
@settings(max_examples=25)
def test_lengths(src: int, dst: int, n: int) -> None:
    x = np.zeros(n, np.float32)
    assert len(resample(x, src, dst)) == round(n * dst / src)


@given(src=rates, dst=rates, freq=st.floats(100.0, 1500.0))
@settings(max_examples=25)
def test_round_trip_keeps_speech_band(src: int, dst: int, freq: float) -> None:
    """src -> dst -> src keeps a tone below both Nyquist limits (away from the edges)."""
    t = np.arange(int(0.2 * src)) / src
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    rs1, rs2 = StreamResampler(src, dst), StreamResampler(dst, src)
    mid = np.concatenate([rs1.push(x[: len(x) // 3]), rs1.push(x[len(x) // 3:]), rs1.flush()])
    back = np.concatenate([rs2.push(mid), rs2.flush()])
    assert abs(len(back) - len(x)) <= max(src, dst) / min(src, dst) + 1  # two roundings
    m = len(x) // 5
    assert np.abs(back[m:-m] - x[m:len(back) - m]).max() < 0.02


@pytest.mark.parametrize(("src", "dst"), [(48000, 47999), (47999, 48000), (44100, 16000)])
def test_long_streams_in_small_pieces(src: int, dst: int) -> None:
    x = np.random.default_rng(1).uniform(-1, 1, 200_000).astype(np.float32)
    rs = StreamResampler(src, dst)
    y = np.concatenate([rs.push(x[i:i + 160]) for i in range(0, len(x), 160)] + [rs.flush()])
    ref = resample(x, src, dst)
    assert len(y) == len(ref) and np.allclose(y, ref, atol=1e-5)


def test_identity_and_latency() -> None:
    rs = StreamResampler(16000, 16000)
    x = np.arange(10, dtype=np.float32)
    assert np.array_equal(rs.push(x), x) and rs.latency == 0 and not len(rs.flush())
    rs = StreamResampler(48000, 16000)
    assert 0 < rs.latency < 0.002  # look-ahead below 2 ms
    with pytest.raises(AudioError, match="positive"):
        StreamResampler(0, 16000)
    with pytest.raises(AudioError, match="mono"):
        rs.push(np.zeros((4, 2), np.float32))


@given(n=st.integers(1, 500), channels=st.integers(1, 8), seed=st.integers(0, 1000))
def test_downmix_is_the_channel_mean(n: int, channels: int, seed: int) -> None:
    x = np.random.default_rng(seed).uniform(-1, 1, (n, channels)).astype(np.float32)
    y = to_mono(x)
    assert y.shape == (n,) and y.dtype == np.float32
    assert np.allclose(y, x.mean(axis=1), atol=1e-6)
    assert np.array_equal(to_mono(x[:, 0]), x[:, 0])

"""Audio helpers shared by stages: reading files with clear errors, downmixing, resampling.

numpy/scipy/soundfile are imported inside the functions, so importing this module is free.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

__all__ = ["AudioError", "read_audio", "resample", "to_mono", "validate_samples"]


class AudioError(ValueError):
    """Audio that cannot be used; the message says what is wrong and what to do."""


def to_mono(data: Any) -> Any:
    """(n,) or (n, channels) → (n,) float32, averaging channels."""
    import numpy as np

    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr.mean(axis=1)
    elif arr.ndim != 1:
        raise AudioError(f"audio must be (samples,) or (samples, channels), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def resample(samples: Any, src_rate: int, dst_rate: int) -> Any:
    """Resample mono float32 audio with a polyphase filter (scipy.signal.resample_poly).

    Output length is ``round(len * dst / src)``."""
    import numpy as np

    if src_rate <= 0 or dst_rate <= 0:
        raise AudioError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
    x = np.asarray(samples, dtype=np.float32)
    if src_rate == dst_rate or len(x) == 0:
        return x.copy()
    from scipy.signal import resample_poly

    ratio = Fraction(dst_rate, src_rate).limit_denominator(10_000)
    y = resample_poly(x, ratio.numerator, ratio.denominator).astype(np.float32)
    want = int(round(len(x) * dst_rate / src_rate))
    if len(y) > want:
        y = y[:want]
    elif len(y) < want:
        y = np.pad(y, (0, want - len(y)))
    return y


def validate_samples(samples: Any, sample_rate: int, what: str = "audio") -> None:
    """Raise :class:`AudioError` for empty, non-finite or wrongly shaped audio."""
    import numpy as np

    arr = np.asarray(samples)
    if arr.ndim != 1:
        raise AudioError(f"{what}: expected mono samples of shape (n,), got {arr.shape}")
    if arr.size == 0:
        raise AudioError(f"{what} is empty (0 samples)")
    if sample_rate <= 0:
        raise AudioError(f"{what}: sample rate must be positive, got {sample_rate}")
    if not np.isfinite(arr).all():
        raise AudioError(f"{what} contains NaN or infinite samples")


def read_audio(path: str | Path, sample_rate: int | None = None) -> tuple[Any, int]:
    """Read a wav/flac/ogg file as mono float32, resampled to ``sample_rate`` if given.

    Returns ``(samples, rate)``. Errors name the file and the problem: missing, empty,
    corrupt or an unsupported format."""
    import soundfile as sf

    p = Path(path)
    if not p.exists():
        raise AudioError(f"audio file {str(p)!r} does not exist")
    if p.is_dir():
        raise AudioError(f"{str(p)!r} is a folder, not an audio file")
    if p.stat().st_size == 0:
        raise AudioError(f"audio file {str(p)!r} is empty (0 bytes)")
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError
        raise AudioError(
            f"cannot decode {str(p)!r}: {str(exc).rstrip('. ')}. Supported: wav, flac, ogg "
            f"(libsndfile); "
            f"convert other formats with ffmpeg -i in.mp3 -ar 16000 out.wav"
        ) from None
    if data.shape[0] == 0:
        raise AudioError(f"audio file {str(p)!r} has no samples")
    mono = to_mono(data)
    if sample_rate is not None and rate != sample_rate:
        mono = resample(mono, rate, sample_rate)
        rate = sample_rate
    return mono, int(rate)

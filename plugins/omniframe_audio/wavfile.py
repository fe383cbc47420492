"""A WAV writer that leaves a valid file on disk after every write.

The header's two size fields are rewritten after each block of samples and the file is
flushed to the operating system, so a run that is killed (Ctrl-C twice, SIGKILL, a crash)
still leaves a WAV that any reader opens, holding everything written up to the last complete
block. Data is written before the header that counts it, so even a kill between the two
leaves a valid file (the header then counts one block less).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from omniframe.audio import AudioError

__all__ = ["WavWriter"]

_HEADER = 44
_MAX_DATA = 0xFFFFFFFF - 36  # the RIFF size field is 32-bit


def _header(sample_rate: int, channels: int, data_bytes: int) -> bytes:
    block = channels * 2
    return b"".join([
        b"RIFF", struct.pack("<I", 36 + data_bytes), b"WAVE",
        b"fmt ", struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block,
                             block, 16),
        b"data", struct.pack("<I", data_bytes),
    ])


class WavWriter:
    """16-bit PCM WAV, written incrementally (see the module docstring).

    Parameters:
        path: the file to write (its folder is created; an existing file is replaced).
        sample_rate: samples per second.
        channels: interleaved channels per frame (the stages use 1).
        fsync: also ask the disk to persist every write (survives power loss; slower).
    """

    def __init__(self, path: str | Path, sample_rate: int, channels: int = 1,
                 fsync: bool = False) -> None:
        if sample_rate <= 0:
            raise AudioError(f"WAV sample rate must be positive, got {sample_rate}")
        if channels < 1:
            raise AudioError(f"WAV needs at least one channel, got {channels}")
        self.path = Path(path)
        if self.path.is_dir():
            raise AudioError(f"cannot write WAV to {str(self.path)!r}: it is a folder; "
                             f"give a file name such as {str(self.path / 'out.wav')!r}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - kept open
        except OSError as exc:
            raise AudioError(f"cannot write WAV to {str(self.path)!r}: {exc.strerror or exc}. "
                             f"Choose a writable path.") from None
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.fsync = fsync
        self.frames = 0
        self._f.write(_header(self.sample_rate, self.channels, 0))
        self._sync()

    @property
    def duration(self) -> float:
        """Seconds written so far."""
        return self.frames / self.sample_rate

    def _file(self) -> BinaryIO:
        if self._f is None:
            raise AudioError(f"WAV writer for {str(self.path)!r} is closed")
        return self._f

    def _sync(self) -> None:
        f = self._file()
        f.flush()
        if self.fsync:
            import os

            os.fsync(f.fileno())

    def _patch(self) -> None:
        f = self._file()
        data = self.frames * self.channels * 2
        f.seek(4)
        f.write(struct.pack("<I", 36 + data))
        f.seek(40)
        f.write(struct.pack("<I", data))
        self._sync()

    def write(self, samples: Any) -> None:
        """Append float samples in -1..1 (clipped), shape (n,) or (n, channels)."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise AudioError(f"expected samples of shape (n,) or (n, {self.channels}), "
                             f"got {np.asarray(samples).shape}")
        if not len(x):
            return
        if (self.frames + len(x)) * self.channels * 2 > _MAX_DATA:
            raise AudioError(f"WAV file {str(self.path)!r} would exceed 4 GiB, the format's "
                             f"limit; write shorter runs or several files")
        pcm = np.round(np.clip(np.nan_to_num(x), -1.0, 1.0) * 32767.0).astype("<i2")
        f = self._file()
        f.seek(_HEADER + self.frames * self.channels * 2)
        f.write(pcm.tobytes())
        f.flush()  # data reaches the OS before the header counts it
        self.frames += len(x)
        self._patch()

    def truncate(self, frames: int) -> None:
        """Keep only the first ``frames`` frames (used when playback was cut short)."""
        frames = max(0, min(int(frames), self.frames))
        if frames == self.frames:
            return
        self.frames = frames
        self._patch()
        f = self._file()
        f.truncate(_HEADER + frames * self.channels * 2)
        self._sync()

    def close(self) -> None:
        """Finish the file (idempotent)."""
        if self._f is not None:
            try:
                self._patch()
            finally:
                self._f.close()
                self._f = None

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

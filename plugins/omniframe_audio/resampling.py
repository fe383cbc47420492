"""Streaming resampling: the same polyphase filter as :func:`omniframe.audio.resample`, fed
piece by piece.

Resampling every 20 ms chunk on its own would put a click at every chunk edge (each piece is
zero-padded at both ends) and lose or gain a sample now and then. :class:`StreamResampler`
keeps enough input history and waits for a few samples of look-ahead (the filter's half
length, below 1 ms for common rates) so that the concatenated output equals resampling the
whole signal at once, sample for sample.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any

import numpy as np

from omniframe.audio import AudioError

__all__ = ["StreamResampler"]

_EMPTY = np.zeros(0, dtype=np.float32)


@functools.lru_cache(maxsize=32)
def _lowpass(up: int, down: int) -> Any:
    """The anti-aliasing filter scipy.signal.resample_poly designs for ``up/down``."""
    from scipy.signal import firwin

    max_rate = max(up, down)
    h = firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    h = h.astype(np.float32)
    h.setflags(write=False)
    return h


class StreamResampler:
    """Resample a mono float32 stream from ``src_rate`` to ``dst_rate`` in pieces.

    ``push(x)`` returns the output samples that are final so far; ``flush()`` returns the rest
    at the end of the stream. Over a whole stream the total output length is
    ``round(n_in * dst_rate / src_rate)``, exactly as :func:`omniframe.audio.resample` gives,
    and the samples agree with it.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise AudioError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
        self.src_rate = int(src_rate)
        self.dst_rate = int(dst_rate)
        ratio = Fraction(self.dst_rate, self.src_rate).limit_denominator(10_000)
        self.up, self.down = ratio.numerator, ratio.denominator
        # Rates this close (48000 -> 47999) resample as a copy, cut or padded at the end,
        # exactly as omniframe.audio.resample does.
        self.identity = self.up == self.down
        half_len = 10 * max(self.up, self.down)  # what scipy.signal.resample_poly designs
        # Input samples on each side of an output sample that the filter reaches.
        self.margin = math.ceil(half_len / self.up) + 2
        self._h: Any = None if self.identity else _lowpass(self.up, self.down)
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next sample pushed starts a new stream."""
        self._buf = _EMPTY
        self._base = 0  # absolute input index of _buf[0], always a multiple of self.down
        self._in_total = 0
        self._out_pos = 0  # absolute index of the next output sample

    @property
    def latency(self) -> float:
        """Seconds of input held back as look-ahead."""
        return 0.0 if self.identity else self.margin / self.src_rate

    @property
    def samples_in(self) -> int:
        return self._in_total

    @property
    def samples_out(self) -> int:
        return self._out_pos

    def _run(self) -> Any:
        from scipy.signal import resample_poly

        return resample_poly(self._buf, self.up, self.down, window=self._h)

    def push(self, samples: Any) -> Any:
        """Add input; return the output samples that no later input can change."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1:
            raise AudioError(f"StreamResampler takes mono samples (n,), got shape {x.shape}")
        if self.identity:  # _buf holds the input from _out_pos on
            self._in_total += len(x)
            if self.src_rate == self.dst_rate:
                self._out_pos = self._in_total
                return x.copy()
            buf = np.concatenate([self._buf, x]) if len(self._buf) else x
            # never ahead of round(n * dst / src), the final length
            end = min(self._in_total, self._in_total * self.dst_rate // self.src_rate)
            k = max(0, end - self._out_pos)
            out, self._buf = buf[:k].copy(), buf[k:].copy()
            self._out_pos += k
            return out
        if len(x) == 0:
            return _EMPTY
        self._buf = np.concatenate([self._buf, x]) if len(self._buf) else x.copy()
        self._in_total += len(x)
        safe_in = self._in_total - self.margin
        if safe_in <= 0:
            return _EMPTY
        out_end = safe_in * self.up // self.down
        if out_end <= self._out_pos:
            return _EMPTY
        obase = self._base * self.up // self.down
        y = self._run()
        out = y[self._out_pos - obase:out_end - obase].astype(np.float32, copy=False)
        self._out_pos = out_end
        # Keep only the input the next outputs still reach, from a multiple of `down`.
        keep_from = (out_end * self.down // self.up - self.margin) // self.down * self.down
        if keep_from > self._base:
            self._buf = self._buf[keep_from - self._base:]
            self._base = keep_from
        return out

    def flush(self) -> Any:
        """End of the stream: return the remaining output (the stream can then be reset)."""
        total = int(round(self._in_total * self.dst_rate / self.src_rate))
        need = total - self._out_pos
        if self.identity:  # the held-back input, cut or padded to the final length
            out = np.zeros(max(need, 0), dtype=np.float32)
            have = min(len(self._buf), len(out))
            out[:have] = self._buf[:have]
            self._buf = _EMPTY
            self._out_pos = max(self._out_pos, total)
            return out
        if need <= 0:
            self._out_pos = max(self._out_pos, total)
            return _EMPTY
        if len(self._buf):
            obase = self._base * self.up // self.down
            y = self._run()[self._out_pos - obase:total - obase]
        else:
            y = _EMPTY
        if len(y) < need:
            y = np.pad(y, (0, need - len(y)))
        self._out_pos = total
        self._buf = _EMPTY
        return np.asarray(y, dtype=np.float32)

"""Smart Turn v3: an end-of-turn model that decides from the audio whether the user has finished.

Silence alone cannot tell a finished sentence from a pause in the middle of one ("I'd like to
book a flight to ... Boston"); a long hangover waits on both, a short one cuts the second off.
Smart Turn v3 (Pipecat's open model, BSD-2) reads the last 8 s of the turn and gives the
probability that it is complete: the VAD asks it after a short silence and ends the turn at
once when it says so, else waits for the hangover (see ``end_of_turn`` in
:class:`~omniframe_audio.vad.VADOptions`).

The model is the ONNX file that the ``pipecat-ai`` wheel ships
(``pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx``, 8.7 MB, int8); only the
file is used, not Pipecat's runtime (``pip install --no-deps pipecat-ai==1.14.0`` puts it
there without Pipecat's dependencies; the README's set-up does). Input: Whisper log-mel
features (80 bins, 10 ms hop) of 8 s of 16 kHz audio, the audio left-padded with zeros when
shorter and normalised to zero mean and unit variance; output: the probability, > 0.5 meaning
complete. About 45 ms a call on one core of this project's CPU.

The features are computed here in numpy (:func:`whisper_log_mel`) rather than with
``transformers.WhisperFeatureExtractor`` (what the model was trained with), so that the VAD
needs neither transformers nor torch (importing transformers alone takes seconds); a test
checks that both give the same features.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np

from omniframe.audio import AudioError

__all__ = ["SMART_TURN_URI", "SmartTurn", "load_smart_turn", "smart_turn_available",
           "whisper_log_mel"]

SMART_TURN_URI = "pkg://pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
RATE = 16000
WINDOW_S = 8
N_FFT = 400
HOP = 160
N_MELS = 80


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f * 3.0 / 200.0
    log = 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = m * 200.0 / 3.0
    log = 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0)
    return np.where(m >= 15.0, log, lin)


@functools.cache
def _mel_filters() -> np.ndarray:
    """(n_fft // 2 + 1, N_MELS) triangular filters, Slaney area normalisation (Whisper's)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(RATE / 2)),
                                   N_MELS + 2))
    bins = np.linspace(0.0, RATE / 2, N_FFT // 2 + 1)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    rise = (bins[:, None] - lo[None, :]) / (mid - lo)[None, :]
    fall = (hi[None, :] - bins[:, None]) / (hi - mid)[None, :]
    tri = np.maximum(0.0, np.minimum(rise, fall))
    return tri * (2.0 / (hi - lo))[None, :]


@functools.cache
def _window() -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann


def whisper_log_mel(audio: np.ndarray, *, normalize: bool = True) -> np.ndarray:
    """Whisper's log-mel features of 16 kHz ``audio``: (80, len(audio) // 160).

    Centred frames (reflect padding), periodic Hann window, power spectrum, Slaney mel
    filters, log10 floored at 1e-10, clamped to 8 below the maximum, scaled as (x + 4) / 4;
    the last frame is dropped, as Whisper does. ``normalize`` first scales the audio to zero
    mean and unit variance (``do_normalize`` of the feature extractor)."""
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1 or len(x) < N_FFT:
        raise AudioError(f"whisper_log_mel needs mono audio of at least {N_FFT} samples, got "
                         f"shape {x.shape}")
    if normalize:
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _window(), axis=-1)) ** 2  # (T, n_fft // 2 + 1)
    mel = power @ _mel_filters()  # (T, N_MELS)
    log = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)


def last_window(audio: np.ndarray, rate: int) -> np.ndarray:
    """The last 8 s of ``audio`` at 16 kHz, left-padded with zeros when shorter."""
    x = np.asarray(audio, dtype=np.float32)
    if rate != RATE:
        import soxr

        x = soxr.resample(x, rate, RATE, quality="HQ").astype(np.float32)
    n = WINDOW_S * RATE
    if len(x) >= n:
        return x[-n:]
    return np.concatenate([np.zeros(n - len(x), dtype=np.float32), x])


class SmartTurn:
    """One loaded Smart Turn model; :meth:`probability` is safe from several threads (one
    onnxruntime session serves every pipeline in the process)."""

    def __init__(self, path: str | Path, *, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise AudioError("Smart Turn needs onnxruntime: pip install 'omniframe[vad]'"
                             ) from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=so,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise AudioError(f"could not load the Smart Turn model from {path}: {exc}. Is it "
                             f"the ONNX file pipecat-ai ships?") from None
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        shape = inputs.get("input_features")
        if shape is None or list(shape[1:]) != [N_MELS, WINDOW_S * 100]:
            raise AudioError(f"{path} is not a Smart Turn v3 model: its inputs are {inputs}, "
                             f"expected input_features of shape (batch, 80, 800)")
        self.path = Path(path)
        self._lock = threading.Lock()

    def probability(self, audio: np.ndarray, rate: int) -> float:
        """The probability that the turn whose audio is ``audio`` (mono, any rate) is over."""
        feats = whisper_log_mel(last_window(audio, rate))[None]
        with self._lock:  # one run at a time: a call uses one core anyway
            out = self._session.run(None, {"input_features": feats})
        return float(np.asarray(out[0]).reshape(-1)[0])


def load_smart_turn(uri: str = SMART_TURN_URI) -> SmartTurn:
    """Resolve ``uri`` (``pkg://``, a file path, ...) and load the model, with an error that
    says how to install it when it is missing."""
    from omniframe.model_uris import ModelNotAvailable, resolve_model

    try:
        ref = resolve_model(uri)
    except ModelNotAvailable as exc:
        hint = (" The model ships in the pipecat-ai wheel: pip install --no-deps "
                "pipecat-ai==1.14.0 (only its ONNX file is used)." if uri == SMART_TURN_URI
                else "")
        raise AudioError(f"Smart Turn model not available: {exc}.{hint}") from None
    if ref.path is None or not Path(ref.path).is_file():
        raise AudioError(f"Smart Turn model {uri!r} is not a file (resolved to {ref.path})")
    return SmartTurn(ref.path)


def smart_turn_available(uri: str = SMART_TURN_URI) -> bool:
    """Whether ``uri`` resolves to a file (without loading it): for tests and tools."""
    from omniframe.model_uris import ModelNotAvailable, resolve_model

    try:
        ref = resolve_model(uri)
    except ModelNotAvailable:
        return False
    return ref.path is not None and Path(ref.path).is_file()

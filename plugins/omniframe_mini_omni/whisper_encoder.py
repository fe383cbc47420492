"""The Whisper encoder as Mini-Omni uses it (spec mini_omni.md §7), torch level.

Mini-Omni feeds its LM with the encoder states of OpenAI Whisper-small: one 768-dim frame per
20 ms of speech, ``L = int(duration_ms / 20) + 1`` frames (one more than the speech covers).

Two ways to compute them:

* **faithful** (the reference): pad or trim the 16 kHz audio to 30 s *before* the log-mel (the
  dynamic-range clamp uses the maximum over the padded clip), encode all 3000 mel frames
  (1500 encoder frames), keep the first ``L``. Audio longer than 30 s is truncated.
* **trim** (fast): compute the same log-mel but only the ``2 L`` mel frames that are needed
  (bit-for-bit the first ``2 L`` frames of the faithful mel, see :func:`log_mel`), and encode
  only those with the positional embedding sliced to ``L`` positions. The mel is identical, but
  the encoder is bidirectional: in the reference the kept frames also attend to the ~30 s of
  padding, here they do not, so the features (and therefore the LM's answer) **differ from the
  reference**. Cost falls from a fixed 1500-frame encode to one proportional to the speech.

Weights: a Whisper name (``small``: downloaded by openai-whisper from OpenAI's CDN into
``~/.cache/whisper``), a local ``.pt`` checkpoint in OpenAI's format (``{"dims": ...,
"model_state_dict": ...}``), a folder holding one (e.g. an ``hf://`` snapshot of Mini-Omni2,
which ships ``small.pt``), or ``random://small`` / ``random://tiny`` (seeded random weights of the
real shapes: right compute cost, meaningless features). Only the encoder is kept in memory.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from omniframe.model_uris import ModelNotAvailable, is_random, random_preset

if TYPE_CHECKING:
    import numpy as np
    import torch

log = structlog.get_logger("omniframe.mini_omni.whisper")

SAMPLE_RATE = 16_000  # Whisper's input rate
HOP_LENGTH = 160  # mel hop: 10 ms
N_FFT = 400
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480,000: the 30 s window
N_MEL_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000
MAX_FRAMES = N_MEL_FRAMES // 2  # 1500 encoder frames (20 ms each)
FRAME_RATE = 50.0  # encoder frames per second

# ModelDimensions of the official checkpoints (openai/whisper model cards); random:// presets.
WHISPER_DIMS: dict[str, dict[str, int]] = {
    name: {
        "n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": width, "n_audio_head": heads,
        "n_audio_layer": layers, "n_vocab": 51865, "n_text_ctx": 448, "n_text_state": width,
        "n_text_head": heads, "n_text_layer": layers,
    }
    for name, (width, heads, layers) in {
        "tiny": (384, 6, 4),
        "base": (512, 8, 6),
        "small": (768, 12, 12),
        "medium": (1024, 16, 24),
        # not a Whisper size: whisper-small's width (what Mini-Omni's adapter reads) with one
        # layer, for fast tests of the whole chain with random weights
        "test-768": (768, 12, 1),
    }.items()
}  # fmt: skip


class WhisperInputError(ValueError):
    """Audio the encoder cannot use (empty, not finite); the message says what to do."""


# ----------------------------------------------------------------------------- input prep


def n_frames_for(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Encoder frames Mini-Omni keeps for ``num_samples`` of audio: ``int(ms / 20) + 1``,
    at most 1500 (the reference's ``leng``, computed on the untruncated duration)."""
    duration_ms = (num_samples / sample_rate) * 1000
    return min(int(duration_ms / 20) + 1, MAX_FRAMES)


def prepare_audio(samples: Any, sample_rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz; raises :class:`WhisperInputError` for empty or broken audio."""
    import numpy as np

    from omniframe.audio import AudioError, resample, validate_samples

    arr = np.asarray(samples, dtype=np.float32)
    try:
        validate_samples(arr, sample_rate, "the user turn's audio")
    except AudioError as exc:
        raise WhisperInputError(
            f"{exc}; the Whisper encoder needs a non-empty mono float32 utterance "
            "(check the VAD / source stage)"
        ) from None
    if sample_rate != SAMPLE_RATE:
        arr = resample(arr, sample_rate, SAMPLE_RATE)
    return np.ascontiguousarray(arr, dtype=np.float32)


def log_mel(audio: np.ndarray, *, trim: bool, n_mels: int = 80,
            device: str | torch.device = "cpu") -> tuple[torch.Tensor, int]:
    """Log-mel input of the encoder and the number of encoder frames to keep.

    Args:
        audio: mono float32 at 16 kHz.
        trim: False: the reference's (n_mels, 3000) mel of the audio padded/trimmed to 30 s.
            True: only its first ``2 L`` frames, computed without the 30 s of padding.

    Returns:
        (mel, L). In trim mode the mel equals the first ``2 L`` columns of the faithful mel:
        the audio is zero-padded by at least one FFT window beyond the last needed frame (so
        no frame sees reflection padding that the faithful STFT would not see), and the
        clamp uses the maximum over every frame that can contain signal (the faithful clip's
        other frames are pure zeros, which never hold the maximum).
    """
    import numpy as np
    import torch
    import whisper

    n_keep = n_frames_for(len(audio))
    if not trim or len(audio) >= N_SAMPLES - N_FFT:  # (nearly) 30 s: nothing to trim
        clip = whisper.pad_or_trim(audio)  # pad/trim to 30 s BEFORE the mel (spec §7)
        mel = whisper.log_mel_spectrogram(torch.from_numpy(clip), n_mels=n_mels, device=device)
        return (mel if not trim else mel[:, : 2 * n_keep]), n_keep
    need = 2 * n_keep * HOP_LENGTH  # samples covering the centres of the 2 L frames
    total = max(need, len(audio)) + 2 * N_FFT
    total += -total % HOP_LENGTH
    clip = np.zeros(total, dtype=np.float32)
    clip[: len(audio)] = audio
    x = torch.from_numpy(clip).to(device)
    window = torch.hann_window(N_FFT, device=x.device)
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel_spec = whisper.audio.mel_filters(x.device, n_mels) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec[:, : 2 * n_keep], n_keep


# ----------------------------------------------------------------------------- the encoder


@dataclass
class WhisperEncoder:
    """A loaded Whisper ``AudioEncoder`` plus the input preparation of Mini-Omni.

    Attributes:
        encoder: ``whisper.model.AudioEncoder``.
        name: e.g. ``whisper-small`` (the width/depth family, for FeaturesFrame.encoder).
        dims: the checkpoint's ModelDimensions as a dict.
    """

    encoder: Any
    name: str
    dims: dict[str, int]

    @property
    def width(self) -> int:
        return int(self.dims["n_audio_state"])

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv1.weight.dtype  # LayerNorms stay float32 (whisper casts)

    def encode(self, samples: Any, sample_rate: int = SAMPLE_RATE, *,
               trim: bool = False) -> torch.Tensor:
        """Features (L, width) float32 of one utterance (see the module docstring)."""
        import torch

        audio = prepare_audio(samples, sample_rate)
        if len(audio) > N_SAMPLES:
            log.warning(
                "whisper input longer than 30 s: Mini-Omni reads only the first 30 s, the "
                "rest of the utterance is IGNORED (as in the reference)",
                seconds=round(len(audio) / SAMPLE_RATE, 2), kept_seconds=CHUNK_SECONDS,
            )
        mel, n_keep = log_mel(audio, trim=trim, n_mels=int(self.dims["n_mels"]),
                              device=self.device)
        with torch.inference_mode():
            x = mel.unsqueeze(0).to(self.dtype)
            out = self.encoder(x) if not trim else self._forward_trimmed(x)
        return out[0, :n_keep].float()

    def _forward_trimmed(self, mel: torch.Tensor) -> torch.Tensor:
        """``AudioEncoder.forward`` on fewer than 3000 mel frames: positional embedding sliced."""
        import torch.nn.functional as F

        enc = self.encoder
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x))
        x = x.permute(0, 2, 1)
        x = (x + enc.positional_embedding[: x.shape[1]]).to(x.dtype)
        for block in enc.blocks:
            x = block(x)
        return enc.ln_post(x)


def _family(dims: dict[str, int]) -> str:
    for name, ref in WHISPER_DIMS.items():
        if all(dims.get(k) == ref[k] for k in ("n_audio_state", "n_audio_layer", "n_audio_head")):
            return f"whisper-{name}"
    return f"whisper-{dims.get('n_audio_state')}x{dims.get('n_audio_layer')}"


def _build_encoder(dims: dict[str, int]) -> Any:
    from whisper.model import AudioEncoder

    return AudioEncoder(dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"],
                        dims["n_audio_head"], dims["n_audio_layer"])


def random_encoder(preset: str, seed: int = 0) -> WhisperEncoder:
    """Whisper encoder of ``preset``'s shape (tiny/base/small/medium) with seeded random weights."""
    import torch

    if preset not in WHISPER_DIMS:
        raise ModelNotAvailable(
            f"random://{preset}: unknown Whisper size; known: {', '.join(WHISPER_DIMS)}"
        )
    dims = dict(WHISPER_DIMS[preset])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = _build_encoder(dims)
    return WhisperEncoder(enc.eval(), f"whisper-{preset}", dims)


def load_checkpoint(path: str | Path) -> WhisperEncoder:
    """Encoder of an OpenAI-format checkpoint (``dims`` + ``model_state_dict``); the text
    decoder's weights are dropped."""
    import torch

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.pt"))
        preferred = [p for p in found if p.stem in ("small", "whisper-small")]
        if len(preferred) == 1 or len(found) == 1:
            path = (preferred or found)[0]
        else:
            raise ModelNotAvailable(
                f"{path} is a folder with {len(found)} .pt files "
                f"({', '.join(p.name for p in found) or 'none'}); give the Whisper checkpoint "
                "file itself, e.g. model=/path/to/small.pt"
            )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelNotAvailable(
            f"cannot read Whisper checkpoint {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ModelNotAvailable(
            f"{str(path)!r} is not an OpenAI Whisper checkpoint (expected a dict with 'dims' and "
            "'model_state_dict', as whisper.load_model reads)"
        )
    dims = dict(ckpt["dims"])
    state = {k[len("encoder."):]: v for k, v in ckpt["model_state_dict"].items()
             if k.startswith("encoder.")}
    del ckpt
    enc = _build_encoder(dims)
    missing, unexpected = enc.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "positional_embedding"]  # a buffer; older files lack it
    if missing or unexpected:
        raise ModelNotAvailable(
            f"{str(path)!r}: encoder weights do not match its dims: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return WhisperEncoder(enc.eval(), _family(dims), dims)


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("OMNIFRAME_OFFLINE", "HF_HUB_OFFLINE"))


def download_official(name: str, download_root: str | None = None) -> Path:
    """Path of the official checkpoint ``name`` (``small``, ...), downloading it from OpenAI's
    CDN with openai-whisper (the reference's ``whisper.load_model("small")``) if needed."""
    import whisper

    if download_root is None:
        default = os.path.join(os.path.expanduser("~"), ".cache")
        download_root = os.path.join(os.getenv("XDG_CACHE_HOME", default), "whisper")
    url = whisper._MODELS[name]
    target = Path(download_root) / os.path.basename(url)
    hint = (
        f"Download {url} elsewhere and put it at {target}, or pass the file "
        f"(--set encoder.options.model=/path/to/{name}.pt); random://{name.split('.')[0]} "
        "gives random weights of the same size for speed tests."
    )
    if _offline() and not target.is_file():
        raise ModelNotAvailable(
            f"Whisper {name!r} is not in {download_root} and downloads are off "
            f"(OMNIFRAME_OFFLINE / HF_HUB_OFFLINE is set). {hint}"
        )
    try:
        return Path(whisper._download(url, download_root, in_memory=False))
    except Exception as exc:
        raise ModelNotAvailable(
            f"could not download Whisper {name!r} from OpenAI's CDN "
            f"({type(exc).__name__}: {exc}). Are you offline? {hint}"
        ) from exc


def load_whisper_encoder(model: str, *, device: str = "cpu", dtype: str = "float32",
                         seed: int = 0, download_root: str | None = None) -> WhisperEncoder:
    """Load the encoder named by ``model``: a Whisper name (``small``), ``random://<size>``,
    a local ``.pt`` file or folder, or any URI :func:`omniframe.model_uris.resolve_model` knows."""
    import torch
    import whisper

    if model in whisper.available_models():
        enc = load_checkpoint(download_official(model, download_root))
    elif is_random(model):
        enc = random_encoder(random_preset(model), seed)
    else:
        from omniframe.model_uris import resolve_model

        ref = resolve_model(model)
        if ref.path is None:
            raise ModelNotAvailable(f"{model!r} does not name Whisper weights")
        enc = load_checkpoint(ref.path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    enc.encoder.to(device=device, dtype=torch_dtype)
    for module in enc.encoder.modules():  # whisper's LayerNorm computes in float32
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
    return dataclasses.replace(enc)

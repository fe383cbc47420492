"""SNAC 24 kHz decoding for Mini-Omni's audio codes (spec mini_omni.md §6), torch level.

One Mini-Omni decode step yields one SNAC *frame*: 7 local codes (0..4095) in the flat
depth-first order, regrouped into SNAC's 3 codebooks (1, 2 and 4 codes per frame) by
:func:`omniframe_mini_omni.tokens.frames_to_codebooks`. F frames decode to exactly F * 2048
samples at 24 kHz (85.33 ms per frame).

:class:`ChunkedDecoder` streams: it decodes ``frames_per_chunk`` frames at a time like the
reference (4 frames, 341 ms, decoded independently), and goes beyond it where asked:

* ``context_frames``: each chunk is decoded together with the N frames before it and only the
  new audio is kept, so the decoder's left receptive field is not cut at chunk borders;
* ``lookahead_frames``: a chunk is decoded only once N further frames exist, and decoded with
  them (right context), at the price of N frames (85 ms each) of extra latency;
* :meth:`ChunkedDecoder.flush` decodes the final partial chunk (the reference drops up to 3
  frames, <= 256 ms, at the end of every answer).

With 3 frames of context on each side the chunked waveform equals one-shot decoding to float
precision (SNAC's decoder is convolutional; its receptive field is under 3 frames per side),
provided the decoder's noise is off (``deterministic``).

SNAC's ``NoiseBlock`` adds fresh Gaussian noise on every decode call, so the reference is not
reproducible. ``deterministic=True`` removes the noise blocks (the output is then the decoder's
noise-free mean; slightly different timbre from the reference, reproducible).

Weights: ``hf://hubertsiuzdak/snac_24khz`` (what ``SNAC.from_pretrained`` downloads), a local
folder with ``config.json`` + ``pytorch_model.bin`` (the same official format), or
``random://snac_24khz`` (the official architecture with seeded random weights).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from omniframe.model_uris import ModelNotAvailable

from . import tokens

if TYPE_CHECKING:
    import numpy as np

log = structlog.get_logger("omniframe.mini_omni.snac")

SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 2048  # 4 latent steps of 512 samples (hop) per Mini-Omni frame
CODEC_NAME = "snac_24khz"

# config.json of hubertsiuzdak/snac_24khz (19.8M parameters, 0.98 kbps)
SNAC_24KHZ_CONFIG: dict[str, Any] = {
    "sampling_rate": 24000,
    "encoder_dim": 48,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 1024,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 4096,
    "codebook_dim": 8,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}
RANDOM_PRESETS = {"snac_24khz": SNAC_24KHZ_CONFIG}


# ----------------------------------------------------------------------------- loading


def random_snac(preset: str = "snac_24khz", seed: int = 0) -> Any:
    """The SNAC architecture of ``preset`` with seeded random weights (eval mode)."""
    import torch
    from snac import SNAC

    if preset not in RANDOM_PRESETS:
        raise ModelNotAvailable(
            f"random://{preset}: unknown SNAC preset; known: {', '.join(RANDOM_PRESETS)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SNAC(**RANDOM_PRESETS[preset])
    return model.eval()


def save_snac(model: Any, folder: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Write ``model`` in the official layout: ``config.json`` + ``pytorch_model.bin``."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or SNAC_24KHZ_CONFIG, indent=2))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def load_snac(uri: str = "hf://hubertsiuzdak/snac_24khz", *, device: str = "cpu",
              deterministic: bool = False, seed: int = 0, fast: bool = False) -> Any:
    """Load SNAC from a URI (see the module docstring); ``deterministic`` removes the noise,
    ``fast`` applies :func:`speed_up` (inference only)."""
    from omniframe.model_uris import resolve_model

    ref = resolve_model(uri)
    if ref.is_random:
        model = random_snac(ref.preset or "", seed)
    else:
        assert ref.path is not None
        folder = ref.path
        if not folder.is_dir():
            raise ModelNotAvailable(
                f"{uri!r}: SNAC weights are a folder with config.json and pytorch_model.bin "
                f"(as on hf://hubertsiuzdak/snac_24khz); {str(folder)!r} is a file"
            )
        missing = [n for n in ("config.json", "pytorch_model.bin") if not (folder / n).is_file()]
        if missing:
            raise ModelNotAvailable(
                f"{uri!r}: folder {str(folder)!r} lacks {', '.join(missing)}; a SNAC folder "
                "holds config.json and pytorch_model.bin (huggingface-cli download "
                "hubertsiuzdak/snac_24khz)"
            )
        from snac import SNAC

        try:
            model = SNAC.from_pretrained(str(folder))  # the official loader, on a folder
        except Exception as exc:
            raise ModelNotAvailable(
                f"{uri!r}: cannot load SNAC from {str(folder)!r}: {type(exc).__name__}: {exc}"
            ) from exc
    rate = int(getattr(model, "sampling_rate", SAMPLE_RATE))
    hop = int(getattr(model, "hop_length", 512))
    if rate != SAMPLE_RATE or hop * 4 != SAMPLES_PER_FRAME or len(model.vq_strides) != 3:
        raise ModelNotAvailable(
            f"{uri!r} is a SNAC model at {rate} Hz with {len(model.vq_strides)} codebooks; "
            "Mini-Omni's codes need the 24 kHz, 3-codebook snac_24khz model"
        )
    if deterministic:
        disable_noise(model)
    if fast:
        speed_up(model)
    return model.to(device).eval()


def speed_up(model: Any) -> dict[str, int]:
    """Make SNAC decoding cheaper on CPU for inference; returns what was changed.

    * weight norm is folded into each convolution's weight once (SNAC recomputes ``g * v/|v|``
      for its ~100 convolutions on every call): exact, the same weights;
    * each ``ConvTranspose1d`` of the decoder runs as one matmul plus an overlap-add
      (:class:`~omniframe_mini_omni.snac_fast.MatmulConvTranspose1d`). For one short chunk
      PyTorch's CPU transposed convolution takes a slow path (~28 ms for the first
      1024->512 upsampler on 4 latent steps, against ~6 ms as a matmul). Same sums in
      another order: float rounding differs (~1e-6 relative).

    Together about 2.5x faster for a 1-frame chunk on the 2-core dev CPU (benchmarks/mini_omni.py).
    """
    from torch import nn
    from torch.nn.utils import parametrize

    from .snac_fast import MatmulConvTranspose1d

    folded = replaced = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            folded += 1
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.ConvTranspose1d and MatmulConvTranspose1d.supports(child):
                setattr(module, name, MatmulConvTranspose1d(child))
                replaced += 1
    return {"weight_norm_folded": folded, "conv_transpose_replaced": replaced}


def disable_noise(model: Any) -> int:
    """Replace every ``NoiseBlock`` of the decoder by identity; returns how many there were."""
    from snac.layers import NoiseBlock
    from torch import nn

    n = 0
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for i, child in enumerate(module):
                if isinstance(child, NoiseBlock):
                    module[i] = nn.Identity()
                    n += 1
    return n


def decode_frames(model: Any, frames: Sequence[Sequence[int]]) -> np.ndarray:
    """Decode F aligned 7-code frames in one call: float32 (F * 2048,) at 24 kHz."""
    import torch

    if not frames:
        import numpy as np

        return np.zeros(0, np.float32)
    books = tokens.frames_to_codebooks(frames)  # raises on any special (>= 4096)
    device = next(model.parameters()).device
    codes = [torch.tensor(b, dtype=torch.long, device=device).unsqueeze(0) for b in books]
    with torch.inference_mode():
        audio = model.decode(codes)  # (1, 1, F * 2048)
    return audio.reshape(-1).float().clamp(-1.0, 1.0).cpu().numpy()


# ----------------------------------------------------------------------------- streaming


@dataclass
class ChunkedDecoder:
    """Streaming decode of one answer's frames (one instance per turn).

    Args:
        model: a loaded SNAC model.
        frames_per_chunk: new frames per decode call (the reference: 4).
        context_frames: earlier frames decoded along with each chunk (audio discarded).
        lookahead_frames: later frames required before a chunk is decoded, and decoded with it.
        first_chunk_frames: size of the first chunk only (None: ``frames_per_chunk``). A small
            first chunk gives early first audio; larger later chunks keep SNAC's cost down.
    """

    model: Any
    frames_per_chunk: int = 4
    context_frames: int = 0
    lookahead_frames: int = 0
    first_chunk_frames: int | None = None
    frames: list[tuple[int, ...]] = field(default_factory=list)
    emitted: int = 0  # frames whose audio is out
    dropped: int = 0  # frames refused because they held specials

    def __post_init__(self) -> None:
        if self.frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {self.frames_per_chunk}")
        if self.context_frames < 0 or self.lookahead_frames < 0:
            raise ValueError("context_frames and lookahead_frames must be >= 0")
        if self.first_chunk_frames is not None and self.first_chunk_frames < 1:
            raise ValueError(f"first_chunk_frames must be >= 1, got {self.first_chunk_frames}")

    def _chunk(self) -> int:
        """Frames in the next chunk."""
        if self.emitted == 0 and self.first_chunk_frames is not None:
            return self.first_chunk_frames
        return self.frames_per_chunk

    def push(self, codes: Sequence[int]) -> bool:
        """Add one frame; False (and counted in ``dropped``) if it is not 7 SNAC codes."""
        if not tokens.is_code_frame(codes):
            self.dropped += 1
            return False
        self.frames.append(tuple(int(c) for c in codes))
        return True

    def ready(self) -> bool:
        """True when a full chunk (plus its look-ahead) is waiting."""
        pending = len(self.frames) - self.emitted
        return pending >= self._chunk() + self.lookahead_frames

    def next_chunk(self) -> tuple[int, int]:
        """Frame range [start, end) of the next full chunk (call when :meth:`ready`)."""
        return self.emitted, self.emitted + self._chunk()

    def decode_range(self, start: int, end: int, *, right: int | None = None) -> np.ndarray:
        """Audio of frames [start, end), decoded with left context and up to ``right`` frames
        of right context (default ``lookahead_frames``); marks them emitted."""
        right = self.lookahead_frames if right is None else right
        lo = max(0, start - self.context_frames)
        hi = min(len(self.frames), end + right)
        audio = decode_frames(self.model, self.frames[lo:hi])
        a = (start - lo) * SAMPLES_PER_FRAME
        out = audio[a : a + (end - start) * SAMPLES_PER_FRAME]
        self.emitted = end
        return out

    def pop_ready(self) -> list[np.ndarray]:
        """Decode every full chunk that is ready (blocking)."""
        out = []
        while self.ready():
            out.append(self.decode_range(*self.next_chunk()))
        return out

    def flush(self) -> np.ndarray | None:
        """Decode whatever is left (the final partial chunk and any held look-ahead)."""
        if self.emitted >= len(self.frames):
            return None
        return self.decode_range(self.emitted, len(self.frames), right=0)

"""Mini-Omni's encoder stage ``whisper``: :class:`~omniframe.frames.UserTurnFrame` (any rate;
resampled to 16 kHz) → :class:`~omniframe.frames.FeaturesFrame` (torch tensor (L, 768), 50
frames/s). torch and whisper are imported in ``setup()``, never here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

from omniframe.frames import (
    EndOfTurnFrame,
    ErrorFrame,
    FeaturesFrame,
    Frame,
    UserTurnFrame,
)
from omniframe.model_uris import model_cache_key
from omniframe.stage import Stage, StageOptions

__all__ = ["WhisperEncoderStage"]

Dtype = Literal["float32", "bfloat16"]


class WhisperEncoderStage(Stage):
    """Whisper encoder features for Mini-Omni (spec §7): one 768-dim frame per 20 ms.

    Faithful by default (pad to 30 s before the mel, encode 1500 frames, keep
    ``int(ms/20)+1``). ``trim: true`` encodes only the frames needed: much faster for short
    questions, but the features differ from the reference (the encoder no longer attends to
    the 30 s of padding), so answers may change.
    """

    kind = "encoder"
    name = "whisper"
    consumes = (UserTurnFrame,)
    requires = (UserTurnFrame,)
    produces = (FeaturesFrame, EndOfTurnFrame, ErrorFrame)

    class Options(StageOptions):
        model: str = "small"
        """``small`` (OpenAI CDN, as the reference), a ``.pt`` file or folder, ``hf://...``,
        or ``random://small`` / ``random://tiny`` (random weights of the real size)."""
        trim: bool = False
        """Encode only the needed frames (fast; results differ slightly from the reference)."""
        dtype: Dtype = "float32"
        seed: int = 0
        """Seed of ``random://`` weights."""
        download_root: str | None = None
        """Where openai-whisper caches downloads (default ``~/.cache/whisper``)."""

    async def setup(self) -> None:
        from omniframe_mini_omni.whisper_encoder import load_whisper_encoder

        o = self.options
        device = self.context.device
        key = model_cache_key("mini-omni/whisper", o.model, o.dtype, device, seed=o.seed)
        self.encoder = await self.shared_model(
            key, lambda: load_whisper_encoder(o.model, device=device, dtype=o.dtype,
                                              seed=o.seed, download_root=o.download_root))
        self.log.info("whisper encoder ready", encoder=self.encoder.name, trim=o.trim)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        from omniframe_mini_omni.whisper_encoder import FRAME_RATE, WhisperInputError

        assert isinstance(frame, UserTurnFrame)
        try:
            feats = await self.run_compute(self._encode, frame.samples, frame.sample_rate)
        except WhisperInputError as exc:
            self.log.warning("unusable user turn", turn=frame.turn, error=str(exc))
            yield ErrorFrame(stage=self.context.name, message=str(exc))
            yield EndOfTurnFrame(reason="empty")
            return
        yield FeaturesFrame(features=feats, frame_rate=FRAME_RATE, encoder=self.encoder.name,
                            speech_end_ts=frame.speech_end_ts)

    def _encode(self, samples: Any, rate: int) -> Any:
        return self.encoder.encode(samples, rate, trim=self.options.trim)

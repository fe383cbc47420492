"""Mini-Omni as pipeline stages, one module each: :mod:`.whisper_stage` (encoder
``whisper``), :mod:`.lm_stage` (lm ``mini-omni``) and :mod:`.snac_stage` (codec ``snac``).
This module gathers them for the plugin and for code written against the earlier layout."""

from __future__ import annotations

from omniframe_mini_omni.lm_stage import MiniOmniLM
from omniframe_mini_omni.snac_stage import SnacCodec
from omniframe_mini_omni.whisper_stage import WhisperEncoderStage

__all__ = ["MiniOmniLM", "SnacCodec", "WhisperEncoderStage"]

"""Registers the Mini-Omni stages: encoder ``whisper``, lm ``mini-omni``, codec ``snac``."""

from __future__ import annotations

from collections.abc import Callable

from omniframe import hookimpl


@hookimpl
def register_stages(register: Callable[[type], None]) -> None:
    from omniframe_mini_omni.stages import MiniOmniLM, SnacCodec, WhisperEncoderStage

    register(WhisperEncoderStage)
    register(MiniOmniLM)
    register(SnacCodec)

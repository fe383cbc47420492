"""Registers the cascade stages: Whisper ASR, a transformers text LM, espeak-ng and Flite TTS.

Module-level imports stay light: the stage modules import torch, faster-whisper and
transformers only inside ``setup()``.
"""

from __future__ import annotations

from collections.abc import Callable

from omniframe import hookimpl


@hookimpl
def register_stages(register: Callable[[type], None]) -> None:
    from omniframe_cascade.asr import WhisperASR
    from omniframe_cascade.lm import TransformersLM
    from omniframe_cascade.tts import EspeakTTS, FliteTTS

    register(WhisperASR)
    register(TransformersLM)
    register(EspeakTTS)
    register(FliteTTS)

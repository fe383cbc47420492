"""Shared fixtures for the cascade tests: spoken questions made with espeak-ng, the config.

Models are cached process-wide by ``omniframe.resources.default_resources()``, so every test
that builds a stage with the same model reuses one loaded copy (each model loads once per
test session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
CASCADE_YAML = REPO / "configs" / "cascade.yaml"
QUESTION = "What is the capital of France?"

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    import soundfile as sf

    sf.write(path, samples, rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def question_audio() -> np.ndarray:
    """"What is the capital of France?" spoken by espeak-ng, 16 kHz float32."""
    from omniframe.testing import espeak

    return espeak(QUESTION, rate=175)


@pytest.fixture
def question_wav(tmp_path: Path, question_audio: np.ndarray) -> Path:
    pad = np.zeros(4800, np.float32)
    return write_wav(tmp_path / "question.wav", np.concatenate([pad, question_audio, pad]))


@pytest.fixture(scope="session")
def smollm() -> object:
    """Loads SmolLM2-135M-Instruct into the process-wide cache once (outside any test's
    time limit); stages built later with the default model reuse it."""
    import anyio
    from omniframe_cascade.lm import TransformersLM

    from omniframe.testing import make_stage

    stage = make_stage(TransformersLM)
    anyio.run(stage.setup)
    return stage.lm


@pytest.fixture(scope="session")
def whisper_tiny() -> object:
    """Loads Whisper tiny.en (CTranslate2) into the process-wide cache once."""
    import anyio
    from omniframe_cascade.asr import WhisperASR

    from omniframe.testing import make_stage

    stage = make_stage(WhisperASR)
    anyio.run(stage.setup)
    return stage._model

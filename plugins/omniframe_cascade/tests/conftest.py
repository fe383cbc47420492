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

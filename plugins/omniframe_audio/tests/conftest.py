"""Fixtures for the omniframe_audio tests: real speech (espeak-ng) made once per session."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

SR = 16000


@dataclass
class Dialogue:
    """Two spoken sentences separated by silence, with where the speech really is."""

    samples: Any
    sample_rate: int
    spans: list[tuple[float, float]]  # (first, last) audible sample time of each sentence


def _audible(x: Any, rate: int, offset: float) -> tuple[float, float]:
    idx = np.nonzero(np.abs(x) > 0.02)[0]
    return offset + idx[0] / rate, offset + idx[-1] / rate


def make_dialogue(rate: int = SR, gap_s: float = 1.2) -> Dialogue:
    from omniframe.testing import espeak

    a = espeak("Hello there, how are you today?", sample_rate=rate)
    b = espeak("I would like a cup of tea.", sample_rate=rate)
    lead = np.zeros(int(0.5 * rate), np.float32)
    gap = np.zeros(int(gap_s * rate), np.float32)
    tail = np.zeros(int(1.0 * rate), np.float32)
    x = np.concatenate([lead, a, gap, b, tail])
    t_b = (len(lead) + len(a) + len(gap)) / rate
    return Dialogue(x, rate, [_audible(a, rate, len(lead) / rate), _audible(b, rate, t_b)])


@pytest.fixture(scope="session")
def dialogue() -> Dialogue:
    if shutil.which("espeak-ng") is None and shutil.which("espeak") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    return make_dialogue()

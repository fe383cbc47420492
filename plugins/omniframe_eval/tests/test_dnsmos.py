"""DNSMOS speech quality of answers: the ONNX model from the speechmos package, our runner."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from omniframe_eval.judges import Dnsmos, JudgeUnavailable
from omniframe_eval.report import _speech_quality

needs_model = pytest.mark.skipif(importlib.util.find_spec("speechmos") is None,
                                 reason="speechmos (the DNSMOS model) not installed")


@needs_model
def test_dnsmos_orders_clean_noisy_and_noise() -> None:
    from omniframe.testing import espeak

    d = Dnsmos()
    speech = espeak("The capital of France is Paris.", sample_rate=24000)
    rng = np.random.default_rng(0)
    clean = d.score(speech, 24000)
    noisy = d.score(speech + rng.normal(0, 0.05, speech.size).astype(np.float32), 24000)
    noise = d.score(rng.normal(0, 0.1, 48000).astype(np.float32), 24000)
    assert clean and noisy and noise
    assert set(clean) == {"sig", "bak", "ovrl"}
    assert clean["ovrl"] > noisy["ovrl"] + 0.5 > noise["ovrl"] + 0.5
    assert clean["bak"] > noisy["bak"]
    assert all(1.0 <= v <= 5.0 for v in clean.values())
    assert d.score(np.zeros(800, np.float32), 24000) is None  # silence: nothing to score
    assert d.score(np.zeros(0, np.float32), 16000) is None


def test_missing_model_is_a_clear_reason() -> None:
    with pytest.raises(JudgeUnavailable, match="pip install --no-deps speechmos"):
        Dnsmos("pkg://no_such_speechmos_pkg/x.onnx").load()


def test_report_block() -> None:
    recs = [{"dnsmos": {"sig": 3.0, "bak": 4.0, "ovrl": 2.0}},
            {"dnsmos": {"sig": 4.0, "bak": 4.0, "ovrl": 3.0}}, {"dnsmos": None}]
    q = _speech_quality(recs, {})
    assert q["n_items"] == 2 and q["dnsmos_ovrl"]["mean"] == pytest.approx(2.5)
    assert "not available: boom" in _speech_quality([], {"dnsmos": "boom"})["note"]

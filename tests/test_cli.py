"""The command line: run (the built-in demo, files, overrides), validate, plugins, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from click.testing import CliRunner

from omniframe.cli import _add_plugin_commands, cli
from omniframe.testing import speech_like

_add_plugin_commands()


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_run_builtin_demo(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "answer.wav"
    res = runner.invoke(cli, ["run", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "agent: I heard" in res.stdout
    assert "turn 1: voice-to-voice" in res.stderr
    assert "turn 2: voice-to-voice" in res.stderr
    data, sr = sf.read(out)
    assert sr > 0 and len(data) > sr * 0.5


def test_run_file_with_json_metrics(runner: CliRunner, tmp_path: Path) -> None:
    wav = tmp_path / "q.wav"
    sf.write(wav, speech_like([("silence", 0.3), ("speech", 1.0), ("silence", 0.3)],
                              sample_rate=44100), 44100)
    cfg = tmp_path / "file.yaml"
    cfg.write_text("pipeline:\n  - {kind: source, plugin: file}\n  - {kind: vad, plugin: energy}\n"
                   "  - {kind: lm, plugin: echo}\n  - {kind: codec, plugin: echo}\n"
                   "  - {kind: sink, plugin: wav}\n")
    res = runner.invoke(cli, ["run", str(cfg), "--input", str(wav), "--output",
                              str(tmp_path / "a.wav"), "--json"])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    turns = [e for e in events if e["event"] == "turn"]
    assert len(turns) == 1 and turns[0]["text"].startswith("I heard 1.")
    run = [e for e in events if e["event"] == "run"][0]
    assert run["input_audio_s"] > 1.5


def test_run_errors(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(cli, ["run", "--input", str(tmp_path / "missing.wav")])
    assert res.exit_code == 2
    assert "the source 'synth' takes no input file" in res.stderr
    cfg = tmp_path / "file.yaml"
    cfg.write_text("pipeline:\n  - {kind: source, plugin: file}\n  - {kind: vad, plugin: energy}\n"
                   "  - {kind: lm, plugin: echo}\n  - {kind: sink, plugin: 'null'}\n")
    res = runner.invoke(cli, ["run", str(cfg), "--input", str(tmp_path / "missing.wav")])
    assert res.exit_code == 1
    assert "stage 'source' (source) failed" in res.stderr
    assert "does not exist" in res.stderr
    res = runner.invoke(cli, ["run", "--set", "lm.options.prefx=1"])
    assert res.exit_code == 2
    assert "pipeline[2].options.prefx: unknown key 'prefx'; did you mean 'prefix'?" in res.stderr
    res = runner.invoke(cli, ["run", "--output", str(tmp_path / "a.mp3")])
    assert res.exit_code == 2 and "no sink in this pipeline writes .mp3" in res.stderr
    res = runner.invoke(cli, ["run", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_validate(runner: CliRunner, tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parents[1] / "omniframe" / "configs" / "demo.yaml"
    res = runner.invoke(cli, ["validate", str(demo)])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("ok: ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  - {kind: source, plugin: synth}\n"
                   "  - {kind: codec, plugin: echo}\n")
    res = runner.invoke(cli, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "stage 'codec' (codec: echo) consumes TextDeltaFrame" in res.stderr


def test_plugins_table_and_json(runner: CliRunner) -> None:
    res = runner.invoke(cli, ["plugins"])
    assert res.exit_code == 0
    assert "omniframe_echo" in res.stdout and "lm:echo" in res.stdout
    rows = json.loads(runner.invoke(cli, ["plugins", "--json"]).stdout)
    echo = next(r for r in rows if r["name"] == "omniframe_echo")
    assert {"kind": "lm", "name": "echo"}.items() <= echo["stages"][0].items() or any(
        s["kind"] == "lm" and s["name"] == "echo" for s in echo["stages"])
    assert all(r["version"] for r in rows)


def test_config_schema(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    res = runner.invoke(cli, ["config-schema", "-o", str(out)])
    assert res.exit_code == 0
    schema = json.loads(out.read_text())
    assert "pipeline" in schema["properties"]


@pytest.fixture(autouse=True)
def _reset_logging() -> object:
    import structlog

    yield
    structlog.reset_defaults()

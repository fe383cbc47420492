"""The command line: run (the built-in demo, files, overrides), validate, plugins, schema."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile as sf
from click.testing import CliRunner, Result

from omniframe.cli import _add_plugin_commands, cli
from omniframe.testing import speech_like

_add_plugin_commands()
DEMO = Path(__file__).resolve().parents[1] / "omniframe" / "configs" / "demo.yaml"


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


FILE_CFG = ("pipeline:\n  - {kind: source, plugin: file}\n  - {kind: vad, plugin: energy}\n"
            "  - {kind: lm, plugin: echo}\n  - {kind: codec, plugin: echo}\n"
            "  - {kind: sink, plugin: wav}\n")


def one_error_line(res: Result) -> str:
    """A refused command: exit 2, one ``error:`` message, no traceback, nothing ran."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    assert "pipeline '" not in res.stderr  # refused before the pipeline was announced
    return res.stderr


@pytest.fixture
def recording(tmp_path: Path) -> tuple[Path, Path, bytes]:
    wav = tmp_path / "q.wav"
    sf.write(wav, speech_like([("silence", 0.2), ("speech", 0.5), ("silence", 0.3)]), 16000)
    cfg = tmp_path / "file.yaml"
    cfg.write_text(FILE_CFG)
    return cfg, wav, wav.read_bytes()


def test_output_equal_to_input_is_refused(runner: CliRunner, tmp_path: Path,
                                          recording: tuple[Path, Path, bytes],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, wav, before = recording
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.wav").symlink_to(wav)
    (tmp_path / "linkdir").symlink_to(tmp_path)
    os.link(wav, tmp_path / "hard.wav")
    for out in [str(wav), "q.wav", "./q.wav", "sub/../q.wav", "link.wav",
                str(tmp_path / "linkdir" / "q.wav"), "hard.wav"]:
        res = runner.invoke(cli, ["run", str(cfg), "--input", "q.wav", "--output", out])
        err = one_error_line(res)
        assert "is also the input file (--input): it would be overwritten" in err, out
    cfg.write_text(FILE_CFG.replace("plugin: file}", "plugin: file, options: {path: q.wav}}"))
    res = runner.invoke(cli, ["run", str(cfg), "--output", "q.wav"])
    assert "is also the input file (source.options.path)" in one_error_line(res)
    assert wav.read_bytes() == before
    text = cfg.read_text()
    res = runner.invoke(cli, ["run", str(cfg), "--record", "file.yaml"])
    assert "is also the input file (the config)" in one_error_line(res)
    assert cfg.read_text() == text


def test_unwritable_outputs_are_refused_before_anything_runs(
        runner: CliRunner, tmp_path: Path, recording: tuple[Path, Path, bytes]) -> None:
    cfg, wav, _ = recording
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = runner.invoke(cli, ["run", str(cfg), "-i", str(wav), "-o", str(afile / "a.wav")])
    assert "--output: cannot write" in one_error_line(res)
    assert "is a file, not a folder" in res.stderr
    res = runner.invoke(cli, ["run", "--record", str(afile / "deeper" / "r.jsonl")])
    assert "--record: cannot write" in one_error_line(res)
    res = runner.invoke(cli, ["run", "--record", str(tmp_path)])
    assert "is a directory" in one_error_line(res)  # click checks this one itself
    res = runner.invoke(cli, ["run", "--set", f"sink.options.path={afile}/x.wav"])
    assert "sink.options.path: cannot write" in one_error_line(res)
    res = runner.invoke(cli, ["run", "-o", str(tmp_path / "o.wav"), "--record",
                              str(tmp_path / "o.wav")])
    assert "is also written by --output" in one_error_line(res)
    res = runner.invoke(cli, ["config-schema", "-o", str(afile / "schema.json")])
    assert "--output: cannot write" in one_error_line(res)


def test_names_too_long_for_the_file_system(runner: CliRunner, tmp_path: Path) -> None:
    long = str(tmp_path / ("a" * 5000))
    res = runner.invoke(cli, ["run", "-o", long + ".wav"])
    err = one_error_line(res)
    assert "--output: cannot write" in err and "(5" in err and "chars)" in err
    assert len(err) < 600
    res = runner.invoke(cli, ["run", long + ".yaml"])
    assert "cannot read" in one_error_line(res) and len(res.stderr) < 600


def test_record_and_schema_folders_are_created(runner: CliRunner, tmp_path: Path) -> None:
    rec = tmp_path / "new" / "r.jsonl"
    res = runner.invoke(cli, ["run", "--record", str(rec), "-o", str(tmp_path / "a.wav")])
    assert res.exit_code == 0, res.output
    assert rec.read_text().count("\n") > 3
    res = runner.invoke(cli, ["config-schema", "-o", str(tmp_path / "s" / "schema.json")])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("option", ["--input", "--output", "--record"])
def test_repeated_single_options_are_refused(runner: CliRunner, tmp_path: Path,
                                              option: str) -> None:
    a, b = str(tmp_path / "a.wav"), str(tmp_path / "b.wav")
    res = runner.invoke(cli, ["run", option, a, option, b])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "given 2 times" in res.stderr and "give it once" in res.stderr


@pytest.mark.parametrize(("args", "content", "expected"), [
    (["--set", "pipeline[abc].x=1"], None, "index [abc] is not a number"),
    (["--set", "pipeline[].x=1"], None, "index [] is not a number"),
    (["--set", "a=1"], b"- a\n- b\n", "the config is a list, not a mapping"),
    ([], "name: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ([], b"\x00\x01\x02junk", "binary file"),
    ([], b"", "the file is empty"),
    ([], b"pipeline: &a [*a]\n", "recursive"),
    (["--set", "device=tpu"], None, "'tpu' is not a torch device"),
    (["--set", "lm.options.prefix"], None, "must look like path=value"),
    (["--set", "lmm.options.prefix=1"], None, "no stage named 'lmm'; did you mean 'lm'?"),
    (["--set", "lm.options.prefix=" + "x" * 50_000, "--set", "device=" + "y" * 50_000], None,
     "… (50002 chars) is not a torch device"),
])
def test_bad_configs_and_overrides_are_one_error_line(
        runner: CliRunner, tmp_path: Path, args: list[str], content: bytes | None,
        expected: str) -> None:
    cmd = ["run"]
    if content is not None:
        cfg = tmp_path / "c.yaml"
        cfg.write_bytes(content)
        cmd.append(str(cfg))
    res = runner.invoke(cli, [*cmd, *args])
    err = one_error_line(res)
    assert expected in err
    assert len(err) < 1_500
    if content is not None:
        res = runner.invoke(cli, ["validate", str(tmp_path / "c.yaml"), *args])
        assert expected in one_error_line(res)


def test_a_plugin_clash_is_one_error_line(runner: CliRunner) -> None:
    from omniframe import hookimpl
    from omniframe.plugins import register_plugin, unregister_plugin
    from omniframe.stage import Stage

    class Impostor(Stage):
        kind = "lm"
        name = "echo"

    def broken(register: object) -> None:
        raise ImportError("no module named 'missing_dependency'")

    for name, fn in [("impostor", lambda register: register(Impostor)), ("broken", broken)]:
        register_plugin(SimpleNamespace(register_stages=hookimpl(fn)), name)
        try:
            for cmd in (["run"], ["validate", str(DEMO)], ["plugins"]):
                res = runner.invoke(cli, cmd)
                err = one_error_line(res)
                assert err.startswith("error: "), err
                assert f"by {name!r}" in err or f"plugin {name!r} failed" in err
        finally:
            unregister_plugin(name)


def test_a_stage_whose_constructor_fails_is_one_error_line(runner: CliRunner,
                                                            tmp_path: Path) -> None:
    from omniframe_echo.stages import EchoLM

    from omniframe import hookimpl
    from omniframe.plugins import register_plugin, unregister_plugin

    class BrokenLM(EchoLM):
        name = "broken-lm"

        def __init__(self, *args: object, **kwargs: object) -> None:
            raise KeyError("model_path")

    register_plugin(SimpleNamespace(register_stages=hookimpl(
        lambda register: register(BrokenLM), specname="register_stages")), "brokenlm")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(DEMO.read_text().replace("plugin: echo\n  - kind: codec",
                                            "plugin: broken-lm\n  - kind: codec"))
    try:
        for cmd in (["run", str(cfg), "-o", str(tmp_path / "a.wav")], ["validate", str(cfg)]):
            res = runner.invoke(cli, cmd)
            assert res.exit_code == 1, res.output
            assert "Traceback" not in res.output
            assert (f"error: a stage of {cfg} could not be created: KeyError: 'model_path' (a "
                    f"bug in its plugin") in res.stderr
    finally:
        unregister_plugin("brokenlm")


def test_run_help_gives_the_exit_status(runner: CliRunner) -> None:
    text = " ".join(runner.invoke(cli, ["run", "--help"]).output.split())
    assert "Exit status: 0 the run ended 1 a stage failed" in text
    assert "2 bad command line or config: nothing ran" in text


def test_a_plugin_whose_commands_fail_is_skipped_with_a_warning() -> None:
    import click

    from omniframe import hookimpl
    from omniframe.cli import add_plugin_commands
    from omniframe.plugins import register_plugin, unregister_plugin

    def broken(cli: object) -> None:
        raise AttributeError("'Group' object has no attribute 'add_comand'")

    register_plugin(SimpleNamespace(register_commands=hookimpl(broken, specname=
                                                               "register_commands")), "broken")
    try:
        group = click.Group()
        problems = add_plugin_commands(group)
    finally:
        unregister_plugin("broken")
    assert problems == ["plugin 'broken' could not add its commands: AttributeError: 'Group' "
                        "object has no attribute 'add_comand'. Update or reinstall it, or leave "
                        "it out with OMNIFRAME_LOAD_PLUGINS=<the plugins you want>."]
    assert "eval" in group.commands  # the other plugins' commands are there


@pytest.fixture(autouse=True)
def _reset_logging() -> object:
    import structlog

    yield
    structlog.reset_defaults()

"""The eval config (validation, --set) and the ``omniframe eval`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from omniframe_eval.evalconfig import (
    EvalConfigError,
    apply_eval_overrides,
    load_eval_config,
)
from omniframe_eval.tests.conftest import write_eval, write_manifest, write_pipeline

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs" / "eval"


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "e.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_shipped_eval_configs_are_valid() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_eval_config(path)
        assert cfg.pipelines, path
    ab = load_eval_config(CONFIGS / "ab.yaml")
    assert [p.name for p in ab.pipelines] == ["mini-omni", "mini-omni-fast", "cascade"]
    assert ab.mode == "realtime" and ab.dataset.name == "spoken_qa"
    mo = ab.pipelines[1]
    assert mo.fallback is not None
    assert "lm.options.model=random://mini-omni" in mo.fallback.overrides
    assert ab.resolve_path(mo.config) == REPO / "configs" / "eval" / ".." / "mini_omni.yaml"


def test_eval_config_errors_name_the_key(tmp_path: Path) -> None:
    base = {"dataset": {"name": "spoken_qa"}, "pipelines": [{"name": "a", "config": "x.yaml"}]}
    with pytest.raises(EvalConfigError, match=r"unknown key 'mdoe'; did you mean 'mode'\?"):
        load_eval_config(_write(tmp_path, {**base, "mdoe": "offline"}))
    with pytest.raises(EvalConfigError, match=r"pipelines\[0\].overides: unknown key "
                                              r"'overides'; did you mean 'overrides'"):
        load_eval_config(_write(tmp_path, {**base, "pipelines": [
            {"name": "a", "config": "x.yaml", "overides": []}]}))
    with pytest.raises(EvalConfigError, match="mode: Input should be 'realtime' or 'offline'"):
        load_eval_config(_write(tmp_path, {**base, "mode": "fast"}))
    with pytest.raises(EvalConfigError, match="dataset: required but missing"):
        load_eval_config(_write(tmp_path, {"pipelines": base["pipelines"]}))
    with pytest.raises(EvalConfigError, match="pipeline names must be unique"):
        load_eval_config(_write(tmp_path, {**base, "pipelines": base["pipelines"] * 2}))
    with pytest.raises(EvalConfigError, match="looks like a pipeline config"):
        load_eval_config(_write(tmp_path, {"pipeline": [{"kind": "source", "plugin": "file"}]}))
    with pytest.raises(EvalConfigError, match="does not exist"):
        load_eval_config(tmp_path / "nope.yaml")


def test_overrides() -> None:
    data = {"mode": "realtime", "dataset": {"name": "spoken_qa"},
            "pipelines": [{"name": "cascade", "config": "c.yaml"},
                          {"name": "e2e", "config": "m.yaml", "overrides": ["a=1"]}]}
    out = apply_eval_overrides(data, [
        "mode=offline", "dataset.options.rates=[160, 180]", "pipelines.e2e.expects_audio=false",
        "pipelines[0].config=other.yaml", "e2e:lm.options.max_new_tokens=32"])
    assert out["mode"] == "offline"
    assert out["dataset"]["options"]["rates"] == [160, 180]
    assert out["pipelines"][1]["expects_audio"] is False
    assert out["pipelines"][0]["config"] == "other.yaml"
    assert out["pipelines"][1]["overrides"] == ["a=1", "lm.options.max_new_tokens=32"]
    assert data["mode"] == "realtime"  # the input is not changed
    with pytest.raises(EvalConfigError, match="no pipeline named 'nope'"):
        apply_eval_overrides(data, ["nope:lm.options.x=1"])
    with pytest.raises(EvalConfigError, match="must look like path=value"):
        apply_eval_overrides(data, ["mode"])


def _cli() -> object:
    from omniframe.cli import _add_plugin_commands, cli

    _add_plugin_commands()
    return cli


def test_eval_command_end_to_end(tiny_audio: Path, tmp_path: Path) -> None:
    man = write_manifest(tiny_audio)
    echo = write_pipeline(tmp_path, "echo")
    ev = write_eval(tmp_path, man, [{"name": "echo", "config": echo.name}], mode="realtime")
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(_cli(), ["eval", str(ev), "--out", str(out), "--report-dir",
                                 str(tmp_path / "docs"), "--mode", "offline", "--limit", "2",
                                 "--no-progress", "--set", "echo:lm.options.prefix=Heard",
                                 "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "echo: 2/2 ok" in res.output
    assert "2 items at once" in res.stderr and "compare them only with runs of the same " \
        "--jobs" in res.stderr
    assert (tmp_path / "docs" / "report.md").exists()
    assert (tmp_path / "docs" / "latency.png").exists()
    assert not (out / "report.md").exists()  # the report went to --report-dir
    rep = json.loads((tmp_path / "docs" / "report.json").read_text())
    assert rep["run"]["mode"] == "offline" and rep["n_items"] == 2
    assert rep["run"]["jobs"] == 2 and rep["pipelines"][0]["jobs"] == [2]
    vb = rep["pipelines"][0]["vocalbench"]
    assert vb["fcl_ms"]["n"] == 2 and vb["fcl_ms"]["p50"] > 0 and vb["rtf"]["n"] == 2
    md = (tmp_path / "docs" / "report.md").read_text()
    assert "as VocalBench names them" in md and "arXiv 2505.15727" in md
    assert rep["pipelines"][0]["per_item"][0]["answer"].startswith("Heard")
    assert len((out / "records.jsonl").read_text().splitlines()) == 2


def test_eval_command_errors_are_one_clear_line(tmp_path: Path) -> None:
    runner = CliRunner()
    p = _write(tmp_path, {"name": "x", "pipeline": [{"kind": "source", "plugin": "file"}]})
    res = runner.invoke(_cli(), ["eval", str(p), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "looks like a pipeline config" in res.output
    p = _write(tmp_path, {"dataset": {"name": "nosuch"},
                          "pipelines": [{"name": "a", "config": "x.yaml"}]})
    res = runner.invoke(_cli(), ["eval", str(p), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "no dataset named 'nosuch'" in res.output
    assert "spoken_qa" in res.output
    p = _write(tmp_path, {"dataset": {"name": "manifest", "options": {"path": "/no/m.jsonl"}},
                          "pipelines": [{"name": "a", "config": "x.yaml"}]})
    res = runner.invoke(_cli(), ["eval", str(p), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "manifest: '/no/m.jsonl' does not exist" in res.output


def test_inline_pipeline_and_a_source_that_cannot_read_files(tiny_audio: Path,
                                                              tmp_path: Path) -> None:
    import anyio
    from omniframe_eval.harness import Harness, HarnessError

    man = write_manifest(tiny_audio)
    inline = {"name": "inline", "pipeline": [
        {"kind": "source", "plugin": "evaltest-file"},
        {"kind": "vad", "plugin": "evaltest-energy"},
        {"kind": "lm", "plugin": "echo"},
        {"kind": "codec", "plugin": "echo"},
    ]}
    synth = {"name": "synth", "pipeline": [{"kind": "source", "plugin": "evaltest-tone"},
                                           {"kind": "vad", "plugin": "evaltest-energy"},
                                           {"kind": "lm", "plugin": "echo"}]}
    ev = write_eval(tmp_path, man, [{"name": "inline", "config": inline}], limit=1)
    rep = anyio.run(Harness(load_eval_config(ev), tmp_path / "run", progress=False).run)
    (inl,) = rep["pipelines"]
    assert inl["ok"] == 1  # no sink in the config: the harness adds a null sink
    assert inl["per_item"][0]["answer"].startswith("I heard")
    # a source the harness cannot feed is a config error: found before any item runs
    ev = write_eval(tmp_path, man, [{"name": "inline", "config": inline},
                                    {"name": "synth", "config": synth}], limit=1)
    with pytest.raises(HarnessError, match="pipeline 'synth': its first stage "
                                           r"\(source:evaltest-tone\) is not a source that "
                                           "reads a file"):
        anyio.run(Harness(load_eval_config(ev), tmp_path / "run2", progress=False).run)
    assert not (tmp_path / "run2").exists()


def test_shipped_echo_eval_runs_on_the_real_audio_plugin(tmp_path: Path) -> None:
    """configs/eval/echo.yaml: spoken_qa (espeak-ng) → file source → energy VAD → echo."""
    from omniframe.plugins import get_registry

    if ("source", "file") not in get_registry().stages:
        pytest.skip("omniframe_audio is not installed")
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(_cli(), ["eval", str(CONFIGS / "echo.yaml"), "--out", str(out),
                                 "--mode", "offline", "--limit", "2", "--no-progress",
                                 "--set", f"dataset.options.cache_dir={tmp_path / 'qa'}"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    (b,) = rep["pipelines"]
    assert (b["ok"], b["failed"]) == (2, 0)
    assert b["per_item"][0]["answer"].startswith("I heard")
    assert b["content"]["meaningful"] is False
    md = (out / "report.md").read_text()
    assert "switched off for this pipeline" in md


def test_help_lists_the_options() -> None:
    res = CliRunner().invoke(_cli(), ["eval", "--help"])
    assert res.exit_code == 0
    for opt in ("--out", "--mode", "--limit", "--resume / --no-resume", "--set",
                "--report-dir", "--jobs N"):
        assert opt in res.output


def test_help_documents_the_exit_status() -> None:
    res = CliRunner().invoke(_cli(), ["eval", "--help"])
    text = " ".join(res.output.split())
    assert "Exit status: 0 every item of every pipeline ran ok" in text
    assert "1 the run finished, but some items failed" in text
    assert "2 bad command line or config" in text


def test_a_pipeline_config_error_fails_before_any_item_runs(tiny_audio: Path,
                                                             tmp_path: Path) -> None:
    """``--set echo:lm.options.nope=1`` used to fail every item and still exit 0."""
    man = write_manifest(tiny_audio)
    echo = write_pipeline(tmp_path, "echo")
    ev = write_eval(tmp_path, man, [
        {"name": "echo", "config": echo.name},
        {"name": "fb", "config": echo.name, "fallback": {"overrides": ["lm.options.x=1"]}}])
    out = tmp_path / "run"
    res = CliRunner().invoke(_cli(), ["eval", str(ev), "--out", str(out), "--no-progress",
                                      "--set", "echo:lm.options.nope=1"])
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    assert "pipeline 'echo'" in res.stderr and "unknown key 'nope'" in res.stderr
    assert "pipeline 'fb' with its fallback" in res.stderr and "unknown key 'x'" in res.stderr
    assert not out.exists()  # nothing ran, no records


def test_failed_items_make_a_nonzero_exit(tiny_audio: Path, tmp_path: Path) -> None:
    rows = [{"id": "good", "audio": str(tiny_audio / "hello.wav"),
             "transcript": "please say the word hello"},
            {"id": "missing", "audio": str(tmp_path / "nowhere.wav"), "transcript": "x"}]
    man = write_manifest(tmp_path, rows)
    echo = write_pipeline(tmp_path, "echo")
    ev = write_eval(tmp_path, man, [{"name": "echo", "config": echo.name}])
    res = CliRunner().invoke(_cli(), ["eval", str(ev), "--out", str(tmp_path / "run"),
                                      "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "echo: 1/2 ok" in res.stderr
    assert "error: 1 of 2 item runs failed" in res.stderr
    assert (tmp_path / "run" / "report.md").exists()  # the report is still written


def test_eval_command_line_problems_exit_2(tiny_audio: Path, tmp_path: Path) -> None:
    man = write_manifest(tiny_audio)
    echo = write_pipeline(tmp_path, "echo")
    ev = write_eval(tmp_path, man, [{"name": "echo", "config": echo.name}])
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["--out", str(afile / "run")], "--out: cannot make"),
        (["--out", str(afile)], "is a file"),
        (["--report-dir", str(afile / "r")], "--report-dir: cannot make"),
        (["--out", "a", "--out", "b"], "given 2 times"),
        (["--set", "pipelines[abc].name=x"], "index [abc] is not a number"),
        (["--set", "pipelines[7].name=x"], "there are 1 pipelines"),
        (["--set", "mode"], "must look like path=value"),
        (["--jobs", "0"], "Invalid value for '--jobs': 0 is not in the range x>=1"),
        (["--jobs", "many"], "Invalid value for '--jobs': 'many' is not a valid integer"),
        (["--set", "jobs=0"], "jobs is how many items run at once"),
    ]
    for args, expected in cases:
        res = CliRunner().invoke(_cli(), ["eval", str(ev), "--no-progress", *args])
        assert res.exit_code == 2, (args, res.output)
        assert expected in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.output


@pytest.mark.parametrize(("content", "expected"), [
    ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    (b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + b"".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n".encode()
        for p, c in zip("abcdef", "bcdefg", strict=True)), "alias bomb"),
    (b"name: a\nname: b\n", "duplicate key 'name'"),
    (b"- just\n- a list\n", "expected a mapping with 'dataset' and 'pipelines', got list"),
    (b"", "the file is empty"),
])
def test_hostile_eval_config_files(tmp_path: Path, content: bytes, expected: str) -> None:
    p = tmp_path / "e.yaml"
    p.write_bytes(content)
    with pytest.raises(EvalConfigError, match=expected):
        load_eval_config(p)
    with pytest.raises(EvalConfigError, match="is a folder"):
        load_eval_config(tmp_path)


@given(override=st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from(list("pipelines[]0123.=:abmode x")), max_size=30)))
def test_any_eval_override_is_applied_or_explained(override: str) -> None:
    data = {"mode": "realtime", "dataset": {"name": "spoken_qa"},
            "pipelines": [{"name": "a", "config": "c.yaml"}, "not a mapping"]}
    try:
        out = apply_eval_overrides(data, [override])
    except EvalConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(out, dict)


@pytest.mark.parametrize(("content", "expected"), [
    (b"- a\n- list\n", "holds a list, not a mapping with a 'pipeline' list"),
    (b"just text\n", "holds a str, not a mapping"),
    ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    (b"pipeline: &a [*a]\n", "recursive"),
])
def test_a_hostile_pipeline_file_stops_the_eval_up_front(tiny_audio: Path, tmp_path: Path,
                                                         content: bytes, expected: str) -> None:
    man = write_manifest(tiny_audio)
    (tmp_path / "bad.yaml").write_bytes(content)
    ev = write_eval(tmp_path, man, [{"name": "bad", "config": "bad.yaml"}])
    res = CliRunner().invoke(_cli(), ["eval", str(ev), "--out", str(tmp_path / "run"),
                                      "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "pipeline 'bad'" in res.stderr and expected in res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "run").exists()


def test_first_ctrl_c_ends_an_eval_within_2_s_keeping_finished_items(tmp_path: Path) -> None:
    """Issue 11: a real ``omniframe eval`` process (real time replay), SIGINT mid-run."""
    import shutil
    import sys

    from omniframe.testing import interrupt_when

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    out = tmp_path / "run"
    records = out / "records.jsonl"

    def first_item_done(_: str) -> bool:  # the second item then plays in real time
        return records.exists() and bool(records.read_text())

    got = interrupt_when(
        [sys.executable, "-m", "omniframe", "eval", str(CONFIGS / "echo.yaml"), "--out",
         str(out), "--limit", "3", "--no-progress",
         "--set", f"dataset.options.cache_dir={tmp_path / 'qa'}"], first_item_done)
    code, elapsed, text = got.code, got.elapsed, got.output
    assert code == 130, text
    assert elapsed < 2.0
    assert "interrupted: finished items are saved" in text and "Traceback" not in text
    assert json.loads((out / "records.jsonl").read_text().splitlines()[0])["status"] == "ok"

"""The text source (``source: text``): typed turns for text-input LMs, end to end through
omniframe.config (issue 10)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from omniframe.config import ConfigError, build_pipeline, load_config, parse_config
from omniframe.frames import EndOfTurnFrame, TextDeltaFrame, TranscriptFrame
from omniframe.pipeline import StageError
from omniframe.plugins import get_registry
from omniframe.resources import Resources

pytestmark = pytest.mark.anyio

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def echo_config(**source_options: object) -> dict:
    return {"name": "typed", "pipeline": [
        {"kind": "source", "plugin": "text", "options": source_options},
        {"kind": "lm", "plugin": "echo"},
        {"kind": "sink", "plugin": "text", "options": {"path": None}},
    ]}


async def run(data: dict):
    cfg = parse_config(data, "test")
    pipeline = build_pipeline(cfg, source="test", resources=Resources())
    with anyio.fail_after(60):
        return await pipeline.run()


def test_registered_with_its_input_option() -> None:
    cls = get_registry().stage("source", "text")
    assert cls.input_option == "path"
    assert cls.produces == (TranscriptFrame,)
    assert "text" in cls.Options.model_fields


async def test_one_turn_per_text_through_the_echo_lm() -> None:
    result = await run(echo_config(text=["hello there", "  and again "]))
    assert [(t.turn, t.transcript, t.text) for t in result.turns] == [
        (1, "hello there", "You said: hello there"), (2, "and again", "You said: and again")]
    ends = [f for f in result.frames if isinstance(f, EndOfTurnFrame)]
    assert [(e.turn, e.reason) for e in ends] == [(1, "completed"), (2, "completed")]


async def test_a_single_string_is_one_turn() -> None:
    result = await run(echo_config(text="hi"))
    assert result.text() == "You said: hi" and len(result.turns) == 1


async def test_path_gives_one_turn_per_line_and_wins_over_text(tmp_path: Path) -> None:
    questions = tmp_path / "q.txt"
    questions.write_text("first question\n\n  second one  \n", encoding="utf-8")
    result = await run(echo_config(text="ignored", path=str(questions)))
    assert [t.transcript for t in result.turns] == ["first question", "second one"]


async def test_missing_or_unreadable_text_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="nothing to say.*source.options.text"):
        await run(echo_config())
    wav = tmp_path / "q.wav"
    wav.write_bytes(b"RIFF\xff\xfe\x00\x80WAVE")
    with pytest.raises(StageError, match="not a UTF-8 text file"):
        await run(echo_config(path=str(wav)))


def test_blank_text_is_refused_when_the_config_is_read() -> None:
    for text in ("", "   ", [], ["ok", " "]):
        with pytest.raises(ConfigError, match="text"):
            build_pipeline(parse_config(echo_config(text=text), "test"))


def test_cli_run_with_set_and_input(tmp_path: Path) -> None:
    """``--set source.options.text=...`` today; ``--input FILE`` routes to ``path``."""
    from omniframe.cli import cli

    cfg = tmp_path / "typed.yaml"
    cfg.write_text("pipeline:\n  - {kind: source, plugin: text}\n  - {kind: lm, plugin: echo}\n"
                   "  - {kind: sink, plugin: text}\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["run", str(cfg), "--set", "source.options.text=good morning"])
    assert res.exit_code == 0, res.output
    assert "You said: good morning" in res.stdout
    questions = tmp_path / "q.txt"
    questions.write_text("from a file\n")
    res = runner.invoke(cli, ["run", str(cfg), "--input", str(questions)])
    assert res.exit_code == 0, res.output
    assert "You said: from a file" in res.stdout


def test_cli_text_option_gives_one_turn_each(tmp_path: Path) -> None:
    from omniframe.cli import cli

    cfg = tmp_path / "typed.yaml"
    cfg.write_text("pipeline:\n  - {kind: source, plugin: text}\n  - {kind: lm, plugin: echo}\n"
                   "  - {kind: sink, plugin: text}\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["run", str(cfg), "--text", "one, two", "--text", 'say "three"'])
    assert res.exit_code == 0, res.output
    assert "You said: one, two" in res.stdout and 'You said: say "three"' in res.stdout
    # a pipeline whose source reads audio: a message, not a traceback
    res = runner.invoke(cli, ["run", "--text", "hello"])
    assert res.exit_code == 2
    assert "does not read text" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["run", str(cfg), "--text", "a", "--input", str(cfg)])
    assert res.exit_code == 2 and "not both" in res.output


# ------------------------------------------------------------------------------ Mini-Omni


@pytest.fixture
def one_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: OpenMP spinning slows 2 threads a lot
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
async def test_mini_omni_t1t2_config_answers_typed_text() -> None:
    cfg = load_config(CONFIGS / "mini_omni_t1t2.yaml", [
        'source.options.text=["hello", "how are you"]',
        "lm.options.model=random://tiny", "lm.options.max_new_tokens=6",
    ])
    assert [s.plugin for s in cfg.pipeline] == ["text", "mini-omni", "text"]
    pipeline = build_pipeline(cfg, source="t1t2", resources=Resources())
    with anyio.fail_after(120):
        result = await pipeline.run()
    ends = [f for f in result.frames if isinstance(f, EndOfTurnFrame)]
    assert [(e.turn, e.reason) for e in ends] == [(1, "max_tokens"), (2, "max_tokens")]
    for turn in (1, 2):
        deltas = [f for f in result.frames if isinstance(f, TextDeltaFrame) and f.turn == turn]
        assert deltas  # the random model answers each turn with text
    assert [t.transcript for t in result.turns] == ["hello", "how are you"]


def test_mini_omni_t1a2_config_reads_text() -> None:
    cfg = load_config(CONFIGS / "mini_omni_t1a2.yaml")
    pipeline = build_pipeline(cfg, source="t1a2", resources=Resources())
    assert [(s.kind, s.name) for s in pipeline.stages] == [
        ("source", "text"), ("lm", "mini-omni"), ("codec", "snac"), ("sink", "wav"),
        ("sink", "text")]
    assert pipeline.stages[1].options.task == "T1A2"

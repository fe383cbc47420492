"""Open stage kinds: labels, the processor kind, default names, sinks forwarding by attribute."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from omniframe import hookimpl
from omniframe.config import ConfigError, apply_overrides, build_pipeline, parse_config
from omniframe.frames import EndOfTurnFrame, Frame, TextDeltaFrame, UserTurnFrame
from omniframe.plugins import PluginError, get_registry, register_plugin, unregister_plugin
from omniframe.stage import KINDS, Stage, StageOptions, is_kind
from omniframe.testing import make_stage, run_frames

DEMO = Path(__file__).resolve().parents[1] / "omniframe" / "configs" / "demo.yaml"


# A processor a plugin author writes: a streaming text filter between the LM and the codec.
class Bleep(Stage):
    """Replaces one word of the answer text, delta by delta."""

    kind = "processor"
    name = "bleep"
    consumes = (TextDeltaFrame,)
    produces = (TextDeltaFrame,)

    class Options(StageOptions):
        word: str = "heard"
        replacement: str = "****"

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, TextDeltaFrame)
        yield TextDeltaFrame(text=frame.text.replace(self.options.word,
                                                     self.options.replacement))


class Guard(Stage):
    """A stage of a kind omniframe does not know: kinds are open."""

    kind = "guardrail"
    name = "guard"
    consumes = (UserTurnFrame,)
    produces = (UserTurnFrame,)
    forward_consumed = True


@pytest.fixture
def filters() -> object:
    plugin = SimpleNamespace(register_stages=hookimpl(
        lambda register: [register(Bleep), register(Guard)]))
    register_plugin(plugin, "filters")
    yield plugin
    unregister_plugin("filters")


def demo_with(*extra: dict[str, object], at: int = 3) -> dict[str, object]:
    data = yaml.safe_load(DEMO.read_text())
    data["pipeline"][at:at] = list(extra)
    return data


def test_well_known_kinds_and_identifiers() -> None:
    assert KINDS == ("source", "vad", "encoder", "lm", "processor", "codec", "sink")
    assert is_kind("guardrail") and is_kind("my_filter2")
    assert not any(is_kind(k) for k in ("", "my kind", "a-b", "2x", None, 3))


def test_a_plugin_may_define_its_own_kind(filters: object) -> None:
    reg = get_registry()
    assert reg.stage("guardrail", "guard") is Guard
    assert reg.kinds()[:len(KINDS)] == list(KINDS) and "guardrail" in reg.kinds()
    cfg = parse_config(demo_with({"kind": "guardrail", "plugin": "guard"}, at=2))
    assert cfg.stage_names() == ["source", "vad", "guardrail", "lm", "codec", "sink"]
    assert build_pipeline(cfg).stages[2].kind == "guardrail"


def test_a_kind_must_be_an_identifier() -> None:
    class Bad(Stage):
        kind = "not a kind"
        name = "bad"

    register_plugin(SimpleNamespace(register_stages=hookimpl(lambda register: register(Bad))),
                    "badkind")
    try:
        with pytest.raises(PluginError, match="has kind 'not a kind'; a kind is an identifier"):
            get_registry()
    finally:
        unregister_plugin("badkind")
    with pytest.raises(ConfigError, match="is not an identifier"):
        parse_config({"pipeline": [{"kind": "not a kind", "plugin": "x"}]})


def test_the_first_stage_of_a_kind_keeps_the_kind_as_its_name() -> None:
    data = demo_with({"kind": "lm", "plugin": "echo", "name": "second"},
                     {"kind": "lm", "plugin": "other"}, at=3)
    assert parse_config(data).stage_names() == [
        "source", "vad", "lm", "second", "other", "codec", "sink"]
    sinks = demo_with({"kind": "sink", "plugin": "text"}, at=5)
    assert parse_config(sinks).stage_names()[-2:] == ["sink", "text"]
    # a stage's plugin name still reaches it when no stage has that name and it is the only one
    out = apply_overrides(sinks, ["wav.options.path=x.wav", "text.options.path=-"])
    assert out["pipeline"][4]["options"] == {"path": "x.wav"}


def test_sinks_pass_on_what_they_consume_by_attribute() -> None:
    class Quiet(Stage):
        kind = "sink"
        name = "quiet"

    class Silent(Quiet):
        forward_consumed = False

    class NotASink(Stage):
        kind = "processor"
        name = "p"

    assert Quiet.forward_consumed and not Silent.forward_consumed
    assert not NotASink.forward_consumed
    reg = get_registry()
    assert all(cls.forward_consumed for (k, _), cls in reg.stages.items() if k == "sink")


@pytest.mark.anyio
async def test_a_sink_that_opts_out_does_not_forward() -> None:
    class Swallow(Stage):
        kind = "sink"
        name = "swallow"
        consumes = (TextDeltaFrame,)
        forward_consumed = False

        async def process(self, frame: Frame) -> AsyncIterator[Frame]:
            return
            yield  # pragma: no cover

    result = await run_frames([make_stage(Swallow)], [TextDeltaFrame(text="x", turn=1)])
    assert not any(isinstance(f, TextDeltaFrame) for f in result.frames or [])


def test_a_processor_between_lm_and_codec_from_yaml(filters: object, tmp_path: Path) -> None:
    """The issue's plugin author: a text filter between the LM and the codec. The turn's text
    is the filtered one (what reached the codec), --set lm.options still reaches the LM."""
    from omniframe.cli import cli

    cfg = tmp_path / "filtered.yaml"
    cfg.write_text(yaml.safe_dump(demo_with({"kind": "processor", "plugin": "bleep"})))
    res = CliRunner().invoke(cli, ["run", str(cfg), "--json", "-o", str(tmp_path / "a.wav"),
                                   "--set", "lm.options.prefix=unused",
                                   "--set", "processor.options.replacement=(beep)"])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    turns = [e for e in events if e["event"] == "turn"]
    assert [t["text"] for t in turns] == ["I (beep) 1.9 seconds of speech.",
                                          "I (beep) 1.4 seconds of speech."]
    assert all(t["voice_to_voice_s"] is not None for t in turns)
    run = next(e for e in events if e["event"] == "run")
    assert list(run["stages"]) == ["source", "vad", "lm", "processor", "codec", "sink"]
    assert all(set(t["stage_busy_s"]) == set(run["stages"]) for t in turns)


@pytest.mark.anyio
async def test_end_of_turn_passes_a_processor(filters: object) -> None:
    result = await run_frames([make_stage(Bleep)], [
        TextDeltaFrame(text="I heard", turn=1), EndOfTurnFrame(turn=1)])
    assert result.turns[0].text == "I ****"

"""Configs: two-phase validation, error messages with YAML paths, overrides, schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from omniframe.config import (
    ConfigError,
    PipelineConfig,
    apply_overrides,
    build_pipeline,
    config_schema,
    load_config,
    parse_config,
    resolve_stages,
)

ECHO = {
    "name": "t",
    "pipeline": [
        {"kind": "source", "plugin": "synth"},
        {"kind": "vad", "plugin": "energy"},
        {"kind": "lm", "plugin": "echo", "options": {"prefix": "> "}},
        {"kind": "codec", "plugin": "echo"},
        {"kind": "sink", "plugin": "null"},
    ],
}


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(exc.value.problems)


def test_outer_shape_errors_give_paths() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"pipeline": [{"kind": "lm", "plugn": "echo"}], "buffr": 3})
    p = problems(info)
    assert "unknown key 'buffr'; did you mean 'buffer'?" in p["buffr"]
    assert "unknown key 'plugn'" in p["pipeline[0].plugn"]
    assert p["pipeline[0].plugin"] == "required but missing"


def test_bare_null_plugin_is_explained() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_load("pipeline:\n  - {kind: sink, plugin: null}\n"))
    assert "plugin: 'null' (quoted)" in problems(info)["pipeline[0].plugin"]


def test_wrong_kind_and_empty_pipeline() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"pipeline": [{"kind": "my brain", "plugin": "echo"}]})
    assert "is not an identifier; use one of source" in problems(info)["pipeline[0].kind"]
    cfg = parse_config({"pipeline": [{"kind": "brain", "plugin": "echo"}]})  # kinds are open
    with pytest.raises(ConfigError) as info:
        resolve_stages(cfg)
    assert "unknown stage kind 'brain': no installed stage has it" in problems(info)[
        "pipeline[0].plugin"]
    with pytest.raises(ConfigError) as info:
        parse_config({"pipeline": []})
    assert "pipeline" in problems(info)
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["not", "a", "mapping"])


def test_phase_two_misspelled_option_and_unknown_plugin() -> None:
    data = yaml.safe_load(yaml.safe_dump(ECHO))
    data["pipeline"][2]["options"] = {"prefx": "x"}
    data["pipeline"][3]["plugin"] = "ecko"
    with pytest.raises(ConfigError) as info:
        resolve_stages(parse_config(data))
    p = problems(info)
    assert "unknown key 'prefx'; did you mean 'prefix'?" in p["pipeline[2].options.prefx"]
    assert "no codec stage named 'ecko'. Did you mean 'echo'?" in p["pipeline[3].plugin"]


def test_wrong_option_type() -> None:
    data = yaml.safe_load(yaml.safe_dump(ECHO))
    data["pipeline"][2]["options"] = {"token_delay_s": "soon"}
    with pytest.raises(ConfigError) as info:
        resolve_stages(parse_config(data))
    assert "'soon'" in problems(info)["pipeline[2].options.token_delay_s"]


def test_mismatched_stages_name_both() -> None:
    data = {"pipeline": [{"kind": "source", "plugin": "synth"},
                         {"kind": "codec", "plugin": "echo"},
                         {"kind": "lm", "plugin": "echo"}]}
    with pytest.raises(ConfigError) as info:
        build_pipeline(parse_config(data))
    msg = str(info.value)
    assert "stage 'codec' (codec: echo) consumes TextDeltaFrame" in msg
    assert "'source' (source: synth)" in msg


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("pipeline:\n  - kind: source\n    plugin: [synth\n")
    with pytest.raises(ConfigError, match="line 4"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(tmp_path / "empty.yaml")


def test_overrides() -> None:
    data = apply_overrides(ECHO, ["lm.options.prefix=hi", "buffer=4", "sink.options={}",
                                  "pipeline[3].options.sample_rate=16000"])
    cfg = parse_config(data)
    assert cfg.pipeline[2].options == {"prefix": "hi"}
    assert cfg.buffer == 4
    assert cfg.pipeline[3].options["sample_rate"] == 16000
    assert ECHO["pipeline"][2]["options"] == {"prefix": "> "}  # input untouched
    with pytest.raises(ConfigError, match="no stage named 'llm'; did you mean 'lm'"):
        apply_overrides(ECHO, ["llm.options.prefix=x"])
    with pytest.raises(ConfigError, match="path=value"):
        apply_overrides(ECHO, ["lm.options.prefix"])


def test_stage_names_default_to_kind_then_plugin() -> None:
    data = yaml.safe_load(yaml.safe_dump(ECHO))
    data["pipeline"].append({"kind": "sink", "plugin": "wav", "options": {"path": "x.wav"}})
    cfg = parse_config(data)
    assert cfg.stage_names() == ["source", "vad", "lm", "codec", "sink", "wav"]


scalars = st.one_of(st.integers(-10**6, 10**6), st.booleans(),
                    st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]),
                            min_size=1, max_size=12))


@given(value=scalars)
def test_override_round_trip(value: object) -> None:
    """A value set with --set comes back identical after YAML dump and reload."""
    data = apply_overrides(ECHO, [f"lm.options.prefix={yaml.safe_dump(value).strip()}"
                                  .replace("\n...", "")])
    cfg = parse_config(data)
    again = parse_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.pipeline[2].options["prefix"] == value


@given(buffer=st.integers(1, 1000), name=st.text(min_size=1, max_size=20),
       device=st.sampled_from(["cpu", "cuda", "cuda:1"]))
def test_config_yaml_round_trip(buffer: int, name: str, device: str) -> None:
    cfg = parse_config({**ECHO, "buffer": buffer, "name": name, "device": device})
    assert parse_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert PipelineConfig.model_validate(cfg.model_dump()) == cfg


def test_schema_has_every_stage_and_forbids_extras() -> None:
    schema = config_schema()
    text = str(schema)
    for name in ("echo", "energy", "wav"):
        assert f"'const': '{name}'" in text
    assert schema["additionalProperties"] is False


def test_repository_configs_validate() -> None:
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "configs").glob("*.yaml"))
    files.append(root / "omniframe" / "configs" / "demo.yaml")
    for f in files:
        cfg = load_config(f)
        resolve_stages(cfg, str(f))

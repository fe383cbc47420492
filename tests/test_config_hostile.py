"""Hostile configs and ``--set`` values: every bad input is a :class:`ConfigError` with a short,
readable message, never a traceback, a hang or gigabytes of memory."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from omniframe.config import (
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    ConfigError,
    PipelineConfig,
    apply_overrides,
    load_config,
    parse_config,
    parse_yaml,
    read_yaml,
    resolve_stages,
)

ECHO: dict[str, Any] = {
    "name": "t",
    "pipeline": [
        {"kind": "source", "plugin": "synth"},
        {"kind": "vad", "plugin": "energy"},
        {"kind": "lm", "plugin": "echo", "options": {"prefix": "> "}},
        {"kind": "codec", "plugin": "echo"},
        {"kind": "sink", "plugin": "null"},
    ],
}


def laughs(levels: int, width: int = 9) -> str:
    """The "billion laughs" alias bomb: ``width ** levels`` strings from a few hundred bytes."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    body = "".join(f"        {line}\n" for line in lines)
    return ("pipeline:\n  - kind: lm\n    plugin: echo\n    options:\n      prefix:\n" + body)


def one_problem(info: pytest.ExceptionInfo[ConfigError]) -> str:
    assert len(info.value.problems) == 1
    return info.value.problems[0][1]


# --------------------------------------------------------------------------- YAML limits


def test_billion_laughs_is_refused_quickly_with_a_short_message(tmp_path: Path) -> None:
    f = tmp_path / "bomb.yaml"
    f.write_text(laughs(9))  # 9**9 = 387 million strings once expanded
    assert f.stat().st_size < 700
    with pytest.raises(ConfigError) as info:
        load_config(f)
    msg = str(info.value)
    assert "alias bomb" in msg and "line " in msg
    assert len(msg) < 500


def test_a_smaller_alias_bomb_is_refused_too() -> None:
    # 9**6 = 531441 strings: small enough to build, but a 34 MB error message before
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_yaml(laughs(6))


def test_aliases_within_the_budget_still_work() -> None:
    data = parse_yaml("base: &b {prefix: hi}\npipeline:\n  - {kind: lm, plugin: echo, "
                      "options: *b}\n  - {kind: lm, plugin: echo, options: *b}\n")
    assert data["pipeline"][1]["options"] == {"prefix": "hi"}
    merged = parse_yaml("base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  b: 3\n")
    assert merged["x"] == {"a": 1, "b": 3}  # a merge key is not a duplicate key


@given(levels=st.integers(1, 7), width=st.integers(1, 9))
def test_alias_expansion_is_refused_exactly_past_the_budget(levels: int, width: int) -> None:
    """Nodes: each level is a list node plus ``width`` copies of the level below."""
    nodes = 1 + width  # level 0: the list and its strings
    for _ in range(1, levels):
        nodes = 1 + width * nodes
    text = laughs(levels, width)
    if nodes * 1.05 + 20 < MAX_YAML_NODES:
        assert parse_yaml(text)["pipeline"][0]["plugin"] == "echo"
    elif nodes > MAX_YAML_NODES:
        with pytest.raises(ConfigError, match="expands to more than"):
            parse_yaml(text)


def test_recursive_alias_and_deep_nesting_are_refused() -> None:
    with pytest.raises(ConfigError, match="recursive"):
        parse_yaml("pipeline: &a [*a]\n")
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_YAML_DEPTH}"):
        parse_yaml("pipeline: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_YAML_DEPTH}"):
        parse_yaml("pipeline: " + "{a: " * 5000 + "1" + "}" * 5000)
    # depth through aliases: each anchor nests the previous one 40 levels deeper
    deep = "[" * 40 + "1" + "]" * 40
    text = f"a: &a {deep}\nb: &b {deep.replace('1', '*a')}\n"
    with pytest.raises(ConfigError, match="once aliases are expanded"):
        parse_yaml(text)
    assert parse_yaml("x: " + "[" * 30 + "]" * 30) is not None


def test_duplicate_keys_are_refused_with_both_lines() -> None:
    with pytest.raises(ConfigError) as info:
        parse_yaml("pipeline:\n  - {kind: source, plugin: synth}\nname: a\n"
                   "pipeline:\n  - {kind: lm, plugin: echo}\n")
    assert info.value.problems[0][0] == "line 4, column 1"
    assert "duplicate key 'pipeline' (first on line 1)" in one_problem(info)
    with pytest.raises(ConfigError, match="duplicate key 'prefix'"):
        parse_yaml("options: {prefix: a, prefix: b}")


@pytest.mark.parametrize(("text", "expected"), [
    ("pipeline:\n\t- {kind: source}\n", "replace the tabs"),
    ("pipeline: []\n---\nname: b\n", "remove the '---' line"),
    ("pipeline: [a\n", "line 2"),
    ("a: b: c\n", "line 1, column 5"),
    ("!!python/object:os.system {}\n", "could not determine a constructor"),
])
def test_yaml_syntax_problems_say_where_and_what(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text)
    assert expected in str(info.value)
    assert "\n" not in one_problem(info)


# ------------------------------------------------------------------------------ files


def test_file_problems_are_one_line_each(tmp_path: Path) -> None:
    cases: dict[str, tuple[bytes | None, str]] = {
        "latin1.yaml": ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at "
                                                            "offset 9); save the file as UTF-8"),
        "junk.yaml": (bytes(range(256)) * 4, "binary file"),
        "empty.yaml": (b"", "the file is empty"),
        "comment.yaml": (b"# just a comment\n", "the file is empty"),
        "folder.yaml": (None, "is a folder"),
        "missing.yaml": (None, "does not exist"),
    }
    (tmp_path / "folder.yaml").mkdir()
    for name, (content, expected) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / name)
        assert expected in str(info.value), name
        assert len(str(info.value).splitlines()) == 2, name


def test_a_utf8_bom_and_crlf_line_ends_are_fine(tmp_path: Path) -> None:
    f = tmp_path / "windows.yaml"
    f.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(ECHO).replace("\n", "\r\n").encode())
    assert load_config(f).name == "t"


def test_a_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    f = tmp_path / "big.yaml"
    with f.open("wb") as out:
        out.write(b"name: x\n")
        out.truncate(64 * 2**20)
    with pytest.raises(ConfigError, match="MiB; a config is a few KB"):
        read_yaml(f)


@pytest.mark.parametrize(("text", "kind"), [("hello\n", "str"), ("- a\n- b\n", "list"),
                                            ("42\n", "int")])
def test_a_yaml_that_is_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"expected a mapping with a 'pipeline' list, got "
                                          f"{kind}"):
        load_config(f)
    with pytest.raises(ConfigError, match=f"the config is a {kind}, not a mapping"):
        load_config(f, ["lm.options.prefix=1"])


# ------------------------------------------------------------------------ long values


def test_error_messages_cut_long_values() -> None:
    data = copy.deepcopy(ECHO)
    data["pipeline"][2]["options"] = {"token_delay_s": "x" * 1_000_000}
    with pytest.raises(ConfigError) as info:
        resolve_stages(parse_config(data))
    msg = one_problem(info)
    assert "… (1000002 chars)" in msg and len(msg) < 400
    with pytest.raises(ConfigError) as info:
        parse_config({**ECHO, "name": list(range(100_000))})
    assert "chars)" in one_problem(info) and len(str(info.value)) < 600
    with pytest.raises(ConfigError) as info:
        apply_overrides(ECHO, ["y" * 100_000 + ".options.x=1"])
    assert len(str(info.value)) < 1_000


# ---------------------------------------------------------------------------- device


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12", "mps", "xpu:1", "meta",
                                    "cpu:0", "hip", "privateuseone"])
def test_devices_torch_accepts(device: str) -> None:
    assert parse_config({**ECHO, "device": device}).device == device


@pytest.mark.parametrize("device", ["tpu", "auto", "CUDA", "cuda:", "cuda:-1", "cuda:01",
                                    " cuda", "cuda:1:2", "gpu", ""])
def test_devices_torch_refuses_are_refused_at_validation(device: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**ECHO, "device": device})
    msg = dict(info.value.problems)["device"]
    assert "is not a torch device; use cpu, cuda, cuda:N" in msg
    assert "Value error" not in msg


def test_device_regex_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    for device in ["cpu", "cuda:3", "mps", "xla:1", "tpu", "cuda:01", "cuda:", "vulkan",
                   "mtia:0", "npu", "hpu:2", "cuda:-1", "Cpu"]:
        try:
            torch.device(device)
            accepted = True
        except RuntimeError:
            accepted = False
        try:
            PipelineConfig.model_validate({**ECHO, "device": device})
            ours = True
        except Exception:
            ours = False
        assert ours == accepted, device


# ------------------------------------------------------------------------------ --set


@pytest.mark.parametrize(("override", "expected"), [
    ("pipeline[abc].x=1", "index [abc] is not a number; write e.g. pipeline[2]"),
    ("pipeline[].x=1", "index [] is not a number"),
    ("pipeline[-1].x=1", "index [-1] is not a number"),
    ("pipeline[9].options.x=1", "the pipeline has 5 stages: pipeline[0] to pipeline[4]"),
    ("pipeline[1=1", "unbalanced [ ]"),
    ("pipeline]1[.x=1", "unbalanced [ ]"),
    ("lm..prefix=1", "empty key in the path"),
    ("lm.options.=1", "empty key in the path"),
    (".lm=1", "empty key in the path"),
    ("=1", "empty path before '='"),
    ("lm.options.prefix", "must look like path=value"),
    ("lm=1", "say what to set"),
    ("pipeline[2]=1", "say what to set"),
    ("llm.options.prefix=x", "no stage named 'llm'; did you mean 'lm'?"),
    ("pipeline.x=1", "pipeline is a list, not a mapping"),
    ("lm.kind.x=1", "lm.kind is a str, not a mapping"),
    ("lm.options.prefix[0]=1", "lm.options.prefix is not a list"),
])
def test_bad_override_paths_are_explained(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(ECHO, [override])
    assert expected in str(info.value)


def test_override_into_an_empty_mapping_is_kept() -> None:
    """``options:`` with nothing after it is null in YAML; a value set inside it was lost."""
    data = parse_yaml("pipeline:\n  - kind: lm\n    plugin: echo\n    options:\n")
    out = apply_overrides(data, ["lm.options.prefix=hi"])
    assert out["pipeline"][0]["options"] == {"prefix": "hi"}


def test_override_list_items_and_stage_index() -> None:
    data = copy.deepcopy(ECHO)
    data["pipeline"][2]["options"]["stops"] = ["a", "b"]
    out = apply_overrides(data, ["lm.options.stops[1]=c", "pipeline[ 0 ].options.x=1"])
    assert out["pipeline"][2]["options"]["stops"] == ["a", "c"]
    assert out["pipeline"][0]["options"] == {"x": 1}
    with pytest.raises(ConfigError, match=r"\[5\]: lm.options.stops has 2 items"):
        apply_overrides(data, ["lm.options.stops[5]=c"])


def test_override_without_a_pipeline_list() -> None:
    with pytest.raises(ConfigError, match="the config has no 'pipeline' list"):
        apply_overrides({"name": "x"}, ["lm.options.prefix=1"])
    with pytest.raises(ConfigError, match="no 'pipeline' list to index"):
        apply_overrides({"name": "x"}, ["pipeline[0].plugin=echo"])
    assert apply_overrides({"name": "x"}, ["name=y"]) == {"name": "y"}


def test_an_alias_bomb_in_a_set_value_is_refused() -> None:
    bomb = "{" + ", ".join(line.strip() for line in laughs(9).split("prefix:\n", 1)[1]
                           .splitlines()) + "}"
    with pytest.raises(ConfigError, match="alias bomb"):
        apply_overrides(ECHO, [f"lm.options.prefix={bomb}"])


def test_set_errors_name_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(ECHO))
    with pytest.raises(ConfigError, match=f"invalid config in {f}"):
        load_config(f, ["pipeline[x].y=1"])


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20,
)
path_text = st.text(alphabet=st.sampled_from(list("lmpipeline[]0123.=x -_:")), max_size=30)


@given(override=st.one_of(path_text, st.text(max_size=40),
                          st.builds(lambda p, v: f"{p}={v}", path_text, st.text(max_size=20))))
def test_any_override_on_a_valid_config_is_applied_or_explained(override: str) -> None:
    try:
        out = apply_overrides(ECHO, [override])
    except ConfigError as exc:
        assert str(exc).startswith("invalid config")
        return
    assert isinstance(out, dict)


@given(data=json_like, override=st.one_of(path_text, st.text(max_size=30)))
def test_any_override_on_any_data_is_applied_or_explained(data: Any, override: str) -> None:
    with contextlib.suppress(ConfigError):
        apply_overrides(data, [override])


@given(data=st.dictionaries(st.text(max_size=8), json_like, max_size=5))
def test_yaml_round_trip_through_the_bounded_loader(data: dict[str, Any]) -> None:
    assert parse_yaml(yaml.safe_dump(data)) == data


@given(text=st.text(max_size=200))
def test_any_text_parses_or_is_explained(text: str) -> None:
    try:
        parse_yaml(text)
    except ConfigError as exc:
        assert len(exc.problems) == 1
        assert "\n" not in exc.problems[0][1]


@given(key=st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]), min_size=1,
                   max_size=10),
       value=st.one_of(st.integers(), st.booleans(), st.text(
           alphabet=st.characters(codec="ascii", categories=["L", "N"]), max_size=10)))
def test_set_then_read_back(key: str, value: object) -> None:
    """A key set through a stage name lands in that stage's options, and nowhere else."""
    out = apply_overrides(ECHO, [f"codec.options.{key}={yaml.safe_dump(value).strip()}"
                                 .replace("\n...", "")])
    assert out["pipeline"][3]["options"] == {key: value}
    assert [s for i, s in enumerate(out["pipeline"]) if i != 3] == [
        s for i, s in enumerate(ECHO["pipeline"]) if i != 3]


def test_repeated_stage_names_are_refused_in_phase_one() -> None:
    data = copy.deepcopy(ECHO)
    data["pipeline"][1]["name"] = data["pipeline"][2]["name"] = "x"
    data["pipeline"] += [{"kind": "sink", "plugin": "null"}] * 2  # named sink, null, null
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    msg = dict(info.value.problems)["pipeline"]
    assert "repeated: 'x' (pipeline[1], pipeline[2]); 'null' (pipeline[5], pipeline[6])" in msg
    assert "Give each of them its own name:" in msg
    with pytest.raises(ConfigError, match=r"'x' names several stages \(pipeline\[1\], "
                                          r"pipeline\[2\]\); pick one as pipeline\[N\]"):
        apply_overrides(data, ["x.options.prefix=1"])


def test_set_finds_stages_by_their_name_in_a_config_still_invalid() -> None:
    """Two sinks are named by plugin: that holds while another part is still wrong."""
    data = copy.deepcopy(ECHO)
    data["pipeline"].append({"kind": "sink", "plugin": "wav"})
    data["buffr"] = 3
    out = apply_overrides(data, ["wav.options.path=a.wav", "null.options={}"])
    assert out["pipeline"][5]["options"] == {"path": "a.wav"}


@pytest.mark.parametrize(("value", "where"), [
    (".nan", "token_delay_s is nan"), (".inf", "token_delay_s is inf"),
    ("-.inf", "token_delay_s is -inf"), ("[1, .inf]", "token_delay_s[1] is inf"),
    ("{a: {b: .nan}}", "token_delay_s.a.b is nan"),
])
def test_nan_and_infinite_options_are_refused(value: str, where: str) -> None:
    """``token_delay_s: .inf`` made the echo LM sleep forever; NaN fails every comparison."""
    with pytest.raises(ConfigError) as info:
        parse_config(apply_overrides(ECHO, [f"lm.options.token_delay_s={value}"]))
    msg = dict(info.value.problems)["pipeline[2].options"]
    assert msg.startswith(where) and "options take finite numbers" in msg
    assert parse_config(apply_overrides(ECHO, ["lm.options.token_delay_s=1e300"]))


@pytest.mark.parametrize(("name", "expected"), [
    ("a.b", "has '.'"), ("x[1]", "has '[' ']'"), ("k=v", "has '='"), ("cascade:lm", "has ':'"),
    (" lm", "is blank or padded"), ("", "is blank or padded"),
    ("device", "is a top-level config key"), ("pipeline", "is a top-level config key"),
])
def test_stage_names_that_set_could_not_reach_are_refused(name: str, expected: str) -> None:
    data = copy.deepcopy(ECHO)
    data["pipeline"][2]["name"] = name
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert expected in dict(info.value.problems)["pipeline[2].name"]
    data["pipeline"][2]["name"] = "my-lm_2"
    assert parse_config(data).stage_names()[2] == "my-lm_2"
    assert apply_overrides(data, ["my-lm_2.options.prefix=x"])["pipeline"][2]["options"] == {
        "prefix": "x"}


keys = st.text(alphabet=st.characters(codec="utf-8", exclude_characters=".[]=",
                                      exclude_categories=["Cs", "Zs", "Zl", "Zp", "Cc"]),
               min_size=1, max_size=8)


@given(head=keys, rest=st.lists(st.one_of(keys, st.integers(0, 10**6)), max_size=6))
def test_split_path_reads_back_what_was_written(head: str, rest: list[str | int]) -> None:
    from omniframe.config import split_path

    path = head + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
    assert split_path(path) == [head, *rest]

"""Function calling in the core: tools, argument schemas, running calls (timeouts, errors as
results), the plugin registry, the ``tools:`` config key, the tool-call parser and stream
gate, the conversation items, and the built-in calculator."""

from __future__ import annotations

import json
import time
import types
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omniframe_tools.builtin import CALCULATOR, CURRENT_TIME, CalcError, calculate, current_time

from omniframe import hookimpl
from omniframe.config import ConfigError, build_pipeline, parse_config
from omniframe.frames import EndOfTurnFrame, ToolCallFrame, ToolResultFrame, frame_types
from omniframe.plugins import PluginError, get_registry, register_plugin, unregister_plugin
from omniframe.session import Session
from omniframe.tools import (
    StreamGate,
    Tool,
    Toolbox,
    ToolCall,
    ToolSpec,
    check_schema,
    format_tool_call,
    parse_tool_calls,
    template_supports_tools,
    validate,
)

pytestmark = pytest.mark.anyio

UNIT = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
}, "required": ["city"], "additionalProperties": False}


# ------------------------------------------------------------------------------- schemas


def test_arguments_are_validated_against_the_schema() -> None:
    assert validate({"city": "Oslo", "unit": "celsius", "days": 3, "tags": ["a"]}, UNIT) == []
    assert validate({"city": "Oslo", "days": 2.0}, UNIT) == []  # 2.0 is an integer in JSON
    problems = validate({"unit": "kelvin", "days": 9, "tags": ["a", 1, "c"], "x": 1}, UNIT)
    joined = "\n".join(problems)
    assert "arguments.city: required but missing" in joined
    assert "arguments.unit: \"kelvin\" is not one of ['celsius', 'fahrenheit']" in joined
    assert "arguments.days: 9 is more than the maximum 7" in joined
    assert "arguments.tags: more than 2 items" in joined
    assert "arguments.tags[1]: expected string, got 1 (int)" in joined
    assert "arguments.x: unknown argument (known: city, unit, days, tags)" in joined
    assert validate(True, {"type": "integer"}) == ["arguments: expected integer, got true (bool)"]
    assert validate(None, {"type": ["string", "null"]}) == []


def test_a_tool_needs_a_sound_name_and_an_object_schema() -> None:
    with pytest.raises(ValueError, match="tool name 'two words'"):
        Tool("two words")
    with pytest.raises(ValueError, match="an object schema"):
        Tool("t", parameters={"type": "string"})
    with pytest.raises(ValueError, match=r"parameters\.properties\.x\.type: unknown type 'str'"):
        Tool("t", parameters={"type": "object", "properties": {"x": {"type": "str"}}})
    with pytest.raises(ValueError, match="timeout_s"):
        Tool("t", fn=lambda: 1, timeout_s=0)
    assert check_schema({"type": "object", "required": "city"}) == [
        "parameters.required: a list of property names"]
    tool = Tool("t", "Does t.", UNIT)
    assert tool.client_side
    assert tool.schema() == {"type": "function", "function": {
        "name": "t", "description": "Does t.", "parameters": UNIT}}


# ----------------------------------------------------------------------------- running


async def test_a_sync_and_an_async_tool_answer_in_json() -> None:
    async def weather(city: str, unit: str = "celsius") -> dict[str, Any]:
        return {"city": city, "temp": 21, "unit": unit}

    box = Toolbox([Tool("weather", "", UNIT, weather), Tool("add", "", {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
        lambda a, b: a + b)])
    res = await box.run(ToolCall("c1", "weather", '{"city": "Oslo"}'))
    assert not res.is_error and json.loads(res.output) == {"city": "Oslo", "temp": 21,
                                                           "unit": "celsius"}
    assert res.call_id == "c1" and res.name == "weather"
    res = await box.run(ToolCall("c2", "add", '{"a": 1.5, "b": 2}'))
    assert res.output == "3.5"


@pytest.mark.parametrize(("call", "words"), [
    (ToolCall("c", "nope", "{}"), "there is no tool named 'nope'; the tools are: boom, slow"),
    (ToolCall("c", "boom", "{not json"), "the arguments are not JSON"),
    (ToolCall("c", "boom", "[1]"), "must be a JSON object"),
    (ToolCall("c", "boom", '{"x": 1}'), "invalid arguments: arguments.x: unknown argument"),
    (ToolCall("c", "boom", "{}"), "boom failed: ZeroDivisionError: division by zero"),
    (ToolCall("c", "slow", "{}"), "slow did not answer within 0.1 s"),
])
async def test_every_failure_is_an_error_result_not_an_exception(call: ToolCall,
                                                                  words: str) -> None:
    def boom() -> float:
        return 1 / 0

    def slow() -> str:
        time.sleep(1.0)  # a stuck sync tool: abandoned in its thread at the timeout
        return "late"

    box = Toolbox([Tool("boom", "", {"type": "object", "properties": {},
                                     "additionalProperties": False}, boom),
                   Tool("slow", "", fn=slow, timeout_s=0.1)])
    t0 = time.monotonic()
    res = await box.run(call)
    assert time.monotonic() - t0 < 0.9
    assert res.is_error and words in json.loads(res.output)["error"]


async def test_a_result_json_cannot_encode_or_too_long_is_handled() -> None:
    box = Toolbox([Tool("obj", fn=lambda: object()), Tool("big", fn=lambda: "x" * 10_000),
                   Tool("nan", fn=lambda: float("nan"))])
    assert (await box.run(ToolCall("c", "obj"))).is_error
    assert (await box.run(ToolCall("c", "nan"))).is_error
    big = await box.run(ToolCall("c", "big"))
    assert not big.is_error and json.loads(big.output)["truncated"] is True
    assert len(big.output) < 4200


async def test_a_client_side_tool_is_not_run_here() -> None:
    box = Toolbox([Tool("remote", "Answered by the client.")])
    res = await box.run(ToolCall("c", "remote"))
    assert res.is_error and "client-side" in res.output


async def test_cancelling_a_call_cancels_an_async_tool() -> None:
    done = []

    async def forever() -> None:
        await anyio.sleep(30)
        done.append(1)

    box = Toolbox([Tool("forever", fn=forever, timeout_s=60)])
    with anyio.move_on_after(0.1) as scope:
        await box.run(ToolCall("c", "forever"))
    assert scope.cancelled_caught and done == []


def test_a_toolbox_refuses_a_name_twice() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        Toolbox([Tool("a"), Tool("a")])


# ---------------------------------------------------------------------- plugins and config


def _plugin(*tools: Tool) -> Any:
    @hookimpl
    def register_tools(register: Any) -> None:
        for t in tools:
            register(t)

    module = types.ModuleType("tools_plugin")
    module.register_tools = register_tools  # type: ignore[attr-defined]
    return module


def test_plugins_register_tools_and_a_clash_names_both() -> None:
    reg = get_registry()
    assert reg.tools["calculator"] is CALCULATOR and reg.tools["current_time"] is CURRENT_TIME
    assert reg.tool_plugin["calculator"] == "omniframe_tools"
    register_plugin(_plugin(Tool("echo_tool", fn=lambda: 1)), "extra_tools")
    try:
        assert "echo_tool" in get_registry().tools
    finally:
        unregister_plugin("extra_tools")
    register_plugin(_plugin(Tool("calculator", fn=lambda: 0)), "rival_tools")
    try:
        with pytest.raises(PluginError, match="tool 'calculator' is registered twice: by "
                                              "plugin 'omniframe_tools' and by 'rival_tools'"):
            get_registry()
    finally:
        unregister_plugin("rival_tools")
    register_plugin(_plugin("not a tool"), "bad_tools")  # type: ignore[arg-type]
    try:
        with pytest.raises(PluginError, match="registered 'not a tool' as a tool"):
            get_registry()
    finally:
        unregister_plugin("bad_tools")


PIPE = [{"kind": "source", "plugin": "text", "options": {"text": "hi"}},
        {"kind": "lm", "plugin": "transformers"}, {"kind": "sink", "plugin": "null"}]
WEATHER_SPEC = {"name": "get_weather", "description": "Weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}


def test_the_tools_key_round_trips_and_builds_the_toolbox() -> None:
    cfg = parse_config({"pipeline": PIPE, "tools": ["calculator", WEATHER_SPEC]})
    assert cfg.tools == ["calculator", ToolSpec(**WEATHER_SPEC)]
    again = parse_config(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg
    pipeline = build_pipeline(cfg)
    box = pipeline.stages[1].context.tools
    assert isinstance(box, Toolbox) and box.names == ["calculator", "get_weather"]
    assert not box.get("calculator").client_side and box.get("get_weather").client_side
    assert all(s.context.tools is box for s in pipeline.stages)
    # no tools: None, and nothing changes for the stages
    assert build_pipeline(parse_config({"pipeline": PIPE})).stages[1].context.tools is None


def test_the_editor_schema_knows_the_tools_key() -> None:
    from omniframe.config import config_schema

    schema = config_schema()
    assert "tools" in schema["properties"]
    assert "ToolSpec" in json.dumps(schema)
    assert len({CALCULATOR, CURRENT_TIME, CALCULATOR}) == 2  # tools hash by identity


def test_tools_for_a_pipeline_whose_lm_cannot_call_them_are_an_error() -> None:
    echo = [PIPE[0], {"kind": "lm", "plugin": "echo"}, PIPE[2]]
    with pytest.raises(ConfigError, match="no stage of this pipeline calls tools"):
        build_pipeline(parse_config({"pipeline": echo, "tools": ["calculator"]}))


@pytest.mark.parametrize(("tools", "where", "words"), [
    (["calculater"], "tools[0]", "no registered tool named 'calculater'. Did you mean "
                                 "'calculator'?"),
    ([{"name": "calculator", "description": "mine"}], "tools[0]", "is a registered tool"),
    (["calculator", "calculator"], "tools", "tools listed twice: calculator"),
    ([{"name": "bad name"}], "tools[0]", "tool name 'bad name'"),
    ([{"name": "t", "parameters": {"type": "array"}}], "tools[0]", "an object schema"),
    ([{"name": "t", "params": {}}], "tools[0]", "params"),
])
def test_bad_tools_config_names_the_entry(tools: list[Any], where: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_pipeline(parse_config({"pipeline": PIPE, "tools": tools}))
    text = str(info.value)
    assert where in text and words in text, text


# ------------------------------------------------------------------ parsing and streaming


def test_calls_in_the_common_formats_parse() -> None:
    hermes = 'Sure. <tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n' \
             '</tool_call>'
    out = parse_tool_calls(hermes)
    assert out.text == "Sure." and out.calls == [("calculator", '{"expression": "1+1"}')]
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n' \
          '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert parse_tool_calls(two).calls == [("a", "{}"), ("b", '{"x": 1}')]
    unclosed = '<tool_call>\n{"name": "a", "arguments": {"q": 1}}'  # stopped at the stop token
    assert parse_tool_calls(unclosed).calls == [("a", '{"q": 1}')]
    listed = '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b"}]</tool_call>'
    assert parse_tool_calls(listed).calls == [("a", "{}"), ("b", "{}")]
    bare = '{"name": "current_time", "parameters": {}}'  # Llama 3 style
    assert parse_tool_calls(bare, ["current_time"]).calls == [("current_time", "{}")]
    fenced = '```json\n{"type": "function", "function": {"name": "a", "arguments": {}}}\n```'
    assert parse_tool_calls(fenced).calls == [("a", "{}")]
    broken = '<tool_call>{"name": "a", "argu'
    out = parse_tool_calls(broken)
    assert out.calls == [] and out.problems and out.text == ""


def test_text_that_is_not_a_call_stays_text() -> None:
    for text in ["The answer is {x}.", '{"answer": 42}', "[1, 2, 3]", "", "   ",
                 '{"name": "Bob", "age": 3}']:
        out = parse_tool_calls(text, ["calculator"])
        assert out.calls == [] and out.text == text
    # a bare JSON call for a tool that is not declared is text too
    assert parse_tool_calls('{"name": "rm", "arguments": {}}', ["calculator"]).calls == []


NAMES = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=8)
ARGS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)


@given(preamble=st.text(max_size=40).filter(lambda t: "<tool_call>" not in t),
       calls=st.lists(st.tuples(NAMES, ARGS), min_size=1, max_size=3),
       as_text=st.booleans())
@settings(max_examples=200, deadline=None)
def test_any_formatted_call_parses_back(preamble: str, calls: list[tuple[str, dict]],
                                       as_text: bool) -> None:
    text = preamble + "".join(
        format_tool_call(n, json.dumps(a) if as_text else a) for n, a in calls)
    out = parse_tool_calls(text)
    assert out.text == preamble.rstrip()
    assert [(n, json.loads(a)) for n, a in out.calls] == calls
    assert out.problems == []


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_the_parser_never_raises(text: str) -> None:
    out = parse_tool_calls(text, ["a"])
    assert isinstance(out.text, str)
    for name, args in out.calls:
        assert isinstance(name, str) and isinstance(json.loads(args), dict)


@given(text=st.text(alphabet=st.sampled_from(list("ab <>{}[`_/tool_call\n")), max_size=60),
       cuts=st.lists(st.integers(0, 60), max_size=8))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_stream_gate_never_lets_a_call_through(text: str, cuts: list[int]) -> None:
    gate = StreamGate()
    emitted = ""
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        emitted += gate.feed(text[a:b])
        assert emitted + gate.held == text[:b]
    assert "<tool_call>" not in emitted
    i = text.find("<tool_call>")
    if i >= 0 and text.lstrip()[:1] not in ("{", "[", "`"):
        assert emitted == text[:i]  # everything before the call was spoken
    if i < 0 and text.lstrip()[:1] not in ("{", "[", "`", ""):
        # no call: only a tail that could still start one is held
        assert len(gate.held) < len("<tool_call>")
    assert emitted + gate.flush() == text


def test_the_gate_holds_a_bare_json_answer_until_the_end() -> None:
    gate = StreamGate()
    assert gate.feed(' {"name": "a",') == "" and gate.feed(' "arguments": {}}') == ""
    assert gate.flush() == ' {"name": "a", "arguments": {}}'
    gate = StreamGate()
    assert gate.feed("Hello <tool") == "Hello " and gate.feed("s are fun") == "<tools are fun"


def test_templates_that_render_tools_are_recognised() -> None:
    assert template_supports_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_supports_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_supports_tools(None)


# ------------------------------------------------------------------ frames and session


def test_tool_frames_are_data_frames_with_their_fields() -> None:
    types_ = frame_types()
    assert types_["ToolCallFrame"] is ToolCallFrame and "ToolResultFrame" in types_
    call = ToolCallFrame(call_id="call_1", name="calculator", arguments='{"expression": "1"}',
                         turn=3)
    res = ToolResultFrame(call_id="call_1", name="calculator", output="1", turn=3)
    assert not call.urgent and not res.is_error
    assert EndOfTurnFrame(reason="tool_call").reason == "tool_call"


def test_the_session_keeps_calls_and_results_as_items() -> None:
    s = Session()
    s.add("user", "Weather in Oslo and Rome?", 1)
    msg = s.add("assistant", "Let me look.", 1)
    s.add_tool_call("c1", "get_weather", '{"city": "Oslo"}', 1, message=msg)
    s.add_tool_call("c2", "get_weather", '{"city": "Rome"}', 1, message=msg)
    assert [c.call_id for c, _ in s.pending_tool_calls()] == ["c1", "c2"]
    s.add_tool_result("c1", "get_weather", '"snow"', 1)
    assert [(c.call_id, t) for c, t in s.pending_tool_calls(turn=1)] == [("c2", 1)]
    assert s.pending_tool_calls(turn=2) == []
    assert s.tool_call("c2")[1] is msg and s.tool_call("zz") is None
    s.add_tool_result("c2", "get_weather", "not json", 1, is_error=True)
    s.add("assistant", "Snow in Oslo.", 1)
    hist = s.history(tools=True)
    assert hist[1]["tool_calls"][1] == {"id": "c2", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Rome"}}}
    assert hist[3] == {"role": "tool", "content": "not json", "tool_call_id": "c2",
                       "name": "get_weather"}
    assert s.messages[3].is_error
    # a call without text is an item too; the text-only history leaves the tool items out
    s.add_tool_call("c3", "get_weather", "{bad", 2)
    assert s.history(tools=True)[-1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c3", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": "{bad"}}]}
    assert s.history() == [{"role": "user", "content": "Weather in Oslo and Rome?"},
                           {"role": "assistant", "content": "Let me look."},
                           {"role": "assistant", "content": "Snow in Oslo."}]


def test_truncating_an_answer_that_called_tools_cuts_each_part() -> None:
    s = Session()
    s.add("user", "Compute it.", 1)
    before = s.add("assistant", "Let me work that out.", 1)
    s.add_tool_call("c1", "calculator", "{}", 1, message=before)
    s.add_tool_result("c1", "calculator", "4", 1)
    answer = s.add("assistant", "It is four, as you can see.", 1)
    s.truncate(1, "Let me  work that out. It is four,")
    assert before.heard is None and not before.interrupted
    assert answer.heard == "It is four," and answer.interrupted
    s.truncate(1, "Let me work")  # cut during the first part: the answer was never heard
    assert before.heard == "Let me work" and answer.heard == ""
    assert [m["content"] for m in s.history()] == ["Compute it.", "Let me work"]


# ----------------------------------------------------------------- the built-in tools


@pytest.mark.parametrize(("expression", "value"), [
    ("17 * 23", 391), ("17 times 23", 391), ("17 x 23", 391), ("2^10", 1024),
    ("(1 + 2) / 4", 0.75), ("-3 + +4", 1), ("7 // 2", 3), ("7 % 4", 3), ("1,234 + 1", 1235),
    ("10 divided by 4", 2.5), ("2 ** -1", 0.5), ("6 × 7 =", 42), ("8 ÷ 2", 4),
])
def test_the_calculator_does_arithmetic(expression: str, value: float) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(("expression", "words"), [
    ("__import__('os').system('ls')", "not allowed"), ("abs(-1)", "not allowed"),
    ("x + 1", "not allowed"), ("'a' * 3", "not a number"), ("1 / 0", "division by zero"),
    ("9 ** 9 ** 9", "exponents are limited"), ("2 ** 5000", "more than 4096 bits"),
    ("10.0 ** 400", "too large"), ("(-8) ** 0.5", "not a real number"), ("", "empty"),
    ("1 +", "not an arithmetic expression"), ("1" * 300, "longer than 200"),
    ("True + 1", "not a number"), ("0 ** -1", "undefined"), ("[1, 2]", "not allowed"),
    ("(" * 150 + "1" + ")" * 150, "longer than"),
])
def test_the_calculator_refuses_what_is_not_safe_arithmetic(expression: str,
                                                            words: str) -> None:
    with pytest.raises(CalcError, match=words):
        calculate(expression)


SMALL = st.integers(-10**6, 10**6)


def _expr(draw: Any, depth: int) -> tuple[str, Any]:
    if depth == 0 or draw(st.booleans()):
        n = draw(SMALL)
        return (f"({n})" if n < 0 else str(n)), n
    op = draw(st.sampled_from(["+", "-", "*"]))
    (a, va), (b, vb) = _expr(draw, depth - 1), _expr(draw, depth - 1)
    return f"({a} {op} {b})", {"+": va + vb, "-": va - vb, "*": va * vb}[op]


@st.composite
def expressions(draw: Any) -> tuple[str, int]:
    return _expr(draw, 4)


@given(expressions())
@settings(max_examples=200, deadline=None)
def test_the_calculator_agrees_with_python_on_integer_arithmetic(case: tuple[str, int]
                                                                 ) -> None:
    text, value = case
    if len(text) <= 200:
        assert calculate(text) == value


@given(st.text(alphabet=st.sampled_from(list("0123456789+-*/%().^ eE_jx")), max_size=60))
@settings(max_examples=400, deadline=None)
def test_the_calculator_only_answers_or_refuses_quickly(text: str) -> None:
    t0 = time.monotonic()
    try:
        value = calculate(text)
    except CalcError:
        pass
    else:
        assert isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(value, int):
            assert value.bit_length() <= 4096
    assert time.monotonic() - t0 < 1.0


async def test_the_builtin_tools_through_a_toolbox() -> None:
    box = Toolbox([CALCULATOR, CURRENT_TIME])
    res = await box.run(ToolCall("c", "calculator", '{"expression": "17 * 23"}'))
    assert json.loads(res.output) == {"expression": "17 * 23", "result": 391}
    res = await box.run(ToolCall("c", "calculator", '{"expression": "os.system(1)"}'))
    assert res.is_error and "not allowed" in res.output
    res = await box.run(ToolCall("c", "current_time", '{"timezone": "Europe/Paris"}'))
    assert set(json.loads(res.output)) == {"time", "date", "weekday", "timezone", "iso"}
    res = await box.run(ToolCall("c", "current_time", '{"timezone": "Mars/Olympus"}'))
    assert res.is_error and "unknown time zone" in res.output
    assert current_time()["iso"][:4].isdigit()

"""Function calling in the transformers LM stage.

The flow is tested on a scripted model: a byte-level tokenizer (one token per byte, built in
memory) with a real chat template, and a forward pass that forces the next token of a
scripted reply, so the stage's own code (prompting, streaming, parsing, running tools,
conversation items, client-side waiting) runs for real, and only the model's choice of
tokens is fixed. The templates are SmolLM2-135M-Instruct's (from its GGUF; it does not render
tools, so the stage writes them into the prompt) and a Qwen2.5-style one that does.

What the real SmolLM2-135M does with tools declared is in ``test_smollm2_with_tools`` (slow):
it does not call them (it answers in prose), and the flow still ends cleanly.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from omniframe_cascade.lm import LoadedLM, TransformersLM, build_messages, inline_tools
from omniframe_tools.builtin import CALCULATOR, CURRENT_TIME

from omniframe.frames import (
    EndOfTurnFrame,
    ErrorFrame,
    InterruptFrame,
    TextDeltaFrame,
    ToolCallFrame,
    ToolResultFrame,
    TranscriptFrame,
)
from omniframe.session import Session
from omniframe.stage import StageContext
from omniframe.testing import Sleep, WaitFor, run_stage
from omniframe.tools import Tool, Toolbox

pytestmark = pytest.mark.anyio

SMOLLM2_TEMPLATE = (  # tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf, verbatim
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

QWEN_STYLE_TEMPLATE = (  # the shape of Qwen2.5's template: tools, tool_calls, tool role
    "{% if tools %}<|im_start|>system\n"
    "{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are helpful.' }}"
    "\n\n# Tools\n\n<tools>{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n' }}</tools>"
    "\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags.<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n"
    "{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls)"
    " %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant"
    "{% if message.content %}{{ '\\n' }}{{ message.content }}{% endif %}"
    "{% for tc in message.tool_calls %}{{ '\\n' }}<tool_call>\n"
    "{\"name\": \"{{ tc.function.name }}\", "
    "\"arguments\": {{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user"
    "{% endif %}{{ '\\n' }}<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = Tool("get_weather", "The weather in a city (the client answers it).",
               {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]})


def byte_tokenizer(template: str) -> Any:
    """A byte-level BPE tokenizer without merges (each byte one token) and ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({"eos_token": "<|im_end|>"})
    tok.chat_template = template
    return tok


class ScriptedLM(LoadedLM):
    """A LoadedLM whose forward pass writes the next scripted reply, token by token, then
    the stop token. ``prompts`` keeps the text of every prompt it was given."""

    def __init__(self, tokenizer: Any, replies: list[str]) -> None:
        self.model = None
        self.tokenizer = tokenizer
        self.source = "scripted"
        self.stop_ids = {tokenizer.eos_token_id}
        self.steps = 0
        self.cache_arg = "past_key_values"
        self.extra = {}
        self.context = None
        self.replies = list(replies)
        self.prompts: list[str] = []
        self._script: list[int] = []

    def forward(self, ids: Any, cache: Any) -> tuple[Any, Any]:
        import torch

        if cache is None:  # a new reply
            self.prompts.append(self.tokenizer.decode(ids[0].tolist()))
            reply = self.replies.pop(0) if self.replies else "(no more replies)"
            self._script = self.tokenizer(reply, add_special_tokens=False)["input_ids"] + \
                [self.tokenizer.eos_token_id]
            cache = 0
        else:
            cache += 1
        logits = torch.full((1, len(self.tokenizer)), -1e4)
        logits[0, self._script[min(cache, len(self._script) - 1)]] = 0.0
        self.steps += 1
        return logits, cache


class ScriptedStage(TransformersLM):
    """The stage with its model already set (a pipeline's ``setup`` keeps it)."""

    async def setup(self) -> None:
        assert self.lm is not None


def make_lm(replies: list[str], tools: list[Tool] | None, template: str = SMOLLM2_TEMPLATE,
            **options: Any) -> TransformersLM:
    ctx = StageContext(name="lm", session=Session(),
                       tools=Toolbox(tools) if tools is not None else None)
    stage = ScriptedStage({"max_new_tokens": 200, **options}, ctx)
    stage.lm = ScriptedLM(byte_tokenizer(template), replies)
    return stage


def said(text: str, turn: int = 1) -> TranscriptFrame:
    return TranscriptFrame(text=text, turn=turn, speech_end_ts=1.0)


def spoken(frames: list[Any]) -> str:
    return "".join(f.text for f in frames if isinstance(f, TextDeltaFrame))


def call(name: str, **arguments: Any) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


async def collect(stage: TransformersLM, frame: Any) -> list[Any]:
    return [f async for f in stage.process(frame)]


async def test_a_server_side_tool_is_run_and_the_model_answers_with_its_result() -> None:
    lm = make_lm([call("calculator", expression="17 * 23"), "17 times 23 is 391."],
                 [CALCULATOR, CURRENT_TIME])
    out = await collect(lm, said("What is 17 times 23?"))
    types = [type(f) for f in out]
    assert types[:3] == [TranscriptFrame, ToolCallFrame, ToolResultFrame]
    assert types[-1] is EndOfTurnFrame
    tc, tr, end = out[1], out[2], out[-1]
    assert tc.name == "calculator" and json.loads(tc.arguments) == {"expression": "17 * 23"}
    assert tc.call_id.startswith("call_") and tr.call_id == tc.call_id and tc.turn == 1
    assert not tr.is_error and json.loads(tr.output)["result"] == 391
    # only the answer is spoken, never the call's JSON
    assert spoken(out) == "17 times 23 is 391."
    assert end.reason == "completed" and end.text == "17 times 23 is 391." and end.turn == 1
    # SmolLM2's template renders no tools: the declarations go into the system prompt, the
    # call and its result into the chat, in the Hermes way
    first, second = lm.lm.prompts
    assert "<tools>" in first and '"name": "calculator"' in first and "current_time" in first
    assert "<tool_call>" in second and "<tool_response>" in second and "391" in second
    assert second.rstrip().endswith("<|im_start|>assistant")
    # the conversation items
    hist = lm.context.session.history(tools=True)
    assert [m["role"] for m in hist] == ["user", "assistant", "tool", "assistant"]
    assert hist[1]["tool_calls"] == [{"id": tc.call_id, "type": "function", "function": {
        "name": "calculator", "arguments": {"expression": "17 * 23"}}}]
    assert hist[2]["tool_call_id"] == tc.call_id and hist[2]["name"] == "calculator"
    # the text-only history (other LMs, older callers) is what it always was
    assert lm.context.session.history() == [
        {"role": "user", "content": "What is 17 times 23?"},
        {"role": "assistant", "content": "17 times 23 is 391."}]


async def test_a_template_that_renders_tools_gets_them() -> None:
    lm = make_lm([call("current_time"), "It is noon."], [CURRENT_TIME],
                 template=QWEN_STYLE_TEMPLATE)
    out = await collect(lm, said("What time is it?"))
    assert [type(f) for f in out][1:3] == [ToolCallFrame, ToolResultFrame]
    assert "time" in json.loads(out[2].output)
    first, second = lm.lm.prompts
    assert "# Tools" in first and "You may call" not in first  # the template's, not ours
    assert '<tool_call>\n{"name": "current_time", "arguments": {}}\n</tool_call>' in second
    assert "<|im_end|>\n<|im_start|>user\n<tool_response>" in second
    assert out[-1].text == "It is noon."


async def test_text_before_a_call_is_spoken_and_a_bare_json_call_works() -> None:
    lm = make_lm(["Let me work that out. " + call("calculator", expression="2+2"),
                  '{"name": "calculator", "parameters": {"expression": "4*10"}}',
                  "Forty."], [CALCULATOR])
    out = await collect(lm, said("2 plus 2, times ten?"))
    calls = [f for f in out if isinstance(f, ToolCallFrame)]
    results = [f for f in out if isinstance(f, ToolResultFrame)]
    assert [json.loads(c.arguments)["expression"] for c in calls] == ["2+2", "4*10"]
    assert [json.loads(r.output)["result"] for r in results] == [4, 40]
    assert spoken(out) == "Let me work that out. Forty."
    assert "{" not in spoken(out) and "tool_call" not in spoken(out)
    assert out[-1].text == "Let me work that out. Forty."
    roles = [m["role"] for m in lm.context.session.history(tools=True)]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]


async def test_an_answer_without_a_call_streams_as_before() -> None:
    lm = make_lm(["Paris is the capital."], [CALCULATOR])
    out = await collect(lm, said("Capital of France?"))
    deltas = [f for f in out if isinstance(f, TextDeltaFrame)]
    assert len(deltas) > 5  # streamed piece by piece, not held back
    assert spoken(out) == "Paris is the capital." and out[-1].reason == "completed"
    assert not any(isinstance(f, ToolCallFrame) for f in out)


async def test_a_failing_or_misused_tool_is_an_error_result_the_model_reads() -> None:
    def broken() -> None:
        raise RuntimeError("the clock fell off the wall")

    clock = Tool("clock", "Broken clock.", fn=broken)
    lm = make_lm([call("clock"), call("calculator", expr="1+1"), call("no_such_tool"),
                  "Sorry, I cannot tell."], [clock, CALCULATOR])
    out = await collect(lm, said("Time?"))
    results = [f for f in out if isinstance(f, ToolResultFrame)]
    assert [r.is_error for r in results] == [True, True, True]
    assert "RuntimeError: the clock fell off the wall" in json.loads(results[0].output)["error"]
    assert "arguments.expression: required but missing" in results[1].output
    assert "no tool named 'no_such_tool'" in results[2].output
    assert out[-1].reason == "completed" and out[-1].text == "Sorry, I cannot tell."
    assert "clock fell off" in lm.lm.prompts[-1]  # the model was shown the error


async def test_tool_rounds_are_bounded() -> None:
    lm = make_lm([call("calculator", expression="1+1")] * 5, [CALCULATOR], max_tool_rounds=2)
    out = await collect(lm, said("Loop forever?"))
    assert len([f for f in out if isinstance(f, ToolResultFrame)]) == 2
    assert len(lm.lm.prompts) == 3  # two rounds of calls, then a third reply, not run
    assert isinstance(out[-1], EndOfTurnFrame) and out[-1].reason == "empty"
    assert spoken(out) == ""


async def test_a_call_that_does_not_parse_is_not_spoken() -> None:
    lm = make_lm(["<tool_call>\n{\"name\": \"calculator\", \"argu"], [CALCULATOR])
    out = await collect(lm, said("Hm?"))
    assert spoken(out) == ""
    assert any(isinstance(f, ErrorFrame) and "does not parse" in f.message for f in out)
    assert isinstance(out[-1], EndOfTurnFrame)


async def test_a_client_side_tool_ends_the_turn_and_its_result_continues_it() -> None:
    lm = make_lm([call("get_weather", city="Paris"), "It is sunny in Paris."],
                 [WEATHER, CALCULATOR])
    out = await collect(lm, said("Weather in Paris?"))
    assert [type(f) for f in out] == [TranscriptFrame, ToolCallFrame, EndOfTurnFrame]
    tc, end = out[1], out[2]
    assert end.reason == "tool_call" and end.turn == 1 and end.text == ""
    session = lm.context.session
    assert [c.call_id for c, _ in session.pending_tool_calls()] == [tc.call_id]
    # a result for a call nobody made is an error, and changes nothing
    stray = await collect(lm, ToolResultFrame(call_id="call_x", name="get_weather",
                                              output="{}"))
    assert isinstance(stray[1], ErrorFrame) and len(lm.lm.prompts) == 1
    # the client's result (turn 0: the LM knows the call's turn) continues the answer
    result = ToolResultFrame(call_id=tc.call_id, output='{"sky": "sunny", "celsius": 21}')
    out = await collect(lm, result)
    assert out[0] is result
    assert spoken(out) == "It is sunny in Paris."
    assert out[-1].reason == "completed" and out[-1].turn == 1
    assert all(f.turn == 1 for f in out[1:])
    assert '"celsius": 21' in lm.lm.prompts[-1]
    assert session.pending_tool_calls() == []
    hist = session.history(tools=True)
    assert [m["role"] for m in hist] == ["user", "assistant", "tool", "assistant"]
    assert hist[2]["name"] == "get_weather"  # taken from the call: the client sent no name
    # a second result for the same call is ignored
    again = await collect(lm, result)
    assert again == [result] and len(lm.lm.prompts) == 2


async def test_a_client_tool_result_after_the_user_moved_on_is_only_recorded() -> None:
    lm = make_lm([call("get_weather", city="Oslo"), "Hello again.", "unused"], [WEATHER])
    out = await collect(lm, said("Weather in Oslo?", 1))
    tc = out[1]
    await collect(lm, said("Never mind. Hello!", 2))
    late = await collect(lm, ToolResultFrame(call_id=tc.call_id, name="get_weather",
                                             output='"snow"'))
    assert late[1:] == [] and len(lm.lm.prompts) == 2  # recorded, no answer started
    assert lm.context.session.history(tools=True)[-1]["role"] == "tool"


async def test_a_barge_in_during_a_slow_tool_ends_the_answer() -> None:
    started = anyio.Event()

    async def slow() -> str:
        started.set()
        await anyio.sleep(30)
        return "late"

    lm = make_lm([call("slow"), "never"], [Tool("slow", "Takes long.", fn=slow)])
    run = await run_stage(lm, [said("Go slow.", 1), WaitFor(ToolCallFrame), Sleep(0.2),
                               InterruptFrame(turn=2)], timeout=20)
    ends = [f for f in run.frames if isinstance(f, EndOfTurnFrame)]
    assert not any(isinstance(f, TextDeltaFrame) for f in run.frames)
    assert [(e.turn, e.reason) for e in ends] == [(1, "interrupted")]
    assert not any(isinstance(f, ToolResultFrame) for f in run.frames)
    assert started.is_set()


async def test_a_tool_timeout_is_an_error_result() -> None:
    def stuck() -> str:
        import time

        time.sleep(2)
        return "too late"

    lm = make_lm([call("stuck"), "The tool did not answer."],
                 [Tool("stuck", "Hangs.", fn=stuck, timeout_s=0.2)])
    with anyio.fail_after(10):
        out = await collect(lm, said("Try it."))
    result = next(f for f in out if isinstance(f, ToolResultFrame))
    assert result.is_error and "did not answer within 0.2 s" in result.output
    assert out[-1].text == "The tool did not answer."


async def test_on_the_bus_tool_frames_travel_in_order() -> None:
    lm = make_lm([call("calculator", expression="6*7"), "42."], [CALCULATOR])
    run = await run_stage(lm, [said("Six times seven?")], timeout=20)
    answer = [f for f in run.frames if isinstance(f, (TranscriptFrame, ToolCallFrame,
                                                       ToolResultFrame, TextDeltaFrame,
                                                       EndOfTurnFrame))]
    kinds = [type(f).__name__ for f in answer]
    assert kinds[:3] == ["TranscriptFrame", "ToolCallFrame", "ToolResultFrame"]
    assert kinds[-1] == "EndOfTurnFrame" and answer[-1].text == "42."
    assert spoken(answer) == "42."


def test_messages_for_a_template_without_tools() -> None:
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"id": "c2", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": '"snow"', "tool_call_id": "c1", "name": "get_weather"},
        {"role": "tool", "content": '"sun"', "tool_call_id": "c2", "name": "get_weather"},
    ]
    msgs = build_messages(history, "Be brief.", 12)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool"]
    inlined = inline_tools(msgs, [WEATHER.schema()])
    assert [m["role"] for m in inlined] == ["system", "user", "assistant", "user"]
    assert inlined[0]["content"].startswith("Be brief.\n\n# Tools")
    assert inlined[2]["content"].count("<tool_call>") == 2
    assert inlined[3]["content"] == ('<tool_response>\n"snow"\n</tool_response>\n'
                                     '<tool_response>\n"sun"\n</tool_response>')
    assert all(set(m) == {"role", "content"} for m in inlined)


@pytest.mark.slow
async def test_smollm2_with_tools(smollm: Any) -> None:
    """The real SmolLM2-135M-Instruct with the calculator and clock declared: whatever it
    writes, the turn ends cleanly and no tool-call JSON is spoken. (It answers in prose and
    makes up a time: a 135M model does not call tools; see the report of issue 10.)"""
    ctx = StageContext(name="lm", session=Session(), tools=Toolbox([CURRENT_TIME, CALCULATOR]))
    lm = TransformersLM({"max_new_tokens": 40}, ctx)
    await lm.setup()
    with anyio.fail_after(240):
        out = await collect(lm, said("What time is it?"))
    assert isinstance(out[-1], EndOfTurnFrame) and out[-1].reason in ("completed",
                                                                      "max_tokens", "empty")
    assert "<tool_call>" not in spoken(out)
    prompt = lm.lm.tokenizer.decode(lm.lm.encode(lm.last_messages, None, lm.tools.schemas()))
    assert "<tools>" in prompt and '"name": "current_time"' in prompt  # what it was shown
    calls = [f for f in out if isinstance(f, ToolCallFrame)]
    results = [f for f in out if isinstance(f, ToolResultFrame)]
    assert len(calls) == len(results)  # any call it did make was run


async def test_end_to_end_from_a_config_with_registered_and_client_tools() -> None:
    """``tools:`` in a config -> the registry's calculator and an inline client-side tool ->
    the LM (scripted replies) -> the frames that leave the pipeline and the session items."""
    from omniframe.config import build_pipeline, parse_config

    cfg = parse_config({
        "name": "tools-e2e",
        "tools": ["calculator", {"name": "get_weather", "description": "Weather in a city.",
                                 "parameters": WEATHER.parameters}],
        "pipeline": [
            {"kind": "source", "plugin": "text",
             "options": {"text": ["What is 17 times 23?", "Weather in Rome?"]}},
            {"kind": "lm", "plugin": "transformers", "options": {"max_new_tokens": 200}},
            {"kind": "sink", "plugin": "null"}]})
    pipeline = build_pipeline(cfg)
    lm = pipeline.stages[1]
    assert lm.context.tools.names == ["calculator", "get_weather"]
    lm.lm = ScriptedLM(byte_tokenizer(SMOLLM2_TEMPLATE),
                       [call("calculator", expression="17 * 23"), "It is 391.",
                        call("get_weather", city="Rome")])

    async def keep_the_scripted_model() -> None:
        pass

    lm.setup = keep_the_scripted_model  # type: ignore[method-assign]
    with anyio.fail_after(30):
        result = await pipeline.run()
    frames = [f for f in result.frames if isinstance(f, (ToolCallFrame, ToolResultFrame,
                                                          EndOfTurnFrame))]
    assert [(type(f).__name__, f.turn) for f in frames] == [
        ("ToolCallFrame", 1), ("ToolResultFrame", 1), ("EndOfTurnFrame", 1),
        ("ToolCallFrame", 2), ("EndOfTurnFrame", 2)]
    assert frames[2].text == "It is 391." and frames[4].reason == "tool_call"
    assert json.loads(frames[1].output)["result"] == 391
    session = pipeline.session
    assert [c.name for c, _ in session.pending_tool_calls()] == ["get_weather"]
    assert [m["role"] for m in session.history(tools=True)] == [
        "user", "assistant", "tool", "assistant", "user", "assistant"]

"""Function calls over the Realtime API, with the app served in-process (uvicorn on an
ephemeral loopback port) so that a test-only LM that calls a client-side tool can be
registered: the call streams as a ``function_call`` item, the client's
``function_call_output`` goes back in as a ToolResultFrame, and the answer follows."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from omniframe import hookimpl  # noqa: E402
from omniframe.frames import (  # noqa: E402
    EndOfTurnFrame,
    Frame,
    RespondFrame,
    TextDeltaFrame,
    ToolCallFrame,
    ToolResultFrame,
    TranscriptFrame,
)
from omniframe.serve.app import Settings, create_app  # noqa: E402
from omniframe.serve.bridge import load_served  # noqa: E402
from omniframe.stage import Stage  # noqa: E402
from tests.test_serve import Client, types  # noqa: E402

pytestmark = pytest.mark.anyio


class ToolLM(Stage):
    """Asks the client's ``get_weather`` tool, then answers with its result."""

    kind = "lm"
    name = "tool-test"
    consumes = (TranscriptFrame, ToolResultFrame, RespondFrame)
    requires = (TranscriptFrame,)
    produces = (TextDeltaFrame, ToolCallFrame, EndOfTurnFrame)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        session = self.context.session
        if isinstance(frame, TranscriptFrame):
            session.add("user", frame.text, frame.turn)
            call_id = f"call_{frame.turn}"
            session.add_tool_call(call_id, "get_weather", '{"city": "Paris"}', frame.turn)
            yield TextDeltaFrame(text="Let me check.")
            yield ToolCallFrame(call_id=call_id, name="get_weather",
                                arguments='{"city": "Paris"}')
            yield EndOfTurnFrame(reason="tool_call", text="Let me check.")
        elif isinstance(frame, ToolResultFrame):
            session.add_tool_result(frame.call_id, "get_weather", frame.output, frame.turn)
            answer = f"The weather: {json.loads(frame.output)['sky']}."
            session.add("assistant", answer, frame.turn)
            for word in answer.split(" "):
                yield TextDeltaFrame(text=word + " ")
            yield EndOfTurnFrame(text=answer)
        else:
            yield EndOfTurnFrame(reason="empty")


class BrokenLM(Stage):
    """Fails on its first input: the pipeline stops."""

    kind = "lm"
    name = "broken-test"
    consumes = (TranscriptFrame,)
    produces = (TextDeltaFrame, EndOfTurnFrame)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        raise RuntimeError("the model fell over")
        yield  # pragma: no cover


def _register(register) -> None:
    register(ToolLM)
    register(BrokenLM)


@contextlib.asynccontextmanager
async def served(tmp_path: Path, lm: str = "tool-test"):
    from omniframe.plugins import register_plugin, unregister_plugin

    register_plugin(SimpleNamespace(register_stages=hookimpl(_register)), "serve-tool-test")
    cfg = tmp_path / "tools.yaml"
    cfg.write_text("name: tools\npipeline:\n"
                   "  - {kind: source, plugin: synth}\n"
                   "  - {kind: vad, plugin: energy}\n"
                   f"  - {{kind: lm, plugin: {lm}}}\n"
                   "  - {kind: codec, plugin: echo}\n")
    try:
        app = create_app(load_served([str(cfg)]), Settings(check_events=True))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                               log_level="warning", lifespan="off"))
        task = asyncio.ensure_future(server.serve())
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield port
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)
    finally:
        unregister_plugin("serve-tool-test")


async def test_function_call_round_trip(tmp_path: Path) -> None:
    async with served(tmp_path) as port:
        client = openai.AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{port}/v1")
        async with client.realtime.connect(model="tools") as conn:
            c = Client(conn.send, conn.recv_bytes)
            assert (await c.recv())["type"] == "session.created"
            await c.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "weather?"}]}})
            await c.send({"type": "response.create"})
            evs = await c.until("response.done")
            first = evs[-1]["response"]
            assert first["status"] == "completed"
            assert [o["type"] for o in first["output"]] == ["message", "function_call"]
            call = first["output"][1]
            assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {
                "city": "Paris"}
            t = types(evs)
            i = t.index("response.function_call_arguments.done")
            assert t[i - 1] == "response.function_call_arguments.delta"
            added = [e for e in evs if e["type"] == "conversation.item.added"
                     and e["item"]["type"] == "function_call"]
            assert added and added[0]["item"]["call_id"] == call["call_id"]
            await c.send({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": call["call_id"],
                "output": json.dumps({"sky": "sunny"})}})
            await c.send({"type": "response.create"})
            evs = await c.until("response.done")
            assert evs[0]["type"] == "conversation.item.added"
            assert evs[0]["item"]["type"] == "function_call_output"
            second = evs[-1]["response"]
            assert second["id"] != first["id"] and second["status"] == "completed"
            assert second["output"][0]["content"][0]["transcript"].strip() == (
                "The weather: sunny.")
            assert types(evs).count("response.created") == 1


async def test_pipeline_failure_ends_the_session_with_a_reason(tmp_path: Path) -> None:
    """A stage that fails: an error event (server_error, no stack trace), then close 1011."""
    websockets = pytest.importorskip("websockets")
    async with served(tmp_path, lm="broken-test") as port, websockets.connect(
            f"ws://127.0.0.1:{port}/v1/realtime") as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "hi"}]}}))
        got = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            with anyio.fail_after(10):
                while True:
                    got.append(json.loads(await ws.recv()))
        errors = [e for e in got if e["type"] == "error"]
        assert errors and errors[-1]["error"]["code"] == "server_error"
        assert "fell over" in errors[-1]["error"]["message"]
        assert "Traceback" not in errors[-1]["error"]["message"]
        assert closed.value.rcvd.code == 1011

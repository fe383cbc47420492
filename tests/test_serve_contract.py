"""The contract checker (omniframe.serve.contract) on hand-made streams: a good two-response
stream passes; each lifecycle rule has a stream that breaks it and is caught; and, as
properties, dropping or repeating any lifecycle event of the good stream is caught.

The checker is also run on every event of every live test (tests/test_serve*.py: the client
side, and the server itself with --check-events). At the end: regressions, against a live
server, for what the third-party clients (tests/test_serve_clients.py) revealed."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from typing import Any

import anyio
import pytest

pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from omniframe.serve.contract import ContractChecker, ContractViolation  # noqa: E402
from tests.test_serve import Server, raw_client, server  # noqa: E402, F401

AUDIO = base64.b64encode(b"\x01\x00" * 240).decode()


def good_stream() -> list[dict[str, Any]]:
    """A user text item; response r1 (a spoken message, then a function call); the tool's
    output item; response r2 (a text message) cancelled half-way."""
    n = 0

    def ev(t: str, **f: Any) -> dict[str, Any]:
        nonlocal n
        n += 1
        return {"type": t, "event_id": f"event_{n}", **f}

    user = {"id": "u1", "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "hi"}]}
    msg = {"id": "m1", "type": "message", "role": "assistant", "content": []}
    call = {"id": "c1", "type": "function_call", "call_id": "call_1", "name": "f",
            "arguments": ""}
    out = {"id": "o1", "type": "function_call_output", "call_id": "call_1", "output": "{}"}
    msg2 = {"id": "m2", "type": "message", "role": "assistant", "content": []}
    a = {"response_id": "r1", "item_id": "m1", "output_index": 0, "content_index": 0}
    f = {"response_id": "r1", "item_id": "c1", "output_index": 1}
    b = {"response_id": "r2", "item_id": "m2", "output_index": 0, "content_index": 0}
    audio_part = {"type": "audio", "transcript": ""}

    def resp(rid: str, status: str, output: list[dict], details: Any = None) -> dict:
        return {"id": rid, "object": "realtime.response", "status": status,
                "output": output, "status_details": details}

    done_msg = dict(msg, status="completed", content=[
        {"type": "output_audio", "transcript": "hi there"}])
    done_call = dict(call, status="completed", arguments='{"x": 1}')
    done_msg2 = dict(msg2, status="incomplete", content=[{"type": "output_text",
                                                          "text": "par"}])
    return [
        ev("conversation.item.added", previous_item_id=None, item=user),
        ev("conversation.item.done", previous_item_id=None, item=user),
        ev("response.created", response=resp("r1", "in_progress", [])),
        ev("response.output_item.added", response_id="r1", output_index=0,
           item=dict(msg, status="in_progress")),
        ev("conversation.item.added", previous_item_id="u1", item=msg),
        ev("response.content_part.added", part=audio_part, **a),
        ev("response.output_audio.delta", delta=AUDIO, **a),
        ev("response.output_audio_transcript.delta", delta="hi", **a),
        ev("response.output_audio.delta", delta=AUDIO, **a),
        ev("response.output_audio_transcript.delta", delta=" there", **a),
        ev("response.output_audio.done", **a),
        ev("response.output_audio_transcript.done", transcript="hi there", **a),
        ev("response.content_part.done", part=dict(audio_part, transcript="hi there"), **a),
        ev("response.output_item.done", response_id="r1", output_index=0, item=done_msg),
        ev("conversation.item.done", previous_item_id="u1", item=done_msg),
        ev("response.output_item.added", response_id="r1", output_index=1,
           item=dict(call, status="in_progress")),
        ev("conversation.item.added", previous_item_id="m1", item=call),
        ev("response.function_call_arguments.delta", call_id="call_1", delta='{"x": 1}', **f),
        ev("response.function_call_arguments.done", call_id="call_1", name="f",
           arguments='{"x": 1}', **f),
        ev("response.output_item.done", response_id="r1", output_index=1, item=done_call),
        ev("conversation.item.done", previous_item_id="m1", item=done_call),
        ev("response.done", response=resp("r1", "completed", [done_msg, done_call])),
        ev("conversation.item.added", previous_item_id="c1", item=out),
        ev("conversation.item.done", previous_item_id="c1", item=out),
        ev("response.created", response=resp("r2", "in_progress", [])),
        ev("response.output_item.added", response_id="r2", output_index=0,
           item=dict(msg2, status="in_progress")),
        ev("conversation.item.added", previous_item_id="o1", item=msg2),
        ev("response.content_part.added", part={"type": "text", "text": ""}, **b),
        ev("response.output_text.delta", delta="par", **b),
        ev("response.output_text.done", text="par", **b),
        ev("response.content_part.done", part={"type": "text", "text": "par"}, **b),
        ev("response.output_item.done", response_id="r2", output_index=0, item=done_msg2),
        ev("conversation.item.done", previous_item_id="o1", item=done_msg2),
        ev("response.done", response=resp("r2", "cancelled", [done_msg2], {
            "type": "cancelled", "reason": "client_cancelled"})),
    ]


def check(events: list[dict[str, Any]]) -> int:
    c = ContractChecker()
    n = c.check_all(events)
    c.finish()
    return n


def test_good_stream_passes() -> None:
    assert check(good_stream()) == len(good_stream())


def where(s: list[dict], type_: str, nth: int = 0, **match: Any) -> int:
    hits = [i for i, e in enumerate(s) if e["type"] == type_
            and all(e.get(k) == v for k, v in match.items())]
    return hits[nth]


def move(s: list[dict], i: int, j: int) -> None:
    s.insert(j, s.pop(i))


def _item_done_twice(s: list[dict]) -> None:
    i = where(s, "response.output_item.done")
    s.insert(i + 1, dict(s[i], event_id="again"))


def _conv_item_done_twice(s: list[dict]) -> None:
    i = where(s, "conversation.item.done")
    s.insert(i + 1, dict(s[i], event_id="again"))


def _conv_done_before_added(s: list[dict]) -> None:
    move(s, where(s, "conversation.item.done"), 0)


def _conv_done_before_output_item_done(s: list[dict]) -> None:
    i = where(s, "response.output_item.done")
    move(s, i + 1, i)


def _gap_in_output_index(s: list[dict]) -> None:
    for e in s:
        if e.get("item_id") == "c1" or e.get("item", {}).get("id") == "c1" and (
                e["type"].startswith("response.output_item")):
            e["output_index"] = 2


def _out_of_order_output_index(s: list[dict]) -> None:
    s[where(s, "response.output_item.added")]["output_index"] = 1


def _delta_with_other_output_index(s: list[dict]) -> None:
    s[where(s, "response.output_audio.delta")]["output_index"] = 1


def _delta_with_other_response_id(s: list[dict]) -> None:
    i = where(s, "response.output_text.delta")
    s[i]["response_id"] = "r1"  # r1 is done by then


def _item_in_two_responses(s: list[dict]) -> None:
    i = where(s, "response.output_item.added", 2)
    s[i]["item"] = dict(s[i]["item"], id="m1")


def _delta_of_another_response_s_item(s: list[dict]) -> None:
    # r2 open, a delta names r2 but the item m1 of r1
    i = where(s, "response.output_text.delta")
    s[i]["item_id"] = "m1"


def _response_created_completed(s: list[dict]) -> None:
    s[where(s, "response.created")]["response"]["status"] = "completed"


def _response_done_in_progress(s: list[dict]) -> None:
    s[where(s, "response.done")]["response"]["status"] = "in_progress"


def _details_disagree(s: list[dict]) -> None:
    s[where(s, "response.done", 1)]["response"]["status_details"]["type"] = "completed"


def _completed_with_incomplete_item(s: list[dict]) -> None:
    r = s[where(s, "response.done", 1)]["response"]
    r["status"] = "completed"
    r["status_details"] = None


def _output_status_disagrees(s: list[dict]) -> None:
    s[where(s, "response.done")]["response"]["output"][0]["status"] = "incomplete"


def _output_misses_an_item(s: list[dict]) -> None:
    s[where(s, "response.done")]["response"]["output"].pop()


def _output_out_of_order(s: list[dict]) -> None:
    s[where(s, "response.done")]["response"]["output"].reverse()


def _item_done_in_progress(s: list[dict]) -> None:
    s[where(s, "response.output_item.done")]["item"]["status"] = "in_progress"


def _item_added_completed(s: list[dict]) -> None:
    s[where(s, "response.output_item.added")]["item"]["status"] = "completed"


def _response_done_with_open_item(s: list[dict]) -> None:
    i = where(s, "response.output_item.done", 1)
    del s[i:i + 2]  # its output_item.done and conversation.item.done


def _part_index_skips(s: list[dict]) -> None:
    for e in s:
        if e.get("item_id") == "m1":
            e["content_index"] = 1


def _delta_after_part_done(s: list[dict]) -> None:
    i = where(s, "response.content_part.done")
    s.insert(i + 1, dict(s[where(s, "response.output_audio.delta")], event_id="late"))


def _delta_after_item_done(s: list[dict]) -> None:
    i = where(s, "response.output_item.done", 1)
    s.insert(i + 1, dict(s[where(s, "response.function_call_arguments.delta")],
                         event_id="late"))


def _stream_done_twice(s: list[dict]) -> None:
    i = where(s, "response.output_audio.done")
    s.insert(i + 1, dict(s[i], event_id="again"))


def _delta_after_stream_done(s: list[dict]) -> None:
    i = where(s, "response.output_audio_transcript.done")
    s.insert(i + 1, dict(s[where(s, "response.output_audio.delta")], event_id="late"))


def _part_done_before_stream_done(s: list[dict]) -> None:
    del s[where(s, "response.output_audio_transcript.done")]


def _item_done_with_part_open(s: list[dict]) -> None:
    del s[where(s, "response.content_part.done")]


def _call_item_done_before_arguments_done(s: list[dict]) -> None:
    del s[where(s, "response.function_call_arguments.done")]


def _left_open_at_the_end(s: list[dict]) -> None:
    del s[-1]


def _previous_item_deleted(s: list[dict]) -> None:
    i = where(s, "conversation.item.added", 3)  # the tool output, after the call c1
    s.insert(i, {"type": "conversation.item.deleted", "event_id": "del", "item_id": "c1"})


BREAKAGES: dict[str, Callable[[list[dict]], None]] = {
    f.__name__.lstrip("_"): f for f in (
        _item_done_twice, _conv_item_done_twice, _conv_done_before_added,
        _conv_done_before_output_item_done, _gap_in_output_index, _out_of_order_output_index,
        _delta_with_other_output_index, _delta_with_other_response_id, _item_in_two_responses,
        _delta_of_another_response_s_item, _response_created_completed,
        _response_done_in_progress, _details_disagree, _completed_with_incomplete_item,
        _output_status_disagrees, _output_misses_an_item, _output_out_of_order,
        _item_done_in_progress, _item_added_completed, _response_done_with_open_item,
        _part_index_skips, _delta_after_part_done, _delta_after_item_done,
        _stream_done_twice, _delta_after_stream_done, _part_done_before_stream_done,
        _item_done_with_part_open, _call_item_done_before_arguments_done,
        _left_open_at_the_end, _previous_item_deleted)}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_each_broken_stream_is_caught(name: str) -> None:
    s = copy.deepcopy(good_stream())
    BREAKAGES[name](s)
    with pytest.raises(ContractViolation):
        check(s)


def _lifecycle_indexes() -> list[int]:
    return [i for i, e in enumerate(good_stream()) if not e["type"].endswith(".delta")]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(_lifecycle_indexes()))
def test_dropping_any_lifecycle_event_is_caught(i: int) -> None:
    s = good_stream()
    del s[i]
    with pytest.raises(ContractViolation):
        check(s)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(_lifecycle_indexes()))
def test_repeating_any_lifecycle_event_is_caught(i: int) -> None:
    s = good_stream()
    s.insert(i + 1, dict(copy.deepcopy(s[i]), event_id="repeat"))
    with pytest.raises(ContractViolation):
        check(s)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(range(len(good_stream()))))
def test_a_prefix_of_the_good_stream_is_fine_until_finish(k: int) -> None:
    """feed() judges events as they come: any prefix passes; only finish() asks for the
    end (the server's own checker never calls it: a session may end mid-answer)."""
    c = ContractChecker()
    assert c.check_all(good_stream()[:k]) == k


def test_an_item_may_be_added_again_after_it_was_deleted() -> None:
    s = good_stream()[:2] + [
        {"type": "conversation.item.deleted", "event_id": "d1", "item_id": "u1"},
        dict(good_stream()[0], event_id="re1"), dict(good_stream()[1], event_id="re2")]
    assert check(s) == 5


# ------------------------------------------- regressions found by the third-party clients


@pytest.mark.anyio
async def test_after_deleting_the_last_item_the_next_follows_the_one_before(
        server: Server) -> None:  # noqa: F811
    """LiveKit deletes items (truncate at 0 ms, chat context edits) and places the next item
    by its previous_item_id: that must be an item still in the conversation."""
    async with raw_client(server) as c:
        await c.until("session.created")
        await c.say("first")
        first = (await c.until("conversation.item.done"))[-1]["item"]["id"]
        await c.say("second")
        second = (await c.until("conversation.item.done"))[-1]["item"]["id"]
        await c.send({"type": "conversation.item.delete", "item_id": second})
        await c.until("conversation.item.deleted", item_id=second)
        await c.say("third")
        added = (await c.until("conversation.item.added"))[-1]
        assert added["previous_item_id"] == first
        await c.send({"type": "conversation.item.delete", "item_id": added["item"]["id"]})
        await c.send({"type": "conversation.item.delete", "item_id": first})
        await c.until("conversation.item.deleted", item_id=first)
        await c.say("fourth")
        assert (await c.until("conversation.item.added"))[-1]["previous_item_id"] is None


@pytest.mark.anyio
async def test_a_create_with_an_existing_id_is_the_code_livekit_knows(
        server: Server) -> None:  # noqa: F811
    """LiveKit's update_chat_ctx takes ``item_create_duplicate_item_id`` (matched by the
    error's event_id) as "the item is there already"; any other code fails its update."""
    async with raw_client(server) as c:
        await c.until("session.created")
        item = {"id": "item_mine", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "hi"}]}
        await c.send({"type": "conversation.item.create", "item": item})
        await c.until("conversation.item.done")
        await c.send({"type": "conversation.item.create", "event_id": "dup1", "item": item})
        err = (await c.until("error"))[-1]["error"]
        assert err["code"] == "item_create_duplicate_item_id"
        assert err["event_id"] == "dup1" and err["param"] == "item.id"
        with anyio.fail_after(10):
            await c.send({"type": "response.create"})  # the session goes on
            done = (await c.until("response.done"))[-1]
        assert done["response"]["status"] == "completed"

"""``omniframe serve`` with a preemptive VAD (``tentative_ms``): a question with a
mid-sentence pause gives the client the events of one user turn (one speech_started, one
speech_stopped with the same item) and the answer to the whole question; the retracted
tentative turn sends nothing. Every event is checked against the contract."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("websockets")

from omniframe.testing import speech_like  # noqa: E402
from tests.test_serve import Server, raw_client, types  # noqa: E402

pytestmark = pytest.mark.anyio

PAUSED = [("silence", 0.5), ("speech", 1.0), ("silence", 0.3), ("speech", 0.6),
          ("silence", 1.0)]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server("--set", "vad.options.tentative_ms=150", "--set", "vad.options.post_roll_ms=100")
    yield s
    s.stop()
    log = "".join(s.lines)
    assert "breaks the contract" not in log, log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("pattern", [PAUSED, PAUSED[:2] + PAUSED[-1:]],
                         ids=["mid-sentence-pause", "plain"])
async def test_one_user_turn_and_the_answer_to_all_of_it(server: Server, pattern) -> None:
    async with raw_client(server) as c:
        await c.recv()  # session.created
        x = speech_like(pattern, sample_rate=24000)
        await c.append(x)
        evs = await c.until("response.done")
    kinds = types(evs)
    assert kinds.count("input_audio_buffer.speech_started") == 1
    assert kinds.count("input_audio_buffer.speech_stopped") == 1
    assert kinds.count("input_audio_buffer.committed") == 1
    assert "error" not in kinds, [e for e in evs if e["type"] == "error"]
    started = next(e for e in evs if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in evs if e["type"] == "input_audio_buffer.speech_stopped")
    assert started["item_id"] == stopped["item_id"]
    # pre-roll 0.3 s + all the speech (+ the pause) + post-roll 0.1 s
    speech = sum(d for k, d in pattern[1:-1]) + 0.4
    done = evs[-1]["response"]
    said = done["output"][0]["content"][0]["transcript"]
    assert said == f"I heard {speech:.1f} seconds of speech.", said

"""The cascade LM under steering (issue 10): answer now (``RespondFrame``, with one answer's
own instructions) and live option updates, on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from omniframe_cascade.lm import TransformersLM  # noqa: E402
from omniframe_cascade.tests.test_lm_reliability import _save_tiny  # noqa: E402

from omniframe.frames import EndOfTurnFrame, RespondFrame, TranscriptFrame  # noqa: E402
from omniframe.pipeline import update_problem  # noqa: E402
from omniframe.testing import make_stage  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-lm"))


async def test_respond_answers_from_the_history_with_its_own_instructions(tiny: Path) -> None:
    stage = make_stage(TransformersLM, model=str(tiny), system_prompt="hello",
                       max_new_tokens=4)
    await stage.setup()
    out = [f async for f in stage.process(TranscriptFrame(text="how are you", turn=1))]
    assert isinstance(out[-1], EndOfTurnFrame) and out[-1].turn in (0, 1)
    out = [f async for f in stage.process(RespondFrame(turn=2, instructions="answer yes"))]
    assert isinstance(out[-1], EndOfTurnFrame) and out[-1].reason != "error"
    system = stage.last_messages[0]
    assert system["role"] == "system" and system["content"] == "hello\n\nanswer yes"
    assert any(m["content"] == "how are you" for m in stage.last_messages)
    # the instructions were for that answer only
    [f async for f in stage.process(RespondFrame(turn=3))]
    assert stage.last_messages[0]["content"] == "hello"


def test_live_options_of_the_lm_and_the_tts() -> None:
    from omniframe_cascade.tts import EspeakTTS

    lm = make_stage(TransformersLM, model="unused")
    assert update_problem(lm, {"system_prompt": "Be brief.", "temperature": 0.7}) is None
    assert "cannot change 'model'" in (update_problem(lm, {"model": "x"}) or "")
    assert "temperature" in (update_problem(lm, {"temperature": -1}) or "")
    tts = make_stage(EspeakTTS)
    assert update_problem(tts, {"voice": "en-gb", "rate": 200}) is None

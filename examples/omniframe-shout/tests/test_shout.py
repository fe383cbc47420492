"""The plugin's own test, written with omniframe's test kit."""

from __future__ import annotations

import pytest
from omniframe_shout import Shout

from omniframe import EndOfTurnFrame, TextDeltaFrame, TranscriptFrame
from omniframe.testing import make_stage, run_stage

pytestmark = pytest.mark.anyio


async def test_shouts_the_transcript() -> None:
    out = await run_stage(make_stage(Shout, suffix="!!"), [TranscriptFrame(text="hi", turn=1)])
    assert [type(f) for f in out] == [TextDeltaFrame, EndOfTurnFrame]
    assert out[0].text == "HI!!"
    assert out[0].turn == 1

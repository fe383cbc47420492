"""Cancelling a Mini-Omni turn at any point leaves the shared model usable (issue 11, defect 2).

A barge-in cancels the LM's ``process`` call wherever it is: waiting for the model lock, while
the stream is made, while a decode step runs on the compute thread, at a yield. Whatever the
point, the step in flight must finish (or never start) before the stream is closed, the lock
must be released, and the next turn must give exactly the answer of a fresh run.
"""

from __future__ import annotations

from contextlib import aclosing

import anyio
import anyio.lowlevel
import pytest

from omniframe.frames import AudioCodesFrame, FeaturesFrame, Frame, TextDeltaFrame
from omniframe.resources import Resources
from omniframe.session import Session
from omniframe.stage import StageContext

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("_one_thread")]

torch = pytest.importorskip("torch")

from omniframe_mini_omni.stages import MiniOmniLM  # noqa: E402


def _lm(resources: Resources, **options: object) -> MiniOmniLM:
    ctx = StageContext(name="lm", session=Session(), resources=resources)
    return MiniOmniLM({"model": "random://tiny", "max_new_tokens": 10, **options}, ctx)


def _features(turn: int) -> FeaturesFrame:
    return FeaturesFrame(features=torch.ones(12, 768) * 0.01 * turn, frame_rate=50, turn=turn)


def _tokens(frames: list[Frame]) -> list[object]:
    return [(type(f).__name__, getattr(f, "text", None), getattr(f, "codes", None))
            for f in frames if isinstance(f, TextDeltaFrame | AudioCodesFrame)]


async def _turn(lm: MiniOmniLM, frame: Frame, cancel_after: int | None) -> list[Frame]:
    """Run one turn; cancel it after ``cancel_after`` event-loop checkpoints (None: never)."""
    out: list[Frame] = []
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            if cancel_after is not None:
                async def cancel() -> None:
                    for _ in range(cancel_after):
                        await anyio.lowlevel.checkpoint()
                    scope.cancel()

                tg.start_soon(cancel)
            async with aclosing(lm.process(frame)) as gen:
                async for f in gen:
                    out.append(f)
            tg.cancel_scope.cancel()
    return out


async def test_cancel_at_every_point_of_a_turn():
    resources = Resources()
    lm = _lm(resources)
    await lm.setup()
    reference = _tokens(await _turn(lm, _features(1), None))
    assert reference
    cancelled_inside = 0
    for n in range(0, 240, 3):
        with anyio.fail_after(30):
            out = await _turn(lm, _features(2), n)
        if len(_tokens(out)) < len(reference):
            cancelled_inside += 1
        # the model is free again, and no step of the cancelled turn is still running
        assert lm.lm.lock.acquire(blocking=False), f"lock held after a cancel at {n}"
        lm.lm.lock.release()
        with anyio.fail_after(30):
            again = _tokens(await _turn(lm, _features(1), None))
        assert again == reference, f"the turn after a cancel at checkpoint {n} differs"
    assert cancelled_inside > 10  # the sweep really cut turns at many points
    await lm.teardown()


def test_ctrl_c_while_decoding_is_an_interrupt_not_a_crash(tmp_path):
    """Defect 4: a real ``omniframe run`` of the Mini-Omni config (random weights), SIGINT while
    the LM decodes: exit 130 within 2 s saying "interrupted", no stage blamed, a valid WAV."""
    import sys
    from pathlib import Path

    import numpy as np
    import soundfile as sf

    from omniframe.testing import interrupt_when, speech_like

    root = Path(__file__).resolve().parents[3]
    question, answer = tmp_path / "q.wav", tmp_path / "a.wav"
    sf.write(question, speech_like([("silence", 0.3), ("speech", 1.0), ("silence", 1.2)]),
             16000)
    got = interrupt_when(
        [sys.executable, "-m", "omniframe", "run", str(root / "configs" / "mini_omni.yaml"),
         "--input", str(question), "--output", str(answer), "--realtime",
         "--set", "encoder.options.model=random://test-768",
         "--set", "encoder.options.trim=true", "--set", "lm.options.model=random://tiny",
         "--set", "lm.options.max_new_tokens=1900",
         "--set", "codec.options.model=random://snac_24khz"],
        "agent:", delay=0.5, cwd=tmp_path)  # the LM is decoding
    code, elapsed, out = got.code, got.elapsed, got.output
    assert code == 130, out[-2000:]
    assert elapsed < 2.0
    assert "failed" not in out and "Traceback" not in out
    # "interrupted", or, on a machine so loaded that a step outlasts the 1.2 s grace,
    # "interrupted (the run did not stop within 1.2 s; ...)": exit 130 within 2 s either way
    assert out.rstrip().splitlines()[-1].startswith("interrupted")
    data, rate = sf.read(answer)  # a valid file: the answer so far (or empty if none came)
    assert np.isfinite(data).all() and (rate == 24000 or len(data) == 0)

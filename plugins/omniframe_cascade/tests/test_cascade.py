"""The whole offline cascade from configs/cascade.yaml on real models: espeak-ng asks,
Silero VAD -> Whisper tiny.en -> SmolLM2-135M -> espeak-ng answer, written to a wav file.

Each model loads once per test session (see conftest); these tests are slow."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest
from omniframe_cascade.text import word_error_rate

from omniframe.config import build_pipeline, load_config
from omniframe.frames import EndOfTurnFrame, OutputAudioFrame, TextDeltaFrame
from omniframe.pipeline import StageError
from omniframe.session import Session

from .conftest import CASCADE_YAML, QUESTION, needs_espeak, write_wav

pytestmark = [pytest.mark.anyio, needs_espeak]


def cascade(inp: Path | list[Path], out: Path, *extra: str, session: Session | None = None):
    paths = [str(p) for p in inp] if isinstance(inp, list) else str(inp)
    overrides = [f"source.options.path={paths!r}".replace("'", '"'), f"wav.options.path={out}",
                 *extra]
    cfg = load_config(CASCADE_YAML, overrides)
    return build_pipeline(cfg, session=session or Session())


def transcribe_file(model, path: Path) -> str:
    """Whisper tiny.en (already loaded) on a wav file written by the pipeline."""
    from omniframe.audio import read_audio

    samples, _ = read_audio(path, 16000)
    segments, _ = model.transcribe(samples, language="en", beam_size=1, vad_filter=True)
    return " ".join(s.text.strip() for s in segments)


@pytest.mark.slow
async def test_answers_a_spoken_question_with_speech_that_says_its_text(
        tmp_path: Path, question_wav: Path, smollm, whisper_tiny) -> None:
    out = tmp_path / "answer.wav"
    pipeline = cascade(question_wav, out)
    with anyio.fail_after(240):
        result = await pipeline.run()
    (turn,) = result.turns
    # the transcript is what espeak-ng said
    assert word_error_rate(QUESTION, turn.transcript) <= 0.2, turn.transcript
    # the agent answered, in text and in speech
    assert turn.text.strip() and turn.end_reason in ("completed", "max_tokens")
    assert "paris" in turn.text.lower(), turn.text
    assert turn.audio_out_s > 0.5 and out.exists()
    # its speech, transcribed again, says its text
    spoken = transcribe_file(whisper_tiny, out)
    assert word_error_rate(turn.text, spoken) <= 0.25, (turn.text, spoken)
    # latency figures are there, in order
    assert turn.voice_to_voice_s is not None and turn.asr_s is not None
    assert 0 < turn.asr_s < turn.first_text_s <= turn.voice_to_voice_s
    # the conversation was recorded
    assert [m["role"] for m in pipeline.session.history()] == ["user", "assistant"]


@pytest.mark.slow
async def test_silence_and_noise_get_no_answer(tmp_path: Path, smollm, whisper_tiny) -> None:
    rng = np.random.default_rng(1)
    silence = write_wav(tmp_path / "silence.wav", np.zeros(3 * 16000, np.float32))
    noise = write_wav(tmp_path / "noise.wav",
                      (0.3 * rng.standard_normal(3 * 16000)).astype(np.float32))
    for inp in (silence, noise):
        pipeline = cascade(inp, tmp_path / "answer.wav", "pipeline[1].plugin=energy",
                           "pipeline[1].options={}")  # energy VAD: noise opens a turn
        with anyio.fail_after(120):
            result = await pipeline.run()
        frames = result.frames or []
        assert not [f for f in frames if isinstance(f, TextDeltaFrame | OutputAudioFrame)]
        ends = [f for f in frames if isinstance(f, EndOfTurnFrame)]
        assert all(f.reason == "empty" for f in ends)
        assert pipeline.session.history() == []


@pytest.mark.slow
async def test_other_sample_rates_and_a_sixty_second_question(
        tmp_path: Path, question_audio, smollm, whisper_tiny) -> None:
    from omniframe.audio import resample
    from omniframe.testing import espeak

    q44 = write_wav(tmp_path / "q44.wav", resample(question_audio, 16000, 44100), 44100)
    sentence = "I would like to know how many people live in London and why it rains so much."
    one = espeak(sentence, rate=175)
    voiced = np.flatnonzero(np.abs(one) > 0.002)
    one = np.concatenate([one[voiced[0]:voiced[-1] + 1], np.zeros(3200, np.float32)])
    reps = int(np.ceil(60 * 16000 / len(one)))  # no pause long enough to end the turn
    long_q = np.concatenate([one] * reps)
    q60 = write_wav(tmp_path / "q60.wav", long_q)
    pipeline = cascade([q44, q60], tmp_path / "answer.wav", "source.options.gap_s=2.0",
                       "lm.options.max_new_tokens=16")
    with anyio.fail_after(300):
        result = await pipeline.run()
    assert [t.end_reason in ("completed", "max_tokens") for t in result.turns] == [True, True]
    first, second = result.turns
    assert word_error_rate(QUESTION, first.transcript) <= 0.2
    assert second.user_audio_s > 55  # one turn, not cut at Whisper's 30 s
    assert word_error_rate(" ".join([sentence] * reps), second.transcript) <= 0.2
    assert second.text.strip()


async def test_a_missing_model_folder_stops_the_run_naming_the_stage(tmp_path: Path,
                                                                     question_wav) -> None:
    pipeline = cascade(question_wav, tmp_path / "a.wav",
                       f"encoder.options.model={tmp_path / 'no-model'}")
    with anyio.fail_after(120), pytest.raises(StageError) as err:
        await pipeline.run()
    msg = str(err.value)
    assert "'encoder'" in msg and "setup" in msg and "no-model" in msg and "does not exist" in msg


@pytest.mark.slow
async def test_barge_in_cancels_the_answer_and_the_new_question_is_answered(
        tmp_path: Path, smollm, whisper_tiny) -> None:
    from omniframe.testing import espeak

    q1 = write_wav(tmp_path / "q1.wav", espeak("Tell me a long story about a dragon.", rate=175))
    q2 = write_wav(tmp_path / "q2.wav", espeak(QUESTION, rate=175))
    out = tmp_path / "answer.wav"
    session = Session()
    pipeline = cascade(
        # q2 starts 8 s after q1 ends: answer 1 is under way (it is 15-20 s long), even on a
        # busy machine where the ASR and the LM's first words take a few seconds
        [q1, q2], out, "source.options.realtime=true", "source.options.gap_s=8.0",
        "wav.options.realtime=true", "lm.options.max_new_tokens=64",
        "lm.options.system_prompt=You are a storyteller. Always tell long stories.",
        session=session)
    with anyio.fail_after(240):
        result = await pipeline.run()
    assert len(result.turns) == 2
    # answer 1 was cut: the history keeps only what was heard (possibly nothing)
    first = session.last("assistant", 1)
    assert first is not None, f"turn 1 was never answered: {result.turns[0].summary()}"
    assert first.interrupted, result.turns[0].summary()
    assert first.heard is not None and len(first.heard) < len(first.text)
    assert first.text.startswith(first.heard)
    # the new question was answered in full
    second = result.turns[1]
    assert word_error_rate(QUESTION, second.transcript) <= 0.2
    assert second.end_reason in ("completed", "max_tokens") and second.audio_out_s > 0.5
    hist = session.history()
    assert [m["role"] for m in hist if m["role"] == "user"] == ["user", "user"]
    assert hist[-1] == {"role": "assistant", "content": second.text.strip()}
    # the answers in the file: the cut first one plus the whole second one
    import soundfile as sf

    played = sf.info(str(out)).duration
    first_turn = result.turns[0]
    # audio out of the cut answer is what the sink played, not all the TTS made
    assert first_turn.audio_out_s < first_turn.audio_produced_s
    assert played == pytest.approx(first_turn.audio_out_s + second.audio_out_s, abs=0.05)

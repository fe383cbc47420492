"""SNAC codec: loading (official folder format, random, offline hf://) and streaming decode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import numpy as np
import pytest

from omniframe.frames import AudioCodesFrame, EndOfTurnFrame, InterruptFrame, OutputAudioFrame
from omniframe.model_uris import ModelNotAvailable
from omniframe.resources import Resources
from omniframe.session import Session
from omniframe.stage import StageContext
from omniframe.testing import run_stage

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("_one_thread")]

torch = pytest.importorskip("torch")
pytest.importorskip("snac")

from omniframe_mini_omni import tokens  # noqa: E402
from omniframe_mini_omni.snac_codec import (  # noqa: E402
    SAMPLES_PER_FRAME,
    SNAC_24KHZ_CONFIG,
    ChunkedDecoder,
    decode_frames,
    load_snac,
    random_snac,
    save_snac,
)
from omniframe_mini_omni.stages import SnacCodec  # noqa: E402


@pytest.fixture(scope="module")
def snac_model(_one_thread):
    """Random-weight snac_24khz without noise (deterministic)."""
    return load_snac("random://snac_24khz", deterministic=True)


def random_frames(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in rng.integers(0, 4096, 7)) for _ in range(n)]


def codec_stage(resources: Resources | None = None, **options) -> SnacCodec:
    ctx = StageContext(name="codec", session=Session(), resources=resources or Resources())
    return SnacCodec({"model": "random://snac_24khz", "deterministic": True, **options}, ctx)


# ----------------------------------------------------------------------------- library


def test_official_config_and_size():
    model = random_snac()
    n = sum(p.numel() for p in model.parameters())
    assert 19e6 < n < 20e6  # 19.8M in the model card (weight-norm g/v counted once here)
    assert model.hop_length == 512 and model.vq_strides == [4, 2, 1]
    assert SNAC_24KHZ_CONFIG["sampling_rate"] == 24000


def test_frame_is_2048_samples_and_regrouping(snac_model):
    frames = random_frames(3)
    audio = decode_frames(snac_model, frames)
    assert audio.shape == (3 * SAMPLES_PER_FRAME,) and audio.dtype == np.float32
    # decode_frames regroups with tokens.frames_to_codebooks (depth-first 7 -> 1/2/4)
    books = tokens.frames_to_codebooks(frames)
    codes = [torch.tensor(b).unsqueeze(0) for b in books]
    with torch.inference_mode():
        ref = snac_model.decode(codes).reshape(-1).numpy()
    np.testing.assert_allclose(audio, np.clip(ref, -1, 1), atol=1e-6)


def test_specials_never_reach_snac(snac_model):
    with pytest.raises(ValueError, match="must never reach the codec"):
        decode_frames(snac_model, [(1, 2, 3, 4, 5, 6, tokens.EOA)])
    dec = ChunkedDecoder(snac_model, frames_per_chunk=1)
    assert not dec.push((1, 2, 3, 4096, 5, 6, 7))
    assert not dec.push((1, 2, 3))  # wrong length
    assert dec.push((1, 2, 3, 4, 5, 6, 7))
    assert dec.dropped == 2 and len(dec.frames) == 1


def test_deterministic_removes_noise():
    frames = random_frames(2)
    noisy = load_snac("random://snac_24khz")
    a, b = decode_frames(noisy, frames), decode_frames(noisy, frames)
    assert not np.array_equal(a, b)  # the reference's NoiseBlocks: fresh noise every call
    quiet = load_snac("random://snac_24khz", deterministic=True)
    np.testing.assert_array_equal(decode_frames(quiet, frames), decode_frames(quiet, frames))


@pytest.mark.parametrize("per_chunk", [1, 4])
def test_chunked_with_context_equals_one_shot(snac_model, per_chunk):
    frames = random_frames(11)
    full = decode_frames(snac_model, frames)
    dec = ChunkedDecoder(snac_model, per_chunk, context_frames=3, lookahead_frames=3)
    parts = []
    for f in frames:
        dec.push(f)
        parts += dec.pop_ready()
    tail = dec.flush()
    assert tail is not None  # the final partial chunk is decoded, not dropped
    out = np.concatenate([*parts, tail])
    assert out.shape == full.shape
    np.testing.assert_allclose(out, full, atol=1e-5)


def test_small_first_chunk_then_full_chunks(snac_model):
    """first_chunk_frames=1: audio after the first frame, then chunks of frames_per_chunk;
    with context on both sides the stream still equals one-shot decoding."""
    frames = random_frames(10)
    full = decode_frames(snac_model, frames)
    dec = ChunkedDecoder(snac_model, 4, context_frames=3, lookahead_frames=3,
                         first_chunk_frames=1)
    sizes, parts = [], []
    for f in frames:
        dec.push(f)
        for part in dec.pop_ready():
            sizes.append(len(part) // SAMPLES_PER_FRAME)
            parts.append(part)
    tail = dec.flush()
    assert tail is not None
    assert sizes == [1, 4]  # 1 + 4 frames out; 5 left for the end of the turn
    np.testing.assert_allclose(np.concatenate([*parts, tail]), full, atol=1e-5)
    with pytest.raises(ValueError, match="first_chunk_frames must be >= 1"):
        ChunkedDecoder(snac_model, 4, first_chunk_frames=0)


def test_independent_chunks_differ_at_borders(snac_model):
    """The reference's independent 4-frame chunks are not one-shot decoding: the decoder's
    receptive field is cut at chunk borders (what context/lookahead fix)."""
    frames = random_frames(12)
    full = decode_frames(snac_model, frames)
    chunks = np.concatenate([decode_frames(snac_model, frames[:6]),
                             decode_frames(snac_model, frames[6:])])
    err = np.abs(chunks - full)
    border = err[6 * SAMPLES_PER_FRAME - 512 : 6 * SAMPLES_PER_FRAME + 512].max()
    middle = err[3 * SAMPLES_PER_FRAME - 64 : 3 * SAMPLES_PER_FRAME + 64].max()
    assert border > 1e-3 and middle < border / 100


def test_load_local_folder_official_format(tmp_path: Path):
    src = random_snac(seed=7)
    folder = save_snac(src, tmp_path / "snac_24khz")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    loaded = load_snac(str(folder), deterministic=True)
    ref = random_snac(seed=7)
    from omniframe_mini_omni.snac_codec import disable_noise

    disable_noise(ref)
    frames = random_frames(2)
    np.testing.assert_allclose(decode_frames(loaded, frames), decode_frames(ref, frames),
                               atol=1e-6)


def test_bad_sources_have_clear_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match="lacks config.json, pytorch_model.bin"):
        load_snac(str(tmp_path / "empty"))
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load_snac(str(tmp_path / "nope"))
    with pytest.raises(ModelNotAvailable, match="unknown SNAC preset"):
        load_snac("random://snac_44khz")


def test_offline_hf_message(tmp_path: Path):
    """hf:// with HF_HUB_OFFLINE=1 and an empty cache: the error says what to do."""
    code = textwrap.dedent("""
        from omniframe_mini_omni.snac_codec import load_snac
        try:
            load_snac("hf://hubertsiuzdak/snac_24khz")
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    assert out.startswith("ModelNotAvailable")
    assert "hubertsiuzdak/snac_24khz" in out and "local folder" in out


# ----------------------------------------------------------------------------- the stage


def code_frames(frames, turn: int = 1) -> list[AudioCodesFrame]:
    return [AudioCodesFrame(codes=f, index=i, turn=turn) for i, f in enumerate(frames)]


async def test_stage_streams_chunks_flushes_tail_and_forwards_end(snac_model):
    frames = random_frames(10)
    res = Resources()
    stage = codec_stage(res, frames_per_chunk=4)
    with anyio.fail_after(60):
        out = await run_stage(stage, [*code_frames(frames), EndOfTurnFrame(turn=1, text="hi")])
    audio = [f for f in out if isinstance(f, OutputAudioFrame)]
    assert [len(f.samples) for f in audio] == [4 * 2048, 4 * 2048, 2 * 2048]  # tail decoded
    assert all(f.sample_rate == 24000 and f.turn == 1 for f in audio)
    assert isinstance(out[-1], EndOfTurnFrame) and out[-1].text == "hi"  # after the audio
    # independent 4-frame chunks: each chunk equals decoding those frames alone
    np.testing.assert_allclose(audio[0].samples, decode_frames(snac_model, frames[:4]),
                               atol=1e-5)


async def test_stage_reference_mode_drops_tail():
    stage = codec_stage(frames_per_chunk=4, decode_tail=False)
    with anyio.fail_after(60):
        out = await run_stage(stage, [*code_frames(random_frames(6)), EndOfTurnFrame(turn=1)])
    assert [len(f.samples) for f in out if isinstance(f, OutputAudioFrame)] == [4 * 2048]


async def test_stage_context_chunks_equal_one_shot(snac_model):
    frames = random_frames(9, seed=3)
    stage = codec_stage(frames_per_chunk=2, context_frames=3, lookahead_frames=3)
    with anyio.fail_after(60):
        out = await run_stage(stage, [*code_frames(frames), EndOfTurnFrame(turn=1)])
    audio = np.concatenate([f.samples for f in out if isinstance(f, OutputAudioFrame)])
    np.testing.assert_allclose(audio, decode_frames(snac_model, frames), atol=1e-5)


async def test_stage_drops_special_frames():
    good = random_frames(4)
    bad = (5, 5, 5, 5, 5, 5, tokens.PAD_A)
    stage = codec_stage(frames_per_chunk=4)
    with anyio.fail_after(60):
        out = await run_stage(stage, [*code_frames([good[0], bad, *good[1:]]),
                                      EndOfTurnFrame(turn=1)])
    assert [len(f.samples) for f in out if isinstance(f, OutputAudioFrame)] == [4 * 2048]
    assert stage.dropped_frames == 1


async def test_stage_interrupt_drops_buffer_and_new_turn_starts_fresh():
    stage = codec_stage(frames_per_chunk=4)
    frames = random_frames(6)
    seq = [*code_frames(frames[:3], turn=1), InterruptFrame(turn=2),
           *code_frames(frames[3:5], turn=2), EndOfTurnFrame(turn=2)]
    with anyio.fail_after(60):
        out = await run_stage(stage, seq)
    audio = [f for f in out if isinstance(f, OutputAudioFrame)]
    assert [(f.turn, len(f.samples)) for f in audio] == [(2, 2 * 2048)]


async def test_stage_rejects_other_codecs():
    from omniframe.pipeline import StageError

    stage = codec_stage()
    with anyio.fail_after(60), pytest.raises(StageError, match="snac_24khz"):
        await run_stage(stage, [AudioCodesFrame(codes=(1,) * 8, codec="mimi", turn=1)])

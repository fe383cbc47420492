"""The Mini-Omni stages through the real Pipeline, with random weights (CPU, small)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

from omniframe.frames import (
    AudioCodesFrame,
    EndOfTurnFrame,
    ErrorFrame,
    FeaturesFrame,
    InterruptFrame,
    OutputAudioFrame,
    TextDeltaFrame,
    TranscriptFrame,
    UserTurnFrame,
)
from omniframe.pipeline import Pipeline, StageError
from omniframe.resources import Resources
from omniframe.session import Session
from omniframe.stage import StageContext
from omniframe.testing import ListSource, run_frames, speech_like

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("_one_thread")]

torch = pytest.importorskip("torch")
pytest.importorskip("whisper")
pytest.importorskip("snac")

from omniframe_mini_omni import tokens  # noqa: E402
from omniframe_mini_omni.lm_stage import MiniOmniLM, _ByteTokenizer, _random_lm  # noqa: E402
from omniframe_mini_omni.snac_stage import SnacCodec  # noqa: E402
from omniframe_mini_omni.whisper_stage import WhisperEncoderStage  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.fixture(scope="module")
def resources(_one_thread) -> Resources:
    """One cache for the module: the random models are built once."""
    return Resources()


def chain(resources: Resources, *, lm: dict | None = None, codec: dict | None = None,
          encoder: dict | None = None, session: Session | None = None) -> list:
    session = session or Session()

    def ctx(name: str) -> StageContext:
        return StageContext(name=name, session=session, resources=resources)

    return [
        WhisperEncoderStage({"model": "random://test-768", "trim": True, **(encoder or {})},
                            ctx("encoder")),
        MiniOmniLM({"model": "random://tiny", "max_new_tokens": 16, **(lm or {})}, ctx("lm")),
        SnacCodec({"model": "random://snac_24khz", "deterministic": True, **(codec or {})},
                  ctx("codec")),
    ]


def user_turn(seconds: float = 0.8, turn: int = 1) -> UserTurnFrame:
    audio = speech_like([("speech", seconds)], seed=turn)
    return UserTurnFrame(samples=audio, sample_rate=16000, turn=turn,
                         speech_end_ts=time.monotonic())


def write_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE tokenizer.json (real multi-byte behaviour, like Qwen2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return folder / "tokenizer.json"


# ---------------------------------------------------------------------------------- A1A2


async def test_speech_to_speech_end_to_end(resources, tmp_path):
    trace = tmp_path / "trace.jsonl"
    stages = chain(resources, lm={"trace": str(trace)})
    result = await run_frames(stages, [user_turn()], timeout=120)
    frames = result.frames
    deltas = [f for f in frames if isinstance(f, TextDeltaFrame)]
    audio = [f for f in frames if isinstance(f, OutputAudioFrame)]
    ends = [f for f in frames if isinstance(f, EndOfTurnFrame)]
    assert deltas and audio and len(ends) == 1
    assert all(f.turn == 1 for f in deltas + audio + ends)
    # 16 steps: frames 0..8 (step >= 7); frames with specials are dropped, the rest decoded
    n_audio = sum(len(f.samples) for f in audio)
    assert n_audio % 2048 == 0 and 0 < n_audio <= 9 * 2048
    assert all(f.sample_rate == 24000 for f in audio)
    assert frames.index(ends[0]) > max(frames.index(f) for f in audio)  # end after the audio
    assert ends[0].reason == "max_tokens" and ends[0].text == "".join(d.text for d in deltas)
    # the trace: one line per step with the 7 fed-back local audio ids and the text id
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(16))
    assert all(len(x["audio"]) == 7 and x["turn"] == 1 for x in lines)
    history = stages[1].context.session.history()
    assert [m["role"] for m in history] == ["user", "assistant"]


async def test_codes_follow_the_delay_pattern(resources):
    """AudioCodesFrames: one per step from step 7 on, aligned frame f = layer i at f+i+1."""
    enc, lm, _ = chain(resources, lm={"max_new_tokens": 12})
    result = await run_frames([enc, lm], [user_turn()], timeout=120)
    codes = [f for f in result.frames if isinstance(f, AudioCodesFrame)]
    assert [c.index for c in codes] == list(range(12 - 7))
    assert all(len(c.codes) == 7 and c.codec == "snac_24khz" for c in codes)


async def test_same_answer_as_the_library(resources):
    """The stage streams exactly what generate() records for the same features."""
    from omniframe_mini_omni.generate import generate

    enc, lm, _ = chain(resources, lm={"max_new_tokens": 10})
    turn = user_turn()
    result = await run_frames([enc, lm], [turn], timeout=120)
    codes = [f.codes for f in result.frames if isinstance(f, AudioCodesFrame)]
    feats = enc.encoder.encode(turn.samples, 16000, trim=True)
    with torch.inference_mode():  # the stage left inference-mode KV caches on the model
        ref = generate(lm.lm.model, "A1A2", whisper_features=feats, batch_parallel=True,
                       max_steps=10)
    assert [tuple(f) for f in ref.frames] == codes
    text = lm.tokenizer.decode(ref.text_tokens)
    assert "".join(f.text for f in result.frames if isinstance(f, TextDeltaFrame)) == text


async def test_special_frames_never_reach_snac(resources):
    """Frames with pads/EOA are dropped by the codec (random weights produce some)."""
    enc, lm, codec = chain(resources, lm={"max_new_tokens": 24}, codec={"frames_per_chunk": 1})
    result = await run_frames([enc, lm], [user_turn(turn=5)], timeout=120)
    frames = [f for f in result.frames if isinstance(f, AudioCodesFrame)]
    good = sum(tokens.is_code_frame(f.codes) for f in frames)
    out = await run_frames([codec], frames + [EndOfTurnFrame(turn=5)], timeout=120)
    n = sum(len(f.samples) for f in out.frames if isinstance(f, OutputAudioFrame))
    assert n == good * 2048
    assert codec.dropped_frames == len(frames) - good


async def test_event_loop_stays_live_and_interrupt_stops_generation(resources):
    """Steps run in a worker thread: other tasks keep running; an InterruptFrame of a newer
    turn stops the decode loop between two steps."""
    session = Session()
    enc, lm, codec = chain(resources, lm={"max_new_tokens": 2000}, session=session)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    feats = FeaturesFrame(features=torch.zeros(20, 768), frame_rate=50, turn=1)
    src = ListSource([feats, InterruptFrame(turn=2)], interval=0.5,
                     context=StageContext(name="source", session=session))
    t0 = time.monotonic()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            result = await Pipeline([src, lm, codec]).run()
            tg.cancel_scope.cancel()
    elapsed = time.monotonic() - t0
    assert elapsed < 10  # 2000 steps would take far longer
    assert ticks > 20  # the loop ran while the model decoded
    ends = [f for f in result.frames if isinstance(f, EndOfTurnFrame)]
    assert [(e.turn, e.reason) for e in ends] == [(1, "interrupted")]
    deltas = [f for f in result.frames if isinstance(f, TextDeltaFrame)]
    assert 0 < len(deltas) < 2000
    # the next answer can use the shared model (the lock and the KV cache were released)
    lm2 = MiniOmniLM({"model": "random://tiny", "max_new_tokens": 3},
                     StageContext(name="lm", session=session, resources=resources))
    out = await run_frames([lm2], [FeaturesFrame(features=torch.zeros(5, 768), frame_rate=50,
                                                 turn=3)], timeout=60)
    assert any(isinstance(f, EndOfTurnFrame) and f.turn == 3 for f in out.frames)


# ----------------------------------------------------------------------------- other tasks


async def test_asr_task_is_text_only(resources):
    enc, lm, _ = chain(resources, lm={"task": "ASR", "max_new_tokens": 8})
    result = await run_frames([enc, lm], [user_turn()], timeout=120)
    assert not [f for f in result.frames if isinstance(f, AudioCodesFrame)]
    assert [f for f in result.frames if isinstance(f, EndOfTurnFrame)]


async def test_text_tasks_read_transcripts_with_a_real_tokenizer(resources, tmp_path):
    tok = write_tokenizer(tmp_path / "tok")
    session = Session()
    lm = MiniOmniLM({"model": "random://tiny", "task": "T1A2", "max_new_tokens": 12,
                     "tokenizer": str(tok)},
                    StageContext(name="lm", session=session, resources=resources))
    frames = [TranscriptFrame(text="héllo wörld", turn=1), TranscriptFrame(text="  ", turn=2)]
    result = await run_frames([lm], frames, timeout=120)
    ends = {f.turn: f for f in result.frames if isinstance(f, EndOfTurnFrame)}
    assert ends[2].reason == "empty"
    assert ends[1].reason == "max_tokens"
    assert [f for f in result.frames if isinstance(f, AudioCodesFrame)]  # T1A2 speaks
    text = "".join(f.text for f in result.frames if isinstance(f, TextDeltaFrame) and f.turn == 1)
    assert text == ends[1].text and "\ufffd" not in text  # multi-byte tokens never split


async def test_asr_transcript_feeds_a_text_task(resources):
    """configs/mini_omni_t1t2.yaml's chain: Mini-Omni ASR -> TranscriptFrame -> T1T2."""
    session = Session()
    enc, asr, _ = chain(resources, lm={"task": "ASR", "output": "transcript",
                                       "max_new_tokens": 6}, session=session)
    lm = MiniOmniLM({"model": "random://tiny", "task": "T1T2", "max_new_tokens": 6},
                    StageContext(name="lm2", session=session, resources=resources))
    turn = user_turn()
    seen: list = []

    class Spy:
        def on_frame(self, stage, kind, frame, now):
            seen.append((stage, frame))

    result = await run_frames([enc, asr, lm], [turn], timeout=120, observers=[Spy()])
    answer_types = (TranscriptFrame, TextDeltaFrame, EndOfTurnFrame, AudioCodesFrame)
    from_asr = [f for st, f in seen if st == "lm" and isinstance(f, answer_types)]
    (tr,) = from_asr  # one transcript, no deltas, no end of turn
    assert isinstance(tr, TranscriptFrame)
    assert tr.final and tr.turn == 1 and tr.speech_end_ts == turn.speech_end_ts
    ends = [f for f in result.frames if isinstance(f, EndOfTurnFrame)]
    assert len(ends) == 1  # only the answering stage ends the turn
    if tr.text:
        assert session.history()[0] == {"role": "user", "content": tr.text}


def test_transcript_output_needs_a_text_task():
    with pytest.raises(ValueError, match="text-output task"):
        MiniOmniLM.Options(task="A1A2", output="transcript")


def test_byte_stand_in_tokenizer_is_incremental():
    from omniframe_mini_omni.tokenizer import IncrementalDecoder

    dec = IncrementalDecoder(_ByteTokenizer())  # type: ignore[arg-type]
    pieces = [dec.push(b) for b in "né".encode()] + [dec.push(4000), dec.push(tokens.EOT)]
    assert pieces == ["n", "", "é", "<4000>", ""]


# ----------------------------------------------------------------------------- loading


async def test_local_checkpoint_folder_and_shared_cache(tmp_path, resources):
    from omniframe_mini_omni.checkpoint import load_mini_omni, save_checkpoint

    tok = write_tokenizer(tmp_path / "tok")
    bundle = load_mini_omni(preset="tiny", seed=3)
    folder = save_checkpoint(bundle.model, bundle.config, tmp_path / "ckpt",
                             tokenizer_files=[tok, tok.parent / "tokenizer_config.json"])
    shared = Resources()
    stages = [MiniOmniLM({"model": str(folder), "max_new_tokens": 9, "task": "A1T2"},
                         StageContext(name=f"lm{i}", session=Session(), resources=shared))
              for i in range(2)]
    for st in stages:
        await st.setup()
    assert stages[0].lm is stages[1].lm  # one model for both sessions
    assert stages[0].tokenizer.__class__.__name__ == "TextTokenizer"
    feats = FeaturesFrame(features=torch.randn(10, 768), frame_rate=50, turn=1)
    out = await run_frames([stages[0]], [feats], timeout=60)
    assert any(isinstance(f, EndOfTurnFrame) for f in out.frames)


def test_random_bf16_is_built_in_bf16():
    bundle = _random_lm("tiny", torch.bfloat16, "cpu", seed=0)
    params = list(bundle.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert bundle.model.lm_head.weight is bundle.model.transformer.wte.weight
    std = float(bundle.model.transformer.wte.weight.detach().float().std())
    assert std == pytest.approx(0.02, rel=0.1)


def test_offline_hf_message(tmp_path):
    code = textwrap.dedent("""
        import anyio
        from omniframe.testing import make_stage
        from omniframe_mini_omni.stages import MiniOmniLM
        try:
            anyio.run(make_stage(MiniOmniLM).setup)
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    assert out.startswith("ModelNotAvailable")
    assert "hf://gpt-omni/mini-omni" in out and "local path" in out


async def test_wrong_features_are_a_clear_error(resources):
    lm = MiniOmniLM({"model": "random://tiny"},
                    StageContext(name="lm", session=Session(), resources=resources))
    with pytest.raises(StageError, match=r"\(L, 768\).*whisper-small"):
        await run_frames([lm], [FeaturesFrame(features=torch.zeros(10, 384), frame_rate=50,
                                              encoder="whisper-tiny", turn=1)], timeout=60)


async def test_too_long_text_prompt_reports_error(resources):
    lm = MiniOmniLM({"model": "random://tiny", "task": "T1T2"},
                    StageContext(name="lm", session=Session(), resources=resources))
    result = await run_frames([lm], [TranscriptFrame(text="x" * 3000, turn=1)], timeout=60)
    errors = [f for f in result.frames if isinstance(f, ErrorFrame)]
    assert errors and "max_returned_tokens" in errors[0].message
    assert [f.reason for f in result.frames if isinstance(f, EndOfTurnFrame)] == ["error"]


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["mini_omni", "mini_omni_a1t2", "mini_omni_asr",
                                  "mini_omni_t1a2", "mini_omni_t1t2"])
def test_configs_validate(name):
    from omniframe.config import build_pipeline, load_config

    cfg = load_config(CONFIGS / f"{name}.yaml")
    pipeline = build_pipeline(cfg, source=name, resources=Resources())
    lms = [s for s in pipeline.stages if s.kind == "lm"]
    assert lms and all(s.options.model == "hf://gpt-omni/mini-omni" for s in lms)


async def test_main_config_runs_with_random_weights(tmp_path):
    """configs/mini_omni.yaml end to end (file -> VAD -> ... -> wav + text) with --set."""
    import soundfile as sf

    from omniframe.config import build_pipeline, load_config

    wav_in, wav_out = tmp_path / "q.wav", tmp_path / "a.wav"
    audio = speech_like([("silence", 0.3), ("speech", 1.0), ("silence", 1.0)])
    sf.write(wav_in, audio, 16000)
    cfg = load_config(CONFIGS / "mini_omni.yaml", [
        f"source.options.path={wav_in}", f"wav.options.path={wav_out}",
        "encoder.options.model=random://test-768", "encoder.options.trim=true",
        "lm.options.model=random://tiny", "lm.options.max_new_tokens=14",
        "codec.options.model=random://snac_24khz",
    ])
    pipeline = build_pipeline(cfg, source="test", resources=Resources())
    with anyio.fail_after(120):
        result = await pipeline.run()
    assert len(result.turns) == 1 and result.turns[0].audio_out_s > 0
    data, rate = sf.read(wav_out)
    assert rate == 24000 and len(data) > 0 and np.isfinite(data).all()


# ----------------------------------------------------------------------------- fast path


def test_fastpath_prefill_and_text_head_skip():
    """Shared-prefix prefill gives the plain model's logits with T+1 positions of compute; after
    end of text the audio logits are unchanged and the stand-in text argmax is pad_t."""
    from omniframe_mini_omni.fastpath import FastLM

    model = _random_lm("tiny", torch.float32, "cpu", seed=1).model
    row0, row1 = tokens.batch_prompts(12)
    ids = torch.tensor([row0, row1])
    feats = torch.randn(1, 12, 768)
    kw = {"whisper_features": feats, "whisper_lens": [12, 12], "audio_rows": [True, True],
          "last_only": True, "audio_head_rows": [0], "text_head_rows": [1]}
    with torch.no_grad():
        model.set_kv_cache(2, 64)
        ref = model(ids, 0, **kw)
        ref_next = model(ids[:, :, -1:], 15, last_only=True, audio_head_rows=[0],
                         text_head_rows=[1])
        fast = FastLM(model)
        model.set_kv_cache(2, 64)
        out = fast(ids, 0, **kw)
        assert fast.prefill_positions == 15 + 1  # instead of 2 x 15
        torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-4)
        fast.text_ended()
        audio, text = fast(ids[:, :, -1:], 15, last_only=True, audio_head_rows=[0],
                           text_head_rows=[1])
    torch.testing.assert_close(audio, ref_next[0], atol=1e-5, rtol=1e-4)
    assert text.shape == ref_next[1].shape and int(text[0, -1].argmax()) == tokens.PAD_T
    model.clear_kv_cache()


async def test_fast_and_faithful_stages_agree(resources):
    enc, lm, _ = chain(resources, lm={"max_new_tokens": 10})
    _, lm_ref, _ = chain(resources, lm={"max_new_tokens": 10, "faithful": True})
    turn = user_turn(turn=4)
    await enc.setup()
    feats = enc.encoder.encode(turn.samples, 16000, trim=True)
    frame = FeaturesFrame(features=feats, frame_rate=50, turn=4)
    fast = await run_frames([lm], [frame], timeout=60)
    ref = await run_frames([lm_ref], [frame], timeout=60)

    def answer(res):
        return [(type(f).__name__, getattr(f, "codes", getattr(f, "text", None)))
                for f in res.frames if isinstance(f, TextDeltaFrame | AudioCodesFrame)]

    assert answer(fast) == answer(ref)


def test_onednn_switch_is_reference_counted():
    import threading

    from omniframe_mini_omni.fastpath import onednn_off

    assert torch.backends.mkldnn.enabled
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with onednn_off():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(5)
    with onednn_off():
        assert not torch.backends.mkldnn.enabled
    assert not torch.backends.mkldnn.enabled  # the other thread still holds it
    release.set()
    t.join()
    assert torch.backends.mkldnn.enabled  # restored by the last user


async def test_first_audio_chunk_is_decoded_before_the_next_lm_step(resources, monkeypatch):
    """All model calls share one compute thread; the first SNAC chunk of a turn is queued
    before the LM's next step, so the first audio does not wait for that step (the solo path,
    ``engine: false``; the engine's own test is test_engine.py's)."""
    import threading

    import omniframe_mini_omni.lm_stage as stages_mod
    from omniframe_mini_omni.snac_codec import ChunkedDecoder

    calls: list[tuple[str, int]] = []
    next_step = stages_mod._next_step
    decode_range = ChunkedDecoder.decode_range

    def step(stream):
        calls.append(("lm", threading.get_ident()))
        return next_step(stream)

    def decode(self, *args, **kwargs):
        calls.append(("snac", threading.get_ident()))
        return decode_range(self, *args, **kwargs)

    monkeypatch.setattr(stages_mod, "_next_step", step)
    monkeypatch.setattr(ChunkedDecoder, "decode_range", decode)
    stages = chain(resources, lm={"max_new_tokens": 12, "engine": False},
                   codec={"first_chunk_frames": 1})
    result = await run_frames(stages, [user_turn()], timeout=120)
    assert any(isinstance(f, OutputAudioFrame) for f in result.frames)
    kinds = [k for k, _ in calls]
    # step calls: 1 prefill + 7 steps until frame 0 exists, then its chunk goes first
    assert kinds[:9] == ["lm"] * 8 + ["snac"], kinds
    assert len({t for _, t in calls}) == 1 and threading.get_ident() not in {t for _, t in calls}

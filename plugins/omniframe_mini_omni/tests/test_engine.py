"""Mini-Omni on the engine: several turns of different tasks, inputs and start times decode
together and each gets exactly the tokens of its solo run (the stage's fast path), fp32,
greedy and seeded sampling."""

from __future__ import annotations

import asyncio

import pytest
import torch
from omniframe_mini_omni.engine import MiniOmniEngineModel, TurnRequest
from omniframe_mini_omni.fastpath import FastLM
from omniframe_mini_omni.generate import GenerationStream, SamplingOptions
from omniframe_mini_omni.tokens import EOT, Task

from omniframe.engine import Engine, Work

pytestmark = pytest.mark.usefixtures("_one_thread")

GREEDY = SamplingOptions()
SAMPLED = SamplingOptions(temperature=0.9, top_k=50, top_p=0.95)


def requests(model) -> list[TurnRequest]:
    g = torch.Generator().manual_seed(7)
    D = model.config.whisper_adapter_dim

    def feats(n):
        return torch.randn(n, D, generator=g)

    return [
        TurnRequest("A1A2", whisper_features=feats(11), max_steps=30),
        TurnRequest("A1T2", whisper_features=feats(7), max_steps=12),
        TurnRequest("T1A2", text_ids=[5, 9, 200, 31], max_steps=25, sampling=SAMPLED, seed=3),
        TurnRequest("A1A2", whisper_features=feats(19), max_steps=22, sampling=SAMPLED, seed=11),
        TurnRequest("T1T2", text_ids=[1, 2, 3], max_steps=9, sampling=SAMPLED, seed=5),
        TurnRequest("ASR", whisper_features=feats(5), max_steps=14),
        TurnRequest("T1A2", text_ids=[77, 78], max_steps=18, batch_parallel=True),
    ]


def solo(model, r: TurnRequest):
    """What the LM stage does for one turn alone (GenerationStream over FastLM)."""
    greedy = r.sampling.top_k == 1 or r.sampling.temperature == 0.0
    fast = FastLM(model, skip_text_head=greedy and Task(r.task).audio_output)
    trace = []
    with torch.inference_mode():
        stream = GenerationStream(fast, r.task, whisper_features=r.whisper_features,
                                  text_ids=r.text_ids, batch_parallel=r.batch_parallel,
                                  sampling=r.sampling, seed=r.seed, max_steps=r.max_steps,
                                  trace=trace.append)
        steps = []
        for step in stream:
            steps.append(step)
            if step.text == EOT:
                fast.text_ended()
    return steps, stream.stop_reason, trace


@pytest.fixture(scope="module")
def solos(tiny_model):
    return [solo(tiny_model, r) for r in requests(tiny_model)]


def drive(em: MiniOmniEngineModel, reqs: list[TurnRequest], starts: list[int]):
    """Step the engine model by hand: request i is prefilled at engine step starts[i]."""
    works = [Work(i, r) for i, r in enumerate(reqs)]
    out: dict[int, list] = {i: [] for i in range(len(reqs))}
    info: dict[int, str] = {}
    running: list[Work] = []
    step = 0
    while len(info) < len(reqs):
        prefill = [w for w in works if starts[w.id] == step]
        res = em.step(prefill, running)
        for w in (*prefill, *running):
            r = res[w.id]
            assert r.error is None, r.error
            out[w.id] += r.items
            if r.done:
                info[w.id] = r.info
                em.release(w)
        running = [w for w in (*running, *prefill) if w.id not in info]
        step += 1
    return out, info


@pytest.mark.parametrize("exact", [True, False])
def test_interleaved_turns_match_solo_runs(tiny_model, solos, exact):
    reqs = requests(tiny_model)
    traces: dict[int, list] = {i: [] for i in range(len(reqs))}
    for i, r in enumerate(reqs):
        r.trace = traces[i].append
    em = MiniOmniEngineModel(tiny_model, exact=exact)
    out, info = drive(em, reqs, starts=[0, 0, 3, 4, 4, 10, 17])
    for i, (steps, reason, trace) in enumerate(solos):
        assert out[i] == steps, f"request {i} ({reqs[i].task})"
        assert info[i] == reason
        assert traces[i] == trace
    assert em.last_rows >= 1


@pytest.fixture(scope="module")
def eot_model():
    """A tiny model whose text head likes EOT (its tied embedding row points along the mean
    hidden state): speech turns end their text mid-answer, then decode pad_t."""
    from omniframe_mini_omni.config import Config
    from omniframe_mini_omni.model import GPT

    model = GPT(Config.from_name("tiny"))
    model.init_weights(torch.Generator().manual_seed(1234))
    model.eval()
    with torch.no_grad():
        ids = torch.randint(0, 1000, (1, 8, 20), generator=torch.Generator().manual_seed(0))
        d = model.forward_embeddings(model.embed(ids)).mean(dim=(0, 1))
        model.transformer.wte.weight[EOT] = d / d.norm()
    return model


def test_text_ending_mid_answer_matches_solo(eot_model):
    """Greedy speech turns skip the text head after EOT (as the stage's FastLM does), sampled
    ones keep drawing it; both stay the solo run's tokens."""
    g = torch.Generator().manual_seed(3)
    D = eot_model.config.whisper_adapter_dim
    reqs = [TurnRequest("A1A2", whisper_features=torch.randn(n, D, generator=g), max_steps=20)
            for n in (9, 13, 6)]
    reqs += [TurnRequest("A1A2", whisper_features=torch.randn(9, D, generator=g), max_steps=20,
                         sampling=SAMPLED, seed=2),
             TurnRequest("T1A2", text_ids=[5, 9, 200, 31], max_steps=20)]
    solos = [solo(eot_model, r) for r in reqs]
    ended = [next((s.step for s in steps if s.text == EOT), None) for steps, _, _ in solos]
    assert any(e is not None and e > 0 for e in ended), ended  # the case under test occurs
    out, info = drive(MiniOmniEngineModel(eot_model), reqs, starts=[0, 1, 1, 2, 5])
    for i, (steps, reason, _) in enumerate(solos):
        assert out[i] == steps, f"request {i}"
        assert info[i] == reason


@pytest.mark.anyio
async def test_engine_sessions_with_random_start_times(tiny_model, solos):
    reqs = requests(tiny_model)
    engine = Engine(MiniOmniEngineModel(tiny_model), capacity=4, prefill_budget=16,
                    device="cpu")
    engine.step_log = []

    async def one(i, delay):
        await asyncio.sleep(delay)
        async with engine.submit(reqs[i]) as req:
            return [s async for s in req], req.info

    try:
        got = await asyncio.gather(*(one(i, 0.01 * ((i * 5) % 7)) for i in range(len(reqs))))
    finally:
        engine.close()
    for i, (steps, reason, _) in enumerate(solos):
        assert got[i] == (steps, reason), f"request {i}"
    assert max(d for _, d, _ in engine.step_log) >= 2  # several turns decoded in one step
    assert engine.active == 0


@pytest.mark.anyio
async def test_cancelled_turn_does_not_disturb_others(tiny_model, solos):
    reqs = requests(tiny_model)
    engine = Engine(MiniOmniEngineModel(tiny_model), capacity=8, device="cpu")

    async def one(i):
        async with engine.submit(reqs[i]) as req:
            return [s async for s in req]

    async def victim():
        async with engine.submit(TurnRequest("A1A2", whisper_features=reqs[0].whisper_features,
                                             max_steps=500)) as req:
            async for s in req:
                if s.step == 5:
                    raise asyncio.CancelledError  # barge-in mid-answer

    try:
        results = await asyncio.gather(one(0), one(2), victim(), return_exceptions=True)
    finally:
        engine.close()
    assert results[0] == solos[0][0] and results[1] == solos[2][0]
    assert isinstance(results[2], asyncio.CancelledError)
    assert engine.active == 0


@pytest.mark.anyio
async def test_too_long_prompt_is_an_error_for_that_turn_only(tiny_model, solos):
    reqs = requests(tiny_model)
    engine = Engine(MiniOmniEngineModel(tiny_model), capacity=8, device="cpu")
    block = tiny_model.config.block_size

    async def one(r):
        async with engine.submit(r) as req:
            return [s async for s in req]

    try:
        good, bad = await asyncio.gather(
            one(reqs[1]), one(TurnRequest("T1T2", text_ids=[1] * block)),
            return_exceptions=True)
    finally:
        engine.close()
    assert good == solos[1][0]
    assert isinstance(bad, ValueError) and "max_returned_tokens" in str(bad)
    assert engine.active == 0


# ------------------------------------------------------------------ the LM stage on the engine
def _stage(resources, **options):
    from omniframe_mini_omni.stages import MiniOmniLM

    from omniframe.session import Session
    from omniframe.stage import StageContext

    ctx = StageContext(name="lm", session=Session(), resources=resources)
    return MiniOmniLM({"model": "random://tiny", "max_new_tokens": 14, **options}, ctx)


def _feats(turn: int, n: int = 12):
    from omniframe.frames import FeaturesFrame

    return FeaturesFrame(features=torch.ones(n, 768) * 0.01 * turn, frame_rate=50, turn=turn)


async def _answer(lm, frame):
    from contextlib import aclosing

    from omniframe.frames import AudioCodesFrame, EndOfTurnFrame, TextDeltaFrame

    async with aclosing(lm.process(frame)) as gen:
        return [(type(f).__name__, getattr(f, "text", None), getattr(f, "codes", None),
                 getattr(f, "reason", None)) async for f in gen
                if isinstance(f, TextDeltaFrame | AudioCodesFrame | EndOfTurnFrame)]


@pytest.mark.anyio
async def test_stages_share_one_engine_and_answer_as_solo():
    from omniframe.resources import Resources

    resources = Resources()
    options = [{"task": "A1A2"}, {"task": "A1T2"}, {"task": "A1A2", "temperature": 0.8,
                                                    "top_k": 20, "seed": 4}]
    solo_lms = [_stage(resources, **o) for o in options]
    engine_lms = [_stage(resources, engine=True, **o) for o in options]
    for lm in (*solo_lms, *engine_lms):
        await lm.setup()
    frames = [_feats(1), _feats(2, 9), _feats(3, 15)]
    solo_out = [await _answer(lm, f) for lm, f in zip(solo_lms, frames, strict=True)]
    got = await asyncio.gather(*(_answer(lm, f) for lm, f in
                                 zip(engine_lms, frames, strict=True)))
    assert got == solo_out
    assert engine_lms[0].lm is engine_lms[1].lm  # one model, one engine
    engine = engine_lms[0].lm.engine("cpu")
    assert engine.active == 0 and engine.steps < sum(len(o) for o in solo_out)
    assert engine_lms[0].lm.lock.acquire(blocking=False)
    engine_lms[0].lm.lock.release()


async def cancel_sweep(lm, engine, reference, frame, points, check=None) -> int:
    """Cut a turn of ``lm`` after each of ``points`` event-loop rounds; after each cut the
    engine's slot and the model's lock are free (and ``check()`` holds), and the next turn on
    ``frame`` answers ``reference``. Returns how many turns were cut."""
    import anyio
    import anyio.lowlevel

    cut = 0
    for n in points:
        with anyio.fail_after(30):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    async def cancel(n=n, scope=scope):
                        for _ in range(n):
                            await anyio.lowlevel.checkpoint()
                        scope.cancel()

                    tg.start_soon(cancel)
                    await _answer(lm, _feats(2))
                    tg.cancel_scope.cancel()
        cut += scope.cancelled_caught
        assert engine.active == 0 and engine.queued == 0, f"slot held after a cancel at {n}"
        if check is not None:
            assert check(), f"after a cancel at {n}"
        assert lm.lm.lock.acquire(blocking=False), f"lock held after a cancel at {n}"
        lm.lm.lock.release()
        with anyio.fail_after(30):
            assert await _answer(lm, frame) == reference, f"after a cancel at {n}"
    return cut


@pytest.mark.anyio
async def test_stage_cancel_at_every_point_on_the_engine():
    """test_cancel_safety's sweep on the engine path: cut a turn at many points; the slot is
    free, the lock is free, and the next turn is exactly the reference."""
    from omniframe.resources import Resources

    resources = Resources()
    lm = _stage(resources, engine=True, max_new_tokens=10)
    await lm.setup()
    reference = await _answer(lm, _feats(1))
    engine = lm.lm.engine("cpu")
    cut = await cancel_sweep(lm, engine, reference, _feats(1), range(0, 200, 4))
    assert cut > 10
    await lm.teardown()


@pytest.mark.anyio
async def test_engine_first_audio_chunk_runs_before_the_next_step(monkeypatch):
    """test_stages' ordering on the engine path: the step that emits frame 0 is held until
    the codec has queued its first chunk on the compute thread."""
    import threading
    import time

    pytest.importorskip("snac")
    pytest.importorskip("whisper")
    from omniframe_mini_omni.engine import MiniOmniEngineModel as EM
    from omniframe_mini_omni.snac_codec import ChunkedDecoder
    from omniframe_mini_omni.snac_stage import SnacCodec
    from omniframe_mini_omni.stages import MiniOmniLM
    from omniframe_mini_omni.whisper_stage import WhisperEncoderStage

    from omniframe.frames import OutputAudioFrame, UserTurnFrame
    from omniframe.resources import Resources
    from omniframe.session import Session
    from omniframe.stage import StageContext
    from omniframe.testing import run_frames, speech_like

    calls: list[tuple[str, int]] = []
    step, decode_range = EM.step, ChunkedDecoder.decode_range

    def lm_step(self, prefill, decode):
        calls.append(("lm", threading.get_ident()))
        return step(self, prefill, decode)

    def decode(self, *args, **kwargs):
        calls.append(("snac", threading.get_ident()))
        return decode_range(self, *args, **kwargs)

    monkeypatch.setattr(EM, "step", lm_step)
    monkeypatch.setattr(ChunkedDecoder, "decode_range", decode)
    session, resources = Session(), Resources()

    def ctx(name):
        return StageContext(name=name, session=session, resources=resources)

    stages = [
        WhisperEncoderStage({"model": "random://test-768", "trim": True}, ctx("encoder")),
        MiniOmniLM({"model": "random://tiny", "max_new_tokens": 12, "engine": True}, ctx("lm")),
        SnacCodec({"model": "random://snac_24khz", "deterministic": True,
                   "first_chunk_frames": 1}, ctx("codec")),
    ]
    turn = UserTurnFrame(samples=speech_like([("speech", 0.8)], seed=1), sample_rate=16000,
                         turn=1, speech_end_ts=time.monotonic())
    result = await run_frames(stages, [turn], timeout=120)
    assert any(isinstance(f, OutputAudioFrame) for f in result.frames)
    kinds = [k for k, _ in calls]
    assert kinds[:9] == ["lm"] * 8 + ["snac"], kinds
    assert len({t for _, t in calls}) == 1 and threading.get_ident() not in {t for _, t in calls}

"""The static-shape engine step (static_engine.py, the GPU path) run eagerly on the CPU: KV
slot pool, one masked attention over all rows, sampling on the device. Greedy turns get their
solo runs' tokens (float32); seeded turns draw the same alone as in any batch; slots are
freed and reused in every path; rows that do not decode never disturb a turn's cache."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from pathlib import Path

import pytest
import torch
from omniframe_mini_omni.engine import MiniOmniEngineModel, TurnRequest
from omniframe_mini_omni.generate import SamplingOptions
from omniframe_mini_omni.static_engine import MIN_LEN_BUCKET, StaticEngineModel, bucket
from structlog.testing import capture_logs

from omniframe.engine import Engine, Work

pytestmark = pytest.mark.usefixtures("_one_thread")

_spec = importlib.util.spec_from_file_location("_engine_tests",
                                               Path(__file__).with_name("test_engine.py"))
_te = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_te)  # its request set, solo runner and hand driver
requests, solo, drive = _te.requests, _te.solo, _te.drive

SAMPLED = SamplingOptions(temperature=0.9, top_k=50, top_p=0.95)


def greedy_requests(model) -> list[TurnRequest]:
    return [r for r in requests(model) if r.sampling.top_k == 1]


def sampled_requests(model) -> list[TurnRequest]:
    g = torch.Generator().manual_seed(21)
    D = model.config.whisper_adapter_dim
    return [
        TurnRequest("A1A2", whisper_features=torch.randn(9, D, generator=g), max_steps=16,
                    sampling=SAMPLED, seed=1),
        TurnRequest("T1T2", text_ids=[4, 8, 15], max_steps=10, sampling=SAMPLED, seed=2),
        TurnRequest("T1A2", text_ids=[16, 23, 42], max_steps=14,
                    sampling=SamplingOptions(temperature=1.3, top_k=0, top_p=1.0), seed=3),
        TurnRequest("A1T2", whisper_features=torch.randn(6, D, generator=g), max_steps=9,
                    sampling=SamplingOptions(temperature=0.7, top_k=5), seed=4),
    ]


def test_bucket():
    assert [bucket(n, 2, 16) for n in (1, 2, 3, 5, 9, 16)] == [2, 2, 4, 8, 16, 16]
    assert bucket(70, MIN_LEN_BUCKET, 100) == 100
    assert bucket(3, MIN_LEN_BUCKET, 2048) == MIN_LEN_BUCKET
    with pytest.raises(ValueError, match="exceeds"):
        bucket(17, 2, 16)


def test_greedy_turns_match_solo_runs(tiny_model):
    """Different tasks, prompts and start times; slots freed by finished turns are reused by
    later ones (8 turns through a 3-slot pool)."""
    reqs = greedy_requests(tiny_model) * 2
    solos = [solo(tiny_model, r) for r in reqs]
    em = StaticEngineModel(tiny_model, capacity=3, max_len=256)
    starts = [0, 0, 3, 40, 41, 60, 61, 90]
    out, info = drive(em, reqs, starts=starts)
    for i, (steps, reason, _) in enumerate(solos):
        assert out[i] == steps, f"request {i} ({reqs[i].task})"
        assert info[i] == reason
    assert em.free_slots == 3


def test_seeded_turns_draw_the_same_alone_and_together(tiny_model):
    reqs = sampled_requests(tiny_model)
    alone = []
    for r in reqs:
        em = StaticEngineModel(tiny_model, capacity=1, max_len=128)
        out, info = drive(em, [r], starts=[0])
        alone.append((out[0], info[0]))
    em = StaticEngineModel(tiny_model, capacity=8, max_len=128)
    # with greedy company (a mixed batch runs the sampled graph for every row)
    mixed = [*reqs, *greedy_requests(tiny_model)[:2]]
    out, info = drive(em, mixed, starts=[2, 0, 5, 1, 0, 3])
    for i, (steps, reason) in enumerate(alone):
        assert out[i] == steps, f"request {i} ({reqs[i].task})"
        assert info[i] == reason
    greedy_solo = [solo(tiny_model, r) for r in mixed[4:]]
    for i, (steps, _, _) in enumerate(greedy_solo):
        assert out[4 + i] == steps
    # different seeds draw differently (the noise is the seed's)
    r2 = TurnRequest(**{**reqs[1].__dict__, "seed": 99})
    other, _ = drive(StaticEngineModel(tiny_model, capacity=1, max_len=128), [r2], starts=[0])
    assert [s.text for s in other[0]] != [s.text for s in alone[1][0]]


def test_paused_turn_keeps_its_cache(tiny_model):
    """A turn skipped by some steps (backpressure) while others decode and a new one
    prefills into the slot next to it: its rows write only scratch, its tokens stay solo."""
    reqs = greedy_requests(tiny_model)[:3]
    solos = [solo(tiny_model, r) for r in reqs]
    em = StaticEngineModel(tiny_model, capacity=4, max_len=128)
    works = [Work(i, r) for i, r in enumerate(reqs)]
    out: dict[int, list] = {i: [] for i in range(3)}
    done: set[int] = set()
    running: list[Work] = []
    for step in range(200):
        prefill = [w for w in works if {0: 0, 1: 0, 2: 6}[w.id] == step]
        decode = [w for w in running if not (w.id == 0 and 2 <= step < 12)]  # 0 paused
        res = em.step(prefill, decode)
        for w in (*prefill, *decode):
            r = res[w.id]
            out[w.id] += r.items
            if r.done:
                done.add(w.id)
                em.release(w)
        running = [w for w in (*running, *prefill) if w.id not in done]
        if len(done) == 3:
            break
    for i, (steps, _, _) in enumerate(solos):
        assert out[i] == steps


def test_errors_free_the_slot(tiny_model):
    em = StaticEngineModel(tiny_model, capacity=1, max_len=64)
    long = TurnRequest("T1T2", text_ids=[1, 2], max_returned_tokens=65)
    res = em.step([Work(0, long)], [])
    assert "KV pool holds per turn (64 positions)" in str(res[0].error)
    assert em.free_slots == 1
    too_long = TurnRequest("T1T2", text_ids=list(range(70)))  # prompt over max_len
    res = em.step([Work(1, too_long)], [])
    assert "leaves no room" in str(res[1].error)
    assert em.free_slots == 1
    ok = Work(2, TurnRequest("T1T2", text_ids=[1, 2], max_steps=50))
    assert em.step([ok], [])[2].error is None
    full = em.step([Work(3, TurnRequest("T1T2", text_ids=[3]))], [ok])
    assert "slots are all in use" in str(full[3].error)
    em.release(ok)
    assert em.free_slots == 1
    with pytest.raises(ValueError, match="max_len"):
        StaticEngineModel(tiny_model, capacity=1, max_len=10**6)
    with pytest.raises(ValueError, match="CUDA"):
        StaticEngineModel(tiny_model, capacity=1, max_len=64, graphs=True)
    with pytest.raises(ValueError, match="attention must be one of"):
        StaticEngineModel(tiny_model, capacity=1, max_len=64, attention="flash")


def test_a_forced_attention_backend_gives_the_same_tokens(tiny_model):
    reqs = greedy_requests(tiny_model)[:2]
    default = drive(StaticEngineModel(tiny_model, capacity=2, max_len=64), reqs, [0, 1])
    math_only = drive(StaticEngineModel(tiny_model, capacity=2, max_len=64, attention="math"),
                      reqs, [0, 1])
    assert math_only == default


def test_max_length_stop_at_the_pool_size(tiny_model):
    """A turn without its own limit stops at the pool's length, as the exact engine (a solo
    run's tokens) does with max_returned_tokens = max_len."""
    r = TurnRequest("T1T2", text_ids=[5, 6, 7])
    out, info = drive(StaticEngineModel(tiny_model, capacity=1, max_len=40), [r], starts=[0])
    ref = TurnRequest("T1T2", text_ids=[5, 6, 7], max_returned_tokens=40)
    ref_out, ref_info = drive(MiniOmniEngineModel(tiny_model), [ref], starts=[0])
    assert (out[0], info[0]) == (ref_out[0], ref_info[0])
    assert len(out[0]) == 40 - 6 and info[0] == "max_length"  # 6 prompt positions


def test_bfloat16_runs(tiny_model):
    """bf16 pool and step: a whole answer of valid ids."""
    model = _copy(tiny_model).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, model.config.whisper_adapter_dim, generator=g)
    r = TurnRequest("A1A2", whisper_features=feats, max_steps=20)
    out, info = drive(StaticEngineModel(model, capacity=2, max_len=64), [r], starts=[0])
    assert len(out[0]) == 20 and info[0] == "max_steps"
    for s in out[0]:
        assert all(0 <= a < 4160 for a in s.audio)


def _copy(model):
    from omniframe_mini_omni.model import GPT

    m = GPT(model.config)
    m.load_state_dict(model.state_dict())
    return m.eval()


def test_through_the_engine_with_cancellation(tiny_model):
    """The async engine over the static model: concurrent turns, one cancelled mid-answer;
    every slot comes back and the others keep their solo tokens."""
    reqs = greedy_requests(tiny_model)
    solos = [solo(tiny_model, r) for r in reqs]
    em = StaticEngineModel(tiny_model, capacity=4, max_len=128)
    engine = Engine(em, capacity=4, prefill_budget=64, device="cpu", name="static-test")

    async def run(i: int, cancel_after: int | None) -> list:
        got = []
        async with engine.submit(reqs[i]) as answer:
            async for step in answer:
                got.append(step)
                if cancel_after is not None and len(got) == cancel_after:
                    break
        return got

    async def main() -> list:
        return await asyncio.gather(run(0, 5), run(1, None), run(2, None), run(3, None))

    try:
        got = asyncio.run(main())
    finally:
        engine.close()
    assert got[0] == solos[0][0][:5]
    for i in (1, 2, 3):
        assert got[i] == solos[i][0]
    assert em.free_slots == 4


STARTS = [0, 0, 3, 9, 1, 4, 4, 30]


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_tokens(tiny_model):
    """torch.compile of the blocks' pre/post-attention work (one compilation for every layer
    and row count, fullgraph: no graph breaks): the eager step's tokens, greedy and seeded."""
    reqs = [*greedy_requests(tiny_model), *sampled_requests(tiny_model)]
    eager = drive(StaticEngineModel(tiny_model, capacity=8, max_len=128), reqs, STARTS)
    compiled = drive(StaticEngineModel(tiny_model, capacity=8, max_len=128, compile=True),
                     reqs, STARTS)
    assert compiled == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "compile"), [(torch.float32, False), (torch.bfloat16, False),
                                                (torch.bfloat16, True)])
def test_cuda_graphs_replay_the_eager_step(tiny_model, dtype, compile):
    """On a GPU: graph replays give the eager step's tokens (greedy and seeded, turns of
    different lengths joining and leaving); float32 greedy turns also match their solo runs."""
    model = _copy(tiny_model).to("cuda", dtype)
    reqs = [*greedy_requests(tiny_model), *sampled_requests(tiny_model)]
    eager = drive(StaticEngineModel(model, capacity=8, max_len=256, graphs=False,
                                    compile=compile), reqs, STARTS)
    em = StaticEngineModel(model, capacity=8, max_len=256, compile=compile)
    assert em.graphs
    graphs = drive(em, reqs, STARTS)
    assert graphs == eager
    assert len(em._graphs) >= 2
    if dtype == torch.float32:
        for i, r in enumerate(greedy_requests(tiny_model)):
            assert graphs[0][i] == solo(model, r)[0], f"request {i} ({r.task})"


def test_the_step_never_reads_a_tensor_on_the_host(tiny_model, monkeypatch):
    """What a CUDA graph cannot capture and what would make the host wait for the device:
    the step (greedy and sampled) converts no tensor to a Python value. (On CPU this catches
    the Python-level reads; the GPU test captures the graphs for real.)"""
    em = StaticEngineModel(tiny_model, capacity=2, max_len=64)
    reqs = [TurnRequest("A1A2", whisper_features=torch.zeros(4, 768), max_steps=4),
            TurnRequest("T1T2", text_ids=[3, 4], max_steps=4, sampling=SAMPLED, seed=1)]
    works = [Work(i, r) for i, r in enumerate(reqs)]
    em.step(works, [])

    def refuse(*_a, **_k):
        raise AssertionError("host read of a device value inside the step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.inference_mode():
        em._forward(4, 64, False)
        em._forward(4, 64, True)


def _stage_helpers():
    return _te._stage, _te._feats, _te._answer


@pytest.mark.anyio
async def test_lm_stage_on_the_static_engine():
    """The LM stage with ``engine_kind: static`` (what CUDA gets): greedy answers of three
    concurrent stages equal their solo (lock path) answers, one engine for the model; then
    the cancel sweep: a turn cut at many points frees its slot, the lock, the KV pool's slot,
    and the next turn is the same again."""
    from omniframe.resources import Resources

    _stage, _feats, _answer = _stage_helpers()
    resources = Resources()
    options = [{"task": "A1A2"}, {"task": "A1T2"}, {"task": "A1A2", "max_new_tokens": 9}]
    solo_lms = [_stage(resources, engine=False, **o) for o in options]
    static_lms = [_stage(resources, engine_kind="static", engine_capacity=3, **o)
                  for o in options]
    for lm in (*solo_lms, *static_lms):
        await lm.setup()
    frames = [_feats(1), _feats(2, 9), _feats(3, 15)]
    solo_out = [await _answer(lm, f) for lm, f in zip(solo_lms, frames, strict=True)]
    got = await asyncio.gather(*(_answer(lm, f) for lm, f in
                                 zip(static_lms, frames, strict=True)))
    assert got == solo_out
    engine = static_lms[0].lm.engine("cpu")
    em = engine.model
    assert isinstance(em, StaticEngineModel) and static_lms[2].lm.engine("cpu") is engine
    assert em.free_slots == em.capacity == engine.capacity == 3
    with pytest.raises(ValueError, match="engine_capacity"):
        _stage(resources, engine_capacity=0)
    with capture_logs() as logs:  # one engine per model: another kind is refused, loudly
        assert static_lms[0].lm.engine("cpu", "dynamic") is engine
        static_lms[0].lm.engine("cpu", "dynamic")
    assert [e["event"][:21] for e in logs] == ["engine_kind ignored: "]

    lm = static_lms[0]
    cut = await _te.cancel_sweep(lm, engine, solo_out[0], frames[0], range(0, 160, 8),
                                 check=lambda: em.free_slots == em.capacity)
    assert cut > 5
    for s in (*solo_lms, *static_lms):
        await s.teardown()


def test_pool_size_and_a_clear_out_of_memory_error(tiny_model, monkeypatch):
    em = StaticEngineModel(tiny_model, capacity=3, max_len=100)
    pool = sum(t.numel() * t.element_size() for t in (*em.k_pool, *em.v_pool))
    assert pool == 3 * StaticEngineModel.slot_bytes(tiny_model, 100)

    from omniframe_mini_omni import static_engine

    def no_memory(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(static_engine.torch, "zeros", no_memory)
    with pytest.raises(RuntimeError, match=r"KV pool for 500 turns .* lower the capacity"):
        StaticEngineModel(tiny_model, capacity=500, max_len=100)


def test_default_gpu_capacity_follows_free_memory(tiny_model, monkeypatch):
    """On a GPU the LM stage's engine takes 96 turns, or what 40 % of the free memory holds."""
    from omniframe_mini_omni import lm_stage

    slot = StaticEngineModel.slot_bytes(tiny_model)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (int(10.5 * slot / 0.4), 0))
    assert lm_stage._cuda_capacity(tiny_model, "cuda") == 10
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (10**15, 0))
    assert lm_stage._cuda_capacity(tiny_model, "cuda") == lm_stage.ENGINE_CAPACITY_CUDA
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (0, 0))
    assert lm_stage._cuda_capacity(tiny_model, "cuda") == 1


def test_a_failing_compile_falls_back_to_the_plain_step(tiny_model, monkeypatch):
    """The LM stage compiles the static step on a GPU; when compiling (done while capturing)
    fails, it warns and builds the engine without compile."""
    from omniframe_mini_omni import lm_stage

    def capture(self, keys=None):
        if self.compiled:
            raise RuntimeError("triton is missing")
        return 0

    monkeypatch.setattr(StaticEngineModel, "capture", capture)
    with capture_logs() as logs:
        em = lm_stage._static_engine(tiny_model, 2, compile=True, lock=threading.Lock())
    assert isinstance(em, StaticEngineModel) and not em.compiled
    from omniframe_mini_omni.static_engine import layer_pre

    assert em._pre is layer_pre  # the same engine (one pool), now running the eager step
    assert logs[0]["log_level"] == "warning" and "triton is missing" in logs[0]["error"]
    em = lm_stage._static_engine(tiny_model, 2, compile=False, lock=threading.Lock())
    assert not em.compiled

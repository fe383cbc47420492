"""Cross-session SNAC batching (snac_batch.py): exactness against solo decodes, grouping by
shape, no waiting for a lone session, cancellation and errors that stay with their session."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omniframe.frames import AudioCodesFrame, EndOfTurnFrame, Frame, OutputAudioFrame
from omniframe.resources import Resources
from omniframe.session import Session
from omniframe.stage import StageContext, _compute_executor

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("_one_thread")]

torch = pytest.importorskip("torch")
pytest.importorskip("snac")

from omniframe_mini_omni.snac_batch import SnacBatcher, decode_batch  # noqa: E402
from omniframe_mini_omni.snac_codec import (  # noqa: E402
    SAMPLES_PER_FRAME,
    ChunkedDecoder,
    decode_frames,
    load_snac,
)
from omniframe_mini_omni.snac_stage import SnacCodec  # noqa: E402

SPF = SAMPLES_PER_FRAME


@pytest.fixture(scope="module")
def snac_model(_one_thread):
    """Random-weight snac_24khz, noise off, fast (the stage's defaults)."""
    return load_snac("random://snac_24khz", deterministic=True, fast=True)


def random_frames(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in rng.integers(0, 4096, 7)) for _ in range(n)]


class FakeSnac(torch.nn.Module):
    """A stand-in with SNAC's decode shapes and cheap, row-independent audio: each frame's
    2048 samples are its first code / 4096. ``fail(codes)`` may raise; ``gate`` may hold."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.rows: list[int] = []
        self.shapes: list[tuple[int, int]] = []  # (rows, frames) per call
        self.fail = None
        self.gate: threading.Event | None = None

    def decode(self, codes):
        self.rows.append(codes[0].shape[0])
        self.shapes.append(tuple(codes[0].shape))
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail is not None:
            self.fail(codes)
        x = codes[0].float() / 4096  # (B, F)
        return x.repeat_interleave(SPF, dim=1)[:, None, :]


def decoder(model, frames, **kw) -> ChunkedDecoder:
    dec = ChunkedDecoder(model, kw.pop("per_chunk", 4), **kw)
    for f in frames:
        assert dec.push(f)
    return dec


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for a condition that the compute thread changes (there is no event to await)."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.001)


class Blocked:
    """Holds the compute thread (a job waiting on an event) so that chunks queue up."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.job = _compute_executor().submit(self._hold)
        assert self.started.wait(10)

    def _hold(self) -> None:
        self.started.set()
        self.release.wait(20)

    def __enter__(self) -> Blocked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.job.result(10)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(("width", "blocks"), [(1, None), (4, None), (7, None), (4, 2)])
def test_batched_rows_equal_solo_decodes_bitwise(snac_model, width, blocks):
    """Fast SNAC on CPU with one torch thread is batch-invariant: every row of a batched
    forward (whole, or its first two upsampling blocks batched and the rest row by row, the
    CPU default) is bit for bit the solo decode of its window."""
    windows = [random_frames(width, seed=s) for s in range(3)]
    rows = decode_batch(snac_model, windows, batched_blocks=blocks)
    assert rows.shape == (3, width * SPF) and rows.dtype == np.float32
    for row, w in zip(rows, windows, strict=True):
        np.testing.assert_array_equal(row, decode_frames(snac_model, w))


def test_native_snac_rows_equal_solo_within_rounding():
    """``fast: false`` (PyTorch's ConvTranspose1d) picks another algorithm for a batch: rows
    equal the solo decode up to float rounding (measured <= 4.5e-7 here)."""
    native = load_snac("random://snac_24khz", deterministic=True, fast=False)
    windows = [random_frames(4, seed=s) for s in range(2)]
    for row, w in zip(decode_batch(native, windows, batched_blocks=2), windows, strict=True):
        np.testing.assert_allclose(row, decode_frames(native, w), rtol=0, atol=1e-5)


def test_padding_would_change_the_audio(snac_model):
    """Why chunks are grouped by shape and never padded to share a forward: SNAC sees the
    window's edge, so extra frames after a window change its last frames' audio."""
    frames = random_frames(6, seed=4)
    alone = decode_frames(snac_model, frames[:4])
    padded = decode_frames(snac_model, frames)[: 4 * SPF]
    assert np.abs(alone - padded)[-SPF:].max() > 1e-3


def test_pending_chunks_of_sessions_share_one_forward_per_shape(snac_model):
    a, b, c = (decoder(snac_model, random_frames(n, seed=n), per_chunk=2, context_frames=1,
                       lookahead_frames=1) for n in (6, 7, 4))
    refs = [decoder(snac_model, d.frames, per_chunk=2, context_frames=1, lookahead_frames=1)
            for d in (a, b, c)]
    batcher = SnacBatcher(snac_model, max_frames=64)
    with Blocked():
        fa = batcher.submit(a, 2, 4)  # window [1, 5): 4 frames
        fb = batcher.submit(b, 4, 6)  # window [3, 7): 4 frames
        fc = batcher.submit(c, 0, 2)  # the first chunk, window [0, 3): its own group
        assert batcher.pending == 3
    got = [f.result(30) for f in (fa, fb, fc)]
    assert batcher.forwards == {2: 1, 1: 1}
    want = [refs[0].decode_range(2, 4), refs[1].decode_range(4, 6), refs[2].decode_range(0, 2)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert (a.emitted, b.emitted, c.emitted) == (4, 6, 2)
    assert batcher.pending == 0


def test_on_cpu_each_row_is_handed_out_when_its_decoder_tail_is_done(snac_model):
    """The CPU batch runs SNAC's first upsampling blocks on all rows, then the rest row by row:
    a row's session gets its audio before the next row's tail is computed."""
    events: list[str] = []
    hook = snac_model.decoder.model[-1].register_forward_hook(
        lambda *_: events.append(f"tail{len([e for e in events if e.startswith('tail')])}"))
    try:
        batcher = SnacBatcher(snac_model)  # CPU: split, up to 4 frames
        decs = [decoder(snac_model, random_frames(1, seed=s), per_chunk=1) for s in range(3)]
        with Blocked():
            futures = [batcher.submit(d, 0, 1) for d in decs]
            for i, f in enumerate(futures):
                f.add_done_callback(lambda _, i=i: events.append(f"out{i}"))
        got = [f.result(30) for f in futures]
        for _ in range(5000):  # a done callback runs just after result() is released
            if len(events) == 6:
                break
            time.sleep(0.001)
        assert events == ["tail0", "out0", "tail1", "out1", "tail2", "out2"]
    finally:
        hook.remove()
    for d, g in zip(decs, got, strict=True):
        np.testing.assert_array_equal(g, decode_frames(snac_model, d.frames))
    assert batcher.forwards == {3: 1}


def test_a_lone_chunk_is_decoded_at_once_without_a_window():
    """One session: its chunk's drain job is queued when it is submitted and decodes it alone
    (``decode_range``, the ``batch: false`` path); nothing waits for company."""
    model = FakeSnac()
    batcher = SnacBatcher(model)
    dec = decoder(model, random_frames(4))
    assert batcher.submit(dec, 0, 4).result(10).shape == (4 * SPF,)
    assert batcher.forwards == {1: 1} and model.rows == [1] and batcher.pending == 0


def test_max_frames_splits_a_group():
    """At most max_frames frames per forward (rows x window); a wider window goes alone."""
    model = FakeSnac()
    batcher = SnacBatcher(model)
    assert batcher.max_frames == 4  # the CPU default
    decs = [decoder(model, random_frames(2, seed=s), per_chunk=2) for s in range(5)]
    wide = [decoder(model, random_frames(5, seed=s), per_chunk=5) for s in range(2)]
    with Blocked():
        futures = [batcher.submit(d, 0, d.frames_per_chunk) for d in (*decs, *wide)]
    for d, f in zip((*decs, *wide), futures, strict=True):
        np.testing.assert_array_equal(f.result(10), decode_frames(FakeSnac(), d.frames))
    assert model.rows == [2, 2, 1, 1, 1]
    assert SnacBatcher(model, device="cuda").max_frames == 256


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 2), st.booleans()), min_size=1,
                max_size=10),
       st.integers(1, 12))
def test_any_mix_of_chunks_each_gets_its_own_audio(chunks, max_frames):
    """Property: whatever windows are pending (widths, context, cancellations) and whatever the
    cap, every chunk not cancelled gets exactly its solo decode, a cancelled one is never
    decoded, one forward holds one width and at most max(max_frames, width) frames."""
    model = FakeSnac()
    batcher = SnacBatcher(model, max_frames=max_frames)
    decs, futures = [], []
    with Blocked():
        for i, (width, context, _) in enumerate(chunks):
            dec = decoder(model, random_frames(context + width, seed=i), per_chunk=width,
                          context_frames=context)
            dec.emitted = context
            decs.append(dec)
            futures.append(batcher.submit(dec, context, context + width))
        for f, (_, _, cancel) in zip(futures, chunks, strict=True):
            if cancel:
                assert f.cancel()
    live = 0
    for dec, f, (width, context, cancel) in zip(decs, futures, chunks, strict=True):
        if cancel:
            with pytest.raises(CancelledError):
                f.result(0)
            assert dec.emitted == context
            continue
        live += 1
        want = decode_frames(FakeSnac(), dec.frames)[context * SPF :]
        np.testing.assert_array_equal(f.result(10), want)
        assert dec.emitted == context + width
    assert sum(model.rows) == live
    assert all(b == 1 or b * f <= max_frames for b, f in model.shapes)


# ----------------------------------------------------------------------------- cancellation


def test_a_chunk_cancelled_while_queued_is_dropped_alone():
    model = FakeSnac()
    batcher = SnacBatcher(model, max_frames=64)
    a, b, c = (decoder(model, random_frames(4, seed=s)) for s in range(3))
    with Blocked():
        fa, fb, fc = (batcher.submit(d, 0, 4) for d in (a, b, c))
        assert fb.cancel()  # what a cancelled caller does (_await_job)
    assert fa.result(10).shape == fc.result(10).shape == (4 * SPF,)
    with pytest.raises(CancelledError):
        fb.result(0)
    assert model.rows == [2] and b.emitted == 0 and a.emitted == c.emitted == 4


async def test_a_caller_cancelled_during_its_batch_waits_for_the_batch():
    """Like run_compute: a caller cancelled while its chunk is being decoded goes on only after
    the forward ended (its clean-up never overlaps the decode); the others get their audio."""
    model = FakeSnac()
    model.gate = threading.Event()
    batcher = SnacBatcher(model, max_frames=64)
    a, b = (decoder(model, random_frames(4, seed=s)) for s in range(2))
    results: dict[str, object] = {}
    scopes: dict[str, anyio.CancelScope] = {}

    async def session(name: str, dec: ChunkedDecoder) -> None:
        with anyio.CancelScope() as scope:
            scopes[name] = scope
            try:
                results[name] = await batcher.decode(dec, 0, 4)
            except anyio.get_cancelled_exc_class():
                results[name] = ("cancelled", model.gate.is_set())
                raise

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            with Blocked():
                tg.start_soon(session, "a", a)
                tg.start_soon(session, "b", b)
                await until(lambda: batcher.pending == 2)
            await until(lambda: bool(model.rows))  # the batch of 2 is in the held forward
            scopes["b"].cancel()
            await anyio.sleep(0.05)
            assert "b" not in results  # still waiting for its batch
            model.gate.set()
    assert results["b"] == ("cancelled", True)
    assert isinstance(results["a"], np.ndarray) and results["a"].shape == (4 * SPF,)
    assert model.rows == [2]


# ----------------------------------------------------------------------------- errors


def test_a_failing_forward_fails_only_the_chunk_that_fails_alone():
    model = FakeSnac()
    poison = 4095

    def fail(codes):
        if (codes[0][:, 0] == poison).any():
            raise RuntimeError("SNAC blew up")

    model.fail = fail
    batcher = SnacBatcher(model, max_frames=64)
    good = [decoder(model, random_frames(4, seed=s)) for s in range(2)]
    bad = decoder(model, [(poison, *random_frames(1)[0][1:]), *random_frames(3)])
    with Blocked():
        futures = [batcher.submit(d, 0, 4) for d in (good[0], bad, good[1])]
    with pytest.raises(RuntimeError, match="SNAC blew up") as err:
        futures[1].result(10)
    assert any("frames [0, 4)" in n for n in err.value.__notes__)
    for d, f in zip(good, (futures[0], futures[2]), strict=True):
        np.testing.assert_array_equal(f.result(10), decode_frames(FakeSnac(), d.frames))
    assert model.rows == [3, 1, 1, 1]  # the batch, then each chunk alone
    assert batcher.forwards == {1: 2} and bad.emitted == 0


def test_a_forward_failing_only_in_a_batch_still_serves_everyone():
    """E.g. out of memory at a large batch: the chunks are decoded one by one instead."""
    model = FakeSnac()

    def fail(codes):
        if codes[0].shape[0] > 1:
            raise RuntimeError("out of memory")

    model.fail = fail
    batcher = SnacBatcher(model, max_frames=64)
    decs = [decoder(model, random_frames(4, seed=s)) for s in range(3)]
    with Blocked():
        futures = [batcher.submit(d, 0, 4) for d in decs]
    assert all(f.result(10).shape == (4 * SPF,) for f in futures)
    assert batcher.forwards == {1: 3}


def test_a_chunk_with_a_special_fails_alone_before_the_forward():
    model = FakeSnac()
    batcher = SnacBatcher(model, max_frames=64)
    decs = [decoder(model, random_frames(4, seed=s)) for s in range(3)]
    decs[1].frames[2] = (1, 2, 3, 4, 5, 6, 4100)  # past push's check (a bug upstream)
    with Blocked():
        futures = [batcher.submit(d, 0, 4) for d in decs]
    with pytest.raises(ValueError, match="must never reach the codec"):
        futures[1].result(10)
    assert futures[0].result(10).shape == futures[2].result(10).shape == (4 * SPF,)
    assert model.rows == [2]


def test_a_bug_in_the_drain_never_leaves_a_caller_waiting(monkeypatch):
    model = FakeSnac()
    batcher = SnacBatcher(model)

    def broken(group):
        raise KeyError("bug")

    monkeypatch.setattr(batcher, "_run", broken)
    with Blocked():
        futures = [batcher.submit(decoder(model, random_frames(4)), 0, 4) for _ in range(2)]
    for f in futures:
        with pytest.raises(KeyError, match="bug"):
            f.result(10)


def test_a_gone_executor_fails_the_chunk_clearly():
    model = FakeSnac()
    batcher = SnacBatcher(model, device="cuda")  # its own thread (no GPU needed: never runs)
    batcher._executor().shutdown()
    with pytest.raises(RuntimeError, match="compute thread is gone"):
        batcher.submit(decoder(model, random_frames(4)), 0, 4).result(1)
    assert batcher.pending == 0
    with pytest.raises(ValueError, match="are not in a decoder holding 4 frames"):
        batcher.submit(decoder(model, random_frames(4)), 2, 6)
    with pytest.raises(ValueError, match="max_frames must be >= 1"):
        SnacBatcher(model, max_frames=0)


# ----------------------------------------------------------------------------- the stage

CHUNKS = {"frames_per_chunk": 2, "first_chunk_frames": 1, "context_frames": 1,
          "lookahead_frames": 1}


def codec(resources: Resources, **options) -> SnacCodec:
    ctx = StageContext(name="codec", session=Session(), resources=resources)
    return SnacCodec({"model": "random://snac_24khz", "deterministic": True, **CHUNKS,
                      **options}, ctx)


async def answer(stage: SnacCodec, frames, turn: int = 1,
                 first_audio: anyio.Event | None = None) -> list[np.ndarray]:
    """Feed one answer's frames and its end of turn through ``stage``; its audio chunks."""
    out: list[np.ndarray] = []

    async def run(frame: Frame) -> None:
        async for o in stage.process(frame):
            if isinstance(o, OutputAudioFrame):
                out.append(o.samples)
                if first_audio is not None:
                    first_audio.set()

    for i, f in enumerate(frames):
        await run(AudioCodesFrame(codes=f, index=i, turn=turn, codec="snac_24khz"))
    await run(EndOfTurnFrame(turn=turn))
    return out


async def test_three_sessions_batched_equal_their_solo_runs():
    """Three sessions on one model, different lengths and start times: A and B start together
    (their first chunks are forced into one forward), C joins after A's first audio. Each
    session's chunks are bit for bit those of its solo run (``batch: false``)."""
    res = Resources()
    answers = {"a": random_frames(8, seed=1), "b": random_frames(5, seed=2),
               "c": random_frames(6, seed=3)}
    with anyio.fail_after(120):
        solo, alone = {}, codec(res, batch=False)
        await alone.setup()
        for turn, (name, frames) in enumerate(answers.items(), 1):
            solo[name] = await answer(alone, frames, turn)
        stages = {name: codec(res, batch_max_frames=64) for name in answers}
        for stage in stages.values():
            await stage.setup()
        batcher = stages["a"].batcher
        assert all(s.batcher is batcher for s in stages.values())  # one per model
        got: dict[str, list[np.ndarray]] = {}
        a_heard = anyio.Event()

        async def session(name: str, after: anyio.Event | None = None) -> None:
            if after is not None:
                await after.wait()
            got[name] = await answer(stages[name], answers[name],
                                     first_audio=a_heard if name == "a" else None)

        async with anyio.create_task_group() as tg:
            with Blocked():
                tg.start_soon(session, "a")
                tg.start_soon(session, "b")
                await until(lambda: batcher.pending == 2)
            tg.start_soon(session, "c", a_heard)
    assert batcher.forwards[2] + batcher.forwards[3] >= 1
    for name in answers:
        assert [len(x) for x in got[name]] == [len(x) for x in solo[name]], name
        for g, s in zip(got[name], solo[name], strict=True):
            np.testing.assert_array_equal(g, s)


async def test_barge_in_while_queued_drops_that_sessions_chunk_only():
    """B's chunk waits behind a busy compute thread next to A's; B's turn is interrupted (the
    pipeline cancels its process call, then calls interrupt): B's chunk is never decoded, A's
    is, alone, and equals A's solo run."""
    from omniframe.frames import InterruptFrame

    res = Resources()
    a, b, solo = codec(res), codec(res), codec(res, batch=False)
    frames = random_frames(2, seed=5)
    state: dict[str, object] = {}

    async def feed_a() -> None:
        state["a"] = await answer(a, frames)

    async def feed_b() -> None:
        with anyio.CancelScope() as scope:
            state["b_scope"] = scope
            state["b"] = await answer(b, frames)
        state["b_done"] = True

    with anyio.fail_after(60):
        for stage in (a, b, solo):
            await stage.setup()
        want = await answer(solo, frames)
        batcher = a.batcher
        async with anyio.create_task_group() as tg:
            with Blocked():
                tg.start_soon(feed_a)
                tg.start_soon(feed_b)
                await until(lambda: batcher.pending == 2)
                state["b_scope"].cancel()  # type: ignore[attr-defined]
                # it returns while the compute thread is still held
                await until(lambda: "b_done" in state)
                async for _ in b.interrupt(InterruptFrame(turn=2)):
                    pass
    assert "b" not in state and b._decoder is None
    assert batcher.forwards == {1: len(want)}  # A's chunks (the first, the tail) alone
    got = state["a"]
    assert isinstance(got, list) and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)

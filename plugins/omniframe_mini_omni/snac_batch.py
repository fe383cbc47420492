"""Cross-session batching of SNAC decodes (issue 12: "SNAC decoding of all sessions' pending
frames is batched too").

Every session's codec stage (:class:`~omniframe_mini_omni.snac_stage.SnacCodec`) hands its
ready chunks to the :class:`SnacBatcher` of the shared SNAC model (one batcher per loaded model,
in the same process-wide cache). Chunks of several sessions that are waiting at the same time
are decoded in one SNAC forward, one row per chunk, and each session gets its own audio back.

How it schedules (the style of :mod:`omniframe.engine`'s step loop, without a loop thread):

* **No collection window.** The first chunk that finds no drain job queued submits one to the
  compute thread (the process's one compute thread on CPU, :meth:`Stage.run_compute`'s; a
  thread of the batcher's own on other devices). When that job *starts*, it takes every chunk
  pending at that moment. A lone session therefore waits for nothing but the job ahead of it on
  the compute thread, as with ``batch: false``; chunks that arrive while the thread is busy (an
  LM step, another decode) ride along with the next job. The first chunk of a turn is queued
  synchronously, so the LM's hold/resume ordering (first audio before the next LM step) holds.
* **Grouped by shape, never padded.** A row of a batch is a window of frames (the chunk plus
  its left context and right look-ahead); only windows of the same length share a forward.
  Padding a shorter window with extra frames is not exact: SNAC's convolutions see the
  window's zero-padded edges, so frames near the edge would decode differently
  (``test_padding_would_change_the_audio`` shows it). In steady state every session's window
  has the same length (``context + frames_per_chunk + lookahead``); the first chunk, the tail
  and sessions with other chunk options form their own groups. Groups run in the order of
  their first chunk's arrival.
* **Size cap.** A forward holds at most ``max_frames`` frames in all (rows x window; one row
  always fits). On CPU SNAC is compute- and memory-bound, not weight-bound: measured on the
  2-core dev CPU (benchmarks/snac_batch.py), 1-frame windows decode 1.07-1.15x faster as
  2-4 rows, 4-frame windows 1.0-1.04x, 10-frame windows 0.75-0.8x (the bigger activations
  fall out of cache), and every row waits for the whole batch. So the CPU default is
  :data:`CPU_MAX_FRAMES` (4: batches only where measured no slower); on a GPU, where a forward
  is bound by kernel launches and rows are nearly free, :data:`GPU_MAX_FRAMES`.
* **Exactness.** A group of one is decoded by :meth:`ChunkedDecoder.decode_range` itself, the
  ``batch: false`` path. A group of several is cut from one ``model.decode`` on the stacked
  codes, with the same clamp and crop. With ``fast`` SNAC (the default) and one torch thread
  the rows are bitwise equal to solo decodes on CPU (measured, and tested); with several
  threads, or ``fast: false``, oneDNN/MKL pick other GEMM blockings for the bigger batch and
  rows differ from the solo decode by float rounding (measured <= 6e-7 absolute on audio in
  [-1, 1] on the 2-core dev CPU; tested against 1e-5).
* **Cancellation.** Each chunk is a :class:`concurrent.futures.Future` awaited like a
  ``run_compute`` job (``omniframe.stage._await_job``): a caller cancelled (barge-in,
  disconnect) before its drain job starts cancels its future and the job skips that chunk only;
  one cancelled while its batch runs waits (shielded, bounded) for the batch to end, so its
  clean-up never overlaps the decode.
* **Errors.** A chunk whose frames cannot be decoded (a special token) fails alone, before the
  forward. If a batched forward raises, each of its chunks is decoded again on its own, so the
  error reaches only the sessions whose chunk fails alone (with what a solo decode raises) and
  the others get their audio. The drain job resolves every future it took, whatever happens:
  nothing waits forever. An executor that no longer takes jobs (interpreter exit) fails the
  pending chunks with a clear error.

torch is imported lazily; this module is imported by the codec stage's ``setup()``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio.lowlevel
import structlog

from . import tokens
from .snac_codec import SAMPLES_PER_FRAME

if TYPE_CHECKING:
    import numpy as np

    from .snac_codec import ChunkedDecoder

__all__ = ["CPU_MAX_FRAMES", "GPU_MAX_FRAMES", "SnacBatcher", "decode_batch"]

log = structlog.get_logger("omniframe.mini_omni.snac_batch")

CPU_MAX_FRAMES = 4
"""Default frames (rows x window) per SNAC forward on CPU: see "Size cap" above."""
GPU_MAX_FRAMES = 256
"""Default frames per SNAC forward elsewhere (not measured yet on a GPU; bounds memory)."""


def decode_batch(model: Any, windows: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """Decode B windows of F aligned 7-code frames each (all the same F) in one SNAC forward:
    float32 (B, F * 2048), clamped like :func:`~omniframe_mini_omni.snac_codec.decode_frames`."""
    import torch

    if not windows:
        raise ValueError("decode_batch needs at least one window")
    lengths = {len(w) for w in windows}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"decode_batch needs windows of one non-zero length, got {lengths}")
    books = [tokens.frames_to_codebooks(w) for w in windows]  # raises on any special
    device = next(model.parameters()).device
    codes = [torch.tensor([b[i] for b in books], dtype=torch.long, device=device)
             for i in range(len(books[0]))]
    with torch.inference_mode():
        audio = model.decode(codes)  # (B, 1, F * 2048)
    return audio.reshape(len(windows), -1).float().clamp(-1.0, 1.0).cpu().numpy()


@dataclass(eq=False)
class _Chunk:
    """One session's chunk waiting for the batcher: frames [start, end) of ``decoder``,
    decoded in the window [lo, hi) (left context, right look-ahead)."""

    decoder: ChunkedDecoder
    start: int
    end: int
    right: int
    lo: int
    hi: int
    future: Future[np.ndarray] = field(default_factory=Future)

    @property
    def width(self) -> int:
        """Frames in the decoded window: the grouping key."""
        return self.hi - self.lo


class SnacBatcher:
    """Batches the chunk decodes of every session that shares one SNAC model (see the module
    docstring). Thread-safe; one per loaded model.

    Args:
        model: the loaded SNAC model (``snac_codec.load_snac``).
        device: the stages' device string: ``cpu...`` runs drain jobs on the process's compute
            thread, anything else on a thread of this batcher.
        max_frames: most frames (rows x window width) per SNAC forward; one row always fits.
            None: :data:`CPU_MAX_FRAMES` on CPU, :data:`GPU_MAX_FRAMES` elsewhere.
    """

    def __init__(self, model: Any, device: str = "cpu", *, max_frames: int | None = None) -> None:
        self.device = str(device)
        if max_frames is None:
            max_frames = CPU_MAX_FRAMES if self.device.startswith("cpu") else GPU_MAX_FRAMES
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.model = model
        self.max_frames = max_frames
        self._lock = threading.Lock()
        self._pending: list[_Chunk] = []
        self._scheduled = False  # a drain job is queued and has not taken the pending chunks
        self._own: ThreadPoolExecutor | None = None
        self.forwards: Counter[int] = Counter()
        """SNAC calls made, by rows (1: a solo ``decode_range``), for tests and benchmarks."""

    # ------------------------------------------------------------------ callers (any thread)
    @property
    def pending(self) -> int:
        """Chunks waiting for a drain job to take them."""
        with self._lock:
            return len(self._pending)

    async def decode(self, decoder: ChunkedDecoder, start: int, end: int, *,
                     right: int | None = None) -> np.ndarray:
        """What ``decoder.decode_range(start, end, right=right)`` returns (and marks the frames
        emitted the same way), decoded together with other sessions' pending chunks. Safe to
        cancel like :meth:`Stage.run_compute`."""
        from omniframe.stage import _await_job

        await anyio.lowlevel.checkpoint_if_cancelled()
        return await _await_job(self.submit(decoder, start, end, right=right))

    def submit(self, decoder: ChunkedDecoder, start: int, end: int, *,
               right: int | None = None) -> Future[np.ndarray]:
        """Queue frames [start, end) of ``decoder``; the future resolves to their audio.
        Cancelling the future before its drain job starts drops the chunk."""
        if not 0 <= start < end <= len(decoder.frames):
            raise ValueError(f"frames [{start}, {end}) are not in a decoder holding "
                             f"{len(decoder.frames)} frames")
        right = decoder.lookahead_frames if right is None else right
        lo = max(0, start - decoder.context_frames)  # ChunkedDecoder.decode_range's window
        hi = min(len(decoder.frames), end + right)
        chunk = _Chunk(decoder, start, end, right, lo, hi)
        with self._lock:
            self._pending.append(chunk)
            if self._scheduled:
                return chunk.future
            self._scheduled = True
        try:
            self._executor().submit(self._drain)
        except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
            with self._lock:
                self._scheduled = False
                orphans, self._pending = self._pending, []
            error = RuntimeError(f"SNAC decode not run: the compute thread is gone ({exc})")
            for c in orphans:
                if c.future.set_running_or_notify_cancel():
                    c.future.set_exception(error)
        return chunk.future

    def close(self) -> None:
        """Stop this batcher's own thread (non-CPU devices); CPU uses the shared one."""
        if self._own is not None:
            self._own.shutdown(wait=False)

    # ------------------------------------------------------------------ the drain job
    def _executor(self) -> ThreadPoolExecutor:
        if self.device.startswith("cpu"):
            from omniframe.stage import _compute_executor

            return _compute_executor()
        with self._lock:
            if self._own is None:
                self._own = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omniframe-snac")
            return self._own

    def _drain(self) -> None:
        """Decode every chunk pending now, grouped by window width (on the compute thread)."""
        with self._lock:
            self._scheduled = False
            taken, self._pending = self._pending, []
        live = [c for c in taken if c.future.set_running_or_notify_cancel()]  # drops cancelled
        try:
            groups: dict[int, list[_Chunk]] = {}
            for c in live:  # dicts keep insertion order: groups run by first arrival
                groups.setdefault(c.width, []).append(c)
            for width, group in groups.items():
                rows = max(1, self.max_frames // width)
                for i in range(0, len(group), rows):
                    self._run(group[i : i + rows])
        except BaseException as exc:  # a bug here must not leave a caller waiting
            log.exception("SNAC batch drain failed")
            for c in live:
                if not c.future.done():
                    c.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def _run(self, group: list[_Chunk]) -> None:
        """One SNAC forward for ``group`` (chunks of one window width)."""
        if len(group) == 1:
            self._solo(group[0])
            return
        ok: list[_Chunk] = []
        for c in group:  # a chunk that cannot be decoded fails alone, before the forward
            try:
                tokens.frames_to_codebooks(c.decoder.frames[c.lo : c.hi])
            except Exception as exc:  # noqa: BLE001 (that chunk's caller gets it)
                c.future.set_exception(exc)
            else:
                ok.append(c)
        if len(ok) <= 1:
            for c in ok:
                self._solo(c)
            return
        try:
            audio = decode_batch(self.model, [c.decoder.frames[c.lo : c.hi] for c in ok])
        except Exception as exc:  # noqa: BLE001 (retried one by one: the error finds its owner)
            log.warning("batched SNAC decode failed; decoding its chunks one by one",
                        rows=len(ok), frames=ok[0].width, error=f"{type(exc).__name__}: {exc}")
            for c in ok:
                self._solo(c)
            return
        self.forwards[len(ok)] += 1
        for row, c in zip(audio, ok, strict=True):
            a = (c.start - c.lo) * SAMPLES_PER_FRAME
            out = row[a : a + (c.end - c.start) * SAMPLES_PER_FRAME].copy()
            c.decoder.emitted = c.end
            c.future.set_result(out)

    def _solo(self, c: _Chunk) -> None:
        """``batch: false``'s decode of one chunk."""
        try:
            out = c.decoder.decode_range(c.start, c.end, right=c.right)
        except Exception as exc:  # noqa: BLE001 (that chunk's caller gets it)
            with contextlib.suppress(AttributeError):
                exc.add_note(f"while SNAC decoded frames [{c.start}, {c.end}) of one session")
            c.future.set_exception(exc)
            return
        self.forwards[1] += 1
        c.future.set_result(out)

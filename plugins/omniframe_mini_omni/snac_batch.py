"""Cross-session batching of SNAC decodes (issue 12: "SNAC decoding of all sessions' pending
frames is batched too").

Every session's codec stage (:class:`~omniframe_mini_omni.snac_stage.SnacCodec`) hands its
ready chunks to the :class:`SnacBatcher` of the shared SNAC model (one batcher per loaded model,
in the same process-wide cache). Chunks of several sessions that are waiting at the same time
are decoded in one SNAC forward, one row per chunk, and each session gets its own audio back.

How it schedules (the style of :mod:`omniframe.engine`'s step loop, without a loop thread):

* **No collection window.** The first chunk that finds no drain job queued submits one to the
  compute thread (the process's one compute thread on CPU, :meth:`Stage.run_compute`'s; a thread
  of the batcher's own on other devices). When that job *starts*, it takes every chunk pending
  at that moment. A lone session therefore waits for nothing but the job ahead of it on the
  compute thread, as with ``batch: false``; chunks that arrive while the thread is busy (an LM
  step, another decode) ride along with the next job. The first chunk of a turn is queued
  synchronously, so the LM's hold/resume ordering (first audio before the next LM step) holds.
* **Grouped by shape, never padded.** A row of a batch is a window of frames (the chunk plus its
  left context and right look-ahead); only windows of the same length share a forward. Padding a
  shorter window with extra frames is not exact: SNAC's convolutions see the window's
  zero-padded edges, so frames near the edge would decode differently
  (``test_padding_would_change_the_audio`` shows it). In steady state every session's window has
  the same length (``context + frames_per_chunk + lookahead``); the first chunk, the tail and
  sessions with other chunk options form their own groups. Groups run in the order of their
  first chunk's arrival.
* **CPU: split forward and a size cap.** On CPU SNAC is compute- and memory-bound, not
  weight-bound. Measured on the 2-core dev CPU (benchmarks/snac_batch.py, 1 torch thread, load
  ~1.2, one forward of N rows against N solo decodes): 1-frame windows 1.06x (N=2) and 1.12x
  (N=4) faster, 4-frame windows 0.95x / 0.92x, 10-frame windows 0.79x / 0.69x: the late layers'
  long activations of several rows fall out of cache. So on CPU the batch runs through the
  decoder's first :data:`CPU_BATCHED_BLOCKS` upsampling blocks only (large weights, short
  activations: batching shares the weight reads), then the rest row by row, each row handed to
  its session as soon as it is done: 1.04x / 1.11x, 1.01x / 1.04x, 1.00x / 1.00x for the same
  cases, never slower (2 threads: 1.12x / 1.15x, 1.01x / 1.05x, 1.03x / 1.10x). A forward holds
  at most ``max_frames`` frames in all (rows x window width; one row always fits):
  :data:`CPU_MAX_FRAMES` on CPU, so only short windows (1-frame first chunks, 2-frame windows)
  batch there, where it measured faster, and :data:`GPU_MAX_FRAMES` elsewhere, where a forward
  is bound by kernel launches and rows are nearly free (the whole forward is batched; not
  measured on a GPU yet). The cost: the first rows wait for the batched part of the others,
  about +10 % mean wait per chunk at N=2-4.
* **Exactness.** A group of one is decoded by :meth:`ChunkedDecoder.decode_range` itself, the
  ``batch: false`` path. A group of several is cut from the batched decode of the stacked codes,
  with the same clamp and crop. With ``fast`` SNAC (the default) and one torch thread the rows
  are bitwise equal to solo decodes on CPU (measured, and tested, whole or split); with several
  threads, or ``fast: false``, MKL/oneDNN pick other GEMM blockings for the bigger batch and
  rows differ from the solo decode by float rounding (measured <= 6e-7 absolute on audio in
  [-1, 1] on the 2-core dev CPU; tested against 1e-5). The split's row-by-row part runs at batch 1,
  exactly as solo.
* **Cancellation.** Each chunk is a :class:`concurrent.futures.Future` awaited like a
  ``run_compute`` job (``omniframe.stage._await_job``): a caller cancelled (barge-in,
  disconnect) before its drain job starts cancels its future and the job skips that chunk only;
  one cancelled while its batch runs waits (shielded, bounded) until its row is decoded, so its
  clean-up never overlaps the decode of its chunk.
* **Errors.** A chunk whose frames cannot be decoded (a special token) fails alone, before the
  forward. If a batched forward raises, each of its chunks not yet handed out is decoded again
  on its own, so the error reaches only the sessions whose chunk fails alone (with what a solo
  decode raises) and the others get their audio. The drain job resolves every future it took,
  whatever happens: nothing waits forever. An executor that no longer takes jobs (interpreter
  exit) fails the pending chunks with a clear error.

torch is imported lazily; this module is imported by the codec stage's ``setup()``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
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

__all__ = ["CPU_BATCHED_BLOCKS", "CPU_MAX_FRAMES", "GPU_MAX_FRAMES", "SnacBatcher",
           "decode_batch", "decode_rows"]

log = structlog.get_logger("omniframe.mini_omni.snac_batch")

CPU_MAX_FRAMES = 4
"""Default frames (rows x window) per SNAC forward on CPU: see "CPU" above."""
CPU_BATCHED_BLOCKS = 2
"""On CPU, the batch runs through SNAC's decoder up to its 2nd upsampling block (large weights,
short activations), the rest one row at a time (small weights, long activations)."""
GPU_MAX_FRAMES = 256
"""Default frames per SNAC forward elsewhere (not measured yet on a GPU; bounds memory)."""


def _split_at(model: Any, batched_blocks: int | None) -> int | None:
    """Index in SNAC's decoder ``Sequential`` after its ``batched_blocks``-th upsampling block
    (None: run the whole decoder batched, also for models without that structure)."""
    from torch import nn

    seq = getattr(getattr(model, "decoder", None), "model", None)
    if batched_blocks is None or not isinstance(seq, nn.Sequential):
        return None
    seen = 0
    for i, layer in enumerate(seq):
        if type(layer).__name__ == "DecoderBlock":
            seen += 1
            if seen == batched_blocks:
                return i + 1
    return None


def decode_rows(model: Any, windows: Sequence[Sequence[Sequence[int]]], *,
                batched_blocks: int | None = None) -> Iterator[np.ndarray]:
    """Decode B windows of F aligned 7-code frames each (all the same F) together; yields each
    window's float32 (F * 2048,) audio, clamped like
    :func:`~omniframe_mini_omni.snac_codec.decode_frames`, in order.

    ``batched_blocks``: None runs the whole SNAC forward on the batch (``model.decode``).
    A number k runs the quantizer and the decoder up to its k-th upsampling block on the batch,
    then the rest of the decoder one row at a time, each row yielded as soon as it is done (see
    :data:`CPU_BATCHED_BLOCKS`).
    """
    import torch

    if not windows:
        raise ValueError("decode_rows needs at least one window")
    lengths = {len(w) for w in windows}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"decode_rows needs windows of one non-zero length, got {lengths}")
    books = [tokens.frames_to_codebooks(w) for w in windows]  # raises on any special
    device = next(model.parameters()).device
    codes = [torch.tensor([b[i] for b in books], dtype=torch.long, device=device)
             for i in range(len(books[0]))]

    def samples(audio: Any) -> np.ndarray:
        return audio.reshape(-1).float().clamp(-1.0, 1.0).cpu().numpy()

    split = _split_at(model, batched_blocks)
    if split is None:
        with torch.inference_mode():  # never held across a yield (it is thread state)
            audio = model.decode(codes)  # (B, 1, F * 2048)
            rows = samples(audio).reshape(len(windows), -1)  # one copy to the host
        yield from rows
        return
    layers = model.decoder.model
    with torch.inference_mode():
        hidden = layers[:split](model.quantizer.from_codes(codes))  # SNAC.decode, first part
    for i in range(len(windows)):
        with torch.inference_mode():
            row = samples(layers[split:](hidden[i : i + 1]))
        yield row


def decode_batch(model: Any, windows: Sequence[Sequence[Sequence[int]]], *,
                 batched_blocks: int | None = None) -> np.ndarray:
    """:func:`decode_rows` stacked: float32 (B, F * 2048)."""
    import numpy as np

    return np.stack(list(decode_rows(model, windows, batched_blocks=batched_blocks)))


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
        blocks = CPU_BATCHED_BLOCKS if self.device.startswith("cpu") else None
        rows = decode_rows(self.model, [c.decoder.frames[c.lo : c.hi] for c in ok],
                           batched_blocks=blocks)
        done = 0
        try:
            for row, c in zip(rows, ok, strict=True):  # each row resolves as soon as it is out
                a = (c.start - c.lo) * SAMPLES_PER_FRAME
                out = row[a : a + (c.end - c.start) * SAMPLES_PER_FRAME].copy()
                c.decoder.emitted = c.end
                c.future.set_result(out)
                done += 1
        except Exception as exc:  # noqa: BLE001 (retried one by one: the error finds its owner)
            log.warning("batched SNAC decode failed; decoding its chunks one by one",
                        rows=len(ok), frames=ok[0].width, error=f"{type(exc).__name__}: {exc}")
            for c in ok[done:]:
                self._solo(c)
            return
        self.forwards[len(ok)] += 1

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

"""Mini-Omni's codec stage ``snac``: :class:`~omniframe.frames.AudioCodesFrame` →
:class:`~omniframe.frames.OutputAudioFrame` (24 kHz), in chunks; flushes the last partial chunk
and forwards the EndOfTurnFrame after it. torch and snac are imported in ``setup()``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from pydantic import Field

from omniframe.frames import (
    AudioCodesFrame,
    EndOfStreamFrame,
    EndOfTurnFrame,
    Frame,
    InterruptFrame,
    OutputAudioFrame,
)
from omniframe.model_uris import model_cache_key
from omniframe.stage import Stage, StageOptions

__all__ = ["SnacCodec"]


class SnacCodec(Stage):
    """SNAC 24 kHz decoder for Mini-Omni's 7-code frames, streamed in chunks.

    ``frames_per_chunk: 4`` is the release (341 ms per chunk). Beyond the reference:
    ``context_frames`` / ``lookahead_frames`` decode each chunk with neighbouring frames (no
    clicks at chunk borders; look-ahead costs 85 ms per frame of latency), the final partial
    chunk is decoded at the end of the turn, and frames holding special tokens (>= 4096) are
    dropped instead of reaching SNAC. ``deterministic: true`` turns SNAC's noise off.
    ``batch: true`` (default) decodes this session's chunks in one SNAC forward with the chunks
    of other sessions on the same model that are pending at the same time
    (:mod:`omniframe_mini_omni.snac_batch`: no waiting window, grouped by shape, the same audio).
    """

    kind = "codec"
    name = "snac"
    consumes = (AudioCodesFrame, EndOfTurnFrame)
    requires = (AudioCodesFrame,)  # an end of turn alone is no input
    produces = (OutputAudioFrame, EndOfTurnFrame)

    class Options(StageOptions):
        model: str = "hf://hubertsiuzdak/snac_24khz"
        """``hf://hubertsiuzdak/snac_24khz``, a folder with config.json + pytorch_model.bin,
        or ``random://snac_24khz``."""
        frames_per_chunk: int = Field(default=4, ge=1, le=256)
        first_chunk_frames: int | None = Field(default=None, ge=1, le=256)
        """Frames in the first chunk only (default: frames_per_chunk). 1 gives first audio
        after 8 decode steps while later chunks of frames_per_chunk keep SNAC's cost low."""
        context_frames: int = Field(default=0, ge=0, le=64)
        """Frames before each chunk decoded with it (left context; their audio is dropped)."""
        lookahead_frames: int = Field(default=0, ge=0, le=64)
        """Frames after each chunk waited for and decoded with it (right context)."""
        decode_tail: bool = True
        """Decode the last partial chunk at the end of the turn (the reference drops it)."""
        deterministic: bool = False
        """Remove SNAC's random noise (reproducible audio, e.g. for tests)."""
        fast: bool = True
        """Fold weight norm into the weights (exact) and run the transposed convolutions as
        matmul + overlap-add (float rounding differs, ~1e-6): a 1-frame chunk decodes ~2.4x
        faster on CPU. false: SNAC's own modules, as the reference."""
        seed: int = 0
        """Seed of ``random://`` weights."""
        batch: bool = True
        """Decode chunks of the sessions sharing this SNAC model together when several are
        pending at once (one forward per chunk shape; a lone session's chunk is decoded at once,
        as with false). Audio equals the solo decode (bitwise on CPU with one torch thread, else
        within float rounding): see :mod:`omniframe_mini_omni.snac_batch`."""
        batch_max_frames: int | None = Field(default=None, ge=1, le=4096)
        """Most frames (chunks x their window: context + chunk + look-ahead) per batched SNAC
        forward. None: 4 on CPU (only short windows gain there), 256 on a GPU."""

    async def setup(self) -> None:
        from omniframe_mini_omni.snac_codec import load_snac

        o = self.options
        device = self.context.device
        key = model_cache_key("mini-omni/snac", o.model, device, o.deterministic, o.fast,
                              seed=o.seed)
        self.model = await self.shared_model(
            key, lambda: load_snac(o.model, device=device, deterministic=o.deterministic,
                                   seed=o.seed, fast=o.fast))
        self._turn: int | None = None
        self._decoder: Any = None
        self.dropped_frames = 0
        self.batcher: Any = None
        if o.batch:
            from omniframe_mini_omni.snac_batch import SnacBatcher

            model = self.model
            cap = o.batch_max_frames
            self.batcher = await self.shared_model(
                ("mini-omni/snac-batcher", *key, cap),
                lambda: SnacBatcher(model, device, max_frames=cap))
        await self.run_compute(self._warm_up)

    def _warm_up(self) -> None:
        """Decode the chunk shapes of a turn once, so that the first answer does not pay for
        creating the convolution kernels (about 0.1-1 s on CPU)."""
        from omniframe_mini_omni.snac_codec import decode_frames

        o = self.options
        shapes = set()
        for chunk in {o.frames_per_chunk, o.first_chunk_frames or o.frames_per_chunk}:
            shapes |= {chunk + o.lookahead_frames, chunk + o.lookahead_frames + o.context_frames}
        for n in sorted(shapes):
            decode_frames(self.model, [(0,) * 7] * n)

    def _new_decoder(self, turn: int) -> Any:
        from omniframe_mini_omni.snac_codec import ChunkedDecoder

        o = self.options
        self._turn = turn
        self._decoder = ChunkedDecoder(self.model, o.frames_per_chunk, o.context_frames,
                                       o.lookahead_frames, first_chunk_frames=o.first_chunk_frames)
        return self._decoder

    def _audio(self, samples: Any) -> OutputAudioFrame:
        from omniframe_mini_omni.snac_codec import SAMPLE_RATE

        return OutputAudioFrame(samples=samples, sample_rate=SAMPLE_RATE)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if isinstance(frame, EndOfTurnFrame):
            async for out in self._finish(frame.turn):
                yield out
            yield frame
            return
        assert isinstance(frame, AudioCodesFrame)
        if frame.codec and frame.codec != "snac_24khz":
            raise ValueError(
                f"codec 'snac' decodes snac_24khz codes, got codes for {frame.codec!r}; "
                "put a matching codec stage after the LM"
            )
        dec = self._decoder if self._turn == frame.turn and self._decoder else None
        if dec is None:
            dec = self._new_decoder(frame.turn)
        if not dec.push(frame.codes):
            self.dropped_frames += 1
            self.log.debug("frame with special tokens dropped before SNAC", turn=frame.turn,
                           index=frame.index, codes=list(frame.codes),
                           dropped=self.dropped_frames)
            return
        while dec.ready():
            start, end = dec.next_chunk()
            samples = await self._decode(dec, start, end)
            if self._decoder is not dec:  # interrupted while decoding: drop it
                return
            yield self._audio(samples)

    async def _finish(self, turn: int) -> AsyncIterator[Frame]:
        """End of the answer to ``turn``: decode what is left of it (if it is the current one)."""
        dec, current = self._decoder, self._turn
        self._decoder, self._turn = None, None
        if dec is None or (turn and current != turn):
            return
        if dec.dropped:
            self.log.info("frames with special tokens were not decoded", turn=turn,
                          dropped=dec.dropped, decoded=len(dec.frames))
        if self.options.decode_tail and dec.emitted < len(dec.frames):
            # dec.flush(): the final partial chunk and any held look-ahead
            samples = await self._decode(dec, dec.emitted, len(dec.frames), right=0)
            if len(samples):
                yield self._audio(samples)

    async def _decode(self, dec: Any, start: int, end: int, right: int | None = None) -> Any:
        """Audio of frames [start, end) of ``dec`` (``dec.decode_range``), through the batcher
        shared by the sessions on this model, or alone on the compute thread."""
        if self.batcher is not None:
            return await self.batcher.decode(dec, start, end, right=right)
        return await self.run_compute(partial(dec.decode_range, start, end, right=right))

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        self._decoder, self._turn = None, None  # drop the answer in flight
        return
        yield  # pragma: no cover

    async def end_of_stream(self, frame: EndOfStreamFrame) -> AsyncIterator[Frame]:
        if self._decoder is not None:
            async for out in self._finish(self._turn or 0):
                yield out

"""Mini-Omni as pipeline stages: the Whisper encoder, the LM and the SNAC codec.

* encoder ``whisper``: :class:`~omniframe.frames.UserTurnFrame` (any rate; resampled to 16 kHz)
  → :class:`~omniframe.frames.FeaturesFrame` (torch tensor (L, 768), 50 frames/s).
* lm ``mini-omni``: FeaturesFrame (speech tasks) or :class:`~omniframe.frames.TranscriptFrame`
  (text tasks T1A2, T1T2) → :class:`~omniframe.frames.TextDeltaFrame` as the text is decoded,
  one :class:`~omniframe.frames.AudioCodesFrame` (7 SNAC codes) per decode step once the delay
  pattern has produced a whole frame, then :class:`~omniframe.frames.EndOfTurnFrame`.
* codec ``snac``: AudioCodesFrame → :class:`~omniframe.frames.OutputAudioFrame` (24 kHz), in
  chunks; flushes the last partial chunk and forwards the EndOfTurnFrame after it.

torch, whisper and snac are imported inside ``setup()`` and the helpers it calls, never here.
Models are shared between pipelines through ``context.resources`` (keys: URI, dtype, device).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any, Literal

import anyio
from pydantic import Field, field_validator, model_validator

from omniframe.frames import (
    AudioCodesFrame,
    EndOfStreamFrame,
    EndOfTurnFrame,
    ErrorFrame,
    FeaturesFrame,
    Frame,
    InterruptFrame,
    OutputAudioFrame,
    TextDeltaFrame,
    TranscriptFrame,
    UserTurnFrame,
)
from omniframe.stage import Stage, StageOptions

__all__ = ["MiniOmniLM", "SnacCodec", "WhisperEncoderStage"]

Dtype = Literal["float32", "bfloat16"]
Task = Literal["A1A2", "A1T2", "ASR", "T1A2", "T1T2"]


# ====================================================================================== encoder


class WhisperEncoderStage(Stage):
    """Whisper encoder features for Mini-Omni (spec §7): one 768-dim frame per 20 ms.

    Faithful by default (pad to 30 s before the mel, encode 1500 frames, keep
    ``int(ms/20)+1``). ``trim: true`` encodes only the frames needed: much faster for short
    questions, but the features differ from the reference (the encoder no longer attends to
    the 30 s of padding), so answers may change.
    """

    kind = "encoder"
    name = "whisper"
    consumes = (UserTurnFrame,)
    requires = (UserTurnFrame,)
    produces = (FeaturesFrame, EndOfTurnFrame, ErrorFrame)

    class Options(StageOptions):
        model: str = "small"
        """``small`` (OpenAI CDN, as the reference), a ``.pt`` file or folder, ``hf://...``,
        or ``random://small`` / ``random://tiny`` (random weights of the real size)."""
        trim: bool = False
        """Encode only the needed frames (fast; results differ slightly from the reference)."""
        dtype: Dtype = "float32"
        seed: int = 0
        """Seed of ``random://`` weights."""
        download_root: str | None = None
        """Where openai-whisper caches downloads (default ``~/.cache/whisper``)."""

    async def setup(self) -> None:
        from omniframe_mini_omni.whisper_encoder import load_whisper_encoder

        o = self.options
        device = self.context.device
        key = ("mini-omni/whisper", o.model, o.dtype, device,
               o.seed if o.model.startswith("random://") else None)
        self.encoder = await self.shared_model(
            key, lambda: load_whisper_encoder(o.model, device=device, dtype=o.dtype,
                                              seed=o.seed, download_root=o.download_root))
        self.log.info("whisper encoder ready", encoder=self.encoder.name, trim=o.trim)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        from omniframe_mini_omni.whisper_encoder import FRAME_RATE, WhisperInputError

        assert isinstance(frame, UserTurnFrame)
        try:
            feats = await self.run_compute(self._encode, frame.samples, frame.sample_rate)
        except WhisperInputError as exc:
            self.log.warning("unusable user turn", turn=frame.turn, error=str(exc))
            yield ErrorFrame(stage=self.context.name, message=str(exc))
            yield EndOfTurnFrame(reason="empty")
            return
        yield FeaturesFrame(features=feats, frame_rate=FRAME_RATE, encoder=self.encoder.name,
                            speech_end_ts=frame.speech_end_ts)

    def _encode(self, samples: Any, rate: int) -> Any:
        return self.encoder.encode(samples, rate, trim=self.options.trim)


# ========================================================================================= codec


class SnacCodec(Stage):
    """SNAC 24 kHz decoder for Mini-Omni's 7-code frames, streamed in chunks.

    ``frames_per_chunk: 4`` is the release (341 ms per chunk). Beyond the reference:
    ``context_frames`` / ``lookahead_frames`` decode each chunk with neighbouring frames (no
    clicks at chunk borders; look-ahead costs 85 ms per frame of latency), the final partial
    chunk is decoded at the end of the turn, and frames holding special tokens (>= 4096) are
    dropped instead of reaching SNAC. ``deterministic: true`` turns SNAC's noise off.
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

    async def setup(self) -> None:
        from omniframe_mini_omni.snac_codec import load_snac

        o = self.options
        device = self.context.device
        key = ("mini-omni/snac", o.model, device, o.deterministic, o.fast,
               o.seed if o.model.startswith("random://") else None)
        self.model = await self.shared_model(
            key, lambda: load_snac(o.model, device=device, deterministic=o.deterministic,
                                   seed=o.seed, fast=o.fast))
        self._turn: int | None = None
        self._decoder: Any = None
        self.dropped_frames = 0
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
            samples = await self.run_compute(dec.decode_range, start, end)
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
        if self.options.decode_tail:
            samples = await self.run_compute(dec.flush)
            if samples is not None and len(samples):
                yield self._audio(samples)

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        self._decoder, self._turn = None, None  # drop the answer in flight
        return
        yield  # pragma: no cover

    async def end_of_stream(self, frame: EndOfStreamFrame) -> AsyncIterator[Frame]:
        if self._decoder is not None:
            async for out in self._finish(self._turn or 0):
                yield out


# ============================================================================================ LM


class _ByteTokenizer:
    """Stand-in text tokenizer for random-weight models, which come without tokenizer.json:
    UTF-8 bytes in, bytes (ids < 256) or ``<id>`` markers out."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any) -> str:
        from omniframe_mini_omni import tokens

        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i == tokens.EOT:
                break
            if i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            if i < tokens.TEXT_TOKENIZER_SIZE:
                out.append(f"<{i}>")
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class _Loaded:
    """A loaded LM shared through the resource cache, with the lock that serialises turns
    (the KV cache belongs to the model: one generation at a time)."""

    def __init__(self, bundle: Any, tokenizer: Any) -> None:
        self.model = bundle.model
        self.config = bundle.config
        self.tokenizer = tokenizer
        self.lock = threading.Lock()


def _load_lm(uri: str, dtype: str, device: str, seed: int) -> _Loaded:
    """Load ``uri``: ``random://<preset>``, ``hf://org/name[@rev]``, a local folder, or a URI
    another plugin resolves."""
    import torch

    from omniframe_mini_omni import checkpoint

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if uri.startswith("random://"):
        bundle = _random_lm(uri[len("random://"):], torch_dtype, device, seed)
        return _Loaded(bundle, None)
    if uri.startswith("hf://"):
        repo, _, rev = uri[len("hf://"):].partition("@")
        try:
            folder = checkpoint.download_mini_omni(repo, rev or None)
        except checkpoint.CheckpointError as exc:
            from omniframe.models import ModelNotAvailable

            raise ModelNotAvailable(str(exc)) from exc
    else:
        from omniframe.models import resolve_model

        ref = resolve_model(uri)
        if ref.path is None:
            raise ValueError(f"{uri!r} does not name a Mini-Omni checkpoint folder")
        folder = ref.path
    bundle = checkpoint.load_mini_omni(folder, dtype=torch_dtype, device=device)
    return _Loaded(bundle, bundle.tokenizer)


def _random_lm(preset: str, dtype: Any, device: str, seed: int) -> Any:
    """Random weights of a preset, built directly in ``dtype`` (no float32 copy of the 0.5B
    model in memory when asking for bfloat16)."""
    import torch

    from omniframe_mini_omni import checkpoint
    from omniframe_mini_omni.config import PRESETS, Config, ConfigError
    from omniframe_mini_omni.model import GPT

    if preset not in PRESETS:
        raise ConfigError(f"random://{preset}: unknown Mini-Omni preset; known: "
                          f"{', '.join(PRESETS)}")
    if dtype == torch.float32:
        return checkpoint.load_mini_omni(preset=preset, dtype=dtype, device=device, seed=seed)
    config = Config.from_name(preset)
    with torch.device("meta"):
        model = GPT(config)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    model.eval()
    return checkpoint.MiniOmni(model=model, config=config, tokenizer=None, path=None)


async def _let_downstream_submit(rounds: int = 8) -> None:
    """Give the event loop a few rounds so that the codec takes the first audio frame and
    queues its decode on the compute thread before the next LM step: the first audio then
    waits for SNAC only, not for an LM step too (~35 ms on the dev CPU)."""
    for _ in range(rounds):
        await anyio.lowlevel.checkpoint()


def _next_step(stream: Any) -> Any:
    """One decode step (the first call prefills), under inference mode; None at the end."""
    import torch

    with torch.inference_mode():
        return next(stream, None)


def _open_trace(path: str) -> IO[str]:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    return p.open("w")


class MiniOmniLM(Stage):
    """Mini-Omni: hears Whisper features (or reads text) and answers with text and SNAC codes.

    Tasks: ``A1A2`` speech → speech + text (default; batch-parallel decoding as released),
    ``A1T2`` speech → text, ``ASR`` speech → transcript, ``T1A2`` text → speech + text,
    ``T1T2`` text → text. Text tasks read :class:`TranscriptFrame` (put an ASR before, or feed
    transcripts). Decoding runs one step at a time in a worker thread, so the event loop stays
    live and an interruption stops generation between two steps.
    """

    kind = "lm"
    name = "mini-omni"
    consumes = (FeaturesFrame, TranscriptFrame)
    requires = (FeaturesFrame, TranscriptFrame)  # by task: see required_inputs
    produces = (TextDeltaFrame, AudioCodesFrame, EndOfTurnFrame, TranscriptFrame)

    class Options(StageOptions):
        model: str = "hf://gpt-omni/mini-omni"
        """``hf://gpt-omni/mini-omni``, a local checkpoint folder (lit_model.pth,
        model_config.yaml, tokenizer.json), or ``random://mini-omni`` / ``random://tiny``."""
        task: Task = "A1A2"
        batch_parallel: bool = True
        """A1A2 only: decode a speech row and a text-only row together; the text row's
        (stronger) text is spoken (the released streaming default)."""
        temperature: float = Field(default=0.9, ge=0.0)
        top_k: int | None = Field(default=1, ge=0)
        """1 (the reference's default) makes decoding greedy; None or 0: no limit."""
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        seed: int | None = None
        """Seed of the sampler (and of ``random://`` weights; default 0 for those)."""
        max_new_tokens: int | None = Field(default=None, ge=1)
        """Cap on decode steps per answer (one step = 85.3 ms of speech); default: up to the
        model's 2048 positions."""
        dtype: Dtype = "float32"
        faithful: bool = False
        """Compute as the reference does: all 181,120 logits at every prompt position, both
        heads for both rows, both batch rows prefilled in full, the text head kept after the
        end of text. False (fast) skips that work; greedy tokens are the same (up to float
        rounding in the shared-prefix prefill), see fastpath.py."""
        trace: str | None = None
        """Write one JSON line per decode step: turn, step, the 7 fed-back local audio ids and
        the text id."""
        tokenizer: str | None = None
        """A tokenizer.json to use instead of the checkpoint's (random models have none: they
        fall back to a byte tokenizer)."""
        output: Literal["answer", "transcript"] = "answer"
        """``transcript`` (text-output tasks, meant for ASR): emit the whole text as one
        TranscriptFrame instead of text deltas and an end of turn, so that a text-input
        stage (T1A2, T1T2, a cascade LM) can answer it."""

        @model_validator(mode="after")
        def _check_output(self) -> MiniOmniLM.Options:
            if self.output == "transcript" and self.task in ("A1A2", "T1A2"):
                raise ValueError(
                    f"output 'transcript' needs a text-output task (ASR, A1T2, T1T2), not "
                    f"{self.task}"
                )
            return self

        @field_validator("trace", "tokenizer")
        @classmethod
        def _not_empty(cls, v: str | None) -> str | None:
            if v is not None and not v.strip():
                raise ValueError("give a path or leave it out")
            return v

    def required_inputs(self) -> tuple[type[Frame], ...]:
        """Text tasks (T1A2, T1T2) read transcripts; the others Whisper features."""
        return (TranscriptFrame,) if self.options.task.startswith("T") else (FeaturesFrame,)

    async def setup(self) -> None:
        o = self.options
        device = self.context.device
        seed = o.seed if o.seed is not None else 0
        key = ("mini-omni/lm", o.model, o.dtype, device,
               seed if o.model.startswith("random://") else None)
        self.lm: _Loaded = await self.shared_model(
            key, lambda: _load_lm(o.model, o.dtype, device, seed))
        self.tokenizer = self.lm.tokenizer
        if o.max_new_tokens is None and o.model.startswith("random://"):
            from omniframe_mini_omni.generate import RANDOM_MAX_NEW_TOKENS

            # random weights rarely stop: without a cap they would decode ~2000 steps of noise
            self.options = o = o.model_copy(update={"max_new_tokens": RANDOM_MAX_NEW_TOKENS})
            self.log.info("random:// weights: max_new_tokens defaults to "
                          f"{RANDOM_MAX_NEW_TOKENS} (set it to decode more)")
        if o.tokenizer is not None:
            from omniframe_mini_omni.tokenizer import TextTokenizer

            self.tokenizer = await self.run_sync(TextTokenizer, o.tokenizer)
        if self.tokenizer is None:
            self.log.warning("model has no tokenizer (random weights): text uses a byte "
                             "stand-in; pass options.tokenizer=/path/tokenizer.json for real text",
                             model=o.model)
            self.tokenizer = _ByteTokenizer()
        self._trace_file: IO[str] | None = None
        self._trace_lock = threading.Lock()
        if o.trace:
            self._trace_file = await self.run_sync(_open_trace, o.trace)
        self._active: tuple[int, Any] | None = None  # (turn, IncrementalDecoder) in flight
        self._speech_end_ts = 0.0
        if not o.faithful and o.dtype == "bfloat16" and str(device).startswith("cpu"):
            await self.run_sync(self._load_kernels)

    def _load_kernels(self) -> None:
        """Build (first time on this machine, ~30 s) or load the CPU decode-step kernel now,
        not in the first answer (fastpath.py, kernels.py)."""
        from omniframe_mini_omni import kernels

        t0 = time.perf_counter()
        ext = kernels.load()
        took = time.perf_counter() - t0
        if ext is None:
            self.log.info("CPU decode kernel off: PyTorch kernels run the decode steps",
                          reason=kernels.unavailable_reason())
        elif took > 2.0:
            self.log.info("built the CPU decode kernel (once per machine)", s=round(took, 1))

    async def teardown(self) -> None:
        if getattr(self, "_trace_file", None) is not None:
            assert self._trace_file is not None
            self._trace_file.close()
            self._trace_file = None

    # ------------------------------------------------------------------------------ turns

    def _input(self, frame: Frame) -> tuple[dict[str, Any], str] | None:
        """Generation inputs for a consumed frame, or None if the task does not take it."""
        import torch

        from omniframe_mini_omni.generate import prompt_positions
        from omniframe_mini_omni.tokens import Task as TaskEnum

        task = TaskEnum(self.options.task)
        if isinstance(frame, FeaturesFrame):
            if not task.audio_input:
                return None
            feats = frame.features
            if not isinstance(feats, torch.Tensor):
                feats = torch.as_tensor(feats)
            width = self.lm.config.whisper_adapter_dim
            if feats.dim() != 2 or feats.size(-1) != width:
                raise ValueError(
                    f"mini-omni needs Whisper features of shape (L, {width}) (whisper-small); "
                    f"got {tuple(feats.shape)} from encoder {frame.encoder!r}. Use the "
                    f"'whisper' encoder stage with model small (or random://small)."
                )
            if feats.size(0) < 1:
                raise ValueError("empty FeaturesFrame (0 frames): nothing to answer")
            seconds = feats.size(0) / (frame.frame_rate or 50.0)
            self._speech_end_ts = frame.speech_end_ts
            n = int(feats.size(0))
            self._check_budget(prompt_positions(task, n_frames=n),
                               f"the user's speech ({n} Whisper frames, {n / 50:.1f} s)")
            return {"whisper_features": feats.float()}, f"<{seconds:.1f} s of speech>"
        assert isinstance(frame, TranscriptFrame)
        if task.audio_input or not frame.final:
            return None
        ids = self.tokenizer.encode(frame.text.strip())
        self._speech_end_ts = frame.speech_end_ts
        if ids:
            self._check_budget(prompt_positions(task, n_text=len(ids)),
                               f"the user's text ({len(ids)} tokens)")
        return {"text_ids": ids}, frame.text.strip()

    def _check_budget(self, prompt: int, what: str) -> None:
        """Warn when a turn leaves fewer positions than ``max_new_tokens``: it is answered
        with the positions left (see the README's context budget). A prompt that alone fills
        the context is refused for its turn by GenerationStream (an ErrorFrame)."""
        from omniframe_mini_omni.generate import ContextBudgetError, check_context_budget

        block = int(self.lm.config.block_size)
        if prompt >= block:
            return
        try:
            check_context_budget(block, prompt, self.options.max_new_tokens, what)
        except ContextBudgetError as exc:
            self.log.warning(f"{exc}; answering with the {block - prompt} positions left")

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        inputs = self._input(frame)
        if inputs is None:
            yield frame  # not this task's input: pass it on
            return
        kwargs, heard = inputs
        if "text_ids" in kwargs and not kwargs["text_ids"]:
            yield EndOfTurnFrame(reason="empty", text="")
            return
        transcript = self.options.output == "transcript"
        if not transcript:
            self.context.session.add("user", heard, frame.turn)
        async for out in self._generate(frame.turn, kwargs):
            if not transcript:
                yield out
            elif isinstance(out, EndOfTurnFrame):
                yield TranscriptFrame(text=(out.text or "").strip(), final=True,
                                      speech_end_ts=self._speech_end_ts)
            elif not isinstance(out, TextDeltaFrame):
                yield out

    async def _acquire(self) -> None:
        lock = self.lm.lock
        # A threading lock (sessions may run on different event loops), polled so that a
        # cancelled waiter never ends up holding it.
        while not lock.acquire(blocking=False):  # noqa: ASYNC110
            await anyio.sleep(0.005)

    async def _generate(self, turn: int, kwargs: dict[str, Any]) -> AsyncIterator[Frame]:
        from omniframe_mini_omni.generate import GenerationStream, SamplingOptions
        from omniframe_mini_omni.tokenizer import IncrementalDecoder
        from omniframe_mini_omni.tokens import EOT
        from omniframe_mini_omni.tokens import Task as TaskEnum

        o = self.options
        task = TaskEnum(o.task)
        sampling = SamplingOptions(temperature=o.temperature, top_k=o.top_k or None,
                                   top_p=o.top_p)
        text = IncrementalDecoder(self.tokenizer)  # type: ignore[arg-type]
        model: Any = self.lm.model
        if not o.faithful:
            from omniframe_mini_omni.fastpath import FastLM

            greedy = o.top_k == 1 or o.temperature == 0.0
            model = FastLM(model, skip_text_head=greedy and task.audio_output)
        await self._acquire()
        stream: Any = None
        self._active = (turn, text)
        try:
            try:
                stream = await self.run_compute(lambda: GenerationStream(
                    model, task,
                    batch_parallel=o.batch_parallel and task is TaskEnum.A1A2,
                    sampling=sampling, seed=o.seed, max_steps=o.max_new_tokens,
                    faithful=o.faithful, trace=self._tracer(turn), **kwargs))
            except ValueError as exc:  # e.g. a text prompt longer than the 2048 positions
                self._active = None
                yield ErrorFrame(stage=self.context.name, message=f"cannot answer: {exc}")
                yield EndOfTurnFrame(reason="error", text="")
                return
            t0 = time.perf_counter()
            steps = 0
            while True:
                step = await self.run_compute(_next_step, stream)
                if step is None:
                    break
                steps += 1
                if step.text == EOT and model is not self.lm.model:
                    model.text_ended()  # the text head is no longer needed (fastpath.py)
                delta = text.push(step.text)
                if delta:
                    yield TextDeltaFrame(text=delta)
                if step.frame is not None:
                    yield AudioCodesFrame(codes=tuple(step.frame), codec="snac_24khz",
                                          index=step.frame_index)
                    if step.frame_index == 0:
                        await _let_downstream_submit()
            tail = text.flush()
            if tail:
                yield TextDeltaFrame(text=tail)
            self._active = None
            reason = stream.stop_reason
            elapsed = time.perf_counter() - t0
            self.log.info("answer done", turn=turn, steps=steps, stop=reason,
                          steps_per_s=round(steps / elapsed, 2) if elapsed > 0 else None)
            if self.options.output == "answer":
                self.context.session.add("assistant", text.text, turn)
            yield EndOfTurnFrame(
                reason="completed" if reason in ("eoa", "eot") else "max_tokens", text=text.text)
        finally:
            # the model is released only after the stream is closed, on the compute thread
            # that ran its steps (so after any step still in flight), whatever ended the turn
            try:
                if stream is not None:
                    with anyio.CancelScope(shield=True):
                        await self.run_compute(stream.close)
            finally:
                self.lm.lock.release()

    def _tracer(self, turn: int) -> Callable[[dict[str, Any]], None] | None:
        f = self._trace_file
        if f is None:
            return None

        def write(rec: dict[str, Any]) -> None:
            with self._trace_lock:
                f.write(json.dumps({"turn": turn, **rec}) + "\n")
                f.flush()

        return write

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        """The answer in flight (cancelled by the pipeline between two steps) ends here."""
        active = self._active
        if active is None or not 0 < active[0] < frame.turn:
            return
        self._active = None
        turn, text = active
        partial = text.text
        if self.options.output == "answer":
            self.context.session.add("assistant", partial, turn)
        yield EndOfTurnFrame(turn=turn, reason="interrupted", text=partial)

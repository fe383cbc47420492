"""Mini-Omni's LM stage ``mini-omni``: :class:`~omniframe.frames.FeaturesFrame` (speech tasks)
or :class:`~omniframe.frames.TranscriptFrame` (text tasks T1A2, T1T2) →
:class:`~omniframe.frames.TextDeltaFrame` as the text is decoded, one
:class:`~omniframe.frames.AudioCodesFrame` (7 SNAC codes) per decode step once the delay
pattern has produced a whole frame, then :class:`~omniframe.frames.EndOfTurnFrame`.

The loaded model is shared between pipelines through ``context.resources`` (keys: URI, dtype,
device); torch is imported in ``setup()`` and the helpers it calls, never here.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any, Literal

import anyio
import structlog
from pydantic import Field, field_validator, model_validator

from omniframe.frames import (
    AudioCodesFrame,
    EndOfTurnFrame,
    ErrorFrame,
    FeaturesFrame,
    Frame,
    InterruptFrame,
    TextDeltaFrame,
    TranscriptFrame,
)
from omniframe.model_uris import (
    hf_repo,
    is_random,
    model_cache_key,
    random_preset,
    split_uri,
)
from omniframe.stage import Stage, StageOptions

__all__ = ["MiniOmniLM"]

Dtype = Literal["float32", "bfloat16"]
Task = Literal["A1A2", "A1T2", "ASR", "T1A2", "T1T2"]


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
    """A loaded LM shared through the resource cache, with the lock that serialises solo
    turns (their KV cache is the model's) and, made on first use, the engine that decodes
    the turns of every ``engine: true`` stage on this model together."""

    def __init__(self, bundle: Any, tokenizer: Any) -> None:
        self.model = bundle.model
        self.config = bundle.config
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self._engine: Any = None
        self._engine_lock = threading.Lock()
        self.engine_kind: str | None = None  # "static" or "dynamic" once the engine exists
        self._kind_warned = False

    def engine(self, device: str, kind: str = "auto", capacity: int | None = None) -> Any:
        """The model's :class:`omniframe.engine.Engine` (one per loaded model, of the kind the
        first caller asks for). Its steps hold ``lock``, so solo turns and engine steps never
        interleave on the model. ``kind``: ``static`` (KV slot pool, one batched attention,
        device sampling, CUDA graphs on a GPU: static_engine.py), ``dynamic`` (per-request
        caches, the small-batch CPU kernel: engine.py), ``auto`` (static on CUDA).
        ``capacity``: turns decoding at once (default :data:`ENGINE_CAPACITY`, or
        :data:`ENGINE_CAPACITY_CUDA` on a GPU)."""
        with self._engine_lock:
            if self._engine is None:
                import torch

                from omniframe.engine import Engine
                from omniframe_mini_omni.engine import MiniOmniEngineModel

                cuda = torch.device(device).type == "cuda"
                if kind == "auto":
                    kind = "static" if cuda else "dynamic"
                if capacity is None:
                    capacity = ENGINE_CAPACITY
                    if cuda:
                        capacity = _cuda_capacity(self.model, torch.device(device))
                self.engine_kind = kind
                em: Any = MiniOmniEngineModel(self.model)
                if kind == "static":
                    em = _static_engine(self.model, capacity, compile=cuda, lock=self.lock)
                self._engine = Engine(em, capacity=capacity,
                                      prefill_budget=ENGINE_PREFILL_BUDGET, device=str(device),
                                      name="mini-omni-engine", gate=self.lock)
            elif kind not in ("auto", self.engine_kind) and not self._kind_warned:
                self._kind_warned = True
                structlog.get_logger("omniframe.mini_omni.lm").warning(
                    "engine_kind ignored: this model's engine already runs the other kind "
                    "(one engine per loaded model; give every stage on it the same "
                    "engine_kind)", asked=kind, running=self.engine_kind)
            return self._engine


ENGINE_CAPACITY = 16
"""Turns an engine decodes at once on a CPU (more queue, FIFO)."""
ENGINE_CAPACITY_CUDA = 96
"""... on a GPU, at most: issue 12 aims at 64 real-time sessions per GPU. The static engine's
KV pool for 96 turns of 2 rows x 2,049 positions is 4.8 GB in bfloat16 (9.7 in float32); the
default takes fewer turns when the pool would need more than
:data:`ENGINE_POOL_SHARE` of the GPU's free memory. ``engine_capacity`` sets it per model."""
ENGINE_POOL_SHARE = 0.4
"""Share of the GPU's free memory the default KV pool may take (the rest: activations, SNAC,
Whisper, CUDA graphs)."""


def _static_engine(model: Any, capacity: int, *, compile: bool, lock: Any) -> Any:
    """A StaticEngineModel with every bucket's CUDA graph captured now, not in a live turn.
    On a GPU its blocks are compiled (step 2.1 ms against 3.9 without, one H100: docs/bench);
    if compiling or capturing fails (no Triton, an unsupported GPU), the engine runs without
    compile, and says so."""
    from omniframe_mini_omni.static_engine import StaticEngineModel

    with lock:
        em = StaticEngineModel(model, capacity=capacity, compile=compile)
        if compile:
            try:
                em.capture()
                return em
            except Exception as exc:  # noqa: BLE001 (any compiler failure: run uncompiled)
                structlog.get_logger("omniframe.mini_omni.lm").warning(
                    "engine: torch.compile failed, decoding without it (~2x slower steps)",
                    error=f"{type(exc).__name__}: {exc}"[:300])
                em.disable_compile()
        em.capture()
        return em


def _cuda_capacity(model: Any, device: Any) -> int:
    """The default engine capacity on a GPU: ENGINE_CAPACITY_CUDA turns, or as many as fit in
    ENGINE_POOL_SHARE of the free memory (at least 1)."""
    import torch

    from omniframe_mini_omni.static_engine import StaticEngineModel

    free, _total = torch.cuda.mem_get_info(device)
    fit = int(free * ENGINE_POOL_SHARE // StaticEngineModel.slot_bytes(model))
    capacity = max(1, min(ENGINE_CAPACITY_CUDA, fit))
    if capacity < ENGINE_CAPACITY_CUDA:
        structlog.get_logger("omniframe.mini_omni.lm").info(
            "engine capacity limited by free GPU memory", capacity=capacity,
            free_gb=round(free / 1e9, 2))
    return capacity
ENGINE_PREFILL_BUDGET = 512
"""Prompt positions an engine step prefills at most (one prompt always fits: a 5 s question is
~254 positions; see omniframe/engine.py)."""


def _load_lm(uri: str, dtype: str, device: str, seed: int) -> _Loaded:
    """Load ``uri``: ``random://<preset>``, ``hf://org/name[@rev]``, a local folder, or a URI
    another plugin resolves."""
    import torch

    from omniframe_mini_omni import checkpoint

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    scheme = split_uri(uri)[0]
    if scheme == "random":
        bundle = _random_lm(random_preset(uri), torch_dtype, device, seed)
        return _Loaded(bundle, None)
    if scheme == "hf":
        repo, rev = hf_repo(uri)
        try:
            folder = checkpoint.download_mini_omni(repo, rev)
        except checkpoint.CheckpointError as exc:
            from omniframe.model_uris import ModelNotAvailable

            raise ModelNotAvailable(str(exc)) from exc
    else:
        from omniframe.model_uris import resolve_model

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
    live_options = frozenset({"temperature", "top_k", "top_p", "max_new_tokens", "seed"})

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
        engine: bool = True
        """Decode through the model's shared engine (omniframe_mini_omni/engine.py): the turns
        of every pipeline (session) on this model decode together, one batched step for all,
        each with the tokens of a solo run (float32). False: one turn at a time under the
        model's lock (the path ``faithful`` always takes). Engine steps hold that lock too, so
        stages of both kinds on one model take turns (a solo turn waits while the engine has
        work)."""
        engine_capacity: int | None = Field(default=None, ge=1, le=1024)
        """Turns the model's engine decodes at once (the others wait in FIFO order); default
        16 on a CPU, on a GPU 96 or what 40 % of its free memory holds. The static engine's KV
        pool is sized by it. One engine per loaded model: the first stage to use it
        decides."""
        engine_kind: Literal["auto", "static", "dynamic"] = "auto"
        """Which engine step: ``static`` (a KV slot pool, one batched attention for all
        sessions, sampling on the device, CUDA graphs on a GPU; seeded sampling draws from a
        counter-based stream, not the solo path's), ``dynamic`` (per-turn caches, the CPU's
        small-batch kernel; every token the solo run's), ``auto``: static on CUDA, dynamic
        elsewhere. One engine per loaded model: the first stage to use it decides."""
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
        key = model_cache_key("mini-omni/lm", o.model, o.dtype, device, seed=seed)
        self.lm: _Loaded = await self.shared_model(
            key, lambda: _load_lm(o.model, o.dtype, device, seed))
        self.tokenizer = self.lm.tokenizer
        if o.max_new_tokens is None and is_random(o.model):
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
        static = o.engine_kind == "static" or (o.engine_kind == "auto"
                                                and str(device).startswith("cuda"))
        if o.engine and not o.faithful and static:
            # the KV pool's allocation and the CUDA graphs' capture: here, off the event loop
            t = time.perf_counter()
            await self.run_sync(self.lm.engine, str(device), o.engine_kind, o.engine_capacity)
            self.log.info("engine ready", setup_s=round(time.perf_counter() - t, 2))
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
        if o.engine and not o.faithful:
            async for out in self._generate_engine(turn, kwargs, task, sampling, text):
                yield out
            return
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
                for out in self._refused(exc):
                    yield out
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
                for out in self._frames_of(step, text):
                    yield out
                if step.frame is not None and step.frame_index == 0:
                    await _let_downstream_submit()
            for out in self._finish(turn, text, steps, t0, stream.stop_reason):
                yield out
        finally:
            # the model is released only after the stream is closed, on the compute thread
            # that ran its steps (so after any step still in flight), whatever ended the turn
            try:
                if stream is not None:
                    with anyio.CancelScope(shield=True):
                        await self.run_compute(stream.close)
            finally:
                self.lm.lock.release()

    async def _generate_engine(self, turn: int, kwargs: dict[str, Any], task: Any,
                               sampling: Any, text: Any) -> AsyncIterator[Frame]:
        """A turn through the model's engine: the same frames as the solo path."""
        from omniframe_mini_omni.engine import TurnRequest
        from omniframe_mini_omni.tokens import Task as TaskEnum

        o = self.options
        engine = self.lm.engine(self.context.device, o.engine_kind, o.engine_capacity)
        request = TurnRequest(task, batch_parallel=o.batch_parallel and task is TaskEnum.A1A2,
                              sampling=sampling, seed=o.seed, max_steps=o.max_new_tokens,
                              trace=self._tracer(turn), **kwargs)
        self._active = (turn, text)
        steps = 0
        t0 = time.perf_counter()
        async with engine.submit(request, holds=True) as answer:
            while True:
                try:
                    step = await answer.__anext__()
                except StopAsyncIteration:
                    break
                except ValueError as exc:  # the prefill refused it (e.g. a too long prompt)
                    if steps:
                        raise
                    for out in self._refused(exc):
                        yield out
                    return
                steps += 1
                for out in self._frames_of(step, text):
                    yield out
                if step.frame is not None and step.frame_index == 0:
                    await _let_downstream_submit()
                    answer.resume()  # the engine held its next step for the codec
            reason = answer.info
        for out in self._finish(turn, text, steps, t0, reason, engine=True):
            yield out

    @staticmethod
    def _frames_of(step: Any, text: Any) -> list[Frame]:
        """What one decode step says: its new text, then its SNAC frame (if one is whole)."""
        out: list[Frame] = []
        delta = text.push(step.text)
        if delta:
            out.append(TextDeltaFrame(text=delta))
        if step.frame is not None:
            out.append(AudioCodesFrame(codes=tuple(step.frame), codec="snac_24khz",
                                       index=step.frame_index))
        return out

    def _refused(self, exc: Exception) -> list[Frame]:
        """A turn the model cannot take (its prompt does not fit): said, and ended."""
        self._active = None
        return [ErrorFrame(stage=self.context.name, message=f"cannot answer: {exc}"),
                EndOfTurnFrame(reason="error", text="")]

    def _finish(self, turn: int, text: Any, steps: int, t0: float, reason: Any,
                **log: Any) -> list[Frame]:
        """The end of an answer: the text still buffered, the history, the end of turn."""
        out: list[Frame] = []
        tail = text.flush()
        if tail:
            out.append(TextDeltaFrame(text=tail))
        self._active = None
        elapsed = time.perf_counter() - t0
        self.log.info("answer done", turn=turn, steps=steps, stop=reason, **log,
                      steps_per_s=round(steps / elapsed, 2) if elapsed > 0 else None)
        if self.options.output == "answer":
            self.context.session.add("assistant", text.text, turn)
        out.append(EndOfTurnFrame(
            reason="completed" if reason in ("eoa", "eot") else "max_tokens", text=text.text))
        return out

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

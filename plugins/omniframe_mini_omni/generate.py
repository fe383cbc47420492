"""Mini-Omni decode loops (spec mini_omni.md §5), as a step-by-step iterator.

One :class:`GenerationStream` runs one turn. Iterating it prefills the prompt, then yields one
:class:`DecodeStep` per recorded decode step: the text token, the 7 audio tokens and, from step 7
on, the aligned SNAC frame that the step completed (frame f = layer i at step f+i+1). A streaming
stage turns ``step.text_token`` into text deltas and ``step.frame`` into audio.

Reference behaviour reproduced here (to the token, given the same logits):

- sampling: top-k, then temperature, then top-p (if < 1), then a multinomial draw; defaults
  temperature 0.9, top_k 1, top_p 1.0, i.e. greedy. Audio heads are sampled before text.
- A1A2 / T1A2 (speech out): stop when layer 6 samples EOA (4096); that step is not recorded.
  After the text samples EOT, every later text token is forced to ``pad_t``; EOT is fed back
  once. The checks start at the first step after the prefill (step 0 is never checked).
- batch parallel decoding (A1A2 default): row 0 is the A1A2 prompt, row 1 the A1T2 prompt;
  audio comes from row 0, text from row 1; row 1's text is fed to both rows and row 1's audio
  input is always ``pad_a``.
- A1T2 / ASR / T1T2 (text out): stop when the text samples EOT (not recorded); the audio inputs
  are ``pad_a``.
- length: steps 1.. run at positions T, T+1, ... up to ``max_returned_tokens - 2`` (the loop
  ``range(2, max_returned_tokens - T + 1)`` of the reference), so at most
  ``max_returned_tokens - T`` steps are recorded (default 2048: the block size).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import torch
from torch import Tensor

from . import tokens
from .tokens import Task

log = logging.getLogger(__name__)

StopReason = Literal["eoa", "eot", "max_length", "max_steps", "closed"]
TraceTarget = str | Path | IO[str] | Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings; the defaults are the reference's (greedy in effect, top_k = 1)."""

    temperature: float = 0.9
    top_k: int | None = 1
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 1 (or None/0 for no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(
    logits: Tensor,
    options: SamplingOptions = SamplingOptions(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one id per row of ``logits`` (N, V) -> (N,) int64.

    Order: keep the top-k logits, divide by the temperature, keep the nucleus of mass top_p
    (only if < 1), softmax, multinomial. top_k = 1 short-cuts to the top-1 index (the same id
    the full procedure draws). temperature = 0 means argmax after top-k.
    """
    logits = logits.float()
    k = options.top_k
    if k == 1:
        return torch.topk(logits, 1, dim=-1).indices[:, 0]
    if k:
        k = min(k, logits.size(-1))
        values, idx = torch.topk(logits, k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, idx, values)
    if options.temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    logits = logits / options.temperature
    if options.top_p < 1.0:
        logits = _nucleus(logits, options.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Mask (to -inf) the low-probability tail whose total mass is at most 1 - top_p."""
    ascending, order = torch.sort(logits, dim=-1)
    tail_mass = torch.softmax(ascending, dim=-1).cumsum(dim=-1)  # (N, V) increasing
    drop = tail_mass <= 1.0 - top_p
    drop[:, -1] = False  # always keep the most likely token
    drop = drop.scatter(-1, order, drop)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class DecodeStep:
    """One recorded decode step.

    Attributes:
        step: 0-based index (0 = the token predicted by the prefill).
        text: text id recorded at this step (``pad_t`` after end of text; raw id).
        audio: the 7 local audio ids sampled at this step (delayed layers, row 0), or None for
            text-output tasks.
        frame_index, frame: the SNAC frame completed by this step, aligned (7 local ids in the
            flat depth-first order), from step 7 on; None otherwise. ``frame_index`` = step - 7.
        fed: the 8 global ids that follow this step as the next input of row 0.
    """

    step: int
    text: int
    audio: tuple[int, ...] | None
    frame_index: int | None
    frame: tuple[int, ...] | None
    fed: tuple[int, ...]

    @property
    def text_token(self) -> int | None:
        """The text id if it is a tokenizer token (not EOT/pad/...), else None."""
        return self.text if self.text < tokens.TEXT_TOKENIZER_SIZE else None

    @property
    def frame_is_codes(self) -> bool:
        """True when ``frame`` holds 7 SNAC codes (safe for the codec; specials are not)."""
        return self.frame is not None and tokens.is_code_frame(self.frame)


@dataclass
class GenerationResult:
    """Everything one turn recorded (the reference's ``list_output``)."""

    task: Task
    text_tokens: list[int]
    audio_tokens: list[list[int]] | None  # 7 rows of local ids (delayed), None for text tasks
    frames: list[list[int]] = field(default_factory=list)  # aligned frames
    stop_reason: StopReason | None = None
    prompt_length: int = 0


# --------------------------------------------------------------------------- the loop
class GenerationStream(Iterator[DecodeStep]):
    """Iterator over the decode steps of one Mini-Omni turn.

    Args:
        model: a :class:`~omniframe_mini_omni.model.GPT` (or anything with its ``forward``,
            ``set_kv_cache``, ``config`` and ``device``).
        task: ``A1A2``, ``A1T2``, ``ASR``, ``T1A2`` or ``T1T2``.
        whisper_features: (L, 768) or (1, L, 768) Whisper encoder frames, for speech-input
            tasks; L is the number of LM positions of the speech (``int(ms / 20) + 1``).
        text_ids: tokenized input text, for text-input tasks.
        batch_parallel: batch trick (A1A2 + A1T2 rows). Default: True for A1A2 (what the
            reference streams), False otherwise; T1A2 with True is an extension (T1A2 + T1T2).
        sampling: :class:`SamplingOptions`.
        generator: torch.Generator for the multinomial draws (on the model's device); or
        seed: build one seeded generator.
        max_returned_tokens: prompt + decode positions bound (default and max: block_size).
        max_steps: optional cap on the number of recorded steps (stop reason "max_steps").
        faithful: compute logits like the reference (all 181,120 columns at every prompt
            position, both heads for every row). The sampled tokens are the same; it is slower.
        trace: where to write one JSON line per recorded step, {step, audio: [7 local ids],
            text: id}, of the fed-back tokens (path, text file, or callable taking the dict).

    Only one stream may run on a model at a time (the KV cache is the model's).
    """

    def __init__(
        self,
        model: Any,
        task: Task | str,
        *,
        whisper_features: Tensor | None = None,
        text_ids: Sequence[int] | None = None,
        batch_parallel: bool | None = None,
        sampling: SamplingOptions = SamplingOptions(),
        generator: torch.Generator | None = None,
        seed: int | None = None,
        max_returned_tokens: int | None = None,
        max_steps: int | None = None,
        faithful: bool = False,
        trace: TraceTarget | None = None,
    ) -> None:
        self.model = model
        self.task = Task(task)
        self.sampling = sampling
        self.faithful = faithful
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        block_size = int(model.config.block_size)
        self.max_returned_tokens = max_returned_tokens or block_size
        if self.max_returned_tokens > block_size:
            raise ValueError(
                f"max_returned_tokens={self.max_returned_tokens} exceeds the model's "
                f"block_size={block_size}"
            )
        if batch_parallel is None:
            batch_parallel = self.task is Task.A1A2
        if batch_parallel and not self.task.audio_output:
            raise ValueError(f"batch_parallel decoding needs a speech-output task, not {task}")
        self.batch_parallel = batch_parallel

        # prompt rows (each 8 streams of global ids)
        self.features: Tensor | None = None
        if self.task.audio_input:
            if whisper_features is None:
                raise ValueError(f"task {self.task} needs whisper_features (L, 768)")
            feats = whisper_features
            if feats.dim() == 3:
                if feats.size(0) != 1:
                    raise ValueError("whisper_features must be (L, D) or (1, L, D): one utterance")
                feats = feats[0]
            if feats.dim() != 2 or feats.size(0) < 1:
                raise ValueError(f"whisper_features must be (L, D), got {tuple(feats.shape)}")
            self.features = feats.unsqueeze(0)  # (1, L, D), shared by both batch rows
            n_frames = feats.size(0)
            rows = [tokens.audio_input_prompt(self.task, n_frames)]
            if batch_parallel:
                rows.append(tokens.audio_input_prompt(Task.A1T2, n_frames))
            self.whisper_len = n_frames
        else:
            if whisper_features is not None:
                raise ValueError(f"task {self.task} takes text input, not whisper_features")
            if text_ids is None:
                raise ValueError(f"task {self.task} needs text_ids")
            rows = [tokens.text_input_prompt(self.task, text_ids)]
            if batch_parallel:
                rows.append(tokens.text_input_prompt(Task.T1T2, text_ids))
            self.whisper_len = 0
        self.prompt = rows
        self.prompt_length = len(rows[0][0])
        if self.prompt_length >= self.max_returned_tokens:
            raise ValueError(
                f"prompt of {self.prompt_length} positions leaves no room to generate within "
                f"max_returned_tokens={self.max_returned_tokens}: shorten the input (Mini-Omni "
                "reads at most ~30 s of speech)"
            )

        if generator is None and seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(seed)
        self.generator = generator
        self._trace_target = trace

        self.text_tokens: list[int] = []
        self.audio_tokens: list[list[int]] | None = (
            [[] for _ in range(tokens.N_AUDIO_LAYERS)] if self.task.audio_output else None
        )
        self.stop_reason: StopReason | None = None
        self._it = self._run()

    # ------------------------------------------------------------------ iterator protocol
    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> DecodeStep:
        return next(self._it)

    def close(self) -> None:
        """Stop early (interruption); the model is free for the next stream."""
        self._it.close()

    def run(self) -> GenerationResult:
        """Consume the remaining steps and return the whole result."""
        for _ in self:
            pass
        return self.result()

    def result(self) -> GenerationResult:
        return GenerationResult(
            task=self.task,
            text_tokens=list(self.text_tokens),
            audio_tokens=[list(r) for r in self.audio_tokens] if self.audio_tokens else None,
            frames=tokens.undelay(self.audio_tokens) if self.audio_tokens else [],
            stop_reason=self.stop_reason,
            prompt_length=self.prompt_length,
        )

    # ------------------------------------------------------------------ internals
    def _run(self) -> Iterator[DecodeStep]:
        model = self.model
        if getattr(model, "_omni_stream_active", False):
            raise RuntimeError(
                "another GenerationStream is running on this model; finish or close() it first"
            )
        model._omni_stream_active = True
        trace, close_trace = _open_trace(self._trace_target)
        try:
            yield from self._loop(trace)
        except GeneratorExit:
            self.stop_reason = self.stop_reason or "closed"
            raise
        finally:
            model._omni_stream_active = False
            if close_trace is not None:
                close_trace()

    def _loop(self, trace: Callable[[dict[str, Any]], None] | None) -> Iterator[DecodeStep]:
        model = self.model
        device = model.device
        B = len(self.prompt)
        T = self.prompt_length
        speaks = self.task.audio_output
        batch = self.batch_parallel
        fast = not self.faithful
        # which row each head is read from; fast mode computes only those rows
        audio_row, text_row = 0, (1 if batch else 0)
        audio_rows_arg = ([audio_row] if speaks else []) if fast else None
        text_rows_arg = [text_row] if fast else None

        with torch.no_grad():
            model.set_kv_cache(B, self.max_returned_tokens)
            ids = torch.tensor(self.prompt, dtype=torch.long, device=device)  # (B, 8, T)
            feats = self.features.to(device) if self.features is not None else None
            audio_logits, text_logits = model(
                ids,
                0,
                whisper_features=feats,
                whisper_lens=[self.whisper_len] * B if feats is not None else None,
                audio_rows=[True] * B if feats is not None else None,
                last_only=fast,
                audio_head_rows=audio_rows_arg,
                text_head_rows=text_rows_arg,
            )
            audio, text = self._sample(audio_logits, text_logits, audio_rows_arg, text_rows_arg)
        # step 0: recorded without checks (reference behaviour)
        step = 0
        yield self._record(step, audio, text, trace)

        text_end = False
        pos = T
        for _ in range(2, self.max_returned_tokens - T + 1):
            if self.max_steps is not None and step + 1 >= self.max_steps:
                self.stop_reason = "max_steps"
                return
            with torch.no_grad():
                x = torch.tensor(self._next_input(audio, text), dtype=torch.long, device=device)
                audio_logits, text_logits = model(
                    x,  # (B, 8, 1)
                    pos,
                    last_only=True,
                    audio_head_rows=audio_rows_arg,
                    text_head_rows=text_rows_arg,
                )
                audio, text = self._sample(audio_logits, text_logits, audio_rows_arg, text_rows_arg)
            if speaks:
                if text_end:
                    text = tokens.PAD_T
                assert audio is not None
                if audio[-1] == tokens.EOA:
                    self.stop_reason = "eoa"
                    return
                if text == tokens.EOT:
                    text_end = True
            elif text == tokens.EOT:
                self.stop_reason = "eot"
                return
            step += 1
            yield self._record(step, audio, text, trace)
            pos += 1
        self.stop_reason = "max_length"

    def _sample(
        self,
        audio_logits: Tensor,
        text_logits: Tensor,
        audio_rows: list[int] | None,
        text_rows: list[int] | None,
    ) -> tuple[list[int] | None, int]:
        """Sample 7 audio ids (row 0) and 1 text id (text row) from the last position."""
        text_row = 1 if self.batch_parallel else 0
        t_logits = text_logits[0 if text_rows is not None else text_row, -1]  # (Vt,)
        if self.task.audio_output:
            a_logits = audio_logits[0, -1]  # (7, 4160): row 0 in both modes
            a = sample(a_logits, self.sampling, self.generator)  # audio first, as upstream
            t = sample(t_logits[None], self.sampling, self.generator)
            values = torch.cat([a, t]).tolist()  # one device sync per step
            return [int(v) for v in values[:-1]], int(values[-1])
        t = sample(t_logits[None], self.sampling, self.generator)
        return None, int(t.item())

    def _next_input(self, audio: list[int] | None, text: int) -> list[list[list[int]]]:
        """(B, 8, 1) nested lists of global ids for the next step."""
        pad_row = [[tokens.layershift(tokens.PAD_A, i)] for i in range(tokens.N_AUDIO_LAYERS)]
        if audio is None:
            row0 = [*pad_row, [text]]
        else:
            row0 = [[tokens.layershift(a, i)] for i, a in enumerate(audio)] + [[text]]
        if not self.batch_parallel:
            return [row0]
        return [row0, [*pad_row, [text]]]

    def _record(
        self,
        step: int,
        audio: list[int] | None,
        text: int,
        trace: Callable[[dict[str, Any]], None] | None,
    ) -> DecodeStep:
        self.text_tokens.append(text)
        frame_index = frame = None
        if audio is not None:
            assert self.audio_tokens is not None
            for i, a in enumerate(audio):
                self.audio_tokens[i].append(a)
            if step >= tokens.N_AUDIO_LAYERS:
                frame_index = step - tokens.N_AUDIO_LAYERS
                frame = tuple(
                    self.audio_tokens[i][frame_index + i + 1] for i in range(tokens.N_AUDIO_LAYERS)
                )
        fed_audio = audio if audio is not None else [tokens.PAD_A] * tokens.N_AUDIO_LAYERS
        fed = tuple(tokens.layershift(a, i) for i, a in enumerate(fed_audio)) + (text,)
        if trace is not None:
            trace({"step": step, "audio": list(fed_audio), "text": text})
        return DecodeStep(
            step=step,
            text=text,
            audio=tuple(audio) if audio is not None else None,
            frame_index=frame_index,
            frame=frame,
            fed=fed,
        )


def _open_trace(
    target: TraceTarget | None,
) -> tuple[Callable[[dict[str, Any]], None] | None, Callable[[], None] | None]:
    if target is None:
        return None, None
    if callable(target) and not hasattr(target, "write"):
        return target, None
    if isinstance(target, str | Path):
        f = Path(target).open("w")  # noqa: SIM115 (closed when the stream ends)

        def write(rec: dict[str, Any]) -> None:
            f.write(json.dumps(rec) + "\n")

        return write, f.close
    stream = target

    def write_stream(rec: dict[str, Any]) -> None:
        stream.write(json.dumps(rec) + "\n")  # type: ignore[union-attr]

    return write_stream, None


def stream_generate(model: Any, task: Task | str, **kwargs: Any) -> GenerationStream:
    """Start a turn; iterate the result for :class:`DecodeStep` events (see GenerationStream)."""
    return GenerationStream(model, task, **kwargs)


def generate(model: Any, task: Task | str, **kwargs: Any) -> GenerationResult:
    """Run a whole turn (non-streaming); same arguments as :class:`GenerationStream`."""
    return GenerationStream(model, task, **kwargs).run()


# ------------------------------------------------------------------ context budget
RANDOM_MAX_NEW_TOKENS = 256
"""Decode steps per answer of ``random://`` weights when ``max_new_tokens`` is not set: random
weights rarely sample EOA/EOT, so they would otherwise decode every position of the context
(2048 minus the prompt; minutes on a CPU) for noise."""


class ContextBudgetError(ValueError):
    """A turn's prompt plus its generation budget does not fit the model's context."""


def prompt_positions(task: Task | str, *, n_frames: int | None = None,
                     n_text: int | None = None) -> int:
    """Positions the prompt of one turn takes: L Whisper frames or n text ids, plus the 3
    special positions around them (tokens.audio_input_prompt / text_input_prompt)."""
    task = Task(task)
    n = n_frames if task.audio_input else n_text
    if n is None:
        raise ValueError(f"task {task} needs {'n_frames' if task.audio_input else 'n_text'}")
    return int(n) + 3


def check_context_budget(block_size: int, prompt: int, max_new_tokens: int | None,
                         what: str = "the input") -> int:
    """The decode steps a turn gets, or :class:`ContextBudgetError` naming the numbers.

    The rule (Mini-Omni has no conversation history: each turn is one prompt): the prompt's
    positions plus the decode steps must fit ``block_size`` (2048 for the release). With
    ``max_new_tokens`` set, ``prompt + max_new_tokens <= block_size``; without it the answer
    may use every position left, ``block_size - prompt`` steps (one step is 85.3 ms of
    speech: Mini-Omni reads at most 30 s of speech, 1503 positions, which leaves 545 steps,
    46 s of answer). Nothing is trimmed: a turn that does not fit is refused."""
    if prompt >= block_size:
        raise ContextBudgetError(
            f"{what} takes {prompt} positions, the model's whole context (block_size "
            f"{block_size}) and more, leaving none for the answer: shorten it")
    if max_new_tokens is None:
        return block_size - prompt
    if prompt + max_new_tokens > block_size:
        raise ContextBudgetError(
            f"{what} takes {prompt} positions + max_new_tokens {max_new_tokens} = "
            f"{prompt + max_new_tokens}, more than the model's context (block_size "
            f"{block_size}). Lower max_new_tokens (lm options) to at most "
            f"{block_size - prompt}, or shorten the input")
    return max_new_tokens


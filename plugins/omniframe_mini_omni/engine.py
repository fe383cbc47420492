"""Mini-Omni on the generic engine (:mod:`omniframe.engine`): many turns decode together.

:class:`MiniOmniEngineModel` is the model-specific part: per-request state, the prefill, and
one batched decode step over the rows of every running request (2 rows for batch-parallel
A1A2, 1 otherwise). The scheduling (slots, queue, cancellation) is the generic engine's.

**Token-exact against a solo run** (the LM stage's fast path: GenerationStream over FastLM).
How each piece keeps a request's numbers those of its solo run:

* **KV cache: one set of caches per request** (per layer (B_r, G, max_returned_tokens, hs), the
  shapes GenerationStream allocates), not a shared slot tensor: a request's attention reads
  exactly the keys/values, strides and lengths it reads alone, and positions differ between
  requests without padding or masks. Attention of a decode step runs per request (a small
  part of a step: the weights dominate); the linear layers, norms, embedding and heads run
  once over the rows of all requests.
* **Prefill: whole prompt, one request at a time, the solo code path** (FastLM's shared-prefix
  prefill into the request's caches), so its bits are the solo run's. Chunked prefill would
  change the float rounding of the prompt's keys (different matmul shapes). The engine's
  prefill budget (positions per step) bounds what new prompts cost running streams per step.
* **Linear layers: ``exact`` or ``shared``.** A CPU GEMM's rounding of one row depends on how
  many rows the call has (PyTorch/MKL pick other blockings for 1, 2 or 6 rows), so one call
  over all rows is *not* bit-identical to the solo run's. ``exact=True`` (default in float32)
  calls each linear once per request with that request's rows: bit-exact by construction,
  each request reads the weights itself (what is shared: one step loop, embedding, norms,
  sampling overheads, and the SNAC batch). ``exact=False`` (default in bfloat16) makes one
  call over all rows: one weight pass per step (the small-batch kernel takes up to
  kernels.MAX_ROWS rows per call; more rows go in chunks); tokens then match the solo run as
  far as float rounding allows (greedy: almost always).
* **Sampling: per request**, its own SamplingOptions and torch.Generator (seeded as the solo
  run), audio heads before text, the same calls as GenerationStream._sample, so seeded
  sampling draws the same numbers. The text head is skipped after EOT only for greedy
  decoding, as the stage's FastLM does (a multinomial draw must still consume its random
  numbers).

**GPU: the static step** (:mod:`.static_engine`, what the LM stage uses on CUDA): a KV slot
pool instead of per-request caches, one masked attention over all rows instead of the
per-request loop here, sampling on the device, and the step replayed as a CUDA graph per
(rows, length) bucket; it reuses this class's per-turn bookkeeping. SNAC decoding
of all sessions' pending frames runs in one batch (:mod:`.snac_batch`). **CPU: this class**,
where the small-batch bf16 kernel (csrc/small_linear.cpp: AVX512-BF16, AVX-512F or AVX2
paths) takes up to kernels.MAX_ROWS = 8 rows per weight pass (4 A1A2 sessions); more rows go
in chunks of 8. Within a path a row's kernel output does not depend on the rows sharing the
pass (tested bitwise in test_kernels.py).

Requests are :class:`TurnRequest`; the engine emits :class:`~omniframe_mini_omni.generate.
DecodeStep` items and finishes with the stop reason as ``info``.

The model's blocks are used as modules; the decode step's attention with per-request caches
is written here (the model file keeps one cache per block for the solo path). The prefill
installs the request's caches in the blocks for its duration: the engine's driver holds the
model's lock (its ``gate``) around every step, so a solo (lock path) turn, which holds it for
its whole turn, never interleaves with one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from omniframe.engine import StepResult, Work

from . import kernels, tokens
from .fastpath import FastLM, onednn_off
from .generate import DecodeStep, GenerationStream, SamplingOptions, _open_trace
from .model import KVCache, _linear, _one_query_attention, apply_rope, decode_kernels
from .tokens import Task

NATIVE_MAX_ROWS = 2
"""bf16 on a CPU without the small-batch kernel: steps of up to this many rows run PyTorch's
native bf16 kernels (oneDNN off, as the solo path's FastLM does), larger ones oneDNN's GEMM,
which reads each weight once for all rows: on the 2-core dev Xeon, three linears of a block
took 5.8 ms native vs 4.0 ms oneDNN for 8 rows, 9.6 vs 5.3 for 12 (native grows per row)."""


@contextmanager
def _installed(model: Any, caches: Sequence[Any]) -> Iterator[None]:
    """The request's caches in the model's blocks for a prefill (the model file keeps one
    cache per block for the solo path); the blocks' own caches are put back after."""
    blocks = model.transformer.h
    saved = [b.attn.kv_cache for b in blocks]
    try:
        for b, cache in zip(blocks, caches, strict=True):
            b.attn.kv_cache = cache
        yield
    finally:
        for b, cache in zip(blocks, saved, strict=True):
            b.attn.kv_cache = cache


@dataclass
class TurnRequest:
    """One turn to decode (the arguments of GenerationStream the engine supports)."""

    task: Task | str
    whisper_features: Tensor | None = None
    text_ids: Sequence[int] | None = None
    batch_parallel: bool | None = None
    sampling: SamplingOptions = SamplingOptions()
    seed: int | None = None
    max_steps: int | None = None
    max_returned_tokens: int | None = None
    trace: Callable[[dict[str, Any]], None] | None = None

    @property
    def rows(self) -> int:
        task = Task(self.task)
        bp = self.batch_parallel if self.batch_parallel is not None else task is Task.A1A2
        return 2 if bp and task.audio_output else 1

    def prompt_length(self) -> int:
        task = Task(self.task)
        if task.audio_input:
            feats = self.whisper_features
            n = 0 if feats is None else int(feats.shape[-2])
        else:
            n = len(self.text_ids or ())
        return n + 3


@dataclass(eq=False)
class _Turn:
    stream: GenerationStream  # prompt, validation, sampling and recording (never iterated)
    caches: list[KVCache]
    trace: Callable[[dict[str, Any]], None] | None
    close_trace: Callable[[], None] | None
    rows: int
    speaks: bool
    greedy: bool
    audio: list[int] | None = None
    text: int = 0
    step: int = 0
    pos: int = 0
    iterations_left: int = 0
    text_end: bool = False  # GenerationStream's: text forced to pad after EOT (speech tasks)
    text_done: bool = False  # the stage's FastLM.text_ended(): EOT recorded (greedy: no head)
    slot: int = -1  # the request's rows in a static KV pool (static_engine), else -1
    last_prompt: list[list[int]] | None = None  # static_engine: the prompt's last position
    # still to run (in the next batched step), per row its 8 ids
    pending: list[DecodeStep] = field(default_factory=list)


class MiniOmniEngineModel:
    """The Mini-Omni part of an :class:`omniframe.engine.Engine` (see the module docstring).

    Args:
        model: the GPT (fp32 or bf16, any device).
        exact: one linear call per request (bit-exact to solo runs) or one over all rows;
            default: exact in float32.
        step_kernels: the small-batch bf16 kernel where the CPU has it (as FastLM).
    """

    def __init__(self, model: Any, *, exact: bool | None = None,
                 step_kernels: bool = True) -> None:
        self.model = model
        self.exact = model.dtype == torch.float32 if exact is None else exact
        bf16_cpu = model.dtype == torch.bfloat16 and torch.device(model.device).type == "cpu"
        ext = kernels.load() if step_kernels and bf16_cpu else None
        self._ext = ext
        self.native_bf16_steps = bf16_cpu and ext is None
        self._pad: Tensor | None = None
        self._groups: list[tuple[int, int]] | None = None  # row ranges of the current linear
        self.last_rows = 0  # rows of the last decode step (for tests / metrics)

    # ------------------------------------------------------------------ EngineModel
    def prefill_cost(self, payload: TurnRequest) -> int:
        return payload.prompt_length() + payload.rows - 1  # FastLM's shared-prefix prefill

    prefill_joins_step = False
    """True: a prefill leaves the prompt's last position to the same engine step's batched
    decode, which then produces the new turn's first tokens (static_engine)."""

    def step(self, prefill: Sequence[Work], decode: Sequence[Work]) -> dict[int, StepResult]:
        out: dict[int, StepResult] = {}
        joined: list[Work] = []
        with torch.inference_mode():
            for work in prefill:
                try:
                    self._prefill(work)
                except Exception as exc:  # noqa: BLE001 (this request's error, e.g. too long)
                    out[work.id] = StepResult(error=exc)
                    continue
                if self.prefill_joins_step:
                    joined.append(work)
                else:
                    out[work.id] = self._emit(work.state)
            running = [w for w in (*decode, *joined) if w.state is not None]
            if running:
                self._decode([w.state for w in running])
                for w in running:
                    out[w.id] = self._emit(w.state)
        return out

    def release(self, work: Work) -> None:
        turn: _Turn | None = work.state
        work.state = None
        if turn is not None:
            turn.caches.clear()
            if turn.close_trace is not None:
                turn.close_trace()

    # ------------------------------------------------------------------ prefill
    def _prefill(self, work: Work) -> None:
        turn = self._new_turn(work)
        model, stream, B = self.model, turn.stream, turn.rows
        fast = FastLM(model, skip_text_head=False)
        audio_rows = [0] if turn.speaks else []
        text_rows = [1 if stream.batch_parallel else 0]
        ids = torch.tensor(stream.prompt, dtype=torch.long, device=model.device)
        feats = stream.features.to(model.device) if stream.features is not None else None
        with _installed(model, turn.caches):
            audio_logits, text_logits = fast(
                ids, 0, whisper_features=feats,
                whisper_lens=[stream.whisper_len] * B if feats is not None else None,
                audio_rows=[True] * B if feats is not None else None,
                last_only=True, audio_head_rows=audio_rows, text_head_rows=text_rows)
        audio, text = stream._sample(audio_logits, text_logits, audio_rows, text_rows)
        self._record(turn, audio, text)

    def _new_turn(self, work: Work) -> _Turn:
        """The request's stream (prompt, validation, sampling state), caches and bookkeeping;
        sets ``work.state``."""
        r: TurnRequest = work.payload
        greedy = r.sampling.top_k == 1 or r.sampling.temperature == 0.0
        task = Task(r.task)
        stream = GenerationStream(
            self.model, task, whisper_features=r.whisper_features, text_ids=r.text_ids,
            batch_parallel=r.batch_parallel, sampling=r.sampling, seed=r.seed,
            max_returned_tokens=self._max_returned(r), max_steps=r.max_steps, trace=r.trace)
        stream._it.close()  # never iterated: the engine runs its steps
        B, T = len(stream.prompt), stream.prompt_length
        caches = self._caches(work, B, stream.max_returned_tokens)
        trace, close_trace = _open_trace(stream._trace_target)
        turn = _Turn(stream=stream, caches=caches, trace=trace, close_trace=close_trace,
                     rows=B, speaks=task.audio_output, greedy=greedy, pos=T,
                     iterations_left=stream.max_returned_tokens - T - 1,
                     slot=self._slot_of(work))
        work.state = turn
        return turn

    def _caches(self, work: Work, rows: int, length: int) -> list[Any]:
        """The request's KV caches, one per layer (here: its own tensors)."""
        model = self.model
        c = model.config
        return [KVCache(rows, c.n_query_groups, length, c.head_size, device=model.device,
                        dtype=model.dtype) for _ in model.transformer.h]

    def _max_returned(self, r: TurnRequest) -> int | None:
        return r.max_returned_tokens

    def _slot_of(self, work: Work) -> int:
        return -1

    # ------------------------------------------------------------------ decode
    def _decode(self, turns: list[_Turn]) -> None:
        """One decode step of every turn: rows concatenated in the order of ``turns``."""
        model = self.model
        device = model.device
        ids = torch.cat([torch.tensor(t.stream._next_input(t.audio, t.text), dtype=torch.long,
                                      device=device) for t in turns])  # (R, 8, 1)
        starts: list[int] = []
        n = 0
        for t in turns:
            starts.append(n)
            n += t.rows
        self.last_rows = n
        row_groups = [(s, s + t.rows) for s, t in zip(starts, turns, strict=True)]
        audio_idx = [s for s, t in zip(starts, turns, strict=True) if t.speaks]
        text_turns = [t for t in turns if not (t.text_done and t.greedy and t.speaks)]
        text_idx = [s + (1 if t.stream.batch_parallel else 0)
                    for s, t in zip(starts, turns, strict=True) if t in text_turns]
        with ExitStack() as stack:
            stack.enter_context(decode_kernels(self._linear))
            if self.native_bf16_steps and n <= NATIVE_MAX_ROWS:
                stack.enter_context(onednn_off())
            x = model.embed(ids)  # (R, 1, C)
            cos_all, sin_all = model._rope_tables(device)
            pos = torch.tensor([t.pos for t in turns for _ in range(t.rows)], device=device)
            cos = cos_all[pos][:, None, None, :]  # (R, 1, 1, hs): one angle per row
            sin = sin_all[pos][:, None, None, :]
            self._groups = row_groups
            for layer, block in enumerate(model.transformer.h):
                h = block.norm_1(x)
                x = x + self._attention(block.attn, h, cos, sin, turns, row_groups, layer)
                x = x + block.mlp(block.norm_2(x))
            hidden = model.transformer.ln_f(x)
            self._groups = [(i, i + 1) for i in range(len(audio_idx))]
            audio_logits = model.audio_logits(hidden[audio_idx]) if audio_idx else None
            self._groups = [(i, i + 1) for i in range(len(text_idx))]
            text_logits = model.text_logits(hidden[text_idx]) if text_idx else None
            self._groups = None
        a = ti = 0
        for t in turns:
            al = None
            if t.speaks:
                assert audio_logits is not None
                al = audio_logits[a : a + 1]
                a += 1
            if t in text_turns:
                assert text_logits is not None
                tl = text_logits[ti : ti + 1]
                ti += 1
            else:
                tl = self._pad_logits(device)
            audio, text = t.stream._sample(al, tl, [0], [0])  # type: ignore[arg-type]
            self._after_step(t, audio, text)

    def _attention(self, attn: Any, x: Tensor, cos: Tensor, sin: Tensor, turns: list[_Turn],
                   row_groups: list[tuple[int, int]], layer: int) -> Tensor:
        """CausalSelfAttention.forward for one new position per row, each turn with its own
        position and cache (the same ops and per-turn shapes as a solo decode step)."""
        R = x.size(0)
        G, q_per_kv, hs = attn.n_query_groups, attn.q_per_kv, attn.head_size
        qkv = _linear(attn.attn, x)  # (R, 1, G * (q_per_kv + 2) * hs)
        qkv = qkv.view(R, 1, G, q_per_kv + 2, hs).permute(0, 2, 3, 1, 4)
        q = qkv[:, :, :q_per_kv].reshape(R, attn.n_head, 1, hs)
        k = qkv[:, :, q_per_kv]
        v = qkv[:, :, q_per_kv + 1]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        scale = 1.0 / math.sqrt(hs)
        ys = []
        for t, (a, b) in zip(turns, row_groups, strict=True):
            kk, vv = t.caches[layer].update(t.pos, k[a:b], v[a:b])
            ys.append(_one_query_attention(q[a:b], kk, vv, scale))
        y = torch.cat(ys) if len(ys) > 1 else ys[0]
        y = y.transpose(1, 2).reshape(R, 1, attn.n_head * hs)
        return _linear(attn.proj, y)

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The decode step's linear: per request (exact) or over all rows (shared)."""
        groups = self._groups
        if self.exact and groups is not None and len(groups) > 1:
            return torch.cat([self._base(x[a:b], weight, bias) for a, b in groups])
        rows = x.size(0)
        if self._ext is not None and rows > kernels.MAX_ROWS:
            m = kernels.MAX_ROWS
            return torch.cat([self._base(x[i : i + m], weight, bias) for i in range(0, rows, m)])
        return self._base(x, weight, bias)

    def _base(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return kernels.small_linear(self._ext, x, weight, bias)

    def _pad_logits(self, device: torch.device) -> Tensor:
        if self._pad is None or self._pad.device != device:
            pad = torch.zeros(1, 1, tokens.TEXT_VOCAB_SIZE, device=device)
            pad[..., tokens.PAD_T] = 1.0
            self._pad = pad
        return self._pad

    # ------------------------------------------------------------------ per-turn bookkeeping
    def _after_step(self, t: _Turn, audio: list[int] | None, text: int) -> None:
        """GenerationStream._loop's checks after a decode step (mirrored line by line)."""
        t.iterations_left -= 1
        if t.speaks:
            if t.text_end:
                text = tokens.PAD_T
            assert audio is not None
            if audio[-1] == tokens.EOA:
                t.stream.stop_reason = "eoa"
                return
            if text == tokens.EOT:
                t.text_end = True
        elif text == tokens.EOT:
            t.stream.stop_reason = "eot"
            return
        t.step += 1
        t.pos += 1
        self._record(t, audio, text)

    def _record(self, t: _Turn, audio: list[int] | None, text: int) -> None:
        step = t.stream._record(t.step, audio, text, t.trace)
        t.audio, t.text = audio, text
        if text == tokens.EOT:
            t.text_done = True
        t.pending.append(step)
        # will the solo loop run another iteration? (its checks before computing a step)
        if t.iterations_left <= 0:
            t.stream.stop_reason = "max_length"
        elif t.stream.max_steps is not None and t.step + 1 >= t.stream.max_steps:
            t.stream.stop_reason = "max_steps"

    @staticmethod
    def _emit(t: _Turn) -> StepResult:
        items, t.pending = t.pending, []
        done = t.stream.stop_reason is not None
        first_frame = any(s.frame_index == 0 for s in items)  # the consumer starts the codec
        return StepResult(items=items, done=done, info=t.stream.stop_reason if done else None,
                          hold=first_frame)

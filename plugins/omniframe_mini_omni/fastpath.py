"""Compute savings for the LM stage that keep greedy decoding's tokens, torch level.

:class:`FastLM` wraps a :class:`~omniframe_mini_omni.model.GPT` and is handed to
:class:`~omniframe_mini_omni.generate.GenerationStream` in its place (same call signature):

* **shared-prefix prefill** (batch-parallel decoding): the two prompt rows differ only in their
  last position (``answer_a`` vs ``pad_a``), so the first T-1 positions are computed once for
  row 0, their keys/values copied to row 1, and only the last position runs for both rows:
  T+1 positions of compute instead of 2T. Same values up to float rounding (a batch of one vs
  two rows may take different matmul blockings).
* **no text head after end of text** (speech tasks): once the text stream has produced EOT,
  the decode loop replaces every text sample by ``pad_t``, so the 152,000-column text head
  (136M multiply-adds per step, a quarter of a step's weights) is skipped and a constant
  logit row whose argmax is ``pad_t`` stands in. Exact for greedy decoding (``top_k`` 1 or
  temperature 0); the stage turns it off otherwise, because a multinomial draw on the stand-in
  would move the random stream.

* **decode-step kernels** (one new position, :func:`~omniframe_mini_omni.model.decode_kernels`):
  attention of the single query runs as two float32 matmuls instead of SDPA's flash kernel
  (~1 ms per layer on CPU for one query), and on x86-64 CPUs with AVX512-BF16, AVX-512F or
  AVX2 the bfloat16 linear layers and heads run :mod:`~omniframe_mini_omni.kernels`'
  small-batch kernel, which reads each weight once for both rows of a batch-parallel step
  (PyTorch reads it once per row).
* **bfloat16 prefills as float32 GEMMs** (CPU, when the kernel runs a path without
  AVX512-BF16: :func:`~omniframe_mini_omni.kernels.widening_linear`): oneDNN's bf16 GEMM has
  no native instructions there (~60 GFLOP/s on the 2-core Xeon); the widened values through
  a float32 GEMM, rounded once, run ~3.8x faster.
* **bfloat16 decode steps without oneDNN** (CPU, when that kernel is unavailable): for
  matrix-vector products PyTorch's native bf16 kernels beat oneDNN's (about 15-20 % more
  steps/s on the 2-core AMD EPYC dev machine; oneDNN stays on for the prefill, where it is ~8x
  faster). oneDNN is a process-wide switch: it is turned off only while a decode step runs
  (reference counted across threads), and ops of other threads in that window (SNAC, Whisper)
  run PyTorch's native kernels: valid results, somewhat slower.

Float rounding of the kernels differs from the reference path's, as between any two kernels.

The stage calls :meth:`FastLM.text_ended` when it sees EOT. Everything else (``config``,
``device``, ``set_kv_cache`` ...) is forwarded to the wrapped model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor

from . import kernels, tokens
from .model import decode_kernels

_onednn_lock = threading.Lock()
_onednn_users = 0
_onednn_saved = True


@contextmanager
def onednn_off() -> Iterator[None]:
    """Turn oneDNN off for the duration (process-wide, reference counted across threads)."""
    global _onednn_users, _onednn_saved
    with _onednn_lock:
        if _onednn_users == 0:
            _onednn_saved = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        _onednn_users += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn_users -= 1
            if _onednn_users == 0:
                torch.backends.mkldnn.enabled = _onednn_saved


class FastLM:
    """A GPT stand-in for GenerationStream with the savings above (one turn at a time).

    Args:
        model: the GPT.
        skip_text_head: allow :meth:`text_ended` to drop the text head (greedy decoding only).
        native_bf16_steps: run one-position bf16 steps on CPU without oneDNN when the
            small-batch kernel is not used (None: when the model is bfloat16 on CPU).
        step_kernels: use the decode-step kernels (one-query matmul attention; the small-batch
            bf16 linear kernel where it builds and this CPU runs one of its paths).
    """

    def __init__(self, model: Any, *, skip_text_head: bool = True,
                 native_bf16_steps: bool | None = None, step_kernels: bool = True) -> None:
        self.model = model
        self.skip_text_head = skip_text_head
        bf16_cpu = model.dtype == torch.bfloat16 and torch.device(model.device).type == "cpu"
        self.step_kernels = step_kernels
        ext = kernels.load() if step_kernels and bf16_cpu else None
        self.kernel = ext is not None  # the small-batch bf16 kernel runs the linear layers
        self._linear = partial(kernels.small_linear, ext)
        # prefills on a CPU without native bf16 GEMM: float32 GEMMs of the widened values
        self._prefill_linear = (partial(kernels.widening_linear, ext)
                                if ext is not None and ext.widen_prefill else None)
        if native_bf16_steps is None:
            native_bf16_steps = bf16_cpu and not self.kernel
        self.native_bf16_steps = native_bf16_steps
        self._text_done = False
        self._pad_logits: dict[tuple[int, int, torch.dtype], Tensor] = {}
        self.prefill_positions = 0  # positions computed by the last prefill (for tests)

    def __getattr__(self, name: str) -> Any:  # config, device, set_kv_cache, ...
        return getattr(self.model, name)

    def text_ended(self) -> None:
        """The text stream produced EOT: later steps need no text logits."""
        self._text_done = True

    def __call__(
        self,
        input_ids: Tensor,
        input_pos: int | Tensor | None = None,
        *,
        whisper_features: Tensor | None = None,
        whisper_lens: Sequence[int] | Tensor | None = None,
        audio_rows: Sequence[bool] | None = None,
        last_only: bool = False,
        audio_head_rows: Sequence[int] | None = None,
        text_head_rows: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        B, _, T = input_ids.shape
        start = int(input_pos.reshape(-1)[0]) if isinstance(input_pos, Tensor) else (input_pos or 0)
        if (B == 2 and T > 2 and start == 0 and last_only and self.model.has_kv_cache
                and self._same_rows(input_ids, whisper_features, whisper_lens, audio_rows)):
            return self._shared_prefill(input_ids, whisper_features, whisper_lens, audio_rows,
                                        audio_head_rows, text_head_rows)
        if not (T == 1 and start > 0):
            self.prefill_positions = B * T
            with self.prefill():
                return self._step(input_ids, input_pos, whisper_features, whisper_lens,
                                  audio_rows, last_only, audio_head_rows, text_head_rows)
        with self.decode_step():
            return self._step(input_ids, input_pos, whisper_features, whisper_lens,
                              audio_rows, last_only, audio_head_rows, text_head_rows)

    @contextmanager
    def prefill(self) -> Iterator[None]:
        """The context prefills run in (widened float32 GEMMs where that is faster)."""
        with ExitStack() as stack:
            if self.step_kernels and self._prefill_linear is not None:
                stack.enter_context(decode_kernels(self._prefill_linear))
            yield

    @contextmanager
    def decode_step(self) -> Iterator[None]:
        """The context one-position steps run in (kernels, oneDNN switch)."""
        with ExitStack() as stack:
            if self.step_kernels:
                stack.enter_context(decode_kernels(self._linear))
            if self.native_bf16_steps:
                stack.enter_context(onednn_off())
            yield

    def _step(self, input_ids: Tensor, input_pos: int | Tensor | None,
              whisper_features: Tensor | None, whisper_lens: Sequence[int] | Tensor | None,
              audio_rows: Sequence[bool] | None, last_only: bool,
              audio_head_rows: Sequence[int] | None,
              text_head_rows: Sequence[int] | None) -> tuple[Tensor, Tensor]:
        T = input_ids.size(-1)
        if self._text_done and self.skip_text_head and text_head_rows:
            audio, _ = self.model(input_ids, input_pos, whisper_features=whisper_features,
                                  whisper_lens=whisper_lens, audio_rows=audio_rows,
                                  last_only=last_only, audio_head_rows=audio_head_rows,
                                  text_head_rows=[])
            t_out = 1 if last_only else T
            return audio, self._pad_row(len(text_head_rows), t_out, audio.device)
        return self.model(input_ids, input_pos, whisper_features=whisper_features,
                          whisper_lens=whisper_lens, audio_rows=audio_rows, last_only=last_only,
                          audio_head_rows=audio_head_rows, text_head_rows=text_head_rows)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _same_rows(ids: Tensor, feats: Tensor | None, lens: Any, rows: Any) -> bool:
        if not torch.equal(ids[0, :, :-1], ids[1, :, :-1]):
            return False
        if feats is not None and feats.size(0) == 2 and not torch.equal(feats[0], feats[1]):
            return False
        if lens is not None and int(lens[0]) != int(lens[1]):
            return False
        return rows is None or bool(rows[0]) == bool(rows[1])

    def _shared_prefill(self, ids: Tensor, feats: Tensor | None, lens: Any, rows: Any,
                        audio_head_rows: Sequence[int] | None,
                        text_head_rows: Sequence[int] | None) -> tuple[Tensor, Tensor]:
        m = self.model
        T = ids.size(-1)
        with self.prefill():
            m(ids[:1, :, : T - 1], 0,
              whisper_features=feats[:1] if feats is not None else None,
              whisper_lens=[int(lens[0])] if lens is not None else None,
              audio_rows=[bool(rows[0])] if rows is not None else None,
              last_only=True, audio_head_rows=[], text_head_rows=[])
        for block in m.transformer.h:
            cache = block.attn.kv_cache
            cache.k[1, :, : T - 1] = cache.k[0, :, : T - 1]
            cache.v[1, :, : T - 1] = cache.v[0, :, : T - 1]
        self.prefill_positions = T - 1 + 2
        with self.decode_step():
            return m(ids[:, :, T - 1 :], T - 1, last_only=True, audio_head_rows=audio_head_rows,
                     text_head_rows=text_head_rows)

    def _pad_row(self, rows: int, t: int, device: torch.device) -> Tensor:
        key = (rows, t, torch.float32)
        out = self._pad_logits.get(key)
        if out is None:
            out = torch.zeros(rows, t, tokens.TEXT_VOCAB_SIZE, device=device)
            out[..., tokens.PAD_T] = 1.0
            self._pad_logits[key] = out
        return out

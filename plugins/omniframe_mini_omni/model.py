"""The Mini-Omni language model in one file (litgpt layout, nanoGPT-style reading order).

RMSNorm -> RoPE -> KVCache -> CausalSelfAttention -> SwiGLUMLP -> Block -> GPT.

The LM is Qwen2 in litgpt layout with one embedding table of 181,120 rows shared by 8 parallel
streams (7 SNAC layers + text), a SwiGLU Whisper adapter and a tied ``lm_head`` whose rows are
sliced into a 152,000-wide text head and 7 audio heads of 4,160. State-dict keys follow the
official checkpoint exactly (spec mini_omni.md §8.2).

Shapes: B batch, S = 8 streams, T positions, C = n_embd, nh = n_head, G = n_query_groups,
hs = head_size, V = padded vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import tokens
from .config import Config

# Decode-step kernels (fastpath.FastLM): while set, linear layers and heads call this function
# (x, weight, bias) -> y instead of F.linear, and attention of one new position runs as two
# float32 matmuls instead of SDPA. Unset (the default, and the faithful mode): reference math.
LinearFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
_decode_linear: ContextVar[LinearFn | None] = ContextVar("mini_omni_decode_linear", default=None)


@contextmanager
def decode_kernels(linear: LinearFn) -> Iterator[None]:
    """Use ``linear`` for the linear layers (and matmul attention) within this context."""
    token = _decode_linear.set(linear)
    try:
        yield
    finally:
        _decode_linear.reset(token)


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    fn = _decode_linear.get()
    return layer(x) if fn is None else fn(x, layer.weight, layer.bias)


def _head(x: Tensor, weight: Tensor) -> Tensor:
    fn = _decode_linear.get()
    return F.linear(x, weight) if fn is None else fn(x, weight, None)


def _one_query_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Attention of one new position: q (B, nh, 1, hs), k/v (B, G, S, hs) -> (B, nh, 1, hs).

    Grouped-query attention as two float32 matmuls: SDPA's flash kernel for one query costs
    ~1 ms per layer on CPU, this a few tens of microseconds. Same math, float32 throughout.
    """
    B, nh, _, hs = q.shape
    G = k.size(1)
    qg = q.reshape(B, G, nh // G, hs).float()  # query head h = g * q_per_kv + s
    att = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # (B, G, q_per_kv, S)
    y = torch.matmul(att.softmax(dim=-1), v.float())  # (B, G, q_per_kv, hs)
    return y.to(q.dtype).reshape(B, nh, 1, hs)


def _varlen_sdpa(q: Tensor) -> AbstractContextManager[None]:
    """SDPA backends for shapes that change every call (prompts, a growing cache): on CUDA
    every backend but cuDNN attention, which builds an execution plan per new sequence length
    (~50 ms each on an H100, measured by benchmarks/decode_attention.py: a bf16 faithful
    decode step took 75.7 ms with it, 20.6 ms without). Elsewhere PyTorch's choice."""
    if not q.is_cuda:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back; no unit offset (not Gemma)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def rope_cache(
    seq_len: int, n_elem: int, base: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (seq_len, n_elem) float32, for half-split ("rotate_half") RoPE.

    theta_j = base^(-2j/n_elem), j = 0..n_elem/2-1; the angle table is repeated twice on the
    last dim so that it lines up with ``cat(-x2, x1)``.
    """
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, device=device).float() / n_elem))
    positions = torch.arange(seq_len, device=device).float()
    angles = torch.outer(positions, theta).repeat(1, 2)  # (seq_len, n_elem)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, heads, T, hs) by the angles of cos/sin (T, hs); float32 math."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, stored per K/V group (not expanded to nh).

    Buffers are (B, G, max_seq_length, hs): the reference stores (B, nh, 2048, hs), i.e. 7x more
    for Mini-Omni; attention reads them with grouped-query SDPA, so numerics are the same.
    """

    def __init__(
        self,
        batch_size: int,
        n_query_groups: int,
        max_seq_length: int,
        head_size: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_query_groups, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.k.shape)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, G, T, hs) at positions start..start+T-1; return all keys/values so far.

        Returns:
            keys and values of positions 0..start+T-1, each (B, G, start+T, hs).
        """
        batch, _, t, _ = k.shape
        end = start + t
        if end > self.k.size(2):
            raise ValueError(
                f"KV cache holds {self.k.size(2)} positions, position {end - 1} requested; "
                "call set_kv_cache() with a larger max_seq_length"
            )
        if batch > self.k.size(0):
            raise ValueError(f"KV cache was set for batch {self.k.size(0)}, got batch {batch}")
        self.k[:batch, :, start:end] = k
        self.v[:batch, :, start:end] = v
        return self.k[:batch, :, :end], self.v[:batch, :, :end]


class CausalSelfAttention(nn.Module):
    """Grouped-query attention with a fused, per-group interleaved QKV projection.

    ``attn`` maps C to (nh + 2G) * hs. Viewed as (G, q_per_kv + 2, hs), each group holds its
    q_per_kv query heads, then its key head, then its value head (old litgpt layout). Query head
    h = g * q_per_kv + s therefore uses K/V group g.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attn = nn.Linear(config.n_embd, config.qkv_size, bias=config.add_qkv_bias)
        self.proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=False)
        self.n_head = config.n_head
        self.n_query_groups = config.n_query_groups
        self.q_per_kv = config.q_per_kv
        self.head_size = config.head_size
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        start: int,
        mask: Tensor | None,
        use_cache: bool = False,
    ) -> Tensor:
        """x (B, T, C) at positions start..start+T-1 -> (B, T, C).

        ``mask`` is a boolean (T, S) mask (True = attend), or None for plain causal attention
        over the T new positions (no cache) / over everything cached (one new position).
        """
        B, T, _ = x.shape
        G, q_per_kv, hs = self.n_query_groups, self.q_per_kv, self.head_size
        qkv = _linear(self.attn, x)  # (B, T, G * (q_per_kv + 2) * hs)
        qkv = qkv.view(B, T, G, q_per_kv + 2, hs).permute(0, 2, 3, 1, 4)  # (B, G, q+2, T, hs)
        q = qkv[:, :, :q_per_kv].reshape(B, self.n_head, T, hs)  # (B, nh, T, hs)
        k = qkv[:, :, q_per_kv]  # (B, G, T, hs)
        v = qkv[:, :, q_per_kv + 1]  # (B, G, T, hs)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if use_cache and self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)  # (B, G, S, hs), S = start + T
        if T == 1 and mask is None and _decode_linear.get() is not None:
            y = _one_query_attention(q, k, v, 1.0 / math.sqrt(hs))
        else:
            with _varlen_sdpa(q):
                y = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    is_causal=mask is None and T > 1 and k.size(2) == T,
                    scale=1.0 / math.sqrt(hs),
                    enable_gqa=self.n_head != G,
                )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hs)
        return _linear(self.proj, y)


class SwiGLUMLP(nn.Module):
    """proj(silu(fc_1(x)) * fc_2(x)): litgpt ``LLaMAMLP`` (fc_1 gate, fc_2 up, proj down), no bias.

    Used by the blocks (C -> intermediate -> C) and by the Whisper / vision adapters
    (768 or 512 -> intermediate -> C).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.fc_2 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.proj = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return _linear(self.proj, F.silu(_linear(self.fc_1, x)) * _linear(self.fc_2, x))


class Block(nn.Module):
    """Pre-norm sequential block: x += attn(norm_1(x)); x += mlp(norm_2(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLUMLP(config.n_embd, config.intermediate_size, config.n_embd)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        start: int,
        mask: Tensor | None,
        use_cache: bool = False,
    ) -> Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, start, mask, use_cache)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    """Mini-Omni LM: 8-stream embedding average, Qwen2 blocks, tied text + 7 audio heads."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        c = config
        self.whisper_adapter = SwiGLUMLP(c.whisper_adapter_dim, c.intermediate_size, c.n_embd)
        if c.vision_adapter_dim is not None:
            # Mini-Omni2 only: built so that its weights load; unused by the audio tasks.
            self.vision_adapter = SwiGLUMLP(c.vision_adapter_dim, c.intermediate_size, c.n_embd)
        # When tied, lm_head's own weight is never materialised (meta), then replaced by wte's.
        self.lm_head = nn.Linear(
            c.n_embd, c.padded_vocab_size, bias=False,
            device="meta" if c.tie_word_embeddings else None,
        )  # fmt: skip
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(c.padded_vocab_size, c.n_embd),
                "h": nn.ModuleList(Block(c) for _ in range(c.n_layer)),
                "ln_f": RMSNorm(c.n_embd, c.norm_eps),
            }
        )
        if c.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self._rope: dict[torch.device, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ setup
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random init (for presets / tests): N(0, std) weights, zero biases, unit norms."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    if module.weight.device.type != "meta":
                        module.weight.normal_(0.0, std, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):
                    module.weight.normal_(0.0, std, generator=generator)
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the very same Parameter as ``transformer.wte.weight``."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Allocate (or reuse, when the shape matches) a KV cache in every block."""
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(
                f"max_seq_length={max_seq_length} exceeds block_size={self.config.block_size}"
            )
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        shape = (batch_size, self.config.n_query_groups, max_seq_length, self.config.head_size)
        for block in self.transformer.h:
            cache = block.attn.kv_cache
            if (
                cache is not None
                and cache.shape == shape
                and cache.k.device == device
                and cache.k.dtype == dtype
                # a cache made under inference_mode cannot be updated outside it (and back)
                and cache.k.is_inference() == torch.is_inference_mode_enabled()
            ):
                continue
            block.attn.kv_cache = KVCache(
                batch_size, shape[1], max_seq_length, shape[3], device=device, dtype=dtype
            )

    def clear_kv_cache(self) -> None:
        """Free the KV caches."""
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @property
    def has_kv_cache(self) -> bool:
        return self.transformer.h[0].attn.kv_cache is not None if self.config.n_layer else False

    def _rope_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Kept out of the buffers so that model.to(bfloat16) never rounds the angles.
        if device not in self._rope:
            self._rope[device] = rope_cache(
                self.config.block_size, self.config.head_size, self.config.rope_base, device
            )
        return self._rope[device]

    # ------------------------------------------------------------------ forward pieces
    def embed(
        self,
        input_ids: Tensor,
        whisper_features: Tensor | None = None,
        whisper_lens: Sequence[int] | Tensor | None = None,
        audio_rows: Sequence[bool] | None = None,
    ) -> Tensor:
        """Average of the 8 stream embeddings, with Whisper features at the speech positions.

        Args:
            input_ids: (B, 8, T) global ids; streams 0..6 audio, stream 7 text.
            whisper_features: (B, L, whisper_adapter_dim) encoder features, or None.
            whisper_lens: per row, how many feature frames to use (default L for every row).
            audio_rows: per row, whether the row's task has speech input (default all True).
                Rows without speech input (T1A2/T1T2) keep their token embeddings.

        Returns:
            (B, T, C): (sum over the 8 streams) / 8, where positions 1..len of audio streams
            0..6 of speech rows are replaced by ``whisper_adapter(features)``.
        """
        if input_ids.dim() != 3 or input_ids.size(1) != tokens.N_STREAMS:
            raise ValueError(
                f"input_ids must be (B, {tokens.N_STREAMS}, T), got {tuple(input_ids.shape)}"
            )
        B, _, T = input_ids.shape
        emb = self.transformer.wte(input_ids)  # (B, 8, T, C)
        if whisper_features is not None:
            if whisper_features.dim() == 2:
                whisper_features = whisper_features.unsqueeze(0)
            if whisper_features.size(0) not in (1, B):
                raise ValueError(
                    f"whisper_features batch {whisper_features.size(0)} does not match batch {B}"
                )
            feats = self.whisper_adapter(whisper_features.to(emb.dtype))  # (B or 1, L, C)
            L = feats.size(1)
            lens = [L] * B if whisper_lens is None else [int(n) for n in whisper_lens]
            rows = [True] * B if audio_rows is None else list(audio_rows)
            if len(lens) != B or len(rows) != B:
                raise ValueError(f"whisper_lens and audio_rows need one entry per row ({B})")
            for j in range(B):
                n = lens[j]
                if not rows[j] or n == 0:
                    continue
                if n > L or n + 1 > T:
                    raise ValueError(
                        f"row {j}: whisper_lens={n} needs {n} feature frames (have {L}) and "
                        f"positions 1..{n} (prompt has {T})"
                    )
                f = feats[j if feats.size(0) == B else 0, :n]  # (n, C)
                emb[j, : tokens.N_AUDIO_LAYERS, 1 : 1 + n] = f  # broadcast over the 7 streams
        x = emb[:, 0]
        for s in range(1, tokens.N_STREAMS):  # same summation order as the reference
            x = x + emb[:, s]
        return x / tokens.N_STREAMS

    def forward_embeddings(
        self, x: Tensor, input_pos: int | Tensor | None = None, *, last_only: bool = False
    ) -> Tensor:
        """Run the blocks and ``ln_f`` on input embeddings x (B, T, C) -> hidden (B, T', C).

        ``input_pos`` is the first absolute position of x (an int, or a 1-D tensor of T
        contiguous positions, litgpt style). Given an ``input_pos`` and a KV cache
        (:meth:`set_kv_cache`), keys/values are written to and read from the cache; with
        ``input_pos=None`` the cache is not touched (a plain causal pass from position 0, as
        in training). ``last_only`` keeps only the last position (T' = 1).
        """
        B, T, _ = x.shape
        use_cache = input_pos is not None and self.has_kv_cache
        if input_pos is None:
            start = 0
        elif isinstance(input_pos, Tensor):
            if input_pos.numel() != T:
                raise ValueError(f"input_pos has {input_pos.numel()} positions for T={T}")
            start = int(input_pos.reshape(-1)[0])
        else:
            start = int(input_pos)
        end = start + T
        if start < 0 or end > self.config.block_size:
            raise ValueError(
                f"positions {start}..{end - 1} exceed block_size={self.config.block_size} "
                "(prompt + generated tokens must stay below it)"
            )
        cos, sin = self._rope_tables(x.device)
        cos, sin = cos[start:end], sin[start:end]  # (T, hs)
        mask = None
        if use_cache and T > 1 and start > 0:
            q_pos = torch.arange(start, end, device=x.device)
            mask = q_pos[:, None] >= torch.arange(end, device=x.device)[None, :]  # (T, end)
        for block in self.transformer.h:
            x = block(x, cos, sin, start, mask, use_cache)
        if last_only:
            x = x[:, -1:]
        return self.transformer.ln_f(x)

    def text_logits(self, hidden: Tensor) -> Tensor:
        """Text head: hidden (..., C) -> (..., 152000) (columns 0..151999 of lm_head)."""
        return _head(hidden, self.lm_head.weight[: tokens.TEXT_VOCAB_SIZE])

    def audio_logits(self, hidden: Tensor) -> Tensor:
        """7 audio heads in one matmul: hidden (..., C) -> (..., 7, 4160) local-id logits."""
        lo = tokens.TEXT_VOCAB_SIZE
        hi = lo + tokens.N_AUDIO_LAYERS * tokens.AUDIO_VOCAB_SIZE
        logits = _head(hidden, self.lm_head.weight[lo:hi])
        return logits.unflatten(-1, (tokens.N_AUDIO_LAYERS, tokens.AUDIO_VOCAB_SIZE))

    def forward(
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
        """Logits of the audio and text heads.

        Args:
            input_ids: (B, 8, T) global ids (int64 or int32).
            input_pos: first position (int or litgpt-style 1-D tensor); see forward_embeddings.
            whisper_features, whisper_lens, audio_rows: see :meth:`embed`; prefill only.
            last_only: compute ``ln_f`` and heads at the last position only (T' = 1). The
                reference computes all 181,120 logits at every position.
            audio_head_rows / text_head_rows: batch rows for which to compute each head
                (default all). Batch parallel decoding needs audio of row 0 and text of row 1.

        Returns:
            (audio_logits (Ba, T', 7, 4160), text_logits (Bt, T', 152000)); Ba / Bt are the
            numbers of selected rows (an empty selection skips that matmul).
        """
        x = self.embed(input_ids, whisper_features, whisper_lens, audio_rows)  # (B, T, C)
        h = self.forward_embeddings(x, input_pos, last_only=last_only)  # (B, T', C)
        audio = self.audio_logits(_rows(h, audio_head_rows))
        text = self.text_logits(_rows(h, text_head_rows))
        return audio, text


def _rows(h: Tensor, rows: Sequence[int] | None) -> Tensor:
    if rows is None:
        return h
    return h[list(rows)]


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())

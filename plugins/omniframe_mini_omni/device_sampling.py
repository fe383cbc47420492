"""Sampling on the device, one batched call for rows with different settings and seeds.

:func:`generate.sample` draws with ``torch.multinomial`` and one ``torch.Generator`` per turn:
exact to the reference, but one call (and one generator) per turn, so it cannot run inside a
batched, graph-captured decode step. Here every row of a batch has its own settings
(temperature, top-k, top-p) and seed as *tensors*, and the randomness is **counter based**:
the Gumbel noise of vocabulary entry ``i`` of head ``h`` of a row at position ``pos`` is a hash
of (seed, pos, h, i). So

* the draw is ``argmax(filtered_logits / temperature + gumbel)``, a sample of
  ``softmax(filtered_logits / temperature)`` (the Gumbel-max trick), with no host
  synchronisation, no generator state and static shapes: graph-capturable;
* a row's draw depends only on its own logits, settings, seed and position, never on the other
  rows of the batch or on how many steps ran before: a seeded turn draws the same tokens alone
  or among 63 others, and a turn resumed anywhere draws what it would have.

The filtering is :func:`generate.sample`'s: keep the top-k logits (``top_k`` 0 = all), divide
by the temperature, keep the nucleus (the most likely tokens whose preceding mass is below
``top_p``), draw. Greedy rows (``top_k`` 1 or ``temperature`` 0) take the argmax, as there.
Ties at the top-k threshold keep every tied logit (``torch.topk`` keeps exactly k).

Not bit-identical to :func:`generate.sample`'s draws for the same seed (another random
stream): seeded turns are reproducible within this sampler, not across the two.
"""

from __future__ import annotations

import torch
from torch import Tensor

M32 = 0xFFFFFFFF
# odd multipliers below 2**31: a 32-bit value times one stays below 2**63 (no int64 overflow)
_MUL_A = 0x7FEB352D
_MUL_B = 0x2C1B3C6D


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & M32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & M32
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & M32
    return x ^ (x >> 15)


def counter_uniform_heads(seed: Tensor, pos: Tensor, heads: Tensor, n: int) -> Tensor:
    """Uniform noise in (0, 1): (R, H, n) float32 for rows with ``seed`` and ``pos`` (R,)
    int64 and ``heads`` (H,) int64. Entry (r, h, i) is a function of (seed[r], pos[r],
    heads[h], i) only."""
    key = mix32(mix32(seed & M32) ^ (pos & M32))  # (R,)
    key = mix32(key[:, None] ^ ((heads * 0x9E3779B1) & M32)[None, :])  # (R, H)
    idx = torch.arange(n, device=seed.device, dtype=torch.int64)
    h = mix32(key[:, :, None] ^ idx[None, None, :])  # (R, H, n)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel_heads(seed: Tensor, pos: Tensor, heads: Tensor, n: int) -> Tensor:
    """Gumbel noise (R, H, n) float32 from :func:`counter_uniform_heads`."""
    return -torch.log(-torch.log(counter_uniform_heads(seed, pos, heads, n)))


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Tempered logits (R, V) float32 with the top-k / nucleus complement at -inf.

    ``temperature`` (R,) float (> 0), ``top_k`` (R,) int64 (0 = no limit), ``top_p`` (R,)
    float in (0, 1]. One sort per call; static shapes.
    """
    V = logits.size(-1)
    x = logits.float() / temperature[:, None]
    desc = torch.sort(x, dim=-1, descending=True).values  # (R, V)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))  # (R,)
    ranks = torch.arange(V, device=x.device)[None, :]
    in_k = ranks < k[:, None]
    probs = torch.softmax(desc.masked_fill(~in_k, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    keep_sorted = in_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))  # 1: no nucleus
    keep_sorted[:, 0] = True  # the most likely token always stays
    n_keep = keep_sorted.sum(dim=-1, keepdim=True)  # a prefix of the sorted order (<= k)
    thresh = desc.gather(1, n_keep - 1)  # (R, 1): the least likely kept value
    return x.masked_fill(x < thresh, float("-inf"))


def sample_rows(logits: Tensor, *, greedy: Tensor, temperature: Tensor, top_k: Tensor,
                top_p: Tensor, seed: Tensor, pos: Tensor, head: int,
                any_sampled: bool = True, gumbel: Tensor | None = None) -> Tensor:
    """One id per row of ``logits`` (R, V) -> (R,) int64, each row with its own settings.

    Args:
        greedy: (R,) bool: argmax rows (``top_k`` 1 or ``temperature`` 0).
        temperature, top_k, top_p: (R,) per-row settings (ignored on greedy rows).
        seed, pos: (R,) int64: the counter of the row's noise.
        head: which head of the step (noise of different heads is independent).
        any_sampled: False when every row is greedy: skips the sort and the noise (a static
            choice: a graph captured with False serves greedy batches only).
        gumbel: this head's noise (R, V) if already made (:func:`gumbel_heads`), else made here.
    """
    if not any_sampled:
        return torch.argmax(logits, dim=-1)
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    filtered = filter_logits(logits, safe_t, top_k, top_p)
    if gumbel is None:
        heads = torch.tensor([head], dtype=torch.int64, device=seed.device)
        gumbel = gumbel_heads(seed, pos, heads, logits.size(-1))[:, 0]
    drawn = torch.argmax(filtered + gumbel, dim=-1)
    return torch.where(greedy, torch.argmax(logits, dim=-1), drawn)

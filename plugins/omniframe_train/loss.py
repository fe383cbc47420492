"""Collation, the training forward (embedding + blocks) and the per-stream loss.

Loss (spec training.md §1.5): one cross-entropy per stream, each over its own slice of the tied
``lm_head`` (text: columns 0..151999; audio layer i: 152000 + 4160 i .. + 4160), computed only at
positions that carry a label (the prompt never reaches the 181,120-wide head). Streams are
combined as ``sum_s w_s * mean_s / sum_{s active} w_s``: with unit weights that is SLAM's
``(text + sum audio) / 8`` for speech-out batches and the text CE alone for text-out batches.

The per-stream means are taken over the *global* batch (all micro-batches of the optimizer step
on all ranks): :func:`combine` divides the per-rank sums by global counts, so N processes give
the same update as one process on the same global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omniframe_mini_omni import tokens as T
from torch import Tensor, nn

from .targets import IGNORE, Sample

STREAM_NAMES = tuple([f"a{i}" for i in range(T.N_AUDIO_LAYERS)] + ["text"])


def collate(samples: Sequence[Sample], feature_dim: int) -> dict[str, object]:
    """Right-pad whole sequences (spec §1.6: the litgpt forward has no padding mask).

    Returns a dict with ``input_ids`` (B, 8, T) int64 (pads: ``pad_a`` per layer, ``pad_t``),
    ``labels`` (B, 8, T) int64 (-100 on padding), ``features`` (B, L, D) float32 (zeros where
    absent; L >= 1 so that the adapter always runs), ``whisper_lens`` (B,) int64 and ``tasks``.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    b = len(samples)
    t = max(len(s) for s in samples)
    pad_row = [T.layershift(T.PAD_A, i) for i in range(T.N_AUDIO_LAYERS)] + [T.PAD_T]
    ids = np.empty((b, T.N_STREAMS, t), dtype=np.int64)
    ids[:] = np.asarray(pad_row, dtype=np.int64)[None, :, None]
    labels = np.full((b, T.N_STREAMS, t), IGNORE, dtype=np.int64)
    lens = np.zeros(b, dtype=np.int64)
    max_l = max([s.whisper_len for s in samples] + [1])
    feats = np.zeros((b, max_l, feature_dim), dtype=np.float32)
    for j, s in enumerate(samples):
        n = len(s)
        ids[j, :, :n] = np.asarray(s.input_ids, dtype=np.int64)
        labels[j, :, :n] = np.asarray(s.labels, dtype=np.int64)
        if s.whisper_len:
            f = np.asarray(s.features, dtype=np.float32)
            if f.ndim != 2 or f.shape[1] != feature_dim:
                raise ValueError(f"sample {s.key!r}: features of shape {f.shape}, expected "
                                 f"(L, {feature_dim}) (whisper_adapter_dim)")
            feats[j, : s.whisper_len] = f[: s.whisper_len]
            lens[j] = s.whisper_len
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "features": torch.from_numpy(feats),
        "whisper_lens": torch.from_numpy(lens),
        "tasks": [s.task for s in samples],
    }


def label_counts(labels: Tensor) -> Tensor:
    """Supervised (shifted) positions per stream: (8,) int64. Labels at position 0 never count."""
    return (labels[:, :, 1:] != IGNORE).sum(dim=(0, 2))


def embed(gpt: nn.Module, input_ids: Tensor, features: Tensor, whisper_lens: Tensor) -> Tensor:
    """The reference input embedding (mean of 8 streams, Whisper features at audio positions
    1..L) computed without in-place writes, with the adapter *always* run.

    Running the adapter on every batch, even when no row has speech input, and adding
    ``0 * output`` keeps the set of used parameters identical on every rank (spec training.md
    §4.5 trap 1: DDP's "Expected to have finished reduction", FSDP2 collective mismatches).
    """
    c = gpt.config
    emb = gpt.transformer.wte(input_ids)  # (B, 8, T, C)
    b, _, t, _ = emb.shape
    feats = gpt.whisper_adapter(features.to(emb.dtype))  # (B, L, C)
    n = min(feats.size(1), t - 1)
    placed = emb.new_zeros(b, t, c.n_embd)
    placed[:, 1 : 1 + n] = feats[:, :n]
    pos = torch.arange(t, device=input_ids.device)
    at = (pos[None, :] >= 1) & (pos[None, :] <= whisper_lens.to(pos.device)[:, None])  # (B, T)
    at = at[..., None]
    x = torch.where(at, placed, emb[:, 0])
    for s in range(1, T.N_STREAMS):
        x = x + (torch.where(at, placed, emb[:, s]) if s < T.N_AUDIO_LAYERS else emb[:, s])
    return x / T.N_STREAMS + 0.0 * feats.sum()


def stream_losses(hidden: Tensor, labels: Tensor, head: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-stream CE sums, counts and correct argmax counts.

    Args:
        hidden: (B, T, C) final hidden states (after ``ln_f``).
        labels: (B, 8, T) aligned labels; logits at t are scored against labels at t + 1.
        head: (V, C) the tied ``lm_head`` weight.

    Returns:
        (loss_sum (8,) float32, count (8,) int64, correct (8,) int64).
    """
    h = hidden[:, :-1]  # (B, T-1, C)
    tgt = labels[:, :, 1:]  # (B, 8, T-1)
    sums, counts, correct = [], [], []
    for s in range(T.N_STREAMS):
        mask = tgt[:, s] != IGNORE  # (B, T-1)
        if s == T.TEXT_STREAM:
            lo, hi = 0, T.TEXT_VOCAB_SIZE
        else:
            lo = T.layer_base(s)
            hi = lo + T.AUDIO_VOCAB_SIZE
        n = int(mask.sum())
        if n == 0:
            sums.append(hidden.new_zeros((), dtype=torch.float32))
            counts.append(0)
            correct.append(0)
            continue
        logits = F.linear(h[mask], head[lo:hi]).float()  # (n, slice)
        y = tgt[:, s][mask]
        sums.append(F.cross_entropy(logits, y, reduction="sum"))
        counts.append(n)
        correct.append(int((logits.argmax(-1) == y).sum()))
    dev = hidden.device
    return (torch.stack(sums), torch.tensor(counts, device=dev), torch.tensor(correct, device=dev))


def label_index(labels: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per stream, the flat (B*(T-1)) indices of the supervised shifted positions and their
    targets, computed on the host before the batch moves: the device-side loss then gathers
    rows with ``index_select`` instead of a boolean mask (no host synchronisation)."""
    tgt = labels[:, :, 1:]
    out = []
    for s in range(T.N_STREAMS):
        flat = tgt[:, s].reshape(-1)
        idx = (flat != IGNORE).nonzero().view(-1)
        out.append((idx, flat[idx]))
    return out


def stream_losses_indexed(hidden: Tensor, index: Sequence[tuple[Tensor, Tensor]],
                          head: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`stream_losses` from precomputed :func:`label_index` (on the model's device).

    Same rows in the same order as the boolean-mask version, so the same values; it never
    reads a device value on the host. Returns (loss_sum (8,), count (8,), correct (8,)).
    """
    c = hidden.size(-1)
    h = hidden[:, :-1].reshape(-1, c)
    sums, counts, correct = [], [], []
    zero = hidden.new_zeros((), dtype=torch.float32)
    for s, (idx, y) in enumerate(index):
        n = idx.numel()  # a shape: known on the host without a sync
        if n == 0:
            sums.append(zero)
            counts.append(zero)
            correct.append(zero)
            continue
        if s == T.TEXT_STREAM:
            lo, hi = 0, T.TEXT_VOCAB_SIZE
        else:
            lo = T.layer_base(s)
            hi = lo + T.AUDIO_VOCAB_SIZE
        logits = F.linear(h.index_select(0, idx), head[lo:hi]).float()
        sums.append(F.cross_entropy(logits, y, reduction="sum"))
        counts.append(zero + n)
        correct.append((logits.argmax(-1) == y).sum().float())
    return torch.stack(sums), torch.stack(counts), torch.stack(correct)


def stream_weights(text_weight: float = 1.0, audio_weight: float | Sequence[float] = 1.0
                   ) -> Tensor:
    """(8,) weights: 7 audio layers then text."""
    if isinstance(audio_weight, int | float):
        audio = [float(audio_weight)] * T.N_AUDIO_LAYERS
    else:
        audio = [float(w) for w in audio_weight]
        if len(audio) != T.N_AUDIO_LAYERS:
            raise ValueError(f"audio_weight needs 1 or {T.N_AUDIO_LAYERS} values, got {len(audio)}")
    return torch.tensor(audio + [float(text_weight)])


def combine(loss_sum: Tensor, global_counts: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean of per-stream means; ``global_counts`` are the counts of the whole step.

    Streams without any label in the global batch drop out of the weight normalisation.
    """
    counts = global_counts.to(loss_sum.device, torch.float32)
    w = weights.to(loss_sum.device, torch.float32) * (counts > 0)
    denom = w.sum()
    # no host branch on ``denom`` (a device value): when no stream has a label every weight
    # is 0, the numerator is 0 and the loss is 0 with the graph kept
    return (w * loss_sum / counts.clamp(min=1)).sum() / denom.clamp(min=1e-12)


class TrainModel(nn.Module):
    """Wraps the Mini-Omni ``GPT`` so that DDP / FSDP2 see one forward returning the loss terms.

    ``forward(batch)`` -> (loss_sum, count, correct) per stream; ``forward(..., mode="logits")``
    runs the plain model forward (evaluation, decoding) through the same wrapper, so that FSDP2's
    unshard hooks fire.
    """

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: Tensor, labels: Tensor | None = None,
                features: Tensor | None = None, whisper_lens: Tensor | None = None,
                mode: str = "loss", index: Sequence[tuple[Tensor, Tensor]] | None = None,
                **kwargs: object) -> tuple[Tensor, ...]:
        if mode == "logits":
            return self.gpt(input_ids, whisper_lens=whisper_lens, **kwargs)
        assert features is not None and whisper_lens is not None
        x = embed(self.gpt, input_ids, features, whisper_lens)
        hidden = self.gpt.forward_embeddings(x)
        if index is not None:  # the sync-free path (label_index computed on the host)
            return stream_losses_indexed(hidden, index, self.gpt.lm_head.weight)
        assert labels is not None
        return stream_losses(hidden, labels, self.gpt.lm_head.weight)

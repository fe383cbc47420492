"""Evaluation during training: teacher-forced loss/accuracy per stream, greedy ASR WER.

Every rank evaluates the same fixed set through the wrapped model (so that FSDP2's collectives
line up); the numbers are therefore identical on all ranks and rank 0 logs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omniframe_mini_omni import tokens as T
from torch import nn

from .data import FeatureStore, Item, TrainData
from .loss import STREAM_NAMES, collate


def normalize(text: str) -> str:
    """Whisper's English normaliser (HF ASR leaderboard convention); lowercase fallback."""
    try:
        from whisper.normalizers import EnglishTextNormalizer

        return EnglishTextNormalizer()(text)
    except Exception:  # pragma: no cover - openai-whisper missing
        import re

        return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER after normalisation (jiwer)."""
    import jiwer

    pairs = [(normalize(r), normalize(h)) for r, h in zip(refs, hyps, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return float("nan")
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


@torch.no_grad()
def greedy_asr(model: nn.Module, gpt: nn.Module, features: torch.Tensor, max_new: int,
               device: torch.device) -> list[int]:
    """Transcribe one utterance: ASR prompt, greedy text decoding with the KV cache, audio
    streams fed ``pad_a`` (reference ``generate_ASR``). Stops at EOT."""
    n = features.shape[0]
    prompt = T.audio_input_prompt("ASR", n)
    ids = torch.tensor(prompt, dtype=torch.long, device=device)[None]  # (1, 8, P)
    p = ids.shape[-1]
    gpt.set_kv_cache(1, min(gpt.config.block_size, p + max_new + 1), device=device)
    try:
        _, text = model(ids, mode="logits", input_pos=0, whisper_features=features[None].to(device),
                        whisper_lens=[n], last_only=True, audio_head_rows=[])
        out: list[int] = []
        pad = [T.layershift(T.PAD_A, i) for i in range(T.N_AUDIO_LAYERS)]
        for step in range(max_new):
            tok = int(text[0, -1].argmax())
            if tok == T.EOT:
                break
            out.append(tok)
            nxt = torch.tensor(pad + [tok], dtype=torch.long, device=device).view(1, 8, 1)
            _, text = model(nxt, mode="logits", input_pos=p + step, last_only=True,
                            audio_head_rows=[])
        return out
    finally:
        gpt.clear_kv_cache()


def eval_items(data: TrainData, max_samples: int) -> list[Item]:
    """A fixed eval set: epoch 0 of the eval data (deterministic), at most ``max_samples``."""
    items = data.epoch_items(0)
    return items[:max_samples]


@torch.no_grad()
def evaluate(model: nn.Module, gpt: nn.Module, data: TrainData, items: Sequence[Item],
             features: FeatureStore, *, device: torch.device, micro_batch: int,
             max_new: int, do_wer: bool, feature_dim: int, autocast: Any) -> dict[str, float]:
    """Teacher-forced loss/accuracy per stream and (ASR items) greedy WER."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(8, dtype=torch.float64)
    counts = torch.zeros(8, dtype=torch.float64)
    correct = torch.zeros(8, dtype=torch.float64)
    samples = [data.sample(it, features) for it in items]
    for i in range(0, len(samples), micro_batch):
        b = collate(samples[i:i + micro_batch], feature_dim)
        with autocast():
            s, c, k = model(b["input_ids"].to(device), b["labels"].to(device),
                            b["features"].to(device), b["whisper_lens"].to(device))
        sums += s.double().cpu()
        counts += c.double().cpu()
        correct += k.double().cpu()
    out: dict[str, float] = {}
    for j, name in enumerate(STREAM_NAMES):
        if counts[j] > 0:
            out[f"loss_{name}"] = float(sums[j] / counts[j])
            out[f"acc_{name}"] = float(correct[j] / counts[j])
    if do_wer:
        refs, hyps = [], []
        for it, smp in zip(items, samples, strict=True):
            if it.task != "ASR":
                continue
            feats = torch.as_tensor(smp.features, dtype=torch.float32)
            with autocast():
                ids = greedy_asr(model, gpt, feats, max_new, device)
            refs.append(data.records[it.dataset][it.index].text or "")
            hyps.append(data.tok.decode(ids))
        if refs:
            out["wer"] = wer(refs, hyps)
            out["n_asr"] = float(len(refs))
            out["examples"] = list(zip(refs[:3], hyps[:3], strict=True))  # type: ignore[assignment]
    if was_training:
        model.train()
    return out

"""Collation, embedding and the per-stream loss against straightforward references."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from omniframe_mini_omni import tokens as T
from omniframe_mini_omni.config import Config
from omniframe_mini_omni.model import GPT
from omniframe_train.loss import (
    TrainModel,
    collate,
    combine,
    embed,
    label_counts,
    stream_losses,
    stream_weights,
)
from omniframe_train.targets import IGNORE, build_sample

FRAMES = [[100 + 10 * f + i for i in range(7)] for f in range(3)]


def tiny_gpt(dim: int = 16) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(Config.from_name("tiny", whisper_adapter_dim=dim))
    gpt.init_weights(torch.Generator().manual_seed(0))
    return gpt


def batch(dim: int = 16) -> dict:
    rng = np.random.default_rng(0)
    samples = [
        build_sample("A1A2", answer_ids=[11, 12], frames=FRAMES, n_frames=4,
                     features=rng.normal(size=(4, dim)).astype(np.float32)),
        build_sample("ASR", answer_ids=[5, 6, 7], n_frames=2,
                     features=rng.normal(size=(2, dim)).astype(np.float32)),
        build_sample("T1T2", answer_ids=[9], text_ids=[1, 2, 3]),
    ]
    return collate(samples, dim)


def test_collate_right_pads() -> None:
    b = batch()
    ids, labels = b["input_ids"], b["labels"]
    assert ids.shape == (3, 8, 18) and labels.shape == (3, 8, 18)
    assert b["whisper_lens"].tolist() == [4, 2, 0]
    assert b["features"].shape == (3, 4, 16)
    # the T1T2 row (10 positions) is right-padded with pad_a / pad_t and -100 labels
    assert ids[2, 0, 10:].tolist() == [T.layershift(T.PAD_A, 0)] * 8
    assert ids[2, 7, 10:].tolist() == [T.PAD_T] * 8
    assert (labels[2, :, 10:] == IGNORE).all()


def test_embed_matches_the_model() -> None:
    gpt = tiny_gpt()
    b = batch()
    ours = embed(gpt, b["input_ids"], b["features"], b["whisper_lens"])
    ref = gpt.embed(b["input_ids"], b["features"], b["whisper_lens"].tolist(),
                    audio_rows=[True, True, False])
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_stream_losses_match_full_logits() -> None:
    gpt = tiny_gpt()
    b = batch()
    x = embed(gpt, b["input_ids"], b["features"], b["whisper_lens"])
    hidden = gpt.forward_embeddings(x)
    sums, counts, correct = stream_losses(hidden, b["labels"], gpt.lm_head.weight)
    audio, text = gpt(b["input_ids"], whisper_features=b["features"],
                      whisper_lens=b["whisper_lens"].tolist(), audio_rows=[True, True, False])
    lab = b["labels"]
    for s in range(8):
        logits = text if s == 7 else audio[:, :, s]
        y = lab[:, s, 1:]
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), y.reshape(-1),
                              ignore_index=IGNORE, reduction="sum")
        torch.testing.assert_close(sums[s], ref, rtol=1e-4, atol=1e-4)
        assert counts[s] == (y != IGNORE).sum()
    assert counts.tolist() == label_counts(lab).tolist()
    assert counts[:7].tolist() == [11] * 7  # only the A1A2 row speaks
    assert counts[7] == 3 + 4 + 2  # text + EOT of the three rows
    assert (correct <= counts).all()


def test_combine_weights_and_inactive_streams() -> None:
    sums = torch.tensor([2.0] * 7 + [6.0])
    counts = torch.tensor([2] * 7 + [3])
    w = stream_weights()
    assert torch.isclose(combine(sums, counts, w), torch.tensor((2.0 + 7 * 1.0) / 8))
    text_only = torch.tensor([0] * 7 + [3])
    assert torch.isclose(combine(sums, text_only, w), torch.tensor(2.0))
    w2 = stream_weights(text_weight=3.0, audio_weight=0.5)
    assert torch.isclose(combine(sums, counts, w2), torch.tensor((3 * 2.0 + 3.5) / 6.5))


def test_adapter_gets_a_gradient_without_speech_rows() -> None:
    gpt = tiny_gpt()
    model = TrainModel(gpt)
    b = collate([build_sample("T1T2", answer_ids=[9], text_ids=[1, 2])], 16)
    sums, counts, _ = model(b["input_ids"], b["labels"], b["features"], b["whisper_lens"])
    combine(sums, counts, stream_weights()).backward()
    g = gpt.whisper_adapter.fc_1.weight.grad
    assert g is not None and float(g.abs().sum()) == 0.0  # used (DDP-safe), but no effect

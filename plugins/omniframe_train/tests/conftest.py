"""Shared fixtures: a word-level tokenizer and tiny synthetic recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

WORDS = ["one", "two", "three", "four", "five", "six"]


def write_tokenizer(path: Path, words: list[str] = WORDS) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path))
    return path


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    return write_tokenizer(tmp_path / "tokenizer.json")


def tiny_recipe(tmp_path: Path, tokenizer: Path, **over: Any) -> dict[str, Any]:
    data = {
        "name": "test",
        "seed": 3,
        "out_dir": str(tmp_path / "run"),
        "model": {"init": "random://tiny", "overrides": {"whisper_adapter_dim": 16},
                  "tokenizer": str(tokenizer)},
        "encoder": {"kind": "none"},
        "trainable": {"adapter": True, "blocks": True, "embedding": "all"},
        "data": {"train": [{"source": "synthetic", "tasks": {"ASR": 1, "T1T2": 1},
                            "options": {"n": 24, "dim": 16, "vocab": WORDS}}]},
        "steps": 3,
        "micro_batch": 4,
        "global_batch": 4,
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "log": {"every": 1, "tensorboard": False, "plot": False},
        "eval": {"at_start": False, "wer": False},
        "threads": 1,
    }
    for k, v in over.items():
        cur = data
        keys = k.split(".")
        for kk in keys[:-1]:
            cur = cur.setdefault(kk, {})
        cur[keys[-1]] = v
    return data


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path

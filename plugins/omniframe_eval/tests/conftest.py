"""Fixtures for the harness tests: the test stages, a tiny spoken dataset, eval configs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml


@pytest.fixture(scope="module", autouse=True)
def _test_stages() -> Iterator[None]:
    """The test stages, registered for this folder's test modules only (other plugins' tests
    that run later see the registry as installed)."""
    from omniframe_eval.tests import evalstages

    from omniframe.plugins import get_registry, register_plugin, unregister_plugin

    get_registry()  # load the installed plugins first
    register_plugin(evalstages, evalstages.PLUGIN_NAME)
    yield
    unregister_plugin(evalstages.PLUGIN_NAME)


#: (id, spoken text, reference answers)
TINY = [
    ("capital", "what is the capital of france", ["paris"]),
    ("hello", "please say the word hello", ["hello"]),
    ("three", "count from one to three", ["three"]),
]


def _speak(text: str, path: Path) -> None:
    import numpy as np
    import soundfile as sf

    from omniframe.testing import espeak

    lead = np.zeros(3200, np.float32)
    sf.write(str(path), np.concatenate([lead, espeak(text, rate=220)]), 16000)


@pytest.fixture(scope="session")
def tiny_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three spoken questions (espeak-ng) with ``<wav>.txt`` sidecars for the oracle ASR."""
    folder = tmp_path_factory.mktemp("tiny")
    for item_id, text, _ in TINY:
        wav = folder / f"{item_id}.wav"
        _speak(text, wav)
        Path(f"{wav}.txt").write_text(text)
    return folder


def write_manifest(folder: Path, rows: list[dict[str, Any]] | None = None,
                   extra_lines: list[str] = ()) -> Path:
    rows = rows if rows is not None else [
        {"id": i, "audio": f"{i}.wav", "transcript": t, "answers": a} for i, t, a in TINY]
    path = folder / "manifest.jsonl"
    path.write_text("\n".join([*(json.dumps(r) for r in rows), *extra_lines]) + "\n")
    return path


def write_pipeline(folder: Path, name: str, lm: dict[str, Any] | None = None,
                   asr: dict[str, Any] | None = None) -> Path:
    cfg = {
        "name": name,
        "pipeline": [
            {"kind": "source", "plugin": "evaltest-file", "options": {"path": "unused.wav"}},
            {"kind": "vad", "plugin": "evaltest-energy"},
            {"kind": "encoder", "plugin": "evaltest-oracle", "options": asr or {}},
            lm or {"kind": "lm", "plugin": "echo", "options": {"prefix": "You said: "}},
            {"kind": "codec", "plugin": "echo", "options": {"seconds_per_char": 0.005}},
            {"kind": "sink", "plugin": "evaltest-wav", "options": {"path": "ignored.wav"}},
        ],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_eval(folder: Path, manifest: Path, pipelines: list[dict[str, Any]],
               **extra: Any) -> Path:
    cfg = {
        "name": "tiny",
        "mode": "offline",
        "seed": 7,
        "dataset": {"name": "manifest", "options": {"path": str(manifest)}},
        "pipelines": pipelines,
        "spoken_answer_asr": {"enabled": False},
        "embedding": {"enabled": False},
        "warmup": 0,
        "keep_audio": True,
        "item_timeout_s": 30,
        **extra,
    }
    path = folder / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path

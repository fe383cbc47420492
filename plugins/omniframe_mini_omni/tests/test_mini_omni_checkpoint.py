"""Checkpoint folders in the official format: strict loading, tied weights, Mini-Omni2, saving."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from omniframe_mini_omni import checkpoint as ck
from omniframe_mini_omni.checkpoint import CheckpointError, load_mini_omni, save_checkpoint
from omniframe_mini_omni.config import Config
from omniframe_mini_omni.model import GPT


@pytest.fixture()
def save(tmp_path: Path, write_tokenizer):
    """save(model) -> a checkpoint folder in the official format, with tokenizer files."""

    def _save(model: GPT, name: str = "ckpt") -> Path:
        toks = write_tokenizer(tmp_path / "tok_src")
        return save_checkpoint(model, model.config, tmp_path / name, toks)

    return _save


def _rewrite(folder: Path, edit) -> None:
    sd = torch.load(folder / "lit_model.pth", weights_only=True)
    edit(sd)
    torch.save(sd, folder / "lit_model.pth")


def test_save_writes_the_official_format(save, tiny_model: GPT):
    folder = save(tiny_model)
    assert sorted(p.name for p in folder.iterdir()) == [
        "lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    sd = torch.load(folder / "lit_model.pth", weights_only=True)
    assert set(sd) == set(tiny_model.state_dict())
    assert "lm_head.weight" in sd and "transformer.wte.weight" in sd
    assert all(v.dtype == torch.float32 for v in sd.values())
    cfg = yaml.safe_load((folder / "model_config.yaml").read_text())
    assert cfg["n_layer"] == 2 and cfg["mlp_class_name"] == "LLaMAMLP"


def test_roundtrip_loads_strictly(save, tiny_model: GPT):
    folder = save(tiny_model)
    loaded = load_mini_omni(folder)
    assert loaded.config == tiny_model.config
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert loaded.tokenizer is not None and loaded.tokenizer.encode("hello world") == [0, 1]
    prompt = torch.tensor([[[152000] * 4] * 7 + [[151938, 1, 2, 3]]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(prompt)[1], tiny_model(prompt)[1])
    bf16 = load_mini_omni(folder, dtype=torch.bfloat16, load_tokenizer=False)
    assert bf16.model.dtype == torch.bfloat16 and bf16.tokenizer is None


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda sd: sd.pop("transformer.h.1.norm_2.weight"), ["missing", "h.1.norm_2.weight"]),
        (lambda sd: sd.update(extra_head=torch.zeros(3)), ["unexpected", "extra_head"]),
        (
            lambda sd: sd.update({"transformer.h.0.attn.attn.bias": torch.zeros(5)}),
            ["shape", "transformer.h.0.attn.attn.bias", "(5,)", "(128,)"],
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_wrong_checkpoint_is_reported(save, tiny_model: GPT, edit, words):
    folder = save(tiny_model)
    _rewrite(folder, edit)
    with pytest.raises(CheckpointError) as info:
        load_mini_omni(folder)
    for w in words:
        assert w in str(info.value)


def test_missing_files_and_folder(tmp_path: Path, save, tiny_model: GPT):
    with pytest.raises(CheckpointError, match="not found"):
        load_mini_omni(tmp_path / "nope")
    folder = save(tiny_model)
    (folder / "model_config.yaml").unlink()
    with pytest.raises(CheckpointError, match="missing model_config.yaml"):
        load_mini_omni(folder)


def test_untied_head_uses_wte(save, tiny_model: GPT, caplog):
    folder = save(tiny_model)
    _rewrite(folder, lambda sd: sd["lm_head.weight"].add_(1.0))
    with caplog.at_level(logging.WARNING):
        loaded = load_mini_omni(folder)
    assert "lm_head.weight differs" in caplog.text
    assert torch.equal(loaded.model.lm_head.weight, tiny_model.transformer.wte.weight)
    # a file with only the wte copy is accepted too (the head is tied)
    _rewrite(folder, lambda sd: sd.pop("lm_head.weight"))
    assert load_mini_omni(folder).model.lm_head.weight is not None


def test_mini_omni2_checkpoint(save, caplog):
    config = Config.from_name("tiny", vision_adapter_dim=32)
    model = GPT(config)
    model.init_weights(torch.Generator().manual_seed(0))
    folder = save(model)
    with caplog.at_level(logging.WARNING):
        loaded = load_mini_omni(folder)
    assert "Mini-Omni2" in caplog.text and "vision adapter" in caplog.text
    assert loaded.config.vision_adapter_dim == 32
    # vision weights without vision_adapter_dim in the config are not silently dropped
    cfg = yaml.safe_load((folder / "model_config.yaml").read_text())
    del cfg["vision_adapter_dim"]
    (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="vision_adapter.fc_1.weight"):
        load_mini_omni(folder)


def test_random_preset_is_seeded():
    a = load_mini_omni(preset="tiny", seed=3)
    b = load_mini_omni(preset="tiny", seed=3)
    assert a.tokenizer is None and a.path is None
    assert torch.equal(
        a.model.transformer.h[0].attn.attn.weight, b.model.transformer.h[0].attn.attn.weight
    )
    with pytest.raises(ValueError, match="either"):
        load_mini_omni()


def test_download_failure_names_repo_and_local_path(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as info:
        ck.download_mini_omni("gpt-omni/mini-omni", revision="main")
    msg = str(info.value)
    assert "gpt-omni/mini-omni@main" in msg and "lm.options.model=/path/to/mini-omni" in msg

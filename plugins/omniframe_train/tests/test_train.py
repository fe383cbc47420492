"""Recipes, trainable groups, the LR schedule, the 1-process loop, resume and export."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omniframe_mini_omni import tokens as T
from omniframe_mini_omni.checkpoint import load_mini_omni
from omniframe_mini_omni.config import Config
from omniframe_mini_omni.model import GPT
from omniframe_train.loop import run
from omniframe_train.loss import TrainModel, collate, combine, stream_weights
from omniframe_train.optim import lr_at, make_optimizer, select_trainable
from omniframe_train.recipe import OptimSpec, Recipe, RecipeError, TrainableSpec, load_recipe
from omniframe_train.targets import build_sample

from .conftest import tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[3]
FRAMES = [[100 + f + i for i in range(7)] for f in range(4)]


@pytest.mark.parametrize("stage,groups", [
    (1, (True, False, "audio+specials")), (2, (False, True, "text")), (3, (True, True, "all"))])
def test_stage_recipes(stage: int, groups: tuple) -> None:
    r = load_recipe(ROOT / "configs" / "train" / f"stage{stage}.yaml")
    t = r.trainable
    assert (t.adapter, t.blocks, t.embedding) == groups
    assert r.global_batch == 192 and r.optim.min_lr == 4e-6
    assert r.optim.lr == (1e-3 if stage == 1 else 4e-4)
    tasks = {task for d in r.data.train for task in d.tasks}
    assert tasks == {1: {"ASR", "TTS"}, 2: {"ASR", "T1T2"},
                     3: {"A1A2", "A1T2", "T1A2", "T1T2", "ASR"}}[stage]


def test_recipe_errors_are_clear(tmp_path: Path, tokenizer_file: Path) -> None:
    bad = tiny_recipe(tmp_path, tokenizer_file, **{"trainable.adapter": False,
                                                   "trainable.blocks": False,
                                                   "trainable.embedding": "none"})
    with pytest.raises(RecipeError, match="nothing would train"):
        load_recipe(write_recipe(tmp_path / "r.yaml", bad))
    bad = tiny_recipe(tmp_path, tokenizer_file, optim={"lr": 1e-3, "betta": 1})
    with pytest.raises(RecipeError, match="optim.betta"):
        load_recipe(write_recipe(tmp_path / "r.yaml", bad))
    bad = tiny_recipe(tmp_path, tokenizer_file)
    bad["data"]["train"][0]["tasks"] = {"S2S": 1}
    with pytest.raises(RecipeError, match="unknown task"):
        load_recipe(write_recipe(tmp_path / "r.yaml", bad))
    r = Recipe.model_validate(tiny_recipe(tmp_path, tokenizer_file, global_batch=12,
                                          micro_batch=4))
    with pytest.raises(RecipeError, match="not divisible"):
        r.accumulation(2)


def test_lr_schedule() -> None:
    spec = OptimSpec(lr=1e-3, min_lr=4e-6, warmup_steps=10)
    lrs = [lr_at(s, spec, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lr_at(100, spec, 100) == pytest.approx(4e-6)


def test_stage1_moves_only_adapter_and_audio_rows() -> None:
    torch.manual_seed(0)
    gpt = GPT(Config.from_name("tiny", whisper_adapter_dim=16))
    gpt.init_weights(torch.Generator().manual_seed(0))
    names, masks = select_trainable(gpt, TrainableSpec(adapter=True, embedding="audio"))
    assert names == ["whisper_adapter.fc_1.weight", "whisper_adapter.fc_2.weight",
                     "whisper_adapter.proj.weight", "transformer.wte.weight"]
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    model = TrainModel(gpt)
    opt = make_optimizer(model, OptimSpec(lr=1e-2, weight_decay=0.1))
    rng = np.random.default_rng(0)
    b = collate([
        build_sample("ASR", answer_ids=[3, 4], n_frames=5,
                     features=rng.normal(size=(5, 16)).astype(np.float32)),
        build_sample("TTS", answer_ids=[3, 4], frames=FRAMES, text_ids=[3, 4]),
    ], 16)
    for _ in range(2):
        sums, counts, _ = model(b["input_ids"], b["labels"], b["features"], b["whisper_lens"])
        combine(sums, counts, stream_weights()).backward()
        for m in masks:
            m.apply()
        opt.step()
        opt.zero_grad()
    after = gpt.state_dict()
    wte0, wte1 = before["transformer.wte.weight"], after["transformer.wte.weight"]
    assert torch.equal(wte0[: T.TEXT_VOCAB_SIZE], wte1[: T.TEXT_VOCAB_SIZE])  # text rows frozen
    assert not torch.equal(wte0[T.TEXT_VOCAB_SIZE:], wte1[T.TEXT_VOCAB_SIZE:])
    assert not torch.equal(before["whisper_adapter.fc_1.weight"],
                           after["whisper_adapter.fc_1.weight"])
    for k in before:
        if k.startswith("transformer.h.") or k.startswith("transformer.ln_f"):
            assert torch.equal(before[k], after[k]), k


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "lit_model.pth", map_location="cpu", weights_only=True)


def test_train_resume_and_export_round_trip(tmp_path: Path, tokenizer_file: Path) -> None:
    data = tiny_recipe(tmp_path, tokenizer_file, steps=4, **{"checkpoint.every": 2,
                                                             "checkpoint.keep": 3})
    data["data"]["eval"] = [{"source": "synthetic", "tasks": {"ASR": 1},
                             "options": {"n": 3, "dim": 16, "seed": 9}}]
    data["eval"] = {"at_start": True, "wer": True, "max_new_tokens": 4}
    recipe = Recipe.model_validate(data)
    out = run(recipe, echo=lambda s: None)
    assert out["steps"] == 4 and "wer" in out["first_eval"] and "loss_text" in out["final_eval"]
    assert out["final_eval"]["loss_text"] < out["first_eval"]["loss_text"]
    run_dir = Path(recipe.out_dir)
    assert (run_dir / "train.csv").read_text().count("\n") == 5  # header + 4 steps
    export = Path(out["export"])
    first = _weights(export)
    assert torch.equal(first["lm_head.weight"], first["transformer.wte.weight"])
    # the export loads like a released checkpoint (official format, strict keys)
    loaded = load_mini_omni(export)
    assert loaded.config.whisper_adapter_dim == 16 and loaded.tokenizer is not None
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, first[k]), k
    # resume: drop the final checkpoint and the export; the rerun continues from step 2
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    shutil.rmtree(export)
    lines: list[str] = []
    run(recipe, echo=lines.append)
    assert any("resumed from" in ln and "at step 2" in ln for ln in lines)
    second = _weights(export)
    for k in first:
        torch.testing.assert_close(second[k], first[k], rtol=0, atol=0)
    # fine-tune from the exported Mini-Omni folder
    data2 = tiny_recipe(tmp_path, tokenizer_file, steps=1, out_dir=str(tmp_path / "ft"))
    data2["model"] = {"init": str(export)}
    out2 = run(Recipe.model_validate(data2), echo=lambda s: None)
    assert out2["steps"] == 1


def test_init_from_hf_qwen2_folder(tmp_path: Path, tokenizer_file: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg)
    folder = tmp_path / "qwen"
    hf.save_pretrained(folder)
    shutil.copy(tokenizer_file, folder / "tokenizer.json")
    from omniframe_train.recipe import ModelSpec
    from omniframe_train.start import build_model

    gpt, config, tok = build_model(ModelSpec(init=str(folder),
                                             overrides={"whisper_adapter_dim": 16}), 0)
    assert tok == folder / "tokenizer.json"
    wte = gpt.transformer.wte.weight
    assert wte.shape == (T.PADDED_VOCAB_SIZE, 32)
    emb = hf.model.embed_tokens.weight
    assert torch.equal(wte[:100], emb)
    assert gpt.lm_head.weight is wte
    audio = wte[T.TEXT_VOCAB_SIZE:]
    assert audio.std(0).mean() > 0.01  # audio rows are not all identical
    # the same logits as the HF model on a text-only input (all 8 streams the same ids)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        ref = hf(ids).logits[0, :, :100]
        x = gpt.transformer.wte(ids)  # bypass the 8-stream average: text stream only
        h = gpt.forward_embeddings(x)
        ours = gpt.text_logits(h)[0, :, :100]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    from omniframe_train.loop import enable_activation_checkpointing

    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        gpt = GPT(Config.from_name("tiny", whisper_adapter_dim=16))
        gpt.init_weights(torch.Generator().manual_seed(0))
        if ckpt:
            enable_activation_checkpointing(gpt)
        b = collate([build_sample("ASR", answer_ids=[3, 4], n_frames=5,
                                  features=np.ones((5, 16), dtype=np.float32))], 16)
        sums, counts, _ = TrainModel(gpt)(b["input_ids"], b["labels"], b["features"],
                                          b["whisper_lens"])
        combine(sums, counts, stream_weights()).backward()
        grads.append(gpt.transformer.h[0].attn.attn.weight.grad.clone())
        assert set(gpt.state_dict()) == set(GPT(gpt.config).state_dict())  # keys unchanged
    torch.testing.assert_close(grads[0], grads[1])


def test_audio_plus_specials_trains_eot_row_only_beyond_qwen_rows() -> None:
    """``audio+specials``: the Qwen rows stay bit-identical, the EOT row (a Mini-Omni special,
    supervised at the end of every ASR answer) and the audio rows move."""
    gpt = GPT(Config.from_name("tiny", whisper_adapter_dim=16))
    gpt.init_weights(torch.Generator().manual_seed(0))
    _, masks = select_trainable(gpt, TrainableSpec(adapter=True, embedding="audio+specials"))
    before = gpt.transformer.wte.weight.detach().clone()
    model = TrainModel(gpt)
    opt = make_optimizer(model, OptimSpec(lr=1e-2, weight_decay=0.1), "foreach")
    rng = np.random.default_rng(0)
    b = collate([build_sample("ASR", answer_ids=[3, 4], n_frames=5,
                              features=rng.normal(size=(5, 16)).astype(np.float32))], 16)
    sums, counts, _ = model(b["input_ids"], b["labels"], b["features"], b["whisper_lens"])
    combine(sums, counts, stream_weights()).backward()
    for m in masks:
        m.apply()
    opt.step()
    after = gpt.transformer.wte.weight.detach()
    assert torch.equal(before[: T.TEXT_TOKENIZER_SIZE], after[: T.TEXT_TOKENIZER_SIZE])
    assert not torch.equal(before[T.EOT], after[T.EOT])

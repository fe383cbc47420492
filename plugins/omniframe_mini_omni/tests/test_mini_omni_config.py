"""Config: official model_config.yaml, presets, state-dict keys (spec §1.1, §8.2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omniframe_mini_omni.config import Config, ConfigError
from omniframe_mini_omni.model import GPT, count_parameters

# The official file's fields and values, as listed in spec §1.1.
OFFICIAL_YAML = """
name: Qwen2-0.5B
hf_config: {name: Qwen2-0.5B, org: Qwen}
scale_embeddings: false
block_size: 2048
vocab_size: 50254
padding_multiple: 512
padded_vocab_size: 181120
n_layer: 24
n_head: 14
head_size: 64
n_embd: 896
rotary_percentage: 1
parallel_residual: false
bias: false
lm_head_bias: false
n_query_groups: 2
shared_attention_norm: false
norm_class_name: RMSNorm
norm_eps: 1.0e-06
mlp_class_name: LLaMAMLP
gelu_approximate: none
intermediate_size: 4864
rope_condense_ratio: 1
rope_base: 1000000
n_expert: 0
n_expert_per_token: 0
add_qkv_bias: true
prompt_vocab_size: null
attn_dropout: 0.0
pos_type: rope
force_align: false
use_pretrain_phoneme_emb: false
tie_word_embeddings: true
text_vocab_size: 152000
cat_audio_vocab_size: 29120
audio_vocab_size: 4160
whisper_adapter_dim: 768
post_adapter: false
post_adapter_layers: 6
asr_adapter: llamamlp
"""


def test_official_yaml(tmp_path: Path):
    path = tmp_path / "model_config.yaml"
    path.write_text(OFFICIAL_YAML)
    c = Config.from_file(path)
    ref = Config.from_name("mini-omni")
    fields = (
        "n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size",
        "norm_eps", "rope_base", "block_size", "padded_vocab_size", "text_vocab_size",
        "audio_vocab_size", "whisper_adapter_dim", "add_qkv_bias", "tie_word_embeddings",
    )  # fmt: skip
    for f in fields:
        assert getattr(c, f) == getattr(ref, f), f
    assert c.vision_adapter_dim is None and c.name == "Qwen2-0.5B"
    # to_yaml writes the same field set back; reading it gives the same config
    written = yaml.safe_load(c.to_yaml())
    assert set(written) == set(yaml.safe_load(OFFICIAL_YAML))
    c.to_yaml(tmp_path / "again.yaml")
    assert Config.from_file(tmp_path / "again.yaml") == c
    # Mini-Omni2: one more line
    path.write_text(OFFICIAL_YAML + "vision_adapter_dim: 512\n")
    assert Config.from_file(path).vision_adapter_dim == 512
    assert "vision_adapter_dim" in yaml.safe_load(Config.from_file(path).to_yaml())


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("parallel_residual: true", "parallel_residual"),
        ("norm_class_name: LayerNorm", "norm_class_name"),
        ("mlp_class_name: GemmaMLP", "mlp_class_name"),
        ("rotary_percentage: 0.5", "rotary_percentage"),
        ("sliding_window_size: 4096", "unknown field sliding_window_size"),
        ("name: Gemma-2b", "Gemma"),
        ("n_head: 15", "n_query_groups"),
        ("audio_vocab_size: 4096", "audio_vocab_size"),
    ],
)
def test_unsupported_values_are_rejected(tmp_path: Path, line: str, match: str):
    key = line.split(":")[0]
    text = "\n".join(x for x in OFFICIAL_YAML.splitlines() if not x.startswith(key + ":"))
    path = tmp_path / "model_config.yaml"
    path.write_text(text + "\n" + line + "\n")
    with pytest.raises(ConfigError, match=match):
        Config.from_file(path)


def test_inactive_unknown_and_ignored_fields_are_accepted(tmp_path: Path):
    path = tmp_path / "model_config.yaml"
    path.write_text(OFFICIAL_YAML + "sliding_window_size: null\nrope_adjustments: null\n")
    assert Config.from_file(path).n_layer == 24
    text = OFFICIAL_YAML.replace("post_adapter: false", "post_adapter: true")
    path.write_text(text)
    assert Config.from_file(path).n_layer == 24  # forced off, as the reference does


def test_presets():
    for name in ("mini-omni", "mini-omni2", "tiny", "small"):
        c = Config.from_name(name)
        assert c.padded_vocab_size == 181120
    assert Config.from_name("tiny", n_layer=3).n_layer == 3
    with pytest.raises(ConfigError, match="known: mini-omni"):
        Config.from_name("huge")


# spec §8.2
def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {
        "whisper_adapter.fc_1.weight": (4864, 768),
        "whisper_adapter.fc_2.weight": (4864, 768),
        "whisper_adapter.proj.weight": (896, 4864),
        "lm_head.weight": (181120, 896),
        "transformer.wte.weight": (181120, 896),
        "transformer.ln_f.weight": (896,),
    }
    for i in range(24):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "norm_1.weight": (896,),
            p + "attn.attn.weight": (1152, 896),
            p + "attn.attn.bias": (1152,),
            p + "attn.proj.weight": (896, 896),
            p + "norm_2.weight": (896,),
            p + "mlp.fc_1.weight": (4864, 896),
            p + "mlp.fc_2.weight": (4864, 896),
            p + "mlp.proj.weight": (896, 4864),
        }
    return shapes


def test_state_dict_keys_and_parameter_count():
    with torch.device("meta"):
        model = GPT(Config.from_name("mini-omni"))
    sd = model.state_dict()
    assert len(sd) == 198
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_shapes()
    assert count_parameters(model) == 532_010_880
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.device("meta"):
        model2 = GPT(Config.from_name("mini-omni2"))
    extra = set(model2.state_dict()) - set(sd)
    assert extra == {f"vision_adapter.{n}.weight" for n in ("fc_1", "fc_2", "proj")}
    assert tuple(model2.state_dict()["vision_adapter.fc_1.weight"].shape) == (4864, 512)


def test_numeric_fields_are_normalised(tmp_path: Path):
    path = tmp_path / "model_config.yaml"
    path.write_text(OFFICIAL_YAML.replace("rope_base: 1000000", "rope_base: 1000000.0"))
    c = Config.from_file(path)
    assert c.rope_base == 1_000_000 and isinstance(c.rope_base, int)
    path.write_text(OFFICIAL_YAML.replace("n_layer: 24", "n_layer: 2.5"))
    with pytest.raises(ConfigError, match="n_layer"):
        Config.from_file(path)

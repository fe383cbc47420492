"""Model numerics: parity with transformers' Qwen2, KV cache, embedding rules."""

from __future__ import annotations

import pytest
import torch
from omniframe_mini_omni import tokens as tk
from omniframe_mini_omni.config import Config
from omniframe_mini_omni.convert import (
    config_from_hf_qwen2,
    convert_hf_qwen2_state_dict,
    fuse_qkv,
    split_qkv,
)
from omniframe_mini_omni.model import GPT


def _hf_qwen2(hidden: int, heads: int, kv_heads: int, vocab: int = 151936):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms so that a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize(("hidden", "heads", "kv_heads"), [(64, 4, 2), (112, 14, 2)])
def test_matches_transformers_qwen2(hidden: int, heads: int, kv_heads: int):
    hf = _hf_qwen2(hidden, heads, kv_heads)
    config = config_from_hf_qwen2(hf.config, whisper_adapter_dim=32)
    assert config.q_per_kv == heads // kv_heads
    sd = convert_hf_qwen2_state_dict(hf.state_dict(), config, new_rows="zeros")
    model = GPT(config).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("whisper_adapter.") for k in missing)
    model.tie_weights()

    ids = torch.randint(0, 151936, (2, 9))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits  # (2, 9, 151936)
        # 1) the embedding bypass
        hidden_states = model.forward_embeddings(model.transformer.wte(ids))
        ours = model.text_logits(hidden_states)[..., :151936]
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        # 2) the real 8-stream path: the same id in every stream averages to its embedding
        _, text = model(ids[:, None, :].expand(-1, 8, -1))
        torch.testing.assert_close(text[..., :151936], ref, atol=1e-5, rtol=1e-5)
        # 3) last position only
        _, last = model(ids[:, None, :].expand(-1, 8, -1), last_only=True)
        torch.testing.assert_close(last[..., :151936], ref[:, -1:], atol=1e-5, rtol=1e-5)


def test_fuse_qkv_layout_and_inverse():
    c = Config.from_name("tiny", n_head=6, n_query_groups=2, head_size=2, n_embd=12)
    hs = 2
    q = torch.arange(6 * hs).float()[:, None] + 100  # head h rows: 100+2h, 101+2h
    k = torch.arange(2 * hs).float()[:, None] + 200
    v = torch.arange(2 * hs).float()[:, None] + 300
    fused = fuse_qkv(q, k, v, c)[:, 0].tolist()
    # per group: 3 q heads, 1 k head, 1 v head
    assert fused == [100, 101, 102, 103, 104, 105, 200, 201, 300, 301,
                     106, 107, 108, 109, 110, 111, 202, 203, 302, 303]  # fmt: skip
    q2, k2, v2 = split_qkv(fuse_qkv(q, k, v, c), c)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_new_embedding_rows():
    hf_sd = {"model.embed_tokens.weight": torch.randn(100, 8), "model.norm.weight": torch.ones(8)}
    c = Config.from_name("tiny", n_embd=8, n_head=2, n_query_groups=1, head_size=4, n_layer=1)
    sd = convert_hf_qwen2_state_dict(hf_sd, c, new_rows="mean")
    wte = sd["transformer.wte.weight"]
    assert wte.shape == (181120, 8)
    assert torch.equal(wte[:100], hf_sd["model.embed_tokens.weight"])
    torch.testing.assert_close(wte[tk.EOA + 152000], hf_sd["model.embed_tokens.weight"].mean(0))
    assert sd["lm_head.weight"] is wte
    with pytest.raises(ValueError, match="unknown Qwen2 keys"):
        convert_hf_qwen2_state_dict({**hf_sd, "model.layers.0.foo.weight": torch.ones(1)}, c)


def _prompt(B: int, L: int) -> torch.Tensor:
    rows = [tk.audio_input_prompt("A1A2", L), tk.audio_input_prompt("A1T2", L)][:B]
    return torch.tensor(rows)  # (B, 8, L + 3)


def test_kv_cache_matches_full_recomputation(tiny_model: GPT):
    model = tiny_model
    L, steps = 5, 6
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, L, 768, generator=gen)
    prompt = _prompt(2, L)
    T = prompt.size(-1)
    new = torch.randint(152000, 181120, (2, 8, steps), generator=gen)
    new[:, 7] = torch.randint(0, 151936, (2, steps), generator=gen)
    full_ids = torch.cat([prompt, new], dim=-1)
    kw = {"whisper_features": feats, "whisper_lens": [L, L]}
    with torch.no_grad():
        ref_audio, ref_text = model(full_ids, **kw)  # no cache: (2, T+steps, ...)
        model.set_kv_cache(2, 64)
        try:
            audio, text = model(prompt, 0, **kw)
            torch.testing.assert_close(audio, ref_audio[:, :T], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(text, ref_text[:, :T], atol=1e-5, rtol=1e-5)
            # one position at a time ...
            for s in range(steps - 2):
                audio, text = model(new[:, :, s : s + 1], T + s)
                torch.testing.assert_close(audio[:, 0], ref_audio[:, T + s], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(text[:, 0], ref_text[:, T + s], atol=1e-5, rtol=1e-5)
            # ... and a chunk of two positions on top of the cache (masked path)
            s = steps - 2
            audio, text = model(new[:, :, s:], torch.arange(T + s, T + steps))
            torch.testing.assert_close(audio, ref_audio[:, T + s :], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(text, ref_text[:, T + s :], atol=1e-5, rtol=1e-5)
        finally:
            model.clear_kv_cache()


def test_kv_cache_is_stored_per_group(tiny_model: GPT):
    tiny_model.set_kv_cache(2, 16)
    try:
        c = tiny_model.config
        assert tiny_model.transformer.h[0].attn.kv_cache.shape == (2, c.n_query_groups, 16, 16)
        assert "kv_cache" not in "".join(tiny_model.state_dict())
    finally:
        tiny_model.clear_kv_cache()


def test_whisper_features_replace_audio_streams_only(tiny_model: GPT):
    model = tiny_model
    L = 3
    prompt = _prompt(2, L)
    feats = torch.randn(2, L, 768)
    with torch.no_grad():
        x = model.embed(prompt, feats, whisper_lens=[L, 2], audio_rows=[True, False])
        wte = model.transformer.wte.weight
        adapted = model.whisper_adapter(feats)
        for t in range(L + 3):
            # row 0: positions 1..L hold (7 * adapter(feature) + wte[pad_t]) / 8
            if 1 <= t <= L:
                want0 = (7 * adapted[0, t - 1] + wte[prompt[0, 7, t]]) / 8
            else:
                want0 = wte[prompt[0, :, t]].sum(0) / 8
            torch.testing.assert_close(x[0, t], want0, atol=1e-6, rtol=1e-5)
            # row 1 is marked as a text-input row: plain token embeddings
            torch.testing.assert_close(x[1, t], wte[prompt[1, :, t]].sum(0) / 8)


def test_head_row_selection_and_bfloat16(tiny_model: GPT):
    prompt = _prompt(2, 2)
    with torch.no_grad():
        audio, text = tiny_model(prompt, last_only=True)
        a0, t1 = tiny_model(prompt, last_only=True, audio_head_rows=[0], text_head_rows=[1])
        assert audio.shape == (2, 1, 7, 4160) and text.shape == (2, 1, 152000)
        torch.testing.assert_close(a0, audio[:1])
        torch.testing.assert_close(t1, text[1:])
        none, _ = tiny_model(prompt, last_only=True, audio_head_rows=[])
        assert none.shape[0] == 0
        # audio logits are the lm_head columns of each layer block
        full = tiny_model.lm_head(tiny_model.forward_embeddings(tiny_model.embed(prompt)))
        torch.testing.assert_close(
            audio[:, 0, 3], full[:, -1, 152000 + 3 * 4160 : 152000 + 4 * 4160]
        )
    model16 = GPT(tiny_model.config)
    model16.load_state_dict(tiny_model.state_dict())
    model16.to(torch.bfloat16)
    with torch.no_grad():
        a16, t16 = model16(prompt, last_only=True)
    assert a16.dtype == torch.bfloat16
    assert torch.isfinite(t16.float()).all()


def test_position_bound(tiny_model: GPT):
    ids = _prompt(1, 2)
    with torch.no_grad(), pytest.raises(ValueError, match="block_size"):
        tiny_model(ids, tiny_model.config.block_size - 2)


def test_training_forward_backward(tiny_model: GPT):
    """No cache, all positions: gradients reach the adapter and the embedding (training use)."""
    model = GPT(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    model.set_kv_cache(1, 8)  # an allocated cache is ignored when input_pos is None
    prompt = _prompt(2, 3)
    audio, text = model(prompt, whisper_features=torch.randn(2, 3, 768))
    (audio.logsumexp(-1).mean() + text.logsumexp(-1).mean()).backward()
    assert model.whisper_adapter.fc_1.weight.grad.abs().sum() > 0
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_kv_cache_follows_inference_mode(tiny_model: GPT):
    """A cache allocated under inference_mode is replaced, not reused, outside it (and back)."""
    ids = torch.zeros(1, 8, 3, dtype=torch.long)
    with torch.inference_mode():
        tiny_model.set_kv_cache(1, 16)
        tiny_model(ids, 0)
    with torch.no_grad():
        tiny_model.set_kv_cache(1, 16)
        tiny_model(ids, 0)  # would fail updating an inference tensor in place
    with torch.inference_mode():
        tiny_model.set_kv_cache(1, 16)
        tiny_model(ids, 0)
    tiny_model.clear_kv_cache()

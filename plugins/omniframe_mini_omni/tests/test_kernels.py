"""Decode-step kernels (kernels.py, csrc/small_linear.cpp), one-query attention, SNAC speed-ups."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from omniframe_mini_omni import kernels, tokens  # noqa: E402
from omniframe_mini_omni.model import _one_query_attention  # noqa: E402


@pytest.fixture(scope="module")
def ext():
    """The compiled kernel; skipped (with the reason) where it cannot run."""
    ext = kernels.load()
    if ext is None:
        pytest.skip(f"small_linear kernel unavailable: {kernels.unavailable_reason()}")
    return ext


def _reference(x, w, b):
    """float32 math on the bfloat16 values, rounded once to bfloat16 (what the kernel does)."""
    y = F.linear(x.float(), w.float(), None if b is None else b.float())
    return y.bfloat16()


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n", "k"), [(1000, 896), (67, 64), (130, 160)])
def test_small_linear_matches_float32_math(ext, rows, bias, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    y = kernels.small_linear(ext, x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # same products, float32 sums in another order: at most one bfloat16 rounding step apart
    torch.testing.assert_close(y.float(), _reference(x, w, b).float(), atol=2e-2, rtol=1e-2)


def test_small_linear_keeps_leading_dims_and_falls_back(ext):
    w = torch.randn(48, 64).bfloat16()
    x = torch.randn(2, 1, 64).bfloat16()  # (B, T, C) decode activations
    y = kernels.small_linear(ext, x, w)
    assert y.shape == (2, 1, 48)
    torch.testing.assert_close(y.float(), _reference(x, w, None).float(), atol=2e-2, rtol=1e-2)
    # where the kernel does not apply, PyTorch computes it: 5 rows, K not a multiple of 32,
    # float32
    for xx, ww in [(torch.randn(5, 64).bfloat16(), w), (torch.randn(2, 40).bfloat16(),
                                                        torch.randn(48, 40).bfloat16()),
                   (torch.randn(2, 64), torch.randn(48, 64))]:
        torch.testing.assert_close(kernels.small_linear(ext, xx, ww), F.linear(xx, ww))


def test_small_linear_without_extension_is_f_linear():
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    b = torch.randn(8).bfloat16()
    assert torch.equal(kernels.small_linear(None, x, w, b), F.linear(x, w, b))


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("OMNIFRAME_KERNELS", "0")
    assert kernels.load() is None
    assert kernels.unavailable_reason() == "OMNIFRAME_KERNELS=0"


def test_one_query_attention_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    B, G, q_per_kv, S, hs = 2, 2, 7, 37, 64
    q = torch.randn(B, G * q_per_kv, 1, hs, generator=g)
    k = torch.randn(B, G, S, hs, generator=g)
    v = torch.randn(B, G, S, hs, generator=g)
    scale = 1.0 / math.sqrt(hs)
    ref = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    torch.testing.assert_close(_one_query_attention(q, k, v, scale), ref, atol=1e-5, rtol=1e-5)


def test_fastlm_decode_steps_match_the_model_in_bfloat16():
    """A bfloat16 decode step through FastLM (kernel where available, matmul attention) gives
    the plain model's logits up to bfloat16 rounding."""
    from omniframe_mini_omni.fastpath import FastLM
    from omniframe_mini_omni.lm_stage import _random_lm

    model = _random_lm("tiny", torch.bfloat16, "cpu", seed=3).model
    fast = FastLM(model)
    assert fast.kernel == (kernels.load() is not None)
    row0, row1 = tokens.batch_prompts(6)
    ids = torch.tensor([row0, row1])
    feats = torch.randn(1, 6, 768)
    kw = {"whisper_features": feats, "whisper_lens": [6, 6], "audio_rows": [True, True],
          "last_only": True, "audio_head_rows": [0], "text_head_rows": [1]}
    step = torch.tensor([[[tokens.layershift(100 + i, i)] for i in range(7)] + [[1000]]] * 2)
    outs = []
    with torch.inference_mode():
        for fn in (model, fast):
            model.set_kv_cache(2, 64)
            fn(ids, 0, **kw)
            outs.append([fn(step, ids.size(-1) + i, last_only=True, audio_head_rows=[0],
                            text_head_rows=[1]) for i in range(3)])
    model.clear_kv_cache()
    for (ra, rt), (fa, ft) in zip(*outs, strict=True):
        torch.testing.assert_close(fa.float(), ra.float(), atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(ft.float(), rt.float(), atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------- SNAC


def test_snac_speed_up_decodes_the_same_audio():
    from omniframe_mini_omni.snac_codec import decode_frames, load_snac
    from omniframe_mini_omni.snac_fast import MatmulConvTranspose1d

    ref = load_snac("random://snac_24khz", deterministic=True)
    fast = load_snac("random://snac_24khz", deterministic=True, fast=True)
    assert sum(isinstance(m, MatmulConvTranspose1d) for m in fast.modules()) == 4
    rng = np.random.default_rng(0)
    for n in (1, 3, 4):
        frames = rng.integers(0, 4096, size=(n, 7)).tolist()
        a, b = decode_frames(ref, frames), decode_frames(fast, frames)
        assert a.shape == b.shape == (n * 2048,)
        np.testing.assert_allclose(b, a, atol=1e-5)


@pytest.mark.parametrize(("stride", "k", "out_pad"), [(8, 16, 0), (3, 6, 1), (2, 5, 0)])
def test_matmul_conv_transpose_equals_conv_transpose(stride, k, out_pad):
    from omniframe_mini_omni.snac_fast import MatmulConvTranspose1d

    torch.manual_seed(stride)
    conv = torch.nn.ConvTranspose1d(6, 5, k, stride=stride, padding=math.ceil(stride / 2),
                                    output_padding=out_pad)
    assert MatmulConvTranspose1d.supports(conv)
    x = torch.randn(2, 6, 9)
    with torch.no_grad():
        torch.testing.assert_close(MatmulConvTranspose1d(conv)(x), conv(x), atol=1e-5,
                                   rtol=1e-5)

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
    """The compiled kernel on this CPU's best path; skipped (with the reason) where none runs."""
    ext = kernels.load()
    if ext is None:
        pytest.skip(f"small_linear kernel unavailable: {kernels.unavailable_reason()}")
    return ext


@pytest.fixture(scope="module", params=kernels.PATHS)
def path_kernel(request):
    """The kernel on each code path this CPU runs (the others skip, saying why)."""
    module, why = kernels.compile_extension()
    if module is None:
        pytest.skip(f"small_linear extension unavailable: {why}")
    if request.param not in module.supported_paths():
        pytest.skip(f"this CPU cannot run the {request.param} path "
                    f"(it runs: {', '.join(module.supported_paths()) or 'none'})")
    return kernels.Kernel(module, request.param)


def _reference(x, w, b):
    """float32 math on the bfloat16 values, rounded once to bfloat16 (what the kernel does)."""
    y = F.linear(x.float(), w.float(), None if b is None else b.float())
    return y.bfloat16()


def _assert_within_one_rounding(y, x, w, b):
    """y (bf16) is the exact result up to one bfloat16 rounding (half an ulp: 2^-8 relative)
    plus float32 accumulation error (K * 2^-24 * sum |x_k w_k|): the kernel sums the same
    exact products as F.linear in float32, in another order, and rounds once."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    magnitude = F.linear(x.double().abs(), w.double().abs())
    tol = exact.abs() * 2.0**-8 + magnitude * x.size(-1) * 2.0**-24 + 1e-30
    err = (y.double() - exact).abs()
    assert bool((err <= tol).all()), f"max error / tolerance {float((err / tol).max()):.3f}"


# K: only the tail (32), main loop + tail (96, 160: not multiples of 64 / 128), no tail (896),
# a long row (4864, the MLP's down projection); N odd or not a multiple of 64
@pytest.mark.parametrize(("n", "k"), [(67, 32), (33, 96), (130, 160), (1000, 896), (45, 4864)])
def test_small_linear_matches_float32_math(path_kernel, n, k):
    g = torch.Generator().manual_seed(n + k)
    for rows in range(1, kernels.MAX_ROWS + 1):
        for bias in (False, True):
            x = torch.randn(rows, k, generator=g).bfloat16()
            w = (torch.randn(n, k, generator=g) / math.sqrt(k)).bfloat16()
            b = torch.randn(n, generator=g).bfloat16() if bias else None
            y = kernels.small_linear(path_kernel, x, w, b)
            assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
            _assert_within_one_rounding(y, x, w, b)
            # the same as F.linear's float32 result rounded to bfloat16, up to one step
            torch.testing.assert_close(y.float(), _reference(x, w, b).float(), atol=2e-2,
                                       rtol=1e-2)


@pytest.mark.parametrize("k", [96, 896])
def test_a_rows_result_does_not_depend_on_the_rows_sharing_the_pass(path_kernel, k):
    """Bitwise: row m's output is the same alone, among the first M rows for every M, and at
    any position of the batch (another session's rows must not move a session's numbers)."""
    g = torch.Generator().manual_seed(k)
    R = kernels.MAX_ROWS
    x = torch.randn(R, k, generator=g).bfloat16()
    w = (torch.randn(131, k, generator=g) / math.sqrt(k)).bfloat16()
    b = torch.randn(131, generator=g).bfloat16()
    full = path_kernel.small_linear(x, w, b)
    for m in range(1, R + 1):
        assert torch.equal(path_kernel.small_linear(x[:m].contiguous(), w, b), full[:m]), m
        alone = path_kernel.small_linear(x[m - 1 : m].contiguous(), w, b)
        assert torch.equal(alone, full[m - 1 : m]), m
    for shift in range(1, R):
        rolled = path_kernel.small_linear(x.roll(shift, 0).contiguous(), w, b)
        assert torch.equal(rolled, full.roll(shift, 0)), shift


def test_small_linear_refuses_bad_inputs_clearly(path_kernel):
    w = torch.randn(16, 64).bfloat16()
    R = kernels.MAX_ROWS
    cases = [
        (torch.randn(R + 1, 64).bfloat16(), w, None, f"1 to {R} rows, got {R + 1}"),
        (torch.randn(2, 64), w, None, "bfloat16 only"),
        (torch.randn(2, 64).bfloat16(), w.float(), None, "bfloat16 only"),
        (torch.randn(2, 40).bfloat16(), torch.randn(16, 40).bfloat16(), None,
         "multiple of 32"),
        (torch.randn(2, 32).bfloat16(), w, None, "x is \\(2, 32\\)"),
        (torch.randn(2, 64).bfloat16(), w, torch.randn(15).bfloat16(), "bias must be"),
        (torch.randn(2, 64).bfloat16(), w, torch.randn(16), "bias must be"),
        (torch.randn(64).bfloat16(), w, None, "must be 2-D"),
    ]
    for x, ww, b, message in cases:
        with pytest.raises(RuntimeError, match=message):
            path_kernel.small_linear(x, ww, b)
    with pytest.raises(RuntimeError, match="unknown code path 'sse2'"):
        path_kernel.ext.small_linear(torch.randn(2, 64).bfloat16(), w, None, "sse2")
    with pytest.raises(ValueError, match="unknown kernel path"):
        kernels.Kernel(path_kernel.ext, "sse2")
    missing = [p for p in kernels.PATHS if p not in path_kernel.ext.supported_paths()]
    for p in missing:  # a path this CPU lacks is refused, not run (an illegal instruction)
        with pytest.raises(RuntimeError, match=f"cannot run the {p} path"):
            path_kernel.ext.small_linear(torch.randn(2, 64).bfloat16(), w, None, p)


def test_small_linear_keeps_leading_dims_and_falls_back(ext):
    w = torch.randn(48, 64).bfloat16()
    x = torch.randn(2, 1, 64).bfloat16()  # (B, T, C) decode activations
    y = kernels.small_linear(ext, x, w)
    assert y.shape == (2, 1, 48)
    torch.testing.assert_close(y.float(), _reference(x, w, None).float(), atol=2e-2, rtol=1e-2)
    # where the kernel does not apply, PyTorch computes it: too many rows, K not a multiple
    # of 32, float32
    too_many = torch.randn(kernels.MAX_ROWS + 1, 64).bfloat16()
    for xx, ww in [(too_many, w), (torch.randn(2, 40).bfloat16(), torch.randn(48, 40).bfloat16()),
                   (torch.randn(2, 64), torch.randn(48, 64))]:
        torch.testing.assert_close(kernels.small_linear(ext, xx, ww), F.linear(xx, ww))


def test_small_linear_without_extension_is_f_linear():
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    b = torch.randn(8).bfloat16()
    assert torch.equal(kernels.small_linear(None, x, w, b), F.linear(x, w, b))


def test_best_path_is_chosen_and_a_path_can_be_forced(monkeypatch):
    module, why = kernels.compile_extension()
    if module is None:
        pytest.skip(f"small_linear extension unavailable: {why}")
    paths = list(module.supported_paths())
    assert paths == [p for p in kernels.PATHS if p in paths]  # best first
    monkeypatch.setattr(kernels, "_state", {"ext": (module, None)})
    monkeypatch.delenv("OMNIFRAME_KERNELS", raising=False)
    best = kernels.load()
    assert (best.path if best is not None else None) == (paths[0] if paths else None)
    for p in kernels.PATHS:
        monkeypatch.setattr(kernels, "_state", {"ext": (module, None)})
        monkeypatch.setenv("OMNIFRAME_KERNELS", p)
        k = kernels.load()
        if p in paths:
            assert k is not None and k.path == p
        else:
            assert k is None and "this CPU runs" in kernels.unavailable_reason()
    monkeypatch.setattr(kernels, "_state", {"ext": (module, None)})
    monkeypatch.setenv("OMNIFRAME_KERNELS", "fast")
    assert kernels.load() is None and "not understood" in kernels.unavailable_reason()


@pytest.mark.usefixtures("_one_thread")
def test_bf16_engine_sessions_sharing_weight_passes_match_solo_runs(ext, monkeypatch):
    """bf16 on the kernel: five turns decode together (up to 10 rows a step: weight passes of
    8 + 2 rows, shared linears) and each gets exactly its solo run's tokens (FastLM alone) and
    bit for bit the logits they are sampled from."""
    from omniframe_mini_omni.config import Config
    from omniframe_mini_omni.engine import MiniOmniEngineModel, TurnRequest
    from omniframe_mini_omni.fastpath import FastLM
    from omniframe_mini_omni.generate import GenerationStream, SamplingOptions
    from omniframe_mini_omni.model import GPT

    from omniframe.engine import Work

    model = GPT(Config.from_name("tiny"))
    model.init_weights(torch.Generator().manual_seed(1234))
    model = model.to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(5)
    D = model.config.whisper_adapter_dim
    sampled = SamplingOptions(temperature=0.9, top_k=50, top_p=0.95)
    logits: dict = {}  # request's trace callable -> the logits each step samples from
    plain_sample = GenerationStream._sample

    def recording_sample(self, audio_logits, text_logits, audio_rows, text_rows):
        row = 0 if text_rows is not None else (1 if self.batch_parallel else 0)
        logits[self._trace_target].append((audio_logits[0, -1].clone(),
                                           text_logits[row, -1].clone()))
        return plain_sample(self, audio_logits, text_logits, audio_rows, text_rows)

    monkeypatch.setattr(GenerationStream, "_sample", recording_sample)
    reqs = [TurnRequest("A1A2", whisper_features=torch.randn(n, D, generator=g), max_steps=16)
            for n in (9, 13, 6)]
    reqs += [TurnRequest("A1A2", whisper_features=torch.randn(7, D, generator=g), max_steps=16,
                         sampling=sampled, seed=2),
             TurnRequest("T1A2", text_ids=[5, 9, 200, 31], max_steps=16, batch_parallel=True)]
    for r in reqs:  # a trace callable per request: says whose stream a _sample call is
        r.trace = lambda record: None

    def solo(r):
        greedy = r.sampling.top_k == 1 or r.sampling.temperature == 0.0
        fast = FastLM(model, skip_text_head=greedy)
        assert fast.kernel
        stream = GenerationStream(fast, r.task, whisper_features=r.whisper_features,
                                  text_ids=r.text_ids, batch_parallel=r.batch_parallel,
                                  sampling=r.sampling, seed=r.seed, max_steps=r.max_steps,
                                  trace=r.trace)
        logits[r.trace] = []
        steps = []
        for step in stream:
            steps.append(step)
            if step.text == tokens.EOT:
                fast.text_ended()
        return steps

    with torch.inference_mode():
        solos = [solo(r) for r in reqs]
    solo_logits, logits = logits, {r.trace: [] for r in reqs}
    em = MiniOmniEngineModel(model)
    assert not em.exact and em._ext is not None
    works = [Work(i, r) for i, r in enumerate(reqs)]
    out: dict[int, list] = {i: [] for i in range(len(reqs))}
    running: list = []
    rows = []
    for step in range(200):
        prefill = [works[step]] if step < len(works) else []
        res = em.step(prefill, running)
        for w in (*prefill, *running):
            assert res[w.id].error is None, res[w.id].error
            out[w.id] += res[w.id].items
            if res[w.id].done:
                em.release(w)
        running = [w for w in (*running, *prefill) if not res[w.id].done]
        rows.append(em.last_rows)
        if not running and step >= len(works):
            break
    assert max(rows) > kernels.MAX_ROWS  # a step was split into weight passes
    for i, steps in enumerate(solos):
        assert out[i] == steps, f"request {i} ({reqs[i].task})"
        mine, alone = logits[reqs[i].trace], solo_logits[reqs[i].trace]
        assert len(mine) == len(alone) > 1
        for n, ((a, t), (sa, st)) in enumerate(zip(mine, alone, strict=True)):
            assert torch.equal(a, sa) and torch.equal(t, st), f"request {i} step {n}"


def test_widening_linear_is_float32_math_rounded_once(path_kernel):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(70, 96, generator=g) / 10).bfloat16()
    b = torch.randn(70, generator=g).bfloat16()
    x = torch.randn(3, 13, 96, generator=g).bfloat16()  # a prompt: more rows than MAX_ROWS
    y = kernels.widening_linear(path_kernel, x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 13, 70)
    assert torch.equal(y, F.linear(x.float(), w.float(), b.float()).bfloat16())
    few = x[0, :2]  # a decode step: the small-batch kernel
    assert torch.equal(kernels.widening_linear(path_kernel, few, w, b),
                       path_kernel.small_linear(few.contiguous(), w, b))
    xf = x.float()  # not bf16: F.linear
    assert torch.equal(kernels.widening_linear(path_kernel, xf, w.float()),
                       F.linear(xf, w.float()))


def test_fastlm_prefills_widen_where_the_cpu_lacks_bf16_gemm():
    from omniframe_mini_omni.fastpath import FastLM
    from omniframe_mini_omni.lm_stage import _random_lm

    model = _random_lm("tiny", torch.bfloat16, "cpu", seed=3).model
    k = kernels.load()
    assert (FastLM(model)._prefill_linear is not None) == (k is not None and k.widen_prefill)
    assert FastLM(model, step_kernels=False)._prefill_linear is None
    model32 = _random_lm("tiny", torch.float32, "cpu", seed=3).model
    assert FastLM(model32)._prefill_linear is None


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

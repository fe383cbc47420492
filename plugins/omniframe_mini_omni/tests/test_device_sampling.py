"""Counter-based sampling on the device (device_sampling.py): the same filtering as
generate.sample, draws that follow the filtered softmax, and rows independent of each other."""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from omniframe_mini_omni.device_sampling import (
    counter_uniform_heads,
    filter_logits,
    mix32,
    sample_rows,
)
from omniframe_mini_omni.generate import _nucleus


def _args(R, *, greedy=False, temperature=1.0, top_k=0, top_p=1.0, seed=0, pos=0):
    def full(v, dtype):
        return torch.full((R,), v, dtype=dtype)

    return dict(greedy=full(greedy, torch.bool), temperature=full(temperature, torch.float32),
                top_k=full(top_k, torch.long), top_p=full(top_p, torch.float32),
                seed=full(seed, torch.long), pos=full(pos, torch.long))


def test_mix32_stays_32_bit_and_spreads():
    x = torch.arange(0, 1 << 16, dtype=torch.long)
    h = mix32(x)
    assert int(h.min()) >= 0 and int(h.max()) < 1 << 32
    assert h.unique().numel() == x.numel()  # a bijection on 32 bits: no collisions
    # each output bit is set about half the time
    bits = torch.stack([(h >> b) & 1 for b in range(32)]).float().mean(dim=1)
    assert torch.all((bits - 0.5).abs() < 0.02)


def counter_uniform(seed, pos, head, n):
    return counter_uniform_heads(seed, pos, torch.tensor([head]), n)[:, 0]


def test_uniform_noise_is_a_function_of_its_counter():
    seed = torch.tensor([1, 2, 1])
    pos = torch.tensor([5, 5, 5])
    u = counter_uniform(seed, pos, 3, 1000)
    assert u.shape == (3, 1000) and float(u.min()) > 0 and float(u.max()) < 1
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert not torch.equal(u[0], counter_uniform(seed[:1], pos[:1] + 1, 3, 1000)[0])
    assert not torch.equal(u[0], counter_uniform(seed[:1], pos[:1], 4, 1000)[0])
    flat = counter_uniform(torch.arange(50), torch.zeros(50, dtype=torch.long), 0, 2000)
    assert abs(float(flat.mean()) - 0.5) < 0.005
    hist = torch.histc(flat, bins=10, min=0, max=1) / flat.numel()
    assert torch.all((hist - 0.1).abs() < 0.005)


def test_heads_at_once_equal_heads_one_by_one():
    seed, pos = torch.tensor([5, 9]), torch.tensor([100, 3])
    many = counter_uniform_heads(seed, pos, torch.arange(8), 300)
    for h in range(8):
        assert torch.equal(many[:, h], counter_uniform(seed, pos, h, 300))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 12), st.floats(0.05, 1.0),
       st.floats(0.2, 3.0))
def test_filter_keeps_what_generate_sample_keeps(seed, k, top_p, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 40, generator=g) * 3
    got = filter_logits(logits, torch.full((3,), temperature), torch.full((3,), k),
                        torch.full((3,), top_p))
    # generate.sample's order: top-k, temperature, nucleus
    values, idx = torch.topk(logits, k, dim=-1)
    ref = torch.full_like(logits, float("-inf")).scatter_(-1, idx, values) / temperature
    if top_p < 1.0:
        # a token whose tail mass is the threshold to float precision may go either way
        tail = torch.softmax(ref, dim=-1).sort(dim=-1).values.cumsum(dim=-1)
        assume(not torch.any((tail - (1.0 - top_p)).abs() < 1e-5))
        ref = _nucleus(ref, top_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    keep = torch.isfinite(ref)
    assert torch.allclose(got[keep], ref[keep])


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(0))
    top = logits.argmax(-1)
    assert torch.equal(sample_rows(logits, head=0, **_args(6, greedy=True, top_k=50)), top)
    # a temperature near 0 without the greedy flag: the noise cannot beat the scaled gaps
    assert torch.equal(sample_rows(logits, head=0, **_args(6, temperature=1e-6)), top)
    assert torch.equal(sample_rows(logits, head=0, any_sampled=False, **_args(6)), top)


def test_draws_follow_the_filtered_softmax():
    """40,000 draws (distinct seeds) of a 6-token distribution with top_k 4, temperature 0.8:
    frequencies within 4 standard errors of the probabilities, none outside the top 4."""
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, 3.0])
    n = 40_000
    a = _args(n, temperature=0.8, top_k=4)
    a["seed"] = torch.arange(n)
    ids = sample_rows(base.expand(n, 6), head=2, **a)
    counts = torch.bincount(ids, minlength=6).double() / n
    keep = torch.tensor([True, True, True, False, False, True])
    p = torch.softmax((base / 0.8).masked_fill(~keep, float("-inf")), dim=0).double()
    se = torch.sqrt(p * (1 - p) / n)
    assert counts[~keep].sum() == 0
    assert torch.all((counts - p).abs() <= 4 * se + 1e-12), (counts, p)


def test_top_p_draws_stay_in_the_nucleus():
    base = torch.tensor([3.0, 2.9, 0.0, -1.0, -2.0])
    n = 5000
    a = _args(n, top_p=0.6)
    a["seed"] = torch.arange(n)
    ids = sample_rows(base.expand(n, 5), head=0, **a)
    assert set(ids.unique().tolist()) == {0, 1}  # 0 alone has ~0.5 < 0.6: 1 joins


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=6),
       st.integers(0, 2047), st.integers(0, 7))
def test_a_rows_draw_does_not_depend_on_its_batch(seeds, pos, head):
    R = len(seeds)
    logits = torch.randn(R, 300, generator=torch.Generator().manual_seed(len(seeds)))
    a = _args(R, temperature=0.9, top_k=50, top_p=0.95, pos=pos)
    a["seed"] = torch.tensor(seeds)
    together = sample_rows(logits, head=head, **a)
    for r in range(R):
        alone = sample_rows(logits[r : r + 1], head=head,
                            **{k: v[r : r + 1] for k, v in a.items()})
        assert int(alone) == int(together[r])

"""The fast training path: same loss curve as the plain path (CPU), its parts, FLOPs."""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import pytest
import torch
from omniframe_mini_omni import tokens as T
from omniframe_mini_omni.config import Config
from omniframe_train.fast import Prefetcher, block_params, flops_per_token, step_flops
from omniframe_train.loop import run
from omniframe_train.loss import label_index, stream_losses, stream_losses_indexed
from omniframe_train.recipe import Recipe

from .conftest import tiny_recipe

PLAIN = {"optimizer": "for", "prefetch": 0, "sync_free": False}
FAST = {"optimizer": "fused", "prefetch": 2, "sync_free": True}


def _curve(tmp: Path, tok: Path, name: str, steps: int = 4, **over: object) -> list[float]:
    data = tiny_recipe(tmp / name, tok, steps=steps, micro_batch=2, global_batch=4, **over)
    run(Recipe.model_validate(data), echo=lambda s: None)
    with (tmp / name / "run" / "train.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_fast_path_matches_plain_curve(tmp_path: Path, tokenizer_file: Path) -> None:
    """Tolerances (4 steps of the tiny model, lr 3e-3, CPU):

    - fp32, fused AdamW + prefetch thread + sync-free indexed loss against the per-parameter
      AdamW + boolean-mask loss: 1e-5 relative at every step (float reassociation only);
    - bf16 autocast (fp32 master weights) against fp32: 3 % relative at every step;
    - regional torch.compile with the ``eager`` backend (Dynamo's tracing and graph breaks;
      inductor's kernels are for the GPU script, ~35 s to compile here) against fp32: 1e-4
      relative (2 steps).
    """
    plain = _curve(tmp_path, tokenizer_file, "plain", perf=PLAIN, precision="fp32")
    fast = _curve(tmp_path, tokenizer_file, "fast", perf=FAST, precision="fp32")
    assert len(plain) == len(fast) == 4
    assert plain[-1] < plain[0]  # it learns, so the comparison means something
    for a, b in zip(plain, fast, strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    bf16 = _curve(tmp_path, tokenizer_file, "bf16", perf=FAST, precision="bf16-mixed")
    for a, b in zip(plain, bf16, strict=True):
        assert b == pytest.approx(a, rel=0.03)
    comp = _curve(tmp_path, tokenizer_file, "comp", steps=2,
                  perf={**FAST, "compile": True, "compile_backend": "eager"},
                  precision="fp32", checkpoint={"at_end": False})
    for a, b in zip(plain[:2], comp, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    # checkpoint.at_end false (benchmarks): no final checkpoint, no export
    assert not (tmp_path / "comp" / "run" / "export").exists()
    assert not (tmp_path / "comp" / "run" / "checkpoints").exists()
    assert (tmp_path / "plain" / "run" / "export" / "lit_model.pth").is_file()


def test_indexed_loss_equals_mask_loss() -> None:
    g = torch.Generator().manual_seed(0)
    b, t, c = 3, 11, 8
    hidden = torch.randn(b, t, c, generator=g)
    head = torch.randn(T.TEXT_VOCAB_SIZE + 7 * T.AUDIO_VOCAB_SIZE + 100, c, generator=g) * 0.1
    labels = torch.full((b, 8, t), -100, dtype=torch.long)
    for s in range(8):
        hi = T.TEXT_VOCAB_SIZE if s == 7 else T.AUDIO_VOCAB_SIZE
        on = torch.rand(b, t, generator=g) < 0.4
        labels[:, s][on] = torch.randint(0, hi, (int(on.sum()),), generator=g)
    labels[:, 3] = -100  # a stream without labels
    ref = stream_losses(hidden, labels, head)
    got = stream_losses_indexed(hidden, label_index(labels), head)
    torch.testing.assert_close(got[0], ref[0])
    assert got[1].tolist() == ref[1].float().tolist()
    assert got[2].tolist() == ref[2].float().tolist()


def test_prefetcher_order_errors_and_close() -> None:
    src = iter(range(20))
    p = Prefetcher(lambda: next(src), 3)
    assert [next(p) for _ in range(5)] == [0, 1, 2, 3, 4]
    p.close()

    src2 = iter(range(4))
    assert list(Prefetcher(lambda: next(src2), 2)) == [0, 1, 2, 3]

    def boom() -> int:
        raise ValueError("bad record x")

    with pytest.raises(ValueError, match="bad record x"):
        next(Prefetcher(boom, 1))

    blocked = Prefetcher(lambda: 1, 1)  # the queue stays full: close must not hang
    time.sleep(0.05)
    t0 = time.perf_counter()
    blocked.close()
    assert time.perf_counter() - t0 < 2
    assert not any(th.name == "omniframe-prefetch" and th.is_alive() and th is blocked._thread
                   for th in threading.enumerate())
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda: 1, 0)


def test_flops_formula() -> None:
    c = Config.from_name("tiny", n_layer=2, n_embd=16, n_head=4, n_query_groups=2,
                         head_size=4, intermediate_size=32, whisper_adapter_dim=8)
    # per block: qkv 16*(4+2*2)*4 = 512, proj 4*4*16 = 256, mlp 3*16*32 = 1536
    assert block_params(c) == 2 * (512 + 256 + 1536)
    counts = torch.zeros(8)
    counts[7] = 3  # 3 text labels
    got = step_flops(c, [[10, 5]], counts, whisper_frames=4)
    n = block_params(c)
    want = (10 * (6 * n + 12 * 2 * 16 * 10) + 5 * (6 * n + 12 * 2 * 16 * 5)
            + 6 * 16 * 3 * T.TEXT_VOCAB_SIZE + 6 * (2 * 8 * 32 + 32 * 16) * 4)
    assert got == want
    assert flops_per_token(c, 10) == 6 * n + 12 * 2 * 16 * 10

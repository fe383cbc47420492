"""Why is a bf16 decode step on the faithful (SDPA) path slower than fp32? (issue 12)

    python benchmarks/decode_attention.py --device cuda

The H200 baseline (../shared/gpu.md) measured a Mini-Omni decode step at 57 ms in bf16 on the
faithful path (SDPA attention) against 13 ms in fp32. The decode step's attention is one query
against a cache that grows by one position per step, grouped-query (14 query heads, 2 K/V
heads). This measures, per dtype:

1. one-query GQA attention with ``enable_gqa`` at fixed cache lengths, with PyTorch's own
   backend choice and with each backend forced (flash, efficient, cuDNN, math);
2. the same with a cache that grows by one position per call, as decode steps do: a backend
   that plans per shape (cuDNN builds an execution plan per new sequence length) pays its
   planning at every step here and not in (1);
3. the static engine's form (static_engine.py): a fixed length bucket with a mask, the
   q_per_kv query heads as queries of their K/V head;
4. the whole faithful decode step of ``random://mini-omni`` (GenerationStream over the plain
   model), default backends, then with cuDNN attention off.

The last line is JSON: every timing in microseconds per call (per step for 4).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

B, NH, G, HS = 2, 14, 2, 64


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Any, device: str, reps: int) -> float:
    """Median microseconds of fn() over reps calls (after 3 warm-ups)."""
    for _ in range(3):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e6)
    return round(statistics.median(times), 1)


def attention_table(device: str, dtype: Any, lengths: list[int], reps: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, Any] = {}
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    scale = 1 / math.sqrt(HS)
    for S in lengths:
        q = torch.randn(B, NH, 1, HS, device=device, dtype=dtype)
        k = torch.randn(B, G, S, HS, device=device, dtype=dtype)
        v = torch.randn(B, G, S, HS, device=device, dtype=dtype)
        for name, backend in backends.items():
            def call(q=q, k=k, v=v) -> Any:
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

            try:
                if backend is None:
                    us = _time(call, device, reps)
                else:
                    with sdpa_kernel([backend]):
                        us = _time(call, device, reps)
            except RuntimeError as exc:  # backend refuses these shapes/dtype
                us = f"n/a ({str(exc).splitlines()[0][:60]})"
            out[f"gqa_S{S}_{name}"] = us
        # static engine form: length bucket, mask, q_per_kv heads as queries
        Lb = 1 << max(6, (S - 1).bit_length())
        kb = torch.randn(B, G, Lb, HS, device=device, dtype=dtype)
        vb = torch.randn(B, G, Lb, HS, device=device, dtype=dtype)
        qs = q.reshape(B, G, NH // G, HS)
        mask = (torch.arange(Lb, device=device)[None, :] < S).expand(B, Lb)[:, None, None, :]
        out[f"static_S{S}_Lb{Lb}"] = _time(
            lambda qs=qs, kb=kb, vb=vb, mask=mask: F.scaled_dot_product_attention(
                qs, kb, vb, attn_mask=mask, scale=scale), device, reps)
    # growing cache: one new length per call (what decode steps do)
    start = lengths[0]
    ks = torch.randn(B, G, start + reps + 8, HS, device=device, dtype=dtype)
    q = torch.randn(B, NH, 1, HS, device=device, dtype=dtype)
    for name, backend in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        n = [start]

        def grow(n=n) -> Any:
            n[0] += 1
            kk = ks[:, :, : n[0]]
            return F.scaled_dot_product_attention(q, kk, kk, scale=scale, enable_gqa=True)

        try:
            if backend is None:
                out[f"growing_{name}"] = _time(grow, device, reps)
            else:
                with sdpa_kernel([backend]):
                    out[f"growing_{name}"] = _time(grow, device, reps)
        except RuntimeError as exc:
            out[f"growing_{name}"] = f"n/a ({str(exc).splitlines()[0][:60]})"
    return out


def faithful_step_us(device: str, dtype: Any, steps: int) -> dict[str, Any]:
    import torch
    from omniframe_mini_omni.generate import GenerationStream
    from omniframe_mini_omni.lm_stage import _random_lm

    model = _random_lm("mini-omni", dtype, device, 0).model
    feats = torch.randn(251, 768, device=device)
    out: dict[str, Any] = {}
    for label, cudnn in (("default", True), ("no_cudnn_sdp", False)):
        if device.startswith("cuda"):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        with torch.inference_mode():
            stream = GenerationStream(model, "A1A2", whisper_features=feats,
                                      max_steps=steps + 1)
            next(stream)
            times = []
            _sync(device)
            t = time.perf_counter()
            for _ in stream:
                _sync(device)
                now = time.perf_counter()
                times.append((now - t) * 1e6)
                t = now
        out[f"faithful_step_{label}"] = round(statistics.median(times), 1)
    if device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(True)
    del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", default="64,300,1000")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20, help="faithful decode steps timed")
    ap.add_argument("--no-model", action="store_true", help="skip the whole-step part (4)")
    args = ap.parse_args()

    import torch

    lengths = [int(v) for v in args.lengths.split(",")]
    result: dict[str, Any] = {"device": (torch.cuda.get_device_name() if
                                         args.device.startswith("cuda") else "cpu"),
                              "torch": torch.__version__}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        part = attention_table(args.device, dtype, lengths, args.reps)
        if not args.no_model:
            part.update(faithful_step_us(args.device, dtype, args.steps))
        result[name] = part
        print(f"-- {name}")
        for key, value in part.items():
            print(f"  {key:<28} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

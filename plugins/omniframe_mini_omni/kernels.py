"""CPU kernels for decode steps, compiled at first use (``csrc/small_linear.cpp``).

``small_linear(x, weight, bias)`` computes ``F.linear`` for 1 to 4 bfloat16 rows with one pass
over the weights (AVX512-BF16 dot products, float32 accumulation, one rounding to bfloat16).
A batch-parallel decode step (2 rows) is bound by reading ~1 GB of weights; PyTorch's CPU
kernels read them once per row or go through oneDNN's general GEMM, so this kernel makes a
step about 1.5x faster on the AVX512-BF16 CPUs it targets (AMD Zen 4, Intel Sapphire Rapids
and later).

The extension is built with ``torch.utils.cpp_extension`` (a C++ compiler and ninja are
needed; ``pip install ninja``) into PyTorch's extension cache, once per machine (about 30 s
on 2 cores). When it cannot be built or the CPU lacks AVX512-BF16, :func:`load` says why once
in the log and returns None, and callers use PyTorch's kernels. ``OMNIFRAME_KERNELS=0``
turns the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from torch import Tensor

log = structlog.get_logger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "small_linear.cpp"
MAX_ROWS = 4

_lock = threading.Lock()
_state: dict[str, Any] = {}


def load() -> Any | None:
    """The compiled extension, or None (disabled, no compiler, or no AVX512-BF16), cached."""
    with _lock:
        if "ext" in _state:
            return _state["ext"]
        ext, why = _build()
        if ext is None:
            log.info("mini_omni.kernels.off", reason=why)
        _state["ext"] = ext
        _state["why"] = why
        return ext


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None (after it ran), else None."""
    return _state.get("why")


def _build() -> tuple[Any | None, str | None]:
    if os.environ.get("OMNIFRAME_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "OMNIFRAME_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"not an x86-64 CPU ({platform.machine()})"
    if not hasattr(torch.backends.cpu, "get_cpu_capability"):
        return None, "this PyTorch cannot report CPU capabilities"
    # the kernel needs AVX512-BF16; torch reports AVX512 at best, the extension checks BF16
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return None, f"CPU capability {torch.backends.cpu.get_cpu_capability()} (need AVX512-BF16)"
    try:
        from torch.utils import cpp_extension
    except ImportError as e:  # pragma: no cover - part of torch
        return None, f"torch.utils.cpp_extension unavailable: {e}"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return None, "ninja is not installed (pip install ninja)"
    source = SOURCE.read_bytes()
    name = "omniframe_small_linear_" + hashlib.sha256(source).hexdigest()[:12]
    t0 = time.perf_counter()
    try:
        ext = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # compiler missing or failing: fall back, say why
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return None, f"could not build {SOURCE.name}: {first}"
    if not ext.available():
        return None, "CPU has no AVX512-BF16"
    log.debug("mini_omni.kernels.loaded", name=name, s=round(time.perf_counter() - t0, 2))
    return ext, None


def small_linear(ext: Any, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` through the kernel when it applies, else PyTorch's.

    Applies to bfloat16 CPU tensors with at most :data:`MAX_ROWS` rows (leading dims
    flattened), in-features a multiple of 32 and no autograd.
    """
    K = x.size(-1)
    rows = x.numel() // K if K else 0
    if (
        ext is None
        or not 1 <= rows <= MAX_ROWS
        or K % 32
        or x.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or (bias is not None and bias.dtype != torch.bfloat16)
        or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
    ):
        return F.linear(x, weight, bias)
    y = ext.small_linear(x.reshape(rows, K).contiguous(), weight.contiguous(),
                         None if bias is None else bias.contiguous())
    return y.view(*x.shape[:-1], weight.size(0))

"""CPU kernels for decode steps, compiled at first use (``csrc/small_linear.cpp``).

``small_linear(kernel, x, weight, bias)`` computes ``F.linear`` for 1 to :data:`MAX_ROWS`
bfloat16 rows with one pass over the weights (float32 accumulation, one rounding to
bfloat16). A decode step (2 rows per batch-parallel session, several sessions per engine
step) is bound by reading ~1 GB of weights; PyTorch's CPU kernels read them once per row or
go through oneDNN's general GEMM.

Code paths, the best this CPU runs is used (:attr:`Kernel.path`, logged once):

* ``avx512bf16``: AVX512-BF16 dot products (AMD Zen 4, Intel Sapphire Rapids and later);
* ``avx512f``: AVX-512F without BF16 (Skylake-SP .. Ice Lake, and VMs that hide BF16): bf16
  widened to float32 in registers, float32 FMA;
* ``avx2``: the same with AVX2 + FMA (Haswell and later, Zen 1-3);
* none of these (or not x86-64): PyTorch's kernels.

Within a path, a row's output does not depend on how many rows share the call (bitwise), so
a session's numbers do not depend on the other sessions of an engine step.

The extension is built with ``torch.utils.cpp_extension`` (a C++ compiler and ninja are
needed; ``pip install ninja``) into PyTorch's extension cache, once per machine and source
version (about 30 s on 2 cores). When it cannot be built or runs on no path of this CPU,
:func:`load` says why once in the log and returns None, and callers use PyTorch's kernels.
``OMNIFRAME_KERNELS=0`` turns the kernels off; ``OMNIFRAME_KERNELS=<path>`` (e.g. ``avx2``)
picks a path (for comparisons).
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
MAX_ROWS = 8
"""Most activation rows per weight pass (the engine splits larger steps in chunks)."""
PATHS = ("avx512bf16", "avx512f", "avx2")
"""The kernel's code paths, best first."""
_OFF = ("0", "false", "no", "off")
_WIDEN_MAX = 1 << 25  # weights widened per call at most (128 MiB in float32)

_lock = threading.RLock()  # load() -> compile_extension()
_state: dict[str, Any] = {}


class Kernel:
    """The compiled extension bound to one code path (what :func:`load` returns)."""

    def __init__(self, ext: Any, path: str) -> None:
        if path not in PATHS:
            raise ValueError(f"unknown kernel path {path!r}: one of {', '.join(PATHS)}")
        self.ext = ext
        self.path = path

    def small_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The raw kernel: x (M, K) with 1 <= M <= MAX_ROWS, all contiguous bfloat16."""
        return self.ext.small_linear(x, weight, bias, self.path)

    @property
    def widen_prefill(self) -> bool:
        """Whether prefills should use :func:`widening_linear`: CPUs without AVX512-BF16 have
        no native bf16 matrix instructions, and oneDNN's bf16 GEMM runs at ~60 GFLOP/s on the
        2-core Xeon (fp32: ~265)."""
        return self.path != "avx512bf16"

    def __repr__(self) -> str:
        return f"Kernel(path={self.path!r})"


def load() -> Kernel | None:
    """The kernel on this CPU's best path, or None (disabled, no compiler, no path), cached."""
    with _lock:
        if "kernel" in _state:
            return _state["kernel"]
        kernel, why = _select()
        if kernel is None:
            log.info("mini_omni.kernels.off", reason=why)
        else:
            log.info("mini_omni.kernels.on", path=kernel.path,
                     supported=",".join(_state.get("paths", ())))
        _state["kernel"] = kernel
        _state["why"] = why
        return kernel


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None (after it ran), else None."""
    return _state.get("why")


def supported_paths() -> list[str]:
    """The code paths this CPU runs, best first ([] where the extension cannot be built)."""
    ext, _ = compile_extension()
    return [] if ext is None else list(ext.supported_paths())


def compile_extension() -> tuple[Any | None, str | None]:
    """The compiled extension module (any path) or (None, why); built once per process."""
    with _lock:
        if "ext" not in _state:
            _state["ext"] = _build()
        return _state["ext"]


def _select() -> tuple[Kernel | None, str | None]:
    want = os.environ.get("OMNIFRAME_KERNELS", "1").strip().lower()
    if want in _OFF:
        return None, "OMNIFRAME_KERNELS=0"
    if want not in ("", "1", "true", "yes", "on", "auto", *PATHS):
        return None, (f"OMNIFRAME_KERNELS={want!r} is not understood: 0 (off), 1 (best path) "
                      f"or a path ({', '.join(PATHS)})")
    ext, why = compile_extension()
    if ext is None:
        return None, why
    if ext.max_rows() != MAX_ROWS:  # kernels.py and csrc out of step
        return None, f"{SOURCE.name} takes {ext.max_rows()} rows, kernels.py {MAX_ROWS}"
    paths = list(ext.supported_paths())
    _state["paths"] = paths
    if want in PATHS:
        if want not in paths:
            return None, (f"OMNIFRAME_KERNELS={want}: this CPU runs "
                          f"{', '.join(paths) or 'none of the kernel paths'}")
        return Kernel(ext, want), None
    if not paths:
        return None, "CPU has none of AVX512-BF16, AVX-512F, AVX2+FMA"
    return Kernel(ext, paths[0]), None


def _build() -> tuple[Any | None, str | None]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"not an x86-64 CPU ({platform.machine()})"
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
    log.debug("mini_omni.kernels.built", name=name, s=round(time.perf_counter() - t0, 2))
    return ext, None


def small_linear(kernel: Kernel | None, x: Tensor, weight: Tensor,
                 bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` through the kernel when it applies, else PyTorch's.

    Applies to bfloat16 CPU tensors with at most :data:`MAX_ROWS` rows (leading dims
    flattened), in-features a multiple of 32 and no autograd.
    """
    K = x.size(-1)
    rows = x.numel() // K if K else 0
    if (
        kernel is None
        or not 1 <= rows <= MAX_ROWS
        or K % 32
        or x.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or (bias is not None and bias.dtype != torch.bfloat16)
        or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
    ):
        return F.linear(x, weight, bias)
    y = kernel.small_linear(x.reshape(rows, K).contiguous(), weight.contiguous(),
                            None if bias is None else bias.contiguous())
    return y.view(*x.shape[:-1], weight.size(0))


def widening_linear(kernel: Kernel | None, x: Tensor, weight: Tensor,
                    bias: Tensor | None = None) -> Tensor:
    """``F.linear`` for bf16 prefills on CPUs without native bf16 GEMM.

    Up to :data:`MAX_ROWS` rows: :func:`small_linear`. More rows (a prompt): the bf16 values
    widened to float32 (exact), a float32 GEMM, one rounding to bfloat16 (oneDNN's bf16 GEMM
    also accumulates in float32 and rounds once). On the 2-core Xeon (AVX-512F, no BF16) a
    251 x 896 x 4864 product runs at ~227 GFLOP/s this way, ~60 through oneDNN's bf16 GEMM.
    Costs a float32 copy of the weight per call (17 MB for the MLP's matrices); larger
    weights go to F.linear.
    """
    K = x.size(-1)
    rows = x.numel() // K if K else 0
    if rows <= MAX_ROWS:
        return small_linear(kernel, x, weight, bias)
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16
            or x.device.type != "cpu" or weight.device.type != "cpu"
            or weight.numel() > _WIDEN_MAX):  # e.g. the text head for every position
        return F.linear(x, weight, bias)
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(torch.bfloat16)

"""The fast training path's parts: step preparation off the critical path, FLOPs and MFU.

- :func:`prepare_step` turns one global batch of the plan into this rank's collated
  micro-batches plus everything the loop needs on the host (label counts, label indices for the
  sync-free loss, positions and real tokens), pinned when the device is a GPU.
- :class:`Prefetcher` runs :func:`prepare_step` in a background thread ``depth`` steps ahead;
  the order (and so the data plan and resume) is unchanged.
- :func:`step_flops` counts model FLOPs the way the field does (PaLM appendix B / Chinchilla):
  6 x N matmul FLOPs per token for forward + backward, plus the attention term
  12 x n_layer x n_embd x T per token of a length-T sequence, plus 6 x n_embd x slice for the
  head at each supervised position and 6 x N_adapter at each speech frame. N counts the
  transformer blocks (the embedding is a lookup). MFU = achieved model FLOP/s / peak; the
  6N convention counts weight gradients even for frozen blocks (stage 1 does less work).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omniframe_mini_omni import tokens as T

from .loss import collate, label_counts, label_index

# bf16 dense tensor peak per GPU, TFLOP/s (vendor datasheets; SXM parts)
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                   "L4": 121.0, "4090": 165.0}


@dataclass
class PreparedStep:
    epoch: int
    batch_idx: int
    batches: list[dict[str, Any]]
    stats: torch.Tensor  # (8 counts, padded positions, samples, real tokens) float64, host
    lengths: list[list[int]]  # real sequence lengths per micro-batch
    whisper: int  # speech frames (adapter positions) in this rank's batches


def prepare_step(data: Any, features: Any, step_item: tuple[int, int, Any], *, rank: int,
                 world: int, accum: int, feature_dim: int, pin: bool,
                 dummy: Callable[[], Any]) -> PreparedStep:
    epoch, batch_idx, batch = step_item
    micro = data.micro_batches(batch, rank, world, accum, features)
    batches, lengths = [], []
    whisper = 0
    for m in micro:
        samples = m or [dummy()]
        b = collate(samples, feature_dim)
        b["index"] = label_index(b["labels"])
        lengths.append([len(s) for s in samples])
        whisper += int(b["whisper_lens"].sum())
        if pin:
            b = _pin(b)
        batches.append(b)
    counts = torch.stack([label_counts(b["labels"]) for b in batches]).sum(0)
    n_pos = float(sum(b["input_ids"].shape[0] * b["input_ids"].shape[2] for b in batches))
    n_real = float(sum(sum(x) for x in lengths))
    n_samples = float(sum(len(m) for m in micro))
    stats = torch.cat([counts.double(), torch.tensor([n_pos, n_samples, n_real],
                                                     dtype=torch.float64)])
    return PreparedStep(epoch, batch_idx, batches, stats, lengths, whisper)


def _pin(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.pin_memory()
    if isinstance(obj, dict):
        return {k: _pin(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_pin(v) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors (nested in dicts/lists/tuples) with ``non_blocking`` copies."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class Prefetcher:
    """Iterate ``produce()`` results prepared ``depth`` items ahead by a daemon thread.

    Exceptions in the producer are re-raised by ``next``; ``close`` stops the thread (it never
    blocks for long: puts time out and re-check the stop flag).
    """

    _DONE = object()

    def __init__(self, produce: Callable[[], Any], depth: int) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._produce = produce
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="omniframe-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._put(("ok", self._produce())):
                    return
        except StopIteration:
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(("err", e))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        kind, value = self._q.get()
        if kind == "ok":
            return value
        if kind == "end":
            raise StopIteration
        raise value

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)


def block_params(config: Any) -> int:
    """Matmul parameters of the transformer blocks (attention + SwiGLU MLP)."""
    d, hs = config.n_embd, config.head_size
    qkv = d * (config.n_head + 2 * config.n_query_groups) * hs
    proj = config.n_head * hs * d
    mlp = 3 * d * config.intermediate_size
    return config.n_layer * (qkv + proj + mlp)


def adapter_params(config: Any) -> int:
    a = config.whisper_adapter_dim
    return 2 * a * config.intermediate_size + config.intermediate_size * config.n_embd


def step_flops(config: Any, lengths: list[list[int]], counts: torch.Tensor,
               whisper_frames: int) -> float:
    """Model FLOPs (forward + backward) of one step's real tokens (padding excluded)."""
    n = block_params(config)
    att = 12 * config.n_layer * config.n_embd
    total = 0.0
    for mb in lengths:
        for t in mb:
            total += t * (6 * n + att * t)
    text = float(counts[T.TEXT_STREAM])
    audio = float(counts.sum()) - text
    total += 6 * config.n_embd * (text * T.TEXT_VOCAB_SIZE + audio * T.AUDIO_VOCAB_SIZE)
    total += 6 * adapter_params(config) * whisper_frames
    return total


def flops_per_token(config: Any, seq_len: int) -> float:
    """The per-token figure to state: 6 N + 12 n_layer n_embd T (head and adapter excluded)."""
    return 6.0 * block_params(config) + 12.0 * config.n_layer * config.n_embd * seq_len


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Peak TFLOP/s of one device for MFU: the override, or a known GPU's bf16 dense peak."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in GPU_PEAK_TFLOPS.items():
        if key in name:
            return val
    return None

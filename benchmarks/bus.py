"""Bus throughput and per-stage latency: 20 ms audio frames through six pass-through stages.

Two runs:
* throughput: the source emits as fast as the bus takes frames (backpressure-bound);
* latency: the source emits at a steady 2,000 frames/s (40x real time); an observer stamps
  each frame as it leaves every stage, and the per-stage latency is the time between a frame
  leaving stage k-1 and leaving stage k.

    python benchmarks/bus.py [--frames 20000] [--stages 6]

Last line: JSON with ``frames_per_s`` and ``p99_stage_latency_ms``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import AsyncIterator

import anyio
import numpy as np

from omniframe import AudioFrame, Frame, Pipeline, Stage, StageContext, StageOptions
from omniframe.metrics import percentile
from omniframe.session import Session


class Source(Stage):
    kind = "source"
    name = "bench"
    produces = (AudioFrame,)

    class Options(StageOptions):
        frames: int = 10_000
        rate: float = 0.0  # frames per second; 0 = as fast as possible

    async def generate(self) -> AsyncIterator[Frame]:
        chunk = np.zeros(320, np.float32)  # 20 ms at 16 kHz
        n, rate = self.options.frames, self.options.rate
        t0 = time.perf_counter()
        for i in range(n):
            if rate:
                due = t0 + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
            yield AudioFrame(samples=chunk, sample_rate=16000, pts=i * 0.02)


class PassThrough(Stage):
    """Consumes audio frames and yields them unchanged (a real call of ``process``)."""

    kind = "encoder"
    name = "pass"
    consumes = (AudioFrame,)
    produces = (AudioFrame,)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        yield frame


class Stamps:
    """Records when each frame leaves each stage."""

    def __init__(self, stages: int, frames: int) -> None:
        self.t = np.zeros((stages + 1, frames))
        self.index = {}

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
        if isinstance(frame, AudioFrame):
            k = int(stage[1:]) if stage != "src" else 0
            self.t[k, int(round(frame.pts / 0.02))] = time.perf_counter()


def build(n_stages: int, frames: int, rate: float, observers: list) -> Pipeline:
    session = Session()
    stages: list[Stage] = [Source({"frames": frames, "rate": rate},
                                  StageContext(name="src", session=session))]
    for k in range(1, n_stages + 1):
        stages.append(PassThrough({}, StageContext(name=f"p{k}", session=session)))
    return Pipeline(stages, buffer=16, observers=observers, collect=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20_000)
    ap.add_argument("--stages", type=int, default=6)
    ap.add_argument("--latency-frames", type=int, default=4_000)
    ap.add_argument("--latency-rate", type=float, default=2_000.0)
    args = ap.parse_args()

    # throughput (best of 3)
    best = 0.0
    for _ in range(3):
        pipe = build(args.stages, args.frames, 0.0, [])
        t0 = time.perf_counter()
        anyio.run(pipe.run)
        best = max(best, args.frames / (time.perf_counter() - t0))

    # latency under a steady rate
    stamps = Stamps(args.stages, args.latency_frames)
    anyio.run(build(args.stages, args.latency_frames, args.latency_rate, [stamps]).run)
    hops = np.diff(stamps.t, axis=0) * 1000.0  # (stages, frames) ms
    per_stage = hops.ravel().tolist()
    p50 = percentile(per_stage, 50)
    p99 = percentile(per_stage, 99)
    end_to_end = (stamps.t[-1] - stamps.t[0]) * 1000.0

    device = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"bus benchmark on {device}, python {platform.python_version()}")
    print(f"{'figure':<36}{'value':>12}")
    print(f"{'frames/s (6 pass-through stages)':<36}{best:>12,.0f}")
    print(f"{'x real time (20 ms frames)':<36}{best * 0.02:>12,.0f}")
    print(f"{'per-stage latency p50 (ms)':<36}{p50:>12.3f}")
    print(f"{'per-stage latency p99 (ms)':<36}{p99:>12.3f}")
    print(f"{'source->last stage p99 (ms)':<36}{percentile(end_to_end.tolist(), 99):>12.3f}")
    print(json.dumps({
        "frames_per_s": round(best, 1),
        "p99_stage_latency_ms": round(p99, 4),
        "p50_stage_latency_ms": round(p50, 4),
        "stages": args.stages,
        "device": device,
    }))


if __name__ == "__main__":
    main()

"""Cross-session SNAC batching: N pending chunks decoded in one forward vs one by one.

    python benchmarks/snac_batch.py                      # 1 torch thread, widths 1,4,10; N 1,2,4
    python benchmarks/snac_batch.py --threads 2 --rounds 9 --widths 4 --sessions 1,2,4,8

SNAC ``random://snac_24khz`` (the released architecture, 19.8M parameters, random weights: the
cost does not depend on the values), noise off, ``fast`` (the codec stage's defaults). A chunk
is a window of F frames (the chunk with its context and look-ahead: 1 = a 1-frame first chunk
alone, 4 = the release's chunk, 10 = 3 + 4 + 3 with context and look-ahead); each costs one
SNAC forward of F frames (F * 2048 samples).

For each F and N (chunks pending at once), three ways to decode them: ``one_by_one`` (N solo
decodes in a row: ``batch: false``, each session's ``decode_range`` on the compute thread),
``whole`` (one SNAC forward of N rows) and ``split`` (what the batcher does on CPU: the batch
through the decoder's first ``CPU_BATCHED_BLOCKS`` upsampling blocks, then the rest row by row,
each row handed out when done; on cuda ``split`` = ``whole``). Times are medians over rounds,
the variants' order rotating each round so that load changes hit all alike; ``x_*`` is the
median over rounds of one_by_one / that variant. ``wait_*`` is the mean time a session waits
for its audio from the moment all N chunks are pending (one by one the k-th waits for k
decodes; ``whole``: every row waits for the whole batch). ``batcher_overhead_ms`` is
SnacBatcher's cost at one session (N = 1, F = 4): its path minus a plain compute-thread
``decode_range``.

The machine may be shared: the load average before and after is printed; compare ratios from
the same run. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _frames(n: int, rng: Any) -> list[tuple[int, ...]]:
    return [tuple(int(c) for c in rng.integers(0, 4096, 7)) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per cell (median)")
    ap.add_argument("--widths", default="1,4,10", help="window widths F in frames")
    ap.add_argument("--sessions", default="1,2,4", help="pending chunks N")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    try:
        widths = [int(x) for x in args.widths.split(",")]
        sessions = [int(x) for x in args.sessions.split(",")]
    except ValueError:
        ap.error("--widths and --sessions are comma-separated integers, e.g. 1,4,10")
    if min(widths) < 1 or min(sessions) < 1 or args.rounds < 1 or args.threads < 1:
        ap.error("--widths, --sessions, --rounds and --threads must be >= 1")

    import numpy as np
    import torch
    from mini_omni import _cpu  # benchmarks/mini_omni.py: the CPU's model name
    from omniframe_mini_omni.snac_batch import CPU_BATCHED_BLOCKS, SnacBatcher, decode_rows
    from omniframe_mini_omni.snac_codec import ChunkedDecoder, decode_frames, load_snac

    from omniframe.stage import _compute_executor

    torch.set_num_threads(args.threads)
    device = args.device
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else _cpu()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    model = load_snac("random://snac_24khz", deterministic=True, fast=True, device=device)
    rng = np.random.default_rng(0)
    load_before = _load()
    print(f"# {name}, torch {torch.__version__}, {args.threads} thread(s), device {device}, "
          f"load {load_before}")
    rows: list[dict[str, Any]] = []
    split = None if device.startswith("cuda") else CPU_BATCHED_BLOCKS
    print(f"{'F':>3} {'N':>3} {'one_by_one_ms':>14} {'whole_ms':>9} {'split_ms':>9} "
          f"{'x_whole':>8} {'x_split':>8} {'wait_1by1_ms':>13} {'wait_whole_ms':>14} "
          f"{'wait_split_ms':>14}")

    def run(windows: list[Any], blocks: int | None | str) -> tuple[float, float]:
        """(total, mean wait per row) seconds: one by one when blocks == "solo"."""
        t0 = time.perf_counter()
        done = []
        if blocks == "solo":
            for w in windows:
                decode_frames(model, w)
                sync()
                done.append(time.perf_counter() - t0)
        else:
            for _ in decode_rows(model, windows, batched_blocks=blocks):  # type: ignore[arg-type]
                sync()
                done.append(time.perf_counter() - t0)
        return done[-1], sum(done) / len(done)

    variants: dict[str, int | None | str] = {"solo": "solo", "whole": None, "split": split}
    for width in widths:
        for n in sessions:
            windows = [_frames(width, rng) for _ in range(n)]
            for blocks in variants.values():  # warm-up: this shape's kernels
                run(windows, blocks)
            total: dict[str, list[float]] = {k: [] for k in variants}
            wait: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(args.rounds):
                order = list(variants)[r % 3:] + list(variants)[: r % 3]  # rotate who goes first
                for k in order:
                    t, w = run(windows, variants[k])
                    total[k].append(t)
                    wait[k].append(w)
            med = {k: statistics.median(v) * 1e3 for k, v in total.items()}
            waits = {k: statistics.median(v) * 1e3 for k, v in wait.items()}
            x = {k: statistics.median(a / b for a, b in zip(total["solo"], total[k], strict=True))
                 for k in ("whole", "split")}
            row = {"frames": width, "sessions": n, "one_by_one_ms": round(med["solo"], 1),
                   "whole_ms": round(med["whole"], 1), "split_ms": round(med["split"], 1),
                   "speedup_whole": round(x["whole"], 2), "speedup_split": round(x["split"], 2),
                   "mean_wait_one_by_one_ms": round(waits["solo"], 1),
                   "mean_wait_whole_ms": round(waits["whole"], 1),
                   "mean_wait_split_ms": round(waits["split"], 1)}
            rows.append(row)
            print(f"{width:>3} {n:>3} {med['solo']:>14.1f} {med['whole']:>9.1f} "
                  f"{med['split']:>9.1f} {x['whole']:>8.2f} {x['split']:>8.2f} "
                  f"{waits['solo']:>13.1f} {waits['whole']:>14.1f} {waits['split']:>14.1f}",
                  flush=True)

    # the batcher's own cost at one session: its path vs a plain decode_range job
    frames = _frames(8, rng)
    batcher = SnacBatcher(model, device)
    plain_t: list[float] = []
    via_t: list[float] = []
    for r in range(max(args.rounds, 9)):
        for variant in ("plain", "via") if r % 2 else ("via", "plain"):
            dec = ChunkedDecoder(model, 4, frames=list(frames))
            t0 = time.perf_counter()
            if variant == "via":
                batcher.submit(dec, 0, 4).result()
            elif device.startswith("cpu"):
                _compute_executor().submit(dec.decode_range, 0, 4).result()
            else:
                dec.decode_range(0, 4)
            sync()
            (via_t if variant == "via" else plain_t).append(time.perf_counter() - t0)
    batcher.close()
    plain, via = statistics.median(plain_t) * 1e3, statistics.median(via_t) * 1e3
    print(f"# one session, F=4: plain decode_range {plain:.1f} ms, through SnacBatcher "
          f"{via:.1f} ms (overhead {via - plain:+.1f} ms, within noise if small)")
    load_after = _load()
    print(f"# load {load_before} -> {load_after}")
    print(json.dumps({"benchmark": "snac_batch", "device": name, "threads": args.threads,
                      "rounds": args.rounds, "load_before": load_before,
                      "load_after": load_after, "batcher_overhead_ms": round(via - plain, 2),
                      "rows": rows}))


if __name__ == "__main__":
    main()

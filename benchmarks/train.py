"""Training throughput of a small Mini-Omni-layout model on CPU: 1 vs 2 processes (gloo DDP).

    python benchmarks/train.py [--steps 16] [--micro-batch 8]

Synthetic ASR + T1T2 samples with precomputed 384-d features (no encoder in the timing), the
``tiny`` preset (2 blocks, n_embd 64, the full 181,120-row embedding and 152,000-wide text
head), everything trainable (stage-3 style), fp32, 1 torch thread per process. Throughput is
the mean over the logged windows after the first (Adam state allocation, warm-up): positions/s
counts every position of the right-padded batch (prompt included), samples/s whole samples.
The 2-process run keeps the per-process micro-batch, so its global batch is twice as large.
The last line is JSON: tokens_per_s_1proc, tokens_per_s_2proc, peak_rss_gb (largest process).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]


def _tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}},
                                     unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path))
    return path


def _recipe(tmp: Path, nproc: int, steps: int, micro: int) -> Path:
    data = {
        "name": f"bench-{nproc}proc", "seed": 0, "out_dir": str(tmp / f"run{nproc}"),
        "model": {"init": "random://tiny", "overrides": {"whisper_adapter_dim": 384},
                  "tokenizer": str(tmp / "tokenizer.json")},
        "encoder": {"kind": "none"},
        "trainable": {"adapter": True, "blocks": True, "embedding": "all"},
        "data": {"train": [{"source": "synthetic", "tasks": {"ASR": 1, "T1T2": 1},
                            "options": {"n": 512, "dim": 384, "vocab": WORDS}}]},
        "steps": steps, "micro_batch": micro, "global_batch": micro * nproc,
        "log": {"every": 2, "tensorboard": False, "plot": False},
        "eval": {"at_start": False, "wer": False},
        "checkpoint": {"resume": "never"},
        "threads": 1,
    }
    path = tmp / f"bench{nproc}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp: Path, nproc: int, steps: int, micro: int) -> dict:
    recipe = _recipe(tmp, nproc, steps, micro)
    if nproc == 1:
        cmd = [sys.executable, "-m", "omniframe_train", str(recipe)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_port()}", "-m", "omniframe_train",
               str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{nproc}-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    out = tmp / f"run{nproc}"
    rows = list(csv.DictReader((out / "train.csv").open()))[1:]  # drop the warm-up window
    summary = json.loads((out / "summary.json").read_text())
    return {
        "tokens_per_s": sum(float(r["tokens_per_s"]) for r in rows) / len(rows),
        "samples_per_s": sum(float(r["samples_per_s"]) for r in rows) / len(rows),
        "peak_rss_gb": summary["peak_rss_gb"],
        "final_loss": float(rows[-1]["loss"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        _tokenizer(tmp / "tokenizer.json")
        res = {n: _run(tmp, n, args.steps, args.micro_batch) for n in (1, 2)}
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"device: CPU ({cpu}), gloo, fp32, tiny preset, micro-batch {args.micro_batch}/process,"
          f" {args.steps} steps")
    print(f"{'processes':>9} | {'positions/s':>11} | {'samples/s':>9} | {'peak RSS/proc GB':>16}")
    for n, r in res.items():
        print(f"{n:>9} | {r['tokens_per_s']:>11.0f} | {r['samples_per_s']:>9.2f} | "
              f"{r['peak_rss_gb']:>16.2f}")
    print(json.dumps({
        "tokens_per_s_1proc": round(res[1]["tokens_per_s"], 1),
        "tokens_per_s_2proc": round(res[2]["tokens_per_s"], 1),
        "samples_per_s_1proc": round(res[1]["samples_per_s"], 2),
        "samples_per_s_2proc": round(res[2]["samples_per_s"], 2),
        "peak_rss_gb": round(max(r["peak_rss_gb"] for r in res.values()), 3),
        "device": "cpu",
    }))


if __name__ == "__main__":
    main()

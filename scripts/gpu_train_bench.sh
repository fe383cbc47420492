#!/usr/bin/env bash
# Issue 14 on one GPU, in one device call (prepared on CPU; not yet run):
#   1. benchmarks/train.py --device cuda at the released size (mini-omni preset, 532 M params,
#      all trainable, stage-3 shapes): plain vs fast (+ activation checkpointing, torch.compile),
#      and the fast path under torchrun with NCCL at world size 1 for DDP and FSDP2;
#   2. checkpoint save -> resume -> export -> load under NCCL (DDP and FSDP2, world size 1).
# Writes JSON lines and logs under $OUT (5 files). Before the call, on the CPU machine:
#   bash ../shared/tools/gpu-wheels.sh          # fills .whl/ (git-ignored)
# then: device run, carry [".whl"], timeout_s 600, command:
#   bash scripts/gpu_train_bench.sh
# Budget (the command must end within 600 s): ~1 min install, <= 400 s benchmark (6 runs, each
# <= 120 s), <= 100 s checkpoints (a 0.1 B model; DDP alone took 150 s on the loaded CPU, seconds
# on a GPU). SKIP_BENCH=1 or SKIP_CKPT=1 runs one part; CKPT_BACKEND=gloo tries part 2 on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PY=python3

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site-omni . && export PYTHONPATH=/tmp/site-omni:${PYTHONPATH:-}
else
  echo "no .whl/: run ../shared/tools/gpu-wheels.sh here first and carry .whl" >&2
fi
# the project's own sources win over the installed copy (entry points stay from site-omni)
export PYTHONPATH=$PWD:$PWD/plugins:${PYTHONPATH:-}
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)" >> "$OUT/gpu.txt"

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 400 $PY benchmarks/train.py --device cuda --preset mini-omni --shape stage3 \
    --micro-batch 8 --steps 10 --warmup 3 --threads 4 --timeout 120 \
    --variants plain,fast,fast-ckpt,fast-compile --strategies ddp,fsdp2 --nproc 1 \
    > "$OUT/bench.log" 2>&1
  echo "bench exit $?" >> "$OUT/bench.log"
  grep '^{' "$OUT/bench.log" | tail -n 1 > "$OUT/bench.jsonl" || true
fi

if [ "${SKIP_CKPT:-0}" != 1 ]; then
  timeout 100 $PY - > "$OUT/ckpt.log" 2>&1 <<'EOF'
"""Save at step 2, resume to step 4, export, load the export (NCCL, world size 1)."""
import json, os, socket, subprocess, sys, tempfile
from pathlib import Path

import yaml

out = Path(os.environ.get("OUT", "/tmp/out"))
tmp = Path(tempfile.mkdtemp())
sys.path.insert(0, "benchmarks")
import train as bench  # noqa: E402  (the benchmark's tokenizer helper)

bench._tokenizer(tmp / "tokenizer.json")
res = []
for strategy in ("ddp", "fsdp2"):
    run_dir = tmp / strategy
    rec = {"name": f"ckpt-{strategy}", "seed": 0, "out_dir": str(run_dir),
           "model": {"init": "random://small", "overrides": {"whisper_adapter_dim": 384},
                     "tokenizer": str(tmp / "tokenizer.json")},
           "encoder": {"kind": "none"},
           "trainable": {"adapter": True, "blocks": True, "embedding": "audio"},
           "data": {"train": [{"source": "synthetic", "tasks": {"ASR": 1, "T1T2": 1},
                               "options": {"n": 64, "dim": 384, "vocab": bench.WORDS}}]},
           "steps": 2, "micro_batch": 4, "global_batch": 4,
           "log": {"every": 1, "tensorboard": False, "plot": False},
           "eval": {"at_start": False, "wer": False},
           "checkpoint": {"every": 1, "keep": 2, "resume": "auto"},
           "distributed": {"strategy": strategy,
                           "backend": os.environ.get("CKPT_BACKEND", "nccl")}}
    item = {"strategy": strategy}
    for steps in (2, 4):
        rec["steps"] = steps
        path = tmp / f"{strategy}{steps}.yaml"
        path.write_text(yaml.safe_dump(rec))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                            "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
                            "omniframe_train", str(path)], capture_output=True, text=True)
        print(p.stdout[-3000:], p.stderr[-3000:], sep="\n")
        item[f"exit_{steps}"] = p.returncode
        if steps == 4:
            item["resumed"] = "resumed from" in p.stdout
    try:
        import torch
        from omniframe_mini_omni.checkpoint import load_mini_omni

        loaded = load_mini_omni(run_dir / "export", load_tokenizer=False)
        item["export_loads"] = True
        item["export_params"] = sum(t.numel() for t in loaded.model.parameters())
        item["cuda"] = torch.cuda.is_available()
    except Exception as e:  # noqa: BLE001
        item["export_loads"] = f"{type(e).__name__}: {e}"[:300]
    res.append(item)
    print(json.dumps(item), flush=True)
(out / "ckpt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res))
EOF
  echo "ckpt exit $?" >> "$OUT/ckpt.log"
fi
ls -la "$OUT"

#!/usr/bin/env bash
# One prepared run on the GPU machine (see ../shared/gpu.md): the Mini-Omni engine's figures
# of issue 12 and the preemptive figures of issue 16, baseline and engine in the same run.
# Here first:  bash ../shared/tools/gpu-wheels.sh   (fills .whl/, carried to the machine)
# There (device run, carry [".whl"]):  bash scripts/gpu_engine_bench.sh
# Results: JSON lines under $OUT (engine, engine_fp32, snac_batch .jsonl), a summary last.
# (benchmarks/engine.py also measures the solo path of one session, the baseline.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --target /tmp/site-omni . && export PYTHONPATH=/tmp/site-omni:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "== $name" >&2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  tail -n 1 "$OUT/$name.log" | grep '^{' >> "$OUT/$name.jsonl" || true
}
# many sessions on one model through the engine, bf16 then fp32 (token-exact mode)
run engine 200 python3 benchmarks/engine.py --device cuda --sessions 64 --dtype bfloat16 \
  --answer-steps 48 --plot "$OUT/engine.png"
run engine_fp32 120 python3 benchmarks/engine.py --device cuda --sessions 8 --dtype float32
# cross-session SNAC batching: N pending chunks in one forward against one by one
run snac_batch 90 python3 benchmarks/snac_batch.py --device cuda --widths 1,4,10 \
  --sessions 1,4,16,64 --rounds 5
echo "== summary" >&2
for f in "$OUT"/*.jsonl; do echo "$(basename "$f"): $(tail -c 600 "$f")"; done

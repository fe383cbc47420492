#!/usr/bin/env bash
# The third device call of that session: what limits first audio (p99) and real time at 32
# and 64 paced sessions: the prefill budget per engine step, 512 (default) against 2048.
# Here first: bash ../shared/tools/gpu-wheels.sh; there (carry [".whl"]): bash scripts/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --target /tmp/site-omni . && export PYTHONPATH=/tmp/site-omni:$PYTHONPATH
export PYTHONPATH=$PWD:$PWD/plugins:$PYTHONPATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
BUDGET=${BUDGET:-230}
run() {  # name, timeout, command...: skipped or shortened when the budget is nearly spent
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 25 ]; then echo "== $name skipped (budget)" >&2; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (${limit}s max, ${SECONDS}s in)" >&2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  grep '^{' "$OUT/$name.log" | tail -n 1 >> "$OUT/$name.jsonl" || true
}
for b in 512 2048; do
  run "engine_budget_$b" 100 python3 benchmarks/engine.py --device cuda --engine static \
    --compile --dtype bfloat16 --ns 32,64 --answer-steps 120 --pace 24 --prefill-budget "$b"
done
echo "== summary (${SECONDS}s)" >&2
for f in "$OUT"/*.jsonl; do echo "$(basename "$f"): $(tail -c 900 "$f")"; done

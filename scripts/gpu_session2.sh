#!/usr/bin/env bash
# The second device call of the session that first ran scripts/gpu_session.sh: after the fix
# of the cuDNN-attention pathology (model.py: no cuDNN SDPA for shapes that change per call),
# the static step's attention backends side by side, and the paced 64-session run again.
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
BUDGET=${BUDGET:-420}
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
# 1. the tests on the GPU again (graphs vs eager; fp32 solo runs use the changed model.py)
run gpu_tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu \
  plugins/omniframe_mini_omni/tests/test_static_engine.py
# 2. the faithful bf16 step and prefill-like growing shapes, now without cuDNN by default
run decode_attention 40 python3 benchmarks/decode_attention.py --device cuda --reps 10 \
  --steps 6 --lengths 64
# 3. the static step (compiled, graphs) with each SDPA backend, one session
for a in default efficient cudnn; do
  flag=""; [ "$a" != default ] && flag="--attention $a"
  run "engine_1_$a" 45 python3 benchmarks/engine.py --device cuda --engine static --compile \
    $flag --dtype bfloat16 --ns 1 --answer-steps 48
done
# 4. paced sessions again (first audio after the prefill fix)
run engine 130 python3 benchmarks/engine.py --device cuda --engine static --compile \
  --dtype bfloat16 --ns 1,8,64 --answer-steps 120 --pace 24 --plot "$OUT/engine.png"
echo "== summary (${SECONDS}s)" >&2
tail -n 3 "$OUT/gpu_tests.log"
for f in "$OUT"/*.jsonl; do echo "$(basename "$f"): $(tail -c 500 "$f")"; done

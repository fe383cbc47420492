#!/usr/bin/env bash
# The third device call of that session: what limits first audio (p99) and real time at 32
# and 64 paced sessions: the prefill budget per engine step, 512 (default) against 2048.
# Here first: bash ../shared/tools/gpu-wheels.sh; there (carry [".whl"]): bash scripts/gpu_session3.sh
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-230}
source scripts/gpu_lib.sh
for b in 512 2048; do
  run "engine_budget_$b" 100 python3 benchmarks/engine.py --device cuda --engine static \
    --compile --dtype bfloat16 --ns 32,64 --answer-steps 120 --pace 24 --prefill-budget "$b"
done
summary 900

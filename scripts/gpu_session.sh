#!/usr/bin/env bash
# One device call for a session that gets ~15 min of GPU: the most important checks of issues
# 12 and 14 in priority order, all ending within $BUDGET s (default 420) of the start so that a
# rerun still fits. Longer, fuller versions: scripts/gpu_engine_bench.sh, gpu_train_bench.sh.
# Here first: bash ../shared/tools/gpu-wheels.sh; there (carry [".whl"]): bash scripts/gpu_session.sh
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-420}
source scripts/gpu_lib.sh
# 1. static engine on this GPU: graph replays equal eager steps; fp32 greedy equals solo runs
run gpu_tests 100 python3 -m pytest -q -p no:cacheprovider -m gpu \
  plugins/omniframe_mini_omni/tests/test_static_engine.py
# 2. the static engine (slot pool, device sampling, CUDA graphs, compiled blocks), bf16, paced
#    sessions; also times the solo eager path (the baseline) in the same run
run engine 130 python3 benchmarks/engine.py --device cuda --engine static --compile \
  --dtype bfloat16 --ns 1,8,64 --answer-steps 120 --pace 24 --plot "$OUT/engine.png"
# 3. training at the released size: plain vs fast (issue 14), one round, short
run train 120 python3 benchmarks/train.py --device cuda --preset mini-omni --shape stage3 \
  --micro-batch 8 --steps 6 --warmup 2 --threads 4 --timeout 55 --variants plain,fast
# 4. the bf16 SDPA decode pathology
run decode_attention 45 python3 benchmarks/decode_attention.py --device cuda --reps 20 \
  --steps 8 --lengths 64,300,1000
# 5. the dynamic engine (eager) and the static one without compile
run engine_dynamic 40 python3 benchmarks/engine.py --device cuda --engine dynamic \
  --dtype bfloat16 --ns 1 --answer-steps 24
run engine_nocompile 40 python3 benchmarks/engine.py --device cuda --engine static \
  --dtype bfloat16 --ns 1,8 --answer-steps 24
tail -n 3 "$OUT/gpu_tests.log"
summary 700

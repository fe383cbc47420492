#!/usr/bin/env bash
# The second device call of the session that first ran scripts/gpu_session.sh: after the fix
# of the cuDNN-attention pathology (model.py: no cuDNN SDPA for shapes that change per call),
# the static step's attention backends side by side, and the paced 64-session run again.
# Here first: bash ../shared/tools/gpu-wheels.sh; there (carry [".whl"]): bash scripts/gpu_session2.sh
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-420}
source scripts/gpu_lib.sh
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
tail -n 3 "$OUT/gpu_tests.log"
summary 500

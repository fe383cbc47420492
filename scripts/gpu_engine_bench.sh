#!/usr/bin/env bash
# One prepared run on the GPU machine (see ../shared/gpu.md): the Mini-Omni engine's figures
# of issue 12 and the preemptive figures of issue 16, baseline and engine in the same run.
# Here first:  bash ../shared/tools/gpu-wheels.sh   (fills .whl/, carried to the machine)
# There (device run, carry [".whl"]):  bash scripts/gpu_engine_bench.sh
# Results: JSON lines under $OUT (engine*, decode_attention, snac_batch .jsonl; gpu_tests.log),
# a summary last. Everything ends within $BUDGET s (530) of the start; expected ~6 min.
# (benchmarks/engine.py also measures the solo path of one session, the baseline.)
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-530}
source scripts/gpu_lib.sh
# in order of what matters most if time runs out
# 1. the static engine's graphs on this GPU: replays equal eager steps (fp32: solo runs too)
run gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu \
  plugins/omniframe_mini_omni/tests/test_static_engine.py
# 2. many sessions on one model: the static engine (slot pool, device sampling, CUDA graphs,
#    compiled blocks), bf16; it also times the solo path (eager FastLM): the baseline.
#    Answers of 120 steps (10 s of speech) taken at the pace of a sink with a 2 s buffer, so
#    the sessions overlap and the engine's backpressure runs, as in a service
run engine 200 python3 benchmarks/engine.py --device cuda --engine static --compile \
  --dtype bfloat16 --ns 1,2,8,32,64,96 --answer-steps 120 --pace 24 --plot "$OUT/engine.png"
# 3. the dynamic engine (eager, per-request caches): the engine baseline
run engine_dynamic 60 python3 benchmarks/engine.py --device cuda --engine dynamic \
  --dtype bfloat16 --ns 1,8 --answer-steps 32
# 4. why bf16 SDPA decode steps were slower than fp32 (backend per shape, growing cache)
run decode_attention 60 python3 benchmarks/decode_attention.py --device cuda --reps 30 \
  --steps 12
# 5. graphs without compile, and float32
run engine_nocompile 50 python3 benchmarks/engine.py --device cuda --engine static \
  --dtype bfloat16 --ns 1,8 --answer-steps 32
run engine_fp32 45 python3 benchmarks/engine.py --device cuda --engine static \
  --dtype float32 --ns 1,8 --answer-steps 32
# 6. cross-session SNAC batching: N pending chunks in one forward against one by one
run snac_batch 40 python3 benchmarks/snac_batch.py --device cuda --widths 1,4,10 \
  --sessions 1,4,16,64 --rounds 5
summary 600

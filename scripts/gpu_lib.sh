# Sourced by the scripts/gpu_*.sh runs on the GPU machine (see ../shared/gpu.md), from the
# project root: installs the carried wheels (.whl/, from ../shared/tools/gpu-wheels.sh) and the
# project without its extras, puts the project's own sources first on the path, writes the
# GPU's name to $OUT/gpu.txt and defines run(). Set BUDGET (seconds from the script's start)
# before sourcing.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site-omni . && export PYTHONPATH=/tmp/site-omni:$PYTHONPATH
else
  echo "no .whl/: run ../shared/tools/gpu-wheels.sh on the CPU machine and carry .whl" >&2
fi
export PYTHONPATH=$PWD:$PWD/plugins:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
BUDGET=${BUDGET:-530}

run() {  # name, timeout, command...: skipped or shortened when the budget is nearly spent;
  # the output goes to $OUT/name.log, its last JSON line to $OUT/name.jsonl
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 25 ]; then echo "== $name skipped (budget)" >&2; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (${limit}s max, ${SECONDS}s in)" >&2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  grep '^{' "$OUT/$name.log" | tail -n 1 >> "$OUT/$name.jsonl" || true
}

summary() {  # the last bytes of every JSON line file
  echo "== summary (${SECONDS}s)" >&2
  for f in "$OUT"/*.jsonl; do echo "$(basename "$f"): $(tail -c "${1:-600}" "$f")"; done
}

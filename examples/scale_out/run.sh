#!/usr/bin/env bash
# Two (or more) `omniframe serve` processes behind nginx, on loopback.
#
#   examples/scale_out/run.sh                              # configs/serve_echo.yaml
#   examples/scale_out/run.sh configs/cascade.yaml --max-sessions 2
#   PORT=9000 BACKEND_PORTS="9001 9002 9003" examples/scale_out/run.sh
#
# Clients connect to ws://127.0.0.1:$PORT/v1/realtime (the openai SDK: base_url
# http://127.0.0.1:$PORT/v1); nginx hands each new session to the backend with the fewest open
# connections. Arguments after the config go to every `omniframe serve`. nginx runs from a
# temporary prefix with examples/scale_out/nginx.conf: no root, no /etc/nginx. Ctrl-C (or
# SIGTERM) stops nginx and the servers; the servers end their sessions gracefully.
# Needs nginx (Debian: apt-get install -y nginx).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PY=${PYTHON:-python3}
PORT=${PORT:-8000}
BACKEND_PORTS=${BACKEND_PORTS:-"8001 8002"}
config=${1:-configs/serve_echo.yaml}
shift || true

NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
if [ ! -x "$NGINX" ]; then
  echo "run.sh: nginx is not installed (Debian: apt-get install -y nginx)" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/omniframe-scale-out.XXXXXX")
mkdir -p "$work/logs" "$work/tmp"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

backends=""
for p in $BACKEND_PORTS; do
  (cd "$root" && exec "$PY" -m omniframe serve "$config" --host 127.0.0.1 --port "$p" "$@") \
    2> "$work/logs/serve-$p.log" &
  pids+=($!)
  backends+="        server 127.0.0.1:$p max_fails=0;"$'\n'
done

# wait until every backend answers /health (models load first)
for p in $BACKEND_PORTS; do
  if ! "$PY" - "$p" <<'PYEOF'
import sys, time, urllib.request
port = sys.argv[1]
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
PYEOF
  then
    echo "run.sh: the server on port $p did not start:" >&2
    cat "$work/logs/serve-$p.log" >&2
    exit 1
  fi
done

B="${backends%$'\n'}" L="127.0.0.1:$PORT" awk \
  '{ if ($0 ~ /^[ \t]*@BACKENDS@[ \t]*$/) print ENVIRON["B"]; else { gsub(/@LISTEN@/, ENVIRON["L"]); print } }' \
  "$here/nginx.conf" > "$work/nginx.conf"
"$NGINX" -p "$work" -c "$work/nginx.conf" -e "$work/logs/error.log" -g "daemon off;" &
pids+=($!)
sleep 0.3
if ! kill -0 "${pids[-1]}" 2>/dev/null; then
  echo "run.sh: nginx did not start:" >&2
  cat "$work/logs/error.log" >&2 || true
  exit 1
fi
echo "run.sh: ready: ws://127.0.0.1:$PORT/v1/realtime -> backends $BACKEND_PORTS (logs in $work/logs)"
wait -n "${pids[@]}" || true
echo "run.sh: a process ended; stopping" >&2

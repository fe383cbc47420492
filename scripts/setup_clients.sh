#!/usr/bin/env bash
# A separate virtualenv (.venv-clients, git-ignored) with the third-party OpenAI Realtime
# clients that tests/test_serve_clients.py runs against `omniframe serve`: Pipecat's
# OpenAIRealtimeLLMService and LiveKit's openai.realtime.RealtimeModel. They live apart from
# the main environment because pipecat-ai pins older soundfile/protobuf than omniframe uses.
# Quick and idempotent: a venv that already holds these pins is left as it is.
#
#   bash scripts/setup_clients.sh            # makes or checks .venv-clients
#   OMNIFRAME_CLIENTS_VENV=/tmp/v bash scripts/setup_clients.sh
#
# Pipecat is required (exit 1 when it does not install or import); LiveKit is optional (a
# warning, and its tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${OMNIFRAME_CLIENTS_VENV:-.venv-clients}

PIPECAT="pipecat-ai[openai]==1.14.0"
LIVEKIT=("livekit-agents==1.8.9" "livekit-plugins-openai==1.8.9")
STAMP="$VENV/.omniframe-clients"
WANT="$PIPECAT ${LIVEKIT[*]}"

pipecat_ok() {
  "$VENV/bin/python" -c "import pipecat.services.openai.realtime.llm" >/dev/null 2>&1
}
livekit_ok() {
  "$VENV/bin/python" -c "import livekit.plugins.openai.realtime" >/dev/null 2>&1
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && pipecat_ok; then
  echo "setup-clients: $VENV is up to date ($WANT)"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup-clients: creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "setup-clients: installing $PIPECAT into $VENV"
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$PIPECAT" || ! pipecat_ok; then
  echo "setup-clients: pipecat-ai did not install or import in $VENV" >&2
  exit 1
fi
echo "setup-clients: installing ${LIVEKIT[*]} into $VENV"
if "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${LIVEKIT[@]}" && livekit_ok; then
  echo "$WANT" > "$STAMP"
else
  echo "setup-clients: LiveKit did not install or import; its client tests will skip" >&2
  echo "$PIPECAT" > "$STAMP"
fi
echo "setup-clients: done in $(( $(date +%s) - start ))s"

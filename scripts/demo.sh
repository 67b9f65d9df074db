#!/usr/bin/env bash
# The main job, end to end on this machine:
#   1. set up .venv (scripts/setup.sh)
#   2. the quick key-value experiment: trains m_A and m_B from scratch, fits the bridges through
#      the Ray Train job (embedded Ray), evaluates, and writes the default pair to assets/kv_pair/
#      (skipped stage by stage when already there)
#   3. serves the composed pair over HTTP (configs/serve_tiny.yaml, 127.0.0.1:8000), asks it one
#      question with curl, and shuts the server down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m experiments.kv_arithmetic --config experiments/kv_arithmetic/configs/kv_quick.yaml

echo; echo "=== serving the composed model on http://127.0.0.1:8000 (configs/serve_tiny.yaml)"
python -m jobs.serve --config configs/serve_tiny.yaml > /tmp/calm-ray-serve.log 2>&1 &
server=$!
stop_server() {  # Ctrl-C for the server (it removes its app and its embedded Ray); force after 30 s
  kill -INT $server 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 $server 2>/dev/null || return 0; sleep 1; done
  kill -KILL $server 2>/dev/null; .venv/bin/ray stop --force > /dev/null 2>&1 || true
}
trap stop_server EXIT
deadline=$((SECONDS + 240))
until curl -sf http://127.0.0.1:8000/health > /dev/null; do
  if [ $SECONDS -gt $deadline ] || ! kill -0 $server 2>/dev/null; then
    echo "server did not come up; log:"; tail -30 /tmp/calm-ray-serve.log; exit 1
  fi
  sleep 2
done
prompt=$(python -c "import json; print(json.loads(open('assets/kv_pair/data/eval_kvar.jsonl').readline())['prompt'])")
echo "POST /v1/completions  prompt: $prompt"
curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
  -d "{\"model\": \"calm-kv\", \"prompt\": \"$prompt\", \"max_tokens\": 4, \"temperature\": 0}"
echo

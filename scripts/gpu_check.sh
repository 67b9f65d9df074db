#!/usr/bin/env bash
# The project's GPU checks, for a lent GPU machine (docs: ../shared/docs/gpu-checks.md). Each part is
# one device call of a few minutes; logs and JSON go to $OUT (default ./gpu_out), a table is printed last.
#
#   bash scripts/gpu_check.sh kv     # key-value bridges on CUDA: 8 seeds of experiments.kv_arithmetic.trial at once, no
#                                    # restarts, loss per 100 steps -> how often and when runs leave the plateau.
#                                    # Needs a trained pair in .gpu/kv_pair (anchor/, augment/, data/keys.json,
#                                    # data/tokenizer: copy them from a experiments.kv_arithmetic output; carry ".gpu")
#   bash scripts/gpu_check.sh serve  # benchmarks/serve_bench.py on CUDA, bf16, the "large" shape; needs Ray
#                                    # from ../shared/tools/gpu-ray-bundle.sh (carry ".raybundle")
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
case "${1:-}" in
kv)
    pair=${KV_PAIR:-.gpu/kv_pair}
    steps=${KV_STEPS:-5000}
    run() {  # lr seed: every run's progress lines go into one log (the device returns at most 8 files)
        python -m experiments.kv_arithmetic.trial --pair "$pair" --device cuda --threads 1 --steps "$steps" --lr "$1" --seed "$2" \
            --eval-examples 500 --out "$OUT/kv_sweep.jsonl" 2>&1 | grep --line-buffered -E "step|exact|rror" | \
            sed -u "s/^/lr $1 seed $2: /" >> "$OUT/kv_sweep.log"
    }
    # 16 processes on one H100 ran at 0.09 s/step each (2026-11-27; a CPU core runs 0.12): 5000 steps did
    # not fit a 7-minute call; tiny models are launch-bound, so use KV_STEPS or fewer seeds to fit
    for seed in 0 1 2 3 4 5 6 7; do run "${KV_LR:-1e-2}" "$seed" & done
    wait
    python - "$OUT/kv_sweep.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'lr':>6} {'seed':>4} {'final loss':>10} {'held-out':>8} {'numeric':>7} {'seen':>6}  first step below 1.0")
for r in sorted(rows, key=lambda r: (r["lr"], r["seed"])):
    a = r["accuracy"]
    below = next((100 * (i + 1) for i, l in enumerate(r["loss_per_100_steps"]) if l < 1.0), None)
    print(f"{r['lr']:>6} {r['seed']:>4} {r['final_loss']:>10.3f} {100*a['kvar_heldout']:>8.1f} {100*a['num']:>7.1f} "
          f"{100*a['kvar_seen_keys']:>6.1f}  {below}")
PY
    ;;
serve)
    python benchmarks/serve_bench.py --device cuda --dtype bfloat16 --size large --clients 1,4,16 \
        --max-tokens 64 --requests 32 --out "$OUT/serve_bench_gpu.json" 2>&1 | tee "$OUT/serve_bench.log" | \
        grep -v -E "^\(|INFO" | tail -40
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh kv|serve" >&2
    exit 2
    ;;
esac

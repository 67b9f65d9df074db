"""Try one bridge setting on a trained key-value pair, in process (no Ray): train, evaluate, print, write JSON.

The full experiment (``experiments.kv_arithmetic``) spends most of its hour on the base models and the
ablations; choosing the bridge only needs its compose stage. This runs that stage with the same
training loop (``experiments.common.train`` -> ``BridgeTrainer``) on a pair the experiment already trained,
and evaluates KV-arithmetic on held-out keys, numeric arithmetic, and KV-arithmetic on new
expressions over the composition keys::

    python -m experiments.kv_arithmetic.trial --pair runs/kv_full --lr 1e-2 --weight-decay 0.5 --seed 1
    python -m experiments.kv_arithmetic.trial --pair runs/kv_full --extra-keys 1000   # 1000 more composition keys

``--data-seed`` must be the experiment's ``seed`` that built the pair for the rows to match its run.
``--extra-keys N`` moves N held-out keys into the composition data and evaluates on the remaining
held-out keys (more composition keys without retraining m_A). One run is one seed: compare settings
over several seeds, since when the bridge leaves its loss plateau varies from run to run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from composition import ComposedModel, CompositionConfig, load_causal_lm
from composition.training import TrainSettings
from experiments.common import encode_rows, train, warmup
from experiments.kv_arithmetic.data import KVWorld
from experiments.kv_arithmetic.lib import exact_match

DEFAULT_COMPOSITION = "{mappings: [{pairs: [[0, 0]]}], window: 1, proj_hidden: 256, gate: retrieved}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.kv_arithmetic.trial", description=__doc__.split("\n")[0])
    p.add_argument("--pair", required=True, help="an output folder of experiments.kv_arithmetic (anchor/, augment/, data/)")
    p.add_argument("--composition", default=DEFAULT_COMPOSITION, help="CompositionConfig as YAML or JSON")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (warmup, cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="bridge initialisation and data order")
    p.add_argument("--extra-keys", type=int, default=0, help="held-out keys moved into the composition data")
    p.add_argument("--examples", type=int, default=50_000, help="composition examples")
    p.add_argument("--anchor-task-fraction", type=float, default=0.3, help="share of numeric (m_B's task) examples")
    p.add_argument("--compose-min-terms", type=int, default=None,
                   help="shortest KV-arithmetic expression in the composition data (default: the pair's, 3)")
    p.add_argument("--compose-max-terms", type=int, default=None,
                   help="longest KV-arithmetic expression in the composition data (default: the pair's, 6)")
    p.add_argument("--eval-examples", type=int, default=500)
    p.add_argument("--data-seed", type=int, default=0,
                   help="the experiment's 'seed' that built the pair (0 in the shipped configs): same rows as its run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two trials fit on two cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", help="append the result as one JSON line to this file")
    return p


def checked(p: argparse.ArgumentParser, args) -> tuple[KVWorld, CompositionConfig, TrainSettings]:
    """The pair's keys, the composition and the training settings, every argument checked before any model is
    loaded (``p.error`` names the one that is wrong)."""
    pair = Path(args.pair)
    for part in ("anchor", "augment", "data/keys.json", "data/tokenizer"):
        if not (pair / part).exists():
            p.error(f"{pair / part} does not exist: --pair takes a folder written by experiments.kv_arithmetic")
    world = KVWorld.load(pair / "data")
    lo = args.compose_min_terms if args.compose_min_terms is not None else world.settings.min_terms
    hi = args.compose_max_terms if args.compose_max_terms is not None else world.settings.max_terms
    if not 1 <= lo <= hi <= world.settings.max_terms:
        p.error(f"--compose-min-terms {lo} and --compose-max-terms {hi} must satisfy 1 <= min <= max <= "
                f"{world.settings.max_terms} (the pair's longest expression)")
    if not 0 <= args.extra_keys < len(world.heldout_keys):
        p.error(f"--extra-keys must be in [0, {len(world.heldout_keys)}) (the held-out keys), got {args.extra_keys}")
    try:
        composition = CompositionConfig.from_dict(yaml.safe_load(args.composition))
    except (ValueError, TypeError, yaml.YAMLError) as e:
        p.error(f"--composition: {e}")
    try:
        settings = TrainSettings(lr=args.lr, steps=args.steps, warmup_steps=warmup(args.steps),
                                 weight_decay=args.weight_decay)
    except ValueError as e:
        p.error(str(e).replace("weight_decay", "--weight-decay"))
    return world, composition, settings


def accuracies(model, tok, world: KVWorld, args, compose_keys: list[str], eval_keys: list[str]) -> dict:
    """Exact match on KV-arithmetic over held-out keys, numeric arithmetic, and KV-arithmetic on new expressions
    over the composition keys (how much of the held-out gap is memorising)."""
    n, seed, device = args.eval_examples, args.data_seed, args.device
    return {
        "kvar_heldout": exact_match(model, tok, world.evaluation_examples("kvar", n, seed, eval_keys),
                                    label="held-out keys", device=device),
        "num": exact_match(model, tok, world.evaluation_examples("num", n, seed), label="numeric", device=device),
        "kvar_seen_keys": exact_match(model, tok, world.evaluation_examples("kvar", n, seed + 1, compose_keys),
                                      label="seen keys", device=device),
    }


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    world, composition, settings = checked(p, args)
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    pair = Path(args.pair)
    tok = AutoTokenizer.from_pretrained(pair / "data" / "tokenizer")
    compose_keys = world.compose_keys + world.heldout_keys[: args.extra_keys]
    eval_keys = world.heldout_keys[args.extra_keys:]
    rows = world.composition_examples(args.examples, args.anchor_task_fraction, args.data_seed, compose_keys,
                                      args.compose_min_terms, args.compose_max_terms)
    torch.manual_seed(args.seed)
    model = ComposedModel(load_causal_lm(str(pair / "anchor"), device=args.device),
                          [load_causal_lm(str(pair / "augment"), device=args.device)], composition)
    print(f"[trial] {model.num_bridge_parameters():,} bridge parameters; {len(compose_keys)} composition keys, "
          f"{len(eval_keys)} evaluation keys", flush=True)
    start = time.monotonic()
    history = train(model, encode_rows(tok, rows), settings, args.batch_size, tok.pad_token_id, args.seed,
                    label="trial", log_every=100, device=args.device)
    train_s = time.monotonic() - start
    accuracy = accuracies(model, tok, world, args, compose_keys, eval_keys)
    tail = history[-100:]
    result = {"pair": str(pair), "composition": composition.to_dict(), "steps": args.steps, "lr": args.lr,
              "weight_decay": args.weight_decay, "batch_size": args.batch_size, "seed": args.seed,
              "composition_keys": len(compose_keys), "compose_min_terms": args.compose_min_terms,
              "compose_max_terms": args.compose_max_terms,
              "device": args.device,
              # mean loss per 100 steps: when (and whether) the bridges left the plateau
              "loss_per_100_steps": [round(sum(m["loss"] for m in history[i:i + 100]) / len(history[i:i + 100]), 4)
                                     for i in range(0, len(history), 100)],
              "final_loss": sum(m["loss"] for m in tail) / len(tail),
              "accuracy": accuracy, "train_s": round(train_s, 1)}
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

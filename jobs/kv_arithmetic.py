"""The CALM key-value experiment, end to end: ``python -m jobs.kv_arithmetic --config configs/kv_quick.yaml``.

Stages (each resumable: a finished stage is skipped, an interrupted one continues from its
last checkpoint):

1. data     keys, values, splits and the shared word-level tokenizer (jobs/kv_data.py)
2. augment  m_A trained from scratch on KV-substitution over all keys
3. anchor   m_B trained from scratch on numeric arithmetic
4. compose  bridges (m_A, m_B frozen) on KV-arithmetic over the composition keys, plus anchor-task
            examples, through the Ray Train job (jobs/train.py: the project's one training loop)
5. ablation bridges onto a randomly initialised m_A, same job and data (optional)
6. evaluate exact match with greedy decoding; KV tasks only on held-out keys
7. report   results JSON + Markdown table

The trained pair (anchor, augment, bridges, data) is written under ``output``; the project's
default pair lives in assets/kv_pair/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from composition.checkpoint import atomic_folder
from composition.training import TrainSettings
from jobs.kv_data import KVSettings, KVWorld, build_tokenizer, read_jsonl, write_jsonl
from jobs.kv_lib import PlainLM, encode_rows, exact_match, llama, train


@dataclass
class ModelSpec:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    steps: int = 1500
    lr: float = 3e-3
    batch_size: int = 256
    examples: int = 200_000


@dataclass
class ExperimentConfig:
    output: str = "assets/kv_pair"
    results: str = "results/kv_arithmetic.json"
    keys: KVSettings = field(default_factory=KVSettings)
    augment: ModelSpec = field(default_factory=ModelSpec)
    anchor: ModelSpec = field(default_factory=ModelSpec)
    compose_examples: int = 50_000
    anchor_task_fraction: float = 0.3
    compose_steps: int = 1000
    compose_batch_size: int = 128
    compose_lr: float = 2e-3
    composition: dict = field(default_factory=lambda: {"mappings": [{"pairs": [[0, 0]]}], "window": 1})
    random_augment_ablation: bool = True
    eval_examples: int = 500
    seed: int = 0
    ray_workers: int = 1

    @classmethod
    def load(cls, path: str) -> "ExperimentConfig":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SystemExit(f"error: {path}: unknown keys {unknown}; valid keys are {sorted(known)}")
        if "keys" in raw:
            raw["keys"] = KVSettings(**raw["keys"])
        for k in ("augment", "anchor"):
            if k in raw:
                raw[k] = ModelSpec(**raw[k])
        return cls(**raw)


def _stage(name: str, done: bool) -> bool:
    print(f"\n=== stage {name}: {'already done, skipped' if done else 'running'}", flush=True)
    return not done


def _train_base(spec: ModelSpec, rows, tok, folder: Path, label: str, seed: int, random_only: bool = False):
    """Train (or, with random_only, just initialise) a Llama from scratch and save it as an HF folder."""
    model = llama(len(tok), spec.hidden, spec.layers, spec.heads, seed, tok.pad_token_id, tok.eos_token_id,
                  tok.bos_token_id)
    history = []
    if not random_only:
        ckpt = folder.with_name(folder.name + ".ckpt")
        settings = TrainSettings(lr=spec.lr, steps=spec.steps, warmup_steps=min(100, spec.steps // 10),
                                 weight_decay=0.1)
        history = train(PlainLM(model), encode_rows(tok, rows), settings, spec.batch_size, tok.pad_token_id, seed,
                        checkpoint=ckpt, label=label)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "train_history.json").write_text(json.dumps([{k: m[k] for k in ("step", "loss")} for m in history]))
    return model


def _compose(cfg: ExperimentConfig, out: Path, augment: Path, bridges: Path, name: str) -> dict:
    from jobs.train import run

    train_config = {
        "name": name,
        "anchor": str(out / "anchor"),
        "augments": [str(augment)],
        "composition": cfg.composition,
        "data": {"train": str(out / "data" / "compose_train.jsonl"), "format": "prompt_completion",
                 "prompt_field": "prompt", "completion_field": "completion", "max_length": 24},
        "training": {"steps": cfg.compose_steps, "batch_size": cfg.compose_batch_size, "lr": cfg.compose_lr,
                     "warmup_steps": min(50, cfg.compose_steps // 10), "checkpoint_every": 100,
                     "seed": cfg.seed, "log_every": 25},
        "ray": {"num_workers": cfg.ray_workers, "cpus_per_worker": 0.5, "augment_actors": 1,
                "cpus_per_augment_actor": 0.5},
        "storage_path": str((out / "runs").resolve()),
        "output": str(bridges.resolve()),
    }
    result = run(train_config)
    return {"wall_s": result.wall_s, "history": [{"step": h.get("step"), "loss": h.get("loss")}
                                                  for h in result.history]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.kv_arithmetic", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/kv_quick.yaml")
    args = parser.parse_args(argv)
    cfg = ExperimentConfig.load(args.config)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(cfg.output)
    started = time.monotonic()
    data = out / "data"
    timings: dict = {}

    # 1. data
    if _stage("data", (data / "keys.json").is_file()):
        world = KVWorld.create(cfg.keys)
        tok = build_tokenizer(world)
        n_anchor_task = int(cfg.compose_examples * cfg.anchor_task_fraction)
        compose = (world.examples("kvar", cfg.compose_examples - n_anchor_task, cfg.seed + 3, world.compose_keys)
                   + world.examples("num", n_anchor_task, cfg.seed + 4))
        write_jsonl(world.examples("sub", cfg.augment.examples, cfg.seed + 1, list(world.values)), data / "augment_train.jsonl")
        write_jsonl(world.examples("num", cfg.anchor.examples, cfg.seed + 2), data / "anchor_train.jsonl")
        write_jsonl(compose, data / "compose_train.jsonl")
        for task in ("sub", "num", "kvar"):
            keys = world.heldout_keys if task != "num" else None
            write_jsonl(world.examples(task, cfg.eval_examples, cfg.seed + 10, keys), data / f"eval_{task}.jsonl")
        world.save(data)
        tok.save_pretrained(data / "tokenizer")
    world = KVWorld.load(data)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    compose_keys = set(world.compose_keys)
    assert not compose_keys & set(world.heldout_keys), "composition and held-out keys overlap"

    # 2-3. the two models, from scratch
    for role, spec, task_file in (("augment", cfg.augment, "augment_train.jsonl"), ("anchor", cfg.anchor, "anchor_train.jsonl")):
        if _stage(role, (out / role / "config.json").is_file()):
            t0 = time.monotonic()
            _train_base(spec, read_jsonl(data / task_file), tok, out / role, role, cfg.seed + (1 if role == "anchor" else 0))
            timings[role] = time.monotonic() - t0

    # 4-5. composition through the Ray Train job
    compose_info = {}
    if _stage("compose", (out / "bridges" / "bridges.safetensors").is_file()):
        compose_info["calm"] = _compose(cfg, out, out / "augment", out / "bridges", "kv_compose")
    if cfg.random_augment_ablation:
        if _stage("ablation-random-augment", (out / "ablation_random" / "bridges" / "bridges.safetensors").is_file()):
            spec = cfg.augment
            _train_base(spec, [], tok, out / "ablation_random" / "augment", "random", cfg.seed + 7, random_only=True)
            compose_info["random_augment"] = _compose(cfg, out, out / "ablation_random" / "augment",
                                                      out / "ablation_random" / "bridges", "kv_compose_random")

    # 6. evaluation
    _stage("evaluate", False)
    from composition import ComposedModel, load_causal_lm

    anchor = load_causal_lm(str(out / "anchor"))
    augment = load_causal_lm(str(out / "augment"))
    evals = {task: read_jsonl(data / f"eval_{task}.jsonl") for task in ("sub", "num", "kvar")}
    assert all(t in set(world.heldout_keys) for r in evals["kvar"] for t in r["prompt"].split() if t.isalpha())
    systems = {"m_A": PlainLM(augment), "m_B": PlainLM(anchor),
               "CALM": ComposedModel.from_pretrained(out / "bridges", anchor, [augment])}
    if cfg.random_augment_ablation:
        systems["CALM (random m_A)"] = ComposedModel.from_pretrained(
            out / "ablation_random" / "bridges", anchor, [load_causal_lm(str(out / "ablation_random" / "augment"))])
    accuracy = {name: {task: exact_match(m, tok, rows, label=f"{name}/{task}") for task, rows in evals.items()}
                for name, m in systems.items()}

    # 7. report
    results = {
        "config": asdict(cfg),
        "accuracy_percent": {n: {t: round(100 * a, 1) for t, a in d.items()} for n, d in accuracy.items()},
        "data": {"keys": len(world.values), "compose_keys": len(world.compose_keys),
                 "heldout_keys": len(world.heldout_keys), "eval_examples_per_task": cfg.eval_examples,
                 "compose_examples": cfg.compose_examples},
        "parameters": {"anchor": sum(p.numel() for p in anchor.parameters()),
                       "augment": sum(p.numel() for p in augment.parameters()),
                       "bridges": systems["CALM"].num_bridge_parameters()},
        "compose": compose_info,
        "stage_seconds": timings,
        "wall_seconds_this_run": round(time.monotonic() - started, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    path = Path(cfg.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| system | KV-substitution | numeric arithmetic | KV-arithmetic (held-out keys) |\n|---|---|---|---|")
    for name, d in results["accuracy_percent"].items():
        print(f"| {name} | {d['sub']} | {d['num']} | {d['kvar']} |")
    print(f"\nresults written to {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

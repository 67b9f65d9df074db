"""The CALM key-value experiment, end to end: ``python -m experiments.kv_arithmetic --config experiments/kv_arithmetic/configs/kv_quick.yaml``.

Stages (each resumable: a finished stage is skipped, an interrupted one continues from its
last checkpoint; what each stage measured is kept in ``<output>/stages.json``):

1. data       keys, values, splits and the shared word-level tokenizer (experiments/kv_arithmetic/data.py)
2. augment    m_A trained from scratch on KV-substitution over all keys
3. anchor     m_B trained from scratch on numeric arithmetic
4. compose    bridges (m_A, m_B frozen) on KV-arithmetic over the composition keys, plus anchor-task
              examples, through the Ray Train job (jobs/train.py: the project's one training loop)
5. ablations  (a) the same bridges onto a randomly initialised m_A, same job and data;
              (b) LoRA on m_B (peft) with about as many trainable parameters, same data and steps
6. evaluate   exact match with greedy decoding; KV tasks only on held-out keys (cached per model)
7. report     results JSON, a Markdown table and a PNG of the training curves and accuracies

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
from pathlib import Path

import torch
from pydantic import Field, model_validator

from actors.config import StrictModel, load_yaml, parse
from composition.checkpoint import atomic_file, atomic_folder, files_signature
from composition.config import ConfigError
from composition.training import TrainSettings
from experiments.kv_arithmetic.data import KVSettings, KVWorld, build_tokenizer, read_jsonl, write_jsonl
from experiments.common import StageLog, lora_model, weights_fingerprint
from experiments.kv_arithmetic.lib import PlainLM, compose_warmup, encode_rows, exact_match, fmt_time, llama, train

STAGES = ("data", "augment", "anchor", "compose", "ablations", "evaluate")
TASKS = ("sub", "num", "kvar")
TASK_NAMES = {"sub": "KV-substitution", "num": "numeric arithmetic", "kvar": "KV-arithmetic (held-out keys)"}
PAPER = {"m_A": {"sub": 98.1, "num": 4.2, "kvar": 0.7}, "m_B": {"sub": 0.0, "num": 73.7, "kvar": 0.0},
         "CALM": {"sub": 92.9, "num": 72.0, "kvar": 84.3}}  # Bansal et al. 2024, Table 1


class ModelSpec(StrictModel):
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    steps: int = 1500
    lr: float = 3e-3
    batch_size: int = 256
    examples: int = 200_000
    weight_decay: float = 0.1


class ExperimentConfig(StrictModel):
    output: str = "assets/kv_pair"
    results: str = "results/kv_arithmetic.json"
    keys: KVSettings = Field(default_factory=KVSettings)
    augment: ModelSpec = Field(default_factory=ModelSpec)
    anchor: ModelSpec = Field(default_factory=ModelSpec)
    # m_B's numeric training expressions: anchor_min_terms to keys.max_terms terms (None: keys.min_terms, as
    # evaluated). Shorter expressions let the composition data hold short KV-arithmetic expressions too, whose
    # answers depend on one or two keys (experiments/kv_arithmetic/README.md, sixth session)
    anchor_min_terms: int | None = None
    compose_examples: int = 50_000
    anchor_task_fraction: float = 0.3
    compose_steps: int = 1000
    compose_batch_size: int = 128
    compose_lr: float = 2e-3
    compose_weight_decay: float = 0.0
    # the composition data's KV-arithmetic expressions: from compose_min_terms to compose_max_terms terms
    # (None: the keys' min_terms / max_terms, the evaluation's)
    compose_min_terms: int | None = None
    compose_max_terms: int | None = None
    # a first phase of compose_first_steps (of compose_steps) on expressions of compose_first_min_terms to
    # compose_first_max_terms terms, from random bridges; the rest on the composition data above, from the
    # first phase's bridges
    compose_first_steps: int = 0
    compose_first_min_terms: int | None = None
    compose_first_max_terms: int | None = None
    composition: dict = Field(default_factory=lambda: {"mappings": [{"pairs": [[0, 0]]}], "window": 1,
                                                       "proj_hidden": 256})
    random_augment_ablation: bool = True
    lora_ablation: bool = True
    lora_lr: float = 2e-3
    eval_examples: int = 500
    seed: int = 0
    ray_workers: int = 1

    @model_validator(mode="after")
    def _term_ranges(self):
        for key in ("anchor_min_terms", "compose_min_terms", "compose_max_terms", "compose_first_min_terms",
                    "compose_first_max_terms"):
            value = getattr(self, key)
            if value is not None and not 1 <= value <= self.keys.max_terms:
                raise ValueError(f"{key} must be an integer from 1 to keys.max_terms ({self.keys.max_terms}), "
                                 f"or null; got {value!r}")
        for prefix in ("compose", "compose_first"):
            low, high = getattr(self, f"{prefix}_min_terms"), getattr(self, f"{prefix}_max_terms")
            if low is not None and high is not None and low > high:
                raise ValueError(f"{prefix}_min_terms ({low}) is above {prefix}_max_terms ({high})")
        if self.compose_first_steps and not (0 < self.compose_first_steps < self.compose_steps
                                             and self.compose_first_min_terms):
            raise ValueError(f"compose_first_steps ({self.compose_first_steps}) must be below compose_steps "
                             f"({self.compose_steps}) and needs compose_first_min_terms; or set it to 0")
        return self

    @classmethod
    def load(cls, path: str) -> "ExperimentConfig":
        """The checked config (the project's config system, ``actors.config``); exits naming every problem."""
        try:
            return parse(cls, load_yaml(path))
        except ConfigError as e:
            raise SystemExit(f"error: {path}: {e}") from None


def _history(metrics: list[dict]) -> list[dict]:
    """Per step: the step, the steps run over both phases (set by the caller for the second), the loss."""
    return [{"step": m.get("step"), "steps_run": m.get("steps_run", m.get("step")),
             "loss": round(float(m.get("loss")), 5)} for m in metrics if m.get("loss") is not None]


def _train_base(spec: ModelSpec, rows, tok, folder: Path, label: str, seed: int, random_only: bool = False) -> list:
    """Train (or, with random_only, just initialise) a Llama from scratch and save it as an HF folder."""
    model = llama(len(tok), spec.hidden, spec.layers, spec.heads, seed, tok.pad_token_id, tok.eos_token_id,
                  tok.bos_token_id)
    history = []
    if not random_only:
        ckpt = folder.with_name(folder.name + ".ckpt")
        settings = TrainSettings(lr=spec.lr, steps=spec.steps, warmup_steps=min(100, spec.steps // 10),
                                 weight_decay=spec.weight_decay)
        history = _history(train(PlainLM(model), encode_rows(tok, rows), settings, spec.batch_size, tok.pad_token_id,
                                 seed, checkpoint=ckpt, label=label))
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return history


def _compose(cfg: ExperimentConfig, out: Path, augment: Path, bridges: Path, name: str) -> list[dict]:
    """Train the bridges through the Ray Train job; returns the per-step history.

    With ``compose_first_steps``, two jobs: the first on the ``compose_first.jsonl`` data from random
    bridges, the second on the composition data from the first's bridges
    (``init_bridges``) for the rest of ``compose_steps``; each resumes on its own.
    """
    from actors.train.pipeline import run

    def job(job_name: str, data_file: str, steps: int, output: Path, init: Path | None) -> list[dict]:
        train_config = {
            "name": job_name,
            "anchor": str(out / "anchor"),
            "augments": [str(augment)],
            "composition": cfg.composition,
            "data": {"train": str(out / "data" / data_file), "format": "prompt_completion",
                     "prompt_field": "prompt", "completion_field": "completion",
                     "max_length": 2 * cfg.keys.max_terms + 2},  # n keys, n - 1 ops, "=", result, eos
            "training": {"steps": steps, "batch_size": cfg.compose_batch_size, "lr": cfg.compose_lr,
                         "weight_decay": cfg.compose_weight_decay,
                         "warmup_steps": compose_warmup(steps), "checkpoint_every": 100,
                         "seed": cfg.seed, "log_every": 25},
            "ray": {"num_workers": cfg.ray_workers, "cpus_per_worker": 0.5, "augment_actors": 1,
                    "cpus_per_augment_actor": 0.5},
            "storage_path": str((out / "runs").resolve()),
            "output": str(output.resolve()),
        }
        if init is not None:
            train_config["init_bridges"] = str(init.resolve())
        return _history(run(train_config).history)

    if not cfg.compose_first_steps:
        return job(name, "compose_train.jsonl", cfg.compose_steps, bridges, None)
    first = bridges.with_name(bridges.name + "_first")
    history = []
    if not (first / "bridges.safetensors").is_file():
        print(f"[compose] first phase: {cfg.compose_first_steps} steps on {cfg.compose_first_min_terms}-"
              f"{cfg.compose_first_max_terms or cfg.keys.max_terms}-term expressions", flush=True)
        history = job(name + "_first", "compose_first.jsonl", cfg.compose_first_steps, first, None)
    offset = history[-1]["steps_run"] if history else 0
    rest = job(name, "compose_train.jsonl", cfg.compose_steps - cfg.compose_first_steps, bridges, first)
    return history + [{**h, "phase": 2, "steps_run": h["steps_run"] + offset} for h in rest]




def _lora_rank(anchor_folder: Path, budget: int) -> tuple[int, int]:
    """The LoRA rank whose trainable parameter count is closest to ``budget``; (rank, parameters)."""
    from composition import load_causal_lm

    per_rank = sum(p.numel() for p in lora_model(load_causal_lm(str(anchor_folder)), 1).parameters() if p.requires_grad)
    rank = max(1, round(budget / per_rank))
    return rank, rank * per_rank


def _lora(cfg: ExperimentConfig, out: Path, tok, bridge_params: int) -> dict:
    """LoRA on m_B with about the bridges' parameter count, on the composition data, the same loop."""
    from composition import load_causal_lm

    rank, params = _lora_rank(out / "anchor", bridge_params)
    print(f"[lora] rank {rank}: {params:,} trainable parameters (bridges: {bridge_params:,})", flush=True)
    model = lora_model(load_causal_lm(str(out / "anchor")), rank)
    # the bridges' data schedule: the first phase's data first, if any
    phases = [("compose_train.jsonl", cfg.compose_steps, "ablation_lora.ckpt")]
    if cfg.compose_first_steps:
        phases = [("compose_first.jsonl", cfg.compose_first_steps, "ablation_lora_first.ckpt"),
                  ("compose_train.jsonl", cfg.compose_steps - cfg.compose_first_steps, "ablation_lora.ckpt")]
    history = []
    for data_file, steps, ckpt in phases:
        settings = TrainSettings(lr=cfg.lora_lr, steps=steps, warmup_steps=compose_warmup(steps),
                                 weight_decay=cfg.compose_weight_decay)
        rows = read_jsonl(out / "data" / data_file)
        offset = len(history)
        history += [{**h, "steps_run": h["step"] + offset}
                    for h in train(PlainLM(model), encode_rows(tok, rows), settings, cfg.compose_batch_size,
                                   tok.pad_token_id, cfg.seed, checkpoint=out / ckpt, label="lora")]
    with atomic_folder(out / "ablation_lora") as tmp:
        model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
    return {"history": _history(history), "rank": rank, "parameters": params}




def _systems(cfg: ExperimentConfig, out: Path) -> dict:
    """name -> (folders whose weights define it, loader)."""
    from composition import ComposedModel, load_causal_lm

    def calm(augment: Path, bridges: Path):
        return lambda: ComposedModel.from_pretrained(bridges, load_causal_lm(str(out / "anchor")),
                                                     [load_causal_lm(str(augment))])

    def lora():
        from peft import PeftModel

        return PlainLM(PeftModel.from_pretrained(load_causal_lm(str(out / "anchor")), str(out / "ablation_lora")))

    systems = {
        "m_A": ([out / "augment"], lambda: PlainLM(load_causal_lm(str(out / "augment")))),
        "m_B": ([out / "anchor"], lambda: PlainLM(load_causal_lm(str(out / "anchor")))),
        "CALM": ([out / "anchor", out / "augment", out / "bridges"], calm(out / "augment", out / "bridges")),
    }
    if cfg.random_augment_ablation:
        rnd = out / "ablation_random"
        systems["CALM, random m_A"] = ([out / "anchor", rnd / "augment", rnd / "bridges"],
                                       calm(rnd / "augment", rnd / "bridges"))
    if cfg.lora_ablation:
        systems["LoRA on m_B"] = ([out / "anchor", out / "ablation_lora"], lora)
    return systems


def _evaluate(cfg: ExperimentConfig, out: Path, tok, world: KVWorld, log: StageLog) -> dict:
    """Accuracy per system and task; a system whose weights and eval data did not change is not re-run."""
    evals = {task: read_jsonl(out / "data" / f"eval_{task}.jsonl") for task in TASKS}
    heldout = set(world.heldout_keys)
    for task in ("sub", "kvar"):  # the KV tasks see only keys that no composition example used
        bad = [t for r in evals[task] for t in r["prompt"].split() if t in world.values and t not in heldout]
        if bad:
            raise RuntimeError(f"eval_{task}.jsonl uses composition keys {bad[:5]}: delete {out / 'data'} and rerun")
    data_print = files_signature((out / "data").glob("eval_*.jsonl"))
    cached = log.records.get("evaluate", {})
    accuracy = {}
    for name, (folders, load) in _systems(cfg, out).items():
        stamp = [weights_fingerprint(f) for f in folders] + [data_print]
        if cached.get(name, {}).get("fingerprint") == json.loads(json.dumps(stamp)):
            accuracy[name] = cached[name]["accuracy"]
            print(f"[eval] {name}: unchanged since the last evaluation, reusing {accuracy[name]}", flush=True)
            continue
        t0 = time.monotonic()
        model = load()
        accuracy[name] = {task: round(100 * exact_match(model, tok, rows, label=f"{name}/{task}"), 1)
                          for task, rows in evals.items()}
        print(f"[eval] {name}: {accuracy[name]} ({fmt_time(time.monotonic() - t0)})", flush=True)
        cached[name] = {"fingerprint": stamp, "accuracy": accuracy[name], "wall_s": round(time.monotonic() - t0, 1)}
        log.record("evaluate", cached)
    return accuracy


def markdown_table(accuracy: dict) -> str:
    lines = ["| system | " + " | ".join(TASK_NAMES[t] for t in TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for name, acc in accuracy.items():
        paper = PAPER.get(name)
        cells = [f"{acc[t]}" + (f" (paper {paper[t]})" if paper else "") for t in TASKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Training curves of every trained stage, and the accuracy table, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, table) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    for name, hist in results["training_curves"].items():
        if hist:
            steps = [h.get("steps_run", h["step"]) for h in hist]  # the second phase continues the line
            losses = [h["loss"] for h in hist]
            k = max(1, len(losses) // 100)  # moving average over ~1% of the run
            smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                      for i in range(len(losses))]
            curves.plot(steps, smooth, label=name)
    curves.set_yscale("log")
    curves.set_xlabel("steps run (both phases)")
    curves.set_ylabel("training loss (completion tokens)")
    curves.set_title("training curves")
    curves.legend()
    acc = results["accuracy_percent"]
    cells = [[n] + [f"{acc[n][t]}" + (f" ({PAPER[n][t]})" if n in PAPER else "") for t in TASKS] for n in acc]
    table.axis("off")
    headers = ["system"] + [TASK_NAMES[t].replace(" (", "\n(") for t in TASKS]  # two lines, not clipped
    tab = table.table(cellText=cells, colLabels=headers, loc="center", colWidths=[0.25, 0.23, 0.25, 0.27])
    tab.auto_set_font_size(False)
    tab.set_fontsize(9)
    tab.scale(1, 1.6)
    for (row, _), cell in tab.get_celld().items():
        if row == 0:
            cell.set_height(cell.get_height() * 1.8)
    table.set_title("exact match % (paper's Table 1 in parentheses)")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.kv_arithmetic", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/kv_arithmetic/configs/kv_quick.yaml")
    parser.add_argument("--stop-after", choices=STAGES, default=None,
                        help="stop after this stage (a later run resumes from the next one)")
    args = parser.parse_args(argv)
    cfg = ExperimentConfig.load(args.config)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(cfg.output)
    data = out / "data"
    log = StageLog(out, args.stop_after)

    # 1. data
    data_inputs = {"keys": cfg.keys, "augment_examples": cfg.augment.examples, "anchor_examples": cfg.anchor.examples,
                   "anchor_min_terms": cfg.anchor_min_terms, "eval_examples": cfg.eval_examples, "seed": cfg.seed}
    if log.begin("data", (data / "keys.json").is_file(), "data", data_inputs, data):
        t0 = time.monotonic()
        world = KVWorld.create(cfg.keys)
        tok = build_tokenizer(world)
        write_jsonl(world.examples("sub", cfg.augment.examples, cfg.seed + 1, list(world.values)),
                    data / "augment_train.jsonl")
        write_jsonl(world.examples("num", cfg.anchor.examples, cfg.seed + 2, min_terms=cfg.anchor_min_terms),
                    data / "anchor_train.jsonl")
        for task in TASKS:
            keys = world.heldout_keys if task != "num" else None
            rows = world.evaluation_examples(task, cfg.eval_examples, cfg.seed, keys)
            write_jsonl(rows, data / f"eval_{task}.jsonl")
        tok.save_pretrained(data / "tokenizer")
        world.save(data)  # written last: its presence marks the stage done
        log.record("data", {"wall_s": round(time.monotonic() - t0, 1)}, data_inputs)
    world = KVWorld.load(data)
    # the bridges' data: its own step, so a pair can be composed again with other composition data
    compose_file = data / "compose_train.jsonl"
    compose_inputs = {"compose_examples": cfg.compose_examples, "anchor_task_fraction": cfg.anchor_task_fraction,
                      "compose_min_terms": cfg.compose_min_terms, "compose_max_terms": cfg.compose_max_terms,
                      "compose_first_min_terms": cfg.compose_first_min_terms,
                      "compose_first_max_terms": cfg.compose_first_max_terms, "seed": cfg.seed}
    if log.begin("composition data", compose_file.is_file(), "compose_data", compose_inputs, compose_file):
        rows = world.composition_examples(cfg.compose_examples, cfg.anchor_task_fraction, cfg.seed,
                                          min_terms=cfg.compose_min_terms, max_terms=cfg.compose_max_terms)
        if cfg.compose_first_steps:
            write_jsonl(world.composition_examples(cfg.compose_examples, cfg.anchor_task_fraction, cfg.seed,
                                                   min_terms=cfg.compose_first_min_terms,
                                                   max_terms=cfg.compose_first_max_terms),
                        data / "compose_first.jsonl")
        write_jsonl(rows, compose_file)  # written last: its presence marks the step done
        log.record("compose_data", {"rows": len(rows)}, compose_inputs)
    if log.stop("data"):
        return 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    if set(world.compose_keys) & set(world.heldout_keys):
        raise RuntimeError(f"{data / 'keys.json'}: composition and held-out keys overlap; delete {data} and rerun")

    # 2-3. the two models, from scratch
    for role, spec, task_file in (("augment", cfg.augment, "augment_train.jsonl"),
                                  ("anchor", cfg.anchor, "anchor_train.jsonl")):
        # the anchor's recorded settings include its data's expression lengths (absent = the default, None)
        inputs = {**spec.model_dump(), "min_terms": cfg.anchor_min_terms} if role == "anchor" else spec
        if log.begin(role, (out / role / "config.json").is_file(), role, inputs, out / role):
            t0 = time.monotonic()
            history = _train_base(spec, read_jsonl(data / task_file), tok, out / role, role,
                                  cfg.seed + (1 if role == "anchor" else 0))
            log.record(role, {"wall_s": round(time.monotonic() - t0, 1), "history": history}, inputs)
        if log.stop(role):
            return 0

    # 4. composition through the Ray Train job
    compose_settings = {**compose_inputs, **{k: getattr(cfg, k) for k in (
        "compose_steps", "compose_first_steps", "compose_batch_size", "compose_lr", "compose_weight_decay",
        "composition",
        "ray_workers")}}
    # what to delete to compose again: the bridges of both phases and the Ray runs (a job resumes from those)
    compose_folders = f"{out / 'bridges'}, {out / 'bridges_first'} and {out / 'runs'}"
    if log.begin("compose", (out / "bridges" / "bridges.safetensors").is_file(), "compose", compose_settings,
                 compose_folders):
        t0 = time.monotonic()
        history = _compose(cfg, out, out / "augment", out / "bridges", "kv_compose")
        log.record("compose", {"wall_s": round(time.monotonic() - t0, 1), "history": history}, compose_settings)
    if log.stop("compose"):
        return 0
    from composition import ComposedModel, load_causal_lm

    bridge_params = ComposedModel.from_pretrained(out / "bridges", load_causal_lm(str(out / "anchor")),
                                                  [load_causal_lm(str(out / "augment"))]).num_bridge_parameters()

    # 5. ablations with the same parameter budget and data
    if cfg.random_augment_ablation:
        rnd = out / "ablation_random"
        if log.begin("ablation: CALM with a random m_A", (rnd / "bridges" / "bridges.safetensors").is_file(),
                     "ablation_random", compose_settings, f"{rnd} and {out / 'runs'}"):
            t0 = time.monotonic()
            _train_base(cfg.augment, [], tok, rnd / "augment", "random", cfg.seed + 7, random_only=True)
            history = _compose(cfg, out, rnd / "augment", rnd / "bridges", "kv_compose_random")
            log.record("ablation_random", {"wall_s": round(time.monotonic() - t0, 1), "history": history},
                       compose_settings)
    if cfg.lora_ablation:
        lora_settings = {**compose_inputs, **{k: getattr(cfg, k) for k in (
            "compose_steps", "compose_first_steps", "compose_batch_size", "lora_lr", "compose_weight_decay")},
            "bridge_params": bridge_params}
        if log.begin("ablation: LoRA on m_B", (out / "ablation_lora" / "adapter_config.json").is_file(),
                     "ablation_lora", lora_settings, out / "ablation_lora"):
            t0 = time.monotonic()
            info = _lora(cfg, out, tok, bridge_params)
            log.record("ablation_lora", {"wall_s": round(time.monotonic() - t0, 1), **info}, lora_settings)
    if log.stop("ablations"):
        return 0

    # 6. evaluation
    log.begin("evaluate", False)
    accuracy = _evaluate(cfg, out, tok, world, log)

    # 7. report
    rec = log.records

    def base_history(role: str):  # pairs trained before stages.json existed kept it in the model folder
        legacy = out / role / "train_history.json"
        return rec.get(role, {}).get("history") or (json.loads(legacy.read_text()) if legacy.is_file() else None)

    curves = {"m_A (KV-substitution)": base_history("augment"),
              "m_B (numeric arithmetic)": base_history("anchor"),
              "CALM bridges": rec.get("compose", {}).get("history"),
              "CALM bridges, random m_A": rec.get("ablation_random", {}).get("history"),
              "LoRA on m_B": rec.get("ablation_lora", {}).get("history")}
    stage_s = {name: r["wall_s"] for name, r in rec.items() if isinstance(r, dict) and "wall_s" in r}
    # evaluation: what each system's (possibly cached) evaluation took, plus this run's overhead
    stage_s["evaluate"] = round(sum(r.get("wall_s", 0) for r in rec.get("evaluate", {}).values()), 1)
    anchor, augment = load_causal_lm(str(out / "anchor")), load_causal_lm(str(out / "augment"))
    results = {
        "config": cfg.model_dump(),
        "accuracy_percent": accuracy,
        "paper_percent": PAPER,
        "data": {"keys": len(world.values), "compose_keys": len(world.compose_keys),
                 "heldout_keys": len(world.heldout_keys), "eval_examples_per_task": cfg.eval_examples,
                 "compose_examples": cfg.compose_examples,
                 "compose_anchor_task_examples": int(cfg.compose_examples * cfg.anchor_task_fraction),
                 "keys_disjoint": not set(world.compose_keys) & set(world.heldout_keys)},
        "parameters": {"anchor": sum(p.numel() for p in anchor.parameters()),
                       "augment": sum(p.numel() for p in augment.parameters()),
                       "bridges": bridge_params,
                       "lora": rec.get("ablation_lora", {}).get("parameters"),
                       "lora_rank": rec.get("ablation_lora", {}).get("rank")},
        "seeds": {"experiment": cfg.seed, "keys": cfg.keys.seed},
        "stage_seconds": stage_s,
        "wall_seconds_total": round(sum(stage_s.values()), 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
        "date": time.strftime("%Y-%m-%d"),
        "training_curves": curves,
    }
    path = Path(cfg.results)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, path.with_suffix(".png"))
    print("\n" + markdown_table(accuracy))
    print(f"\nresults written to {path} and {path.with_suffix('.png')} "
          f"(all stages: {fmt_time(results['wall_seconds_total'])})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

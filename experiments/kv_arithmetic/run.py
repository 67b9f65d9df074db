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

import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from composition.checkpoint import atomic_folder, files_signature
from composition.training import TrainSettings
from experiments.common import (
    PlainLM,
    StageLog,
    bridge_job,
    encode_rows,
    evaluate_systems,
    lora_model,
    lora_parameters_per_rank,
    loss_history,
    read_jsonl,
    results_written,
    run_stages,
    stage_arguments,
    train,
    warmup,
    write_jsonl,
    write_results,
)
from experiments.kv_arithmetic.config import ExperimentConfig, ModelSpec
from experiments.kv_arithmetic.data import TASKS, KVWorld, build_tokenizer
from experiments.kv_arithmetic.lib import exact_match, llama, systems
from experiments.kv_arithmetic.report import accuracy_table, build_results, plot


@dataclass
class Run:
    """What the stages share: the config and the stage log; what earlier stages wrote is read when first needed."""

    cfg: ExperimentConfig
    log: StageLog
    bridge_params: int | None = None  # the trained bridges' parameter count: the ablations' budget
    accuracy: dict | None = None  # per system and task: the evaluation's

    @property
    def out(self) -> Path:
        return Path(self.cfg.output)

    @property
    def data(self) -> Path:
        return self.out / "data"

    @cached_property
    def world(self) -> KVWorld:
        return KVWorld.load(self.data)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.data / "tokenizer")


# ---------------------------------------------------------------- what each stage ran with (stages.json)
def _data_inputs(cfg: ExperimentConfig) -> dict:
    return {"keys": cfg.keys, "augment_examples": cfg.augment.examples, "anchor_examples": cfg.anchor.examples,
            "anchor_min_terms": cfg.anchor_min_terms, "eval_examples": cfg.eval_examples, "seed": cfg.seed}


def _compose_data_inputs(cfg: ExperimentConfig) -> dict:
    return {"compose_examples": cfg.compose_examples, "anchor_task_fraction": cfg.anchor_task_fraction,
            "compose_min_terms": cfg.compose_min_terms, "compose_max_terms": cfg.compose_max_terms,
            "compose_first_min_terms": cfg.compose_first_min_terms,
            "compose_first_max_terms": cfg.compose_first_max_terms, "seed": cfg.seed}


def _compose_inputs(cfg: ExperimentConfig) -> dict:
    return {**_compose_data_inputs(cfg), **{k: getattr(cfg, k) for k in (
        "compose_steps", "compose_first_steps", "compose_batch_size", "compose_lr", "compose_weight_decay",
        "composition", "ray_workers")}}


def _lora_inputs(cfg: ExperimentConfig, bridge_params: int) -> dict:
    return {**_compose_data_inputs(cfg), **{k: getattr(cfg, k) for k in (
        "compose_steps", "compose_first_steps", "compose_batch_size", "lora_lr", "compose_weight_decay")},
        "bridge_params": bridge_params}


# ---------------------------------------------------------------- stage 1: data
def _write_data(cfg: ExperimentConfig, folder: Path) -> dict:
    """Keys, values and their split; the tokenizer; the base models' rows and the evaluation rows."""
    world = KVWorld.create(cfg.keys)
    tok = build_tokenizer(world)
    write_jsonl(world.examples("sub", cfg.augment.examples, cfg.seed + 1, list(world.values)),
                folder / "augment_train.jsonl")
    write_jsonl(world.examples("num", cfg.anchor.examples, cfg.seed + 2, min_terms=cfg.anchor_min_terms),
                folder / "anchor_train.jsonl")
    for task in TASKS:
        keys = world.heldout_keys if task != "num" else None
        write_jsonl(world.evaluation_examples(task, cfg.eval_examples, cfg.seed, keys), folder / f"eval_{task}.jsonl")
    tok.save_pretrained(folder / "tokenizer")
    world.save(folder)  # written last: its presence marks the stage done
    return {}


def _write_compose_data(cfg: ExperimentConfig, world: KVWorld, folder: Path) -> dict:
    """The bridges' rows (and, with compose_first_steps, their first phase's)."""
    rows = world.composition_examples(cfg.compose_examples, cfg.anchor_task_fraction, cfg.seed,
                                      min_terms=cfg.compose_min_terms, max_terms=cfg.compose_max_terms)
    if cfg.compose_first_steps:
        write_jsonl(world.composition_examples(cfg.compose_examples, cfg.anchor_task_fraction, cfg.seed,
                                               min_terms=cfg.compose_first_min_terms,
                                               max_terms=cfg.compose_first_max_terms),
                    folder / "compose_first.jsonl")
    write_jsonl(rows, folder / "compose_train.jsonl")  # written last: its presence marks the step done
    return {"rows": len(rows)}


# ---------------------------------------------------------------- stages 2-5: training
def _train_base(spec: ModelSpec, rows, tok, folder: Path, label: str, seed: int, random_only: bool = False) -> list:
    """Train (or, with random_only, just initialise) a Llama from scratch and save it as an HF folder."""
    model = llama(len(tok), spec.hidden, spec.layers, spec.heads, seed, tok.pad_token_id, tok.eos_token_id,
                  tok.bos_token_id)
    history = []
    if not random_only:
        ckpt = folder.with_name(folder.name + ".ckpt")
        settings = TrainSettings(lr=spec.lr, steps=spec.steps, warmup_steps=min(100, spec.steps // 10),
                                 weight_decay=spec.weight_decay)
        history = loss_history(train(PlainLM(model), encode_rows(tok, rows), settings, spec.batch_size,
                                     tok.pad_token_id, seed, checkpoint=ckpt, label=label), steps_run=True)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return history


def _fit_bridges(cfg: ExperimentConfig, out: Path, augment: Path, bridges: Path, name: str) -> list[dict]:
    """Train the bridges through the Ray Train job; returns the per-step history.

    With ``compose_first_steps``, two jobs: the first on the ``compose_first.jsonl`` data from random
    bridges, the second on the composition data from the first's bridges
    (``init_bridges``) for the rest of ``compose_steps``; each resumes on its own.
    """
    from actors.train.pipeline import run as run_job

    def job(job_name: str, data_file: str, steps: int, output: Path, init: Path | None) -> list[dict]:
        config = bridge_job(
            job_name, out / "anchor", augment, cfg.composition, out / "data" / data_file,
            max_length=2 * cfg.keys.max_terms + 2,  # n keys, n - 1 ops, "=", result, eos
            steps=steps, batch_size=cfg.compose_batch_size, lr=cfg.compose_lr, weight_decay=cfg.compose_weight_decay,
            seed=cfg.seed, checkpoint_every=100, log_every=25,
            ray={"num_workers": cfg.ray_workers, "cpus_per_worker": 0.5, "augment_actors": 1,
                 "cpus_per_augment_actor": 0.5},
            runs=out / "runs", output=output, init_bridges=init)
        return loss_history(run_job(config).history, steps_run=True)

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


def _lora(cfg: ExperimentConfig, out: Path, tok, bridge_params: int) -> dict:
    """LoRA on m_B with about the bridges' parameter count (the nearest rank), on the composition data, the same
    loop."""
    from composition import load_causal_lm

    per_rank = lora_parameters_per_rank(load_causal_lm(str(out / "anchor")))
    rank = max(1, round(bridge_params / per_rank))
    params = rank * per_rank
    print(f"[lora] rank {rank}: {params:,} trainable parameters (bridges: {bridge_params:,})", flush=True)
    model = lora_model(load_causal_lm(str(out / "anchor")), rank)
    # the bridges' data schedule: the first phase's data first, if any
    phases = [("compose_train.jsonl", cfg.compose_steps, "ablation_lora.ckpt")]
    if cfg.compose_first_steps:
        phases = [("compose_first.jsonl", cfg.compose_first_steps, "ablation_lora_first.ckpt"),
                  ("compose_train.jsonl", cfg.compose_steps - cfg.compose_first_steps, "ablation_lora.ckpt")]
    history = []
    for data_file, steps, ckpt in phases:
        settings = TrainSettings(lr=cfg.lora_lr, steps=steps, warmup_steps=warmup(steps),
                                 weight_decay=cfg.compose_weight_decay)
        rows = read_jsonl(out / "data" / data_file)
        offset = len(history)
        history += [{**h, "steps_run": h["step"] + offset}
                    for h in train(PlainLM(model), encode_rows(tok, rows), settings, cfg.compose_batch_size,
                                   tok.pad_token_id, cfg.seed, checkpoint=out / ckpt, label="lora")]
    with atomic_folder(out / "ablation_lora") as tmp:
        model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
    return {"history": loss_history(history, steps_run=True), "rank": rank, "parameters": params}


# ---------------------------------------------------------------- stage 6: evaluation
def _evaluation_rows(run: Run) -> dict:
    """The evaluation rows per task, checked: the KV tasks see only keys that no composition example used."""
    evals = {task: read_jsonl(run.data / f"eval_{task}.jsonl") for task in TASKS}
    heldout = set(run.world.heldout_keys)
    for task in ("sub", "kvar"):
        bad = [t for r in evals[task] for t in r["prompt"].split() if t in run.world.values and t not in heldout]
        if bad:
            raise RuntimeError(f"eval_{task}.jsonl uses composition keys {bad[:5]}: delete {run.data} and rerun")
    return evals


# ---------------------------------------------------------------- the stages
def data(run: Run) -> None:
    """1. Keys, values, splits, the shared tokenizer and every task's rows; then the bridges' rows, a step of
    their own, so that a pair can be composed again with other composition data."""
    cfg, folder = run.cfg, run.data
    run.log.stage("data", (folder / "keys.json").is_file(), lambda: _write_data(cfg, folder),
                  inputs=_data_inputs(cfg), folder=folder)
    rows_file = folder / "compose_train.jsonl"
    run.log.stage("composition data", rows_file.is_file(), lambda: _write_compose_data(cfg, run.world, folder),
                  key="compose_data", inputs=_compose_data_inputs(cfg), folder=rows_file, timed=False)


def _base_model(run: Run, role: str, spec: ModelSpec, task_file: str, seed: int, inputs) -> None:
    folder = run.out / role
    run.log.stage(role, (folder / "config.json").is_file(),
                  lambda: {"history": _train_base(spec, read_jsonl(run.data / task_file), run.tokenizer, folder,
                                                  role, seed)},
                  inputs=inputs, folder=folder)


def augment(run: Run) -> None:
    """2. m_A, from scratch, on KV-substitution over all keys."""
    if set(run.world.compose_keys) & set(run.world.heldout_keys):
        raise RuntimeError(f"{run.data / 'keys.json'}: composition and held-out keys overlap; delete {run.data} "
                           f"and rerun")
    _base_model(run, "augment", run.cfg.augment, "augment_train.jsonl", run.cfg.seed, run.cfg.augment)


def anchor(run: Run) -> None:
    """3. m_B, from scratch, on numeric arithmetic; its recorded settings include its rows' expression lengths
    (absent: the default, None)."""
    cfg = run.cfg
    _base_model(run, "anchor", cfg.anchor, "anchor_train.jsonl", cfg.seed + 1,
                {**cfg.anchor.model_dump(), "min_terms": cfg.anchor_min_terms})


def compose(run: Run) -> None:
    """4. The bridges (m_A, m_B frozen) through the Ray Train job. To compose again, delete the bridges of both
    phases and the Ray runs (a job resumes from those)."""
    out = run.out
    run.log.stage("compose", (out / "bridges" / "bridges.safetensors").is_file(),
                  lambda: {"history": _fit_bridges(run.cfg, out, out / "augment", out / "bridges", "kv_compose")},
                  inputs=_compose_inputs(run.cfg),
                  folder=f"{out / 'bridges'}, {out / 'bridges_first'} and {out / 'runs'}")


def _random_ablation(run: Run) -> dict:
    rnd = run.out / "ablation_random"
    _train_base(run.cfg.augment, [], run.tokenizer, rnd / "augment", "random", run.cfg.seed + 7, random_only=True)
    return {"history": _fit_bridges(run.cfg, run.out, rnd / "augment", rnd / "bridges", "kv_compose_random")}


def _bridge_params(out: Path) -> int:
    from composition import ComposedModel, load_causal_lm

    return ComposedModel.from_pretrained(out / "bridges", load_causal_lm(str(out / "anchor")),
                                         [load_causal_lm(str(out / "augment"))]).num_bridge_parameters()


def ablations(run: Run) -> None:
    """5. With the bridges' parameter budget and data: (a) the same bridges onto a randomly initialised m_A;
    (b) LoRA on m_B."""
    cfg, out = run.cfg, run.out
    run.bridge_params = _bridge_params(out)
    if cfg.random_augment_ablation:
        rnd = out / "ablation_random"
        run.log.stage("ablation: CALM with a random m_A", (rnd / "bridges" / "bridges.safetensors").is_file(),
                      lambda: _random_ablation(run), key="ablation_random", inputs=_compose_inputs(cfg),
                      folder=f"{rnd} and {out / 'runs'}")
    if cfg.lora_ablation:
        run.log.stage("ablation: LoRA on m_B", (out / "ablation_lora" / "adapter_config.json").is_file(),
                      lambda: _lora(cfg, out, run.tokenizer, run.bridge_params), key="ablation_lora",
                      inputs=_lora_inputs(cfg, run.bridge_params), folder=out / "ablation_lora")


def evaluate(run: Run) -> None:
    """6. Exact match with greedy decoding, per system and task; a system whose weights and evaluation rows did
    not change keeps its last evaluation."""
    run.log.begin("evaluate", False)
    evals = _evaluation_rows(run)

    def score(name: str, load) -> dict:
        model = load()
        return {task: round(100 * exact_match(model, run.tokenizer, rows, label=f"{name}/{task}"), 1)
                for task, rows in evals.items()}

    run.accuracy = evaluate_systems(run.log, systems(run.cfg, run.out),
                                    [files_signature(run.data.glob("eval_*.jsonl"))], score, "accuracy", str)


def report(run: Run) -> None:
    """7. The results JSON, a Markdown table and a PNG of the training curves and accuracies."""
    results = build_results(run.cfg, run.log.records, run.world, run.accuracy, run.bridge_params)
    path = Path(run.cfg.results)
    write_results(results, path)
    plot(results, path.with_suffix(".png"))
    print("\n" + accuracy_table(run.accuracy))
    print(results_written(path, results["wall_seconds_total"]), flush=True)


STAGES = [data, augment, anchor, compose, ablations, evaluate, report]


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments("python -m experiments.kv_arithmetic", __doc__,
                           "experiments/kv_arithmetic/configs/kv_quick.yaml", STAGES, argv)
    cfg = ExperimentConfig.load(args.config)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run = Run(cfg, StageLog(Path(cfg.output), args.stop_after))
    return run_stages(STAGES, run, run.log)


if __name__ == "__main__":
    sys.exit(main())

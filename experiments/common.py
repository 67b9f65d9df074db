"""What the experiments share: their configs' base, the stage log and the stage loop, jsonl files, the plain-LM
wrapper, a training loop with progress, the Ray Train job's config, cached evaluation, and the report's pieces.

Each experiment's ``run.py`` is a list of stage functions (``STAGES``) over one state object, run in order by
:func:`run_stages`. A stage is resumable: a finished one is skipped (``StageLog.stage``), an interrupted
training continues from its last checkpoint, an evaluation is reused while the weights it scored are unchanged.
Every training stage goes through ``composition.training.BridgeTrainer`` (the loop the Ray Train job runs),
checkpoints every ``checkpoint_every`` steps and resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel
from torch import nn
from tqdm import tqdm

from actors.config import StrictModel, load_yaml, parse
from composition.cache import CompositionCache
from composition.checkpoint import atomic_file, files_signature
from composition.config import ConfigError
from composition.loss import call_with_loss
from composition.model import positions_from_mask
from composition.training import BridgeTrainer, TrainSettings

if TYPE_CHECKING:
    from actors.train.config import TrainJobConfig


class ExperimentSettings(StrictModel):
    """The base of an experiment's config: the project's config system (``actors.config``), read from YAML."""

    @classmethod
    def load(cls, path: str):
        """The checked config; exits naming every problem."""
        try:
            return parse(cls, load_yaml(path))
        except ConfigError as e:
            raise SystemExit(f"error: {path}: {e}") from None


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


class StageLog:
    """Progress across stages (the time elapsed at each) and their records, persisted in ``<output>/stages.json``."""

    def __init__(self, out: Path, stop_after: str | None):
        self.path = out / "stages.json"
        self.records: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.stop_after = stop_after
        self.started = time.monotonic()

    def begin(self, name: str, done: bool, key: str | None = None, inputs: dict | None = None,
              folder: Path | str | None = None) -> bool:
        """Announce stage ``name``; True when it has to run.

        A finished stage whose recorded ``inputs`` (the settings it ran with, under ``key`` in
        stages.json) differ from this config's is not reused silently: the run stops and says what
        changed and what to delete (``folder``) to run the stage again.
        """
        elapsed = fmt_time(time.monotonic() - self.started)
        if done and key and inputs is not None:
            recorded, now = self.records.get(key, {}).get("inputs"), as_json(inputs)
            if recorded is not None and recorded != now:
                changed = changed_settings(recorded, now)
                raise SystemExit(
                    f"error: stage {name} in {self.path.parent} ran with other settings ({', '.join(changed)} "
                    f"changed). Delete {folder} to run it again with this config, or set a new 'output'.")
        print(f"\n=== stage {name}: {'already done, skipped' if done else 'running'} (elapsed {elapsed})", flush=True)
        return not done

    def record(self, name: str, info: dict, inputs: dict | None = None) -> None:
        if inputs is not None:
            info = {**info, "inputs": as_json(inputs)}
        self.records[name] = info
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.records, indent=1) + "\n")

    def stage(self, name: str, done: bool, work: Callable[[], dict], key: str | None = None,
              inputs: dict | None = None, folder: Path | str | None = None, timed: bool = True) -> None:
        """Stage ``name``: unless ``done`` (see :meth:`begin`), run ``work`` and record what it returns under ``key``
        (default ``name``) with ``inputs``, after the stage's wall seconds (``wall_s``) when ``timed``."""
        key = key or name
        if self.begin(name, done, key, inputs, folder):
            started = time.monotonic()
            info = work()
            self.record(key, {"wall_s": round(time.monotonic() - started, 1), **info} if timed else info, inputs)

    def stop(self, name: str) -> bool:
        return self.stop_after == name


def stage_arguments(prog: str, doc: str, config: str, stages: list[Callable], argv: list[str] | None):
    """An experiment's command line: ``--config`` (default ``config``) and ``--stop-after`` one of ``stages``
    but the last."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--config", default=config)
    parser.add_argument("--stop-after", choices=[stage.__name__ for stage in stages[:-1]], default=None,
                        help="stop after this stage (a later run resumes from the next one)")
    return parser.parse_args(argv)


def run_stages(stages: list[Callable], state, log: StageLog) -> int:
    """Run ``stages`` (functions of ``state``) in order, each announcing itself; returns 0 after the last, or after
    the stage that ``--stop-after`` names (``log.stop_after``). The last stage, the report, runs after every
    evaluation: ``--stop-after`` on the stage before it stops nothing, as it never has."""
    *work, report = stages
    for stage in work:
        stage(state)
        if log.stop(stage.__name__) and stage is not work[-1]:
            return 0
    report(state)
    return 0


def as_json(value):
    """``value`` as JSON gives it back: dataclasses and pydantic models as dicts, tuples as lists (for comparing
    settings with a recorded copy)."""
    return json.loads(json.dumps(value, default=lambda o: o.model_dump() if isinstance(o, BaseModel) else asdict(o)))


def changed_settings(recorded: dict, now: dict) -> list[str]:
    """The keys whose values differ between two plain settings dicts, sorted."""
    return sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))


# ---------------------------------------------------------------- data files and training rows
def write_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object a line (UTF-8, non-ASCII as is), written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def encode_rows(tok, rows: list[dict], max_length: int | None = None,
                add_special_tokens: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + eos) per row of ``{"prompt", "completion"}``; ``add_special_tokens`` on the
    prompt (the tokenizer's BOS). With ``max_length`` the completion is cut so that the pair fits, as the Ray job's
    data stage cuts it, and a row with nothing of its completion left is dropped."""
    prompts = tok([r["prompt"] for r in rows], add_special_tokens=add_special_tokens)["input_ids"]
    completions = tok([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    pairs = []
    for p, c in zip(prompts, completions):
        c = c + [tok.eos_token_id]
        if max_length is not None:
            c = c[: max(0, max_length - len(p))]
        if c:
            pairs.append((p, c))
    return pairs


def collate(pairs, pad_id: int) -> dict:
    """Right-padded batch; labels are -100 on the prompt and on padding (loss on the completion only)."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(pairs):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(c)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(pairs, batch_size: int, pad_id: int, seed: int, start_step: int = 0):
    """Endless shuffled batches; epoch order is a function of the seed and the epoch only (resumable)."""
    per_epoch = max(1, len(pairs) // batch_size)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = list(range(len(pairs)))
        random.Random(seed * 100003 + epoch).shuffle(order)
        chunk = order[offset * batch_size : (offset + 1) * batch_size]
        yield collate([pairs[i] for i in chunk], pad_id)
        step += 1


class PlainLM(nn.Module):
    """A Hugging Face causal LM (or a PEFT wrapper of one) behind ComposedModel's call signature.

    Lets BridgeTrainer train it and ``composition.generate.generate`` decode it, so the baselines
    go through exactly the code paths the composed model does.
    """

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter] | None = None):
        super().__init__()
        self.model = model
        self._trainable = trainable

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self._trainable is not None:
            return self._trainable
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, input_ids, attention_mask=None, labels=None, augment_states=None, cache=None,
                use_cache=False, logits_to_keep=0, labelled_logits_only=False):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        past = cache.seq_len if cache is not None else 0
        full = attention_mask if cache is None else torch.cat([cache.attention_mask, attention_mask], 1)
        if labels is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        out = call_with_loss(self.model, labels, labelled_logits_only and past == 0, logits_to_keep,
                             input_ids=input_ids, attention_mask=full,
                             position_ids=positions_from_mask(full)[:, past:],
                             cache=cache.anchor if cache is not None else None, use_cache=use_cache)
        out.cache = CompositionCache(full, out.cache) if use_cache else None
        return out


def train(model, pairs, settings: TrainSettings, batch_size: int, pad_id: int, seed: int,
          checkpoint: Path | None = None, checkpoint_every: int = 200, label: str = "train",
          log_every: int = 50, device: str | torch.device = "cpu") -> list[dict]:
    """Train ``model.trainable_parameters()`` for ``settings.steps``; resumes from ``checkpoint``.

    Returns the per-step metrics (loss, tokens, lr, step, seconds) of the steps run now.
    """
    trainer = BridgeTrainer(model, settings)
    if checkpoint is not None and (checkpoint / "trainer_state.json").is_file():
        trainer.load(checkpoint)
        print(f"[{label}] resumed at step {trainer.step_count}/{settings.steps}", flush=True)
    history = []
    stream = batches(pairs, batch_size, pad_id, seed, start_step=trainer.step_count)
    bar = tqdm(total=settings.steps, initial=trainer.step_count, desc=f"[{label}]", file=sys.stdout,
               mininterval=5, bar_format="{desc} step {n}/{total} {postfix} ({rate_inv_fmt}, ETA {remaining})")
    while trainer.step_count < settings.steps:
        t0 = time.monotonic()
        metrics = trainer.step({k: v.to(device) for k, v in next(stream).items()})
        metrics["seconds"] = time.monotonic() - t0
        history.append(metrics)
        done = metrics["step"]
        recent = history[-log_every:]
        bar.set_postfix_str(f"loss {sum(m['loss'] for m in recent) / len(recent):.4f}", refresh=False)
        bar.update(1)
        if checkpoint is not None and (done % checkpoint_every == 0 or done == settings.steps):
            trainer.save(checkpoint, extra={"label": label})
    bar.close()
    return history


def warmup(steps: int) -> int:
    """Warmup steps of a bridge (or LoRA) training run of ``steps`` steps: the experiments' one rule."""
    return min(50, steps // 10)


def loss_history(metrics: list[dict], steps_run: bool = False) -> list[dict]:
    """Per step that has a loss: the step and the loss (5 decimals); with ``steps_run`` also the steps run over
    every phase (a row's own ``steps_run``, set by the caller for a later phase, else its step)."""
    if steps_run:
        return [{"step": m.get("step"), "steps_run": m.get("steps_run", m.get("step")),
                 "loss": round(float(m.get("loss")), 5)} for m in metrics if m.get("loss") is not None]
    return [{"step": m["step"], "loss": round(float(m["loss"]), 5)} for m in metrics if m.get("loss") is not None]


def bridge_job(name: str, anchor: str | Path, augment: str | Path, composition: dict, train_file: Path,
               max_length: int, *, steps: int, batch_size: int, lr: float, weight_decay: float, seed: int,
               checkpoint_every: int, log_every: int, ray: dict, runs: Path, output: Path,
               init_bridges: Path | None = None, device: str = "auto", dtype: str = "auto") -> TrainJobConfig:
    """The Ray Train job (``actors.train.pipeline.run``) that fits the bridges from ``anchor`` to one augmenting model
    on ``train_file``'s prompt/completion rows (loss on the completion), with the experiments' warmup: a checked
    ``TrainJobConfig`` (TrainConfigError naming what is wrong). ``ray`` is its ``ray:`` section; ``runs`` holds
    the job's checkpoints, ``output`` the exported bridges; ``init_bridges`` trained bridges to start from."""
    from actors.train.config import parse_config

    def absolute(path) -> str:
        return str(Path(path).resolve())

    return parse_config({
        "name": name,
        "anchor": absolute(anchor),
        "augments": [absolute(augment)],
        "composition": composition,
        "data": {"train": absolute(train_file), "format": "prompt_completion", "prompt_field": "prompt",
                 "completion_field": "completion", "max_length": max_length},
        "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "warmup_steps": warmup(steps), "checkpoint_every": checkpoint_every, "seed": seed,
                     "log_every": log_every},
        "ray": ray,
        "storage_path": absolute(runs),
        "output": absolute(output),
        "init_bridges": absolute(init_bridges) if init_bridges is not None else None,
        "device": device,
        "dtype": dtype,
    })


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(model, rank: int):
    """``model`` with LoRA adapters of ``rank`` on every attention and MLP projection (alpha = rank)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS))


def lora_parameters_per_rank(model) -> int:
    """Trainable parameters of rank-1 adapters on ``model`` (:func:`lora_model`); rank r has r times as many."""
    return sum(p.numel() for p in lora_model(model, 1).parameters() if p.requires_grad)


# ---------------------------------------------------------------- evaluation, cached per system
def weights_fingerprint(folder: Path) -> list:
    """What identifies trained weights on disk: their files' names, sizes and mtimes."""
    return files_signature(Path(folder).rglob("*.safetensors"))


def evaluate_systems(log: StageLog, systems: dict, data_stamp: list, score: Callable, key: str,
                     summary: Callable[[dict], str]) -> dict:
    """``score(name, load)`` per system (name -> (folders whose weights define it, loader)), in order.

    A system whose weights and ``data_stamp`` (what else its scores depend on) are those of its last evaluation
    keeps that result; each new one is recorded under ``evaluate`` in the stage log (the result under ``key``,
    with its fingerprint and wall seconds) as soon as it is made. ``summary(result)`` is its progress line.
    """
    cached = log.records.get("evaluate", {})
    results = {}
    for name, (folders, load) in systems.items():
        stamp = json.loads(json.dumps([weights_fingerprint(f) for f in folders] + data_stamp))
        if cached.get(name, {}).get("fingerprint") == stamp:
            results[name] = cached[name][key]
            print(f"[eval] {name}: unchanged since the last evaluation, reusing {summary(results[name])}", flush=True)
            continue
        started = time.monotonic()
        results[name] = score(name, load)
        print(f"[eval] {name}: {summary(results[name])} ({fmt_time(time.monotonic() - started)})", flush=True)
        cached[name] = {"fingerprint": stamp, key: results[name], "wall_s": round(time.monotonic() - started, 1)}
        log.record("evaluate", cached)
    return results


# ---------------------------------------------------------------- the report
def stage_seconds(records: dict) -> dict:
    """Wall seconds per recorded stage; the evaluation's is the sum of what each system's (possibly cached)
    evaluation took."""
    seconds = {name: r["wall_s"] for name, r in records.items() if isinstance(r, dict) and "wall_s" in r}
    seconds["evaluate"] = round(sum(r.get("wall_s", 0) for r in records.get("evaluate", {}).values()), 1)
    return seconds


def machine(**extra) -> dict:
    """What ran the experiment: platform, CPU count, torch version, processor (and ``extra``)."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(), **extra}


def write_results(results: dict, path: Path) -> None:
    """The results JSON (indented, non-ASCII as is), written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


def results_written(path: Path, seconds: float) -> str:
    """The report's last line: where the results and their PNG are, and how long all stages took."""
    return f"\nresults written to {path} and {path.with_suffix('.png')} (all stages: {fmt_time(seconds)})"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to ``window - 1`` before it."""
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def plot_curves(axes, curves: dict, points: int, x: str = "step") -> None:
    """Each named loss history (``[{"step", "loss", ...}]``; None or empty ones are left out) on ``axes``, as a
    moving average over 1/``points`` of its steps, against its ``x`` (its ``step`` where a row has no ``x``)."""
    for name, history in curves.items():
        if history:
            losses = [h["loss"] for h in history]
            axes.plot([h.get(x, h["step"]) for h in history], moving_average(losses, max(1, len(losses) // points)),
                      label=name)


def save_figure(fig, path: Path, **savefig) -> None:
    """``fig`` written atomically to ``path`` (``savefig``'s options), then closed."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, **savefig)
    pyplot().close(fig)

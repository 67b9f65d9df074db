"""The Ray Train side of bridge training: the worker body and the TorchTrainer wiring.

Each Ray Train worker holds the frozen anchor and the bridges, reads its shard of the streamed
dataset (token columns + the augmenting states that the actor pool in ``actors.train.augment_pool``
computed), and drives the one training loop, ``composition.training.BridgeTrainer.step``, with
``batch["augment_states"]`` decoded from those columns. BridgeTrainer averages the bridge gradients
under torch.distributed itself, so nothing is wrapped in DDP.

Checkpoints are Ray checkpoints holding one ``BridgeTrainer.save`` folder (``bridge_trainer/``:
``bridges/`` in the ``save_pretrained`` format, trained tensors, optimiser state, step count), so
a restarted worker group or a rerun of the same job (same ``name`` and ``storage_path``) resumes
at the step after the last checkpoint.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actors.codec import arrays_to_states
from actors.train.config import TrainJobConfig

TRAINER_DIR = "bridge_trainer"  # inside each Ray checkpoint


def say(message: str) -> None:
    """One progress line on stdout (not ``print``: Ray Train V2 tees printed lines to its logger, doubling them)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def decode_batch(arrays: dict[str, np.ndarray], states_dtype: str, device) -> dict:
    """A streamed numpy batch -> ``BridgeTrainer.step``'s batch (token tensors + ``augment_states``, and
    ``augment_inputs`` when an augmenting model reads its own tokens)."""
    from composition.alignment import AugmentInputs

    def ids(name):
        return torch.from_numpy(np.asarray(arrays[name], dtype=np.int64)).to(device)  # a copy: batches are read-only

    batch = {
        "input_ids": ids("input_ids"),
        "attention_mask": ids("attention_mask"),
        "labels": ids("labels"),
        "augment_states": arrays_to_states(arrays, states_dtype, device),
    }
    n = len(batch["augment_states"])
    if any(f"aug{i}_visible" in arrays for i in range(n)):
        mask = batch["attention_mask"]
        shared = AugmentInputs(batch["input_ids"], mask, mask.cumsum(-1), identity=True)  # token t sees tokens <= t
        batch["augment_inputs"] = [
            AugmentInputs(ids(f"aug{i}_input_ids"), ids(f"aug{i}_attention_mask"), ids(f"aug{i}_visible"))
            if f"aug{i}_visible" in arrays else shared for i in range(n)]
    return batch


def build_model(cfg: TrainJobConfig, device):
    """The ComposedModel a worker trains: anchor on ``device``; the augmenting models stay on CPU
    (they never run here; they are loaded only so checkpoints carry their fingerprints). The bridges
    start random, or from ``init_bridges``."""
    from actors.train.data import load_tokenizers
    from composition.loading import load_causal_lm
    from composition.model import ComposedModel

    dtype = cfg.model_dtype
    anchor = load_causal_lm(cfg.anchor, dtype, device)
    augments = [load_causal_lm(a, dtype, "cpu") for a in cfg.augments]
    # with another tokenizer anywhere, the composition records every tokenizer's fingerprint in its checkpoints
    tokenizers = load_tokenizers(cfg).for_composition()
    if cfg.init_bridges:  # warm start (refused if the bridges were trained with other models or tokenizers)
        return ComposedModel.from_pretrained(cfg.init_bridges, anchor, augments, tokenizers=tokenizers)
    return ComposedModel(anchor, augments, cfg.composition, tokenizers=tokenizers)


def _quiet_report_logging() -> None:
    """Ray Train V2 logs an INFO line (the whole metrics dict) per worker per report; keep warnings only.
    Its logger is private (named after the module's file), so this is best effort."""
    import logging

    try:
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def _mean_over_workers(values: list[float], device, world: int, op_sum: list[bool]) -> list[float]:
    import torch.distributed as dist

    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(x) if s else float(x) / world for x, s in zip(t.tolist(), op_sum)]


def train_worker(loop_config: dict) -> dict:
    """Body of every Ray Train worker; returns (rank 0) this attempt's per-step metrics.

    Every step's metrics (loss averaged over workers, global tokens and tokens/s) go to the
    returned history; every ``log_every`` steps and at each checkpoint a progress line is printed
    (rank 0) and ``ray.train.report`` is called with the last step's metrics plus the window's
    ``loss_mean`` and ``tokens_per_s``. A report is a barrier that the controller drains once per
    poll, so reporting every step would pace training to the poll interval.
    """
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from composition.training import BridgeTrainer

    _quiet_report_logging()
    cfg: TrainJobConfig = loop_config["config"]  # validated once, on the submitting machine
    t = cfg.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(cfg.worker_device(ray.train.torch.get_device()))
    torch.manual_seed(t.seed)
    model = build_model(cfg, device)
    trainer = BridgeTrainer(model, t)  # a TrainSettings, extended by the loop's keys
    attempts: list[dict] = []  # which steps each (re)start ran, as far as a checkpoint recorded it
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            meta = trainer.load(Path(folder) / TRAINER_DIR)
        attempts = list(meta.get("attempts", []))
        if rank == 0:
            say(f"resumed from checkpoint at step {trainer.step_count}")
    elif rank == 0:
        say("no checkpoint: starting at step 0")
    attempts.append({"first_step": trainer.step_count + 1, "last_checkpointed_step": trainer.step_count})
    if rank == 0:
        say(f"worker {rank}/{world} on {device}, {torch.get_num_threads()} torch threads, "
            f"{model.num_bridge_parameters():,} bridge parameters")

    shard = ray.train.get_dataset_shard("train")
    history: list[dict] = []
    window: list[dict] = []
    passes = 0  # full iterations of the shard (the stream already holds every epoch the run needs)
    last = time.perf_counter()
    while trainer.step_count < t.steps:
        batches = 0
        for arrays in shard.iter_batches(batch_size=cfg.per_worker_batch, batch_format="numpy",
                                         prefetch_batches=cfg.ray.prefetch_batches, drop_last=True):
            batches += 1
            out = trainer.step(decode_batch(arrays, cfg.model_dtype, device))
            loss, tokens = _mean_over_workers([out["loss"], out["tokens"]], device, world, [False, True])
            now = time.perf_counter()
            step = out["step"]
            epoch = (step - 1) * t.batch_size // loop_config["examples"]
            metrics = {"step": step, "loss": loss, "tokens": int(tokens), "seconds": now - last,
                       "tokens_per_s": tokens / (now - last), "lr": out["lr"], "epoch": epoch}
            last = now
            history.append(metrics)
            window.append(metrics)
            save = step % t.checkpoint_every == 0 or step == t.steps
            if save or step % t.log_every == 0 or len(history) == 1:
                report = {**metrics, "loss_mean": sum(m["loss"] for m in window) / len(window),
                          "tokens_per_s": sum(m["tokens"] for m in window) / sum(m["seconds"] for m in window)}
                window = []
                if rank == 0:
                    per_step = sum(m["seconds"] for m in history) / len(history)
                    eta = int(per_step * (t.steps - step))
                    say(f"step {step}/{t.steps} loss {loss:.4f} (mean {report['loss_mean']:.4f}) lr {out['lr']:.2e} "
                        f"tokens/s {report['tokens_per_s']:,.0f} epoch {epoch}, {per_step:.1f} s/step, "
                        f"ETA {eta // 60}m{eta % 60:02d}s")
                with tempfile.TemporaryDirectory() as tmp:
                    ckpt = None
                    if save:
                        attempts[-1]["last_checkpointed_step"] = step
                        if rank == 0:
                            trainer.save(Path(tmp) / TRAINER_DIR,
                                         extra={"name": cfg.name, "loss": loss, "attempts": attempts})
                            ckpt = Checkpoint.from_directory(tmp)
                    # named by the step: unique, and in the order they were written
                    ray.train.report(report, checkpoint=ckpt,
                                     checkpoint_dir_name=f"checkpoint_{step:08d}" if save else None)
            if trainer.step_count >= t.steps:
                break
        if batches == 0:
            raise RuntimeError(f"worker {rank} got no batch of {cfg.per_worker_batch} rows in pass {passes}: "
                               f"add data or lower training.batch_size")
        passes += 1
    return {"step": trainer.step_count, "history": history, "attempts": attempts}


def fit(cfg: TrainJobConfig, train_dataset, n_examples: int):
    """Run the TorchTrainer over ``train_dataset`` (token + state columns); returns Ray Train's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from actors.storage import filesystem, is_uri

    r = cfg.ray
    # shared storage by URI: our filesystem (timeouts, retries, endpoint_override), credentials from each node
    fs, storage_path = filesystem(cfg.storage_path) if is_uri(cfg.storage_path) else (None, cfg.storage_path)
    # custom resources (e.g. anchor_node) pin the workers to the node types that declare them
    resources = {"CPU": r.cpus_per_worker, **r.resources_per_worker}
    if r.gpus_per_worker:
        resources["GPU"] = r.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg, "examples": n_examples},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_dataset},
    )
    return trainer.fit()

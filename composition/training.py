"""The bridge-training loop: one implementation, used in-process and by every Ray Train worker.

    trainer = BridgeTrainer(model, TrainSettings(lr=1e-3, steps=1000))
    for batch in batches:                       # dicts of [batch, seq] tensors
        metrics = trainer.step(batch)           # loss, tokens, lr, step
    trainer.save(folder)                        # bridges + optimizer state, safetensors only

Any model with ``trainable_parameters()`` and ``forward(input_ids, attention_mask, labels=...,
augment_states=...)`` can be trained (an experiment can pre-train small models with
it too); for a ComposedModel only the bridge parameters reach the optimiser. Under torch.distributed
(Ray Train's workers) the bridge gradients are averaged across workers after each backward pass, and
the initial bridge weights are broadcast from rank 0, so the frozen models are never wrapped or
synchronised. The learning rate follows torch's own schedulers: linear warmup, then cosine decay to
``min_lr_ratio * lr``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from composition.checkpoint import atomic_folder, save_bridges

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
WEIGHTS_FILE = "trainable.safetensors"


@dataclass
class TrainSettings:
    """Optimisation settings for the bridges (AdamW, linear warmup, cosine decay).

    The one definition of these keys: the training job's ``training:`` section extends it
    (``actors.train.config.TrainingSettings``), and pydantic validates it there; the checks below
    hold for in-process use too.
    """

    __pydantic_config__ = {"extra": "forbid"}  # as a config section: unknown keys are errors

    lr: float = 1e-3
    steps: int = 1000
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        for key in ("lr", "steps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "weight_decay", "grad_clip", "min_lr_ratio"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")

    def scheduler(self, optimizer: torch.optim.Optimizer) -> LRScheduler:
        """The learning-rate schedule on ``optimizer``: step ``s`` runs at ``lr * (s + 1) / warmup_steps``
        during warmup, then cosine from ``lr`` down to ``min_lr_ratio * lr`` at ``steps``."""
        decay = CosineAnnealingLR(optimizer, T_max=max(1, self.steps - self.warmup_steps),
                                  eta_min=self.lr * self.min_lr_ratio)
        if self.warmup_steps <= 1:
            return decay
        warmup = LinearLR(optimizer, start_factor=1 / self.warmup_steps, total_iters=self.warmup_steps - 1)
        return SequentialLR(optimizer, [warmup, decay], milestones=[self.warmup_steps])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class BridgeTrainer:
    """Owns the optimiser over ``model.trainable_parameters()``, its schedule and the step counter."""

    def __init__(self, model, settings: TrainSettings):
        self.model = model
        self.settings = settings
        self.params = model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.schedule = settings.scheduler(self.optimizer)
        self.step_count = 0
        if _distributed():
            for p in self.params:
                dist.broadcast(p.data, src=0)

    def step(self, batch: dict) -> dict:
        """One optimiser step on ``batch``.

        ``batch`` holds ``input_ids`` [batch, seq], optional ``attention_mask`` and ``labels``
        (default: the input ids), optional ``augment_states`` (per augmenting model
        ``{index: [batch, seq_i, d_aug]}``, e.g. streamed from Ray actors) and optional ``augment_inputs``
        (per augmenting model its tokens and alignment, for models with different tokenizers).
        Returns ``{"loss", "tokens", "lr", "step"}`` for this step (``lr``: the rate it ran at).
        """
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        # the LM head runs only where a label is predicted (same loss; most of a step for small models)
        # augmenting models with their own tokenizers: their precomputed tokens and alignment (composition.alignment)
        aligned = {"augment_inputs": batch["augment_inputs"]} if batch.get("augment_inputs") is not None else {}
        out = self.model(ids, mask, labels=batch.get("labels", ids), augment_states=batch.get("augment_states"),
                         labelled_logits_only=True, **aligned)
        out.loss.backward()
        if _distributed():
            world = dist.get_world_size()
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step_count += 1
        tokens = int(mask.sum()) if mask is not None else ids.numel()
        return {"loss": float(out.loss.detach()), "tokens": tokens, "lr": lr, "step": self.step_count}

    # -------------------------------------------------------------- checkpoints (safetensors + JSON only)
    def save(self, folder: str | os.PathLike, extra: dict | None = None) -> None:
        """Atomically write the trained weights and the optimiser state.

        The folder holds ``trainable.safetensors`` (the trained parameters, in order),
        ``optimizer.safetensors`` and ``trainer_state.json``; for a ComposedModel also ``bridges/``,
        loadable with ``ComposedModel.from_pretrained``.
        """
        tensors, scalars = {}, {}
        for i, p in enumerate(self.params):
            state = self.optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    tensors[f"{i}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars[f"{i}.{key}"] = float(value)
        meta = {"step": self.step_count, "settings": asdict(self.settings), "scalars": scalars,
                "schedule": self.schedule.state_dict(), **(extra or {})}
        weights = {str(i): p.detach().contiguous().cpu() for i, p in enumerate(self.params)}
        with atomic_folder(folder) as tmp:
            save_file(weights, str(tmp / WEIGHTS_FILE))
            if hasattr(self.model, "bridges"):
                save_bridges(self.model, tmp / "bridges")
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def load(self, folder: str | os.PathLike) -> dict:
        """Restore bridges, optimiser state and step count from ``save``; returns the saved metadata."""
        folder = Path(folder)
        meta = json.loads((folder / STATE_FILE).read_text())
        weights = load_file(str(folder / WEIGHTS_FILE))
        if len(weights) != len(self.params):
            raise ValueError(f"{folder} holds {len(weights)} trained tensors, this model trains {len(self.params)}")
        device = self.params[0].device
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if weights[str(i)].shape != p.shape:
                    raise ValueError(f"{folder}: tensor {i} has shape {tuple(weights[str(i)].shape)}, expected {tuple(p.shape)}")
                p.copy_(weights[str(i)].to(device))
        tensors = load_file(str(folder / OPTIMIZER_FILE))
        for i, p in enumerate(self.params):
            state = {}
            for key in ("exp_avg", "exp_avg_sq"):
                if f"{i}.{key}" in tensors:
                    state[key] = tensors[f"{i}.{key}"].to(device)
            if f"{i}.step" in meta["scalars"]:
                state["step"] = torch.tensor(meta["scalars"][f"{i}.step"])
            if state:
                self.optimizer.state[p] = state
        self.step_count = int(meta["step"])
        if "schedule" in meta:
            self.schedule.load_state_dict(meta["schedule"])
            for group, lr in zip(self.optimizer.param_groups, self.schedule.get_last_lr()):
                group["lr"] = lr  # loading a schedule's state does not touch the optimiser it drives
        else:  # a checkpoint from before the schedule was saved: replay it to the step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
                for _ in range(self.step_count):
                    self.schedule.step()
        return meta

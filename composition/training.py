"""The bridge-training loop: one implementation, used in-process and by every Ray Train worker.

    trainer = BridgeTrainer(model, TrainSettings(lr=1e-3, steps=1000))
    for batch in batches:                       # dicts of [batch, seq] tensors
        metrics = trainer.step(batch)           # loss, tokens, lr, step
    trainer.save(folder)                        # bridges + optimizer state, safetensors only

Any model with ``trainable_parameters()`` and ``forward(input_ids, attention_mask, labels=...,
augment_states=...)`` can be trained (the key-value experiment pre-trains its small models with
it too); for a ComposedModel only the bridge parameters reach the optimiser. Under torch.distributed (Ray Train's workers) the
bridge gradients are averaged across workers after each backward pass, and the initial bridge
weights are broadcast from rank 0, so the frozen models are never wrapped or synchronised.

Plateau restarts: some runs sit on a loss plateau that a fresh initialisation may escape (the key-value
experiment's bridges left it in about 1 of 3 starts while every composition row held 3-6 keys; the fix
there was the data, experiments/kv_arithmetic/README.md). With
``plateau_restarts > 0``, a run whose mean loss over the last 100 steps is still above
``plateau_max_loss`` at step ``plateau_check_step`` starts again: new random bridges, a fresh
optimiser and warmup, step 0, at most ``plateau_restarts`` times. The step that triggers it returns
``restarted: True``; ``steps_run`` counts every step over all starts (the data position).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from composition.checkpoint import atomic_folder, save_bridges

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
WEIGHTS_FILE = "trainable.safetensors"


@dataclass
class TrainSettings:
    """Optimisation settings for the bridges (AdamW with linear warmup and cosine decay)."""

    lr: float = 1e-3
    steps: int = 1000
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    plateau_check_step: int = 0  # 0: never restart
    plateau_max_loss: float = 0.0
    plateau_restarts: int = 0
    plateau_window: int = 100

    def __post_init__(self):
        if self.plateau_restarts:
            if not 0 < self.plateau_check_step < self.steps:
                raise ValueError(f"plateau_check_step must be in (0, steps={self.steps}) when plateau_restarts > 0, "
                                 f"got {self.plateau_check_step}")
            if self.plateau_max_loss <= 0:
                raise ValueError(f"plateau_max_loss must be positive when plateau_restarts > 0, "
                                 f"got {self.plateau_max_loss}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class BridgeTrainer:
    """Owns the optimiser over ``model.trainable_parameters()`` and the step counter."""

    def __init__(self, model, settings: TrainSettings):
        self.model = model
        self.settings = settings
        self.params = model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.step_count = 0
        self.steps_run = 0  # over all starts: where the data stream is
        self.restarts = 0
        self._losses: list[float] = []
        if self.settings.plateau_restarts and not hasattr(model, "reset_trainable_parameters"):
            raise ValueError(f"plateau restarts need a model with reset_trainable_parameters() "
                             f"({type(model).__name__} has none): set plateau_restarts to 0")
        self._broadcast()

    def _broadcast(self) -> None:
        if _distributed():
            for p in self.params:
                dist.broadcast(p.data, src=0)

    def _on_plateau(self) -> bool:
        """At the check step: is the mean loss of the last window (over all workers) above the limit?"""
        s = self.settings
        if not (s.plateau_restarts and self.restarts < s.plateau_restarts and self.step_count == s.plateau_check_step):
            return False
        recent = self._losses[-s.plateau_window:]
        loss = torch.tensor(sum(recent) / len(recent), dtype=torch.float64, device=self.params[0].device)
        if _distributed():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        return float(loss) > s.plateau_max_loss

    def restart(self) -> None:
        """Start again from a fresh initialisation of the trained parameters: new optimiser, step 0."""
        with torch.no_grad():
            self.model.reset_trainable_parameters()
        self._broadcast()
        self.optimizer = torch.optim.AdamW(self.params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        self.step_count = 0
        self.restarts += 1
        self._losses = []

    def step(self, batch: dict) -> dict:
        """One optimiser step on ``batch``.

        ``batch`` holds ``input_ids`` [batch, seq], optional ``attention_mask`` and ``labels``
        (default: the input ids), and optional ``augment_states`` (per augmenting model
        ``{index: [batch, seq, d_aug]}``, e.g. streamed from Ray actors).
        Returns ``{"loss", "tokens", "lr", "step", "steps_run", "restarts"}`` for this step, plus ``restarted: True``
        when this step ended a run on a plateau (the next step is step 1 of a fresh start).
        """
        self.model.train()
        lr = self.settings.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        # the LM head runs only where a label is predicted (same loss; most of a step for small models)
        out = self.model(ids, mask, labels=batch.get("labels", ids), augment_states=batch.get("augment_states"),
                         labelled_logits_only=True)
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
        self.step_count += 1
        self.steps_run += 1
        loss = float(out.loss.detach())
        self._losses = (self._losses + [loss])[-self.settings.plateau_window:]
        tokens = int(mask.sum()) if mask is not None else ids.numel()
        metrics = {"loss": loss, "tokens": tokens, "lr": lr, "step": self.step_count, "steps_run": self.steps_run,
                   "restarts": self.restarts}
        if self._on_plateau():
            self.restart()
            metrics.update(restarted=True, restarts=self.restarts)
        return metrics

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
        meta = {"step": self.step_count, "steps_run": self.steps_run, "restarts": self.restarts,
                "recent_losses": self._losses, "settings": asdict(self.settings), "scalars": scalars, **(extra or {})}
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
        self.steps_run = int(meta.get("steps_run", self.step_count))
        self.restarts = int(meta.get("restarts", 0))
        self._losses = list(meta.get("recent_losses", []))
        return meta

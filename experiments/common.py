"""What the experiments share: a resumable stage log, the plain-LM wrapper, a training loop with progress.

Every training stage goes through ``composition.training.BridgeTrainer`` (the loop the Ray Train job
runs), checkpoints every ``checkpoint_every`` steps and resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn
from tqdm import tqdm

from composition.cache import CompositionCache
from composition.checkpoint import atomic_file, files_signature
from composition.loss import call_with_loss
from composition.model import positions_from_mask
from composition.training import BridgeTrainer, TrainSettings


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


class StageLog:
    """Progress across stages (with an ETA from the stages' measured times) and their persisted records."""

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
            recorded, now = self.records.get(key, {}).get("inputs"), plain(inputs)
            if recorded is not None and recorded != now:
                changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
                raise SystemExit(
                    f"error: stage {name} in {self.path.parent} ran with other settings ({', '.join(changed)} "
                    f"changed). Delete {folder} to run it again with this config, or set a new 'output'.")
        print(f"\n=== stage {name}: {'already done, skipped' if done else 'running'} (elapsed {elapsed})", flush=True)
        return not done

    def record(self, name: str, info: dict, inputs: dict | None = None) -> None:
        if inputs is not None:
            info = {**info, "inputs": plain(inputs)}
        self.records[name] = info
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.records, indent=1) + "\n")

    def stop(self, name: str) -> bool:
        return self.stop_after == name


def plain(value):
    """Dataclasses and tuples as JSON gives them back (for comparing a stage's recorded settings)."""
    return json.loads(json.dumps(value, default=lambda o: o.model_dump() if isinstance(o, BaseModel) else asdict(o)))


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


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(model, rank: int):
    """``model`` with LoRA adapters of ``rank`` on every attention and MLP projection (alpha = rank)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS))


def weights_fingerprint(folder: Path) -> list:
    """What identifies trained weights on disk: their files' names, sizes and mtimes."""
    return files_signature(Path(folder).rglob("*.safetensors"))

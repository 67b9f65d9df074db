"""Building blocks of the key-value experiment: batching, model builders, training stages, evaluation.

Every stage trains through ``composition.training.BridgeTrainer`` (the loop the Ray Train job
runs), checkpoints every ``checkpoint_every`` steps and resumes from its last checkpoint.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from torch import nn

from composition.cache import CompositionCache
from composition.generate import generate
from composition.loss import call_with_loss
from composition.model import positions_from_mask
from composition.training import BridgeTrainer, TrainSettings


# ---------------------------------------------------------------- batching
def encode_rows(tok, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + eos) per row."""
    prompts = tok([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    completions = tok([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    return [(p, c + [tok.eos_token_id]) for p, c in zip(prompts, completions)]


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


# ---------------------------------------------------------------- models
def llama(vocab: int, hidden: int, layers: int, heads: int, seed: int, pad_id: int, eos_id: int, bos_id: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
                      pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


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


# ---------------------------------------------------------------- training with progress and resume
def compose_warmup(steps: int) -> int:
    """Warmup steps of a bridge (or LoRA) training run of ``steps`` steps: the experiment's one rule."""
    return min(50, steps // 10)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


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


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def exact_match(model, tok, rows: list[dict], batch_size: int = 256, max_new_tokens: int = 16,
                label: str = "eval", device: str | torch.device = "cpu") -> float:
    """Share of rows whose greedy completion equals the expected completion exactly."""
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tok([r["prompt"] for r in chunk], add_special_tokens=False, padding=True, return_tensors="pt")
        out = generate(model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                       max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(t.strip() == r["completion"] for t, r in zip(texts, chunk))
    acc = correct / max(1, len(rows))
    print(f"[{label}] exact match {acc:.4f} on {len(rows)}", file=sys.stderr, flush=True)
    return acc

"""Building blocks of the key-value experiment: the model builder, the systems it compares and their evaluation.

The training loop, batching, row encoding and the plain-LM wrapper it shares with the language experiment are
in ``experiments/common.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from composition.generate import generate
from experiments.common import PlainLM
from experiments.kv_arithmetic.config import ExperimentConfig


def llama(vocab: int, hidden: int, layers: int, heads: int, seed: int, pad_id: int, eos_id: int, bos_id: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
                      pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


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


def systems(cfg: ExperimentConfig, out: Path) -> dict:
    """name -> (folders whose weights define it, loader)."""
    from composition import ComposedModel, load_causal_lm

    def calm(augment: Path, bridges: Path):
        return lambda: ComposedModel.from_pretrained(bridges, load_causal_lm(str(out / "anchor")),
                                                     [load_causal_lm(str(augment))])

    def lora():
        from peft import PeftModel

        return PlainLM(PeftModel.from_pretrained(load_causal_lm(str(out / "anchor")), str(out / "ablation_lora")))

    table = {
        "m_A": ([out / "augment"], lambda: PlainLM(load_causal_lm(str(out / "augment")))),
        "m_B": ([out / "anchor"], lambda: PlainLM(load_causal_lm(str(out / "anchor")))),
        "CALM": ([out / "anchor", out / "augment", out / "bridges"], calm(out / "augment", out / "bridges")),
    }
    if cfg.random_augment_ablation:
        rnd = out / "ablation_random"
        table["CALM, random m_A"] = ([out / "anchor", rnd / "augment", rnd / "bridges"],
                                     calm(rnd / "augment", rnd / "bridges"))
    if cfg.lora_ablation:
        table["LoRA on m_B"] = ([out / "anchor", out / "ablation_lora"], lora)
    return table

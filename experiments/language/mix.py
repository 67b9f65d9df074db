"""Stage 3 of the language experiment: the training rows, the evaluation sets, and the proof that they share no
held-out item."""

from __future__ import annotations

import json
import random
from pathlib import Path

from composition.checkpoint import atomic_folder
from experiments.common import write_jsonl
from experiments.language.config import LANGUAGES, LanguageConfig, translation_prompt
from experiments.language.data import sample_texts


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


def bpc_sets(cfg: LanguageConfig, splits: dict, languages) -> dict:
    """Held-out texts for bits per character, ``cfg.bpc_texts`` per language (English: passages of KJV verses)."""
    bpc = {}
    for lang in languages:
        rows = splits["bpc"][lang]["test"]
        if lang == "en":
            rows = passages(rows, cfg.bpc_chars[1])
        bpc[lang] = sample_texts(rows, cfg.bpc_texts, cfg.bpc_chars[0], cfg.bpc_chars[1], seed=cfg.seed)
    return bpc


def eval_sets(cfg: LanguageConfig, splits: dict) -> dict:
    """The held-out evaluation sets: verse pairs to translate and texts per language."""
    rng = random.Random(cfg.seed + 1)
    test = splits["translation"]["test"]
    verses = sorted(rng.sample(range(len(test)), min(cfg.eval_verses, len(test))))
    return {"translation": [test[i] for i in verses], "bpc": bpc_sets(cfg, splits, LANGUAGES)}


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


def write_mix(cfg: LanguageConfig, splits: dict, shots: list[dict], folder: Path) -> dict:
    """``folder``/train.jsonl (the training rows) and eval.json (the evaluation sets), written together once the
    held-out check passes; returns how many rows of each kind were made and the check's counts."""
    rows, made = build_mix(cfg, splits, shots)
    evals = eval_sets(cfg, splits)
    checks = check_heldout(rows, evals, splits)
    if any(checks.values()):
        raise RuntimeError(f"held-out items reached the training rows: {checks}")
    with atomic_folder(folder) as tmp:
        write_jsonl(rows, tmp / "train.jsonl")
        (tmp / "eval.json").write_text(json.dumps(evals, ensure_ascii=False) + "\n")
    return {"rows": made, "checks": checks}

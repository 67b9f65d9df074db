"""The rows of the two arms (experiments/language/arms.py): the domain's training split that the specialist sees, the
composition data (a share of it), the evaluation sets, and the proof that they share no held-out item.

The domain is Spanish <-> English: Bible verses of the training books in both directions, the gettext messages of
the training packages (Spanish -> English) and Spanish text (fortunes). Every row is in Spanish or English, so
no language the transfer arm evaluates is in the composition data (``check_languages_disjoint``).
"""

from __future__ import annotations

import random

from experiments.language.config import ArmsConfig, translation_prompt
from experiments.language.gettext_pairs import check_languages_disjoint, composition_share, english_key
from experiments.language.mix import bpc_sets, packed

BPC_LANGUAGES = ("en", "es", "de", "it", "ru")  # English (KJV) and the languages with held-out fortunes


def gettext_shot(gettext_train: list[dict], languages: list[str], min_chars: int = 25, max_chars: int = 70) -> dict:
    """The prompt's shot for gettext messages: one training message translated in every one of ``languages``,
    the first by its English text among the sentences (a capital letter first) of ``min_chars``..``max_chars``
    characters, as ``{"ref", "en", <lang>: text, ...}``."""
    by_english: dict[str, dict] = {}
    for r in gettext_train:
        if min_chars <= len(r["en"]) <= max_chars and r["en"][0].isupper():
            by_english.setdefault(r["en"], {})[r["lang"]] = r["xx"]
    for english in sorted(by_english):
        if set(languages) <= set(by_english[english]):
            return {"ref": f"gettext:{english}", "en": english, **{k: by_english[english][k] for k in languages}}
    raise SystemExit(f"error: no training gettext message of {min_chars}-{max_chars} characters is translated in "
                     f"all of {languages}: the data stage holds too few packages for them")


def _translation_row(text: str, target_text: str, shots: list[dict], kind: str, ref: str, source: str = "es",
                     target: str = "en") -> dict:
    return {"prompt": translation_prompt(text, shots, source, target), "completion": " " + target_text, "kind": kind,
            "source": ref, "lang": source}


def domain_rows(cfg: ArmsConfig, splits: dict, verse_shots: list[dict], message_shot: dict) -> tuple[list[dict], dict]:
    """The specialist's rows (``specialist_steps x batch_size``, shuffled, each at most once), drawn from the
    training split by ``cfg.domain_mix``; and how many of each kind."""
    rng = random.Random(cfg.seed)
    total = cfg.specialist_steps * cfg.batch_size
    shares = cfg.domain_mix.model_dump()
    counts = {k: round(total * v / sum(shares.values())) for k, v in shares.items()}
    counts["translation"] += total - sum(counts.values())
    shot_refs = {s["ref"] for s in verse_shots}
    verses = [p for p in splits["translation"]["train"] if p["ref"] not in shot_refs]
    picked = rng.sample(verses, min(counts["translation"] + counts["reverse"], len(verses)))
    rows = [_translation_row(p["es"], p["en"], verse_shots, "translation", p["ref"])
            for p in picked[: counts["translation"]]]
    rows += [_translation_row(p["en"], p["es"], verse_shots, "reverse", p["ref"], "en", "es")
             for p in picked[counts["translation"]:]]
    messages = [r for r in splits["gettext"]["train"] if r["lang"] == "es" and r["en"] != message_shot["en"]]
    for r in rng.sample(messages, min(counts["gettext"], len(messages))):
        rows.append(_translation_row(r["xx"], r["en"], [message_shot], "gettext", f"{r['package']}:{r['en']}"))
    for text, sources in packed(splits["bpc"]["es"]["train"], counts["es"], cfg.pack_chars["es"], rng):
        rows.append({"prompt": "", "completion": text, "kind": "es", "source": sources, "lang": "es"})
    rng.shuffle(rows)
    return rows, {k: sum(r["kind"] == k for r in rows) for k in counts}


def composition_rows(cfg: ArmsConfig, rows: list[dict]) -> list[dict]:
    """The composition data: a seeded ``composition_share`` of the specialist's rows (the paper's ~5%), in Spanish
    and English only."""
    share = composition_share(rows, cfg.composition_share, seed=cfg.seed + 11)
    check_languages_disjoint([r["lang"] for r in share], cfg.unseen_languages)
    return share


def eval_sets(cfg: ArmsConfig, splits: dict) -> dict:
    """Held-out sets: ``eval_verses`` Spanish verses of the test books; ``eval_messages`` gettext messages of the
    test packages per language (Spanish and every unseen one), the same English messages in each where the
    catalogues allow; texts for bits per character."""
    rng = random.Random(cfg.seed + 1)
    test = splits["translation"]["test"]
    verses = [test[i] for i in sorted(rng.sample(range(len(test)), min(cfg.eval_verses, len(test))))]
    languages = ["es", *cfg.unseen_languages]
    by_lang: dict[str, dict[str, dict]] = {lang: {} for lang in languages}
    for r in splits["gettext"]["test"]:
        if r["lang"] in by_lang:
            by_lang[r["lang"]].setdefault(english_key(r["en"]), r)
    missing = [lang for lang in languages if not by_lang[lang]]
    if missing:
        raise SystemExit(f"error: the data stage holds no held-out gettext messages in {missing}: add them to "
                         "DataSettings.gettext_languages (experiments/language/data.py) and rerun it")
    common = sorted(set.intersection(*(set(m) for m in by_lang.values())))
    chosen = sorted(rng.sample(common, min(cfg.eval_messages, len(common))))
    messages = {lang: [{"ref": f"{by_lang[lang][k]['package']}:{by_lang[lang][k]['en']}", lang: by_lang[lang][k]["xx"],
                        "en": by_lang[lang][k]["en"]} for k in chosen] for lang in languages}
    return {"verses": verses, "messages": messages, "bpc": bpc_sets(cfg, splits, BPC_LANGUAGES)}


def check_heldout(rows: list[dict], evals: dict, splits: dict, packages: dict) -> dict:
    """Counts (all must be 0) of evaluation items the specialist's rows (and so the composition data) could hold."""
    trained = {r["completion"].strip() for r in rows} | {r["prompt"] for r in rows}
    refs = {r["source"] for r in rows if r["kind"] in ("translation", "reverse")}
    held_books = {r["ref"] for s in ("valid", "test") for r in splits["bible"][s]}
    message_english = {english_key(r["source"].split(":", 1)[1]) for r in rows if r["kind"] == "gettext"}
    row_packages = {r["source"].split(":", 1)[0] for r in rows if r["kind"] == "gettext"}
    held_packages = set(packages["test"]) | set(packages["valid"])
    return {
        "eval_verses_in_rows": sum(p["ref"] in refs for p in evals["verses"]),
        "eval_references_in_rows": sum(p["en"].strip() in trained for p in evals["verses"]),
        "eval_messages_in_rows": sum(english_key(m["en"]) in message_english
                                     for items in evals["messages"].values() for m in items),
        "rows_from_heldout_packages": len(row_packages & held_packages),
        "rows_from_heldout_books": len(refs & held_books),
        "eval_texts_in_rows": sum(any(t["text"].strip() in c for c in trained) for texts in evals["bpc"].values()
                                  for t in texts),
    }

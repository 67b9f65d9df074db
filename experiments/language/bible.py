"""The parallel Bible: KJV (English) and Reina-Valera 1909 (Spanish) verse pairs, with a check that each
pair really holds the same verse.

Both SWORD modules use the KJV versification, but where the Spanish tradition numbers verses
differently the RV1909 module keeps its own numbers inside the KJV index: e.g. KJV Jonah 1:17 is
Jonás 2:1, so the module's Jonah 1:17 is empty, its Jonah 2:1..2:9 hold KJV 1:17, 2:1..2:8, and its
2:10 holds two verses. Pairing by reference alone would silently mistranslate such chapters.

Both modules tag words with Strong's numbers (the Hebrew/Greek word each rendering translates), so a
pair is checked by the share of Strong's numbers the two sides have in common (of the shorter side's
count). A pair is kept when that share is at least ``min_overlap``, no neighbouring Spanish verse
(v-1, v+1) matches the English verse better, and the Spanish/English length ratio is within bounds
(Strong's numbers cannot see a merged verse: KJV 1 Kings 22:53 pairs with Spanish 22:53+54). A
chapter where more than ``max_bad_chapter_share`` of the verses with text on both sides fail is
dropped whole (a shifted chapter). On the Debian 12 packages 273 of 31,102 verses fail (18 of them empty on one side; some
others are true pairs whose neighbour is nearly the same verse, a loss accepted for a clean test
set), 9 chapters are dropped (Numbers 13 and 30, 1 Samuel 24, 1 Chronicles 21, 2 Chronicles 33, Job
39 and 40, Hosea 12, Jonah 2), and 30,803 pairs are kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .sword import Verse
from .versification import BOOK_NAMES


@dataclass(frozen=True)
class AlignmentSettings:
    min_overlap: float = 0.5
    max_bad_chapter_share: float = 0.25
    # Spanish/English character-length ratio a pair must lie in (median 0.92): above, the Spanish side
    # holds a merged verse or a subscription ("Fué escrita á los Hebreos desde Italia..."), below, the
    # two translations split verses at different places
    min_length_ratio: float = 0.45
    max_length_ratio: float = 1.6


def strongs_overlap(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    """Shared Strong's numbers (with multiplicity) over the smaller side's count; 0 when a side has none."""
    if not a or not b:
        return 0.0
    return sum((Counter(a) & Counter(b)).values()) / min(len(a), len(b))


def align(english: list[Verse], spanish: list[Verse], settings: AlignmentSettings = AlignmentSettings()
          ) -> tuple[list[dict], dict]:
    """Verse pairs ``{"book", "chapter", "verse", "ref", "en", "es", "overlap"}`` that pass the check, in
    canonical order, and a report ``{"verses", "empty", "empty_refs", "failed_check", "dropped_chapters",
    "pairs", "examples"}`` (examples: a few failed pairs outside the dropped chapters).

    ``english`` and ``spanish`` must hold the same references in the same order (both modules read with
    the KJV versification)."""
    if [(v.book, v.chapter, v.verse) for v in english] != [(v.book, v.chapter, v.verse) for v in spanish]:
        raise ValueError("the two modules do not hold the same verse references: both must use the KJV versification")
    by_ref = {(v.book, v.chapter, v.verse): v for v in spanish}
    empty, failed, overlaps = [], set(), {}
    for en in english:
        key = (en.book, en.chapter, en.verse)
        es = by_ref[key]
        if not en.text or not es.text:
            empty.append(en.ref)
            failed.add(key)
            continue
        own = strongs_overlap(en.strongs, es.strongs)
        overlaps[key] = own
        neighbours = [strongs_overlap(en.strongs, by_ref[n].strongs)
                      for n in ((en.book, en.chapter, en.verse - 1), (en.book, en.chapter, en.verse + 1)) if n in by_ref]
        ratio = len(es.text) / len(en.text)
        if (own < settings.min_overlap or any(x > own for x in neighbours)
                or not settings.min_length_ratio <= ratio <= settings.max_length_ratio):
            failed.add(key)
    # the chapter rule counts the verses both modules have text for
    per_chapter: Counter = Counter(key[:2] for key in overlaps)
    bad_per_chapter: Counter = Counter(key[:2] for key in failed if key in overlaps)
    dropped_set = {c for c, n in bad_per_chapter.items() if n / per_chapter[c] > settings.max_bad_chapter_share}
    pairs, examples = [], []
    for en in english:
        key = (en.book, en.chapter, en.verse)
        if key in failed or (en.book, en.chapter) in dropped_set:
            if key in overlaps and len(examples) < 5 and (en.book, en.chapter) not in dropped_set:
                examples.append({"ref": en.ref, "en": en.text, "es": by_ref[key].text, "overlap": round(overlaps[key], 3)})
            continue
        pairs.append({"book": en.book, "chapter": en.chapter, "verse": en.verse, "ref": en.ref,
                      "en": en.text, "es": by_ref[key].text, "overlap": round(overlaps[key], 3)})
    order = {c: i for i, c in enumerate(dict.fromkeys((v.book, v.chapter) for v in english))}
    report = {"verses": len(english), "empty": len(empty), "empty_refs": empty,
              "failed_check": len(failed) - len(empty),
              "dropped_chapters": [f"{BOOK_NAMES[b]} {c}" for b, c in sorted(dropped_set, key=order.get)],
              "pairs": len(pairs), "examples": examples}
    return pairs, report

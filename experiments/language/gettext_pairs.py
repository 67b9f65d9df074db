"""Parallel English -> XX text from gettext catalogues: the translated messages that Debian packages ship.

A package's translations lie in ``usr/share/locale/<lang>/LC_MESSAGES/<package>.mo``: each maps an English
message (msgid) to its translation (msgstr). ``coreutils``, ``tar``, ``grep`` and ``sed`` alone give ~700-1,000
pairs per language for ~50 languages, with the same English side across languages (so languages can be
compared on the same sentences, and held out whole).

Read with the standard library's ``gettext.GNUTranslations``, which decodes each catalogue by the charset its
header declares (legacy catalogues are ISO-8859-x, KOI8-R, ...). Plural entries are keyed by ``(msgid, n)``:
the singular English text is paired with the first form. A message context (``ctxt\\x04msgid``) is dropped.
Kept are messages a translation model can learn from:

- not the header (msgid ""), not untranslated (empty, or equal to the English text);
- no format directives (``%s``, ``%1$d``, ``%%``; ``{0}``), which make a message a template, not a sentence;
- at least one letter, and ``min_chars`` to ``max_chars`` characters of English;
- not an option listing of a ``--help`` text (English starting with "-": "-a, --all  same as ...").

Splits hold out whole packages (:func:`split_by_package`), so no message of a held-out package, and no
English text that also occurs in a training package, reaches the training rows.
"""

from __future__ import annotations

import gettext
import random
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

LOCALE_ROOT = "usr/share/locale"
# printf (%s, %-5d, %1$s, %%, %'d), Python/ICU braces ({0}, {name}), shell-style ${VAR}
_FORMAT = re.compile(r"%[-+ #0'1-9$.*lhjztL]*[a-zA-Z%]|\{[\w.]*\}|\$\{\w+\}")


@dataclass(frozen=True)
class Pair:
    """One message: its English text and its translation in ``lang``, from ``package``."""

    package: str
    lang: str
    en: str
    xx: str

    def row(self) -> dict:
        return {"package": self.package, "lang": self.lang, "en": self.en, "xx": self.xx}


def read_catalogue(path: str | Path) -> dict[str, str]:
    """English message -> translation, for every translated entry of a ``.mo`` file (its declared charset).

    Plural entries give their singular English text and first form; contexts are dropped; the header,
    untranslated and empty entries are left out.
    """
    with open(path, "rb") as f:
        catalogue = gettext.GNUTranslations(f)._catalog  # decoded by the header's charset
    out: dict[str, str] = {}
    for key, translation in catalogue.items():
        if isinstance(key, tuple):
            english, form = key
            if form != 0:
                continue
        else:
            english = key
        english = english.split("\x04", 1)[-1]  # "context\x04message"
        if english and translation and translation != english:
            out.setdefault(english, translation)
    return out


def is_sentence(english: str, translation: str, min_chars: int = 20, max_chars: int = 200) -> bool:
    """Whether a message is worth translating: no format directives, letters, a length in bounds."""
    if not min_chars <= len(english) <= max_chars:
        return False
    if _FORMAT.search(english) or _FORMAT.search(translation) or english.lstrip().startswith("-"):
        return False
    return any(c.isalpha() for c in english) and any(c.isalpha() for c in translation)


def clean(text: str) -> str:
    """One line: gettext messages carry newlines and UI layouts (whitespace is collapsed) and control characters
    (bash's "\\a" bell before "timed out waiting for input"), which are dropped."""
    return " ".join("".join(c for c in text if unicodedata.category(c) != "Cc" or c.isspace()).split())


def read_pairs(root: str | Path, languages: list[str], packages: list[str], min_chars: int = 20,
               max_chars: int = 200) -> list[Pair]:
    """Every kept message of ``packages`` in ``languages`` under ``root`` (a folder packages were unpacked into).
    A message several packages ship comes once per package: :func:`split_by_package` keeps one.

    A language folder may be a locale with a region (pt_BR, zh_CN): name it as it is. A package without a
    catalogue for a language is skipped for it; a language no package translates is an error naming it.
    """
    root = Path(root) / LOCALE_ROOT
    pairs: list[Pair] = []
    for lang in languages:
        found = False
        for package in packages:
            path = root / lang / "LC_MESSAGES" / f"{package}.mo"
            if not path.is_file():
                continue
            found = True
            for english, translation in sorted(read_catalogue(path).items()):
                english, translation = clean(english), clean(translation)
                if is_sentence(english, translation, min_chars, max_chars):
                    pairs.append(Pair(package, lang, english, translation))
        if not found:
            raise ValueError(f"no catalogue of {packages} for language {lang!r} under {root}: unpack those packages "
                             f"there, or drop {lang!r}")
    return pairs


def dedupe(pairs: list[Pair]) -> list[Pair]:
    """One pair per (language, English text): several packages often ship the same message."""
    seen: set[tuple[str, str]] = set()
    out = []
    for p in pairs:
        if (p.lang, english_key(p.en)) not in seen:
            seen.add((p.lang, english_key(p.en)))
            out.append(p)
    return out


def english_key(text: str) -> str:
    """What makes two English messages the same one: case and whitespace ignored."""
    return " ".join(text.casefold().split())


def split_by_package(pairs: list[Pair], heldout: dict[str, list[str]]) -> dict[str, list[Pair]]:
    """Splits holding out whole packages: ``heldout`` maps a split (valid, test) to its packages; the rest is train.

    An English text is kept in the highest split it occurs in (test > valid > train), so no held-out
    sentence is trained on, in any language; and once per language in it (:func:`dedupe`). Texts are compared
    case-folded ("Write error" is "write error").
    """
    owner = {package: split for split, names in heldout.items() for package in names}
    clash = [p for p, n in ((p, sum(p in v for v in heldout.values())) for p in owner) if n > 1]
    if clash:
        raise ValueError(f"packages {clash} are held out for more than one split")
    order = ["train", *heldout]
    rank = {split: i for i, split in enumerate(order)}
    highest: dict[str, str] = {}
    for p in pairs:
        split = owner.get(p.package, "train")
        if rank[split] > rank[highest.get(english_key(p.en), "train")]:
            highest[english_key(p.en)] = split
    splits: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        split = owner.get(p.package, "train")
        if highest.get(english_key(p.en), "train") == split:
            splits[split].append(p)
    return {split: dedupe(splits.get(split, [])) for split in order}


def composition_share(rows: list, share: float, seed: int = 0) -> list:
    """A seeded random ``share`` of ``rows`` (at least one when there are any): the composition data, as the
    paper's ~5% of what trained the specialist."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if not rows:
        return []
    count = max(1, round(share * len(rows)))
    picked = sorted(random.Random(seed).sample(range(len(rows)), count))
    return [rows[i] for i in picked]


def check_languages_disjoint(composition_languages, unseen: list[str]) -> None:
    """Raise unless no language of the composition data (each row's language) is one the evaluation calls
    unseen."""
    leaked = sorted(set(composition_languages) & set(unseen))
    if leaked:
        raise ValueError(f"languages {leaked} are in the composition data but evaluated as unseen")

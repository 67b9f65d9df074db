"""The data stage of the language experiment: Debian packages -> held-out splits on disk.

    python -m experiments.language.data --out runs/language/data              # downloads with apt-get
    python -m experiments.language.data --out runs/language/data --from-dir ROOT  # already extracted

Inputs (all offline, from Debian packages; see README.md for licences):
    sword-text-kjv, sword-text-sparv   King James Version and Reina-Valera 1909 (SWORD zText modules)
    fortunes-de, -es, -it, -ru          fortune files (texts separated by "%" lines)
    coreutils, tar, grep, sed, ...      gettext catalogues: English -> XX messages (gettext_pairs.py)

Outputs in ``--out`` (one JSON object a line):
    bible_<split>.jsonl           aligned verse pairs {ref, book, chapter, verse, en, es, overlap}
    kjv_<split>.jsonl             every KJV verse of the split's books {ref, text} (English bits per char)
    fortunes_<lang>_<split>.jsonl {file, text}
    gettext_<split>.jsonl         English -> XX messages {package, lang, en, xx}, whole packages held out
    data.json                     settings, sizes, held-out books and files, packages (version, sha256),
                                  input file fingerprints, the alignment report and the disjointness checks

Splits are train, valid and test. Held out are whole Bible books and whole fortune files (settings
below); a text of a held-out split is also removed from the splits below it (test > valid > train)
when it repeats there (same text after normalising case and whitespace, ignoring fortune attribution
lines) or is contained in a text there. :func:`check_disjoint` proves the result and its counts
are recorded in data.json.

The stage resumes: a folder that holds a data.json made with the same settings is left as it is;
one made with other settings is refused, naming the settings that changed.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import time
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from tqdm import tqdm

from composition.checkpoint import atomic_file, file_sha256
from experiments.common import as_json, changed_settings, read_jsonl, write_jsonl

from . import fortunes as fortune_files_mod
from .bible import AlignmentSettings, align
from .gettext_pairs import LOCALE_ROOT, read_pairs, split_by_package
from .sword import ZTextModule
from .versification import BOOK_NAMES, BOOKS, VERSES

SPLITS = ("train", "valid", "test")
SWORD_ROOT = "usr/share/sword"
FORTUNES_ROOT = "usr/share/games/fortunes"


@dataclass
class DataSettings:
    """Everything that decides the splits; a change makes an existing output folder stale."""

    bible_packages: tuple[str, ...] = ("sword-text-kjv", "sword-text-sparv")
    english_module: str = "engKJV2006eb"
    spanish_module: str = "spaRV1909eb"
    languages: tuple[str, ...] = ("de", "es", "it", "ru")  # fortunes-<lang>
    # Held-out books (OSIS ids): narrative, prophecy, poetry-like prophecy and letters, 442 verses in all
    test_books: tuple[str, ...] = ("Ruth", "Joel", "Hab", "Titus", "Phlm", "1John", "2John", "3John", "Jude")
    valid_books: tuple[str, ...] = ("Esth", "Col")
    # Held-out fortune files, relative to usr/share/games/fortunes/<lang>/ (~10% of each language's texts)
    test_files: dict[str, list[str]] = field(default_factory=lambda: {
        "de": ["kinderzitate", "sprichworte", "stilblueten", "wusstensie"],
        "es": ["amistad.fortunes", "filosofia.fortunes", "verdad.fortunes"],
        "it": ["definizioni", "luttazzi"],
        "ru": ["happy", "time", "truth"],
    })
    valid_files: dict[str, list[str]] = field(default_factory=lambda: {
        "de": ["letzteworte"], "es": ["libertad.fortunes"], "it": ["formiche"], "ru": ["success"],
    })
    # Left out: the offensive collections (fortune -o), and ASCII art that is not language
    exclude_files: tuple[str, ...] = ("off", "asciiart", "banner")
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)
    # gettext catalogues (usr/share/locale/<lang>/LC_MESSAGES/<package>.mo) of these packages, in these
    # languages: English -> XX messages. Whole packages are held out; an English message also in a held-out
    # package belongs to the held-out split only (gettext_pairs.split_by_package). Empty: no gettext data.
    gettext_packages: tuple[str, ...] = ("coreutils", "tar", "grep", "sed", "findutils", "diffutils", "bash",
                                         "gawk", "cpio", "wget", "make")
    gettext_languages: tuple[str, ...] = ("es", "de", "it", "pt", "fr", "nl", "pl", "ru", "uk")
    gettext_test_packages: tuple[str, ...] = ("wget", "make")
    gettext_valid_packages: tuple[str, ...] = ("cpio",)
    # Translation pairs (load_splits()["translation"]) keep verses whose both sides have this many characters
    translation_chars: tuple[int, int] = (20, 400)
    min_test_pairs: int = 300
    # A held-out text at least this long (normalised) may not occur inside any text of a lower split
    min_contained_chars: int = 40

    def packages(self) -> list[str]:
        return (list(self.bible_packages) + [f"fortunes-{lang}" for lang in self.languages]
                + list(self.gettext_packages))

    @classmethod
    def from_json(cls, data: dict) -> DataSettings:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SystemExit(f"error: unknown data settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        data = dict(data)
        if "alignment" in data:
            data["alignment"] = AlignmentSettings(**data["alignment"])
        for key in ("bible_packages", "languages", "test_books", "valid_books", "exclude_files", "translation_chars",
                    "gettext_packages", "gettext_languages", "gettext_test_packages", "gettext_valid_packages"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def check(self) -> None:
        for book in self.test_books + self.valid_books:
            if book not in VERSES:
                raise SystemExit(f"error: unknown book {book!r}; use OSIS ids: {', '.join(BOOKS)}")
        both = set(self.test_books) & set(self.valid_books)
        if both:
            raise SystemExit(f"error: books {sorted(both)} are in both test_books and valid_books")
        for lang in self.languages:
            both = set(self.test_files.get(lang, [])) & set(self.valid_files.get(lang, []))
            if both:
                raise SystemExit(f"error: fortune files {sorted(both)} ({lang}) are in both test_files and valid_files")
        held = set(self.gettext_test_packages) | set(self.gettext_valid_packages)
        if self.gettext_packages and not held <= set(self.gettext_packages):
            raise SystemExit(f"error: held-out gettext packages {sorted(held - set(self.gettext_packages))} are not "
                             f"in gettext_packages {list(self.gettext_packages)}")
        both = set(self.gettext_test_packages) & set(self.gettext_valid_packages)
        if both:
            raise SystemExit(f"error: gettext packages {sorted(both)} are in both gettext_test_packages and "
                             "gettext_valid_packages")


# ------------------------------------------------------------------------------------------- text keys
@cache
def normalise(text: str) -> str:
    """The key two texts are compared by: Unicode NFC, case folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


@cache
def fortune_key(text: str) -> str:
    """A fortune's comparison key: its normalised text without attribution lines ("-- Author"), so one
    quote under two attributions counts as the same text."""
    kept = [line for line in text.split("\n") if not line.strip().startswith("--")]
    return normalise("\n".join(kept)) or normalise(text)


class _Haystack:
    """Finds which of many normalised texts contain a given normalised string, fast: a string contained
    in a text has its inner words (all but the first and last, which may be cut) as whole words of
    that text, so only the texts holding its rarest inner word are searched."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.index: dict[str, set[int]] = defaultdict(set)
        for i, text in enumerate(texts):
            for word in set(text.split(" ")):
                self.index[word].add(i)

    def containing(self, needle: str) -> set[int]:
        inner = needle.split(" ")[1:-1]
        candidates = min((self.index.get(w, set()) for w in inner), key=len) if inner else range(len(self.texts))
        return {i for i in candidates if needle in self.texts[i]}


def drop_heldout(rows: list[dict], keys, held: set[str], min_contained: int) -> list[dict]:
    """``rows`` without those that repeat a held-out text or contain one of at least ``min_contained``
    characters. ``keys(row)`` gives a row's comparison keys (one per language for a verse pair)."""
    needles = [k for k in held if len(k) >= min_contained]
    contained: set[int] = set()
    if needles:
        hay = _Haystack(["\x01".join(keys(r)) for r in rows])
        for needle in needles:
            contained |= hay.containing(needle)
    return [r for i, r in enumerate(rows) if i not in contained and not any(k in held for k in keys(r))]


def dedupe(rows: list[dict], keys) -> list[dict]:
    """The first of each group of rows with the same keys."""
    seen, kept = set(), []
    for r in rows:
        if keys(r) not in seen:
            seen.add(keys(r))
            kept.append(r)
    return kept


def check_disjoint(items_by_split: dict[str, list[tuple[str | None, tuple[str, ...]]]], min_contained: int) -> dict:
    """Proof that no held-out text reaches a lower split (test > valid > train). ``items_by_split[split]``
    lists (reference or None, comparison keys) of everything the split's files hold. For each pair
    (held-out split, lower split): shared references, shared keys, and held-out keys of at least
    ``min_contained`` characters found inside a lower split's text. All counts must be 0."""
    result = {}
    for hi, held in enumerate(SPLITS):
        for lower in SPLITS[:hi]:
            held_refs = {ref for ref, _ in items_by_split[held] if ref}
            held_keys = {k for _, keys in items_by_split[held] for k in keys}
            low_refs = {ref for ref, _ in items_by_split[lower] if ref}
            low_keys = {k for _, keys in items_by_split[lower] for k in keys}
            hay = _Haystack(sorted(low_keys))
            result[f"{held}_vs_{lower}"] = {
                "shared_refs": len(held_refs & low_refs), "shared_texts": len(held_keys & low_keys),
                "contained_texts": sum(1 for k in held_keys if len(k) >= min_contained and hay.containing(k))}
    return result


# ------------------------------------------------------------------------------------------- packages
def _ar_members(data: bytes) -> dict[str, bytes]:
    """The members of an ar archive (a .deb is one: debian-binary, control.tar.*, data.tar.*)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _tar(members: dict[str, bytes], prefix: str, deb: Path) -> tarfile.TarFile:
    name = next((n for n in members if n.startswith(prefix)), None)
    if name is None:
        raise ValueError(f"{deb}: no {prefix}* member")
    try:
        return tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*")
    except tarfile.ReadError as e:
        raise SystemExit(f"error: {deb}: cannot read {name} here ({e}); extract the package with "
                         f"'dpkg -x {deb.name} ROOT' and pass --from-dir ROOT") from e


def extract_deb(deb: Path, root: Path) -> dict:
    """Unpack a .deb's files into ``root`` like ``dpkg -x`` (regular files and folders; links are skipped,
    nothing here reads them) and return its control fields (Package, Version, ...)."""
    members = _ar_members(Path(deb).read_bytes())
    with _tar(members, "control.tar", deb) as control_tar:
        control_file = next(m for m in control_tar.getmembers() if m.name.lstrip("./") == "control")
        text = control_tar.extractfile(control_file).read().decode()
    control = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line and not line.startswith(" "))
    with _tar(members, "data.tar", deb) as data_tar:
        wanted = [m for m in data_tar.getmembers() if m.isfile() or m.isdir()]
        data_tar.extractall(root, members=wanted, filter="data")
    return control


def fetch_packages(names: list[str], cache: Path) -> tuple[Path, list[dict]]:
    """Download (``apt-get download``, skipped for a .deb already in ``cache``/debs) and unpack the
    packages into ``cache``/root; returns that root and a record per package (version, file, sha256)."""
    debs, root = cache / "debs", cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    records = []
    for name in tqdm(names, desc="packages", unit="pkg"):
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            if shutil.which("apt-get") is None:
                raise SystemExit(
                    f"error: {name}: no {name}_*.deb in {debs} and no apt-get here. Download the .deb files of "
                    f"{', '.join(names)} from https://packages.debian.org into {debs}, or extract them "
                    "(dpkg -x FILE.deb ROOT) and pass --from-dir ROOT")
            run = subprocess.run(["apt-get", "download", name], check=False, cwd=debs, capture_output=True, text=True)
            found = sorted(debs.glob(f"{name}_*.deb"))
            if run.returncode or not found:
                raise SystemExit(f"error: apt-get download {name} failed: {run.stderr.strip()[-500:]}\n"
                                 "(run 'apt-get update' once first, or use --from-dir)")
        if len(found) > 1:
            raise SystemExit(f"error: several {name}_*.deb in {debs} ({[f.name for f in found]}): keep one")
        deb = found[0]
        control = extract_deb(deb, root)
        records.append({"package": name, "version": control.get("Version", "?"), "file": deb.name,
                        "sha256": file_sha256(deb)})
    return root, records


# ------------------------------------------------------------------------------------------- reading
def _fingerprints(root: Path, paths: list[Path]) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in paths}


def read_bible(root: Path, settings: DataSettings) -> tuple[dict, dict, list[Path]]:
    """Per split: aligned pairs, all KJV verses and the normalised texts of every verse (both languages)
    of its books; also the alignment report and the files read."""
    sword = root / SWORD_ROOT
    english = ZTextModule.find(sword, settings.english_module)
    spanish = ZTextModule.find(sword, settings.spanish_module)
    en_verses, es_verses = [], []
    for module, out in ((english, en_verses), (spanish, es_verses)):
        out.extend(tqdm(module.verses(), total=sum(sum(v) for v in VERSES.values()),
                        desc=f"verses {module.name}", unit="verse", mininterval=1))
    pairs, report = align(en_verses, es_verses, settings.alignment)

    def split_of(book: str) -> str:
        return "test" if book in settings.test_books else "valid" if book in settings.valid_books else "train"

    bible = {s: [] for s in SPLITS}
    for p in pairs:
        bible[split_of(p["book"])].append(p)
    kjv = {s: [] for s in SPLITS}
    for v in en_verses:
        if v.text:
            kjv[split_of(v.book)].append({"ref": v.ref, "text": v.text})
    # every verse text of a split's books, both languages (also of pairs that failed the alignment check)
    texts = {s: set() for s in SPLITS}
    for v in en_verses + es_verses:
        if v.text:
            texts[split_of(v.book)].add(normalise(v.text))
    return {"bible": bible, "kjv": kjv, "texts": texts}, report, english.files() + spanish.files()


def read_fortunes(root: Path, settings: DataSettings) -> tuple[dict, dict, list[Path]]:
    """Per language and split, the fortune texts {file, text}; also per-language file lists and encodings."""
    out, info, paths = {}, {}, []
    for lang in settings.languages:
        folder = root / FORTUNES_ROOT / lang
        files = fortune_files_mod.fortune_files(folder, settings.exclude_files)
        for role in ("test_files", "valid_files"):
            missing = sorted(set(getattr(settings, role).get(lang, [])) - set(files))
            if missing:
                raise SystemExit(f"error: {role} for {lang} names files that {folder} does not hold: {missing}")
        rows = {s: [] for s in SPLITS}
        encodings = {}
        for rel in tqdm(files, desc=f"fortunes-{lang}", unit="file", mininterval=1):
            text, encoding = fortune_files_mod.decode((folder / rel).read_bytes(), lang)
            if encoding != "utf-8":
                encodings[rel] = encoding
            split = ("test" if rel in settings.test_files.get(lang, [])
                     else "valid" if rel in settings.valid_files.get(lang, []) else "train")
            rows[split].extend({"file": rel, "text": t} for t in fortune_files_mod.parse_entries(text))
            paths.append(folder / rel)
        out[lang] = rows
        info[lang] = {"files": {s: sorted({r["file"] for r in rows[s]}) for s in SPLITS},
                      "not_utf8": encodings}
    return out, info, paths


# ------------------------------------------------------------------------------------------- stage
def _sizes(rows: list[dict], *fields: str) -> dict:
    return {"rows": len(rows), **{f"{f}_chars": sum(len(r[f]) for r in rows) for f in fields}}


def _pair_keys(row: dict) -> tuple[str, ...]:
    return normalise(row["en"]), normalise(row["es"])


def _kjv_keys(row: dict) -> tuple[str, ...]:
    return (normalise(row["text"]),)


def _fortune_keys(row: dict) -> tuple[str, ...]:
    return (fortune_key(row["text"]),)


def _finished(out: Path, settings: DataSettings) -> dict | None:
    """The summary of a finished stage in ``out`` made with ``settings``; None where there is none yet.
    Refuses (SystemExit) one made with other settings, naming what changed."""
    summary_path = out / "data.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    recorded, now = summary.get("settings", {}), as_json(settings)
    if recorded != now:
        raise SystemExit(f"error: {out} holds data made with other settings "
                         f"({', '.join(changed_settings(recorded, now))} changed). "
                         f"Delete {out} to make it again with these settings, or pass another --out.")
    print(f"data: {out} already holds this data (same settings), nothing to do", flush=True)
    return summary


def _package_root(settings: DataSettings, out: Path, cache: Path | None, from_dir: Path | None) -> tuple[Path, list]:
    """The folder the packages' files are under (``from_dir``, checked, or where they were fetched and unpacked)
    and a record per package."""
    if from_dir is None:
        root, packages = fetch_packages(settings.packages(), Path(cache) if cache else out.parent / "debs")
        return Path(root).resolve(), packages
    root = Path(from_dir)
    for sub in (SWORD_ROOT, FORTUNES_ROOT) + ((LOCALE_ROOT,) if settings.gettext_packages else ()):
        if not (root / sub).is_dir():
            raise SystemExit(f"error: --from-dir {root} has no {sub}/: extract each package there "
                             f"(dpkg -x FILE.deb {root}) first")
    return root.resolve(), [{"package": name, "version": "unknown (--from-dir)"} for name in settings.packages()]


def _drop_heldout_texts(bible_data: dict, fortune_rows: dict, settings: DataSettings) -> dict:
    """Held-out texts leave the lower splits, in place: test first, then valid, then train. Returns how many
    rows each file lost per split."""
    bible, kjv = bible_data["bible"], bible_data["kjv"]
    removed: dict = {"bible_pairs": {}, "kjv": {}, **{f"fortunes_{lang}": {} for lang in settings.languages}}
    held: set[str] = set()
    held_fortunes: dict[str, set[str]] = {lang: set() for lang in settings.languages}
    for s in reversed(SPLITS):
        for name, rows, keys in (("bible_pairs", bible, _pair_keys), ("kjv", kjv, _kjv_keys)):
            before = len(rows[s])
            rows[s] = drop_heldout(rows[s], keys, held, settings.min_contained_chars)
            removed[name][s] = before - len(rows[s])
        held |= bible_data["texts"][s]
        for lang in settings.languages:
            rows, before = fortune_rows[lang], len(fortune_rows[lang][s])
            rows[s] = dedupe(drop_heldout(rows[s], _fortune_keys, held_fortunes[lang], settings.min_contained_chars),
                             _fortune_keys)
            removed[f"fortunes_{lang}"][s] = before - len(rows[s])
            held_fortunes[lang] |= {fortune_key(r["text"]) for r in rows[s]}
    return removed


def _proof(bible: dict, kjv: dict, fortune_rows: dict, settings: DataSettings) -> dict:
    """:func:`check_disjoint` of what the files will hold (SystemExit unless every count is 0): the Bible's pairs
    and KJV verses together, so that no held-out English verse (bits per character) is in a lower split's pairs
    either; each language's fortunes."""
    checks = {"bible": check_disjoint({s: [(r["ref"], _pair_keys(r)) for r in bible[s]]
                                       + [(r["ref"], _kjv_keys(r)) for r in kjv[s]] for s in SPLITS},
                                      settings.min_contained_chars)}
    for lang in settings.languages:
        checks[f"fortunes_{lang}"] = check_disjoint(
            {s: [(None, _fortune_keys(r)) for r in fortune_rows[lang][s]] for s in SPLITS}, settings.min_contained_chars)
    if any(n for per in checks.values() for counts in per.values() for n in counts.values()):
        raise SystemExit(f"error: held-out data reaches a lower split: {json.dumps(checks)}")
    return checks


def _write_splits(out: Path, bible: dict, kjv: dict, fortune_rows: dict, settings: DataSettings) -> dict:
    """Every split's files; returns their sizes (SystemExit when the test books give too few translation pairs)."""
    sizes: dict = {"bible": {}, "kjv": {}, "fortunes": {}}
    for s in SPLITS:
        write_jsonl(bible[s], out / f"bible_{s}.jsonl")
        write_jsonl(kjv[s], out / f"kjv_{s}.jsonl")
        sizes["bible"][s] = {**_sizes(bible[s], "en", "es"),
                             "translation_pairs": len(_translation_pairs(bible[s], settings.translation_chars))}
        sizes["kjv"][s] = _sizes(kjv[s], "text")
    for lang in settings.languages:
        sizes["fortunes"][lang] = {}
        for s in SPLITS:
            write_jsonl(fortune_rows[lang][s], out / f"fortunes_{lang}_{s}.jsonl")
            sizes["fortunes"][lang][s] = _sizes(fortune_rows[lang][s], "text")
    test_pairs = sizes["bible"]["test"]["translation_pairs"]
    if test_pairs < settings.min_test_pairs:
        raise SystemExit(f"error: the test books give {test_pairs} translation pairs of "
                         f"{settings.translation_chars} characters, fewer than min_test_pairs={settings.min_test_pairs}: "
                         "hold out more books")
    return sizes


def read_gettext(root: Path, settings: DataSettings) -> tuple[dict, dict]:
    """The gettext splits (whole packages held out; :func:`gettext_pairs.split_by_package`), their sizes per
    language and the proof (SystemExit unless 0) that no held-out English message is in a lower split."""
    if not settings.gettext_packages:
        return {s: [] for s in SPLITS}, {}
    pairs = read_pairs(root, list(settings.gettext_languages), list(settings.gettext_packages))
    splits = split_by_package(pairs, {"valid": list(settings.gettext_valid_packages),
                                      "test": list(settings.gettext_test_packages)})
    rows = {s: [p.row() for p in splits[s]] for s in SPLITS}
    english = {s: {normalise(r["en"]) for r in rows[s]} for s in SPLITS}
    checks = {"test_in_valid": len(english["test"] & english["valid"]),
              "test_in_train": len(english["test"] & english["train"]),
              "valid_in_train": len(english["valid"] & english["train"])}
    if any(checks.values()):
        raise SystemExit(f"error: held-out gettext messages reach a lower split: {checks}")
    sizes = {lang: {s: sum(r["lang"] == lang for r in rows[s]) for s in SPLITS} for lang in settings.gettext_languages}
    return rows, {"sizes": sizes, "checks": checks}


def prepare(out: Path, settings: DataSettings | None = None, cache: Path | None = None,
            from_dir: Path | None = None) -> dict:
    """Run the data stage into ``out`` and return its summary (data.json). Resumes: a finished ``out``
    with the same settings is left untouched; one with other settings is refused (SystemExit).

    ``from_dir`` is a folder holding the packages' files already extracted (``usr/share/sword``,
    ``usr/share/games/fortunes``, ``usr/share/locale``), e.g. after ``dpkg -x`` of each .deb into it, or ``/``
    where the packages are installed. Without it the packages are fetched into ``cache`` (default
    ``<out>/../debs``) with ``apt-get download``."""
    settings = settings or DataSettings()
    settings.check()
    out = Path(out)
    summary = _finished(out, settings)
    if summary is not None:
        return summary

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    root, packages = _package_root(settings, out, cache, from_dir)
    fortune_rows, fortune_info, fortune_paths = read_fortunes(root, settings)
    bible_data, alignment_report, bible_paths = read_bible(root, settings)
    removed = _drop_heldout_texts(bible_data, fortune_rows, settings)
    bible, kjv = bible_data["bible"], bible_data["kjv"]
    checks = _proof(bible, kjv, fortune_rows, settings)
    gettext_rows, gettext_info = read_gettext(root, settings)
    sizes = _write_splits(out, bible, kjv, fortune_rows, settings)
    for s in SPLITS:
        write_jsonl(gettext_rows[s], out / f"gettext_{s}.jsonl")
    if gettext_info:
        sizes["gettext"] = gettext_info["sizes"]
        checks["gettext"] = {"english_messages": gettext_info["checks"]}
    summary = {
        "settings": as_json(settings),
        "heldout": {"test_books": [BOOK_NAMES[b] for b in settings.test_books],
                    "valid_books": [BOOK_NAMES[b] for b in settings.valid_books],
                    "fortune_files": {lang: fortune_info[lang]["files"] for lang in settings.languages},
                    "gettext_packages": {"test": list(settings.gettext_test_packages),
                                         "valid": list(settings.gettext_valid_packages)}},
        "sizes": sizes,
        "removed_as_repeats": removed,
        "alignment": alignment_report,
        "checks": checks,
        "packages": packages,
        "source": str(root),
        "inputs_sha256": _fingerprints(root, bible_paths + fortune_paths),
        "not_utf8": {lang: fortune_info[lang]["not_utf8"] for lang in settings.languages},
        "seconds": round(time.monotonic() - started, 1),
    }
    with atomic_file(out / "data.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"data: written to {out} in {summary['seconds']} s", flush=True)
    return summary


# ------------------------------------------------------------------------------------------- loading
def _translation_pairs(rows: list[dict], bounds) -> list[dict]:
    lo, hi = bounds
    return [{"ref": r["ref"], "es": r["es"], "en": r["en"]} for r in rows
            if lo <= len(r["es"]) <= hi and lo <= len(r["en"]) <= hi]


def load_splits(folder: Path) -> dict:
    """What the experiment reads, from a folder :func:`prepare` wrote:

    ``["translation"][split]``   [{"ref", "es", "en"}] verse pairs of moderate length (settings'
                                 translation_chars), Spanish source, English reference
    ``["bible"][split]``         every aligned pair {"ref", "book", "chapter", "verse", "en", "es", "overlap"}
    ``["bpc"][lang][split]``     [{"text", "source"}] for bits per character: lang "de", "es", "it", "ru"
                                 (fortunes; source "fortunes-de:stilblueten") and "en" (KJV verses;
                                 source "kjv:Ruth 1:1")
    ``["gettext"][split]``       [{"package", "lang", "en", "xx"}] gettext messages (empty without gettext data)
    ``["summary"]``              data.json

    split is "train", "valid" or "test"."""
    folder = Path(folder)
    summary_path = folder / "data.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{folder} holds no data.json: run 'python -m experiments.language.data --out {folder}'")
    summary = json.loads(summary_path.read_text())
    bounds = summary["settings"]["translation_chars"]
    result: dict = {"summary": summary, "bible": {}, "translation": {}, "bpc": {}, "gettext": {}}
    for s in SPLITS:
        path = folder / f"gettext_{s}.jsonl"
        result["gettext"][s] = read_jsonl(path) if path.is_file() else []
        result["bible"][s] = read_jsonl(folder / f"bible_{s}.jsonl")
        result["translation"][s] = _translation_pairs(result["bible"][s], bounds)
    result["bpc"]["en"] = {s: [{"text": r["text"], "source": f"kjv:{r['ref']}"}
                               for r in read_jsonl(folder / f"kjv_{s}.jsonl")] for s in SPLITS}
    for lang in summary["settings"]["languages"]:
        result["bpc"][lang] = {s: [{"text": r["text"], "source": f"fortunes-{lang}:{r['file']}"}
                                   for r in read_jsonl(folder / f"fortunes_{lang}_{s}.jsonl")] for s in SPLITS}
    return result


def sample_texts(rows: list[dict], count: int, min_chars: int = 0, max_chars: int | None = None,
                 seed: int = 0) -> list[dict]:
    """``count`` rows (fewer if fewer qualify) whose text has ``min_chars``..``max_chars`` characters, drawn
    with ``seed`` and returned in their original order: a fixed evaluation sample."""
    fits = [i for i, r in enumerate(rows) if len(r["text"]) >= min_chars and (max_chars is None or len(r["text"]) <= max_chars)]
    chosen = sorted(random.Random(seed).sample(fits, min(count, len(fits))))
    return [rows[i] for i in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.language.data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/language/data"), help="output folder")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the .deb files are downloaded and unpacked (default: <out>/../debs)")
    parser.add_argument("--from-dir", type=Path, default=None,
                        help="use packages already extracted under this folder (usr/share/sword, "
                             "usr/share/games/fortunes, usr/share/locale)")
    parser.add_argument("--settings", type=Path, default=None,
                        help="JSON file overriding DataSettings fields (e.g. {\"test_books\": [\"Ruth\", ...]})")
    args = parser.parse_args(argv)
    settings = DataSettings.from_json(json.loads(args.settings.read_text())) if args.settings else DataSettings()
    summary = prepare(args.out, settings, cache=args.cache, from_dir=args.from_dir)
    sizes = summary["sizes"]
    print("\nsplit   verse pairs (translation)   KJV verses   " + "   ".join(f"fortunes-{lang}" for lang in sizes["fortunes"]))
    for s in SPLITS:
        b = sizes["bible"][s]
        row = f"{s:<7} {b['rows']:>11} ({b['translation_pairs']:>6})   {sizes['kjv'][s]['rows']:>10}   "
        row += "   ".join(f"{sizes['fortunes'][lang][s]['rows']:>11}" for lang in sizes["fortunes"])
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

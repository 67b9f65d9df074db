"""experiments/language/gettext_pairs.py: parallel text from gettext catalogues, read as Debian ships them.

The catalogues are written here in the binary .mo format (GNU gettext's layout), with the charsets, plural
entries, contexts and format strings real packages have.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from experiments.language.gettext_pairs import (
    LOCALE_ROOT,
    Pair,
    check_languages_disjoint,
    composition_share,
    read_catalogue,
    read_pairs,
    split_by_package,
)


def write_mo(path: Path, messages: dict[str, str], charset: str = "UTF-8") -> Path:
    """A .mo file: msgid -> msgstr (plural forms joined by NUL, contexts as "ctx\\x04msgid"), in ``charset``."""
    header = f"Content-Type: text/plain; charset={charset}\nPlural-Forms: nplurals=2; plural=(n != 1);\n"
    entries = sorted([("", header), *messages.items()], key=lambda kv: kv[0].encode(charset))
    ids = [k.encode(charset) for k, _ in entries]
    strs = [v.encode(charset) for _, v in entries]
    n = len(entries)
    start = 7 * 4 + 16 * n
    blob, offsets = b"", []
    for data in ids + strs:
        offsets.append((len(data), start + len(blob)))
        blob += data + b"\0"
    table = b"".join(struct.pack("<II", *o) for o in offsets)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0) + table + blob)
    return path


def test_a_catalogue_is_read_in_its_declared_charset_with_plurals_and_contexts(tmp_path):
    latin = write_mo(tmp_path / "de.mo", {"The coffee is hot and ready": "Der Kaffee ist heiß und fertig",
                                          "menu\x04Open the file": "Die Datei öffnen",
                                          "one file was removed\x00%d files were removed": "eine Datei wurde "
                                          "entfernt\x00%d Dateien wurden entfernt",
                                          "Untranslated message here": ""}, charset="ISO-8859-1")
    assert latin.read_bytes().count("ß".encode("latin-1")) == 1  # really written in the legacy charset
    catalogue = read_catalogue(latin)
    assert catalogue == {"The coffee is hot and ready": "Der Kaffee ist heiß und fertig",
                         "Open the file": "Die Datei öffnen",
                         "one file was removed": "eine Datei wurde entfernt"}
    russian = write_mo(tmp_path / "ru.mo", {"Write the output here": "Записать вывод сюда"}, charset="KOI8-R")
    assert read_catalogue(russian) == {"Write the output here": "Записать вывод сюда"}


def test_format_strings_option_listings_short_and_letterless_messages_are_dropped(tmp_path):
    messages = {"%s: cannot open the file for reading": "%s: Datei kann nicht gelesen werden",
                "invalid argument {0} for the option": "ungültiges Argument {0} für die Option",
                "progress is at 100%% of the whole": "Fortschritt ist bei 100%% des Ganzen",
                "Too short": "Zu kurz",
                "  -a, --all        same as -b -d --login -p": "  -a, --all        wie -b -d --login -p",
                "--------------------------": "--------------------------------",
                "Report bugs to the mailing list of the project": "Fehler an die Mailingliste des Projekts melden",
                "memory exhausted\nwhile sorting lines": "Speicher erschöpft\nbeim Sortieren der Zeilen",
                "\atimed out waiting for input: auto-logout": "\aZeitüberschreitung bei der Eingabe"}
    write_mo(tmp_path / LOCALE_ROOT / "de" / "LC_MESSAGES" / "sed.mo", messages)
    pairs = read_pairs(tmp_path, ["de"], ["sed", "grep"])
    assert pairs == [Pair("sed", "de", "timed out waiting for input: auto-logout", "Zeitüberschreitung bei der Eingabe"),
                     Pair("sed", "de", "Report bugs to the mailing list of the project",
                          "Fehler an die Mailingliste des Projekts melden"),
                     Pair("sed", "de", "memory exhausted while sorting lines",
                          "Speicher erschöpft beim Sortieren der Zeilen")]
    with pytest.raises(ValueError, match="no catalogue of .* for language 'fr'"):
        read_pairs(tmp_path, ["de", "fr"], ["sed"])


def pairs_of(package: str, lang: str, texts: list[str]) -> list[Pair]:
    return [Pair(package, lang, t, f"[{lang}] {t}") for t in texts]


def test_splits_hold_out_whole_packages_and_a_shared_sentence_goes_to_the_held_out_split():
    pairs = (pairs_of("coreutils", "de", ["copy files", "move files", "write error"])
             + pairs_of("tar", "de", ["extract an archive", "write error"])
             + pairs_of("sed", "de", ["stream editor", "move files"])
             + pairs_of("coreutils", "it", ["copy files", "write error"]))
    splits = split_by_package(pairs, {"valid": ["sed"], "test": ["tar"]})
    assert list(splits) == ["train", "valid", "test"]
    assert {p.package for p in splits["train"]} == {"coreutils"}
    train_en = {p.en for p in splits["train"]}
    assert train_en == {"copy files"}  # "move files" is in valid, "write error" in test, in every language
    assert {p.en for p in splits["valid"]} == {"stream editor", "move files"}
    assert {p.en for p in splits["test"]} == {"extract an archive", "write error"}
    assert not train_en & {p.en for p in splits["valid"] + splits["test"]}
    with pytest.raises(ValueError, match="more than one split"):
        split_by_package(pairs, {"valid": ["sed"], "test": ["sed"]})


def test_the_composition_share_is_a_seeded_five_percent_subset():
    rows = list(range(400))
    share = composition_share(rows, 0.05, seed=3)
    assert len(share) == 20 and set(share) <= set(rows) and share == sorted(share)
    assert share == composition_share(rows, 0.05, seed=3) != composition_share(rows, 0.05, seed=4)
    assert len(composition_share(rows[:5], 0.05)) == 1
    with pytest.raises(ValueError, match="share"):
        composition_share(rows, 0)


def test_unseen_languages_never_reach_the_composition_data():
    composition = pairs_of("coreutils", "es", ["copy files"])
    check_languages_disjoint([p.lang for p in composition], ["de", "it"])
    with pytest.raises(ValueError, match=r"\['es'\] are in the composition data"):
        check_languages_disjoint([p.lang for p in composition + pairs_of("tar", "de", ["x"])], ["es", "pt"])

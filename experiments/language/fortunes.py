"""Debian's fortune files: which files a language has, and the entries in one file.

Layout (Debian 12, packages ``fortunes-de``/``-es``/``-it``/``-ru``): the texts are under
``usr/share/games/fortunes/<lang>/``; next to each text file lie ``<file>.dat`` (the strfile index,
binary; ``fortunes-de`` keeps those in ``usr/share/games/fortunes-de/`` instead) and ``<file>.u8``
(a symlink to the same file); ``fortunes-it`` also links each file into ``usr/share/games/fortunes/``
itself. Offensive collections sit in an ``off/`` subfolder (fortune shows them only with ``-o``).
A file is entries separated by a line holding ``%`` alone.

All files in these packages are UTF-8 (checked 2026-12); older releases shipped Latin-1/KOI8-R, so a
file that is not valid UTF-8 is read with the language's legacy encoding and that is recorded.
"""

from __future__ import annotations

import re
from pathlib import Path

LEGACY_ENCODING = {"ru": "koi8-r"}  # any other language: latin-1
_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)


def fortune_files(lang_dir: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """The text files of one language folder, as paths relative to it (``off/x.fortunes``), sorted.

    Symlinks (the ``.u8`` duplicates), ``.dat`` indexes and anything not a regular file are skipped;
    ``exclude`` names relative paths or folders (``"off"``) to leave out.
    """
    lang_dir = Path(lang_dir)
    if not lang_dir.is_dir():
        raise FileNotFoundError(f"no fortunes folder {lang_dir}")
    files = []
    for path in sorted(lang_dir.rglob("*")):
        rel = path.relative_to(lang_dir).as_posix()
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        if any(rel == x or rel.startswith(x.rstrip("/") + "/") for x in exclude):
            continue
        if any(p.is_symlink() for p in path.relative_to(lang_dir).parents if str(p) != "."):
            continue
        files.append(rel)
    return files


def decode(data: bytes, lang: str) -> tuple[str, str]:
    """Text and the encoding that read it: UTF-8 when valid, else the language's legacy encoding."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        enc = LEGACY_ENCODING.get(lang, "latin-1")
        return data.decode(enc), enc


def parse_entries(text: str) -> list[str]:
    """The entries of a fortune file: split at lines holding ``%`` alone, line ends normalised to ``\\n``,
    trailing spaces of each line and blank lines around each entry removed, empty entries dropped.
    Inner layout (indentation, the ``\\t\\t-- Author`` lines) is kept as written."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    entries = []
    for chunk in _SEPARATOR.split(text):
        lines = [line.rstrip() for line in chunk.split("\n")]
        entry = "\n".join(lines).strip("\n")
        if entry.strip():
            entries.append(entry)
    return entries

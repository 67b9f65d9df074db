"""A plain-Python reader for SWORD Bible modules in the zText format (no SWORD library needed).

A module is a ``mods.d/<name>.conf`` file (INI-like: ``ModDrv``, ``DataPath``, ``CompressType``,
``SourceType``, ``Encoding``, ``Versification``) plus, per testament (``ot``/``nt``), three files:

    <t>.bzs  block index: per block 12 bytes, little endian u32 (offset in .bzz, compressed size, raw size)
    <t>.bzz  the compressed blocks, one after another (zlib for CompressType=ZIP)
    <t>.bzv  verse index: per entry 10 bytes, u32 block number, u32 offset in the raw block, u16 size

The verse index is laid out by the module's versification (see versification.py; only KJV is known
here). Verse texts carry markup (OSIS here; ThML and GBF are stripped more roughly) which
:func:`plain_text` turns into plain text.
"""

from __future__ import annotations

import bz2
import html
import lzma
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import versification

_DECOMPRESS = {"ZIP": zlib.decompress, "BZIP2": bz2.decompress, "XZ": lzma.decompress}


def read_conf(path: Path) -> dict[str, str]:
    """The keys of a SWORD ``.conf`` file (the first value of a repeated key; ``name`` is the section)."""
    conf: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and "name" not in conf:
            conf["name"] = line[1:-1]
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            conf.setdefault(key.strip(), value.strip())
    return conf


# ------------------------------------------------------------------------------------------- markup
_OSIS_NOTE = re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.DOTALL)  # footnotes: text stays joined
# titles that the translators did not write (section headings) become a break
_OSIS_HEADING = re.compile(r"<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>", re.DOTALL)
_BLOCK_TAG = re.compile(r"</?(?:l|lg|lb|p|br|div|chapter|milestone|title|q|list|item|table|row|cell)\b[^>]*>", re.IGNORECASE)
_ANY_TAG = re.compile(r"<[^>]*>")
_WORD_JOIN = re.compile(r"(</(?:w|transChange)>)(?=<(?:w|transChange)\b)")  # "</w><transChange>": two words
_USFM_LEFTOVER = re.compile(r"\\\+?[a-z]+\d*\*?")  # e.g. "\\nd " left in by the USFM->OSIS converter
_GBF_NOTE = re.compile(r"<RF>.*?<Rf>", re.DOTALL)
_STRONGS = re.compile(r"strong:([HG])0*(\d+)")
_THML_DROP = re.compile(r"<note\b[^>]*>.*?</note>|<scripRef\b[^>]*>.*?</scripRef>", re.DOTALL | re.IGNORECASE)


def plain_text(markup: str, source_type: str = "OSIS") -> str:
    """Verse markup as plain text: notes and editorial headings dropped (canonical titles, e.g. the
    Psalms' superscriptions, kept), tags removed (block-level ones and a boundary between two word
    elements become a space), entities decoded, pilcrows (¶) and stray USFM markers dropped, whitespace
    collapsed to single spaces."""
    kind = source_type.upper()
    if kind == "OSIS":
        markup = _OSIS_HEADING.sub(" ", _OSIS_NOTE.sub("", markup))
        markup = _WORD_JOIN.sub(r"\1 ", markup)
        markup = _USFM_LEFTOVER.sub(" ", markup)
    elif kind == "THML":
        markup = _THML_DROP.sub(" ", markup)
    elif kind == "GBF":
        markup = _GBF_NOTE.sub(" ", markup)
    markup = _BLOCK_TAG.sub(" ", markup)
    text = html.unescape(_ANY_TAG.sub("", markup)).replace("\u00b6", " ")
    return " ".join(text.split())


def strongs_numbers(markup: str) -> tuple[str, ...]:
    """The Strong's numbers tagged in a verse's text (notes excluded), in order, e.g. ("H7225", "H1254"):
    they name the Hebrew/Greek words a translation renders, so two translations of one verse share most."""
    if "strong:" not in markup:
        return ()
    return tuple(f"{m.group(1)}{int(m.group(2))}" for m in _STRONGS.finditer(_OSIS_NOTE.sub("", markup)))


# ------------------------------------------------------------------------------------------- module
@dataclass(frozen=True)
class Verse:
    book: str  # OSIS id, e.g. "John"
    chapter: int
    verse: int
    text: str  # plain text; "" where the module has no text for this verse
    strongs: tuple[str, ...] = ()  # Strong's numbers tagged in the verse (see strongs_numbers)

    @property
    def ref(self) -> str:
        return versification.reference(self.book, self.chapter, self.verse)


class ZTextModule:
    """One zText Bible module. ``ZTextModule.find(root, "engKJV2006eb")`` or ``ZTextModule(conf_path)``."""

    def __init__(self, conf_path: Path):
        self.conf_path = Path(conf_path)
        self.conf = read_conf(self.conf_path)
        self.name = self.conf.get("name", self.conf_path.stem)
        driver = self.conf.get("ModDrv", "")
        if driver.lower() != "ztext":
            raise ValueError(f"{self.conf_path}: ModDrv={driver!r}; only zText modules are readable here")
        self.compression = self.conf.get("CompressType", "ZIP").upper()
        if self.compression not in _DECOMPRESS:
            raise ValueError(f"{self.conf_path}: CompressType={self.compression} is not supported "
                             f"(use a module compressed with one of {sorted(_DECOMPRESS)})")
        scheme = self.conf.get("Versification", "KJV")
        if scheme != "KJV":
            raise ValueError(f"{self.conf_path}: Versification={scheme}; only the KJV versification is known here")
        self.source_type = self.conf.get("SourceType", "Plaintext")
        # SWORD's default encoding is Latin-1 when a module does not say
        self.encoding = "utf-8" if self.conf.get("Encoding", "").upper() in ("UTF-8", "UTF8") else "latin-1"
        # DataPath is relative to the library root, the folder that holds mods.d/
        root = self.conf_path.parent.parent
        self.data_path = (root / self.conf.get("DataPath", "").lstrip("./")).resolve()
        if not self.data_path.is_dir():
            raise FileNotFoundError(f"{self.conf_path}: DataPath {self.data_path} is not a folder")

    @classmethod
    def find(cls, root: Path, name: str) -> ZTextModule:
        """The module ``name`` under a library root (a folder with ``mods.d/``, e.g. ``usr/share/sword``)."""
        for conf in sorted(Path(root).glob("mods.d/*.conf")):
            if read_conf(conf).get("name", "").lower() == name.lower():
                return cls(conf)
        raise FileNotFoundError(f"no SWORD module {name!r} under {root}/mods.d")

    def files(self) -> list[Path]:
        return [self.conf_path] + [self.data_path / f"{t}.{ext}" for t in ("ot", "nt") for ext in ("bzs", "bzv", "bzz")]

    def raw_entries(self, testament: str) -> list[bytes]:
        """Every index entry of ``testament`` ("ot" or "nt") as raw bytes, in index order."""
        base = self.data_path / testament
        blocks_raw = base.with_suffix(".bzs").read_bytes()
        index = base.with_suffix(".bzv").read_bytes()
        data = base.with_suffix(".bzz").read_bytes()
        if len(blocks_raw) % 12 or len(index) % 10:
            raise ValueError(f"{base}: .bzs/.bzv sizes ({len(blocks_raw)}, {len(index)}) are not multiples "
                             "of 12/10 bytes: not a zText module")
        blocks = [struct.unpack_from("<III", blocks_raw, 12 * i) for i in range(len(blocks_raw) // 12)]
        decompress = _DECOMPRESS[self.compression]
        cache: dict[int, bytes] = {}
        entries = []
        for i in range(len(index) // 10):
            block, offset, size = struct.unpack_from("<IIH", index, 10 * i)
            if size == 0:
                entries.append(b"")
                continue
            if block not in cache:
                start, csize, rsize = blocks[block]
                cache[block] = decompress(data[start:start + csize])
                if len(cache[block]) != rsize:
                    raise ValueError(f"{base}.bzz block {block}: {len(cache[block])} bytes, the index says {rsize}")
            entries.append(cache[block][offset:offset + size])
        return entries

    def verses(self, testament: str | None = None) -> Iterator[Verse]:
        """Every verse of the module (both testaments unless ``testament``), as plain text, in canonical order."""
        for t in (testament,) if testament else ("ot", "nt"):
            raw = self.raw_entries(t)
            expected = versification.index_size(t)
            if len(raw) != expected:
                raise ValueError(f"{self.name} {t}: {len(raw)} index entries, the KJV versification has {expected}: "
                                 "the module does not follow the KJV versification")
            for entry, data in zip(versification.index_entries(t), raw):
                if entry.kind == "verse":
                    markup = data.decode(self.encoding, errors="replace")
                    yield Verse(entry.book, entry.chapter, entry.verse, plain_text(markup, self.source_type),
                                strongs_numbers(markup))

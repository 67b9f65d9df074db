"""The bridge-only checkpoint format (PEFT-style).

A folder holding:

* ``composition_config.json``: the CompositionConfig, the resolved layer links, the parameter
  count, and a fingerprint of the anchor and of each augmenting model;
* ``bridges.safetensors``: the bridge weights (no base weights, no pickle).

A fingerprint records the architecture, widths, depth, vocab size, parameter count and a hash of
the weights (a fixed sample of each tensor, rounded to bf16 so that a dtype cast of the same model
still matches). Loading onto a different pair is refused with the field that differs.

A composition built with ``tokenizers=`` also records each model's tokenizer (``tokenizers``:
``alignment.tokenizer_fingerprint``: hashes of vocabulary, normalizer, pre-tokenizer, decoder and
added tokens). Loading it with another tokenizer is refused with the field that differs, and loading
it without tokenizers is refused unless all the models shared one tokenizer. Checkpoints without
the field (compositions built without tokenizers) load with any tokenizers or none.
Folders are written atomically: a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from composition.alignment import tokenizer_fingerprint
from composition.config import CompositionConfig
from composition.layers import describe_decoder

FORMAT = "calm-ray-bridges"
VERSION = 1
CONFIG_FILE = "composition_config.json"
WEIGHTS_FILE = "bridges.safetensors"
_SAMPLES_PER_TENSOR = 4096


def fingerprint(model: nn.Module) -> dict:
    """A short description of a model that changes when its architecture or weights change."""
    info = describe_decoder(model)
    digest = hashlib.sha256()
    total = 0
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        total += p.numel()
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.bfloat16)
        digest.update(f"{name}:{tuple(p.shape)}".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return {
        "architecture": info.architecture,
        "hidden_size": info.hidden_size,
        "num_layers": info.num_layers,
        "vocab_size": info.vocab_size,
        "num_parameters": total,
        "weights_sha256": digest.hexdigest()[:16],
    }


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex): what identifies a package or a source file for good."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_signature(files, root: str | os.PathLike | None = None) -> list[list]:
    """``[name, size, mtime_ns]`` per file, sorted by name (relative to ``root`` when given): a cheap stamp that
    changes when a file is rewritten (weights, data), for caches keyed on what they were computed from."""
    rows = []
    for f in map(Path, files):
        stat = f.stat()
        rows.append([f.relative_to(root).as_posix() if root is not None else f.name, stat.st_size, stat.st_mtime_ns])
    return sorted(rows)


def check_model_matches(role: str, saved: dict, model: nn.Module,
                        fix: str = "load the model the bridges were trained with, or pass check_models=False to "
                                   "override") -> None:
    """Refuse a model whose ``fingerprint`` differs from ``saved`` (the one the bridges were trained with):
    ValueError naming the first field that differs, and ``fix``, what the caller can do about it."""
    check_fingerprint(role, saved, fingerprint(model), fix)


def check_fingerprint(role: str, saved: dict, got: dict, fix: str) -> None:
    """``check_model_matches`` on a fingerprint computed elsewhere (a model in another process)."""
    for key, value in saved.items():
        if got.get(key) != value:
            raise ValueError(
                f"bridges were trained for {role} {saved.get('architecture')} with {key}={value}, "
                f"got {got.get('architecture')} with {key}={got.get(key)}: {fix}"
            )


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike):
    """Yield a temporary folder beside ``folder``; on success it replaces ``folder`` in one rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

        with atomic_file("results/x.json") as tmp:
            tmp.write_text(...)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")  # same suffix: savefig picks the format
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_bridges(model, folder: str | os.PathLike) -> None:
    """Write ``model``'s bridges to ``folder`` (see the module docstring for the layout)."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "links": [[link.augment, link.augment_index, link.anchor_index] for link in model.links],
        "bridge_parameters": model.num_bridge_parameters(),
        "anchor": fingerprint(model.anchor),
        "augments": [fingerprint(m) for m in model.augments],
    }
    if model.aligner.has_tokenizers:
        aligner = model.aligner
        meta["tokenizers"] = {"anchor": aligner.anchor_fingerprint, "augments": aligner.augment_fingerprints}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.bridges.state_dict().items()}
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(folder: str | os.PathLike) -> dict:
    """The checkpoint's JSON metadata; a clear error when the folder is not a bridges checkpoint."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file() or not (Path(folder) / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} is not a bridges checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path} has format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this calm-ray reads {FORMAT!r} version {VERSION}"
        )
    return meta


def check_tokenizers(folder, saved: dict | None, tokenizers: list | None) -> None:
    """Refuse tokenizers other than the ones the bridges were trained with (ValueError naming the field).

    ``saved``: the checkpoint's ``tokenizers`` entry (``read_meta(folder).get("tokenizers")``); ``tokenizers``:
    ``[anchor_tokenizer, *augment_tokenizers]``, or None for models read with one shared tokenizer.
    """
    if saved is None:
        return  # an older checkpoint, or one trained without tokenizers: nothing to compare
    if tokenizers is None:
        if any(fp != saved["anchor"] for fp in saved["augments"]):
            raise ValueError(
                f"bridges in {folder} were trained with different tokenizers for the anchor and the augmenting "
                f"models: pass tokenizers=[anchor_tokenizer, augment_tokenizer, ...] to load them"
            )
        return  # one shared tokenizer: the identity alignment, with or without tokenizers given
    if len(tokenizers) != len(saved["augments"]) + 1:
        raise ValueError(f"bridges in {folder} need {len(saved['augments']) + 1} tokenizers, got {len(tokenizers)}")
    roles = ["the anchor"] + [f"augmenting model {i}" for i in range(len(saved["augments"]))]
    for role, want, tokenizer in zip(roles, [saved["anchor"], *saved["augments"]], tokenizers):
        got = tokenizer_fingerprint(tokenizer, role)
        for key in want:
            if want[key] != got.get(key):
                raise ValueError(
                    f"the tokenizer of {role} is not the one the bridges in {folder} were trained with: it has "
                    f"{key}={got.get(key)}, the bridges were trained with {key}={want[key]} ({want.get('model')}, "
                    f"vocab {want.get('vocab_size')}): pass that tokenizer, or check_models=False to override"
                )


def load_bridges(cls, folder, anchor: nn.Module, augments: list[nn.Module], check_models: bool = True,
                 tokenizers: list | None = None):
    """Build ``cls(anchor, augments, saved config, tokenizers)`` and load the saved bridge weights into it."""
    meta = read_meta(folder)
    if isinstance(augments, nn.Module):
        augments = [augments]
    if len(augments) != len(meta["augments"]):
        raise ValueError(
            f"bridges in {folder} were trained with {len(meta['augments'])} augmenting models, got {len(augments)}"
        )
    if check_models:
        pairs = [("the anchor", meta["anchor"], anchor)] + [
            (f"augmenting model {i}", saved, m) for i, (saved, m) in enumerate(zip(meta["augments"], augments))
        ]
        for role, saved, m in pairs:
            check_model_matches(role, saved, m)
        check_tokenizers(folder, meta.get("tokenizers"), tokenizers)
    model = cls(anchor, augments, CompositionConfig.from_dict(meta["config"]), tokenizers=tokenizers)
    device = next(model.bridges.parameters()).device
    state = load_file(str(Path(folder) / WEIGHTS_FILE), device=str(device))
    model.bridges.load_state_dict(state, strict=True)
    return model

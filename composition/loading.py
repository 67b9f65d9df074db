"""Loading the model pair by Hugging Face id or local path, frozen and in eval mode."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from composition.config import DTYPES, CompositionConfig


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)} or auto")
    return getattr(torch, dtype)


def load_causal_lm(
    name_or_path: str,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """A frozen causal LM in eval mode, from a hub id or a local folder."""
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    model.to(device).eval().requires_grad_(False)
    return model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model, set up for batched decoding (left padding, a pad token)."""
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def augment_tokenizer_source(given: str | None, folder: str) -> str | None:
    """Where an augmenting model's tokenizer comes from: ``given``, else the model's folder; None when the
    folder holds no tokenizer files (the model then reads the anchor's tokens)."""
    if given is not None:
        return given
    local = Path(folder)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        return None
    return folder


def load_composition(
    anchor: str,
    augments: list[str],
    config: CompositionConfig | None = None,
    bridges: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    tokenizers: bool | list[str] | None = None,
):
    """Load the anchor and augmenting models by id or path and compose them.

    With ``bridges`` (a folder written by ``save_pretrained``) the trained bridges are loaded and
    checked against the models; otherwise new zero-initialised bridges are built from ``config``.
    ``tokenizers`` composes models with different tokenizers: True loads each model's tokenizer from
    its own id or folder, a list gives ``[anchor_tokenizer, *augment_tokenizers]`` ids or folders.
    """
    from composition.model import ComposedModel

    anchor_model = load_causal_lm(anchor, dtype, device, trust_remote_code)
    augment_models = [load_causal_lm(a, dtype, device, trust_remote_code) for a in augments]
    loaded = None
    if tokenizers is True:
        tokenizers = [anchor, *augments]
    if tokenizers:
        if len(tokenizers) != len(augments) + 1:
            raise ValueError(
                f"got {len(tokenizers)} tokenizer paths for 1 anchor and {len(augments)} augmenting models: give "
                f"[anchor_tokenizer, one per augmenting model] or tokenizers=True (each model's own folder)"
            )
        loaded = [load_tokenizer(t, trust_remote_code) for t in tokenizers]
    if bridges is not None:
        return ComposedModel.from_pretrained(bridges, anchor_model, augment_models, tokenizers=loaded)
    return ComposedModel(anchor_model, augment_models, config, tokenizers=loaded)

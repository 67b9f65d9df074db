"""Loading the model pair by Hugging Face id or local path, frozen and in eval mode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from composition.config import DTYPES, CompositionConfig, check_augment_tokenizers


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


@dataclass
class ComposedTokenizers:
    """Which tokenizer each model of a composition reads (``resolve_tokenizers``).

    Attributes:
        anchor: the anchor's tokenizer.
        augments: per augmenting model, its tokenizer (the anchor's object where it reads the anchor's tokens).
        sources: per augmenting model, where its tokenizer was loaded from (None: it reads the anchor's).
        own: per augmenting model, its tokenizer where it tokenises differently from the anchor, else None.
    """

    anchor: object
    augments: list
    sources: list[str | None]
    own: list

    @property
    def shared(self) -> bool:
        """Every model reads the anchor's tokens: the composition's alignment is the identity."""
        return all(t is None for t in self.own)

    def for_composition(self) -> list | None:
        """``ComposedModel``'s ``tokenizers`` argument: None when shared, else ``[anchor, *augments]``."""
        return None if self.shared else [self.anchor, *self.augments]


def augment_tokenizer_source(given: str | None, folder: str) -> str | None:
    """Where an augmenting model's tokenizer comes from: ``given``, else the model's folder; None when the
    folder holds no tokenizer files (the model then reads the anchor's tokens)."""
    if given is not None:
        return given
    local = Path(folder)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        return None
    return folder


def resolve_tokenizers(anchor: str, augments: list[str], given: list[str | None] | None = None,
                       load: Callable[[str, int | None], object] | None = None) -> ComposedTokenizers:
    """The one rule for which tokenizer each model of a composition reads, used by training and serving.

    Args:
        anchor: the anchor tokenizer's id or folder.
        augments: the augmenting models' ids or folders.
        given: per augmenting model a tokenizer id or folder, or None for "its own folder" (the default for all).
            A folder without tokenizer files reads the anchor's tokens.
        load: ``load(path, augment) -> tokenizer``, ``augment`` the augmenting model's index or None for the
            anchor; the default is ``load_tokenizer`` (callers wrap it to word their own errors).
    An augmenting tokenizer with the anchor's fingerprint (``composition.alignment.tokenizer_fingerprint``)
    reads the anchor's tokens. A tokenizer without the Rust backend cannot be fingerprinted: it counts as the
    anchor's when its vocabulary is the anchor's, and is refused (``TokenizerError``) otherwise.
    """
    from composition.alignment import TokenizerError, tokenizer_fingerprint

    load = load or (lambda path, augment: load_tokenizer(path))
    check_augment_tokenizers(given, len(augments))
    given = given or [None] * len(augments)
    anchor_tokenizer = load(anchor, None)
    sources = [augment_tokenizer_source(t, a) for t, a in zip(given, augments)]
    tokenizers = [anchor_tokenizer if s is None else load(s, i) for i, s in enumerate(sources)]
    try:
        same = tokenizer_fingerprint(anchor_tokenizer, "anchor")
        own = [None if t is anchor_tokenizer or tokenizer_fingerprint(t, f"augmenting model {i}") == same else t
               for i, t in enumerate(tokenizers)]
    except TokenizerError:
        if any(t is not anchor_tokenizer and t.get_vocab() != anchor_tokenizer.get_vocab() for t in tokenizers):
            raise
        own = [None] * len(tokenizers)  # slow tokenizers with the anchor's vocabulary: one shared tokenizer
    return ComposedTokenizers(anchor_tokenizer, tokenizers, sources, own)


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
    its own id or folder, a list gives ``[anchor_tokenizer, *augment_tokenizers]`` ids or folders
    (``resolve_tokenizers`` decides which models read the anchor's tokens).
    """
    from composition.model import ComposedModel

    anchor_model = load_causal_lm(anchor, dtype, device, trust_remote_code)
    augment_models = [load_causal_lm(a, dtype, device, trust_remote_code) for a in augments]
    loaded = None
    if tokenizers:
        if tokenizers is not True and len(tokenizers) != len(augments) + 1:
            raise ValueError(
                f"got {len(tokenizers)} tokenizer paths for 1 anchor and {len(augments)} augmenting models: give "
                f"[anchor_tokenizer, one per augmenting model] or tokenizers=True (each model's own folder)"
            )
        anchor_tok, given = (anchor, None) if tokenizers is True else (tokenizers[0], list(tokenizers[1:]))
        resolved = resolve_tokenizers(anchor_tok, augments, given,
                                      lambda path, augment: load_tokenizer(path, trust_remote_code))
        loaded = [resolved.anchor, *resolved.augments]  # given tokenizers are recorded in checkpoints, shared or not
    if bridges is not None:
        return ComposedModel.from_pretrained(bridges, anchor_model, augment_models, tokenizers=loaded)
    return ComposedModel(anchor_model, augment_models, config, tokenizers=loaded)

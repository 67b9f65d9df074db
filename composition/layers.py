"""Finding the decoder layers of any Hugging Face causal LM, and hooking hidden states there.

A model is described by a DecoderInfo: its decoder-layer ModuleList, width, depth and head
count. Hidden-state indices follow ``composition.config`` (0 = embeddings, i = output of layer
i - 1); ``HiddenStateSite`` attaches a function at one such index with a forward pre-hook on
layer i (or a forward hook on the last layer for i = L), which works for every architecture
whose layers take the hidden states as their first argument and return them first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class UnsupportedModelError(TypeError):
    """The model is not a decoder-only causal LM this project can find its layers in."""


@dataclass(frozen=True)
class DecoderInfo:
    """What the composition needs to know about one decoder-only model."""

    layers: nn.ModuleList  # the decoder blocks, in order
    base: nn.Module  # the model without its LM head (LlamaModel, GPT2Model, ...)
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    architecture: str


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def describe_decoder(model: nn.Module) -> DecoderInfo:
    """Find the decoder layers of a Hugging Face causal LM.

    The layer list is the one nn.ModuleList whose length is ``config.num_hidden_layers`` and whose
    entries are all of one class. Raises UnsupportedModelError, naming the model, when that list
    cannot be found unambiguously or the model is an encoder-decoder.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{name} has no .config: pass a Hugging Face PreTrainedModel")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model; composition needs decoder-only causal LMs"
        )
    num_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    vocab = _config_int(config, "vocab_size")
    if None in (num_layers, hidden, heads, vocab):
        raise UnsupportedModelError(
            f"{name}: its config does not give num_hidden_layers, hidden_size, num_attention_heads "
            f"and vocab_size; this model is not supported"
        )
    candidates = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == num_layers
        and len({type(m) for m in module}) == 1
    ]
    if len(candidates) != 1:
        found = ", ".join(p for p, _ in candidates) or "none"
        raise UnsupportedModelError(
            f"{name}: expected exactly one list of {num_layers} identical decoder layers, found {found}; "
            f"this architecture is not supported"
        )
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(base, nn.Module) or base is model:
        raise UnsupportedModelError(
            f"{name}: cannot find the base model (attribute {getattr(model, 'base_model_prefix', None)!r}); "
            f"pass the *ForCausalLM model, not the bare decoder"
        )
    return DecoderInfo(
        layers=candidates[0][1],
        base=base,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        vocab_size=vocab,
        architecture=name,
    )


def _replace_hidden(value, new_hidden: torch.Tensor):
    """Return ``value`` (a layer output: a tensor or a tuple led by one) with the hidden states replaced."""
    if isinstance(value, torch.Tensor):
        return new_hidden
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return (new_hidden,) + value[1:]
    raise UnsupportedModelError(
        f"a decoder layer returned {type(value).__name__}; expected a tensor or a tuple led by the hidden states"
    )


def _hidden_of(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value[0]


class HiddenStateSite:
    """Calls ``fn(hidden) -> hidden | None`` at hidden-state index ``index`` of a decoder.

    ``fn`` returning None leaves the hidden states unchanged (used for reading them); returning a
    tensor replaces them (used to add a bridge's output). Call ``remove()`` to detach the hook.
    """

    def __init__(self, info: DecoderInfo, index: int, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        if not 0 <= index <= info.num_layers:
            raise IndexError(f"hidden-state index {index} outside 0..{info.num_layers} for {info.architecture}")
        self.fn = fn
        if index < info.num_layers:
            self._handle = info.layers[index].register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        else:
            self._handle = info.layers[index - 1].register_forward_hook(self._post_hook)

    def _pre_hook(self, module, args, kwargs):
        if args:
            new = self.fn(args[0])
            return None if new is None else ((new,) + tuple(args[1:]), kwargs)
        new = self.fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    def _post_hook(self, module, args, output):
        new = self.fn(_hidden_of(output))
        return None if new is None else _replace_hidden(output, new)

    def remove(self) -> None:
        self._handle.remove()

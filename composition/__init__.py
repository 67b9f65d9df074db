"""calm-ray's composition core: CALM bridges for any Hugging Face decoder (plain torch, no Ray)."""

from composition.alignment import AugmentInputs, TokenizerError, align, align_text
from composition.bridge import Bridge
from composition.cache import CompositionCache
from composition.config import CompositionConfig, ConfigError, LayerMapping
from composition.layers import UnsupportedModelError, describe_decoder
from composition.loading import load_causal_lm, load_composition, load_tokenizer
from composition.model import ComposedModel

__all__ = [
    "AugmentInputs",
    "Bridge",
    "ComposedModel",
    "CompositionCache",
    "CompositionConfig",
    "ConfigError",
    "LayerMapping",
    "TokenizerError",
    "UnsupportedModelError",
    "align",
    "align_text",
    "describe_decoder",
    "load_causal_lm",
    "load_composition",
    "load_tokenizer",
]

"""CompositionCache: everything one batch of sequences needs to decode one token at a time.

Holds the anchor's HF KV cache, each augmenting model's HF KV cache, and each bridge's projected
keys and values, plus the attention mask of all tokens seen so far. A forward pass with a cache
runs each model on the new tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CompositionCache:
    attention_mask: torch.Tensor  # [batch, seen] long, 0 at padding
    anchor: object | None = None  # the anchor's HF Cache
    augments: list = field(default_factory=list)  # one HF Cache per augmenting model
    bridge_keys: list = field(default_factory=list)  # per bridge [batch, heads, seen, head_dim]
    bridge_values: list = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        return self.attention_mask.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. to drop finished requests)."""
        self.attention_mask = self.attention_mask[index]
        for c in [self.anchor, *self.augments]:
            if c is not None:
                c.reorder_cache(index)
        self.bridge_keys = [k[index] for k in self.bridge_keys]
        self.bridge_values = [v[index] for v in self.bridge_values]

"""CompositionCache: everything one batch of sequences needs to decode one token at a time.

Holds the anchor's HF KV cache, each augmenting model's HF KV cache, and each bridge's projected
keys and values, plus the attention mask of all tokens seen so far and each augmenting model's own
attention mask (over its own tokens: the anchor's mask again when the models share a tokenizer).
With different tokenizers (composition/alignment.py) it also holds, per row, where the anchor's
text stands; the augmenting caches only ever hold closed (final) tokens, so they grow by appending
and are never rolled back. A forward pass with a cache runs each model on the new tokens only.

The bridge keys and values live in buffers with spare room along the sequence (``SeqBuffer``), so
appending a decoded token writes one position instead of copying everything seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SEQ_DIM = 2  # bridge keys and values are [batch, heads, seq, head_dim]


class SeqBuffer:
    """A tensor that grows along ``SEQ_DIM``: ``data`` [batch, heads, capacity, head_dim], filled up to ``length``.

    Capacity grows geometrically, so appending n tokens one at a time copies O(n) in total.
    """

    __slots__ = ("data", "length")

    def __init__(self, past: torch.Tensor, capacity: int):
        shape = list(past.shape)
        shape[SEQ_DIM] = capacity
        self.data = past.new_empty(shape)
        self.length = past.shape[SEQ_DIM]
        self.data.narrow(SEQ_DIM, 0, self.length).copy_(past)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is exactly this buffer's filled part (and nothing was appended after it)."""
        return (
            t.data_ptr() == self.data.data_ptr()
            and t.shape[SEQ_DIM] == self.length
            and t.stride() == self.data.stride()
            and t.shape[:SEQ_DIM] == self.data.shape[:SEQ_DIM]
            and t.shape[SEQ_DIM + 1 :] == self.data.shape[SEQ_DIM + 1 :]
            and t.dtype == self.data.dtype
        )

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Write ``new`` after the filled part (room must exist); returns the filled part, a view."""
        n = new.shape[SEQ_DIM]
        self.data.narrow(SEQ_DIM, self.length, n).copy_(new)
        self.length += n
        return self.data.narrow(SEQ_DIM, 0, self.length)


def _capacity(needed: int) -> int:
    return needed + max(64, needed // 2)


def append_seq(buffer: SeqBuffer | None, past: torch.Tensor, new: torch.Tensor) -> tuple[SeqBuffer | None, torch.Tensor]:
    """``torch.cat([past, new], dim=2)`` without copying ``past`` when it is the filled part of ``buffer``.

    Returns (the buffer now holding the result, the result). A ``past`` that is not the buffer's
    filled part (a fresh prefill, a reordered cache, a second continuation of an older cache) is
    copied once into a new buffer with spare room. Under autograd it falls back to ``torch.cat``.
    """
    if torch.is_grad_enabled() and (past.requires_grad or new.requires_grad):
        return None, torch.cat([past, new], dim=SEQ_DIM)
    needed = past.shape[SEQ_DIM] + new.shape[SEQ_DIM]
    if buffer is None or not buffer.holds(past) or buffer.data.shape[SEQ_DIM] < needed:
        buffer = SeqBuffer(past, _capacity(needed))
    return buffer, buffer.append(new)


@dataclass
class CompositionCache:
    attention_mask: torch.Tensor  # [batch, seen] long, 0 at padding
    anchor: object | None = None  # the anchor's HF Cache
    augments: list = field(default_factory=list)  # one HF Cache per augmenting model
    bridge_keys: list = field(default_factory=list)  # per bridge [batch, heads, seen, head_dim]
    bridge_values: list = field(default_factory=list)
    # per bridge (key buffer, value buffer) behind bridge_keys / bridge_values; rebuilt when they do not match
    buffers: list = field(default_factory=list, repr=False, compare=False)
    # per augmenting model [batch, seen by it] long, 0 at padding
    augment_masks: list = field(default_factory=list)
    # different tokenizers only: per row, the alignment.RowText of the anchor's text so far
    texts: list | None = field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return self.attention_mask.shape[1]

    def extend_bridges(
        self, keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
        """Cached bridge keys/values followed by the new tokens' ones.

        Args:
            keys, values: per bridge [batch, heads, new, head_dim] for the new tokens.
        Returns:
            (keys, values) per bridge [batch, heads, seen + new, head_dim], and the buffers behind them
            (give both to the next CompositionCache). This cache's own fields are left as they were.
        """
        out = [self.extend_bridge(b, k, v) for b, (k, v) in enumerate(zip(keys, values))]
        return [k for k, _, _ in out], [v for _, v, _ in out], [buf for _, _, buf in out]

    def extend_bridge(self, b: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """``extend_bridges`` for bridge ``b`` alone: (its keys, its values [batch, heads, seen + new, head_dim],
        its buffers)."""
        kbuf, vbuf = self.buffers[b] if b < len(self.buffers) else (None, None)
        kbuf, keys = append_seq(kbuf, self.bridge_keys[b], keys)
        vbuf, values = append_seq(vbuf, self.bridge_values[b], values)
        return keys, values, (kbuf, vbuf)

    def add_bridges(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Append bridges (a composition added to a stack while rows decode): their keys/values over every row
        and token seen so far; zeros for rows that do not take them (their mask hides them)."""
        self.bridge_keys = [*self.bridge_keys, *keys]
        self.bridge_values = [*self.bridge_values, *values]
        self.buffers = []

    def drop_bridges(self, bridges: list[int]) -> None:
        """Forget bridges ``bridges`` (a composition removed from a stack); the ones after them move down."""
        gone = set(bridges)
        self.bridge_keys = [k for b, k in enumerate(self.bridge_keys) if b not in gone]
        self.bridge_values = [v for b, v in enumerate(self.bridge_values) if b not in gone]
        self.buffers = []

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. to drop finished requests)."""
        self.attention_mask = self.attention_mask[index]
        for c in [self.anchor, *self.augments]:
            if c is not None:
                c.reorder_cache(index)
        self.bridge_keys = [k[index] for k in self.bridge_keys]
        self.bridge_values = [v[index] for v in self.bridge_values]
        self.buffers = []
        self.augment_masks = [m[index] for m in self.augment_masks]
        if self.texts is not None:
            self.texts = [self.texts[i] for i in index.tolist()]

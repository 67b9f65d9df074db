"""Row-level surgery on decode caches, for continuous batching of requests of different lengths.

A serving engine keeps ONE cache for all the requests it is decoding, one batch row each. Rows
join (a new request's prefill) and leave (a request finishes) between decode steps, and the rows
of a batch have different lengths. Everything is left-padded to a common length (``composition.padding``).
Padded key/value slots are masked by the attention mask, and positions come from the mask
(``positions_from_mask``), so padding changes no result: a request decodes the same tokens in a
batch as alone (up to float rounding of batched matmuls).

Works on Hugging Face ``DynamicCache`` objects and on ``composition.cache.CompositionCache``. A
``DynamicCache`` holds one layer per decoder layer, of two kinds, mixed freely (Gemma-2/3 alternate them):

- full attention (``DynamicLayer``): keys and values ``[batch, kv_heads, seq, head_dim]``, every column;
- sliding window (``DynamicSlidingWindowLayer``, window W): only the last ``min(seq, W - 1)`` columns, and
  ``cumulative_length = seq``, which transformers reads for the positions and the masks of later tokens.

Since every row is right-aligned (left padding), the last W - 1 columns of the batch are the last W - 1
of each row, and a sliding layer's surgery is the full layer's, restricted to that tail: merging pads each
side to the batch's tail, cropping the left end shortens ``cumulative_length``. Query and key stand the
same number of columns apart in a row alone and in the batch, so the window masks the same tokens.
Chunked attention (Llama-4) is refused: its chunks start at absolute positions, which left padding moves.
``check_batchable(model)`` tells at start-up whether a model's cache can be batched.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from composition.cache import CompositionCache
from composition.padding import pad_left_to

BATCHABLE = (DynamicLayer, DynamicSlidingWindowLayer)  # full attention, sliding window


class UnbatchableCacheError(TypeError):
    """A model whose KV cache this engine cannot batch: raised when a server starts, never per request."""


def check_batchable(model, role: str = "the model") -> int | None:
    """Raise UnbatchableCacheError, naming the layer type, unless every layer of ``model``'s cache can be batched;
    return the smallest sliding window among its layers (None when it has none).

    Builds the cache transformers would build for ``model`` (no tensors), so it runs before any request.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = set(getattr(config, "layer_types", None) or [])
    if "chunked_attention" in types or getattr(config, "attention_chunk_size", None):
        raise UnbatchableCacheError(
            f"{role} ({config.model_type}) uses chunked attention, whose chunks start at absolute positions that "
            f"left padding moves: this engine cannot batch it; serve a model with full or sliding-window attention")
    try:
        layers = DynamicCache(config=config).layers
    except Exception as e:  # a config transformers cannot build a cache for
        raise UnbatchableCacheError(f"{role} ({config.model_type}): transformers builds no DynamicCache for it "
                                    f"({type(e).__name__}: {e}): this engine cannot serve it") from e
    windows = [layer.sliding_window for layer in _check_layers(layers, role)
               if isinstance(layer, DynamicSlidingWindowLayer)]
    return min(windows) if windows else None


def close_gaps(cache, attention_mask: torch.Tensor) -> torch.Tensor:
    """Move each row's tokens to the right end, so padding stands only on the left (in place); returns the new mask.

    Rows that got fewer new tokens than others in a step hold padding *inside* them (``[a a 0 a]``). Every
    layer must still hold every column (a sliding layer whose window the batch has not outgrown), since the
    tokens move. A row's keys keep their rotary positions: only their columns change.
    """
    width = attention_mask.shape[1]
    real = attention_mask.sum(dim=1)
    index = torch.argsort(attention_mask, dim=1, stable=True)[:, width - int(real.max()):]  # padding first, in order
    for layer in _layers(cache):
        if layer.is_initialized:
            if layer.keys.shape[-2] != width:
                raise ValueError(f"a cache layer holds {layer.keys.shape[-2]} of the batch's {width} columns: "
                                 f"its gaps cannot be closed")
            where = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, where), layer.values.gather(2, where)
            _set_length(layer, index.shape[1])
    return attention_mask.gather(1, index)


def has_gaps(attention_mask: torch.Tensor) -> bool:
    """Whether some row of ``attention_mask`` [rows, seq] has padding after its first token."""
    width = attention_mask.shape[1]
    right_aligned = torch.arange(width, device=attention_mask.device) >= width - attention_mask.sum(1, keepdim=True)
    return bool((attention_mask.bool() != right_aligned).any())


def _check_layers(layers, role: str = "the model") -> list:
    for layer in layers:
        if type(layer) not in BATCHABLE:
            raise UnbatchableCacheError(
                f"{role} has cache layers of type {type(layer).__name__}: continuous batching supports full-attention "
                f"(DynamicLayer) and sliding-window (DynamicSlidingWindowLayer) layers; serve a model made of those")
    return layers


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} is not a transformers Cache with .layers")
    return _check_layers(layers)


def _kept(layer, length: int) -> int:
    """How many of a batch's last ``length`` columns ``layer`` holds: all, or a sliding window's last W - 1."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        return min(length, layer.sliding_window - 1)
    return length


def _set_length(layer, length: int) -> None:
    """Record that ``layer`` now stands for ``length`` columns (a sliding layer's ``cumulative_length``)."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = length


def merge_hf_caches(first, second, length: int):
    """Append ``second``'s rows to ``first`` (in place), both left-padded to ``length`` tokens.

    Returns ``first``. Keys and values are [batch, kv_heads, seq, head_dim]; a sliding layer keeps
    the last W - 1 of the ``length`` columns.
    """
    for a, b in zip(_layers(first), _layers(second), strict=True):
        if not b.is_initialized:
            continue
        if not a.is_initialized:
            raise ValueError("cannot merge a cache with an uninitialised layer into an initialised one")
        kept = _kept(a, length)
        a.keys = torch.cat([pad_left_to(a.keys, kept, -2), pad_left_to(b.keys, kept, -2)], dim=0)
        a.values = torch.cat([pad_left_to(a.values, kept, -2), pad_left_to(b.values, kept, -2)], dim=0)
        _set_length(a, length)
    return first


def crop_left_hf_cache(cache, columns: int, length: int) -> None:
    """Drop the first ``columns`` of the ``length`` sequence positions of every layer (in place).

    The dropped columns are padding in every row; a sliding layer drops those it still holds.
    """
    if columns <= 0:
        return
    for layer in _layers(cache):
        if layer.is_initialized:
            kept = _kept(layer, length - columns)
            layer.keys = layer.keys[..., layer.keys.shape[-2] - kept :, :]
            layer.values = layer.values[..., layer.values.shape[-2] - kept :, :]
            _set_length(layer, length - columns)


def select_rows_hf_cache(cache, index: torch.Tensor) -> None:
    """Keep (and order) batch rows ``index`` of every layer (in place); rows may repeat."""
    for layer in _layers(cache):
        if layer.is_initialized:
            layer.batch_select_indices(index.to(layer.keys.device))


def copy_rows_hf_cache(cache, index: torch.Tensor):
    """A new cache holding batch rows ``index`` of ``cache`` (which is left as it is); rows may repeat."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in _layers(cache)]
    select_rows_hf_cache(out, index)
    return out


def add_empty_rows_hf_cache(cache, before: int = 0, after: int = 0) -> None:
    """Add all-padding (zero) rows before and after the batch rows of every layer (in place): rows that
    hold no token yet, next to rows that do (their attention mask is 0 in every column)."""
    for layer in _layers(cache):
        if layer.is_initialized:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                shape = (before, *t.shape[1:]), (after, *t.shape[1:])
                setattr(layer, name, torch.cat([t.new_zeros(shape[0]), t, t.new_zeros(shape[1])], dim=0))


def leading_padding(attention_mask: torch.Tensor) -> int:
    """Number of leading columns that are padding in every row of ``attention_mask`` [batch, seq]."""
    real = attention_mask.bool().any(dim=0)
    if not bool(real.any()):
        return attention_mask.shape[1]
    return int(real.float().argmax())


def merge_composition_caches(first: CompositionCache, second: CompositionCache) -> CompositionCache:
    """A cache holding ``first``'s rows then ``second``'s, left-padded to the longer one.

    Each sequence axis is padded on its own: the anchor's (attention mask, anchor cache) and each augmenting
    model's (``augment_masks[m]`` and the keys/values of the bridges fed by model m, which run along that
    model's tokens; the anchor's axis again when the models share a tokenizer). A bridge's keys/values run along
    the same axis as their model's mask, so padding each pair of tensors to the longer of the two
    pads every axis consistently. ``texts`` (per row) are concatenated.
    ``first`` is reused (its tensors replaced); ``second`` should not be used afterwards.
    """
    if (first.texts is None) != (second.texts is None):
        raise ValueError("one cache holds per-row text state and the other does not")
    length = max(first.seq_len, second.seq_len)
    first.attention_mask = torch.cat(
        [pad_left_to(first.attention_mask, length, 1), pad_left_to(second.attention_mask, length, 1)], dim=0
    )
    if first.anchor is not None:
        merge_hf_caches(first.anchor, second.anchor, length)
    for a, b in zip(first.augments, second.augments, strict=True):
        if (a is None) != (b is None):
            raise ValueError("one cache holds augmenting caches and the other does not")
        if a is not None:
            merge_hf_caches(a, b, length)
    first.bridge_keys = [_cat_padded(a, b, 2) for a, b in zip(first.bridge_keys, second.bridge_keys, strict=True)]
    first.bridge_values = [_cat_padded(a, b, 2) for a, b in zip(first.bridge_values, second.bridge_values, strict=True)]
    first.augment_masks = [_cat_padded(a, b, 1) for a, b in zip(first.augment_masks, second.augment_masks, strict=True)]
    if first.texts is not None:
        first.texts = list(first.texts) + list(second.texts)
    _drop_buffers(first)
    return first


def _cat_padded(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """``a``'s rows then ``b``'s, both left-padded along ``dim`` to the longer of the two."""
    length = max(a.shape[dim], b.shape[dim])
    return torch.cat([pad_left_to(a, length, dim), pad_left_to(b, length, dim)], dim=0)


def _drop_buffers(cache: CompositionCache) -> None:
    """Forget the spare-room buffers behind the bridge keys/values (they no longer hold them)."""
    if hasattr(cache, "buffers"):
        cache.buffers = []


def select_rows(cache: CompositionCache, index: torch.Tensor, bridge_augments: list[int]) -> None:
    """Keep (and order) rows ``index`` of a CompositionCache, then drop columns that became all padding.

    ``bridge_augments``: per bridge, the augmenting model it reads (``[link.augment for link in model.links]``).
    """
    index = index.to(cache.attention_mask.device)
    cache.attention_mask = cache.attention_mask.index_select(0, index)
    for c in [cache.anchor, *cache.augments]:
        if c is not None:
            select_rows_hf_cache(c, index)
    cache.bridge_keys = [k.index_select(0, index) for k in cache.bridge_keys]
    cache.bridge_values = [v.index_select(0, index) for v in cache.bridge_values]
    cache.augment_masks = [m.index_select(0, index.to(m.device)) for m in cache.augment_masks]
    if cache.texts is not None:
        cache.texts = [cache.texts[i] for i in index.tolist()]
    _drop_buffers(cache)
    trim_left(cache, bridge_augments)


def trim_left(cache: CompositionCache, bridge_augments: list[int]) -> None:
    """Drop leading columns that are padding in every row (after long rows left the batch).

    The anchor's axis is trimmed by its mask; each augmenting model's axis (its mask and the keys/values of
    the bridges that read it, ``bridge_augments[b]`` says which) by that model's mask.
    """
    columns = leading_padding(cache.attention_mask)
    if 0 < columns < cache.seq_len:
        for c in [cache.anchor, *cache.augments]:
            if c is not None:
                crop_left_hf_cache(c, columns, cache.seq_len)
        cache.attention_mask = cache.attention_mask[:, columns:]
        _drop_buffers(cache)
    for m, mask in enumerate(cache.augment_masks):
        cut = leading_padding(mask)  # all of it when no row holds a token of model m: width 0 is fine
        if cut == 0:
            continue
        cache.augment_masks[m] = mask[:, cut:]
        for b, augment in enumerate(bridge_augments):
            if augment == m:
                cache.bridge_keys[b] = cache.bridge_keys[b][:, :, cut:]
                cache.bridge_values[b] = cache.bridge_values[b][:, :, cut:]
        _drop_buffers(cache)

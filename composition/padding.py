"""Left padding: the one layout of a batch of sequences of different lengths in this project.

Every batch keeps each row's tokens at the right end, padding first:

    row A  [pad pad  a0  a1  a2 ]      attention mask  [0 0 1 1 1]
    row B  [ b0  b1  b2  b3  b4 ]                      [1 1 1 1 1]

so the newest token of every row sits in the last column (one decode step appends one column), and positions
come from the mask (``composition.model.positions_from_mask``). Three operations make and keep that layout:

    pad_left(rows, pad_id)                 token lists -> (ids, mask), rows may be empty
    to_left_padding(ids, mask, pad_id)     any padded batch -> the same tokens, left-padded
    pad_left_to(t, length, dim)            a tensor zero-padded on the left of one dimension (cache surgery)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, longest] ids and mask (long), each row's tokens at the right end; an empty row is all padding."""
    width = max((len(r) for r in rows), default=0)
    if rows and width and all(len(r) == width for r in rows):  # no padding (a decode step's one token per row)
        ids = torch.tensor(rows, dtype=torch.long)
        return ids, torch.ones_like(ids)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r) :] = 1
    return ids, mask


def to_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int):
    """Move each row's real tokens to the right end (left padding), keeping their order."""
    if bool((attention_mask[:, -1] == 1).all()):
        return input_ids, attention_mask
    order = torch.argsort(attention_mask.to(torch.int8), dim=1, stable=True)  # pads first, real tokens after
    ids = torch.gather(input_ids, 1, order)
    mask = torch.gather(attention_mask, 1, order)
    return ids.masked_fill(mask == 0, pad_id), mask


def pad_left_to(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` on the left of dimension ``dim`` to ``length``."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    dim = dim % t.dim()
    pad = [0, 0] * (t.dim() - dim - 1) + [missing, 0]  # F.pad counts from the last dimension
    return F.pad(t, pad)

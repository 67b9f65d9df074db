"""The next-token loss computed only at the positions that predict a label.

Fine-tuning data usually labels the completion only (the prompt is ``-100``), yet a plain causal-LM
forward projects *every* position onto the vocabulary. For small models with large vocabularies
that LM head (and its backward) is most of a training step. These helpers keep the logits of the
positions whose next token carries a label in some row and compute the same loss as Hugging Face's
(the mean cross-entropy over labelled tokens, in float32):

    keep = predicting_positions(labels)                    # [n] sorted sequence indices
    out = lm(input_ids, attention_mask, logits_to_keep=keep)  # logits [batch, n, vocab]
    loss = next_token_loss(out.logits, labels, keep)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t (sorted, [n]) whose next token t + 1 has a label in at least one row of ``labels`` [batch, seq]."""
    return (labels[:, 1:] != IGNORE).any(dim=0).nonzero().flatten()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [batch, n, vocab] (kept at ``positions``) against ``labels`` shifted by one."""
    targets = labels[:, positions + 1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)

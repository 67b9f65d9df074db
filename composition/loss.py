"""The next-token loss with the LM head run only on the hidden states that predict a label.

Fine-tuning data usually labels the completion only (the prompt is ``-100``), yet a plain causal-LM
forward projects *every* position onto the vocabulary. For small models with large vocabularies
that LM head and its backward are a large share of a training step. ``labelled_head`` hooks the
model's output embeddings so that, inside the block, they see only the hidden states whose next
token carries a label (gathered across rows, so each row pays only for its own labels); the loss
is the same as Hugging Face's (the mean cross-entropy over labelled tokens, in float32):

    out = call_with_loss(lm, labels, labelled_only=True, input_ids=ids, attention_mask=mask)
    out.loss, out.logits   # logits [1, n labelled positions, vocab]
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


@contextmanager
def labelled_head(model: nn.Module, labels: torch.Tensor):
    """Within the block, ``model``'s LM head runs on the labelled positions only; yields their targets [n].

    Position t of a row is kept when ``labels[row, t + 1]`` is a label (not -100). The head's input
    [batch, seq, d] becomes [1, n, d] (row-major order), so the logits come out as [1, n, vocab].
    Raises ValueError for a model without output embeddings (``get_output_embeddings()`` is None).
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings to restrict to labelled positions")
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][predicts[:, :-1]]

    def gather(module, args):
        hidden = args[0]
        if hidden.shape[:2] != predicts.shape:
            raise ValueError(
                f"the LM head got hidden states of shape {tuple(hidden.shape)}, not one per label position "
                f"{tuple(predicts.shape)}: call the model with logits_to_keep=0 inside labelled_head"
            )
        return (hidden[predicts].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield targets
    finally:
        handle.remove()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the labelled positions' ``logits`` [1, n, vocab] against ``targets`` [n]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets)


def call_with_loss(lm: nn.Module, labels: torch.Tensor | None, labelled_only: bool, logits_to_keep: int = 0,
                   **kwargs):
    """``lm(labels=labels, logits_to_keep=logits_to_keep, **kwargs)``; with ``labelled_only`` (and labels),
    the LM head runs on the labelled positions only and ``out.loss`` is computed from them."""
    if labels is None or not labelled_only:
        return lm(labels=labels, logits_to_keep=logits_to_keep, **kwargs)
    with labelled_head(lm, labels) as targets:
        out = lm(labels=None, logits_to_keep=0, **kwargs)
    out.loss = next_token_loss(out.logits, targets)
    return out

"""Decoding for ComposedModel: greedy or sampled, batched with left padding, with or without caches.

With ``use_cache=True`` (the default) each new token costs one step of the anchor and one step
of each augmenting model; the bridges reuse their cached keys and values. ``use_cache=False``
recomputes the whole sequence every step: it exists to check the cache and to measure it.
"""

from __future__ import annotations

import torch

from composition.cache import CompositionCache
from composition.padding import to_left_padding


def sample_next(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab].

    Sampling runs on ``(logits - max) / temperature`` in float64: the largest logit is 0 and every other
    one is <= 0, and any positive Python float stays positive in float64 (in float32, 2.4e-78 rounds to 0),
    so no temperature > 0, however small, overflows to inf or makes a NaN. As the
    temperature goes to 0 the distribution goes to the argmax (uniform over exact ties), which is what
    such a temperature means. A -inf logit is a token ruled out (a grammar's mask); a row with NaN or +inf, or
    with no finite logit, raises ``ValueError``: no token can be drawn from it, and a caller serving several
    rows fails that row alone.
    """
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double()
    bad = logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1) | ~torch.isfinite(logits).any(dim=-1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"the model produced non-finite logits (NaN or inf) in row(s) {rows}: no token can be sampled")
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Generate continuations.

    Args:
        input_ids: [batch, seq] prompts; padded rows are re-aligned to left padding.
        attention_mask: [batch, seq], 0 at padding.
        max_new_tokens: tokens to add per row (rows that hit eos are padded after it).
        do_sample, temperature, top_k, top_p: sampling; greedy when do_sample is False.
        eos_token_id: one id or a list; a row stops after producing one.
        pad_token_id: fills finished rows; defaults to the first eos id, else 0.
        seed: seeds the sampler (reproducible sampling).
        use_cache: decode with caches (default) or recompute the full sequence each step.
    Returns:
        [batch, seq + new] token ids: the (left-padded) prompts followed by the new tokens.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = to_left_padding(input_ids, attention_mask, pad)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)

    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    sequences, mask = input_ids, attention_mask
    cache: CompositionCache | None = None
    step_ids, step_mask = input_ids, attention_mask
    for _ in range(max_new_tokens):
        if use_cache:
            out = model(step_ids, step_mask, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
        else:
            out = model(sequences, mask, logits_to_keep=1)
        next_ids = sample_next(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        next_ids = next_ids.masked_fill(done, pad)
        sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids[:, None])], dim=1)
        step_ids, step_mask = next_ids[:, None], torch.ones_like(next_ids[:, None])
        if eos:
            done |= torch.isin(next_ids, eos_t)
            if bool(done.all()):
                break
    return sequences

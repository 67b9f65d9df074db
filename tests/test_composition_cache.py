"""Specification of the bridge key/value buffers in CompositionCache (composition/cache.py)."""

from __future__ import annotations

import torch

from composition.cache import CompositionCache, append_seq


def kv(seq, seed, batch=2, heads=3, head_dim=4):
    return torch.randn(batch, heads, seq, head_dim, generator=torch.Generator().manual_seed(seed))


def cache_with(keys, values):
    return CompositionCache(torch.ones(keys.shape[0], keys.shape[2], dtype=torch.long), None, [], [keys], [values])


def test_appending_equals_concatenation_step_after_step():
    past, buffer = kv(5, 0), None
    expected = past
    for step in range(200):  # crosses several capacity growths
        new = kv(1, step + 1)
        buffer, past = append_seq(buffer, past, new)
        expected = torch.cat([expected, new], dim=2)
        assert torch.equal(past, expected)


def test_appending_a_token_does_not_copy_the_cached_keys():
    buffer, first = append_seq(None, kv(5, 0), kv(1, 1))
    _, second = append_seq(buffer, first, kv(1, 2))
    assert second.data_ptr() == first.data_ptr() and second.shape[2] == 7


def test_continuing_an_older_cache_twice_leaves_the_first_continuation_intact():
    cache = cache_with(kv(6, 0), kv(6, 1))
    keys_a, values_a, buffers_a = cache.extend_bridges([kv(1, 2)], [kv(1, 3)])
    step_a = CompositionCache(cache.attention_mask, None, [], keys_a, values_a, buffers_a)
    keys_a2, _, _ = step_a.extend_bridges([kv(1, 4)], [kv(1, 5)])  # the buffer now holds 8 positions
    snapshot = keys_a2[0].clone()
    keys_b, values_b, _ = step_a.extend_bridges([kv(1, 6)], [kv(1, 7)])  # a second continuation of step_a
    assert torch.equal(keys_a2[0], snapshot)
    assert torch.equal(keys_b[0], torch.cat([kv(6, 0), kv(1, 2), kv(1, 6)], dim=2))
    assert torch.equal(values_b[0], torch.cat([kv(6, 1), kv(1, 3), kv(1, 7)], dim=2))


def test_reordered_cache_appends_to_the_kept_rows():
    keys, values = kv(4, 0), kv(4, 1)
    cache = cache_with(keys, values)
    k, v, buffers = cache.extend_bridges([kv(1, 2)], [kv(1, 3)])
    cache = CompositionCache(torch.ones(2, 5, dtype=torch.long), None, [], k, v, buffers)
    cache.reorder(torch.tensor([1]))
    k2, _, _ = cache.extend_bridges([kv(1, 4, batch=1)], [kv(1, 5, batch=1)])
    assert torch.equal(k2[0], torch.cat([keys[1:], kv(1, 2)[1:], kv(1, 4, batch=1)], dim=2))


def test_under_autograd_appending_keeps_gradients_flowing():
    past = kv(3, 0).requires_grad_()
    _, out = append_seq(None, past, kv(1, 1))
    out.sum().backward()
    assert torch.equal(past.grad, torch.ones_like(past))

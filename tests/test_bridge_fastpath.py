"""The bridge's cheaper kernels (composition/bridge.py) change no value and no gradient.

Each test sets a part of the bridge against the formula it replaces, written out here as it was first
written, and asks for bit-identical results: the fused RMSNorm kernel, the rotary tables reused across
calls, the mask that needs no causal cut, and the mask-free attention when every key is visible.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from composition.bridge import _FUSED_RMS_DTYPES, Bridge, RMSNorm, apply_rotary, cross_model_mask


# ---------------------------------------------------------------- the formulas the fast paths replace
def reference_rms(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def reference_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None, :, None] * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)


def reference_mask(key_valid, query_start, num_queries, window=None):
    key_idx = torch.arange(key_valid.shape[1])
    query_idx = torch.arange(query_start, query_start + num_queries)
    causal = key_idx[None, :] <= query_idx[:, None]
    if window is not None:
        causal &= key_idx[None, :] > query_idx[:, None] - window
    return (causal[None] & key_valid[:, None, :])[:, None]


def reference_bridge(bridge: Bridge, h_augment, key_positions, h_anchor, mask, positions):
    """keys_values then forward, always through the masked attention."""
    norm = (lambda n, x: reference_rms(n, x) if isinstance(n, RMSNorm) else n(x))
    rotate = (lambda t, p: reference_rotary(t, p, bridge.rope_theta) if bridge.rotary else t)
    kv = bridge.proj(norm(bridge.augment_norm, h_augment))
    keys, values = rotate(bridge._heads(bridge.k(kv)), key_positions), bridge._heads(bridge.v(kv))
    query = norm(bridge.query_norm, h_anchor)
    q = rotate(bridge._heads(bridge.q(query)), positions)
    has_key = mask.any(dim=-1, keepdim=True)
    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask | ~has_key) * has_key
    if bridge.gate is not None:
        attn = attn * torch.sigmoid(bridge.gate(query)).transpose(1, 2)[..., None]
    elif bridge.gate_retrieved is not None:
        w, b = bridge.gate_retrieved[:, :-1], bridge.gate_retrieved[:, -1]
        attn = attn * torch.sigmoid(torch.einsum("bhsd,hd->bhs", attn, w)[..., None] + b[None, :, None, None])
    b, _, s, _ = attn.shape
    return bridge.o(attn.transpose(1, 2).reshape(b, s, -1))


def randomised(module, seed: int = 0):
    """Random weights everywhere (norm weights around 1), as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name or name == "weight" else 0.0))
    return module


# ---------------------------------------------------------------- the parts
@pytest.mark.parametrize("dtype", _FUSED_RMS_DTYPES)
def test_fused_rms_norm_gives_the_composite_values_and_gradients(dtype):
    norm = randomised(RMSNorm(48)).to(dtype)
    x = (torch.randn(3, 7, 48) * 4).to(dtype).requires_grad_()
    got, want = norm(x), reference_rms(norm, x)
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, (x, norm.weight), g),
                                                  torch.autograd.grad(want, (x, norm.weight), g)))


@pytest.mark.parametrize("head_dim", [64, 10, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_the_rotate_half_formula_bit_for_bit_also_when_its_tables_are_reused(head_dim, dtype):
    positions = torch.randint(0, 3000, (2, 9))
    x = torch.randn(2, 3, 9, head_dim).to(dtype)
    for _ in range(2):  # the second call reuses the tables
        assert torch.equal(apply_rotary(x, positions, 10000.0), reference_rotary(x, positions, 10000.0))
    assert torch.equal(apply_rotary(x, positions, 500.0), reference_rotary(x, positions, 500.0))
    positions.add_(1)  # changed in place: the tables are made again
    assert torch.equal(apply_rotary(x, positions, 500.0), reference_rotary(x, positions, 500.0))


def test_rotary_gradients_are_those_of_the_rotate_half_formula():
    positions = torch.arange(6).expand(2, 6)
    x = torch.randn(2, 4, 6, 16, requires_grad=True)
    g = torch.randn(2, 4, 6, 16)
    got = torch.autograd.grad(apply_rotary(x, positions, 10000.0), x, g)[0]
    assert torch.equal(got, torch.autograd.grad(reference_rotary(x, positions, 10000.0), x, g)[0])


def test_cross_model_mask_equals_the_general_rule_in_every_case():
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    valid[2, 5] = False
    for keys in (0, 1, 5, 12):
        for start in (0, 3, keys - 1, keys):
            for queries in (1, 4):
                for window in (None, 1, 3):
                    if start < 0:
                        continue
                    want = reference_mask(valid[:, :keys], start, queries, window)
                    got = cross_model_mask(valid[:, :keys], start, queries, window)
                    assert got.shape == want.shape and torch.equal(got, want), (keys, start, queries, window)


# ---------------------------------------------------------------- the whole bridge
VARIANTS = {
    "plain": {},
    "rotary": {"rotary": True},
    "anchor gate, mlp": {"rotary": True, "gate": True, "proj_hidden": 24},
    "retrieved gate": {"gate": "retrieved"},
    "robust norm": {"rotary": True, "augment_norm": "robust"},
    "no norm": {"norm": False},
}


def cases():
    """(key valid [batch, keys], query start, queries): prefill, and decode steps with and without padding."""
    full = torch.ones(2, 9, dtype=torch.bool)
    padded = full.clone()
    padded[1, :3] = False
    yield full, 0, 9
    yield padded, 0, 9
    yield full, 8, 1  # a decode step: every key visible, the mask-free attention
    yield padded, 8, 1
    yield full, 6, 3


@pytest.mark.parametrize("variant", VARIANTS)
def test_bridge_outputs_and_gradients_are_those_of_the_masked_reference(variant):
    bridge = randomised(Bridge(20, 32, 4, **VARIANTS[variant]))
    g = torch.Generator().manual_seed(1)
    for valid, start, queries in cases():
        h_aug = torch.randn(2, valid.shape[1], 20, generator=g)
        h = torch.randn(2, queries, 32, generator=g, requires_grad=True)
        key_pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        pos = key_pos[:, start : start + queries]
        mask = cross_model_mask(valid, start, queries)
        with torch.no_grad():
            k, v = bridge.keys_values(h_aug, key_pos)
            want = reference_bridge(bridge, h_aug, key_pos, h, mask, pos)
            assert torch.equal(bridge(h, k, v, mask, pos), want), (variant, start, queries)
        out = bridge(h, *bridge.keys_values(h_aug, key_pos), mask, pos)
        ref = reference_bridge(bridge, h_aug, key_pos, h, mask, pos)
        params = [h, *bridge.parameters()]
        grad = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad(out, params, grad, allow_unused=True)
        exp = torch.autograd.grad(ref, params, grad, allow_unused=True)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, exp)), (variant, start)

"""The bridge: projection + causal cross-attention + zero-initialised output (the only trained parameters).

One bridge reads one augmenting hidden state ``[batch, seq_aug, d_aug]`` and adds to one anchor
hidden state ``[batch, seq, d_anchor]``:

    kv   = proj(norm(h_aug))                      # f_proj: d_aug -> d_anchor (linear, or an MLP)
    out  = o(attn(q(norm(h_anchor)), k(kv), v(kv), mask))    # optionally * sigmoid(gate(norm(h_anchor)))
    h_anchor <- h_anchor + out

``o`` starts at zero, so at initialisation the composed model is exactly the anchor.
The mask is causal across models: anchor position t sees augmenting positions <= t that are not
padding (see ``cross_model_mask``).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn


# dtypes in which ``F.rms_norm`` gives the composite's exact values and gradients (in half precisions
# it computes in float32, which rounds differently); tests/test_bridge_fastpath.py checks this
_FUSED_RMS_DTYPES = (torch.float32, torch.float64)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _FUSED_RMS_DTYPES and x.dtype == self.weight.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one call instead of six
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RobustNorm(nn.Module):
    """Scale each vector by its typical channel, not its RMS, and softly clip what stands far out.

    Some models' hidden states carry a few massive channels: in Gemma-3-270m's layer 9 one channel holds ~97%
    of the energy and a token's RMS is ~9x its median channel's, so after RMSNorm every other channel is ~10x
    smaller than in a well-spread state, and a bridge has to grow its weights ~10x (at Adam's fixed step size,
    ~10x the steps) to read them. Here the scale is the median absolute value (/ 0.6745: a Gaussian vector's
    RMS), which a few channels cannot move, and ``clip * tanh(x / clip)`` keeps those channels from swamping
    the projection. On a state without outliers it is close to RMSNorm.
    """

    def __init__(self, dim: int, clip: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.clip = clip
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().median(dim=-1, keepdim=True).values / 0.6745 + self.eps
        return self.clip * torch.tanh(x / (scale * self.clip)) * self.weight


@functools.lru_cache(maxsize=16)
def _inverse_frequencies(half: int, theta: float, device: torch.device) -> torch.Tensor:
    return theta ** (-torch.arange(half, device=device, dtype=torch.float32) / half)


# the rotary tables of the last positions seen, kept while that tensor lives: within one forward every bridge
# rotates its queries and keys at the same positions, so the tables are made once, not once per call
_last_tables: tuple | None = None


def _forget_tables(positions_ref: weakref.ref) -> None:
    global _last_tables
    memo = _last_tables
    if memo is not None and memo[0] is positions_ref:
        _last_tables = None


def _rotary_tables(positions: torch.Tensor, half: int, theta: float, dtype: torch.dtype):
    """``[cos, cos]`` and ``[-sin, sin]`` [batch, 1, seq, 2 * half] at ``positions`` [batch, seq].

    Reused while the same ``positions`` tensor, unchanged in place (its version counter), comes back with the
    same settings; freed with it. Inference-mode tables are not reused outside inference mode (autograd
    cannot save them).
    """
    global _last_tables
    settings = (half, theta, dtype, torch.is_inference_mode_enabled())
    memo = _last_tables
    if memo is not None and memo[0]() is positions and memo[1] == positions._version and memo[2] == settings:
        return memo[3], memo[4]
    angles = positions.to(torch.float32)[:, None, :, None] * _inverse_frequencies(half, theta, positions.device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    cos2, sin2 = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
    _last_tables = (weakref.ref(positions, _forget_tables), positions._version, settings, cos2, sin2)
    return cos2, sin2


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x`` [batch, heads, seq, head_dim] by ``positions`` [batch, seq] (the rotate-half form).

    ``x * [cos, cos] + [x2, x1] * [-sin, sin]``: the values of ``[x1 cos - x2 sin, x2 cos + x1 sin]``
    bit for bit (``a + b * -s`` rounds as ``a - b * s``) in four kernels instead of nine.
    """
    half = x.shape[-1] // 2
    cos2, sin2 = _rotary_tables(positions, half, theta, x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = x[..., : 2 * half] * cos2 + torch.cat([x2, x1], dim=-1) * sin2
    if 2 * half == x.shape[-1]:
        return rotated
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)


def cross_model_mask(
    key_valid: torch.Tensor, query_start: int, num_queries: int, window: int | None = None
) -> torch.Tensor:
    """Which augmenting positions each anchor position may attend to.

    Both models read the same token sequence, so positions share one index space.

    Args:
        key_valid: [batch, seq_keys] bool, False at padding.
        query_start: sequence index of the first query (the number of cached tokens).
        num_queries: number of query positions.
        window: if set, a query sees only the last ``window`` keys up to its own index
            (``window=1``: each anchor token reads the augmenting states of the same token).
    Returns:
        [batch, 1, num_queries, seq_keys] bool, True where attention is allowed:
        key index <= query index (and > query index - window) and the key is not padding. When no key
        lies after the first query (a decode step) and there is no window, a broadcast view of ``key_valid``.
    """
    num_keys = key_valid.shape[1]
    if window is None and query_start >= num_keys - 1:  # every key at or before the first query: no causal cut
        return key_valid[:, None, None, :].expand(-1, 1, num_queries, -1)
    key_idx = torch.arange(num_keys, device=key_valid.device)
    query_idx = torch.arange(query_start, query_start + num_queries, device=key_valid.device)
    causal = key_idx[None, :] <= query_idx[:, None]  # [queries, keys]
    if window is not None:
        causal &= key_idx[None, :] > query_idx[:, None] - window
    return (causal[None] & key_valid[:, None, :])[:, None]


class Bridge(nn.Module):
    """Projection of one augmenting layer plus cross-attention into one anchor layer."""

    def __init__(
        self,
        d_augment: int,
        d_anchor: int,
        num_heads: int,
        rotary: bool = False,
        rope_theta: float = 10000.0,
        norm: bool = True,
        proj_hidden: int | None = None,
        gate: bool | str = False,
        augment_norm: str = "rms",
    ):
        super().__init__()
        if d_anchor % num_heads:
            raise ValueError(
                f"bridge heads {num_heads} do not divide the anchor width {d_anchor}: "
                f"set num_heads to a divisor of {d_anchor}"
            )
        self.num_heads = num_heads
        self.head_dim = d_anchor // num_heads
        self.rotary = rotary
        self.rope_theta = rope_theta
        if augment_norm not in ("rms", "robust"):
            raise ValueError(f"augment_norm must be 'rms' or 'robust', got {augment_norm!r}")
        self.augment_norm = (RobustNorm if augment_norm == "robust" else RMSNorm)(d_augment) if norm else nn.Identity()
        self.query_norm = RMSNorm(d_anchor) if norm else nn.Identity()
        if proj_hidden:  # f_proj as an MLP: a non-linear read-out of the augmenting state
            self.proj = nn.Sequential(
                nn.Linear(d_augment, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, d_anchor)
            )
        else:  # the paper's linear f_proj
            self.proj = nn.Linear(d_augment, d_anchor)
        self.q = nn.Linear(d_anchor, d_anchor, bias=False)
        self.k = nn.Linear(d_anchor, d_anchor, bias=False)
        self.v = nn.Linear(d_anchor, d_anchor, bias=False)
        self.o = nn.Linear(d_anchor, d_anchor, bias=False)
        # per-token, per-head gate read from the anchor's own state: the anchor decides where it
        # takes in augmenting information (sigmoid(0) = 0.5 at initialisation; o is zero anyway)
        if gate not in (False, True, "anchor", "retrieved"):
            raise ValueError(f"gate must be false, true/'anchor' or 'retrieved', got {gate!r}")
        self.gate = nn.Linear(d_anchor, num_heads) if gate in (True, "anchor") else None
        # or read from what each head retrieved (the augmenting side's content, not the anchor's token)
        self.gate_retrieved = nn.Parameter(torch.zeros(num_heads, self.head_dim + 1)) if gate == "retrieved" else None
        self._zero_outputs()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh random initialisation (from the torch RNG), the output at zero: composed == anchor."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
            elif isinstance(module, (RMSNorm, RobustNorm)):
                module.weight.fill_(1.0)
        self._zero_outputs()

    @torch.no_grad()
    def _zero_outputs(self) -> None:
        nn.init.zeros_(self.o.weight)  # composed model == anchor at initialisation
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        if self.gate_retrieved is not None:
            self.gate_retrieved.zero_()

    @property
    def dtype(self) -> torch.dtype:
        return self.o.weight.dtype

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [b, heads, s, head_dim]

    def keys_values(self, h_augment: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values for augmenting states.

        Args:
            h_augment: [batch, seq, d_augment] augmenting hidden states (any float dtype).
            positions: [batch, seq] token positions (used by rotary).
        Returns:
            keys, values: [batch, heads, seq, head_dim] in the bridge dtype; cache them while decoding.
        """
        kv = self.proj(self.augment_norm(h_augment.to(self.dtype)))
        k, v = self._heads(self.k(kv)), self._heads(self.v(kv))
        if self.rotary:
            k = apply_rotary(k, positions, self.rope_theta)
        return k, v

    def forward(
        self,
        h_anchor: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """The bridge's contribution to the anchor stream (add it to ``h_anchor``).

        Args:
            h_anchor: [batch, seq, d_anchor] anchor hidden states (queries).
            keys, values: [batch, heads, seq_keys, head_dim] from ``keys_values``.
            mask: [batch, 1, seq, seq_keys] bool from ``cross_model_mask``.
            positions: [batch, seq] positions of the queries (used by rotary).
        Returns:
            [batch, seq, d_anchor] in h_anchor's dtype; zero for rows with no visible key.
        """
        if keys.shape[2] == 0:  # no augmenting token yet (different tokenizers: none closed so far)
            return torch.zeros_like(h_anchor)
        query = self.query_norm(h_anchor.to(self.dtype))
        q = self._heads(self.q(query))
        if self.rotary:
            q = apply_rotary(q, positions, self.rope_theta)
        if mask.device.type == "cpu" and mask.all():
            # every query sees every key (a decode step without padding): SDPA's mask-free kernel gives the
            # same values without building an additive mask of [seq, seq_keys] (on an accelerator the check
            # would stall on a host sync, so there the mask is always applied)
            attn = F.scaled_dot_product_attention(q, keys, values)
        else:
            has_key = mask.any(dim=-1, keepdim=True)  # [b, 1, seq, 1]; False on rows of only padding
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask | ~has_key)
            attn = attn * has_key
        if self.gate is not None:
            attn = attn * torch.sigmoid(self.gate(query)).transpose(1, 2)[..., None]  # [b, heads, seq, 1]
        elif self.gate_retrieved is not None:
            w, b = self.gate_retrieved[:, :-1], self.gate_retrieved[:, -1]
            logit = torch.einsum("bhsd,hd->bhs", attn, w)[..., None] + b[None, :, None, None]
            attn = attn * torch.sigmoid(logit)  # [b, heads, seq, head_dim]; still 0 without a key
        b, _, s, _ = attn.shape
        out = self.o(attn.transpose(1, 2).reshape(b, s, -1))
        return out.to(h_anchor.dtype)

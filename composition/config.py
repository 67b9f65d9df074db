"""CompositionConfig: which layers are bridged and how each bridge is built.

Layer indices use Hugging Face's ``hidden_states`` convention on both sides:

* index ``0`` is the input of the first decoder layer (the embeddings),
* index ``i`` (1..L) is the output of decoder layer ``i - 1``.

So a bridge "at the output of anchor layer j" (the paper's placement) sits at anchor index
``j + 1``, and a bridge at index ``0`` acts before the anchor's first layer. An augmenting index
of ``0`` reads the augmenting model's embeddings.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a model, a bridge or a streamed state may have


class ConfigError(ValueError):
    """A setting that cannot work; the message says what to change. Base of every config error."""


def check_augment_tokenizers(given: list | None, num_augments: int) -> None:
    """Refuse an ``augment_tokenizers`` list that is not one entry per augmenting model (ConfigError)."""
    if given is not None and len(given) != num_augments:
        raise ConfigError(
            f"'augment_tokenizers' has {len(given)} entries for {num_augments} augmenting models: give one per "
            f"entry of 'augments' (null: that model's own folder)"
        )


def did_you_mean(key: str, valid) -> str:
    """`` (did you mean 'x'?)`` for the closest valid key, or ``""``."""
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class LayerMapping:
    """Which augmenting hidden states feed which anchor hidden states, for one augmenting model.

    Give either ``every`` (the paper's default: every k-th augmenting layer output, mapped onto
    the same number of evenly spaced anchor layer outputs) or explicit ``pairs`` of
    ``(augment_index, anchor_index)``.
    """

    every: int | None = 4
    pairs: list[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.pairs is not None:
            self.pairs = [tuple(int(x) for x in p) for p in self.pairs]  # type: ignore[misc]
            self.every = None
            for p in self.pairs:
                if len(p) != 2:
                    raise ConfigError(
                        f"layer pair {list(p)} must have two entries: [augment_index, anchor_index]"
                    )
            if not self.pairs:
                raise ConfigError("pairs is empty: give at least one [augment_index, anchor_index]")
        elif self.every is None or int(self.every) < 1:
            raise ConfigError(f"every must be a positive integer, got {self.every!r}")

    def resolve(self, augment_layers: int, anchor_layers: int) -> list[tuple[int, int]]:
        """Concrete ``(augment_index, anchor_index)`` pairs for models with these depths.

        Raises ConfigError naming the valid range when an index does not exist.
        """
        if self.pairs is not None:
            for a, b in self.pairs:
                if not 0 <= a <= augment_layers:
                    raise ConfigError(
                        f"augment index {a} does not exist: the augmenting model has {augment_layers} "
                        f"layers, so valid indices are 0 (embeddings) to {augment_layers} (last layer output)"
                    )
                if not 0 <= b <= anchor_layers:
                    raise ConfigError(
                        f"anchor index {b} does not exist: the anchor has {anchor_layers} layers, so valid "
                        f"indices are 0 (before its first layer) to {anchor_layers} (last layer output)"
                    )
            if len(set(self.pairs)) != len(self.pairs):
                raise ConfigError(f"layer pairs {self.pairs} contain a duplicate pair")
            return list(self.pairs)
        k = int(self.every)  # type: ignore[arg-type]
        if k > augment_layers:
            raise ConfigError(
                f"every={k} selects no layer of an augmenting model with {augment_layers} layers: "
                f"use every <= {augment_layers} or explicit pairs"
            )
        augment_idx = list(range(k, augment_layers + 1, k))
        n = len(augment_idx)
        if n > anchor_layers:
            raise ConfigError(
                f"every={k} selects {n} augmenting layers but the anchor has only {anchor_layers}: "
                f"use every >= {-(-augment_layers // anchor_layers)} or explicit pairs"
            )
        anchor_idx = [round((i + 1) * anchor_layers / n) for i in range(n)]
        return list(zip(augment_idx, anchor_idx))

    def to_dict(self) -> dict[str, Any]:
        if self.pairs is not None:
            return {"pairs": [list(p) for p in self.pairs]}
        return {"every": self.every}


@dataclass
class CompositionConfig:
    """How the anchor is composed with its augmenting models.

    Attributes:
        mappings: one LayerMapping per augmenting model, in the order the models are given.
        num_heads: heads of each bridge's cross-attention; None takes the anchor's head count.
        rotary: rotary positions on bridge queries and keys (anchor and augmenting positions
            are aligned token by token), so a bridge can tell which augmenting token is which.
        rope_theta: rotary base.
        window: local cross-attention: anchor token t sees only augmenting tokens in
            (t - window, t]; None sees all of them up to t (the paper). ``window=1`` makes each
            bridge a per-token map from the augmenting model's state to the anchor's, a strong prior
            when both models read the same tokens.
        norm: RMSNorm on the bridge's query input and on the augmenting states.
        augment_norm: how the augmenting states are normalised (when ``norm``): ``"rms"`` (RMSNorm), or
            ``"robust"``: scaled by their median channel and softly clipped, for models whose states hold a
            few massive channels (Gemma-3), which leave every other channel near zero after RMSNorm
            (bridge.RobustNorm says more).
        proj_hidden: if set, the projection f_proj is a two-layer MLP with this hidden width
            (Linear, GELU, Linear) instead of the paper's single linear map. A linear map can
            only move the augmenting state into the anchor's space; an MLP can also decode it
            (e.g. "this key's value is 7" into the anchor's embedding of "7"), which a lookup
            of discrete facts needs.
        gate: scale each head's cross-attention output per token by a sigmoid gate, so the bridge
            can add nothing where the augmenting model has nothing to say (cross-attention's softmax
            cannot say "nothing here", and with ``window=1``, one key, it cannot choose at all).
            ``true`` or ``"anchor"``: the gate reads the anchor's own state (the anchor decides where
            it takes information in); ``"retrieved"``: each head's gate reads what that head
            retrieved, so it depends only on the augmenting side (useful when the anchor's states at
            the tokens that matter carry nothing it was trained on, e.g. tokens it never saw).
        bridge_dtype: dtype of the bridge parameters; inputs are cast to it and the output cast
            back to the anchor's dtype. float32 keeps training stable under a bf16 anchor.
    """

    mappings: list[LayerMapping] = field(default_factory=lambda: [LayerMapping()])
    num_heads: int | None = None
    rotary: bool = False
    rope_theta: float = 10000.0
    window: int | None = None
    norm: bool = True
    augment_norm: str = "rms"
    proj_hidden: int | None = None
    gate: bool | str = False
    bridge_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.mappings = [m if isinstance(m, LayerMapping) else LayerMapping(**m) for m in self.mappings]
        if not self.mappings:
            raise ConfigError("mappings is empty: give one LayerMapping per augmenting model")
        if self.num_heads is not None and int(self.num_heads) < 1:
            raise ConfigError(f"num_heads must be positive or null (anchor's head count), got {self.num_heads}")
        if self.bridge_dtype not in DTYPES:
            raise ConfigError(f"bridge_dtype {self.bridge_dtype!r} is not one of {', '.join(DTYPES)}")
        if self.window is not None and int(self.window) < 1:
            raise ConfigError(f"window must be a positive integer or null (no window), got {self.window}")
        if self.proj_hidden is not None and int(self.proj_hidden) < 1:
            raise ConfigError(
                f"proj_hidden must be a positive integer or null (linear projection), got {self.proj_hidden}"
            )
        if self.gate not in (False, True, "anchor", "retrieved"):
            raise ConfigError(f"gate must be false, true (= 'anchor') or 'retrieved', got {self.gate!r}")
        if self.augment_norm not in ("rms", "robust"):
            raise ConfigError(f"augment_norm must be 'rms' or 'robust', got {self.augment_norm!r}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mappings"] = [m.to_dict() for m in self.mappings]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompositionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown composition keys {unknown}{did_you_mean(unknown[0], known)}; valid keys are {sorted(known)}"
            )
        mappings = []
        for m in d.get("mappings", [{}]):
            if not isinstance(m, dict) or set(m) - {"every", "pairs"}:
                raise ConfigError(
                    f"mapping {m!r} must be a dict with 'every: k' or 'pairs: [[augment_index, anchor_index], ...]'"
                )
            mappings.append(LayerMapping(**m))
        return cls(**{**d, "mappings": mappings})

"""ComposedModel: a frozen anchor, frozen augmenting models, and the bridges between them.

    model = ComposedModel(anchor, [augment], CompositionConfig())
    out = model(input_ids, attention_mask, labels=labels)       # out.loss, out.logits
    # models with different tokenizers: the same call on the anchor's ids (composition/alignment.py)
    model = ComposedModel(anchor, [augment], config, tokenizers=[anchor_tokenizer, augment_tokenizer])
    ids = model.generate(input_ids, attention_mask, max_new_tokens=32)
    model.save_pretrained("bridges/")                             # bridges only
    # several compositions over one anchor: each row of a batch chooses its own (None: the bare anchor)
    both = ComposedModel.stack({"es": spanish, "code": coder})
    out = both(input_ids, attention_mask, row_bridges=both.bridges_of(["es", "code", None]))

Bridges are attached to the anchor with hooks that do nothing unless the ComposedModel is
running, so calling the anchor directly still gives the anchor's own outputs.

There is one path for any tokenizers: each augmenting model reads its own tokens through ``self.aligner``
(composition/alignment.py); with one shared tokenizer that alignment is the identity, which is the
paper's composition, token for token.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from composition.alignment import Aligner, AugmentInputs, key_positions, visible_mask
from composition.augment import AugmentEncoder
from composition.bridge import Bridge, cross_model_mask
from composition.cache import CompositionCache
from composition.config import CompositionConfig, ConfigError, LayerMapping
from composition.layers import HiddenStateSite, describe_decoder
from composition.loss import call_with_loss


@dataclass(frozen=True)
class Link:
    """One bridge: augmenting model ``augment`` at index ``augment_index`` -> anchor index ``anchor_index``."""

    augment: int
    augment_index: int
    anchor_index: int


@dataclass
class _Running:
    """What the anchor hooks need during one forward pass.

    Each bridge's keys and values are made on first use (``resolve(b)``, at that bridge's site), so
    augmenting states given as a callable are fetched bridge by bridge, each once the anchor's layers
    below its bridge ran.
    """

    make_key_value: Callable[[int], tuple]  # bridge -> (keys, values, cache buffers)
    num_bridges: int
    masks: list[torch.Tensor]  # per augmenting model [batch, 1, new, seen by that model] bool
    positions: torch.Tensor  # [batch, new]
    row_bridges: torch.Tensor | None = None  # [batch, bridges] bool: which bridges apply to each row (None: all)
    active: list[bool] | None = None  # per bridge: whether any row takes it (a bridge no row takes is skipped)
    keys: list = field(init=False)  # per bridge [batch, heads, seen, head_dim], None until resolved
    values: list = field(init=False)
    buffers: list = field(init=False)  # the cache buffers behind keys/values

    def __post_init__(self):
        self.keys, self.values, self.buffers = ([None] * self.num_bridges for _ in range(3))

    def resolve(self, b: int) -> None:
        if self.keys[b] is None:
            self.keys[b], self.values[b], self.buffers[b] = self.make_key_value(b)

    def resolve_all(self) -> None:
        for b in range(self.num_bridges):
            self.resolve(b)


@dataclass
class _AugmentSide:
    """One augmenting model's side of a forward pass (``ComposedModel._augment_sides``)."""

    full_mask: torch.Tensor  # [batch, its tokens so far] (cached + new), 0 at padding
    mask: torch.Tensor  # [batch, 1, anchor queries, its tokens] bool: which of them each anchor query sees
    key_positions: torch.Tensor  # [batch, new] rotary positions of its new tokens' bridge keys
    new: int  # how many new tokens (columns) it has in this pass
    positions: torch.Tensor | None = None  # its new tokens' own positions when known (None: from full_mask)


DEFAULT = "default"  # the name of the one composition of a ComposedModel that is not a ``stack``


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Token positions [batch, seq] that skip padding (left padding starts real tokens at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ComposedModel(nn.Module):
    """An anchor LM composed with one or more augmenting LMs through trained bridges."""

    def __init__(self, anchor: nn.Module, augments: list[nn.Module], config: CompositionConfig | None = None,
                 tokenizers: list | None = None, identity_when_shared: bool = True):
        """
        Args:
            anchor, augments: the frozen models (Hugging Face causal LMs).
            config: bridges and layer mappings; one LayerMapping per augmenting model.
            tokenizers: ``[anchor_tokenizer, *augment_tokenizers]`` (fast tokenizers) when the models
                tokenise differently: ``forward`` and ``generate`` still take the anchor's ids, and each
                augmenting model reads the same text in its own tokens (composition/alignment.py).
                None: every model reads the anchor's token ids (one shared tokenizer).
            identity_when_shared: with ``tokenizers``, an augmenting model whose tokenizer equals the
                anchor's reads the anchor's own tokens (exactly the shared-tokenizer composition);
                False re-tokenises the text even then (to measure the text path).
        """
        super().__init__()
        if isinstance(augments, nn.Module):
            augments = [augments]
        if not augments:
            raise ConfigError("give at least one augmenting model")
        if config is None:
            config = CompositionConfig(mappings=[LayerMapping() for _ in augments])
        if len(config.mappings) != len(augments):
            raise ConfigError(
                f"the config has {len(config.mappings)} layer mappings for {len(augments)} augmenting "
                f"models: give one mapping per augmenting model"
            )
        self.config = config
        self.anchor = anchor
        self.tokenizers = list(tokenizers) if tokenizers is not None else None
        if tokenizers is not None and len(tokenizers) != len(augments) + 1:
            raise ConfigError(
                f"got {len(tokenizers)} tokenizers for 1 anchor and {len(augments)} augmenting models: give "
                f"tokenizers=[anchor_tokenizer, one per augmenting model], in the order of the models"
            )
        # one path: every augmenting model reads through an alignment, the identity when it reads the anchor's ids
        self.aligner = (Aligner(tokenizers[0], list(tokenizers[1:]), identity_when_shared) if tokenizers is not None
                        else Aligner.shared(len(augments)))
        self.anchor_info = describe_decoder(anchor)
        for m in [anchor, *augments]:
            m.requires_grad_(False)
            m.eval()

        self.links: list[Link] = []
        encoders = []
        for i, (augment, mapping) in enumerate(zip(augments, config.mappings)):
            info = describe_decoder(augment)
            if tokenizers is None and info.vocab_size != self.anchor_info.vocab_size:
                warnings.warn(
                    f"augmenting model {i} ({info.architecture}) has vocab size {info.vocab_size}, the anchor "
                    f"{self.anchor_info.vocab_size}: both models read the same token ids, so they must share a "
                    f"tokenizer (pass tokenizers=[anchor_tokenizer, augment_tokenizer, ...] to compose different "
                    f"tokenizers)",
                    stacklevel=2,
                )
            pairs = mapping.resolve(info.num_layers, self.anchor_info.num_layers)
            self.links += [Link(i, a, b) for a, b in pairs]
            encoders.append(AugmentEncoder(augment, [a for a, _ in pairs]))
        self.encoders = nn.ModuleList(encoders)

        heads = config.num_heads or self.anchor_info.num_heads
        dtype = getattr(torch, config.bridge_dtype)
        device = next(anchor.parameters()).device
        self.bridges = nn.ModuleList(
            Bridge(
                self.encoders[link.augment].info.hidden_size,
                self.anchor_info.hidden_size,
                heads,
                rotary=config.rotary,
                rope_theta=config.rope_theta,
                norm=config.norm,
                proj_hidden=config.proj_hidden,
                gate=config.gate,
                augment_norm=config.augment_norm,
            ).to(device=device, dtype=dtype)
            for link in self.links
        )
        # the bridges of each composition this model holds: one, unnamed, unless it is a ``stack``
        self.compositions: dict[str, list[int]] = {DEFAULT: list(range(len(self.links)))}
        self._running: _Running | None = None
        self._sites: dict[int, HiddenStateSite] = {}  # anchor index -> the hook that adds its bridges
        self._members: dict[int, list[int]] = {}  # anchor index -> the bridges added there
        self._attach()

    def _attach(self) -> None:
        """Hooks at every anchor index some bridge enters (and none elsewhere), after the links changed."""
        self._members = {}
        for b, link in enumerate(self.links):
            self._members.setdefault(link.anchor_index, []).append(b)
        for index in set(self._sites) - set(self._members):
            self._sites.pop(index).remove()
        for index in sorted(set(self._members) - set(self._sites)):
            self._sites[index] = HiddenStateSite(self.anchor_info, index, self._bridge_hook(index))

    @classmethod
    def stack(cls, compositions: dict[str, ComposedModel]) -> ComposedModel:
        """Several compositions over one anchor as one model, each row of a batch decoded with its own.

        ``compositions``: name -> a ComposedModel, all built on the same anchor module. An augmenting model
        that several of them use (the same module, read with the same tokenizer) becomes one augmenting model
        of the stack (in the order the compositions first name them), run once per row; bridges stay per
        composition. ``forward(row_bridges=model.bridges_of(names))`` says which bridges apply to each row (by
        composition name, None for the bare anchor); a bridge adds exactly zero to the other rows
        (``Bridge.forward``: a row that sees no key), so each row's result is its own composition's. The parts'
        hooks move to the stack: use the stack, not the parts, from here.
        """
        if not compositions:
            raise ConfigError("give at least one composition to stack")
        parts = list(compositions.values())
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = parts[0].config  # its window is every part's; its layer mappings describe the first only
        model.anchor = parts[0].anchor
        model.anchor_info = parts[0].anchor_info
        model.tokenizers = None
        model.links, model.bridges, model.encoders, model.compositions = [], nn.ModuleList(), nn.ModuleList(), {}
        model._slots = []  # per augmenting model of the stack: (its key, (aligner, index) it reads through)
        model._running, model._sites, model._members = None, {}, {}
        for name, part in compositions.items():
            model.add_composition(name, part)
        return model

    def _slot_key(self, part: ComposedModel, i: int) -> tuple:
        """What makes the part's augmenting model i one augmenting model of a stack: its module and tokenizer."""
        return (id(part.encoders[i].model), json.dumps(part.aligner.augment_fingerprints[i], sort_keys=True),
                part.aligner.identity[i])

    def augments_of(self, part: ComposedModel) -> list[int | None]:
        """Which of this stack's augmenting models each of ``part``'s is (None: none of them)."""
        keys = [key for key, _ in getattr(self, "_slots", [])]
        return [keys.index(k) if k in keys else None for k in (self._slot_key(part, i) for i in range(len(
            part.encoders)))]

    def add_composition(self, name: str, part: ComposedModel) -> list[int]:
        """Add ``part`` (a ComposedModel on this stack's anchor) as composition ``name``; returns its bridges'
        indices. Its augmenting models that the stack has (the same module and tokenizer) are shared; others
        are appended. Its hooks move to this stack. Between forward passes only."""
        if not hasattr(self, "_slots"):
            raise ValueError("add compositions to a stack (ComposedModel.stack), not to a single composition")
        if name in self.compositions:
            raise ValueError(f"a composition named {name!r} is already in this stack")
        if part.anchor is not self.anchor:
            raise ConfigError(f"composition {name!r} is built on another anchor module: build every composition "
                              f"on the same anchor (one loaded model) to stack them")
        if part.config.window != self.config.window:
            raise ConfigError(f"composition {name!r} has window {part.config.window}, the stack "
                              f"{self.config.window} (CompositionConfig.window): compositions served together must "
                              f"attend over the same window")
        slot_here = []
        for i, encoder in enumerate(part.encoders):
            slot = self.augments_of(part)[i]
            if slot is None:
                slot = len(self._slots)
                self._slots.append((self._slot_key(part, i), (part.aligner, i)))
                self.encoders.append(AugmentEncoder(encoder.model, []))
                self.aligner = Aligner.select([entry for _, entry in self._slots])
            self.encoders[slot].add_indices(encoder.indices)
            slot_here.append(slot)
        part.remove_hooks()
        start = len(self.links)
        self.links += [Link(slot_here[link.augment], link.augment_index, link.anchor_index) for link in part.links]
        self.bridges.extend(part.bridges)
        self.compositions[name] = list(range(start, len(self.links)))
        self._attach()
        return self.compositions[name]

    def remove_composition(self, name: str) -> list[int]:
        """Remove composition ``name``'s bridges; returns the indices they had (the bridges after them move down).
        Its augmenting models stay. Between forward passes only."""
        if name not in self.compositions or not hasattr(self, "_slots"):
            raise ValueError(f"no composition named {name!r} in this stack: it has {sorted(self.compositions)}")
        gone = self.compositions.pop(name)
        keep = [b for b in range(len(self.links)) if b not in set(gone)]
        new_index = {b: k for k, b in enumerate(keep)}
        self.links = [self.links[b] for b in keep]
        self.bridges = nn.ModuleList(self.bridges[b] for b in keep)
        self.compositions = {n: [new_index[b] for b in bs] for n, bs in self.compositions.items()}
        self._attach()
        return gone

    def composition_augments(self, name: str) -> list[int]:
        """The augmenting models composition ``name``'s bridges read."""
        return sorted({self.links[b].augment for b in self.compositions[name]})

    def bridges_of(self, names: list[str | None]) -> torch.Tensor | None:
        """[rows, bridges] bool: the bridges of each row's composition (by name; None: the bare anchor, no
        bridge). None when every row takes every bridge (``forward``'s fast path)."""
        unknown = sorted({n for n in names if n is not None and n not in self.compositions})
        if unknown:
            raise ValueError(f"no composition named {unknown}; this model has {sorted(self.compositions)}")
        everything = len(self.links)
        if all(n is not None and len(self.compositions[n]) == everything for n in names):
            return None
        out = torch.zeros(len(names), everything, dtype=torch.bool)
        for r, name in enumerate(names):
            if name is not None:
                out[r, self.compositions[name]] = True
        return out.to(next(self.anchor.parameters()).device)

    # ------------------------------------------------------------------ structure
    @property
    def augments(self) -> list[nn.Module]:
        return [e.model for e in self.encoders]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The bridge parameters: the only ones an optimiser should see."""
        return list(self.bridges.parameters())

    def reset_trainable_parameters(self) -> None:
        """Fresh random bridges (as at construction, from the torch RNG); the frozen models are untouched."""
        for bridge in self.bridges:
            bridge.reset_parameters()

    def num_bridge_parameters(self) -> int:
        return sum(p.numel() for p in self.bridges.parameters())

    def train(self, mode: bool = True):
        self.training = mode
        self.bridges.train(mode)
        self.anchor.eval()
        for e in self.encoders:
            e.model.eval()
        return self

    def remove_hooks(self) -> None:
        """Detach the bridges from the anchor and augmenting models for good."""
        for site in self._sites.values():
            site.remove()
        self._sites = {}
        for e in self.encoders:
            e.remove_hooks()

    def _bridge_hook(self, anchor_index: int):
        def add_bridges(hidden: torch.Tensor) -> torch.Tensor | None:
            run = self._running
            if run is None:  # the anchor is being called on its own
                return None
            out = hidden
            for b in self._members[anchor_index]:
                mask = run.masks[self.links[b].augment]
                if run.row_bridges is not None:
                    if not run.active[b]:
                        continue  # no row of this step takes it: it would add zero everywhere
                    mask = mask & run.row_bridges[:, b, None, None, None]  # other rows see no key: zero
                run.resolve(b)
                out = out + self.bridges[b](hidden, run.keys[b], run.values[b], mask, run.positions)
            return out

        return add_bridges

    # ------------------------------------------------------------------ forward
    def encode_augments(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        caches: list | None = None,
        use_cache: bool = False,
    ) -> tuple[list[dict[int, torch.Tensor]], list]:
        """Run every augmenting model on the anchor's own ids (one shared tokenizer); returns (per model
        {index: [batch, seq, d_aug]}, their caches): states to give ``forward`` as ``augment_states``."""
        states, new_caches = [], []
        for i, encoder in enumerate(self.encoders):
            s, c = encoder(input_ids, attention_mask, position_ids, caches[i] if caches else None, use_cache)
            states.append(s)
            new_caches.append(c)
        return states, new_caches

    def _check_external_states(self, states, batch: int, seqs: list[int]) -> None:
        if len(states) != len(self.encoders):
            raise ValueError(f"augment_states has {len(states)} entries for {len(self.encoders)} augmenting models")
        for link in self.links:
            s = states[link.augment].get(link.augment_index)
            want = (batch, seqs[link.augment], self.encoders[link.augment].info.hidden_size)
            if s is None or tuple(s.shape) != want:
                got = None if s is None else tuple(s.shape)
                raise ValueError(
                    f"augment_states[{link.augment}][{link.augment_index}] has shape {got}, expected {want}"
                )

    def _bridge_key_value(self, b: int, states, positions: list[torch.Tensor], cache: CompositionCache | None,
                          batch: int, seqs: list[int]) -> tuple:
        """Bridge ``b``'s keys/values [batch, heads, seen, head_dim] over the cached and new tokens, and the cache
        buffers behind them. ``states`` may be deferred (a callable ``(augment, index) -> [batch, new, d_aug]``):
        it is called here for this bridge's states. ``positions``: per augmenting model, its new tokens' rotary
        positions [batch, new]."""
        link = self.links[b]
        if callable(states):
            s = states(link.augment, link.augment_index)
            want = (batch, seqs[link.augment], self.encoders[link.augment].info.hidden_size)
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != want:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"deferred augment_states({link.augment}, {link.augment_index}) gave {got}, "
                                 f"expected {want}")
        else:
            s = states[link.augment][link.augment_index]
        k, v = self.bridges[b].keys_values(s, positions[link.augment])
        if cache is None:
            return k, v, (None, None)
        return cache.extend_bridge(b, k, v)  # appends in place of a full copy per step

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        augment_states: list[dict[int, torch.Tensor]] | Callable[[int, int], torch.Tensor] | None = None,
        augment_inputs: list[AugmentInputs] | None = None,
        cache: CompositionCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        labelled_logits_only: bool = False,
        row_bridges: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Composed forward pass.

        Args:
            input_ids: [batch, seq] token ids (the new tokens when ``cache`` is given).
            attention_mask: [batch, seq], 0 at padding; None means no padding.
            labels: [batch, seq] for the next-token loss (shifted inside; padding is ignored).
            augment_states: precomputed augmenting hidden states, per model ``{index: [batch, seq, d_aug]}``
                (e.g. streamed from Ray actors); None runs the augmenting models here. Or deferred states:
                a callable ``(augment, index) -> [batch, seq, d_aug]``, called at each bridge's site for the
                states it reads, so the anchor's layers below a bridge run before its states are needed (e.g.
                while they are still on their way, arriving layer by layer).
            augment_inputs: precomputed alignments (one AugmentInputs per augmenting model, e.g. from
                ``composition.alignment.collate``); None derives them from ``input_ids`` with ``self.aligner``
                (the identity when the models share a tokenizer). With ``augment_states`` they describe the
                tokens those states are for.
            cache: a CompositionCache from the previous call; the forward then runs on new tokens only.
            use_cache: return an updated CompositionCache in ``out.cache``.
            logits_to_keep: keep only the last N positions' logits (0 = all).
            labelled_logits_only: with ``labels`` and no cache, run the LM head only on the positions that
                predict a label (``composition.loss``): the same loss, much less compute when only
                completions are labelled; ``logits`` is then [1, labelled positions, vocab]. Used in training.
            row_bridges: [batch, bridges] bool, which bridges apply to each row (``self.bridges_of``: a stack's
                rows of different compositions, or the bare anchor); a bridge adds exactly zero to the others.
                None: every bridge applies to every row.
        Returns:
            CausalLMOutputWithPast with ``logits`` [batch, seq, vocab], ``loss`` when labels, ``cache``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        past = cache.seq_len if cache is not None else 0
        full_mask = attention_mask if cache is None else torch.cat([cache.attention_mask, attention_mask], dim=1)
        positions = positions_from_mask(full_mask)[:, past:]
        n = len(self.encoders)
        texts = None
        if augment_inputs is None:
            if cache is not None and self.aligner.needs_text and cache.texts is None:
                raise ValueError(
                    "this cache holds no text state (it was made from precomputed augment_inputs or by a model without "
                    "tokenizers): keep passing augment_inputs, or start the cache from a forward without them"
                )
            seen = [m.sum(-1) for m in cache.augment_masks] if cache is not None else None
            texts, augment_inputs = self.aligner.step(input_ids, attention_mask, cache.texts if cache else None, seen)
        elif len(augment_inputs) != n:
            raise ValueError(f"augment_inputs has {len(augment_inputs)} entries for {n} augmenting models")

        for m, inp in enumerate(augment_inputs):
            if inp.visible.shape != input_ids.shape:
                raise ValueError(
                    f"augment_inputs[{m}].visible has shape {tuple(inp.visible.shape)}, expected one count per anchor "
                    f"token {tuple(input_ids.shape)}"
                )
        sides = self._augment_sides(augment_inputs, cache, full_mask, positions)
        new_lengths = [side.new for side in sides]
        augment_caches = [None] * n
        if augment_states is None:
            augment_states, augment_caches = self._run_augments(augment_inputs, sides, cache, use_cache)
        elif not callable(augment_states):
            self._check_external_states(augment_states, batch, new_lengths)

        key_pos = [side.key_positions for side in sides]
        run = _Running(lambda b: self._bridge_key_value(b, augment_states, key_pos, cache, batch, new_lengths),
                       len(self.links), [side.mask for side in sides], positions, row_bridges,
                       None if row_bridges is None else row_bridges.any(0).tolist())
        out = self._run_anchor(run, input_ids, attention_mask, full_mask, positions, labels, cache, use_cache,
                               logits_to_keep, labelled_logits_only)
        new_cache = None
        if use_cache:
            new_cache = CompositionCache(full_mask, out.cache, augment_caches, run.keys, run.values, run.buffers,
                                         augment_masks=[side.full_mask for side in sides], texts=texts)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, cache=new_cache)

    def _augment_sides(self, augment_inputs: list[AugmentInputs], cache: CompositionCache | None,
                       full_mask: torch.Tensor, positions: torch.Tensor) -> list[_AugmentSide]:
        """Per augmenting model: its mask over all its tokens, which of them each anchor query sees, and the
        rotary positions of its new tokens' bridge keys (composition/alignment.py)."""
        past, seq = full_mask.shape[1] - positions.shape[1], positions.shape[1]
        sides, anchor_mask = [], None  # the identity alignment's mask: the anchor's own causal mask
        for m, inp in enumerate(augment_inputs):
            new = inp.input_ids.shape[1]
            # The identity alignment's shortcut: its tokens, mask and positions are the anchor's, so the anchor's
            # causal mask is the text rule's mask, and the anchor positions its key positions (at every real key;
            # tests/test_cross_tokenizer.py checks it bit for bit). A window counts columns in the causal mask
            # and real tokens in the rule, which differ where a row holds padding inside it: windows take the rule.
            if inp.identity and self.config.window is None:
                if anchor_mask is None:
                    anchor_mask = cross_model_mask(full_mask.bool(), past, seq)
                sides.append(_AugmentSide(full_mask, anchor_mask, positions, new, positions))
                continue
            full = inp.attention_mask if cache is None else torch.cat([cache.augment_masks[m], inp.attention_mask], 1)
            sides.append(_AugmentSide(full, visible_mask(full, inp.visible, self.config.window),
                                      key_positions(full, new, inp.visible, positions), new))
        return sides

    def _run_augments(self, augment_inputs: list[AugmentInputs], sides: list[_AugmentSide],
                      cache: CompositionCache | None, use_cache: bool) -> tuple[list, list]:
        """Run each augmenting model on its new tokens (with its cache); returns (per model {index: states},
        per model its cache). A model with no new token (no piece closed) is not run."""
        states, caches = [], []
        for m, (encoder, inp, side) in enumerate(zip(self.encoders, augment_inputs, sides)):
            previous = cache.augments[m] if cache is not None else None
            if side.new == 0:
                batch = inp.input_ids.shape[0]
                empty = inp.input_ids.new_zeros(batch, 0, encoder.info.hidden_size).float()
                states.append({i: empty for i in encoder.indices})
                caches.append(previous)
                continue
            full = side.full_mask
            positions = side.positions if side.positions is not None else (
                positions_from_mask(full)[:, full.shape[1] - side.new:])
            s, c = encoder(inp.input_ids, full, positions, previous, use_cache)
            states.append(s)
            caches.append(c)
        return states, caches

    def _run_anchor(self, run, input_ids, attention_mask, full_mask, positions, labels, cache, use_cache,
                    logits_to_keep, labelled_logits_only):
        """The anchor's forward with the bridges active (``run`` feeds them); resolves ``run`` in all cases."""
        past = cache.seq_len if cache is not None else 0
        seq = input_ids.shape[1]
        if labels is not None:
            # a label counts only where it and the token that predicts it are both real
            previous = full_mask[:, past - 1 : past + seq - 1] if past else torch.cat(
                [attention_mask[:, :1], attention_mask[:, :-1]], dim=1
            )
            labels = labels.masked_fill((attention_mask == 0) | (previous == 0), -100)
        self._running = run
        try:
            out = call_with_loss(
                self.anchor,
                labels,
                labelled_logits_only and past == 0,
                logits_to_keep,
                input_ids=input_ids,
                attention_mask=full_mask,
                position_ids=positions,
                cache=cache.anchor if cache is not None else None,
                use_cache=use_cache,
            )
        finally:
            self._running = None
        run.resolve_all()  # the bridges whose sites did not run them (no row took them): keeps the cache complete
        return out

    # ------------------------------------------------------------------ generation and checkpoints
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Decode with caches; see ``composition.generate.generate`` for the arguments."""
        from composition.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def save_pretrained(self, folder) -> None:
        """Write the bridges only (config JSON + bridges.safetensors + model-pair fingerprints)."""
        from composition.checkpoint import save_bridges

        if len(self.compositions) > 1:
            raise ValueError(f"this is a stack of {len(self.compositions)} compositions: save each composition "
                             f"from its own ComposedModel")

        save_bridges(self, folder)

    @classmethod
    def from_pretrained(cls, folder, anchor: nn.Module, augments: list[nn.Module], check_models: bool = True,
                        tokenizers: list | None = None):
        """Rebuild a composition from a bridges folder onto ``anchor`` and ``augments``.

        Refuses (ValueError naming the mismatch) when the models, or the ``tokenizers``
        (``[anchor_tokenizer, *augment_tokenizers]``, for models with different tokenizers), differ from
        the ones the bridges were trained with, unless ``check_models=False``.
        """
        from composition.checkpoint import load_bridges

        return load_bridges(cls, folder, anchor, augments, check_models=check_models, tokenizers=tokenizers)

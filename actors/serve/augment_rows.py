"""AugmentRows: the augmenting model's side of one decode engine's batch, keyed by row id.

A serving engine (``actors.serve.engine.DecodeEngine``) decodes many requests in one batch. For every
step it needs the augmenting model's hidden states of the batch's newest tokens, which needs the
augmenting model's KV cache of every row. That cache lives here, next to the augmenting model
(in a Serve replica or in-process), and mirrors the engine's rows by row id. It answers the requests of
``actors.serve.augment_protocol``:

    prefill(Prefill(rows, keep, copies))  -> States of the new rows' tokens        [new rows, longest, d_aug]
    extend(Extend(ids, tokens, lengths))  -> States of 0, 1 or more new tokens per row, left-padded
                                                                                   [rows, most new, d_aug]
                                             or Missing(ids) when a row is not here or holds another
                                             number of tokens than ``lengths`` says
    release(Release(ids))

The tokens are the augmenting model's own: the anchor's when the models share a tokenizer (one per row per
step), or those the engine's alignment closed (``composition.alignment``), so a row may get none in a step
or a whole word's. Closed tokens are final, so rows only ever grow: nothing is rolled back. ``prefill`` then
takes rows with no token yet (a prompt that closed no piece), which hold an all-padding mask.

``extend`` takes the engine's current row order: rows not listed are dropped (finished or cancelled
requests), listed rows are reordered to match. A row this object does not hold (the call reached another
replica, or this one restarted) is reported as missing instead of guessed, and the engine re-sends that
row's history with ``Prefill(..., return_states=False)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from actors.codec import dtype_name, state_key, tensor_to_numpy
from actors.serve.augment_protocol import Extend, Missing, Prefill, Release, States
from actors.serve.batch_cache import (
    add_empty_rows_hf_cache,
    check_batchable,
    close_gaps,
    copy_rows_hf_cache,
    crop_left_hf_cache,
    has_gaps,
    leading_padding,
    merge_hf_caches,
    select_rows_hf_cache,
)
from composition.augment import AugmentEncoder
from composition.model import positions_from_mask
from composition.padding import pad_left


class AugmentRows:
    """Per-request augmenting caches for one engine, batched (see the module docstring).

    Args:
        encoder: the augmenting model wrapped to return its selected hidden states.
        augment: which augmenting model of the composition this is (names the states ``aug{augment}_{index}``).
        pad_id: token id placed in padding slots (masked, so any valid id works).
        lock: serialises model calls when several AugmentRows share one encoder (its hooks hold
            per-call state); one lock per encoder.
    """

    def __init__(self, encoder: AugmentEncoder, augment: int = 0, pad_id: int = 0, lock: threading.Lock | None = None):
        self.encoder = encoder
        self.augment = augment
        self.pad_id = pad_id
        self.lock = lock or threading.Lock()
        self._busy = threading.Lock()  # one call at a time on these rows (a retried call may overlap the first)
        self.ids: list[str] = []
        self.attention_mask: torch.Tensor | None = None  # [rows, seen]
        self.cache = None  # the augmenting model's HF DynamicCache for all rows; None while seen == 0
        self.device = next(encoder.model.parameters()).device
        # refuses an unbatchable cache; a sliding window counts columns: gaps inside rows are harmless only while
        # the batch fits in it (``_extend``)
        self.window = check_batchable(encoder.model, f"augmenting model {augment}")
        self.counters = {"grouped_extends": 0, "gaps_closed": 0}
        self._gappy = False  # a step of mixed counts ran as one forward: rows may hold padding inside them

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        return len(self.ids)

    def clear(self) -> None:
        self.ids, self.attention_mask, self.cache, self._gappy = [], None, None, False

    def __del__(self):  # called by Serve's multiplexing when it evicts this engine's rows
        self.clear()

    def _keep(self, ids: list[str]) -> None:
        """Keep exactly rows ``ids`` (all held), in that order."""
        if ids == self.ids:
            return
        if not ids:
            self.clear()
            return
        where = {rid: i for i, rid in enumerate(self.ids)}
        index = torch.tensor([where[rid] for rid in ids], dtype=torch.long, device=self.device)
        self.attention_mask = self.attention_mask.index_select(0, index)
        if self.cache is not None:
            select_rows_hf_cache(self.cache, index)
        self.ids = list(ids)
        columns = leading_padding(self.attention_mask)
        if 0 < columns < self.attention_mask.shape[1]:
            crop_left_hf_cache(self.cache, columns, self.attention_mask.shape[1])
            self.attention_mask = self.attention_mask[:, columns:]

    def release(self, request: Release) -> None:
        """Forget rows ``request.ids`` (all rows when None)."""
        with self._busy:
            self._release(request.ids)

    def _release(self, ids: list[str] | None) -> None:
        if ids is None:
            self.clear()
        else:
            drop = set(ids)
            self._keep([rid for rid in self.ids if rid not in drop])

    def _encode(self, states: dict[int, torch.Tensor], final: bool = True) -> States:
        arrays = {state_key(self.augment, index): tensor_to_numpy(t) for index, t in states.items()}
        dtype = next(iter(states.values())).dtype if states else next(self.encoder.model.parameters()).dtype
        return States(arrays, dtype_name(dtype), final=final)

    # ------------------------------------------------------------------ model calls
    def prefill(self, request: Prefill, emit: Callable[[States], None] | None = None) -> States | None:
        """Run the augmenting model on new rows' tokens and append the rows to the batch (``Prefill`` says how).

        Returns the states of ``request.rows`` (not the copies), left-padded (``composition.padding.pad_left``), or None
        when ``return_states`` is False. ``emit``: as ``extend``'s.
        """
        with self._busy:
            self._read(request.indices)
            return self._prefill(request.rows, request.return_states, request.keep, request.copies,
                                 emit if request.return_states else None)

    def _read(self, indices) -> None:
        """Compute the hidden states at ``indices`` too from now on (a composition loaded at runtime reads them)."""
        if not set(indices) <= set(self.encoder.indices):
            with self.lock:
                self.encoder.add_indices(indices)

    @torch.no_grad()
    def _prefill(self, rows, return_states, keep, copies, emit=None) -> States | None:
        ids = [rid for rid, _ in rows]
        copied = [c for rid in ids for c in copies.get(rid, [])]
        if len(set(ids + copied)) != len(ids) + len(copied):
            raise ValueError(f"duplicate request ids in one prefill: {ids + copied}")
        if set(copies) - set(ids):
            raise ValueError(f"copies of rows that are not in this prefill: {sorted(set(copies) - set(ids))}")
        if keep is not None:
            wanted = set(keep)
            self._keep([rid for rid in self.ids if rid in wanted])
        self._release(ids)
        input_ids, mask = pad_left([list(t) for _, t in rows], self.pad_id)  # empty rows too
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        emitted = _Emitted(self, emit)
        if mask.shape[1] == 0:  # no row has a token yet (different tokenizers: nothing closed)
            states, cache = self._no_states(len(rows)), None
        else:
            with self.lock:
                states, cache = self.encoder(input_ids, mask, positions_from_mask(mask), None, True,
                                             on_state=emitted.on_state)
        if copied:  # the copies: the same cache rows again, under their own ids
            index = torch.tensor([i for i, rid in enumerate(ids) for _ in copies.get(rid, [])], device=self.device)
            self._release(copied)
            ids, mask = ids + copied, torch.cat([mask, mask.index_select(0, index)])
            if cache is not None:
                cache = copy_rows_hf_cache(cache, torch.cat([torch.arange(len(rows), device=self.device), index]))
        self._append(ids, mask, cache)
        return emitted.rest(states) if return_states else None

    def _append(self, ids: list[str], mask: torch.Tensor, cache) -> None:
        """Put new rows (mask [new_rows, seen], their HF cache or None when seen == 0) after the held ones."""
        if self.attention_mask is None:
            self.ids, self.attention_mask, self.cache = ids, mask, cache
            return
        self._close_gaps_before(max(self.attention_mask.shape[1], mask.shape[1]))  # a long row may widen the batch
        length = max(self.attention_mask.shape[1], mask.shape[1])
        pad = torch.nn.functional.pad
        old_rows = len(self.ids)
        self.attention_mask = torch.cat([pad(self.attention_mask, (length - self.attention_mask.shape[1], 0)),
                                         pad(mask, (length - mask.shape[1], 0))])
        if cache is None:  # the new rows hold no token
            if self.cache is not None:
                add_empty_rows_hf_cache(self.cache, after=len(ids))
        elif self.cache is None:  # the held rows hold no token
            add_empty_rows_hf_cache(cache, before=old_rows)
            self.cache = cache
        else:
            merge_hf_caches(self.cache, cache, length)
        self.ids = self.ids + ids

    def _no_states(self, rows: int) -> dict[int, torch.Tensor]:
        """States of no token: {index: [rows, 0, d_aug]}."""
        dtype = next(self.encoder.model.parameters()).dtype
        empty = torch.zeros(rows, 0, self.encoder.info.hidden_size, dtype=dtype, device=self.device)
        return {index: empty for index in self.encoder.indices}

    def extend(self, request: Extend, emit: Callable[[States], None] | None = None) -> States | Missing:
        """States of each row's new tokens (any number per row, none included), for rows ``request.ids`` in
        that order, each row's new tokens at the right end (as ``composition.padding.pad_left`` lays them
        out); or ``Missing`` (see the module docstring).

        With ``emit``, each index's states are passed to it as a part (``States.final`` False) as soon as the
        model computed them, from inside the forward; the answer then holds only the indices not emitted.
        """
        with self._busy:
            self._read(request.indices)
            return self._extend(request.ids, request.tokens, request.lengths, emit)

    @torch.no_grad()
    def _extend(self, ids, tokens, lengths, emit=None) -> States | Missing:
        missing = self._missing(ids, lengths)
        if missing:
            self._release(missing)
            return Missing(missing)
        self._keep(ids)
        counts = {len(t) for t in tokens}
        width = self.attention_mask.shape[1] + max(counts)
        self._close_gaps_before(width)
        if len(counts) > 1 and self.window is not None and width >= self.window:
            # the batch may outgrow a sliding window: no row may hold padding inside it (``_extend_grouped``);
            # while every column stays inside every window, gaps are as harmless as for full attention (faster)
            self.counters["grouped_extends"] += 1
            return self._encode(self._extend_grouped(ids, tokens))
        new, new_mask = pad_left([list(t) for t in tokens], self.pad_id)
        if new.shape[1] == 0:
            return self._encode(self._no_states(len(ids)))
        new, new_mask = new.to(self.device), new_mask.to(self.device)
        past = self.attention_mask.shape[1]
        full_mask = torch.cat([self.attention_mask, new_mask], dim=1)
        positions = positions_from_mask(full_mask)[:, past:]
        emitted = _Emitted(self, emit)
        with self.lock:
            states, self.cache = self.encoder(new, full_mask, positions, self.cache, True, on_state=emitted.on_state)
        self.attention_mask = full_mask
        self._gappy |= len(counts) > 1  # rows that got fewer tokens now hold padding inside them
        return emitted.rest(states)

    def _close_gaps_before(self, width: int) -> None:
        """Keep the rule that a batch as wide as a sliding window holds no padding inside a row: before the batch
        grows to ``width`` columns, close the gaps that steps of mixed counts left while it was narrower (then
        every layer still holds every column, which ``close_gaps`` needs)."""
        if self.window is None or width < self.window or self.cache is None or not self._gappy:
            return
        if has_gaps(self.attention_mask):
            self.attention_mask = close_gaps(self.cache, self.attention_mask)
            self.counters["gaps_closed"] += 1
        self._gappy = False

    def _extend_grouped(self, ids: list[str], tokens: list[list[int]]) -> dict[int, torch.Tensor]:
        """``_extend`` for rows given different numbers of tokens, on a model with sliding-window layers, once the
        batch may outgrow the window.

        One forward would lay the new tokens out as ``pad_left`` does, leaving padding columns *inside* the
        rows that got fewer tokens. Full attention ignores them (masked; positions come from the mask), and so
        does a window the whole batch fits in, but a window the batch outgrows spans columns: it would see fewer
        tokens of such a row than the row alone does, and its cache would drop them. So rows with the same count
        run together, each group on a copy of its cache rows, and the groups are merged back left-padded: every
        row stays contiguous, as alone (the gaps of earlier steps were closed first, ``close_gaps``).
        Returns the states {index: [rows, most new, d_aug]}, each row's new tokens at the right end.
        """
        most = max(len(t) for t in tokens)
        out = {index: None for index in self.encoder.indices}
        groups: dict[int, list[int]] = {}
        for r, t in enumerate(tokens):
            groups.setdefault(len(t), []).append(r)
        parts = []
        for count, rows in sorted(groups.items()):
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            mask = self.attention_mask.index_select(0, index)
            cache = copy_rows_hf_cache(self.cache, index) if self.cache is not None else None
            if count:
                new = torch.tensor([tokens[r] for r in rows], dtype=torch.long, device=self.device)
                full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
                positions = positions_from_mask(full_mask)[:, mask.shape[1]:]
                with self.lock:
                    states, cache = self.encoder(new, full_mask, positions, cache, True)
                mask = full_mask
                for i, t in states.items():
                    if out[i] is None:
                        out[i] = t.new_zeros(len(ids), most, t.shape[-1])
                    out[i][index, most - count:] = t
            parts.append(([ids[r] for r in rows], mask, cache))
        self.clear()
        for part in parts:
            self._append(*part)
        self._keep(ids)
        return out

    def _missing(self, ids: list[str], lengths: list[int]) -> list[str]:
        """Rows of ``ids`` not held, or holding another number of tokens than ``lengths`` says."""
        where = {rid: i for i, rid in enumerate(self.ids)}
        missing = [rid for rid in ids if rid not in where]
        if self.attention_mask is not None:
            held = self.attention_mask.sum(dim=1).tolist()
            missing += [rid for rid, n in zip(ids, lengths) if rid in where and held[where[rid]] != n]
        return missing


class _Emitted:
    """A streamed call's parts (``AugmentRows.extend``'s ``emit``): each index's states as the model computes
    them (``AugmentEncoder``'s ``on_state``); ``rest`` is the final answer, the indices not sent."""

    def __init__(self, rows: AugmentRows, emit: Callable[[States], None] | None):
        self.rows, self.emit, self.sent = rows, emit, set()
        self.on_state = self._send if emit is not None else None

    def _send(self, index: int, states: torch.Tensor) -> None:
        self.emit(self.rows._encode({index: states}, final=False))
        self.sent.add(index)

    def rest(self, states: dict[int, torch.Tensor]) -> States:
        return self.rows._encode({i: t for i, t in states.items() if i not in self.sent})

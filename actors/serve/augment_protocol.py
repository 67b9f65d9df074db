"""The messages between a decode engine and the augmenting side of its batch (``AugmentRows``).

The engine (``actors.serve.engine``) keeps one batch of rows; each augmenting model keeps the KV cache of
the same rows, keyed by row id, next to the model (``actors.serve.augment_rows``, in a Serve replica or
in-process). Three requests cross between them, each answered by one result:

    Prefill(rows, keep, copies)     -> States of the new rows' tokens        [new rows, longest, d_aug]
    Extend(ids, tokens, lengths)    -> States of each row's new tokens       [rows, most new, d_aug]
                                       or Missing(ids): rows the side does not hold (as ``lengths`` says);
                                       streamed: first a part per index (``States.final`` False) as the
                                       model computes it, then the final States with the rest
    Release(ids)                    -> None

Each augmenting model reads its own tokens: the anchor's ids when the models share a tokenizer (then every
row gets exactly one new token per step), or the tokens the engine's alignment closed (0, 1 or a whole
word per row; ``composition.alignment``). States travel as numpy arrays (``actors.codec``), so Ray's object
store moves them without pickling tensors. The dataclasses pickle as they are, through Serve handles too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class Prefill:
    """New rows and their tokens (in this augmenting model's vocabulary; a row may have none yet).

    Attributes:
        rows: (row id, tokens) per new row; a row id already held is replaced (a re-sent history).
        keep: the engine's other live rows: held rows not in it are dropped first. None keeps all.
        copies: row id in ``rows`` -> ids of further rows with the same tokens, held as copies of its cache
            rows (computed once: a request's n choices); no states are returned for them.
        return_states: False re-sends history only (after a ``Missing``), with no states back.
        indices: the hidden-state indices the engine's bridges read now; the side starts computing any it does
            not yet (a composition loaded at runtime may read other layers). Empty: what it computes.
    """

    method: ClassVar[str] = "prefill"
    rows: list[tuple[str, list[int]]]
    keep: list[str] | None = None
    copies: dict[str, list[str]] = field(default_factory=dict)
    return_states: bool = True
    indices: tuple[int, ...] = ()

    @property
    def tokens_run(self) -> int:
        """Tokens the call runs through the model (a call's time limit grows with them)."""
        return sum(len(t) for _, t in self.rows)


@dataclass(frozen=True)
class Extend:
    """Each row's new tokens, for rows ``ids`` in the engine's order (rows not listed are dropped).

    Attributes:
        ids: the engine's live rows, in batch order.
        tokens: per row, the tokens appended (any number, none included).
        lengths: per row, how many tokens it should hold before: a row holding another count (a step applied
            twice after a lost reply, say) is reported missing, so a retried call never corrupts a row.
        indices: as ``Prefill.indices``.
    """

    method: ClassVar[str] = "extend"
    ids: list[str]
    tokens: list[list[int]]
    lengths: list[int]
    indices: tuple[int, ...] = ()

    def __post_init__(self):
        if not len(self.ids) == len(self.tokens) == len(self.lengths):
            raise ValueError(f"{len(self.ids)} row ids for {len(self.tokens)} token lists and "
                             f"{len(self.lengths)} lengths: give one of each per row")

    @property
    def tokens_run(self) -> int:
        return sum(len(t) for t in self.tokens)


@dataclass(frozen=True)
class Release:
    """Forget rows ``ids`` (all rows when None)."""

    method: ClassVar[str] = "release"
    ids: list[str] | None = None
    tokens_run: ClassVar[int] = 0


@dataclass
class States:
    """Hidden states of new tokens: ``arrays`` {"aug{i}_{index}": [rows, tokens, d_aug]} (``actors.codec``)
    in ``dtype``; each row's tokens at the right end, left-padded. ``replica_s``: seconds the call took inside
    the augmenting replica (0 in-process), which lets the engine tell transport from compute. ``final``: False
    for a part of a streamed answer (some indices, sent as soon as the model computed them; more follow)."""

    arrays: dict[str, np.ndarray]
    dtype: str
    replica_s: float = 0.0
    final: bool = True


@dataclass(frozen=True)
class Missing:
    """The rows of an ``Extend`` this side does not hold (another replica answered, or this one restarted)."""

    ids: list[str]


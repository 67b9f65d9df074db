"""How a decode engine reaches the augmenting models' ``AugmentRows``: in-process or through Ray Serve.

The engine (``actors.serve.engine.DecodeEngine``) calls three coroutines and gets tensors back; each
augmenting model reads its own tokens (the anchor's when they share a tokenizer), which the engine's
alignment computes and sends per model:

    states = await client.prefill([[(id, tokens_m), ...] per model], keep, copies)
                                  # per model {index: [rows, longest, d]}; copies: id -> ids of further
                                  # rows with the same tokens (their cache rows copied, not recomputed)
    states = await client.extend(ids, [[new tokens of each row] per model], history)
                                  # per model {index: [rows, most new, d]}, None where no row has a new token
    await client.release(ids)     # forget rows (None: all)

``extend`` hides cache misses: when an augmenting side answers ``Missing`` (a Serve call that reached
another replica, a replica that restarted), the client re-sends those rows' histories (``history(model,
id)``: the tokens that model's cache of the row holds) and extends again. So an engine's requests survive the
loss of an augmenting replica at the cost of one re-prefill. The messages are ``actors.serve.augment_protocol``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import torch

from actors.codec import arrays_to_states
from actors.serve.augment_protocol import Extend, Missing, Prefill, Release, States
from actors.serve.augment_rows import AugmentRows


class AugmentUnavailable(RuntimeError):
    """The augmenting model could not be reached; the message says why and for how long it was tried."""


class AugmentClient:
    """Base: subclasses implement ``_call(augment, request)``, returning ``AugmentRows``' answer to it."""

    def __init__(self, num_augments: int, device: str | torch.device = "cpu"):
        self.num_augments = num_augments
        self.device = device
        # per augmenting model, the hidden-state indices the engine's bridges read (the engine sets them whenever
        # its compositions change; sent with each call, so an augmenting side computes what a new one reads)
        self.indices: list[tuple[int, ...]] = [()] * num_augments
        self.rebuilds = 0  # rows re-sent after a miss (for stats and tests)
        self.replica_s = 0.0  # time the augmenting side reported spending in extend calls

    async def _call(self, augment: int, request: Prefill | Extend | Release):
        raise NotImplementedError

    def _decode(self, result: States) -> dict[int, torch.Tensor]:
        (states,) = arrays_to_states(result.arrays, result.dtype, self.device)
        return states

    async def prefill(
        self, rows: list[list[tuple[str, list[int]]]], keep: list[str] | None = None,
        copies: dict[str, list[str]] | None = None,
    ) -> list[dict[int, torch.Tensor]]:
        """States of new rows' tokens, ``rows[m]`` for augmenting model m (each in its own tokens; a row may have
        none yet); ``keep``: the engine's other live rows (the rest are dropped); ``copies``: row id -> ids of
        further rows with its tokens, held as copies of its cache rows (no states returned)."""
        results = await asyncio.gather(*(self._call(m, Prefill(rows[m], keep, copies or {}, indices=self.indices[m]))
                                         for m in range(self.num_augments)))
        return [self._decode(r) for r in results]

    async def _extend_one(self, augment: int, ids: list[str], tokens: list[list[int]],
                          history: Callable[[int, str], list[int]]) -> dict[int, torch.Tensor]:
        """``Extend`` on model ``augment``; rows it reports missing are re-prefilled from their ``history``
        (a replica that restarted, or a call that reached another one), then the extend is retried once."""
        request = Extend(ids, tokens, [len(history(augment, rid)) for rid in ids], self.indices[augment])
        result = await self._call(augment, request)
        if isinstance(result, Missing):
            self.rebuilds += len(result.ids)
            await self._call(augment, Prefill([(rid, history(augment, rid)) for rid in result.ids],
                                              return_states=False, indices=self.indices[augment]))
            result = await self._call(augment, request)
            if isinstance(result, Missing):
                raise AugmentUnavailable(
                    f"augmenting model {augment} lost rows {result.ids} right after they were re-sent: "
                    f"its calls are not reaching one replica (check the augmenting deployment's routing)"
                )
        self.replica_s += result.replica_s
        return self._decode(result)

    async def extend(
        self, ids: list[str], tokens: list[list[list[int]]], history: Callable[[int, str], list[int]]
    ) -> list[dict[int, torch.Tensor] | None]:
        """Per augmenting model m, the states of ``tokens[m][row]`` (each row's new tokens), or None when no
        row has a new token for m: that model is not called at all (across tokenizers, most decode steps
        close no word)."""
        if self.num_augments == 1:  # the common case: no gather machinery per step
            return [await self._extend_one(0, ids, tokens[0], history) if any(tokens[0]) else None]
        busy = [m for m in range(self.num_augments) if any(tokens[m])]
        results = await asyncio.gather(*(self._extend_one(m, ids, tokens[m], history) for m in busy))
        out: list[dict[int, torch.Tensor] | None] = [None] * self.num_augments
        for m, states in zip(busy, results):
            out[m] = states
        return out

    async def release(self, ids: list[str] | None = None) -> None:
        await asyncio.gather(*(self._call(m, Release(ids)) for m in range(self.num_augments)))


class LocalAugments(AugmentClient):
    """AugmentRows in this process (no Ray): for tests, notebooks and the benchmark's reference.

    Calls run in a worker thread, like a Serve replica's, and states still go through the codec.
    """

    def __init__(self, rows: list[AugmentRows], device: str | torch.device = "cpu"):
        super().__init__(len(rows), device)
        self.rows = rows

    async def _call(self, augment: int, request: Prefill | Extend | Release):
        return await asyncio.to_thread(getattr(self.rows[augment], request.method), request)

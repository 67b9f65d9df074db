"""How a decode engine reaches the augmenting models' ``AugmentRows``: in-process or through Ray Serve.

The engine (``actors.serve.engine.DecodeEngine``) calls three coroutines and gets tensors back:

    states = await client.prefill([(id, tokens), ...], keep, copies)
                                  # per augmenting model {index: [rows, longest, d]}; copies: id -> ids of
                                  # further rows with the same tokens (their cache rows copied, not recomputed)
    states = await client.step(ids, tokens, history)          # per augmenting model {index: [rows, 1, d]}
    await client.release(ids)                                 # forget rows (None: all)

With different tokenizers each augmenting model reads its own tokens, which the engine computes
(``composition.alignment``) and sends per model:

    states = await client.prefill_each([[(id, tokens_m), ...] per model])   # {index: [rows, most, d]}
    states = await client.extend(ids, [[new tokens of each row] per model], history)
                                  # per model {index: [rows, most new, d]}, None where no row has a new token

``step`` hides cache misses: when an augmenting side reports rows it does not hold (a Serve call
that reached another replica, a replica that restarted), the client re-sends those rows'
histories (``history(id)``: every token of the row before the newest; for ``extend``
``history(model, id)``: the tokens that model's cache of the row holds) and steps again. So an
engine's requests survive the loss of an augmenting replica at the cost of one re-prefill.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import torch

from actors.serve.augment_rows import AugmentRows
from actors.codec import arrays_to_states


class AugmentUnavailable(RuntimeError):
    """The augmenting model could not be reached; the message says why and for how long it was tried."""


class AugmentClient:
    """Base: subclasses implement ``_call(augment, method, *args)`` returning AugmentRows' plain results."""

    def __init__(self, num_augments: int, device: str | torch.device = "cpu"):
        self.num_augments = num_augments
        self.device = device
        self.rebuilds = 0  # rows re-sent after a miss (for stats and tests)
        self.replica_s = 0.0  # time the augmenting side reported spending in step calls

    async def _call(self, augment: int, method: str, *args):
        raise NotImplementedError

    def _decode(self, augment: int, result: dict) -> dict[int, torch.Tensor]:
        (states,) = arrays_to_states(result["states"], result["dtype"], self.device)
        return states

    async def prefill(
        self, rows: list[tuple[str, list[int]]], keep: list[str] | None = None,
        copies: dict[str, list[str]] | None = None,
    ) -> list[dict[int, torch.Tensor]]:
        """States of new rows' tokens; ``keep``: the engine's other live rows (the rest are dropped); ``copies``:
        row id -> ids of further rows with its tokens, held as copies of its cache rows (no states returned)."""
        results = await asyncio.gather(*(self._call(i, "prefill", rows, True, keep, copies)
                                         for i in range(self.num_augments)))
        return [self._decode(i, r) for i, r in enumerate(results)]

    async def _call_rebuilding(self, augment: int, method: str, ids: list[str], payload,
                               history: Callable[[str], list[int]]):
        """``method`` (step or extend) on ``ids``; rows the replica reports missing are re-prefilled from
        their ``history`` (a replica that restarted, or a call that reached another one), then retried once."""
        lengths = [len(history(rid)) for rid in ids]
        result = await self._call(augment, method, ids, payload, lengths)
        if "missing" in result:
            missing = result["missing"]
            self.rebuilds += len(missing)
            await self._call(augment, "prefill", [(rid, history(rid)) for rid in missing], False)
            result = await self._call(augment, method, ids, payload, lengths)
            if "missing" in result:
                raise AugmentUnavailable(
                    f"augmenting model {augment} lost rows {result['missing']} right after they were re-sent: "
                    f"its calls are not reaching one replica (check the augmenting deployment's routing)"
                )
        self.replica_s += result.get("replica_s", 0.0)
        return self._decode(augment, result)

    async def _step_one(self, augment: int, ids: list[str], tokens: list[int], history: Callable[[str], list[int]]):
        return await self._call_rebuilding(augment, "step", ids, tokens, history)

    async def step(
        self, ids: list[str], tokens: list[int], history: Callable[[str], list[int]]
    ) -> list[dict[int, torch.Tensor]]:
        if self.num_augments == 1:  # the common case: no gather machinery per step
            return [await self._step_one(0, ids, tokens, history)]
        return list(await asyncio.gather(*(self._step_one(i, ids, tokens, history) for i in range(self.num_augments))))

    async def prefill_each(
        self, rows: list[list[tuple[str, list[int]]]], keep: list[str] | None = None,
        copies: dict[str, list[str]] | None = None,
    ) -> list[dict[int, torch.Tensor]]:
        """States of new rows' tokens, ``rows[m]`` for augmenting model m (each in its own tokens; a row
        may have none yet); ``keep``: the engine's other live rows; ``copies`` as for ``prefill``."""
        results = await asyncio.gather(*(self._call(i, "prefill", rows[i], True, keep, copies)
                                         for i in range(self.num_augments)))
        return [self._decode(i, r) for i, r in enumerate(results)]

    async def _extend_one(self, augment: int, ids: list[str], tokens: list[list[int]],
                          history: Callable[[int, str], list[int]]):
        return await self._call_rebuilding(augment, "extend", ids, tokens, lambda rid: history(augment, rid))

    async def extend(
        self, ids: list[str], tokens: list[list[list[int]]], history: Callable[[int, str], list[int]]
    ) -> list[dict[int, torch.Tensor] | None]:
        """Per augmenting model m, the states of ``tokens[m][row]`` (each row's new tokens), or None when no
        row has a new token for m: that model is not called at all (most decode steps close no word)."""
        busy = [m for m in range(self.num_augments) if any(tokens[m])]
        results = await asyncio.gather(*(self._extend_one(m, ids, tokens[m], history) for m in busy))
        out: list[dict[int, torch.Tensor] | None] = [None] * self.num_augments
        for m, states in zip(busy, results):
            out[m] = states
        return out

    async def release(self, ids: list[str] | None = None) -> None:
        await asyncio.gather(*(self._call(i, "release", ids) for i in range(self.num_augments)))


class LocalAugments(AugmentClient):
    """AugmentRows in this process (no Ray): for tests, notebooks and the benchmark's reference.

    Calls run in a worker thread, like a Serve replica's, and states still go through the codec.
    """

    def __init__(self, rows: list[AugmentRows], device: str | torch.device = "cpu"):
        super().__init__(len(rows), device)
        self.rows = rows

    async def _call(self, augment: int, method: str, *args):
        return await asyncio.to_thread(getattr(self.rows[augment], method), *args)

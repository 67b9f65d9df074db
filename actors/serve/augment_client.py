"""How a decode engine reaches the augmenting models' ``AugmentRows``: in-process or through Ray Serve.

The engine (``actors.serve.engine.DecodeEngine``) calls three coroutines and gets tensors back; each
augmenting model reads its own tokens (the anchor's when they share a tokenizer), which the engine's
alignment computes and sends per model:

    states = await client.prefill([[(id, tokens_m), ...] per model], keep, copies)
                                  # per model {index: [rows, longest, d]}; copies: id -> ids of further
                                  # rows with the same tokens (their cache rows copied, not recomputed)
    states = await client.extend(ids, [[new tokens of each row] per model], history, part)
                                  # per model {index: [rows, most new, d]}, None where no row has a new token;
                                  # part(model, {index: states}): each index as soon as it arrives (streamed)
    await client.release(ids)     # forget rows (None: all)

``extend`` hides cache misses: when an augmenting side answers ``Missing`` (a Serve call that reached
another replica, a replica that restarted), the client re-sends those rows' histories (``history(model,
id)``: the tokens that model's cache of the row holds) and extends again. So an engine's requests survive the
loss of an augmenting replica at the cost of one re-prefill. The messages are ``actors.serve.augment_protocol``'s.

An extend with ``part`` is streamed: the augmenting side sends each hidden-state index as soon as its layer
ran, and ``ArrivingStates`` hands them to the anchor's forward bridge by bridge (``DecodeEngine``), so the
anchor runs its layers between bridges while the augmenting model runs its upper layers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import torch

from actors.codec import arrays_to_states
from actors.serve.augment_protocol import Extend, Missing, Prefill, Release, States
from actors.serve.augment_rows import AugmentRows


class AugmentUnavailable(RuntimeError):
    """The augmenting model could not be reached; the message says why and for how long it was tried."""


class ArrivingStates:
    """One model call's augmenting states as they arrive, for an anchor forward in another thread to take bridge
    by bridge (``ComposedModel.forward``'s deferred states): ``put`` from the event loop or any thread, ``get``
    blocks until that (model, index) is there, or raises what ``fail`` was given, or (once ``finish`` said that the
    call answered) that the answer lacks it: never blocks for good."""

    def __init__(self):
        self._got: dict[tuple[int, int], torch.Tensor] = {}
        self._error: BaseException | None = None
        self._finished = False
        self._ready = threading.Condition()
        self.waited = 0.0  # seconds ``get`` blocked, in all

    def put(self, augment: int, states: dict[int, torch.Tensor]) -> None:
        with self._ready:
            self._got.update({(augment, index): t for index, t in states.items()})
            self._ready.notify_all()

    def finish(self) -> None:
        """The call answered: what is not here now never comes."""
        with self._ready:
            self._finished = True
            self._ready.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._ready:
            self._error = error
            self._ready.notify_all()

    def get(self, augment: int, index: int) -> torch.Tensor:
        start = time.perf_counter()
        try:
            with self._ready:
                while (augment, index) not in self._got:
                    if self._error is not None:
                        raise self._error
                    if self._finished:
                        raise ValueError(f"augmenting model {augment}'s answer holds no states at index {index}")
                    self._ready.wait()
                return self._got[(augment, index)]
        finally:
            self.waited += time.perf_counter() - start


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
        self.parts = 0  # parts of streamed answers taken before their final answer (for stats and tests)

    async def _call(self, augment: int, request: Prefill | Extend | Release,
                    part: Callable[[States], None] | None = None):
        """``AugmentRows``' answer to ``request``; for a ``Prefill`` or ``Extend`` with ``part``, the answer may be
        streamed: ``part`` gets each part (``States.final`` False) as it arrives, and the answer holds the rest."""
        raise NotImplementedError

    def _decode(self, result: States) -> dict[int, torch.Tensor]:
        states = arrays_to_states(result.arrays, result.dtype, self.device)
        return states[0] if states else {}  # a streamed answer's rest may hold no index

    async def prefill(
        self, rows: list[list[tuple[str, list[int]]]], keep: list[str] | None = None,
        copies: dict[str, list[str]] | None = None,
        part: Callable[[int, dict[int, torch.Tensor]], None] | None = None,
    ) -> list[dict[int, torch.Tensor]]:
        """States of new rows' tokens, ``rows[m]`` for augmenting model m (each in its own tokens; a row may have
        none yet); ``keep``: the engine's other live rows (the rest are dropped); ``copies``: row id -> ids of
        further rows with its tokens, held as copies of its cache rows (no states returned). With ``part``,
        streamed as ``extend``."""

        async def one(m: int) -> dict[int, torch.Tensor]:
            got: dict[int, torch.Tensor] = {}
            take = self._taker(m, got, part)
            take(await self._call(m, Prefill(rows[m], keep, copies or {}, indices=self.indices[m]),
                                  take if part is not None else None))  # parts only where someone takes them
            return got

        return list(await asyncio.gather(*(one(m) for m in range(self.num_augments))))

    def _taker(self, augment: int, got: dict, part) -> Callable[[States], None]:
        """What takes each (part of an) answer of model ``augment``: its states into ``got``, and to ``part``."""

        def take(result: States) -> None:
            self.parts += not result.final
            states = self._decode(result)
            got.update(states)
            if part is not None and states:
                part(augment, states)

        return take

    async def _extend_one(self, augment: int, ids: list[str], tokens: list[list[int]],
                          history: Callable[[int, str], list[int]],
                          part: Callable[[int, dict[int, torch.Tensor]], None] | None = None,
                          ) -> dict[int, torch.Tensor]:
        """``Extend`` on model ``augment``; rows it reports missing are re-prefilled from their ``history``
        (a replica that restarted, or a call that reached another one), then the extend is retried once.
        With ``part``, streamed: ``part(augment, states)`` gets each index's states as they arrive."""
        got: dict[int, torch.Tensor] = {}
        take = self._taker(augment, got, part)
        streamed = take if part is not None else None  # parts only where someone takes them
        request = Extend(ids, tokens, [len(history(augment, rid)) for rid in ids], self.indices[augment])
        result = await self._call(augment, request, streamed)
        if isinstance(result, Missing):
            self.rebuilds += len(result.ids)
            await self._call(augment, Prefill([(rid, history(augment, rid)) for rid in result.ids],
                                              return_states=False, indices=self.indices[augment]))
            result = await self._call(augment, request, streamed)
            if isinstance(result, Missing):
                raise AugmentUnavailable(
                    f"augmenting model {augment} lost rows {result.ids} right after they were re-sent: "
                    f"its calls are not reaching one replica (check the augmenting deployment's routing)"
                )
        self.replica_s += result.replica_s
        take(result)
        return got

    async def extend(
        self, ids: list[str], tokens: list[list[list[int]]], history: Callable[[int, str], list[int]],
        part: Callable[[int, dict[int, torch.Tensor]], None] | None = None,
    ) -> list[dict[int, torch.Tensor] | None]:
        """Per augmenting model m, the states of ``tokens[m][row]`` (each row's new tokens), or None when no
        row has a new token for m: that model is not called at all (across tokenizers, most decode steps
        close no word). With ``part``, the calls are streamed: ``part(m, {index: states})`` as they arrive."""
        if self.num_augments == 1:  # the common case: no gather machinery per step
            return [await self._extend_one(0, ids, tokens[0], history, part) if any(tokens[0]) else None]
        busy = [m for m in range(self.num_augments) if any(tokens[m])]
        results = await asyncio.gather(*(self._extend_one(m, ids, tokens[m], history, part) for m in busy))
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

    async def _call(self, augment: int, request: Prefill | Extend | Release,
                    part: Callable[[States], None] | None = None):
        if part is not None and not isinstance(request, Release):  # parts straight from the model's thread
            return await asyncio.to_thread(getattr(self.rows[augment], request.method), request, part)
        return await asyncio.to_thread(getattr(self.rows[augment], request.method), request)

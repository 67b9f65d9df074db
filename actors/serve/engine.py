"""DecodeEngine: continuous batching of decode steps for a composed model whose augmenting models run elsewhere.

One engine runs in each anchor replica. Requests join and leave its batch between steps:

    loop:
        admit waiting requests (up to max_batch_size rows), prefill them together:
            alignment: each augmenting model's tokens of the prompts (``model.aligner``)
            augmenting side: prefill(rows)            -> their hidden states  [new, longest, d_aug]
            anchor + bridges: forward with those states -> first token of each, cache rows
            merge the new cache rows into the batch cache (left padding, actors.serve.batch_cache)
        one decode step for every running row:
            alignment: the augmenting tokens each row's newest anchor token closed
            augmenting side: extend(ids, those tokens) -> states               [rows, most new, d_aug]
            anchor + bridges: forward one token per row, with the batch cache -> next tokens
        drop finished or cancelled rows from the cache

There is one path for any tokenizers. The engine aligns on the anchor side, which holds every tokenizer:
each step it feeds the rows' new anchor tokens to ``model.aligner`` (the per-row text state, across
tokenizers, lives in the batch cache's ``texts``) and sends each augmenting model the tokens that became
*closed*: with one shared tokenizer the alignment is the identity and that is the row's newest token;
across tokenizers it is 0, 1 or a whole word per row (``AugmentClient.extend``; a model no row fed is not
called). The anchor + bridges run with those ``augment_inputs`` and the states that come back. Each row
keeps the augmenting tokens it fed so far (``_Row.augment_tokens``): the history a lost augmenting cache is
re-prefilled from. Closed tokens are final, so no augmenting cache is ever rolled back.

So each new token costs one step of each model and no prefix is recomputed; with more requests
in flight, each step carries more rows, and tokens/s grows with load. With ``model_thread`` the
anchor's model calls run in a worker thread, so the replica's event loop keeps streaming tokens and
taking requests, and each augmenting call overlaps the anchor's layers below its first bridge (the
forward starts at once and waits for the states only at that bridge).

``generate(request)`` is an async generator of ``{"index", "token_ids": [...], "finish_reason", "logprobs",
"prompt_logprobs"}`` chunks, one choice's tokens each (``finish_reason`` is None until that choice's last
chunk, then "stop" for an end-of-sequence token, or "length"); closing it early (a client that went away)
frees the request's rows at the next step. A request with ``n`` > 1 runs as n rows admitted together; their
prompt is computed once (rows with equal prompts in one prefill share it: the others copy the first one's
cache rows, here and on the augmenting side), and ``index`` says which of them a chunk is.
What a row's next token is drawn from: the model's logits, masked to the tokens its grammar allows next (a
request with ``grammar``: ``actors.serve.grammar``), plus ``logit_bias``, minus the presence and frequency
penalties of the tokens it generated, then greedy or sampled; its logprobs are those of the model's own
distribution (log-softmax of the raw logits). A row whose grammar is complete finishes with "stop".
Works without Ray: give it ``actors.serve.augment_client.LocalAugments``.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from actors.serve.augment_client import ArrivingStates, AugmentClient
from actors.serve.batch_cache import check_batchable, merge_composition_caches, select_rows
from actors.serve.grammar import GrammarError, Grammars, consume
from actors.serve.reasons import public_reason
from composition.alignment import AugmentInputs
from composition.cache import CompositionCache
from composition.generate import sample_next
from composition.model import DEFAULT
from composition.padding import pad_left

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """One request, already tokenised and validated.

    Attributes:
        prompt_ids: the prompt's token ids (at least one).
        max_tokens: new tokens to generate at most (>= 1).
        temperature: 0 decodes greedily; > 0 samples.
        top_p: nucleus sampling mass in (0, 1].
        seed: seeds this request's sampler, so a seeded request gives the same text in any batch.
        eos_ids: tokens that end the request (the token is emitted, then finish_reason "stop").
        request_id: unique among the engine's live requests; made up when empty.
        n: independent completions of the prompt (rows admitted together, in one prefill); row i > 0 of a
            seeded request is seeded with ``seed + i``.
        logprobs: None for no logprobs; k >= 0: each generated token's logprob and the k most likely tokens'.
        prompt_logprobs: also the prompt tokens' logprobs (the first one has none: None), with the same k.
        logit_bias: token id -> value added to its logit before choosing (greedy or sampled).
        presence_penalty: subtracted from the logit of every token generated at least once so far.
        frequency_penalty: times the number of times a token was generated so far, subtracted from its logit.
        grammar: an llguidance grammar (``actors.serve.grammar``) the generated text must match: each row's
            logits are masked to the tokens it allows; the row finishes ("stop") once the text is complete.
        grammar_generated: tokens already generated under ``grammar`` (a resume: they end ``prompt_ids``); the
            row's matcher consumes them first.
        composition: which of the model's compositions decodes the request (``ComposedModel.compositions``: a
            stack's names; a model built directly has one, ``DEFAULT``). The row feeds only that composition's
            augmenting models, and only its bridges apply to the row; the others add exactly zero
            (``Bridge.forward``: no key). None: the bare anchor, no bridge at all (vLLM's base model beside its
            adapters). Rows of every composition share the batch and its steps.
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    request_id: str = ""
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: str | None = None
    grammar_generated: list[int] = field(default_factory=list)
    composition: str | None = DEFAULT

    def __post_init__(self):
        """The request's own invariants (the OpenAI schema states the same bounds for HTTP bodies); what only the
        engine knows (its batch size, context and vocabulary) is checked when the engine takes the request."""
        if not self.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def processes_logits(self) -> bool:
        """Whether the next token is chosen from anything but the model's own logits."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0


class RequestFailed(RuntimeError):
    """A request could not be completed; the message says why."""


@dataclass
class _Row:
    request: GenerationRequest
    tokens: list[int]  # prompt + generated so far
    queue: asyncio.Queue  # shared by the rows of one request
    generator: torch.Generator | None
    id: str = ""  # the row's id in the batch and on the augmenting side: the request id, "#i" for n > 1
    index: int = 0  # which of the request's n choices
    generated: int = 0
    # per augmenting model, the tokens its cache of this row holds (closed ones only)
    augment_tokens: list[list[int]] = field(default_factory=list)
    matcher: object | None = None  # the row's grammar state (an llguidance matcher), with a grammar
    done: bool = False
    cancelled: bool = False


_ids = itertools.count()


class DecodeEngine:
    """Continuous-batching decoder (see the module docstring).

    Args:
        model: a ComposedModel whose bridges take external ``augment_states``.
        augments: reaches the augmenting models' per-request caches.
        max_batch_size: most rows decoded together; further requests wait for a free row.
        max_context: longest sequence (prompt + new tokens) a request may reach.
        pad_id: token id in padding slots.
        grammars: the anchor tokenizer's grammar engine; None refuses requests with a grammar.
    """

    def __init__(
        self,
        model,
        augments: AugmentClient,
        max_batch_size: int = 16,
        max_context: int | None = None,
        pad_id: int = 0,
        model_thread: bool = True,
        grammars: Grammars | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        check_batchable(model.anchor, "the anchor")  # at start-up, never per request
        self.model = model
        self.augments = augments
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.pad_id = pad_id
        self.model_thread = model_thread
        self.grammars = grammars
        self.device = next(model.anchor.parameters()).device
        self.aligner = model.aligner  # each augmenting model's tokens of the anchor's (the identity when shared)
        # per bridge the augmenting model it reads; per composition the ones its rows feed (None, the bare anchor:
        # none); both change when compositions are loaded and unloaded
        self._composition_changed()
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._by_id: dict[str, _Row] = {}
        self._cache: CompositionCache | None = None
        self._wake = asyncio.Event()
        self._release_pending = False  # the batch emptied: tell the augmenting side to free its rows
        self._task: asyncio.Task | None = None
        self._between_steps = asyncio.Lock()  # held by the loop for each prefill and step
        self._unloading: set[str] = set()  # compositions that take no new request; removed once no row has them
        self.counters = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "steps": 0, "tokens": 0,
                         "prefills": 0, "prefill_rows": 0, "shared_prefill_rows": 0, "max_rows_in_step": 0}
        # seconds spent in decode steps: the augmenting calls from start to answer, the part of them the anchor
        # waited for (not hidden behind its layers below the first bridge), the rest of the model call, all
        self.timers = {"augment_call_s": 0.0, "augment_s": 0.0, "anchor_s": 0.0, "step_s": 0.0}

    # ------------------------------------------------------------------ public
    def stats(self) -> dict:
        """Live rows, waiting requests and counters (for health checks and tests)."""
        return {
            "running": len(self._running),
            "waiting": len(self._waiting),
            "rebuilt_rows": self.augments.rebuilds,
            "augment_replica_s": round(self.augments.replica_s, 4),
            "streamed_parts": self.augments.parts,
            **self.counters,
            **{k: round(v, 4) for k, v in self.timers.items()},
        }

    async def generate(self, request: GenerationRequest):
        """Async generator of ``{"index", "token_ids", "finish_reason", "logprobs", "prompt_logprobs"}`` chunks.

        ``logprobs`` (when the request asks for them): one ``{"id", "logprob", "top": [[id, logprob], ...]}`` per
        token of ``token_ids``; ``prompt_logprobs``, in each choice's first chunk: the same per prompt token, the
        first one None.
        """
        self._check(request)
        compiled = None
        if request.grammar is not None:  # a new grammar compiles on its own thread: the batch decodes on meanwhile
            compiled = await self.grammars.compile_async(request.grammar)
        if not request.request_id:
            request.request_id = f"r{next(_ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        rows = []
        for i in range(request.n):
            row_id = request.request_id if request.n == 1 else f"{request.request_id}#{i}"
            if row_id in self._by_id:
                raise ValueError(f"request id {request.request_id!r} is already running")
            generator = None
            if request.temperature > 0:
                generator = torch.Generator(device=self.device)
                seed = torch.seed() if request.seed is None else (request.seed + i) % 2**64
                generator.manual_seed(seed)
            matcher = None if compiled is None else self.grammars.matcher(compiled, request.grammar_generated)
            rows.append(_Row(request, list(request.prompt_ids), queue, generator, id=row_id, index=i,
                             matcher=matcher))
        for row in rows:
            self._by_id[row.id] = row
            self._waiting.append(row)
        self.counters["requests"] += 1
        self._ensure_loop()
        open_rows = request.n
        try:
            while open_rows:
                items = [await queue.get()]
                while not queue.empty():  # coalesce tokens produced while the consumer was busy
                    items.append(queue.get_nowait())
                chunks: dict[int, dict] = {}
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    chunk = chunks.setdefault(item["index"], {"index": item["index"], "token_ids": [],
                                                              "finish_reason": None, "logprobs": None,
                                                              "prompt_logprobs": None})
                    chunk["token_ids"] += item["token_ids"]
                    chunk["finish_reason"] = item["finish_reason"] or chunk["finish_reason"]
                    if item.get("logprobs") is not None:
                        chunk["logprobs"] = (chunk["logprobs"] or []) + item["logprobs"]
                    if item.get("prompt_logprobs") is not None:
                        chunk["prompt_logprobs"] = item["prompt_logprobs"]
                for chunk in chunks.values():
                    yield chunk
                    if chunk["finish_reason"] is not None:
                        open_rows -= 1
        finally:
            if any(not row.done for row in rows):  # the consumer went away (disconnect, timeout): free the rows
                for row in rows:
                    row.cancelled = True
                self._wake.set()

    async def load(self, name: str, part) -> None:
        """Serve composition ``name`` from the next step on: ``part``, a ComposedModel on this engine's anchor
        whose augmenting models are the model's own (the same modules; ``ComposedModel.augments_of``), since
        the augmenting side has no others. Running rows go on; their caches get the new bridges' keys and
        values as zeros, which their masks hide. ValueError naming what does not fit; nothing changes then."""
        if name in self.model.compositions and name not in self._unloading:
            raise ValueError(f"a composition named {name!r} is served already: unload it first")
        missing = [i for i, slot in enumerate(self.model.augments_of(part)) if slot is None]
        if missing:
            raise ValueError(f"composition {name!r} reads augmenting model(s) {missing} that this engine does not "
                             f"reach: compositions loaded at runtime read the deployed augmenting models")
        async with self._between_steps:
            if name in self._unloading:  # the old one is still draining: it must go before its name is reused
                raise ValueError(f"composition {name!r} is being unloaded: its last requests are still running; "
                                 f"load it again once they finished")
            bridges = self.model.add_composition(name, part)
            if self._cache is not None:
                rows = self._cache.attention_mask.shape[0]
                empty = []
                for b in bridges:
                    bridge, link = self.model.bridges[b], self.model.links[b]
                    seen = self._cache.augment_masks[link.augment].shape[1]
                    empty.append(torch.zeros(rows, bridge.num_heads, seen, bridge.head_dim, dtype=bridge.dtype,
                                             device=self.device))
                self._cache.add_bridges(empty, [e.clone() for e in empty])
            self._composition_changed()

    def unload(self, name: str) -> None:
        """Stop taking requests for composition ``name`` now; its running and waiting rows finish, then its
        bridges leave the model and the batch cache (between steps). Other compositions' rows go on untouched.
        ValueError for a name this engine does not serve."""
        if name not in self.model.compositions or name in self._unloading:
            raise ValueError(f"no composition named {name!r} is served here")
        self._unloading.add(name)
        self._ensure_loop()  # an idle loop removes it at once

    def _remove_unloaded(self) -> None:
        """Remove the unloading compositions no row needs any more (inside the loop, between steps)."""
        for name in list(self._unloading):
            if any(r.request.composition == name for r in [*self._running, *self._waiting]):
                continue
            gone = self.model.remove_composition(name)
            if self._cache is not None:
                self._cache.drop_bridges(gone)
            self._unloading.discard(name)
            self._composition_changed()
            log.info("composition %s unloaded", name)

    def _composition_changed(self) -> None:
        self._bridge_augments = [link.augment for link in self.model.links]
        self.augments.indices = [tuple(encoder.indices) for encoder in self.model.encoders]
        self._feeds = {name: set(self.model.composition_augments(name)) for name in self.model.compositions}
        self._feeds[None] = set()

    # ------------------------------------------------------------------ checks
    def _check(self, r: GenerationRequest) -> None:
        """What only this engine knows; the request checked its own invariants when it was made."""
        if r.grammar is not None and self.grammars is None:
            raise ValueError("this server was started without constrained decoding: leave out response_format "
                             "and tools")
        if r.composition not in self._feeds or r.composition in self._unloading:
            served = [repr(n) for n in self.model.compositions if n not in self._unloading]
            raise ValueError(f"no composition named {r.composition!r}: this engine serves {', '.join(served)}, "
                             f"or None for the bare anchor")
        if r.n > self.max_batch_size:
            raise ValueError(f"n={r.n} is more than this server decodes together ({self.max_batch_size}): lower n")
        vocab = self.model.anchor_info.vocab_size  # the anchor's config, as the HTTP frontend's ``Limits.vocab_size``
        outside = [t for t in r.prompt_ids if not 0 <= t < vocab]
        if outside:
            raise ValueError(f"prompt token ids {outside[:5]} are outside the vocabulary (0..{vocab - 1})")
        bad = [t for t in r.logit_bias if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias names token ids {bad[:5]} outside the vocabulary (0..{vocab - 1})")
        if self.max_context is not None and len(r.prompt_ids) + r.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(r.prompt_ids)} tokens) + max_tokens ({r.max_tokens}) exceeds the context of "
                f"{self.max_context} tokens: shorten the prompt or lower max_tokens"
            )

    # ------------------------------------------------------------------ the loop
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            # A fresh context: the loop outlives the request that starts it, so it must not carry that
            # request's context (Ray Serve would cancel the loop's calls when that request is cancelled).
            self._task = asyncio.get_running_loop().create_task(self._loop(), context=contextvars.Context())
        self._wake.set()

    async def _loop(self) -> None:
        try:
            await self._run()
        finally:  # only on shutdown or a bug: no request may wait forever
            self._fail(list(self._waiting) + list(self._running), RequestFailed("the decode engine stopped"))
            self._waiting.clear()

    async def _run(self) -> None:
        while True:
            if not self._waiting and not self._running and not self._unloading:
                if self._release_pending:  # in the loop, so it cannot overtake the next prefill
                    self._release_pending = False
                    try:
                        await self.augments.release(None)
                    except Exception:  # noqa: BLE001 - a failed release only holds memory until the next prefill
                        log.warning("could not release augmenting rows", exc_info=True)
                    continue
                self._wake.clear()
                await self._wake.wait()
            async with self._between_steps:  # compositions are added and removed between iterations only
                await self._iteration()
            await asyncio.sleep(0)  # let streams and new requests through between steps

    async def _iteration(self) -> None:
        """Admit and prefill what fits, then one decode step of every running row."""
        self._drop_cancelled()
        free = self.max_batch_size - len(self._running)
        admit = []
        while self._waiting and len(admit) + self._waiting[0].request.n <= free:
            # a request's n rows are admitted together (generate queues them together), so they share a prefill
            for _ in range(self._waiting[0].request.n):
                row = self._waiting.popleft()
                if not row.cancelled:
                    admit.append(row)
        if admit:
            try:
                await self._prefill(admit)
            except Exception as e:  # noqa: BLE001 - fail the affected requests, keep serving
                log.error("prefill of %d rows failed: %s", len(admit), public_reason(e))
                log.debug("prefill traceback", exc_info=e)  # one line per failure; the detail at debug level
                # a failure after the new rows joined the batch leaves the batch cache unknown
                joined = any(r in self._running for r in admit)
                self._fail(admit + (self._running if joined else []), e)
        if self._running:
            try:
                await self._step()
            except Exception as e:  # noqa: BLE001
                log.error("decode step of %d rows failed: %s", len(self._running), public_reason(e))
                log.debug("decode step traceback", exc_info=e)
                self._fail(list(self._running), e)
        self._remove_unloaded()

    def _fail(self, rows: list[_Row], error: Exception) -> None:
        err = error if isinstance(error, RequestFailed) else RequestFailed(f"generation failed: {public_reason(error)}")
        for row in rows:
            if not row.done:
                row.done = True
                row.queue.put_nowait(err)
                self._by_id.pop(row.id, None)
                self.counters["failed"] += 1
        self._running = [r for r in self._running if not r.done]
        if not self._running:
            self._cache = None
            self._release_pending = True

    def _drop_cancelled(self) -> None:
        for row in list(self._waiting):
            if row.cancelled:
                self._waiting.remove(row)
                self._finish(row, cancelled=True)
        if any(r.cancelled and not r.done for r in self._running):
            for row in self._running:
                if row.cancelled and not row.done:
                    self._finish(row, cancelled=True)
            self._compact()

    def _finish(self, row: _Row, cancelled: bool = False) -> None:
        row.done = True
        self._by_id.pop(row.id, None)
        self.counters["cancelled" if cancelled else "finished"] += 1

    def _compact(self) -> None:
        """Drop done rows from the batch and its cache."""
        keep = [i for i, r in enumerate(self._running) if not r.done]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache = None
            self._release_pending = True
        else:
            select_rows(self._cache, torch.tensor(keep, dtype=torch.long, device=self.device), self._bridge_augments)

    def _emit(self, rows: list[_Row], next_ids: list[tuple[int, dict | None] | Exception],
              prompt_logprobs: list[list | None] | None = None) -> None:
        """Hand each row its next token (and its logprobs); a row whose token could not be made (an exception)
        fails alone, and with it the request it belongs to.

        Failed rows are marked done here and leave the batch cache at the caller's ``_compact``.
        """
        for i, (row, picked) in enumerate(zip(rows, next_ids)):
            if row.done:
                continue
            if isinstance(picked, Exception):
                log.warning("request %s failed: %s", row.id, picked)
                row.done = True
                # a grammar that cannot go on is the request's own problem (a 400), anything else the server's
                row.queue.put_nowait(picked if isinstance(picked, GrammarError)
                                     else RequestFailed(f"generation failed: {public_reason(picked)}"))
                self._by_id.pop(row.id, None)
                self.counters["failed"] += 1
                continue
            token, logprob = picked
            row.tokens.append(token)
            row.generated += 1
            self.counters["tokens"] += 1
            finish = None
            if token in row.request.eos_ids or (row.matcher is not None and row.matcher.is_stopped()):
                finish = "stop"  # an end-of-sequence token, or a grammar whose text is complete
            elif row.generated >= row.request.max_tokens:
                finish = "length"
            row.queue.put_nowait({"index": row.index, "token_ids": [token], "finish_reason": finish,
                                  "logprobs": None if logprob is None else [logprob],
                                  "prompt_logprobs": prompt_logprobs[i] if prompt_logprobs else None})
            if finish is not None or row.cancelled:
                self._finish(row, cancelled=row.cancelled and finish is None)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[tuple[int, dict | None] | Exception]:
        """(next token, its logprobs or None) per row from last-position logits [rows, vocab]; each row uses its
        own settings (grammar, logit bias, penalties, temperature, top_p, seed, logprobs). A row's grammar masks
        its logits first, and its matcher consumes the chosen token.

        A row whose logits are not finite, or whose sampler fails, gets the exception instead of a token:
        one request's failure never reaches the other rows of the batch.
        """
        greedy: list[int] = logits.argmax(dim=-1).tolist()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        wants = [i for i, row in enumerate(rows) if row.request.logprobs is not None]
        logp = torch.log_softmax(logits[wants].float(), dim=-1) if wants else None
        # the constrained rows' masks, filled together and moved to the logits' device once
        constrained = {i: k for k, i in enumerate(i for i, row in enumerate(rows) if row.matcher is not None)}
        if constrained:
            allowed, grammar_errors = self.grammars.masks([rows[i].matcher for i in constrained])
            allowed = allowed.to(logits.device)
        picked: list[tuple[int, dict | None] | Exception] = []
        for i, row in enumerate(rows):
            r = row.request
            try:
                if not finite[i]:
                    raise ValueError("the model produced non-finite logits (NaN or inf) for this request")
                raw = row_logits = logits[i]
                if i in constrained:
                    if grammar_errors[constrained[i]] is not None:
                        raise grammar_errors[constrained[i]]
                    row_logits = row_logits.masked_fill(~allowed[constrained[i]], float("-inf"))
                if r.processes_logits:
                    row_logits = self._processed(row, row_logits)
                if r.temperature > 0:
                    token = int(sample_next(row_logits[None], True, r.temperature, 0, r.top_p, row.generator)[0])
                else:
                    token = greedy[i] if row_logits is raw else int(row_logits.argmax())
                if row.matcher is not None:
                    consume(row.matcher, token)
                entry = None
                if r.logprobs is not None:
                    entry = _logprob_entry(logp[wants.index(i)], token, r.logprobs)
                picked.append((token, entry))
            except Exception as e:  # noqa: BLE001 - this row's failure is reported to this row only
                picked.append(e)
        return picked

    def _processed(self, row: _Row, logits: torch.Tensor) -> torch.Tensor:
        """A row's logits [vocab] (float32) after its logit bias and its presence and frequency penalties
        (OpenAI's definition: counts are of the tokens this row generated, not of the prompt)."""
        r = row.request
        out = logits.float().clone()
        if r.logit_bias:
            ids = torch.tensor(list(r.logit_bias), dtype=torch.long, device=out.device)
            out[ids] += torch.tensor(list(r.logit_bias.values()), dtype=out.dtype, device=out.device)
        if row.generated and (r.presence_penalty or r.frequency_penalty):
            generated = torch.tensor(row.tokens[-row.generated:], dtype=torch.long, device=out.device)
            counts = torch.bincount(generated, minlength=out.shape[-1])[: out.shape[-1]].to(out.dtype)
            out -= counts * r.frequency_penalty + (counts > 0).to(out.dtype) * r.presence_penalty
        return out

    def _prompt_logprobs(self, rows: list[_Row], logits: torch.Tensor) -> list[list | None]:
        """Per row: None, or its prompt tokens' logprob entries (the first token's None) from the prefill's
        logits over every position [rows, longest, vocab] (left padded)."""
        out: list[list | None] = []
        width = logits.shape[1]
        for r, row in enumerate(rows):
            if not row.request.prompt_logprobs:
                out.append(None)
                continue
            prompt = row.tokens
            start = width - len(prompt)  # left padding: the prompt's first token sits here
            logp = torch.log_softmax(logits[r, start : width - 1].float(), dim=-1)  # predicts prompt[1:]
            k = row.request.logprobs or 0
            out.append([None] + [_logprob_entry(logp[j], prompt[j + 1], k) for j in range(len(prompt) - 1)])
        return out

    # ------------------------------------------------------------------ model calls
    async def _prefill(self, rows: list[_Row]) -> None:
        self.counters["prefills"] += 1
        # rows with the same prompt (a request's n choices, or equal prompts admitted together) are computed
        # once, on both sides: the first of them leads, the others get copies of its cache rows
        lead_of: dict[tuple, int] = {}
        expand = [lead_of.setdefault((r.request.composition, *r.tokens), len(lead_of)) for r in rows]  # -> its leader
        leaders = [rows[expand.index(k)] for k in range(len(lead_of))]
        copies = {leaders[k].id: [r.id for r, e in zip(rows, expand) if e == k and r is not leaders[k]]
                  for k in range(len(leaders))}
        copies = {lead: ids for lead, ids in copies.items() if ids} or None
        self.counters["prefill_rows"] += len(leaders)
        self.counters["shared_prefill_rows"] += len(rows) - len(leaders)
        ids, mask = pad_left([r.tokens for r in leaders], self.pad_id)
        keep = [r.id for r in self._running]
        echo = any(r.request.prompt_logprobs for r in rows)  # then the logits of every prompt position
        texts, inputs = self.aligner.step(ids, mask, None, None)
        inputs = self._fed_by_their_compositions(leaders, inputs)
        new = [_real_tokens(inp) for inp in inputs]  # per augmenting model, per leader: the prompt's closed tokens
        for r, row in enumerate(rows):
            row.augment_tokens = [list(new[m][expand[r]]) for m in range(len(new))]
        rows_m = [[(row.id, new[m][r]) for r, row in enumerate(leaders)] for m in range(len(new))]
        logits, cache, _, _ = await self._forward_with(lambda part: self.augments.prefill(rows_m, keep, copies, part), ids,
                                                       mask, None, inputs, self._row_bridges(leaders), all_logits=echo)
        cache.texts = texts
        if copies:  # every row gets its leader's logits and cache rows
            index = torch.tensor(expand, dtype=torch.long, device=self.device)
            logits = logits.index_select(0, index.to(logits.device))
            select_rows(cache, index, self._bridge_augments)
        prompt_logprobs = None
        if echo:
            prompt_logprobs, logits = self._prompt_logprobs(rows, logits), logits[:, -1]
        next_ids = self._sample(rows, logits)
        if self._cache is None:
            self._cache = cache
        else:
            self._cache = merge_composition_caches(self._cache, cache)
        self._running += rows
        self._emit(rows, next_ids, prompt_logprobs)
        self._compact()

    async def _step(self) -> None:
        rows = list(self._running)
        ids = [r.id for r in rows]
        tokens = [r.tokens[-1] for r in rows]
        self.counters["steps"] += 1
        self.counters["max_rows_in_step"] = max(self.counters["max_rows_in_step"], len(rows))
        t0 = time.perf_counter()
        new = torch.tensor(tokens, dtype=torch.long)[:, None]
        # what each augmenting cache of each row holds: counted here, no device sync
        seen = [torch.tensor([len(r.augment_tokens[m]) for r in rows]) for m in range(len(self._cache.augment_masks))]
        texts, inputs = self.aligner.step(new, torch.ones_like(new), self._cache.texts, seen)
        inputs = self._fed_by_their_compositions(rows, inputs)
        closed = [_real_tokens(inp) for inp in inputs]  # per augmenting model, per row: 0, 1 or more tokens
        logits, self._cache, waited, call_s = await self._forward_with(lambda part: self._augment_states(ids, closed, part),
                                                                       new, torch.ones_like(new),
                                                                       self._cache, inputs, self._row_bridges(rows))
        self._cache.texts = texts
        for r, row in enumerate(rows):  # only now: the call above re-sends these histories on a miss
            for m, tokens_m in enumerate(closed):
                row.augment_tokens[m] += tokens_m[r]
        t1 = time.perf_counter()
        self.timers["augment_call_s"] += call_s
        self.timers["augment_s"] += waited
        self.timers["anchor_s"] += t1 - t0 - waited
        # rows cancelled while the step ran are still rows of this step's cache: finish them after it
        self._emit(rows, self._sample(rows, logits))
        self._drop_cancelled()
        self._compact()
        self.timers["step_s"] += time.perf_counter() - t0

    async def _forward_with(self, fetch, ids, mask, cache, augment_inputs, row_bridges, all_logits=False):
        """The anchor forward with the augmenting states that ``fetch(part)`` (a coroutine) returns.

        Returns (last logits, cache, seconds the forward waited for the states, seconds the call took).
        In a model thread the call and the forward start together: the anchor's layers below each bridge
        run while the call is in flight, and the thread blocks at a bridge only until the states it reads
        arrived (``ArrivingStates``; a streamed extend sends them index by index through ``part``, so the
        anchor's middle layers run while the augmenting model's upper layers do); a failed call fails the
        forward there. On the event loop the call is awaited first, then the forward runs.
        """
        if not self.model_thread:
            t0 = time.perf_counter()
            states = await fetch(None)
            waited = time.perf_counter() - t0
            return (*self._forward(ids, mask, states, cache, augment_inputs, row_bridges, all_logits), waited, waited)
        started = time.perf_counter()
        arriving = ArrivingStates()

        async def call():
            try:
                got = await fetch(arriving.put)
            except BaseException as e:
                arriving.fail(e)
                raise
            for m, states in enumerate(got):
                arriving.put(m, states)
            arriving.finish()
            return time.perf_counter()

        pending = asyncio.ensure_future(call())
        try:
            logits, new_cache = await asyncio.to_thread(self._forward, ids, mask, arriving.get, cache,
                                                        augment_inputs, row_bridges, all_logits)
        except BaseException:
            if not pending.done():  # the forward failed before it needed all the states (or we are cancelled)
                pending.cancel()
            elif not pending.cancelled():
                pending.exception()  # the call's own failure: the forward raised it already
            raise
        finally:
            arriving.fail(RequestFailed("the step's augmenting states are no longer wanted"))  # frees a waiter
        answered = await pending  # the call's bookkeeping (a re-sent history) is done before the step goes on
        return logits, new_cache, arriving.waited, answered - started

    def _row_bridges(self, rows: list[_Row]) -> torch.Tensor | None:
        """[rows, bridges] bool, the bridges of each row's composition; None when every row takes all."""
        return self.model.bridges_of([r.request.composition for r in rows])

    def _fed_by_their_compositions(self, rows: list[_Row], inputs: list[AugmentInputs]) -> list[AugmentInputs]:
        """``inputs`` with each augmenting model's tokens turned to padding, nothing visible, in the rows whose
        composition does not read it (the bare anchor's rows: in every model): the model is not run for them,
        and their bridges on it see no key. The identity shortcut (the anchor's mask for the augmenting side's)
        no longer holds for a model such a row skips, so those steps take the general rule (the same values for
        the other rows)."""
        out = []
        for m, inp in enumerate(inputs):
            skip = [r for r, row in enumerate(rows) if m not in self._feeds[row.request.composition]]
            if not skip:
                out.append(inp)
                continue
            index = torch.tensor(skip)
            mask, visible = inp.attention_mask.clone(), inp.visible.clone()
            mask[index], visible[index] = 0, 0
            first = int(mask.any(0).long().argmax()) if mask.any() else mask.shape[1]  # columns left of it: padding
            out.append(AugmentInputs(inp.input_ids[:, first:], mask[:, first:], visible, identity=False))
        return out

    def _augment_history(self, augment: int, request_id: str) -> list[int]:
        """The tokens augmenting model ``augment``'s cache of a live row holds."""
        row = self._by_id.get(request_id)
        return row.augment_tokens[augment] if row is not None else []

    async def _augment_states(self, ids: list[str], closed: list[list[list[int]]], part=None,
                              ) -> list[dict[int, torch.Tensor]]:
        """The augmenting states of this step's closed tokens; no-token states for a model no row fed. With
        ``part`` (``ArrivingStates.put``) the calls are streamed: each index is put there as it arrives."""
        got = await self.augments.extend(ids, closed, self._augment_history, part)
        return [states if states is not None else self._no_states(m, len(ids)) for m, states in enumerate(got)]

    def _no_states(self, augment: int, rows: int) -> dict[int, torch.Tensor]:
        encoder = self.model.encoders[augment]
        empty = torch.zeros(rows, 0, encoder.info.hidden_size, device=self.device)
        return {index: empty for index in encoder.indices}

    @torch.no_grad()
    def _forward(self, ids, mask, states, cache, augment_inputs, row_bridges, all_logits=False):
        """Anchor + bridges on new tokens ids/mask [rows, new]; returns (last logits [rows, vocab], cache), or
        with ``all_logits`` every position's logits [rows, new, vocab] (float32).

        ``augment_inputs``: per augmenting model the new tokens' alignment (``composition.alignment.AugmentInputs``)
        that ``states`` are the states of; ``row_bridges``: the bridges of each row's composition (None: all).
        """
        augment_inputs = [AugmentInputs(i.input_ids.to(self.device), i.attention_mask.to(self.device),
                                        i.visible.to(self.device), i.identity) for i in augment_inputs]
        out = self.model(
            ids.to(self.device),
            mask.to(self.device),
            augment_states=states,
            augment_inputs=augment_inputs,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            row_bridges=row_bridges,
        )
        return (out.logits.float() if all_logits else out.logits[:, -1].float()), out.cache


def _logprob_entry(logp: torch.Tensor, token: int, k: int) -> dict:
    """``{"id", "logprob", "top": [[id, logprob], ...]}``: a token's logprob and the k most likely tokens' from
    log-probabilities [vocab]."""
    top = torch.topk(logp, k) if k else None
    return {"id": token, "logprob": float(logp[token]),
            "top": [] if top is None else [[int(t), float(v)] for v, t in zip(top.values, top.indices)]}


def _real_tokens(inputs: AugmentInputs) -> list[list[int]]:
    """Per row, the real (non-padding) tokens of a left-padded ``AugmentInputs`` block."""
    ids, real = inputs.input_ids.tolist(), inputs.attention_mask.tolist()
    return [[t for t, keep in zip(row, keep_row) if keep] for row, keep_row in zip(ids, real)]

"""Ray Serve deployments of a composed model, behind an OpenAI-shaped FastAPI ingress.

    HTTP --> Ingress (FastAPI: validation, tokenising, chat template, stop strings, SSE)
               | handle.options(stream=True).generate  (one streaming call per request)
               v
             Anchor replica: anchor + every composition's bridges + DecodeEngine (continuous batching of
               |             decode steps; rows of every composition in the same steps: ComposedModel.stack)
               | handle.options(multiplexed_model_id=<engine id>, stream=True).streamed(Prefill | Extend)
               |   (one call per batch step; the states stream back index by index as the augmenting model
               |   computes them, and the anchor's forward takes each at the bridge that reads it)
               v
             Augment{i} replica: augmenting model i (one per folder and tokenizer, shared by the compositions
                                 that read it) + AugmentRows per engine (its KV caches)

Each deployment is a thin shell around a plain object that works without Ray
(``OpenAIFrontend``, ``DecodeEngine``, ``AugmentRows``); resources and scaling live in config.

Where the per-request caches live, and how a step finds them: a request's anchor cache is in the
anchor replica that runs it (the whole request is one streaming call, so it never moves). Its
augmenting cache is in one augmenting replica: each anchor replica's engine sends every augmenting
call with ``multiplexed_model_id=<engine id>``; Serve's multiplexing routes an id to the replica
that already loaded it (here: that holds the engine's rows), so an engine sticks to one augmenting
replica, and different engines spread over the replicas. Should a call land elsewhere (that
replica died, scaled down, or evicted the engine), the rows are reported missing and re-sent
(re-prefilled from the token history): requests go on instead of failing.

Across tokenizers (an augmenting model whose tokenizer differs from the anchor's), the anchor replica
loads every tokenizer once and aligns the text itself (``DecodeEngine``); it calls ``extend`` with
each row's newly closed augmenting token ids instead of ``step``. The augmenting replicas need no
tokenizer: they only ever append the token ids they are sent.
"""

import asyncio
import json
import logging
import threading
import time
import uuid

import torch
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle

from actors.serve.augment_client import AugmentClient, AugmentUnavailable
from actors.serve.augment_protocol import Extend, Missing, Prefill, Release, States
from actors.serve.augment_rows import AugmentRows
from actors.serve.batch_cache import check_batchable
from actors.serve.compositions import Admin, CompositionRegistry, Synced
from actors.serve.config import ANCHOR, COMPOSITIONS, INGRESS, CompositionArgs, ServingArgs, augment_deployment_name
from actors.serve.engine import DecodeEngine, GenerationRequest
from actors.serve.grammar import grammars_for
from actors.serve.openai import guard
from actors.serve.openai.app import Limits, OpenAIFrontend
from actors.serve.openai.errors import ApiError
from actors.serve.openai.schemas import (
    ChatBody,
    ChatCompletion,
    Completion,
    CompletionBody,
    CompositionStatus,
    ErrorBody,
    Health,
    ModelList,
    UnloadBody,
    body_schemas,
    request_body,
)
from actors.serve.reasons import public_reason
from composition.alignment import TokenizerError
from composition.augment import AugmentEncoder
from composition.checkpoint import check_fingerprint, check_model_matches, check_tokenizers, fingerprint, read_meta
from composition.loading import load_causal_lm, load_tokenizer, resolve_tokenizers
from composition.model import ComposedModel

log = logging.getLogger("ray.serve")

SERVE_THE_TRAINED_MODELS = "serve the models the bridges were trained with"
# the replica died, or left the routing table: the call can go to another replica
TRANSIENT = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


# ---------------------------------------------------------------------- loading helpers
def _threads(settings: ServingArgs) -> None:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


def model_shell(path: str):
    """An augmenting model's architecture without weights (meta device): what the anchor side needs to
    build the composition, whose augmenting states come from another deployment."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))




def serving_tokenizers(settings: ServingArgs, composition: CompositionArgs, meta: dict) -> list | None:
    """``[anchor_tokenizer, *augment_tokenizers]`` of ``composition`` when some augmenting model tokenises
    differently from the anchor, None when all read the anchor's tokens (the alignment is then the identity).

    Which tokenizer each model reads is ``composition.loading.resolve_tokenizers``' rule (training's too).
    Refuses tokenizers other than the ones the bridges recorded (ValueError naming the field), as
    ``ComposedModel.from_pretrained`` does.
    """
    resolved = resolve_tokenizers(settings.tokenizer or settings.anchor, composition.augments,
                                  composition.augment_tokenizers)
    try:
        check_tokenizers(composition.bridges, meta.get("tokenizers"), [resolved.anchor, *resolved.augments])
    except TokenizerError:  # slow tokenizers with the anchor's vocabulary: only "one shared tokenizer" can be checked
        check_tokenizers(composition.bridges, meta.get("tokenizers"), None)
    return resolved.for_composition()


def load_stack(settings: ServingArgs, anchor) -> ComposedModel:
    """Every composition of ``settings`` over the loaded ``anchor``, stacked (``ComposedModel.stack``): the
    augmenting models as weightless shells, one per slot (each augmenting replica checks its own model).
    Refuses bridges trained on another anchor or with other tokenizers (ValueError naming the composition)."""
    shells = [model_shell(folder) for folder, _ in settings.augment_slots()]
    parts = {}
    for c in settings.compositions:
        meta = read_meta(c.bridges)
        check_model_matches(f"the anchor of composition {c.name!r}", meta["anchor"], anchor, SERVE_THE_TRAINED_MODELS)
        # check_models=False: the shells have no weights
        parts[c.name] = ComposedModel.from_pretrained(c.bridges, anchor, [shells[s] for s in settings.slots_of(c)],
                                                      check_models=False,
                                                      tokenizers=serving_tokenizers(settings, c, meta))
    model = ComposedModel.stack(parts)
    if len(model.encoders) != len(shells):
        raise ValueError(f"the compositions read {len(model.encoders)} distinct augmenting models where the config "
                         f"names {len(shells)} (folder, tokenizer) pairs: name each augmenting model's tokenizer "
                         f"the same way in every composition that uses it")
    return model


def anchor_model_thread(setting: bool | str, model) -> bool:
    """Whether an anchor replica runs its model calls in a worker thread (``ServingArgs.model_thread``).

    "auto": yes when the anchor has layers below its first bridge. The engine then runs them while the
    step's augmenting call is in flight (``DecodeEngine._forward_with``); with a bridge at the anchor's
    input there is nothing to overlap, and the thread hop would only cost.
    """
    if setting != "auto":
        return setting is True
    return min((link.anchor_index for link in model.links), default=0) > 0


def text_config(path: str):
    """A model's (text) config from its folder, hub id or URI: config.json only, never the weights."""
    from transformers import AutoConfig

    from actors.storage import is_uri, read_member

    if is_uri(path):
        raw = json.loads(read_member(path, "config.json"))
        cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    else:
        cfg = AutoConfig.from_pretrained(path)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_context(paths: list[str]) -> int:
    """The smallest max_position_embeddings (or n_positions) among the models' configs."""
    sizes = []
    for p in paths:
        cfg = text_config(p)
        size = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if size:
            sizes.append(int(size))
    if not sizes:
        raise ValueError(f"none of {paths} states its context length: set max_context in the serving args")
    return min(sizes)


# ---------------------------------------------------------------------- augmenting models
# called once per decode step: no access-log line per call
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64, max_queued_requests=256,
                  logging_config={"enable_access_log": False})
class AugmentDeployment:
    """Augmenting model ``index`` and, per anchor engine, the KV caches of that engine's rows."""

    def __init__(self, settings: ServingArgs, index: int):
        _threads(settings)
        settings = settings.localized(anchor=False, augments=[index])  # URIs: into this node's cache
        folder, _ = settings.augment_slots()[index]
        model = load_causal_lm(folder, settings.dtype, settings.device)
        check_batchable(model, f"augmenting model {index}")  # refused at start-up, never per request
        indices = set()  # the layers that the bridges of every composition reading this model take
        for c in settings.compositions:
            meta = read_meta(c.bridges)
            for i, slot in enumerate(settings.slots_of(c)):
                if slot == index:
                    check_model_matches(f"augmenting model {i} of composition {c.name!r}", meta["augments"][i],
                                        model, SERVE_THE_TRAINED_MODELS)
                    indices |= {a for m, a, _ in meta["links"] if m == i}
        self.index = index
        self.fingerprint = fingerprint(model)  # what a composition loaded at runtime is checked against
        self.encoder = AugmentEncoder(model, sorted(indices))
        self.lock = threading.Lock()  # one model call at a time: the encoder's hooks hold per-call state
        self.model_thread = settings.model_thread is True  # "auto" is about the anchor's overlap: not here

    async def _run(self, fn, *args):
        return await asyncio.to_thread(fn, *args) if self.model_thread else fn(*args)

    @serve.multiplexed(max_num_models_per_replica=64)
    async def rows_of(self, engine_id: str) -> AugmentRows:
        """The rows of one anchor engine (a Serve "model", so Serve routes the engine back here)."""
        return AugmentRows(self.encoder, self.index, 0, self.lock)

    async def _rows(self) -> AugmentRows:
        engine_id = serve.get_multiplexed_model_id()
        if not engine_id:
            raise ValueError("call with handle.options(multiplexed_model_id=<engine id>)")
        return await self.rows_of(engine_id)

    async def prefill(self, request: Prefill) -> States | None:
        target = await self._rows()
        return await self._run(target.prefill, request)

    async def extend(self, request: Extend) -> States | Missing:
        start = time.perf_counter()
        target = await self._rows()
        result = await self._run(target.extend, request)
        if isinstance(result, States):
            result.replica_s = time.perf_counter() - start  # lets the engine tell transport from compute
        return result

    async def streamed(self, request: Prefill | Extend):
        """``prefill`` or ``extend``, streamed: each index's states as a part as soon as the model computed them
        (the anchor runs its layers up to each bridge meanwhile), then the final ``States`` (the rest, with the
        last index), or ``Missing``."""
        start = time.perf_counter()
        target = await self._rows()
        loop = asyncio.get_running_loop()
        parts: asyncio.Queue = asyncio.Queue()

        def run():  # in a thread always: the event loop sends the parts while the model runs its upper layers
            try:
                return getattr(target, request.method)(request, lambda p: loop.call_soon_threadsafe(parts.put_nowait, p))
            finally:
                loop.call_soon_threadsafe(parts.put_nowait, None)

        call = asyncio.ensure_future(asyncio.to_thread(run))
        last = None  # each part is sent once the next one exists: the last one travels in the final answer
        while (part := await parts.get()) is not None:
            if last is not None:
                yield last
            last = part
        result = await call
        if isinstance(result, States):
            if last is not None:  # one Serve message fewer per call; the model's last index is ready right then
                result.arrays = {**last.arrays, **result.arrays}
            if isinstance(request, Extend):
                result.replica_s = time.perf_counter() - start
        yield result

    async def release(self, request: Release) -> None:
        target = await self._rows()
        await self._run(target.release, request)

    async def ready(self) -> bool:
        """True: the model is loaded (``__init__`` is done)."""
        return True

    async def model_fingerprint(self) -> dict:
        return self.fingerprint


class ServeAugments(AugmentClient):
    """Reaches the augmenting deployments through Serve, sticky per engine (multiplexed model id).

    A call that fails because a replica died or left is retried with backoff for ``retry_s``
    (the next replica reports the engine's rows missing, and ``AugmentClient.extend`` re-sends them);
    a call that takes longer than its time limit is cancelled and retried the same way. The limit
    scales with the work: ``call_timeout_s`` plus ``per_token_s`` for each token the call runs, so a
    long prompt's prefill is never cut by a limit sized for a decode step (the request's own timeout,
    ``request_timeout_s``, still bounds it and answers 504).
    """

    def __init__(self, handles: "list[DeploymentHandle]", engine_id: str, device="cpu", retry_s: float = 30.0,
                 call_timeout_s: float = 60.0, per_token_s: float = 0.05):
        super().__init__(len(handles), device)
        self.handles = [h.options(multiplexed_model_id=engine_id) for h in handles]
        self.retry_s = retry_s
        self.call_timeout_s = call_timeout_s
        self.per_token_s = per_token_s
        self.retries = 0

    def time_limit(self, request: Prefill | Extend | Release) -> float:
        """Seconds one attempt of ``request`` may take: the base limit plus the tokens it runs."""
        return self.call_timeout_s + self.per_token_s * request.tokens_run

    async def _call(self, augment: int, request: Prefill | Extend | Release, part=None):
        method = request.method
        limit = self.time_limit(request)
        start = time.monotonic()
        deadline = start + max(self.retry_s, limit)  # at least one whole attempt
        delay = 0.05
        streamed = part is not None and not isinstance(request, Release)
        while True:
            if streamed:
                response = self.handles[augment].options(stream=True).streamed.remote(request)
            else:
                response = getattr(self.handles[augment], method).remote(request)
            try:
                async with asyncio.timeout(limit):  # no extra task per call, unlike wait_for
                    return await (_last_of(response, part) if streamed else response)
            except (*TRANSIENT, BackPressureError, RequestCancelledError, asyncio.TimeoutError,
                    asyncio.CancelledError) as e:
                task = asyncio.current_task()
                if isinstance(e, asyncio.CancelledError) and task is not None and task.cancelling():
                    raise  # this engine is being shut down, not the call failing
                if isinstance(e, asyncio.TimeoutError):  # the call may still run: stop it (best effort)
                    try:
                        response.cancel()
                    except Exception:  # noqa: BLE001
                        pass
                if time.monotonic() + delay > deadline:
                    raise AugmentUnavailable(
                        f"augmenting deployment {augment_deployment_name(augment)} did not answer {method} in "
                        f"{time.monotonic() - start:.0f} s (each attempt may take {limit:.0f} s; last error: "
                        f"{type(e).__name__}: {public_reason(e)})"
                    ) from e
                self.retries += 1
                log.warning("augmenting call %s failed (%s); retrying in %.2f s", method, type(e).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)


async def _last_of(stream, part):
    """A streamed call's answer: each part (``States.final`` False) goes to ``part``; returns the final item."""
    async for item in stream:
        if isinstance(item, States) and not item.final:
            part(item)
            continue
        return item
    raise AugmentUnavailable("the augmenting replica's stream ended without an answer")


# ---------------------------------------------------------------------- anchor + bridges
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16, max_queued_requests=64)
class AnchorDeployment:
    """The anchor with its bridges, decoding all its requests in one continuously batched engine."""

    def __init__(self, settings: ServingArgs, registry: DeploymentHandle | None, *augments: DeploymentHandle):
        _threads(settings)
        settings = settings.localized()  # URIs: into this node's cache (the augmenting folders for their configs)
        anchor = load_causal_lm(settings.anchor, settings.dtype, settings.device)
        model = load_stack(settings, anchor)
        self.settings = settings
        self.synced = Synced(registry)  # compositions loaded at runtime (actors/serve/compositions.py)
        self.loaded: dict[str, CompositionArgs] = {}  # those this engine serves now
        self.checked: dict[str, tuple[CompositionArgs, ComposedModel]] = {}  # built by a check, for the load
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests)
            replica = "local"
        self.engine_id = f"engine-{replica}-{uuid.uuid4().hex[:8]}"
        self.augment_handles = list(augments)
        client = ServeAugments(list(augments), self.engine_id, settings.device, settings.augment_retry_s)
        model_thread = anchor_model_thread(settings.model_thread, model)
        log.info("anchor engine %s: compositions %s", self.engine_id, ", ".join(model.compositions))
        if model.aligner.needs_text:
            log.info("anchor engine %s: augmenting models with their own tokenizers: the engine aligns the text "
                     "and sends each augmenting replica its closed tokens", self.engine_id)
        log.info("anchor engine %s: model calls %s", self.engine_id,
                 "in a worker thread (augmenting calls overlap the anchor's layers below its first bridge)"
                 if model_thread else "on the replica's event loop")
        grammars = grammars_for(load_tokenizer(settings.tokenizer or settings.anchor), model.anchor_info.vocab_size)
        self.engine = DecodeEngine(model, client, settings.max_batch_size, settings.max_context,
                                   pad_id=anchor.config.pad_token_id or 0, model_thread=model_thread,
                                   grammars=grammars)

    async def generate(self, request: GenerationRequest):
        """Stream ``{"token_ids": [...], "finish_reason": ...}`` chunks for one request."""
        await self._sync(now=request.composition is not None and request.composition not in self.loaded
                         and request.composition not in self.engine.model.compositions)
        stream = self.engine.generate(request)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            # Serve cancels a request by raising CancelledError at our `yield`, which would leave the
            # engine's generator suspended (its row decoding on); closing it frees the row now.
            await stream.aclose()

    def _part(self, composition: CompositionArgs) -> tuple[ComposedModel, dict]:
        """A composition loaded at runtime, built on this replica's anchor and augmenting shells, and its bridges'
        metadata (blocking: it fetches and reads the bridges). ValueError and the like for what does not match."""
        composition = self.settings.localized_composition(composition)
        meta = read_meta(composition.bridges)
        model = self.engine.model
        check_model_matches(f"the anchor of composition {composition.name!r}", meta["anchor"], model.anchor,
                            SERVE_THE_TRAINED_MODELS)
        if len(meta["augments"]) != len(composition.augments):
            raise ValueError(f"the bridges compose {len(meta['augments'])} augmenting model(s), the request names "
                             f"{len(composition.augments)}: name the ones they were trained with, in their order")
        shells = [model.encoders[s].model for s in self.settings.slots_of(composition)]
        part = ComposedModel.from_pretrained(composition.bridges, model.anchor, shells, check_models=False,
                                             tokenizers=serving_tokenizers(self.settings, composition, meta))
        return part, meta

    async def check_composition(self, composition: CompositionArgs) -> str | None:
        """None when ``composition`` can be served over this anchor and the deployed augmenting models (its
        bridges read, and their fingerprints match the anchor, the tokenizers and each augmenting replica's
        model); else why not. The model built is kept for the load that follows."""
        try:
            part, meta = await asyncio.to_thread(self._part, composition)
            for i, slot in enumerate(self.settings.slots_of(composition)):
                got = await self.augment_handles[slot].model_fingerprint.remote()
                check_fingerprint(f"augmenting model {i} of composition {composition.name!r}", meta["augments"][i],
                                  got, SERVE_THE_TRAINED_MODELS)
        except Exception as e:  # noqa: BLE001 - whatever the bridges' files or URI hold, the answer is a 400
            return public_reason(e, limit=400, paths=True)  # to the admin who named them
        self.checked[composition.name] = (composition, part)
        return None

    async def _sync(self, now: bool = False) -> None:
        """Serve the registry's compositions: load the new ones, unload the ones that went (between steps)."""
        wanted = await self.synced.changed(now)
        if wanted is None:
            return
        wanted = {c.name: c for c in wanted}
        self.checked = {n: v for n, v in self.checked.items() if n in wanted}  # checks the registry did not take
        for name in [n for n, c in self.loaded.items() if wanted.get(n) != c]:
            self.engine.unload(name)  # its running rows finish
            del self.loaded[name]
        for name, c in wanted.items():
            if name in self.loaded:
                continue
            try:
                checked = self.checked.pop(name, None)
                part = checked[1] if checked and checked[0] == c else (await asyncio.to_thread(self._part, c))[0]
                await self.engine.load(name, part)
                self.loaded[name] = c
            except Exception as e:  # noqa: BLE001 - one composition that cannot load now must not stop the rest
                log.warning("composition %s not loaded yet: %s", name, public_reason(e))
                self.synced.version = -1  # ask again at the next sync

    async def ready(self) -> bool:
        """True once this replica (its model loaded: ``__init__`` is done) and a replica of every augmenting
        deployment answer; what the Ingress's readiness probe asks."""
        await asyncio.gather(*(h.ready.remote() for h in self.augment_handles))
        return True

    async def stats(self) -> dict:
        return {"engine_id": self.engine_id, **self.engine.stats(), "augment_retries": self.engine.augments.retries,
                "model_thread": self.engine.model_thread}


# ---------------------------------------------------------------------- HTTP ingress
api = FastAPI(title="calm-ray", description="A composed model (anchor + augmenting models + bridges), OpenAI-shaped")
# every error, 401/404/405/413/500 included, in OpenAI's error JSON; the guard's keys and body limit are
# looked up by name in each process (one Ingress replica per process): Ingress.__init__ fills them in
INGRESS_GUARD = "calm-ray-ingress"
READY_TIMEOUT_S = 2.0  # a readiness probe waits this long for the anchor (and through it the augmenting models)
READY_FOR_S = 5.0  # and trusts a positive answer this long
guard.install(api, name=INGRESS_GUARD)


def _openapi() -> dict:
    """FastAPI's spec, plus what FastAPI does not write itself: the request bodies' schemas (the routes read
    their bodies themselves, ``guard.read_body``, and declare them with ``schemas.request_body``); the API-key
    scheme the guard enforces (``Authorization: Bearer <key>``, as OpenAI) on every path but the health probes,
    when this server has keys (a server without keys takes any key or none, and its spec says so by declaring
    none); and one operation id per method of the probes, which answer GET and HEAD from one route."""
    if api.openapi_schema is None:
        import warnings

        with warnings.catch_warnings():  # the probes' GET and HEAD share a route, so FastAPI repeats its id
            warnings.filterwarnings("ignore", message="Duplicate Operation ID")
            spec = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        spec.setdefault("components", {}).setdefault("schemas", {}).update(body_schemas(CompletionBody, ChatBody))
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                if len(operations) > 1:
                    operation["operationId"] = f"{operation['operationId'].rsplit('_', 1)[0]}_{method}"
        if guard.settings_for(INGRESS_GUARD).api_keys:
            spec["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "one of the server's API keys (docs/serving.md, API keys)"}}
            for path, operations in spec["paths"].items():
                if not path.startswith("/health"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
        api.openapi_schema = spec
    return api.openapi_schema


api.openapi = _openapi
_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 500, 503, 504)}
# "stream": true answers server-sent events: data: {chunk}\n\n ... data: [DONE]
_ANSWERS = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}, **_ERRORS}


# many ongoing requests per replica (they mostly wait on the Anchor): overload is then answered here, as
# OpenAI's JSON 503 when the Anchor's queue is full, not by Serve's proxy in plain text. The proxy's queue
# is deep too: a burst waits there until the router assigns it (200 at once on 2 busy cores queued 128)
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1024, max_queued_requests=1024)
@serve.ingress(api)
class Ingress:
    """OpenAI-shaped HTTP front: /v1/completions, /v1/chat/completions, /v1/models, /health."""

    def __init__(self, settings: ServingArgs, anchor: DeploymentHandle, vocab_size: int,
                 registry: DeploymentHandle | None = None):
        settings = settings.localized(anchor=False, augments=[], bridges=False)  # the tokenizer only
        # what the (pickled) app's RequestGuard reads in this process; a missing key file fails the replica
        admits = guard.configure(INGRESS_GUARD, settings)
        log.info("ingress: %s, request bodies up to %d bytes",
                 f"{len(admits.api_keys)} API key(s) required" if admits.api_keys else "no API keys (open)",
                 admits.max_body_bytes)
        tokenizer = load_tokenizer(settings.tokenizer or settings.anchor)
        limits = Limits(context=settings.max_context, vocab_size=vocab_size,
                        default_max_tokens=settings.default_max_tokens,
                        max_tokens=settings.max_tokens_limit, request_timeout_s=settings.request_timeout_s,
                        max_retries=settings.max_retries)
        self.anchor = anchor
        self._ready_at = -float("inf")
        streaming = anchor.options(stream=True)
        self.frontend = OpenAIFrontend(
            tokenizer, {c.name: c.name for c in settings.compositions}, limits,
            open_stream=lambda request: streaming.generate.remote(request),
            retryable=TRANSIENT, overloaded=(BackPressureError,), grammars=grammars_for(tokenizer, vocab_size),
            anchor_name=settings.anchor_name,
        )
        self.synced = Synced(registry)
        self.admin = Admin(settings, registry, anchor) if registry is not None else None
        self.runtime: list[CompositionArgs] = []  # compositions loaded at runtime, as of the last sync

    @api.api_route("/health", methods=["GET", "HEAD"], response_model=Health, responses={503: {"model": Health}})
    async def health(self):
        """Readiness: 200 once the anchor and every augmenting deployment have loaded their models and answer;
        503 (``{"status": "loading"}``) before. Load balancers and Kubernetes readiness probes use this."""
        now = time.monotonic()
        if now - self._ready_at > READY_FOR_S:  # a positive answer holds a few seconds: no round trip per probe
            response = None
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    response = self.anchor.ready.remote()
                    await response
                self._ready_at = now
            except Exception as e:  # noqa: BLE001 - not ready, for whatever reason: the probe says so
                if response is not None:
                    response.cancel()  # no probe waits on in the anchor's queue
                log.info("not ready yet: %s", public_reason(e))
                return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok"}

    @api.api_route("/health/live", methods=["GET", "HEAD"], response_model=Health)
    async def live(self) -> dict:
        """Liveness: 200 while this HTTP front answers, models loaded or not."""
        return {"status": "ok"}

    async def _sync(self, model: str | None = None) -> None:
        """The served ids: the config's compositions and those loaded at runtime (asked for now when ``model``
        is new here, else at most every ``SYNC_S`` seconds)."""
        loaded = await self.synced.changed(now=model is not None and model not in self.frontend.compositions
                                           and model != self.frontend.anchor_name)
        if loaded is not None:
            self.runtime = loaded
            self.frontend.compositions = {name: name for name in self.admin.served(loaded)}

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> dict:
        await self._sync()
        return self.frontend.models()

    # each route reads its body itself, so that pydantic-core parses it once (guard.read_body)
    @api.post("/v1/completions", response_model=Completion, responses=_ANSWERS,
              openapi_extra=request_body(CompletionBody))
    async def completions(self, request: Request):
        body = await guard.read_body(request, CompletionBody)
        await self._sync(body.model)
        return await self.frontend.completions(body)

    @api.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ANSWERS,
              openapi_extra=request_body(ChatBody))
    async def chat_completions(self, request: Request):
        body = await guard.read_body(request, ChatBody)
        await self._sync(body.model)
        return await self.frontend.chat_completions(body)

    @api.post("/v1/load_composition", response_model=CompositionStatus, responses=_ERRORS,
              openapi_extra=request_body(CompositionArgs))
    async def load_composition(self, request: Request):
        """Serve another composition over this anchor from now on (admin key; ``max_loaded_compositions``)."""
        body = await guard.read_body(request, CompositionArgs)
        await self._sync(body.name)
        answer = await self._admin().load(body, self.runtime)
        self.synced.asked_at = -float("inf")  # this replica lists it at once
        await self._sync()
        return answer

    @api.post("/v1/unload_composition", response_model=CompositionStatus, responses=_ERRORS,
              openapi_extra=request_body(UnloadBody))
    async def unload_composition(self, request: Request):
        """Stop serving a composition loaded at runtime: its running requests finish, new ones get a 404."""
        body = await guard.read_body(request, UnloadBody)
        answer = await self._admin().unload(body.name)
        self.synced.asked_at = -float("inf")
        await self._sync()
        return answer

    def _admin(self) -> Admin:
        if self.admin is None:  # the guard answers first on such a server; this is its second line
            raise ApiError(404, "loading compositions at runtime is off on this server", code="not_found")
        return self.admin


def build_app(settings: ServingArgs, deployment_options: dict[str, dict] | None = None):
    """The Serve application: Ingress -> Anchor -> Augment0..N-1.

    Args:
        settings: what to load and the request limits.
        deployment_options: per deployment name, ``Deployment.options`` overrides (num_replicas,
            autoscaling_config, max_ongoing_requests, max_queued_requests, ray_actor_options, ...),
            as in the ``deployments:`` list of a Serve config file.
    """
    options = dict(deployment_options or {})
    unknown = set(options) - set(settings.deployment_names())
    if unknown:
        raise ValueError(f"no deployment named {sorted(unknown)}; this application has {settings.deployment_names()}")
    # the validated object itself goes to every deployment (no replica parses it again); the context is
    # decided once, here
    if settings.max_context is None:
        folders = [folder for folder, _ in settings.augment_slots()]
        settings = settings.model_copy(update={"max_context": model_context([settings.anchor, *folders])})
    # the vocabulary is the anchor's (its config's vocab_size), as the engine's: one definition of a valid id
    vocab_size = text_config(settings.anchor).vocab_size

    def opts(name: str, **defaults) -> dict:
        return {"name": name, **defaults, **options.get(name, {})}

    augments = [
        AugmentDeployment.options(**opts(augment_deployment_name(i))).bind(settings, i)
        for i in range(len(settings.augment_slots()))
    ]
    registry = (CompositionRegistry.options(**opts(COMPOSITIONS)).bind(settings.max_loaded_compositions)
                if settings.max_loaded_compositions else None)
    anchor_options = opts(ANCHOR, max_ongoing_requests=settings.max_batch_size)
    anchor = AnchorDeployment.options(**anchor_options).bind(settings, registry, *augments)
    return Ingress.options(**opts(INGRESS)).bind(settings, anchor, vocab_size, registry)

"""Compositions loaded and unloaded at runtime, over the anchor a running application already serves.

    POST /v1/load_composition   {"name", "bridges": folder or s3://..., "augments": [...]}   (admin key)
    POST /v1/unload_composition {"name"}                                                      (admin key)

Off unless the application's args set ``max_loaded_compositions`` (how many may be loaded at a time) and an admin
key (``admin_key_file`` or ``$CALM_RAY_ADMIN_KEY``; user API keys are refused there: ``actors.serve.openai.guard``).

Who holds what: the ``Compositions`` deployment (one replica, ``CompositionRegistry``) holds the loaded
compositions and a version that every change raises. A load is checked before it is visible (``Admin.load``):

1. the name is new, and under the limit;
2. every augmenting model is one the application deploys (the same folder and tokenizer as a configured
   composition's): a new augmenting model needs a new deployment, so a config change;
3. an anchor replica fetches the bridges (a folder, or a URI into its node's cache), reads them, and checks their
   fingerprints against the anchor, the tokenizers and each augmenting replica's model
   (``AnchorDeployment.check_composition``); a missing or truncated file, a wrong anchor or an S3 error is
   a 400 naming it, and nothing changes.

Only then does the registry take it. Each anchor replica syncs with the registry before a request for a
composition it does not know, and at most every ``SYNC_S`` seconds otherwise: it loads what is new into its engine
(``DecodeEngine.load``, between steps) and unloads what went (``DecodeEngine.unload``: running rows finish, new
requests get a 404). Each Ingress replica refreshes its list of served ids the same way. The registry lives in
its replica's memory: the configured compositions are the ones that survive a restart of the application.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from actors.serve.config import CompositionArgs, ServingArgs
from actors.serve.openai.errors import ApiError

log = logging.getLogger("ray.serve")

SYNC_S = 1.0  # a replica asks the registry for changes at most this often (and whenever a name is new to it)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                  logging_config={"enable_access_log": False})
class CompositionRegistry:
    """The compositions loaded at runtime and a version that every change raises (one replica, in memory)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.version = 0
        self.loaded: dict[str, CompositionArgs] = {}

    async def compositions(self) -> tuple[int, list[CompositionArgs]]:
        return self.version, list(self.loaded.values())

    async def add(self, composition: CompositionArgs) -> str | None:
        """None once added; otherwise why not ("exists" or "limit")."""
        if composition.name in self.loaded:
            return "exists"
        if len(self.loaded) >= self.limit:
            return "limit"
        self.loaded[composition.name] = composition
        self.version += 1
        return None

    async def remove(self, name: str) -> bool:
        if self.loaded.pop(name, None) is None:
            return False
        self.version += 1
        return True


class Synced:
    """A replica's view of the registry: ``changed()`` returns the registry's list when it moved on since the last
    call (None otherwise), asking at most every ``SYNC_S`` seconds unless ``now``."""

    def __init__(self, registry):
        self.registry = registry
        self.version = 0
        self.asked_at = -float("inf")
        self.lock = asyncio.Lock()

    async def changed(self, now: bool = False) -> list[CompositionArgs] | None:
        if self.registry is None or (not now and time.monotonic() - self.asked_at < SYNC_S):
            return None
        async with self.lock:
            try:
                version, loaded = await self.registry.compositions.remote()
            except Exception as e:  # noqa: BLE001 - the registry is away: serve on with the last list
                log.warning("the compositions registry did not answer (%s): serving the last list", type(e).__name__)
                self.asked_at = time.monotonic()  # ask again in SYNC_S, not on every request
                return None
            self.asked_at = time.monotonic()
            if version == self.version:
                return None
            self.version = version
            return loaded


class Admin:
    """The load and unload endpoints' work, in the Ingress (``ApiError`` for every refusal)."""

    def __init__(self, settings: ServingArgs, registry, anchor):
        self.settings = settings
        self.registry = registry
        self.anchor = anchor

    def served(self, loaded: list[CompositionArgs]) -> list[str]:
        return [c.name for c in self.settings.compositions] + [c.name for c in loaded]

    async def load(self, composition: CompositionArgs, loaded: list[CompositionArgs]) -> dict:
        name = composition.name
        taken = self.served(loaded) + ([self.settings.anchor_name] if self.settings.anchor_name else [])
        if name in taken:
            raise ApiError(409, f"a model named {name!r} is served already: unload it first, or pick another name",
                           "name", code="composition_exists")
        if len(loaded) >= self.settings.max_loaded_compositions:
            raise ApiError(409, f"{len(loaded)} compositions are loaded, this server's limit "
                                f"(max_loaded_compositions: {self.settings.max_loaded_compositions}): unload one first",
                           code="composition_limit")
        composition = self.settings.resolved_composition(composition)
        slots = self.settings.augment_slots()
        for i, key in enumerate(composition.slot_keys()):
            if key not in slots:
                deployed = ", ".join(f"{folder}" + (f" (tokenizer {tok})" if tok else "") for folder, tok in slots)
                raise ApiError(400, f"augments[{i}] {key[0]!r}" + (f" with tokenizer {key[1]!r}" if key[1] else "")
                               + f" is not an augmenting model this server deploys ({deployed}): a composition "
                                 f"loaded at runtime reads a deployed one; add the composition to the config to "
                                 f"deploy a new augmenting model", f"augments[{i}]", code="augment_not_deployed")
        problem = await self.anchor.check_composition.remote(composition)
        if problem is not None:
            raise ApiError(400, f"composition {name!r} cannot be loaded: {problem}", "bridges",
                           code="composition_invalid")
        refused = await self.registry.add.remote(composition)
        if refused == "exists":  # another Ingress replica loaded the name meanwhile
            raise ApiError(409, f"a model named {name!r} is served already", "name", code="composition_exists")
        if refused == "limit":
            raise ApiError(409, f"this server's limit of {self.settings.max_loaded_compositions} loaded "
                                f"compositions is reached: unload one first", code="composition_limit")
        log.info("composition %s loaded from %s", name, composition.bridges)
        return {"object": "composition", "id": name, "parent": self.settings.anchor_name, "status": "loaded"}

    async def unload(self, name: str) -> dict:
        if name in [c.name for c in self.settings.compositions]:
            raise ApiError(400, f"{name!r} is a composition of the config, not one loaded at runtime: remove it "
                                f"from the config and redeploy", "name", code="composition_configured")
        if not await self.registry.remove.remote(name):
            raise ApiError(404, f"no composition named {name!r} was loaded at runtime", "name",
                           code="model_not_found")
        log.info("composition %s unloaded", name)
        return {"object": "composition", "id": name, "parent": self.settings.anchor_name, "status": "unloaded"}


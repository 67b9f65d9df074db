"""What every request passes on its way to the frontend: API keys, the body's size, one parse of the body into
its schema, and one catch-all that turns any unexpected exception into OpenAI's 500 JSON.

``install`` wires this into a FastAPI app (the Serve Ingress and the tests' uvicorn apps run the same code).
For each HTTP request, in order:

1. ``RequestGuard`` (plain ASGI middleware), API keys (when any are configured): ``Authorization: Bearer <key>``
   compared in constant time against every key; ``/health`` and ``/health/live`` stay open (probes); anything
   else without a valid key is a 401 ``invalid_api_key``. The admin paths (loading and unloading compositions)
   take the admin keys only, and are a 404 on a server that has none.
2. ``RequestGuard`` reads the body, never past ``max_body_bytes`` (a larger ``Content-Length`` is refused before
   reading; a chunked body is counted while it arrives): 413. The body is then replayed to the app.
3. The route reads it once (``read_body``): pydantic-core parses the bytes straight into the request's model
   (``model_validate_json``), with its parser's own limits (UTF-8, no lone surrogate, nesting up to its
   recursion limit, integers up to 4,300 digits), and number fields take finite numbers only
   (``allow_inf_nan=False`` on the models): a 400 naming the problem and the fix (``errors.body_error``).
4. An exception the app raises is answered with a 500 naming a request id (one log line; the traceback at
   debug level), and never re-raised: neither uvicorn nor Serve's replica then logs a traceback or answers its
   own plain-text 500. An ``ApiError`` raised in a route is answered as it says; 404s and 405s in OpenAI's JSON.

Plain Python + Starlette/FastAPI types; no Ray.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request

from actors.serve.config import ServingArgs
from actors.serve.openai.errors import ApiError, body_error

log = logging.getLogger("calm_ray.api")

API_KEY_ENV = "CALM_RAY_API_KEY"
ADMIN_KEY_ENV = "CALM_RAY_ADMIN_KEY"
OPEN_PATHS = frozenset({"/health", "/health/live"})  # readiness and liveness probes
ADMIN_PATHS = frozenset({"/v1/load_composition", "/v1/unload_composition"})  # admin keys only
M = TypeVar("M", bound=BaseModel)


@dataclass
class GuardSettings:
    """What ``RequestGuard`` applies: the body limit (``ServingArgs``' default until ``configure``) and the keys."""

    max_body_bytes: int = ServingArgs.model_fields["max_body_bytes"].default
    api_keys: list[bytes] = field(default_factory=list, repr=False)  # never printed
    admin_keys: list[bytes] = field(default_factory=list, repr=False)  # none: the admin paths are off


def load_api_keys(api_key_file: str | None = None, environ=os.environ, env: str = API_KEY_ENV,
                  key: str = "api_key_file") -> list[bytes]:
    """The keys from ``$CALM_RAY_API_KEY`` (comma-separated) and ``api_key_file`` (one per line, ``#`` comments);
    the admin keys with ``env=ADMIN_KEY_ENV`` and their file.

    Raises FileNotFoundError naming the file when ``api_key_file`` is given and missing, ValueError when it
    holds no key. No key at all: [] (the server is open).
    """
    keys = [k.strip() for k in environ.get(env, "").split(",") if k.strip()]
    if api_key_file:
        path = Path(api_key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{key} {str(path)!r} does not exist on this node: write the keys there (one per line, "
                f"mode 600) on every node that runs an Ingress replica, or drop {key} from the args")
        from_file = [line.strip() for line in path.read_text().splitlines()
                     if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise ValueError(f"{key} {str(path)!r} holds no key: write one key per line")
        keys += from_file
    return [k.encode() for k in dict.fromkeys(keys)]


# GuardSettings by name, per process. A Serve ingress runs a *pickled copy* of the FastAPI app (and of the
# deployment class), so an object handed to the middleware at import would not be the one the replica
# fills in at start; a name is looked up in this process's registry on every request instead.
_SETTINGS: dict[str, GuardSettings] = {}


def settings_for(name: str) -> GuardSettings:
    """The settings the ``RequestGuard`` named ``name`` applies in this process (created on first use)."""
    return _SETTINGS.setdefault(name, GuardSettings())


def configure(name: str, args: ServingArgs) -> GuardSettings:
    """Apply a server's ``args`` to the guard named ``name`` in this process: its body limit, and the API keys of
    ``args.api_key_file`` and ``$CALM_RAY_API_KEY`` (read now: a missing or empty file raises, naming it)."""
    settings = settings_for(name)
    settings.max_body_bytes = args.max_body_bytes
    settings.api_keys = load_api_keys(args.api_key_file)
    settings.admin_keys = []
    if args.max_loaded_compositions:
        settings.admin_keys = load_api_keys(args.admin_key_file, env=ADMIN_KEY_ENV, key="admin_key_file")
        if not settings.admin_keys:
            raise ValueError("max_loaded_compositions allows loading compositions at runtime, which needs an admin "
                             f"key: set admin_key_file (or ${ADMIN_KEY_ENV}) on every node that runs an Ingress")
        if set(settings.admin_keys) & set(settings.api_keys):
            raise ValueError("an admin key is also a user API key: give admins keys of their own")
    return settings


def install(app, name: str | None = None) -> GuardSettings:
    """Put the guard in front of a FastAPI app, and answer every error in OpenAI's error JSON: invalid bodies
    (400, raised by ``read_body``), oversized ones (413), missing or wrong API keys (401), unknown paths (404),
    wrong methods (405), and any unexpected exception (500 with a request id; the traceback goes to the log at
    debug level, never to the client).

    Returns the ``GuardSettings`` (body limit, API keys; 1 MiB and none at first) that the app's ``RequestGuard``
    looks up by ``name`` on every request, so a server can fill them in once it knows them: the Serve Ingress
    does so at replica start (``configure``).
    """
    name = name or f"app-{id(app):x}"
    # outside every route and handler: the guard checks keys and bodies first, and turns any exception into
    # a 500 without re-raising it (Starlette's own catch-all would re-raise, and Serve would then answer
    # its own plain-text 500)
    app.add_middleware(RequestGuard, name=name)
    app.add_exception_handler(ApiError, _answer)
    app.add_exception_handler(HTTPException, _http_error)
    return settings_for(name)


async def _answer(request, exc: ApiError):
    return exc.response()


async def _http_error(request, exc: HTTPException):
    words = {404: f"no route {request.url.path}: the API is under /v1 (GET /v1/models)",
             405: f"{request.method} is not allowed on {request.url.path}"}
    return ApiError(exc.status_code, words.get(exc.status_code, str(exc.detail)),
                    type_="invalid_request_error" if exc.status_code < 500 else None,
                    headers=exc.headers).response()  # a 405's Allow header (RFC 9110)


async def read_body(request: Request, model: type[M]) -> M:
    """The request's JSON body as ``model``, parsed and validated in one pass by pydantic-core; ApiError (400)
    naming the problem otherwise. A body without Content-Type is read as JSON (clients post it so)."""
    content_type = request.headers.get("content-type")
    if content_type and not _is_json(content_type):
        raise ApiError(400, f"the request body must be JSON sent as Content-Type: application/json, got Content-Type "
                            f"{content_type[:60]!r}")
    raw = await request.body()
    if not raw:
        raise ApiError(400, "send a JSON object as the request body")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise body_error(e, model) from None


def _is_json(content_type: str) -> bool:
    """A json or +json Content-Type (``application/json; charset=utf-8``, ``application/vnd.api+json``)."""
    subtype = content_type.split(";")[0].strip().lower().rpartition("/")[2]
    return subtype == "json" or subtype.endswith("+json")


class BodyRejected(Exception):
    def __init__(self, error: ApiError):
        self.error = error


class RequestGuard:
    """ASGI middleware: API keys, the body size limit, and the catch-all 500 (see the module docstring)."""

    def __init__(self, app, name: str):
        self.app = app
        self.name = name

    @property
    def settings(self) -> GuardSettings:
        return settings_for(self.name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = ended = False
        streaming = False

        async def tracked_send(message):
            nonlocal started, ended, streaming
            if message["type"] == "http.response.start":
                started = True
                headers = dict(message.get("headers") or [])
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            error = self._unauthorized(scope)
            if error is None:
                try:
                    receive = await self._bounded_body(scope, receive)
                except BodyRejected as e:
                    error = e.error
            if error is not None:
                return await _send_error(tracked_send, error)
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            rid = uuid.uuid4().hex[:12]
            log.error("request %s %s %s failed: %s", rid, scope.get("method"), scope.get("path"), type(exc).__name__)
            log.debug("request %s traceback", rid, exc_info=exc)
            error = ApiError(500, f"internal error (request id {rid}): the server logged it", code="internal_error")
            try:
                if not started:
                    await _send_error(send, error)
                elif not ended:  # the status is sent already: end the body (a stream with an error event)
                    tail = f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode() if streaming else b""
                    await send({"type": "http.response.body", "body": tail, "more_body": False})
            except Exception:  # noqa: BLE001 - the client is gone
                pass

    def _unauthorized(self, scope) -> ApiError | None:
        path = scope.get("path")
        admin = path in ADMIN_PATHS
        keys = self.settings.admin_keys if admin else self.settings.api_keys
        if admin and not keys:
            return ApiError(404, f"{path} is off on this server: set max_loaded_compositions and an admin key "
                                 f"(admin_key_file) in its args to load compositions at runtime",
                            type_="invalid_request_error", code="not_found")
        if not keys or path in OPEN_PATHS:
            return None
        given = b""
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
                break
        if not given:
            return ApiError(401, "no API key given: send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key")
        matched = False
        for key in keys:  # every key, so the time taken does not say which one came close
            matched |= hmac.compare_digest(given, key)
        if not matched:
            if admin:
                return ApiError(401, f"{path} takes an admin key (admin_key_file), not a user API key: send it as "
                                     f"'Authorization: Bearer <admin key>'", code="invalid_api_key")
            return ApiError(401, "the API key is not valid: send one of this server's keys as "
                                 "'Authorization: Bearer <key>'", code="invalid_api_key")
        return None

    async def _bounded_body(self, scope, receive):
        """Read the whole body, up to the limit; a ``receive`` that replays it, then passes on (disconnects)."""
        headers = dict(scope.get("headers") or [])
        limit = self.settings.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than this server accepts ({limit} bytes): shorten "
                                  f"the prompt or messages", code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise BodyRejected(ApiError(400, f"Content-Length {length[:20]!r} is not a number")) from None
            if declared > limit:
                raise BodyRejected(too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyRejected(too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: list[dict], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


async def _send_error(send, error: ApiError) -> None:
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})

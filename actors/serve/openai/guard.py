"""What every request passes before FastAPI sees it: API keys, the body's size and a strict JSON check, and
one catch-all that turns any unexpected exception into OpenAI's 500 JSON.

``RequestGuard`` is plain ASGI middleware (``errors.install`` adds it to a FastAPI app, so the Serve
Ingress and the tests' uvicorn app run the same code). For each HTTP request, in order:

1. API keys (when any are configured): ``Authorization: Bearer <key>`` compared in constant time against
   every key; ``/health`` and ``/health/live`` stay open (probes); anything else without a valid key is a
   401 ``invalid_api_key``.
2. The body is read here, never past ``max_body_bytes`` (a larger ``Content-Length`` is refused before
   reading; a chunked body is counted while it arrives): 413.
3. A body FastAPI would parse as JSON (no Content-Type, or a JSON one) must be UTF-8, nest at most
   ``max_json_depth`` levels, hold no integer longer than ``max_int_digits`` digits, no NaN/Infinity and
   no lone surrogate (``"\\ud800"``) in any string: otherwise 400, naming the problem and the fix.
4. The checked body is replayed to the app. An exception the app raises is answered with a 500 naming a
   request id (one log line; the traceback at debug level), and never re-raised: neither uvicorn nor
   Serve's replica then logs a traceback or answers its own plain-text 500.

Plain Python + Starlette types; no Ray.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from actors.serve.openai.errors import ApiError

log = logging.getLogger("calm_ray.api")

API_KEY_ENV = "CALM_RAY_API_KEY"
OPEN_PATHS = frozenset({"/health", "/health/live"})  # readiness and liveness probes
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a prompt of ~250k tokens' worth of text, far past any served context
MAX_JSON_DEPTH = 32  # a chat body nests 4 levels ({"messages": [{"content": [{"text": ...}]}]})
MAX_INT_DIGITS = 32  # 2**64 (the largest seed) has 20


@dataclass
class GuardSettings:
    """The limits and keys ``RequestGuard`` applies; the Ingress fills them in at replica start."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_json_depth: int = MAX_JSON_DEPTH
    max_int_digits: int = MAX_INT_DIGITS
    api_keys: list[bytes] = field(default_factory=list, repr=False)  # never printed


def load_api_keys(api_key_file: str | None = None, environ=os.environ) -> list[bytes]:
    """The keys from ``$CALM_RAY_API_KEY`` (comma-separated) and ``api_key_file`` (one per line, ``#`` comments).

    Raises FileNotFoundError naming the file when ``api_key_file`` is given and missing, ValueError when it
    holds no key. No key at all: [] (the server is open).
    """
    keys = [k.strip() for k in environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    if api_key_file:
        path = Path(api_key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"api_key_file {str(path)!r} does not exist on this node: write the API keys there (one per line, "
                f"mode 600) on every node that runs an Ingress replica, or drop api_key_file from the args")
        from_file = [line.strip() for line in path.read_text().splitlines()
                     if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise ValueError(f"api_key_file {str(path)!r} holds no key: write one key per line")
        keys += from_file
    return [k.encode() for k in dict.fromkeys(keys)]


# GuardSettings by name, per process. A Serve ingress runs a *pickled copy* of the FastAPI app (and of the
# deployment class), so an object handed to the middleware at import would not be the one the replica
# fills in at start; a name is looked up in this process's registry on every request instead.
_SETTINGS: dict[str, GuardSettings] = {}


def settings_for(name: str) -> GuardSettings:
    """The settings the ``RequestGuard`` named ``name`` applies in this process (created on first use)."""
    return _SETTINGS.setdefault(name, GuardSettings())


class BodyRejected(Exception):
    def __init__(self, error: ApiError):
        self.error = error


def check_json(body: bytes, settings: GuardSettings) -> None:
    """Raise BodyRejected (400) unless ``body`` is UTF-8 JSON within the depth and integer limits, with finite
    numbers only and no lone surrogate in any string or key."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyRejected(ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}): send JSON "
                                         f"encoded as UTF-8", code="invalid_encoding")) from None
    too_deep = ApiError(400, f"the request body nests more than {settings.max_json_depth} levels deep: flatten it",
                        code="json_too_deep")

    def bounded_int(digits: str) -> int:
        n = len(digits.lstrip("-"))
        if n > settings.max_int_digits:
            raise BodyRejected(ApiError(400, f"the request body holds an integer of {n} digits; at most "
                                             f"{settings.max_int_digits} are accepted: send a smaller number",
                                        code="number_too_large"))
        return int(digits)

    def finite(number: str) -> float:
        value = float(number)
        if value in (float("inf"), float("-inf")):
            raise BodyRejected(ApiError(400, f"the number {number[:30]} in the request body is too large for a "
                                             f"64-bit float: send a finite number", code="number_too_large"))
        return value

    def no_constant(name: str):
        raise BodyRejected(ApiError(400, f"the request body is not valid JSON ({name} is not a JSON number): send "
                                         f"a finite number"))

    try:  # the C parser's nesting is bounded by the recursion limit (RecursionError), never the C stack
        value = json.loads(text, parse_int=bounded_int, parse_float=finite, parse_constant=no_constant)
    except BodyRejected:
        raise
    except RecursionError:
        raise BodyRejected(too_deep) from None
    except ValueError as e:
        raise BodyRejected(ApiError(400, f"the request body is not valid JSON ({e}): send a JSON object")) from None
    depth, bad = _walk(value)
    if depth > settings.max_json_depth:
        raise BodyRejected(too_deep)
    if bad is not None:
        where = f"'{bad}'" if bad else "the request body"
        raise BodyRejected(ApiError(400, f"{where} holds a lone UTF-16 surrogate (such as \"\\ud800\"), which is "
                                         f"not valid Unicode: send well-formed text (pair each high surrogate "
                                         f"with a low one)", param=bad or None, code="invalid_unicode"))


def _walk(value) -> tuple[int, str | None]:
    """(nesting depth, dotted path of the first string or key holding a lone surrogate or None), iteratively."""
    deepest, bad = 0, None
    stack = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if bad is None and not _utf8(item):
                bad = path
            continue
        if isinstance(item, dict):
            children = list(item.items())
        elif isinstance(item, list):
            children = list(enumerate(item))
        else:
            continue
        deepest = max(deepest, depth + 1)
        for key, child in reversed(children):
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and bad is None and not _utf8(key):
                bad = path
            stack.append((child, sub, depth + 1))
    return deepest, bad


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _is_json(headers: dict[bytes, bytes]) -> bool:
    """Whether FastAPI would parse the body as JSON: no Content-Type, or a json / +json one."""
    content_type = headers.get(b"content-type")
    if not content_type:
        return True
    subtype = content_type.split(b";")[0].strip().lower().rpartition(b"/")[2]
    return subtype == b"json" or subtype.endswith(b"+json")


class RequestGuard:
    """ASGI middleware: API keys, body size and JSON checks, and the catch-all 500 (see the module docstring)."""

    def __init__(self, app, name: str):
        self.app = app
        self.name = name

    @property
    def settings(self) -> GuardSettings:
        return settings_for(self.name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("method") == "POST" and not any(k.lower() == b"content-type" for k, _ in scope["headers"]):
            # a body without Content-Type is JSON here (as it always was; FastAPI would not parse it)
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
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
                    receive = await self._checked_body(scope, receive)
                except BodyRejected as e:
                    error = e.error
            if error is not None:
                return await _send_error(tracked_send, error)
            await self.app(scope, receive, tracked_send)
        except Exception as exc:  # noqa: BLE001 - the one place an unexpected error becomes a 500
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
        keys = self.settings.api_keys
        if not keys or scope.get("path") in OPEN_PATHS:
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
            return ApiError(401, "the API key is not valid: send one of this server's keys as "
                                 "'Authorization: Bearer <key>'", code="invalid_api_key")
        return None

    async def _checked_body(self, scope, receive):
        """Read and check the whole body; a ``receive`` that replays it, then passes on (disconnects)."""
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
        body = b"".join(chunks)
        if body and _is_json(headers):
            check_json(body, self.settings)
        return _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def _replay(messages: list[dict], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


async def _send_error(send, error: ApiError) -> None:
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})

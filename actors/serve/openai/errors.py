"""Errors answered in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Every message says what is wrong and what is accepted; ``validation_message`` turns a pydantic error on a
request body into such a sentence.
"""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.responses import JSONResponse


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def of_request(self, request_id: str) -> "ApiError":
        """This error with the request's id in its message (once), so a client's report finds the log line."""
        if request_id not in self.message:
            self.message = f"{self.message} (request id {request_id})"
        return self

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {**{503: {"Retry-After": "1"}, 401: {"WWW-Authenticate": "Bearer"}}.get(self.status, {}),
                   **self.headers}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


_EXPECTED = {
    "prompt": "a non-empty string, a list holding one string, or a list of token ids",
    "stop": "a string or a list of strings",
    "messages": "a non-empty list of {\"role\": ..., \"content\": ...} objects",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
    "max_tokens": "an integer", "max_completion_tokens": "an integer", "seed": "an integer", "n": "an integer",
    "temperature": "a number", "top_p": "a number", "stream": "true or false", "model": "a string",
}
# what the field constraints of schemas.py accept, in words
_RANGES = {"temperature": "between 0 and 2", "top_p": "in (0, 1]", "max_tokens": "at least 1",
           "max_completion_tokens": "at least 1", "seed": "a 64-bit integer", "stop": "up to 4 non-empty strings"}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_long", "too_short",
           "string_too_short")
_BRANCH_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}


def validation_message(e: ValidationError | list[dict]) -> tuple[str, str | None]:
    """The first error on a request body as "'field' must be ..., got ..." (and the field's path).

    Takes a pydantic ValidationError or FastAPI's ``RequestValidationError.errors()`` (whose locations
    start with "body").
    """
    errors = e.errors() if isinstance(e, ValidationError) else e
    # a union's branches each report an error: the one about a bound says most ("stop": [""] is a list of strings)
    err = next((x for x in errors if x["type"] in _BOUNDS), errors[0])
    raw_loc = list(err["loc"])
    if raw_loc[:1] == ["body"]:
        raw_loc = raw_loc[1:]
    if err["type"] == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])}): send a JSON " \
               f"object", None
    if not raw_loc and err["type"] in ("model_attributes_type", "dict_type", "model_type"):
        return f"the request body must be a JSON object, got {type(err.get('input')).__name__}", None
    # drop union-branch labels such as 'str' or 'list[int]' from the location
    loc = [x for x in raw_loc if isinstance(x, int) or ("[" not in str(x) and str(x) not in _BRANCH_LABELS
                                                       and not str(x).startswith("constrained-"))]
    path = ".".join(str(x) for x in loc) or None
    name = next((str(x) for x in reversed(loc) if isinstance(x, str)), None)
    if err["type"] == "extra_forbidden":
        return (f"'{path}' is not a parameter this server supports, and it may change the answer, so it is "
                f"refused rather than ignored: remove it (docs/serving.md lists the parameters)", path)
    if err["type"] == "missing":
        return (f"'{path}' is required", path) if path else ("send a JSON object as the request body", None)
    got = err.get("input")
    shown = json.dumps(got)[:60] if _jsonable(got) else type(got).__name__
    if err["type"] in _BOUNDS and name in _RANGES:
        return f"'{name}' must be {_RANGES[name]}, got {shown}", name
    expected = _EXPECTED.get(name or "")
    if expected and not err["type"].startswith(("too_short", "literal")):
        return f"'{path}' must be {expected}, got {shown}", path
    return f"'{path}': {err['msg']}, got {shown}", path


def _jsonable(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


class DeadlineExceeded(Exception):
    """The request ran past the server's request timeout."""


def install(app, name: str | None = None):
    """Answer every error of a FastAPI app in OpenAI's error JSON: invalid bodies (400), oversized ones (413),
    missing or wrong API keys (401), unknown paths (404), wrong methods (405), and any unexpected exception
    (500 with a request id; the traceback goes to the log at debug level, never to the client).

    Returns the ``guard.GuardSettings`` (body limits, API keys; 1 MiB and none at first) that the app's
    ``RequestGuard`` looks up by ``name`` on every request, so a server can fill them in once it knows them:
    the Serve Ingress does so at replica start, through ``guard.settings_for(name)``.
    """
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from actors.serve.openai.guard import RequestGuard, settings_for

    name = name or f"app-{id(app):x}"
    # outside every route and handler: the guard checks keys and bodies first, and turns any exception into
    # a 500 without re-raising it (Starlette's own catch-all would re-raise, and Serve would then answer
    # its own plain-text 500)
    app.add_middleware(RequestGuard, name=name)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return ApiError(400, message, param).response()

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        words = {404: f"no route {request.url.path}: the API is under /v1 (GET /v1/models)",
                 405: f"{request.method} is not allowed on {request.url.path}"}
        return ApiError(exc.status_code, words.get(exc.status_code, str(exc.detail)),
                        type_="invalid_request_error" if exc.status_code < 500 else None,
                        headers=exc.headers).response()  # a 405's Allow header (RFC 9110)

    return settings_for(name)

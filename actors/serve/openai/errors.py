"""Errors answered in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Every message says what is wrong and what is accepted; ``body_error`` turns pydantic-core's verdict on a request
body (its JSON parser's, or the schema's through ``actors.config.describe_error``) into such an error.
"""

from __future__ import annotations

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse

from actors.config import describe_error, error_key


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def of_request(self, request_id: str) -> ApiError:
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


_SURROGATE = ("invalid_unicode",
              'the request body holds a lone UTF-16 surrogate (such as "\\ud800"), which is not valid Unicode',
              "send well-formed text (pair each high surrogate with a low one)")
# what pydantic-core's JSON parser says (the start of its message) -> (error code, the problem, the fix)
_UNREADABLE = {
    "recursion limit exceeded": ("json_too_deep", "the request body nests too deep", "flatten it"),
    "number out of range": ("number_too_large", "the request body holds a number too large to read",
                            "send a smaller number"),
    "invalid unicode code point": ("invalid_encoding", "the request body is not valid UTF-8",
                                   "send JSON encoded as UTF-8"),
    "lone leading surrogate": _SURROGATE,
    "unexpected end of hex escape": _SURROGATE,  # a high surrogate without its low one
}


def body_error(error: ValidationError, model: type[BaseModel]) -> ApiError:
    """The first problem pydantic-core found in a request body for ``model``, as a 400 naming it and the fix:
    where the JSON cannot be read (line and column), or the key (``param``) and what it accepts."""
    err = error.errors()[0]
    if err["type"] == "json_invalid":
        detail = err.get("ctx", {}).get("error", err["msg"])
        code, problem, fix = next((v for k, v in _UNREADABLE.items() if detail.startswith(k)),
                                  (None, "the request body is not valid JSON", "send a JSON object"))
        return ApiError(400, f"{problem} ({detail}): {fix}", code=code)
    if not err["loc"]:
        return ApiError(400, f"the request body must be a JSON object, got {type(err['input']).__name__}")
    key = error_key(err, model)
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"'{key}' is not a parameter this server supports, and it may change the answer, so it "
                             f"is refused rather than ignored: remove it (docs/serving.md lists the parameters)", key)
    return ApiError(400, describe_error(err, model), key)


class DeadlineExceeded(Exception):
    """The request ran past the server's request timeout."""

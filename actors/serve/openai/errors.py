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
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


_EXPECTED = {
    "prompt": "a non-empty string, a list holding one string, or a list of token ids",
    "stop": "a string or a list of strings",
    "messages": "a non-empty list of {\"role\": ..., \"content\": ...} objects",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
    "max_tokens": "an integer", "max_completion_tokens": "an integer", "seed": "an integer", "n": "an integer",
    "temperature": "a number", "top_p": "a number", "stream": "true or false", "model": "a string",
}
_BRANCH_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The first pydantic error as "'field' must be ..., got ..." (and the field's path)."""
    err = e.errors()[0]
    # drop union-branch labels such as 'str' or 'list[int]' from the location
    loc = [x for x in err["loc"] if isinstance(x, int) or ("[" not in str(x) and str(x) not in _BRANCH_LABELS)]
    path = ".".join(str(x) for x in loc) or None
    name = next((str(x) for x in reversed(loc) if isinstance(x, str)), None)
    if err["type"] == "missing":
        return f"'{path}' is required", path
    got = err.get("input")
    shown = json.dumps(got)[:60] if _jsonable(got) else type(got).__name__
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

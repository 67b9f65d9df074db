"""Structured outputs: ``response_format`` and ``tools`` -> the grammar the output must match, and the answer's shape.

    response_format {"type": "json_object"}                    any JSON object
    response_format {"type": "json_schema", "json_schema": ...}  JSON valid against its ``schema``
    tools + tool_choice {"type": "function", "function": {name}}  that function's arguments, valid against its
                                                                 ``parameters``: answered as a call of it
    tools + tool_choice "required"                             ``{"name": <an offered function>, "arguments":
                                                                 <valid for it>}``: answered as that call
    tool_choice "none"                                         plain text (the tools are not shown to the model)
    tool_choice "auto" (the default with tools)                a 400: choosing between text and a call needs the
                                                                 chat template's tool format and a parser for it

The grammar is llguidance's (``actors.serve.grammar``), checked before any work: a keyword it cannot enforce,
a bad reference, a schema past the size or nesting limits (here), or one slower to compile than the server
allows (``compile_structured``, on the grammar engine's compile thread) is a 400 naming it. The engine masks
each constrained row's logits with it (``DecodeEngine._sample``). ``ToolCallText`` turns the constrained text
into OpenAI's ``tool_calls``, streamed or whole, from the same pieces.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from actors.serve.grammar import GrammarError, Grammars, json_grammar
from actors.serve.openai.errors import ApiError

MAX_SCHEMA_BYTES = 32_768  # a request's schemas together (response_format's, or every tool's parameters), compact JSON
MAX_SCHEMA_DEPTH = 32  # how deeply JSON containers nest in one schema
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # a function without parameters
_CALL_HEAD = re.compile(r'\{"name": "([a-zA-Z0-9_-]{1,64})", "arguments": ')  # JSON_OPTIONS' separators


@dataclass(frozen=True)
class Structured:
    """What a request's output must be, and how it is answered.

    Attributes:
        grammar: the llguidance grammar of the output (checked).
        tool_call: the answer is a tool call (``message.tool_calls``), not content.
        function: with ``tool_call``, the one function called (a named ``tool_choice``): the output is its
            arguments; None: the output is ``{"name", "arguments"}`` (``tool_choice: "required"``).
        param: the request field the grammar comes from (named in errors).
    """

    grammar: str
    tool_call: bool = False
    function: str | None = None
    param: str = "response_format"


def structured_output(req, kind: str, grammars: Grammars | None) -> Structured | None:
    """The request's structured output, or None for free text; ApiError (400) for what this server refuses
    before compiling (``compile_structured`` then refuses what llguidance cannot enforce)."""
    schema, param = None, "response_format"
    if req.response_format is not None and req.response_format.type != "text":
        if req.response_format.type == "json_object":
            schema = {"type": "object"}
        else:
            spec = req.response_format.json_schema
            if spec is None:
                raise ApiError(400, 'response_format {"type": "json_schema"} needs a "json_schema" object: '
                                    '{"name": ..., "schema": {...}}', "response_format")
            schema = {} if spec.schema_ is None else spec.schema_  # no schema: any JSON value
            param = "response_format.json_schema.schema"
    tool = _tool_choice(req) if kind == "chat" else None
    if tool is not None and schema is not None:
        raise ApiError(400, "response_format and a forced tool call cannot be combined: the answer is either "
                            "content in the format or a call", "response_format")
    if schema is None and tool is None:
        return None
    if grammars is None:
        raise ApiError(400, "this server was started without constrained decoding (llguidance is not installed): "
                            "leave out response_format and tools", param if tool is None else "tools")
    if tool is not None:
        functions = {t.function.name: t.function.parameters for t in req.tools}
        if tool != "required":
            schema, param = _parameters(functions[tool]), "tools"
        else:
            schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": name},
                                                                  "arguments": _parameters(parameters)},
                                 "required": ["name", "arguments"], "additionalProperties": False}
                                for name, parameters in functions.items()]}
            param = "tools"
        if req.stop:
            raise ApiError(400, "stop cannot be combined with a forced tool call: the call ends where its JSON "
                                "does", "stop")
    _check_size(schema, param)  # the whole schema: every offered function's parameters together for "required"
    try:
        grammar = json_grammar(schema)  # llguidance's verdict on the keywords comes with its compile (below)
    except GrammarError as e:
        raise ApiError(400, f"{param}: the schema cannot be enforced: {e}", param) from None
    if tool is None:
        return Structured(grammar, param=param)
    return Structured(grammar, tool_call=True, function=None if tool == "required" else tool, param=param)


async def compile_structured(structured: Structured, grammars: Grammars) -> None:
    """Compile the grammar on the grammar engine's compile thread, in this process (the anchor replica compiles
    its own copy, against the same limit): ApiError (400) naming what llguidance refuses (a keyword it cannot
    enforce, a bad reference) or a compile slower than the server allows. Refusals are cached."""
    try:
        await grammars.compile_async(structured.grammar)
    except GrammarError as e:
        raise ApiError(400, f"{structured.param}: the schema cannot be enforced: {e}", structured.param) from None


def _tool_choice(req) -> str | None:
    """None (plain text), "required", or the name of the one function to call."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools: offer the functions in tools", "tool_choice")
        return None
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise ApiError(400, f"tools name a function twice: {sorted({n for n in names if names.count(n) > 1})}",
                       "tools")
    if choice == "none":
        return None
    if choice is None or choice == "auto":
        raise ApiError(400, 'tool_choice "auto" (the default when tools are given) is not supported: this '
                            "model's chat template has no tool format this server parses. Send tool_choice "
                            '"required", or {"type": "function", "function": {"name": ...}} to call one '
                            'function, or "none"', "tool_choice")
    if choice == "required":
        return "required"
    if choice.function.name not in names:
        raise ApiError(400, f"tool_choice names the function {choice.function.name!r}, which tools do not offer "
                            f"(offered: {names[:10]})", "tool_choice")
    return choice.function.name


def _parameters(parameters: dict | None) -> dict:
    return NO_PARAMETERS if parameters is None else parameters


def _check_size(schema, param: str) -> None:
    size = len(json.dumps(schema, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    if size > MAX_SCHEMA_BYTES:
        raise ApiError(400, f"{param}: the schema is {size:,} bytes; this server takes up to {MAX_SCHEMA_BYTES:,}",
                       param)
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise ApiError(400, f"{param}: the schema nests {depth} levels deep; this server takes up to "
                            f"{MAX_SCHEMA_DEPTH}", param)


def _depth(value) -> int:
    """How deeply JSON containers nest in ``value`` (a scalar: 0)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo += [(child, depth + 1) for child in children]
    return deepest


class ToolCallText:
    """A choice's constrained text -> its tool call, in the order OpenAI streams one: the call's id and name
    once known, then its arguments text in pieces. The whole answer joins the same pieces, so a streamed call and
    an unstreamed one are equal.

    Args:
        function: the named function (the text is its arguments), or None (the text is ``{"name", "arguments"}``:
            the arguments start after the name, and the text's final ``}`` closes the wrapper, not them).
    """

    def __init__(self, function: str | None):
        self.function = function
        self.name = function
        self.id = f"call_{uuid.uuid4().hex[:24]}"
        self.text = ""
        self.start = 0 if function is not None else None  # where the arguments start in the text
        self.sent = 0  # characters of the arguments handed out
        self.opened = False

    @property
    def arguments(self) -> str:
        return self.text[self.start:] if self.start is not None else ""

    def add(self, delta: str) -> list[dict]:
        """OpenAI tool-call deltas (``{"index", "id", "type", "function": {"name", "arguments"}}`` on the first,
        ``{"index", "function": {"arguments"}}`` after) for the new text; the last character is held back
        where it may be the wrapper's closing brace."""
        self.text += delta
        return self._flush(hold=0 if self.function is not None else 1)

    def finish(self, complete: bool) -> list[dict]:
        """The remaining deltas; ``complete``: the grammar finished (the wrapper's closing brace is dropped)."""
        if complete and self.function is None and self.start is not None:
            self.text = self.text.removesuffix("}")
        return self._flush(hold=0)

    def _flush(self, hold: int) -> list[dict]:
        if self.start is None:
            head = _CALL_HEAD.match(self.text)
            if head is None:
                return []
            self.name, self.start = head.group(1), head.end()
        out = []
        end = max(self.sent, len(self.arguments) - hold)
        if not self.opened:
            self.opened = True
            out.append({"index": 0, "id": self.id, "type": "function",
                        "function": {"name": self.name, "arguments": self.arguments[self.sent:end]}})
        elif end > self.sent:
            out.append({"index": 0, "function": {"arguments": self.arguments[self.sent:end]}})
        self.sent = end
        return out

    def call(self) -> dict | None:
        """The whole call ``{"id", "type", "function": {"name", "arguments"}}``, or None when the text ended
        before the function's name did."""
        if self.name is None or self.start is None:
            return None
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

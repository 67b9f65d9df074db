"""The OpenAI endpoints' request and response bodies as pydantic models: what ``/openapi.json`` describes.

Requests carry their constraints on the fields, and a union field says in ``description=`` what it accepts:
pydantic-core parses and validates a body in one pass (``guard.read_body``), and ``errors.body_error`` answers
a violation with OpenAI's error JSON naming the field and what it accepts, read from these declarations.
Responses are models of the same JSON that OpenAI sends, dumped as they are.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API (its completions API allows 5; vLLM 20)
MAX_N = 128  # the schema's bound; a server decodes at most its max_batch_size rows of one request
MAX_TOOLS = 128  # as OpenAI
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and json_schema names
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
StopString = Annotated[str, Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Bias = Annotated[float, Field(ge=-100, le=100)]


class _Body(BaseModel):
    # strict: "5" is not an int and true is not a number; a number field takes finite numbers only (NaN,
    # Infinity and 1e999, which pydantic-core's JSON parser reads as inf, are refused)
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class _RequestBody(_Body):
    # a request's top level: a field this server does not know is refused (400 naming it), never ignored, since
    # it might change the answer (top_k, min_p, guided_json, ...); the harmless ones are declared below
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_RequestBody):  # a misspelt "schema" would mean "any JSON": refused, never ignored
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict | bool | None = Field(None, alias="schema")  # a JSON Schema; absent: any JSON value
    strict: bool | None = None  # the output always matches the schema here (a keyword that cannot be enforced: 400)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_RequestBody):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema of the arguments object; absent: no arguments ({})
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class _Sampling(_RequestBody):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy; any value above 0 samples (no NaN, no inf)
    top_p: float | None = Field(None, gt=0, le=1)
    # one string of any length, or a list of up to 4 (the bound is the list's, not the string's)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description=f"a non-empty string or a list of up to {MAX_STOP_SEQUENCES} non-empty strings")
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    logit_bias: dict[str, Bias] | None = None  # token id (a decimal string, as JSON keys are) -> added to its logit
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    # accepted, and they change nothing: who asks (OpenAI's abuse tracking), storing the answer, tags
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None


class CompletionBody(_Sampling):
    # lm-evaluation-harness sends a batch of one tokenised prompt: [[ids]]
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a non-empty string, a list holding one string, or a list of token ids")
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        None, description='a string or a list of {"type": "text", "text": ...} parts')

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(
        min_length=1, description='a non-empty list of {"role": ..., "content": ...} objects')
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
    parallel_tool_calls: bool | None = None  # a forced call is one call (docs/serving.md)


def request_body(model: type[BaseModel]) -> dict:
    """The ``openapi_extra`` of a route that reads ``model`` from the raw body itself (``guard.read_body``): FastAPI
    declares only the bodies it parses. Its schema goes into the spec's components (``body_schemas``)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"content": {"application/json": {"schema": schema}}, "required": True}}


def body_schemas(*models: type[BaseModel]) -> dict[str, dict]:
    """The JSON schemas of ``models`` and of the models they nest, by name, as FastAPI writes components."""
    _, schema = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    return schema.get("$defs", {})


# ---------------------------------------------------------------------- responses (OpenAI's JSON)
FinishReason = Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token: its text, its logprob (None for a prompt's first token), the most likely tokens' (text ->
    logprob), its offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """``POST /v1/completions`` (and each streamed chunk, ``usage`` only on the last when asked for)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    """``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed ``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "calm-ray"
    max_model_len: int
    parent: str | None = None  # a composition's anchor, when the bare anchor is served too (as vLLM's adapters')


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UnloadBody(_RequestBody):
    """POST /v1/unload_composition (the load's body is a config entry: ``actors.serve.config.CompositionArgs``)."""

    name: str


class CompositionStatus(BaseModel):
    """The answer to a load or unload of a composition at runtime."""

    object: Literal["composition"] = "composition"
    id: str
    parent: str | None = None  # the bare anchor's id, when it is served
    status: Literal["loaded", "unloaded"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error the server answers (4xx and 5xx)."""

    error: ErrorDetail


class Health(BaseModel):
    """The health probes' answer: ``ok``, or ``loading`` (readiness, with a 503) while a model still loads."""

    status: Literal["ok", "loading"]

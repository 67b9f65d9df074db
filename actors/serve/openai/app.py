"""The OpenAI-shaped HTTP protocol: the endpoints, request preparation, responses, server-sent events.

``OpenAIFrontend`` turns an HTTP request into token ids, runs them through a token stream (a
Serve handle to the anchor deployment, or a local DecodeEngine), and answers in OpenAI's formats:

    POST /v1/completions       {"prompt": "...", "max_tokens": 16, "stream": false, ...}
    POST /v1/chat/completions  {"messages": [{"role": "user", "content": "..."}], ...}
    GET  /v1/models, GET /health

Every bad input gets a 4xx with ``{"error": {"message", "type", "param", "code"}}``: the message
says what is wrong and what is accepted. Streaming answers are ``data: {chunk}\\n\\n`` events
ending with ``data: [DONE]``. Stop strings and detokenisation happen here; the engine only sees
token ids. Plain Python + FastAPI/Starlette types; no Ray (the deployment wraps it). Beside this file:
``schemas`` (request bodies), ``errors`` (OpenAI's error JSON), ``detokenize`` (text deltas and stop
strings), ``resume`` (timeouts, resuming after a replica died).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from starlette.responses import JSONResponse, Response, StreamingResponse

from actors.serve.engine import GenerationRequest
from actors.serve.openai.detokenize import TextAssembler  # noqa: F401  (part of this module's API)
from actors.serve.openai.errors import ApiError
from actors.serve.openai.resume import token_pieces
from actors.serve.openai.schemas import (
    AssistantMessage,
    ChatBody,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionBody,
    CompletionChoice,
    ModelCard,
    ModelList,
    Usage,
)


# ---------------------------------------------------------------------- the frontend
@dataclass
class Limits:
    context: int  # longest prompt + completion, in tokens
    default_max_tokens: int = 256
    max_tokens: int | None = None  # largest max_tokens a request may ask for (None: the context)
    request_timeout_s: float = 120.0
    max_retries: int = 2  # resumes after the anchor replica serving a request died


@dataclass
class _Prepared:
    kind: Literal["completion", "chat"]
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    stream: bool
    include_usage: bool


class OpenAIFrontend:
    """Validates OpenAI requests, runs them through ``open_stream`` and formats the answers.

    Args:
        tokenizer: a Hugging Face tokenizer (its chat template serves /v1/chat/completions).
        model_name: the one model id served (``model`` in requests must match when given).
        limits: context and max_tokens limits, timeout, retries.
        open_stream: ``GenerationRequest -> async iterator of {"token_ids", "finish_reason"}`` (the
            engine's own request type, the one shape a request has from here to the engine).
        retryable: exceptions meaning "the replica serving the request died": the request is
            resumed (prompt + tokens so far) on another replica, up to ``limits.max_retries`` times.
        overloaded: exceptions meaning "queue full": answered 503.
    """

    def __init__(self, tokenizer, model_name: str, limits: Limits,
                 open_stream: Callable[[GenerationRequest], AsyncIterator[dict]],
                 retryable: tuple[type[BaseException], ...] = (), overloaded: tuple[type[BaseException], ...] = ()):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.limits = limits
        self.open_stream = open_stream
        self.retryable = retryable
        self.overloaded = overloaded
        self.created = int(time.time())
        eos = tokenizer.eos_token_id
        self.eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.counters = {"retries": 0, "timeouts": 0}

    # ------------------------------------------------------------------ endpoints
    def models(self) -> dict:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.limits.context)
        return ModelList(data=[card]).model_dump()

    async def completions(self, body: CompletionBody) -> Response:
        """``body`` is validated already (FastAPI, against the field constraints of schemas.py)."""
        return await self._handle(body, "completion")

    async def chat_completions(self, body: ChatBody) -> Response:
        return await self._handle(body, "chat")

    async def _handle(self, body: CompletionBody | ChatBody, kind: str) -> Response:
        try:
            prepared = self._prepare(body, kind)
        except ApiError as e:
            return e.response()
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        pieces = token_pieces(self, prepared, rid)
        try:
            first = await pieces.__anext__()  # errors before the first token still get a real status code
        except ApiError as e:
            await pieces.aclose()
            return e.response()
        except StopAsyncIteration:
            return ApiError(500, "the model produced no output").response()
        if prepared.stream:
            return StreamingResponse(self._sse(prepared, rid, first, pieces), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, finish, completion_tokens = first
        try:
            async for delta, f, n in pieces:
                text += delta
                finish, completion_tokens = f or finish, n
        except ApiError as e:
            return e.response()
        return JSONResponse(self._full_response(prepared, rid, text, finish, completion_tokens))

    # ------------------------------------------------------------------ what the field constraints cannot say
    def _prepare(self, req: CompletionBody | ChatBody, kind: str) -> _Prepared:
        """Checks that need the model (its name, context, vocabulary, chat template) or refuse a feature."""
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"the model '{req.model}' does not exist: this server serves '{self.model_name}' "
                                f"(GET /v1/models)", param="model", type_="invalid_request_error",
                           code="model_not_found")
        if req.n not in (None, 1):
            raise ApiError(400, f"n={req.n} is not supported: this server returns one choice per request", "n")
        if kind == "completion":
            if req.echo:
                raise ApiError(400, "echo is not supported", "echo")
            if req.logprobs:
                raise ApiError(400, "logprobs are not supported", "logprobs")
            if req.suffix:
                raise ApiError(400, "suffix is not supported", "suffix")
            if req.best_of not in (None, 1):
                raise ApiError(400, "best_of is not supported", "best_of")
            prompt_ids = self._completion_prompt(req.prompt)
            max_tokens = req.max_tokens
        else:
            if req.logprobs:
                raise ApiError(400, "logprobs are not supported", "logprobs")
            prompt_ids = self._chat_prompt(req.messages)
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        context = self.limits.context
        if len(prompt_ids) >= context:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens long but the model's context is {context} "
                                f"tokens (prompt and completion together): shorten the prompt", "prompt",
                           code="context_length_exceeded")
        param = "max_completion_tokens" if kind == "chat" and req.max_completion_tokens is not None else "max_tokens"
        limit = min(self.limits.max_tokens or context, context)
        if max_tokens is None:
            max_tokens = min(self.limits.default_max_tokens, limit, context - len(prompt_ids))
        elif max_tokens > limit:
            raise ApiError(400, f"{param}={max_tokens} is more than this server allows ({limit})", param)
        elif len(prompt_ids) + max_tokens > context:
            raise ApiError(400, f"the model's context is {context} tokens, but the prompt ({len(prompt_ids)} tokens) "
                                f"plus {param} ({max_tokens}) needs {len(prompt_ids) + max_tokens}: lower {param}",
                           param, code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        return _Prepared(kind, prompt_ids, max_tokens, temperature, top_p, req.seed, stop, req.ignore_eos,
                         req.stream, bool(req.stream_options and req.stream_options.include_usage))

    def _completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt holds {len(prompt)} strings: send one prompt per request", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "the prompt is empty: send at least one character", "prompt")
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt")
        return ids

    def _chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"the model '{self.model_name}' has no chat template, so it cannot take chat "
                                f"messages: use POST /v1/completions with a plain prompt", "messages",
                           code="chat_template_missing")
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        if not any(t["content"] for t in turns):
            raise ApiError(400, "every message is empty: send some content", "messages")
        try:
            text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - templates raise their own errors (e.g. role order)
            raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ generation
    def _usage(self, p: _Prepared, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=len(p.prompt_ids), completion_tokens=completion_tokens,
                     total_tokens=len(p.prompt_ids) + completion_tokens)

    def _full_response(self, p: _Prepared, rid: str, text: str, finish: str, completion_tokens: int) -> dict:
        head = dict(id=rid, created=int(time.time()), model=self.model_name, usage=self._usage(p, completion_tokens))
        if p.kind == "completion":
            return Completion(**head, choices=[CompletionChoice(text=text, finish_reason=finish)]).model_dump()
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)
        return ChatCompletion(**head, choices=[choice]).model_dump()

    def _chunk(self, p: _Prepared, rid: str, created: int, delta: str | None, finish: str | None,
               first: bool = False, usage: Usage | None = None) -> dict:
        """One streamed event; with ``usage`` the closing usage event (no choices)."""
        head = dict(id=rid, created=created, model=self.model_name, usage=usage)
        if p.kind == "completion":
            choices = [] if usage else [CompletionChoice(text=delta or "", finish_reason=finish)]
            chunk = Completion(**head, choices=choices).model_dump(exclude_none=False)
        else:
            d = ChatDelta(role="assistant" if first else None, content=(delta or "") if (delta or first) else None)
            choices = [] if usage else [ChatChunkChoice(delta=d, finish_reason=finish)]
            chunk = ChatCompletionChunk(**head, choices=choices).model_dump()
            for choice in chunk["choices"]:  # OpenAI sends only the fields a delta has
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if usage is None:
            chunk.pop("usage")
        return chunk

    async def _sse(self, p: _Prepared, rid: str, first, pieces) -> AsyncIterator[str]:
        created = int(time.time())
        completion_tokens = 0

        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            delta, finish, completion_tokens = first
            if p.kind == "chat":  # OpenAI opens a chat stream with the assistant role
                yield event(self._chunk(p, rid, created, "", None, first=True))
            if delta:
                yield event(self._chunk(p, rid, created, delta, None))
            if finish is None:
                async for delta, finish, completion_tokens in pieces:
                    if delta:
                        yield event(self._chunk(p, rid, created, delta, None))
                    if finish is not None:
                        break
            yield event(self._chunk(p, rid, created, None, finish))
            if p.include_usage:
                yield event(self._chunk(p, rid, created, None, None, usage=self._usage(p, completion_tokens)))
        except ApiError as e:
            yield event(e.body())
        finally:
            await pieces.aclose()  # a client that went away cancels the generation here
        yield "data: [DONE]\n\n"

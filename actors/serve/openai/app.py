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
strings), ``resume`` (timeouts, resuming after a replica died), ``structured`` (``response_format`` and
``tools``: the grammar and the tool-call answer).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

from starlette.responses import JSONResponse, Response, StreamingResponse

from actors.serve.engine import GenerationRequest
from actors.serve.openai.detokenize import TextAssembler  # noqa: F401  (part of this module's API)
from actors.serve.openai.errors import ApiError
from actors.serve.openai.resume import Piece, token_pieces
from actors.serve.openai.schemas import (
    AssistantMessage,
    ChatBody,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    Completion,
    CompletionBody,
    CompletionChoice,
    CompletionLogprobs,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from actors.serve.openai.structured import Structured, ToolCallText, compile_structured, structured_output
from composition.model import DEFAULT


# ---------------------------------------------------------------------- the frontend
@dataclass
class Limits:
    context: int  # longest prompt + completion, in tokens
    vocab_size: int  # token ids are 0..vocab_size-1: the anchor model's vocabulary (its config), as the engine's
    default_max_tokens: int = 256
    max_tokens: int | None = None  # largest max_tokens a request may ask for (None: the context)
    request_timeout_s: float = 120.0
    max_retries: int = 2  # resumes after the anchor replica serving a request died


@dataclass
class _Prepared:
    """A validated request: what the engine runs (``generation``, the one shape a request has from here to the
    engine) and what only the HTTP answer needs."""

    kind: Literal["completion", "chat"]
    model: str  # the served id it asked for (the composition's, or the bare anchor's): the answers' "model"
    generation: GenerationRequest
    stop: list[str]
    stream: bool
    include_usage: bool
    echo: bool = False  # completions: the answer's text (and logprobs) start with the prompt's
    prompt_text: str = ""  # completions with echo or logprobs: the prompt's text (echoed; text offsets start after)
    structured: Structured | None = None  # response_format / tools: the output's grammar and the answer's shape

    @property
    def tool_call(self) -> bool:
        return self.structured is not None and self.structured.tool_call

    def tool_text(self) -> ToolCallText:
        return ToolCallText(self.structured.function)

    @property
    def prompt_ids(self) -> list[int]:
        return self.generation.prompt_ids

    @property
    def n(self) -> int:
        return self.generation.n

    @property
    def logprobs(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k most likely tokens'."""
        return self.generation.logprobs


@dataclass
class _Choice:
    """One choice of a whole (not streamed) answer, assembled from its pieces."""

    text: str = ""
    finish: str | None = None
    tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list | None = None

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.finish = piece.finish or self.finish
        self.tokens = piece.completion_tokens
        self.logprobs += piece.logprobs or []
        if piece.prompt_logprobs is not None:
            self.prompt_logprobs = piece.prompt_logprobs


class OpenAIFrontend:
    """Validates OpenAI requests, runs them through ``open_stream`` and formats the answers.

    Args:
        tokenizer: a Hugging Face tokenizer (its chat template serves /v1/chat/completions).
        model_name: the served compositions: their ids (a request's ``model``) -> the engine's composition names
            (``ComposedModel.compositions``); the first answers a request without ``model``. One id alone: the
            engine's model's one composition (``DEFAULT``).
        anchor_name: the bare anchor's id (its rows feed no augmenting model: no bridge adds anything); None:
            the bare anchor is not served.
        limits: context and max_tokens limits, timeout, retries.
        open_stream: ``GenerationRequest -> async iterator of {"token_ids", "finish_reason"}`` (the
            engine's own request type, the one shape a request has from here to the engine).
        grammars: the anchor tokenizer's grammar engine (``actors.serve.grammar.Grammars``), which checks
            ``response_format`` and ``tools`` before any work; None refuses them with a 400.
        retryable: exceptions meaning "the replica serving the request died": the request is
            resumed (prompt + tokens so far) on another replica, up to ``limits.max_retries`` times.
        overloaded: exceptions meaning "queue full": answered 503.
    """

    def __init__(self, tokenizer, model_name: str | dict[str, str], limits: Limits,
                 open_stream: Callable[[GenerationRequest], AsyncIterator[dict]],
                 retryable: tuple[type[BaseException], ...] = (), overloaded: tuple[type[BaseException], ...] = (),
                 grammars=None, anchor_name: str | None = None):
        self.tokenizer = tokenizer
        self.anchor_name = anchor_name
        self.grammars = grammars
        self.compositions = {model_name: DEFAULT} if isinstance(model_name, str) else dict(model_name)
        if not self.compositions or anchor_name in self.compositions:
            raise ValueError(f"serve at least one composition, each under an id other than the anchor's "
                             f"({anchor_name!r}): got {list(self.compositions)}")
        self.model_name = next(iter(self.compositions))  # the default
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
        cards = [ModelCard(id=name, created=self.created, max_model_len=self.limits.context, parent=self.anchor_name)
                 for name in self.compositions]
        if self.anchor_name is not None:
            cards.append(ModelCard(id=self.anchor_name, created=self.created, max_model_len=self.limits.context))
        return ModelList(data=cards).model_dump()

    async def completions(self, body: CompletionBody) -> Response:
        """``body`` is validated already (``guard.read_body``: pydantic-core, against the schemas of schemas.py)."""
        return await self._handle(body, "completion")

    async def chat_completions(self, body: ChatBody) -> Response:
        return await self._handle(body, "chat")

    async def _handle(self, body: CompletionBody | ChatBody, kind: str) -> Response:
        try:
            prepared = self._prepare(body, kind)
            if prepared.structured is not None:
                await compile_structured(prepared.structured, self.grammars)
        except ApiError as e:
            return e.response()
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        pieces = token_pieces(self, prepared, rid)
        try:
            first = await pieces.__anext__()  # errors before the first token still get a real status code
        except ApiError as e:
            await pieces.aclose()
            return e.of_request(rid).response()
        except StopAsyncIteration:
            return ApiError(500, "the model produced no output").of_request(rid).response()
        if prepared.stream:
            return StreamingResponse(self._sse(prepared, rid, first, pieces), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        choices = [_Choice() for _ in range(prepared.n)]
        choices[first.index].add(first)
        try:
            async for piece in pieces:
                choices[piece.index].add(piece)
        except ApiError as e:
            return e.of_request(rid).response()
        return JSONResponse(self._full_response(prepared, rid, choices))

    # ------------------------------------------------------------------ what the field constraints cannot say
    def _prepare(self, req: CompletionBody | ChatBody, kind: str) -> _Prepared:
        """Checks that need the model (its name, context, vocabulary, chat template) or refuse a feature."""
        served = [*self.compositions] + ([self.anchor_name] if self.anchor_name is not None else [])
        if req.model is not None and req.model not in served:
            names = [repr(m) for m in served]
            listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
            raise ApiError(404, f"the model '{req.model}' does not exist: this server serves {listed} "
                                f"(GET /v1/models)", param="model",
                           type_="invalid_request_error", code="model_not_found")
        model = req.model or self.model_name
        _refuse_unsupported(req, kind)
        structured = structured_output(req, kind, self.grammars)
        if kind == "completion":
            prompt_ids = self._completion_prompt(req.prompt)
            max_tokens = req.max_tokens
            logprobs = req.logprobs
        else:
            calls = structured is not None and structured.tool_call  # the template shows the tools it may call
            prompt_ids = self._chat_prompt(req.messages, [t.model_dump(exclude_none=True) for t in req.tools]
                                           if calls else None)
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            if req.top_logprobs is not None and not req.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
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
            digits = str(max_tokens)
            shown = digits if len(digits) <= 12 else f"{digits[:12]}... ({len(digits)} digits)"
            raise ApiError(400, f"{param}={shown} is more than this server allows ({limit})", param)
        elif len(prompt_ids) + max_tokens > context:
            raise ApiError(400, f"the model's context is {context} tokens, but the prompt ({len(prompt_ids)} tokens) "
                                f"plus {param} ({max_tokens}) needs {len(prompt_ids) + max_tokens}: lower {param}",
                           param, code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        echo = kind == "completion" and bool(req.echo)
        prompt_text = ""
        if echo or (kind == "completion" and logprobs is not None):  # echoed, or where the text offsets start
            prompt_text = req.prompt if isinstance(req.prompt, str) else (
                req.prompt[0] if isinstance(req.prompt[0], str) else self.tokenizer.decode(prompt_ids))
        generation = GenerationRequest(  # every check it makes was made above: a ValueError here is a bug
            prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=req.seed,
            eos_ids=[] if req.ignore_eos else self.eos_ids, n=req.n or 1, logprobs=logprobs,
            prompt_logprobs=echo and logprobs is not None, logit_bias=self._logit_bias(req.logit_bias),
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            grammar=structured.grammar if structured else None,
            composition=self.compositions.get(model))  # None: the bare anchor
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return _Prepared(kind, model, generation, stop, req.stream, usage, echo=echo, prompt_text=prompt_text,
                         structured=structured)

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        vocab = self.limits.vocab_size
        out = {}
        for key, value in (bias or {}).items():
            if not key.isdecimal() or not 0 <= int(key) < vocab:
                raise ApiError(400, f"logit_bias keys must be token ids (0..{vocab - 1}) written as strings, "
                                    f"got {key[:40]!r}", "logit_bias")
            out[int(key)] = value
        return out

    def _completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):  # a batch of token-id prompts
            if len(prompt) != 1:
                raise ApiError(400, f"prompt holds {len(prompt)} prompts: send one prompt per request", "prompt")
            prompt = prompt[0]
            if not prompt:
                raise ApiError(400, "the prompt is empty: send at least one token id", "prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = self.limits.vocab_size
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

    def _chat_prompt(self, messages: list[ChatMessage], tools: list[dict] | None = None) -> list[int]:
        """The chat template's prompt of ``messages`` (with ``tools`` where the template shows them)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"the model '{self.model_name}' has no chat template, so it cannot take chat "
                                f"messages: use POST /v1/completions with a plain prompt", "messages",
                           code="chat_template_missing")
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        if not any(t["content"] for t in turns):
            raise ApiError(400, "every message is empty: send some content", "messages")
        try:
            text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False,
                                                      **({"tools": tools} if tools else {}))
        except Exception as e:  # noqa: BLE001 - templates raise their own errors (e.g. role order)
            raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "the chat template made an empty prompt of these messages: send some content",
                           "messages")
        return ids

    # ------------------------------------------------------------------ generation
    def _usage(self, p: _Prepared, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=len(p.prompt_ids), completion_tokens=completion_tokens,
                     total_tokens=len(p.prompt_ids) + completion_tokens)

    def _full_response(self, p: _Prepared, rid: str, choices: list[_Choice]) -> dict:
        usage = self._usage(p, sum(c.tokens for c in choices))
        head = dict(id=rid, created=int(time.time()), model=p.model, usage=usage)
        if p.kind == "completion":
            return Completion(**head, choices=[
                CompletionChoice(index=i, text=(p.prompt_text if p.echo else "") + c.text, finish_reason=c.finish,
                                 logprobs=self._completion_logprobs(p, c.prompt_logprobs, c.logprobs)[0])
                for i, c in enumerate(choices)]).model_dump()
        return ChatCompletion(**head, choices=[
            ChatChoice(index=i, **self._message(p, c), logprobs=self._chat_logprobs(p, c.logprobs))
            for i, c in enumerate(choices)]).model_dump()

    def _message(self, p: _Prepared, c: _Choice) -> dict:
        """A whole chat choice's message and finish reason: content, or a tool call (finish "tool_calls" once
        complete; a call cut by max_tokens keeps "length" and its arguments as far as they got)."""
        if not p.tool_call:
            return {"message": AssistantMessage(content=c.text), "finish_reason": c.finish}
        text = p.tool_text()
        text.add(c.text)
        text.finish(complete=c.finish == "stop")
        call = text.call()
        if call is None:  # cut before the function's name was complete: no call to give
            return {"message": AssistantMessage(content=c.text), "finish_reason": c.finish}
        return {"message": AssistantMessage(content=None, tool_calls=[call]),
                "finish_reason": "tool_calls" if c.finish == "stop" else c.finish}

    # ------------------------------------------------------------------ logprobs in OpenAI's two formats
    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _completion_logprobs(self, p: _Prepared, prompt_entries: list | None, entries: list[dict] | None,
                             offset: int | None = None) -> tuple[CompletionLogprobs | None, int]:
        """The completions API's logprobs of the prompt's tokens (echo) and of generated ones, and the text offset
        after them; ``offset`` is where the first token's text starts (default: 0 with echo, else after the prompt)."""
        if p.logprobs is None:
            return None, offset or 0
        pos = offset if offset is not None else (0 if p.echo else len(p.prompt_text))
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        tokens = list(zip(p.prompt_ids, prompt_entries)) if prompt_entries is not None else []
        tokens += [(e["id"], e) for e in entries or []]
        for token, e in tokens:
            text = self._token_text(token)
            out.tokens.append(text)
            out.token_logprobs.append(None if e is None else e["logprob"])
            top = None
            if e is not None:
                top = {}
                for t, lp in e["top"]:
                    top.setdefault(self._token_text(t), lp)  # two ids with one text: the likelier one's
            out.top_logprobs.append(top)
            out.text_offset.append(pos)
            pos += len(text)
        return out, pos

    def _chat_logprobs(self, p: _Prepared, entries: list[dict] | None) -> ChatLogprobs | None:
        if p.logprobs is None:
            return None

        def top(token: int, logprob: float) -> TopLogprob:
            text = self._token_text(token)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8", "surrogatepass")))

        content = []
        for e in entries or []:
            head = top(e["id"], e["logprob"])
            content.append(TokenLogprob(**head.model_dump(), top_logprobs=[top(t, lp) for t, lp in e["top"]]))
        return ChatLogprobs(content=content)

    def _chunk(self, p: _Prepared, rid: str, created: int, delta: str | None, finish: str | None,
               first: bool = False, usage: Usage | None = None, index: int = 0, logprobs=None,
               tool_calls: list[dict] | None = None) -> dict:
        """One streamed event; with ``usage`` the closing usage event (no choices)."""
        head = dict(id=rid, created=created, model=p.model, usage=usage)
        if p.kind == "completion":
            choices = [] if usage else [CompletionChoice(index=index, text=delta or "", finish_reason=finish,
                                                         logprobs=logprobs)]
            chunk = Completion(**head, choices=choices).model_dump(exclude_none=False)
        else:
            d = ChatDelta(role="assistant" if first else None, content=(delta or "") if (delta or first) else None,
                          tool_calls=tool_calls)
            choices = [] if usage else [ChatChunkChoice(index=index, delta=d, finish_reason=finish,
                                                        logprobs=logprobs)]
            chunk = ChatCompletionChunk(**head, choices=choices).model_dump()
            for choice in chunk["choices"]:  # OpenAI sends only the fields a delta has
                choice["delta"] = ChatDelta.model_validate(choice["delta"]).model_dump(exclude_none=True)
        if usage is None:
            chunk.pop("usage")
        return chunk

    async def _sse(self, p: _Prepared, rid: str, first: Piece, pieces) -> AsyncIterator[str]:
        created = int(time.time())
        tokens = [0] * p.n  # per choice: completion tokens so far
        offsets: list[int | None] = [None] * p.n  # per choice: text offset of its next token (completions)
        calls = [p.tool_text() for _ in range(p.n)] if p.tool_call else None  # per choice: its tool call so far

        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        def events(piece: Piece, opening: bool):
            i = piece.index
            tokens[i] = piece.completion_tokens
            if p.kind == "chat":
                if opening:  # OpenAI opens a chat stream with the assistant role
                    yield event(self._chunk(p, rid, created, "", None, first=True, index=i))
                logprobs = self._chat_logprobs(p, piece.logprobs) if piece.logprobs else None
            else:
                logprobs, offsets[i] = self._completion_logprobs(p, piece.prompt_logprobs, piece.logprobs, offsets[i])
                if not piece.logprobs and not piece.prompt_logprobs:
                    logprobs = None
            if calls is not None:
                yield from call_events(piece, logprobs)
                return
            text = (p.prompt_text if opening and p.echo else "") + piece.text
            if text or logprobs is not None:
                yield event(self._chunk(p, rid, created, text, None, index=i, logprobs=logprobs))
            if piece.finish is not None:
                yield event(self._chunk(p, rid, created, None, piece.finish, index=i))

        def call_events(piece: Piece, logprobs):  # a tool call's text streams as delta.tool_calls
            i, call, finish = piece.index, calls[piece.index], piece.finish
            deltas = call.add(piece.text)
            if finish is not None:
                deltas += call.finish(complete=finish == "stop")
            if deltas or logprobs is not None:
                yield event(self._chunk(p, rid, created, None, None, index=i, logprobs=logprobs,
                                        tool_calls=deltas or None))
            if finish is not None:
                if call.call() is None:  # cut before the function's name was complete: the text as content
                    yield event(self._chunk(p, rid, created, call.text, None, index=i))
                elif finish == "stop":
                    finish = "tool_calls"
                yield event(self._chunk(p, rid, created, None, finish, index=i))

        try:
            for e in events(first, True):
                yield e
            opened = {first.index}
            async for piece in pieces:
                for e in events(piece, piece.index not in opened):
                    yield e
                opened.add(piece.index)
            if p.include_usage:
                yield event(self._chunk(p, rid, created, None, None, usage=self._usage(p, sum(tokens))))
        except ApiError as e:
            yield event(e.of_request(rid).body())
        finally:
            await pieces.aclose()  # a client that went away cancels the generation here
        yield "data: [DONE]\n\n"


def _refuse_unsupported(req: CompletionBody | ChatBody, kind: str) -> None:
    """A 400 naming each parameter that would change the answer and that this server cannot honour."""
    if kind == "completion":
        if req.suffix:
            raise ApiError(400, "suffix (insertion) is not supported: send the text before the gap as the prompt",
                           "suffix")
        if req.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported: ask for n choices and pick one yourself", "best_of")


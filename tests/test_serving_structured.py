"""Structured outputs on the tiny pair, through the official ``openai`` client over real HTTP: ``response_format``
(``json_object``, ``json_schema``) and forced tool calls (``tool_choice`` "required" or a named function),
grammar-constrained in the engine (``actors.serve.grammar``, llguidance).

The same ``OpenAIFrontend`` + ``guard`` the Serve Ingress runs, in front of a local ``DecodeEngine`` with the
anchor tokenizer's ``Grammars``, served by uvicorn on 127.0.0.1 (test_serving.py and test_language_serving.py
send constrained rows through Ray Serve, the latter on the real pair). Every expected answer comes from the
in-process ``ComposedModel`` decoded token by token with a fresh llguidance matcher masking its logits.
The tiny models are random, so each schema bounds its output (``maxLength``, ``maxItems``, ranges, no extra
keys): an unbounded one would run to ``max_tokens``, which the last tests check on purpose.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import threading

import httpx
import jsonschema
import openai
import pytest
import torch

from actors.serve.augment_client import LocalAugments
from actors.serve.augment_rows import AugmentRows
from actors.serve.engine import DecodeEngine, GenerationRequest
from actors.serve.grammar import GrammarError, Grammars, json_grammar
from actors.serve.openai.app import Limits, OpenAIFrontend
from actors.serve.openai.schemas import CompletionBody
from actors.serve.openai.structured import ToolCallText
from composition.loading import load_tokenizer
from tests.fixtures import build_pair, load_in_process
from tests.test_serving import serve_frontend

MODEL = "structured"
BATCH = 8
PROMPT = "Answer in JSON:"

NESTED = {"type": "object", "additionalProperties": False, "required": ["user", "ok"], "properties": {
    "user": {"type": "object", "additionalProperties": False, "required": ["id", "tags"], "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}},
    "ok": {"type": "boolean"}}}
ESCAPES = {"type": "object", "additionalProperties": False, "required": ["quote", "note"], "properties": {
    "quote": {"const": 'say "hi"\n\tback\\slash'},  # only its escaped form is valid JSON text
    "note": {"type": "string", "maxLength": 6}}}
ARRAY = {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4}
ENUMS = {"type": "object", "additionalProperties": False, "required": ["kind", "size"], "properties": {
    "kind": {"enum": ["cat", "dog", "two words"]}, "size": {"type": "number", "minimum": 0, "maximum": 9},
    "maybe": {"type": ["string", "null"], "maxLength": 3}}}
SCHEMAS = {"nested": NESTED, "escapes": ESCAPES, "array": ARRAY, "enums": ENUMS}

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "additionalProperties": False,
                                                           "required": ["city", "unit"], "properties": {
                                                               "city": {"type": "string", "maxLength": 6},
                                                               "unit": {"enum": ["C", "F"]}}}}}
NOOP = {"type": "function", "function": {"name": "noop"}}
COUNT = {"type": "function", "function": {"name": "count", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["n"],
    "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3}}}}}
TOOLS = [WEATHER, NOOP, COUNT]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
OPENED: list = []  # every request the served frontend handed to its engine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, engine, in-process model, tokenizer, grammars)."""
    pair = build_pair(tmp_path_factory.mktemp("structured_pair"))
    model = load_in_process(pair)
    tok = load_tokenizer(pair.anchor)
    grammars = Grammars(tok, model.anchor_info.vocab_size)
    engine = DecodeEngine(model, LocalAugments([AugmentRows(model.encoders[0], 0, 0, threading.Lock())]),
                          max_batch_size=BATCH, max_context=512, grammars=grammars)

    def open_stream(request):
        OPENED.append(request)
        return engine.generate(request)

    frontend = OpenAIFrontend(tok, MODEL, Limits(context=512, vocab_size=len(tok), default_max_tokens=8),
                              open_stream=open_stream, grammars=grammars)
    with serve_frontend(frontend) as url:
        yield url, engine, model, tok, grammars


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", timeout=120, max_retries=0)


@torch.no_grad()
def constrained_reference(model, grammars: Grammars, grammar: str, prompt_ids: list[int], max_tokens: int,
                          eos: int = 1) -> tuple[list[int], str]:
    """Greedy in-process decoding, the whole sequence recomputed each token, its logits masked by a fresh
    matcher of ``grammar``: (new tokens, finish reason)."""
    from llguidance import LLMatcher

    matcher = LLMatcher(grammars.tokenizer, grammar)
    ids, new = list(prompt_ids), []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1].float()
        allowed, _ = grammars.masks([matcher])
        token = int(logits.masked_fill(~allowed[0], float("-inf")).argmax())
        assert matcher.consume_token(token)
        new.append(token)
        ids.append(token)
        if token == eos or matcher.is_stopped():
            return new, "stop"
    return new, "length"


def complete(client, **kwargs):
    """``client.completions.create``: OpenAI's completions API has no response_format (this server's does, as
    vLLM's), so the client sends it as an extra body field."""
    extra = {"response_format": kwargs.pop("response_format")} if "response_format" in kwargs else None
    return client.completions.create(extra_body=extra, **kwargs)


def chat_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def text_of(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------- response_format
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_greedy_answers_parse_validate_and_equal_the_masked_in_process_model(served, client, name):
    _, _, model, tok, grammars = served
    schema = SCHEMAS[name]
    want, finish = constrained_reference(model, grammars, json_grammar(schema), tok(PROMPT)["input_ids"], 120)
    assert finish == "stop", "the schema must bound the tiny model's output"
    out = complete(client, model=MODEL, prompt=PROMPT, max_tokens=120, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
    choice = out.choices[0]
    assert choice.text == text_of(tok, want) and choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.text), schema)


def test_the_escapes_schema_makes_the_model_write_escapes(served):
    _, _, model, tok, grammars = served
    want, _ = constrained_reference(model, grammars, json_grammar(ESCAPES), tok(PROMPT)["input_ids"], 120)
    text = text_of(tok, want)
    assert '\\"hi\\"\\n' in text and "\\\\slash" in text  # quote, newline and backslash escaped in the raw text
    assert json.loads(text)["quote"] == 'say "hi"\n\tback\\slash'


@pytest.mark.parametrize("seed", [1, 2])
def test_sampled_answers_with_seeds_parse_and_validate_in_chat_and_completions(client, seed):
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        out = complete(client, model=MODEL, prompt=PROMPT, max_tokens=150, temperature=1.0, seed=seed,
                                        response_format=fmt)
        assert out.choices[0].finish_reason == "stop", (name, out.choices[0].text)
        jsonschema.validate(json.loads(out.choices[0].text), schema)
        again = complete(client, model=MODEL, prompt=PROMPT, max_tokens=150, temperature=1.0, seed=seed,
                                          response_format=fmt)
        assert again.choices[0].text == out.choices[0].text  # a seeded sample is reproducible under a grammar
        chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=150, temperature=0.8,
                                              seed=seed, response_format=fmt)
        jsonschema.validate(json.loads(chat.choices[0].message.content), schema)


def test_json_object_mode_holds_the_output_to_a_json_object(client):
    """The random tiny model may never close an open-ended object: whatever it wrote within max_tokens is a
    JSON object's start, and where it finished, the whole text is an object."""
    for seed in range(4):
        out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=1.0,
                                             seed=seed, response_format={"type": "json_object"})
        choice = out.choices[0]
        assert choice.message.content.startswith("{"), choice.message.content
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length" and out.usage.completion_tokens == 40


def test_max_tokens_inside_the_json_gives_length_and_the_text_as_far_as_it_got(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "nested", "schema": NESTED}}
    whole = complete(client, model=MODEL, prompt=PROMPT, max_tokens=120, temperature=0, response_format=fmt)
    cut = complete(client, model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, response_format=fmt)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 5
    assert whole.choices[0].text.startswith(cut.choices[0].text) and len(cut.choices[0].text) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.choices[0].text)


def test_a_grammar_masks_the_logits_before_logit_bias(served, client):
    """+100 on a token the schema rules out changes nothing: the mask comes first."""
    _, _, _, tok, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "array", "schema": ARRAY}}
    plain = complete(client, model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, response_format=fmt)
    z = tok("z", add_special_tokens=False)["input_ids"][0]
    biased = complete(client, model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, response_format=fmt,
                                       logit_bias={str(z): 100})
    assert biased.choices[0].text == plain.choices[0].text and "z" not in plain.choices[0].text
    free = complete(client, model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={str(z): 100})
    assert free.choices[0].text == "zzz"  # without a grammar the bias rules


# ---------------------------------------------------------------------- tool calls
@pytest.mark.parametrize("choice", ["required", "get_weather", "noop", "count"])
def test_a_forced_tool_call_parses_validates_and_its_streamed_deltas_join_to_the_same_call(served, client, choice):
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": choice}}
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0,
                                         tools=TOOLS, tool_choice=tool_choice)
    answer = out.choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (call,) = answer.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if choice != "required":
        assert call.function.name == choice
    offered = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, offered[call.function.name] or {"type": "object", "maxProperties": 0})

    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0,
                                            tools=TOOLS, tool_choice=tool_choice, stream=True)
    name, pieces, ids, finish = None, [], set(), None
    for chunk in stream:
        for c in chunk.choices:
            for delta in c.delta.tool_calls or []:
                assert delta.index == 0
                if delta.id:
                    ids.add(delta.id)
                if delta.function.name:
                    name = delta.function.name
                pieces.append(delta.function.arguments or "")
            finish = c.finish_reason or finish
    assert (name, "".join(pieces), finish) == (call.function.name, call.function.arguments, "tool_calls")
    assert len(ids) == 1 and len(pieces) >= 2  # the arguments came in pieces


def test_a_named_call_is_the_masked_in_process_models_arguments(served, client):
    _, _, model, tok, grammars = served
    schema = WEATHER["function"]["parameters"]
    want, _ = constrained_reference(model, grammars, json_grammar(schema), chat_ids(tok, MESSAGES), 120)
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0, tools=TOOLS,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert out.choices[0].message.tool_calls[0].function.arguments == text_of(tok, want)


def test_tool_choice_none_answers_in_text(client):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, tools=TOOLS,
                                         tool_choice="none")
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "length"


def test_a_call_cut_by_max_tokens_keeps_length_and_its_arguments_as_far_as_they_got(client):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, tools=TOOLS,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    answer = out.choices[0]
    assert answer.finish_reason == "length" and len(answer.message.tool_calls[0].function.arguments) == 4


def test_tool_call_text_streams_the_name_first_and_holds_back_the_wrappers_brace():
    text = ToolCallText(None)
    deltas = []
    for piece in ['{"na', 'me": "f", "argum', 'ents": {"a"', ': 1}', "}"]:
        deltas += text.add(piece)
    deltas += text.finish(complete=True)
    assert deltas[0]["function"]["name"] == "f" and deltas[0]["id"] == text.id
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"a": 1}' == text.call()["function"]["arguments"]
    cut = ToolCallText(None)
    cut.add('{"name": "f", "argu')
    cut.finish(complete=False)
    assert cut.call() is None  # no call before the arguments start


# ---------------------------------------------------------------------- mixed batches
def test_constrained_and_free_rows_in_one_batch_each_equal_their_solo_answer(served):
    url, engine, _, _, _ = served
    def fmt(name):
        return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}

    bodies = [
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 60, "temperature": 0, "response_format": fmt("nested")}),
        ("/v1/completions", {"prompt": "The key of door seven is", "max_tokens": 24, "temperature": 0}),
        ("/v1/completions", {"prompt": PROMPT + " please", "max_tokens": 60, "temperature": 0,
                             "response_format": fmt("enums")}),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 60, "temperature": 0, "tools": TOOLS,
                                  "tool_choice": "required"}),
        ("/v1/completions", {"prompt": "Another free row", "max_tokens": 30, "temperature": 0}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 60, "temperature": 0.9, "seed": 7,
                             "response_format": fmt("array")}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 60, "temperature": 0, "n": 2,
                             "response_format": {"type": "json_object"}}),
    ]

    def answer(r: httpx.Response):
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        strip = [{k: v for k, v in c.items() if k != "message"} | (
            {"message": {**c["message"], "tool_calls": [{**t, "id": None} for t in c["message"]["tool_calls"]]}}
            if c.get("message", {}).get("tool_calls") else {"message": c.get("message")}) for c in choices]
        return strip

    solo = [answer(httpx.post(f"{url}{path}", json=body, timeout=120)) for path, body in bodies]
    before = engine.counters["max_rows_in_step"]

    async def together():
        async with httpx.AsyncClient(timeout=300) as http:
            return await asyncio.gather(*(http.post(f"{url}{path}", json=body) for path, body in bodies))

    mixed = [answer(r) for r in asyncio.run(together())]
    assert mixed == solo
    assert engine.counters["max_rows_in_step"] >= max(before, 4)  # they did share steps


def test_a_resumed_constrained_row_continues_its_grammar_where_it_stopped(served):
    """A resume sends prompt + the tokens so far and ``grammar_generated``: the matcher consumes them first, so
    the rest equals the uninterrupted answer."""
    _, _, model, tok, grammars = served
    # an engine of its own: the served one runs on uvicorn's event loop
    engine = DecodeEngine(model, LocalAugments([AugmentRows(model.encoders[0], 0, 0, threading.Lock())]),
                          max_batch_size=2, max_context=512, grammars=grammars)
    grammar = json_grammar(NESTED)
    prompt = tok(PROMPT)["input_ids"]
    want, _ = constrained_reference(model, grammars, grammar, prompt, 120)

    async def run(request):
        out = []
        async for chunk in engine.generate(request):
            out += chunk["token_ids"]
        return out

    async def resumed():
        head = await run(GenerationRequest(prompt_ids=prompt, max_tokens=7, grammar=grammar))
        return head, await run(GenerationRequest(prompt_ids=prompt + head, max_tokens=120 - 7, grammar=grammar,
                                                 grammar_generated=head))

    head, rest = asyncio.run(resumed())
    assert head + rest == want
    with pytest.raises(GrammarError, match="do not match the grammar"):
        grammars.matcher(grammar, tok("[1]", add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------- refused before any work
def _words(count: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(count)]


def _nested(levels: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _fmt(schema) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


CHAT = {"messages": MESSAGES}
REFUSED = [
    ("/v1/completions", _fmt({"not": {"type": "string"}}), "Unimplemented keys: [\"not\"]"),
    ("/v1/completions", _fmt({"type": "array", "uniqueItems": True}), "uniqueItems"),
    ("/v1/completions", _fmt({"type": "string", "format": "colour"}), "Unknown format: colour"),
    ("/v1/completions", _fmt({"$ref": "#/$defs/missing"}), "does not exist"),
    ("/v1/completions", _fmt({"enum": [w * 200 for w in _words(40)]}), "this server takes up to 32,768"),
    ("/v1/completions", _fmt(_nested(40)), "nests 81 levels deep; this server takes up to 32"),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, 'needs a "json_schema" object'),
    ("/v1/completions", _fmt(False), "the schema is false, which no value matches"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "Schema": {}}}},
     "'response_format.json_schema.Schema' is not a parameter this server supports"),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER, {"type": "function", "function": {
        "name": "big", "parameters": {"type": "object", "properties": {w: {"type": "string"} for w in _words(2200)}}}}],
        "tool_choice": "required"}, "this server takes up to 32,768"),  # "required": every function's, together
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS}, 'tool_choice "auto" (the default when tools are given)'),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": "auto"}, 'Send tool_choice "required"'),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice needs tools"),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "names the function 'x', which tools do not offer"),
    ("/v1/chat/completions", {**CHAT, "tools": [NOOP, NOOP], "tool_choice": "required"}, "name a function twice"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}],
                              "tool_choice": "required"}, "'tools[0].function.name'"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "not": {}}}}], "tool_choice": "required"}, "Unimplemented keys"),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": "required", "stop": ["}"]},
     "stop cannot be combined with a forced tool call"),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": "required", **_fmt({"type": "object"})},
     "cannot be combined"),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER] * 129, "tool_choice": "required"}, "'tools'"),
]


@pytest.mark.parametrize("path, body, message", REFUSED, ids=[m[:40] for _, _, m in REFUSED])
def test_a_schema_or_tool_request_that_cannot_be_enforced_is_a_400_naming_it_and_the_server_goes_on(
        served, path, body, message):
    url = served[0]
    if path == "/v1/completions":
        body = {"prompt": PROMPT, **body}
    opened = len(OPENED)
    r = httpx.post(f"{url}{path}", json={"max_tokens": 4, **body}, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"], error
    assert len(OPENED) == opened  # refused before it reached the engine
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 2, **_fmt(ARRAY)}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"].startswith("[")


def test_a_grammar_slower_to_compile_than_the_server_allows_is_a_400_and_the_server_goes_on(served, monkeypatch):
    """On a 99-token vocabulary every grammar compiles in about a millisecond, so the limit is lowered here; the
    real tokenizer's slow case is test_real_pair_structured's."""
    url, _, _, _, grammars = served
    monkeypatch.setattr(grammars, "max_compile_s", 0.0)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, **_fmt({"enum": _words(50)})}, timeout=60)
    assert r.status_code == 400 and "more than this server allows (0 s): simplify it" in r.json()["error"]["message"]
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 2, **_fmt(ARRAY)}, timeout=60)
    assert ok.status_code == 200  # compiled before: cached


def test_a_schema_of_true_takes_any_json_value(client):
    out = complete(client, model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0,
                   response_format={"type": "json_schema", "json_schema": {"name": "any", "schema": True}})
    if out.choices[0].finish_reason == "stop":
        json.loads(out.choices[0].text)
    else:  # the random model may open a string it never closes
        assert out.choices[0].text[:1] in '{["-0123456789tfn'


def test_a_constrained_request_resumed_through_the_frontend_ends_as_the_uninterrupted_one(served):
    """The frontend's resume (the anchor replica died mid-stream) sends the tokens so far as grammar_generated:
    without them the new matcher would start the JSON again after them."""
    _, _, model, tok, grammars = served
    engine = DecodeEngine(model, LocalAugments([AugmentRows(model.encoders[0], 0, 0, threading.Lock())]),
                          max_batch_size=2, max_context=512, grammars=grammars)

    class ReplicaDied(Exception):
        pass

    attempts = []

    async def dies_once(request):
        attempts.append(request)
        sent = 0
        async for chunk in engine.generate(request):
            yield chunk
            sent += len(chunk["token_ids"])
            if len(attempts) == 1 and sent >= 6:
                raise ReplicaDied

    limits = Limits(context=512, vocab_size=len(tok), default_max_tokens=8)
    body = CompletionBody.model_validate({"prompt": PROMPT, "max_tokens": 120, "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "nested", "schema": NESTED}}})

    async def answer(open_stream, retryable=()):
        frontend = OpenAIFrontend(tok, MODEL, limits, open_stream=open_stream, retryable=retryable,
                                  grammars=grammars)
        return json.loads((await frontend.completions(body)).body)["choices"][0]

    async def both():
        return await answer(engine.generate), await answer(dies_once, (ReplicaDied,))

    whole, resumed = asyncio.run(both())
    assert len(attempts) == 2 and len(attempts[1].grammar_generated) >= 6
    assert attempts[1].prompt_ids[-len(attempts[1].grammar_generated):] == attempts[1].grammar_generated
    assert resumed == whole and whole["finish_reason"] == "stop"
    jsonschema.validate(json.loads(resumed["text"]), NESTED)

"""The OpenAI parameters that change the answer, through the official ``openai`` client over real HTTP: ``n``,
``logprobs``/``top_logprobs``, ``echo``, ``logit_bias``, ``presence_penalty``, ``frequency_penalty``, and a clear
400 for the ones this server cannot honour (unknown fields; ``response_format`` and ``tools`` here, where the engine
has no grammars: tests/test_serving_structured.py serves them).

The same ``OpenAIFrontend`` + ``guard.install`` and ``guard.read_body`` the Serve Ingress runs, in front of a local ``DecodeEngine``,
served by uvicorn on 127.0.0.1 (tests/test_serving.py runs the same parameters through Ray Serve). Every
expected value comes from the in-process ``ComposedModel`` on the same files, decoded token by token here.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch

from actors.serve.augment_client import LocalAugments
from actors.serve.augment_rows import AugmentRows
from actors.serve.engine import DecodeEngine
from actors.serve.openai.app import Limits, OpenAIFrontend
from composition.loading import load_tokenizer
from tests.fixtures import build_pair, load_in_process
from tests.test_serving import serve_frontend

MODEL = "params"
BATCH = 4
PROMPT = "The key of door seven is"
TOL = 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, engine, in-process model, tokenizer)."""
    pair = build_pair(tmp_path_factory.mktemp("params_pair"))
    model = load_in_process(pair)
    tok = load_tokenizer(pair.anchor)
    engine = DecodeEngine(model, LocalAugments([AugmentRows(model.encoders[0], 0, 0, threading.Lock())]),
                          max_batch_size=BATCH, max_context=512)
    frontend = OpenAIFrontend(tok, MODEL, Limits(context=512, vocab_size=len(tok), default_max_tokens=8),
                              open_stream=engine.generate)
    with serve_frontend(frontend) as url:
        yield url, engine, model, tok


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", timeout=60, max_retries=0)


@torch.no_grad()
def reference(model, prompt_ids, max_tokens, bias=None, presence=0.0, frequency=0.0, eos=1):
    """Greedy in-process decoding, the whole sequence recomputed each token (no cache), with OpenAI's logit bias
    and penalties: (new token ids, their logprobs under the model's own distribution)."""
    ids, new, logprobs = list(prompt_ids), [], []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1].float()
        chosen = logits.clone()
        for token, value in (bias or {}).items():
            chosen[token] += value
        for token in set(new):
            chosen[token] -= new.count(token) * frequency + presence
        token = int(chosen.argmax())
        new.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids.append(token)
        if token == eos:
            break
    return new, logprobs


@torch.no_grad()
def prompt_logprobs(model, ids):
    """In-process logprob of each prompt token after the first, given the tokens before it."""
    logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


def text_of(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------- logprobs and echo
def test_completion_logprobs_are_the_in_process_models_and_top_logprobs_lead_with_the_greedy_token(served, client):
    _, _, model, tok = served
    want, want_lp = reference(model, tok(PROMPT)["input_ids"], 8)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == text_of(tok, want)
    assert lp.tokens == [tok.decode([t]) for t in want]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, want_lp)) < TOL
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top, key=top.get) == token and top[token] == pytest.approx(chosen)
    assert lp.text_offset[0] == len(PROMPT) and lp.text_offset[1] == len(PROMPT) + len(lp.tokens[0])


def test_echo_with_logprobs_scores_the_prompt_as_the_in_process_model_does(served, client):
    _, _, model, tok = served
    ids = tok(PROMPT)["input_ids"]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1, echo=True)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    got = lp.token_logprobs[1 : len(ids)]
    assert max(abs(a - b) for a, b in zip(got, prompt_logprobs(model, ids))) < TOL
    assert lp.text_offset[: len(ids)] == list(range(len(ids)))  # one character per token


def test_echo_without_logprobs_puts_the_prompt_before_the_answer(served, client):
    _, _, model, tok = served
    want, _ = reference(model, tok(PROMPT)["input_ids"], 4)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert out.choices[0].text == PROMPT + text_of(tok, want) and out.choices[0].logprobs is None


def test_a_batch_of_one_token_id_prompt_is_served_as_lm_eval_sends_it(served):
    url, _, model, tok = served
    ids = tok(PROMPT)["input_ids"]
    body = {"model": MODEL, "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]
    assert max(abs(a - b) for a, b in zip(got, prompt_logprobs(model, ids))) < TOL


def test_chat_logprobs_carry_top_logprobs_and_bytes(served, client):
    _, _, model, tok = served
    messages = [{"role": "user", "content": "Which key opens door seven?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want, want_lp = reference(model, tok(ids, add_special_tokens=False)["input_ids"], 6)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in want]
    assert max(abs(c.logprob - w) for c, w in zip(content, want_lp)) < TOL
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)
    assert all(bytes(c.bytes).decode() == c.token for c in content)


def test_streamed_logprobs_equal_the_whole_answers(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    streamed = [c.logprobs for c in chunks if c.logprobs is not None]
    assert "".join(c.text for c in chunks) == whole.text
    assert sum((s.tokens for s in streamed), []) == whole.logprobs.tokens
    assert sum((s.token_logprobs for s in streamed), []) == whole.logprobs.token_logprobs
    assert sum((s.text_offset for s in streamed), []) == whole.logprobs.text_offset


# ---------------------------------------------------------------------- n
def test_n_choices_come_from_one_prefill_and_greedy_ones_all_equal_in_process(served, client):
    _, engine, model, tok = served
    want, _ = reference(model, tok(PROMPT)["input_ids"], 6)
    before = {k: engine.counters[k] for k in ("prefills", "prefill_rows", "shared_prefill_rows")}
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, n=BATCH)
    # one prefill computing the prompt once: the other n - 1 rows copy its cache rows
    assert {k: engine.counters[k] - v for k, v in before.items()} == {
        "prefills": 1, "prefill_rows": 1, "shared_prefill_rows": BATCH - 1}
    assert [c.index for c in out.choices] == list(range(BATCH))
    assert {c.text for c in out.choices} == {text_of(tok, want)}
    assert out.usage.completion_tokens == BATCH * len(want)


def test_seeded_n_samples_repeat_differ_from_each_other_and_stream_the_same(client):
    kwargs = dict(model=MODEL, prompt="xyz", max_tokens=12, temperature=1.0, seed=11, n=3)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    assert [c.text for c in client.completions.create(**kwargs).choices] == first
    assert len(set(first)) > 1
    streamed = [""] * 3
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == first
    one = client.completions.create(**{**kwargs, "n": 1}).choices[0].text
    assert one == first[0]  # choice 0 of a seeded request is the n=1 answer


def test_chat_n_streams_each_choice_with_its_index(client):
    messages = [{"role": "user", "content": "hi"}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=5, temperature=1.0, seed=3, n=2)
    whole = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    streamed, finished = ["", ""], set()
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert streamed == whole and finished == {0, 1}


# ---------------------------------------------------------------------- logit bias and penalties
def test_logit_bias_changes_the_greedy_answer_as_openai_defines_it(served, client):
    _, _, model, tok = served
    ids = tok(PROMPT)["input_ids"]
    plain, _ = reference(model, ids, 6)
    bias = {plain[0]: -100.0, tok("Q")["input_ids"][0]: 5.0}
    want, _ = reference(model, ids, 6, bias=bias)
    assert want != plain
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                    logit_bias={str(k): v for k, v in bias.items()})
    assert out.choices[0].text == text_of(tok, want)


@pytest.mark.parametrize("presence, frequency", [(0.0, 2.0), (2.0, 0.0), (1.5, -0.5)])
def test_presence_and_frequency_penalties_change_the_greedy_answer_as_openai_defines_them(served, client,
                                                                                          presence, frequency):
    _, _, model, tok = served
    ids = tok("a")["input_ids"]
    plain, _ = reference(model, ids, 16)
    want, _ = reference(model, ids, 16, presence=presence, frequency=frequency)
    assert want != plain
    out = client.completions.create(model=MODEL, prompt="a", max_tokens=16, temperature=0,
                                    presence_penalty=presence, frequency_penalty=frequency)
    assert out.choices[0].text == text_of(tok, want)


def test_a_biased_request_leaves_its_batch_neighbours_answers_alone(served):
    url, _, model, tok = served
    prompts = ["Roses are red,", "a", "xyz 123"]
    want = [text_of(tok, reference(model, tok(p)["input_ids"], 8)[0]) for p in prompts]

    async def main():
        import asyncio

        async with httpx.AsyncClient(timeout=60) as http:
            bodies = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in prompts]
            bodies.append({"prompt": "a", "max_tokens": 8, "temperature": 0, "frequency_penalty": 2,
                           "logit_bias": {"40": 100}, "logprobs": 5})
            return await asyncio.gather(*(http.post(f"{url}/v1/completions", json=b) for b in bodies))

    import asyncio

    answers = asyncio.run(main())
    assert [r.json()["choices"][0]["text"] for r in answers[:3]] == want


# ---------------------------------------------------------------------- refused, never ignored
REFUSED = [
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     "tool_choice"),
    ("/v1/completions", {"prompt": "hi", "top_k": 5}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "guided_json": {}}, "guided_json"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": BATCH + 1}, "n"),
    ("/v1/completions", {"prompt": [[5, 6], [7]]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 50}, "top_logprobs"),
]


@pytest.mark.parametrize("path, body, param", REFUSED, ids=[p for _, _, p in REFUSED])
def test_a_parameter_the_server_cannot_honour_is_a_400_naming_it(served, path, body, param):
    url = served[0]
    r = httpx.post(f"{url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and param in error["message"], error
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_the_harmless_parameters_are_accepted(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         user="u1", store=False, metadata={"k": "v"}, tool_choice="none",
                                         response_format={"type": "text"})
    assert out.choices[0].message.content is not None

"""The composed model served over real HTTP on 127.0.0.1 by Ray Serve (OpenAI-shaped).

One application (Ingress -> Anchor -> Augment0 and Augment1, tiny models, character tokenizer) is deployed once
on the session's Ray cluster; tests talk to it with the official ``openai`` client and with raw
httpx. Greedy answers are compared with in-process ``ComposedModel.generate`` on the same files.
It serves three compositions over one anchor (``MODEL``, which most tests use, another sharing its augmenting
model, one with its own) and the bare anchor: ``test_compositions_*`` check them.
Autoscaling is tested on a second application deployed with ``serve deploy`` from a config derived
from configs/serve.yaml (tests/test_serving_autoscale.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from starlette.requests import Request  # module level: the routes' annotations are strings

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from actors.serve.config import ServingArgs  # noqa: E402
from actors.serve.deployments import build_app  # noqa: E402
from composition.loading import load_tokenizer  # noqa: E402
from tests.fixtures import (  # noqa: E402
    build_pair,
    load_in_process,
    reference_completion,
    write_augment,
    write_bridges,
)

ROOT = Path(__file__).resolve().parents[1]

APP = "calm-test"
MODEL = "calm-test-model"
BETA, GAMMA, ANCHOR_MODEL = "calm-test-beta", "calm-test-gamma", "calm-test-anchor"
ADMIN_KEY = "calm-test-admin-key"
CONTEXT = 512
PROMPTS = [
    "The key of door seven is",
    "a",
    "Once upon a time, in a land far away,",
    "xyz 123",
    "Q: 2+2?\nA:",
    "The quick brown fox",
    "def f(x):\n    return",
    "Roses are red,",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    """Poll ``check()`` until it returns a truthy value; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def serve_frontend(frontend):
    """``frontend`` (an ``OpenAIFrontend``) behind ``guard``, as the Serve Ingress runs it, served by uvicorn on
    127.0.0.1 in a thread: yields its base URL."""
    import threading

    import uvicorn
    from fastapi import FastAPI

    from actors.serve.openai import guard
    from actors.serve.openai.schemas import ChatBody, CompletionBody

    app = FastAPI()
    guard.install(app)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await frontend.completions(await guard.read_body(request, CompletionBody))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await frontend.chat_completions(await guard.read_body(request, ChatBody))

    @app.get("/v1/models")
    async def models():
        return frontend.models()

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "uvicorn to start", interval=0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("served_pair"), context=CONTEXT)


def compositions(pair) -> dict[str, tuple[str, str]]:
    """name -> (augmenting folder, bridges folder) of the three served compositions (written once per pair)."""
    root = Path(pair.bridges).parent
    if not (root / "gamma").exists():
        write_bridges(root / "beta", pair.anchor, pair.augment, seed=7, pairs=((1, 1), (3, 3)))
        write_bridges(root / "gamma", pair.anchor, write_augment(root / "augment_g", pair.anchor, seed=9), seed=8)
    return {MODEL: (pair.augment, pair.bridges), BETA: (pair.augment, str(root / "beta")),
            GAMMA: (str(root / "augment_g"), str(root / "gamma"))}


@pytest.fixture(scope="module")
def reference(pair):
    return load_in_process(pair), load_tokenizer(pair.anchor)


@pytest.fixture(scope="module")
def server(ray_cluster, pair, s3):
    """Base URL of the served application; Serve's HTTP proxy bound to 127.0.0.1 on a free port. No user API
    keys; compositions may be loaded at runtime (two at a time) with ``ADMIN_KEY``."""
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, namespace="serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    admin_keys = Path(pair.bridges).parent / "admin_keys"
    admin_keys.write_text(ADMIN_KEY + "\n")
    settings = ServingArgs(compositions=[{"name": name, "augments": [augment], "bridges": bridges}
                                         for name, (augment, bridges) in compositions(pair).items()],
                           anchor_name=ANCHOR_MODEL, anchor=pair.anchor,
                           max_batch_size=8, max_context=CONTEXT, default_max_tokens=16, request_timeout_s=90,
                           augment_retry_s=90, max_loaded_compositions=2, admin_key_file=str(admin_keys),
                           torch_threads=1)
    # BETA shares Augment0; Compositions: the registry of those loaded at runtime
    assert settings.deployment_names() == ["Ingress", "Anchor", "Compositions", "Augment0", "Augment1"]
    options = {
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
        "Anchor": {"ray_actor_options": {"num_cpus": 0.3, "runtime_env": {"env_vars": s3.env}},
                   "max_ongoing_requests": 8, "max_queued_requests": 16},
        "Augment0": {"ray_actor_options": {"num_cpus": 0.3}},
        "Augment1": {"ray_actor_options": {"num_cpus": 0.1}},
    }
    serve.run(build_app(settings, options), name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{serve.context._get_global_client().http_config.port}"
    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 60, "the health endpoint")
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)


def anchor_stats() -> dict:
    return serve.get_deployment_handle("Anchor", app_name=APP).stats.remote().result(timeout_s=30)


def expected_text(reference, prompt_ids, max_tokens) -> tuple[str, int]:
    model, tok = reference
    new = reference_completion(model, tok, prompt_ids, max_tokens)
    return tok.decode(new, skip_special_tokens=True), len(new)


def post(server, path, body, timeout=120):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server}{path}", content=data, headers={"Content-Type": "application/json"}, timeout=timeout)


def assert_serves(server):
    """The server still answers a valid request."""
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------------- answers
def test_models_and_health(server):
    assert httpx.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
    assert httpx.head(f"{server}/health", timeout=10).status_code == 200  # probes may use HEAD
    assert httpx.get(f"{server}/health/live", timeout=10).json() == {"status": "ok"}
    models = httpx.get(f"{server}/v1/models", timeout=10).json()
    assert [(m["id"], m["parent"]) for m in models["data"]] == [
        (MODEL, ANCHOR_MODEL), (BETA, ANCHOR_MODEL), (GAMMA, ANCHOR_MODEL), (ANCHOR_MODEL, None)]
    assert {m["max_model_len"] for m in models["data"]} == {CONTEXT}


def test_greedy_completion_equals_in_process_generate(client, reference):
    _, tok = reference
    prompt = PROMPTS[0]
    want, n = expected_text(reference, tok(prompt)["input_ids"], 24)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert out.choices[0].text == want
    assert out.choices[0].finish_reason == ("length" if n == 24 else "stop")
    assert out.usage.prompt_tokens == len(prompt)  # one token per character
    assert out.usage.completion_tokens == n
    assert out.usage.total_tokens == len(prompt) + n
    # "auto" with a bridge at the anchor's input: the event loop (tests/test_serving_cli.py serves the other case)
    assert anchor_stats()["model_thread"] is False


def test_compositions_stream_concurrently_and_each_equals_its_own_solo_answer(server, pair):
    """Streams of three compositions and the bare anchor, all at once: one anchor replica decodes them in the
    same steps, and each answer equals its composition's alone, in-process (the bare anchor: the anchor's)."""
    from tests.fixtures import Pair
    from tests.test_serving_bare_anchor import anchor_alone

    tok = load_tokenizer(pair.anchor)
    alone = {name: load_in_process(Pair(pair.anchor, augment, bridges, pair.tokenizer_no_template))
             for name, (augment, bridges) in compositions(pair).items()}
    jobs = [(name, prompt) for prompt in PROMPTS[:2] for name in [*alone, ANCHOR_MODEL]]
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)

    async def one(name, prompt):
        stream = await client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def main():
        return await asyncio.gather(*(one(name, prompt) for name, prompt in jobs))

    texts = asyncio.run(main())
    for (name, prompt), text in zip(jobs, texts):
        ids = tok(prompt)["input_ids"]
        want = (anchor_alone(alone[MODEL], ids, 12, tok.eos_token_id) if name == ANCHOR_MODEL
                else reference_completion(alone[name], tok, ids, 12))
        assert text == tok.decode(want, skip_special_tokens=True), (name, prompt)
    assert len(set(texts[:4])) == 4, "the compositions and the anchor give different answers: the test can tell"


def admin_post(server, path: str, body, key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{server}{path}", content=json.dumps(body), headers=headers, timeout=120)


def served_ids(server) -> list[str]:
    return [m["id"] for m in httpx.get(f"{server}/v1/models", timeout=10).json()["data"]]


def test_a_composition_loaded_from_s3_at_runtime_streams_beside_the_others_and_unloads_without_touching_them(
        server, pair, s3):
    """POST /v1/load_composition with bridges on S3 (moto), then streams of it and of a configured composition
    at once, each equal to its composition alone; unloaded while both stream, its stream still finishes whole,
    the other is untouched, and a new request for it is a 404."""
    from actors.storage import publish_folder
    from tests.fixtures import Pair

    delta = "calm-test-delta"
    uri = s3.uri("bridges/delta")
    publish_folder(compositions(pair)[BETA][1], uri)  # beta's bridges, as another team would publish theirs
    r = admin_post(server, "/v1/load_composition", {"name": delta, "bridges": uri, "augments": [pair.augment]})
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "composition", "id": delta, "parent": ANCHOR_MODEL, "status": "loaded"}
    cards = {m["id"]: m["parent"] for m in httpx.get(f"{server}/v1/models", timeout=10).json()["data"]}
    assert cards[delta] == ANCHOR_MODEL

    tok = load_tokenizer(pair.anchor)
    alone = {name: load_in_process(Pair(pair.anchor, pair.augment, bridges, pair.tokenizer_no_template))
             for name, bridges in [(delta, compositions(pair)[BETA][1]), (MODEL, pair.bridges)]}
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)

    async def stream(name, prompt, tokens, started=None):
        out = await client.completions.create(model=name, prompt=prompt, max_tokens=tokens, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
        text = ""
        async for chunk in out:
            text += chunk.choices[0].text if chunk.choices else ""
            if started is not None and text:
                started.set()
        return text

    async def main():
        started = asyncio.Event()
        runs = [asyncio.ensure_future(stream(delta, PROMPTS[0], 40, started)),
                asyncio.ensure_future(stream(MODEL, PROMPTS[2], 40))]
        await started.wait()  # delta is decoding: unload it now
        unloaded = await asyncio.to_thread(admin_post, server, "/v1/unload_composition", {"name": delta})
        return unloaded, await asyncio.gather(*runs)

    unloaded, (delta_text, model_text) = asyncio.run(main())
    assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded", unloaded.text

    def want(name, prompt, tokens):
        ids = alone[name].generate(torch.tensor([tok(prompt)["input_ids"]]), max_new_tokens=tokens)[0]
        return tok.decode(ids[len(tok(prompt)["input_ids"]):], skip_special_tokens=True)

    assert delta_text == want(delta, PROMPTS[0], 40)  # it finished whole after the unload
    assert model_text == want(MODEL, PROMPTS[2], 40)
    r = post(server, "/v1/completions", {"model": delta, "prompt": "a", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert delta not in served_ids(server)
    assert_serves(server)


def test_every_bad_load_is_a_4xx_naming_the_problem_and_the_server_is_unchanged(server, pair, s3, tmp_path):
    import shutil

    from tests.fixtures import build_pair

    before = served_ids(server)
    beta = Path(compositions(pair)[BETA][1])
    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(beta / "composition_config.json", missing)
    truncated = tmp_path / "truncated"
    shutil.copytree(beta, truncated)
    data = (truncated / "bridges.safetensors").read_bytes()
    (truncated / "bridges.safetensors").write_bytes(data[: len(data) // 2])
    other = build_pair(tmp_path / "other_anchor", seed=5)  # the same shapes, another anchor's weights

    def load(body, key=ADMIN_KEY):
        return admin_post(server, "/v1/load_composition", {"augments": [pair.augment], **body}, key)

    cases = [
        (load({"name": "x", "bridges": str(beta)}, key=None), 401, "no API key"),
        (load({"name": "x", "bridges": str(beta)}, key="not-the-admin-key"), 401, "takes an admin key"),
        (load({"name": "x", "bridges": other.bridges}), 400, "trained for the anchor of composition 'x'"),
        (load({"name": "x", "bridges": str(missing)}), 400, "is not a bridges checkpoint"),
        (load({"name": "x", "bridges": str(truncated)}), 400, "cannot be loaded"),
        (load({"name": "x", "bridges": str(beta), "augments": [other.augment]}), 400,
         "is not an augmenting model this server deploys"),
        (load({"name": "x", "bridges": s3.uri("bridges/delta", bucket="no-such-bucket")}), 400, "no-such-bucket"),
        (load({"name": "x", "bridges": s3.uri("nothing/here")}), 400, "cannot be loaded"),
        (load({"name": MODEL, "bridges": str(beta)}), 409, "is served already"),
        (load({"name": ANCHOR_MODEL, "bridges": str(beta)}), 409, "is served already"),
        (load({"name": "x", "bridges": str(beta), "bridge": "typo"}), 400, "'bridge' is not a parameter"),
        (admin_post(server, "/v1/unload_composition", {"name": MODEL}), 400, "composition of the config"),
        (admin_post(server, "/v1/unload_composition", {"name": "nothing"}), 404, "no composition named 'nothing'"),
    ]
    for r, status, words in cases:
        assert r.status_code == status and words in r.json()["error"]["message"], (status, words, r.text)
        assert served_ids(server) == before
    # the limit: two at a time (max_loaded_compositions), a third is a 409, an unload makes room
    for name in ("x1", "x2"):
        assert load({"name": name, "bridges": str(beta)}).status_code == 200
    r = load({"name": "x3", "bridges": str(beta)})
    assert r.status_code == 409 and "max_loaded_compositions: 2" in r.json()["error"]["message"], r.text
    for name in ("x1", "x2"):
        assert admin_post(server, "/v1/unload_composition", {"name": name}).status_code == 200
    assert served_ids(server) == before
    assert_serves(server)


def test_greedy_chat_uses_the_chat_template_and_equals_in_process_generate(client, reference):
    _, tok = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the key?"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<assistant>")
    prompt_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    want, n = expected_text(reference, prompt_ids, 20)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == n


def test_streamed_completion_through_the_openai_client_equals_the_whole_answer(client, reference):
    _, tok = reference
    prompt = PROMPTS[2]
    want, _ = expected_text(reference, tok(prompt)["input_ids"], 30)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True))
    assert len(chunks) > 2  # really streamed, not one blob
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_streamed_chat_over_raw_http_is_openai_server_sent_events(server, reference):
    _, tok = reference
    messages = [{"role": "user", "content": "Tell me a story"}]
    prompt_ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
    want, n = expected_text(reference, prompt_ids, 25)
    body = {"model": MODEL, "messages": messages, "max_tokens": 25, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == want
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == n


def test_stop_strings_cut_the_answer_before_the_stop(client, reference):
    _, tok = reference
    prompt = PROMPTS[5]
    full, _ = expected_text(reference, tok(prompt)["input_ids"], 30)
    stop = full[5:7]
    assert len(stop) == 2
    for stream in (False, True):
        if stream:
            chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                                               stream=True)
            chunks = list(chunks)
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop)
            text, finish = out.choices[0].text, out.choices[0].finish_reason
        assert text == full[: full.index(stop)]
        assert finish == "stop"


def test_seeded_sampling_repeats_and_temperature_changes_the_answer(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=24, temperature=1.0, top_p=0.95,
                                         seed=seed).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=24, temperature=0).choices[0].text
    assert any(sample(s) != greedy for s in (1, 2, 3))


# ---------------------------------------------------------------------- bad input
LONG = "x" * (CONTEXT + 10)
BAD_INPUTS = [
    # (endpoint, body, status, words in the message)
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/completions", {"model": MODEL}, 400, "missing required key 'prompt'"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": 5}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "'max_tokens' must be >= 1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "more than this server allows"),
    ("/v1/completions", {"prompt": LONG}, 400, f"context is {CONTEXT} tokens"),
    ("/v1/completions", {"prompt": "x" * 500, "max_tokens": 100}, 400, "lower max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("/v1/completions", {"prompt": "hi", "temperature": 7}, 400, "between 0 and 2"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "'stream' must be true or false"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "up to 4 non-empty strings"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, 400,
     "'seed' must be between -9223372036854775808 and 18446744073709551615"),
    ("/v1/completions", {"prompt": "hi", "n": 9}, 400, "n=9 is more than this server decodes together (8)"),
    ("/v1/completions", {"prompt": "hi", "top_k": 5}, 400, "'top_k' is not a parameter this server supports"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"-1": 5}}, 400, "logit_bias keys must be token ids"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 9}, 400, "'frequency_penalty'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}, 400,
     'Unimplemented keys: ["not"]'),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "missing required key 'tools[0].function'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     'tool_choice "auto" (the default when tools are given) is not supported'),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "'messages'"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages' must be"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "'messages[0].role' must be one of system"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "'max_completion_tokens' must be >= 1"),
]


@pytest.mark.parametrize("path, body, status, words", BAD_INPUTS, ids=[f"{i}" for i in range(len(BAD_INPUTS))])
def test_bad_input_gets_a_4xx_json_error_that_says_what_is_wrong(server, path, body, status, words):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert_serves(server)


@pytest.mark.parametrize("method, path, status", [("GET", "/v2/nothing", 404), ("GET", "/v1/completions", 405),
                                                  ("DELETE", "/v1/models", 405)])
def test_unknown_paths_and_methods_get_openai_error_json(server, method, path, status):
    r = httpx.request(method, f"{server}{path}", timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and path in error["message"]
    if status == 405:  # RFC 9110: a 405 lists the methods the path takes
        assert r.headers["allow"], r.headers


def test_the_openapi_spec_declares_typed_request_and_response_bodies(server):
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    for path, body, answer in [("/v1/completions", "CompletionBody", "Completion"),
                               ("/v1/chat/completions", "ChatBody", "ChatCompletion")]:
        post = spec["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + body)
        assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + answer)
        assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    temperature = schemas["CompletionBody"]["properties"]["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    assert "prompt" in schemas["CompletionBody"]["required"] and "messages" in schemas["ChatBody"]["required"]


def test_a_server_without_keys_declares_no_auth_and_one_operation_per_method_in_its_spec(server):
    # schemathesis holds the spec to the server: a declared scheme the server does not enforce is a failure
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    assert "securitySchemes" not in spec.get("components", {})
    ids = [op["operationId"] for operations in spec["paths"].values() for op in operations.values()]
    assert len(ids) == len(set(ids)) and set(spec["paths"]["/health"]) == {"get", "head"}


def test_health_is_503_until_every_deployment_has_loaded_its_model_and_live_is_200(ray_cluster, pair, tmp_path):
    # an augmenting folder without weights: its replica never starts, while the Ingress and the Anchor (which
    # reads only the augmenting config) do; readiness must say so, liveness answers
    import shutil

    broken = tmp_path / "augment_without_weights"
    shutil.copytree(pair.augment, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    settings = ServingArgs(model_name=MODEL, anchor=pair.anchor, augments=[str(broken)], bridges=pair.bridges,
                           max_context=CONTEXT, torch_threads=1)
    options = {name: {"ray_actor_options": {"num_cpus": 0.05}} for name in ("Ingress", "Anchor", "Augment0")}
    serve._run(build_app(settings, options), name="calm-not-ready", route_prefix="/not-ready", _blocking=False)  # not waiting: it never gets ready
    url = f"http://127.0.0.1:{serve.context._get_global_client().http_config.port}/not-ready"
    try:
        def live():
            try:
                return httpx.get(f"{url}/health/live", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(live, 120, "the Ingress to answer")
        r = httpx.get(f"{url}/health", timeout=30)
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        assert r.headers["retry-after"] == "5"
        assert httpx.head(f"{url}/health", timeout=30).status_code == 503
    finally:
        serve.delete("calm-not-ready", _blocking=False)


def test_a_prompt_that_fills_the_context_is_served_and_one_token_more_is_a_400_naming_the_limit(server, reference):
    model, tok = reference
    prompt = [5 + i % 80 for i in range(CONTEXT - 2)]  # token ids: exactly CONTEXT - 2 tokens
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] <= CONTEXT
    assert r.json()["choices"][0]["text"] == tok.decode(reference_completion(model, tok, prompt, 2),
                                                        skip_special_tokens=True)
    over = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0})
    assert over.status_code == 400 and str(CONTEXT) in over.json()["error"]["message"], over.text


def test_the_openai_client_raises_its_own_error_types_for_bad_input(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)


# ---------------------------------------------------------------------- the parameters, through Serve
def test_n_logprobs_and_echo_through_serve_equal_the_in_process_model(client, reference):
    model, tok = reference
    ids = tok(PROMPTS[4])["input_ids"]
    want = reference_completion(model, tok, ids, 6)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=0, n=3, logprobs=2,
                                    echo=True)
    assert [c.index for c in out.choices] == [0, 1, 2]
    with torch.no_grad():  # the whole sequence at once: the prompt's and the answer's logprobs
        full = ids + want
        logits = model(torch.tensor([full]), torch.ones(1, len(full), dtype=torch.long)).logits[0].float()
        expected = [float(x) for x in torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(full[1:])[:, None])]
    for choice in out.choices:
        assert choice.text == PROMPTS[4] + tok.decode(want, skip_special_tokens=True)
        got = choice.logprobs.token_logprobs
        assert got[0] is None and len(got) == len(full)
        assert max(abs(a - b) for a, b in zip(got[1:], expected)) < 1e-4
    assert out.usage.completion_tokens == 3 * len(want)


def test_logit_bias_and_penalties_through_serve_change_the_streamed_answer_and_a_seed_repeats_it(client, reference):
    model, tok = reference
    greedy = reference_completion(model, tok, tok(PROMPTS[0])["input_ids"], 8)
    kwargs = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True,
                  logit_bias={str(greedy[0]): -100})
    text = "".join(c.choices[0].text for c in client.completions.create(**kwargs) if c.choices)
    assert text and not text.startswith(tok.decode(greedy[:1]))
    sampled = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0.8, seed=99, presence_penalty=1.0,
                   frequency_penalty=0.5, n=2)
    first = [c.text for c in client.completions.create(**sampled).choices]
    assert [c.text for c in client.completions.create(**sampled).choices] == first


# ---------------------------------------------------------------------- real clients: lm-eval, schemathesis
def test_lm_eval_loglikelihoods_equal_the_in_process_models_and_its_generations_are_greedy(server, pair, reference,
                                                                                           monkeypatch):
    """lm-evaluation-harness's ``local-completions`` model over HTTP: a loglikelihood task (echo + logprobs) and a
    generate_until task, each a task YAML over a local JSON file (tests/data/lm_eval/)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    model, tok = reference
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files from the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = (f"base_url={server}/v1/completions,model={MODEL},tokenizer={pair.anchor},tokenizer_backend=huggingface,"
            f"tokenized_requests=True,num_concurrent=1,max_retries=1,max_length={CONTEXT}")
    results = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                      tasks=["calm_kv_choice", "calm_kv_generate"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(ROOT / "tests/data/lm_eval")))
    scored = 0
    for sample in results["samples"]["calm_kv_choice"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["filtered_resps"]):
            ctx, cont = tok(context)["input_ids"], tok(continuation)["input_ids"]
            full = ctx + cont
            with torch.no_grad():
                logits = model(torch.tensor([full]), torch.ones(1, len(full), dtype=torch.long)).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            expected = sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))
            greedy = all(int(logp[len(ctx) + j - 1].argmax()) == t for j, t in enumerate(cont))
            assert resp[0] == pytest.approx(expected, abs=1e-4), (context, continuation)
            assert resp[1] == greedy
            scored += 1
    items = json.loads((ROOT / "tests/data/lm_eval/kv_choice.json").read_text())
    assert scored == sum(len(item["choices"]) for item in items)  # every choice of every item was scored
    for sample in results["samples"]["calm_kv_generate"]:
        prompt = sample["arguments"][0][0]
        text = expected_text(reference, tok(prompt)["input_ids"], 8)[0].split("\n")[0]
        assert sample["filtered_resps"][0] == text


def test_schemathesis_finds_no_server_error_and_every_answer_conforms_to_the_spec(server, tmp_path):
    """schemathesis against the served /openapi.json with every check, bounded: no 5xx, every answer's status,
    content type and body as declared. Its one check that can fail here by design, "schema-valid request
    rejected", is for requests the schema cannot rule out (a prompt longer than the model's context, a max_tokens
    above the server's limit, token ids outside the vocabulary): those are 400s naming the limit, as OpenAI does."""
    cli = Path(sys.executable).with_name("schemathesis")
    if not cli.exists():
        pytest.skip("schemathesis is not installed (pip install .[test])")
    proc = subprocess.run([str(cli), "run", f"{server}/openapi.json", "--checks", "all", "--max-examples", "15",
                           "--generation-deterministic", "--request-timeout", "60", "--no-color", "--workers", "2"],
                          capture_output=True, text=True, timeout=400, cwd=tmp_path,  # its .schemathesis/ goes there
                          env={**os.environ, "NO_COLOR": "1"}, check=False)
    out = proc.stdout + proc.stderr
    summary = out[out.rfind("SUMMARY"):]
    failures = re.findall(r"❌ (ST\d+ [^:]+): \d+", summary)
    assert "Test cases:" in summary and "generated" in summary, out[-3000:]
    assert set(failures) <= {"ST202 Schema-valid request rejected"}, out[-6000:]
    assert "Server error" not in out and "[500]" not in out, out[-6000:]
    assert_serves(server)


# ---------------------------------------------------------------------- load, disconnects, failures
async def _complete(http: httpx.AsyncClient, server: str, prompt: str, max_tokens: int, stream: bool = False,
                    on_first_token=None, model: str = MODEL):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        r = await http.post(f"{server}/v1/completions", json=body)
        return r.status_code, (r.json()["choices"][0]["text"] if r.status_code == 200 else r.text)
    text = []
    async with http.stream("POST", f"{server}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    return 500, event
                text.append(event["choices"][0]["text"])
                if on_first_token is not None and len(text) == 1:
                    on_first_token()
    return 200, "".join(text)


def edge_requests_leave_streams_alone(url: str, model: str, tok, streams: list[tuple[str, int]], want: list[str],
                                      edge_prompt: str, greedy: str, edge_tokens: int = 12) -> None:
    """Greedy ``streams`` (prompt, max_tokens) decode while edge requests on ``edge_prompt`` share their batch:
    near-zero temperatures (must give ``greedy``, the limit of sampling), a +100 logit_bias (forces its
    token), -100 on many tokens, penalties at both ends, constrained rows (a JSON Schema enum, greedy and
    sampled; JSON mode against a +100 bias), and four refused ones (a token id outside the vocabulary, max_tokens
    past the context, temperature 3, a schema keyword no grammar enforces). Each stream must get ``want``;
    nothing a 5xx."""
    forced = tok(" yes", add_special_tokens=False)["input_ids"][-1]
    banned = range(3, min(400, len(tok) // 2))
    edge = [({"temperature": t}, "greedy") for t in (3e-38, 5e-324)]
    edge += [({"logit_bias": {str(forced): 100}}, "forced"), ({"logit_bias": {str(i): -100 for i in banned}}, "ok"),
             ({"presence_penalty": 2, "frequency_penalty": 2}, "ok"),
             ({"presence_penalty": -2, "frequency_penalty": -2, "temperature": 2, "seed": 1}, "ok"),
             ({"logit_bias": {str(10**6): 5}}, 400), ({"max_tokens": 10**6}, 400), ({"temperature": 3}, 400)]
    # constrained rows among them: a schema its answer must match, one forced past its end, a schema refused
    yes_no = {"type": "json_schema", "json_schema": {"name": "yes_no", "schema": {"enum": ["yes", "no"]}}}
    edge += [({"response_format": yes_no}, "yes_no"),
             ({"response_format": yes_no, "temperature": 1.5, "seed": 3}, "yes_no"),
             ({"response_format": {"type": "json_object"}, "logit_bias": {str(forced): 100}}, "object"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}, 400)]

    async def main():
        async with httpx.AsyncClient(timeout=300) as http:
            async def post_edge(extra):
                body = {"model": model, "prompt": edge_prompt, "max_tokens": edge_tokens, "temperature": 0, **extra}
                r = await http.post(f"{url}/v1/completions", json=body)
                return r.status_code, r.json()

            async def stream(text, n):
                return await _complete(http, url, text, n, stream=True, model=model)
            return await asyncio.gather(*(stream(p, n) for p, n in streams), *(post_edge(extra) for extra, _ in edge))

    results = asyncio.run(main())
    assert results[: len(streams)] == [(200, text) for text in want]
    for (extra, expect), (status, body) in zip(edge, results[len(streams):]):
        if isinstance(expect, int):
            assert status == expect and body["error"]["message"], (extra, body)
            continue
        assert status == 200, (extra, body)
        text = body["choices"][0]["text"]
        if expect == "greedy":
            assert text == greedy, extra
        elif expect == "forced":
            assert text == tok.decode([forced] * edge_tokens), extra
        elif expect == "yes_no":
            assert json.loads(text) in ("yes", "no"), (extra, text)
        elif expect == "object":
            assert text.startswith("{"), (extra, text)  # +100 on a token rules nothing the grammar rules out


def test_edge_requests_among_running_streams_leave_every_stream_its_solo_answer(server, reference):
    streams = [(PROMPTS[i], 20) for i in range(4)]
    before = anchor_stats()
    edge_requests_leave_streams_alone(server, MODEL, reference[1], streams, _expected_for(reference, PROMPTS[:4], 20),
                                      PROMPTS[2], _expected_for(reference, [PROMPTS[2]], 12)[0])
    assert anchor_stats()["failed"] == before["failed"]


def _expected_for(reference, prompts, max_tokens):
    _, tok = reference
    return [expected_text(reference, tok(p)["input_ids"], max_tokens)[0] for p in prompts]


def test_sixteen_concurrent_clients_all_get_their_own_greedy_answer(server, reference):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    want = _expected_for(reference, prompts, 20)
    before = anchor_stats()

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.wait_for(
                asyncio.gather(*(_complete(http, server, p, 20, stream=i % 2 == 0) for i, p in enumerate(prompts))),
                timeout=180)

    results = asyncio.run(main())
    assert [status for status, _ in results] == [200] * 16
    assert [text for _, text in results] == want
    after = anchor_stats()
    assert after["max_rows_in_step"] > 1  # requests shared decode steps
    assert after["running"] == 0 and after["waiting"] == 0
    assert after["failed"] == before["failed"]


def test_near_zero_temperatures_among_greedy_streams_leave_every_stream_its_solo_answer(server, reference):
    # temperature 3e-38 (inside the documented 0..2) used to make NaN and fail every running request
    prompts = PROMPTS[:8]
    want = _expected_for(reference, prompts, 20)
    before = anchor_stats()

    async def tiny(http, t):
        body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 20, "temperature": t, "seed": 5}
        r = await http.post(f"{server}/v1/completions", json=body)
        return r.status_code, r.json()

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.wait_for(asyncio.gather(
                *(_complete(http, server, p, 20, stream=True) for p in prompts),
                *(tiny(http, t) for t in (3e-38, 2.4e-78, 5e-324))), timeout=180)

    results = asyncio.run(main())
    goods, tinies = results[: len(prompts)], results[len(prompts):]
    assert goods == [(200, text) for text in want]
    greedy = _expected_for(reference, [PROMPTS[2]], 20)[0]
    for status, body in tinies:  # the limit of sampling as t -> 0 is the greedy answer
        assert status == 200 and body["choices"][0]["text"] == greedy, body
    assert anchor_stats()["failed"] == before["failed"]


def test_a_full_queue_answers_503_quickly_instead_of_hanging(server):
    # Anchor: 8 running + 16 queued at most (see the fixture); 40 long requests at once
    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.wait_for(
                asyncio.gather(*(_complete(http, server, PROMPTS[0], 150) for _ in range(40))), timeout=240)

    results = asyncio.run(main())
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503}, [r for r in results if r[0] not in (200, 503)][:2]
    assert statuses.count(503) > 0 and statuses.count(200) >= 8
    rejected = next(text for s, text in results if s == 503)
    assert "capacity" in json.loads(rejected)["error"]["message"]
    assert_serves(server)


def test_a_200_request_burst_answers_every_503_in_openai_json_with_retry_after(server):
    # Anchor: 8 running + 16 queued at most; 200 requests at once overflow it
    async def one(http):
        body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        r = await http.post(f"{server}/v1/completions", json=body)
        return r.status_code, r.headers, r.text

    async def main():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=180, limits=limits) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http) for _ in range(200))), timeout=300)

    results = asyncio.run(main())
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 503}, [r[2] for r in results if r[0] not in (200, 503)][:2]
    assert statuses.count(503) > 0 and statuses.count(200) >= 8
    for status, headers, text in results:
        if status == 503:
            assert headers.get("content-type", "").startswith("application/json"), text
            assert json.loads(text)["error"]["type"] and headers.get("retry-after"), (headers, text)
    assert_serves(server)


def test_a_client_that_disconnects_frees_its_batch_row(server):
    before = anchor_stats()
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got the first token: hang up
    def dropped():
        s = anchor_stats()
        return s if s["cancelled"] > before["cancelled"] and s["running"] == 0 else False

    try:
        wait_until(dropped, 30, "the engine to drop the disconnected request")
    except AssertionError:
        raise AssertionError(f"before {before} now {anchor_stats()}") from None
    assert anchor_stats()["finished"] == before["finished"]  # it was cancelled, not run to the end
    assert_serves(server)


def _replica_actor(cluster, deployment: str):
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard, filters=[
        ("class_name", "=", f"ServeReplica:{APP}:{deployment}"), ("state", "=", "ALIVE")])
    assert actors, f"no live replica of {deployment}"
    return ray.get_actor(actors[0].name, namespace="serve")


def _load_with_a_kill(cluster, server, reference, deployment: str):
    """8 streaming requests; kill the replica of ``deployment`` as soon as tokens flow; every request must
    finish with its own greedy answer."""
    prompts = PROMPTS
    want = _expected_for(reference, prompts, 120)
    victim = _replica_actor(cluster, deployment)

    async def main():
        flowing = asyncio.Event()
        async with httpx.AsyncClient(timeout=120) as http:
            tasks = [asyncio.create_task(_complete(http, server, p, 120, stream=True, on_first_token=flowing.set))
                     for p in prompts]
            await asyncio.wait_for(flowing.wait(), timeout=60)
            ray.kill(victim, no_restart=True)
            in_flight = sum(not t.done() for t in tasks)
            return in_flight, await asyncio.wait_for(asyncio.gather(*tasks), timeout=180)

    in_flight, results = asyncio.run(main())
    assert in_flight >= 1  # the kill hit requests that were still generating
    assert [s for s, _ in results] == [200] * len(prompts), results
    assert [t for _, t in results] == want
    assert_serves(server)


def test_killing_the_augmenting_replica_under_load_loses_no_request(ray_cluster, server, reference):
    before = anchor_stats()
    _load_with_a_kill(ray_cluster, server, reference, "Augment0")
    after = anchor_stats()
    assert after["rebuilt_rows"] > before["rebuilt_rows"]  # the new replica got the rows' histories
    assert after["failed"] == before["failed"]


def test_killing_the_anchor_replica_under_load_resumes_its_requests_elsewhere(ray_cluster, server, reference):
    old = anchor_stats()["engine_id"]
    _load_with_a_kill(ray_cluster, server, reference, "Anchor")
    assert anchor_stats()["engine_id"] != old  # a new replica finished the requests

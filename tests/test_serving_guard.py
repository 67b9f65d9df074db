"""What the server answers to hostile or broken requests, over real HTTP without Ray: no 5xx from input,
bodies bounded (413), strict JSON as pydantic-core parses it (depth, number size, finite numbers, valid
Unicode), API keys (401), and 500s that name a request id but no internals.

The same ``OpenAIFrontend`` + ``guard.install`` (hence ``guard.RequestGuard``) + ``guard.read_body`` that the
Serve Ingress runs, in front of a local ``DecodeEngine``, served by uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request
from starlette.responses import StreamingResponse

from actors.serve.augment_client import LocalAugments
from actors.serve.augment_rows import AugmentRows
from actors.serve.config import ServeConfigError, ServingArgs
from actors.serve.engine import DecodeEngine, RequestFailed
from actors.serve.openai.app import Limits, OpenAIFrontend
from actors.serve.openai.guard import API_KEY_ENV, configure, install, load_api_keys, read_body, settings_for
from actors.serve.openai.schemas import ChatBody, CompletionBody
from actors.serve.reasons import public_reason
from composition.loading import load_tokenizer
from tests.fixtures import build_pair, load_in_process
from tests.test_serving import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
MODEL = "guarded"
KEY = "sk-test-7f3a9c1e5b2d4f60"  # the one key the key tests configure
MIB = 1 << 20


class _Boom(Exception):
    pass


def _ray_task_error(cause: Exception) -> Exception:
    """What a Serve handle raises when the replica's method raised ``cause``: a RayTaskError whose str is the
    remote traceback, with the replica's pid, IP and file paths."""
    from ray.exceptions import RayTaskError

    traceback = ('Traceback (most recent call last):\n  File "/home/ray/anaconda3/lib/python3.11/site-packages/'
                 'ray/serve/_private/replica.py", line 1234, in handle_request_streaming\n'
                 f"{type(cause).__name__}: {cause}")
    return RayTaskError("ServeReplica:calm:Anchor.handle_request_streaming", traceback, cause,
                        proctitle="ray::ServeReplica:calm:Anchor", pid=48213, ip="10.42.7.19").as_instanceof_cause()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, the app's GuardSettings) of a frontend like the Ingress, plus two routes that fail."""
    pair = build_pair(tmp_path_factory.mktemp("guard_pair"))
    model = load_in_process(pair)
    tok = load_tokenizer(pair.anchor)
    engine = DecodeEngine(model, LocalAugments([AugmentRows(model.encoders[0], 0, 0, threading.Lock())]),
                          max_batch_size=4, max_context=512)
    frontend = OpenAIFrontend(tok, MODEL, Limits(context=512, vocab_size=len(tok), default_max_tokens=4),
                              open_stream=engine.generate)

    async def failing_stream(request):  # the anchor replica raised: what a handle gives back
        raise _ray_task_error(RequestFailed("generation failed: the decode engine stopped"))
        yield  # pragma: no cover

    broken = OpenAIFrontend(tok, MODEL, Limits(context=512, vocab_size=len(tok)), open_stream=failing_stream)
    app = FastAPI()
    guard = install(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return frontend.models()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await frontend.completions(await read_body(request, CompletionBody))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await frontend.chat_completions(await read_body(request, ChatBody))

    @app.post("/broken/v1/completions")
    async def broken_completions(request: Request):
        return await broken.completions(await read_body(request, CompletionBody))

    @app.get("/bug/stream")
    async def bug_stream():
        async def events():
            yield 'data: {"choices": []}\n\n'
            raise _Boom("mid-stream at /srv/calm")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/bug")
    async def bug():
        raise _Boom("state file /srv/calm/state.bin at 10.42.7.19:6379 is corrupt")

    port = free_port()
    # log_config=None: uvicorn's loggers propagate to the root logger, so caplog sees its lines too
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "uvicorn to start", interval=0.05)
    yield f"http://127.0.0.1:{port}", guard
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def url(served):
    return served[0]


@contextmanager
def keys_required(guard, *keys: str):
    guard.api_keys = [k.encode() for k in keys]
    try:
        yield
    finally:
        guard.api_keys = []


def post(url, path, content: bytes, headers=None, timeout=60):
    return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=timeout)


def assert_openai_error(r, status: int, words: str, type_: str = "invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error
    assert error["type"] == type_
    return error


def assert_serves(url, headers=None):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 2, "temperature": 0},
                   headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------------- no 5xx from input
# pydantic-core's JSON parser reads the body (guard.read_body): its own limits, and its words for where it stopped
def _deep(levels: int) -> bytes:
    return b'{"prompt": "hi", "x": ' + b"[" * levels + b"]" * levels + b"}"


def _deep_schema(levels: int) -> bytes:  # nested where any JSON is taken: response_format.json_schema.schema
    return (b'{"prompt": "hi", "response_format": {"type": "text", "json_schema": {"name": "x", "schema": '
            + b'{"a": ' * levels + b"1" + b"}" * levels + b"}}}")


CHAT_SURROGATE = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
PART_SURROGATE = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'
SURROGATE = 'a lone UTF-16 surrogate (such as "\\ud800"), which is not valid Unicode'
BAD_BODIES = [
    # (test id, path, body, status, words in the message, error code, param)
    ("json nested 1,500 deep", "/v1/completions", _deep(1500), 400,
     "nests too deep (recursion limit exceeded at line 1 column", "json_too_deep", None),
    ("json nested 300 deep where any JSON is taken", "/v1/completions", _deep_schema(300), 400, "nests too deep",
     "json_too_deep", None),
    ("integer of 5,000 digits", "/v1/completions", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400,
     "a number too large to read (number out of range at line 1 column", "number_too_large", None),
    ("max_tokens of 4,000 digits", "/v1/completions", b'{"prompt": "hi", "max_tokens": ' + b"9" * 4000 + b"}", 400,
     "max_tokens=999999999999... (4000 digits) is more than this server allows", None, "max_tokens"),
    ("float past 64 bits", "/v1/completions", b'{"prompt": "hi", "temperature": 1e999}', 400,
     "'temperature' must be a finite number, got Infinity", None, "temperature"),
    ("NaN", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400,
     "'temperature' must be a finite number, got NaN", None, "temperature"),
    ("-Infinity in logit_bias", "/v1/completions", b'{"prompt": "hi", "logit_bias": {"5": -Infinity}}', 400,
     "'logit_bias.5' must be a finite number", None, "logit_bias.5"),
    ("lone surrogate in prompt", "/v1/completions", b'{"prompt": "\\ud800"}', 400,
     f"{SURROGATE} (unexpected end of hex escape at line 1 column 19)", "invalid_unicode", None),
    ("lone surrogate in a prompt list", "/v1/completions", b'{"prompt": ["ok", "\\udc00"]}', 400,
     f"{SURROGATE} (lone leading surrogate in hex escape at line 1 column 25)", "invalid_unicode", None),
    ("lone surrogate in model", "/v1/completions", b'{"prompt": "hi", "model": "\\ud800"}', 400, SURROGATE,
     "invalid_unicode", None),
    ("lone surrogate in chat content", "/v1/chat/completions", CHAT_SURROGATE, 400, SURROGATE, "invalid_unicode", None),
    ("lone surrogate in a text part", "/v1/chat/completions", PART_SURROGATE, 400, SURROGATE, "invalid_unicode", None),
    ("lone surrogate in a key", "/v1/completions", b'{"prompt": "hi", "\\ud800": 1}', 400, SURROGATE,
     "invalid_unicode", None),
    ("bytes that are not UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400,
     "not valid UTF-8 (invalid unicode code point at line 1 column 13)", "invalid_encoding", None),
    ("malformed JSON", "/v1/completions", b'{"prompt": ', 400, "not valid JSON (EOF while parsing a value", None, None),
    ("a 2 MiB body", "/v1/completions", json.dumps({"prompt": "x" * (2 * MIB)}).encode(), 413,
     f"larger than this server accepts ({MIB} bytes)", "request_too_large", None),
]


@pytest.mark.parametrize("path, body, status, words, code, param", [b[1:] for b in BAD_BODIES],
                         ids=[b[0] for b in BAD_BODIES])
def test_a_malformed_body_gets_a_4xx_openai_error_naming_the_problem(url, path, body, status, words, code, param):
    error = assert_openai_error(post(url, path, body), status, words)
    assert (error["code"], error["param"]) == (code, param)
    assert_serves(url)


def test_a_chunked_body_past_the_limit_is_counted_while_read_and_refused_with_413(url):
    sent = []

    def chunks():  # no Content-Length: httpx sends it chunked
        for _ in range(64):  # 4 MiB offered; the server stops reading past 1 MiB
            sent.append(1)
            yield b" " * (64 * 1024)

    try:
        r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"},
                       timeout=60)
    except httpx.HTTPError:  # the server may close the connection while the client still sends
        pytest.fail("the server closed the connection without answering 413")
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_openai_error(r, 413, "larger than this server accepts")
    assert_serves(url)


def test_a_declared_length_past_the_limit_is_refused_before_the_body_is_read(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:  # headers only: no client sends this
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {100 * MIB}\r\n\r\n{{}}".encode())
        answer = b""
        while b"request_too_large" not in answer:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"larger than this server accepts" in answer


def test_a_well_formed_surrogate_pair_and_non_ascii_text_are_served(url):
    for body in (b'{"prompt": "\\ud83d\\ude00 ok", "max_tokens": 2}', '{"prompt": "café ☕", "max_tokens": 2}'.encode()):
        assert post(url, "/v1/completions", body).status_code == 200


def test_a_json_body_sent_without_a_content_type_is_served_as_json(url):
    # as it always was: clients (and the autoscale test's load) post JSON without the header
    r = httpx.post(f"{url}/v1/completions", content=json.dumps({"prompt": "hi", "max_tokens": 2}), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_a_body_with_another_content_type_is_still_bounded(url):
    r = post(url, "/v1/completions", b"x" * (2 * MIB), headers={"Content-Type": "text/plain"})
    assert_openai_error(r, 413, "larger than this server accepts")


def test_a_body_sent_as_another_content_type_is_a_400_naming_it(url):
    r = post(url, "/v1/completions", b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"})
    assert_openai_error(r, 400, "must be JSON sent as Content-Type: application/json, got Content-Type 'text/plain'")
    assert post(url, "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}',
                headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200


SCHEMA_VIOLATIONS = [
    # (body, words in the message, param): what the key accepts, read from the schema's own declarations
    ({"prompt": "hi", "temperature": 7}, "'temperature' must be between 0 and 2, got 7", "temperature"),
    ({"prompt": "hi", "top_p": 0}, "'top_p' must be in (0, 1], got 0", "top_p"),
    ({"prompt": "hi", "n": 0}, "'n' must be between 1 and 128, got 0", "n"),
    ({"prompt": "hi", "max_tokens": -3}, "'max_tokens' must be >= 1, got -3", "max_tokens"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, "'logit_bias.5' must be between -100 and 100, got 101",
     "logit_bias.5"),
    ({"prompt": "hi", "stop": ["a", ""]},
     "'stop' must be a non-empty string or a list of up to 4 non-empty strings, got [\"a\", \"\"]", "stop"),
    ({"prompt": "hi", "max_tokens": "5"}, "'max_tokens' must be an integer, got '5'", "max_tokens"),
    ({"prompt": "hi", "metadata": {"k": 1}}, "'metadata.k' must be a string, got 1", "metadata.k"),
    ({"prompt": "hi", "top_k": 5}, "'top_k' is not a parameter this server supports", "top_k"),
    ({}, "missing required key 'prompt'", "prompt"),
]


@pytest.mark.parametrize("body, words, param", SCHEMA_VIOLATIONS, ids=[w[:40] for _, w, _ in SCHEMA_VIOLATIONS])
def test_a_schema_violation_names_the_key_and_what_the_schema_accepts(url, body, words, param):
    error = assert_openai_error(post(url, "/v1/completions", json.dumps(body).encode()), 400, words)
    assert error["param"] == param


def test_a_chat_message_is_named_by_its_index(url):
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "hi"}]}
    error = assert_openai_error(post(url, "/v1/chat/completions", json.dumps(body).encode()), 400,
                                "'messages[1].role' must be one of system, developer, user, assistant, tool, got "
                                "'wizard'")
    assert error["param"] == "messages[1].role"


# ---------------------------------------------------------------------- unexpected failures
def test_an_unexpected_exception_is_a_500_with_a_request_id_and_no_internals(url, caplog):
    caplog.set_level(logging.DEBUG)
    r = httpx.get(f"{url}/bug", timeout=30)
    error = assert_openai_error(r, 500, "internal error (request id ", type_="server_error")
    assert error["code"] == "internal_error"
    for leak in ("/srv/calm", "10.42.7.19", "Traceback", "_Boom", "corrupt"):
        assert leak not in r.text
    rid = error["message"].split("request id ")[1].split(")")[0]
    lines = [rec for rec in caplog.records if rid in rec.getMessage() and rec.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()  # one line; the traceback only at debug level
    assert not any("Exception in ASGI application" in rec.getMessage() for rec in caplog.records)
    assert_serves(url)


def test_an_exception_inside_a_started_stream_ends_it_with_an_error_event_and_done(url):
    with httpx.stream("GET", f"{url}/bug/stream", timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == 'data: {"choices": []}' and lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == "internal_error" and "/srv/calm" not in lines[-2]


def test_a_replica_failure_is_a_500_without_the_remote_traceback(url, caplog):
    caplog.set_level(logging.DEBUG)
    r = post(url, "/broken/v1/completions", b'{"prompt": "hi"}')
    error = assert_openai_error(r, 500, "generation failed (RequestFailed: generation failed: the decode engine "
                                        "stopped); request id cmpl-", type_="server_error")
    for leak in ("48213", "10.42.7.19", "Traceback", "site-packages", "ray::", "pid="):
        assert leak not in error["message"], error
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING
                and rec.name == "calm_ray.api"]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "10.42.7.19" not in warnings[0]


def test_public_reason_keeps_one_line_without_pids_addresses_or_paths():
    wrapped = RequestFailed("generation failed: augmenting deployment Augment0 did not answer step for 30 s (last "
                            "error: RayTaskError: ray::ServeReplica:calm:Augment0.step() (pid=4242, ip=10.1.2.3, "
                            "actor_id=0123456789abcdef0123)\n  File \"/opt/ray/replica.py\", line 9\nValueError: x")
    reason = public_reason(_ray_task_error(wrapped))
    assert reason.startswith("RequestFailed: generation failed: augmenting deployment Augment0 did not answer")
    for leak in ("4242", "10.1.2.3", "0123456789abcdef", "/opt/ray", "\n", "ray::"):
        assert leak not in reason, reason
    assert public_reason(RuntimeError("reading /srv/x/y.bin from 10.0.0.1:6379")) == "RuntimeError: reading from"


def test_public_reason_drops_terminal_colour_codes_and_keeps_the_first_line_that_says_something():
    # Ray colours its task headers: a 500's message used to end at "generation failed: \x1b[36m"
    coloured = RuntimeError("\x1b[36mray::ServeReplica:calm:Augment0.extend()\x1b[39m (pid=7, ip=10.0.0.9)\n"
                            "TypeError: sizes of tensors must match")
    assert public_reason(coloured) == "RuntimeError: TypeError: sizes of tensors must match"
    reason = public_reason(RuntimeError("generation failed: \x1b[1m\x1b[31mboom\x1b[0m in step"))
    assert reason == "RuntimeError: generation failed: boom in step" and "\x1b" not in reason


# ---------------------------------------------------------------------- API keys
def test_a_server_with_keys_declares_the_bearer_scheme_on_every_path_but_the_probes():
    from actors.serve import deployments

    guard = settings_for(deployments.INGRESS_GUARD)
    saved = guard.api_keys
    try:
        guard.api_keys, deployments.api.openapi_schema = [KEY.encode()], None
        spec = deployments.api.openapi()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                assert ("security" in operation) == (not path.startswith("/health")), (method, path)
    finally:
        guard.api_keys, deployments.api.openapi_schema = saved, None


def test_without_a_key_every_path_but_health_is_401(served):
    url, guard = served
    with keys_required(guard, KEY):
        assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
        for r in (httpx.get(f"{url}/v1/models", timeout=30),
                  post(url, "/v1/completions", b'{"prompt": "hi"}'),
                  httpx.get(f"{url}/no/such/path", timeout=30)):
            error = assert_openai_error(r, 401, "no API key given")
            assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", [f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer", f"Basic {KEY}", KEY])
def test_a_wrong_key_is_401(served, header):
    url, guard = served
    with keys_required(guard, KEY):
        r = post(url, "/v1/completions", b'{"prompt": "hi"}', headers={"Authorization": header})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in r.text


def test_any_configured_key_is_accepted_and_the_openai_client_works_with_it(served):
    url, guard = served
    with keys_required(guard, "sk-other", KEY):
        assert_serves(url, headers={"Authorization": f"Bearer {KEY}"})
        assert_serves(url, headers={"Authorization": "bearer sk-other"})
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0, timeout=60).models.list()


def test_a_bad_body_without_a_key_is_401_before_the_body_is_read(served):
    url, guard = served
    with keys_required(guard, KEY):
        r = post(url, "/v1/completions", b"x" * (2 * MIB))
        assert r.status_code == 401


def test_no_key_appears_in_any_log_line(served, caplog):
    url, guard = served
    caplog.set_level(logging.DEBUG)
    with keys_required(guard, KEY):
        post(url, "/v1/completions", b'{"prompt": "hi"}', headers={"Authorization": f"Bearer {KEY}"})
        post(url, "/v1/completions", b'{"prompt": "hi"}', headers={"Authorization": f"Bearer {KEY}-wrong"})
        post(url, "/v1/completions", b'{"prompt": "\\ud800"}', headers={"Authorization": f"Bearer {KEY}"})
        httpx.get(f"{url}/bug", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert any("/v1/completions" in rec.getMessage() for rec in caplog.records)  # the access log was captured
    for rec in caplog.records:
        text = rec.getMessage() + (logging.Formatter().formatException(rec.exc_info) if rec.exc_info else "")
        assert KEY not in text, rec
    assert KEY not in repr(guard)


def test_keys_come_from_the_environment_and_the_key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# calm-ray keys\nsk-file-1\n\n  sk-file-2  \n")
    keys = load_api_keys(str(path), environ={API_KEY_ENV: "sk-env-1, sk-env-2,,sk-file-1"})
    assert keys == [b"sk-env-1", b"sk-env-2", b"sk-file-1", b"sk-file-2"]
    assert load_api_keys(None, environ={}) == []


def test_a_missing_or_empty_key_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="api_key_file '.*nowhere' does not exist on this node"):
        load_api_keys(str(tmp_path / "nowhere"), environ={})
    (tmp_path / "empty").write_text("# no keys yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(str(tmp_path / "empty"), environ={})
    args = ServingArgs(anchor=str(ROOT), augments=[str(ROOT)], bridges=str(ROOT), api_key_file=str(tmp_path / "nope"))
    with pytest.raises(ServeConfigError, match="api_key_file .*nope' does not exist"):
        args.check_paths()


def test_the_cli_check_names_a_missing_key_file(tmp_path, capsys):
    from jobs.serve import main

    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    config["applications"][0]["args"]["api_key_file"] = str(tmp_path / "missing_keys")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), "--check"]) == 2
    assert "missing_keys' does not exist" in capsys.readouterr().err


def test_serving_args_bound_bodies_to_one_mib_by_default():
    args = ServingArgs(anchor="a", augments=["b"], bridges="c")
    assert args.max_body_bytes == MIB and args.api_key_file is None
    assert settings_for("a guard nothing configured").max_body_bytes == MIB


def test_a_guard_configured_from_serving_args_takes_their_body_limit_and_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    (tmp_path / "keys").write_text("sk-file-1\n")
    args = ServingArgs(anchor="a", augments=["b"], bridges="c", max_body_bytes=4096,
                       api_key_file=str(tmp_path / "keys"))
    settings = configure("configured from args", args)
    assert (settings.max_body_bytes, settings.api_keys) == (4096, [b"sk-file-1"])
    assert settings_for("configured from args") is settings


def test_the_ray_token_file_is_made_private(tmp_path):
    from actors.serve.launch import make_token_private

    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir(mode=0o755)
    token.write_text("secret")
    token.chmod(0o644)
    make_token_private(token)
    assert (token.stat().st_mode & 0o777, token.parent.stat().st_mode & 0o777) == (0o600, 0o700)


def test_the_ingress_guard_applies_the_keys_its_replica_sets_to_the_app_serve_pickled():
    # Serve's @serve.ingress runs cloudpickle.loads(cloudpickle.dumps(app)): a copy made at import, before
    # Ingress.__init__ reads the keys. The copy must still see them (looked up by name in the process).
    from fastapi.testclient import TestClient
    from ray import cloudpickle

    from actors.serve.deployments import INGRESS_GUARD, api

    frozen = cloudpickle.loads(cloudpickle.dumps(api))
    with keys_required(settings_for(INGRESS_GUARD), KEY):
        http = TestClient(frozen, raise_server_exceptions=False)
        assert http.get("/v2/nothing").status_code == 401
        r = http.get("/v2/nothing", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"

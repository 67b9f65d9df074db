"""The OpenAI frontend over real HTTP without Ray: request timeouts and stop strings across chunks.

``OpenAIFrontend`` in front of a local ``DecodeEngine`` (the Serve replicas' code, in-process),
served by uvicorn on 127.0.0.1: timeouts can be made short here without slowing the Serve tests.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from actors.serve.augment_client import LocalAugments
from actors.serve.augment_rows import AugmentRows
from actors.serve.engine import DecodeEngine
from actors.serve.openai.app import Limits, OpenAIFrontend, TextAssembler
from composition.loading import load_tokenizer
from tests.fixtures import build_pair, load_in_process
from tests.test_serving import serve_frontend, wait_until


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, engine) of a frontend with a 0.3 s request timeout."""
    pair = build_pair(tmp_path_factory.mktemp("frontend_pair"))
    model = load_in_process(pair)
    tok = load_tokenizer(pair.anchor)
    engine = DecodeEngine(model, LocalAugments([AugmentRows(model.encoders[0], 0, 0, threading.Lock())]),
                          max_batch_size=4, max_context=512)
    frontend = OpenAIFrontend(tok, "local", Limits(context=512, vocab_size=len(tok), request_timeout_s=0.3),
                              open_stream=engine.generate)
    with serve_frontend(frontend) as url:
        yield url, engine


def test_a_request_past_the_timeout_gets_a_504_and_frees_its_row(served):
    url, engine = served
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 500, "ignore_eos": True}, timeout=60)
    assert r.status_code == 504, r.text
    assert "request timeout of 0.3 s" in r.json()["error"]["message"]
    assert re.search(r"\(request id cmpl-[0-9a-f]{24}\)$", r.json()["error"]["message"]), "the log line's id"
    assert time.monotonic() - started < 10
    wait_until(lambda: engine.stats()["running"] == 0, 10, "the timed-out row to be dropped")
    assert engine.counters["cancelled"] >= 1
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_a_streamed_request_past_the_timeout_ends_with_an_error_event(served):
    url, _ = served
    body = {"prompt": "a", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"type": "timeout"' in lines[-2] and "(request id cmpl-" in lines[-2]


def test_a_single_stop_string_of_any_length_cuts_the_answer(served):
    # the 4-item bound is the list's: "\nSpanish:" or "User:" alone used to be a 400
    url, _ = served
    body = {"prompt": "a", "max_tokens": 12, "ignore_eos": True, "temperature": 0}
    full = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    stop = full[3:9]
    assert len(stop) == 6 and full.index(stop) == 3
    r = httpx.post(f"{url}/v1/completions", json={**body, "stop": stop}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == full[:3] and r.json()["choices"][0]["finish_reason"] == "stop"


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_split_across_chunks_never_leak_into_the_stream():
    text = TextAssembler(_CharTokenizer(), stop=["END"])
    out = [text.add([ord(c)]) for c in "abcEN"]
    assert "".join(out) == "abc"  # "EN" may start "END": held back
    out.append(text.add([ord("D"), ord("x")]))
    assert text.stopped and "".join(out) == "abc"


def test_held_back_text_is_released_when_it_did_not_become_a_stop_string():
    text = TextAssembler(_CharTokenizer(), stop=["END"])
    out = [text.add([ord(c)]) for c in "abEN"] + [text.add([ord("!")]), text.finish()]
    assert "".join(out) == "abEN!" and not text.stopped

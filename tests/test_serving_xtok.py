"""Serving across tokenizers over real HTTP: an anchor with a byte-level BPE tokenizer composed with an
augmenting model with a SentencePiece-style tokenizer, served by Ray Serve on 127.0.0.1.

The anchor replica aligns the text and sends the augmenting replica each row's closed augmenting
tokens (docs/serving.md, "Serving across tokenizers"); greedy answers must equal in-process
``ComposedModel.generate`` built with both tokenizers. The first tests (which tokenizers a replica
serves with) need no cluster.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from actors.serve.config import ServeConfigError, ServingArgs  # noqa: E402
from actors.serve.deployments import build_app, serving_tokenizers  # noqa: E402
from composition.checkpoint import read_meta  # noqa: E402
from composition.loading import load_tokenizer  # noqa: E402
from tests.fixtures import build_pair, reference_completion  # noqa: E402
from tests.fixtures_xtok import build_xtok_pair, load_xtok_in_process  # noqa: E402
from tests.test_serving import free_port, wait_until  # noqa: E402

APP = "calm-xtok"
MODEL = "calm-xtok-model"
CONTEXT = 512
PROMPTS = ["Hola, ¿qué tal?  Très bien.", "Emoji 😀👍🏽 here;\n\n  the   end", "日本語 and 中文 text", "Straße"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_xtok_pair(tmp_path_factory.mktemp("served_xtok_pair"), "byte_bpe", "sentencepiece")


def args(pair, **extra) -> ServingArgs:
    return ServingArgs(model_name=MODEL, anchor=pair.anchor, augments=[pair.augment], bridges=pair.bridges, **extra)


# ---------------------------------------------------------------------- which tokenizers a replica serves with
def test_an_augmenting_model_with_its_own_tokenizer_is_served_across_tokenizers(pair):
    tokenizers = serving_tokenizers(args(pair), args(pair).compositions[0], read_meta(pair.bridges))
    assert tokenizers is not None and len(tokenizers) == 2
    assert len(tokenizers[0]) != len(tokenizers[1])  # byte-level BPE and SentencePiece


def test_models_sharing_one_tokenizer_keep_the_shared_tokenizer_path(tmp_path):
    shared = build_pair(tmp_path)
    assert serving_tokenizers(args(shared), args(shared).compositions[0], read_meta(shared.bridges)) is None


def test_a_tokenizer_other_than_the_bridges_recorded_is_refused(pair):
    wrong = args(pair, augment_tokenizers=[pair.anchor])  # the anchor's tokenizer for the augmenting model
    with pytest.raises(ValueError, match="tokenizer of augmenting model 0 is not the one the bridges"):
        serving_tokenizers(wrong, wrong.compositions[0], read_meta(pair.bridges))


def test_augment_tokenizers_needs_one_entry_per_augmenting_model(pair):
    with pytest.raises(ServeConfigError, match="'augment_tokenizers' has 2 entries for 1 augmenting models"):
        ServingArgs.from_dict({"anchor": pair.anchor, "augments": [pair.augment], "bridges": pair.bridges,
                               "augment_tokenizers": [None, pair.augment]})
    parsed = ServingArgs.from_dict({"anchor": "a", "augments": "b,c", "bridges": "d", "augment_tokenizers": ",t"})
    assert parsed.compositions[0].augment_tokenizers == [None, "t"]


# ---------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def reference(pair):
    return load_xtok_in_process(pair), load_tokenizer(pair.anchor)


@pytest.fixture(scope="module")
def server(ray_cluster, pair):
    """Base URL of the served cross-tokenizer application on 127.0.0.1."""
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, namespace="serve")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    settings = args(pair, max_batch_size=8, max_context=CONTEXT, default_max_tokens=16, request_timeout_s=90,
                    augment_retry_s=90, torch_threads=1)
    options = {
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
        "Anchor": {"ray_actor_options": {"num_cpus": 0.3}, "max_ongoing_requests": 8, "max_queued_requests": 16},
        "Augment0": {"ray_actor_options": {"num_cpus": 0.3}},
    }
    serve.run(build_app(settings, options), name=APP, route_prefix="/xtok")
    url = f"http://127.0.0.1:{serve.context._get_global_client().http_config.port}/xtok"
    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 90, "the health endpoint")
    yield url
    serve.delete(APP)


def expected(reference, prompt: str, max_tokens: int) -> tuple[str, int]:
    model, tok = reference
    new = reference_completion(model, tok, tok(prompt)["input_ids"], max_tokens)
    return tok.decode(new, skip_special_tokens=True), len(new)


def test_concurrent_greedy_completions_across_tokenizers_equal_in_process_generate(server, reference):
    lengths = [24, 32, 20, 28]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(prompt, n, stream):
                body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}
                if not stream:
                    r = await client.post(f"{server}/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]
                text = ""
                async with client.stream("POST", f"{server}/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text, None
            return await asyncio.gather(*(one(p, n, i % 2 == 1) for i, (p, n) in enumerate(zip(PROMPTS, lengths))))

    results = asyncio.run(main())
    for prompt, n, (text, count) in zip(PROMPTS, lengths, results):
        want, want_count = expected(reference, prompt, n)
        # the server holds back an incomplete UTF-8 character at the very end; everything else is exact
        assert text.rstrip("\ufffd") == want.rstrip("\ufffd")
        assert count in (None, want_count)
    stats = serve.get_deployment_handle("Anchor", app_name=APP).stats.remote().result(timeout_s=30)
    assert stats["failed"] == 0 and stats["finished"] >= len(PROMPTS)

"""The bare anchor served beside the composition (``anchor_name``), from the same engine and the same batches, as
vLLM serves a base model beside its adapters: a bare row feeds no augmenting model, so its bridges see no key
and add zero, and its greedy answer is the anchor's alone; composed rows in the same steps keep theirs.

Checked on the engine (no Ray) for one shared tokenizer and across tokenizers, and over real HTTP with the
``openai`` client (``/v1/models`` and the ``model`` field); tests/test_language_serving.py does it on the real
pair through Ray Serve.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from actors.serve.engine import GenerationRequest
from actors.serve.openai.app import Limits, OpenAIFrontend
from composition.loading import load_tokenizer
from composition.model import DEFAULT
from tests.fixtures import build_pair, load_in_process, reference_completion
from tests.fixtures_xtok import build_xtok_pair, load_xtok_in_process, randomise_bridges
from tests.test_serving import serve_frontend
from tests.test_serving_engine import collect, make_engine

PROMPTS = ["The key of door seven is", "Hola, ¿qué tal?  Très bien.", "a", "Roses are red,", "Über naïve words"]
LENGTHS = [14, 24, 8, 18, 10]


@torch.no_grad()
def anchor_alone(model, prompt_ids: list[int], max_tokens: int, eos: int) -> list[int]:
    """Greedy decoding of the anchor by itself (its bridge hooks idle outside a composed forward), the whole
    sequence recomputed each token."""
    ids, new = list(prompt_ids), []
    for _ in range(max_tokens):
        token = int(model.anchor(torch.tensor([ids])).logits[0, -1].argmax())
        new.append(token)
        ids.append(token)
        if token == eos:
            break
    return new


@pytest.fixture(scope="module", params=["shared", "xtok"])
def pair(request, tmp_path_factory):
    """(in-process composed model, anchor tokenizer) for one shared tokenizer, and for two."""
    folder = tmp_path_factory.mktemp(f"bare_{request.param}")
    if request.param == "shared":
        built = build_pair(folder)
        return load_in_process(built), load_tokenizer(built.anchor)
    built = build_xtok_pair(folder)
    # the pair's anchor walks its vocabulary strongly; louder bridges make the composed answers differ from it
    return randomise_bridges(load_xtok_in_process(built), seed=1, scale=3.0), load_tokenizer(built.anchor)


def test_bare_and_composed_rows_in_one_batch_each_give_their_own_models_answer(pair):
    model, tok = pair
    engine, _ = make_engine(model)
    eos = tok.eos_token_id
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    # every prompt twice, bare and composed, arriving staggered: rows join a batch of both kinds
    jobs = [(i, bare) for i in range(len(PROMPTS)) for bare in (True, False)]

    async def main():
        async def one(k, i, bare):
            await asyncio.sleep(0.01 * k)
            return await collect(engine, GenerationRequest(prompts[i], LENGTHS[i], eos_ids=[eos],
                                                          composition=None if bare else DEFAULT))
        return await asyncio.gather(*(one(k, i, bare) for k, (i, bare) in enumerate(jobs)))

    results = asyncio.run(main())
    differ = 0
    for (i, bare), (tokens, _) in zip(jobs, results):
        want = (anchor_alone(model, prompts[i], LENGTHS[i], eos) if bare
                else reference_completion(model, tok, prompts[i], LENGTHS[i]))
        assert tokens == want, (PROMPTS[i], "bare" if bare else "composed")
    for i in range(len(PROMPTS)):
        differ += results[2 * i][0] != results[2 * i + 1][0]
    assert differ >= 3, "the bridges change most answers, or this test could not tell the two apart"
    assert engine.counters["max_rows_in_step"] >= 4


def test_a_bare_request_with_the_prompt_of_a_composed_one_is_not_served_its_prefill(pair):
    """Equal prompts admitted together share one prefill; a bare and a composed row must not."""
    model, tok = pair
    engine, _ = make_engine(model)
    prompt = tok(PROMPTS[0])["input_ids"]

    eos = [tok.eos_token_id]

    async def main():
        return await asyncio.gather(collect(engine, GenerationRequest(prompt, 12, eos_ids=eos, composition=None)),
                                    collect(engine, GenerationRequest(prompt, 12, eos_ids=eos)))

    (bare, _), (composed, _) = asyncio.run(main())
    assert bare == anchor_alone(model, prompt, 12, eos[0])
    assert composed == reference_completion(model, tok, prompt, 12)
    assert engine.counters["shared_prefill_rows"] == 0
    assert bare != composed


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    built = build_pair(tmp_path_factory.mktemp("bare_http"))
    model, tok = load_in_process(built), load_tokenizer(built.anchor)
    engine, _ = make_engine(model)
    frontend = OpenAIFrontend(tok, "calm-tiny", Limits(context=512, vocab_size=len(tok), default_max_tokens=8),
                              open_stream=engine.generate, anchor_name="tiny-anchor")
    with serve_frontend(frontend) as url:
        yield url, model, tok


def test_models_lists_the_composition_with_its_anchor_as_parent_and_the_anchor(served):
    url, _, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"calm-tiny", "tiny-anchor"}
    assert cards["calm-tiny"].parent == "tiny-anchor" and cards["tiny-anchor"].parent is None


def test_the_model_field_picks_the_composition_or_the_bare_anchor_over_http(served):
    url, model, tok = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = PROMPTS[3]
    ids = tok(prompt)["input_ids"]
    for name, want in [("tiny-anchor", anchor_alone(model, ids, 16, tok.eos_token_id)),
                       ("calm-tiny", reference_completion(model, tok, ids, 16))]:
        out = client.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0)
        assert out.model == name and out.choices[0].text == tok.decode(want, skip_special_tokens=True)
        chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0, stream=True))
        assert {c.model for c in chunks} == {name}
    r = httpx.post(f"{url}/v1/completions", json={"model": "gpt-4", "prompt": "hi"}, timeout=30)
    assert r.status_code == 404 and "serves 'calm-tiny' and 'tiny-anchor'" in r.json()["error"]["message"]

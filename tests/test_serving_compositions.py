"""Many compositions over one anchor (``ComposedModel.stack``), decoded in the same engine and the same steps: each
row's bridges apply to that row only, a bare-anchor row gets none, and every greedy answer equals what its
composition gives alone, in-process. Checked for one shared tokenizer and across tokenizers (a stack holding a
composition of each kind), and over real HTTP with the ``openai`` client; tests/test_serving_compositions_ray.py
serves a config of several compositions through Ray Serve.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import openai
import pytest

from actors.serve.augment_client import LocalAugments
from actors.serve.augment_rows import AugmentRows
from actors.serve.engine import DecodeEngine, GenerationRequest
from actors.serve.openai.app import Limits, OpenAIFrontend
from composition import ComposedModel
from composition.augment import AugmentEncoder
from composition.config import ConfigError
from composition.loading import load_causal_lm, load_tokenizer
from tests.fixtures import build_pair, reference_completion, write_augment, write_bridges
from tests.fixtures_xtok import build_xtok_pair
from tests.test_serving import serve_frontend
from tests.test_serving_bare_anchor import anchor_alone
from tests.test_serving_engine import collect

PROMPTS = ["The key of door seven is", "Hola, ¿qué tal?", "Roses are red,", "Über naïve words"]
LENGTHS = [14, 20, 16, 10]


def compositions_of(folder: Path, kind: str) -> tuple[str, dict[str, tuple[str, str, bool]]]:
    """(anchor folder, name -> (augmenting folder, bridges folder, own tokenizers)): three compositions over one
    anchor. Two share an augmenting model (their bridges differ: seeds and layers); the third has its own. With
    "xtok", the shared model reads its own tokenizer and the third reads the anchor's: one stack, both paths."""
    if kind == "shared":
        pair = build_pair(folder)
        xtok = False
    else:
        pair = build_xtok_pair(folder)
        xtok = True
    other = write_augment(folder / "augment_b", pair.anchor, hidden=48, seed=11)
    return pair.anchor, {
        "alpha": (pair.augment, write_bridges(folder / "alpha", pair.anchor, pair.augment, 1, own_tokenizers=xtok),
                  xtok),
        "beta": (pair.augment, write_bridges(folder / "beta", pair.anchor, pair.augment, 2, ((1, 1), (3, 3)),
                                            own_tokenizers=xtok), xtok),
        "gamma": (other, write_bridges(folder / "gamma", pair.anchor, other, 3, ((0, 1), (4, 4))), False),
    }


def load_composition(anchor, anchor_path: str, augment, augment_path: str, bridges: str, own: bool):
    tokenizers = [load_tokenizer(anchor_path), load_tokenizer(augment_path)] if own else None
    return ComposedModel.from_pretrained(bridges, anchor, [augment], tokenizers=tokenizers)


def load_stack(anchor_path: str, spec: dict) -> ComposedModel:
    """The stack as a server loads it: the anchor once, each augmenting folder once."""
    anchor = load_causal_lm(anchor_path)
    augments = {path: load_causal_lm(path) for path, _, _ in spec.values()}
    return ComposedModel.stack({name: load_composition(anchor, anchor_path, augments[a], a, b, own)
                                for name, (a, b, own) in spec.items()})


def load_alone(anchor_path: str, augment: str, bridges: str, own: bool) -> ComposedModel:
    """One composition by itself, its own models loaded: the reference."""
    return load_composition(load_causal_lm(anchor_path), anchor_path, load_causal_lm(augment), augment, bridges, own)


def stack_engine(model: ComposedModel, max_batch_size: int = 16) -> DecodeEngine:
    """The engine of a stack; each augmenting side has its own encoder, as in a Serve replica (it learns which
    layers to compute from the engine's calls)."""
    lock = threading.Lock()
    rows = [AugmentRows(AugmentEncoder(encoder.model, encoder.indices), augment=m, pad_id=pad, lock=lock)
            for m, (encoder, pad) in enumerate(zip(model.encoders, model.aligner.augment_pad_ids))]
    return DecodeEngine(model, LocalAugments(rows), max_batch_size=max_batch_size, max_context=512)


@pytest.fixture(scope="module", params=["shared", "xtok"])
def stacked(request, tmp_path_factory):
    anchor, spec = compositions_of(tmp_path_factory.mktemp(f"compositions_{request.param}"), request.param)
    return anchor, spec, load_stack(anchor, spec), load_tokenizer(anchor)


def test_the_stack_shares_an_augmenting_model_between_compositions_and_keeps_bridges_apart(stacked):
    _, _, model, _ = stacked
    assert len(model.encoders) == 2  # alpha and beta read one augmenting model: one of the stack
    assert set(model.compositions) == {"alpha", "beta", "gamma"}
    assert model.composition_augments("alpha") == model.composition_augments("beta") == [0]
    assert model.composition_augments("gamma") == [1]
    assert model.encoders[0].indices == [0, 1, 2, 3, 4]  # alpha's states 0, 2, 4 and beta's 1, 3
    assert sorted(b for group in model.compositions.values() for b in group) == list(range(len(model.bridges)))
    rows = model.bridges_of(["alpha", None, "gamma"])
    assert rows.tolist() == [[b in model.compositions["alpha"] for b in range(len(model.bridges))],
                             [False] * len(model.bridges),
                             [b in model.compositions["gamma"] for b in range(len(model.bridges))]]
    with pytest.raises(ValueError, match=r"no composition named \['delta'\]"):
        model.bridges_of(["delta"])
    with pytest.raises(ValueError, match="save each composition"):
        model.save_pretrained("/nonexistent")


def test_rows_of_every_composition_and_the_bare_anchor_in_one_batch_each_give_their_own_answer(stacked):
    anchor, spec, model, tok = stacked
    engine = stack_engine(model)
    eos = tok.eos_token_id
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    names = [*spec, None]
    # every prompt under every composition and bare, arriving staggered: rows join batches of every kind
    jobs = [(i, name) for i in range(len(PROMPTS)) for name in names]

    async def main():
        async def one(k, i, name):
            await asyncio.sleep(0.005 * k)
            return await collect(engine, GenerationRequest(prompts[i], LENGTHS[i], eos_ids=[eos], composition=name))
        return await asyncio.gather(*(one(k, i, name) for k, (i, name) in enumerate(jobs)))

    results = dict(zip(jobs, (tokens for tokens, _ in asyncio.run(main()))))
    alone = {name: load_alone(anchor, *spec[name]) for name in spec}
    for (i, name), tokens in results.items():
        want = (anchor_alone(alone["alpha"], prompts[i], LENGTHS[i], eos) if name is None
                else reference_completion(alone[name], tok, prompts[i], LENGTHS[i]))
        assert tokens == want, (PROMPTS[i], name)
    # the test can tell the compositions apart: most prompts get different answers from each
    for a, b in [("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma"), ("alpha", None)]:
        assert sum(results[i, a] != results[i, b] for i in range(len(PROMPTS))) >= 3, (a, b)
    assert engine.counters["max_rows_in_step"] >= 8


def test_equal_prompts_of_different_compositions_do_not_share_a_prefill(stacked):
    anchor, spec, model, tok = stacked
    engine = stack_engine(model)
    prompt = tok(PROMPTS[2])["input_ids"]

    async def main():
        return await asyncio.gather(*(collect(engine, GenerationRequest(prompt, 10, eos_ids=[tok.eos_token_id],
                                                                        composition=name)) for name in spec))

    answers = [tokens for tokens, _ in asyncio.run(main())]
    assert engine.counters["shared_prefill_rows"] == 0
    assert answers[0] == reference_completion(load_alone(anchor, *spec["alpha"]), tok, prompt, 10)
    assert len({tuple(a) for a in answers}) == 3


def test_an_unknown_composition_is_refused_by_the_engine(stacked):
    _, _, model, _ = stacked
    engine = stack_engine(model)
    with pytest.raises(ValueError, match="no composition named 'delta'.*'alpha', 'beta', 'gamma'"):
        asyncio.run(collect(engine, GenerationRequest([3, 4], 2, composition="delta")))


def test_stacking_refuses_compositions_of_different_anchors(tmp_path):
    pair = build_pair(tmp_path)
    one = load_composition(load_causal_lm(pair.anchor), pair.anchor, load_causal_lm(pair.augment), pair.augment,
                           pair.bridges, False)
    two = load_composition(load_causal_lm(pair.anchor), pair.anchor, load_causal_lm(pair.augment), pair.augment,
                           pair.bridges, False)
    with pytest.raises(ConfigError, match="same anchor"):
        ComposedModel.stack({"one": one, "two": two})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    anchor, spec = compositions_of(tmp_path_factory.mktemp("compositions_http"), "shared")
    model, tok = load_stack(anchor, spec), load_tokenizer(anchor)
    frontend = OpenAIFrontend(tok, {name: name for name in spec},
                              Limits(context=512, vocab_size=len(tok), default_max_tokens=8),
                              open_stream=stack_engine(model).generate, anchor_name="tiny-anchor")
    with serve_frontend(frontend) as url:
        yield url, anchor, spec, tok


def test_http_models_lists_each_composition_with_the_anchor_as_parent(served):
    url, _, _, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    cards = {m.id: m.parent for m in client.models.list().data}
    assert cards == {"alpha": "tiny-anchor", "beta": "tiny-anchor", "gamma": "tiny-anchor", "tiny-anchor": None}
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="delta", prompt="a", max_tokens=2)
    assert err.value.code == "model_not_found"
    assert "'alpha', 'beta', 'gamma' and 'tiny-anchor'" in err.value.message


def test_http_concurrent_streams_of_each_composition_equal_their_solo_answers(served):
    url, anchor, spec, tok = served
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    names = [*spec, "tiny-anchor"]

    async def one(name, prompt):
        stream = await client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True)
        text, model = "", set()
        async for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
            model.add(chunk.model)
        return text, model

    async def main():
        return await asyncio.gather(*(one(name, p) for p in PROMPTS[:2] for name in names))

    results = asyncio.run(main())
    alone = {name: load_alone(anchor, *spec[name]) for name in spec}
    for (text, model), (prompt, name) in zip(results, [(p, n) for p in PROMPTS[:2] for n in names]):
        ids = tok(prompt)["input_ids"]
        want = (anchor_alone(alone["alpha"], ids, 12, tok.eos_token_id) if name == "tiny-anchor"
                else reference_completion(alone[name], tok, ids, 12))
        assert text == tok.decode(want, skip_special_tokens=True), (prompt, name)
        assert model == {name}


def test_a_composition_loaded_while_others_stream_is_served_and_an_unloaded_one_drains(tmp_path):
    """Runtime loading on the engine: a composition added between steps joins running rows' batch (their caches get
    its bridges as zeros, which their masks hide), and one being unloaded finishes its running rows, refuses new
    requests, and leaves the model and the cache once drained. Every answer equals its composition alone."""
    anchor, spec = compositions_of(tmp_path, "shared")
    first = {name: spec[name] for name in ("alpha", "gamma")}
    model = load_stack(anchor, first)
    engine = stack_engine(model)
    tok = load_tokenizer(anchor)
    eos = tok.eos_token_id
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    bridges_before = len(model.bridges)

    def request(i, name, length=None):
        return collect(engine, GenerationRequest(prompts[i], length or LENGTHS[i], eos_ids=[eos], composition=name))

    async def main():
        early = [asyncio.ensure_future(request(0, "alpha", 30)), asyncio.ensure_future(request(1, "gamma", 30))]
        while engine.counters["steps"] < 3:  # both rows decode before beta arrives
            await asyncio.sleep(0.01)
        _, bridges, _ = spec["beta"]  # beta shares alpha's augmenting model: built on the stack's modules
        part = ComposedModel.from_pretrained(bridges, model.anchor, [model.encoders[0].model])
        await engine.load("beta", part)
        late = [asyncio.ensure_future(request(2, "beta")), asyncio.ensure_future(request(3, "alpha"))]
        while engine.counters["steps"] < 6:
            await asyncio.sleep(0.01)
        assert any(r.request.composition == "gamma" for r in engine._running)
        engine.unload("gamma")  # its row is mid-stream: it finishes
        with pytest.raises(ValueError, match="no composition named 'gamma'"):
            await request(0, "gamma")
        results = await asyncio.gather(*early, *late)
        for _ in range(100):  # the loop removes gamma once its last row finished
            if "gamma" not in model.compositions:
                break
            await asyncio.sleep(0.01)
        return [tokens for tokens, _ in results]

    alpha0, gamma1, beta2, alpha3 = asyncio.run(main())
    assert engine.augments.rows[0].encoder.indices == [0, 1, 2, 3, 4]  # beta's layers 1 and 3, asked for by calls
    assert set(model.compositions) == {"alpha", "beta"}
    assert len(model.bridges) == bridges_before  # beta's two came, gamma's two went
    alone = {name: load_alone(anchor, *spec[name]) for name in spec}
    assert alpha0 == reference_completion(alone["alpha"], tok, prompts[0], 30)
    assert gamma1 == reference_completion(alone["gamma"], tok, prompts[1], 30)
    assert beta2 == reference_completion(alone["beta"], tok, prompts[2], LENGTHS[2])
    assert alpha3 == reference_completion(alone["alpha"], tok, prompts[3], LENGTHS[3])
    with pytest.raises(ValueError, match="does not reach"):  # a new augmenting model cannot join at runtime
        other = load_causal_lm(spec["gamma"][0])
        asyncio.run(engine.load("delta", ComposedModel.from_pretrained(spec["gamma"][1], model.anchor, [other])))

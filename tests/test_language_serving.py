"""configs/serve_language.yaml, the project's default pair (SmolLM2-135M-Instruct reading Gemma-3-270m through the
language experiment's committed bridges), served by Ray Serve on 127.0.0.1: greedy answers over HTTP, through the
official openai client, equal in-process ``ComposedModel.generate`` on the same folders.

The models come from tests/fixtures_real.py (converted from their PyPI packages into models/, skipped without them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from actors.serve.config import ServingArgs  # noqa: E402
from actors.serve.deployments import build_app  # noqa: E402
from composition import ComposedModel, load_causal_lm, load_tokenizer  # noqa: E402
from tests import fixtures_real  # noqa: E402
from tests.fixtures import reference_completion  # noqa: E402
from tests.test_serving import edge_requests_leave_streams_alone, free_port, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "serve_language.yaml"
APP = "calm-language"
SPANISH = ["Y dijo Jesús: Yo soy la luz del mundo.", "El perro duerme en la casa de mi madre.",
           "Mañana iremos al mercado para comprar pan y fruta."]


def config_app() -> dict:
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    return app


def prompt(spanish: str) -> str:
    from experiments.language.config import SHOTS, translation_prompt

    return translation_prompt(spanish, list(SHOTS))


def test_the_config_names_the_default_pair_and_its_committed_bridges(folders):
    app = config_app()
    args = ServingArgs.from_dict(app["args"]).resolved()  # relative paths resolve once the folders exist
    (composition,) = args.compositions
    assert (Path(args.anchor), Path(composition.augments[0])) == folders
    assert (Path(composition.bridges) / "bridges.safetensors").is_file(), "the committed bridges are missing"
    assert app["args"]["augments"] and "augment_tokenizers" not in app["args"]  # Gemma reads its own tokens
    assert yaml.safe_load(CONFIG.read_text())["http_options"]["host"] == "127.0.0.1"


@pytest.fixture(scope="module")
def folders():
    return fixtures_real.smollm2_folder(), fixtures_real.gemma3_folder()


@pytest.fixture(scope="module")
def server(ray_cluster, folders):
    app = config_app()
    settings = ServingArgs.from_dict(app["args"]).resolved()
    settings.check_paths()
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, namespace="serve")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
    for d in options.values():  # the test cluster's CPUs are shared by every test module
        d["ray_actor_options"] = {"num_cpus": 0.1}
    serve.run(build_app(settings, options), name=APP, route_prefix="/language")
    url = f"http://127.0.0.1:{serve.context._get_global_client().http_config.port}/language"
    import httpx

    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 180, "the health endpoint")
    yield url, app["args"]["model_name"]
    serve.delete(APP)


@pytest.fixture(scope="module")
def reference(folders):
    """The pair in-process, fp32, as a notebook would compose it: what every served answer is compared with."""
    anchor, augment = folders
    bridges = ServingArgs.from_dict(config_app()["args"]).resolved().compositions[0].bridges
    tok = load_tokenizer(str(anchor))
    model = ComposedModel.from_pretrained(bridges, load_causal_lm(str(anchor), dtype="float32"),
                                          [load_causal_lm(str(augment), dtype="float32")],
                                          tokenizers=[tok, load_tokenizer(str(augment))])
    yield model, tok
    model.remove_hooks()


def solo(reference, text: str, max_tokens: int) -> str:
    model, tok = reference
    return tok.decode(reference_completion(model, tok, tok(text)["input_ids"], max_tokens), skip_special_tokens=True)


def anchor_stats() -> dict:
    return serve.get_deployment_handle("Anchor", app_name=APP).stats.remote().result(timeout_s=30)


def test_greedy_translations_over_http_equal_in_process_generate(server, reference):
    from openai import OpenAI

    url, model_name = server
    model, tok = reference
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=180)
    for spanish in SPANISH:
        text = prompt(spanish)
        expected = reference_completion(model, tok, tok(text)["input_ids"], 20)
        got = client.completions.create(model=model_name, prompt=text, max_tokens=20, temperature=0)
        assert got.choices[0].text == tok.decode(expected, skip_special_tokens=True), spanish
        assert got.usage.completion_tokens == len(expected)


# eight prompts of different lengths, decoding different numbers of tokens: rows join and leave the batch
OVERLAP = [("El perro duerme.", 12), ("Y dijo Jesús: Yo soy la luz del mundo.", 20),
           ("Mañana iremos al mercado para comprar pan y fruta.", 8), ("¿Dónde está la estación?", 16),
           ("La casa de mi madre es grande y tiene un jardín con muchas flores.", 24), ("Hola.", 10),
           ("Los niños juegan en el parque cuando sale el sol.", 14), ("No tengo hambre.", 18)]


def test_overlapping_requests_to_the_real_pair_each_get_their_solo_answer(server, reference):
    # the shipped pair's second user: Gemma-3's sliding-window cache is batched, rows join a running stream
    import asyncio

    from openai import AsyncOpenAI

    url, model_name = server
    want = [solo(reference, prompt(spanish), n) for spanish, n in OVERLAP]
    before = anchor_stats()

    async def main():
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)

        async def one(i):
            spanish, n = OVERLAP[i]
            out = await client.completions.create(model=model_name, prompt=prompt(spanish), max_tokens=n,
                                                  temperature=0)
            return out.choices[0].text

        async def first_streaming():  # the others join once this one is decoding
            spanish, n = OVERLAP[0]
            stream = await client.completions.create(model=model_name, prompt=prompt(spanish), max_tokens=n,
                                                     temperature=0, stream=True)
            text = ""
            async for chunk in stream:
                if not started.is_set() and chunk.choices and chunk.choices[0].text:
                    started.set()
                text += "".join(c.text for c in chunk.choices)
            return text

        async def others():
            await asyncio.wait_for(started.wait(), 240)
            spanish, _ = OVERLAP[3]
            two = client.completions.create(model=model_name, prompt=prompt(spanish), max_tokens=16, temperature=0,
                                            n=2)
            return await asyncio.gather(*(one(i) for i in range(1, len(OVERLAP))), two)

        started = asyncio.Event()
        first, (rest) = await asyncio.gather(first_streaming(), others())
        return [first, *rest[:-1]], rest[-1]

    texts, both = asyncio.run(main())
    assert texts == want
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == [want[3], want[3]]
    after = anchor_stats()
    assert after["max_rows_in_step"] > 1, "the requests shared decode steps"
    assert after["failed"] == before["failed"] and after["running"] == 0
    # Gemma-3's states came layer by layer over Serve: parts arrived before their calls' answers
    assert after["streamed_parts"] > before["streamed_parts"]


def test_edge_requests_among_running_streams_leave_every_stream_its_solo_answer(server, reference):
    # near-zero temperatures, extreme logit_bias and penalties, and refused requests, while greedy streams decode
    url, model_name = server
    streams = [(prompt(spanish), n) for spanish, n in OVERLAP[:4]]
    edge_requests_leave_streams_alone(url, model_name, reference[1], streams,
                                      [solo(reference, p, n) for p, n in streams],
                                      prompt(SPANISH[0]), solo(reference, prompt(SPANISH[0]), 12))


def test_the_bare_smollm2_is_served_beside_the_composition_from_one_anchor_replica(server, reference):
    """``anchor_name``: the same Anchor replica answers the bare SmolLM2 (its rows feed Gemma nothing, so no
    bridge adds anything) and the composition, in the same batches, each as in-process."""
    import asyncio

    import torch
    from openai import AsyncOpenAI, OpenAI

    url, model_name = server
    model, tok = reference
    anchor_name = config_app()["args"]["anchor_name"]
    cards = {m.id: m for m in OpenAI(base_url=f"{url}/v1", api_key="unused").models.list().data}
    assert set(cards) == {model_name, anchor_name} and cards[model_name].parent == anchor_name
    text = prompt(SPANISH[1])
    ids = tok(text)["input_ids"]
    with torch.no_grad():  # SmolLM2 alone: its bridge hooks idle outside a composed forward
        out = model.anchor.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    bare_want = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    composed_want = solo(reference, text, 16)
    assert bare_want != composed_want, "the bridges change this answer, or the test could not tell them apart"

    async def main():
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)
        return await asyncio.gather(*(client.completions.create(model=name, prompt=text, max_tokens=16,
                                                                temperature=0)
                                      for name in [anchor_name, model_name, anchor_name]))

    before = anchor_stats()
    answers = asyncio.run(main())
    assert [a.choices[0].text for a in answers] == [bare_want, composed_want, bare_want]
    assert [a.model for a in answers] == [anchor_name, model_name, anchor_name]
    after = anchor_stats()
    assert after["engine_id"] == before["engine_id"] and after["failed"] == before["failed"]


# ---------------------------------------------------------------------- structured outputs on the real pair
TRANSLATION = {"type": "object", "additionalProperties": False, "required": ["english", "confident"], "properties": {
    "english": {"type": "string", "maxLength": 80}, "confident": {"type": "boolean"}}}
LOOKUP = {"type": "function", "function": {"name": "translate", "description": "Translate a Spanish sentence",
                                           "parameters": {"type": "object", "additionalProperties": False,
                                                          "required": ["text", "target"], "properties": {
                                                              "text": {"type": "string", "maxLength": 60},
                                                              "target": {"enum": ["en", "fr", "de"]}}}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 30}}}}}


def _chat(spanish: str) -> list[dict]:
    return [{"role": "user", "content": f"Translate into English and answer in JSON: {spanish}"}]


def test_json_answers_of_the_real_pair_parse_and_validate_greedy_and_sampled(server):
    import json

    import jsonschema
    from openai import OpenAI

    url, model_name = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "translation", "schema": TRANSLATION, "strict": True}}
    for spanish, temperature, seed in [(SPANISH[0], 0, None), (SPANISH[1], 0.8, 1), (SPANISH[2], 0.8, 2)]:
        out = client.chat.completions.create(model=model_name, messages=_chat(spanish), max_tokens=80,
                                             temperature=temperature, seed=seed, response_format=fmt)
        answer = out.choices[0]
        assert answer.finish_reason == "stop", answer.message.content
        jsonschema.validate(json.loads(answer.message.content), TRANSLATION)
    mode = client.chat.completions.create(model=model_name, max_tokens=80, temperature=0,
                                          messages=[{"role": "user", "content": 'Reply with {"ok": true}'}],
                                          response_format={"type": "json_object"})
    assert mode.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(mode.choices[0].message.content), dict)


def test_forced_tool_calls_on_the_real_pair_parse_validate_and_stream_to_the_same_call(server):
    import json

    import jsonschema
    from openai import OpenAI

    url, model_name = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)
    for choice in ["required", {"type": "function", "function": {"name": "translate"}}]:
        kwargs = dict(model=model_name, messages=_chat(SPANISH[1]), max_tokens=60, temperature=0,
                      tools=[WEATHER, LOOKUP], tool_choice=choice)
        out = client.chat.completions.create(**kwargs)
        answer = out.choices[0]
        assert answer.finish_reason == "tool_calls", answer
        (call,) = answer.message.tool_calls
        parameters = {"translate": LOOKUP, "get_weather": WEATHER}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), parameters)
        if choice != "required":
            continue  # the named call streams as the required one does (both streamed on the tiny pair)
        name, arguments = None, ""
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                name = delta.function.name or name
                arguments += delta.function.arguments or ""
        assert (name, arguments) == (call.function.name, call.function.arguments)


def test_the_compile_limit_counts_cpu_time_over_the_real_vocabulary(folders):
    """An object of 500 properties compiles over SmolLM2's 49,152 tokens in about 50 ms of CPU on this project's
    machine: past a 5 ms limit it is a GrammarError (the frontend's 400), remembered as refused. The token tables
    all grammars share are built in ``Grammars()``, so a process's first small schema passes the 1 s default."""
    import random
    import string

    from actors.serve.grammar import MAX_COMPILE_S, GrammarError, Grammars, json_grammar

    rng = random.Random(0)
    big = json_grammar({"type": "object", "properties": {
        "".join(rng.choices(string.ascii_lowercase, k=6)): {"type": "string"} for _ in range(500)}})
    grammars = Grammars(load_tokenizer(str(folders[0])), 49152, max_compile_s=0.005)
    with pytest.raises(GrammarError, match=r"compiling it took \d+\.\d+ s, more than this server allows \(0.005 s\)"):
        grammars.compile(big)
    with pytest.raises(GrammarError, match="more than this server allows"):  # the refusal is cached
        grammars.cached(big)
    # the first grammar of a process would take about 1.8 s (the shared tables) were they not built at start-up
    fresh = Grammars(load_tokenizer(str(folders[0])), 49152)
    assert fresh.max_compile_s == MAX_COMPILE_S == 1.0
    fresh.compile(json_grammar({"enum": ["yes", "no"]}))

"""The serving engine without Ray: continuous batching gives the same greedy tokens as in-process generate.

DecodeEngine + LocalAugments run the exact code path of the Serve replicas (cache surgery,
codec, re-prefill after a lost augmenting cache) in one process, so these tests are fast and
pin the batching logic down; tests/test_serving.py repeats the key checks over real HTTP.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from actors.serve.augment_client import ArrivingStates, LocalAugments
from actors.serve.augment_protocol import Extend, Prefill, States
from actors.serve.augment_rows import AugmentRows
from actors.serve.engine import DecodeEngine, GenerationRequest, RequestFailed
from composition.loading import load_tokenizer
from tests.fixtures import build_pair, load_in_process, reference_completion

PROMPTS = ["The key of door seven is", "a", "Once upon a time, in a land far away,", "xyz 123", "Q: 2+2?\nA:"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def model(pair):
    return load_in_process(pair)


@pytest.fixture(scope="module")
def tok(pair):
    return load_tokenizer(pair.anchor)


def make_engine(model, max_batch_size=8):
    rows = AugmentRows(model.encoders[0], augment=0, pad_id=0, lock=threading.Lock())
    return DecodeEngine(model, LocalAugments([rows]), max_batch_size=max_batch_size, max_context=512), rows


async def collect(engine, request):
    tokens, finish = [], None
    async for chunk in engine.generate(request):
        tokens += chunk["token_ids"]
        finish = chunk["finish_reason"]
    return tokens, finish


def test_concurrent_greedy_requests_match_in_process_generate(model, tok):
    engine, _ = make_engine(model)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    lengths = [5, 30, 17, 1, 40]

    async def main():
        # staggered arrivals: requests join a batch that is already decoding
        async def one(i):
            await asyncio.sleep(0.01 * i)
            return await collect(engine, GenerationRequest(prompts[i], lengths[i], eos_ids=[tok.eos_token_id]))
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    results = asyncio.run(main())
    for prompt, n, (tokens, finish) in zip(prompts, lengths, results):
        assert tokens == reference_completion(model, tok, prompt, n)
        assert finish == ("stop" if tokens[-1] == tok.eos_token_id else "length")
    assert engine.counters["max_rows_in_step"] > 1  # requests really shared decode steps
    assert engine.stats()["running"] == 0


def test_a_lost_augmenting_cache_is_rebuilt_and_the_answer_is_unchanged(model, tok):
    engine, rows = make_engine(model)
    prompt = tok(PROMPTS[2])["input_ids"]

    async def main():
        tokens = []
        async for chunk in engine.generate(GenerationRequest(prompt, 30)):
            tokens += chunk["token_ids"]
            if len(tokens) == 10:
                rows.clear()  # what a restarted augmenting replica looks like
        return tokens

    tokens = asyncio.run(main())
    assert engine.augments.rebuilds == 1
    assert tokens == reference_completion(model, tok, prompt, 30)[: len(tokens)]
    assert len(tokens) == 30 or tokens[-1] == tok.eos_token_id


def test_a_consumer_that_stops_reading_frees_its_row(model, tok):
    engine, rows = make_engine(model)
    prompt = tok(PROMPTS[0])["input_ids"]

    async def main():
        stream = engine.generate(GenerationRequest(prompt, 400))
        await stream.__anext__()
        await stream.aclose()  # what a client disconnect does to the replica's generator
        for _ in range(200):
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        # a later request still works
        return await collect(engine, GenerationRequest(prompt, 3))

    tokens, _ = asyncio.run(main())
    assert engine.counters["cancelled"] == 1
    assert engine.stats()["running"] == 0
    assert len(tokens) == 3


def test_seeded_sampling_gives_the_same_tokens_alone_and_in_a_batch(model, tok):
    prompt = tok(PROMPTS[0])["input_ids"]
    other = tok(PROMPTS[2])["input_ids"]

    def request():
        return GenerationRequest(prompt, 20, temperature=0.9, top_p=0.9, seed=7)

    async def alone():
        return (await collect(make_engine(model)[0], request()))[0]

    async def batched():
        engine = make_engine(model)[0]
        results = await asyncio.gather(collect(engine, request()),
                                       collect(engine, GenerationRequest(other, 20, temperature=1.0)))
        return results[0][0]

    assert asyncio.run(alone()) == asyncio.run(batched())


def test_requests_beyond_the_batch_size_wait_for_a_free_row(model, tok):
    engine, _ = make_engine(model, max_batch_size=2)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]

    async def main():
        return await asyncio.gather(*(collect(engine, GenerationRequest(p, 8)) for p in prompts))

    results = asyncio.run(main())
    assert all(len(t) == 8 or t[-1] == tok.eos_token_id for t, _ in results)
    for prompt, (tokens, _) in zip(prompts, results):
        assert tokens == reference_completion(model, tok, prompt, 8)[: len(tokens)]
    assert engine.counters["max_rows_in_step"] == 2


@pytest.mark.parametrize("bad, message", [
    (dict(prompt_ids=[], max_tokens=3), "prompt is empty"),
    (dict(prompt_ids=[5], max_tokens=0), "max_tokens must be >= 1"),
    (dict(prompt_ids=[5] * 500, max_tokens=20), "exceeds the context of 512"),
    (dict(prompt_ids=[5], max_tokens=3, top_p=0.0), "top_p"),
    (dict(prompt_ids=[5], max_tokens=3, n=9), "more than this server decodes together"),
    (dict(prompt_ids=[5], max_tokens=3, logit_bias={10**6: 1.0}), "outside the vocabulary"),
    (dict(prompt_ids=[5, 10**6], max_tokens=3), r"prompt token ids \[1000000\] are outside the vocabulary"),
])
def test_invalid_requests_are_refused_with_the_reason(model, bad, message):
    engine, _ = make_engine(model)

    async def main():
        return await collect(engine, GenerationRequest(**bad))

    with pytest.raises(ValueError, match=message):
        asyncio.run(main())


# ---------------------------------------------------------------- one request's failure never reaches another
def test_near_zero_temperatures_decode_as_greedy_and_leave_every_other_row_untouched(model, tok):
    # 3e-38 overflowed (logits / t) to inf, the softmax to NaN, and torch.multinomial failed the whole batch
    engine, _ = make_engine(model)
    good = [tok(p)["input_ids"] for p in PROMPTS]
    tiny = tok(PROMPTS[2])["input_ids"]

    async def main():
        goods = [collect(engine, GenerationRequest(p, 12)) for p in good]
        bads = [collect(engine, GenerationRequest(tiny, 12, temperature=t, seed=1)) for t in (3e-38, 2.4e-78, 1e-45)]
        return await asyncio.gather(*goods, *bads)

    results = asyncio.run(main())
    for prompt, (tokens, _) in zip(good, results):
        assert tokens == reference_completion(model, tok, prompt, 12)
    for tokens, _ in results[len(good):]:  # the limit of sampling as t -> 0 is the argmax
        assert tokens == reference_completion(model, tok, tiny, 12)
    assert engine.counters["failed"] == 0 and engine.counters["max_rows_in_step"] > 1


def test_a_request_with_non_finite_logits_fails_alone_and_the_batch_decodes_on(pair, model, tok):
    poisoned = load_in_process(pair)
    bad_token = tok.convert_tokens_to_ids("~")
    with torch.no_grad():  # a real defect in a real model: one embedding row is NaN
        poisoned.anchor.get_input_embeddings().weight[bad_token] = float("nan")
    rows = AugmentRows(poisoned.encoders[0], augment=0, pad_id=0, lock=threading.Lock())
    engine = DecodeEngine(poisoned, LocalAugments([rows]), max_batch_size=8, max_context=512)
    good = [tok(p)["input_ids"] for p in PROMPTS if "~" not in p]
    bad = tok("read ~ this")["input_ids"]
    assert bad_token in bad and all(bad_token not in p for p in good)

    async def main():
        async def bad_one(delay, **sampling):
            await asyncio.sleep(delay)  # once joining the first prefill wave, once a batch already decoding
            with pytest.raises(RequestFailed, match="non-finite logits"):
                await collect(engine, GenerationRequest(bad, 12, **sampling))
        goods = [collect(engine, GenerationRequest(p, 16)) for p in good]
        return await asyncio.gather(*goods, bad_one(0), bad_one(0.05, temperature=0.7, seed=3))

    results = asyncio.run(main())
    for prompt, (tokens, _) in zip(good, results):
        assert tokens == reference_completion(model, tok, prompt, 16)
    assert engine.counters["failed"] == 2 and engine.stats()["running"] == 0


# ---------------------------------------------------------------- overlap of the augmenting call with the anchor
class ObservedAugments(LocalAugments):
    """LocalAugments whose calls answer only once the anchor's layers below its first bridge ran
    during the call (``below_ran``, set by a hook); optionally failing from the ``fail_at``-th step on."""

    def __init__(self, rows, below_ran: threading.Event | None = None, fail_at: int | None = None):
        super().__init__(rows)
        self.below_ran = below_ran
        self.fail_at = fail_at
        self.steps = 0

    async def _call(self, augment, request, part=None):
        if isinstance(request, Extend):
            self.steps += 1
            if self.fail_at is not None and self.steps >= self.fail_at:
                raise RuntimeError("augmenting replica unreachable")
        if self.below_ran is not None and isinstance(request, (Prefill, Extend)):
            deadline = asyncio.get_running_loop().time() + 10
            while not self.below_ran.is_set():
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError("the anchor's lower layers did not run while the augmenting call was in flight")
                await asyncio.sleep(0.001)
            self.below_ran.clear()
        return await super()._call(augment, request, part)


@pytest.fixture(scope="module")
def high_bridge_model():
    """A composition whose first bridge enters above anchor layers 0 and 1."""
    from tests.test_composition import composed

    return composed(pairs=((0, 2), (2, 3), (4, 6)))


def test_in_a_model_thread_the_anchor_layers_below_the_first_bridge_run_during_the_augmenting_call(
        high_bridge_model):
    model = high_bridge_model
    below_ran = threading.Event()
    hook = model.anchor.model.layers[1].register_forward_hook(lambda *_: below_ran.set())
    try:
        rows = AugmentRows(model.encoders[0], augment=0, pad_id=0, lock=threading.Lock())
        engine = DecodeEngine(model, ObservedAugments([rows], below_ran), max_batch_size=4, model_thread=True)
        prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]

        async def main():
            return await asyncio.gather(*(collect(engine, GenerationRequest(p, 12)) for p in prompts))

        results = asyncio.run(main())
    finally:
        hook.remove()
    assert engine.counters["failed"] == 0
    for prompt, (tokens, _) in zip(prompts, results):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12)[0, len(prompt):].tolist()
        assert tokens == expected
    stats = engine.stats()
    assert stats["steps"] > 0 and stats["augment_s"] > 0 and stats["anchor_s"] > 0


def test_a_decode_step_runs_the_anchor_between_bridges_while_the_augmenting_model_runs_its_upper_layers(
        high_bridge_model):
    # bridges (augment index -> anchor index) 0 -> 2, 2 -> 3, 4 -> 6. In each decode step the augmenting model
    # stops after its layer 3 (index 4 not yet computed) until the anchor's layer 2 ran: possible only when the
    # states of indices 0 and 2 reached the anchor's forward before the augmenting call ended (streamed)
    model = high_bridge_model
    anchor_ran = threading.Semaphore(0)
    overlapped = []

    def decoding(args, kwargs) -> bool:  # a decode step: one new token per row
        return (args[0] if args else kwargs["hidden_states"]).shape[1] == 1

    def anchor_layer_2(module, args, kwargs, output):
        if decoding(args, kwargs):
            anchor_ran.release()

    def augment_layer_3(module, args, kwargs, output):
        if decoding(args, kwargs):
            overlapped.append(anchor_ran.acquire(timeout=5))

    hooks = [model.anchor.model.layers[2].register_forward_hook(anchor_layer_2, with_kwargs=True),
             model.encoders[0].info.layers[3].register_forward_hook(augment_layer_3, with_kwargs=True)]
    try:
        rows = AugmentRows(model.encoders[0], augment=0, pad_id=0, lock=threading.Lock())
        engine = DecodeEngine(model, LocalAugments([rows]), max_batch_size=4, model_thread=True)
        tokens, _ = asyncio.run(collect(engine, GenerationRequest([5, 6, 7, 8, 9], 6)))
    finally:
        for h in hooks:
            h.remove()
    assert len(overlapped) == 5 and all(overlapped)  # every decode step (the first token comes from the prefill)
    assert tokens == model.generate(torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=6)[0, 5:].tolist()


def test_arriving_states_wait_for_an_index_then_refuse_one_the_finished_answer_lacks():
    arriving = ArrivingStates()
    state = torch.ones(1, 1, 4)
    later = threading.Timer(0.05, lambda: arriving.put(0, {5: state}))
    later.start()
    assert arriving.get(0, 5) is state  # blocked until it arrived
    arriving.finish()
    with pytest.raises(ValueError, match="augmenting model 0's answer holds no states at index 9"):
        arriving.get(0, 9)  # never blocks for good
    arriving.fail(RuntimeError("augmenting replica unreachable"))
    assert arriving.get(0, 5) is state  # what arrived stays readable


@pytest.mark.parametrize("model_thread", [True, False])
def test_a_failing_augmenting_call_fails_the_step_rows_and_the_engine_serves_on(model, tok, model_thread):
    rows = AugmentRows(model.encoders[0], augment=0, pad_id=0, lock=threading.Lock())
    augments = ObservedAugments([rows], fail_at=3)
    engine = DecodeEngine(model, augments, max_batch_size=4, max_context=512, model_thread=model_thread)
    prompt = tok(PROMPTS[0])["input_ids"]

    async def main():
        with pytest.raises(RequestFailed, match="generation failed: RuntimeError: augmenting replica unreachable"):
            await collect(engine, GenerationRequest(prompt, 10))
        augments.fail_at = None
        return await collect(engine, GenerationRequest(prompt, 6))

    tokens, _ = asyncio.run(main())
    assert engine.counters["failed"] == 1 and engine.stats()["running"] == 0
    assert tokens == reference_completion(model, tok, prompt, 6)


def test_n_rows_compute_their_prompt_once_and_each_decodes_as_a_solo_request(model, tok):
    # a request's n rows share one prefill row (here and on the augmenting side); with another request
    # in the same prefill, every row must still decode exactly as it would alone
    engine, rows = make_engine(model)
    prompt, other = tok(PROMPTS[2])["input_ids"], tok(PROMPTS[0])["input_ids"]

    async def main():
        async def n_rows():
            out: dict[int, list[int]] = {}
            async for chunk in engine.generate(GenerationRequest(prompt, 10, n=3, request_id="shared",
                                                                  eos_ids=[tok.eos_token_id])):
                out.setdefault(chunk["index"], []).extend(chunk["token_ids"])
            return out
        return await asyncio.gather(n_rows(), collect(engine, GenerationRequest(other, 7, eos_ids=[tok.eos_token_id])))

    (choices, (alone, _)) = asyncio.run(main())
    want = reference_completion(model, tok, prompt, 10)
    assert choices == {0: want, 1: want, 2: want}
    assert alone == reference_completion(model, tok, other, 7)
    assert engine.counters["prefills"] == 1
    assert (engine.counters["prefill_rows"], engine.counters["shared_prefill_rows"]) == (2, 2)
    assert engine.augments.rebuilds == 0  # the copies were held by the augmenting side, not re-sent


def test_the_augmenting_side_holds_copies_as_rows_of_their_own(model, tok):
    rows = AugmentRows(model.encoders[0], augment=0, pad_id=0, lock=threading.Lock())
    prompt = tok(PROMPTS[0])["input_ids"]
    rows.prefill(Prefill([("a", prompt)], copies={"a": ["a#1", "a#2"]}))
    assert rows.ids == ["a", "a#1", "a#2"] and rows.attention_mask.shape[0] == 3
    # a copy steps on its own, and can outlive "a"
    stepped = rows.extend(Extend(["a#2", "a"], [[5], [5]], [len(prompt)] * 2))
    assert isinstance(stepped, States) and rows.ids == ["a#2", "a"]
    with pytest.raises(ValueError, match="not in this prefill"):
        rows.prefill(Prefill([("b", prompt)], copies={"c": ["c#1"]}))

"""The serving engine across tokenizers, without Ray: an augmenting model with its own tokenizer.

The anchor engine aligns the text (``model.aligner``) and sends each augmenting row only its newly
closed tokens (``AugmentRows.extend``); these tests pin down that continuous batching, the cache
surgery of the cross-tokenizer cache fields and the re-prefill of a lost augmenting cache give the
tokens of in-process ``ComposedModel.generate`` (built with ``tokenizers=``), token for token.
tests/test_serving_xtok.py repeats the key check over real HTTP.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from actors.codec import arrays_to_states
from actors.serve.augment_protocol import Extend, Missing, Prefill
from actors.serve.augment_rows import AugmentRows
from actors.serve.engine import GenerationRequest
from composition.alignment import align
from composition.loading import load_tokenizer
from composition.model import positions_from_mask
from tests.fixtures import reference_completion
from tests.test_serving_engine import collect, make_engine  # one engine set-up for both pairs
from tests.fixtures_xtok import build_xtok_pair, load_xtok_in_process

# accents, emoji, CJK, whitespace runs (tabs, newlines, several spaces), a one-character prompt, and
# a prompt that closes no word (the augmenting side starts with no token, or only its BOS)
PROMPTS = ["Hola, ¿qué tal?  Très bien.", "Emoji 😀👍🏽 here;\n\n  the   end", "日本語 and 中文 text",
           "a", "Über\tnaïve   words, 한국어 ok.", "Straße"]
LENGTHS = [24, 40, 17, 30, 9, 33]
PAIRS = [("byte_bpe", "sentencepiece"), ("char", "byte_bpe")]  # SentencePiece has a BOS; byte-level BPE none


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}-anchor-{p[1]}-augment")
def served(request, tmp_path_factory):
    """(model, anchor tokenizer, augmenting tokenizer) loaded from a pair written to disk."""
    anchor_kind, augment_kind = request.param
    pair = build_xtok_pair(tmp_path_factory.mktemp(f"xtok_{anchor_kind}_{augment_kind}"), anchor_kind, augment_kind)
    return load_xtok_in_process(pair), load_tokenizer(pair.anchor), load_tokenizer(pair.augment)


def test_concurrent_greedy_requests_across_tokenizers_match_in_process_generate(served):
    model, tok, augment_tok = served
    assert model.aligner is not None and model.aligner.needs_text
    engine, _ = make_engine(model)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]

    async def main():
        async def one(i):  # staggered arrivals: requests join a batch that is already decoding
            await asyncio.sleep(0.01 * i)
            return await collect(engine, GenerationRequest(prompts[i], LENGTHS[i], eos_ids=[tok.eos_token_id]))
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    results = asyncio.run(main())
    closed_while_decoding = 0
    for prompt, n, (tokens, finish) in zip(prompts, LENGTHS, results):
        assert tokens == reference_completion(model, tok, prompt, n)
        assert finish == ("stop" if tokens[-1] == tok.eos_token_id else "length")
        visible = align(prompt + tokens, tok, augment_tok)["visible"]
        closed_while_decoding += visible[-1] > visible[len(prompt) - 1]
    assert closed_while_decoding >= 1  # the test tests something: words closed and were fed while decoding
    assert engine.counters["max_rows_in_step"] > 1 and engine.counters["prefills"] > 1  # shared steps, merges
    assert engine.counters["failed"] == 0 and engine.stats()["running"] == 0


def test_a_lost_augmenting_cache_is_rebuilt_across_tokenizers_and_the_answer_is_unchanged(served):
    model, tok, _ = served
    engine, rows = make_engine(model)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    n = 40

    async def main():
        async def read(prompt, clear_at):
            tokens = []
            async for chunk in engine.generate(GenerationRequest(prompt, n, eos_ids=[tok.eos_token_id])):
                tokens += chunk["token_ids"]
                if len(tokens) >= clear_at and clear_at:
                    rows.clear()  # what a restarted augmenting replica looks like
                    clear_at = 0
            return tokens
        return await asyncio.gather(read(prompts[0], 5), read(prompts[1], 0))

    results = asyncio.run(main())
    assert engine.augments.rebuilds >= 1  # a word closed after the loss: the rows were re-sent
    for prompt, tokens in zip(prompts, results):
        assert tokens == reference_completion(model, tok, prompt, n)[: len(tokens)]
        assert len(tokens) == n or tokens[-1] == tok.eos_token_id


def test_requests_beyond_the_batch_size_wait_and_leaving_rows_keep_the_others_exact(served):
    model, tok, _ = served
    engine, _ = make_engine(model, max_batch_size=2)  # rows leave and join all the time: select and merge
    prompts = [tok(p)["input_ids"] for p in PROMPTS]

    async def main():
        return await asyncio.gather(*(collect(engine, GenerationRequest(p, n, eos_ids=[tok.eos_token_id]))
                                     for p, n in zip(prompts, LENGTHS)))

    for prompt, n, (tokens, _) in zip(prompts, LENGTHS, asyncio.run(main())):
        assert tokens == reference_completion(model, tok, prompt, n)[: len(tokens)]
    assert engine.counters["max_rows_in_step"] == 2


def test_extend_appends_any_number_of_tokens_per_row_and_gives_each_rows_states_as_alone(served):
    model, _, augment_tok = served
    encoder = model.encoders[0]
    rows = AugmentRows(encoder, augment=0, pad_id=0)
    words = [augment_tok(w, add_special_tokens=False)["input_ids"] for w in ["Hola", " qué", " tal", " 日本語"]]
    ids = ["a", "b", "c"]
    held = {"a": list(words[0]), "b": [], "c": []}  # b and c start with no token
    rows.prefill(Prefill([(r, held[r]) for r in ids]))
    # a: nothing, then two words; b: a word, then one more; c: never a token
    for tokens in ([[], words[1], []], [words[1] + words[2], words[3], []]):
        result = rows.extend(Extend(ids, tokens, [len(held[r]) for r in ids]))
        (states,) = arrays_to_states(result.arrays, result.dtype, "cpu")
        for index in encoder.indices:
            assert states[index].shape[:2] == (3, max(len(t) for t in tokens))
        for b, (r, new) in enumerate(zip(ids, tokens)):
            held[r] += new
            if not new:
                continue
            full = torch.tensor([held[r]])
            alone, _ = encoder(full, torch.ones_like(full), positions_from_mask(torch.ones_like(full)))
            for index in encoder.indices:  # the row's new tokens sit at the right end
                torch.testing.assert_close(states[index][b, -len(new):], alone[index][0, -len(new):],
                                           rtol=0, atol=1e-5)
    # a row holding another number of tokens than the engine says is reported, never guessed
    assert rows.extend(Extend(["a", "b"], [[], []], [len(held["a"]), len(held["b"]) + 1])) == Missing(["b"])


def test_n_rows_share_their_prompts_alignment_and_each_decodes_as_alone(served):
    model, tok, _ = served
    engine, _ = make_engine(model)
    prompt = tok(PROMPTS[0])["input_ids"]

    async def main():
        out: dict[int, list[int]] = {}
        async for chunk in engine.generate(GenerationRequest(prompt, 20, n=3, eos_ids=[tok.eos_token_id])):
            out.setdefault(chunk["index"], []).extend(chunk["token_ids"])
        return out

    want = reference_completion(model, tok, prompt, 20)
    assert asyncio.run(main()) == {0: want, 1: want, 2: want}
    assert (engine.counters["prefill_rows"], engine.counters["shared_prefill_rows"]) == (1, 2)
    assert engine.augments.rebuilds == 0

"""Continuous batching for every KV-cache layout the core composes: full attention (Llama), a sliding window on
every layer (Mistral), and hybrids of sliding and full layers (Gemma-2, Gemma-3, as Gemma-3-270m).

The windows are 6 tokens, so every prompt here outgrows them. Requests arrive staggered (rows join a batch that
is decoding) and stop at different lengths (rows leave, the batch's leading padding is cropped), on the anchor's
side and on the augmenting side; each row's greedy tokens must equal in-process ``ComposedModel.generate`` of
that request alone. Across tokenizers, rows get different numbers of augmenting tokens per step, the case where
a sliding window could see padding inside a row (``AugmentRows._extend_grouped``).
"""

from __future__ import annotations

import asyncio
import random
import types

import pytest
import torch
from transformers import DynamicCache, Llama4TextConfig

from actors.codec import arrays_to_states
from actors.serve.augment_protocol import Extend, Prefill
from actors.serve.augment_rows import AugmentRows
from actors.serve.batch_cache import UnbatchableCacheError, check_batchable, crop_left_hf_cache, merge_hf_caches
from actors.serve.engine import GenerationRequest
from composition import ComposedModel, CompositionConfig, LayerMapping
from composition.loading import load_tokenizer
from composition.model import positions_from_mask
from tests.fixtures import tiny
from tests.fixtures_xtok import build_xtok_pair, load_xtok_in_process
from tests.test_serving_engine import collect, make_engine

# (anchor, augmenting) families: each layout on each side
SIDES = [("gemma3", "llama"), ("llama", "gemma3"), ("mistral", "gemma2"), ("gemma2", "mistral")]
LENGTHS = [3, 11, 7, 1, 16, 9]
NEW_TOKENS = [9, 4, 14, 12, 6, 10]


def composed(anchor_kind: str, augment_kind: str) -> ComposedModel:
    anchor, augment = tiny(anchor_kind, hidden=32, seed=0), tiny(augment_kind, hidden=32, seed=1)
    model = ComposedModel(anchor, [augment], CompositionConfig(mappings=[LayerMapping(every=2)]))
    torch.manual_seed(3)
    for bridge in model.bridges:
        torch.nn.init.normal_(bridge.o.weight, std=0.5)  # non-zero: the augmenting side changes the answers
    return model.eval()


def alone(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def staggered(engine, prompts, new_tokens, eos_ids=None):
    async def main():
        async def one(i):
            await asyncio.sleep(0.01 * i)  # later requests join a batch that is already decoding
            request = GenerationRequest(prompts[i], new_tokens[i], request_id=f"r{i}", eos_ids=eos_ids or [])
            return (await collect(engine, request))[0]
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return asyncio.run(main())


@pytest.mark.parametrize("anchor_kind,augment_kind", SIDES, ids=lambda k: k)
def test_rows_joining_and_leaving_decode_as_alone_for_every_cache_layout(anchor_kind, augment_kind):
    model = composed(anchor_kind, augment_kind)
    engine, rows = make_engine(model)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 97) for _ in range(n)] for n in LENGTHS]
    got = staggered(engine, prompts, NEW_TOKENS)
    assert got == [alone(model, p, n) for p, n in zip(prompts, NEW_TOKENS)]
    assert engine.counters["prefills"] > 1 and engine.counters["max_rows_in_step"] > 1, "rows did join a batch"
    assert engine.counters["failed"] == 0


@pytest.fixture(scope="module")
def sliding_xtok(tmp_path_factory):
    """Different tokenizers, a Gemma-3-like augmenting model (as the real pair's): sliding window of 6."""
    pair = build_xtok_pair(tmp_path_factory.mktemp("xtok_gemma3"), "byte_bpe", "sentencepiece",
                           augment_family="gemma3")
    return load_xtok_in_process(pair), load_tokenizer(pair.anchor)


def test_across_tokenizers_a_sliding_window_augmenting_model_decodes_each_row_as_alone(sliding_xtok):
    model, tok = sliding_xtok
    assert model.aligner is not None
    engine, rows = make_engine(model)
    assert rows.window == 6
    texts = ["Hola, ¿qué tal?  Très bien.", "Emoji 😀👍🏽 here;\n\n  the   end", "a", "Über\tnaïve   words, ok.",
             "日本語 and 中文 text", "Straße und Weg"]
    prompts = [tok(t)["input_ids"] for t in texts]
    new_tokens = [24, 40, 17, 30, 9, 33]
    got = staggered(engine, prompts, new_tokens, eos_ids=[tok.eos_token_id])
    for prompt, n, tokens in zip(prompts, new_tokens, got):
        want = alone(model, prompt, n)
        if tok.eos_token_id in want:
            want = want[: want.index(tok.eos_token_id) + 1]
        assert tokens == want


def test_extend_with_different_counts_gives_each_rows_states_as_alone_on_a_sliding_model():
    # rows get 0-3 tokens per step, as across tokenizers; a row that got fewer must not hold padding inside
    # its window (the window is 6 tokens, the rows grow to 15)
    model = ComposedModel(tiny("llama"), [tiny("gemma3", seed=1)], CompositionConfig(mappings=[LayerMapping(every=2)]))
    encoder = model.encoders[0]
    rows = AugmentRows(encoder, augment=0)
    rng = random.Random(1)
    held = {"a": [5, 6, 7], "b": [8], "c": []}
    rows.prefill(Prefill([(r, list(t)) for r, t in held.items()]))
    for step in range(6):
        tokens = [[rng.randrange(3, 97) for _ in range(rng.choice([0, 1, 2, 3]))] for _ in held]
        result = rows.extend(Extend(list(held), tokens, [len(t) for t in held.values()]))
        (states,) = arrays_to_states(result.arrays, result.dtype, "cpu")
        for b, (r, new) in enumerate(zip(list(held), tokens)):
            held[r] += new
            if not new:
                continue
            full = torch.tensor([held[r]])
            ones = torch.ones_like(full)
            solo, _ = encoder(full, ones, positions_from_mask(ones))
            for index in encoder.indices:  # the row's new tokens sit at the right end
                torch.testing.assert_close(states[index][b, -len(new):], solo[index][0, -len(new):],
                                           rtol=0, atol=1e-5)
    # while the batch fit in the window, one forward left gaps; when it could outgrow it, they were closed once
    assert rows.counters["gaps_closed"] >= 1 and rows.counters["grouped_extends"] >= 1
    for layer in rows.cache.layers:  # a sliding layer keeps the batch's last 5 columns and knows the batch's length
        if layer.is_sliding:
            assert layer.keys.shape[2] == 5 and layer.cumulative_length == rows.attention_mask.shape[1]


@pytest.mark.parametrize("widen", ["uniform steps", "a long new row"])
def test_gaps_left_while_the_batch_was_narrow_are_closed_before_it_outgrows_the_window(widen):
    # a mixed step leaves a gap in row b while the batch fits in the window (6); then the batch grows past it
    # by steps that give every row one token, or by a new row longer than the window: b must stay exact
    model = ComposedModel(tiny("llama"), [tiny("gemma3", seed=1)], CompositionConfig(mappings=[LayerMapping(every=2)]))
    encoder = model.encoders[0]
    rows = AugmentRows(encoder, augment=0)
    held = {"a": [5, 6], "b": [7]}
    rows.prefill(Prefill([(r, list(t)) for r, t in held.items()]))
    rows.extend(Extend(["a", "b"], [[8, 9], []], [2, 1]))
    held["a"] += [8, 9]
    assert rows.counters["gaps_closed"] == 0 and rows.attention_mask.tolist()[1] == [0, 1, 0, 0]  # b has a gap
    if widen == "a long new row":
        held["c"] = list(range(10, 19))
        rows.prefill(Prefill([("c", held["c"])]))
    steps = [[20 + i] * len(held) for i in range(4)]
    for step in steps:
        result = rows.extend(Extend(list(held), [[t] for t in step], [len(t) for t in held.values()]))
        (states,) = arrays_to_states(result.arrays, result.dtype, "cpu")
        for b, (r, t) in enumerate(zip(list(held), step)):
            held[r].append(t)
            full = torch.tensor([held[r]])
            ones = torch.ones_like(full)
            solo, _ = encoder(full, ones, positions_from_mask(ones))
            for index in encoder.indices:
                torch.testing.assert_close(states[index][b, -1], solo[index][0, -1], rtol=0, atol=1e-5)
    assert rows.counters["gaps_closed"] == 1 and rows.counters["grouped_extends"] == 0


def test_merging_and_cropping_a_sliding_layer_keeps_the_window_and_the_length():
    config = tiny("mistral").config
    first, second = DynamicCache(config=config), DynamicCache(config=config)
    kv = lambda rows, seq: (torch.randn(rows, 4, seq, 8), torch.randn(rows, 4, seq, 8))
    for layer in range(config.num_hidden_layers):
        first.update(*kv(1, 9), layer)
        second.update(*kv(2, 3), layer)
    merge_hf_caches(first, second, 9)
    layer = first.layers[0]
    assert layer.keys.shape == (3, 4, 5, 8) and layer.cumulative_length == 9
    assert layer.keys[1:, :, :2].abs().sum() == 0  # the short rows are left-padded inside the window
    crop_left_hf_cache(first, 6, 9)  # 6 leading columns are padding in every row: 3 remain
    assert layer.keys.shape == (3, 4, 3, 8) and layer.cumulative_length == 3


def test_a_model_with_chunked_attention_is_refused_before_any_request():
    shell = types.SimpleNamespace(config=Llama4TextConfig(num_hidden_layers=2, attention_chunk_size=8))
    with pytest.raises(UnbatchableCacheError, match="chunked attention"):
        check_batchable(shell, "the anchor")
    for kind in ("llama", "mistral", "gemma2", "gemma3"):
        check_batchable(tiny(kind))

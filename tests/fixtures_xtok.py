"""Genuinely different real tokenizers, trained offline on a small mixed-script text, and tiny models
for them: the fixtures of the cross-tokenizer tests and of benchmarks/xtok_bench.py.

* ``byte_bpe()``: byte-level BPE (GPT-2 / SmolLM2 style: ByteLevel pre-tokenizer and decoder, no BOS).
* ``sentencepiece_bpe()``: SentencePiece style (Metaspace "▁", BPE with byte fallback, <s> BOS),
  like Llama-2 / Gemma.
* ``char_level()``: one token per character (WordLevel), <bos> BOS, <unk> for unseen characters.
"""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Café crème, naïve façade, jalapeño, Straße and Ærøskøbing.",
    "¿Qué tal? Très bien, merci! Ünïcödé wörds everywhere.",
    "Emoji: 😀 👍🏽 🎉🎉 and a family 👨‍👩‍👧 on one line.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "Whitespace  runs,\ttabs\tand\n\nnewlines   everywhere    here.",
    "def add(a, b):\n    return a + b  # a tiny function",
    "Numbers 1234567890 and symbols ~!@#$%^&*() go here.",
]
# mixed-script text the tests decode and perturb (accents, emoji, CJK, whitespace runs)
MIXED = (
    "Hola, ¿qué tal?  Très bien.\tÜber 日本語 and 中文 text 😀👍🏽 here;\n\n  the   end of naïve words, 한국어 ok."
)


def corpus() -> list[str]:
    return SENTENCES * 20


@functools.lru_cache(maxsize=None)
def byte_bpe(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every text is encodable, multi-byte characters may split over tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


@functools.lru_cache(maxsize=None)
def sentencepiece_bpe(vocab_size: int = 360) -> PreTrainedTokenizerFast:
    """SentencePiece style: spaces become "▁" and start words; unseen characters fall back to bytes <0xNN>."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False)
    base.train_from_iterator(corpus(), trainer)
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte-fallback tokens, as SentencePiece models carry them
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@functools.lru_cache(maxsize=None)
def char_level() -> PreTrainedTokenizerFast:
    """One token per character seen in the corpus; <unk> for the others; <bos> before every text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = sorted(set("".join(SENTENCES) + MIXED))
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


TOKENIZERS = {"byte_bpe": byte_bpe, "sentencepiece": sentencepiece_bpe, "char": char_level}


def tiny_llama(vocab: int, hidden: int = 32, layers: int = 4, heads: int = 4, seed: int = 0):
    """A random-weight Llama for ``vocab`` tokens, fp32, eval mode."""
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()


def randomise_bridges(model, seed: int = 0, scale: float = 0.2):
    """Non-zero bridge weights, as training would give, so that the bridges change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.bridges.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def cycling(model, strength: float = 30.0, seed: int = 0):
    """Make a random Llama's greedy continuation walk through its whole vocabulary (a random cycle:
    the token after t is mostly perm(t)), so that decoding produces varied text (spaces, byte tokens,
    multi-byte characters) instead of repeating one token. Scales the input embeddings by ``strength``
    so the current token dominates the last hidden state, and points each LM-head row at its predecessor."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    order = torch.randperm(vocab, generator=g)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(strength / emb.norm(dim=-1, keepdim=True).mean())
        head = torch.nn.Linear(emb.shape[1], vocab, bias=False)
        unit = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        head.weight.copy_(unit[order.roll(1)][order.argsort()] * 4.0)  # row order[k] points at order[k-1]
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model


# ---------------------------------------------------------------- a servable pair with different tokenizers
def build_xtok_pair(folder, anchor_kind: str = "byte_bpe", augment_kind: str = "sentencepiece", seed: int = 0,
                    pairs: tuple = ((0, 0), (2, 2), (4, 4)), rotary: bool = True, augment_family: str = "llama"):
    """Write anchor/, augment/ (each with its own tokenizer) and bridges/ under ``folder``; returns a
    ``tests.fixtures.Pair`` (``tokenizer_no_template`` is the anchor's folder). ``augment_family``: a
    ``tests.fixtures.tiny`` family for the augmenting model (gemma3: sliding-window layers, as Gemma-3-270m).

    The anchor walks its vocabulary (``cycling``), so greedy continuations hold spaces, byte tokens and
    multi-byte characters, and words close while decoding; the bridges are non-zero, saved from a
    ComposedModel built with ``tokenizers=`` (so they record both tokenizers' fingerprints).
    """
    from pathlib import Path

    from composition import ComposedModel, CompositionConfig, LayerMapping
    from tests.fixtures import Pair

    folder = Path(folder)
    anchor_tok, augment_tok = TOKENIZERS[anchor_kind](), TOKENIZERS[augment_kind]()
    anchor = cycling(tiny_llama(len(anchor_tok), hidden=64, layers=4, heads=4, seed=seed))
    if augment_family == "llama":
        augment = tiny_llama(len(augment_tok), hidden=32, layers=4, heads=2, seed=seed + 1)
    else:
        from tests.fixtures import tiny

        augment = tiny(augment_family, hidden=32, layers=4, heads=2, vocab=len(augment_tok), seed=seed + 1)
    for name, model, tokenizer in [("anchor", anchor, anchor_tok), ("augment", augment, augment_tok)]:
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[tuple(p) for p in pairs])], rotary=rotary)
    composed = randomise_bridges(ComposedModel(anchor, [augment], cfg, tokenizers=[anchor_tok, augment_tok]), seed)
    composed.save_pretrained(folder / "bridges")
    return Pair(str(folder / "anchor"), str(folder / "augment"), str(folder / "bridges"), str(folder / "anchor"))


def load_xtok_in_process(pair):
    """The composed model with both tokenizers, as a notebook would load it from the folders."""
    from composition import ComposedModel
    from composition.loading import load_causal_lm, load_tokenizer

    tokenizers = [load_tokenizer(pair.anchor), load_tokenizer(pair.augment)]
    return ComposedModel.from_pretrained(pair.bridges, load_causal_lm(pair.anchor), [load_causal_lm(pair.augment)],
                                         tokenizers=tokenizers)

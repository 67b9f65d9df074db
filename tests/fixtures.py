"""What tests and benchmarks build: tiny Hugging Face models from configs, the character tokenizer, a servable pair.

Nothing here downloads anything. ``build_pair(folder)`` writes what ``configs/serve_tiny.yaml`` expects
from the key-value experiment, at test size: two Hugging Face folders that each hold the shared
tokenizer, and a bridges folder in ``save_pretrained`` format. Its bridges get non-zero random output
weights, so the composition changes the anchor's answers (tests/test_fixtures.py checks it): tests that
compare served text with in-process generation then really exercise the bridges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from composition import ComposedModel, CompositionConfig, LayerMapping
from composition.loading import load_causal_lm

VOCAB = 97


def tiny(kind: str, hidden: int = 32, layers: int = 4, heads: int = 4, kv_heads: int | None = None,
         vocab: int = VOCAB, seed: int = 0, sliding_window: int = 6):
    """A random-weight causal LM of family ``kind`` (llama, gpt2, qwen2, gpt_neox; mistral, gemma2, gemma3 with a
    ``sliding_window`` of a few tokens, so that short prompts already outgrow it), fp32, eval mode."""
    common = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    attention = "sdpa"
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                          max_position_embeddings=2048, **common)
    elif kind == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                          max_position_embeddings=2048, **common)
    elif kind == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=2048, **common)
    elif kind == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=2048, **common)
    elif kind == "mistral":
        cfg = MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                            max_position_embeddings=2048, sliding_window=sliding_window, **common)
    elif kind in ("gemma2", "gemma3"):
        every = 2 if kind == "gemma2" else 6
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)]
        if "full_attention" not in types:
            types[-1] = "full_attention"  # a hybrid cache, even for a few layers
        family = Gemma2Config if kind == "gemma2" else Gemma3TextConfig
        cfg = family(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads or heads, head_dim=hidden // heads,
                     max_position_embeddings=2048, sliding_window=sliding_window, layer_types=types, **common)
        attention = "eager" if kind == "gemma2" else "sdpa"  # transformers has no SDPA path for Gemma-2
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attention)
    return model.float().eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SPECIALS = ["<pad>", "<eos>", "<bos>"]  # ids 0, 1, 2


def char_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII and newline) plus <pad>=0, <eos>=1, <bos>=2."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


@dataclass
class Pair:
    anchor: str
    augment: str
    bridges: str
    tokenizer_no_template: str


def _llama(hidden: int, layers: int, heads: int, vocab: int, context: int, seed: int):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=context, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()


def build_pair(folder: str | Path, anchor_hidden: int = 64, anchor_layers: int = 4, augment_hidden: int = 32,
               augment_layers: int = 4, context: int = 512, seed: int = 0,
               pairs: tuple = ((0, 0), (2, 2), (4, 4))) -> Pair:
    """Write anchor/, augment/, bridges/ and tokenizer_no_template/ under ``folder``.

    ``pairs``: the bridges' (augment_index, anchor_index); the default's first bridge is at the anchor's input.
    """
    folder = Path(folder)
    tok = char_tokenizer()
    vocab = len(tok)
    anchor = _llama(anchor_hidden, anchor_layers, 4, vocab, context, seed)
    augment = _llama(augment_hidden, augment_layers, 4, vocab, context, seed + 1)
    for name, model in [("anchor", anchor), ("augment", augment)]:
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    char_tokenizer(chat_template=None).save_pretrained(folder / "tokenizer_no_template")
    mapping = LayerMapping(pairs=[tuple(p) for p in pairs])
    composed = ComposedModel(anchor, [augment], CompositionConfig(mappings=[mapping]))
    torch.manual_seed(seed + 2)
    with torch.no_grad():
        for bridge in composed.bridges:
            torch.nn.init.normal_(bridge.o.weight, std=0.5)  # non-zero: the bridges change the anchor's output
    composed.save_pretrained(folder / "bridges")
    return Pair(str(folder / "anchor"), str(folder / "augment"), str(folder / "bridges"),
                str(folder / "tokenizer_no_template"))


def load_in_process(pair: Pair) -> ComposedModel:
    """The composed model as a notebook would load it (the reference for served answers)."""
    anchor, augment = load_causal_lm(pair.anchor), load_causal_lm(pair.augment)
    return ComposedModel.from_pretrained(pair.bridges, anchor, [augment])


def reference_completion(model: ComposedModel, tokenizer, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy new token ids from in-process ``ComposedModel.generate`` (stops after eos, like the server)."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, eos_token_id=tokenizer.eos_token_id)
    new = out[0, len(prompt_ids):].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    return new


def write_augment(folder: str | Path, tokenizer_folder: str, hidden: int = 32, layers: int = 4, seed: int = 5) -> str:
    """A tiny random Llama reading the tokenizer of ``tokenizer_folder``, saved with it to ``folder``: another
    augmenting model for an existing anchor."""
    from composition.loading import load_tokenizer

    tok = load_tokenizer(tokenizer_folder)
    _llama(hidden, layers, 4, len(tok), 512, seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_bridges(folder: str | Path, anchor: str, augment: str, seed: int, pairs: tuple = ((0, 0), (2, 2), (4, 4)),
                  own_tokenizers: bool = False, scale: float = 0.5) -> str:
    """Non-zero random bridges composing the saved ``anchor`` and ``augment`` folders, saved to ``folder`` (a
    composition of its own, as training would write one); ``own_tokenizers``: each model reads its folder's
    tokenizer (composition across tokenizers)."""
    from composition.loading import load_tokenizer

    tokenizers = [load_tokenizer(anchor), load_tokenizer(augment)] if own_tokenizers else None
    config = CompositionConfig(mappings=[LayerMapping(pairs=[tuple(p) for p in pairs])])
    composed = ComposedModel(load_causal_lm(anchor), [load_causal_lm(augment)], config, tokenizers=tokenizers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in composed.bridges.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    composed.save_pretrained(folder)
    return str(folder)

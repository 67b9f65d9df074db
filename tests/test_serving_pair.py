"""A tiny servable model pair on disk (anchor, augmenting model, bridges, character tokenizer).

``build_pair(folder)`` writes what ``configs/serve_tiny.yaml`` expects from the key-value
experiment, at test size: two Hugging Face folders that each hold the shared tokenizer, and a
bridges folder in ``save_pretrained`` format. The bridges get non-zero random output weights, so
the composition changes the anchor's answers (checked below): tests that compare served text with
in-process generation then really exercise the bridges. Also used by benchmarks/serve_bench.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from composition import ComposedModel, CompositionConfig, LayerMapping
from composition.loading import load_causal_lm, load_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SPECIALS = ["<pad>", "<eos>", "<bos>"]  # ids 0, 1, 2


def make_char_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
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
    tok = make_char_tokenizer()
    vocab = len(tok)
    anchor = _llama(anchor_hidden, anchor_layers, 4, vocab, context, seed)
    augment = _llama(augment_hidden, augment_layers, 4, vocab, context, seed + 1)
    for name, model in [("anchor", anchor), ("augment", augment)]:
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    make_char_tokenizer(chat_template=None).save_pretrained(folder / "tokenizer_no_template")
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


# ---------------------------------------------------------------------- tests of the fixture itself
def test_char_tokenizer_round_trips_text_and_renders_the_chat_template(tmp_path):
    tok = make_char_tokenizer()
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    text = "Hello, world!\n  x=1"
    assert tok.decode(tok(text)["input_ids"]) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<user>hi\n<assistant>"


def test_bridges_of_the_test_pair_change_the_anchor_answer(tmp_path):
    pair = build_pair(tmp_path)
    model = load_in_process(pair)
    tok = load_tokenizer(pair.anchor)
    prompt = tok("The key of door seven is")["input_ids"]
    composed = reference_completion(model, tok, prompt, 24)
    anchor_only = model.anchor.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                        eos_token_id=tok.eos_token_id, pad_token_id=0)[0, len(prompt):].tolist()
    assert composed != anchor_only[: len(composed)]

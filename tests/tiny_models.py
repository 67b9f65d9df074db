"""Tiny Hugging Face causal LMs built from configs (no downloads), for tests and benchmarks."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

VOCAB = 97


def tiny(kind: str, hidden: int = 32, layers: int = 4, heads: int = 4, kv_heads: int | None = None,
         vocab: int = VOCAB, seed: int = 0):
    """A random-weight causal LM of family ``kind`` (llama, gpt2, qwen2, gpt_neox), fp32, eval mode."""
    common = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2)
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
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.float().eval()


CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 =;+-.,:?"


def char_tokenizer():
    """A character-level tokenizer (WordLevel over single characters) with pad/eos/bos/unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")

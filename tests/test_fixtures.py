"""The test fixtures themselves: the character tokenizer and the servable pair."""

from __future__ import annotations

import torch

from composition.loading import load_tokenizer
from tests.fixtures import build_pair, char_tokenizer, load_in_process, reference_completion


# ---------------------------------------------------------------------- tests of the fixture itself
def test_char_tokenizer_round_trips_text_and_renders_the_chat_template(tmp_path):
    tok = char_tokenizer()
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

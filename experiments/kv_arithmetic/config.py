"""The key-value experiment's config (``ExperimentConfig``, read from YAML) and its model specs."""

from __future__ import annotations

from pydantic import Field, model_validator

from actors.config import StrictModel
from experiments.common import ExperimentSettings
from experiments.kv_arithmetic.data import KVSettings


class ModelSpec(StrictModel):
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    steps: int = 1500
    lr: float = 3e-3
    batch_size: int = 256
    examples: int = 200_000
    weight_decay: float = 0.1


class ExperimentConfig(ExperimentSettings):
    output: str = "assets/kv_pair"
    results: str = "results/kv_arithmetic.json"
    keys: KVSettings = Field(default_factory=KVSettings)
    augment: ModelSpec = Field(default_factory=ModelSpec)
    anchor: ModelSpec = Field(default_factory=ModelSpec)
    # m_B's numeric training expressions: anchor_min_terms to keys.max_terms terms (None: keys.min_terms, as
    # evaluated). Shorter expressions let the composition data hold short KV-arithmetic expressions too, whose
    # answers depend on one or two keys (experiments/kv_arithmetic/README.md, sixth session)
    anchor_min_terms: int | None = None
    compose_examples: int = 50_000
    anchor_task_fraction: float = 0.3
    compose_steps: int = 1000
    compose_batch_size: int = 128
    compose_lr: float = 2e-3
    compose_weight_decay: float = 0.0
    # the composition data's KV-arithmetic expressions: from compose_min_terms to compose_max_terms terms
    # (None: the keys' min_terms / max_terms, the evaluation's)
    compose_min_terms: int | None = None
    compose_max_terms: int | None = None
    # a first phase of compose_first_steps (of compose_steps) on expressions of compose_first_min_terms to
    # compose_first_max_terms terms, from random bridges; the rest on the composition data above, from the
    # first phase's bridges
    compose_first_steps: int = 0
    compose_first_min_terms: int | None = None
    compose_first_max_terms: int | None = None
    composition: dict = Field(default_factory=lambda: {"mappings": [{"pairs": [[0, 0]]}], "window": 1,
                                                       "proj_hidden": 256})
    random_augment_ablation: bool = True
    lora_ablation: bool = True
    lora_lr: float = 2e-3
    eval_examples: int = 500
    seed: int = 0
    ray_workers: int = 1

    @model_validator(mode="after")
    def _term_ranges(self):
        for key in ("anchor_min_terms", "compose_min_terms", "compose_max_terms", "compose_first_min_terms",
                    "compose_first_max_terms"):
            value = getattr(self, key)
            if value is not None and not 1 <= value <= self.keys.max_terms:
                raise ValueError(f"{key} must be an integer from 1 to keys.max_terms ({self.keys.max_terms}), "
                                 f"or null; got {value!r}")
        for prefix in ("compose", "compose_first"):
            low, high = getattr(self, f"{prefix}_min_terms"), getattr(self, f"{prefix}_max_terms")
            if low is not None and high is not None and low > high:
                raise ValueError(f"{prefix}_min_terms ({low}) is above {prefix}_max_terms ({high})")
        if self.compose_first_steps and not (0 < self.compose_first_steps < self.compose_steps
                                             and self.compose_first_min_terms):
            raise ValueError(f"compose_first_steps ({self.compose_first_steps}) must be below compose_steps "
                             f"({self.compose_steps}) and needs compose_first_min_terms; or set it to 0")
        return self

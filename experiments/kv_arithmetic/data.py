"""Data for the key-value experiment (CALM paper, Table 1): keys, tasks, splits and the tokenizer.

Three tasks over expressions of 3-6 terms joined by + and -:

    KV-substitution    prompt "abc + xy - qrs ="   completion "10 + 22 - 4"   (m_A's task)
    numeric arithmetic prompt "10 + 22 - 4 ="      completion "28"            (m_B's task)
    KV-arithmetic      prompt "abc + xy - qrs ="   completion "28"            (CALM's task)

As in the paper, each key and each number is a single token of one shared word-level
tokenizer (a real ``PreTrainedTokenizerFast``, saved with both models).
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
OPS = ("+", "-")
TASKS = ("sub", "num", "kvar")  # KV-substitution, numeric arithmetic, KV-arithmetic


@dataclass(frozen=True)
class KVSettings:
    num_keys: int = 5000
    max_value: int = 20  # values are 1..max_value
    min_terms: int = 3
    max_terms: int = 6
    compose_fraction: float = 0.2  # share of keys whose expressions are in the composition data
    seed: int = 0


@dataclass
class KVWorld:
    """The keys, their values and the split of keys into composition and held-out sets."""

    settings: KVSettings
    values: dict[str, int]
    compose_keys: list[str]
    heldout_keys: list[str]

    @classmethod
    def create(cls, settings: KVSettings) -> KVWorld:
        rng = random.Random(settings.seed)
        keys: set[str] = set()
        while len(keys) < settings.num_keys:
            keys.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6))))
        ordered = sorted(keys)
        rng.shuffle(ordered)
        values = {k: rng.randint(1, settings.max_value) for k in ordered}
        n_compose = round(settings.compose_fraction * len(ordered))
        return cls(settings, values, sorted(ordered[:n_compose]), sorted(ordered[n_compose:]))

    # ---------------------------------------------------------------- expressions
    def number_range(self) -> range:
        s = self.settings
        return range(1 - (s.max_terms - 1) * s.max_value, s.max_terms * s.max_value + 1)

    def _expression(self, rng: random.Random, keys: list[str] | None, min_terms: int | None = None,
                    max_terms: int | None = None):
        n = rng.randint(min_terms or self.settings.min_terms, max_terms or self.settings.max_terms)
        ops = [rng.choice(OPS) for _ in range(n - 1)]
        if keys is None:
            terms = [str(rng.randint(1, self.settings.max_value)) for _ in range(n)]
            nums = [int(t) for t in terms]
        else:
            terms = [rng.choice(keys) for _ in range(n)]
            nums = [self.values[t] for t in terms]
        result = nums[0]
        for op, x in zip(ops, nums[1:]):
            result = result + x if op == "+" else result - x
        join = lambda items: " ".join([items[0]] + [w for pair in zip(ops, items[1:]) for w in pair])
        return join(terms), join([str(x) for x in nums]), str(result)

    def example(self, task: str, rng: random.Random, keys: list[str] | None = None,
                min_terms: int | None = None, max_terms: int | None = None) -> dict:
        """One ``{"task", "prompt", "completion"}`` row; ``keys`` restricts which keys appear,
        ``min_terms`` and ``max_terms`` (default: the settings') the expression's length."""
        if task == "num":  # numbers in place of keys; the length bounds apply too
            expr, _, result = self._expression(rng, None, min_terms, max_terms)
            return {"task": task, "prompt": f"{expr} =", "completion": result}
        expr, substituted, result = self._expression(rng, keys, min_terms, max_terms)
        completion = substituted if task == "sub" else result
        if task not in ("sub", "kvar"):
            raise ValueError(f"unknown task {task!r}: use sub, num or kvar")
        return {"task": task, "prompt": f"{expr} =", "completion": completion}

    def examples(self, task: str, count: int, seed: int, keys: list[str] | None = None,
                 min_terms: int | None = None, max_terms: int | None = None) -> list[dict]:
        rng = random.Random(seed)
        return [self.example(task, rng, keys, min_terms, max_terms) for _ in range(count)]

    def composition_examples(self, count: int, anchor_task_fraction: float, seed: int,
                             keys: list[str] | None = None, min_terms: int | None = None,
                             max_terms: int | None = None) -> list[dict]:
        """The bridges' training rows: KV-arithmetic over ``keys`` (default: the composition keys), then
        ``anchor_task_fraction`` of numeric rows (so the anchor keeps its skill); ``seed`` is the experiment's.
        ``min_terms`` / ``max_terms`` bound the KV-arithmetic expressions' terms (default: the settings')."""
        n_anchor_task = int(count * anchor_task_fraction)
        return (self.examples("kvar", count - n_anchor_task, seed + 3, keys if keys is not None else self.compose_keys,
                              min_terms, max_terms)
                + self.examples("num", n_anchor_task, seed + 4))

    def evaluation_examples(self, task: str, count: int, seed: int, keys: list[str] | None = None) -> list[dict]:
        """Evaluation rows of ``task`` (KV tasks over ``keys``); ``seed`` is the experiment's."""
        return self.examples(task, count, seed + 10, keys)

    # ---------------------------------------------------------------- persistence
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "keys.json").write_text(json.dumps({
            "settings": self.settings.__dict__, "values": self.values,
            "compose_keys": self.compose_keys, "heldout_keys": self.heldout_keys}))

    @classmethod
    def load(cls, folder: Path) -> KVWorld:
        d = json.loads((folder / "keys.json").read_text())
        return cls(KVSettings(**d["settings"]), d["values"], d["compose_keys"], d["heldout_keys"])


def build_tokenizer(world: KVWorld):
    """A word-level HF tokenizer in which every key and every number is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [PAD, EOS, BOS, UNK, *OPS, "="] + [str(n) for n in world.number_range()] + sorted(world.values)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                  unk_token=UNK, padding_side="left")
    return tok

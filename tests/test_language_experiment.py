"""The language experiment's own logic, on small synthetic splits (no models, no package text): the fixed
prompt, the packed training rows, the held-out checks and the config's validation. The data stage itself
(SWORD reading, verse alignment, disjoint splits) is tested in test_language_data.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from actors.config import parse
from composition.config import CompositionConfig, ConfigError
from experiments.language.config import LANGUAGES, SHOTS, ArmsConfig, LanguageConfig, find_shots, translation_prompt
from experiments.language.mix import build_mix, check_heldout, eval_sets, packed


def splits() -> dict:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n)) + "."

    def verses(book, n):
        return [{"ref": f"{book} 1:{i + 1}", "book": book, "es": "es " + text(8), "en": "en " + text(8)} for i in range(n)]

    train = verses("Genesis", 60) + [dict(SHOTS[0], book="Genesis")]
    test = verses("Ruth", 30)
    bpc = {lang: {"train": [{"text": text(30), "source": f"fortunes-{lang}:train{i % 3}"} for i in range(80)],
                  "test": [{"text": text(50), "source": f"fortunes-{lang}:held{i % 2}"} for i in range(20)]}
           for lang in LANGUAGES if lang != "en"}
    bpc["en"] = {"train": [{"text": text(12), "source": f"kjv:Genesis 2:{i}"} for i in range(200)],
                 "test": [{"text": text(12), "source": f"kjv:Ruth 2:{i}"} for i in range(60)]}
    return {"translation": {"train": train, "test": test}, "bible": {"train": train, "valid": [], "test": test},
            "bpc": bpc}


def config(**extra) -> LanguageConfig:
    return parse(LanguageConfig, {"steps": 10, "batch_size": 8, "eval_verses": 12, "bpc_texts": 4,
                                  "bpc_chars": [50, 900], **extra})


def test_the_prompt_is_one_fixed_shot_then_the_source_verse():
    prompt = translation_prompt("Hola.", list(SHOTS))
    assert prompt == ("Translate Spanish to English.\n\nSpanish: Y dijo Dios: Sea la luz: y fué la luz.\n"
                      "English: And God said, Let there be light: and there was light.\n\nSpanish: Hola.\nEnglish:")


def test_a_shot_that_is_not_the_training_verse_it_claims_is_refused():
    s = splits()
    assert find_shots(s["translation"]["train"]) == list(SHOTS)
    changed = [dict(r, en="something else") if r["ref"] == SHOTS[0]["ref"] else r for r in s["translation"]["train"]]
    with pytest.raises(SystemExit, match="Genesis 1:3"):
        find_shots(changed)


def test_packed_rows_join_whole_texts_up_to_the_character_budget():
    texts = [{"text": "x" * 100, "source": f"f:{i}"} for i in range(20)]
    rows = list(packed(texts, 5, 350, random.Random(0)))
    assert len(rows) == 5
    for text, sources in rows:
        assert text.count("\n\n") == len(sources.split("|")) - 1 == 2  # three texts of 100 fit in 350
        assert len(text) <= 350
    used = [s for _, sources in rows for s in sources.split("|")]
    assert len(used) == len(set(used))  # no text twice


def test_the_mix_has_its_shares_and_no_held_out_item():
    s = splits()
    rows, made = build_mix(config(), s, list(SHOTS))
    assert len(rows) == 80 and made["translation"] == 44 and made["en"] == 4
    assert all(r["prompt"].endswith("English:") and r["completion"].startswith(" en ") for r in rows
               if r["kind"] == "translation")
    assert SHOTS[0]["ref"] not in {r["source"] for r in rows}  # the shot is in every prompt, never a row
    evals = eval_sets(config(), s)
    assert len(evals["translation"]) == 12 and all(len(evals["bpc"][lang]) == 4 for lang in LANGUAGES)
    assert not any(check_heldout(rows, evals, s).values())


def test_the_held_out_check_finds_each_kind_of_leak():
    s = splits()
    rows, _ = build_mix(config(), s, list(SHOTS))
    evals = eval_sets(config(), s)
    verse = evals["translation"][0]
    leaked = rows + [{"prompt": "p", "completion": " " + verse["en"], "kind": "translation", "source": verse["ref"]},
                     {"prompt": "", "completion": "intro " + evals["bpc"]["de"][0]["text"], "kind": "de",
                      "source": evals["bpc"]["de"][0]["source"]}]
    checks = check_heldout(leaked, evals, s)
    assert checks["eval_verses_in_training"] == 1 and checks["eval_references_in_training_text"] == 1
    assert checks["training_verses_from_heldout_books"] == 1
    assert checks["eval_texts_in_training"] == 1 and checks["eval_fortune_files_in_training"] == 1


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="steps"):
        config(steps=0)
    with pytest.raises(ConfigError, match="every share is 0"):
        config(mix={"translation": 0, "de": 0, "es": 0, "it": 0, "ru": 0, "en": 0})
    with pytest.raises(ConfigError, match="bpc_chars"):
        config(bpc_chars=[900, 50])
    with pytest.raises(ConfigError, match="pack_chars"):
        config(pack_chars={"de": 100})
    with pytest.raises(ConfigError, match="device"):
        config(device="tpu")


CONFIGS = sorted(str(p) for p in Path("experiments/language/configs").rglob("*.yaml"))


def test_every_shipped_configuration_is_tested():
    assert {Path(c).stem for c in CONFIGS} >= {"quick", "full", "gpu", "probe_layers_a", "probe_layers_b", "probe_lr",
                                               "arms_quick", "arms_full"}


@pytest.mark.parametrize("path", CONFIGS)
def test_the_shipped_configurations_validate(path):
    """Every configuration, the trials' and the arms' too, loads, and its bridges fit SmolLM2 (30 layers) and
    Gemma-3 (18)."""
    cfg = (ArmsConfig if Path(path).stem.startswith("arms_") else LanguageConfig).load(path)
    assert cfg.device == ("cuda" if Path(path).stem == "gpu" else "cpu")
    pairs = CompositionConfig.from_dict(cfg.composition).mappings[0].resolve(augment_layers=18, anchor_layers=30)
    assert all(0 <= a <= 18 and 0 <= b <= 30 for a, b in pairs)


def test_the_word_check_splits_the_loss_by_the_predicted_token():
    """experiments/language/word_check.py: with one token per character, the word-initial targets are the spaces
    and newlines, and the two classes' bits add up to the whole next-token loss."""
    import math

    import torch

    from experiments.common import PlainLM
    from experiments.language.word_check import split_loss
    from tests.fixtures import char_tokenizer, tiny

    tok = char_tokenizer(chat_template=None)
    model = PlainLM(tiny("llama", vocab=len(tok)))
    texts = [{"text": "ab cd\nef"}, {"text": "x yz w"}, {"text": "long word here"}]
    out = split_loss(model, tok, texts, batch_size=2)
    assert out["tokens"] == {"word_initial": 2 + 2 + 2, "continuation": 5 + 3 + 11}
    total = 0.0
    for t in texts:
        ids = torch.tensor([tok(t["text"])["input_ids"]])
        with torch.no_grad():
            logits = model(ids, torch.ones_like(ids)).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")) / math.log(2)
    assert sum(out["bits"].values()) == pytest.approx(total, rel=1e-4)


def test_the_gpu_configuration_says_what_it_needs_on_a_machine_without_cuda(capsys):
    import torch

    from experiments.language.run import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA device.*full.yaml"):
        main(["--config", "experiments/language/configs/gpu.yaml"])

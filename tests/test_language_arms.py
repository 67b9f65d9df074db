"""experiments/language/domain.py: the rows of issue 32's two arms. The specialist's rows come from the training
split only, the composition data is a seeded 5% of them in Spanish and English only, the evaluation sets hold the
same English messages in every language, and the held-out check counts a leak."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from experiments.language.config import ArmsConfig, translation_prompt
from experiments.language.domain import check_heldout, composition_rows, domain_rows, eval_sets, gettext_shot

UNSEEN = ["de", "ru"]
SHOT = {"ref": "Genesis 1:3", "es": "Y dijo Dios: Sea la luz: y fué la luz.",
        "en": "And God said, Let there be light: and there was light."}


def message(package: str, lang: str, english: str) -> dict:
    return {"package": package, "lang": lang, "en": english, "xx": f"[{lang}] {english}"}


def splits() -> dict:
    verses = {s: [{"ref": f"{book} 1:{i}", "es": f"Versículo {book} {i}.", "en": f"Verse {book} {i}."}
                  for i in range(1, n + 1)] for s, book, n in (("train", "Genesis", 200), ("test", "Ruth", 30))}
    verses["train"].append(dict(SHOT))
    train_messages = [message("sed", lang, f"Training message number {i}") for lang in ["es", *UNSEEN]
                      for i in range(60)]
    test_messages = [message("tar", lang, f"Held out message number {i}") for lang in ["es", *UNSEEN]
                     for i in range(20)]
    test_messages.append(message("tar", "es", "Only in Spanish"))  # not in every language: never evaluated
    texts = {lang: {s: [{"text": f"{lang} {s} text {i}. " * 8, "source": f"fortunes-{lang}:f{s}"} for i in range(200)]
                    for s in ("train", "test")} for lang in ("es", "de", "it", "ru")}
    texts["en"] = {s: [{"text": f"English verse {s} {i}.", "source": f"kjv:{i}"} for i in range(200)]
                   for s in ("train", "test")}
    return {"translation": verses, "bible": {"train": verses["train"], "valid": [], "test": verses["test"]},
            "gettext": {"train": train_messages, "valid": [], "test": test_messages}, "bpc": texts}


def config(**changes) -> ArmsConfig:
    return ArmsConfig(**{"specialist_steps": 25, "batch_size": 8, "composition_share": 0.05, "unseen_languages": UNSEEN,
                         "eval_verses": 10, "eval_messages": 12, "bpc_texts": 3, "bpc_chars": (10, 900), **changes})


def test_the_specialist_sees_the_training_split_and_the_composition_data_is_five_percent_of_it():
    cfg, data = config(), splits()
    shot = gettext_shot(data["gettext"]["train"], ["es", *UNSEEN])
    rows, made = domain_rows(cfg, data, [SHOT], shot)
    assert len(rows) == 200 and sum(made.values()) == 200
    assert made == {"translation": 90, "gettext": 40, "reverse": 30, "es": 40}
    assert {r["kind"] for r in rows} == {"translation", "gettext", "reverse", "es"}
    assert {r["lang"] for r in rows} <= {"es", "en"}
    assert not any(r["source"] == "Genesis 1:3" for r in rows)  # the prompt's shot is not a row
    reverse = next(r for r in rows if r["kind"] == "reverse")
    assert reverse["prompt"].startswith("Translate English to Spanish.") and reverse["completion"].startswith(" Versículo")
    message_row = next(r for r in rows if r["kind"] == "gettext")
    assert message_row["prompt"].startswith(f"Translate Spanish to English.\n\nSpanish: {shot['es']}\nEnglish: {shot['en']}")
    share = composition_rows(cfg, rows)
    assert len(share) == 10 and all(r in rows for r in share)
    assert share == composition_rows(cfg, rows) != composition_rows(config(seed=1), rows)


def test_the_evaluation_holds_the_same_english_in_every_language_and_nothing_the_rows_hold():
    cfg, data = config(), splits()
    rows, _ = domain_rows(cfg, data, [SHOT], gettext_shot(data["gettext"]["train"], ["es", *UNSEEN]))
    evals = eval_sets(cfg, data)
    assert list(evals["messages"]) == ["es", "de", "ru"]
    english = [[m["en"] for m in evals["messages"][lang]] for lang in evals["messages"]]
    assert len(english[0]) == 12 and english[0] == english[1] == english[2]
    assert "Only in Spanish" not in english[0]
    assert evals["messages"]["de"][0]["de"] == "[de] " + english[0][0]
    assert len(evals["verses"]) == 10 and list(evals["bpc"]) == ["en", "es", "de", "it", "ru"]
    packages = {"test": ["tar"], "valid": []}
    assert not any(check_heldout(rows, evals, data, packages).values())
    leaked = [*rows, {"prompt": "", "completion": " x", "kind": "gettext", "lang": "es",
                      "source": f"tar:{evals['messages']['es'][0]['en']}"}]
    counts = check_heldout(leaked, evals, data, packages)
    assert counts["eval_messages_in_rows"] == 3 and counts["rows_from_heldout_packages"] == 1


def test_a_language_cannot_be_both_trained_and_unseen():
    with pytest.raises(ValidationError, match=r"\['es'\] cannot be unseen languages"):
        config(unseen_languages=["es", "de"])
    assert translation_prompt("Hallo Welt", [{"de": "Guten Tag", "en": "Good day"}], "de") == (
        "Translate German to English.\n\nGerman: Guten Tag\nEnglish: Good day\n\nGerman: Hallo Welt\nEnglish:")


def test_the_report_gives_each_arm_its_systems_targets_seeds_and_paired_bootstrap(tmp_path):
    """arms.py's report from evaluations made up here: arm 1 maps CALM to the specialist composition and the
    untrained augment to Gemma-3's; arm 2 averages the unseen languages; the bootstrap tells a clearly better
    system (p < 0.05) from an identical one (p = 1); a second seed is reported beside the first and averaged."""
    from experiments.common import StageLog
    from experiments.language.arms import Run, arm1_results, arm2_results

    cfg = config(extra_seeds=[1], bootstrap_samples=200, output=str(tmp_path))
    refs = [f"the file number {i} was copied to the disk" for i in range(30)]
    evals = {"verses": [{"ref": f"Ruth 1:{i}", "es": "x", "en": r} for i, r in enumerate(refs)],
             "messages": {lang: [{"ref": f"tar:{r}", lang: "x", "en": r} for r in refs] for lang in ["es", *UNSEEN]}}
    good, bad = list(refs), ["nothing at all here" for _ in refs]

    def system(hyps: list[str], chrf: float) -> dict:
        sets = ["bible", "es", *UNSEEN]
        return {"chrf": dict.fromkeys(sets, chrf), "translations": dict.fromkeys(sets, hyps),
                "bits_per_char": {lang: 1.0 for lang in ("en", "es", "de", "it", "ru")}}

    results = {name: system(bad, 10.0) for name in ("anchor", "augment", "specialist", "calm_random_augment", "lora",
                                                    "lora_full", "lora_seed1")}
    results.update(calm_specialist=system(good, 90.0), calm_augment=system(good, 80.0),
                   calm_specialist_seed1=system(good, 70.0), calm_augment_seed1=system(bad, 20.0))
    run = Run(cfg, StageLog(tmp_path, None), results=results)
    run.__dict__["evals"] = evals
    arm1 = arm1_results(run, {})
    assert arm1["chrf"]["calm"] == {"bible": 90.0, "gettext": 90.0}
    assert arm1["chrf"]["calm_untrained_augment"] == {"bible": 80.0, "gettext": 80.0}
    assert arm1["paired_bootstrap_p"]["calm_vs_lora"]["bible"] < 0.05
    assert arm1["paired_bootstrap_p"]["calm_vs_calm_untrained_augment"]["bible"] == 1.0  # same translations
    assert arm1["targets"]["calm_at_least_lora_plus_3_significant"]["holds"]
    assert arm1["targets"]["calm_at_least_untrained_augment_plus_3"]["holds"]  # 90 >= 80 + 3
    assert arm1["looping"]["calm"] == {"bible": 0.0, "gettext": 0.0}
    assert arm1["chrf_by_seed"]["calm"] == {"seeds": {"0": {"bible": 90.0, "gettext": 90.0},
                                                      "1": {"bible": 70.0, "gettext": 70.0}},
                                            "mean": {"bible": 80.0, "gettext": 80.0}}
    arm2 = arm2_results(run, {})
    assert arm2["trained_languages"] == ["es"] and arm2["unseen_languages"] == UNSEEN
    assert arm2["chrf"]["calm"] == {"es": 80.0, "de": 80.0, "ru": 80.0} and arm2["chrf_mean_unseen"]["calm"] == 80.0
    assert arm2["targets"]["calm_significantly_above_lora_on_6_of_8"]["languages"] == UNSEEN
    assert arm2["targets"]["random_augment_at_least_3_below_calm"]["holds"]
    assert arm2["chrf_by_seed"]["calm"]["mean"]["de"] == 50.0
    assert set(arm2["paired_bootstrap_p"]) == {"calm_vs_lora", "calm_vs_calm_random_augment", "calm_specialist_vs_lora"}


def test_a_trial_starts_from_its_base_runs_specialist_and_held_out_sets_and_checks_them(tmp_path):
    """``trial_of``: the base run's specialist and held-out sets are hard-linked (no copy, same fingerprints), the
    evaluations of the untrained systems are kept and the trained ones dropped; a trial that changes only the
    composition share keeps the specialist, one that changes the specialist's settings is stopped."""
    import json

    from experiments.common import StageLog, as_json
    from experiments.language.arms import _specialist_inputs, start_trial

    base_cfg = config(output=str(tmp_path / "base"))
    base = tmp_path / "base"
    (base / "specialist").mkdir(parents=True)
    (base / "specialist" / "config.json").write_text("{}")
    (base / "specialist" / "model.safetensors").write_bytes(b"weights")
    (base / "eval").mkdir()
    (base / "eval" / "eval.json").write_text("{}")
    evaluations = {name: {"result": name} for name in ("anchor", "augment", "specialist", "calm_specialist", "lora")}
    (base / "stages.json").write_text(json.dumps({
        "specialist": {"wall_s": 9.0, "inputs": as_json(_specialist_inputs(base_cfg))}, "heldout": {"inputs": {}},
        "compose_calm_specialist": {"wall_s": 1.0}, "evaluate": evaluations}))

    with pytest.raises(SystemExit, match="no finished specialist and heldout stage"):
        start_trial(config(output=str(tmp_path / "t0"), trial_of=str(tmp_path / "nothing")))

    trial = config(output=str(tmp_path / "trial"), trial_of=str(base), composition_share=0.25)
    start_trial(trial)
    out = tmp_path / "trial"
    assert (out / "specialist" / "model.safetensors").stat().st_ino == (base / "specialist" / "model.safetensors").stat().st_ino
    assert (out / "eval" / "eval.json").stat().st_ino == (base / "eval" / "eval.json").stat().st_ino
    log = StageLog(out, None)
    assert sorted(log.records["evaluate"]) == ["anchor", "augment", "specialist"]
    assert "compose_calm_specialist" not in log.records
    assert not log.begin("specialist", True, "specialist", _specialist_inputs(trial), out / "specialist")  # reused
    changed = config(output=str(out), trial_of=str(base), specialist_lr=1e-3)
    with pytest.raises(SystemExit, match=r"specialist_lr changed"):
        log.begin("specialist", True, "specialist", _specialist_inputs(changed), out / "specialist")
    with pytest.raises(ValidationError, match="needs an output of its own"):
        config(output=str(base), trial_of=str(base))


def test_without_the_random_twin_arm_2_says_its_target_was_not_run(tmp_path):
    from experiments.common import StageLog
    from experiments.language.arms import Run, arm2_results, trained_bridges

    cfg = config(random_augment_ablation=False, output=str(tmp_path), bootstrap_samples=100)
    assert sorted(trained_bridges(cfg)) == ["calm_augment", "calm_specialist"]
    refs = [f"message {i} was read" for i in range(10)]
    evals = {"verses": [], "messages": {lang: [{"en": r} for r in refs] for lang in ["es", *UNSEEN]}}
    sets = ["es", *UNSEEN]
    results = {name: {"chrf": dict.fromkeys(sets, 20.0), "translations": dict.fromkeys(sets, refs),
                      "bits_per_char": {"en": 1.0}}
               for name in ("anchor", "augment", "specialist", "calm_augment", "calm_specialist", "lora")}
    run = Run(cfg, StageLog(tmp_path, None), results=results)
    run.__dict__["evals"] = evals
    arm2 = arm2_results(run, {})
    assert "calm_random_augment" not in arm2["chrf"]
    assert set(arm2["paired_bootstrap_p"]) == {"calm_vs_lora", "calm_specialist_vs_lora"}
    assert arm2["targets"]["random_augment_at_least_3_below_calm"]["holds"] is None


def test_a_translation_that_repeats_a_phrase_counts_as_looping():
    from experiments.language.arms import looping

    assert looping("And the name of the son of the son of the son of the son of Jesse")
    assert not looping("And the name of the man was Elimelech, and the name of his wife Naomi.")
    assert not looping("")

"""Where composition could beat fine-tuning (issue 32): two arms, one pipeline.

    python -m experiments.language.arms --config experiments/language/configs/arms_quick.yaml

**Arm 1, the paper's setting.** The augmenting model is a *specialist*: Gemma-3-270m further trained (LoRA, merged
back) on the domain's whole training split, Spanish <-> English verses, Spanish -> English gettext messages and
Spanish text. The composition data is ~5% of those rows. Systems, on the same composition rows, steps and loop:
the anchor, the specialist, CALM (anchor + specialist), LoRA on the anchor (at least CALM's parameters) on the 5%,
CALM onto the untrained Gemma-3, and LoRA on the whole split (the upper reference). Scored with chrF on held-out
Bible books and held-out gettext packages (Spanish -> English).

**Arm 2, languages the bridges never saw.** The same composition data is Spanish only (and English); the systems
translate held-out gettext messages of eight other languages into English: CALM onto Gemma-3 (and onto the
specialist), LoRA, CALM onto a random Gemma-3, the anchor and Gemma-3.

Stages (resumable, as experiments/language/run.py's; what each measured is in ``<output>/stages.json``):

1. data        the Debian packages' Bibles, fortunes and gettext catalogues (experiments/language/data.py)
2. models      SmolLM2 and Gemma-3 from their GGUF packages, and a random Gemma-3
3. domain      the specialist's rows and the composition share (experiments/language/domain.py)
4. heldout     the evaluation sets, checked to share nothing with the rows
5. specialist  LoRA on Gemma-3 over the specialist's rows, merged into ``<output>/specialist``
6. compose     the bridges onto the specialist, onto Gemma-3 and onto the random Gemma-3 (the Ray Train job)
7. lora        LoRA on the anchor: on the composition rows, and on the whole split
8. evaluate    per system: chrF per test set and language, bits per character (cached while nothing changed)
9. report      results/language_specialist*.json (arm 1) and results/language_transfer*.json (arm 2), PNGs

A trial (``trial_of: <a finished run's output>``) changes the composition step only: it starts from that run's
specialist, held-out sets and untrained systems' evaluations (:func:`start_trial`), e.g. configs/trials/arms_*.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from composition.checkpoint import atomic_folder, files_signature
from composition.training import TrainSettings
from experiments.common import (
    PlainLM,
    StageLog,
    encode_rows,
    evaluate_systems,
    fmt_time,
    lora_model,
    loss_history,
    machine,
    markdown_table,
    pyplot,
    read_jsonl,
    run_stages,
    save_figure,
    stage_arguments,
    stage_seconds,
    train,
    warmup,
    weights_fingerprint,
    write_jsonl,
    write_results,
)
from experiments.language import run as language
from experiments.language.config import ArmsConfig
from experiments.language.domain import (
    BPC_LANGUAGES,
    check_heldout,
    composition_rows,
    domain_rows,
    eval_sets,
    gettext_shot,
)
from experiments.language.evaluation import Loaders, bits_per_char, loaded, translate

BRIDGES = {"calm_specialist": "specialist", "calm_augment": "augment", "calm_random_augment": "random_augment"}
SEEDED = ("calm_specialist", "calm_augment", "lora")  # trained again for each of extra_seeds


def trained_bridges(cfg: ArmsConfig) -> dict:
    """The compositions this configuration trains: :data:`BRIDGES`, less the random-Gemma twin when
    ``random_augment_ablation`` is off (a trial that needs only arm 1's comparisons)."""
    return {k: v for k, v in BRIDGES.items() if cfg.random_augment_ablation or k != "calm_random_augment"}


def seeded(name: str, seed: int) -> str:
    """A system trained with an extra seed: ``calm_augment_seed1``."""
    return f"{name}_seed{seed}"


@dataclass
class Run:
    cfg: ArmsConfig
    log: StageLog
    splits: dict | None = None
    shots: list[dict] | None = None  # the verse shot (checked against the data)
    folders: dict | None = None
    bridge_params: int | None = None
    results: dict | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.output)

    @property
    def rows_folder(self) -> Path:
        return self.out / "domain"

    @property
    def eval_folder(self) -> Path:
        return self.out / "eval"

    @cached_property
    def evals(self) -> dict:
        return json.loads((self.eval_folder / "eval.json").read_text())

    @cached_property
    def message_shot(self) -> dict:
        return gettext_shot(self.splits["gettext"]["train"], ["es", *self.cfg.unseen_languages])


def _rows_inputs(cfg: ArmsConfig) -> dict:
    """What the specialist's rows are drawn with (not the composition share: that picks among them)."""
    return {k: getattr(cfg, k) for k in ("domain_mix", "specialist_steps", "batch_size", "unseen_languages",
                                         "pack_chars", "seed")}


def _domain_inputs(cfg: ArmsConfig) -> dict:
    return {**_rows_inputs(cfg), "composition_share": cfg.composition_share}


def _test_set_inputs(cfg: ArmsConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("unseen_languages", "eval_verses", "eval_messages", "bpc_texts", "bpc_chars",
                                         "seed")}


def _specialist_inputs(cfg: ArmsConfig) -> dict:
    return {**_rows_inputs(cfg), **{k: getattr(cfg, k) for k in ("specialist_rank", "specialist_lr", "max_length",
                                                                 "train_dtype")}}


def _compose_inputs(cfg: ArmsConfig) -> dict:
    return {**_domain_inputs(cfg), **_specialist_inputs(cfg),
            **{k: getattr(cfg, k) for k in ("composition", "steps", "lr", "lora_lr")}}


UNTRAINED = ("anchor", "augment", "specialist")  # the systems a trial (``trial_of``) takes from its base run


def start_trial(cfg: ArmsConfig) -> None:
    """A trial's first run: hard-link its base run's specialist and held-out sets into ``cfg.output``, with their
    stage records and the evaluations of :data:`UNTRAINED`. The stages then check them against this config as
    they check any finished stage (a trial that changes the specialist's or the held-out sets' settings stops with
    what changed), and the evaluation reuses what it would compute again (same weights, same sets)."""
    base, out = Path(cfg.trial_of), Path(cfg.output)
    if (out / "stages.json").is_file():
        return  # started before: it resumes
    records = json.loads((base / "stages.json").read_text()) if (base / "stages.json").is_file() else {}
    missing = [name for name in ("specialist", "heldout") if name not in records]
    if missing or not (base / "specialist" / "config.json").is_file():
        raise SystemExit(f"error: trial_of: {base} holds no finished {' and '.join(missing) or 'specialist'} stage; "
                         f"run its configuration first (python -m experiments.language.arms --config ...)")
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("specialist", "eval"):
        shutil.copytree(base / folder, out / folder, copy_function=os.link)
    kept = {name: records[name] for name in ("models", "specialist", "heldout") if name in records}
    kept["evaluate"] = {k: v for k, v in records.get("evaluate", {}).items() if k in UNTRAINED}
    kept["trial_of"] = {"base": str(base), "reused": sorted(kept["evaluate"])}
    (out / "stages.json").write_text(json.dumps(kept, indent=1) + "\n")
    print(f"[trial] from {base}: its specialist, held-out sets and the evaluations of {sorted(kept['evaluate'])}",
          flush=True)


# ---------------------------------------------------------------- stages
def data(run: Run) -> None:
    """1. The data stage (shared with experiments/language/run.py), and the prompts' shots."""
    language.data(run)
    print(f"[data] the gettext shot: {run.message_shot['en']!r}", flush=True)


def models(run: Run) -> None:
    """2. SmolLM2, Gemma-3 and the random Gemma-3."""
    language.models(run)


def domain(run: Run) -> None:
    """3. The specialist's rows and the composition share."""
    cfg, folder = run.cfg, run.rows_folder

    def make() -> dict:
        rows, made = domain_rows(cfg, run.splits, run.shots, run.message_shot)
        share = composition_rows(cfg, rows)
        with atomic_folder(folder) as tmp:
            write_jsonl(rows, tmp / "specialist.jsonl")
            write_jsonl(share, tmp / "composition.jsonl")
        return {"rows": made, "composition_rows": len(share),
                "composition_kinds": {k: sum(r["kind"] == k for r in share) for k in made}}

    run.log.stage("domain", (folder / "composition.jsonl").is_file(), make, inputs=_domain_inputs(cfg), folder=folder,
                  timed=False)


def heldout(run: Run) -> None:
    """4. The evaluation sets, written once the held-out check against the specialist's rows passes (their own
    stage: their size does not change what was trained)."""
    cfg, folder = run.cfg, run.eval_folder

    def make() -> dict:
        rows = read_jsonl(run.rows_folder / "specialist.jsonl")
        evals = eval_sets(cfg, run.splits)
        checks = check_heldout(rows, evals, run.splits, run.splits["summary"]["heldout"]["gettext_packages"])
        if any(checks.values()):
            raise RuntimeError(f"held-out items reached the training rows: {checks}")
        with atomic_folder(folder) as tmp:
            (tmp / "eval.json").write_text(json.dumps(evals, ensure_ascii=False) + "\n")
        return {"checks": checks, "verses": len(evals["verses"]),
                "messages_per_language": len(next(iter(evals["messages"].values())))}

    run.log.stage("heldout", (folder / "eval.json").is_file(), make, inputs=_test_set_inputs(cfg), folder=folder,
                  timed=False)


def fit_specialist(cfg: ArmsConfig, out: Path, rows: list[dict]) -> dict:
    """LoRA (rank ``specialist_rank`` on every projection) on Gemma-3 over the specialist's rows, once each; merged
    into the weights in float32 and saved as a plain model folder (``<out>/specialist``)."""
    from composition import load_causal_lm, load_tokenizer

    tok = load_tokenizer(cfg.augment)
    model = lora_model(load_causal_lm(cfg.augment, dtype=cfg.train_dtype), cfg.specialist_rank).to(cfg.device)
    for p in model.parameters():  # adapters in float32 over the frozen bf16 model, as the bridges
        if p.requires_grad:
            p.data = p.data.float()
    steps = cfg.specialist_steps
    settings = TrainSettings(lr=cfg.specialist_lr, steps=steps, warmup_steps=warmup(steps), weight_decay=0.0)
    history = train(PlainLM(model), encode_rows(tok, rows, cfg.max_length, add_special_tokens=True), settings,
                    cfg.batch_size, tok.pad_token_id, cfg.seed, checkpoint=out / "specialist.ckpt",
                    checkpoint_every=max(10, steps // 20), label="specialist", log_every=max(1, min(25, steps // 10)),
                    device=cfg.device)
    adapters = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    del model
    merged = lora_model(load_causal_lm(cfg.augment, dtype="float32"), cfg.specialist_rank)
    missing = set(adapters) - {n for n, _ in merged.named_parameters()}
    if missing:
        raise RuntimeError(f"adapter weights {sorted(missing)[:3]} have no place in the merged model")
    merged.load_state_dict(adapters, strict=False)
    with atomic_folder(out / "specialist") as tmp:
        merged.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return {"history": loss_history(history), "rank": cfg.specialist_rank,
            "trainable_parameters": sum(p.numel() for p in adapters.values()), "rows": len(rows)}


def specialist(run: Run) -> None:
    """5. The specialist: Gemma-3 trained on the domain's whole training split."""
    cfg, out = run.cfg, run.out
    run.log.stage("specialist", (out / "specialist" / "config.json").is_file(),
                  lambda: fit_specialist(cfg, out, read_jsonl(run.rows_folder / "specialist.jsonl")),
                  inputs=_specialist_inputs(cfg), folder=f"{out / 'specialist'} and {out / 'specialist.ckpt'}")
    run.folders["specialist"] = out / "specialist"


def compose(run: Run) -> None:
    """6. The same bridges, rows and steps onto the specialist, Gemma-3 and the random Gemma-3."""
    cfg, out = run.cfg, run.out
    jobs = [(name, augment, cfg) for name, augment in trained_bridges(cfg).items()]
    jobs += [(seeded(name, seed), BRIDGES[name], cfg.model_copy(update={"seed": seed}))
             for seed in cfg.extra_seeds for name in SEEDED if name in BRIDGES]
    for name, augment, job_cfg in jobs:
        run.log.stage(f"compose: {name}", (out / f"bridges_{name}" / "bridges.safetensors").is_file(),
                      lambda name=name, augment=augment, job_cfg=job_cfg: {"history": language.fit_bridges(
                          job_cfg, out, run.folders[augment], out / f"bridges_{name}", f"arms_{name}",
                          train_file=run.rows_folder / "composition.jsonl")},
                      key=f"compose_{name}", inputs=_compose_inputs(job_cfg),
                      folder=f"{out / f'bridges_{name}'} and {out / 'ray_runs'}")
    run.bridge_params = language._bridge_params(out / "bridges_calm_specialist")


def lora(run: Run) -> None:
    """7. LoRA on the anchor with at least the bridges' parameters: on the composition rows (same steps), and on
    the specialist's rows (the whole split, the specialist's steps)."""
    cfg, out = run.cfg, run.out
    composition, split = run.rows_folder / "composition.jsonl", run.rows_folder / "specialist.jsonl"
    runs = [("lora", cfg, composition, None)]
    runs += [(seeded("lora", seed), cfg.model_copy(update={"seed": seed}), composition, None) for seed in cfg.extra_seeds]
    if cfg.lora_full:
        runs.append(("lora_full", cfg, split, cfg.specialist_steps))
    for name, run_cfg, rows, steps in runs:
        run.log.stage(name, (out / name / "adapter_config.json").is_file(),
                      lambda name=name, run_cfg=run_cfg, rows=rows, steps=steps: language.lora(
                          run_cfg, out, read_jsonl(rows), run.bridge_params, name=name, steps=steps),
                      inputs={**_compose_inputs(run_cfg), "bridge_params": run.bridge_params},
                      folder=f"{out / name} and {out / f'{name}.ckpt'}")


def systems(run: Run) -> dict:
    """name -> (folders whose weights define it, loader returning (model, tokenizer))."""
    cfg, out, folders, load = run.cfg, run.out, run.folders, Loaders(run.cfg)

    def calm(name: str, augment: str) -> tuple:
        return [folders["anchor"], folders[augment], out / f"bridges_{name}"], load.calm(folders[augment],
                                                                                        out / f"bridges_{name}")

    table = {name: ([folders[name]], load.plain(folders[name])) for name in ("anchor", "augment", "specialist")}
    table.update({name: calm(name, augment) for name, augment in trained_bridges(cfg).items()})
    for name in ("lora", "lora_full") if cfg.lora_full else ("lora",):
        table[name] = ([folders["anchor"], out / name], load.lora(out / name))
    for seed in cfg.extra_seeds:
        for name in SEEDED:
            trained = seeded(name, seed)
            table[trained] = (calm(trained, BRIDGES[name]) if name in BRIDGES
                              else ([folders["anchor"], out / trained], load.lora(out / trained)))
    return table


def scorer(run: Run):
    """``score(name, load)``: one system's translations and chrF per test set ("bible", and each language's
    gettext messages), and bits per character per language."""
    import sacrebleu

    cfg, evals = run.cfg, run.evals
    sets = {"bible": (evals["verses"], run.shots, "es"),
            **{lang: (items, [run.message_shot], lang) for lang, items in evals["messages"].items()}}

    def score(name: str, load) -> dict:
        with loaded(load, cfg.seed) as (model, tok):
            hyps = {key: translate(model, tok, items, shots, cfg.eval_batch_size, f"{name}/{key}", source=source)
                    for key, (items, shots, source) in sets.items()}
            bpc = {lang: round(bits_per_char(model, tok, evals["bpc"][lang], 4, f"{name}/{lang}"), 4)
                   for lang in BPC_LANGUAGES}
        chrf = {key: round(sacrebleu.corpus_chrf(hyps[key], [[p["en"] for p in items]]).score, 2)
                for key, (items, _, _) in sets.items()}
        return {"chrf": chrf, "bits_per_char": bpc, "translations": hyps}

    return score


def evaluate(run: Run) -> None:
    """8. Every system on every test set (cached per system while its weights and the sets are unchanged)."""
    run.log.begin("evaluate", False)
    stamp = [weights_fingerprint(run.rows_folder) + files_signature([run.eval_folder / "eval.json"]), run.cfg.eval_dtype]
    run.results = evaluate_systems(run.log, systems(run), stamp, scorer(run), "result",
                                   lambda r: f"chrF {r['chrf']}")


# ---------------------------------------------------------------- report
def paired_p(baseline: list[str], system: list[str], refs: list[str], samples: int, seed: int) -> float:
    """sacrebleu's paired bootstrap (``--paired-bs``) on chrF: the p-value of the two systems' difference. Two
    systems with the same translations get 1: sacrebleu's test counts resampled differences *above* the real
    one, so a real difference of 0 would get its smallest p-value."""
    from sacrebleu.metrics import CHRF
    from sacrebleu.significance import PairedTest

    if baseline == system:
        return 1.0
    test = PairedTest([("baseline", baseline), ("system", system)], {"chrf": CHRF()}, [refs], test_type="bs",
                      n_samples=samples)
    test._seed = seed + 1  # PairedTest reads its seed from here (0 would mean "unseeded")
    _, scores = test()
    metric = next(k for k in scores if k != "System")  # named by the metric's signature: "chrF2"
    return round(float(scores[metric][1].p_value), 4)


def _refs(evals: dict, test_set: str) -> list[str]:
    items = evals["verses"] if test_set == "bible" else evals["messages"][test_set]
    return [p["en"] for p in items]


def _compare(run: Run, pairs: dict, test_sets: list[str]) -> dict:
    """{label: {test set: p}} for ``pairs`` {label: (system, baseline)}."""
    r = run.results
    return {label: {t: paired_p(r[b]["translations"][t], r[a]["translations"][t], _refs(run.evals, t),
                                run.cfg.bootstrap_samples, run.cfg.seed) for t in test_sets}
            for label, (a, b) in pairs.items()}


def by_seed(run: Run, names: dict, test_sets: list[str]) -> dict:
    """For each system trained with several seeds: its chrF per seed and the mean over seeds, per test set."""
    out = {}
    for label, system in names.items():
        if system not in SEEDED or not run.cfg.extra_seeds:
            continue
        runs = {run.cfg.seed: system, **{seed: seeded(system, seed) for seed in run.cfg.extra_seeds}}
        per = {str(seed): {t: run.results[name]["chrf"][t] for t in test_sets} for seed, name in runs.items()}
        out[label] = {"seeds": per, "mean": {t: round(sum(p[t] for p in per.values()) / len(per), 2) for t in test_sets}}
    return out


def looping(text: str, n: int = 3, repeats: int = 4) -> bool:
    """Whether a translation loops: one word ``n``-gram occurs ``repeats`` times or more ("the son of the son of
    the son of ..."). Greedy decoding of a model trained on few rows does this; chrF counts it as noise."""
    words = text.split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats


def looping_share(run: Run, names: dict, test_sets: dict) -> dict:
    """{system: {test set: share of its translations that loop}} (``test_sets``: label -> evaluation key)."""
    r = run.results
    return {k: {t: round(sum(map(looping, r[v]["translations"][s])) / max(1, len(r[v]["translations"][s])), 3)
                for t, s in test_sets.items()} for k, v in names.items()}


def _target(holds: bool, **figures) -> dict:
    return {**figures, "holds": bool(holds)}


def arm1_results(run: Run, common: dict) -> dict:
    r, stages = run.results, run.log.records
    names = {"anchor": "anchor", "specialist": "specialist", "calm": "calm_specialist", "lora": "lora",
             "calm_untrained_augment": "calm_augment", "augment": "augment"}
    if "lora_full" in r:
        names["lora_full"] = "lora_full"
    sets = {"bible": "bible", "gettext": "es"}
    chrf = {k: {t: r[v]["chrf"][s] for t, s in sets.items()} for k, v in names.items()}
    p = _compare(run, {"calm_vs_lora": ("calm_specialist", "lora"),
                       "calm_vs_calm_untrained_augment": ("calm_specialist", "calm_augment")}, list(sets.values()))
    p = {label: {t: per[s] for t, s in sets.items()} for label, per in p.items()}
    en = {k: r[v]["bits_per_char"]["en"] for k, v in names.items()}
    targets = {
        "calm_at_least_lora_plus_3_significant": _target(
            all(chrf["calm"][t] >= chrf["lora"][t] + 3 and p["calm_vs_lora"][t] < 0.05 for t in sets),
            calm=chrf["calm"], lora=chrf["lora"], p=p["calm_vs_lora"]),
        "calm_at_least_untrained_augment_plus_3": _target(
            all(chrf["calm"][t] >= chrf["calm_untrained_augment"][t] + 3 for t in sets),
            calm=chrf["calm"], calm_untrained_augment=chrf["calm_untrained_augment"]),
        "aim_calm_above_both_parts": _target(
            all(chrf["calm"][t] > max(chrf["anchor"][t], chrf["specialist"][t]) for t in sets),
            calm=chrf["calm"], anchor=chrf["anchor"], specialist=chrf["specialist"]),
        "english_within_0.02_of_anchor": _target(en["calm"] <= en["anchor"] + 0.02, calm=en["calm"], anchor=en["anchor"]),
    }
    domain_record = stages.get("domain", {})
    return {"arm": "specialist (the paper's setting)", "chrf": chrf, "paired_bootstrap_p": p,
            "chrf_by_seed": {k: {**v, "seeds": {seed: {t: per[s] for t, s in sets.items()}
                                                for seed, per in v["seeds"].items()},
                                 "mean": {t: v["mean"][s] for t, s in sets.items()}}
                             for k, v in by_seed(run, names, list(sets.values())).items()},
            "bits_per_char_en": en, "looping": looping_share(run, names, sets), "targets": targets, "systems": names,
            "data": {"specialist_rows": domain_record.get("rows"), "composition_rows": domain_record.get("composition_rows"),
                     "composition_kinds": domain_record.get("composition_kinds"),
                     "composition_share": run.cfg.composition_share, "eval_verses": len(run.evals["verses"]),
                     "eval_messages": len(run.evals["messages"]["es"]),
                     "checks": stages.get("heldout", {}).get("checks")},
            "specialist": {k: v for k, v in stages.get("specialist", {}).items() if k != "history"},
            "examples": _examples(run, names, "bible"), **common}


def arm2_results(run: Run, common: dict) -> dict:
    r, unseen = run.results, run.cfg.unseen_languages
    names = {"anchor": "anchor", "augment": "augment", "calm": "calm_augment", "lora": "lora",
             "calm_random_augment": "calm_random_augment", "specialist": "specialist",
             "calm_specialist": "calm_specialist"}
    names = {k: v for k, v in names.items() if v in r}  # the random twin is not trained without its ablation
    chrf = {k: {lang: r[v]["chrf"][lang] for lang in ["es", *unseen]} for k, v in names.items()}
    bpc = {k: r[v]["bits_per_char"] for k, v in names.items()}
    pairs = {"calm_vs_lora": ("calm_augment", "lora"), "calm_vs_calm_random_augment": ("calm_augment",
                                                                                      "calm_random_augment"),
             "calm_specialist_vs_lora": ("calm_specialist", "lora")}
    p = _compare(run, {k: v for k, v in pairs.items() if v[1] in r}, unseen)

    def mean(system: str) -> float:
        return round(sum(chrf[system][lang] for lang in unseen) / len(unseen), 2)

    means = {k: mean(k) for k in names}
    wins = [lang for lang in unseen if chrf["calm"][lang] > chrf["lora"][lang] and p["calm_vs_lora"][lang] < 0.05]
    targets = {
        "calm_mean_at_least_lora_plus_3": _target(means["calm"] >= means["lora"] + 3, calm=means["calm"], lora=means["lora"]),
        "calm_significantly_above_lora_on_6_of_8": _target(len(wins) >= min(6, len(unseen)), languages=wins),
        "calm_mean_at_least_anchor_plus_5": _target(means["calm"] >= means["anchor"] + 5, calm=means["calm"],
                                                    anchor=means["anchor"]),
        "random_augment_at_least_3_below_calm": _target(means["calm_random_augment"] <= means["calm"] - 3,
                                                        calm=means["calm"], calm_random_augment=means["calm_random_augment"])
        if "calm_random_augment" in means else {"holds": None, "not_run": "random_augment_ablation: false"},
        "english_within_0.02_of_anchor": _target(bpc["calm"]["en"] <= bpc["anchor"]["en"] + 0.02,
                                                 calm=bpc["calm"]["en"], anchor=bpc["anchor"]["en"]),
    }
    return {"arm": "languages the bridges never saw", "trained_languages": ["es"], "unseen_languages": unseen,
            "chrf": chrf, "chrf_mean_unseen": means, "bits_per_char": bpc, "paired_bootstrap_p": p, "targets": targets,
            "looping": looping_share(run, names, {lang: lang for lang in ["es", *unseen]}),
            "chrf_by_seed": by_seed(run, names, ["es", *unseen]),
            "systems": names, "data": {"composition_rows": run.log.records.get("domain", {}).get("composition_rows"),
                                       "eval_messages_per_language": len(run.evals["messages"]["es"])},
            "examples": _examples(run, names, unseen[0]), **common}


def _examples(run: Run, names: dict, test_set: str, count: int = 6) -> list[dict]:
    items = run.evals["verses"] if test_set == "bible" else run.evals["messages"][test_set]
    return [{"test_set": test_set, "reference": items[i]["en"],
             **{k: run.results[v]["translations"][test_set][i] for k, v in names.items()}}
            for i in range(min(count, len(items)))]


def _bars(axes, chrf: dict, groups: list[str], title: str) -> None:
    width = 0.8 / len(chrf)
    for i, (system, scores) in enumerate(chrf.items()):
        axes.bar([g + i * width for g in range(len(groups))], [scores[g] for g in groups], width, label=system)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    axes.set_ylabel("chrF (into English)")
    axes.set_title(title)
    axes.legend(fontsize=7)


def report(run: Run) -> None:
    """9. The two results files, their PNGs and tables."""
    cfg = run.cfg
    common = {"config": json.loads(cfg.model_dump_json()), "seeds": [cfg.seed, *cfg.extra_seeds], "stage_seconds": stage_seconds(run.log.records),
              "machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "heldout": {"gettext_packages": run.splits["summary"]["heldout"]["gettext_packages"],
                          "test_books": run.splits["summary"]["heldout"]["test_books"]},
              "shots": {"verse": run.shots, "gettext": run.message_shot}}
    arm1, arm2 = arm1_results(run, common), arm2_results(run, common)
    plt = pyplot()
    for results, path, groups in ((arm1, Path(cfg.results), ["bible", "gettext"]),
                                  (arm2, Path(cfg.transfer_results), ["es", *cfg.unseen_languages])):
        write_results(results, path)
        fig, axes = plt.subplots(figsize=(11, 4.5))
        _bars(axes, results["chrf"], groups, results["arm"])
        save_figure(fig, path.with_suffix(".png"), dpi=110, bbox_inches="tight")
        print(f"\n{results['arm']} ({path}):")
        print(markdown_table(["system", *groups], [[k, *(v[g] for g in groups)] for k, v in results["chrf"].items()]))
        for key, t in results["targets"].items():
            verdict = "not run" if t["holds"] is None else "holds" if t["holds"] else "MISSED"
            print(f"  target {key}: {verdict} "
                  f"{json.dumps({k: v for k, v in t.items() if k != 'holds'})}")
    print(f"\nall stages: {fmt_time(sum(common['stage_seconds'].values()))}", flush=True)


STAGES = [data, models, domain, heldout, specialist, compose, lora, evaluate, report]


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments("python -m experiments.language.arms", __doc__, "experiments/language/configs/arms_quick.yaml",
                           STAGES, argv)
    cfg = ArmsConfig.load(args.config)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: {args.config}: device: cuda, but torch sees no CUDA device here")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if cfg.trial_of:
        start_trial(cfg)
    run = Run(cfg, StageLog(Path(cfg.output), args.stop_after))
    return run_stages(STAGES, run, run.log)


if __name__ == "__main__":
    sys.exit(main())

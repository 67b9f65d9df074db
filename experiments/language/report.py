"""Stage 7 of the language experiment: the results JSON, the issue's targets, a Markdown table, a PNG, and the
bridges exported in bf16."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from composition.checkpoint import atomic_folder
from experiments.common import machine, markdown_table, plot_curves, pyplot, save_figure, stage_seconds
from experiments.language.config import LANGUAGE_NAMES, LANGUAGES, SHOTS, LanguageConfig

SYSTEM_NAMES = {"anchor": "SmolLM2-135M (anchor)", "augment": "Gemma-3-270m (augmenting)", "calm": "CALM",
                "lora": "LoRA on the anchor", "calm_random_augment": "CALM, random Gemma-3"}
# Bansal et al. 2024, Table 2 (FLORES-200, XX -> En, chrF, averaged over low-resource languages; PaLM2 models)
PAPER_CHRF = {"augment": 37.2, "anchor": 41.7, "calm": 46.1}


def targets(results: dict) -> dict:
    """The issue's targets, each with the measured figures and whether it holds."""
    chrf = {k: v["chrf"] for k, v in results.items()}
    bpc = {k: v["bits_per_char"] for k, v in results.items()}
    four = ("de", "es", "it", "ru")
    out = {}
    if "calm" in chrf:
        out["chrf_calm_at_least_anchor_plus_5"] = {"calm": chrf["calm"], "anchor": chrf["anchor"],
                                                   "holds": chrf["calm"] >= chrf["anchor"] + 5}
        if "lora" in chrf:
            out["chrf_calm_above_lora"] = {"calm": chrf["calm"], "lora": chrf["lora"], "holds": chrf["calm"] > chrf["lora"]}
        closed = {lang: (bpc["anchor"][lang] - bpc["calm"][lang]) / (bpc["anchor"][lang] - bpc["augment"][lang])
                  for lang in four}
        mean = sum(closed.values()) / len(closed)
        out["bpc_gap_closed_at_least_80_percent"] = {"per_language": {k: round(v, 3) for k, v in closed.items()},
                                                     "mean": round(mean, 3), "holds": mean >= 0.8}
        below = [lang for lang in four if bpc["calm"][lang] < bpc["augment"][lang]]
        out["bpc_below_augment_on_two_languages"] = {"languages": below, "holds": len(below) >= 2}
        out["english_bpc_within_0.02_of_anchor"] = {"calm": bpc["calm"]["en"], "anchor": bpc["anchor"]["en"],
                                                    "holds": bpc["calm"]["en"] <= bpc["anchor"]["en"] + 0.02}
        if "calm_random_augment" in chrf:
            r = "calm_random_augment"
            mean_bpc = {k: sum(bpc[k][lang] for lang in four) / 4 for k in ("calm", r)}
            out["random_augment_below_calm"] = {
                "chrf": {"calm": chrf["calm"], r: chrf[r]}, "mean_bpc_4_languages": {k: round(v, 4) for k, v in mean_bpc.items()},
                "holds": chrf[r] < chrf["calm"] and mean_bpc[r] > mean_bpc["calm"]}
    return out


def scores_table(results: dict) -> str:
    """chrF and bits per character per system, as Markdown."""
    rows = [[SYSTEM_NAMES[name], f"{r['chrf']}" + (f" (paper {PAPER_CHRF[name]})" if name in PAPER_CHRF else "")]
            + [f"{r['bits_per_char'][lang]:.3f}" for lang in LANGUAGES] for name, r in results.items()]
    return markdown_table(["system", "chrF es->en"] + [f"bits/char {lang}" for lang in LANGUAGES], rows)


def plot(results: dict, path: Path) -> None:
    """Bits per character per language and system, chrF per system, and the training curves, in one PNG."""
    scores = results["systems"]
    fig, (bars, chrf, curves) = pyplot().subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1.6, 0.8, 1.2]})
    width = 0.8 / len(scores)
    for k, (name, r) in enumerate(scores.items()):
        xs = [i + (k - (len(scores) - 1) / 2) * width for i in range(len(LANGUAGES))]
        bars.bar(xs, [r["bits_per_char"][lang] for lang in LANGUAGES], width, label=SYSTEM_NAMES[name])
    bars.set_xticks(range(len(LANGUAGES)), [LANGUAGE_NAMES[lang] for lang in LANGUAGES])
    bars.set_ylabel("bits per character (held-out text; lower is better)")
    bars.set_title("bits per character")
    bars.legend(fontsize=8)
    names = list(scores)
    chrf.bar(range(len(names)), [scores[n]["chrf"] for n in names], color=[f"C{i}" for i in range(len(names))])
    chrf.set_xticks(range(len(names)), [SYSTEM_NAMES[n].replace(" (", "\n(").replace(", ", ",\n") for n in names],
                    fontsize=7)
    chrf.set_ylabel(f"chrF, {results['data']['eval_verses']} held-out verses")
    chrf.set_title("Spanish -> English translation (greedy)")
    plot_curves(curves, results["training_curves"], points=30)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss (completion tokens, anchor's tokens)")
    curves.set_title("training curves (moving average)")
    curves.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100, format="png")


def export_bridges(bridges: Path, dest: Path) -> int:
    """The trained bridges in bfloat16 (half the bytes; float32 again when loaded); returns the file's size."""
    from safetensors.torch import load_file, save_file

    from composition.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    state = load_file(str(bridges / WEIGHTS_FILE))
    with atomic_folder(dest) as tmp:
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        shutil.copy(bridges / CONFIG_FILE, tmp / CONFIG_FILE)
    return (dest / WEIGHTS_FILE).stat().st_size


def _data(records: dict, summary: dict, evals: dict) -> dict:
    """What the systems were trained and scored on: row counts, evaluation sizes, the held-out checks."""
    return {"training_rows": records["mix"]["rows"], "eval_verses": len(evals["translation"]),
            "bpc_texts": {lang: len(evals["bpc"][lang]) for lang in LANGUAGES},
            "bpc_chars": {lang: sum(len(t["text"]) for t in evals["bpc"][lang]) for lang in LANGUAGES},
            "sizes": summary.get("sizes"), "prompt_shots": [s["ref"] for s in SHOTS],
            "heldout_checks": records["mix"]["checks"], "data_stage_checks": summary.get("checks")}


def build_results(cfg: LanguageConfig, records: dict, summary: dict, evals: dict, by_system: dict,
            bridge_params: int) -> dict:
    """The results JSON: the scores, the targets, the data, the parameters, seeds, stage seconds, the machine,
    8 example translations and the training curves. ``records`` are the stage log's, ``summary`` the data
    stage's data.json, ``by_system`` the evaluation's."""
    seconds = stage_seconds(records)
    examples = [{"ref": p["ref"], "es": p["es"], "reference": p["en"],
                 **{name: r["translations"][i] for name, r in by_system.items()}}
                for i, p in enumerate(evals["translation"][:8])]
    return {
        "config": cfg.model_dump(),
        "chrf": {name: r["chrf"] for name, r in by_system.items()},
        "bits_per_char": {name: r["bits_per_char"] for name, r in by_system.items()},
        "paper_chrf_table2": PAPER_CHRF,
        "targets": targets(by_system),
        "systems": {name: {"chrf": r["chrf"], "bits_per_char": r["bits_per_char"]} for name, r in by_system.items()},
        "data": _data(records, summary, evals),
        "heldout": {"bible_books": summary["settings"]["test_books"],
                    "fortune_files": summary["settings"].get("test_files")},
        "parameters": {"bridges": bridge_params, "lora": records.get("ablation_lora", {}).get("parameters"),
                       "lora_rank": records.get("ablation_lora", {}).get("rank")},
        "seeds": {"experiment": cfg.seed, "random_augment_init": cfg.seed + 7},
        "stage_seconds": seconds,
        "wall_seconds_total": round(sum(seconds.values()), 1),
        "machine": machine(gpu=torch.cuda.get_device_name() if cfg.device == "cuda" else None),
        "date": time.strftime("%Y-%m-%d"),
        "examples": examples,
        "training_curves": {"CALM bridges": records.get("compose", {}).get("history"),
                            "CALM bridges, random Gemma-3": records.get("ablation_random", {}).get("history"),
                            "LoRA on the anchor": records.get("ablation_lora", {}).get("history")},
    }

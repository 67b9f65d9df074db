"""Stage 7 of the key-value experiment: the results JSON, a Markdown table, and a PNG of the training curves
and the accuracies."""

from __future__ import annotations

import json
import time
from pathlib import Path

from experiments.common import machine, markdown_table, plot_curves, pyplot, save_figure, stage_seconds
from experiments.kv_arithmetic.config import ExperimentConfig
from experiments.kv_arithmetic.data import TASKS, KVWorld

TASK_NAMES = {"sub": "KV-substitution", "num": "numeric arithmetic", "kvar": "KV-arithmetic (held-out keys)"}
PAPER = {"m_A": {"sub": 98.1, "num": 4.2, "kvar": 0.7}, "m_B": {"sub": 0.0, "num": 73.7, "kvar": 0.0},
         "CALM": {"sub": 92.9, "num": 72.0, "kvar": 84.3}}  # Bansal et al. 2024, Table 1


def build_results(cfg: ExperimentConfig, records: dict, world: KVWorld, accuracy: dict, bridge_params: int) -> dict:
    """The results JSON: accuracies (and the paper's), the data's sizes, parameter counts, seeds, stage seconds,
    the machine and the training curves. ``records`` are the stage log's."""
    from composition import load_causal_lm

    out, rec = Path(cfg.output), records

    def base_history(role: str):  # pairs trained before stages.json existed kept it in the model folder
        legacy = out / role / "train_history.json"
        return rec.get(role, {}).get("history") or (json.loads(legacy.read_text()) if legacy.is_file() else None)

    seconds = stage_seconds(rec)
    anchor, augment = load_causal_lm(str(out / "anchor")), load_causal_lm(str(out / "augment"))
    return {
        "config": cfg.model_dump(),
        "accuracy_percent": accuracy,
        "paper_percent": PAPER,
        "data": {"keys": len(world.values), "compose_keys": len(world.compose_keys),
                 "heldout_keys": len(world.heldout_keys), "eval_examples_per_task": cfg.eval_examples,
                 "compose_examples": cfg.compose_examples,
                 "compose_anchor_task_examples": int(cfg.compose_examples * cfg.anchor_task_fraction),
                 "keys_disjoint": not set(world.compose_keys) & set(world.heldout_keys)},
        "parameters": {"anchor": sum(p.numel() for p in anchor.parameters()),
                       "augment": sum(p.numel() for p in augment.parameters()),
                       "bridges": bridge_params,
                       "lora": rec.get("ablation_lora", {}).get("parameters"),
                       "lora_rank": rec.get("ablation_lora", {}).get("rank")},
        "seeds": {"experiment": cfg.seed, "keys": cfg.keys.seed},
        "stage_seconds": seconds,
        "wall_seconds_total": round(sum(seconds.values()), 1),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "training_curves": {"m_A (KV-substitution)": base_history("augment"),
                            "m_B (numeric arithmetic)": base_history("anchor"),
                            "CALM bridges": rec.get("compose", {}).get("history"),
                            "CALM bridges, random m_A": rec.get("ablation_random", {}).get("history"),
                            "LoRA on m_B": rec.get("ablation_lora", {}).get("history")},
    }


def accuracy_table(accuracy: dict) -> str:
    rows = [[name] + [f"{acc[t]}" + (f" (paper {PAPER[name][t]})" if name in PAPER else "") for t in TASKS]
            for name, acc in accuracy.items()]
    return markdown_table(["system"] + [TASK_NAMES[t] for t in TASKS], rows)


def plot(results: dict, path: Path) -> None:
    """Training curves of every trained stage, and the accuracy table, in one PNG."""
    fig, (curves, table) = pyplot().subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    plot_curves(curves, results["training_curves"], points=100, x="steps_run")  # the second phase continues the line
    curves.set_yscale("log")
    curves.set_xlabel("steps run (both phases)")
    curves.set_ylabel("training loss (completion tokens)")
    curves.set_title("training curves")
    curves.legend()
    acc = results["accuracy_percent"]
    cells = [[n] + [f"{acc[n][t]}" + (f" ({PAPER[n][t]})" if n in PAPER else "") for t in TASKS] for n in acc]
    table.axis("off")
    headers = ["system"] + [TASK_NAMES[t].replace(" (", "\n(") for t in TASKS]  # two lines, not clipped
    tab = table.table(cellText=cells, colLabels=headers, loc="center", colWidths=[0.25, 0.23, 0.25, 0.27])
    tab.auto_set_font_size(False)
    tab.set_fontsize(9)
    tab.scale(1, 1.6)
    for (row, _), cell in tab.get_celld().items():
        if row == 0:
            cell.set_height(cell.get_height() * 1.8)
    table.set_title("exact match % (paper's Table 1 in parentheses)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)

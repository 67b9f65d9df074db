"""The key-value experiment (experiments/kv_arithmetic/): data splits, and the whole pipeline at a tiny scale.

The pipeline test runs every stage for real (m_A and m_B trained from scratch, bridges through the
Ray Train job on the session's cluster, both ablations, greedy evaluation, report) with a
configuration small enough for the test suite; its accuracies mean nothing, the file's shape does.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments.kv_arithmetic.config import ExperimentConfig
from experiments.kv_arithmetic.data import TASKS, KVSettings, KVWorld, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "keys": {"num_keys": 300, "max_value": 5, "min_terms": 3, "max_terms": 4, "compose_fraction": 0.2, "seed": 3},
    "augment": {"hidden": 32, "layers": 1, "heads": 2, "steps": 20, "lr": 3.0e-3, "batch_size": 32, "examples": 600},
    "anchor": {"hidden": 32, "layers": 2, "heads": 2, "steps": 20, "lr": 3.0e-3, "batch_size": 32, "examples": 600},
    "compose_examples": 400,
    "compose_steps": 8,  # one phase, as both shipped configs (compose_first_steps, an option, is checked below)
    "compose_batch_size": 16,
    "composition": {"mappings": [{"pairs": [[0, 0]]}], "window": 1, "proj_hidden": 32},
    "random_augment_ablation": True,
    "lora_ablation": True,
    "eval_examples": 24,
}


def _keys_in(rows, world):
    return {t for r in rows for t in r["prompt"].split() if t in world.values}


def test_splits_are_disjoint_and_cover_every_key():
    world = KVWorld.create(KVSettings(num_keys=500, seed=1))
    compose, heldout = set(world.compose_keys), set(world.heldout_keys)
    assert not compose & heldout
    assert compose | heldout == set(world.values)
    assert len(compose) == 100
    assert _keys_in(world.examples("kvar", 300, 5, world.compose_keys), world) <= compose
    assert _keys_in(world.examples("kvar", 300, 6, world.heldout_keys), world) <= heldout


def test_data_is_a_function_of_the_seed():
    a, b = KVWorld.create(KVSettings(num_keys=200, seed=4)), KVWorld.create(KVSettings(num_keys=200, seed=4))
    assert a.values == b.values and a.compose_keys == b.compose_keys
    assert a.examples("kvar", 20, 1, a.compose_keys) == b.examples("kvar", 20, 1, b.compose_keys)
    assert KVWorld.create(KVSettings(num_keys=200, seed=5)).values != a.values


def test_expressions_are_correct():
    world = KVWorld.create(KVSettings(num_keys=100, min_terms=3, max_terms=6, seed=2))
    rng = random.Random(0)
    for _ in range(200):
        sub = world.example("sub", rng, list(world.values))
        keys, numbers = sub["prompt"].rstrip(" =").split(), sub["completion"].split()
        assert 5 <= len(keys) <= 11
        assert [world.values.get(k, k) for k in keys] == [int(n) if n.lstrip("-").isdigit() else n for n in numbers]
        num = world.example("num", rng)
        assert eval(num["prompt"].rstrip("=")) == int(num["completion"])  # digits and +/- only
        kvar = world.example("kvar", rng, world.compose_keys)
        assert eval(" ".join(str(world.values.get(t, t)) for t in kvar["prompt"].rstrip(" =").split())) == int(
            kvar["completion"])


def test_every_task_honours_the_length_bounds():
    # numeric rows too: an m_B probe on 2-term expressions once silently got 3-6 terms (experiments/kv_arithmetic/README.md)
    world = KVWorld.create(KVSettings(num_keys=100, min_terms=3, max_terms=6, seed=2))
    rng = random.Random(1)
    for task in ("num", "sub", "kvar"):
        rows = [world.example(task, rng, world.compose_keys, min_terms=2, max_terms=2) for _ in range(20)]
        assert {len(r["prompt"].rstrip(" =").split()) for r in rows} == {3}, task  # a, op, b
    default = [world.example("num", rng) for _ in range(200)]
    assert {len(r["prompt"].rstrip(" =").split()) for r in default} == {5, 7, 9, 11}  # the settings' 3-6 terms


def test_every_key_and_number_is_one_token():
    world = KVWorld.create(KVSettings(num_keys=50, seed=0))
    tok = build_tokenizer(world)
    for word in [*world.values, *map(str, world.number_range())]:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tok.unk_token_id not in tok("abc + 3 =", add_special_tokens=False)["input_ids"][1:]


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"compose_stepz": 3}))
    with pytest.raises(SystemExit, match="compose_stepz"):
        ExperimentConfig.load(str(bad))
    bad.write_text(yaml.safe_dump({"anchor": {"hiden": 3}}))
    with pytest.raises(SystemExit, match="hiden"):
        ExperimentConfig.load(str(bad))
    bad.write_text(yaml.safe_dump({"anchor_min_terms": 0}))
    with pytest.raises(SystemExit, match=r"anchor_min_terms must be an integer from 1 to keys.max_terms \(6\)"):
        ExperimentConfig.load(str(bad))
    bad.write_text(yaml.safe_dump({"compose_min_terms": 5, "compose_max_terms": 3}))
    with pytest.raises(SystemExit, match=r"compose_min_terms \(5\) is above compose_max_terms \(3\)"):
        ExperimentConfig.load(str(bad))


def test_a_finished_stage_is_not_reused_with_other_settings(tmp_path):
    """The data stages in process (--stop-after data, no Ray); a changed setting stops the rerun with the fix."""
    from experiments.kv_arithmetic.run import main

    config = tmp_path / "kv.yaml"
    cfg = {**TINY, "output": str(tmp_path / "out"), "results": str(tmp_path / "r.json")}
    config.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(config), "--stop-after", "data"]) == 0
    first = (tmp_path / "out" / "data" / "compose_train.jsonl").read_text()
    assert main(["--config", str(config), "--stop-after", "data"]) == 0  # unchanged: reused
    assert (tmp_path / "out" / "data" / "compose_train.jsonl").read_text() == first

    config.write_text(yaml.safe_dump({**cfg, "compose_min_terms": 2}))
    with pytest.raises(SystemExit, match=r"stage composition data .* \(compose_min_terms changed\)\. Delete .*"
                                         r"compose_train\.jsonl to run it again"):
        main(["--config", str(config), "--stop-after", "data"])
    (tmp_path / "out" / "data" / "compose_train.jsonl").unlink()  # as the message says: rebuilt, nothing else
    assert main(["--config", str(config), "--stop-after", "data"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "data" / "compose_train.jsonl").open()]
    assert min(len(r["prompt"].split()) for r in rows if r["task"] == "kvar") == 4  # "k1 + k2 ="

    config.write_text(yaml.safe_dump({**cfg, "compose_min_terms": 2, "keys": {**TINY["keys"], "num_keys": 301}}))
    with pytest.raises(SystemExit, match=r"stage data .* \(keys changed\)"):
        main(["--config", str(config), "--stop-after", "data"])


def test_a_two_phase_composition_writes_its_first_phase_rows_from_composition_keys(tmp_path):
    """compose_first_steps (an option no shipped config uses): the data stage writes the first phase's rows on
    compose_first_min_terms..compose_first_max_terms-term expressions of composition keys (no Ray)."""
    from experiments.kv_arithmetic.run import main

    config = tmp_path / "kv.yaml"
    config.write_text(yaml.safe_dump({**TINY, "compose_first_steps": 4, "compose_first_min_terms": 3,
                                      "output": str(tmp_path / "out"), "results": str(tmp_path / "r.json")}))
    assert main(["--config", str(config), "--stop-after", "data"]) == 0
    world = KVWorld.load(tmp_path / "out" / "data")
    rows = [json.loads(x) for x in (tmp_path / "out" / "data" / "compose_first.jsonl").read_text().splitlines()]
    assert rows and _keys_in(rows, world) <= set(world.compose_keys)
    assert min(len(r["prompt"].split()) for r in rows if r["task"] == "kvar") == 6  # "k1 + k2 + k3 ="


def _run(ray_cluster, config: Path, timeout: float = 400):
    """The experiment as a user runs it, connected to the session's cluster (its GCS address)."""
    return subprocess.run([sys.executable, "-m", "experiments.kv_arithmetic", "--config", str(config)],
                          env={**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_quick_pipeline_end_to_end(ray_cluster, tmp_path):
    config = tmp_path / "kv.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output": str(tmp_path / "pair"),
                                      "results": str(tmp_path / "results" / "kv.json")}))
    proc = _run(ray_cluster, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("data", "augment", "anchor", "compose", "evaluate"):
        assert f"=== stage {stage}: running" in proc.stdout
    assert "ETA" in proc.stdout

    results = json.loads((tmp_path / "results" / "kv.json").read_text())
    systems = ["m_A", "m_B", "CALM", "CALM, random m_A", "LoRA on m_B"]
    assert list(results["accuracy_percent"]) == systems
    for name in systems:
        for task in TASKS:
            assert 0.0 <= results["accuracy_percent"][name][task] <= 100.0
    assert results["data"] == {"keys": 300, "compose_keys": 60, "heldout_keys": 240, "eval_examples_per_task": 24,
                               "compose_examples": 400, "compose_anchor_task_examples": 120, "keys_disjoint": True}
    params = results["parameters"]
    assert params["bridges"] > 0 and params["anchor"] > params["bridges"]
    assert 0.5 <= params["lora"] / params["bridges"] <= 1.5, params  # the same parameter budget
    for curve in ("m_A (KV-substitution)", "m_B (numeric arithmetic)", "CALM bridges", "CALM bridges, random m_A",
                  "LoRA on m_B"):
        hist = results["training_curves"][curve]
        assert hist and hist[-1]["steps_run"] == len(hist), curve
    for curve in ("CALM bridges", "CALM bridges, random m_A"):
        assert [h["step"] for h in results["training_curves"][curve]] == list(range(1, 9)), curve
    assert results["machine"]["cpus"] >= 1 and results["seeds"]["experiment"] == 0
    assert results["wall_seconds_total"] > 0
    assert (tmp_path / "results" / "kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the splits on disk: composition data uses composition keys only, KV evaluation held-out keys only
    pair = tmp_path / "pair"
    world = KVWorld.load(pair / "data")
    assert not set(world.compose_keys) & set(world.heldout_keys)
    rows = lambda name: [json.loads(x) for x in (pair / "data" / name).read_text().splitlines()]
    assert _keys_in(rows("compose_train.jsonl"), world) <= set(world.compose_keys)
    assert _keys_in(rows("eval_kvar.jsonl"), world) <= set(world.heldout_keys)
    assert _keys_in(rows("eval_sub.jsonl"), world) <= set(world.heldout_keys)

    # a rerun skips every finished stage, reuses the evaluation, and keeps the training history
    again = _run(ray_cluster, config)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for stage in ("data", "augment", "anchor", "compose"):
        assert f"=== stage {stage}: already done, skipped" in again.stdout
    assert "unchanged since the last evaluation" in again.stdout
    rerun = json.loads((tmp_path / "results" / "kv.json").read_text())
    assert rerun["accuracy_percent"] == results["accuracy_percent"]
    assert rerun["training_curves"] == results["training_curves"]


@pytest.mark.slow  # trains a bridge for a few steps in a subprocess
def test_kv_trial_trains_and_evaluates_one_bridge_setting(tmp_path):
    """experiments.kv_arithmetic.trial on the embedded pair: a few real steps, evaluation on keys outside the composition data."""
    out = tmp_path / "trials.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "experiments.kv_arithmetic.trial", "--pair", str(ROOT / "assets" / "kv_pair"), "--steps", "4",
         "--examples", "300", "--eval-examples", "8", "--extra-keys", "10", "--seed", "3", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    world = KVWorld.load(ROOT / "assets" / "kv_pair" / "data")
    assert result["composition_keys"] == len(world.compose_keys) + 10
    assert result["steps"] == 4 and result["seed"] == 3 and result["final_loss"] > 0
    assert set(result["accuracy"]) == {"kvar_heldout", "num", "kvar_seen_keys"}
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())


def test_kv_trial_names_a_wrong_pair_folder(tmp_path):
    run = subprocess.run([sys.executable, "-m", "experiments.kv_arithmetic.trial", "--pair", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2
    assert "does not exist: --pair takes a folder written by experiments.kv_arithmetic" in run.stderr


@pytest.mark.parametrize("flags", [["--compose-min-terms", "0"],
                                   ["--compose-min-terms", "5", "--compose-max-terms", "4"],
                                   ["--compose-max-terms", "99"]])
def test_kv_trial_refuses_a_term_range_the_pair_cannot_make(flags):
    run = subprocess.run([sys.executable, "-m", "experiments.kv_arithmetic.trial", "--pair", str(ROOT / "assets" / "kv_pair"), *flags],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "must satisfy 1 <= min <= max <=" in run.stderr

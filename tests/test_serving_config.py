"""Serving configs: the shipped files are valid, and keys Serve would silently ignore are named."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from actors.serve.config import ServeConfigError, ServingArgs, check_serve_config

ROOT = Path(__file__).resolve().parents[1]


def shipped(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


@pytest.mark.parametrize("name", ["serve.yaml", "serve_tiny.yaml"])
def test_shipped_configs_have_no_unknown_or_bad_keys(name):
    assert check_serve_config(shipped(name)) == []


def test_serve_tiny_serves_the_default_pair_on_localhost_8000():
    config = shipped("serve_tiny.yaml")
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    args = config["applications"][0]["args"]
    assert (args["anchor"], args["augments"], args["bridges"]) == (
        "assets/kv_pair/anchor", ["assets/kv_pair/augment"], "assets/kv_pair/bridges")


def test_serve_yaml_autoscales_every_deployment():
    deployments = shipped("serve.yaml")["applications"][0]["deployments"]
    assert {d["name"] for d in deployments} == {"Ingress", "Anchor", "Augment0"}
    for d in deployments:
        auto = d["autoscaling_config"]
        assert auto["min_replicas"] <= auto["max_replicas"] and "target_ongoing_requests" in auto
        assert {"upscale_delay_s", "downscale_delay_s"} <= set(auto)
        assert d["max_queued_requests"] > 0


def _edit(path: list, value):
    config = copy.deepcopy(shipped("serve.yaml"))
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return config


ANCHOR = ["applications", 0, "deployments", 1]
MISTAKES = [
    # (where, value, words in the problem)
    (ANCHOR + ["autoscaling_config", "target_num_ongoing_requests_per_replica"], 4,
     "unknown key 'target_num_ongoing_requests_per_replica' (did you mean 'target_ongoing_requests'?)"),
    (ANCHOR + ["autoscaling_config", "max_replica"], 4, "did you mean 'max_replicas'?"),
    (ANCHOR + ["max_concurrent_queries"], 4, "unknown key 'max_concurrent_queries'"),
    (ANCHOR + ["ray_actor_options", "num_gpu"], 1, "did you mean 'num_gpus'?"),
    (ANCHOR + ["name"], "Anchr", "'Anchr' is not a deployment of this application"),
    (ANCHOR + ["max_queued_requests"], -1, "unbounded"),
    (ANCHOR + ["num_replicas"], 2, "not both"),
    (["applications", 0, "args", "max_batch"], 8, "did you mean 'max_batch_size'?"),
    (["applications", 0, "args", "dtype"], "fp8", "'args.dtype' must be one of float32, bfloat16, float16, got 'fp8'"),
    (["applications", 0, "import_path"], "other:app", "this project's application is 'jobs.serve:app_builder'"),
    (["http_options", "hots"], "0.0.0.0", "did you mean 'host'?"),
    (["proxy_locaton"], "EveryNode", "did you mean 'proxy_location'?"),
    (ANCHOR + ["autoscaling_config", "min_replicas"], "one", "min_replicas"),
    (["applications", 0, "args", "model_thread"], "sometimes", "'args.model_thread' must be true, false or auto"),
    (["applications", 0, "args", "anchor_name"], "calm-kv", "'args.anchor_name' must differ from every composition's name ('calm-kv' is one)"),
]


@pytest.mark.parametrize("path, value, words", MISTAKES, ids=[str(m[2])[:30] for m in MISTAKES])
def test_a_key_serve_would_ignore_or_reject_is_named_with_the_fix(path, value, words):
    problems = check_serve_config(_edit(path, value))
    assert any(words in p for p in problems), problems


def test_the_cli_check_refuses_a_bad_config_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_edit(ANCHOR + ["autoscaling_config", "target_num_ongoing_requests_per_replica"], 4)))
    proc = subprocess.run([sys.executable, "-m", "jobs.serve", "--config", str(bad), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "target_ongoing_requests" in proc.stderr


def test_the_cli_check_names_missing_model_folders(tmp_path):
    config = _edit(["applications", 0, "args", "anchor"], str(tmp_path / "nowhere"))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "jobs.serve", "--config", str(path), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nowhere' does not exist" in proc.stderr


def test_serving_args_take_a_comma_list_from_the_serve_run_command_line():
    args = ServingArgs.from_dict({"anchor": "a", "augments": "b,c", "bridges": "d"})
    assert args.compositions[0].augments == ["b", "c"]
    assert args.deployment_names() == ["Ingress", "Anchor", "Augment0", "Augment1"]
    with pytest.raises(ServeConfigError, match="augments"):
        ServingArgs.from_dict({"anchor": "a", "augments": [], "bridges": "d"})


def test_relative_model_paths_are_taken_from_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # replicas do not run in the caller's directory
    args = ServingArgs.from_dict({"anchor": "configs", "augments": ["configs"], "bridges": "configs"}).resolved()
    assert args.anchor == str(ROOT / "configs")


@pytest.mark.parametrize("given, expected", [(None, "auto"), ("auto", "auto"), ("AUTO", "auto"), (True, True),
                                             ("True", True), ("false", False), (1, True), ("0", False)])
def test_model_thread_is_auto_unless_set(given, expected):
    args = {"anchor": "a", "augments": ["b"], "bridges": "d"} | ({} if given is None else {"model_thread": given})
    got = ServingArgs.from_dict(args).model_thread
    assert got == expected and type(got) is type(expected)  # True, not 1


@pytest.mark.parametrize("bad", ["sometimes", 2, 0.5])
def test_a_model_thread_that_is_not_true_false_or_auto_is_refused(bad):
    with pytest.raises(ServeConfigError, match="'args.model_thread' must be true, false or auto"):
        ServingArgs.from_dict({"anchor": "a", "augments": ["b"], "bridges": "d", "model_thread": bad})


@pytest.mark.parametrize("pairs, setting, expected", [
    ([(0, 0), (2, 2)], "auto", False),  # a bridge at the anchor's input: no layers to overlap with the call
    ([(1, 2), (2, 4)], "auto", True),   # anchor layers 0-1 run while the augmenting call is in flight
    ([(1, 2)], False, False),
    ([(0, 0)], True, True),
])
def test_auto_model_thread_follows_the_anchors_first_bridge(pairs, setting, expected):
    from actors.serve.deployments import anchor_model_thread
    from composition import ComposedModel, CompositionConfig, LayerMapping
    from tests.fixtures import tiny

    model = ComposedModel(tiny("llama", layers=4), [tiny("llama", hidden=16, layers=2, seed=1)],
                          CompositionConfig(mappings=[LayerMapping(pairs=pairs)]))
    assert anchor_model_thread(setting, model) is expected


def test_several_compositions_share_the_anchor_and_each_distinct_augmenting_model():
    args = ServingArgs.from_dict({"anchor": "a", "anchor_name": "base", "compositions": [
        {"name": "es", "augments": ["gemma"], "bridges": "b1"},
        {"name": "legal", "augments": ["gemma"], "bridges": "b2"},
        {"name": "both", "augments": ["coder", "gemma"], "bridges": "b3"},
        {"name": "gemma-own-tok", "augments": ["gemma"], "bridges": "b4", "augment_tokenizers": ["tok"]}]})
    assert args.model_name == "es"  # a request without "model" gets the first
    assert args.augment_slots() == [("gemma", None), ("coder", None), ("gemma", "tok")]
    assert [args.slots_of(c) for c in args.compositions] == [[0], [0], [1, 0], [2]]
    assert args.deployment_names() == ["Ingress", "Anchor", "Augment0", "Augment1", "Augment2"]
    # the single-composition keys are a list of one
    one = ServingArgs.from_dict({"anchor": "a", "model_name": "m", "augments": ["g"], "bridges": "b"})
    assert [(c.name, c.augments, c.bridges) for c in one.compositions] == [("m", ["g"], "b")]


@pytest.mark.parametrize("args, words", [
    ({"anchor": "a"}, "args: give augments and bridges (one composition), or a list of compositions"),
    ({"anchor": "a", "bridges": "b", "compositions": [{"name": "x", "augments": ["g"], "bridges": "b"}]},
     "give the compositions in 'compositions' only: move bridges into an entry of it"),
    ({"anchor": "a", "compositions": []}, "give at least one composition"),
    ({"anchor": "a", "compositions": [{"name": "x", "augments": ["g"], "bridges": "b"}] * 2},
     "composition names must differ: ['x']"),
    ({"anchor": "a", "anchor_name": "x", "compositions": [{"name": "x", "augments": ["g"], "bridges": "b"}]},
     "'args.anchor_name' must differ from every composition's name"),
    ({"anchor": "a", "compositions": [{"name": "x", "augments": ["g"], "bridge": "b"}]},
     "unknown key 'args.compositions[0].bridge' (did you mean 'bridges'?)"),
    ({"anchor": "a", "compositions": [{"name": "", "augments": ["g"], "bridges": "b"}]},
     "'args.compositions[0].name' must have at least 1 character"),
])
def test_bad_compositions_are_named_with_the_fix(args, words):
    with pytest.raises(ServeConfigError) as err:
        ServingArgs.from_dict(args)
    assert words in str(err.value)


def test_a_config_of_compositions_checks_the_deployments_of_each_augmenting_model():
    config = shipped("serve_tiny.yaml")
    args = config["applications"][0]["args"]
    args["compositions"] = [{"name": args.pop("model_name"), "augments": args.pop("augments"),
                             "bridges": args.pop("bridges")},
                            {"name": "other", "augments": ["models/other"], "bridges": "bridges/other"}]
    config["applications"][0]["deployments"].append({"name": "Augment1", "num_replicas": 1})
    assert check_serve_config(config) == []
    config["applications"][0]["deployments"][-1]["name"] = "Augment2"
    assert any("'Augment2' is not a deployment" in p for p in check_serve_config(config))

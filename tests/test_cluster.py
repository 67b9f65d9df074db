"""The cluster files: cluster.yaml (Ray cluster launcher) and the KubeRay manifests in k8s/.

No cloud and no Ray cluster: the launcher config is validated offline with the pinned Ray's own
``prepare_config`` + ``validate_config`` (its JSON schema plus the launcher's checks), and every
resource that the shipped training and serving configs request, per actor and per replica, must fit
some worker type (of cluster.yaml and of each manifest), also at the configs' full scale.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from actors.train_config import read_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
RAYSERVICE = ROOT / "k8s" / "rayservice.yaml"
SERVE = ROOT / "configs" / "serve.yaml"
TRAIN = ROOT / "configs" / "train_tiny.yaml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepared(raw: dict) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


# ------------------------------------------------------------------------ resource requests
def train_requests(cfg) -> list[tuple[str, dict]]:
    """(what, resources) for every actor a training job starts (as actors/training.py asks for them)."""
    r = cfg.ray
    worker = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    augment = {"CPU": r.cpus_per_augment_actor, "GPU": r.gpus_per_augment_actor}
    return [("train worker", worker)] * r.num_workers + [("augment actor", augment)] * r.augment_actors


def serve_requests(config: dict, full_scale: bool) -> list[tuple[str, dict]]:
    """(what, resources) per replica of every deployment: min (or max) replicas of each."""
    out = []
    for app in config["applications"]:
        for dep in app.get("deployments") or []:
            opts = dep.get("ray_actor_options") or {}
            req = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **(opts.get("resources") or {})}
            if "memory" in opts:
                req["memory"] = opts["memory"]
            auto = dep.get("autoscaling_config") or {}
            count = auto.get("max_replicas" if full_scale else "min_replicas", dep.get("num_replicas", 1))
            out += [(f"{app['name']}/{dep['name']} replica", req)] * max(count, 1)
    return out


def gpu_variant_train(cfg):
    """train_tiny as docs/cluster.md tells users to run it on GPUs."""
    cfg = copy.deepcopy(cfg)
    cfg.ray.gpus_per_worker, cfg.ray.cpus_per_worker = 1, 4
    cfg.ray.gpus_per_augment_actor, cfg.ray.cpus_per_augment_actor = 0.25, 1
    return cfg


def gpu_variant_serve(config: dict) -> dict:
    """configs/serve.yaml with the GPU settings its own comment gives (Anchor 0.5 GPU, Augment0 0.25)."""
    config = copy.deepcopy(config)
    for dep in config["applications"][0]["deployments"]:
        gpus = {"Anchor": 0.5, "Augment0": 0.25}.get(dep["name"])
        if gpus:
            dep["ray_actor_options"]["num_gpus"] = gpus
    return config


def fits(request: dict, node: dict) -> bool:
    return all(node.get(k, 0) >= v for k, v in request.items() if v)


def pack(requests: list[tuple[str, dict]], node_types: dict[str, tuple[dict, int]]) -> list[str]:
    """First-fit decreasing onto at most max_workers nodes per type; returns what could not be placed."""
    nodes: list[dict] = []  # free resources of every opened node
    opened = {name: 0 for name in node_types}
    unplaced = []
    for what, req in sorted(requests, key=lambda x: (-x[1].get("GPU", 0), -x[1].get("CPU", 0))):
        node = next((n for n in nodes if fits(req, n)), None)
        if node is None:  # open the smallest node type that fits and has room left
            candidates = [(sum(res.values()), name) for name, (res, most) in node_types.items()
                          if opened[name] < most and fits(req, res)]
            if not candidates:
                unplaced.append(what)
                continue
            name = min(candidates)[1]
            opened[name] += 1
            node = dict(node_types[name][0])
            nodes.append(node)
        for k, v in req.items():
            node[k] = node.get(k, 0) - v
    return unplaced


def launcher_node_types(config: dict) -> dict[str, tuple[dict, int]]:
    """Worker types that can run work: name -> (resources, max_workers)."""
    return {name: (t["resources"], t.get("max_workers", 0)) for name, t in config["available_node_types"].items()
            if name != config["head_node_type"] and t.get("max_workers", 0) > 0}


def _quantity(value) -> float:
    s = str(value)
    if s.endswith("m"):
        return int(s[:-1]) / 1000
    return float(s)


def kuberay_node_types(cluster_spec: dict) -> dict[str, tuple[dict, int]]:
    """Worker groups as Ray sees them: CPU and GPU from each container's resource requests."""
    out = {}
    for group in cluster_spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        req = container["resources"]["requests"]
        res = {"CPU": _quantity(req["cpu"])}
        if "nvidia.com/gpu" in req:
            res["GPU"] = _quantity(req["nvidia.com/gpu"])
        out[group["groupName"]] = (res, group["maxReplicas"])
    return out


def manifests() -> list[tuple[str, dict]]:
    return [("RayJob", load(RAYJOB)["spec"]["rayClusterSpec"]), ("RayService", load(RAYSERVICE)["spec"]["rayClusterConfig"])]


# ------------------------------------------------------------------------ cluster.yaml
def test_cluster_yaml_validates_offline_with_the_pinned_schema():
    config = prepared(load(CLUSTER))
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must take no work"
    workers = launcher_node_types(config)
    assert any(res.get("GPU", 0) >= 1 for res, _ in workers.values())
    for name, t in config["available_node_types"].items():
        if name != config["head_node_type"]:
            assert t["min_workers"] == 0, f"{name}: workers should scale from zero"
            assert all(isinstance(v, int) for v in t["resources"].values()), f"{name}: resource values are integers"
    assert config["max_workers"] >= sum(t.get("min_workers", 0) for t in config["available_node_types"].values())
    assert config["idle_timeout_minutes"] > 0


def test_validation_rejects_broken_cluster_configs():
    """The offline check can fail: an unknown key, and max_workers below the sum of min_workers."""
    raw = load(CLUSTER)
    bad_key = copy.deepcopy(raw)
    bad_key["available_node_types"]["gpu_anchor"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        prepared(bad_key)
    too_few = copy.deepcopy(raw)
    too_few["max_workers"] = 1
    for t in too_few["available_node_types"].values():
        t["min_workers"] = 1
    with pytest.raises(ValueError, match="min_workers"):
        prepared(too_few)


def test_image_and_installed_project_are_pinned():
    config = load(CLUSTER)
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert any(f"calm_ray-{version}-" in c for c in installs), f"setup_commands must install calm-ray {version}"
    for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in c:
            assert "RAY_AUTH_MODE=token" in c, "token authentication stays on"
            assert "dashboard-host=0.0.0.0" not in c
    for kind, spec in manifests():
        assert spec["rayVersion"] == ray.__version__, kind


@pytest.mark.parametrize("gpu", [False, True], ids=["shipped", "gpu-variant"])
def test_every_training_and_serving_request_fits_a_worker_type(gpu):
    train = read_config(TRAIN)
    serve = load(SERVE)
    if gpu:
        train, serve = gpu_variant_train(train), gpu_variant_serve(serve)
    requests = train_requests(train) + serve_requests(serve, full_scale=False)
    assert requests
    targets = [("cluster.yaml", launcher_node_types(prepared(load(CLUSTER))))]
    targets += [(f"k8s {kind}", kuberay_node_types(spec)) for kind, spec in manifests()]
    for where, types in targets:
        for what, req in requests:
            assert any(fits(req, res) for res, _ in types.values()), f"{where}: no worker type fits {what} {req}"
        # full scale: every replica at max_replicas plus a training job, at once, within max_workers
        everything = train_requests(train) + serve_requests(serve, full_scale=True)
        assert pack(everything, types) == [], f"{where}: cannot place everything at full scale"


def test_fit_check_can_fail():
    types = launcher_node_types(prepared(load(CLUSTER)))
    assert not any(fits({"CPU": 1, "GPU": 2}, res) for res, _ in types.values())
    assert not any(fits({"CPU": 1, "anchor_gpu": 1}, res) for res, _ in types.values())
    assert pack([("big", {"CPU": 8, "GPU": 1})] * 100, types) != []


# ------------------------------------------------------------------------ KubeRay manifests
def test_rayservice_serve_config_is_configs_serve_yaml():
    doc = load(RAYSERVICE)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == load(SERVE)
    spec = doc["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_runs_the_training_job_with_an_existing_config():
    doc = load(RAYJOB)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.train"]
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"RayJob entrypoint names {config}, which does not exist"
    read_config(ROOT / config)  # and it parses
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_manifests_have_gpu_groups_and_token_auth(kind):
    spec = dict(manifests())[kind]
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu_groups) >= 2, "anchor and augmenting GPU worker groups"
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        res = container["resources"]
        assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu"), "GPU requests == limits"
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    images = {p["spec"]["containers"][0]["image"] for p in pods}
    assert len(images) == 1 and re.search(rf"ray{re.escape(ray.__version__)}-py311", images.pop())

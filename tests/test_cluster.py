"""The cluster files: cluster.yaml (Ray cluster launcher) and the KubeRay manifests in k8s/.

No cloud needed: the launcher config is validated offline with the pinned Ray's own
``prepare_config`` + ``validate_config`` (its JSON schema plus the launcher's checks), and every
resource that the shipped training and serving configs request (custom resources included), per
actor and per replica, must fit some worker type (of cluster.yaml and of each manifest), also at the
configs' full scale. ``gpu_node_stand_in`` simulates a second node on this machine: a raylet joined to
the session's cluster with custom resources standing in for a GPU node type. tests/test_s3_storage.py
runs the multi-node training job on it: pinned there by those resources, a worker killed, the node
stopped, the job resumed on the head from the checkpoints on S3, and the bridges served from S3.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec
from ray.autoscaler._private.util import prepare_config, validate_config

from actors.train.config import read_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
RAYSERVICE = ROOT / "k8s" / "rayservice.yaml"
SERVE = ROOT / "configs" / "serve.yaml"
TRAIN = ROOT / "configs" / "train_tiny.yaml"
RAY_BIN = str(Path(sys.executable).with_name("ray"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepared(raw: dict) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


# ------------------------------------------------------------------------ resource requests
def train_requests(cfg) -> list[tuple[str, dict]]:
    """(what, resources) for every actor a training job starts (as actors/train/worker.py and actors/train/augment_pool.py
    ask for them), custom resources included."""
    r = cfg.ray
    worker = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker, **r.resources_per_worker}
    augment = {"CPU": r.cpus_per_augment_actor, "GPU": r.gpus_per_augment_actor, **r.resources_per_augment_actor}
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
    """train_tiny as docs/cluster.md tells users to run it on GPUs, pinned to the GPU node types by the
    custom resources that cluster.yaml and the manifests declare (anchor_node, augment_node)."""
    cfg = copy.deepcopy(cfg)
    cfg.ray.gpus_per_worker, cfg.ray.cpus_per_worker = 1, 4
    cfg.ray.gpus_per_augment_actor, cfg.ray.cpus_per_augment_actor = 0.25, 1
    cfg.ray.resources_per_worker = {"anchor_node": 0.01}
    cfg.ray.resources_per_augment_actor = {"augment_node": 0.01}
    return cfg


def gpu_variant_serve(config: dict) -> dict:
    """configs/serve.yaml with the GPU settings its own comment gives (Anchor 0.5 GPU, Augment0 0.25), each
    pinned to its GPU node type as docs/cluster.md says (else Anchor replicas can fill the augmenting nodes)."""
    config = copy.deepcopy(config)
    for dep in config["applications"][0]["deployments"]:
        gpus, pin = {"Anchor": (0.5, "anchor_node"), "Augment0": (0.25, "augment_node")}.get(dep["name"], (0, None))
        if gpus:
            dep["ray_actor_options"]["num_gpus"] = gpus
            dep["ray_actor_options"]["resources"] = {pin: 0.01}
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


def kuberay_node_types(cluster_spec: dict) -> dict[str, tuple[dict, int]]:
    """Worker groups as KubeRay's in-tree autoscaler sees them (Ray's own parser: CPU, GPU and memory from
    the container, custom resources from rayStartParams), so a group can scale up from zero for them."""
    return {group["groupName"]: (_get_ray_resources_from_group_spec(group, False), group["maxReplicas"])
            for group in cluster_spec["workerGroupSpecs"]}


def operator_custom_resources(group: dict) -> dict:
    """rayStartParams.resources as the KubeRay operator reads it (surrounding quotes trimmed, then JSON).
    The operator and the autoscaler parse the string differently; only some quotings satisfy both."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(raw.strip("'\"` ")) if raw else {}


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


def test_ray_starts_with_token_auth_and_the_pinned_ray_version():
    # the image (the project baked into rayproject/ray:<version>-py311-gpu) is checked in tests/test_manifests.py
    config = load(CLUSTER)
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
    specs = dict(manifests())
    # (where, its worker types, what runs there): the launcher's cluster is long-lived and does both; the
    # RayJob's cluster exists for one training job, the RayService's for serving.
    targets = [("cluster.yaml", launcher_node_types(prepared(load(CLUSTER))), True, True),
               ("k8s RayJob", kuberay_node_types(specs["RayJob"]), True, False),
               ("k8s RayService", kuberay_node_types(specs["RayService"]), False, True)]
    for where, types, trains, serves in targets:
        requests = (train_requests(train) if trains else []) + (serve_requests(serve, False) if serves else [])
        assert requests
        for what, req in requests:  # every resource asked for (custom ones too) exists on some worker type
            assert any(fits(req, res) for res, _ in types.values()), f"{where}: no worker type fits {what} {req}"
        # full scale: every replica at max_replicas (and the training job), at once, within max_workers
        everything = (train_requests(train) if trains else []) + (serve_requests(serve, True) if serves else [])
        assert pack(everything, types) == [], f"{where}: cannot place everything at full scale"


def test_fit_check_can_fail():
    types = launcher_node_types(prepared(load(CLUSTER)))
    assert not any(fits({"CPU": 1, "GPU": 2}, res) for res, _ in types.values())
    assert not any(fits({"CPU": 1, "anchor_gpu": 1}, res) for res, _ in types.values())  # a misspelt custom resource
    assert pack([("big", {"CPU": 8, "GPU": 1})] * 100, types) != []


@pytest.mark.parametrize("where", ["cluster.yaml", "RayJob", "RayService"])
def test_gpu_worker_types_declare_the_custom_resources_that_pin_training_actors(where):
    """anchor_node only on the anchor GPU type, augment_node only on the augmenting one."""
    if where == "cluster.yaml":
        types = launcher_node_types(prepared(load(CLUSTER)))
        owner = {"anchor_node": "gpu_anchor", "augment_node": "gpu_augment"}
    else:
        spec = dict(manifests())[where]
        types = kuberay_node_types(spec)
        owner = {"anchor_node": "gpu-anchor", "augment_node": "gpu-augment"}
        for group in spec["workerGroupSpecs"]:  # the operator's reading of the string agrees with the autoscaler's
            custom = {k: v for k, v in types[group["groupName"]][0].items() if k not in ("CPU", "GPU", "memory")}
            assert operator_custom_resources(group) == custom, group["groupName"]
    for resource, name in owner.items():
        assert types[name][0].get(resource, 0) >= 1 and types[name][0].get("GPU", 0) >= 1, (name, types[name][0])
        assert [n for n, (res, _) in types.items() if resource in res] == [name], f"{resource} only on {name}"


# ------------------------------------------------------------------------ KubeRay manifests
# What the RayService's serveConfigV2 sets differently from configs/serve.yaml, and why: nothing else may differ.
def test_rayservice_exposes_serve_on_the_head_port_kuberay_probes_and_autoscales():
    # what it serves (configs/serve_gpu.yaml, verbatim) is checked in tests/test_manifests.py
    doc = load(RAYSERVICE)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    manifest = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert load(SERVE)["http_options"]["host"] == "127.0.0.1", "outside Kubernetes, Serve binds 127.0.0.1"
    spec = doc["spec"]["rayClusterConfig"]
    # KubeRay builds the serve Service and the workers' proxy readiness probe from the head's port named serve
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["serve"] == manifest["http_options"]["port"]
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
    # the operator itself needs the token for its dashboard calls (job status, Serve config)
    assert spec["authOptions"] == {"mode": "token", "secretName": "calm-ray-token"}
    path = RAYJOB if kind == "RayJob" else RAYSERVICE
    assert "kubectl create secret generic calm-ray-token --from-literal=auth_token=" in path.read_text()
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu_groups) >= 2, "anchor and augmenting GPU worker groups"
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "calm-ray-token", "key": "auth_token"}
        res = container["resources"]
        assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu"), "GPU requests == limits"
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    if kind == "RayJob":  # the pod that runs `ray job submit` authenticates with the same token
        pods.append(load(RAYJOB)["spec"]["submitterPodTemplate"])
        (container,) = pods[-1]["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "calm-ray-token", "key": "auth_token"}
    images = {p["spec"]["containers"][0]["image"] for p in pods}
    assert len(images) == 1 and re.search(rf"ray{re.escape(ray.__version__)}-py311", images.pop())


# ------------------------------------------------------------------------ a second node, simulated
# Two custom resources stand in for the GPU node types: the head has neither, so an actor that asks for
# one can only run on the second node.
SIM_ANCHOR, SIM_AUGMENT = "sim_anchor_node", "sim_augment_node"
NODE_MARKER = "CALM_TEST_SIM_NODE"  # in the environment of every process of the simulated node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().decode(errors="replace").split("\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _stop_processes(marker: str, grace_s: float = 15) -> None:
    """SIGTERM (the raylet then tells the GCS it is leaving), SIGKILL whatever is left after grace_s."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        for pid in _processes_with(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _processes_with(marker):
            return


def _nodes(dashboard: str) -> list:
    from ray.util.state import list_nodes

    return list_nodes(address=dashboard, detail=True, limit=1000, raise_on_missing_output=False)


def _wait_dead(dashboard: str, node_id: str, timeout: float) -> bool:
    """Poll the state API until node_id is marked DEAD; False if it is still alive after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if all(n.state == "DEAD" for n in _nodes(dashboard) if n.node_id == node_id):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


@dataclass
class SimNode:
    node_id: str
    stop: Callable[[], None]  # stops its processes (only them) and waits until the GCS marks it DEAD


def can_hide_folders() -> bool:
    """Whether this machine lets us start a process in its own mount namespace (root, or user namespaces)."""
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def gpu_node_stand_in(ray_cluster, request):
    """A second raylet joined to the session cluster with `ray start --address`: 2 CPUs and the two custom
    resources. Every port is chosen free; its processes carry NODE_MARKER, so only they are stopped: by
    the test through ``SimNode.stop`` (a node going away mid-test), else after it.

    Parametrised indirectly with a folder, the node runs in its own mount namespace with an empty tmpfs
    over that folder: it cannot see what the head writes there, as a node-local disk on another machine."""
    hidden = getattr(request, "param", None)
    if hidden and not can_hide_folders():
        pytest.skip("`unshare -m` is not permitted here: cannot give the second node its own view of a folder")
    marker = f"{NODE_MARKER}={secrets.token_hex(8)}"
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: unix socket paths have a length limit
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_ADDRESS"}
    env[NODE_MARKER] = marker.split("=", 1)[1]
    ports = [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
             f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
    node_id = None
    try:
        # with a hidden folder: `ray start` (and the raylet it leaves running) in a private mount namespace
        prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                  'mkdir -p "$0" && mount -t tmpfs calm-node-local "$0" && exec "$@"', hidden] if hidden else []
        if hidden:
            Path(hidden).mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [*prefix, RAY_BIN, "start", f"--address={ray_cluster.address}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--num-gpus=0", f"--resources={json.dumps({SIM_ANCHOR: 1, SIM_AUGMENT: 1})}",
             "--object-store-memory=300000000", f"--temp-dir={temp_dir}", "--disable-usage-stats", *ports],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"ray start --address failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        deadline = time.monotonic() + 120
        while node_id is None:  # registered with the GCS and visible to the state API
            alive = [n for n in _nodes(ray_cluster.dashboard)
                     if n.state == "ALIVE" and SIM_ANCHOR in (n.resources_total or {})]
            if alive:
                node_id = alive[0].node_id
            elif time.monotonic() > deadline:
                raise AssertionError("the second node did not register within 120 s")
            else:
                time.sleep(0.5)

        def stop() -> None:
            _stop_processes(marker)
            assert _wait_dead(ray_cluster.dashboard, node_id, 60), "the second node was not marked DEAD within 60 s"

        yield SimNode(node_id, stop)
    finally:
        _stop_processes(marker)
        if node_id:  # leave the session cluster with the node marked dead
            _wait_dead(ray_cluster.dashboard, node_id, 60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_actors(dashboard: str, submission_id: str) -> tuple[list, list, str]:
    """(Train workers, augmenting actors, a listing of every actor) of a finished job, dead ones included."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(dashboard).get_job_info(submission_id).job_id
    actors = list_actors(address=dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10000,
                         raise_on_missing_output=False)
    seen = "\n".join(f"{a.class_name} {a.state} {a.node_id}" for a in actors)
    workers = [a for a in actors if a.class_name == "RayTrainWorker"]
    augmenters = [a for a in actors if "MapWorker" in a.class_name and "AugmentBatchEncoder" in a.class_name]
    return workers, augmenters, seen

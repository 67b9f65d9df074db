"""The image and the deployment files around it: Dockerfile, cluster.yaml, k8s/*.yaml, configs/serve_gpu.yaml.

Offline, like tests/test_cluster.py: the KubeRay manifests are validated against the RayJob and RayService
CRD schemas of the oldest KubeRay the docs support (vendored in tests/schemas/kuberay/, 1.6.0), made strict
(an unknown or misspelt field anywhere fails, where the API server would drop it silently or reject it);
fields the CRD marks deprecated are refused; every file names the same image; pods fit the instance types
that cluster.yaml names; the RayService serves configs/serve_gpu.yaml verbatim, on the GPU groups.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec
from ray.autoscaler._private.util import prepare_config, validate_config

from actors.serve.config import check_serve_config
from actors.train.config import read_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
RAYSERVICE = ROOT / "k8s" / "rayservice.yaml"
SERVICE_ACCOUNT = ROOT / "k8s" / "serviceaccount.yaml"
SERVE_GPU = ROOT / "configs" / "serve_gpu.yaml"
TRAIN_GPU = ROOT / "configs" / "train_gpu.yaml"
SCHEMAS = ROOT / "tests" / "schemas" / "kuberay"
KUBERAY_MIN = "1.6.0"  # the version docs/cluster.md names; the vendored schemas are its

# Instance types named in cluster.yaml: (vCPU, GiB). A pod must leave room on its node for the kubelet's
# reserve (EKS: ~0.1 CPU and ~1 GiB on these sizes) and the daemonsets (CNI, kube-proxy, device plugin).
INSTANCE_TYPES = {"m6i.2xlarge": (8, 32), "g6e.2xlarge": (8, 64), "g6.xlarge": (4, 16)}
NODE_HEADROOM_CPU, NODE_HEADROOM_GIB = 1, 2


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cluster_specs() -> dict[str, dict]:
    return {"RayJob": load(RAYJOB)["spec"]["rayClusterSpec"], "RayService": load(RAYSERVICE)["spec"]["rayClusterConfig"]}


def pod_templates(kind: str) -> dict[str, dict]:
    """group name ("head" for the head) -> pod template of that group."""
    spec = cluster_specs()[kind]
    return {"head": spec["headGroupSpec"]["template"], **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


# ------------------------------------------------------------------------ strict CRD schemas
def strict(schema):
    """A copy of a CRD's openAPIV3Schema in which every object that lists its ``properties`` accepts no
    others (additionalProperties: false), except where the CRD says otherwise (its own additionalProperties,
    or x-kubernetes-preserve-unknown-fields, e.g. metadata and free-form maps)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_schema(kind: str) -> dict:
    name = {"RayJob": "ray.io_rayjobs.v1.schema.json", "RayService": "ray.io_rayservices.v1.schema.json"}[kind]
    return json.loads((SCHEMAS / name).read_text())


def validate_manifest(doc: dict, kind: str) -> None:
    """jsonschema.ValidationError on the first field the strict CRD schema does not accept."""
    jsonschema.Draft7Validator(strict(crd_schema(kind))).validate(doc)


def field_paths(doc, path="") -> set[str]:
    """Every mapping key in doc as a dotted path, list indices left out (spec.workerGroupSpecs.groupName)."""
    if isinstance(doc, dict):
        return set().union(*[{f"{path}{k}"} | field_paths(v, f"{path}{k}.") for k, v in doc.items()]) if doc else set()
    if isinstance(doc, list):
        return set().union(set(), *[field_paths(item, path) for item in doc])
    return set()


def deprecated_fields(doc: dict, kind: str) -> list[str]:
    """Fields in doc that KubeRay's API marks deprecated (the schema accepts them; the operator ignores them)."""
    deprecated = json.loads((SCHEMAS / "deprecated.json").read_text())[kind]
    return sorted(field_paths(doc) & set(deprecated))


def test_vendored_schemas_are_kuberay_with_its_license():
    readme = (SCHEMAS / "README.md").read_text()
    assert f"v{KUBERAY_MIN}" in readme and re.search(r"commit\s+`[0-9a-f]{40}`", readme), "record the source commit"
    assert "Apache License" in (SCHEMAS / "LICENSE").read_text()
    for kind in ("RayJob", "RayService"):
        schema = crd_schema(kind)
        assert schema["properties"]["kind"]["type"] == "string"
        cluster = "rayClusterSpec" if kind == "RayJob" else "rayClusterConfig"
        # the field the manifests need, and the reason for the minimum version
        assert "secretName" in schema["properties"]["spec"]["properties"][cluster]["properties"]["authOptions"]["properties"]


@pytest.mark.parametrize("path, kind", [(RAYJOB, "RayJob"), (RAYSERVICE, "RayService")])
def test_manifest_validates_against_the_strict_kuberay_schema(path, kind):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    validate_manifest(doc, kind)


@pytest.mark.parametrize("where", [
    ["spec"],                                                             # top of the spec
    ["spec", "rayClusterSpec"],                                           # the cluster
    ["spec", "rayClusterSpec", "workerGroupSpecs", 0],                    # a worker group
    ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec"],      # a pod spec
    ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "resources"],
])
def test_strict_validation_rejects_an_unknown_field_at_any_level(where):
    """The check can fail: a misspelt field (which the API server would prune or refuse) at each depth."""
    doc = load(RAYJOB)
    node = doc
    for key in where:
        node = node[key]
    node["unknownField"] = 1
    with pytest.raises(jsonschema.ValidationError, match="unknownField"):
        validate_manifest(doc, "RayJob")


def test_strict_validation_keeps_free_form_maps_free():
    """Label maps and rayStartParams take any key; strictness must not make them reject valid manifests."""
    doc = load(RAYSERVICE)
    doc["metadata"]["labels"] = {"team": "calm"}
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"] = "8080"
    validate_manifest(doc, "RayService")


@pytest.mark.parametrize("path, kind", [(RAYJOB, "RayJob"), (RAYSERVICE, "RayService")])
def test_manifests_use_no_deprecated_field(path, kind):
    assert deprecated_fields(load(path), kind) == []


def test_deprecated_field_check_can_fail():
    doc = load(RAYSERVICE)
    doc["spec"]["serviceUnhealthySecondThreshold"] = 900
    doc["spec"]["deploymentUnhealthySecondThreshold"] = 300
    validate_manifest(doc, "RayService")  # still schema-valid: only KubeRay's API says they do nothing
    assert deprecated_fields(doc, "RayService") == [
        "spec.deploymentUnhealthySecondThreshold", "spec.serviceUnhealthySecondThreshold"]


def test_rayservice_upgrades_in_place_without_a_second_gpu_cluster():
    assert load(RAYSERVICE)["spec"]["upgradeStrategy"] == {"type": "None"}


# ------------------------------------------------------------------------ one image everywhere
def images() -> dict[str, str]:
    """where -> image, for the launcher and every container of every manifest (submitter included)."""
    found = {"cluster.yaml docker.image": load(CLUSTER)["docker"]["image"]}
    for kind in ("RayJob", "RayService"):
        for group, pod in pod_templates(kind).items():
            for c in pod["spec"]["containers"]:
                found[f"{kind} {group}/{c['name']}"] = c["image"]
    for c in load(RAYJOB)["spec"]["submitterPodTemplate"]["spec"]["containers"]:
        found[f"RayJob submitter/{c['name']}"] = c["image"]
    return found


def test_every_node_and_pod_runs_the_same_project_image():
    found = images()
    assert len(set(found.values())) == 1, f"different images: {found}"
    image = next(iter(found.values()))
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    tag = image.rsplit(":", 1)[1]
    assert tag.startswith(f"{version}-ray{ray.__version__}-py311"), f"tag {tag}: project and Ray versions first"
    assert not image.startswith("rayproject/"), "nodes run the project image, not the bare Ray image"


def test_set_image_script_renames_every_image_and_nothing_else(tmp_path):
    for rel in ["cluster.yaml", "k8s/rayjob.yaml", "k8s/rayservice.yaml", "k8s/serviceaccount.yaml",
                "scripts/set_image.sh"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    before = {rel: (tmp_path / rel).read_text() for rel in ["cluster.yaml", "k8s/rayjob.yaml", "k8s/rayservice.yaml"]}
    new = "123456789012.dkr.ecr.us-west-2.amazonaws.com/calm-ray:0.1.0-ray2.60.0-py311-gpu-abc1234"
    subprocess.run(["bash", str(tmp_path / "scripts" / "set_image.sh"), new], check=True, capture_output=True)
    old = load(CLUSTER)["docker"]["image"]
    for rel, text in before.items():  # only the image lines changed
        assert (tmp_path / rel).read_text() == text.replace(old, new), rel
    assert yaml.safe_load((tmp_path / "cluster.yaml").read_text())["docker"]["image"] == new
    assert old not in "".join((tmp_path / rel).read_text() for rel in before)
    bad = subprocess.run(["bash", str(tmp_path / "scripts" / "set_image.sh"), "a b"], capture_output=True)
    assert bad.returncode != 0


def test_dockerfile_builds_on_the_pinned_ray_image_with_the_locked_dependencies():
    text = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert re.search(r"pip install[^\n]*-r /tmp/constraints\.txt", text), "dependencies from the lock"
    assert "/home/ray/calm-ray" in text
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["ray"] == ray.__version__
    import torch
    import transformers
    assert pins["torch"] == torch.__version__.split("+")[0], "the lock holds the torch the tests ran with"
    assert pins["transformers"] == transformers.__version__
    assert "boto3" in pins, "the head's autoscaler needs boto3 ([cluster] extra)"
    assert "calm-ray" not in pins


def test_dockerignore_keeps_out_what_git_ignores():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for entry in [".git", ".venv", "models", "runs", "**/__pycache__"]:
        assert entry in ignored, entry


def test_cluster_extra_installs_boto3():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("boto3") for r in extras["cluster"])


# ------------------------------------------------------------------------ cluster.yaml
def test_cluster_yaml_names_one_explicit_gpu_ami_and_instance_profiles():
    raw = load(CLUSTER)
    validate_config(prepare_config(copy.deepcopy(raw)))
    types = raw["available_node_types"]
    amis = {t["node_config"]["ImageId"] for t in types.values()}
    # one AMI for every type: a pinned id, or the public SSM parameter of the current Ubuntu 22.04 GPU base
    # DLAMI, which EC2 resolves at launch; never latest_dlami (Ray 2.60: Ubuntu 18.04 / CUDA 11) or a placeholder
    (ami,) = amis
    assert re.fullmatch(r"ami-[0-9a-f]{8}([0-9a-f]{9})?|resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                        r"base-oss-nvidia-driver-gpu-ubuntu-22\.04/latest/ami-id", ami), ami
    assert "docs/cluster.md" in CLUSTER.read_text(), "say how to pin one release"
    profiles = {name: t["node_config"]["IamInstanceProfile"] for name, t in types.items()}
    assert profiles.pop(raw["head_node_type"]) == {"Name": "calm-ray-head"}
    assert set(map(json.dumps, profiles.values())) == {json.dumps({"Name": "calm-ray-worker"})}
    for t in types.values():  # the GPU instance types have the GPUs their node type declares
        assert t["node_config"]["InstanceType"] in INSTANCE_TYPES


def test_cluster_yaml_syncs_only_the_token_and_honours_ignore_files():
    raw = load(CLUSTER)
    assert set(raw["file_mounts"]) == {"/home/ray/.ray/auth_token"}, "the code comes in the image"
    assert raw["rsync_filter"] == [".gitignore", ".dockerignore"]
    assert not any("pip install" in c for c in raw["setup_commands"] + raw["head_setup_commands"]
                   + raw["worker_setup_commands"]), "nodes install nothing at boot"


# ------------------------------------------------------------------------ pods fit their nodes
def quantity_cpu(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def quantity_gib(q) -> float:
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10}
    q = str(q)
    for unit, factor in units.items():
        if q.endswith(unit):
            return float(q[: -len(unit)]) * factor
    return float(q) / 2**30


# KubeRay group -> cluster.yaml node type of the same role (the instance type both are sized for)
GROUP_TO_NODE_TYPE = {"head": "head", "gpu-anchor": "gpu_anchor", "gpu-augment": "gpu_augment", "cpu": "cpu"}


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_pods_fit_the_instance_types_of_cluster_yaml(kind):
    node_types = load(CLUSTER)["available_node_types"]
    for group, pod in pod_templates(kind).items():
        instance = node_types[GROUP_TO_NODE_TYPE[group]]["node_config"]["InstanceType"]
        cpus, gib = INSTANCE_TYPES[instance]
        requests = [c["resources"]["requests"] for c in pod["spec"]["containers"]]
        cpu = sum(quantity_cpu(r["cpu"]) for r in requests)
        mem = sum(quantity_gib(r["memory"]) for r in requests)
        assert cpu <= cpus - NODE_HEADROOM_CPU, f"{kind} {group}: {cpu} CPU never schedules on {instance} ({cpus} vCPU)"
        assert mem <= gib - NODE_HEADROOM_GIB, f"{kind} {group}: {mem} GiB never schedules on {instance} ({gib} GiB)"
        gpus = sum(int(r.get("nvidia.com/gpu", 0)) for r in requests)
        selector = pod["spec"].get("nodeSelector", {})
        if gpus:  # GPU pods go to the GPU instance type they are sized for
            assert selector == {"node.kubernetes.io/instance-type": instance}, f"{kind} {group}"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]


def test_pod_fit_check_can_fail():
    assert quantity_cpu("8") > INSTANCE_TYPES["m6i.2xlarge"][0] - NODE_HEADROOM_CPU
    assert quantity_gib("16Gi") > INSTANCE_TYPES["g6.xlarge"][1] - NODE_HEADROOM_GIB
    assert quantity_cpu("500m") == 0.5 and quantity_gib("1024Mi") == 1


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_ray_pods_use_the_service_account_that_reaches_s3(kind):
    account = load(SERVICE_ACCOUNT)
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for group, pod in pod_templates(kind).items():
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"], f"{kind} {group}"


# ------------------------------------------------------------------------ what runs on the GPU groups
def test_rayservice_serves_configs_serve_gpu_yaml_verbatim():
    embedded = load(RAYSERVICE)["spec"]["serveConfigV2"]
    assert yaml.safe_load(embedded) == load(SERVE_GPU), "serveConfigV2 differs from configs/serve_gpu.yaml"
    assert embedded == SERVE_GPU.read_text(), "paste configs/serve_gpu.yaml unchanged (comments included)"


def test_serve_gpu_config_passes_the_project_checks_and_runs_on_gpus():
    config = load(SERVE_GPU)
    assert check_serve_config(config) == []
    (app,) = config["applications"]
    assert app["args"]["device"] == "cuda" and app["args"]["dtype"] == "bfloat16"
    deps = {d["name"]: d["ray_actor_options"] for d in app["deployments"]}
    assert deps["Anchor"]["num_gpus"] > 0 and deps["Anchor"]["resources"] == {"anchor_node": 0.01}
    assert deps["Augment0"]["num_gpus"] > 0 and deps["Augment0"]["resources"] == {"augment_node": 0.01}
    assert deps["Ingress"].get("num_gpus", 0) == 0
    # KubeRay's serve Service reaches each pod's IP on the port the head names "serve"
    assert config["http_options"]["host"] == "0.0.0.0"
    (head,) = pod_templates("RayService")["head"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["serve"] == config["http_options"]["port"]


def fits(request: dict, node: dict) -> bool:
    return all(node.get(k, 0) >= v for k, v in request.items() if v)


def group_resources(kind: str) -> dict[str, dict]:
    """Each worker group's resources as KubeRay's in-tree autoscaler reads them (Ray's own parser)."""
    return {g["groupName"]: _get_ray_resources_from_group_spec(g, False) for g in cluster_specs()[kind]["workerGroupSpecs"]}


def test_every_gpu_replica_lands_on_its_gpu_group():
    groups = group_resources("RayService")
    where = {"Ingress": "cpu", "Anchor": "gpu-anchor", "Augment0": "gpu-augment"}
    for dep in load(SERVE_GPU)["applications"][0]["deployments"]:
        opts = dep["ray_actor_options"]
        req = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}
        hosts = [name for name, res in groups.items() if fits(req, res)]
        if dep["name"] == "Ingress":
            assert "cpu" in hosts
        else:
            assert hosts == [where[dep["name"]]], f"{dep['name']} {req} fits {hosts}"
        group = next(g for g in cluster_specs()["RayService"]["workerGroupSpecs"] if g["groupName"] == where[dep["name"]])
        per_pod = min(groups[group["groupName"]][k] // v for k, v in req.items() if v and k in ("CPU", "GPU"))
        assert per_pod * group["maxReplicas"] >= dep["autoscaling_config"]["max_replicas"], dep["name"]


def test_rayjob_trains_configs_train_gpu_yaml_on_the_gpu_groups_with_s3_storage():
    spec = load(RAYJOB)["spec"]
    assert spec["entrypoint"].split() == ["python", "-m", "jobs.train", "--config", "configs/train_gpu.yaml"]
    cfg = read_config(TRAIN_GPU)
    assert cfg.storage_path.startswith("s3://") and (cfg.output or "").startswith("s3://")
    groups = group_resources("RayJob")
    worker = {"CPU": cfg.ray.cpus_per_worker, "GPU": cfg.ray.gpus_per_worker, **cfg.ray.resources_per_worker}
    augment = {"CPU": cfg.ray.cpus_per_augment_actor, "GPU": cfg.ray.gpus_per_augment_actor,
               **cfg.ray.resources_per_augment_actor}
    assert [n for n, res in groups.items() if fits(worker, res)] == ["gpu-anchor"]
    assert [n for n, res in groups.items() if fits(augment, res)] == ["gpu-augment"]
    anchor = next(g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-anchor")
    assert anchor["maxReplicas"] >= cfg.ray.num_workers


def test_docs_name_the_kuberay_version_and_the_device_plugin():
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert f"KubeRay >= {KUBERAY_MIN}" in docs or f"KubeRay {KUBERAY_MIN} or newer" in docs
    assert "device plugin" in docs.lower()
    for manifest in (RAYJOB, RAYSERVICE):
        assert f"KubeRay >= {KUBERAY_MIN}" in manifest.read_text()

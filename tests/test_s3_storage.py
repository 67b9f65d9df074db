"""Shared storage on a real S3 server (moto's standalone server over HTTP, ``endpoint_override``).

One server per test process, with authentication on (tests/s3_server.py: shared). The multi-node test runs on the
session's cluster plus the second raylet of tests/test_cluster.py: training with ``storage_path`` on S3
pinned to that node, a killed worker resumed from the S3 checkpoint, then the node stopped and the job
resumed on the head from S3, the bridges exported to S3 (manifest written last), then served from S3 by
``python -m jobs.serve`` and asked over HTTP. The bad cases (missing bucket, wrong credentials,
unreachable endpoint) fail at the edge, in seconds, and leave what the bucket held untouched.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("moto")

from actors import storage
from tests import test_cluster, test_train_job
from tests.test_cluster import SIM_ANCHOR, SIM_AUGMENT
from tests.test_train_job import RESUME_LINE, steps_in, wait_job, write_config

# fixtures shared with those modules: the tiny model pair and data, and the second raylet
pair = test_train_job.pair
gpu_node_stand_in = test_cluster.gpu_node_stand_in

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = str(Path(sys.executable).with_name("ray"))


def bucket_objects(s3, bucket=None) -> dict[str, str]:
    """key -> ETag of everything in the bucket (what a failed run must leave as it was)."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket or s3.bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


# ------------------------------------------------------------------------------------------ no Ray
def test_a_reader_sees_only_what_the_manifest_commits(s3, tmp_path):
    """publish_folder writes a new version, then the manifest; a crashed publish (files of a new version, no
    manifest) is invisible to readers, and a changed remote is fetched again under a new cache key."""
    src, cache, uri = tmp_path / "src", tmp_path / "cache", s3.uri("publish/demo")
    src.mkdir()
    (src / "composition_config.json").write_text('{"v": 1}')
    (src / "bridges.safetensors").write_bytes(b"\x01" * 1000)
    first = storage.publish_folder(src, uri)
    # a writer that died half-way: the next version's first file, but no manifest naming it
    s3.client().put_object(Bucket=s3.bucket, Key="publish/demo/0123456789abcdef/composition_config.json",
                           Body=b'{"v": 2}')
    got = storage.fetch_folder(uri, cache=cache)
    assert got.name == first and (got / "composition_config.json").read_text() == '{"v": 1}'
    assert (got / "bridges.safetensors").read_bytes() == b"\x01" * 1000

    (src / "composition_config.json").write_text('{"v": 3}')
    second = storage.publish_folder(src, uri)
    again = storage.fetch_folder(uri, cache=cache)
    assert second != first and again.name == second and (again / "composition_config.json").read_text() == '{"v": 3}'
    assert storage.fetch_folder(uri, cache=cache) == again  # unchanged remote: the cached copy
    versions = {k.split("/")[2] for k in bucket_objects(s3) if k.startswith("publish/demo/") and k.count("/") == 3}
    assert versions == {first, second}, "the replaced version stays (a reader may be on it); stray ones go"


@pytest.mark.parametrize("case", ["missing bucket", "wrong credentials", "unreachable endpoint"])
def test_bad_storage_fails_at_the_edge_in_seconds_and_loses_nothing(s3, pair, tmp_path, monkeypatch, case):
    from actors.serve.config import ServeConfigError, ServingArgs
    from actors.train.config import TrainConfigError, load_config

    s3.client().put_object(Bucket=s3.bucket, Key="runs/earlier/keep.txt", Body=b"written before")
    before = bucket_objects(s3)
    storage._S3_CACHE.clear()
    uri, message = {
        "missing bucket": (s3.uri("runs", bucket="no-such-bucket"), "bucket 'no-such-bucket' does not exist"),
        "wrong credentials": (s3.uri("runs"), "access denied with the credentials"),
        "unreachable endpoint": (f"s3://{s3.bucket}/runs?endpoint_override=http://127.0.0.1:{_closed_port()}",
                                 "cannot be reached"),
    }[case]
    if case == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    root, base = pair
    config = write_config(tmp_path, base, "bad", storage_path=uri, output=s3.uri("bridges/bad"))
    start = time.monotonic()
    with pytest.raises(TrainConfigError, match=re.escape(message)) as error:
        load_config(config)
    assert time.monotonic() - start < 20, "the check must fail in seconds, not hang"
    assert "'storage_path'" in str(error.value) and "not-the-secret" not in str(error.value)

    args = ServingArgs.from_dict({"anchor": str(root / "anchor"), "augments": [str(root / "augment")],
                                  "bridges": uri.replace("/runs", "/bridges/x")})
    with pytest.raises(ServeConfigError, match=re.escape(message)):
        args.check_paths()
    monkeypatch.undo()
    storage._S3_CACHE.clear()
    assert bucket_objects(s3) == before


# ------------------------------------------------------------------------------------------ a cluster
def submit_with_env(cluster, config: Path, submission_id: str, env: dict) -> None:
    """`ray job submit` of jobs.train with ``env`` in the job's runtime_env (driver, Train workers, actors)."""
    runtime_env = json.dumps({"env_vars": env})
    proc = cluster.run(RAY_BIN, "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
                       "--working-dir", str(ROOT), "--runtime-env-json", runtime_env, "--no-wait", "--",
                       sys.executable, "-m", "jobs.train", "--config", str(config), timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def read_s3_json(uri: str):
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):  # not there yet, or being rewritten
        return None


def test_a_job_on_s3_pinned_to_a_node_survives_a_killed_worker_and_the_node_going_away_then_serves_from_s3(
        ray_cluster, gpu_node_stand_in, s3, pair, tmp_path):
    """Multi-node training with ``storage_path`` and ``output`` on S3, as on a real cluster:

    1. submitted with `ray job submit`, pinned to the second node by the custom resources its Train workers and
       augmenting actors ask for (Ray's state API: every one of them ran there, none on the head); rank 0 is
       killed after the first checkpoint reached S3, and the restarted group resumes from it, training no
       checkpointed step again;
    2. that node goes away (its processes only); the same job (same name and storage_path), submitted again with
       more steps and no custom resources, runs on the head, resumes from the last checkpoint the other node
       wrote to S3 and trains only the steps after it;
    3. the bridges are published to S3 each time (a new version, manifest last) and `python -m jobs.serve`
       serves the last ones from S3 over HTTP: greedy == the in-process model."""
    import httpx
    import ray
    from ray import serve
    from ray.job_submission import JobStatus

    from composition.loading import load_tokenizer
    from tests.fixtures import reference_completion
    from tests.test_cluster import _job_actors, _nodes
    from tests.test_serving import free_port, wait_until

    root, base = pair
    steps, every = 12, 4
    name = f"s3run-{secrets.token_hex(3)}"
    storage_uri, output_uri = s3.uri("runs"), s3.uri(f"bridges/{name}")
    pinned = {"ray.resources_per_worker": {SIM_ANCHOR: 0.5}, "ray.resources_per_augment_actor": {SIM_AUGMENT: 0.5}}
    config = write_config(tmp_path, base, name, **{
        "training.steps": steps, "training.checkpoint_every": every, "storage_path": storage_uri,
        "output": output_uri, **pinned})
    submission = f"train-{name}"
    submit_with_env(ray_cluster, config, submission, s3.env)
    snapshot = storage.join(storage_uri, name, "checkpoint_manager_snapshot.json")
    killed: list[int] = []

    def kill_after_first_checkpoint_on_s3(logs: str) -> None:
        if killed:
            return
        registered = (read_s3_json(snapshot) or {}).get("checkpoint_results")
        ranks = re.findall(r"RayTrainWorker pid=(\d+)\)\S*\s+worker 0/2", logs)
        if registered and ranks:
            os.kill(int(ranks[0]), signal.SIGKILL)  # rank 0: the worker that writes checkpoints
            killed.append(int(ranks[0]))

    # 1. on the second node, a worker killed
    status, logs = wait_job(ray_cluster, submission, timeout=360, on_poll=kill_after_first_checkpoint_on_s3)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert killed, "the run finished before a checkpoint reached S3: nothing was killed"
    resumed = [int(m.group(1)) for m in RESUME_LINE.finditer(logs)]
    assert len(resumed) == 1 and resumed[0] >= every and resumed[0] % every == 0, resumed
    c = resumed[0]
    after = [s for pid, s in steps_in(logs) if pid != killed[0]]
    assert after == list(range(c + 1, steps + 1)), after  # the restart trains c+1..steps: no checkpointed step again
    first_manifest = storage.read_manifest(output_uri)
    assert sorted(first_manifest["files"]) == ["bridges.safetensors", "composition_config.json"]
    assert f"bridges exported to {storage.redact(output_uri)}" in logs

    workers, augmenters, seen = _job_actors(ray_cluster.dashboard, submission)
    assert len(workers) >= base["ray"]["num_workers"], seen  # the killed group's and the restarted group's
    assert 1 <= len(augmenters), seen
    head = {n.node_id for n in _nodes(ray_cluster.dashboard) if n.is_head_node}
    assert gpu_node_stand_in.node_id not in head
    for actor in workers + augmenters:
        assert actor.node_id == gpu_node_stand_in.node_id, f"{actor.class_name} ran on {actor.node_id}:\n{seen}"

    # 2. the node goes away; the rerun asks for no custom resource, so only the head can take it
    gpu_node_stand_in.stop()
    more = steps + every
    config = write_config(tmp_path, base, name, **{
        "training.steps": more, "training.checkpoint_every": every, "storage_path": storage_uri,
        "output": output_uri, "ray.resources_per_worker": {}, "ray.resources_per_augment_actor": {}})
    again = f"train-{name}-again"
    submit_with_env(ray_cluster, config, again, s3.env)
    status, logs = wait_job(ray_cluster, again, timeout=300)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert [int(m.group(1)) for m in RESUME_LINE.finditer(logs)] == [steps], logs[-4000:]
    assert [s for _, s in steps_in(logs)] == list(range(steps + 1, more + 1)), logs[-4000:]  # none repeated
    moved, _, seen = _job_actors(ray_cluster.dashboard, again)
    assert len(moved) == base["ray"]["num_workers"], seen
    for actor in moved:
        assert actor.node_id in head, seen
    state = read_s3_json(storage.join(storage_uri, name, f"checkpoint_{more:08d}", "bridge_trainer",
                                      "trainer_state.json"))
    assert state["attempts"] == [{"first_step": 1, "last_checkpointed_step": c},
                                 {"first_step": c + 1, "last_checkpointed_step": steps},
                                 {"first_step": steps + 1, "last_checkpointed_step": more}]
    manifest = storage.read_manifest(output_uri)
    assert sorted(manifest["files"]) == ["bridges.safetensors", "composition_config.json"]
    assert manifest["version"] != first_manifest["version"]

    # serve the bridges from S3: the driver checks them there, each replica fetches them into its node's cache
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, namespace="serve")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = serve.context._get_global_client().http_config.port
    app_name = f"calm-{name}"
    cache = tmp_path / "replica-cache"
    replica_env = {**s3.env, "CALM_RAY_CACHE": str(cache)}
    serve_config = yaml.safe_load((ROOT / "configs/serve_tiny.yaml").read_text())
    serve_config["http_options"]["port"] = port
    app = serve_config["applications"][0]
    app.update(name=app_name, route_prefix=f"/{name}")
    app["args"].update(anchor=str(root / "anchor"), augments=[str(root / "augment")], bridges=output_uri,
                       model_name=name)
    for d in app["deployments"]:
        d["ray_actor_options"] = {"num_cpus": 0.1, "runtime_env": {"env_vars": replica_env}}
    path = tmp_path / "serve_s3.yaml"
    path.write_text(yaml.safe_dump(serve_config))
    log_path = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}/{name}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--config", str(path), "--address",
                                 ray_cluster.address], cwd=ROOT, env={**ray_cluster.env, **s3.env}, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            def healthy():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    return httpx.get(f"{url}/health", timeout=5).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(healthy, 180, "the application serving bridges from S3 to answer", interval=1)
            r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "k7=", "max_tokens": 4,
                                                          "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
            cached = cache / next(p.name for p in cache.iterdir()) / manifest["version"]
            assert (cached / "bridges.safetensors").is_file()  # what the replicas loaded came from S3
            model = _composed(root, cached)
            tok = load_tokenizer(str(root / "anchor"))
            want = reference_completion(model, tok, tok("k7=")["input_ids"], 4)
            assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def _composed(root: Path, bridges: Path):
    from composition.loading import load_causal_lm
    from composition.model import ComposedModel

    return ComposedModel.from_pretrained(bridges, load_causal_lm(str(root / "anchor")),
                                         [load_causal_lm(str(root / "augment"))])


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (taken free, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NODE_LOCAL = "/tmp/calm-ray-test-node-local"  # the second node sees an empty tmpfs here


@pytest.mark.parametrize("gpu_node_stand_in", [NODE_LOCAL], indirect=True)
def test_a_multinode_job_on_a_folder_another_node_cannot_see_fails_before_any_work(
        ray_cluster, gpu_node_stand_in, pair, tmp_path):
    from ray.job_submission import JobStatus

    from tests.test_cluster import _job_actors
    from tests.test_train_job import submit

    _, base = pair
    runs = Path(NODE_LOCAL) / f"runs-{secrets.token_hex(3)}"
    config = write_config(tmp_path, base, "nodelocal", storage_path=str(runs))
    submission = f"train-nodelocal-{secrets.token_hex(3)}"
    submit(ray_cluster, config, submission)
    try:
        status, logs = wait_job(ray_cluster, submission, timeout=180)
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    assert status == JobStatus.FAILED, logs[-3000:]
    assert "config error: 'storage_path'" in logs and "is a folder on this node only" in logs, logs[-3000:]
    assert "--set storage_path=s3://" in logs, "the message names the fix"
    workers, augmenters, seen = _job_actors(ray_cluster.dashboard, submission)
    assert not workers and not augmenters, f"work started:\n{seen}"
    assert "no checkpoint: starting at step 0" not in logs and not steps_in(logs), "a worker started training"

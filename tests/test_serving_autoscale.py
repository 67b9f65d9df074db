"""Serve's replica autoscaling for the composed model, deployed with `serve deploy` from configs/serve.yaml.

The shipped config is loaded, pointed at a tiny pair, given short autoscaling delays and small
CPU shares, checked with ``python -m jobs.serve --check`` and submitted with Serve's own CLI. Under
load the Anchor deployment must scale from 1 to 2 replicas, and back to 1 once the load stops,
with every request answered. The pair's tokenizer has no chat template, so chat requests get a 400.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from tests.test_serving import free_port, wait_until  # noqa: E402
from tests.fixtures import build_pair  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = "calm-auto"
PREFIX = "/auto"
MODEL = "calm-auto-model"
SERVE_BIN = str(Path(sys.executable).with_name("serve"))


def anchor_replicas() -> dict:
    status = serve.status().applications.get(APP)
    if status is None:
        return {}
    return dict(status.deployments["Anchor"].replica_states)


def autoscale_config(pair, port: int) -> dict:
    config = yaml.safe_load((ROOT / "configs/serve.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    app = config["applications"][0]
    app.update(name=APP, route_prefix=PREFIX)
    app["args"].update(model_name=MODEL, anchor=pair.anchor, augments=[pair.augment], bridges=pair.bridges,
                       tokenizer=pair.tokenizer_no_template, max_batch_size=4, torch_threads=1, max_context=512,
                       request_timeout_s=60)
    app["args"].pop("api_key_file")  # keyless here: API keys are tested in tests/test_serving_guard.py
    deployments = {d["name"]: d for d in app["deployments"]}
    for name in ("Ingress", "Augment0"):  # fixed size here: only the Anchor scales in this test
        deployments[name].pop("autoscaling_config")
        deployments[name].update(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    anchor = deployments["Anchor"]
    anchor.update(max_ongoing_requests=4, ray_actor_options={"num_cpus": 0.2})
    anchor["autoscaling_config"].update(min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                                        upscale_delay_s=0.5, downscale_delay_s=3, metrics_interval_s=0.5,
                                        look_back_period_s=1.5)
    return config


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, namespace="serve")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # keeps a running instance as it is
    port = serve.context._get_global_client().http_config.port
    folder = tmp_path_factory.mktemp("auto")
    pair = build_pair(folder / "pair")
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(autoscale_config(pair, port)))
    ray_cluster.run(sys.executable, "-m", "jobs.serve", "--config", str(path), "--check", timeout=120)
    ray_cluster.run(SERVE_BIN, "deploy", str(path), "-a", ray_cluster.dashboard, timeout=120)
    wait_until(lambda: (s := serve.status().applications.get(APP)) is not None and s.status == "RUNNING", 180,
               f"{APP} to run")
    yield f"http://127.0.0.1:{port}{PREFIX}"
    serve.delete(APP)


def test_chat_without_a_chat_template_is_a_clear_400(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 400
    assert "no chat template" in r.json()["error"]["message"]
    assert "/v1/completions" in r.json()["error"]["message"]
    ok = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_the_anchor_deployment_scales_up_under_load_and_back_down_after_it(server):
    assert anchor_replicas().get("RUNNING") == 1
    stop = threading.Event()
    statuses: list[int] = []

    def client(i: int):
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                body = {"model": MODEL, "prompt": f"load {i}", "max_tokens": 40, "temperature": 0}
                statuses.append(http.post(f"{server}/v1/completions", content=json.dumps(body)).status_code)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: anchor_replicas().get("RUNNING") == 2, 150, "a second Anchor replica", interval=0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert statuses and set(statuses) == {200}, statuses
    wait_until(lambda: anchor_replicas() == {"RUNNING": 1}, 120, "the Anchor to scale back to 1 replica", interval=0.5)
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "after", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200

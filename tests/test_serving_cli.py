"""`python -m jobs.serve --config ...`: the development entry point runs a config until Ctrl-C.

The command is started as a user would (a subprocess with the cluster's environment), answers
over HTTP, and on SIGINT removes its own application and leaves the rest of Serve running.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from tests.test_serving import free_port, wait_until  # noqa: E402
from composition.loading import load_tokenizer  # noqa: E402
from tests.fixtures import build_pair, load_in_process, reference_completion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = "calm-cli"


def test_python_m_jobs_serve_runs_a_config_and_stops_only_its_app_on_ctrl_c(ray_cluster, tmp_path):
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, namespace="serve")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # keeps a running instance as it is
    port = serve.context._get_global_client().http_config.port
    # bridges above the anchor's input: model_thread "auto" (the default) takes the overlapping worker-thread path
    pair = build_pair(tmp_path / "pair", pairs=((2, 2), (4, 4)))
    model, tok = load_in_process(pair), load_tokenizer(pair.anchor)

    config = yaml.safe_load((ROOT / "configs/serve_tiny.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app.update(name=APP, route_prefix="/cli")
    app["args"].update(anchor=pair.anchor, augments=[pair.augment], bridges=pair.bridges, model_name="cli")
    app["args"].pop("model_thread", None)  # the default, auto, is under test
    for d in app["deployments"]:
        d["ray_actor_options"] = {"num_cpus": 0.1}
    path = tmp_path / "serve_tiny.yaml"
    path.write_text(yaml.safe_dump(config))

    log = open(tmp_path / "serve.log", "w")
    command = [sys.executable, "-m", "jobs.serve", "--config", str(path), "--address", ray_cluster.address]
    proc = subprocess.Popen(command, cwd=ROOT, env=ray_cluster.env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/cli"
    try:
        def healthy():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 180, "the CLI's application to answer", interval=1)
        wait_until(lambda: "serving calm-cli on" in (tmp_path / "serve.log").read_text(), 60, "the CLI's ready line")
        r = httpx.post(f"{url}/v1/completions", json={"model": "cli", "prompt": "hello", "max_tokens": 12,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        want = reference_completion(model, tok, tok("hello")["input_ids"], 12)
        assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
        stats = serve.get_deployment_handle("Anchor", app_name=APP).stats.remote().result(timeout_s=60)
        assert stats["model_thread"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        try:  # deleting the app waits for its replicas to drain: slow on two busy cores
            proc.wait(timeout=120)
            exited = True
        except subprocess.TimeoutExpired:
            proc.kill()
            exited = False
        log.close()
    assert exited, "the CLI did not exit within 120 s of Ctrl-C:\n" + (tmp_path / "serve.log").read_text()[-3000:]
    wait_until(lambda: APP not in serve.status().applications, 60, "the CLI's application to be deleted")
    assert serve.status().proxies  # Serve itself still runs for the other applications

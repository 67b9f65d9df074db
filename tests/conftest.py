"""Shared fixtures. One real Ray cluster per test session (``ray start --head``), token auth on.

Tests that need Ray take the ``ray_cluster`` fixture; it starts the cluster on first use and
stops it at the end of the session. The token is fresh per session and exported through
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``, so ``ray job submit``, ``serve run`` and
``ray.init(address=...)`` in subprocesses all authenticate.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = str(Path(sys.executable).with_name("ray"))

# Token auth for every Ray client in this session, set before any test module imports ray
# (ray reads RAY_AUTH_MODE once, at import).
TOKEN = secrets.token_hex(16)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = TOKEN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    address: str  # GCS address for ray.init / ray start --address
    dashboard: str  # http address for ray job submit
    temp_dir: str
    env: dict  # environment for subprocesses (token auth, addresses)

    def run(self, *args: str, timeout: float = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a command with the cluster's environment; output captured as text."""
        proc = subprocess.run(list(args), env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
        return proc


@pytest.fixture(scope="session")
def ray_cluster():
    token = TOKEN
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    port, dash = free_port(), free_port()
    # every port the head opens is chosen free, so a second cluster on this machine cannot collide
    extra_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                   f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    command = [RAY_BIN, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
               "--object-store-memory=1000000000", f"--temp-dir={temp_dir}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats", *extra_ports]
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        stop_cluster(temp_dir)  # a head that failed half-way must not leave its processes behind
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    cluster = RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir,
                         {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dash}"})
    deadline = time.monotonic() + 60
    while True:  # the job server comes up a little after `ray start` returns
        proc = cluster.run(RAY_BIN, "job", "list", check=False, timeout=30)
        if proc.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray job server did not come up: {proc.stderr[-2000:]}")
        time.sleep(1)
    yield cluster
    stop_cluster(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(temp_dir: str) -> None:
    """Kill only this cluster's processes (`ray stop` would stop every cluster on the machine)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                environ = (proc / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if temp_dir in cmdline or f"RAY_AUTH_TOKEN={TOKEN}" in environ:
                pids.append(int(proc.name))
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not pids:
            return
        time.sleep(2)


def pytest_collection_modifyitems(config, items):
    """Every test that runs on the session's Ray cluster is slow (a cluster start, Serve, jobs): marked here, so
    ``pytest -m "not slow"`` is the fast loop without anyone having to remember the marker."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server over HTTP (one per test process: ``tests.s3_server.shared``), with its credentials in this
    process's environment for the module's drivers and checks; the environment is restored after the module."""
    from actors import storage
    from tests import s3_server

    server = s3_server.shared()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    storage._S3_CACHE.clear()
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._S3_CACHE.clear()

"""Starting the served application: on this machine (``run_config``) or on a cluster (``deploy_config``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from actors.serve.config import ServingArgs

RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def start_local_ray() -> None:
    """A Ray for this process alone: advertised on 127.0.0.1, its dashboard on 127.0.0.1, the token file private.

    Ray 2.60 binds its gRPC servers (GCS, raylet, object manager, workers) on every interface whatever
    ``_node_ip_address`` says; token authentication (on by default) is what guards those ports, so the
    token file it writes with the process umask (0644 usually) is made 0600 (its folder 0700) here.
    """
    import ray

    ray.init(namespace="serve", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")
    make_token_private()


def make_token_private(path: Path = RAY_TOKEN_FILE) -> None:
    if path.exists():
        os.chmod(path.parent, 0o700)
        os.chmod(path, 0o600)


def run_config(config: dict, address: str | None = None, blocking: bool = True) -> list[str]:
    """Start Serve with the config's http_options and run each application (names returned)."""
    import ray
    from ray import serve

    from actors.serve.deployments import build_app

    if blocking:
        # A process started in the background by a non-interactive shell (scripts, CI, `cmd &`)
        # inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt: Ctrl-C / kill -INT
        # would do nothing and leave the applications running. Take SIGINT back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not ray.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):
            start_local_ray()
        else:
            ray.init(address=address, namespace="serve")
    http = {k: v for k, v in (config.get("http_options") or {}).items() if v is not None}
    http.setdefault("host", "127.0.0.1")  # bind locally unless the config says otherwise
    serve.start(http_options=http, proxy_location=config.get("proxy_location", "EveryNode"))
    names = []
    try:
        for app in config["applications"]:
            settings = ServingArgs.from_dict(app.get("args") or {}).resolved()
            settings.check_paths()
            options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
            name = app.get("name", "default")
            names.append(name)
            serve.run(build_app(settings, options), name=name, route_prefix=app.get("route_prefix", "/"),
                      blocking=False)
        host, port = http.get("host"), http.get("port", 8000)
        print(f"serving {', '.join(names)} on http://{host}:{port} (OpenAI API under /v1); Ctrl-C stops", flush=True)
        while blocking:
            time.sleep(5)
    except KeyboardInterrupt:
        for name in names:  # only this command's applications: the cluster may serve others
            serve.delete(name)
    return names


def deploy_config(config: dict, address: str) -> None:
    """Submit the checked config to a running cluster's dashboard, as ``serve deploy`` does."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    ServeSubmissionClient(address).deploy_applications(config)
    print(f"submitted {len(config['applications'])} application(s) to {address}; watch them with `serve status`")

"""Serve the composed model over HTTP (OpenAI-shaped) with Ray Serve.

Development, on this machine (starts a local Ray if none is running; Ctrl-C stops it):

    python -m jobs.serve --config configs/serve_tiny.yaml
    serve run configs/serve_tiny.yaml                       # the same file, through Serve's CLI
    serve run jobs.serve:app_builder anchor=A augments=B bridges=C

A cluster (the config's keys are checked first, since Serve ignores unknown keys silently):

    python -m jobs.serve --config configs/serve.yaml --check
    python -m jobs.serve --config configs/serve.yaml --deploy --address http://127.0.0.1:8265
    serve deploy configs/serve.yaml                          # Serve's CLI, without this project's checks

Config files use Serve's ``serve deploy`` format; the application's ``args`` are
``actors.serve.config.ServingArgs``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from actors.serve.config import ServeConfigError, ServingArgs, load_serve_config


def app_builder(args: dict):
    """Serve's application builder (``import_path: jobs.serve:app_builder`` with ``args:``)."""
    from actors.serve.deployments import build_app

    settings = ServingArgs.from_dict(dict(args)).resolved()
    settings.check_paths()
    return build_app(settings)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="Serve config file (serve deploy format)")
    parser.add_argument("--check", action="store_true", help="only check the config's keys and values")
    parser.add_argument("--deploy", action="store_true",
                        help="submit to the cluster at --address instead of running here")
    parser.add_argument("--address", default=None,
                        help="Ray address to run on (default: a new local Ray), or the dashboard URL with --deploy")
    a = parser.parse_args(argv)
    try:
        config = load_serve_config(a.config)
        if a.check:
            for app in config["applications"]:
                ServingArgs.from_dict(app.get("args") or {}).resolved().check_paths()
            print(f"{a.config}: ok")
            return 0
        if a.deploy:
            deploy_config(config, a.address or "http://127.0.0.1:8265")
        else:
            run_config(config, a.address)
    except ServeConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

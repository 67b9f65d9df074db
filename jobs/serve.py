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
import sys

from actors.serve.config import ServeConfigError, ServingArgs, load_serve_config
from actors.serve.launch import deploy_config, run_config


def app_builder(args: dict):
    """Serve's application builder (``import_path: jobs.serve:app_builder`` with ``args:``)."""
    from actors.serve.deployments import build_app

    settings = ServingArgs.from_dict(dict(args)).resolved()
    settings.check_paths()
    return build_app(settings)


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

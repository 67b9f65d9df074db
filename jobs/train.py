"""Fit the bridges of a composition with Ray Train on streamed augmenting activations.

    python -m jobs.train --config configs/train_tiny.yaml            # embedded Ray, no cluster needed
    python -m jobs.train --config configs/train_tiny.yaml --set training.steps=50 --set name=short
    ray job submit --working-dir . -- python -m jobs.train --config configs/train_tiny.yaml

From Python: ``actors.train.pipeline.run(config)`` (also importable as ``jobs.train.run``).
The steps are in actors/train/pipeline.py; the config keys in docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from actors.train.config import TrainConfigError
from actors.train.pipeline import TrainResult, prepare, run  # noqa: F401  (the job's Python API)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (see docs/training.md)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set storage_path=/shared/runs (repeatable); "
                             "checked like the file")
    parser.add_argument("--address", default=None,
                        help="Ray address (default: RAY_ADDRESS, else start an embedded Ray)")
    args = parser.parse_args(argv)
    try:
        run(args.config, address=args.address, overrides=args.overrides)
    except TrainConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without interpreter teardown: after ray.shutdown() the teardown of Ray's and torch's
    # native threads segfaulted now and then (seen under `ray job submit` after the bridges were
    # exported), turning a finished job into FAILED. Everything is written and flushed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

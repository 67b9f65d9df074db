"""The training pipeline: checked config -> tokens -> streamed augmenting states -> Ray Train -> exported bridges.

    from actors.train.pipeline import run
    result = run("configs/train_tiny.yaml")        # or a dict, or a TrainJobConfig
    result.output                                  # folder for ComposedModel.from_pretrained
    result.metrics                                 # last step: loss, tokens_per_s, step, ...

The steps, in order:
1. check the config: keys, types, files, models (weightless), layer mapping  -> TrainConfigError
2. read and tokenise the data with ``datasets``                              (still no Ray)
3. connect to Ray (RAY_ADDRESS / ``address``, or start an embedded one)
4. tokens -> Ray Dataset -> augmenting actor pool adds the selected states (or the activation cache)
5. TorchTrainer: workers stream their shard, BridgeTrainer.step per batch, checkpoints every N steps
6. the last checkpoint's bridges are exported to ``output`` (atomically)
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from actors.storage import is_uri, publish_folder, redact
from actors.train.config import TrainJobConfig, check_files_and_models, read_config


@dataclass
class TrainResult:
    """What a finished run left behind."""

    output: Path | str  # the exported bridges (save_pretrained format): a folder, or a URI (actors.storage)
    metrics: dict  # the last reported step's metrics
    run_path: str  # Ray Train's run folder (checkpoints)
    checkpoint: str  # the checkpoint the bridges were exported from
    history: list[dict] = field(default_factory=list)  # rank 0's per-step metrics of the last attempt
    wall_s: float = 0.0


def prepare(config, overrides: list[str] = ()) -> tuple[TrainJobConfig, dict, dict]:
    """Everything that runs before any cluster work: the checked config, model facts, token arrays."""
    from actors.train.data import prepare_examples

    cfg = read_config(config, overrides)
    facts = check_files_and_models(cfg)
    examples = prepare_examples(cfg, facts["anchor"].vocab_size)
    return cfg, facts, examples


def _state_bytes_per_token(cfg: TrainJobConfig, facts: dict) -> int:
    width = 2 if cfg.model_dtype in ("bfloat16", "float16") else 4
    return sum(facts["augments"][i].hidden_size * width for i, a in {(i, a) for i, a, _ in facts["links"]})


def _print_plan(cfg: TrainJobConfig, facts: dict, examples: dict) -> None:
    n, length = examples["input_ids"].shape
    links = ", ".join(f"aug{i}[{a}]->anchor[{b}]" for i, a, b in facts["links"])
    print(f"job {cfg.name}: anchor {cfg.anchor} ({facts['anchor'].architecture}, {facts['anchor'].num_layers} layers)",
          flush=True)
    print(f"  bridges: {links}", flush=True)
    print(f"  data: {n} examples x {length} tokens ({cfg.data.format}); {cfg.training.steps} steps x global batch "
          f"{cfg.training.batch_size} on {cfg.ray.num_workers} worker(s); dtype {cfg.model_dtype}", flush=True)
    print(f"  streamed activations: {_state_bytes_per_token(cfg, facts)} bytes per token", flush=True)


def _connect(address: str | None) -> bool:
    """Connect to (or start) Ray; returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, log_to_driver=True)
    return True


def _warn_if_cluster_too_small(cfg: TrainJobConfig) -> None:
    """Ray waits (silently) for resources that never come: say so up front."""
    import ray

    r = cfg.ray
    need = {"CPU": r.num_workers * r.cpus_per_worker + r.cpus_per_augment_actor,
            "GPU": r.num_workers * r.gpus_per_worker + r.gpus_per_augment_actor}
    for name in {**r.resources_per_worker, **r.resources_per_augment_actor}:
        need[name] = r.num_workers * r.resources_per_worker.get(name, 0) + r.resources_per_augment_actor.get(name, 0)
    have = ray.cluster_resources()
    for key, amount in need.items():
        if amount <= have.get(key, 0) + 1e-9:
            continue
        if key in ("CPU", "GPU"):
            print(f"WARNING: the job needs {amount:g} {key} (ray.num_workers x ray.{key.lower()}s_per_worker + "
                  f"ray.{key.lower()}s_per_augment_actor) but the cluster has {have.get(key, 0):g}: it will wait "
                  f"for an autoscaler to add nodes; lower those settings to fit", flush=True)
        else:
            print(f"WARNING: the job needs {amount:g} of the custom resource {key!r} (ray.resources_per_worker x "
                  f"ray.num_workers + ray.resources_per_augment_actor) but the cluster has {have.get(key, 0):g}: "
                  f"it will wait for an autoscaler to add a node type that declares {key!r}; check the name "
                  f"against the node types' resources", flush=True)


def check_storage_is_shared(cfg: TrainJobConfig, timeout_s: float = 60) -> None:
    """On a cluster of several nodes, a local ``storage_path`` must be the same folder on every node (NFS, EFS,
    a ReadWriteMany volume): Ray Train's workers and a restarted run may land on any node. Checked before any
    work by writing a marker file here and asking every alive node whether it sees it; TrainConfigError
    naming the nodes that do not and the fix. URIs (s3://, gs://) are shared by nature."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.train.config import TrainConfigError

    if is_uri(cfg.storage_path):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    folder = Path(cfg.storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".calm-ray-shared-check-{uuid.uuid4().hex}"
    marker.write_text("written by the job's driver; every node must see it\n")

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        probes = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes}
        ready, _ = ray.wait(list(probes.values()), num_returns=len(probes), timeout=timeout_s)
        blind = [name for name, ref in probes.items() if ref not in ready or not ray.get(ref)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise TrainConfigError(
            f"'storage_path' ({cfg.storage_path}) is a folder on this node only: {len(blind)} of the cluster's "
            f"{len(nodes)} nodes ({', '.join(blind)}) do not see it, and Ray Train's workers there could not write "
            f"or read checkpoints. Use shared storage: --set storage_path=s3://<bucket>/<prefix> (add "
            f"?endpoint_override=http://host:port for an S3-compatible store), gs://<bucket>/<prefix>, or a folder "
            f"that NFS/EFS mounts at the same path on every node (docs/cluster.md, section 6)")


def _export(checkpoint, output: Path | str) -> None:
    """The checkpoint's bridges to ``output``: a folder replaced in one rename, or on shared storage (a URI)
    uploaded under a new version and committed by its manifest (``actors.storage.publish_folder``)."""
    from actors.train.worker import TRAINER_DIR
    from composition.checkpoint import atomic_folder

    with checkpoint.as_directory() as folder:
        bridges = Path(folder) / TRAINER_DIR / "bridges"
        if is_uri(str(output)):
            publish_folder(bridges, str(output))
            return
        with atomic_folder(output) as tmp:
            for f in bridges.iterdir():
                shutil.copy2(f, tmp / f.name)


def run(config, address: str | None = None, overrides: list[str] = ()) -> TrainResult:
    """Train the bridges described by ``config`` (YAML path, dict or TrainJobConfig).

    Connects to ``address`` (default: RAY_ADDRESS, else an embedded Ray), or uses the Ray this process
    is already connected to. ``overrides``: ``key.path=value`` assignments applied to the config first. Raises TrainConfigError before any cluster work when the config is wrong,
    RuntimeError when training fails.
    """
    start = time.perf_counter()
    cfg, facts, examples = prepare(config, overrides)
    _print_plan(cfg, facts, examples)

    # ---------------------------------------------------------------- cluster work starts here
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # keep every worker's progress line (read at `import ray`)
    # Ray Train's controller drains reports once per poll (default 2 s); poll faster so that reports
    # every few steps do not pace training (read when the controller starts, from this environment).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray.data

    from actors.train.augment_pool import with_augment_states
    from actors.train.data import cache_manifest, cached_dataset, epochs_needed, estimate_cache_bytes, to_ray_dataset
    from actors.train.worker import fit

    started = _connect(address)
    data_context = ray.data.DataContext.get_current()
    progress_bars, data_context.enable_progress_bars = data_context.enable_progress_bars, False
    try:
        check_storage_is_shared(cfg)
        _warn_if_cluster_too_small(cfg)
        per_batch = cfg.per_worker_batch
        indices = [sorted({a for i2, a, _ in facts["links"] if i2 == i}) for i in range(len(cfg.augments))]
        r = cfg.ray

        n = len(examples["input_ids"])

        def streamed(epochs: int):
            tokens = to_ray_dataset(examples, per_batch, epochs=epochs, seed=cfg.training.seed)
            return with_augment_states(
                tokens, cfg.augments, indices, cfg.model_dtype, batch_size=per_batch,
                max_actors=r.augment_actors, cpus_per_actor=r.cpus_per_augment_actor,
                gpus_per_actor=r.gpus_per_augment_actor, resources_per_actor=r.resources_per_augment_actor)

        if cfg.activation_cache.enabled:  # one pass written once; the workers loop over it
            length = examples["input_ids"].shape[1]
            width = 2 if cfg.model_dtype in ("bfloat16", "float16") else 4
            size = estimate_cache_bytes(n, length, facts["links"], [a.hidden_size for a in facts["augments"]], width)
            print(f"activation cache: {n} examples x {length} tokens -> about {size / 1e6:,.1f} MB "
                  f"under {cfg.activation_cache.path}", flush=True)
            dataset = cached_dataset(cfg, cache_manifest(cfg, facts["links"], cfg.model_dtype, n), lambda: streamed(1))
        else:  # every pass the run needs, streamed as one execution
            dataset = streamed(epochs_needed(n, cfg.training.steps, cfg.training.batch_size))

        result = fit(cfg, dataset, n_examples=n)
        if result.error is not None:
            raise RuntimeError(f"training failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise RuntimeError(f"training finished without a checkpoint under {cfg.run_path}")
        _export(result.checkpoint, cfg.output_path)
        value = result.return_value or {}
        out = TrainResult(output=cfg.output_path, metrics=dict(result.metrics or {}), run_path=str(result.path),
                          checkpoint=str(result.checkpoint.path), history=value.get("history", []),
                          wall_s=time.perf_counter() - start)
        print(f"bridges exported to {redact(str(out.output))} (step {out.metrics.get('step')}, loss {out.metrics.get('loss')})",
              flush=True)
        return out
    finally:
        if started:
            ray.shutdown()
        else:
            data_context.enable_progress_bars = progress_bars

"""The training job's configuration: YAML -> TrainJobConfig, validated before any cluster work.

    cfg = load_config("configs/train_tiny.yaml")     # raises TrainConfigError naming the key and fix
    cfg.to_dict()                                    # plain dict (what Ray ships to the workers)

Everything that can be checked on the submitting machine is checked here: unknown keys (with the
closest valid name), types and ranges, that the model folders (or hub ids) have a readable config,
that the layer mapping fits the models (``LayerMapping.resolve`` against a weightless copy of each
model built on the meta device), that the tokenizer fits the anchor's vocabulary, and that the data
files exist. Reading the data itself (missing fields, too few examples) is checked by
``actors.train.data`` right after, still before Ray is started.

Relative paths are resolved against the current directory (the repository root for
``python -m jobs.train``, the uploaded working directory for ``ray job submit --working-dir .``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composition.config import CompositionConfig, ConfigError, LayerMapping

DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICES = ("auto", "cpu", "cuda")
_FORMATS = ("text", "prompt_completion")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class TrainConfigError(ValueError):
    """A training config that cannot work; the message names the key and what to do."""


@dataclass
class DataSettings:
    """Training data: files read with ``datasets`` (jsonl, parquet or text, one example per record/line).

    ``format: text`` trains on every token of ``text_field``; ``format: prompt_completion`` tokenises
    ``prompt_field`` and ``completion_field`` separately, concatenates them and puts the loss on the
    completion tokens only (labels -100 on the prompt). Examples are cut to ``max_length`` tokens and
    right-padded to it, so every batch has the shape [batch, max_length].
    """

    train: list[str] = field(default_factory=list)
    format: str = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    max_length: int = 512
    append_eos: bool = True


@dataclass
class TrainingSettings:
    """Optimisation: ``batch_size`` is global (split evenly over ``ray.num_workers``)."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0
    log_every: int = 10
    # start again from fresh bridges if the mean loss of the last 100 steps is still above
    # plateau_max_loss at step plateau_check_step, at most plateau_restarts times (0: never)
    plateau_check_step: int = 0
    plateau_max_loss: float = 0.0
    plateau_restarts: int = 0


@dataclass
class RaySettings:
    """Cluster resources. CPU and GPU requests may be fractional (several actors share a GPU).

    ``resources_per_worker`` and ``resources_per_augment_actor`` are custom Ray resources
    (``{name: amount}``) that each training worker / each augmenting actor asks for on top of its
    CPUs and GPUs. A node type that declares the resource (``anchor_node: 1`` in cluster.yaml, or
    ``--resources`` of ``ray start``) is then the only place the actor can run, so the anchor's
    workers land on the anchor GPU nodes and the augmenting actors on theirs. ``memory`` (bytes) is
    accepted too; CPU and GPU are not (they have their own keys).
    """

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    augment_actors: int = 1
    cpus_per_augment_actor: float = 1.0
    gpus_per_augment_actor: float = 0.0
    resources_per_augment_actor: dict[str, float] = field(default_factory=dict)
    prefetch_batches: int = 2
    max_failures: int = 3


@dataclass
class CacheSettings:
    """Write the augmenting states once to Parquet shards under ``path`` and train from them."""

    enabled: bool = False
    path: str | None = None


@dataclass
class TrainJobConfig:
    """The whole job. See docs/training.md for every key."""

    anchor: str
    augments: list[str]
    data: DataSettings
    name: str = "calm-train"
    tokenizer: str | None = None
    composition: CompositionConfig = field(default_factory=CompositionConfig)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    storage_path: str = "~/calm-ray/runs"
    output: str | None = None
    init_bridges: str | None = None  # start from these trained bridges (a bridges folder) instead of random ones
    activation_cache: CacheSettings = field(default_factory=CacheSettings)
    dtype: str = "auto"
    device: str = "auto"

    # ------------------------------------------------------------------ derived values
    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.anchor

    @property
    def run_path(self) -> Path:
        """Ray Train's run folder: ``storage_path/name`` (checkpoints live here)."""
        return Path(self.storage_path) / self.name

    @property
    def output_path(self) -> Path:
        return Path(self.output) if self.output else self.run_path / "bridges"

    @property
    def per_worker_batch(self) -> int:
        return self.training.batch_size // self.ray.num_workers

    @property
    def model_dtype(self) -> str:
        """The dtype of every model (and of the streamed states). ``auto``: bfloat16 when the job
        asks for GPUs, else float32. Decided here, not by probing this machine, because the submitting
        machine may have no GPU while the workers do."""
        if self.dtype != "auto":
            return self.dtype
        uses_gpu = self.ray.gpus_per_worker > 0 or self.ray.gpus_per_augment_actor > 0
        return "bfloat16" if uses_gpu else "float32"

    def worker_device(self, ray_device) -> str:
        """The training workers' device: ``auto`` takes the one Ray Train assigned."""
        return str(ray_device) if self.device == "auto" else self.device

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["composition"] = self.composition.to_dict()
        return d


# ---------------------------------------------------------------------------------- parsing
_SECTIONS = {"data": DataSettings, "training": TrainingSettings, "ray": RaySettings, "activation_cache": CacheSettings}


def _unknown(keys, valid, where: str) -> None:
    unknown = [k for k in keys if k not in valid]
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise TrainConfigError(
        f"unknown key '{where}{key}'{hint}; valid keys{' under ' + where.rstrip('.') if where else ''} are: "
        f"{', '.join(sorted(valid))}"
    )


def _check_type(value, hint, key: str):
    """Return ``value`` as type ``hint`` or raise naming ``key``. ints are accepted for floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, key)
    if origin is dict:
        if value is None:  # `key:` with nothing after it in YAML
            return {}
        if not isinstance(value, dict):
            raise TrainConfigError(f"'{key}' must be a mapping of {{name: amount}}, got {value!r}")
        out = {}
        for name, v in value.items():
            if not isinstance(name, str) or not name:
                raise TrainConfigError(f"'{key}': resource names must be non-empty strings, got {name!r}")
            out[name] = _check_type(v, args[1], f"{key}.{name}")
        return out
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise TrainConfigError(f"'{key}' must be a list, got {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        raise TrainConfigError(f"'{key}' must be {names[hint]}, got {value!r}")
    return float(value) if hint is float else value


def _section(cls, raw, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TrainConfigError(f"'{where}' must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    _unknown(raw, hints, f"{where}.")
    return cls(**{k: _check_type(v, hints[k], f"{where}.{k}") for k, v in raw.items()})


def parse_config(raw: dict, name: str | None = None) -> TrainJobConfig:
    """Build a TrainJobConfig from a plain dict, checking keys, types and ranges (no file access)."""
    if not isinstance(raw, dict):
        raise TrainConfigError(f"the config must be a YAML mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(TrainJobConfig)
    _unknown(raw, hints, "")
    for key in ("anchor", "augments", "data"):
        if key not in raw or raw[key] in (None, [], ""):
            example = {"anchor": "anchor: path/to/anchor_model", "augments": "augments: [path/to/augmenting_model]",
                       "data": "data: {train: path/to/train.jsonl}"}[key]
            raise TrainConfigError(f"missing required key '{key}': add e.g. `{example}`")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            kwargs[key] = _section(_SECTIONS[key], value, key)
        elif key == "composition":
            if not isinstance(value, dict):
                raise TrainConfigError(f"'composition' must be a mapping of keys, got {value!r}")
            try:
                kwargs[key] = CompositionConfig.from_dict(value)
            except (ConfigError, TypeError) as e:
                raise TrainConfigError(f"composition: {e}") from None
        else:
            kwargs[key] = _check_type(value, hints[key], key)
    if "name" not in raw and name:
        kwargs["name"] = name
    if "composition" not in raw:
        kwargs["composition"] = CompositionConfig(mappings=[LayerMapping() for _ in kwargs["augments"]])
    cfg = TrainJobConfig(**kwargs)
    _check_values(cfg)
    return cfg


def _positive(value, key: str, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise TrainConfigError(f"'{key}' must be {'>= 0' if zero_ok else 'positive'}, got {value}")


def _check_custom_resources(resources: dict[str, float], key: str, who: str) -> None:
    """Custom resource requests: no CPU/GPU (they have their own keys), amounts Ray can schedule."""
    for name, amount in resources.items():
        if name.upper() in ("CPU", "GPU"):
            own = f"ray.{name.lower()}s_per_{who}"
            raise TrainConfigError(
                f"'{key}' names {name!r}: set '{own}' for {name.upper()}s instead; '{key}' is for custom "
                f"resources that node types declare, such as anchor_node"
            )
        _positive(amount, f"{key}.{name}", zero_ok=True)
        if 0 < amount < 1e-4:
            raise TrainConfigError(
                f"'{key}.{name}' is {amount}: Ray counts resources in steps of 0.0001; use 0.0001 or more"
            )


def _check_values(cfg: TrainJobConfig) -> None:
    t, r, d = cfg.training, cfg.ray, cfg.data
    if not re.fullmatch(r"[\w.-]+", cfg.name):
        raise TrainConfigError(f"'name' must be a folder name (letters, digits, . _ -), got {cfg.name!r}")
    if cfg.dtype not in _DTYPES:
        raise TrainConfigError(f"'dtype' must be one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
    if cfg.device not in _DEVICES:
        raise TrainConfigError(f"'device' must be one of {', '.join(_DEVICES)}, got {cfg.device!r}")
    if not d.train:
        raise TrainConfigError(
            "missing required key 'data.train': give a file or a list of files (jsonl, parquet or text)"
        )
    if d.format not in _FORMATS:
        raise TrainConfigError(f"'data.format' must be one of {', '.join(_FORMATS)}, got {d.format!r}")
    if d.max_length < 2:
        raise TrainConfigError(f"'data.max_length' must be at least 2 tokens, got {d.max_length}")
    for key in ("steps", "batch_size", "checkpoint_every", "log_every"):
        _positive(getattr(t, key), f"training.{key}")
    _positive(t.lr, "training.lr")
    for key in ("warmup_steps", "weight_decay", "grad_clip", "plateau_check_step", "plateau_max_loss",
                "plateau_restarts"):
        _positive(getattr(t, key), f"training.{key}", zero_ok=True)
    if t.plateau_restarts and not (0 < t.plateau_check_step < t.steps and t.plateau_max_loss > 0):
        raise TrainConfigError(
            f"'training.plateau_restarts' is {t.plateau_restarts}: also set 'training.plateau_check_step' between 1 "
            f"and training.steps - 1 ({t.steps - 1}) and 'training.plateau_max_loss' > 0 (the mean loss above which "
            f"a run counts as stuck), or set plateau_restarts to 0"
        )
    for key in ("num_workers", "augment_actors"):
        _positive(getattr(r, key), f"ray.{key}")
    for key in ("cpus_per_worker", "gpus_per_worker", "cpus_per_augment_actor", "gpus_per_augment_actor",
                "prefetch_batches", "max_failures"):
        _positive(getattr(r, key), f"ray.{key}", zero_ok=True)
    _check_custom_resources(r.resources_per_worker, "ray.resources_per_worker", "worker")
    _check_custom_resources(r.resources_per_augment_actor, "ray.resources_per_augment_actor", "augment_actor")
    if t.batch_size % r.num_workers:
        raise TrainConfigError(
            f"'training.batch_size' ({t.batch_size}) is the global batch and must divide evenly over "
            f"'ray.num_workers' ({r.num_workers}): use a multiple of {r.num_workers}"
        )
    if cfg.device == "cuda" and r.gpus_per_worker == 0:
        raise TrainConfigError("'device: cuda' needs GPUs for the training workers: set 'ray.gpus_per_worker' > 0")
    if cfg.activation_cache.enabled and not cfg.activation_cache.path:
        raise TrainConfigError(
            "'activation_cache.enabled' is true but 'activation_cache.path' is not set: give a folder"
        )
    if len(cfg.composition.mappings) != len(cfg.augments):
        raise TrainConfigError(
            f"'composition.mappings' has {len(cfg.composition.mappings)} entries for {len(cfg.augments)} augmenting "
            f"models: give one mapping per entry of 'augments'"
        )


# ---------------------------------------------------------------------------------- files and models
def _abs(path: str) -> str:
    return str(Path(os.path.expanduser(path)).absolute())


def _is_uri(path: str) -> bool:
    return "://" in path


def _model_config(key: str, name_or_path: str):
    """The model's HF config, from a local folder or (when it looks like one) a hub id."""
    from transformers import AutoConfig

    local = Path(os.path.expanduser(name_or_path))
    if local.exists():
        if not (local / "config.json").is_file():
            raise TrainConfigError(f"'{key}': {local} has no config.json; give a Hugging Face model folder")
    elif not _HUB_ID.match(name_or_path):
        raise TrainConfigError(f"'{key}': model folder {name_or_path} does not exist; fix the path")
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else name_or_path)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes a config error naming the key
        raise TrainConfigError(
            f"'{key}': cannot read a model config from {name_or_path!r} (not a local folder, and loading it as a "
            f"Hugging Face hub id failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"give a local model folder"
        ) from None


def _decoder_info(key: str, hf_config):
    """DecoderInfo of a weightless copy of the model (meta device: no memory, no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    from composition.layers import UnsupportedModelError, describe_decoder

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        return describe_decoder(model)
    except (UnsupportedModelError, ValueError) as e:
        raise TrainConfigError(f"'{key}': {e}") from None


def check_files_and_models(cfg: TrainJobConfig) -> dict:
    """Check paths, models, layer mapping and tokenizer; returns facts the job prints (widths, links).

    Makes local paths absolute in place, so that Ray workers and actors see the same files.
    """
    cfg.anchor = _abs(cfg.anchor) if Path(os.path.expanduser(cfg.anchor)).exists() else cfg.anchor
    cfg.augments = [_abs(a) if Path(os.path.expanduser(a)).exists() else a for a in cfg.augments]
    anchor_info = _decoder_info("anchor", _model_config("anchor", cfg.anchor))
    augment_infos = [_decoder_info(f"augments[{i}]", _model_config(f"augments[{i}]", a))
                     for i, a in enumerate(cfg.augments)]
    links = []
    for i, (mapping, info) in enumerate(zip(cfg.composition.mappings, augment_infos)):
        try:
            pairs = mapping.resolve(info.num_layers, anchor_info.num_layers)
        except ConfigError as e:
            raise TrainConfigError(f"composition.mappings[{i}] (augments[{i}]): {e}") from None
        links += [(i, a, b) for a, b in pairs]

    if cfg.tokenizer:
        tok_path = Path(os.path.expanduser(cfg.tokenizer))
        if tok_path.exists():
            cfg.tokenizer = _abs(cfg.tokenizer)
        elif not _HUB_ID.match(cfg.tokenizer):
            raise TrainConfigError(f"'tokenizer': folder {cfg.tokenizer} does not exist; fix the path or remove "
                                   f"the key to use the anchor's tokenizer")

    files = []
    for i, f in enumerate(cfg.data.train):
        p = Path(os.path.expanduser(f))
        if p.suffix not in DATA_EXTENSIONS:
            raise TrainConfigError(
                f"'data.train[{i}]': {f} has extension {p.suffix or '(none)'!r}; supported are "
                f"{', '.join(sorted(DATA_EXTENSIONS))}"
            )
        if not p.is_file():
            raise TrainConfigError(f"'data.train[{i}]': file {f} does not exist; fix the path")
        files.append(_abs(f))
    kinds = {DATA_EXTENSIONS[Path(f).suffix] for f in files}
    if len(kinds) > 1:
        raise TrainConfigError(f"'data.train' mixes file kinds {sorted(kinds)}: use one kind (jsonl, parquet or text)")
    cfg.data.train = files

    for key in ("storage_path", "output"):
        value = getattr(cfg, key)
        if value and not _is_uri(value):
            setattr(cfg, key, _abs(value))
    if cfg.activation_cache.path and not _is_uri(cfg.activation_cache.path):
        cfg.activation_cache.path = _abs(cfg.activation_cache.path)
    if cfg.output and _is_uri(cfg.output):
        raise TrainConfigError(f"'output' must be a local folder (the exported bridges), got {cfg.output}")
    if cfg.init_bridges:
        _check_init_bridges(cfg)
    return {
        "anchor": anchor_info,
        "augments": augment_infos,
        "links": links,
    }


def _check_init_bridges(cfg: TrainJobConfig) -> None:
    """'init_bridges' must be a bridges folder of this composition (the models are checked when loaded)."""
    from composition.checkpoint import read_meta

    cfg.init_bridges = _abs(cfg.init_bridges)
    try:
        meta = read_meta(cfg.init_bridges)
    except (FileNotFoundError, ValueError) as e:
        raise TrainConfigError(f"'init_bridges': {e}; give a folder written by a training job's output") from None
    saved, wanted = meta["config"], cfg.composition.to_dict()
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if changed:
        raise TrainConfigError(
            f"'init_bridges': {cfg.init_bridges} holds bridges of another composition ({', '.join(changed)} differ): "
            f"use its composition settings or remove init_bridges")


def check_tokenizer(cfg: TrainJobConfig, tokenizer, anchor_vocab: int) -> None:
    """Token ids must fit the anchor's embedding table."""
    if len(tokenizer) > anchor_vocab:
        raise TrainConfigError(
            f"'tokenizer': {cfg.tokenizer_path} has {len(tokenizer)} tokens but the anchor's vocabulary has "
            f"{anchor_vocab}; use the tokenizer the models were trained with"
        )


def read_config(source: str | os.PathLike | dict) -> TrainJobConfig:
    """Parse a config (a YAML path or a dict): keys, types and ranges only (no file access)."""
    if isinstance(source, dict):
        return parse_config(source)
    import yaml

    path = Path(source)
    if not path.is_file():
        raise TrainConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path} is not valid YAML: {e}") from None
    return parse_config(raw, name=path.stem)


def load_config(source: str | os.PathLike | dict) -> TrainJobConfig:
    """Parse and check a config (a YAML path or a dict): keys, types, ranges, files, models, layer mapping.

    Raises TrainConfigError with a message that names the key and the fix. Starts no Ray.
    """
    cfg = read_config(source)
    check_files_and_models(cfg)
    return cfg


def config_from_dict(d: dict) -> TrainJobConfig:
    """Rebuild a config that ``to_dict`` produced (already checked: no file access)."""
    return parse_config(d)

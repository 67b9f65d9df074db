"""The training job's configuration: YAML -> TrainJobConfig, validated before any cluster work.

    cfg = load_config("configs/train_tiny.yaml")     # raises TrainConfigError naming the key and fix
    cfg = load_config(path, ["training.steps=50"])   # with --set overrides, checked like the file

A ``TrainJobConfig`` (pydantic, see ``actors.config``) is validated once, here; the typed object is
what Ray Train hands its workers.

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

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from actors.config import DType, StrictModel, apply_overrides, load_yaml, parse
from actors.storage import StorageError, check_storage, filesystem, is_uri, join
from composition.config import CompositionConfig, ConfigError, LayerMapping, check_augment_tokenizers
from composition.training import TrainSettings

DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
NonNegative = Annotated[float, Field(ge=0)]


class TrainConfigError(ConfigError):
    """A training config that cannot work; the message names the key and what to do."""


class DataSettings(StrictModel):
    """Training data: files read with ``datasets`` (jsonl, parquet or text, one example per record/line).

    ``format: text`` trains on every token of ``text_field``; ``format: prompt_completion`` tokenises
    ``prompt_field`` and ``completion_field`` separately, concatenates them and puts the loss on the
    completion tokens only (labels -100 on the prompt). Examples are cut to ``max_length`` tokens and
    right-padded to it, so every batch has the shape [batch, max_length].
    """

    train: list[str]
    format: Literal["text", "prompt_completion"] = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    max_length: int = Field(512, ge=2)
    append_eos: bool = True

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_more(cls, v):
        v = [v] if isinstance(v, str) else v
        if v in (None, []):
            raise ValueError("give a file or a list of files (jsonl, parquet or text)")
        return v


@pydantic_dataclass(config={"extra": "forbid"})
class TrainingSettings(TrainSettings):
    """``training:``: the optimiser's settings (``composition.training.TrainSettings``) and the loop's.

    ``batch_size`` is global (split evenly over ``ray.num_workers``).
    """

    batch_size: Annotated[int, Field(gt=0)] = 8
    checkpoint_every: Annotated[int, Field(gt=0)] = 100
    seed: int = 0
    log_every: Annotated[int, Field(gt=0)] = 10


def _custom_resources(resources: dict[str, float], key: str, who: str) -> dict[str, float]:
    """Custom resource requests: no CPU/GPU (they have their own keys), amounts Ray can schedule."""
    for name, amount in resources.items():
        if name.upper() in ("CPU", "GPU"):
            raise ValueError(
                f"'{key}' names {name!r}: set 'ray.{name.lower()}s_per_{who}' for {name.upper()}s instead; '{key}' is for "
                f"custom resources that node types declare, such as anchor_node"
            )
        if amount < 0:
            raise ValueError(f"'{key}.{name}' must be >= 0, got {amount}")
        if 0 < amount < 1e-4:
            raise ValueError(f"'{key}.{name}' is {amount}: Ray counts resources in steps of 0.0001; use 0.0001 or more")
    return resources


class RaySettings(StrictModel):
    """Cluster resources. CPU and GPU requests may be fractional (several actors share a GPU).

    ``resources_per_worker`` and ``resources_per_augment_actor`` are custom Ray resources
    (``{name: amount}``) that each training worker / each augmenting actor asks for on top of its
    CPUs and GPUs. A node type that declares the resource (``anchor_node: 1`` in cluster.yaml, or
    ``--resources`` of ``ray start``) is then the only place the actor can run, so the anchor's
    workers land on the anchor GPU nodes and the augmenting actors on theirs. ``memory`` (bytes) is
    accepted too; CPU and GPU are not (they have their own keys).
    """

    num_workers: int = Field(1, gt=0)
    cpus_per_worker: NonNegative = 1.0
    gpus_per_worker: NonNegative = 0.0
    resources_per_worker: dict[str, float] = {}
    augment_actors: int = Field(1, gt=0)
    cpus_per_augment_actor: NonNegative = 1.0
    gpus_per_augment_actor: NonNegative = 0.0
    resources_per_augment_actor: dict[str, float] = {}
    prefetch_batches: int = Field(2, ge=0)
    max_failures: int = Field(3, ge=0)

    @field_validator("resources_per_worker", "resources_per_augment_actor", mode="before")
    @classmethod
    def _mapping(cls, v, info):
        if v is None:  # `key:` with nothing after it in YAML
            return {}
        if not isinstance(v, dict):
            raise ValueError(f"'ray.{info.field_name}' must be a mapping of {{name: amount}}, got {v!r}")
        for name, amount in v.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool):
                raise ValueError(f"'ray.{info.field_name}.{name}' must be a number, got {amount!r}")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _worker(cls, v):
        return _custom_resources(v, "ray.resources_per_worker", "worker")

    @field_validator("resources_per_augment_actor")
    @classmethod
    def _augment_actor(cls, v):
        return _custom_resources(v, "ray.resources_per_augment_actor", "augment_actor")


class CacheSettings(StrictModel):
    """Write the augmenting states once to Parquet shards under ``path`` and train from them."""

    enabled: bool = False
    path: str | None = None


class TrainJobConfig(StrictModel):
    """The whole job. See docs/training.md for every key."""

    model_config = {**StrictModel.model_config, "arbitrary_types_allowed": True}

    anchor: str
    augments: list[str]
    data: DataSettings
    name: str = "calm-train"
    tokenizer: str | None = None  # the anchor's tokenizer (default: the anchor's folder)
    # one per augmenting model (default: each model's folder; composition.loading.resolve_tokenizers): one that
    # differs from the anchor's reads its own tokens (composition/alignment.py), one equal to it the anchor's
    augment_tokenizers: list[str | None] | None = None
    composition: CompositionConfig | None = None  # None: the paper's default mapping for each augmenting model
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    storage_path: str = "~/calm-ray/runs"
    output: str | None = None
    init_bridges: str | None = None  # start from these trained bridges (a bridges folder) instead of random ones
    activation_cache: CacheSettings = Field(default_factory=CacheSettings)
    dtype: Literal["auto"] | DType = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not re.fullmatch(r"[\w.-]+", v):
            raise ValueError(f"'name' must be a folder name (letters, digits, . _ -), got {v!r}")
        return v

    @field_validator("anchor", mode="before")
    @classmethod
    def _anchor(cls, v):
        if v in (None, ""):
            raise ValueError("add e.g. `anchor: path/to/anchor_model`")
        return v

    @field_validator("augments", mode="before")
    @classmethod
    def _augments(cls, v):
        v = [v] if isinstance(v, str) else v
        if v in (None, []):
            raise ValueError("add e.g. `augments: [path/to/augmenting_model]`")
        return v

    @field_validator("composition", mode="before")
    @classmethod
    def _composition(cls, v):
        if v is None or isinstance(v, CompositionConfig):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"must be a mapping of keys, got {v!r}")
        try:
            return CompositionConfig.from_dict(v)
        except (ConfigError, TypeError) as e:
            raise ValueError(f"composition: {e}") from None

    @model_validator(mode="after")
    def _cross_field(self):
        t, r = self.training, self.ray
        if self.composition is None:
            self.__dict__["composition"] = CompositionConfig(mappings=[LayerMapping() for _ in self.augments])
        if t.batch_size % r.num_workers:
            raise ValueError(
                f"'training.batch_size' ({t.batch_size}) is the global batch and must divide evenly over "
                f"'ray.num_workers' ({r.num_workers}): use a multiple of {r.num_workers}"
            )
        if self.device == "cuda" and r.gpus_per_worker == 0:
            raise ValueError("'device: cuda' needs GPUs for the training workers: set 'ray.gpus_per_worker' > 0")
        if self.activation_cache.enabled and not self.activation_cache.path:
            raise ValueError("'activation_cache.enabled' is true but 'activation_cache.path' is not set: give a folder")
        check_augment_tokenizers(self.augment_tokenizers, len(self.augments))
        if len(self.composition.mappings) != len(self.augments):
            raise ValueError(
                f"'composition.mappings' has {len(self.composition.mappings)} entries for {len(self.augments)} "
                f"augmenting models: give one mapping per entry of 'augments'"
            )
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.anchor

    @property
    def run_path(self) -> Path | str:
        """Ray Train's run folder: ``storage_path/name`` (checkpoints live here); a URI (str) on shared storage."""
        if is_uri(self.storage_path):
            return join(self.storage_path, self.name)
        return Path(self.storage_path) / self.name

    @property
    def output_path(self) -> Path | str:
        """Where the final bridges go: a folder (Path), or a URI (str) published with ``actors.storage``."""
        if self.output:
            return self.output if is_uri(self.output) else Path(self.output)
        return join(self.run_path, "bridges") if is_uri(self.storage_path) else self.run_path / "bridges"

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


def parse_config(raw: dict, name: str | None = None) -> TrainJobConfig:
    """Build a TrainJobConfig from a plain dict, checking keys, types and ranges (no file access)."""
    if isinstance(raw, dict) and "name" not in raw and name:
        raw = {**raw, "name": name}
    return parse(TrainJobConfig, raw, TrainConfigError)


# ---------------------------------------------------------------------------------- files and models
def _abs(path: str) -> str:
    return str(Path(os.path.expanduser(path)).absolute())


_is_uri = is_uri


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

    if cfg.augment_tokenizers:
        fixed = []
        for i, t in enumerate(cfg.augment_tokenizers):
            if t is not None and Path(os.path.expanduser(t)).exists():
                t = _abs(t)
            elif t is not None and not _HUB_ID.match(t):
                raise TrainConfigError(f"'augment_tokenizers[{i}]': folder {t} does not exist; fix the path or use "
                                       f"null for the augmenting model's own folder")
            fixed.append(t)
        cfg.augment_tokenizers = fixed

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
    check_shared_storage_paths(cfg)
    if cfg.init_bridges:
        _check_init_bridges(cfg)
    return {
        "anchor": anchor_info,
        "augments": augment_infos,
        "links": links,
    }


def check_shared_storage_paths(cfg: TrainJobConfig) -> None:
    """``storage_path`` and ``output`` as URIs (s3://, gs://, with ``?endpoint_override=``): parsed, and checked
    by writing and deleting one small object, so a missing bucket, wrong credentials or an unreachable endpoint
    fail here, in seconds, before any cluster work (``actors.storage.check_storage``). Local folders: writable."""
    for key in ("storage_path", "output"):
        value = getattr(cfg, key)
        if not value:
            continue
        try:
            filesystem(value)
            check_storage(value, key, write=True)
        except StorageError as e:
            raise TrainConfigError(str(e)) from None


def _check_init_bridges(cfg: TrainJobConfig) -> None:
    """'init_bridges' must be a bridges folder of this composition (the models are checked when loaded)."""
    from composition.checkpoint import read_meta

    cfg.init_bridges = _abs(cfg.init_bridges)
    try:
        meta = read_meta(cfg.init_bridges)
    except (FileNotFoundError, ValueError) as e:
        raise TrainConfigError(f"'init_bridges': {e}; give a folder written by a training job's output") from None
    # through CompositionConfig, so that keys added since the bridges were saved take their defaults
    try:
        saved = CompositionConfig.from_dict(meta["config"]).to_dict()
    except ConfigError as e:
        raise TrainConfigError(f"'init_bridges': {cfg.init_bridges} holds a composition this version cannot read "
                               f"({e}); use bridges written by this version or remove init_bridges") from None
    wanted = cfg.composition.to_dict()
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


def read_config(source: str | os.PathLike | dict, overrides: list[str] = ()) -> TrainJobConfig:
    """Parse a config (a YAML path or a dict, then ``key.path=value`` overrides): keys, types and ranges
    only (no file access)."""
    if isinstance(source, TrainJobConfig):
        return source
    raw, name = (source, None) if isinstance(source, dict) else (load_yaml(source, TrainConfigError), Path(source).stem)
    if overrides:
        raw = apply_overrides(raw, list(overrides), TrainConfigError)
    return parse_config(raw, name=name)


def load_config(source: str | os.PathLike | dict, overrides: list[str] = ()) -> TrainJobConfig:
    """Parse and check a config (a YAML path or a dict): keys, types, ranges, files, models, layer mapping.

    Raises TrainConfigError with a message that names the key and the fix. Starts no Ray.
    """
    cfg = read_config(source, overrides)
    check_files_and_models(cfg)
    return cfg

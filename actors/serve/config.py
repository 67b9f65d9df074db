"""Serving settings and the checks of a Serve config file's keys.

``ServingArgs`` are the application's ``args`` (what to load and the request limits). Serve's
own config schema accepts unknown keys silently: a misspelt ``autoscaling_config`` key such as
``target_num_ongoing_requests_per_replica`` (its old name) would do nothing. ``check_serve_config``
walks a whole config file and names every key that Serve or this project would ignore, with the
keys that are valid there, before anything is deployed:

    problems = check_serve_config(yaml.safe_load(open("configs/serve.yaml")))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from actors.config import DType, StrictModel, parse
from actors.storage import StorageError, check_folder, fetch_folder, filesystem, is_uri
from composition.config import ConfigError, check_augment_tokenizers, did_you_mean

APP_IMPORT_PATH = "jobs.serve:app_builder"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
INGRESS, ANCHOR, COMPOSITIONS = "Ingress", "Anchor", "Compositions"


def augment_deployment_name(index: int) -> str:
    return f"Augment{index}"


class ServeConfigError(ConfigError):
    """A serving config that would not work as written; the message lists every problem."""


class CompositionArgs(StrictModel):
    """One served composition: its bridges and the augmenting models they read, over the server's anchor."""

    name: str = Field(min_length=1)  # the id clients put in "model"
    augments: list[str]  # one folder per augmenting model, in the bridges' order
    bridges: str  # folder written by ComposedModel.save_pretrained
    # one per augmenting model (null: that model's folder, or the anchor's tokenizer when the folder holds
    # none); one that differs from the anchor's is served across tokenizers (docs/serving.md)
    augment_tokenizers: list[str | None] | None = None

    @field_validator("augments", mode="before")
    @classmethod
    def _split(cls, v):
        # `serve run jobs.serve:app_builder augments=a,b` passes one string
        return [p for p in v.split(",") if p] if isinstance(v, str) else v

    @field_validator("augment_tokenizers", mode="before")
    @classmethod
    def _split_tokenizers(cls, v):
        # `serve run ... augment_tokenizers=a,,b`: an empty entry (or "null") is that model's own folder
        if isinstance(v, str):
            return [None if p in ("", "null", "None") else p for p in v.split(",")]
        return v

    @field_validator("augments")
    @classmethod
    def _some(cls, v):
        if not v:
            raise ValueError("give at least one augmenting model folder")
        return v

    @model_validator(mode="after")
    def _one_tokenizer_per_augment(self):
        check_augment_tokenizers(self.augment_tokenizers, len(self.augments))
        return self

    def slot_keys(self) -> list[tuple[str, str | None]]:
        """(folder, tokenizer) of each augmenting model: the key of the augmenting deployment that serves it."""
        return list(zip(self.augments, self.augment_tokenizers or [None] * len(self.augments)))


# the keys of one composition given at the top of the args (the single-composition config)
_ONE_COMPOSITION = ("augments", "bridges", "augment_tokenizers")


class ServingArgs(StrictModel):
    """What one application serves: an anchor, the compositions over it, and the request limits (its ``args``).

    ``compositions`` lists each composition (``CompositionArgs``: name, augments, bridges); the anchor is loaded
    once, and an augmenting model that several compositions name (the same folder, read with the same
    tokenizer) is deployed once and shared. The single-composition config of earlier versions (``model_name``,
    ``augments``, ``bridges``, ``augment_tokenizers`` at the top) is a list of one.

    Paths must exist on every node that runs a replica, or be URIs of shared storage (``s3://bucket/prefix``,
    ``gs://...``, ``?endpoint_override=`` for S3-compatible stores; ``actors.storage``): each replica then
    copies what it loads into its node's cache (``localized``) and fetches it again when the remote
    changed. Validated once (``from_dict``, at the edge);
    ``build_app`` binds the object itself to every deployment.
    """

    compositions: list[CompositionArgs]
    # also serve the bare anchor (no bridges) under this id, from the same replicas and batches, as vLLM serves
    # the base model beside its adapters (None: only the compositions)
    anchor_name: str | None = None
    anchor: str  # Hugging Face folder (or hub id where the hub is reachable)
    tokenizer: str | None = None  # the anchor's tokenizer (default: the anchor's folder)
    dtype: DType = "float32"
    device: str = "cpu"  # "cuda" in replicas that have num_gpus
    max_batch_size: int = Field(16, ge=1)  # rows one anchor replica decodes together
    max_context: int | None = None  # default: the smallest max_position_embeddings of the models
    default_max_tokens: int = Field(256, ge=1)  # when a request gives none
    max_tokens_limit: int | None = None  # largest max_tokens a request may ask for (default: the context)
    request_timeout_s: float = 120.0  # a request running longer is stopped and answered 504
    max_body_bytes: int = Field(1 << 20, ge=1024)  # a larger request body is answered 413 before it is parsed
    # API keys, one per line (with any in $CALM_RAY_API_KEY, comma-separated); read by every Ingress replica
    # at start, so the file must exist on every node that runs one. None and no env: no keys, an open server
    api_key_file: str | None = None
    # compositions that POST /v1/load_composition may add at runtime, at most this many at a time (0: the
    # load and unload endpoints are off); they need an admin key (admin_key_file, $CALM_RAY_ADMIN_KEY)
    max_loaded_compositions: int = Field(0, ge=0)
    # admin keys, one per line (with any in $CALM_RAY_ADMIN_KEY): the only keys the load and unload endpoints
    # take (user API keys do not); read by every Ingress replica at start
    admin_key_file: str | None = None
    max_retries: int = 2  # resumes of a request whose anchor replica died
    augment_retry_s: float = 30.0  # how long an engine keeps trying to reach an augmenting replica
    torch_threads: int | None = None  # torch.set_num_threads in each replica (None: torch's default)
    # anchor model calls in a worker thread, so each step's augmenting call runs during the anchor's layers
    # below its first bridge; "auto": when there are such layers (the first bridge above the anchor's input)
    model_thread: bool | Literal["auto"] = Field("auto", description="true, false or auto")

    @model_validator(mode="before")
    @classmethod
    def _single_composition(cls, data):
        """``model_name``/``augments``/``bridges``/``augment_tokenizers`` at the top: a list of one composition."""
        if not isinstance(data, dict):
            return data
        given = [k for k in ("model_name", *_ONE_COMPOSITION) if k in data]
        if "compositions" in data:
            if given:
                raise ValueError(f"give the compositions in 'compositions' only: move {', '.join(given)} into "
                                 f"an entry of it (model_name is its 'name')")
            return data
        missing = [k for k in ("augments", "bridges") if k not in data]
        if missing:
            raise ValueError(f"give {' and '.join(missing)} (one composition), or a list of compositions "
                             f"(compositions: [{{name, augments, bridges}}, ...])")
        data = dict(data)
        one = {"name": data.pop("model_name", "calm-ray"), **{k: data.pop(k) for k in _ONE_COMPOSITION if k in data}}
        return {**data, "compositions": [one]}

    @model_validator(mode="after")
    def _distinct_names(self):
        names = [c.name for c in self.compositions]
        if not names:
            raise ValueError("give at least one composition in 'compositions'")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"composition names must differ: {repeated} appear more than once")
        if self.anchor_name is not None and self.anchor_name in names:
            raise ValueError(f"anchor_name must differ from every composition's name ({self.anchor_name!r} is "
                             f"one): clients choose between them with \"model\"")
        return self

    @property
    def model_name(self) -> str:
        """The first composition's id: what a request without ``model`` gets."""
        return self.compositions[0].name

    def augment_slots(self) -> list[tuple[str, str | None]]:
        """The augmenting models to deploy, (folder, tokenizer) each, once however many compositions read them,
        in the order the compositions first name them; ``Augment{i}`` serves slot i."""
        return list(dict.fromkeys(key for c in self.compositions for key in c.slot_keys()))

    def slots_of(self, composition: CompositionArgs) -> list[int]:
        """The slots (augmenting deployments) of ``composition``'s augmenting models, in its order."""
        slots = self.augment_slots()
        return [slots.index(key) for key in composition.slot_keys()]

    @field_validator("model_thread", mode="before")
    @classmethod
    def _model_thread(cls, v):
        # pydantic reads true/yes/on/1 and false/no/off/0 as booleans (`serve run ... model_thread=1`); "AUTO" too
        return v.lower() if isinstance(v, str) else v

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ServingArgs:
        """Validated args; a ServeConfigError naming each bad or unknown key."""
        if isinstance(args, ServingArgs):
            return args
        return parse(cls, args, ServeConfigError, where="args.")

    def resolved(self) -> ServingArgs:
        """A copy whose relative paths are absolute, taken from the project root when they exist there.

        Replicas do not share the caller's working directory, so ``models/anchor`` in a config
        means ``<project root>/models/anchor`` wherever Serve builds the application.
        """

        def fix(path: str | None) -> str | None:
            if path is None or is_uri(path) or Path(path).is_absolute():
                return path
            for base in (Path.cwd(), PROJECT_ROOT):
                if (base / path).exists():
                    return str((base / path).resolve())
            return path  # a hub id, or missing (check_paths says so)

        return self.model_copy(update={"anchor": fix(self.anchor), "tokenizer": fix(self.tokenizer),
                                       "compositions": [self._paths(c, fix) for c in self.compositions],
                                       "api_key_file": fix(self.api_key_file),
                                       "admin_key_file": fix(self.admin_key_file)})

    @staticmethod
    def _paths(c: CompositionArgs, fix) -> CompositionArgs:
        """``c`` with ``fix`` applied to each of its paths."""
        return c.model_copy(update={"bridges": fix(c.bridges), "augments": [fix(p) for p in c.augments],
                                    "augment_tokenizers": None if c.augment_tokenizers is None else
                                    [fix(p) for p in c.augment_tokenizers]})

    def _folders(self) -> list[tuple[str, str | None]]:
        out = [("anchor", self.anchor), ("tokenizer", self.tokenizer)]
        for k, c in enumerate(self.compositions):
            where = f"compositions[{k}]." if len(self.compositions) > 1 else ""
            out += [(f"{where}bridges", c.bridges)] + [(f"{where}augments[{i}]", p) for i, p in enumerate(c.augments)]
            out += [(f"{where}augment_tokenizers[{i}]", p) for i, p in enumerate(c.augment_tokenizers or [])]
        return out

    def check_paths(self) -> None:
        """Raise ServeConfigError when a model folder or the API key file is missing (before any replica tries
        to load it). A URI is checked where it lives: reachable, bucket and credentials, and that it holds
        the files its role needs (StorageError's sentence, naming the key and the fix)."""
        missing, unusable = [], []
        needs = {"bridges": ("composition_config.json", "bridges.safetensors"), "anchor": ("config.json",),
                 "augments": ("config.json",)}
        for role, path in self._folders():
            if is_uri(path):
                try:
                    filesystem(path)
                    check_folder(path, role, needs.get(role.rsplit(".", 1)[-1].split("[")[0], ()))
                except StorageError as e:
                    unusable.append(str(e))
            elif path is not None and not Path(path).exists():
                missing.append(f"{role} folder {path!r} does not exist")
        if unusable:
            raise ServeConfigError("; ".join(unusable))
        if missing:
            raise ServeConfigError(
                "; ".join(missing) + ": copy or train the model pair there first, or point the config at existing "
                "Hugging Face folders"
            )
        if self.admin_key_file is not None and not Path(self.admin_key_file).expanduser().is_file():
            raise ServeConfigError(
                f"admin_key_file {self.admin_key_file!r} does not exist: write the admin keys there (one per line, "
                f"chmod 600) on every node that runs an Ingress replica")
        if self.api_key_file is not None and not Path(self.api_key_file).expanduser().is_file():
            raise ServeConfigError(
                f"api_key_file {self.api_key_file!r} does not exist: write the API keys there (one per line, "
                f"chmod 600) on every node that runs an Ingress replica, or remove api_key_file to serve without keys"
            )

    def localized(self, anchor: bool = True, augments: list[int] | None = None, bridges: bool = True) -> ServingArgs:
        """A copy whose URIs are folders in this node's cache (``actors.storage.fetch_folder``): each replica calls
        it for what it loads. ``augments``: the augmenting slots (``augment_slots``) to fetch (None: all);
        tokenizers always."""
        wanted = None if augments is None else {self.augment_slots()[i][0] for i in augments}
        fetched: dict[str, str] = {}

        def local(key: str, path: str | None, wanted: bool = True) -> str | None:
            if path is None or not wanted or not is_uri(path):
                return path
            if path not in fetched:  # a folder several compositions name is fetched once
                fetched[path] = str(fetch_folder(path, key))
            return fetched[path]

        def compose(c: CompositionArgs) -> CompositionArgs:
            return c.model_copy(update={
                "bridges": local(f"{c.name}.bridges", c.bridges, bridges),
                "augments": [local(f"{c.name}.augments[{i}]", p, wanted is None or p in wanted)
                             for i, p in enumerate(c.augments)],
                "augment_tokenizers": None if c.augment_tokenizers is None else
                [local(f"{c.name}.augment_tokenizers[{i}]", p) for i, p in enumerate(c.augment_tokenizers)]})

        return self.model_copy(update={
            "anchor": local("anchor", self.anchor, anchor or self.tokenizer is None),
            "tokenizer": local("tokenizer", self.tokenizer),
            "compositions": [compose(c) for c in self.compositions]})

    def deployment_names(self) -> list[str]:
        registry = [COMPOSITIONS] if self.max_loaded_compositions else []
        return [INGRESS, ANCHOR, *registry] + [augment_deployment_name(i) for i in range(len(self.augment_slots()))]

    def localized_composition(self, composition: CompositionArgs) -> CompositionArgs:
        """``composition`` with its URIs fetched into this node's cache (a composition loaded at runtime)."""
        def local(path):
            return path if path is None or not is_uri(path) else str(fetch_folder(path, composition.name))

        return self._paths(composition, local)

    def resolved_composition(self, composition: CompositionArgs) -> CompositionArgs:
        """``composition``'s relative paths made absolute as ``resolved`` makes the config's."""
        return self.model_copy(update={"compositions": [composition]}).resolved().compositions[0]


def _unknown(path: str, key, valid) -> str:
    return f"{path}: unknown key '{key}'{did_you_mean(key, valid)}; valid keys: {', '.join(sorted(map(str, valid)))}"


def _schemas():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        LoggingConfig,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
        gRPCOptionsSchema,
    )

    return dict(top=ServeDeploySchema, http=HTTPOptionsSchema, grpc=gRPCOptionsSchema, logging=LoggingConfig,
                app=ServeApplicationSchema, deployment=DeploymentSchema, autoscaling=AutoscalingConfig,
                actor=RayActorOptionsSchema)


def _keys(model) -> set[str]:
    keys = set(model.model_fields)
    keys |= {f.alias for f in model.model_fields.values() if f.alias}
    return keys


def _check_keys(obj, model, path: str, problems: list[str]) -> bool:
    if not isinstance(obj, dict):
        problems.append(f"{path}: expected a mapping, got {type(obj).__name__}")
        return False
    valid = _keys(model)
    for key in obj:
        if key not in valid:
            problems.append(_unknown(path, key, valid))
    return True


def _check_values(obj: dict, model, path: str, problems: list[str]) -> None:
    """Let Serve's own model check the values of one section (nested dicts are not checked by the top schema)."""
    try:
        model.model_validate(obj)
    except ValidationError as e:
        for err in e.errors():
            if err["type"] != "extra_forbidden":  # unknown keys are reported by _check_keys
                problems.append(f"{path}.{'.'.join(map(str, err['loc']))}: {err['msg']}")
    except (ValueError, TypeError) as e:
        problems.append(f"{path}: {e}")


def _deployments_of_raw(args: dict) -> list[str] | None:
    """The deployment names of args that did not validate, where their augmenting models can still be counted."""
    entries = args.get("compositions") if "compositions" in args else [args]
    if not isinstance(entries, list):
        return None
    folders = []
    for entry in entries:
        raw = entry.get("augments") if isinstance(entry, dict) else None
        if not isinstance(raw, (str, list)):
            return None
        folders += [p for p in raw.split(",") if p] if isinstance(raw, str) else [str(p) for p in raw]
    count = len(dict.fromkeys(folders))  # at least this many; one per distinct folder unless tokenizers differ
    return [INGRESS, ANCHOR] + [augment_deployment_name(k) for k in range(count)]


def check_serve_config(config: dict) -> list[str]:
    """Every problem in a Serve config file (``serve deploy`` format) for this project; [] when fine.

    Checks the keys at every level against Serve's own schema (top level, http_options,
    applications, deployments, autoscaling_config, ray_actor_options), this application's args
    (ServingArgs) and deployment names, then lets Serve's schema check the types.
    """
    s = _schemas()
    problems: list[str] = []
    if not _check_keys(config, s["top"], "config", problems):
        return problems
    for key, schema in [("http_options", "http"), ("grpc_options", "grpc"), ("logging_config", "logging")]:
        if key in config:
            _check_keys(config[key], s[schema], f"config.{key}", problems)
    apps = config.get("applications")
    if not isinstance(apps, list) or not apps:
        problems.append("config.applications: give a list with at least one application")
        apps = []
    for i, app in enumerate(apps):
        where = f"applications[{i}]"
        if not _check_keys(app, s["app"], where, problems):
            continue
        if app.get("import_path") != APP_IMPORT_PATH:
            problems.append(f"{where}.import_path is {app.get('import_path')!r}: this project's application is "
                            f"'{APP_IMPORT_PATH}'")
            continue
        try:
            args = ServingArgs.from_dict(app.get("args") or {})
        except ServeConfigError as e:
            problems.append(f"{where}.{e}")
            args = None
        if args is not None:
            names = args.deployment_names()
        else:  # args are broken; still check deployment names against the augmenting models listed
            names = _deployments_of_raw(app.get("args") or {})
        for j, dep in enumerate(app.get("deployments") or []):
            dwhere = f"{where}.deployments[{j}]"
            if not _check_keys(dep, s["deployment"], dwhere, problems):
                continue
            if names is not None and dep.get("name") not in names:
                problems.append(f"{dwhere}.name {dep.get('name')!r} is not a deployment of this application; "
                                f"its deployments are {', '.join(names)}")
            if "autoscaling_config" in dep and dep["autoscaling_config"] is not None:
                if _check_keys(dep["autoscaling_config"], s["autoscaling"], f"{dwhere}.autoscaling_config", problems):
                    _check_values(dep["autoscaling_config"], s["autoscaling"], f"{dwhere}.autoscaling_config",
                                  problems)
                if "num_replicas" in dep and dep["num_replicas"] not in (None, "auto"):
                    problems.append(f"{dwhere}: give num_replicas or autoscaling_config, not both")
            if "ray_actor_options" in dep:
                if _check_keys(dep["ray_actor_options"], s["actor"], f"{dwhere}.ray_actor_options", problems):
                    _check_values(dep["ray_actor_options"], s["actor"], f"{dwhere}.ray_actor_options", problems)
            if dep.get("max_queued_requests") == -1 and dep.get("name") in (INGRESS, ANCHOR):
                problems.append(f"{dwhere}.max_queued_requests is -1 (unbounded): requests would wait forever "
                                f"under overload instead of getting a 503; give a bound")
    if not problems:
        try:
            s["top"].model_validate(config)
        except ValidationError as e:
            problems += [f"config.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return problems


def load_serve_config(path: str | Path) -> dict:
    """Read and check a config file; ServeConfigError listing every problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ServeConfigError(f"config file {path} does not exist")
    config = yaml.safe_load(path.read_text())
    problems = check_serve_config(config)
    if problems:
        raise ServeConfigError(f"{path} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return config

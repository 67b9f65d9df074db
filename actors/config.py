"""The one config system: typed pydantic models, validated once at the edge, with messages a user can act on.

Every config of the project (the training job's ``TrainJobConfig``, the serving ``ServingArgs``) is a
``StrictModel``: unknown keys are refused (with the closest valid key), types and bounds live on the
fields, cross-field rules in validators. ``parse(Model, raw, error=...)`` turns pydantic's errors into
one line per problem, each naming the key:

    'training.steps' must be an integer, got 'ten'
    unknown key 'training.bach_size' (did you mean 'batch_size'?); valid keys under training are: ...

Validated objects are handed on as they are (into Ray Train's ``train_loop_config``, into Serve's
``.bind()``): nothing downstream validates them again. ``--set key.path=value`` overrides work the
same for every job (``apply_overrides``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from composition.config import DTYPES, ConfigError, did_you_mean

DType = Literal["float32", "bfloat16", "float16"]
assert DType.__args__ == DTYPES  # one list of dtypes: composition.config.DTYPES

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "dict": "a mapping of keys", "list": "a list", "model": "a mapping of keys", "dataclass": "a mapping of keys",
}


def _shown(value: Any) -> str:
    try:
        return json.dumps(value)[:80] if not isinstance(value, str) else repr(value)[:80]
    except (TypeError, ValueError):
        return type(value).__name__


def describe_error(err: dict, model: type[BaseModel] | None = None, where: str = "") -> str:
    """One pydantic error as a sentence that names the key (``where`` prefixes the key path)."""
    loc = [str(x) if not isinstance(x, int) else f"[{x}]" for x in err["loc"]]
    key = where + ".".join(loc).replace(".[", "[")
    kind = err["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's / a dataclass's unknown key
        parent = _model_at(model, err["loc"][:-1]) if model is not None else None
        valid = sorted(parent.__pydantic_fields__) if parent is not None else []
        section = key.rsplit(".", 1)[0] if "." in key else ""
        under = f" under {section}" if section else ""
        return f"unknown key '{key}'{did_you_mean(str(err['loc'][-1]), valid)}; valid keys{under} are: " \
               f"{', '.join(valid)}"
    if kind == "missing":
        return f"missing required key '{key}'"
    got = _shown(err.get("input"))
    for prefix, word in _TYPE_WORDS.items():
        if kind.startswith(prefix + "_") and kind.endswith(("_type", "_parsing")):
            return f"'{key}' must be {word}, got {got}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"'{key}' must be one of {expected.replace(chr(39), '').replace(' or ', ', ')}, got {got}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(err.get("ctx", {}).values()), "?")
        if op == ">" and bound == 0:
            return f"'{key}' must be positive, got {got}"
        return f"'{key}' must be {op} {bound}, got {got}"
    message = str(err.get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if not key or message.startswith(("'", key.split(".")[0])):  # the message names its key already
        return message
    field = re.match(r"(\w+) must ", message)  # a section's own check naming one of its keys ("lr must be ...")
    if field:
        return f"'{key}.{field.group(1)}'{message[len(field.group(1)):]}"
    return f"'{key}': {message}"


def _model_at(model: type, path) -> type | None:
    """The pydantic model or dataclass found at ``path`` inside ``model`` (for the valid keys of a section)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        fields = getattr(current, "__pydantic_fields__", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        current = next((a for a in (annotation, *getattr(annotation, "__args__", ()))
                        if isinstance(a, type) and hasattr(a, "__pydantic_fields__")), None)
        if current is None:
            return None
    return current


def parse(model: type[M], raw: Any, error: type[ConfigError] = ConfigError, where: str = "",
          context: dict | None = None) -> M:
    """``model`` validated from ``raw``, or ``error`` with every problem (one sentence each, ``; ``-joined)."""
    if not isinstance(raw, dict):
        raise error(f"{where.rstrip('.') or 'the config'} must be a mapping of keys, got {type(raw).__name__}")
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as e:
        raise error("; ".join(describe_error(err, model, where) for err in e.errors())) from None


def load_yaml(path: str | Path, error: type[ConfigError] = ConfigError) -> dict:
    """A YAML file's top-level mapping; ``error`` naming the file when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise error(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{path} must hold a YAML mapping of keys, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, assignments: list[str], error: type[ConfigError] = ConfigError) -> dict:
    """``raw`` with ``key.path=value`` assignments applied (values parsed as YAML: 3, true, [a, b], s3://x).

    The result is validated like the file itself, so a misspelt key gets the same did-you-mean error.
    """
    out = json.loads(json.dumps(raw))  # a deep copy of plain YAML data
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise error(f"--set {assignment!r}: write key.path=value, e.g. --set training.steps=100")
        value = yaml.safe_load(text) if text.strip() else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise error(f"--set {assignment!r}: '{part}' is not a section of keys")
            node = child
        node[parts[-1]] = value
    return out

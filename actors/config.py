"""The one config system: typed pydantic models, validated once at the edge, with messages a user can act on.

Every config of the project (the training job's ``TrainJobConfig``, the serving ``ServingArgs``) is a
``StrictModel``: unknown keys are refused (with the closest valid key), types and bounds live on the
fields, cross-field rules in validators. ``parse(Model, raw, error=...)`` turns pydantic's errors into
one line per problem, each naming the key:

    'training.steps' must be an integer, got 'ten'
    unknown key 'training.bach_size' (did you mean 'batch_size'?); valid keys under training are: ...

``describe_error`` writes those sentences, and is the project's one translator of pydantic errors (the
server's request bodies use it too): what a key accepts comes from the model itself (its bounds, a
``description=``), never from a table that restates them.

Validated objects are handed on as they are (into Ray Train's ``train_loop_config``, into Serve's
``.bind()``): nothing downstream validates them again. ``--set key.path=value`` overrides work the
same for every job (``apply_overrides``).
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

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
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_LENGTH_ERRORS = ("too_short", "too_long", "string_too_short", "string_too_long")


def _shown(value: Any) -> str:
    try:
        return json.dumps(value)[:80] if not isinstance(value, str) else repr(value)[:80]
    except (TypeError, ValueError):
        return type(value).__name__


def accepted_range(bounds: dict) -> str | None:
    """Bounds (``ge``/``gt``/``le``/``lt``, as ``Field`` takes them) in words: ``between 0 and 2``, ``in (0, 1]``,
    ``>= 1``, ``positive``; None without any."""

    def number(x):
        return int(x) if isinstance(x, float) and x.is_integer() else x

    low = next(((k, number(bounds[k])) for k in ("ge", "gt") if bounds.get(k) is not None), None)
    high = next(((k, number(bounds[k])) for k in ("le", "lt") if bounds.get(k) is not None), None)
    if low and high:
        if (low[0], high[0]) == ("ge", "le"):
            return f"between {low[1]} and {high[1]}"
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    if low == ("gt", 0):
        return "positive"
    one = low or high
    return f"{_SYMBOLS[one[0]]} {one[1]}" if one else None


def _members(tp) -> list:
    return [a for a in get_args(tp) if a is not type(None)]


def _is_union(tp) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and len(_members(tp)) > 1


def _declared(tp, field: Any = None) -> tuple[Any, dict, str | None]:
    """``tp`` without Optional and Annotated, and the bounds and ``description=`` that ``field`` (a FieldInfo) and
    the Annotated metadata declare."""
    metadata, description = list(getattr(field, "metadata", [])), getattr(field, "description", None)
    while True:
        if get_origin(tp) is Annotated:
            tp, *extra = get_args(tp)
            for item in extra:  # a Field(...) carries its constraints in .metadata; annotated_types' Ge(...) is one
                metadata += getattr(item, "metadata", [item])
                description = getattr(item, "description", None) or description
        elif get_origin(tp) in (Union, types.UnionType) and len(_members(tp)) == 1:  # X | None
            tp = _members(tp)[0]
        else:
            break
    bounds = {k: getattr(m, k) for m in metadata for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None}
    return tp, bounds, description


class _Place(NamedTuple):
    loc: tuple  # of the key the error is about
    union: bool  # the key is a union, and the error is one of its branches' (under a label such as 'list[int]')
    type: Any  # declared there (without Optional and Annotated), or None past what the types say
    bounds: dict
    description: str | None


def _place(model: Any, loc: tuple) -> _Place:
    """Follow an error's ``loc`` through ``model``'s declared types to the key it is about.

    A union reports one error per branch, under the branch's label: those are about the union's key, which its
    ``description=`` words as a whole (``stop``: "a non-empty string or a list of up to 4 non-empty strings").
    """
    tp, field = model, None
    for n, part in enumerate(loc):
        core, bounds, description = _declared(tp, field)
        if _is_union(core):
            return _Place(loc[:n], True, core, bounds, description)
        fields = getattr(core, "__pydantic_fields__", None) if isinstance(core, type) else None
        origin, args = get_origin(core), get_args(core)
        if fields and isinstance(part, str) and part in fields:
            tp, field = fields[part].annotation, fields[part]
        elif isinstance(part, int) and origin in (list, tuple, set, frozenset) and args:
            tp, field = args[0], None
        elif isinstance(part, str) and origin is dict and len(args) == 2:
            tp, field = args[1], None
        else:
            return _Place(loc, False, None, {}, None)
    core, bounds, description = _declared(tp, field)
    return _Place(loc, False, core, bounds, description)


def error_key(err: dict, model: type[BaseModel] | None = None, where: str = "") -> str:
    """The key a pydantic error is about, as a user writes it: ``training.steps``, ``messages[0].role``."""
    loc = _place(model, tuple(err["loc"])).loc
    return where + ".".join(f"[{x}]" if isinstance(x, int) else str(x) for x in loc).replace(".[", "[")


def _requirement(kind: str, ctx: dict, bounds: dict) -> str | None:
    """What a type, literal, bound or length error says the key must do ("be an integer"), else None."""
    for prefix, word in _TYPE_WORDS.items():
        if kind.startswith(prefix + "_") and kind.endswith(("_type", "_parsing", "_from_float")):
            return f"be {word}"
    if kind == "literal_error":
        return f"be one of {ctx.get('expected', '').replace(chr(39), '').replace(' or ', ', ')}"
    if kind == "finite_number":
        return "be a finite number"
    if kind in _BOUND_ERRORS:
        return f"be {accepted_range({**ctx, **bounds})}"
    if kind in _LENGTH_ERRORS:
        n = ctx.get("min_length" if kind.endswith("short") else "max_length")
        unit = "character" if kind.startswith("string") else "item"
        return f"have {'at least' if kind.endswith('short') else 'at most'} {n} {unit}{'' if n == 1 else 's'}"
    return None


def describe_error(err: dict, model: type[BaseModel] | None = None, where: str = "") -> str:
    """One pydantic error as a sentence that names the key (``where`` prefixes the key path) and says what it
    accepts, from the error and ``model``'s own declarations (bounds, ``description=``), never restated:
    ``'training.steps' must be an integer, got 'ten'``, ``'temperature' must be between 0 and 2, got 7``.

    The one translator of pydantic errors, for config files (``parse``) and request bodies
    (``actors.serve.openai.errors.body_error``) alike.
    """
    place = _place(model, tuple(err["loc"]))
    key = error_key(err, model, where)
    kind, ctx, got = err["type"], err.get("ctx", {}), _shown(err.get("input"))
    if place.union:
        if place.description:
            return f"'{key}' must be {place.description}, got {got}"
        return f"'{key}': {err['msg']}, got {got}"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's / a dataclass's unknown key
        parent = _place(model, tuple(err["loc"][:-1])).type if model is not None else None
        valid = sorted(getattr(parent, "__pydantic_fields__", None) or [])
        section = key.rsplit(".", 1)[0] if "." in key else ""
        under = f" under {section}" if section else ""
        return f"unknown key '{key}'{did_you_mean(str(err['loc'][-1]), valid)}; valid keys{under} are: " \
               f"{', '.join(valid)}"
    if kind == "missing":
        return f"missing required key '{key}'"
    requirement = _requirement(kind, ctx, place.bounds)
    if requirement:
        return f"'{key}' must {'be ' + place.description if place.description else requirement}, got {got}"
    message = str(err.get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if not key or message.startswith(("'", key.split(".")[0])):  # the message names its key already
        return message
    field = re.match(r"(\w+) must ", message)  # a section's own check naming one of its keys ("lr must be ...")
    if field:
        return f"'{key.rstrip('.')}.{field.group(1)}'{message[len(field.group(1)):]}"
    if key == where:  # a check of the whole section (no key of its own): named by the section
        return f"{where.rstrip('.')}: {message}"
    return f"'{key}': {message}"


def parse(model: type[M], raw: Any, error: type[ConfigError] = ConfigError, where: str = "",
          context: dict | None = None) -> M:
    """``model`` validated from ``raw``, or ``error`` with every problem (one sentence each, ``; ``-joined)."""
    if not isinstance(raw, dict):
        raise error(f"{where.rstrip('.') or 'the config'} must be a mapping of keys, got {type(raw).__name__}")
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as e:
        sentences = [describe_error(err, model, where) for err in e.errors()]
        raise error("; ".join(dict.fromkeys(sentences))) from None  # a union's branches may say the same thing


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

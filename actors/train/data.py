"""Training data for the Ray job: files -> fixed-shape token arrays -> a Ray Dataset (-> optional activation cache).

Every example becomes three int32 rows of ``max_length`` tokens, right-padded:

* ``input_ids``      [n, max_length], pad id after the text;
* ``attention_mask`` [n, max_length], 1 on real tokens;
* ``labels``         [n, max_length], the token ids where the loss counts, -100 elsewhere
  (padding, and for ``format: prompt_completion`` the prompt).

Each augmenting model whose tokenizer differs from the anchor's reads the same text in its own tokens
(composition/alignment.py): the data then also carries, tokenised once here,

* ``aug{i}_input_ids`` / ``aug{i}_attention_mask`` [n, its longest row], left-padded (``composition.padding``);
* ``aug{i}_visible`` [n, max_length]: per anchor position, how many augmenting tokens it may attend to.

A fixed shape keeps every streamed batch the same size (no ragged tensor columns in Ray Data and
one compiled shape on a GPU); the cost is compute on padding, so set ``max_length`` near your data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from actors.codec import state_key
from actors.train.config import DATA_EXTENSIONS, TrainConfigError, TrainJobConfig
from composition.alignment import TokenizerError
from composition.checkpoint import atomic_folder, files_signature
from composition.loading import ComposedTokenizers, augment_tokenizer_source, load_tokenizer, resolve_tokenizers

TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")
MANIFEST = "manifest.json"


def read_records(cfg: TrainJobConfig):
    """The data files as one ``datasets.Dataset``; checks that the configured fields exist."""
    import datasets

    datasets.disable_progress_bars()
    kind = DATA_EXTENSIONS[Path(cfg.data.train[0]).suffix]
    try:
        records = datasets.load_dataset(kind, data_files=list(cfg.data.train), split="train")
    except Exception as e:  # noqa: BLE001 - a file datasets cannot parse is a config problem
        raise TrainConfigError(
            f"'data.train': cannot read {cfg.data.train} as {kind}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from None
    if cfg.data.format == "text":
        needed = {"data.text_field": cfg.data.text_field}
    else:
        needed = {"data.prompt_field": cfg.data.prompt_field, "data.completion_field": cfg.data.completion_field}
    for key, column in needed.items():
        if column not in records.column_names:
            raise TrainConfigError(
                f"'{key}': the data has no field {column!r} (its fields are {records.column_names}); "
                f"set '{key}' to one of them"
            )
    return records


def tokenize(cfg: TrainJobConfig, records, tokenizer, chunk: int = 1024) -> dict[str, np.ndarray]:
    """Token arrays (see the module docstring) for every usable record, in file order.

    Records that are empty, or (prompt_completion) whose completion is cut away by ``max_length``,
    are dropped; the count is printed.
    """
    d = cfg.data
    length = d.max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = [tokenizer.eos_token_id] if d.append_eos and tokenizer.eos_token_id is not None else []
    rows_ids, rows_labels = [], []
    dropped = 0
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        if d.format == "text":
            texts = [t if isinstance(t, str) else "" for t in part[d.text_field]]
            encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
            for text, ids in zip(texts, encoded):
                if not text.strip():
                    dropped += 1
                    continue
                ids = (ids + eos)[:length]
                rows_ids.append(ids)
                rows_labels.append(ids)
        else:
            prompts = tokenizer([str(p) for p in part[d.prompt_field]], add_special_tokens=True)["input_ids"]
            completions = tokenizer([str(c) for c in part[d.completion_field]], add_special_tokens=False)["input_ids"]
            for p, c in zip(prompts, completions):
                ids = (p + c + eos)[:length]
                labels = ([-100] * len(p) + c + eos)[:length]
                if not c or all(x == -100 for x in labels):
                    dropped += 1
                    continue
                rows_ids.append(ids)
                rows_labels.append(labels)
    if dropped:
        print(f"data: dropped {dropped} of {len(records)} records (empty, or no completion token within "
              f"max_length={length})", flush=True)
    n = len(rows_ids)
    input_ids = np.full((n, length), pad, dtype=np.int32)
    attention_mask = np.zeros((n, length), dtype=np.int32)
    labels = np.full((n, length), -100, dtype=np.int32)
    for r, (ids, lab) in enumerate(zip(rows_ids, rows_labels)):
        input_ids[r, : len(ids)] = ids
        attention_mask[r, : len(ids)] = 1
        labels[r, : len(lab)] = lab
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def load_tokenizers(cfg: TrainJobConfig) -> ComposedTokenizers:
    """Every model's tokenizer, by ``composition.loading.resolve_tokenizers`` (the rule serving uses too);
    a tokenizer that cannot be loaded or used is a TrainConfigError naming the key to fix."""

    def load(path: str, augment: int | None):
        key = "tokenizer" if augment is None else f"augment_tokenizers[{augment}]"
        hint = (f"save it in the augmenting model's folder or set '{key}'" if augment is not None
                else "save the tokenizer in the anchor folder or set 'tokenizer'")
        try:
            return load_tokenizer(path)
        except Exception as e:  # noqa: BLE001
            raise TrainConfigError(f"'{key}': cannot load a tokenizer from {path} ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200]}); {hint}") from None

    try:
        return resolve_tokenizers(cfg.tokenizer_path, cfg.augments, cfg.augment_tokenizers, load)
    except TokenizerError as e:  # a slow tokenizer with another vocabulary: it cannot be aligned
        raise TrainConfigError(f"'augment_tokenizers': {e}") from None


def align_columns(arrays: dict[str, np.ndarray], anchor_tokenizer, augment_tokenizers) -> dict[str, np.ndarray]:
    """The ``aug{i}_*`` columns (module docstring) of every augmenting model with its own tokenizer."""
    import torch

    from composition.alignment import Aligner

    out = {}
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    for i, tokenizer in enumerate(augment_tokenizers):
        if tokenizer is None:
            continue
        # the serving engine's and the model's own alignment, on the whole (right-padded) set at once
        aligner = Aligner(anchor_tokenizer, [tokenizer], identity_when_shared=False)
        _, (inputs,) = aligner.step(torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), None, None)
        aug_ids, aug_mask = inputs.input_ids.numpy().astype(np.int32), inputs.attention_mask.numpy().astype(np.int32)
        if aug_ids.shape[1] == 0:  # no row closed a piece: one padding column keeps the columns 2-D and non-empty
            aug_ids = np.full((len(ids), 1), aligner.augment_pad_ids[0], np.int32)
            aug_mask = np.zeros((len(ids), 1), np.int32)
        visible = inputs.visible.numpy().astype(np.int32)
        out.update({f"aug{i}_input_ids": aug_ids, f"aug{i}_attention_mask": aug_mask, f"aug{i}_visible": visible})
        print(f"data: augmenting model {i} reads its own tokens (another tokenizer): {aug_ids.shape[1]} per row at "
              f"most, {int(aug_mask.sum()) / max(1, int(mask.sum())):.2f} per anchor token", flush=True)
    return out


def prepare_examples(cfg: TrainJobConfig, anchor_vocab: int) -> dict[str, np.ndarray]:
    """Read, tokenise (once per model) and shuffle (seeded) the training data; checks there is at least one
    global batch."""
    from actors.train.config import check_tokenizer

    tokenizers = load_tokenizers(cfg)
    check_tokenizer(cfg, tokenizers.anchor, anchor_vocab)
    arrays = tokenize(cfg, read_records(cfg), tokenizers.anchor)
    arrays.update(align_columns(arrays, tokenizers.anchor, tokenizers.own))
    n = len(arrays["input_ids"])
    if n < cfg.training.batch_size:
        raise TrainConfigError(
            f"'data.train' gives {n} usable examples, fewer than one global batch "
            f"('training.batch_size' = {cfg.training.batch_size}); add data or lower the batch size"
        )
    if int(arrays["input_ids"].max()) >= anchor_vocab:
        raise TrainConfigError(
            f"'tokenizer' produced ids >= the anchor's vocabulary ({anchor_vocab}): use the models' tokenizer"
        )
    order = np.random.default_rng(cfg.training.seed).permutation(n)
    return {k: v[order] for k, v in arrays.items()}


def to_ray_dataset(arrays: dict[str, np.ndarray], rows_per_block: int, epochs: int = 1, seed: int = 0):
    """A Ray Dataset of the token arrays: ``epochs`` passes, one block per ``rows_per_block`` rows.

    Each block is put in the object store once; later passes reuse the same blocks in a new seeded
    order, so a many-epoch run costs no extra memory and streams as ONE execution (the augmenting
    actor pool starts once instead of once per epoch).
    """
    import pyarrow as pa
    import ray
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    n = len(arrays["input_ids"])
    refs = [
        ray.put(pa.table({k: ArrowTensorArray.from_numpy(np.ascontiguousarray(v[i : i + rows_per_block]))
                          for k, v in arrays.items()}))
        for i in range(0, n, rows_per_block)
    ]
    rng = np.random.default_rng(seed)
    order = list(range(len(refs)))
    for _ in range(1, epochs):
        order += [int(i) for i in rng.permutation(len(refs))]
    return ray.data.from_arrow_refs([refs[i] for i in order])


def epochs_needed(n_examples: int, steps: int, batch_size: int) -> int:
    return -(-steps * batch_size // n_examples)


# ---------------------------------------------------------------------------------- activation cache
def state_columns(links) -> list[str]:
    """The streamed columns: one per distinct (augmenting model, index) among the links."""
    return sorted({state_key(i, a) for i, a, _ in links})


def estimate_cache_bytes(n_rows: int, max_length: int, links, augment_widths: list[int], bytes_per_value: int) -> int:
    per_token = sum(augment_widths[i] * bytes_per_value for i, a in {(i, a) for i, a, _ in links})
    return n_rows * max_length * (per_token + 4 * len(TOKEN_COLUMNS))


def _files_signature(path: str) -> list:
    """Names, sizes and mtimes of a model folder's files (changes when the weights change)."""
    p = Path(path)
    if not p.exists():
        return [path]
    if p.is_file():
        return files_signature([p])
    return files_signature((f for f in p.rglob("*") if f.is_file()), root=p)


def cache_manifest(cfg: TrainJobConfig, links, dtype: str, n_rows: int) -> dict:
    """What the cached states depend on; a different manifest means the cache is rebuilt."""
    key = {
        "augments": [_files_signature(a) for a in cfg.augments],
        "links": sorted({(i, a) for i, a, _ in links}),
        "dtype": dtype,
        "data": [_files_signature(f) for f in cfg.data.train],
        "data_settings": {k: v for k, v in vars(cfg.data).items() if k != "train"},
        "tokenizer": _files_signature(cfg.tokenizer_path),
        # the tokenizer each augmenting model reads (the anchor's where its folder holds none)
        "augment_tokenizers": [_files_signature(augment_tokenizer_source(t, a) or cfg.tokenizer_path)
                               for t, a in zip(cfg.augment_tokenizers or [None] * len(cfg.augments), cfg.augments)],
        "seed": cfg.training.seed,
        "rows": n_rows,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"key": digest, "rows": n_rows, "dtype": dtype, "columns": state_columns(links)}


def cached_dataset(cfg: TrainJobConfig, manifest: dict, build):
    """The cached dataset for ``manifest``, writing it with ``build()`` (a Ray Dataset with states) first if needed.

    The shards are written to a temporary folder and renamed into place with the manifest, so an
    interrupted write is never mistaken for a cache.
    """
    import ray.data

    root = Path(cfg.activation_cache.path)
    shards = root / manifest["key"]
    if (shards / MANIFEST).is_file() and json.loads((shards / MANIFEST).read_text()) == manifest:
        print(f"activation cache: reusing {shards}", flush=True)
    else:
        with atomic_folder(shards) as tmp:
            shutil.rmtree(tmp)  # write_parquet makes the folder itself
            build().write_parquet(str(tmp))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        size = sum(f.stat().st_size for f in shards.rglob("*.parquet"))
        print(f"activation cache: wrote {size / 1e6:.1f} MB to {shards}", flush=True)
    return ray.data.read_parquet(str(shards), file_extensions=["parquet"])

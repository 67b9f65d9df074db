"""The Ray Train job (jobs/train.py) as a user drives it: configs, `ray job submit`, failures, resume.

Tiny real models (a 4-layer anchor and a 4-layer augmenting Llama sharing a character-level
tokenizer) and a prompt->completion data file are written to a temporary folder; jobs run on the
session's real Ray cluster (token auth on) through the `ray job submit` CLI. Submit-train-export to a local
folder: the cross-tokenizer job below. On two nodes with storage on S3, a killed worker's resume, a rerun that
resumes on another node and serving the exported bridges: test_s3_storage.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.fixtures import char_tokenizer, tiny

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = str(Path(sys.executable).with_name("ray"))
STEP_LINE = re.compile(r"pid=(\d+)\)\S*\s+step (\d+)/(\d+) loss")
RESUME_LINE = re.compile(r"resumed from checkpoint at step (\d+)")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Model folders, data file and a base config dict for them."""
    root = tmp_path_factory.mktemp("train_pair")
    tok = char_tokenizer()
    for name, hidden, seed in (("anchor", 64, 0), ("augment", 32, 1)):
        model = tiny("llama", hidden=hidden, layers=4, heads=4, vocab=len(tok), seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    with open(root / "train.jsonl", "w") as f:
        for k in range(64):
            f.write(json.dumps({"prompt": f"k{k}=", "completion": f"{(k * 7) % 100};"}) + "\n")
    base = {
        "anchor": str(root / "anchor"),
        "augments": [str(root / "augment")],
        "composition": {"mappings": [{"pairs": [[2, 2], [4, 4]]}]},
        "data": {"train": str(root / "train.jsonl"), "format": "prompt_completion", "max_length": 16},
        "training": {"steps": 6, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 3,
                     "log_every": 1},
        "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "augment_actors": 1, "cpus_per_augment_actor": 0.5,
                "max_failures": 2},
        "storage_path": str(root / "runs"),
    }
    return root, base


def write_config(folder: Path, base: dict, name: str, **overrides) -> Path:
    cfg = json.loads(json.dumps(base))
    for key, value in overrides.items():  # "training.steps" -> cfg["training"]["steps"]
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    cfg.setdefault("name", name)
    cfg.setdefault("output", str(folder / name / "bridges"))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


DELETE = object()


def submit(cluster, config: Path, submission_id: str) -> None:
    """`ray job submit --working-dir <repo> -- python -m jobs.train --config X` (returns once submitted).

    The entrypoint names this interpreter rather than `python`, so the job runs in the same
    environment even when the test runner's PATH does not lead to it.
    """
    deadline = time.monotonic() + 90
    while True:
        proc = cluster.run(RAY_BIN, "job", "submit", "--address", cluster.dashboard, "--submission-id",
                           submission_id, "--working-dir", str(ROOT), "--no-wait", "--", sys.executable, "-m",
                           "jobs.train", "--config", str(config), timeout=120, check=False)
        if proc.returncode == 0:
            return
        # a fresh cluster answers `ray job list` before its job agent is up: poll until it accepts jobs
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            raise AssertionError(
                f"ray job submit exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        time.sleep(0.5)


def job_client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard)


def wait_job(cluster, submission_id: str, timeout: float = 240, on_poll=None):
    """Poll until the job is terminal; returns (status, logs). ``on_poll(logs)`` runs between polls."""
    from ray.job_submission import JobStatus

    client = job_client(cluster)
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(submission_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status, client.get_job_logs(submission_id)
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            raise AssertionError(f"job {submission_id} still {status} after {timeout}s:\n"
                                 f"{client.get_job_logs(submission_id)[-4000:]}")
        if on_poll:
            on_poll(client.get_job_logs(submission_id))
        time.sleep(0.2)


def steps_in(logs: str) -> list[tuple[int, int]]:
    """(pid, step) of every progress line, in log order."""
    return [(int(m.group(1)), int(m.group(2))) for m in STEP_LINE.finditer(logs)]


def load_pair(root: Path):
    from composition.loading import load_causal_lm

    return load_causal_lm(str(root / "anchor")), [load_causal_lm(str(root / "augment"))]


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"trainig": {"steps": 3}}, r"unknown key 'trainig' \(did you mean 'training'\?\)"),
        ({"training.bach_size": 8}, r"unknown key 'training.bach_size' \(did you mean 'batch_size'\?\)"),
        ({"anchor": DELETE}, r"missing required key 'anchor'"),
        ({"anchor": "/nonexistent/anchor"}, r"'anchor': model folder /nonexistent/anchor does not exist"),
        ({"data.train": "/nonexistent/train.jsonl"}, r"'data.train\[0\]': file /nonexistent/train.jsonl does not exist"),
        ({"data.train": "/tmp/train.csv"}, r"'data.train\[0\]'.*extension '.csv'; supported are"),
        ({"composition.mappings": [{"pairs": [[9, 2]]}]},
         r"composition.mappings\[0\] \(augments\[0\]\): augment index 9 does not exist: the augmenting model has 4 layers"),
        ({"composition.mappings": [{"pairs": [[2, 7]]}]}, r"anchor index 7 does not exist: the anchor has 4 layers"),
        ({"composition.mappings": [{"every": 2}, {"every": 2}]},
         r"'composition.mappings' has 2 entries for 1 augmenting models"),
        ({"composition.gates": 1}, r"composition: unknown composition keys \['gates'\]"),
        ({"training.batch_size": 7}, r"'training.batch_size' \(7\) .* divide evenly over 'ray.num_workers' \(2\)"),
        ({"training.steps": "ten"}, r"'training.steps' must be an integer, got 'ten'"),
        ({"ray.gpus_per_augment_actor": -0.5}, r"'ray.gpus_per_augment_actor' must be >= 0"),
        ({"ray.resources_per_worker": {"GPU": 1}},
         r"'ray.resources_per_worker' names 'GPU': set 'ray.gpus_per_worker' for GPUs instead"),
        ({"ray.resources_per_augment_actor": {"CPU": 2}},
         r"'ray.resources_per_augment_actor' names 'CPU': set 'ray.cpus_per_augment_actor' for CPUs instead"),
        ({"ray.resources_per_worker": {"anchor_node": -1}}, r"'ray.resources_per_worker.anchor_node' must be >= 0"),
        ({"ray.resources_per_worker": {"anchor_node": "one"}},
         r"'ray.resources_per_worker.anchor_node' must be a number, got 'one'"),
        ({"ray.resources_per_augment_actor": ["augment_node"]},
         r"'ray.resources_per_augment_actor' must be a mapping of \{name: amount\}"),
        ({"ray.resources_per_augment_actor": {"augment_node": 1e-6}},
         r"'ray.resources_per_augment_actor.augment_node' is 1e-06: Ray counts resources in steps of 0.0001"),
        ({"data.format": "chat"}, r"'data.format' must be one of text, prompt_completion"),
        ({"data.prompt_field": "question"}, r"'data.prompt_field': the data has no field 'question'"),
        ({"training.batch_size": 128}, r"gives 64 usable examples, fewer than one global batch"),
        ({"activation_cache": {"enabled": True}}, r"'activation_cache.path' is not set"),
        ({"init_bridges": "/nonexistent/bridges"}, r"'init_bridges': /nonexistent/bridges is not a bridges checkpoint"),
        ({"training.lr": 0}, r"'training.lr' must be positive, got 0"),
        ({"training.min_lr_ratio": -1}, r"'training.min_lr_ratio' must be >= 0"),
    ],
    ids=lambda v: None if isinstance(v, str) else str(v)[:40],
)
def test_invalid_config_is_rejected_with_the_key_and_fix(pair, tmp_path, overrides, message):
    from actors.train.config import TrainConfigError
    from jobs.train import prepare

    root, base = pair
    config = write_config(tmp_path, base, "bad", **overrides)
    with pytest.raises(TrainConfigError, match=message):
        prepare(str(config))


def test_init_bridges_start_the_workers_model_from_saved_bridges_of_the_same_composition(pair, tmp_path):
    from actors.train.config import TrainConfigError
    from actors.train.worker import build_model
    from composition.model import ComposedModel
    from jobs.train import prepare

    root, base = pair
    anchor, augments = load_pair(root)
    saved = ComposedModel(anchor, augments, prepare(str(write_config(tmp_path, base, "x")))[0].composition)
    with torch.no_grad():
        for p in saved.trainable_parameters():
            p.normal_(0, 0.1)
    saved.save_pretrained(tmp_path / "saved")
    cfg = prepare(str(write_config(tmp_path, base, "warm", init_bridges=str(tmp_path / "saved"))))[0]
    model = build_model(cfg, "cpu")
    for a, b in zip(model.trainable_parameters(), saved.trainable_parameters()):
        assert torch.equal(a, b)
    other = write_config(tmp_path, base, "other", init_bridges=str(tmp_path / "saved"),
                         **{"composition.mappings": [{"pairs": [[2, 2]]}]})
    with pytest.raises(TrainConfigError, match=r"'init_bridges': .* holds bridges of another composition \(mappings"):
        prepare(str(other))
    robust = write_config(tmp_path, base, "robust", init_bridges=str(tmp_path / "saved"),
                          **{"composition.augment_norm": "robust"})
    with pytest.raises(TrainConfigError, match=r"another composition \(augment_norm differ"):
        prepare(str(robust))
    # bridges saved before a composition key existed (here augment_norm) read it as its default
    meta_file = tmp_path / "saved" / "composition_config.json"
    meta = json.loads(meta_file.read_text())
    del meta["config"]["augment_norm"]
    meta_file.write_text(json.dumps(meta))
    prepare(str(write_config(tmp_path, base, "warm_old", init_bridges=str(tmp_path / "saved"))))
    # bridges from a version with a key this one does not know: a config error naming init_bridges, no traceback
    meta["config"]["future_key"] = 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(TrainConfigError,
                       match=r"'init_bridges': .* cannot read \(unknown composition keys \['future_key'\]"):
        prepare(str(write_config(tmp_path, base, "warm_new", init_bridges=str(tmp_path / "saved"))))


def test_bad_config_fails_before_any_cluster_work(pair, tmp_path):
    """RAY_ADDRESS points at nothing: had the job touched Ray first, this would be a connection error."""
    root, base = pair
    config = write_config(tmp_path, base, "bad", **{"composition.mappings": [{"pairs": [[9, 2]]}]})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(config)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: composition.mappings[0] (augments[0]): augment index 9 does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ streaming
def test_augment_encoder_emits_only_selected_layers_as_raw_16_bit(pair):
    import numpy as np

    from actors.train.augment_pool import AugmentBatchEncoder

    root, _ = pair
    encoder = AugmentBatchEncoder([str(root / "augment")], [[2, 4]], dtype="bfloat16", device="cpu")
    batch = {"input_ids": np.full((2, 5), 7, dtype=np.int32), "attention_mask": np.ones((2, 5), dtype=np.int32),
             "labels": np.full((2, 5), 7, dtype=np.int32)}
    out = encoder(batch)
    assert sorted(out) == ["attention_mask", "aug0_2", "aug0_4", "input_ids", "labels"]
    assert out["aug0_4"].dtype == np.int16 and out["aug0_4"].shape == (2, 5, 32)  # bf16 bits, d_aug = 32


@pytest.fixture(scope="module")
def ray_client(ray_cluster):
    """This process as a Ray driver on the session cluster (for the Ray Data tests)."""
    import ray

    if ray.is_initialized():  # another module (the serving tests) left this process connected
        ray.shutdown()
    ray.init(address=ray_cluster.address)
    yield ray
    ray.shutdown()


def streamed_dataset(cfg, examples):
    from actors.train.augment_pool import with_augment_states
    from actors.train.data import to_ray_dataset

    return with_augment_states(to_ray_dataset(examples, 8), cfg.augments, [[2, 4]], "float32", batch_size=8,
                               max_actors=1, cpus_per_actor=0.5, gpus_per_actor=0)


def test_streamed_states_give_the_in_process_loss(ray_client, pair, tmp_path):
    """Same batch, fp32: bridges fed by the Ray Data actor pool == bridges fed in-process (1e-5)."""
    from actors.train.worker import build_model, decode_batch
    from jobs.train import prepare

    root, base = pair
    cfg, facts, examples = prepare(str(write_config(tmp_path, base, "equal")))
    arrays = next(iter(streamed_dataset(cfg, examples).iter_batches(batch_size=8, batch_format="numpy")))
    assert sorted(arrays) == ["attention_mask", "aug0_2", "aug0_4", "input_ids", "labels"]  # only the bridged layers
    batch = decode_batch(arrays, "float32", "cpu")

    model = build_model(cfg, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_parameters():  # bridges start as a no-op: make them read the states
            p.normal_(0, 0.2)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        in_process = model(ids, mask, labels=labels).loss
        streamed = model(ids, mask, labels=labels, augment_states=batch["augment_states"]).loss
        shuffled = [{k: v.flip(0) for k, v in batch["augment_states"][0].items()}]
        wrong = model(ids, mask, labels=labels, augment_states=shuffled).loss
    assert abs(streamed.item() - in_process.item()) <= 1e-5
    assert abs(wrong.item() - in_process.item()) > 1e-4  # the states do reach the loss


def test_activation_cache_is_written_once_and_holds_the_streamed_states(ray_client, pair, tmp_path):
    import numpy as np

    from actors.train.augment_pool import AugmentBatchEncoder
    from actors.train.data import cache_manifest, cached_dataset, estimate_cache_bytes
    from jobs.train import prepare

    root, base = pair
    config = write_config(tmp_path, base, "cached", activation_cache={"enabled": True, "path": str(tmp_path / "cache")})
    cfg, facts, examples = prepare(str(config))
    n = len(examples["input_ids"])
    manifest = cache_manifest(cfg, facts["links"], "float32", n)
    builds = []

    def build():
        builds.append(1)
        return streamed_dataset(cfg, examples)

    cached_dataset(cfg, manifest, build)
    rows = cached_dataset(cfg, manifest, build).take_batch(n, batch_format="numpy")  # second open: reused
    assert len(builds) == 1
    assert len(rows["input_ids"]) == n
    assert estimate_cache_bytes(n, 16, facts["links"], [32], 4) == sum(a.nbytes for a in rows.values())
    fresh = AugmentBatchEncoder(cfg.augments, [[2, 4]], "float32", "cpu")(
        {"input_ids": rows["input_ids"][:8], "attention_mask": rows["attention_mask"][:8]})
    for key in ("aug0_2", "aug0_4"):
        np.testing.assert_allclose(rows[key][:8], fresh[key], atol=1e-5)


# ------------------------------------------------------------------------------------------ ray job submit
def test_job_submit_without_the_token_is_refused(ray_cluster, tmp_path):
    env = {k: v for k, v in ray_cluster.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    proc = subprocess.run([RAY_BIN, "job", "submit", "--address", ray_cluster.dashboard, "--no-wait", "--",
                           "echo", "hi"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"(?i)unauthori[sz]ed|authentication|401|token", proc.stdout + proc.stderr)


# A training worker killed mid-run (rank 0, after its first checkpoint), the group restarted by Ray Train and
# resuming from that checkpoint without training any checkpointed step again; then the job rerun (same name and
# storage_path, more steps) on another node than the one that wrote the checkpoints, resuming from the last one and
# training no finished step again: tests/test_s3_storage.py (test_a_job_on_s3_pinned_to_a_node_survives_a_killed
# _worker_and_the_node_going_away_then_serves_from_s3), with the checkpoints on S3.


# ------------------------------------------------------------------------------------------ different tokenizers
@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory):
    """An anchor with the character tokenizer and an augmenting model with a byte-level BPE (tests/fixtures_xtok)."""
    from tests.fixtures_xtok import SENTENCES, byte_bpe, tiny_llama

    root = tmp_path_factory.mktemp("cross_pair")
    anchor_tok, augment_tok = char_tokenizer(chat_template=None), byte_bpe()
    tiny("llama", hidden=64, layers=4, heads=4, vocab=len(anchor_tok), seed=0).save_pretrained(root / "anchor")
    anchor_tok.save_pretrained(root / "anchor")
    tiny_llama(len(augment_tok), hidden=32, layers=4, seed=1).save_pretrained(root / "augment")
    augment_tok.save_pretrained(root / "augment")
    ascii_only = [s for s in SENTENCES if s.isascii()] * 8
    with open(root / "train.jsonl", "w") as f:
        for k, text in enumerate(ascii_only[:64]):
            f.write(json.dumps({"text": f"{k}: {text}"}) + "\n")
    base = {
        "anchor": str(root / "anchor"),
        "augments": [str(root / "augment")],
        "composition": {"mappings": [{"pairs": [[2, 2], [4, 4]]}]},
        "data": {"train": str(root / "train.jsonl"), "max_length": 48},
        "training": {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2,
                     "log_every": 1},
        "ray": {"num_workers": 1, "cpus_per_worker": 0.5, "augment_actors": 1, "cpus_per_augment_actor": 0.5},
        "storage_path": str(root / "runs"),
    }
    return root, base


def test_an_augmenting_model_with_another_tokenizer_gets_its_own_tokens_and_alignment(cross_pair, pair, tmp_path):
    from jobs.train import prepare
    from tests.fixtures_xtok import byte_bpe

    root, base = cross_pair
    _, _, examples = prepare(str(write_config(tmp_path, base, "cols")))
    ids, mask = examples["input_ids"], examples["attention_mask"]
    aug_ids, aug_mask, visible = examples["aug0_input_ids"], examples["aug0_attention_mask"], examples["aug0_visible"]
    assert visible.shape == ids.shape and aug_ids.shape == aug_mask.shape
    anchor_tok, augment_tok = char_tokenizer(chat_template=None), byte_bpe()
    for r in range(8):
        seen = visible[r]
        assert (np.diff(seen) >= 0).all() and seen[-1] <= aug_mask[r].sum()
        text = anchor_tok.decode(ids[r][mask[r].astype(bool)], skip_special_tokens=True)
        for t in np.flatnonzero(mask[r])[::5]:  # what anchor token t sees is text it has already read
            read = anchor_tok.decode(ids[r][: t + 1], skip_special_tokens=True)
            sees = augment_tok.decode(aug_ids[r][: seen[t]], skip_special_tokens=True)
            assert read.startswith(sees) and text.startswith(sees), (read, sees)
    # the same tokenizer on both sides: no extra columns (the identity alignment needs none)
    _, _, shared = prepare(str(write_config(tmp_path, pair[1], "shared")))
    assert sorted(shared) == ["attention_mask", "input_ids", "labels"]


def test_streamed_states_across_tokenizers_give_the_in_process_loss(ray_client, cross_pair, tmp_path):
    """The pipeline's alignment columns + the actor pool's states == the composed model aligning by itself (1e-5)."""
    from actors.train.worker import build_model, decode_batch
    from jobs.train import prepare

    root, base = cross_pair
    cfg, _, examples = prepare(str(write_config(tmp_path, base, "xequal")))
    arrays = next(iter(streamed_dataset(cfg, examples).iter_batches(batch_size=8, batch_format="numpy")))
    batch = decode_batch(arrays, "float32", "cpu")
    assert batch["augment_states"][0][2].shape[1] == arrays["aug0_input_ids"].shape[1]  # its own token count

    model = build_model(cfg, "cpu")  # with both tokenizers: it aligns the anchor ids itself
    assert model.aligner is not None
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 0.2)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        in_process = model(ids, mask, labels=labels).loss
        streamed = model(ids, mask, labels=labels, augment_states=batch["augment_states"],
                         augment_inputs=batch["augment_inputs"]).loss
        shuffled = [{k: v.flip(0) for k, v in batch["augment_states"][0].items()}]
        wrong = model(ids, mask, labels=labels, augment_states=shuffled, augment_inputs=batch["augment_inputs"]).loss
    assert abs(streamed.item() - in_process.item()) <= 1e-5
    assert abs(wrong.item() - in_process.item()) > 1e-4


def test_the_job_trains_bridges_across_tokenizers_that_refuse_another_tokenizer(ray_cluster, cross_pair, tmp_path):
    from ray.job_submission import JobStatus

    from composition.loading import load_causal_lm, load_tokenizer
    from composition.model import ComposedModel
    from tests.fixtures_xtok import sentencepiece_bpe

    root, base = cross_pair
    config = write_config(tmp_path, base, "xjob")
    submit(ray_cluster, config, "train-xtok")
    status, logs = wait_job(ray_cluster, "train-xtok")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "augmenting model 0 reads its own tokens" in logs
    anchor, augment = load_causal_lm(str(root / "anchor")), load_causal_lm(str(root / "augment"))
    tokenizers = [load_tokenizer(str(root / "anchor")), load_tokenizer(str(root / "augment"))]
    model = ComposedModel.from_pretrained(tmp_path / "xjob" / "bridges", anchor, [augment], tokenizers=tokenizers)
    assert any(p.abs().sum() > 0 for p in model.trainable_parameters())
    with pytest.raises(ValueError, match="tokenizer"):
        ComposedModel.from_pretrained(tmp_path / "xjob" / "bridges", anchor, [augment],
                                      tokenizers=[tokenizers[0], sentencepiece_bpe()])


def test_an_augmenting_folder_without_a_tokenizer_reads_the_anchors_tokens(pair, tmp_path):
    """As serving does (one rule, ``resolve_tokenizers``): no tokenizer files -> the anchor's tokens."""
    import shutil

    from actors.train.data import load_tokenizers
    from jobs.train import prepare

    root, base = pair
    bare = tmp_path / "augment_without_tokenizer"
    shutil.copytree(root / "augment", bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    config = write_config(tmp_path, base, "bare", augments=[str(bare)])
    cfg, _, examples = prepare(str(config))
    assert sorted(examples) == ["attention_mask", "input_ids", "labels"]
    assert load_tokenizers(cfg).shared

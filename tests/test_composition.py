"""Specification of the composition core (composition/), on tiny HF models built from configs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from composition import (
    ComposedModel,
    CompositionConfig,
    ConfigError,
    LayerMapping,
    UnsupportedModelError,
    describe_decoder,
    load_composition,
)
from composition.bridge import cross_model_mask
from composition.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from tests.fixtures import VOCAB, tiny

FAMILIES = ["llama", "gpt2", "qwen2", "gpt_neox"]
# (anchor family, augmenting family): every family is an anchor once and an augmenting model once.
PAIRS = [("llama", "gpt2"), ("gpt2", "qwen2"), ("qwen2", "gpt_neox"), ("gpt_neox", "llama")]


def anchor_model(kind="llama", seed=0):
    gqa = 2 if kind in ("llama", "qwen2") else None  # grouped-query attention where the family has it
    return tiny(kind, hidden=64, layers=6, heads=4, kv_heads=gqa, seed=seed)


def augment_model(kind="llama", seed=1):
    return tiny(kind, hidden=32, layers=4, heads=2, seed=seed)


def randomise_bridges(model: ComposedModel, seed=0):
    """Give the bridges non-zero weights, as training would, so that they change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.bridges.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def composed(anchor_kind="llama", augment_kind="llama", pairs=((0, 0), (2, 3), (4, 6)), rotary=True, trained=True):
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=list(pairs))], rotary=rotary)
    model = ComposedModel(anchor_model(anchor_kind), [augment_model(augment_kind)], cfg)
    return randomise_bridges(model) if trained else model


def tokens(batch=2, seq=12, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- 1. any HF decoder
@pytest.mark.parametrize("kind", FAMILIES)
def test_decoder_layers_are_found_in_each_family(kind):
    info = describe_decoder(anchor_model(kind))
    assert info.num_layers == 6 and len(info.layers) == 6
    assert info.hidden_size == 64 and info.num_heads == 4 and info.vocab_size == VOCAB


@pytest.mark.parametrize("anchor_kind,augment_kind", PAIRS)
def test_mixed_families_compose_and_train(anchor_kind, augment_kind):
    model = composed(anchor_kind, augment_kind, trained=False)
    ids = tokens()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert out.logits.shape == (2, 12, VOCAB)
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_encoder_decoder_model_is_rejected_with_a_clear_error():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        ComposedModel(anchor_model(), [t5])


def test_plain_module_is_rejected_with_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="no .config"):
        ComposedModel(torch.nn.Linear(2, 2), [augment_model()])


# ---------------------------------------------------------------- 2. layer mapping
def test_default_mapping_is_every_fourth_augmenting_layer_onto_evenly_spaced_anchor_layers():
    assert LayerMapping().resolve(augment_layers=8, anchor_layers=16) == [(4, 8), (8, 16)]
    assert LayerMapping(every=2).resolve(augment_layers=8, anchor_layers=12) == [(2, 3), (4, 6), (6, 9), (8, 12)]


def test_explicit_pairs_are_used_as_given():
    model = composed(pairs=[(0, 0), (4, 6)])
    assert [(link.augment_index, link.anchor_index) for link in model.links] == [(0, 0), (4, 6)]


@pytest.mark.parametrize(
    "mapping,message",
    [
        (LayerMapping(pairs=[(5, 1)]), r"augment index 5 does not exist.*0 \(embeddings\) to 4"),
        (LayerMapping(pairs=[(1, 7)]), r"anchor index 7 does not exist.*0 \(before its first layer\) to 6"),
        (LayerMapping(every=9), r"every=9 selects no layer"),
    ],
)
def test_invalid_mappings_say_what_is_valid(mapping, message):
    with pytest.raises(ConfigError, match=message):
        ComposedModel(anchor_model(), [augment_model()], CompositionConfig(mappings=[mapping]))


def test_mapping_count_must_match_augmenting_models():
    with pytest.raises(ConfigError, match="2 layer mappings for 1 augmenting"):
        ComposedModel(anchor_model(), [augment_model()], CompositionConfig(mappings=[LayerMapping(), LayerMapping()]))


def test_unknown_config_keys_are_rejected():
    with pytest.raises(ConfigError, match=r"unknown composition keys \['heads'\]"):
        CompositionConfig.from_dict({"heads": 4})


# ---------------------------------------------------------------- 3. bridges start at the anchor
@pytest.mark.parametrize("anchor_kind,augment_kind", PAIRS)
def test_initial_composed_logits_equal_the_anchors(anchor_kind, augment_kind):
    model = composed(anchor_kind, augment_kind, trained=False)
    ids = tokens()
    with torch.no_grad():
        expected = model.anchor(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_trained_bridges_change_the_logits_at_input_and_output_sites():
    ids = tokens()
    for pairs in ([(0, 0)], [(4, 6)]):  # before the anchor's first layer; after its last layer
        model = composed(pairs=pairs)
        with torch.no_grad():
            assert (model(ids).logits - model.anchor(ids).logits).abs().max() > 1e-3


def test_anchor_called_alone_after_composition_gives_its_own_outputs():
    model = composed()
    ids = tokens()
    fresh = anchor_model()
    with torch.no_grad():
        model(ids)
        torch.testing.assert_close(model.anchor(ids).logits, fresh(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- 4. causal across models, padding
@pytest.mark.parametrize("rotary", [False, True])
def test_changing_later_tokens_leaves_earlier_logits_unchanged(rotary):
    model = composed(rotary=rotary)
    ids = tokens(seq=12)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("anchor_kind,augment_kind", PAIRS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_and_unpadded_batches_agree_on_real_tokens(anchor_kind, augment_kind, side):
    model = composed(anchor_kind, augment_kind)
    long, short = tokens(1, 10, seed=1), tokens(1, 6, seed=2)
    pad = torch.zeros(1, 4, dtype=torch.long)
    padded = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
    mask = (padded != 0).long()
    with torch.no_grad():
        batch = model(torch.cat([long, padded]), torch.cat([torch.ones_like(long), mask])).logits
        alone_long, alone_short = model(long).logits, model(short).logits
    real = mask[0].bool()
    torch.testing.assert_close(batch[0], alone_long[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[1][real], alone_short[0], rtol=0, atol=1e-5)


def test_padding_is_ignored_by_the_loss():
    model = composed()
    short = tokens(1, 6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)
    with torch.no_grad():
        alone = model(short, labels=short).loss
        with_pad = model(padded, (padded != 0).long(), labels=padded).loss
    torch.testing.assert_close(alone, with_pad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("anchor_kind,augment_kind", PAIRS)
def test_loss_on_labelled_positions_only_equals_the_full_loss_and_its_gradients(anchor_kind, augment_kind):
    """The trainer's labelled_logits_only path: the LM head runs only where a label is predicted."""
    ids = tokens(3, 12)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    labels = torch.full_like(ids, -100)
    labels[0, 5:9] = ids[0, 5:9]  # completion-only labels at different places per row
    labels[1, 9:] = ids[1, 9:]
    labels[2, 6:8] = ids[2, 6:8]
    results = []
    for only in (False, True):
        model = composed(anchor_kind, augment_kind)
        out = model(ids, mask, labels=labels, labelled_logits_only=only)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.trainable_parameters()]))
    (full, full_grads), (kept, kept_grads) = results
    torch.testing.assert_close(kept.loss, full.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(kept_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    labelled = int((labels[:, 1:] != -100).sum())  # padding is not labelled here
    assert kept.logits.shape == (1, labelled, full.logits.shape[-1])  # the LM head saw labelled positions only
    assert full.logits.shape[:2] == ids.shape


def test_loss_on_labelled_positions_of_a_plain_lm_equals_its_own_loss():
    """The experiments' PlainLM (their plain models and LoRA baselines train through it) uses the same path."""
    from experiments.common import PlainLM

    ids = tokens(2, 10)
    labels = torch.full_like(ids, -100)
    labels[0, 4:] = ids[0, 4:]
    labels[1, 7:] = ids[1, 7:]
    model = PlainLM(anchor_model())
    own = model(ids, labels=labels).loss
    kept = model(ids, labels=labels, labelled_logits_only=True)
    torch.testing.assert_close(kept.loss, own, rtol=1e-5, atol=1e-6)
    assert kept.logits.shape[:2] == (1, 9)


# ---------------------------------------------------------------- 5. frozen bases
def test_only_bridges_train_and_base_weights_stay_bit_identical():
    model = composed(trained=False)
    before = {k: v.clone() for k, v in list(model.anchor.state_dict().items()) + [
        (f"aug.{k}", v) for k, v in model.augments[0].state_dict().items()]}
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all((p.requires_grad == (id(p) in trainable)) for p in model.parameters())
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        ids = tokens(seed=step)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(list(model.anchor.state_dict().items()) + [
        (f"aug.{k}", v) for k, v in model.augments[0].state_dict().items()])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.anchor.training and not model.augments[0].training
    assert model.bridges[0].o.weight.abs().sum() > 0  # the bridges did move


# ---------------------------------------------------------------- 6. several augmenting models
def test_several_augmenting_models_each_with_its_own_mapping():
    augments = [augment_model("llama", seed=1), tiny("gpt2", hidden=48, layers=2, heads=2, seed=3)]
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (4, 6)]), LayerMapping(pairs=[(2, 3)])])
    model = randomise_bridges(ComposedModel(anchor_model(), augments, cfg))
    assert [(link.augment, link.augment_index, link.anchor_index) for link in model.links] == [
        (0, 0, 0), (0, 4, 6), (1, 2, 3)]
    assert model.bridges[2].proj.in_features == 48
    ids = tokens()
    with torch.no_grad():
        both = model(ids).logits
        torch.nn.init.zeros_(model.bridges[2].o.weight)  # silence the second model's bridge
        first_only = model(ids).logits
    assert (both - first_only).abs().max() > 1e-3
    assert torch.equal(model.generate(ids, max_new_tokens=5), model.generate(ids, max_new_tokens=5, use_cache=False))


# ---------------------------------------------------------------- 7. generation with caches
@pytest.mark.parametrize("anchor_kind,augment_kind", PAIRS)
def test_cached_greedy_decoding_equals_full_recomputation(anchor_kind, augment_kind):
    model = composed(anchor_kind, augment_kind)
    ids = tokens(2, 8)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # one left-padded row
    cached = model.generate(ids, mask, max_new_tokens=10)
    full = model.generate(ids, mask, max_new_tokens=10, use_cache=False)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, full)


def test_batched_generation_equals_each_prompt_alone():
    model = composed()
    a, b = tokens(1, 9, seed=1), tokens(1, 5, seed=2)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])  # right padded on input
    mask = (torch.arange(9)[None] < torch.tensor([[9], [5]])).long()
    together = model.generate(batch, mask, max_new_tokens=6)
    assert torch.equal(together[0], model.generate(a, max_new_tokens=6)[0])
    assert torch.equal(together[1, 4:], model.generate(b, max_new_tokens=6)[0])


def test_each_decode_step_runs_each_model_on_one_token():
    model = composed()
    seen = {"anchor": [], "augment": []}
    model.anchor_info.layers[0].register_forward_pre_hook(lambda m, a, k: seen["anchor"].append(a[0].shape[1]), with_kwargs=True)
    model.encoders[0].info.layers[0].register_forward_pre_hook(lambda m, a, k: seen["augment"].append(a[0].shape[1]), with_kwargs=True)
    model.generate(tokens(1, 7), max_new_tokens=4)
    assert seen["anchor"] == [7, 1, 1, 1] and seen["augment"] == [7, 1, 1, 1]


def test_eos_stops_a_row_and_pads_after_it():
    model = composed()
    ids = tokens(1, 6)
    greedy = model.generate(ids, max_new_tokens=6)
    first = int(greedy[0, 6])
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=first, pad_token_id=0)
    assert stopped.shape[1] == 7 and int(stopped[0, 6]) == first


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    model = composed()
    ids = tokens(2, 6)
    s1 = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    s2 = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    greedy = model.generate(ids, max_new_tokens=8)
    top1 = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, seed=3)
    tiny_p = model.generate(ids, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=3)
    assert torch.equal(s1, s2) and not torch.equal(s1, greedy)
    assert torch.equal(top1, greedy) and torch.equal(tiny_p, greedy)


def test_bad_generation_arguments_are_rejected():
    model = composed()
    with pytest.raises(ValueError, match="top_p"):
        model.generate(tokens(), top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(tokens(), max_new_tokens=-1)


# ---------------------------------------------------------------- 8. bridge-only checkpoints
def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = composed()
    model.save_pretrained(tmp_path / "bridges")
    files = sorted(p.name for p in (tmp_path / "bridges").iterdir())
    assert files == sorted([CONFIG_FILE, WEIGHTS_FILE])
    saved = load_file(str(tmp_path / "bridges" / WEIGHTS_FILE))
    assert sum(t.numel() for t in saved.values()) == model.num_bridge_parameters()
    assert all(k.split(".")[1] in {"augment_norm", "query_norm", "proj", "q", "k", "v", "o"} for k in saved)
    loaded = ComposedModel.from_pretrained(tmp_path / "bridges", anchor=anchor_model(), augments=[augment_model()])
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_checkpoint_refuses_a_different_anchor(tmp_path):
    composed().save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="trained for the anchor LlamaForCausalLM with weights_sha256"):
        ComposedModel.from_pretrained(tmp_path / "b", anchor=anchor_model(seed=5), augments=[augment_model()])
    with pytest.raises(ValueError, match="augmenting model 0 LlamaForCausalLM with hidden_size=32"):
        ComposedModel.from_pretrained(tmp_path / "b", anchor=anchor_model(),
                                      augments=[tiny("llama", hidden=48, layers=4, heads=2)])


def test_checkpoint_accepts_a_dtype_cast_of_the_same_models(tmp_path):
    composed().save_pretrained(tmp_path / "b")
    ComposedModel.from_pretrained(tmp_path / "b", anchor=anchor_model().bfloat16(), augments=[augment_model()])


def test_overwriting_a_checkpoint_is_atomic(tmp_path):
    model = composed()
    model.save_pretrained(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    assert meta["format"] == "calm-ray-bridges" and meta["bridge_parameters"] == model.num_bridge_parameters()
    model.save_pretrained(tmp_path / "b")  # replace in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folders left behind


def test_missing_checkpoint_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected composition_config.json and bridges.safetensors"):
        ComposedModel.from_pretrained(tmp_path, anchor=anchor_model(), augments=[augment_model()])


# ---------------------------------------------------------------- 9. loading by id or path
def test_load_composition_from_local_folders_freezes_the_bases(tmp_path):
    anchor_model().save_pretrained(tmp_path / "anchor")
    augment_model().save_pretrained(tmp_path / "augment")
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (4, 6)])])
    model = load_composition(str(tmp_path / "anchor"), [str(tmp_path / "augment")], cfg, dtype="float32")
    assert not model.anchor.training and not any(p.requires_grad for p in model.anchor.parameters())
    model = randomise_bridges(model)
    model.save_pretrained(tmp_path / "bridges")
    again = load_composition(str(tmp_path / "anchor"), [str(tmp_path / "augment")], bridges=str(tmp_path / "bridges"))
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- the shared training loop
def test_trainer_lowers_the_loss_and_resumes_exactly(tmp_path):
    from composition.training import BridgeTrainer, TrainSettings

    settings = TrainSettings(lr=3e-3, steps=8, warmup_steps=2)
    batches = [tokens(4, 10, seed=s) for s in range(8)]
    straight = BridgeTrainer(composed(trained=False), settings)
    losses = [straight.step({"input_ids": b})["loss"] for b in batches]
    assert losses[-1] < losses[0]

    first = BridgeTrainer(composed(trained=False), settings)
    for b in batches[:4]:
        first.step({"input_ids": b})
    first.save(tmp_path / "ckpt")
    resumed = BridgeTrainer(composed(trained=False), settings)
    assert resumed.load(tmp_path / "ckpt")["step"] == 4
    for b in batches[4:]:
        resumed.step({"input_ids": b})
    for a, b in zip(straight.params, resumed.params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ComposedModel.from_pretrained(tmp_path / "ckpt" / "bridges", anchor_model(), [augment_model()])


def test_window_one_bridge_reads_only_the_same_token():
    model = composed(pairs=[(2, 6), (4, 6)], rotary=False)  # after the anchor's last layer: no mixing after
    model.config.window = 1
    ids = tokens(1, 10)
    with torch.no_grad():
        base = model(ids).logits
        # anchor position 5 must not change when augmenting states at other positions change
        states, _ = model.encode_augments(ids, torch.ones_like(ids), torch.arange(10)[None])
        for index in states[0]:
            states[0][index] = states[0][index].clone()
            states[0][index][:, :5] += 3.0
        moved = model(ids, augment_states=states).logits
    assert (moved[:, :5] - base[:, :5]).abs().max() > 1e-3
    torch.testing.assert_close(moved[:, 5], base[:, 5], rtol=0, atol=1e-6)
    assert torch.equal(model.generate(ids, max_new_tokens=5), model.generate(ids, max_new_tokens=5, use_cache=False))


def starts_at_the_anchor_trains_and_round_trips(model: ComposedModel, tmp_path) -> ComposedModel:
    """``model`` (on anchor_model() and augment_model()) equals its anchor at initialisation; with random bridges
    it differs, and save_pretrained + from_pretrained give it back exactly. Returns the loaded model."""
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model.anchor(ids).logits, rtol=0, atol=1e-6)
    randomise_bridges(model)
    with torch.no_grad():
        trained = model(ids).logits
    assert (trained - model.anchor(ids).logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "bridges")
    loaded = ComposedModel.from_pretrained(tmp_path / "bridges", anchor_model(), [augment_model()])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained, rtol=0, atol=0)
    return loaded


def test_mlp_projection_starts_at_the_anchor_trains_and_round_trips(tmp_path):
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (4, 6)])], window=1, proj_hidden=48)
    model = ComposedModel(anchor_model(), [augment_model()], cfg)
    assert isinstance(model.bridges[0].proj, torch.nn.Sequential) and model.bridges[0].proj[0].out_features == 48
    loaded = starts_at_the_anchor_trains_and_round_trips(model, tmp_path)
    assert loaded.config.proj_hidden == 48
    with pytest.raises(ConfigError, match="proj_hidden must be a positive integer"):
        CompositionConfig(proj_hidden=0)


def test_the_robust_augment_norm_reads_past_a_massive_channel_and_round_trips(tmp_path):
    """augment_norm: robust. A state whose one channel is 1000x the others (as Gemma-3's layer 9 has): RMSNorm
    leaves the other channels over 30x smaller than without that channel; RobustNorm leaves them at their scale
    and direction, and clips the massive one. A composed model with it starts at the anchor, and its config and
    weights round-trip."""
    from composition.bridge import RMSNorm, RobustNorm

    torch.manual_seed(0)
    x = torch.randn(64, 512)
    spiked = x.clone()
    spiked[:, 7] = 1000.0
    others = [c for c in range(512) if c != 7]
    with torch.no_grad():
        plain = RMSNorm(512)(x)[:, others]
        assert RMSNorm(512)(spiked)[:, others].abs().median() < plain.abs().median() / 30
        robust = RobustNorm(512)(spiked)
    expected = 4.0 * torch.tanh(plain / 4.0)  # the median estimates a row's scale to a few percent, not exactly
    assert 0.9 < float(robust[:, others].abs().median() / expected.abs().median()) < 1.1
    assert torch.nn.functional.cosine_similarity(robust[:, others], expected, dim=-1).min() > 0.999
    assert robust[:, 7].max() <= 4.0

    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (4, 6)])], augment_norm="robust")
    model = ComposedModel(anchor_model(), [augment_model()], cfg)
    assert all(isinstance(b.augment_norm, RobustNorm) for b in model.bridges)
    loaded = starts_at_the_anchor_trains_and_round_trips(model, tmp_path)
    assert loaded.config.augment_norm == "robust"
    with pytest.raises(ConfigError, match="augment_norm must be 'rms' or 'robust'"):
        CompositionConfig(augment_norm="layer")


# ---------------------------------------------------------------- deferred augmenting states
# (a serving engine passes a callable, so the anchor's layers below the first bridge run while the
# augmenting states are still on their way)
def decode_with_external_states(model, ids, mask, steps, deferred, calls=None):
    """Prefill then greedy decode steps with augmenting states computed outside the model (as a server does).

    Returns (per-step last logits, the final CompositionCache). ``calls`` collects one entry per fetch
    of deferred states: ``states (augment, index)``.
    """
    from composition.model import positions_from_mask

    logits, cache, augment_caches = [], None, None
    new_ids, new_mask = ids, mask
    with torch.no_grad():
        for _ in range(steps + 1):
            past = cache.seq_len if cache is not None else 0
            full = new_mask if cache is None else torch.cat([cache.attention_mask, new_mask], dim=1)
            positions = positions_from_mask(full)[:, past:]
            states, augment_caches = model.encode_augments(new_ids, full, positions, augment_caches, use_cache=True)

            def fetch(augment, index, states=states):
                if calls is not None:
                    calls.append(f"states {augment} {index}")
                return states[augment][index]

            out = model(new_ids, new_mask, augment_states=fetch if deferred else states, cache=cache,
                        use_cache=True, logits_to_keep=1)
            cache = out.cache
            logits.append(out.logits[:, -1])
            new_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            new_mask = torch.ones_like(new_ids)
    return logits, cache


@pytest.mark.parametrize("pairs", [((0, 2), (2, 3), (4, 6)), ((0, 0), (4, 6))])
def test_deferred_states_give_the_logits_and_caches_of_eager_states_over_decode_steps(pairs):
    model = composed(pairs=pairs)
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    eager_logits, eager = decode_with_external_states(model, ids, mask, steps=5, deferred=False)
    deferred_logits, deferred = decode_with_external_states(model, ids, mask, steps=5, deferred=True)
    for a, b in zip(eager_logits, deferred_logits):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert torch.equal(deferred.attention_mask, eager.attention_mask)
    for a, b in zip(eager.bridge_keys + eager.bridge_values, deferred.bridge_keys + deferred.bridge_values):
        assert a.shape == b.shape == (2, 4, 9 + 5, 16) and torch.equal(a, b)
    for a, b in zip(eager.anchor.layers, deferred.anchor.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_deferred_states_are_fetched_bridge_by_bridge_each_after_the_layers_below_it():
    # (augment index, anchor index): bridge sites at the inputs of anchor layers 2, 3 and 6 (the last one's output)
    model = composed(pairs=((0, 2), (2, 3), (4, 6)))
    events = []
    layers = describe_decoder(model.anchor).layers
    handles = [layer.register_forward_hook(lambda *_, i=i: events.append(f"layer {i}")) for i, layer in
               enumerate(layers)]
    try:
        decode_with_external_states(model, tokens(1, 6), torch.ones(1, 6, dtype=torch.long), steps=3,
                                    deferred=True, calls=events)
    finally:
        for h in handles:
            h.remove()
    # the last site is a forward hook on layer 5, registered before this test's: it runs first
    one_forward = ["layer 0", "layer 1", "states 0 0", "layer 2", "states 0 2", "layer 3", "layer 4", "states 0 4",
                   "layer 5"]
    assert events == one_forward * 4  # the prefill and 3 decode steps


def test_an_error_raised_by_deferred_states_propagates_and_leaves_the_model_usable():
    model = composed()
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits

    def unreachable(augment, index):
        raise RuntimeError("augmenting replica unreachable")

    with torch.no_grad(), pytest.raises(RuntimeError, match="augmenting replica unreachable"):
        model(ids, augment_states=unreachable)
    assert model._running is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_deferred_states_of_the_wrong_shape_are_refused_like_eager_ones():
    model = composed()
    ids = tokens(2, 12)
    states, _ = model.encode_augments(ids[:, :5], torch.ones(2, 5, dtype=torch.long), torch.arange(5)[None])
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"augment_states\[0\]\[0\] has shape \(2, 5, 32\), expected \(2, 12, 32\)"):
            model(ids, augment_states=states)
        with pytest.raises(ValueError, match=r"augment_states\(0, 0\) gave \(2, 5, 32\), expected \(2, 12, 32\)"):
            model(ids, augment_states=lambda augment, index: states[augment][index])


def test_gated_bridges_start_at_the_anchor_and_the_gate_reads_the_anchor_state(tmp_path):
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (2, 3)])], window=1, proj_hidden=32, gate=True)
    model = ComposedModel(anchor_model(), [augment_model()], cfg)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model.anchor(ids).logits, rtol=0, atol=1e-6)
    randomise_bridges(model)
    with torch.no_grad():
        gated = model(ids).logits
        for bridge in model.bridges:
            bridge.gate.bias.fill_(-1e4)  # a closed gate: the anchor alone again
        torch.testing.assert_close(model(ids).logits, model.anchor(ids).logits, rtol=0, atol=1e-6)
    assert (gated - model.anchor(ids).logits).abs().max() > 1e-3
    randomise_bridges(model)
    model.save_pretrained(tmp_path / "bridges")
    loaded = ComposedModel.from_pretrained(tmp_path / "bridges", anchor_model(), [augment_model()])
    assert loaded.config.gate and loaded.bridges[0].gate.out_features == model.bridges[0].num_heads
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_retrieved_gate_depends_only_on_the_augmenting_side_and_closes_like_the_anchor_gate(tmp_path):
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(0, 0), (2, 3)])], window=1, proj_hidden=32, gate="retrieved")
    model = ComposedModel(anchor_model(), [augment_model()], cfg)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model.anchor(ids).logits, rtol=0, atol=1e-6)
    randomise_bridges(model)
    bridge = model.bridges[0]
    h_aug = torch.randn(2, 5, 32)
    keys, values = bridge.keys_values(h_aug, torch.arange(5).expand(2, 5))
    mask = cross_model_mask(torch.ones(2, 5, dtype=torch.bool), 0, 5, window=1)
    with torch.no_grad():
        a = bridge(torch.randn(2, 5, 64), keys, values, mask, torch.arange(5).expand(2, 5))
        b = bridge(torch.randn(2, 5, 64), keys, values, mask, torch.arange(5).expand(2, 5))
    # window 1: the head reads one augmenting token, so neither what it adds nor its gate depends on the anchor
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with torch.no_grad():
        for br in model.bridges:
            br.gate_retrieved[:, -1].fill_(-1e4)  # closed
        torch.testing.assert_close(model(ids).logits, model.anchor(ids).logits, rtol=0, atol=1e-6)
    randomise_bridges(model)
    model.save_pretrained(tmp_path / "bridges")
    loaded = ComposedModel.from_pretrained(tmp_path / "bridges", anchor_model(), [augment_model()])
    assert loaded.config.gate == "retrieved" and loaded.bridges[0].gate is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_gate_must_be_a_known_kind():
    with pytest.raises(ConfigError, match="gate must be"):
        CompositionConfig(gate="sometimes")


def test_a_stack_of_compositions_gives_each_row_its_own_compositions_logits(tmp_path):
    """``ComposedModel.stack`` in plain torch: rows of two compositions and of the bare anchor in one forward
    each get the logits of their own model run alone."""
    from composition.loading import load_causal_lm
    from tests.fixtures import build_pair, write_augment, write_bridges

    pair = build_pair(tmp_path)
    other = write_augment(tmp_path / "other", pair.anchor)
    spec = {"a": (pair.augment, pair.bridges), "b": (other, write_bridges(tmp_path / "b", pair.anchor, other, 4))}

    def load(anchor, name):
        return ComposedModel.from_pretrained(spec[name][1], anchor, [load_causal_lm(spec[name][0])])

    anchor = load_causal_lm(pair.anchor)
    stack = ComposedModel.stack({name: load(anchor, name) for name in spec})
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    out = stack(ids, row_bridges=stack.bridges_of(["a", "b", None])).logits
    alone = {name: load(load_causal_lm(pair.anchor), name) for name in spec}
    torch.testing.assert_close(out[0], alone["a"](ids[:1]).logits[0])
    torch.testing.assert_close(out[1], alone["b"](ids[1:2]).logits[0])
    torch.testing.assert_close(out[2], alone["a"].anchor(ids[2:]).logits[0])  # no bridge: the anchor's own
    assert not torch.allclose(out[0], alone["b"](ids[:1]).logits[0])  # the two compositions differ

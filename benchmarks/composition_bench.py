"""What composition costs on CPU: composed forward and cached decoding against the bare models.

    python -m benchmarks.composition_bench --out results/composition_bench.json

Models (random weights, built from configs, fp32):
    anchor      Llama d=512, 8 layers, 8 heads (4 kv heads), MLP 1536, vocab 8192
    augmenting  Llama d=256, 4 layers, 4 heads (2 kv heads), MLP 768, vocab 8192
    bridges     LayerMapping(every=2): augmenting indices 2, 4 -> anchor indices 4, 8 (two bridges),
                rotary on, weights randomised (non-zero, so no zero-output shortcut is measured)

Figures (timed under torch.no_grad with warmup; median of repeated runs; the composed model and its
baselines are timed interleaved, rep by rep, so machine noise hits both sides alike):
    1. forward ratio: composed forward / (anchor forward + augmenting forward), 256 tokens, all logits
    2. decode ratio: composed cached step / (anchor cached step + augmenting cached step), one token
       at 64 and 1024 tokens of context; the baselines are the bare HF models with their own
       DynamicCache, no attention mask, last-position logits only
    3. generate speed-up: uncached / cached ``ComposedModel.generate``, prompt 32 + 480 new tokens
    4. context scaling: composed per-token decode time at 1024 context / at 64 context

Timing runs on ``--threads`` torch threads (1 by default, reported in the JSON).
The augmenting baseline is its base model (no LM head): the composition never runs the augmenting
LM head, so charging the baseline for it would flatter the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from composition import ComposedModel, CompositionConfig, LayerMapping
from composition.checkpoint import atomic_file  # noqa: E402

CONTEXTS = (64, 1024)  # decode figures: tokens of context
TARGETS = {
    "forward_ratio": 1.10,
    "decode_ratio_ctx64": 1.20,
    "decode_ratio_ctx1024": 1.20,
    "context_scaling_1024_over_64": 1.50,
}


# ---------------------------------------------------------------- models
def llama(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, seed: int):
    """A random-weight Llama (fp32, eval, sdpa); MLP width is Llama's 8/3 * d rounded up to 256."""
    mlp = -(-(8 * hidden // 3) // 256) * 256
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()


def randomise_bridges(model: ComposedModel, seed: int = 0, std: float = 0.02) -> None:
    """Give every bridge matrix (the zero-initialised output included) random weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.bridges.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build(args) -> tuple[ComposedModel, torch.nn.Module, torch.nn.Module]:
    anchor = llama(512, 8, 8, 4, args.vocab, seed=0)
    augment = llama(256, 4, 4, 2, args.vocab, seed=1)
    cfg = CompositionConfig(mappings=[LayerMapping(every=args.every)], rotary=args.rotary)
    model = ComposedModel(anchor, [augment], cfg)
    randomise_bridges(model)
    return model, anchor, augment


# ---------------------------------------------------------------- timing
def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict, warmup: int, reps: int) -> dict[str, list[float]]:
    """Run each fn ``warmup`` times, then ``reps`` rounds of one call each; seconds per call.

    The order within a round rotates, so no side always runs first (or right after another).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times = {name: [] for name in fns}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(fns[name]))
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def round_ratio(times: dict[str, list[float]]) -> float:
    """Median over rounds of composed / (anchor + augmenting) within the round (robust to slow drift)."""
    return med([c / (a + b) for c, a, b in zip(times["composed"], times["anchor"], times["augment"])])


def wait_quiet(seconds: float, threshold: float = 0.5) -> float:
    """Wait up to ``seconds`` for the 1-minute load average to drop below ``threshold``; returns it."""
    deadline = time.monotonic() + seconds
    load = os.getloadavg()[0]
    while load >= threshold and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- figures
def forward_figures(model, anchor, augment, batch, seq, args) -> dict:
    ids = tokens(batch, seq, args.vocab)
    mask = torch.ones_like(ids)
    augment_base = model.encoders[0].info.base
    times = interleaved(
        {
            "composed": lambda: model(ids, mask),
            "anchor": lambda: anchor(input_ids=ids, attention_mask=mask),
            "augment": lambda: augment_base(input_ids=ids, attention_mask=mask),
        },
        args.warmup,
        args.forward_reps,
    )
    composed, a, b = med(times["composed"]), med(times["anchor"]), med(times["augment"])
    return {
        "batch": batch,
        "tokens": seq,
        "composed_ms": composed * 1e3,
        "anchor_ms": a * 1e3,
        "augment_ms": b * 1e3,
        "ratio": composed / (a + b),
        "ratio_per_round_median": round_ratio(times),
    }


def decode_figures(model, anchor, augment, batch, context, args) -> dict:
    """Median time of one cached decode step at ``context`` tokens, composed vs the bare models.

    Each side prefills ``context`` tokens, then decodes warmup + reps steps (the context grows by one
    per step, identically on every side).
    """
    ids = tokens(batch, context, args.vocab)
    step = tokens(batch, 1, args.vocab, seed=1)
    ones = torch.ones_like(step)
    augment_base = model.encoders[0].info.base

    state = {"composed": model(ids, use_cache=True, logits_to_keep=1).cache}
    state["anchor"] = anchor(input_ids=ids, cache=DynamicCache(config=anchor.config), use_cache=True, logits_to_keep=1).cache
    state["augment"] = augment_base(input_ids=ids, cache=DynamicCache(config=augment.config), use_cache=True).cache

    def composed():
        state["composed"] = model(step, ones, cache=state["composed"], use_cache=True, logits_to_keep=1).cache

    def anchor_step():
        state["anchor"] = anchor(input_ids=step, cache=state["anchor"], use_cache=True, logits_to_keep=1).cache

    def augment_step():
        state["augment"] = augment_base(input_ids=step, cache=state["augment"], use_cache=True).cache

    times = interleaved(
        {"composed": composed, "anchor": anchor_step, "augment": augment_step}, args.warmup, args.decode_reps
    )
    composed_s, a, b = med(times["composed"]), med(times["anchor"]), med(times["augment"])
    return {
        "batch": batch,
        "context": context,
        "steps_timed": args.decode_reps,
        "composed_ms": composed_s * 1e3,
        "anchor_ms": a * 1e3,
        "augment_ms": b * 1e3,
        "ratio": composed_s / (a + b),
        "ratio_per_round_median": round_ratio(times),
    }


def generate_figures(model, batch, args) -> dict:
    ids = tokens(batch, args.prompt, args.vocab, seed=2)
    new = args.total - args.prompt
    model.generate(ids, max_new_tokens=8)  # warm up both paths
    model.generate(ids, max_new_tokens=8, use_cache=False)
    cached, uncached = [], []
    for i in range(max(args.generate_reps, args.uncached_reps)):  # alternate, so a busy spell hits both
        if i < args.generate_reps:
            cached.append(timed(lambda: model.generate(ids, max_new_tokens=new)))
        if i < args.uncached_reps:
            uncached.append(timed(lambda: model.generate(ids, max_new_tokens=new, use_cache=False)))
    same = torch.equal(model.generate(ids, max_new_tokens=32), model.generate(ids, max_new_tokens=32, use_cache=False))
    return {
        "batch": batch,
        "prompt": args.prompt,
        "new_tokens": new,
        "cached_s": med(cached),
        "uncached_s": med(uncached),
        "cached_tokens_per_s": batch * new / med(cached),
        "uncached_tokens_per_s": batch * new / med(uncached),
        "speedup": med(uncached) / med(cached),
        "first_32_tokens_identical": same,
    }


# ---------------------------------------------------------------- report
def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()),
    }


def table(figures: dict, batch: int) -> list[dict]:
    f = figures[f"batch{batch}"]
    rows = [
        ("forward ratio, 256 tokens", f["forward"]["ratio"], "forward_ratio", "<="),
        ("decode ratio, 64 context", f["decode"]["64"]["ratio"], "decode_ratio_ctx64", "<="),
        ("decode ratio, 1024 context", f["decode"]["1024"]["ratio"], "decode_ratio_ctx1024", "<="),
        ("per-token time 1024 / 64 context", f["context_scaling_1024_over_64"], "context_scaling_1024_over_64", "<="),
    ]
    out = [
        {"figure": name, "value": value, "target": f"<= {TARGETS[key]:.2f}", "pass": value <= TARGETS[key]}
        for name, value, key, _ in rows
    ]
    if "generate" in f:
        out.append({"figure": "generate speed-up, cached vs uncached", "value": f["generate"]["speedup"],
                    "target": "report", "pass": None})
    return out


def markdown(result: dict) -> str:
    lines = []
    for batch in result["settings"]["batches"]:
        f = result["figures"][f"batch{batch}"]
        lines += [f"Batch {batch}:", "", "| figure | value | target | result |", "|---|---|---|---|"]
        for row in result["table"][f"batch{batch}"]:
            verdict = "-" if row["pass"] is None else ("pass" if row["pass"] else "FAIL")
            lines.append(f"| {row['figure']} | {row['value']:.3f} | {row['target']} | {verdict} |")
        fw, d64, d1k = f["forward"], f["decode"]["64"], f["decode"]["1024"]
        lines += [
            "",
            f"- forward, {fw['tokens']} tokens: composed {fw['composed_ms']:.1f} ms; anchor {fw['anchor_ms']:.1f} ms "
            f"+ augmenting {fw['augment_ms']:.1f} ms (median of per-round ratios {fw['ratio_per_round_median']:.3f})",
            f"- decode step, 64 context: composed {d64['composed_ms']:.2f} ms; anchor {d64['anchor_ms']:.2f} ms "
            f"+ augmenting {d64['augment_ms']:.2f} ms (median of per-round ratios {d64['ratio_per_round_median']:.3f})",
            f"- decode step, 1024 context: composed {d1k['composed_ms']:.2f} ms; anchor {d1k['anchor_ms']:.2f} ms "
            f"+ augmenting {d1k['augment_ms']:.2f} ms (median of per-round ratios {d1k['ratio_per_round_median']:.3f})",
            f"- bare models' per-token time 1024 / 64 context: {f['baseline_context_scaling_1024_over_64']:.3f}",
        ]
        if "generate" in f:
            g = f["generate"]
            lines.append(
                f"- generate {g['prompt']} + {g['new_tokens']} tokens: cached {g['cached_s']:.2f} s "
                f"({g['cached_tokens_per_s']:.1f} tok/s), uncached {g['uncached_s']:.2f} s "
                f"({g['uncached_tokens_per_s']:.1f} tok/s), speed-up {g['speedup']:.1f}x"
            )
        lines.append("")
    if result["noisy"]:
        lines += ["**Noisy run**: " + "; ".join(result["noisy"]), ""]
    s = result["settings"]
    m = result["machine"]
    lines.append(
        f"Bridges: {s['bridge_parameters']:,} parameters ({s['bridge_percent_of_anchor']:.2f}% of the anchor's "
        f"{s['anchor_parameters']:,}); links {s['links']}."
    )
    lines.append(
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
        f"transformers {m['transformers']}, {m['date_utc']}."
    )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/composition_bench.json"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, fixed for the run (1 by default: on a small shared machine one thread is "
                        "far less disturbed by other processes; give the core count to measure all cores)")
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--every", type=int, default=2, help="LayerMapping(every=k)")
    p.add_argument("--rotary", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256, help="forward length")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--total", type=int, default=512, help="prompt + generated tokens")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--forward-reps", type=int, default=30)
    p.add_argument("--decode-reps", type=int, default=60)
    p.add_argument("--generate-reps", type=int, default=3, help="cached generate runs")
    p.add_argument("--uncached-reps", type=int, default=1, help="uncached generate runs (slow: full recompute)")
    p.add_argument("--no-generate", action="store_true", help="skip the (slow) uncached generate figure")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="first wait up to this long for the machine's 1-minute load average to fall below --quiet-below")
    p.add_argument("--quiet-below", type=float, default=0.5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.wait_quiet:
        print(f"load average before start: {wait_quiet(args.wait_quiet, args.quiet_below):.2f}", flush=True)
    machine = machine_info()
    short, long = CONTEXTS

    model, anchor, augment = build(args)
    anchor_params = sum(p.numel() for p in anchor.parameters())
    with torch.no_grad():
        probe = tokens(1, 16, args.vocab)
        composed_logits = model(probe).logits
        anchor_logits = anchor(input_ids=probe).logits
    bridge_effect = (composed_logits - anchor_logits).abs().max().item()
    if bridge_effect == 0:
        raise RuntimeError("the bridges do not change the anchor's logits: randomise_bridges did not take")
    settings = {
        "anchor": "Llama d=512, 8 layers, 8 heads, 4 kv heads, MLP 1536",
        "augment": "Llama d=256, 4 layers, 4 heads, 2 kv heads, MLP 768",
        "vocab": args.vocab,
        "dtype": "float32",
        "mapping": f"LayerMapping(every={args.every})",
        "links": [[l.augment_index, l.anchor_index] for l in model.links],
        "rotary": args.rotary,
        "bridge_parameters": model.num_bridge_parameters(),
        "anchor_parameters": anchor_params,
        "augment_parameters": sum(p.numel() for p in augment.parameters()),
        "bridge_percent_of_anchor": 100 * model.num_bridge_parameters() / anchor_params,
        "bridge_max_logit_change": bridge_effect,
        "batches": args.batches,
        "forward_tokens": args.seq,
        "contexts": list(CONTEXTS),
        "warmup": args.warmup,
        "forward_reps": args.forward_reps,
        "decode_steps_timed": args.decode_reps,
        "generate": None if args.no_generate else {"prompt": args.prompt, "total": args.total,
                                                    "cached_reps": args.generate_reps, "uncached_reps": args.uncached_reps},
        "statistic": "median; composed and baselines timed interleaved",
        "augment_baseline": "augmenting base model without LM head (the composition never runs it)",
        "decode_baseline": "bare HF model, own DynamicCache, one token, no attention mask, logits_to_keep=1",
    }

    figures = {}
    with torch.no_grad():
        for batch in args.batches:
            f = {"forward": forward_figures(model, anchor, augment, batch, args.seq, args)}
            print(f"batch {batch} forward: {f['forward']}", flush=True)
            f["decode"] = {}
            for ctx in CONTEXTS:
                f["decode"][str(ctx)] = decode_figures(model, anchor, augment, batch, ctx, args)
                print(f"batch {batch} decode {ctx}: {f['decode'][str(ctx)]}", flush=True)
            d_short, d_long = f["decode"][str(short)], f["decode"][str(long)]
            f["context_scaling_1024_over_64"] = d_long["composed_ms"] / d_short["composed_ms"]
            f["baseline_context_scaling_1024_over_64"] = (d_long["anchor_ms"] + d_long["augment_ms"]) / (
                d_short["anchor_ms"] + d_short["augment_ms"]
            )
            if not args.no_generate:
                f["generate"] = generate_figures(model, batch, args)
                print(f"batch {batch} generate: {f['generate']}", flush=True)
            figures[f"batch{batch}"] = f

    machine["load_average_at_end"] = list(os.getloadavg())
    result = {"settings": settings, "machine": machine, "figures": figures}
    result["table"] = {f"batch{b}": table(figures, b) for b in args.batches}
    # the composed model does strictly more work than its parts: a ratio below 1 means the machine was busy
    result["noisy"] = [
        f"batch {b} {name} ratio {fig['ratio']:.3f} < 1"
        for b in args.batches
        for name, fig in [("forward", figures[f"batch{b}"]["forward"])]
        + [(f"decode {c}", figures[f"batch{b}"]["decode"][str(c)]) for c in CONTEXTS]
        if fig["ratio"] < 1
    ]
    result["markdown"] = markdown(result)
    print()
    print(result["markdown"])
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()

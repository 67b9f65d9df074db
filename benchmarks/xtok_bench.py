"""What composing models with different tokenizers costs (composition/alignment.py).

1. Same anchor and augmenting model (random-init Llamas sharing one tokenizer), two alignments of the
   one composition path:
   ``shared``   no tokenizers given: the identity alignment;
   ``text``     the cross-tokenizer text alignment forced on the same pair (decode anchor ids, cut into
                pieces, re-tokenise, build masks): what a pair with different tokenizers pays.
   Forward of one 1024-token sequence, and decode per token (teacher-forced cached steps on real text,
   so words close as they would in generation) at 64 and 1024 tokens of context.
2. The real pair (SmolLM2-135M + Gemma-3-270m, when converted under models/): composed forward and
   decode vs the anchor alone + the augmenting model alone on the same text.

Prints a table and writes results/xtok_bench.json. Wall times only; nothing is asserted.

    python -m benchmarks.xtok_bench [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from composition import ComposedModel, CompositionConfig, LayerMapping
from composition.alignment import align_text
from tests.fixtures_xtok import SENTENCES, byte_bpe, randomise_bridges, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def text_of(tokenizer, tokens: int) -> list[int]:
    """Ids of at least ``tokens`` tokens of varied text (the fixture sentences, shuffled deterministically)."""
    import random

    rng = random.Random(0)
    parts = []
    while True:
        parts.append(rng.choice(SENTENCES))
        ids = tokenizer(" ".join(parts))["input_ids"]
        if len(ids) >= tokens:
            return ids


def timed(fn, reps: int) -> float:
    """Median wall seconds of ``fn()`` (after one warm-up call)."""
    return interleaved({"only": lambda: _clock(fn)}, reps)["only"]


CLOCK = time.perf_counter  # main() switches to time.thread_time with --cpu-time


def _clock(fn) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def interleaved(runs: dict, reps: int) -> dict:
    """Median of each ``runs[name]()`` (each returns seconds), taking turns so load on the machine
    hits every path alike."""
    for run in runs.values():
        run()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(t) for name, t in times.items()}


def forward_run(model, ids: torch.Tensor):
    """One forward over ``ids`` [seq] (last logits only); returns seconds."""
    return torch.no_grad()(lambda: _clock(lambda: model(ids[None], logits_to_keep=1)))


def decode_run(model, ids: list[int], context: int, steps: int):
    """Seconds per cached step after a prefill of ``context`` tokens, feeding the text's next tokens."""
    prompt = torch.tensor([ids[:context]])
    follow = torch.tensor([ids[context : context + steps]])

    @torch.no_grad()
    def run():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        t = CLOCK()
        for k in range(steps):
            out = model(follow[:, k : k + 1], cache=out.cache, use_cache=True, logits_to_keep=1)
        return (CLOCK() - t) / steps

    return run


def same_pair(quick: bool) -> dict:
    tok = None
    smollm = ROOT / "models" / "smollm2-135m"
    if (smollm / "tokenizer.json").is_file():
        from composition import load_tokenizer

        tok, tok_name = load_tokenizer(str(smollm)), "SmolLM2 (byte-level BPE, 49152)"
    else:
        tok, tok_name = byte_bpe(), "fixture byte-level BPE (420)"
    vocab = len(tok)
    anchor = tiny_llama(vocab, hidden=512, layers=8, heads=8, seed=0)
    augment = tiny_llama(vocab, hidden=256, layers=4, heads=4, seed=1)
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(2, 4), (4, 8)])], rotary=True)
    paths = {
        "shared": ComposedModel(anchor, [augment], cfg),
        "text": ComposedModel(anchor, [augment], cfg, tokenizers=[tok, tok], identity_when_shared=False),
    }
    for m in paths.values():
        randomise_bridges(m, scale=0.02)
        m.load_state_dict(paths["shared"].state_dict())
    reps, steps = (2, 8) if quick else (5, 32)
    ids = text_of(tok, 1024 + steps + 1)
    seq = torch.tensor(ids[:1024])
    measures = {
        "forward_1024_s": {name: forward_run(m, seq) for name, m in paths.items()},
        "decode_64_s_per_token": {name: decode_run(m, ids, 64, steps) for name, m in paths.items()},
        "decode_1024_s_per_token": {name: decode_run(m, ids, 1024, steps) for name, m in paths.items()},
    }
    rows = {name: {} for name in paths}
    for measure, runs in measures.items():
        for name, seconds in interleaved(runs, reps).items():
            rows[name][measure] = seconds
    a = align_text(tok.decode(ids[:1024]), tok, tok)
    return {
        "tokenizer": tok_name,
        "anchor": "Llama d=512, 8 layers (random init)",
        "augment": "Llama d=256, 4 layers (random init)",
        "augment_tokens_per_anchor_token_text_path": len(a["augment_ids"]) / len(a["anchor_ids"]),
        "paths": rows,
        "ratios": {
            "text/shared": {k: rows["text"][k] / rows["shared"][k] for k in rows["shared"]}
        },
    }


def real_pair(quick: bool) -> dict | None:
    smollm, gemma = ROOT / "models" / "smollm2-135m", ROOT / "models" / "gemma3-270m"
    if not ((smollm / "conversion.json").is_file() and (gemma / "conversion.json").is_file()):
        return None
    from composition import load_causal_lm, load_tokenizer
    anchor, augment = load_causal_lm(str(smollm), "float32"), load_causal_lm(str(gemma), "float32")
    anchor_tok, augment_tok = load_tokenizer(str(smollm)), load_tokenizer(str(gemma))
    cfg = CompositionConfig(mappings=[LayerMapping(pairs=[(6, 10), (12, 20), (18, 30)])], rotary=True)
    model = randomise_bridges(ComposedModel(anchor, [augment], cfg, tokenizers=[anchor_tok, augment_tok]), scale=0.02)
    reps, steps = (1, 4) if quick else (3, 16)
    contexts = [64] if quick else [64, 1024]
    ids = text_of(anchor_tok, max(contexts) + steps + 1)
    aug_ids = augment_tok(anchor_tok.decode(ids))["input_ids"]

    def alone(lm, token_ids, context, head=True):
        """Decode steps of one model alone; ``head=False`` runs its base model only, as the composition does
        for an augmenting model (Gemma's LM head, 262144 x 640, is most of its step)."""
        prompt = torch.tensor([token_ids[:context]])
        kwargs = {"logits_to_keep": 1} if head else {}
        lm = lm if head else lm.model

        @torch.no_grad()
        def run():
            out = lm(input_ids=prompt, use_cache=True, **kwargs)
            cache, t = out.cache, CLOCK()
            for k in range(steps):
                step = torch.tensor([[token_ids[context + k]]])
                out = lm(input_ids=step, cache=cache, use_cache=True, **kwargs)
                cache = out.cache
            return (CLOCK() - t) / steps

        return run

    seq_len = 1024 if not quick else 256
    plain = torch.no_grad()(lambda lm, x: _clock(lambda: lm(input_ids=x, logits_to_keep=1)))
    rows = {"forward_s": interleaved({
        "composed": forward_run(model, torch.tensor(ids[:seq_len])),
        "anchor": lambda: plain(anchor, torch.tensor([ids[:seq_len]])),
        "augment": lambda: _clock(lambda: torch.no_grad()(augment.model)(input_ids=torch.tensor([aug_ids[:seq_len]]))),
    }, reps)}
    for context in contexts:
        aug_context = len(augment_tok(anchor_tok.decode(ids[:context]))["input_ids"])
        rows[f"decode_{context}_s_per_token"] = interleaved({
            "composed": decode_run(model, ids, context, steps),
            "anchor": alone(anchor, ids, context),
            "augment": alone(augment, aug_ids, aug_context, head=False),
        }, reps)
    model.remove_hooks()
    return {"anchor": "SmolLM2-135M-Instruct (fp32)",
            "augment": "Gemma-3-270m (fp32), timed alone without its LM head (the composition never runs it)",
            "forward_tokens": seq_len, "decode_steps": steps,
            "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.xtok_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "results" / "xtok_bench.json"))
    parser.add_argument("--no-real-pair", action="store_true")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the main thread's CPU time (run with OMP_NUM_THREADS=1): on a machine shared "
                             "with other work, wall time mostly measures the others")
    args = parser.parse_args(argv)
    global CLOCK
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            parser.error("--cpu-time needs torch on one thread: run with OMP_NUM_THREADS=1")
        CLOCK = time.thread_time
    torch.manual_seed(0)
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU (shared with other work)",
        "clock": "thread CPU time" if args.cpu_time else "wall time",
        "torch": torch.__version__,
        "same_pair": same_pair(args.quick),
    }
    print(f"same anchor and augmenting model, tokenizer {result['same_pair']['tokenizer']}")
    print(f"{'path':<10}{'forward 1024 (s)':>18}{'decode@64 (ms/tok)':>20}{'decode@1024 (ms/tok)':>22}")
    for name, row in result["same_pair"]["paths"].items():
        print(f"{name:<10}{row['forward_1024_s']:>18.3f}{row['decode_64_s_per_token'] * 1e3:>20.2f}"
              f"{row['decode_1024_s_per_token'] * 1e3:>22.2f}")
    for name, ratios in result["same_pair"]["ratios"].items():
        print(f"{name:<14} forward {ratios['forward_1024_s']:.3f}x  decode@64 {ratios['decode_64_s_per_token']:.3f}x  "
              f"decode@1024 {ratios['decode_1024_s_per_token']:.3f}x")
    if not args.no_real_pair:
        real = real_pair(args.quick)
        result["real_pair"] = real
        if real is None:
            print("real pair: models/smollm2-135m and models/gemma3-270m not converted; skipped")
        else:
            print(f"\nreal pair {real['anchor']} + {real['augment']}")
            print(f"{'measure':<24}{'composed':>10}{'anchor':>10}{'augment':>10}{'composed/(a+g)':>16}")
            for key, r in real["rows"].items():
                ratio = r["composed"] / (r["anchor"] + r["augment"])
                r["composed_over_anchor_plus_augment"] = ratio
                print(f"{key:<24}{r['composed']:>10.4f}{r['anchor']:>10.4f}{r['augment']:>10.4f}{ratio:>16.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

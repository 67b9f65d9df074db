"""Constrained decoding's cost: per-token decode time of a grammar-constrained row against a free one, same prompt
and length, on the real pair (SmolLM2-135M-Instruct reading Gemma-3-270m through the committed bridges, fp32,
another tokenizer), in-process (``DecodeEngine`` + ``LocalAugments``: what an anchor replica runs, no HTTP).

Each round decodes the prompt once free and once under a JSON Schema that cannot end within the tokens timed
(a string of at least 2,000 characters: the mask is computed inside a string, the common case), alternating
which goes first; a row's per-token time is (last token - first token) / (tokens - 1), so the prefill is not in
it. Also reported: the first request's compile (the schema is new to the process) and the shared token tables'
one-time build (``Grammars()``, at start-up). Target (issue 34): constrained / free <= 1.15 for a cached schema.

    python -m benchmarks.structured_bench --out results/structured_bench.json

Asserts nothing; the machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["english"],
          "properties": {"english": {"type": "string", "minLength": 2000}}}
PROMPT = [{"role": "user", "content": "Translate into English, in JSON: El perro duerme en la casa de mi madre, "
                                      "y mañana iremos al mercado para comprar pan y fruta."}]


def build(threads: int):
    from actors.serve.augment_client import LocalAugments
    from actors.serve.augment_rows import AugmentRows
    from actors.serve.config import ServingArgs
    from actors.serve.engine import DecodeEngine
    from actors.serve.grammar import Grammars
    from composition import ComposedModel, load_causal_lm, load_tokenizer
    from tests import fixtures_real

    torch.set_num_threads(threads)
    anchor, augment = fixtures_real.smollm2_folder(), fixtures_real.gemma3_folder()
    import yaml

    (app,) = yaml.safe_load((ROOT / "configs" / "serve_language.yaml").read_text())["applications"]
    bridges = ServingArgs.from_dict(app["args"]).resolved().compositions[0].bridges
    tok = load_tokenizer(str(anchor))
    model = ComposedModel.from_pretrained(bridges, load_causal_lm(str(anchor), dtype="float32"),
                                          [load_causal_lm(str(augment), dtype="float32")],
                                          tokenizers=[tok, load_tokenizer(str(augment))])
    start = time.perf_counter()
    grammars = Grammars(tok, model.anchor_info.vocab_size)
    tables_s = time.perf_counter() - start
    engine = DecodeEngine(model, LocalAugments([AugmentRows(model.encoders[0], 0, 0)]), max_batch_size=4,
                          max_context=2048, grammars=grammars)
    return engine, tok, grammars, tables_s


async def decode(engine, request) -> list[float]:
    """The arrival time of each token of one request."""
    times = []
    async for chunk in engine.generate(request):
        times += [time.perf_counter()] * len(chunk["token_ids"])
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=48, help="tokens decoded per row")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from actors.serve.engine import GenerationRequest
    from actors.serve.grammar import json_grammar

    engine, tok, grammars, tables_s = build(args.threads)
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    grammar = json_grammar(SCHEMA)

    def request(constrained: bool) -> GenerationRequest:
        return GenerationRequest(prompt_ids=prompt, max_tokens=args.tokens, eos_ids=[],
                                 grammar=grammar if constrained else None)

    # the first compile (the schema is new to the process), timed alone in CPU seconds as the limit counts them
    start = time.thread_time()
    grammars.compile(grammar)
    compile_cpu_s = time.thread_time() - start

    async def run():
        free_ms, constrained_ms, ratios = [], [], []
        await decode(engine, request(False))  # warm-up
        for r in range(args.rounds):
            got = {}
            for constrained in ([False, True] if r % 2 == 0 else [True, False]):
                times = await decode(engine, request(constrained))
                got[constrained] = (times[-1] - times[0]) / (len(times) - 1) * 1000
            free_ms.append(got[False])
            constrained_ms.append(got[True])
            ratios.append(got[True] / got[False])
            print(f"round {r}: free {got[False]:.2f} ms/token, constrained {got[True]:.2f} ms/token, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        sample = []
        async for chunk in engine.generate(request(True)):
            sample += chunk["token_ids"]
        return free_ms, constrained_ms, ratios, tok.decode(sample[:40], skip_special_tokens=True), sample

    free_ms, constrained_ms, ratios, first_text, sample = asyncio.run(run())
    # the grammar's own work per token, replayed on the sample alone: mask, apply, consume (what a step adds)
    matcher, logits = grammars.matcher(grammar), torch.randn(engine.model.anchor_info.vocab_size)
    start = time.perf_counter()
    for token in sample:
        logits.masked_fill(~grammars.masks([matcher])[0][0], float("-inf"))
        matcher.consume_token(token)
    grammar_us = (time.perf_counter() - start) / len(sample) * 1e6
    ratio = statistics.median(ratios)
    result = {
        "pair": "SmolLM2-135M-Instruct + Gemma-3-270m, committed bridges (configs/serve_language.yaml), fp32, "
                "another tokenizer",
        "schema": SCHEMA, "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
        "free_ms_per_token": free_ms, "constrained_ms_per_token": constrained_ms, "ratios": ratios,
        "median_ratio": ratio, "target": 1.15, "met": ratio <= 1.15,
        "first_compile_cpu_s": compile_cpu_s, "token_tables_s": tables_s, "grammar_us_per_token": grammar_us,
        "constrained_text_start": first_text,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{args.threads} thread(s), {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
    }
    print(f"\nconstrained / free per-token decode time: median {ratio:.3f} over {args.rounds} rounds "
          f"(target <= 1.15: {'met' if ratio <= 1.15 else 'MISSED'})")
    print(f"free {statistics.median(free_ms):.2f} ms/token, constrained {statistics.median(constrained_ms):.2f}; "
          f"the grammar's own work (mask, apply, consume) {grammar_us:.1f} us/token")
    print(f"first compile of the schema: {compile_cpu_s * 1000:.2f} ms CPU; token tables at start-up: "
          f"{tables_s:.2f} s; text: {first_text!r}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

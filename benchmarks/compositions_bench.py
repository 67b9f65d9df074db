"""Many compositions over one anchor, on the real pair (SmolLM2-135M reading Gemma-3-270m): what a second, third
and fourth composition cost in one application, against one application per composition. Asserts nothing.

    python -m benchmarks.compositions_bench                     # both parts, results/compositions_bench.json
    python -m benchmarks.compositions_bench --skip-memory        # the throughput part only

**Throughput.** One application serves 4 compositions (``c0``..``c3``, each the committed bridges of
configs/serve_language.yaml loaded as a composition of its own: 4 bridge sets of 4 bridges, one shared Gemma-3
deployment; the cost does not depend on the weights). 16 clients stream greedy completions of exactly
``--max-tokens`` tokens (``ignore_eos``), either all to ``c0`` ("one composition") or spread over ``c0``..``c3``
("four compositions", client i on ``c{i % 4}``), alternating for ``--rounds`` rounds in the same warm application.
Target (issue 33): four >= 0.85x one. The anchor replica's own timers give the per-step cost, so the per-row
cost of a mixed step's extra bridges is (step time, four - one) / rows per step.

**Memory.** For K = 1, 2, 4: one application of K compositions, then K applications of one composition each;
the resident memory (RSS) of every replica process of the application(s), summed (Serve's controller and proxy,
shared by all, are left out). Each is deployed alone, measured once loaded and after one request, and deleted.

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
import time
from pathlib import Path

from benchmarks.serve_bench import LANGUAGE_PROMPT, language_pair, one_request, summarise
from composition.checkpoint import atomic_file

ROOT = Path(__file__).resolve().parents[1]


def settings_for(pair: dict, names: list[str], args):
    from actors.serve.config import ServingArgs

    return ServingArgs(compositions=[{"name": n, "augments": [pair["augment"]], "bridges": pair["bridges"]}
                                     for n in names],
                       anchor=pair["anchor"], max_batch_size=args.clients, torch_threads=args.threads,
                       request_timeout_s=600, max_context=2048)


def deploy(app: str, settings, route: str, clients: int) -> None:
    from ray import serve

    from actors.serve.deployments import build_app

    options = {"Ingress": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 256},
               "Anchor": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": clients,
                          "max_queued_requests": 256}}
    options.update({name: {"ray_actor_options": {"num_cpus": 0.1}}
                    for name in settings.deployment_names() if name.startswith("Augment")})
    serve.run(build_app(settings, options), name=app, route_prefix=route)


def replica_rss(apps: list[str]) -> dict[str, int]:
    """Resident bytes of each live Serve replica process of ``apps``, by ``app:deployment#k`` (found by the process
    title Ray gives replicas: ``ray::ServeReplica:<app>:<deployment>``)."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if not title.startswith("ray::ServeReplica:"):
            continue
        app, _, deployment = title.split()[0].removeprefix("ray::ServeReplica:").partition(":")
        if app in apps:
            key = f"{app}:{deployment.split('.')[0]}"
            key = f"{key}#{sum(k.startswith(key) for k in out)}"
            try:
                out[key] = proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return out


async def load(url: str, clients: int, per_client: int, max_tokens: int, models: list[str]) -> dict:
    import httpx

    records: list[dict] = []

    async def client(i: int, http):
        for j in range(per_client):
            records.append(await one_request(http, url, f"{LANGUAGE_PROMPT} ({i}.{j})", max_tokens,
                                             models[i % len(models)]))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
    return summarise(f"{len(models)} composition(s)", clients, records, wall)


def throughput(pair: dict, args, port: int) -> dict:
    import httpx
    from ray import serve

    names = [f"c{i}" for i in range(4)]
    deploy("many", settings_for(pair, names, args), "/", args.clients)
    url = f"http://127.0.0.1:{port}"
    anchor = serve.get_deployment_handle("Anchor", app_name="many")
    with httpx.Client(timeout=600) as http:  # warm every composition's path once
        for n in names:
            r = http.post(f"{url}/v1/completions", json={"model": n, "prompt": "Hola", "max_tokens": 4})
            r.raise_for_status()
    rounds = []
    for k in range(args.rounds):
        for label, models in (("one", names[:1]), ("four", names)):
            before = anchor.stats.remote().result()
            row = asyncio.run(load(url, args.clients, args.requests_per_client, args.max_tokens, models))
            after = anchor.stats.remote().result()
            steps = max(1, after["steps"] - before["steps"])
            row.update(label=label, round=k, steps=steps,
                       step_ms=1000 * (after["step_s"] - before["step_s"]) / steps,
                       anchor_ms=1000 * (after["anchor_s"] - before["anchor_s"]) / steps,
                       augment_call_ms=1000 * (after["augment_call_s"] - before["augment_call_s"]) / steps,
                       rows_per_step=(after["tokens"] - before["tokens"]) / steps)
            rounds.append(row)
            print(f"  round {k} {label:>4}: {row['total_tokens_per_s']:.1f} tok/s, {row['step_ms']:.1f} ms/step "
                  f"(anchor {row['anchor_ms']:.1f}), {row['rows_per_step']:.1f} tokens/step", flush=True)
    serve.delete("many")
    ratios = [b["total_tokens_per_s"] / a["total_tokens_per_s"] for a, b in zip(rounds[::2], rounds[1::2])]
    one = [r for r in rounds if r["label"] == "one"]
    four = [r for r in rounds if r["label"] == "four"]
    median = {key: {label: statistics.median(r[key] for r in group) for label, group in (("one", one), ("four", four))}
              for key in ("step_ms", "anchor_ms")}
    rows = statistics.median(r["rows_per_step"] for r in four)
    # the bridges run in the anchor's model call: its time per step is where a mixed step's extra work shows
    return {"rounds": rounds, "four_vs_one_per_round": ratios, "four_vs_one_median": statistics.median(ratios),
            "median_ms_per_step": median,
            "extra_anchor_ms_per_row_of_a_mixed_step": (median["anchor_ms"]["four"] - median["anchor_ms"]["one"]) / rows}


def memory(pair: dict, args) -> list[dict]:
    from ray import serve

    out = []
    for k in args.memory:
        names = [f"m{i}" for i in range(k)]
        for layout in ("one application", "separate applications"):
            apps = ["stack"] if layout == "one application" else [f"solo{i}" for i in range(k)]
            if layout == "one application":
                deploy("stack", settings_for(pair, names, args), "/stack", args.clients)
            else:
                for i, app in enumerate(apps):
                    deploy(app, settings_for(pair, [names[i]], args), f"/{app}", args.clients)
            time.sleep(2)
            rss = replica_rss(apps)
            for app in apps:
                serve.delete(app)
            total = sum(rss.values())
            out.append({"compositions": k, "layout": layout, "rss_bytes": total, "replicas": rss})
            print(f"  K={k} {layout:>21}: {total / 2**30:.2f} GiB over {len(rss)} replica processes", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each replica")
    p.add_argument("--memory", default="1,2,4", help="K values of the memory part")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--port", type=int, default=8124)
    p.add_argument("--out", default=str(ROOT / "results" / "compositions_bench.json"))
    args = p.parse_args(argv)
    args.memory = [int(k) for k in args.memory.split(",")]

    import ray
    import torch
    from ray import serve

    pair = language_pair()
    load_before = os.getloadavg()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, namespace="serve", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    result = {"benchmark": "compositions_bench", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": "cpu",
                          "torch": torch.__version__, "torch_threads": args.threads},
              "model": "SmolLM2-135M-Instruct reading Gemma-3-270m (fp32) through the committed bridges "
                       "(assets/language_pair/bridges), loaded once per composition",
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "port")}}
    try:
        if not args.skip_throughput:
            print("throughput: 16 clients on one composition vs spread over four (one application)", flush=True)
            result["throughput"] = throughput(pair, args, args.port)
            t = result["throughput"]
            m = t["median_ms_per_step"]
            print(f"four / one: {t['four_vs_one_median']:.3f}x median (rounds "
                  f"{', '.join(f'{r:.3f}' for r in t['four_vs_one_per_round'])}; target >= 0.85x); step "
                  f"{m['step_ms']['one']:.1f} -> {m['step_ms']['four']:.1f} ms, anchor call "
                  f"{m['anchor_ms']['one']:.1f} -> {m['anchor_ms']['four']:.1f} ms: "
                  f"{t['extra_anchor_ms_per_row_of_a_mixed_step']:.2f} ms per row of a mixed step")
        if not args.skip_memory:
            print("memory: K compositions in one application vs K applications", flush=True)
            result["memory"] = memory(pair, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    result["machine"]["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    out = Path(args.out)
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

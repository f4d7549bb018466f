"""`pdserve bench compare`: disaggregated vs colocated serving, side by side, on one workload.

For each configuration it starts `pdserve serve` on a local Ray cluster with the same total torch
threads, drives it with `pdserve bench serve`'s load generator (the `mixed` dataset: steady short
requests with occasional long prompts, the prefill-decode interference case) at each request rate,
`--runs` times, and reports medians with their range, then the goodput-vs-rate and TPOT-p99-vs-rate
curves (`--plot`). `--dataset shared-prefix` drives the prefix-caching case instead, and
`--no-prefix-caching` runs every configuration with the prefix cache off (labels suffixed `-nocache`).
Configurations:
  disagg-grpc      1 prefill + 1 decode worker (1 thread each), KV over gRPC, every prompt prefilled on the
                   prefill worker (serve.disaggregation "always")
  disagg-gloo      the same over the nccl transport (gloo on CPU)
  disagg-auto      disagg-grpc deciding per request where to prefill (serve.disaggregation "auto": on the
                   decode worker when that is cheaper by the measured step costs)
  disagg-always    disagg-grpc, named for the comparison with the two around it
  disagg-never     disagg-grpc with every prompt prefilled by the decode worker (the prefill worker idles)
  coloc-chunked    1 worker (2 threads) doing its own prefill, chunked (256-token chunks)
  coloc-continuous 1 worker (2 threads), continuous batching with whole prefills
  dynamic          1 worker (2 threads), request-level batching: a batch forms (max 8, 50 ms timeout)
                   and runs to completion (the static-batching baseline in a live server)
On this 2-core CPU machine prefill and decode share the cores whatever the mode, which hides
disaggregation's main benefit; see docs/benchmarks.md for the simulator's projection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path


def _disagg(transport: str = "grpc", disaggregation: str = "always") -> dict:
    return {"serve": {"mode": "disaggregated", "disaggregation": disaggregation},
            "kv_transfer": {"kv_transport": transport}, "engine": {"num_threads": 1}}


CONFIGS = {
    "disagg-grpc": _disagg(),
    "disagg-gloo": _disagg("nccl"),
    "disagg-auto": _disagg(disaggregation="auto"),
    "disagg-always": _disagg(disaggregation="always"),
    "disagg-never": _disagg(disaggregation="never"),
    "coloc-chunked": {"serve": {"mode": "colocated"}, "scheduler": {"policy": "chunked", "max_prefill_chunk": 256},
                      "engine": {"num_threads": 2}},
    "coloc-continuous": {"serve": {"mode": "colocated"}, "scheduler": {"policy": "continuous"},
                         "engine": {"num_threads": 2}},
    "dynamic": {"serve": {"mode": "colocated"}, "scheduler": {"policy": "dynamic", "max_num_seqs": 8,
                                                               "batch_timeout": 0.05},
                "engine": {"num_threads": 2}},
}


def _load_args(args: argparse.Namespace, base_url: str, model: str, rate: float, seed: int) -> argparse.Namespace:
    from pdserve.bench.serve import default_args

    return default_args(base_url=base_url, model=model, dataset_name=args.dataset, num_prompts=args.num_prompts,
                        request_rate=rate, seed=seed, json=True, random_input_len=args.input_len,
                        random_output_len=args.output_len, mixed_long_input_len=args.long_input_len,
                        mixed_long_fraction=args.long_fraction)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the default model (SmolLM2-135M-Instruct)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--dataset", default="mixed", choices=["mixed", "shared-prefix"],
                    help="bench serve's dataset (shared-prefix: one long system prompt, then a question each)")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="every configuration with cache.enable_prefix_caching off (labels suffixed -nocache)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--long-input-len", type=int, default=1500)
    ap.add_argument("--long-fraction", type=float, default=0.1)
    ap.add_argument("--goodput", nargs="*", default=["ttft:3000", "tpot:200"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", default=None, metavar="DIR")
    args = ap.parse_args(argv)

    import ray

    from pdserve.bench import serve as B
    from pdserve.engine.config import PdserveConfig
    from pdserve.router.actor import launch_router

    slos = B.parse_goodput(args.goodput)
    ray.init(namespace="pdserve", include_dashboard=False, log_to_driver=False)
    table: dict[str, dict[float, dict]] = {}
    try:
        for config in args.configs:
            sections = _sections(config, args.no_prefix_caching)
            name = config + ("-nocache" if args.no_prefix_caching else "")
            cfg = PdserveConfig().replace(model={"model": args.model}, **sections)
            router = launch_router(cfg)
            url = ray.get(router.start.remote(), timeout=600)
            model = cfg.serve.served_model_name or __import__("httpx").get(f"{url}/v1/models").json()["data"][0]["id"]
            table[name] = {}
            try:
                for rate in args.rates:
                    reps = []
                    for run in range(args.runs):
                        results, duration = asyncio.run(B.run(_load_args(args, url, model, rate, seed=run)))
                        reps.append(B.report(results, duration, slos))
                        print(f"[{name} @ {rate:g} req/s, run {run + 1}/{args.runs}] goodput "
                              f"{reps[-1]['goodput']:.2f} req/s, TTFT p99 {reps[-1]['ttft_ms']['p99']:.0f} ms, "
                              f"TPOT p99 {reps[-1]['tpot_ms']['p99']:.0f} ms, failed {reps[-1]['failed']}",
                              file=sys.stderr, flush=True)
                    table[name][rate] = _median_of(reps)
            finally:
                ray.get(router.stop.remote(), timeout=120)
                ray.kill(router)
    finally:
        ray.shutdown()
    out = {"slos_ms": {k: v * 1e3 for k, v in slos.items()}, "runs": args.runs, "num_prompts": args.num_prompts,
           "results": {n: {str(r): v for r, v in rows.items()} for n, rows in table.items()}}
    if args.plot:
        out["plots"] = _plot(table, Path(args.plot))
    print(json.dumps(out) if args.json else _format(table, args))
    return 0


def _sections(config: str, no_prefix_caching: bool = False) -> dict:
    """A configuration's config sections, on a free port, with the prefix cache off if asked."""
    sections = {k: dict(v) for k, v in CONFIGS[config].items()}
    sections["serve"] = {**sections.get("serve", {}), "port": 0}
    if no_prefix_caching:
        sections["cache"] = {**sections.get("cache", {}), "enable_prefix_caching": False}
    return sections


def _median_of(reps: list[dict]) -> dict:
    """Medians over runs, with the range, of the figures the comparison shows."""
    from pdserve.bench.serve import figure

    def pick(path):
        vals = figure(reps, path)
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    return {"goodput": pick(["goodput"]), "request_throughput": pick(["request_throughput"]),
            "ttft_p50_ms": pick(["ttft_ms", "p50"]), "ttft_p99_ms": pick(["ttft_ms", "p99"]),
            "tpot_p50_ms": pick(["tpot_ms", "p50"]), "tpot_p99_ms": pick(["tpot_ms", "p99"]),
            "failed": pick(["failed"])}


def _format(table: dict, args) -> str:
    workload = (f"mixed workload: {args.num_prompts} requests, {args.input_len}-word prompts and "
                f"{args.long_fraction:.0%} of {args.long_input_len} words" if args.dataset == "mixed" else
                f"{args.dataset} workload: {args.num_prompts} requests, {args.input_len}-word questions")
    lines = [f"{workload}, {args.output_len} output tokens; medians of {args.runs} runs [min-max]",
             f"{'config':<24}{'rate':>6}{'goodput':>18}{'TTFT p50':>12}{'TTFT p99':>20}{'TPOT p50':>12}"
             f"{'TPOT p99':>20}"]
    for name, rows in table.items():
        for rate, m in rows.items():
            g, t99, p99 = m["goodput"], m["ttft_p99_ms"], m["tpot_p99_ms"]
            lines.append(f"{name:<24}{rate:>6g}{g['median']:>8.2f} [{g['min']:.2f}-{g['max']:.2f}]"
                         f"{m['ttft_p50_ms']['median']:>10.0f}ms{t99['median']:>8.0f} [{t99['min']:.0f}-"
                         f"{t99['max']:.0f}]ms{m['tpot_p50_ms']['median']:>10.0f}ms{p99['median']:>8.0f} "
                         f"[{p99['min']:.0f}-{p99['max']:.0f}]ms")
    return "\n".join(lines)


def _plot(table: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label, fname in (("goodput", "goodput (req/s)", "goodput_vs_rate.png"),
                              ("tpot_p99_ms", "TPOT p99 (ms)", "tpot_p99_vs_rate.png"),
                              ("ttft_p99_ms", "TTFT p99 (ms)", "ttft_p99_vs_rate.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, rows in table.items():
            rates = sorted(rows)
            med = [rows[r][key]["median"] for r in rates]
            lo = [rows[r][key]["median"] - rows[r][key]["min"] for r in rates]
            hi = [rows[r][key]["max"] - rows[r][key]["median"] for r in rates]
            ax.errorbar(rates, med, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        paths.append(str(out / fname))
    return paths


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.project`: the simulator's projection of disaggregated vs colocated serving on separate devices.

`pdserve bench compare` measures the comparison on this machine, where the prefill and decode workers share
two CPU cores. This script replays the same `mixed` workload (the same generator, seeds and Poisson arrivals
as `pdserve bench serve`; prompt lengths in words, which SmolLM2's tokenizer turns into as many tokens) through
`engine.simulator` with the calibrated step costs, on two separate devices that each cost what this
machine's 2 threads cost:
  disagg-1p1d        1 prefill + 1 decode instance, pdserve's default scheduler on both (as bench compare's
                     disagg configs), KV at the measured gRPC/gloo ~1.2 GB/s + 5 ms per transfer
  disagg-1p1d-rdma   the same with an RDMA/NVLink-class link (50 GB/s, 0.5 ms)
  coloc2-chunked     2 devices, each prefilling (256-token chunks) and decoding its own requests
  coloc2-continuous  2 devices, continuous batching with whole prefills
Requests are spread least-loaded (as pdserve's router does). Rates: bench compare's default rates and the
measured ones, then 2x and 4x them (2x is the same load per device as the one-machine measurement; 4x is
past saturation). Each figure is the median over `--runs` seeds, with the range. Goodput is DistServe's
(requests meeting every SLO per second), under bench compare's SLOs and a stricter TPOT SLO.

It also checks the simulator against the measurement: the measured configurations on one device (the
disaggregated one as two half-devices, costs x2: each worker had 1 of the 2 threads) at the measured rates,
with the measured number of requests and seeds, beside the medians in docs/compare/results.json.

Writes `results.json` and three plots into `--out` (default docs/projection).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import random
import statistics
import sys
from pathlib import Path

from pdserve.bench import compare
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.simulator import CalibratedCost, Cluster, SimRequest, parse_slos, simulate

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "docs" / "compare" / "results.json"
RDMA = {"transfer_gbps": 50.0, "transfer_latency_s": 0.0005}
STRICT_TPOT_MS = 100.0


def compare_defaults() -> dict:
    """`pdserve bench compare`'s command-line defaults (rates, workload, SLOs), read from its source."""
    tree = ast.parse(Path(compare.__file__).read_text())
    out = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args
                and isinstance(node.args[0], ast.Constant)):
            for kw in node.keywords:
                if kw.arg == "default":
                    with contextlib.suppress(ValueError):  # not a literal (e.g. list(CONFIGS))
                        out[node.args[0].value.lstrip("-").replace("-", "_")] = ast.literal_eval(kw.value)
    return out


def scheduler_config(name: str) -> SchedulerConfig:
    """The scheduler section bench compare gives a configuration (pdserve's defaults where it sets none)."""
    return SchedulerConfig(**compare.CONFIGS[name].get("scheduler", {}))


def configs() -> dict[str, tuple[Cluster, SchedulerConfig]]:
    return {"disagg-1p1d": (Cluster(prefill=1, decode=1), scheduler_config("disagg-grpc")),
            "disagg-1p1d-rdma": (Cluster(prefill=1, decode=1, **RDMA), scheduler_config("disagg-grpc")),
            "coloc2-chunked": (Cluster(devices=2), scheduler_config("coloc-chunked")),
            "coloc2-continuous": (Cluster(devices=2), scheduler_config("coloc-continuous"))}


def mixed_workload(wl: argparse.Namespace, rate: float, seed: int) -> list[SimRequest]:
    """Exactly the requests and arrival times `pdserve bench serve` sends for bench compare at this rate and
    seed; a prompt of N words is N tokens (SmolLM2's tokenizer: 64 -> 64 or 65, 1,500 -> 1,500)."""
    from pdserve.bench import serve as B

    la = compare._load_args(wl, "", "", rate, seed)
    rng = random.Random(seed)
    specs = B.build_workload(la, rng)
    offsets = B.arrival_times(len(specs), rate, la.burstiness, rng)
    return [SimRequest(f"r{i}", t, len(s.prompt.split()), s.output_len)
            for i, (s, t) in enumerate(zip(specs, offsets, strict=True))]


def run_one(workload, cluster: Cluster, config: SchedulerConfig, cost, slo_sets: dict[str, dict]) -> dict:
    res = simulate(workload, config, cost, num_blocks=1 << 16, cluster=cluster)
    s = res.summary()
    span = s["makespan"] - min(r.arrival for r in workload)
    row = {"request_throughput": s["completed"] / span, "ttft_p50_ms": s["ttft_p50"] * 1e3,
           "ttft_p99_ms": s["ttft_p99"] * 1e3, "tpot_p50_ms": s["tpot_p50"] * 1e3,
           "tpot_p99_ms": s["tpot_p99"] * 1e3, "itl_max_ms": s["itl_max"] * 1e3}
    for name, slos in slo_sets.items():
        g = res.summary(slos)
        row[f"goodput_{name}"] = g["goodput"]
        row[f"attainment_{name}"] = g["slo_attainment"]
    for inst in s["instances"]:
        row[f"util_{inst['name']}"] = inst["utilization"]
    return row


def median_of(reps: list[dict]) -> dict:
    return {k: {"median": statistics.median(r[k] for r in reps), "min": min(r[k] for r in reps),
                "max": max(r[k] for r in reps)} for k in reps[0]}


def sweep(wl, rates, seeds, named: dict[str, tuple[Cluster, SchedulerConfig, CalibratedCost]], slo_sets) -> dict:
    table: dict[str, dict[float, dict]] = {}
    for name, (cluster, config, cost) in named.items():
        table[name] = {}
        for rate in rates:
            reps = [run_one(mixed_workload(wl, rate, seed), cluster, config, cost, slo_sets) for seed in seeds]
            table[name][rate] = median_of(reps)
    return table


def crossover(table: dict, key: str, disagg: str, colocs: list[str]) -> dict:
    """Where the disaggregated config's median `key` crosses the best colocated one's (linear interpolation
    between neighbouring rates), with the goodput there; no crossings when the sign never changes."""
    rates = sorted(table[disagg])
    best = [max(table[c][r][key]["median"] for c in colocs) for r in rates]
    diff = [table[disagg][r][key]["median"] - b for r, b in zip(rates, best, strict=True)]
    out = {"rates": rates, "disagg_minus_best_coloc": diff, "crossings": []}
    for k in range(len(rates) - 1):
        (r0, r1), (d0, d1) = rates[k:k + 2], diff[k:k + 2]
        if (d0 < 0) != (d1 < 0) and d0 != d1:
            f = -d0 / (d1 - d0)
            rate = r0 + (r1 - r0) * f
            goodput = best[k] + (best[k + 1] - best[k]) * f
            out["crossings"].append({"rate": rate, "disagg_ahead_above": d1 > d0, "goodput": goodput,
                                     "share_of_offered": goodput / rate})
    return out


def _fmt_table(table: dict, slo_names: list[str]) -> str:
    head = (f"{'config':<20}{'rate':>6}" + "".join(f"{'goodput ' + n:>20}" for n in slo_names)
            + f"{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}{'ITL max':>10}  util")
    lines = [head]
    for name, rows in table.items():
        for rate, m in rows.items():
            utils = " ".join(f"{m[k]['median']:.0%}" for k in m if k.startswith("util_"))
            lines.append(f"{name:<20}{rate:>6g}" + "".join(
                f"{m['goodput_' + n]['median']:>9.2f} [{m['goodput_' + n]['min']:.2f}-{m['goodput_' + n]['max']:.2f}]"
                for n in slo_names) + "".join(f"{m[k]['median']:>8.0f}ms" for k in (
                    "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_max_ms")) + f"  {utils}")
    return "\n".join(lines)


def _plot(table: dict, slo_sets: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def curves(ax, key, scale=1.0):
        for name, rows in table.items():
            rates = sorted(rows)
            med = [rows[r][key]["median"] * scale for r in rates]
            lo = [(rows[r][key]["median"] - rows[r][key]["min"]) * scale for r in rates]
            hi = [(rows[r][key]["max"] - rows[r][key]["median"]) * scale for r in rates]
            ax.errorbar(rates, med, yerr=[lo, hi], marker="o", capsize=3, label=name,
                        linestyle="--" if name.endswith("rdma") else "-")
        ax.set_xlabel("request rate (req/s), 2 devices in all")
        ax.grid(alpha=0.3)

    for key, label, fname, slo in (("tpot_p99_ms", "TPOT p99 (ms)", "tpot_p99_vs_rate.png", "tpot"),
                                   ("ttft_p99_ms", "TTFT p99 (ms)", "ttft_p99_vs_rate.png", "ttft")):
        fig, ax = plt.subplots(figsize=(7, 4))
        curves(ax, key)
        limit = next(iter(slo_sets.values())).get(slo)
        if limit:
            ax.axhline(limit * 1e3, color="grey", linestyle=":", label=f"SLO {limit * 1e3:g} ms")
        if slo == "ttft":
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_title(f"projection: {label} vs rate (simulator, calibrated costs)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        paths.append(str(out / fname))
    fig, axes = plt.subplots(1, len(slo_sets), figsize=(6.5 * len(slo_sets), 4), squeeze=False)
    for ax, (name, slos) in zip(axes[0], slo_sets.items(), strict=True):
        curves(ax, f"goodput_{name}")
        rates = sorted(next(iter(table.values())))
        ax.plot(rates, rates, color="grey", linestyle=":", label="offered rate")
        ax.set_ylabel("goodput (req/s)")
        ax.set_title(f"goodput, SLOs {', '.join(f'{k} <= {v * 1e3:g} ms' for k, v in slos.items())}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "goodput_vs_rate.png", dpi=100)
    plt.close(fig)
    paths.append(str(out / "goodput_vs_rate.png"))
    return paths


def cpu_check(wl, cost: CalibratedCost, slos: dict, measured: dict) -> dict:
    """The measured one-machine configurations, simulated at the measured settings, beside the measurement."""
    half = CalibratedCost(cost.step_overhead_s * 2, cost.prefill_token_s * 2, cost.decode_token_s * 2)
    named = {"disagg-grpc": (Cluster(prefill=1, decode=1), scheduler_config("disagg-grpc"), half),
             "coloc-chunked": (Cluster(devices=1), scheduler_config("coloc-chunked"), cost),
             "coloc-continuous": (Cluster(devices=1), scheduler_config("coloc-continuous"), cost)}
    rates = sorted(float(r) for r in measured["results"]["coloc-chunked"])
    wl = argparse.Namespace(**{**vars(wl), "num_prompts": measured["num_prompts"]})
    sim = sweep(wl, rates, range(measured["runs"]), named, {"slo": slos})
    out = {}
    for name in named:
        out[name] = {}
        for rate in rates:
            m, s = measured["results"][name][str(rate)], sim[name][rate]
            out[name][rate] = {k: {"measured": m[k]["median"], "simulated": s[k]["median"]}
                               for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")}
            out[name][rate]["goodput"] = {"measured": m["goodput"]["median"],
                                          "simulated": s["goodput_slo"]["median"]}
    return out


def _fmt_check(check: dict) -> str:
    keys = ("goodput", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
    lines = ["check on one machine (measured / simulated): " + ", ".join(keys)]
    for name, rows in check.items():
        for rate, m in rows.items():
            digits = {k: 2 if k == "goodput" else 0 for k in keys}
            lines.append(f"  {name:<18}{rate:>5g}  " + "  ".join(
                f"{m[k]['measured']:.{digits[k]}f} / {m[k]['simulated']:.{digits[k]}f}" for k in keys))
    return "\n".join(lines)


def _rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    d = compare_defaults()
    ap = argparse.ArgumentParser(prog="python -m bench.project", description=__doc__.split("\n\n")[0])
    ap.add_argument("--costs", type=Path, default=ROOT / "docs" / "calibrated_costs.json")
    ap.add_argument("--rates", type=float, nargs="+", default=None,
                    help="default: bench compare's default and measured rates, and 2x and 4x them")
    ap.add_argument("--runs", type=int, default=5, help="seeds 0..runs-1 (bench compare's seeds are its runs)")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--strict-tpot-ms", type=float, default=STRICT_TPOT_MS)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "projection")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the one-machine check against the measurement")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the tables")
    args = ap.parse_args(argv)

    cost = CalibratedCost.from_file(args.costs)
    if min(cost.step_overhead_s, cost.prefill_token_s, cost.decode_token_s) <= 0:
        ap.error(f"{args.costs}: every calibrated cost must be positive")
    measured = json.loads(MEASURED.read_text()) if MEASURED.exists() else None
    base = set(d["rates"]) | ({float(r) for r in measured["results"]["coloc-chunked"]} if measured else set())
    rates = args.rates or sorted({round(r * k, 6) for r in base for k in (1, 2, 4)})
    slos = parse_slos(d["goodput"])
    slo_sets = {"slo": slos, "strict": {**slos, "tpot": args.strict_tpot_ms / 1e3}}
    wl = argparse.Namespace(num_prompts=args.num_prompts, input_len=d["input_len"], output_len=d["output_len"],
                            long_input_len=d["long_input_len"], long_fraction=d["long_fraction"])
    named = {n: (c, s, cost) for n, (c, s) in configs().items()}
    table = sweep(wl, rates, range(args.runs), named, slo_sets)
    colocs = ["coloc2-chunked", "coloc2-continuous"]
    result = {
        "assumptions": {
            "costs": {"file": _rel(args.costs), "step_overhead_s": cost.step_overhead_s,
                      "prefill_token_s": cost.prefill_token_s, "decode_token_s": cost.decode_token_s},
            "workload": {**vars(wl), "dataset": "mixed", "arrivals": "poisson", "tokens_per_word": 1},
            "seeds": list(range(args.runs)), "rates": rates,
            "configs": {n: {"cluster": vars(c) | {"describe": c.describe()},
                            "scheduler": {k: getattr(s, k) for k in ("policy", "max_num_seqs",
                                                                     "max_num_batched_tokens", "max_prefill_chunk")}}
                        for n, (c, s) in configs().items()},
            "slos_ms": {n: {k: v * 1e3 for k, v in s.items()} for n, s in slo_sets.items()},
        },
        "results": {n: {str(r): v for r, v in rows.items()} for n, rows in table.items()},
        "crossover": {n: crossover(table, f"goodput_{n}", "disagg-1p1d", colocs) for n in slo_sets},
    }
    check = cpu_check(wl, cost, slos, measured) if measured and not args.no_check else None
    if check:
        result["cpu_check"] = {n: {str(r): v for r, v in rows.items()} for n, rows in check.items()}
    if not args.no_plot:
        result["plots"] = [_rel(Path(p)) for p in _plot(table, slo_sets, args.out)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"mixed workload: {args.num_prompts} requests, {wl.input_len}-token prompts and {wl.long_fraction:.0%} of "
          f"{wl.long_input_len} tokens, {wl.output_len} output tokens; medians of {args.runs} seeds [min-max]; "
          f"costs {cost.step_overhead_s * 1e3:.1f} ms/step + {cost.prefill_token_s * 1e3:.2f} ms/prefill token + "
          f"{cost.decode_token_s * 1e3:.2f} ms/decode token")
    print(_fmt_table(table, list(slo_sets)))
    for n, c in result["crossover"].items():
        where = ", ".join(f"{x['rate']:.2f} req/s (disaggregated ahead "
                          f"{'above' if x['disagg_ahead_above'] else 'below'}; goodput there "
                          f"{x['goodput']:.2f} req/s, {x['share_of_offered']:.0%} of offered)"
                          for x in c["crossings"]) or "none in the rates swept"
        slo_text = ", ".join(f"{k} <= {v * 1e3:g} ms" for k, v in slo_sets[n].items())
        print(f"goodput crossover ({n}: {slo_text}): {where}")
    if check:
        print(_fmt_check(check))
    print(f"wrote {args.out / 'results.json'}" + (f" and {len(result['plots'])} plots" if "plots" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

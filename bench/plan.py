"""`pdserve plan`: the placement search. Which prefill:decode split (or how many colocated replicas) of a
device budget serves this workload with the highest goodput under these SLOs?

DistServe's placement search, on pdserve's own simulator (`engine.simulator`: the real scheduler, one per
simulated device, driven by calibrated step costs from `pdserve bench engine --calibrate` on any hardware):
every disaggregated split P prefill + D decode instances with P + D <= the budget, and every colocated
deployment of 1..budget replicas, each replaying the same workload.

Goodput (DistServe's, as `pdserve bench serve` and `pdserve simulate` report it): the requests that finished
within every SLO, divided by the time from the first arrival to the last token, in requests per second. At a
fixed offered rate it is at most that rate; `attainment` is the fraction of all requests that met the SLOs.
The best configuration is the one with the highest goodput; among those within `tolerance` of it (default 1%:
a difference the simulation's noise covers), the one with the fewest devices, then the highest goodput.

The workload: a JSONL trace (one `{"arrival": s, "prompt_tokens": n, "output_tokens": n}` per line, as
`pdserve simulate --workload FILE` reads), or `pdserve bench serve`'s `random` or `mixed` dataset at a rate
(the same generator and seeds; a prompt of N words is N tokens, as SmolLM2's tokenizer counts them).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.simulator import (
    CalibratedCost,
    Cluster,
    SimRequest,
    jsonl_workload,
    parse_slos,
    percentile,
    simulate,
)


@dataclass(frozen=True)
class Row:
    """One configuration's simulated outcome."""

    name: str  # "3P+1D" or "coloc x4"
    prefill: int  # 0 for colocated
    decode: int  # colocated: the replicas
    devices: int
    goodput: float  # requests/s meeting every SLO
    attainment: float  # fraction of all requests meeting every SLO
    ttft_p90: float | None
    tpot_p90: float | None
    rejected: int

    @property
    def goodput_per_device(self) -> float:
        return self.goodput / self.devices


@dataclass(frozen=True)
class Plan:
    rows: list[Row]  # best first
    best: Row
    slos: dict[str, float]
    budget: int


def clusters(budget: int, colocated: bool = True, disaggregated: bool = True,
             template: Cluster | None = None) -> list[Cluster]:
    """Every configuration within `budget` devices: P:D splits with P + D <= budget, then 1..budget replicas.
    `template` carries the KV link (bandwidth, latency, bytes per token) and the routing."""
    if budget < 1:
        raise ValueError(f"the device budget must be at least 1, got {budget}")
    t = template or Cluster()
    out = []
    if disaggregated:
        out += [replace(t, devices=1, prefill=p, decode=d) for p in range(1, budget)
                for d in range(1, budget - p + 1)]
    if colocated:
        out += [replace(t, devices=n, prefill=0, decode=0) for n in range(1, budget + 1)]
    return out


def evaluate(workload: list[SimRequest], cluster: Cluster, config: SchedulerConfig, cost,
             slos: dict[str, float]) -> Row:
    res = simulate(workload, config, cost, num_blocks=1 << 16, cluster=cluster, slos=slos)
    s = res.summary()
    done = [r for r in res.requests if r.finish is not None]
    ttfts = [r.ttft(res.discrete) for r in done]
    tpots = [t for r in done if (t := r.tpot()) is not None]
    if cluster.disaggregated:
        name, p, d = f"{cluster.prefill}P+{cluster.decode}D", cluster.prefill, cluster.decode
    else:
        name, p, d = f"coloc x{cluster.devices}", 0, cluster.devices
    return Row(name, p, d, cluster.num_devices, s["goodput"], s["slo_attainment"] or 0.0,
               percentile(ttfts, 90), percentile(tpots, 90), s["rejected"])


def search(workload: list[SimRequest], budget: int, config: SchedulerConfig, cost, slos: dict[str, float],
           tolerance: float = 0.01, colocated: bool = True, disaggregated: bool = True,
           template: Cluster | None = None) -> Plan:
    """Simulate every configuration within the budget; the best first (see the module docstring)."""
    if not slos:
        raise ValueError("goodput needs at least one SLO (e.g. ttft:2000 tpot:100)")
    if not workload:
        raise ValueError("the workload is empty")
    rows = [evaluate(workload, c, config, cost, slos) for c in clusters(budget, colocated, disaggregated, template)]
    top = max(r.goodput for r in rows)
    near = [r for r in rows if r.goodput >= top * (1 - tolerance)]
    best = min(near, key=lambda r: (r.devices, -r.goodput))
    rows.sort(key=lambda r: (r is not best, -r.goodput, r.devices))
    return Plan(rows, best, slos, budget)


def dataset_workload(name: str, rate: float, num_prompts: int, input_len: int, output_len: int, seed: int = 0,
                     long_input_len: int = 2000, long_fraction: float = 0.1, range_ratio: float = 0.0
                     ) -> list[SimRequest]:
    """`pdserve bench serve`'s `random` or `mixed` dataset with its Poisson arrivals, as simulator requests."""
    from pdserve.bench import serve as B

    if name not in ("random", "mixed"):
        raise ValueError(f"dataset must be random or mixed (or pass a JSONL trace), got {name!r}")
    args = B.default_args(dataset_name=name, num_prompts=num_prompts, random_input_len=input_len,
                          random_output_len=output_len, mixed_long_input_len=long_input_len,
                          mixed_long_fraction=long_fraction, random_range_ratio=range_ratio, request_rate=rate,
                          seed=seed)
    rng = random.Random(seed)
    specs = B.build_workload(args, rng)
    times = B.arrival_times(len(specs), rate, args.burstiness, rng)
    return [SimRequest(f"r{i}", t, len(s.prompt.split()), s.output_len)
            for i, (s, t) in enumerate(zip(specs, times, strict=True))]


def format_plan(plan: Plan) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1e3:.0f}"

    slo_text = ", ".join(f"{k} <= {v * 1e3:g} ms" for k, v in plan.slos.items())
    lines = [f"{'config':<11}{'devices':>8}{'goodput':>10}{'/device':>9}{'attain':>8}{'TTFT p90':>10}"
             f"{'TPOT p90':>10}{'rejected':>9}"]
    for r in plan.rows:
        lines.append(f"{r.name:<11}{r.devices:>8}{r.goodput:>10.3f}{r.goodput_per_device:>9.3f}"
                     f"{r.attainment:>8.0%}{ms(r.ttft_p90):>8}ms{ms(r.tpot_p90):>8}ms{r.rejected:>9}"
                     + ("  <- best" if r is plan.best else ""))
    b = plan.best
    lines.append(f"best within {plan.budget} devices: {b.name} ({b.devices} devices), goodput {b.goodput:.3f} req/s, "
                 f"{b.attainment:.0%} of requests within {slo_text}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="mixed",
                   help="a JSONL trace (arrival, prompt_tokens, output_tokens per line), or bench serve's "
                        "dataset: random or mixed (at --rate)")
    p.add_argument("--rate", type=float, default=2.0, help="dataset: requests/s (Poisson)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=128, help="dataset: prompt tokens (mean)")
    p.add_argument("--output-len", type=int, default=64, help="dataset: output tokens (mean)")
    p.add_argument("--long-input-len", type=int, default=2000, help="mixed: the long prompts' length")
    p.add_argument("--long-fraction", type=float, default=0.1, help="mixed: share of long prompts")
    p.add_argument("--range-ratio", type=float, default=0.0, help="dataset: lengths uniform in mean*(1±r)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="+", required=True, metavar="SLO:MS", help="e.g. ttft:2000 tpot:100")
    p.add_argument("--devices", type=int, required=True, help="the device budget: P + D <= it, or N colocated")
    p.add_argument("--costs", type=Path, required=True,
                   help="calibrated costs (JSON from pdserve bench engine --calibrate; docs/calibrated_costs.json)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--policy", default="chunked", choices=["continuous", "chunked"])
    p.add_argument("--no-colocated", action="store_true", help="search only the disaggregated splits")
    p.add_argument("--no-disaggregated", action="store_true", help="search only colocated replicas")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="goodput within this fraction of the best counts as as good: the fewest devices win")
    p.add_argument("--transfer-gbps", type=float, default=1.2, help="KV bandwidth, GB/s (gigabytes)")
    p.add_argument("--transfer-latency-ms", type=float, default=5.0)
    p.add_argument("--kv-bytes-per-token", type=int, default=46_080)
    p.add_argument("--json", action="store_true")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve plan", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run(args, ap)


def run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    try:
        cost = CalibratedCost.from_file(args.costs)
        if min(cost.step_overhead_s, cost.prefill_token_s, cost.decode_token_s) < 0:
            raise ValueError("calibrated costs must not be negative")
        slos = parse_slos(args.goodput)
        if Path(args.workload).suffix == ".jsonl" or Path(args.workload).is_file():
            workload = jsonl_workload(Path(args.workload))
        else:
            workload = dataset_workload(args.workload, args.rate, args.num_prompts, args.input_len, args.output_len,
                                        args.seed, args.long_input_len, args.long_fraction, args.range_ratio)
        config = SchedulerConfig(policy=args.policy, max_num_seqs=args.max_num_seqs,
                                 max_num_batched_tokens=args.max_num_batched_tokens,
                                 starvation_timeout=float("inf"), max_preemptions=None)
        template = Cluster(transfer_gbps=args.transfer_gbps, transfer_latency_s=args.transfer_latency_ms / 1e3,
                           kv_bytes_per_token=args.kv_bytes_per_token)
        plan = search(workload, args.devices, config, cost, slos, args.tolerance, not args.no_colocated,
                      not args.no_disaggregated, template)
    except (ValueError, KeyError, OSError) as e:
        ap.exit(2, f"pdserve plan: {e}\n")
    if args.json:
        print(json.dumps({"best": asdict(plan.best), "budget": plan.budget,
                          "slos_ms": {k: v * 1e3 for k, v in plan.slos.items()},
                          "rows": [asdict(r) for r in plan.rows]}))
    else:
        print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

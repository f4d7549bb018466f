"""`pdserve bench autoscale`: the SLA planner against every fixed split, in simulation on calibrated costs.

A workload that shifts between a prefill-heavy phase (long prompts, short answers) and a decode-heavy one
(short prompts, long answers) replays through `engine.simulator` (the real scheduler per simulated device,
the calibrated step costs of docs/calibrated_costs.json by default) on every fixed P:D split of the device
budget, on colocated replicas, and on a cluster that the planner (`router.planner`, the decision function
`pdserve serve --autoscale` runs) resizes every `--interval` simulated seconds within the same budget, a new
worker taking `--startup` seconds before it serves. The planner sees what the live router sees: the request
and prompt-token rates and the mean requested output length (`max_tokens`; the workload asks for exactly its
output) of the requests that arrived in its window, the TTFT and TPOT of the requests that got their first
token / finished in it, the prefill queue and the decode admission queue now.

Goodput is DistServe's (requests meeting every SLO per second from the first arrival to the last token);
`attainment` the fraction of requests that met them. The planner's mean devices count its pools' targets over
time; a drained worker still finishing its requests is not counted (a real device would be held until then).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.engine.config import AutoscaleConfig, SchedulerConfig
from pdserve.engine.simulator import (
    CalibratedCost,
    Cluster,
    Controller,
    PoolView,
    SimRequest,
    parse_slos,
    percentile,
    simulate,
)
from pdserve.router.planner import CostModel, Planner, Signals

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Phase:
    seconds: float
    rate: float  # requests/s (Poisson)
    prompt: int  # tokens
    output: int  # tokens


def phased_workload(phases: list[Phase], seed: int = 0) -> list[SimRequest]:
    """Poisson arrivals, phase after phase; lengths uniform in +-20% of each phase's."""
    rng = random.Random(seed)
    out, start = [], 0.0
    for ph in phases:
        t = start + rng.expovariate(ph.rate)
        while t < start + ph.seconds:
            out.append(SimRequest(f"r{len(out)}", t, max(1, round(ph.prompt * rng.uniform(0.8, 1.2))),
                                  max(2, round(ph.output * rng.uniform(0.8, 1.2)))))
            t += rng.expovariate(ph.rate)
        start += ph.seconds
    return out


@dataclass
class PlannerController(Controller):
    """`router.planner.Planner` in the simulator's loop, fed what the live router measures."""

    planner: Planner
    requested: dict[str, int]  # request id -> the output tokens it asks for (the live router: max_tokens)
    interval_s: float = 5.0
    startup_s: float = 10.0
    window_s: float = 20.0
    colocated: bool = False
    history: list[tuple[float, int, int, dict]] = field(default_factory=list)  # (time, P, D, reasons)

    def __call__(self, view: PoolView) -> tuple[int, int]:
        lo = view.now - self.window_s
        span = min(self.window_s, view.now) or 1.0
        arrived = [t for t in view.traces if t.arrival > lo]
        first = [t.first_token - t.arrival for t in view.traces if t.first_token is not None and t.first_token > lo]
        tpots = [x for t in view.traces if t.finish is not None and t.finish > lo and (x := t.tpot()) is not None]
        out = sum(self.requested[t.id] for t in arrived) / len(arrived) if arrived else 1.0
        s = Signals(now=view.now, prefill=view.prefill, decode=view.decode, request_rate=len(arrived) / span,
                    prompt_tokens_per_s=sum(t.prompt_tokens for t in arrived) / span, output_tokens=out,
                    prefill_queue_tokens=view.prefill_queue_tokens, decode_waiting=view.decode_waiting,
                    ttft_s=percentile(first, 90), tpot_s=percentile(tpots, 90), colocated=self.colocated)
        d = self.planner.decide(s)
        self.history.append((view.now, d.prefill, d.decode, d.reasons))
        return d.prefill, d.decode

    def mean_devices(self, end: float) -> float:
        h = self.history
        if not h:
            return 0.0
        total = sum((t1 - t0) * (p + d) for (t0, p, d, _), (t1, *_) in zip(h, h[1:] + [(end,)], strict=True))
        return total / (end - h[0][0]) if end > h[0][0] else h[-1][1] + h[-1][2]


def row(name: str, res, slos: dict, devices: float) -> dict:
    s = res.summary(slos)
    done = [r for r in res.requests if r.finish is not None]
    tp = [x for r in done if (x := r.tpot()) is not None]
    return {"config": name, "devices": devices, "goodput": s["goodput"], "attainment": s["slo_attainment"],
            "ttft_p90_ms": (percentile([r.ttft(False) for r in done], 90) or 0) * 1e3,
            "tpot_p90_ms": (percentile(tp, 90) or 0) * 1e3}


def run(phases: list[Phase], budget: int, cost: CalibratedCost, slos: dict, cfg: AutoscaleConfig,
        sched: SchedulerConfig, seeds: list[int], interval: float, startup: float, window: float) -> dict:
    import statistics

    per_seed: dict[str, list[dict]] = {}
    traces = {}
    for seed in seeds:
        wl = phased_workload(phases, seed)
        fixed = [Cluster(prefill=p, decode=budget - p) for p in range(1, budget)]
        fixed += [Cluster(devices=budget)]
        for c in fixed:
            name = f"{c.prefill}P+{c.decode}D" if c.disaggregated else f"coloc x{c.devices}"
            res = simulate(wl, sched, cost, num_blocks=1 << 16, cluster=c, slos=slos)
            per_seed.setdefault(name, []).append(row(name, res, slos, c.num_devices))
        costs = CostModel(cost.step_overhead_s, cost.prefill_token_s, cost.decode_token_s)
        ctl = PlannerController(Planner(cfg, costs), {r.id: r.output_tokens for r in wl}, interval, startup, window)
        start = Cluster(prefill=cfg.min_prefill, decode=cfg.min_decode)
        res = simulate(wl, sched, cost, num_blocks=1 << 16, cluster=start, slos=slos, controller=ctl)
        end = res.summary()["makespan"]
        per_seed.setdefault("planner", []).append(row("planner", res, slos, ctl.mean_devices(end)))
        traces[seed] = [(t, p, d) for t, p, d, _ in ctl.history]
    table = []
    for name, rows in per_seed.items():
        table.append({k: (statistics.median(r[k] for r in rows) if k != "config" else name) for k in rows[0]}
                     | {"goodput_min": min(r["goodput"] for r in rows), "goodput_max": max(r["goodput"] for r in rows)})
    return {"table": table, "planner_sizes": traces}


def format_table(table: list[dict]) -> str:
    lines = [f"{'config':<10}{'devices':>8}{'goodput':>9} {'[min-max]':<13}{'attain':>7}{'TTFT p90':>10}"
             f"{'TPOT p90':>10}"]
    for r in table:
        lines.append(f"{r['config']:<10}{r['devices']:>8.2f}{r['goodput']:>9.3f} "
                     f"[{r['goodput_min']:.2f}-{r['goodput_max']:.2f}]{'':<2}{r['attainment']:>7.0%}"
                     f"{r['ttft_p90_ms']:>8.0f}ms{r['tpot_p90_ms']:>8.0f}ms")
    return "\n".join(lines)


def parse_phase(text: str) -> Phase:
    try:
        seconds, rate, prompt, output = text.split(":")
        return Phase(float(seconds), float(rate), int(prompt), int(output))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a phase is SECONDS:RATE:PROMPT:OUTPUT, got {text!r}") from None


DEFAULT_PHASES = ["120:1.5:1200:16", "120:1.5:64:400", "120:1.5:1200:16", "120:1.5:64:400"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench autoscale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--costs", type=Path, default=ROOT / "docs" / "calibrated_costs.json")
    ap.add_argument("--phases", type=parse_phase, nargs="+", default=[parse_phase(p) for p in DEFAULT_PHASES],
                    help="SECONDS:RATE:PROMPT:OUTPUT per phase (default: prefill-heavy and decode-heavy twice)")
    ap.add_argument("--devices", type=int, default=6, help="the device budget (planner: max_devices)")
    ap.add_argument("--goodput", nargs="+", default=["ttft:3000", "tpot:150"], metavar="SLO:MS")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--interval", type=float, default=5.0, help="planner tick (simulated s)")
    ap.add_argument("--startup", type=float, default=10.0, help="a new worker's start time (simulated s)")
    ap.add_argument("--window", type=float, default=20.0, help="the planner's signal window (s)")
    ap.add_argument("--cooldown", type=float, default=15.0)
    ap.add_argument("--scale-down-after", type=float, default=30.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cost = CalibratedCost.from_file(args.costs)
    slos = parse_slos(args.goodput)
    if args.devices < 2:
        ap.error("--devices must be at least 2 (one prefill and one decode worker)")
    cfg = AutoscaleConfig(enabled=True, min_prefill=1, max_prefill=args.devices - 1, min_decode=1,
                          max_decode=args.devices - 1, max_devices=args.devices, ttft_slo_s=slos.get("ttft", 60.0),
                          tpot_slo_s=slos.get("tpot", 10.0), interval_s=args.interval, window_s=args.window,
                          cooldown_s=args.cooldown, scale_down_after_s=args.scale_down_after)
    sched = SchedulerConfig(starvation_timeout=float("inf"), max_preemptions=None)
    out = run(args.phases, args.devices, cost, slos, cfg, sched, list(range(args.seeds)), args.interval,
              args.startup, args.window)
    if args.json:
        print(json.dumps(out))
        return 0
    phases = " ".join(f"{p.seconds:g}:{p.rate:g}:{p.prompt}:{p.output}" for p in args.phases)
    print(f"phases (s:req/s:prompt:output): {phases}; budget {args.devices} devices; "
          f"SLOs {' '.join(args.goodput)}; medians of {args.seeds} seeds")
    print(format_table(out["table"]))
    sizes = out["planner_sizes"][0]
    changes = [(t, p, d) for (t, p, d), prev in zip(sizes, [(None, None, None)] + sizes, strict=False)
               if (p, d) != prev[1:]]
    print("planner sizes (seed 0), at each change: " + ", ".join(f"{t:.0f}s {p}P+{d}D" for t, p, d in changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

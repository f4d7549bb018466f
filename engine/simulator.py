"""`pdserve simulate`: the real scheduler (`engine.scheduler`) driven by a cost model
instead of the model, on a toy, file or Poisson workload.

Time is in the workload's units. With `unit` costs every prefill takes 2 time
steps and every decode step 1 (the reference's convention): a request's prompt
counts as 2 prefill units, a chunk is 1 unit, and a step that carries a whole
un-chunked prefill lasts as long as that prefill. With calibrated costs (a JSON
file: `step_overhead_s`, `prefill_token_s`, `decode_token_s`, as printed by
`pdserve bench engine --calibrate`) a step lasts overhead + per-token costs, in
seconds, and prompts keep their token counts.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling import SamplingParams
from engine.scheduler import QueueFullError, Scheduler, SchedulerOutput
from engine.sequence import FinishReason, Sequence


@dataclass
class SimRequest:
    id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int  # including the first token, produced by the prefill
    priority: int = 0
    deadline: float | None = None  # TTFT deadline, relative to arrival


def toy_workload() -> list[SimRequest]:
    """Table 5.1 of the reference: five requests, two prefill steps each."""
    rows = [("A", 0, 4), ("B", 1, 6), ("C", 1, 3), ("D", 4, 4), ("E", 5, 3)]
    return [SimRequest(rid, t, 2, decode_steps + 1) for rid, t, decode_steps in rows]


def jsonl_workload(path: Path) -> list[SimRequest]:
    reqs = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if line.strip():
            d = json.loads(line)
            reqs.append(SimRequest(str(d.get("id", i)), float(d["arrival"]), int(d["prompt_tokens"]),
                                   int(d["output_tokens"]), int(d.get("priority", 0)), d.get("deadline")))
    return reqs


def poisson_workload(rate: float, n: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int],
                     seed: int = 0, priorities: tuple[int, ...] = (0,)) -> list[SimRequest]:
    rng = random.Random(seed)
    t = 0.0
    reqs = []
    for i in range(n):
        t += rng.expovariate(rate)
        reqs.append(SimRequest(f"r{i}", t, rng.randint(*prompt_lens), rng.randint(*output_lens),
                               rng.choice(priorities)))
    return reqs


class UnitCost:
    discrete = True

    def prompt_units(self, req: SimRequest) -> int:
        return 2

    def step_time(self, out: SchedulerOutput, prefilling: list[int]) -> float:
        return max([1, *prefilling])


@dataclass
class CalibratedCost:
    step_overhead_s: float
    prefill_token_s: float
    decode_token_s: float
    discrete = False

    @classmethod
    def from_file(cls, path: Path) -> CalibratedCost:
        d = json.loads(Path(path).read_text())
        return cls(float(d["step_overhead_s"]), float(d["prefill_token_s"]), float(d["decode_token_s"]))

    def prompt_units(self, req: SimRequest) -> int:
        return req.prompt_tokens

    def step_time(self, out: SchedulerOutput, prefilling: list[int]) -> float:
        prefill = sum(prefilling)
        return self.step_overhead_s + self.prefill_token_s * prefill + self.decode_token_s * (
            out.num_batched_tokens - prefill)

    def __call__(self, prefill_tokens: int, decode_tokens: int) -> float:  # the scheduler's StepCost
        return self.step_overhead_s + self.prefill_token_s * prefill_tokens + self.decode_token_s * decode_tokens


@dataclass
class RequestTrace:
    id: str
    arrival: float
    priority: int
    start: float | None = None  # first step that did work for it
    first_token: float | None = None  # the step that produced its first token
    finish: float | None = None  # the last step that did work for it
    rejected: bool = False
    # (step start, duration, "prefill" | "decode") for the Gantt chart
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    num_output_tokens: int = 0
    last_token: float | None = None
    max_itl: float = 0.0  # the longest gap between two of its tokens (a stall shows here, not in the mean)

    def ttft(self, discrete: bool) -> float | None:
        return None if self.first_token is None else self.first_token + discrete - self.arrival

    def tpot(self) -> float | None:
        if self.finish is None or self.first_token is None or self.num_output_tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.num_output_tokens - 1)


@dataclass
class SimResult:
    policy: str
    discrete: bool
    requests: list[RequestTrace]

    def to_json(self) -> dict:
        keep = ("id", "arrival", "priority", "start", "first_token", "finish", "rejected", "num_output_tokens")
        return {"policy": self.policy,
                "requests": [{k: v for k, v in asdict(r).items() if k in keep} for r in self.requests],
                "summary": self.summary()}

    def summary(self) -> dict:
        done = [r for r in self.requests if r.finish is not None]
        ttfts = [r.ttft(self.discrete) for r in done]
        tpots = [t for r in done if (t := r.tpot()) is not None]
        end = max((r.finish + self.discrete for r in done), default=0.0)
        tokens = sum(r.num_output_tokens for r in done)
        return {"completed": len(done), "rejected": sum(r.rejected for r in self.requests), "makespan": end,
                "throughput": tokens / end if end else 0.0,
                "ttft_mean": statistics.fmean(ttfts) if ttfts else None,
                "ttft_max": max(ttfts, default=None),
                "tpot_mean": statistics.fmean(tpots) if tpots else None,
                "tpot_max": max(tpots, default=None),
                "itl_max": max((r.max_itl for r in done), default=None)}


def simulate(workload: list[SimRequest], config: SchedulerConfig, cost, num_blocks: int = 1 << 20,
             block_size: int = 16) -> SimResult:
    sched = Scheduler(config, BlockManager(num_blocks, block_size),
                      step_cost=cost if callable(cost) else _unit_step_cost)
    pending = sorted(workload, key=lambda r: r.arrival)
    traces = {r.id: RequestTrace(r.id, r.arrival, r.priority) for r in workload}
    now = 0.0
    i = 0
    while i < len(pending) or sched.has_unfinished():
        while i < len(pending) and pending[i].arrival <= now:
            r = pending[i]
            i += 1
            seq = Sequence(r.id, [0] * cost.prompt_units(r), SamplingParams(max_tokens=r.output_tokens),
                           arrival_time=r.arrival, priority=r.priority,
                           deadline=None if r.deadline is None else r.arrival + r.deadline)
            try:
                sched.add(seq, now)
            except QueueFullError:
                traces[r.id].rejected = True
        sched.input_closed = i == len(pending)
        out = sched.schedule(now)
        if not out.scheduled:  # idle until the next arrival or the scheduler's own timer
            wake = [t for t in (pending[i].arrival if i < len(pending) else None, sched.next_wakeup())
                    if t is not None and t > now]
            if not wake:
                raise RuntimeError(f"scheduler stalled at t={now} with work queued")
            now = min(wake)
            continue
        prefilling = [n for seq, n in out.scheduled if seq.num_computed_tokens < len(seq.prompt_token_ids)]
        dur = cost.step_time(out, prefilling)
        last = now + dur - 1 if cost.discrete else now + dur
        for seq, n in out.scheduled:
            tr = traces[seq.request_id]
            is_prefill = seq.num_computed_tokens < len(seq.prompt_token_ids)
            if tr.start is None:
                tr.start = now
            # a decode inside a longer (prefill-carrying) step takes one unit; the rest of the step it waits
            width = dur if (is_prefill or not cost.discrete) else 1
            tr.spans.append((now, width, "prefill" if is_prefill else "decode"))
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(0)
                tr.num_output_tokens = seq.num_output_tokens
                if tr.last_token is not None:
                    tr.max_itl = max(tr.max_itl, last - tr.last_token)
                tr.last_token = last
                if seq.num_output_tokens == 1:
                    tr.first_token = last
                if seq.num_output_tokens >= seq.params.max_tokens:
                    tr.finish = last
                    sched.finish(seq, FinishReason.LENGTH)
        now += dur
    return SimResult(config.policy, cost.discrete, [traces[r.id] for r in workload])


def _unit_step_cost(prefill_tokens: int, decode_tokens: int) -> float:
    return max(1, prefill_tokens)


def format_table(result: SimResult) -> str:
    lines = [f"policy {result.policy}",
             f"{'id':>6} {'arrival':>8} {'start':>7} {'first':>7} {'finish':>7} {'TTFT':>7} {'TPOT':>7}"]

    def f(x):
        return "-" if x is None else f"{x:.3g}"

    for r in result.requests:
        lines.append(f"{r.id:>6} {f(r.arrival):>8} {f(r.start):>7} {f(r.first_token):>7} {f(r.finish):>7} "
                     f"{f(r.ttft(result.discrete)):>7} {f(r.tpot()):>7}" + ("  rejected" if r.rejected else ""))
    s = result.summary()
    lines.append(f"completed {s['completed']}, rejected {s['rejected']}, all done at {f(s['makespan'])}, "
                 f"throughput {f(s['throughput'])} tok/unit, TTFT mean {f(s['ttft_mean'])}, "
                 f"TPOT mean {f(s['tpot_mean'])}")
    return "\n".join(lines)


def plot_gantt(result: SimResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reqs = result.requests
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(reqs) + 1.5))
    colors = {"prefill": "#DC2626", "decode": "#1E40AF", "waiting": "#D1D5DB"}
    for row, r in enumerate(reqs):
        y = len(reqs) - 1 - row
        if r.start is not None and r.start > r.arrival:
            ax.broken_barh([(r.arrival, r.start - r.arrival)], (y - 0.35, 0.7), color=colors["waiting"])
        for start, dur, kind in r.spans:
            ax.broken_barh([(start, dur)], (y - 0.35, 0.7), color=colors[kind], edgecolor="white")
    ax.set_yticks(range(len(reqs)), [r.id for r in reversed(reqs)])
    ax.set_xlabel("time step" if result.discrete else "seconds")
    ax.set_title(f"{result.policy} batching")
    if result.discrete:
        ax.set_xticks(range(int(result.summary()["makespan"]) + 1))
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="upper right", ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="toy", help="toy, poisson, or a JSONL file of requests")
    p.add_argument("--policy", default="continuous", choices=["static", "dynamic", "continuous", "chunked"])
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-prefill-chunk", type=int, default=None,
                   help="chunked: prefill tokens per sequence per step (unit costs: 1 of the 2 prefill units)")
    p.add_argument("--batch-timeout", type=float, default=2.0)
    p.add_argument("--costs", default="unit", help="unit, or a JSON file of calibrated costs")
    p.add_argument("--rate", type=float, default=1.0, help="poisson: arrivals per time unit")
    p.add_argument("--num-requests", type=int, default=50)
    p.add_argument("--prompt-lens", type=int, nargs=2, default=(64, 512))
    p.add_argument("--output-lens", type=int, nargs=2, default=(8, 256))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, default=None, help="write a Gantt chart (PNG)")


def run_cli(args: argparse.Namespace) -> int:
    cost = UnitCost() if args.costs == "unit" else CalibratedCost.from_file(Path(args.costs))
    if args.workload == "toy":
        workload = toy_workload()
    elif args.workload == "poisson":
        workload = poisson_workload(args.rate, args.num_requests, tuple(args.prompt_lens), tuple(args.output_lens),
                                    args.seed)
    else:
        workload = jsonl_workload(Path(args.workload))
    chunk = args.max_prefill_chunk or (1 if cost.discrete else None)
    config = SchedulerConfig(policy=args.policy, max_num_seqs=args.max_num_seqs,
                             max_num_batched_tokens=args.max_num_batched_tokens, max_prefill_chunk=chunk,
                             batch_timeout=args.batch_timeout, starvation_timeout=float("inf"), max_preemptions=None)
    result = simulate(workload, config, cost)
    if args.plot:
        plot_gantt(result, args.plot)
    print(json.dumps(result.to_json()) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="pdserve simulate")
    add_arguments(ap)
    sys.exit(run_cli(ap.parse_args()))

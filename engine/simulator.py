"""`pdserve simulate`: the real scheduler (`engine.scheduler`) driven by a cost model
instead of the model, on a toy, file or Poisson workload.

Time is in the workload's units. With `unit` costs every prefill takes 2 time
steps and every decode step 1 (the reference's convention): a request's prompt
counts as 2 prefill units, a chunk is 1 unit, and a step that carries a whole
un-chunked prefill lasts as long as that prefill. With calibrated costs (a JSON
file: `step_overhead_s`, `prefill_token_s`, `decode_token_s`, as printed by
`pdserve bench engine --calibrate`) a step lasts overhead + per-token costs, in
seconds, and prompts keep their token counts.

Several devices (`Cluster`): colocated, N instances that each prefill and decode
what the router sends them (`--devices N`); or disaggregated, P prefill and D
decode instances (`--disaggregated P:D`), each its own device with its own clock
and scheduler: a request leaves the prefill pool with its first token, its KV
crosses in latency + prompt tokens x KV bytes per token / bandwidth, and a decode
instance admits it and runs decode-only steps. `--goodput ttft:MS tpot:MS` adds
the rate and fraction of requests meeting those SLOs. `bench/project.py` uses
this for the disaggregated-vs-colocated projection in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import statistics
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import QueueFullError, Scheduler, SchedulerOutput
from pdserve.engine.sequence import FinishReason, Sequence


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
                     seed: int = 0, priorities: tuple[int, ...] = (0,), long_prompt: int = 0,
                     long_fraction: float = 0.0) -> list[SimRequest]:
    """Poisson arrivals; with `long_fraction` > 0 that share of requests has a `long_prompt`-token prompt
    instead (the mixed workload: long prompts arriving while others decode)."""
    rng = random.Random(seed)
    t = 0.0
    reqs = []
    for i in range(n):
        t += rng.expovariate(rate)
        prompt = rng.randint(*prompt_lens)
        if long_fraction > 0 and rng.random() < long_fraction:
            prompt = long_prompt
        reqs.append(SimRequest(f"r{i}", t, prompt, rng.randint(*output_lens), rng.choice(priorities)))
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
    prompt_tokens: int = 0
    start: float | None = None  # first step that did work for it
    first_token: float | None = None  # the first token reached the client (disaggregated: with its KV, see below)
    finish: float | None = None  # the last step that did work for it
    rejected: bool = False
    # (step start, duration, "prefill" | "decode") for the Gantt chart
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    num_output_tokens: int = 0
    last_token: float | None = None
    max_itl: float = 0.0  # the longest gap between two of its tokens (a stall shows here, not in the mean)
    instance: str | None = None  # the instance it was routed to (disaggregated: its prefill instance)
    decode_instance: str | None = None  # disaggregated: the decode instance that received its KV
    prefill_done: float | None = None  # disaggregated: the prefill step that produced its first token ended
    kv_ready: float | None = None  # disaggregated: its KV (and first token) arrived at the decode pool

    def ttft(self, discrete: bool) -> float | None:
        return None if self.first_token is None else self.first_token + discrete - self.arrival

    def tpot(self) -> float | None:
        if self.finish is None or self.first_token is None or self.num_output_tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.num_output_tokens - 1)


@dataclass
class StepRecord:
    start: float
    duration: float
    prefill_tokens: int  # tokens of prompts (or recomputed outputs) being prefilled
    decode_tokens: int
    num_seqs: int


@dataclass
class InstanceStats:
    name: str
    role: str  # colocated | prefill | decode
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def busy(self) -> float:
        return sum(s.duration for s in self.steps)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default, as `pdserve bench serve` reports)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """`ttft:3000 tpot:200 e2e:10000` (milliseconds) -> {"ttft": 3.0, ...} in seconds."""
    slos = {}
    for item in items or []:
        name, ms = item.split(":")
        if name not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"unknown SLO {name!r} (ttft, tpot or e2e)")
        slos[name] = float(ms) / 1e3
    return slos


@dataclass
class SimResult:
    policy: str
    discrete: bool
    requests: list[RequestTrace]
    mode: str = "colocated"  # colocated | disaggregated
    instances: list[InstanceStats] = field(default_factory=list)
    # (time, request id, "first_token" | "kv_ready" | "finish", instance): every token-level milestone, in order
    events: list[tuple[float, str, str, str]] = field(default_factory=list)
    slos: dict[str, float] | None = None  # seconds (time units with unit costs); goodput counts requests meeting all

    def to_json(self) -> dict:
        keep = ("id", "arrival", "priority", "prompt_tokens", "start", "first_token", "finish", "rejected",
                "num_output_tokens", "instance", "decode_instance", "kv_ready")
        return {"policy": self.policy, "mode": self.mode,
                "requests": [{k: v for k, v in asdict(r).items() if k in keep} for r in self.requests],
                "summary": self.summary()}

    def meets(self, r: RequestTrace, slos: dict[str, float]) -> bool:
        """Finished and within every SLO (a TPOT that does not exist, one output token, does not count against)."""
        if r.finish is None:
            return False
        values = {"ttft": r.ttft(self.discrete), "tpot": r.tpot(), "e2e": r.finish + self.discrete - r.arrival}
        return all(values[k] is None or values[k] <= limit for k, limit in slos.items())

    def summary(self, slos: dict[str, float] | None = None) -> dict:
        slos = self.slos if slos is None else slos
        done = [r for r in self.requests if r.finish is not None]
        ttfts = [r.ttft(self.discrete) for r in done]
        tpots = [t for r in done if (t := r.tpot()) is not None]
        end = max((r.finish + self.discrete for r in done), default=0.0)
        tokens = sum(r.num_output_tokens for r in done)
        out = {"completed": len(done), "rejected": sum(r.rejected for r in self.requests), "makespan": end,
               "throughput": tokens / end if end else 0.0,
               "ttft_mean": statistics.fmean(ttfts) if ttfts else None,
               "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
               "ttft_max": max(ttfts, default=None),
               "tpot_mean": statistics.fmean(tpots) if tpots else None,
               "tpot_p50": percentile(tpots, 50), "tpot_p99": percentile(tpots, 99),
               "tpot_max": max(tpots, default=None),
               "itl_max": max((r.max_itl for r in done), default=None)}
        if slos:
            # DistServe's goodput, as `pdserve bench serve` computes it: requests meeting every SLO per unit of
            # time from the first arrival to the last token; and the fraction of all requests that met them
            good = sum(self.meets(r, slos) for r in done)
            span = end - min((r.arrival for r in self.requests), default=0.0)
            out.update(slos=dict(slos), good=good, goodput=good / span if span > 0 else 0.0,
                       slo_attainment=good / len(self.requests) if self.requests else None)
        if self.instances:
            out["instances"] = [{"name": i.name, "role": i.role, "steps": len(i.steps), "busy": i.busy,
                                 "utilization": i.busy / end if end else 0.0} for i in self.instances]
        return out


@dataclass(frozen=True)
class Cluster:
    """Where the simulated requests run; every instance is its own device with its own clock and scheduler.

    Colocated (`prefill == 0`): `devices` instances, each prefilling and decoding the requests routed to it.
    Disaggregated: `prefill` instances run prompt-only work (a request leaves its prefill instance with its
    first token); its KV then crosses to a decode instance in `transfer_latency_s + KV bytes / bandwidth`
    (KV bytes = prompt tokens x `kv_bytes_per_token`; one transfer at a time per prefill instance's link),
    and the decode instance admits it, running only decode steps. The client sees the first token when the
    KV has arrived (pdserve's prefill worker returns it once the decode side acknowledged the KV).
    Routing: `least-loaded` sends a prompt to the instance with the fewest uncomputed tokens queued (then the
    fewest requests) and KV to the decode instance with the fewest requests, as pdserve's router does;
    or `round-robin`."""

    devices: int = 1
    prefill: int = 0
    decode: int = 0
    router: str = "least-loaded"
    transfer_gbps: float = 1.2  # GB/s (gigabytes): the measured gRPC / gloo transport at 128 MiB
    transfer_latency_s: float = 0.005  # fixed cost per transfer (the measured 1 MiB transfer: ~5 ms)
    kv_bytes_per_token: int = 46_080  # SmolLM2-135M, fp32: 30 layers x 3 KV heads x 64 x 2 (K, V) x 4 B

    def __post_init__(self) -> None:
        if self.router not in ("least-loaded", "round-robin"):
            raise ValueError(f"router must be least-loaded or round-robin, got {self.router!r}")
        if self.disaggregated and self.decode < 1:
            raise ValueError("a disaggregated cluster needs at least one prefill and one decode instance")
        if not self.disaggregated and self.devices < 1:
            raise ValueError("a colocated cluster needs at least one device")
        if self.transfer_gbps <= 0 or self.transfer_latency_s < 0 or self.kv_bytes_per_token < 0:
            raise ValueError("transfer bandwidth must be positive, latency and KV bytes non-negative")

    @property
    def disaggregated(self) -> bool:
        return self.prefill > 0

    @property
    def num_devices(self) -> int:
        return self.prefill + self.decode if self.disaggregated else self.devices

    def wire_time(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / (self.transfer_gbps * 1e9)

    def transfer_time(self, tokens: int) -> float:
        return self.transfer_latency_s + self.wire_time(tokens)

    def describe(self) -> str:
        if self.disaggregated:
            return (f"disaggregated {self.prefill}P+{self.decode}D, KV {self.kv_bytes_per_token} B/token at "
                    f"{self.transfer_gbps:g} GB/s + {self.transfer_latency_s * 1e3:g} ms")
        return f"colocated, {self.devices} device{'s' * (self.devices > 1)}"


@dataclass
class PoolView:
    """What a `Controller` sees at one of its ticks: the pool sizes (ready or starting, not draining), the
    requests so far (arrived: their traces), and the queues now."""

    now: float
    prefill: int  # 0 when colocated
    decode: int  # colocated: the devices
    traces: list[RequestTrace]  # every request that has arrived, in arrival order
    prefill_queue_tokens: int  # prompt tokens not yet computed at the instances that prefill
    decode_waiting: int  # disaggregated: requests whose KV arrived and wait for a decode slot


class Controller:
    """Resizes a simulated cluster while it runs (`simulate(controller=...)`): called every `interval_s`
    of simulated time with a `PoolView`, it answers the sizes it wants (prefill, decode; colocated: prefill
    is ignored). A new instance takes `startup_s` before it is routed to; a removed one drains (is routed
    nothing new and finishes what it holds)."""

    interval_s: float = 5.0
    startup_s: float = 0.0

    def __call__(self, view: PoolView) -> tuple[int, int]:
        raise NotImplementedError


class _Instance:
    """One device: a scheduler, the step in flight (if any) and, for a decode instance, the requests whose
    KV arrived and wait for a slot (and blocks); for a prefill instance, when its KV link is next free."""

    def __init__(self, name: str, role: str, config: SchedulerConfig, cost, num_blocks: int, block_size: int):
        self.name, self.role = name, role
        self.sched = Scheduler(config, BlockManager(num_blocks, block_size),
                               step_cost=cost if callable(cost) else _unit_step_cost)
        self.stats = InstanceStats(name, role)
        self.step: tuple[SchedulerOutput, float, float] | None = None  # (output, start, duration)
        self.inbox: deque[Sequence] = deque()
        self.link_free = 0.0
        self.ready_at = 0.0  # a controller's new instance is routed to from then on
        self.draining = False  # a controller removed it: routed nothing new, it finishes what it holds

    @property
    def busy_until(self) -> float | None:
        return None if self.step is None else self.step[1] + self.step[2]

    def load(self) -> tuple[int, int]:
        """(uncomputed tokens, requests) held: the prefill queue depth first, as pdserve's router weighs it."""
        s = self.sched
        held = [*s.waiting, *s.running, *s.swapped, *self.inbox]
        return sum(q.num_uncomputed for q in held), len(held)

    def admit_arrived_kv(self) -> None:
        s = self.sched
        while self.inbox:
            seq = self.inbox[0]
            need = s.blocks.blocks_for(seq.num_computed_tokens)
            if len(s.running) >= s.config.max_num_seqs or not s.blocks.can_allocate(need):
                return  # back-pressure: it waits for a slot (pdserve's reservation waits the same way)
            self.inbox.popleft()
            seq.block_table = s.blocks.allocate(need)
            s.add_running(seq)


def simulate(workload: list[SimRequest], config: SchedulerConfig, cost, num_blocks: int = 1 << 20,
             block_size: int = 16, cluster: Cluster | None = None, decode_config: SchedulerConfig | None = None,
             slos: dict[str, float] | None = None, controller: Controller | None = None) -> SimResult:
    """Event-driven and deterministic: every instance has its own clock; events at the same time are taken
    in a fixed order (steps ending, KV arriving, requests arriving, then idle instances start their next
    step, in instance order). A step's effects land when it ends. `config` is every colocated instance's
    scheduler, or the prefill pool's; `decode_config` the decode pool's (default: `config`). A `controller`
    resizes the pools as it runs (`cluster` gives the starting sizes)."""
    cluster = cluster or Cluster()
    discrete = cost.discrete

    def make(name: str, role: str, cfg: SchedulerConfig) -> _Instance:
        return _Instance(name, role, cfg, cost, num_blocks, block_size)

    if cluster.disaggregated:
        dcfg = decode_config or config
        for cfg in (config, dcfg):
            if cfg.policy not in ("continuous", "chunked"):
                raise ValueError(f"disaggregated pools run iteration-level policies (continuous, chunked), "
                                 f"not {cfg.policy!r}")
        entry = [make(f"prefill{i}", "prefill", config) for i in range(cluster.prefill)]
        decode = [make(f"decode{i}", "decode", dcfg) for i in range(cluster.decode)]
    else:
        entry = [make(f"device{i}", "colocated", config) for i in range(cluster.devices)]
        decode = []
    instances = entry + decode
    reqs = {r.id: r for r in workload}
    if len(reqs) != len(workload):
        raise ValueError("request ids must be unique")
    pending = sorted(workload, key=lambda r: r.arrival)
    traces = {r.id: RequestTrace(r.id, r.arrival, r.priority, r.prompt_tokens) for r in workload}
    events: list[tuple[float, str, str, str]] = []
    transfers: list[tuple[float, int, str, Sequence]] = []  # heap of (KV arrives, order, request, prefill seq)
    order = itertools.count()
    turns = {"entry": itertools.count(), "decode": itertools.count()}

    def pick(pool: list[_Instance], turn: str, key) -> _Instance:
        pool = ([x for x in pool if not x.draining and x.ready_at <= now] or [x for x in pool if not x.draining]
                or pool)
        if cluster.router == "round-robin":
            return pool[next(turns[turn]) % len(pool)]
        return min(pool, key=key)  # ties: the first instance

    def route(r: SimRequest, now: float) -> None:
        inst = pick(entry, "entry", _Instance.load)
        seq = Sequence(r.id, [0] * cost.prompt_units(r),
                       SamplingParams(max_tokens=1 if cluster.disaggregated else r.output_tokens),
                       arrival_time=r.arrival, priority=r.priority,
                       deadline=None if r.deadline is None else r.arrival + r.deadline)
        traces[r.id].instance = inst.name
        try:
            inst.sched.add(seq, now)
        except QueueFullError:
            traces[r.id].rejected = True

    def start_step(inst: _Instance, now: float) -> None:
        out = inst.sched.schedule(now)
        if not out.scheduled:
            return
        prefilling = [n for seq, n in out.scheduled if seq.num_computed_tokens < len(seq.prompt_token_ids)]
        dur = cost.step_time(out, prefilling)
        inst.step = (out, now, dur)
        inst.stats.steps.append(StepRecord(now, dur, sum(prefilling), out.num_batched_tokens - sum(prefilling),
                                           len(out.scheduled)))
        for seq, _ in out.scheduled:
            tr = traces[seq.request_id]
            is_prefill = seq.num_computed_tokens < len(seq.prompt_token_ids)
            if tr.start is None:
                tr.start = now
            # a decode inside a longer (prefill-carrying) step takes one unit; the rest of the step it waits
            width = dur if (is_prefill or not discrete) else 1
            tr.spans.append((now, width, "prefill" if is_prefill else "decode"))

    def token(tr: RequestTrace, t: float) -> None:
        if tr.last_token is not None:
            tr.max_itl = max(tr.max_itl, t - tr.last_token)
        tr.last_token = t

    def end_step(inst: _Instance) -> None:
        out, start, dur = inst.step
        inst.step = None
        last = start + dur - 1 if discrete else start + dur
        for seq, n in out.scheduled:
            rid = seq.request_id
            tr = traces[rid]
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                continue
            seq.output_token_ids.append(0)
            if inst.role == "prefill":  # prompt done: the first token, then the KV leaves for the decode pool
                inst.sched.finish(seq, FinishReason.PREFILLED)
                events.append((last, rid, "first_token", inst.name))
                tr.prefill_done = last
                if reqs[rid].output_tokens <= 1:
                    tr.num_output_tokens = 1
                    tr.first_token = tr.finish = last
                    token(tr, last)
                    events.append((last, rid, "finish", inst.name))
                    continue
                begin = max(last, inst.link_free)
                inst.link_free = begin + cluster.wire_time(len(seq.prompt_token_ids))
                heapq.heappush(transfers, (inst.link_free + cluster.transfer_latency_s, next(order), rid, seq))
                continue
            tr.num_output_tokens = seq.num_output_tokens
            token(tr, last)
            if seq.num_output_tokens == 1:
                tr.first_token = last
                events.append((last, rid, "first_token", inst.name))
            if seq.num_output_tokens >= seq.params.max_tokens:
                tr.finish = last
                inst.sched.finish(seq, FinishReason.LENGTH)
                events.append((last, rid, "finish", inst.name))

    def kv_arrives(rid: str, t: float, prefilled: Sequence) -> None:
        r, tr = reqs[rid], traces[rid]
        inst = pick(decode, "decode", lambda d: (d.load()[1], d.load()[0]))
        seq = Sequence(rid, list(prefilled.prompt_token_ids), SamplingParams(max_tokens=r.output_tokens),
                       arrival_time=r.arrival, output_token_ids=list(prefilled.output_token_ids),
                       priority=r.priority)
        seq.num_computed_tokens = len(seq.prompt_token_ids)  # the KV of the prompt; the first token is new
        tr.kv_ready = tr.first_token = t
        tr.num_output_tokens = 1
        tr.decode_instance = inst.name
        token(tr, t)
        events.append((t, rid, "kv_ready", inst.name))
        inst.inbox.append(seq)

    names = itertools.count(len(instances))
    next_tick = 0.0 if controller else math.inf

    def control(now: float) -> None:
        pools = {"prefill" if cluster.disaggregated else "colocated": entry, "decode": decode}
        live = {role: [x for x in pool if not x.draining] for role, pool in pools.items()}
        sizes = (len(live["prefill"]), len(live["decode"])) if cluster.disaggregated else (0, len(live["colocated"]))
        view = PoolView(now, *sizes, [traces[r.id] for r in pending[:i]], sum(x.load()[0] for x in entry),
                        sum(len(x.inbox) for x in decode))
        want_p, want_d = controller(view)
        wants = {"prefill": want_p, "decode": want_d} if cluster.disaggregated else {"colocated": want_d}
        for role, want in wants.items():
            pool, have = pools[role], live[role]
            cfg = (decode_config or config) if role == "decode" else config
            for _ in range(want - len(have)):
                inst = make(f"{role if role != 'colocated' else 'device'}{next(names)}", role, cfg)
                inst.ready_at = now + controller.startup_s
                pool.append(inst)
                instances.append(inst)
            for inst in have[max(want, 1):][::-1]:  # the newest go first
                inst.draining = True

    now, i = 0.0, 0
    while True:
        for inst in instances:
            if inst.step is not None and inst.busy_until <= now:
                end_step(inst)
        while transfers and transfers[0][0] <= now:
            t, _, rid, seq = heapq.heappop(transfers)
            kv_arrives(rid, t, seq)
        while i < len(pending) and pending[i].arrival <= now:
            route(pending[i], now)
            i += 1
        if now >= next_tick:
            control(now)
            next_tick = now + controller.interval_s
        for inst in instances:
            inst.admit_arrived_kv()
            if inst.step is None:
                inst.sched.input_closed = i == len(pending)
                start_step(inst, now)
        wake = [inst.busy_until for inst in instances if inst.step is not None]
        wake += [w for inst in instances if inst.step is None and (w := inst.sched.next_wakeup()) is not None
                 and w > now]
        if i < len(pending):
            wake.append(pending[i].arrival)
        if transfers:
            wake.append(transfers[0][0])
        if wake and next_tick < math.inf:  # the controller ticks while anything is left to happen
            wake.append(next_tick)
        if not wake:
            if any(inst.sched.has_unfinished() or inst.inbox for inst in instances):
                raise RuntimeError(f"scheduler stalled at t={now} with work queued")
            break
        now = min(wake)
    return SimResult(config.policy, discrete, [traces[r.id] for r in workload],
                     "disaggregated" if cluster.disaggregated else "colocated",
                     [inst.stats for inst in instances], events, slos)


def _unit_step_cost(prefill_tokens: int, decode_tokens: int) -> float:
    return max(1, prefill_tokens)


def format_table(result: SimResult) -> str:
    lines = [f"policy {result.policy}" + (f", {result.mode}" if len(result.instances) > 1 else ""),
             f"{'id':>6} {'arrival':>8} {'start':>7} {'first':>7} {'finish':>7} {'TTFT':>7} {'TPOT':>7}"]

    def f(x):
        return "-" if x is None else f"{x:.3g}"

    many = len(result.instances) > 1
    if many:
        lines[1] += "  instance"
    for r in result.requests:
        where = "  " + "->".join(x for x in (r.instance, r.decode_instance) if x) if many else ""
        lines.append(f"{r.id:>6} {f(r.arrival):>8} {f(r.start):>7} {f(r.first_token):>7} {f(r.finish):>7} "
                     f"{f(r.ttft(result.discrete)):>7} {f(r.tpot()):>7}" + where + ("  rejected" if r.rejected else ""))
    return "\n".join(lines + [format_summary(result)])


def format_summary(result: SimResult) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3g}"

    s = result.summary()
    lines = [f"completed {s['completed']}, rejected {s['rejected']}, all done at {f(s['makespan'])}, "
             f"throughput {f(s['throughput'])} tok/unit, TTFT mean {f(s['ttft_mean'])}, "
             f"TPOT mean {f(s['tpot_mean'])}"]
    if len(result.instances) > 1 or s.get("slos"):
        lines.append(f"TTFT p50 {f(s['ttft_p50'])} p99 {f(s['ttft_p99'])}, TPOT p50 {f(s['tpot_p50'])} "
                     f"p99 {f(s['tpot_p99'])}, ITL max {f(s['itl_max'])}")
    if s.get("slos"):
        lines.append(f"goodput {f(s['goodput'])} req/unit ({s['good']} of {len(result.requests)} requests met "
                     f"{', '.join(f'{k} <= {v:g}' for k, v in s['slos'].items())})")
    if len(result.instances) > 1:
        lines.append("instances: " + ", ".join(f"{i['name']} ({i['role']}) {i['steps']} steps, busy "
                                               f"{i['utilization']:.0%}" for i in s["instances"]))
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
    p.add_argument("--long-prompt-len", type=int, default=0,
                   help="poisson: the long prompts' length (the mixed workload), with --long-fraction")
    p.add_argument("--long-fraction", type=float, default=0.0, help="poisson: share of requests with a long prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=None,
                   help="colocated: this many instances (devices), each running --policy on its own requests")
    p.add_argument("--disaggregated", default=None, metavar="P:D",
                   help="P prefill + D decode instances, each its own device; --policy is the prefill pool's "
                        "(continuous or chunked), the decode pool runs decode-only steps")
    p.add_argument("--router", default="least-loaded", choices=["least-loaded", "round-robin"])
    p.add_argument("--transfer-gbps", type=float, default=1.2,
                   help="disaggregated: KV bandwidth in GB/s, gigaBYTES (measured gRPC/gloo here: ~1.2; "
                        "NVLink/RDMA: 25-400)")
    p.add_argument("--transfer-latency-ms", type=float, default=5.0, help="disaggregated: fixed cost per transfer")
    p.add_argument("--kv-bytes-per-token", type=int, default=46_080,
                   help="disaggregated: KV bytes per prompt token (SmolLM2-135M fp32: 46,080)")
    p.add_argument("--goodput", nargs="*", default=None, metavar="SLO:MS",
                   help="SLOs in ms (time units x 1000 with unit costs), e.g. ttft:3000 tpot:200: adds goodput")
    p.add_argument("--summary-only", action="store_true", help="print the summary, not the per-request table")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, default=None, help="write a Gantt chart (PNG)")


def run_cli(args: argparse.Namespace) -> int:
    cost = UnitCost() if args.costs == "unit" else CalibratedCost.from_file(Path(args.costs))
    if args.workload == "toy":
        workload = toy_workload()
    elif args.workload == "poisson":
        workload = poisson_workload(args.rate, args.num_requests, tuple(args.prompt_lens), tuple(args.output_lens),
                                    args.seed, long_prompt=args.long_prompt_len, long_fraction=args.long_fraction)
    else:
        workload = jsonl_workload(Path(args.workload))
    chunk = args.max_prefill_chunk or (1 if cost.discrete else None)
    config = SchedulerConfig(policy=args.policy, max_num_seqs=args.max_num_seqs,
                             max_num_batched_tokens=args.max_num_batched_tokens, max_prefill_chunk=chunk,
                             batch_timeout=args.batch_timeout, starvation_timeout=float("inf"), max_preemptions=None)
    try:
        cluster = parse_cluster(args)
    except ValueError as e:
        print(f"pdserve simulate: {e}", file=sys.stderr)
        return 2
    result = simulate(workload, config, cost, cluster=cluster, slos=parse_slos(args.goodput) or None)
    if args.plot:
        plot_gantt(result, args.plot)
    if args.json:
        print(json.dumps({**result.to_json(), "cluster": asdict(cluster)}))
    else:
        print(format_summary(result) if args.summary_only else format_table(result))
    return 0


def parse_cluster(args: argparse.Namespace) -> Cluster:
    common = {"router": args.router, "transfer_gbps": args.transfer_gbps,
              "transfer_latency_s": args.transfer_latency_ms / 1e3, "kv_bytes_per_token": args.kv_bytes_per_token}
    if args.disaggregated:
        try:
            p, d = (int(x) for x in args.disaggregated.split(":"))
        except ValueError:
            raise ValueError(f"--disaggregated takes P:D (e.g. 1:1), got {args.disaggregated!r}") from None
        if p < 1 or d < 1:
            raise ValueError("--disaggregated needs at least one prefill and one decode instance")
        if args.devices is not None and args.devices != p + d:
            raise ValueError(f"--devices {args.devices} does not match --disaggregated {p}:{d}")
        if args.policy not in ("continuous", "chunked"):
            raise ValueError("--disaggregated runs --policy continuous or chunked in its pools")
        return Cluster(prefill=p, decode=d, **common)
    return Cluster(devices=args.devices or 1, **common)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="pdserve simulate")
    add_arguments(ap)
    sys.exit(run_cli(ap.parse_args()))

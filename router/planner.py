"""The SLA planner: how many prefill and decode workers the load needs (pure decision logic, no Ray).

Every tick the live loop (`router.autoscale`) or the simulator's controller (`bench.autoscale`) hands
`Planner.decide` one `Signals`: the pool sizes, the request and prompt-token rates and the mean output length
over the last window, the queues now, and the TTFT and TPOT the router observed. The planner predicts, with
the step-cost model the simulator uses (`step_overhead_s + prefill_token_s x prefill tokens + decode_token_s x
decode tokens`, from a calibration or the workers' own measurements), the TTFT and TPOT each pool size would
give, and answers a `Decision`: the size per pool and why.

The model, per pool of n workers, the load spread evenly:
  * prefill: each request's prefill takes `s = overhead + prompt x prefill_token_s`; utilization
    `rho = rate x s / n`; TTFT ~ the queue it finds (the current backlog's prefill time / n) + an M/D/1
    wait `rho s / 2(1 - rho)` + s.
  * decode: a request spends `output - 1` decode steps; the decode work per second `rate x (output - 1) x
    decode_token_s / n` is the decode utilization `rho`; a step then lasts `overhead / (1 - rho)` (the batch
    grows until the steps keep up: Little's law), which is the TPOT.
  * colocated (no prefill pool): the decode workers also prefill, so the prefill work per second adds to
    `rho` (TPOT `overhead / (1 - rho_decode - rho_prefill)`) and the TTFT wait is that of the combined load.
The smallest size whose predicted TTFT/TPOT meet the targets with `rho <= target_utilization` is what the
pool needs. A pool whose observed TPOT (decode) or TTFT with a prefill backlog (prefill) misses its target
while the model says it should not gets one more worker: the measurement outranks the model.

Hysteresis, so a steady load never flaps: a short pool grows at once (to what it needs); a pool shrinks only
when even `scale_down_utilization` (and targets scaled down by the same ratio) would be met by a smaller size,
continuously for `scale_down_after_s`, and with no target missed; then by one worker. A pool changed within
`cooldown_s` holds. Sizes stay within min/max, and with `max_devices` the growth is trimmed from the pool the
model says loses least by it.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.config import AutoscaleConfig

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class CostModel:
    """Seconds per engine step: overhead + per prefill token + per decode token (`pdserve bench engine
    --calibrate`'s fields, the simulator's `CalibratedCost`)."""

    step_overhead_s: float
    prefill_token_s: float
    decode_token_s: float

    def __post_init__(self) -> None:
        if min(self.step_overhead_s, self.prefill_token_s, self.decode_token_s) < 0:
            raise ValueError("step costs must not be negative")


def fit_decode_costs(samples: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(overhead, per token) from measured (batch size, decode step seconds) pairs, by least squares; None
    without two distinct batch sizes. A negative fit is clamped (noise on a flat curve)."""
    pts = [(b, t) for b, t in samples if b > 0 and t > 0]
    if len({b for b, _ in pts}) < 2:
        return None
    n = len(pts)
    mb, mt = sum(b for b, _ in pts) / n, sum(t for _, t in pts) / n
    slope = sum((b - mb) * (t - mt) for b, t in pts) / sum((b - mb) ** 2 for b, _ in pts)
    slope = max(slope, 0.0)
    return max(mt - slope * mb, 0.0), slope


@dataclass(frozen=True)
class Signals:
    """One tick's view of the load: rates over the planner's window, queues now."""

    now: float  # seconds (any monotonic clock)
    prefill: int  # pool sizes the scale path keeps (workers live or starting, not draining)
    decode: int
    request_rate: float  # requests arriving per second
    prompt_tokens_per_s: float  # prompt tokens arriving per second (to prefill)
    output_tokens: float  # mean output tokens per request
    prefill_queue_tokens: int = 0  # prompt tokens waiting or prefilling at the pool that prefills, now
    decode_waiting: int = 0  # requests waiting for a decode slot, now
    ttft_s: float | None = None  # observed over the window (None: no request finished its first token)
    tpot_s: float | None = None
    colocated: bool = False  # no prefill pool: the decode workers prefill too


@dataclass(frozen=True)
class Prediction:
    utilization: float
    ttft_s: float  # prefill pool (or colocated): the predicted TTFT; decode: 0
    tpot_s: float  # decode pool (or colocated): the predicted TPOT; prefill: 0


@dataclass(frozen=True)
class Decision:
    prefill: int
    decode: int
    reasons: dict[str, str]  # role -> why it stays or changes (every tick, every pool)
    changed: tuple[str, ...]  # the roles whose size changed
    predicted: dict[str, Prediction] = field(default_factory=dict)  # role -> at the decided size

    def size(self, role: str) -> int:
        return self.prefill if role == "prefill" else self.decode


class Planner:
    """Stateful only in time: when each pool last changed, and since when it has looked oversized."""

    def __init__(self, config: AutoscaleConfig, costs: CostModel):
        self.config = config
        self.costs = costs
        self.last_change: dict[str, float] = {}
        self.low_since: dict[str, float] = {}

    # -- the model ----------------------------------------------------------------------------------------
    def predict(self, role: str, n: int, s: Signals) -> Prediction:
        c = self.costs
        rate = max(s.request_rate, 0.0)
        prompt = s.prompt_tokens_per_s / rate if rate > 0 else 0.0
        service = c.step_overhead_s + prompt * c.prefill_token_s if rate > 0 else 0.0
        prefill_rho = rate * service / n
        decode_rho = rate * max(s.output_tokens - 1, 0.0) * c.decode_token_s / n
        if role == "prefill" or s.colocated:
            rho = prefill_rho + (decode_rho if s.colocated else 0.0)
            backlog = s.prefill_queue_tokens * c.prefill_token_s / n
            ttft = math.inf if rho >= 1 else backlog + service + rho * service / (2 * (1 - rho))
        else:
            rho, ttft = decode_rho, 0.0
        tpot = 0.0
        if role == "decode":
            tpot = math.inf if rho >= 1 else c.step_overhead_s / (1 - rho)
        return Prediction(rho, ttft, tpot)

    def _fits(self, role: str, n: int, s: Signals, utilization: float, margin: float) -> bool:
        p = self.predict(role, n, s)
        cfg = self.config
        return (p.utilization <= utilization and p.ttft_s <= cfg.ttft_slo_s * margin
                and p.tpot_s <= cfg.tpot_slo_s * margin)

    def needed(self, role: str, s: Signals, utilization: float, margin: float = 1.0) -> int:
        """The smallest size in [min, max] predicted to meet the targets at this utilization (max if none)."""
        lo, hi = self.bounds(role)
        return next((n for n in range(max(lo, 1), hi + 1) if self._fits(role, n, s, utilization, margin)), hi)

    def bounds(self, role: str) -> tuple[int, int]:
        c = self.config
        return (c.min_prefill, c.max_prefill) if role == "prefill" else (c.min_decode, c.max_decode)

    def _missed(self, role: str, s: Signals) -> str | None:
        """The target this pool is observed to miss, when it is this pool's doing."""
        c = self.config
        if role == "decode" and s.tpot_s is not None and s.tpot_s > c.tpot_slo_s:
            return f"observed TPOT {s.tpot_s * 1e3:.0f} ms > {c.tpot_slo_s * 1e3:g} ms"
        prefills = "decode" if s.colocated else "prefill"
        if role == prefills and s.ttft_s is not None and s.ttft_s > c.ttft_slo_s and s.prefill_queue_tokens > 0:
            return f"observed TTFT {s.ttft_s * 1e3:.0f} ms > {c.ttft_slo_s * 1e3:g} ms with a prefill backlog"
        if role == "decode" and s.ttft_s is not None and s.ttft_s > c.ttft_slo_s and s.decode_waiting > 0:
            return (f"observed TTFT {s.ttft_s * 1e3:.0f} ms > {c.ttft_slo_s * 1e3:g} ms with {s.decode_waiting} "
                    "requests waiting for a decode slot")
        return None

    # -- the decision -------------------------------------------------------------------------------------
    def decide(self, s: Signals) -> Decision:
        roles = ("decode",) if s.colocated else ROLES
        current = {"prefill": s.prefill, "decode": s.decode}
        want = dict(current)
        reasons: dict[str, str] = {}
        for role in roles:
            want[role], reasons[role] = self._want(role, current[role], s)
        if s.colocated:
            reasons["prefill"] = "colocated: no prefill pool"
        self._fit_budget(want, current, reasons, s)
        changed = tuple(r for r in roles if want[r] != current[r])
        for role in changed:
            self.last_change[role] = s.now
            self.low_since.pop(role, None)
        predicted = {r: self.predict(r, max(want[r], 1), s) for r in roles}
        return Decision(want["prefill"], want["decode"], reasons, changed, predicted)

    def _want(self, role: str, cur: int, s: Signals) -> tuple[int, str]:
        """This pool's size after this tick, and why (before the device budget)."""
        cfg = self.config
        lo, hi = self.bounds(role)
        if cur < lo or cur > hi:
            self.low_since.pop(role, None)
            return min(max(cur, lo), hi), f"{cur} is outside [{lo}, {hi}]"
        up = self.needed(role, s, cfg.target_utilization)
        missed = self._missed(role, s)
        p = self.predict(role, max(cur, 1), s)
        shown = [f"TTFT {_ms(p.ttft_s)}"] * (role == "prefill" or s.colocated) + [f"TPOT {_ms(p.tpot_s)}"] * (
            role == "decode")
        now_text = f"utilization {p.utilization:.2f}, predicted {' '.join(shown)} at {cur}"
        if missed and up <= cur:
            up = min(cur + 1, hi)
        cooling = s.now - self.last_change.get(role, -math.inf) < cfg.cooldown_s
        if up > cur:
            self.low_since.pop(role, None)
            why = missed or f"needs {up}: {now_text}"
            if cooling:
                return cur, f"hold (cooldown): {why}"
            return up, f"grow {cur} -> {up}: {why}"
        if missed:
            self.low_since.pop(role, None)
            return cur, f"hold at max {hi}: {missed}" if cur == hi else f"hold: {missed}"
        if cur == hi and not self._fits(role, cur, s, cfg.target_utilization, 1.0):
            self.low_since.pop(role, None)
            return cur, f"hold at max {hi}: short ({now_text})"
        down = self.needed(role, s, cfg.scale_down_utilization, cfg.scale_down_utilization / cfg.target_utilization)
        if down >= cur:
            self.low_since.pop(role, None)
            return cur, f"steady: {now_text}"
        since = self.low_since.setdefault(role, s.now)
        if s.now - since < cfg.scale_down_after_s:
            return cur, f"hold: {down} would do, for {s.now - since:.0f} of {cfg.scale_down_after_s:g} s"
        if cooling:
            return cur, f"hold (cooldown): {down} would do"
        return cur - 1, f"shrink {cur} -> {cur - 1}: {down} would do for {s.now - since:.0f} s ({now_text})"

    def _fit_budget(self, want: dict[str, int], current: dict[str, int], reasons: dict[str, str],
                    s: Signals) -> None:
        """Fit growth into `max_devices`: first a pool that a smaller size serves at the target utilization
        gives up workers at once (no scale-down wait: a short pool needs its devices), then growth is trimmed,
        one worker at a time, from the grown pool whose predicted margin suffers least (its predicted TTFT
        or TPOT over the target, one worker smaller)."""
        budget = self.config.max_devices
        if budget is None or s.colocated:
            return
        while sum(want.values()) > budget:
            grown = [r for r in ROLES if want[r] > current[r]]
            if not grown:
                return  # already over budget without growth: shrinking is not this tick's business
            donors = [r for r in ROLES if r not in grown and want[r] > self.needed(r, s, self.config.target_utilization)
                      and s.now - self.last_change.get(r, -math.inf) >= self.config.cooldown_s]
            if donors:
                donor = donors[0]
                want[donor] -= 1
                reasons[donor] = (f"shrink {current[donor]} -> {want[donor]}: gives its device to the "
                                  f"{grown[0]} pool (max_devices {budget}); " + reasons[donor])
                continue
            def harm(r: str) -> float:
                p = self.predict(r, want[r] - 1, s)
                return max(p.ttft_s / self.config.ttft_slo_s, p.tpot_s / self.config.tpot_slo_s, p.utilization)
            role = min(grown, key=harm)
            want[role] -= 1
            reasons[role] += f" (trimmed to {want[role]}: max_devices {budget})"


def _ms(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x * 1e3:.0f} ms"


class LoadWindow:
    """The router's arrivals and completions over a sliding window: what `Signals`' rates come from.

    The output a request will produce is estimated at its arrival from the `max_tokens` it asks for, scaled by
    the share of their `max_tokens` that the requests finished in the window actually generated (1.0 before
    any finished): decode work is known when a request arrives, not when it ends."""

    def __init__(self, horizon_s: float = 600.0):
        self.horizon_s = horizon_s
        self.arrivals: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, max_tokens)
        self.finished: deque[tuple[float, int, int]] = deque()  # (time, max_tokens, generated tokens)
        self.dropped = [0, 0]  # arrivals and completions trimmed off so far

    def arrived(self, now: float, prompt_tokens: int, max_tokens: int) -> None:
        self.arrivals.append((now, prompt_tokens, max_tokens))
        self._trim(now)

    def done(self, now: float, max_tokens: int, generated: int) -> None:
        self.finished.append((now, max_tokens, generated))
        self._trim(now)

    def since(self, arrivals: int, finished: int) -> tuple[tuple, tuple]:
        """The arrivals and completions after the first `arrivals` and `finished` ever recorded (what a
        replica has not reported yet), as far as the horizon still holds them."""
        return (tuple(itertools.islice(self.arrivals, max(0, arrivals - self.dropped[0]), None)),
                tuple(itertools.islice(self.finished, max(0, finished - self.dropped[1]), None)))

    @property
    def counts(self) -> tuple[int, int]:
        """Arrivals and completions ever recorded (`since`'s cursor)."""
        return self.dropped[0] + len(self.arrivals), self.dropped[1] + len(self.finished)

    def _trim(self, now: float) -> None:
        for k, q in enumerate((self.arrivals, self.finished)):
            while q and q[0][0] < now - self.horizon_s:
                q.popleft()
                self.dropped[k] += 1

    def rates(self, now: float, window_s: float, since: float) -> tuple[float, float, float]:
        """(requests/s, prompt tokens/s, expected output tokens per request) over the last `window_s`
        (or since `since`, the loop's start, when that is shorter)."""
        lo = now - window_s
        span = max(min(window_s, now - since), 1e-9)
        arr = [a for a in self.arrivals if a[0] > lo]
        fin = [f for f in self.finished if f[0] > lo]
        asked = sum(f[1] for f in fin)
        share = sum(f[2] for f in fin) / asked if asked else 1.0
        out = share * sum(a[2] for a in arr) / len(arr) if arr else 1.0
        return len(arr) / span, sum(a[1] for a in arr) / span, out


@dataclass(frozen=True)
class LoadReport:
    """One router replica's load since its previous report, for the pool manager (`router.control`), which
    sums every replica's into one `ClusterLoad`: the planner decides once, on the whole deployment's load.
    Times are seconds before the report was made (replicas may run on other nodes, with other clocks)."""

    arrivals: tuple[tuple[float, int, int], ...] = ()  # (age, prompt tokens, max_tokens)
    finished: tuple[tuple[float, int, int], ...] = ()  # (age, max_tokens, generated tokens)
    ttft: tuple[tuple[float, float], ...] = ()  # the replica's TTFT histogram: cumulative (upper bound, count)
    tpot: tuple[tuple[float, float], ...] = ()
    prefill_queue_tokens: int = 0  # prompt tokens this replica has sent to prefill workers and not had back
    incarnation: str = ""  # the replica process's: a restarted replica's histograms count from zero again


@dataclass(frozen=True)
class ClusterLoad:
    """Every replica's load as the planner reads it: rates over a window, the TTFT and TPOT histograms
    summed (cumulative, never decreasing: a replica that restarts or leaves takes nothing back), and the
    prompt tokens queued at the prefill pool by all of them."""

    request_rate: float
    prompt_tokens_per_s: float
    output_tokens: float
    ttft: tuple[tuple[float, float], ...]
    tpot: tuple[tuple[float, float], ...]
    prefill_queue_tokens: int
    replicas: int  # replicas whose reports it sums


class LoadSum:
    """The pool manager's sum of its replicas' `LoadReport`s (pure: the manager passes its clock)."""

    def __init__(self, horizon_s: float = 600.0):
        self.window = LoadWindow(horizon_s)
        self.ttft: dict[float, float] = {}
        self.tpot: dict[float, float] = {}
        self._last: dict[str, LoadReport] = {}  # replica -> its last report (for histogram deltas, its queue)

    def add(self, replica: str, report: LoadReport, now: float) -> None:
        # Several replicas' events interleave out of time order by up to a report interval: `rates` filters by
        # time, and the horizon trims from the oldest end, so that only delays a few entries' trimming.
        self.window.arrivals.extend((now - age, prompt, max_tokens) for age, prompt, max_tokens in report.arrivals)
        self.window.finished.extend((now - age, max_tokens, n) for age, max_tokens, n in report.finished)
        self.window._trim(now)
        prev = self._last.get(replica)
        for name in ("ttft", "tpot"):
            total, cur = getattr(self, name), getattr(report, name)
            # a restarted replica's counts began again: all of them are new
            old = dict(getattr(prev, name)) if prev is not None and prev.incarnation == report.incarnation else {}
            for le, n in cur:
                total[le] = total.get(le, 0.0) + n - old.get(le, 0.0)
        self._last[replica] = report

    def leave(self, replica: str) -> None:
        """A replica stopped: its queue is gone; what it observed stays counted."""
        self._last.pop(replica, None)

    def load(self, now: float, window_s: float, since: float, live: set[str]) -> ClusterLoad:
        """Rates over the last `window_s` (or since `since`, when shorter); queues of the `live` replicas."""
        rate, prompt_rate, output = self.window.rates(now, window_s, since)
        reports = [r for k, r in self._last.items() if k in live]
        return ClusterLoad(rate, prompt_rate, output, tuple(sorted(self.ttft.items())),
                           tuple(sorted(self.tpot.items())), sum(r.prefill_queue_tokens for r in reports),
                           len(reports))


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' `histogram_quantile` over cumulative (upper bound, count) buckets (+Inf last), linear within
    a bucket; None for an empty histogram. A quantile in the +Inf bucket answers the largest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / (n - prev_n) if n > prev_n else 1.0)
        prev_le, prev_n = le, n
    return prev_le

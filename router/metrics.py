"""The serving metrics (prometheus-client), with vLLM's names and buckets under our prefix.

`pdserve_` (the default) keeps every name lint-clean for `promtool check metrics`;
`--metrics-prefix vllm:` gives vLLM's exact names (colon included) so stock vLLM
dashboards read pdserve. Router-side series (latencies seen by the client, the TTFT
breakdown, request outcomes, token counts) live in the router process; engine-side
gauges (running, waiting, KV usage, preemptions) are collected from each worker's
engine at scrape time, on that worker's own endpoint (see `/metrics/targets`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

# vLLM's bucket boundaries, so SLO thresholds line up with its dashboards.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
STAGES = ("router_queue", "prefill_queue", "prefill_compute", "kv_transfer", "decode_admission")


def priority_class(priority: int) -> str:
    """A bounded label for a raw priority integer (lower is more urgent)."""
    return "urgent" if priority < 0 else "normal" if priority == 0 else "background"


class RouterMetrics:
    def __init__(self, prefix: str, model_name: str, registry: CollectorRegistry):
        self.model = model_name
        p = prefix
        labels = ["model_name"]
        self.ttft = Histogram(f"{p}time_to_first_token_seconds", "Time to first token, at the router",
                              labels, buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram(f"{p}inter_token_latency_seconds", "Time between streamed tokens, at the router",
                             labels, buckets=ITL_BUCKETS, registry=registry)
        self.tpot = Histogram(f"{p}request_time_per_output_token_seconds",
                              "Per request: (e2e - TTFT) / (output tokens - 1)", labels, buckets=ITL_BUCKETS,
                              registry=registry)
        self.e2e = Histogram(f"{p}e2e_request_latency_seconds", "End-to-end request latency, at the router",
                             labels, buckets=E2E_BUCKETS, registry=registry)
        self.stage = Histogram(f"{p}request_stage_seconds",
                               "TTFT breakdown: router_queue, prefill_queue, prefill_compute, kv_transfer, "
                               "decode_admission", labels + ["stage"], buckets=TTFT_BUCKETS, registry=registry)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens of finished requests", labels,
                                     registry=registry)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Generated tokens", labels, registry=registry)
        self.success = Counter(f"{p}request_success", "Finished requests by finish reason",
                               labels + ["finished_reason"], registry=registry)
        self.rejected = Counter(f"{p}request_rejected", "Requests refused before running, by reason",
                                labels + ["reason"], registry=registry)
        self.failed = Counter(f"{p}request_failed", "Admitted requests that failed (a worker failed), by reason",
                              labels + ["reason"], registry=registry)
        self.migrations = Counter(f"{p}request_migrations", "Request attempts moved to other workers after a "
                                  "failure (re-prefilled with the tokens already streamed), by reason",
                                  labels + ["reason"], registry=registry)
        self.worker_failures = Counter(f"{p}worker_failures", "Workers taken out of their pool and replaced, by "
                                       "reason (died, stalled, unresponsive)", labels + ["role", "reason"],
                                       registry=registry)


class PoolCollector:
    """Pool sizes, read from the router's pools at scrape time: workers per role and state."""

    def __init__(self, prefix: str, model_name: str, pools: dict):
        self.p, self.model, self.pools = prefix, model_name, pools

    def describe(self):
        return []

    def collect(self):
        fam = GaugeMetricFamily(f"{self.p}pool_workers", "Workers per pool: healthy (routable), unhealthy, draining",
                                labels=["model_name", "role", "state"])
        for role, pool in self.pools.items():
            counts = {"healthy": 0, "unhealthy": 0, "draining": 0}
            for w in list(pool.values()):
                counts["draining" if w.draining else "healthy" if w.healthy else "unhealthy"] += 1
            for state, n in counts.items():
                fam.add_metric([self.model, role, state], n)
        yield fam


class WorkerMetrics:
    """Per-request timings measured inside a worker (its own clock), on the worker's endpoint."""

    def __init__(self, prefix: str, model_name: str, role: str, worker_id: str):
        from prometheus_client import REGISTRY

        names = ["model_name", "role", "engine"]
        self.labels = (model_name, role, worker_id)
        self.queue = Histogram(f"{prefix}request_queue_time_seconds", "Arrival in the engine to its first step",
                               names, buckets=TTFT_BUCKETS, registry=REGISTRY).labels(*self.labels)
        self.prefill = Histogram(f"{prefix}request_prefill_time_seconds", "Prefill compute, first step to first "
                                 "token", names, buckets=TTFT_BUCKETS, registry=REGISTRY).labels(*self.labels)
        self.decode = Histogram(f"{prefix}request_decode_time_seconds", "Decode phase, first decode step to the "
                                "last token", names, buckets=E2E_BUCKETS, registry=REGISTRY).labels(*self.labels)


class EngineCollector:
    """Engine gauges read from a worker's engine at scrape time (always current, no polling)."""

    def __init__(self, prefix: str, model_name: str, role: str, worker_id: str, engine):
        self.p, self.labels = prefix, (model_name, role, worker_id)
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        p, (model, role, wid) = self.p, self.labels
        e = self.engine
        names = ["model_name", "role", "engine"]
        running = GaugeMetricFamily(f"{p}num_requests_running", "Requests in the running batch", labels=names)
        running.add_metric([model, role, wid], len(list(e.running)))
        waiting = GaugeMetricFamily(f"{p}num_requests_waiting", "Requests waiting, by priority class",
                                    labels=names + ["priority_class"])
        counts = {"urgent": 0, "normal": 0, "background": 0}
        for s in list(e.waiting):
            counts[priority_class(s.priority)] += 1
        for cls, n in counts.items():
            waiting.add_metric([model, role, wid, cls], n)
        usage = GaugeMetricFamily(f"{p}kv_cache_usage_perc", "KV-cache blocks in use, 0-1", labels=names)
        usage.add_metric([model, role, wid], e.block_manager.usage)
        preempt = CounterMetricFamily(f"{p}num_preemptions", "Preemptions", labels=names)
        preempt.add_metric([model, role, wid], e.num_preemptions)
        yield from (running, waiting, usage, preempt)

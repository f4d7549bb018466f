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
from prometheus_client.metrics_core import GaugeMetricFamily

from pdserve.engine.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS


def histogram_buckets(histogram) -> tuple[tuple[float, float], ...]:
    """A Histogram's cumulative (upper bound, count) buckets, summed over all its label sets."""
    out: dict[float, float] = {}
    for fam in histogram.collect():
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
    return tuple(sorted(out.items()))


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
                               "decode_admission; local_prefill (a decode worker prefilling itself: from its "
                               "Ready to the first token)", labels + ["stage"], buckets=TTFT_BUCKETS,
                               registry=registry)
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
        self.routing = Counter(f"{p}routing_decisions", "Workers picked for request attempts, by pool and reason: "
                               "prefix_overlap (a cached prefix moved the pick off the least loaded worker) or "
                               "least_loaded", labels + ["pool", "reason"], registry=registry)
        self.disaggregation = Counter(f"{p}disaggregation_decisions", "Disaggregated mode: where each attempt's "
                                      "prefill ran (remote: a prefill worker, the KV shipped; local: the decode "
                                      "worker itself), by reason", labels + ["path", "reason"], registry=registry)
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

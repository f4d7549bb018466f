"""A worker's own Prometheus series, on its own endpoint (listed by the router's http_sd):
per-request timings measured on the worker's clock, and engine gauges read at scrape time."""

from __future__ import annotations

from prometheus_client import Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from pdserve.engine.metrics import E2E_BUCKETS, TTFT_BUCKETS, priority_class


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
        # prefix caching, in tokens, as vLLM counts it: hits / queries is the hit rate
        sched, bm = e.scheduler, e.block_manager
        queries = CounterMetricFamily(f"{p}prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                      "(tokens of admitted requests)", labels=names)
        queries.add_metric([model, role, wid], sched.prefix_cache_queries)
        hits = CounterMetricFamily(f"{p}prefix_cache_hits", "Prompt tokens the prefix cache supplied "
                                   "(not computed again)", labels=names)
        hits.add_metric([model, role, wid], sched.prefix_cache_hits)
        yield from (running, waiting, usage, preempt, queries, hits)
        if p == "pdserve_":  # pdserve's own (vLLM has no such series)
            cached = GaugeMetricFamily(f"{p}prefix_cache_blocks", "KV blocks holding a cached prefix (in use or "
                                       "evictable)", labels=names)
            cached.add_metric([model, role, wid], bm.num_cached_blocks)
            evictions = CounterMetricFamily(f"{p}prefix_cache_evictions", "Cached blocks evicted to make room",
                                            labels=names)
            evictions.add_metric([model, role, wid], bm.num_evictions)
            yield from (cached, evictions)

"""Prometheus metrics of the KV plane, recorded on the receiving (decode) side.

`pdserve_kv_transfer_bytes` (a histogram of transfer sizes) and
`pdserve_kv_transfer_bytes_total` (a counter of every byte received, failed
transfers included) share a stem, which prometheus-client's registry refuses
for two ordinary metrics; the counter is therefore exported by a small
collector. In the text format they are distinct families (`..._bytes_bucket`
etc. and `..._bytes_total`).
"""

from __future__ import annotations

import threading
from collections import defaultdict

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily

# Finer than TTFT's buckets at the low end: a small prompt's KV moves in well under a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BYTES_BUCKETS = tuple(float(64 << 10 << (2 * i)) for i in range(8))  # 64 KiB .. 1 GiB, x4
STAGES = ("reserve", "first_byte", "last_byte", "ack")

TRANSFER_LATENCY = Histogram(
    "pdserve_kv_transfer_latency_seconds",
    "KV transfer latency on the receiving side: push opened to acknowledgement sent",
    ["transport"], buckets=LATENCY_BUCKETS)
TRANSFER_BYTES = Histogram(
    "pdserve_kv_transfer_bytes", "KV bytes per completed transfer", ["transport"], buckets=BYTES_BUCKETS)
TRANSFER_STAGE = Histogram(
    "pdserve_kv_transfer_stage_seconds",
    "KV transfer stages on the receiving side: reserve (allocation), first_byte and last_byte "
    "(from push opened), ack (commit to acknowledgement)", ["transport", "stage"], buckets=LATENCY_BUCKETS)
TRANSFER_FAILURES = Counter(
    "pdserve_kv_transfer_failures", "KV transfers that failed, by reason", ["transport", "reason"])
TRANSFER_CACHED_BYTES = Counter(
    "pdserve_kv_transfer_cached_bytes", "KV bytes completed transfers did not carry: the receiver's prefix "
    "cache held them", ["transport"])
RANK_PAIR_BYTES = Counter(
    "pdserve_kv_transfer_rank_pair_bytes", "KV bytes received, by the path they took (per_rank: each receiver rank's "
    "heads on a channel of its own; rank0: every head through the receiver's rank 0) and by (sender rank, receiver "
    "rank)", ["transport", "path", "src_rank", "dst_rank"])


class _BytesTotal:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, float] = defaultdict(float)

    def inc(self, transport: str, n: int) -> None:
        with self._lock:
            self._values[transport] += n

    def value(self, transport: str) -> float:
        with self._lock:
            return self._values[transport]

    def describe(self):
        return []  # see the module docstring

    def collect(self):
        fam = CounterMetricFamily("pdserve_kv_transfer_bytes", "KV bytes received, failed transfers included",
                                  labels=["transport"])
        with self._lock:
            for transport, v in self._values.items():
                fam.add_metric([transport], v)
        yield fam


TRANSFER_BYTES_TOTAL = _BytesTotal()
REGISTRY.register(TRANSFER_BYTES_TOTAL)

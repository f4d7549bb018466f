"""Generate the pdserve Grafana dashboard, deploy/grafana/pdserve-dashboard.json.

    python deploy/grafana/generate.py           # (re)write the JSON next to this script
    python deploy/grafana/generate.py --check   # exit 1 if the committed JSON is stale

`dashboard()` returns the dashboard as a dict (tests import it). Standard library
only. Every rate()/increase() uses `$__rate_interval` (at least four scrape
intervals, so rate() always has two samples). Queries use the default
`pdserve_` metric prefix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().with_name("pdserve-dashboard.json")

DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model_name=~"$model_name"'
QUANTILES = (0.5, 0.9, 0.99)
# SLO choices are histogram bucket bounds, so `le` selects them exactly and
# histogram_quantile() crosses them without interpolation error:
# TTFT buckets (router/metrics.py TTFT_BUCKETS) and ITL/TPOT buckets (ITL_BUCKETS).
TTFT_SLO_OPTIONS = ("0.1", "0.25", "0.5", "1", "2.5")
TPOT_SLO_OPTIONS = ("0.025", "0.05", "0.1", "0.2")


def rate(selector: str) -> str:
    return f"rate({selector}[$__rate_interval])"


def sel(metric: str, *matchers: str) -> str:
    """`metric{model_name=~"$model_name", ...}`."""
    return metric + "{" + ", ".join((M, *matchers)) + "}"


def sum_by(by: str, expr: str) -> str:
    return f"sum by ({by}) ({expr})"


def sum_rate(by: str, metric: str, *matchers: str) -> str:
    return sum_by(by, rate(sel(metric, *matchers)))


def le_is(var: str) -> str:
    """Matches the bucket bound chosen in a custom variable. prometheus-client writes
    `le="1.0"` where Prometheus 3 normalises to `le="1"`, so accept both spellings."""
    return f'le=~"${var}|${{{var}}}.0"'


def with_model(expr: str) -> str:
    """The KV-transfer series carry only `transport` (plus the target labels job/instance/
    role/engine); join model_name from the same worker endpoint's engine gauge, which
    also filters them by the model variable. `group` is 1, so values are unchanged."""
    return (f"({expr}) * on (job, instance) group_left (model_name) "
            f"group by (job, instance, model_name) (pdserve_kv_cache_usage_perc{{{M}}})")


def zero_filled(expr: str) -> str:
    """A labelled counter has no series before its first increment, and `a + b` is empty
    when either side is: fill with 0 for every model the router serves."""
    return f"({expr} or 0 * sum by (model_name) (pdserve_pool_workers{{{M}}}))"


def quantile(q: float, by: str, series: str) -> str:
    """The q-quantile of a histogram whose bucket rates are `series`, by the given labels (plus le)."""
    return f"histogram_quantile({q}, sum by ({by + ', ' if by else ''}le) ({series}))"


def p99(by: str, series: str) -> str:
    return quantile(0.99, by, series)


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def quantile_targets(series: str, by: str, legend: str, quantiles=QUANTILES) -> list[dict]:
    """p50/p90/p99 of a histogram whose bucket rates are `series`, by the given labels."""
    return [target(quantile(q, by, series), f"p{round(q * 100)} {legend}", chr(ord("A") + i))
            for i, q in enumerate(quantiles)]


def model_quantiles(bucket: str) -> list[dict]:
    return quantile_targets(rate(sel(bucket)), "model_name", "{{model_name}}")


def slo_line(var: str, label: str, ref: str = "SLO") -> dict:
    return target(f"vector(${var})", label, ref)


SLO_OVERRIDE = {"matcher": {"id": "byFrameRefID", "options": "SLO"}, "properties": [
    {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
    {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
    {"id": "custom.fillOpacity", "value": 0},
    {"id": "custom.stacking", "value": {"mode": "none", "group": "A"}},
]}


class Layout:
    """Panels two to a row (12 of 24 columns), rows spanning the width."""

    def __init__(self):
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def add(self, title: str, description: str, targets: list[dict], unit: str, *, stack: bool = False,
            minimum: float | None = 0, maximum: float | None = None, thresholds: list[float] | None = None,
            slo: bool = False) -> None:
        steps = [{"color": "green", "value": None}] + [{"color": "red", "value": t} for t in thresholds or []]
        custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 10, "showPoints": "never",
                  "spanNulls": False, "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                  "thresholdsStyle": {"mode": "line" if thresholds else "off"}}
        defaults = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"},
                    "thresholds": {"mode": "absolute", "steps": steps}}
        if minimum is not None:
            defaults["min"] = minimum
        if maximum is not None:
            defaults["max"] = maximum
        self.panels.append({
            "type": "timeseries", "title": title, "description": description, "id": self._id(),
            "datasource": DS, "gridPos": {"h": 8, "w": 12, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": [SLO_OVERRIDE] if slo else []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": targets,
        })
        self.x = 12 - self.x
        if not self.x:
            self.y += 8


def panels() -> list[dict]:
    p = Layout()

    p.row("Traffic and SLOs")
    p.add("Requests / s by outcome", "Finished requests by finish reason, requests that failed after admission, "
          "and requests refused before running.", [
              target(sum_rate("model_name, finished_reason", "pdserve_request_success_total"),
                     "{{model_name}} success ({{finished_reason}})", "A"),
              target(sum_rate("model_name", "pdserve_request_failed_total"),
                     "{{model_name}} failed", "B"),
              target(sum_rate("model_name", "pdserve_request_rejected_total"),
                     "{{model_name}} rejected", "C"),
          ], "reqps")
    p.add("Tokens / s", "Prompt tokens of finished requests and generated tokens.", [
        target(sum_rate("model_name", "pdserve_prompt_tokens_total"), "{{model_name}} prompt", "A"),
        target(sum_rate("model_name", "pdserve_generation_tokens_total"),
               "{{model_name}} generation", "B"),
    ], "short")
    ttft_under = (sum_rate("model_name", "pdserve_time_to_first_token_seconds_bucket", le_is("ttft_slo"))
                  + " / " + sum_rate("model_name", "pdserve_time_to_first_token_seconds_count"))
    p.add("Share of requests under the TTFT SLO ($ttft_slo s)",
          "Fraction of requests whose time to first token is at most the `ttft_slo` variable (a bucket bound).",
          [target(ttft_under, "{{model_name}}", "A")], "percentunit", maximum=1)
    tpot_under = (sum_rate("model_name", "pdserve_request_time_per_output_token_seconds_bucket", le_is("tpot_slo"))
                  + " / " + sum_rate("model_name", "pdserve_request_time_per_output_token_seconds_count"))
    p.add("Share of requests under the TPOT SLO ($tpot_slo s)",
          "Fraction of requests whose mean time per output token is at most the `tpot_slo` variable.",
          [target(tpot_under, "{{model_name}}", "A")], "percentunit", maximum=1)

    p.row("Latency (router, as the client sees it)")
    p.add("Time to first token", "TTFT quantiles; the dashed line is the `ttft_slo` variable.",
          model_quantiles("pdserve_time_to_first_token_seconds_bucket")
          + [slo_line("ttft_slo", "TTFT SLO")], "s", slo=True)
    p.add("Time per output token", "TPOT quantiles, per request (e2e - TTFT) / (output tokens - 1); the dashed "
          "line is the `tpot_slo` variable.",
          model_quantiles("pdserve_request_time_per_output_token_seconds_bucket")
          + [slo_line("tpot_slo", "TPOT SLO")], "s", slo=True)
    p.add("Inter-token latency", "Time between streamed tokens; the dashed line is the `tpot_slo` variable.",
          model_quantiles("pdserve_inter_token_latency_seconds_bucket")
          + [slo_line("tpot_slo", "TPOT SLO")], "s", slo=True)
    p.add("End-to-end request latency", "E2E latency quantiles at the router.",
          model_quantiles("pdserve_e2e_request_latency_seconds_bucket"),
          "s")
    stage_mean = (sum_rate("stage", "pdserve_request_stage_seconds_sum")
                  + " / " + sum_rate("stage", "pdserve_request_stage_seconds_count"))
    p.add("TTFT breakdown: mean per stage (stacked)", "router_queue, prefill_queue, prefill_compute, kv_transfer "
          "and decode_admission (requests prefilled on a prefill worker) or local_prefill (on their decode worker); "
          "stacked, they add up to the mean time to first token.",
          [target(stage_mean, "{{stage}}", "A")], "s", stack=True)
    p.add("TTFT breakdown: p99 per stage", "The p99 of each TTFT stage.",
          [target(p99("stage", rate(sel("pdserve_request_stage_seconds_bucket"))), "p99 {{stage}}", "A")], "s")

    p.row("KV transfer (decode workers)")
    p.add("KV transfer latency", "Receiving side, push opened to acknowledgement sent, by transport.",
          quantile_targets(with_model(rate("pdserve_kv_transfer_latency_seconds_bucket")), "transport",
                           "{{transport}}"), "s")
    p.add("KV transfer stages: p99", "reserve (allocation), first_byte and last_byte (from push opened), "
          "ack (commit to acknowledgement).",
          [target(p99("transport, stage", with_model(rate("pdserve_kv_transfer_stage_seconds_bucket"))),
                  "p99 {{stage}} ({{transport}})", "A")], "s")
    p.add("KV bytes / s", "KV bytes received, failed transfers included.",
          [target(sum_by("transport", with_model(rate("pdserve_kv_transfer_bytes_total"))),
                  "{{transport}}", "A")], "Bps")
    bytes_mean = (sum_by("transport", with_model(rate("pdserve_kv_transfer_bytes_sum")))
                  + " / " + sum_by("transport", with_model(rate("pdserve_kv_transfer_bytes_count"))))
    p.add("KV bytes per transfer", "Size of completed transfers: quantiles of the bytes histogram "
          "(buckets 64 KiB to 1 GiB, x4) and the mean.",
          quantile_targets(with_model(rate("pdserve_kv_transfer_bytes_bucket")), "transport", "{{transport}}",
                           quantiles=(0.5, 0.99))
          + [target(bytes_mean, "mean {{transport}}", "D")], "bytes")
    p.add("KV bytes / s by rank pair (tensor parallelism)", "KV bytes received between workers of any TP sizes, by "
          "the path they took (per_rank: each receiver rank's heads on a channel of its own; rank0: every head "
          "through the receiving worker's rank 0) and by (sender rank, receiver rank).",
          [target(sum_by("transport, path, src_rank, dst_rank",
                         with_model(rate("pdserve_kv_transfer_rank_pair_bytes_total"))),
                  "{{path}} p{{src_rank}}->d{{dst_rank}} ({{transport}})", "A")], "Bps")
    p.add("KV transfers / s and failures by reason", "Completed transfers and failed ones by reason.", [
        target(sum_by("transport", with_model(rate("pdserve_kv_transfer_latency_seconds_count"))),
               "completed ({{transport}})", "A"),
        target(sum_by("transport, reason", with_model(rate("pdserve_kv_transfer_failures_total"))),
               "failed: {{reason}} ({{transport}})", "B"),
    ], "ops")

    p.row("Prefix cache and routing")
    p.add("Prefix-cache hit rate per pool", "Prompt tokens the prefix cache supplied over those looked up "
          "(tokens of admitted requests), per pool.",
          [target(sum_rate("role", "pdserve_prefix_cache_hits_total") + " / "
                  + sum_rate("role", "pdserve_prefix_cache_queries_total"), "{{role}}", "A")],
          "percentunit", maximum=1)
    p.add("Prefix-cache tokens / s", "Prompt tokens looked up and those the cache supplied, per pool.", [
        target(sum_rate("role", "pdserve_prefix_cache_queries_total"), "queried ({{role}})", "A"),
        target(sum_rate("role", "pdserve_prefix_cache_hits_total"), "hit ({{role}})", "B"),
    ], "short")
    p.add("Cached blocks and evictions", "KV blocks holding a cached prefix per worker (in use or evictable), "
          "and cached blocks evicted per second to make room.", [
              target(f"max by (role, engine) ({sel('pdserve_prefix_cache_blocks')})", "{{role}} {{engine}}", "A"),
              target(sum_rate("role, engine", "pdserve_prefix_cache_evictions_total"),
                     "evicted/s {{role}} {{engine}}", "B"),
          ], "short")
    p.add("Routing decisions / s", "Per pool: picks a cached prefix moved off the least-loaded worker "
          "(prefix_overlap), and the rest (least_loaded).",
          [target(sum_rate("pool, reason", "pdserve_routing_decisions_total"), "{{pool}} {{reason}}", "A")], "ops")
    p.add("Disaggregation decisions / s", "Where prefills ran (remote: a prefill worker, the KV shipped; local: "
          "the decode worker) and why (--disaggregation auto's rule, or configured).",
          [target(sum_rate("path, reason", "pdserve_disaggregation_decisions_total"), "{{path}} {{reason}}", "A")],
          "ops", stack=True)
    p.add("KV bytes not shipped / s", "KV bytes completed transfers did not carry because the decode worker's "
          "prefix cache held them, beside the bytes they did carry.", [
              target(sum_by("transport", with_model(rate("pdserve_kv_transfer_cached_bytes_total"))),
                     "cached, not shipped ({{transport}})", "A"),
              target(sum_by("transport", with_model(rate("pdserve_kv_transfer_bytes_total"))),
                     "shipped ({{transport}})", "B"),
          ], "Bps")

    p.row("Workers")
    p.add("KV-cache usage per worker", "Share of KV-cache blocks in use; the line marks the alert at 95%.",
          [target(f"max by (role, engine) ({sel('pdserve_kv_cache_usage_perc')})", "{{role}} {{engine}}", "A")],
          "percentunit", maximum=1, thresholds=[0.95])
    p.add("Running requests per role", "Requests in the running batches, summed per pool.",
          [target(sum_by("role", sel("pdserve_num_requests_running")), "{{role}}", "A")], "short")
    p.add("Waiting requests per role and priority class", "Requests queued in the engines (stacked).",
          [target(sum_by("role, priority_class", sel("pdserve_num_requests_waiting")),
                  "{{role}} {{priority_class}}", "A")], "short", stack=True)
    p.add("Preemptions / s", "Requests preempted for lack of KV blocks, per worker.",
          [target(sum_rate("role, engine", "pdserve_num_preemptions_total"),
                  "{{role}} {{engine}}", "A")], "ops")
    p.add("Worker timings: p99", "Measured inside the workers: engine queue time, prefill compute "
          "(prefill workers), decode phase (decode workers).", [
              target(p99("role", rate(sel("pdserve_request_queue_time_seconds_bucket"))), "queue ({{role}})", "A"),
              target(p99("", rate(sel("pdserve_request_prefill_time_seconds_bucket"))), "prefill compute", "B"),
              target(p99("", rate(sel("pdserve_request_decode_time_seconds_bucket"))), "decode phase", "C"),
          ], "s")
    p.add("Pool sizes", "Workers per pool and state (healthy = routable), from the router.",
          [target(sum_by("role, state", sel("pdserve_pool_workers")), "{{role}} {{state}}", "A")], "short")

    p.row("Autoscaling (SLA planner, pdserve serve --autoscale)")
    p.add("Desired vs current workers per pool", "The SLA planner's sizes (desired) and the routable workers "
          "(current); a gap is workers starting or draining. Flat when --autoscale is off (no series).", [
              target(sum_by("role", sel("pdserve_autoscale_desired_workers")), "desired {{role}}", "A"),
              target(sum_by("role", sel("pdserve_autoscale_current_workers")), "current {{role}}", "B"),
          ], "short")
    p.add("Planner decisions / s by pool and action", "grow, shrink, hold (short but in cooldown or at the "
          "budget, or a target missed at max), steady; every change is logged with its reason by the router.",
          [target(sum_rate("role, action", "pdserve_autoscale_decisions_total"),
                  "{{role}} {{action}}", "A")], "ops")

    p.row("Errors")
    p.add("Rejections / s by reason", "Requests refused before running: queue_full, no_worker, unavailable, "
          "worker_failed.",
          [target(sum_rate("reason", "pdserve_request_rejected_total"), "{{reason}}", "A")],
          "reqps")
    p.add("Failures / s by reason", "Admitted requests that failed: worker_failed, worker_error.",
          [target(sum_rate("reason", "pdserve_request_failed_total"), "{{reason}}", "A")],
          "reqps")
    failed = zero_filled(sum_rate("model_name", "pdserve_request_failed_total"))
    rejected_wf = zero_filled(sum_rate("model_name", "pdserve_request_rejected_total", 'reason="worker_failed"'))
    success = zero_filled(sum_rate("model_name", "pdserve_request_success_total"))
    rejected = zero_filled(sum_rate("model_name", "pdserve_request_rejected_total"))
    p.add("Error ratio", "(failed + rejected because the worker failed) / all requests; the line marks the "
          "alert at 1%.", [target(f"({failed} + {rejected_wf}) / ({success} + {failed} + {rejected})",
                                  "{{model_name}}", "A")], "percentunit", thresholds=[0.01])
    return p.panels


def custom_variable(name: str, label: str, options: tuple[str, ...], default: str) -> dict:
    return {"type": "custom", "name": name, "label": label, "query": ",".join(options), "hide": 0,
            "multi": False, "includeAll": False, "skipUrlSync": False,
            "current": {"selected": True, "text": default, "value": default},
            "options": [{"selected": o == default, "text": o, "value": o} for o in options]}


def dashboard() -> dict:
    variables = [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus", "hide": 0,
         "current": {}, "options": [], "refresh": 1, "regex": "", "skipUrlSync": False},
        {"type": "query", "name": "model_name", "label": "Model", "datasource": DS,
         "definition": "label_values(pdserve_pool_workers, model_name)",
         "query": "label_values(pdserve_pool_workers, model_name)", "refresh": 2, "sort": 1, "regex": "",
         "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "options": [], "hide": 0,
         "skipUrlSync": False},
        custom_variable("ttft_slo", "TTFT SLO (s)", TTFT_SLO_OPTIONS, "1"),
        custom_variable("tpot_slo", "TPOT SLO (s)", TPOT_SLO_OPTIONS, "0.1"),
    ]
    return {
        "title": "pdserve",
        "uid": "pdserve",
        "description": "Disaggregated LLM serving: latency SLOs, TTFT breakdown, KV transfer, workers and errors. "
                       "Generated by deploy/grafana/generate.py; edit that, not the JSON.",
        "tags": ["pdserve", "llm"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": variables},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs from the output")
    ap.add_argument("--output", type=Path, default=OUTPUT)
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else None
        if current != text:
            print(f"{args.output} is stale: run python deploy/grafana/generate.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Prometheus, alerting and Grafana configuration under deploy/: it parses, promtool accepts it
(and its rule unit tests pass), the committed dashboard is what deploy/grafana/generate.py makes, and
every metric it names is one a live disaggregated `pdserve serve` exports. A real Prometheus, with the
shipped config pointed at that server's http_sd list, then evaluates the rules and every panel."""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from pdserve.router.metrics import ITL_BUCKETS, TTFT_BUCKETS
from tests.helpers import Server, wait_for

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_JSON = GRAFANA / "pdserve-dashboard.json"

EXPORTED_NAME = re.compile(r"(?<![\w:])pdserve_[a-zA-Z0-9_]+")
RECORDED_NAME = re.compile(r"(?<![\w:])pdserve:[a-zA-Z0-9_:]+")
RANGE_FUNCTION = re.compile(r"\b(rate|irate|increase)\(")


def load_generate():
    spec = importlib.util.spec_from_file_location("pdserve_grafana_generate", GRAFANA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_generate()


def dashboard_queries(dash: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def rules() -> list[dict]:
    doc = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def rule_queries() -> list[str]:
    return [r["expr"] for r in rules()]


def referenced(exprs: list[str]) -> set[str]:
    return {n for e in exprs for n in EXPORTED_NAME.findall(e)}


def promtool(*args: str, cwd: Path = ROOT) -> None:
    run = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}\n{run.stderr}"


# --- static checks ---------------------------------------------------------------------------------


def test_every_yaml_file_parses():
    files = sorted(p for d in (PROMETHEUS, GRAFANA) for p in d.rglob("*") if p.suffix in (".yml", ".yaml"))
    assert {p.name for p in files} >= {"prometheus.yml", "rules.yml", "rules_test.yml", "kuberay-podmonitor.yaml",
                                       "datasources.yml", "dashboards.yml", "docker-compose.yml"}
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
    kinds = {d["kind"] for d in yaml.safe_load_all((PROMETHEUS / "kuberay-podmonitor.yaml").read_text())}
    assert kinds == {"ScrapeConfig", "PodMonitor"}


def test_promtool_accepts_config_and_rules_and_rule_unit_tests_pass():
    promtool("check", "config", "deploy/prometheus/prometheus.yml")  # loads rules.yml relative to it
    promtool("check", "rules", "deploy/prometheus/rules.yml")
    promtool("test", "rules", "rules_test.yml", cwd=PROMETHEUS)


def test_prometheus_config_scrapes_through_the_routers_http_sd():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s" and config["rule_files"] == ["rules.yml"]
    (job,) = config["scrape_configs"]
    assert job["honor_labels"] is True
    assert [c["url"] for c in job["http_sd_configs"]] == ["http://pdserve-router:8000/metrics/targets"]


def test_rule_names_and_references():
    records = [r["record"] for r in rules() if "record" in r]
    for name in records:  # level:metric:operations, never mistaken for an exported name
        assert name.count(":") == 2 and name.startswith("pdserve:") and not EXPORTED_NAME.search(name), name
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 7 and all(r["labels"]["severity"] in ("warning", "critical") for r in alerts)
    defined: set[str] = set()
    for rule in rules():  # recorded series are used only after the rule that defines them
        assert set(RECORDED_NAME.findall(rule["expr"])) <= defined, rule
        defined.add(rule.get("record", ""))
    exprs = " ".join(rule_queries())
    for must in ("pdserve_time_to_first_token_seconds_bucket", "pdserve_request_time_per_output_token_seconds_bucket",
                 "pdserve_kv_transfer_latency_seconds_bucket", "pdserve_kv_cache_usage_perc",
                 "pdserve_num_requests_waiting", "pdserve_request_rejected_total", "pdserve_request_failed_total"):
        assert must in exprs, must


def test_dashboard_json_is_current():
    assert DASHBOARD_JSON.read_text() == generate.render(), "run: python deploy/grafana/generate.py"
    assert json.loads(DASHBOARD_JSON.read_text()) == generate.dashboard()
    assert generate.main(["--check"]) == 0


def test_every_rate_in_the_dashboard_uses_rate_interval():
    exprs = dashboard_queries(generate.dashboard())
    checked = 0
    for expr in exprs:
        for m in RANGE_FUNCTION.finditer(expr):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(expr[i], 0)
                i += 1
            argument = expr[m.end():i - 1]
            assert argument.endswith("[$__rate_interval]"), (m.group(1), argument, expr)
            checked += 1
    assert checked > 30


def test_dashboard_variables_and_slo_panels():
    dash = generate.dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["model_name"]["query"].startswith("label_values(")
    for name, buckets in (("ttft_slo", TTFT_BUCKETS), ("tpot_slo", ITL_BUCKETS)):
        v = variables[name]
        values = [o["value"] for o in v["options"]]
        assert v["type"] == "custom" and values == v["query"].split(",") and v["current"]["value"] in values
        assert all(float(x) in buckets for x in values), f"{name} options must be bucket bounds"
    exprs = dashboard_queries(dash)
    assert any('le=~"$ttft_slo|${ttft_slo}.0"' in e for e in exprs)
    assert any('le=~"$tpot_slo|${tpot_slo}.0"' in e for e in exprs)
    assert "vector($ttft_slo)" in exprs and "vector($tpot_slo)" in exprs  # the SLO lines
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for word in ("request", "time to first token", "time per output token", "end-to-end", "breakdown",
                 "kv transfer latency", "kv bytes", "failures", "kv-cache usage", "running", "waiting",
                 "preemptions", "rejections", "pool sizes"):
        assert word in titles, word


# --- against a live `pdserve serve` ----------------------------------------------------------------


@dataclass
class Exposition:
    families: dict[str, str] = field(default_factory=dict)  # TYPE-line name -> type
    sampled: set[str] = field(default_factory=set)  # names with at least one sample

    def add(self, text: str) -> None:
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                self.families[name] = kind
            elif line and not line.startswith("#"):
                self.sampled.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group())

    def is_created(self, name: str) -> bool:
        return name.endswith("_created") and self.families.get(name) == "gauge"

    def series_of(self, family: str) -> set[str]:
        kind = self.families[family]
        if kind == "histogram":
            return {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
        if kind == "summary":
            return {family, f"{family}_sum", f"{family}_count"}
        if kind == "counter":
            return {family if family.endswith("_total") else f"{family}_total"}
        return {family}

    @property
    def series(self) -> set[str]:
        """Every series name Prometheus can store, families whose labelled children never moved included."""
        return {s for f in self.families if not self.is_created(f) for s in self.series_of(f)}

    @property
    def unsampled(self) -> set[str]:
        return {s for s in self.series if s not in self.sampled}


@dataclass
class Live:
    server: Server
    targets: list[dict]
    exposition: Exposition

    def complete(self, prompt: str) -> None:
        self.server.client().completions.create(model=self.server.model, prompt=prompt, max_tokens=5,
                                                temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def live(ray_cluster, tiny_text_model_dir):
    # the SLA planner on, held at the starting sizes: its series exist (the dashboard's autoscaling row)
    server = Server(ray_cluster, tiny_text_model_dir, serve={"mode": "disaggregated"},
                    kv_transfer={"kv_transport": "grpc"},
                    autoscale={"enabled": True, "max_prefill": 1, "max_decode": 1, "interval_s": 0.5})
    try:
        live = Live(server, [], Exposition())
        for prompt in ("Hello, world", "The quick brown fox jumps over the lazy dog.", "x"):
            live.complete(prompt)
        live.targets = httpx.get(f"{server.url}/metrics/targets").json()
        assert sorted(g["labels"]["role"] for g in live.targets) == ["decode", "prefill", "router"]
        for group in live.targets:
            live.exposition.add(httpx.get(f"http://{group['targets'][0]}/metrics").text)
        yield live
    finally:
        server.stop()


def describe_missing(names: set[str], exp: Exposition) -> str:
    hints = []
    for n in sorted(names):
        base = [f"{n}_total"] if f"{n}_total" in exp.series else sorted(exp.series_of(n)) if n in exp.families else []
        hints.append(f"{n} (exported as {', '.join(base)})" if base else n)
    return "; ".join(hints)


def test_the_exposition_reading_matches_the_samples(live):
    exp = live.exposition
    assert {n for n in exp.sampled if not n.endswith("_created")} <= exp.series
    assert "pdserve_kv_transfer_bytes_total" in exp.series and "pdserve_kv_transfer_bytes_bucket" in exp.series
    assert "pdserve_request_rejected_total" in exp.series  # declared, though nothing was rejected


def test_every_metric_the_dashboard_and_rules_name_is_exported(live):
    exp = live.exposition
    for what, exprs in (("dashboard", dashboard_queries(generate.dashboard())), ("rules.yml", rule_queries())):
        names = referenced(exprs)
        assert names, what
        missing = names - exp.series
        assert not missing, f"{what} names series pdserve does not export: {describe_missing(missing, exp)}"


def test_every_ttft_tpot_and_kv_transfer_family_has_a_panel(live):
    exp = live.exposition
    used = referenced(dashboard_queries(generate.dashboard()))
    families = [f for f in exp.families if not exp.is_created(f)
                and any(k in f for k in ("time_to_first_token", "time_per_output_token", "kv_transfer"))]
    assert len(families) >= 7, families
    unused = [f for f in families if not exp.series_of(f) & used]
    assert not unused, f"exported but on no panel: {unused}"


# --- a real Prometheus, with the shipped config and rules, over the live server ----------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def substitute(expr: str, model: str) -> str:
    for var, value in (("${ttft_slo}", "1"), ("$ttft_slo", "1"), ("${tpot_slo}", "0.1"), ("$tpot_slo", "0.1"),
                       ("$__rate_interval", "1m"), ("$model_name", re.escape(model).replace("\\", "\\\\"))):
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


@pytest.fixture(scope="module")
def prometheus(live, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS / "rules.yml")]
    (sd,) = config["scrape_configs"][0]["http_sd_configs"]
    sd["url"] = f"{live.server.url}/metrics/targets"
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={url[7:]}"],
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:  # every listed target scraped at least once
            try:
                active = httpx.get(f"{url}/api/v1/targets").json()["data"]["activeTargets"]
                if len(active) == len(live.targets) and all(t["health"] == "up" for t in active):
                    break
            except (httpx.HTTPError, ValueError, KeyError):  # not listening yet, or 503 while starting
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "prometheus.log").read_text()[-3000:]
            time.sleep(0.2)
        for prompt in ("after the first scrape", "so rates move"):
            live.complete(prompt)
        traffic = time.time()
        # Two scrapes of every target after that traffic (rates then see it), polled instead of slept for.
        # The rules' evaluations are waited for by the test that checks them, from the same moment.
        scraped = traffic + 1.0  # scrape_interval: a scrape at or after this one had one before it, after traffic

        def scraped_after() -> bool:
            active = httpx.get(f"{url}/api/v1/targets").json()["data"]["activeTargets"]
            return all(t["health"] == "up" and prom_time(t["lastScrape"]) >= scraped for t in active)

        wait_for(scraped_after, 30, "every target scraped twice after the traffic")
        yield Prometheus(url, fresh_after=scraped)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@dataclass
class Prometheus:
    url: str
    fresh_after: float  # wall-clock time by which every target had been scraped after the test traffic


def prom_time(stamp: str) -> float:
    """Prometheus's RFC 3339 timestamps (nanoseconds, 'Z') as seconds since the epoch."""
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp.replace("Z", "+00:00"))
    return datetime.datetime.fromisoformat(stamp).timestamp()


def query(url: str, expr: str) -> list[dict]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}).json()
    assert body["status"] == "success" and not body.get("warnings"), (expr, body)
    return body["data"]["result"]


def test_prometheus_scrapes_every_target_with_the_exposed_labels(live, prometheus):
    prometheus = prometheus.url
    active = httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
    assert sorted(t["labels"]["role"] for t in active) == ["decode", "prefill", "router"]
    pools = query(prometheus, "pdserve_pool_workers")
    assert {r["metric"]["role"] for r in pools} == {"prefill", "decode"}  # honor_labels: not exported_role
    kv = query(prometheus, "pdserve_kv_transfer_latency_seconds_count")
    assert kv and all(r["metric"]["role"] == "decode" and r["metric"]["engine"] for r in kv)  # from http_sd


def test_rules_evaluate_and_record_a_value_for_the_live_server(live, prometheus):
    fresh, prometheus = prometheus.fresh_after, prometheus.url
    evaluated: list[dict] = []

    def evaluated_after_the_traffic() -> bool:  # an evaluation from before the traffic would see none of it
        groups = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
        evaluated[:] = [r for g in groups for r in g["rules"]]
        return bool(evaluated) and all(prom_time(r["lastEvaluation"]) >= fresh for r in evaluated)

    wait_for(evaluated_after_the_traffic, 30, "every rule group evaluated after the traffic's scrapes")
    assert len(evaluated) == len(rules())
    bad = [(r["name"], r.get("lastError")) for r in evaluated if r["health"] != "ok"]
    assert not bad, bad
    model = live.server.model
    for name in (r["record"] for r in rules() if "record" in r):
        result = query(prometheus, name)
        assert result and all(r["metric"]["model_name"] == model for r in result), name
    for name in ("pdserve:time_to_first_token_seconds:p99_5m", "pdserve:kv_transfer_latency_seconds:p99_5m"):
        (r,) = query(prometheus, name)
        assert math.isfinite(float(r["value"][1])) and float(r["value"][1]) > 0, (name, r)
    assert query(prometheus, 'ALERTS{severity="critical"}') == []


def test_every_dashboard_query_runs_and_has_data_where_pdserve_exports_samples(live, prometheus):
    prometheus = prometheus.url
    model = live.server.model
    unsampled = live.exposition.unsampled  # e.g. rejections and failures: none happened
    empty = []
    for expr in dashboard_queries(generate.dashboard()):
        if expr.startswith("label_values("):
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", expr).groups()
            values = httpx.get(f"{prometheus}/api/v1/label/{label}/values", params={"match[]": metric}).json()
            assert values["data"] == [model], expr
            continue
        result = query(prometheus, substitute(expr, model))
        expect_data = " or " in expr or not referenced([expr]) & unsampled
        if expect_data and not result:
            empty.append(expr)
    assert not empty, "\n".join(empty)

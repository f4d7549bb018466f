"""A real Prometheus (Debian's package) against a live `pdserve serve`: it discovers the router and
every worker through the router's http_sd endpoint, and after traffic its HTTP API returns the TTFT,
TPOT and KV-transfer series, with the deploy/ scrape configuration (only the router address and the
intervals changed)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.helpers import Server

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape_config(router_netloc: str) -> dict:
    """deploy/prometheus/prometheus.yml pointed at this router, scraping every second."""
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    cfg.setdefault("global", {}).update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(ROOT / "deploy" / "prometheus" / f) for f in cfg.get("rule_files", [])]
    jobs = [j for j in cfg["scrape_configs"] if j.get("http_sd_configs")]
    assert jobs, "the scrape configuration must discover targets through the router's http_sd endpoint"
    for job in jobs:
        job["scrape_interval"] = "1s"
        for sd in job["http_sd_configs"]:
            sd["url"] = f"http://{router_netloc}/metrics/targets"
            sd["refresh_interval"] = "1s"
    return cfg


def test_prometheus_discovers_workers_and_stores_the_series(ray_cluster, tiny_text_model_dir, tmp_path):
    assert shutil.which("prometheus"), "Debian's prometheus package is installed by .ci/run"
    server = Server(ray_cluster, tiny_text_model_dir)
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(_scrape_config(server.url.removeprefix("http://"))))
    prom = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        c = server.client()
        for i in range(5):
            c.completions.create(model=server.model, prompt=f"scrape me {i}", max_tokens=6, temperature=0,
                                 extra_body={"ignore_eos": True})

        def query(q: str) -> list:
            try:
                r = httpx.get(f"{api}/query", params={"query": q}, timeout=5)
            except httpx.TransportError:  # Prometheus still starting
                return []
            return r.json()["data"]["result"] if r.status_code == 200 else []

        wanted = {
            "roles": 'count by (role) (up{role=~"router|prefill|decode"} == 1)',
            "ttft": "sum(pdserve_time_to_first_token_seconds_count) >= 5",
            "tpot": "sum(pdserve_request_time_per_output_token_seconds_count) >= 5",
            "kv": 'sum by (transport) (pdserve_kv_transfer_latency_seconds_count{role="decode"}) >= 5',
            "kv_bytes": "sum(pdserve_kv_transfer_bytes_total) > 0",
        }
        deadline = time.monotonic() + 60
        results: dict = {}
        while time.monotonic() < deadline:
            results = {k: query(q) for k, q in wanted.items()}
            if all(results.values()) and len(results["roles"]) == 3:
                break
            time.sleep(0.5)
        assert len(results["roles"]) == 3, results
        for k in ("ttft", "tpot", "kv", "kv_bytes"):
            assert results[k], (k, results)
        assert results["kv"][0]["metric"]["transport"] == "grpc"
        targets = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
        assert {t["labels"]["role"] for t in targets} == {"router", "prefill", "decode"}
        assert all(t["health"] == "up" for t in targets), targets
    finally:
        prom.terminate()
        prom.wait(30)
        server.stop()

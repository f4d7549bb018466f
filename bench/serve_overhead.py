"""`pdserve bench overhead`: what the distributed path costs beyond the work itself.

Starts `pdserve serve` (disaggregated, gRPC; a tiny random model unless `--model`) on a local
Ray cluster and measures, at concurrency 1: the client's TTFT (first streamed token) minus the
prefill compute and KV transfer the router's stage histograms report (what remains is routing,
Ray hops, HTTP and SSE); the client's inter-token interval against the bare engine's decode step
time for the same model and threads (the per-token cost of streaming through Ray and HTTP); then
the router process's CPU use while `--streams` concurrent streams run. Medians of `--requests`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stage_sums(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("pdserve_request_stage_seconds_sum"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            out[stage] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("pdserve_time_to_first_token_seconds_sum"):
            out["router_ttft"] = float(line.rsplit(" ", 1)[1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: a tiny random Llama with a byte tokenizer")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import httpx
    import ray
    import torch

    from pdserve.engine.config import PdserveConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling import SamplingParams
    from pdserve.router.actor import launch_router

    model = args.model
    if model is None:
        from pdserve.engine.tiny_models import save_tiny_text_model

        model = str(save_tiny_text_model(Path(tempfile.mkdtemp(prefix="pdserve-overhead-"))))
    cfg = PdserveConfig().replace(model={"model": model}, engine={"num_threads": 1}, cache={"num_kv_blocks": 512},
                                  serve={"port": 0, "disaggregation": "always"})  # the KV-transfer path
    torch.set_num_threads(1)
    engine = LLMEngine(cfg)  # the bare engine's decode step time, same model and threads
    engine.add_request("b", "warm up the engine", SamplingParams(max_tokens=args.tokens, ignore_eos=True,
                                                                 temperature=0))
    engine.step()
    steps = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    step_ms = statistics.median(steps) * 1e3
    del engine

    ray.init(namespace="pdserve", include_dashboard=False, log_to_driver=False)
    router = launch_router(cfg)
    url = ray.get(router.start.remote(), timeout=300)
    body = {"prompt": "measure the overhead of the distributed path", "max_tokens": args.tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}

    client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=args.streams + 4))  # keep-alive

    def one() -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        ttft, gaps, last = None, [], None
        with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                elif last is not None:
                    gaps.append(now - last)
                last = now
        return ttft, gaps

    for _ in range(3):
        one()  # warm-up
    before = _stage_sums(url)
    ttfts, gaps = [], []
    for _ in range(args.requests):
        t, g = one()
        ttfts.append(t)
        gaps += g
    after = _stage_sums(url)
    per_req = {k: (after.get(k, 0) - before.get(k, 0)) / args.requests for k in after}
    work = per_req.get("prefill_compute", 0) + per_req.get("kv_transfer", 0)

    pid = ray.get(router.pid.remote())
    c0, t0 = _proc_cpu_seconds(pid), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
        list(pool.map(lambda _: one(), range(args.streams)))
    router_cores = (_proc_cpu_seconds(pid) - c0) / (time.perf_counter() - t0)
    ray.get(router.stop.remote())
    ray.shutdown()

    res = {"ttft_ms_p50": statistics.median(ttfts) * 1e3, "prefill_compute_ms_mean": per_req.get(
        "prefill_compute", 0) * 1e3, "kv_transfer_ms_mean": per_req.get("kv_transfer", 0) * 1e3,
        "overhead_ms": (statistics.median(ttfts) - work) * 1e3, "stages_ms_mean": {k: v * 1e3 for k, v in
                                                                                  per_req.items()},
        "itl_ms_p50": statistics.median(gaps) * 1e3, "engine_step_ms_p50": step_ms,
        "streaming_overhead_ms_per_token": statistics.median(gaps) * 1e3 - step_ms,
        "router_cores_at_streams": router_cores, "streams": args.streams, "requests": args.requests}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"concurrency 1, {args.requests} requests x {args.tokens} tokens, model {model}")
        print(f"TTFT p50 {res['ttft_ms_p50']:.1f} ms = prefill compute {res['prefill_compute_ms_mean']:.1f} + "
              f"KV transfer {res['kv_transfer_ms_mean']:.1f} (means) + overhead {res['overhead_ms']:.1f} ms")
        print(f"the router's own TTFT (mean): {res['stages_ms_mean'].get('router_ttft', 0):.1f} ms; the rest of the "
              "client's is HTTP, the request body, tokenization and the first SSE write")
        print("stage means (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in res["stages_ms_mean"].items()))
        print(f"ITL p50 {res['itl_ms_p50']:.2f} ms vs bare engine step {step_ms:.2f} ms: streaming adds "
              f"{res['streaming_overhead_ms_per_token']:.2f} ms per token")
        print(f"router process under {args.streams} concurrent streams: {router_cores:.2f} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())

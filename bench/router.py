"""`pdserve bench router`: what the router costs per token it relays.

Starts the router (disaggregated, 1 prefill + 1 decode worker; a tiny random model unless `--model`,
so the workers make tokens faster than the router can relay them) on a local Ray cluster, then
runs `--streams` concurrent streaming completions (`--tokens` each, `ignore_eos`) per level and
reports the tokens delivered per second, the router actor process's CPU use over the run (its
/proc utime + stime: how many cores it kept busy) and its CPU ms per 1,000 tokens, whence the
ceiling: tokens per second one router core can relay (and, beside it, the pool manager's cores:
health checks, which do not grow with the token rate). At concurrency 1 it reports the client's
inter-token interval (p50, p99). `--runs N` measures each level N times, interleaved, and reports the
run with the median CPU per 1,000 tokens beside the range (a shared machine's runs spread widely).
The client is a bare asyncio HTTP/1.1 reader (no HTTP library),
so it takes as little of the shared CPU as it can; on a small machine the workers, the client and
the router still share cores, so delivered tok/s is the machine's, while the router's ms per
1,000 tokens is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path


def cpu_flags() -> list[str]:
    """The CPU's AVX family flags (what the numbers were measured on)."""
    try:
        with open("/proc/cpuinfo") as f:
            return sorted(set(re.findall(r"\bavx\S*", f.read())))
    except OSError:
        return []


def proc_cpu_times(pid: int) -> tuple[float, float]:
    """A process's user and system CPU seconds so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def proc_cpu_seconds(pid: int) -> float:
    """A process's user + system CPU seconds so far."""
    return sum(proc_cpu_times(pid))


async def stream_one(host: str, port: int, body: bytes, gaps: list[float] | None = None) -> int:
    """One streaming completion over a fresh connection; returns the completion tokens its usage
    chunk reports. `gaps`: the intervals between text chunks are appended to it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP {status!r}: {(await reader.read(2000))!r}")
        tokens, last = 0, None
        while line := await reader.readline():
            if not line.startswith(b"data: "):
                continue  # chunked-encoding sizes, blank lines
            if line.startswith(b"data: [DONE]"):
                break
            if b'"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            elif b'"error"' in line:
                raise RuntimeError(line.decode(errors="replace"))
            elif gaps is not None:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
        return tokens
    finally:
        writer.close()


def _body(tokens: int, i: int) -> bytes:
    return json.dumps({"prompt": f"stream {i}: relay these tokens", "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()


async def _level(host: str, port: int, streams: int, tokens: int, pid: int, pools_pid: int) -> dict:
    (u0, s0), p0, t0 = proc_cpu_times(pid), proc_cpu_seconds(pools_pid), time.perf_counter()
    got = await asyncio.gather(*(stream_one(host, port, _body(tokens, i)) for i in range(streams)))
    wall, (u1, s1) = time.perf_counter() - t0, proc_cpu_times(pid)
    cpu, n = u1 - u0 + s1 - s0, sum(got)
    # user time: the router's Python; system time: mostly its socket writes (one per stream per engine step)
    return {"streams": streams, "tokens": n, "wall_s": wall, "tok_s": n / wall, "router_cores": cpu / wall,
            "pool_manager_cores": (proc_cpu_seconds(pools_pid) - p0) / wall,
            "router_cpu_ms_per_1k_tokens": cpu / n * 1e6, "router_user_ms_per_1k_tokens": (u1 - u0) / n * 1e6,
            "router_sys_ms_per_1k_tokens": (s1 - s0) / n * 1e6, "tok_s_per_router_core": n / cpu if cpu else None}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median CPU per 1,000 tokens, with the range over all of them."""
    ms = sorted(r["router_cpu_ms_per_1k_tokens"] for r in runs)
    mid = sorted(runs, key=lambda r: r["router_cpu_ms_per_1k_tokens"])[(len(runs) - 1) // 2]
    return {**mid, "runs": len(runs), "ms_per_1k_min": ms[0], "ms_per_1k_max": ms[-1]}


async def _itl(host: str, port: int, requests: int, tokens: int) -> dict:
    gaps: list[float] = []
    for i in range(requests):
        await stream_one(host, port, _body(tokens, i), gaps)
    gaps.sort()
    return {"itl_ms_p50": statistics.median(gaps) * 1e3, "itl_ms_p99": gaps[int(0.99 * (len(gaps) - 1))] * 1e3,
            "requests": requests, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench router", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: a tiny random Llama with a byte tokenizer")
    ap.add_argument("--streams", default="64,256", help="comma-separated concurrency levels")
    ap.add_argument("--tokens", type=int, default=256, help="output tokens per request")
    ap.add_argument("--itl-requests", type=int, default=10, help="sequential requests for the concurrency-1 ITL")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--runs", type=int, default=1, help="runs per level (interleaved); the median run is reported")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    levels = list(dict.fromkeys(int(s) for s in args.streams.split(",")))

    import ray

    from pdserve.engine.config import PdserveConfig
    from pdserve.router.actor import launch_router

    model = args.model
    if model is None:
        from pdserve.engine.tiny_models import save_tiny_text_model

        model = str(save_tiny_text_model(Path(tempfile.mkdtemp(prefix="pdserve-bench-router-"))))
    most = max(levels)
    blocks = most * ((args.tokens + 32) // 16 + 2) + 64  # every stream's KV at once: no preemption
    cfg = PdserveConfig().replace(
        model={"model": model}, engine={"num_threads": args.threads}, cache={"num_kv_blocks": blocks},
        scheduler={"max_num_seqs": most, "max_num_batched_tokens": max(2048, most * 16)},
        serve={"port": 0, "mode": "disaggregated", "prefill_workers": 1, "decode_workers": 1,
               "max_num_queued_requests": None, "default_max_tokens": args.tokens})
    ray.init(namespace="pdserve", include_dashboard=False, log_to_driver=False)
    router = launch_router(cfg)
    try:
        url = ray.get(router.start.remote(), timeout=300)
        pid, pools_pid = ray.get([router.pid.remote(), router.pools_pid.remote()])
        host, port = url.removeprefix("http://").rsplit(":", 1)

        async def run() -> dict:
            await _level(host, int(port), 8, 32, pid, pools_pid)  # warm-up: connections, the workers' first steps
            runs: dict[int, list[dict]] = {s: [] for s in levels}
            for _ in range(max(1, args.runs)):
                for s in levels:
                    runs[s].append(await _level(host, int(port), s, args.tokens, pid, pools_pid))
            return {"levels": [_median_run(runs[s]) for s in levels],
                    "concurrency_1": await _itl(host, int(port), args.itl_requests, args.tokens)}

        res = asyncio.run(run())
    finally:
        ray.get(router.stop.remote(), timeout=60)
        ray.shutdown()
    res.update(model=model, cpu_flags=cpu_flags(), cores=os.cpu_count())
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"model {model}; {os.cpu_count()} cores; CPU flags: {' '.join(res['cpu_flags']) or 'none'}")
    for r in res["levels"]:
        per_core = r["tok_s_per_router_core"]
        spread = (f" [runs: {r['ms_per_1k_min']:.1f}-{r['ms_per_1k_max']:.1f} ms per 1k, median shown]"
                  if r["runs"] > 1 else "")
        print(f"{r['streams']:4d} streams x {args.tokens} tokens: {r['tok_s']:8.0f} tok/s delivered, router "
              f"{r['router_cores']:.2f} cores, {r['router_cpu_ms_per_1k_tokens']:.1f} ms CPU per 1k tokens "
              f"({r['router_user_ms_per_1k_tokens']:.1f} user + {r['router_sys_ms_per_1k_tokens']:.1f} system) "
              f"(ceiling ~{per_core or 0:,.0f} tok/s per router core); pool manager {r['pool_manager_cores']:.2f} "
              f"cores{spread}")
    c1 = res["concurrency_1"]
    print(f"concurrency 1: ITL p50 {c1['itl_ms_p50']:.2f} ms, p99 {c1['itl_ms_p99']:.2f} ms "
          f"({c1['requests']} x {c1['tokens']} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

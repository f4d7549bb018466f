"""`pdserve chaos`: the chaos suite. Faults injected into a live deployment under steady load,
and what every client saw.

One Ray cluster; for each scenario a fresh disaggregated deployment (2 prefill + 2 decode
workers, KV over gRPC, a fixed port) under steady load from `--concurrency` clients (keep-alive
HTTP, streaming and non-streaming mixed, priorities -1/0/1, greedy with `ignore_eos` and a fixed
`max_tokens`) over a fixed set of prompts whose full texts come from an uninterrupted reference
run of the bare engine on the same model. Every request ends in exactly one of:

- completed: the text equals the reference exactly;
- failed: an explicit error (HTTP 4xx/5xx with an error body, or an SSE error chunk then [DONE]);
  `rejected` counts the 503 + Retry-After refusals among them;
- connection error: the connection broke or was refused (the router died);
- disconnected: the client closed its stream mid-way on purpose (disconnect-50pct);
- lost: no answer and no error, an error body missing, a stream ended without [DONE], or a hang
  past `--request-timeout` (must be 0);
- dup/missing: a completed answer whose text differs from the reference (tokens lost or repeated;
  must be 0).

After the load: KV blocks still held on every worker once it is quiet (polled with a deadline;
must be 0), request migrations (the router's counter), and the recovery time: from the fault to
the pools back at full healthy size without the faulty worker and a probe request answered (to
/health answering 200 for kill-router).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import random
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.serve import chunk_text, parse_sse_line, percentile
from pdserve.engine.config import FaultConfig

SCENARIOS: dict[str, str] = {
    "baseline": "no fault: the control run (its throughput is the sustainable rate overload-10x multiplies)",
    "kill-decode": "ray.kill the decode worker holding the most requests at 30% of the run (frozen first, so "
                   "that the requests it holds when read are still there when it dies)",
    "kill-prefill": "ray.kill the prefill worker holding the most requests at 30% of the run (frozen first)",
    "kill-router": "ray.kill the router actor at 30% of the run; Ray restarts it on the same port over the "
                   "same pools (the pool manager's) and it frees what its previous incarnation left",
    "stall-decode": "freeze the engine loop of the busiest decode worker for 60 s at 30% of the run "
                    "(alive, answering, stuck)",
    "transfer-fail-5pct": "every prefill worker fails 5% of its KV transfers (fault injection, from the start)",
    "corrupt-chunks": "every prefill worker flips the bytes of one chunk in 5% of its KV transfers, after "
                      "checksumming",
    "disconnect-50pct": "half of the clients close their stream a third of the way through each request",
    "scale-down": "scale prefill 2->1 and decode 2->1 at 30% of the run (the removed workers drain)",
    "overload-10x": "open-loop arrivals at 10x the baseline's throughput against a bounded queue "
                    "(serve.max_num_queued_requests: the baseline's rate x its TTFT p50, Little's law)",
    # hostile clients (issue 14): streaming victims measured quiet, then during the attack
    "stop-storm": "attackers send the most stop strings allowed (64 x 256 characters: served, exact) and far more "
                  "(10,000 stop strings or stop_token_ids: refused with 400) while victims stream",
    "priority-flood": "attackers flood requests at priorities -1,000,000 and +1,000,000, outside the operator's grant "
                      "(refused with 400: nobody is preempted) while victims stream",
    "huge-prompts": "attackers send 3 MiB chat and completion prompts (under the 4 MiB body limit: refused with 400 "
                    "before tokenizing) and 5 MiB bodies (413) while victims stream",
    "frozen-peer": "SIGSTOP the process of the busiest decode worker (alive to Ray, answering nothing, its KV plane "
                   "silent) while victims stream: it is failed, replaced, and its requests migrate",
}
ALL = list(SCENARIOS)
ATTACKS = ["stop-storm", "priority-flood", "huge-prompts", "frozen-peer"]
FAULT_AT = 0.3  # fraction of the requests started when the fault is injected
ATTACKERS = 4  # concurrent hostile clients (closed loop: each sends its next request once answered)
ATTACK_INDEX = 1_000_000  # attackers' request indices start here (the victims' are below)

PROMPTS = [
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "Write a short poem about the sea.",
    "Explain how a hash table works, step by step, including what happens when two keys collide and how "
    "the table grows when it fills up.",
    "List five uses for a paperclip:",
    "The history of the printing press begins",
    "Q: What is the capital of France?\nA:",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
]

COMPLETED, FAILED, CONN_ERROR, DISCONNECTED, LOST, MISMATCH = (
    "completed", "failed", "conn_error", "disconnected", "lost", "mismatch")


@dataclass
class Settings:
    model: str | None  # a path, or None for the default model
    requests: int = 40
    concurrency: int = 6
    max_tokens: int = 32
    stall_timeout_s: float = 10.0
    request_timeout_s: float = 120.0
    seed: int = 0
    quick: bool = False


@dataclass
class Spec:
    index: int
    prompt: int  # index into PROMPTS
    stream: bool
    priority: int
    kind: str = ""  # an attack's request kind ("" for a normal client)


@dataclass
class Record:
    spec: Spec
    outcome: str = LOST
    status: int | None = None
    error: str = ""
    rejected: bool = False  # 503 with Retry-After
    start: float = 0.0  # monotonic
    headers_s: float | None = None  # response status and headers received, from the start
    ttft_s: float | None = None  # first content chunk (streaming), from the start
    last_s: float | None = None  # last content chunk (streaming), from the start
    max_gap_s: float = 0.0  # the longest wait between two content chunks (streaming)
    end: float = 0.0
    text: str = ""


@dataclass
class Result:
    scenario: str
    description: str
    planned: int = 0  # requests the load generator meant to send
    sent: int = 0  # answers recorded (one per request sent)
    distinct: int = 0  # distinct requests among them
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    conn_errors: int = 0
    disconnected: int = 0
    lost: int = 0
    mismatched: int = 0
    leaked_blocks: int | None = None
    stuck_requests: int | None = None  # running + waiting on workers after the run
    workers_checked: int = 0
    workers_expected: int = 0
    migrations: float | None = None
    migrations_by_reason: dict = field(default_factory=dict)
    injected_faults: float = 0  # KV-transfer faults the prefill workers injected (their own counter)
    worker_failures: dict = field(default_factory=dict)
    recovery_s: float | None = None
    fault: dict = field(default_factory=dict)  # what was injected, on which worker, when
    duration_s: float = 0.0  # the load, first request to last answer
    throughput_rps: float = 0.0  # completed requests per second of load
    ttft_p50_ms: float | None = None  # completed streaming requests, client-side
    ttft_p99_ms: float | None = None
    errors: list = field(default_factory=list)  # distinct error messages (a sample)
    mismatches: list = field(default_factory=list)  # a sample: where the text diverged
    overload: dict = field(default_factory=dict)
    attack: dict = field(default_factory=dict)  # hostile-client scenarios: the victims' TPOT, what attackers got
    harness_error: str = ""  # the suite itself failed (deployment did not start, ...)
    phases_s: dict = field(default_factory=dict)  # where the scenario's wall time went

    @property
    def accounted(self) -> bool:
        """Every planned request was sent and came back exactly once (none dropped or recorded twice by
        the load generator); `_tally` then puts each in exactly one outcome."""
        return self.planned == self.sent == self.distinct


# -- the model and its reference texts ------------------------------------------------------------------------
def tiny_model(directory: Path) -> str:
    """The test suite's tiny random model with a byte-level tokenizer (fast enough for CI)."""
    from pdserve.engine.tiny_models import save_tiny_text_model

    return str(save_tiny_text_model(directory))


# The oracle is output equality with the bare engine run one prompt at a time: only float32 is exact across
# batch compositions (bf16 GEMMs round differently with the number of rows), so the chaos suite pins it.
EXACT_DTYPE = "float32"


def reference_texts(model: str | None, max_tokens: int) -> list[str]:
    """Each prompt's uninterrupted greedy text, from the bare engine (one prompt at a time)."""
    from pdserve.engine.config import PdserveConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling import SamplingParams

    engine = LLMEngine(PdserveConfig().replace(model={"model": model, "dtype": EXACT_DTYPE},
                                               cache={"num_kv_blocks": 512}))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out = [engine.generate([p], params)[0].output_text for p in PROMPTS]
    del engine
    return out


def workload(n: int, seed: int, all_stream: bool = False, priority: int | None = None, first: int = 0) -> list[Spec]:
    rng = random.Random(seed)
    return [Spec(i, i % len(PROMPTS), all_stream or rng.random() < 0.6, (-1, 0, 1)[i % 3] if priority is None
                 else priority) for i in range(first, first + n)]


# -- one request --------------------------------------------------------------------------------------------
def _error_message(raw: bytes) -> str | None:
    try:
        err = json.loads(raw)["error"]
        return str(err["message"]) if isinstance(err, dict) else str(err)
    except Exception:
        return None


async def request(client, url: str, spec: Spec, s: Settings, reference: list[str], cut: int | None = None,
                  extra: dict | None = None, raw: tuple[str, bytes] | None = None) -> Record:
    """Send one completion and classify what came back (see the module docstring). `cut`: close the
    stream after that many content chunks (a client that goes away). `extra`: fields added to the body;
    `raw`: (path, body bytes) sent instead (an attacker's pre-encoded request)."""
    import httpx

    body = {"prompt": PROMPTS[spec.prompt], "max_tokens": s.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": spec.stream or cut is not None, "priority": spec.priority, **(extra or {})}
    path, content = raw if raw is not None else ("/v1/completions", json.dumps(body).encode())
    rec = Record(spec, start=time.monotonic())
    try:
        async with asyncio.timeout(s.request_timeout_s):
            async with client.stream("POST", f"{url}{path}", content=content,
                                     headers={"Content-Type": "application/json"}) as r:
                rec.status = r.status_code
                rec.headers_s = time.monotonic() - rec.start
                if r.status_code != 200:
                    msg = _error_message(await r.aread())
                    if msg is None:
                        rec.outcome, rec.error = LOST, f"HTTP {r.status_code} without an error body"
                    else:
                        rec.outcome, rec.error = FAILED, f"HTTP {r.status_code}: {msg}"
                        rec.rejected = r.status_code == 503 and "retry-after" in r.headers
                    return rec
                if not body["stream"]:
                    try:
                        rec.text = json.loads(await r.aread())["choices"][0]["text"]
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        rec.outcome, rec.error = LOST, f"unreadable response body: {e}"
                        return rec
                    rec.ttft_s = time.monotonic() - rec.start
                else:
                    done, error, chunks = False, None, 0
                    async for line in r.aiter_lines():
                        obj = parse_sse_line(line)
                        if obj is None:
                            continue
                        if obj == "[DONE]":
                            done = True
                            break
                        if "error" in obj:
                            error = obj["error"]
                            continue
                        text = chunk_text(obj)
                        if text:
                            now = time.monotonic() - rec.start
                            if rec.ttft_s is None:
                                rec.ttft_s = now
                            else:
                                rec.max_gap_s = max(rec.max_gap_s, now - rec.last_s)
                            rec.last_s = now
                            rec.text += text
                            chunks += 1
                            if cut is not None and chunks >= cut:
                                rec.outcome = DISCONNECTED  # leaving the block closes the connection
                                return rec
                    if error is not None:
                        msg = error.get("message", error) if isinstance(error, dict) else error
                        rec.outcome = FAILED if done else LOST
                        rec.error = f"stream error: {msg}" + ("" if done else " (no [DONE] after it)")
                        return rec
                    if not done:
                        rec.outcome, rec.error = LOST, "the stream ended without [DONE]"
                        return rec
        rec.outcome = COMPLETED if rec.text == reference[spec.prompt] else MISMATCH
    except (TimeoutError, httpx.TimeoutException) as e:
        rec.outcome, rec.error = LOST, f"no answer within the timeout ({type(e).__name__})"
    except httpx.TransportError as e:  # refused, reset, closed mid-response
        rec.outcome, rec.error = CONN_ERROR, f"{type(e).__name__}: {e}"[:200]
    finally:
        rec.end = time.monotonic()
    return rec


def _divergence(got: str, want: str) -> dict:
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return {"at_char": i, "got_len": len(got), "want_len": len(want), "got": got[max(0, i - 10):i + 20],
            "want": want[max(0, i - 10):i + 20]}


# -- a deployment ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Deployment:
    """A router actor with its pools on a fixed free port, driven from asyncio."""

    def __init__(self, s: Settings, **serve):
        from pdserve.engine.config import PdserveConfig

        # "always": every request's KV crosses the transfer plane, where the chaos faults strike
        self.serve = {"mode": "disaggregated", "disaggregation": "always", "prefill_workers": 2, "decode_workers": 2,
                      "port": free_port(),
                      "health_interval_s": 0.25, "stall_timeout_s": s.stall_timeout_s, "max_migrations": 3,
                      "drain_timeout_s": 5.0, "min_client_priority": -1, "max_client_priority": 1, **serve}
        self.config = PdserveConfig().replace(model={"model": s.model, "dtype": EXACT_DTYPE},
                                              cache={"num_kv_blocks": 512}, engine={"num_threads": 1},
                                              serve=self.serve)
        self.url = f"http://127.0.0.1:{self.serve['port']}"
        self.actor = None

    async def start(self, timeout: float = 300) -> None:
        from pdserve.router.actor import launch_router

        self.actor = launch_router(self.config)
        self.url = await asyncio.wait_for(_future(self.actor.start.remote()), timeout)

    async def call(self, method: str, *args, timeout: float = 60):
        return await asyncio.wait_for(_future(getattr(self.actor, method).remote(*args)), timeout)

    async def pools(self) -> dict:
        return (await self.call("status"))["pools"]

    async def handle(self, worker_id: str):
        return await self.call("worker_handle", worker_id)

    async def worker_stats(self) -> dict:
        return await self.call("worker_stats")

    async def stop(self) -> None:
        import ray

        if self.actor is None:
            return
        with contextlib.suppress(Exception):
            await self.call("stop", timeout=60)
        with contextlib.suppress(Exception):
            ray.kill(self.actor)


def _future(ref) -> asyncio.Future:
    return asyncio.wrap_future(ref.future())


def _named_workers() -> set[str]:
    from ray.util import list_named_actors

    return {a["name"] for a in list_named_actors(all_namespaces=True)
            if a.get("namespace") == "pdserve" and a["name"].startswith("pdserve-") and a["name"] != "pdserve-router"}


def _kill_strays(before: set[str]) -> list[str]:
    """Workers (detached actors) a scenario started and its router's stop did not remove."""
    import ray

    strays = sorted(_named_workers() - before)
    for name in strays:
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(name, namespace="pdserve"), no_restart=True)
    return strays


def full(pools: dict, want: dict[str, int], without: str | None = None) -> bool:
    """Every pool at exactly its wanted size, all healthy and none draining (and `without` gone)."""
    for role, n in want.items():
        ws = pools.get(role, [])
        if len(ws) != n or not all(w["healthy"] and not w["draining"] for w in ws):
            return False
        if without is not None and any(w["worker_id"] == without for w in ws):
            return False
    return True


async def wait_full(dep: Deployment, want: dict[str, int], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        pools = await dep.pools()
        if full(pools, want):
            return pools
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pools did not reach {want} within {timeout}s: {pools}")
        await asyncio.sleep(0.1)


async def counters(client, url: str) -> dict[str, dict[str, float]]:
    """The router's migration and worker-failure counters, by label."""
    text = (await client.get(f"{url}/metrics", timeout=10)).text
    out: dict[str, dict[str, float]] = {"migrations": {}, "failures": {}}
    for line in text.splitlines():
        if line.startswith("pdserve_request_migrations_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out["migrations"][reason] = out["migrations"].get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("pdserve_worker_failures_total{"):
            role = line.split('role="', 1)[1].split('"', 1)[0]
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            key = f"{role}/{reason}"
            out["failures"][key] = out["failures"].get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def injected(client, url: str) -> float:
    """Faults the prefill workers injected into KV transfers (each worker's own /metrics, found
    through the router's scrape targets)."""
    total = 0.0
    for group in (await client.get(f"{url}/metrics/targets", timeout=10)).json():
        if group["labels"].get("role") != "prefill":
            continue
        for target in group["targets"]:
            for line in (await client.get(f"http://{target}/metrics", timeout=10)).text.splitlines():
                if line.startswith("pdserve_injected_faults_total{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


async def healthy(client, url: str) -> bool:
    import httpx

    try:
        return (await client.get(f"{url}/health", timeout=2)).status_code == 200
    except httpx.HTTPError:
        return False


async def wait_healthy(client, url: str, timeout: float, also=None) -> bool:
    """Until /health answers 200 (and the coroutine function `also`, if given, returns true)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await healthy(client, url) and (also is None or await also()):
            return True
        await asyncio.sleep(0.1)
    return False


async def quiesce(dep: Deployment, timeout: float) -> tuple[int, int, dict]:
    """Poll every worker until none holds a KV block or a request (or the deadline): (blocks still
    held, requests still running or waiting, the last stats)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await dep.worker_stats()
        held = sum(st.num_blocks - st.free_blocks for st in stats.values())
        stuck = sum(st.num_running + st.num_waiting for st in stats.values())
        if (not held and not stuck) or time.monotonic() > deadline:
            return held, stuck, stats
        await asyncio.sleep(0.1)


# -- load ---------------------------------------------------------------------------------------------------
class Load:
    """Closed-loop clients over a shared list of requests; `fault_due` is set once FAULT_AT of
    them have started."""

    def __init__(self, client, url: str, specs: list[Spec], s: Settings, reference: list[str],
                 cut_clients: set[int] = frozenset()):
        self.client, self.url, self.specs, self.s, self.reference = client, url, specs, s, reference
        self.cut_clients = cut_clients
        self.records: list[Record] = []
        self.started = 0
        self.fault_due = asyncio.Event()
        self._next = iter(specs)
        self.threshold = max(1, math.ceil(FAULT_AT * len(specs)))

    async def _client(self, cid: int) -> None:
        cut = max(2, self.s.max_tokens // 3) if cid in self.cut_clients else None
        for spec in self._next:
            self.started += 1
            if self.started >= self.threshold:
                self.fault_due.set()
            rec = await request(self.client, self.url, spec, self.s, self.reference, cut)
            self.records.append(rec)
            if rec.outcome == CONN_ERROR:  # the router is down: come back when it serves again
                await wait_healthy(self.client, self.url, 60)

    async def run(self) -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(self._client(c) for c in range(self.s.concurrency)))
        return time.monotonic() - t0


async def busiest(dep: Deployment, role: str, timeout: float = 10.0) -> tuple[str, int]:
    """The worker of `role` with the most requests in flight: polling for one holding two or more
    (for half a second), else one or more (until `timeout`), else any."""
    t0 = time.monotonic()
    while True:
        ws = [w for w in (await dep.pools())[role] if w["healthy"] and not w["draining"]]
        best = max(ws, key=lambda w: w["inflight"], default=None)
        waited = time.monotonic() - t0
        if best is not None and (best["inflight"] >= (2 if waited < 0.5 else 1) or waited > timeout):
            return best["worker_id"], best["inflight"]
        await asyncio.sleep(0.01)


FROZEN_AFTER_S = 0.3  # no forward-pass layer for this long: the loop is frozen (a tiny-model layer takes ~1 ms)


async def frozen_holding(dep: Deployment, role: str, timeout: float = 10.0) -> tuple[str, Any, dict]:
    """Freeze (`debug_stall`) the engine loop of the busiest worker of `role` and return it once it is
    frozen holding requests: (worker id, handle, {"held": requests in its engine, "router_inflight",
    "frozen_at": when it was frozen}).

    Why: on the tiny model a request is over in ~100 ms, so a count read before the fault can be stale
    by the time Ray kills the actor (the kill-decode flake: inflight 1 when read, nothing left to
    migrate at the kill). A frozen loop neither finishes nor admits anything, so what it holds once
    frozen is exactly what the fault hits. A worker frozen holding nothing is thawed and another picked."""
    deadline = time.monotonic() + timeout
    while True:
        wid, router_inflight = await busiest(dep, role, timeout=max(0.0, deadline - time.monotonic()))
        h = await dep.handle(wid)
        t = time.monotonic()
        await _future(h.debug_stall.remote(60))
        while True:  # a step in progress may still finish requests: read once no layer has run for a while
            st = (await dep.worker_stats()).get(wid)
            if st is None or st.progress_age_s > FROZEN_AFTER_S or time.monotonic() - t > 2.0:
                break
            await asyncio.sleep(0.02)
        held = 0 if st is None else st.num_running + st.num_waiting
        if role == "prefill" and st is not None and st.busy:
            # a prefill is over in milliseconds; what a frozen prefill worker holds sits in its loop's inbox,
            # which the stats do not count: at least one
            held = max(held, 1)
        if held or time.monotonic() > deadline:
            return wid, h, {"held": held, "router_inflight": router_inflight, "frozen_at": t}
        await _future(h.debug_stall.remote(0))


async def probe(client, url: str) -> bool:
    import httpx

    body = {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    try:
        r = await client.post(f"{url}/v1/completions", json=body, timeout=30)
        return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    except (httpx.HTTPError, ValueError, KeyError):
        return False


async def recovered(dep: Deployment, client, fault_at: float, want: dict[str, int], without: str | None,
                    timeout: float) -> float | None:
    """Seconds from the fault to: the pools at `want`, all healthy, `without` gone, and a probe answered."""
    deadline = fault_at + timeout
    while time.monotonic() < deadline:
        if full(await dep.pools(), want, without) and await probe(client, dep.url):
            return time.monotonic() - fault_at
        await asyncio.sleep(0.1)
    return None


# -- scenarios ----------------------------------------------------------------------------------------------------
async def run_scenario(name: str, s: Settings, reference: list[str], baseline: Result | None = None) -> Result:
    """One scenario on a fresh deployment. overload-10x needs the baseline's result (its sustainable
    rate and TTFT)."""
    import httpx

    res = Result(name, SCENARIOS[name])
    serve: dict[str, Any] = {}
    queue_limit = 0
    if name == "overload-10x":
        if baseline is None or not baseline.throughput_rps or baseline.ttft_p50_ms is None:
            res.harness_error = "overload-10x needs a completed baseline run (its rate and TTFT)"
            return res
        # Little's law: requests before their first token at the sustainable rate = rate x TTFT (rounded
        # down: the bound admits no more than is sustainable)
        queue_limit = max(1, math.floor(baseline.throughput_rps * baseline.ttft_p50_ms / 1e3))
        serve["max_num_queued_requests"] = queue_limit
    dep = Deployment(s, **serve)
    before_workers = _named_workers()
    limits = httpx.Limits(max_connections=s.concurrency + 8, max_keepalive_connections=s.concurrency + 8)
    try:
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(s.request_timeout_s, connect=5)) as client:
            t = time.monotonic()
            await dep.start()
            want = {"prefill": 2, "decode": 2}
            await wait_full(dep, want, 120)
            res.phases_s["deploy"] = time.monotonic() - t
            t = time.monotonic()
            before = await counters(client, dep.url)
            pid_before = await dep.call("pid")
            if name == "overload-10x":
                await _overload(dep, s, reference, baseline, queue_limit, res)
            elif name in ATTACKS:
                want = await _attack(name, dep, client, s, reference, res)
            else:
                want = await _closed_loop(name, dep, client, s, reference, res)
            # quiet: every worker's KV back, nothing running or waiting (a prefill worker's reservation on
            # a dead peer is reclaimed by the lease at worst)
            res.phases_s["load_and_recovery"] = time.monotonic() - t
            t = time.monotonic()
            held, stuck, stats = await quiesce(dep, dep.config.kv_transfer.lease_s + 10)
            res.phases_s["quiesce"] = time.monotonic() - t
            res.leaked_blocks, res.stuck_requests, res.workers_checked = held, stuck, len(stats)
            res.injected_faults = await injected(client, dep.url)
            res.workers_expected = sum(want.values())
            after = await counters(client, dep.url)
            restarted = await dep.call("pid") != pid_before  # a new router process: its counters start at 0
            for key, out in (("migrations", res.migrations_by_reason), ("failures", res.worker_failures)):
                for label, v in after[key].items():
                    d = v if restarted else v - before[key].get(label, 0.0)
                    if d:
                        out[label] = d
            res.migrations = sum(res.migrations_by_reason.values())
            if restarted:
                res.fault["counters_reset"] = True
    except Exception as e:  # the harness could not run the scenario: reported, never silently passed
        res.harness_error = f"{type(e).__name__}: {e}"[:500]
    finally:
        t = time.monotonic()
        await dep.stop()
        strays = _kill_strays(before_workers)
        res.phases_s["stop"] = time.monotonic() - t
        if strays:
            res.fault["stray_workers_killed"] = strays
    return res


async def _closed_loop(name: str, dep: Deployment, client, s: Settings, reference: list[str], res: Result) -> dict:
    """Run the scenario's load with its fault; returns the pool sizes it ends at."""
    import ray

    want = {"prefill": 2, "decode": 2}
    specs = workload(s.requests, s.seed)
    cut = set(range(0, s.concurrency, 2)) if name == "disconnect-50pct" else set()
    load = Load(client, dep.url, specs, s, reference, cut)
    rates = {"transfer-fail-5pct": "transfer_fail_rate", "corrupt-chunks": "transfer_corrupt_rate"}
    if name in rates:
        pools = await dep.pools()
        for k, w in enumerate(pools["prefill"]):
            h = await dep.handle(w["worker_id"])
            await _future(h.set_faults.remote(FaultConfig(**{rates[name]: 0.05, "seed": s.seed * 100 + k})))
        res.fault = {"what": f"{rates[name]}=0.05", "on": [w["worker_id"] for w in pools["prefill"]]}
    recovery: dict[str, Any] = {}

    async def inject() -> None:
        await load.fault_due.wait()
        t = time.monotonic()
        if name in ("kill-decode", "kill-prefill", "stall-decode"):
            role = "prefill" if name == "kill-prefill" else "decode"
            wid, h, held = await frozen_holding(dep, role)
            t = held["frozen_at"]  # stall-decode: the freeze is the fault
            if name != "stall-decode":
                t = time.monotonic()
                ray.kill(h)
            # inflight: what the worker's engine held at the fault (frozen: it cannot have finished any since)
            res.fault = {"what": name, "worker": wid, "inflight": held["held"],
                         "router_inflight": held["router_inflight"], "started": load.started}
            recovery["s"] = await recovered(dep, client, t, want, wid, 120)
        elif name == "kill-router":
            old_pid = await dep.call("pid")
            t = time.monotonic()
            ray.kill(dep.actor, no_restart=False)  # asynchronous: the old process may answer for a moment
            res.fault = {"what": "router killed (Ray restarts it)", "started": load.started}

            async def new_process() -> bool:
                with contextlib.suppress(Exception):
                    return await dep.call("pid", timeout=5) != old_pid
                return False

            ok = await wait_healthy(client, dep.url, 120, also=new_process)  # recovered: a new router serving
            recovery["s"] = time.monotonic() - t if ok else None
            res.fault["router_pid_changed"] = ok
        elif name == "scale-down":
            pools = await dep.pools()
            want.update(prefill=1, decode=1)
            await dep.call("scale", 1, 1)
            # the router drains the last workers of each pool
            res.fault = {"what": "scale to 1 prefill + 1 decode", "started": load.started,
                         "removed": {role: [(w["worker_id"], w["inflight"]) for w in ws[1:]]
                                     for role, ws in pools.items()}}
            recovery["s"] = await recovered(dep, client, t, want, None, 120)

    faulty = name in ("kill-decode", "kill-prefill", "stall-decode", "kill-router", "scale-down")
    duration, _ = await asyncio.gather(load.run(), inject() if faulty else asyncio.sleep(0))
    res.recovery_s = recovery.get("s")
    if faulty and res.recovery_s is None:
        res.errors.append("did not recover within 120 s")
    _tally(res, load.records, reference, planned=len(specs))
    res.duration_s = duration
    res.throughput_rps = res.completed / duration if duration else 0.0
    return want


async def _overload(dep: Deployment, s: Settings, reference: list[str], baseline: Result, queue_limit: int,
                    res: Result) -> None:
    """Open-loop Poisson arrivals at 10x the sustainable rate (the baseline's throughput), all
    streaming (every accepted request has a TTFT), against the bounded queue."""
    import httpx

    baseline_rps = baseline.throughput_rps
    rate = 10 * baseline_rps
    n = min(max(2 * s.requests, math.ceil(2.0 * rate)), 6 * s.requests)  # arrivals over ~2 s, within bounds
    specs = workload(n, s.seed + 2, all_stream=True)
    rng = random.Random(s.seed + 3)
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(s.request_timeout_s, connect=5)) as burst:
        t0 = time.monotonic()
        offsets, t = [], 0.0
        for _ in specs:
            offsets.append(t)
            t += rng.expovariate(rate)

        async def one(spec: Spec, offset: float) -> Record:
            await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))  # the arrival process
            return await request(burst, dep.url, spec, s, reference)

        records = await asyncio.gather(*(one(sp, o) for sp, o in zip(specs, offsets, strict=True)))
        duration = time.monotonic() - t0
    _tally(res, list(records), reference, planned=len(specs))
    res.duration_s = duration
    res.throughput_rps = res.completed / duration if duration else 0.0
    rejections = [r.headers_s for r in records if r.rejected and r.headers_s is not None]
    # the rate the requests really went out at (the planned offsets say nothing when the event loop lags)
    starts = sorted(r.start for r in records)
    achieved = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 and starts[-1] > starts[0] else 0.0
    classes = {}
    for prio in (-1, 0, 1):
        ttfts = [r.ttft_s for r in records if r.outcome == COMPLETED and r.spec.priority == prio
                 and r.ttft_s is not None]
        classes[str(prio)] = {"completed": len(ttfts), "ttft_p50_ms": _ms(percentile(ttfts, 50)),
                              "ttft_p99_ms": _ms(percentile(ttfts, 99))}
    res.overload = {"sustainable_rps": baseline_rps, "baseline_ttft_p50_ms": baseline.ttft_p50_ms,
                    "offered_rps": rate, "achieved_rps": achieved, "arrivals_s": offsets[-1] if offsets else 0.0,
                    "achieved_arrivals_s": starts[-1] - starts[0] if starts else 0.0,
                    "max_num_queued_requests": queue_limit,
                    "rejection_p50_ms": _ms(percentile(rejections, 50)),
                    "rejection_p90_ms": _ms(percentile(rejections, 90)),
                    "rejection_p99_ms": _ms(percentile(rejections, 99)),
                    "rejection_max_ms": _ms(max(rejections)) if rejections else None, "ttft_by_priority": classes,
                    # the slowest rejections: (latency ms, arrival s into the run)
                    "slowest_rejections": sorted(((_ms(r.headers_s), round(r.start - t0, 3)) for r in records
                                                  if r.rejected and r.headers_s is not None), reverse=True)[:8]}


# -- hostile clients ------------------------------------------------------------------------------------------
def _attack_requests(name: str, s: Settings) -> list[tuple[str, dict | None, tuple[str, bytes] | None, bool]]:
    """The attack's request kinds, sent in turn: (kind, extra body fields, raw (path, body), stream).
    Raw bodies are encoded once here: the load generator's event loop must not spend its time on them."""
    if name == "stop-storm":
        # 64 strings of 256 characters: the most a request may carry (engine/sampling.py), and longer than any
        # answer here, so none matches and the answer must equal the reference exactly
        most = [f"{k:03d}" + "~" * 253 for k in range(64)]
        return [("stop: the most allowed", {"stop": most}, None, True),
                ("stop: 10,000 strings", {"stop": [f"stop-{k}" for k in range(10_000)]}, None, False),
                ("stop: the most allowed", {"stop": most}, None, False),
                ("stop_token_ids: 10,000", {"stop_token_ids": list(range(10_000))}, None, True)]
    if name == "priority-flood":
        return [("priority -1,000,000", {"priority": -1_000_000}, None, True),
                ("priority +1,000,000", {"priority": 1_000_000}, None, False)]
    if name == "huge-prompts":
        big = "lorem ipsum " * (3 * 2**20 // 12)  # 3 MiB of text
        chat = json.dumps({"messages": [{"role": "user", "content": big}], "max_tokens": s.max_tokens}).encode()
        completion = json.dumps({"prompt": big, "max_tokens": s.max_tokens}).encode()
        # (bodies past the 4 MiB limit are refused on their Content-Length, before they are read: the server
        # answers 413 and closes, and a client still uploading sees the connection reset; tests/serve/
        # test_api_hardening.py covers that path)
        return [("chat: 3 MiB prompt", None, ("/v1/chat/completions", chat), False),
                ("completion: 3 MiB prompt", None, ("/v1/completions", completion), False)]
    return []


async def _attackers(name: str, url: str, s: Settings, reference: list[str], stop: asyncio.Event,
                     records: list[Record]) -> None:
    """ATTACKERS closed-loop hostile clients (their own connections) until `stop` is set."""
    import httpx

    kinds = _attack_requests(name, s)
    if not kinds:
        return
    seq = itertools.count()
    limits = httpx.Limits(max_connections=ATTACKERS + 2, max_keepalive_connections=ATTACKERS + 2)

    async def attacker(client) -> None:
        while not stop.is_set():
            i = next(seq)
            kind, extra, raw, stream = kinds[i % len(kinds)]
            spec = Spec(ATTACK_INDEX + i, i % len(PROMPTS), stream, 0, kind)
            records.append(await request(client, url, spec, s, reference, extra=extra, raw=raw))

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(s.request_timeout_s, connect=5)) as client:
        await asyncio.gather(*(attacker(client) for _ in range(ATTACKERS)))


def _tpot(records: list[Record], s: Settings) -> dict:
    """The victims' time per output token, per completed stream: (last chunk - first chunk) / (tokens - 1)
    (greedy with ignore_eos: every completed answer has exactly max_tokens tokens), and the longest gap
    between two chunks of one stream."""
    done = [r for r in records if r.outcome == COMPLETED and r.spec.stream and r.last_s is not None]
    tpot = [(r.last_s - r.ttft_s) / max(1, s.max_tokens - 1) for r in done]
    gaps = [r.max_gap_s for r in done]
    return {"streams": len(done), "tpot_p50_ms": _ms(percentile(tpot, 50)), "tpot_p99_ms": _ms(percentile(tpot, 99)),
            "max_gap_p50_ms": _ms(percentile(gaps, 50)), "max_gap_p99_ms": _ms(percentile(gaps, 99)),
            "max_gap_max_ms": _ms(max(gaps)) if gaps else None}


async def _freeze(dep: Deployment, role: str) -> tuple[str, int, dict]:
    """SIGSTOP the process of the busiest worker of `role` (its engine loop frozen first, so that what it
    holds is known: see frozen_holding): (worker id, pid, what it held)."""
    import signal

    wid, h, held = await frozen_holding(dep, role)
    pid = await _future(h.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGSTOP)
    return wid, pid, held


async def _attack(name: str, dep: Deployment, client, s: Settings, reference: list[str], res: Result) -> dict:
    """Normal streaming clients (priority 0) measured quiet, then again while the attack runs: ATTACKERS
    hostile clients, or (frozen-peer) a decode worker's process frozen once 30% of the second half has
    started. Every request, the attackers' included, is tallied; the pools must end at full size."""
    import signal

    want = {"prefill": 2, "decode": 2}
    half = max(s.concurrency, s.requests // 2)
    quiet = Load(client, dep.url, workload(half, s.seed, all_stream=True, priority=0), s, reference)
    t0 = time.monotonic()
    await quiet.run()
    attack = Load(client, dep.url, workload(half, s.seed + 1, all_stream=True, priority=0, first=half), s, reference)
    hostile: list[Record] = []
    stop = asyncio.Event()
    recovery: dict[str, Any] = {}
    frozen: list[int] = []

    async def victims() -> None:
        try:
            await attack.run()
        finally:
            stop.set()

    async def freeze() -> None:
        await attack.fault_due.wait()
        wid, pid, held = await _freeze(dep, "decode")
        frozen.append(pid)
        t = time.monotonic()
        res.fault = {"what": "SIGSTOP", "worker": wid, "inflight": held["held"],
                     "router_inflight": held["router_inflight"], "started": attack.started}
        recovery["s"] = await recovered(dep, client, t, want, wid, 120)

    try:
        jobs = [victims(), _attackers(name, dep.url, s, reference, stop, hostile)]
        await asyncio.gather(*jobs, *([freeze()] if name == "frozen-peer" else []))
    finally:
        for pid in frozen:  # the router kills it (SIGKILL ends a stopped process); else it must not stay stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    duration = time.monotonic() - t0
    res.recovery_s = recovery.get("s")
    if name == "frozen-peer" and res.recovery_s is None:
        res.errors.append("did not recover within 120 s")
    records = quiet.records + attack.records + hostile
    _tally(res, records, reference, planned=2 * half + len(hostile))
    res.duration_s = duration
    res.throughput_rps = res.completed / duration if duration else 0.0
    by_kind: dict[str, dict[str, int]] = {}
    for r in hostile:
        key = "completed" if r.outcome == COMPLETED else f"HTTP {r.status}" if r.outcome == FAILED else r.outcome
        kind = by_kind.setdefault(r.spec.kind, {})
        kind[key] = kind.get(key, 0) + 1
    victims_ok = sum(r.outcome == COMPLETED for r in quiet.records + attack.records)
    attack_s = max((r.end for r in attack.records), default=0.0) - min((r.start for r in attack.records), default=0.0)
    res.attack = {"victims": 2 * half, "victims_completed": victims_ok, "quiet": _tpot(quiet.records, s),
                  "during": _tpot(attack.records, s), "attackers": ATTACKERS if hostile else 0,
                  "attack_requests": len(hostile), "attack_s": attack_s,
                  "attack_rps": len(hostile) / attack_s if attack_s > 0 else 0.0, "by_kind": by_kind}
    return want


def _ms(v: float) -> float | None:
    return None if v is None or math.isnan(v) else round(v * 1e3, 1)


def _tally(res: Result, records: list[Record], reference: list[str], planned: int) -> None:
    res.planned, res.sent, res.distinct = planned, len(records), len({r.spec.index for r in records})
    ttfts = [r.ttft_s for r in records if r.outcome == COMPLETED and r.spec.stream and r.ttft_s is not None]
    res.ttft_p50_ms, res.ttft_p99_ms = _ms(percentile(ttfts, 50)), _ms(percentile(ttfts, 99))
    for r in records:
        if r.outcome == COMPLETED:
            res.completed += 1
        elif r.outcome == FAILED:
            res.failed += 1
            res.rejected += r.rejected
        elif r.outcome == CONN_ERROR:
            res.conn_errors += 1
        elif r.outcome == DISCONNECTED:
            res.disconnected += 1
        elif r.outcome == MISMATCH:
            res.mismatched += 1
            if len(res.mismatches) < 5:
                res.mismatches.append({"request": r.spec.index, "prompt": r.spec.prompt, "stream": r.spec.stream,
                                       **_divergence(r.text, reference[r.spec.prompt])})
        else:
            res.lost += 1
        if r.error and r.error not in res.errors and len(res.errors) < 8:
            res.errors.append(r.error)


# -- the suite ---------------------------------------------------------------------------------------------------
def run_suite(s: Settings, scenarios: list[str], progress=None) -> dict:
    """Run `scenarios` (on the Ray cluster this process is connected to, else a new local one) and
    return {"settings", "machine", "results": [Result as a dict], "wall_s"}. overload-10x brings the
    baseline in before it when it is not selected."""
    import ray

    scenarios = list(scenarios)
    if "overload-10x" in scenarios and "baseline" not in scenarios[:scenarios.index("overload-10x")]:
        scenarios.insert(scenarios.index("overload-10x"), "baseline")

    t0 = time.monotonic()
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(namespace="pdserve", include_dashboard=False, log_to_driver=False,
                 num_cpus=max(8, os.cpu_count() or 1))
    try:
        reference = reference_texts(s.model, s.max_tokens)
        results: list[Result] = []
        baseline = None
        for name in scenarios:
            t = time.monotonic()
            res = asyncio.run(run_scenario(name, s, reference, baseline))
            if name == "baseline" and not res.harness_error:
                baseline = res
            results.append(res)
            if progress:
                progress(f"{name}: {format_row(res)} ({time.monotonic() - t:.0f} s)")
    finally:
        if own_ray:
            ray.shutdown()
    return {"settings": asdict(s), "machine": machine(), "scenarios": scenarios,
            "results": [{**asdict(r), "accounted": r.accounted} for r in results], "wall_s": time.monotonic() - t0}


def machine() -> dict:
    import torch

    from pdserve.engine.platform import cpu_isa, cpu_model

    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
        mem = round(kb / 2**20, 1)
    return {"cpu": cpu_model(), "isa": cpu_isa(), "cpus": os.cpu_count(), "memory_gib": mem, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


COLUMNS = ["scenario", "sent", "completed", "failed (explicit)", "of which rejected", "conn. error (router died)",
           "disconnected", "lost", "dup/missing tokens", "KV blocks leaked", "KV faults injected", "migrations",
           "recovery (s)"]


def _cells(r: dict) -> list[str]:
    def num(v, fmt="{:g}"):
        return "-" if v is None else fmt.format(v)

    leaked = num(r["leaked_blocks"])
    if r["stuck_requests"]:
        leaked += f" ({r['stuck_requests']} requests stuck)"
    return [r["scenario"], str(r["sent"]), str(r["completed"]), str(r["failed"]), str(r["rejected"]),
            str(r["conn_errors"]), str(r["disconnected"]), str(r["lost"]), str(r["mismatched"]), leaked,
            num(r["injected_faults"]), num(r["migrations"]), num(r["recovery_s"], "{:.1f}")]


def format_row(res: Result) -> str:
    return ", ".join(f"{c} {v}" for c, v in zip(COLUMNS[1:], _cells({**asdict(res)})[1:], strict=True)) + (
        f"; HARNESS ERROR {res.harness_error}" if res.harness_error else "")


def markdown(report: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    notes = []
    for r in report["results"]:
        lines.append("| " + " | ".join(_cells(r)) + " |")
        if r["harness_error"]:
            notes.append(f"- {r['scenario']}: the harness failed: {r['harness_error']}")
        if r["overload"]:
            o = r["overload"]
            by = ", ".join(f"priority {p}: {c['completed']} completed, TTFT p50 {c['ttft_p50_ms']} / p99 "
                           f"{c['ttft_p99_ms']} ms" for p, c in o["ttft_by_priority"].items())
            notes.append(f"- overload-10x: {o['offered_rps']:.1f} req/s offered ({o['achieved_rps']:.1f} achieved; "
                         f"10x the baseline's "
                         f"{o['sustainable_rps']:.2f} req/s) for {o['arrivals_s']:.1f} s, "
                         f"max_num_queued_requests {o['max_num_queued_requests']} (baseline rate x its TTFT p50 "
                         f"{o['baseline_ttft_p50_ms']} ms, Little's law); rejections (503 + Retry-After) "
                         f"answered in p50 {o['rejection_p50_ms']} / p99 {o['rejection_p99_ms']} ms; accepted: {by}")
        if r.get("attack"):
            a, q, d = r["attack"], r["attack"]["quiet"], r["attack"]["during"]
            got = "; ".join(f"{k}: " + ", ".join(f"{n} {o}" for o, n in sorted(v.items()))
                            for k, v in a["by_kind"].items())
            notes.append(f"- {r['scenario']}: victims {a['victims_completed']}/{a['victims']} completed exactly; their "
                         f"TPOT p50 / p99 quiet {q['tpot_p50_ms']} / {q['tpot_p99_ms']} ms, during the attack "
                         f"{d['tpot_p50_ms']} / {d['tpot_p99_ms']} ms; longest gap between chunks p99 "
                         f"{q['max_gap_p99_ms']} ms quiet, {d['max_gap_p99_ms']} ms during (max {d['max_gap_max_ms']})"
                         + (f"; {a['attack_requests']} attack requests from {a['attackers']} clients "
                            f"({a['attack_rps']:.1f}/s): {got}" if a["attack_requests"] else ""))
        if r["mismatches"]:
            notes.append(f"- {r['scenario']}: texts differing from the reference: {r['mismatches']}")
        if r["lost"] or r["conn_errors"] or (r["failed"] and r["scenario"] not in ("overload-10x", *ATTACKS)):
            notes.append(f"- {r['scenario']} errors: " + "; ".join(r["errors"]))
    s = report["settings"]
    head = (f"{s['requests']} requests per scenario (more, open loop, for overload-10x), concurrency "
            f"{s['concurrency']}, max_tokens {s['max_tokens']}, model {s['model'] or 'default (SmolLM2-135M)'}; "
            f"suite wall time {report['wall_s'] / 60:.1f} min")
    return "\n".join([head, "", *lines, "", *notes]) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model path (default: the default model; --quick: a tiny random "
                   "model built on the fly)")
    p.add_argument("--requests", type=int, default=None, help="requests per scenario (default 40; --quick 48)")
    p.add_argument("--concurrency", type=int, default=None, help="concurrent clients (default 6)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 32; --quick 48)")
    p.add_argument("--scenarios", default=",".join(ALL), help=f"comma-separated, from: {', '.join(ALL)}")
    p.add_argument("--stall-timeout", type=float, default=None, help="serve.stall_timeout_s (default 10; --quick 3)")
    p.add_argument("--request-timeout", type=float, default=None, help="a request unanswered this long is lost "
                   "(default 120 s; --quick 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the table as markdown")
    p.add_argument("--quick", action="store_true", help="CI size: a tiny model, 48 requests, 48 tokens")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve chaos", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv), p)


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios: {', '.join(unknown)} (choose from {', '.join(ALL)})")

    tmp = None
    model = args.model
    if args.quick and model is None:
        tmp = tempfile.TemporaryDirectory(prefix="pdserve-chaos-")
        model = tiny_model(Path(tmp.name))
    s = Settings(model=model, requests=args.requests or (48 if args.quick else 40),
                 concurrency=args.concurrency or 6, max_tokens=args.max_tokens or (48 if args.quick else 32),
                 stall_timeout_s=args.stall_timeout or (3.0 if args.quick else 10.0),
                 request_timeout_s=args.request_timeout or (60.0 if args.quick else 120.0), seed=args.seed,
                 quick=args.quick)
    try:
        report = run_suite(s, names, progress=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.quick and args.model is None:
        report["settings"]["model"] = "tiny random model (--quick)"
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    bad = [r["scenario"] for r in report["results"] if r["lost"] or r["mismatched"] or r["leaked_blocks"]
           or r["harness_error"] or not r["accounted"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

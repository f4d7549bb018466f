"""The router: a Ray actor hosting the OpenAI-compatible HTTP API over the worker pools.

Request path (disaggregated): validate and tokenize here; pick a decode worker (most
free KV blocks) and open its `generate` stream (it registers the request and answers
"ready"); pick a prefill worker (fewest queued prompt tokens) and call `prefill`,
which reserves blocks on that decode worker, prefills, ships the KV and returns the
first token; then relay the decode worker's per-step items. Colocated: the decode
worker's `generate` gets the prompt and prefills it itself. A client that goes away
cancels the Ray calls in flight, which abort the request on every worker.

Fault tolerance: a request runs as attempts; when a worker dies, stalls or a KV transfer
fails, the next attempt re-prefills the prompt plus the tokens already streamed on other
workers and the stream continues (`Router.generate`). The health loop fails dead, stalled
or silent workers and starts replacements up to the pools' target sizes (`fail_worker`,
`_heal`). Workers are detached actors named after the router's instance, so a router
that Ray restarts adopts them (`RouterActor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from engine.config import PdserveConfig
from router import protocol as P
from router.metrics import PoolCollector, RouterMetrics
from router.pools import LeastLoadedPolicy, RoutingPolicy, WorkerState, pick_avoiding

logger = logging.getLogger(__name__)
_ids = itertools.count()


class Router:
    """Pools, routing and the request path; runs on the router actor's event loop."""

    def __init__(self, config: PdserveConfig, policy: RoutingPolicy | None = None, instance: str | None = None):
        from engine.llm_engine import _load_tokenizer
        from engine.model_source import resolve_model

        self.config = config
        self.serve = config.serve
        self.source = resolve_model(config.model.model, config.model.cache_dir)
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(self.source.path)
        self.max_model_len = min(config.model.max_model_len or hf.max_position_embeddings,
                                 hf.max_position_embeddings)
        self.vocab_size = hf.vocab_size
        self.tokenizer = _load_tokenizer(self.source.path)
        self.model_name = self.serve.served_model_name or self.source.model_id
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.serve.metrics_prefix, self.model_name, self.registry)
        self.policy = policy or LeastLoadedPolicy()
        self.pools: dict[str, dict[str, WorkerState]] = {"prefill": {}, "decode": {}}
        self.registry.register(PoolCollector(self.serve.metrics_prefix, self.model_name, self.pools))
        self.queued = 0  # requests admitted and not yet decoding (bounded by max_num_queued_requests)
        self.active = 0  # requests in flight through this router
        self.accepting = True  # False while draining for shutdown: new requests get 503
        self.target = {"prefill": 0, "decode": 0}  # pool sizes self-healing restores
        self.spawning = {"prefill": 0, "decode": 0}
        self._start_lock = asyncio.Lock()
        self._seq = itertools.count()
        # Worker actor names carry it: unique when several routers share a cluster, and stable across a
        # router restart (the restarted router finds its workers by it).
        self.instance = instance or uuid.uuid4().hex[:6]
        self._tasks: list[asyncio.Task] = []
        self.url = ""

    # -- pools --------------------------------------------------------------------------------------
    def _actor_options(self, role: str) -> dict:
        import ray

        res = ray.cluster_resources()
        gpus = self.serve.worker_num_gpus
        if gpus is None:
            gpus = 1 if res.get("GPU", 0) >= 1 else 0
        opts: dict[str, Any] = {"num_cpus": self.serve.worker_num_cpus, "num_gpus": gpus, "max_concurrency": 1000}
        custom = self.serve.prefill_resource if role == "prefill" else self.serve.decode_resource
        if res.get(custom, 0) > 0:  # the cluster dedicates nodes to this pool
            opts["resources"] = {custom: 0.001}
        return opts

    async def _spawn(self, role: str) -> WorkerState | None:
        """Start one worker; it joins routing only once it has loaded its model and answered."""
        import ray

        from decode_worker.worker import DecodeWorker
        from prefill_worker.worker import PrefillWorker

        n = next(self._seq)
        worker_id = f"{role}-{n}"
        cls = PrefillWorker if role == "prefill" else DecodeWorker
        self.spawning[role] += 1
        handle = None
        try:
            # Detached, so that the workers outlive a router that dies: its restart adopts them.
            handle = ray.remote(cls).options(name=self._name_prefix + worker_id, namespace="pdserve",
                                             lifetime="detached", **self._actor_options(role)
                                             ).remote(self.config, worker_id)
            # a worker the cluster cannot place (no resources) or that cannot load its model gives up
            info = await asyncio.wait_for(handle.info.remote(), self.serve.worker_start_timeout_s)
            stats = await handle.stats.remote()
        except Exception as e:  # TimeoutError included
            logger.error("could not start %s: %s", worker_id, e)
            if handle is not None:
                _kill(handle)
            return None
        finally:
            self.spawning[role] -= 1
        state = self._join(role, worker_id, handle, info, stats)  # joins routing only now, ready
        logger.info("%s ready: %s", worker_id, info)
        return state

    @property
    def _name_prefix(self) -> str:
        """Worker actor names: this prefix + the worker id (how a restarted router finds them)."""
        return f"pdserve-{self.instance}-"

    def _join(self, role: str, worker_id: str, handle, info: dict, stats: dict) -> WorkerState:
        state = WorkerState(worker_id, role, handle, info=info, stats=stats, healthy=stats["alive"],
                            last_ok=time.monotonic())
        self.pools[role][worker_id] = state
        return state

    async def _adopt(self) -> None:
        """A restarted router takes over the workers its previous incarnation started (they are
        detached and named after this router's instance id) and aborts what they still hold: the
        clients of those requests went with the old router."""
        import ray
        from ray.util import list_named_actors

        prefix = self._name_prefix
        names = [a["name"] for a in list_named_actors(all_namespaces=True)
                 if a.get("namespace") == "pdserve" and a["name"].startswith(prefix)]

        async def adopt(name: str) -> None:
            worker_id = name[len(prefix):]
            role = worker_id.split("-", 1)[0]
            try:
                handle = ray.get_actor(name, namespace="pdserve")
                info = await asyncio.wait_for(handle.info.remote(), self.serve.health_timeout_s)
                aborted = await handle.abort_all.remote()
                stats = await handle.stats.remote()
            except Exception as e:
                logger.warning("not adopting %s: %s", name, e)
                with contextlib.suppress(Exception):
                    _kill(ray.get_actor(name, namespace="pdserve"))
                return
            self._join(role, worker_id, handle, info, stats)
            logger.info("adopted %s (aborted %d requests of the previous router)", worker_id, aborted)

        await asyncio.gather(*(adopt(n) for n in names))
        highest = max((int(w.split("-")[-1]) for pool in self.pools.values() for w in pool), default=-1)
        self._seq = itertools.count(highest + 1)
        for role, pool in self.pools.items():  # the pool sizes the previous incarnation was scaled to
            self.target[role] = max(self.target[role], len(pool))

    async def scale(self, prefill: int | None = None, decode: int | None = None) -> dict:
        """Grow or shrink the pools; removed workers drain (finish what they hold, within
        `drain_timeout_s`; what is left migrates) and exit. The sizes become the targets that
        self-healing restores."""
        jobs = []
        for role, want in (("prefill", prefill), ("decode", decode)):
            if want is None:
                continue
            if role == "decode" and want < 1 or role == "prefill" and want < (
                    1 if self.serve.mode == "disaggregated" else 0):
                raise ValueError(f"cannot scale {role} to {want}")
            self.target[role] = want
            live = self._live(role)
            jobs += [self._spawn(role) for _ in range(want - len(live) - self.spawning[role])]
            for w in live[want:] if want < len(live) else []:
                w.draining = True
                self._tasks.append(asyncio.create_task(self._drain(w)))
        await asyncio.gather(*jobs)
        return self.status()

    def _live(self, role: str) -> list[WorkerState]:
        return [w for w in self.pools[role].values() if not w.draining]

    async def _drain(self, w: WorkerState) -> None:
        deadline = time.monotonic() + self.serve.drain_timeout_s
        while w.inflight_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._remove(w)
        if w.inflight_requests:  # killed outright: its requests see it die and migrate
            logger.warning("%s: %d requests still running after the drain timeout; migrating them",
                           w.worker_id, w.inflight_requests)
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.handle.shutdown.remote(), 10)
        _kill(w.handle)

    def _remove(self, w: WorkerState) -> None:
        w.healthy = False
        if self.pools[w.role].get(w.worker_id) is w:
            del self.pools[w.role][w.worker_id]

    def fail_worker(self, w: WorkerState, reason: str) -> None:
        """Take a worker that died, stalled or stopped answering out of the pool, kill it (its
        in-flight requests then fail over to other workers) and start a replacement."""
        if self.pools[w.role].get(w.worker_id) is not w:
            return  # already handled
        logger.error("%s failed (%s): replacing it", w.worker_id, reason)
        self._remove(w)
        self.metrics.worker_failures.labels(self.model_name, w.role, reason).inc()
        _kill(w.handle)
        self._heal()

    def _heal(self) -> None:
        """Start workers until every pool (live + starting) is back at its target size."""
        for role, want in self.target.items():
            for _ in range(want - len(self._live(role)) - self.spawning[role]):
                self._tasks.append(asyncio.create_task(self._spawn(role)))
        self._tasks = [t for t in self._tasks if not t.done()]

    def status(self) -> dict:
        return {role: [{"worker_id": w.worker_id, "healthy": w.healthy, "draining": w.draining,
                        "inflight": w.inflight_requests, "node_id": w.info.get("node_id")} for w in pool.values()]
                for role, pool in self.pools.items()}

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.serve.health_interval_s)
            await asyncio.gather(*(self._check(w) for pool in self.pools.values() for w in list(pool.values())))
            self._heal()

    async def _check(self, w: WorkerState) -> None:
        """A worker is routable while it answers in time and its engine loop lives and makes progress.
        Dead, stalled (work queued, no progress for `stall_timeout_s`) or silent for that long: failed."""
        import ray

        s = self.serve
        try:
            w.stats = await asyncio.wait_for(w.handle.stats.remote(), s.health_timeout_s)
        except ray.exceptions.RayActorError:
            return self.fail_worker(w, "died")
        except Exception:
            w.healthy = False
            if time.monotonic() - w.last_ok > s.stall_timeout_s:
                self.fail_worker(w, "unresponsive")
            return
        w.last_ok = time.monotonic()
        if not w.stats["alive"]:
            return self.fail_worker(w, "engine_loop_died")
        if w.stats["busy"] and w.stats["progress_age_s"] > s.stall_timeout_s:
            return self.fail_worker(w, "stalled")
        w.healthy = True

    def healthy(self) -> bool:
        if not self.accepting:
            return False
        need = ["decode"] + (["prefill"] if self.serve.mode == "disaggregated" else [])
        return all(any(w.routable for w in self.pools[role].values()) for role in need)

    # -- requests ---------------------------------------------------------------------------------------
    def encode(self, parsed: P.ParsedRequest) -> list[int]:
        if parsed.kind == "chat":
            if self.tokenizer is None:
                raise P.bad_request("this model has no tokenizer, so chat is unavailable", "messages")
            try:
                text = self.tokenizer.apply_chat_template(parsed.messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
                raise P.bad_request(f"the chat template rejected the messages: {e}", "messages") from None
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(parsed.prompt, str):
            if self.tokenizer is None:
                raise P.bad_request("this model has no tokenizer; send token ids", "prompt")
            ids = self.tokenizer.encode(parsed.prompt)
        else:
            ids = list(parsed.prompt)
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise P.bad_request(f"token ids must be in [0, {self.vocab_size})", "prompt")
        if not ids:
            raise P.bad_request("the prompt is empty", "prompt")
        if len(ids) >= self.max_model_len:
            raise P.bad_request(f"the prompt has {len(ids)} tokens; this model's context window is "
                                f"{self.max_model_len} tokens, leaving no room for output", "prompt")
        if (parsed.params.stop or parsed.kind == "chat") and self.tokenizer is None:
            raise P.bad_request("stop strings need a tokenizer", "stop")
        return ids

    async def generate(self, parsed: P.ParsedRequest, ids: list[int], arrival: float) -> AsyncIterator[dict]:
        """Items {"text", "token_ids", "finished", "finish_reason"}; raises `APIError` before the first one.

        A request runs as one or more attempts. When a worker fails under an attempt (it died, was
        found stalled, or a KV transfer failed), the request migrates: a new attempt on other
        workers re-prefills the prompt plus every token already streamed and continues from there,
        so the client's stream goes on without a token lost or repeated (for greedy requests the
        text equals an uninterrupted run's). After `max_migrations`, or with no worker to move to
        within `failover_wait_s`, it ends with an explicit error instead."""
        rid = f"req-{next(_ids)}-{time.monotonic_ns()}"
        t = _Timing(arrival)
        streamed: list[int] = []  # token ids the client already has
        migrations = 0
        avoid: set[str] = set()
        why = None
        self.active += 1
        try:
            while True:
                attempt = rid if not migrations else f"{rid}.m{migrations}"
                try:
                    async for item in self._attempt(attempt, parsed, ids, streamed, t, avoid, why):
                        streamed += item["token_ids"]
                        yield item
                    return
                except _Failover as f:
                    migrations += 1
                    avoid |= f.workers
                    why = str(f)
                    self.metrics.migrations.labels(self.model_name, f.reason).inc()
                    if migrations > self.serve.max_migrations:
                        raise P.APIError(503, f"the request failed {migrations} times ({f}); giving up after "
                                         f"{self.serve.max_migrations} migrations", type="ServiceUnavailable",
                                         headers={"Retry-After": "1"}) from None
                    logger.warning("%s: %s; migrating with %d tokens streamed (attempt %d)", rid, f, len(streamed),
                                   migrations + 1)
        finally:
            self.active -= 1
            self._observe_end(t, len(ids))

    async def _pick(self, num_tokens: int, avoid: set[str], why: str | None) -> tuple[WorkerState, WorkerState | None]:
        """A decode worker (and a prefill worker when disaggregated). Retries wait up to
        `failover_wait_s` for one (a pool being healed); a new request is refused at once. `why`:
        the failure a retry moves away from."""
        disagg = self.serve.mode == "disaggregated"
        deadline = time.monotonic() + (self.serve.failover_wait_s if why else 0.0)
        while True:
            decode = pick_avoiding(self.policy.pick_decode, list(self.pools["decode"].values()), num_tokens, avoid)
            prefill = pick_avoiding(self.policy.pick_prefill, list(self.pools["prefill"].values()), num_tokens,
                                    avoid) if disagg else None
            if decode is not None and (prefill is not None or not disagg):
                return decode, prefill
            if time.monotonic() >= deadline:
                self.metrics.rejected.labels(self.model_name, "no_worker").inc()
                msg = "no healthy worker is available"
                if why:
                    msg += f" to move the request to after a worker failed ({why})"
                raise P.APIError(503, msg, type="ServiceUnavailable", headers={"Retry-After": "1"})
            await asyncio.sleep(0.05)

    async def _attempt(self, attempt: str, parsed: P.ParsedRequest, ids: list[int], streamed: list[int],
                       t: _Timing, avoid: set[str], why: str | None) -> AsyncIterator[dict]:
        """One try at (the rest of) a request on one decode worker (and one prefill worker)."""
        import ray

        params = parsed.params
        spec = {"request_id": attempt, "params": {
            "max_tokens": min(params.max_tokens, self.max_model_len - len(ids)), "temperature": params.temperature,
            "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed, "stop": params.stop,
            "stop_token_ids": params.stop_token_ids, "ignore_eos": params.ignore_eos}, "priority": parsed.priority}
        if streamed:
            spec["output_token_ids"] = list(streamed)
        elif self.serve.ttft_deadline_s is not None and why is None:
            spec["ttft_deadline"] = self.serve.ttft_deadline_s - (time.monotonic() - t.arrival)
        disagg = self.serve.mode == "disaggregated"
        num_tokens = len(ids) + len(streamed)
        retry = why is not None
        decode, prefill = await self._pick(num_tokens, avoid, why)
        m = self.metrics
        stream = None
        prefill_ref = None
        decode.inflight_requests += 1
        if prefill:
            prefill.inflight_requests += 1
            prefill.inflight_tokens += num_tokens
        stream_done = False
        current = decode  # the worker a failure is blamed on
        try:
            stream = decode.handle.generate.options(num_returns="streaming").remote(
                spec if disagg else {**spec, "prompt_token_ids": ids})
            await (await stream.__anext__())  # registered on the decode worker
            router_queue = time.monotonic() - t.arrival  # validation, routing, opening the decode stream
            if not disagg and not retry:
                m.stage.labels(self.model_name, "router_queue").observe(router_queue)
            awaiting_decode = False
            if disagg:
                current = prefill
                prefill_ref = prefill.handle.prefill.remote({**spec, "prompt_token_ids": ids},
                                                            decode.info["kv_address"])
                first = await prefill_ref
                prefill_ref = None
                prefill.inflight_requests -= 1
                prefill.inflight_tokens -= num_tokens
                prefiller, prefill = prefill, None
                current = decode
                if "error" in first:
                    if first["error"].get("retryable"):  # the pair failed: try another one
                        raise _Failover("transfer_failed", first["error"]["message"], prefiller, decode)
                    raise _api_error(first["error"])
                st = first.get("stages", {})
                if not retry:
                    for stage in ("prefill_queue", "prefill_compute", "kv_transfer"):
                        if stage in st:
                            m.stage.labels(self.model_name, stage).observe(st[stage])
                    # the Reserve round trip to the decode worker is routing work too
                    m.stage.labels(self.model_name, "router_queue").observe(router_queue + st.get("reserve", 0.0))
                t.tokens(len(first["token_ids"]), m, self.model_name)
                awaiting_decode = not first["finished"]
                stream_done = first["finished"]
                yield first
                if first["finished"]:
                    return
            async for ref in stream:
                item = await ref
                if item.get("error"):
                    if item["error"]["status"] >= 500 and item["error"].get("type") != "ServiceUnavailable":
                        raise _Failover("worker_error", item["error"]["message"], decode)
                    raise _api_error(item["error"])
                k = len(item["token_ids"])
                if awaiting_decode and k:  # KV committed -> the decode worker's first step
                    m.stage.labels(self.model_name, "decode_admission").observe(time.monotonic() - t.last_at)
                    awaiting_decode = False
                t.tokens(k, m, self.model_name)
                stream_done = item["finished"]
                yield item
                if stream_done:
                    break
        except ray.exceptions.RayActorError as e:  # the worker died (or was killed as stalled)
            if isinstance(e, ray.exceptions.ActorDiedError):
                self.fail_worker(current, "died")  # out of routing now, not at the next health check
            raise _Failover("worker_died", f"{current.worker_id} died: {type(e).__name__}", current) from None
        except ray.exceptions.RayError as e:  # the call failed inside the worker
            raise _Failover("worker_error", f"{current.worker_id}: {type(e).__name__}: {e}", current) from None
        finally:
            decode.inflight_requests -= 1
            if prefill is not None:
                prefill.inflight_requests -= 1
                prefill.inflight_tokens -= num_tokens
            if prefill_ref is not None:
                with contextlib.suppress(Exception):
                    ray.cancel(prefill_ref)
            if stream is not None and not stream_done:  # client gone, a failure, or done on the prefill side
                with contextlib.suppress(Exception):
                    ray.cancel(stream)

    def _observe_end(self, t: _Timing, num_prompt: int) -> None:
        m = self.metrics
        if t.first_at is not None:
            end = time.monotonic()
            m.e2e.labels(self.model_name).observe(end - t.arrival)
            if t.n_out > 1:
                m.tpot.labels(self.model_name).observe((end - t.first_at) / (t.n_out - 1))
            m.generation_tokens.labels(self.model_name).inc(t.n_out)
            m.prompt_tokens.labels(self.model_name).inc(num_prompt)

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self, adopt: bool = False) -> str:
        """Start the pools and the HTTP server (idempotent). `adopt`: this is a restarted router;
        take over the workers the previous incarnation left running."""
        async with self._start_lock:
            if self.url:
                return self.url
            import uvicorn

            s = self.serve
            if adopt:
                await self._adopt()
            want_prefill = s.prefill_workers if s.mode == "disaggregated" else 0
            await self.scale(prefill=max(want_prefill, self.target["prefill"]),
                             decode=max(s.decode_workers, self.target["decode"]))
            self._tasks.append(asyncio.create_task(self._health_loop()))
            from router.api import build_app

            # h11 explicitly (httptools, when installed, ignores the header limit)
            config = uvicorn.Config(build_app(self), host=s.host, port=s.port, log_level="warning", lifespan="off",
                                    timeout_graceful_shutdown=2, http="h11",
                                    h11_max_incomplete_event_size=s.max_header_bytes)
            self._server = uvicorn.Server(config)
            serving = asyncio.create_task(self._server.serve())
            self._tasks.append(serving)
            while not self._server.started:
                if serving.done():
                    serving.result()  # raises: the port is taken, ...
                    raise RuntimeError("the HTTP server stopped while starting")
                await asyncio.sleep(0.02)
            port = self._server.servers[0].sockets[0].getsockname()[1]
            self.url = f"http://{s.host}:{port}"
            return self.url

    async def drain(self, timeout: float | None = None) -> int:
        """Graceful shutdown, first half: refuse new requests (503 + Retry-After; /health turns 503
        so load balancers move away) and wait up to `timeout` (default `drain_timeout_s`) for the
        requests in flight to finish. Returns how many were still running."""
        self.accepting = False
        deadline = time.monotonic() + (self.serve.drain_timeout_s if timeout is None else timeout)
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.active

    async def stop(self) -> None:
        self.accepting = False
        if getattr(self, "_server", None):
            self._server.should_exit = True
        for t in self._tasks:
            t.cancel()
        self.target = {"prefill": 0, "decode": 0}
        for pool in self.pools.values():
            for w in list(pool.values()):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.handle.shutdown.remote(), 10)
                _kill(w.handle)
            pool.clear()


class _Failover(Exception):
    """An attempt failed in a way other workers need not (a worker died or stalled, a KV transfer
    failed): the request migrates."""

    def __init__(self, reason: str, message: str, *workers: WorkerState):
        super().__init__(message)
        self.reason = reason
        self.workers = {w.worker_id for w in workers}


class _Timing:
    """A request's client-visible timings across its attempts (TTFT, ITL, TPOT, e2e)."""

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.n_out = 0

    def tokens(self, k: int, m: RouterMetrics, model: str) -> None:
        if not k:
            return
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            m.ttft.labels(model).observe(now - self.arrival)
        elif self.last_at is not None:
            for _ in range(k):
                m.itl.labels(model).observe((now - self.last_at) / k)
        self.last_at = now
        self.n_out += k


def _kill(handle) -> None:
    """End a worker actor for good (detached: nothing else would), whatever state it is in."""
    import ray

    with contextlib.suppress(Exception):
        ray.kill(handle, no_restart=True)


def _api_error(err: dict) -> P.APIError:
    headers = {"Retry-After": str(max(1, math.ceil(err.get("retry_after") or 1)))} if err["status"] == 503 else {}
    return P.APIError(err["status"], err["message"], type=err.get("type", "error"), param=err.get("param"),
                      headers=headers)


def launch_router(config: PdserveConfig, *, name: str | None = None, namespace: str | None = None, **options):
    """Create the router actor (call `start` on it next). Ray restarts it if its process dies; the
    restarted router starts itself, adopts its workers and serves again on the same address."""
    import ray

    opts = {"num_cpus": 0, "max_concurrency": 10_000, "max_restarts": -1, "max_task_retries": 3, **options}
    if name:
        opts.update(name=name, namespace=namespace)
    return ray.remote(RouterActor).options(**opts).remote(config, uuid.uuid4().hex[:6])


class RouterActor:
    """The Ray actor (`launch_router`) that hosts `Router` and its HTTP server."""

    def __init__(self, config: PdserveConfig, instance: str | None = None):
        import ray

        logging.basicConfig(level=logging.INFO)
        self.router = Router(config, instance=instance)
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60 reads it through a deprecated state API; still supported
            warnings.simplefilter("ignore")
            self.restarted = ctx.was_current_actor_reconstructed
        if self.restarted:  # Ray brought this actor back after its process died: serve again unasked
            logger.warning("router restarted: adopting the workers of instance %s", self.router.instance)
            ctx.current_actor.start.remote()

    async def start(self) -> str:
        return await self.router.start(adopt=self.restarted)

    async def drain(self, timeout: float | None = None) -> int:
        return await self.router.drain(timeout)

    async def scale(self, prefill: int | None = None, decode: int | None = None) -> dict:
        return await self.router.scale(prefill, decode)

    async def status(self) -> dict:
        return {"url": self.router.url, "healthy": self.router.healthy(), "pools": self.router.status()}

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def worker_handle(self, worker_id: str):
        """A worker's actor handle (operators and tests reach a worker through its router)."""
        return next(w.handle for pool in self.router.pools.values() for w in pool.values()
                    if w.worker_id == worker_id)

    async def worker_stats(self) -> dict:
        """Every worker's current stats (free KV blocks, running, waiting), fetched now."""
        workers = [w for pool in self.router.pools.values() for w in pool.values()]
        stats = await asyncio.gather(*(w.handle.stats.remote() for w in workers), return_exceptions=True)
        return {w.worker_id: st for w, st in zip(workers, stats, strict=True) if not isinstance(st, BaseException)}

    async def stop(self) -> None:
        await self.router.stop()

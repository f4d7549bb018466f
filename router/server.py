"""The router: a Ray actor hosting the OpenAI-compatible HTTP API over the worker pools.

Request path (disaggregated): validate and tokenize here; pick a decode worker (most
free KV blocks) and open its `generate` stream (it registers the request and answers
"ready"); pick a prefill worker (fewest queued prompt tokens) and call `prefill`,
which reserves blocks on that decode worker, prefills, ships the KV and returns the
first token; then relay the decode worker's per-step items. Colocated: the decode
worker's `generate` gets the prompt and prefills it itself. A client that goes away
cancels the Ray calls in flight, which abort the request on every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from engine.config import PdserveConfig
from router import protocol as P
from router.metrics import PoolCollector, RouterMetrics
from router.pools import LeastLoadedPolicy, RoutingPolicy, WorkerState

logger = logging.getLogger(__name__)
_ids = itertools.count()


class Router:
    """Pools, routing and the request path; runs on the router actor's event loop."""

    def __init__(self, config: PdserveConfig, policy: RoutingPolicy | None = None):
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
        self._seq = itertools.count()
        self.instance = uuid.uuid4().hex[:6]  # actor names stay unique when several routers share a cluster
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

    async def _spawn(self, role: str) -> WorkerState:
        import ray

        from decode_worker.worker import DecodeWorker
        from prefill_worker.worker import PrefillWorker

        n = next(self._seq)
        worker_id = f"{role}-{n}"
        cls = PrefillWorker if role == "prefill" else DecodeWorker
        handle = ray.remote(cls).options(name=f"pdserve-{self.instance}-{worker_id}", namespace="pdserve",
                                         **self._actor_options(role)).remote(self.config, worker_id)
        info = await handle.info.remote()
        state = WorkerState(worker_id, role, handle, info=info)
        state.stats = await handle.stats.remote()
        state.healthy = state.stats["alive"]
        self.pools[role][worker_id] = state  # joins routing only now, ready
        logger.info("%s ready: %s", worker_id, info)
        return state

    async def scale(self, prefill: int | None = None, decode: int | None = None) -> dict:
        """Grow or shrink the pools; removed workers drain (finish what they hold) and exit."""
        jobs = []
        for role, want in (("prefill", prefill), ("decode", decode)):
            if want is None:
                continue
            if role == "decode" and want < 1 or role == "prefill" and want < (
                    1 if self.serve.mode == "disaggregated" else 0):
                raise ValueError(f"cannot scale {role} to {want}")
            live = [w for w in self.pools[role].values() if not w.draining]
            jobs += [self._spawn(role) for _ in range(want - len(live))]
            for w in live[want:] if want < len(live) else []:
                w.draining = True
                self._tasks.append(asyncio.create_task(self._drain(w)))
        await asyncio.gather(*jobs)
        return self.status()

    async def _drain(self, w: WorkerState) -> None:
        while w.inflight_requests:
            await asyncio.sleep(0.05)
        self.pools[w.role].pop(w.worker_id, None)
        with contextlib.suppress(Exception):
            await w.handle.shutdown.remote()
        import ray

        ray.kill(w.handle)

    def status(self) -> dict:
        return {role: [{"worker_id": w.worker_id, "healthy": w.healthy, "draining": w.draining,
                        "inflight": w.inflight_requests, "node_id": w.info.get("node_id")} for w in pool.values()]
                for role, pool in self.pools.items()}

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.serve.health_interval_s)
            await asyncio.gather(*(self._check(w) for pool in self.pools.values() for w in list(pool.values())))

    async def _check(self, w: WorkerState) -> None:
        """A worker is routable while it answers in time and its engine loop lives and steps."""
        try:
            w.stats = await asyncio.wait_for(w.handle.stats.remote(), self.serve.health_timeout_s)
            stalled = w.stats["busy"] and w.stats["step_age_s"] > self.serve.stall_timeout_s
            w.healthy = w.stats["alive"] and not stalled
        except Exception:
            w.healthy = False

    def healthy(self) -> bool:
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
        """Items {"text", "token_ids", "finished", "finish_reason"}; raises `APIError` before the first one."""
        import ray

        rid = f"req-{next(_ids)}-{time.monotonic_ns()}"
        params = parsed.params
        spec = {"request_id": rid, "params": {
            "max_tokens": min(params.max_tokens, self.max_model_len - len(ids)), "temperature": params.temperature,
            "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed, "stop": params.stop,
            "stop_token_ids": params.stop_token_ids, "ignore_eos": params.ignore_eos}, "priority": parsed.priority}
        disagg = self.serve.mode == "disaggregated"
        decode = self.policy.pick_decode(list(self.pools["decode"].values()), len(ids))
        prefill = self.policy.pick_prefill(list(self.pools["prefill"].values()), len(ids)) if disagg else None
        if decode is None or (disagg and prefill is None):
            self.metrics.rejected.labels(self.model_name, "no_worker").inc()
            raise P.APIError(503, "no healthy worker is available", type="ServiceUnavailable",
                             headers={"Retry-After": "1"})
        m = self.metrics
        stream = None
        prefill_ref = None
        decode.inflight_requests += 1
        if prefill:
            prefill.inflight_requests += 1
            prefill.inflight_tokens += len(ids)
        first_at = last_at = None
        n_out = 0
        finished = stream_done = False
        try:
            stream = decode.handle.generate.options(num_returns="streaming").remote(
                spec if disagg else {**spec, "prompt_token_ids": ids})
            await (await stream.__anext__())  # registered on the decode worker
            router_queue = time.monotonic() - arrival  # validation, routing, opening the decode stream
            if not disagg:
                m.stage.labels(self.model_name, "router_queue").observe(router_queue)
            awaiting_decode = False
            if disagg:
                prefill_ref = prefill.handle.prefill.remote({**spec, "prompt_token_ids": ids},
                                                            decode.info["kv_address"])
                first = await prefill_ref
                prefill_ref = None
                prefill.inflight_requests -= 1
                prefill.inflight_tokens -= len(ids)
                prefill = None
                if "error" in first:
                    raise _api_error(first["error"])
                st = first.get("stages", {})
                for stage in ("prefill_queue", "prefill_compute", "kv_transfer"):
                    if stage in st:
                        m.stage.labels(self.model_name, stage).observe(st[stage])
                # the Reserve round trip to the decode worker is routing work too
                m.stage.labels(self.model_name, "router_queue").observe(router_queue + st.get("reserve", 0.0))
                first_at = last_at = time.monotonic()
                m.ttft.labels(self.model_name).observe(first_at - arrival)
                n_out = len(first["token_ids"])
                finished = first["finished"]
                awaiting_decode = not finished
                yield first
                if finished:
                    return
            async for ref in stream:
                item = await ref
                if item.get("error"):
                    raise _api_error(item["error"])
                t = time.monotonic()
                k = len(item["token_ids"])
                if first_at is None and k:
                    first_at = t
                    m.ttft.labels(self.model_name).observe(t - arrival)
                elif last_at is not None and k:
                    if awaiting_decode:  # KV committed -> the decode worker's first step
                        m.stage.labels(self.model_name, "decode_admission").observe(t - last_at)
                        awaiting_decode = False
                    for _ in range(k):
                        m.itl.labels(self.model_name).observe((t - last_at) / k)
                if k:
                    last_at = t
                n_out += k
                finished = stream_done = item["finished"]
                yield item
                if finished:
                    break
        finally:
            decode.inflight_requests -= 1
            if prefill is not None:
                prefill.inflight_requests -= 1
                prefill.inflight_tokens -= len(ids)
            if prefill_ref is not None:
                ray.cancel(prefill_ref)
            if stream is not None and not stream_done:  # client gone, an error, or done on the prefill side
                with contextlib.suppress(Exception):
                    ray.cancel(stream)
            end = time.monotonic()
            if first_at is not None:
                m.e2e.labels(self.model_name).observe(end - arrival)
                if n_out > 1:
                    m.tpot.labels(self.model_name).observe((end - first_at) / (n_out - 1))
                m.generation_tokens.labels(self.model_name).inc(n_out)
                m.prompt_tokens.labels(self.model_name).inc(len(ids))

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> str:
        import uvicorn

        s = self.serve
        await self.scale(prefill=s.prefill_workers if s.mode == "disaggregated" else 0, decode=s.decode_workers)
        self._tasks.append(asyncio.create_task(self._health_loop()))
        from router.api import build_app

        config = uvicorn.Config(build_app(self), host=s.host, port=s.port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._tasks.append(asyncio.create_task(self._server.serve()))
        while not self._server.started:
            if self._tasks[-1].done():
                self._tasks[-1].result()  # raises: the port is taken, ...
            await asyncio.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{s.host}:{port}"
        return self.url

    async def stop(self) -> None:
        if getattr(self, "_server", None):
            self._server.should_exit = True
        import ray

        for t in self._tasks:
            t.cancel()
        for pool in self.pools.values():
            for w in list(pool.values()):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.handle.shutdown.remote(), 10)
                ray.kill(w.handle)
            pool.clear()


def _api_error(err: dict) -> P.APIError:
    headers = {"Retry-After": str(max(1, math.ceil(err.get("retry_after") or 1)))} if err["status"] == 503 else {}
    return P.APIError(err["status"], err["message"], type=err.get("type", "error"), param=err.get("param"),
                      headers=headers)


class RouterActor:
    """The Ray actor (`ray.remote(RouterActor)`) that hosts `Router` and its HTTP server."""

    def __init__(self, config: PdserveConfig):
        logging.basicConfig(level=logging.INFO)
        self.router = Router(config)

    async def start(self) -> str:
        return await self.router.start()

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
        pools = self.router.pools
        return {w.worker_id: await w.handle.stats.remote() for pool in pools.values() for w in pool.values()}

    async def stop(self) -> None:
        await self.router.stop()

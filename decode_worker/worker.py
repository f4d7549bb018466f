"""The decode worker: a Ray actor around an `LLMEngine`, its engine loop and a KV receiver.

Disaggregated: the router opens `generate(spec)` (a Ray streaming generator) with
the request's sampling parameters; the worker answers "ready", a prefill worker
pushes the KV into this worker's pool (`kv_transfer`), and on commit the engine
loop adopts the blocks and decodes; each step's new tokens for the request go back
as one item. Colocated: `generate(spec)` carries the prompt and this engine
prefills it itself (chunked prefill mixed with decoding).

When the router stops reading (its client disconnected) the generator is
cancelled: the request is aborted in the engine and its reservation released, so
every block comes back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from decode_worker.engine_loop import EngineLoop
from engine.config import PdserveConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.scheduler import QueueFullError
from engine.sequence import RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class _Expected:
    params: SamplingParams
    priority: int
    sink: object


def output_item(outs: list[RequestOutput | BaseException]) -> dict:
    """Merge the outputs one request produced since the last item into one plain dict."""
    item = {"token_ids": [], "text": "", "finished": False, "finish_reason": None, "num_output_tokens": 0}
    for out in outs:
        if isinstance(out, BaseException):
            item.update(finished=True, error=error_info(out))
            break
        item["token_ids"] += out.new_token_ids
        item["text"] += out.new_text
        item["num_output_tokens"] = out.num_output_tokens
        if out.finished:
            item.update(finished=True, finish_reason=out.finish_reason.value if out.finish_reason else None)
            break
    return item


def error_info(exc: BaseException) -> dict:
    """A typed error as plain data the router maps to HTTP (4xx for the client's fault)."""
    if isinstance(exc, QueueFullError):
        return {"status": 503, "message": str(exc), "retry_after": exc.retry_after, "type": "ServiceUnavailable"}
    if isinstance(exc, InvalidRequestError):
        return {"status": 400, "message": str(exc), "param": exc.param, "type": "BadRequestError"}
    return {"status": 500, "message": f"{type(exc).__name__}: {exc}", "type": "InternalServerError"}


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside Ray
        return None


class Worker:
    """What both worker kinds share: the engine on its loop thread, stats, a metrics endpoint."""

    role = "worker"

    def __init__(self, config: PdserveConfig, worker_id: str):
        if config.engine.num_threads:
            torch.set_num_threads(config.engine.num_threads)
        if config.serve.worker_nice > 0:  # below the router (see ServeConfig.worker_nice); never above 19
            os.nice(max(0, min(config.serve.worker_nice, 19 - os.nice(0))))
        self.config = config
        self.worker_id = worker_id
        self.engine = LLMEngine(config)
        self.loop = EngineLoop(self.engine, name=f"{self.role}-loop").start()
        self.started = time.monotonic()
        self.model_name = config.serve.served_model_name or self.engine.source.model_id
        self.metrics_url = self._serve_metrics()

    def _serve_metrics(self) -> str:
        """This worker's own /metrics (engine gauges, KV-transfer series), listed by the router's http_sd."""
        from prometheus_client import REGISTRY, start_http_server

        from router.metrics import EngineCollector, WorkerMetrics

        prefix = self.config.serve.metrics_prefix
        REGISTRY.register(EngineCollector(prefix, self.model_name, self.role, self.worker_id, self.engine))
        self.metrics = WorkerMetrics(prefix, self.model_name, self.role, self.worker_id)
        from kv_transfer.protocol import advertised_host, host_port

        host = self.config.serve.host
        server, _ = start_http_server(0, addr=host)
        self._metrics_server = server
        return host_port(advertised_host(host), server.server_port)  # what Prometheus dials

    def ping(self) -> str:
        return self.worker_id

    def stats(self) -> dict:
        """Cheap, thread-safe enough snapshot for routing and health (read without locks)."""
        e = self.engine
        bm = e.block_manager
        busy = self.loop.has_work
        return {"worker_id": self.worker_id, "role": self.role, "alive": self.loop.alive,
                "step_age_s": time.monotonic() - self.loop.last_step_time, "busy": busy,
                # since the loop last stepped or a forward pass last finished a layer (a heartbeat)
                "progress_age_s": time.monotonic() - max(self.loop.last_step_time, e.last_progress),
                "num_running": len(e.running), "num_waiting": len(e.waiting),
                "waiting_tokens": sum(len(s.prompt_token_ids) for s in list(e.waiting)),
                "free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
                "max_num_seqs": e.config.scheduler.max_num_seqs, "num_preemptions": e.num_preemptions}

    def abort_all(self) -> int:
        """Abort every request this worker holds (a restarted router adopting it: the requests'
        clients went with the old router). Returns how many were aborted."""
        rids = self._engine_request_ids()
        for rid in rids:
            self.loop.abort(rid)
        return len(rids)

    def _engine_request_ids(self) -> list[str]:
        while True:  # the loop thread may add or drop one meanwhile
            try:
                return list(self.engine.seqs)
            except RuntimeError:
                continue

    def debug_stall(self, seconds: float) -> None:
        """Chaos: freeze this worker's engine loop for `seconds` (see `EngineLoop.stall`)."""
        self.loop.stall(seconds)

    def shutdown(self) -> None:
        self.loop.stop()
        self._metrics_server.shutdown()


class DecodeWorker(Worker):
    role = "decode"

    def __init__(self, config: PdserveConfig, worker_id: str):
        super().__init__(config, worker_id)
        self._expected: dict[str, _Expected] = {}
        self._lock = threading.Lock()
        self.receiver = None
        if config.serve.mode == "disaggregated":
            from kv_transfer import KVPool, KVReceiver

            self.receiver = KVReceiver(KVPool.from_engine(self.engine), config.kv_transfer, self._on_commit,
                                       worker_id=worker_id).start()

    def info(self) -> dict:
        return {"worker_id": self.worker_id, "kv_address": self.receiver.address if self.receiver else None,
                "num_blocks": self.engine.block_manager.num_blocks, "metrics": self.metrics_url,
                "node_id": _node_id()}

    async def generate(self, spec: dict):
        """Stream the request's outputs: first {"ready": True}, then one dict per engine step with
        new tokens (see `output_item`), the last one `finished`."""
        rid = spec["request_id"]
        params = SamplingParams(**spec["params"])
        priority = spec.get("priority", 0)
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(out):
            aio.call_soon_threadsafe(queue.put_nowait, out)

        if spec.get("prompt_token_ids") is not None:  # colocated: this engine prefills
            self.loop.submit(rid, spec["prompt_token_ids"], params, sink, priority=priority,
                             output_token_ids=spec.get("output_token_ids"), ttft_deadline=spec.get("ttft_deadline"))
        else:
            with self._lock:
                self._expected[rid] = _Expected(params, priority, sink)
        finished = False
        t_first = None
        try:
            yield {"ready": True}
            while not finished:
                outs = [await queue.get()]
                while not queue.empty():
                    outs.append(queue.get_nowait())
                item = output_item(outs)
                finished = item["finished"]
                if t_first is None and item["token_ids"]:
                    t_first = time.monotonic()
                    qt = next((o.queue_time for o in outs if isinstance(o, RequestOutput) and o.queue_time), None)
                    if qt is not None:
                        self.metrics.queue.observe(qt)
                if finished and t_first is not None:
                    self.metrics.decode.observe(time.monotonic() - t_first)
                yield item
        finally:
            if not finished:  # the router stopped reading: abort everywhere on this side
                self.abort(rid)

    def abort_all(self) -> int:
        with self._lock:
            expected = list(self._expected)
        rids = set(expected) | set(self._engine_request_ids())
        for rid in rids:
            self.abort(rid)
        return len(rids)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._expected.pop(request_id, None)
        self.loop.abort(request_id)
        if self.receiver is not None:
            self.receiver.release(request_id, "aborted")

    def _on_commit(self, received) -> None:
        """On the receiver's thread: the KV is in our pool; hand it to the engine loop."""
        with self._lock:
            exp = self._expected.pop(received.request_id, None)
        if exp is None:
            raise RuntimeError(f"no decode request is waiting for {received.request_id!r} (aborted?)")
        self.loop.submit_received(received.request_id, received, exp.params, exp.sink, priority=exp.priority)

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
        super().shutdown()

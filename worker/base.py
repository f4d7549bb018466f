"""The part of a worker actor both kinds share: the engine on its loop thread, health and load
stats, a metrics endpoint, abort and shutdown.

Threads in a worker process: the actor's event loop (Ray calls: `start`, `subscribe`,
`prefill`, `stats`, ...), the engine loop thread (`EngineLoop`: the only one that touches the
engine), and the KV plane's own loop thread (`KVSender` or `KVReceiver`). Nothing
on the actor's event loop waits on the other two: it posts to them and awaits futures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import torch

from pdserve.engine.config import FaultConfig, PdserveConfig
from pdserve.engine.llm_engine import LLMEngine, pick_device
from pdserve.engine.messages import WorkerInfo, WorkerStats
from pdserve.engine.sampling import SamplingParams
from pdserve.worker.core_share import CoreShare, board_path
from pdserve.worker.engine_loop import EngineLoop

logger = logging.getLogger(__name__)


def node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside Ray
        return None


def _core_share(config: PdserveConfig, tp: int) -> CoreShare | None:
    """This worker's place on its machine's core board (`serve.share_idle_cores`): CPU, one rank, in Ray."""
    if not config.serve.share_idle_cores or tp > 1 or pick_device(config.model.device).type != "cpu":
        return None
    try:
        import ray

        cluster = ray.get_runtime_context().gcs_address
    except Exception:  # not inside Ray: no deployment to share with
        return None
    try:
        return CoreShare(board_path(cluster), config.engine.num_threads or torch.get_num_threads())
    except (OSError, RuntimeError) as e:
        logger.warning("not sharing cores with this machine's other workers: %s", e)
        return None


class Worker:
    """What both worker kinds share: the engine on its loop thread, stats, a metrics endpoint."""

    role = "worker"

    def __init__(self, config: PdserveConfig, worker_id: str, owner=None):
        if config.engine.num_threads:
            torch.set_num_threads(config.engine.num_threads)
        if config.serve.worker_nice > 0:  # below the router (see ServeConfig.worker_nice); never above 19
            os.nice(max(0, min(config.serve.worker_nice, 19 - os.nice(0))))
        self.config = config
        self.worker_id = worker_id
        self._owner = owner  # the router actor that started this (detached) worker, if any
        self.tp_ranks = None  # tensor parallelism: this worker is rank 0, the others are actors (`worker.tp`)
        tp = config.parallel.tp_for(self.role)
        if tp > 1:
            from pdserve.engine.model_source import resolve_model
            from pdserve.worker.tp import TPRanks

            # resolved once (a GGUF converted once), before the ranks read it
            source = resolve_model(config.model.model, Path(config.model.cache_dir))
            self.tp_ranks = TPRanks.start(config, source.path, tp, pick_device(config.model.device))

            def build() -> LLMEngine:
                return LLMEngine(config, source=source, tp=self.tp_ranks.group)
        else:
            def build() -> LLMEngine:
                return LLMEngine(config)
        s = config.serve
        self.cores = _core_share(config, tp)
        # the engine is built on the loop thread that steps it: one OpenMP team (see `worker.engine_loop`)
        self.loop = EngineLoop(build, name=f"{self.role}-loop", max_step_errors=s.max_step_errors,
                               step_error_window_s=s.step_error_window_s, faults=config.faults,
                               cores=self.cores).start()
        self.engine = self.loop.engine
        self.started = time.monotonic()
        self.model_name = config.serve.served_model_name or self.engine.source.model_id
        self.metrics_url = self._serve_metrics()

    def _serve_metrics(self) -> str:
        """This worker's own /metrics (engine gauges, KV-transfer series), listed by the router's http_sd."""
        from prometheus_client import REGISTRY, start_http_server

        from pdserve.kv_transfer.protocol import advertised_host, host_port
        from pdserve.worker.metrics import EngineCollector, WorkerMetrics

        prefix = self.config.serve.metrics_prefix
        REGISTRY.register(EngineCollector(prefix, self.model_name, self.role, self.worker_id, self.engine))
        self.metrics = WorkerMetrics(prefix, self.model_name, self.role, self.worker_id)
        host = self.config.serve.host
        server, _ = start_http_server(0, addr=host)
        self._metrics_server = server
        return host_port(advertised_host(host), server.server_port)  # what Prometheus dials

    def info(self) -> WorkerInfo:
        e = self.engine
        return WorkerInfo(self.worker_id, self.role, self.metrics_url, node_id(), num_blocks=e.block_manager.num_blocks,
                          dtype=str(e.dtype).removeprefix("torch."),
                          attention=e.attention.name,
                          core_board=None if self.cores is None else self.cores.path.name)

    def tp_rank_handles(self) -> list:
        """The actors of this worker's other tensor-parallel ranks (chaos and tests reach them through it)."""
        return list(self.tp_ranks.actors) if self.tp_ranks is not None else []

    def ping(self) -> str:
        return self.worker_id

    def owner(self):
        """The handle of the router actor that started this worker (None if unknown): a router starting up
        asks it whether it still lives, and ends the workers of a router that died (`WorkerPools`)."""
        return self._owner

    def stats(self) -> WorkerStats:
        """Cheap, thread-safe enough snapshot for routing and health (read without locks)."""
        e = self.engine
        bm = e.block_manager
        now = time.monotonic()
        num_running = len(e.running)
        cost = e.step_cost
        measured = cost.num_observed > 0  # until then its figures are the default model's, not this machine's
        return WorkerStats(
            worker_id=self.worker_id, role=self.role, alive=self.loop.alive, busy=self.loop.has_work,
            failing=self.loop.failing or (self.tp_ranks is not None and self.tp_ranks.failed),
            step_errors=self.loop.recent_step_errors,
            step_age_s=now - self.loop.last_step_time,
            # since the loop last stepped or a forward pass last finished a layer (a heartbeat)
            progress_age_s=now - max(self.loop.last_step_time, e.last_progress),
            num_running=num_running, num_waiting=len(e.waiting),
            waiting_tokens=sum(len(s.prompt_token_ids) for s in list(e.waiting)),
            free_blocks=bm.num_free_blocks, num_blocks=bm.num_blocks,
            max_num_seqs=e.config.scheduler.max_num_seqs, num_preemptions=e.num_preemptions,
            num_cached_blocks=bm.num_cached_blocks, prefix_cache_queries=e.scheduler.prefix_cache_queries,
            prefix_cache_hits=e.scheduler.prefix_cache_hits,
            # a prompt token's share of a large prefill step (the step's fixed overhead left out)
            prefill_s_per_token=(cost(512, 0) - cost(0, 0)) / 512 if measured else 0.0,
            decode_step_s=cost(0, max(1, num_running)) if measured else 0.0)

    def abort_prefix(self, prefix: str) -> int:
        """Abort every request whose id starts with `prefix`: a restarted router replica's (each names its
        requests after itself), whose clients went with its previous incarnation. Returns how many."""
        rids = [rid for rid in self._engine_request_ids() if rid.startswith(prefix)]
        for rid in rids:
            self.abort(rid)
        return len(rids)

    def abort_all(self) -> int:
        """Abort every request this worker holds (a restarted router adopting it: the requests'
        clients went with the old router). Returns how many were aborted."""
        rids = self._engine_request_ids()
        for rid in rids:
            self.abort(rid)
        return len(rids)

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    async def precompile(self, params: SamplingParams) -> None:
        """A structured request's grammar, compiled on an executor thread before the request reaches the
        engine loop (which then finds it in the engine's cache: a compile never stalls a step). Raises
        `InvalidGrammarError` for a spec that does not compile."""
        if params.structured is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.grammars.compile, params.structured)

    def _engine_request_ids(self) -> list[str]:
        while True:  # the loop thread may add or drop one meanwhile
            try:
                return list(self.engine.seqs)
            except RuntimeError:
                continue

    def set_faults(self, faults: FaultConfig | None) -> None:
        """Chaos: change this worker's fault injection at run time (its engine loop's step faults)."""
        self.loop.faults = faults

    def debug_stall(self, seconds: float) -> None:
        """Chaos: freeze this worker's engine loop for `seconds` (see `EngineLoop.stall`)."""
        self.loop.stall(seconds)

    def shutdown(self) -> None:
        self.loop.stop()
        if self.cores is not None:
            self.cores.close()
        if self.tp_ranks is not None:
            self.engine.shutdown()
        self._metrics_server.shutdown()

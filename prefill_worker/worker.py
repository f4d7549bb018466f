"""The prefill worker: a Ray actor that prefills prompts and ships their KV.

A request's life here (the numbers are the hops of docs/architecture.md):

  4. `prefill(GenerateRequest, KVReservation)` arrives on the actor's event loop with the room a
     decode worker already reserved for the KV. The prompt joins this worker's engine queue at
     once, as a prefill-only request (the scheduler batches queued prompts by priority under
     the token budget, ragged, no padding), and a push into the reservation opens on the KV
     sender's own loop thread.
  5. As the prefill completes, the engine loop thread streams the KV out layer by layer
     (`LayerStream`); the first token is sampled.
  6. Once the decode side has acknowledged the KV, the answer is `FirstToken` (with the stage
     timings). A request that finishes on its first token (EOS, a stop, max_tokens=1) is
     answered finished and its reservation released; a failure is a `WorkerError` (retryable
     when another prefill/decode pair may well succeed).
  If the caller cancels (the client went away), the request leaves the queue or the batch and
  the transfer is cancelled on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from pdserve.engine.config import FaultConfig, PdserveConfig
from pdserve.engine.messages import (
    FirstToken,
    GenerateRequest,
    KVReservation,
    StageTimings,
    WorkerError,
    freeze_logprobs,
)
from pdserve.engine.sequence import FinishReason
from pdserve.kv_transfer.client import KVSender
from pdserve.kv_transfer.errors import KVTransferError
from pdserve.kv_transfer.pool import KVPool
from pdserve.kv_transfer.ranks import RankKeys
from pdserve.kv_transfer.source import LayerStream
from pdserve.worker.base import Worker


class PrefillWorker(Worker):
    role = "prefill"

    def __init__(self, config: PdserveConfig, worker_id: str, owner=None):
        super().__init__(config, worker_id, owner)
        pool = KVPool.from_engine(self.engine)
        # with per-rank KV channels, each rank sends the heads it staged itself (`kv_transfer.ranks`)
        ranks = RankKeys(self.engine.kv, config.kv_transfer.channel_timeout_s) if self.engine.per_rank_kv else None
        self.sender = KVSender(config.kv_transfer, pool.fingerprint, worker_id=worker_id, device=self.engine.device,
                               faults=config.faults, layout=pool.layout, ranks=ranks)

    async def prefill(self, request: GenerateRequest, reservation: KVReservation) -> FirstToken | WorkerError:
        rid = request.request_id
        aio = asyncio.get_running_loop()
        try:
            await self.precompile(request.params)
        except Exception as e:  # the router checks specs first: only a spec it let through that fails here
            return WorkerError.of(e)
        # the decode worker's prefix cache may hold the first blocks already: only the rest travels
        stream = LayerStream(rid, request.num_kv_tokens, reservation.num_cached_tokens)
        push = asyncio.wrap_future(self.sender.push(reservation.address, stream))
        first: asyncio.Future = aio.create_future()
        t0 = time.perf_counter()

        def sink(out):
            aio.call_soon_threadsafe(lambda: first.done() or first.set_result(out))

        self.loop.submit(rid, list(request.prompt_token_ids), request.params, sink, priority=request.priority,
                         kv_sink=stream, output_token_ids=list(request.output_token_ids),
                         ttft_deadline=request.ttft_deadline)
        try:
            out = await first
            t_prefilled = time.perf_counter()
            if isinstance(out, BaseException):
                stream.fail(out)
                with contextlib.suppress(Exception):
                    await push
                return WorkerError.of(out)
            if out.finish_reason is not FinishReason.PREFILLED:  # done on its first token: nothing to hand over
                with contextlib.suppress(Exception):
                    await push
                return FirstToken(tuple(out.new_token_ids), out.new_text, True, out.finish_reason.value,
                                  logprobs=freeze_logprobs(out.logprobs),
                                  prompt_logprobs=freeze_logprobs(out.prompt_logprobs))
            try:
                transfer = await push
            except KVTransferError as e:  # another prefill/decode pair may well succeed: the router retries
                return WorkerError.of(e, "KV transfer failed")
            queue = out.queue_time or 0.0
            compute = max(0.0, t_prefilled - t0 - queue)
            self.metrics.queue.observe(queue)
            self.metrics.prefill.observe(compute)
            stages = StageTimings(queue, compute, time.perf_counter() - t_prefilled, transfer.bytes)
            return FirstToken(tuple(out.new_token_ids), out.new_text, stages=stages,
                              logprobs=freeze_logprobs(out.logprobs),
                              prompt_logprobs=freeze_logprobs(out.prompt_logprobs))
        except asyncio.CancelledError:  # the router gave the request up
            self.abort(rid)
            with contextlib.suppress(Exception):
                await aio.run_in_executor(None, self.sender.release, reservation.address, rid, "aborted")
            raise

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)
        self.sender.cancel(request_id, "aborted")

    async def forget_peer(self, address: str) -> None:
        """A decode worker left the pool: cancel pushes to it, close the connection and channel (on an
        executor thread: it waits for the cancelled pushes, and the actor's event loop must not)."""
        await asyncio.get_running_loop().run_in_executor(None, self.sender.forget, address)

    def set_faults(self, faults: FaultConfig | None) -> None:
        """Chaos: change the fault injection of this worker's engine loop and KV sender at run time."""
        super().set_faults(faults)
        self.sender.faults = faults

    def shutdown(self) -> None:
        self.sender.close()
        super().shutdown()

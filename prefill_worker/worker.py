"""The prefill worker: a Ray actor that prefills prompts and ships their KV.

`prefill(spec, decode_address)`: reserve room on the chosen decode worker (over the
KV plane), queue the prompt in this worker's engine as a prefill-only request
(the scheduler batches queued prompts by priority under the token budget, ragged,
no padding), stream its KV to the decode worker layer by layer as the prefill
completes, and return the first token once the decode side has acknowledged the
KV. A request that finishes on its first token (EOS, a stop, max_tokens=1) is
returned finished and its reservation released. If the caller cancels (the client
went away), the request leaves the queue or the batch and the transfer is
cancelled on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from decode_worker.worker import Worker, _node_id, error_info
from engine.config import PdserveConfig
from engine.sampling import SamplingParams
from engine.sequence import FinishReason


class PrefillWorker(Worker):
    role = "prefill"

    def __init__(self, config: PdserveConfig, worker_id: str):
        super().__init__(config, worker_id)
        from kv_transfer import KVPool, KVSender

        self.sender = KVSender(config.kv_transfer, KVPool.from_engine(self.engine).fingerprint, worker_id=worker_id,
                               device=self.engine.device, faults=config.faults)

    def info(self) -> dict:
        return {"worker_id": self.worker_id, "metrics": self.metrics_url, "node_id": _node_id()}

    async def prefill(self, spec: dict, decode_address: str) -> dict:
        from kv_transfer import KVTransferError, LayerStream

        rid = spec["request_id"]
        ids = spec["prompt_token_ids"]
        resumed = spec.get("output_token_ids") or []  # a migrated request: tokens already streamed
        num_kv = len(ids) + len(resumed)
        params = SamplingParams(**spec["params"])
        aio = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            await self._reserve(decode_address, rid, num_kv)
        except KVTransferError as e:  # full for reserve_wait_s, or gone: another decode worker may have room
            from kv_transfer import ReservationTooLarge

            return {"error": {"status": 503, "message": f"decode worker refused the KV: {e}",
                              "type": "ServiceUnavailable", "retry_after": 1,
                              "retryable": not isinstance(e, ReservationTooLarge)}}
        t_reserved = time.perf_counter()
        stream = LayerStream(rid, num_kv)
        push = asyncio.wrap_future(self.sender.push(decode_address, stream))
        first: asyncio.Future = aio.create_future()

        def sink(out):
            aio.call_soon_threadsafe(lambda: first.done() or first.set_result(out))

        self.loop.submit(rid, ids, params, sink, priority=spec.get("priority", 0), kv_sink=stream,
                         output_token_ids=resumed, ttft_deadline=spec.get("ttft_deadline"))
        try:
            out = await first
            t_prefilled = time.perf_counter()
            if isinstance(out, BaseException):
                stream.fail(out)
                with contextlib.suppress(Exception):
                    await push
                return {"error": error_info(out)}
            result = {"token_ids": out.new_token_ids, "text": out.new_text, "num_prompt_tokens": len(ids),
                      "finish_reason": None, "finished": False}
            if out.finish_reason is not FinishReason.PREFILLED:  # done on its first token: nothing to hand over
                with contextlib.suppress(Exception):
                    await push
                result.update(finished=True, finish_reason=out.finish_reason.value)
                return result
            try:
                transfer = await push
            except KVTransferError as e:  # another prefill/decode pair may well succeed: the router retries
                return {"error": {"status": 503, "message": f"KV transfer failed: {e}", "type": "ServiceUnavailable",
                                  "retry_after": 1, "retryable": True}}
            queue = out.queue_time or 0.0
            compute = max(0.0, t_prefilled - t_reserved - queue)
            self.metrics.queue.observe(queue)
            self.metrics.prefill.observe(compute)
            result["stages"] = {"reserve": t_reserved - t0, "prefill_queue": queue, "prefill_compute": compute,
                                "kv_transfer": time.perf_counter() - t_prefilled, "transfer_bytes": transfer.bytes}
            return result
        except asyncio.CancelledError:  # the router gave the request up
            self.loop.abort(rid)
            self.sender.cancel(rid)
            with contextlib.suppress(Exception):
                await aio.run_in_executor(None, self.sender.release, decode_address, rid, "aborted")
            raise

    async def _reserve(self, address: str, rid: str, num_tokens: int) -> None:
        """Reserve room on the decode worker; while its pool is full, wait (back-pressure) up to
        `reserve_wait_s` before giving up."""
        from kv_transfer import ReservationRefused, ReservationTooLarge

        aio = asyncio.get_running_loop()
        deadline = time.monotonic() + self.config.kv_transfer.reserve_wait_s
        delay = 0.005
        while True:
            try:
                await aio.run_in_executor(None, self.sender.reserve, address, rid, num_tokens)
                return
            except ReservationRefused as e:
                if isinstance(e, ReservationTooLarge) or time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)  # blocks free as running requests finish
                delay = min(delay * 2, 0.1)

    def abort_all(self) -> int:
        rids = self._engine_request_ids()
        for rid in rids:
            self.loop.abort(rid)
            self.sender.cancel(rid, "aborted")
        return len(rids)

    def set_faults(self, faults: dict) -> None:
        """Chaos: change the transfer fault injection of this worker's sender at run time
        (`FaultConfig` fields)."""
        from engine.config import FaultConfig

        self.sender.faults = FaultConfig(**faults)

    def shutdown(self) -> None:
        self.sender.close()
        super().shutdown()

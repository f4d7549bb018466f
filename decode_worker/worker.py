"""The decode worker: a Ray actor around an `LLMEngine`, its engine loop and a KV receiver.

A request's life here (the numbers are the hops of docs/architecture.md):

  3. `generate(GenerateRequest)` opens (a Ray streaming generator, on the actor's event loop).
     Disaggregated: the request is registered and room for its KV is reserved in this
     worker's pool at once (waiting up to `reserve_wait_s` while the pool is full), and the
     first item is `Ready(KVReservation)`, which the router hands to a prefill worker.
     Colocated: the prompt goes straight into this engine (it prefills itself) and the first
     item is `Ready()`.
  5. The prefill worker pushes the KV into the reserved blocks (`kv_transfer`, on the
     receiver's own loop thread); on commit `_on_commit` hands the blocks and the request
     to the engine loop thread (`EngineLoop.submit_received`).
  6. Each engine step's new tokens come back on the loop thread through the request's sink,
     are merged per request (`output_item`) and yielded as `StepItem`s; the last one is
     `finished` or carries a `WorkerError`.
  7. When the router stops reading (its client went away, or it gave the attempt up) the
     generator is closed: the request is aborted in the engine and its reservation released,
     neither of which waits on the actor's event loop, so every block comes back and no other
     stream on this worker stalls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass

from pdserve.engine.block_manager import block_hashes
from pdserve.engine.config import PdserveConfig
from pdserve.engine.messages import GenerateRequest, KVReservation, Ready, StepItem, WorkerError, WorkerInfo
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import RequestOutput
from pdserve.worker.base import Worker


@dataclass
class _Expected:
    params: SamplingParams
    priority: int
    sink: object


def output_item(outs: list[RequestOutput | BaseException]) -> StepItem:
    """Merge the outputs one request produced since the last item into one `StepItem`."""
    token_ids: list[int] = []
    text, n = "", 0
    for out in outs:
        if isinstance(out, BaseException):
            return StepItem(tuple(token_ids), text, True, None, n, WorkerError.of(out))
        token_ids += out.new_token_ids
        text += out.new_text
        n = out.num_output_tokens
        if out.finished:
            return StepItem(tuple(token_ids), text, True, out.finish_reason.value if out.finish_reason else None, n)
    return StepItem(tuple(token_ids), text, False, None, n)


class DecodeWorker(Worker):
    role = "decode"

    def __init__(self, config: PdserveConfig, worker_id: str, owner=None):
        super().__init__(config, worker_id, owner)
        self._expected: dict[str, _Expected] = {}
        self._lock = threading.Lock()
        self.receiver = None
        if config.serve.mode == "disaggregated":
            from pdserve.kv_transfer.pool import KVPool
            from pdserve.kv_transfer.server import KVReceiver

            self.receiver = KVReceiver(KVPool.from_engine(self.engine), config.kv_transfer, self._on_commit,
                                       worker_id=worker_id).start()

    def info(self) -> WorkerInfo:
        info = super().info()
        return info if self.receiver is None else dataclasses.replace(info, kv_address=self.receiver.address)

    async def generate(self, request: GenerateRequest):
        """Stream the request: `Ready` first (or a `StepItem` with the error that refused it), then one
        `StepItem` per engine step with new tokens, the last one `finished`."""
        rid = request.request_id
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(out):
            aio.call_soon_threadsafe(queue.put_nowait, out)

        finished = False
        try:
            if not request.remote_prefill:  # colocated: this engine prefills
                self.loop.submit(rid, list(request.prompt_token_ids), request.params, sink,
                                 priority=request.priority, output_token_ids=list(request.output_token_ids),
                                 ttft_deadline=request.ttft_deadline)
                yield Ready()
            else:
                if self.receiver is None:
                    raise ValueError("a remote prefill needs a KV receiver: this decode worker runs colocated")
                with self._lock:
                    self._expected[rid] = _Expected(request.params, request.priority, sink)
                try:
                    reservation = await self._reserve(rid, request.num_kv_tokens, self._prefix(request))
                except Exception as e:  # no room within reserve_wait_s, or never: another decode worker may have
                    finished = True
                    self.abort(rid)
                    yield StepItem(finished=True, error=WorkerError.of(e, "the decode worker could not reserve "
                                                                          "room for the KV"))
                    return
                yield Ready(reservation)
            async for item in self._relay(queue):
                finished = item.finished
                yield item
        finally:
            if not finished:  # the router stopped reading: abort everywhere on this side
                self.abort(rid)

    async def _relay(self, queue: asyncio.Queue):
        t_first = None
        while True:
            outs = [await queue.get()]
            while not queue.empty():
                outs.append(queue.get_nowait())
            item = output_item(outs)
            if t_first is None and item.token_ids:
                t_first = time.monotonic()
                qt = next((o.queue_time for o in outs if isinstance(o, RequestOutput) and o.queue_time), None)
                if qt is not None:
                    self.metrics.queue.observe(qt)
            if item.finished and t_first is not None:
                self.metrics.decode.observe(time.monotonic() - t_first)
            yield item
            if item.finished:
                return

    async def _reserve(self, rid: str, num_tokens: int, prefix: list[bytes]) -> KVReservation:
        """Reserve room for the request's KV (what this worker's prefix cache holds of it is taken from
        there, so it does not travel); while the pool is full, wait (back-pressure) up to
        `reserve_wait_s` for running requests to finish before giving up."""
        from pdserve.kv_transfer.errors import ReservationRefused, ReservationTooLarge

        t0 = time.monotonic()
        deadline = t0 + self.config.kv_transfer.reserve_wait_s
        delay = 0.005
        while True:
            try:
                r = await asyncio.wrap_future(self.receiver.reserve_future(rid, num_tokens, prefix=prefix))
                if prefix:
                    self.engine.count_prefix_lookup(num_tokens, r.num_cached_tokens)
                return KVReservation(rid, self.receiver.address, r.num_blocks, r.lease_s, time.monotonic() - t0,
                                     r.num_cached_tokens)
            except ReservationRefused as e:
                if isinstance(e, ReservationTooLarge) or time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)  # blocks free as running requests finish
                delay = min(delay * 2, 0.1)

    def _prefix(self, request: GenerateRequest) -> list[bytes]:
        """The names of the full blocks of the KV the request brings (none when prefix caching is off)."""
        if not self.engine.block_manager.enable_caching:
            return []
        return block_hashes(request.prompt_token_ids + request.output_token_ids, self.engine.block_manager.block_size)

    def abort_all(self) -> int:
        with self._lock:
            expected = list(self._expected)
        rids = set(expected) | set(self._engine_request_ids())
        for rid in rids:
            self.abort(rid)
        return len(rids)

    def abort(self, request_id: str) -> None:
        """Abort from any side; posts to the engine loop and the receiver, waits for neither."""
        with self._lock:
            self._expected.pop(request_id, None)
        self.loop.abort(request_id)
        if self.receiver is not None:
            self.receiver.release_soon(request_id, "aborted")

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

"""The decode worker: a Ray actor around an `LLMEngine`, its engine loop and a KV receiver.

A request's life here (the numbers are the hops of docs/architecture.md):

  0. A router opens `subscribe(subscriber)` once (a Ray streaming generator, on the actor's event
     loop): every token this worker produces for that router's requests travels on it, coalesced
     into one `StepBatch` per engine step. One message per step instead of one per token of every
     stream is what keeps the relay cheap: each Ray message costs the router (and, through the
     cores they share, the engine) more than the token it carries.
  3. `start(GenerateRequest, subscriber)` registers the request. Disaggregated: room for its KV is
     reserved in this worker's pool at once (waiting up to `reserve_wait_s` while the pool is full),
     and the answer is `Ready(KVReservation)`, which the router hands to a prefill worker.
     Colocated: the prompt goes straight into this engine (it prefills itself) and the answer is
     `Ready()`.
  5. The prefill worker pushes the KV into the reserved blocks (`kv_transfer`, on the
     receiver's own loop thread); on commit `_on_commit` hands the blocks and the request
     to the engine loop thread (`EngineLoop.submit_received`).
  6. Each engine step's new tokens come back on the loop thread through the request's sink into its
     subscription's buffer; after the step (`EngineLoop.on_round_end`) the actor's event loop is woken
     once, merges them per request (`output_item`) and yields one `StepBatch`; a request's last item
     is `finished` or carries a `WorkerError`.
  7. When the router gives a request up (its client went away, or it moved the request elsewhere)
     it calls `abort`: the request is aborted in the engine and its reservation released, neither
     of which waits on the actor's event loop, so every block comes back and no other stream on this
     worker stalls. When a subscription closes (its router went away) its requests are aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pdserve.engine.block_manager import block_hashes
from pdserve.engine.config import PdserveConfig
from pdserve.engine.messages import (
    GenerateRequest,
    KVReservation,
    Ready,
    StepBatch,
    StepItem,
    TokenLogprob,
    WorkerError,
    WorkerInfo,
    freeze_logprobs,
)
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
    logprobs: list[TokenLogprob] | None = None
    prompt = None
    text, n = "", 0
    for out in outs:
        if isinstance(out, BaseException):
            return StepItem(tuple(token_ids), text, True, None, n, WorkerError.of(out), freeze_logprobs(logprobs),
                            freeze_logprobs(prompt))
        prompt = prompt or out.prompt_logprobs
        token_ids += out.new_token_ids
        if out.logprobs is not None:
            logprobs = (logprobs or []) + out.logprobs
        text += out.new_text
        n = out.num_output_tokens
        if out.finished:
            return StepItem(tuple(token_ids), text, True, out.finish_reason.value if out.finish_reason else None, n,
                            logprobs=freeze_logprobs(logprobs), prompt_logprobs=freeze_logprobs(prompt))
    return StepItem(tuple(token_ids), text, False, None, n, logprobs=freeze_logprobs(logprobs),
                    prompt_logprobs=freeze_logprobs(prompt))


class _Subscription:
    """One subscriber's requests on this worker: their sinks buffer what the engine loop thread hands
    them, and at the end of the loop's round (`flush`) the actor's event loop is woken once and takes the
    whole buffer as one `StepBatch`. So the event loop wakes, and the router gets a message, once per
    engine step however many streams that step advanced (fewer when the router reads slower)."""

    def __init__(self, aio: asyncio.AbstractEventLoop):
        self._aio = aio
        self._lock = threading.Lock()
        self._pending: dict[str, list[RequestOutput | BaseException]] = {}
        self._woken = False
        self._wake = asyncio.Event()
        self._requests: set[str] = set()  # registered and not yet finished
        self._first_token_at: dict[str, float] = {}  # for the decode-time histogram
        self._closed = False

    def sink(self, rid: str):
        """The engine's sink for request `rid` (called on the engine loop thread)."""
        with self._lock:
            self._requests.add(rid)

        def put(out: RequestOutput | BaseException) -> None:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the subscriber is gone")
                self._pending.setdefault(rid, []).append(out)

        return put

    def flush(self) -> None:
        """Send what the sinks buffered (on the engine loop thread, after each round): wakes the event loop
        once for the whole round, however many requests it advanced."""
        with self._lock:
            if not self._pending or self._woken or self._closed:
                return
            self._woken = True
        self._aio.call_soon_threadsafe(self._wake.set)

    def drop(self, rid: str) -> None:
        with self._lock:
            self._requests.discard(rid)
            self._pending.pop(rid, None)

    def close(self) -> list[str]:
        """Stop taking outputs; the requests still registered (to abort)."""
        with self._lock:
            self._closed = True
            rids, self._requests = list(self._requests), set()
            self._pending.clear()
        with contextlib.suppress(RuntimeError):  # its event loop is already gone
            self._aio.call_soon_threadsafe(self._wake.set)  # `batches` ends
        return rids

    async def batches(self, metrics) -> AsyncIterator[StepBatch]:
        while True:
            await self._wake.wait()
            self._wake.clear()
            with self._lock:
                if self._closed:
                    return
                pending, self._pending = self._pending, {}
                self._woken = False
            items = []
            now = time.monotonic()
            for rid, outs in pending.items():
                item = output_item(outs)
                if rid not in self._first_token_at and item.token_ids:
                    self._first_token_at[rid] = now
                    qt = next((o.queue_time for o in outs if isinstance(o, RequestOutput) and o.queue_time), None)
                    if qt is not None:
                        metrics.queue.observe(qt)
                if item.finished:
                    t_first = self._first_token_at.pop(rid, None)
                    if t_first is not None:
                        metrics.decode.observe(now - t_first)
                    with self._lock:
                        self._requests.discard(rid)
                items.append((rid, item))
            if items:
                yield StepBatch(tuple(items))


class DecodeWorker(Worker):
    role = "decode"

    def __init__(self, config: PdserveConfig, worker_id: str, owner=None):
        super().__init__(config, worker_id, owner)
        self._expected: dict[str, _Expected] = {}
        self._subscriptions: dict[str, _Subscription] = {}
        self._lock = threading.Lock()
        self.loop.on_round_end = self._flush
        self.receiver = None
        if config.serve.mode == "disaggregated":
            from pdserve.kv_transfer.pool import KVPool
            from pdserve.kv_transfer.server import KVReceiver

            self.receiver = KVReceiver(KVPool.from_engine(self.engine), config.kv_transfer, self._on_commit,
                                       worker_id=worker_id).start()

    def info(self) -> WorkerInfo:
        info = super().info()
        return info if self.receiver is None else dataclasses.replace(info, kv_address=self.receiver.address)

    async def subscribe(self, subscriber: str) -> AsyncIterator[StepBatch]:
        """`subscriber`'s stream (a router's, opened once): a `StepBatch` whenever the engine produced
        something for its requests. Runs until the subscriber goes away; its requests are aborted then."""
        sub = self._subscription(subscriber)
        try:
            async for batch in sub.batches(self.metrics):
                yield batch
        finally:
            with self._lock:
                if self._subscriptions.get(subscriber) is sub:
                    del self._subscriptions[subscriber]
            for rid in sub.close():
                self.abort(rid)

    async def start(self, request: GenerateRequest, subscriber: str) -> Ready | StepItem:
        """Register the request for `subscriber`: `Ready` (with the KV reservation when a prefill worker
        pushes its KV), or a finished `StepItem` with the error that refused it. Its tokens follow on the
        subscriber's stream. A call cancelled before it answers (the router gave up) aborts the request."""
        rid = request.request_id
        try:
            await self.precompile(request.params)  # the grammar the prefill or the KV hand-over will need
        except Exception as e:
            return StepItem(finished=True, error=WorkerError.of(e))
        sub = self._subscription(subscriber)
        sink = sub.sink(rid)
        try:
            if not request.remote_prefill:  # colocated: this engine prefills
                self.loop.submit(rid, list(request.prompt_token_ids), request.params, sink,
                                 priority=request.priority, output_token_ids=list(request.output_token_ids),
                                 ttft_deadline=request.ttft_deadline, fork_of=request.fork_of)
                return Ready()
            if self.receiver is None:
                raise ValueError("a remote prefill needs a KV receiver: this decode worker runs colocated")
            with self._lock:
                self._expected[rid] = _Expected(request.params, request.priority, sink)
            try:
                reservation = await self._reserve(rid, request.num_kv_tokens, self._prefix(request))
            except Exception as e:  # no room within reserve_wait_s, or never: another decode worker may have
                self.abort(rid)
                sub.drop(rid)
                return StepItem(finished=True, error=WorkerError.of(e, "the decode worker could not reserve "
                                                                       "room for the KV"))
            with self._lock:
                aborted = rid not in self._expected
            if aborted:  # the router gave up while we waited for room: what we reserved goes back
                self.abort(rid)
                sub.drop(rid)
            return Ready(reservation)
        except BaseException:
            self.abort(rid)
            sub.drop(rid)
            raise

    def _flush(self) -> None:
        with self._lock:
            subscriptions = list(self._subscriptions.values())
        for sub in subscriptions:
            sub.flush()

    def _subscription(self, subscriber: str) -> _Subscription:
        with self._lock:
            sub = self._subscriptions.get(subscriber)
            if sub is None:
                sub = self._subscriptions[subscriber] = _Subscription(asyncio.get_running_loop())
            return sub

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

    def abort_prefix(self, prefix: str) -> int:
        with self._lock:
            expected = [rid for rid in self._expected if rid.startswith(prefix)]
        rids = set(expected) | {rid for rid in self._engine_request_ids() if rid.startswith(prefix)}
        for rid in rids:
            self.abort(rid)
        return len(rids)

    def abort_all(self) -> int:
        with self._lock:
            expected = list(self._expected)
            subscribed = [rid for sub in self._subscriptions.values() for rid in sub.close()]
            self._subscriptions.clear()
        rids = set(expected) | set(subscribed) | set(self._engine_request_ids())
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

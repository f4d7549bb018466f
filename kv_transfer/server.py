"""The receiving (decode) side: a `grpc.aio` KV server over a paged pool.

`KVReceiver` runs its own event loop on a thread, so a decode worker (or a
test) drives it with plain method calls. All reservation state changes and
every write into the pool happen on that loop's thread, so a release can never
free blocks while a write into them is still landing; blocking receives (the
torch data plane) land in a staging buffer on a worker thread first.

The decode worker uses the receiver directly, too: `reserve` (or `reserve_future`
from another event loop) makes a reservation for a request it is about to
receive, and `release_soon` gives one up without waiting for the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import grpc

from pdserve.engine.config import KVTransferConfig
from pdserve.engine.platform import keep_freed_memory, serial_torch_thread
from pdserve.kv_transfer import data_plane, metrics
from pdserve.kv_transfer.data_plane import ReceiverPlane
from pdserve.kv_transfer.pool import KVPool, LocalReservation, ReceivedKV, Reservation, ReservationTable
from pdserve.kv_transfer.protocol import (
    AUTH_METADATA_KEY,
    REASON_METADATA_KEY,
    AuthenticationFailed,
    Fingerprint,
    KVLayout,
    KVTransferError,
    LayoutMismatch,
    MalformedTransfer,
    PeerUnavailable,
    TransferTimeout,
    advertised_host,
    decode_push_message,
    grpc_status,
    host_port,
    keepalive_options,
    layout_mismatches,
    secret_matches,
)
from pdserve.kv_transfer.v1 import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)

OnCommit = Callable[[ReceivedKV], None]


class KVReceiver:
    """Hosts the KV server of one decode worker.

    `on_commit(received)` is called on the receiver's thread when a push completes;
    from then on the blocks belong to whoever it hands them to (the decode engine).
    If it raises, the blocks are freed and the sender gets the error.
    """

    def __init__(self, pool: KVPool, config: KVTransferConfig, on_commit: OnCommit, *, worker_id: str | None = None):
        if pool.kv.device.type == "cpu":
            keep_freed_memory()  # received messages are reused from the heap instead of mmapped afresh
        self.pool = pool
        self.config = config
        self.on_commit = on_commit
        self.worker_id = worker_id or f"decode-{uuid.uuid4().hex[:8]}"
        self.table = ReservationTable(pool, lease_s=config.lease_s, tombstone_ttl_s=config.tombstone_ttl_s)
        # Every plane's receiving half: a sender picks its plane, named in each push's header.
        self.planes: dict[str, ReceiverPlane] = {p.wire_name: p.receiver(pool, config) for p in data_plane.PLANES}
        self._loop = asyncio.new_event_loop()
        self._loop.call_soon(serial_torch_thread)  # the loop's first callback, on its thread (not yet running)
        self._thread = threading.Thread(target=self._loop.run_forever, name="kv-receiver", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._reap_wake: asyncio.Event | None = None
        self._reaper: asyncio.Task | None = None
        self.port: int | None = None

    # -- lifecycle (any thread) --------------------------------------------------------------
    def start(self) -> KVReceiver:
        self._thread.start()
        self._call(self._start())
        return self

    @property
    def address(self) -> str:
        """Where senders dial: the bound host, or this node's IP when bound to a wildcard."""
        return host_port(advertised_host(self.config.host), self.port)

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving; every reservation still held is released."""
        if not self._thread.is_alive():
            return
        self._call(self._stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        for plane in self.planes.values():
            plane.close()

    # -- local API (any thread): the decode worker and router use these too ------------------
    def reserve(self, request_id: str, num_tokens: int, lease_s: float | None = None,
                prefix: Sequence[bytes] = ()) -> LocalReservation:
        """Reserve blocks for `num_tokens` tokens of a request's KV here, as a Reserve call would: the
        prefill side then pushes into it with no Reserve of its own. `prefix`: the names of the KV's full
        blocks (`engine.block_manager.block_hashes`); those this pool has cached are taken from its prefix
        cache and need not travel (`LocalReservation.num_cached_tokens`). Raises `ReservationRefused`
        (`ReservationTooLarge` if it could never fit). Waits for the loop; see `reserve_future`."""
        return self.reserve_future(request_id, num_tokens, lease_s, prefix).result(30)

    def reserve_future(self, request_id: str, num_tokens: int, lease_s: float | None = None,
                       prefix: Sequence[bytes] = ()) -> concurrent.futures.Future[LocalReservation]:
        """`reserve` without waiting: from an event loop, `await asyncio.wrap_future(fut)`."""
        if not self._thread.is_alive():
            return _failed(PeerUnavailable(f"the KV receiver {self.worker_id} is not running"))
        return asyncio.run_coroutine_threadsafe(self._reserve_local(request_id, num_tokens, lease_s, prefix),
                                                self._loop)

    def release(self, request_id: str, reason: str = "aborted") -> str:
        """Abort a request's transfer from this side; idempotent. Returns the state it was in.
        Waits (up to 30 s) for the receiver's loop: from an event loop, use `release_soon`."""
        return self.release_soon(request_id, reason).result(30)

    def release_soon(self, request_id: str, reason: str = "aborted") -> concurrent.futures.Future[str]:
        """`release`, scheduled on the receiver's loop; returns at once (a busy receiver loop must not
        stall the caller's). The future resolves to the state the request was in."""
        if not self._thread.is_alive():  # not started, or stopped: no loop thread touches the table now
            done: concurrent.futures.Future[str] = concurrent.futures.Future()
            done.set_result(self.table.release(request_id, reason))
            return done
        return asyncio.run_coroutine_threadsafe(self._release(request_id, reason), self._loop)

    def state_of(self, request_id: str) -> str:
        return self._call(self._run(lambda: self.table.state_of(request_id)))

    @property
    def reserved_blocks(self) -> int:
        return self._call(self._run(lambda: self.table.reserved_blocks))

    def _call(self, coro, timeout: float | None = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @staticmethod
    async def _run(fn):
        return fn()

    # -- on the loop -----------------------------------------------------------------------------
    async def _start(self) -> None:
        self._reap_wake = asyncio.Event()  # first: a reservation made while the server starts wakes it
        c = self.config
        opts = [("grpc.max_receive_message_length", c.max_message_bytes),
                ("grpc.max_send_message_length", c.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        opts += keepalive_options(c.keepalive_time_s, c.keepalive_timeout_s, server=True)
        interceptors = [_AuthInterceptor(c.auth_token)] if c.auth_token else []
        self._server = grpc.aio.server(options=opts, interceptors=interceptors)
        self._server.add_generic_rpc_handlers((_handlers(_Servicer(self)),))
        bind = f"[{c.host}]:{c.port}" if ":" in c.host else f"{c.host}:{c.port}"
        if c.tls_cert_file:
            with open(c.tls_key_file, "rb") as k, open(c.tls_cert_file, "rb") as crt:
                creds = grpc.ssl_server_credentials([(k.read(), crt.read())])
            self.port = self._server.add_secure_port(bind, creds)
        else:
            self.port = self._server.add_insecure_port(bind)
        if not self.port:
            raise OSError(f"cannot bind the KV server to {bind}")
        await self._server.start()
        self._reaper = asyncio.create_task(self._reap())
        logger.info("KV receiver %s listening on %s", self.worker_id, self.address)

    async def _stop(self, grace: float) -> None:
        if self._server:
            await self._server.stop(grace)
        self.table.release_all("shutdown")
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def _reserve_now(self, request_id: str, num_tokens: int, lease_s: float | None, started: float,
                     prefix: Sequence[bytes] = ()) -> Reservation:
        """A reservation (on the loop thread), for the Reserve call and `reserve` alike: timed, and the
        lease reaper woken so that it sees the new deadline. Its caller counts a refusal."""
        r = self.table.reserve(request_id, num_tokens, lease_s, prefix)
        self._reap_wake.set()
        r.reserve_seconds = time.perf_counter() - started
        metrics.TRANSFER_STAGE.labels(self.config.kv_transport, "reserve").observe(r.reserve_seconds)
        return r

    async def _reserve_local(self, request_id: str, num_tokens: int, lease_s: float | None,
                             prefix: Sequence[bytes] = ()) -> LocalReservation:
        try:
            return LocalReservation.of(self._reserve_now(request_id, num_tokens, lease_s, time.perf_counter(),
                                                         prefix))
        except KVTransferError as e:
            metrics.TRANSFER_FAILURES.labels(self.config.kv_transport, e.reason).inc()
            raise

    async def _release(self, request_id: str, reason: str) -> str:
        found = self.table.release(request_id, reason)
        if found in ("reserved", "receiving"):
            metrics.TRANSFER_FAILURES.labels(self.config.kv_transport, "released").inc()
        return found

    async def _reap(self) -> None:
        """Reclaim reservations whose lease passed: a sender that never pushes cannot strand blocks."""
        while True:
            deadline = self.table.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reap_wake.wait(), timeout)
            self._reap_wake.clear()
            for rid in self.table.expire():
                logger.warning("KV reservation for %s expired before its push completed; blocks reclaimed", rid)
                metrics.TRANSFER_FAILURES.labels(self.config.kv_transport, "lease_expired").inc()

    # -- data planes ------------------------------------------------------------------------------
    def plane(self, wire_name: str) -> ReceiverPlane:
        """The receiving half of the plane a push's header names (`MalformedTransfer` if none)."""
        return self.planes[data_plane.for_wire(wire_name).wire_name]

    def open_channel(self, channel_id: str, backend: str, device: str = "", rank: int = 0) -> tuple[str, int]:
        """The OpenChannel call (on the loop thread), answered by the plane with `backend` channels."""
        return self.planes[data_plane.for_backend(backend).wire_name].open_channel(channel_id, backend, device, rank)


def _failed(e: BaseException) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_exception(e)
    return fut


def _handlers(servicer) -> grpc.GenericRpcHandler:
    """The KVTransfer service's handlers, built from the descriptor as the generated
    `add_KVTransferServicer_to_server` would, except that Push reads chunk bytes in place."""
    service = pb.DESCRIPTOR.services_by_name["KVTransfer"]
    handlers = {}
    for m in service.methods:
        make = grpc.stream_unary_rpc_method_handler if m.client_streaming else grpc.unary_unary_rpc_method_handler
        request = decode_push_message if m.name == "Push" else getattr(pb, m.input_type.name).FromString
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=request,
                                response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class _Servicer:
    def __init__(self, rx: KVReceiver):
        self.rx = rx
        self.fp: Fingerprint = rx.pool.fingerprint
        self.digest = self.fp.digest()

    def _check_digest(self, digest: bytes) -> None:
        if digest != self.digest:
            raise LayoutMismatch("the sender's model/layout fingerprint differs from this worker's "
                                 "(pair again to see which fields)")

    async def Pair(self, request, context):
        try:
            theirs = Fingerprint.from_proto(request.fingerprint)
            layout = KVLayout.from_proto(request.layout, theirs.num_kv_heads)
            diff = self.fp.mismatches(theirs) or layout_mismatches(self.fp, self.rx.pool.layout, layout)
            if diff:
                raise LayoutMismatch("incompatible KV layouts: " + "; ".join(diff))
        except KVTransferError as e:
            await _abort(context, e)
        return pb.PairResponse(fingerprint=self.fp.to_proto(), worker_id=self.rx.worker_id,
                               max_message_bytes=self.rx.config.max_message_bytes,
                               layout=self.rx.pool.layout.to_proto())

    async def Reserve(self, request, context):
        t0 = time.perf_counter()
        try:
            self._check_digest(request.fingerprint_digest)
            r = self.rx._reserve_now(request.request_id, request.num_tokens,
                                    request.lease_ms / 1000 if request.lease_ms else None, t0)
        except KVTransferError as e:
            metrics.TRANSFER_FAILURES.labels(self.rx.config.kv_transport, e.reason).inc()
            await _abort(context, e)
        return pb.ReserveResponse(request_id=r.request_id, num_blocks=len(r.blocks),
                                  lease_ms=int((r.lease_deadline - r.reserved_at) * 1000))

    async def Release(self, request, context):
        return pb.ReleaseResponse(state=await self.rx._release(request.request_id, request.reason or "released"))

    async def OpenChannel(self, request, context):
        try:
            host, port = self.rx.open_channel(request.channel_id, request.backend, request.device, request.rank)
        except KVTransferError as e:
            await _abort(context, e)
        return pb.OpenChannelResponse(store_host=host, store_port=port,
                                      timeout_ms=int(self.rx.config.channel_timeout_s * 1000))

    async def Push(self, request_iterator, context):
        rx, table, transport = self.rx, self.rx.table, self.rx.config.kv_transport
        opened = time.perf_counter()
        timings = pb.StageTimings()
        r = link = None
        nbytes = 0
        try:
            header = await self._next(request_iterator, None)
            if not isinstance(header, pb.PushMessage) or header.WhichOneof("kind") != "header":
                raise MalformedTransfer("a push must start with its header")
            h = header.header
            if h.fingerprint_digest != self.digest and table.state_of(h.request_id) == "reserved":
                table.release(h.request_id, "layout_mismatch")  # this sender can never fulfil it
            self._check_digest(h.fingerprint_digest)
            r = table.begin(h.request_id, h.num_tokens)
            timings.reserve = r.reserve_seconds
            link = await rx.plane(h.data_plane).attach(h)
            next_message = functools.partial(self._next, request_iterator, r)  # for planes with bytes inline
            while True:
                msg = await self._next(request_iterator, r)
                if msg is None:
                    raise MalformedTransfer("the push ended without its commit")
                kind = "chunk_data" if isinstance(msg, memoryview) else msg.WhichOneof("kind")
                if kind == "chunk":
                    c = msg.chunk
                    nl = c.num_layers or 1
                    table.check_chunk(r, c.layer, nl, c.token_start, c.num_tokens, c.nbytes)
                    if link.in_place:  # the plane writes into the reserved blocks itself (per-rank channels)
                        await link.write_chunk(c, nl, r.slots(rx.pool)[c.token_start:c.token_start + c.num_tokens])
                        table.written(r, c.layer, nl, c.num_tokens, c.nbytes)
                    else:
                        kv = await link.chunk_kv(c, nl, next_message)
                        table.write(r, c.layer, c.token_start, kv)
                    nbytes += c.nbytes
                    if not timings.first_byte:
                        timings.first_byte = time.perf_counter() - opened
                    timings.last_byte = time.perf_counter() - opened
                elif kind == "commit":
                    t_commit = time.perf_counter()
                    if r.landed is not None and not r.landed.done:  # the last chunk's copy into the pool
                        await asyncio.get_running_loop().run_in_executor(None, r.landed.synchronize)
                    received = table.commit(r, list(msg.commit.prompt_token_ids), list(msg.commit.output_token_ids))
                    try:
                        rx.on_commit(received)
                    except Exception as e:  # the decode worker refused it: the blocks come back to the pool
                        with rx.pool.lock:
                            rx.pool.blocks.free(received.block_table)
                        raise KVTransferError(f"the decode worker refused the request: {e}") from e
                    timings.ack = time.perf_counter() - t_commit
                    break
                else:
                    raise MalformedTransfer(f"unexpected {kind} message in a push")
        except KVTransferError as e:
            self._fail(r, e.reason, link)
            await _abort(context, e)
        except asyncio.CancelledError:  # the sender cancelled, died, or the connection dropped
            self._fail(r, "cancelled", link)
            raise
        except Exception as e:
            logger.exception("KV push failed")
            self._fail(r, "internal", link)
            await _abort(context, KVTransferError(f"internal error: {e}"))
        timings.total = time.perf_counter() - opened
        metrics.TRANSFER_LATENCY.labels(transport).observe(timings.total)
        metrics.TRANSFER_BYTES.labels(transport).observe(nbytes)
        fp = rx.pool.fingerprint
        metrics.TRANSFER_CACHED_BYTES.labels(transport).inc(r.num_cached_tokens * fp.bytes_per_token_layer
                                                            * fp.num_layers)
        for stage in ("first_byte", "last_byte", "ack"):
            metrics.TRANSFER_STAGE.labels(transport, stage).observe(getattr(timings, stage))
        return pb.PushResponse(request_id=r.request_id, bytes=nbytes, timings=timings)

    async def _next(self, it, r):
        """The next message, or None at the end of the stream; bounded by the idle timeout and the lease."""
        timeout = self.rx.config.idle_timeout_s
        if r is not None:
            timeout = min(timeout, r.lease_deadline - time.monotonic())
        try:
            return await asyncio.wait_for(anext(it), max(0.0, timeout))
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise TransferTimeout("the sender went quiet (idle timeout or lease expired)") from None

    def _fail(self, r, reason: str, link=None) -> None:
        transport = self.rx.config.kv_transport
        metrics.TRANSFER_FAILURES.labels(transport, reason).inc()
        if r is not None:
            self.rx.table.release(r.request_id, reason)
        if link is not None:  # the push died midway: its channel (if it has one) is in an unknown state
            link.abandon(sender_gone=reason == "cancelled")


async def _abort(context, e: KVTransferError):
    context.set_trailing_metadata(((REASON_METADATA_KEY, e.reason),))
    await context.abort(grpc_status(e), str(e))


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call must carry `authorization: Bearer <kv_transfer.auth_token>` (constant-time compare)."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, details):
        md = dict(details.invocation_metadata or ())
        handler = await continuation(details)
        if secret_matches(md.get(AUTH_METADATA_KEY), self.token) or handler is None:
            return handler
        err = AuthenticationFailed("missing or wrong KV-plane secret")

        async def deny(request, context):
            await _abort(context, err)

        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny, response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


__all__ = ["KVReceiver"]

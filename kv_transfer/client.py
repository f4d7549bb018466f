"""The sending (prefill) side: pairs with decode workers, reserves, pushes, releases.

`KVSender` owns an event loop on a thread; its methods are called from any
thread. `push` returns a `concurrent.futures.Future` so the prefill engine
keeps computing (the next layers, the next batch) while the KV streams out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from pdserve.engine.config import FaultConfig, KVTransferConfig
from pdserve.engine.platform import keep_freed_memory, serial_torch_thread
from pdserve.engine.streams import CopyEvent
from pdserve.kv_transfer import data_plane
from pdserve.kv_transfer import faults as fi
from pdserve.kv_transfer.data_plane import SenderLink
from pdserve.kv_transfer.protocol import (
    AUTH_METADATA_KEY,
    Fingerprint,
    KVLayout,
    KVTransferError,
    LayoutMismatch,
    MalformedTransfer,
    TransferCancelled,
    error_from_rpc,
    keepalive_options,
    layout_mismatches,
    plan_chunks,
)
from pdserve.kv_transfer.source import CommitInfo, LayerKV, LayerStream
from pdserve.kv_transfer.v1 import kv_transfer_pb2 as pb
from pdserve.kv_transfer.v1 import kv_transfer_pb2_grpc as pb_grpc


@dataclass
class Peer:
    address: str
    worker_id: str
    fingerprint: Fingerprint
    max_message_bytes: int
    channel: grpc.aio.Channel = field(repr=False)
    stub: pb_grpc.KVTransferStub = field(repr=False)
    push: object = field(repr=False)  # Push, taking messages or their pre-encoded wire bytes
    layout: KVLayout | None = None  # how its tensor-parallel ranks hold the KV heads


@dataclass
class ReservationInfo:
    request_id: str
    address: str
    num_blocks: int
    lease_s: float
    seconds: float  # the Reserve round trip


@dataclass
class TransferResult:
    request_id: str
    bytes: int
    seconds: float  # push opened -> acknowledgement received, on the sender
    receiver: dict  # the receiver's stage timings (reserve, first_byte, last_byte, ack, total)


class KVSender:
    """`faults` (chaos testing, see `kv_transfer.faults`) may be replaced at run time:
    `sender.faults = FaultConfig(...)` (or None) applies to the pushes started after it,
    with a fresh RNG seeded from the new config."""

    def __init__(self, config: KVTransferConfig, fingerprint: Fingerprint, *, worker_id: str | None = None,
                 device=None, faults: FaultConfig | None = None, layout: KVLayout | None = None, ranks=None):
        """`layout`: how this worker's tensor-parallel ranks hold the KV heads (`pool.engine_layout`); one rank
        holding them all by default. Pairing refuses a peer whose layout does not tile the same heads. `ranks`:
        with per-rank channels, its other ranks' channel ends (`ranks.RankKeys` over the engine's pool), from
        which they send the KV they staged themselves."""
        if torch.device(device or "cpu").type == "cpu":
            keep_freed_memory()  # chunk buffers are reused from the heap instead of mmapped afresh
        self.config = config
        self.fingerprint = fingerprint
        self.digest = fingerprint.digest()
        self.layout = layout or KVLayout.whole(fingerprint.num_kv_heads)
        self.worker_id = worker_id or f"prefill-{uuid.uuid4().hex[:8]}"
        self.device = torch.device(device or "cpu")
        plane = data_plane.for_transport(config.kv_transport)
        self.plane = plane.sender(config, device=self.device, worker_id=self.worker_id, layout=self.layout,
                                  ranks=ranks)
        self._wire_name = plane.wire_name  # names the plane in each push's header
        self._peers: dict[str, Peer] = {}
        self._pair_lock: asyncio.Lock | None = None
        self._calls: dict[str, tuple[str, asyncio.Task]] = {}  # request id -> (address, the push's task)
        self._metadata = ((AUTH_METADATA_KEY, f"Bearer {config.auth_token}"),) if config.auth_token else ()
        self._faults = fi.FaultInjector(faults)
        self._loop = asyncio.new_event_loop()
        self._loop.call_soon(serial_torch_thread)  # the loop's first callback, on its thread (not yet running)
        self._thread = threading.Thread(target=self._loop.run_forever, name="kv-sender", daemon=True)
        self._thread.start()

    # -- public API (any thread) -------------------------------------------------------------------
    @property
    def faults(self) -> FaultConfig:
        return self._faults.config

    @faults.setter
    def faults(self, faults: FaultConfig | None) -> None:
        self._faults = fi.FaultInjector(faults)

    def pair(self, address: str) -> Peer:
        """Connect and compare fingerprints and KV layouts (once per peer); raises `LayoutMismatch` if
        incompatible (another model or KV format, or a tensor-parallel split that does not tile its KV heads)."""
        return self._call(self._pair(address))

    def reserve(self, address: str, request_id: str, num_tokens: int, lease_s: float | None = None) -> ReservationInfo:
        """Ask the decode worker at `address` to reserve blocks for `num_tokens` tokens of KV.
        Raises `ReservationRefused` when it has no room (nothing is sent then)."""
        return self._call(self._reserve(address, request_id, num_tokens, lease_s))

    def push(self, address: str, source: LayerStream) -> concurrent.futures.Future:
        """Stream `source` into the reservation for `source.request_id`; the future resolves to a
        `TransferResult` on acknowledgement, or raises a `KVTransferError`. On failure the
        reservation is released on both sides."""
        injector = self._faults
        plan = injector.plan(self.fingerprint.num_layers) if injector.active else None
        return asyncio.run_coroutine_threadsafe(self._push(address, source, plan), self._loop)

    def release(self, address: str, request_id: str, reason: str = "aborted") -> str:
        """Tell the decode worker to give the request up (idempotent). Returns the state it found."""
        return self._call(self._release(address, request_id, reason))

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        """Abort this side's push of `request_id`, if one is in flight; the decode side is told (a
        reservation with no push under way is given up with `release`)."""
        self._loop.call_soon_threadsafe(self._cancel, request_id, reason)

    def forget(self, address: str) -> None:
        """A decode worker left: cancel the pushes in flight to it (each releases its reservation,
        best effort, as a cancelled push does), then close its connection and channel. Safe for an
        address this sender never paired with."""
        self._call(self._forget(address))

    def close(self) -> None:
        """Cancel transfers in flight (their reservations are released) and disconnect."""
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self.plane.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- on the loop -------------------------------------------------------------------------------------
    async def _pair(self, address: str) -> Peer:
        peer = self._peers.get(address)
        if peer is not None:
            return peer
        if self._pair_lock is None:
            self._pair_lock = asyncio.Lock()
        async with self._pair_lock:
            if address in self._peers:
                return self._peers[address]
            c = self.config
            opts = [("grpc.max_receive_message_length", c.max_message_bytes),
                    ("grpc.max_send_message_length", c.max_message_bytes)]
            opts += keepalive_options(c.keepalive_time_s, c.keepalive_timeout_s, server=False)
            if c.tls_ca_file or c.tls_cert_file:
                ca = Path(c.tls_ca_file or c.tls_cert_file).read_bytes()
                if c.tls_server_name:
                    opts.append(("grpc.ssl_target_name_override", c.tls_server_name))
                channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca), options=opts)
            else:
                channel = grpc.aio.insecure_channel(address, options=opts)
            stub = pb_grpc.KVTransferStub(channel)
            try:
                hello = pb.PairRequest(fingerprint=self.fingerprint.to_proto(), worker_id=self.worker_id,
                                       layout=self.layout.to_proto())
                resp = await stub.Pair(hello, timeout=c.rpc_timeout_s, metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                await channel.close()
                raise error_from_rpc(e) from None
            theirs = Fingerprint.from_proto(resp.fingerprint)
            layout = KVLayout.from_proto(resp.layout, theirs.num_kv_heads)
            diff = self.fingerprint.mismatches(theirs) or layout_mismatches(self.fingerprint, self.layout, layout)
            if diff:  # the server checks too; this catches an older server that does not
                await channel.close()
                raise LayoutMismatch("incompatible KV layouts: " + "; ".join(diff))
            push = channel.stream_unary("/pdserve.kv_transfer.v1.KVTransfer/Push", request_serializer=_serialize,
                                        response_deserializer=pb.PushResponse.FromString)
            peer = Peer(address, resp.worker_id, theirs, resp.max_message_bytes, channel, stub, push, layout)
            self._peers[address] = peer
            return peer

    async def _reserve(self, address, request_id, num_tokens, lease_s) -> ReservationInfo:
        peer = await self._pair(address)
        t0 = time.perf_counter()
        try:
            resp = await peer.stub.Reserve(
                pb.ReserveRequest(request_id=request_id, num_tokens=num_tokens, fingerprint_digest=self.digest,
                                  lease_ms=int((lease_s or 0) * 1000)),
                timeout=self.config.rpc_timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None
        return ReservationInfo(request_id, address, resp.num_blocks, resp.lease_ms / 1000, time.perf_counter() - t0)

    async def _release(self, address, request_id, reason) -> str:
        peer = await self._pair(address)
        try:
            resp = await peer.stub.Release(pb.ReleaseRequest(request_id=request_id, reason=reason),
                                           timeout=self.config.rpc_timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None
        return resp.state

    def _cancel(self, request_id: str, reason: str) -> None:
        entry = self._calls.get(request_id)
        if entry is None:
            return
        address, task = entry
        task.cancel(reason)

    async def _cancel_pushes(self, reason: str, address: str | None = None) -> None:
        """Cancel the pushes in flight (to `address`, or all) and wait until each has released."""
        tasks = [task for addr, task in self._calls.values() if address is None or addr == address]
        for task in tasks:
            task.cancel(reason)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        await self._cancel_pushes("sender closing")
        for address in list(self._peers):
            await self._forget(address)
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    async def _forget(self, address: str) -> None:
        # First the pushes: while they unwind they still use the peer (to send Release).
        await self._cancel_pushes(f"decode worker {address} forgotten", address)
        peer = self._peers.pop(address, None)
        self.plane.forget(address)
        if peer is not None:
            await peer.channel.close()

    async def _push(self, address: str, source: LayerStream, plan: fi.FaultPlan | None = None) -> TransferResult:
        rid = self._check_source(source)
        self._calls[rid] = (address, asyncio.current_task())
        t0 = time.perf_counter()
        try:
            peer = await self._pair(address)
            # The stream opens when the first layers are ready, not before: a prompt may wait in the
            # prefill queue, or prefill in chunks, for longer than the receiver's idle timeout.
            batches = source.batches().__aiter__()
            first = await anext(batches)
            if plan is not None:
                await self._before_stream(plan, rid)
            async with self.plane.link(peer, self._metadata) as link:
                resp = await self._stream(peer, source, link, first, batches, plan)
        except asyncio.CancelledError:
            await self._release_quietly(address, rid, "cancelled")
            raise TransferCancelled(f"transfer of {rid} cancelled") from None
        except KVTransferError as e:
            await self._release_quietly(address, rid, e.reason if isinstance(e, fi.InjectedFault) else "sender_failed")
            raise
        except BaseException as e:  # the source failed (prefill error) or a local bug
            await self._release_quietly(address, rid, "sender_failed")
            raise KVTransferError(f"transfer of {rid} failed on the sending side: {e}") from e
        finally:
            self._calls.pop(rid, None)
            source.close()  # what the stream's KV was staged in (a TP engine's ranks) may go
        t = resp.timings
        return TransferResult(rid, resp.bytes, time.perf_counter() - t0,
                              {"reserve": t.reserve, "first_byte": t.first_byte, "last_byte": t.last_byte,
                               "ack": t.ack, "total": t.total})

    async def _before_stream(self, plan: fi.FaultPlan, rid: str) -> None:
        """The injected faults that strike before the stream opens: a delay, then a failure."""
        if plan.delay_s:
            fi.count(self.config.kv_transport, fi.DELAY)
            await asyncio.sleep(plan.delay_s)
        if plan.fail:
            fi.count(self.config.kv_transport, fi.FAIL)
            raise fi.InjectedFault(f"transfer of {rid} failed: injected fault (faults.transfer_fail_rate)")

    def _check_source(self, source: LayerStream) -> str:
        if not isinstance(source, LayerStream):
            raise TypeError("push() takes a kv_transfer.source.LayerStream")
        return source.request_id

    async def _stream(self, peer: Peer, source: LayerStream, link: SenderLink, first: list,
                      batches, plan: fi.FaultPlan | None = None) -> pb.PushResponse:
        source_error: list[BaseException] = []  # grpc reports a failing request iterator as a cancellation

        async def messages():
            try:
                async for m in _messages():
                    yield m
            except Exception as e:  # not GeneratorExit/CancelledError: grpc closing the stream after a failed call
                source_error.append(e)
                raise

        async def _messages():
            yield pb.PushMessage(header=pb.TransferHeader(
                request_id=source.request_id, fingerprint_digest=self.digest, num_tokens=source.num_tokens,
                data_plane=self._wire_name, channel_id=link.channel_id, rank_channels=link.rank_channels))
            async for batch in _chain(first, batches):
                async for m in self._batch_messages(source, batch, link, peer, plan):
                    yield m
                if isinstance(batch[-1], CommitInfo):
                    c = batch[-1]
                    yield pb.PushMessage(commit=pb.Commit(prompt_token_ids=c.prompt_token_ids,
                                                          output_token_ids=c.output_token_ids))
                    return

        call = peer.push(messages(), metadata=self._metadata, timeout=self.config.push_timeout_s)
        first_status = _keep_first_status(call)
        try:
            return await call
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
            if source_error:
                err = source_error[0]
                if isinstance(err, KVTransferError):
                    raise err from None
                raise KVTransferError(f"the KV source failed: {err!r}") from err
            if isinstance(e, asyncio.CancelledError):
                call.cancel()
                raise
            raise error_from_rpc(_server_status(e, first_status)) from None

    async def _batch_messages(self, source: LayerStream, batch: list, link: SenderLink, peer: Peer,
                              plan: fi.FaultPlan | None):
        """The chunks of the layers in one batch, each turned into wire messages by the data plane."""
        fp = self.fingerprint
        limit = min(self.config.chunk_bytes, peer.max_message_bytes // 2)
        layers = [item for item in batch if isinstance(item, LayerKV)]
        start = source.token_start
        shipped = source.num_tokens - start  # the receiver holds the first `start` tokens' KV already
        for item in layers:
            if item.kv.shape[1] != shipped:
                raise MalformedTransfer(f"layer {item.layer} has KV for {item.kv.shape[1]} tokens, "
                                        f"the transfer ships {shipped}")
        by_layer = {item.layer: item.kv for item in layers}
        ready = {item.layer: item.ready for item in layers}
        staged = {item.layer: item.staged for item in layers}  # the other ranks' heads (per-rank channels)
        for run_start, count in _runs([item.layer for item in layers]):
            for layer, nl, s, e in plan_chunks(run_start, count, shipped, fp.bytes_per_token_layer, limit):
                await _landed(ready[layer + nl - 1])  # its copies are in order: the last layer's covers the chunk
                fault = plan.hits(layer, nl, s) if plan is not None else None
                if fault is not None:
                    fi.count(self.config.kv_transport, fault)
                if fault == fi.DROP:  # lost on the way: neither its LayerChunk nor its bytes arrive
                    continue
                kvs = [by_layer[i][:, s:e] for i in range(layer, layer + nl)]
                meta = pb.LayerChunk(layer=layer, num_layers=nl, token_start=start + s, num_tokens=e - s)
                at = {"staged": (staged[layer][0], staged[layer][1] + s)} if staged[layer] is not None else {}
                # corrupt: after the checksum
                async for m in link.messages(kvs, meta, corrupt=fault == fi.CORRUPT, **at):
                    yield m

    async def _release_quietly(self, address: str, request_id: str, reason: str) -> None:
        """Best effort: the lease reclaims the reservation if this does not arrive."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self._release(address, request_id, reason))


async def _landed(event: CopyEvent) -> None:
    """Wait until a layer's staging copy is done: at once on CPU (and for a layer already waited for), else
    on a worker thread (the one host wait per layer), so that the loop goes on serving other pushes."""
    if not event.done:
        await asyncio.get_running_loop().run_in_executor(None, event.synchronize)


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


def _runs(layers: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs in a list of layer indices: [3, 4, 5, 9] -> [(3, 3), (9, 1)]."""
    runs: list[tuple[int, int]] = []
    for layer in layers:
        if runs and runs[-1][0] + runs[-1][1] == layer:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((layer, 1))
    return runs


_CORE_INTERNAL = "Internal error from Core"


def _keep_first_status(call: grpc.aio.Call) -> list:
    """The status `call` ended with as first delivered, once it ends: [an AioRpcError, or None if OK].

    When a receiver refuses a chunk mid-stream, a request write the client issued before its status
    arrived fails. grpc aio then sets INTERNAL "Internal error from Core" (no trailing metadata) as
    the call's status; usually the server's status replaces it when it is read, but when that came
    first, the INTERNAL one replaces the server's (grpc/grpc#36066) and the sender would see an
    untyped error. Done callbacks run when the first status is set."""
    kept: list = []

    def on_done(c: grpc.aio.Call) -> None:
        if kept:
            return
        try:
            code = _completed(c.code())
            kept.append(None if code == grpc.StatusCode.OK else grpc.aio.AioRpcError(
                code, grpc.aio.Metadata(), _completed(c.trailing_metadata()), _completed(c.details())))
        except Exception:  # the accessors suspended (another grpc version): keep what the call raises
            kept.append(None)

    call.add_done_callback(on_done)
    return kept


def _server_status(err: grpc.aio.AioRpcError, first_status: list) -> grpc.aio.AioRpcError:
    """`err`, unless it is grpc's own INTERNAL error that replaced the server's status (see above)."""
    if err.code() == grpc.StatusCode.INTERNAL and err.details() == _CORE_INTERNAL and first_status \
            and first_status[0] is not None:
        return first_status[0]
    return err


def _completed(coro):
    """The value of a coroutine that finishes without suspending (a finished call's status accessors)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine suspended")


def _serialize(m: pb.PushMessage | bytes) -> bytes:
    """Push's request serializer: chunk bytes arrive already encoded (see `encode_chunk_data`)."""
    return m if isinstance(m, bytes) else m.SerializeToString()

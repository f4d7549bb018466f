"""How a push's KV bytes travel: one interface, one entry per transport.

The control plane is the same for every transport (Pair, Reserve, the Push stream
of TransferHeader -> LayerChunk... -> Commit, Release, on gRPC; see `client`,
`server`). The data plane is the part that differs, and it has two halves:

  * `SenderPlane` (in the `KVSender`): per push, `link(peer)` opens or reuses its way
    to that peer and holds it for the push; per chunk, `SenderLink.messages(kvs, meta)`
    fills the `LayerChunk`'s size and checksum and yields what goes on the Push
    stream, moving the bytes itself where they travel out of band.
  * `ReceiverPlane` (in the `KVReceiver`): per push, `attach(header)` finds the way
    the sender named; per chunk, `ReceiverLink.chunk_kv(chunk, ...)` produces that
    chunk's KV tensor, checked against its checksum. The receiver bounds-checks the
    `LayerChunk` before asking, and writes the tensor into the reserved blocks after.

Two implementations, picked through `DataPlane` registry entries by the wire's
`TransferHeader.data_plane` (receiver) or the config's `kv_transport` (sender):

  * "grpc" (`kv_transport: grpc`, `InlineSender`/`InlineReceiver`): the bytes follow
    their `LayerChunk` as a `chunk_data` message on the same stream, CRC32C. They are
    encoded straight from the tensors and read in place (`protocol.encode_chunk_data`,
    `decode_push_message`): a measured optimisation, keep it. When either side is tensor-
    parallel (and `per_rank_channels`), the bytes go on per-rank channels as with "torch"
    below, each to its decode rank's own gRPC endpoint (`RankPartsSender`/`RankPartsReceiver`,
    `rank_grpc`) instead of a torch group; the header still names the "grpc" plane.
  * "torch" (`kv_transport: nccl`, `TorchSender`/`TorchReceiver`): the bytes go on a
    torch.distributed channel per worker pair (`channel.TorchChannel`: NCCL on CUDA,
    gloo on CPU), opened through the OpenChannel RPC; a channel carries one push at a
    time, and one that fails mid-push is torn down. When either side is tensor-parallel
    (the `KVLayout`s exchanged by Pair) there is one channel per (sender rank, receiver
    rank) pair with KV heads in common instead, each carrying only those heads from the
    rank that holds them to the rank that keeps them (`_RankedLink`/`_RankedReceiveLink`,
    `ranks`): the receiver's ranks write their heads themselves (`ReceiverLink.in_place`).

A third transport is one more pair of halves and one `DataPlane(...)` line in
`PLANES`; nothing in `KVSender` or `KVReceiver` changes. NIXL (RDMA), for example:

  * `NixlReceiver.__init__` registers the pool's KV tensors with a NIXL agent, and
    `attach(header)` checks that the header's agent is one it has exchanged metadata
    with (that exchange would ride on Pair, or a new control call, as OpenChannel
    does for torch). `chunk_kv` waits for the sender's completion notification for
    that chunk, verifies the checksum over the slots it landed in and returns them;
    `ReservationTable.write` would then skip its copy for planes that write in place
    (the one change outside this module), and a bad chunk is handled as today: the
    reservation is released, so the blocks it scribbled on are never read.
  * `NixlSender.link(peer)` loads the peer's agent metadata (once per peer) and learns
    the reservation's block addresses (the Reserve answer would carry them; a sender
    may only ever write inside the blocks reserved for its request); per chunk,
    `messages` computes the checksum, RDMA-writes the layer KV into those blocks'
    slots, and yields only the `LayerChunk`: metadata and checksum, no bytes.

Fault injection (`faults`) applies on every plane: the sender drops a chunk before its
plane sees it, and asks the plane to corrupt one after its checksum (`corrupt=True`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch
import torch.distributed as dist

from pdserve.engine.parallel import listening_store
from pdserve.engine.platform import serial_torch_thread
from pdserve.engine.streams import transfer_stream
from pdserve.kv_transfer import faults as fi
from pdserve.kv_transfer import metrics, rank_grpc
from pdserve.kv_transfer.channel import (
    RECEIVER_RANK,
    SENDER_RANK,
    ChannelTable,
    TorchChannel,
    backend_for,
    check_distinct_devices,
    create_group,
    device_identity,
)
from pdserve.kv_transfer.errors import ChecksumMismatch, KVTransferError, MalformedTransfer, PeerUnavailable
from pdserve.kv_transfer.protocol import (
    KVLayout,
    advertised_host,
    bytes_checksum,
    checksum,
    checksum_algo,
    encode_chunk_data,
    error_from_rpc,
    kv_from_bytes,
)
from pdserve.kv_transfer.ranks import RankKeys, Row, join_channel
from pdserve.kv_transfer.v1 import kv_transfer_pb2 as pb

if TYPE_CHECKING:
    from pdserve.engine.config import KVTransferConfig
    from pdserve.kv_transfer.client import Peer
    from pdserve.kv_transfer.pool import KVPool

Message = pb.PushMessage | bytes  # bytes: a message already in wire format (see `encode_chunk_data`)
NextMessage = Callable[[], Awaitable["pb.PushMessage | memoryview | None"]]


# -- the interface --------------------------------------------------------------------------------
class SenderLink(ABC):
    """One push's way to its peer (held for the whole push)."""

    channel_id = ""  # for the TransferHeader: what the receiver's `attach` looks up
    rank_channels: tuple = ()  # per-rank channels (`TransferHeader.rank_channels`)

    @abstractmethod
    def messages(self, kvs: list[torch.Tensor], meta: pb.LayerChunk, corrupt: bool,
                 staged: tuple | None = None) -> AsyncIterator[Message]:
        """What one chunk puts on the Push stream: its `meta` (size and checksum filled in here),
        then anything else the chunk needs. `kvs` are the chunk's layers, each `[2, n, heads, dim]`;
        `corrupt`: flip a byte after the checksum (fault injection); `staged`: a tensor-parallel sender's other
        ranks hold the rest of the heads (`kvs` has rank 0's): (their `engine.parallel.Shipment`, the chunk's
        first token in it)."""


class SenderPlane(ABC):
    """A `KVSender`'s half of a data plane. `layout`: how the sender's ranks hold the KV heads; `ranks`: its other
    ranks' channel ends (a tensor-parallel sender with per-rank channels, `ranks.RankKeys`)."""

    def __init__(self, config: KVTransferConfig, *, device: torch.device, worker_id: str,
                 layout: KVLayout | None = None, ranks: RankKeys | None = None):
        self.config = config
        self.device = device
        self.worker_id = worker_id
        self.layout = layout
        self.ranks = ranks or RankKeys(None, config.channel_timeout_s)

    @abstractmethod
    def link(self, peer: Peer, metadata: tuple) -> contextlib.AbstractAsyncContextManager[SenderLink]:
        """Open (or reuse) the way to `peer` and hold it for one push; an error leaving the
        block means the push failed midway. `metadata`: what control calls must present."""

    def forget(self, address: str) -> None:  # noqa: B027 (optional: a plane that keeps nothing per peer)
        """The peer at `address` left: drop what is kept for it."""

    def close(self) -> None:  # noqa: B027 (optional: a plane that holds no resources)
        """The sender is closing (its loop has stopped)."""


class ReceiverLink(ABC):
    """Where one push's chunk bytes come from."""

    in_place = False  # True: `write_chunk` lands each chunk in the pool itself; False: `chunk_kv` returns it

    @abstractmethod
    async def chunk_kv(self, chunk: pb.LayerChunk, num_layers: int, next_message: NextMessage) -> torch.Tensor:
        """The chunk's KV, `[num_layers, 2, chunk.num_tokens, heads, dim]`, checked against its
        checksum (`ChecksumMismatch`) and size (`MalformedTransfer`). `next_message` reads the
        Push stream (bounded by the idle timeout and the lease) for planes that carry bytes on it."""

    async def write_chunk(self, chunk: pb.LayerChunk, num_layers: int, slots: torch.Tensor) -> None:
        """For `in_place` links: receive the chunk's KV and write it into the pool at `slots` (the reserved
        blocks' slots of its tokens), checked (`ChecksumMismatch`, `PeerUnavailable`)."""
        raise NotImplementedError

    def abandon(self, sender_gone: bool) -> None:  # noqa: B027 (optional: a link that holds nothing beyond its push)
        """The push failed midway: tear down what it ran on, since its state is unknown (the sender
        tears down its end as well). `sender_gone`: the push was cancelled or its connection lost."""


class ReceiverPlane(ABC):
    """A `KVReceiver`'s half of a data plane. Called on the receiver's loop thread."""

    def __init__(self, pool: KVPool, config: KVTransferConfig):
        self.pool = pool
        self.config = config

    @abstractmethod
    async def attach(self, header: pb.TransferHeader) -> ReceiverLink:
        """The way the push under `header` brings its bytes (`PeerUnavailable` if it is gone)."""

    def open_channel(self, channel_id: str, backend: str, device: str = "", rank: int = 0) -> tuple[str, int]:
        """The OpenChannel call, for planes with channels: start the receiving end (on tensor-parallel rank
        `rank`), return where the sender meets it. `device`: the sender's (`channel.device_identity`)."""
        raise MalformedTransfer(f"the {backend} backend opens no channels here")

    def close(self) -> None:  # noqa: B027 (optional: a plane that holds no resources)
        """The receiver has stopped."""

    def _received(self, nbytes: int) -> None:
        """Count bytes that arrived, before they are checked (`pdserve_kv_transfer_bytes_total`)."""
        metrics.TRANSFER_BYTES_TOTAL.inc(self.config.kv_transport, nbytes)
        metrics.RANK_PAIR_BYTES.labels(self.config.kv_transport, "rank0", "0", "0").inc(nbytes)


def _check_sum(chunk: pb.LayerChunk, ok: bool) -> None:
    if not ok:
        raise ChecksumMismatch(f"layer {chunk.layer} tokens [{chunk.token_start}, "
                               f"{chunk.token_start + chunk.num_tokens}): checksum mismatch")


# -- "grpc": the bytes inline on the Push stream -----------------------------------------------------
class InlineSender(SenderPlane, SenderLink):
    """Stateless: the Push stream itself is the way, so the plane is its own link. With `per_rank_channels`, to or
    from a tensor-parallel worker, the bytes go on per-rank channels over gRPC instead (`RankPartsSender`)."""

    _ranked: RankPartsSender | None = None

    @contextlib.asynccontextmanager
    async def link(self, peer: Peer, metadata: tuple) -> AsyncIterator[SenderLink]:
        mine, theirs = self.layout, peer.layout
        if not (self.config.per_rank_channels and mine is not None and theirs is not None
                and (mine.tp_size > 1 or theirs.tp_size > 1)):
            yield self
            return
        if self._ranked is None:
            self._ranked = RankPartsSender(self.config, device=self.device, worker_id=self.worker_id,
                                           layout=self.layout, ranks=self.ranks)
        async with self._ranked.link(peer, metadata) as link:
            yield link

    def forget(self, address: str) -> None:
        if self._ranked is not None:
            self._ranked.forget(address)

    def close(self) -> None:
        if self._ranked is not None:
            self._ranked.close()

    async def messages(self, kvs: list[torch.Tensor], meta: pb.LayerChunk, corrupt: bool,
                       staged: tuple | None = None) -> AsyncIterator[Message]:
        data, meta.nbytes, meta.checksum = encode_chunk_data(kvs)
        meta.checksum_algo = pb.CHECKSUM_ALGO_CRC32C
        if corrupt:
            data = fi.corrupt_wire_bytes(data, meta.nbytes)
        yield pb.PushMessage(chunk=meta)
        yield data  # already wire bytes


class InlineReceiver(ReceiverPlane, ReceiverLink):
    """Its own link; a push on per-rank channels (the header lists them) is `RankPartsReceiver`'s."""

    _ranked: RankPartsReceiver | None = None

    def _ranks(self) -> RankPartsReceiver:
        if self._ranked is None:
            self._ranked = RankPartsReceiver(self.pool, self.config)
        return self._ranked

    async def attach(self, header: pb.TransferHeader) -> ReceiverLink:
        return await self._ranks().attach(header) if header.rank_channels else self

    def open_channel(self, channel_id: str, backend: str, device: str = "", rank: int = 0) -> tuple[str, int]:
        return self._ranks().open_channel(channel_id, backend, device, rank)

    def close(self) -> None:
        if self._ranked is not None:
            self._ranked.close()

    async def chunk_kv(self, chunk: pb.LayerChunk, num_layers: int, next_message: NextMessage) -> torch.Tensor:
        data = await next_message()  # the chunk's bytes: a memoryview, in place (decode_push_message)
        if isinstance(data, pb.PushMessage) and data.WhichOneof("kind") == "chunk_data":
            data = data.chunk_data
        elif not isinstance(data, memoryview):
            raise MalformedTransfer("a chunk's bytes must follow its LayerChunk")
        if len(data) != chunk.nbytes:
            raise MalformedTransfer(f"chunk says {chunk.nbytes} bytes, carries {len(data)}")
        self._received(chunk.nbytes)
        _check_sum(chunk, chunk.checksum_algo == pb.CHECKSUM_ALGO_CRC32C and bytes_checksum(data) == chunk.checksum)
        return kv_from_bytes(data, num_layers, chunk.num_tokens, self.pool.fingerprint)


# -- "torch": the bytes on a torch.distributed channel -----------------------------------------------
class _TorchLink(SenderLink):
    def __init__(self, channel: TorchChannel, executor: concurrent.futures.Executor):
        self.channel = channel
        self.channel_id = channel.channel_id
        self._executor = executor

    async def messages(self, kvs: list[torch.Tensor], meta: pb.LayerChunk, corrupt: bool,
                       staged: tuple | None = None) -> AsyncIterator[Message]:
        # On the transfer stream (`engine.streams`), as the send is: the checksum's host wait is for this
        # chunk's work alone, not for the compute stream's queue.
        xfer = transfer_stream(kvs[0].device)
        loop = asyncio.get_running_loop()
        with xfer.use():
            part = torch.stack(kvs) if len(kvs) > 1 else kvs[0].contiguous()
        meta.checksum_algo = checksum_algo(part)  # SUM64 on a GPU: computed there, no copy to the host
        meta.checksum = await loop.run_in_executor(self._executor, xfer.run, checksum, part, meta.checksum_algo)
        meta.nbytes = part.numel() * part.element_size()
        if corrupt:
            with xfer.use():
                part = fi.corrupt_tensor(part)
        yield pb.PushMessage(chunk=meta)  # first: the receiver posts its recv when it reads this
        await loop.run_in_executor(self._executor, xfer.run, self.channel.send, part)


class _RankedLink(SenderLink):
    """Per-rank channels (`ranks`): one per (sender rank, receiver rank) pair whose KV heads intersect, each carrying
    only those heads; rank 0's parts come from the stream, the other ranks' from what they staged."""

    def __init__(self, rows: list[Row], ranks: RankKeys, bytes_per_token_layer: int,
                 executor: concurrent.futures.Executor):
        self.rows, self.ranks, self._executor = rows, ranks, executor
        self.bytes_per_token_layer = bytes_per_token_layer
        self.channel_id = next(r.channel_id for r in rows if r.src == 0)
        self.rank_channels = tuple(pb.RankChannel(src_rank=r.src, dst_rank=r.dst, first=r.first, end=r.end,
                                                  channel_id=r.channel_id) for r in rows)

    async def messages(self, kvs: list[torch.Tensor], meta: pb.LayerChunk, corrupt: bool,
                       staged: tuple | None = None) -> AsyncIterator[Message]:
        xfer = transfer_stream(kvs[0].device)
        loop = asyncio.get_running_loop()
        num_layers, num_tokens = len(kvs), kvs[0].shape[1]
        with xfer.use():
            local = torch.stack(kvs)  # [layers, 2, tokens, rank 0's KV heads, head_dim]
            own = [(e, local[:, :, :, r.a:r.b].contiguous()) for e, r in enumerate(self.rows) if r.src == 0]
        if staged is None and any(r.src for r in self.rows):
            raise MalformedTransfer("this worker's other ranks staged no KV for the stream (per-rank channels)")
        shipment, start = staged if staged is not None else (None, 0)
        algo = meta.checksum_algo = checksum_algo(local)
        # every rank posts its sends (they go as the receiver's ranks take them) and reports their checksums
        meta.rank_checksums.extend(await loop.run_in_executor(
            self._executor, xfer.run, self.ranks.send, self.rows, own, shipment.ship_id if shipment else 0,
            meta.layer, num_layers, start, num_tokens, algo, own[-1][0] if corrupt else -1))
        meta.nbytes = num_layers * num_tokens * self.bytes_per_token_layer  # every head once, as the receiver counts
        yield pb.PushMessage(chunk=meta)  # the receiver's ranks take the bytes when it reads this


class TorchSender(SenderPlane):
    def __init__(self, config: KVTransferConfig, *, device: torch.device, worker_id: str,
                 layout: KVLayout | None = None, ranks: RankKeys | None = None):
        super().__init__(config, device=device, worker_id=worker_id, layout=layout, ranks=ranks)
        self.channels = ChannelTable(config.max_channels)
        self._locks: dict[str, asyncio.Lock] = {}
        self._ranks: dict[str, int] = {}  # address -> how many of its ranks have channels from rank 0
        self._remote: dict[tuple[str, int, int], tuple[str, int]] = {}  # (address, src, dst) -> (channel id, key)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, config.max_channels),
                                                               thread_name_prefix="kv-send",
                                                               initializer=serial_torch_thread)

    @contextlib.asynccontextmanager
    async def link(self, peer: Peer, metadata: tuple) -> AsyncIterator[SenderLink]:
        async with self._locks.setdefault(peer.address, asyncio.Lock()):  # sends and recvs match by order
            mine, theirs = self.layout, peer.layout
            rows: list[Row] = []
            if self.config.per_rank_channels and mine is not None and theirs is not None \
                    and (mine.tp_size > 1 or theirs.tp_size > 1):
                try:  # in (sender rank, receiver rank) order, as both sides use them
                    for src, dst, first, end in mine.overlaps(theirs):
                        rows.append(await self._row(peer, metadata, src, dst, first, end))
                except BaseException:
                    self._drop(peer.address, rows)
                    raise
                link: SenderLink = _RankedLink(rows, self.ranks, peer.fingerprint.bytes_per_token_layer,
                                               self._executor)
            else:  # one channel, to the receiver's rank 0 (which scatters the heads to its ranks, if it has any)
                channel = await self._channel(peer, metadata)
                rows = [Row(0, 0, 0, 0, channel=channel)]
                link = _TorchLink(channel, self._executor)
            try:
                yield link
            except BaseException:
                self._drop(peer.address, rows)  # a send may be half done: the channels' state is unknown
                raise

    async def _row(self, peer: Peer, metadata: tuple, src: int, dst: int, first: int, end: int) -> Row:
        base = self.layout.kv_heads[src][0]
        row = Row(src, dst, first - base, end - base, first, end)
        if src == 0:
            row.channel = await self._channel(peer, metadata, dst)
            row.channel_id = row.channel.channel_id
            return row
        known = self._remote.get((peer.address, src, dst))
        if known is None:
            if self.ranks.tp is None:
                raise MalformedTransfer(f"sender rank {src} is not one of this worker's ranks")
            channel_id, resp = await self._open(peer, metadata, dst)
            args = (src, channel_id, resp.store_host, resp.store_port, self.backend,
                    self.config.channel_timeout_s, SENDER_RANK, advertised_host(self.config.host))
            key = await asyncio.get_running_loop().run_in_executor(self._executor, self.ranks.open, *args)
            known = self._remote[(peer.address, src, dst)] = (channel_id, key)
        row.channel_id, row.key = known
        return row

    def _drop(self, address: str, rows: list[Row]) -> None:
        """Close a failed push's channels, rank 0's and the other ranks' (the next push opens fresh ones)."""
        for r in rows:
            if r.channel is not None:
                r.channel.close()
            elif r.src:
                self._remote.pop((address, r.src, r.dst), None)
        self.ranks.close([r.channel_id for r in rows if r.src])

    def forget(self, address: str) -> None:
        for r in range(self._ranks.pop(address, 1)):
            self.channels.pop(_channel_key(address, r))
        gone = [k for k in self._remote if k[0] == address]
        self.ranks.close([self._remote.pop(k)[0] for k in gone])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.channels.close_all()

    async def _open(self, peer: Peer, metadata: tuple, rank: int) -> tuple[str, pb.OpenChannelResponse]:
        """OpenChannel: the receiver's rank `rank` starts its end of a new channel; (its id, where to meet)."""
        channel_id = f"{self.worker_id}-{uuid.uuid4().hex[:12]}"
        try:
            req = pb.OpenChannelRequest(channel_id=channel_id, backend=self.backend,
                                        device=device_identity(self.device), rank=rank)
            return channel_id, await peer.stub.OpenChannel(req, timeout=self.config.rpc_timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None

    async def _channel(self, peer: Peer, metadata: tuple, rank: int = 0) -> TorchChannel:
        """Rank 0's channel to the receiver's rank `rank` (reused while it lives)."""
        key = _channel_key(peer.address, rank)
        ch = self.channels.get(key)
        if ch is not None:
            return ch
        if not self.channels.make_room():
            raise KVTransferError(f"all {self.config.max_channels} channels are busy")
        channel_id, resp = await self._open(peer, metadata, rank)
        ch = await asyncio.get_running_loop().run_in_executor(self._executor, self._connect, channel_id, resp)
        self.channels.put(key, ch)
        self._ranks[peer.address] = max(self._ranks.get(peer.address, 1), rank + 1)
        return ch


    @property
    def backend(self) -> str:
        """OpenChannelRequest.backend for this sender's channels."""
        return backend_for(self.device)

    def _connect(self, channel_id: str, resp: pb.OpenChannelResponse) -> TorchChannel:
        """Rank 0's end of a channel the receiver has opened (blocks until the receiver joins: off the loop)."""
        return join_channel(resp.store_host, resp.store_port, channel_id, self.backend, self.config.channel_timeout_s,
                            SENDER_RANK, advertised_host(self.config.host), self.config)


class RankPartsSender(TorchSender):
    """The `grpc` transport's per-rank channels, sending side: `TorchSender`'s, each channel a `rank_grpc.PartSender`
    to the receiving rank's endpoint (the OpenChannel answer) instead of a torch group."""

    backend = rank_grpc.BACKEND  # `join_channel` makes each channel a `rank_grpc.PartSender`


def _channel_key(address: str, rank: int) -> str:
    return address if rank == 0 else f"{address}#rank{rank}"


class _TorchReceiveLink(ReceiverLink):
    def __init__(self, plane: TorchReceiver, channel: TorchChannel):
        self.plane = plane
        self.channel = channel

    async def chunk_kv(self, chunk: pb.LayerChunk, num_layers: int, next_message: NextMessage) -> torch.Tensor:
        fp, pool = self.plane.pool.fingerprint, self.plane.pool
        # A blocking recv cannot land in the pool: a release on the loop could free the blocks meanwhile.
        # Staging, recv, checksum and (`KVPool.write`) the copy into the pool all queue on the transfer stream,
        # in that order: the next chunk's recv into the same buffer waits for this one's copy out of it.
        # The host waits for the recv (in the checksum) on the worker thread, never on the receiver's loop.
        xfer = pool.transfer
        with xfer.use():
            buf = self.channel.staging((num_layers, 2, chunk.num_tokens, fp.num_kv_heads, fp.head_dim),
                                       fp.torch_dtype, pool.kv.device)

        def receive() -> int:
            with xfer.use():
                self.channel.recv(buf)
                return checksum(buf, chunk.checksum_algo)

        got = await asyncio.get_running_loop().run_in_executor(self.plane.executor, receive)
        self.plane._received(chunk.nbytes)
        _check_sum(chunk, got == chunk.checksum)
        return buf

    def abandon(self, sender_gone: bool) -> None:
        self.channel.retire(now=sender_gone)


class _RankedReceiveLink(ReceiverLink):
    """A push on per-rank channels: every rank of this worker receives its heads on its own (`ranks`)."""

    in_place = True

    def __init__(self, plane: TorchReceiver, rows: list[Row]):
        self.plane, self.rows = plane, rows

    async def chunk_kv(self, chunk: pb.LayerChunk, num_layers: int, next_message: NextMessage) -> torch.Tensor:
        raise MalformedTransfer("a push on per-rank channels is written in place")

    async def write_chunk(self, chunk: pb.LayerChunk, num_layers: int, slots: torch.Tensor) -> None:
        if len(chunk.rank_checksums) != len(self.rows):
            raise MalformedTransfer(f"{len(chunk.rank_checksums)} checksums for {len(self.rows)} rank channels")
        plane = self.plane
        await asyncio.get_running_loop().run_in_executor(
            plane.executor, plane.ranks.receive, self.rows, chunk.layer, num_layers, chunk.num_tokens, slots,
            chunk.checksum_algo, list(chunk.rank_checksums), plane.config.kv_transport)
        metrics.TRANSFER_BYTES_TOTAL.inc(plane.config.kv_transport, chunk.nbytes)

    def abandon(self, sender_gone: bool) -> None:
        for r in self.rows:
            if r.channel is not None:
                r.channel.retire(now=sender_gone)
        self.plane.ranks.close([r.channel_id for r in self.rows if r.dst])


class TorchReceiver(ReceiverPlane):
    def __init__(self, pool: KVPool, config: KVTransferConfig):
        super().__init__(pool, config)
        self.channels = ChannelTable(config.max_channels)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, config.max_channels),
                                                              thread_name_prefix="kv-recv",
                                                              initializer=serial_torch_thread)
        self._pending: dict[str, concurrent.futures.Future] = {}  # channel id -> its group being built
        self._store: dist.TCPStore | None = None
        self.device = device_identity(pool.kv.device)
        # the other ranks' channel ends (`ranks`), for a tensor-parallel pool (`engine.parallel.ShardedKVCache`);
        # a pool without other ranks has none
        self.ranks = RankKeys(pool.kv, config.channel_timeout_s)
        self._companions: dict[str, list[str]] = {}  # rank 0's channel id -> its ranks' channels of one sender

    async def attach(self, header: pb.TransferHeader) -> ReceiverLink:
        if not header.rank_channels:
            return _TorchReceiveLink(self, await self._own_channel(header.channel_id))
        rows = self._rows(header.rank_channels)  # checked before any channel is looked up
        ch = await self._own_channel(header.channel_id)
        for r in rows:
            if r.dst == 0:
                r.channel = ch if r.channel_id == header.channel_id else await self._own_channel(r.channel_id)
        self._companions[header.channel_id] = [r.channel_id for r in rows if r.dst]
        return _RankedReceiveLink(self, rows)

    def _rows(self, channels) -> list[Row]:
        """A push's per-rank channels, checked: in (sender rank, receiver rank) order, each inside its receiver
        rank's KV heads, together tiling every rank's heads, and each opened here for that rank."""
        heads = self.pool.layout.kv_heads
        rows, covered = [], [heads[r][0] for r in range(len(heads))]
        for rc in channels:
            dst = rc.dst_rank
            if dst >= len(heads) or rc.first != covered[dst] or not rc.first < rc.end <= heads[dst][1]:
                raise MalformedTransfer(f"rank channel {rc.src_rank} -> {dst} with KV heads [{rc.first}, {rc.end}) "
                                        f"does not follow this worker's layout {list(heads)}")
            if rows and (rows[-1].src, rows[-1].dst) >= (rc.src_rank, dst):
                raise MalformedTransfer("rank channels out of (sender rank, receiver rank) order")
            covered[dst] = rc.end
            row = Row(rc.src_rank, dst, rc.first - heads[dst][0], rc.end - heads[dst][0], rc.first, rc.end,
                      rc.channel_id)
            if dst:
                rank, row.key = self.ranks.keys.get(rc.channel_id, (0, 0))
                if rank != dst:
                    raise PeerUnavailable(f"no open channel {rc.channel_id!r} on rank {dst}")
            rows.append(row)
        if covered != [h[1] for h in heads]:
            raise MalformedTransfer(f"rank channels leave KV heads of this worker's layout {list(heads)} uncovered")
        return rows

    async def _own_channel(self, channel_id: str) -> TorchChannel:
        fut = self._pending.get(channel_id)
        if fut is not None:
            try:
                return await asyncio.wrap_future(fut)
            except Exception as e:
                raise PeerUnavailable(f"channel {channel_id} never connected: {e}") from e
        ch = self.channels.get(channel_id)
        if ch is None:
            raise PeerUnavailable(f"no open channel {channel_id!r}")
        return ch

    def _make_room(self, rank: int) -> None:
        """Before a new channel's end on rank `rank`: the rank exists, a channel slot is free, and the other ranks'
        ends of channels whose rank-0 end is gone are closed."""
        if rank and (self.ranks.tp is None or rank >= self.pool.layout.tp_size):
            raise MalformedTransfer(f"this worker has no tensor-parallel rank {rank} to take a channel")
        if not self.channels.make_room():
            raise KVTransferError(f"all {self.config.max_channels} channels are busy")
        for cid in [c for c in self._companions if not self.channels.has(c)]:  # their rank-0 end is gone
            self.ranks.close(self._companions.pop(cid))

    def open_channel(self, channel_id: str, backend: str, device: str = "", rank: int = 0) -> tuple[str, int]:
        """Start the receiving end of a channel (its group is built on a worker thread, as joining
        blocks until the sender joins; on rank `rank` of a tensor-parallel worker, through an op of its
        group: `ranks`); returns the store address the sender rendezvouses at."""
        if backend != backend_for(self.pool.kv.device):
            raise MalformedTransfer(f"backend {backend} cannot reach a pool on {self.pool.kv.device}")
        check_distinct_devices(device, self.device)
        self._make_room(rank)
        if self._store is None:
            self._store = listening_store(self.config.host, self.config.channel_timeout_s)
        store, t = self._store, self.config.channel_timeout_s
        host = advertised_host(self.config.host)  # what the peer dials, and the interface gloo binds
        if rank:
            self.ranks.open(rank, channel_id, host, store.port, backend, t, RECEIVER_RANK, host)
            return host, store.port

        def build() -> TorchChannel:
            ch = TorchChannel(channel_id, create_group(store, channel_id, RECEIVER_RANK, backend, t, host), backend, t)
            self.channels.put(channel_id, ch)
            return ch

        loop = asyncio.get_running_loop()
        fut = self.executor.submit(build)
        self._pending[channel_id] = fut
        fut.add_done_callback(lambda _: loop.call_soon_threadsafe(self._pending.pop, channel_id, None))
        return host, self._store.port

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.channels.close_all()


class RankPartsReceiver(TorchReceiver):
    """The `grpc` transport's per-rank channels, receiving side: `TorchReceiver`'s, each channel's end a
    `rank_grpc.PartReceiver` on its rank's parts endpoint (whose address OpenChannel answers)."""

    def __init__(self, pool: KVPool, config: KVTransferConfig):
        super().__init__(pool, config)
        self._ports: list[int] | None = None

    def open_channel(self, channel_id: str, backend: str, device: str = "", rank: int = 0) -> tuple[str, int]:
        if backend != rank_grpc.BACKEND:
            raise MalformedTransfer(f"backend {backend} is not this plane's")
        self._make_room(rank)
        endpoint = rank_grpc.PartEndpoint.shared(self.config)
        if self._ports is None:  # every rank's endpoint, started once (an op of the group)
            self._ports = self.ranks.ports(endpoint.port)
        t = self.config.channel_timeout_s
        if rank:
            self.ranks.open(rank, channel_id, endpoint.host, self._ports[rank], backend, t, RECEIVER_RANK,
                            endpoint.host)
        else:
            self.channels.put(channel_id, rank_grpc.PartReceiver(endpoint, channel_id, t))
        return endpoint.host, self._ports[rank]


# -- the registry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataPlane:
    """A transport's data plane: its names and its two halves."""

    wire_name: str  # TransferHeader.data_plane
    transport: str  # KVTransferConfig.kv_transport that makes a sender use it
    sender: type[SenderPlane]
    receiver: type[ReceiverPlane]
    channel_backends: tuple[str, ...] = ()  # the OpenChannel backends it serves


PLANES = (
    DataPlane("grpc", "grpc", InlineSender, InlineReceiver, channel_backends=(rank_grpc.BACKEND,)),
    DataPlane("torch", "nccl", TorchSender, TorchReceiver, channel_backends=("nccl", "gloo")),
)
# A header that names no plane: proto3's empty string, from a sender older than the field.
_DEFAULT_WIRE_NAME = "grpc"


def for_transport(kv_transport: str) -> DataPlane:
    """The plane a sender configured with `kv_transport` pushes on."""
    for plane in PLANES:
        if plane.transport == kv_transport:
            return plane
    raise ValueError(f"no data plane for kv_transport {kv_transport!r}")


def for_wire(data_plane: str) -> DataPlane:
    """The plane a push's header names; `MalformedTransfer` for one this receiver does not know."""
    name = data_plane or _DEFAULT_WIRE_NAME
    for plane in PLANES:
        if plane.wire_name == name:
            return plane
    raise MalformedTransfer(f"unknown data plane {data_plane!r}")


def for_backend(backend: str) -> DataPlane:
    """The plane whose channels an OpenChannel call with `backend` asks for."""
    for plane in PLANES:
        if backend in plane.channel_backends:
            return plane
    raise MalformedTransfer(f"no data plane opens {backend!r} channels")


__all__ = ["PLANES", "DataPlane", "ReceiverLink", "ReceiverPlane", "SenderLink", "SenderPlane", "for_backend",
           "for_transport", "for_wire"]

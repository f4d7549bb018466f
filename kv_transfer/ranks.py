"""Per-rank KV channels between tensor-parallel workers (the `nccl` transport: gloo on CPU, NCCL on CUDA; the
`grpc` transport: each receiving rank's gRPC endpoint, `rank_grpc`).

Without them, a TP prefill worker gathers its ranks' KV heads to rank 0, which ships them all, and a TP decode
worker's rank 0 receives them all and scatters each rank its own over the worker's group. With them, there is
one channel per (prefill rank, decode rank) pair whose KV-head ranges intersect (`KVLayout.overlaps`), carrying
only those heads: each rank sends and receives its own bytes, none hops through a rank 0.

Each worker's rank 0 keeps all the bookkeeping (on the decode side the reservation, chunk checks and slots; on
the prefill side the stream and its chunks) and drives its other ranks with ops of the worker's own group
(`ShardedKVCache.extension`, handled on ranks > 0 by `RankChannels`), so that they run in step with the forward
passes that read and write the same pools:

  OPEN     rank r joins a channel's two-rank group, as its sender or its receiver (on a thread of its own:
           joining waits for the other end)
  SEND     prefill side, per chunk: each rank cuts its channels' parts of the chunk out of the KV it staged
           during the forward pass (`engine.parallel.Shipment`), checksums them and posts their sends without
           waiting for them (`PendingSends`: the bytes go as the receiver takes them, so the prefill worker's
           group is never held while a decode worker gets round to receiving); the checksums are gathered to rank
           0, which puts them ahead of the bytes on the control stream (`LayerChunk.rank_checksums`)
  RECV     decode side, per chunk: each rank receives its parts, writes them into its pool at the slots rank
           0 names and reports their checksums, which rank 0 compares with the sender's: any difference or
           failed receive fails the push (`ChecksumMismatch`, `PeerUnavailable`)
  CLOSE    a push failed midway: the ranks' ends of its channels are closed (their state is unknown)
  PORTS    (`grpc` transport) every rank starts its parts endpoint, if it has none yet, and reports its port

A receiving rank takes its channels in (sender rank, receiver rank) order; the sends are all posted before, so
nothing waits in a cycle. A failed send or receive breaks only its channel (a receiving rank reports it; a failed
send shows on the receiving side, which fails the push); the group survives. Writes land in the reserved blocks
under the group's lock, before rank 0 hands the blocks to anyone: a bad chunk releases the reservation, so blocks
it wrote are never read.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdserve.engine.config import KVTransferConfig
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.platform import serial_torch_thread
from pdserve.kv_transfer import faults as fi
from pdserve.kv_transfer import metrics, rank_grpc
from pdserve.kv_transfer.channel import SENDER_RANK, TorchChannel, create_group
from pdserve.kv_transfer.errors import ChecksumMismatch, PeerUnavailable
from pdserve.kv_transfer.protocol import checksum

logger = logging.getLogger(__name__)

EXTENSION = 1  # the id these ops are registered under (`TPRank.extensions`)
OPEN, RECV, SEND, CLOSE, PORTS = range(5)
_MASK63 = (1 << 63) - 1


@dataclass
class Row:
    """One channel of a push: whole-model KV heads [first, end) from sender rank `src` to receiver rank `dst`;
    `a`, `b`: those heads within this side's rank's own; `channel` (this side's rank 0) or `key` (its other
    ranks, `RankKeys`)."""

    src: int
    dst: int
    a: int
    b: int
    first: int = 0
    end: int = 0
    channel_id: str = ""
    channel: TorchChannel | None = None
    key: int = 0


def table(rows: list[Row]) -> torch.Tensor:
    """The rows as an op's int64 tensor: (src, dst, key, a, b) each."""
    return torch.tensor([[r.src, r.dst, r.key, r.a, r.b] for r in rows], dtype=torch.long).view(-1, 5)


def _text(s: str) -> torch.Tensor:
    return torch.tensor(list(s.encode()), dtype=torch.uint8)


def _str(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode()


def _report(rows: int) -> torch.Tensor:
    """Per row: ok, checksum (two int64 halves of the fixed64), bytes."""
    return torch.zeros(rows, 4, dtype=torch.long)


def _fill(report: torch.Tensor, e: int, ok: bool, crc: int = 0, nbytes: int = 0) -> None:
    report[e] = torch.tensor([int(ok), crc & _MASK63, crc >> 63, nbytes])


def receive_rows(pool: PagedKVCache, rows: list[tuple[int, TorchChannel | None, int, int]], report: torch.Tensor,
                 layer: int, num_layers: int, num_tokens: int, slots: torch.Tensor, algo: int) -> None:
    """This rank's parts of one chunk, `(row, channel, a, b)` each (its heads [a, b)), into `pool` at `slots` once
    every part has arrived (a failed one is reported, and nothing is written)."""
    if not rows:
        return
    shape = (num_layers, 2, num_tokens, pool.num_kv_heads, pool.head_dim)
    whole = len(rows) == 1 and rows[0][2] == 0 and rows[0][3] == pool.num_kv_heads
    buf = None if whole else torch.empty(shape, dtype=pool.dtype, device=pool.device)
    ok = True
    for e, channel, a, b in rows:
        part = channel.staging((*shape[:3], b - a, shape[4]), pool.dtype, pool.device) if channel else None
        try:
            if channel is None:
                raise PeerUnavailable("the channel never joined")
            channel.recv(part)
        except Exception as err:  # the channel is closed by its failure; the group goes on
            logger.warning("per-rank KV channel (row %d): %s", e, err)
            _fill(report, e, False)
            ok = False
            continue
        _fill(report, e, True, checksum(part, algo), part.numel() * part.element_size())
        if whole:
            buf = part
        else:
            buf[:, :, :, a:b].copy_(part)
    if ok:
        for i in range(num_layers):
            PagedKVCache.write_layer(pool, layer + i, slots, buf[i])  # this rank's pool, never a scatter


class PendingSends:
    """Sends posted on channels and not yet known to be over: their tensors stay alive until then, and one still
    running after the channel's timeout closes its channel."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._items: list[tuple[TorchChannel, object, torch.Tensor, float]] = []
        self._lock = threading.Lock()  # a sender without other ranks posts from several threads at once

    def post(self, channel: TorchChannel, part: torch.Tensor) -> None:
        work = channel.post_send(part)
        with self._lock:
            self._items.append((channel, work, part, time.monotonic() + self.timeout_s))

    def prune(self) -> None:
        """Forget the sends that are over (and close the channels of those that failed or are late)."""
        with self._lock:
            self._items = [item for item in self._items if item[0].send_done(item[1], item[3]) is None]


def send_rows(rows: list[tuple[int, TorchChannel | None, torch.Tensor | None]], report: torch.Tensor, algo: int,
              pending: PendingSends, corrupt: int = -1) -> None:
    """Checksum this rank's parts of a chunk (`(row, channel, part)` each; `corrupt`: the row whose part gets a
    flipped byte after its checksum, fault injection) and post their sends."""
    pending.prune()
    for e, channel, part in rows:
        try:
            if channel is None or part is None:
                raise PeerUnavailable("the channel never joined, or the rank staged no KV for it")
            crc = checksum(part, algo)
            if e == corrupt:
                part = fi.corrupt_tensor(part)
            pending.post(channel, part)
            _fill(report, e, True, crc, part.numel() * part.element_size())
        except Exception as err:
            logger.warning("per-rank KV channel (row %d): %s", e, err)
            _fill(report, e, False)


def join_channel(store_host: str, port: int, channel_id: str, backend: str, timeout_s: float, role: int,
                 bind_host: str, config: KVTransferConfig | None = None) -> TorchChannel:
    """One end (`role`) of channel `channel_id`, whose receiving end listens at `store_host:port`: a two-rank torch
    group (blocks until the other end joins), or with the `grpc` backend a parts sender or receiver."""
    if backend == rank_grpc.BACKEND:  # the receiving rank's endpoint is at store_host:port
        cfg = config or KVTransferConfig(channel_timeout_s=timeout_s)
        if role == SENDER_RANK:
            return rank_grpc.PartSender(cfg, channel_id, store_host, port)
        return rank_grpc.PartReceiver(rank_grpc.PartEndpoint.shared(cfg), channel_id, timeout_s)
    store = dist.TCPStore(store_host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))
    return TorchChannel(channel_id, create_group(store, channel_id, role, backend, timeout_s, bind_host),
                        backend, timeout_s)


class RankChannels:
    """A rank's (> 0) ends of the per-rank KV channels: the handler of `EXTENSION` ops on its `TPRank`."""

    def __init__(self, timeout_s: float = 60.0, config: KVTransferConfig | None = None):
        self.config = config  # the KV plane's (auth, TLS, limits), for channels over gRPC
        self.channels: dict[int, concurrent.futures.Future[TorchChannel]] = {}
        self.pending = PendingSends(timeout_s)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-rank-join",
                                                               initializer=serial_torch_thread)
        self.timeout_s = timeout_s

    @classmethod
    def register(cls, rank, config: KVTransferConfig | None = None) -> RankChannels:
        """Handle `EXTENSION` ops on `rank` (an `engine.parallel.TPRank`), as `config` says (the worker's
        `kv_transfer`: `channel_timeout_s`, how long an op waits for a channel to be joined; auth, TLS and
        limits of the rank's gRPC endpoint)."""
        config = config or KVTransferConfig()
        handler = cls(config.channel_timeout_s, config)
        rank.extensions[EXTENSION] = handler
        return handler

    def _channel(self, key: int) -> TorchChannel | None:
        fut = self.channels.get(key)
        try:
            return fut.result(self.timeout_s) if fut is not None else None
        except Exception as e:
            logger.warning("per-rank KV channel never joined: %s", e)
            return None

    def __call__(self, rank, items: list) -> None:
        op, me = items[0], rank.tp.rank
        if op == OPEN:
            _, key, target, store_host, port, channel_id, backend, timeout_ms, role, bind_host = items
            if target == me:
                self.channels[key] = self._executor.submit(
                    join_channel, _str(store_host), port, _str(channel_id), _str(backend), timeout_ms / 1000, role,
                    _str(bind_host), self.config)
        elif op == PORTS:
            rank.tp.gather(torch.tensor([rank_grpc.PartEndpoint.shared(self.config or KVTransferConfig()).port]))
        elif op == CLOSE:
            self.pending.prune()
            for key in items[1].tolist():
                fut = self.channels.pop(key, None)
                if fut is not None:
                    fut.add_done_callback(lambda f: f.exception() is None and f.result().close())
        else:
            rows = [(e, *row) for e, row in enumerate(items[-2].tolist())]
            report = _report(len(rows))
            if op == RECV:
                _, layer, nl, n, slots, _, algo = items
                mine = [(e, self._channel(key), a, b) for e, src, dst, key, a, b in rows if dst == me]
                receive_rows(rank.kv, mine, report, layer, nl, n, slots, algo)
            elif op == SEND:
                _, ship_id, layer, nl, start, n, _, algo = items
                staged = rank.staged.get(ship_id, {})
                mine = [(e, self._channel(key), _part(staged, layer, nl, start, n, a, b))
                        for e, src, dst, key, a, b in rows if src == me]
                send_rows(mine, report, algo, self.pending)
            rank.tp.gather(report)


def _part(staged: dict[int, torch.Tensor], layer: int, num_layers: int, start: int, n: int, a: int,
          b: int) -> torch.Tensor | None:
    """Heads [a, b) of tokens [start, start + n) of layers [layer, layer + num_layers) of a rank's staged KV."""
    if any(i not in staged for i in range(layer, layer + num_layers)):
        return None
    return torch.stack([staged[i][:, start:start + n, a:b] for i in range(layer, layer + num_layers)]).contiguous()


class RankKeys:
    """A worker's rank 0 side: its other ranks' channel ends (by key), and the ops that drive them. `kv`: rank 0's
    `ShardedKVCache`, or a plain pool (no other ranks: every row is rank 0's)."""

    def __init__(self, kv, timeout_s: float = 60.0):
        self.kv = kv
        self.tp = getattr(kv, "tp", None)
        self.pending = PendingSends(timeout_s)  # rank 0's sends
        self._keys = itertools.count(1)  # next() is atomic: channels to different peers open on several threads
        self.keys: dict[str, tuple[int, int]] = {}  # channel id -> (rank, key)

    def open(self, rank: int, channel_id: str, store_host: str, port: int, backend: str, timeout_s: float,
             role: int, bind_host: str) -> int:
        """Rank `rank` joins channel `channel_id` as `role` (`channel.SENDER_RANK`/`RECEIVER_RANK`); its key."""
        key = next(self._keys)
        self.keys[channel_id] = (rank, key)
        self.kv.extension(EXTENSION, [OPEN, key, rank, _text(store_host), port, _text(channel_id), _text(backend),
                                      int(timeout_s * 1000), role, _text(bind_host)], lambda: None)
        return key

    def ports(self, local: int) -> list[int]:
        """Every rank's parts endpoint port (`rank_grpc`; rank 0's is `local`), starting those not yet running."""
        if self.tp is None:
            return [local]
        mine = torch.tensor([local])
        return [int(p[0]) for p in self.kv.extension(EXTENSION, [PORTS], lambda: self.tp.gather(mine))]

    def close(self, channel_ids: list[str]) -> None:
        self.pending.prune()
        keys = [self.keys.pop(c)[1] for c in channel_ids if c in self.keys]
        if keys and self.tp is not None:
            self.kv.extension(EXTENSION, [CLOSE, torch.tensor(keys, dtype=torch.long)], lambda: None)

    def _run(self, items: list, local, rows: list[Row], owner: str) -> list[list[int]]:
        """Op `items` on the other ranks and `local(report)` here; each row's report from the rank that owns it
        (its `owner`: "src" or "dst")."""
        report = _report(len(rows))
        if self.tp is None:
            local(report)
            return report.tolist()

        def here():
            local(report)
            return self.tp.gather(report)

        got = self.kv.extension(EXTENSION, items, here)
        return [got[getattr(r, owner)][e].tolist() for e, r in enumerate(rows)]

    # -- the receiving (decode) side --------------------------------------------------------------------------
    def receive(self, rows: list[Row], layer: int, num_layers: int, num_tokens: int, slots: torch.Tensor, algo: int,
                want: list[int], transport: str) -> None:
        """One chunk, every rank its rows; `ChecksumMismatch` or `PeerUnavailable` unless every rank received
        exactly what the sender checksummed (`want`, in row order)."""
        mine = [(e, r.channel, r.a, r.b) for e, r in enumerate(rows) if r.dst == 0]
        items = [RECV, layer, num_layers, num_tokens, slots, table(rows), algo]
        pool = self.kv

        def local(report):
            receive_rows(pool, mine, report, layer, num_layers, num_tokens, slots, algo)

        for e, (r, (ok, lo, hi, nbytes)) in enumerate(zip(rows, self._run(items, local, rows, "dst"), strict=True)):
            if not ok:
                raise PeerUnavailable(f"the KV channel from sender rank {r.src} to rank {r.dst} failed (layer {layer})")
            metrics.RANK_PAIR_BYTES.labels(transport, "per_rank", str(r.src), str(r.dst)).inc(nbytes)
            if (lo | hi << 63) != want[e]:
                raise ChecksumMismatch(f"layer {layer}: the part from sender rank {r.src} to rank {r.dst} fails its "
                                       f"checksum")

    # -- the sending (prefill) side ---------------------------------------------------------------------------
    def send(self, rows: list[Row], own: list[tuple[int, torch.Tensor]], ship_id: int, layer: int, num_layers: int,
             start: int, num_tokens: int, algo: int, corrupt: int = -1) -> list[int]:
        """Post every row's send (rank 0's `own` parts, `(row, part)`; the other ranks' cut from what they staged for
        shipment `ship_id`, tokens [start, start + num_tokens)) and return their checksums, in row order, without
        waiting for the bytes to go. `corrupt`: a row of rank 0's whose part gets a flipped byte after its checksum."""
        items = [SEND, ship_id, layer, num_layers, start, num_tokens, table(rows), algo]
        parts = dict(own)
        mine = [(e, r.channel, parts.get(e)) for e, r in enumerate(rows) if r.src == 0]
        out = []
        for r, (ok, lo, hi, _) in zip(rows, self._run(items, lambda rep: send_rows(mine, rep, algo, self.pending,
                                                                                    corrupt), rows, "src"),
                                      strict=True):
            if not ok:
                raise PeerUnavailable(f"sender rank {r.src} could not send its KV for layer {layer} to rank {r.dst}")
            out.append(lo | hi << 63)
        return out

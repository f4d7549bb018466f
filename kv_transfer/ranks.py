"""Per-rank KV channels on a tensor-parallel decode worker (the `nccl` transport: gloo on CPU, NCCL on CUDA).

Without them, a TP decode worker's rank 0 receives every KV head and scatters each rank its own over the
worker's group (`engine.parallel.ShardedKVCache.write_layer`). With them, the sender opens one channel per
receiver rank (OpenChannel with `rank`) and sends each rank only the heads that rank holds (its `KVLayout`
range): bytes go peer -> rank with no hop through rank 0.

Rank 0 keeps all the bookkeeping: the reservation, the chunk checks, the slots. Every rank, rank 0 included,
receives through one op of the worker's group (`ShardedKVCache.extension`, handled on ranks > 0 by
`RankChannels`), so that the receives run in step with the forward passes that read the pool:

  OPEN   rank r joins a channel's two-rank group (on a thread of its own: joining waits for the sender)
  RECV   every rank receives its part of one chunk on its channel, writes it into its pool at the slots
         rank 0 names, and the ranks' checksums are gathered to rank 0, which compares them with the
         sender's (`LayerChunk.rank_checksums`) and fails the push on any difference or failed receive
  CLOSE  the push failed midway: the ranks' ends are closed (their state is unknown)

A receive that fails on a rank breaks only that channel (the rank reports it in the gather); the group itself
survives. Writes land in the reserved blocks under the group's lock, before rank 0 hands the blocks to anyone:
a bad chunk releases the reservation, so blocks it wrote are never read.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging

import torch
import torch.distributed as dist

from pdserve.engine.kv_cache import PagedKVCache
from pdserve.kv_transfer import metrics
from pdserve.kv_transfer.channel import RECEIVER_RANK, TorchChannel, create_group
from pdserve.kv_transfer.errors import ChecksumMismatch, PeerUnavailable
from pdserve.kv_transfer.protocol import checksum

logger = logging.getLogger(__name__)

EXTENSION = 1  # the id these ops are registered under (`TPRank.extensions`)
OPEN, RECV, CLOSE = range(3)
_MASK63 = (1 << 63) - 1


def _text(s: str) -> torch.Tensor:
    return torch.tensor(list(s.encode()), dtype=torch.uint8)


def _str(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode()


def receive_part(pool: PagedKVCache, channel: TorchChannel, layer: int, num_layers: int, num_tokens: int,
                 slots: torch.Tensor, algo: int) -> tuple[int, int, int]:
    """This rank's part of one chunk from `channel` into `pool` (its own heads) at `slots`: (ok, checksum, bytes)."""
    shape = (num_layers, 2, num_tokens, pool.num_kv_heads, pool.head_dim)
    buf = channel.staging(shape, pool.dtype, pool.device)
    try:
        channel.recv(buf)
    except Exception as e:  # the channel is closed by its failure; the group goes on
        logger.warning("per-rank KV channel %s: %s", channel.channel_id, e)
        return 0, 0, 0
    for i in range(num_layers):
        PagedKVCache.write_layer(pool, layer + i, slots, buf[i])  # this rank's pool, never a scatter
    return 1, checksum(buf, algo), buf.numel() * buf.element_size()


def _report(tp, ok: int, crc: int, nbytes: int):
    """Gather (ok, checksum, bytes) to rank 0 (None elsewhere); fixed64 checksums travel as two int64 halves."""
    return tp.gather(torch.tensor([ok, crc & _MASK63, crc >> 63, nbytes], dtype=torch.long))


class RankChannels:
    """A rank's (> 0) ends of the per-rank KV channels: the handler of `EXTENSION` ops on its `TPRank`."""

    def __init__(self, timeout_s: float = 60.0):
        self.channels: dict[int, concurrent.futures.Future[TorchChannel]] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-rank-join")
        self.timeout_s = timeout_s

    @classmethod
    def register(cls, rank, timeout_s: float = 60.0) -> RankChannels:
        """Handle `EXTENSION` ops on `rank` (an `engine.parallel.TPRank`); `timeout_s`: how long a receive waits
        for its channel to be joined (`KVTransferConfig.channel_timeout_s`)."""
        handler = cls(timeout_s)
        rank.extensions[EXTENSION] = handler
        return handler

    def __call__(self, rank, items: list) -> None:
        op = items[0]
        if op == OPEN:
            _, key, target, host, port, channel_id, backend, timeout_ms = items
            if target == rank.tp.rank:
                self.channels[key] = self._executor.submit(
                    _join, _str(host), port, _str(channel_id), _str(backend), timeout_ms / 1000)
        elif op == RECV:
            _, layer, num_layers, num_tokens, slots, keys, algo = items
            fut = self.channels.get(int(keys[rank.tp.rank]))
            try:
                channel = fut.result(self.timeout_s) if fut is not None else None
            except Exception as e:
                logger.warning("per-rank KV channel never joined: %s", e)
                channel = None
            got = (0, 0, 0) if channel is None else receive_part(rank.kv, channel, layer, num_layers, num_tokens,
                                                                 slots, algo)
            _report(rank.tp, *got)
        elif op == CLOSE:
            for key in items[1].tolist():
                fut = self.channels.pop(key, None)
                if fut is not None:
                    fut.add_done_callback(lambda f: f.exception() is None and f.result().close())


def _join(host: str, port: int, channel_id: str, backend: str, timeout_s: float) -> TorchChannel:
    store = dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))
    return TorchChannel(channel_id, create_group(store, channel_id, RECEIVER_RANK, backend, timeout_s, host),
                        backend, timeout_s)


class RankKeys:
    """Rank 0's side: which key names each rank's end of each channel, and the ops that drive them."""

    def __init__(self, kv):
        self.kv = kv  # rank 0's `ShardedKVCache`
        self._next = 1
        self.keys: dict[str, tuple[int, int]] = {}  # channel id -> (rank, key)

    def open(self, rank: int, channel_id: str, host: str, port: int, backend: str, timeout_s: float) -> None:
        key, self._next = self._next, self._next + 1
        self.keys[channel_id] = (rank, key)
        self.kv.extension(EXTENSION, [OPEN, key, rank, _text(host), port, _text(channel_id), _text(backend),
                                      int(timeout_s * 1000)], lambda: None)

    def receive(self, own: TorchChannel, channel_ids: list[str], layer: int, num_layers: int, num_tokens: int,
                slots: torch.Tensor, algo: int, want: list[int], transport: str) -> None:
        """One chunk, every rank its part (rank 0's on `own`); `ChecksumMismatch` or `PeerUnavailable` unless
        every rank received exactly what the sender checksummed (`want`, rank order)."""
        keys = [0] + [self.keys.get(c, (0, 0))[1] for c in channel_ids[1:]]

        def local():
            return _report(self.kv.tp, *receive_part(self.kv, own, layer, num_layers, num_tokens, slots, algo))

        got = self.kv.extension(EXTENSION, [RECV, layer, num_layers, num_tokens, slots,
                                            torch.tensor(keys, dtype=torch.long), algo], local)
        for r, t in enumerate(got):
            ok, lo, hi, nbytes = t.tolist()
            if not ok:
                raise PeerUnavailable(f"rank {r}'s KV channel failed (layer {layer})")
            metrics.RANK_PAIR_BYTES.labels(transport, "per_rank", "0", str(r)).inc(nbytes)
            if (lo | hi << 63) != want[r]:
                raise ChecksumMismatch(f"layer {layer}: rank {r}'s part fails its checksum")

    def close(self, channel_ids: list[str]) -> None:
        keys = [self.keys.pop(c)[1] for c in channel_ids if c in self.keys]
        if keys:
            self.kv.extension(EXTENSION, [CLOSE, torch.tensor(keys, dtype=torch.long)], lambda: None)

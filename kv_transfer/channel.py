"""The `nccl` transport's data plane: a torch.distributed process group per
(prefill worker, decode worker) pair, NCCL on CUDA and gloo on CPU through the
same code. Control messages (and each chunk's size and checksum) go over gRPC;
only raw tensor bytes cross the channel, so nothing on it is ever deserialised
into objects.

Groups are created lazily (the first push between a pair), rendezvous through
a TCPStore the decode worker hosts (on `kv_transfer.host` only), and are bounded per worker
(`max_channels`, least recently used idle ones closed first) because each
NCCL pair costs tens of MB. Every send/recv has a deadline; one that misses it
or fails tears its channel down (a half-finished send/recv leaves a group in an
unknown state), and the next push opens a fresh one.

Note: the TCPStore and gloo sockets are not authenticated themselves; bytes
arriving on them are only ever written into the pool after their checksum,
sent over the authenticated gRPC stream, matches.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
from collections import OrderedDict

import torch
import torch.distributed as dist

from pdserve.kv_transfer.errors import PeerUnavailable, SharedDevice, TransferTimeout

logger = logging.getLogger(__name__)

SENDER_RANK, RECEIVER_RANK = 0, 1


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


# NCCL's watchdog, by default (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, "SkipCleanUp"), tears the whole
# process down when an operation fails or times out: a peer dying mid-transfer would take the surviving
# worker with it. 2 ("CleanUpOnly") aborts the communicator instead, and the failed work's wait() raises,
# so the failure costs one channel (TorchChannel tears it down). ProcessGroupNCCL reads the variable in
# its constructor and has no option for it, so it is set around that call only (`nccl_error_handling`).
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
_env_lock = threading.Lock()


@contextlib.contextmanager
def nccl_error_handling():
    """NCCL_ENV in the environment while a ProcessGroupNCCL is built, the previous values after."""
    with _env_lock:
        saved = {k: os.environ.get(k) for k in NCCL_ENV}
        os.environ.update(NCCL_ENV)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def device_identity(device: torch.device) -> str:
    """What tells CUDA devices apart across processes and hosts: the GPU's UUID ("" off CUDA, where a
    process group's ranks may share the device)."""
    if torch.device(device).type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


def check_distinct_devices(sender: str, receiver: str) -> None:
    """`SharedDevice` if both ends of a channel would be one CUDA device (identities as `device_identity`)."""
    if sender and sender == receiver:
        raise SharedDevice(f"both ends of the channel are on CUDA device {sender}: NCCL cannot pair two ranks "
                           "on one device; give the prefill and decode workers different GPUs, or use the grpc "
                           "transport")


def create_group(store: dist.Store, channel_id: str, rank: int, backend: str, timeout_s: float, host: str):
    """A two-rank process group under `channel_id`'s prefix of `store` (blocks until both ranks join)."""
    prefixed = dist.PrefixStore(f"pdserve/{channel_id}/", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(prefixed, rank, 2, opts)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        with nccl_error_handling():
            return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
    raise ValueError(f"unknown backend {backend!r}")


class TorchChannel:
    """One pair's process group. One transfer at a time (`lock`): sends and receives
    are matched by order, so transfers must not interleave on a channel."""

    def __init__(self, channel_id: str, group, backend: str, timeout_s: float):
        self.channel_id = channel_id
        self.group = group
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.lock = threading.Lock()
        self._guard = threading.Lock()
        self.last_used = time.monotonic()
        self.broken = False
        self._staging: torch.Tensor | None = None
        self._in_flight = 0  # sends/recvs running on worker threads
        self._retired = False  # close once they are done

    def staging(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A receive buffer, reused across chunks (one transfer at a time uses a channel, and a
        chunk is written into the pool before the next one is received)."""
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if self._staging is None or self._staging.numel() < nbytes or self._staging.device != torch.device(device):
            self._staging = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self._staging[:nbytes].view(dtype).view(shape)

    def send(self, t: torch.Tensor) -> None:
        self._run(lambda: self.group.send([t], RECEIVER_RANK, 0), "send")

    def post_send(self, t: torch.Tensor):
        """Start sending `t` and return at once (the bytes go as the receiver takes them); `t` must live until
        `send_done` says the send is over."""
        self._begin()
        try:
            return self.group.send([t], RECEIVER_RANK, 0)
        except Exception as e:
            self._done(close=True)
            raise PeerUnavailable(f"channel {self.channel_id}: send failed: {e}") from e

    def send_done(self, work, deadline: float) -> bool | None:
        """A posted send (`post_send`): None while it runs, True once done; False if it failed or is still running
        at `deadline` (`time.monotonic()`), which closes the channel (its state is unknown)."""
        if not work.is_completed():
            if time.monotonic() < deadline:
                return None
            self._done(close=True)
            return False
        try:
            work.wait(self.timeout)
        except Exception:
            self._done(close=True)
            return False
        self._done(close=False)
        self.last_used = time.monotonic()
        return True

    def recv(self, t: torch.Tensor) -> None:
        self._run(lambda: self.group.recv([t], SENDER_RANK, 0), "recv")

    def _begin(self) -> None:
        """An operation starts on this channel: refused once it is closed; counted until `_done`."""
        with self._guard:
            if self.broken or self._retired:
                raise PeerUnavailable(f"channel {self.channel_id} is closed")
            self._in_flight += 1
        self.last_used = time.monotonic()

    def _run(self, op, what: str) -> None:
        self._begin()
        try:
            op().wait(self.timeout)
        except Exception as e:
            self._done(close=True)
            msg = f"channel {self.channel_id}: {what} failed: {e}"
            raise (TransferTimeout(msg) if "imed out" in str(e) else PeerUnavailable(msg)) from e
        self._done(close=False)
        self.last_used = time.monotonic()

    def _done(self, close: bool) -> None:
        with self._guard:
            self._in_flight -= 1
            close = close or (self._retired and not self._in_flight)
        if close:
            self.close()

    def retire(self, now: bool) -> None:
        """A transfer on the channel failed midway, so its state is unknown: it takes no more, and is
        closed as soon as no send/recv runs on it (a group is not closed under a running operation).
        `now`: the peer is gone, close it at once; else the peer is told the failure on the control
        stream and may still be sending: closing then would turn that typed failure into a lost
        connection on its side, so the channel waits for its table's next sweep (`ChannelTable`)."""
        with self._guard:
            self._retired = True
            idle = not self._in_flight
        if idle and now:
            self.close()

    @property
    def closed(self) -> bool:
        """Closed, or to be closed once its running operation returns: unusable either way."""
        return self.broken or self._retired

    def close(self) -> None:
        if self.broken:
            return
        self.broken = True
        for name in ("abort", "shutdown"):
            fn = getattr(self.group, name, None)
            if fn is not None:
                try:
                    fn()
                    break
                except Exception:  # already torn down by the peer's death: nothing left to free
                    logger.debug("closing channel %s: %s failed", self.channel_id, name, exc_info=True)
        self.group = None


class ChannelTable:
    """At most `max_channels` channels, least recently used idle ones evicted first."""

    def __init__(self, max_channels: int):
        self.max_channels = max_channels
        self._channels: OrderedDict[str, TorchChannel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> TorchChannel | None:
        with self._lock:
            ch = self._channels.get(key)
            if ch is not None and ch.closed:
                del self._channels[key]
                ch.close()
                return None
            if ch is not None:
                self._channels.move_to_end(key)
            return ch

    def has(self, key: str) -> bool:
        """`key` names an open channel here (its recency unchanged)."""
        with self._lock:
            ch = self._channels.get(key)
            return ch is not None and not ch.closed

    def make_room(self) -> bool:
        """Evict idle channels until one more fits; False if every channel is busy."""
        with self._lock:
            for key in [k for k, c in self._channels.items() if c.closed]:
                self._channels.pop(key).close()
            while len(self._channels) >= self.max_channels:
                idle = next((k for k, c in self._channels.items() if not c.lock.locked()), None)
                if idle is None:
                    return False
                self._channels.pop(idle).close()
            return True

    def put(self, key: str, ch: TorchChannel) -> None:
        with self._lock:
            self._channels[key] = ch

    def pop(self, key: str) -> None:
        with self._lock:
            ch = self._channels.pop(key, None)
        if ch is not None:
            ch.close()

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for c in self._channels.values() if not c.closed)

    def close_all(self) -> None:
        with self._lock:
            chans, self._channels = list(self._channels.values()), OrderedDict()
        for c in chans:
            c.close()

"""KV copies that run beside the forward pass instead of inside it: a transfer stream, events, pinned staging.

On CUDA every kernel and copy queues on a stream, and the engine computes on the device's default
stream. A KV copy queued there waits for every kernel queued before it (later layers included), and
a host read of its result (`.cpu()`, `int()`) waits for all of them. So the KV plane copies on its
own stream, one per device and process (`transfer_stream`):

  * sending: after layer i's KV is written, the engine records an event on the compute stream
    (`record_compute`); the transfer stream waits for that event (on the device: the host does not
    wait), gathers the layer's blocks and copies them to pinned host memory (`to_host`), then records
    its own event. The sender waits for that event on a worker thread, once per layer, and reads
    the staged bytes. The compute stream waits (on the device) for the transfer stream's last copy
    before its next step can reuse the blocks (`compute_waits`).
  * receiving: a chunk's bytes go through pinned staging to the device and into the reserved
    blocks on the transfer stream (`to_device`); the blocks are handed to the decode engine, or
    released, only once that copy's event has completed.
  * swapping: copies between the device pool and the CPU swap pool go through pinned staging, and
    a swap-out is complete (its source blocks reusable) only after its event (`engine.kv_cache`).

Staging buffers come from torch's pinned-memory allocator, which caches freed buffers (no
`cudaHostAlloc` per chunk) and keeps each one alive until the copies queued on it have finished.

On CPU every operation has finished when it returns: events are complete from the start (`DONE`),
there is no stream to switch to, and staging is the tensor itself, so the same code runs unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


class CopyEvent:
    """A point in a stream's queued work (a `torch.cuda.Event`), or nothing at all on CPU (`DONE`)."""

    __slots__ = ("event",)

    def __init__(self, event: torch.cuda.Event | None = None):
        self.event = event

    @property
    def done(self) -> bool:
        """Whether everything queued before the event has finished (never blocks)."""
        return self.event is None or self.event.query()

    def synchronize(self) -> None:
        """Block the calling thread until it is done (the one host wait a copy costs)."""
        if self.event is not None:
            self.event.synchronize()


DONE = CopyEvent()  # complete from the start: what every event is on CPU


class TransferStream:
    """The KV plane's copy stream on `device` (see the module docstring); on CPU all of it is a no-op."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def is_async(self) -> bool:
        """Whether copies really run beside the compute stream (CUDA)."""
        return self.stream is not None

    def record_compute(self) -> CopyEvent:
        """An event after the work the calling thread has queued on its current (compute) stream."""
        if self.stream is None:
            return DONE
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return CopyEvent(event)

    def record(self) -> CopyEvent:
        """An event after the work queued on the transfer stream so far."""
        if self.stream is None:
            return DONE
        event = torch.cuda.Event()
        event.record(self.stream)
        return CopyEvent(event)

    @contextlib.contextmanager
    def use(self, after: CopyEvent = DONE) -> Iterator[None]:
        """Queue the block's device work on the transfer stream, behind `after` (the transfer stream waits
        for it on the device; the host does not)."""
        if self.stream is None:
            yield
            return
        if after.event is not None:
            self.stream.wait_event(after.event)
        with torch.cuda.stream(self.stream):
            yield

    def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` with the transfer stream current (stream choice is per thread: for worker threads)."""
        with self.use():
            return fn(*args)

    def hold(self, *tensors: torch.Tensor) -> None:
        """Tensors made on another stream and used on this one: the allocator must not reuse their memory
        before this stream's work on them is done."""
        if self.stream is not None:
            for t in tensors:
                t.record_stream(self.stream)

    def compute_waits(self, event: CopyEvent) -> None:
        """The calling thread's current (compute) stream waits, on the device, for `event`: work it queues
        later (a step writing into blocks a copy still reads) runs after it."""
        if event.event is not None:
            torch.cuda.current_stream(self.device).wait_event(event.event)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of device tensor `t` in pinned memory, queued on the current stream (call it inside
        `use`): valid once an event recorded after it is done. On CPU, `t` itself."""
        if t.device.type == "cpu":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on this stream's device. From the host it goes through a pinned staging buffer (a host copy,
        then the upload queued on the current stream: call it inside `use`), so `t` may be dropped as soon
        as this returns. On CPU, `t` itself."""
        if self.stream is None or t.device == self.device:
            return t
        if t.device.type == "cpu" and not t.is_pinned():
            staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            staged.copy_(t)
            t = staged
        return t.to(self.device, non_blocking=True)


_streams: dict[torch.device, TransferStream] = {}
_streams_lock = threading.Lock()


def transfer_stream(device: torch.device | str) -> TransferStream:
    """The process's transfer stream on `device` (one per device: the prefill engine's copies, the KV
    sender's and the receiver's all queue on it, so they are ordered among themselves)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _streams_lock:
        s = _streams.get(device)
        if s is None:
            s = _streams[device] = TransferStream(device)
        return s


__all__ = ["DONE", "CopyEvent", "TransferStream", "transfer_stream"]

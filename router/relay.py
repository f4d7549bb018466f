"""The token relay from one decode worker to this router: one Ray stream per (router, decode worker).

A decode worker's `subscribe` stream carries a `StepBatch` per engine step with every new token of
this router's requests on that worker; `StepRelay` reads it on the router's event loop and hands
each `StepItem` to its request's queue. So the router pays one Ray message per engine step, not one
per token of every stream (each costs ~0.5 ms of router CPU, on the cores the engine uses too).

A request registers its `Inbox` before the worker starts it (no item can arrive unclaimed) and
unregisters when it ends. When the stream breaks (the worker died, or was killed as stalled) or ends
(the worker shut down), every registered request gets the error as its next item and the relay is
dead; the router opens a new one for the worker's next request.

Per token, the router's event loop does little here: an `Inbox` is a deque and, while its request waits,
one future (an asyncio.Queue costs several calls per item more). The deadline on a request's wait for
its next item (`stream_timeout_s`: a frozen or cut-off worker) is kept by one watchdog per relay that
looks at the waiting inboxes every so often, not by a timer armed and cancelled for every token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from pdserve.engine.messages import StepBatch


class _ReadyGets(logging.Filter):
    """Ray warns (once per process) at any `ray.get` in an async actor, lest it block the event loop; the
    relay's gets never wait (`timeout=0`, on refs already here), so that warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using blocking ray.get inside async actor")


def _quiet_ready_gets() -> None:
    log = logging.getLogger("ray._private.worker")
    if not any(isinstance(f, _ReadyGets) for f in log.filters):
        log.addFilter(_ReadyGets())


class RelayClosed(ConnectionError):
    """A decode worker's stream ended while requests still waited on it (the worker shut down)."""


class Inbox:
    """One request's items (`StepItem`s, or the exception that ended its relay), in arrival order. The
    consumer pops `items` while there are any, else awaits `wait()`."""

    __slots__ = ("items", "_loop", "_waiter", "_since")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.items: deque = deque()
        self._loop = loop
        self._waiter: asyncio.Future | None = None
        self._since = 0.0

    def put(self, item) -> None:
        self.items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # else: its consumer was cancelled meanwhile
                waiter.set_result(None)

    def wait(self) -> asyncio.Future:
        """Done when an item is there; fails with TimeoutError when none came within the relay's timeout."""
        self._waiter = waiter = self._loop.create_future()
        self._since = self._loop.time()
        return waiter

    def expire(self, now: float, timeout: float) -> None:
        waiter = self._waiter
        if waiter is not None and now - self._since > timeout:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(TimeoutError())


class StepRelay:
    def __init__(self, handle, worker_id: str, subscriber: str, timeout: float):
        """`timeout`: how long a request may wait for its next item (`stream_timeout_s`)."""
        self.handle = handle
        self.worker_id = worker_id
        self.subscriber = subscriber
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._queues: dict[str, Inbox] = {}
        self.error: BaseException | None = None  # set once the stream broke or ended: the relay is dead
        stream = handle.subscribe.options(num_returns="streaming").remote(subscriber)
        self._stream = stream
        self._task = self._loop.create_task(self._pump(stream), name=f"relay-{worker_id}")
        self._watchdog = self._loop.create_task(self._watch(), name=f"relay-watchdog-{worker_id}")

    @property
    def alive(self) -> bool:
        return self.error is None

    def register(self, request_id: str) -> Inbox:
        """The inbox `request_id`'s items (or the relay's error) will arrive in."""
        q = Inbox(self._loop)
        if self.error is not None:
            q.put(self.error)
        self._queues[request_id] = q
        return q

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _pump(self, stream) -> None:
        error: BaseException = RelayClosed(f"{self.worker_id}: its token stream ended")
        try:
            import ray
            from ray.exceptions import GetTimeoutError

            _quiet_ready_gets()
            queues = self._queues
            async for ref in stream:
                # Ray's generator hands out a ref once its value is here (it awaited it, unread), so a get that
                # does not wait reads it without a second deserialization and a second hop through Ray's thread
                # onto this loop (what `await ref` costs); `await` only if it is somehow not here.
                try:
                    batch: StepBatch = ray.get(ref, timeout=0)
                except GetTimeoutError:
                    batch = await ref
                for rid, item in batch.items:
                    q = queues.get(rid)
                    if q is not None:  # else: the request already ended here (aborted, migrated)
                        q.put(item)
        except asyncio.CancelledError:
            error = RelayClosed(f"{self.worker_id}: the router closed its token stream")
            raise
        except Exception as e:  # RayActorError: the worker died (or was killed as stalled)
            error = e
        finally:
            self.error = error
            self._watchdog.cancel()
            for q in self._queues.values():
                q.put(error)

    async def _watch(self) -> None:
        """Fail the waits that have lasted longer than `timeout` (checked a few times per timeout)."""
        period = min(1.0, self.timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = self._loop.time()
            for q in list(self._queues.values()):
                q.expire(now, self.timeout)

    def close(self) -> None:
        self._task.cancel()
        self._watchdog.cancel()
        import ray

        with contextlib.suppress(Exception):
            ray.cancel(self._stream)


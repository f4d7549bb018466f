"""The token relay from one decode worker to this router: one Ray stream per (router, decode worker).

A decode worker's `subscribe` stream carries a `StepBatch` per engine step with every new token of
this router's requests on that worker; `StepRelay` reads it on the router's event loop and hands
each `StepItem` to its request's queue. So the router pays one Ray message per engine step, not one
per token of every stream (each costs ~0.5 ms of router CPU, on the cores the engine uses too).

A request registers its queue before the worker starts it (no item can arrive unclaimed) and
unregisters when it ends. When the stream breaks (the worker died, or was killed as stalled) or ends
(the worker shut down), every registered request gets the error as its next item and the relay is
dead; the router opens a new one for the worker's next request.
"""

from __future__ import annotations

import asyncio
import contextlib

from pdserve.engine.messages import StepBatch


class RelayClosed(ConnectionError):
    """A decode worker's stream ended while requests still waited on it (the worker shut down)."""


class StepRelay:
    def __init__(self, handle, worker_id: str, subscriber: str):
        self.handle = handle
        self.worker_id = worker_id
        self.subscriber = subscriber
        self._queues: dict[str, asyncio.Queue] = {}
        self.error: BaseException | None = None  # set once the stream broke or ended: the relay is dead
        stream = handle.subscribe.options(num_returns="streaming").remote(subscriber)
        self._stream = stream
        self._task = asyncio.get_running_loop().create_task(self._pump(stream), name=f"relay-{worker_id}")

    @property
    def alive(self) -> bool:
        return self.error is None

    def register(self, request_id: str) -> asyncio.Queue:
        """The queue `request_id`'s items (or the relay's error) will arrive on."""
        q: asyncio.Queue = asyncio.Queue()
        if self.error is not None:
            q.put_nowait(self.error)
        self._queues[request_id] = q
        return q

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _pump(self, stream) -> None:
        error: BaseException = RelayClosed(f"{self.worker_id}: its token stream ended")
        try:
            async for ref in stream:
                batch: StepBatch = await ref
                for rid, item in batch.items:
                    q = self._queues.get(rid)
                    if q is not None:  # else: the request already ended here (aborted, migrated)
                        q.put_nowait(item)
        except asyncio.CancelledError:
            error = RelayClosed(f"{self.worker_id}: the router closed its token stream")
            raise
        except Exception as e:  # RayActorError: the worker died (or was killed as stalled)
            error = e
        finally:
            self.error = error
            for q in self._queues.values():
                q.put_nowait(error)

    def close(self) -> None:
        self._task.cancel()
        import ray

        with contextlib.suppress(Exception):
            ray.cancel(self._stream)


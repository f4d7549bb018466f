"""The sending side's KV source: what a prefill engine produces, layer by layer.

The engine thread (producer) calls `put_layer` as each layer's KV is computed
(or all at once after the forward pass when layer-wise pipelining is off), then
`commit` with the tokens, or `fail`/`finish` when there is nothing to ship.
The sender's event loop (consumer) iterates it and pushes while the engine
computes the next layers. The layer tensors are staging copies owned by the
transfer (on CUDA copied on the transfer stream, each valid once its layer's
event is done: `engine.streams`): the prefill engine's own blocks are free as
soon as its sequence is done, and the copies are dropped when the decode side
acknowledges, or the transfer fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import torch

from pdserve.engine.streams import DONE, CopyEvent
from pdserve.kv_transfer.errors import TransferCancelled


@dataclass
class LayerKV:
    layer: int
    kv: torch.Tensor  # [2, num_tokens - token_start, kv_heads, head_dim], contiguous
    ready: CopyEvent = DONE  # `kv` is valid once this is done (a copy queued on a CUDA transfer stream)
    # A tensor-parallel engine with per-rank KV channels: `kv` holds rank 0's heads only, the other ranks hold
    # theirs in (`engine.parallel.Shipment`, the token at which this request's KV starts in it)
    staged: tuple | None = None


@dataclass
class CommitInfo:
    prompt_token_ids: list[int]
    output_token_ids: list[int]


class LayerStream:
    """The KV of one request's tokens [token_start, num_tokens), layer by layer. `num_tokens` is the whole
    KV the receiver reserved for; `token_start` > 0 when it already holds the first tokens' blocks (its
    prefix cache), so only the rest travels."""

    def __init__(self, request_id: str, num_tokens: int, token_start: int = 0):
        if not 0 <= token_start < num_tokens:
            raise ValueError(f"token_start {token_start} outside [0, {num_tokens})")
        self.request_id = request_id
        self.num_tokens = num_tokens
        self.token_start = token_start
        self._items: list = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._closed = False
        self._shipments: set = set()  # the `engine.parallel.Shipment`s its layers are staged in
        self._released = False

    @classmethod
    def complete(cls, request_id: str, layers: list[torch.Tensor], prompt_token_ids: list[int],
                 output_token_ids: list[int]) -> LayerStream:
        """A stream whose KV is all here already (tests, benchmarks): layer i is `layers[i]`, each
        `[2, num_tokens, kv_heads, head_dim]`, then the commit. Its token count is the layers'."""
        if not layers:
            raise ValueError("a stream needs at least one layer of KV")
        s = cls(request_id, layers[0].shape[1])
        for i, kv in enumerate(layers):
            s.put_layer(i, kv)
        s.commit(prompt_token_ids, output_token_ids)
        return s

    # -- producer (any thread) ------------------------------------------------------------------
    def put_layer(self, layer: int, kv: torch.Tensor, ready: CopyEvent = DONE, staged: tuple | None = None) -> None:
        """Layer `layer`'s KV; `ready`: the event after which `kv` holds it (`engine.streams`; the sender
        waits for it before reading `kv`); `staged`: see `LayerKV` (released by `close`)."""
        if staged is not None:
            with self._lock:
                new = staged[0] not in self._shipments
                self._shipments.add(staged[0])
                release_now = new and self._released
            if release_now:  # its push has ended already: nothing will read what the ranks staged for it
                staged[0].release()
        self._put(LayerKV(layer, kv.contiguous(), ready, staged))

    def close(self) -> None:
        """The stream's KV is no longer needed (its push ended, however): release the shipments it is staged
        in (once each; the ranks free them when every stream has)."""
        with self._lock:
            if self._released:
                return
            self._released = True
            shipments = list(self._shipments)
        for s in shipments:
            s.release()

    def commit(self, prompt_token_ids: list[int], output_token_ids: list[int]) -> None:
        self._put(CommitInfo(list(prompt_token_ids), list(output_token_ids)), last=True)

    def fail(self, exc: BaseException) -> None:
        self._put(exc, last=True)

    def finish(self, reason: str) -> None:
        """The request ended on the prefill side (e.g. its first token was EOS): nothing to hand over."""
        self._put(TransferCancelled(f"request finished on the prefill side ({reason})"), last=True)

    def _put(self, item, last: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._items.append(item)
            self._closed = last
            loop, ready = self._loop, self._ready
        if loop is not None:
            loop.call_soon_threadsafe(ready.set)

    # -- consumer (one event loop) -----------------------------------------------------------------
    async def batches(self):
        """Lists of the items available at once (layers that are ready go out together), ending
        with the one holding the `CommitInfo`; a failure is raised."""
        with self._lock:
            self._loop, self._ready = asyncio.get_running_loop(), asyncio.Event()
        while True:
            with self._lock:
                items, self._items = self._items, []
                if not items:
                    self._ready.clear()
            if not items:
                await self._ready.wait()
                continue
            for i, item in enumerate(items):
                if isinstance(item, BaseException):
                    if i:
                        yield items[:i]
                    raise item
            yield items
            if isinstance(items[-1], CommitInfo):
                return

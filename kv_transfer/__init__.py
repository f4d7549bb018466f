"""KV transfer: how a prefill worker's KV cache reaches a decode worker's paged pool.

Transports (`kv_transfer.kv_transport`): `grpc` streams the KV bytes inside
protobuf messages; `nccl` sends them on a torch.distributed channel per worker
pair (NCCL on CUDA, gloo on CPU) with the same control messages on gRPC. Both
share one protocol and one pair of classes: `KVSender` (prefill side, in
`client`) and `KVReceiver` (decode side, in `server`); the data plane is the
only thing that differs (`LayerChunk.data` inline, or out of band on a
`channel.TorchChannel`): one interface with one class per transport in
`data_plane`, so another one (RDMA: NIXL, Mooncake) slots in there.

Protocol: Pair (compare fingerprints and tensor-parallel layouts, once per peer) -> Reserve (decode side
allocates blocks under a lease, or refuses: `ReservationRefused`, nothing is
sent; a decode worker reserves locally with `KVReceiver.reserve_future` when a
request opens on it, and the prefill side pushes into that reservation with no
Reserve call of its own) -> Push (header, per-layer chunks with checksums, commit with the token
ids) -> acknowledgement. Release (idempotent) gives a request up from any side.
The KV plane never unpickles: every message is protobuf, peer-supplied sizes
and positions are bounds-checked before use, peers present a shared secret
(`auth_token`) as gRPC metadata, TLS is optional, servers bind to loopback
unless configured otherwise.

Ownership: at every moment each KV block belongs to exactly one party.

Decode side, per request (`reservations.ReservationTable`, on the receiver's loop thread):

      Reserve ok              first message          every layer of every token + Commit
    ------------> RESERVED -------------> RECEIVING -----------------------------------> COMMITTED
                  (table owns     |        (table owns blocks;                        (blocks handed to
                   the blocks)    |         checked chunks written                     `on_commit`: the
                                  |         into them)                                 decode engine)
                                  |             |
                                  +-------------+--> RELEASED  (blocks back on the free list, exactly once)
               on: Release from the router, the prefill side or the decode worker;
                   the lease passing (`lease_s`, counted from Reserve); the sender going
                   quiet (`idle_timeout_s`); the stream dropping or being cancelled (sender
                   died); a bad chunk (checksum, bounds, order, size); a fingerprint mismatch;
                   `on_commit` refusing the request; the receiver shutting down.

  * Writes into the pool and every state change happen on the receiver's event loop
    thread, so a release never frees blocks while a write into them is landing; bytes
    received on a blocking channel land in a staging buffer first.
  * A released or committed request leaves a tombstone (`tombstone_ttl_s`): a late push
    is refused as `RequestReleased`, a repeated Release answers the state it found, and a
    Release that overtakes its Reserve (a client that cancelled in the proxy window)
    makes that Reserve fail instead of stranding blocks.

Prefill side, per request:

    PREFILLING --------------------------> STAGED/SENDING --------------------> ACKED
    (the prefill engine's sequence         (per-layer copies owned by the        (copies dropped)
     owns its blocks; freed when the        transfer's `LayerStream`; sent as
     sequence finishes after its first      layers complete when `layerwise`)
     token)                                       |
                                                  +--> FAILED / CANCELLED (copies dropped, Release
                                                       sent to the decode side; if it never
                                                       arrives, the lease reclaims the blocks)

Abort travels from whoever learns of it first: the router calls Release on the decode
worker and `KVSender.cancel` on the prefill worker; the prefill side cancels its push
and sends Release; the decode side fails the push, which the sender sees as a typed
error. Every notice is idempotent, so all of them may arrive.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Names are imported on first use (PEP 562), not here: `import pdserve.kv_transfer.reservations` or
# `kv_transfer.errors` must not pull in torch and gRPC with the sender and the receiver.
_EXPORTS = {
    "KVSender": "client", "ReservationInfo": "client", "TransferResult": "client",
    "KVPool": "pool",
    "LocalReservation": "reservations", "ReceivedKV": "reservations",
    "Fingerprint": "protocol", "KVLayout": "protocol",
    "KVReceiver": "server",
    "LayerStream": "source",
    **dict.fromkeys(("AuthenticationFailed", "ChecksumMismatch", "DuplicateRequest", "KVTransferError",
                     "LayoutMismatch", "MalformedTransfer", "OversizedMessage", "PeerUnavailable", "RequestReleased",
                     "ReservationRefused", "ReservationTooLarge", "TransferCancelled", "TransferTimeout",
                     "UnknownRequest"), "errors"),
}

__all__ = [
    "AuthenticationFailed", "ChecksumMismatch", "DuplicateRequest", "Fingerprint", "KVLayout", "KVPool", "KVReceiver",
    "KVSender", "KVTransferError", "LayerStream", "LayoutMismatch", "LocalReservation", "MalformedTransfer",
    "OversizedMessage", "PeerUnavailable", "ReceivedKV", "RequestReleased", "ReservationInfo", "ReservationRefused",
    "ReservationTooLarge", "TransferCancelled", "TransferResult", "TransferTimeout", "UnknownRequest",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` provides the names
    from pdserve.kv_transfer.client import KVSender, ReservationInfo, TransferResult
    from pdserve.kv_transfer.errors import (
        AuthenticationFailed,
        ChecksumMismatch,
        DuplicateRequest,
        KVTransferError,
        LayoutMismatch,
        MalformedTransfer,
        OversizedMessage,
        PeerUnavailable,
        RequestReleased,
        ReservationRefused,
        ReservationTooLarge,
        TransferCancelled,
        TransferTimeout,
        UnknownRequest,
    )
    from pdserve.kv_transfer.pool import KVPool
    from pdserve.kv_transfer.protocol import Fingerprint, KVLayout
    from pdserve.kv_transfer.reservations import LocalReservation, ReceivedKV
    from pdserve.kv_transfer.server import KVReceiver
    from pdserve.kv_transfer.source import LayerStream


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # AttributeError, so that `from pdserve.kv_transfer import faults` still finds the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

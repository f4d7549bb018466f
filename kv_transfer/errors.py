"""The KV plane's typed errors. No torch, gRPC or numpy here, so code that only
reasons about reservations and failures (the decode worker's bookkeeping, the
router) can import them cheaply.

Each error has a `reason` (the metrics label; it travels in gRPC trailing
metadata so the peer raises the same class) and a `code`: the *name* of the
gRPC status it is answered with ("RESOURCE_EXHAUSTED"), mapped to
`grpc.StatusCode` only where gRPC is in use (`protocol.grpc_status`).

How a worker reports one to the router (`engine.messages.WorkerError.of`): a 503 the
client may retry, and `retryable` by another prefill/decode pair, except where waiting
or moving cannot help (`ReservationTooLarge`).
"""

from __future__ import annotations


class KVTransferError(RuntimeError):
    """A KV transfer failed; `reason` is the metrics label and travels in gRPC trailing metadata."""

    reason = "error"
    code = "INTERNAL"
    http_status = 503
    retryable = True
    retry_after = 1.0


class ReservationRefused(KVTransferError):
    """The decode side has no room for the request's KV; nothing was reserved or sent."""

    reason, code = "no_room", "RESOURCE_EXHAUSTED"


class ReservationTooLarge(ReservationRefused):
    """The request's KV would not fit even in the decode worker's empty pool: waiting cannot help."""

    reason = "too_large"
    retryable = False


class LayoutMismatch(KVTransferError):
    """The peers' fingerprints differ (model, weights, layout, dtype, block size or version)."""

    reason, code = "layout_mismatch", "FAILED_PRECONDITION"


class ChecksumMismatch(KVTransferError):
    """A chunk's bytes do not match its checksum: nothing of it was written."""

    reason, code = "checksum", "DATA_LOSS"


class MalformedTransfer(KVTransferError):
    """A message out of bounds, out of order, of the wrong size, or a push left incomplete."""

    reason, code = "malformed", "INVALID_ARGUMENT"


class OversizedMessage(KVTransferError):
    """A message over the receiver's `max_message_bytes`."""

    reason, code = "oversized", "RESOURCE_EXHAUSTED"


class UnknownRequest(KVTransferError):
    """No reservation exists for this request id (never reserved, or forgotten long ago)."""

    reason, code = "unknown_request", "NOT_FOUND"


class RequestReleased(KVTransferError):
    """The request was released (aborted, lease expired, failed) before the push completed."""

    reason, code = "released", "ABORTED"


class DuplicateRequest(KVTransferError):
    """A reservation or push for this request id is already under way."""

    reason, code = "duplicate", "ALREADY_EXISTS"


class TransferTimeout(KVTransferError):
    """A deadline passed: a stalled peer, a send/recv that never matched, an expired lease."""

    reason, code = "timeout", "DEADLINE_EXCEEDED"


class TransferCancelled(KVTransferError):
    """The transfer was cancelled by its own side (abort)."""

    reason, code = "cancelled", "CANCELLED"


class PeerUnavailable(KVTransferError):
    """The peer cannot be reached, or the connection dropped."""

    reason, code = "unavailable", "UNAVAILABLE"


class AuthenticationFailed(KVTransferError):
    """The peer did not present the shared secret."""

    reason, code = "unauthenticated", "UNAUTHENTICATED"


class SharedDevice(KVTransferError):
    """Both ends of an NCCL channel are on one CUDA device: NCCL cannot pair two ranks there (it
    hangs or fails), so the channel is refused before either end joins."""

    reason, code = "shared_device", "FAILED_PRECONDITION"


_BY_REASON: dict[str, type[KVTransferError]] = {c.reason: c for c in (
    ReservationRefused, ReservationTooLarge, LayoutMismatch, ChecksumMismatch, MalformedTransfer, OversizedMessage,
    UnknownRequest, RequestReleased, DuplicateRequest, TransferTimeout, TransferCancelled, PeerUnavailable,
    AuthenticationFailed, SharedDevice)}
# A status with no reason attached comes from gRPC itself (a deadline, a dropped connection, its own
# message limit), not from our server: these are the classes such statuses stand for.
_BY_CODE: dict[str, type[KVTransferError]] = {
    "DEADLINE_EXCEEDED": TransferTimeout, "UNAVAILABLE": PeerUnavailable, "CANCELLED": TransferCancelled,
    "UNAUTHENTICATED": AuthenticationFailed, "RESOURCE_EXHAUSTED": OversizedMessage}


def error_class(reason: str | None, code: str) -> type[KVTransferError]:
    """The class a failed call stands for: named by the peer's `reason`, else by the status `code` name."""
    return _BY_REASON.get(reason) or _BY_CODE.get(code, KVTransferError)


__all__ = [
    "AuthenticationFailed", "ChecksumMismatch", "DuplicateRequest", "KVTransferError", "LayoutMismatch",
    "MalformedTransfer", "OversizedMessage", "PeerUnavailable", "RequestReleased", "ReservationRefused",
    "ReservationTooLarge", "SharedDevice", "TransferCancelled", "TransferTimeout", "UnknownRequest", "error_class",
]

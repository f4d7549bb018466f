"""What both ends of the KV plane agree on: the layout fingerprint, typed errors (defined in
`errors`, re-exported here), chunking and checksums. No gRPC server or client here (see
`server`, `client`)."""

from __future__ import annotations

import hashlib
import hmac
import warnings
from dataclasses import asdict, dataclass

import google_crc32c
import grpc
import numpy as np
import torch

from pdserve.engine import pdserve_version
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
    error_class,
)
from pdserve.kv_transfer.v1 import kv_transfer_pb2 as pb

# Bumped when the meaning of an existing wire field changes (fields are only ever added otherwise).
WIRE_VERSION = 1
AUTH_METADATA_KEY = "authorization"
REASON_METADATA_KEY = "pdserve-reason"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def advertised_host(bind_host: str) -> str:
    """The address peers should dial for a server bound to `bind_host`: a wildcard bind (0.0.0.0, ::)
    is advertised as this node's IP (Ray's view of it when inside Ray), anything else as is."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # not inside Ray: fall through to the host's own name resolution
        pass
    import socket

    return socket.gethostbyname(socket.gethostname())


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


@dataclass(frozen=True)
class Fingerprint:
    """Everything that must match for KV computed by one worker to be valid in another's pool."""

    model_id: str
    weights_sha256: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    pdserve_version: str
    wire_version: int = WIRE_VERSION

    @classmethod
    def of(cls, *, model_id: str, weights_sha256: str, num_layers: int, num_kv_heads: int, head_dim: int,
           dtype: torch.dtype, block_size: int) -> Fingerprint:
        return cls(model_id, weights_sha256, num_layers, num_kv_heads, head_dim, dtype_name(dtype), block_size,
                   pdserve_version())

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.torch_dtype).element_size()

    def digest(self) -> bytes:
        canonical = ";".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))
        return hashlib.sha256(canonical.encode()).digest()

    def to_proto(self) -> pb.Fingerprint:
        return pb.Fingerprint(**asdict(self))

    @classmethod
    def from_proto(cls, m: pb.Fingerprint) -> Fingerprint:
        return cls(m.model_id, m.weights_sha256, m.num_layers, m.num_kv_heads, m.head_dim, m.dtype, m.block_size,
                   m.pdserve_version, m.wire_version)

    def mismatches(self, other: Fingerprint) -> list[str]:
        """Human-readable differences, empty when compatible."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {mine[k]!r} here, {theirs[k]!r} on the peer" for k in mine if mine[k] != theirs[k]]


@dataclass(frozen=True)
class KVLayout:
    """How a worker holds the model's KV heads: `tp_size` tensor-parallel ranks, rank r holding the whole
    model's KV heads `kv_heads[r]` = [first, end) (ranks may share a head: replicated, as
    `engine.parallel.Shard` does when there are more ranks than KV heads). Not part of the fingerprint: a
    prefill worker with one layout feeds a decode worker with another, as long as each layout tiles the
    same whole-model heads (`problems`)."""

    tp_size: int
    kv_heads: tuple[tuple[int, int], ...]

    @classmethod
    def whole(cls, num_kv_heads: int) -> KVLayout:
        """One rank holding every head (no tensor parallelism; also what a peer that sends no layout means)."""
        return cls(1, ((0, num_kv_heads),))

    def problems(self, num_kv_heads: int) -> list[str]:
        """Why this layout cannot hold a model with `num_kv_heads` KV heads; empty when it can. Each rank holds
        a non-empty range inside the model's heads, two ranks' ranges are equal (a replicated head) or
        disjoint, and together they cover every head: a split that tiles the model's KV heads."""
        if self.tp_size < 1 or len(self.kv_heads) != self.tp_size:
            return [f"{len(self.kv_heads)} KV-head ranges for tensor-parallel size {self.tp_size}"]
        out = [f"rank {r}: KV heads [{a}, {b}) outside the model's [0, {num_kv_heads})"
               for r, (a, b) in enumerate(self.kv_heads) if not 0 <= a < b <= num_kv_heads]
        if out:
            return out
        covered, why = 0, ""
        for a, b in sorted(set(self.kv_heads)):  # distinct ranges, in order: they must follow each other
            if a != covered:
                why = f"{'an overlap' if a < covered else 'a gap'} at head {min(a, covered)}"
                break
            covered = b
        else:
            if covered != num_kv_heads:
                why = f"heads from {covered} on are on no rank"
        return [f"KV-head ranges {list(self.kv_heads)} do not tile the model's {num_kv_heads} KV heads: {why}"] \
            if why else []

    def overlaps(self, other: KVLayout) -> list[tuple[int, int, int, int]]:
        """(my rank, its rank, first, end): the whole-model KV heads [first, end) that a rank of this layout (the
        sender's) and a rank of `other` (the receiver's) both hold: the rank pairs a transfer between the two
        connects, in (my rank, its rank) order. Each of `other`'s ranks gets each of its heads once: from the
        first of my ranks holding it (a replicated head is sent by one replica, to every replica)."""
        out = []
        for r, (a, b) in enumerate(self.kv_heads):
            if (a, b) in self.kv_heads[:r]:
                continue
            for s, (c, d) in enumerate(other.kv_heads):
                if max(a, c) < min(b, d):
                    out.append((r, s, max(a, c), min(b, d)))
        return out

    def to_proto(self) -> pb.KVLayout:
        return pb.KVLayout(tp_size=self.tp_size, kv_heads=[pb.HeadRange(first=a, end=b) for a, b in self.kv_heads])

    @classmethod
    def from_proto(cls, m: pb.KVLayout, num_kv_heads: int) -> KVLayout:
        """`m` as sent; an absent one (a peer older than the field) is `whole(num_kv_heads)`."""
        if not m.tp_size and not m.kv_heads:
            return cls.whole(num_kv_heads)
        return cls(m.tp_size, tuple((h.first, h.end) for h in m.kv_heads))


def layout_mismatches(fingerprint: Fingerprint, mine: KVLayout, theirs: KVLayout) -> list[str]:
    """Why KV cannot move between two workers of one model (`fingerprint`) with these layouts; empty when it can:
    any tensor-parallel sizes, as long as each side's ranges tile the model's KV heads."""
    h = fingerprint.num_kv_heads
    return ([f"layout here: {p}" for p in mine.problems(h)]
            + [f"layout on the peer: {p}" for p in theirs.problems(h)])


# -- typed errors (defined in `errors`, torch- and gRPC-free; re-exported here) ----------------------
def grpc_status(e: KVTransferError) -> grpc.StatusCode:
    """The gRPC status an error is answered with (errors name it as a string)."""
    return grpc.StatusCode[e.code]


def error_from_rpc(err: grpc.aio.AioRpcError) -> KVTransferError:
    """The typed error a failed call stands for (the server names it in trailing metadata)."""
    reason = dict(err.trailing_metadata() or ()).get(REASON_METADATA_KEY)
    cls = error_class(reason, err.code().name)
    exc = cls(f"{err.code().name}: {err.details()}")
    exc.__cause__ = err
    return exc


def secret_matches(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), f"Bearer {expected}".encode())


def keepalive_options(time_s: float, timeout_s: float, server: bool) -> list[tuple[str, int]]:
    """gRPC keepalive for a KV-plane channel (`server=False`) or server: each side pings the other every
    `time_s`, calls or not, and a peer that leaves a ping unanswered for `timeout_s` (a frozen process, a
    network split) fails the calls on that connection. A server accepts its peers' pings that often."""
    # Every ping, not only keepalive's: a ping in flight (flow control's bandwidth probe, say) holds keepalive's
    # back, and waits `ping_timeout_ms` (one minute by default) for its answer.
    opts = [("grpc.keepalive_time_ms", int(time_s * 1000)), ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
            ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)), ("grpc.keepalive_permit_without_calls", 1)]
    if server:  # pings closer than this count as abuse (GOAWAY after two): allow the peer's, with jitter
        return opts + [("grpc.http2.min_recv_ping_interval_without_data_ms", int(time_s * 500))]
    return opts + [("grpc.http2.max_pings_without_data", 0)]


# -- chunks and checksums ---------------------------------------------------------------------------
def plan_chunks(first_layer: int, num_layers: int, num_tokens: int, bytes_per_token_layer: int,
                chunk_bytes: int) -> list[tuple[int, int, int, int]]:
    """(layer, num_layers, token_start, token_end) chunks covering layers [first_layer, first_layer +
    num_layers) of `num_tokens` tokens, each within `chunk_bytes` (at least one token of one layer):
    small layers are packed together, a layer over the limit is split into even token ranges."""
    layer_bytes = num_tokens * bytes_per_token_layer
    if layer_bytes <= chunk_bytes:
        per = max(1, chunk_bytes // layer_bytes)
        last = first_layer + num_layers
        return [(layer, min(per, last - layer), 0, num_tokens) for layer in range(first_layer, last, per)]
    pieces = -(-layer_bytes // chunk_bytes)
    step = min(-(-num_tokens // pieces), max(1, chunk_bytes // bytes_per_token_layer))
    return [(layer, 1, s, min(s + step, num_tokens))
            for layer in range(first_layer, first_layer + num_layers) for s in range(0, num_tokens, step)]


def checksum_algo(t: torch.Tensor) -> int:
    return pb.CHECKSUM_ALGO_CRC32C if t.device.type == "cpu" else pb.CHECKSUM_ALGO_SUM64


def checksum(t: torch.Tensor, algo: int) -> int:
    """Checksum of a tensor's bytes (row-major): CRC32C on the host; on a GPU, a position-weighted
    sum of its int32 words, computed on the device so NCCL transfers never copy to the host."""
    if algo == pb.CHECKSUM_ALGO_CRC32C:
        return google_crc32c.value(_host_bytes(t))
    if algo == pb.CHECKSUM_ALGO_SUM64:
        words = t.reshape(-1).view(torch.uint8)
        pad = (-words.numel()) % 4
        if pad:
            words = torch.cat([words, words.new_zeros(pad)])
        w = words.view(torch.int32).to(torch.int64)
        weights = torch.arange(w.numel(), device=w.device, dtype=torch.int64) % 65521 + 1
        s1, s2 = torch.stack([w.sum(), (w * weights).sum()]).tolist()  # one host wait, for both sums
        return ((s2 & 0xFFFFFFFF) << 32) | (s1 & 0xFFFFFFFF)
    raise MalformedTransfer(f"unknown checksum algorithm {algo}")


def _host_bytes(t: torch.Tensor):
    """A host tensor's bytes as a uint8 numpy array (no copy when it is contiguous): google-crc32c
    reads numpy arrays and bytes in place, but refuses memoryviews."""
    return t.cpu().reshape(-1).view(torch.uint8).numpy()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


_CHUNK_DATA_KEY = 0x22  # PushMessage.chunk_data: field 4, length-delimited


def encode_chunk_data(kvs: list[torch.Tensor]) -> tuple[bytes, int, int]:
    """The `PushMessage(chunk_data=...)` carrying `kvs` (per layer `[2, n, kv_heads, head_dim]`: K rows,
    then V rows) in protobuf wire format, with its byte count and CRC32C. The bytes are copied once,
    straight from the tensors (protobuf's own path copies them three times: to bytes, into the
    message, out of it). Any protobuf parser reads it as that message (tests/test_proto.py checks)."""
    parts = [_host_bytes(half) for kv in kvs for half in kv]  # each half is contiguous even in a token slice
    crc = google_crc32c.value(parts[0])
    for part in parts[1:]:
        crc = google_crc32c.extend(crc, part)
    n = sum(part.nbytes for part in parts)
    return b"".join([bytes([_CHUNK_DATA_KEY]), _varint(n), *parts]), n, crc


def decode_push_message(buf: bytes) -> pb.PushMessage | memoryview:
    """Push's request deserializer. A message that is exactly one `chunk_data` field comes back as a
    memoryview of its payload, in place (bounds-checked); anything else is parsed by protobuf."""
    if len(buf) > 1 and buf[0] == _CHUNK_DATA_KEY:
        n, shift, i = 0, 0, 1
        while i < len(buf) and i <= 10:
            b = buf[i]
            n |= (b & 0x7F) << shift
            shift += 7
            i += 1
            if not b & 0x80:
                if i + n == len(buf):
                    return memoryview(buf)[i:]
                break
    return pb.PushMessage.FromString(buf)


def bytes_checksum(data: bytes | memoryview) -> int:
    return google_crc32c.value(data if isinstance(data, bytes) else np.frombuffer(data, dtype=np.uint8))


def kv_from_bytes(data: bytes | memoryview, num_layers: int, num_tokens: int, fp: Fingerprint) -> torch.Tensor:
    """Inverse of `encode_chunk_data`'s payload: `[num_layers, 2, num_tokens, kv_heads, head_dim]`
    over `data` (read-only; the caller copies it into the pool)."""
    raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return raw.view(fp.torch_dtype).view(num_layers, 2, num_tokens, fp.num_kv_heads, fp.head_dim)


# torch.frombuffer warns (once) that `bytes` are read-only; the receiver only ever reads them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# The typed errors are defined in `errors` (torch- and gRPC-free) and stay importable from here.
__all__ = [
    "AUTH_METADATA_KEY", "REASON_METADATA_KEY", "WIRE_VERSION", "Fingerprint", "KVLayout", "advertised_host",
    "bytes_checksum", "layout_mismatches",
    "checksum", "checksum_algo", "decode_push_message", "dtype_name", "encode_chunk_data", "error_from_rpc",
    "grpc_status", "host_port", "kv_from_bytes", "pdserve_version", "plan_chunks", "secret_matches",
    "AuthenticationFailed", "ChecksumMismatch", "DuplicateRequest", "KVTransferError", "LayoutMismatch",
    "MalformedTransfer", "OversizedMessage", "PeerUnavailable", "RequestReleased", "ReservationRefused",
    "ReservationTooLarge", "TransferCancelled", "TransferTimeout", "UnknownRequest",
]

"""Per-rank KV channels over the `grpc` transport: the channel ends `ranks` drives, with gRPC underneath.

`ranks` moves a push's parts on channels with the interface of `channel.TorchChannel` (`post_send`/`send_done`
on the sending rank, `staging`/`recv` on the receiving one, `retire`/`close` on both). Over gRPC:

  * every receiving rank of a tensor-parallel decode worker (rank 0 included) serves a `KVRankParts` endpoint of
    its own (`PartEndpoint`, one per process and KV-plane config, started at the first channel); its address is
    the OpenChannel answer for a channel to that rank (`store_host`/`store_port`, as a TCPStore's would be). Same
    auth token, TLS, message limits and keepalive as the worker's KV server (`server.KVReceiver`);
  * a sending rank (`PartSender`) posts each part as one unary `PushPart` call (`seq` 0, 1, ... on its channel)
    and returns at once; the call completes when the receiving rank has taken the part (`PartReceiver.recv`), so
    a part waits on the endpoint, as a posted send waits for its receiver on a torch channel, for at most the
    channel timeout (then the call fails: the push fails, and the channel is closed on both ends).

The parts are raw tensor bytes; they are only written into the pool once the receiving worker's rank 0 has
compared their checksums with the sender's (`ranks.RankKeys.receive`), as on torch channels.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch

from pdserve.engine.platform import serial_torch_thread
from pdserve.kv_transfer.errors import MalformedTransfer, PeerUnavailable, TransferTimeout
from pdserve.kv_transfer.protocol import AUTH_METADATA_KEY, advertised_host, keepalive_options, secret_matches
from pdserve.kv_transfer.v1 import kv_transfer_pb2 as pb

if TYPE_CHECKING:
    from pdserve.engine.config import KVTransferConfig

SERVICE = pb.DESCRIPTOR.services_by_name["KVRankParts"].full_name
BACKEND = "grpc"  # OpenChannelRequest.backend for these channels


def _options(config: KVTransferConfig, server: bool) -> list[tuple[str, int]]:
    opts = [("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes)]
    return opts + keepalive_options(config.keepalive_time_s, config.keepalive_timeout_s, server=server)


class _Auth(grpc.ServerInterceptor):
    """As the KV server's: every call carries `authorization: Bearer <kv_transfer.auth_token>`."""

    def __init__(self, token: str):
        self.token = token

    def intercept_service(self, continuation, details):
        md = dict(details.invocation_metadata or ())
        handler = continuation(details)
        if handler is None or secret_matches(md.get(AUTH_METADATA_KEY), self.token):
            return handler

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong KV-plane secret")

        return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


class PartEndpoint:
    """A receiving rank's `KVRankParts` server: parts wait here (`PushPart` blocks) until `take` has them."""

    _shared: dict[tuple, PartEndpoint] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, config: KVTransferConfig) -> PartEndpoint:
        """This process's endpoint for `config` (ranks that are threads of one process, as in tests, share it:
        channel ids are unique)."""
        key = (config.host, config.auth_token, config.max_message_bytes, config.tls_cert_file, config.tls_key_file,
               config.channel_timeout_s)
        with cls._shared_lock:
            ep = cls._shared.get(key)
            if ep is None:
                ep = cls._shared[key] = cls(config)
            return ep

    def __init__(self, config: KVTransferConfig):
        self.timeout_s = config.channel_timeout_s
        self._cond = threading.Condition()
        self._open: set[str] = set()
        self._parts: dict[tuple[str, int], bytes] = {}
        interceptors = [_Auth(config.auth_token)] if config.auth_token else []
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=max(4, 2 * config.max_channels),
                                                  thread_name_prefix="kv-rank-parts", initializer=serial_torch_thread),
            options=_options(config, server=True) + [("grpc.so_reuseport", 0)], interceptors=interceptors)
        handler = grpc.unary_unary_rpc_method_handler(self._push, request_deserializer=pb.RankPart.FromString,
                                                      response_serializer=pb.RankPartAck.SerializeToString)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"PushPart": handler}),))
        bind = f"[{config.host}]:0" if ":" in config.host else f"{config.host}:0"
        if config.tls_cert_file:
            creds = grpc.ssl_server_credentials([(Path(config.tls_key_file).read_bytes(),
                                                  Path(config.tls_cert_file).read_bytes())])
            self.port = self._server.add_secure_port(bind, creds)
        else:
            self.port = self._server.add_insecure_port(bind)
        if not self.port:
            raise OSError(f"cannot bind a per-rank KV endpoint to {bind}")
        self.host = advertised_host(config.host)
        self._server.start()

    def expect(self, channel_id: str) -> None:
        with self._cond:
            self._open.add(channel_id)

    def forget(self, channel_id: str) -> None:
        """The channel is closed: its waiting parts are refused, and no more are taken."""
        with self._cond:
            self._open.discard(channel_id)
            for key in [k for k in self._parts if k[0] == channel_id]:
                del self._parts[key]
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """How many parts wait here for their rank to take them."""
        with self._cond:
            return len(self._parts)

    def _push(self, request: pb.RankPart, context) -> pb.RankPartAck:
        key = (request.channel_id, request.seq)
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            if request.channel_id not in self._open or key in self._parts:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no open KV channel {request.channel_id!r} here")
            self._parts[key] = request.data
            self._cond.notify_all()
            context.add_callback(self._wake)  # the call ended (the sender's deadline, or it went away)
            while key in self._parts:  # until the receiving rank takes it (or the channel closes, or the call ends)
                left = deadline - time.monotonic()
                if left <= 0 or request.channel_id not in self._open or not context.is_active():
                    self._parts.pop(key, None)
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED if left <= 0 else grpc.StatusCode.UNAVAILABLE,
                                  f"KV channel {request.channel_id!r}: part {request.seq} not taken")
                self._cond.wait(left)
        return pb.RankPartAck()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def take(self, channel_id: str, seq: int, timeout_s: float) -> bytes:
        key = (channel_id, seq)
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._parts or channel_id not in self._open, timeout_s):
                raise TransferTimeout(f"KV channel {channel_id}: part {seq} did not arrive in {timeout_s}s")
            if key not in self._parts:
                raise PeerUnavailable(f"KV channel {channel_id} is closed")
            data = self._parts.pop(key)
            self._cond.notify_all()
            return data


class _End:
    """What both ends share with `TorchChannel`: the one-transfer lock, recency, and closing."""

    def __init__(self, channel_id: str, timeout_s: float):
        self.channel_id, self.timeout_s = channel_id, timeout_s
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.broken = False
        self._seq = 0

    @property
    def closed(self) -> bool:
        return self.broken

    def retire(self, now: bool) -> None:
        self.close()  # nothing here runs in a group that a close could tear from under an operation

    def close(self) -> None:
        self.broken = True


class PartReceiver(_End):
    """A receiving rank's end: the parts of its channel, taken in order from its endpoint."""

    def __init__(self, endpoint: PartEndpoint, channel_id: str, timeout_s: float):
        super().__init__(channel_id, timeout_s)
        self.endpoint = endpoint
        endpoint.expect(channel_id)

    def staging(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    def recv(self, t: torch.Tensor) -> None:
        if self.broken:
            raise PeerUnavailable(f"channel {self.channel_id} is closed")
        try:
            data = self.endpoint.take(self.channel_id, self._seq, self.timeout_s)
        except Exception:
            self.close()
            raise
        self._seq += 1
        self.last_used = time.monotonic()
        if len(data) != t.numel() * t.element_size():
            self.close()
            raise MalformedTransfer(f"channel {self.channel_id}: a part of {len(data)} bytes, expected "
                                    f"{t.numel() * t.element_size()}")
        t.copy_(torch.frombuffer(bytearray(data), dtype=t.dtype).view(t.shape))

    def close(self) -> None:
        if not self.broken:
            self.endpoint.forget(self.channel_id)
        super().close()


class PartSender(_End):
    """A sending rank's end: each part one `PushPart` call to the receiving rank's endpoint at `host:port`."""

    def __init__(self, config: KVTransferConfig, channel_id: str, host: str, port: int):
        super().__init__(channel_id, config.channel_timeout_s)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        opts = _options(config, server=False)
        if config.tls_ca_file or config.tls_cert_file:
            if config.tls_server_name:
                opts.append(("grpc.ssl_target_name_override", config.tls_server_name))
            ca = Path(config.tls_ca_file or config.tls_cert_file).read_bytes()
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options=opts)
        else:
            self._channel = grpc.insecure_channel(address, options=opts)
        self._call = self._channel.unary_unary(f"/{SERVICE}/PushPart", request_serializer=pb.RankPart.SerializeToString,
                                               response_deserializer=pb.RankPartAck.FromString)
        self._metadata = ((AUTH_METADATA_KEY, f"Bearer {config.auth_token}"),) if config.auth_token else ()
        self._guard = threading.Lock()  # the order of `seq` is the order of posting

    def post_send(self, t: torch.Tensor) -> grpc.Future:
        """Start sending `t` (its bytes are copied here) and return at once; `send_done` says when it is over."""
        data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        with self._guard:
            if self.broken:
                raise PeerUnavailable(f"channel {self.channel_id} is closed")
            seq, self._seq = self._seq, self._seq + 1
            self.last_used = time.monotonic()
            return self._call.future(pb.RankPart(channel_id=self.channel_id, seq=seq, data=data),
                                     timeout=self.timeout_s, metadata=self._metadata)

    def send_done(self, work: grpc.Future, deadline: float) -> bool | None:
        """As `TorchChannel.send_done`: None while the call runs; True once taken; False (the channel closed) if
        it failed or is still running at `deadline`."""
        if not work.done():
            if time.monotonic() < deadline:
                return None
            work.cancel()
            self.close()
            return False
        if work.cancelled() or work.exception() is not None:
            self.close()
            return False
        self.last_used = time.monotonic()
        return True

    def send(self, t: torch.Tensor) -> None:
        work = self.post_send(t)
        try:
            work.result()
        except grpc.RpcError as e:
            self.close()
            raise PeerUnavailable(f"channel {self.channel_id}: send failed: {e.details()}") from e

    def close(self) -> None:
        if not self.broken:
            self._channel.close()
        super().close()


__all__ = ["BACKEND", "PartEndpoint", "PartReceiver", "PartSender"]

"""The KV plane against a hostile or broken peer, through raw gRPC stubs: every bad
message is refused with a typed status, and the pool (free blocks and contents) is
exactly as it was. Plus authentication, TLS, a sender process killed mid-stream,
channel bounds, the metrics, and the receiver's local API the decode worker uses
(reserve, reserve_future, release_soon)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import google_crc32c
import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from pdserve.engine.config import InsecureConfig, KVTransferConfig, PdserveConfig
from pdserve.kv_transfer import (
    AuthenticationFailed,
    KVPool,
    KVReceiver,
    KVSender,
    LayerStream,
    LocalReservation,
    MalformedTransfer,
    PeerUnavailable,
    RequestReleased,
    ReservationRefused,
    ReservationTooLarge,
    TransferTimeout,
)
from pdserve.kv_transfer.channel import check_distinct_devices, nccl_error_handling
from pdserve.kv_transfer.errors import SharedDevice, error_class
from pdserve.kv_transfer.protocol import REASON_METADATA_KEY
from pdserve.kv_transfer.v1 import kv_transfer_pb2 as pb
from pdserve.kv_transfer.v1 import kv_transfer_pb2_grpc as pb_grpc
from tests.helpers import kv_fingerprint, wait_for

FP = kv_fingerprint(num_layers=2)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def receiver():
    made = []

    def make(num_blocks=32, fp=FP, **kv) -> KVReceiver:
        pool = KVPool.standalone(fp, num_blocks)
        pool.kv.data.normal_()  # so that any stray write would show
        got = []
        rx = KVReceiver(pool, KVTransferConfig(**kv), got.append).start()
        rx.committed = got
        made.append(rx)
        return rx

    yield make
    for rx in made:
        rx.stop()
        assert rx.pool.num_free_blocks == rx.pool.blocks.num_blocks, "blocks leaked"


def release_committed(rx: KVReceiver) -> None:
    """The fixture's receiver has no decode engine: free the blocks of the one committed transfer."""
    rec = rx.committed.pop()
    with rx.pool.lock:
        rx.pool.blocks.free(rec.block_table)


def push_once(rx: KVReceiver, config: KVTransferConfig, request_id: str, num_tokens: int) -> None:
    """One whole transfer into `rx` from a fresh sender, then its blocks freed."""
    tx = KVSender(config, FP)
    try:
        tx.reserve(rx.address, request_id, num_tokens)
        tx.push(rx.address, _stream(request_id, num_tokens)).result(20)
    finally:
        tx.close()
    release_committed(rx)


def stub(rx: KVReceiver, token: str | None = None):
    channel = grpc.insecure_channel(rx.address)
    md = (("authorization", f"Bearer {token}"),) if token else ()
    return pb_grpc.KVTransferStub(channel), md


def chunk(layer, start, n, fp=FP, corrupt=False, nbytes=None, data=None, nl=1):
    """A LayerChunk and its bytes: two messages."""
    kv = torch.randn(nl, 2, n, fp.num_kv_heads, fp.head_dim)
    raw = kv.numpy().tobytes() if data is None else data
    crc = google_crc32c.value(raw) ^ (1 if corrupt else 0)
    return [pb.PushMessage(chunk=pb.LayerChunk(layer=layer, num_layers=nl, token_start=start, num_tokens=n,
                                               nbytes=len(raw) if nbytes is None else nbytes,
                                               checksum_algo=pb.CHECKSUM_ALGO_CRC32C, checksum=crc)),
            pb.PushMessage(chunk_data=raw)]


def flat(messages):
    out = []
    for m in messages:
        out.extend(m if isinstance(m, list) else [m])
    return out


def header(rid, n, fp=FP, data_plane="grpc", rank_channels=()):
    return pb.PushMessage(header=pb.TransferHeader(request_id=rid, fingerprint_digest=fp.digest(), num_tokens=n,
                                                   data_plane=data_plane, channel_id="c0",
                                                   rank_channels=[pb.RankChannel(src_rank=s, dst_rank=d, first=a,
                                                                                 end=b, channel_id=f"c{i}")
                                                                  for i, (s, d, a, b) in enumerate(rank_channels)]))


def reason_of(err: grpc.RpcError) -> str:
    return dict(err.trailing_metadata() or ()).get(REASON_METADATA_KEY)


BAD_PUSHES = {
    "corrupt checksum": (lambda: [header("r", 20), chunk(0, 0, 20, corrupt=True)], grpc.StatusCode.DATA_LOSS,
                         "checksum"),
    "layer out of range": (lambda: [header("r", 20), chunk(2, 0, 20)], grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "layers past the end": (lambda: [header("r", 20), chunk(1, 0, 20, nl=2)], grpc.StatusCode.INVALID_ARGUMENT,
                            "malformed"),
    "layer sent twice": (lambda: [header("r", 20), chunk(0, 0, 20), chunk(0, 0, 20, nl=2)],
                         grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "tokens past the reservation": (lambda: [header("r", 20), chunk(0, 0, 21)], grpc.StatusCode.INVALID_ARGUMENT,
                                    "malformed"),
    "out of order": (lambda: [header("r", 20), chunk(0, 5, 10)], grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "size lies": (lambda: [header("r", 20), chunk(0, 0, 20, nbytes=64)], grpc.StatusCode.INVALID_ARGUMENT,
                  "malformed"),
    "bytes short": (lambda: [header("r", 20), chunk(0, 0, 20, data=b"\0" * 100, nbytes=20 * 256)],
                    grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "bytes missing": (lambda: [header("r", 20), chunk(0, 0, 20)[0], chunk(1, 0, 20)[0]],
                      grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "commit before all layers": (lambda: [header("r", 20), chunk(0, 0, 20),
                                          pb.PushMessage(commit=pb.Commit(prompt_token_ids=range(20),
                                                                          output_token_ids=[1]))],
                                 grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "no header": (lambda: [chunk(0, 0, 20)], grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "bytes first": (lambda: [chunk(0, 0, 20)[1]], grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "token count differs from the reservation": (lambda: [header("r", 19)], grpc.StatusCode.INVALID_ARGUMENT,
                                                 "malformed"),
    "unknown data plane": (lambda: [header("r", 20, data_plane="nixl"), chunk(0, 0, 20)],
                           grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    # per-rank channels (torch plane) that do not fit this worker's layout (one rank, 2 KV heads): refused before
    # any channel is looked up
    "rank channels leave a head out": (lambda: [header("r", 20, data_plane="torch", rank_channels=[(0, 0, 0, 1)])],
                                       grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "rank channel to a rank it lacks": (lambda: [header("r", 20, data_plane="torch",
                                                        rank_channels=[(0, 0, 0, 2), (0, 1, 0, 2)])],
                                        grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "rank channels out of order": (lambda: [header("r", 20, data_plane="torch",
                                                   rank_channels=[(1, 0, 0, 1), (0, 0, 1, 2)])],
                                   grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "other layout": (lambda: [header("r", 20, dataclasses.replace(FP, dtype="float16"))],
                     grpc.StatusCode.FAILED_PRECONDITION, "layout_mismatch"),
    "oversized message": (lambda: [header("r", 20), chunk(0, 0, 1, data=b"\0" * (80 << 10), nbytes=256)],
                          grpc.StatusCode.RESOURCE_EXHAUSTED, None),
}


@pytest.mark.parametrize("case", list(BAD_PUSHES))
def test_bad_push_is_refused_and_leaves_the_pool_unchanged(receiver, case):
    rx = receiver(max_message_bytes=64 << 10, chunk_bytes=16 << 10)
    before = rx.pool.kv.data.clone()
    s, md = stub(rx)
    s.Reserve(pb.ReserveRequest(request_id="r", num_tokens=20, fingerprint_digest=FP.digest()), metadata=md)
    assert rx.pool.num_free_blocks == 30
    reserved = rx.table.live["r"].blocks
    messages, code, reason = BAD_PUSHES[case]
    with pytest.raises(grpc.RpcError) as e:
        s.Push(iter(flat(messages())), metadata=md, timeout=10)
    assert e.value.code() == code, e.value.details()
    if reason:
        assert reason_of(e.value) == reason
    if case in ("no header", "bytes first"):  # nothing names the request: the reservation stands (lease, release)
        assert rx.state_of("r") == "reserved"
        rx.release("r")
    wait_for(lambda: rx.pool.num_free_blocks == 32, 5, "the reservation to be released")
    assert rx.state_of("r") == "released"
    others = [b for b in range(32) if b not in reserved]
    assert torch.equal(rx.pool.kv.data[:, :, others], before[:, :, others]), "a push wrote outside its reservation"
    if case not in ("commit before all layers", "layer sent twice"):  # cases with a valid (written) chunk first
        assert torch.equal(rx.pool.kv.data, before), "a refused chunk was written into the pool"
    assert not rx.committed


def test_push_for_unknown_or_cancelled_request_is_refused(receiver):
    rx = receiver()
    s, md = stub(rx)
    with pytest.raises(grpc.RpcError) as e:
        s.Push(iter(flat([header("never", 20), chunk(0, 0, 20)])), metadata=md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and reason_of(e.value) == "unknown_request"
    s.Reserve(pb.ReserveRequest(request_id="gone", num_tokens=20, fingerprint_digest=FP.digest()), metadata=md)
    released = s.Release(pb.ReleaseRequest(request_id="gone", reason="client_disconnected"), metadata=md)
    assert released.state == "reserved"
    with pytest.raises(grpc.RpcError) as e:
        s.Push(iter(flat([header("gone", 20), chunk(0, 0, 20)])), metadata=md)
    assert e.value.code() == grpc.StatusCode.ABORTED and "client_disconnected" in e.value.details()
    assert rx.pool.num_free_blocks == 32


def test_reserve_with_another_layout_is_refused(receiver):
    rx = receiver()
    s, md = stub(rx)
    other = dataclasses.replace(FP, weights_sha256="cd" * 32)
    with pytest.raises(grpc.RpcError) as e:
        s.Reserve(pb.ReserveRequest(request_id="r", num_tokens=20, fingerprint_digest=other.digest()), metadata=md)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rx.pool.num_free_blocks == 32


def test_pairing_accepts_tp_layouts_that_tile_the_kv_heads_and_refuses_the_rest(receiver):
    """The handshake carries each side's tensor-parallel layout (its ranks' KV-head ranges): any TP sizes pair
    when both tile the model's 2 KV heads (TP=1 with TP=2, TP=4 replicating each head on two ranks), and a split
    that does not (two ranks on one head with the other head on none, a range past the model's heads, a range
    count that is not the TP size) is refused with `LayoutMismatch`, from either end, before any request. A peer
    that sends no layout (older than the field) holds every head on one rank."""
    from pdserve.kv_transfer import KVLayout, LayoutMismatch
    from pdserve.kv_transfer.protocol import layout_mismatches

    two = KVLayout(2, ((0, 1), (1, 2)))
    rx = receiver()  # TP=1
    rx2 = receiver()
    rx2.pool.layout = two  # a TP=2 decode worker
    good = [KVLayout.whole(2), two, KVLayout(4, ((0, 1), (0, 1), (1, 2), (1, 2)))]
    bad = {KVLayout(2, ((0, 1), (0, 1))): "do not tile", KVLayout(2, ((0, 2), (2, 4))): "outside the model",
           KVLayout(2, ((0, 2),)): "1 KV-head ranges for tensor-parallel size 2",
           KVLayout(2, ((0, 2), (1, 2))): "an overlap at head 1"}
    for layout in [*good, *bad]:
        for target in (rx, rx2):
            tx = KVSender(KVTransferConfig(), FP, layout=layout)
            try:
                if layout in good:
                    assert tx.pair(target.address).layout == target.pool.layout
                else:
                    with pytest.raises(LayoutMismatch, match=f"layout on the peer: .*{bad[layout]}"):
                        tx.pair(target.address)  # refused by the receiver
            finally:
                tx.close()
    rx2.pool.layout = KVLayout(2, ((0, 1), (0, 1)))  # a receiver whose own split does not tile says so
    tx = KVSender(KVTransferConfig(), FP, layout=two)
    try:
        with pytest.raises(LayoutMismatch, match="layout here: .*do not tile the model's 2 KV heads: heads from 1"):
            tx.pair(rx2.address)
    finally:
        tx.close()
        rx2.pool.layout = two
    assert KVLayout.from_proto(pb.KVLayout(), 2) == KVLayout.whole(2)  # an older peer's absent field
    assert KVLayout.from_proto(two.to_proto(), 2) == two
    assert not layout_mismatches(FP, two, good[2])
    assert two.overlaps(KVLayout.whole(2)) == [(0, 0, 0, 1), (1, 0, 1, 2)]
    assert KVLayout.whole(2).overlaps(good[2]) == [(0, 0, 0, 1), (0, 1, 0, 1), (0, 2, 1, 2), (0, 3, 1, 2)]
    assert rx.pool.num_free_blocks == 32 and rx2.pool.num_free_blocks == 32


def _stream(rid, n, fp=FP) -> LayerStream:
    """A complete push of random KV for `n` tokens."""
    return LayerStream.complete(rid, [torch.randn(2, n, fp.num_kv_heads, fp.head_dim) for _ in range(fp.num_layers)],
                                list(range(n)), [7])


def test_shared_secret_is_required(receiver):
    rx = receiver(auth_token="s3cret")
    for token in (None, "wrong"):
        tx = KVSender(KVTransferConfig(auth_token=token), FP)
        try:
            with pytest.raises(AuthenticationFailed):
                tx.pair(rx.address)
        finally:
            tx.close()
    s, _ = stub(rx)
    with pytest.raises(grpc.RpcError) as e:  # a push without the secret is refused before it is read
        s.Reserve(pb.ReserveRequest(request_id="r", num_tokens=4, fingerprint_digest=FP.digest()))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    tx = KVSender(KVTransferConfig(auth_token="s3cret"), FP)
    try:
        tx.reserve(rx.address, "r", 20)
        assert tx.push(rx.address, _stream("r", 20)).result(10).bytes == 20 * 256 * 2
    finally:
        tx.close()
    release_committed(rx)


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdserve-decode")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("pdserve-decode")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_a_kv_server_beyond_loopback_needs_tls_or_an_explicit_opt_out(receiver, tmp_path):
    """The wildcard bind a multi-node deployment uses: refused in plaintext (the KV bytes and the
    auth token would cross the network readable) unless TLS is configured or plaintext is allowed
    explicitly; with TLS a push works and a plaintext sender is refused."""
    with pytest.raises(InsecureConfig, match="tls_cert_file"):
        KVTransferConfig(host="0.0.0.0", auth_token="s3cret")
    with pytest.raises(InsecureConfig, match="tls_cert_file"):
        PdserveConfig().replace(kv_transfer={"host": "::", "auth_token": "s3cret"})
    assert KVTransferConfig(host="0.0.0.0", auth_token="s3cret", allow_plaintext=True).allow_plaintext
    cert, key = _self_signed(tmp_path)
    rx = receiver(host="0.0.0.0", tls_cert_file=cert, tls_key_file=key, auth_token="s3cret")
    address = f"127.0.0.1:{rx.port}"
    plain = KVSender(KVTransferConfig(auth_token="s3cret", rpc_timeout_s=2), FP)
    try:
        with pytest.raises(PeerUnavailable):
            plain.pair(address)
    finally:
        plain.close()
    tx = KVSender(KVTransferConfig(auth_token="s3cret", tls_ca_file=cert, tls_server_name="pdserve-decode"), FP)
    try:
        tx.reserve(address, "r", 5)
        assert tx.push(address, _stream("r", 5)).result(10).bytes == 5 * 256 * 2
    finally:
        tx.close()
    release_committed(rx)


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port`, from /proc/net/tcp and tcp6 (what `ss -ltn`
    reads; iproute2 is not on every machine the tests run on)."""
    addresses = set()
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            rows = Path(path).read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
        for row in rows:
            fields = row.split()
            host, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(host)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addresses.add(str(ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw)))
    return addresses


def test_the_nccl_transports_store_listens_where_kv_transfer_host_says(receiver):
    """The TCPStore a decode worker hosts for channel rendezvous (unauthenticated) binds
    `kv_transfer.host`, as the KV server does; a TCPStore left to itself listens on every interface."""
    rx = receiver(kv_transport="nccl")
    push_once(rx, KVTransferConfig(kv_transport="nccl"), "r", 10)
    store = rx.planes["torch"]._store
    assert store is not None
    assert _listening_addresses(store.port) == {"127.0.0.1"}


SENDER_SCRIPT = textwrap.dedent("""
    import json, sys, threading, torch
    from pdserve.engine.config import KVTransferConfig
    from pdserve.kv_transfer import Fingerprint, KVSender, LayerStream
    args = json.loads(sys.argv[1])
    tx = KVSender(KVTransferConfig(kv_transport=args["transport"]), Fingerprint(**args["fp"]))
    tx.reserve(args["address"], "victim", 40)
    stream = LayerStream("victim", 40)
    stream.put_layer(0, torch.randn(2, 40, 2, 16))  # half the layers, then this process is killed
    tx.push(args["address"], stream)
    print("pushing", flush=True)
    threading.Event().wait()
""")


@pytest.mark.parametrize("transport", ["grpc", "nccl"])
def test_sender_process_killed_mid_stream(receiver, transport):
    rx = receiver(kv_transport=transport, idle_timeout_s=3.0)
    args = json.dumps({"transport": transport, "address": rx.address, "fp": dataclasses.asdict(FP)})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SENDER_SCRIPT, args], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == b"pushing"
        wait_for(lambda: rx.state_of("victim") == "receiving", 20, "the push to start")
        assert rx.pool.num_free_blocks == 29
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        took = wait_for(lambda: rx.pool.num_free_blocks == 32, 3.0 + 2.0, "the dead sender's blocks")
        assert rx.state_of("victim") == "released"
        print(f"{transport}: reclaimed {took:.3f}s after the kill")
    finally:
        proc.kill()
    # The survivor tore down its end of the dead push's channel (its state is unknown; no recv was
    # running, so nothing else would have), and still takes pushes, over a fresh channel.
    assert len(rx.planes["torch"].channels) == 0
    push_once(rx, KVTransferConfig(kv_transport=transport), "after", 10)


def test_nccl_channels_are_refused_between_ranks_on_one_cuda_device(receiver):
    """NCCL cannot pair two ranks on one device: OpenChannel refuses it with a typed error before
    either end builds a group. Identities are GPU UUIDs (`device_identity`); on CPU a pool has none,
    so the receiver's is set here, and the sender's sent as the wire carries it."""
    check_distinct_devices("", "")  # CPU: gloo pairs ranks on one host happily
    check_distinct_devices("GPU-1111", "GPU-2222")
    with pytest.raises(SharedDevice, match="GPU-1111"):
        check_distinct_devices("GPU-1111", "GPU-1111")
    rx = receiver(kv_transport="nccl")
    rx.planes["torch"].device = "GPU-1111"
    s, md = stub(rx)
    with pytest.raises(grpc.RpcError) as e:
        s.OpenChannel(pb.OpenChannelRequest(channel_id="c", backend="gloo", device="GPU-1111"), metadata=md)
    assert error_class(dict(e.value.trailing_metadata()).get(REASON_METADATA_KEY), e.value.code().name) is SharedDevice
    assert len(rx.planes["torch"].channels) == 0 and not rx.planes["torch"]._pending


def test_nccl_groups_are_built_to_raise_rather_than_end_the_process(monkeypatch):
    """TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (abort the communicator, raise from wait) while a
    ProcessGroupNCCL is built, which reads it then; the operator's environment is left as it was."""
    for before in (None, "3"):
        if before is None:
            monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
        else:
            monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", before)
        with nccl_error_handling():
            assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
        assert os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == before


@pytest.mark.gpu
def test_a_cuda_pair_on_one_device_is_refused_and_leaves_the_receiver_whole():
    """With a real CUDA pool and sender on one GPU: the push fails with SharedDevice (instead of
    NCCL hanging or aborting), and no block or channel is left behind."""
    rx = KVReceiver(KVPool.standalone(FP, 32, "cuda:0"), KVTransferConfig(kv_transport="nccl"), lambda _: None).start()
    tx = KVSender(KVTransferConfig(kv_transport="nccl"), FP, device="cuda:0")
    try:
        tx.reserve(rx.address, "r", 10)
        with pytest.raises(SharedDevice):
            tx.push(rx.address, _stream("r", 10)).result(30)
        wait_for(lambda: rx.pool.num_free_blocks == 32, 10, "the refused push's blocks")
        assert len(rx.planes["torch"].channels) == 0
    finally:
        tx.close()
        rx.stop()


RECEIVER_SCRIPT = textwrap.dedent("""
    import json, sys, threading
    from pdserve.engine.config import KVTransferConfig
    from pdserve.kv_transfer import Fingerprint, KVPool, KVReceiver
    args = json.loads(sys.argv[1])
    pool = KVPool.standalone(Fingerprint(**args["fp"]), 32)
    rx = KVReceiver(pool, KVTransferConfig(**args["kv"]), lambda received: None).start()
    print(rx.address, flush=True)
    threading.Event().wait()
""")


@pytest.mark.parametrize("bound", ["keepalive", "deadline"])
def test_a_push_into_a_frozen_receiver_fails_within_its_bound(bound):
    """The receiver's process is frozen (SIGSTOP: its kernel still accepts the bytes, nothing answers) after it
    reserved: the push fails with a typed error within keepalive_time_s + keepalive_timeout_s (1.5 s), or
    within push_timeout_s (2 s) with keepalive at its default (10 + 10 s), plus the bounded release the
    sender sends after it (rpc_timeout_s, 1 s). Without either it would wait forever."""
    kv = {"keepalive_time_s": 0.5, "keepalive_timeout_s": 1.0} if bound == "keepalive" else {"push_timeout_s": 2.0}
    kv["rpc_timeout_s"] = 1.0
    args = json.dumps({"fp": dataclasses.asdict(FP), "kv": kv})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER_SCRIPT, args], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        address = proc.stdout.readline().decode().strip()
        tx = KVSender(KVTransferConfig(**kv), FP)
        try:
            tx.reserve(address, "frozen", 20)
            proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            push = tx.push(address, _stream("frozen", 20))
            with pytest.raises(PeerUnavailable if bound == "keepalive" else TransferTimeout):
                push.result(15)
            took = time.monotonic() - t0
            assert took < (1.5 if bound == "keepalive" else 2.0) + 1.0 + 3.0, took
            print(f"{bound}: the push failed {took:.2f}s after the receiver froze")
        finally:
            tx.close()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def test_channels_per_worker_are_bounded(receiver):
    rx1, rx2 = receiver(kv_transport="nccl"), receiver(kv_transport="nccl")
    tx = KVSender(KVTransferConfig(kv_transport="nccl", max_channels=1), FP)
    try:
        for i, rx in enumerate([rx1, rx2, rx1]):
            tx.reserve(rx.address, f"r{i}", 10)
            tx.push(rx.address, _stream(f"r{i}", 10)).result(20)
            assert len(tx.plane.channels) == 1
            release_committed(rx)
    finally:
        tx.close()


def _sample(name, labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_are_recorded_on_the_receiving_side(receiver):
    rx = receiver()
    keys = [
        ("pdserve_kv_transfer_latency_seconds_count", {"transport": "grpc"}),
        ("pdserve_kv_transfer_bytes_sum", {"transport": "grpc"}),
        ("pdserve_kv_transfer_bytes_total", {"transport": "grpc"}),
        ("pdserve_kv_transfer_failures_total", {"transport": "grpc", "reason": "checksum"}),
        ("pdserve_kv_transfer_stage_seconds_count", {"transport": "grpc", "stage": "first_byte"})]
    before = [_sample(*k) for k in keys]
    push_once(rx, KVTransferConfig(), "ok", 20)
    s, md = stub(rx)
    s.Reserve(pb.ReserveRequest(request_id="bad", num_tokens=20, fingerprint_digest=FP.digest()))
    with pytest.raises(grpc.RpcError):
        s.Push(iter(flat([header("bad", 20), chunk(0, 0, 20, corrupt=True)])))
    delta = [_sample(*k) - b for k, b in zip(keys, before, strict=True)]
    assert delta == [1, 20 * 512, 20 * 512 + 20 * 256, 1, 1]


def test_every_error_names_a_grpc_status_and_comes_back_as_itself():
    """Errors carry their status as a plain name (kv_transfer.errors needs no gRPC); the name must be
    a real status, and a failed call carrying it (with its reason) must raise the same class."""
    from pdserve.kv_transfer import errors
    from pdserve.kv_transfer.faults import InjectedFault
    from pdserve.kv_transfer.protocol import error_from_rpc, grpc_status

    classes = [getattr(errors, n) for n in errors.__all__ if n != "error_class"]
    assert len(classes) == 15
    for cls in classes:
        code = grpc_status(cls("x"))
        assert isinstance(code, grpc.StatusCode) and code.name == cls.code
        md = grpc.aio.Metadata((REASON_METADATA_KEY, cls.reason))
        assert type(error_from_rpc(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), md, "details"))) is cls
    assert grpc_status(InjectedFault("x")) == grpc.StatusCode.UNAVAILABLE  # retryable, like a lost peer
    unnamed = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    assert type(error_from_rpc(unnamed)) is PeerUnavailable  # gRPC's own status, no reason: by code


def test_data_planes_are_picked_by_config_and_by_header():
    from pdserve.kv_transfer import data_plane

    assert data_plane.for_transport("grpc").wire_name == "grpc"
    assert data_plane.for_transport("nccl").wire_name == "torch"
    assert data_plane.for_wire("") is data_plane.for_wire("grpc")  # a header that names none: inline
    assert data_plane.for_backend("gloo") is data_plane.for_backend("nccl") is data_plane.for_wire("torch")
    with pytest.raises(MalformedTransfer):
        data_plane.for_wire("nixl")
    with pytest.raises(MalformedTransfer):
        data_plane.for_backend("ucx")
    for transport, plane in (("grpc", data_plane.InlineSender), ("nccl", data_plane.TorchSender)):
        tx = KVSender(KVTransferConfig(kv_transport=transport), FP)
        try:
            assert type(tx.plane) is plane
        finally:
            tx.close()


def test_local_reservation_takes_a_push_with_no_reserve_call(receiver):
    rx = receiver(lease_s=30)
    got = rx.reserve("r", 20, lease_s=5)
    assert got == LocalReservation("r", num_blocks=2, lease_s=5.0)
    assert rx.pool.num_free_blocks == 30 and rx.state_of("r") == "reserved"
    tx = KVSender(KVTransferConfig(), FP)
    try:
        assert tx.push(rx.address, _stream("r", 20)).result(10).bytes == 20 * 256 * 2  # no tx.reserve
    finally:
        tx.close()
    assert rx.committed[0].request_id == "r" and rx.state_of("r") == "committed"
    release_committed(rx)
    assert rx.reserve("capped", 1, lease_s=999).lease_s == 30.0  # never more than the receiver grants
    assert rx.release("capped") == "reserved" and rx.pool.num_free_blocks == 32


def test_reserve_future_from_another_event_loop_refuses_like_the_rpc(receiver):
    rx = receiver(num_blocks=4)

    async def reserve(rid: str, n: int):
        return await asyncio.wrap_future(rx.reserve_future(rid, n))

    too_large0 = _sample("pdserve_kv_transfer_failures_total", {"transport": "grpc", "reason": "too_large"})
    assert asyncio.run(reserve("a", 48)) == LocalReservation("a", 3, rx.config.lease_s)
    with pytest.raises(ReservationTooLarge):
        asyncio.run(reserve("huge", 5 * 16))
    with pytest.raises(ReservationRefused):
        asyncio.run(reserve("b", 2 * 16))  # fits the pool, not what is free of it
    assert _sample("pdserve_kv_transfer_failures_total", {"transport": "grpc", "reason": "too_large"}) == too_large0 + 1
    assert rx.pool.num_free_blocks == 1 and rx.state_of("b") == "unknown"
    assert rx.release("a") == "reserved" and rx.pool.num_free_blocks == 4


def test_local_reservation_lease_expires(receiver):
    """The reaper is woken by a local reserve as by a Reserve call: with no other reservation it has no
    deadline to wake for, so without the wake-up this lease would never be reclaimed."""
    rx = receiver(lease_s=0.3)
    rx.reserve("r", 20)
    assert rx.pool.num_free_blocks == 30
    assert wait_for(lambda: rx.pool.num_free_blocks == 32, 5, "the lease to expire") < 2.0
    tx = KVSender(KVTransferConfig(), FP)
    try:
        with pytest.raises(RequestReleased, match="lease_expired"):
            tx.push(rx.address, _stream("r", 20)).result(10)
    finally:
        tx.close()


def test_release_soon_does_not_wait_for_a_busy_receiver_loop(receiver):
    rx = receiver()
    rx.reserve("r", 20)
    entered, unblock = threading.Event(), threading.Event()

    async def hog():  # the receiver's loop busy (a long write, a slow on_commit): it runs nothing else
        entered.set()
        unblock.wait(30)

    hogging = asyncio.run_coroutine_threadsafe(hog(), rx._loop)
    try:
        assert entered.wait(10)
        t0 = time.perf_counter()
        fut = rx.release_soon("r", "client_disconnected")
        took = time.perf_counter() - t0
        assert took < 0.1, f"release_soon took {took:.3f}s"
        assert not fut.done() and rx.pool.num_free_blocks == 30  # scheduled, not done: the loop is held
    finally:
        unblock.set()
    hogging.result(10)
    assert fut.result(10) == "reserved"
    assert rx.pool.num_free_blocks == 32 and rx.state_of("r") == "released"
    assert rx.release_soon("r", "again").result(10) == "released"  # idempotent, like release()

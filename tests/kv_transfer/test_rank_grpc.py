"""The grpc transport's per-rank KV endpoints (`kv_transfer.rank_grpc`) over real gRPC on loopback: a receiving
rank's endpoint takes parts in order, only with the KV plane's secret and within its message limit, and a part
nobody takes fails its call at the channel timeout and is not kept."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

from pdserve.engine.config import KVTransferConfig
from pdserve.kv_transfer.errors import PeerUnavailable
from pdserve.kv_transfer.rank_grpc import PartEndpoint, PartReceiver, PartSender
from tests.helpers import wait_for


def _config(**kw) -> KVTransferConfig:
    return KVTransferConfig(auth_token="s3cret", max_message_bytes=1 << 20, chunk_bytes=256 << 10, **kw)


def _code(work) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        work.result(10)
    return e.value.code()


def test_a_rank_endpoint_takes_parts_in_order_with_the_secret_within_its_limit():
    cfg = _config(channel_timeout_s=10)
    ep = PartEndpoint.shared(cfg)
    rx = PartReceiver(ep, "rank-test-a", 10)
    good = PartSender(cfg, "rank-test-a", ep.host, ep.port)
    wrong = PartSender(dataclasses.replace(cfg, auth_token="wrong"), "rank-test-a", ep.host, ep.port)
    none = PartSender(KVTransferConfig(), "rank-test-a", ep.host, ep.port)
    try:
        for sender in (wrong, none):  # refused before the part reaches the endpoint
            work = sender.post_send(torch.ones(4))
            assert _code(work) == grpc.StatusCode.UNAUTHENTICATED
            assert sender.send_done(work, 0) is False and sender.closed
        big = PartSender(cfg, "rank-test-a", ep.host, ep.port)  # a failed send closes its channel: one of its own
        assert _code(big.post_send(torch.zeros((1 << 20) // 4 + 1))) == grpc.StatusCode.RESOURCE_EXHAUSTED
        big.close()
        parts = [torch.arange(8, dtype=torch.float32) + i for i in range(3)]
        posted = [good.post_send(p) for p in parts]  # sent at once, each call over when its part is taken
        for p in parts:
            out = torch.empty(8)
            rx.recv(out)
            assert torch.equal(out, p)
        assert all(good.send_done(w, float("inf")) in (True, None) for w in posted)
        for w in posted:
            w.result(10)
        assert all(good.send_done(w, 0) for w in posted) and ep.waiting == 0
        assert _code(PartSender(cfg, "no-such-channel", ep.host, ep.port).post_send(torch.ones(2))) == \
            grpc.StatusCode.NOT_FOUND
        rx.close()
        with pytest.raises(PeerUnavailable):
            rx.recv(torch.empty(8))
    finally:
        for s in (good, wrong, none):
            s.close()


def test_a_part_nobody_takes_fails_its_call_at_the_channel_timeout_and_is_dropped():
    cfg = _config(channel_timeout_s=0.5)
    ep = PartEndpoint.shared(cfg)
    PartReceiver(ep, "rank-test-b", 0.5)  # opened, never received from
    tx = PartSender(cfg, "rank-test-b", ep.host, ep.port)
    try:
        work = tx.post_send(torch.ones(16))
        assert _code(work) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert tx.send_done(work, 0) is False and tx.closed
        with pytest.raises(PeerUnavailable):
            tx.post_send(torch.ones(16))
        wait_for(lambda: ep.waiting == 0, 5, "the part not taken dropped")  # its call ended on both sides
    finally:
        tx.close()

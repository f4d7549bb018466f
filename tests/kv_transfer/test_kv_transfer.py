"""KV transfer between real engines over a real gRPC server (and gloo channels):
bit-identical KV, greedy equality with colocated decoding, and every failure path
leaving both pools' free-block counts where they started."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import pytest
import torch

from pdserve.engine.config import KVTransferConfig
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import FinishReason
from pdserve.engine.streams import DONE
from pdserve.engine.tiny_models import save_tiny_model
from pdserve.kv_transfer import (
    KVPool,
    KVReceiver,
    KVSender,
    LayerStream,
    LayoutMismatch,
    ReservationRefused,
    TransferCancelled,
)
from tests.helpers import check_no_leak, wait_for

TRANSPORTS = ["grpc", "nccl"]


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory):
    """A tiny model with room for 2,000-token prompts."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-long"), max_positions=4096)


class RecordingStream(LayerStream):
    """A LayerStream that keeps a copy of what the prefill side shipped."""

    def __init__(self, request_id, num_tokens):
        super().__init__(request_id, num_tokens)
        self.shipped: dict[int, torch.Tensor] = {}

    def put_layer(self, layer, kv, ready=DONE):
        ready.synchronize()  # on CUDA `kv` is valid once its copy's event is done
        self.shipped[layer] = kv.clone()
        super().put_layer(layer, kv, ready)


@dataclass
class Env:
    pre: object
    dec: object
    rx: KVReceiver
    tx: KVSender
    got: queue.Queue = field(default_factory=queue.Queue)

    def prefill(self, rid: str, prompt: list[int], params: SamplingParams, stream_cls=LayerStream):
        """Reserve on the decode side, run the prompt prefill-only, push; returns (result, received, stream)."""
        self.tx.reserve(self.rx.address, rid, len(prompt))
        stream = stream_cls(rid, len(prompt))
        fut = self.tx.push(self.rx.address, stream)
        self.pre.add_request(rid, prompt, params, kv_sink=stream)
        outs = []
        while self.pre.has_unfinished():
            outs += self.pre.step()
        assert outs[-1].finish_reason is FinishReason.PREFILLED
        return fut.result(30), self.got.get(timeout=10), stream


@pytest.fixture
def transfer_env(make_engine, long_model_dir):
    made: list[Env] = []

    def make(transport="grpc", block_size=16, num_blocks=512, layerwise=True, device="cpu", **kv) -> Env:
        cfg = {"kv_transport": transport, "layerwise": layerwise, **kv}
        pre = make_engine(long_model_dir, cache={"block_size": block_size, "num_kv_blocks": num_blocks},
                          kv_transfer=cfg, model={"device": device})
        dec = make_engine(long_model_dir, cache={"block_size": block_size, "num_kv_blocks": num_blocks},
                          kv_transfer=cfg, model={"device": device})
        got: queue.Queue = queue.Queue()
        rx = KVReceiver(KVPool.from_engine(dec), dec.config.kv_transfer, got.put).start()
        tx = KVSender(pre.config.kv_transfer, KVPool.from_engine(pre).fingerprint, device=device)
        env = Env(pre, dec, rx, tx, got)
        made.append(env)
        return env

    yield make
    for env in made:
        env.tx.close()
        env.rx.stop()


def decode_to_end(engine, rid, received, params) -> list[int]:
    engine.add_received_request(rid, received, params)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final = out
    return final.output_token_ids


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("n", [1, 17, 2000])
def test_kv_bit_identical_and_decoding_matches_colocated(transfer_env, transport, block_size, n):
    env = transfer_env(transport, block_size, num_blocks=2100 if block_size == 1 else 140)
    prompt = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    free0 = env.dec.block_manager.num_free_blocks

    result, received, stream = env.prefill("r", prompt, params, RecordingStream)

    assert result.bytes == n * env.rx.pool.fingerprint.bytes_per_token_layer * env.pre.arch.num_layers
    assert received.num_tokens == n and received.prompt_token_ids == prompt and len(received.output_token_ids) == 1
    layers = env.dec.kv.export(received.block_table, n)
    assert sorted(stream.shipped) == list(range(env.pre.arch.num_layers))
    for i, t in enumerate(layers):
        assert torch.equal(t, stream.shipped[i]), f"layer {i} differs after transfer"
    check_no_leak(env.pre)  # the prefill side's blocks went back as soon as its sequence finished

    tokens = decode_to_end(env.dec, "r", received, params)
    colocated = env.pre.generate([prompt], params)[0].output_token_ids
    assert tokens == colocated
    assert env.dec.block_manager.num_free_blocks == free0


@pytest.mark.gpu
@pytest.mark.parametrize("layerwise", [True, False])
def test_cuda_kv_copied_on_the_transfer_stream_arrives_bit_identical(transfer_env, layerwise):
    """Both engines on one GPU, grpc: each layer is gathered and staged to pinned memory on the transfer stream
    (the sender waits for its event), and lands in the decode pool on the receiver's; the KV is the prefill
    engine's, bit for bit, and decoding from it matches the prefill engine decoding alone."""
    env = transfer_env("grpc", num_blocks=140, layerwise=layerwise, device="cuda")
    assert env.pre.transfer.is_async and env.rx.pool.transfer is env.pre.transfer  # one stream per device
    prompt = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(7)).tolist()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    result, received, stream = env.prefill("r", prompt, params, RecordingStream)
    for i, t in enumerate(env.dec.kv.export(received.block_table, len(prompt))):
        assert torch.equal(t.cpu(), stream.shipped[i].cpu()), f"layer {i} differs after transfer"
    assert decode_to_end(env.dec, "r", received, params) == env.pre.generate([prompt], params)[0].output_token_ids


@pytest.mark.parametrize("layerwise", [True, False])
def test_layerwise_and_whole_pushes_agree(transfer_env, layerwise):
    env = transfer_env("grpc", layerwise=layerwise)
    prompt = list(range(3, 60))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    _, received, _ = env.prefill("r", prompt, params)
    assert decode_to_end(env.dec, "r", received, params) == env.pre.generate([prompt], params)[0].output_token_ids


def test_chunked_prefill_ships_the_whole_prompt(transfer_env):
    env = transfer_env("grpc")
    env.pre.reconfigure_scheduler(env.pre.config.scheduler.__class__(max_prefill_chunk=16))
    prompt = list(range(1, 50))  # four chunks: only the last step ships, all 49 tokens of each layer
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    _, received, stream = env.prefill("r", prompt, params, RecordingStream)
    assert all(t.shape[1] == 49 for t in stream.shipped.values())
    assert decode_to_end(env.dec, "r", received, params) == env.pre.generate([prompt], params)[0].output_token_ids


def test_decode_side_without_room_refuses_up_front(transfer_env):
    env = transfer_env("grpc", num_blocks=8)
    free0 = env.dec.block_manager.num_free_blocks
    from pdserve.kv_transfer import ReservationTooLarge

    with pytest.raises(ReservationTooLarge, match="need 9 blocks"):  # could never fit: no point waiting
        env.tx.reserve(env.rx.address, "big", 9 * 16)
    assert env.dec.block_manager.num_free_blocks == free0
    assert env.rx.state_of("big") == "unknown"
    env.tx.reserve(env.rx.address, "fits", 8 * 16)  # the whole pool is fine
    with pytest.raises(ReservationRefused):
        env.tx.reserve(env.rx.address, "second", 1)
    assert env.tx.release(env.rx.address, "fits") == "reserved"
    assert env.dec.block_manager.num_free_blocks == free0


def test_first_token_eos_releases_the_reservation(transfer_env):
    """A request that finishes on the prefill side (its first token is a stop token) is not handed over."""
    env = transfer_env("grpc")
    free0 = env.dec.block_manager.num_free_blocks
    prompt = list(range(5, 25))
    first = env.pre.generate([prompt], SamplingParams(max_tokens=1, temperature=0))[0].output_token_ids[0]
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first])
    env.tx.reserve(env.rx.address, "r", len(prompt))
    stream = LayerStream("r", len(prompt))
    fut = env.tx.push(env.rx.address, stream)
    env.pre.add_request("r", prompt, params, kv_sink=stream)
    (out,) = env.pre.step()
    assert out.finish_reason is FinishReason.STOP and out.output_token_ids == [first]
    with pytest.raises(TransferCancelled, match="finished on the prefill side"):
        fut.result(10)
    wait_for(lambda: env.dec.block_manager.num_free_blocks == free0, 5, "the reservation to be released")
    assert env.rx.state_of("r") == "released"


def test_prefill_abort_cancels_the_push(transfer_env):
    env = transfer_env("nccl")
    free0 = env.dec.block_manager.num_free_blocks
    prompt = list(range(1, 40))
    env.tx.reserve(env.rx.address, "r", len(prompt))
    stream = LayerStream("r", len(prompt))
    fut = env.tx.push(env.rx.address, stream)
    env.pre.add_request("r", prompt, SamplingParams(max_tokens=4), kv_sink=stream)
    env.pre.abort("r")  # e.g. the client disconnected while the request was queued for prefill
    with pytest.raises(TransferCancelled):
        fut.result(10)
    wait_for(lambda: env.dec.block_manager.num_free_blocks == free0, 5, "the reservation to be released")


def test_sender_cancel_mid_stream_frees_both_sides(transfer_env):
    env = transfer_env("grpc")
    free0 = env.dec.block_manager.num_free_blocks
    env.tx.reserve(env.rx.address, "r", 40)
    stream = LayerStream("r", 40)
    stream.put_layer(0, torch.zeros(2, 40, 2, 16))  # one layer, then the producer stalls
    fut = env.tx.push(env.rx.address, stream)
    wait_for(lambda: env.rx.state_of("r") == "receiving", 5, "the push to start")
    env.tx.cancel("r")
    with pytest.raises(TransferCancelled):
        fut.result(10)
    wait_for(lambda: env.dec.block_manager.num_free_blocks == free0, 5, "the reservation to be released")
    assert env.rx.state_of("r") == "released"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_decode_side_abort_fails_the_push(transfer_env, transport):
    """The router (or the decode worker) releases first: the sender gets a typed error."""
    env = transfer_env(transport)
    free0 = env.dec.block_manager.num_free_blocks
    env.tx.reserve(env.rx.address, "r", 40)
    stream = LayerStream("r", 40)
    stream.put_layer(0, torch.zeros(2, 40, 2, 16))
    fut = env.tx.push(env.rx.address, stream)
    wait_for(lambda: env.rx.state_of("r") == "receiving", 5, "the push to start")
    assert env.rx.release("r", "client_disconnected") == "receiving"
    assert env.rx.release("r", "again") == "released"  # idempotent
    assert env.dec.block_manager.num_free_blocks == free0
    stream.put_layer(1, torch.zeros(2, 40, 2, 16))
    stream.commit(list(range(40)), [1])
    from pdserve.kv_transfer import RequestReleased

    with pytest.raises(RequestReleased, match="client_disconnected"):
        fut.result(10)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_push_into_a_reservation_the_decode_side_made(transfer_env, transport):
    """The decode worker reserves locally when a request opens; the prefill worker pushes straight into
    it (no Reserve call of its own), and the blocks come back after decoding and after a release."""
    env = transfer_env(transport)
    free0 = env.dec.block_manager.num_free_blocks
    prompt = list(range(7, 50))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    local = env.rx.reserve("r", len(prompt))
    assert (local.request_id, local.num_blocks) == ("r", 3)
    assert env.dec.block_manager.num_free_blocks == free0 - 3
    stream = LayerStream("r", len(prompt))
    fut = env.tx.push(env.rx.address, stream)
    env.pre.add_request("r", prompt, params, kv_sink=stream)
    while env.pre.has_unfinished():
        env.pre.step()
    assert fut.result(30).bytes == len(prompt) * env.rx.pool.fingerprint.bytes_per_token_layer * env.pre.arch.num_layers
    received = env.got.get(timeout=10)
    assert decode_to_end(env.dec, "r", received, params) == env.pre.generate([prompt], params)[0].output_token_ids
    assert env.dec.block_manager.num_free_blocks == free0  # committed, decoded, freed by the engine
    env.rx.reserve("gone", len(prompt))
    assert env.rx.release("gone", "client_disconnected") == "reserved"
    assert env.dec.block_manager.num_free_blocks == free0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_forget_cancels_pushes_to_that_worker_only(transfer_env, transport):
    env = transfer_env(transport)
    other = transfer_env(transport)  # a second decode worker the same sender keeps pushing to
    free0 = env.dec.block_manager.num_free_blocks
    env.tx.reserve(env.rx.address, "r", 40)
    stream = LayerStream("r", 40)
    stream.put_layer(0, torch.zeros(2, 40, 2, 16))  # one layer, then the producer stalls: a push in flight
    fut = env.tx.push(env.rx.address, stream)
    wait_for(lambda: env.rx.state_of("r") == "receiving", 5, "the push to start")
    env.tx.reserve(other.rx.address, "o", 40)
    kept = LayerStream("o", 40)
    kept.put_layer(0, torch.zeros(2, 40, 2, 16))
    kept_fut = env.tx.push(other.rx.address, kept)
    wait_for(lambda: other.rx.state_of("o") == "receiving", 5, "the other push to start")

    env.tx.forget(env.rx.address)  # returns once its pushes have ended
    with pytest.raises(TransferCancelled):
        fut.result(0)
    assert not kept_fut.done()
    wait_for(lambda: env.dec.block_manager.num_free_blocks == free0, 5, "the reservation to be released")
    assert env.rx.state_of("r") == "released"
    env.tx.forget("127.0.0.1:1")  # never paired: nothing to do, no error

    kept.put_layer(1, torch.zeros(2, 40, 2, 16))
    kept.commit(list(range(40)), [1])
    assert kept_fut.result(10).bytes == 40 * 256 * 2
    env.tx.reserve(env.rx.address, "again", 40)  # the forgotten worker can be paired with afresh
    assert env.tx.push(env.rx.address, _zeros_stream("again", 40)).result(10).bytes == 40 * 256 * 2
    for e, rid in ((other, "o"), (env, "again")):
        received = e.got.get(timeout=5)
        assert received.request_id == rid
        with e.dec.kv_lock:
            e.dec.block_manager.free(received.block_table)


def test_incompatible_pair_is_refused_before_any_request(transfer_env):
    env = transfer_env("grpc")
    fp = env.tx.fingerprint
    import dataclasses

    for change in ({"weights_sha256": "0" * 64}, {"dtype": "bfloat16"}, {"block_size": 1},
                   {"pdserve_version": "9.9.9"}, {"num_layers": 3}):
        other = KVSender(env.tx.config, dataclasses.replace(fp, **change))
        try:
            with pytest.raises(LayoutMismatch, match=next(iter(change))):
                other.pair(env.rx.address)
        finally:
            other.close()


def test_lease_expires_when_the_prefill_side_never_pushes(transfer_env):
    env = transfer_env("grpc", lease_s=0.3)
    free0 = env.dec.block_manager.num_free_blocks
    env.tx.reserve(env.rx.address, "r", 100)
    assert env.dec.block_manager.num_free_blocks == free0 - 7
    took = wait_for(lambda: env.dec.block_manager.num_free_blocks == free0, 5, "the lease to expire")
    assert took < 2.0
    assert env.rx.state_of("r") == "released"
    from pdserve.kv_transfer import RequestReleased

    with pytest.raises(RequestReleased, match="lease_expired"):
        env.tx.push(env.rx.address, _zeros_stream("r", 100)).result(5)


def test_stalled_sender_times_out(transfer_env):
    env = transfer_env("grpc", idle_timeout_s=0.3)
    free0 = env.dec.block_manager.num_free_blocks
    env.tx.reserve(env.rx.address, "r", 40)
    stream = LayerStream("r", 40)
    stream.put_layer(0, torch.zeros(2, 40, 2, 16))
    fut = env.tx.push(env.rx.address, stream)
    from pdserve.kv_transfer import TransferTimeout

    with pytest.raises(TransferTimeout):
        fut.result(10)
    assert env.dec.block_manager.num_free_blocks == free0


def test_push_opens_when_the_first_layers_are_ready(transfer_env):
    """A prompt that waits in the prefill queue (or prefills in chunks) longer than the receiver's idle
    timeout still transfers: the stream opens with the first layers, not at push()."""
    env = transfer_env("grpc", idle_timeout_s=0.2)
    env.tx.reserve(env.rx.address, "r", 40)
    stream = LayerStream("r", 40)
    fut = env.tx.push(env.rx.address, stream)
    with pytest.raises(TimeoutError):
        fut.result(0.6)  # three idle timeouts with nothing to send
    assert env.rx.state_of("r") == "reserved"
    for i in range(2):
        stream.put_layer(i, torch.zeros(2, 40, 2, 16))
    stream.commit(list(range(40)), [1])
    assert fut.result(10).bytes == 40 * 256 * 2
    received = env.got.get(timeout=5)
    with env.dec.kv_lock:
        env.dec.block_manager.free(received.block_table)


def test_release_overtaking_reserve_refuses_it(transfer_env):
    """A client that cancelled in the proxy window: the release arrives before the reservation."""
    env = transfer_env("grpc")
    free0 = env.dec.block_manager.num_free_blocks
    assert env.tx.release(env.rx.address, "r", "client_disconnected") == "unknown"
    from pdserve.kv_transfer import RequestReleased

    with pytest.raises(RequestReleased):
        env.tx.reserve(env.rx.address, "r", 10)
    assert env.dec.block_manager.num_free_blocks == free0


def test_on_commit_refusal_frees_the_blocks(make_engine, long_model_dir):
    dec = make_engine(long_model_dir)
    pool = KVPool.from_engine(dec)

    def refuse(received):
        raise ValueError("draining")

    rx = KVReceiver(pool, dec.config.kv_transfer, refuse).start()
    tx = KVSender(dec.config.kv_transfer, pool.fingerprint)
    try:
        tx.reserve(rx.address, "r", 30)
        from pdserve.kv_transfer import KVTransferError

        with pytest.raises(KVTransferError, match="draining"):
            tx.push(rx.address, _zeros_stream("r", 30)).result(10)
        assert dec.block_manager.num_free_blocks == dec.block_manager.num_blocks
    finally:
        tx.close()
        rx.stop()


def test_engine_loop_decodes_received_requests(transfer_env):
    """The decode worker's path: on_commit hands the blocks to the engine loop, tokens stream out."""
    from pdserve.worker.engine_loop import EngineLoop

    env = transfer_env("grpc")
    loop = EngineLoop(env.dec).start()
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    outs: queue.Queue = queue.Queue()
    env.rx.on_commit = lambda rec: loop.submit_received(rec.request_id, rec, params, outs.put)
    try:
        prompts = [list(range(1, 30)), list(range(40, 47)), list(range(100, 180))]
        for i, p in enumerate(prompts):
            env.tx.reserve(env.rx.address, f"r{i}", len(p))
            stream = LayerStream(f"r{i}", len(p))
            fut = env.tx.push(env.rx.address, stream)
            env.pre.add_request(f"r{i}", p, params, kv_sink=stream)
            while env.pre.has_unfinished():
                env.pre.step()
            fut.result(10)
        final = {}
        while len(final) < len(prompts):
            out = outs.get(timeout=30)
            assert not isinstance(out, BaseException), out
            if out.finished:
                final[out.request_id] = out.output_token_ids
        for i, p in enumerate(prompts):
            assert final[f"r{i}"] == env.pre.generate([p], params)[0].output_token_ids
    finally:
        loop.stop()


def test_non_loopback_server_needs_a_secret():
    with pytest.raises(ValueError, match="auth_token"):
        KVTransferConfig(host="0.0.0.0")
    KVTransferConfig(host="0.0.0.0", auth_token="s3cret", allow_plaintext=True)


def _zeros_stream(rid: str, n: int, layers: int = 2) -> LayerStream:
    """A complete push of all-zero KV for `n` tokens (the tiny model's layout: 2 KV heads x 16)."""
    return LayerStream.complete(rid, [torch.zeros(2, n, 2, 16) for _ in range(layers)], list(range(n)), [0])


def test_wildcard_binds_are_advertised_as_a_dialable_address():
    import ipaddress

    from pdserve.kv_transfer.protocol import advertised_host, host_port

    for wildcard in ("0.0.0.0", "::"):
        ip = ipaddress.ip_address(advertised_host(wildcard))
        assert not ip.is_unspecified
    assert advertised_host("10.1.2.3") == "10.1.2.3"
    assert host_port("::1", 5) == "[::1]:5" and host_port("10.0.0.1", 5) == "10.0.0.1:5"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("layerwise", [True, False])
def test_only_the_blocks_the_decode_side_lacks_travel(transfer_env, make_engine, long_model_dir, transport,
                                                      layerwise):
    """Turn 2 of a conversation that decoded on this decode worker: its prefix cache holds the system
    prompt and turn 1, so the reservation starts after them and only the rest crosses the wire; the
    output equals an engine with caching off, and every block ends free or evictable."""
    from pdserve.engine.block_manager import block_hashes

    env = transfer_env(transport, layerwise=layerwise)
    bs = env.dec.block_manager.block_size
    per_token = env.rx.pool.fingerprint.bytes_per_token_layer * env.pre.arch.num_layers
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = make_engine(long_model_dir, cache={"enable_prefix_caching": False})
    free0 = env.dec.block_manager.num_free_blocks

    def turn(rid: str, prompt: list[int]) -> tuple[int, int, list[int]]:
        local = env.rx.reserve(rid, len(prompt), prefix=block_hashes(prompt, bs))
        stream = LayerStream(rid, len(prompt), local.num_cached_tokens)
        fut = env.tx.push(env.rx.address, stream)
        env.pre.add_request(rid, prompt, params, kv_sink=stream)
        while env.pre.has_unfinished():
            env.pre.step()
        sent = fut.result(30).bytes
        return local.num_cached_tokens, sent, decode_to_end(env.dec, rid, env.got.get(timeout=10), params)

    system = list(range(3, 103))  # 100 tokens: 6 full blocks
    first = system + [200, 201]
    cached, sent, out1 = turn("t1", first)
    assert cached == 0 and sent == len(first) * per_token
    assert out1 == ref.generate([first], params)[0].output_token_ids
    second = first + out1 + [210, 211, 212]
    cached, sent, out2 = turn("t2", second)
    # the decode side computed first + out1[:-1] itself (the last sampled token never ran): those full blocks
    assert cached == (len(first) + len(out1) - 1) // bs * bs
    assert sent == (len(second) - cached) * per_token < len(second) * per_token
    assert out2 == ref.generate([second], params)[0].output_token_ids
    other = list(range(150, 190))  # no shared prefix: everything travels
    cached, sent, _ = turn("t3", other)
    assert cached == 0 and sent == len(other) * per_token
    assert env.dec.block_manager.num_free_blocks == free0  # free or evictable
    assert env.dec.block_manager.num_cached_blocks > 0
    env.dec.block_manager.check_invariants()


def test_a_reservation_refused_for_room_gives_its_cached_blocks_back(transfer_env):
    from pdserve.engine.block_manager import block_hashes

    env = transfer_env("grpc", num_blocks=8)
    bs = env.dec.block_manager.block_size
    prompt = list(range(3, 3 + 3 * bs + 1))
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    env.dec.generate([prompt], params)  # caches 3 blocks here
    assert env.dec.block_manager.num_cached_blocks == 3
    hold = env.dec.block_manager.allocate(env.dec.block_manager.num_free_blocks - 3)  # only the cached 3 remain
    try:
        with pytest.raises(ReservationRefused):
            env.rx.reserve("big", len(prompt) + 2 * bs, prefix=block_hashes(prompt, bs))
        assert env.dec.block_manager.num_free_blocks == 3 and env.dec.block_manager.num_evictable_blocks == 3
        env.dec.block_manager.check_invariants()
    finally:
        env.dec.block_manager.free(hold)

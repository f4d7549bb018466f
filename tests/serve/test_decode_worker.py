"""The decode worker actor's own event loop, driven directly (the class Ray runs, without Ray): a
request that starts reserves its KV room and answers `Ready` with the reservation, tokens come back
coalesced on the subscriber's stream, and aborting a request never blocks the loop that relays every
other stream's tokens, even while the KV receiver's loop is stuck."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import PdserveConfig
from pdserve.engine.messages import GenerateRequest, Ready, StepBatch, StepItem
from pdserve.engine.sampling import SamplingParams
from tests.helpers import EXACT


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    """One per module: a worker registers its metrics in the process's Prometheus registry, once."""
    cfg = PdserveConfig().replace(model={"model": str(tiny_model_dir), **EXACT}, cache={"num_kv_blocks": 64},
                                  engine={"num_threads": 1}, serve={"mode": "disaggregated", "worker_nice": 0},
                                  kv_transfer={"reserve_wait_s": 0.2})
    w = DecodeWorker(cfg, "decode-test")
    yield w
    w.shutdown()


@pytest.fixture(autouse=True)
def no_leak(worker):
    """Every test ends with every block back in the pool (polling: aborts land on the engine loop)."""
    yield
    bm = worker.engine.block_manager
    deadline = time.monotonic() + 10
    while bm.num_free_blocks != bm.num_blocks or worker.engine.seqs:
        assert time.monotonic() < deadline, f"{bm.num_blocks - bm.num_free_blocks} KV blocks leaked"
        time.sleep(0.01)


def _request(rid: str, n_prompt: int, max_tokens: int, remote: bool) -> GenerateRequest:
    return GenerateRequest(rid, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           tuple(range(1, n_prompt + 1)), remote_prefill=remote)


def test_start_reserves_and_answers_ready_with_the_reservation(worker):
    async def run():
        ready = await worker.start(_request("r", 40, 8, remote=True), "sub-ready")
        assert isinstance(ready, Ready) and ready.reservation is not None
        r = ready.reservation
        assert r.request_id == "r" and r.address == worker.receiver.address and r.num_blocks == 3  # 40 / 16
        assert worker.receiver.table.state_of("r") == "reserved"
        assert worker.engine.block_manager.num_free_blocks == 64 - 3
        worker.abort("r")  # the router gives the request up: the reservation is released
        await asyncio.wrap_future(worker.receiver.release_soon("r"))  # ordered after the abort's release
        assert worker.receiver.table.state_of("r") == "released"

    asyncio.run(run())


def test_a_request_that_can_never_fit_is_refused_with_a_typed_error(worker):
    async def run():
        item = await worker.start(_request("big", 64 * 16 + 1, 4, remote=True), "sub-big")
        assert isinstance(item, StepItem) and item.finished and item.error is not None
        assert item.error.status == 503 and not item.error.retryable, item.error  # too large for any wait

    asyncio.run(run())


def test_tokens_of_many_requests_travel_coalesced_one_batch_per_step(worker):
    """Eight colocated requests on one subscription: every batch carries at most one item per request,
    each request's tokens arrive in full and end `finished`, and the batches are far fewer than the tokens
    (one per engine step, not one per token of each stream, however slowly the subscriber reads)."""
    n, max_tokens = 8, 12

    async def run():
        stream = worker.subscribe("sub-many")
        for i in range(n):
            assert isinstance(await worker.start(_request(f"m{i}", 5 + i, max_tokens, remote=False), "sub-many"),
                              Ready)
        tokens = {f"m{i}": 0 for i in range(n)}
        done, batches = set(), 0
        while len(done) < n:
            batch = await asyncio.wait_for(anext(stream), 30)
            assert isinstance(batch, StepBatch) and batch.items
            rids = [rid for rid, _ in batch.items]
            assert len(rids) == len(set(rids))
            batches += 1
            for rid, item in batch.items:
                assert rid not in done and item.error is None
                tokens[rid] += len(item.token_ids)
                if item.finished:
                    done.add(rid)
        await stream.aclose()
        return tokens, batches

    tokens, batches = asyncio.run(run())
    assert tokens == {f"m{i}": max_tokens for i in range(n)}
    # one batch per engine step: 12 steps each, the requests admitted over up to n rounds (never a batch a token)
    assert batches <= max_tokens + n < n * max_tokens


def test_a_subscriber_that_goes_away_aborts_its_requests(worker):
    async def run():
        stream = worker.subscribe("sub-gone")
        await worker.start(_request("g", 8, 400, remote=False), "sub-gone")
        await asyncio.wait_for(anext(stream), 30)  # it is generating
        await stream.aclose()  # the router died or closed the stream: nobody reads "g" any more
        while "g" in worker.engine.seqs:
            await asyncio.sleep(0.005)

    asyncio.run(asyncio.wait_for(run(), 30))


def test_an_abort_while_the_kv_receiver_is_stuck_does_not_stall_other_streams(worker):
    """The receiver's loop is blocked (a release that takes as long as the test wants); a request on it is
    abandoned; a colocated stream on the same worker keeps getting its tokens meanwhile."""
    stuck, unstick = threading.Event(), threading.Event()

    async def block():  # runs on the receiver's loop thread and holds it
        stuck.set()
        unstick.wait(60)

    async def run():
        busy = worker.subscribe("sub-stuck")
        assert isinstance(await worker.start(_request("busy", 8, 400, remote=False), "sub-stuck"), Ready)
        assert isinstance(await worker.start(_request("waiting", 20, 8, remote=True), "sub-stuck"), Ready)
        asyncio.run_coroutine_threadsafe(block(), worker.receiver._loop)
        assert await asyncio.to_thread(stuck.wait, 10)
        t0 = time.monotonic()
        worker.abort("waiting")  # posts a release to the stuck receiver loop
        closed_in = time.monotonic() - t0
        got = 0
        while got < 20:  # the other stream goes on while the receiver is still stuck
            batch = await asyncio.wait_for(anext(busy), 10)
            got += sum(len(item.token_ids) for rid, item in batch.items if rid == "busy")
        assert not unstick.is_set() and worker.receiver.table.state_of("waiting") == "reserved"
        unstick.set()
        await asyncio.wrap_future(worker.receiver.release_soon("waiting"))  # after the abort's release
        assert worker.receiver.table.state_of("waiting") == "released"
        await busy.aclose()  # aborts "busy"; wait here, while this event loop (the one its sink posts to) lives
        async def aborted():
            while "busy" in worker.engine.seqs:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(aborted(), 10)
        return closed_in

    assert asyncio.run(run()) < 0.5

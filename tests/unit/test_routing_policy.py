"""The routing policy and the disaggregation decision (`router.pools`), on hand-built worker states:
`KVAwarePolicy` picks what `LeastLoadedPolicy` picks when no prefix is cached anywhere, trades a
cached prefix against load (and says so in its reason), never counts the last token as cached, and
keeps to routable workers below their running limit; `place_prefill` follows `serve.disaggregation`
and, for "auto", its documented rule in order. Pure: no Ray."""

from __future__ import annotations

import itertools
import random

import pytest

from pdserve.engine.messages import WorkerInfo, WorkerStats
from pdserve.router.pools import KVAwarePolicy, LeastLoadedPolicy, Route, WorkerState, pick_avoiding, place_prefill

BS = 16
STEP = 2048  # a step's token budget


def worker(wid: str, *, free: int = 100, blocks: int = 100, inflight: int = 0, tokens: int = 0,
           max_num_seqs: int = 8, healthy: bool = True, draining: bool = False, prefill_s: float = 0.0,
           step_s: float = 0.0, node: str = "node-a", board: str | None = None) -> WorkerState:
    role = wid.split("-")[0]
    stats = WorkerStats(wid, role, alive=True, busy=bool(inflight), step_age_s=0, progress_age_s=0,
                        num_running=inflight, num_waiting=0, waiting_tokens=0, free_blocks=free, num_blocks=blocks,
                        max_num_seqs=max_num_seqs, num_preemptions=0, prefill_s_per_token=prefill_s,
                        decode_step_s=step_s)
    return WorkerState(wid, role, None, WorkerInfo(wid, role, "", node, core_board=board), stats, healthy=healthy,
                       draining=draining, inflight_requests=inflight, inflight_tokens=tokens)


def ids(choice) -> str | None:
    return None if choice is None else choice.worker.worker_id


# -- the policy ----------------------------------------------------------------------------------------


def test_with_no_prefix_cached_anywhere_it_picks_what_least_loaded_picks():
    rng = random.Random(0)
    kv, ll = KVAwarePolicy(), LeastLoadedPolicy()
    for _ in range(500):
        n = rng.randint(1, 5)
        decodes = [worker(f"decode-{i}", free=rng.randint(0, 4) * 10, inflight=rng.randint(0, 9), max_num_seqs=8,
                          healthy=rng.random() > 0.2) for i in range(n)]
        prefills = [worker(f"prefill-{i}", inflight=rng.randint(0, 3), tokens=rng.randint(0, 3) * 100,
                           healthy=rng.random() > 0.2) for i in range(n)]
        route = Route(rng.randint(1, 2000), BS)
        assert ids(kv.pick_decode(decodes, route)) == ids(ll.pick_decode(decodes, route))
        assert ids(kv.pick_prefill(prefills, route)) == ids(ll.pick_prefill(prefills, route))
        for c in (kv.pick_decode(decodes, route), kv.pick_prefill(prefills, route)):
            assert c is None or c.reason == "least_loaded"


def test_decode_prefers_the_cached_prefix_until_the_load_outweighs_it():
    kv = KVAwarePolicy()
    busy, idle = worker("decode-0", free=90, inflight=3), worker("decode-1", free=100)
    route = Route(64 * BS, BS, {"decode-0": 40})  # 40 of its 64 blocks cached on the busier worker
    c = kv.pick_decode([busy, idle], route)
    assert ids(c) == "decode-0" and c.reason == "prefix_overlap"  # 24 blocks to fill - 90 free < 64 - 100
    busy.stats = worker("decode-0", free=60).stats  # now 40 fewer free blocks: exactly cancels the prefix...
    c = kv.pick_decode([busy, idle], route)
    assert ids(c) == "decode-1" and c.reason == "least_loaded"  # ...and the tie goes to fewer requests in flight
    busy.stats = worker("decode-0", free=61).stats
    assert ids(kv.pick_decode([busy, idle], route)) == "decode-0"


def test_a_prefix_on_the_least_loaded_worker_is_not_counted_as_a_prefix_decision():
    kv = KVAwarePolicy()
    c = kv.pick_decode([worker("decode-0", free=100), worker("decode-1", free=50)], Route(20 * BS, BS, {"decode-0": 5}))
    assert ids(c) == "decode-0" and c.reason == "least_loaded"


def test_prefill_counts_the_uncached_prompt_plus_the_queue():
    kv = KVAwarePolicy()
    a, b = worker("prefill-0", tokens=300), worker("prefill-1", tokens=0)
    route = Route(1000, BS, {"prefill-0": 50})  # 800 cached on a: 200 to compute + 300 queued < 1000 + 0
    c = kv.pick_prefill([a, b], route)
    assert ids(c) == "prefill-0" and c.reason == "prefix_overlap"
    a.inflight_tokens = 801  # 200 + 801 > 1000
    assert ids(kv.pick_prefill([a, b], route)) == "prefill-1"


def test_the_last_token_is_never_counted_as_cached():
    """A prompt of exactly 4 full blocks, all cached: the worker still computes the last block (its last
    token's logits), as the engine does (`Scheduler._cacheable_blocks`)."""
    route = Route(4 * BS, BS, {"prefill-0": 4})
    w = worker("prefill-0")
    assert route.cached_blocks(w) == 3 and route.uncached_tokens(w) == BS
    assert Route(4 * BS + 1, BS, {"prefill-0": 4}).uncached_tokens(w) == 1
    assert Route(1, BS, {"prefill-0": 4}).uncached_tokens(w) == 1


def test_only_routable_workers_below_their_running_limit_unless_all_are_full():
    kv = KVAwarePolicy()
    cached = {"decode-0": 30, "decode-1": 30, "decode-2": 30, "decode-3": 30}
    route = Route(32 * BS, BS, cached)
    full = worker("decode-0", free=200, inflight=8, max_num_seqs=8)
    sick = worker("decode-1", free=200, healthy=False)
    leaving = worker("decode-2", free=200, draining=True)
    ok = worker("decode-3", free=10)
    assert ids(kv.pick_decode([full, sick, leaving, ok], route)) == "decode-3"
    assert ids(kv.pick_decode([full, sick, leaving], route)) == "decode-0"  # all at their limit: the least loaded
    assert kv.pick_decode([sick, leaving], route) is None
    assert kv.pick_prefill([worker("prefill-0", healthy=False)], route) is None


def test_pick_avoiding_falls_back_to_the_avoided_workers():
    kv = KVAwarePolicy()
    a, b = worker("decode-0", free=100), worker("decode-1", free=10)
    route = Route(BS, BS)
    assert ids(pick_avoiding(kv.pick_decode, [a, b], route, {"decode-0"})) == "decode-1"
    assert ids(pick_avoiding(kv.pick_decode, [a], route, {"decode-0"})) == "decode-0"


# -- where the prefill runs ----------------------------------------------------------------------------


def decode_busy(**kw) -> WorkerState:
    return worker("decode-0", inflight=2, **{"prefill_s": 1e-3, "step_s": 0.05, **kw})


@pytest.mark.parametrize("mode,local", [("never", True), ("always", False)])
def test_fixed_modes_ignore_the_costs(mode, local):
    for decode, prefill, uncached in itertools.product(
            [worker("decode-0"), decode_busy()], [None, worker("prefill-0")], [1, 10_000]):
        p = place_prefill(mode, decode, prefill, uncached, BS, STEP)
        assert (p.local, p.reason, p.path) == (local, "configured", "local" if local else "remote")


def test_auto_goes_local_without_a_prefill_worker_or_with_an_idle_decode_worker():
    prefill = worker("prefill-0", prefill_s=1e-3)
    p = place_prefill("auto", decode_busy(), None, 100_000, BS, STEP)
    assert (p.local, p.reason) == (True, "no_prefill_worker")
    p = place_prefill("auto", worker("decode-0", prefill_s=1e-3, step_s=0.05), prefill, 100_000, BS, STEP)
    assert (p.local, p.reason) == (True, "idle_decode")


def test_auto_keeps_a_prompt_that_fits_a_step_local_when_the_prefill_worker_shares_the_cores():
    """Workers on one machine's core board: a remote prefill would run on the same cores. Whatever the
    measured costs or the queues say, a prompt of up to one step's budget stays on the decode worker;
    a longer one goes by the other rules (here: long_prompt)."""
    d = decode_busy(board="cores-1")  # 1 ms a prompt token, 50 ms a step: 1,000 tokens would go remote
    prefill = worker("prefill-0", prefill_s=1e-4, board="cores-1")  # ten times as fast, nothing queued
    for uncached in (51, 1000, STEP):
        p = place_prefill("auto", d, prefill, uncached, BS, STEP)
        assert (p.local, p.reason) == (True, "shared_cores")
    p = place_prefill("auto", d, prefill, STEP + 1, BS, STEP)
    assert (p.local, p.reason) == (False, "long_prompt")
    unmeasured = worker("decode-0", inflight=1, board="cores-1")
    assert place_prefill("auto", unmeasured, prefill, 1000, BS, STEP).reason == "shared_cores"
    # another board, another machine, or a worker that does not share: the cost rules decide
    for other in (worker("prefill-0", prefill_s=1e-4, board="cores-2"),
                  worker("prefill-0", prefill_s=1e-4, board="cores-1", node="node-b"),
                  worker("prefill-0", prefill_s=1e-4)):
        assert place_prefill("auto", d, other, 1000, BS, STEP).reason == "long_prompt"
    assert place_prefill("auto", decode_busy(), worker("prefill-0", prefill_s=1e-4), 1000, BS,
                         STEP).reason == "long_prompt"  # neither shares (board None on both)
    # "always" and "never" are not overridden
    assert not place_prefill("always", d, prefill, 100, BS, STEP).local
    assert place_prefill("never", d, prefill, STEP + 1, BS, STEP).local


def test_auto_without_measured_costs_keeps_only_one_block_local():
    prefill = worker("prefill-0")
    unmeasured = worker("decode-0", inflight=1)
    assert place_prefill("auto", unmeasured, prefill, BS, BS, STEP).local
    p = place_prefill("auto", unmeasured, prefill, BS + 1, BS, STEP)
    assert (p.local, p.reason) == (False, "unmeasured")


def test_auto_local_when_the_stall_is_at_most_one_decode_step():
    prefill = worker("prefill-0", prefill_s=1e-3)
    d = decode_busy()  # 1 ms a prompt token, 50 ms a step: up to 50 uncached tokens stay local
    p = place_prefill("auto", d, prefill, 50, BS, STEP)
    assert (p.local, p.reason) == (True, "short_prompt")
    p = place_prefill("auto", d, prefill, 51, BS, STEP)
    assert (p.local, p.reason) == (False, "long_prompt")
    slower_steps = decode_busy(step_s=0.2)  # a bigger batch: a longer step hides a longer prefill
    assert place_prefill("auto", slower_steps, prefill, 200, BS, STEP).reason == "short_prompt"


def test_auto_local_when_the_prefill_queue_takes_longer_than_the_local_prefill():
    d = decode_busy()  # 1000 uncached tokens: 1 s here
    prefill = worker("prefill-0", tokens=2000, prefill_s=0.4e-3)  # 0.8 s of queue ahead: remote
    assert place_prefill("auto", d, prefill, 1000, BS, STEP).reason == "long_prompt"
    prefill.inflight_tokens = 3000  # 1.2 s of queue
    p = place_prefill("auto", d, prefill, 1000, BS, STEP)
    assert (p.local, p.reason) == (True, "prefill_busy")
    unmeasured_prefill = worker("prefill-0", tokens=1001)  # priced at the decode worker's rate
    assert place_prefill("auto", d, unmeasured_prefill, 1000, BS, STEP).reason == "prefill_busy"
    # the decode worker's own queued local prefills count too: 0.5 s of them + 1 s > the 1.2 s queue
    d.local_prefill_tokens = 500
    assert place_prefill("auto", d, prefill, 1000, BS, STEP).reason == "long_prompt"


def test_auto_shares_a_burst_between_the_prefill_worker_and_the_decode_worker():
    """A burst of equal prompts, placed one after another as the router does (each placement adds to the queue
    it chose): both queues grow, neither takes everything."""
    d = decode_busy()  # 1 ms a token locally
    prefill = worker("prefill-0", prefill_s=1e-3)  # as fast
    for _ in range(30):
        p = place_prefill("auto", d, prefill, 200, BS, STEP)
        if p.local:
            d.local_prefill_tokens += 200
        else:
            prefill.inflight_tokens += 200
    assert abs(d.local_prefill_tokens - prefill.inflight_tokens) <= 400, (d.local_prefill_tokens,
                                                                         prefill.inflight_tokens)

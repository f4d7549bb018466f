"""The scheduler alone: pure policy, driven step by step with fake model outputs."""

from __future__ import annotations

import pytest

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import QueueFullError, Scheduler, SchedulerOutput, default_step_cost
from pdserve.engine.sequence import FinishReason, Sequence, SequenceStatus


def make(num_blocks: int = 1000, block_size: int = 4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))


def req(rid: str, prompt: int = 8, out: int = 4, t: float = 0.0, prio: int = 0, deadline: float | None = None):
    return Sequence(rid, [0] * prompt, SamplingParams(max_tokens=out), arrival_time=t, priority=prio,
                    deadline=deadline)


def step(s: Scheduler, now: float):
    """One step with fake model outputs: computed tokens advance, finished requests leave."""
    out = s.schedule(now)
    for seq, n in out.scheduled:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(1)
            if seq.num_output_tokens >= seq.params.max_tokens:
                s.finish(seq, FinishReason.LENGTH)
    return out


def run_step(s: Scheduler, now: float) -> list[tuple[str, int]]:
    return [(seq.request_id, n) for seq, n in step(s, now).scheduled]


def assert_clean(s: Scheduler) -> None:
    assert not s.has_unfinished()
    s.blocks.check_invariants()
    assert s.blocks.num_free_blocks == s.blocks.num_blocks
    if s.cpu_blocks:
        assert s.cpu_blocks.num_free_blocks == s.cpu_blocks.num_blocks


def drain(s: Scheduler, start: float = 0.0, limit: int = 10_000) -> float:
    now = start
    while s.has_unfinished() and limit:
        run_step(s, now)
        now += 1
        limit -= 1
    assert limit, "scheduler did not drain"
    return now


def test_priority_then_fcfs():
    s = make(policy="continuous", max_num_seqs=1)
    for rid, t, prio in [("late-urgent", 2, 0), ("bg", 0, 5), ("early-urgent", 1, 0)]:
        s.add(req(rid, t=t, prio=prio), now=3)
    order = []
    now = 3.0
    while s.has_unfinished():
        for rid, _ in run_step(s, now):
            if rid not in order:
                order.append(rid)
        now += 1
    assert order == ["early-urgent", "late-urgent", "bg"]
    assert_clean(s)


def admission_order(s: Scheduler, now: float, step_fn=None) -> list[str]:
    """The order in which queued requests first get tokens, one slot at a time."""
    order: list[str] = []
    while s.has_unfinished():
        for seq, _ in (step_fn or step)(s, now).scheduled:
            if seq.request_id not in order:
                order.append(seq.request_id)
        now += 0.01
    return order


@pytest.mark.parametrize("queue_order, expected", [("shortest", ["short", "mid", "long"]),
                                                   ("fcfs", ["long", "short", "mid"])])
def test_queue_order_within_a_level(queue_order, expected):
    s = make(policy="chunked", max_num_seqs=1, queue_order=queue_order)
    for rid, n, t in [("long", 30, 0.0), ("short", 10, 0.1), ("mid", 20, 0.2)]:
        s.add(req(rid, prompt=n, t=t), now=0.3)
    assert admission_order(s, 0.3) == expected
    assert_clean(s)


def test_shortest_first_never_overrides_priority():
    s = make(policy="chunked", max_num_seqs=1, queue_order="shortest")
    s.add(req("short-bg", prompt=4, prio=5), now=0)
    s.add(req("long-urgent", prompt=40, prio=0), now=0)
    assert admission_order(s, 0.0) == ["long-urgent", "short-bg"]
    assert_clean(s)


def test_shortest_first_bounds_how_long_a_long_prompt_is_passed_over():
    s = make(policy="chunked", max_num_seqs=1, queue_order="shortest", shortest_max_wait=2.0)
    s.add(req("long", prompt=40, t=0.0), now=0.0)
    s.add(req("short-new", prompt=4, t=1.5), now=1.5)
    assert admission_order(s, 1.9) == ["short-new", "long"]  # waited 1.9 s: still passed over
    s = make(policy="chunked", max_num_seqs=1, queue_order="shortest", shortest_max_wait=2.0)
    s.add(req("long", prompt=40, t=0.0), now=0.0)
    s.add(req("short-new", prompt=4, t=1.5), now=1.5)
    assert admission_order(s, 2.0) == ["long", "short-new"]  # waited its bound: by arrival again
    assert_clean(s)


def test_shortest_first_counts_only_the_uncached_part():
    s = cached(policy="chunked", max_num_seqs=1, queue_order="shortest")
    system = list(range(100, 140))  # 40 tokens: 10 full blocks of 4
    s.add(conv("warm", system + [1]), 0)
    admission_order(s, 0.0, step_cached)
    s.add(conv("fresh-12", list(range(500, 512)), t=1.0), 1.0)  # 12 tokens, none cached
    s.add(conv("cached-45", system + [2, 3, 4, 5, 6], t=1.1), 1.1)  # 45 tokens, 40 of them cached
    assert admission_order(s, 1.2, step_cached) == ["cached-45", "fresh-12"]
    assert_clean(s)


def test_queue_order_is_validated():
    with pytest.raises(ValueError, match="queue_order"):
        SchedulerConfig(queue_order="random")
    with pytest.raises(ValueError, match="shortest_max_wait"):
        SchedulerConfig(shortest_max_wait=-1)


def test_token_budget_and_seq_limit():
    s = make(policy="chunked", max_num_seqs=3, max_num_batched_tokens=10, max_prefill_chunk=4)
    for i in range(5):
        s.add(req(f"r{i}", prompt=9), now=0)
    plan = run_step(s, 0)
    assert plan == [("r0", 4), ("r1", 4), ("r2", 2)]  # chunks capped at 4, the budget at 10, 3 sequences
    assert len(s.running) == 3 and len(s.waiting) == 2
    drain(s, 1)
    assert_clean(s)


def test_continuous_runs_whole_prompts_only():
    s = make(policy="continuous", max_num_batched_tokens=10)
    s.add(req("a", prompt=6), now=0)
    s.add(req("b", prompt=6), now=0)
    assert run_step(s, 0) == [("a", 6)]  # b's whole prompt does not fit the rest of the budget
    assert run_step(s, 1) == [("a", 1), ("b", 6)]
    drain(s, 2)
    assert_clean(s)


def test_prompt_larger_than_budget_still_runs_alone():
    s = make(policy="continuous", max_num_batched_tokens=8)
    s.add(req("big", prompt=20), now=0)
    assert run_step(s, 0) == [("big", 20)]
    drain(s, 1)
    assert_clean(s)


def test_aging_bounds_starvation_under_urgent_stream():
    timeout = 10.0
    s = make(policy="continuous", max_num_seqs=1, starvation_timeout=timeout)
    s.add(req("low", prompt=2, out=2, t=0, prio=9), now=0)
    started = None
    for now in range(100):
        s.add(req(f"u{now}", prompt=2, out=2, t=now, prio=0), now=now)  # a new urgent request every step
        if ("low", 2) in run_step(s, now):
            started = now
            break
    assert started is not None, "low-priority request starved"
    assert timeout <= started <= timeout + 2  # served once it has waited the bound, not before
    for seq in list(s.waiting) + list(s.running):
        s.finish(seq, FinishReason.ABORT)
    assert_clean(s)


def test_preemption_victim_is_least_urgent_latest():
    # 3 blocks of 4 tokens: three 4-token prompts fill the pool; the next decode needs a block
    s = make(num_blocks=3, block_size=4, policy="continuous", preemption="recompute")
    s.add(req("urgent-old", prompt=4, t=0, prio=0), now=0)
    s.add(req("bg-old", prompt=4, t=1, prio=1), now=1)
    s.add(req("bg-new", prompt=4, t=2, prio=1), now=2)
    run_step(s, 2)  # all three prefilled; each now needs a second block
    out = s.schedule(3)
    # the most urgent grows first: the least urgent, latest arrival goes, then the next least urgent
    assert [v.request_id for v in out.preempted] == ["bg-new", "bg-old"]
    assert [q.request_id for q, _ in out.scheduled] == ["urgent-old"]
    victim = out.preempted[0]
    assert victim.status is SequenceStatus.WAITING and victim.num_computed_tokens == 0 and not victim.block_table
    assert victim.num_preemptions == 1


def test_swap_out_and_in_bookkeeping():
    s = make(num_blocks=4, block_size=4, policy="continuous", preemption="swap", swap_space_blocks=8)
    s.add(req("a", prompt=8, out=20, t=0), now=0)
    s.add(req("b", prompt=8, out=20, t=1), now=1)
    run_step(s, 1)  # both prefilled: 4 blocks used
    b = next(x for x in s.running if x.request_id == "b")
    held = list(b.block_table)
    out = s.schedule(2)  # a needs a 3rd block -> b swapped out
    assert [v.request_id for v in out.preempted] == ["b"]
    assert [d for d, _ in out.swap_out] == held and len(b.cpu_block_table) == 2
    assert b.status is SequenceStatus.SWAPPED and b.num_computed_tokens == 8 and not b.block_table
    s.finish(next(x for x in s.running if x.request_id == "a"), FinishReason.ABORT)
    cpu = list(b.cpu_block_table)
    out = s.schedule(3)
    assert [c for c, _ in out.swap_in] == cpu
    assert b.status is SequenceStatus.RUNNING and len(b.block_table) == 3 and not b.cpu_block_table
    assert out.scheduled == [(b, 1)]  # resumes decoding right away, nothing recomputed
    s.finish(b, FinishReason.ABORT)
    assert_clean(s)


def test_auto_swaps_while_cpu_pool_has_room_then_recomputes():
    s = make(num_blocks=6, block_size=4, policy="continuous", preemption="auto", swap_space_blocks=2,
             max_preemptions=None)
    for i in range(3):
        s.add(req(f"r{i}", prompt=8, out=50, t=i), now=0)
    kinds = []
    for now in range(40):
        kinds += [v.status for v in step(s, now).preempted]
    # the first victim fits the 2-block CPU pool and is swapped; with the pool full, later ones recompute
    assert kinds[0] is SequenceStatus.SWAPPED and SequenceStatus.WAITING in kinds
    assert s.num_swaps >= 1
    for seq in list(s.running) + list(s.waiting) + list(s.swapped):
        s.finish(seq, FinishReason.ABORT)
    assert_clean(s)


def test_preemption_limit_protects_against_thrashing():
    # each request fits the pool alone (4 + 30 tokens = 9 blocks), not three together
    s = make(num_blocks=10, block_size=4, policy="continuous", preemption="recompute", max_preemptions=1)
    s.add(req("a", prompt=4, out=30, t=0), now=0)
    s.add(req("b", prompt=4, out=30, t=1), now=0)
    s.add(req("c", prompt=4, out=30, t=2), now=0)
    counts = {}
    now = 0
    while s.has_unfinished() and now < 500:
        run_step(s, now)
        for seq in s.running + s.waiting:
            counts[seq.request_id] = seq.num_preemptions
        now += 1
    assert not s.has_unfinished()
    # protected after one preemption; only the liveness rule (all protected, none can grow) may add one
    assert max(counts.values()) <= 2 and sum(counts.values()) <= 4
    assert_clean(s)


def test_urgent_arrival_preempts_background_when_full():
    s = make(policy="continuous", max_num_seqs=2, preemption="recompute")
    s.add(req("bg1", out=50, prio=5), now=0)
    s.add(req("bg2", out=50, t=1, prio=5), now=0)
    run_step(s, 0)
    s.add(req("urgent", t=2, prio=0), now=2)
    plan = run_step(s, 2)
    assert ("urgent", 8) in plan and "bg2" not in dict(plan)
    for seq in list(s.running) + list(s.waiting):
        s.finish(seq, FinishReason.ABORT)
    assert_clean(s)


def test_bounded_queue_rejects_with_retry_after():
    s = make(max_num_queued_requests=2)
    s.add(req("a"), now=0)
    s.add(req("b"), now=0)
    with pytest.raises(QueueFullError) as err:
        s.add(req("c"), now=0)
    assert err.value.reason == "queue_full" and err.value.retry_after >= 1
    assert len(s.waiting) == 2


def test_unmeetable_deadline_rejected_under_reject_policy():
    cost = lambda prefill, decode: 0.01 * prefill + 0.01 * decode  # noqa: E731
    s = Scheduler(SchedulerConfig(overload="reject"), BlockManager(1000, 4), step_cost=cost)
    s.add(req("ok", prompt=10, deadline=1.0), now=0)  # ~0.1 s of prefill
    with pytest.raises(QueueFullError) as err:
        s.add(req("late", prompt=200, deadline=0.5), now=0)  # >= 2 s of prefill
    assert err.value.reason == "deadline"


def test_missed_deadlines_are_deferred_behind_meetable_ones():
    s = make(policy="continuous", max_num_seqs=1, overload="shrink")
    s.add(req("missed", t=0, deadline=1.0), now=0)
    s.add(req("fresh", t=1, deadline=50.0), now=1)
    assert run_step(s, 5) == [("fresh", 8)]


def test_shrink_caps_prefill_to_protect_running_tpot():
    cost = lambda prefill, decode: 0.001 * prefill + 0.01 * decode  # noqa: E731
    s = Scheduler(SchedulerConfig(policy="chunked", overload="shrink", tpot_slo=0.1, max_num_batched_tokens=4096),
                  BlockManager(1000, 16), step_cost=cost)
    s.add(req("running", prompt=4, out=100), now=0)
    run_step(s, 0)
    s.add(req("long", prompt=2000), now=1)
    plan = dict(run_step(s, 1))
    assert plan["running"] == 1 and 0 < plan["long"] < 2000
    assert cost(plan["long"], 1) <= 0.1 + 1e-9


@pytest.mark.parametrize("policy", ["static", "dynamic", "continuous", "chunked"])
def test_every_policy_drains_and_frees_everything(policy):
    s = make(num_blocks=40, block_size=4, policy=policy, max_num_seqs=3, batch_timeout=2,
             swap_space_blocks=10, max_num_batched_tokens=16, max_prefill_chunk=5)
    for i in range(7):
        s.add(req(f"r{i}", prompt=3 + 4 * i, out=2 + i, t=i), now=i)
    s.input_closed = True
    drain(s, 7)
    assert_clean(s)


def test_schedule_cost_stays_small_with_1000_requests():
    """schedule() on 1,000 queued requests stays small: ~4 ms on the 2 shared CI cores, bound at 50 ms,
    so work quadratic in the queue length (re-sorting the queue per request: ~90 ms) fails it. Best of
    three fresh schedulers: one co-tenant burst on a shared machine does not decide it."""
    import time

    costs = []
    for _ in range(3):
        s = make(num_blocks=100_000, policy="chunked", max_num_seqs=256)
        for i in range(1000):
            s.add(req(f"r{i}", t=i * 0.001, prio=i % 3), now=1.0)
        t0 = time.perf_counter()
        out = s.schedule(1.0)
        costs.append(time.perf_counter() - t0)
        assert len(out.scheduled) == 256
    print(f"schedule() with 1000 waiting: best {min(costs) * 1e3:.2f} ms")
    assert min(costs) < 0.050, costs


def test_scheduler_is_pure_policy_without_torch():
    import subprocess
    import sys

    code = "import sys, engine.scheduler, engine.simulator; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_measured_step_cost_learns_the_machine_and_deadline_admission_follows():
    from pdserve.engine.scheduler import MeasuredStepCost, default_step_cost

    cost = MeasuredStepCost()
    assert cost(100, 4) == default_step_cost(100, 4)
    for _ in range(100):  # this machine runs steps 4x slower than the default model predicts
        cost.observe(100, 4, 4 * default_step_cost(100, 4))
    assert cost.scale == pytest.approx(4.0, rel=0.01)
    slow = Scheduler(SchedulerConfig(), BlockManager(1000, 4), cost)
    fast = make()
    # ~0.23 s of prefill at the default speed, ~0.92 s measured: only the fast machine can meet 0.5 s
    fast.add(req("a", prompt=100, deadline=0.5), now=0)
    with pytest.raises(QueueFullError) as err:
        slow.add(req("a", prompt=100, deadline=0.5), now=0)
    assert err.value.reason == "deadline"


# -- prefix caching -------------------------------------------------------------------------------------
def cached(num_blocks: int = 1000, block_size: int = 4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size, enable_caching=True))


def step_cached(s: Scheduler, now: float):
    """`step`, with the engine's part of caching: computed full blocks are offered to the cache."""
    out = s.schedule(now)
    for seq, n in out.scheduled:
        seq.num_computed_tokens += n
        s.cache_computed(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(1)
            if seq.num_output_tokens >= seq.params.max_tokens:
                s.finish(seq, FinishReason.LENGTH)
    return out


def conv(rid: str, tokens: list[int], out: int = 2, t: float = 0.0) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=out), arrival_time=t)


def test_a_cached_prefix_counts_as_computed():
    s = cached(policy="chunked", max_num_batched_tokens=64)
    system = list(range(100, 120))  # 20 tokens: 5 full blocks of 4
    first = conv("a", system + [1, 2, 3])
    s.add(first, 0)
    assert step_cached(s, 0).scheduled == [(first, 23)]
    blocks_a = list(first.block_table)
    while s.has_unfinished():
        step_cached(s, 1)
    assert s.blocks.num_free_blocks == 1000 and s.blocks.num_cached_blocks == 6  # 23 + 1 computed: 6 full blocks
    second = conv("b", system + [7, 8, 9, 10, 11])
    assert s.cached_tokens(second) == 20
    s.add(second, 2)
    out = step_cached(s, 2)
    assert out.scheduled == [(second, 5)]  # only the uncached rest is prefilled
    assert second.num_cached_tokens == 20 and second.block_table[:5] == blocks_a[:5]
    assert s.prefix_cache_hits == 20 and s.prefix_cache_queries == 23 + 25
    while s.has_unfinished():
        step_cached(s, 3)
    assert_clean(s)


def test_the_last_token_is_always_computed():
    """A prompt cached whole still runs its last token (the step needs its logits), into a block of its own."""
    s = cached(policy="chunked")
    tokens = list(range(16))  # exactly 4 blocks
    a = conv("a", tokens, out=1)
    s.add(a, 0)
    while s.has_unfinished():
        step_cached(s, 0)
    b = conv("b", tokens, out=1)
    s.add(b, 1)
    out = step_cached(s, 1)
    assert out.scheduled == [(b, 4)] and b.num_cached_tokens == 12  # 3 blocks from the cache, the 4th computed
    assert_clean(s)


def test_two_requests_share_cached_blocks_and_neither_frees_them_for_the_other():
    s = cached(policy="chunked")
    system = list(range(50, 66))  # 4 blocks
    s.add(conv("warm", system + [1]), 0)
    while s.has_unfinished():
        step_cached(s, 0)
    a, b = conv("a", system + [2, 3], out=4), conv("b", system + [4, 5], out=2)
    s.add(a, 1)
    s.add(b, 1)
    step_cached(s, 1)
    shared = a.block_table[:4]
    assert b.block_table[:4] == shared and all(s.blocks.ref_count(x) == 2 for x in shared)
    while b in s.running:
        step_cached(s, 2)
    assert all(s.blocks.ref_count(x) == 1 for x in shared)  # b finished: a still holds them
    while s.has_unfinished():
        step_cached(s, 3)
    assert_clean(s)


def test_eviction_under_pressure_reuses_cached_blocks_and_stays_correct():
    """A pool too small for every cached prefix: old ones are evicted (least recently used) to admit new
    requests, and the count of free or evictable blocks stays exact."""
    s = cached(num_blocks=12, block_size=4, policy="chunked")
    for i in range(10):
        seq = conv(f"r{i}", [i] * 24, out=2)  # 24 + 2 tokens: 7 blocks, 6 of them full
        s.add(seq, i)
        while s.has_unfinished():
            step_cached(s, i)
        s.blocks.check_invariants()
        assert s.blocks.num_free_blocks == 12
    assert s.blocks.num_evictions > 0 and s.blocks.num_cached_blocks <= 12
    again = conv("again", [9] * 24 + [1])  # the newest prefix is still cached
    assert s.cached_tokens(again) == 24
    old = conv("old", [0] * 24 + [1])  # the oldest was evicted
    assert s.cached_tokens(old) == 0


def test_recompute_preemption_resumes_from_the_cache():
    s = cached(num_blocks=10, block_size=4, policy="chunked", preemption="recompute", max_num_batched_tokens=64)
    a = conv("a", list(range(20)), out=10)
    s.add(a, 0)
    step_cached(s, 0)  # 20 prompt tokens computed: 5 full blocks named
    b = conv("b", list(range(100, 112)), out=10, t=1)  # admitted at once; both then outgrow the pool
    s.add(b, 1)
    for _ in range(50):  # both decode until the pool is short: one of them is preempted
        step_cached(s, 1)
        if s.num_preemptions:
            break
    assert s.num_preemptions == 1
    victim = a if a.num_preemptions else b
    assert victim.num_preemptions == 1
    cached_before = s.cached_tokens(victim)
    assert cached_before > 0  # its computed blocks stayed cached when it was preempted
    while s.has_unfinished():
        step_cached(s, 2)
    assert_clean(s)


def test_ttft_estimate_sees_only_uncached_tokens():
    s = cached(policy="chunked", max_num_batched_tokens=64)
    system = list(range(200, 264))  # 64 tokens, 16 blocks
    s.add(conv("warm", system + [1]), 0)
    while s.has_unfinished():
        step_cached(s, 0)
    hit, miss = conv("hit", system + [5]), conv("miss", list(range(300, 365)))
    assert s.estimate_ttft(hit) < s.estimate_ttft(miss)
    assert s.estimate_ttft(hit) == pytest.approx(s.step_cost(1, 0) + s.step_cost(0, 0))


def test_measured_step_cost_learns_prefill_and_decode_separately():
    """A machine whose prefill is 10x cheaper per token than the default model's and whose decode is 3x
    dearer: after a mix of steps the fit predicts both (the default model's ratio would not)."""
    from pdserve.engine.scheduler import MeasuredStepCost

    def truth(p, d):
        return 2e-4 * p + 1.5e-2 * d + 0.01

    cost = MeasuredStepCost()
    assert cost(100, 0) == default_step_cost(100, 0) and cost.coef is None  # nothing measured: the default
    shapes = [(0, 8), (0, 16), (300, 4), (0, 30), (1000, 0), (64, 12), (0, 2), (512, 20)] * 10
    for p, d in shapes:
        cost.observe(p, d, truth(p, d))
    for p, d in [(2000, 0), (0, 1), (0, 64), (256, 32)]:
        assert cost(p, d) == pytest.approx(truth(p, d), rel=0.05), (p, d)
    a, b, c = cost.coef
    assert a == pytest.approx(2e-4, rel=0.05) and b == pytest.approx(1.5e-2, rel=0.05)


def test_measured_step_cost_with_only_decode_steps_keeps_a_sane_prefill_estimate():
    from pdserve.engine.scheduler import MeasuredStepCost

    cost = MeasuredStepCost()
    for d in (1, 2, 4, 8) * 20:
        cost.observe(0, d, 2 * default_step_cost(0, d))  # a machine twice as slow as the default model
    assert cost(0, 4) == pytest.approx(2 * default_step_cost(0, 4), rel=0.05)
    assert 0 < cost(512, 0) - cost(0, 0) < 10 * 512 * 2e-3  # the prior still prices a prompt token, sanely


# -- parallel sampling: forked sequences share their parent's prompt blocks ------------------------------
def test_forked_children_share_the_prompt_blocks_and_compute_only_the_last_block():
    s = make(num_blocks=64, block_size=4, policy="continuous", max_num_seqs=8)
    parent = req("p", prompt=10, out=3)  # prompt blocks: [0..3] [4..7] [8, 9]
    s.add(parent, now=0)
    assert run_step(s, 0) == [("p", 10)]
    used = s.blocks.num_blocks - s.blocks.num_free_blocks
    children = [req(f"c{i}", prompt=10, out=3) for i in range(3)]
    for c in children:
        s.add(c, now=1, fork_from=parent)
        assert c.num_forked_tokens == c.num_computed_tokens == 8  # two full blocks; the last one is its own
        assert c.block_table == parent.block_table[:2]
    assert all(s.blocks.ref_count(b) == 4 for b in parent.block_table[:2])
    assert s.blocks.num_blocks - s.blocks.num_free_blocks == used  # sharing takes no block
    got = dict(run_step(s, 1))
    assert got == {"p": 1, "c0": 2, "c1": 2, "c2": 2}  # each child computes tokens 8 and 9 only
    assert all(c.block_table[:2] == parent.block_table[:2] and c.block_table[2] != parent.block_table[2]
               for c in children)
    s.blocks.check_invariants()
    drain(s, 2)
    assert_clean(s)


def test_a_fork_shares_nothing_when_it_cannot_and_an_aborted_or_preempted_child_frees_its_share():
    s = make(num_blocks=64, block_size=4, policy="continuous")
    parent = req("p", prompt=10, out=8)
    s.add(parent, now=0)
    early = req("early", prompt=10)
    s.add(early, now=0, fork_from=parent)  # the parent has computed nothing yet
    assert early.num_computed_tokens == 0 and not early.block_table
    short = req("short", prompt=4)
    run_step(s, 0)
    s.add(short, now=1, fork_from=parent)  # another prompt
    assert short.num_computed_tokens == 0
    child = req("c", prompt=10, out=8)
    s.add(child, now=1, fork_from=parent)
    assert child.num_forked_tokens == 8
    s.finish(child, FinishReason.ABORT)  # aborted while queued: its references go, the parent's stay
    assert all(s.blocks.ref_count(b) == 1 for b in parent.block_table[:2])
    other = req("c2", prompt=10, out=8)
    s.add(other, now=1, fork_from=parent)
    run_step(s, 1)
    s._preempt(other, SchedulerOutput())  # recompute: the shared blocks are dropped, not freed for the parent
    assert other.num_forked_tokens == 0 and not other.block_table
    assert all(s.blocks.ref_count(b) >= 1 for b in parent.block_table)
    s.blocks.check_invariants()
    drain(s, 3)
    assert_clean(s)

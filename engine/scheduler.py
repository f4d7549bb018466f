"""Iteration-level scheduling: pure policy over plain dataclasses (no torch, no Ray).

A request's life (`Sequence.status`):

    WAITING --admit--> RUNNING --finish/abort--> FINISHED
    RUNNING --preempt (swap)--> SWAPPED --swap in--> RUNNING
    RUNNING --preempt (recompute)--> WAITING   (KV dropped; prompt + output prefilled again)

`schedule(now)` decides what the next engine step runs and returns a
`SchedulerOutput`: (sequence, number of its next tokens) pairs under
`max_num_seqs` and the token budget `max_num_batched_tokens`, plus the block
copies the step must perform first (swap out, then swap in). There is no
prefill phase and no decode phase: every sequence has `num_computed_tokens`
and a token count, and a step hands out tokens. A decode is one token; a
prefill (or a chunk of one) is several; a request whose KV arrived from
elsewhere simply starts with its computed count high.

Ordering is by urgency: lower `priority` first (as in vLLM), then arrival
(FCFS within a level; `queue_order="shortest"` admits new requests with the
fewest prompt tokens still to compute first, each for at most
`shortest_max_wait` seconds of its wait). Aging bounds starvation: a request that has waited
`starvation_timeout` is served before every request that has not.

Policies (`SchedulerConfig.policy`), all through `schedule()`:
  static      wait for `max_num_seqs` requests (or the end of input), run the batch to completion
  dynamic     like static, but a batch also starts once the oldest request waited `batch_timeout`
  continuous  slots refilled every iteration; each prefill runs whole, in one step
  chunked     continuous, with prefills cut into chunks that share steps with decode tokens

Blocks are accounted through two `BlockManager`s (device pool and CPU swap
pool); the engine moves the bytes the output asks for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.sequence import FinishReason, Sequence, SequenceStatus


class QueueFullError(RuntimeError):
    """The request was refused (waiting queue full, or its TTFT deadline cannot be met).
    `retry_after` is the scheduler's estimate, in seconds, of when to try again."""

    http_status = 503  # how it reaches the client (engine.messages.WorkerError.of)

    def __init__(self, message: str, retry_after: float, reason: str):
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, cpu block), run first
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu block, device block), run second
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def empty(self) -> bool:
        return not (self.scheduled or self.swap_out or self.swap_in)


# Seconds for a step with this many prefill tokens (those of whole, un-chunked prompts
# separately) and decode tokens; used to estimate TTFT for admission.
StepCost = Callable[[int, int], float]


def default_step_cost(prefill_tokens: int, decode_tokens: int) -> float:
    return 2e-3 * prefill_tokens + 5e-3 * decode_tokens + 0.03


class MeasuredStepCost:
    """A `StepCost` that learns this machine's speed from the steps the engine reports: seconds =
    a * prefill tokens + b * decode tokens + c, fitted by exponentially weighted least squares (old steps
    fade with `decay`), so prefill and decode are measured separately (SLA-aware admission estimates TTFT
    in this machine's seconds; conditional disaggregation weighs a prefill against a decode step).

    Until the steps seen pin all three terms (only decode steps, say, say nothing about a prompt token),
    the fit leans on a prior: a few pseudo-steps of the default model, scaled by the moving average of
    measured / predicted time, at representative shapes, each weighing a hundredth of a real step."""

    PRIOR_SHAPES = ((512, 0), (64, 0), (0, 1), (0, 32))  # (prefill, decode) tokens of the pseudo-steps
    PRIOR_WEIGHT = 0.01  # each pseudo-step counts as this many real ones: enough to pin what real steps leave open

    def __init__(self, base: StepCost = default_step_cost, alpha: float = 0.1, decay: float = 0.98):
        self.base = base
        self.alpha = alpha
        self.decay = decay
        self.scale = 1.0
        self.num_observed = 0  # steps measured so far: 0 means the costs are still the default model's guesses
        self._xtx = [[0.0] * 3 for _ in range(3)]  # weighted sums of x x^T and x y, x = (prefill, decode, 1)
        self._xty = [0.0] * 3
        self.coef: tuple[float, float, float] | None = None  # (s per prefill token, per decode token, per step)

    def __call__(self, prefill_tokens: int, decode_tokens: int) -> float:
        if self.coef is None:
            return self.scale * self.base(prefill_tokens, decode_tokens)
        a, b, c = self.coef
        return a * prefill_tokens + b * decode_tokens + c

    def observe(self, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        predicted = self.base(prefill_tokens, decode_tokens)
        if not (predicted > 0 and seconds > 0):
            return
        self.scale += self.alpha * (seconds / predicted - self.scale)
        self.num_observed += 1
        x = (float(prefill_tokens), float(decode_tokens), 1.0)
        for i in range(3):
            self._xty[i] = self.decay * self._xty[i] + x[i] * seconds
            for j in range(3):
                self._xtx[i][j] = self.decay * self._xtx[i][j] + x[i] * x[j]
        self.coef = self._fit()

    def _fit(self) -> tuple[float, float, float] | None:
        a = [row[:] for row in self._xtx]
        y = self._xty[:]
        for p, d in self.PRIOR_SHAPES:  # the prior's pseudo-steps
            x = (float(p), float(d), 1.0)
            t = self.scale * self.base(p, d)
            for i in range(3):
                y[i] += self.PRIOR_WEIGHT * x[i] * t
                for j in range(3):
                    a[i][j] += self.PRIOR_WEIGHT * x[i] * x[j]
        coef = _solve3(a, y)
        if coef is None or any(c < 0 for c in coef):  # degenerate, or a fit that makes work free: keep the prior
            return None
        return coef


def _solve3(a: list[list[float]], y: list[float]) -> tuple[float, float, float] | None:
    """Gaussian elimination with partial pivoting on a 3x3 system; None when it is singular."""
    m = [a[i][:] + [y[i]] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, 3):
            f = m[r][col] / m[col][col]
            for k in range(col, 4):
                m[r][k] -= f * m[col][k]
    out = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        out[r] = (m[r][3] - sum(m[r][k] * out[k] for k in range(r + 1, 3))) / m[r][r]
    return out[0], out[1], out[2]


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, step_cost: StepCost = default_step_cost):
        self.config = config
        self.blocks = blocks
        self.cpu_blocks = (BlockManager(config.swap_space_blocks, blocks.block_size)
                           if config.swap_space_blocks else None)
        self.step_cost = step_cost
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.batch: list[Sequence] = []  # static/dynamic: the batch in flight
        self.input_closed = False  # static/dynamic: no more arrivals, so a partial batch may start
        self.num_preemptions = 0
        self.num_swaps = 0
        self.prefix_cache_queries = 0  # tokens of admitted requests looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens the cache supplied

    # -- requests ------------------------------------------------------------
    def add(self, seq: Sequence, now: float, fork_from: Sequence | None = None) -> None:
        """Queue a request; raises `QueueFullError` when the overload policy refuses it. `fork_from`: a
        sequence of the same prompt (a sibling of a parallel-sampling request) whose prompt KV it shares
        where it can (`fork`)."""
        c = self.config
        if c.max_num_queued_requests is not None and len(self.waiting) >= c.max_num_queued_requests:
            raise QueueFullError(f"the waiting queue is full ({len(self.waiting)} requests)",
                                 self._drain_estimate(), "queue_full")
        if seq.deadline is not None and c.overload == "reject":
            eta = now + self.estimate_ttft(seq)
            if eta > seq.deadline:
                raise QueueFullError(f"TTFT deadline cannot be met (estimated {eta - now:.3f}s, "
                                     f"allowed {seq.deadline - now:.3f}s)", self._drain_estimate(), "deadline")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        if fork_from is not None:
            self.fork(seq, fork_from)

    def fork(self, seq: Sequence, parent: Sequence) -> int:
        """Let a queued sequence with no KV yet share `parent`'s prompt KV: a reference to each of its full
        blocks before the block of the last prompt token. The child computes that last block's tokens
        itself (at most a block's worth), into a block of its own, and samples its first token from its own
        logits; so no shared block is ever written, and sharing needs no copy. Returns the tokens shared
        (0: nothing to share, e.g. the parent was preempted or its prompt is under two blocks)."""
        bs = self.blocks.block_size
        k = (len(seq.prompt_token_ids) - 1) // bs
        if (k <= 0 or seq.block_table or seq.num_computed_tokens or seq.status is not SequenceStatus.WAITING
                or seq.params.prompt_logprobs is not None
                or parent.status is not SequenceStatus.RUNNING or len(parent.block_table) < k
                or parent.num_computed_tokens < k * bs or parent.prompt_token_ids != seq.prompt_token_ids):
            return 0
        seq.block_table = self.blocks.share(parent.block_table[:k])
        seq.num_computed_tokens = seq.num_forked_tokens = k * bs
        seq.num_registered_blocks = min(k, parent.num_registered_blocks)
        return k * bs

    def add_running(self, seq: Sequence) -> None:
        """A request whose KV is already in the pool (imported from a prefill worker)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a request from every queue and free all its blocks (finish, abort, error)."""
        for queue in (self.waiting, self.running, self.swapped, self.batch):
            if seq in queue:
                queue.remove(seq)
        if seq.block_table:
            self.blocks.free(seq.block_table)
            seq.block_table = []
        if seq.cpu_block_table:
            self.cpu_blocks.free(seq.cpu_block_table)
            seq.cpu_block_table = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def next_wakeup(self) -> float | None:
        """When an idle scheduler will act without new input (dynamic batching's timeout), or None."""
        if self.config.policy == "dynamic" and not self.batch and self.waiting:
            return min(s.arrival_time for s in self.waiting) + self.config.batch_timeout
        return None

    # -- estimates -------------------------------------------------------------
    def urgency(self, seq: Sequence, now: float) -> tuple:
        if now - seq.arrival_time >= self.config.starvation_timeout:
            return (0, seq.arrival_time, 0)  # aged: ahead of everyone not yet aged, FCFS among them
        return (1, seq.priority, seq.arrival_time)

    def estimate_ttft(self, seq: Sequence) -> float:
        """Prefill tokens queued at least as urgent as `seq`, its own, and the decode
        steps that share their time, through the step cost."""
        ahead = sum(self._uncached(s) for s in self.waiting if s.priority <= seq.priority)
        tokens = ahead + self._uncached(seq)
        steps = max(1, math.ceil(tokens / self.config.max_num_batched_tokens))
        return self.step_cost(tokens, 0) + steps * self.step_cost(0, len(self.running))

    def _uncached(self, seq: Sequence) -> int:
        """Tokens a queued request still has to compute: its cached prefix counts as computed."""
        return seq.num_uncomputed - self.cached_tokens(seq)

    def _drain_estimate(self) -> float:
        tokens = sum(self._uncached(s) for s in self.waiting)
        return max(1.0, self.step_cost(tokens, len(self.running)))

    # -- one step ----------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        if self.config.policy in ("static", "dynamic"):
            return self._schedule_batch(now)
        return self._schedule_iteration(now)

    def _schedule_iteration(self, now: float) -> SchedulerOutput:
        c = self.config
        chunked = c.policy == "chunked"
        out = SchedulerOutput()
        self._priority_preempt(now, out)
        budget, stalled = self._schedule_running(now, out, c.max_num_batched_tokens, chunked)
        if stalled and not out.scheduled:
            # every running request is protected and none has room: protection yields to liveness
            self._preempt(max(self.running, key=lambda s: self.urgency(s, now)), out)
            budget, _ = self._schedule_running(now, out, c.max_num_batched_tokens, chunked)
        # swapped and waiting requests, most urgent first, while slots, budget and blocks last
        cap = self._shrink_cap(out)
        for seq in sorted(self.swapped + self.waiting, key=lambda s: self._admit_key(s, now)):
            if len(self.running) >= c.max_num_seqs or (budget <= 0 and chunked):
                break
            if seq.status is SequenceStatus.WAITING:
                self._match_prefix(seq)  # a cached prefix counts as computed: only the rest is prefilled
            n = self._fit(seq, budget, chunked, cap, out)
            if n == 0 or not self._take(seq, n, out):
                self._unmatch(seq)
                break  # no overtaking: the next most urgent waits for room too
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _fit(self, seq: Sequence, budget: int, chunked: bool, cap: int | None, out: SchedulerOutput) -> int:
        """How many of a queued request's tokens this step takes (0: it waits)."""
        n = self._tokens_for(seq, budget, chunked)
        if n == 0:
            if chunked or any(k > 1 for _, k in out.scheduled):
                return 0
            # continuous: a whole prompt that does not fit what decode tokens left of the budget
            # (or the budget at all) still runs, as the step's only prefill
            n = seq.num_uncomputed
        if cap is not None and out.num_batched_tokens + n > cap and out.scheduled:
            if not chunked or cap <= out.num_batched_tokens:
                return 0
            n = cap - out.num_batched_tokens  # shrink: only the chunk that keeps the step's TPOT
        return n

    def _take(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Give a queued request the blocks for `n` more tokens and make it running; False if the pool is short."""
        if seq.status is SequenceStatus.SWAPPED:
            return self._swap_in(seq, n, out)
        if not self.blocks.can_grow(seq.block_table, seq.num_computed_tokens + n):
            return False
        self.blocks.grow(seq.block_table, seq.num_computed_tokens + n)
        self._admit(seq)
        return True

    def _schedule_running(self, now: float, out: SchedulerOutput, budget: int, chunked: bool) -> tuple[int, bool]:
        """Running requests, most urgent first; the least urgent are preempted when the pool is short.
        Returns the budget left and whether a request still running got no room."""
        planned = {id(s) for s, _ in out.scheduled}
        stalled = False
        for seq in sorted(self.running, key=lambda s: self.urgency(s, now)):
            if seq.status is not SequenceStatus.RUNNING or id(seq) in planned or budget <= 0:
                continue
            n = self._tokens_for(seq, budget, chunked)
            if n == 0:
                continue
            if not self._make_room(seq, n, now, out, planned):
                stalled |= seq.status is SequenceStatus.RUNNING
                continue
            out.scheduled.append((seq, n))
            planned.add(id(seq))
            budget -= n
        return budget, stalled

    def _admit(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        if self.blocks.enable_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_computed_tokens
            if not seq.num_output_tokens:
                seq.num_cached_tokens = seq.num_computed_tokens

    # -- prefix caching ------------------------------------------------------------------
    def _cacheable_blocks(self, seq: Sequence) -> int:
        """Full blocks of a request's known tokens a cache hit may cover: never its last token, whose
        logits the step needs, so a hit never reaches the block the request writes next."""
        return (seq.num_tokens - 1) // self.blocks.block_size

    def _match_prefix(self, seq: Sequence) -> None:
        """A request with no KV yet takes the cached blocks of its longest cached prefix."""
        if not self.blocks.enable_caching or seq.num_computed_tokens or seq.block_table or \
                seq.params.prompt_logprobs is not None:  # it needs every prompt position's logits
            return
        n = self._cacheable_blocks(seq)
        if n <= 0:
            return
        blocks = self.blocks.acquire_prefix(seq.hashes(self.blocks.block_size, n))
        seq.block_table = blocks
        seq.num_registered_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * self.blocks.block_size

    def _unmatch(self, seq: Sequence) -> None:
        """Undo `_match_prefix` for a request that stays queued (its blocks go back to the cache). A forked
        one keeps the blocks it shares with its parent: they are its KV, not a guess at it."""
        if seq.status is SequenceStatus.WAITING and seq.block_table and not seq.num_forked_tokens:
            self.blocks.free(seq.block_table)
            seq.block_table = []
            seq.num_computed_tokens = seq.num_registered_blocks = 0

    def cached_tokens(self, seq: Sequence) -> int:
        """Tokens of a request with no KV yet that the cache would supply now (a peek: nothing is taken)."""
        if not self.blocks.enable_caching or seq.num_computed_tokens or seq.params.prompt_logprobs is not None:
            return 0
        n = self._cacheable_blocks(seq)
        if n <= 0:
            return 0
        return self.blocks.num_cached_prefix(seq.hashes(self.blocks.block_size, n)) * self.blocks.block_size

    def cache_computed(self, seq: Sequence) -> None:
        """Offer the request's newly completed full blocks to the prefix cache (after a step computed them,
        or after its KV arrived from elsewhere)."""
        bm = self.blocks
        if not bm.enable_caching:
            return
        full = min(seq.num_computed_tokens // bm.block_size, len(seq.block_table))
        if full <= seq.num_registered_blocks:
            return
        hashes = seq.hashes(bm.block_size, full)
        for i in range(seq.num_registered_blocks, full):
            bm.register(seq.block_table[i], hashes[i])
        seq.num_registered_blocks = full

    def _tokens_for(self, seq: Sequence, budget: int, chunked: bool) -> int:
        remaining = seq.num_uncomputed
        if remaining <= 1:
            return remaining if budget >= 1 else 0
        if chunked:
            return min(remaining, budget, self.config.max_prefill_chunk or remaining)
        return remaining if remaining <= budget else 0

    def _admit_key(self, seq: Sequence, now: float) -> tuple:
        # requests whose TTFT deadline already passed are deferred behind those that can still make it
        late = seq.deadline is not None and seq.num_output_tokens == 0 and now > seq.deadline
        aged, level, arrival = self.urgency(seq, now)
        return (late, aged, level, self._length_key(seq, now), arrival)

    def _length_key(self, seq: Sequence, now: float) -> int:
        """queue_order="shortest": within a priority level, the fewest tokens still to prefill first. A
        request that has started (swapped, or recompute-preempted with output) or has waited
        `shortest_max_wait` keeps its arrival order, ahead of the new ones."""
        c = self.config
        if c.queue_order == "fcfs" or seq.status is not SequenceStatus.WAITING or seq.num_output_tokens \
                or now - seq.arrival_time >= c.shortest_max_wait:
            return 0
        return 1 + self._uncached(seq)

    def _shrink_cap(self, out: SchedulerOutput) -> int | None:
        """'shrink' overload policy: the most tokens this step may carry so that its estimated
        duration stays within `tpot_slo` (running requests keep their TPOT)."""
        c = self.config
        if c.overload != "shrink" or c.tpot_slo is None:
            return None
        decodes = sum(1 for _, n in out.scheduled if n == 1)
        lo, hi = 0, c.max_num_batched_tokens  # largest prefill p with step_cost(p, decodes) <= tpot_slo
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.step_cost(mid, decodes) <= c.tpot_slo:
                lo = mid
            else:
                hi = mid - 1
        return decodes + lo  # running chunks already scheduled count against `lo` too

    # -- room: preemption, swapping ------------------------------------------------
    def _make_room(self, seq: Sequence, n: int, now: float, out: SchedulerOutput, planned: set[int]) -> bool:
        """Grow `seq`'s blocks for `n` more tokens, preempting the least urgent unplanned running
        requests if needed. False when `seq` cannot run this step (it may have been preempted itself)."""
        need = seq.num_computed_tokens + n
        while not self.blocks.can_grow(seq.block_table, need):
            victim = self._victim(now, exclude=planned | {id(seq)})
            if victim is None:
                if self._protected(seq):
                    return False  # protected from thrashing: it waits for room instead
                victim = seq
            self._preempt(victim, out)
            if victim is seq:
                return False
        self.blocks.grow(seq.block_table, need)
        return True

    def _victim(self, now: float, exclude: set[int]) -> Sequence | None:
        """Least urgent, latest arrived running request not in `exclude` and not protected."""
        candidates = [s for s in self.running if id(s) not in exclude and not self._protected(s)]
        return max(candidates, key=lambda s: self.urgency(s, now), default=None)

    def _protected(self, seq: Sequence) -> bool:
        m = self.config.max_preemptions
        return m is not None and seq.num_preemptions >= m

    def _priority_preempt(self, now: float, out: SchedulerOutput) -> None:
        """A more urgent waiting request that has no room (slot or blocks) takes them from the
        least urgent running one."""
        if not self.waiting:
            return
        best = min(self.waiting, key=lambda s: self.urgency(s, now))
        while True:
            victim = self._victim(now, exclude=set())
            if victim is None or victim.priority <= best.priority:
                return
            need = self.blocks.blocks_for(best.num_uncomputed)
            if len(self.running) < self.config.max_num_seqs and self.blocks.can_allocate(need):
                return
            self._preempt(victim, out)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        mode = self.config.preemption
        self.running.remove(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        cpu = self.cpu_blocks
        if mode in ("swap", "auto") and cpu is not None and cpu.can_allocate(len(seq.block_table)):
            seq.cpu_block_table = cpu.allocate(len(seq.block_table))
            out.swap_out.extend(zip(seq.block_table, seq.cpu_block_table, strict=True))
            self.blocks.free(seq.block_table)  # named blocks stay cached (evictable) on the device
            seq.block_table = []
            seq.num_registered_blocks = 0
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
            self.num_swaps += 1
            return
        # recompute ("recompute", or a full swap pool): drop the KV, prefill prompt + output again
        self.blocks.free(seq.block_table)  # its computed prefix stays cached: resuming may not recompute it all
        seq.block_table = []
        seq.num_computed_tokens = seq.num_registered_blocks = seq.num_forked_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def _swap_in(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        need = self.blocks.blocks_for(seq.num_computed_tokens + n)
        if not self.blocks.can_allocate(need):
            return False
        device = self.blocks.allocate(need)
        out.swap_in.extend(zip(seq.cpu_block_table, device, strict=False))
        self.cpu_blocks.free(seq.cpu_block_table)
        seq.cpu_block_table = []
        seq.block_table = device
        self.swapped.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    # -- static and dynamic batching ----------------------------------------------
    def _schedule_batch(self, now: float) -> SchedulerOutput:
        c = self.config
        out = SchedulerOutput()
        self.batch = [s for s in self.batch if s.status is not SequenceStatus.FINISHED]
        if not self.batch and self.waiting:
            oldest = min(s.arrival_time for s in self.waiting)
            full = len(self.waiting) >= c.max_num_seqs
            timed_out = c.policy == "dynamic" and now - oldest >= c.batch_timeout
            if full or timed_out or self.input_closed:
                chosen = sorted(self.waiting, key=lambda s: self.urgency(s, now))[: c.max_num_seqs]
                for seq in chosen:
                    self._admit(seq)
                self.batch = chosen
        planned: set[int] = set()
        for seq in list(self.batch):
            n = seq.num_uncomputed  # whole prompts at once, as a padded static batch would run them
            if seq.status is SequenceStatus.SWAPPED:  # preempted inside the batch: it rejoins first
                if not self._swap_in(seq, n, out):
                    continue
                out.scheduled.append((seq, n))
                planned.add(id(seq))
                continue
            if seq.status is SequenceStatus.WAITING:
                self._admit(seq)
            if n and self._make_room(seq, n, now, out, planned):
                out.scheduled.append((seq, n))
                planned.add(id(seq))
        return out

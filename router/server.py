"""The router's request path: a `Router` runs on the router actor's event loop (`router.actor`)
and serves the OpenAI-compatible HTTP API (`router.api`) over the worker pools (`router.workers`).

Request path (docs/architecture.md numbers every hop): validate and tokenize (off the event loop);
name the full blocks of the request's KV (`block_hashes`, ~1 us a block: 0.5 ms for an 8k-token
prompt, so it runs on the event loop) and pick a decode worker (`KVAwarePolicy`: the most free KV
blocks, a prefix it is believed to have cached counting as blocks it need not fill; see
`router.prefix_index`); decide where the prefill runs (`place_prefill`, below); open the decode
worker's `start` with a `GenerateRequest`: it registers the request, reserves room for its KV
and answers `Ready(KVReservation)`; pick a prefill worker (fewest tokens to compute) and
call `prefill` with the request and the reservation: it prefills, pushes the KV straight into the
reserved blocks and answers `FirstToken`; then relay the decode worker's `StepItem`s, which reach
the request through the router's one token stream from that worker (`router.relay`). Colocated,
or a local prefill: the decode worker's `start` prefills the prompt itself. A client that goes
away cancels the Ray calls in flight and aborts the request on the decode worker.

Conditional disaggregation (`serve.disaggregation`, disaggregated mode only; each attempt decides
anew): "always" prefills on a prefill worker, "never" on the decode worker, and "auto" on the
decode worker when that costs everyone less, judged by the workers' measured step costs
(`WorkerStats.prefill_s_per_token`, `decode_step_s`): when no prefill worker is routable, when the
decode worker has nothing in flight, when the prefill worker shares the decode worker's cores (one
machine, `serve.share_idle_cores`: remote prefill would add no compute) and the prompt fits one
step's budget, when prefilling the tokens it has not cached takes it no
longer than one of its decode steps (its streams lose at most about one inter-token gap), or when
the prefill worker's queue would take longer than that local prefill; otherwise on a prefill
worker. Before a decode worker has measured a step, only prompts of at most one uncached block
stay local. The decisions are counted by path and reason (`disaggregation_decisions`), and a local
prefill's time shows in the TTFT breakdown as the `local_prefill` stage.

Fault tolerance: a request runs as attempts; when a worker dies, stalls, fails a step (prefill or
decode) or a KV transfer fails, the next attempt re-prefills the prompt plus the tokens already streamed on other
workers and the stream continues (`Router.generate`). Every wait on a worker has a deadline
(`serve.prefill_timeout_s`, `serve.stream_timeout_s`): a frozen or cut-off worker that the health checks
have not failed yet costs the attempt, never the request's whole life.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry

from pdserve.engine.block_manager import BlockHash, block_hashes
from pdserve.engine.config import PdserveConfig
from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.messages import GenerateRequest, StepItem, WorkerError
from pdserve.engine.sampling import INT64_MIN
from pdserve.engine.structured import GrammarCompiler
from pdserve.router import protocol as P
from pdserve.router.admission import DrainRate
from pdserve.router.metrics import PoolCollector, RouterMetrics
from pdserve.router.pool_view import PoolView
from pdserve.router.pools import (
    Choice,
    KVAwarePolicy,
    Placement,
    Route,
    RoutingPolicy,
    WorkerState,
    pick_avoiding,
    place_prefill,
)
from pdserve.router.relay import RelayClosed, StepRelay
from pdserve.router.tools import render_messages, template_knows_tools

logger = logging.getLogger(__name__)
_ids = itertools.count()


class Router:
    """The request path over the worker pools; runs on the router actor's event loop."""

    def __init__(self, config: PdserveConfig, manager, replica: str, policy: RoutingPolicy | None = None,
                 planner: bool = True):
        from pdserve.engine.model_source import load_tokenizer, resolve_model

        self.config = config
        self.serve = config.serve
        self.source = resolve_model(config.model.model, config.model.cache_dir)
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(self.source.path)
        from pdserve.engine.parallel import check_parallel

        check_parallel(hf, config)  # a TP size the model does not split by: refused before any worker starts
        self.max_model_len = min(config.model.max_model_len or hf.max_position_embeddings,
                                 hf.max_position_embeddings)
        self.vocab_size = hf.vocab_size
        self.tokenizer = load_tokenizer(self.source.path)
        # structured outputs: each new spec is compiled here once (on the tokenize thread) so that a bad one
        # is a 400 before any worker sees it; the workers compile their own copy off their engine loops
        self.grammars = GrammarCompiler(self.tokenizer, hf.vocab_size, frozenset())
        self.native_tools = template_knows_tools(self.tokenizer)
        # No token covers more characters than its vocabulary entry has (byte-level entries spell one
        # character per byte), so a prompt longer than this many characters cannot fit the context
        # window: it is refused before the tokenizer spends seconds on it.
        self.max_prompt_chars = self.max_model_len * max(
            (len(piece) for piece in self.tokenizer.get_vocab()), default=1) if self.tokenizer else None
        # Tokenizing and chat-templating a large prompt takes long: it runs here, off the event loop that
        # relays every client's tokens, one at a time (a tokenizer is not safe to share between threads).
        self._tokenize = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.model_name = self.serve.served_model_name or self.source.model_id
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.serve.metrics_prefix, self.model_name, self.registry)
        self.policy = policy or KVAwarePolicy()
        # the pools live in the pool manager (`router.control`), shared by every replica; this is our mirror
        self.replica = replica  # this replica's name: stable across its restarts, and prefixes its request ids
        self.workers = PoolView(config, self.metrics, self.model_name, manager, replica)
        self.pools = self.workers.pools  # role -> worker id -> WorkerState
        self.index = self.workers.index  # the prefixes each worker is believed to have cached
        self.block_size = config.cache.block_size  # every worker's
        self.caching = config.cache.enable_prefix_caching
        self.registry.register(PoolCollector(self.serve.metrics_prefix, self.model_name, self.pools))
        self.queued = 0  # requests admitted and not yet decoding (bounded by max_num_queued_requests)
        self.drain_rate = DrainRate()  # how fast they leave that queue: what Retry-After is computed from
        self.active = 0  # requests in flight through this router
        self.accepting = True  # False while draining for shutdown: new requests get 503
        self._start_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._relays: dict[str, StepRelay] = {}  # decode worker id -> its token stream to this router
        self._incarnation = uuid.uuid4().hex[:8]  # names this router's subscriptions (a restart opens new ones)
        self.url = ""
        self.advertised = ""  # host:port others reach this replica's HTTP server at
        self.load = self.workers.load  # arrivals and completions, reported to the pool manager for the planner
        self.autoscaler = None
        if config.autoscale.enabled and planner:  # one replica plans for the deployment
            from pdserve.router.autoscale import AutoscaleCollector, Autoscaler

            self.autoscaler = Autoscaler(self)
            self.registry.register(AutoscaleCollector(self.serve.metrics_prefix, self.model_name, self.autoscaler))

    async def scale(self, prefill: int | None = None, decode: int | None = None) -> dict:
        return await self.workers.scale(prefill, decode)

    def status(self) -> dict:
        return self.workers.status()

    def healthy(self) -> bool:
        return self.accepting and self.workers.ready()

    # -- requests ---------------------------------------------------------------------------------------
    async def tokenize(self, parsed: P.ParsedRequest) -> list[int]:
        """`encode`, off the event loop."""
        ids = await asyncio.get_running_loop().run_in_executor(self._tokenize, self.encode, parsed)
        if parsed.n > 1:
            self._check_n_fits(parsed, len(ids))
        return ids

    def _check_n_fits(self, parsed: P.ParsedRequest, num_prompt: int) -> None:
        """The n sequences of a parallel-sampling request decode on one decode worker: their KV (the shared
        prompt, then each one's last prompt block and output) must fit the largest decode worker's pool."""
        pools = [w.info.num_blocks for w in self.pools["decode"].values() if w.info.num_blocks]
        if not pools:
            return
        bs, n = self.block_size, parsed.n
        max_tokens = min(parsed.params.max_tokens, self.max_model_len - num_prompt)
        need = -(-num_prompt // bs) + n * (-(-max_tokens // bs) + 1)
        if need > max(pools):
            raise P.bad_request(f"n={n} sequences of up to {max_tokens} tokens beside a {num_prompt}-token prompt need "
                                f"{need} KV blocks; a decode worker here holds {max(pools)}: lower n or max_tokens",
                                "n")

    def encode(self, parsed: P.ParsedRequest) -> list[int]:
        self._check_prompt_chars(parsed)
        if parsed.kind == "chat":
            if self.tokenizer is None:
                raise P.bad_request("this model has no tokenizer, so chat is unavailable", "messages")
            messages, tools = render_messages(parsed.messages, parsed.tools, self.native_tools)
            try:
                text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
                raise P.bad_request(f"the chat template rejected the messages: {e}", "messages") from None
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(parsed.prompt, str):
            if self.tokenizer is None:
                raise P.bad_request("this model has no tokenizer; send token ids", "prompt")
            ids = self.tokenizer.encode(parsed.prompt)
        else:
            ids = list(parsed.prompt)
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise P.bad_request(f"token ids must be in [0, {self.vocab_size})", "prompt")
        if not ids:
            raise P.bad_request("the prompt is empty", "prompt")
        if len(ids) >= self.max_model_len:
            raise P.bad_request(f"the prompt has {len(ids)} tokens; this model's context window is "
                                f"{self.max_model_len} tokens, leaving no room for output", "prompt")
        try:
            parsed.params.check_vocab(self.vocab_size)
            if parsed.params.structured is not None:  # cached: a spec seen before costs a lookup
                self.grammars.compile(parsed.params.structured)
        except InvalidRequestError as e:
            raise P.bad_request(str(e), e.param) from None
        room = self.max_model_len - len(ids)
        if parsed.max_tokens_param is not None and parsed.params.max_tokens > room:  # vLLM's 400, not a cut
            raise P.bad_request(f"{parsed.max_tokens_param} is too large: this model's context window is "
                                f"{self.max_model_len} tokens and the prompt has {len(ids)}, leaving room for at "
                                f"most {room} output tokens; you asked for {parsed.params.max_tokens}",
                                parsed.max_tokens_param)
        if (parsed.params.stop or parsed.kind == "chat") and self.tokenizer is None:
            raise P.bad_request("stop strings need a tokenizer", "stop")
        return ids

    # -- /tokenize and /detokenize (vLLM's), on the tokenizer's thread as well ---------------------------
    async def tokenize_only(self, req: P.ParsedTokenize) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, self._tokenize_only, req)

    async def detokenize(self, ids: list[int]) -> str:
        self._check_ids(ids, "tokens", self.max_model_len)
        if self.tokenizer is None:
            raise P.bad_request("this model has no tokenizer", "tokens")
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, self.tokenizer.decode, ids)

    def _tokenize_only(self, req: P.ParsedTokenize) -> list[int]:
        if isinstance(req.prompt, list):
            self._check_ids(req.prompt, "prompt", self.max_model_len)
            return list(req.prompt)
        param = "messages" if req.messages is not None else "prompt"
        if self.tokenizer is None:
            raise P.bad_request("this model has no tokenizer", param)
        chars = sum(len(m.get("content") or "") for m in req.messages) if req.messages else len(req.prompt)
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise P.bad_request(f"the prompt has {chars} characters, more than the {self.max_model_len}-token context "
                                f"window can hold (at most {self.max_prompt_chars} characters with this tokenizer)",
                                param)
        text = req.prompt
        if req.messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(req.messages, tokenize=False,
                                                          add_generation_prompt=req.add_generation_prompt)
            except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
                raise P.bad_request(f"the chat template rejected the messages: {e}", "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)

    def _check_ids(self, ids: list[int], param: str, max_len: int) -> None:
        if len(ids) > max_len:
            raise P.bad_request(f"{param} has {len(ids)} token ids; at most {max_len} (the context window)", param)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise P.bad_request(f"token ids must be in [0, {self.vocab_size})", param)

    def _check_prompt_chars(self, parsed: P.ParsedRequest) -> None:
        if self.max_prompt_chars is None:
            return
        if parsed.kind == "chat":
            chars = sum(len(m.get("content") or "") for m in parsed.messages)
        else:
            chars = len(parsed.prompt) if isinstance(parsed.prompt, str) else 0
        if chars > self.max_prompt_chars:
            param = "messages" if parsed.kind == "chat" else "prompt"
            raise P.bad_request(f"the prompt has {chars} characters, more than the {self.max_model_len}-token context "
                                f"window can hold (at most {self.max_prompt_chars} characters with this tokenizer)",
                                param)

    async def generate_choices(self, parsed: P.ParsedRequest, ids: list[int], arrival: float
                               ) -> AsyncIterator[tuple[int, StepItem]]:
        """(choice index, `StepItem`) for each of the request's `n` choices, merged as they come; raises
        `APIError` (or a worker failure) as `generate` does, for whichever choice meets it first.

        Parallel sampling (n > 1). Choice 0 runs as any request. Once a decode worker has produced one of
        its tokens (its prompt KV is there: prefilled there, or pushed by a prefill worker, so one prefill
        and one transfer), choices 1..n-1 start on that same worker with `fork_of`: each shares choice 0's
        prompt KV blocks there (`Scheduler.fork`) and computes only the last prompt block itself. Each
        choice samples with its own generator; with a seed, choice i uses seed + i, so it equals an n=1
        request with that seed. When choice 0 ends before that point (or fails first), the others run as
        independent requests (each prefills). Each choice is its own request from then on: its own abort,
        and migration as any request's (re-prefilled with the tokens it streamed, on another worker). The
        request ends, on every worker, when the consumer stops or any choice fails."""
        if parsed.n == 1:
            async for item in self.generate(parsed, ids, arrival):
                yield 0, item
            return
        fork: asyncio.Future = asyncio.get_running_loop().create_future()
        merged: asyncio.Queue = asyncio.Queue()

        async def run(i: int) -> None:
            try:
                if i == 0:
                    gen = self.generate(parsed, ids, arrival, fork_point=fork)
                else:
                    where = await asyncio.shield(fork)
                    # the prompt's logprobs (echo) are choice 0's: the others share its prompt
                    params = dataclasses.replace(parsed.params, seed=_child_seed(parsed.params.seed, i),
                                                 prompt_logprobs=None)
                    gen = self.generate(dataclasses.replace(parsed, params=params), ids, arrival, fork_from=where,
                                        index=i)
                async for item in gen:
                    merged.put_nowait((i, item))
            except Exception as e:
                merged.put_nowait((i, e))
            finally:
                if not fork.done():
                    fork.set_result(None)  # choice 0 ended (or failed) first: the others run on their own

        tasks = [asyncio.create_task(run(i)) for i in range(parsed.n)]
        try:
            left = parsed.n
            while left:
                i, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    left -= 1
                yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each aborts its request on its workers

    async def generate(self, parsed: P.ParsedRequest, ids: list[int], arrival: float, *,
                       fork_point: asyncio.Future | None = None, fork_from: tuple[WorkerState, str] | None = None,
                       index: int = 0) -> AsyncIterator[StepItem]:
        """`StepItem`s (text, token ids, finished, finish reason); raises `APIError` before the first one.

        A request runs as one or more attempts. When a worker fails under an attempt (it died, was
        found stalled, or a KV transfer failed), the request migrates: a new attempt on other
        workers re-prefills the prompt plus every token already streamed and continues from there,
        so the client's stream goes on without a token lost or repeated (for greedy requests the
        text equals an uninterrupted run's). After `max_migrations`, or with no worker to move to
        within `failover_wait_s`, it ends with an explicit error instead.

        Parallel sampling (`generate_choices`): `fork_point` is set to (decode worker, attempt id) once a
        decode worker holds this request's prompt KV; `fork_from` runs the first attempt on that worker,
        sharing that KV. A migration drops both. `index`: the choice (only choice 0 counts the prompt)."""
        rid = f"{self.request_prefix}{next(_ids)}-{time.monotonic_ns()}"
        t = _Timing(arrival)
        streamed: list[int] = []  # token ids the client already has
        migrations = 0
        avoid: set[str] = set()
        why = None
        self.active += 1
        self.load.arrived(time.monotonic(), len(ids), parsed.params.max_tokens)
        try:
            while True:
                attempt = rid if not migrations else f"{rid}.m{migrations}"
                try:
                    fork = (fork_point, fork_from) if not migrations else (None, None)
                    async for item in self._attempt(attempt, parsed, ids, streamed, t, avoid, why, *fork):
                        streamed += item.token_ids
                        yield item
                    return
                except _Failover as f:
                    migrations += 1
                    avoid |= f.workers
                    why = str(f)
                    self.metrics.migrations.labels(self.model_name, f.reason).inc()
                    if migrations > self.serve.max_migrations:
                        raise P.unavailable(f"the request failed {migrations} times ({f}); giving up after "
                                            f"{self.serve.max_migrations} migrations") from None
                    logger.warning("%s: %s; migrating with %d tokens streamed (attempt %d)", rid, f, len(streamed),
                                   migrations + 1)
        finally:
            self.active -= 1
            self._observe_end(t, 0 if index else len(ids))
            self.load.done(time.monotonic(), parsed.params.max_tokens, t.n_out)

    def _route(self, kv_tokens: list[int]) -> tuple[Route, list[BlockHash]]:
        """The attempt as routing sees it, and the names of its KV's full blocks (none with caching off)."""
        if not self.caching:
            return Route(len(kv_tokens), self.block_size), []
        names = block_hashes(kv_tokens, self.block_size)
        overlap = {w: n for w in self.index.workers() if (n := self.index.overlap(w, names))}
        return Route(len(kv_tokens), self.block_size, overlap), names

    async def _pick(self, route: Route, avoid: set[str], why: str | None
                    ) -> tuple[WorkerState, WorkerState | None, Placement | None]:
        """A decode worker, and a prefill worker when the prefill runs remote (disaggregated mode:
        `place_prefill`). Retries wait up to `failover_wait_s` for the workers they need (a pool being
        healed); a new request is refused at once. `why`: the failure a retry moves away from."""
        deadline = time.monotonic() + (self.serve.failover_wait_s if why else 0.0)
        while True:
            picked = self._choose(route, avoid)
            if picked is not None:
                decode, prefill, placement = picked
                self._count(decode, prefill, placement)
                return decode.worker, prefill and prefill.worker, placement
            if time.monotonic() >= deadline:
                self.metrics.rejected.labels(self.model_name, "no_worker").inc()
                msg = "no healthy worker is available"
                if why:
                    msg += f" to move the request to after a worker failed ({why})"
                raise P.unavailable(msg)
            await asyncio.sleep(0.05)

    def _choose(self, route: Route, avoid: set[str]) -> tuple[Choice, Choice | None, Placement | None] | None:
        """The workers for an attempt, or None while one it needs is missing."""
        decode = pick_avoiding(self.policy.pick_decode, list(self.pools["decode"].values()), route, avoid)
        if decode is None:
            return None
        if self.serve.mode != "disaggregated":
            return decode, None, None
        mode = self.serve.disaggregation
        prefill = None if mode == "never" else pick_avoiding(
            self.policy.pick_prefill, list(self.pools["prefill"].values()), route, avoid)
        placement = place_prefill(mode, decode.worker, prefill and prefill.worker,
                                  route.uncached_tokens(decode.worker), self.block_size,
                                  self.config.scheduler.max_num_batched_tokens)
        if placement.local:
            return decode, None, placement
        return (decode, prefill, placement) if prefill is not None else None

    def _count(self, decode: Choice, prefill: Choice | None, placement: Placement | None) -> None:
        m, model = self.metrics, self.model_name
        m.routing.labels(model, "decode", decode.reason).inc()
        if prefill is not None:
            m.routing.labels(model, "prefill", prefill.reason).inc()
        if placement is not None:
            m.disaggregation.labels(model, placement.path, placement.reason).inc()

    def _relay(self, decode: WorkerState) -> StepRelay:
        """The token stream from `decode` to this router (opened on first use, again after it broke)."""
        relay = self._relays.get(decode.worker_id)
        if relay is None or not relay.alive or relay.handle is not decode.handle:
            if relay is not None:
                relay.close()
            for worker_id in [w for w, r in self._relays.items() if not r.alive]:  # workers gone since
                del self._relays[worker_id]
            relay = self._relays[decode.worker_id] = StepRelay(decode.handle, decode.worker_id,
                                                               f"{self.replica}-{self._incarnation}",
                                                               self.serve.stream_timeout_s)
        return relay

    def _decoded(self, decode: WorkerState, tokens: list[int], names: list[BlockHash]) -> None:
        """A request finished on `decode`: what it decoded stays cached there, every full block of its
        tokens but the last one's (that token was sampled, never computed)."""
        if self.caching and len(tokens) > 1:
            self.index.insert(decode.worker_id, block_hashes(tokens[:-1], self.block_size, start=list(names)))

    def _request(self, attempt: str, parsed: P.ParsedRequest, ids: list[int], streamed: list[int], t: _Timing,
                 why: str | None, remote_prefill: bool, fork_of: str | None = None) -> GenerateRequest:
        deadline = None
        if not streamed and why is None and self.serve.ttft_deadline_s is not None:
            deadline = self.serve.ttft_deadline_s - (time.monotonic() - t.arrival)
        # the server's default max_tokens is cut to what the context leaves (a client's own is checked in `encode`)
        # prompt logprobs come with the first token: an attempt after some were streamed does not redo them
        params = dataclasses.replace(parsed.params, max_tokens=min(parsed.params.max_tokens,
                                                                   self.max_model_len - len(ids)),
                                     prompt_logprobs=None if streamed else parsed.params.prompt_logprobs)
        return GenerateRequest(attempt, params, tuple(ids), tuple(streamed), parsed.priority, deadline,
                               remote_prefill=remote_prefill, fork_of=fork_of)

    async def _attempt(self, attempt: str, parsed: P.ParsedRequest, ids: list[int], streamed: list[int],
                       t: _Timing, avoid: set[str], why: str | None, fork_point: asyncio.Future | None = None,
                       fork_from: tuple[WorkerState, str] | None = None) -> AsyncIterator[StepItem]:
        """One try at (the rest of) a request on one decode worker (and one prefill worker); see `generate`
        for `fork_point` and `fork_from`."""
        import ray

        kv_tokens = ids + streamed
        route, names = self._route(kv_tokens)
        retry = why is not None
        fork_of = None
        if fork_from is not None and self.pools["decode"].get(fork_from[0].worker_id) is fork_from[0] \
                and fork_from[0].routable:
            (decode, fork_of), prefill, placement = fork_from, None, None  # beside its sibling, sharing its KV
        else:
            decode, prefill, placement = await self._pick(route, avoid, why)
        local = placement is not None and placement.local  # disaggregated, prefilled by the decode worker
        request = self._request(attempt, parsed, ids, streamed, t, why, remote_prefill=prefill is not None,
                                fork_of=fork_of)
        to_compute = route.uncached_tokens(prefill) if prefill else 0  # the prefill worker's share
        local_tokens = route.uncached_tokens(decode) if local else 0  # the decode worker's own prefill queue
        m = self.metrics
        relay = start_ref = None
        prefill_ref = None
        decode.inflight_requests += 1
        decode.local_prefill_tokens += local_tokens
        decode.num_dispatched += 1
        self.index.insert(decode.worker_id, names)  # it receives or computes the KV: its cache will hold it
        if prefill:
            prefill.inflight_requests += 1
            prefill.inflight_tokens += to_compute
            prefill.num_dispatched += 1
            self.index.insert(prefill.worker_id, names)
        produced: list[int] = []  # this attempt's tokens
        stream_done = False
        current = decode  # the worker a failure is blamed on
        s = self.serve
        limit = self.config.kv_transfer.reserve_wait_s + s.stream_timeout_s  # the wait under way, for the message
        try:
            relay = self._relay(decode)
            inbox = relay.register(attempt)  # before the worker starts it: no item arrives unclaimed
            start_ref = decode.handle.start.remote(request, relay.subscriber)
            async with asyncio.timeout(limit):  # registered (and its KV room reserved) on the decode worker
                ready = await start_ref
            start_ref = None
            if isinstance(ready, StepItem):  # refused: no room for the KV within reserve_wait_s
                stream_done = True
                if ready.error.retryable and prefill is not None:  # another decode worker may have room
                    raise _Failover("transfer_failed", ready.error.message, prefill, decode)
                raise P.from_worker(ready.error)
            ready_at = time.monotonic()
            router_queue = ready_at - t.arrival  # validation, routing, opening the decode stream, reserving
            if not retry:
                m.stage.labels(self.model_name, "router_queue").observe(router_queue)
            awaiting_decode = False
            if prefill is not None:
                current = prefill
                prefill_ref = prefill.handle.prefill.remote(request, ready.reservation)
                limit = s.prefill_timeout_s
                async with asyncio.timeout(limit):
                    first = await prefill_ref
                prefill_ref = None
                prefill.inflight_requests -= 1
                prefill.inflight_tokens -= to_compute
                prefiller, prefill = prefill, None
                current = decode
                if isinstance(first, WorkerError):
                    if first.status >= 500 and not first.unavailable:  # the prefill worker failed (a step
                        raise _Failover("worker_error", first.message, prefiller)  # error): another prefills
                    if first.retryable:  # the pair failed: try another one
                        raise _Failover("transfer_failed", first.message, prefiller, decode)
                    raise P.from_worker(first)
                if not retry and first.stages is not None:
                    st = first.stages
                    for stage, v in (("prefill_queue", st.prefill_queue), ("prefill_compute", st.prefill_compute),
                                     ("kv_transfer", st.kv_transfer)):
                        m.stage.labels(self.model_name, stage).observe(v)
                t.tokens(len(first.token_ids), m, self.model_name)
                produced += first.token_ids
                awaiting_decode = not first.finished  # finished: the decode side is aborted (its room released)
                yield StepItem(first.token_ids, first.text, first.finished, first.finish_reason,
                               logprobs=first.logprobs, prompt_logprobs=first.prompt_logprobs)
                if first.finished:
                    return
            limit = s.stream_timeout_s
            held = None  # an item taken while coalescing that ends the run (an error): next
            items = inbox.items
            while True:
                if held is not None:
                    item, held = held, None
                elif items:  # the router is behind: no wait
                    item = items.popleft()
                else:
                    await inbox.wait()  # TimeoutError after stream_timeout_s without an item (the relay's watchdog)
                    item = items.popleft()
                if isinstance(item, BaseException):  # the worker's token stream broke (it died) or ended
                    raise item
                if item.error is None and items:
                    item, held = _coalesce(item, items)
                if item.error is not None:
                    if item.error.status >= 500 and not item.error.unavailable:  # the worker itself failed
                        raise _Failover("worker_error", item.error.message, decode)
                    raise P.from_worker(item.error)
                k = len(item.token_ids)
                if awaiting_decode and k:  # KV committed -> the decode worker's first step
                    m.stage.labels(self.model_name, "decode_admission").observe(time.monotonic() - t.last_at)
                    awaiting_decode = False
                if local_tokens and k:  # the decode worker's local prefill is done
                    decode.local_prefill_tokens -= local_tokens
                    local_tokens = 0
                if local and k and not produced and not retry:  # the decode worker prefilled it itself
                    m.stage.labels(self.model_name, "local_prefill").observe(time.monotonic() - ready_at)
                t.tokens(k, m, self.model_name)
                produced += item.token_ids
                if k and fork_point is not None and not fork_point.done():
                    fork_point.set_result((decode, attempt))  # its prompt KV is on `decode` now
                stream_done = item.finished
                if stream_done:  # before yielding: the caller may close this generator at the last item
                    self._decoded(decode, kv_tokens + produced, names)
                yield item
                if stream_done:
                    break
        except (ray.exceptions.RayActorError, RelayClosed) as e:  # the worker died (or was killed as stalled)
            if isinstance(e, ray.exceptions.ActorDiedError):
                self.workers.fail_worker(current, "died")  # out of routing now, not at the next health check
            raise _Failover("worker_died", f"{current.worker_id} died: {type(e).__name__}", current) from None
        except ray.exceptions.RayError as e:  # the call failed inside the worker
            raise _Failover("worker_error", f"{current.worker_id}: {type(e).__name__}: {e}", current) from None
        except TimeoutError:  # frozen, or cut off, and not (yet) failed by the health checks
            raise _Failover("timeout", f"{current.worker_id} did not answer within {limit:g}s", current) from None
        finally:
            decode.inflight_requests -= 1
            decode.local_prefill_tokens -= local_tokens
            if prefill is not None:
                prefill.inflight_requests -= 1
                prefill.inflight_tokens -= to_compute
            if prefill_ref is not None:
                with contextlib.suppress(Exception):
                    ray.cancel(prefill_ref)
            if relay is not None:
                relay.unregister(attempt)
                if start_ref is not None:  # still starting: stop that (a start cancelled mid-way aborts)
                    with contextlib.suppress(Exception):
                        ray.cancel(start_ref)
                if not stream_done:  # client gone, a failure, or done on the prefill side
                    with contextlib.suppress(Exception):
                        decode.handle.abort.remote(attempt)

    def _observe_end(self, t: _Timing, num_prompt: int) -> None:
        m = self.metrics
        if t.first_at is not None:
            end = time.monotonic()
            m.e2e.labels(self.model_name).observe(end - t.arrival)
            if t.n_out > 1:
                m.tpot.labels(self.model_name).observe((end - t.first_at) / (t.n_out - 1))
            m.generation_tokens.labels(self.model_name).inc(t.n_out)
            m.prompt_tokens.labels(self.model_name).inc(num_prompt)

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self, adopt: bool = False) -> str:
        """Start the pools and the HTTP server (idempotent). `adopt`: this is a restarted router;
        take over the workers the previous incarnation left running."""
        async with self._start_lock:
            if self.url:
                return self.url
            import uvicorn

            s = self.serve
            from pdserve.router.api import serve_app

            # h11 explicitly (httptools, when installed, ignores the header limit)
            config = uvicorn.Config(serve_app(self), host=s.host, port=s.port, log_level="warning", lifespan="off",
                                    timeout_graceful_shutdown=2, http="h11",
                                    h11_max_incomplete_event_size=s.max_header_bytes)
            self._server = uvicorn.Server(config)
            serving = asyncio.create_task(self._server.serve())
            self._tasks.append(serving)
            while not self._server.started:
                if serving.done():
                    serving.result()  # raises: the port is taken, ...
                    raise RuntimeError("the HTTP server stopped while starting")
                await asyncio.sleep(0.02)
            port = self._server.servers[0].sockets[0].getsockname()[1]
            url = f"http://{s.host}:{port}"
            host = s.host if s.host not in ("0.0.0.0", "::", "") else _node_ip()
            self.advertised = f"{host}:{port}"  # where the other replicas' /metrics/targets list this one
            await self.workers.start(f"http://{self.advertised}")  # /health answers 503 until the pools are ready
            if self.autoscaler is not None:
                self._tasks.append(asyncio.create_task(self.autoscaler.run()))
            if adopt:  # restarted: what the previous incarnation had in flight went with its clients
                await self._abort_previous()
            self.url = url
            return self.url

    @property
    def request_prefix(self) -> str:
        """Every request id this replica makes starts with it (its restart aborts what is left of them)."""
        return f"req-{self.replica}-"

    async def _abort_previous(self) -> None:
        """Free what this replica's previous incarnation left on the workers (its clients are gone)."""
        workers = [w for pool in self.pools.values() for w in pool.values()]
        done = await asyncio.gather(*(w.handle.abort_prefix.remote(self.request_prefix) for w in workers),
                                    return_exceptions=True)
        n = sum(d for d in done if isinstance(d, int))
        logger.warning("router %s restarted: aborted %d requests of its previous incarnation", self.replica, n)

    async def drain(self, timeout: float | None = None) -> int:
        """Graceful shutdown, first half: refuse new requests (503 + Retry-After; /health turns 503
        so load balancers move away) and wait up to `timeout` (default `drain_timeout_s`) for the
        requests in flight to finish. Returns how many were still running."""
        self.accepting = False
        deadline = time.monotonic() + (self.serve.drain_timeout_s if timeout is None else timeout)
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.active

    async def stop(self) -> None:
        self.accepting = False
        self._tokenize.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "_server", None):
            self._server.should_exit = True
        for t in self._tasks:
            t.cancel()
        for relay in self._relays.values():
            relay.close()
        self._relays.clear()
        await self.workers.stop()  # the pools stay: they are the pool manager's


def _coalesce(item: StepItem, queue: deque) -> tuple[StepItem, object]:
    """`item` and every plain item already queued behind it as one: when the router falls behind, a
    stream's tokens leave in one SSE chunk (one socket write) instead of one per step, so its cost per
    token falls as its load rises; a router keeping up sees one item at a time and adds no delay. Returns
    the merged item and the first queued one that cannot join (an error, the stream's end), or None."""
    if item.finished or not queue:
        return item, None
    tokens, text, logprobs = list(item.token_ids), [item.text], list(item.logprobs or ())
    last = item
    while not last.finished and queue:
        nxt = queue.popleft()
        if isinstance(nxt, BaseException) or nxt.error is not None:
            return _joined(last, tokens, text, logprobs, item), nxt
        tokens += nxt.token_ids
        text.append(nxt.text)
        logprobs += nxt.logprobs or ()
        last = nxt
    return _joined(last, tokens, text, logprobs, item), None


def _joined(last: StepItem, tokens: list[int], text: list[str], logprobs: list, first: StepItem) -> StepItem:
    if last is first:
        return first
    return StepItem(tuple(tokens), "".join(text), last.finished, last.finish_reason, last.num_output_tokens,
                    logprobs=tuple(logprobs) if first.logprobs is not None or last.logprobs is not None else None,
                    prompt_logprobs=first.prompt_logprobs)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _child_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: seed + index (as vLLM), wrapped into the 64-bit range torch generators take."""
    if seed is None:
        return None
    return (seed + index - INT64_MIN) % 2**64 + INT64_MIN


class _Failover(Exception):
    """An attempt failed in a way other workers need not (a worker died or stalled, a KV transfer
    failed): the request migrates."""

    def __init__(self, reason: str, message: str, *workers: WorkerState):
        super().__init__(message)
        self.reason = reason
        self.workers = {w.worker_id for w in workers}


class _Timing:
    """A request's client-visible timings across its attempts (TTFT, ITL, TPOT, e2e)."""

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.n_out = 0
        self._itl = None  # the ITL histogram's series for the model (looked up once, used every token)

    def tokens(self, k: int, m: RouterMetrics, model: str) -> None:
        if not k:
            return
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            m.ttft.labels(model).observe(now - self.arrival)
        elif self.last_at is not None:
            itl = self._itl or m.itl.labels(model)
            self._itl = itl
            gap = (now - self.last_at) / k
            for _ in range(k):
                itl.observe(gap)
        self.last_at = now
        self.n_out += k



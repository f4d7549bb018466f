"""Sampling parameters: plain, validated data (no torch: the scheduler imports this)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.engine.errors import InvalidRequestError

# The sampler computes in float32: below MIN_TEMPERATURE a temperature is greedy (as in vLLM; logits divided
# by a tiny temperature overflow to inf), and a top_p below MIN_TOP_P is raised to it (a top_p that rounds to
# 0 in float32 would drop every token; any top_p this small keeps just the most likely one anyway).
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-8
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # torch generators take 64-bit seeds
# Every list a request carries is bounded: each generated token is checked against them on the engine
# loop thread, in the step every other request shares. The detokenizer also holds back up to the longest
# stop string's length of text, so a long one delays streaming.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


class InvalidSamplingParams(InvalidRequestError):
    """A sampling parameter is out of range; `param` names it."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop_token_set: frozenset[int] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidSamplingParams("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 <= t <= 2.0:
            raise InvalidSamplingParams("temperature", f"temperature must be in [0, 2], got {t}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 < p <= 1.0:
            raise InvalidSamplingParams("top_p", f"top_p must be in (0, 1], got {p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidSamplingParams("top_k", f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if self.seed is not None and (not isinstance(self.seed, int) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise InvalidSamplingParams("seed", f"seed must be a 64-bit integer, got {self.seed}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        if self.top_p < MIN_TOP_P:
            self.top_p = MIN_TOP_P
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidSamplingParams("stop", "stop must be a string or a list of strings")
        if any(not s for s in self.stop):
            raise InvalidSamplingParams("stop", "stop strings must be non-empty")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise InvalidSamplingParams("stop", f"stop takes at most {MAX_STOP_STRINGS} strings of at most "
                                        f"{MAX_STOP_STRING_CHARS} characters each (got {len(self.stop)} strings, "
                                        f"the longest {max(map(len, self.stop))} characters)")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise InvalidSamplingParams("stop_token_ids", "stop_token_ids must be a list of integers")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidSamplingParams("stop_token_ids", f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids "
                                        f"(got {len(self.stop_token_ids)})")
        self.stop_token_set = frozenset(self.stop_token_ids)  # checked for every generated token

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

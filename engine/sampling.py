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
# The sampling controls (applied batched on a step's logits, `engine.sampler.process_logits`). OpenAI's ranges
# for the penalties and logit_bias (at most 300 entries of [-100, 100]); a repetition penalty divides positive
# logits, so it is kept off 0, where they would overflow.
MAX_ABS_PENALTY = 2.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_ABS_LOGIT_BIAS = 100.0
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's chat top_logprobs limit)
# Structured outputs (`engine.structured`): a grammar spec is compiled once per worker (cached) and its
# compile time grows with its size, so the spec is bounded; so are guided_choice's list and its strings.
MAX_GRAMMAR_SPEC_CHARS = 32_768
MAX_GUIDED_CHOICES = 256
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice")


class InvalidSamplingParams(InvalidRequestError):
    """A sampling parameter is out of range; `param` names it."""


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match (`engine.structured` compiles it; the spec is the cache key).

    `kind`: "json" (`spec` is a JSON schema, as text; strict: no properties beyond the schema's),
    "json_object" (any JSON object; `spec` is ""), "regex" (`spec` is the pattern), "choice" (`spec` is a
    JSON list of the allowed strings). `param` names the request field it came from, for error messages."""

    kind: str
    spec: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidSamplingParams(self.param, f"unknown structured output kind {self.kind!r}")
        if not isinstance(self.spec, str):
            raise InvalidSamplingParams(self.param, "the structured output spec must be a string")
        if len(self.spec) > MAX_GRAMMAR_SPEC_CHARS:
            raise InvalidSamplingParams(self.param, f"{self.param} is {len(self.spec)} characters long; this "
                                        f"server's limit is {MAX_GRAMMAR_SPEC_CHARS}")


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
    presence_penalty: float = 0.0  # subtracted from the logit of every token the output holds
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # vLLM's: divides (> 0) or multiplies a logit whose token is in prompt or output
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # EOS and the stop token ids cannot be sampled before this many output tokens
    # None: no logprobs; k: each sampled token's logprob and the k most likely tokens' (`engine.sampler`)
    logprobs: int | None = None
    # None: no prompt logprobs; k: each prompt token's logprob (but the first's) and the k most likely tokens'
    # at its position, from the raw model (completions' echo with logprobs). Such a request is computed whole:
    # a cached prefix has no logits to give.
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None  # a grammar the output must match (`engine.structured`)
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
        if not isinstance(self.stop_token_ids, list) or not all(_int(t) for t in self.stop_token_ids):
            raise InvalidSamplingParams("stop_token_ids", "stop_token_ids must be a list of integers")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidSamplingParams("stop_token_ids", f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids "
                                        f"(got {len(self.stop_token_ids)})")
        self.stop_token_set = frozenset(self.stop_token_ids)  # checked for every generated token
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _real(v) or not -MAX_ABS_PENALTY <= v <= MAX_ABS_PENALTY:
                raise InvalidSamplingParams(name, f"{name} must be in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}], "
                                            f"got {v}")
        v = self.repetition_penalty
        if not _real(v) or not MIN_REPETITION_PENALTY <= v <= MAX_REPETITION_PENALTY:
            raise InvalidSamplingParams("repetition_penalty", f"repetition_penalty must be in "
                                        f"[{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}], got {v}")
        if not _real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidSamplingParams("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        self._check_logit_bias()
        if self.logprobs is not None and (not _int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidSamplingParams("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        k = self.prompt_logprobs
        if k is not None and (not _int(k) or not 0 <= k <= MAX_LOGPROBS):
            raise InvalidSamplingParams("prompt_logprobs", f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {k}")
        if not _int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidSamplingParams("min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                                        f"got {self.min_tokens}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidSamplingParams("response_format", "structured must be a StructuredOutput")
        if self.structured is not None and self.min_tokens:  # the grammar may allow only EOS before then
            raise InvalidSamplingParams("min_tokens", "min_tokens cannot be combined with structured outputs")

    def _check_logit_bias(self) -> None:
        b = self.logit_bias
        if not isinstance(b, dict) or not all(_int(k) and _real(v) for k, v in b.items()):
            raise InvalidSamplingParams("logit_bias", "logit_bias must map token ids to numbers")
        if len(b) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidSamplingParams("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} token ids "
                                        f"(got {len(b)})")
        if any(k < 0 for k in b):
            raise InvalidSamplingParams("logit_bias", "logit_bias token ids must be non-negative")
        if any(not -MAX_ABS_LOGIT_BIAS <= v <= MAX_ABS_LOGIT_BIAS for v in b.values()):
            raise InvalidSamplingParams("logit_bias", f"logit_bias values must be in [-{MAX_ABS_LOGIT_BIAS:g}, "
                                        f"{MAX_ABS_LOGIT_BIAS:g}]")

    def check_vocab(self, vocab_size: int, stop_ids: frozenset[int] | set[int] = frozenset()) -> None:
        """What needs the model's vocabulary: logit_bias token ids in range, and min_tokens leaving some token
        besides `stop_ids` (EOS) and the stop token ids to sample."""
        if self.logit_bias and max(self.logit_bias) >= vocab_size:
            raise InvalidSamplingParams("logit_bias", f"logit_bias token ids must be in [0, {vocab_size}), got "
                                        f"{max(self.logit_bias)}")
        if self.min_tokens and len({t for t in self.stop_token_set | set(stop_ids) if 0 <= t < vocab_size}) >= \
                vocab_size:
            raise InvalidSamplingParams("min_tokens", "min_tokens would mask every token of the vocabulary")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

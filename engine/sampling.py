"""Sampling parameters (plain, validated data) and the torch sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of range; `param` names it (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


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
        if any(not s for s in self.stop):
            raise InvalidSamplingParams("stop", "stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of `logits` [n, vocab] (float32)."""
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    out = [0] * len(params)
    if greedy_rows:
        if len(greedy_rows) == len(params):
            return logits.argmax(dim=-1).tolist()
        idx = torch.tensor(greedy_rows, device=logits.device)
        for i, tok in zip(greedy_rows, logits.index_select(0, idx).argmax(dim=-1).tolist(), strict=True):
            out[i] = tok
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = _sample_row(logits[i], p, generators[i])
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    logits = logits.float() / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop tokens whose preceding cumulative mass already reaches top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())

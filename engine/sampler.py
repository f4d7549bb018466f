"""The torch sampler: the sampling controls, greedy, temperature, min-p, top-k, top-p, per-request generators.

`process_logits` applies the controls that read a request's tokens, batched over the rows of a step's
logits, in vLLM's order: `logit_bias`, the `min_tokens` mask, then the penalties (repetition over prompt
and output tokens, frequency and presence over output tokens). Each runs only on the rows that ask for
it, as a few tensor operations over those rows (the penalties count the (row, token) pairs of the rows'
token ids each step and change only those logits), so a step in which no row uses one pays nothing for
it. Then each row is sampled: greedy rows take the argmax; the others divide by their temperature and
drop tokens by min-p, top-k and top-p before drawing from their own generator. Logprobs, for the rows
that ask, are the log-softmax of the processed logits (after the controls, before temperature and the
min-p, top-k and top-p cuts: vLLM by default returns the raw model's instead; without controls the two
agree).
"""

from __future__ import annotations

import itertools

import torch

from pdserve.engine.messages import TokenLogprob
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import Sequence


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def advance_generator(g: torch.Generator, vocab: int, draws: int, device: torch.device) -> None:
    """Move `g` past `draws` of `sample`'s draws over a `vocab`-sized row. A draw is `torch.multinomial` of one
    sample, which takes one exponential per token of the row whatever the probabilities (the exponential-race
    form of the Gumbel-max trick in ATen), so drawing that many exponentials consumes exactly the same."""
    for _ in range(draws):
        torch.empty(vocab, dtype=torch.float32, device=device).exponential_(1, generator=g)


def sample(logits: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator],
           eos_token_ids: frozenset[int] | set[int] = frozenset()) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of `logits` [n, vocab] (float32; the controls are applied to it in place), row i
    being `seqs[i]`'s next token; and for the rows whose request asked, its `TokenLogprob`."""
    logits = process_logits(logits, seqs, eos_token_ids)
    params = [s.params for s in seqs]
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    out = [0] * len(params)
    if len(greedy_rows) == len(params):
        out = logits.argmax(dim=-1).tolist()
    elif greedy_rows:
        idx = torch.tensor(greedy_rows, device=logits.device)
        for i, tok in zip(greedy_rows, logits.index_select(0, idx).argmax(dim=-1).tolist(), strict=True):
            out[i] = tok
    for i, p in enumerate(params):
        if not p.greedy:
            probs = filter_logits(logits[i], p).softmax(-1)
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out, logprobs(logits, params, out)


def logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]) -> list[TokenLogprob | None]:
    """The log-softmax of the (processed) logits at each sampled token, and the top `logprobs` alternatives,
    computed together for the rows that asked (None for the others)."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return result
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=dev)).squeeze(1).tolist()
    k = max(params[i].logprobs for i in rows)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0])
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs
        result[i] = TokenLogprob(tokens[i], chosen[j], tuple(zip(top_i[j][:n], top_v[j][:n], strict=True)))
    return result


def process_logits(logits: torch.Tensor, seqs: list[Sequence],
                   eos_token_ids: frozenset[int] | set[int] = frozenset()) -> torch.Tensor:
    """`logits` [n, vocab] with each row's logit_bias, min_tokens mask and penalties applied (in place)."""
    vocab = logits.shape[-1]
    dev = logits.device
    biased = [(i, s.params.logit_bias) for i, s in enumerate(seqs) if s.params.logit_bias]
    if biased:
        rows = torch.tensor([i for i, b in biased for _ in b], device=dev)
        cols = torch.tensor([t for _, b in biased for t in b], device=dev)
        vals = torch.tensor([v for _, b in biased for v in b.values()], dtype=logits.dtype, device=dev)
        logits.index_put_((rows, cols), vals, accumulate=True)
    masked = [(i, [t for t in s.params.stop_token_set | eos_token_ids if 0 <= t < vocab])
              for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
    if masked:
        rows = torch.tensor([i for i, ts in masked for _ in ts], device=dev, dtype=torch.long)
        cols = torch.tensor([t for _, ts in masked for t in ts], device=dev, dtype=torch.long)
        logits[rows, cols] = float("-inf")
    penalized = [i for i, s in enumerate(seqs) if s.params.penalized]
    if penalized:
        _penalize(logits, [seqs[i] for i in penalized], penalized)
    return logits


def _penalize(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """vLLM's penalties on `logits[rows]`, touching only the logits of tokens a row has seen: the (row, token)
    pairs of the rows' tokens are counted with one `unique` (a few thousand pairs, where a dense [rows, vocab]
    count would pass over every logit of every row several times, ~20% of a batch-32 decode step)."""
    vocab = logits.shape[-1]
    dev = logits.device
    params = [s.params for s in seqs]
    out_keys = _keys([s.output_token_ids for s in seqs], rows, vocab)
    out_pairs, out_counts = torch.unique(out_keys, return_counts=True) if out_keys.numel() else (out_keys, out_keys)
    rep_rows = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        rep_set = set(rep_rows)
        prompt_keys = _keys([s.prompt_token_ids if j in rep_set else [] for j, s in enumerate(seqs)], rows, vocab)
        out_rep = out_pairs
        if len(rep_rows) < len(rows):  # the output tokens of the rows with a repetition penalty
            rep_row_ids = torch.tensor([rows[j] for j in rep_rows])
            out_rep = out_pairs[torch.isin(out_pairs // vocab, rep_row_ids)]
        seen = torch.unique(torch.cat([prompt_keys, out_rep]))  # in the prompt or the output
        rep = torch.ones(logits.shape[0], dtype=logits.dtype)
        rep[rows] = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype)
        _update(logits, seen, vocab, lambda v, r: torch.where(v > 0, v / rep.to(dev)[r], v * rep.to(dev)[r]))
    if out_pairs.numel() and any(p.frequency_penalty or p.presence_penalty for p in params):
        freq = torch.zeros(logits.shape[0], dtype=logits.dtype)
        pres = torch.zeros(logits.shape[0], dtype=logits.dtype)
        freq[rows] = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype)
        pres[rows] = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype)
        counts = out_counts.to(device=dev, dtype=logits.dtype)
        _update(logits, out_pairs, vocab, lambda v, r: v - freq.to(dev)[r] * counts - pres.to(dev)[r])


def _keys(token_lists: list[list[int]], rows: list[int], vocab: int) -> torch.Tensor:
    """row * vocab + token for every token of each row's list (int64, on the CPU)."""
    lengths = torch.tensor([len(ts) for ts in token_lists])
    if not int(lengths.sum()):
        return torch.empty(0, dtype=torch.long)
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    return flat + torch.repeat_interleave(torch.tensor(rows, dtype=torch.long) * vocab, lengths)


def _update(logits: torch.Tensor, keys: torch.Tensor, vocab: int, fn) -> None:
    """`logits[row, token] = fn(logits[row, token], row)` at the (row, token) pairs `keys` (row * vocab + token)."""
    keys = keys.to(logits.device)
    r, c = keys // vocab, keys % vocab
    logits[r, c] = fn(logits[r, c], r)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's logits divided by its temperature, with the tokens min-p, top-k and top-p drop at -inf."""
    logits = logits.float() / p.temperature
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
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
    return logits

"""The torch sampler: the sampling controls, greedy, temperature, min-p, top-k, top-p, per-request generators.

`process_logits` applies the controls that read a request's tokens, batched over the rows of a step's
logits, in vLLM's order: `logit_bias`, the `min_tokens` mask, then the penalties (repetition over prompt
and output tokens, frequency and presence over output tokens). Each runs only on the rows that ask for
it, as a few tensor operations over those rows (the penalties count the (row, token) pairs of the rows'
token ids each step and change only those logits), so a step in which no row uses one pays nothing for
it. Then the rows are sampled together: greedy rows take the argmax; the others divide by their temperature
and drop tokens by min-p, top-k and top-p (batched over the rows that use each), then each draws from its own
generator as `torch.multinomial` would (one exponential per token, `argmax(p / q)`, the same stream and the
same token) but without its host syncs. Logprobs, for the rows that ask, are the log-softmax of the processed
logits (after the controls, before temperature and the min-p, top-k and top-p cuts: vLLM by default returns
the raw model's instead; without controls the two agree).

Host syncs: everything above stays on the device; the step's results (tokens, logprobs, and the prompt
logprobs the forward pass queued) come to the host together in one transfer (`HostReads.fetch`), the
step's single device-to-host sync. `tests/engine/test_step_syncs.py` holds the engine to it.
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


class HostReads:
    """Device tensors a step reads on the host, brought over together: `add` each (1-D or 2-D, any dtype whose
    values a float64 holds exactly: token ids, float32 logprobs), then one `fetch` moves them all in a single
    transfer, the step's one device-to-host sync, and each `add`'s handle indexes the result as nested lists."""

    def __init__(self):
        self._tensors: list[torch.Tensor] = []
        self._values: list[list] | None = None

    def add(self, t: torch.Tensor) -> int:
        if t.dim() not in (1, 2):
            raise ValueError(f"HostReads holds 1-D and 2-D tensors, not {t.dim()}-D")
        self._tensors.append(t)
        return len(self._tensors) - 1

    def fetch(self) -> None:
        ts = self._tensors
        if not ts:
            self._values = []
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in ts]).tolist()  # the one sync
        values, pos = [], 0
        for t in ts:
            n = t.numel()
            part = flat[pos:pos + n]
            pos += n
            if t.dim() == 2:
                width = t.shape[1]
                part = [part[r * width:(r + 1) * width] for r in range(t.shape[0])]
            values.append(part)
        self._values = values

    def __getitem__(self, handle: int) -> list:
        if self._values is None:
            raise RuntimeError("HostReads.fetch has not run")
        return self._values[handle]


def sample(logits: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator],
           eos_token_ids: frozenset[int] | set[int] = frozenset(),
           reads: HostReads | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of `logits` [n, vocab] (float32; the controls are applied to it in place), row i
    being `seqs[i]`'s next token; and for the rows whose request asked, its `TokenLogprob`. `reads`: the step's
    other host reads, fetched in the same transfer (the caller reads them after this returns)."""
    if reads is None:
        reads = HostReads()
    resolve = sample_on_device(logits, seqs, generators, eos_token_ids, reads)
    reads.fetch()
    return resolve()


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator],
                     eos_token_ids: frozenset[int] | set[int], reads: HostReads):
    """`sample` up to the host transfer: queues its results on `reads` and returns the function that reads them
    (after `reads.fetch()`) as (tokens, logprobs)."""
    logits = process_logits(logits, seqs, eos_token_ids)
    params = [s.params for s in seqs]
    tokens = sample_tokens(logits, params, generators)
    h_tokens = reads.add(tokens)
    resolve_lps = logprobs_on_device(logits, params, tokens, reads)

    def resolve() -> tuple[list[int], list[TokenLogprob | None]]:
        out = [int(t) for t in reads[h_tokens]]
        return out, resolve_lps(out)

    return resolve


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator]) -> torch.Tensor:
    """The rows' tokens [n] (int64, on the device), with no host sync: the argmax for greedy rows, a draw from
    each other row's filtered distribution with its own generator."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    idx = torch.tensor(rows, device=logits.device)
    probs = filter_rows(logits.index_select(0, idx), [params[i] for i in rows]).softmax(-1)
    # torch.multinomial(probs, 1) is argmax(probs / q), q ~ Exp(1) drawn from the generator, one per token (ATen's
    # one-sample path): the same draws here, per row from its own generator, minus multinomial's validity
    # checks, which read the probabilities on the host
    q = torch.stack([torch.empty_like(probs[j]).exponential_(1, generator=generators[i])
                     for j, i in enumerate(rows)])
    return tokens.index_copy_(0, idx, (probs / q).argmax(dim=-1))


def logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]) -> list[TokenLogprob | None]:
    """The log-softmax of the (processed) logits at each sampled token, and the top `logprobs` alternatives,
    computed together for the rows that asked (None for the others)."""
    reads = HostReads()
    resolve = logprobs_on_device(logits, params, torch.tensor(tokens, device=logits.device), reads)
    reads.fetch()
    return resolve(tokens)


def logprobs_on_device(logits: torch.Tensor, params: list[SamplingParams], tokens: torch.Tensor, reads: HostReads):
    """`logprobs` up to the host transfer: queues them on `reads`; returns the function that builds the
    `TokenLogprob`s from the fetched values and the host's tokens."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return lambda host_tokens: [None] * len(params)
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
    h_chosen = reads.add(lp.gather(1, tokens.index_select(0, idx)[:, None]).squeeze(1))
    k = max(params[i].logprobs for i in rows)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0])
    h_v, h_i = reads.add(top_v), reads.add(top_i)

    def resolve(host_tokens: list[int]) -> list[TokenLogprob | None]:
        chosen, values, ids = reads[h_chosen], reads[h_v], reads[h_i]
        result: list[TokenLogprob | None] = [None] * len(params)
        for j, i in enumerate(rows):
            n = params[i].logprobs
            result[i] = TokenLogprob(host_tokens[i], chosen[j],
                                     tuple(zip((int(t) for t in ids[j][:n]), values[j][:n], strict=True)))
        return result

    return resolve


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
    counts = [len(ts) for ts in token_lists]
    if not sum(counts):
        return torch.empty(0, dtype=torch.long)
    lengths = torch.tensor(counts)
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    return flat + torch.repeat_interleave(torch.tensor(rows, dtype=torch.long) * vocab, lengths)


def _update(logits: torch.Tensor, keys: torch.Tensor, vocab: int, fn) -> None:
    """`logits[row, token] = fn(logits[row, token], row)` at the (row, token) pairs `keys` (row * vocab + token)."""
    keys = keys.to(logits.device)
    r, c = keys // vocab, keys % vocab
    logits[r, c] = fn(logits[r, c], r)


def filter_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`filter_logits` over rows at once ([rows, vocab], row i under `params[i]`): each cut runs on the rows that
    use it, with the same arithmetic as one row's (`tests/engine/test_sampler.py` holds them equal)."""
    dev = logits.device
    logits = logits.float() / torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)[:, None]
    vocab = logits.shape[-1]
    sub = [i for i, p in enumerate(params) if p.min_p > 0.0]
    if sub:
        idx = torch.tensor(sub, device=dev)
        x = logits.index_select(0, idx)
        probs = x.softmax(-1)
        floor = torch.tensor([params[i].min_p for i in sub], dtype=torch.float32, device=dev)[:, None]
        logits.index_copy_(0, idx, x.masked_fill(probs < floor * probs.max(-1, keepdim=True).values, float("-inf")))
    sub = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
    if sub:
        idx = torch.tensor(sub, device=dev)
        x = logits.index_select(0, idx)
        ks = torch.tensor([params[i].top_k - 1 for i in sub], device=dev)[:, None]
        kth = torch.topk(x, max(params[i].top_k for i in sub)).values.gather(1, ks)
        logits.index_copy_(0, idx, x.masked_fill(x < kth, float("-inf")))
    sub = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if sub:
        idx = torch.tensor(sub, device=dev)
        sorted_logits, order = torch.sort(logits.index_select(0, idx), descending=True)
        probs = sorted_logits.softmax(-1)
        top_p = torch.tensor([params[i].top_p for i in sub], dtype=torch.float32, device=dev)[:, None]
        # drop tokens whose preceding cumulative mass already reaches top_p (the first always stays)
        sorted_logits = sorted_logits.masked_fill((probs.cumsum(-1) - probs) >= top_p, float("-inf"))
        logits.index_copy_(0, idx, torch.empty_like(sorted_logits).scatter_(1, order, sorted_logits))
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's logits divided by its temperature, with the tokens min-p, top-k and top-p drop at -inf (the
    per-row reference `filter_rows` is tested against)."""
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

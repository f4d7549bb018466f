"""`pdserve bench schedule`: the four batching policies on the real engine, one workload, one run.

Requests arrive over time (Poisson) with output lengths 8..256 (--quick: 8..96);
every `--long-every`-th request carries a long prompt, arriving while others
decode (the prefill-decode interference case). Each policy replays the same
arrivals in real time on the same loaded model; per policy we report output
throughput, TTFT and TPOT p50/p99. Arrival gaps are waited out with sleeps: that
is the load generator's clock, not synchronisation.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass

import torch

from pdserve.engine.config import PdserveConfig, SchedulerConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling import SamplingParams

POLICIES = ("static", "dynamic", "continuous", "chunked")


@dataclass(frozen=True)
class Arrival:
    offset: float
    prompt: list[int]
    output_len: int


def workload(n: int, rate: float, output_lens: tuple[int, int], long_every: int, long_len: int,
             vocab: int, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        plen = long_len if long_every and i % long_every == long_every - 1 else rng.randint(32, 256)
        out.append(Arrival(t, [rng.randrange(vocab) for _ in range(plen)], rng.randint(*output_lens)))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def replay(engine: LLMEngine, arrivals: list[Arrival]) -> dict[str, float]:
    t0 = time.monotonic()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []  # inter-token latencies: a stall shows here even when the mean TPOT hides it
    done: dict[str, float] = {}
    counts: dict[str, int] = {}
    arrived: dict[str, float] = {}
    i = 0
    while i < len(arrivals) or engine.has_unfinished():
        now = time.monotonic()
        while i < len(arrivals) and t0 + arrivals[i].offset <= now:
            a = arrivals[i]
            rid = f"s{i}"
            arrived[rid] = t0 + a.offset
            engine.add_request(rid, a.prompt, SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True),
                               arrival_time=t0 + a.offset, detokenize=False)
            i += 1
        engine.scheduler.input_closed = i == len(arrivals)
        if not engine.has_unfinished():
            time.sleep(max(0.0, t0 + arrivals[i].offset - time.monotonic()))
            continue
        outs = engine.step()
        now = time.monotonic()
        for o in outs:
            first.setdefault(o.request_id, now)
            if o.request_id in last:
                gaps.append(now - last[o.request_id])
            last[o.request_id] = now
            counts[o.request_id] = o.num_output_tokens
            if o.finished:
                done[o.request_id] = now
        if not outs and engine.scheduler.next_wakeup() is not None:  # dynamic: waiting for its timeout
            time.sleep(max(0.0, min(engine.scheduler.next_wakeup() - now, 0.05)))
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    ttft = [first[r] - arrived[r] for r in done]
    tpot = [(done[r] - first[r]) / (counts[r] - 1) for r in done if counts[r] > 1]
    return {"throughput_tok_s": sum(counts.values()) / (max(done.values()) - t0),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99), "itl_p99_s": pct(gaps, 99),
            "itl_max_s": max(gaps), "completed": len(done)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench schedule", description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=2.0, help="arrivals per second (Poisson)")
    ap.add_argument("--long-every", type=int, default=8, help="every Nth request has a long prompt (0: none)")
    ap.add_argument("--long-len", type=int, default=1536)
    ap.add_argument("--max-num-seqs", type=int, default=16, help="batch size for every policy")
    ap.add_argument("--chunk", type=int, default=128, help="chunked: prefill tokens per step")
    ap.add_argument("--batch-timeout", type=float, default=1.0, help="dynamic: seconds")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="16 requests, outputs 8..96")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    n, outputs = (16, (8, 96)) if args.quick else (args.num_requests, (8, 256))
    engine = LLMEngine(PdserveConfig().replace(engine={"num_threads": args.threads}, cache={"num_kv_blocks": 4096}))
    torch.set_num_threads(args.threads)
    arrivals = workload(n, args.rate, outputs, args.long_every, args.long_len, engine.arch.vocab_size, args.seed)
    results = {}
    for policy in args.policies:
        engine.reconfigure_scheduler(SchedulerConfig(
            policy=policy, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max(2048, args.long_len),
            max_prefill_chunk=args.chunk if policy == "chunked" else None, batch_timeout=args.batch_timeout))
        print(f"[bench schedule] {policy} ...", file=sys.stderr, flush=True)
        results[policy] = replay(engine, arrivals)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{n} requests, Poisson {args.rate}/s, outputs {outputs[0]}..{outputs[1]}, every {args.long_every}th prompt "
          f"{args.long_len} tokens, batch {args.max_num_seqs}; {torch.get_num_threads()} threads")
    print(f"{'policy':<11} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
          f"{'ITL p99':>8} {'ITL max':>8}")
    for p, r in results.items():
        print(f"{p:<11} {r['throughput_tok_s']:>7.1f} {r['ttft_p50_s']:>9.3f} {r['ttft_p99_s']:>9.3f} "
              f"{r['tpot_p50_s']:>9.3f} {r['tpot_p99_s']:>9.3f} {r['itl_p99_s']:>8.3f} {r['itl_max_s']:>8.3f}")
    if "static" in results and "continuous" in results:
        ratio = results["continuous"]["throughput_tok_s"] / results["static"]["throughput_tok_s"]
        print(f"continuous / static throughput: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`pdserve bench replay`: a `pdserve bench peer` workload through the bare engine, no serving path.

The same requests as `pdserve bench peer` (its workloads, seeds 0..runs-1, chat messages, greedy, exactly the
output length) go into one in-process `LLMEngine` at their arrival times, which is stepped until every request
has finished. No HTTP, no Ray, no router, no tokenization or detokenization outside the engine, no load
generator beside it: what the engine can do with the work when nothing else wants the CPU. Beside a served
figure of the same workload, on the same machine, the difference is what the serving path costs (the router,
the relay, the client's own CPU on shared cores). A request's TTFT is from its arrival to the end of the step
that sampled its first token; TPOT as `pdserve bench serve` reports it.

Only single-turn workloads (burst, poisson, mixed): a multiturn turn needs the previous turn's text.
Progress goes to stderr; with `--json` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

from pdserve.bench.peer import QUICK_WORKLOADS, WORKLOADS, load_args
from pdserve.bench.serve import Result, arrival_times, build_workload, report


def replay(engine, args: argparse.Namespace) -> tuple[list[Result], float]:
    """Run `args`' workload (a `pdserve bench serve` namespace) through `engine`; (results, duration)."""
    from pdserve.engine.sampling import SamplingParams

    if args.dataset_name == "multiturn":
        raise ValueError("replay runs single-turn workloads only (a multiturn turn needs the previous answer)")
    rng = random.Random(args.seed)
    specs = build_workload(args, rng)
    offsets = arrival_times(len(specs), args.request_rate, args.burstiness, rng)
    results = [Result(spec) for spec in specs]
    pending = sorted(range(len(specs)), key=lambda i: offsets[i], reverse=True)  # next arrival last
    live: dict[str, int] = {}
    last: dict[str, float] = {}
    prefix = f"replay-{args.seed}-{time.monotonic_ns()}-"
    t0 = time.perf_counter()
    while pending or live:
        now = time.perf_counter() - t0
        while pending and offsets[pending[-1]] <= now:
            i = pending.pop()
            spec, rid = specs[i], f"{prefix}{i}"
            system = [{"role": "system", "content": spec.system}] if spec.system else []
            params = SamplingParams(max_tokens=spec.output_len, temperature=args.temperature,
                                    ignore_eos=args.ignore_eos)
            seq = engine.add_request(rid, system + [{"role": "user", "content": spec.prompt}], params,
                                     priority=spec.priority)
            results[i].start = now
            results[i].prompt_tokens = len(seq.prompt_token_ids)
            live[rid] = i
        if not live:  # idle until the next arrival (the workload's arrival process)
            time.sleep(max(0.0, offsets[pending[-1]] - (time.perf_counter() - t0)))
            continue
        outputs = engine.step()
        now = time.perf_counter() - t0
        for out in outputs:
            i = live.get(out.request_id)
            if i is None:
                continue
            r = results[i]
            if out.new_token_ids:
                r.output_tokens += len(out.new_token_ids)
                if r.ttft is None:
                    r.ttft = now - r.start
                else:
                    r.itl.append(now - last[out.request_id])
                last[out.request_id] = now
            if out.finished:
                del live[out.request_id]
                last.pop(out.request_id, None)
                r.e2e = now - r.start
                r.ok = r.output_tokens > 0
                r.error = "" if r.ok else f"finished ({out.finish_reason}) with no tokens"
    return results, time.perf_counter() - t0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve bench replay", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--workloads", default="burst", help="comma-separated: burst, poisson, mixed")
    ap.add_argument("--runs", type=int, default=3, help="runs of each workload (seeds 0..runs-1); medians")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core, as colocated)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--model", default=None, help="a model directory or GGUF (default: the default model)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="the scheduler's token budget")
    ap.add_argument("--queue-order", default=None, choices=["fcfs", "shortest"],
                    help="the scheduler's order of new requests (default: the config's)")
    ap.add_argument("--quick", action="store_true", help="tiny workloads: a smoke test, not a measurement")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return ap


def main(argv: list[str] | None = None) -> int:
    import os

    from pdserve.engine.config import PdserveConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.platform import cpu_description
    from pdserve.engine.sampling import SamplingParams

    ap = build_parser()
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    table = QUICK_WORKLOADS if args.quick else WORKLOADS
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in table or w == "multiturn"]
    if bad or not workloads:
        ap.error(f"unknown or multi-turn workload(s) {bad or args.workloads!r}: choose from burst, poisson, mixed")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    threads = args.threads or os.cpu_count() or 1
    overrides: dict[str, Any] = {"engine": {"num_threads": threads}, "model": {"dtype": args.dtype}}
    sched = {"max_num_batched_tokens": args.max_num_batched_tokens, "queue_order": args.queue_order}
    if any(v is not None for v in sched.values()):
        overrides["scheduler"] = {k: v for k, v in sched.items() if v is not None}
    if args.model:
        overrides["model"]["model"] = args.model
    engine = LLMEngine(PdserveConfig().replace(**overrides))
    for i in range(2):  # warm-up, as the peer harness warms a server
        engine.add_request(f"warm-{i}", [{"role": "user", "content": "hello there"}],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()

    res: dict[str, Any] = {"machine": cpu_description(threads), "dtype": str(engine.dtype).removeprefix("torch."),
                           "max_num_batched_tokens": engine.config.scheduler.max_num_batched_tokens,
                           "queue_order": engine.config.scheduler.queue_order,
                           "runs": args.runs, "workloads": {}}
    for w in workloads:
        reports = []
        for run in range(args.runs):
            la = load_args(table[w], "in-process", "", seed=run)
            results, duration = replay(engine, la)
            rep = report(results, duration, {})
            reports.append(rep)
            print(f"  {w} run {run + 1}/{args.runs}: {rep['output_throughput']:.1f} tok/s, TTFT p50 "
                  f"{rep['ttft_ms']['p50']:.0f} ms p99 {rep['ttft_ms']['p99']:.0f} ms, TPOT p50 "
                  f"{rep['tpot_ms']['p50']:.1f} ms, {rep['completed']} ok in {duration:.1f} s", file=sys.stderr,
                  flush=True)
        res["workloads"][w] = {
            "output_tok_s": statistics.median(r["output_throughput"] for r in reports),
            "ttft_p50_ms": statistics.median(r["ttft_ms"]["p50"] for r in reports),
            "ttft_p99_ms": statistics.median(r["ttft_ms"]["p99"] for r in reports),
            "tpot_p50_ms": statistics.median(r["tpot_ms"]["p50"] for r in reports),
            "completed": min(r["completed"] for r in reports), "failed": max(r["failed"] for r in reports),
            "reports": reports}
    engine.shutdown()
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"pdserve bench replay: the bare engine ({res['dtype']}, budget {res['max_num_batched_tokens']} tokens), "
          f"{res['machine']}; medians of {args.runs}")
    print("| workload | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | completed |")
    print("|---|---:|---:|---:|---:|---:|")
    for w, f in res["workloads"].items():
        print(f"| {w} | {f['output_tok_s']:.1f} | {f['ttft_p50_ms']:,.0f} | {f['ttft_p99_ms']:,.0f} | "
              f"{f['tpot_p50_ms']:.1f} | {f['completed']} |")
    return 0

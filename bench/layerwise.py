"""`pdserve bench layerwise`: TTFT of a disaggregated prefill with and without layer-wise KV pipelining.

A prefill engine (the default model, `--threads` torch threads) runs a `--prompt-len`-token prompt
prefill-only and ships its KV to a decode worker's KV receiver in another process (a paged pool with
the same layout; the decode side needs no weights to receive). TTFT here is what the decode worker
waits for: from the prefill starting to the decode side acknowledging the committed KV and first
token. With `layerwise` on, layer l's KV is sent while layer l+1 computes; off, the whole KV is sent
after the forward pass. The prefill alone (no transfer) is measured in the same run as the floor.
Medians of `--runs`, modes interleaved. With `--json`, stdout carries exactly one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics
import sys
import time

import torch

from pdserve.engine.platform import cpu_isa, cpu_model


def _receiver_main(conn, fp_fields: dict, transport: str, num_blocks: int) -> None:
    torch.set_num_threads(1)
    from pdserve.engine.config import KVTransferConfig
    from pdserve.kv_transfer import Fingerprint, KVPool, KVReceiver

    pool = KVPool.standalone(Fingerprint(**fp_fields), num_blocks)

    def on_commit(received) -> None:  # a benchmark has no decode engine: the blocks go straight back
        with pool.lock:
            pool.blocks.free(received.block_table)

    rx = KVReceiver(pool, KVTransferConfig(kv_transport=transport), on_commit).start()
    conn.send(rx.address)
    conn.recv()  # until the parent says stop
    rx.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve bench layerwise", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the prefill engine")
    p.add_argument("--transports", nargs="+", default=["grpc", "nccl"], choices=["grpc", "nccl"])
    p.add_argument("--model", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    log = sys.stderr

    from pdserve.engine.config import PdserveConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling import SamplingParams
    from pdserve.kv_transfer import KVPool, KVSender, LayerStream

    cfg = PdserveConfig().replace(model={"model": args.model}, engine={"num_threads": args.threads})
    engine = LLMEngine(cfg)
    fp = KVPool.from_engine(engine).fingerprint
    n = args.prompt_len
    prompt = torch.randint(0, engine.arch.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=2, temperature=0)
    blocks = 4 * engine.block_manager.blocks_for(n)
    ctx = mp.get_context("spawn")
    counter = iter(range(10**9))

    def prefill_only() -> float:
        t0 = time.perf_counter()
        engine.add_request(f"p{next(counter)}", prompt, dataclasses.replace(params, max_tokens=1))
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t0

    def disaggregated(tx, address, layerwise: bool) -> tuple[float, float]:
        engine.config = engine.config.replace(kv_transfer={"layerwise": layerwise})
        rid = f"d{next(counter)}"
        t0 = time.perf_counter()
        tx.reserve(address, rid, n)
        stream = LayerStream(rid, n)
        fut = tx.push(address, stream)
        engine.add_request(rid, prompt, params, kv_sink=stream)
        while engine.has_unfinished():
            engine.step()
        t_prefill = time.perf_counter() - t0
        fut.result(120)
        return time.perf_counter() - t0, t_prefill

    results: dict = {"prompt_len": n, "kv_mib": n * fp.bytes_per_token_layer * fp.num_layers / 2**20,
                     "threads": args.threads, "runs": args.runs, "transports": {}}
    prefill_times = [prefill_only() for _ in range(2)]  # warm-up
    prefill_times = []
    for transport in args.transports:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_receiver_main, args=(child, dataclasses.asdict(fp), transport, blocks),
                           daemon=True)
        proc.start()
        address = parent.recv()
        tx = KVSender(cfg.kv_transfer.__class__(kv_transport=transport), fp)
        try:
            disaggregated(tx, address, True)  # warm-up: pairing, the gloo channel
            times: dict[str, list[float]] = {"layerwise": [], "whole": []}
            for run in range(args.runs):
                prefill_times.append(prefill_only())
                for mode in (("layerwise", "whole") if run % 2 == 0 else ("whole", "layerwise")):
                    ttft, _ = disaggregated(tx, address, mode == "layerwise")
                    times[mode].append(ttft)
                print(f"[{transport}] run {run + 1}/{args.runs}: layerwise {times['layerwise'][-1] * 1e3:.0f} ms, "
                      f"whole {times['whole'][-1] * 1e3:.0f} ms, prefill alone {prefill_times[-1] * 1e3:.0f} ms",
                      file=log)
            results["transports"][transport] = {
                mode: {"p50_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3}
                for mode, v in times.items()}
        finally:
            tx.close()
            parent.send("stop")
            proc.join(30)
    results["prefill_only_p50_ms"] = statistics.median(prefill_times) * 1e3

    if args.json:
        print(json.dumps(results))
        return 0
    print(f"# TTFT of a {n}-token prompt's disaggregated prefill ({results['kv_mib']:.0f} MiB of KV), "
          f"{cpu_model()} [{cpu_isa()}], {args.threads} prefill thread(s), torch {torch.__version__}, "
          f"median of {args.runs}")
    print(f"prefill alone (no transfer): {results['prefill_only_p50_ms']:.0f} ms")
    print(f"{'transport':<14}{'whole KV after prefill':>26}{'layer-wise':>16}{'saved':>10}{'transfer left':>16}")
    for transport, r in results["transports"].items():
        whole, lw = r["whole"]["p50_ms"], r["layerwise"]["p50_ms"]
        print(f"{'nccl (gloo)' if transport == 'nccl' else transport:<14}{whole:>23.0f} ms{lw:>13.0f} ms"
              f"{whole - lw:>7.0f} ms{lw - results['prefill_only_p50_ms']:>13.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

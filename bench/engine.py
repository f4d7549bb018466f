"""`pdserve bench engine`: the engine against the memory-bandwidth floor and HF transformers.

Every figure is the median of `--runs` runs, on the default model (SmolLM2-135M-Instruct) with
`--threads` torch threads for both engines; ours in `--dtype` (default `auto`: bf16 where the CPU has
native bf16, else fp32), HF in `--hf-dtype` (default float32, the reference for token-exact output).
Baselines: a torch copy gives the memory bandwidth, and
bandwidth / weight bytes is the batch-1 decode floor (each decode step streams every weight once);
HF `LlamaForCausalLM` is the baseline for decode, static-batch generation and prefill.
Progress goes to stderr; with `--json` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO, TypeVar

import torch

from pdserve.engine.config import ATTENTION_BACKENDS, PdserveConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.platform import cpu_description
from pdserve.engine.sampling import SamplingParams

T = TypeVar("T")
_request_ids = itertools.count()
_T0 = time.perf_counter()


@dataclass(frozen=True)
class Workload:
    b1_prompt_len: int = 128
    b1_steps: int = 64  # timed decode steps at batch 1
    batch: int = 32
    batch_steps: int = 32  # timed decode steps at `batch`
    prompt_lens: tuple[int, int] = (64, 512)  # inclusive range of the batched prompts' lengths
    output_lens: tuple[int, int] = (16, 128)  # inclusive range of the static batch's output lengths
    prefill_len: int = 512
    ragged_batch: int = 8
    profile_steps: int = 4
    hf_static_runs: int | None = None  # None: --runs
    seed: int = 0


FULL = Workload()
QUICK = Workload(b1_steps=16, batch=8, batch_steps=8, prompt_lens=(64, 256), output_lens=(8, 32),
                 prefill_len=256, ragged_batch=4, profile_steps=2)


@dataclass(frozen=True)
class Prompts:
    b1: list[int]
    batch: list[list[int]]
    outputs: list[int]
    prefill: list[int]
    ragged: list[list[int]]


def make_prompts(w: Workload, vocab: int) -> Prompts:
    rng = random.Random(w.seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    return Prompts(
        b1=ids(w.b1_prompt_len),
        batch=[ids(rng.randint(*w.prompt_lens)) for _ in range(w.batch)],
        outputs=[rng.randint(*w.output_lens) for _ in range(w.batch)],
        prefill=ids(w.prefill_len),
        ragged=[ids(rng.randint(*w.prompt_lens)) for _ in range(w.ragged_batch)],
    )


def median_seconds(fn: Callable[[T], object], runs: int, setup: Callable[[], T] = lambda: None,
                   warmup: bool = True) -> float:
    """Median wall time of `fn(setup())` over `runs` calls (setup untimed), after an optional untimed warm-up."""
    times = []
    for i in range(runs + int(warmup)):
        state = setup()
        t0 = time.perf_counter()
        fn(state)
        if i >= int(warmup):
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- memory bandwidth ------------------------------------------------------------------------------
def bandwidth_gbps(runs: int, threads: int) -> tuple[float, float]:
    """(1-thread copy GB/s counting read+write, 2-thread read-only GB/s) over a 256 MiB float32 tensor."""
    src = torch.rand(256 * 2**20 // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    try:
        torch.set_num_threads(1)
        copy_s = median_seconds(lambda _: dst.copy_(src), max(runs, 5))
        torch.set_num_threads(2)
        read_s = median_seconds(lambda _: src.sum(), max(runs, 5))
    finally:
        torch.set_num_threads(threads)
    return 2 * nbytes / copy_s / 1e9, nbytes / read_s / 1e9


def weight_bytes(model_dir: Path, element_size: int = 4) -> int:
    """Bytes of the model's distinct weights at `element_size` bytes each (a tied head counted once)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            shapes.update({n: fh.get_slice(n).get_shape() for n in fh.keys()})  # noqa: SIM118 (not a dict)
    if "model.embed_tokens.weight" in shapes:  # a stored head next to the embedding may be tied: count one
        shapes.pop("lm_head.weight", None)
    return sum(math.prod(s) * element_size for s in shapes.values())


# -- our engine --------------------------------------------------------------------------------------
def reset(e: LLMEngine) -> None:
    """Abort what is left of the previous run; every KV block must then be free."""
    for rid in list(e.seqs):
        e.abort(rid)
    bm = e.block_manager
    assert not e.has_unfinished() and bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"


# The sampling controls of the penalties case (`--penalties`): all three penalties on every row.
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2}


def add(e: LLMEngine, prompts: list[list[int]], max_tokens: list[int], controls: dict[str, float] | None = None
        ) -> None:
    reset(e)
    for ids, n in zip(prompts, max_tokens, strict=True):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **(controls or {}))
        e.add_request(f"bench-{next(_request_ids)}", ids, params, detokenize=False)


def prefilled(e: LLMEngine, prompts: list[list[int]], max_tokens: int, controls: dict[str, float] | None = None
              ) -> None:
    """Add `prompts` and step until every one has its first token (early ones decode meanwhile)."""
    add(e, prompts, [max_tokens] * len(prompts), controls)
    while e.waiting or any(s.num_output_tokens == 0 for s in e.running):
        e.step()


def decode_steps(e: LLMEngine, steps: int) -> None:
    batch = len(e.running)
    for _ in range(steps):
        outs = e.step()
        assert len(outs) == batch and not any(o.finished for o in outs), "decode batch changed while timed"


def engine_decode_tok_s(e: LLMEngine, prompts: list[list[int]], steps: int, runs: int,
                        controls: dict[str, float] | None = None) -> float:
    margin = steps + 64  # covers the decode steps that overlap a multi-step prefill
    t = median_seconds(lambda _: decode_steps(e, steps), runs,
                       lambda: prefilled(e, prompts, steps + margin, controls))
    reset(e)
    return len(prompts) * steps / t


def penalties_figures(e: LLMEngine, prompts: list[list[int]], steps: int, runs: int) -> dict[str, float]:
    """Batch decode with every row's presence, frequency and repetition penalties on, against off
    (`engine.sampler.process_logits`: the cost of the controls on a step's logits). Off and on alternate
    run by run, so drift on a shared machine reaches both alike."""
    off, on = [], []
    for _ in range(runs):
        off.append(engine_decode_tok_s(e, prompts, steps, 1))
        on.append(engine_decode_tok_s(e, prompts, steps, 1, PENALTIES))
    res = {"decode_b32_tok_s": statistics.median(off), "decode_b32_penalties_tok_s": statistics.median(on)}
    res["penalties_vs_off"] = res["decode_b32_penalties_tok_s"] / res["decode_b32_tok_s"]
    return res


def engine_prefill_tok_s(e: LLMEngine, prompts: list[list[int]], runs: int) -> float:
    """All `prompts` prefilled in ONE step as a ragged batch."""
    def one_step(_: None) -> None:
        outs = e.step()
        assert len(outs) == len(prompts) and all(o.finished for o in outs), "prefill did not fit one step"

    t = median_seconds(one_step, runs, lambda: add(e, prompts, [1] * len(prompts)))
    reset(e)
    return sum(map(len, prompts)) / t


def engine_same_work_tok_s(e: LLMEngine, p: Prompts, runs: int) -> float:
    useful = sum(p.outputs)

    def to_completion(_: None) -> None:
        produced = 0
        while e.has_unfinished():
            produced += sum(len(o.new_token_ids) for o in e.step())
        assert produced == useful, f"{produced} tokens produced, {useful} asked for"

    t = median_seconds(to_completion, runs, lambda: add(e, p.batch, p.outputs), warmup=False)
    reset(e)
    return useful / t


def python_overhead_frac(e: LLMEngine, prompts: list[list[int]], steps: int, runs: int, out: TextIO) -> float:
    """Share of a decode step's wall time outside top-level torch ops (aten, oneDNN's, our kernels'), from
    torch.profiler (median of `runs`)."""
    from torch.profiler import ProfilerActivity, profile

    prefilled(e, prompts, 2 + steps * runs + 64)
    decode_steps(e, 2)  # warm-up
    fracs = []
    for _ in range(runs):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            decode_steps(e, steps)
            wall = time.perf_counter() - t0
        fracs.append(1 - _top_level_op_us(prof.events()) / 1e6 / wall)
    reset(e)
    ops = sorted(prof.key_averages(), key=lambda a: a.cpu_time_total, reverse=True)[:10]
    print(f"top 10 ops by total CPU time, batch {len(prompts)} decode (ms per step):", file=out)
    for a in ops:
        print(f"  {a.key:<40} calls {a.count // steps:>5}  total {a.cpu_time_total / 1e3 / steps:8.2f}"
              f"  self {a.self_cpu_time_total / 1e3 / steps:8.2f}", file=out)
    return statistics.median(fracs)


_OP_NAMESPACES = ("aten::", "mkldnn::", "pdserve::")


def _top_level_op_us(events: Any) -> float:
    """Summed duration of torch ops (`_OP_NAMESPACES`) with no op ancestor (nested ops are inside their
    parent's time)."""
    def nested(ev: Any) -> bool:
        parent = ev.cpu_parent
        while parent is not None:
            if parent.name.startswith(_OP_NAMESPACES):
                return True
            parent = parent.cpu_parent
        return False

    top = [ev for ev in events if ev.name.startswith(_OP_NAMESPACES) and not nested(ev)]
    threads = {ev.thread for ev in top}
    assert len(threads) <= 1, f"top-level ops on several threads {threads}: their times would overlap"
    return sum(ev.time_range.elapsed_us() for ev in top)


# -- HF transformers -------------------------------------------------------------------------------
def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.inference_mode()
def hf_generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad_id: int) -> None:
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=pad_id)


@torch.inference_mode()
def hf_forward(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
    model(input_ids=ids, attention_mask=mask, logits_to_keep=1)  # last-position logits, as generate does


def hf_figures(model_dir: Path, p: Prompts, w: Workload, runs: int, dtype: torch.dtype) -> dict[str, float]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad = model.config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    res: dict[str, float] = {}

    def timed(prompts: list[list[int]], fn: Callable[..., None], *args: Any, n: int = runs,
              warmup: bool = True) -> float:
        ids, mask = left_pad(prompts, pad)
        return median_seconds(lambda _: fn(model, ids, mask, *args), n, warmup=warmup)

    log("HF decode, batch 1")
    t_long = timed([p.b1], hf_generate, w.b1_steps + 1, pad)
    t_short = timed([p.b1], hf_generate, 1, pad)
    res["hf_decode_b1_tok_s"] = w.b1_steps / (t_long - t_short)
    log("HF prefill")
    res["hf_prefill_512_tok_s"] = len(p.prefill) / timed([p.prefill], hf_forward)
    res["hf_prefill_padded_tok_s"] = sum(map(len, p.ragged)) / timed(p.ragged, hf_forward)
    log(f"HF static batch of {w.batch}")
    t = timed(p.batch, hf_generate, max(p.outputs), pad, n=w.hf_static_runs or runs, warmup=False)
    res["hf_static_useful_tok_s"] = sum(p.outputs) / t
    return res


# -- the run ---------------------------------------------------------------------------------------
def run(w: Workload, runs: int, threads: int, out: TextIO, attention_backend: str = "auto", hf: bool = True,
        dtype: str = "auto", hf_dtype: str = "float32") -> dict[str, Any]:
    cfg = PdserveConfig().replace(engine={"num_threads": threads, "attention_backend": attention_backend},
                                  model={"dtype": dtype},
                                  scheduler={"max_num_seqs": 64, "max_num_batched_tokens": 4096},
                                  # off: the timed runs repeat their prompts, which would hit the cache
                                  cache={"num_kv_blocks": 2048, "enable_prefix_caching": False})
    e = LLMEngine(cfg)
    model_dir = e.source.path
    p = make_prompts(w, e.arch.vocab_size)
    assert sum(map(len, p.ragged)) <= cfg.scheduler.max_num_batched_tokens, "ragged batch exceeds the token budget"
    res: dict[str, Any] = {"runs": runs, "machine": cpu_description(threads), "workload": asdict(w),
                           "dtype": str(e.dtype).removeprefix("torch."), "hf_dtype": hf_dtype,
                           "attention": e.attention.name}
    log("memory bandwidth")
    res["copy_gbps_1t"], res["read_gbps_2t"] = bandwidth_gbps(runs, threads)
    res["weight_bytes"] = wb = weight_bytes(model_dir, e.dtype.itemsize)
    res["floor_b1_tok_s"] = res["copy_gbps_1t"] * 1e9 / wb
    res["floor_b1_2t_read_tok_s"] = res["read_gbps_2t"] * 1e9 / wb
    log("engine prefill")
    res["prefill_512_tok_s"] = engine_prefill_tok_s(e, [p.prefill], runs)
    res["prefill_ragged_tok_s"] = engine_prefill_tok_s(e, p.ragged, runs)
    res["ragged_padding_frac"] = 1 - sum(map(len, p.ragged)) / (len(p.ragged) * max(map(len, p.ragged)))
    log("engine decode, batch 1")
    res["decode_b1_tok_s"] = engine_decode_tok_s(e, [p.b1], w.b1_steps, runs)
    log(f"engine decode, batch {w.batch}")
    res["decode_b32_tok_s"] = engine_decode_tok_s(e, p.batch, w.batch_steps, runs)
    res["python_overhead_frac_b32"] = python_overhead_frac(e, p.batch, w.profile_steps, runs, out)
    log(f"engine, the static batch's work ({w.batch} requests)")
    res["engine_same_work_tok_s"] = engine_same_work_tok_s(e, p, runs)
    del e
    gc.collect()
    res["decode_b1_frac_of_floor"] = res["decode_b1_tok_s"] / res["floor_b1_tok_s"]
    if not hf:
        return res
    res.update(hf_figures(model_dir, p, w, runs, getattr(torch, hf_dtype)))
    res["decode_b1_vs_hf"] = res["decode_b1_tok_s"] / res["hf_decode_b1_tok_s"]
    res["same_work_vs_hf"] = res["engine_same_work_tok_s"] / res["hf_static_useful_tok_s"]
    res["prefill_512_vs_hf"] = res["prefill_512_tok_s"] / res["hf_prefill_512_tok_s"]
    res["prefill_ragged_vs_hf_padded"] = res["prefill_ragged_tok_s"] / res["hf_prefill_padded_tok_s"]
    return res


def table(r: dict[str, Any]) -> str:
    w = r["workload"]
    b, ragged = w["batch"], w["ragged_batch"]
    hf_static_runs = w["hf_static_runs"] or r["runs"]
    rows = [
        ("decode, batch 1 (tok/s) vs HF", "decode_b1_tok_s", "hf_decode_b1_tok_s"),
        ("decode, batch 1 (tok/s) vs 1-thread copy floor", "decode_b1_tok_s", "floor_b1_tok_s"),
        ("decode, batch 1 (tok/s) vs 2-thread read floor", "decode_b1_tok_s", "floor_b1_2t_read_tok_s"),
        (f"decode, batch {b} (tok/s)", "decode_b32_tok_s", None),
        (f"{b} requests, useful tok/s vs HF static batch", "engine_same_work_tok_s", "hf_static_useful_tok_s"),
        (f"prefill {w['prefill_len']} tokens (tok/s) vs HF", "prefill_512_tok_s", "hf_prefill_512_tok_s"),
        (f"prefill {ragged} ragged vs HF padded (tok/s)", "prefill_ragged_tok_s", "hf_prefill_padded_tok_s"),
    ]
    lines = [f"machine: {r['machine']}; median of {r['runs']} runs (HF static batch: {hf_static_runs}); "
             f"decode attention: {r.get('attention', '?')}",
             f"ours in {r['dtype']}, HF in {r['hf_dtype']}",
             f"{'figure':<50} {'ours':>10} {'baseline':>10} {'ratio':>7}"]
    for name, ours, base in rows:
        if base is None or base not in r:
            lines.append(f"{name:<50} {r[ours]:>10.1f} {'-':>10} {'-':>7}")
        else:
            lines.append(f"{name:<50} {r[ours]:>10.1f} {r[base]:>10.1f} {r[ours] / r[base]:>7.2f}")
    lines += [
        f"memory bandwidth: copy (read+write) 1 thread {r['copy_gbps_1t']:.1f} GB/s, "
        f"read 2 threads {r['read_gbps_2t']:.1f} GB/s; weights {r['weight_bytes'] / 1e6:.0f} MB",
        f"padding of the {ragged}-prompt batch when padded: {r['ragged_padding_frac']:.1%}",
        f"batch {b} decode step, time outside torch ops (profiler): {r['python_overhead_frac_b32']:.1%}",
    ]
    return "\n".join(lines)


def calibrate(threads: int, runs: int) -> dict[str, float]:
    """Step-cost coefficients for the simulator (`pdserve simulate --costs FILE`): a step costs
    `step_overhead_s + prefill_token_s * prefill tokens + decode_token_s * decode tokens`."""
    cfg = PdserveConfig().replace(engine={"num_threads": threads},
                                  scheduler={"max_num_seqs": 64, "max_num_batched_tokens": 4096},
                                  # off: the timed runs repeat their prompts, which would hit the cache
                                  cache={"num_kv_blocks": 2048, "enable_prefix_caching": False})
    e = LLMEngine(cfg)
    p = make_prompts(FULL, e.arch.vocab_size)
    steps = 16
    t1 = 1 / engine_decode_tok_s(e, [p.b1], steps, runs)  # seconds per batch-1 decode step
    t32 = len(p.batch) / engine_decode_tok_s(e, p.batch, steps, runs)  # seconds per batch-32 step
    prefill = len(p.prefill) / engine_prefill_tok_s(e, [p.prefill], runs)
    decode_token = max(0.0, (t32 - t1) / (len(p.batch) - 1))
    overhead = max(0.0, t1 - decode_token)
    return {"step_overhead_s": overhead, "decode_token_s": decode_token,
            "prefill_token_s": max(0.0, (prefill - overhead) / len(p.prefill)), "machine": cpu_description(threads)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench engine", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="runs per figure, median reported (default 3; --quick 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the engine and HF (default 2)")
    ap.add_argument("--quick", action="store_true", help="a small workload (batch 8, fewer tokens) for smoke tests")
    ap.add_argument("--hf-static-runs", type=int, default=None,
                    help="runs of the slow HF static batch (default --runs)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="our engine's dtype (default auto: bf16 where the CPU has native bf16, else fp32)")
    ap.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"], help="HF's dtype")
    ap.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    ap.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                    help="the engine's decode attention (EngineConfig.attention_backend)")
    ap.add_argument("--engine-only", action="store_true", help="skip the HF baselines (engine figures only)")
    ap.add_argument("--penalties", action="store_true",
                    help="only batch decode with presence, frequency and repetition penalties on vs off")
    ap.add_argument("--calibrate", type=Path, default=None, metavar="FILE",
                    help="only measure the simulator's step costs and write them to FILE (JSON)")
    args = ap.parse_args(argv)
    if args.calibrate:
        torch.set_num_threads(args.threads)
        costs = calibrate(args.threads, args.runs or 3)
        args.calibrate.write_text(json.dumps(costs, indent=2))
        print(json.dumps(costs, indent=2))
        return 0
    w = replace(QUICK if args.quick else FULL, hf_static_runs=args.hf_static_runs)
    runs = args.runs or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    if args.penalties:
        return _penalties_main(w, runs, args)
    t0 = time.perf_counter()
    res = run(w, runs, args.threads, sys.stderr if args.json else sys.stdout, args.attention_backend,
              hf=not args.engine_only, dtype=args.dtype, hf_dtype=args.hf_dtype)
    res["wall_s"] = time.perf_counter() - t0
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


def _penalties_main(w: Workload, runs: int, args: argparse.Namespace) -> int:
    cfg = PdserveConfig().replace(engine={"num_threads": args.threads, "attention_backend": args.attention_backend},
                                  model={"dtype": args.dtype},
                                  scheduler={"max_num_seqs": 64, "max_num_batched_tokens": 4096},
                                  cache={"num_kv_blocks": 2048})
    e = LLMEngine(cfg)
    p = make_prompts(w, e.arch.vocab_size)
    log(f"engine decode, batch {w.batch}, penalties off and on")
    res = {"runs": runs, "machine": cpu_description(args.threads), "dtype": str(e.dtype).removeprefix("torch."),
           "batch": w.batch, "steps": w.batch_steps, "penalties": PENALTIES,
           **penalties_figures(e, p.batch, w.batch_steps, runs)}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"machine: {res['machine']}; {res['dtype']}; median of {runs} runs\n"
              f"decode, batch {w.batch} (tok/s): penalties off {res['decode_b32_tok_s']:.1f}, "
              f"on {res['decode_b32_penalties_tok_s']:.1f}, on/off {res['penalties_vs_off']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make gpu-check` (`pdserve bench gpu-check`): the GPU acceptance run, one script that fits in 10 minutes on one
GPU and writes a JSON of figures:

  1. `hf_greedy`: the engine's greedy output (default model, bf16) against HF transformers' on the same device and
     dtype, on the chaos suite's prompts: prompts whose whole output agrees, and agreeing tokens before the first
     divergence.
  2. `disaggregated_grpc`: a live deployment on this one GPU (a prefill and a decode worker, half a GPU each, KV over
     gRPC), every request's KV crossing the transfer plane: outputs equal to the bare engine's (one prompt at a
     time), TTFT, and KV blocks left on the workers afterwards.
  3. `throughput`: the bare engine's output tokens per second at batch 1 and 64.
  4. `nccl_peer_killed`: with two GPUs, the same deployment with KV over NCCL (one worker per GPU), the prefill
     worker killed mid-load: requests completed, exact, lost, and blocks left. Skipped, with the reason, on fewer.

Without CUDA it exits with status 2 and says so. `--device cpu` runs the same plumbing on the tiny random model with
a byte tokenizer in float32 (`tests/serve/test_gpu_check.py` runs it in CI, so the script is not dead code there);
its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from pdserve.bench.chaos import (
    COMPLETED,
    LOST,
    MISMATCH,
    PROMPTS,
    Deployment,
    Settings,
    Spec,
    busiest,
    quiesce,
    request,
)

NO_CUDA = "gpu-check needs a CUDA device (torch.cuda.is_available() is False here); use --device cpu for the plumbing"


def _engine(model: str | None, device: str, dtype: str, backend: str, max_num_seqs: int = 64):
    from pdserve.engine.config import PdserveConfig
    from pdserve.engine.llm_engine import LLMEngine

    return LLMEngine(PdserveConfig().replace(model={"model": model, "device": device, "dtype": dtype},
                                             engine={"attention_backend": backend},
                                             scheduler={"max_num_seqs": max_num_seqs}))


def _greedy(max_tokens: int):
    from pdserve.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def hf_greedy(engine, max_tokens: int) -> tuple[dict, list[str]]:
    """Figure 1, and each prompt's text from the bare engine run alone (the deployment's reference)."""
    from transformers import AutoModelForCausalLM

    outs = [engine.generate([p], _greedy(max_tokens))[0] for p in PROMPTS]
    hf = AutoModelForCausalLM.from_pretrained(engine.source.path, dtype=engine.dtype).to(engine.device).eval()
    exact = agreeing = 0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([engine.encode_prompt(prompt)], device=engine.device)
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        ours = out.output_token_ids
        exact += ours == ref
        agreeing += next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), len(ref))
    del hf
    _free_memory()
    return ({"prompts": len(PROMPTS), "prompts_exact": exact, "tokens_agreeing": agreeing,
             "tokens": len(PROMPTS) * max_tokens}, [o.output_text for o in outs])


def throughput(engine, batch: int, max_tokens: int) -> dict:
    """Figure 3: output tokens per second of one batch of `batch` prompts run to completion (after a warm-up)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    engine.generate(prompts[:2], _greedy(4))
    t0 = time.perf_counter()
    outs = engine.generate(prompts, _greedy(max_tokens))
    wall = time.perf_counter() - t0
    tokens = sum(len(o.output_token_ids) for o in outs)
    return {"batch": batch, "output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tokens_per_s": round(tokens / wall, 1)}


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _percentiles_ms(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"p50": round(v[len(v) // 2] * 1e3, 1), "max": round(v[-1] * 1e3, 1)}


async def _deployment(s: Settings, model: str | None, device: str, dtype: str, kv_transport: str,
                      **serve) -> Deployment:
    dep = Deployment(s, mode="disaggregated", disaggregation="always", prefill_workers=1, decode_workers=1, **serve)
    dep.config = dep.config.replace(model={"model": model, "device": device, "dtype": dtype}, engine={},
                                    kv_transfer={"kv_transport": kv_transport})
    await dep.start()
    return dep


async def disaggregated(s: Settings, reference: list[str], device: str, dtype: str, requests: int) -> dict:
    """Figure 2: requests one at a time (the reference's batch of one), streamed, each prefilled remotely."""
    import httpx

    gpus = 0.5 if device == "cuda" else 0
    dep = await _deployment(s, s.model, device, dtype, "grpc", worker_num_gpus=gpus)
    try:
        async with httpx.AsyncClient(timeout=None) as client:
            records = [await request(client, dep.url, Spec(i, i % len(PROMPTS), True, 0), s, reference)
                       for i in range(requests)]
        held, stuck, _ = await quiesce(dep, 30)
    finally:
        await dep.stop()
    return {"requests": requests, "exact": sum(r.outcome == COMPLETED for r in records),
            "outcomes": sorted({r.outcome for r in records}), "errors": [r.error for r in records if r.error][:5],
            "ttft_ms": _percentiles_ms([r.ttft_s for r in records if r.ttft_s is not None]),
            "leaked_blocks": held, "stuck_requests": stuck}


async def nccl_peer_killed(s: Settings, reference: list[str], dtype: str, requests: int) -> dict:
    """Figure 4: KV over NCCL between two GPUs, the prefill worker killed while it holds requests."""
    import httpx
    import ray

    dep = await _deployment(s, s.model, "cuda", dtype, "nccl", worker_num_gpus=1)
    try:
        async with httpx.AsyncClient(timeout=None) as client:
            sem = asyncio.Semaphore(s.concurrency)

            async def one(i: int):
                async with sem:
                    return await request(client, dep.url, Spec(i, i % len(PROMPTS), True, 0), s, reference)

            tasks = [asyncio.create_task(one(i)) for i in range(requests)]
            victim, inflight = await busiest(dep, "prefill")
            ray.kill(await dep.handle(victim), no_restart=True)
            records = await asyncio.gather(*tasks)
        held, stuck, _ = await quiesce(dep, 60)
    finally:
        await dep.stop()
    return {"requests": requests, "killed": victim, "killed_holding": inflight,
            "completed": sum(r.outcome in (COMPLETED, MISMATCH) for r in records),
            "exact": sum(r.outcome == COMPLETED for r in records),
            "lost": sum(r.outcome == LOST for r in records), "errors": [r.error for r in records if r.error][:5],
            "leaked_blocks": held, "stuck_requests": stuck}


def run(device: str, model: str | None, dtype: str, max_tokens: int, requests: int, batches: tuple[int, ...],
        backend: str = "auto") -> dict:
    """Every figure, as a dict (see the module docstring). Uses the Ray cluster this process is connected to, else
    starts a local one."""
    import ray

    t0 = time.monotonic()
    engine = _engine(model, device, dtype, backend, max_num_seqs=max(batches))
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "num_gpus": torch.cuda.device_count() if device == "cuda" else 0,
                    "model": engine.source.model_id, "dtype": str(engine.dtype).removeprefix("torch."),
                    "attention_backend": engine.attention.name, "cuda_graphs": engine.graphs is not None,
                    "max_tokens": max_tokens, "torch": torch.__version__}
    report["hf_greedy"], reference = hf_greedy(engine, max_tokens)
    report["throughput"] = {f"batch_{b}": throughput(engine, b, max_tokens) for b in batches}
    del engine
    _free_memory()

    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(namespace="pdserve", include_dashboard=False, log_to_driver=False)
    try:
        s = Settings(model=model, requests=requests, concurrency=4, max_tokens=max_tokens, request_timeout_s=120.0)
        report["disaggregated_grpc"] = asyncio.run(disaggregated(s, reference, device, dtype, requests))
        if device != "cuda":
            report["nccl_peer_killed"] = {"skipped": "NCCL needs CUDA devices (--device cpu)"}
        elif torch.cuda.device_count() < 2:
            report["nccl_peer_killed"] = {"skipped": f"needs two GPUs, this machine has {torch.cuda.device_count()}"}
        else:
            report["nccl_peer_killed"] = asyncio.run(nccl_peer_killed(s, reference, dtype, 2 * requests))
    finally:
        if own_ray:
            ray.shutdown()
    report["wall_s"] = round(time.monotonic() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: the tiny random model in float32, to prove the script's plumbing (no GPU figure)")
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct on cuda, the tiny model on cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: 64 on cuda, 12 on cpu")
    ap.add_argument("--requests", type=int, default=None, help="disaggregated requests (default: 16 on cuda, 4 on cpu)")
    ap.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and not cuda:
            from pdserve.bench.chaos import tiny_model

            model = tiny_model(Path(tmp))
        report = run(args.device, model, args.dtype or ("bfloat16" if cuda else "float32"),
                     args.max_tokens or (64 if cuda else 12), args.requests or (16 if cuda else 4),
                     (1, 64), args.attention_backend)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

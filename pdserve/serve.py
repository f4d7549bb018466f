"""`pdserve serve` and `pdserve scale`: the distributed deployment on a Ray cluster."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from pdserve.engine.config import ATTENTION_BACKENDS

ROUTER_NAME, POOLS_NAME, NAMESPACE = "pdserve-router", "pdserve-pools", "pdserve"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Flags named like `vllm serve`'s where the meaning is the same; each maps onto the config tree."""
    p.add_argument("--config", default=None, help="a JSON file with the config tree (sections model, cache, "
                   "scheduler, engine, parallel, kv_transfer, serve); flags given on the command line override it")
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto); default: start a local one")
    add = p.add_argument
    add("--model", dest="model.model")
    add("--served-model-name", dest="serve.served_model_name")
    add("--mode", dest="serve.mode", choices=["disaggregated", "colocated"])
    add("--disaggregation", dest="serve.disaggregation", choices=["auto", "always", "never"],
        help="disaggregated mode, per request: always a prefill worker; never (the decode worker prefills); "
        "auto (default): the decode worker prefills when the uncached part of the prompt is short, by the step "
        "costs the workers measure, or fits one step while the prefill worker shares its cores (one CPU machine)")
    add("--prefill-workers", dest="serve.prefill_workers", type=int)
    add("--decode-workers", dest="serve.decode_workers", type=int)
    add("--kv-transport", dest="kv_transfer.kv_transport", choices=["grpc", "nccl"])
    add("--kv-auth-token", dest="kv_transfer.auth_token")
    add("--host", dest="serve.host")
    add("--port", dest="serve.port", type=int)
    add("--routers", dest="serve.routers", type=int,
        help="router replicas over the same pools, on ports port..port+N-1 (default 1); on a cluster whose nodes "
        "carry a `router` resource, one per such node instead, each on --port")
    add("--api-key", dest="serve.api_key", help="guards /v1/*; prefer --api-key-file (a command line is visible "
        "to every user of the machine and lands in job logs)")
    p.add_argument("--api-key-file", default=None, help="read serve.api_key from this file")
    p.add_argument("--admin-key-file", default=None, help="read serve.admin_key from this file (the admin API)")
    p.add_argument("--kv-auth-token-file", default=None, help="read kv_transfer.auth_token from this file")
    add("--tensor-parallel-size", "-tp", dest="parallel.tensor_parallel_size", type=int,
        help="split each worker's model over this many ranks (processes, one placement group per worker); the "
        "model's attention and KV heads must divide by it (or the ranks be a multiple of the KV heads)")
    add("--prefill-tp", dest="parallel.prefill_tp", type=int, help="tensor-parallel size of prefill workers "
        "(default: --tensor-parallel-size)")
    add("--decode-tp", dest="parallel.decode_tp", type=int, help="tensor-parallel size of decode workers "
        "(default: --tensor-parallel-size); KV moves between different sizes")
    add("--max-num-seqs", dest="scheduler.max_num_seqs", type=int)
    add("--max-num-batched-tokens", dest="scheduler.max_num_batched_tokens", type=int)
    add("--max-num-queued-requests", dest="serve.max_num_queued_requests", type=int)
    add("--preemption", dest="scheduler.preemption", choices=["swap", "recompute", "auto"])
    add("--swap-space-blocks", dest="scheduler.swap_space_blocks", type=int)
    add("--queue-order", dest="scheduler.queue_order", choices=["fcfs", "shortest"],
        help="order of new requests within a priority level: by arrival, or the fewest prompt tokens still to "
        "compute first, each for at most --shortest-max-wait seconds of its wait")
    add("--shortest-max-wait", dest="scheduler.shortest_max_wait", type=float)
    add("--block-size", dest="cache.block_size", type=int)
    add("--num-kv-blocks", dest="cache.num_kv_blocks", type=int)
    add("--kv-cache-memory-gb", dest="cache.kv_cache_memory_gb", type=float, help="the KV cache's size on CPU")
    add("--gpu-memory-utilization", dest="cache.gpu_memory_utilization", type=float,
        help="CUDA: the fraction of the device's memory to use; the KV cache gets what the weights and the "
        "largest step leave of it (default 0.9)")
    add("--enable-prefix-caching", dest="cache.enable_prefix_caching", action=argparse.BooleanOptionalAction,
        help="reuse the KV of prompt prefixes earlier requests computed (default: on)")
    add("--max-model-len", dest="model.max_model_len", type=int)
    add("--dtype", dest="model.dtype", choices=["auto", "float32", "bfloat16", "float16"])
    add("--device", dest="model.device")
    add("--threads", dest="engine.num_threads", type=int, help="torch threads per worker (default: cores / workers)")
    add("--attention-backend", dest="engine.attention_backend", choices=ATTENTION_BACKENDS,
        help="attention: cpu_kernel reads the paged KV cache in place (C++, built on first use); flashinfer: "
        "FlashInfer's paged kernels (CUDA, pip install 'pdserve[cuda]'); torch gathers the KV and runs SDPA; auto "
        "(default): flashinfer on CUDA where installed, the C++ kernels on CPU where they build, else torch")
    add("--enforce-eager", dest="engine.enforce_eager", action="store_const", const=True,
        help="no CUDA graphs for decode steps (they are captured on CUDA with the flashinfer backend)")
    add("--worker-cpus", dest="serve.worker_num_cpus", type=float)
    add("--share-idle-cores", dest="serve.share_idle_cores", action=argparse.BooleanOptionalAction,
        help="CPU workers on one machine step with all its cores while the others there are idle, and with "
        "--threads while any is busy (default: on)")
    add("--metrics-prefix", dest="serve.metrics_prefix", choices=["pdserve_", "vllm:"])
    add("--min-client-priority", dest="serve.min_client_priority", type=int,
        help="the most urgent priority a client may ask for (lower runs first; default 0: none below the default)")
    add("--max-client-priority", dest="serve.max_client_priority", type=int,
        help="the least urgent priority a client may ask for (default 0)")
    add("--autoscale", dest="autoscale.enabled", action="store_const", const=True,
        help="the SLA planner resizes the prefill and decode pools to keep TTFT and TPOT within the targets "
        "(docs/planner.md); the pools start at --prefill-workers/--decode-workers")
    add("--min-prefill-workers", dest="autoscale.min_prefill", type=int)
    add("--max-prefill-workers", dest="autoscale.max_prefill", type=int)
    add("--min-decode-workers", dest="autoscale.min_decode", type=int)
    add("--max-decode-workers", dest="autoscale.max_decode", type=int)
    add("--max-workers", dest="autoscale.max_devices", type=int, help="autoscale: prefill + decode workers at most")
    add("--autoscale-ttft-s", dest="autoscale.ttft_slo_s", type=float, help="autoscale: the TTFT target (p90)")
    add("--autoscale-tpot-s", dest="autoscale.tpot_slo_s", type=float, help="autoscale: the TPOT target (p90)")
    add("--autoscale-costs", dest="autoscale.costs",
        help="autoscale: a cost calibration (pdserve bench engine --calibrate); default: the workers' measurements")


def serve_config(args: argparse.Namespace):
    from pdserve.engine.config import PdserveConfig

    sections: dict[str, dict] = {}
    if args.config:
        with open(args.config) as f:
            sections = json.load(f)
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
    for flag, section, name in (("api_key_file", "serve", "api_key"), ("admin_key_file", "serve", "admin_key"),
                                ("kv_auth_token_file", "kv_transfer", "auth_token")):
        path = getattr(args, flag, None)
        if path:  # a secret from a file (a mounted Kubernetes secret, say): never on a command line
            sections.setdefault(section, {})[name] = _read_secret(path, flag)
    cfg = PdserveConfig().replace(**sections)
    if cfg.engine.num_threads is None:  # share the cores: no oversubscription between co-located processes
        s, tp = cfg.serve, cfg.parallel.tp_for
        ranks = s.decode_workers * tp("decode")
        if s.mode == "disaggregated":
            ranks += s.prefill_workers * tp("prefill")
        cfg = cfg.replace(engine={"num_threads": max(1, (os.cpu_count() or 1) // ranks)})
    return cfg


def _read_secret(path: str, flag: str) -> str:
    with open(path) as f:
        secret = f.read().strip()
    if not secret:
        raise SystemExit(f"--{flag.replace('_', '-')}: {path} is empty")
    return secret


def banner(url: str, cfg, gcs_address: str) -> str:
    """What `pdserve serve` prints once it serves: never a secret (the key is named, not shown)."""
    s = cfg.serve
    key = ' -H "Authorization: Bearer $PDSERVE_API_KEY"' if s.api_key else ""
    return (f"pdserve is serving on {url} ({s.mode}: {s.prefill_workers if s.mode == 'disaggregated' else 0} "
            f"prefill + {s.decode_workers} decode workers, KV over {cfg.kv_transfer.kv_transport})\n"
            f"try:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{key} -d "
            "'{\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}'\n"
            + ("  (with PDSERVE_API_KEY set to the API key in your shell)\n" if s.api_key else "")
            + f"health {url}/health, metrics {url}/metrics, scrape targets {url}/metrics/targets\n"
            f"scale: pdserve scale --address {gcs_address} --prefill N --decode M")


def _token_auth_for(address: str | None) -> None:
    """Ray >= 2.5x starts local clusters with token auth and keeps the token in ~/.ray/auth_token, but a
    client connecting to an explicit address only presents it in token mode (read when ray is imported)."""
    if address and "RAY_AUTH_MODE" not in os.environ and os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        os.environ["RAY_AUTH_MODE"] = "token"


def _wait_for_router_name(ray, timeout: float = 30.0) -> None:
    """The router's and the pool manager's names are free, or about to be: a previous `pdserve serve` killed
    outright leaves them to Ray, which ends them shortly (their owner died). One that still answers belongs
    to another live server."""
    import time

    deadline = time.monotonic() + timeout
    for name in (ROUTER_NAME, POOLS_NAME):
        while True:
            try:
                old = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            try:
                ray.get(old.pid.remote(), timeout=5)
                raise SystemExit(f"another pdserve deployment ({name}) is serving on this Ray cluster")
            except ray.exceptions.RayActorError:
                pass  # dead, its name not yet released
            except ray.exceptions.GetTimeoutError:
                pass  # being restarted or ended
            if time.monotonic() > deadline:
                raise SystemExit(f"the previous pdserve deployment ({name}) did not go away within {timeout:g}s")
            time.sleep(0.2)


def cmd_serve(args: argparse.Namespace) -> int:
    _token_auth_for(args.address)
    import ray

    from pdserve.router.actor import launch_deployment

    cfg = serve_config(args)
    if args.address:
        ctx = ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=True)
    else:
        ctx = ray.init(namespace=NAMESPACE, include_dashboard=False)
    _wait_for_router_name(ray)
    # The routers on this node (the head, where `pdserve serve` runs): an actor that needs no resources would
    # otherwise land on any node, away from the address and port the operator exposes.
    pools, routers = launch_deployment(cfg, names=(POOLS_NAME, ROUTER_NAME), namespace=NAMESPACE,
                                       here=ray.get_runtime_context().get_node_id())
    s = cfg.serve
    # bounded: every worker start is (worker_start_timeout_s), and so is each call adopting or ending one
    urls = ray.get([r.start.remote() for r in routers], timeout=s.worker_start_timeout_s + 60)
    print(banner(urls[0], cfg, ctx.address_info["gcs_address"]), flush=True)
    if len(urls) > 1:
        print(f"{len(urls)} routers (put a load balancer in front): {' '.join(urls)}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    # Graceful: refuse new requests, let those in flight finish (up to drain_timeout_s), then stop.
    print(f"draining (up to {s.drain_timeout_s:g}s for requests in flight)", file=sys.stderr, flush=True)
    left = sum(ray.get([r.drain.remote() for r in routers], timeout=s.drain_timeout_s + 30))
    print(f"shutting down ({left} requests still running were cut off)" if left else "shutting down",
          file=sys.stderr, flush=True)
    ray.get([r.stop.remote() for r in routers], timeout=60)
    ray.get(pools.stop.remote(), timeout=60)
    ray.shutdown()
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    _token_auth_for(args.address)
    import ray

    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
    pools = ray.get_actor(POOLS_NAME, namespace=NAMESPACE)  # scaling happens once, there, for every router
    # the pool manager bounds each worker start by its serve.worker_start_timeout_s; this bounds the call itself
    print(json.dumps(ray.get(pools.scale.remote(args.prefill, args.decode), timeout=args.timeout), indent=2))
    return 0


def add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto", help="the Ray cluster pdserve serve runs on")
    p.add_argument("--prefill", type=int, default=None, help="prefill pool size")
    p.add_argument("--decode", type=int, default=None, help="decode pool size")
    p.add_argument("--timeout", type=float, default=660.0, help="seconds to wait for the router's answer "
                   "(default: the default serve.worker_start_timeout_s, 600, plus a minute)")

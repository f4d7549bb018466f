"""Tensor-parallel workers under `pdserve serve` on the session's Ray cluster (CPU, gloo): each TP worker is
one STRICT_PACK placement group (the worker actor is rank 0, its other ranks are actors in the same group).
Greedy output equals the bare TP=1 engine's in colocated mode and across KV transfer between different
prefill and decode TP sizes (1 -> 2 and 2 -> 1 on per-rank channels over gRPC and over the nccl transport's gloo
channels, 1 -> 2 through rank 0 over gRPC, 2 -> 2; KV shipped layer by layer and after the forward pass), the
bytes counted per (prefill rank, decode rank) pair on the path they took; every KV block comes back; a dead rank
fails its worker, which is replaced; stopping the server removes the placement groups."""

from __future__ import annotations

import pytest

from pdserve.engine.config import PdserveConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling import SamplingParams
from tests.helpers import EXACT, Server, wait_for

LAYOUTS = {
    "colocated-tp2": {"serve": {"mode": "colocated"}, "parallel": {"tensor_parallel_size": 2}},
    # each decode rank (the worker actor and its rank actor) receives its own KV head on a channel of its own: on
    # its own gRPC endpoint, or a gloo channel
    "disagg-p1-d2-grpc": {"parallel": {"decode_tp": 2}, "kv_transfer": {"kv_transport": "grpc"}},
    "disagg-p1-d2-nccl": {"parallel": {"decode_tp": 2}, "kv_transfer": {"kv_transport": "nccl"}},
    # the fallback: every byte through the decode worker's rank 0, which scatters them to its rank
    "disagg-p1-d2-grpc-rank0": {"parallel": {"decode_tp": 2},
                                "kv_transfer": {"kv_transport": "grpc", "per_rank_channels": False}},
    # each prefill rank sends its own KV head (the nccl case after the forward pass rather than layer by layer)
    "disagg-p2-d1-grpc": {"parallel": {"prefill_tp": 2}, "kv_transfer": {"kv_transport": "grpc"}},
    "disagg-p2-d1-nccl": {"parallel": {"prefill_tp": 2}, "kv_transfer": {"kv_transport": "nccl", "layerwise": False}},
    "disagg-p2-d2-grpc": {"parallel": {"tensor_parallel_size": 2}},
}
SLOW = {"disagg-p2-d2-grpc"}
# the (path, prefill rank, decode rank) pairs that carry bytes, by the decode worker's metric
PAIRS = {
    "disagg-p1-d2-grpc": {("per_rank", "0", "0"), ("per_rank", "0", "1")},
    "disagg-p1-d2-nccl": {("per_rank", "0", "0"), ("per_rank", "0", "1")},
    "disagg-p1-d2-grpc-rank0": {("rank0", "0", "0")},
    "disagg-p2-d1-grpc": {("per_rank", "0", "0"), ("per_rank", "1", "0")},
    "disagg-p2-d1-nccl": {("per_rank", "0", "0"), ("per_rank", "1", "0")},
    "disagg-p2-d2-grpc": {("per_rank", "0", "0"), ("per_rank", "1", "1")},
}
PROMPTS = ["Hello, world", "The quick brown fox jumps over the lazy dog. " * 3, "x"]
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(tiny_text_model_dir) -> list[str]:
    engine = LLMEngine(PdserveConfig().replace(model={"model": str(tiny_text_model_dir), **EXACT}))
    return [o.output_text for o in engine.generate(PROMPTS, PARAMS)]


def _groups(ray) -> list[dict]:
    """This cluster's live TP placement groups (a worker's: named after it)."""
    from ray.util import placement_group_table

    return [g for g in placement_group_table().values() if g["name"].endswith("-tp") and g["state"] != "REMOVED"]


def _rank_pairs(server: Server, transport: str) -> set[tuple[str, str, str]]:
    """(path, src_rank, dst_rank) of every `pdserve_kv_transfer_rank_pair_bytes_total` series over `transport`
    with bytes counted, read from the decode workers' own /metrics endpoints."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    pairs = set()
    for group in httpx.get(f"{server.url}/metrics/targets", timeout=10).json():
        if group["labels"]["role"] != "decode":
            continue
        for target in group["targets"]:
            for family in text_string_to_metric_families(httpx.get(f"http://{target}/metrics", timeout=10).text):
                pairs |= {(s.labels["path"], s.labels["src_rank"], s.labels["dst_rank"]) for s in family.samples
                          if s.name == "pdserve_kv_transfer_rank_pair_bytes_total"
                          and s.labels["transport"] == transport and s.value > 0}
    return pairs


def _complete(server: Server, prompt: str) -> str:
    r = server.client().completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    return r.choices[0].text


@pytest.mark.parametrize(("name", "layout"), [pytest.param(n, layout, id=n, marks=[pytest.mark.slow] * (n in SLOW))
                                              for n, layout in LAYOUTS.items()])
def test_tp_workers_serve_what_the_tp1_engine_does(ray_cluster, tiny_text_model_dir, expected, name, layout):
    server = Server(ray_cluster, tiny_text_model_dir, **layout)
    try:
        groups = _groups(ray_cluster)
        cfg = server.config
        want = cfg.parallel.tp_for("decode") > 1
        want += cfg.serve.mode == "disaggregated" and cfg.parallel.tp_for("prefill") > 1
        assert len(groups) == want  # one group per TP worker: its ranks' bundles, packed on one node
        assert all(g["strategy"] == "STRICT_PACK" and len(g["bundles"]) == 2 for g in groups)
        for prompt, text in zip(PROMPTS, expected, strict=True):
            assert _complete(server, prompt) == text, layout
        if name in PAIRS:
            assert _rank_pairs(server, cfg.kv_transfer.kv_transport) == PAIRS[name]
        server.wait_kv_free()
    finally:
        server.stop()
    wait_for(lambda: not _groups(ray_cluster), 30, "the TP placement groups removed")


def test_a_dead_rank_fails_its_worker_which_is_replaced(ray_cluster, tiny_text_model_dir, expected):
    server = Server(ray_cluster, tiny_text_model_dir, serve={"mode": "colocated"},
                    parallel={"tensor_parallel_size": 2})
    try:
        ray = ray_cluster
        (old,) = server.stats()
        handle = ray.get(server.actor.worker_handle.remote(old))
        ranks = ray.get(handle.tp_rank_handles.remote())
        assert len(ranks) == 1
        ray.kill(ranks[0])
        wait_for(lambda: old not in server.stats() and len(server.stats()) == 1, 60, "the worker replaced")
        assert _complete(server, PROMPTS[0]) == expected[0]
        server.wait_kv_free()
    finally:
        server.stop()

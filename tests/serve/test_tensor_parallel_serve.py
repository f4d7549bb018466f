"""Tensor-parallel workers under `pdserve serve` on the session's Ray cluster (CPU, gloo): each TP worker is
one STRICT_PACK placement group (the worker actor is rank 0, its other ranks are actors in the same group).
Greedy output equals the bare TP=1 engine's in colocated mode and across KV transfer between different
prefill and decode TP sizes (1 -> 2 over gRPC and over the nccl transport's per-rank gloo channels, 2 -> 1 over
its gloo channel, 2 -> 2; KV shipped layer by layer and after the forward pass); every KV block comes back; a
dead rank fails its worker, which is replaced; stopping the server removes the placement groups."""

from __future__ import annotations

import pytest

from pdserve.engine.config import PdserveConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling import SamplingParams
from tests.helpers import EXACT, Server, wait_for

LAYOUTS = {
    "colocated-tp2": {"serve": {"mode": "colocated"}, "parallel": {"tensor_parallel_size": 2}},
    "disagg-p1-d2-grpc": {"parallel": {"decode_tp": 2}, "kv_transfer": {"kv_transport": "grpc"}},
    # each decode rank (the worker actor and its rank actor) receives its own KV head on a channel of its own
    "disagg-p1-d2-nccl": {"parallel": {"decode_tp": 2}, "kv_transfer": {"kv_transport": "nccl"}},
    # after the forward pass rather than layer by layer: the KV gathered from the ranks waits for it
    "disagg-p2-d1-nccl": {"parallel": {"prefill_tp": 2}, "kv_transfer": {"kv_transport": "nccl", "layerwise": False}},
    "disagg-p2-d2-grpc": pytest.param({"parallel": {"tensor_parallel_size": 2}}, marks=pytest.mark.slow),
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


def _complete(server: Server, prompt: str) -> str:
    r = server.client().completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    return r.choices[0].text


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_tp_workers_serve_what_the_tp1_engine_does(ray_cluster, tiny_text_model_dir, expected, layout):
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

"""KV-aware routing and conditional disaggregation on a live deployment (1 prefill + 2 decode workers,
tiny model, prompts as token ids so block boundaries are exact):

  * a request sharing a 30-block prefix with an earlier one goes to the decode worker that cached it,
    although that worker is the busier one (the routing metric says prefix_overlap), and its cache
    supplies exactly those 30 blocks;
  * "auto", with every decode worker busy, prefills a prompt that fits one step's token budget on the
    decode worker, which shares this machine's cores with the prefill worker (`serve.share_idle_cores`),
    and a longer one on the prefill worker (the decision metric, and the local_prefill stage of the TTFT
    breakdown);
  * "always" with the prefix cache off, "never" and "auto" give the bare engine's greedy text;
  * killing the decode worker that holds a prefix: the next request with it goes straight to a live
    worker (no migration) and answers correctly;
  * after each, every KV block is free or cached-and-evictable on every worker (`wait_kv_free`)."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from pdserve.engine.config import PdserveConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling import SamplingParams
from tests.helpers import EXACT, Server, metric, wait_for

BS = 16  # the default block size
MAX_TOKENS = 16
STEP = 256  # the deployment's step token budget: the long prompt below does not fit one step
STALL_S = 3.0  # a decode worker frozen this long keeps its request in flight (well under stall_timeout_s)


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n,), generator=g).tolist()


PREFIX = tokens(30 * BS, seed=1)


@pytest.fixture(scope="module")
def reference(tiny_text_model_dir):
    """The greedy text of a prompt from the bare engine, prefix cache off."""
    engine = LLMEngine(PdserveConfig().replace(model={"model": str(tiny_text_model_dir), **EXACT},
                                               cache={"enable_prefix_caching": False}))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return lambda ids: engine.generate([ids], params)[0].output_text


@pytest.fixture(scope="module")
def auto(ray_cluster, tiny_text_model_dir):
    server = Server(ray_cluster, tiny_text_model_dir, serve={"disaggregation": "auto", "prefill_workers": 1,
                                                            "decode_workers": 2, "health_interval_s": 0.2},
                    scheduler={"max_num_batched_tokens": STEP})
    yield server
    server.stop()


def ask(server: Server, ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
    r = server.client().completions.create(model=server.model, prompt=ids, max_tokens=max_tokens, temperature=0,
                                           extra_body={"ignore_eos": True}, timeout=60)
    return r.choices[0].text


def decode_rows(server: Server) -> dict[str, dict]:
    """The router's view of its decode workers (`/admin/status`'s rows)."""
    return {w["worker_id"]: w for w in server.ray.get(server.actor.status.remote())["pools"]["decode"]}


def settled(server: Server) -> bool:
    """The router's view of the decode pool: nothing in flight, every block free (or evictable)."""
    return all(r["free_blocks"] == r["num_blocks"] and not r["inflight"] for r in decode_rows(server).values())


def took(server: Server, before: dict, ids: list[int]) -> tuple[str, str]:
    """Send `ids`; (the text, the one decode worker whose engine admitted it)."""
    text = ask(server, ids)
    after = server.stats()
    grew = [w for w in before if w.startswith("decode") and w in after
            and after[w].prefix_cache_queries > before[w].prefix_cache_queries]
    assert len(grew) == 1, (before, after)
    return text, grew[0]


def freeze(server: Server, worker: str) -> None:
    """Stop the worker's engine loop for STALL_S: requests routed there meanwhile stay in flight."""
    handle = server.ray.get(server.actor.worker_handle.remote(worker))
    server.ray.get(handle.debug_stall.remote(STALL_S))


def in_flight(server: Server, **want: int) -> None:
    """Wait until the router has exactly these requests in flight on these decode workers."""
    wait_for(lambda: {w: r["inflight"] for w, r in decode_rows(server).items() if w in want} == want, 5,
             f"requests in flight on the decode workers: {want}")


def test_a_shared_prefix_follows_its_decode_worker_even_when_that_one_is_busier(auto, reference):
    first = PREFIX + tokens(5, seed=2)
    text, x = took(auto, auto.stats(), first)
    assert text == reference(first)
    (y,) = set(decode_rows(auto)) - {x}
    wait_for(lambda: settled(auto) and decode_rows(auto)[x]["indexed_blocks"] >= 30, 10,
             "the router to see the request end, its prefix indexed on its decode worker")
    before = auto.stats()
    freeze(auto, x)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # shares the prefix's first 4 blocks: goes to x (the only overlap, loads equal) and stays there
        occupier = pool.submit(ask, auto, PREFIX[:4 * BS] + tokens(3, seed=3), 200)
        in_flight(auto, **{x: 1, y: 0})
        moved = metric(auto, "pdserve_routing_decisions_total", pool="decode", reason="prefix_overlap")
        local = metric(auto, "pdserve_disaggregation_decisions_total", path="local")
        second = PREFIX + tokens(6, seed=4)
        assert ask(auto, second) == reference(second)  # x is busier (a request in flight), y idle: still x
        occupier.result()
    stats = auto.stats()
    assert stats[x].prefix_cache_hits - before[x].prefix_cache_hits == 4 * BS + 30 * BS  # occupier, then second
    assert stats[y].prefix_cache_queries == before[y].prefix_cache_queries
    # moved off the least loaded worker (y) by the prefix, and prefilled locally (6 uncached tokens)
    assert metric(auto, "pdserve_routing_decisions_total", pool="decode", reason="prefix_overlap") == moved + 1
    assert metric(auto, "pdserve_disaggregation_decisions_total", path="local") == local + 1
    auto.wait_kv_free()  # free counts evictable: it passes with the prefix still cached
    assert auto.stats()[x].num_cached_blocks >= 30


def test_auto_prefills_a_prompt_within_a_step_on_a_busy_decode_worker_and_a_longer_one_remotely(auto, reference):
    wait_for(lambda: settled(auto), 10, "the router's view of the decode pool to settle")
    d0, d1 = decode_rows(auto)

    def decisions(path: str) -> dict[str, float]:
        return {reason: metric(auto, "pdserve_disaggregation_decisions_total", path=path, reason=reason)
                for reason in ("shared_cores", "short_prompt", "long_prompt", "unmeasured", "idle_decode",
                               "prefill_busy")}

    def grew(now: dict, then: dict) -> dict:
        return {k: v - then[k] for k, v in now.items() if v != then[k]}

    local_prefills = metric(auto, "pdserve_request_stage_seconds_count", stage="local_prefill")
    for w in (d0, d1):
        freeze(auto, w)
    short, long = tokens(200, seed=12), tokens(300, seed=13)  # within one step's budget, and over it
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        occupiers = [pool.submit(ask, auto, tokens(20, seed=10), 200)]
        wait_for(lambda: sum(r["inflight"] for r in decode_rows(auto).values()) == 1, 5, "the first occupier")
        occupiers.append(pool.submit(ask, auto, tokens(20, seed=11), 200))  # to the other one: fewer in flight
        in_flight(auto, **{d0: 1, d1: 1})
        # both sent while both decode workers are still frozen with a request in flight (routing is immediate)
        local, remote = decisions("local"), decisions("remote")
        answers = [pool.submit(ask, auto, short)]
        wait_for(lambda: decisions("local") != local, 5, "the short prompt's decision")
        assert grew(decisions("local"), local) == {"shared_cores": 1}
        assert decisions("remote") == remote
        local = decisions("local")
        answers.append(pool.submit(ask, auto, long))
        wait_for(lambda: decisions("remote") != remote, 5, "the long prompt's decision")
        assert grew(decisions("remote"), remote) in ({"long_prompt": 1}, {"unmeasured": 1})
        assert decisions("local") == local
        assert [a.result() for a in answers] == [reference(short), reference(long)]
        for o in occupiers:
            o.result()
    # the two occupiers (each prefilled by its idle decode worker) and the short prompt
    assert metric(auto, "pdserve_request_stage_seconds_count", stage="local_prefill") == local_prefills + 3
    auto.wait_kv_free()


@pytest.mark.parametrize("mode,caching", [("always", False), ("never", True)])
def test_always_and_never_give_the_same_text_as_auto(ray_cluster, tiny_text_model_dir, reference, mode, caching):
    """The prompts the auto tests send, each twice (the second time cached where caching is on)."""
    server = Server(ray_cluster, tiny_text_model_dir, serve={"disaggregation": mode},
                    cache={"enable_prefix_caching": caching})
    try:
        prompts = [PREFIX + tokens(5, seed=2), PREFIX + tokens(6, seed=4), tokens(200, seed=12), tokens(300, seed=13)]
        for ids in prompts + prompts:
            assert ask(server, ids) == reference(ids)
        path = "local" if mode == "never" else "remote"
        assert metric(server, "pdserve_disaggregation_decisions_total", path=path, reason="configured") == 8
        assert metric(server, "pdserve_disaggregation_decisions_total") == 8
        server.wait_kv_free()
        cached = sum(s.num_cached_blocks for s in server.stats().values())
        assert (cached > 0) == caching
    finally:
        server.stop()


def test_a_killed_decode_worker_s_prefix_goes_to_a_live_worker(auto, reference):
    prefix = tokens(20 * BS, seed=20)
    first = prefix + tokens(3, seed=21)
    text, x = took(auto, auto.stats(), first)
    assert text == reference(first)
    auto.ray.kill(auto.ray.get(auto.actor.worker_handle.remote(x)))
    wait_for(lambda: x not in decode_rows(auto), 10, f"the router to drop {x}")
    migrations = metric(auto, "pdserve_request_migrations_total")
    second = prefix + tokens(4, seed=22)
    text, served = took(auto, auto.stats(), second)
    assert text == reference(second) and served != x
    assert metric(auto, "pdserve_request_migrations_total") == migrations  # routed to a live worker at once
    wait_for(lambda: len(decode_rows(auto)) == 2 and all(r["healthy"] for r in decode_rows(auto).values()), 60,
             "the replacement decode worker")
    auto.wait_kv_free()

"""The chaos suite (`pdserve chaos`, bench/chaos.py) at its CI size: every scenario on a fresh live
deployment of the tiny model under steady load, once per session (a few minutes on 2 cores), then
what each client saw is checked: nothing lost, no token lost or repeated (every completed text
equals the bare engine's greedy run), no KV block left on any worker, migration hiding worker
failures, a restarted router within 20 s, fast rejections under overload, and hostile clients (a stop-list
storm, a priority flood, huge prompts, a frozen peer) refused or survived while the others are served."""

from __future__ import annotations

import pytest

from pdserve.bench.chaos import ALL, ATTACKERS, ATTACKS, Settings, run_suite

# ~5 minutes: fourteen deployments of four workers each, all in the module fixture. pytest-timeout counts a
# fixture's setup against the first test that requests it, so every test here gets room for all of it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# failures these scenarios inject are hidden from the clients by migration (or draining)
HIDDEN = ["baseline", "kill-decode", "kill-prefill", "stall-decode", "transfer-fail-5pct", "corrupt-chunks",
          "disconnect-50pct", "scale-down"]


@pytest.fixture(scope="module")
def results(ray_cluster, tiny_text_model_dir) -> dict[str, dict]:
    s = Settings(model=str(tiny_text_model_dir), requests=48, concurrency=6, max_tokens=48, stall_timeout_s=3.0,
                 request_timeout_s=60.0, quick=True)
    report = run_suite(s, ALL)
    return {r["scenario"]: r for r in report["results"]}


@pytest.mark.parametrize("name", ALL)
def test_nothing_lost_repeated_or_leaked(results, name):
    r = results[name]
    assert not r["harness_error"], r["harness_error"]
    assert r["planned"] >= 48 and r["accounted"], r  # every planned request came back exactly once
    assert r["lost"] == 0, r["errors"]
    assert r["mismatched"] == 0, r["mismatches"]  # duplicated or missing tokens
    assert r["leaked_blocks"] == 0 and r["stuck_requests"] == 0, r
    assert r["workers_checked"] == r["workers_expected"], r  # every worker of the final pools was read
    if name != "kill-router":
        assert r["conn_errors"] == 0, r["errors"]


@pytest.mark.parametrize("name", HIDDEN)
def test_injected_failures_are_invisible_to_clients(results, name):
    r = results[name]
    assert r["failed"] == 0, r["errors"]
    assert r["completed"] + r["disconnected"] == r["sent"]


@pytest.mark.parametrize("name, failure", [("kill-decode", "decode/died"), ("kill-prefill", "prefill/died"),
                                           ("stall-decode", "decode/stalled")])
def test_failed_worker_is_replaced_and_its_requests_migrate(results, name, failure):
    r = results[name]
    print(name, r["fault"], r["migrations_by_reason"])
    # The victim's engine loop is frozen before the fault and read once frozen (bench/chaos.py,
    # frozen_holding): what it held then is exactly what the fault hit.
    assert r["fault"]["inflight"] > 0, r["fault"]
    assert r["worker_failures"] == {failure: 1}, r["worker_failures"]
    assert r["recovery_s"] is not None, r["errors"]  # pools back at full size without it, a probe answered
    if name != "kill-prefill":  # requests in a prefill worker's inbox are re-dispatched, not always migrated
        # every request the decode engine held migrated (more may: those still being prefilled for it fail
        # their KV transfer, reason transfer_failed)
        assert r["migrations"] >= r["fault"]["inflight"], (r["migrations_by_reason"], r["fault"])


@pytest.mark.parametrize("name", ["transfer-fail-5pct", "corrupt-chunks"])
def test_every_injected_transfer_fault_migrates_its_request_once(results, name):
    r = results[name]
    # Seeded: the fault RNGs of the two prefill workers (seeds 0 and 1) first fire at their 23rd and 3rd
    # transfer (fail) and 42nd and 5th (corrupt), so 48 transfers however they are split inject at least one.
    assert r["injected_faults"] > 0, r
    assert r["migrations_by_reason"] == {"transfer_failed": r["injected_faults"]}
    assert r["worker_failures"] == {}


def test_router_restarts_within_20s(results):
    r = results["kill-router"]
    assert r["fault"].get("counters_reset"), r["fault"]  # a new router process served the rest
    assert r["recovery_s"] is not None and r["recovery_s"] < 20, r["recovery_s"]
    assert r["conn_errors"] >= 1  # requests in flight when it died see the connection break: explicit
    assert r["completed"] >= 1 and r["completed"] + r["failed"] + r["conn_errors"] == r["sent"]


def test_scale_down_drains_to_the_new_pool_sizes(results):
    r = results["scale-down"]
    assert r["workers_expected"] == 2 and r["recovery_s"] is not None, r
    assert r["worker_failures"] == {}  # drained, not failed


def test_disconnected_clients_free_their_kv(results):
    r = results["disconnect-50pct"]
    assert r["disconnected"] >= 1 and r["completed"] >= 1, r
    assert r["leaked_blocks"] == 0 and r["stuck_requests"] == 0


def test_overload_rejects_fast_and_serves_the_rest(results):
    r = results["overload-10x"]
    o = r["overload"]
    assert r["rejected"] >= 1 and r["completed"] >= 1, r
    assert r["failed"] == r["rejected"], r["errors"]  # every failure is a 503 with Retry-After
    # The requirement (p99 < 100 ms at 10x) is measured on the default model by `make chaos` (docs/reliability.md:
    # 13 ms). Here the tiny model's sustainable rate is ~30 req/s since tokens travel coalesced (~20 before), so
    # 10x is ~300 new connections/s while the accepted streams flood the router with tokens, and the load
    # generator, Ray's raylet/GCS, the router and four workers share 2 cores (with whatever else runs there): the
    # rejections measure how fast those 2 cores take connections (at ~200/s: 16-290 ms p99 over repeated runs; at
    # ~290/s once: p50 120 ms, p90 434 ms). CI holds the median to 200 ms and the 90th percentile to 600 ms:
    # rejections queueing behind admitted work would take a whole prefill and more, for most of them.
    print("overload:", {k: v for k, v in o.items() if k != "slowest_rejections"})
    assert o["rejection_p50_ms"] < 200 and o["rejection_p90_ms"] < 600, o
    # "10x overload" is what the clients really did: the arrival rate achieved, not the one planned
    assert o["achieved_rps"] >= 8 * o["sustainable_rps"] > 0, o


# What each kind of hostile request must get: served exactly (within the caps) or refused with a 400
REFUSED = {"HTTP 400"}
EXPECTED = {
    "stop-storm": {"stop: the most allowed": {"completed"}, "stop: 10,000 strings": REFUSED,
                   "stop_token_ids: 10,000": REFUSED},
    "priority-flood": {"priority -1,000,000": REFUSED, "priority +1,000,000": REFUSED},
    "huge-prompts": {"chat: 3 MiB prompt": REFUSED, "completion: 3 MiB prompt": REFUSED},
    "frozen-peer": {},
}


@pytest.mark.parametrize("name", ATTACKS)
def test_hostile_clients_are_refused_and_the_others_served(results, name):
    r = results[name]
    a = r["attack"]
    print(name, {k: a[k] for k in ("quiet", "during", "attack_requests", "attack_rps", "by_kind")})
    assert a["victims_completed"] == a["victims"] >= 48, r["errors"]  # every normal client's text exact
    for phase in ("quiet", "during"):  # the TPOT figures were measured over every victim's stream
        assert a[phase]["streams"] == a["victims"] // 2 and a[phase]["tpot_p99_ms"] is not None, a
    outcomes = {kind: set(got) for kind, got in a["by_kind"].items()}
    assert outcomes == EXPECTED[name], a["by_kind"]  # every kind was sent, and each got what it must
    refused = sum(n for got in a["by_kind"].values() for o, n in got.items() if o != "completed")
    assert r["failed"] == refused and r["rejected"] == 0, r["errors"]  # no normal client failed
    if name != "frozen-peer":
        assert a["attack_requests"] >= ATTACKERS
        # Issue 14 measured a 5.3 s stop in another client's stream while 3 MiB prompts were tokenized on the
        # router's loop; here the longest gap seen while attacked was ~0.3 s (the 600+/s priority flood's
        # refusals sharing the router with the streams on 2 cores): 2 s is far from both
        assert a["during"]["max_gap_p99_ms"] < 2000, a


def test_a_frozen_peer_is_failed_and_its_requests_migrate(results):
    r = results["frozen-peer"]
    assert r["fault"]["inflight"] > 0, r["fault"]
    assert r["worker_failures"] == {"decode/unresponsive": 1}, r["worker_failures"]
    assert r["migrations"] >= r["fault"]["inflight"], (r["migrations_by_reason"], r["fault"])
    assert r["recovery_s"] is not None, r["errors"]

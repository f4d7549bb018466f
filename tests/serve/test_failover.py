"""Fault tolerance on a live deployment: request migration when a decode worker dies or
stalls, re-dispatch when a prefill worker dies, self-healing pools, transfer faults,
the migration limit, a router restart and graceful drain. Every stream is checked
token for token (as text, byte-level tokenizer) against the bare engine's greedy run,
and every worker's KV pool is checked to be all free afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import httpx
import pytest

from pdserve.engine.config import FaultConfig, PdserveConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling import SamplingParams
from tests.helpers import EXACT, Server, metric, stream_completion, wait_for

PROMPT = "Once upon a time, in a land far away"
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def expected(tiny_text_model_dir):
    """The uninterrupted greedy text for a max_tokens (and a prompt), from the bare engine."""
    engine = LLMEngine(PdserveConfig().replace(model={"model": str(tiny_text_model_dir), **EXACT}))
    cache: dict[tuple[int, str], str] = {}

    def text(max_tokens: int = MAX_TOKENS, prompt: str = PROMPT) -> str:
        if (max_tokens, prompt) not in cache:
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            cache[max_tokens, prompt] = engine.generate([prompt], params)[0].output_text
        return cache[max_tokens, prompt]

    return text


@pytest.fixture(scope="module")
def reference(expected) -> str:
    return expected()


def body(**kw) -> dict:
    return {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True, **kw}


def stream(url: str, on_chunk=None, **kw) -> tuple[str, dict | None, list[str]]:
    """Stream a completion of `body(**kw)`: (text, the error chunk or None, raw data lines)."""
    return stream_completion(url, body(**kw), on_chunk)


def holder(server: Server, role: str) -> str:
    """The one worker of `role` holding a request (running, waiting or queued for its loop)."""
    deadline = time.monotonic() + 10
    while True:
        busy = [w for w, s in server.stats().items() if w.startswith(role) and s.busy]
        if len(busy) == 1:
            return busy[0]
        assert time.monotonic() < deadline, server.stats()
        time.sleep(0.02)


def handle(server: Server, worker_id: str):
    return server.ray.get(server.actor.worker_handle.remote(worker_id))


def pools_of(server: Server) -> dict:
    return server.ray.get(server.actor.status.remote())["pools"]


def wait_pools(server: Server, prefill: int, decode: int, timeout: float = 60) -> dict:
    """Until the router's pools hold exactly this many healthy workers (self-healing)."""
    deadline = time.monotonic() + timeout
    while True:
        pools = server.ray.get(server.actor.status.remote())["pools"]
        healthy = {role: sum(w["healthy"] and not w["draining"] for w in ws) for role, ws in pools.items()}
        if healthy == {"prefill": prefill, "decode": decode} and all(len(ws) == healthy[r] for r, ws in pools.items()):
            return pools
        assert time.monotonic() < deadline, pools
        time.sleep(0.1)


def kill_after(server: Server, role: str, at_chunk: int, stall_first: bool = True):
    """An `on_chunk` that, at chunk `at_chunk`, freezes the worker of `role` holding the request
    (so it cannot finish on its own) and kills its actor."""
    killed = []

    def on_chunk(n: int) -> None:
        if n == at_chunk:
            wid = holder(server, role)
            h = handle(server, wid)
            if stall_first:
                server.ray.get(h.debug_stall.remote(60))
            server.ray.kill(h)
            killed.append((wid, time.monotonic()))

    return on_chunk, killed


@pytest.fixture(scope="module")
def disagg(ray_cluster, tiny_text_model_dir):
    server = Server(ray_cluster, tiny_text_model_dir,
                    serve={"prefill_workers": 2, "decode_workers": 2, "health_interval_s": 0.2,
                           "stall_timeout_s": 2.0, "max_migrations": 3, "drain_timeout_s": 0.5,
                           "max_step_errors": 3})
    yield server
    server.stop()


def test_decode_worker_killed_mid_stream_migrates_without_losing_a_token(disagg, reference):
    on_chunk, killed = kill_after(disagg, "decode", 5)
    before = metric(disagg, "pdserve_request_migrations_total", reason="worker_died")
    text, error, _ = stream(disagg.url, on_chunk)
    assert error is None and killed
    assert text == reference  # nothing lost, nothing repeated
    assert metric(disagg, "pdserve_request_migrations_total", reason="worker_died") == before + 1
    pools = wait_pools(disagg, 2, 2)  # the dead worker was replaced
    assert killed[0][0] not in {w["worker_id"] for w in pools["decode"]}
    disagg.wait_kv_free()


def test_an_n2_request_whose_decode_worker_dies_migrates_each_choice_as_its_own_request(disagg, reference):
    """Parallel sampling: both choices decode on one worker (the second forked from the first's prompt KV);
    when it dies, each choice migrates like any request, re-prefilled with the tokens it streamed."""
    wait_pools(disagg, 2, 2)
    on_chunk, killed = kill_after(disagg, "decode", 8)
    before = metric(disagg, "pdserve_request_migrations_total", reason="worker_died")
    texts, chunks = ["", ""], 0
    with httpx.stream("POST", f"{disagg.url}/v1/completions", json=body(n=2), timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                assert "error" not in obj, obj
                for c in obj["choices"]:
                    texts[c["index"]] += c["text"]
                chunks += 1
                on_chunk(chunks)
    assert killed and texts == [reference, reference]
    assert metric(disagg, "pdserve_request_migrations_total", reason="worker_died") == before + 2


def test_a_structured_request_migrates_under_its_grammar(disagg, tiny_text_model_dir):
    """A decode worker dies mid-stream of a guided_regex request: the new attempt's prefill worker and decode
    worker rebuild the grammar state from the streamed tokens, and the text equals the bare engine's."""
    from pdserve.engine.sampling import StructuredOutput

    regex = "[a-z]{60}"
    engine = LLMEngine(PdserveConfig().replace(model={"model": str(tiny_text_model_dir), **EXACT}))
    want = engine.generate([PROMPT], SamplingParams(max_tokens=80, temperature=0, structured=StructuredOutput(
        "regex", regex, "guided_regex")))[0].output_text
    del engine
    wait_pools(disagg, 2, 2)
    on_chunk, killed = kill_after(disagg, "decode", 5)
    text, error, _ = stream(disagg.url, on_chunk, max_tokens=80, guided_regex=regex)
    assert error is None and killed
    assert text == want and len(text) == 60
    wait_pools(disagg, 2, 2)
    disagg.wait_kv_free()


def test_prefill_worker_killed_while_holding_the_request_is_transparent(disagg, reference):
    wait_pools(disagg, 2, 2)
    prefills = [w for w in disagg.stats() if w.startswith("prefill")]
    for w in prefills:  # both frozen: the request sits in one's queue
        disagg.ray.get(handle(disagg, w).debug_stall.remote(60))
    result = {}
    t = threading.Thread(target=lambda: result.update(out=stream(disagg.url)))
    t.start()
    victim = holder(disagg, "prefill")
    disagg.ray.kill(handle(disagg, victim))
    (other,) = [w for w in prefills if w != victim]
    disagg.ray.get(handle(disagg, other).debug_stall.remote(0))
    t.join(60)
    text, error, _ = result["out"]
    assert error is None and text == reference
    wait_pools(disagg, 2, 2)
    disagg.wait_kv_free()


def test_stalled_decode_engine_loop_is_detected_and_its_requests_migrate(disagg, reference):
    wait_pools(disagg, 2, 2)
    stalled = []

    def on_chunk(n: int) -> None:
        if n == 5:
            wid = holder(disagg, "decode")
            disagg.ray.get(handle(disagg, wid).debug_stall.remote(60))  # alive, answering, stuck
            stalled.append(wid)
            # detected (the router takes it out of the healthy pool) within stall_timeout_s (2 s) plus a health
            # interval (0.2 s) and slack for 2 shared cores: timed from the stall to the detection itself, not
            # to the end of the 300-token stream it migrates
            wait_for(lambda: not any(w["worker_id"] == wid and w["healthy"] for w in pools_of(disagg)["decode"]),
                     2.0 + 3.0, "the stalled decode worker to be detected")

    before = metric(disagg, "pdserve_worker_failures_total", role="decode", reason="stalled")
    text, error, _ = stream(disagg.url, on_chunk)
    assert error is None and text == reference
    assert metric(disagg, "pdserve_worker_failures_total", role="decode", reason="stalled") == before + 1
    pools = wait_pools(disagg, 2, 2)
    assert stalled[0] not in {w["worker_id"] for w in pools["decode"]}
    disagg.wait_kv_free()


def test_transfer_faults_are_retried_on_another_pair(disagg, expected):
    """Corrupt or failed transfers (fault injection on one prefill worker's sender at a time): the
    request is retried on the other pair, the corrupt KV is never decoded, the output is exact."""
    wait_pools(disagg, 2, 2)
    a, b = [w for w in disagg.stats() if w.startswith("prefill")]
    before = metric(disagg, "pdserve_request_migrations_total", reason="transfer_failed")
    try:
        for faulty, clean, fault in ((a, b, "transfer_corrupt_rate"), (b, a, "transfer_fail_rate")):
            disagg.ray.get(handle(disagg, faulty).set_faults.remote(FaultConfig(**{fault: 1.0})))
            disagg.ray.get(handle(disagg, clean).set_faults.remote(FaultConfig()))
            for _ in range(3):
                text, error, _ = stream(disagg.url, max_tokens=20)
                assert error is None and text == expected(20)
    finally:
        for w in (a, b):
            disagg.ray.get(handle(disagg, w).set_faults.remote(FaultConfig()))
    # the router sends to the same (least loaded, first) prefill worker each time: in one of the two
    # rounds that one was the faulty one
    assert metric(disagg, "pdserve_request_migrations_total", reason="transfer_failed") >= before + 3
    disagg.wait_kv_free()


def test_every_transfer_failing_ends_in_an_explicit_error(disagg):
    wait_pools(disagg, 2, 2)
    prefills = [w for w in disagg.stats() if w.startswith("prefill")]
    try:
        for w in prefills:
            disagg.ray.get(handle(disagg, w).set_faults.remote(FaultConfig(transfer_fail_rate=1.0)))
        r = httpx.post(f"{disagg.url}/v1/completions", json=body(stream=False), timeout=30)
        assert r.status_code == 503 and "retry-after" in r.headers
        assert "4 times" in r.json()["error"]["message"]  # 1 + max_migrations (3) attempts
    finally:
        for w in prefills:
            disagg.ray.get(handle(disagg, w).set_faults.remote(FaultConfig()))
    disagg.wait_kv_free()


def test_a_prefill_step_error_is_retried_on_another_prefill_worker(disagg, expected):
    """The prefill worker routing picks first (a prompt cached nowhere: the tie goes to the first) fails its
    engine step: the request is prefilled again on the other one, and the client sees nothing of it."""
    wait_pools(disagg, 2, 2)
    victim = pools_of(disagg)["prefill"][0]["worker_id"]
    before = metric(disagg, "pdserve_request_migrations_total", reason="worker_error")
    prompt = f"prefill retry. {PROMPT}"
    try:
        disagg.ray.get(handle(disagg, victim).set_faults.remote(FaultConfig(step_fail_rate=1.0)))
        text, error, _ = stream(disagg.url, prompt=prompt, max_tokens=16)
    finally:
        disagg.ray.get(handle(disagg, victim).set_faults.remote(FaultConfig()))
    assert error is None and text == expected(16, prompt)
    assert metric(disagg, "pdserve_request_migrations_total", reason="worker_error") == before + 1
    disagg.wait_kv_free()


def test_a_worker_whose_steps_keep_failing_is_replaced_and_no_longer_routed_to(disagg, expected):
    """Every engine step of one decode worker raises. Its KV pool, emptied by each failure, makes it the first
    pick every time (prompts cached nowhere: the tie goes to the first); each request it gets migrates and
    comes out exact. After max_step_errors (3) failed steps it reports itself failing and the router
    replaces it."""
    wait_pools(disagg, 2, 2)
    victim = pools_of(disagg)["decode"][0]["worker_id"]
    failures = metric(disagg, "pdserve_worker_failures_total", role="decode", reason="step_errors")
    migrations = metric(disagg, "pdserve_request_migrations_total", reason="worker_error")

    def routed() -> bool:
        return victim in {w["worker_id"] for w in pools_of(disagg)["decode"]}

    victim_handle = handle(disagg, victim)
    disagg.ray.get(victim_handle.set_faults.remote(FaultConfig(step_fail_rate=1.0)))
    try:
        for i in range(8):
            if not routed():
                break
            prompt = f"{i}. {PROMPT}"
            text, error, _ = stream(disagg.url, prompt=prompt, max_tokens=16)
            assert error is None and text == expected(16, prompt)
        wait_for(lambda: not routed(), 5.0, f"{victim} to be failed")
    finally:  # in case it is still there: the module's later tests need it sound
        with contextlib.suppress(Exception):
            disagg.ray.get(victim_handle.set_faults.remote(FaultConfig()), timeout=10)
    assert metric(disagg, "pdserve_worker_failures_total", role="decode", reason="step_errors") == failures + 1
    assert metric(disagg, "pdserve_request_migrations_total", reason="worker_error") >= migrations + 3
    wait_pools(disagg, 2, 2)
    migrations = metric(disagg, "pdserve_request_migrations_total", reason="worker_error")
    text, error, _ = stream(disagg.url, prompt=f"after. {PROMPT}", max_tokens=16)  # its replacement serves
    assert error is None and text == expected(16, f"after. {PROMPT}")
    assert metric(disagg, "pdserve_request_migrations_total", reason="worker_error") == migrations
    disagg.wait_kv_free()


def test_a_frozen_worker_is_given_up_within_the_routers_deadlines(ray_cluster, tiny_text_model_dir, expected):
    """SIGSTOP freezes a worker's process: Ray still counts it alive, and the health checks would fail it only
    after stall_timeout_s (60 s here). The router's own deadlines (prefill_timeout_s, stream_timeout_s: 3 s)
    give the attempt up and the request migrates, exact: first with a frozen prefill worker (the one routing
    picks first, for a prompt cached nowhere), then with a decode worker frozen mid-stream while another stream
    runs on the other decode worker and finishes. After SIGCONT every block comes back."""
    server = Server(ray_cluster, tiny_text_model_dir,
                    serve={"prefill_workers": 2, "decode_workers": 2, "health_interval_s": 0.2, "stall_timeout_s": 60.0,
                           "prefill_timeout_s": 3.0, "stream_timeout_s": 3.0})
    frozen: list[int] = []

    def freeze(worker_id: str) -> float:
        pid = server.ray.get(handle(server, worker_id).__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGSTOP)
        frozen.append(pid)
        return time.monotonic()

    def thaw() -> None:
        while frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen.pop(), signal.SIGCONT)

    try:
        before = metric(server, "pdserve_request_migrations_total", reason="timeout")
        prompt = f"frozen prefill. {PROMPT}"
        frozen_id = pools_of(server)["prefill"][0]["worker_id"]
        t0 = freeze(frozen_id)
        text, error, _ = stream(server.url, prompt=prompt, max_tokens=16)
        took = time.monotonic() - t0
        assert error is None and text == expected(16, prompt)
        print(f"the request on a frozen prefill worker took {took:.1f}s")
        assert 3.0 <= took < 3.0 + 10.0, took
        assert metric(server, "pdserve_request_migrations_total", reason="timeout") == before + 1
        # the router's own calls to its workers are bounded too: its stats call (the operators', the leak checks')
        # answers within serve.health_timeout_s (3 s) with the other three, instead of waiting for the frozen one
        t1 = time.monotonic()
        stats = server.ray.get(server.actor.worker_stats.remote(), timeout=20)
        everyone = {w["worker_id"] for ws in pools_of(server).values() for w in ws}
        assert len(everyone) == 4 and set(stats) == everyone - {frozen_id}, (stats, everyone)
        assert time.monotonic() - t1 < 3.0 + 5.0
        thaw()
        wait_pools(server, 2, 2)

        other: dict = {}
        frozen_at: list[float] = []
        other_prompt = f"the other stream. {PROMPT}"  # shares no block with PROMPT: no prefix draws it
        stalled: list[str] = []

        def on_chunk(n: int) -> None:
            if n == 5:
                wid = holder(server, "decode")
                server.ray.get(handle(server, wid).debug_stall.remote(30))  # it must not finish before the freeze
                stalled.append(wid)
                (rest,) = [w for w in server.stats() if w.startswith("decode") and w != wid]

                def free(w: str) -> int:  # as routing sees it, from the last health check
                    return next(x["free_blocks"] for x in pools_of(server)["decode"] if x["worker_id"] == w)

                wait_for(lambda: free(wid) < free(rest), 10, "routing to see the request's blocks")
                t = threading.Thread(target=lambda: other.update(
                    out=stream(server.url, prompt=other_prompt, max_tokens=100)))
                t.start()  # routed to the other decode worker: it has more free blocks
                other["thread"] = t
                wait_for(lambda: server.stats()[rest].busy, 10, "the other stream to run")
                frozen_at.append(freeze(wid))

        text, error, _ = stream(server.url, on_chunk, max_tokens=100)
        took = time.monotonic() - frozen_at[0]
        print(f"the stream frozen mid-way ended {took:.1f}s after the freeze")
        assert error is None and text == expected(100)
        assert took < 3.0 + 15.0, took
        other["thread"].join(60)
        assert other["out"][1] is None and other["out"][0] == expected(100, other_prompt)
        assert metric(server, "pdserve_request_migrations_total", reason="timeout") == before + 2
        thaw()
        server.ray.get(handle(server, stalled[0]).debug_stall.remote(0))
        wait_pools(server, 2, 2)
        server.wait_kv_free()
    finally:
        thaw()
        server.stop()


def test_scale_down_past_the_drain_timeout_migrates_what_is_left(ray_cluster, tiny_text_model_dir, reference):
    """Two streams, one held by each decode worker, both workers frozen; scaling decode to 1 drains one
    of them, which is still busy after drain_timeout_s (0.5 s): it is stopped and its request migrates
    to the other. Both streams come out exact."""
    # No prefix caching: both streams send one prompt, and the router would rightly send the second where
    # the first's prefix is cached whenever its load figures lag; this test needs one stream per worker.
    server = Server(ray_cluster, tiny_text_model_dir, cache={"enable_prefix_caching": False},
                    serve={"decode_workers": 2, "health_interval_s": 0.2, "drain_timeout_s": 0.5})
    try:
        decodes = [w for w in server.stats() if w.startswith("decode")]
        for w in decodes:  # frozen (well within stall_timeout_s): each keeps the request it is given
            server.ray.get(handle(server, w).debug_stall.remote(30))
        results: list = [None, None]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(server.url))) for i in (0, 1)]
        before = metric(server, "pdserve_request_migrations_total", reason="worker_died")
        threads[0].start()
        holder(server, "decode")
        threads[1].start()  # the router sends it to the other decode worker (fewer requests in flight there)
        deadline = time.monotonic() + 8
        while sum(s.busy for w, s in server.stats().items() if w.startswith("decode")) < 2:
            assert time.monotonic() < deadline, server.stats()
            time.sleep(0.02)
        server.ray.get(server.actor.scale.remote(None, 1))
        (kept,) = [w["worker_id"] for w in wait_pools(server, 1, 1)["decode"]]
        server.ray.get(handle(server, kept).debug_stall.remote(0))
        for t in threads:
            t.join(60)
        for text, error, _ in results:
            assert error is None and text == reference
        assert metric(server, "pdserve_request_migrations_total", reason="worker_died") == before + 1
        server.wait_kv_free()
    finally:
        server.stop()


def test_colocated_migration_and_the_migration_limit(ray_cluster, tiny_text_model_dir, reference):
    server = Server(ray_cluster, tiny_text_model_dir,
                    serve={"mode": "colocated", "decode_workers": 2, "health_interval_s": 0.2, "max_migrations": 1,
                           "failover_wait_s": 1.0})
    try:
        on_chunk, killed = kill_after(server, "decode", 5)
        text, error, _ = stream(server.url, on_chunk)
        assert error is None and text == reference and killed
        wait_pools(server, 0, 2)

        # killed twice: past max_migrations (1) the client gets an explicit error chunk, promptly
        kills = []

        def twice(n: int) -> None:
            if n in (5, 10):
                wid = holder(server, "decode")
                h = handle(server, wid)
                server.ray.get(h.debug_stall.remote(60))
                server.ray.kill(h)
                kills.append(time.monotonic())

        text, error, lines = stream(server.url, twice)
        assert len(kills) == 2 and error is not None
        assert error["error"]["code"] == 503 and "giving up after 1 migrations" in error["error"]["message"]
        assert time.monotonic() - kills[-1] < 5
        assert lines[-1] == "data: [DONE]" and text and len(text) < len(reference)
        wait_pools(server, 0, 2)
        server.wait_kv_free()
    finally:
        server.stop()


def test_no_decode_worker_left_gives_an_error_chunk_within_5s_then_the_pool_heals(ray_cluster, tiny_text_model_dir,
                                                                                   expected):
    server = Server(ray_cluster, tiny_text_model_dir, serve={"health_interval_s": 0.2, "failover_wait_s": 0.5})
    try:
        on_chunk, killed = kill_after(server, "decode", 4)
        text, error, lines = stream(server.url, on_chunk)
        assert error is not None and error["error"]["code"] == 503
        assert "no healthy worker is available to move the request to" in error["error"]["message"]
        assert time.monotonic() - killed[0][1] < 5
        assert lines[-1] == "data: [DONE]" and text and len(text) < len(expected())
        pools = wait_pools(server, 1, 1)
        assert pools["decode"][0]["worker_id"] != killed[0][0]
        r = httpx.post(f"{server.url}/v1/completions", json=body(stream=False, max_tokens=8), timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(8)
        server.wait_kv_free()
    finally:
        server.stop()


def test_unmeetable_ttft_deadline_is_refused_at_once_and_frees_everything(ray_cluster, tiny_text_model_dir):
    """SLA-aware admission across the deployment: the prefill engine estimates the TTFT from its
    measured step times and refuses a request that cannot make `ttft_deadline_s` (503 +
    Retry-After), releasing the KV the decode worker had reserved for it."""
    server = Server(ray_cluster, tiny_text_model_dir, serve={"ttft_deadline_s": 1e-4})
    try:
        r = httpx.post(f"{server.url}/v1/completions", json=body(stream=False, max_tokens=4), timeout=30)
        assert r.status_code == 503 and "retry-after" in r.headers
        assert "TTFT deadline cannot be met" in r.json()["error"]["message"]
        server.wait_kv_free()
    finally:
        server.stop()


def test_router_killed_comes_back_adopts_its_workers_and_frees_their_kv(ray_cluster, tiny_text_model_dir, expected):
    """Ray restarts the router actor; the new incarnation serves on the same address within 20 s,
    keeps the same workers and frees the KV of the requests the old one had in flight."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Server(ray_cluster, tiny_text_model_dir, serve={"port": port, "health_interval_s": 0.2})
    try:
        workers = set(server.stats())
        broken: list = []

        def on_chunk(n: int) -> None:
            if n == 3:  # requests in flight hold KV on the decode worker
                assert any(s.num_running for s in server.stats().values())
                server.ray.kill(server.actor, no_restart=False)
                broken.append(time.monotonic())

        with pytest.raises(httpx.HTTPError):  # the client's connection breaks with the router
            stream(server.url, on_chunk, max_tokens=900)
        t0 = broken[0]
        while True:
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 20, "the router did not come back within 20 s"
            time.sleep(0.1)
        assert set(server.stats()) == workers  # adopted, not replaced
        server.wait_kv_free()
        r = httpx.post(f"{server.url}/v1/completions", json=body(stream=False, max_tokens=8), timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(8)
    finally:
        server.stop()

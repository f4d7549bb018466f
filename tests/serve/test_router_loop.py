"""One client cannot hold or starve the others. The router's event loop relays every client's tokens, so
huge prompts are refused by their length before any tokenizing (which runs on a thread of its own);
and a priority the operator has not granted is refused, so no client preempts the rest."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from tests.helpers import Server


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_text_model_dir):
    s = Server(ray_cluster, tiny_text_model_dir)
    yield s
    s.stop()


def test_huge_prompts_are_refused_without_stalling_another_clients_stream(server):
    arrivals: list[float] = []
    streaming, finished = threading.Event(), threading.Event()

    def stream() -> None:
        body = {"prompt": "a quiet stream", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 20:
                        streaming.set()
                elif line == "data: [DONE]":
                    finished.set()

    def huge(i: int) -> httpx.Response:
        content = ("word " * (3 * 2**20 // 5))[: 3 * 2**20]  # 3 MiB, under the 4 MiB body limit
        return httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                          content=json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 4}))

    quiet = threading.Thread(target=stream)
    quiet.start()
    assert streaming.wait(60), "the stream never started"
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(huge, range(4)))
    t1 = time.monotonic()
    quiet.join(120)
    assert finished.is_set()  # the stream ran to its end
    during = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b >= t0 and a <= t1]
    assert during, "the huge requests were answered between two chunks: nothing was measured"
    assert max(during) < 1.0, f"the stream stalled {max(during):.2f} s while huge prompts arrived"
    for r in answers:
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "messages" and "characters" in err["message"], r.text[:300]
    server.wait_kv_free()


def test_an_ungranted_priority_is_a_400_and_the_default_one_runs(server):
    """The live server (default config) grants no client a priority other than 0."""
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": -1_000_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": 0}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    server.wait_kv_free()

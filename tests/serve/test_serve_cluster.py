"""pdserve serve on a simulated multi-node Ray cluster, on the default model (slow), and its orphaned workers."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from pdserve.engine.config import PdserveConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]

CLUSTER_SCRIPT = textwrap.dedent("""
    import sys, httpx, ray
    from ray.cluster_utils import Cluster
    from pdserve.engine.config import PdserveConfig
    from pdserve.router.actor import launch_router

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    prefill_node = cluster.add_node(num_cpus=2, resources={"prefill": 1})
    decode_node = cluster.add_node(num_cpus=2, resources={"decode": 1})
    ray.init(address=cluster.address, namespace="pdserve", log_to_driver=False)
    cfg = PdserveConfig().replace(model={"model": sys.argv[1], "dtype": "float32"}, cache={"num_kv_blocks": 128},
                                  engine={"num_threads": 1},
                                  serve={"port": 0, "prefill_workers": 2, "decode_workers": 1})
    router = launch_router(cfg)
    url = ray.get(router.start.remote(), timeout=180)
    pools = ray.get(router.status.remote())["pools"]
    assert {w["node_id"] for w in pools["prefill"]} == {prefill_node.node_id}, pools
    assert {w["node_id"] for w in pools["decode"]} == {decode_node.node_id}, pools
    for i in range(4):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": f"node test {i}", "max_tokens": 6,
                                                       "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
    ray.get(router.stop.remote(), timeout=60)
    ray.shutdown()
    cluster.shutdown()
    print("placement ok")
""")


@pytest.mark.slow
def test_pools_land_on_their_own_nodes(tiny_text_model_dir):
    """Nodes carry `prefill` / `decode` resources: each pool is placed on its own nodes and serves."""
    proc = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, str(tiny_text_model_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(ROOT),
                                                                           **_env()})
    assert proc.returncode == 0 and "placement ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
COMPLETION = "The three primary colors are"


@pytest.mark.slow
def test_default_model_greedy_identical_across_modes_and_the_bare_engine(ray_cluster, default_model_dir):
    from tests.helpers import EXACT, MODES, Server

    engine = LLMEngine(PdserveConfig().replace(model=EXACT))
    params = SamplingParams(max_tokens=24, temperature=0)
    want_chat = engine.generate([CHAT], params)[0].output_text
    want_text = engine.generate([COMPLETION], params)[0].output_text
    assert "Paris" in want_chat
    del engine
    for name, sections in MODES.items():
        server = Server(ray_cluster, None, **{k: dict(v) for k, v in sections.items()})
        try:
            c = server.client()
            chat = c.chat.completions.create(model=server.model, messages=CHAT, max_tokens=24, temperature=0)
            assert chat.choices[0].message.content == want_chat, name
            streamed = c.chat.completions.create(model=server.model, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True)
            assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == want_chat, name
            text = c.completions.create(model=server.model, prompt=COMPLETION, max_tokens=24, temperature=0)
            assert text.choices[0].text == want_text, name
            streamed = c.completions.create(model=server.model, prompt=COMPLETION, max_tokens=24, temperature=0,
                                            stream=True)
            assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == want_text, name
            assert httpx.get(f"{server.url}/health").status_code == 200
            server.wait_kv_free()
        finally:
            server.stop()


@pytest.mark.slow
def test_pdserve_serve_and_scale_commands(tiny_text_model_dir):
    """The commands `make serve` and the README use: serve prints its URL, answers, scales, stops on SIGINT."""
    import os
    import signal

    env = {**{k: v for k, v in _env().items() if k != "RAY_AUTH_MODE"}, "PYTHONPATH": str(ROOT)}
    serve = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--model", str(tiny_text_model_dir),
                              "--port", "0", "--num-kv-blocks", "128", "--threads", "1"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in serve.stdout:
            lines.append(line)
            if line.strip().startswith("scale:"):
                break
        banner = "".join(lines)
        url = next(w for w in banner.split() if w.startswith("http://")).rstrip("/")
        address = banner.split("--address ", 1)[1].split()[0]  # this cluster, not the test session's
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 4, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        scaled = subprocess.run([sys.executable, "-m", "pdserve.cli", "scale", "--address", address, "--decode", "2"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert scaled.returncode == 0, scaled.stderr[-2000:]
        pools = json.loads(scaled.stdout[scaled.stdout.index("{"):])
        assert len(pools["decode"]) == 2 and len(pools["prefill"]) == 1
        assert httpx.get(f"{url}/health").json()["status"] == "ok"

        # SIGTERM drains: a stream in flight finishes whole, new requests get 503, then the process exits 0
        done: dict = {}

        def long_stream() -> None:
            body = {"prompt": "hi", "max_tokens": 900, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        done.setdefault("first", True)
                        obj = json.loads(line[6:])
                        done["usage"] = obj.get("usage") or done.get("usage")
                        done["error"] = obj.get("error") or done.get("error")

        t = threading.Thread(target=long_stream)
        t.start()
        deadline = time.monotonic() + 60
        while "first" not in done:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.01)
        serve.send_signal(signal.SIGTERM)
        while httpx.get(f"{url}/health").status_code != 503:  # draining: load balancers move away
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and "retry-after" in refused.headers
        t.join(120)
        assert done.get("error") is None and done["usage"]["completion_tokens"] == 900
        assert serve.wait(120) == 0
    finally:
        if serve.poll() is None:
            os.kill(serve.pid, signal.SIGKILL)


def test_a_serve_killed_with_sigkill_leaves_workers_the_next_start_ends(ray_cluster, tiny_text_model_dir):
    """`pdserve serve` killed with SIGKILL: Ray ends its router (the driver owned it), but the detached workers
    live on, holding their memory (devices, on a GPU node). The next `pdserve serve` on the cluster finds
    them, learns from each that its router is dead, and ends them before starting its own."""
    import os
    import re
    import signal

    from ray.util import list_named_actors

    from tests.helpers import wait_for

    ray = ray_cluster
    gcs = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--address", gcs, "--model", str(tiny_text_model_dir),
           "--port", "0", "--num-kv-blocks", "64", "--threads", "1"]
    env = {**_env(), "PYTHONPATH": str(ROOT)}

    def workers() -> set[str]:
        return {a["name"] for a in list_named_actors(all_namespaces=True) if a.get("namespace") == "pdserve"
                and re.fullmatch(r"pdserve-[0-9a-f]+-(prefill|decode)-\d+", a["name"])}

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:  # until the banner's last line: the workers are up
            if line.strip().startswith("scale:"):
                return proc
        pytest.fail(f"pdserve serve exited with {proc.wait()} before serving")

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    others = workers()  # other tests' servers on the session cluster: not to be touched
    first = start()
    second = None
    try:
        orphans = workers() - others
        assert len(orphans) == 2
        pids = [ray.get(ray.get_actor(n, namespace="pdserve").__ray_call__.remote(lambda self: os.getpid()))
                for n in orphans]
        first.kill()
        first.wait(10)
        assert orphans <= workers() and all(map(alive, pids))  # detached: still there
        t0 = time.monotonic()
        second = start()
        print(f"the second pdserve serve was up {time.monotonic() - t0:.1f}s after the first was killed")
        assert not orphans & workers()
        wait_for(lambda: not any(map(alive, pids)), 10, "the orphaned workers' processes to exit")
        assert len(workers() - others) == 2  # its own
        assert workers() >= others
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)
        for name in workers() - others:  # whatever a failure left behind
            with contextlib.suppress(Exception):
                ray.kill(ray.get_actor(name, namespace="pdserve"), no_restart=True)

"""What several test files share (one module, instead of test files importing each other):
prompts and the HF reference for the tiny models, the engine leak check, polling with a
deadline, the live KV leak check (`wait_kv_free`), a streamed completion's reader
(`stream_completion`), `BoardWorker` (another worker process on a core board), and `Server`, a live
`pdserve serve` deployment on the session's Ray cluster (with `metric`, one of its router's Prometheus
series)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
import torch

from pdserve.engine.config import PdserveConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.messages import WorkerStats
from pdserve.engine.sampling import SamplingParams

torch.set_num_threads(2)

# Tests that compare output with HF transformers, or across modes, pin float32: `auto` is bf16 on CPUs with
# native bf16, and only float32 is token-exact against HF.
EXACT = {"dtype": "float32"}

PROMPT_LENS = [3, 17, 40, 5, 64, 1]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def prompts(seed: int = 1, lens=PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_no_leak(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.check_invariants()
    assert not engine.seqs and not engine.running and not engine.waiting
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} KV blocks leaked"


def wait_for(predicate, timeout: float, what: str) -> float:
    """Poll `predicate` until it holds (returns the seconds it took) or fail after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def wait_kv_free(stats, worker_ids, timeout: float = 15.0) -> None:
    """Poll until every worker of the pools (`worker_ids()`) answers `stats()` with its KV pool all free and no
    request left; a worker that does not answer (frozen, cut off: `stats` leaves it out) fails the wait."""
    t0 = time.monotonic()
    while True:
        got, ids = stats(), worker_ids()
        missing = ids - set(got)
        if not missing and all(s.free_blocks == s.num_blocks and not s.num_running and not s.num_waiting
                               for s in got.values()):
            return
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"KV not freed within {timeout}s: {got}" + (f"; no answer from {sorted(missing)}"
                                                                     if missing else ""))
        time.sleep(0.05)


def stream_completion(url: str, body: dict, on_chunk=None) -> tuple[str, dict | None, list[str]]:
    """POST a streamed completion `body` to `url`: (its text, the error chunk or None, the raw `data:` lines).
    `on_chunk(i)` runs after the i-th content chunk (to inject a fault, or to see the stream start)."""
    text, error, lines = "", None, []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        n = 0
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line)
            if line == "data: [DONE]":
                break
            obj = json.loads(line[6:])
            if "error" in obj:
                error = obj
                continue
            text += obj["choices"][0]["text"]
            n += 1
            if on_chunk is not None:
                on_chunk(n)
    return text, error, lines


MODES = {"disagg-grpc": {"serve": {"mode": "disaggregated"}, "kv_transfer": {"kv_transport": "grpc"}},
         "disagg-nccl": {"serve": {"mode": "disaggregated"}, "kv_transfer": {"kv_transport": "nccl"}},
         "colocated": {"serve": {"mode": "colocated"}}}


_BOARD_WORKER = """
import sys
from pathlib import Path
from pdserve.worker.core_share import CoreShare
board = CoreShare(Path(sys.argv[1]), 1, cores=int(sys.argv[2]), busy_s=600)  # marks outlast any test
for line in sys.stdin:  # one command a line, an answer a line
    cmd = line.strip()
    if cmd == "busy":
        board.threads()
    elif cmd == "idle":
        board.idle()
    elif cmd == "close":
        board.close()
    print(cmd, flush=True)
"""


class BoardWorker:
    """Another worker process on the core board at `path` (`worker.core_share`), driven a command at a time:
    busy, idle, close."""

    def __init__(self, path, cores: int):
        self.proc = subprocess.Popen([sys.executable, "-c", _BOARD_WORKER, str(path), str(cores)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.do("idle")  # answered once it has joined the board

    def do(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == cmd

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Server:
    def __init__(self, ray, model_dir, **sections):
        from pdserve.router.actor import launch_router

        # Disaggregated servers ship every prompt's KV unless a test says otherwise: the tests of the transfer
        # path, its faults and migrations must not be routed around it by conditional disaggregation.
        serve = {"port": 0, "disaggregation": "always", **sections.pop("serve", {})}
        cache = {"num_kv_blocks": 256, **sections.pop("cache", {})}
        model = {"model": str(model_dir) if model_dir else None, **EXACT, **sections.pop("model", {})}
        self.config = PdserveConfig().replace(model=model, cache=cache, engine={"num_threads": 1}, serve=serve,
                                              **sections)
        self.ray = ray
        self.actor = launch_router(self.config)
        self.url = ray.get(self.actor.start.remote(), timeout=120)
        self.model = ray.get(self.actor.status.remote())["url"] and self.served_model()

    def served_model(self) -> str:
        return httpx.get(f"{self.url}/v1/models", headers=self.auth()).json()["data"][0]["id"]

    def auth(self) -> dict:
        key = self.config.serve.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.config.serve.api_key or "none", max_retries=0)

    def stats(self) -> dict[str, WorkerStats]:
        return self.ray.get(self.actor.worker_stats.remote())

    def worker_ids(self) -> set[str]:
        """Every worker in the pools, as the router lists them."""
        return {w["worker_id"] for ws in self.ray.get(self.actor.status.remote())["pools"].values() for w in ws}

    def wait_kv_free(self, timeout: float = 15.0) -> None:
        wait_kv_free(self.stats, self.worker_ids, timeout)

    def stop(self) -> None:
        self.ray.get(self.actor.stop.remote(), timeout=60)
        self.ray.kill(self.actor)


def metric(server: Server, name: str, **labels) -> float:
    """The sum of `name`'s series with these labels and this server's model_name (0 before the first
    increment: a labelled counter has no series until then)."""
    text = httpx.get(f"{server.url}/metrics").text
    want = [f'{k}="{v}"' for k, v in {"model_name": server.model, **labels}.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


def kv_fingerprint(num_layers: int = 2):
    """The KV layout of the transfer-layer tests (no model behind it): 2 KV heads of 16 floats, blocks of 16."""
    from pdserve.kv_transfer.protocol import Fingerprint

    return Fingerprint("test/model", "ab" * 32, num_layers=num_layers, num_kv_heads=2, head_dim=16, dtype="float32",
                       block_size=16, pdserve_version="0.1.0")


def serve_modes(ray_cluster, model_dir, names):
    """A module fixture's body: a `Server` per `MODES` name, stopped when the module is done."""
    made = {name: Server(ray_cluster, model_dir, **json.loads(json.dumps(MODES[name]))) for name in names}
    yield made
    for s in made.values():
        s.stop()

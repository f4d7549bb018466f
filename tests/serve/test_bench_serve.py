"""`pdserve bench serve`: its arrival process, statistics, goodput, SSE parsing and error accounting, the
shared-prefix and multiturn workloads (what goes on the wire, against a small recording HTTP server: the load
generator's own logic), then short runs against a live `pdserve serve` whose counts must match what was sent."""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench import serve as B
from tests.helpers import Server

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_have_the_requested_rate_and_burstiness(burstiness):
    rate = 20.0
    t = B.arrival_times(20_000, rate, burstiness, random.Random(1))
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 1 / rate) / (1 / rate) < 0.03
    cv = gaps.std() / gaps.mean()  # gamma: CV = 1/sqrt(shape); Poisson (shape 1) has CV 1
    assert abs(cv - 1 / math.sqrt(burstiness)) / (1 / math.sqrt(burstiness)) < 0.06
    assert B.arrival_times(5, math.inf, 1.0, random.Random(1)) == [0.0] * 5


def test_arrivals_are_repeatable_with_a_seed():
    assert B.arrival_times(50, 3.0, 1.0, random.Random(7)) == B.arrival_times(50, 3.0, 1.0, random.Random(7))


def test_percentiles_match_numpy():
    rng = random.Random(3)
    for n in (1, 2, 7, 100, 1001):
        v = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert B.percentile(v, q) == pytest.approx(float(np.percentile(v, q)), rel=1e-12)
    s = B.summary_ms([0.1, 0.2, 0.3])
    assert s["mean"] == pytest.approx(200.0) and s["p50"] == pytest.approx(200.0)


def _result(ok=True, ttft=0.1, e2e=1.0, out=10, klass="default", error=""):
    r = B.Result(B.RequestSpec("p", out, klass=klass), ok=ok, ttft=ttft, e2e=e2e, output_tokens=out, error=error)
    return r


def test_goodput_counts_only_requests_meeting_every_slo():
    slos = B.parse_goodput(["ttft:200", "tpot:50"])
    assert slos == {"ttft": 0.2, "tpot": 0.05}
    results = [_result(ttft=0.1, e2e=0.5, out=11),  # tpot 40 ms: meets both
               _result(ttft=0.3, e2e=0.5, out=11),  # ttft misses
               _result(ttft=0.1, e2e=1.1, out=11),  # tpot 100 ms misses
               _result(ok=False, error="HTTP 503")]  # failed: never counts
    rep = B.report(results, 2.0, slos)
    assert rep["goodput"] == pytest.approx(0.5)  # 1 good request in 2 s
    assert rep["completed"] == 3 and rep["failed"] == 1 and rep["errors"] == ["HTTP 503"]
    assert rep["request_throughput"] == pytest.approx(1.5)
    assert rep["output_throughput"] == pytest.approx(33 / 2)
    assert rep["tpot_ms"]["p50"] == pytest.approx(40.0)
    with pytest.raises(ValueError):
        B.parse_goodput(["latency:5"])


def test_per_class_reports():
    results = [_result(klass="urgent", ttft=0.05), _result(klass="background", ttft=0.5),
               _result(klass="background", ok=False, error="x")]
    rep = B.report(results, 1.0, {"ttft": 0.1})
    assert rep["classes"]["urgent"]["goodput"] == 1.0 and rep["classes"]["background"]["goodput"] == 0.0
    assert rep["classes"]["background"]["failed"] == 1
    assert B.parse_classes("urgent:-1:0.2,background:1:0.3") == [("urgent", -1, 0.2), ("background", 1, 0.3)]
    with pytest.raises(ValueError):
        B.parse_classes("a:0:0.7,b:1:0.5")


def test_sse_parsing():
    assert B.parse_sse_line("data: [DONE]") == "[DONE]"
    assert B.parse_sse_line(": keep-alive") is None
    assert B.parse_sse_line("data: {not json") is None
    obj = B.parse_sse_line('data: {"choices": [{"delta": {"content": "hi"}}]}')
    assert B.chunk_text(obj) == "hi"
    assert B.chunk_text({"choices": [{"text": "x"}]}) == "x"
    assert B.chunk_text({"choices": [], "usage": {}}) == ""


def test_mixed_workload_has_long_prompts_and_priority_shares():
    args = _args(dataset_name="mixed", num_prompts=2000, random_input_len=20, mixed_long_input_len=400,
                 mixed_long_fraction=0.1, priority_classes="urgent:-1:0.25")
    specs = B.build_workload(args, random.Random(0))
    long = sum(1 for s in specs if len(s.prompt.split()) == 400)
    assert 150 < long < 250
    urgent = [s for s in specs if s.klass == "urgent"]
    assert 400 < len(urgent) < 600 and all(s.priority == -1 for s in urgent)


def _args(**kw):
    p = __import__("argparse").ArgumentParser()
    B.add_arguments(p)
    args = p.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


# -- shared-prefix and multiturn ------------------------------------------------------------------------------
class _RecordingServer(http.server.ThreadingHTTPServer):
    """A small OpenAI-shaped HTTP server for the load generator's own logic: it records every request (path,
    body) and streams back "answer <n> ok" in three chunks (n: the request's index), with usage whose
    prompt_tokens is the prompt's word count; a request for which `fail(body)` holds gets an HTTP 500."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[tuple[str, dict]] = []
        self.answers: dict[int, str] = {}  # request index -> the text streamed back
        self.fail = lambda body: False
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _RecordingServer

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            n = len(self.server.requests)
            self.server.requests.append((self.path, body))
        if self.server.fail(body):
            self.send_response(500)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"boom")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        chat = "messages" in body
        pieces = ["answer", f" {n}", " ok"]
        for piece in pieces:
            choice = {"delta": {"content": piece}} if chat else {"text": piece}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
        words = sum(len(m["content"].split()) for m in body["messages"]) if chat else len(body["prompt"].split())
        usage = {"prompt_tokens": words, "completion_tokens": len(pieces)}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        with self.server.lock:
            self.server.answers[n] = "".join(pieces)

    def log_message(self, *args):
        pass


@pytest.fixture
def recording_server():
    server = _RecordingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _run(**kw) -> tuple[list[B.Result], dict]:
    results, duration = asyncio.run(B.run(B.default_args(model="m", json=True, **kw)))
    return results, B.report(results, duration, {})


def test_shared_prefix_requests_start_with_one_system_text_then_differ(recording_server):
    kw = dict(dataset_name="shared-prefix", num_prompts=6, shared_prefix_len=40, random_input_len=10,
              random_output_len=3, seed=5, base_url=recording_server.url)
    specs = B.build_workload(B.default_args(**kw), random.Random(5))
    system = specs[0].system
    assert len(system.split()) == 40 and all(s.system == system for s in specs)
    questions = [s.prompt for s in specs]
    assert len(set(questions)) == 6 and all(len(q.split()) == 10 for q in questions)

    results, rep = _run(**kw)  # the completions endpoint: system text, blank line, question, as one prompt
    assert rep["completed"] == 6 and "turns" not in rep
    prompts = [body["prompt"] for path, body in recording_server.requests if path == "/v1/completions"]
    assert len(prompts) == 6 and all(p.startswith(system + "\n\n") for p in prompts)
    assert sorted(p[len(system) + 2:] for p in prompts) == sorted(questions)

    _run(**kw, endpoint="/v1/chat/completions")  # chat: a system message, then the question as the user's
    chats = [body["messages"] for path, body in recording_server.requests if path == "/v1/chat/completions"]
    assert len(chats) == 6
    assert all(m == [{"role": "system", "content": system}, {"role": "user", "content": m[1]["content"]}]
               for m in chats)
    assert sorted(m[1]["content"] for m in chats) == sorted(questions)  # the same seed: the same questions


def test_multiturn_workload_is_deterministic_per_seed():
    args = B.default_args(dataset_name="multiturn", num_conversations=5, num_turns=3, shared_prefix_len=30,
                          random_input_len=7, request_rate=2.0, num_prompts=1)  # num_prompts: not used

    def build(seed):
        rng = random.Random(seed)
        conversations = B.build_conversations(args, rng)
        return conversations, B.arrival_times(len(conversations), args.request_rate, args.burstiness, rng)

    conversations, offsets = build(3)
    assert build(3) == (conversations, offsets)
    assert build(4)[0] != conversations
    assert len(conversations) == 5 and len(offsets) == 5 and offsets[0] == 0.0 and offsets[-1] > 0
    assert [[(s.conversation, s.turn) for s in c] for c in conversations] == [[(i, t) for t in range(3)]
                                                                              for i in range(5)]
    system = conversations[0][0].system
    assert len(system.split()) == 30 and all(s.system == system for c in conversations for s in c)
    users = [s.prompt for c in conversations for s in c]
    assert len(set(users)) == 15 and all(len(u.split()) == 7 for u in users)
    # the other datasets as conversations of one request: the same requests, arrival times drawn after them
    mixed = B.default_args(dataset_name="mixed", num_prompts=20)
    assert B.build_conversations(mixed, random.Random(1)) == [[s] for s in B.build_workload(mixed, random.Random(1))]


def test_multiturn_sends_each_turn_with_the_answers_that_came_back(recording_server):
    results, rep = _run(dataset_name="multiturn", num_conversations=2, num_turns=3, shared_prefix_len=12,
                        random_input_len=5, random_output_len=3, base_url=recording_server.url)  # /v1/completions
    reqs = recording_server.requests
    assert len(reqs) == 6 and {path for path, _ in reqs} == {"/v1/chat/completions"}  # switched to chat
    assert all(r.ok for r in results) and len(results) == 6
    by_user = {body["messages"][-1]["content"]: (n, body["messages"]) for n, (_, body) in enumerate(reqs)}
    for conv in (0, 1):
        turns = sorted((r for r in results if r.conversation == conv), key=lambda r: r.turn)
        assert [r.turn for r in turns] == [0, 1, 2]
        expected = [{"role": "system", "content": turns[0].spec.system}]
        for r in turns:
            n, messages = by_user[r.spec.prompt]
            expected.append({"role": "user", "content": r.spec.prompt})
            assert messages == expected  # the whole history, each answer as the server streamed it in full
            assert r.text == recording_server.answers[n]
            expected.append({"role": "assistant", "content": recording_server.answers[n]})
    turns = rep["turns"]
    assert turns["first"]["completed"] == 2 and turns["later"]["completed"] == 4 and turns["not_sent"] == 0
    by_turn = turns["prompt_tokens_by_turn"]
    assert len(by_turn) == 3 and by_turn[0] < by_turn[1] < by_turn[2]  # each turn carries the ones before


def test_a_failed_turn_ends_its_conversation(recording_server):
    kw = dict(dataset_name="multiturn", num_conversations=2, num_turns=3, shared_prefix_len=12, random_input_len=5,
              random_output_len=3, base_url=recording_server.url, endpoint="/v1/chat/completions")
    first_user = B.build_conversations(B.default_args(**kw), random.Random(0))[0][0].prompt
    # conversation 0's second turn fails; conversation 1 goes on
    recording_server.fail = lambda body: len(body["messages"]) == 4 and body["messages"][1]["content"] == first_user
    results, rep = _run(**kw)
    assert len(recording_server.requests) == 5  # conversation 0's third turn never went out
    status = {(r.conversation, r.turn): (r.ok, r.sent) for r in results}
    assert status == {(0, 0): (True, True), (0, 1): (False, True), (0, 2): (False, False),
                      (1, 0): (True, True), (1, 1): (True, True), (1, 2): (True, True)}
    assert rep["completed"] == 4 and rep["failed"] == 1  # a turn not sent is not a failed request
    assert rep["turns"]["not_sent"] == 1 and rep["turns"]["later"]["failed"] == 1
    assert len(rep["errors"]) == 1 and "HTTP 500" in rep["errors"][0]
    assert "1 not sent" in B.format_report(rep)


def test_turns_report_splits_first_and_later_turns():
    def turn(t, ttft, prompt_tokens, ok=True, sent=True, conv=0):
        return B.Result(B.RequestSpec("q", 8, conversation=conv, turn=t), ok=ok, sent=sent, ttft=ttft, e2e=1.0,
                        prompt_tokens=prompt_tokens, output_tokens=8, error="" if ok else "x")

    results = [turn(0, 0.1, 100), turn(0, 0.3, 110, conv=1), turn(1, 0.05, 200), turn(1, 0.07, 220, conv=1),
               turn(2, 0.02, 300), turn(2, None, 0, ok=False, conv=1), turn(3, None, 0, ok=False, sent=False, conv=1)]
    rep = B.report(results, 1.0, {})
    assert rep["completed"] == 5 and rep["failed"] == 1
    first, later = rep["turns"]["first"], rep["turns"]["later"]
    assert first["completed"] == 2 and first["failed"] == 0
    assert first["ttft_ms"]["p50"] == pytest.approx(200.0) and first["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert later["completed"] == 3 and later["failed"] == 1
    assert later["ttft_ms"]["p50"] == pytest.approx(50.0) and later["ttft_ms"]["mean"] == pytest.approx(140 / 3)
    assert later["ttft_ms"]["p99"] == pytest.approx(69.6)
    assert later["prompt_tokens_mean"] == pytest.approx(240.0) and first["prompt_tokens_mean"] == pytest.approx(105)
    assert rep["turns"]["not_sent"] == 1
    assert rep["turns"]["prompt_tokens_by_turn"][:3] == [105.0, 210.0, 300.0]
    assert math.isnan(rep["turns"]["prompt_tokens_by_turn"][3])  # turn 3 was never sent
    text = B.format_report(rep)
    assert "first turns: 2 ok, 0 failed" in text and "later turns: 3 ok, 1 failed" in text
    assert "turns" not in B.report([_result()], 1.0, {})


def test_chat_endpoint():
    assert B.chat_endpoint("/v1/completions") == "/v1/chat/completions"
    assert B.chat_endpoint("/v1/chat/completions") == "/v1/chat/completions"
    assert B.chat_endpoint("/proxy/v1/completions/") == "/proxy/v1/chat/completions"
    with pytest.raises(ValueError):
        B.chat_endpoint("/generate")


def test_live_run_counts_match_and_failures_are_counted(ray_cluster, tiny_text_model_dir, tmp_path):
    server = Server(ray_cluster, tiny_text_model_dir, serve={"min_client_priority": -1})  # the rows' urgent class
    try:
        dataset = tmp_path / "prompts.jsonl"
        rows = [{"prompt": f"short prompt {i}", "output_len": 6, "priority": -1 if i % 3 == 0 else 0}
                for i in range(9)]
        rows.append({"prompt": "x" * 2000, "output_len": 4})  # over the context window: a 400, counted failed
        dataset.write_text("\n".join(json.dumps(r) for r in rows))
        out = subprocess.run(
            [sys.executable, "-m", "pdserve.cli", "bench", "serve", "--base-url", server.url, "--dataset-name",
             "jsonl", "--dataset-path", str(dataset), "--num-prompts", "20", "--request-rate", "50",
             "--max-concurrency", "8", "--seed", "1", "--goodput", "ttft:60000", "--json", "--plot",
             str(tmp_path / "plots")], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        rep = json.loads(out.stdout)
        assert rep["completed"] == 18 and rep["failed"] == 2  # 20 sent: the long row twice
        assert rep["total_output_tokens"] == 18 * 6
        assert any("HTTP 400" in e for e in rep["errors"])
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(rep[key]) == {"mean", "p50", "p90", "p99"} and rep[key]["p50"] > 0
        assert rep["goodput"] == pytest.approx(rep["request_throughput"])  # a 60 s SLO: every success is good
        assert all(Path(p).stat().st_size > 1000 for p in rep["plots"])

        # multiturn: the second turn carries the system prompt, the first question and the model's answer
        la = B.default_args(base_url=server.url, model=server.model, endpoint="/v1/chat/completions",
                            dataset_name="multiturn", num_conversations=2, num_turns=2, shared_prefix_len=20,
                            random_input_len=8, random_output_len=8, json=True)
        results, duration = asyncio.run(B.run(la))
        assert [r.error for r in results if not r.ok] == []
        assert sorted((r.conversation, r.turn) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert all(r.output_tokens == 8 and r.text for r in results)
        first = {r.conversation: r for r in results if r.turn == 0}
        for r in results:
            if r.turn == 1:
                assert r.prompt_tokens > first[r.conversation].prompt_tokens, (r, first[r.conversation])
        turns = B.report(results, duration, {})["turns"]
        assert turns["first"]["completed"] == 2 and turns["later"]["completed"] == 2 and turns["not_sent"] == 0
        assert turns["later"]["prompt_tokens_mean"] > turns["first"]["prompt_tokens_mean"]
        server.wait_kv_free()
    finally:
        server.stop()

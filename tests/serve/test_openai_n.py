"""Parallel sampling (n > 1), completions' echo with prompt logprobs, and /tokenize and /detokenize, live (a
real Ray cluster, the tiny text model), disaggregated and colocated: n seeded choices equal n separate
requests with seeds seed + i, while the prompt is prefilled (and shipped) once; every KV block comes back,
also when the client goes away mid-stream; bounds are 400s."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import Server, metric, serve_modes

SERVED = ("disagg-grpc", "colocated")
PROMPT = "The quick brown fox jumps over the lazy dog, again and again and again."  # > 4 blocks of 16


@pytest.fixture(scope="module")
def servers(ray_cluster, tiny_text_model_dir):
    yield from serve_modes(ray_cluster, tiny_text_model_dir, SERVED)


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def streamed_choices(server: Server, path: str, body: dict, n: int) -> tuple[list[str], dict]:
    texts, usage = [""] * n, None
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True,
                                                          "stream_options": {"include_usage": True}},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                texts[c["index"]] += c["text"] if "text" in c else c["delta"].get("content", "")
    return texts, usage


def test_seeded_choices_equal_separate_requests_and_the_prompt_is_prefilled_once(servers):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    for name, server in servers.items():
        want = [post(server, "/v1/completions", {**body, "seed": 40 + i}).json()["choices"][0]["text"]
                for i in range(3)]
        assert len(set(want)) == 3, name
        pool = "prefill" if name.startswith("disagg") else "decode"
        picks = metric(server, "pdserve_routing_decisions_total", pool=pool)
        r = post(server, "/v1/completions", {**body, "seed": 40, "n": 3})
        assert r.status_code == 200, r.text
        got = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["index"] for c in got] == [0, 1, 2]
        assert [c["text"] for c in got] == want, name
        assert r.json()["usage"]["completion_tokens"] == 36
        # choice 0 was placed (one prefill, one KV transfer when disaggregated); the others forked beside it
        assert metric(server, "pdserve_routing_decisions_total", pool=pool) == picks + 1, name
        texts, usage = streamed_choices(server, "/v1/completions", {**body, "seed": 40, "n": 3}, 3)
        assert texts == want and usage["completion_tokens"] == 36, name
        server.wait_kv_free()


def test_greedy_choices_are_all_the_n1_answer_in_chat(servers):
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0,
            "ignore_eos": True}
    for name, server in servers.items():
        one = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
        r = post(server, "/v1/chat/completions", {**body, "n": 2})
        assert [c["message"]["content"] for c in r.json()["choices"]] == [one, one], name
        texts, usage = streamed_choices(server, "/v1/chat/completions", {**body, "n": 2}, 2)
        assert texts == [one, one] and usage["completion_tokens"] == 20, name
        server.wait_kv_free()


def test_a_client_gone_mid_stream_frees_every_choice_and_n_is_bounded(servers):
    for name, server in servers.items():
        body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "n": 4, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            seen = set()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen |= {c["index"] for c in json.loads(line[6:])["choices"] if c["text"]}
                if len(seen) == 4:
                    break  # every choice is decoding: leave
        server.wait_kv_free()
        r = post(server, "/v1/completions", {"prompt": "hi", "n": 17})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        r = post(server, "/v1/completions", {"prompt": "hi", "n": 16, "max_tokens": 1000})  # 16 x 64 blocks > 256
        assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "KV" in r.json()["error"]["message"]
        r = post(server, "/v1/completions", {"prompt": "hi", "best_of": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", name


def test_echo_returns_the_prompt_with_its_logprobs_as_hf_computes_them(servers, tiny_text_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_text_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_text_model_dir)
    ids = [65, 98, 99, 32, 100, 101, 102, 103]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    prompt_text = tok.decode(ids)
    for name, server in servers.items():
        plain = post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 3, "temperature": 0, "echo": True})
        assert plain.json()["choices"][0]["text"].startswith("hello") and \
            plain.json()["choices"][0]["logprobs"] is None, name
        for stream in (False, True):
            body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2,
                    "ignore_eos": True, "stream": stream}
            r = post(server, "/v1/completions", body)
            assert r.status_code == 200, r.text
            chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")] if stream \
                else [r.json()]
            text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
            values = [v for lp in lps for v in lp["token_logprobs"]]
            tokens = [t for lp in lps for t in lp["tokens"]]
            tops = [t for lp in lps for t in lp["top_logprobs"]]
            assert text.startswith(prompt_text) and len(text) > len(prompt_text), (name, stream)
            assert tokens[:len(ids)] == [tok.decode([i]) for i in ids] and len(tokens) == len(ids) + 4
            assert values[0] is None and tops[0] is None, (name, stream)
            for pos in range(1, len(ids)):
                assert abs(values[pos] - ref[pos - 1, ids[pos]].item()) < 1e-4, (name, stream, pos)
                assert max(tops[pos].values()) == pytest.approx(ref[pos - 1].max().item(), abs=1e-4)
        server.wait_kv_free()


def test_tokenize_and_detokenize_in_vllms_shape(servers, tiny_text_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_model_dir)
    server = servers["colocated"]
    r = post(server, "/tokenize", {"model": server.model, "prompt": "hello world"})
    assert r.status_code == 200 and r.json() == {"count": len(tok.encode("hello world")),
                                                 "max_model_len": 1024, "tokens": tok.encode("hello world")}
    messages = [{"role": "user", "content": "hi"}]
    want = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)
    assert post(server, "/tokenize", {"messages": messages}).json()["tokens"] == want
    without = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    assert without != want
    assert post(server, "/detokenize", {"model": server.model, "tokens": want}).json() == {"prompt": tok.decode(want)}
    for path, body, param in (("/detokenize", {"tokens": [300]}, "tokens"),
                              ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/detokenize", {"tokens": [1] * 1025}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens"),
                              ("/tokenize", {"prompt": [999]}, "prompt"),
                              ("/tokenize", {"prompt": "x" * 10**6}, "prompt"),
                              ("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": "a", "messages": messages}, "messages")):
        r = post(server, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)
    assert post(server, "/tokenize", {"model": "other", "prompt": "a"}).status_code == 404

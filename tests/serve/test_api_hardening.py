"""The HTTP API's limits and guards against a live router (a real Ray cluster, tiny model):
request body and header size limits, the API and admin keys, the admin API, the published
OpenAPI schema, and a schemathesis fuzz run over real HTTP that must never get a 5xx."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import GenerationMode

from pdserve.engine.config import ServeConfig
from pdserve.engine.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from pdserve.router import protocol as P
from tests.helpers import Server, wait_for

MAX_BODY = 64 << 10
MAX_HEADERS = 8 << 10
API_KEY = "api-key-0123456789"
ADMIN_KEY = "admin-key-9876543210"
MAX_TOKENS = 4  # every generation in this file stays this short


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_text_model_dir):
    s = Server(ray_cluster, tiny_text_model_dir,
               serve={"api_key": API_KEY, "admin_key": ADMIN_KEY, "default_max_tokens": MAX_TOKENS,
                      "max_request_body_bytes": MAX_BODY, "max_header_bytes": MAX_HEADERS})
    yield s
    s.stop()


def settled_pools(server: Server) -> dict:
    """The pools once no worker is draining (a scale-down elsewhere in this module may still be draining
    one), at the fixture's sizes: 1 prefill + 1 decode. Each test that reads or changes the sizes starts
    from here, so none depends on another having restored them."""
    got = {}

    def settled() -> bool:
        got["pools"] = server.ray.get(server.actor.status.remote())["pools"]
        return not any(w["draining"] for ws in got["pools"].values() for w in ws)

    wait_for(settled, 60, "no worker draining")
    assert [len(got["pools"][role]) for role in ("prefill", "decode")] == [1, 1], got["pools"]
    return got["pools"]


def api(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["code"] == status and err["message"] and err["type"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def raw_exchange(url: str, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes on a fresh connection; read one response (status, body) without sending more
    (the body ends at its Content-Length, or else where the server closes the connection).
    A server that waited for more of the request would time this out."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as sock:
        sock.sendall(data)
        buf = b""
        while True:
            head, sep, body = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            fields = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
            length = int(fields.get("content-length", -1))
            if sep and 0 <= length <= len(body):
                return int(lines[0].split()[1]), body[:length]
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert sep and length < 0, f"the connection closed before a full response: {buf!r}"
                return int(lines[0].split()[1]), body
            buf += chunk


def request_head(path: str, *fields: str) -> bytes:
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: pdserve", f"Authorization: Bearer {API_KEY}",
                        "Content-Type: application/json", *fields, "", ""]).encode()


def padded(body: bytes, size: int) -> bytes:
    """A JSON body grown to exactly `size` bytes with trailing whitespace (still valid JSON)."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


# -- 1. request body size ------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_refused_with_413_and_one_at_the_limit_is_served(server):
    small = b'{"prompt": "hi", "max_tokens": 2, "temperature": 0}'
    at_limit = httpx.post(f"{server.url}/v1/completions", content=padded(small, MAX_BODY), headers=api())
    assert at_limit.status_code == 200 and at_limit.json()["usage"]["completion_tokens"] == 2, at_limit.text
    for path, headers in (("/v1/completions", api()), ("/v1/chat/completions", api()),
                          ("/admin/scale", api(ADMIN_KEY))):  # every POST route
        r = httpx.post(f"{server.url}{path}", content=padded(small, MAX_BODY + 1), headers=headers)
        err = assert_error(r, 413)
        assert str(MAX_BODY) in err["message"] and r.headers["connection"] == "close"
    r = httpx.post(f"{server.url}/v1/completions", content=b"x" * (8 << 20), headers=api())  # 8 MiB
    assert_error(r, 413)


def test_content_length_over_the_limit_is_refused_before_the_body_is_read(server):
    # a declared 1 GB body, none of it sent: the answer cannot wait for the body
    status, body = raw_exchange(server.url, request_head("/v1/completions", "Content-Length: 1000000000"))
    assert status == 413 and b"RequestTooLarge" in body


def test_a_chunked_body_is_counted_while_read_and_refused_once_over(server):
    def chunks(n: int, size: int = 4096):
        yield b'{"prompt": "hi", "max_tokens": 1}'
        for _ in range(n // size):
            yield b" " * size

    ok = httpx.post(f"{server.url}/v1/completions", content=chunks(MAX_BODY // 2), headers=api())
    assert ok.status_code == 200 and "content-length" not in ok.request.headers, ok.text
    assert ok.request.headers["transfer-encoding"] == "chunked"
    assert_error(httpx.post(f"{server.url}/v1/completions", content=chunks(4 * MAX_BODY), headers=api()), 413)
    # a chunked body past the limit that never ends: refused without waiting for its end
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
    data = request_head("/v1/completions", "Transfer-Encoding: chunked") + chunk * (MAX_BODY // 0x4000 + 1)
    status, body = raw_exchange(server.url, data)
    assert status == 413 and b"RequestTooLarge" in body
    assert httpx.get(f"{server.url}/health").status_code == 200


# -- 2. header size ----------------------------------------------------------------------------------
def test_headers_over_the_limit_are_refused_with_431(server):
    fine = httpx.get(f"{server.url}/v1/models", headers={**api(), "X-Pad": "a" * (MAX_HEADERS // 2)})
    assert fine.status_code == 200
    for path in ("/v1/models", "/health", "/admin/status"):
        r = httpx.get(f"{server.url}{path}", headers={**api(), "X-Pad": "a" * MAX_HEADERS})
        err = assert_error(r, 431)
        assert str(MAX_HEADERS) in err["message"]
    many = {f"X-Pad-{i}": "b" * 100 for i in range(MAX_HEADERS // 100)}  # many small headers add up
    assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, headers={**api(), **many}), 431)
    long_url = httpx.get(f"{server.url}/health?{'q' * MAX_HEADERS}")  # the request line counts too
    assert_error(long_url, 431)


def test_a_header_block_still_incomplete_past_the_limit_is_refused_by_the_http_server(server):
    """uvicorn's h11 bounds what it buffers of an unfinished header block (`h11_max_incomplete_event_size`,
    set from `serve.max_header_bytes`) and answers its own plain-text 400: the app never sees the request."""
    head = request_head("/v1/completions").removesuffix(b"\r\n")  # no blank line: the block never ends
    status, body = raw_exchange(server.url, head + b"X-Pad: " + b"a" * (MAX_HEADERS + 1024))
    assert status == 400 and b"Invalid HTTP request" in body
    assert httpx.get(f"{server.url}/health").status_code == 200


# -- 3. API key --------------------------------------------------------------------------------------
def test_a_missing_or_wrong_api_key_gets_401(server):
    body = {"prompt": "hi", "max_tokens": 1}
    for headers in ({}, api("nope"), api(API_KEY[:-1] + "X"), api(API_KEY + "X"), api(API_KEY[:-1]),
                    {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}, api(ADMIN_KEY)):
        for r in (httpx.post(f"{server.url}/v1/completions", json=body, headers=headers),
                  httpx.get(f"{server.url}/v1/models", headers=headers)):
            err = assert_error(r, 401)
            assert err["type"] == "AuthenticationError" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers=api()).status_code == 200
    lower = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"bearer {API_KEY}"})
    assert lower.status_code == 200  # the auth scheme is case-insensitive (RFC 9110)
    for path in ("/health", "/metrics", "/openapi.json"):  # probes, scrapers and the schema stay open
        assert httpx.get(f"{server.url}{path}").status_code == 200, path


def _app(**serve):
    """The FastAPI app in-process over a stub router (the guard answers before any route runs)."""
    from fastapi.testclient import TestClient

    from pdserve.router.api import build_app

    stub = SimpleNamespace(serve=ServeConfig(**serve), status=lambda: {"prefill": [], "decode": []})
    return TestClient(build_app(stub))


def test_keys_are_compared_in_constant_time(monkeypatch):
    import hmac


    calls = []
    compare = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare(a, b)

    from pdserve.router import api

    monkeypatch.setattr(api.hmac, "compare_digest", spy)
    client = _app(api_key="k1", admin_key="k2")
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/admin/status", headers={"Authorization": "Bearer k1"}).status_code == 401
    assert client.get("/admin/status", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert calls == [(b"wrong", b"k1"), (b"k1", b"k2"), (b"k2", b"k2")]


# -- 4. admin API ------------------------------------------------------------------------------------
def test_the_admin_api_is_refused_with_403_while_no_admin_key_is_set():
    client = _app(api_key="k1")
    for r in (client.get("/admin/status"), client.get("/admin/status", headers={"Authorization": "Bearer k1"}),
              client.post("/admin/scale", json={"decode": 2}, headers={"Authorization": "Bearer None"})):
        err = assert_error(r, 403)
        assert err["message"] == "the admin API is disabled: set serve.admin_key"


def test_admin_api_needs_the_admin_key(server):
    for headers in ({}, api(), api(ADMIN_KEY + "x"), {"Authorization": ADMIN_KEY}):
        assert_error(httpx.get(f"{server.url}/admin/status", headers=headers), 401)
        assert_error(httpx.post(f"{server.url}/admin/scale", json={"decode": 3}, headers=headers), 401)
    pools = settled_pools(server)
    status = httpx.get(f"{server.url}/admin/status", headers=api(ADMIN_KEY))
    assert status.status_code == 200
    assert status.json() == pools


@pytest.mark.parametrize("body, param", [
    ({"decode": -1}, "decode"), ({"decode": 65}, "decode"), ({"prefill": 2.5}, "prefill"),
    ({"decode": "2"}, "decode"), ({"decode": True}, "decode"), ({"decodes": 2}, "decodes"), ([2], None),
    (b"{not json", None), ({"decode": 0}, None), ({"prefill": 0}, None),  # the last two: Router.scale's ValueError
])
def test_admin_scale_rejects_bad_sizes_with_400(server, body, param):
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    r = httpx.post(f"{server.url}/admin/scale", content=content, headers=api(ADMIN_KEY))
    err = assert_error(r, 400, param)
    if body in ({"decode": 0}, {"prefill": 0}):
        assert "cannot scale" in err["message"]


def test_admin_scale_grows_and_shrinks_the_decode_pool(server):
    def live(pools, role):
        return [w for w in pools[role] if not w["draining"]]

    url, key = f"{server.url}/admin/scale", api(ADMIN_KEY)
    settled_pools(server)
    try:
        grown = httpx.post(url, json={"decode": 2}, headers=key, timeout=120)
        assert grown.status_code == 200, grown.text
        assert len(live(grown.json(), "decode")) == 2 and len(live(grown.json(), "prefill")) == 1
        for _ in range(4):  # the grown pool serves
            r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=api())
            assert r.status_code == 200, r.text
        same = httpx.post(url, json={"prefill": None}, headers=key, timeout=120)  # null: keep the size
        assert same.status_code == 200 and len(live(same.json(), "decode")) == 2
    finally:
        shrunk = httpx.post(url, json={"decode": 1}, headers=key, timeout=120)
    assert shrunk.status_code == 200, shrunk.text
    assert len(live(shrunk.json(), "decode")) == 1
    assert len(live(httpx.get(f"{server.url}/admin/status", headers=key).json(), "decode")) == 1
    settled_pools(server)  # the removed worker drains and leaves


# -- 5. the OpenAPI schema ---------------------------------------------------------------------------
def test_the_openapi_schema_publishes_the_request_bodies(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/admin/scale", "ScaleRequest")):
        op = schema["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
        assert "422" not in op["responses"]
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "prompt" in components["CompletionRequest"]["required"]
    assert components["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    assert components["ScaleRequest"]["properties"]["decode"]["anyOf"][0]["maximum"] == 64
    for path in ("/docs", "/redoc"):
        assert_error(httpx.get(f"{server.url}{path}"), 404)
    # the body is still ours to parse: a bad one is our 400, never FastAPI's 422
    assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": 3}, headers=api()), 400, "prompt")


# -- 6. fuzzing ------------------------------------------------------------------------------------------
def _clamp(body):
    """Keep generations short: any max_tokens (and min_tokens) the fuzzer picks above MAX_TOKENS becomes
    MAX_TOKENS; and keep logit_bias to the tiny model's 256 ids (the schema cannot know the vocabulary)."""
    if isinstance(body, dict):
        for k in ("max_tokens", "max_completion_tokens", "min_tokens"):
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_TOKENS:
                body[k] = MAX_TOKENS
        if isinstance(body.get("logit_bias"), dict):
            body["logit_bias"] = {k: v for k, v in body["logit_bias"].items() if not k.isdecimal() or int(k) < 256}
    return body


def _headers(case) -> dict:
    if case.path.startswith("/admin/"):
        try:  # a valid size would really scale the pools: send it without the admin key (401)
            P.ScaleRequest.model_validate(case.body)
        except ValidationError:
            return api(ADMIN_KEY)  # the body is invalid: it must get our 400
        return {}
    return api()


def test_fuzzing_the_api_never_gets_a_5xx(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen: dict[tuple[str, str, int], int] = {}

    @given(case=cases)
    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.body = _clamp(case.body)
        r = case.call(headers=_headers(case), timeout=30)
        key = (case.method, case.path, r.status_code)
        seen[key] = seen.get(key, 0) + 1
        assert r.status_code < 500, (case.method, case.path, case.body, r.status_code, r.text[:500])
        if r.status_code >= 400:
            err = r.json()["error"]
            assert err["code"] == r.status_code and err["message"] and err["type"], r.text
            assert set(err) == {"message", "type", "param", "code"}, r.text

    run()
    print(sorted(seen.items()))
    served = {path for method, path, status in seen if status == 200}
    assert {"/v1/completions", "/v1/chat/completions"} <= served, seen  # the fuzzer got past validation
    assert any(status == 400 for _, _, status in seen), seen
    server.wait_kv_free()


# Values that once broke the API (each answered a 500): seeds past 64 bits, temperatures and top_p so small that
# the sampler's float32 arithmetic overflows or rounds to 0, unpaired surrogate escapes, non-string text parts.
INTS = st.one_of(st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**30]),
                 st.integers(), st.integers(min_value=-(2**70), max_value=2**70))
FLOATS = st.one_of(st.sampled_from([0.0, 1e-300, 5e-324, 1e-45, 1e-8, 1e300, 2.0, 1.0]), st.floats(),
                   st.floats(min_value=5e-324, max_value=1e-5))  # NaN and infinities: JSON's NaN/Infinity
# (st.text drops surrogates whatever its alphabet; joined lists of characters keep them)
TEXT = st.lists(st.sampled_from(["a", " ", "\n", "{", "é", "\U0001f642", "\ud800", "\udfff"])
                | st.characters(exclude_categories=[]), max_size=12).map("".join)  # unpaired surrogates, often
HOSTILE = st.one_of(INTS, FLOATS, TEXT, st.none(), st.booleans(), st.lists(INTS, max_size=3),
                    st.lists(TEXT, max_size=3), st.dictionaries(TEXT, INTS | TEXT, max_size=2))
_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | HOSTILE},
                              optional={"text": TEXT | HOSTILE})
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]) | HOSTILE},
                                 optional={"content": st.one_of(TEXT, TEXT, st.lists(_PART, max_size=3), HOSTILE)})
# The hostile sizes of issue 14, around each bound: stop lists near their caps (64 strings of 256 characters,
# 256 ids) and far past them, priorities far outside the operator's grant, prompts near and past the body limit
# and the prompt-character bound (the tiny model's context window in characters)
HUGE_STOP = st.one_of(st.integers(60, 5000).map(lambda n: [f"s{k}" for k in range(n)]),
                      st.integers(250, 5000).map(lambda n: ["x" * n]))
HUGE_STOP_IDS = st.integers(250, 5000).map(lambda n: list(range(n)))
HUGE_TEXT = st.integers(1000, MAX_BODY + 1000).map(lambda n: "lorem ipsum " * (n // 12))
PRIORITY = st.sampled_from([-1_000_000, 1_000_000, -(2**63), -1, 1]) | INTS
FIELDS = {
    **dict.fromkeys(["max_tokens", "max_completion_tokens", "top_k", "seed", "n"], INTS),
    "priority": PRIORITY,
    **dict.fromkeys(["temperature", "top_p"], FLOATS),
    **dict.fromkeys(["ignore_eos", "stream"], st.booleans()),
    **dict.fromkeys(["model", "user", "unknown_field"], TEXT),
    "stop": TEXT | st.lists(TEXT, max_size=3) | HUGE_STOP,
    "stop_token_ids": st.lists(INTS, max_size=3) | HUGE_STOP_IDS,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | HOSTILE}),
    "prompt": st.one_of(TEXT, TEXT, TEXT, st.lists(st.integers(min_value=-2, max_value=300), max_size=8),
                        st.lists(TEXT, max_size=2), st.lists(st.lists(INTS, max_size=3), max_size=2), HUGE_TEXT),
    "messages": st.lists(_MESSAGE, max_size=3) | HUGE_TEXT.map(lambda t: [{"role": "user", "content": t}]),
}
_CHAT_ONLY, _COMPLETION_ONLY = {"messages", "max_completion_tokens"}, {"prompt"}


@st.composite
def hostile_requests(draw) -> tuple[str, dict]:
    """A valid request with a few fields swapped for odd values, mostly of the right JSON type."""
    if draw(st.booleans()):
        path, body, main = "/v1/completions", {"prompt": "hello", "max_tokens": 2}, "prompt"
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
        main = "messages"
    others = sorted(set(FIELDS) - _CHAT_ONLY - _COMPLETION_ONLY)
    others += ["max_completion_tokens"] if main == "messages" else []
    fields = draw(st.lists(st.sampled_from(others), max_size=3, unique=True))
    for field in ([main] if draw(st.booleans()) else []) + fields:
        body[field] = draw(HOSTILE if draw(st.integers(0, 4)) == 0 else FIELDS[field])
    return path, _clamp(body)


def _past_a_bound(body: dict) -> bool:
    """The request carries a list past its cap, a string past its length, or a priority outside the
    fixture's grant (the default: only 0): it must be refused, whatever else it holds."""
    stop, ids, prio = body.get("stop"), body.get("stop_token_ids"), body.get("priority")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return (isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS
            or any(isinstance(x, str) and len(x) > MAX_STOP_STRING_CHARS for x in stops)
            or isinstance(ids, list) and len(ids) > MAX_STOP_TOKEN_IDS
            or isinstance(prio, int) and not isinstance(prio, bool) and prio != 0)


def test_fuzzing_request_fields_with_hostile_values_never_gets_a_5xx(server):
    client = httpx.Client(base_url=server.url, headers=api(), timeout=30)

    @given(req=hostile_requests())
    @settings(max_examples=1000, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    def run(req):
        path, body = req
        content = json.dumps(body).encode()
        r = client.post(path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (path, str(body)[:500], r.status_code, r.text[:500])
        if r.status_code >= 400:
            assert_error(r, r.status_code)
        if len(content) > MAX_BODY:
            assert r.status_code == 413, (path, str(body)[:500], r.status_code)
        elif _past_a_bound(body):
            assert r.status_code == 400, (path, str(body)[:500], r.status_code, r.text[:500])

    with client:
        run()
    server.wait_kv_free()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
    ("/v1/completions", {"prompt": "a\ud800b"}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfffb"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text"),
    ("/v1/completions", b"[" * 50_000, None),  # nested past the recursion limit, under the body limit
    ("/v1/completions", b'{"prompt": "a", "top_k": 1' + b"0" * 5000 + b"}", None),  # past int parsing's limit
])
def test_bodies_that_once_got_a_500_get_a_400(server, path, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert_error(httpx.post(f"{server.url}{path}", content=content, headers=api()), 400, param)


def test_a_tiny_temperature_or_top_p_is_greedy(server):
    """logits / 1e-300 overflows to inf, a top_p of 1e-323 rounds to 0 in float32 (each made the engine answer
    500): a temperature below 1e-5 means greedy, and so does any top_p that small (only the top token stays)."""
    body = {"prompt": "hello", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    greedy = httpx.post(f"{server.url}/v1/completions", json={**body, "temperature": 0}, headers=api())
    for extra in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-6},
                  {"top_p": 1e-323, "seed": 3}, {"top_p": 1e-45, "seed": 4}, {"top_p": 1e-9, "seed": 5}):
        tiny = httpx.post(f"{server.url}/v1/completions", json={**body, **extra}, headers=api())
        assert tiny.status_code == 200, (extra, tiny.text)
        assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"], extra
    assert_error(httpx.put(f"{server.url}/v1/completions", headers=api()), 405)  # framework errors: our body too

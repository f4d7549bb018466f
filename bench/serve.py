"""`pdserve bench serve`: a serving load generator for any OpenAI-compatible endpoint.

Sends `--num-prompts` streaming requests to `--base-url` + `--endpoint` with Poisson (or gamma,
`--burstiness`) arrivals at `--request-rate`, or all at once, under `--max-concurrency`; and
reports request and output-token throughput, TTFT, TPOT, ITL and e2e latency (mean, p50, p90,
p99) and goodput: the rate of requests meeting every `--goodput` SLO (DistServe's definition),
overall and per priority class. Flags are named like `vllm bench serve`'s where the meaning is
the same. Datasets: `random` (lengths from ranges), `jsonl` (`{"prompt": ..., "output_len": N}`
per line, optional `"priority"`), `mixed` (steady short requests with occasional long prompts:
the prefill-decode interference case), `shared-prefix` (one long system prompt that every request
shares, then a question of its own: the prefix-caching case) and `multiturn` (`--num-conversations`
conversations of `--num-turns` turns on one shared system prompt, each turn sent with the whole
history, the server's own answers included, once the previous answer has arrived; always over chat
completions; its report splits TTFT between first and later turns). Prompt lengths are in words for
text datasets (the server's `usage` reports the exact token counts; with SmolLM2's tokenizer a word
of the generator's vocabulary is one token). Every dataset is the same for the same `--seed`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORDS = (
    "time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye",
    "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem",
    "fact", "water", "room", "mother", "area", "money", "story", "month", "lot", "right", "study", "book", "job",
    "word", "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour",
    "game", "line", "end", "member", "law", "car", "city", "community", "name", "president", "team", "minute",
    "idea", "kid", "body", "information", "back", "parent", "face", "others", "level", "office", "door", "health",
    "art", "war", "history", "party", "result", "change", "morning", "reason", "research", "girl", "guy", "moment",
    "air", "teacher", "force", "education",
)


@dataclass
class RequestSpec:
    prompt: str  # the user message (chat), or the prompt after `system` (completions)
    output_len: int
    priority: int = 0
    klass: str = "default"
    system: str = ""  # shared-prefix, multiturn: the system prompt every request shares
    conversation: int | None = None  # multiturn: which conversation, and which of its turns (0-based)
    turn: int = 0


@dataclass
class Result:
    spec: RequestSpec
    ok: bool = False
    error: str = ""
    start: float = 0.0  # seconds since the run began
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""  # what the server streamed back (the next turn's assistant message)
    sent: bool = True  # False: a turn after a failed one, never sent (not a request: not counted as failed)

    @property
    def turn(self) -> int:
        return self.spec.turn

    @property
    def conversation(self) -> int | None:
        return self.spec.conversation

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# -- workloads ------------------------------------------------------------------------------------------
def parse_classes(text: str | None) -> list[tuple[str, int, float]]:
    """`urgent:-1:0.2,background:1:0.3` -> [(name, priority, share)]; the rest is class default, 0."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        name, prio, share = part.split(":")
        out.append((name, int(prio), float(share)))
    if sum(s for _, _, s in out) > 1.0 + 1e-9:
        raise ValueError("priority class shares add up to more than 1")
    return out


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def build_workload(args: argparse.Namespace, rng: random.Random) -> list[RequestSpec]:
    classes = parse_classes(args.priority_classes)

    def klass() -> tuple[str, int]:
        u, acc = rng.random(), 0.0
        for name, prio, share in classes:
            acc += share
            if u < acc:
                return name, prio
        return "default", 0

    def length(mean: int, r: float) -> int:
        return max(1, rng.randint(int(mean * (1 - r)), int(mean * (1 + r))))

    r_in = args.random_range_ratio
    r_out = r_in if args.random_output_range_ratio is None else args.random_output_range_ratio

    specs: list[RequestSpec] = []
    if args.dataset_name in ("shared-prefix", "multiturn"):
        system = _words(rng, args.shared_prefix_len) if args.shared_prefix_len > 0 else ""
        if args.dataset_name == "shared-prefix":
            for _ in range(args.num_prompts):
                name, prio = klass()
                specs.append(RequestSpec(_words(rng, length(args.random_input_len, r_in)),
                                         length(args.random_output_len, r_out), prio, name, system))
            return specs
        for c in range(args.num_conversations):
            name, prio = klass()
            specs += [RequestSpec(_words(rng, length(args.random_input_len, r_in)),
                                  length(args.random_output_len, r_out), prio, name, system, c, turn)
                      for turn in range(args.num_turns)]
        return specs
    if args.dataset_name == "jsonl":
        lines = [json.loads(line) for line in Path(args.dataset_path).read_text().splitlines() if line.strip()]
        for i in range(args.num_prompts):
            row = lines[i % len(lines)]
            name, prio = klass()
            specs.append(RequestSpec(row["prompt"], int(row.get("output_len", args.random_output_len)),
                                     int(row.get("priority", prio)), row.get("class", name)))
        return specs
    for _ in range(args.num_prompts):
        name, prio = klass()
        long = args.dataset_name == "mixed" and rng.random() < args.mixed_long_fraction
        prompt_len = length(args.mixed_long_input_len if long else args.random_input_len, r_in)
        specs.append(RequestSpec(_words(rng, prompt_len), length(args.random_output_len, r_out), prio, name))
    return specs


def build_conversations(args: argparse.Namespace, rng: random.Random) -> list[list[RequestSpec]]:
    """The workload as conversations, each sent turn after turn: multiturn's as built, every other dataset's
    requests one to a conversation (so `build_workload` then `arrival_times` give the same requests and times)."""
    specs = build_workload(args, rng)
    if args.dataset_name != "multiturn":
        return [[s] for s in specs]
    conversations: dict[int | None, list[RequestSpec]] = {}
    for s in specs:
        conversations.setdefault(s.conversation, []).append(s)
    return list(conversations.values())


def chat_endpoint(endpoint: str) -> str:
    """`endpoint` if it is a chat one, else its chat sibling: /v1/completions -> /v1/chat/completions."""
    if "chat" in endpoint:
        return endpoint
    path = endpoint.rstrip("/")
    if not path.endswith("/completions"):
        raise ValueError(f"no chat endpoint beside {endpoint!r}: pass --endpoint /v1/chat/completions")
    return path.removesuffix("completions") + "chat/completions"


def arrival_times(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Start offsets: all zero for an infinite rate; else gamma inter-arrivals with mean 1/rate and
    shape `burstiness` (1.0 is a Poisson process; lower is burstier)."""
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


# -- statistics -----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    return {"mean": sum(values) / len(values) * 1e3, "p50": percentile(values, 50) * 1e3,
            "p90": percentile(values, 90) * 1e3, "p99": percentile(values, 99) * 1e3}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:50 e2e:10000` (milliseconds) -> {"ttft": 0.5, ...} seconds."""
    from pdserve.engine.simulator import parse_slos

    return parse_slos(items)


def meets(r: Result, slos: dict[str, float]) -> bool:
    if not r.ok:
        return False
    for name, limit in slos.items():
        v = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}[name]
        if v is not None and v > limit:
            return False
    return True


def figure(reports: list[dict[str, Any]], path: tuple[str, ...] | list[str]) -> list[Any]:
    """One figure from each `report`: `path` leads into its dict, e.g. ("ttft_ms", "p50")."""
    values = []
    for rep in reports:
        for key in path:
            rep = rep[key]
        values.append(rep)
    return values


def turns_report(results: list[Result]) -> dict[str, Any]:
    """Conversations' first turns against their later ones (TTFT, prompt tokens), and the turns not sent."""
    sent = [r for r in results if r.sent]

    def part(rs: list[Result]) -> dict[str, Any]:
        ok = [r for r in rs if r.ok]
        return {"completed": len(ok), "failed": len(rs) - len(ok),
                "ttft_ms": summary_ms([r.ttft for r in ok if r.ttft is not None]),
                "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / len(ok) if ok else float("nan")}

    by_turn = [[r.prompt_tokens for r in sent if r.ok and r.turn == k] for k in range(max(r.turn for r in results) + 1)]
    return {"first": part([r for r in sent if r.turn == 0]), "later": part([r for r in sent if r.turn >= 1]),
            "not_sent": len(results) - len(sent),
            "prompt_tokens_by_turn": [sum(v) / len(v) if v else float("nan") for v in by_turn]}


def report(results: list[Result], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    """The run's figures over the requests sent; with conversations (multiturn), a `turns` section too."""
    everything, results = results, [r for r in results if r.sent]
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    rep: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": out_tokens,
        "ttft_ms": summary_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": summary_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": summary_ms([g for r in ok for g in r.itl]),
        "e2e_ms": summary_ms([r.e2e for r in ok if r.e2e is not None]),
        "goodput": sum(1 for r in results if meets(r, slos)) / duration if duration else 0.0,
        "slos_ms": {k: v * 1e3 for k, v in slos.items()},
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }
    if any(r.conversation is not None or r.turn > 0 for r in everything):
        rep["turns"] = turns_report(everything)
    classes = sorted({r.spec.klass for r in results})
    if len(classes) > 1:
        rep["classes"] = {c: {k: v for k, v in report([r for r in results if r.spec.klass == c], duration, slos)
                              .items() if k not in ("classes", "errors", "turns")} for c in classes}
    return rep


# -- the client -------------------------------------------------------------------------------------------
def parse_sse_line(line: str) -> dict | str | None:
    """One SSE line: a JSON object for `data: {...}`, "[DONE]", or None for anything else."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return None


def chunk_text(obj: dict) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return (c.get("delta") or {}).get("content") or c.get("text") or ""


async def send(client, args, spec: RequestSpec, t0: float, history: list[dict] | None = None) -> Result:
    """One streaming request. Chat: the system message (if any), `history` (the conversation's earlier user and
    assistant messages), then the user message; completions: the system text, a blank line, then the prompt."""
    res = Result(spec, start=time.perf_counter() - t0)
    chat = "chat" in args.endpoint
    body: dict[str, Any] = {"model": args.model, "max_tokens": spec.output_len, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": args.temperature,
                            "ignore_eos": args.ignore_eos, "priority": spec.priority}
    if chat:
        system = [{"role": "system", "content": spec.system}] if spec.system else []
        body["messages"] = system + (history or []) + [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = f"{spec.system}\n\n{spec.prompt}" if spec.system else spec.prompt
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    start = time.perf_counter()
    last = None
    pieces: list[str] = []
    try:
        async with client.stream("POST", args.base_url.rstrip("/") + args.endpoint, json=body,
                                 headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {text[:200]}"
                return res
            async for line in r.aiter_lines():
                obj = parse_sse_line(line)
                if obj is None or obj == "[DONE]":
                    continue
                if "error" in obj:
                    res.error = f"stream error: {obj['error'].get('message', obj['error'])}"[:300]
                    return res
                now = time.perf_counter()
                if text := chunk_text(obj):
                    pieces.append(text)
                    if res.ttft is None:
                        res.ttft = now - start
                    elif last is not None:
                        res.itl.append(now - last)
                    last = now
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                    res.output_tokens = obj["usage"]["completion_tokens"]
        res.e2e = time.perf_counter() - start
        res.text = "".join(pieces)
        res.ok = res.ttft is not None or res.output_tokens > 0
        if not res.ok:
            res.error = "no tokens received"
    except Exception as e:  # connection refused or dropped, timeouts: a failed request, not a crash
        res.error = f"{type(e).__name__}: {e}"[:300]
    return res


async def run(args: argparse.Namespace) -> tuple[list[Result], float]:
    """Send the workload: one task a conversation (a request is a conversation of one turn), started at its
    arrival time; a turn goes once the previous turn's answer has arrived, carrying the history with it, and a
    failed turn ends its conversation (the turns after it come back `sent=False`). `--max-concurrency` bounds
    the requests in flight. Multiturn goes to the chat endpoint beside `--endpoint`."""
    import httpx

    rng = random.Random(args.seed)
    conversations = build_conversations(args, rng)
    offsets = arrival_times(len(conversations), args.request_rate, args.burstiness, rng)
    if args.dataset_name == "multiturn":
        args = argparse.Namespace(**{**vars(args), "endpoint": chat_endpoint(args.endpoint)})
    total = sum(len(c) for c in conversations)
    limit = asyncio.Semaphore(args.max_concurrency or total or 1)
    done = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout),
                                 limits=httpx.Limits(max_connections=args.max_concurrency or 1000)) as client:
        t0 = time.perf_counter()

        def count(n: int) -> None:
            nonlocal done
            done += n
            if not args.json and sys.stderr.isatty() or args.progress:
                bar = int(30 * done / total)
                print(f"\r[{'#' * bar}{'.' * (30 - bar)}] {done}/{total}", end="", file=sys.stderr, flush=True)

        async def converse(turns: list[RequestSpec], offset: float) -> list[Result]:
            delay = offset - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival process: this conversation is not due yet
            history: list[dict] = []
            results: list[Result] = []
            for spec in turns:
                async with limit:
                    r = await send(client, args, spec, t0, history)
                results.append(r)
                count(1)
                if not r.ok:
                    rest = [Result(s, error=f"not sent: turn {r.turn} failed", sent=False)
                            for s in turns[len(results):]]
                    count(len(rest))
                    return results + rest
                history += [{"role": "user", "content": spec.prompt}, {"role": "assistant", "content": r.text}]
            return results

        per_conversation = await asyncio.gather(*(converse(c, o) for c, o in zip(conversations, offsets, strict=True)))
        duration = time.perf_counter() - t0
    if not args.json:
        print(file=sys.stderr)
    return [r for rs in per_conversation for r in rs], duration


def plot(results: list[Result], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (name, values) in zip(axes, [("TTFT", [r.ttft for r in ok if r.ttft is not None]),
                                         ("TPOT", [t for r in ok if (t := r.tpot) is not None]),
                                         ("e2e", [r.e2e for r in ok if r.e2e is not None])], strict=True):
        v = sorted(x * 1e3 for x in values)
        ax.plot(v, [(i + 1) / len(v) for i in range(len(v))] if v else [])
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    cdf = out / "latency_cdf.png"
    fig.savefig(cdf, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    for klass in sorted({r.spec.klass for r in ok}):
        pts = [(r.start, r.tpot * 1e3) for r in ok if r.spec.klass == klass and r.tpot is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, label=klass)
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("TPOT (ms)")
    ax.legend()
    ax.grid(alpha=0.3)
    over_time = out / "tpot_over_time.png"
    fig.savefig(over_time, dpi=100)
    plt.close(fig)
    return [cdf, over_time]


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"completed {rep['completed']}, failed {rep['failed']} in {rep['duration_s']:.1f} s",
             f"request throughput {rep['request_throughput']:.2f} req/s, output {rep['output_throughput']:.1f} tok/s",
             f"goodput {rep['goodput']:.2f} req/s (SLOs ms: {rep['slos_ms'] or 'none'})",
             f"{'':8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = rep[key]
        lines.append(f"{key[:-3].upper():8}" + "".join(f"{s[q]:>10.1f}" for q in ("mean", "p50", "p90", "p99")))
    if turns := rep.get("turns"):
        for name in ("first", "later"):
            t, s = turns[name], turns[name]["ttft_ms"]
            lines.append(f"{name} turns: {t['completed']} ok, {t['failed']} failed, TTFT mean {s['mean']:.0f}, "
                         f"p50/p90/p99 {s['p50']:.0f}/{s['p90']:.0f}/{s['p99']:.0f} ms, prompt "
                         f"{t['prompt_tokens_mean']:.0f} tokens (mean)"
                         + (f"; {turns['not_sent']} not sent after a failed turn" if name == "later" else ""))
    for c, sub in rep.get("classes", {}).items():
        lines.append(f"class {c}: {sub['completed']} ok, TTFT p50/p99 {sub['ttft_ms']['p50']:.0f}/"
                     f"{sub['ttft_ms']['p99']:.0f} ms, TPOT p99 {sub['tpot_ms']['p99']:.1f} ms, goodput "
                     f"{sub['goodput']:.2f} req/s")
    lines += [f"error: {e}" for e in rep["errors"]]
    return "\n".join(lines)


def default_args(**overrides: Any) -> argparse.Namespace:
    """This command's arguments at their defaults, with `overrides` set: for benchmarks that run the load
    generator in-process (`run`). An override that names no argument is a TypeError."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"pdserve bench serve has no argument {key!r}")
        setattr(args, key, value)
    return args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions "
                   "(multiturn always uses the chat one: /v1/completions becomes /v1/chat/completions)")
    p.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset-name", default="random",
                   choices=["random", "jsonl", "mixed", "shared-prefix", "multiturn"])
    p.add_argument("--dataset-path", default=None, help="jsonl: one {\"prompt\", \"output_len\"} per line")
    p.add_argument("--random-input-len", type=int, default=128,
                   help="words per prompt (mean); shared-prefix: per question, multiturn: per user message")
    p.add_argument("--random-output-len", type=int, default=64, help="tokens per request (mean)")
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in mean*(1±r)")
    p.add_argument("--random-output-range-ratio", type=float, default=None,
                   help="output lengths uniform in mean*(1±r) (default: --random-range-ratio)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly the output length (--no-ignore-eos: stop at EOS, as a real user does)")
    p.add_argument("--mixed-long-input-len", type=int, default=2000, help="mixed: the long prompts' length")
    p.add_argument("--mixed-long-fraction", type=float, default=0.1, help="mixed: share of long prompts")
    p.add_argument("--shared-prefix-len", type=int, default=1000, help="shared-prefix, multiturn: words in the "
                   "system prompt all requests share (1,000 words are 1,000 tokens with SmolLM2's tokenizer)")
    p.add_argument("--num-conversations", type=int, default=8, help="multiturn: conversations")
    p.add_argument("--num-turns", type=int, default=4, help="multiturn: user turns per conversation")
    p.add_argument("--priority-classes", default=None, help="name:priority:share,... e.g. urgent:-1:0.2 (a pdserve "
                   "server must grant them: --min-client-priority/--max-client-priority)")
    p.add_argument("--num-prompts", type=int, default=100,
                   help="requests (multiturn ignores it: it sends --num-conversations x --num-turns)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s (multiturn: conversations started per second); inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 is Poisson, lower is burstier")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="*", default=None, metavar="SLO:MS", help="e.g. ttft:500 tpot:50")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.add_argument("--plot", default=None, metavar="DIR", help="write latency CDFs and TPOT over time here")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve bench serve", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.dataset_name == "jsonl" and not args.dataset_path:
        p.error("--dataset-name jsonl needs --dataset-path")
    if args.request_rate <= 0 or args.burstiness <= 0:
        p.error("--request-rate and --burstiness must be positive")
    if args.dataset_name == "multiturn":
        if args.num_conversations < 1 or args.num_turns < 1:
            p.error("--num-conversations and --num-turns must be at least 1")
        try:
            chat_endpoint(args.endpoint)
        except ValueError as e:
            p.error(str(e))
    slos = parse_goodput(args.goodput)
    if args.model is None:
        import httpx

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        args.model = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers).json()["data"][0]["id"]
    results, duration = asyncio.run(run(args))
    rep = report(results, duration, slos)
    if args.plot:
        rep["plots"] = [str(x) for x in plot(results, Path(args.plot))]
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())

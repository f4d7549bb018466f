"""The decode worker's engine loop on a tiny model: concurrent submits, abort, step failure."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from pdserve.engine.config import FaultConfig
from pdserve.engine.llm_engine import InvalidRequestError
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import FinishReason
from pdserve.worker.engine_loop import EngineLoop, EngineStepError
from tests.helpers import GREEDY, BoardWorker, prompts, wait_for


@pytest.fixture
def loop(make_engine, tiny_model_dir):
    lp = EngineLoop(make_engine(tiny_model_dir)).start()
    yield lp
    lp.stop()
    assert not lp.alive


def collect(q: queue.Queue, timeout: float = 60.0):
    """Outputs of one request up to its final one (or an exception)."""
    items = []
    while True:
        item = q.get(timeout=timeout)
        items.append(item)
        if isinstance(item, BaseException) or item.finished:
            return items


def test_concurrent_submits_match_reference(loop, hf_reference):
    ps = prompts()
    queues = [queue.Queue() for _ in ps]
    threads = [threading.Thread(target=loop.submit, args=(f"r{i}", p, GREEDY, q.put))
               for i, (p, q) in enumerate(zip(ps, queues, strict=True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for q, ref in zip(queues, hf_reference, strict=True):
        outs = collect(q)
        assert [tok for o in outs for tok in o.new_token_ids] == ref
        assert outs[-1].finish_reason is FinishReason.LENGTH
    bm = loop.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_mid_stream_frees_blocks(loop):
    q: queue.Queue = queue.Queue()
    loop.submit("long", prompts(lens=[30])[0], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), q.put)
    first = q.get(timeout=60)
    assert not first.finished
    loop.abort("long")
    outs = collect(q)
    assert outs[-1].finish_reason is FinishReason.ABORT and outs[-1].num_output_tokens < 400
    bm = loop.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_bad_input_goes_to_the_sink(loop):
    q: queue.Queue = queue.Queue()
    loop.submit("bad", [], GREEDY, q.put)
    assert isinstance(q.get(timeout=10), InvalidRequestError)


def test_failed_step_fails_requests_frees_blocks_and_loop_survives(loop, monkeypatch):
    engine = loop.engine
    real = engine.execute
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real(plan)

    monkeypatch.setattr(engine, "execute", flaky)
    qs = [queue.Queue() for _ in range(3)]
    for i, q in enumerate(qs):
        loop.submit(f"r{i}", prompts(lens=[10 + i])[0], SamplingParams(max_tokens=50, temperature=0,
                                                                          ignore_eos=True), q.put)
    for q in qs:
        assert isinstance(collect(q)[-1], EngineStepError)
    assert loop.num_step_errors == 1 and loop.alive
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    q = queue.Queue()
    loop.submit("after", prompts(lens=[5])[0], GREEDY, q.put)
    assert collect(q)[-1].finish_reason is FinishReason.LENGTH


def test_a_loop_whose_steps_keep_failing_reports_itself_failing_within_the_window(make_engine, tiny_model_dir):
    """`max_step_errors` failed steps (injected: faults.step_fail_rate) within `step_error_window_s` make the
    loop `failing` (its worker reports it and the router replaces the worker); older ones stop counting."""
    lp = EngineLoop(make_engine(tiny_model_dir), max_step_errors=2, step_error_window_s=1.0,
                    faults=FaultConfig(step_fail_rate=1.0)).start()
    try:
        for i in range(2):
            assert not lp.failing
            q: queue.Queue = queue.Queue()
            lp.submit(f"r{i}", prompts(lens=[5])[0], GREEDY, q.put)
            assert isinstance(collect(q)[-1], EngineStepError)
        assert lp.failing and lp.recent_step_errors == 2 and lp.alive
        wait_for(lambda: not lp.failing, 5.0, "the failed steps to leave the window")
        lp.faults = None
        q = queue.Queue()
        lp.submit("after", prompts(lens=[5])[0], GREEDY, q.put)
        assert collect(q)[-1].finish_reason is FinishReason.LENGTH
        assert not lp.failing and lp.num_step_errors == 2
    finally:
        lp.stop()
    bm = lp.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_loop_under_kv_pressure_preempts_and_keeps_outputs(make_engine, tiny_model_dir, hf_reference, mode):
    engine = make_engine(tiny_model_dir, cache={"block_size": 4, "num_kv_blocks": 40},
                         scheduler={"preemption": mode, "swap_space_blocks": 64})
    lp = EngineLoop(engine).start()
    try:
        queues = [queue.Queue() for _ in hf_reference]
        for i, (p, q) in enumerate(zip(prompts(), queues, strict=True)):
            lp.submit(f"r{i}", p, GREEDY, q.put)
        got = [[tok for o in collect(q) for tok in o.new_token_ids] for q in queues]
    finally:
        lp.stop()
    assert got == hf_reference
    assert engine.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.scheduler.cpu_blocks.num_free_blocks == engine.scheduler.cpu_blocks.num_blocks


def test_an_abort_that_overtakes_its_submit_refuses_the_request(loop):
    """An abort can reach the loop before the request it aborts (a decode worker's abort racing the KV commit
    that submits it): the request is refused when it comes, instead of running to the end unread."""
    loop.abort("late")
    deadline = time.monotonic() + 10
    while "late" not in loop._early_aborts:  # the loop has seen the abort (and found nothing to abort)
        assert time.monotonic() < deadline
        time.sleep(0.005)
    q: queue.Queue = queue.Queue()
    loop.submit("late", prompts(lens=[30])[0], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), q.put)
    (out,) = collect(q)
    assert out.finished and out.finish_reason is FinishReason.ABORT and not out.new_token_ids
    assert "late" not in loop.engine.seqs
    bm = loop.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_sink_that_raises_drops_its_request_and_the_loop_serves_on(loop):
    """A request whose consumer is gone (its sink raises, e.g. on a closed event loop) is dropped and its
    blocks freed; the loop thread survives and every other request goes on."""
    calls = []

    def broken(out):
        calls.append(out)
        raise RuntimeError("Event loop is closed")

    loop.submit("broken", prompts(lens=[30])[0], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True),
                broken)
    q: queue.Queue = queue.Queue()
    loop.submit("fine", prompts(lens=[10])[0], GREEDY, q.put)
    outs = collect(q)
    assert outs[-1].finish_reason is FinishReason.LENGTH and loop.alive
    deadline = time.monotonic() + 10
    while "broken" in loop.engine.seqs:
        assert time.monotonic() < deadline, "the request with the broken sink still runs"
        time.sleep(0.005)
    assert len(calls) == 1  # dropped at its first output, not run to max_tokens
    bm = loop.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_factory_builds_the_engine_on_the_thread_that_steps_it(make_engine, tiny_model_dir):
    # one OpenMP team per thread that runs parallel work: building on one thread and stepping on another
    # leaves two, and libgomp then puts its threads to sleep between every parallel region
    built_on = []

    def build():
        built_on.append(threading.current_thread())
        return make_engine(tiny_model_dir)

    lp = EngineLoop(build, name="factory-loop").start()
    try:
        assert lp.engine is not None and built_on == [lp._thread] and built_on[0] is not threading.current_thread()
        stepped_on = []
        q: queue.Queue = queue.Queue()
        lp.submit("r", prompts()[0], GREEDY, lambda out: (stepped_on.append(threading.current_thread()), q.put(out)))
        assert collect(q)[-1].finish_reason is FinishReason.LENGTH
        assert set(stepped_on) == {built_on[0]}
    finally:
        lp.stop()


def test_a_factory_that_fails_fails_start():
    def build():
        raise OSError("no weights here")

    lp = EngineLoop(build)
    with pytest.raises(OSError, match="no weights here"):
        lp.start()
    assert not lp.alive and lp.engine is None


def test_steps_use_the_threads_the_core_board_grants(make_engine, tiny_model_dir, tmp_path):
    import torch

    from pdserve.worker.core_share import CoreShare

    board = CoreShare(tmp_path / "board", own_threads=1, cores=3)
    other = BoardWorker(tmp_path / "board", cores=3)
    lp = EngineLoop(lambda: make_engine(tiny_model_dir), cores=board).start()
    try:
        def threads_of_a_request(rid: str) -> set[int]:
            seen: set[int] = set()
            q: queue.Queue = queue.Queue()
            lp.submit(rid, prompts()[0], GREEDY, lambda out: (seen.add(torch.get_num_threads()), q.put(out)))
            assert collect(q)[-1].finish_reason is FinishReason.LENGTH
            return seen

        assert threads_of_a_request("alone") == {3}  # the other worker is idle: every core
        other.do("busy")
        assert threads_of_a_request("shared") == {1}  # it is busy: the own share
        assert board.busy_others(time.monotonic()) == 1
    finally:
        lp.stop()
        other.kill()
        board.close()

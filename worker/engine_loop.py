"""The engine loop: one thread that owns an `LLMEngine` and steps it while there is work.

Lifecycle of a request here:
  1. `submit()` (any thread) puts it in the inbox and wakes the loop;
  2. the loop thread adds it to the engine (the scheduler queues it), or hands the
     error (bad input, queue full) to the request's sink;
  3. every step, each request's new tokens go to its sink;
  4. it ends in its final output (finish reason stop/length), in an abort
     (`abort()`, from any thread: its blocks are freed on the loop thread), or in an
     error: a step that raises fails every request in flight, frees all their
     blocks, and the loop keeps serving. An abort that arrives before its request
     is remembered, and the request is refused when it comes.
A loop whose steps keep failing (`max_step_errors` within `step_error_window_s`) says so
(`failing`): its worker reports it in its stats and the router replaces the worker.
The engine is touched only by the loop thread; sinks are called on it too, so
they must be quick (e.g. `loop.call_soon_threadsafe` into asyncio).

Given a factory instead of an engine, the loop builds the engine on its own thread (`start()` waits for
it). Build it there in a server: OpenMP (torch's intra-op pool on CPU) keeps one thread team per thread
that runs parallel work. An engine built on one thread and stepped on another leaves two teams, more
OpenMP threads than cores, and libgomp then stops spinning between parallel regions: every op's
workers sleep and are woken by futex. Measured on 2 cores, the bare engine's burst took 30 % longer that
way, its step threads switching ~70,000 times against ~200.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.engine.config import FaultConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import FinishReason, RequestOutput
from pdserve.worker.core_share import CoreShare

logger = logging.getLogger(__name__)

Sink = Callable[[RequestOutput | BaseException], None]
_EARLY_ABORTS = 4096  # aborts of unknown requests remembered


class EngineStepError(RuntimeError):
    """The engine step running this request failed; the request's KV has been freed. The worker failed, not
    the request: another worker may well serve it (the router migrates it)."""

    retryable = True


class InjectedStepFault(RuntimeError):
    """An engine step failed on purpose (`faults.step_fail_rate`, chaos testing)."""


@dataclass
class _Submit:
    request_id: str
    sink: Sink
    prompt: object = None
    params: SamplingParams | None = None
    received: object = None  # a kv_transfer.pool.ReceivedKV
    options: dict = field(default_factory=dict)


class EngineLoop:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], name: str = "engine-loop", *,
                 max_step_errors: int = 5, step_error_window_s: float = 60.0, faults: FaultConfig | None = None,
                 cores: CoreShare | None = None):
        # cores: the machine's core board; each step then runs with the threads it grants (`worker.core_share`)
        self.cores = cores
        self._threads = 0  # the loop thread's torch threads, once it runs
        # a factory: `start()` builds the engine on the loop thread (see the module's docstring)
        self._factory = None if isinstance(engine, LLMEngine) else engine
        self.engine: LLMEngine = None if self._factory is not None else engine  # type: ignore[assignment]
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._inbox: deque[_Submit] = deque()
        self._aborts: deque[str] = deque()
        # Aborts of requests the loop does not hold (yet): a submit that an abort overtook is refused when it
        # comes. Request ids are never reused, so remembering the last few thousand is enough.
        self._early_aborts: OrderedDict[str, None] = OrderedDict()
        self._sinks: dict[str, Sink] = {}
        self._wake = threading.Condition()
        self._stop = False
        self.last_step_time = time.monotonic()  # heartbeat: advances while the loop lives
        self.num_step_errors = 0
        self.max_step_errors = max_step_errors
        self.step_error_window_s = step_error_window_s
        self._step_errors: deque[float] = deque(maxlen=max_step_errors)  # when the latest ones happened
        self.faults = faults
        # Called on the loop thread after each round (admissions, aborts, a step) has handed its outputs to the
        # sinks: sinks that buffer (the decode worker's subscriptions) send them on then, one batch per round.
        self.on_round_end: Callable[[], None] | None = None
        self._stall_until = 0.0  # chaos: `stall()` freezes the loop thread (a hung kernel, a deadlock)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- any thread --------------------------------------------------------------
    def start(self) -> EngineLoop:
        """Start the loop thread; with a factory, wait until it has built the engine (and raise what the
        factory raised)."""
        self._thread.start()
        if self._factory is not None:
            self._built.wait()
            if self._build_error is not None:
                self._thread.join()
                raise self._build_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, request_id: str, prompt, params: SamplingParams, sink: Sink, **options) -> None:
        """Queue a request: `options` are `add_request`'s keywords (priority, ttft_deadline, detokenize)."""
        self._post(_Submit(request_id, sink, prompt, params, options=options))

    def submit_received(self, request_id: str, received, params: SamplingParams, sink: Sink, **options) -> None:
        """Queue a request whose KV a transfer wrote into this engine's pool (`kv_transfer`).
        From here on the loop owns `received.block_table`: it frees the blocks if admission fails."""
        self._post(_Submit(request_id, sink, None, params, received=received, options=options))

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    def stall(self, seconds: float) -> None:
        """Fault injection: the loop thread stops stepping for `seconds` (it stays alive and holds its
        requests), the way a hung device or a deadlock looks from outside."""
        self._stall_until = time.monotonic() + seconds

    @property
    def has_work(self) -> bool:
        """Requests queued for the loop or in the engine (read without the lock: a hint for health)."""
        return bool(self._inbox) or bool(self._aborts) or self.engine.has_unfinished()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def faults(self) -> FaultConfig:
        return self._faults

    @faults.setter
    def faults(self, faults: FaultConfig | None) -> None:
        """Chaos: the step faults to inject from now on, drawn from a fresh RNG seeded by `faults.seed`."""
        self._faults = faults if faults is not None else FaultConfig()
        self._fault_rng = random.Random(self._faults.seed)

    @property
    def recent_step_errors(self) -> int:
        """Failed steps within the last `step_error_window_s`, up to `max_step_errors` (read without a lock:
        a health report)."""
        cutoff = time.monotonic() - self.step_error_window_s
        return sum(t > cutoff for t in list(self._step_errors))

    @property
    def failing(self) -> bool:
        """Its steps keep failing: `max_step_errors` within the window. The worker is not fit to serve."""
        return self.recent_step_errors >= self.max_step_errors

    def _post(self, item: _Submit) -> None:
        with self._wake:
            self._inbox.append(item)
            self._wake.notify()

    # -- the loop thread -------------------------------------------------------------
    def _run(self) -> None:
        if self._factory is not None:
            try:
                self.engine = self._factory()
            except BaseException as exc:  # start() re-raises it in the caller's thread
                self._build_error = exc
                return
            finally:
                self._built.set()
        engine = self.engine
        while True:
            with self._wake:
                while not (self._stop or self._inbox or self._aborts or engine.has_unfinished()):
                    if self.cores is not None:
                        self.cores.idle()
                    self.last_step_time = time.monotonic()
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    break
                pause = self._stall_until - time.monotonic()
                if pause <= 0:
                    inbox, self._inbox = self._inbox, deque()
                    aborts, self._aborts = self._aborts, deque()
            if pause > 0:  # stalled (chaos): the work stays queued, as behind a hung step
                time.sleep(min(pause, 0.5))
                continue
            for item in inbox:
                self._admit(item)
            for rid in aborts:
                self._abort(rid)
            if engine.has_unfinished():
                if self.cores is not None:
                    self._take_cores()
                self._step()
            self._round_end()
            self.last_step_time = time.monotonic()
        for rid in list(self._sinks):
            self._abort(rid)
        self._round_end()
        with self._wake:
            leftover, self._inbox = self._inbox, deque()
        for item in leftover:  # received KV the loop owns but never admitted
            if item.received is not None:
                with engine.kv_lock:
                    engine.block_manager.free(item.received.block_table)

    def _round_end(self) -> None:
        if self.on_round_end is not None:
            try:
                self.on_round_end()
            except Exception:  # like a failing sink: never the loop thread's end
                logger.warning("the round-end hook failed", exc_info=True)

    def _admit(self, item: _Submit) -> None:
        if self._early_aborts.pop(item.request_id, 0) is None:  # aborted before it arrived
            if item.received is not None:
                with self.engine.kv_lock:
                    self.engine.block_manager.free(item.received.block_table)
            _deliver(item.sink, RequestOutput(item.request_id, [], "", True, FinishReason.ABORT, 0, 0))
            return
        try:
            if item.received is not None:
                self._admit_received(item)
            else:
                self.engine.add_request(item.request_id, item.prompt, item.params, **item.options)
        except Exception as exc:  # bad input, queue full, no room for imported KV: the caller's problem
            _deliver(item.sink, exc)
            return
        self._sinks[item.request_id] = item.sink

    def _admit_received(self, item: _Submit) -> None:
        try:
            self.engine.add_received_request(item.request_id, item.received, item.params, **item.options)
        except Exception:
            with self.engine.kv_lock:
                self.engine.block_manager.free(item.received.block_table)
            raise

    def _abort(self, request_id: str) -> None:
        sink = self._sinks.pop(request_id, None)
        seq = self.engine.seqs.get(request_id)
        if seq is None:
            self._early_aborts[request_id] = None
            while len(self._early_aborts) > _EARLY_ABORTS:
                self._early_aborts.popitem(last=False)
            return
        self.engine.abort(request_id)
        if sink is not None:
            _deliver(sink, RequestOutput(request_id, [], "", True, FinishReason.ABORT, len(seq.prompt_token_ids),
                                         seq.num_output_tokens))

    def _step(self) -> None:
        try:
            if self._faults.step_fail_rate and self._fault_rng.random() < self._faults.step_fail_rate:
                raise InjectedStepFault("injected fault (faults.step_fail_rate)")
            outputs = self.engine.step()
        except Exception as exc:
            self._count_step_error()
            logger.exception("engine step failed; failing the %d requests in flight", len(self._sinks))
            for rid, sink in list(self._sinks.items()):
                self.engine.abort(rid)
                self._sinks.pop(rid, None)
                err = EngineStepError(f"engine step failed: {exc}")
                err.__cause__ = exc
                _deliver(sink, err)
            return
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if out.finished:
                self._sinks.pop(out.request_id, None)
            if sink is not None and not _deliver(sink, out) and not out.finished:
                self._sinks.pop(out.request_id, None)  # its consumer is gone: stop generating for it
                self.engine.abort(out.request_id)

    def _take_cores(self) -> None:
        n = self.cores.threads()
        if n != self._threads:
            torch.set_num_threads(n)  # this thread's OpenMP team (and torch's default)
            self._threads = n

    def _count_step_error(self) -> None:
        self.num_step_errors += 1
        self._step_errors.append(time.monotonic())
        if self.failing:
            logger.error("%d engine steps failed within %gs: this worker reports itself failing",
                         self.max_step_errors, self.step_error_window_s)


def _deliver(sink: Sink, out: RequestOutput | BaseException) -> bool:
    """Hand `out` to a request's sink. A sink that raises (its consumer's event loop closed, say) must not
    take the loop thread, and every other request, down with it: False, and the caller drops the request."""
    try:
        sink(out)
        return True
    except Exception:
        logger.warning("a request's sink failed; dropping the request", exc_info=True)
        return False

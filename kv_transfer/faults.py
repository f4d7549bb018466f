"""Fault injection on the KV plane, for chaos testing (`PdserveConfig.faults`, off by default).

The prefill side's `KVSender` draws one `FaultPlan` per push from a `random.Random(seed)`
it owns (so a run is repeatable: the same seed and the same sequence of pushes fault the
same transfers), and applies it on the real data path of either transport:

  * fail:    the push fails before any KV byte is sent (`InjectedFault`); the sender releases
             the reservation, as on any other sending-side failure (receiver metric reason
             `released`, tombstone reason `injected_fault`).
  * drop:    one chunk (its `LayerChunk` and its bytes, inline or on the channel) is not sent and
             the stream goes on: the receiver sees a gap in the layer's tokens (or a commit with
             a layer incomplete) and refuses it, `MalformedTransfer` (reason `malformed`).
  * corrupt: one chunk's bytes are flipped after its checksum was computed: the receiver refuses
             it, `ChecksumMismatch` (reason `checksum`), before writing it into the pool.
  * delay:   the stream opens `transfer_delay_s` late (after the first layers are ready).

At most one of fail, drop and corrupt applies to a transfer (in that order of precedence);
a delay combines with any of them. Every push draws the same count of random numbers
whatever the outcome, so one transfer's fate never shifts another's. Each fault that is
applied is counted on the sending side in `pdserve_injected_faults_total{transport, fault}`,
which tells injected failures apart from real ones in the receiver's
`pdserve_kv_transfer_failures_total{reason}`.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import torch
from prometheus_client import Counter

from pdserve.engine.config import FaultConfig
from pdserve.kv_transfer.errors import KVTransferError

INJECTED_FAULTS = Counter(
    "pdserve_injected_faults", "Faults injected into KV transfers on the sending side (chaos testing), by kind",
    ["transport", "fault"])

FAIL, DROP, CORRUPT, DELAY = "fail", "drop", "corrupt", "delay"


class InjectedFault(KVTransferError):
    """A KV transfer failed on purpose (`faults.transfer_fail_rate`): nothing was sent, the
    reservation was released. Retryable, like any other `KVTransferError`."""

    reason, code = "injected_fault", "UNAVAILABLE"


@dataclass(frozen=True)
class FaultPlan:
    """What happens to one transfer. `chunk` (drop or corrupt) names the chunk it hits: the
    first one carrying layer `layer` (the one starting at token 0), which every transfer has,
    however its layers are batched and split."""

    fail: bool = False
    chunk: str | None = None  # DROP | CORRUPT | None
    layer: int = 0
    delay_s: float = 0.0

    def hits(self, layer: int, num_layers: int, token_start: int) -> str | None:
        """DROP or CORRUPT if the chunk of layers [layer, layer + num_layers) starting at
        `token_start` is the one this plan hits, else None."""
        if self.chunk is not None and token_start == 0 and layer <= self.layer < layer + num_layers:
            return self.chunk
        return None


class FaultInjector:
    """A `FaultConfig` and the seeded RNG its decisions come from (thread-safe)."""

    def __init__(self, config: FaultConfig | None = None):
        self.config = config if config is not None else FaultConfig()
        self.active = self.config.active
        self._rng = random.Random(self.config.seed)
        self._lock = threading.Lock()

    def plan(self, num_layers: int) -> FaultPlan | None:
        """The next transfer's plan; None when nothing happens to it."""
        c = self.config
        with self._lock:  # always five draws, so one transfer's outcome never shifts the next one's
            fail, drop, corrupt, delay = (self._rng.random() for _ in range(4))
            layer = self._rng.randrange(max(1, num_layers))
        plan = FaultPlan(fail=fail < c.transfer_fail_rate,
                         chunk=DROP if drop < c.transfer_drop_rate else CORRUPT if corrupt < c.transfer_corrupt_rate
                         else None,
                         layer=layer, delay_s=c.transfer_delay_s if delay < c.transfer_delay_rate else 0.0)
        if plan.fail:
            plan = FaultPlan(fail=True, delay_s=plan.delay_s)
        return plan if plan.fail or plan.chunk or plan.delay_s else None


def count(transport: str, fault: str) -> None:
    INJECTED_FAULTS.labels(transport, fault).inc()


def corrupt_wire_bytes(data: bytes, nbytes: int) -> bytes:
    """`encode_chunk_data`'s message with one byte of its payload (the last `nbytes`) flipped."""
    buf = bytearray(data)
    buf[len(buf) - nbytes + nbytes // 2] ^= 0xFF
    return bytes(buf)


def corrupt_tensor(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` with one byte flipped (the sender's source tensors are left alone)."""
    t = t.clone()
    raw = t.reshape(-1).view(torch.uint8)
    raw[raw.numel() // 2:raw.numel() // 2 + 1].bitwise_xor_(0xFF)
    return t


__all__ = ["FaultInjector", "FaultPlan", "InjectedFault", "INJECTED_FAULTS"]

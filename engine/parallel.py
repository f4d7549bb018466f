"""Tensor parallelism (Megatron-style) over torch.distributed: NCCL on CUDA, gloo on CPU, one code path.

A worker with `tp` ranks splits every decoder layer among them:
  * attention by heads: q/k/v are column-parallel (rank r holds heads [r*H/tp, (r+1)*H/tp) and their KV
    heads), o_proj is row-parallel (its input columns of those heads), followed by an all-reduce;
  * the MLP by its intermediate size: gate/up column-parallel, down_proj row-parallel + an all-reduce.
  So a layer costs two all-reduces of `[tokens, hidden]`. Norms, RoPE tables, the embedding and the LM head
  are replicated: the embedding and head are one `vocab x hidden` table (tied on small models) that a
  vocab-parallel split would save at the price of another all-reduce per step and an all-gather of logits;
  kept whole, sampling, logprobs, prompt logprobs and grammar masks stay on rank 0 with no collective
  (ranks > 0 skip an untied head: only rank 0 computes logits). A model whose vocab table does not fit one
  device would need the vocab-parallel split; none that pdserve serves today does.
  Each rank reads only its slices from the safetensors files (`safe_open(...).get_slice`): no rank ever
  holds another rank's shard. KV heads fewer than the ranks are replicated (tp / kv_heads ranks share one,
  as vLLM does); otherwise the head counts must divide by tp (`TensorParallelError` names the numbers).

Execution: rank 0 is the worker's engine (`engine.llm_engine.LLMEngine`: scheduler, sampler, detokenizer,
block bookkeeping); ranks 1..tp-1 run `TPRank.serve`, a loop that executes what rank 0 broadcasts. Every
operation that touches the KV cache or runs the model is one *op*, sent as three broadcasts (sizes, an int64
header, one byte payload of all its tensors, `_pack`), whatever the number of tensors:
  * FORWARD: packed ids, positions, attention metadata (`engine.attention.AttentionMetadata`: plain tensors;
    each rank's model runs it through its own attention backend, built for its heads) and the slots whose
    KV is shipped to a decode worker this step: gathered to rank 0 layer by layer, or, with a shipment id
    (per-rank KV channels: `Shipment`), copied by every rank, its own heads, into its `staged` KV, which the
    KV plane sends from each rank itself (extension ops) until DROP frees it;
  * DROP: a shipment's staged KV is no longer needed (every stream shipping from it is done);
  * SWAP: block pairs between a rank's device pool and its CPU swap pool;
  * WRITE: one layer of KV a transfer brought in (rank 0 scatters the heads: each rank gets its own);
  * READ: a sequence's KV, every rank's heads gathered to rank 0 (`export`);
  * EXTENSION: an op a layer above the engine registers on every rank (`TPRank.extensions`) and sends with
    `ShardedKVCache.extension`: the KV plane's per-rank channels (`kv_transfer.ranks`), through which each
    rank receives its own heads straight from the peer instead of through rank 0's scatter;
  * STOP.
Ops come from the engine loop (forward, swap) and from the KV receiver's thread (write): `TPGroup.lock`
keeps each op's collectives together. KV crosses between workers either rank by rank (the KV plane's per-rank
channels: each rank sends, or receives, its own heads, through EXTENSION ops) or in the whole model's layout
(all KV heads): rank 0 gathers its ranks' shards on send and hands each rank its heads on receive. Either way a
prefill worker with one TP size feeds a decode worker with another (see docs/architecture.md).

A failed collective (a rank died, or missed `ParallelConfig.collective_timeout_s`) breaks the group for good:
every later op raises `TensorParallelFailure`, and the worker reports itself failing (it is replaced).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import socket
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from pdserve.engine.config import TensorParallelError
from pdserve.engine.kv_cache import PagedKVCache

logger = logging.getLogger(__name__)

OP_FORWARD, OP_SWAP, OP_WRITE, OP_READ, OP_STOP, OP_EXTENSION, OP_DROP = range(7)
PROFILE = -1  # in place of the pools' size: rank 0 asks its ranks to run the profiling pass with it first
IDLE_WAIT = datetime.timedelta(days=3650)  # a rank waiting for the next op: no deadline (rank 0 may idle)


class TensorParallelFailure(RuntimeError):
    """A rank of this worker's tensor-parallel group failed; the group (and so the worker) is unusable."""


# -- the split --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shard:
    """Which part of the model rank `rank` of `size` holds (heads, KV heads, intermediate columns)."""

    rank: int
    size: int
    head_dim: int
    heads: tuple[int, int]  # [first, end) query heads
    kv_heads: tuple[int, int]  # [first, end) KV heads (one, shared with other ranks, when replicated)
    inter: tuple[int, int]  # [first, end) of the MLP's intermediate size
    kv_replicas: int  # ranks holding each KV head (1: no replication)

    @classmethod
    def of(cls, arch, rank: int, size: int) -> Shard:
        """Rank `rank`'s part of `arch` (an `engine.model.ModelArch`); `TensorParallelError` if it does not split."""
        check_tp(arch.num_heads, arch.num_kv_heads, arch.intermediate_size, size)
        nh, inter = arch.num_heads // size, arch.intermediate_size // size
        if size <= arch.num_kv_heads:
            kvh, replicas = arch.num_kv_heads // size, 1
            kv0 = rank * kvh
        else:
            kvh, replicas = 1, size // arch.num_kv_heads
            kv0 = rank // replicas
        return cls(rank, size, arch.head_dim, (rank * nh, rank * nh + nh), (kv0, kv0 + kvh),
                   (rank * inter, rank * inter + inter), replicas)

    def local_arch(self, arch):
        """`arch` as this rank's model computes it: its heads, KV heads and intermediate size."""
        return dataclasses.replace(arch, num_heads=self.heads[1] - self.heads[0],
                                   num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
                                   intermediate_size=self.inter[1] - self.inter[0])

    def split(self, name: str) -> tuple[int, int, int] | None:
        """(dimension, start, end) of checkpoint tensor `name` that this rank holds; None: the whole tensor."""
        hd = self.head_dim
        rows = {"q_proj": self.heads, "k_proj": self.kv_heads, "v_proj": self.kv_heads}
        for proj, (a, b) in rows.items():
            if f".self_attn.{proj}." in name:  # column-parallel: output rows (weight and bias)
                return 0, a * hd, b * hd
        if name.endswith(".self_attn.o_proj.weight"):  # row-parallel: input columns
            return 1, self.heads[0] * hd, self.heads[1] * hd
        if name.endswith((".mlp.gate_proj.weight", ".mlp.up_proj.weight")):
            return 0, *self.inter
        if name.endswith(".mlp.down_proj.weight"):
            return 1, *self.inter
        return None

    def read(self, fh, name: str) -> torch.Tensor | None:
        """Checkpoint tensor `name` as this rank holds it, read from an open `safe_open` handle (only its
        slice is read); None for a tensor this rank does not need (an untied LM head on ranks > 0)."""
        if name == "lm_head.weight" and self.rank:
            return None
        split = self.split(name)
        if split is None:
            return fh.get_tensor(name)
        dim, a, b = split
        sl = fh.get_slice(name)
        return sl[a:b] if dim == 0 else sl[:, a:b]

    def iter_slices(self, files):
        """(name, tensor) of every checkpoint tensor this rank holds, one at a time, each read as its slice."""
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    t = self.read(fh, name)
                    if t is not None:
                        yield name, t


def check_tp(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """`TensorParallelError` unless a model with these shapes splits over `size` ranks."""
    if size < 1:
        raise TensorParallelError(f"tensor-parallel size must be at least 1, got {size}")
    if num_heads % size:
        raise TensorParallelError(f"tensor-parallel size {size} does not divide the model's {num_heads} "
                                  f"attention heads")
    if num_kv_heads % size and size % num_kv_heads:
        raise TensorParallelError(f"tensor-parallel size {size} neither divides the model's {num_kv_heads} KV "
                                  f"heads nor is a multiple of them (to replicate each)")
    if intermediate_size % size:
        raise TensorParallelError(f"tensor-parallel size {size} does not divide the model's intermediate size "
                                  f"{intermediate_size}")


def check_parallel(hf_config, config) -> None:
    """`TensorParallelError` unless every pool's tensor-parallel size (`config.parallel`) splits this model."""
    from pdserve.engine.model import ModelArch

    arch = ModelArch.from_hf_config(hf_config)
    roles = ["decode"] + (["prefill"] if config.serve.mode == "disaggregated" else [])
    for role in roles:
        size = config.parallel.tp_for(role)
        try:
            check_tp(arch.num_heads, arch.num_kv_heads, arch.intermediate_size, size)
        except TensorParallelError as e:
            raise TensorParallelError(f"{role} workers: {e}") from None


class RowParallel:
    """A row-parallel linear: this rank's partial product, summed over the ranks (all-reduce)."""

    def __init__(self, linear, tp: TPGroup):
        self.linear = linear
        self.tp = tp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.linear(x).contiguous())


def shard_model(model, tp: TPGroup) -> None:
    """Make a model loaded from a shard (`load_model(..., tp=...)`) sum its row-parallel outputs."""
    for layer in model.layers:
        layer.o = RowParallel(layer.o, tp)
        layer.down = RowParallel(layer.down, tp)


# -- the group --------------------------------------------------------------------------------------------
def listening_store(host: str, timeout_s: float) -> dist.TCPStore:
    """A TCPStore for a rendezvous, listening on `host` only (port chosen by the OS: `store.port`). A TCPStore
    given a host name still listens on every interface, so the socket is bound here and handed over. Used by
    a worker's tensor-parallel ranks (`tp_store`) and by the KV plane's channels (`kv_transfer.channel`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        store = dist.TCPStore(host, port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now, and closes it
    return store


def tp_store(host: str = "127.0.0.1", timeout_s: float = 60.0) -> tuple[dist.TCPStore, int]:
    """Rank 0's rendezvous store, listening on `host` only (ranks share a node), and its port."""
    store = listening_store(host, timeout_s)
    return store, store.port


class TPGroup:
    """One worker's ranks: process groups of their own (not torch.distributed's default group, which the
    `nccl` KV transport's per-pair channels may use) and the lock that keeps each op's collectives together.

    On CUDA the tensors go over NCCL (`pg`) and each op's sizes and header over a gloo group beside it
    (`cpu_pg`), as vLLM does: a rank waits for the next op there without a deadline, which NCCL's watchdog
    would not allow, and reads the header without a device sync. On CPU both are one gloo group."""

    def __init__(self, rank: int, size: int, device: torch.device, host: str, port: int, timeout_s: float,
                 store: dist.Store | None = None):
        self.rank, self.size, self.device = rank, size, torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, None, False, timeout=self.timeout)
        self._store = store
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = self.timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        self.cpu_pg = dist.ProcessGroupGloo(dist.PrefixStore("pdserve-tp/", store), rank, size, opts)
        self.pg = self.cpu_pg
        if self.device.type == "cuda":  # never run yet: no GPU where this was written
            nccl_opts = dist.ProcessGroupNCCL.Options()
            nccl_opts._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(dist.PrefixStore("pdserve-tp-nccl/", store), rank, size, nccl_opts)
        self.lock = threading.RLock()
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """Break the group: every later op raises (a rank is gone; the worker must be replaced)."""
        if self.error is None:
            logger.error("tensor-parallel rank group failed: %s", error)
            self.error = error

    def _run(self, work_fn):
        if self.error is not None:
            raise TensorParallelFailure(f"the tensor-parallel group failed earlier: {self.error}")
        try:
            work_fn().wait()
        except Exception as e:
            self.fail(e)
            raise TensorParallelFailure(f"a tensor-parallel collective failed: {e}") from e

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._run(lambda: self.pg.allreduce([t]))
        return t

    def broadcast(self, t: torch.Tensor, idle: bool = False) -> torch.Tensor:
        """From rank 0, over `pg` (a device tensor on CUDA), or over `cpu_pg` for a CPU tensor; `idle`:
        no deadline (a rank waiting for rank 0's next op)."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        opts.timeout = IDLE_WAIT if idle else self.timeout
        pg = self.cpu_pg if t.device.type == "cpu" else self.pg
        self._run(lambda: pg.broadcast([t], opts))
        return t

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (an all-reduce over the gloo group: a host integer)."""
        t = torch.tensor([value], dtype=torch.long)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        opts.timeout = self.timeout
        self._run(lambda: self.cpu_pg.allreduce([t], opts))
        return int(t[0])

    def scatter(self, out: torch.Tensor, parts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Rank r's `parts[r]` (given on rank 0; same shapes) into `out` on every rank."""
        opts = dist.ScatterOptions()
        opts.rootRank = 0
        opts.timeout = self.timeout
        inputs = [[p.contiguous() for p in parts]] if self.rank == 0 else []
        self._run(lambda: self.pg.scatter([out], inputs, opts))
        return out

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `t` (same shape everywhere) on rank 0, in rank order; None on the other ranks."""
        t = t.contiguous()
        out = [[torch.empty_like(t) for _ in range(self.size)]] if self.rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        opts.timeout = self.timeout
        self._run(lambda: self.pg.gather(out, [t], opts))
        return out[0] if self.rank == 0 else None

    # -- ops: rank 0 sends, the others receive ------------------------------------------------------
    def send(self, op: int, items: list) -> None:
        """Rank 0: broadcast one op (call with `lock` held, together with the op's own collectives)."""
        header: list[int] = [op]
        tensors: list[torch.Tensor] = []
        _pack(items, header, tensors)
        payload = _payload(tensors, self.device)
        self.broadcast(torch.tensor([len(header), payload.numel()], dtype=torch.long))
        self.broadcast(torch.tensor(header, dtype=torch.long))
        if payload.numel():
            self.broadcast(payload)

    def receive(self) -> tuple[int, list]:
        """Ranks > 0: the next op and its items (waits without a deadline)."""
        sizes = self.broadcast(torch.empty(2, dtype=torch.long), idle=True).tolist()
        header = self.broadcast(torch.empty(sizes[0], dtype=torch.long)).tolist()
        payload = torch.empty(sizes[1], dtype=torch.uint8, device=self.device)
        if sizes[1]:
            self.broadcast(payload)
        items, _, _ = _unpack(header, 1, payload, 0)
        return header[0], items

    def gather_heads(self, shard: Shard, local: torch.Tensor) -> torch.Tensor | None:
        """`[2, n, local kv heads, head_dim]` from every rank -> `[2, n, all kv heads, head_dim]` on rank 0
        (replicated KV heads taken once)."""
        parts = self.gather(local)
        if parts is None:
            return None
        return torch.cat(parts[::shard.kv_replicas], dim=2)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)
_NONE, _INT, _TENSOR, _LIST, _TUPLE, _BOOL = range(6)


def _pack(obj, header: list[int], tensors: list[torch.Tensor]) -> None:
    """A tree of None, bools, ints, tensors, lists and tuples as int64 header entries (+ its tensors)."""
    if obj is None:
        header.append(_NONE)
    elif isinstance(obj, bool):
        header += [_BOOL, int(obj)]
    elif isinstance(obj, int):
        header += [_INT, obj]
    elif isinstance(obj, torch.Tensor):
        header += [_TENSOR, _DTYPES.index(obj.dtype), obj.dim(), *obj.shape]
        tensors.append(obj)
    elif isinstance(obj, (list, tuple)):
        header += [_LIST if isinstance(obj, list) else _TUPLE, len(obj)]
        for item in obj:
            _pack(item, header, tensors)
    else:
        raise TypeError(f"cannot send a {type(obj).__name__} to tensor-parallel ranks")


def _payload(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tensors' bytes in one buffer, each padded to 8 bytes (so each can be viewed back in place)."""
    parts = []
    for t in tensors:
        b = t.detach().contiguous().view(-1).view(torch.uint8).to(device)
        parts.append(b)
        if b.numel() % 8:
            parts.append(torch.zeros(8 - b.numel() % 8, dtype=torch.uint8, device=device))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)


def _unpack(header: list[int], i: int, payload: torch.Tensor, off: int):
    tag = header[i]
    if tag == _NONE:
        return None, i + 1, off
    if tag in (_INT, _BOOL):
        return (header[i + 1] if tag == _INT else bool(header[i + 1])), i + 2, off
    if tag == _TENSOR:
        dtype, ndim = _DTYPES[header[i + 1]], header[i + 2]
        shape = header[i + 3:i + 3 + ndim]
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        t = payload[off:off + nbytes].view(dtype).view(shape)
        return t, i + 3 + ndim, off + -(-nbytes // 8) * 8
    n, i = header[i + 1], i + 2
    items = []
    for _ in range(n):
        item, i, off = _unpack(header, i, payload, off)
        items.append(item)
    return (items if tag == _LIST else tuple(items)), i, off


def meta_items(meta) -> list:
    return [getattr(meta, f.name) for f in dataclasses.fields(meta)]


def meta_from_items(cls, items: list):
    """The `AttentionMetadata` rank 0 sent."""
    return cls(**{f.name: v for f, v in zip(dataclasses.fields(cls), items, strict=True)})


# -- rank 0 ---------------------------------------------------------------------------------------------------
class ShardedKVCache(PagedKVCache):
    """Rank 0's KV pool (its own heads); every change is mirrored on the other ranks' pools through an op.
    `write_layer` takes (and `export` returns) KV with every KV head of the model, as KV transfer moves it."""

    def __init__(self, tp: TPGroup, shard: Shard, pool_id: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tp, self.shard, self.pool_id = tp, shard, pool_id
        # layer -> the KV shipped this step (`TPModel`): every head (gathered), or this rank's (a shipment)
        self.shipped: dict[int, torch.Tensor] = {}
        self._drops: list[int] = []  # shipments released since the last op (sent with the next forward)
        self._drops_lock = threading.Lock()

    def drop_later(self, ship_id: int) -> None:
        """Free shipment `ship_id`'s staged KV on every rank, with the next forward pass (from any thread, at
        once: a sender's loop must not wait for the group's lock)."""
        with self._drops_lock:
            self._drops.append(ship_id)

    def take_drops(self) -> list[int]:
        with self._drops_lock:
            drops, self._drops = self._drops, []
        return drops

    def copy_blocks_to(self, dst: PagedKVCache, pairs: list[tuple[int, int]]) -> None:
        with self.tp.lock:
            self.tp.send(OP_SWAP, [self.pool_id, dst.pool_id, torch.tensor(pairs, dtype=torch.long).view(-1, 2)])
            super().copy_blocks_to(dst, pairs)

    def write_layer(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """`kv`: `[2, n, all KV heads, head_dim]`; each rank receives its heads only (a scatter)."""
        kv = kv.to(device=self.device, dtype=self.dtype)
        size, replicas, kvh = self.tp.size, self.shard.kv_replicas, self.num_kv_heads
        parts = [kv[:, :, (r // replicas) * kvh:(r // replicas + 1) * kvh] for r in range(size)]
        mine = torch.empty_like(parts[0], memory_format=torch.contiguous_format)
        with self.tp.lock:
            self.tp.send(OP_WRITE, [layer, slots])
            super().write_layer(layer, slots, self.tp.scatter(mine, parts))

    def extension(self, ext: int, items: list, local):
        """Run extension op `ext` (registered on every other rank: `TPRank.extensions`) with `items` there, and
        `local()` here, together (their collectives matched, the group's lock held); returns `local()`'s value."""
        with self.tp.lock:
            self.tp.send(OP_EXTENSION, [ext, *items])
            return local()

    def export(self, block_table: list[int], num_tokens: int) -> list[torch.Tensor]:
        self._check_table(block_table, num_tokens)
        slots = self.slots(block_table, 0, num_tokens).to(self.device)
        with self.tp.lock:
            self.tp.send(OP_READ, [self.pool_id, slots])
            return [self.tp.gather_heads(self.shard, _read(self, layer, slots)) for layer in range(self.num_layers)]


def _read(kv: PagedKVCache, layer: int, slots: torch.Tensor) -> torch.Tensor:
    return torch.stack([kv.k[layer].index_select(0, slots), kv.v[layer].index_select(0, slots)])


class Shipment:
    """One forward pass's shipped KV, held by every rank (its own heads: rank 0 in the streams' layers, the others
    in their `staged`) for the KV plane's per-rank channels, until each of the `users` streams shipping from it
    has released it; then the ranks drop theirs (`ShardedKVCache.drop_later`)."""

    def __init__(self, kv: ShardedKVCache, ship_id: int, users: int):
        self.kv, self.ship_id, self.users = kv, ship_id, users
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            last = self.users == 0
        if last:
            self.kv.drop_later(self.ship_id)


class TPModel:
    """Rank 0's model: each forward pass is broadcast to the other ranks first, then run here in step with
    them (the row-parallel layers' all-reduces). `arch` is the whole model's, `shard_arch` this rank's."""

    def __init__(self, model, arch, tp: TPGroup, shard: Shard):
        self.model, self.arch, self.tp, self.shard = model, arch, tp, shard
        self.shard_arch = model.arch
        self.kv: ShardedKVCache | None = None  # set by the engine once its pool exists
        self._ship_ids = 0

    def shipment(self, users: int) -> Shipment:
        """A new shipment id for the next forward pass's shipped KV, staged on every rank (`forward(ship_id=)`)."""
        self._ship_ids += 1
        return Shipment(self.kv, self._ship_ids, users)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def use_fused_ops(self, ops) -> None:
        self.model.use_fused_ops(ops)

    def forward(self, input_ids, positions, meta, kv_k, kv_v, on_layer=None, ship_slots=None,
                ship_id: int = 0) -> torch.Tensor:
        """As `LlamaModel.forward`; `ship_slots`: the slots whose KV is put in `kv.shipped[layer]` as each layer
        completes, before `on_layer(layer)`: every head, gathered from every rank; with `ship_id` (a `Shipment`'s)
        this rank's heads only, every other rank keeping its own in its `staged[ship_id]`."""
        kv = self.kv

        def hook(i: int) -> None:
            if ship_slots is not None:
                local = _read(kv, i, ship_slots)
                kv.shipped[i] = local if ship_id else self.tp.gather_heads(self.shard, local)
            if on_layer is not None:
                on_layer(i)

        with self.tp.lock:
            for sid in kv.take_drops() if kv is not None else ():
                self.tp.send(OP_DROP, [sid])
            self.tp.send(OP_FORWARD, [input_ids, positions, ship_slots, ship_id, meta_items(meta)])
            return self.model.forward(input_ids, positions, meta, kv_k, kv_v, on_layer=hook)

    def stop(self) -> None:
        """Send the other ranks home (their `TPRank.serve` returns)."""
        if self.tp.error is None:
            with self.tp.lock:
                self.tp.send(OP_STOP, [])


# -- ranks 1..tp-1 ------------------------------------------------------------------------------------------
class TPRank:
    """A rank > 0: its shard of the model and of the KV pools, executing rank 0's ops (`serve`)."""

    def __init__(self, config, model_path, tp: TPGroup):
        from pdserve.engine.attention import AttentionMetadata
        from pdserve.engine.llm_engine import attach_attention, linear_kernels, pick_device, pick_dtype
        from pdserve.engine.model import load_model

        if config.engine.num_threads:
            torch.set_num_threads(config.engine.num_threads)
        self.tp, self.config = tp, config
        self.device = pick_device(config.model.device)
        self.dtype = pick_dtype(config.model.dtype, self.device)
        self.model, _ = load_model(model_path, self.device, self.dtype,
                                   linear_kernels(config.engine.attention_backend, self.device, self.dtype), tp=tp)
        self.shard = self.model.shard
        self.attention = attach_attention(self.model, config.engine.attention_backend, config.cache.block_size,
                                          self.device, self.dtype, config.model.max_model_len
                                          or self.model.full_arch.max_position_embeddings, tensor_parallel=True)
        self._meta_cls = AttentionMetadata
        self.kv = self.swap_kv = None
        # extension id -> handler(rank, items), for OP_EXTENSION: registered by the layer that sends them
        self.extensions: dict[int, Callable[[TPRank, list], None]] = {}
        self.staged: dict[int, dict[int, torch.Tensor]] = {}  # shipment id -> layer -> this rank's heads' KV

    def serve(self) -> None:
        """Build the KV pools rank 0 sized (after a profiling pass with it, on CUDA), then run ops until STOP (or a
        failure, which is raised)."""
        arch = self.model.arch
        while True:
            num_blocks, swap_blocks, block_size = self.tp.broadcast(torch.empty(3, dtype=torch.long),
                                                                    idle=True).tolist()
            if num_blocks != PROFILE:
                break
            self._profile(swap_blocks, block_size)  # then rank 0 sends the pools' size
        shape = (arch.num_layers, num_blocks, block_size, arch.num_kv_heads, arch.head_dim, self.dtype)
        self.kv = PagedKVCache(*shape, self.device)
        pools = [self.kv]
        if swap_blocks:
            self.swap_kv = PagedKVCache(arch.num_layers, swap_blocks, *shape[2:], torch.device("cpu"))
            pools.append(self.swap_kv)
        while True:
            op, items = self.tp.receive()
            if op == OP_STOP:
                return
            if op == OP_FORWARD:
                self._forward(*items)
            elif op == OP_SWAP:
                src, dst, pairs = items
                pools[src].copy_blocks_to(pools[dst], [tuple(p) for p in pairs.tolist()])
            elif op == OP_WRITE:
                layer, slots = items
                kv = torch.empty(2, slots.numel(), arch.num_kv_heads, arch.head_dim, dtype=self.dtype,
                                 device=self.device)
                self.kv.write_layer(layer, slots, self.tp.scatter(kv))
            elif op == OP_READ:
                pool, slots = items
                for layer in range(arch.num_layers):
                    self.tp.gather(_read(pools[pool], layer, slots))
            elif op == OP_EXTENSION and items[0] in self.extensions:
                self.extensions[items[0]](self, items[1:])
            elif op == OP_DROP:
                self.staged.pop(items[0], None)
            else:
                raise TensorParallelFailure(f"unknown op {op}")

    def _profile(self, num_blocks: int, block_size: int) -> None:
        """The profiling pass (`LLMEngine._num_kv_blocks`, CUDA): rank 0's forward of the largest step, run here
        on this rank's shard into a profiling pool of `num_blocks`; then how many KV blocks this device has room
        for, of which the group takes the smallest (never run here: no CUDA device where this was written)."""
        from pdserve.engine.memory import DeviceMemory, KVCacheTooSmall, kv_cache_blocks

        arch, cc = self.model.arch, self.config.cache
        meter = DeviceMemory(self.device)
        meter.reset()
        self.kv = PagedKVCache(arch.num_layers, num_blocks, block_size, arch.num_kv_heads, arch.head_dim,
                               self.dtype, self.device)
        op, items = self.tp.receive()
        if op != OP_FORWARD:
            raise TensorParallelFailure(f"op {op} during the profiling pass")
        self._forward(*items)
        snap = meter.snapshot()
        profile_bytes = self.kv.data.numel() * self.kv.data.element_size()
        self.kv = None
        per_block = PagedKVCache.bytes_per_block(arch.num_layers, block_size, arch.num_kv_heads, arch.head_dim,
                                                 self.dtype)
        try:
            mine = kv_cache_blocks(snap.total_bytes, cc.gpu_memory_utilization, snap.peak_in_use_bytes - profile_bytes,
                                   per_block)
        except KVCacheTooSmall as e:  # rank 0 raises it for the group (a 0 here makes the minimum 0)
            logger.error("tensor-parallel rank %d: %s", self.tp.rank, e)
            mine = 0
        self.tp.min_over_ranks(mine)

    def _forward(self, ids, positions, ship_slots, ship_id, meta_fields) -> None:
        meta = meta_from_items(self._meta_cls, meta_fields)

        def hook(i: int) -> None:
            if ship_slots is None:
                return
            if ship_id:
                self.staged.setdefault(ship_id, {})[i] = _read(self.kv, i, ship_slots)
            else:
                self.tp.gather(_read(self.kv, i, ship_slots))

        self.model.forward(ids, positions, meta, self.kv.k, self.kv.v, on_layer=hook)

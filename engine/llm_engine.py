"""The model-execution engine shared by prefill and decode workers.

`LLMEngine.step()` is one iteration: the scheduler (`engine.scheduler`, pure
policy) decides which tokens run and which KV blocks move; the engine copies
swapped blocks, runs one packed forward pass, samples, and finishes sequences,
freeing every block they held. `execute(plan)` runs a plan built elsewhere.

KV hand-over between engines (disaggregated serving, see `kv_transfer`):
  * prefill side: `add_request(..., kv_sink=stream)` makes a prefill-only
    request. When its prefill completes, its KV goes to `stream` layer by layer
    (during the forward pass when `kv_transfer.layerwise`, else right after it),
    then its first token (`stream.commit`); the request then finishes with
    reason `prefilled` and its blocks are freed here;
  * decode side: `add_received_request` adopts blocks a transfer wrote into this
    engine's pool (`kv_lock` guards the block manager against the receiver's
    thread).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path

import torch

from pdserve.engine.attention import AttentionBackend, AttentionMetadata, make_backend
from pdserve.engine.block_manager import BlockManager, NoFreeBlocksError
from pdserve.engine.config import PdserveConfig, SchedulerConfig
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.kernels import KernelBuildError
from pdserve.engine.kernels import load as load_kernels
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.memory import DeviceMemory, KVCacheTooSmall, kv_cache_blocks
from pdserve.engine.messages import TokenLogprob
from pdserve.engine.model import load_model, mkldnn_bf16_linear_available
from pdserve.engine.model_source import ModelSource, load_tokenizer, resolve_model
from pdserve.engine.parallel import PROFILE, ShardedKVCache, TPGroup, TPModel
from pdserve.engine.platform import cpu_has_fast_bf16, keep_freed_memory
from pdserve.engine.sampler import HostReads, advance_generator, make_generator, sample
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import MeasuredStepCost, Scheduler
from pdserve.engine.sequence import FinishReason, RequestOutput, Sequence
from pdserve.engine.streams import transfer_stream
from pdserve.engine.structured import GrammarCompiler, GrammarState, apply_masks

logger = logging.getLogger(__name__)

PROMPT_LOGPROBS_CHUNK = 256  # prompt positions whose [positions, vocab] logits are materialised at once


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA (fp16 where bf16 is unsupported); on CPU bf16 where the CPU multiplies bf16
    natively (AVX-512-BF16, AMX) and oneDNN's packed bf16 GEMM runs, else fp32 (emulated bf16 is slower)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() and mkldnn_bf16_linear_available() else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def linear_kernels(backend: str, device: torch.device, dtype: torch.dtype):
    """The kernel library's ops (`torch.ops.pdserve`) for the model's bf16 linears (`engine.model.Linear`'s tiled
    layout): bf16 on CPU where `backend` uses the library (auto, cpu_kernel), it loads, and it was built for
    AVX-512-BF16; else None. Decided before the model loads: it picks the weights' layout."""
    if dtype != torch.bfloat16 or device.type != "cpu" or backend not in ("auto", "cpu_kernel"):
        return None
    try:
        load_kernels()
    except KernelBuildError:
        return None  # `attach_attention` warns, and takes the torch path
    ops = torch.ops.pdserve
    return ops if ops.bf16_linear_supported() else None


def attach_attention(model, backend: str, block_size: int, device: torch.device, dtype: torch.dtype,
                     max_model_len: int, tensor_parallel: bool = False) -> AttentionBackend:
    """The attention backend for `model`'s heads (a tensor-parallel rank's share), set on the model, with the
    fused bf16 ops of its library where it has them. Under tensor parallelism rank 0 sends each step's metadata
    to the other ranks: FlashInfer's planned wrappers cannot travel, so `auto` takes the torch path on CUDA
    there, and `flashinfer` is refused."""
    arch = model.arch
    if tensor_parallel and device.type == "cuda":
        if backend == "flashinfer":
            raise ValueError("attention_backend flashinfer does not run with tensor parallelism yet: use torch")
        backend = "torch" if backend == "auto" else backend
    attention = make_backend(backend, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                             head_dim=arch.head_dim, block_size=block_size, device=device, dtype=dtype,
                             max_blocks_per_seq=-(-max_model_len // block_size))
    model.attention = attention
    if attention.fused_ops is not None:  # the C++ library's fused bf16 ops, with its kernels
        model.use_fused_ops(attention.fused_ops)
    return attention


class LLMEngine:
    def __init__(self, config: PdserveConfig | None = None, *, source: ModelSource | None = None,
                 tp: TPGroup | None = None):
        """`tp`: this engine is rank 0 of a tensor-parallel group (`engine.parallel`), whose other ranks run
        `TPRank.serve`; it holds its shard of the model and of the KV pools."""
        self.config = config = config or PdserveConfig()
        if config.engine.num_threads:
            torch.set_num_threads(config.engine.num_threads)
        self.source = source or resolve_model(config.model.model, Path(config.model.cache_dir))
        self.device = pick_device(config.model.device)
        self.dtype = pick_dtype(config.model.dtype, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        t0 = time.perf_counter()
        self.tp = tp if tp is not None and tp.size > 1 else None
        # bf16 on CPU with the kernel library built for AVX-512-BF16: its GEMM (it decides the linears' layout)
        linear_ops = linear_kernels(config.engine.attention_backend, self.device, self.dtype)
        model, self.hf_config = load_model(self.source.path, self.device, self.dtype, linear_ops, tp=self.tp)
        self.tokenizer = load_tokenizer(self.source.path)
        arch = self.arch = model.full_arch  # the whole model (what KV transfer moves)
        local = self.local_arch = model.arch  # this rank's part of it (all of it without tensor parallelism)
        logger.info("loaded %s in %.1fs", self.source.model_id, time.perf_counter() - t0)

        self.max_model_len = min(config.model.max_model_len or arch.max_position_embeddings,
                                 arch.max_position_embeddings)
        cc = config.cache
        # attention over the paged cache (`engine.attention`, per EngineConfig.attention_backend), for the heads
        # the model computes in this process
        self.attention = attach_attention(model, config.engine.attention_backend, cc.block_size, self.device,
                                          self.dtype, self.max_model_len, tensor_parallel=self.tp is not None)
        self.model = model if self.tp is None else TPModel(model, arch, self.tp, model.shard)
        # Shipped KV stays on each rank, which sends its own heads on the KV plane's per-rank channels
        # (`kv_transfer.ranks`), instead of being gathered to rank 0
        kt = config.kv_transfer
        self.per_rank_kv = self.tp is not None and kt.per_rank_channels  # over either transport
        self._shipment = None  # this step's (`engine.parallel.Shipment`), with `per_rank_kv`
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, cc.block_size, enable_caching=cc.enable_prefix_caching)
        self.transfer = transfer_stream(self.device)  # KV shipped to other engines is copied on it
        # CUDA graphs write their padding rows' KV into one extra block the block manager never hands out
        graphed = (self.device.type == "cuda" and not config.engine.enforce_eager
                   and self.attention.supports_cuda_graphs and self.tp is None)
        swap_blocks = config.scheduler.swap_space_blocks
        shape = (arch.num_layers, cc.block_size, local.num_kv_heads, arch.head_dim, self.dtype)
        if self.tp is None:
            self.kv = PagedKVCache(arch.num_layers, num_blocks + int(graphed), *shape[1:], self.device)
            self.swap_kv = PagedKVCache(arch.num_layers, swap_blocks, *shape[1:],
                                        torch.device("cpu")) if swap_blocks else None
        else:  # every rank's pools have these sizes (its own heads)
            self.kv = ShardedKVCache(self.tp, model.shard, 0, arch.num_layers, num_blocks, *shape[1:], self.device)
            self.swap_kv = ShardedKVCache(self.tp, model.shard, 1, arch.num_layers, swap_blocks, *shape[1:],
                                          torch.device("cpu")) if swap_blocks else None
            self.model.kv = self.kv
            with self.tp.lock:
                self.tp.broadcast(torch.tensor([num_blocks, swap_blocks, cc.block_size]))
        self.graphs = None  # decode CUDA graphs (`engine.cuda_graphs`)
        if graphed:
            from pdserve.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes

            sizes = graph_batch_sizes(config.engine.cuda_graph_batch_sizes, config.scheduler.max_num_seqs)
            self.graphs = DecodeGraphs(self.model, self.kv.k, self.kv.v, self.attention, sizes,
                                       padding_block=num_blocks)
            self.graphs.capture()
        self.step_cost = MeasuredStepCost()  # learns this machine's step times (TTFT-deadline admission)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.step_cost)
        # Held while blocks are allocated or freed: the KV receiver reserves from this pool on its
        # own thread. Never held across a forward pass.
        self.kv_lock = threading.RLock()
        self._kv_sinks: dict[str, object] = {}  # prefill-only requests: where their KV goes
        eos = self.hf_config.eos_token_id
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

        # structured outputs: compiled grammars (cached; workers compile off the loop thread) and each
        # structured request's matcher
        self.grammars = GrammarCompiler(self.tokenizer, arch.vocab_size, self.eos_token_ids)
        self._grammar_states: dict[str, GrammarState] = {}

        self.seqs: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._prompt_lps: dict[str, list[TokenLogprob]] = {}  # prompt logprobs until the first output
        self._rng = random.Random(config.engine.seed)  # seeds of unseeded requests' generators
        self._pending_prompt_lps: list = []  # prompt logprobs queued on the step's HostReads
        self.last_progress = time.monotonic()  # the last layer a forward pass finished (see `forward`)

    def _num_kv_blocks(self) -> int:
        """The KV pool's size: `cache.num_kv_blocks` if set; else on CUDA what the profiling pass leaves of
        `gpu_memory_utilization` of the device, on CPU `kv_cache_memory_gb` (see `engine.memory`)."""
        cc, arch = self.config.cache, self.arch
        # per rank: its own heads' share (tensor parallelism), every rank's pool the same number of blocks
        per_block = PagedKVCache.bytes_per_block(arch.num_layers, cc.block_size, self.local_arch.num_kv_heads,
                                                 arch.head_dim, self.dtype)
        if cc.num_kv_blocks:
            return cc.num_kv_blocks
        if self.device.type != "cuda":
            return max(1, int(cc.kv_cache_memory_gb * 2**30) // per_block)
        if self.tp is not None:  # every rank profiles the step on its shard; the pool is what the tightest has room for
            return self._num_kv_blocks_tp(per_block)
        meter = DeviceMemory(self.device)
        meter.reset()
        profile_kv_bytes = self.profile_step()
        snap = meter.snapshot()
        num_blocks = kv_cache_blocks(snap.total_bytes, cc.gpu_memory_utilization,
                                     snap.peak_in_use_bytes - profile_kv_bytes, per_block)
        logger.info("KV cache: %d blocks (%.2f GiB); the largest step peaked at %.2f GiB of the device's %.2f GiB",
                    num_blocks, num_blocks * per_block / 2**30, snap.peak_in_use_bytes / 2**30,
                    snap.total_bytes / 2**30)
        return num_blocks

    def _num_kv_blocks_tp(self, per_block: int) -> int:
        """`_num_kv_blocks` for a tensor-parallel group on CUDA: its ranks (waiting for their pools' size in
        `TPRank.serve`) are asked to profile with rank 0; each measures its own device's peak during the same
        forward pass, and the pool gets the minimum over the ranks of the blocks each has room for (an
        all-reduce). Never run here: no CUDA device where this was written."""
        cc = self.config.cache
        meter = DeviceMemory(self.device)
        with self.tp.lock:
            self.tp.broadcast(torch.tensor([PROFILE, sum(-(-n // cc.block_size) for n in self._profile_lengths()),
                                            cc.block_size]))
            meter.reset()
            profile_kv_bytes = self.profile_step()
            snap = meter.snapshot()
            error = None
            try:
                mine = kv_cache_blocks(snap.total_bytes, cc.gpu_memory_utilization,
                                       snap.peak_in_use_bytes - profile_kv_bytes, per_block)
            except KVCacheTooSmall as e:
                error, mine = e, 0
            num_blocks = self.tp.min_over_ranks(mine)
        if error is not None:
            raise error
        if num_blocks < 1:
            raise KVCacheTooSmall("a tensor-parallel rank's device has no room for the KV cache after the weights "
                                  "and the largest step (its log says how much is missing)", missing_bytes=per_block)
        logger.info("KV cache: %d blocks per rank (%.2f GiB on rank 0; the minimum over the %d ranks)", num_blocks,
                    num_blocks * per_block / 2**30, self.tp.size)
        return num_blocks

    def _profile_lengths(self) -> list[int]:
        """The sequences of the profiling pass's step: `max_num_batched_tokens` tokens, at most `max_model_len` each."""
        total = self.config.scheduler.max_num_batched_tokens
        return [min(self.max_model_len, total - s) for s in range(0, total, self.max_model_len)]

    def profile_step(self) -> int:
        """Run the largest step the scheduler can plan, once, through the real forward pass (attention,
        kernels and all): `max_num_batched_tokens` prompt tokens (in sequences of at most `max_model_len`)
        into a KV cache of their own, then the logits of `max_num_seqs` rows. Nothing of it stays: the
        engine's pool and scheduler are not touched (it runs before they exist, on CUDA). Returns the bytes
        of the KV cache it used, which the caller subtracts from the measured peak (the real pool replaces it)."""
        sc, bs, arch = self.config.scheduler, self.config.cache.block_size, self.arch
        total = sc.max_num_batched_tokens
        lengths = self._profile_lengths()
        blocks = BlockManager(sum(-(-n // bs) for n in lengths), bs, enable_caching=False)
        plan = []
        for i, n in enumerate(lengths):
            seq = Sequence(f"profile-{i}", [0] * n, SamplingParams(max_tokens=1))
            seq.block_table = blocks.allocate(blocks.blocks_for(n))
            plan.append((seq, n))
        kv = PagedKVCache(arch.num_layers, blocks.num_blocks, bs, self.local_arch.num_kv_heads, arch.head_dim,
                          self.dtype, self.device)  # this rank's heads (all of them without tensor parallelism)
        # `_attention_metadata` reads the pool's geometry from these: the profile's own, for the pass
        saved = getattr(self, "kv", None), getattr(self, "block_manager", None)
        self.kv, self.block_manager = kv, blocks
        try:
            meta = self._attention_metadata(plan)
            ids = torch.zeros(total, dtype=torch.long, device=self.device)
            positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
            hidden = self.model.forward(ids, positions, meta, kv.k, kv.v)
            rows = torch.arange(min(sc.max_num_seqs, total), device=self.device)
            self.model.logits(hidden.index_select(0, rows))
        finally:
            self.kv, self.block_manager = saved
        return kv.data.numel() * kv.data.element_size()

    @property
    def waiting(self) -> list[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # -- requests ------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int] | list[dict]) -> list[int]:
        """Token ids for a completion prompt (str or ids) or chat messages (list of dicts)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            self._need_tokenizer()
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, str):
            self._need_tokenizer()
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int] | list[dict], params: SamplingParams,
                    *, arrival_time: float | None = None, priority: int = 0, ttft_deadline: float | None = None,
                    detokenize: bool = True, kv_sink=None, output_token_ids: list[int] | None = None,
                    fork_of: str | None = None) -> Sequence:
        """Queue a request. `priority`: lower runs first; `ttft_deadline`: seconds from arrival
        by which the first token is due (SLA-aware admission). `kv_sink` (a
        `kv_transfer.source.LayerStream`) makes it prefill-only (see the module docstring).
        `output_token_ids` resumes a request another worker was generating (migration): those
        tokens count as already generated and already streamed (their text is not emitted again);
        prompt and outputs are prefilled together, as after a recompute preemption.
        `fork_of`: the id of a request of the same prompt running here (parallel sampling, n > 1): this one
        shares its prompt KV (`Scheduler.fork`) and prefills only the last block's tokens; when that request
        is gone or preempted, this one prefills its whole prompt.
        Raises `InvalidRequestError`, or `QueueFullError` when the scheduler's overload
        policy refuses it."""
        ids = self.encode_prompt(prompt)
        outputs = list(output_token_ids or [])
        self._validate(request_id, ids, outputs, params)
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop", f"{self.source.path} has no tokenizer, so stop strings cannot match")
        now = time.monotonic()
        arrival = now if arrival_time is None else arrival_time
        if outputs and len(outputs) >= params.max_tokens:
            raise InvalidRequestError("max_tokens", "the resumed request has already generated max_tokens")
        seq = Sequence(request_id, ids, params, arrival_time=arrival, priority=priority, output_token_ids=outputs,
                       deadline=None if ttft_deadline is None else arrival + ttft_deadline)
        parent = self.seqs.get(fork_of) if fork_of is not None and not outputs else None
        grammar = self._grammar_state(seq)
        if grammar is not None:  # in place before the scheduler can pick the request
            self._grammar_states[request_id] = grammar
        try:
            with self.kv_lock:
                self.scheduler.add(seq, now, fork_from=parent)
        except BaseException:
            self._grammar_states.pop(request_id, None)
            raise
        self._register(seq, detokenize)
        if outputs and request_id in self._detok:
            self._detok[request_id].replay(outputs)  # already streamed: advance past their text silently
        if kv_sink is not None:
            self._kv_sinks[request_id] = kv_sink
        return seq

    def add_received_request(self, request_id: str, received, params: SamplingParams,
                             *, priority: int = 0, detokenize: bool = True) -> Sequence:
        """Admit a request whose KV a transfer already wrote into this engine's pool:
        `received` is a `kv_transfer.pool.ReceivedKV`, whose blocks become the sequence's.
        On error the caller still owns (and must free) the blocks."""
        seq = self._handed_over(request_id, received.prompt_token_ids, received.output_token_ids,
                                received.num_tokens, params, priority)
        if len(received.block_table) != self.block_manager.blocks_for(received.num_tokens):
            raise InvalidRequestError("kv", "the block table does not match the token count")
        grammar = self._grammar_state(seq)  # replays the first token, which the prefill worker sampled under it
        seq.block_table = list(received.block_table)
        seq = self._adopt(seq, received.num_tokens, detokenize)
        if grammar is not None:
            self._grammar_states[request_id] = grammar
        return seq

    def _grammar_state(self, seq: Sequence) -> GrammarState | None:
        """The matcher of a structured request, having consumed the tokens it already has (compiled here
        unless a worker compiled it beforehand, off this thread)."""
        so = seq.params.structured
        return None if so is None else self.grammars.state(so, seq.output_token_ids)

    def _handed_over(self, request_id: str, prompt: list[int], outputs: list[int], num_kv_tokens: int,
                     params: SamplingParams, priority: int) -> Sequence:
        """The sequence of a request whose KV was computed elsewhere, checked (not yet admitted)."""
        self._validate(request_id, prompt, outputs, params)
        seq = Sequence(request_id, list(prompt), params, arrival_time=time.monotonic(),
                       output_token_ids=list(outputs), priority=priority)
        if seq.num_tokens - num_kv_tokens != 1:
            raise InvalidRequestError("kv", f"KV covers {num_kv_tokens} of {seq.num_tokens} tokens; "
                                      "exactly the newest token may be uncomputed")
        return seq

    def _adopt(self, seq: Sequence, num_computed: int, detokenize: bool) -> Sequence:
        seq.num_computed_tokens = num_computed
        with self.kv_lock:
            self.scheduler.cache_computed(seq)  # the arrived KV is as reusable as KV computed here
        self.scheduler.add_running(seq)
        self._register(seq, detokenize)
        if seq.request_id in self._detok:
            self._detok[seq.request_id].replay(seq.output_token_ids)
        return seq

    def count_prefix_lookup(self, num_tokens: int, num_cached: int) -> None:
        """Count a prefix-cache lookup made outside the scheduler (a KV reservation for a request prefilled
        elsewhere) in the scheduler's counters, from any thread."""
        with self.kv_lock:
            self.scheduler.prefix_cache_queries += num_tokens
            self.scheduler.prefix_cache_hits += num_cached

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        self._finish(seq, FinishReason.ABORT)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reconfigure_scheduler(self, config: SchedulerConfig) -> None:
        """Swap in a scheduler with another policy (benchmarks compare policies on one loaded model)."""
        if self.has_unfinished():
            raise RuntimeError("cannot change the scheduler while requests are in flight")
        if config.swap_space_blocks != self.config.scheduler.swap_space_blocks:
            raise ValueError("the swap pool size is fixed when the engine starts")
        self.config = self.config.replace(scheduler=config)
        self.scheduler = Scheduler(config, self.block_manager, self.step_cost)

    # -- one iteration -------------------------------------------------------
    def step(self, now: float | None = None) -> list[RequestOutput]:
        now = time.monotonic() if now is None else now
        with self.kv_lock:
            out = self.scheduler.schedule(now)
            if out.swap_out:  # before the lock goes: the KV receiver may reuse the blocks the swap freed
                self.kv.copy_blocks_to(self.swap_kv, out.swap_out)
        for seq, _ in out.scheduled:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        if out.swap_in:
            self.swap_kv.copy_blocks_to(self.kv, out.swap_in)
        if not out.scheduled:
            return []
        t0 = time.perf_counter()
        outputs = self.execute(out.scheduled)
        decode = sum(1 for _, n in out.scheduled if n == 1)
        self.step_cost.observe(sum(n for _, n in out.scheduled) - decode, decode, time.perf_counter() - t0)
        return outputs

    def execute(self, plan: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """Run `plan` (sequence, number of its next tokens to compute) as one forward pass,
        sample for every sequence whose known tokens are now all computed, and finish
        sequences that stop. Block tables must already cover the planned tokens."""
        reads = HostReads()  # the step's one device-to-host transfer (see engine.sampler)
        sampled, logits = self.forward(plan, reads)
        if not sampled:
            reads.fetch()
            self._resolve_prompt_logprobs(reads)
            return []
        if self._grammar_states:  # structured outputs: each grammar row's bitmask, applied in one call
            apply_masks(logits, [self._grammar_states.get(s.request_id) for s in sampled])
        tokens, logprobs = sample(logits, sampled, [self._generator(s) for s in sampled], self.eos_token_ids, reads)
        self._resolve_prompt_logprobs(reads)
        with self.kv_lock:
            return [self._append_token(seq, tok, lp) for seq, tok, lp in zip(sampled, tokens, logprobs, strict=True)]

    def forward(self, plan: list[tuple[Sequence, int]],
                reads: HostReads | None = None) -> tuple[list[Sequence], torch.Tensor | None]:
        """The forward pass of `execute`: computes the planned tokens' KV and returns the
        sequences due a new token with their float32 logits `[len(sequences), vocab]`. Prompt logprobs
        the plan computes are queued on `reads` (`execute` fetches them with the sampled tokens); without
        `reads` they are fetched here."""
        # single-token entries first, by context length: batched decode attention (see AttentionMetadata)
        plan = sorted(plan, key=lambda e: (e[1] != 1, e[0].num_computed_tokens if e[1] == 1 else 0))
        ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []  # (seq, first position, its row, rows)
        for seq, n in plan:
            start = seq.num_computed_tokens
            last = len(seq.prompt_token_ids) - 1  # positions before it predict a prompt token
            if seq.params.prompt_logprobs is not None and start < last and not seq.num_output_tokens:
                prompt_rows.append((seq, start, len(ids), min(start + n, last) - start))
            ids.extend(seq.token_slice(start, start + n))
            positions.extend(range(start, start + n))
            if start + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)
        dev = self.device
        ship = self._kv_to_ship(plan)
        if (self.graphs is not None and not ship and not prompt_rows and len(sampled) == len(plan)
                and all(n == 1 for _, n in plan) and self.graphs.can_run(len(plan))):
            return sampled, self._forward_graphed(plan, ids, positions)
        meta = self._attention_metadata(plan)
        layerwise = bool(ship) and self.config.kv_transfer.layerwise
        def on_layer(i: int) -> None:  # a heartbeat finer than a step (stall detection), and layer-wise shipping
            self.last_progress = time.monotonic()
            if layerwise:
                self._ship_layer(ship, i)

        # tensor parallelism: the KV to ship is gathered from every rank as the layers complete, or with per-rank
        # KV channels staged on every rank (its own heads), each rank sending its own (`Shipment`)
        tp_ship = {}
        if ship and self.tp is not None:
            tp_ship["ship_slots"] = torch.cat([slots for _, slots in ship])
            self._shipment = self.model.shipment(len(ship)) if self.per_rank_kv else None
            if self._shipment is not None:
                tp_ship["ship_id"] = self._shipment.ship_id
        hidden = self.model.forward(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta,
                                    self.kv.k, self.kv.v, on_layer=on_layer, **tp_ship)
        if ship and not layerwise:
            for i in range(self.arch.num_layers):
                self._ship_layer(ship, i)
        if ship:  # the next step may reuse the shipped blocks: its writes queue behind the copies (on the device)
            self.transfer.compute_waits(self.transfer.record())
        with self.kv_lock:
            for seq, n in plan:
                seq.num_computed_tokens += n
                self.scheduler.cache_computed(seq)  # full blocks join the prefix cache
        if prompt_rows:
            own = reads is None
            if own:
                reads = HostReads()
            self._prompt_logprobs(hidden, prompt_rows, reads)
            if own:
                reads.fetch()
                self._resolve_prompt_logprobs(reads)
        if not sampled:
            return [], None
        return sampled, self.model.logits(hidden.index_select(0, torch.tensor(sample_rows, device=dev)))

    def _forward_graphed(self, plan: list[tuple[Sequence, int]], ids: list[int], positions: list[int]) -> torch.Tensor:
        """A decode-only step replayed in its batch-size bucket's CUDA graph (`engine.cuda_graphs`): the logits of
        every row."""
        hidden = self.graphs.run([(s.block_table, s.num_computed_tokens, 1) for s, _ in plan], ids, positions)
        self.last_progress = time.monotonic()
        with self.kv_lock:
            for seq, n in plan:
                seq.num_computed_tokens += n
                self.scheduler.cache_computed(seq)
        return self.model.logits(hidden)

    def _prompt_logprobs(self, hidden: torch.Tensor, prompt_rows: list[tuple[Sequence, int, int, int]],
                         reads: HostReads) -> None:
        """The raw model's log-softmax at the prompt positions this step computed, for the requests that asked
        (`SamplingParams.prompt_logprobs`): each position's next prompt token and the k most likely ones, queued on
        `reads` (`_resolve_prompt_logprobs` files them once fetched). Kept per request until its first output
        carries them (position p's entry is index p: a prefill cut into chunks, or recomputed after a preemption,
        fills the list in order)."""
        pending = self._pending_prompt_lps = []
        for seq, start, row, count in prompt_rows:
            k = seq.params.prompt_logprobs
            for r0 in range(0, count, PROMPT_LOGPROBS_CHUNK):  # [rows, vocab] float32 a chunk at a time
                n = min(PROMPT_LOGPROBS_CHUNK, count - r0)
                rows = torch.arange(row + r0, row + r0 + n, device=self.device)
                lp = torch.log_softmax(self.model.logits(hidden.index_select(0, rows)), dim=-1)
                nxt = seq.prompt_token_ids[start + r0 + 1:start + r0 + 1 + n]
                chosen = lp.gather(1, torch.tensor(nxt, device=self.device)[:, None]).squeeze(1)
                top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0])
                pending.append((seq, start + r0, nxt, reads.add(chosen), reads.add(top_i), reads.add(top_v)))

    def _resolve_prompt_logprobs(self, reads: HostReads) -> None:
        pending, self._pending_prompt_lps = self._pending_prompt_lps, []
        for seq, pos, nxt, h_chosen, h_ids, h_values in pending:
            acc = self._prompt_lps.setdefault(seq.request_id, [])
            del acc[pos:]
            for t, c, ti, tv in zip(nxt, reads[h_chosen], reads[h_ids], reads[h_values], strict=True):
                acc.append(TokenLogprob(t, c, tuple(zip((int(i) for i in ti), tv, strict=True))))

    def _kv_to_ship(self, plan: list[tuple[Sequence, int]]) -> list[tuple[object, torch.Tensor]]:
        """Prefill-only sequences whose prompt completes in this step, with the slots of the KV to ship."""
        if not self._kv_sinks:
            return []
        ship = []
        for seq, n in plan:
            sink = self._kv_sinks.get(seq.request_id)
            if sink is not None and seq.num_computed_tokens + n == seq.num_tokens:
                # only what the receiver lacks: it may hold the first `token_start` tokens' blocks already
                slots = self.kv.slots(seq.block_table, sink.token_start, seq.num_tokens).to(self.device)
                self.transfer.hold(slots)  # read on the transfer stream
                ship.append((sink, slots))
        return ship

    def _ship_layer(self, ship: list[tuple[object, torch.Tensor]], layer: int) -> None:
        """Hand layer `layer`'s KV of each shipped sequence to its sink, copied on the transfer stream once the
        compute stream has written it (`engine.streams`: on CUDA the host waits for nothing here; the sender
        waits for the layer's event, once, on its own thread). Staged in pinned host memory for the grpc
        transport, kept on the device for nccl."""
        if self.tp is not None:  # every rank's heads, gathered during the forward pass (`TPModel.forward`),
            kv, start = self.kv.shipped.pop(layer), 0  # or this rank's, the others staged on their ranks
            shipment = self._shipment
            for sink, slots in ship:
                staged = {"staged": (shipment, start)} if shipment is not None else {}
                sink.put_layer(layer, kv[:, start:start + len(slots)].contiguous(), **staged)
                start += len(slots)
            return
        xfer = self.transfer
        k, v = self.kv.k[layer], self.kv.v[layer]
        to_host = self.config.kv_transfer.kv_transport == "grpc"
        staged = []
        with xfer.use(after=xfer.record_compute()):  # after this layer's KV write
            for sink, slots in ship:
                kv = torch.stack([k.index_select(0, slots), v.index_select(0, slots)])
                staged.append((sink, xfer.to_host(kv) if to_host else kv))
            ready = xfer.record()
        for sink, kv in staged:
            sink.put_layer(layer, kv, ready)

    def _attention_metadata(self, plan: list[tuple[Sequence, int]]) -> AttentionMetadata:
        """The backend's metadata for a plan sorted decode rows first (see `forward`)."""
        d = sum(1 for _, n in plan if n == 1)
        return self.attention.metadata([(s.block_table, s.num_computed_tokens, n) for s, n in plan], d)

    # -- bookkeeping -----------------------------------------------------------
    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        # The heartbeat covers the work after the forward pass too (detokenizing, stop checks): a step
        # that is slow there is told apart from a hung one.
        self.last_progress = time.monotonic()
        p = seq.params
        seq.output_token_ids.append(token)
        prompt_lps = self._prompt_lps.pop(seq.request_id, None) if seq.num_output_tokens == 1 else None
        new_text = ""
        reason = None
        detok = self._detok.get(seq.request_id)
        if detok is not None:
            new_text, hit = detok.add([token])
            if hit is not None:
                reason, seq.stop_reason = FinishReason.STOP, hit
        grammar = self._grammar_states.get(seq.request_id)
        if grammar is not None and reason is None and (not grammar.accept(token) or grammar.terminated):
            # complete (EOS, which the mask allows only there, or the grammar's end on a model without
            # EOS); a token the grammar refused (never expected: it was masked) ends it too
            reason, seq.stop_reason = FinishReason.STOP, token if token in self.eos_token_ids else None
        if reason is None:
            if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_set:
                reason, seq.stop_reason = FinishReason.STOP, token
            elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = FinishReason.LENGTH
        sink = self._kv_sinks.get(seq.request_id)
        if sink is not None and reason is None:  # prefill-only: decoding continues on a decode worker
            self._kv_sinks.pop(seq.request_id)
            sink.commit(seq.prompt_token_ids, seq.output_token_ids)
            reason = FinishReason.PREFILLED
        if reason is not None:
            # A prefill-only request goes on on a decode worker, which replays this token to the same
            # held-back state (stop strings): releasing the held tail here would stream it twice.
            if detok is not None and reason is not FinishReason.PREFILLED:
                new_text += detok.flush()
            self._finish(seq, reason)
        if detok is not None:
            seq.output_text = detok.text
        out = RequestOutput(seq.request_id, [token], new_text, seq.finished, seq.finish_reason,
                            len(seq.prompt_token_ids), len(seq.output_token_ids))
        if logprob is not None:
            out.logprobs = [logprob]
        out.prompt_logprobs = prompt_lps
        if seq.first_scheduled_time is not None:
            out.queue_time = seq.first_scheduled_time - seq.arrival_time
        if seq.finished:
            out.output_token_ids = seq.output_token_ids  # the sequence is gone: no one else mutates it
            out.output_text = seq.output_text
        return out

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        sink = self._kv_sinks.pop(seq.request_id, None)
        if sink is not None:  # finished (or aborted) before its KV was handed over
            sink.finish(reason.value)
        with self.kv_lock:
            self.scheduler.finish(seq, reason)  # frees every device and swap block it held
        self.seqs.pop(seq.request_id, None)
        self._grammar_states.pop(seq.request_id, None)
        self._generators.pop(seq.request_id, None)
        self._detok.pop(seq.request_id, None)
        self._prompt_lps.pop(seq.request_id, None)

    def _register(self, seq: Sequence, detokenize: bool) -> None:
        self.seqs[seq.request_id] = seq
        if self.tokenizer is not None and (detokenize or seq.params.stop):
            self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids,
                                                                 seq.params.stop)

    def _generator(self, seq: Sequence) -> torch.Generator:
        g = self._generators.get(seq.request_id)
        if g is None:
            seed = seq.params.seed
            if seed is None:
                seed = self._rng.getrandbits(62)
            g = self._generators[seq.request_id] = make_generator(seed, self.device)
            if seq.params.seed is not None and not seq.params.greedy:
                # Tokens sampled elsewhere (a prefill worker's first token, a migrated request's stream) each took
                # one draw from this seed's stream: skip them, so a seeded request samples what it would have in
                # one engine, in every mode and across migrations.
                advance_generator(g, self.arch.vocab_size, seq.num_output_tokens, self.device)
        return g

    def _validate(self, request_id: str, ids: list[int], outputs: list[int], params: SamplingParams) -> None:
        """A request's prompt and the tokens it already has (migrated, or handed over with its KV: those come
        from another process, so they are range-checked like the prompt), and its parameters that need the
        vocabulary."""
        num_outputs = len(outputs)
        if request_id in self.seqs:
            raise InvalidRequestError("request_id", f"request id {request_id!r} is already in use")
        if not ids:
            raise InvalidRequestError("prompt", "the prompt is empty")
        if len(ids) + num_outputs >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"the prompt has {len(ids) + num_outputs} tokens; this model's context window is "
                f"{self.max_model_len} tokens, leaving no room for output")
        vocab = self.arch.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError("prompt", f"token ids must be in [0, {vocab})")
        if outputs and (min(outputs) < 0 or max(outputs) >= vocab):
            raise InvalidRequestError("output_token_ids", f"token ids must be in [0, {vocab})")
        params.check_vocab(vocab, self.eos_token_ids)
        if self.block_manager.blocks_for(len(ids) + num_outputs + 1) > self.block_manager.num_blocks:
            raise InvalidRequestError("prompt", f"the prompt has {len(ids)} tokens; the KV cache holds only "
                                      f"{self.block_manager.num_blocks * self.block_manager.block_size}")

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise InvalidRequestError("prompt", f"{self.source.path} has no tokenizer; pass token ids")

    def shutdown(self) -> None:
        """Send the other tensor-parallel ranks home (their `TPRank.serve` returns); nothing without them."""
        if self.tp is not None:
            self.model.stop()

    # -- convenience -------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run prompts to completion together (one ragged batch, then batched decode)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        base = len(self.seqs) + time.monotonic_ns()
        rids = [f"gen-{base}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(rids, prompts, params_list, strict=True):
            self.add_request(rid, prompt, p)
        self.scheduler.input_closed = True  # static/dynamic batching: no more requests are coming
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in rids]


__all__ = ["LLMEngine", "InvalidRequestError", "NoFreeBlocksError"]

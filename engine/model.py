"""A Llama-family decoder (Llama, SmolLM2; Qwen2-style QKV bias by flag) over a paged KV cache.

One forward pass takes a *packed* batch: the tokens of every scheduled
sequence concatenated with no padding (ragged batching). The first
`num_decode` tokens are single decode tokens of distinct sequences; the rest
are prefill chunks, each attending to its sequence's earlier KV (chunked
prefill) and causally to itself. Linear layers see one `[num_tokens, hidden]`
matrix; only attention knows the sequence boundaries.

Weights on CPU are stored in a layout that lets every thread stream weights
during small-batch decode (see `Linear`); on CUDA the standard `[out, in]`
layout is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttentionBackend, AttentionMetadata
from pdserve.engine.model_source import iter_safetensors


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: True; Llama: config.attention_bias

    @classmethod
    def from_hf_config(cls, cfg) -> ModelArch:
        if cfg.model_type not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"unsupported model type {cfg.model_type!r} (supported: llama, qwen2, mistral)")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {cfg.hidden_act!r}")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            model_type=cfg.model_type,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
        )


def mkldnn_bf16_linear_available() -> bool:
    """Whether oneDNN's packed bf16 linear runs here (checked once, on a tiny case)."""
    global _MKLDNN_BF16
    if _MKLDNN_BF16 is None:
        try:
            w = torch.ones(8, 16, dtype=torch.bfloat16)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=torch.bfloat16), packed, None, "none",
                                                   [None], "")
            _MKLDNN_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and bool((y == 16).all())
        except (AttributeError, RuntimeError):
            _MKLDNN_BF16 = False
    return _MKLDNN_BF16


_MKLDNN_BF16: bool | None = None


TILE_OUTPUTS = 32  # outputs per block of the tiled bf16 layout (engine/kernels: kLinearBlock)


def tile_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """`[out, in]` -> `[ceil(out/32), ceil(in/2), 32, 2]`, zero-padded: for each block of 32 outputs, the pairs of
    consecutive inputs of all 32 side by side (the layout `torch.ops.pdserve.bf16_linear` reads)."""
    n, k = weight.shape
    blocks, pairs = -(-n // TILE_OUTPUTS), -(-k // 2)
    w = F.pad(weight, (0, pairs * 2 - k, 0, blocks * TILE_OUTPUTS - n))
    return w.view(blocks, TILE_OUTPUTS, pairs, 2).permute(0, 2, 1, 3).contiguous()


class Linear:
    """y = x W^T + b.

    Four layouts, chosen when the model loads:
      * CUDA: the standard `[out, in]` weight and `F.linear`.
      * CPU, bf16, with the engine's compiled kernels (`tiled`, `linear_ops` given): the weight tiled for
        VDPBF16PS (`tile_bf16_weight`) and multiplied by `torch.ops.pdserve.bf16_linear`, which streams it
        once for up to 8 rows: batch-1 decode ~1.25x faster than oneDNN's packed GEMM (SmolLM2, 2 threads),
        and no slower up to 512 rows.
      * CPU, bf16, without them (`packed`): the weight reordered once into oneDNN's blocked layout and
        multiplied with its bf16 GEMM (the kernel torch's inductor uses for frozen bf16 linears).
        On AVX-512-BF16 it runs SmolLM2's projections 2.5-3x faster than the best fp32 path at
        every batch size from 1 to 512 tokens, and the blocking hint does not matter.
      * CPU, fp32 (`parts`): the weight transposed and split along the output into `parts` slabs
        `[parts, in, out / parts]`, one per torch thread: MKL runs a small-batch GEMM on a single
        thread however many it is given, so one `bmm` over the slabs is what puts every thread to
        work streaming weights. Measured on SmolLM2's projections, 2 threads: a batch-1 pass over
        all layers 26 -> 19 ms, batch 32 84 -> 62 ms. Large batches (prefill) are compute-bound and
        use one GEMM per slab.
    """

    SMALL_BATCH = 64

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: int, linear_ops=None):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = None
        self.tiled = None
        if linear_ops is not None and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
            self.tiled = tile_bf16_weight(weight)
            self._tiled_linear = linear_ops.bf16_linear
            self.bias = None if bias is None else bias.float().contiguous()
            self.weight = None
            self.parts = 0
            return
        if parts and weight.dtype == torch.bfloat16 and mkldnn_bf16_linear_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
            self.weight = None
            self.parts = 0
            return
        if parts and self.out_features % parts:
            parts = 1
        self.parts = parts
        if parts:  # [parts, in, out / parts]
            self.weight = weight.t().reshape(self.in_features, parts, -1).permute(1, 0, 2).contiguous()
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiled is not None:
            y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
            self._tiled_linear(y, x if x.stride(-1) == 1 else x.contiguous(), self.tiled, self.bias)
            return y
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")
        p = self.parts
        if not p:
            return F.linear(x, self.weight, self.bias)
        n = x.shape[0]
        if p == 1:
            y = x @ self.weight[0]
        elif n <= self.SMALL_BATCH:
            y = torch.bmm(x.expand(p, n, self.in_features), self.weight).transpose(0, 1).reshape(n, self.out_features)
        else:
            y = torch.cat([x @ w for w in self.weight], dim=1)
        return y + self.bias if self.bias is not None else y

    def rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Rows `ids` of the original `[out, in]` weight (a tied head doubling as the embedding), or None
        where the layout is opaque (`packed`): the caller keeps its own copy then."""
        if self.tiled is not None:  # [blocks, pairs, 32, 2]: row n is block n // 32, lane n % 32
            rows = self.tiled[ids // TILE_OUTPUTS, :, ids % TILE_OUTPUTS, :].reshape(ids.shape[0], -1)
            return rows[:, :self.in_features].contiguous()
        if self.packed is not None:
            return None
        if not self.parts:
            return self.weight.index_select(0, ids)
        width = self.out_features // self.parts
        return self.weight[ids // width, :, ids % width]


class DecoderLayer:
    def __init__(self, arch: ModelArch, w: dict[str, torch.Tensor], prefix: str, parts: int, linear_ops=None):
        a = f"{prefix}self_attn."
        qkv_w = torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]])
        qkv_b = (torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
                 if arch.qkv_bias else None)
        m = f"{prefix}mlp."
        self.qkv = Linear(qkv_w, qkv_b, parts, linear_ops)
        self.o = Linear(w[a + "o_proj.weight"], None, parts, linear_ops)
        self.gate_up = Linear(torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]]), None, parts, linear_ops)
        self.down = Linear(w[m + "down_proj.weight"], None, parts, linear_ops)
        self.ln1 = w[f"{prefix}input_layernorm.weight"]
        self.ln2 = w[f"{prefix}post_attention_layernorm.weight"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused kernel instead of eight small ops per norm
        return F.rms_norm(x, weight.shape, weight, eps)
    # as HF's LlamaRMSNorm: normalise in float32, scale in the model dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    def __init__(self, arch: ModelArch, weights: dict[str, torch.Tensor], rope_inv_freq: torch.Tensor,
                 rope_scaling: float, device: torch.device, dtype: torch.dtype, linear_ops=None):
        """`linear_ops`: the engine's compiled kernels (`torch.ops.pdserve`) for the bf16 linears on CPU
        (`Linear`'s tiled layout), or None."""
        self.arch = arch
        self.device = device
        self.dtype = dtype
        parts = torch.get_num_threads() if device.type == "cpu" else 0  # see Linear
        # `weights` is consumed: each layer's tensors leave the dict once its `Linear` layouts are built, so
        # the model never exists twice (as loaded and as laid out) while it loads.
        w = weights
        for k, v in w.items():
            w[k] = v.to(device=device, dtype=dtype)
        self.layers = []
        for i in range(arch.num_layers):
            prefix = f"model.layers.{i}."
            self.layers.append(DecoderLayer(arch, w, prefix, parts, linear_ops))
            for k in [k for k in w if k.startswith(prefix)]:
                del w[k]
        self.norm = w["model.norm.weight"]
        embed = w["model.embed_tokens.weight"]
        head = embed if arch.tie_word_embeddings or "lm_head.weight" not in w else w["lm_head.weight"]
        self.lm_head = Linear(head, None, parts, linear_ops)
        # tied: the embedding is read from the head's storage, so the table exists once (unless the
        # head's layout is opaque)
        self.embed = None if head is embed and self.lm_head.packed is None else embed.contiguous()
        pos = torch.arange(arch.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, rope_inv_freq.float())
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * rope_scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * rope_scaling).to(device=device, dtype=dtype)
        self.fused = None  # `use_fused_ops`
        # the step's attention over the paged cache (`engine.attention`): the engine sets it
        self.attention: AttentionBackend | None = None

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return self.lm_head.rows(ids)
        return self.embed.index_select(0, ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_k: list[torch.Tensor], kv_v: list[torch.Tensor], on_layer=None) -> torch.Tensor:
        """Hidden states after the final norm, [num_tokens, hidden]. `on_layer(i)` is called as
        soon as layer i's KV is in the cache (layer-wise KV transfer)."""
        if self.fused is not None:
            return self._forward_fused(input_ids, positions, meta, kv_k, kv_v, on_layer)
        arch = self.arch
        n = input_ids.shape[0]
        nh, kvh, hd = arch.num_heads, arch.num_kv_heads, arch.head_dim
        q_width = nh * hd
        kv_width = kvh * hd
        cos = self.cos.index_select(0, positions).unsqueeze(1)  # [n, 1, hd]
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        x = self.embed_tokens(input_ids)
        eps = arch.rms_norm_eps
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.ln1, eps)
            qkv = layer.qkv(h)
            qk = qkv[:, : q_width + kv_width].view(n, nh + kvh, hd)
            qk = qk * cos + _rotate_half(qk) * sin
            q = qk[:, :nh]
            k = qk[:, nh:]
            v = qkv[:, q_width + kv_width:].view(n, kvh, hd)
            kv_k[i].index_copy_(0, meta.slot_mapping, k)
            kv_v[i].index_copy_(0, meta.slot_mapping, v)
            attn = self.attention.forward(q, k, v, meta, kv_k[i], kv_v[i])
            if on_layer is not None:
                on_layer(i)
            x = x + layer.o(attn)
            h = rms_norm(x, layer.ln2, eps)
            gu = layer.gate_up(h)
            g, u = gu.chunk(2, dim=-1)
            x = x + layer.down(F.silu(g) * u)
        return rms_norm(x, self.norm, eps)

    def use_fused_ops(self, ops) -> None:
        """Run `forward` through the C++ fused ops (`engine.kernels`: `torch.ops.pdserve`), for bf16 on CPU:
        residual add + RMSNorm, RoPE + the KV-cache write, SiLU * up, each one pass over the rows instead
        of a chain of small torch ops; they round where HF's bf16 modules round. The torch chain stays
        the path for fp32 (token-exact against HF) and the test oracle."""
        if self.dtype != torch.bfloat16 or self.device.type != "cpu":
            raise ValueError(f"the fused ops run bf16 on CPU, not {self.device.type} {self.dtype}")
        self.fused = ops

    def _forward_fused(self, input_ids, positions, meta, kv_k, kv_v, on_layer) -> torch.Tensor:
        ops = self.fused
        arch = self.arch
        n = input_ids.shape[0]
        nh, kvh, hd = arch.num_heads, arch.num_kv_heads, arch.head_dim
        q_width, kv_width = nh * hd, kvh * hd
        eps = arch.rms_norm_eps
        x = self.embed_tokens(input_ids)  # the residual stream, updated in place
        h = torch.empty_like(x)
        ops.rms_norm(h, x, self.layers[0].ln1, eps)
        act = torch.empty(n, arch.intermediate_size, dtype=x.dtype)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(h)
            ops.rope_kv_cache(qkv, positions, self.cos, self.sin, nh, kvh, kv_k[i], kv_v[i], meta.slot_mapping)
            q = qkv[:, :q_width].view(n, nh, hd)
            k = qkv[:, q_width:q_width + kv_width].view(n, kvh, hd)
            v = qkv[:, q_width + kv_width:].view(n, kvh, hd)
            attn = self.attention.forward(q, k, v, meta, kv_k[i], kv_v[i])
            if on_layer is not None:
                on_layer(i)
            ops.add_rms_norm(x, layer.o(attn), layer.ln2, h, eps)  # x += o(attn); h = norm(x)
            ops.silu_mul(act, layer.gate_up(h))
            last = i + 1 == len(self.layers)
            ops.add_rms_norm(x, layer.down(act), self.norm if last else self.layers[i + 1].ln1, h, eps)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype, linear_ops=None,
               tp=None) -> tuple[LlamaModel, object]:
    """Build the model from an HF directory; returns it with the HF config. `linear_ops`: see `LlamaModel`.
    With `tp` (an `engine.parallel.TPGroup` of more than one rank): this rank's shard only, read slice by slice
    (`model.shard` says which; `model.arch` is the shard's, `model.full_arch` the whole model's)."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = AutoConfig.from_pretrained(model_dir)
    arch = ModelArch.from_hf_config(hf_config)
    rope_type = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type == "dynamic":
        raise ValueError("dynamic RoPE scaling is not supported (its frequencies depend on the sequence length)")
    rotary = LlamaRotaryEmbedding(hf_config)  # HF computes inv_freq for every static RoPE variant
    shard = None
    if tp is not None and tp.size > 1:
        from pdserve.engine.parallel import Shard

        shard = Shard.of(arch, tp.rank, tp.size)  # TensorParallelError before any weight is read
    weights: dict[str, torch.Tensor] = {}
    # One tensor at a time, converted as it arrives (the stored copy, often float32, is dropped at once):
    # loading holds the converted model once, never a second full copy (SmolLM2-135M: see docs/architecture.md).
    # A tensor-parallel rank reads only its slices.
    files = sorted(Path(model_dir).glob("*.safetensors"))
    tensors = iter_safetensors(files) if shard is None else shard.iter_slices(files)
    for name, t in tensors:
        if name.startswith("model.") or name == "lm_head.weight":
            weights[name] = t.to(device=device, dtype=dtype)
        del t
    missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in weights]
    if missing:
        raise ValueError(f"{model_dir}: weights missing {missing}")
    local = arch if shard is None else shard.local_arch(arch)
    model = LlamaModel(local, weights, rotary.inv_freq, float(rotary.attention_scaling), device, dtype, linear_ops)
    model.full_arch, model.shard = arch, shard
    if shard is not None:
        from pdserve.engine.parallel import shard_model

        shard_model(model, tp)
    return model, hf_config
